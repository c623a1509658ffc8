"""The urllib3-based Orthanc client against scripted servers on loopback.

The upload tests cover the real Orthanc; these cover what a proxy or a broken server in
front of it may do, and what the client promises beyond Orthanc's happy path: TLS
verification, proxies from the environment, retries, deadlines, the circuit breaker,
exact file bodies, and the plain-http credentials warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from urllib3.exceptions import MaxRetryError, NewConnectionError

from cxrsr import __version__
from cxrsr.config import PROJECT_ROOT, OrthancSettings
from cxrsr.pacs.local_orthanc import free_port
from cxrsr.pacs.orthanc import (
    CredentialsRefused,
    FileBody,
    FileChanged,
    OrthancClient,
    OrthancFatalError,
    OrthancUnavailable,
    RetryPolicy,
    _Attempts,
    url_problem,
)

#: One scripted exchange: given the request's raw bytes (head and body), what to send
#: back, and whether to close the connection afterwards.
Script = Callable[[bytes], tuple[bytes, bool]]


def read_request(conn: socket.socket, pending: bytearray) -> bytes | None:
    """One whole request (head and Content-Length body) from ``conn``, or None at EOF."""
    while b"\r\n\r\n" not in pending:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        pending += chunk
    end = pending.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(pending[:end]).split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(pending) < end + length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        pending += chunk
    request = bytes(pending[: end + length])
    del pending[: end + length]
    return request


class ScriptedServer:
    """Accepts connections and answers each request with the next script in the list."""

    def __init__(self, scripts: list[Script], tls: ssl.SSLContext | None = None) -> None:
        self.scripts = list(scripts)
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.scripts:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except OSError:  # the client refused the certificate
                    conn.close()
                    continue
            with conn:
                pending = bytearray()
                while self.scripts:
                    request = read_request(conn, pending)
                    if request is None:
                        break
                    self.requests.append(request)
                    answer, close = self.scripts.pop(0)(request)
                    conn.sendall(answer)
                    if close:
                        break

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(scripts: list[Script], tls: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(scripts, tls))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def answer(raw: bytes, close: bool = False) -> Script:
    return lambda request: (raw, close)


OK_JSON = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'
)


def client_for(server: ScriptedServer, scheme: str = "http", **options: object) -> OrthancClient:
    settings = OrthancSettings(f"{scheme}://127.0.0.1:{server.port}", "u", "p")
    return OrthancClient(settings, **options)  # type: ignore[arg-type]


FAST = RetryPolicy(retries=2, backoff=0.05, max_backoff=0.1, jitter=0.0)


def test_keep_alive_one_connection_for_many_requests(serve: Callable) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"Version": "1"}'
    server = serve([answer(raw)] * 3)
    client = client_for(server)
    for _ in range(3):
        assert client.system() == {"Version": "1"}
    assert server.connections == 1
    assert all(b"\r\nauthorization: Basic dTpw\r\n" in r for r in server.requests)
    assert all(f"\r\nUser-Agent: cxrsr/{__version__}\r\n".encode() in r for r in server.requests)


def test_client_reconnects_when_an_idle_connection_was_closed(serve: Callable) -> None:
    """Orthanc closes idle keep-alive connections after a second; a request on such a
    connection fails, and the client must send it again on a new one at once."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"Version": "1"}'
    server = serve([answer(raw), answer(b"", close=True), answer(raw)])
    # Any wait before the retry would be 600 s, beyond the request's 300 s deadline, so
    # the request would fail at once instead: succeeding proves the retry did not wait.
    patient = RetryPolicy(retries=1, backoff=600.0, max_backoff=600.0)
    client = client_for(server, retry=patient, deadline=300.0)
    assert client.system() == {"Version": "1"}
    assert client.system() == {"Version": "1"}  # first attempt met the closed connection
    assert server.connections == 2


