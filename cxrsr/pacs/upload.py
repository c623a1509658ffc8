"""Send DICOM instances to Orthanc and prove that they arrived: what ``upload_dicom.py`` does.

:mod:`cxrsr.pacs.orthanc` only talks HTTP; this module decides what to send and what the
answers mean, on top of it:

* :func:`upload` recognises each file by its first bytes, reads its header with pydicom
  and sends only what a PACS can parse safely (:mod:`cxrsr.dicomio.header`: a file that fails is
  "not sent: malformed: <reason>"), hashes it, sends it with ``POST /instances`` from a
  few parallel workers (a large file streamed from disk) and classifies Orthanc's answer
  as ``stored`` (``"Status": "Success"``), ``already stored`` (``"AlreadyStored"``),
  ``rejected`` (4xx, with Orthanc's own message) or ``failed`` (after the retries).
  Files that are not DICOM, and DICOMDIRs, are passed over with a reason.
* :func:`cxrsr.pacs.verify.verify` then proves what Orthanc acknowledged: present, intact
  (MD5) and in the study of the images it references.

One module of about 600 lines on purpose: the outcome vocabulary (the statuses,
:class:`Outcome`, :class:`Report`), the check before sending (:func:`read_checked`) and the
parallel runner (:func:`in_parallel`) are what every target imports as one, the Orthanc
REST upload here as well as DICOMweb and DIMSE (:mod:`cxrsr.pacs.targets`). Verification
is :mod:`cxrsr.pacs.verify`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
from collections.abc import Callable, Container, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrsr.dicomio.discovery import SNIFF_BYTES, Source, sniff_dicom
from cxrsr.dicomio.header import MalformedDicom, is_dicomdir, read_header
from cxrsr.pacs import orthanc
from cxrsr.pacs.orthanc import FileChanged, OrthancClient, OrthancUnavailable, Response

log = logging.getLogger("cxrsr")

#: Orthanc answered ``"Status": "Success"``: the instance is new and now stored.
STORED = "stored"
#: Orthanc answered ``"Status": "AlreadyStored"``: it holds an instance with this ID already.
ALREADY_STORED = "already stored"
#: Orthanc answered 4xx (or filtered the instance out): sending it again will not help.
REJECTED = "rejected"
#: Not sent because its header is malformed, or no usable answer after the retries
#: (connection errors, timeouts, 5xx), or unreadable.
SEND_FAILED = "failed"
#: Not DICOM (or empty, or a DICOMDIR): not sent at all, and not a failure.
PASSED_OVER = "passed over"

#: How :func:`cxrsr.pacs.verify.verify` proved a stored file intact: the MD5 Orthanc recorded when it
#: stored the file, or the MD5 of the file read back from Orthanc (an Orthanc with
#: ``"StoreMD5ForAttachments": false`` records none).
BY_STORED_MD5 = "stored MD5"
BY_READING_BACK = "reading back"

#: SOP Class UIDs of the Structured Report family (PS3.4 Annex B, B.5: ``...1.1.88.x``).
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
#: Secondary Capture Image Storage and its multi-frame siblings (PS3.4 B.5): the IODs a
#: key image (a heatmap over the radiograph) is written as.
SC_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


# -- upload ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one input file, and what verification found."""

    name: str
    status: str
    reason: str = ""
    size: int = 0
    md5: str | None = None
    instance_id: str | None = None
    study_id: str | None = None
    patient_id: str | None = None
    derived: str | None = None
    """For an object derived from images (an SR, a key image): its kind, as counted in
    the summary (``"SRs"``, ``"key images"``); ``None`` for anything else."""
    references: tuple[str, ...] = ()
    """For a derived object: the SOP Instance UIDs of the images it references."""
    verified: bool = False
    problems: list[str] = field(default_factory=list)
    sop_instance_uid: str = ""
    """Its SOP Instance UID (0008,0018), where the target files instances by UID (DICOMweb,
    DIMSE) rather than by Orthanc ID."""
    study_uid: str = ""
    """Its Study Instance UID (0020,000D), for the same targets."""
    series_uid: str = ""
    """Its Series Instance UID (0020,000E), for the same targets."""
    sop_class_uid: str = ""
    """Its SOP Class UID (0008,0016), for the same targets."""

    @property
    def sent(self) -> bool:
        """Orthanc acknowledged the instance (stored now or before)."""
        return self.status in (STORED, ALREADY_STORED)


