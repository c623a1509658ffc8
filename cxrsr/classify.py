"""The classification run behind process_dicom.py: read in worker processes, infer in batches.

Reading, decoding and resizing happen in worker processes (spawned, so they never
inherit the model's threads) while the main process runs the network on full batches.
At most ``window`` files are in flight, so memory stays flat however many files there
are; results come back in input order, so the results file is the same on every run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import numpy as np

from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import DomainPolicy, entry_fields
from cxrsr.dicomio.preview import make_preview, png_bytes, preview_crop
from cxrsr.dicomio.reading import Radiograph, read_radiograph
from cxrsr.errors import MAX_REASON, InputError, NotARadiographError, PipelineError, one_line
from cxrsr.files import sync_files, write_atomic
from cxrsr.model.classifier import Classifier
from cxrsr.model.heatmaps import PREVIEW_FOLDER, HeatmapWriter, file_stem
from cxrsr.model.preprocess import INPUT_SIZE, preprocess
from cxrsr.reader_pool import ReaderPool
from cxrsr.results import (
    CLASSIFIED,
    FAILED,
    SKIPPED,
    ClassifiedEntry,
    FailedEntry,
    ModelScores,
    ResultsEntry,
    SkippedEntry,
    rounded_score,
)

log = logging.getLogger("cxrsr")

#: Reduced-resolution decoding keeps at least twice the model's input size, so the
#: final resize still has the detail to anti-alias from.
REDUCED_DECODE_MIN_SIZE = 2 * INPUT_SIZE


class DomainKeys(TypedDict, total=False):
    """The domain gates' record in a classified entry (:data:`cxrsr.dicomio.domain.ENTRY_KEYS`)."""

    projection: str
    patient_orientation: str
    orientation_transform: str
    domain_warnings: list[str]


class PreviewKeys(TypedDict, total=False):
    """The keys of a classified entry that name its display preview."""

    preview: str
    preview_crop: list[float]


@dataclass
class SizedInput:
    """One image prepared for one further input size: its model input and preview keys."""

    model_input: np.ndarray
    preview: PreviewKeys


def size_preview_folder(size: int) -> str:
    """Where the previews of a further input size go (the first model's stay in
    ``previews/``, where a single-model run puts them)."""
    return f"{PREVIEW_FOLDER}/{size}"


@dataclass
class PreparedImage:
    """What a worker sends back for one file: a model input, or why there is none."""

    path: str
    status: Literal["ready", "skipped", "failed"]
    reason: str = ""
    identity: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_input: np.ndarray | None = None
    preview: PreviewKeys = field(default_factory=PreviewKeys)
    """``preview`` and ``preview_crop`` of the results entry, when previews are written."""
    more: dict[int, SizedInput] = field(default_factory=dict)
    """The model inputs (and previews) of further input sizes, by size: a multi-model run
    whose models take different sizes (see :func:`prepare`)."""

    def __post_init__(self) -> None:
        # Reasons and warnings quote header values, which a damaged file can fill with
        # control characters or kilobytes of the elements after them: one short line each.
        self.reason = one_line(self.reason, MAX_REASON)
        self.warnings = [one_line(note, MAX_REASON) for note in self.warnings]


def prepare(
    source: Source,
    domain: DomainPolicy = DomainPolicy.STRICT,
    results_dir: Path | None = None,
    input_size: int = INPUT_SIZE,
    more_sizes: tuple[int, ...] = (),
) -> PreparedImage:
    """Read, check, decode and preprocess one file (runs in a worker process).

    ``input_size``: the model's input size (pixels per side).

    With ``results_dir``, also writes the display preview from the pixels just decoded
    (no image is decoded twice across the pipeline).

    ``more_sizes``: further input sizes (a multi-model run of models of several sizes).
    The file is read and decoded again for each, exactly as a run of a model of that size
    alone reads it (the reduced-resolution decode follows the size), so each model sees
    the very input it would see alone; their previews go under
    :func:`size_preview_folder`. A file that cannot be prepared at every size fails.
    """
    item = _prepare_at(source, domain, results_dir, input_size, PREVIEW_FOLDER)
    for size in more_sizes:
        if item.status != "ready":
            break
        other = _prepare_at(source, domain, results_dir, size, size_preview_folder(size))
        if other.status != "ready" or other.model_input is None:
            reason = f"at the {size}-pixel input: {other.reason}"
            return PreparedImage(source.name, FAILED, reason=reason)
        item.more[size] = SizedInput(other.model_input, other.preview)
    return item


