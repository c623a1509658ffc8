"""The report of a large run: counts, a score histogram per label, the top images per finding.

A card per image is right for a folder of studies and wrong for an archive: 200,000 cards
would be a page of gigabytes no browser opens, and building it would hold every entry.
Above :data:`SUMMARY_ABOVE` entries the report is this summary instead, built in one pass
over the entries (they may stream from shards) holding only the tallies and, per label,
the :data:`TOP_PER_FINDING` highest-scoring images: its size and the memory it takes do not
grow with the number of entries. Every entry stays one command away
(``python -m cxrsr.results dump``), and the Parquet table beside a sharded run is the
place to analyse them.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from html import escape
from pathlib import Path, PurePath

from PIL import Image

from cxrsr.report import images
from cxrsr.results import ClassifiedEntry

#: Above this many entries the report summarises instead of showing one card per image.
SUMMARY_ABOVE = 500
#: Images shown per finding (the highest scores at or above the threshold).
TOP_PER_FINDING = 5
#: Bins of each label's score histogram, over [0, 1].
HISTOGRAM_BINS = 20
#: Distinct (status, reason) pairs counted one by one; further ones are counted together,
#: so reasons that name their file cannot make the tally grow with the run.
MAX_REASONS = 1000
#: Reasons listed on the page, the most frequent first.
REASONS_SHOWN = 30


@dataclass
class Summary:
    """The tallies of one pass over a run's entries, bounded whatever their number."""

    threshold: float
    top_n: int = TOP_PER_FINDING
    files: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)
    histograms: dict[str, list[int]] = field(default_factory=dict)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)
    top: dict[str, list[tuple[float, int, ClassifiedEntry]]] = field(default_factory=dict)

    def add(self, entry: Mapping[str, object], classified: ClassifiedEntry | None) -> None:
        """Count one entry; ``classified`` is the entry when it is a renderable classification."""
        self.files += 1
        status = str(entry.get("status"))
        self.statuses[status] += 1
        if classified is None:
            key = (status, str(entry.get("reason", "")))
            if key in self.reasons or len(self.reasons) < MAX_REASONS:
                self.reasons[key] += 1
            else:
                self.reasons[(status, "(further reasons, counted together)")] += 1
            return
        for label, score in (classified.get("scores") or {}).items():
            if not math.isfinite(score):
                continue
            bins = self.histograms.setdefault(label, [0] * HISTOGRAM_BINS)
            bins[min(max(int(score * HISTOGRAM_BINS), 0), HISTOGRAM_BINS - 1)] += 1
            if score >= self.threshold:
                self.findings[label] += 1
                kept = self.top.setdefault(label, [])
                # Ties keep the earlier entry: the order of the results decides, not chance.
                item = (score, -self.files, classified)
                if len(kept) < self.top_n:
                    heapq.heappush(kept, item)
                elif item[:2] > kept[0][:2]:
                    heapq.heapreplace(kept, item)

    def ranked(self, label: str) -> list[tuple[float, ClassifiedEntry]]:
        """The top images of ``label``, the highest score first."""
        return [
            (s, e) for s, _, e in sorted(self.top.get(label, []), key=lambda t: t[:2], reverse=True)
        ]


def histograms_html(summary: Summary) -> str:
    """One row of bars per label: how many images scored in each bin of [0, 1]."""
    rows = []
    for label in sorted(summary.histograms):
        bins = summary.histograms[label]
        peak = max(bins) or 1
        bars = "".join(
            f'<i title="{k / HISTOGRAM_BINS:.2f}-{(k + 1) / HISTOGRAM_BINS:.2f}: {n}" '
            f'style="height:{max(1.0, 40 * n / peak):.0f}px"></i>'
            for k, n in enumerate(bins)
        )
        rows.append(
            f'<tr data-histogram="{escape(label)}" data-bins="{" ".join(map(str, bins))}">'
            f'<th>{escape(label)}</th><td><div class="hist">{bars}</div></td>'
            f'<td class="value">{summary.findings[label]}</td></tr>'
        )
    mark = summary.threshold * 100
    return (
        '<section id="histograms"><h2>Score histograms</h2>'
        f"<p>Classified images per score bin of width {1 / HISTOGRAM_BINS:g}, from 0 (left) to 1 "
        f"(right); the last column counts the images at or above the threshold {summary.threshold:g} "
        f"({mark:.0f}% of the way along).</p>"
        '<table class="others histograms"><tr><th>label</th><th>scores</th><th>findings</th></tr>'
        + "".join(rows)
        + "</table></section>"
    )


