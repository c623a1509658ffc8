#!/usr/bin/env python3
"""Fuzz the whole pipeline with many thousand damaged files: counts, problems, peak memory.

The same fuzzer and checks as ``tests/test_fuzz.py`` (``tests/fuzzing.py``), at a scale
the test suite cannot afford. The cases are made in chunks (default 1,000): each chunk
is written to a temporary folder, and ``process_dicom.py``, ``generate_sr.py`` and
``upload_dicom.py`` each run once over it, bounded in time, into one local Orthanc that
lives for the whole run (its stored instances are deleted between chunks to bound the
disk, so a crash on any chunk is still seen). A random-weights DenseNet under the real
weights file name stands in for the model, as in the tests.

Run from the project root::

    .venv/bin/python bench/fuzz.py --cases 10000 --seed 1
    .venv/bin/python bench/fuzz.py --seed 1 --write-case 4711 /tmp/case   # reproduce one

It prints one line per chunk and, at the end, the statuses, the most frequent reasons,
every problem found (a traceback, a timeout, an exit code other than 0/1, an input
without its results entry, a classified image without its SR or E: line, an SR that
dciodvfy rejects, an Orthanc that stopped answering), and the peak memory of each
script (the largest single process of its tree, from ru_maxrss). Exit 0 when nothing
was found, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "tests"))

import fuzzing  # noqa: E402
import requests  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402

CORPUS_DIR = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
WEIGHTS_NAME = "densenet121-res224-all"


def random_weights(cache_dir: Path) -> Path:
    """A randomly initialised DenseNet under the real weights file name (as conftest does)."""
    import torch
    import torchxrayvision as xrv

    url = xrv.models.model_urls[WEIGHTS_NAME]["weights_url"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / os.path.basename(url)
    if not path.exists():
        torch.manual_seed(0)
        torch.save(xrv.models.DenseNet(), path)
    return cache_dir


def delete_everything(server: LocalOrthanc) -> None:
    """Empty Orthanc through its API between chunks, so the disk stays bounded."""
    auth = (server.username, server.password)
    for patient in requests.get(f"{server.url}/patients", auth=auth, timeout=60).json():
        requests.delete(f"{server.url}/patients/{patient}", auth=auth, timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="how many (default 10000)")
    parser.add_argument("--seed", type=int, default=1, help="the fuzzer's seed (default 1)")
    parser.add_argument("--first", type=int, default=0, help="first case number (default 0)")
    parser.add_argument("--chunk", type=int, default=1000, help="cases per run of the scripts")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    parser.add_argument(
        "--cache-dir", type=Path, help="weights folder (default: random weights in a temp dir)"
    )
    parser.add_argument(
        "--timeout-per-case",
        type=float,
        default=0.4,
        help="each script's run is killed after 60 s + this per case (default 0.4)",
    )
    parser.add_argument("--dciodvfy-sample", type=int, default=10, help="SRs checked per chunk")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--write-case",
        nargs=2,
        metavar=("N", "DIR"),
        help="only write case N of --seed into DIR (to reproduce a finding) and exit",
    )
    args = parser.parse_args()
    corpus = fuzzing.load_corpus(args.corpus)
    if not corpus:
        parser.error(f"no corpus files in {args.corpus}")
    if args.write_case:
        number, folder = int(args.write_case[0]), Path(args.write_case[1])
        (case,) = fuzzing.write_cases(folder, corpus, args.seed, [number], manifest=False)
        print(f"{folder / case.file_name}: {case.mutator}: {case.description}")
        return 0

    dciodvfy = shutil.which("dciodvfy")
    workroot = Path(tempfile.mkdtemp(prefix="cxrsr-fuzz-"))
    cache_dir = args.cache_dir or random_weights(workroot / "weights")
    started = time.monotonic()
    statuses: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    mutators: Counter[str] = Counter()
    peaks: dict[str, int] = {}
    seconds: Counter[str] = Counter()
    all_problems: list[str] = []
    by_kind: dict[str, list[str]] = {}
    sr_count = 0
    crashes = 0
    print(
        f"fuzz: seed {args.seed}, cases {args.first}..{args.first + args.cases - 1}, in {workroot}"
    )
    server = LocalOrthanc(workroot / "orthanc", "fuzz", secrets.token_urlsafe(16))
    server.start()
    try:
        for chunk_start in range(args.first, args.first + args.cases, args.chunk):
            indices = range(chunk_start, min(chunk_start + args.chunk, args.first + args.cases))
            workdir = workroot / f"chunk{chunk_start:06d}"
            workdir.mkdir()
            cases = fuzzing.write_cases(workdir / "cases", corpus, args.seed, indices)
            mutators.update(case.mutator.split("+")[0] for case in cases)
            timeout = 60 + args.timeout_per_case * len(cases)
            outcome = fuzzing.run_pipeline(
                workdir,
                workdir / "cases",
                cases,
                cache_dir,
                server,
                timeout,
                dciodvfy,
                args.dciodvfy_sample,
            )
            statuses.update(outcome.statuses)
            reasons.update(outcome.reasons)
            sr_count += outcome.sr_count
            for name, run in outcome.runs.items():
                peaks[name] = max(peaks.get(name, 0), run.max_rss_kb)
                seconds[name] += run.seconds
            found = outcome.all_problems()
            all_problems += found
            for kind, items in outcome.problems.items():
                by_kind.setdefault(kind, []).extend(items)
            print(
                f"cases {indices.start}..{indices.stop - 1}: "
                + "; ".join(line.strip() for line in fuzzing.summary_lines(outcome)),
                flush=True,
            )
            if outcome.orthanc is not None and not outcome.orthanc.alive:
                crashes += 1
                if server.process is None or server.process.poll() is not None:
                    server.stop()
                    server.start()  # count it, and go on with the next chunk
            delete_everything(server)
            if found:
                print(f"  kept the cases of this chunk: {workdir} (see cases.jsonl)", flush=True)
            if not args.keep and not found:
                shutil.rmtree(workdir / "cases")
                shutil.rmtree(workdir / "sr", ignore_errors=True)
        final = fuzzing.orthanc_state(server)
    finally:
        server.stop()
        if not args.keep and not all_problems:
            shutil.rmtree(workroot, ignore_errors=True)

    print(
        f"\n{sum(mutators.values())} cases in {time.monotonic() - started:.0f} s, seed {args.seed}"
    )
    print("mutators: " + ", ".join(f"{n} {m}" for m, n in mutators.most_common()))
    print(
        "results: " + ", ".join(f"{n} {s}" for s, n in statuses.most_common()) + f"; {sr_count} SRs"
    )
    print("most frequent reasons:")
    for reason, count in reasons.most_common(15):
        print(f"  {count:6d}  {reason}")
    print("peak memory (largest process of each script's tree, ru_maxrss):")
    for name, peak in peaks.items():
        print(f"  {name}: {peak / 1024:.0f} MB ({seconds[name]:.0f} s in all)")
    print(f"Orthanc at the end: {final.detail}; chunks after which it was down: {crashes}")
    print(f"problems: {len(all_problems)}")
    for kind, items in by_kind.items():
        if items:
            print(f"  {kind}: {len(items)}, e.g.")
            for item in items[:3]:
                print(f"    {item[:300]!r}")
    return 1 if all_problems or crashes or not final.alive else 0


if __name__ == "__main__":
    sys.exit(main())