def _prepare_at(
    source: Source,
    domain: DomainPolicy,
    results_dir: Path | None,
    input_size: int,
    preview_folder: str,
) -> PreparedImage:
    """:func:`prepare` at one input size, its preview in ``preview_folder``."""
    try:
        radiograph = read_radiograph(source, min_size=2 * input_size, domain=domain)
        # A reduced decode keeps the stored geometry; a turned image is decoded in full, its
        # shape the turned one (a transpose swaps Rows and Columns).
        reduced = radiograph.decimation > 1
        shape = (
            (radiograph.identity["rows"], radiograph.identity["columns"])
            if reduced
            else (int(radiograph.pixels.shape[0]), int(radiograph.pixels.shape[1]))
        )
        model_input = preprocess(
            radiograph.pixels,
            size=input_size,
            decimation=radiograph.decimation,
            sample_origin=radiograph.sample_origin,
            original_shape=shape,
        )
        preview = (
            write_preview(radiograph, shape, source.name, results_dir, preview_folder)
            if results_dir is not None
            else PreviewKeys()
        )
    except NotARadiographError as exc:
        return PreparedImage(source.name, SKIPPED, reason=str(exc))
    except InputError as exc:
        return PreparedImage(source.name, FAILED, reason=str(exc))
    except (OSError, MemoryError) as exc:
        return PreparedImage(source.name, FAILED, reason=f"cannot read: {exc}")
    except Exception as exc:  # a bug or a decoder crash on hostile data: one file, not the batch
        return PreparedImage(
            source.name, FAILED, reason=f"unexpected error: {type(exc).__name__}: {exc}"
        )
    except BaseException as exc:
        # Decoders written in Rust (pylibjpeg-rle) raise pyo3's PanicException, which
        # derives from BaseException, on hostile data (an RLE frame wider than Columns);
        # it cannot even be pickled back to the main process, so it would end the batch.
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        return PreparedImage(
            source.name, FAILED, reason=f"decoder crashed: {type(exc).__name__}: {exc}"
        )
    return PreparedImage(
        source.name,
        "ready",
        identity=radiograph.identity,
        warnings=radiograph.warnings,
        model_input=model_input,
        preview=preview,
    )


def write_preview(
    radiograph: Radiograph,
    shape: tuple[int, int],
    path: str,
    results_dir: Path,
    folder: str = PREVIEW_FOLDER,
) -> PreviewKeys:
    """Write the display preview of ``radiograph`` (under ``folder`` of ``results_dir``);
    return its results entry keys.

    The file is not flushed to disk here: :func:`classify` makes a batch's pictures
    durable together before it reports the entries that name them.
    """
    assert radiograph.display is not None  # read_radiograph always sets it
    relative = f"{folder}/{file_stem(path)}.png"
    image = make_preview(radiograph.pixels, radiograph.display, shape)
    write_atomic(results_dir / relative, png_bytes(image), durable=False)
    return {"preview": relative, "preview_crop": preview_crop(shape, image.shape)}


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process decides what to keep, and
    # readers that died of it first would only turn into "reader process died" failures.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _reader_died(source: Source, reason: str) -> PreparedImage:
    return PreparedImage(source.name, FAILED, reason=reason)


def prepared_in_order(
    sources: Iterable[Source],
    workers: int,
    window: int,
    prepare_one: Callable[[Source], PreparedImage] = prepare,
    timeout: float | None = None,
) -> Generator[PreparedImage, None, None]:
    """``prepare_one`` over ``sources`` with ``workers`` processes, in order, ``window`` in flight.

    A reader process that dies (the OOM killer, a decoder that segfaults) fails only the
    file it was reading, with the reason; see :mod:`cxrsr.reader_pool`. ``prepare_one``
    must be an importable module-level function; tests pass one that crashes. A reader
    busy with one file for more than ``timeout`` seconds is stopped and that file fails.
    """
    if workers <= 0:
        yield from map(prepare_one, sources)
        return
    pool: ReaderPool[Source, PreparedImage] = ReaderPool(
        prepare_one, workers, _reader_died, initializer=_ignore_sigint, timeout=timeout
    )
    with pool:  # on an error or Ctrl-C, queued files are dropped, not decoded first
        pending: deque[Future[PreparedImage]] = deque()
        for source in sources:
            pending.append(pool.submit(source))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def classified_entry(
    item: PreparedImage, scores: dict[str, float], threshold: float
) -> ClassifiedEntry:
    """A ``classified`` entry of the results file.

    ``scores`` are the model's, unrounded: findings are decided on them, and the entry
    stores them rounded without crossing the threshold (:func:`rounded_score`), so the
    stored scores and the findings always agree.
    """
    identity = item.identity
    entry: ClassifiedEntry = {
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
        **cast(DomainKeys, entry_fields(identity)),
        "scores": {label: rounded_score(score, threshold) for label, score in scores.items()},
        "findings": [label for label, score in scores.items() if score >= threshold],
    }
    if item.warnings:
        entry["warnings"] = item.warnings
    entry.update(item.preview)
    return entry


