#!/usr/bin/env python3
"""Screenshot an HTML report in headless Chromium: the README's docs/report.png.

    ./run.sh --demo
    .venv/bin/python scripts/report_screenshot.py output/demo/report.html docs/report.png

The browser runs with no network features (no sync, updates or background fetches), so
the picture shows the report exactly as it opens from a USB stick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr.report import chromium


def screenshot(report: Path, target: Path, width: int = 1280, height: int = 1800) -> None:
    binary = chromium.find_binary()
    if binary is None:
        raise SystemExit("E: chromium not found (apt-get install chromium)")
    target.parent.mkdir(parents=True, exist_ok=True)
    done = chromium.run(
        binary,
        report.resolve().as_uri(),
        f"--window-size={width},{height}",
        f"--screenshot={target.resolve()}",
    )
    if not target.is_file():
        raise SystemExit(f"E: chromium wrote no screenshot: {done.stderr.strip()[-500:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html written by generate_sr.py")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    if not args.report.is_file():
        parser.error(f"{args.report}: no such report")
    screenshot(args.report, args.output, args.width, args.height)
    print(f"{args.output}: {args.width}x{args.height} screenshot of {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
