"""Send DICOM instances to Orthanc and prove that they arrived: what ``upload_dicom.py`` does.

:mod:`cxrsr.orthanc` only talks HTTP; this module decides what to send and what the
answers mean, on top of it:

* :func:`upload` sniffs each file by its first bytes, hashes it, sends it with
  ``POST /instances`` from a few parallel workers (a large file straight from the page
  cache with ``sendfile``) and classifies Orthanc's answer as
  ``stored`` (``"Status": "Success"``), ``already stored`` (``"AlreadyStored"``),
  ``rejected`` (4xx, with Orthanc's own message) or ``failed`` (after the retries).
  Files that are not DICOM, and DICOMDIRs, are passed over with a reason.
* :func:`verify` asks Orthanc afterwards for the MD5 it keeps of each stored file
  (``GET /instances/{id}/attachments/dicom/md5``) and compares it with the MD5 of the
  bytes sent, and checks that each Structured Report sits in the same Orthanc study
  and patient as the image it describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from cxrsr import httpconn, orthanc
from cxrsr.discovery import SNIFF_BYTES, Source, sniff_dicom
from cxrsr.orthanc import OrthancClient, OrthancUnavailable, Response

log = logging.getLogger("cxrsr")

#: Orthanc answered ``"Status": "Success"``: the instance is new and now stored.
STORED = "stored"
#: Orthanc answered ``"Status": "AlreadyStored"``: it holds an instance with this ID already.
ALREADY_STORED = "already stored"
#: Orthanc answered 4xx (or filtered the instance out): sending it again will not help.
REJECTED = "rejected"
#: No usable answer after the retries (connection errors, timeouts, 5xx), or unreadable.
FAILED = "failed"
#: Not DICOM (or empty): not sent at all, and not a failure.
PASSED_OVER = "passed over"

#: Media Storage Directory Storage (PS3.4 Annex B; PS3.10 8.6): a DICOMDIR, the index
#: of a CD or USB export. Orthanc cannot store it ("Inexistent tag": it has no patient
#: or study), and it holds no image, so it is passed over rather than rejected.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: Bytes read to sniff a file and find its file meta information (PS3.10 7.1).
HEAD_BYTES = 4096

#: SOP Class UIDs of the Structured Report family (PS3.4 Annex B, B.5: ``...1.1.88.x``).
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SR_MARKER = SR_SOP_CLASS_PREFIX.encode("ascii")
#: How far into a file the SR SOP Class UID is looked for: it is (0008,0016), among
#: the first elements of the data set, and in the file meta (0002,0002) before that.
SR_SCAN_BYTES = 65536
#: Secondary Capture Image Storage: generate_sr.py's key images, checked like SRs. The
#: UID has an odd length, so it is padded with a NUL (PS3.5 9.1) wherever it is stored.
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_SC_MARKER = SC_SOP_CLASS.encode("ascii") + b"\x00"


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
    sr_references: tuple[str, ...] = ()
    """For a Structured Report: the SOP Instance UIDs of the images it describes."""
    is_sr: bool = False
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def sent(self) -> bool:
        """Orthanc acknowledged the instance (stored now or before)."""
        return self.status in (STORED, ALREADY_STORED)


@dataclass
class Report:
    """Everything the summary line and the exit code are made of."""

    outcomes: list[Outcome]
    verification_note: str = ""
    srs_checked: int = 0
    srs_in_source_study: int = 0
    srs_source_missing: int = 0
    srs_misplaced: int = 0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def acknowledged(self) -> int:
        return sum(1 for o in self.outcomes if o.sent)

    @property
    def verified(self) -> int:
        return sum(1 for o in self.outcomes if o.sent and o.verified)

    @property
    def ok(self) -> bool:
        """Nothing rejected or failed, every acknowledged instance verified, SRs in place."""
        return (
            self.count(REJECTED) == 0
            and self.count(FAILED) == 0
            and self.verified == self.acknowledged
            and self.srs_misplaced == 0
        )

    def log_problems(self) -> None:
        """One ``E:`` line per instance that verification found wrong."""
        for outcome in self.outcomes:
            for problem in outcome.problems:
                log.error("%s: %s", outcome.name, problem)

    def summary(self) -> str:
        line = (
            f"{self.count(STORED)} stored, {self.count(ALREADY_STORED)} already stored, "
            f"{self.count(REJECTED)} rejected, {self.count(FAILED)} failed, "
            f"{self.count(PASSED_OVER)} passed over, "
            f"verified {self.verified}/{self.acknowledged}"
        )
        if self.verification_note:
            line += f" ({self.verification_note})"
        if self.srs_checked:
            line += f", SRs in source study {self.srs_in_source_study}/{self.srs_checked}"
            if self.srs_source_missing:
                line += f" ({self.srs_source_missing} without their source in Orthanc)"
        return line


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


def sr_references(source: Source, start: bytes, size: int) -> tuple[bool, tuple[str, ...]]:
    """Whether a file is a Structured Report, and the SOP Instance UIDs it is evidence of.

    A Secondary Capture that names its source images in Source Image Sequence
    (0008,2112), as generate_sr.py's key images do, counts as one too: it must sit in
    its source's study just the same.

    ``start`` is the file's first :data:`SR_SCAN_BYTES` (all of it when ``size`` is no
    larger, as for this project's SRs, which are then parsed without reading the file
    again): a bytes search there for the SR SOP Class prefix keeps pydicom away from
    the (many) image files. The images an SR
    describes are listed in its Current Requested Procedure Evidence Sequence
    (0040,A375), by study, series and SOP instance (PS3.3 C.17.2).
    """
    if _SR_MARKER not in start and _SC_MARKER not in start:
        return False, ()
    import io

    import pydicom

    with io.BytesIO(start) if len(start) == size else source.open() as fh:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == SC_SOP_CLASS and ds.get("SourceImageSequence"):
        sources = (
            str(item.get("ReferencedSOPInstanceUID", "")).strip() for item in ds.SourceImageSequence
        )
        return True, tuple(dict.fromkeys(uid for uid in sources if uid))
    if not sop_class.startswith(SR_SOP_CLASS_PREFIX):
        return False, ()
    uids: list[str] = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for item in series.get("ReferencedSOPSequence", []):
                uid = str(item.get("ReferencedSOPInstanceUID", "")).strip()
                if uid:
                    uids.append(uid)
    return True, tuple(dict.fromkeys(uids))


def media_storage_sop_class(head: bytes) -> str | None:
    """The file meta's Media Storage SOP Class UID (0002,0002), from a file's first bytes.

    The file meta group always follows ``DICM`` in explicit VR little endian (PS3.10
    7.1), so it is walked directly; ``None`` when there is no file meta or the element
    is not within ``head``.
    """
    if head[128:132] != b"DICM":
        return None
    offset = 132
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return None
        vr = head[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL"):
            if offset + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, offset + 8)
            offset += 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            offset += 8
        if element == 0x0002:
            value = head[offset : offset + length]
            return value.rstrip(b"\0 ").decode("ascii", "replace")
        offset += length
    return None


def passed_over_reason(head: bytes) -> str | None:
    """Why a file whose first :data:`HEAD_BYTES` are ``head`` is not sent, if it is not."""
    if not head:
        return "empty file, not sent"
    if not sniff_dicom(head[:SNIFF_BYTES]):
        return "not a DICOM file, not sent"
    if media_storage_sop_class(head) == MEDIA_STORAGE_DIRECTORY:
        return "DICOMDIR (media directory), not an image: not sent"
    return None


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "cannot read: not enough memory"
    return f"cannot read: {getattr(exc, 'strerror', None) or exc}"


#: Files up to this size are read into memory and sent with their request head in one
#: system call; larger ones are hashed through a small buffer and sent with ``sendfile``.
SMALL_FILE = 64 * 1024
#: The buffer each upload thread hashes large files through: small enough to stay in
#: the CPU cache and to cost nothing to keep, large enough for few system calls.
HASH_CHUNK = 256 * 1024


class _HashBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(HASH_CHUNK))


_hash_buffer = _HashBuffer()


@dataclass
class _Prepared:
    """A file ready to send: its body, its MD5, and the first bytes for the SR check."""

    body: orthanc.Body
    md5: str
    size: int
    start: bytes


def _hash_file(fh: BinaryIO, head: bytes, size: int) -> tuple[str, bytes]:
    """The MD5 of a whole open file whose first bytes, ``head``, are already read, and
    its first :data:`SR_SCAN_BYTES`.

    Raises :class:`~cxrsr.httpconn.FileChanged` when the file no longer has ``size``
    bytes: it is being written, and what would be sent is not a finished file. (A file
    rewritten in place between this hash and the send is caught by :func:`verify`,
    whose MD5 comparison then fails.)
    """
    digest = hashlib.md5(head)
    start = bytearray(head)
    total = len(head)
    view = _hash_buffer.view
    while count := fh.readinto(view):  # type: ignore[attr-defined]
        digest.update(view[:count])
        if len(start) < SR_SCAN_BYTES:
            start += view[: min(count, SR_SCAN_BYTES - len(start))]
        total += count
    if total != size:
        raise httpconn.FileChanged(f"the file changed while being read ({total} of {size} bytes)")
    return digest.hexdigest(), bytes(start)


def _in_memory(data: bytes) -> _Prepared:
    return _Prepared(data, hashlib.md5(data).hexdigest(), len(data), data[:SR_SCAN_BYTES])


def _prepare(source: Source, stack: contextlib.ExitStack) -> _Prepared | Outcome:
    """A file ready to send, or its ``passed over`` outcome when its head says it is not sent.

    The first :data:`HEAD_BYTES` are read first, so a large file that is not DICOM is
    never read whole. A large plain file stays open (on ``stack``) to be sent from the
    file itself.
    """
    if source.member is not None:
        head = source.head(HEAD_BYTES)
    else:
        fh = stack.enter_context(source.open())
        head = fh.read(HEAD_BYTES)
    reason = passed_over_reason(head)
    if reason is not None:
        return Outcome(source.name, PASSED_OVER, reason, size=len(head))
    if source.member is not None:
        return _in_memory(source.read_bytes())
    size = os.fstat(fh.fileno()).st_size
    if size <= SMALL_FILE:
        return _in_memory(head + fh.read())
    md5, start = _hash_file(fh, head, size)
    return _Prepared(httpconn.FileBody(fh, size), md5, size, start)


def read_and_store(source: Source, client: OrthancClient) -> Outcome:
    """Read one file, sniff it, send it, and classify the answer.

    Memory stays bounded by the number of workers however large the files: a small
    file is held whole, a large one only through a :data:`HASH_CHUNK` buffer (the
    kernel sends it from the page cache).
    """
    with contextlib.ExitStack() as stack:
        try:
            prepared = _prepare(source, stack)
        except (OSError, MemoryError) as exc:  # SourceReadError: damaged zip, hostile member
            return Outcome(source.name, FAILED, _unreadable(exc))
        except httpconn.FileChanged as exc:
            return Outcome(source.name, FAILED, str(exc))
        if isinstance(prepared, Outcome):
            return prepared
        outcome = Outcome(source.name, FAILED, size=prepared.size, md5=prepared.md5)
        try:
            outcome.is_sr, outcome.sr_references = sr_references(
                source, prepared.start, prepared.size
            )
        except Exception as exc:  # a damaged SR is still sent; Orthanc decides if it is DICOM
            log.debug("%s: cannot read the SR's references: %s", source.name, exc)
        try:
            answer = client.store_instance(prepared.body)
        except httpconn.FileChanged as exc:
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
    elif outcome.status in (REJECTED, FAILED):
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
    """Run ``function`` on every item from ``workers`` threads; ``on_result(index, result)``
    for each, as they finish.

    ``on_result`` runs on the worker that finished the item, one call at a time (under a
    lock). An ``expected`` exception is passed to it in place of the item's result; any
    other exception, or Ctrl-C in the calling thread, stops the run: items not yet
    started are never run, ``on_stop`` is called (to cut short the items in flight),
    the threads are joined, and the exception is raised here.

    ``items`` may be a generator, such as the file discovery: the workers take items
    from it one at a time (under a lock) as they need them, so work starts with the first
    item found instead of after the last one.

    Plain threads taking the next item, rather than an executor with a future per item,
    and results handled where they are made, rather than woken up for in the calling
    thread: on the 2-core benchmark machine those hand-overs cost the uploader more CPU
    than its own Python work per file.
    """
    numbered = enumerate(items)
    take_lock = threading.Lock()
    stop = threading.Event()
    lock = threading.Lock()
    fatal: list[BaseException] = []

    def halt(exc: BaseException) -> None:
        with lock:
            first = not stop.is_set()
            stop.set()
            fatal.append(exc)
        if first and on_stop is not None:
            on_stop()

    def work() -> None:
        while not stop.is_set():
            try:
                with take_lock:
                    taken = next(numbered, None)
            except BaseException as exc:  # the generator failed: a bug, raised in the caller
                halt(exc)
                return
            if taken is None:
                return
            index, item = taken
            try:
                result: R | BaseException = function(item)
            except expected as exc:
                result = exc
            except BaseException as exc:  # CredentialsRefused, a bug: raised in the caller
                halt(exc)
                return
            try:
                with lock:
                    if not stop.is_set():
                        on_result(index, result)
            except BaseException as exc:
                halt(exc)
                return

    if isinstance(items, Sized):
        workers = min(workers, len(items))
    threads = [
        threading.Thread(target=work, name=f"cxrsr-{n}", daemon=True)
        for n in range(max(1, workers))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as exc:  # Ctrl-C while waiting
        halt(exc)
        for thread in threads:
            thread.join()
        raise
    if fatal:
        raise fatal[0]


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


# -- verification ----------------------------------------------------------------------


def verify(outcomes: Iterable[Outcome], client: OrthancClient, workers: int = 8) -> Report:
    """Check through Orthanc's API that every acknowledged instance is there, intact.

    * presence and integrity: the ``dicom`` attachment's MD5 must equal the MD5 of the
      bytes sent. For ``already stored`` a different MD5 means Orthanc holds another
      file under the same SOP Instance UID (it keeps the first one,
      ``"OverwriteInstances": false``), so what was sent is not what the PACS has.
    * placement: each SR's Orthanc study and patient must be those of the images in its
      evidence sequence (Orthanc derives its IDs from PatientID and the DICOM UIDs, so
      an SR with a different PatientID would land in a study of its own).

    Requests run in parallel; a GET is cheap for Orthanc and, across a network, each
    costs a round trip that parallelism hides.
    """
    report = Report(list(outcomes))
    sent = [o for o in report.outcomes if o.sent and o.instance_id]
    for outcome in report.outcomes:
        if outcome.sent and not outcome.instance_id:
            outcome.problems.append(
                "Orthanc's answer named no instance ID, so it cannot be checked"
            )
    if not sent:
        return report
    if client.is_down:
        report.verification_note = "Orthanc stopped answering before verification"
        return report
    by_id: dict[str, list[Outcome]] = {}
    for outcome in sent:
        by_id.setdefault(str(outcome.instance_id), []).append(outcome)
    srs = [o for o in sent if o.is_sr]
    instance_ids = list(by_id)

    def judge(index: int, result: tuple[str | None, str] | BaseException) -> None:
        checked = by_id[instance_ids[index]]
        if isinstance(result, BaseException):
            for outcome in checked:
                outcome.problems.append(f"could not verify: {result}")
            return
        stored_md5, sop_instance_uid = result
        for outcome in checked:
            _judge_md5(outcome, stored_md5, sop_instance_uid)

    def place(index: int, result: tuple[str, str] | BaseException) -> None:
        outcome = srs[index]
        if isinstance(result, BaseException):
            verdict, message = _SR_UNCHECKED, f"could not check the SR's study: {result}"
        else:
            verdict, message = result
        report.srs_checked += 1
        if verdict == _SR_IN_PLACE:
            report.srs_in_source_study += 1
        elif verdict == _SR_SOURCE_MISSING:
            report.srs_source_missing += 1
            log.warning("%s: %s", outcome.name, message)
        else:
            report.srs_misplaced += 1
            outcome.problems.append(message)

    expected = (OrthancUnavailable,)
    stored_copy = lambda i: _stored_copy(client, i, by_id[i])  # noqa: E731
    in_parallel(stored_copy, instance_ids, workers, judge, expected)
    in_parallel(lambda o: _sr_placement(o, client), srs, workers, place, expected)
    return report


def _stored_copy(
    client: OrthancClient, instance_id: str, outcomes: list[Outcome]
) -> tuple[str | None, str]:
    """The stored file's MD5, and its SOP Instance UID when some sender's MD5 differs.

    The UID is fetched only for a mismatch, so the common case costs one request.
    """
    stored_md5 = client.attachment_md5(instance_id)
    if stored_md5 is None or all(o.md5 == stored_md5 for o in outcomes):
        return stored_md5, ""
    answer = client.request("GET", f"/instances/{instance_id}")
    if answer.status != 200:
        return stored_md5, ""
    return stored_md5, str(answer.json().get("MainDicomTags", {}).get("SOPInstanceUID", ""))


def _judge_md5(outcome: Outcome, stored_md5: str | None, sop_instance_uid: str) -> None:
    if stored_md5 is None:
        outcome.problems.append(
            f"Orthanc acknowledged it ({outcome.status}) but instance {outcome.instance_id} "
            "is not there now"
        )
    elif stored_md5 == outcome.md5:
        outcome.verified = True
    elif outcome.status == ALREADY_STORED:
        outcome.problems.append(
            f"Orthanc already held a different file with SOP Instance UID {sop_instance_uid} "
            f"(Orthanc ID {outcome.instance_id}; stored MD5 {stored_md5}, sent {outcome.md5}); "
            "Orthanc keeps the first copy, so these bytes are not in Orthanc"
        )
    else:
        outcome.problems.append(
            f"stored file differs from the file sent (stored MD5 {stored_md5}, sent {outcome.md5})"
        )


#: Verdicts of :func:`_sr_placement`.
_SR_IN_PLACE = "in place"
_SR_SOURCE_MISSING = "source missing"
_SR_MISPLACED = "misplaced"
_SR_UNCHECKED = "unchecked"


def _sr_placement(outcome: Outcome, client: OrthancClient) -> tuple[str, str]:
    """Whether the SR shares an Orthanc study and patient with its source images, and why not.

    A source that is not in Orthanc is a warning (it may be uploaded later); an SR in
    another study or patient than its source is an error.
    """
    if not outcome.sr_references:
        return _SR_SOURCE_MISSING, (
            "the SR names no source image (no Current Requested Procedure Evidence), "
            "so its study cannot be checked"
        )
    for uid in outcome.sr_references:
        candidates = client.lookup_instances(uid)
        if not candidates:
            return _SR_SOURCE_MISSING, (
                f"source instance {uid} is not in Orthanc, so the SR's study cannot be checked"
            )
        places = [client.study_of_instance(c) for c in candidates]
        if (outcome.study_id, outcome.patient_id) not in places:
            found = ", ".join(f"study {p[0]} of patient {p[1]}" for p in places if p)
            return _SR_MISPLACED, (
                f"SR is in Orthanc study {outcome.study_id} of patient {outcome.patient_id}, "
                f"but its source {uid} is in {found or 'no study'}"
            )
    return _SR_IN_PLACE, ""