def test_file_body_is_sent_byte_for_byte(serve: Callable, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MB and a bit: many send blocks
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    server = serve([answer(OK_JSON)])
    with open(path, "rb") as fh:
        assert client_for(server).store_instance(FileBody(fh, len(data))).status == 200
    request = server.requests[0]
    assert f"Content-Length: {len(data)}\r\n".encode() in request
    assert b"Content-Type: application/dicom\r\n" in request
    assert request.endswith(b"\r\n\r\n" + data)


def test_file_that_shrank_is_file_changed_not_retried(serve: Callable, tmp_path: Path) -> None:
    path = tmp_path / "body.bin"
    path.write_bytes(b"x" * 100_000)
    server = serve([answer(OK_JSON)] * 3)
    client = client_for(server)
    with open(path, "rb") as fh, pytest.raises(FileChanged, match="shrank"):
        client.store_instance(FileBody(fh, 200_000))
    # The server takes connections in turn: by the time this next request is answered,
    # it has seen any retry of the shrunk file, which would be one more connection.
    assert client.request("GET", "/system").status == 200
    assert server.connections == 2  # the shrunk file's, and this request's
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # truncated body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"garbage, not HTTP\r\n\r\n",
    ],
)
def test_malformed_answers_are_retried_then_unavailable(serve: Callable, raw: bytes) -> None:
    server = serve([answer(raw, close=True)] * 3)
    with pytest.raises(OrthancUnavailable, match="after 3 attempts") as caught:
        client_for(server, retry=FAST).request("GET", "/system")
    assert caught.value.maybe_delivered


def test_5xx_is_retried_and_4xx_is_not(serve: Callable) -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"Version": "1"}'
    server = serve([answer(busy), answer(busy), answer(ok)])
    assert client_for(server, retry=FAST).system() == {"Version": "1"}
    assert len(server.requests) == 3
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    server = serve([answer(missing)] * 3)
    assert client_for(server, retry=FAST).request("GET", "/instances/x").status == 404
    assert len(server.requests) == 1
    refused = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    server = serve([answer(refused)] * 3)
    with pytest.raises(CredentialsRefused, match="refused the credentials for user 'u'"):
        client_for(server, retry=FAST).system()
    assert len(server.requests) == 1


def test_a_server_that_never_answers_ends_at_the_deadline() -> None:
    """A per-attempt timeout alone lets retries add up; the deadline bounds the request.

    Attempts of 0.5 s, waits of 0.2 s (none before the first retry) and a 2 s deadline
    leave room for at most 4 attempts (at 0, 0.5, 1.2 and 1.9 s), fewer on a slow
    machine; without the deadline there would be 51. Each attempt is a new connection,
    counted in the listener's queue afterwards, so no clock is read here.
    """
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        port = silent.getsockname()[1]
        client = OrthancClient(
            OrthancSettings(f"http://127.0.0.1:{port}", None, None),
            timeout=0.5,
            retry=RetryPolicy(retries=50, backoff=0.2, max_backoff=0.2, jitter=0.0),
            deadline=2.0,
        )
        with pytest.raises(OrthancUnavailable, match="deadline"):
            client.request("GET", "/system")
        silent.setblocking(False)
        attempts = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                silent.accept()[0].close()
                attempts += 1
        assert 1 <= attempts <= 4


class _OnRetry(logging.Handler):
    """Sets ``event`` when urllib3 announces a retry (after its wait, before the attempt)."""

    def __init__(self, event: threading.Event) -> None:
        super().__init__()
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Retrying"):
            self.event.set()


