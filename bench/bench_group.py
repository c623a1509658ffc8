#!/usr/bin/env python3
"""Several watchers on several Orthancs sharing one PostgreSQL index, at full size.

Two Orthancs on one throwaway PostgreSQL cluster and one storage folder (the hospital
layout); ``--images`` radiographs (copies of one corpus CR with fresh UIDs, four to a
study) are sent alternately to both; ``--watchers`` ``watch_orthanc.py --once`` run at
once, alternately on the two Orthancs, each with its own state folder. Printed: the wall
time, how many images each watcher stored, and the check that every image has exactly
one SR and one key image (exit 1 otherwise). The test suite runs the same with 24 images
(``tests/test_postgres.py``).

With ``--baseline`` the same number of images goes first through one watcher (a fresh
cluster and Orthancs), and the group's throughput is printed as a ratio of that one's.

Run from the project root::

    .venv/bin/python bench/bench_group.py --images 200 --watchers 3 --baseline
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import pydicom  # noqa: E402
from bench_watch import env_for, make_images, random_weights, store  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402
from cxrsr.pacs.local_postgres import LocalPostgres  # noqa: E402
from tests.test_watch import key_images_by_image, results_by_image  # noqa: E402


def run_group(images_count: int, watchers: int, work: Path) -> tuple[float, list[int], bool, bool]:
    """One run on a fresh cluster and two fresh Orthancs: the wall time of the watchers,
    how many images each stored, whether each image has exactly one SR and one key image,
    and whether every watcher exited 0."""
    password = secrets.token_urlsafe(16)
    with LocalPostgres() as pg:
        storage = work / "storage"
        storage.mkdir(mode=0o700)
        settings = {**pg.orthanc_settings(), "StorageDirectory": str(storage)}
        group = [LocalOrthanc(work / name, "bench", password, overrides=settings) for name in "ab"]
        with group[0], group[1]:
            images = make_images(work / "in", images_count, small=True)
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images]
            for n, path in enumerate(images):
                store(group[n % 2], [path])
            weights = random_weights(work / "weights")
            started = time.perf_counter()
            processes = []
            for n in range(watchers):
                command = [
                    sys.executable, str(PROJECT_ROOT / "watch_orthanc.py"), "--once", "-q",
                    "--state-dir", str(work / f"state-{n}"), "--cache-dir", str(weights),
                ]  # fmt: skip
                processes.append(
                    subprocess.Popen(command, cwd=PROJECT_ROOT, env=env_for(group[n % 2]))
                )
            codes = [p.wait(7200) for p in processes]
            seconds = time.perf_counter() - started
            stored = []
            for n in range(watchers):
                lines = (work / f"state-{n}" / "audit.jsonl").read_text().splitlines()
                stored.append(sum(1 for line in lines if json.loads(line)["event"] == "stored"))
            results, key_images = results_by_image(group[0]), key_images_by_image(group[1])
            once = all(len(results.get(u, [])) == 1 == len(key_images.get(u, [])) for u in uids)
            return seconds, stored, once, codes == [0] * watchers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--watchers", type=int, default=3)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first the same images with one watcher, on a fresh cluster: print the "
        "group's throughput as a ratio of one watcher's",
    )
    args = parser.parse_args()
    runs = ([1] if args.baseline else []) + [args.watchers]
    rates, ok = {}, True
    for watchers in runs:
        with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp:
            seconds, stored, once, exited = run_group(args.images, watchers, Path(tmp))
        rates[watchers] = args.images / seconds
        ok = ok and once and exited
        print(
            f"{args.images} images, {watchers} watcher(s) on 2 Orthancs sharing PostgreSQL: "
            f"{seconds:.0f} s ({rates[watchers]:.2f} images/s); all exited 0: {exited}; "
            f"stored per watcher {stored}; exactly one SR and one key image each: {once}"
        )
    if args.baseline:
        print(f"throughput of {args.watchers} watchers / 1 watcher: "
              f"{rates[args.watchers] / rates[1]:.2f}x")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
