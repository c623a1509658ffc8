"""The classification run behind process_dicom.py: read in worker processes, infer in batches.

Reading, decoding and resizing happen in worker processes (spawned, so they never
inherit the model's threads) while the main process runs the network on full batches.
At most ``window`` files are in flight, so memory stays flat however many files there
are; results come back in input order, so the results file is the same on every run.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrsr.discovery import Source
from cxrsr.errors import InputError, NotARadiographError, PipelineError
from cxrsr.files import write_atomic
from cxrsr.heatmaps import PREVIEW_FOLDER, HeatmapWriter, file_stem
from cxrsr.model import Classifier
from cxrsr.preprocess import INPUT_SIZE, preprocess
from cxrsr.preview import make_preview, png_bytes, preview_crop
from cxrsr.reading import Radiograph, read_radiograph
from cxrsr.results import CLASSIFIED, FAILED, SKIPPED

log = logging.getLogger("cxrsr")

#: Reduced-resolution decoding keeps at least twice the model's input size, so the
#: final resize still has the detail to anti-alias from.
REDUCED_DECODE_MIN_SIZE = 2 * INPUT_SIZE


@dataclass
class Prepared:
    """What a worker sends back for one file: a model input, or why there is none."""

    path: str
    status: str
    reason: str = ""
    identity: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_input: np.ndarray | None = None
    preview: dict[str, Any] = field(default_factory=dict)
    """``preview`` and ``preview_crop`` of the results entry, when previews are written."""


def prepare(source: Source, results_dir: Path | None = None) -> Prepared:
    """Read, check, decode and preprocess one file (runs in a worker process).

    With ``results_dir``, also writes the display preview from the pixels just decoded
    (no image is decoded twice across the pipeline).
    """
    try:
        radiograph = read_radiograph(source, min_size=REDUCED_DECODE_MIN_SIZE)
        shape = (radiograph.identity["rows"], radiograph.identity["columns"])
        model_input = preprocess(
            radiograph.pixels,
            decimation=radiograph.decimation,
            sample_origin=radiograph.sample_origin,
            original_shape=shape,
        )
        preview = (
            write_preview(radiograph, shape, source.name, results_dir)
            if results_dir is not None
            else {}
        )
    except NotARadiographError as exc:
        return Prepared(source.name, SKIPPED, reason=str(exc))
    except InputError as exc:
        return Prepared(source.name, FAILED, reason=str(exc))
    except (OSError, MemoryError) as exc:
        return Prepared(source.name, FAILED, reason=f"cannot read: {exc}")
    except Exception as exc:  # a bug or a decoder crash on hostile data: one file, not the batch
        return Prepared(
            source.name, FAILED, reason=f"unexpected error: {type(exc).__name__}: {exc}"
        )
    return Prepared(
        source.name,
        "ready",
        identity=radiograph.identity,
        warnings=radiograph.warnings,
        model_input=model_input,
        preview=preview,
    )


def write_preview(
    radiograph: Radiograph, shape: tuple[int, int], path: str, results_dir: Path
) -> dict[str, Any]:
    """Write the display preview of ``radiograph``; return its results entry keys."""
    assert radiograph.display is not None  # read_radiograph always sets it
    relative = f"{PREVIEW_FOLDER}/{file_stem(path)}.png"
    image = make_preview(radiograph.pixels, radiograph.display, shape)
    write_atomic(results_dir / relative, png_bytes(image))
    return {"preview": relative, "preview_crop": preview_crop(shape)}


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process decides what to keep, and
    # workers that died of it first would only turn that into broken-pool errors.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepared_in_order(
    sources: Iterable[Source], workers: int, window: int, results_dir: Path | None = None
) -> Iterator[Prepared]:
    """``prepare`` over ``sources`` with ``workers`` processes, in order, ``window`` in flight."""
    if workers <= 0:
        yield from (prepare(source, results_dir) for source in sources)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint)
    try:
        pending: deque[Future[Prepared]] = deque()
        for source in sources:
            pending.append(pool.submit(prepare, source, results_dir))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an error or Ctrl-C, drop queued files instead of decoding them all first.
        pool.shutdown(wait=True, cancel_futures=True)


def classified_entry(item: Prepared, scores: dict[str, float], threshold: float) -> dict[str, Any]:
    """A ``classified`` entry of the results file."""
    identity = item.identity
    entry: dict[str, Any] = {
        "path": item.path,
        "status": CLASSIFIED,
        "sop_instance_uid": identity["sop_instance_uid"],
        "series_instance_uid": identity["series_instance_uid"],
        "study_instance_uid": identity["study_instance_uid"],
        "sop_class_uid": identity["sop_class_uid"],
        "patient_id": identity["patient_id"],
        "modality": identity["modality"],
        "body_part_examined": identity["body_part_examined"],
        "photometric_interpretation": identity["photometric_interpretation"],
        "rows": identity["rows"],
        "columns": identity["columns"],
        "transfer_syntax_uid": identity["transfer_syntax_uid"],
        "scores": scores,
        "findings": [label for label, score in scores.items() if score >= threshold],
    }
    if item.warnings:
        entry["warnings"] = item.warnings
    entry.update(item.preview)
    return entry


def close_heatmaps(heatmaps: HeatmapWriter) -> None:
    """Wait for the heatmap files; a disk that cannot take them ends the run (exit 3)."""
    try:
        heatmaps.close()
    except OSError as exc:
        raise PipelineError(f"{heatmaps.results_dir}: cannot write heatmaps: {exc}", 3) from exc


@dataclass
class Run:
    """What :func:`classify` returns."""

    classifier: Classifier
    entries: list[dict[str, Any]]
    """One results entry per finished file, in input order."""
    interrupted: bool = False
    """Ctrl-C stopped the run; ``entries`` holds the files finished before it."""


def classify(
    sources: list[Source],
    load_classifier: Callable[[], Classifier],
    batch_size: int,
    workers: int,
    on_entry: Callable[[dict[str, Any]], None] = lambda entry: None,
    heatmaps: HeatmapWriter | None = None,
) -> Run:
    """Classify ``sources``, in order.

    With ``heatmaps``, each classified entry also gets its heatmaps and display preview,
    written under the writer's results folder.

    The model loads in a background thread while the worker processes start and decode
    the first files, so start-up costs the longer of the two, not their sum.
    ``on_entry`` is called once per finished file (progress and messages). Ctrl-C ends
    the run early but keeps what is finished (``Run.interrupted``), unless the model
    has not even loaded yet.
    """
    threshold = 0.5
    entries: list[dict[str, Any] | None] = [None] * len(sources)
    batch: list[tuple[int, Prepared]] = []
    loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
    loading = loader.submit(load_classifier)
    loader.shutdown(wait=False)

    def flush() -> None:
        if not batch:
            return
        classifier = loading.result()
        inputs = np.stack([item.model_input for _, item in batch])  # type: ignore[misc]
        all_scores, all_maps = classifier.predict_with_maps(inputs)
        for (index, item), scores, maps in zip(batch, all_scores, all_maps, strict=True):
            entries[index] = classified_entry(item, scores, threshold)
            if heatmaps is not None:
                entries[index]["heatmaps"] = heatmaps.write(item.path, scores, maps)  # type: ignore[index]
            on_entry(entries[index])  # type: ignore[arg-type]
        batch.clear()

    window = batch_size * 2 + max(workers, 1) * 2
    interrupted = False
    try:
        results_dir = heatmaps.results_dir if heatmaps is not None else None
        for index, item in enumerate(prepared_in_order(sources, workers, window, results_dir)):
            if loading.done() and loading.exception() is not None:
                break  # the model cannot load: stop reading files, report that error below
            if item.status == "ready":
                batch.append((index, item))
                if len(batch) >= batch_size:
                    flush()
            else:
                entry = {"path": item.path, "status": item.status, "reason": item.reason}
                entries[index] = entry
                on_entry(entry)
        flush()
    except KeyboardInterrupt:
        if not loading.done() or loading.exception() is not None:
            raise
        interrupted = True
    finally:
        if heatmaps is not None:
            close_heatmaps(heatmaps)
    return Run(loading.result(), [e for e in entries if e is not None], interrupted)
