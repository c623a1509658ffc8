"""Read a DICOM file and turn it into what torchxrayvision's models expect, or say why not.

The order of checks matters and follows what a PACS engineer would report first:

1. not DICOM at all → skipped;
2. a non-image object (presentation state, SR, ...) → skipped;
3. an image object whose pixel data is missing, truncated, absurdly large or over the
   per-worker memory budget (judged from the header, before the pixels are read) →
   failed (a broken or hostile file: someone should look at it);
4. not a chest radiograph (DX For Processing, Modality, colour, multi-frame,
   BodyPartExamined) → skipped;
5. a missing UID, or one that breaks PS3.5 9.1 (an SR could not reference it) → failed;
   outside the model's training domain (species, view, orientation: :mod:`cxrsr.dicomio.domain`)
   → skipped, or classified with a warning, as the domain policy says;
6. pixel data that cannot be decoded, or holds one value everywhere → failed.

Pixel values are then mapped to the model's range by :mod:`cxrsr.dicomio.pixel_values`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
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

from cxrsr.dicomio.discovery import SNIFF_BYTES, Source, sniff_dicom
from cxrsr.dicomio.domain import DomainPolicy, check_domain
from cxrsr.dicomio.pixel_values import mask_embedded_overlays, to_model_range
from cxrsr.dicomio.preview import Display
from cxrsr.errors import InputError, NotARadiographError
from cxrsr.sr.uids import uid_problem

#: SOP classes of projection radiographs (PS3.4 B.5): CR, and DX for presentation.
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP_CLASSES = {
    CR_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
#: DX, mammography and intra-oral "For Processing" SOP classes (PS3.4 B.5): raw detector
#: data, before the vendor's image processing; the model was trained on processed images.
FOR_PROCESSING_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "Digital Intra-Oral X-Ray Image Storage - For Processing",
}
RADIOGRAPH_MODALITIES = {"CR", "DX"}
MEDIA_STORAGE_DIRECTORY = pydicom.uid.MediaStorageDirectoryStorage  # DICOMDIR (PS3.10 8.6)

#: BodyPartExamined values (PS3.16 Annex L and common vendor spellings) that mean the chest.
CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "TORAX", "TORACE", "POUMON", "BRUST")

#: No radiograph has more pixels than this (a 43 cm detector at 50 µm is ~8600², 74 M).
MAX_PIXELS = 16384 * 16384

#: Memory one reader process may spend on one image: the file's bytes
#: (pydicom holds Pixel Data in memory), the decoder's output and temporaries, and the
#: float32 image. An image whose :func:`decode_memory` estimate exceeds it is refused
#: before anything is decoded. 1 GiB admits the largest detectors at full resolution
#: (8600x8600 at 16 bits, 43x43 cm at 50 µm: 600-680 MiB) and refuses a header that
#: claims 16384x16384 (over 2 GiB; a JPEG-LS stream of a few kB that really was that
#: size cost 3.6 GB before this check). ``bench/memory.py`` measures both.
MEMORY_BUDGET = 1 << 30

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


#: Values longer than this (Pixel Data above all) are read from the file only when used,
#: after :func:`check_pixel_data` has judged the header (pydicom's ``defer_size``).
DEFER_BYTES = 1 << 20


@contextlib.contextmanager
def open_dataset(source: Source) -> Iterator[Dataset]:
    """Parse a file that sniffs as DICOM; files without meta get a transfer syntax.

    The file stays open inside the ``with`` block: values over :data:`DEFER_BYTES`
    (native Pixel Data) are read from it only when used, so a header that declares
    more than the memory budget is refused before its pixels are read.

    ``force=True`` reads bare data sets without preamble or file meta (ACR-NEMA
    style); pydicom then knows how it parsed them (``original_encoding``) but not the
    Transfer Syntax UID it needs to decode pixels, so it is set from that encoding.
    """
    # Sniff before open(): opening an archive member reads all of it.
    if not sniff_dicom(source.head(SNIFF_BYTES)):
        raise NotARadiographError("not a DICOM file")
    size = source.size
    if size > MEMORY_BUDGET:
        raise InputError(
            f"file of {size:,} bytes is larger than the per-worker memory budget of "
            f"{MEMORY_BUDGET >> 20:,} MiB; not read"
        )
    with source.open() as fh:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fh, force=True, defer_size=DEFER_BYTES)
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
        ds.cxrsr_file_size = size  # for check_pixel_data: what a deferred value can hold
        yield ds


def _pixel_data_bytes(ds: Dataset) -> int:
    """Bytes of Pixel Data the file holds, without reading a deferred value."""
    element = ds.get_item("PixelData", keep_deferred=True)
    if element is None:
        return 0
    value = element.value
    if value is not None:
        return len(value)
    # Deferred: the declared length, or what is left of the file when it is truncated.
    remaining = int(getattr(ds, "cxrsr_file_size", 0)) - int(getattr(element, "value_tell", 0))
    return max(min(int(getattr(element, "length", 0)), remaining), 0)


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
    held = _pixel_data_bytes(ds)
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
        bits_allocated = int(ds.get("BitsAllocated") or 0)
        expected = (pixels * samples * bits_allocated + 7) // 8
        if held < expected:
            raise InputError(
                f"declares {rows}x{columns} pixels ({expected:,} bytes) but holds "
                f"{held:,} bytes of pixel data"
            )
    needed = decode_memory(ds, held)
    if needed > MEMORY_BUDGET:
        raise InputError(
            f"decoding {rows}x{columns}x{frames} pixels would need about {needed >> 20:,} MiB, "
            f"more than the per-worker memory budget of {MEMORY_BUDGET >> 20:,} MiB; not decoded"
        )


#: What any decode costs besides its pixels: decoder modules imported on first use, the
#: resize's small arrays (about 15 MiB measured; ``bench/memory.py``).
_FIXED_COST = 32 << 20


def decode_memory(ds: Dataset, held_bytes: int) -> int:
    """Bytes a reader process needs at its peak to decode and map ``ds``, estimated from the header.

    A fixed cost and the encoded bytes already held, plus per pixel: the decoder's output (BitsAllocated
    rounded up to whole bytes, per sample), its temporaries and the float32 image
    (:func:`cxrsr.dicomio.pixel_values.to_model_range` works in place). ``bench/memory.py``
    measures the real peak against it.
    """
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    sample_bytes = max((int(ds.get("BitsAllocated") or 16) + 7) // 8, 1)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    # Besides its output array, per sample: native data is copied once into the output;
    # RLE, JPEG and JPEG-LS decoders return a buffer of the output's size that pydicom
    # copies; OpenJPEG decodes JPEG 2000 into 32-bit integers first.
    if not transfer_syntax.is_encapsulated:
        temporary = 0
    elif str(transfer_syntax) in JPEG_2000:
        temporary = 4
    else:
        temporary = sample_bytes
    # Then the float32 image; pydicom's Modality LUT Sequence lookup needs about 10 bytes
    # per pixel of masks and index arrays besides.
    mapping = 4 + (10 if "ModalityLUTSequence" in ds else 0)
    per_pixel = samples * (sample_bytes + temporary + mapping)
    return _FIXED_COST + held_bytes + rows * columns * frames * per_pixel


def check_radiograph(ds: Dataset, notes: list[str]) -> None:
    """Skip what the model must not see: other modalities, colour, multi-frame, other body parts.

    DX "For Processing" images are skipped first and alone: they are raw detector data
    (PS3.3 C.8.11.1.1.1 Presentation Intent Type), whatever else the header says.
    """
    modality = _text(ds, "Modality").upper()
    sop_class = _text(ds, "SOPClassUID")
    if sop_class in FOR_PROCESSING_SOP_CLASSES:
        raise NotARadiographError(
            f"{FOR_PROCESSING_SOP_CLASSES[sop_class]}: raw detector data, not a processed "
            "image the model was trained on"
        )
    if _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        raise NotARadiographError(
            "Presentation Intent Type FOR PROCESSING: raw detector data, not a processed "
            "image the model was trained on"
        )
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
    so unsigned native data is read unmasked and checked by ``cxrsr.dicomio.pixel_values._value_range``.
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


#: The UIDs an SR copies to reference its source image (PS3.3 C.17.2.1, TID 1500).
REFERENCED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


def check_uids(ds: Dataset) -> None:
    """Fail an image whose SR could not reference it, naming the UID and the rule it breaks.

    An SR references its source by SOP Class and SOP Instance UID and copies the study and
    series UIDs (PS3.3 C.17.2.1): without them, or with a value that breaks PS3.5 9.1
    (:func:`cxrsr.sr.uids.uid_problem`, the rule the SR builder applies too), no valid SR
    can be written. Such an image fails here, before the model runs: what cannot be
    reported is not classified.
    """
    for keyword in REFERENCED_UIDS:
        value = _text(ds, keyword)
        if not value:
            raise InputError(f"no {keyword}: an SR cannot reference this image")
        problem = uid_problem(value)
        if problem is not None:
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise InputError(
                f"{keyword} {shown!r} is not a valid DICOM UID (PS3.5 9.1): it {problem}; "
                "an SR cannot reference this image"
            )


def read_radiograph(
    source: Source,
    min_size: int | None = None,
    domain: DomainPolicy = DomainPolicy.STRICT,
) -> Radiograph:
    """Read, check and decode one file; raise :class:`InputError` (or its subclass) if unusable.

    With ``min_size``, codecs that can decode at reduced resolution may return an image
    whose short side is at least ``min_size`` (see :attr:`Radiograph.decimation`).
    ``domain`` is the policy of the domain gates (:mod:`cxrsr.dicomio.domain`); the pixels come
    back turned to the standard display the gates found in Patient Orientation.
    """
    with open_dataset(source) as ds:
        check_pixel_data(ds)
        notes: list[str] = []
        check_radiograph(ds, notes)
        check_uids(ds)
        decision = check_domain(ds, domain)
        if decision.skip_reason:
            raise NotARadiographError(decision.skip_reason)
        notes.extend(decision.warnings)
        if not decision.reorientation.is_identity:
            # A reduced decode's sample phase is anchored at the stored top-left corner;
            # after a flip it would sit at the other end, so a turned image is decoded in full.
            min_size = None
        reduced = _decode_reduced(ds, min_size) if min_size else None
        array, decimation, origin = reduced if reduced is not None else (_decode(ds), 1, None)
        del ds.PixelData  # the encoded bytes are no longer needed: free them before mapping
        array = mask_embedded_overlays(array, ds, notes)
        low_value, high_value = array.min(), array.max()
        if low_value == high_value:
            raise InputError(f"every pixel has the value {low_value}: no image content")
        pixels, display = to_model_range(array, ds, notes)
        pixels = decision.reorientation.apply(pixels)
        return Radiograph(
            pixels, identity_of(ds) | decision.record(), notes, decimation, origin, display
        )


def read_radiograph_bytes(
    data: bytes, name: str = "<bytes>", domain: DomainPolicy = DomainPolicy.STRICT
) -> Radiograph:
    """Like :func:`read_radiograph` for bytes already in memory (tests, archives)."""

    class _Memory(Source):
        def open(self) -> io.BytesIO:
            return io.BytesIO(data)

        def head(self, n: int = SNIFF_BYTES) -> bytes:
            return data[:n]

        @property
        def size(self) -> int:
            return len(data)

    return read_radiograph(_Memory(name), domain=domain)
