"""A throwaway PostgreSQL cluster on 127.0.0.1, for Orthanc's PostgreSQL index.

Debian's ``postgresql`` package gives ``initdb`` and ``pg_ctl`` (under
``/usr/lib/postgresql/<version>/bin``); a new cluster starts in under a second, so the tests
and benchmarks make one of their own instead of needing a server. The cluster:

* listens on 127.0.0.1 only (and a Unix socket in its own folder), on a free port;
* has one role and one database for Orthanc, with a random password and SCRAM
  authentication (``trust`` nowhere);
* keeps its files owner-only: as root, the cluster runs as the ``postgres`` user (``initdb``
  refuses root) in a folder of its own under the system's temporary folder.

:meth:`LocalPostgres.orthanc_settings` gives the ``"PostgreSQL"`` section of Orthanc's
configuration (Debian ``orthanc-postgresql`` plugin), with ``"Lock": false`` so that several
Orthancs may share the database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from cxrsr.pacs.local_orthanc import free_port

#: Debian's orthanc-postgresql plugins (index; storage).
INDEX_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so")
STORAGE_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so")


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest Debian version), or ``None``."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")  # another distribution's layout: all three together
    if on_path and all((Path(on_path).parent / t).exists() for t in ("initdb", "psql")):
        return Path(on_path).parent
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class LocalPostgres:
    """One PostgreSQL cluster with one database for Orthanc; a context manager."""

    def __init__(
        self,
        port: int | None = None,
        database: str = "orthanc",
        username: str = "orthanc",
        bin_dir: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.database = database
        self.username = username
        self.password = secrets.token_urlsafe(18)
        self.bin_dir = bin_dir or find_postgres_bin()
        self.folder: Path | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: the cluster belongs to the postgres user.
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def data(self) -> Path:
        assert self.folder is not None, "not started"
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        assert self.folder is not None, "not started"
        return self.folder / "postgres.log"

    def _run(self, *argv: str, timeout: float = 60.0) -> None:
        assert self.bin_dir is not None
        command = [*self._as_user, str(self.bin_dir / argv[0]), *argv[1:]]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()}")

    def start(self, folder: Path | None = None) -> None:
        """Create the cluster and its database, start it, and wait until it accepts connections.

        Without ``folder`` the cluster lives in a new temporary folder; with one, in that
        (new or empty) folder, which :meth:`stop` then leaves in place (see :func:`_main`).
        """
        if self.bin_dir is None:
            raise RuntimeError(
                "PostgreSQL's initdb/pg_ctl not found: install Debian's 'postgresql' package"
            )
        if folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="cxrsr-postgres-"))
        else:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.folder = folder.resolve()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        password_file = self.folder / "password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(password_file, self.folder.stat().st_uid, self.folder.stat().st_gid)
        self._run(
            "initdb",
            "--pgdata", str(self.data),
            "--username", self.username,
            "--pwfile", str(password_file),
            "--auth", "scram-sha-256",
            "--encoding", "UTF8",
            "--no-instructions",
        )  # fmt: skip
        password_file.unlink()
        self.run_server()
        self.execute(f'CREATE DATABASE "{self.database}"', database="postgres")

    def run_server(self) -> None:
        """Start the server of the (existing) cluster and wait until it accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.folder} -c fsync=on"
        )
        self._run(
            "pg_ctl", "--pgdata", str(self.data), "--log", str(self.log_path),
            "--options", options, "--wait", "--timeout", "60", "start",
        )  # fmt: skip

    def execute(self, sql: str, database: str | None = None) -> str:
        """Run one SQL statement with psql over TCP as the cluster's role; its output."""
        assert self.bin_dir is not None
        env = dict(os.environ, PGPASSWORD=self.password)
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--username", self.username, "--dbname", database or self.database,
                "--set", "ON_ERROR_STOP=1", "--command", sql,
            ],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql: {done.stderr.strip()}")
        return done.stdout.strip()

    def orthanc_settings(self, storage: bool = False) -> dict[str, object]:
        """Orthanc configuration for its PostgreSQL plugin(s) against this cluster."""
        plugins = [str(INDEX_PLUGIN)] + ([str(STORAGE_PLUGIN)] if storage else [])
        return {
            "Plugins": plugins,
            "PostgreSQL": {
                "EnableIndex": True,
                "EnableStorage": storage,
                "Host": "127.0.0.1",
                "Port": self.port,
                "Database": self.database,
                "Username": self.username,
                "Password": self.password,
                "Lock": False,  # several Orthancs share the database
            },
        }

    def stop(self) -> None:
        """Stop the cluster at once and delete its files (a throwaway cluster's)."""
        if self.folder is None:
            return
        if self.data.exists():
            with contextlib.suppress(RuntimeError):  # it was not running
                self._run("pg_ctl", "--pgdata", str(self.data), "--mode", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> LocalPostgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


CONNECTION_FILE = "connection.json"


def _main(argv: list[str] | None = None) -> int:
    """``python -m cxrsr.pacs.local_postgres start|stop --dir DIR``: a cluster kept in DIR,
    for ``python -m cxrsr.pacs.local_orthanc start --postgres DIR`` (the hospital stack's
    index on a host without Docker). ``start`` creates it the first time (its connection
    settings, password included, in DIR/connection.json, owner-only) and starts it;
    ``stop`` stops it and keeps its data."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m cxrsr.pacs.local_postgres",
        description="Start or stop a PostgreSQL cluster on 127.0.0.1 for Orthanc's index.",
    )
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".postgres"))
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    connection = folder / CONNECTION_FILE
    cluster = LocalPostgres(port=args.port)
    cluster.folder = folder
    try:
        if args.action == "stop":
            if not (folder / "data" / "postmaster.pid").exists():
                print(f"I: no PostgreSQL is running in {folder}", file=sys.stderr)
                return 0
            cluster._run("pg_ctl", "--pgdata", str(cluster.data), "--mode", "fast", "stop")
            print(f"I: stopped PostgreSQL (data kept in {folder})", file=sys.stderr)
            return 0
        if connection.exists():
            saved = json.loads(connection.read_text(encoding="utf-8"))
            cluster.port, cluster.password = int(saved["Port"]), str(saved["Password"])
            if not (folder / "data" / "postmaster.pid").exists():
                cluster.run_server()
        else:
            cluster.start(folder)
            fd = os.open(connection, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(cluster.orthanc_settings()["PostgreSQL"], fh, indent=2)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        hint = (
            " (as root the cluster runs as 'postgres', who must reach it)"
            if cluster._as_user
            else ""
        )
        print(f"E: {folder}: {exc}{hint}", file=sys.stderr)
        return 3
    print(
        f"I: PostgreSQL running on 127.0.0.1:{cluster.port} (data in {folder}; "
        f"connection settings in {connection})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
