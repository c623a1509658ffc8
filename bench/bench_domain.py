#!/usr/bin/env python3
"""What the domain gates cost (issue 13): the header check, and a turned image's full decode.

1. ``cxrsr.dicomio.domain.check_domain`` on every corpus header, ``--repeats`` times: time per header;
2. ``cxrsr.classify.prepare`` (read, gates, decode, turn, preprocess: one worker's job) on a
   JPEG baseline and a JPEG 2000 corpus file, saved twice: Patient Orientation ``L\\F`` (the
   baseline), then ``F\\R`` (the same compressed bytes, turned after decoding). A turned image
   is decoded at full resolution, an upright one at reduced resolution; the ratio is printed.

Run: ``.venv/bin/python bench/bench_domain.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr.classify import prepare
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import check_domain

CORPUS = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
FILES = ("cxr09_orthanc_issue44_mono1_jpeg8.dcm", "cxr05_dx_canon_966_fixed_j2kr.dcm")


def median_seconds(path: Path, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        prepared = prepare(Source(str(path)))
        runs.append(time.perf_counter() - start)
        if prepared.status != "ready":
            raise SystemExit(f"{path}: {prepared.reason}")
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    headers = []
    for path in sorted(CORPUS.glob("*.dcm")):
        try:
            headers.append(pydicom.dcmread(path, force=True, stop_before_pixels=True))
        except Exception:
            continue  # hostile corpus files: not headers the gates ever see
    start = time.perf_counter()
    for _ in range(args.repeats * 40):
        for header in headers:
            check_domain(header)
    per_header = (time.perf_counter() - start) / (args.repeats * 40 * len(headers))
    print(f"check_domain: {per_header * 1e6:.0f} µs per header ({len(headers)} corpus headers)")
    with tempfile.TemporaryDirectory() as folder:
        for name in FILES:
            ds = pydicom.dcmread(CORPUS / name)
            times = {}
            for label, orientation in (("upright L\\F", ["L", "F"]), ("turned F\\R", ["F", "R"])):
                ds.PatientOrientation = orientation
                path = Path(folder) / "image.dcm"
                ds.save_as(path)
                median_seconds(path, 1)  # warm the codec
                times[label] = median_seconds(path, args.repeats)
            upright, turned = times.values()
            print(
                f"{name}: prepare upright {upright * 1000:.0f} ms, turned {turned * 1000:.0f} ms, "
                f"{turned / upright:.1f}x the upright time"
            )


if __name__ == "__main__":
    main()
