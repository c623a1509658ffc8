"""A client for Orthanc's REST API on urllib3: pooled keep-alive connections, retries, clear errors.

:class:`OrthancClient` talks HTTP through one urllib3 pool of keep-alive connections,
shared by the upload and the verification that follows it. Retries are
:class:`urllib3.util.Retry`'s: connection errors, timeouts and 5xx answers are retried
with exponential backoff and jitter, never 4xx; 401/403 raise
:class:`CredentialsRefused` at once. TLS certificates are verified (the system's trust
store, or ``SSL_CERT_FILE``), and ``http_proxy``/``https_proxy``/``no_proxy`` are
honoured as by curl and requests, except for a loopback Orthanc, which no proxy can
reach on our behalf. Sending files and checking that they arrived is
:mod:`cxrsr.pacs.upload`'s job.

Library code: it raises, and the scripts decide what to print (it never imports
:mod:`cxrsr.cli`).

One module of about 650 lines on purpose: most of it is :class:`OrthancClient`, whose
retries, streamed bodies and error mapping share one connection pool and one policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from cxrsr import __version__
from cxrsr.config import OrthancSettings
from cxrsr.errors import PipelineError

log = logging.getLogger("cxrsr")

#: Exit code of :class:`OrthancFatalError`: the same number as ``cli.EXIT_FATAL``, which
#: this library module must not import (library code raises, scripts report).
_EXIT_FATAL = 3

#: Bytes read at a time when a stored file is read back from Orthanc and hashed.
READ_CHUNK = 256 * 1024

#: Answers retried: the server, or a proxy in front of it, cannot serve now.
_RETRIED_STATUSES = frozenset(range(500, 600))
#: Among those, the answers that say the server as a whole is unavailable: after the
#: retries they trip the circuit breaker. A 500 about one file says nothing about the
#: server as a whole.
_UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


class OrthancFatalError(PipelineError):
    """The run cannot go on at all (exit code 3): wrong credentials, no Orthanc at the URL."""

    exit_code = _EXIT_FATAL


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


class FileChanged(Exception):
    """A file being sent no longer has the size it had when it was hashed: it is being
    written. Not retried: what would be sent is not a finished file."""


class FileBody:
    """An open file sent as a request body, exactly ``size`` bytes of it.

    urllib3 streams a file-like body in blocks and rewinds it (``tell``/``seek``) for a
    retry. Reading through this wrapper raises :class:`FileChanged` when the file ends
    before ``size`` bytes, instead of leaving Orthanc waiting for bytes that never come.
    """

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self._start = fh.seek(0)
        self._sent = 0

    def read(self, amount: int = -1) -> bytes:
        left = self.size - self._sent
        if left <= 0:
            return b""
        data = self._fh.read(left if amount is None or amount < 0 else min(amount, left))
        if not data:
            raise FileChanged(
                f"the file shrank while being sent ({self._sent} of {self.size} bytes)"
            )
        self._sent += len(data)
        return data

    def tell(self) -> int:
        return self._sent

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("FileBody seeks from the start only")
        self._fh.seek(self._start + offset)
        self._sent = offset
        return offset


#: A request body: bytes in memory, or a file streamed from disk.
Body = bytes | bytearray | memoryview | FileBody


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
    The waits are urllib3's: the first retry at once (a kept-alive connection that the
    server had just closed is the commonest failure), then ``backoff`` seconds,
    doubling up to ``max_backoff``, plus up to ``jitter`` seconds at random so parallel
    workers do not retry in lockstep.
    """

    retries: int = 4
    """Attempts after the first one."""
    backoff: float = 0.5
    """Seconds before the second retry; doubled for each further retry."""
    max_backoff: float = 8.0
    jitter: float = 0.25


class _Attempts:
    """What the attempts of one request found: shared by the copies urllib3 makes of its Retry."""

    def __init__(self) -> None:
        self.count = 1
        self.maybe_delivered = False
        self.last_error = "no attempt made"


class _Stopped(Exception):
    """The circuit breaker tripped, or the request's deadline passed, while waiting to retry."""


