"""process_dicom.py on the shared corpus: every file ends as MANIFEST.tsv's `expected` says."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import run_script
from local_http import refused_url, serve_folder

from cxrsr.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "process_dicom.py"


def run_process(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_script("process_dicom.py", *args, env=env)


def expected_statuses(expected: str) -> set[str]:
    """MANIFEST's free-text `expected` column as the set of acceptable statuses."""
    text = expected.lower()
    if text.startswith("classify"):
        return {"classified"}
    if text.startswith("skip"):
        return {"skipped"}
    if text.startswith("per-file error or skip"):
        return {"failed", "skipped"}
    if text.startswith("per-file error"):
        return {"failed"}
    if "classify with a warning, or reject" in text:
        return {"classified", "skipped", "failed"}
    raise AssertionError(f"unknown expectation {expected!r}")


@pytest.fixture(scope="module")
def corpus_results(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("process") / "results.json"
    proc = run_process(corpus_dir, "--output", out, "--cache-dir", weights_cache_dir)
    return proc, json.loads(out.read_text()), out


def by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(entry["path"]).name: entry for entry in results["images"]}


def test_every_corpus_file_ends_as_the_manifest_says(corpus_results, manifest) -> None:
    _, results, _ = corpus_results
    entries = by_name(results)
    for row in manifest:
        entry = entries[row["filename"]]
        assert entry["status"] in expected_statuses(row["expected"]), (row["filename"], entry)
        if entry["status"] != "classified":
            assert entry["reason"], row["filename"]
    manifest_path = Path(entries["MANIFEST.tsv"]["path"])
    assert entries["MANIFEST.tsv"] == {
        "path": str(manifest_path),
        "status": "skipped",
        "reason": "not a DICOM file",
        "file": {
            "size": manifest_path.stat().st_size,
            "mtime_ns": manifest_path.stat().st_mtime_ns,
        },
    }
    assert len(results["images"]) == len(manifest) + 1


def test_reasons_name_the_problem(corpus_results) -> None:
    _, results, _ = corpus_results
    reasons = {name: entry.get("reason", "") for name, entry in by_name(results).items()}
    assert "JPEG 2000" in reasons["edge_cxr_corrupt_j2k_966.dcm"]
    assert "65535x65535" in reasons["bad_oob_dims_65535.dcm"]
    assert "no pixel data" in reasons["bad_cr_nopixel.dcm"]
    assert "Modality CT" in reasons["bad_ct_chest_tcia_slice.dcm"]
    assert "HIP" in reasons["bad_cr_hip_jlsn.dcm"]
    # Its SOP Instance UID breaks PS3.5 9.1, so no SR could reference it: failed at reading.
    assert "leading zero ('01')" in reasons["bad_cr_dental_panoramic.dcm"]
    assert "Presentation State" in reasons["bad_pr_chest_pa_nopixel.dcm"]
    assert "colour" in reasons["bad_rgb_us.dcm"]
    assert "multi-frame" in reasons["bad_multiframe_us_ybr.dcm"]
    assert (
        "same value" in reasons["bad_cr_hand_constant_rle.dcm"]
        or "value 1" in reasons["bad_cr_hand_constant_rle.dcm"]
    )


def test_exit_code_messages_and_summary(corpus_results) -> None:
    proc, results, _ = corpus_results
    counts = {
        s: sum(e["status"] == s for e in results["images"])
        for s in ("classified", "skipped", "failed")
    }
    assert proc.returncode == 1  # the corpus holds undecodable files
    assert (
        f"{counts['classified']} classified, {counts['skipped']} skipped, {counts['failed']} failed"
        in proc.stdout
    )
    assert "Traceback" not in proc.stderr
    for entry in results["images"]:
        if entry["status"] == "failed":
            assert f"E: {entry['path']}: {entry['reason']}" in proc.stderr
        elif entry["status"] == "skipped":
            assert f"W: {entry['path']}: skipped: {entry['reason']}" in proc.stderr


