"""process_dicom.py on the shared corpus: every file ends as MANIFEST.tsv's `expected` says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import run_script

from cxrsr.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "process_dicom.py"


def run_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_script("process_dicom.py", *args)


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


def test_missing_weights_give_one_clear_line(corpus_dir, tmp_path) -> None:
    empty = tmp_path / "no-weights"
    out = tmp_path / "r.json"
    proc = run_process(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", "-o", out, "--cache-dir", empty)
    assert proc.returncode == 3
    errors = [line for line in proc.stderr.splitlines() if line.startswith("E: ")]
    assert len(errors) == 1
    assert "cannot download weights densenet121-res224-all" in errors[0]
    assert (
        str(
            empty
            / "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
        )
        in errors[0]
    )
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not any(empty.glob("*.pt"))  # no partial download left behind


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


def test_ctrl_c_keeps_the_finished_results(corpus_dir, weights_cache_dir, tmp_path) -> None:
    """Ctrl-C (SIGINT to the process group): exit 130, the finished files' results written."""
    import os
    import signal
    import time

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
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stderr is not None
    finished = 0
    deadline = time.monotonic() + 120
    while finished < 6 and time.monotonic() < deadline:  # one W: line per classified file
        line = process.stderr.readline()
        finished += "BodyPartExamined is absent" in line
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr
    results = json.loads(out.read_text())
    assert results["complete"] is False
    assert 6 <= len(results["images"]) < total
    assert all(e["status"] == "classified" for e in results["images"])
    assert not out.with_name("r.json.journal").exists()  # folded into the results file