@dataclass
class Placement:
    """How many derived objects of one kind sit in the study of the images they reference."""

    checked: int = 0
    in_source_study: int = 0
    source_missing: int = 0
    misplaced: int = 0


@dataclass
class Report:
    """Everything the summary line and the exit code are made of."""

    outcomes: list[Outcome]
    verification_note: str = ""
    placements: dict[str, Placement] = field(default_factory=dict)
    checked_by: dict[str, int] = field(default_factory=dict)
    """How many stored files were compared with what was sent, by method
    (:data:`BY_STORED_MD5`, :data:`BY_READING_BACK`)."""

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    def found_by_search(
        self, outcomes: Iterable[Outcome], found: Container[str], method: str, search: str
    ) -> None:
        """Mark the ``outcomes`` whose SOP Instance UID a search of the PACS (``method``:
        QIDO-RS, C-FIND) ``found`` as verified; the others get a problem naming ``search``."""
        for outcome in outcomes:
            if outcome.sop_instance_uid in found:
                outcome.verified = True
                self.checked_by[method] = self.checked_by.get(method, 0) + 1
            else:
                outcome.problems.append(
                    f"acknowledged ({outcome.status}) but {search} does not find SOP "
                    f"Instance UID {outcome.sop_instance_uid}"
                )

    @property
    def acknowledged(self) -> int:
        return sum(1 for o in self.outcomes if o.sent)

    @property
    def verified(self) -> int:
        return sum(1 for o in self.outcomes if o.sent and o.verified)

    @property
    def ok(self) -> bool:
        """Nothing rejected or failed, every acknowledged instance verified, derived objects
        in place."""
        return (
            self.count(REJECTED) == 0
            and self.count(SEND_FAILED) == 0
            and self.verified == self.acknowledged
            and all(p.misplaced == 0 for p in self.placements.values())
        )

    def log_problems(self) -> None:
        """One ``E:`` line per instance that verification found wrong."""
        for outcome in self.outcomes:
            for problem in outcome.problems:
                log.error("%s: %s", outcome.name, problem)

    def summary(self) -> str:
        line = (
            f"{self.count(STORED)} stored, {self.count(ALREADY_STORED)} already stored, "
            f"{self.count(REJECTED)} rejected, {self.count(SEND_FAILED)} failed, "
            f"{self.count(PASSED_OVER)} passed over, "
            f"verified {self.verified}/{self.acknowledged}"
        )
        line += self.method()
        if self.verification_note:
            line += f" ({self.verification_note})"
        order = [kind for kind, _matches, _references in DERIVED_KINDS]
        # The order of DERIVED_KINDS, not of arrival: the same run always reads the same.
        for kind, placement in sorted(self.placements.items(), key=lambda i: order.index(i[0])):
            line += f", {kind} in source study {placement.in_source_study}/{placement.checked}"
            if placement.source_missing:
                line += f" ({placement.source_missing} without their source in Orthanc)"
        return line

    def method(self) -> str:
        """How the stored files were checked, as the summary line says it."""
        by_md5 = self.checked_by.get(BY_STORED_MD5, 0)
        read_back = self.checked_by.get(BY_READING_BACK, 0)
        if by_md5 and read_back:
            return (
                f": {by_md5} by stored MD5, {read_back} by re-reading the file "
                "(Orthanc keeps no MD5 of those)"
            )
        if read_back:
            files = "file" if read_back == 1 else "files"
            return f" by re-reading {read_back} {files} (Orthanc keeps no MD5)"
        if by_md5:
            return " by stored MD5"
        others = [f"{n} by {how}" for how, n in self.checked_by.items() if n]
        if others:
            return ": " + ", ".join(others)
        return ""


