"""The journal beside a results file: each finished entry, on disk as soon as it is finished.

A results file is written once, at the end of a run; a run killed before that (a power
cut, a scheduler's hard limit, ``kill -9``) would lose everything. So the run also
appends every finished entry to ``results.json.journal``, JSON Lines:

- ``{"format": "cxrsr-journal/1", "model": {...}}`` names the model whose entries follow;
- ``{"entry": {...}}`` is one file's results entry, exactly as it goes into the results file.

Each line goes to the kernel in one ``write(2)`` as it is finished, so a killed process
loses nothing it finished; ``fsync`` runs once per network batch, so a power cut loses
at most the last batch. A torn last line (the kill struck mid-write) is ignored when the
journal is read. A rerun appends after the lines of the killed run, and at the end of a
run the journal is folded into the results file and deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict, cast

from cxrsr.files import fsync_folder, open_private_append
from cxrsr.results_types import ModelRecord, ResultsEntry, problem

log = logging.getLogger("cxrsr")

FORMAT = "cxrsr-journal/1"
SUFFIX = ".journal"


def journal_path(results_path: Path) -> Path:
    """The journal of a results file: the same name with ``.journal`` added."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.name + SUFFIX)


class ModelLine(TypedDict):
    """The line that names the model of the entries after it."""

    format: str
    model: ModelRecord


class EntryLine(TypedDict):
    """One finished entry."""

    entry: ResultsEntry


def _line(record: ModelLine | EntryLine) -> bytes:
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"


ModelBlock = dict[str, object]
"""A model block as read back, not yet checked: whoever uses one as a results file's
``model`` checks it (:func:`cxrsr.resume.EarlierResults.model_for`)."""


def read_journal(path: Path) -> Iterator[tuple[ModelBlock, ResultsEntry]]:
    """``(model, entry)`` for each entry line of the journal at ``path``, oldest first.

    A missing journal has no entries. Lines that do not parse (the torn last line of a
    killed run), entries that are not what the results file holds
    (:mod:`cxrsr.results_types`), and entries without a model line before them are
    passed over.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    model: ModelBlock | None = None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            log.debug("%s: line %d is torn or damaged, passed over", path, number)
            continue
        if not isinstance(record, dict):
            continue
        if record.get("format") == FORMAT and isinstance(record.get("model"), dict):
            model = record["model"]
        elif model is not None and problem(record.get("entry"), ResultsEntry) is None:
            yield model, cast(ResultsEntry, record["entry"])
        elif "entry" in record:
            log.debug("%s: line %d is not a results entry, passed over", path, number)


class Journal:
    """Appends entries to a journal file; safe to use from the model loader's thread too.

    Entries appended before :meth:`start` (files skipped while the model was loading)
    wait in memory until the model is known.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._waiting: list[ResultsEntry] = []
        self._unsynced = False

    def start(self, model: ModelRecord) -> None:
        """Open (or create) the journal and name the model of the entries that follow."""
        with self._lock:
            created = not self.path.exists()
            fd = open_private_append(self.path)
            self._fd = fd
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # end a torn line, or ours would be glued to it
            self._write({"format": FORMAT, "model": model})
            for entry in self._waiting:
                self._write({"entry": entry})
            self._waiting.clear()
            os.fsync(fd)
            self._unsynced = False
            if created:
                _fsync_folder(self.path.parent)

    def append(self, entry: ResultsEntry) -> None:
        """Add one finished entry (in the kernel at once; on disk at the next :meth:`sync`)."""
        with self._lock:
            if self._fd is None:
                self._waiting.append(entry)
            else:
                self._write({"entry": entry})

    def _write(self, record: ModelLine | EntryLine) -> None:
        assert self._fd is not None
        data = _line(record)
        while data:  # one write(2) in practice; a regular file takes it whole
            written = os.write(self._fd, data)
            data = data[written:]
        self._unsynced = True

    def sync(self) -> None:
        """Flush what was appended to the disk (once per network batch)."""
        with self._lock:
            if self._fd is not None and self._unsynced:
                os.fsync(self._fd)
                self._unsynced = False

    def close(self) -> None:
        """Sync and close; the journal stays for the next run to resume from."""
        self.sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def remove(self) -> None:
        """Close and delete the journal: its entries are in the results file now."""
        self.close()
        self.path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a new journal's name durable (its folder entry), not only its contents; a
    failure here is left to the results file's own write, which flushes the same folder."""
    with contextlib.suppress(OSError):
        fsync_folder(folder)