def test_classified_entries_carry_the_source_identity_and_scores(corpus_results) -> None:
    _, results, _ = corpus_results
    import torchxrayvision as xrv

    labels = xrv.models.model_urls["densenet121-res224-all"]["labels"]
    model = results["model"]
    assert model["labels"] == labels
    assert model["weights"] == "densenet121-res224-all"
    assert model["torchxrayvision"] == xrv.__version__
    assert len(model["weights_sha256"]) == 64
    assert "not a probability" in model["score_kind"]
    classified = [e for e in results["images"] if e["status"] == "classified"]
    assert len(classified) >= 9  # MANIFEST's "classify" rows
    for entry in classified:
        ds = pydicom.dcmread(entry["path"], force=True, stop_before_pixels=True)
        assert entry["sop_instance_uid"] == ds.SOPInstanceUID
        assert entry["series_instance_uid"] == ds.SeriesInstanceUID
        assert entry["study_instance_uid"] == ds.StudyInstanceUID
        assert entry["sop_class_uid"] == ds.SOPClassUID
        assert entry["patient_id"] == str(ds.get("PatientID") or "")
        assert list(entry["scores"]) == labels
        assert all(0.0 <= s <= 1.0 for s in entry["scores"].values())
        assert entry["findings"] == [k for k, v in entry["scores"].items() if v >= 0.5]
    names = {Path(e["path"]).name: e for e in classified}
    # cxr11 and its MONOCHROME1 relabelling share a SOP Instance UID: both entries say so.
    pair = ["cxr11_siim_cr_jpeg8.dcm", "edge_fake_mono1_siim.dcm"]
    for name, other in zip(pair, reversed(pair), strict=True):
        assert any(other in w and "SOP Instance UID" in w for w in names[name]["warnings"]), name
    # No BodyPartExamined: accepted, with a warning in the results.
    assert any("BodyPartExamined" in w for w in names["cxr10_nih_dx_8bit.dcm"]["warnings"])
    assert "warnings" not in names["cxr04_nema_RG1_JLSN.dcm"]


def test_domain_gates_on_the_corpus(corpus_results) -> None:
    """Under the default --domain strict: projection and orientation recorded; the corpus dog,
    whose header names no species, is classified with what the gates can see (issue 13)."""
    _, results, _ = corpus_results
    entries = by_name(results)
    cxr04 = entries["cxr04_nema_RG1_JLSN.dcm"]
    assert (cxr04["projection"], cxr04["patient_orientation"]) == ("PA", "L\\F")
    assert cxr04["orientation_transform"] == "none" and cxr04["domain_warnings"] == []
    dog = entries["edge_vet_dog_dx_thorax_small.dcm"]
    assert dog["status"] == "classified"
    assert [w.split(":")[0] for w in dog["domain_warnings"]] == [
        "no View Position or View Code Sequence",
        "paediatric patient, age 5 years (Patient Age 005Y)",
    ]


def test_rerun_gives_the_same_file(corpus_results, corpus_dir, weights_cache_dir, tmp_path) -> None:
    """Same inputs, same bytes: including each result's classified_at, kept from the last run."""
    _, results, first = corpus_results
    again = tmp_path / "again.json"
    shutil.copy(first, again)
    proc = run_process(
        corpus_dir, "-o", again, "--cache-dir", weights_cache_dir, "-q", "--batch-size", "3"
    )
    assert proc.returncode == 1
    assert again.read_bytes() == first.read_bytes()
    stamps = [e["classified_at"] for e in results["images"] if e["status"] == "classified"]
    assert stamps and all(s.endswith("+00:00") for s in stamps)
    # A file that changed (here: its fingerprint in the previous file) is classified again;
    # a different result gets a new time, the same result keeps its earlier one.
    previous = json.loads(again.read_text())
    changed, same = [e for e in previous["images"] if e["status"] == "classified"][:2]
    changed["scores"][next(iter(changed["scores"]))] += 0.25
    for entry in (changed, same):
        entry["classified_at"] = "2000-01-01T00:00:00+00:00"
        entry["file"]["mtime_ns"] -= 1
    again.write_text(json.dumps(previous))
    run_process(corpus_dir, "-o", again, "--cache-dir", weights_cache_dir, "-q")
    rerun = {e["path"]: e for e in json.loads(again.read_text())["images"]}
    assert rerun[changed["path"]]["classified_at"] != "2000-01-01T00:00:00+00:00"
    assert rerun[same["path"]]["classified_at"] == "2000-01-01T00:00:00+00:00"
    assert rerun[changed["path"]]["scores"] != changed["scores"]