def classify_answer(answer: Response) -> tuple[str, str, dict[str, Any]]:
    """Turn Orthanc's answer to ``POST /instances`` into (status, reason, JSON document)."""
    if answer.status != 200:
        return REJECTED, f"HTTP {answer.status}: {answer.orthanc_message()}", {}
    try:
        document = answer.json()
    except ValueError:
        return REJECTED, "Orthanc's answer was not JSON", {}
    status = document.get("Status") if isinstance(document, dict) else None
    if status == "Success":
        return STORED, "", document
    if status == "AlreadyStored":
        return ALREADY_STORED, "", document
    if status == "FilteredOut":
        # A Lua script or plugin refused it (Orthanc's ReceivedInstanceFilter).
        return REJECTED, "Orthanc filtered the instance out (a Lua or plugin filter)", document
    return REJECTED, f"unexpected answer from Orthanc: Status {status!r}", {}


def _evidence_uids(ds: Dataset) -> list[str]:
    """An SR's Current Requested Procedure Evidence Sequence (0040,A375): the images it
    describes, by study, series and SOP instance (PS3.3 C.17.2)."""
    uids = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                uids.append(str(item.get("ReferencedSOPInstanceUID", "")))
    return uids


def _source_image_uids(ds: Dataset) -> list[str]:
    """A derived image's Source Image Sequence (0008,2112): the images it was made from
    (PS3.3 C.7.6.1.1.4)."""
    return [
        str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.get("SourceImageSequence", [])
    ]


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID", ""))


def _is_derived_secondary_capture(ds: Dataset) -> bool:
    """A Secondary Capture marked DERIVED that names its source images: a key image."""
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return (
        _sop_class(ds).startswith(SC_SOP_CLASS_PREFIX)
        and "DERIVED" in values
        and "SourceImageSequence" in ds
    )


#: Objects checked for placement after upload: (kind as counted in the summary, which
#: objects, the SOP Instance UIDs of the images each references). An object made from an
#: image belongs in that image's Orthanc study and patient; add a kind here to check it.
DERIVED_KINDS: tuple[tuple[str, Callable[[Dataset], bool], Callable[[Dataset], list[str]]], ...] = (
    ("SRs", lambda ds: _sop_class(ds).startswith(SR_SOP_CLASS_PREFIX), _evidence_uids),
    ("key images", _is_derived_secondary_capture, _source_image_uids),
)


def derived_from(ds: Dataset) -> tuple[str | None, tuple[str, ...]]:
    """The kind of derived object ``ds`` is (see :data:`DERIVED_KINDS`) and the images it
    references, or ``(None, ())`` for an ordinary instance."""
    for kind, matches, references in DERIVED_KINDS:
        if matches(ds):
            uids = (uid.strip() for uid in references(ds))
            return kind, tuple(dict.fromkeys(uid for uid in uids if uid))
    return None, ()


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "cannot read: not enough memory"
    return f"cannot read: {getattr(exc, 'strerror', None) or exc}"


#: Files up to this size are read into memory once, then sniffed, parsed, hashed and sent
#: from there (every compressed radiograph and most uncompressed ones); larger ones are
#: parsed and hashed from the file and streamed from disk. Memory stays within
#: ``2 * workers * SMALL_FILE`` (files waiting and being sent).
SMALL_FILE = 8 * 1024 * 1024
#: The buffer each upload thread hashes large files through: small enough to stay in
#: the CPU cache and to cost nothing to keep, large enough for few system calls.
HASH_CHUNK = 256 * 1024


class _HashBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(HASH_CHUNK))


_hash_buffer = _HashBuffer()


@dataclass
class _Prepared:
    """A file ready to send: its body, its MD5, and what its header says it is."""

    body: orthanc.Body
    md5: str
    size: int
    derived: str | None
    references: tuple[str, ...]


