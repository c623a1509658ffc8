#!/usr/bin/env python3
"""Several watchers on several Orthancs sharing one PostgreSQL index, at full size.

Two Orthancs on one throwaway PostgreSQL cluster and one storage folder (the hospital
layout); ``--images`` radiographs (copies of one corpus CR with fresh UIDs, four to a
study) are sent alternately to both; ``--watchers`` ``watch_orthanc.py --once`` run at
once, alternately on the two Orthancs, each with its own state folder. Printed: the wall
time, how many images each watcher stored, and the check that every image has exactly
one SR and one key image (exit 1 otherwise). The test suite runs the same with 24 images
(``tests/test_postgres.py``).

Run from the project root::

    .venv/bin/python bench/bench_group.py --images 200 --watchers 3
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--watchers", type=int, default=3)
    args = parser.parse_args()
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp, LocalPostgres() as pg:
        work = Path(tmp)
        storage = work / "storage"
        storage.mkdir(mode=0o700)
        settings = {**pg.orthanc_settings(), "StorageDirectory": str(storage)}
        group = [LocalOrthanc(work / name, "bench", password, overrides=settings) for name in "ab"]
        with group[0], group[1]:
            images = make_images(work / "in", args.images, small=True)
            uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images]
            for n, path in enumerate(images):
                store(group[n % 2], [path])
            weights = random_weights(work / "weights")
            started = time.perf_counter()
            processes = []
            for n in range(args.watchers):
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
            for n in range(args.watchers):
                lines = (work / f"state-{n}" / "audit.jsonl").read_text().splitlines()
                stored.append(sum(1 for line in lines if json.loads(line)["event"] == "stored"))
            results, key_images = results_by_image(group[0]), key_images_by_image(group[1])
            once = all(len(results.get(u, [])) == 1 == len(key_images.get(u, [])) for u in uids)
            print(
                f"{args.images} images, {args.watchers} watchers on 2 Orthancs sharing "
                f"PostgreSQL: {seconds:.0f} s; exit codes {codes}; stored per watcher "
                f"{stored}; exactly one SR and one key image each: {once}"
            )
            return 0 if once and codes == [0] * args.watchers else 1


if __name__ == "__main__":
    sys.exit(main())
