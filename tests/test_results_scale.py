"""Results that scale: the report of a large sharded run summarises, bounded in size.

The results are a synthetic sharded set (tests/scale_fixtures.py) checked against the
published schema, as process_dicom.py's are; the page is read back with an HTML parser.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_valid_results
from scale_fixtures import LABELS, THRESHOLD, make_sharded_results

from cxrsr.report import render_report, write_report
from cxrsr.report.summary import HISTOGRAM_BINS, SUMMARY_ABOVE, TOP_PER_FINDING
from cxrsr.results import load_results

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
