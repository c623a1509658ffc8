"""torchxrayvision's input definition: center crop to a square, resize to 224.

The reference is ``xrv.datasets.XRayCenterCrop`` followed by ``xrv.datasets.XRayResizer``
(``skimage.transform.resize`` with anti-aliasing: a Gaussian blur of sigma
``(scale - 1) / 2`` over the full-resolution crop, then bilinear sampling). On a
2000-pixel image that blur costs most of the time. :func:`preprocess` computes the same
thing from a smaller image:

1. the image may already be decoded at 1/2, 1/4 or 1/8 resolution by its codec
   (``decimation``; see ``reading._decode_reduced``);
2. whole k×k blocks are averaged, k chosen so that at least twice the target size
   remains (a box filter, itself an anti-aliasing filter);
3. a Gaussian blurs by what is left of the reference's smoothing;
4. bilinear sampling at the exact positions, in original pixel coordinates, where the
   reference samples its crop: crop offsets and each codec's sample phase are kept, so
   reduced decoding shifts nothing.

``tests/test_equivalence.py`` measures how close this stays to the reference on every
corpus image.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.ndimage as ndi
import skimage.transform

INPUT_SIZE = 224


def center_crop(image: np.ndarray) -> np.ndarray:
    """The central square of a 2-D image, with the same rounding as ``XRayCenterCrop``."""
    height, width = image.shape
    crop = min(height, width)
    start_x = width // 2 - crop // 2
    start_y = height // 2 - crop // 2
    return image[start_y : start_y + crop, start_x : start_x + crop]


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping ``factor``×``factor`` blocks from the top-left corner."""
    if factor <= 1:
        return image.astype(np.float32, copy=False)
    height, width = image.shape
    image = image[: height - height % factor, : width - width % factor]
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(
        axis=(1, 3), dtype=np.float32
    )


def _skimage_resize(image: np.ndarray, size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = skimage.transform.resize(
            image, (size, size), mode="constant", preserve_range=True, anti_aliasing=True
        )
    return out.astype(np.float32)


def preprocess(
    pixels: np.ndarray,
    size: int = INPUT_SIZE,
    decimation: int = 1,
    sample_origin: float | None = None,
    original_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Model input ``(1, size, size)`` float32 from a [-1024, 1024] image.

    ``decimation``: original pixels per pixel of ``pixels`` along each axis.
    ``sample_origin``: where, in original pixels, the sample ``pixels[0, 0]`` lies
    (default ``(decimation - 1) / 2``, the centre of its block; 0 for JPEG 2000, whose
    low-pass band keeps the even samples). ``original_shape``: the stored Rows, Columns.
    """
    d = decimation
    height, width = original_shape if original_shape else (pixels.shape[0] * d, pixels.shape[1] * d)
    crop = min(height, width)
    factor = max((crop // d) // (2 * size), 1)
    if d == 1 and factor == 1:
        # Small images (up to twice the input size): the reference itself is cheap.
        return _skimage_resize(center_crop(pixels), size)[None, :, :]
    origin = (d - 1) / 2 if sample_origin is None else sample_origin
    y0, x0 = height // 2 - crop // 2, width // 2 - crop // 2
    reduced = block_mean(pixels, factor)
    pitch = d * factor
    first = origin + (factor - 1) / 2 * d  # original position of reduced[0, 0]

    def covering(start: int, length: int) -> tuple[int, int]:
        """The rows (or columns) of ``reduced`` whose centres fall inside the crop."""
        low = int(np.floor((start - 0.5 - first) / pitch + 0.5))
        high = int(np.ceil((start + crop - 0.5 - first) / pitch - 0.5)) + 1
        return max(low, 0), min(high, length)

    # Crop before blurring, as the reference does: its Gaussian sees the crop's edges.
    ya, yb = covering(y0, reduced.shape[0])
    xa, xb = covering(x0, reduced.shape[1])
    reduced = reduced[ya:yb, xa:xb]
    low_value, high_value = float(reduced.min()), float(reduced.max())
    scale = crop / size
    target_sigma = max((scale - 1) / 2, 0.0)
    done_sigma = pitch / np.sqrt(12)
    sigma = np.sqrt(max(target_sigma**2 - done_sigma**2, 0.0)) / pitch
    if sigma > 0:
        reduced = ndi.gaussian_filter(reduced, sigma, mode="constant", cval=0.0)
    # Output pixel o samples the crop at (o + 0.5) * scale - 0.5 (skimage's convention).
    offsets = (np.arange(size) + 0.5) * scale - 0.5
    rows = (y0 + offsets - first) / pitch - ya
    columns = (x0 + offsets - first) / pitch - xa
    grid = np.meshgrid(rows, columns, indexing="ij")
    out = ndi.map_coordinates(reduced, grid, order=1, mode="nearest")
    return np.clip(out, low_value, high_value).astype(np.float32)[None, :, :]


def reference_preprocess(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """torchxrayvision's own transforms, for the equivalence test and benchmarks."""
    import torchxrayvision as xrv

    image = pixels[None, :, :]
    image = xrv.datasets.XRayCenterCrop()(image)
    return xrv.datasets.XRayResizer(size)(image)
