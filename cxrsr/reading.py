"""Read a DICOM file and turn it into what torchxrayvision's models expect, or say why not.

The order of checks matters and follows what a PACS engineer would report first:

1. not DICOM at all → skipped;
2. a non-image object (presentation state, SR, ...) → skipped;
3. an image object whose pixel data is missing, truncated or absurdly large → failed
   (a broken file: someone should look at it);
4. not a chest radiograph (Modality, colour, multi-frame, BodyPartExamined) → skipped;
5. pixel data that cannot be decoded, or holds one value everywhere → failed.

Pixel values are mapped to torchxrayvision's [-1024, 1024] range by the range the
header declares (``2**BitsStored - 1`` for unsigned data, exactly as
``xrv.utils.read_xray_dcm`` does), after the Modality LUT (PS3.3 C.11.1), and
inverted once for MONOCHROME1 so that bone is bright (PS3.3 C.7.6.3.1.2). VOI LUT
windowing is not applied, because the model was trained without it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cxrsr.discovery import SNIFF_BYTES, Source, sniff_dicom
from cxrsr.errors import InputError, NotARadiographError
from cxrsr.preview import Display, display_from_header

#: SOP classes of projection radiographs (PS3.4 B.5): CR, and DX for presentation/processing.
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP_CLASSES = {
    CR_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
}
RADIOGRAPH_MODALITIES = {"CR", "DX"}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR (PS3.10 8.6)

#: BodyPartExamined values (PS3.16 Annex L and common vendor spellings) that mean the chest.
CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "TORAX", "TORACE", "POUMON", "BRUST")

#: No radiograph has more pixels than this (a 43 cm detector at 50 µm is ~8600², 74 M).
MAX_PIXELS = 16384 * 16384

MODEL_RANGE = 1024.0

# Real-world headers break VR rules all the time (e.g. UIDs with leading zeros); reading
# must not warn about each, the checks below report what matters.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


@dataclass
class Radiograph:
    """A decoded chest radiograph, ready for preprocessing."""

    pixels: np.ndarray
    """2-D float32 image in [-1024, 1024], bone bright (MONOCHROME2 sense)."""
    identity: dict[str, Any]
    """UIDs and header facts written to the results file."""
    warnings: list[str] = field(default_factory=list)
    decimation: int = 1
    """How many stored pixels each pixel spans per axis (>1 after reduced-resolution decoding)."""
    sample_origin: float | None = None
    """Where ``pixels[0, 0]`` lies in stored pixels (``None``: the centre of its block)."""
    display: Display | None = None
    """How a viewer shows the image (VOI window or LUT, inversion), for the preview."""


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def read_dataset(source: Source) -> Dataset:
    """Parse a file that sniffs as DICOM; files without meta get a transfer syntax.

    ``force=True`` reads bare data sets without preamble or file meta (ACR-NEMA
    style); pydicom then knows how it parsed them (``original_encoding``) but not the
    Transfer Syntax UID it needs to decode pixels, so it is set from that encoding.
    """
    # Sniff before open(): opening an archive member reads all of it.
    if not sniff_dicom(source.head(SNIFF_BYTES)):
        raise NotARadiographError("not a DICOM file")
    with source.open() as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fh, force=True)
        except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
            raise InputError(f"cannot parse DICOM: {exc}") from exc
    if not isinstance(getattr(ds, "file_meta", None), FileMetaDataset):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = (
                ExplicitVRLittleEndian if little else ExplicitVRBigEndian
            )
    return ds


def identity_of(ds: Dataset) -> dict[str, Any]:
    """The header facts the results file and the SR need (PS3.3 names, snake case)."""
    return {
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "patient_id": _text(ds, "PatientID"),
        "modality": _text(ds, "Modality"),
        "body_part_examined": _text(ds, "BodyPartExamined"),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "rows": int(ds.get("Rows") or 0),
        "columns": int(ds.get("Columns") or 0),
        "transfer_syntax_uid": str(ds.file_meta.get("TransferSyntaxUID", "")),
    }


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "no SOP Class UID")


def check_pixel_data(ds: Dataset) -> None:
    """Fail files whose image data is absent, truncated or impossibly large.

    Done before any decoding so a header that declares gigabytes of pixels but holds a
    few bytes never makes us allocate them.
    """
    sop_class = _text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_STORAGE_DIRECTORY:
        raise NotARadiographError("DICOMDIR (media directory), not an image")
    if "PixelData" not in ds:
        name = _sop_class_name(sop_class)
        if sop_class and "Image" not in name:
            raise NotARadiographError(f"{name} is not an image")
        raise InputError("no pixel data (the header has no Pixel Data element)")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if rows <= 0 or columns <= 0:
        raise InputError(f"invalid image size Rows={rows} Columns={columns}")
    pixels = rows * columns * frames
    if pixels > MAX_PIXELS:
        raise InputError(
            f"declares {rows}x{columns}x{frames} pixels, more than any radiograph "
            f"(limit {MAX_PIXELS:,}); not decoded"
        )
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        bits_allocated = int(ds.get("BitsAllocated") or 0)
        expected = (pixels * samples * bits_allocated + 7) // 8
        held = len(ds.PixelData)
        if held < expected:
            raise InputError(
                f"declares {rows}x{columns} pixels ({expected:,} bytes) but holds "
                f"{held:,} bytes of pixel data"
            )


def check_radiograph(ds: Dataset, notes: list[str]) -> None:
    """Skip what the model must not see: other modalities, colour, multi-frame, other body parts."""
    modality = _text(ds, "Modality").upper()
    sop_class = _text(ds, "SOPClassUID")
    reasons = []
    if modality not in RADIOGRAPH_MODALITIES and not (not modality and sop_class in DX_SOP_CLASSES):
        shown = (
            f"Modality {modality}" if modality else f"no Modality ({_sop_class_name(sop_class)})"
        )
        reasons.append(f"{shown} is not a radiograph (CR or DX)")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if int(ds.get("SamplesPerPixel") or 1) != 1 or photometric not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        reasons.append(f"colour image ({photometric or 'no PhotometricInterpretation'})")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        reasons.append(f"multi-frame ({frames} frames)")
    body_part = _text(ds, "BodyPartExamined")
    if body_part and not any(word in body_part.upper() for word in CHEST_WORDS):
        reasons.append(f"BodyPartExamined {body_part} is not the chest")
    if reasons:
        raise NotARadiographError("; ".join(reasons))
    if not body_part:
        notes.append("BodyPartExamined is absent: the header cannot confirm a chest image")


def _decode(ds: Dataset) -> np.ndarray:
    """Decode the stored values without pydicom's masking of bits above HighBit.

    pydicom 3 clears bits above HighBit in native data. Files whose BitsStored
    understates their data are common, and masking them silently destroys the image,
    so unsigned native data is read unmasked and checked by :func:`_value_range`.
    """
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    options: dict[str, Any] = {} if signed else {"correct_unused_bits": False}
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    if transfer_syntax in JPEG_LS and _has_module("jpeg_ls"):
        # CharLS decodes JPEG-LS about 4x faster than libjpeg, with identical output
        # (pydicom would otherwise pick pylibjpeg).
        options["decoding_plugin"] = "pyjpegls"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(**options)
            array = ds.pixel_array
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        # pydicom lists each plugin's error on its own line; keep them on one line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].startswith("Unable to decode"):
            lines = lines[1:]
        detail = "; ".join(lines) or type(exc).__name__
        raise InputError(f"cannot decode {transfer_syntax.name} pixel data: {detail}") from exc
    if array.ndim != 2:
        raise InputError(f"decoded pixel data has shape {array.shape}, expected one 2-D frame")
    return array


JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


#: Transfer syntaxes whose codecs can decode at a fraction of the resolution, cheaply.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def _j2k_precision(codestream: bytes) -> int | None:
    """Bit depth of component 0 from the SIZ marker segment (ITU-T T.800 A.5.1)."""
    at = codestream.find(b"\xff\x51", 0, 64)
    if at < 0 or len(codestream) < at + 41:
        return None
    return (codestream[at + 40] & 0x7F) + 1


def _decode_reduced(ds: Dataset, min_size: int) -> tuple[np.ndarray, int, float | None] | None:
    """Decode a JPEG baseline or JPEG 2000 frame at 1/2, 1/4 or 1/8 size, or ``None``.

    Both codecs can stop early: JPEG by scaling its 8x8 DCT blocks (libjpeg's "draft"
    mode), JPEG 2000 by skipping the finest wavelet levels. Each level halves the image
    and is itself a low-pass filter, so nothing aliases; the largest reduction that
    keeps at least ``min_size`` pixels on the short side is used. This is 5-13x faster
    than a full decode of a 2000-pixel radiograph. Anything unusual returns ``None`` and
    the caller decodes in full (which also produces the error message for corrupt data).
    """
    from PIL import Image
    from pydicom.encaps import generate_frames

    transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    if transfer_syntax != JPEG_BASELINE and transfer_syntax not in JPEG_2000:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    level = 0
    while level < 3 and min(rows, columns) >> (level + 1) >= min_size:
        level += 1
    if level == 0:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with warnings.catch_warnings(), Image.open(io.BytesIO(frame)) as image:
            warnings.simplefilter("ignore")
            if image.mode not in ("L", "I;16"):
                return None
            if transfer_syntax == JPEG_BASELINE:
                image.draft(image.mode, (columns >> level, rows >> level))
                level = round(np.log2(columns / image.size[0]))
            else:
                # Jpeg2KImageFile reads this attribute before decoding (not in Pillow's stubs).
                setattr(image, "reduce", level)  # noqa: B010
            array = np.asarray(image)
    except Exception:
        return None
    if array.ndim != 2 or abs(array.shape[0] * (1 << level) - rows) > (1 << level):
        return None
    if array.dtype == np.uint16:
        # Pillow widens JPEG 2000 samples to 16 bits by shifting them left.
        precision = _j2k_precision(frame)
        if precision is None or precision > 16:
            return None
        array = array >> (16 - precision)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return None  # signed data: leave sign handling to pydicom
    # JPEG's scaled IDCT centres each output pixel on its block; JPEG 2000's low-pass
    # band keeps the even-indexed samples, so its pixel 0 lies on stored pixel 0.
    origin = None if transfer_syntax == JPEG_BASELINE else 0.0
    return array, 1 << level, origin


def _value_range(array: np.ndarray, ds: Dataset, notes: list[str]) -> tuple[float, float]:
    """The range of stored values the header allows, widened when the data exceeds it."""
    bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation") or 0) == 1:
        return -(2.0 ** (bits_stored - 1)), 2.0 ** (bits_stored - 1) - 1
    declared_max = 2**bits_stored - 1
    data_max = int(array.max())
    if data_max > declared_max:
        bits = data_max.bit_length()
        notes.append(
            f"pixel values reach {data_max}, above BitsStored {bits_stored} (max {declared_max}); "
            f"read as {bits}-bit data instead of masking the high bits"
        )
        return 0.0, float(2**bits - 1)
    return 0.0, float(declared_max)


def _apply_modality_lut(
    array: np.ndarray, ds: Dataset, low: float, high: float
) -> tuple[np.ndarray, float, float]:
    """Apply Rescale Slope/Intercept or a Modality LUT Sequence (PS3.3 C.11.1) and map the range."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        # The LUT's own output values bound the range; LUT Descriptor's bit depth
        # (often 16) says only how they are stored.
        lut = apply_modality_lut(np.arange(int(low), int(high) + 1), ds)
        return apply_modality_lut(array, ds), float(lut.min()), float(lut.max())
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept == 0.0:
        return array, low, high
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return array.astype(np.float64) * slope + intercept, ends[0], ends[1]


