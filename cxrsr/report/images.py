"""The report's pictures: the preview with a heatmap overlaid, as self-contained data URIs.

The report must open from a USB stick with nothing beside it, so every picture is inlined
as a ``data:`` URI. The overlay follows the results file's contract: ``preview`` is the
radiograph as displayed (8-bit grayscale), ``preview_crop`` is the square the model saw in
preview pixels, and each heatmap is a 224x224 8-bit grayscale PNG of that square, brighter
where the model's evidence for its label is stronger.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: Longest side of the large picture in a card; the preview's ~1024 px would make a
#: report of many images needlessly heavy, and a card shows it at about this size.
DISPLAY_SIZE = 720
#: Side of the small per-label pictures (the model's square only).
THUMBNAIL_SIZE = 224
JPEG_QUALITY = 85

# A perceptually ordered blue-cyan-yellow-red ramp (anchors of matplotlib's "turbo"
# without depending on matplotlib): cold for weak evidence, red for strong.
_RAMP_POSITIONS = np.array([0.0, 0.15, 0.35, 0.5, 0.65, 0.85, 1.0])
_RAMP_COLOURS = np.array(
    [
        [48, 18, 59],
        [70, 107, 227],
        [27, 208, 213],
        [97, 252, 108],
        [210, 233, 53],
        [251, 128, 34],
        [122, 4, 3],
    ],
    dtype=np.float64,
)
#: Opacity of the colour at the strongest evidence; weak evidence stays see-through, so
#: the anatomy under it remains readable.
MAX_OPACITY = 0.6

#: The ramp as CSS, for the legend beside the picture.
CSS_GRADIENT = (
    "linear-gradient(to right, "
    + ", ".join(
        f"rgb({r},{g},{b}) {p * 100:.0f}%"
        for (r, g, b), p in zip(_RAMP_COLOURS.astype(int), _RAMP_POSITIONS, strict=True)
    )
    + ")"
)


class ImageLoadError(ValueError):
    """A picture named in the results file is missing or not a readable PNG."""


def load_grayscale(path: Path) -> np.ndarray:
    """An 8-bit grayscale picture as a 2-D ``uint8`` array."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "I;16", "I"):
                raise ImageLoadError(f"{path}: expected a grayscale PNG, found mode {image.mode}")
            return np.asarray(image.convert("L"))
    except (OSError, SyntaxError) as exc:  # Pillow raises SyntaxError for some broken PNGs
        raise ImageLoadError(f"{path}: cannot read the picture ({exc})") from exc


def _blend_table() -> np.ndarray:
    """``table[grey, heat]``: the RGB of a grey pixel under heat ``heat``, for all 256x256
    pairs (192 kB), so blending a picture is one lookup per pixel."""
    level = np.arange(256) / 255.0
    colour = np.stack(
        [np.interp(level, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1
    )
    alpha = (level * MAX_OPACITY)[None, :, None]
    grey = np.arange(256, dtype=np.float64)[:, None, None]
    return (grey * (1 - alpha) + colour[None, :, :] * alpha + 0.5).astype(np.uint8)


BLEND = _blend_table()


def overlay(
    preview: np.ndarray, heatmap: np.ndarray, crop: Sequence[int], longest: int | None = None
) -> Image.Image:
    """The preview in RGB with ``heatmap`` resized onto the model's square ``crop``.

    ``crop`` is ``[x, y, width, height]`` in preview pixels; parts outside the preview
    (never expected, but a hand-edited file could say so) are clipped. With ``longest``,
    the picture is first scaled down so that its long side is at most that: blending at
    display size costs a fraction of blending at full size.
    """
    x, y, width, height = (round(v) for v in crop)
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"preview_crop {list(crop)} has no area")
    base = Image.fromarray(preview)
    scale = min(1.0, longest / max(base.size)) if longest else 1.0
    if scale < 1.0:
        size = (max(1, round(base.width * scale)), max(1, round(base.height * scale)))
        base = base.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        x, y = round(x * scale), round(y * scale)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    grey = np.asarray(base)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    heat = np.asarray(Image.fromarray(heatmap).resize((width, height), Image.Resampling.BILINEAR))
    rows, cols = grey.shape
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + height, rows), min(x + width, cols)
    if bottom > top and right > left:
        level = heat[top - y : bottom - y, left - x : right - x]
        rgb[top:bottom, left:right] = BLEND[grey[top:bottom, left:right], level]
    return Image.fromarray(rgb, "RGB")


def heatmap_only(heatmap: np.ndarray) -> Image.Image:
    """A heatmap in colour on black, for entries that carry no preview."""
    return overlay(np.zeros_like(heatmap), heatmap, (0, 0, heatmap.shape[1], heatmap.shape[0]))


def fit(image: Image.Image, longest: int) -> Image.Image:
    """``image`` scaled down (never up) so that its long side is at most ``longest``."""
    scale = longest / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def data_uri(image: Image.Image) -> str:
    """A JPEG ``data:`` URI: photographs of radiographs compress 5-10x better than PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
