"""Discovery on damaged, hostile and unusual input: broken zips, bombs, FIFOs, links, names.

Every archive here is a real zip written with ``zipfile`` and then damaged byte by byte
where a test needs it (central directory, CRC, flags, compression method), as a broken
download, a password-protected export or a deflate64 archive from Windows would be.
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cxrsr.classify import prepare
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import Source, iter_sources, open_source
from cxrsr.errors import InputError, SourceReadError
from cxrsr.results import FAILED

SMALL_DICOM = "bad_cr_cspine_16x16.dcm"
CENTRAL_HEADER = b"PK\x01\x02"
LOCAL_HEADER = b"PK\x03\x04"


@pytest.fixture
def dicom_bytes(corpus_dir: Path) -> bytes:
    return (corpus_dir / SMALL_DICOM).read_bytes()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def patch_central_header(path: Path, offset: int, fmt: str, value: int) -> None:
    """Overwrite a field of the (first) central directory header (APPNOTE 4.3.12)."""
    data = bytearray(path.read_bytes())
    start = data.rindex(CENTRAL_HEADER)
    struct.pack_into(fmt, data, start + offset, value)
    path.write_bytes(bytes(data))


def damaged_directory_zip(path: Path, dicom: bytes) -> Path:
    """is_zipfile() still says yes (the end record is intact); ZipFile() raises BadZipFile."""
    write_zip(path, {"IM1": dicom})
    data = path.read_bytes()
    path.write_bytes(data.replace(CENTRAL_HEADER, b"XX\x01\x02"))
    assert zipfile.is_zipfile(path)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(path)
    return path


def crc_error_zip(path: Path, dicom: bytes) -> Path:
    write_zip(path, {"IM1": dicom})
    data = bytearray(path.read_bytes())
    data[data.index(LOCAL_HEADER) + 30 + len("IM1") + 200] ^= 0xFF  # a byte of pixel data
    path.write_bytes(bytes(data))
    return path


def encrypted_zip(path: Path, dicom: bytes) -> Path:
    write_zip(path, {"IM1": dicom})
    patch_central_header(path, 8, "<H", 0x0001)  # general purpose flag bit 0: encrypted
    return path


def deflate64_zip(path: Path, dicom: bytes) -> Path:
    write_zip(path, {"IM1": dicom})
    patch_central_header(path, 10, "<H", 9)  # compression method 9: Deflate64
    return path


def bomb_zip(path: Path) -> Path:
    """A real zip bomb: 100 MiB of zeros deflated to about 100 KiB (ratio ~1000:1)."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("IM1", "w", force_zip64=True) as member,
    ):
        for _ in range(100):
            member.write(bytes(1 << 20))
    return path


def huge_member_zip(path: Path, dicom: bytes, size: int = 3_000_000_000) -> Path:
    """A member whose directory entry declares ``size`` bytes uncompressed (stored, ratio 1)."""
    write_zip(path, {"IM1": dicom})
    patch_central_header(path, 20, "<I", size)  # compressed size
    patch_central_header(path, 24, "<I", size)  # uncompressed size
    return path


# -- 1. damaged and hostile zips ---------------------------------------------------------


def test_damaged_zip_directory_becomes_one_source_that_fails_when_read(
    tmp_path: Path, dicom_bytes: bytes
) -> None:
    broken = damaged_directory_zip(tmp_path / "broken.zip", dicom_bytes)
    (tmp_path / "IM2").write_bytes(dicom_bytes)
    image, archive = iter_sources([tmp_path])  # sorted: upper case first
    assert (image.name, archive.name) == (str(tmp_path / "IM2"), str(broken))
    with pytest.raises(SourceReadError, match=r"^corrupt zip archive: Bad magic number"):
        archive.head()
    with pytest.raises(SourceReadError):
        archive.read_bytes()
    assert image.read_bytes() == dicom_bytes


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (crc_error_zip, "Bad CRC-32"),
        (encrypted_zip, "encrypted zip member"),
        (deflate64_zip, r"method Python cannot read \(Deflate64\)"),
    ],
)
def test_unreadable_member_raises_one_exception_type(
    tmp_path: Path, dicom_bytes: bytes, make, reason: str
) -> None:
    archive = make(tmp_path / "batch.zip", dicom_bytes)
    (source,) = iter_sources([archive])
    assert source.name == f"{archive}!IM1"
    with pytest.raises(SourceReadError, match=reason) as caught:
        source.read_bytes()
    # Both consumers catch it: process_dicom as an InputError, upload as an OSError.
    assert isinstance(caught.value, InputError) and isinstance(caught.value, OSError)


