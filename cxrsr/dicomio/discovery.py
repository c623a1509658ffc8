"""Find DICOM files in files, folders (recursively) and ``.zip`` archives.

Files are recognised by content, not by extension: hospitals export DICOM with no
extension, with ``.dcm``, ``.DCM``, ``.ima`` or numeric names, and some old files have
no 128-byte preamble and no ``DICM`` prefix at all (ACR-NEMA style, PS3.10 7.1 not
followed). Zip members are read in memory, never extracted to disk.

A source is named by a string that the later steps can open again: an absolute path
(as the user named it, symbolic links kept, so a results file means the same from any
working folder), or ``ARCHIVE.zip!MEMBER`` for a member of an archive.

Hostile or damaged input never stops a run:

* Only regular files are candidates. A FIFO would block the reader forever and a
  character device such as ``/dev/zero`` never ends, so anything else met in a folder
  walk (or given by name) is reported on a ``W:`` line through the ``cxrsr`` logger and
  not yielded at all.
* Symbolically linked sub-folders are followed (``data/study1 -> /nas/study1``); a
  folder already being walked is not entered again, so a link loop ends.
* Expanding an archive never raises. A zip whose directory cannot be read becomes one
  :class:`Source` that fails with "corrupt zip archive: ..." when read; a member that
  declares more bytes than any radiograph (:data:`MAX_MEMBER_SIZE`) or expands like a
  zip bomb (:data:`MAX_COMPRESSION_RATIO`) fails with its reason, unread.
* Every read error of a source (CRC error, encryption, unsupported compression,
  truncation) is raised as :class:`~cxrsr.errors.SourceReadError`, which both the
  classifier and the uploader record per file before going on.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import stat
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import zipfile

from cxrsr.errors import SourceMissingError, SourceReadError

log = logging.getLogger("cxrsr")

#: Separator between an archive path and a member name in a source name.
ZIP_SEPARATOR = "!"

#: Files a folder walk passes over silently: the data/ README and OS clutter.
_IGNORED_NAMES = {"README.md", "README.txt", "README", "Thumbs.db", "desktop.ini"}

#: Bytes needed by :func:`sniff_dicom`.
SNIFF_BYTES = 132

#: Largest uncompressed archive member read. A member is read into memory whole (pydicom
#: needs to seek in it; a deflated member cannot), so this bounds what one reader process
#: holds for it, far below its 1 GiB budget (``cxrsr.dicomio.reading.MEMORY_BUDGET``). The
#: largest radiographs (43 x 43 cm detectors at 50 µm, 8600 x 8600 pixels, 16 bit) are
#: under 150 MB uncompressed; a member that declares more than this is not a radiograph
#: and is refused without being read.
MAX_MEMBER_SIZE = 256 << 20

#: Members that expand more than this many times, beyond :data:`_BOMB_MIN_SIZE`, are
#: refused as zip bombs. Deflate's best is about 1030:1 (all zeros); real DICOM
#: images, even with large black borders, stay far below 100:1.
MAX_COMPRESSION_RATIO = 100
_BOMB_MIN_SIZE = 64 << 20


@functools.cache
def _zip_errors() -> tuple[type[BaseException], ...]:
    """What zipfile raises on damaged or hostile archives.

    BadZipFile (bad directory, CRC error), RuntimeError (encrypted member),
    NotImplementedError (deflate64, implode), zlib/lzma errors and EOFError (truncated
    data), ValueError/struct.error/OverflowError (nonsense offsets and sizes), OSError
    (the read itself). A function, so that ``zipfile`` and ``lzma`` are imported only
    when an archive is met (``except`` evaluates it only when something was raised):
    they cost a run of DICOM files about 4 ms of start-up.
    """
    import lzma
    import zipfile

    return (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        RuntimeError,
        NotImplementedError,
        zlib.error,
        lzma.LZMAError,
        EOFError,
        ValueError,
        struct.error,
        OverflowError,
        OSError,
    )


@dataclass(frozen=True)
class Source:
    """One candidate input: a file on disk or a member of a zip archive.

    A source that is known to be unusable before it is read (a corrupt archive, a zip
    bomb) carries ``problem``; every read then raises :class:`SourceReadError` with it.
    """

    path: str
    """The file on disk (the archive, for a zip member)."""
    member: str | None = None
    """The member name inside the archive, or ``None`` for a plain file."""
    problem: str | None = field(default=None, compare=False)
    """Why this source cannot be read, found while expanding its archive."""

    @property
    def name(self) -> str:
        """The name written to results files and messages, openable by :func:`open_source`."""
        return self.path if self.member is None else f"{self.path}{ZIP_SEPARATOR}{self.member}"

    def read_bytes(self) -> bytes:
        """The whole file's bytes."""
        if self.member is None:
            self._check()
            return Path(self.path).read_bytes()
        with self._member() as fh:
            return fh.read()

    def open(self) -> BinaryIO:
        """A readable binary stream (the member's bytes in memory for an archive)."""
        if self.member is None:
            self._check()
            return open(self.path, "rb")
        return io.BytesIO(self.read_bytes())

    def head(self, n: int = SNIFF_BYTES) -> bytes:
        """The first ``n`` bytes, for sniffing without reading a whole file."""
        if self.member is None:
            with self.open() as fh:
                return fh.read(n)
        with self._member() as fh:
            return fh.read(n)

    @property
    def size(self) -> int:
        """Size in bytes (uncompressed, for an archive member)."""
        if self.member is None:
            self._check()
            return os.path.getsize(self.path)
        self._check()
        return self._member_info().file_size

    def _check(self) -> None:
        if self.problem is not None:
            raise SourceReadError(self.problem)

    def _member_info(self) -> zipfile.ZipInfo:
        assert self.member is not None
        try:
            return _zip(self.path).getinfo(self.member)
        except KeyError:
            raise SourceMissingError(f"no member {self.member!r} in the zip archive") from None
        except _zip_errors() as exc:
            raise SourceReadError(f"corrupt zip archive: {_describe(exc)}") from exc

    def _member(self) -> _MemberReader:
        self._check()
        info = self._member_info()
        problem = member_problem(info)
        if problem is not None:
            raise SourceReadError(problem)
        return _MemberReader(self.path, info)


