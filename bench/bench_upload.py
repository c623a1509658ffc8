#!/usr/bin/env python3
"""How fast do DICOM files reach Orthanc: a naive loop, upload_dicom.py, and storescu.

All three send the same few hundred files to a fresh local Orthanc (its own storage
for every run, so no ``AlreadyStored`` shortcut), each as a whole process timed from
start to exit, as a user would run it:

* ``naive loop``: one ``requests.post`` per file, one file at a time, a new connection
  each time, as the project's original scripts did;
* ``upload_dicom.py``: this project's uploader with its defaults, including its
  verification pass through Orthanc's API (the MD5 and SR checks are part of the time);
* ``storescu``: dcmtk's C-STORE client, a reference, proposing each file's own transfer
  syntax (a generated ``-xf`` profile with one presentation context per SOP class and
  transfer syntax found), so compressed files go through unconverted.

Two settings: ``loopback`` (direct), and ``5 ms``: through ``delay_proxy.py``, which
delays each direction by 5 ms and charges each new connection one round trip, as a PACS
across a network would; the benchmark first measures that the proxy does so
(:func:`check_proxy`). Each run is checked: Orthanc must hold every instance afterwards,
or the run is reported as failed. Beside the ratios, the table shows each client's own
CPU time per instance (user + system, from the process's rusage, start-up included).

The file set mixes copies of the corpus's chest radiographs (JPEG, JPEG-LS, JPEG 2000
and uncompressed, 0.1 to 4 MB, each with fresh study, series and SOP Instance UIDs,
transfer syntax kept) with small instances (2 to 40 kB), one large for two small.

Run from the project root::

    .venv/bin/python bench/bench_upload.py --files 300 --repeats 3

The project's package is byte-compiled first, as any run after the first finds it:
the naive loop's ``requests`` was compiled when pip installed it, while with
``PYTHONDONTWRITEBYTECODE=1`` in the environment (as on this project's benchmark
machine) every run of ``upload_dicom.py`` would otherwise compile ``cxrsr`` from
source, about 20 ms per run that no user's second run pays.

Note: Debian's Orthanc 1.10.1 leaves Nagle's algorithm on for its DICOM port unless
``TCP_NODELAY=1`` is in its environment (its DCMTK reads that variable); without it a
C-STORE round trip costs about 50-80 ms here. The benchmark sets it for every Orthanc
it starts and for storescu, to give the reference its best case.
"""

from __future__ import annotations

import argparse
import compileall
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
import urllib3
from pydicom.uid import generate_uid

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from delay_proxy import DelayProxy  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402

CORPUS_DIR = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
LARGE = (
    "cxr04_nema_RG1_JLSN.dcm",  # JPEG-LS near-lossless, 2.8 MB
    "cxr05_dx_canon_966_fixed_j2kr.dcm",  # JPEG 2000 lossless, 4.1 MB
    "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm",  # implicit VR, 0.4 MB
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",  # JPEG baseline, 0.6 MB
    "cxr10_nih_dx_8bit.dcm",  # implicit VR, 1 MB
    "cxr11_siim_cr_jpeg8.dcm",  # JPEG baseline, 0.1 MB
)
SMALL = (
    "edge_vet_dog_dx_thorax_small.dcm",  # 38 kB
    "bad_cr_cspine_16x16.dcm",  # 2 kB
    "bad_ct_small.dcm",  # 39 kB
)

#: The original scripts' upload: a new request (and connection) per file, one at a time.
NAIVE_LOOP = """
import os, sys
from pathlib import Path
import requests
url = os.environ["ORTHANC_URL"]
auth = (os.environ["ORTHANC_USERNAME"], os.environ["ORTHANC_PASSWORD"])
for path in sorted(Path(sys.argv[1]).iterdir()):
    with open(path, "rb") as f:
        response = requests.post(url + "/instances", data=f.read(), auth=auth)
    response.raise_for_status()
"""

USERNAME = "bench"
PASSWORD = secrets.token_urlsafe(16)


@dataclass
class BenchSet:
    folder: Path
    count: int
    size: int
    storescu_profile: Path


@dataclass
class Result:
    setting: str
    method: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """Client CPU seconds (user + system) of each run, from the process's own rusage."""
    failures: list[str] = field(default_factory=list)


