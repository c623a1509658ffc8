"""From stored pixel values to the model's range, as torchxrayvision reads a radiograph.

Pixel values are mapped to torchxrayvision's [-1024, 1024] range by the range the header
declares (``2**BitsStored - 1`` for unsigned data, exactly as ``xrv.utils.read_xray_dcm``
does), after the Modality LUT (PS3.3 C.11.1), and inverted once for MONOCHROME1 so that
bone is bright (PS3.3 C.7.6.3.1.2), in float32. Overlay graphics embedded in unused high
bits are masked first (:func:`mask_embedded_overlays`). VOI LUT windowing is not applied,
because the model was trained without it; it is kept for the display preview
(:mod:`cxrsr.dicomio.preview`).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from cxrsr.dicomio.preview import Display, display_from_header
from cxrsr.errors import InputError

MODEL_RANGE = 1024.0


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def embedded_overlay_bits(ds: Dataset) -> list[int]:
    """Bit positions of overlays stored in the pixel data's unused bits, for unsigned data.

    Older CR files put overlay graphics (annotations, shutters) into the bits of each
    pixel outside BitsStored (PS3.5 8.1.2 and PS3.3 C.9.2, usage retired since 2004): an
    Overlay Plane with Overlay Bit Position (60xx,0102) outside the stored bits and no
    Overlay Data (60xx,3000) of its own. Those bits are graphics, not image.
    """
    if int(ds.get("PixelRepresentation") or 0) != 0:
        return []  # signed data: pydicom already clears the bits above HighBit
    bits_allocated = int(ds.get("BitsAllocated") or 0)
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    high_bit = int(ds.get("HighBit") if ds.get("HighBit") is not None else bits_stored - 1)
    low_bit = high_bit - bits_stored + 1
    positions = []
    for group in range(0x6000, 0x6020, 2):
        element = ds.get((group, 0x0102))
        if element is None or (group, 0x3000) in ds:
            continue
        try:
            position = int(element.value)
        except (TypeError, ValueError):
            continue
        if (position < low_bit or position > high_bit) and 0 <= position < bits_allocated:
            positions.append(position)
    return sorted(set(positions))


def mask_embedded_overlays(array: np.ndarray, ds: Dataset, notes: list[str]) -> np.ndarray:
    """Clear the bits that hold embedded overlays (:func:`embedded_overlay_bits`)."""
    positions = embedded_overlay_bits(ds)
    if not positions or array.dtype.kind != "u":
        return array
    mask = 0
    for position in positions:
        mask |= 1 << position
    keep = np.array(~mask & ((1 << (8 * array.dtype.itemsize)) - 1), dtype=array.dtype)
    shown = ", ".join(str(p) for p in positions)
    notes.append(f"overlay graphics embedded in pixel bit {shown} (Overlay Plane) masked out")
    return np.bitwise_and(array, keep)


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
    values = array.astype(np.float32)  # float32 throughout: 4 bytes per pixel, in place
    values *= np.float32(slope)
    values += np.float32(intercept)
    return values, ends[0], ends[1]


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
    # float32 in place: one 4-byte array per pixel, never a float64 copy.
    # With low == 0 this is xrv.utils.normalize's arithmetic, so results match it exactly.
    owned = values is not array and values.dtype == np.float32
    scaled = values if owned else values.astype(np.float32)
    if low != 0.0:
        scaled -= np.float32(low)
    scaled /= np.float32(high - low)
    inverted = _inverts(ds)
    display = display_from_header(ds, low, high, inverted)
    if inverted:
        np.subtract(np.float32(1.0), scaled, out=scaled)
    scaled *= np.float32(2.0)
    scaled -= np.float32(1.0)
    scaled *= np.float32(MODEL_RANGE)
    return scaled, display
