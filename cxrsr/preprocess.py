"""torchxrayvision's input definition: center crop to a square, resize to 224.

The reference is ``xrv.datasets.XRayCenterCrop`` followed by ``xrv.datasets.XRayResizer``
(``skimage.transform.resize`` with anti-aliasing: a Gaussian blur of sigma
``(scale - 1) / 2`` and bilinear interpolation). On a 2000-pixel image that blur costs
most of the time, so :func:`resize` first averages whole k×k blocks (k chosen so that
at least twice the target size remains) and lets skimage do the final, small step. Box
averaging is itself an anti-aliasing filter; ``tests/test_preprocess.py`` measures how
close the result stays to the reference on every corpus image.
"""

from __future__ import annotations

import warnings

import numpy as np
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
    """Average non-overlapping ``factor``×``factor`` blocks (a box filter plus decimation).

    A remainder of fewer than ``factor`` rows/columns is split between both edges, so
    the image stays centred.
    """
    if factor <= 1:
        return image
    height, width = image.shape
    trim_y, trim_x = height % factor, width % factor
    image = image[
        trim_y // 2 : height - (trim_y - trim_y // 2), trim_x // 2 : width - (trim_x - trim_x // 2)
    ]
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(
        axis=(1, 3), dtype=np.float32
    )


def resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Anti-aliased resize of a square image to ``size``×``size`` (float32)."""
    factor = image.shape[0] // (2 * size)
    reduced = block_mean(image, factor)
    # skimage blurs the full image with sigma (scale - 1) / 2. A k-wide box already
    # blurred it by k / sqrt(12); blur the reduced image by what is left, so the total
    # smoothing matches the reference.
    scale = image.shape[0] / size
    target_sigma = max((scale - 1) / 2, 0.0)
    done_sigma = factor / np.sqrt(12) if factor > 1 else 0.0
    sigma = np.sqrt(max(target_sigma**2 - done_sigma**2, 0.0)) / max(factor, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = skimage.transform.resize(
            reduced,
            (size, size),
            mode="constant",
            preserve_range=True,
            anti_aliasing=sigma > 0,
            anti_aliasing_sigma=sigma if sigma > 0 else None,
        )
    return out.astype(np.float32)


def preprocess(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Model input ``(1, size, size)`` float32 from a [-1024, 1024] image."""
    return resize(center_crop(pixels), size)[None, :, :]


def reference_preprocess(pixels: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """torchxrayvision's own transforms, for the equivalence test and benchmarks."""
    import torchxrayvision as xrv

    image = pixels[None, :, :]
    image = xrv.datasets.XRayCenterCrop()(image)
    return xrv.datasets.XRayResizer(size)(image)