def test_zip_bomb_and_absurd_member_size_are_refused_unread(
    tmp_path: Path, dicom_bytes: bytes
) -> None:
    bomb = bomb_zip(tmp_path / "bomb.zip")
    huge = huge_member_zip(tmp_path / "huge.zip", dicom_bytes)
    by_name = {s.name: s for s in iter_sources([tmp_path])}
    with pytest.raises(SourceReadError, match=r"expands \d+:1 .* like a zip bomb"):
        by_name[f"{bomb}!IM1"].head()
    with pytest.raises(SourceReadError, match="declares 3000000000 bytes uncompressed"):
        by_name[f"{huge}!IM1"].head()
    # The same check guards a member named directly (generate_sr.py reopens names).
    with pytest.raises(SourceReadError, match="zip bomb"):
        open_source(f"{bomb}!IM1").read_bytes()


def test_members_are_capped_far_below_a_worker_budget(tmp_path: Path, dicom_bytes: bytes) -> None:
    """A member is read into memory whole: 300 MB (under the old 1 GiB cap) is refused."""
    huge = huge_member_zip(tmp_path / "huge.zip", dicom_bytes, size=300_000_000)
    (source,) = iter_sources([huge])
    with pytest.raises(SourceReadError, match=r"declares 300000000 bytes .*limit 268435456"):
        source.head()


def test_process_worker_records_broken_sources_as_failed(
    tmp_path: Path, dicom_bytes: bytes
) -> None:
    damaged_directory_zip(tmp_path / "a_broken.zip", dicom_bytes)
    crc_error_zip(tmp_path / "b_crc.zip", dicom_bytes)
    encrypted_zip(tmp_path / "c_encrypted.zip", dicom_bytes)
    deflate64_zip(tmp_path / "d_deflate64.zip", dicom_bytes)
    bomb_zip(tmp_path / "e_bomb.zip")
    prepared = [prepare(source) for source in iter_sources([tmp_path])]
    assert [p.status for p in prepared] == [FAILED] * 5
    reasons = [p.reason for p in prepared]
    assert reasons[0].startswith("corrupt zip archive: ")
    assert "Bad CRC-32" in reasons[1]
    assert "encrypted" in reasons[2]
    assert "Deflate64" in reasons[3]
    assert "zip bomb" in reasons[4]
    assert not any("unexpected error" in r for r in reasons)


