"""Deterministic UIDs: valid under PS3.5 9.1, stable, and distinct where they must be."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from cxrsr.sr import uids


@pytest.mark.parametrize(
    "value, valid",
    [
        ("1.2.840.10008.5.1.4.1.1.88.34", True),
        ("2.25.0", True),
        ("2.25.012", False),  # leading zero in a component
        ("1.2.", False),
        (".1.2", False),
        ("1..2", False),
        ("1.2a.3", False),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),  # 65 characters
        ("1.2.3\n", False),  # pydicom 3.0's UID.is_valid says True ('$' matches before \n)
        ("", False),
    ],
)
def test_is_valid_uid_follows_ps3_5(value: str, valid: bool) -> None:
    assert uids.is_valid_uid(value) is valid


@pytest.mark.parametrize(
    "value, reason",
    [
        ("", "is empty"),
        ("1." + "2" * 63, "has 65 characters (at most 64)"),
        ("1.2a.3", "holds characters other than digits and dots ('a')"),
        ("1.2.3\n", "holds characters other than digits and dots ('\\n')"),
        ("1..2", "has an empty component"),
        ("1.2.", "has an empty component"),
        ("999.999.01.23", "has a component with a leading zero ('01')"),
        ("1.2.0.3", None),
    ],
)
def test_uid_problem_names_the_rule_broken(value: str, reason: str | None) -> None:
    assert uids.uid_problem(value) == reason


def test_pydicom_is_valid_is_weaker_which_is_why_we_keep_ours() -> None:
    """Issue 10 asked to use ``pydicom.uid.UID(x).is_valid``; it accepts a trailing newline.

    If a pydicom release fixes this, this test fails: switch to pydicom's then.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert UID("1.2.3\n").is_valid
    assert not uids.is_valid_uid("1.2.3\n")


def test_derived_uids_are_valid_stable_and_separate() -> None:
    series = uids.sr_series_uid("1.2.3", "densenet121-res224-all", "ab" * 32)
    assert uids.is_valid_uid(series)
    assert series.startswith("2.25.")
    assert series == uids.sr_series_uid("1.2.3", "densenet121-res224-all", "ab" * 32)
    # Other weights, another series; same inputs for another purpose, another UID.
    assert series != uids.sr_series_uid("1.2.3", "densenet121-res224-all", "cd" * 32)
    assert series != uids.derive_uid("sr-instance", ["1.2.3", "densenet121-res224-all", "ab" * 32])
    # Parts are joined unambiguously.
    assert uids.derive_uid("x", ["1.2", "3"]) != uids.derive_uid("x", ["1", "2.3"])


def test_known_value_does_not_drift() -> None:
    """A change of the derivation would re-key every SR already in a PACS: pin one value."""
    assert str(uids.NAMESPACE) == "00d085d2-e3ac-56a0-b2c4-e3cf00a6d34c"
    assert (
        uids.derive_uid("sr-series", ["1.2.3", "m", "w"])
        == "2.25.226272037253488773671072772832509059222"
    )


