"""A synthetic sharded results set of any size, fast to make: what a large run leaves behind.

Entries carry what the results schema requires and what the report and the SR builder
read (identity, scores, findings; a shared preview and heatmaps when asked), with scores
drawn from a seeded generator, so a set of a given size is the same every time. The shards
are written with the engine's own writer (:func:`cxrsr.shards.write_shard`) and the
manifest with its own (:func:`cxrsr.shards.write_manifest`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrsr import shards
from cxrsr.results import model_record

LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax"]
THRESHOLD = 0.5
SHARD_SIZE = 64


def model_block() -> Any:
    """A model block as process_dicom.py writes it (synthetic weights digest)."""
    return model_record(
        {
            "weights": "densenet121-res224-all",
            "weights_sha256": "0" * 64,
            "torchxrayvision": "1.5.7",
            "labels": LABELS,
            "threshold": THRESHOLD,
        }
    )


def _pictures(folder: Path) -> dict[str, Any]:
    """One preview and one heatmap per label, shared by every classified entry."""
    pictures = folder / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:320, 0:256]
    Image.fromarray(((x + y) % 256).astype(np.uint8)).save(pictures / "preview.png")
    heatmaps = {}
    for k, label in enumerate(LABELS):
        yy, xx = np.mgrid[0:224, 0:224] / 224
        heat = np.exp(-((xx - 0.2 - 0.1 * k) ** 2 + (yy - 0.5) ** 2) / 0.03)
        Image.fromarray((heat * 255).astype(np.uint8)).save(pictures / f"heat-{k}.png")
        heatmaps[label] = f"pictures/heat-{k}.png"
    return {
        "preview": "pictures/preview.png",
        "preview_crop": [0, 32, 256, 256],
        "heatmaps": heatmaps,
    }


def entry(index: int, rng: random.Random, pictures: dict[str, Any] | None) -> dict[str, Any]:
    """Entry ``index``: one in 20 failed, one in 20 skipped, the rest classified."""
    path = f"/archive/{index // 1000:04d}/{index:08d}.dcm"
    if index % 20 == 7:
        return {"path": path, "status": "failed", "reason": "cannot decode the pixel data"}
    if index % 20 == 13:
        return {
            "path": path,
            "status": "skipped",
            "reason": f"Modality CT is not CR or DX ({index % 3})",
        }
    scores = {label: round(rng.random() ** 3, 6) for label in LABELS}
    made: dict[str, Any] = {
        "path": path,
        "status": "classified",
        "sop_instance_uid": f"2.25.{index + 1}",
        "series_instance_uid": f"2.25.{10**9 + index}",
        "study_instance_uid": f"2.25.{2 * 10**9 + index}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
        "patient_id": f"P{index % 5000:05d}",
        "modality": "DX",
        "scores": scores,
        "findings": [label for label in LABELS if scores[label] >= THRESHOLD],
        "classified_at": "2026-12-07T12:00:00Z",
    }
    if pictures is not None:
        made.update(pictures)
    return made


def make_sharded_results(
    folder: Path, count: int, pictures: bool = True, seed: int = 22
) -> tuple[Path, list[dict[str, Any]] | None]:
    """Write ``count`` entries as shards plus a manifest in ``folder``; return the manifest's
    path (and, for sets up to 10,000 entries, the entries, for the tests to compare)."""
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / "results.json"
    shared = _pictures(folder) if pictures else None
    rng = random.Random(seed)
    model = model_block()
    kept: list[dict[str, Any]] | None = [] if count <= 10_000 else None
    statuses: dict[str, int] = {}
    numbers = []
    batch: list[dict[str, Any]] = []
    for index in range(count):
        made = entry(index, rng, shared)
        statuses[made["status"]] = statuses.get(made["status"], 0) + 1
        batch.append(made)
        if kept is not None:
            kept.append(made)
        if len(batch) == SHARD_SIZE or index == count - 1:
            number = len(numbers)
            shards.write_shard(shards.shard_folder(results), number, f"{number:064x}", model, batch)  # type: ignore[arg-type]
            numbers.append(number)
            batch = []
    shards.write_manifest(results, model, numbers, statuses, None, complete=True)
    return results, kept