def model_scores(scores: dict[str, float], threshold: float) -> ModelScores:
    """A further model's ``scores`` and ``findings`` (``by_model``), as :func:`classified_entry`
    makes the first model's."""
    return {
        "scores": {label: rounded_score(score, threshold) for label, score in scores.items()},
        "findings": [label for label, score in scores.items() if score >= threshold],
    }


def not_classified_entry(item: PreparedImage) -> SkippedEntry | FailedEntry:
    """The ``skipped`` or ``failed`` entry of a file the model never saw."""
    if item.status == SKIPPED:
        return {"path": item.path, "status": SKIPPED, "reason": item.reason}
    return {"path": item.path, "status": FAILED, "reason": item.reason}


def log_outcome(entry: ResultsEntry) -> None:
    """One line per skipped or failed image (and each warning of a classified one), the same
    from every engine."""
    if entry["status"] == SKIPPED:
        log.warning("%s: skipped: %s", entry["path"], entry["reason"])
    elif entry["status"] == FAILED:
        log.error("%s: %s", entry["path"], entry["reason"])
    else:
        log.debug("%s: classified", entry["path"])
        for note in entry.get("warnings", []):
            log.warning("%s: %s", entry["path"], note)


def pictures_error(results_dir: Path | None, exc: OSError) -> PipelineError:
    """A disk that cannot take the pictures ends the run (exit 3), naming the folder."""
    return PipelineError(f"{results_dir}: cannot write heatmaps: {exc}", 3)


def close_heatmaps(heatmaps: HeatmapWriter) -> None:
    """Wait for the heatmap files; a disk that cannot take them ends the run (exit 3)."""
    try:
        heatmaps.close()
    except OSError as exc:
        raise pictures_error(heatmaps.results_dir, exc) from exc


@dataclass
class Run:
    """What :func:`classify` returns."""

    classifier: Classifier | None
    """The loaded model; ``None`` when there was nothing to classify (it is never loaded)."""
    entries: list[ResultsEntry]
    """One results entry per finished file, in input order."""
    interrupted: bool = False
    """Ctrl-C stopped the run; ``entries`` holds the files finished before it."""
    others: list[Classifier] = field(default_factory=list)
    """A multi-model run's further models, loaded (empty for one model)."""


@dataclass
class OtherModel:
    """A further model of a multi-model run: its loader and its heatmaps' writer.

    Its scores go into each classified entry's ``by_model`` under its weights name, from
    the model input of its ``input_size`` (the first model's when the sizes are equal).
    """

    weights: str
    load: Callable[[], Classifier]
    heatmaps: HeatmapWriter | None = None
    input_size: int = INPUT_SIZE


def _load_all(first: Callable[[], Classifier], others: Sequence[OtherModel]) -> list[Classifier]:
    """Every model of the run, the first first (on the loader thread)."""
    return [first(), *(other.load() for other in others)]


