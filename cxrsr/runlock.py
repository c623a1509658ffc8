"""One run at a time per results file (or SR folder): an advisory lock beside what it guards.

Two process_dicom.py runs on the same results file would append to one journal, and the
first to finish would fold it into its results file and delete it while the other still
appends; two generate_sr.py runs on the same SR folder would remove (``--clean``) what
the other just wrote. So each run holds an exclusive ``flock(2)`` on a lock file for as
long as it writes, and a second run stops at once (exit 3) naming the holder: its process
ID, host, start time and command, which the holder writes into the lock file.

``flock`` belongs to the open file: the kernel releases it when the holder's process
ends, however it ends (``kill -9``, the OOM killer). A lock file left by a killed run is
therefore never in the way: the next run takes it over. A run that ends normally
deletes its lock file. The file is created owner-only (0600): the command line names
the user's folders.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cxrsr.errors import PipelineError
from cxrsr.files import make_folders

#: Lock files: owner read/write only, whatever the umask.
LOCK_MODE = 0o600
#: Added to a results file's name for its lock file: ``results.json.lock``.
SUFFIX = ".lock"
#: How long a second run waits for the holder's details to appear (the holder writes
#: them just after taking the lock) before it reports the holder without them.
DETAILS_WAIT = 2.0


class RunInUseError(PipelineError):
    """Another run holds the lock (exit 3); the message names it."""

    exit_code = 3


def lock_path(results_file: Path) -> Path:
    """The lock file of a results file: the same name with ``.lock`` added, beside it."""
    results_file = Path(results_file)
    return results_file.with_name(results_file.name + SUFFIX)


def holder_details(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What a holder writes into its lock file: pid, host, start time, command."""
    argv = list(sys.argv if command is None else command)
    if argv:
        argv[0] = Path(argv[0]).name
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(argv),
    }


def describe_holder(text: str) -> str:
    """The holder as one phrase, from its lock file's text (empty: not written yet)."""
    try:
        details = json.loads(text)
        return (
            f"pid {details['pid']} on {details['host']}, started {details['started']}: "
            f"{details['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return "a run that has not written its details yet" if not text.strip() else text.strip()


class RunLock:
    """An exclusive lock held through an open lock file; :meth:`release` (or the process's
    end) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path, guarded: str, command: Sequence[str] | None = None) -> RunLock:
        """Take the lock file at ``path`` for ``guarded`` (named in the message), or raise
        :class:`RunInUseError` naming its holder, or :class:`PipelineError` (exit 3) when
        the lock file cannot be created."""
        path = Path(path)
        while True:
            fd = _open(path, guarded)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _wait_for_details(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise PipelineError(f"{path}: cannot lock: {exc.strerror}", 3) from exc
                raise RunInUseError(
                    f"{guarded}: in use by another run ({describe_holder(holder)}); "
                    f"wait for it to end (lock file {path})"
                ) from None
            if _still_linked(path, fd):
                break
            os.close(fd)  # the holder deleted it as we opened it: take the new one
        lock = cls(path, fd)
        lock._write(json.dumps(holder_details(command), ensure_ascii=False) + "\n")
        return lock

    def _write(self, text: str) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode("utf-8"), 0)

    def release(self) -> None:
        """Delete the lock file and free the lock (in that order: whoever opens the file
        after its deletion sees that it is gone and makes a new one)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextlib.contextmanager
def hold(path: Path, guarded: str, command: Sequence[str] | None = None) -> Iterator[RunLock]:
    """``with hold(lock_path(results), str(results)):`` the run's whole body."""
    lock = RunLock.acquire(path, guarded, command)
    try:
        yield lock
    finally:
        lock.release()


def _open(path: Path, guarded: str) -> int:
    try:
        make_folders(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot create the lock file for {guarded}: {exc}", 3) from exc
    with contextlib.suppress(OSError):  # another user's file: theirs, left as it is
        os.fchmod(fd, LOCK_MODE)
    return fd


def _still_linked(path: Path, fd: int) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one its last holder deleted)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _wait_for_details(fd: int) -> str:
    """The holder's details from its lock file, waiting briefly for a holder that has just
    taken the lock and not yet written them."""
    deadline = time.monotonic() + DETAILS_WAIT
    while True:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        if text.endswith("\n") or time.monotonic() > deadline:
            return text
        time.sleep(0.02)
