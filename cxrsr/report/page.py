"""The HTML report: one self-contained page from a results file.

Everything the page shows comes from the results file and the pictures it names, and
every value from a DICOM header or the results file is escaped (``html.escape``): a
Patient ID or a failure reason is data, never markup. The page loads nothing from
anywhere (its Content-Security-Policy forbids it), so it opens the same from a USB stick
as beside the results. It carries no clock time: the same results give the same bytes.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from html import escape
from pathlib import Path, PurePath
from typing import TypeGuard

import numpy as np
from PIL import Image

from cxrsr.report import images, summary
from cxrsr.report.links import explorer_study_url
from cxrsr.results import (
    ClassifiedEntry,
    ModelRecord,
    ReadableResults,
    per_model,
    rounded_score,
)

NOT_FOR_DIAGNOSIS = "AI RESULT - NOT FOR DIAGNOSTIC USE"
ATTENTION_NOTE = "colour shows model attention, not a localisation"

#: No fetches, no scripts, no frames: pictures only from data: URIs, styles only inline.
#: Below this many cards per worker process, one process is faster than starting a pool.
MIN_CARDS_PER_WORKER = 16

CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header,main,footer{max-width:1180px;margin:0 auto;padding:0 20px}
header{padding-top:18px}
h1{font-size:22px;margin:0 0 4px}
.banner{background:#8b1a1a;color:#fff;font-weight:700;padding:6px 12px;border-radius:4px;
 display:inline-block;letter-spacing:.03em}
.incomplete{background:#a65e00}
section{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:12px 16px;margin:16px 0}
h2{font-size:17px;margin:0 0 8px}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
dl.facts dt{color:#5a6375}
dl.facts dd{margin:0;overflow-wrap:anywhere}
.counts span{display:inline-block;margin-right:18px}
.counts b{font-size:20px}
article.card{display:grid;grid-template-columns:minmax(0,auto) minmax(300px,1fr);gap:16px}
article.card figure{margin:0}
article.card img.main{max-width:100%;height:auto;max-height:720px;display:block;background:#000}
figcaption{font-size:13px;color:#5a6375;margin-top:4px}
.legend{display:flex;align-items:center;gap:6px;font-size:12px;color:#5a6375}
.legend i{display:inline-block;width:140px;height:10px;border-radius:2px}
.thumbs{display:flex;flex-wrap:wrap;gap:8px;margin-top:8px}
.thumbs figure{width:150px}
.thumbs img{width:150px;height:150px;display:block}
.nopicture{width:320px;height:200px;background:#e9ecf1;color:#5a6375;display:flex;
 align-items:center;justify-content:center;text-align:center;padding:10px;box-sizing:border-box}
table{border-collapse:collapse;width:100%}
table.scores td,table.scores th{padding:1px 6px;font-size:13px;text-align:left}
table.scores th{font-weight:400;white-space:nowrap}
tr.present th,tr.present td.value{font-weight:700}
td.bar{width:55%}
.track{position:relative;height:12px;background:#e9ecf1;border-radius:2px}
.fill{position:absolute;left:0;top:0;bottom:0;background:#7d8aa3;border-radius:2px}
tr.present .fill{background:#c0392b}
.threshold{position:absolute;top:-3px;bottom:-3px;width:2px;background:#1d2330}
td.value{font-variant-numeric:tabular-nums;text-align:right}
ul.warnings{margin:8px 0 0;padding-left:18px;color:#8a5300;font-size:13px}
.meta{font-size:13px;color:#5a6375;overflow-wrap:anywhere}
table.others td,table.others th{border-top:1px solid #e1e4ea;padding:4px 6px;text-align:left;
 vertical-align:top;font-size:13px;overflow-wrap:anywhere}
table.tally{width:auto;min-width:320px}
.hist{display:flex;align-items:flex-end;gap:1px;height:40px}
.hist i{display:inline-block;width:12px;background:#7d8aa3}
.nopicture.small{width:150px;height:150px}
#top figure{margin:0}
h3{font-size:15px;margin:10px 0 4px}
a{color:#1f5fbf}
footer{color:#5a6375;font-size:12px;padding-bottom:24px}
"""


@dataclass
class Report:
    """The page and what could not be shown on it (one line each, for the script's ``W:``)."""

    html: str
    problems: list[str] = field(default_factory=list)