def test_stop_ends_a_request_waiting_to_retry_and_later_ones_are_not_sent() -> None:
    """Each wait before a retry is a million seconds: the request ends only because
    ``stop`` cuts the wait short, called once the first attempt was refused."""
    port = free_port()
    client = OrthancClient(
        OrthancSettings(f"http://127.0.0.1:{port}", None, None),
        retry=RetryPolicy(retries=5, backoff=1e6, max_backoff=1e6, jitter=0.0),
        deadline=1e7,
    )
    retrying = threading.Event()
    handler = _OnRetry(retrying)
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    urllib3_log.addHandler(handler)
    raised: list[BaseException] = []

    def refused_then_waiting() -> None:
        try:
            client.request("GET", "/system")  # refused, retried at once, then waits
        except BaseException as exc:
            raised.append(exc)

    requester = threading.Thread(target=refused_then_waiting, daemon=True)
    try:
        requester.start()
        assert retrying.wait(60), "the first attempt was never retried"
        client.stop("stopped by the test")
        requester.join(60)
    finally:
        urllib3_log.removeHandler(handler)
    assert not requester.is_alive(), "stop did not end the wait before the retry"
    (first,) = raised
    assert isinstance(first, OrthancUnavailable) and "stopped" in str(first)
    assert not first.maybe_delivered  # refused connections carry no request
    with pytest.raises(OrthancUnavailable) as later:
        client.request("GET", "/system")
    assert not later.value.attempted


def test_default_retries_wait_at_most_the_documented_time() -> None:
    """upload_dicom.py --help promises: the first retry at once, then 0.5, 1, 2 s plus up to
    0.25 s of jitter each, at most 4.25 s in all for the default 4 retries."""
    client = OrthancClient(OrthancSettings("http://127.0.0.1:9", None, None))
    retry = client._new_retry(_Attempts())
    waits = []
    for _ in range(client.retry.retries):
        retry = retry.increment("GET", "/system", error=NewConnectionError(None, "refused"))  # type: ignore[arg-type]
        waits.append(retry.get_backoff_time())
    for wait, base in zip(waits, (0.0, 0.5, 1.0, 2.0), strict=True):
        assert base <= wait <= base + (0.25 if base else 0.0)
    assert sum(waits) <= 4.25
    with pytest.raises(MaxRetryError):
        retry.increment("GET", "/system", error=NewConnectionError(None, "refused"))  # type: ignore[arg-type]


def test_stored_file_is_read_back_in_chunks_and_a_short_one_is_unavailable(
    serve: Callable,
) -> None:
    """What verification reads where Orthanc keeps no MD5: the whole file, hashed as it
    streams in; 404 for an instance that is gone; a body cut short is no answer, and its
    connection is not reused."""
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MB and a bit: several read chunks
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n"
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    server = serve(
        [
            answer(head % len(data) + data),
            answer(missing),
            answer(head % len(data) + data[:1000], close=True),
            answer(OK_JSON),
        ]
    )
    client = client_for(server, retry=FAST)
    assert client.stored_file_md5("a") == (hashlib.md5(data).hexdigest(), len(data))
    assert client.stored_file_md5("b") is None
    with pytest.raises(OrthancUnavailable, match="reading stored instance c back"):
        client.stored_file_md5("c")
    assert client.request("GET", "/system").status == 200
    assert [r.split(b"\r\n")[0] for r in server.requests] == [
        b"GET /instances/a/file HTTP/1.1",
        b"GET /instances/b/file HTTP/1.1",
        b"GET /instances/c/file HTTP/1.1",
        b"GET /system HTTP/1.1",
    ]
    assert server.connections == 2


