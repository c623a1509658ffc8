"""Peak memory of the steps that read a sharded results set, at 20,000 and 200,000 entries.

Makes two synthetic sharded results sets (``tests/scale_fixtures.py``: shards of 64 written
by the engine's own writer, a manifest, one preview and heatmap per label shared by every
classified entry), then runs each step on each in a fresh Python process and prints that
process's resident-set high-water mark (``VmHWM``), and the ratio of the large set's
figure to the small one's. A step whose memory is flat in the number of entries has a
ratio near 1.

Steps:

- ``dump``: ``python -m cxrsr.results dump`` (to /dev/null);
- ``report``: the report's page (``cxrsr.report.render_report``; a summary at this size);
- ``sr-plan``: what ``generate_sr.py`` does before it writes the first SR: every entry
  read and checked, each with its key image's reference (``cxrsr.sr.batch.plan``);
- ``list``: for comparison, the entries held in one list, as ``generate_sr.py`` and the
  report held them before they streamed.

Usage::

    .venv/bin/python bench/bench_results_scale.py                  # 20,000 and 200,000
    .venv/bin/python bench/bench_results_scale.py --small 2000 --large 20000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from scale_fixtures import make_sharded_results  # noqa: E402

CHILD = r"""
import os, sys, time
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
step, path = sys.argv[1], Path(sys.argv[2])
from cxrsr.results import dump, load_results
from cxrsr.report import render_report
from cxrsr.sr import batch
from cxrsr.sr.entries import ModelInfo
start, base = time.perf_counter(), hwm()
if step == "dump":
    out, sys.stdout = sys.stdout, open(os.devnull, "w")
    assert dump(path) == 0
    sys.stdout = out
elif step == "report":
    page = render_report(load_results(path), path.parent).html
    assert 'id="summary"' in page
elif step == "list":
    entries = list(load_results(path)["images"])
elif step == "sr-plan":
    document = load_results(path)
    batch.plan(document, ModelInfo.from_results(document["model"]), path.parent, batch.BatchTally())
print(base, hwm(), time.perf_counter() - start)
"""

STEPS = ("dump", "report", "sr-plan", "list")


def measure(step: str, results: Path) -> tuple[int, int, float]:
    """``step``'s (after-imports, peak) resident set in bytes and its seconds, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
    )
    base, peak, seconds = done.stdout.split()
    return int(base), int(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="results-scale-") as tmp:
        sets = {}
        for count in (args.small, args.large):
            start = time.perf_counter()
            sets[count], _ = make_sharded_results(Path(tmp) / str(count), count)
            size = sum(p.stat().st_size for p in sets[count].parent.rglob("*.jsonl"))
            print(
                f"made {count} entries ({size / 1e6:.0f} MB of shards) "
                f"in {time.perf_counter() - start:.1f} s",
                flush=True,
            )
        print(f"| step | {args.small:,} entries | {args.large:,} entries | ratio |")
        print("|---|---|---|---|")
        for step in STEPS:
            figures = {count: measure(step, results) for count, results in sets.items()}
            (_, small, small_s), (_, large, large_s) = figures[args.small], figures[args.large]
            print(
                f"| {step} | {small / 2**20:.0f} MB, {small_s:.1f} s "
                f"| {large / 2**20:.0f} MB, {large_s:.1f} s | {large / small:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
