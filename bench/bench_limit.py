"""The limit ratio: process_dicom.py's images/s over the bare network's, and where the time goes.

What it measures, on one image set (bench_process.py's: corpus copies with new UIDs, their
own sizes and transfer syntaxes, or ``--images DIR`` for a set of your own, such as large
12-bit, JPEG 2000 and 16-bit radiographs), in the same run:

- **pipeline**: ``process_dicom.py`` as a whole process, warm (the ONNX export cached by a
  first run that is not counted), fp32, heatmaps and previews on (the defaults), at
  ``--batch-size``.
- **network only**: the project's own ONNX session (:func:`cxrsr.model.classifier.load_classifier`,
  the same export), called through :meth:`Classifier.predict_with_maps` (scores and class
  activation maps, as the pipeline calls it) over ready float32 tensors of the model's input
  shape, at the same batch size, in a process of its own on the same cores.
- **limit ratio** = pipeline images/s ÷ network-only images/s, twice: for the whole process
  (start-up included) and for its steady rate (the whole set's run minus a run over its first
  half, which takes start-up out).
- **where the time goes**: one process, one image at a time, under :mod:`cProfile`: the
  package's own steps (decode per transfer syntax, preprocessing, the display preview, the
  network, the heatmap PNGs, the journal's flushes), as cumulative seconds per image. The
  pipeline overlaps these (readers decode while the network runs), so the table says what
  each step costs, not what the wall clock shows.

Random weights (no download); they test speed, never clinical values. Run it on an idle
machine: contention from other processes shows in "others" and lowers both rates.

    .venv/bin/python bench/bench_limit.py --count 96
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_process

from cxrsr.config import PROJECT_ROOT

#: Functions whose cumulative time the profile table reports, by the step they are.
STEPS = {
    "decode": ("cxrsr/dicomio/reading.py", "read_radiograph"),
    "preprocess": ("cxrsr/model/preprocess.py", "preprocess"),
    "preview": ("cxrsr/classify.py", "write_preview"),
    "network": ("cxrsr/model/classifier.py", "predict_with_maps"),
    "heatmaps": ("cxrsr/model/heatmaps.py", "_write_pngs"),
    "flush": ("cxrsr/files.py", "sync_files"),
}


class _InThisThread:
    """An executor that runs each task at once in the calling thread, so that cProfile,
    which follows one thread, sees the heatmap PNGs the pipeline writes on a background one."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Nothing runs in the background."""


