"""Benchmark a rerun of process_dicom.py over unchanged files against the first run.

What it measures
----------------
The same command, run twice on the same folder, each as a whole process (start-up,
imports, everything) with ``bench_process.py``'s measuring harness:

- **first**: a fresh results file, every image classified (the ONNX export of the
  weights is made beforehand by an untimed one-image run, as on any machine that has
  run process_dicom.py once: the first run is not charged for it);
- **rerun**: the same command again; every file is unchanged, so every result is kept
  (issue 9, item 3) and neither the model nor a reader process should start;
- **rerun +N**: ``--added`` more images copied in (default 8), as users do when they
  add a few files to ``data/``: only those are classified.

It prints each run's wall time, CPU time and peak memory, the ratio first/rerun, and
PASS/FAIL against the issue's target (at least 20x). It also checks that the rerun wrote
the very same bytes and that the ``+N`` run classified exactly the added files.

The image set is ``bench_process.py``'s (copies of the corpus's classifiable chest
X-rays with fresh UIDs, random-weights DenseNet under the real weights file name).

How to run
----------
From the repository root::

    .venv/bin/python bench/bench_rerun.py                 # 192 images
    .venv/bin/python bench/bench_rerun.py --count 20      # smoke run

Exit code 0 when the target is met and every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_process import (
    CORES,
    CORPUS_DIR,
    MB,
    REPO_ROOT,
    Run,
    build_set,
    measure,
    work_dir,
    write_random_weights,
)

#: The issue's target: a rerun over unchanged files at least 20x faster than the first run.
TARGET_SPEEDUP = 20.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark a rerun of process_dicom.py over unchanged files.",
        epilog="Example: .venv/bin/python bench/bench_rerun.py --count 192",
    )
    parser.add_argument("--count", type=int, default=192, help="images in the set (default 192)")
    parser.add_argument("--added", type=int, default=8, help="images added for the last run")
    parser.add_argument("--seed", type=int, default=0, help="order and UIDs of the set")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the set in DIR")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="corpus folder")
    args = parser.parse_args(argv)
    if args.count < 1 or args.added < 0:
        parser.error("--count must be at least 1 and --added at least 0")
    return args


def summarise(run: Run, count: int) -> str:
    return (
        f"{run.label:>10}: {run.wall_s:7.2f} s wall, {run.cpu_s:7.2f} s CPU, "
        f"{count / run.wall_s:8.1f} files/s, peak tree RSS {run.peak_tree_rss / MB:5.0f} MB, "
        f"{run.peak_processes} processes, exit {run.exit_code}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with work_dir(args.keep) as root:
        manifest, _ = build_set(args.corpus, root, args.count + args.added, args.seed)
        all_images = root / "images"
        names = sorted(manifest["files"])
        image_dir = root / "rerun-images"
        shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir()
        for name in names[: args.count]:
            shutil.copy2(all_images / name, image_dir / name)
        cache_dir = root / "cache"
        write_random_weights(cache_dir)
        run_dir = root / "rerun-runs"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        results = run_dir / "results.json"

        def command(*inputs: Path, output: Path = results) -> list[str]:
            return [
                sys.executable,
                "process_dicom.py",
                *map(str, inputs),
                "--output",
                str(output),
                "--cache-dir",
                str(cache_dir),
                "-q",
            ]

        warm = measure(
            "warm-up",
            command(image_dir / names[0], output=run_dir / "warm.json"),
            REPO_ROOT,
            run_dir,
        )
        first = measure("first", command(image_dir), REPO_ROOT, run_dir)
        first_bytes = results.read_bytes()
        rerun = measure("rerun", command(image_dir), REPO_ROOT, run_dir)
        same_bytes = results.read_bytes() == first_bytes
        for name in names[args.count :]:
            shutil.copy2(all_images / name, image_dir / name)
        added = measure(f"rerun +{args.added}", command(image_dir), REPO_ROOT, run_dir)
        document = json.loads(results.read_text(encoding="utf-8"))
        statuses = [entry["status"] for entry in document["images"]]

        print()
        print(f"set: {args.count} images (+{args.added}), in {image_dir}")
        print(summarise(first, args.count))
        print(summarise(rerun, args.count))
        print(summarise(added, args.count + args.added))
        problems = []
        for run in (warm, first, rerun, added):
            if run.exit_code != 0:
                problems.append(f"{run.label} exited {run.exit_code}: {run.stderr.strip()[-300:]}")
        if not same_bytes:
            problems.append("the rerun changed the results file")
        kept = f"({args.count} kept from an earlier run)"
        if args.added and kept not in added.stdout:
            problems.append(f"rerun +{args.added} did not keep the {args.count} earlier results")
        if statuses != ["classified"] * (args.count + args.added):
            problems.append("not every image is classified in the last results file")
        ratio = first.wall_s / rerun.wall_s
        print(
            f"first/rerun = {ratio:.1f}x ({first.wall_s:.2f} s vs {rerun.wall_s:.2f} s); "
            f"first/rerun +{args.added} = {first.wall_s / added.wall_s:.1f}x"
        )
        # CPU time is the steadier figure on a shared machine: others' work does not add to it.
        print(f"CPU first/rerun = {first.cpu_s / rerun.cpu_s:.1f}x")
        busy = [r.label for r in (first, rerun) if r.others_cpu_s > 0.1 * r.wall_s * CORES]
        if busy:
            print(
                f"W: other processes used more than 10% of the cores during {', '.join(busy)}: "
                "wall times are inflated; rerun when the machine is idle"
            )
        for problem in problems:
            print(f"FAIL: {problem}")
        speed_ok = ratio >= TARGET_SPEEDUP
        print(
            f"{'PASS' if speed_ok else 'FAIL'}: rerun over {args.count} unchanged files is "
            f"{ratio:.1f}x faster than the first run (target >= {TARGET_SPEEDUP:.0f}x)"
        )
        return 0 if speed_ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
