"""Running the SR builder over a whole results file: what ``generate_sr.py`` does.

:mod:`cxrsr.sr.fast` builds one document; this module turns a loaded results file into a
folder of them. It checks every entry (a malformed one, or one whose source has gone or
changed, is an error for that entry only: one ``E:`` line, and the rest go on), builds
in a process pool when there is enough work, yet writes the same files and logs the same
lines in the same order for every ``--jobs``, counts an entry whose SR another entry
already wrote as a duplicate, and warns about (or with ``--clean`` removes) SRs of
earlier results left in the output folder.

About 500 lines in one module on purpose: the process pool, the writer that keeps the
order of files and log lines, and the tidying of the output folder share one guarantee,
the same folder for every ``--jobs``.
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import logging
import multiprocessing
import multiprocessing.context
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from cxrsr.errors import PipelineError
from cxrsr.files import StagedFile, fsync_folder
from cxrsr.results import CLASSIFIED, FAILED, SKIPPED, STATUSES, ReadableResults, per_model
from cxrsr.sr import uids
from cxrsr.sr.document import EncodedSR, encoded_path, write_encoded
from cxrsr.sr.entries import Classification, EntryError, ModelInfo
from cxrsr.sr.evidence import SourceError, evidence_dataset, read_source_header
from cxrsr.sr.fast import SRBuilder
from cxrsr.sr.keyimage import (
    KEY_IMAGE_MODALITY,
    KeyImageError,
    KeyImageRef,
    build_key_image,
    render,
)
from cxrsr.sr.tid1500 import SR_MANUFACTURER, instance_number

log = logging.getLogger("cxrsr")


@dataclass
class BatchTally:
    """What a run did, for the summary line and the exit code."""

    written: list[Path] = field(default_factory=list)
    key_images: list[Path] = field(default_factory=list)
    skipped: int = 0
    failed: int = 0
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def passed_over(self) -> int:
        return self.skipped + self.failed

    def summary(self, output_dir: Path) -> str:
        images = f" and {len(self.key_images)} key images" if self.key_images else ""
        line = (
            f"{len(self.written)} SRs{images} written to {output_dir}, {self.passed_over} passed over "
            f"({self.skipped} skipped, {self.failed} failed in classification), "
            f"{len(self.errors)} errors"
        )
        if self.duplicates:
            line += f", {self.duplicates} duplicate entries (same SR as an earlier entry)"
        return line


def check_entry(entry: object, model: ModelInfo, index: int) -> Classification | str | None:
    """A ``classified`` entry checked, the reason a bad entry gets no SR, or ``None``.

    ``None`` for skipped and failed entries (no SR, no error). Anything else that cannot
    make an SR is an error for this entry only, never for the results file.
    """
    status = entry.get("status") if isinstance(entry, Mapping) else None
    if status not in STATUSES:
        return f"results file: images[{index}] has no valid 'status'"
    if status != CLASSIFIED:
        return None
    try:
        return Classification.from_entry(entry, model, index)
    except EntryError as exc:
        return str(exc)


def classifications(
    document: ReadableResults, model: ModelInfo
) -> list[tuple[int, Classification]]:
    """Every well-formed ``classified`` entry with its index (the others are passed over)."""
    checked = [check_entry(entry, model, i) for i, entry in enumerate(document["images"])]
    return [(i, c) for i, c in enumerate(checked) if isinstance(c, Classification)]


#: Below this many documents per worker process, a pool costs more than it saves (each
#: worker compiles its own template and checks it against the reference, ~0.5 s).
MIN_SRS_PER_WORKER = 32

#: Documents handed to a worker at a time: large enough to amortise the inter-process
#: round trip, small enough to keep both cores busy to the end.
POOL_CHUNK_SIZE = 8


@dataclass(frozen=True)
class EntryResult:
    """What became of one classified entry; log lines travel with it, so a pool logs in order."""

    path: Path | None = None
    sop_instance_uid: str | None = None
    key_image_path: Path | None = None
    source_error: str | None = None
    write_error: str | None = None
    notes: tuple[tuple[int, str], ...] = ()


class _Writer:
    """Reads, builds and writes one entry's SR and key image; one per process.

    The key image is drawn (Pillow, zlib, numpy: mostly outside the GIL) one entry ahead
    on a thread of its own when entries come through :meth:`run`, and written to disk on
    another while the SR that names it is built (pure Python) on this one, so the three
    overlap. Measured with ``bench/bench_sr.py``: drawing, building and writing one after
    the other made 20 SRs with key images per second in one process. (Building and
    encoding the key image on the drawing thread as well was slower: 26-28 per second,
    the two threads then fighting over the GIL.)
    """

    def __init__(
        self, model: ModelInfo, content_datetime: datetime.datetime, output_dir: Path
    ) -> None:
        self.builder = SRBuilder(model, content_datetime)
        self.output_dir = output_dir
        self._drawing = ThreadPoolExecutor(1, thread_name_prefix="key-image")
        self._writing = ThreadPoolExecutor(1, thread_name_prefix="key-image-write")
        self._drawn: dict[int, tuple[KeyImageRef, Future[np.ndarray]]] = {}

    def close(self) -> None:
        """Stop the threads, after what they are doing (a key image being written)."""
        self._drawing.shutdown(cancel_futures=True)
        self._writing.shutdown()

    def run(self, work: Iterable[Classification]) -> Iterator[EntryResult]:
        """Each entry's result, in order; the next entry's key image is drawn meanwhile."""
        entries = iter(work)
        current = next(entries, None)
        if current is not None:
            self._draw(current)
        while current is not None:
            upcoming = next(entries, None)
            if upcoming is not None:
                self._draw(upcoming)
            yield self(current)
            current = upcoming

    def _draw(self, classification: Classification) -> None:
        ref = classification.key_image
        if ref is not None:
            self._drawn[id(ref)] = (ref, self._drawing.submit(render, ref))

    def _drawing_of(self, ref: KeyImageRef | None) -> Future[np.ndarray] | None:
        """The key image's pixels being drawn: started by :meth:`run`, or now."""
        if ref is None:
            return None
        drawn = self._drawn.pop(id(ref), None)
        if drawn is not None and drawn[0] is ref:
            return drawn[1]
        return self._drawing.submit(render, ref)

    def __call__(self, classification: Classification) -> EntryResult:
        drawing = self._drawing_of(classification.key_image)
        # pydicom and highdicom warn about odd but legal source values (single-component
        # person names, for one); they are the source's business, so only -v shows them.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                header = read_source_header(classification)
            except SourceError as exc:
                return EntryResult(source_error=str(exc))
            ref = classification.key_image
            # The key image first: its UID comes from its complete bytes (a UID names one
            # byte stream), and the SR, which names it, needs that UID.
            try:
                key_image = self._key_image(header, classification, drawing)
            except KeyImageError as exc:
                return EntryResult(source_error=f"{classification.path}: no key image: {exc}")
            except Exception as exc:  # highdicom refuses some headers (e.g. no Modality)
                reason = f"{classification.path}: cannot build a key image from this source: {type(exc).__name__}: {exc}"
                return EntryResult(source_error=reason)
            staged: Future[StagedFile] | None = None
            if key_image is not None and ref is not None:
                # Written while the SR is built; renamed into place only once the SR is.
                target = encoded_path(key_image, self.output_dir)
                staged = self._writing.submit(StagedFile, target, key_image.data, sync_folder=False)
                classification = dataclasses.replace(
                    classification,
                    key_image=dataclasses.replace(ref, sop_instance_uid=key_image.sop_instance_uid),
                )
            try:
                try:
                    encoded = self.builder.encode(header, classification)
                except Exception as exc:  # highdicom refuses some headers (e.g. no Modality)
                    reason = f"{classification.path}: cannot build an SR from this source: {type(exc).__name__}: {exc}"
                    return EntryResult(source_error=reason)
                notes = [
                    *encoded.notes,
                    *((logging.DEBUG, f"{classification.path}: {w.message}") for w in caught),
                ]
                try:
                    # The key image first: an SR never names a key image that is not there.
                    key_image_path = staged.result().commit() if staged is not None else None
                    staged = None
                    path = write_encoded(encoded, self.output_dir)
                except OSError as exc:
                    return EntryResult(write_error=str(exc), notes=tuple(notes))
            finally:
                if staged is not None:  # no SR: no key image either
                    _discard(staged)
        notes.append((logging.DEBUG, f"{classification.path} -> {path}"))
        return EntryResult(
            path=path,
            sop_instance_uid=encoded.sop_instance_uid,
            key_image_path=key_image_path,
            notes=tuple(notes),
        )

    def _key_image(
        self,
        header: pydicom.Dataset,
        classification: Classification,
        drawing: Future[np.ndarray] | None,
    ) -> EncodedSR | None:
        """The key image's file, with Patient and Study copied exactly as for the SR."""
        if classification.key_image is None or drawing is None:
            return None
        pixels = drawing.result()
        evidence, _emptied = evidence_dataset(header)  # the SR's notes report what was emptied
        dataset = build_key_image(
            evidence,
            classification.key_image,
            instance_number(header),
            classification.content_datetime(self.builder.content_datetime),
            pixels,
        )
        uid, data = uids.encode_with_content_uid(dataset, uids.KEY_IMAGE_INSTANCE)
        return EncodedSR(uid, data)


