#!/usr/bin/env python3
"""How fast does watch_orthanc.py work, against the three scripts on the same images.

* **Backfill rate.** The same ``--images`` CR/DX images (copies of the corpus's chest
  radiographs with fresh UIDs, several transfer syntaxes) are stored in two fresh local
  Orthancs. Against the first, the three scripts run from the files on disk, as
  ``run.sh`` does: ``process_dicom.py``, ``generate_sr.py``, then ``upload_dicom.py`` of
  the SRs (the images are already there; sending them again would only slow the
  baseline). Against the second, ``watch_orthanc.py --once`` fetches every image over
  REST and does the same work. Each is timed as a whole process chain; the ratio is
  the watcher's rate over the scripts' (target: at least 0.8).
* **Latency.** The watcher then follows the second Orthanc in its default mode; a new
  one-image series is stored, and the time until its SR is in Orthanc is measured,
  minus the ``StableAge`` the series must wait out first (target: at most 10 s).

Both use a random-weights DenseNet under the real weights file name (no download
here); the speed of the network does not depend on the values of its weights.

Run from the project root::

    .venv/bin/python bench/bench_watch.py --images 192
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402

CORPUS_DIR = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
IMAGES = (
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr05_dx_canon_966_fixed_j2kr.dcm",
    "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr10_nih_dx_8bit.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
)
STABLE_AGE = 2


def make_images(folder: Path, count: int, small: bool = False) -> list[Path]:
    """Copies of the corpus radiographs with fresh UIDs, four to a study; ``small``: one
    127 kB JPEG radiograph only (for long runs)."""
    folder.mkdir(parents=True)
    paths = []
    names = IMAGES[-1:] if small else IMAGES
    for index in range(count):
        ds = pydicom.dcmread(CORPUS_DIR / names[index % len(names)])
        if index % 4 == 0:
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{index:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def random_weights(folder: Path) -> Path:
    import torch
    import torchxrayvision as xrv

    url = xrv.models.model_urls["densenet121-res224-all"]["weights_url"]
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(), folder / os.path.basename(url))
    return folder


def env_for(server: LocalOrthanc) -> dict[str, str]:
    return dict(
        os.environ,
        ORTHANC_URL=server.url,
        ORTHANC_USERNAME=server.username,
        ORTHANC_PASSWORD=server.password,
        CXRSR_DOTENV=os.devnull,
    )


def script(name: str, *args: object, env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, str(PROJECT_ROOT / name), "-q", *map(str, args)],
        check=True,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        timeout=3600,
    )


def store(server: LocalOrthanc, paths: list[Path]) -> None:
    with requests.Session() as session:
        session.auth = (server.username, server.password)
        for path in paths:
            session.post(f"{server.url}/instances", data=path.read_bytes()).raise_for_status()


def sr_count(server: LocalOrthanc) -> int:
    answer = requests.post(
        f"{server.url}/tools/find",
        json={"Level": "Instance", "Query": {"Modality": "SR"}},
        auth=(server.username, server.password),
        timeout=30,
    )
    answer.raise_for_status()
    return len(answer.json())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument(
        "--memory",
        type=int,
        default=0,
        metavar="N",
        help="instead: peak memory of --once over N/5 and over N small images",
    )
    args = parser.parse_args()
    if args.memory:
        return memory(args.memory)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        work = Path(tmp)
        images = make_images(work / "images", args.images)
        weights = random_weights(work / "weights")
        overrides = {"StableAge": STABLE_AGE}
        scripts_pacs = LocalOrthanc(
            work / "o1", "bench", secrets.token_urlsafe(12), overrides=overrides
        )
        watch_pacs = LocalOrthanc(
            work / "o2", "bench", secrets.token_urlsafe(12), overrides=overrides
        )
        with scripts_pacs, watch_pacs:
            # Warm-up: the ONNX export of the weights is made once, by the first run.
            script(
                "process_dicom.py",
                images[0],
                "-o",
                work / "warm.json",
                "--cache-dir",
                weights,
                env=env_for(scripts_pacs),
            )
            store(scripts_pacs, images)
            store(watch_pacs, images)

            started = time.perf_counter()
            env = env_for(scripts_pacs)
            script(
                "process_dicom.py",
                work / "images",
                "-o",
                work / "r.json",
                "--cache-dir",
                weights,
                env=env,
            )
            script(
                "generate_sr.py", "--results", work / "r.json", "--output-dir", work / "sr", env=env
            )
            script("upload_dicom.py", work / "sr", env=env)
            scripts_seconds = time.perf_counter() - started

            started = time.perf_counter()
            script(
                "watch_orthanc.py",
                "--once",
                "--state-dir",
                work / "state",
                "--cache-dir",
                weights,
                env=env_for(watch_pacs),
            )
            watch_seconds = time.perf_counter() - started
            assert sr_count(watch_pacs) == sr_count(scripts_pacs), "different numbers of SRs"

            n = args.images
            print(f"backfill of {n} images already in Orthanc (SRs: {sr_count(watch_pacs)})")
            print(
                f"  three scripts from disk : {scripts_seconds:6.1f} s  {n / scripts_seconds:5.1f} img/s"
            )
            print(
                f"  watch_orthanc.py --once : {watch_seconds:6.1f} s  {n / watch_seconds:5.1f} img/s"
                f"  ({scripts_seconds / watch_seconds:.2f}x the scripts' rate; target >= 0.8)"
            )

            log = open(work / "follow.log", "wb")  # noqa: SIM115
            follower = subprocess.Popen(
                [
                    sys.executable,
                    str(PROJECT_ROOT / "watch_orthanc.py"),
                    "--state-dir",
                    work / "state",
                    "--cache-dir",
                    weights,
                    "--poll-interval",
                    "0.2",
                ],
                cwd=PROJECT_ROOT,
                env=env_for(watch_pacs),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                time.sleep(8)  # model loaded, first reconciliation done
                latencies = []
                extra = make_images(work / "new", args.latency_runs)
                for path in extra:
                    before = sr_count(watch_pacs)
                    started = time.perf_counter()
                    store(watch_pacs, [path])
                    while sr_count(watch_pacs) == before:
                        if time.perf_counter() - started > 120:
                            raise SystemExit("no SR within 120 s; see the watcher's log")
                        time.sleep(0.1)
                    latencies.append(time.perf_counter() - started - STABLE_AGE)
            finally:
                follower.terminate()
                follower.wait(30)
                log.close()
            shown = ", ".join(f"{x:.1f}" for x in latencies)
            print(
                f"latency after StableAge ({STABLE_AGE} s) for a new one-image series: "
                f"{shown} s (target <= 10 s)"
            )
    return 0


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found.extend(_tree(int(child)))
    return found


def memory(count: int) -> int:
    """Peak RSS of the watcher over N/5 and N images, sampled from /proc every 0.2 s:
    the main process alone, and the main process plus its reader processes."""
    import shutil

    with tempfile.TemporaryDirectory(prefix="bench-watch-mem-") as tmp:
        work = Path(tmp)
        weights = random_weights(work / "weights")
        # The ONNX export of the weights (PyTorch, once per weights file) is not measured.
        script(
            "process_dicom.py",
            CORPUS_DIR / IMAGES[-1],
            "-o",
            work / "warm.json",
            "--cache-dir",
            weights,
            env=dict(os.environ, CXRSR_DOTENV=os.devnull),
        )
        peaks = []
        for n in (count // 5, count):
            pacs = LocalOrthanc(work / f"o{n}", "bench", secrets.token_urlsafe(12))
            folder = work / f"images{n}"
            with pacs:
                paths = make_images(folder, n, small=True)
                store(pacs, paths)
                shutil.rmtree(folder)
                started = time.perf_counter()
                process = subprocess.Popen(
                    [
                        sys.executable,
                        str(PROJECT_ROOT / "watch_orthanc.py"),
                        "-q",
                        "--once",
                        "--state-dir",
                        str(work / f"state{n}"),
                        "--cache-dir",
                        str(weights),
                    ],
                    cwd=PROJECT_ROOT,
                    env=env_for(pacs),
                    stdout=subprocess.DEVNULL,
                )
                main_peak = tree_peak = 0
                while process.poll() is None:
                    main_peak = max(main_peak, _rss_kb(process.pid))
                    tree_peak = max(tree_peak, sum(_rss_kb(p) for p in _tree(process.pid)))
                    time.sleep(0.2)
                seconds = time.perf_counter() - started
                if process.returncode != 0:
                    print(pacs.log_path.read_text(errors="replace")[-3000:])
                    raise SystemExit(f"watch_orthanc.py exited {process.returncode}")
                assert sr_count(pacs) == n
            peaks.append(main_peak)
            print(
                f"--once over {n:5d} images: {seconds:6.1f} s, peak RSS: watcher "
                f"{main_peak / 1024:.0f} MB, with its reader processes {tree_peak / 1024:.0f} MB"
            )
        print(f"watcher's peak RSS, {count} vs {count // 5} images: {peaks[1] / peaks[0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