def _inverts(ds: Dataset) -> bool:
    """Whether displayed grey levels run opposite to stored values.

    MONOCHROME1 means "minimum is white". In DX files it comes with Presentation LUT
    Shape INVERSE, which describes that same inversion (PS3.3 C.8.11.1.1.1), so the
    image is inverted once, not twice. INVERSE on MONOCHROME2 inverts the display.
    """
    photometric = _text(ds, "PhotometricInterpretation").upper()
    shape = _text(ds, "PresentationLUTShape").upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


def to_model_range(array: np.ndarray, ds: Dataset, notes: list[str]) -> tuple[np.ndarray, Display]:
    """Map stored values to [-1024, 1024], bone bright, as ``xrv.utils.normalize`` does.

    Also returns how a viewer would display them (the preview's VOI, see ``preview.py``).
    """
    low, high = _value_range(array, ds, notes)
    values, low, high = _apply_modality_lut(array, ds, low, high)
    if high <= low:
        raise InputError(f"empty value range [{low}, {high}] after the Modality LUT")
    if low == 0.0:
        # Same float32 arithmetic as xrv.utils.normalize, so results match it exactly.
        scaled = values.astype(np.float32) / np.float32(high)
    else:
        scaled = ((values.astype(np.float64) - low) / (high - low)).astype(np.float32)
    inverted = _inverts(ds)
    if inverted:
        scaled = np.float32(1.0) - scaled
    return (2 * scaled - 1.0) * MODEL_RANGE, display_from_header(ds, low, high, inverted)


