"""Results that scale: the report of a large sharded run summarises, bounded in size.

The results are a synthetic sharded set (tests/scale_fixtures.py) checked against the
published schema, as process_dicom.py's are; the page is read back with an HTML parser.
"""

from __future__ import annotations

import logging
import re
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_valid_results
from scale_fixtures import LABELS, THRESHOLD, make_sharded_results

from cxrsr import shards
from cxrsr.report import render_report, write_report
from cxrsr.report.summary import HISTOGRAM_BINS, SUMMARY_ABOVE, TOP_PER_FINDING
from cxrsr.results import load_results
from cxrsr.sr import batch as sr_batch
from cxrsr.sr.entries import ModelInfo

#: A summary page's ceiling: counts, histograms and len(LABELS) x TOP_PER_FINDING thumbnails.
PAGE_LIMIT = 1_500_000


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    results, entries = make_sharded_results(tmp_path_factory.mktemp("large"), 3000)
    assert entries is not None
    assert_valid_results(results)
    return results, entries


def _counts(html: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r'data-count="(\w+)">(\d+)<', html)}


def test_a_large_run_gets_a_summary_not_a_card_per_image(
    large: tuple[Path, list[dict[str, Any]]],
) -> None:
    results, entries = large
    target, report = write_report(load_results(results), results)
    html = target.read_text(encoding="utf-8")
    assert report.problems == []
    assert 'id="summary"' in html and "<article" not in html
    assert len(html) < PAGE_LIMIT
    status = Counter(e["status"] for e in entries)
    assert _counts(html) == {
        "images": 3000,
        "classified": status["classified"],
        "skipped": status["skipped"],
        "failed": status["failed"],
    }
    classified = [e for e in entries if e["status"] == "classified"]
    for label in LABELS:
        scores = sorted((e["scores"][label] for e in classified), reverse=True)
        findings = sum(s >= THRESHOLD for s in scores)
        assert f'<tr data-label="{label}"><th>{label}</th><td>{findings}</td></tr>' in html
        bins = re.search(rf'data-histogram="{label}" data-bins="([\d ]+)"', html)
        assert bins is not None
        counts = [int(n) for n in bins.group(1).split()]
        assert len(counts) == HISTOGRAM_BINS and sum(counts) == len(classified)
        assert counts[-1] == sum(s >= 1 - 1 / HISTOGRAM_BINS for s in scores)
        block = html.split(f'<div data-top="{label}">', 1)[1].split('<div data-top="', 1)[0]
        shown = [
            float(s)
            for s in re.findall(
                r'<figure data-sop-instance-uid="[\d.]+" data-score="([\d.e-]+)"', block
            )
        ]
        assert shown == scores[:TOP_PER_FINDING]
        assert block.count('src="data:image/jpeg;base64,') == TOP_PER_FINDING
    reasons = re.findall(r'<tr class="(\w+)" data-reason-count="(\d+)">', html)
    assert len(reasons) == 4  # one failure reason, three skip reasons
    for name in ("skipped", "failed"):
        assert sum(int(n) for s, n in reasons if s == name) == status[name]


def test_the_summary_does_not_grow_with_the_run(
    large: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    results, _ = large
    bigger, _ = make_sharded_results(tmp_path / "bigger", 9000)
    small = render_report(load_results(results), results.parent).html
    large_page = render_report(load_results(bigger), bigger.parent).html
    assert _counts(large_page)["images"] == 9000
    # The same sections, the same number of pictures; only numbers differ.
    assert abs(len(large_page) - len(small)) < 0.05 * len(small)


def test_up_to_the_threshold_every_image_keeps_its_card(tmp_path: Path) -> None:
    results, entries = make_sharded_results(tmp_path, 40, pictures=False)
    html = render_report(load_results(results), results.parent, summary_above=40).html
    assert entries is not None and 'id="summary"' not in html
    assert html.count("<article") == sum(e["status"] == "classified" for e in entries)
    summary = render_report(load_results(results), results.parent, summary_above=39).html
    assert 'id="summary"' in summary and "<article" not in summary
    assert SUMMARY_ABOVE == 500


def test_planning_the_srs_holds_no_entries(tmp_path: Path) -> None:
    """generate_sr.py's first pass over 20,000 streamed entries holds a tenth of them at most."""
    results, _ = make_sharded_results(tmp_path, 20_000)
    document = load_results(results)
    model = ModelInfo.from_results(document["model"])
    tracemalloc.start()
    try:
        planned = sr_batch.plan(document, model, results.parent, sr_batch.BatchTally())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert planned.work == planned.key_images == 18_000 and planned.repeated == set()
    # Holding the entries takes about 3.5 kB each (bench/bench_results_scale.py, "list");
    # what is left is 16 bytes each and the garbage not yet collected (it varies by run).
    assert peak < 300 * 20_000, peak


def test_srs_from_a_sharded_run_flag_shared_uids_and_duplicates(
    corpus_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cxr07 and cxr08 are one image (one SOP Instance UID): listed with other scores it is
    a warning, listed again with the same scores a duplicate, read from shards."""
    import torchxrayvision as xrv
    from test_sr import WHEN, classified_entry, model_block

    labels = list(xrv.models.model_urls["densenet121-res224-all"]["labels"])
    rng = np.random.default_rng(6)
    first = classified_entry(
        str(corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm"), labels, rng
    )
    other = classified_entry(
        str(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"), labels, rng
    )
    again = dict(other, scores=first["scores"], findings=first["findings"])
    results = tmp_path / "results.json"
    model = model_block(labels)
    for number, batch in enumerate([[first], [other, again]]):
        shards.write_shard(shards.shard_folder(results), number, f"{number:064x}", model, batch)
    shards.write_manifest(results, model, [0, 1], {"classified": 3}, None, complete=True)
    with caplog.at_level(logging.WARNING, logger="cxrsr"):
        outcome = sr_batch.generate_srs(load_results(results), tmp_path / "sr", WHEN)
    assert len(outcome.written) == 2 and outcome.duplicates == 1 and not outcome.errors
    shared = [r.getMessage() for r in caplog.records if "different scores share" in r.getMessage()]
    assert len(shared) == 1 and shared[0].startswith("2 entries"), shared