def _hash_file(fh: BinaryIO, size: int) -> str:
    """The MD5 of a whole open file, read from its start.

    Raises :class:`~cxrsr.pacs.orthanc.FileChanged` when the file no longer has ``size``
    bytes: it is being written, and what would be sent is not a finished file. (A file
    rewritten in place between this hash and the send is caught by :func:`cxrsr.pacs.verify.verify`,
    whose MD5 comparison then fails.)
    """
    fh.seek(0)
    digest = hashlib.md5()
    total = 0
    view = _hash_buffer.view
    while count := fh.readinto(view):  # type: ignore[attr-defined]
        digest.update(view[:count])
        total += count
    if total != size:
        raise FileChanged(f"the file changed while being read ({total} of {size} bytes)")
    return digest.hexdigest()


def _inspect(fh: BinaryIO, size: int, name: str) -> Dataset | Outcome:
    """The header of a file worth sending, or the outcome of one that is not sent:
    passed over (empty, not DICOM, a DICOMDIR) or failed (malformed)."""
    head = fh.read(SNIFF_BYTES)
    if not head:
        return Outcome(name, PASSED_OVER, "empty file, not sent")
    if not sniff_dicom(head):
        return Outcome(name, PASSED_OVER, "not a DICOM file, not sent", size=size)
    try:
        ds = read_header(fh, size)
    except MalformedDicom as exc:
        return Outcome(name, SEND_FAILED, f"not sent: malformed: {exc}", size=size)
    if is_dicomdir(ds):
        # Orthanc cannot store it ("Inexistent tag": it has no patient or study), and it
        # holds no image, so it is passed over rather than rejected.
        return Outcome(name, PASSED_OVER, "DICOMDIR (media directory), not an image: not sent")
    return ds


def inspect_source(source: Source) -> Outcome | None:
    """What :func:`upload` would decide about ``source`` before sending, without hashing
    or sending it: its outcome when it would not be sent, ``None`` when it would."""
    try:
        with contextlib.ExitStack() as stack:
            fh, size = _open(source, stack)
            found = _inspect(fh, size, source.name)
    except (OSError, MemoryError) as exc:
        return Outcome(source.name, SEND_FAILED, _unreadable(exc))
    return found if isinstance(found, Outcome) else None


@dataclass
class Checked:
    """A file that passed the header check, whole in memory: what a DICOMweb or DIMSE
    target sends (STOW-RS: these bytes unchanged; C-STORE: the data set they hold) and files
    it by. It carries no MD5: those targets prove storage by SOP Instance UID (QIDO-RS,
    Storage Commitment, C-FIND), never by digest, so hashing every file would be CPU spent
    for nothing (about a quarter of what reading and checking a radiograph costs). The
    Orthanc REST upload, which verifies by MD5, hashes in :func:`read_and_store`."""

    name: str
    data: bytes
    header: Dataset
    """The data set up to Pixel Data, with its File Meta Information."""
    derived: str | None
    references: tuple[str, ...]

    @property
    def sop_class_uid(self) -> str:
        return str(self.header.get("SOPClassUID", ""))

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.get("SOPInstanceUID", ""))

    @property
    def study_uid(self) -> str:
        return str(self.header.get("StudyInstanceUID", ""))

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    @property
    def transfer_syntax(self) -> str:
        """The file's Transfer Syntax UID; for a file without File Meta Information (or
        with an unknown UID there), the encoding pydicom found its data set in."""
        meta = getattr(self.header, "file_meta", None)
        declared = UID(str(meta.get("TransferSyntaxUID", "")) if meta is not None else "")
        if declared.is_valid and declared.is_transfer_syntax:
            return str(declared)
        implicit, little = self.header.original_encoding
        if implicit:
            return str(ImplicitVRLittleEndian)
        return str(ExplicitVRLittleEndian if little else ExplicitVRBigEndian)

    def outcome(self, status: str = SEND_FAILED, reason: str = "") -> Outcome:
        return Outcome(
            self.name,
            status,
            reason,
            size=len(self.data),
            derived=self.derived,
            references=self.references,
            sop_instance_uid=self.sop_instance_uid,
            study_uid=self.study_uid,
            series_uid=self.series_uid,
            sop_class_uid=self.sop_class_uid,
        )


