"""OHIF v3 in front of Orthanc, on this machine: a small server for the prebuilt viewer.

OHIF is a static web app that reads studies over DICOMweb. This module serves the app
from npm's prebuilt ``@ohif/app`` package and forwards ``/dicom-web`` to Orthanc's
DICOMweb plugin on the same origin, so the browser needs no CORS and Orthanc needs no
extra configuration. Facts this rests on (see "Viewing in OHIF" in docs/deployment.md):

- the app routes on the client (``/viewer``, ``/``): unknown paths get ``index.html``;
- WebAssembly decoders must be served as ``application/wasm``;
- ``/app-config.js`` is the app's configuration: ours names one DICOMweb source,
  ``/dicom-web``, with the options Orthanc's plugin supports.

Logins: the server holds no password. It asks the browser for HTTP Basic credentials,
checks them against Orthanc (``GET /system``), and forwards them with every DICOMweb
request, so the viewer shows exactly what that Orthanc user may see, and other users of
this machine cannot read studies through it. It listens on loopback only.

Command line::

    python -m tools.ohif [--port 3000] [--dist DIR]     # fetches the viewer with npm if needed
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import mimetypes
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import urllib3

from cxrsr import cli
from cxrsr.config import orthanc_settings
from cxrsr.errors import PipelineError

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: SHA-256 of ``npm pack @ohif/app@3.13.2`` (49,906,651 bytes), checked before unpacking.
OHIF_TARBALL_SHA256 = "b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"
DEFAULT_CACHE = Path.home() / ".cache" / "cxrsr"

#: The app's configuration: one DICOMweb data source on this origin, Orthanc's plugin
#: options (no includefield in QIDO, WADO-RS rendering, bulk data URIs), and no
#: investigational-use dialog or onboarding tour covering the viewport.
APP_CONFIG = {
    "routerBasename": "/",
    "extensions": [],
    "modes": [],
    "showStudyList": True,
    "maxNumberOfWebWorkers": 3,
    "showLoadingIndicator": True,
    "investigationalUseDialog": {"option": "never"},
    "customizationService": {"ohif.tours": {"$set": []}},
    "defaultDataSourceName": "orthanc",
    "dataSources": [
        {
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "orthanc",
            "configuration": {
                "friendlyName": "cxrsr Orthanc",
                "name": "orthanc",
                "qidoRoot": "/dicom-web",
                "wadoRoot": "/dicom-web",
                "wadoUriRoot": "/dicom-web",
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "omitQuotationForMultipartRequest": True,
                "bulkDataURI": {"enabled": True},
            },
        }
    ],
}

_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript"}


def ensure_ohif_dist(cache: Path = DEFAULT_CACHE) -> Path:
    """The prebuilt viewer's ``dist/`` folder, fetched once with ``npm pack`` into ``cache``.

    The tarball is checked against :data:`OHIF_TARBALL_SHA256` and only ``package/dist``
    is unpacked (with tarfile's ``data`` filter: no links out, no absolute paths). npm's
    own download cache is ``cache/npm`` (not ``~/.npm``), used before the registry
    (``--prefer-offline``), so everything fetched stays in one folder and unpacking again
    needs no network.
    """
    target = Path(cache) / f"ohif-app-{OHIF_VERSION}"
    dist = target / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise PipelineError(
            "npm not found: install Node.js's npm (apt-get install npm) to fetch the OHIF viewer",
            exit_code=3,
        )
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        done = subprocess.run(
            [
                npm,
                "pack",
                f"{OHIF_PACKAGE}@{OHIF_VERSION}",
                "--pack-destination",
                scratch,
                "--cache",
                str(Path(cache) / "npm"),
                "--prefer-offline",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        tarballs = list(Path(scratch).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise PipelineError(
                f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {done.stderr.strip()[-500:]}",
                exit_code=3,
            )
        with open(tarballs[0], "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if digest != OHIF_TARBALL_SHA256:
            raise PipelineError(
                f"{OHIF_PACKAGE}@{OHIF_VERSION}: SHA-256 {digest} is not the pinned "
                f"{OHIF_TARBALL_SHA256}",
                exit_code=3,
            )
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(unpacked, members=members, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return dist


class OhifServer(http.server.ThreadingHTTPServer):
    """The viewer's files and a ``/dicom-web`` forward to ``orthanc_url``, on loopback."""

    daemon_threads = True

    def __init__(self, dist: Path, orthanc_url: str, port: int = 0) -> None:
        self.dist = Path(dist).resolve()
        parts = urlsplit(orthanc_url)
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc += f":{parts.port}"
        self.orthanc = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
        self.http = urllib3.PoolManager(
            maxsize=16, timeout=urllib3.Timeout(connect=10, read=120), retries=False
        )
        self.app_config = ("window.config = " + json.dumps(APP_CONFIG, indent=2) + ";\n").encode()
        self._logins: dict[str, bool] = {}
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def login_ok(self, authorization: str) -> bool:
        """Whether Orthanc accepts ``authorization`` (asked once per distinct header)."""
        key = hashlib.sha256(authorization.encode()).hexdigest()
        with self._lock:
            if key in self._logins:
                return self._logins[key]
        headers = {"Authorization": authorization} if authorization else {}
        try:
            status = self.http.request("GET", f"{self.orthanc}/system", headers=headers).status
        except urllib3.exceptions.HTTPError:
            return False  # Orthanc down: ask again next time
        with self._lock:
            self._logins[key] = status == 200
        return status == 200


class _Handler(http.server.BaseHTTPRequestHandler):
    server: OhifServer
    server_version = "cxrsr-ohif"

    def log_message(self, format: str, *args: object) -> None:
        cli.log.debug("ohif: " + format, *args)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if not self.server.login_ok(self.headers.get("Authorization", "")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="Orthanc login", charset="UTF-8"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/dicom-web" or path.startswith("/dicom-web/"):
            self._forward()
        elif path == "/app-config.js":
            self._reply(200, "text/javascript", self.server.app_config)
        else:
            self._static(path)

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        candidate = (dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(dist):
            self._reply(404, "text/plain", b"not found\n")
            return
        if not candidate.is_file():
            if "." in Path(path).name:  # a missing asset, not a client-side route
                self._reply(404, "text/plain", b"not found\n")
                return
            candidate = dist / "index.html"
        content_type = _TYPES.get(candidate.suffix) or (
            mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        )
        with open(candidate, "rb") as fh:
            size = candidate.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            shutil.copyfileobj(fh, self.wfile, 1 << 20)

    def _forward(self) -> None:
        headers = {
            name: self.headers[name]
            for name in ("Accept", "Authorization", "Accept-Encoding")
            if name in self.headers
        }
        try:
            answer = self.server.http.request(
                "GET",
                self.server.orthanc + self.path,
                headers=headers,
                preload_content=False,
                decode_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            self._reply(502, "text/plain", f"Orthanc did not answer: {exc}\n".encode())
            return
        try:
            self.send_response(answer.status)
            for name in ("Content-Type", "Content-Length", "Content-Encoding"):
                if name in answer.headers:
                    self.send_header(name, answer.headers[name])
            self.end_headers()
            for chunk in answer.stream(1 << 16, decode_content=False):
                self.wfile.write(chunk)
        finally:
            answer.release_conn()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(
        "python -m tools.ohif",
        description="Serve the OHIF viewer on 127.0.0.1, reading studies from Orthanc's "
        "DICOMweb plugin at ORTHANC_URL (from the environment or .env). Log in with the "
        "Orthanc user and password.",
        fatal_reasons="the viewer cannot be fetched, or the port is taken",
    )
    parameters = parser.add_argument_group("parameters")
    parameters.add_argument("--port", type=cli.positive_int, default=3000, metavar="N")
    parameters.add_argument(
        "--dist",
        type=Path,
        metavar="DIR",
        help=f"an unpacked OHIF dist/ folder (default: fetch {OHIF_PACKAGE}@{OHIF_VERSION} "
        f"with npm into {DEFAULT_CACHE})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args)
    dist = args.dist or ensure_ohif_dist()
    settings = orthanc_settings()
    try:
        server = OhifServer(dist, settings.url, args.port)
    except OSError as exc:
        raise PipelineError(f"cannot listen on 127.0.0.1:{args.port}: {exc}", exit_code=3) from exc
    cli.log.info(
        "OHIF at %s/ reading %s/dicom-web (log in as the Orthanc user); Ctrl-C stops it",
        server.url,
        server.orthanc,
    )
    with server:
        server.serve_forever()
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
