"""A client for Orthanc's REST API: keep-alive connections, retries, clear errors.

:class:`OrthancClient` talks HTTP: one keep-alive connection per worker thread,
retries with exponential backoff and jitter for connection errors, timeouts and
5xx answers, never for 4xx; 401/403 raise :class:`CredentialsRefused` at once.
Sending files and checking that they arrived is :mod:`cxrsr.upload`'s job.

The client speaks HTTP through :mod:`cxrsr.httpconn` rather than ``requests`` or
``http.client``: on this project's 2-core benchmark machine, where Orthanc competes
with the client for CPU, client CPU is upload time. ``requests`` cost about twice the
client CPU of ``http.client`` per upload, and ``http.client`` twice that of
:mod:`cxrsr.httpconn` per request (70 µs against 33 µs; see ``bench/bench_upload.py``).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cxrsr import httpconn
from cxrsr.cli import EXIT_FATAL
from cxrsr.config import OrthancSettings
from cxrsr.errors import PipelineError

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("cxrsr")

#: A request body: bytes in memory, or an open file sent with ``sendfile``.
Body = bytes | bytearray | memoryview | httpconn.FileBody

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
        import random  # only when retrying: importing it costs every run 1-4 ms

        base = min(self.max_backoff, self.backoff * 2**retry)
        return base * random.uniform(0.5, 1.0)


class OrthancClient:
    """A thread-safe client for Orthanc's REST API, with keep-alive and retries.

    Connections are persistent (Orthanc's ``"KeepAlive": true`` in the project's
    ``orthanc.json``) and pooled: a request takes an idle connection or opens one, and
    gives it back afterwards, so an upload costs one round trip instead of a TCP
    handshake plus a round trip, and the verification that follows an upload reuses
    the upload's connections.

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
        self._base_path = urllib.parse.quote(parsed.path.rstrip("/"), safe="/%:@!$&'()*+,;=~")
        headers = "Accept: application/json\r\n"
        if username is not None or password is not None:
            token = f"{username or ''}:{password or ''}".encode()
            headers += "Authorization: Basic " + base64.b64encode(token).decode("ascii") + "\r\n"
        self._headers = headers.encode("ascii")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._ssl_context: ssl.SSLContext | None = None
        self._idle: list[httpconn.Connection] = []
        self._lock = threading.Lock()
        self._down = threading.Event()
        self.down_reason: str | None = None

    # -- connections -------------------------------------------------------------

    def _acquire(self) -> tuple[httpconn.Connection, bool]:
        """An idle open connection (most recently used first) and ``True``, or a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.is_open:
                    return conn, True
            if self._https and self._ssl_context is None:
                import ssl  # only for https: importing it costs a plain-http run 4 ms

                self._ssl_context = ssl.create_default_context()
        return httpconn.Connection(self._host, self._port, self.timeout, self._ssl_context), False

    def _release(self, conn: httpconn.Connection) -> None:
        if conn.is_open:
            with self._lock:
                self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection (each request gives its connection back when done)."""
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()

    # -- requests ----------------------------------------------------------------

    @property
    def is_down(self) -> bool:
        """Whether the circuit breaker has tripped: the server stopped answering."""
        return self._down.is_set()

    def _send_once(
        self,
        conn: httpconn.Connection,
        method: str,
        path: str,
        body: Body | None,
        content_type: str | None,
    ) -> Response:
        """One attempt; the connection closes itself on error and goes back to the pool."""
        headers = self._headers
        if content_type:
            headers += f"Content-Type: {content_type}\r\n".encode("ascii")
        try:
            answer = conn.request(method, self._base_path + path, headers, body)
        finally:
            self._release(conn)
        return Response(answer.status, answer.body)

    def request(
        self,
        method: str,
        path: str,
        body: Body | None = None,
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
            conn, reused = self._acquire()
            try:
                answer = self._send_once(conn, method, path, body, content_type)
            except OSError as exc:
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

    def store_instance(self, data: Body) -> Response:
        """``POST /instances`` with the file as the body (retried as :meth:`request`).

        A :class:`~cxrsr.httpconn.FileBody` that shrinks while being sent raises
        :class:`~cxrsr.httpconn.FileChanged`, which is not retried.
        """
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
    if isinstance(exc, httpconn.RemoteDisconnected | httpconn.ProtocolError):
        return str(exc)
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc.strerror})"
    return str(exc) or type(exc).__name__