def read_checked(source: Source) -> Checked | Outcome:
    """``source`` read whole and through the same header check as :func:`upload` (a file
    that would hurt the PACS is "not sent: malformed"), or its outcome when it is not
    to be sent. For targets that send from memory and prove by UID (DICOMweb, DIMSE): the
    file is not hashed."""
    try:
        head = source.head(SNIFF_BYTES)
        # A large file that is not DICOM is passed over from its first bytes, never read whole.
        data = source.read_bytes() if head and sniff_dicom(head) else head
    except (OSError, MemoryError) as exc:
        return Outcome(source.name, SEND_FAILED, _unreadable(exc))
    found = _inspect(io.BytesIO(data), len(data), source.name)
    if isinstance(found, Outcome):
        return found
    derived, references = derived_from(found)
    return Checked(source.name, data, found, derived, references)


def _open(source: Source, stack: contextlib.ExitStack) -> tuple[BinaryIO, int]:
    """An open file and its size; an archive member is read into memory."""
    if source.member is not None:
        data = source.read_bytes()
        return io.BytesIO(data), len(data)
    fh = stack.enter_context(source.open())
    return fh, os.fstat(fh.fileno()).st_size


def _prepare(source: Source, stack: contextlib.ExitStack) -> _Prepared | Outcome:
    """A file ready to send, or its outcome when it is not sent.

    The first bytes decide whether it is DICOM, so a large file that is not is never
    read whole; then pydicom reads the header (:func:`cxrsr.dicomio.header.read_header`), and
    only then is the file hashed. A file up to :data:`SMALL_FILE` is read once, into
    memory: parsing from memory costs pydicom no system call per element. A larger plain
    file stays open (on ``stack``) to be streamed from disk.
    """
    fh, size = _open(source, stack)
    if isinstance(fh, io.BytesIO) or size > SMALL_FILE:
        return _prepared(fh, size, source.name)
    head = fh.read(SNIFF_BYTES)
    if not head or not sniff_dicom(head):
        fh.seek(0)
        return _prepared(fh, size, source.name)  # passed over, from its first bytes only
    fh.seek(0)
    data = fh.read()  # one read, no copy: BytesIO shares the bytes
    if len(data) != size:
        raise FileChanged(f"the file changed while being read ({len(data)} of {size} bytes)")
    return _prepared(io.BytesIO(data), size, source.name)


def _prepared(fh: BinaryIO, size: int, name: str) -> _Prepared | Outcome:
    found = _inspect(fh, size, name)
    if isinstance(found, Outcome):
        return found
    derived, references = derived_from(found)
    if isinstance(fh, io.BytesIO):
        data = fh.getvalue()
        return _Prepared(data, hashlib.md5(data).hexdigest(), size, derived, references)
    md5 = _hash_file(fh, size)
    return _Prepared(orthanc.FileBody(fh, size), md5, size, derived, references)


def read_and_store(source: Source, client: OrthancClient) -> Outcome:
    """Read one file, check its header, send it, and classify the answer.

    Memory stays bounded by the number of workers however large the files: a small
    file is held whole, a large one only through a :data:`HASH_CHUNK` buffer and
    urllib3's send blocks.
    """
    with contextlib.ExitStack() as stack:
        try:
            prepared = _prepare(source, stack)
        except (OSError, MemoryError) as exc:  # SourceReadError: damaged zip, hostile member
            return Outcome(source.name, SEND_FAILED, _unreadable(exc))
        except FileChanged as exc:
            return Outcome(source.name, SEND_FAILED, str(exc))
        if isinstance(prepared, Outcome):
            return prepared
        outcome = Outcome(
            source.name,
            SEND_FAILED,
            size=prepared.size,
            md5=prepared.md5,
            derived=prepared.derived,
            references=prepared.references,
        )
        try:
            answer = client.store_instance(prepared.body)
        except FileChanged as exc:
            outcome.reason = str(exc)
            return outcome
        except OrthancUnavailable as exc:
            outcome.reason = str(exc)
            if exc.maybe_delivered:
                outcome.reason += (
                    "; Orthanc may have stored it before failing: run again to be sure"
                )
            elif not exc.attempted:
                outcome.reason = "not sent: " + outcome.reason
            return outcome
    outcome.status, outcome.reason, document = classify_answer(answer)
    outcome.instance_id = document.get("ID")
    outcome.study_id = document.get("ParentStudy")
    outcome.patient_id = document.get("ParentPatient")
    return outcome


