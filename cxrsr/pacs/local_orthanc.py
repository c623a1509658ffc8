"""Start and stop a local Orthanc binary from the project's own ``orthanc.json``.

Used where no Docker engine runs: by ``run.sh`` (Debian's ``orthanc`` package) and by
the tests and benchmarks. Only ports, storage paths, plugin folders and the network
exposure are overridden; everything else is the project's configuration. The
credentials are written into the generated configuration (owner-only) as JSON strings
rather than through the ``${ORTHANC_PASSWORD}`` that ``orthanc.json`` references:
Orthanc substitutes environment variables into the configuration's text before parsing
it as JSON, so a password holding ``"`` or ``\\`` would break it.

Command line (for run.sh)::

    python -m cxrsr.pacs.local_orthanc start --dir .orthanc --http-port 8042 --dicom-port 4242
    python -m cxrsr.pacs.local_orthanc stop --dir .orthanc

With ``--postgres DIR`` the index is in the PostgreSQL cluster that
``python -m cxrsr.pacs.local_postgres start --dir DIR`` runs (see that module).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs.claims import CLAIM_METADATA, CLAIM_METADATA_INDEX

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
#: Debian's orthanc-dicomweb plugin, which OHIF reads studies through (README "Viewing in OHIF").
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def find_orthanc_binary() -> str | None:
    """The Orthanc executable on this machine, or ``None``."""
    found = shutil.which("Orthanc")
    if found:
        return found
    return next((b for b in ORTHANC_BINARIES if os.access(b, os.X_OK)), None)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalOrthanc:
    """One Orthanc process with its own storage folder under ``workdir``.

    ``stop()`` then ``start()`` restarts it on the same storage, which the upload
    fault tests rely on.
    """

    def __init__(
        self,
        workdir: Path,
        username: str,
        password: str,
        http_port: int | None = None,
        dicom_port: int | None = None,
        config_template: Path = PROJECT_ROOT / "orthanc.json",
        binary: str | None = None,
        remote_access: bool = False,
        dicom_server: bool = False,
        dicomweb: bool = False,
        overrides: dict[str, object] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.username = username
        self.password = password
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.config_template = config_template
        self.binary = binary or find_orthanc_binary()
        self.remote_access = remote_access
        self.dicom_server = dicom_server
        self.dicomweb = dicomweb
        self.overrides = dict(overrides or {})
        """More settings over the project's (e.g. a short ``StableAge`` for the watcher's tests)."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "db"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def write_config(self) -> Path:
        """The project's configuration with only ports, paths and exposure overridden."""
        config = json.loads(self.config_template.read_text(encoding="utf-8"))
        config.update(
            {
                "StorageDirectory": str(self.storage),
                "IndexDirectory": str(self.storage),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
                # Outside Docker there is no 127.0.0.1-only port publishing, and
                # Orthanc 1.10 cannot bind one address: refuse HTTP requests from other
                # hosts at the application level instead...
                "RemoteAccessAllowed": self.remote_access,
                # ...and keep the DICOM port closed unless asked for: the pipeline uses
                # REST only, and Orthanc's DICOM server would accept C-STORE from anyone.
                "DicomServerEnabled": self.dicom_server,
                "RegisteredUsers": {self.username: self.password},  # JSON-escaped
            }
        )
        # watch_orthanc.py's claims (cxrsr.pacs.claims) need revisions checked and their
        # metadata declared; a template without them gets them (an override may remove them).
        config.setdefault("CheckRevisions", True)
        config.setdefault("UserMetadata", {}).setdefault(CLAIM_METADATA, CLAIM_METADATA_INDEX)
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        if self.dicom_server:
            # Only peers on this machine may store or echo (the benchmark's storescu).
            config.update(
                {
                    "DicomAlwaysAllowStore": False,
                    "DicomAlwaysAllowEcho": False,
                    "DicomCheckModalityHost": True,
                    "DicomModalities": {
                        "local": {"AET": "STORESCU", "Host": "127.0.0.1", "Port": 104}
                    },
                }
            )
        config.update(self.overrides)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.storage.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)  # patient data: the owner only
        path = self.workdir / "orthanc.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the password
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(config, indent=2))
        return path

    def start(self, timeout: float = 60.0) -> None:
        """Start Orthanc in the background and wait until ``GET /system`` answers."""
        if self.binary is None:
            raise RuntimeError(
                "no Orthanc binary found: install Debian's 'orthanc' package "
                "(apt-get install -y orthanc) or start one with 'docker compose up -d'"
            )
        config = self.write_config()
        env = dict(os.environ, ORTHANC_USERNAME=self.username, ORTHANC_PASSWORD=self.password)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.process.returncode}; see {self.log_path}"
                )
            try:
                response = requests.get(
                    f"{self.url}/system", auth=(self.username, self.password), timeout=2
                )
                if response.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer at {self.url} within {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Orthanc by its PID (SIGTERM, then SIGKILL) and wait for it to exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Stop Orthanc abruptly (SIGKILL), as a crash or power loss would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_orthanc(pid: int) -> bool:
    """Whether ``pid`` still runs Orthanc (pid files outlive their process; pids are reused)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"Orthanc" in command.split(b"\0")[0]


def _postgres_overrides(folder: Path) -> dict[str, object]:
    """Settings that put the index in the cluster of ``local_postgres start --dir folder``."""
    from cxrsr.pacs.local_postgres import CONNECTION_FILE, INDEX_PLUGIN

    section = json.loads((folder / CONNECTION_FILE).read_text(encoding="utf-8"))
    if not INDEX_PLUGIN.is_file():
        raise ValueError(f"{INDEX_PLUGIN} is missing: install Debian's 'orthanc-postgresql'")
    plugins = [str(INDEX_PLUGIN)] + ([str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [])
    return {"Plugins": plugins, "PostgreSQL": section}


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxrsr.pacs.local_orthanc",
        description="Start or stop a background Orthanc from orthanc.json (for hosts without Docker).",
    )
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / ".orthanc")
    parser.add_argument("--http-port", type=int, default=8042)
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument(
        "--postgres",
        type=Path,
        metavar="DIR",
        help="keep Orthanc's index in the PostgreSQL cluster that "
        "'python -m cxrsr.pacs.local_postgres start --dir DIR' runs (the hospital stack's "
        "layout; another Orthanc started with the same DIR and --dir shares it)",
    )
    args = parser.parse_args(argv)
    pid_file = args.dir / "orthanc.pid"
    if args.action == "stop":
        if not pid_file.exists():
            print("I: no local Orthanc is running", file=sys.stderr)
            return 0
        pid = int(pid_file.read_text())
        if _is_orthanc(pid):
            os.kill(pid, signal.SIGTERM)
        else:
            print(f"I: pid {pid} is no longer an Orthanc; nothing to stop", file=sys.stderr)
        pid_file.unlink(missing_ok=True)
        print(f"I: stopped Orthanc (pid {pid})", file=sys.stderr)
        return 0
    from cxrsr.config import setting

    username = setting("ORTHANC_USERNAME")
    password = setting("ORTHANC_PASSWORD")
    if not username or not password:
        print("E: ORTHANC_USERNAME and ORTHANC_PASSWORD must be set (see .env)", file=sys.stderr)
        return 3
    try:
        overrides = _postgres_overrides(args.postgres) if args.postgres else {}
    except (OSError, ValueError) as exc:
        print(f"E: {args.postgres}: {exc}", file=sys.stderr)
        return 3
    server = LocalOrthanc(
        args.dir,
        username,
        password,
        args.http_port,
        args.dicom_port,
        dicomweb=DICOMWEB_PLUGIN.is_file(),  # for OHIF, when Debian's orthanc-dicomweb is installed
        overrides=overrides,
    )
    try:
        server.start()
    except RuntimeError as exc:
        print(f"E: {exc}", file=sys.stderr)
        return 3
    assert server.process is not None
    pid_file.write_text(str(server.process.pid))
    print(
        f"I: Orthanc running at {server.url} (pid {server.process.pid}, data in {server.storage})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
