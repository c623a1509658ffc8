"""The results file's published JSON Schema: generated from the types, and what runs write.

Every results file process_dicom.py writes under the tests is checked against the
committed schema by ``run_script`` (tests/conftest.py); the tests here check the schema
itself, the run-time check that shares its source, and the runs that matter most:
classified, skipped and failed files, and a rerun that reuses earlier results.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cxrsr.config import PROJECT_ROOT
from cxrsr.journal import Journal, read_journal
from cxrsr.results import (
    FORMAT,
    ClassifiedEntry,
    ModelRecord,
    ResultsEntry,
    json_schema,
    load_results,
    problem,
    schema_text,
)
from tests.conftest import (
    RESULTS_SCHEMA,
    assert_valid_journal,
    assert_valid_results,
    results_validator,
    run_script,
)

MODEL: ModelRecord = {
    "weights": "densenet121-res224-all",
    "weights_sha256": "ab" * 32,
    "torchxrayvision": "1.5.7",
    "labels": ["Atelectasis", "Effusion"],
    "threshold": 0.5,
    "score_kind": "operating-point normalised score",
    "options": {"domain": "strict", "heatmaps": "findings"},
}
CLASSIFIED: ClassifiedEntry = {
    "path": "data/a.dcm",
    "status": "classified",
    "sop_instance_uid": "1.2.3.4",
    "series_instance_uid": "1.2.3",
    "study_instance_uid": "1.2",
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
    "patient_id": "P1",
    "modality": "CR",
    "rows": 2048,
    "columns": 2048,
    "domain_warnings": [],
    "scores": {"Atelectasis": 0.41, "Effusion": 0.5},
    "findings": ["Effusion"],
    "classified_at": "2026-11-22T01:20:58+00:00",
    "heatmaps": {"Effusion": "heatmaps/a-effusion.png"},
    "preview": "previews/a.png",
    "preview_crop": [0.0, 29.856, 964.0, 964.288],
    "file": {"size": 2765596, "mtime_ns": 1764547200123456789},
}
OTHERS: list[ResultsEntry] = [
    {"path": "data/ct.dcm", "status": "skipped", "reason": "Modality CT is not a radiograph"},
    {
        "path": "data.zip!b.dcm",
        "status": "failed",
        "reason": "cannot decode",
        "file": {"size": 10, "mtime_ns": 1, "member_size": 5, "member_crc32": 7},
    },
]


def document() -> dict[str, Any]:
    return copy.deepcopy({"format": FORMAT, "model": MODEL, "images": [CLASSIFIED, *OTHERS]})


def test_the_committed_schema_is_the_one_the_types_give() -> None:
    assert RESULTS_SCHEMA.read_text(encoding="utf-8") == schema_text(), (
        "docs/results.schema.json is stale: python -m cxrsr.results schema > "
        "docs/results.schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_the_schema_command_prints_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cxrsr.results", "schema"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == RESULTS_SCHEMA.read_text(encoding="utf-8")


def test_a_results_document_matches_the_schema_and_the_types() -> None:
    assert not list(results_validator().iter_errors(document()))
    assert problem(document()) is None


def _set(path: str, value: object) -> dict[str, Any]:
    """The sample document with the value at ``a/0/b`` replaced (``...`` deletes the key)."""
    doc = document()
    *parents, last = path.split("/")
    target: Any = doc
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("images/0/sop_instance_uid", ..., "images[0]: lacks 'sop_instance_uid'"),
        ("images/0/status", "done", "images[0].status: 'done' is not one of"),
        ("images/0/scores/Effusion", "high", "images[0].scores.Effusion: 'high' is not a number"),
        ("images/0/findings", "Effusion", "images[0].findings: not a list"),
        ("images/0/rows", True, "images[0].rows: True is not an integer"),
        ("images/0/file/size", "10", "images[0].file.size: '10' is not an integer"),
        ("images/1/reason", ..., "images[1]: lacks 'reason'"),
        ("images/2/file/member_crc32", 1.5, "images[2].file.member_crc32: 1.5 is not an integer"),
        ("model/labels", "Effusion", "model.labels: not a list"),
        ("model/weights_sha256", ..., "model: lacks 'weights_sha256'"),
        ("format", "cxrsr-results/2", "format: 'cxrsr-results/2' is not one of"),
        ("complete", "no", "complete: 'no' is not a boolean"),
    ],
)
def test_a_broken_document_fails_both_checks(
    path: str, value: object, reason: str, tmp_path: Path
) -> None:
    broken = _set(path, value)
    assert list(results_validator().iter_errors(broken)), f"the schema took {path}={value!r}"
    found = problem(broken)
    assert found is not None and found.startswith(reason), found
    target = tmp_path / "results.json"
    target.write_text(json.dumps(broken))
    with pytest.raises(AssertionError, match=r"does not match results\.schema\.json"):
        assert_valid_results(target)


def test_journal_lines_match_the_schema_and_broken_ones_are_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "results.json.journal"
    journal = Journal(path)
    journal.start(MODEL)
    for entry in document()["images"]:
        journal.append(entry)
    journal.close()
    assert_valid_journal(path)
    assert [entry for _, entry in read_journal(path)] == document()["images"]

    broken = dict(document()["images"][0], scores={"Effusion": "high"})
    with path.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps({"entry": broken}) + "\n")
    with pytest.raises(AssertionError, match="line 5 does not match the schema"):
        assert_valid_journal(path)
    assert len(list(read_journal(path))) == 3  # the broken entry is passed over


def test_readers_may_meet_keys_they_do_not_know() -> None:
    newer = _set("images/0/future_key", {"anything": 1})
    newer["model"]["future_key"] = [1]
    assert not list(results_validator().iter_errors(newer))
    assert problem(newer) is None


def test_an_older_results_file_still_loads(tmp_path: Path) -> None:
    """Files of earlier versions lack ``format``, ``file``, ``classified_at`` and the
    domain keys; they load as before."""
    old = {
        "model": {k: MODEL[k] for k in ("weights", "weights_sha256", "torchxrayvision", "labels")},
        "images": [{k: v for k, v in CLASSIFIED.items() if k not in ("file", "classified_at")}],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    assert load_results(path)["images"] == old["images"]


def test_a_malformed_model_block_is_one_usage_error(tmp_path: Path) -> None:
    """A model block the types refuse stops generate_sr.py with one E: line (exit 2)."""
    broken = _set("model/torchxrayvision", 157)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(broken))
    proc = run_script("generate_sr.py", "--results", path, "--output-dir", tmp_path / "sr")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("E:")]
    assert errors == [
        f"E: {path}: not a valid results file: model.torchxrayvision: 157 is not a string"
    ], proc.stderr
    assert "Traceback" not in proc.stderr


CLASSIFIABLE = ("cxr10_nih_dx_8bit.dcm", "cxr07_barre_CR-MONO1-10-chest_nometa.dcm")
NOT_CLASSIFIED = ("bad_ct_small.dcm", "bad_cr_nopixel.dcm", "edge_cxr_corrupt_j2k_966.dcm")


def test_runs_with_skips_failures_and_a_rerun_write_what_the_schema_says(
    tmp_path: Path, corpus_dir: Path, weights_cache_dir: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in CLASSIFIABLE + NOT_CLASSIFIED:
        shutil.copy2(corpus_dir / name, inputs / name)
    out = tmp_path / "out" / "results.json"

    def process() -> subprocess.CompletedProcess[str]:
        proc = run_script("process_dicom.py", inputs, "-o", out, "--cache-dir", weights_cache_dir)
        assert proc.returncode == 1, proc.stderr  # some inputs failed
        return proc

    process()
    first = assert_valid_results(out)
    assert problem(first) is None
    statuses = {Path(e["path"]).name: e["status"] for e in first["images"]}
    assert {statuses[name] for name in CLASSIFIABLE} == {"classified"}
    assert {statuses[name] for name in NOT_CLASSIFIED} <= {"skipped", "failed"}
    assert {"skipped", "failed"} <= set(statuses.values())

    # A rerun: the unchanged files' entries are reused, a changed one is classified again.
    changed = inputs / CLASSIFIABLE[0]
    changed.write_bytes(changed.read_bytes())
    proc = process()
    assert "unchanged since an earlier run" in proc.stderr
    again = assert_valid_results(out)
    assert problem(again) is None
    assert [e["path"] for e in again["images"]] == [e["path"] for e in first["images"]]
