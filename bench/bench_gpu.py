#!/usr/bin/env python3
"""The network on a CUDA GPU: ONNX Runtime's CUDA provider and eager PyTorch, fp32 and fp16.

Network only (no reading, no preprocessing), batches of ``--batch`` corpus inputs
preprocessed as process_dicom.py does; best wall time of ``--repeats`` calls after a
warm-up, for each configuration that this host can run:

- ``onnx-cuda fp32``: ``--device cuda --backend onnx`` (the onnxruntime-gpu package);
- ``eager-cuda fp32``: ``--device cuda --backend eager``;
- ``eager-cuda fp16``: ``--device cuda --precision fp16``;
- ``onnx-cpu fp32``, for comparison.

fp16's drift from fp32 is printed too: max and p99 absolute logit difference over the corpus,
as a fraction of each label's logit spread. A configuration this host cannot run prints its
one-line reason (the same line process_dicom.py would give, with exit 3) and is skipped, so
the script runs unchanged here and on a GPU host.

Run: ``.venv/bin/python bench/bench_gpu.py --random [--weights resnet50-res512-all]``
(``--random``: random weights, made as the tests make them; speed does not depend on them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_int8 import best_seconds, corpus_inputs

from cxrsr.errors import PipelineError
from cxrsr.model.classifier import Classifier, load_classifier

CONFIGURATIONS = {
    "onnx-cuda fp32": {"device": "cuda", "backend": "onnx", "precision": "fp32"},
    "eager-cuda fp32": {"device": "cuda", "backend": "eager", "precision": "fp32"},
    "eager-cuda fp16": {"device": "cuda", "backend": "auto", "precision": "fp16"},
    "onnx-cpu fp32": {"device": "cpu", "backend": "onnx", "precision": "fp32"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="densenet121-res224-all")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cache = args.cache_dir
    if args.random:
        from test_models_all import RESNET, save_densenet, save_resnet

        cache = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
        if args.weights == RESNET:
            save_resnet(cache)
        else:
            save_densenet(cache, args.weights, seed=11)
    loaded: dict[str, Classifier] = {}
    for name, options in CONFIGURATIONS.items():
        try:
            loaded[name] = load_classifier(args.weights, cache, **options)
        except PipelineError as exc:
            print(f"{name}: skipped: {exc}")
    if not loaded:
        return 3
    size = next(iter(loaded.values())).input_size
    _, inputs = corpus_inputs(size)
    batch = np.concatenate([inputs] * (args.batch // len(inputs) + 1))[: args.batch]
    for name, classifier in loaded.items():
        run: Callable[[], object] = lambda c=classifier: c.logits(batch)  # noqa: E731
        seconds = best_seconds(run, args.repeats)
        print(
            f"{name}: batch {args.batch}: {seconds * 1000:.1f} ms, "
            f"{args.batch / seconds:.0f} images/s"
        )
    if "eager-cuda fp16" in loaded and "eager-cuda fp32" in loaded:
        kept = loaded["eager-cuda fp32"].card.kept
        a = loaded["eager-cuda fp32"].logits(inputs)[:, kept]
        b = loaded["eager-cuda fp16"].logits(inputs)[:, kept]
        fraction = np.abs(b - a) / np.ptp(a, axis=0)
        print(
            f"fp16 drift: max {fraction.max():.4f}, p99 {np.percentile(fraction, 99):.4f} "
            "of each label's logit spread"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