class _Retry(urllib3.Retry):
    """urllib3's Retry that records each attempt and gives up when the breaker trips.

    urllib3 makes a new Retry object for every attempt (:meth:`new`); the shared
    :class:`_Attempts`, the breaker and the deadline travel with it. The backoff wait is
    an ``Event.wait`` on the breaker, so a request waiting to retry ends at once when
    another worker found the server gone, or the user pressed Ctrl-C.
    """

    attempts: _Attempts
    breaker: threading.Event
    deadline: float

    def new(self, **kw: Any) -> _Retry:
        retry: _Retry = super().new(**kw)
        retry.attempts, retry.breaker, retry.deadline = self.attempts, self.breaker, self.deadline
        return retry

    def increment(self, *args: Any, **kwargs: Any) -> _Retry:
        error = kwargs.get("error")
        response = kwargs.get("response")
        if error is not None:
            self.attempts.last_error = _describe_network_error(error)
            if not _before_sending(error):
                self.attempts.maybe_delivered = True
        elif response is not None:
            self.attempts.maybe_delivered = True
            self.attempts.last_error = f"HTTP {response.status}"
        retry: _Retry = super().increment(*args, **kwargs)
        self.attempts.count += 1
        return retry

    def _sleep_backoff(self) -> None:
        wait = self.get_backoff_time()
        if time.monotonic() + wait > self.deadline:
            raise _Stopped("its deadline would pass before the next attempt")
        if self.breaker.wait(wait) or self.breaker.is_set():
            raise _Stopped("the client was stopped")