def network_only(cache_dir: Path, batch_size: int, images: int) -> float:
    """Images/s of the project's ONNX session over ready tensors (a child process's job)."""
    import numpy as np

    from cxrsr.model.classifier import load_classifier

    classifier = load_classifier(cache_dir=cache_dir, device="cpu")
    size = classifier.input_size
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1024, 1024, (batch_size, 1, size, size)).astype(np.float32)
    classifier.predict_with_maps(batch)  # warm-up: the first call allocates
    batches = max(1, images // batch_size)
    started = time.perf_counter()
    for _ in range(batches):
        classifier.predict_with_maps(batch)
    return batches * batch_size / (time.perf_counter() - started)


def profile_steps(
    image_dir: Path, cache_dir: Path, work: Path, batch_size: int
) -> dict[str, object]:
    """Seconds per image of each step, one image at a time in this process (a child's job)."""
    import numpy as np

    from cxrsr.classify import prepare
    from cxrsr.dicomio.discovery import iter_sources
    from cxrsr.files import sync_files
    from cxrsr.model.classifier import load_classifier
    from cxrsr.model.heatmaps import HeatmapWriter

    classifier = load_classifier(cache_dir=cache_dir, device="cpu")
    sources = list(iter_sources([image_dir]))
    syntax_seconds: dict[str, list[float]] = collections.defaultdict(list)
    profiler = cProfile.Profile()
    heatmaps = HeatmapWriter(work, threads=1)
    heatmaps._pool = _InThisThread()  # type: ignore[assignment]  # cProfile sees one thread
    ready = []
    for source in sources:
        import pydicom

        syntax = str(
            pydicom.dcmread(source.name, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
        started = time.perf_counter()
        profiler.enable()
        item = prepare(source, results_dir=work, input_size=classifier.input_size)
        profiler.disable()
        syntax_seconds[syntax].append(time.perf_counter() - started)
        if item.model_input is not None:
            ready.append(item)
    profiler.enable()
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        scores, maps = classifier.predict_with_maps(np.stack([i.model_input for i in chunk]))
        tasks = [
            heatmaps.write(item.path, s, m, classifier.input_size)[1]
            for item, s, m in zip(chunk, scores, maps, strict=True)
        ]
        written = [path for task in tasks for path in task.result()]
        sync_files(written)
    heatmaps.close()
    profiler.disable()
    stats = pstats.Stats(profiler)
    steps = {}
    for step, (file_suffix, function) in STEPS.items():
        total = sum(
            row[3]  # cumulative time
            for (filename, _, name), row in stats.stats.items()  # type: ignore[attr-defined]
            if name == function and filename.endswith(file_suffix)
        )
        steps[step] = total / max(1, len(sources))
    return {
        "images": len(sources),
        "steps": steps,
        "prepare_by_syntax": {k: (sum(v) / len(v), len(v)) for k, v in syntax_seconds.items()},
    }


def child(argv: Sequence[str]) -> int:
    """``--child network|profile ...``: one measurement in a process of its own."""
    kind, cache_dir, batch_size, rest = argv[0], Path(argv[1]), int(argv[2]), argv[3:]
    if kind == "network":
        print(json.dumps({"images_per_s": network_only(cache_dir, batch_size, int(rest[0]))}))
    else:
        print(json.dumps(profile_steps(Path(rest[0]), cache_dir, Path(rest[1]), batch_size)))
    return 0


def run_child(args: Sequence[str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
        cwd=PROJECT_ROOT,
    )
    if done.returncode:
        raise SystemExit(f"E: the {args[0]} measurement failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=96, help="images in the set (default 96)")
    parser.add_argument("--images", type=Path, help="a folder of your own instead of the set")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-limit-") as tmp:
        work = Path(tmp)
        cache_dir = work / "cache"
        bench_process.write_random_weights(cache_dir)
        if args.images is not None:
            image_dir = args.images
            count = sum(1 for _ in image_dir.rglob("*.dcm"))
        else:
            bench_process.build_set(bench_process.CORPUS_DIR, work / "set", args.count, args.seed)
            image_dir, count = work / "set" / "images", args.count
        command = [
            sys.executable,
            "process_dicom.py",
            str(image_dir),
            "--cache-dir",
            str(cache_dir),
            "--batch-size",
            str(args.batch_size),
            "-q",
        ]
        cold = bench_process.measure(
            "pipeline cold",
            [*command, "-o", str(work / "cold" / "results.json")],
            PROJECT_ROOT,
            work / "logs",
        )
        if cold.exit_code:
            raise SystemExit(f"E: process_dicom.py exited {cold.exit_code}:\n{cold.stderr[-2000:]}")
        warm = bench_process.measure(
            "pipeline warm",
            [*command, "-o", str(work / "warm" / "results.json")],
            PROJECT_ROOT,
            work / "logs",
        )
        # The same command on the first half of the files: the difference between the two
        # runs is the pipeline's steady rate, without start-up (imports, model load).
        half = work / "half"
        half.mkdir()
        files = sorted(image_dir.rglob("*.dcm"))
        for path in files[: len(files) // 2]:
            (half / path.name).symlink_to(path)
        halved = bench_process.measure(
            "pipeline half",
            [*command[:2], str(half), *command[3:], "-o", str(work / "half-out" / "results.json")],
            PROJECT_ROOT,
            work / "logs",
        )
        network = run_child(
            ["network", cache_dir, args.batch_size, max(count, 4 * args.batch_size)]
        )
        profile = run_child(["profile", cache_dir, args.batch_size, image_dir, work / "profile"])

    pipeline_rate = count / warm.wall_s
    steady_rate = (count - count // 2) / max(1e-9, warm.wall_s - halved.wall_s)
    network_rate = float(network["images_per_s"])  # type: ignore[arg-type]
    print(f"\nimages: {count}, batch size {args.batch_size}, {os.cpu_count()} cores")
    print(
        f"pipeline (warm, whole process): {pipeline_rate:6.2f} images/s ({warm.wall_s:.1f} s; others {warm.others_cpu_s:.1f} CPU s)"
    )
    print(f"network only (same export):     {network_rate:6.2f} images/s")
    print(f"pipeline, steady (whole set minus half the set): {steady_rate:6.2f} images/s")
    print(
        f"limit ratio: {steady_rate / network_rate:.2f} steady, "
        f"{pipeline_rate / network_rate:.2f} whole process (goal >= 0.7)"
    )
    print("\nwhere the time goes, one image at a time (cumulative ms per image, cProfile):")
    steps: dict[str, float] = profile["steps"]  # type: ignore[assignment]
    total = sum(steps.values())
    for step, seconds in steps.items():
        print(f"  {step:<12} {seconds * 1000:8.1f} ms  {seconds / total:6.1%}")
    print("\nprepare (decode + preprocess + preview) by transfer syntax, ms per image:")
    by_syntax: dict[str, list[float]] = profile["prepare_by_syntax"]  # type: ignore[assignment]
    for syntax, (seconds, n) in sorted(by_syntax.items(), key=lambda kv: -kv[1][0]):
        print(f"  {syntax:<28} {seconds * 1000:8.1f} ms  ({int(n)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
