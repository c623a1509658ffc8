#!/usr/bin/env python3
"""Time from StableSeries to SR in a watcher group, before and after one watcher is killed.

Two Orthancs on one throwaway PostgreSQL cluster and one storage folder (the hospital
layout, ``StableAge`` 2 s); ``--watchers`` ``watch_orthanc.py`` follow them in their
default mode (alternately on the two Orthancs, each with its own state folder, default
poll and sweep intervals). One-image series (copies of one corpus CR with fresh UIDs)
arrive alternately at both Orthancs, one every ``--pace`` seconds:

* the first half with every watcher alive: the **baseline**;
* during the second half the first watcher is ``kill -9``ed as soon as it has claimed
  an image (its log says it is classifying): the **kill** phase. Its claims are taken
  over by the others (its holder is a process of this host that no longer runs; on
  another host the claim's lease would have to expire first, 120 s).

A thread reads the shared change log every 0.1 s and notes when each change appears: the
latency of an image is from its series' StableSeries to its SR's NewInstance, both as
seen by that thread. Printed: p50/p95/max of each phase, the kill phase's as a ratio of
the baseline's, the latencies of the images the killed watcher held, and the check that
every image has exactly one SR and one key image (exit 1 otherwise).

Run from the project root::

    .venv/bin/python bench/bench_failover.py --images 30 --pace 2.5 --watchers 3
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(BENCH_DIR))

import pydicom  # noqa: E402
from bench_watch import env_for, random_weights  # noqa: E402

from cxrsr.pacs.local_orthanc import LocalOrthanc  # noqa: E402
from cxrsr.pacs.local_postgres import LocalPostgres  # noqa: E402
from tests.test_watch import (  # noqa: E402
    get_claim,
    instance_id_of,
    key_images_by_image,
    make_copies,
    results_by_image,
)

CORPUS_DIR = PROJECT_ROOT.parent / "shared" / "cxr-corpus"


class ChangeLog(threading.Thread):
    """Reads the (shared) change log every 0.1 s; the wall time each change was first seen."""

    def __init__(self, server: LocalOrthanc) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.seen: dict[int, tuple[float, dict[str, Any]]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        last = 0
        with requests.Session() as session:
            session.auth = (self.server.username, self.server.password)
            while not self.done.wait(0.1):
                # A little behind the last seen: with two Orthancs a lower sequence
                # number may commit after a higher one.
                since = max(0, last - 100)
                answer = session.get(f"{self.server.url}/changes",
                                     params={"since": since, "limit": 1000}, timeout=30)  # fmt: skip
                now = time.time()
                for change in answer.json()["Changes"]:
                    self.seen.setdefault(change["Seq"], (now, change))
                    last = max(last, change["Seq"])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {percentile(values, 0.5):.1f} s, p95 {percentile(values, 0.95):.1f} s, "
        f"max {max(values):.1f} s (n={len(values)})"
    )


def latencies(
    server: LocalOrthanc, log: ChangeLog, series_to_uid: dict[str, str]
) -> dict[str, float]:
    """Source SOP Instance UID -> seconds from its StableSeries to its SR."""
    auth = (server.username, server.password)
    stable: dict[str, float] = {}
    sr_seen: dict[str, float] = {}
    for seen, change in sorted(log.seen.values(), key=lambda item: item[0]):
        if change["ChangeType"] == "StableSeries":
            series = requests.get(f"{server.url}/series/{change['ID']}", auth=auth, timeout=30)
            uid = series_to_uid.get(series.json()["MainDicomTags"]["SeriesInstanceUID"])
            if uid:
                stable.setdefault(uid, seen)
        elif change["ChangeType"] == "NewInstance":
            tags = requests.get(f"{server.url}/instances/{change['ID']}/tags?simplify",
                                auth=auth, timeout=30).json()  # fmt: skip
            if tags.get("Modality") != "SR":
                continue
            for item in tags.get("CurrentRequestedProcedureEvidenceSequence", []):
                for referenced in item["ReferencedSeriesSequence"]:
                    for sop in referenced["ReferencedSOPSequence"]:
                        sr_seen.setdefault(sop["ReferencedSOPInstanceUID"], seen)
    return {uid: sr_seen[uid] - stable[uid] for uid in stable if uid in sr_seen}


def start_watcher(
    server: LocalOrthanc, work: Path, n: int, weights: Path
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, str(PROJECT_ROOT / "watch_orthanc.py"),
        "--state-dir", str(work / f"state-{n}"), "--cache-dir", str(weights),
    ]  # fmt: skip
    with open(work / f"watcher-{n}.log", "ab") as log:
        return subprocess.Popen(command, cwd=PROJECT_ROOT, env=env_for(server), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_until(condition: Any, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"E: timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--watchers", type=int, default=3)
    parser.add_argument("--pace", type=float, default=2.5, help="seconds between two images")
    args = parser.parse_args()
    password = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp, LocalPostgres() as pg:
        work = Path(tmp)
        storage = work / "storage"
        storage.mkdir(mode=0o700)
        settings = {**pg.orthanc_settings(), "StorageDirectory": str(storage), "StableAge": 2}
        group = [LocalOrthanc(work / name, "bench", password, overrides=settings) for name in "ab"]
        with group[0], group[1]:
            images = make_copies(CORPUS_DIR, work / "in", args.images)
            uids, series_to_uid = [], {}
            for path in images:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                uids.append(str(ds.SOPInstanceUID))
                series_to_uid[str(ds.SeriesInstanceUID)] = str(ds.SOPInstanceUID)
            weights = random_weights(work / "weights")
            watchers = [start_watcher(group[n % 2], work, n, weights) for n in range(args.watchers)]
            try:
                wait_until(lambda: all((work / f"state-{n}" / "cursor.json").exists()
                                       for n in range(args.watchers)), "the watchers to start")  # fmt: skip
                log = ChangeLog(group[0])
                log.start()
                half = args.images // 2
                victim_log = work / "watcher-0.log"
                killed_at, held = None, []
                for n, path in enumerate(images):
                    if n == half:
                        mark = victim_log.stat().st_size
                    requests.post(f"{group[n % 2].url}/instances", data=path.read_bytes(),
                                  auth=("bench", password), timeout=60).raise_for_status()  # fmt: skip
                    pause_until = time.monotonic() + args.pace
                    while time.monotonic() < pause_until:
                        if n >= half and killed_at is None and classifying(victim_log, mark):
                            os.killpg(watchers[0].pid, signal.SIGKILL)
                            watchers[0].wait(30)
                            killed_at = n
                            held = claims_of(group[1], watchers[0].pid, uids[: n + 1])
                        time.sleep(0.02)
                if killed_at is None:
                    print("W: the first watcher never classified in the second half; not killed")
                wait_until(lambda: set(uids) <= set(results_by_image(group[1])),
                           "an SR for every image")  # fmt: skip
                log.done.set()
                log.join(30)
            finally:
                for watcher in watchers:
                    if watcher.poll() is None:
                        os.killpg(watcher.pid, signal.SIGTERM)
                        watcher.wait(60)
            seconds = latencies(group[1], log, series_to_uid)
            results, key_images = results_by_image(group[1]), key_images_by_image(group[1])
            once = all(len(results.get(u, [])) == 1 == len(key_images.get(u, [])) for u in uids)
    before = [seconds[u] for u in uids[:half] if u in seconds]
    after = [seconds[u] for u in uids[half:] if u in seconds]
    print(f"StableSeries -> SR, {args.images} one-image series every {args.pace} s, "
          f"{args.watchers} watchers on 2 Orthancs sharing PostgreSQL:")  # fmt: skip
    print(f"  all alive          {summary(before)}")
    print(f"  one kill -9ed      {summary(after)}  (killed after image {killed_at})")
    if before and after:
        print(f"  ratio kill/alive   p50 {percentile(after, 0.5) / percentile(before, 0.5):.2f}x, "
              f"p95 {percentile(after, 0.95) / percentile(before, 0.95):.2f}x")  # fmt: skip
    print(f"  images it held     {summary([seconds[u] for u in held if u in seconds])}")
    print(f"  exactly one SR and one key image each: {once}")
    return 0 if once else 1


def classifying(log: Path, offset: int) -> bool:
    """Whether the watcher's log says, after ``offset``, that it classifies (claims in hand)."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        return b"I: classifying" in fh.read()


def claims_of(server: LocalOrthanc, pid: int, uids: list[str]) -> list[str]:
    """The images whose claim a process ``pid`` holds (working), read right after its death."""
    held = []
    for uid in uids:
        try:
            claim = get_claim(server, instance_id_of(server, uid))
        except (requests.HTTPError, StopIteration):
            continue  # not claimed yet, or not indexed yet
        if f":{pid}:" in claim["holder"] and claim["state"] == "working":
            held.append(uid)
    return held


if __name__ == "__main__":
    sys.exit(main())