def _renderable(entry: Mapping[str, object]) -> TypeGuard[ClassifiedEntry]:
    """A classified entry whose scores and findings a card can show.

    Only what a card cannot do without is checked: a card reads every other key with
    ``get``, so an entry a hand edit left without one still gets its card.
    """
    scores = entry.get("scores")
    return (
        entry.get("status") == "classified"
        and isinstance(scores, dict)
        and all(isinstance(k, str) and isinstance(v, int | float) for k, v in scores.items())
        and isinstance(entry.get("findings", []), list)
    )


def render_report(
    document: ReadableResults,
    results_dir: Path,
    orthanc_url: str | None = None,
    title: str = "results.json",
    jobs: int = 1,
    summary_above: int = summary.SUMMARY_ABOVE,
) -> Report:
    """The report for a loaded results file (see :func:`cxrsr.results.load_results`).

    ``results_dir`` is where the relative picture paths start; ``orthanc_url`` (credentials
    are dropped) adds a link per study into Orthanc Explorer. With ``jobs`` > 1 the cards
    (decoding and blending their pictures is most of the work) are made in worker
    processes; the page is the same byte for byte. Above ``summary_above`` entries the
    page summarises instead (:mod:`cxrsr.report.summary`): the entries are read once, as
    they stream, and at most ``summary_above`` of them are held at a time.

    A multi-model run's results (:func:`cxrsr.results.per_model`) give one part per
    model, in ``--weights`` order, each headed by its weights name and showing only that
    model's scores: never a mix or an average of them.
    """
    views = list(per_model(document))
    if len(views) == 1:
        body, note, problems = _body(document, results_dir, orthanc_url, title, jobs, summary_above)
        return Report(_page(document, title, body, note), problems)
    body, notes, problems = [], [], []
    for index, view in enumerate(views):
        part, note, found = _body(view, results_dir, orthanc_url, title, jobs, summary_above)
        weights = escape(str(view["model"].get("weights")))
        heading = (
            f'<section class="model-part" data-weights="{weights}"><h2>Model {index + 1} of '
            f"{len(views)}: {weights}</h2><p>The scores below are this model's only; each "
            "model of the run has its own part of this page.</p></section>"
        )
        # The first model's part keeps the single-model page's element ids; the others' are
        # prefixed, so every id stays unique on the page.
        prefix = "" if index == 0 else f"m{index + 1}-"
        body += [heading, *(html.replace(' id="', f' id="{prefix}') for html in part)]
        notes += [note.replace(' id="', f' id="{prefix}')] if note else []
        problems += found
    return Report(_page(document, title, body, "\n".join(notes)), problems)


def _body(
    document: ReadableResults,
    results_dir: Path,
    orthanc_url: str | None,
    title: str,
    jobs: int,
    summary_above: int,
) -> tuple[list[str], str, list[str]]:
    """The sections of one model's results (a single-model document), the note above
    them, and the problems met."""
    model = document["model"]
    threshold = float(model.get("threshold", 0.5))
    tally = summary.Summary(threshold)
    # A results file anyone can edit (or a fuzzer mangle): entries generate_sr.py refused
    # are listed with the others, never allowed to stop the page.
    entries: list[Mapping[str, object]] = []
    for item in document["images"]:
        if not isinstance(item, dict):
            continue
        tally.add(item, item if _renderable(item) else None)
        if tally.files <= summary_above:
            entries.append(item)
        elif entries:
            entries = []
    if tally.files > summary_above:
        problems: list[str] = []
        body = [
            _counts_html(tally.files, tally.statuses, tally.findings, threshold),
            _provenance(model),
            summary.histograms_html(tally),
            summary.top_html(tally, results_dir, problems),
            summary.reasons_html(tally, title),
        ]
        note = (
            f'<p><span class="banner incomplete" id="summary">{tally.files} files: a summary '
            f"(counts, score histograms, the {tally.top_n} highest scores per finding), not a "
            f"card per image (above {summary_above} files)</span></p>"
        )
        return body, note, problems
    classified = [e for e in entries if _renderable(e)]
    others = [e for e in entries if not _renderable(e)]
    cards, problems = _cards(classified, results_dir, threshold, orthanc_url, jobs)
    body = [
        _counts(entries, classified, threshold),
        _provenance(model),
        *cards,
        _not_classified(others),
    ]
    return body, "", problems


