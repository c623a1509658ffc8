"""Several models in one run (``process_dicom.py --weights a,b``): each model's results kept apart.

One run with three models over two corpus files is compared with a run of each model
alone: the same scores (exactly), the same heatmaps and previews, and from generate_sr.py
the same SRs and key images byte for byte. The second model is the 512-pixel ResNet, so
the file is prepared at two input sizes (each with its own reduced-resolution decode and
preview), and the third a DenseNet of the first one's size. The weights are random, saved under the real file names and
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
from test_models_all import RESNET, save_densenet, save_resnet

from cxrsr.results import load_results, problem

FIRST, SECOND = "densenet121-res224-all", "densenet121-res224-rsna"
BOTH = f"{FIRST},{SECOND}"
#: Each model of the three-model run, by the folder of its run alone.
ALONE = {"first": FIRST, "resnet": RESNET, "second": SECOND}
ALL = ",".join(ALONE.values())
#: A chest radiograph the strict domain gates pass (large enough that its reduced decode,
#: and so its preview, differs between the two input sizes), and a CT they skip.
FILES = ("cxr05_dx_canon_966_fixed_j2kr.dcm", "bad_ct_small.dcm")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multi-weights")
    save_densenet(folder, FIRST, seed=0)
    save_densenet(folder, SECOND, seed=1)
    save_resnet(folder)
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
    """``all/``: the three-model run, and (:data:`ALONE`) each model's run alone, each
    with its SRs in ``sr/``.

    A result's ``classified_at`` is when it was first produced, and it is the SR's Content
    Date/Time: the single runs get the two-model run's times, as if made at that moment,
    before their SRs are written.
    """
    root = tmp_path_factory.mktemp("multi-runs")
    classify(root / "all" / "results.json", weights, corpus_dir, ALL)
    times = {
        entry["path"]: entry.get("classified_at")
        for entry in read(root / "all" / "results.json")["images"]
    }
    for folder, name in ALONE.items():
        results = root / folder / "results.json"
        classify(results, weights, corpus_dir, name)
        document = read(results)
        for entry in document["images"]:
            if entry["status"] == "classified":
                entry["classified_at"] = times[entry["path"]]
        results.write_text(json.dumps(document), encoding="utf-8")
    for folder in ("all", *ALONE):
        generate(root / folder / "results.json")
    return root


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def classified(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in document["images"] if entry["status"] == "classified"]


def test_each_models_scores_are_exactly_those_of_its_run_alone(runs: Path) -> None:
    together = read(runs / "all" / "results.json")
    alone = {folder: read(runs / folder / "results.json") for folder in ALONE}
    assert problem(together) is None
    # One entry per image, in input order, the skipped CT once.
    assert [e["path"] for e in together["images"]] == [e["path"] for e in alone["first"]["images"]]
    assert [e["status"] for e in together["images"]] == ["classified", "skipped"]
    assert [m["weights"] for m in together["models"]] == list(ALONE.values())
    assert together["models"][0] == together["model"]
    for block, folder in zip(together["models"], ALONE, strict=True):
        for key in ("weights_sha256", "labels", "threshold", "input_size", "preprocessing"):
            assert block[key] == alone[folder]["model"][key]
    (entry,) = classified(together)
    (first,) = classified(alone["first"])
    for key in ("scores", "findings", "heatmaps", "preview", "preview_crop"):
        assert entry[key] == first[key]  # exact: not even a rounding apart
    assert list(entry["by_model"]) == [RESNET, SECOND]
    for folder in ("resnet", "second"):
        (single,) = classified(alone[folder])
        theirs = entry["by_model"][ALONE[folder]]
        assert theirs["scores"] == single["scores"]
        assert theirs["findings"] == single["findings"]
        # Each further model's heatmaps have their own folder, with the same pictures.
        assert theirs["heatmaps"].keys() == single["heatmaps"].keys()
        for label, relative in theirs["heatmaps"].items():
            assert relative.startswith(f"heatmaps/{ALONE[folder]}/")
            mine = (runs / "all" / relative).read_bytes()
            assert mine == (runs / folder / single["heatmaps"][label]).read_bytes()
    # The ResNet's input was decoded at its own size: its own preview, as its run alone drew.
    resnet, (single,) = entry["by_model"][RESNET], classified(alone["resnet"])
    assert resnet["preview"].startswith("previews/512/")
    assert resnet["preview_crop"] == single["preview_crop"]
    mine = (runs / "all" / resnet["preview"]).read_bytes()
    assert mine == (runs / "resnet" / single["preview"]).read_bytes()
    assert mine != (runs / "all" / entry["preview"]).read_bytes()
    assert "preview" not in entry["by_model"][SECOND]  # the first model's size: its preview


def test_per_model_reads_each_models_results_as_a_single_model_file(runs: Path) -> None:
    from cxrsr.results import per_model

    views = list(per_model(load_results(runs / "all" / "results.json")))
    assert [view["model"]["weights"] for view in views] == list(ALONE.values())
    for view, alone in zip(views, ALONE, strict=True):
        entries = list(view["images"])
        assert problem({**view, "images": entries}) is None
        expected = read(runs / alone / "results.json")["images"]
        for entry, single in zip(entries, expected, strict=True):
            assert "by_model" not in entry
            for key in ("status", "scores", "findings", "preview_crop"):
                assert entry.get(key) == single.get(key)


def test_generate_sr_writes_each_models_srs_as_its_run_alone_does(runs: Path) -> None:
    together = {path.name: path for path in (runs / "all" / "sr").glob("*.dcm")}
    alone = {path.name: path for folder in ALONE for path in (runs / folder / "sr").glob("*.dcm")}
    # Per classified image and model one SR and one key image, nothing else, same bytes.
    assert len(together) == 3 * 2 and sorted(together) == sorted(alone)
    for name, path in together.items():
        assert path.read_bytes() == alone[name].read_bytes(), name
    dciodvfy = require_program("dciodvfy")
    srs = sr_files(runs / "all" / "sr")
    assert len(srs) == 3
    checked = subprocess.run([dciodvfy, str(srs[0])], capture_output=True, text=True, timeout=60)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_the_report_shows_each_model_apart(runs: Path) -> None:
    page = (runs / "all" / "report.html").read_text(encoding="utf-8")
    for number, weights in enumerate(ALONE.values(), start=1):
        assert f"<h2>Model {number} of 3: {weights}</h2>" in page
    assert page.index(f'data-weights="{RESNET}"') < page.index(f'data-weights="{SECOND}"')
    assert page.count('<article class="card"') == 3  # a card per image and model
    third_part = page[page.index(f'data-weights="{SECOND}"') :]
    assert "Pneumonia" in third_part and "Cardiomegaly" not in third_part  # RSNA's labels
    assert 'id="counts"' in page and 'id="m3-counts"' in page  # ids stay unique


def test_the_summary_of_a_large_run_is_one_per_model(runs: Path) -> None:
    from cxrsr.report import render_report

    results = runs / "all" / "results.json"
    report = render_report(load_results(results), results.parent, summary_above=1)
    assert report.problems == []
    page = report.html
    assert page.count('class="banner incomplete"') == 3  # each model's summary note
    assert 'id="summary"' in page and 'id="m2-summary"' in page and 'id="m3-summary"' in page
    assert page.count('<section id="counts">') == 1 and 'id="m3-counts"' in page


def test_a_rerun_reuses_only_what_the_same_models_made(
    runs: Path, weights: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "rerun"
    shutil.copytree(runs / "all", folder, ignore=shutil.ignore_patterns("sr", "report.html"))
    results = folder / "results.json"
    before = results.read_bytes()
    stderr = classify(results, weights, corpus_dir, ALL)
    assert "2 of 2 files unchanged since an earlier run" in stderr
    assert results.read_bytes() == before
    stderr = classify(results, weights, corpus_dir, SECOND)
    assert "unchanged since an earlier run" not in stderr
    document = read(results)
    assert "models" not in document and "by_model" not in document["images"][0]
    assert "models" not in document["model"]["options"]


@pytest.mark.parametrize(
    ("script", "arguments", "reason"),
    [
        ("process_dicom.py", ["--weights", f"{FIRST},{FIRST}"], f"{FIRST} named twice"),
        ("process_dicom.py", ["--weights", f"{FIRST},nope"], "unknown weights 'nope'"),
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
    inputs = [corpus_dir / FILES[1], "-o", tmp_path / "results.json"]
    proc = run_script(script, *arguments, *(inputs if script == "process_dicom.py" else []))
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("E: ") and reason in line
    assert not (tmp_path / "results.json").exists()


def test_a_killed_runs_journal_is_reused_for_the_same_models(
    runs: Path, weights: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """A killed run leaves only its journal, whose model line names the first model's
    weights file: the others' are found by name, and the journal's entries still stand."""
    folder = tmp_path / "killed"
    shutil.copytree(
        runs / "all", folder, ignore=shutil.ignore_patterns("sr", "report.html", "results.json")
    )
    document = read(runs / "all" / "results.json")
    lines = [{"format": "cxrsr-journal/1", "model": document["model"]}]
    lines += [{"entry": entry} for entry in document["images"]]
    results = folder / "results.json"
    journal = folder / "results.json.journal"
    journal.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    stderr = classify(results, weights, corpus_dir, ALL)
    assert "2 of 2 files unchanged since an earlier run" in stderr
    assert read(results) == document
    assert not journal.exists()
