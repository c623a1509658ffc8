#!/usr/bin/env python3
"""int8 against fp32 on the CPU: the network's speed at batch 16, and how far scores drift.

- **speed**: ONNX Runtime sessions of the fp32 export and its int8 quantization
  (:mod:`cxrsr.model.int8`), the network only (no reading, no preprocessing), one batch
  of ``--batch`` corpus inputs per call; best wall time of ``--repeats`` calls after a
  warm-up, and the speed-up;
- **drift**: on every corpus file process_dicom.py classifies, preprocessed as it does:
  the absolute logit difference int8 - fp32 as a fraction of each label's logit spread
  over the corpus (max and 99th percentile over images and labels), and the findings
  flipped at the threshold (score 0.5).

Weights: ``--weights`` from ``--cache-dir`` (torchxrayvision's folder by default; the
published file must be there). With ``--random``, random weights are made in a temporary
folder, as the tests make them, with a classifier layer scaled so that scores stay inside
(0, 1): speed does not depend on the weights, drift does (it then measures the mechanism,
not the clinical drift of trained weights).

Run: ``.venv/bin/python bench/bench_int8.py --random [--weights resnet50-res512-all]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cxrsr.classify import prepare
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import Source
from cxrsr.model.classifier import load_classifier

CORPUS = PROJECT_ROOT.parent / "shared" / "cxr-corpus"


def corpus_inputs(size: int) -> tuple[list[str], np.ndarray]:
    names, batch = [], []
    for path in sorted(CORPUS.glob("*.dcm")):
        prepared = prepare(Source(str(path)), input_size=size)
        if prepared.model_input is not None:
            names.append(path.name)
            batch.append(prepared.model_input)
    return names, np.stack(batch)


def best_seconds(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="densenet121-res224-all")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--random", action="store_true", help="random weights (see above)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cache = args.cache_dir
    if args.random:
        from test_models_all import RESNET, save_densenet, save_resnet

        cache = Path(tempfile.mkdtemp(prefix="bench-int8-"))
        if args.weights == RESNET:
            save_resnet(cache)
        else:
            save_densenet(cache, args.weights, seed=11)
    fp32 = load_classifier(args.weights, cache, "cpu", "onnx")
    start = time.perf_counter()
    int8 = load_classifier(args.weights, cache, "cpu", precision="int8")
    print(
        f"weights {args.weights} ({'random' if args.random else 'as published'}), "
        f"input {fp32.input_size}, int8 ready in {time.perf_counter() - start:.1f} s"
    )

    names, inputs = corpus_inputs(fp32.input_size)
    batch = np.concatenate([inputs] * (args.batch // len(inputs) + 1))[: args.batch]
    t32 = best_seconds(lambda: fp32.logits(batch), args.repeats)
    t8 = best_seconds(lambda: int8.logits(batch), args.repeats)
    print(
        f"batch {args.batch}: fp32 {t32 * 1000:.0f} ms, int8 {t8 * 1000:.0f} ms, "
        f"speed-up {t32 / t8:.2f}x ({args.batch / t32:.1f} and {args.batch / t8:.1f} images/s)"
    )

    kept = fp32.card.kept
    a, b = fp32.logits(inputs)[:, kept], int8.logits(inputs)[:, kept]
    fraction = np.abs(b - a) / np.ptp(a, axis=0)
    flipped = sum(
        (x[label] >= 0.5) != (y[label] >= 0.5)
        for x, y in zip(fp32.predict(inputs), int8.predict(inputs), strict=True)
        for label in x
    )
    print(
        f"drift over {len(names)} corpus images x {len(kept)} labels: max "
        f"{fraction.max():.3f}, p99 {np.percentile(fraction, 99):.3f} of each label's logit "
        f"spread; {flipped} findings flipped at the threshold"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