def _page(document: ReadableResults, title: str, body: Sequence[str], note: str) -> str:
    """The whole page around ``body`` (its sections, in order)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>cxrsr report: {escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<header>",
        f"<h1>Chest X-ray AI results: {escape(title)}</h1>",
        f'<p><span class="banner">{NOT_FOR_DIAGNOSIS} - {ATTENTION_NOTE}</span></p>',
    ]
    if document.get("complete") is False:
        parts.append(
            '<p><span class="banner incomplete">process_dicom.py was interrupted: '
            "these are the files it finished</span></p>"
        )
    if note:
        parts.append(note)
    parts += [
        "</header><main>",
        *body,
        "</main>",
        "<footer>Written by cxrsr's generate_sr.py from the results file of process_dicom.py. "
        "Scores come from the model named above; they are research output, not a diagnosis."
        "</footer></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _counts(
    entries: Sequence[Mapping[str, object]], classified: Sequence[ClassifiedEntry], threshold: float
) -> str:
    status = Counter(str(e.get("status")) for e in entries)
    per_label = Counter(label for e in classified for label in _present(e, threshold))
    return _counts_html(len(entries), status, per_label, threshold)


def _counts_html(
    files: int, status: Mapping[str, int], per_label: Mapping[str, int], threshold: float
) -> str:
    rows = "".join(
        f'<tr data-label="{escape(label)}"><th>{escape(label)}</th><td>{n}</td></tr>'
        for label, n in sorted(per_label.items(), key=lambda item: (-item[1], item[0]))
    )
    tally = (
        f'<table class="others tally"><tr><th>finding (score &ge; {threshold:g})</th>'
        f"<th>images</th></tr>{rows}</table>"
        if rows
        else f"<p>No image has a score at or above {threshold:g}.</p>"
    )
    return (
        '<section id="counts"><h2>Counts</h2><p class="counts">'
        f'<span><b data-count="images">{files}</b> files</span>'
        f'<span><b data-count="classified">{status.get("classified", 0)}</b> classified</span>'
        f'<span><b data-count="skipped">{status.get("skipped", 0)}</b> skipped</span>'
        f'<span><b data-count="failed">{status.get("failed", 0)}</b> failed</span></p>'
        f"{tally}</section>"
    )


def _provenance(model: ModelRecord) -> str:
    facts = [
        ("weights", model.get("weights")),
        ("weights file", model.get("weights_file")),
        ("weights SHA-256", model.get("weights_sha256")),
        ("torchxrayvision", model.get("torchxrayvision")),
        ("architecture", model.get("architecture")),
        ("threshold", model.get("threshold", 0.5)),
        ("score", model.get("score_kind")),
        ("labels", ", ".join(map(str, model.get("labels") or []))),
        ("left out (untrained)", ", ".join(map(str, model.get("excluded_labels") or []))),
        ("input", model.get("preprocessing")),
    ]
    items = "".join(
        f'<dt>{escape(name)}</dt><dd data-fact="{escape(name)}">{escape(str(value))}</dd>'
        for name, value in facts
        if value not in (None, "")
    )
    return f'<section id="model"><h2>Model</h2><dl class="facts">{items}</dl></section>'


def _present(entry: ClassifiedEntry, threshold: float) -> list[str]:
    return [label for label, score in (entry.get("scores") or {}).items() if score >= threshold]


def _cards(
    entries: Sequence[ClassifiedEntry],
    results_dir: Path,
    threshold: float,
    orthanc_url: str | None,
    jobs: int,
) -> tuple[list[str], list[str]]:
    """Each entry's card, in order, and the problems met on the way."""
    render = functools.partial(
        _card_alone, results_dir=results_dir, threshold=threshold, orthanc_url=orthanc_url
    )
    workers = min(jobs, len(entries) // MIN_CARDS_PER_WORKER)
    if workers > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            made = list(pool.map(render, entries, chunksize=8))
    else:
        made = [render(entry) for entry in entries]
    return [html for html, _ in made], [problem for _, found in made for problem in found]


def _card_alone(
    entry: ClassifiedEntry, results_dir: Path, threshold: float, orthanc_url: str | None
) -> tuple[str, list[str]]:
    problems: list[str] = []
    return _card(entry, results_dir, threshold, orthanc_url, problems), problems


def _card(
    entry: ClassifiedEntry,
    results_dir: Path,
    threshold: float,
    orthanc_url: str | None,
    problems: list[str],
) -> str:
    scores: dict[str, float] = entry.get("scores") or {}
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    path = str(entry.get("path", ""))
    name = PurePath(path.split("!")[-1]).name or path
    figure = _figures(entry, results_dir, ranked, problems)
    rows = "".join(_score_row(label, score, threshold) for label, score in ranked)
    warnings = "".join(f"<li>{escape(str(w))}</li>" for w in entry.get("warnings") or [])
    facts = [
        ("file", path),
        ("Patient ID", entry.get("patient_id") or "(none)"),
        ("Study Instance UID", entry.get("study_instance_uid")),
        ("SOP Instance UID", entry.get("sop_instance_uid")),
        ("Modality", entry.get("modality")),
        ("classified", entry.get("classified_at")),
    ]
    meta = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in facts if v not in (None, "")
    )
    link = ""
    if orthanc_url and entry.get("study_instance_uid"):
        try:
            href = explorer_study_url(
                orthanc_url, str(entry.get("patient_id") or ""), str(entry["study_instance_uid"])
            )
            link = f'<p><a class="orthanc" href="{escape(href)}">Open the study in Orthanc Explorer</a></p>'
        except ValueError as exc:
            problems.append(f"no Orthanc link: {exc}")
    findings = ", ".join(escape(label) for label, score in ranked if score >= threshold)
    return (
        f'<section><article class="card" data-sop-instance-uid="{escape(str(entry.get("sop_instance_uid", "")))}">'
        f"<div>{figure}</div><div>"
        f"<h2>{escape(name)}</h2>"
        f'<p class="findings">Findings (score &ge; {threshold:g}): <b>{findings or "none"}</b></p>'
        f'<table class="scores"><tbody>{rows}</tbody></table>'
        + (f'<ul class="warnings">{warnings}</ul>' if warnings else "")
        + f'{link}<dl class="facts meta">{meta}</dl></div></article></section>'
    )