class _MemberReader:
    """A zip member opened for reading; every zipfile error comes out as SourceReadError.

    zipfile itself stops at the member's declared size (and reports a CRC error when
    the data does not match it), so :func:`member_problem`'s check of that size bounds
    what a read can return.
    """

    def __init__(self, archive: str, info: zipfile.ZipInfo) -> None:
        self._archive = archive
        self._info = info
        self._fh: BinaryIO | None = None

    def __enter__(self) -> _MemberReader:
        try:
            self._fh = _zip(self._archive).open(self._info)  # type: ignore[assignment]
        except _zip_errors() as exc:
            raise SourceReadError(self._problem(exc)) from exc
        return self

    def read(self, n: int = -1) -> bytes:
        assert self._fh is not None
        try:
            return self._fh.read(n)
        except _zip_errors() as exc:
            raise SourceReadError(self._problem(exc)) from exc

    def _problem(self, exc: BaseException) -> str:
        if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
            return "encrypted zip member (password-protected archive): cannot be read"
        if isinstance(exc, NotImplementedError):
            method = self._info.compress_type
            return (
                "zip member compressed with a method Python cannot read "
                f"({_COMPRESSION_NAMES.get(method, f'method {method}')})"
            )
        return f"damaged zip member: {_describe(exc)}"

    def __exit__(self, *exc_info: object) -> None:
        if self._fh is not None:
            self._fh.close()


#: Compression methods zipfile cannot read (APPNOTE 4.4.5), named for the message.
_COMPRESSION_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 93: "Zstandard", 98: "PPMd"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be read, judged from its directory entry alone."""
    if info.file_size > MAX_MEMBER_SIZE:
        return (
            f"zip member declares {info.file_size} bytes uncompressed, more than any "
            f"radiograph (limit {MAX_MEMBER_SIZE} bytes): not read"
        )
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > _BOMB_MIN_SIZE and ratio > MAX_COMPRESSION_RATIO:
        return (
            f"zip member expands {ratio:.0f}:1 ({info.compress_size} to {info.file_size} "
            f"bytes), like a zip bomb (limit {MAX_COMPRESSION_RATIO}:1): not read"
        )
    return None


@functools.lru_cache(maxsize=8)
def _zip(path: str) -> zipfile.ZipFile:
    """One open ``ZipFile`` per archive and process; reading a member re-reads no directory."""
    import zipfile

    return zipfile.ZipFile(path)


def open_source(name: str) -> Source:
    """Turn a name written by :attr:`Source.name` back into a :class:`Source`.

    Member names may themselves hold the separator (``Study!1/IM1``), so each ``!`` is
    tried from the left until the part before it is an existing zip file.
    """
    if ZIP_SEPARATOR in name and not os.path.exists(name):
        start = 0
        while (index := name.find(ZIP_SEPARATOR, start)) >= 0:
            archive, member = name[:index], name[index + 1 :]
            if archive and os.path.isfile(archive) and _is_zip(Path(archive)):
                return Source(archive, member)
            start = index + 1
    return Source(name)


def sniff_dicom(head: bytes) -> bool:
    """Whether ``head`` (the first 132 bytes) starts a DICOM file.

    Accepts PS3.10 files (``DICM`` at offset 128) and bare data sets without preamble
    or file meta, whose first element is then a group 0x0002/0x0008 tag in little
    endian, with an explicit VR (two upper-case letters) or a plausible implicit length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if head[:4] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x0020:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack("<I", head[4:8])
    return length < 0x10000


def _walk(folder: Path) -> Iterator[Path]:
    """Regular files under ``folder``, sorted, following symbolically linked folders.

    ``os.walk`` does not follow links to folders, and following them blindly would
    recurse forever on a loop, so each folder is entered once, known by (st_dev, st_ino).
    """
    yield from _walk_folder(folder, set(), ())


