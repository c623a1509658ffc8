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


def colourise(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB colours (float, 0-255) and opacities (0-MAX_OPACITY) for 8-bit heat values."""
    level = heat.astype(np.float64) / 255.0
    rgb = np.stack(
        [np.interp(level, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)], axis=-1
    )
    return rgb, level * MAX_OPACITY


def overlay(preview: np.ndarray, heatmap: np.ndarray, crop: Sequence[int]) -> Image.Image:
    """The preview in RGB with ``heatmap`` resized onto the model's square ``crop``.

    ``crop`` is ``[x, y, width, height]`` in preview pixels; parts outside the preview
    (never expected, but a hand-edited file could say so) are clipped.
    """
    x, y, width, height = (round(v) for v in crop)
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"preview_crop {list(crop)} has no area")
    rgb = np.repeat(preview[:, :, None].astype(np.float64), 3, axis=2)
    heat = np.asarray(Image.fromarray(heatmap).resize((width, height), Image.Resampling.BILINEAR))
    rows, cols = preview.shape
    top, left = max(y, 0), max(x, 0)
    bottom, right = min(y + height, rows), min(x + width, cols)
    if bottom > top and right > left:
        colour, alpha = colourise(heat[top - y : bottom - y, left - x : right - x])
        region = rgb[top:bottom, left:right]
        rgb[top:bottom, left:right] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    return Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")


def heatmap_only(heatmap: np.ndarray) -> Image.Image:
    """A heatmap in colour on black, for entries that carry no preview."""
    return overlay(np.zeros_like(heatmap), heatmap, (0, 0, heatmap.shape[1], heatmap.shape[0]))


def fit(image: Image.Image, longest: int) -> Image.Image:
    """``image`` scaled down (never up) so that its long side is at most ``longest``."""
    scale = longest / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def data_uri(image: Image.Image) -> str:
    """A JPEG ``data:`` URI: photographs of radiographs compress 5-10x better than PNG."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