def make_bench_set(folder: Path, count: int) -> BenchSet:
    """``count`` new instances: one large corpus radiograph for every two small files."""
    folder.mkdir(parents=True)
    datasets = {name: pydicom.dcmread(CORPUS_DIR / name) for name in LARGE + SMALL}
    contexts: set[tuple[str, str]] = set()
    size = 0
    for index in range(count):
        name = LARGE[(index // 3) % len(LARGE)] if index % 3 == 0 else SMALL[index % len(SMALL)]
        ds = datasets[name]
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)  # pixel data kept as encoded
        size += path.stat().st_size
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    profile = folder.parent / "storescu.cfg"
    profile.write_text(storescu_profile(contexts), encoding="utf-8")
    return BenchSet(folder, count, size, profile)


def storescu_profile(contexts: set[tuple[str, str]]) -> str:
    """A storescu ``-xf`` profile proposing each (SOP class, transfer syntax) pair alone."""
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    for i, (sop_class, ts) in enumerate(sorted(contexts), start=1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[Bench]", "PresentationContexts = Contexts", ""]
    return "\n".join(lines)


def run_naive(bench: BenchSet, url: str, dicom_port: int) -> list[str]:
    return [sys.executable, "-c", NAIVE_LOOP, str(bench.folder)]


#: Extra options for upload_dicom.py (``--upload-options``); none: its defaults.
UPLOAD_OPTIONS: list[str] = []


def run_upload_dicom(bench: BenchSet, url: str, dicom_port: int) -> list[str]:
    script = str(PROJECT_ROOT / "upload_dicom.py")
    return [sys.executable, script, "-q", *UPLOAD_OPTIONS, str(bench.folder)]


def run_storescu(bench: BenchSet, url: str, dicom_port: int) -> list[str]:
    return [
        "storescu",
        "-xf",
        str(bench.storescu_profile),
        "Bench",
        "-aec",
        "ORTHANC",
        "+sd",
        "+r",
        "127.0.0.1",
        str(dicom_port),
        str(bench.folder),
    ]


METHODS: dict[str, Callable[[BenchSet, str, int], list[str]]] = {
    "naive loop": run_naive,
    "upload_dicom.py": run_upload_dicom,
    "storescu (C-STORE)": run_storescu,
}


def time_one(bench: BenchSet, method: str, delay: float, workdir: Path) -> tuple[float, float, str]:
    """Start a fresh Orthanc, send the set once with ``method``; (seconds, client CPU
    seconds, failure or "").

    ``workdir`` must be new: its storage is left for the caller to delete after the
    whole benchmark. Deleting a run's few thousand files and folders just before the
    next run starts made that run's Orthanc slower (ext4 skips recently freed inodes
    when it allocates new ones: ``recently_deleted`` in a profile), so later runs
    were slower than earlier ones whatever the method.
    """
    server = LocalOrthanc(workdir, USERNAME, PASSWORD, dicom_server=True)
    server.start()
    proxies: list[DelayProxy] = []
    try:
        url, dicom_port = server.url, server.dicom_port
        if delay > 0:
            proxies = [
                DelayProxy("127.0.0.1", server.http_port, delay).start(),
                DelayProxy("127.0.0.1", server.dicom_port, delay).start(),
            ]
            url, dicom_port = proxies[0].url, proxies[1].port
        env = dict(
            os.environ,
            ORTHANC_URL=url,
            ORTHANC_USERNAME=USERNAME,
            ORTHANC_PASSWORD=PASSWORD,
            TCP_NODELAY="1",
        )
        command = METHODS[method](bench, url, dicom_port)
        with tempfile.TemporaryFile() as out:
            started = time.perf_counter()
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out, cwd=PROJECT_ROOT)
            _, status, usage = os.wait4(process.pid, 0)  # the client's own CPU time
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            output = out.read().decode("utf-8", "replace")
        cpu = usage.ru_utime + usage.ru_stime
        stored = requests.get(
            f"{server.url}/statistics", auth=(USERNAME, PASSWORD), timeout=10
        ).json()["CountInstances"]
        failure = ""
        if process.returncode != 0 or stored != bench.count:
            failure = (
                f"exit {process.returncode}, {stored}/{bench.count} stored: {output.strip()[-300:]}"
            )
        return seconds, cpu, failure
    finally:
        for proxy in proxies:
            proxy.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--files", type=int, default=300, help="instances in the set (default: 300)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (default: 3)")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=5.0,
        help="one-way delay of the network setting (default: 5)",
    )
    parser.add_argument(
        "--settings", default="loopback,network", help="comma-separated: loopback, network"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of the methods"
    )
    parser.add_argument(
        "--upload-options", default="", help="extra upload_dicom.py options, e.g. '--workers 8'"
    )
    args = parser.parse_args()
    UPLOAD_OPTIONS.extend(args.upload_options.split())
    methods = [m.strip() for m in args.methods.split(",")]
    os.environ["TCP_NODELAY"] = "1"  # inherited by every Orthanc started below (see above)
    compileall.compile_dir(PROJECT_ROOT / "cxrsr", quiet=1)  # see the module docstring
    settings = {"loopback": 0.0, "network": args.delay_ms / 1000}
    chosen = [s.strip() for s in args.settings.split(",")]
    with tempfile.TemporaryDirectory(prefix="cxrsr-bench-") as tmp:
        bench = make_bench_set(Path(tmp) / "files", args.files)
        print(f"{bench.count} files, {bench.size / 1e6:.1f} MB; {os.cpu_count()} CPUs", flush=True)
        if "network" in chosen:
            print(check_proxy(settings["network"]), flush=True)
        results: list[Result] = []
        runs = 0
        for setting in chosen:
            label = "loopback" if setting == "loopback" else f"{args.delay_ms:g} ms each way"
            rows = {m: Result(label, m) for m in methods}
            for repeat in range(args.repeats):
                # Rotate the order so no method always runs first (warm caches, drifting load).
                order = methods[repeat % len(methods) :] + methods[: repeat % len(methods)]
                for method in order:
                    runs += 1
                    seconds, cpu, failure = time_one(
                        bench, method, settings[setting], Path(tmp) / f"orthanc-{runs}"
                    )
                    rows[method].seconds.append(seconds)
                    rows[method].cpu.append(cpu)
                    if failure:
                        rows[method].failures.append(failure)
                    print(
                        f"  {label:>16}  {method:<20} {seconds:7.2f} s, client CPU "
                        f"{cpu:6.2f} s {failure}",
                        flush=True,
                    )
            results.extend(rows.values())
        print_table(results, bench)
    return 1 if any(r.failures for r in results) else 0