def _shown(score: float, threshold: float) -> str:
    """A score as the card shows it: three decimals, never rounded across the threshold."""
    return f"{rounded_score(score, threshold, 3):.3f}"


def _score_row(label: str, score: float, threshold: float) -> str:
    width = min(max(score, 0.0), 1.0) * 100 if math.isfinite(score) else 0.0
    mark = min(max(threshold, 0.0), 1.0) * 100
    css = "present" if score >= threshold else "absent"
    return (
        f'<tr class="{css}" data-label="{escape(label)}" data-score="{score!r}">'
        f"<th>{escape(label)}</th>"
        f'<td class="bar"><div class="track"><div class="fill" style="width:{width:.1f}%"></div>'
        f'<div class="threshold" style="left:{mark:.1f}%" title="threshold {threshold:g}"></div>'
        f'</div></td><td class="value">{_shown(score, threshold)}</td></tr>'
    )


def _figures(
    entry: ClassifiedEntry,
    results_dir: Path,
    ranked: Sequence[tuple[str, float]],
    problems: list[str],
) -> str:
    """The large picture (the top label's heatmap over the preview) and one small picture
    per further heatmap label."""
    where = str(entry.get("path", ""))
    heatmap_paths: dict[str, str] = entry.get("heatmaps") or {}
    order = [label for label, _ in ranked if label in heatmap_paths]
    order += sorted(set(heatmap_paths) - set(order))
    try:
        preview = _load(results_dir, entry.get("preview"))
        crop = _crop(entry.get("preview_crop"), preview)
        heat = {label: _require(_load(results_dir, heatmap_paths[label]), label) for label in order}
    except images.ImageLoadError as exc:
        problems.append(f"{where}: picture not shown: {exc}")
        return f'<div class="nopicture">Picture not shown: {escape(str(exc))}</div>'
    if preview is None and not heat:
        return (
            '<div class="nopicture">No picture: this results file names no preview or '
            "heatmap (written by an older process_dicom.py)</div>"
        )
    top = order[0] if order else None
    main = _compose(preview, crop, heat[top] if top else None)
    caption = (
        f"Heatmap for <b>{escape(top)}</b> over the model's square: {ATTENTION_NOTE}."
        if top
        else "No heatmap in the results file."
    )
    if preview is None:
        caption += " No preview in the results file: the model's square alone."
    legend = (
        f'<div class="legend">weak<i style="background:{images.CSS_GRADIENT}"></i>strong</div>'
        if top
        else ""
    )
    thumbs = "".join(
        f'<figure data-heatmap="{escape(label)}"><img alt="heatmap for {escape(label)}" '
        f'src="{images.data_uri(_thumbnail(preview, crop, heat[label]))}">'
        f"<figcaption>{escape(label)}</figcaption></figure>"
        for label in order[1:]
    )
    # Shown with its long side DISPLAY_SIZE: previews are stored at the detail that was
    # decoded (often 440-612 pixels), and the browser enlarges them, not the data URI.
    scale = images.DISPLAY_SIZE / max(main.size)
    width, height = round(main.width * scale), round(main.height * scale)
    return (
        f'<figure data-heatmap="{escape(top or "")}"><img class="main" alt="radiograph'
        f'{" with heatmap for " + escape(top) if top else ""}" width="{width}" '
        f'height="{height}" src="{images.data_uri(main)}">'
        f"<figcaption>{caption}</figcaption>{legend}</figure>"
        + (f'<div class="thumbs">{thumbs}</div>' if thumbs else "")
    )