def classify(
    sources: list[Source],
    load_classifier: Callable[[], Classifier],
    batch_size: int,
    workers: int,
    on_entry: Callable[[ResultsEntry], None] = lambda entry: None,
    on_batch: Callable[[], None] = lambda: None,
    prepare_one: Callable[[Source], PreparedImage] | None = None,
    domain: DomainPolicy = DomainPolicy.STRICT,
    heatmaps: HeatmapWriter | None = None,
    read_timeout: float | None = None,
    input_size: int = INPUT_SIZE,
    on_model: Callable[[Classifier], None] = lambda classifier: None,
    others: Sequence[OtherModel] = (),
    on_models: Callable[[list[Classifier]], None] = lambda classifiers: None,
) -> Run:
    """Classify ``sources``, in order.

    With ``heatmaps``, each classified entry also gets its heatmaps and display preview,
    written under the writer's results folder.

    The model loads in a background thread while the worker processes start and decode
    the first files, so start-up costs the longer of the two, not their sum; with no
    sources, neither the model nor any worker is started at all. ``on_model`` is called
    once, on the calling thread, as soon as the model is seen loaded and before any
    classified entry is reported (the journal starts under its description there).
    ``on_entry`` is called once per finished file (progress, messages, the journal), and
    ``on_batch`` after each network batch's entries (a good moment to fsync a journal).
    Ctrl-C ends the run early but keeps what is finished (``Run.interrupted``), unless
    the model has not even loaded yet. ``domain`` is the domain gates' policy
    (:mod:`cxrsr.dicomio.domain`); ``prepare_one`` replaces :func:`prepare` (tests pass one that
    crashes). ``read_timeout``: seconds a reader may spend on one file (see
    :func:`prepared_in_order`). ``input_size``: the model's input size, known before it
    loads (:func:`cxrsr.model.classifier.model_input_size`).

    ``others``: further models (a multi-model run), each run on every batch after the
    first, on the model inputs of its input size (files are prepared once per distinct
    size); their results go into each classified entry's ``by_model``. ``on_models`` is called with every model where ``on_model`` is called.
    """
    if not sources:
        return Run(None, [])
    # A module-level function and its arguments, so spawned readers can unpickle it.
    results_dir = heatmaps.results_dir if heatmaps is not None else None
    more_sizes = tuple(sorted({other.input_size for other in others} - {input_size}))
    reader = prepare_one or functools.partial(
        prepare,
        domain=domain,
        results_dir=results_dir,
        input_size=input_size,
        more_sizes=more_sizes,
    )
    loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
    loading = loader.submit(_load_all, load_classifier, others)
    loader.shutdown(wait=False)
    batches = _Batches(loading, len(sources), batch_size, input_size, heatmaps)
    batches.on_entry, batches.on_batch, batches.on_model = on_entry, on_batch, on_model
    batches.on_models, batches.others = on_models, list(others)
    window = batch_size * 2 + max(workers, 1) * 2
    interrupted = False
    try:
        prepared = contextlib.closing(
            prepared_in_order(sources, workers, window, reader, read_timeout)
        )
        with prepared as items:
            for index, item in enumerate(items):
                if not batches.model_may_load():
                    break  # the model cannot load: stop reading, report that error below
                batches.take(index, item)
        batches.finish()
    except KeyboardInterrupt:
        if not loading.done() or loading.exception() is not None:
            raise
        interrupted = True
    finally:
        batches.model_may_load()  # a model that has loaded names the journal, whatever happened
        for writer in [heatmaps, *(other.heatmaps for other in others)]:
            if writer is not None:
                close_heatmaps(writer)
    return Run(batches.classifier(), batches.finished(), interrupted, batches.models()[1:])