class OrthancClient:
    """A thread-safe client for Orthanc's REST API, with keep-alive and retries.

    Connections are persistent (Orthanc's ``"KeepAlive": true`` in the project's
    ``orthanc.json``) and pooled by urllib3, up to ``connections`` of them: an upload
    costs one round trip instead of a TCP handshake plus a round trip, and the
    verification that follows an upload reuses the upload's connections.

    ``timeout`` bounds each attempt (connecting, and each wait for the server);
    ``deadline`` bounds a whole request, all attempts and backoff waits included.

    When a request runs out of retries because the server cannot be reached, the client
    marks the server as down (a circuit breaker): every later request fails at once
    instead of spending its own retries on a server that is known to be gone.
    """

    def __init__(
        self,
        settings: OrthancSettings,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        connections: int = 8,
        deadline: float = 300.0,
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
        self._has_credentials = username is not None or password is not None
        self._scheme = parsed.scheme
        self._host = parsed.hostname or ""
        netloc = parsed.netloc.rpartition("@")[2]
        path = urllib.parse.quote(parsed.path.rstrip("/"), safe="/%:@!$&'()*+,;=~")
        self._base = f"{parsed.scheme}://{netloc}{path}"
        self._headers = {"Accept": "application/json", "User-Agent": f"cxrsr/{__version__}"}
        if self._has_credentials:
            self._headers.update(
                urllib3.make_headers(basic_auth=f"{username or ''}:{password or ''}")
            )
        self.timeout = timeout
        self.deadline = deadline
        self.retry = retry or RetryPolicy()
        manager = self._manager = _pool_manager(parsed.scheme, self._host, connections)
        if isinstance(manager, urllib3.ProxyManager):
            # The proxy manager adds the proxy's headers and absolute-form targets itself.
            self._pool: urllib3.PoolManager | urllib3.HTTPConnectionPool = manager
            self._prefix = self._base
        else:
            # One pool for the one Orthanc: no URL parsing or pool lookup per request.
            self._pool = manager.connection_from_url(self._base)
            self._prefix = path
        self._down = threading.Event()
        self._lock = threading.Lock()
        self.down_reason: str | None = None
        self.keeps_md5: bool | None = None
        """Whether this Orthanc keeps an MD5 of each stored file (its
        ``StoreMD5ForAttachments``): ``None`` until a verification finds out
        (:func:`cxrsr.pacs.verify.verify`), which then checks every later file the way
        that works."""

    @property
    def proxy(self) -> str | None:
        """The proxy the requests go through (from the environment), or ``None``."""
        proxy = self._pool.proxy if isinstance(self._pool, urllib3.ProxyManager) else None
        return display_url(proxy.url) if proxy is not None else None

    def cleartext_credentials_warning(self) -> str | None:
        """Why sending the credentials is unsafe, or ``None``: Basic credentials over plain
        ``http://`` to another host can be read by anyone on the path."""
        if self._has_credentials and self._scheme == "http" and not is_loopback(self._host):
            return (
                f"the Orthanc password goes to {self._host} over plain http://, readable by "
                "anyone on the network path; use an https:// URL (Orthanc behind a TLS proxy)"
            )
        return None

    def close(self) -> None:
        """Close every pooled connection."""
        self._manager.clear()

    # -- requests ----------------------------------------------------------------

    @property
    def is_down(self) -> bool:
        """Whether the circuit breaker has tripped: the server stopped answering."""
        return self._down.is_set()

    def _new_retry(self, attempts: _Attempts) -> _Retry:
        policy = self.retry
        retry = _Retry(
            total=policy.retries,
            redirect=0,
            status_forcelist=_RETRIED_STATUSES,
            allowed_methods=None,  # POST /instances and /tools/lookup are safe to repeat
            backoff_factor=policy.backoff / 2,  # urllib3 waits factor * 2 ** (n - 1)
            backoff_max=policy.max_backoff,
            backoff_jitter=policy.jitter,
            raise_on_redirect=False,
            raise_on_status=False,
            respect_retry_after_header=False,  # our backoff, bounded; not a server-chosen wait
        )
        retry.attempts, retry.breaker = attempts, self._down
        retry.deadline = time.monotonic() + self.deadline
        return retry

    def request(
        self,
        method: str,
        path: str,
        body: Body | None = None,
        content_type: str | None = None,
    ) -> Response:
        """Send a request, retrying what a retry can fix; return any other answer.

        Retried: connection errors, timeouts and 5xx answers, as :class:`RetryPolicy`
        says. 401/403 raise :class:`CredentialsRefused`; other 4xx answers are returned
        to the caller. No usable answer raises :class:`OrthancUnavailable`.
        """
        answer, attempts = self._send(method, path, body, content_type, preload=True)
        return self._checked(Response(answer.status, answer.data), attempts)

    def _send(
        self,
        method: str,
        path: str,
        body: Body | None,
        content_type: str | None,
        preload: bool,
    ) -> tuple[urllib3.BaseHTTPResponse, _Attempts]:
        """One request with its retries; the answer's body is read only when ``preload``."""
        if self._down.is_set():
            raise OrthancUnavailable(
                f"Orthanc at {self.url} had stopped answering", attempted=False
            )
        headers = self._headers
        if content_type:
            headers = {**headers, "Content-Type": content_type}
        if isinstance(body, FileBody):
            headers = {**headers, "Content-Length": str(body.size)}
        attempts = _Attempts()
        try:
            answer = self._pool.urlopen(
                method,
                self._prefix + path,
                body=body,  # type: ignore[arg-type]
                headers=headers,
                retries=self._new_retry(attempts),
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
                preload_content=preload,
                redirect=False,
            )
        except MaxRetryError as exc:
            reason = _describe_network_error(exc.reason) if exc.reason else attempts.last_error
            self._trip(reason)
            raise OrthancUnavailable(
                f"no answer from Orthanc at {self.url} after {attempts.count} attempts: {reason}",
                attempts.maybe_delivered,
            ) from exc
        except _Stopped as exc:
            raise OrthancUnavailable(
                f"Orthanc at {self.url} stopped answering ({attempts.last_error}; {exc})",
                attempts.maybe_delivered,
            ) from exc
        except (HTTPError, OSError) as exc:  # an error urllib3 does not retry (TLS, ...)
            raise OrthancUnavailable(
                f"no answer from Orthanc at {self.url}: {_describe_network_error(exc)}",
                attempts.maybe_delivered,
            ) from exc
        return answer, attempts

    def _checked(self, response: Response, attempts: _Attempts) -> Response:
        """``response``, unless it is 401/403 (:class:`CredentialsRefused`) or 5xx
        (:class:`OrthancUnavailable`, tripping the breaker for 502/503/504)."""
        if response.status in (401, 403):
            raise CredentialsRefused(self._credentials_message(response.status))
        if response.status >= 500:
            last_error = f"HTTP {response.status}: {response.orthanc_message()}"
            if response.status in _UNAVAILABLE_STATUSES:
                self._trip(last_error)
            raise OrthancUnavailable(
                f"Orthanc answered {last_error} (after {attempts.count} attempts)", True
            )
        return response

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

        A :class:`FileBody` that shrinks while being sent raises :class:`FileChanged`,
        which is not retried.
        """
        return self.request("POST", "/instances", body=data, content_type="application/dicom")

    def attachment_md5(self, instance_id: str) -> str | None:
        """The MD5 Orthanc recorded for the stored DICOM file, or ``None`` when it has none.

        Orthanc computes it over the bytes it received (``"StorageCompression": false``
        in ``orthanc.json`` keeps them as sent), so it equals the sender's MD5 exactly
        when the file arrived intact. ``None`` (HTTP 404) means the instance is gone, or
        Orthanc keeps no MD5 (``"StoreMD5ForAttachments": false``):
        :meth:`stored_file_md5` tells the two apart.
        """
        answer = self.request("GET", f"/instances/{instance_id}/attachments/dicom/md5")
        if answer.status == 404:
            return None
        _expect_ok(answer, "reading an attachment's MD5")
        return answer.body.decode("ascii").strip().strip('"')

    def stored_file_md5(self, instance_id: str) -> tuple[str, int] | None:
        """The MD5 and size of the stored DICOM file, read back from Orthanc
        (``GET /instances/{id}/file``), or ``None`` if the instance is gone.

        The proof of integrity where Orthanc keeps no MD5 of its attachments: it costs a
        download of the file, streamed through a :data:`READ_CHUNK` buffer so that a
        large file is never held in memory.
        """
        answer, attempts = self._send(
            "GET", f"/instances/{instance_id}/file", None, None, preload=False
        )
        try:
            if answer.status != 200:
                response = self._checked(Response(answer.status, answer.read()), attempts)
                if response.status == 404:
                    return None
                _expect_ok(response, "reading a stored file")
            digest = hashlib.md5()
            size = 0
            for chunk in answer.stream(READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except (HTTPError, OSError) as exc:  # the connection broke, or the body ended early
            answer.close()  # never back into the pool with part of a body unread
            raise OrthancUnavailable(
                f"reading stored instance {instance_id} back from Orthanc at {self.url} "
                f"failed: {_describe_network_error(exc)}"
            ) from exc
        finally:
            answer.release_conn()
        return digest.hexdigest(), size

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


def _pool_manager(scheme: str, host: str, connections: int) -> urllib3.PoolManager:
    """A pool of up to ``connections`` keep-alive connections, through the environment's
    proxy when one applies (``http_proxy``/``https_proxy``, ``no_proxy``).

    A loopback Orthanc never goes through a proxy: a proxy elsewhere cannot reach this
    machine's loopback, and on this machine it would only add a hop.
    """
    # Large files are streamed in blocks of 1 MiB rather than urllib3's 16 kB: 64 times
    # fewer send calls, each of which costs Python-level work per block.
    options: dict[str, Any] = {
        "maxsize": connections,
        "block": True,
        "num_pools": 2,
        "blocksize": 1024 * 1024,
    }
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not is_loopback(host) and not urllib.request.proxy_bypass(host):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (``localhost``, 127/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    if any(c in url for c in "\r\n\t ") or any(ord(c) < 32 for c in url):
        return f"not a valid URL: {display_url(url)!r} (it holds white space or control characters)"
    return None


def _expect_ok(answer: Response, doing: str) -> None:
    if answer.status != 200:
        raise OrthancUnavailable(
            f"Orthanc answered HTTP {answer.status} when {doing}: {answer.orthanc_message()}"
        )


def _before_sending(error: BaseException) -> bool:
    """Whether ``error`` happened before any byte of the request could reach the server."""
    return isinstance(error, NewConnectionError | ConnectTimeoutError | NameResolutionError)


def _describe_network_error(exc: BaseException) -> str:
    """A short reason for a failed attempt, without urllib3's object reprs."""
    if isinstance(exc, NameResolutionError):
        return "host name not found"
    if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError, its base class
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(exc).lower():
            return "connection refused"
        return f"cannot connect ({cause or exc})"
    if isinstance(exc, ConnectTimeoutError):
        return "timed out connecting"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "timed out"
    if isinstance(exc, SSLError):
        return f"TLS error: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, ProtocolError):
        cause = exc.args[1] if len(exc.args) > 1 else None
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if cause is not None and type(cause).__name__ == "RemoteDisconnected":
            return "the server closed the connection without answering"
        return f"connection broken ({cause or exc})"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__
