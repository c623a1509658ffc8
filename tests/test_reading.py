"""Reading DICOM like a PACS engineer: bit depth, sign, rescale, polarity, hostile headers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.reading import read_radiograph, read_radiograph_bytes
from cxrsr.errors import InputError, NotARadiographError


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
    # The declared range is what maps to [-1024, 1024]: signed 11-bit after the intercept
    # spans -512..1535 (2048 values) where the original's unsigned 10 bits span 0..1023.
    # So each value lands where that range puts it, MONOCHROME1 inverted:
    stored = pydicom.dcmread(corpus_dir / name).pixel_array.astype(np.float64)
    expected = (2 * (1 - (stored + 512) / 2047) - 1) * 1024
    # float32 arithmetic on values up to 1024: well under 0.01 of error.
    np.testing.assert_allclose(result.pixels, expected, atol=0.01)
    # The same picture as the original, in the wider range: an affine map of its pixels.
    on_wider_range = ((original.pixels / 1024 + 1) / 2 * 1023 + 512) / 2047 * 2048 - 1024
    np.testing.assert_allclose(result.pixels, on_wider_range, atol=0.01)


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


def _with_presentation_lut_shape(ds: pydicom.Dataset, shape: str) -> bytes:
    copy = pydicom.Dataset(ds)
    copy.file_meta = ds.file_meta
    copy.PresentationLUTShape = shape
    return _to_bytes(copy)


@pytest.mark.parametrize("window", [None, ("100", "120")], ids=["min-max", "window"])
def test_presentation_lut_inverse_inverts_monochrome2(
    corpus_dir: Path, window: tuple[str, str] | None
) -> None:
    """MONOCHROME2 with Presentation LUT Shape INVERSE is displayed inverted (PS3.3
    C.11.6.1.2: the output of the VOI transform is inverted), as MONOCHROME1 is: the model
    gets the negative of the IDENTITY file's input and the preview the negative grey levels.

    torchxrayvision's ``read_xray_dcm`` inverts only on MONOCHROME1 and ignores the
    Presentation LUT Shape, so it would feed this file to the model with bone dark: the
    opposite of what the radiologist sees and of the polarity the model was trained on.
    """
    from cxrsr.dicomio.preview import make_preview

    ds = _native_copy(corpus_dir / "cxr10_nih_dx_8bit.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    identity = read_radiograph_bytes(_with_presentation_lut_shape(ds, "IDENTITY"))
    inverse = read_radiograph_bytes(_with_presentation_lut_shape(ds, "INVERSE"))
    assert np.ptp(identity.pixels) > 1000  # a real image, not a flat one
    np.testing.assert_allclose(inverse.pixels, -identity.pixels, atol=1e-3)

    assert identity.display is not None and inverse.display is not None
    shape = (int(ds.Rows), int(ds.Columns))
    shown = make_preview(identity.pixels, identity.display, shape).astype(int)
    shown_inverse = make_preview(inverse.pixels, inverse.display, shape).astype(int)
    assert np.ptp(shown) > 100
    # 8-bit grey levels: rounding at a half may differ by one level.
    np.testing.assert_allclose(shown_inverse, 255 - shown, atol=1)


def test_modality_lut_sequence_is_applied(corpus_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(corpus_dir / "bad_cr_dental_panoramic.dcm")
    ds.SOPInstanceUID = "999.999.1.23.45.6789"  # the corpus file's breaks PS3.5 9.1 ('01')
    path = tmp_path / "dental.dcm"
    ds.save_as(path)
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


def test_an_image_with_an_invalid_uid_fails_before_it_is_classified(corpus_dir: Path) -> None:
    """The dental CR's SOP Instance UID has a leading zero ('01'): no valid SR could
    reference it, so it fails at reading, naming the UID and the rule, and is never
    classified (generate_sr.py would refuse its SR after the model had run)."""
    from cxrsr.classify import prepare

    prepared = prepare(Source(str(corpus_dir / "bad_cr_dental_panoramic.dcm")))
    assert prepared.status == "failed"
    assert prepared.reason == (
        "SOPInstanceUID '999.999.01.23.45.6789' is not a valid DICOM UID (PS3.5 9.1): "
        "it has a component with a leading zero ('01'); an SR cannot reference this image"
    )
    clean = read_radiograph(Source(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")))
    assert not any("valid DICOM UID" in w for w in clean.warnings)


CR_CHEST = "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"


@pytest.mark.parametrize(
    "sop_class",
    [
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # mammography For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # intra-oral For Processing
    ],
)
def test_for_processing_sop_classes_are_skipped(corpus_dir: Path, sop_class: str) -> None:
    ds = _native_copy(corpus_dir / CR_CHEST)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality = "DX"
    with pytest.raises(NotARadiographError, match="For Processing: raw detector data"):
        read_radiograph_bytes(_to_bytes(ds))


def test_presentation_intent_for_processing_is_skipped(corpus_dir: Path, tmp_path: Path) -> None:
    from cxrsr.classify import prepare

    ds = _native_copy(corpus_dir / CR_CHEST)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PROCESSING"
    path = tmp_path / "raw.dcm"
    path.write_bytes(_to_bytes(ds))
    prepared = prepare(Source(str(path)))
    assert prepared.status == "skipped" and prepared.model_input is None
    assert "Presentation Intent Type FOR PROCESSING" in prepared.reason
    ds.PresentationIntentType = "FOR PRESENTATION"
    path.write_bytes(_to_bytes(ds))
    assert prepare(Source(str(path))).status == "ready"


def _with_embedded_overlay(ds: pydicom.Dataset, bit: int, group: int = 0x6000) -> np.ndarray:
    """Draw a rectangle into pixel bit ``bit`` and describe it as an embedded Overlay Plane."""
    pixels = ds.pixel_array.astype(np.uint16)
    graphic = np.zeros(pixels.shape, dtype=bool)
    graphic[20:60, 30:200] = True  # a burnt-in annotation box
    ds.PixelData = (pixels | (graphic.astype(np.uint16) << bit)).tobytes()
    ds.add_new((group, 0x0010), "US", pixels.shape[0])  # Overlay Rows
    ds.add_new((group, 0x0011), "US", pixels.shape[1])  # Overlay Columns
    ds.add_new((group, 0x0040), "CS", "G")  # Overlay Type: graphics
    ds.add_new((group, 0x0050), "SS", [1, 1])  # Overlay Origin
    ds.add_new((group, 0x0100), "US", 16)  # Overlay Bits Allocated (= the pixel's)
    ds.add_new((group, 0x0102), "US", bit)  # Overlay Bit Position, no (60xx,3000)
    return graphic


def test_embedded_overlay_bits_are_masked_not_read_as_image(corpus_dir: Path) -> None:
    """Graphics in bit 12 of 10-bit CR data: masked; 'BitsStored understates' must not fire."""
    original = read_radiograph(Source(str(corpus_dir / CR_CHEST)))
    ds = _native_copy(corpus_dir / CR_CHEST)
    _with_embedded_overlay(ds, 12)
    _with_embedded_overlay(ds, 15, group=0x6002)
    result = read_radiograph_bytes(_to_bytes(ds))
    np.testing.assert_array_equal(result.pixels, original.pixels)
    assert not any("above BitsStored" in w for w in result.warnings)
    assert any("embedded in pixel bit 12, 15" in w for w in result.warnings)


def test_overlay_with_its_own_data_leaves_the_high_bits_alone(corpus_dir: Path) -> None:
    """With Overlay Data (60xx,3000) the overlay is not in the pixels: the data rule still holds."""
    ds = _native_copy(corpus_dir / CR_CHEST)
    graphic = _with_embedded_overlay(ds, 12)
    ds.add_new((0x6000, 0x3000), "OW", np.packbits(graphic, bitorder="little").tobytes())
    result = read_radiograph_bytes(_to_bytes(ds))
    assert any("above BitsStored 10" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("SOPClassUID", None, "no SOPClassUID: an SR cannot reference this image"),
        ("SOPInstanceUID", "", "no SOPInstanceUID: an SR cannot reference this image"),
        ("SOPClassUID", "CR Image Storage", "holds characters other than digits and dots"),
        ("SOPInstanceUID", "1." * 40 + "1", "has 81 characters (at most 64)"),
        ("SeriesInstanceUID", "1.2.03", "has a component with a leading zero ('03')"),
        ("StudyInstanceUID", "1.2..3", "has an empty component"),
    ],
)
def test_images_an_sr_cannot_reference_fail(
    corpus_dir: Path, tmp_path: Path, keyword: str, value: str | None, reason: str
) -> None:
    from cxrsr.classify import prepare

    ds = _native_copy(corpus_dir / CR_CHEST)
    if value is None:
        delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    path = tmp_path / "noref.dcm"
    path.write_bytes(_to_bytes(ds))
    prepared = prepare(Source(str(path)))
    assert prepared.status == "failed", prepared.reason
    assert reason in prepared.reason and keyword in prepared.reason, prepared.reason
