"""Writing output files so that a crash never leaves half of one behind, and no one else reads them.

Results files, journals and SRs hold patient data (names, IDs, findings), so everything
this project writes is created without world access, whatever the umask: files
:data:`FILE_MODE` (0640), new folders :data:`FOLDER_MODE` (0750). The group keeps read
access so a department's group can share the output; existing folders are left as they
are (the user chose their permissions).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: Files we write: owner read/write, group read, nothing for others.
FILE_MODE = 0o640
#: Folders we create: owner all, group read/enter, nothing for others.
FOLDER_MODE = 0o750


def make_folders(folder: Path) -> None:
    """``mkdir -p folder``, each folder it creates getting :data:`FOLDER_MODE` exactly.

    ``mkdir``'s mode is filtered by the umask (a umask of 000 is not filtered at all,
    077 would lock the group out), so each new folder is set with ``chmod`` as well.
    """
    folder = Path(folder)
    missing: list[Path] = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=FOLDER_MODE)
        except FileExistsError:  # made meanwhile by someone else: theirs, left alone
            continue
        os.chmod(new, FOLDER_MODE)


def open_private_append(path: Path) -> int:
    """A read-write ``O_APPEND`` descriptor to ``path``, which gets :data:`FILE_MODE`."""
    path = Path(path)
    make_folders(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(
    path: Path, data: bytes, *, durable: bool = True, sync_folder: bool = True
) -> None:
    """Write ``data`` to ``path``: afterwards the file holds either the old bytes or the new.

    The bytes go to a temporary file in the same folder, are flushed to disk, the file
    is renamed over the target (``os.replace`` is atomic on POSIX and Windows), and the
    folder is flushed, so that the new name survives a power cut too. The file gets
    :data:`FILE_MODE` whatever the umask: it may hold patient data.

    With ``durable=False`` neither the bytes nor the folder is flushed: a killed process
    loses nothing (the kernel has them), and the caller makes many files durable at once
    with :func:`sync_files` before anything durable names them.

    With ``sync_folder=False`` the bytes are flushed but the folder is not: for a caller that
    writes many files into one folder and flushes it once with :func:`fsync_folder` before it
    reports them done (a folder fsync is a journal commit of its own: 2-4 ms each here, about
    a tenth of an SR's cost).
    """
    StagedFile(path, data, durable=durable, sync_folder=sync_folder).commit()


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON atomically (see :func:`write_atomic`)."""
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    write_atomic(Path(path), text.encode("utf-8"))


class StagedFile:
    """:func:`write_atomic` in two steps: the bytes written and flushed to disk now (the
    slow part, which may run on another thread), the rename later, or never.

    generate_sr.py stages a key image while it builds the SR that names it, and renames it
    only once that SR exists: a key image is never left behind for an SR that failed.
    """

    def __init__(
        self, path: Path, data: bytes, durable: bool = True, sync_folder: bool = True
    ) -> None:
        self.path = Path(path)
        self._durable = durable
        self._sync_folder = durable and sync_folder
        make_folders(self.path.parent)
        fd, self._tmp_name = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self) -> Path:
        """Rename the written file over its target; returns the target.

        A durable file's folder is flushed after the rename: the new name is an entry of
        the folder, and until that is on disk a power cut can bring back the old file, or
        none at all.
        """
        try:
            os.replace(self._tmp_name, self.path)
        except BaseException:
            self.discard()
            raise
        if self._sync_folder:
            fsync_folder(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the written file; the target is left as it was."""
        Path(self._tmp_name).unlink(missing_ok=True)


#: What a folder fsync answers where the filesystem cannot flush folders on their own
#: (some network and FUSE filesystems); the rename is then as durable as it can be made.
_FOLDER_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (names renamed or created in it) to disk; raises ``OSError``.

    A no-op where folders cannot be opened (Windows, which makes renames durable itself).
    """
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FOLDER_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's ``syncfs(2)`` from the C library (the ``os`` module has no binding), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_SYNCFS = _load_syncfs()


def sync_files(paths: Iterable[Path]) -> None:
    """Flush files written with ``durable=False``, and their names, to disk.

    Why not an ``fsync`` per file: ext4 commits its journal on each one, and
    process_dicom.py writes 2 to 19 pictures per image. Measured on this project's
    benchmark (300 images, every label's heatmap): 1.3 s of 14 s went to those fsyncs.
    On Linux, one ``syncfs(2)`` per filesystem flushes them all with one commit; it also
    makes the renames durable, which an ``fsync`` of the file alone did not. It flushes
    whatever else is waiting on that filesystem too, so it costs more beside a large
    copy. Elsewhere, and on a filesystem that does not support syncfs, each file is
    fsynced, then each folder (on POSIX). Raises ``OSError``.
    """
    files = [Path(path) for path in paths]
    folders = list(dict.fromkeys(path.parent for path in files))
    if _SYNCFS is not None and _syncfs_folders(folders):
        return
    for path in files:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows fsyncs writers only
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if os.name == "posix":  # a folder cannot be opened (or fsynced) on Windows
        for folder in folders:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


#: What a filesystem without syncfs support answers; then each file is fsynced instead.
_SYNCFS_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _syncfs_folders(folders: list[Path]) -> bool:
    """One syncfs per filesystem holding ``folders``; False when one does not support it."""
    assert _SYNCFS is not None
    flushed: set[int] = set()
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            device = os.fstat(fd).st_dev
            if device not in flushed and _SYNCFS(fd) != 0:
                error = ctypes.get_errno()
                if error in _SYNCFS_UNSUPPORTED:
                    return False
                raise OSError(error, f"syncfs: {os.strerror(error)}", str(folder))
            flushed.add(device)
        finally:
            os.close(fd)
    return True
