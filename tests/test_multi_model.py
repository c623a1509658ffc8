"""Several models in one run (``process_dicom.py --weights a,b``): each model's results kept apart.

One run with two models over a few corpus files is compared with a run of each model
alone: the same scores (exactly), the same heatmaps, and from generate_sr.py the same SRs
and key images byte for byte. The weights are random, saved under the real file names and
with the classifier layer scaled as tests/test_models_all.py does, so scores are spread
over (0, 1) and comparing them means something.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import require_program, run_script, sr_files
from test_models_all import save_densenet

from cxrsr.results import load_results, problem

FIRST, SECOND = "densenet121-res224-all", "densenet121-res224-rsna"
BOTH = f"{FIRST},{SECOND}"
#: Two chest radiographs the strict domain gates pass, and a CT they skip.
FILES = ("cxr04_nema_RG1_JLSN.dcm", "cxr05_dx_canon_966_fixed_j2kr.dcm", "bad_ct_small.dcm")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multi-weights")
    save_densenet(folder, FIRST, seed=0)
    save_densenet(folder, SECOND, seed=1)
    return folder


def classify(out: Path, weights: Path, corpus_dir: Path, names: str) -> str:
    """process_dicom.py on :data:`FILES` with ``--weights names``; its standard error."""
    proc = run_script(
        "process_dicom.py",
        *(corpus_dir / name for name in FILES),
        "--weights",
        names,
        "--cache-dir",
        weights,
        "--workers",
        "0",
        "-o",
        out,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def generate(results: Path) -> Path:
    """generate_sr.py on ``results`` into ``sr/`` beside it; the folder."""
    folder = results.parent / "sr"
    proc = run_script(
        "generate_sr.py", "--results", results, "--output-dir", folder, "--jobs", "1", timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def runs(weights: Path, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``both/``, ``first/`` and ``second/``: the two-model run and each model's run alone,
    each with its SRs in ``sr/``.

    A result's ``classified_at`` is when it was first produced, and it is the SR's Content
    Date/Time: the single runs get the two-model run's times, as if made at that moment,
    before their SRs are written.
    """
    root = tmp_path_factory.mktemp("multi-runs")
    classify(root / "both" / "results.json", weights, corpus_dir, BOTH)
    times = {
        entry["path"]: entry.get("classified_at")
        for entry in read(root / "both" / "results.json")["images"]
    }
    for folder, name in (("first", FIRST), ("second", SECOND)):
        results = root / folder / "results.json"
        classify(results, weights, corpus_dir, name)
        document = read(results)
        for entry in document["images"]:
            if entry["status"] == "classified":
                entry["classified_at"] = times[entry["path"]]
        results.write_text(json.dumps(document), encoding="utf-8")
    for folder in ("both", "first", "second"):
        generate(root / folder / "results.json")
    return root


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def classified(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in document["images"] if entry["status"] == "classified"]


def test_each_models_scores_are_exactly_those_of_its_run_alone(runs: Path) -> None:
    both = read(runs / "both" / "results.json")
    first, second = read(runs / "first" / "results.json"), read(runs / "second" / "results.json")
    assert problem(both) is None
    # One entry per image, in input order, the skipped CT once.
    assert [e["path"] for e in both["images"]] == [e["path"] for e in first["images"]]
    assert [e["status"] for e in both["images"]] == ["classified", "classified", "skipped"]
    assert [m["weights"] for m in both["models"]] == [FIRST, SECOND]
    assert both["models"][0] == both["model"]
    for key in ("weights_sha256", "labels", "threshold", "score_kind"):
        assert both["models"][1][key] == second["model"][key]
    assert len(classified(both)) == 2
    for entry, alone_first, alone_second in zip(
        classified(both), classified(first), classified(second), strict=True
    ):
        assert entry["scores"] == alone_first["scores"]  # exact: not even a rounding apart
        assert entry["findings"] == alone_first["findings"]
        assert entry["heatmaps"] == alone_first["heatmaps"]
        assert set(entry["by_model"]) == {SECOND}
        theirs = entry["by_model"][SECOND]
        assert theirs["scores"] == alone_second["scores"]
        assert theirs["findings"] == alone_second["findings"]
        # The second model's heatmaps have their own folder, with the same pictures.
        assert theirs["heatmaps"].keys() == alone_second["heatmaps"].keys()
        for label, relative in theirs["heatmaps"].items():
            assert relative.startswith(f"heatmaps/{SECOND}/")
            mine = (runs / "both" / relative).read_bytes()
            assert mine == (runs / "second" / alone_second["heatmaps"][label]).read_bytes()


