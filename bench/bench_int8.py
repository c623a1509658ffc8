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

- **pipeline** (``--pipeline DIR``): ``process_dicom.py DIR`` as a whole process, fp32 and
  int8 runs alternating ``--pipeline-repeats`` times (after one untimed run of each, which
  makes the exports), heatmaps and previews on; the speed-up of the medians. Alternating
  puts both precisions under the same load.

Run: ``.venv/bin/python bench/bench_int8.py --random [--weights resnet50-res512-all]``, and
``--random --pipeline DIR`` (``bench/make_corpus.py`` makes folders of large or small images).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
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
    parser.add_argument("--pipeline", type=Path, metavar="DIR", help="also time process_dicom.py")
    parser.add_argument("--pipeline-repeats", type=int, default=3)
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
    if args.pipeline is not None:
        pipeline(args.pipeline, args.weights, cache, args.pipeline_repeats)
    return 0


def pipeline(folder: Path, weights: str, cache: Path | None, repeats: int) -> None:
    """process_dicom.py over ``folder``, fp32 and int8 alternating: medians and speed-up."""
    out = Path(tempfile.mkdtemp(prefix="bench-int8-runs-"))
    count = 0

    def run(precision: str, number: int) -> float:
        nonlocal count
        command = [sys.executable, "process_dicom.py", str(folder), "-q", "--weights", weights]
        command += ["-o", str(out / f"{precision}-{number}" / "results.json")]
        command += ["--precision", precision] + (["--cache-dir", str(cache)] if cache else [])
        start = time.perf_counter()
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode not in (0, 1):
            raise SystemExit(f"E: {precision} run exited {done.returncode}: {done.stderr[-300:]}")
        count = int(done.stdout.split(" classified")[0].split()[-1])
        return seconds

    run("fp32", 0), run("int8", 0)  # exports and quantization, not timed
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for number in range(1, repeats + 1):
        for precision in times:
            times[precision].append(run(precision, number))
    t32, t8 = statistics.median(times["fp32"]), statistics.median(times["int8"])
    print(
        f"pipeline over {folder} ({count} classified, heatmaps on, whole process, median of "
        f"{repeats}): fp32 {t32:.1f} s ({count / t32:.2f} images/s), int8 {t8:.1f} s "
        f"({count / t8:.2f} images/s), speed-up {t32 / t8:.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
