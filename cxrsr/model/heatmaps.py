"""Heatmaps: where in the model's input its evidence for a label lies (class activation maps).

For torchxrayvision's classifiers (``last feature map -> global average pool -> Linear``)
the class activation map of label k (Zhou et al., CVPR 2016) is ``sum_c w_kc * F_c`` over
the last feature map ``F`` (DenseNet-121: 1024 x 7 x 7 for its 224 input; ResNet-50:
2048 x 16 x 16 for its 512 input); the network computes it in the same forward pass as the
scores (``model._network_module``). Grad-CAM equals CAM for such
a head. It shows model attention, not a localisation: Saporta et al. (Nature Machine
Intelligence 2022) found every saliency method they tested short of radiologists.

Each map is upsampled bilinearly to the model's input size (224 or 512) (half-pixel centres, as
``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)``), scaled to
0..255 between its own minimum and maximum, and stored as an 8-bit grayscale PNG in the
model's input geometry: the centre-cropped square the model saw, in the orientation it
saw it. Brighter is stronger evidence for that label; grey levels are not comparable
between maps.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

from cxrsr.dicomio.preview import png_bytes
from cxrsr.files import write_atomic
from cxrsr.model.preprocess import INPUT_SIZE

THRESHOLD = 0.5
HEATMAP_FOLDER = "heatmaps"
PREVIEW_FOLDER = "previews"

#: Which labels get a heatmap: those at or above the threshold (the top one when none
#: is), or every label (for benchmarks and research).
FINDINGS, ALL_LABELS = "findings", "all"


@cache
def _bilinear_matrix(source: int, target: int) -> np.ndarray:
    """``(target, source)`` weights of half-pixel-centre bilinear resampling, edges clamped."""
    position = (np.arange(target) + 0.5) * (source / target) - 0.5
    position = np.clip(position, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    frac = position - low
    matrix = np.zeros((target, source), dtype=np.float64)
    matrix[np.arange(target), low] += 1 - frac
    matrix[np.arange(target), high] += frac
    return matrix


def heatmap_image(cam: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """8-bit heatmap: the upsampled map scaled from its minimum (0) to its maximum (255)."""
    return heatmap_images(cam[None], size)[0]


def heatmap_images(cams: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """:func:`heatmap_image` of each of ``cams`` (n x 7 x 7), as one n x size x size array.

    One stacked product and one in-place scaling for all of an image's maps, in float32
    (the network's own precision): a Python step per label, and float64 temporaries,
    cost more than the arithmetic.
    """
    rows = _bilinear_matrix(cams.shape[1], size).astype(np.float32)
    columns = _bilinear_matrix(cams.shape[2], size).T.astype(np.float32)
    up = rows @ cams.astype(np.float32) @ columns
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    flat = high <= low  # a constant map: all black, rather than a division by zero
    scale = np.where(flat, np.float32(0), np.float32(255) / np.where(flat, 1, high - low))
    up -= low
    up *= scale
    np.rint(up, out=up)
    return up.astype(np.uint8)


def heatmap_labels(scores: Mapping[str, float], which: str = FINDINGS) -> list[str]:
    """Labels that get a heatmap, in the model's order (``scores``' order)."""
    if which == ALL_LABELS:
        return list(scores)
    found = [label for label, score in scores.items() if score >= THRESHOLD]
    return found or ([max(scores, key=lambda label: scores[label])] if scores else [])


def file_stem(path: str) -> str:
    """A name for one input's files: a digest of its path (two files may share a UID)."""
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def label_slug(label: str) -> str:
    """A file-name-safe form of a label (``Lung Opacity`` -> ``lung-opacity``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "label"


def model_heatmap_folder(weights: str) -> str:
    """The heatmap folder of a multi-model run's further model ``weights`` (the first
    model's stay in ``heatmaps/``, so its files are where a single-model run puts them)."""
    return f"{HEATMAP_FOLDER}/{weights}"


class HeatmapWriter:
    """Writes the heatmaps of classified images under ``<results folder>/heatmaps/``.

    Each image's maps are scaled, PNG-encoded and written as one task on a background
    thread (numpy, deflate and file writes release the GIL), so the network's next batch
    does not wait for them. The files are not flushed one by one: the caller waits for an
    image's task (:meth:`write` returns it) and makes its files durable with
    :func:`cxrsr.files.sync_files` before anything durable names them.
    """

    #: Images queued at most before :meth:`write` waits (each holds up to 18 small maps).
    MAX_PENDING = 64

    def __init__(
        self,
        results_dir: Path,
        which: str = FINDINGS,
        threads: int = 2,
        folder: str = HEATMAP_FOLDER,
    ) -> None:
        """``folder``: where under ``results_dir`` the files go (each further model of a
        multi-model run has its own, :func:`model_heatmap_folder`)."""
        if which not in (FINDINGS, ALL_LABELS):
            raise ValueError(f'Argument "which" must be {FINDINGS!r} or {ALL_LABELS!r}.')
        self.results_dir = Path(results_dir)
        self.which = which
        self.folder = folder
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="heatmaps")
        self._pending: deque[Future[list[Path]]] = deque()

    def write(
        self,
        path: str,
        scores: Mapping[str, float],
        cams: Mapping[str, np.ndarray],
        size: int = INPUT_SIZE,
    ) -> tuple[dict[str, str], Future[list[Path]]]:
        """Queue one image's heatmaps, ``size`` x ``size`` (the model's input size).

        Returns ``{label: path relative to the results folder}`` at once, and the task,
        whose result is the list of files written (an ``OSError`` if one could not be).
        """
        stem = file_stem(path)
        labels = heatmap_labels(scores, self.which)
        written = {label: f"{self.folder}/{stem}-{label_slug(label)}.png" for label in labels}
        targets = [self.results_dir / relative for relative in written.values()]
        stack = np.stack([cams[label] for label in labels]) if labels else None
        task = self._pool.submit(_write_pngs, targets, stack, size)
        self._pending.append(task)
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()
        while self._pending and self._pending[0].done():
            self._pending.popleft()
        return written, task

    def close(self) -> None:
        """Wait until every queued heatmap is written; a write that failed raises ``OSError``."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _write_pngs(targets: list[Path], cams: np.ndarray | None, size: int) -> list[Path]:
    """Scale, encode and write one image's maps (a background task); the files written."""
    if cams is None:
        return []
    for target, image in zip(targets, heatmap_images(cams, size), strict=True):
        write_atomic(target, png_bytes(image), durable=False)
    return targets