def _walk_folder(
    folder: Path, entered: set[tuple[int, int]], ancestors: tuple[tuple[int, int], ...]
) -> Iterator[Path]:
    try:
        info = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        log.warning("%s: cannot list the folder: %s", folder, exc.strerror or exc)
        return
    key = (info.st_dev, info.st_ino)
    if key in ancestors:
        log.warning("%s: symbolic link loop (back to a folder above it), not followed", folder)
        return
    if key in entered:
        log.debug("%s: folder already walked through another link", folder)
        return
    entered.add(key)
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _IGNORED_NAMES:
            continue
        path = folder / entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk_folder(path, entered, (*ancestors, key))
        else:
            yield path


def _file_kind(path: Path) -> str | None:
    """``None`` for a regular file (after links), else what it is, for the warning."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken symbolic link" if path.is_symlink() else "no such file"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    for test, kind in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return f"not a regular file ({kind})"
    return "not a regular file"


def _expand_zip(path: Path) -> Iterator[Source]:
    """The archive's members; never raises (a broken archive is one failing Source)."""
    try:
        infos = sorted(_zip(str(path)).infolist(), key=lambda i: i.filename)
    except _zip_errors() as exc:
        yield Source(str(path), problem=f"corrupt zip archive: {_describe(exc)}")
        return
    for info in infos:
        if info.is_dir():
            continue
        base = info.filename.rsplit("/", 1)[-1]
        if base.startswith(".") or base in _IGNORED_NAMES or info.filename.startswith("__MACOSX/"):
            continue
        yield Source(str(path), info.filename, problem=member_problem(info))


def iter_sources(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Source]:
    """Every candidate file under ``inputs``, in a stable order, each once, by absolute path.

    Folders are walked recursively in sorted order; ``.zip`` archives (recognised by
    content) are expanded into their members. Paths are made absolute but not resolved
    (:meth:`Path.absolute`), so names keep the user's symbolic links. Anything that is
    not a regular file is reported on a ``W:`` line and not yielded. A missing input
    raises ``FileNotFoundError`` (a usage error for the scripts, checked up front).
    """
    seen: set[str] = set()
    for raw in inputs:
        path = Path(raw).absolute()
        if not os.path.lexists(path):
            if ZIP_SEPARATOR in str(raw):
                source = open_source(str(raw))
                member = source.member
                if member is not None:
                    source = Source(str(Path(source.path).absolute()), member)
                    key = os.path.realpath(source.path) + ZIP_SEPARATOR + member
                    if key not in seen:
                        seen.add(key)
                        yield source
                    continue
            raise FileNotFoundError(f"{raw}: no such file or folder")
        files = _walk(path) if path.is_dir() else iter([path])
        for file_path in files:
            kind = _file_kind(file_path)
            if kind is not None:
                log.warning("%s: %s, passed over", file_path, kind)
                continue
            key = os.path.realpath(file_path)
            if key in seen:
                continue
            seen.add(key)
            # DICOM first: it is the common case, and the zip test reads up to 64 kB
            # from the end of every file that has no zip directory.
            if not _looks_like_dicom_file(file_path) and _is_zip(file_path):
                for entry in _expand_zip(file_path):
                    entry_key = key + ZIP_SEPARATOR + (entry.member or "")
                    if entry_key not in seen:
                        seen.add(entry_key)
                        yield entry
            else:
                yield Source(str(file_path))


def _is_zip(path: Path) -> bool:
    import zipfile

    try:
        return zipfile.is_zipfile(path)
    except _zip_errors():
        return False


def _looks_like_dicom_file(path: Path) -> bool:
    # A DICOM file can end with bytes that look like a zip directory; trust DICM first.
    try:
        with open(path, "rb") as fh:
            return sniff_dicom(fh.read(SNIFF_BYTES))
    except OSError:
        return False


def check_inputs_exist(inputs: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The inputs that do not exist, so a script can stop with a usage error up front."""
    missing = []
    for raw in inputs:
        if Path(raw).exists():
            continue
        source = open_source(str(raw))
        if source.member is None:
            missing.append(str(raw))
    return missing


def _main(argv: list[str] | None = None) -> int:
    """``python -m cxrsr.dicomio.discovery --count-dicom DIR ...``: how many DICOM files (for run.sh)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxrsr.dicomio.discovery")
    parser.add_argument("--count-dicom", nargs="+", metavar="INPUT", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(format="W: %(message)s", level=logging.WARNING)
    present = [p for p in args.count_dicom if Path(p).exists()]
    print(sum(1 for source in iter_sources(present) if _sniffs_as_dicom(source)))
    return 0


def _sniffs_as_dicom(source: Source) -> bool:
    try:
        return sniff_dicom(source.head())
    except OSError:  # SourceReadError included: a broken archive holds no countable file
        return False


if __name__ == "__main__":
    raise SystemExit(_main())