def count_dicom(folder: Path) -> subprocess.CompletedProcess[str]:
    """``python -m cxrsr.dicomio.discovery --count-dicom`` (as run.sh calls it), bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "cxrsr.dicomio.discovery", "--count-dicom", str(folder)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=30,
    )


def test_count_dicom_survives_a_broken_zip(tmp_path: Path, dicom_bytes: bytes) -> None:
    damaged_directory_zip(tmp_path / "broken.zip", dicom_bytes)
    bomb_zip(tmp_path / "bomb.zip")
    (tmp_path / "IM1").write_bytes(dicom_bytes)
    result = count_dicom(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "1"


# -- 2. special files --------------------------------------------------------------------


def _hung(signum: int, frame: object) -> None:
    raise TimeoutError("discovery blocked on a special file")


def test_fifo_and_device_links_are_reported_not_yielded(tmp_path: Path, dicom_bytes: bytes) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it blocks until a writer comes
    (tmp_path / "zero").symlink_to("/dev/zero")  # reading it never ends
    (tmp_path / "IM1").write_bytes(dicom_bytes)
    # In a subprocess with a time limit: without the check, this hangs or eats memory.
    result = count_dicom(tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "1"), result.stderr
    assert result.stderr.splitlines() == [
        f"W: {tmp_path / 'pipe'}: not a regular file (FIFO), passed over",
        f"W: {tmp_path / 'zero'}: not a regular file (character device), passed over",
    ]


def test_fifo_named_directly_is_not_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.mkfifo(tmp_path / "pipe")
    signal.signal(signal.SIGALRM, _hung)
    signal.alarm(20)  # fail rather than hang
    try:
        with caplog.at_level(logging.WARNING, logger="cxrsr"):
            assert list(iter_sources([tmp_path / "pipe"])) == []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'pipe'}: not a regular file (FIFO), passed over"
    ]


# -- 3. symbolically linked folders ------------------------------------------------------


def test_linked_sub_folders_are_followed_under_their_linked_names(
    tmp_path: Path, dicom_bytes: bytes
) -> None:
    nas = tmp_path / "nas" / "study1"
    nas.mkdir(parents=True)
    (nas / "IM1").write_bytes(dicom_bytes)
    data = tmp_path / "data"
    data.mkdir()
    (data / "study1").symlink_to(nas)
    assert [s.name for s in iter_sources([data])] == [str(data / "study1" / "IM1")]


def test_symlink_loops_end_and_each_file_comes_once(
    tmp_path: Path, dicom_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "a" / "IM1").write_bytes(dicom_bytes)
    (data / "a" / "loop").symlink_to(data)  # back to an ancestor: a loop
    (data / "b").symlink_to(data / "a")  # the same folder twice: not a loop
    with caplog.at_level(logging.WARNING, logger="cxrsr"):
        names = [s.name for s in iter_sources([data])]
    assert names == [str(data / "a" / "IM1")]
    assert any("symbolic link loop" in r.getMessage() for r in caplog.records)


# -- 4. "!" in member and folder names ---------------------------------------------------


def test_separator_inside_names_reopens_the_right_member(
    tmp_path: Path, dicom_bytes: bytes
) -> None:
    folder = tmp_path / "wow!x"
    folder.mkdir()
    archive = write_zip(folder / "batch.zip", {"Study!1/IM1": dicom_bytes, "IM!2": b"other"})
    names = [s.name for s in iter_sources([folder])]
    assert names == [f"{archive}!IM!2", f"{archive}!Study!1/IM1"]
    source = open_source(names[1])
    assert source == Source(str(archive), "Study!1/IM1")
    assert source.read_bytes() == dicom_bytes
    assert open_source(names[0]).read_bytes() == b"other"


# -- 5. absolute names -------------------------------------------------------------------


def test_names_are_absolute_and_keep_symbolic_links(
    tmp_path: Path, dicom_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "IM1").write_bytes(dicom_bytes)
    write_zip(real / "batch.zip", {"IM2": dicom_bytes})
    (tmp_path / "linked").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    names = [s.name for s in iter_sources(["linked", "linked/batch.zip!IM2"])]
    assert names == [str(tmp_path / "linked" / "IM1"), str(tmp_path / "linked" / "batch.zip!IM2")]
    monkeypatch.chdir("/")  # another working folder: the names still open
    assert all(open_source(n).read_bytes() == dicom_bytes for n in names)


def test_a_member_that_has_gone_is_a_missing_source(tmp_path: Path, dicom_bytes: bytes) -> None:
    archive = write_zip(tmp_path / "batch.zip", {"IM1": dicom_bytes})
    gone = open_source(f"{archive}!IM2")
    with pytest.raises(FileNotFoundError, match="no member 'IM2' in the zip archive") as caught:
        gone.head()
    assert isinstance(caught.value, SourceReadError)
