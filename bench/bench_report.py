#!/usr/bin/env python3
"""What the HTML report costs generate_sr.py: time and bytes per classified image.

    .venv/bin/python bench/bench_report.py RESULTS_JSON [--count 200]

RESULTS_JSON is a results file whose entries carry ``preview`` and ``heatmaps`` (the
contract of issue 11); its classified entries are repeated up to ``--count`` images.
Printed beside the cost of the SRs for the same entries in the same run, the baseline
generate_sr.py already pays.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr.report import render_report
from cxrsr.sr.batch import generate_srs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1, help="as generate_sr.py --jobs")
    args = parser.parse_args()
    document = json.loads(args.results.read_text(encoding="utf-8"))
    classified = [e for e in document["images"] if e["status"] == "classified"]
    entries = [dict(classified[i % len(classified)]) for i in range(args.count)]
    big = dict(document, images=entries)
    started = time.perf_counter()
    page = render_report(big, args.results.parent, jobs=args.jobs)
    report_s = time.perf_counter() - started
    # The SRs for the same entries, in one process: what generate_sr.py does anyway.
    # (Repeated entries share a SOP Instance UID, so each SR overwrites the last: the
    # work is the same, the folder stays small.)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        generate_srs(big, Path(out), datetime.datetime.now(datetime.UTC), True, jobs=args.jobs)
        sr_s = time.perf_counter() - started
    size = len(page.html.encode())
    n = len(entries)
    heatmaps = sum(len(e.get("heatmaps") or {}) for e in entries)
    print(f"{n} images, {heatmaps} heatmaps, jobs={args.jobs}")
    print(
        f"report: {report_s:.2f} s, {1000 * report_s / n:.1f} ms/image, {size / n / 1024:.0f} kB/image"
    )
    print(f"SRs:    {sr_s:.2f} s, {1000 * sr_s / n:.1f} ms/image")
    print(f"report / SRs: {report_s / sr_s:.2f}x")


if __name__ == "__main__":
    main()