def test_http_proxy_from_the_environment_is_used_but_not_for_loopback(
    serve: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"Version": "1"}'
    proxy = serve([answer(raw)])
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    remote = OrthancClient(OrthancSettings("http://pacs.invalid:8042", "u", "p"))
    assert remote.proxy == f"http://127.0.0.1:{proxy.port}"
    assert remote.system() == {"Version": "1"}
    # The proxy got the absolute-form request for the remote Orthanc (RFC 9112 3.2.2).
    assert proxy.requests[0].startswith(b"GET http://pacs.invalid:8042/system HTTP/1.1\r\n")
    monkeypatch.setenv("no_proxy", "pacs.invalid")
    assert OrthancClient(OrthancSettings("http://pacs.invalid:8042", "u", "p")).proxy is None
    monkeypatch.delenv("no_proxy")
    assert OrthancClient(OrthancSettings("http://127.0.0.1:8042", "u", "p")).proxy is None
    assert OrthancClient(OrthancSettings("http://localhost:8042", "u", "p")).proxy is None


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://pacs.example.org:8042", True),
        ("http://10.1.2.3:8042", True),
        ("https://pacs.example.org", False),
        ("http://127.0.0.1:8042", False),
        ("http://[::1]:8042", False),
        ("http://localhost:8042", False),
    ],
)
def test_credentials_over_plain_http_to_another_host_are_warned_of(url: str, warned: bool) -> None:
    client = OrthancClient(OrthancSettings(url, "u", "p"))
    assert (client.cleartext_credentials_warning() is not None) == warned
    assert OrthancClient(OrthancSettings(url, None, None)).cleartext_credentials_warning() is None


def test_upload_dicom_warns_once_before_sending_credentials_in_clear(tmp_path: Path) -> None:
    """TEST-NET-1 (RFC 5737) is never routed: the connection times out, exit 3."""
    env = dict(
        os.environ,
        ORTHANC_URL="http://192.0.2.1:8042",
        ORTHANC_USERNAME="u",
        ORTHANC_PASSWORD="pw-s3cret",
    )
    (tmp_path / "x.dcm").write_bytes(b"")
    result = subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "upload_dicom.py"),
            "--timeout",
            "0.5",
            "--retries",
            "0",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("W: ")]
    assert warnings == [
        "W: the Orthanc password goes to 192.0.2.1 over plain http://, readable by anyone "
        "on the network path; use an https:// URL (Orthanc behind a TLS proxy)"
    ]
    assert "pw-s3cret" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "bad", ["http://h:1/a\r\nX-Injected: 1", "http://h:1/a b", "http://h:1/\x00"]
)
def test_urls_with_control_characters_are_refused(bad: str) -> None:
    assert url_problem(bad) is not None
    with pytest.raises(OrthancFatalError):
        OrthancClient(OrthancSettings(bad, None, None))


def test_the_rest_client_does_not_import_the_cli() -> None:
    """Library code raises, scripts report: cxrsr.pacs.orthanc must not pull in cxrsr.cli."""
    code = "import sys, cxrsr.pacs.orthanc, cxrsr.pacs.upload; print('cxrsr.cli' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 made with openssl, and a server context that uses it."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed (test.sh installs it)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(command, check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    return cert, tls


def test_https_with_a_file_body_through_the_client(
    serve: Callable,
    self_signed: tuple[Path, ssl.SSLContext],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Orthanc behind a TLS proxy: the client verifies the certificate (a self-signed one,
    trusted through SSL_CERT_FILE) and a large file goes through TLS byte for byte."""
    cert, tls = self_signed
    body = b'{"Status": "Success"}'
    server = serve([answer(b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n" + body)], tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    client = client_for(server, "https")
    assert client.cleartext_credentials_warning() is None
    data = bytes(range(256)) * 2048  # 512 kB
    path = tmp_path / "body.dcm"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        stored = client.store_instance(FileBody(fh, len(data)))
    assert (stored.status, stored.json()) == (200, {"Status": "Success"})
    assert server.requests[0].startswith(b"POST /instances HTTP/1.1\r\n")
    assert server.requests[0].endswith(b"\r\n\r\n" + data)


def test_https_refuses_an_untrusted_certificate(
    serve: Callable, self_signed: tuple[Path, ssl.SSLContext]
) -> None:
    server = serve([answer(OK_JSON)] * 3, tls=self_signed[1])
    with pytest.raises(OrthancFatalError, match="certificate verify failed"):
        client_for(server, "https", retry=FAST).system()
    assert server.requests == []  # nothing, credentials included, went to that server
