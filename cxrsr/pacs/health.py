"""The watcher's heartbeat: a file in its state folder that says "still working", for
``watch_orthanc.py --check-health`` (a container healthcheck, a monitoring probe).

A running watcher (``watch_orthanc.py`` without ``--once``) rewrites ``heartbeat.json``
atomically at every turn of its loop, and while it works through a long reconciliation or
classifies a chunk of images (at most once a second). The file holds the time written and
the age after which it is stale, derived from the poll interval: a loop that turns at
least every ``poll_interval`` seconds writes it that often, so three missed turns, or a
minute, whichever is longer, means the watcher hangs (or is gone). An Orthanc outage is
not unhealthy: the watcher waits it out, with at most 10 s between two tries, and beats
meanwhile (restarting it would not bring Orthanc back).

Clock: the age is the checker's clock minus the writer's, so both run on one host (the
container's own healthcheck, or the same machine).

This module imports nothing heavy: the check runs every 30 s in the container.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cxrsr.files import write_atomic

HEARTBEAT_FILE = "heartbeat.json"

#: The shortest age at which a heartbeat is stale, whatever the poll interval.
MINIMUM_STALE_SECONDS = 60.0

#: Seconds between two writes while the watcher works (the loop itself always writes).
BEAT_EVERY = 1.0


def stale_after(poll_interval: float) -> float:
    """Age after which the heartbeat of a watcher polling every ``poll_interval`` is stale."""
    return max(MINIMUM_STALE_SECONDS, 3.0 * poll_interval)


class Heartbeat:
    """Writes the heartbeat of one running watcher."""

    def __init__(self, folder: Path, poll_interval: float) -> None:
        self.path = Path(folder) / HEARTBEAT_FILE
        self.stale_after = stale_after(poll_interval)
        self._last = 0.0

    def beat(self, force: bool = True) -> None:
        """Write the heartbeat now (``force``), or if the last write is a second old."""
        now = time.monotonic()
        if not force and now - self._last < BEAT_EVERY:
            return
        document = {"time": time.time(), "pid": os.getpid(), "stale_after": self.stale_after}
        # Not flushed to disk: after a power cut a stale heartbeat is the truth anyway.
        write_atomic(self.path, json.dumps(document).encode("utf-8"), durable=False)
        self._last = now


def check(folder: Path) -> tuple[bool, str]:
    """Whether the heartbeat in ``folder`` is fresh, and one line saying why (not)."""
    path = Path(folder) / HEARTBEAT_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        written = float(document["time"])
        bound = float(document["stale_after"])
    except FileNotFoundError:
        return False, f"{path}: no heartbeat (the watcher has not started its loop)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"{path}: unreadable heartbeat ({exc})"
    age = time.time() - written
    if age > bound:
        return False, f"{path}: the last heartbeat is {age:.0f} s old (stale after {bound:.0f} s)"
    return True, f"{path}: heartbeat {max(age, 0.0):.1f} s old (stale after {bound:.0f} s)"