def _discard(staged: Future[StagedFile]) -> None:
    """Remove a staged key image whose SR was not written (its write may have failed too)."""
    with contextlib.suppress(Exception):
        staged.result().discard()


_worker: _Writer | None = None


def _start_worker(model: ModelInfo, content_datetime: datetime.datetime, output_dir: Path) -> None:
    global _worker
    _worker = _Writer(model, content_datetime, output_dir)


def _run_in_worker(chunk: Sequence[Classification]) -> list[EntryResult]:
    assert _worker is not None, "pool worker not initialised"
    return list(_worker.run(chunk))


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where there is one: workers start at once, without re-importing highdicom."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


@dataclass
class SRPlan:
    """What the first pass over the entries found, before any SR is written.

    Per entry it keeps 16 bytes (64-bit hashes of its SOP Instance UID and of its
    results), so planning a large run does not hold its entries.
    """

    to_report: int = 0
    work: int = 0
    key_images: int = 0
    repeated: set[int] = field(default_factory=set)
    """Hashes of the SOP Instance UIDs that more than one classified entry carries."""


def _uid_key(uid: str) -> int:
    """A 64-bit hash of a UID: collisions are negligible for any archive (2**32 entries)."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=8).digest(), "big")


def plan(
    document: ReadableResults, model: ModelInfo, results_dir: Path | None, outcome: BatchTally
) -> SRPlan:
    """The first, streaming pass over the entries: count them, log what gets no SR.

    Logs the entries without a key image (an error each, added to ``outcome``), the
    skipped and failed ones (debug), and SOP Instance UIDs that entries with different
    results share (a warning each).
    """
    found = SRPlan()
    keys, digests = array.array("Q"), array.array("Q")  # 16 bytes per classified entry
    for index, entry in enumerate(document["images"]):
        check = check_entry(entry, model, index)
        fields = _fields(entry)
        if check is None:
            outcome.skipped += fields["status"] == SKIPPED
            outcome.failed += fields["status"] == FAILED
            log.debug(
                "%s: %s (%s), no SR", fields.get("path"), fields["status"], fields.get("reason")
            )
            continue
        found.to_report += 1
        if not isinstance(check, Classification):
            continue
        found.work += 1
        if results_dir is not None:
            check = with_key_image(check, fields, model, results_dir, outcome)
            found.key_images += check.key_image is not None
        keys.append(_uid_key(check.sop_instance_uid))
        digests.append(_uid_key(check.result_digest(model)))
    found.repeated, differing = _shared(keys, digests)
    for sop_instance_uid, results in _differing_uids(document, model, differing).items():
        log.warning(
            "%d entries with different scores share SOPInstanceUID %s; each gets its own SR, "
            "all referencing the same instance",
            len(results),
            sop_instance_uid,
        )
    return found


def _shared(keys: array.array[int], digests: array.array[int]) -> tuple[set[int], set[int]]:
    """The UID hashes that several entries carry, and those of them with different results."""
    uid = np.frombuffer(keys, dtype=np.uint64)
    result = np.frombuffer(digests, dtype=np.uint64)
    order = np.lexsort((result, uid))
    uid, result = uid[order], result[order]
    again = uid[1:] == uid[:-1]
    differ = again & (result[1:] != result[:-1])
    return set(uid[1:][again].tolist()), set(uid[1:][differ].tolist())


def _differing_uids(
    document: ReadableResults, model: ModelInfo, differing: set[int]
) -> dict[str, set[str]]:
    """The UIDs (hashed in ``differing``) with their distinct results, in the entries' order:
    a further pass over the entries, only when there are any (rare: a broken export)."""
    found: dict[str, set[str]] = {}
    if not differing:
        return found
    for index, entry in enumerate(document["images"]):
        check = check_entry(entry, model, index)
        if isinstance(check, Classification) and _uid_key(check.sop_instance_uid) in differing:
            found.setdefault(check.sop_instance_uid, set()).add(check.result_digest(model))
    return found


def _checks(
    document: ReadableResults, model: ModelInfo, results_dir: Path | None
) -> Iterator[Classification | str | None]:
    """The second pass: each entry checked again, with its key image (errors were logged)."""
    for index, entry in enumerate(document["images"]):
        check = check_entry(entry, model, index)
        if isinstance(check, Classification) and results_dir is not None:
            check = with_key_image(check, _fields(entry), model, results_dir, None)
        yield check


def _batched(work: Iterable[Classification], size: int) -> Iterator[list[Classification]]:
    it = iter(work)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _in_order(
    pool: ProcessPoolExecutor, chunks: Iterable[list[Classification]], ahead: int
) -> Iterator[EntryResult]:
    """Results of the chunks in order, with at most ``ahead`` chunks submitted at a time
    (``Executor.map`` would submit them all, holding every entry)."""
    pending: collections.deque[Future[list[EntryResult]]] = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(_run_in_worker, chunk))
        if len(pending) >= ahead:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def generate_srs(
    document: ReadableResults,
    output_dir: Path,
    content_datetime: datetime.datetime,
    disable_progress: bool | None = True,
    jobs: int = 1,
    clean: bool = False,
    results_dir: Path | None = None,
) -> BatchTally:
    """Write one SR per classified entry and model of a loaded results ``document`` into
    ``output_dir``.

    A multi-model run's results (:func:`cxrsr.results.per_model`) give each model's SRs
    (and key images) exactly as a run of that model alone would: their UIDs derive from
    the model, so each model's SRs form their own SR series. See :func:`model_srs` for
    one model's; then this run's files are the only ones of ours kept (``clean``) or
    left unwarned in the folder, whichever model wrote them.
    """
    outcome = BatchTally()
    for index, view in enumerate(per_model(document)):
        one = model_srs(view, output_dir, content_datetime, disable_progress, jobs, results_dir)
        outcome.written += one.written
        outcome.key_images += one.key_images
        outcome.errors += one.errors
        outcome.duplicates += one.duplicates
        if index == 0:  # skipped and failed files are the image's, the same for every model
            outcome.skipped, outcome.failed = one.skipped, one.failed
    _tidy_other_files(output_dir, [*outcome.written, *outcome.key_images], clean)
    # Every SR and key image was flushed as it was written; their names, once, here.
    if output_dir.is_dir():
        fsync_folder(output_dir)
    return outcome


def model_srs(
    document: ReadableResults,
    output_dir: Path,
    content_datetime: datetime.datetime,
    disable_progress: bool | None = True,
    jobs: int = 1,
    results_dir: Path | None = None,
) -> BatchTally:
    """Write one SR per classified entry of a single-model results ``document`` into
    ``output_dir``.

    Skipped and failed entries are counted, not written. A malformed entry, or one whose
    source has gone or changed, is an error for that entry only (logged in the entry's
    place); the others are still written. With ``jobs`` > 1 the
    documents are built in a process pool; files, their bytes, the order of ``written``
    and the log lines are the same for every ``jobs``.

    With ``results_dir`` (the results file's folder, which holds the previews and
    heatmaps process_dicom.py wrote), each SR comes with a key image
    (:mod:`cxrsr.sr.keyimage`) in the same folder, and references it.

    The entries are read twice, as they stream (:func:`plan`, then the writing pass), and
    only the entries being built are held: memory does not grow with the entries beyond
    the names of the files written.
    """
    model = ModelInfo.from_results(document["model"])
    outcome = BatchTally()
    planned = plan(document, model, results_dir, outcome)
    if results_dir is not None and planned.work and not planned.key_images:
        log.info(
            "no key images: the results file names no previews (process_dicom.py --no-heatmaps?)"
        )
    workers = min(jobs, planned.work // MIN_SRS_PER_WORKER)
    reported, feeding = itertools.tee(_checks(document, model, results_dir))
    work = (c for c in feeding if isinstance(c, Classification))
    built: Iterator[EntryResult]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_prompt_thread_switches())
        if workers > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    workers,
                    mp_context=_pool_context(),
                    initializer=_start_worker,
                    initargs=(model, content_datetime, output_dir),
                )
            )
            # On an error or Ctrl-C, drop the documents not yet started (what is written stays).
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            built = _in_order(pool, _batched(work, POOL_CHUNK_SIZE), 4 * workers)
        else:
            local = _Writer(model, content_datetime, output_dir)
            stack.callback(local.close)
            built = local.run(work)
        # The log follows the results file's order: entry errors in their place.
        written_by: dict[int, str] = {}
        to_report = (check for check in reported if check is not None)
        for check in tqdm(
            to_report, total=planned.to_report, desc="SRs", unit="SR", disable=disable_progress
        ):
            if isinstance(check, str):
                log.error("%s; no SR written", check)
                outcome.errors.append(check)
            elif isinstance(check, Classification):
                _record(check, next(built), outcome, output_dir, written_by, planned.repeated)
    return outcome


#: How long a thread holding the GIL may run before one waiting for it gets its turn,
#: while SRs are written (Python's default is 5 ms).
SWITCH_INTERVAL = 0.0005


@contextlib.contextmanager
def _prompt_thread_switches() -> Iterator[None]:
    """Let the key image threads have the GIL back sooner while SRs are written.

    Drawing a key image is calls into Pillow, zlib and numpy; each lets go of the GIL,
    and getting it back from the main thread (busy encoding the SR in Python) waits up to
    Python's switch interval, 5 ms, every time. Measured: Pillow decoding a preview PNG
    took 3.8 ms alone and 35 ms beside a busy Python thread. With 0.5 ms,
    ``bench/bench_sr.py`` made 29-30 SRs with key images per second in one process
    instead of 26. The interval is the interpreter's, so it is restored afterwards.
    """
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _fields(entry: object) -> Mapping[str, object]:
    """An entry's keys, once :func:`check_entry` has seen it is an object."""
    return entry if isinstance(entry, Mapping) else {}


