"""Send DICOM instances to Orthanc's REST API and prove that they arrived.

Three layers, each usable alone:

* :class:`OrthancClient` talks HTTP: one keep-alive connection per worker thread,
  retries with exponential backoff and jitter for connection errors, timeouts and
  5xx answers, never for 4xx; 401/403 raise :class:`CredentialsRefused` at once.
* :func:`upload` reads each file once, sniffs it by content, sends it with
  ``POST /instances`` from a few parallel workers and classifies Orthanc's answer as
  ``stored`` (``"Status": "Success"``), ``already stored`` (``"AlreadyStored"``),
  ``rejected`` (4xx, with Orthanc's own message) or ``failed`` (after the retries).
* :func:`verify` asks Orthanc afterwards for the MD5 it keeps of each stored file
  (``GET /instances/{id}/attachments/dicom/md5``) and compares it with the MD5 of the
  bytes sent, and checks that each Structured Report sits in the same Orthanc study
  and patient as the image it describes.

The client uses ``http.client`` rather than ``requests``: on this project's 2-core
benchmark machine, where Orthanc competes with the client for CPU, ``requests`` spent
about twice the client CPU per upload (measured; see ``bench/bench_upload.py``).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import random
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from cxrsr.cli import EXIT_FATAL
from cxrsr.config import OrthancSettings
from cxrsr.discovery import SNIFF_BYTES, Source, sniff_dicom
from cxrsr.errors import PipelineError

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

#: Answers that mean "the server, or the proxy in front of it, cannot serve now".
_UNAVAILABLE_STATUSES = {502, 503, 504}


class OrthancFatalError(PipelineError):
    """The run cannot go on at all (exit code 3): wrong credentials, no Orthanc at the URL."""

    exit_code = EXIT_FATAL


class CredentialsRefused(OrthancFatalError):
    """Orthanc answered 401/403: every other request would fail the same way."""


class OrthancUnavailable(Exception):
    """A request got no usable answer after all retries, or was not tried at all.

    ``maybe_delivered`` is true when at least one attempt may have reached Orthanc
    with its body (the connection broke after it was sent), so Orthanc may have stored
    an instance without being able to say so. ``attempted`` is false when the circuit
    breaker had tripped before the first attempt: nothing was sent.
    """

    def __init__(self, message: str, maybe_delivered: bool = False, attempted: bool = True) -> None:
        super().__init__(message)
        self.maybe_delivered = maybe_delivered
        self.attempted = attempted


@dataclass(frozen=True)
class Response:
    """One HTTP answer, read in full (Orthanc's answers are small JSON documents)."""

    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def orthanc_message(self) -> str:
        """Orthanc's explanation of an error: its JSON ``Details``, else ``Message``."""
        try:
            document = self.json()
        except ValueError:
            text = self.body.decode("utf-8", "replace").strip()
            return text[:200] or f"HTTP {self.status}"
        if not isinstance(document, dict):
            return f"HTTP {self.status}"
        details = document.get("Details")
        message = document.get("Message") or document.get("HttpError")
        if details and message:
            return f"{message}: {details}"
        return str(details or message or f"HTTP {self.status}")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to repeat a request that got no usable answer.

    Repeating ``POST /instances`` is safe: Orthanc stores an instance once and answers
    ``AlreadyStored`` to a repeat, so a retry after a lost answer cannot duplicate.
    """

    retries: int = 4
    """Attempts after the first one."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled for each further retry."""
    max_backoff: float = 8.0

    def delay(self, retry: int) -> float:
        """Exponential backoff with jitter, so parallel workers do not retry in lockstep."""
        base = min(self.max_backoff, self.backoff * 2**retry)
        return base * random.uniform(0.5, 1.0)


class OrthancClient:
    """A thread-safe client for Orthanc's REST API, with keep-alive and retries.

    Each worker thread keeps its own persistent connection (Orthanc's
    ``"KeepAlive": true`` in the project's ``orthanc.json``), so an upload costs one
    round trip instead of a TCP handshake plus a round trip.

    When a request runs out of retries because the server cannot be reached, the client
    marks the server as down (a circuit breaker): every later request fails at once
    instead of spending its own retries on a server that is known to be gone.
    """

    def __init__(
        self,
        settings: OrthancSettings,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        problem = url_problem(settings.url)
        if problem is not None:
            raise OrthancFatalError(problem)
        parsed = urllib.parse.urlsplit(settings.url)
        username = settings.username
        password = settings.password
        if parsed.username is not None:
            # http://user:password@host/ works as in curl and, being given with the
            # address itself, wins over ORTHANC_USERNAME/ORTHANC_PASSWORD; never shown.
            username = urllib.parse.unquote(parsed.username)
            password = urllib.parse.unquote(parsed.password or "")
        self.url = display_url(settings.url)
        self.username = username
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or ""
        self._port = parsed.port or (443 if self._https else 80)
        self._base_path = parsed.path.rstrip("/")
        self._headers: dict[str, str] = {"Accept": "application/json"}
        if username is not None or password is not None:
            token = f"{username or ''}:{password or ''}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(token).decode("ascii")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._down = threading.Event()
        self.down_reason: str | None = None

    # -- connections -------------------------------------------------------------

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it has served a request before."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        """Close every worker's connection."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()

    # -- requests ----------------------------------------------------------------

    @property
    def is_down(self) -> bool:
        """Whether the circuit breaker has tripped: the server stopped answering."""
        return self._down.is_set()

    def _send_once(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
    ) -> Response:
        """One attempt on this thread's connection; the connection is dropped on error."""
        headers = dict(self._headers)
        if content_type:
            headers["Content-Type"] = content_type
        try:
            if conn.sock is None:
                conn.connect()
                # http.client writes the headers and the body with separate send() calls;
                # with Nagle's algorithm on, the body's last segment would wait for the
                # ACK of the headers, which the server delays (delayed ACK).
                assert conn.sock is not None  # connect() just made it
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.request(method, self._base_path + path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except BaseException:
            self._drop_connection()
            raise
        if answer.will_close:
            self._drop_connection()
        return Response(answer.status, data)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> Response:
        """Send a request, retrying what a retry can fix; return any other answer.

        Retried: connection errors, timeouts, and 5xx answers. A failure on a reused
        keep-alive connection is retried once at once, without backoff: Orthanc closes
        idle keep-alive connections after a second (its answers say ``Keep-Alive:
        timeout=1``), and the client only learns that when it uses one. 401/403 raise
        :class:`CredentialsRefused`; other 4xx answers are returned to the caller.
        """
        maybe_delivered = False
        last_error = "no attempt made"
        retry = 0
        free_reconnect = True
        while True:
            if self._down.is_set():
                raise OrthancUnavailable(
                    f"Orthanc at {self.url} had stopped answering",
                    maybe_delivered,
                    attempted=retry > 0 or not free_reconnect,
                )
            conn, reused = self._connection()
            try:
                answer = self._send_once(conn, method, path, body, content_type)
            except (OSError, http.client.HTTPException) as exc:
                if not isinstance(exc, ConnectionRefusedError | socket.gaierror):
                    maybe_delivered = True
                if reused and free_reconnect:
                    free_reconnect = False
                    continue
                last_error = _describe_network_error(exc)
            else:
                if answer.status in (401, 403):
                    raise CredentialsRefused(self._credentials_message(answer.status))
                if answer.status < 500:
                    return answer
                maybe_delivered = True
                last_error = f"HTTP {answer.status}: {answer.orthanc_message()}"
                if answer.status not in _UNAVAILABLE_STATUSES and retry >= self.retry.retries:
                    # A 500 about one file says nothing about the server as a whole.
                    raise OrthancUnavailable(
                        f"Orthanc answered {last_error} (after {retry + 1} attempts)",
                        maybe_delivered,
                    )
            if retry >= self.retry.retries:
                self._trip(last_error)
                raise OrthancUnavailable(
                    f"no answer from Orthanc at {self.url} after {retry + 1} attempts: {last_error}",
                    maybe_delivered,
                )
            # Event.wait returns early when another worker trips the breaker.
            self._down.wait(self.retry.delay(retry))
            retry += 1

    def stop(self, reason: str) -> None:
        """Trip the circuit breaker by hand: later requests fail at once (Ctrl-C, 401)."""
        self._trip(reason)

    def _trip(self, reason: str) -> None:
        with self._lock:
            if not self._down.is_set():
                self.down_reason = reason
                self._down.set()

    def _credentials_message(self, status: int) -> str:
        if self.username is None:
            return (
                f"Orthanc at {self.url} requires credentials (HTTP {status}) and none were "
                "given; set ORTHANC_USERNAME/ORTHANC_PASSWORD in .env"
            )
        return (
            f"Orthanc at {self.url} refused the credentials for user {self.username!r} "
            f"(HTTP {status}); check ORTHANC_USERNAME/ORTHANC_PASSWORD in .env"
        )

    # -- Orthanc resources -------------------------------------------------------

    def system(self) -> dict[str, Any]:
        """``GET /system``: a cheap call that proves the URL, the credentials and the server.

        Raises :class:`OrthancFatalError` naming the URL when nothing answers or what
        answers is not Orthanc.
        """
        try:
            answer = self.request("GET", "/system")
        except OrthancUnavailable as exc:
            raise OrthancFatalError(f"cannot reach Orthanc at {self.url}: {exc}") from exc
        if answer.status != 200:
            raise OrthancFatalError(
                f"{self.url} does not look like Orthanc: GET /system answered HTTP "
                f"{answer.status} ({answer.orthanc_message()})"
            )
        try:
            document = answer.json()
        except ValueError as exc:
            raise OrthancFatalError(
                f"{self.url} does not look like Orthanc: GET /system did not answer JSON"
            ) from exc
        if not isinstance(document, dict) or "Version" not in document:
            raise OrthancFatalError(
                f"{self.url} does not look like Orthanc: GET /system has no 'Version'"
            )
        return document

    def store_instance(self, data: bytes) -> Response:
        """``POST /instances`` with the file's bytes as the body (retried as :meth:`request`)."""
        return self.request("POST", "/instances", body=data, content_type="application/dicom")

    def attachment_md5(self, instance_id: str) -> str | None:
        """The MD5 Orthanc recorded for the stored DICOM file, or ``None`` if the instance is gone.

        Orthanc computes it over the bytes it received (``"StorageCompression": false``
        in ``orthanc.json`` keeps them as sent), so it equals the sender's MD5 exactly
        when the file arrived intact.
        """
        answer = self.request("GET", f"/instances/{instance_id}/attachments/dicom/md5")
        if answer.status == 404:
            return None
        _expect_ok(answer, "reading an attachment's MD5")
        return answer.body.decode("ascii").strip().strip('"')

    def lookup_instances(self, sop_instance_uid: str) -> list[str]:
        """Orthanc IDs of the instances with this SOP Instance UID (``POST /tools/lookup``)."""
        answer = self.request(
            "POST",
            "/tools/lookup",
            body=sop_instance_uid.encode("ascii"),
            content_type="text/plain",
        )
        _expect_ok(answer, "looking up a SOP Instance UID")
        return [item["ID"] for item in answer.json() if item.get("Type") == "Instance"]

    def study_of_instance(self, instance_id: str) -> tuple[str, str] | None:
        """The Orthanc study ID and patient ID holding an instance, or ``None`` if it is gone."""
        answer = self.request("GET", f"/instances/{instance_id}/study")
        if answer.status == 404:
            return None
        _expect_ok(answer, "reading an instance's study")
        document = answer.json()
        return str(document["ID"]), str(document["ParentPatient"])


def display_url(url: str) -> str:
    """The URL without any ``user:password@`` part, safe to print even when malformed.

    The authority is cut out by hand rather than with ``urlsplit``, which raises on
    some malformed URLs (``http://[::1``) and would leave nothing safe to show.
    """
    scheme, separator, rest = url.partition("//")
    if not separator:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{scheme}//{authority.rpartition('@')[2]}{rest[end:]}"


def url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as Orthanc's REST URL, or ``None``; never shows a password."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        return f"not a valid URL: {display_url(url)!r} ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"not an http(s) URL: {display_url(url)!r}"
    if port == 0:
        return f"not a valid URL: {display_url(url)!r} (port 0)"
    return None


def _expect_ok(answer: Response, doing: str) -> None:
    if answer.status != 200:
        raise OrthancUnavailable(
            f"Orthanc answered HTTP {answer.status} when {doing}: {answer.orthanc_message()}"
        )


def _describe_network_error(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    return str(exc) or type(exc).__name__


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


def sr_references(data: bytes) -> tuple[bool, tuple[str, ...]]:
    """Whether ``data`` is a Structured Report, and the SOP Instance UIDs it is evidence of.

    The images an SR describes are listed in its Current Requested Procedure Evidence
    Sequence (0040,A375), by study, series and SOP instance (PS3.3 C.17.2). A bytes
    search for the SR SOP Class prefix keeps pydicom away from the (many) image files.
    """
    if _SR_MARKER not in data[:65536]:
        return False, ()
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    if not str(ds.get("SOPClassUID", "")).startswith(SR_SOP_CLASS_PREFIX):
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


def read_and_store(source: Source, client: OrthancClient) -> Outcome:
    """Read one file once, sniff it, send it, and classify the answer.

    Only this function holds the file's bytes, so memory stays bounded by the number
    of workers however many files there are. The first bytes are sniffed before the
    rest is read, so a large file that is not DICOM is never read whole.
    """
    try:
        head = source.head(HEAD_BYTES)
    except OSError as exc:  # SourceReadError included: a damaged zip or hostile member
        return Outcome(source.name, FAILED, _unreadable(exc))
    reason = passed_over_reason(head)
    if reason is not None:
        return Outcome(source.name, PASSED_OVER, reason, size=len(head))
    try:
        data = source.read_bytes()
    except (OSError, MemoryError) as exc:
        return Outcome(source.name, FAILED, _unreadable(exc))
    outcome = Outcome(source.name, FAILED, size=len(data), md5=hashlib.md5(data).hexdigest())
    try:
        outcome.is_sr, outcome.sr_references = sr_references(data)
    except Exception as exc:  # a damaged SR is still sent; Orthanc decides whether it is DICOM
        log.debug("%s: cannot read the SR's references: %s", source.name, exc)
    try:
        answer = client.store_instance(data)
    except OrthancUnavailable as exc:
        outcome.reason = str(exc)
        if exc.maybe_delivered:
            outcome.reason += "; Orthanc may have stored it before failing: run again to be sure"
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


def upload(
    sources: Sequence[Source],
    client: OrthancClient,
    workers: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Send every source from ``workers`` threads; outcomes come back in input order.

    ``on_done`` is called from the main thread as each file finishes (progress bar,
    log lines). :class:`CredentialsRefused` from any worker stops the whole run at once.
    """
    outcomes: list[Outcome | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload") as pool:
        futures: dict[Future[Outcome], int] = {
            pool.submit(read_and_store, source, client): index
            for index, source in enumerate(sources)
        }
        announced = False
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[futures[future]] = outcome
                if client.is_down and not announced:
                    announced = True
                    log.error(
                        "Orthanc at %s stopped answering (%s); files not yet sent are "
                        "marked failed without further attempts",
                        client.url,
                        client.down_reason,
                    )
                if on_done is not None:
                    on_done(outcome)
        except BaseException:
            # Wrong credentials, Ctrl-C: stop the queued uploads instead of sending them.
            client.stop("the run was stopped")
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [o for o in outcomes if o is not None]


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
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        md5_futures = {pool.submit(_stored_copy, client, i, by_id[i]): i for i in by_id}
        sr_futures = {pool.submit(_sr_placement, o, client): o for o in srs}
        for future in as_completed(md5_futures):
            instance_id = md5_futures[future]
            try:
                stored_md5, sop_instance_uid = future.result()
            except OrthancUnavailable as exc:
                for outcome in by_id[instance_id]:
                    outcome.problems.append(f"could not verify: {exc}")
                continue
            for outcome in by_id[instance_id]:
                _judge_md5(outcome, stored_md5, sop_instance_uid)
        for sr_future in as_completed(sr_futures):
            outcome = sr_futures[sr_future]
            try:
                verdict, message = sr_future.result()
            except OrthancUnavailable as exc:
                verdict, message = _SR_UNCHECKED, f"could not check the SR's study: {exc}"
            report.srs_checked += 1
            if verdict == _SR_IN_PLACE:
                report.srs_in_source_study += 1
            elif verdict == _SR_SOURCE_MISSING:
                report.srs_source_missing += 1
                log.warning("%s: %s", outcome.name, message)
            else:
                report.srs_misplaced += 1
                outcome.problems.append(message)
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