def test_eager_backend_gives_the_same_results(
    corpus_results, corpus_dir, weights_cache_dir, tmp_path
) -> None:
    _, results, _ = corpus_results
    out = tmp_path / "eager.json"
    run_process(
        corpus_dir,
        "-o",
        out,
        "--cache-dir",
        weights_cache_dir,
        "-q",
        "--backend",
        "eager",
        "--workers",
        "0",
    )
    eager = json.loads(out.read_text())
    for a, b in zip(results["images"], eager["images"], strict=True):
        assert a["status"] == b["status"]
        if a["status"] == "classified":
            for label, score in a["scores"].items():
                assert abs(score - b["scores"][label]) <= 1e-4, (a["path"], label)


def test_zip_archives_are_read_in_memory(corpus_dir, weights_cache_dir, tmp_path) -> None:
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", "a/one")
        zf.write(corpus_dir / "bad_ct_small.dcm", "a/two.dcm")
    out = tmp_path / "r.json"
    proc = run_process(archive, "-o", out, "--cache-dir", weights_cache_dir)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(out.read_text())["images"]
    assert [(e["path"], e["status"]) for e in entries] == [
        (f"{archive}!a/one", "classified"),
        (f"{archive}!a/two.dcm", "skipped"),
    ]
    assert "1 classified, 1 skipped, 0 failed" in proc.stdout
    assert not (tmp_path / "a").exists()  # nothing extracted


WEIGHTS_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


def with_weights_base_url(url: str) -> dict[str, str]:
    """This process's environment with the weights fetched from ``url``, never from GitHub."""
    return dict(os.environ, CXRSR_WEIGHTS_BASE_URL=url)


def test_missing_weights_are_downloaded_under_their_real_name(
    corpus_dir, weights_cache_dir, tmp_path
) -> None:
    """A local server stands in for torchxrayvision's GitHub release (CXRSR_WEIGHTS_BASE_URL):
    the file lands in --cache-dir under its published name, and --weights-sha256 is checked
    against what arrived."""
    served = weights_cache_dir / WEIGHTS_FILE
    digest = hashlib.sha256(served.read_bytes()).hexdigest()
    empty, out = tmp_path / "no-weights", tmp_path / "r.json"
    source = corpus_dir / "cxr11_siim_cr_jpeg8.dcm"
    with serve_folder(weights_cache_dir) as (base_url, requested):
        proc = run_script(
            "process_dicom.py",
            source,
            "-o",
            out,
            "--cache-dir",
            empty,
            "--weights-sha256",
            digest,
            "--backend",
            "eager",
            env=with_weights_base_url(base_url),
        )
    assert proc.returncode == 0, proc.stderr
    assert requested == [f"/{WEIGHTS_FILE}"]
    assert sorted(p.name for p in empty.iterdir()) == [WEIGHTS_FILE]  # no .part left
    assert (empty / WEIGHTS_FILE).read_bytes() == served.read_bytes()
    model = json.loads(out.read_text())["model"]
    assert model["weights_sha256"] == digest
    assert json.loads(out.read_text())["images"][0]["status"] == "classified"


