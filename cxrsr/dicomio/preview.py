"""A display preview of a radiograph: what a radiologist would see, at up to 1024 pixels.

The preview is made from the pixels the reader already decoded for the model (no second
decode), in the orientation the model saw. Those pixels are in torchxrayvision's
[-1024, 1024] range, a linear function of the stored values after the Modality LUT, so
the file's VOI transform (PS3.3 C.11.2) can be applied to them once that function is
undone:

- a VOI LUT Sequence when present (its first item), else
- Window Center/Width with VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID (the first
  window when several are given; PS3.3 C.11.2.1.2 and C.11.2.1.3), else
- the image's own minimum and maximum.

MONOCHROME1 (and Presentation LUT Shape INVERSE) is then inverted so that bone is bright.
``preview_crop`` gives the square the model saw in preview pixels, so that a 224x224
heatmap can be laid over it.

The preview keeps the detail the reader decoded and never enlarges it: its long side is
that of the decoded pixels, at most :data:`PREVIEW_LONG_SIDE`. An enlarged copy would
hold no more information, cost several times as much to encode and store, and the key
image (``cxrsr.sr.keyimage``) and the browser enlarge it anyway when they show it.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from PIL import Image
from pydicom.multival import MultiValue

#: The preview's longest side, in pixels: larger decodes are scaled down to it.
PREVIEW_LONG_SIDE = 1024
MODEL_RANGE = 1024.0


@dataclass(frozen=True)
class Display:
    """How stored values become grey levels on a viewer, read from the header.

    ``modality_low``/``modality_high`` are the values (after the Modality LUT) that the
    reader mapped to -1024 and 1024 (swapped when ``inverted``); ``inverted`` means that
    the display inverts them (MONOCHROME1, or Presentation LUT Shape INVERSE).
    """

    modality_low: float
    modality_high: float
    inverted: bool
    window: tuple[float, float, str] | None = None
    """Window Center, Window Width and VOI LUT Function of the first window."""
    lut_first_mapped: int = 0
    lut: np.ndarray | None = None
    """The VOI LUT Sequence's first table (float), when the file has one."""


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | MultiValue):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def display_from_header(ds: Any, low: float, high: float, inverted: bool) -> Display:
    """The :class:`Display` of a dataset, ignoring VOI attributes that cannot be applied."""
    window = None
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if center is not None and width is not None:
        usable = {"LINEAR": width >= 1, "LINEAR_EXACT": width > 0, "SIGMOID": width > 0}
        if usable.get(function, False):
            window = (center, width, function)
    lut = None
    first_mapped = 0
    if ds.get("VOILUTSequence"):
        try:
            from pydicom.pixels import apply_voi

            item = ds.VOILUTSequence[0]
            entries = int(item.LUTDescriptor[0]) or 65536
            first_mapped = int(item.LUTDescriptor[1])
            domain = np.arange(first_mapped, first_mapped + entries)
            table = np.asarray(apply_voi(domain, ds, 0), dtype=np.float32)
            if table.shape == (entries,) and float(table.max()) > float(table.min()):
                lut = table
        except Exception:  # a malformed LUT: fall back to the window, else min-max
            lut = None
    return Display(low, high, inverted, window, first_mapped, lut)


def modality_values(pixels: np.ndarray, display: Display) -> np.ndarray:
    """Undo the reader's [-1024, 1024] mapping: the values after the Modality LUT."""
    fraction = (pixels.astype(np.float32) / np.float32(MODEL_RANGE) + 1) / 2
    if display.inverted:
        fraction = 1 - fraction
    return display.modality_low + fraction * np.float32(
        display.modality_high - display.modality_low
    )