def _load(results_dir: Path, relative: object) -> np.ndarray | None:
    if relative in (None, ""):
        return None
    if not isinstance(relative, str):
        raise images.ImageLoadError(f"picture path {relative!r} is not a string")
    return images.load_grayscale(results_dir / relative)


def _require(picture: np.ndarray | None, label: str) -> np.ndarray:
    if picture is None:
        raise images.ImageLoadError(f"the heatmap for {label} names no file")
    return picture


def _crop(value: object, preview: np.ndarray | None) -> tuple[int, int, int, int] | None:
    if preview is None:
        return None
    if value is None:
        # Older or partial results: assume the center crop torchxrayvision makes.
        rows, cols = preview.shape
        side = min(rows, cols)
        return ((cols - side) // 2, (rows - side) // 2, side, side)
    if not (isinstance(value, list | tuple) and len(value) == 4 and _all_numbers(value)):
        raise images.ImageLoadError(f"preview_crop {value!r} is not [x, y, width, height]")
    x, y, width, height = (round(v) for v in value)
    return (x, y, width, height)


def _all_numbers(values: Iterable[object]) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def _compose(
    preview: np.ndarray | None,
    crop: tuple[int, int, int, int] | None,
    heat: np.ndarray | None,
) -> Image.Image:
    if preview is None:
        assert heat is not None
        return images.heatmap_only(heat)
    if heat is None or crop is None:
        return images.fit(Image.fromarray(preview).convert("RGB"), images.DISPLAY_SIZE)
    return images.overlay(preview, heat, crop, longest=images.DISPLAY_SIZE)


def _thumbnail(
    preview: np.ndarray | None, crop: tuple[int, int, int, int] | None, heat: np.ndarray
) -> Image.Image:
    """The model's square only, with this label's heatmap, at thumbnail size."""
    if preview is None or crop is None:
        return images.fit(images.heatmap_only(heat), images.THUMBNAIL_SIZE)
    x, y, width, height = crop
    rows, cols = preview.shape
    top, left = min(max(y, 0), rows - 1), min(max(x, 0), cols - 1)
    square = preview[top : max(y + height, top + 1), left : max(x + width, left + 1)]
    return images.overlay(
        square, heat, (x - left, y - top, width, height), longest=images.THUMBNAIL_SIZE
    )


def _not_classified(entries: Sequence[Mapping[str, object]]) -> str:
    if not entries:
        return '<section id="not-classified"><h2>Skipped and failed</h2><p>None.</p></section>'
    rows = "".join(
        f'<tr class="{escape(str(e.get("status")))}"><td>{escape(str(e.get("status")))}</td>'
        f"<td>{escape(str(e.get('path', '')))}</td><td>{escape(str(e.get('reason', '')))}</td></tr>"
        for e in sorted(entries, key=lambda e: (str(e.get("status")), str(e.get("path", ""))))
    )
    return (
        '<section id="not-classified"><h2>Skipped and failed</h2>'
        '<table class="others"><tr><th>status</th><th>file</th><th>reason</th></tr>'
        f"{rows}</table></section>"
    )