def test_per_model_reads_each_models_results_as_a_single_model_file(runs: Path) -> None:
    from cxrsr.results import per_model

    views = list(per_model(load_results(runs / "both" / "results.json")))
    assert [view["model"]["weights"] for view in views] == [FIRST, SECOND]
    for view, alone in zip(views, ("first", "second"), strict=True):
        entries = list(view["images"])
        assert problem({**view, "images": entries}) is None
        expected = read(runs / alone / "results.json")["images"]
        for entry, single in zip(entries, expected, strict=True):
            assert "by_model" not in entry
            for key in ("status", "scores", "findings"):
                assert entry.get(key) == single.get(key)


def test_generate_sr_writes_each_models_srs_as_its_run_alone_does(runs: Path) -> None:
    both = {path.name: path for path in (runs / "both" / "sr").glob("*.dcm")}
    alone = {
        path.name: path
        for folder in ("first", "second")
        for path in (runs / folder / "sr").glob("*.dcm")
    }
    # Per classified image and model one SR and one key image, nothing else, same bytes.
    assert len(both) == 2 * 2 * 2 and sorted(both) == sorted(alone)
    for name, path in both.items():
        assert path.read_bytes() == alone[name].read_bytes(), name
    dciodvfy = require_program("dciodvfy")
    sr = sr_files(runs / "both" / "sr")[0]
    checked = subprocess.run([dciodvfy, str(sr)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_the_report_shows_each_model_apart(runs: Path) -> None:
    page = (runs / "both" / "report.html").read_text(encoding="utf-8")
    assert f'<h2>Model 1 of 2: {FIRST}</h2>' in page and f"<h2>Model 2 of 2: {SECOND}</h2>" in page
    assert page.index(f'data-weights="{FIRST}"') < page.index(f'data-weights="{SECOND}"')
    assert page.count('<article class="card"') == 2 * 2  # a card per image and model
    second_part = page[page.index(f'data-weights="{SECOND}"') :]
    assert "Pneumonia" in second_part and "Cardiomegaly" not in second_part  # RSNA's labels
    assert 'id="counts"' in page and 'id="m2-counts"' in page  # ids stay unique


def test_a_rerun_reuses_only_what_the_same_models_made(
    runs: Path, weights: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "rerun"
    shutil.copytree(runs / "both", folder, ignore=shutil.ignore_patterns("sr", "report.html"))
    results = folder / "results.json"
    before = results.read_bytes()
    stderr = classify(results, weights, corpus_dir, BOTH)
    assert "3 of 3 files unchanged since an earlier run" in stderr
    assert results.read_bytes() == before
    stderr = classify(results, weights, corpus_dir, f"{SECOND},{FIRST}")
    assert "unchanged since an earlier run" not in stderr
    document = read(results)
    assert [m["weights"] for m in document["models"]] == [SECOND, FIRST]


@pytest.mark.parametrize(
    ("script", "arguments", "reason"),
    [
        ("process_dicom.py", ["--weights", f"{FIRST},{FIRST}"], f"{FIRST} named twice"),
        ("process_dicom.py", ["--weights", f"{FIRST},nope"], "unknown weights 'nope'"),
        (
            "process_dicom.py",
            ["--weights", f"{FIRST},resnet50-res512-all"],
            "models of different input sizes",
        ),
        ("process_dicom.py", ["--weights", BOTH, "--engine", "ray"], "only on the local engine"),
        (
            "process_dicom.py",
            ["--weights", BOTH, "--weights-sha256", "0" * 64],
            "--weights-sha256 names one weights file",
        ),
        ("watch_orthanc.py", ["--weights", BOTH, "--once"], "the watcher runs one model"),
    ],
)
def test_what_several_models_cannot_do_is_refused_in_one_line(
    script: str, arguments: list[str], reason: str, corpus_dir: Path, tmp_path: Path
) -> None:
    inputs = [corpus_dir / FILES[2], "-o", tmp_path / "results.json"]
    proc = run_script(script, *arguments, *(inputs if script == "process_dicom.py" else []))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("E: ") and reason in line
    assert not (tmp_path / "results.json").exists()