def window_linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), to [0, 1]."""
    if function == "SIGMOID":
        return 1 / (1 + np.exp(-4 * (values - center) / width))
    if function == "LINEAR":
        center, width = center - 0.5, width - 1
    if width <= 0:  # LINEAR with width 1: a hard threshold at the centre
        return (values > center).astype(np.float32)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def display_grey(pixels: np.ndarray, display: Display) -> np.ndarray:
    """Grey levels in [0, 1] (1 = white) as a viewer shows the file, same shape as ``pixels``."""
    if display.lut is not None:
        values = modality_values(pixels, display)
        index = np.clip(np.rint(values) - display.lut_first_mapped, 0, len(display.lut) - 1)
        out = display.lut[index.astype(np.int64)]
        low, high = float(display.lut.min()), float(display.lut.max())
        grey = (out - low) / (high - low)
    elif display.window is not None:
        grey = window_linear(modality_values(pixels, display), *display.window)
    else:
        low, high = float(pixels.min()), float(pixels.max())
        # The reader's pixels are already bone-bright: min-max of them is the display.
        return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    return 1 - grey if display.inverted else grey


def linear_display(pixels: np.ndarray, display: Display) -> tuple[float, float] | None:
    """``(gain, offset)`` with grey = clip(gain * pixel + offset, 0, 1), when the display is
    linear in the reader's pixels: min-max, or a LINEAR or LINEAR_EXACT window (the
    Modality LUT's undoing and the inversion are linear too). ``None`` for a VOI LUT, a
    SIGMOID window, a hard threshold, or a flat image."""
    if display.lut is None and display.window is None:
        low, high = float(pixels.min()), float(pixels.max())
        return (1 / (high - low), -low / (high - low)) if high > low else None
    if display.lut is not None or display.window is None:
        return None
    center, width, function = display.window
    if function == "SIGMOID":
        return None
    if function == "LINEAR":
        center, width = center - 0.5, width - 1
    if width <= 0:
        return None
    # modality value = a * pixel + b (modality_values), window = (value - center) / width + 0.5
    span = display.modality_high - display.modality_low
    sign = -1.0 if display.inverted else 1.0
    a = sign * span / (2 * MODEL_RANGE)
    b = display.modality_low + span / 2
    gain, offset = a / width, (b - center) / width + 0.5
    return (-gain, 1 - offset) if display.inverted else (gain, offset)


def display_bytes(pixels: np.ndarray, display: Display) -> np.ndarray:
    """:func:`display_grey` as 8-bit grey levels (0-255, rounded), same shape as ``pixels``.

    A linear display (:func:`linear_display`, most radiographs) is one multiply-add, a
    clip and a rounding, in place: a third of the passes over the pixels that the
    general path takes, which made the preview the largest cost of process_dicom.py's
    pictures.
    """
    linear = linear_display(pixels, display)
    if linear is None:
        return np.rint(np.clip(display_grey(pixels, display), 0, 1) * 255).astype(np.uint8)
    gain, offset = linear
    work = np.multiply(pixels, np.float32(255 * gain), dtype=np.float32)
    work += np.float32(255 * offset)
    np.clip(work, 0, 255, out=work)
    np.rint(work, out=work)
    return work.astype(np.uint8)


def preview_size(shape: tuple[int, int], decoded: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) of the preview of an image of ``shape`` (rows, columns).

    ``decoded`` is the shape of the pixels the reader decoded (a reduced decode is
    smaller than ``shape``; the default is a full decode). The preview has the image's
    aspect and the decoded long side, at most :data:`PREVIEW_LONG_SIDE`: never enlarged.
    """
    height, width = shape
    long_side = min(PREVIEW_LONG_SIDE, max(decoded or shape))
    scale = long_side / max(height, width)
    return max(round(height * scale), 1), max(round(width * scale), 1)


def preview_crop(shape: tuple[int, int], preview: tuple[int, int]) -> list[float]:
    """``[x, y, width, height]`` of the model's centre crop in the pixels of a preview.

    The crop is ``preprocess.center_crop``'s (``XRayCenterCrop``'s rounding) in the
    image's own pixels (``shape``, rows and columns), scaled as the preview (``preview``,
    its rows and columns) is.
    """
    height, width = shape
    size = min(height, width)
    x0, y0 = width // 2 - size // 2, height // 2 - size // 2
    preview_height, preview_width = preview
    sx, sy = preview_width / width, preview_height / height
    return [round(x0 * sx, 3), round(y0 * sy, 3), round(size * sx, 3), round(size * sy, 3)]


def make_preview(pixels: np.ndarray, display: Display, shape: tuple[int, int]) -> np.ndarray:
    """8-bit preview of reader pixels, :func:`preview_size` big.

    ``shape`` is the image's full size (rows, columns): ``pixels`` may be a reduced
    decode of it. Pixels already at the preview's size are not resampled at all.
    """
    grey = display_bytes(pixels, display)
    height, width = preview_size(shape, (int(pixels.shape[0]), int(pixels.shape[1])))
    if grey.shape == (height, width):
        return grey
    # Pillow's resampling filters widen their support when shrinking (anti-aliasing);
    # on 8-bit data they run in SIMD, several times faster than on floats.
    resized = Image.fromarray(grey, mode="L").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def _zlib_compress(raw: np.ndarray) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(raw.tobytes()) + packer.flush()


