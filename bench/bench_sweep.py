#!/usr/bin/env python3
"""What a reconciliation sweep of watch_orthanc.py costs on a PACS of many series.

``--series`` one-instance CR series (8 x 8 pixels, fresh UIDs) are stored in a fresh
Orthanc (SQLite index, or with ``--postgres`` its index on a throwaway
PostgreSQL). Then, with the watcher's own queries (:class:`cxrsr.pacs.watch.OrthancIndex`):

* **cheap sweep**: the two ``/tools/find`` requests (CR, DX; series IDs only) that the
  sweep every ``--reconcile-interval`` makes when every series was found complete
  before; timed ``--repeat`` times, median printed, and extrapolated linearly to
  100,000 series (the answer is a list of IDs: Orthanc's work and the JSON grow with
  the number of series);
* **full look per series**: what the full sweep asks of each series without a result
  (``GET /series/{id}``, ``GET /series/{id}/instances``, ``POST /tools/lookup`` of its
  SR series), timed over a sample; a series with a result costs about twice that (its
  SR series' instances, and its key image series' lookup and instances; each SR's
  evidence is read once per process). Extrapolated to 100,000 series.

Run from the project root::

    .venv/bin/python bench/bench_sweep.py --series 5000
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402
from cxrsr.pacs.local_postgres import LocalPostgres  # noqa: E402
from cxrsr.pacs.watch import OrthancIndex  # noqa: E402
from cxrsr.sr.uids import sr_series_uid  # noqa: E402
from tests.claim_race import client, store_tiny  # noqa: E402

USER = "bench"
TARGET = 100_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, default=5000)
    parser.add_argument("--sample", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres", action="store_true", help="Orthanc's index in PostgreSQL")
    args = parser.parse_args()
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, ExitStack() as stack:
        overrides: dict[str, object] = {}
        if args.postgres:
            overrides = stack.enter_context(LocalPostgres()).orthanc_settings()
        server = stack.enter_context(
            LocalOrthanc(Path(tmp) / "orthanc", USER, password, overrides=overrides)
        )
        started = time.perf_counter()
        store_tiny(server.url, USER, password, args.series)
        stored = time.perf_counter() - started
        index = OrthancIndex(client(server.url, USER, password))
        print(f"{'PostgreSQL' if args.postgres else 'SQLite'} index, {args.series} series "
              f"stored in {stored:.0f} s")  # fmt: skip

        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            found = index.radiograph_series()
            times.append(time.perf_counter() - started)
        assert len(found) == args.series
        cheap = statistics.median(times)
        print(f"cheap sweep (2 x /tools/find): {cheap * 1000:.0f} ms; "
              f"~{cheap * TARGET / args.series:.1f} s at {TARGET:,} series")  # fmt: skip

        per_series = []
        for series_id in found[: args.sample]:
            started = time.perf_counter()
            series = index.series(series_id)
            assert series is not None
            uid = series["MainDicomTags"]["SeriesInstanceUID"]
            index.series_instances(series_id, uid)
            index.lookup_series(sr_series_uid(uid, "model", "0" * 64))
            per_series.append(time.perf_counter() - started)
        look = statistics.median(per_series)
        print(
            f"full look per series without a result: {look * 1000:.2f} ms (3 requests); "
            f"~{look * TARGET:.0f} s at {TARGET:,} series (about twice that with results)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
