"""The header check that decides whether a file may be sent to a PACS (cxrsr.dicomio.header)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from cxrsr.dicomio import header
from cxrsr.dicomio.header import MalformedDicom, is_dicomdir, read_header


def check(data: bytes) -> pydicom.Dataset:
    return read_header(io.BytesIO(data), len(data))


def test_every_corpus_dicom_file_passes(corpus_dir: Path) -> None:
    """Real files from the field, odd ones included, are never refused as malformed."""
    for path in sorted(corpus_dir.glob("*.dcm")):
        ds = check(path.read_bytes())
        assert str(ds.SOPInstanceUID), path.name


def test_a_deflated_data_set_is_not_held_against_the_compressed_size(corpus_dir: Path) -> None:
    """Deflated lengths count inflated bytes (PS3.5 A.5): a megabyte of zeros in a private
    element inflates from a few kilobytes, and the elements after it lie beyond the file."""
    ds = pydicom.dcmread(corpus_dir / "cxr10_nih_dx_8bit.dcm")
    ds.add_new(0x00091010, "OB", bytes(1 << 20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert len(out.getvalue()) < (1 << 20)
    assert check(out.getvalue()).SOPInstanceUID == ds.SOPInstanceUID


def test_truncated_pixel_data_is_malformed(corpus_dir: Path) -> None:
    data = (corpus_dir / "cxr10_nih_dx_8bit.dcm").read_bytes()
    with pytest.raises(MalformedDicom, match=r"truncated: Pixel Data \(7FE0,0010\) declares"):
        check(data[: len(data) // 2])


def test_dicomdir_is_recognised_without_a_sop_instance(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.FileSetID = "CXR"
    ds.DirectoryRecordSequence = []
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    assert is_dicomdir(check((tmp_path / "DICOMDIR").read_bytes()))


def test_an_element_pydicom_cannot_convert_is_malformed(corpus_dir: Path) -> None:
    """Case 7725 of fuzz seed 1: a header flip gives Image Type an unknown VR. pydicom
    converts values lazily, so without the check the uploader met it later (deciding
    whether the file is a key image) and ended with a traceback, exit 4."""
    import fuzzing

    case = fuzzing.make_case(fuzzing.load_corpus(corpus_dir), seed=1, index=7725)
    lazily = pydicom.dcmread(io.BytesIO(case.data), stop_before_pixels=True, force=True)
    with pytest.raises(NotImplementedError, match="Unknown Value Representation"):
        _ = lazily.ImageType
    with pytest.raises(MalformedDicom, match=r"Unknown Value Representation"):
        check(case.data)


def _fails_to_convert(data: bytes, convert: Callable[[pydicom.Dataset], None]) -> bool | None:
    """Whether ``convert`` raises on the header of ``data``; ``None`` if pydicom cannot
    read the header at all (both ways then agree trivially)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, defer_size=header.DEFER_SIZE, force=True
        )
    except Exception:
        return None
    try:
        convert(ds)
    except Exception:
        return True
    return False


@pytest.mark.filterwarnings("ignore::UserWarning")  # fuzzed headers: unknown tags, charsets
def test_the_fast_conversion_refuses_exactly_what_iterall_refuses(corpus_dir: Path) -> None:
    """The header check converts elements through pydicom's converter directly
    (:func:`cxrsr.dicomio.header._convert_every_element`) instead of ``Dataset.iterall()``, which
    stores each converted element back and cost the uploader a millisecond per file.
    On the corpus and 600 fuzzed headers, both must refuse the same files."""
    import fuzzing

    def by_iterall(ds: pydicom.Dataset) -> None:
        for _element in ds.iterall():
            pass

    corpus = fuzzing.load_corpus(corpus_dir)
    cases = [path.read_bytes() for path in sorted(corpus_dir.glob("*.dcm"))]
    cases += [fuzzing.make_case(corpus, seed=1, index=i).data for i in range(600)]
    verdicts = []
    for index, data in enumerate(cases):
        slow = _fails_to_convert(data, by_iterall)
        fast = _fails_to_convert(data, header._convert_every_element)
        assert fast == slow, f"case {index}: iterall {slow}, fast {fast}"
        verdicts.append(slow)
    # The comparison means something only if both outcomes occur.
    assert verdicts.count(True) >= 20 and verdicts.count(False) >= 200, verdicts.count(True)
