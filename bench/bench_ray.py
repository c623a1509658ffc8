"""Benchmark process_dicom.py --engine ray against --engine local, and the shard resume plan.

The image set is bench_process.py's: the corpus radiographs that classify, copied with
new Study/Series/SOP Instance UIDs to ``--n`` files (shuffled, so sizes from 169x211 to
3000x3000 and every transfer syntax of the corpus are interleaved). Then, in one run of
this script on the same machine:

1. start-up: each engine over one image, end to end (the Ray engine starts a local Ray);
2. ``--n`` images with ``--engine local`` and with ``--engine ray``: wall time, images/s,
   peak RSS (sampled sum over the process tree, and the largest single process);
3. a rerun of the Ray engine over the unchanged set (every shard kept);
4. the resume plan over a synthetic manifest of ``--manifest-files`` files (default
   1,000,000): that many sources and their finished shard files (headers only, which is
   all a plan reads), planned with the file fingerprints supplied (a ``stat`` per file
   is measured separately, over the real set).

Usage::

    .venv/bin/python bench/bench_ray.py                 # 200 images
    .venv/bin/python bench/make_corpus.py small /tmp/small-corpus
    .venv/bin/python bench/bench_ray.py --n 20000 --corpus /tmp/small-corpus \\
        --extra-args "--precision int8 --no-heatmaps"   # 20,000 small radiographs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_process import (
    CORPUS_DIR,
    MB,
    REPO_ROOT,
    Run,
    build_set,
    measure,
    work_dir,
    write_random_weights,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images in the set (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="order and UIDs of the set")
    parser.add_argument("--shard-size", type=int, default=64, help="inputs per shard")
    parser.add_argument("--manifest-files", type=int, default=1_000_000, help="resume plan size")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the set in DIR")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="corpus folder")
    parser.add_argument(
        "--extra-args",
        default="",
        metavar="ARGS",
        help="more process_dicom.py arguments for every run, one shell-quoted string: "
        '"--precision int8 --no-heatmaps"',
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.manifest_files < 1:
        parser.error("--n and --manifest-files must be at least 1")
    return args


def summarise(run: Run, count: int) -> str:
    return (
        f"{run.label:>14}: {run.wall_s:8.2f} s wall, {run.cpu_s:8.2f} s CPU (driver tree), "
        f"{count / run.wall_s:7.2f} images/s, peak tree RSS {run.peak_tree_rss / MB:6.0f} MB, "
        f"largest process {run.max_single_rss / MB:5.0f} MB, others used "
        f"{run.others_cpu_s / (run.wall_s * (os.cpu_count() or 1)):4.0%} of the cores, "
        f"exit {run.exit_code}"
    )


def resume_plan_seconds(folder: Path, files: int, shard_size: int) -> tuple[float, float]:
    """Seconds to write ``files`` sources' finished shards (headers only), and to plan over
    them (every shard kept), with synthetic fingerprints."""
    from cxrsr import shards
    from cxrsr.dicomio.discovery import Source
    from cxrsr.engines import ray_engine
    from cxrsr.results import ModelRecord

    model: ModelRecord = {
        "weights": "densenet121-res224-all",
        "weights_sha256": "0" * 64,
        "torchxrayvision": "1.5.7",
        "labels": [f"label {i}" for i in range(18)],
        "options": {"domain": "strict", "heatmaps": "findings"},
    }
    key = ray_engine.model_key(model)

    def sources() -> list[Source]:
        return [Source(f"/archive/{i // 1000:04d}/{i:07d}.dcm") for i in range(files)]

    def mark(source: Source) -> dict[str, int]:
        return {"size": 1_000_000 + len(source.path), "mtime_ns": 1_700_000_000_000_000_000}

    started = time.perf_counter()
    folder.mkdir(parents=True)
    every = sources()
    for number, first in enumerate(range(0, files, shard_size)):
        chunk = every[first : first + shard_size]
        digest = shards.inputs_digest(((s.name, mark(s)) for s in chunk), key)
        header = {
            "format": shards.SHARD_FORMAT,
            "shard": number,
            "count": len(chunk),
            "inputs_sha256": digest,
            "model": model,
            "statuses": {"classified": len(chunk)},
        }
        (folder / shards.shard_name(number)).write_text(ray_engine.json.dumps(header) + "\n")
    written = time.perf_counter() - started
    del every
    real = ray_engine.fingerprint
    ray_engine.fingerprint = mark  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        plan = ray_engine.make_plan(iter(sources()), shard_size, model, folder)
        planned = time.perf_counter() - started
    finally:
        ray_engine.fingerprint = real
    assert len(plan.kept) == plan.shards and not plan.todo, "the synthetic shards were not kept"
    return written, planned


def stat_seconds(folder: Path) -> tuple[int, float]:
    """Seconds per file of the plan's fingerprint (a ``stat``) over a real folder."""
    from cxrsr.dicomio.discovery import Source
    from cxrsr.resume import fingerprint

    paths = [str(p) for p in folder.iterdir()]
    started = time.perf_counter()
    for path in paths:
        fingerprint(Source(path))
    return len(paths), (time.perf_counter() - started) / max(len(paths), 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with work_dir(args.keep) as root:
        manifest, _ = build_set(args.corpus, root, args.n, args.seed)
        images = root / "images"
        cache_dir = root / "cache"
        if not cache_dir.exists():
            write_random_weights(cache_dir)
        runs_dir = root / "ray-runs"
        shutil.rmtree(runs_dir, ignore_errors=True)
        runs_dir.mkdir()
        one = images / sorted(manifest["files"])[0]

        def command(engine: str, inputs: Path, output: Path) -> list[str]:
            return [
                sys.executable,
                "process_dicom.py",
                str(inputs),
                "-o",
                str(output),
                "--cache-dir",
                str(cache_dir),
                "-q",
                "--engine",
                engine,
                "--shard-size",
                str(args.shard_size),
                *shlex.split(args.extra_args),
            ]

        measure("warm-up", command("local", one, runs_dir / "warm.json"), REPO_ROOT, runs_dir)
        start_local = measure(
            "start-up local",
            command("local", one, runs_dir / "one-local.json"),
            REPO_ROOT,
            runs_dir,
        )
        start_ray = measure(
            "start-up ray", command("ray", one, runs_dir / "one-ray.json"), REPO_ROOT, runs_dir
        )
        local = measure(
            "local", command("local", images, runs_dir / "local.json"), REPO_ROOT, runs_dir
        )
        ray = measure("ray", command("ray", images, runs_dir / "ray.json"), REPO_ROOT, runs_dir)
        rerun = measure(
            "ray rerun", command("ray", images, runs_dir / "ray.json"), REPO_ROOT, runs_dir
        )
        count, per_stat = stat_seconds(images)
        written, planned = resume_plan_seconds(
            runs_dir / "plan" / "results.d", args.manifest_files, args.shard_size
        )

        print()
        print(f"set: {args.n} images in {images}; {os.cpu_count()} CPUs; load {os.getloadavg()}")
        if args.extra_args:
            print(f"every run with: {args.extra_args}")
        for run in (start_local, start_ray):
            print(summarise(run, 1))
        for run in (local, ray, rerun):
            print(summarise(run, args.n))
        ratio = local.wall_s / ray.wall_s
        print(f"ray / local images/s: {ratio:.2f}x; rerun {ray.wall_s / rerun.wall_s:.1f}x faster")
        shards_count = -(-args.manifest_files // args.shard_size)
        print(
            f"resume plan over {args.manifest_files:,} files ({shards_count:,} shards, all kept): "
            f"{planned:.2f} s (+ a stat per file: {per_stat * 1e6:.0f} µs each over {count} "
            f"real files, {per_stat * args.manifest_files:.0f} s for all); writing the "
            f"synthetic shard headers took {written:.1f} s"
        )
        problems = [
            f"{run.label} exited {run.exit_code}: {run.stderr.strip()[-300:]}"
            for run in (start_local, start_ray, local, ray, rerun)
            if run.exit_code != 0
        ]
        for problem in problems:
            print(f"E: {problem}")
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