def _secondary_capture(patient_name: str) -> Dataset:
    """A minimal object of another kind than an SR, as a key image writer would build one."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientName = patient_name
    return ds


def test_content_uid_names_exactly_one_byte_stream() -> None:
    first_uid, first = uids.encode_with_content_uid(_secondary_capture("A^B"), "key-image")
    again_uid, again = uids.encode_with_content_uid(_secondary_capture("A^B"), "key-image")
    other_uid, other = uids.encode_with_content_uid(_secondary_capture("A^C"), "key-image")
    assert (first_uid, first) == (again_uid, again)  # same content: same UID, same bytes
    assert other_uid != first_uid and other != first  # any other byte: another UID
    assert uids.is_valid_uid(first_uid)
    written = pydicom.dcmread(io.BytesIO(first))
    assert written.SOPInstanceUID == written.file_meta.MediaStorageSOPInstanceUID == first_uid
    # The purpose keeps kinds of objects apart even for equal content.
    assert uids.encode_with_content_uid(_secondary_capture("A^B"), "other")[0] != first_uid


def test_content_uid_covers_what_derives_from_the_uid() -> None:
    """Values computed from the object's own UID are fixed by the placeholder pass."""

    def with_derived(ds: Dataset, uid: str) -> None:
        ds.SeriesInstanceUID = uids.derive_uid("derived", [uid])

    uid, data = uids.encode_with_content_uid(_secondary_capture("A^B"), "x", with_derived)
    written = pydicom.dcmread(io.BytesIO(data))
    assert written.SeriesInstanceUID == uids.derive_uid("derived", [uid])
    seen: list[str] = []
    uids.content_uid("x", lambda u: seen.append(u) or u.encode())
    assert seen[0] == uids.CONTENT_UID_PLACEHOLDER and seen[1] != seen[0]


@pytest.mark.parametrize("pixel_bytes", [6, 7, 3 * 1024 * 1024])
@pytest.mark.parametrize("vr", ["OB", "OW", "OB or OW, 8 bits", "OB or OW, 16 bits"])
def test_pixel_data_encoded_once_gives_the_same_file_and_uid(pixel_bytes: int, vr: str) -> None:
    """encode_with_content_uid encodes a last Pixel Data element once and the elements
    before it once (the UIDs spliced in); the file and the UID must be exactly what two
    whole encodings give (odd lengths included: the padding byte belongs to the element).
    highdicom leaves the VR "OB or OW" (its key images take this path)."""
    rng = np.random.default_rng(pixel_bytes)
    ds = _secondary_capture("A^B")
    if vr.startswith("OB or OW"):
        ds.BitsAllocated = int(vr.split(", ")[1].split()[0])
        vr = "OB or OW"
    ds.add_new(0x7FE00010, vr, rng.integers(0, 256, pixel_bytes, dtype=np.uint8).tobytes())

    def whole(uid: str) -> bytes:
        copy = Dataset(ds)
        copy.file_meta = FileMetaDataset(ds.file_meta)
        copy.SOPInstanceUID = uid
        copy.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        buffer = io.BytesIO()
        copy.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    assert uids._last_pixel_data(ds) is not None  # the single-encoding path is taken
    expected = uids.content_uid("key-image", whole)
    assert uids.encode_with_content_uid(ds, "key-image") == expected
    assert ds.PixelData == ds[0x7FE00010].value and max(ds.keys()) == 0x7FE00010  # put back


def test_pixel_data_not_last_takes_the_whole_encoding() -> None:
    ds = _secondary_capture("A^B")
    ds.add_new(0x7FE00010, "OB", b"\x01\x02")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00\x00")  # Data Set Trailing Padding after it
    assert uids._last_pixel_data(ds) is None
    uid, data = uids.encode_with_content_uid(ds, "key-image")
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == uid


@pytest.mark.parametrize("uid", ["2.25.1", "2.25.12", "2.25.123456789012345678901234567890123"])
def test_splicing_the_uid_in_is_writing_the_file_again(uid: str) -> None:
    """The final file of a key image is the placeholder's with the two UIDs spliced in:
    byte for byte what save_as writes, for UIDs of odd (padded) and even length."""

    def whole(value: str) -> bytes:
        ds = _secondary_capture("A^B")
        ds.SOPInstanceUID = value
        ds.file_meta.MediaStorageSOPInstanceUID = UID(value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    spliced = uids.respliced(whole(uids.CONTENT_UID_PLACEHOLDER), uid)
    assert spliced is not None, "the splice was refused: the whole encoding would be taken"
    assert spliced == whole(uid)
    assert uids.respliced(whole("1.2.3"), uid) is None  # no placeholder: refused
    assert uids.respliced(b"not a DICOM file", uid) is None
