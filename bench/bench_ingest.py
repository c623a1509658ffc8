#!/usr/bin/env python3
"""Orthanc ingest on this machine: its built-in SQLite index, against PostgreSQL.

The same ``--images`` radiographs (copies of one 127 kB corpus CR with fresh UIDs, four
to a study) are sent over REST (``POST /instances``, ``--threads`` uploads at once, as a
busy modality pool would) into three fresh Orthancs in turn, each from the project's
``orthanc.json``:

* **SQLite**: Orthanc's own index and files on disk (``./run.sh``'s Orthanc);
* **PostgreSQL index**: the index in a throwaway PostgreSQL cluster on loopback (Debian
  ``orthanc-postgresql``), files on disk (the hospital stack);
* **PostgreSQL index + storage**: the files in PostgreSQL as well.

Printed: instances per second for each, and each PostgreSQL layout as a ratio of the
SQLite baseline measured in the same run (the machine's load moves all three alike).
A hospital sizes its Orthancs from these; none of it is asserted anywhere.

Run from the project root::

    .venv/bin/python bench/bench_ingest.py --images 600 --threads 8
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from bench_watch import make_images  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402
from cxrsr.pacs.local_postgres import LocalPostgres  # noqa: E402

LAYOUTS = ("SQLite", "PostgreSQL index", "PostgreSQL index + storage")


@contextmanager
def orthanc_for(layout: str, work: Path, password: str) -> Iterator[LocalOrthanc]:
    """A fresh Orthanc with ``layout``'s index and storage (a cluster of its own)."""
    if layout == "SQLite":
        with LocalOrthanc(work / "sqlite", "bench", password) as server:
            yield server
        return
    with LocalPostgres() as cluster:
        settings = cluster.orthanc_settings(storage=layout.endswith("storage"))
        folder = work / layout.replace(" ", "-").replace("+", "and")
        with LocalOrthanc(folder, "bench", password, overrides=settings) as server:
            yield server


def ingest(server: LocalOrthanc, images: list[bytes], threads: int) -> float:
    """Send every image with ``threads`` uploaders; instances per second."""
    lock = threading.Lock()
    queue = list(range(len(images)))
    failures: list[str] = []

    def uploader() -> None:
        with requests.Session() as session:
            session.auth = (server.username, server.password)
            while True:
                with lock:
                    if not queue:
                        return
                    index = queue.pop()
                answer = session.post(f"{server.url}/instances", data=images[index], timeout=120)
                if answer.status_code != 200:
                    failures.append(f"image {index}: HTTP {answer.status_code}")

    workers = [threading.Thread(target=uploader) for _ in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    if failures:
        raise SystemExit(f"E: {len(failures)} uploads failed, first: {failures[0]}")
    statistics = requests.get(
        f"{server.url}/statistics", auth=(server.username, server.password), timeout=30
    ).json()
    if statistics["CountInstances"] != len(images):
        raise SystemExit(f"E: Orthanc holds {statistics['CountInstances']} of {len(images)}")
    return len(images) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        # One set of files per layout: an instance already stored would not cost the same.
        images = {
            layout: [p.read_bytes() for p in make_images(work / f"in-{n}", args.images, small=True)]
            for n, layout in enumerate(LAYOUTS)
        }
        rates = {}
        for layout in LAYOUTS:
            with orthanc_for(layout, work, password) as server:
                rates[layout] = ingest(server, images[layout], args.threads)
    baseline = rates["SQLite"]
    print(f"Orthanc ingest, {args.images} instances of 127 kB, {args.threads} upload threads:")
    for layout, rate in rates.items():
        print(f"  {layout:<28} {rate:6.0f} instances/s  ({rate / baseline:.2f}x SQLite)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