def _zlib_decompress(data: bytes, size: int) -> bytes:
    return zlib.decompress(data, zlib.MAX_WBITS, size)


# The PNGs' deflate: Intel's ISA-L (python-isal) where installed, else the standard
# library's zlib (Huffman-only, its fastest useful setting). Both write zlib streams that
# any PNG reader inflates. Measured on process_dicom.py's own pictures (one thread):
#   224x224 heatmap:   zlib 0.22 ms, 14.5 kB;   ISA-L level 1 0.074 ms, 8.6 kB
#   1024-pixel preview: zlib 5.0 ms, 304 kB;    ISA-L level 1 1.7 ms, 285 kB
#   reading a preview:  zlib 2.5-2.9 ms;        ISA-L 1.5-1.7 ms
# With 18 heatmaps and a preview per image, that is about 6 ms of CPU per image.
_compress: Callable[[np.ndarray], bytes]
_decompress: Callable[[bytes, int], bytes]
_INFLATE_ERRORS: tuple[type[Exception], ...]
try:
    from isal import isal_zlib

    def _isal_compress(raw: np.ndarray) -> bytes:
        return isal_zlib.compress(raw, 1)

    def _isal_decompress(data: bytes, size: int) -> bytes:
        return isal_zlib.decompress(data, isal_zlib.MAX_WBITS, size)

    _compress, _decompress = _isal_compress, _isal_decompress
    # python-isal's stubs declare its error as an instance; it is the exception class.
    _INFLATE_ERRORS = (zlib.error, cast(type[Exception], isal_zlib.error))
except ImportError:  # no ISA-L wheel for this platform: the standard library does it
    _compress, _decompress, _INFLATE_ERRORS = _zlib_compress, _zlib_decompress, (zlib.error,)


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 2-D ``uint8`` array (no time stamp: same pixels, same bytes).

    Written here rather than by Pillow, for speed: Pillow tries every PNG row filter on
    every row, which made the preview's PNG cost more than the rest of the preview and
    most of a heatmap's cost (a 1024x1024 preview: Pillow 21-26 ms, here 6 ms with zlib).
    Here every row uses the Up filter (PNG 9.2, type 2: the difference to the row above,
    modulo 256), deflated by ISA-L at level 1 (see ``_compress``). Pillow reads the files
    back exactly (``tests/test_heatmaps.py``).
    """
    height, width = image.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 1:] = image[0]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps: mod 256
    data = _compress(rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(data: bytes) -> np.ndarray:
    """The 8-bit grayscale pixels of a PNG, as a 2-D ``uint8`` array.

    A file :func:`png_bytes` wrote (grayscale, every row filtered Up) is read here: one
    inflate call (ISA-L's where installed) and one running sum down the columns. Anything else goes to
    Pillow. Why: generate_sr.py decodes the preview on a thread while the SR is encoded,
    and Pillow decodes a PNG in many small steps, each giving up the GIL and waiting to
    get it back. Measured on a 1024-pixel preview: Pillow 3.8 ms alone and 35 ms beside
    a busy Python thread; this path 4 ms and 15 ms.
    """
    try:
        return _read_own_png(data)
    except ValueError:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image if image.mode == "L" else image.convert("L"))


def _read_own_png(data: bytes) -> np.ndarray:
    """:func:`read_png` for exactly what :func:`png_bytes` writes; ``ValueError`` otherwise."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    position, header, compressed = len(PNG_SIGNATURE), b"", []
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if len(body) != length:
            raise ValueError("truncated chunk")
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            compressed.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    if len(header) != 13:
        raise ValueError("no IHDR")
    width, height, depth, colour, method, filtering, interlace = struct.unpack(">IIBBBBB", header)
    if (depth, colour, method, filtering, interlace) != (8, 0, 0, 0, 0) or not compressed:
        raise ValueError("not 8-bit grayscale, non-interlaced")
    try:
        # Sized for the whole image: one inflate call, one wait for the GIL afterwards.
        raw = _decompress(b"".join(compressed), height * (width + 1))
    except _INFLATE_ERRORS as exc:
        raise ValueError(str(exc)) from exc
    if len(raw) != height * (width + 1):
        raise ValueError("wrong amount of image data")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    if height and not (rows[:, 0] == 2).all():
        raise ValueError("a row filter other than Up")
    return np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)  # undo Up: sums wrap mod 256


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data, CRC-32 of type and data (PNG 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