class _Batches:
    """The prepared files of one :func:`classify` run, gathered into network batches.

    A file that is not ready becomes its entry at once; ready files wait for a full batch.
    A classified batch is reported one batch later (:meth:`_publish`), once the pictures
    its entries name are on disk: they are written while the network runs the next batch.
    """

    THRESHOLD = 0.5
    """The score at and above which a label is a finding (operating-point normalised)."""

    def __init__(
        self,
        loading: Future[list[Classifier]],
        count: int,
        batch_size: int,
        input_size: int,
        heatmaps: HeatmapWriter | None,
    ) -> None:
        self.loading = loading
        self.batch_size = batch_size
        self.input_size = input_size
        self.heatmaps = heatmaps
        self.results_dir = heatmaps.results_dir if heatmaps is not None else None
        self.on_entry: Callable[[ResultsEntry], None] = lambda entry: None
        self.on_batch: Callable[[], None] = lambda: None
        self.on_model: Callable[[Classifier], None] = lambda classifier: None
        self.on_models: Callable[[list[Classifier]], None] = lambda classifiers: None
        self.others: list[OtherModel] = []
        self._model_told = False
        self.entries: list[ResultsEntry | None] = [None] * count
        self.batch: list[tuple[int, PreparedImage]] = []
        # The last batch classified, waiting for its pictures: (index, entry, pictures tasks).
        self.unpublished: list[tuple[int, ClassifiedEntry, list[Future[list[Path]]]]] = []

    def model_may_load(self) -> bool:
        """False once the model has failed to load; tells ``on_model`` once it has loaded."""
        if not self.loading.done():
            return True
        if self.loading.exception() is not None:
            return False
        self.classifier()
        return True

    def classifier(self) -> Classifier:
        """The loaded (first) model (waiting for it); the first call tells ``on_model``."""
        return self.models()[0]

    def models(self) -> list[Classifier]:
        """Every loaded model (waiting for them); the first call tells ``on_model``."""
        models = self.loading.result()
        if not self._model_told:
            self._model_told = True
            self.on_model(models[0])
            self.on_models(models)
        return models

    def take(self, index: int, item: PreparedImage) -> None:
        """One prepared file, in input order."""
        if item.status == "ready":
            self.batch.append((index, item))
            if len(self.batch) >= self.batch_size:
                self._flush()
        else:
            self._report(index, not_classified_entry(item))

    def finish(self) -> None:
        """The last, partial batch, and the report of the batch before it."""
        self._flush()
        self._publish()

    def finished(self) -> list[ResultsEntry]:
        """The entries reported so far, in input order."""
        return [entry for entry in self.entries if entry is not None]

    def _report(self, index: int, entry: ResultsEntry) -> None:
        self.entries[index] = entry
        self.on_entry(entry)

    def _flush(self) -> None:
        """Run the network on the gathered batch and start writing its pictures."""
        if not self.batch:
            return
        classifier, *others = self.models()
        expected = [self.input_size, *(other.input_size for other in self.others)]
        for model, size in zip((classifier, *others), expected, strict=True):
            if model.input_size != size:
                raise PipelineError(
                    f"the model takes {model.input_size}-pixel inputs, not {size}", 4
                )
        inputs = {self.input_size: np.stack([item.model_input for _, item in self.batch])}  # type: ignore[misc]
        for size in set(expected) - {self.input_size}:
            inputs[size] = np.stack([item.more[size].model_input for _, item in self.batch])
        all_scores, all_maps = classifier.predict_with_maps(inputs[self.input_size])
        more = [
            model.predict_with_maps(inputs[other.input_size])
            for model, other in zip(others, self.others, strict=True)
        ]
        self._publish()  # the previous batch: its pictures were written while the network ran
        for row, ((index, item), scores, maps) in enumerate(
            zip(self.batch, all_scores, all_maps, strict=True)
        ):
            entry = classified_entry(item, scores, self.THRESHOLD)
            tasks = []
            if self.heatmaps is not None:
                entry["heatmaps"], task = self._heatmaps(
                    self.heatmaps, item, scores, maps, self.input_size
                )
                tasks.append(task)
            for other, (other_scores, other_maps) in zip(self.others, more, strict=True):
                result = model_scores(other_scores[row], self.THRESHOLD)
                if other.input_size != self.input_size:
                    result.update(item.more[other.input_size].preview)
                if other.heatmaps is not None:
                    result["heatmaps"], task = self._heatmaps(
                        other.heatmaps, item, other_scores[row], other_maps[row], other.input_size
                    )
                    tasks.append(task)
                entry.setdefault("by_model", {})[other.weights] = result
            self.unpublished.append((index, entry, tasks))
        self.batch.clear()

    def _heatmaps(
        self,
        writer: HeatmapWriter,
        item: PreparedImage,
        scores: dict[str, float],
        maps: dict[str, np.ndarray],
        size: int,
    ) -> tuple[dict[str, str], Future[list[Path]]]:
        """Queue one image's heatmaps of one model (``size``: its input size)."""
        try:  # a full queue waits for an earlier image, whose write may have failed
            return writer.write(item.path, scores, maps, size)
        except OSError as exc:
            raise pictures_error(self.results_dir, exc) from exc

    def _publish(self) -> None:
        """Report the waiting batch once the pictures its entries name are on disk.

        Its heatmaps were written while the network ran the next batch, so this rarely
        waits. Then one :func:`sync_files` makes the batch's pictures (heatmaps and
        previews) durable before any entry naming them is reported and journaled: a run
        killed, or a machine that loses power, at any moment leaves no entry naming a
        missing file.
        """
        if not self.unpublished:
            return
        if self.results_dir is not None:
            try:
                sync_files(self._pictures(self.results_dir))
            except OSError as exc:
                raise pictures_error(self.results_dir, exc) from exc
        for index, entry, _task in self.unpublished:
            self._report(index, entry)
        self.unpublished.clear()
        self.on_batch()

    def _pictures(self, results_dir: Path) -> list[Path]:
        """The waiting batch's heatmaps (once written) and previews."""
        pictures: list[Path] = []
        for _index, entry, tasks in self.unpublished:
            for task in tasks:
                pictures.extend(task.result())
            previews = [entry, *entry.get("by_model", {}).values()]
            pictures.extend(results_dir / p["preview"] for p in previews if "preview" in p)
        return pictures
