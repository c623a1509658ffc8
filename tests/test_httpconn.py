"""The minimal HTTP/1.1 client against a scripted server on loopback.

Orthanc itself only ever answers with ``Content-Length`` bodies on kept-alive
connections (the upload tests cover that against the real server); these tests cover
what a proxy in front of Orthanc may do instead: chunked bodies, bodies delimited by
closing the connection, interim 100 answers, closing idle connections.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cxrsr import httpconn
from cxrsr.config import OrthancSettings
from cxrsr.orthanc import OrthancClient

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


def connection(server: ScriptedServer) -> httpconn.Connection:
    return httpconn.Connection("127.0.0.1", server.port, timeout=5)


def test_content_length_answers_keep_the_connection(serve: Callable) -> None:
    server = serve([answer(OK_JSON), answer(OK_JSON)])
    conn = connection(server)
    first = conn.request("GET", "/system")
    second = conn.request("GET", "/system")
    assert (first.status, first.body, second.body) == (200, b'{"ok": true}', b'{"ok": true}')
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /system HTTP/1.1\r\nHost: 127.0.0.1:")


def test_chunked_answer_with_extensions_and_trailer(serve: Callable) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=value\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n"
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    server = serve([answer(raw), answer(OK_JSON)])
    conn = connection(server)
    assert conn.request("GET", "/a").body == b"Wikipedia in \r\n\r\nchunks."
    assert conn.request("GET", "/b").status == 200  # the trailer was consumed in full
    assert server.connections == 1


def test_interim_100_answer_is_skipped(serve: Callable) -> None:
    server = serve([answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_JSON)])
    assert connection(server).request("POST", "/instances", body=b"x").status == 200


def test_close_delimited_http_1_0_answer(serve: Callable) -> None:
    server = serve([answer(b"HTTP/1.0 200 OK\r\n\r\nall of it", close=True)])
    conn = connection(server)
    response = conn.request("GET", "/")
    assert (response.body, response.will_close, conn.is_open) == (b"all of it", True, False)


def test_connection_close_header_closes_after_the_body(serve: Callable) -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    server = serve([answer(raw, close=True)])
    conn = connection(server)
    assert conn.request("GET", "/").body == b"ok"
    assert not conn.is_open


def test_server_closing_without_answer_is_remote_disconnected(serve: Callable) -> None:
    server = serve([answer(b"", close=True)])
    conn = connection(server)
    with pytest.raises(httpconn.RemoteDisconnected, match="without answering"):
        conn.request("GET", "/")
    assert not conn.is_open


def test_truncated_body_is_remote_disconnected_mid_answer(serve: Callable) -> None:
    server = serve([answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", close=True)])
    with pytest.raises(httpconn.RemoteDisconnected, match="mid-answer"):
        connection(server).request("GET", "/")


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (httpconn.MAX_HEADER_BYTES + 10),
    ],
    ids=["not-http", "bad-length", "bad-header", "bad-chunk", "huge-header"],
)
def test_malformed_answers_are_protocol_errors(serve: Callable, raw: bytes) -> None:
    server = serve([answer(raw, close=True)])
    conn = connection(server)
    with pytest.raises(httpconn.ProtocolError):
        conn.request("GET", "/")
    assert not conn.is_open


def test_file_body_is_sent_byte_for_byte(serve: Callable, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MB and a bit: several sendfile blocks
    path = tmp_path / "body.bin"
    path.write_bytes(data)
    server = serve([answer(OK_JSON)])
    with open(path, "rb") as fh:
        body = httpconn.FileBody(fh, len(data))
        assert connection(server).request("POST", "/instances", body=body).status == 200
    request = server.requests[0]
    assert f"Content-Length: {len(data)}\r\n".encode() in request
    assert request.endswith(b"\r\n\r\n" + data)


def test_file_that_shrank_is_file_changed_and_closes(serve: Callable, tmp_path: Path) -> None:
    path = tmp_path / "body.bin"
    path.write_bytes(b"x" * 100_000)
    server = serve([answer(OK_JSON)])
    conn = connection(server)
    with open(path, "rb") as fh, pytest.raises(httpconn.FileChanged, match="shrank"):
        conn.request("POST", "/instances", body=httpconn.FileBody(fh, 200_000))
    assert not conn.is_open  # the server still waits for the promised bytes


def test_client_reconnects_once_when_an_idle_connection_was_closed(serve: Callable) -> None:
    """Orthanc closes idle keep-alive connections after a second; the next request on
    that connection fails, and the client must send it again on a new one at once."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n" + b'{"Version": "1"}'
    server = serve([answer(raw), answer(b"", close=True), answer(raw)])
    client = OrthancClient(OrthancSettings(f"http://127.0.0.1:{server.port}", "u", "p"))
    assert client.system() == {"Version": "1"}
    assert client.system() == {"Version": "1"}  # first attempt met the closed connection
    assert server.connections == 2
    assert all(b"Authorization: Basic dTpw\r\n" in r for r in server.requests)


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
    trusted through SSL_CERT_FILE) and a large file goes through TLS, where the kernel's
    sendfile cannot be used, byte for byte."""
    cert, tls = self_signed
    body = b'{"Status": "Success"}'
    server = serve([answer(b"HTTP/1.1 200 OK\r\nContent-Length: 21\r\n\r\n" + body)], tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    client = OrthancClient(OrthancSettings(f"https://127.0.0.1:{server.port}", "u", "p"))
    data = bytes(range(256)) * 2048  # 512 kB
    path = tmp_path / "body.dcm"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        stored = client.store_instance(httpconn.FileBody(fh, len(data)))
    assert (stored.status, stored.json()) == (200, {"Status": "Success"})
    assert server.requests[0].startswith(b"POST /instances HTTP/1.1\r\n")
    assert server.requests[0].endswith(b"\r\n\r\n" + data)


def test_https_refuses_an_untrusted_certificate(
    serve: Callable, self_signed: tuple[Path, ssl.SSLContext]
) -> None:
    server = serve([answer(OK_JSON)], tls=self_signed[1])
    conn = httpconn.Connection("127.0.0.1", server.port, 5, ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/system")
    assert not conn.is_open