@pytest.mark.parametrize("server", ["404", "refused"])
def test_weights_that_cannot_be_downloaded_give_one_clear_line(
    server: str, corpus_dir, tmp_path
) -> None:
    empty, out = tmp_path / "no-weights", tmp_path / "r.json"
    source = corpus_dir / "cxr11_siim_cr_jpeg8.dcm"
    (tmp_path / "www").mkdir()
    with contextlib.ExitStack() as stack:
        if server == "404":
            base_url, requested = stack.enter_context(serve_folder(tmp_path / "www"))
        else:
            base_url, requested = refused_url(), []
        proc = run_process(
            source,
            "-o",
            out,
            "--cache-dir",
            empty,
            "--backend",
            "eager",
            env=with_weights_base_url(base_url),
        )
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("E: ")]
    assert len(errors) == 1, proc.stderr
    assert "cannot download weights densenet121-res224-all" in errors[0]
    assert ("404" if server == "404" else "ConnectionError") in errors[0]
    assert f"download {base_url}{WEIGHTS_FILE} " in errors[0]  # the URL it tried
    assert str(empty / WEIGHTS_FILE) in errors[0]  # and where the file belongs
    assert "Traceback" not in proc.stderr
    assert requested == ([f"/{WEIGHTS_FILE}"] if server == "404" else [])
    assert not out.exists()
    assert not any(empty.glob("*.pt*"))  # no partial download left behind


def test_usage_errors_exit_2(tmp_path) -> None:
    proc = run_process(tmp_path / "does-not-exist")
    assert proc.returncode == 2
    assert "does-not-exist" in proc.stderr
    proc = run_process("--weights", "nonsense", tmp_path, "--cache-dir", tmp_path)
    assert proc.returncode == 2
    assert "unknown weights 'nonsense'" in proc.stderr
    help_text = run_process("--help").stdout
    for code in ("0 ", "1 ", "2 ", "3 "):
        assert f"\n  {code}" in help_text
    assert "NOT probabilities" in help_text


def test_empty_folder_is_not_an_error(tmp_path, weights_cache_dir) -> None:
    (tmp_path / "in").mkdir()
    proc = run_process(tmp_path / "in", "-o", tmp_path / "r.json", "--cache-dir", weights_cache_dir)
    assert proc.returncode == 0
    assert "no files found" in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["images"] == []


def test_results_file_is_replaced_atomically(corpus_dir, weights_cache_dir, tmp_path) -> None:
    out = tmp_path / "r.json"
    out.write_text("previous")
    shutil.copy(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", tmp_path / "x.dcm")
    run_process(tmp_path / "x.dcm", "-o", out, "--cache-dir", weights_cache_dir, "-q")
    assert json.loads(out.read_text())["images"][0]["status"] == "classified"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class StderrLines:
    """A process's stderr read line by line on a thread, so that every wait has a timeout
    (a bare ``readline()`` on a silent process would block the test run forever)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self._lines: list[str] = []
        self._arrived = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            with self._arrived:
                self._lines.append(line)
                self._arrived.notify_all()

    def wait_for(self, text: str, count: int, timeout: float) -> None:
        """Return once ``count`` lines hold ``text``; fail after ``timeout`` seconds."""

        def enough() -> bool:
            return sum(text in line for line in self._lines) >= count

        with self._arrived:
            if not self._arrived.wait_for(enough, timeout):
                pytest.fail(
                    f"fewer than {count} lines with {text!r} in {timeout} s:\n"
                    + "".join(self._lines[-20:])
                )

    def text(self, timeout: float) -> str:
        """Everything the process wrote, once its stderr is closed (it has exited)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stderr still open"
        with self._arrived:
            return "".join(self._lines)


def test_ctrl_c_keeps_the_finished_results(corpus_dir, weights_cache_dir, tmp_path) -> None:
    """Ctrl-C (SIGINT to the process group): exit 130, the finished files' results written."""
    import signal

    folder = tmp_path / "in"
    folder.mkdir()
    total = 400
    for i in range(total):
        os.link(corpus_dir / "cxr09_orthanc_issue44_mono1_jpeg8.dcm", folder / f"{i:04d}.dcm")
    out = tmp_path / "r.json"
    args = [
        folder,
        "-o",
        out,
        "--cache-dir",
        weights_cache_dir,
        "--batch-size",
        "2",
        "--workers",
        "1",
    ]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=PROJECT_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = StderrLines(process)
        # One W: line per classified file; each wait is bounded, so a silent process fails.
        lines.wait_for("BodyPartExamined is absent", count=6, timeout=120)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    stderr = lines.text(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert 6 <= len(results["images"]) < total
    assert all(e["status"] == "classified" for e in results["images"])
    assert not out.with_name("r.json.journal").exists()  # folded into the results file