def reasons_html(summary: Summary, results_name: str) -> str:
    """The skipped and failed entries, counted by status and reason."""
    if not summary.reasons:
        return '<section id="not-classified"><h2>Skipped and failed</h2><p>None.</p></section>'
    common = sorted(summary.reasons.items(), key=lambda item: (-item[1], item[0]))
    rows = "".join(
        f'<tr class="{escape(status)}" data-reason-count="{n}"><td>{escape(status)}</td>'
        f"<td>{n}</td><td>{escape(reason)}</td></tr>"
        for (status, reason), n in common[:REASONS_SHOWN]
    )
    more = len(common) - REASONS_SHOWN
    note = f"<p>{more} less frequent reasons are not shown.</p>" if more > 0 else ""
    listing = escape(
        f"python -m cxrsr.results dump {results_name} | jq -c 'select(.status != \"classified\")'"
    )
    return (
        '<section id="not-classified"><h2>Skipped and failed</h2>'
        '<table class="others"><tr><th>status</th><th>files</th><th>reason</th></tr>'
        f"{rows}</table>{note}<p>Every one of them, with its file: <code>{listing}</code></p>"
        "</section>"
    )


def top_html(summary: Summary, results_dir: Path, problems: list[str]) -> str:
    """Per finding, its highest-scoring images: the label's heatmap over the model's square."""
    parts = []
    for label in sorted(summary.findings, key=lambda name: (-summary.findings[name], name)):
        figures = "".join(
            _top_figure(label, score, entry, results_dir, summary.threshold, problems)
            for score, entry in summary.ranked(label)
        )
        parts.append(
            f'<div data-top="{escape(label)}"><h3>{escape(label)}: the {len(summary.top[label])} '
            f"highest of {summary.findings[label]} findings</h3>"
            f'<div class="thumbs">{figures}</div></div>'
        )
    body = "".join(parts) or f"<p>No image has a score at or above {summary.threshold:g}.</p>"
    return f'<section id="top"><h2>Highest scores per finding</h2>{body}</section>'


def _top_figure(
    label: str,
    score: float,
    entry: ClassifiedEntry,
    results_dir: Path,
    threshold: float,
    problems: list[str],
) -> str:
    from cxrsr.report.page import _crop, _load, _shown, _thumbnail

    path = str(entry.get("path", ""))
    name = PurePath(path.split("!")[-1]).name or path
    caption = f"<figcaption>{escape(name)} <b>{_shown(score, threshold)}</b></figcaption>"
    heatmaps = entry.get("heatmaps") or {}
    try:
        preview = _load(results_dir, entry.get("preview"))
        heat = _load(results_dir, heatmaps.get(label))
        crop = _crop(entry.get("preview_crop"), preview)
        if heat is not None:
            picture = _thumbnail(preview, crop, heat)
        elif preview is not None:
            picture = images.fit(Image.fromarray(preview).convert("RGB"), images.THUMBNAIL_SIZE)
        else:
            picture = None
    except images.ImageLoadError as exc:
        problems.append(f"{path}: picture not shown: {exc}")
        picture = None
    img = (
        f'<img alt="{escape(label)} in {escape(name)}" src="{images.data_uri(picture)}">'
        if picture is not None
        else '<div class="nopicture small">no picture</div>'
    )
    uid = escape(str(entry.get("sop_instance_uid", "")))
    return (
        f'<figure data-sop-instance-uid="{uid}" data-score="{score!r}" title="{escape(path)}">'
        f"{img}{caption}</figure>"
    )
