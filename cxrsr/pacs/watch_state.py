"""What ``watch_orthanc.py`` remembers between runs: the cursor, the audit log, dead letters.

Everything lives in one state folder (``--state-dir``), owner-only, so that a restart
after a crash, ``kill -9`` or a power cut picks up exactly where the work stopped:

``cursor.json``
    The position in Orthanc's change log (``/changes``) up to which every change has
    been acted on, written atomically (temporary file, fsync, rename) and only after the
    work it covers is finished. A crash therefore repeats work, never skips it; the
    repeat is harmless because every result is checked against Orthanc before work.
``audit.jsonl``
    One JSON line per event, appended and fsynced: ``classified`` (scores known, before
    anything is sent: it fixes the result's ``classified_at`` so that a repeat builds
    byte-identical objects), ``stored`` (the result objects are in Orthanc and
    verified), ``incomplete`` (not all of them could be stored: an attempt that failed),
    ``skipped``, ``failed`` and ``present`` (Orthanc already held a result).
    It answers "what did the watcher do, when, with which model, and what did it store".
    ``stored`` and ``present`` are a memory, not a verdict: Orthanc is asked before
    them, so an image whose results were deleted from Orthanc gets them again.
``dead-letters.jsonl``
    Instances that failed, with the reason: recorded once, never retried automatically
    (``--retry-failed`` retries them). An image whose results could not all be stored
    goes here after ``--max-attempts`` attempts.

A torn last line (the process died while appending) is ignored when the files are read.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrsr.files import write_atomic

log = logging.getLogger("cxrsr")

CURSOR_FILE = "cursor.json"
AUDIT_FILE = "audit.jsonl"
DEAD_LETTERS_FILE = "dead-letters.jsonl"

#: Events after which an instance needs no more work from the same weights, as long
#: as Orthanc still holds its result (``stored``, ``present``) or at all (``skipped``).
FINAL_EVENTS = ("stored", "present", "skipped")
RESULT_EVENTS = ("stored", "present")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON Lines file; a torn or foreign line is passed over."""
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the tail of a line cut short by a crash
            if isinstance(record, dict):
                yield record


class _Appender:
    """An append-only JSON Lines file, fsynced after each record (the records are few and
    each marks finished work; losing one would repeat or, worse, hide work)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.fchmod(fd, 0o640)
        self._fh = os.fdopen(fd, "a", encoding="utf-8")
        # A line torn by a crash must not swallow the next record.
        if self._fh.tell() > 0:
            with open(path, "rb") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    self._fh.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


@dataclass
class WatchState:
    """The state folder of one watcher, loaded for one model's weights."""

    folder: Path
    weights_sha256: str
    domain: str = "strict"
    """The domain policy: a file skipped under one policy is looked at again under another."""
    results: set[str] = field(default_factory=set)
    """SOP Instance UIDs whose result was stored or found in Orthanc (checked again there)."""
    skipped: set[str] = field(default_factory=set)
    """SOP Instance UIDs the domain policy skipped: no result is due."""
    dead: dict[str, str] = field(default_factory=dict)
    """SOP Instance UID -> why it failed (not retried unless asked)."""
    attempts: dict[str, int] = field(default_factory=dict)
    """SOP Instance UID -> attempts whose results could not all be stored, so far."""
    classified_at: dict[str, tuple[str, str]] = field(default_factory=dict)
    """SOP Instance UID -> (classified_at, scores digest) of its latest classification: a
    repeat (a crash between two uploads, a result partly deleted from Orthanc) reuses
    the time, so it rebuilds the same bytes."""

    @classmethod
    def open(
        cls,
        folder: Path,
        weights_sha256: str,
        retry_failed: bool = False,
        domain: str = "strict",
    ) -> WatchState:
        folder = Path(folder)
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(folder, 0o750)  # patient identifiers live here: never world-readable
        state = cls(folder, weights_sha256, domain)
        for record in _read_lines(folder / AUDIT_FILE):
            if record.get("weights_sha256") != weights_sha256:
                continue
            uid = record.get("sop_instance_uid")
            if not isinstance(uid, str):
                continue
            event = record.get("event")
            if event == "skipped" and record.get("domain", "strict") != domain:
                continue
            state._apply(str(event), uid, record)
        if retry_failed:
            state.dead.clear()
            state.attempts.clear()
        state._audit = _Appender(folder / AUDIT_FILE)
        state._dead_letters = _Appender(folder / DEAD_LETTERS_FILE)
        return state

    _audit: _Appender | None = None
    _dead_letters: _Appender | None = None

    def is_settled(self, sop_instance_uid: str) -> bool:
        """Whether the image needs no look at all: skipped, or a dead letter.

        An image with a result is not settled here: whether its result is still in
        Orthanc is asked of Orthanc.
        """
        return sop_instance_uid in self.skipped or sop_instance_uid in self.dead

    def _apply(self, event: str, uid: str, details: dict[str, Any]) -> None:
        """What one audit event means for the image."""
        if event in FINAL_EVENTS:
            (self.results if event in RESULT_EVENTS else self.skipped).add(uid)
            self.dead.pop(uid, None)
            self.attempts.pop(uid, None)
        elif event == "classified":
            self.classified_at[uid] = (
                str(details.get("classified_at")),
                str(details.get("scores_digest")),
            )
        elif event == "incomplete":
            self.attempts[uid] = self.attempts.get(uid, 0) + 1
        elif event == "failed":
            self.dead[uid] = str(details.get("reason", ""))
            self.attempts.pop(uid, None)

    def record(self, event: str, sop_instance_uid: str, **details: Any) -> None:
        """Append one audit event and update what is known."""
        assert self._audit is not None, "state not opened"
        record = {
            "time": now_iso(),
            "event": event,
            "sop_instance_uid": sop_instance_uid,
            "weights_sha256": self.weights_sha256,
            "domain": self.domain,
            **details,
        }
        self._audit.append(record)
        self._apply(event, sop_instance_uid, details)
        if event == "failed":
            assert self._dead_letters is not None
            self._dead_letters.append(record)

    # -- the cursor ------------------------------------------------------------------

    def load_cursor(self) -> int | None:
        """The change sequence number acted on so far, or ``None`` on the first start."""
        try:
            document = json.loads((self.folder / CURSOR_FILE).read_text(encoding="utf-8"))
            return int(document["since"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning(
                "%s: unreadable cursor (%s); starting from a full reconciliation",
                self.folder / CURSOR_FILE,
                exc,
            )
            return None

    def save_cursor(self, since: int) -> None:
        text = json.dumps({"since": since, "saved_at": now_iso()}) + "\n"
        write_atomic(self.folder / CURSOR_FILE, text.encode("utf-8"))
        os.chmod(self.folder / CURSOR_FILE, 0o640)

    def close(self) -> None:
        for appender in (self._audit, self._dead_letters):
            if appender is not None:
                appender.close()
