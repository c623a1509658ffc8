"""Where a DICOM peer listens, who we are to it, and the TLS contexts of DICOM TLS
(PS3.15 B.1) for our associations and for the one the peer opens to us."""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """Where the PACS listens and who we are to it."""

    host: str
    port: int
    called_aet: str = "ANY-SCP"
    calling_aet: str = "CXRSR"
    listen_port: int | None = None
    """Where we accept the peer's N-EVENT-REPORT on an association of its own."""
    timeout: float = 30.0
    tls: ssl.SSLContext | None = None
    """Client side of DICOM TLS for our associations."""
    tls_server: ssl.SSLContext | None = None
    """Server side of DICOM TLS for the association the peer opens to ``listen_port``."""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def tls_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client TLS context for DICOM TLS (PS3.15 B.1): the peer checked against ``ca``
    (else the system's), our certificate and key presented when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def tls_server_context(ca: str | None, cert: str, key: str | None) -> ssl.SSLContext:
    """A server TLS context for the peer's storage commitment report: our certificate,
    and the peer's required and checked against ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context