def with_key_image(
    classification: Classification,
    entry: Mapping[str, object],
    model: ModelInfo,
    results_dir: Path,
    outcome: BatchTally | None,
) -> Classification:
    """``classification`` with its key image, when the entry has a preview and heatmaps.

    An entry that names pictures that cannot be used is an error in ``outcome`` (logged);
    without ``outcome`` (its second reading) it just gets no key image.
    """
    try:
        ref = KeyImageRef.from_entry(
            entry, results_dir, model.threshold, (model.model_id, model.weights_sha256)
        )
    except KeyImageError as exc:
        if outcome is not None:
            message = f"{classification.path}: no key image: {exc}"
            log.error("%s", message)
            outcome.errors.append(message)
        return classification
    return dataclasses.replace(classification, key_image=ref)


def _record(
    classification: Classification,
    result: EntryResult,
    outcome: BatchTally,
    output_dir: Path,
    written_by: dict[int, str],
    repeated: set[int],
) -> None:
    """Log one entry's lines and count it.

    Two entries that make the same SR (the same image listed twice with the same results)
    wrote the same bytes to the same file (one UID, one byte stream): the second is
    counted as a duplicate, not as a second SR.
    """
    if result.source_error is not None:
        log.error("%s; no SR written", result.source_error)
        outcome.errors.append(result.source_error)
        return
    for level, message in result.notes:
        log.log(level, "%s", message)
    if result.write_error is not None:
        # A folder that cannot be written fails every SR alike: stop (exit 3), keep
        # what is written.
        raise PipelineError(f"{output_dir}: cannot write SRs: {result.write_error}", 3)
    assert result.path is not None and result.sop_instance_uid is not None
    # Only UIDs that several entries carry are remembered (see plan): a duplicate SR has
    # the SR's UID, and two entries with one SR UID share their SOP Instance UID.
    key = _uid_key(classification.sop_instance_uid)
    if key in repeated:
        earlier = written_by.get(_uid_key(result.sop_instance_uid))
        if earlier is not None:
            log.info("%s: same SR as %s (same image, same results)", classification.path, earlier)
            outcome.duplicates += 1
            return
        written_by[_uid_key(result.sop_instance_uid)] = classification.path
    outcome.written.append(result.path)
    if result.key_image_path is not None:
        outcome.key_images.append(result.key_image_path)


