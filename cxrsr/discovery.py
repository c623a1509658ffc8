"""Find DICOM files in files, folders (recursively) and ``.zip`` archives.

Files are recognised by content, not by extension: hospitals export DICOM with no
extension, with ``.dcm``, ``.DCM``, ``.ima`` or numeric names, and some old files have
no 128-byte preamble and no ``DICM`` prefix at all (ACR-NEMA style, PS3.10 7.1 not
followed). Zip members are read in memory, never extracted to disk.

A source is named by a string that the later steps can open again: a plain path, or
``ARCHIVE.zip!MEMBER`` for a member of an archive.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

#: Separator between an archive path and a member name in a source name.
ZIP_SEPARATOR = "!"

#: Files a folder walk passes over silently: the data/ README and OS clutter.
_IGNORED_NAMES = {"README.md", "README.txt", "README", "Thumbs.db", "desktop.ini"}

#: Bytes needed by :func:`sniff_dicom`.
SNIFF_BYTES = 132


@dataclass(frozen=True)
class Source:
    """One candidate input: a file on disk or a member of a zip archive."""

    path: str
    """The file on disk (the archive, for a zip member)."""
    member: str | None = None
    """The member name inside the archive, or ``None`` for a plain file."""

    @property
    def name(self) -> str:
        """The name written to results files and messages, openable by :func:`open_source`."""
        return self.path if self.member is None else f"{self.path}{ZIP_SEPARATOR}{self.member}"

    def read_bytes(self) -> bytes:
        """The whole file's bytes."""
        if self.member is None:
            return Path(self.path).read_bytes()
        return _zip(self.path).read(self.member)

    def open(self) -> BinaryIO:
        """A readable binary stream (the member's bytes in memory for an archive)."""
        if self.member is None:
            return open(self.path, "rb")
        return io.BytesIO(self.read_bytes())

    def head(self, n: int = SNIFF_BYTES) -> bytes:
        """The first ``n`` bytes, for sniffing without reading a whole file."""
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(n)
        with _zip(self.path).open(self.member) as fh:
            return fh.read(n)

    @property
    def size(self) -> int:
        """Size in bytes (uncompressed, for an archive member)."""
        if self.member is None:
            return os.path.getsize(self.path)
        return _zip(self.path).getinfo(self.member).file_size


@functools.lru_cache(maxsize=8)
def _zip(path: str) -> zipfile.ZipFile:
    """One open ``ZipFile`` per archive and process; reading a member re-reads no directory."""
    return zipfile.ZipFile(path)


def open_source(name: str) -> Source:
    """Turn a name written by :attr:`Source.name` back into a :class:`Source`."""
    if ZIP_SEPARATOR in name and not os.path.exists(name):
        archive, _, member = name.rpartition(ZIP_SEPARATOR)
        if archive and zipfile.is_zipfile(archive):
            return Source(archive, member)
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
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file_name in sorted(files):
            if file_name.startswith(".") or file_name in _IGNORED_NAMES:
                continue
            yield Path(root) / file_name


def _expand_zip(path: Path) -> Iterator[Source]:
    archive = _zip(str(path))
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.is_dir():
            continue
        base = info.filename.rsplit("/", 1)[-1]
        if base.startswith(".") or base in _IGNORED_NAMES or info.filename.startswith("__MACOSX/"):
            continue
        yield Source(str(path), info.filename)


def iter_sources(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Source]:
    """Every candidate file under ``inputs``, in a stable order, each once.

    Folders are walked recursively in sorted order; ``.zip`` archives (recognised by
    content) are expanded into their members. A missing input raises
    ``FileNotFoundError`` (a usage error for the scripts, checked up front).
    """
    seen: set[str] = set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            if ZIP_SEPARATOR in str(raw):
                source = open_source(str(raw))
                if source.member is not None:
                    if source.name not in seen:
                        seen.add(source.name)
                        yield source
                    continue
            raise FileNotFoundError(f"{raw}: no such file or folder")
        files = _walk(path) if path.is_dir() else iter([path])
        for file_path in files:
            key = os.path.realpath(file_path)
            if key in seen:
                continue
            seen.add(key)
            if zipfile.is_zipfile(file_path) and not _looks_like_dicom_file(file_path):
                for member in _expand_zip(file_path):
                    if member.name not in seen:
                        seen.add(member.name)
                        yield member
            else:
                yield Source(str(file_path))


def _looks_like_dicom_file(path: Path) -> bool:
    # A DICOM file can end with bytes that look like a zip directory; trust DICM first.
    with open(path, "rb") as fh:
        return sniff_dicom(fh.read(SNIFF_BYTES))


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
    """``python -m cxrsr.discovery --count-dicom DIR ...``: how many DICOM files (for run.sh)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cxrsr.discovery")
    parser.add_argument("--count-dicom", nargs="+", metavar="INPUT", required=True)
    args = parser.parse_args(argv)
    present = [p for p in args.count_dicom if Path(p).exists()]
    print(sum(1 for source in iter_sources(present) if sniff_dicom(source.head())))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
