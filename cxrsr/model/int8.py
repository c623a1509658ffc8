"""int8 inference on the CPU: ONNX Runtime's static quantization of the fp32 export.

The fp32 ONNX export (:mod:`cxrsr.model.classifier`) is quantized once per export with
``onnxruntime.quantization.quantize_static``: QDQ format, weights int8 per output channel,
activations uint8 per tensor, with ranges calibrated (min/max) on synthetic chest
radiograph phantoms that this module makes (:func:`calibration_inputs`): seeded, the
same on every machine, and never the user's images. The result is cached beside the
fp32 export (``cxrsr-onnx/<weights>.int8.onnx``) with a card binding it to the fp32
export's SHA-256, the calibration version and ONNX Runtime's version; its own SHA-256
goes to the results file and the SR as part of the algorithm's identity, so an int8
result is a different algorithm version from the fp32 one.

How far int8 scores drift from fp32, and how much faster they come, is measured by
``bench/bench_int8.py`` and stated in ``docs/performance.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxrsr.files import write_json_atomic

#: Version of what the calibration images are; a cache made from others is quantized again.
CALIBRATION_VERSION = 1
#: Calibration images: phantoms of several shapes, exposures and noise levels.
CALIBRATION_COUNT = 12
#: What the results and the SR say about the calibration.
CALIBRATION_NOTE = (
    f"ONNX Runtime static quantization (QDQ; weights int8 per channel, activations uint8), "
    f"min/max calibrated on {CALIBRATION_COUNT} synthetic chest radiograph phantoms "
    f"(cxrsr.model.int8, version {CALIBRATION_VERSION}), no patient images"
)


def calibration_inputs(size: int, count: int = CALIBRATION_COUNT) -> list[np.ndarray]:
    """Model inputs ``(1, 1, size, size)`` in [-1024, 1024] that look like chest radiographs.

    Each phantom is a frontal chest: a bright body on a dark background, two darker lung
    fields with rib stripes, a bright mediastinum and diaphragm, a soft exposure gradient
    and noise; position, size, contrast and noise vary with a fixed seed. Calibration
    needs activation ranges that cover real images, not anatomy: these span dark
    background to bone, smooth fields and fine edges, as radiographs do.
    """
    rng = np.random.default_rng(20261207)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    images = []
    for _ in range(count):
        cx, cy = rng.uniform(-0.08, 0.08, 2)
        body = ((x - cx) / rng.uniform(0.8, 1.0)) ** 2 + ((y - cy) / 1.1) ** 2 < 1
        image = np.where(body, 0.2, -0.9).astype(np.float32)
        for side in (-1, 1):
            lx = cx + side * rng.uniform(0.35, 0.45)
            lung = ((x - lx) / rng.uniform(0.22, 0.3)) ** 2 + ((y - cy + 0.1) / 0.55) ** 2 < 1
            ribs = 0.15 * np.sin((y + 0.3 * (x - lx) ** 2) * rng.uniform(18, 26))
            image = np.where(lung, -0.45 + ribs, image)
        image += 0.5 * np.exp(-(((x - cx) / 0.12) ** 2))  # mediastinum and spine
        image += np.where(y > cy + 0.55 + 0.1 * np.cos(3 * x), 0.4, 0.0)  # diaphragm
        image = image * rng.uniform(0.7, 1.1) + rng.uniform(-0.15, 0.15) + 0.15 * y
        image += rng.normal(0, rng.uniform(0.005, 0.05), image.shape)
        images.append(np.clip(image * 1024, -1024, 1024).astype(np.float32)[None, None])
    return images


def int8_paths(weights: str, cache_dir: Path) -> tuple[Path, Path]:
    """The int8 export's card and model, beside the fp32 export."""
    folder = cache_dir / "cxrsr-onnx"
    return folder / f"{weights}.int8.json", folder / f"{weights}.int8.onnx"


def cached_int8(weights: str, cache_dir: Path, fp32_sha256: str) -> tuple[bytes, str] | None:
    """The cached int8 model's bytes and SHA-256, if it was made from this fp32 export
    with this calibration and this ONNX Runtime; else ``None`` (it is made again)."""
    import hashlib

    import onnxruntime

    card_path, model_path = int8_paths(weights, cache_dir)
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        data = model_path.read_bytes()
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(data).hexdigest()
    if not isinstance(card, dict) or card != {
        "fp32_onnx_sha256": fp32_sha256,
        "calibration_version": CALIBRATION_VERSION,
        "onnxruntime": onnxruntime.__version__,
        "int8_onnx_sha256": digest,
    }:
        return None
    return data, digest


def quantize(weights: str, cache_dir: Path, fp32: bytes, fp32_sha256: str, size: int) -> str:
    """Quantize the fp32 export ``fp32``, publish it in the cache; its SHA-256."""
    import hashlib

    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Phantoms(CalibrationDataReader):
        def __init__(self) -> None:
            self._inputs: Iterator[np.ndarray] = iter(calibration_inputs(size))

        def get_next(self) -> dict[str, Any] | None:
            image = next(self._inputs, None)
            return None if image is None else {"input": image}

    card_path, model_path = int8_paths(weights, cache_dir)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".int8-") as tmp:
        source, prepared, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        source.write_bytes(fp32)
        with _quiet_quantizer():
            # Shape inference and graph clean-up first, as ONNX Runtime's guide advises.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(out),
                _Phantoms(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        os.replace(out, model_path)
    write_json_atomic(
        card_path,
        {
            "fp32_onnx_sha256": fp32_sha256,
            "calibration_version": CALIBRATION_VERSION,
            "onnxruntime": onnxruntime.__version__,
            "int8_onnx_sha256": digest,
        },
    )
    return digest


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice to the root logger and warns; not to the user."""
    import logging
    import warnings

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