def log_outcome(outcome: Outcome) -> None:
    """The per-file line: ``W:`` when passed over, ``E:`` when rejected or failed."""
    if outcome.status == PASSED_OVER:
        log.warning("%s: %s", outcome.name, outcome.reason)
    elif outcome.status in (REJECTED, SEND_FAILED):
        log.error("%s: %s: %s", outcome.name, outcome.status, outcome.reason)
    else:
        log.debug("%s: %s as %s", outcome.name, outcome.status, outcome.instance_id)


T = TypeVar("T")
R = TypeVar("R")


def in_parallel(
    function: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    on_result: Callable[[int, R | BaseException], None],
    expected: tuple[type[BaseException], ...] = (),
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run ``function`` on every item from a pool of ``workers`` threads
    (:class:`~concurrent.futures.ThreadPoolExecutor`); ``on_result(index, result)`` for
    each in the calling thread, as they finish.

    An ``expected`` exception is passed to ``on_result`` in place of the item's result;
    any other exception, or Ctrl-C in the calling thread, stops the run: items not yet
    started are never run, ``on_stop`` is called (to cut short the items in flight),
    the pool is shut down, and the exception is raised here.

    ``items`` may be a generator, such as the file discovery: it is drawn from as
    workers need work (at most ``2 * workers`` items are waiting or running), so work
    starts with the first item found instead of after the last one.
    """
    numbered = enumerate(items)
    running: dict[Future[R], int] = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="cxrsr") as pool:
        try:
            exhausted = False
            while True:
                while not exhausted and len(running) < 2 * max(1, workers):
                    taken = next(numbered, None)
                    if taken is None:
                        exhausted = True
                    else:
                        running[pool.submit(function, taken[1])] = taken[0]
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    try:
                        result: R | BaseException = future.result()
                    except expected as exc:
                        result = exc
                    on_result(index, result)
        except BaseException:  # CredentialsRefused, Ctrl-C, a bug: stop, then raise here
            for future in running:
                future.cancel()
            if on_stop is not None:
                on_stop()
            raise


def upload(
    sources: Iterable[Source],
    client: OrthancClient,
    workers: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send every source from ``workers`` threads; outcomes come back in input order.

    ``sources`` may be the discovery generator itself: uploads start with the first file
    found. ``on_done`` is called as each file finishes (progress bar, log lines), one
    call at a time. :class:`CredentialsRefused` from any worker stops the whole run at
    once, as does Ctrl-C: files not yet started are then not sent.
    """
    outcomes: dict[int, Outcome] = {}
    announced = False

    def record(index: int, result: Outcome | BaseException) -> None:
        nonlocal announced
        assert isinstance(result, Outcome)
        outcomes[index] = result
        if client.is_down and not announced:
            announced = True
            log.error(
                "Orthanc at %s stopped answering (%s); files not yet sent are "
                "marked failed without further attempts",
                client.url,
                client.down_reason,
            )
        if on_done is not None:
            on_done(result)

    in_parallel(
        lambda s: read_and_store(s, client),
        sources,
        workers,
        record,
        # Wrong credentials, Ctrl-C: requests in flight end at once instead of retrying.
        on_stop=lambda: client.stop("the run was stopped"),
    )
    return [outcomes[index] for index in sorted(outcomes)]