def _tidy_other_files(output_dir: Path, written: Iterable[Path], clean: bool) -> None:
    """SRs from earlier results stay in the folder, and the uploader would send them too.

    With ``clean``, remove those that are SRs made by this tool (Modality SR, Manufacturer
    "cxrsr"): a PACS should not receive results that the current results file no longer
    holds. Anything else in the folder is left alone.
    """
    if not output_dir.is_dir():
        return
    ours = {path.name for path in written}
    others = [p for p in sorted(output_dir.glob("*.dcm")) if p.name not in ours]
    if not others:
        return
    if not clean:
        log.warning(
            "%d other .dcm files in %s were not written by this run (SRs from earlier "
            "results?); they are left alone (--clean removes this tool's)",
            len(others),
            output_dir,
        )
        return
    removed = [p for p in others if _is_our_sr(p)]
    for path in removed:
        path.unlink()
    log.info("removed %d SRs of earlier results from %s", len(removed), output_dir)
    if len(removed) < len(others):
        log.warning(
            "%d other .dcm files in %s are not this tool's SRs; left alone",
            len(others) - len(removed),
            output_dir,
        )


def _is_our_sr(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["Modality", "Manufacturer"]
        )
    except Exception:
        return False
    return (
        ds.get("Modality") in ("SR", KEY_IMAGE_MODALITY)
        and ds.get("Manufacturer") == SR_MANUFACTURER
    )