def print_table(results: list[Result], bench: BenchSet) -> None:
    """Median throughput, the ratio to the naive loop in the same setting, and the median
    client CPU per instance (the whole process: start-up, hashing, HTTP, verification)."""
    print()
    print(
        f"{'setting':<16}  {'method':<20} {'inst/s':>8} {'MB/s':>7} {'vs naive':>9} "
        f"{'CPU/inst':>9}  runs (s)"
    )
    naive: dict[str, float] = {}
    for row in results:
        median = statistics.median(row.seconds)
        if row.method == "naive loop":
            naive[row.setting] = median
        ratio = naive.get(row.setting, median) / median
        cpu_ms = statistics.median(row.cpu) / bench.count * 1000
        runs = " ".join(f"{s:.2f}" for s in row.seconds)
        flag = "  FAILED" if row.failures else ""
        print(
            f"{row.setting:<16}  {row.method:<20} {bench.count / median:8.0f} "
            f"{bench.size / 1e6 / median:7.1f} {ratio:8.2f}x {cpu_ms:6.2f} ms  {runs}{flag}"
        )


def check_proxy(delay: float, samples: int = 20) -> str:
    """Measure what the delay proxy charges: a request on a new connection must cost one
    round trip more than one on a kept-alive connection (the TCP handshake), or the
    network setting would flatter a connection-per-file client. Raises if it does not."""
    listener = socket.create_server(("127.0.0.1", 0))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def answer_all(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                conn.sendall(answer)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer_all, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    with DelayProxy("127.0.0.1", listener.getsockname()[1], delay) as proxy:
        url = f"{proxy.url}/system"
        fresh, kept = [], []
        pool = urllib3.PoolManager(maxsize=1)
        for _ in range(samples):
            started = time.perf_counter()
            once = urllib3.PoolManager()  # a new connection each time
            once.request("GET", url)
            once.clear()
            fresh.append(time.perf_counter() - started)
            started = time.perf_counter()
            pool.request("GET", url)
            kept.append(time.perf_counter() - started)
    listener.close()
    new_ms = statistics.median(fresh) * 1000
    kept_ms = statistics.median(kept[1:]) * 1000
    report = (
        f"delay proxy check: request on a new connection {new_ms:.1f} ms, on a kept-alive "
        f"one {kept_ms:.1f} ms (expected {4 * delay * 1000:.0f} and {2 * delay * 1000:.0f})"
    )
    if not (new_ms >= 3.8 * delay * 1000 and kept_ms >= 1.9 * delay * 1000):
        raise SystemExit(f"E: {report}: the proxy does not charge what it should")
    return report


if __name__ == "__main__":
    sys.exit(main())
