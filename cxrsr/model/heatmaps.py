"""Heatmaps: where in the model's input its evidence for a label lies (class activation maps).

For torchxrayvision's DenseNet (``features -> relu -> global average pool -> Linear``)
the class activation map of label k (Zhou et al., CVPR 2016) is ``sum_c w_kc * F_c`` over
the last feature map ``F`` (1024 x 7 x 7 for a 224 input); the network computes it in the
same forward pass as the scores (``model._network_module``). Grad-CAM equals CAM for such
a head. It shows model attention, not a localisation: Saporta et al. (Nature Machine
Intelligence 2022) found every saliency method they tested short of radiologists.

Each map is upsampled bilinearly to the 224x224 input (half-pixel centres, as
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


def upsample(cam: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A class activation map resampled bilinearly to ``size`` x ``size``."""
    rows = _bilinear_matrix(cam.shape[0], size)
    columns = _bilinear_matrix(cam.shape[1], size)
    return rows @ cam.astype(np.float64) @ columns.T


def heatmap_image(cam: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """8-bit heatmap: the upsampled map scaled from its minimum (0) to its maximum (255)."""
    up = upsample(cam, size)
    low, high = float(up.min()), float(up.max())
    if high <= low:
        return np.zeros((size, size), dtype=np.uint8)
    return np.rint((up - low) * (255.0 / (high - low))).astype(np.uint8)


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


class HeatmapWriter:
    """Writes the heatmaps of classified images under ``<results folder>/heatmaps/``.

    PNG encoding and the atomic, fsynced writes run on background threads (zlib and
    fsync release the GIL), so the network's next batch does not wait for the disk.
    :meth:`close` waits for every file: call it before the results file names them.
    """

    #: Files queued at most before :meth:`write` waits (each holds a 50 kB map).
    MAX_PENDING = 512

    def __init__(self, results_dir: Path, which: str = FINDINGS, threads: int = 2) -> None:
        if which not in (FINDINGS, ALL_LABELS):
            raise ValueError(f'Argument "which" must be {FINDINGS!r} or {ALL_LABELS!r}.')
        self.results_dir = Path(results_dir)
        self.which = which
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="heatmaps")
        self._pending: deque[Future[None]] = deque()

    def write(
        self, path: str, scores: Mapping[str, float], cams: Mapping[str, np.ndarray]
    ) -> dict[str, str]:
        """Queue one image's heatmaps; return ``{label: path relative to the results folder}``."""
        stem = file_stem(path)
        written = {}
        for label in heatmap_labels(scores, self.which):
            relative = f"{HEATMAP_FOLDER}/{stem}-{label_slug(label)}.png"
            target = self.results_dir / relative
            self._pending.append(self._pool.submit(_write_png, target, heatmap_image(cams[label])))
            written[label] = relative
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popleft().result()
        return written

    def wait(self) -> None:
        """Wait until every heatmap queued so far is on disk (a failed write raises)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Wait until every queued heatmap is on disk; a write that failed raises ``OSError``."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _write_png(target: Path, image: np.ndarray) -> None:
    write_atomic(target, png_bytes(image))
