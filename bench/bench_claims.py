#!/usr/bin/env python3
"""What a claim costs per image, on Orthanc's SQLite index and on PostgreSQL, and the race.

* **Overhead per image.** One process claims ``--images`` free instances and marks each
  done, as a watcher does for every image it classifies (acquire: PUT + GET of the
  ``cxrsr-claim`` metadata; finish: PUT with ``If-Match`` + GET). Timed per image; p50
  and p95 are printed, for an Orthanc with its default SQLite index and for two
  Orthancs sharing one PostgreSQL index (the hospital stack; Debian orthanc-postgresql,
  ``"Lock": false``, one storage folder), claims alternating between the two.
* **The race.** ``--processes`` processes x ``--rounds`` x ``--keys`` claims on the same
  instances through both PostgreSQL Orthancs (see ``tests/claim_race.py``): the double
  claims (must be 0) and the time per contended acquire.

Run from the project root (PostgreSQL and orthanc-postgresql installed, as test.sh does)::

    .venv/bin/python bench/bench_claims.py --images 500
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

from cxrsr.pacs.claims import Claims  # noqa: E402
from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402
from cxrsr.pacs.local_postgres import LocalPostgres  # noqa: E402
from tests.claim_race import WEIGHTS, client, race, store_tiny  # noqa: E402

USER = "bench"


def percentiles(values: list[float]) -> str:
    cuts = statistics.quantiles(values, n=20)
    return f"p50 {statistics.median(values):.1f} ms, p95 {cuts[18]:.1f} ms (n={len(values)})"


def overhead(servers: list[LocalOrthanc], password: str, images: int) -> list[float]:
    """Milliseconds of acquire + finish per free image, alternating between ``servers``."""
    keys = store_tiny(servers[0].url, USER, password, images)
    claimers = [Claims(client(s.url, USER, password), WEIGHTS) for s in servers]
    times = []
    for n, key in enumerate(keys):
        claims = claimers[n % len(claimers)]
        started = time.perf_counter()
        lease = claims.acquire(key, "2026-01-01T00:00:00+00:00")
        assert lease is not None and lease.etag is not None, "claims are not enabled"
        claims.finish(lease)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as tmp:
        folder = Path(tmp)
        with LocalOrthanc(folder / "sqlite", USER, password) as sqlite:
            print(f"SQLite index:     claim + done per image: "
                  f"{percentiles(overhead([sqlite], password, args.images))}")  # fmt: skip
        with LocalPostgres() as postgres:
            storage = folder / "storage"
            storage.mkdir(mode=0o700)
            settings = {**postgres.orthanc_settings(), "StorageDirectory": str(storage)}
            group = [
                LocalOrthanc(folder / name, USER, password, overrides=settings)
                for name in ("pg-a", "pg-b")
            ]
            with group[0], group[1]:
                times = overhead(group, password, args.images)
                print(f"PostgreSQL index: claim + done per image: {percentiles(times)}")
                keys = store_tiny(group[0].url, USER, password, args.keys)
                result = race([s.url for s in group], USER, password, keys,
                              args.processes, args.rounds)  # fmt: skip
                doubles = sum(1 for winners in result.winners.values() if len(winners) != 1)
                print(
                    f"race: {args.processes} processes x {args.rounds * args.keys} claims on "
                    f"{args.keys} instances through 2 Orthancs in {result.seconds:.1f} s: "
                    f"{doubles} double claims, {len(result.errors)} errors; contended "
                    f"acquire {percentiles(result.acquire_ms)}"
                )
                return 1 if doubles or result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