def check_uids(ds: Dataset, notes: list[str]) -> None:
    """Warn about identifying UIDs that break PS3.5 9.1 (digits and dots, no leading zeros).

    Such files are common in the wild. The image can still be classified, but a PACS may
    refuse it, and an SR cannot validly reference it (generate_sr.py says so too).
    """
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        value = _text(ds, keyword)
        if not value:
            raise InputError(f"no {keyword}: the image cannot be identified")
        if not UID(value).is_valid:
            notes.append(f"{keyword} {value!r} is not a valid DICOM UID (PS3.5 9.1)")


def read_radiograph(source: Source, min_size: int | None = None) -> Radiograph:
    """Read, check and decode one file; raise :class:`InputError` (or its subclass) if unusable.

    With ``min_size``, codecs that can decode at reduced resolution may return an image
    whose short side is at least ``min_size`` (see :attr:`Radiograph.decimation`).
    """
    ds = read_dataset(source)
    check_pixel_data(ds)
    notes: list[str] = []
    check_radiograph(ds, notes)
    check_uids(ds, notes)
    reduced = _decode_reduced(ds, min_size) if min_size else None
    array, decimation, origin = reduced if reduced is not None else (_decode(ds), 1, None)
    low_value, high_value = array.min(), array.max()
    if low_value == high_value:
        raise InputError(f"every pixel has the value {low_value}: no image content")
    pixels, display = to_model_range(array, ds, notes)
    return Radiograph(pixels, identity_of(ds), notes, decimation, origin, display)


def read_radiograph_bytes(data: bytes, name: str = "<bytes>") -> Radiograph:
    """Like :func:`read_radiograph` for bytes already in memory (tests, archives)."""

    class _Memory(Source):
        def open(self) -> io.BytesIO:
            return io.BytesIO(data)

    return read_radiograph(_Memory(name))
