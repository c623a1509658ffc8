"""Reading DICOM like a PACS engineer: bit depth, sign, rescale, polarity, hostile headers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from cxrsr.discovery import Source
from cxrsr.errors import InputError, NotARadiographError
from cxrsr.reading import read_radiograph, read_radiograph_bytes


def _native_copy(path: Path) -> pydicom.Dataset:
    """A decompressed, explicit-VR copy of a corpus file, to derive synthetic variants from."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.decompress() if ds.file_meta.TransferSyntaxUID.is_compressed else None
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _to_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_bits_stored_understating_the_data_keeps_the_image(corpus_dir: Path) -> None:
    """10-bit data declared as 8-bit: pydicom 3 would mask it to garbage; we widen instead."""
    original = read_radiograph(
        Source(str(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"))
    )
    ds = _native_copy(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm")
    assert int(ds.pixel_array.max()) > 255
    ds.BitsStored, ds.HighBit = 8, 7
    result = read_radiograph_bytes(_to_bytes(ds))
    assert any("above BitsStored 8" in w for w in result.warnings)
    # Read as 10-bit data: the same image as the correctly labelled original.
    np.testing.assert_allclose(result.pixels, original.pixels, atol=1e-3)


def test_signed_pixels_with_rescale_give_the_same_image(corpus_dir: Path) -> None:
    """Signed storage plus Rescale Intercept that restores the values is the same radiograph."""
    name = "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"
    original = read_radiograph(Source(str(corpus_dir / name)))
    ds = _native_copy(corpus_dir / name)
    values = ds.pixel_array.astype(np.int16) - 512
    ds.PixelRepresentation = 1
    ds.BitsStored, ds.HighBit = 11, 10  # signed 11-bit holds -1024..1023
    ds.PixelData = values.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = 512, 1
    result = read_radiograph_bytes(_to_bytes(ds))
    # Signed 11-bit spans 2048 values where the original's 10 bits span 1024: same image,
    # scaled about the centre of the range.
    expected_scale = np.corrcoef(result.pixels.ravel(), original.pixels.ravel())[0, 1]
    assert expected_scale > 0.9999


def test_monochrome1_is_inverted_exactly_once(corpus_dir: Path) -> None:
    mono2 = read_radiograph(Source(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")))
    relabelled = read_radiograph(Source(str(corpus_dir / "edge_fake_mono1_siim.dcm")))
    np.testing.assert_allclose(relabelled.pixels, -mono2.pixels, atol=1e-3)


def test_presentation_lut_inverse_does_not_invert_monochrome1_twice(corpus_dir: Path) -> None:
    """cxr05 is MONOCHROME1 + Presentation LUT Shape INVERSE: one inversion (PS3.3 C.8.11.1.1.1)."""
    path = corpus_dir / "cxr05_dx_canon_966_fixed_j2kr.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PresentationLUTShape == "INVERSE"
    result = read_radiograph(Source(str(path)))
    raw = ds.pixel_array.astype(np.float32)
    expected = (2 * (1 - raw / 4095) - 1) * 1024
    np.testing.assert_allclose(result.pixels, expected, atol=0.01)


def test_modality_lut_sequence_is_applied(corpus_dir: Path) -> None:
    path = corpus_dir / "bad_cr_dental_panoramic.dcm"
    ds = pydicom.dcmread(path)
    lut = np.frombuffer(ds.ModalityLUTSequence[0].LUTData, dtype="<u2")  # OW, 16-bit entries
    result = read_radiograph(Source(str(path)))
    mapped = lut[np.clip(ds.pixel_array, 0, len(lut) - 1)].astype(np.float32)
    expected = (2 * (1 - mapped / lut.max()) - 1) * 1024  # MONOCHROME1
    np.testing.assert_allclose(result.pixels, expected, atol=0.01)


def test_header_declaring_gigapixels_is_not_allocated(corpus_dir: Path) -> None:
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(InputError, match="65535x65535"):
        read_radiograph(Source(str(corpus_dir / "bad_oob_dims_65535.dcm")))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20


def test_truncated_native_pixel_data_fails(corpus_dir: Path) -> None:
    ds = _native_copy(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm")
    ds.PixelData = ds.PixelData[:1000]
    with pytest.raises(InputError, match=r"declares 440x440 pixels .* holds 1,000 bytes"):
        read_radiograph_bytes(_to_bytes(ds))


def test_no_preamble_no_meta_reads_like_the_file_with_meta(corpus_dir: Path) -> None:
    bare = read_radiograph(Source(str(corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm")))
    with_meta = read_radiograph(
        Source(str(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"))
    )
    np.testing.assert_array_equal(bare.pixels, with_meta.pixels)
    assert bare.identity["patient_id"] == ""


def test_non_dicom_and_empty_files_are_skipped(tmp_path: Path) -> None:
    for name, content in (("empty.dcm", b""), ("text.dcm", b"hello, this is not DICOM" * 10)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NotARadiographError, match="not a DICOM file"):
            read_radiograph(Source(str(tmp_path / name)))


def test_dicomdir_is_skipped_as_a_media_directory(tmp_path: Path) -> None:
    ds = pydicom.Dataset()
    ds.FileSetID = "CXR"
    ds.DirectoryRecordSequence = []
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "DICOMDIR"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(NotARadiographError, match="DICOMDIR"):
        read_radiograph(Source(str(path)))


def test_invalid_uids_are_reported(corpus_dir: Path) -> None:
    """The dental CR's SOP Instance UID has a leading zero ('01'): classified, with a warning."""
    result = read_radiograph(Source(str(corpus_dir / "bad_cr_dental_panoramic.dcm")))
    assert any(
        "SOPInstanceUID '999.999.01.23.45.6789' is not a valid" in w for w in result.warnings
    )
    clean = read_radiograph(Source(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")))
    assert not any("valid DICOM UID" in w for w in clean.warnings)
