"""Pictures that follow the results file's contract, made from real corpus pixels.

process_dicom.py writes ``preview``, ``preview_crop`` and ``heatmaps`` itself once the
heatmap stage exists; for results files without them (older ones, or before that stage),
these helpers make them the way the contract describes: an 8-bit grayscale preview with
its long side about 1024 px displayed as a radiologist sees it (VOI window, MONOCHROME1
inverted), the model's center-crop square in preview pixels, and 224x224 heatmaps of that
square. The heatmaps here are synthetic blobs: the report only has to show what it is given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

PREVIEW_LONG_SIDE = 1024


def preview_pixels(source: Path) -> np.ndarray:
    """The radiograph as displayed, 8-bit, long side at most 1024 px."""
    ds = pydicom.dcmread(source, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
    low, high = np.percentile(values, [0.5, 99.5])
    grey = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = 1 - grey
    image = Image.fromarray((grey * 255 + 0.5).astype(np.uint8))
    scale = PREVIEW_LONG_SIDE / max(image.size)
    if scale < 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
        )
    return np.asarray(image)


def blob(centre: tuple[float, float], size: int = 224) -> np.ndarray:
    """A 224x224 8-bit heatmap: one Gaussian blob, brightest at ``centre`` (fractions)."""
    y, x = np.mgrid[0:size, 0:size] / size
    heat = np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * 0.12**2))
    return (heat / heat.max() * 255 + 0.5).astype(np.uint8)


def add_pictures(results_path: Path, labels_per_image: int = 2) -> dict[str, Any]:
    """Give each classified entry without pictures a preview, its crop and heatmaps
    (the top ``labels_per_image`` labels); rewrite the results file and return it."""
    folder = results_path.parent
    document = json.loads(results_path.read_text(encoding="utf-8"))
    for index, entry in enumerate(document["images"]):
        if entry["status"] != "classified" or "preview" in entry:
            continue
        preview = preview_pixels(Path(entry["path"]))
        rows, cols = preview.shape
        side = min(rows, cols)
        crop = [(cols - side) // 2, (rows - side) // 2, side, side]
        pictures = folder / "pictures" / f"{index:04d}"
        pictures.mkdir(parents=True, exist_ok=True)
        Image.fromarray(preview).save(pictures / "preview.png")
        top = sorted(entry["scores"], key=lambda label: -entry["scores"][label])
        heatmaps = {}
        for rank, label in enumerate(top[:labels_per_image]):
            name = f"heatmap-{rank}.png"
            Image.fromarray(blob((0.3 + 0.4 * rank, 0.45))).save(pictures / name)
            heatmaps[label] = f"pictures/{index:04d}/{name}"
        entry.update(
            preview=f"pictures/{index:04d}/preview.png", preview_crop=crop, heatmaps=heatmaps
        )
    results_path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return document
