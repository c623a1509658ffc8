"""The engine behind ``watch_orthanc.py``: classify what arrives in Orthanc, exactly once.

The watcher is the three scripts run against the PACS instead of a folder, with no
second copy of any of them: instances are fetched over the REST client
(``/instances/{id}/file``) into an owner-only work folder, classified by
:func:`cxrsr.classify.classify` (the same worker processes and batches as
``process_dicom.py``), turned into SRs by :func:`cxrsr.sr.batch.generate_srs` and stored
and verified by :mod:`cxrsr.pacs.upload`, as ``upload_dicom.py`` does.

Exactly once, by construction:

* **What has a result is asked of Orthanc, before work.** An image has a result from
  these weights when the SR series that the SR builder derives for its series, the model
  and the weights (:meth:`cxrsr.sr.document.Classification.sr_series_uid`) holds an SR whose
  evidence names the image's SOP Instance UID. That series UID is a pure function of its
  inputs, so the question needs no state of the watcher's own and survives a lost state
  folder, a second watcher or a restored PACS.
* **Repeats rebuild the same bytes.** Before anything is sent, the audit log records each
  result's ``classified_at``; a repeat of the same image (after ``kill -9`` between two
  uploads) reuses it, so the rebuilt objects are byte-identical and Orthanc answers
  ``AlreadyStored`` instead of storing a second result.
* **The cursor only moves past finished work.** Changes are acted on a page at a time and
  the cursor is saved (atomically) after the whole page is done; a crash repeats a page.
* **No loops.** Only series whose Modality is CR or DX are looked at, so the watcher's
  own SRs (Modality SR) and anything else (CT, MR, SC, ...) are never fetched; an object
  whose Manufacturer is this project's is refused as well, whatever its Modality.
* **A bad instance is a dead letter**, recorded once with its reason and not retried
  unless asked (``--retry-failed``).

Nothing is missed: on start, and every ``reconcile_interval`` seconds, every CR/DX
series in Orthanc is compared with what is known (the backfill of ``--once``), so
changes that arrived while the watcher was down or that Orthanc dropped from its log
(it keeps a bounded number) are still handled.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from cxrsr.classify import classify
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import DomainPolicy
from cxrsr.model.classifier import Classifier
from cxrsr.model.heatmaps import HeatmapWriter
from cxrsr.pacs import upload
from cxrsr.pacs.orthanc import (
    CredentialsRefused,
    OrthancClient,
    OrthancFatalError,
    OrthancUnavailable,
)
from cxrsr.pacs.watch_state import WatchState
from cxrsr.results import FAILED, FORMAT, SKIPPED
from cxrsr.sr.batch import generate_srs
from cxrsr.sr.document import SR_MANUFACTURER, ModelInfo
from cxrsr.sr.uids import sr_series_uid

log = logging.getLogger("cxrsr")

#: The modalities the model was trained on; every other series is left alone.
RADIOGRAPH_MODALITIES = ("CR", "DX")

#: Images fetched and classified together: large enough for full network batches and
#: to amortise the worker processes' start, small enough to keep memory and the work
#: lost to a crash small.
CHUNK_SIZE = 128

#: Changes read from ``/changes`` per request.
CHANGES_PAGE = 100


class Stopping(Exception):
    """SIGTERM or Ctrl-C arrived: abandon the work in flight (it will be repeated)."""


class OrthancError(Exception):
    """Orthanc answered something unexpected for a request the watcher relies on."""


@dataclass(frozen=True)
class Instance:
    """One image in Orthanc, as the watcher knows it before fetching it."""

    orthanc_id: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass
class Counts:
    """What a pass did: for log lines, the summary and the exit code of ``--once``."""

    classified: int = 0
    stored: int = 0
    present: int = 0
    skipped: int = 0
    failed: int = 0
    known: int = 0

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (
            f"{self.classified} classified, {self.stored} with results stored, "
            f"{self.present} already had results, {self.skipped} skipped, "
            f"{self.failed} failed, {self.known} known from earlier runs"
        )


# -- Orthanc queries -------------------------------------------------------------------


class OrthancIndex:
    """The handful of REST queries the watcher needs, over the shared pooled client."""

    def __init__(self, client: OrthancClient) -> None:
        self.client = client

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        answer = self.client.request(
            method, path, body=data, content_type="application/json" if data else None
        )
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise OrthancError(f"{method} {path}: HTTP {answer.status} {answer.orthanc_message()}")
        return answer.json()

    def last_change(self) -> int:
        """The sequence number of the newest change in Orthanc's log (0 when it is empty)."""
        document = self._json("GET", "/changes?last")
        return int((document or {}).get("Last", 0))

    def changes(
        self, since: int, limit: int = CHANGES_PAGE
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """One page of ``/changes``: the changes, the last sequence number, whether done."""
        document = self._json("GET", f"/changes?since={since}&limit={limit}") or {}
        return (
            list(document.get("Changes", [])),
            int(document.get("Last", since)),
            bool(document.get("Done", True)),
        )

    def radiograph_series(self) -> list[str]:
        """Orthanc IDs of every CR and DX series (the backfill's candidates)."""
        found: list[str] = []
        for modality in RADIOGRAPH_MODALITIES:
            answer = self._json(
                "POST", "/tools/find", {"Level": "Series", "Query": {"Modality": modality}}
            )
            found.extend(str(item) for item in answer or [])
        return sorted(set(found))

    def series(self, series_id: str) -> dict[str, Any] | None:
        document = self._json("GET", f"/series/{series_id}")
        return document if isinstance(document, dict) else None

    def series_instances(self, series_id: str, series_uid: str) -> list[Instance]:
        answer = self._json("GET", f"/series/{series_id}/instances") or []
        instances = []
        for item in answer:
            uid = str(item.get("MainDicomTags", {}).get("SOPInstanceUID", ""))
            instances.append(Instance(str(item["ID"]), uid, series_uid))
        return instances

    def lookup_series(self, series_instance_uid: str) -> str | None:
        answer = self.client.request(
            "POST",
            "/tools/lookup",
            body=series_instance_uid.encode("ascii"),
            content_type="text/plain",
        )
        if answer.status != 200:
            raise OrthancError(f"POST /tools/lookup: HTTP {answer.status}")
        for item in answer.json():
            if item.get("Type") == "Series":
                return str(item["ID"])
        return None

    def referenced_images(self, sr_instance_id: str) -> set[str]:
        """The SOP Instance UIDs an SR's Current Requested Procedure Evidence names."""
        document = self._json("GET", f"/instances/{sr_instance_id}/tags?simplify")
        if not isinstance(document, dict):
            return set()
        found: set[str] = set()
        for study in document.get("CurrentRequestedProcedureEvidenceSequence") or []:
            for series in study.get("ReferencedSeriesSequence") or []:
                for sop in series.get("ReferencedSOPSequence") or []:
                    uid = sop.get("ReferencedSOPInstanceUID")
                    if isinstance(uid, str):
                        found.add(uid)
        return found

    def download(self, instance_id: str) -> bytes | None:
        answer = self.client.request("GET", f"/instances/{instance_id}/file")
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise OrthancError(f"GET /instances/{instance_id}/file: HTTP {answer.status}")
        return bytes(answer.body)


# -- the engine ------------------------------------------------------------------------


def _scores_digest(scores: dict[str, float]) -> str:
    text = json.dumps(scores, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class _Output:
    """One object generate_sr.py wrote, read once: what it is and what it describes."""

    path: Path
    sop_instance_uid: str
    is_sr: bool
    describes: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> _Output:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        # The uploader's own rule for what an SR or key image refers to (no second copy).
        kind, describes = upload.derived_from(dataset)
        return cls(path, str(dataset.SOPInstanceUID), kind == "SRs", describes)


@dataclass
class Watcher:
    """Classifies the CR/DX images of one Orthanc with one model, exactly once."""

    client: OrthancClient
    classifier: Classifier
    state: WatchState
    batch_size: int = 16
    workers: int = 1
    read_timeout: float | None = None
    """Seconds a reader process may spend on one image (see :mod:`cxrsr.reader_pool`)."""
    upload_workers: int = 8
    stop: threading.Event = field(default_factory=threading.Event)
    chunk_size: int = CHUNK_SIZE
    domain: DomainPolicy = DomainPolicy.STRICT
    key_images: bool = True
    """Store a key image (Secondary Capture) with each SR, as generate_sr.py does."""
    on_progress: Callable[[int], None] = lambda n: None

    def __post_init__(self) -> None:
        self.index = OrthancIndex(self.client)
        self.model = self.classifier.describe()
        self.model_info = ModelInfo.from_results(self.model)
        self.work_root = self.state.folder / "work"
        self.work_root.mkdir(mode=0o700, exist_ok=True)
        # Work folders of a run that was killed hold nothing that is not in Orthanc.
        for leftover in self.work_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def use_client(self, client: OrthancClient) -> None:
        """Continue with a new client (after Orthanc came back)."""
        self.client = client
        self.index = OrthancIndex(client)

    # -- deciding what to do -----------------------------------------------------------

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopping()

    def _radiograph_series(self, series_id: str) -> tuple[str, list[Instance]] | None:
        """The series' UID and instances when it is a CR/DX series not made by us."""
        series = self.index.series(series_id)
        if series is None:
            return None
        tags = series.get("MainDicomTags", {})
        modality = str(tags.get("Modality", "")).strip().upper()
        if modality not in RADIOGRAPH_MODALITIES:
            log.debug("series %s: Modality %r, not a radiograph; left alone", series_id, modality)
            return None
        if str(tags.get("Manufacturer", "")).startswith(SR_MANUFACTURER):
            log.debug("series %s: made by %s; left alone", series_id, SR_MANUFACTURER)
            return None
        uid = str(tags.get("SeriesInstanceUID", ""))
        return uid, self.index.series_instances(series_id, uid)

    def _results_in_orthanc(self, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series' images that already have an SR from these weights."""
        ours = sr_series_uid(series_uid, self.model_info.model_id, self.model_info.weights_sha256)
        sr_series = self.index.lookup_series(ours)
        if sr_series is None:
            return set()
        found: set[str] = set()
        for instance in self.index.series_instances(sr_series, ours):
            found |= self.index.referenced_images(instance.orthanc_id)
        return found

    def process_series(self, series_ids: Iterable[str]) -> Counts:
        """Classify the images of these series that have no result yet."""
        counts = Counts()
        todo: list[Instance] = []
        for series_id in series_ids:
            self._check_stop()
            found = self._radiograph_series(series_id)
            if found is None:
                continue
            series_uid, instances = found
            fresh = [i for i in instances if not self.state.is_done(i.sop_instance_uid)]
            counts.known += len(instances) - len(fresh)
            if not fresh:
                continue
            present = self._results_in_orthanc(series_uid)
            for instance in fresh:
                if instance.sop_instance_uid in present:
                    self.state.record(
                        "present",
                        instance.sop_instance_uid,
                        orthanc_instance=instance.orthanc_id,
                        model=self.model_info.model_id,
                    )
                    counts.present += 1
                else:
                    todo.append(instance)
            while len(todo) >= self.chunk_size:
                counts.add(self._process_chunk(todo[: self.chunk_size]))
                del todo[: self.chunk_size]
        if todo:
            counts.add(self._process_chunk(todo))
        return counts

    def reconcile(self) -> Counts:
        """The backfill: every CR/DX image in Orthanc without a result gets one."""
        series = self.index.radiograph_series()
        log.debug("reconciling %d CR/DX series", len(series))
        return self.process_series(series)

    # -- doing it ------------------------------------------------------------------------

    def _process_chunk(self, chunk: list[Instance]) -> Counts:
        counts = Counts()
        with tempfile.TemporaryDirectory(dir=self.work_root) as tmp:
            folder = Path(tmp)
            by_path: dict[str, Instance] = {}
            for instance in chunk:
                self._check_stop()
                data = self.index.download(instance.orthanc_id)
                if data is None:
                    log.info("%s: deleted from Orthanc before it was read", instance.orthanc_id)
                    continue
                path = folder / f"{instance.orthanc_id}.dcm"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                by_path[str(path)] = instance
            if not by_path:
                return counts
            sources = [Source(p) for p in by_path]
            # Previews and heatmaps go beside the images, for the key images (as
            # process_dicom.py writes them beside its results file).
            heatmaps = HeatmapWriter(folder) if self.key_images else None
            run = classify(
                sources,
                lambda: self.classifier,
                self.batch_size,
                self.workers,
                domain=self.domain,
                heatmaps=heatmaps,
                read_timeout=self.read_timeout,
            )
            self._check_stop()  # a stop during classification: nothing was recorded or sent
            entries = []
            for entry in run.entries:
                instance = by_path[entry["path"]]
                name = f"Orthanc instance {instance.orthanc_id} ({instance.sop_instance_uid})"
                uid = instance.sop_instance_uid
                if entry["status"] == SKIPPED:
                    log.info("%s: skipped: %s", name, entry["reason"])
                    self.state.record(
                        "skipped", uid, orthanc_instance=instance.orthanc_id, reason=entry["reason"]
                    )
                    counts.skipped += 1
                elif entry["status"] == FAILED:
                    log.error("%s: %s (dead letter)", name, entry["reason"])
                    self.state.record(
                        "failed", uid, orthanc_instance=instance.orthanc_id, reason=entry["reason"]
                    )
                    counts.failed += 1
                else:
                    entries.append(self._fix_time(entry, instance))
                    counts.classified += 1
            self.on_progress(len(by_path))
            if entries:
                stored, failed = self._store_results(entries, by_path, folder / "out")
                counts.stored += stored
                counts.failed += failed
        return counts

    def _fix_time(self, entry: dict[str, Any], instance: Instance) -> dict[str, Any]:
        """Give the entry its first ``classified_at`` and record it before anything is sent."""
        digest = _scores_digest(entry["scores"])
        earlier = self.state.classified_at.get(instance.sop_instance_uid)
        if earlier is not None and earlier[1] == digest:
            entry["classified_at"] = earlier[0]
        else:
            entry["classified_at"] = _now()
            self.state.record(
                "classified",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                classified_at=entry["classified_at"],
                scores_digest=digest,
                findings=entry["findings"],
            )
        return entry

    def _store_results(
        self, entries: list[dict[str, Any]], by_path: dict[str, Instance], out: Path
    ) -> tuple[int, int]:
        """Build each entry's objects, store and verify them; record what arrived."""
        document = {"format": FORMAT, "model": self.model, "images": entries}
        fallback = datetime.datetime.now(datetime.UTC)
        outcome = generate_srs(
            document,
            out,
            fallback,
            disable_progress=True,
            jobs=1,
            results_dir=out.parent if self.key_images else None,
        )
        outputs: dict[str, list[_Output]] = {}
        for path in sorted(out.iterdir()) if out.exists() else []:
            output = _Output.read(path)
            for described in output.describes:
                outputs.setdefault(described, []).append(output)
        # Derived objects other than SRs first: an SR in Orthanc is what marks the image
        # done, so it must arrive last.
        ordered = sorted(
            {o.path: o for objects in outputs.values() for o in objects}.values(),
            key=lambda o: o.is_sr,
        )
        self._check_stop()
        results = upload.upload(
            [Source(str(o.path)) for o in ordered], self.client, self.upload_workers
        )
        report = upload.verify(results, self.client, workers=self.upload_workers)
        report.log_problems()
        good = {o.name for o in report.outcomes if o.sent and o.verified and not o.problems}
        by_name = {o.name: o for o in report.outcomes}
        stored = failed = 0
        for entry in entries:
            instance = by_path[entry["path"]]
            uid = instance.sop_instance_uid
            written = outputs.get(entry["sop_instance_uid"], [])
            if not written:
                failed += 1
                self.state.record(
                    "failed",
                    uid,
                    orthanc_instance=instance.orthanc_id,
                    reason="no SR could be built (see the E: line above)",
                )
                continue
            if all(str(o.path) in good for o in written):
                stored += 1
                self.state.record(
                    "stored",
                    uid,
                    orthanc_instance=instance.orthanc_id,
                    study_instance_uid=entry.get("study_instance_uid"),
                    model=self.model_info.model_id,
                    findings=entry["findings"],
                    objects=[
                        {
                            "sop_instance_uid": o.sop_instance_uid,
                            "status": by_name[str(o.path)].status,
                            "orthanc_instance": by_name[str(o.path)].instance_id,
                        }
                        for o in written
                    ],
                )
            else:
                # Not recorded: the next reconciliation tries again (Orthanc may be down).
                log.error(
                    "Orthanc instance %s: its results were not all stored; will retry",
                    instance.orthanc_id,
                )
        if outcome.errors:
            log.debug("SR errors: %s", outcome.errors)
        return stored, failed

    # -- following Orthanc -------------------------------------------------------------

    def follow_once(self, cursor: int) -> tuple[int, bool]:
        """Act on one page of changes after ``cursor``; the new cursor and whether caught up."""
        changes, last, done = self.index.changes(cursor)
        stable = [
            str(c["ID"])
            for c in changes
            if c.get("ChangeType") == "StableSeries" and c.get("ResourceType") == "Series"
        ]
        if stable:
            counts = self.process_series(dict.fromkeys(stable))
            if counts.classified or counts.failed or counts.skipped:
                log.info("%d stable series: %s", len(stable), counts.summary())
        if changes:
            self.state.save_cursor(last)
        return (last if changes else cursor), done


def sleep_unless_stopped(stop: threading.Event, seconds: float) -> None:
    if stop.wait(seconds):
        raise Stopping()


def backoff_delays(first: float = 1.0, most: float = 10.0) -> Iterator[float]:
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, most)


def run_forever(
    watcher: Watcher,
    connect: Callable[[bool], OrthancClient],
    poll_interval: float,
    reconcile_interval: float,
) -> None:
    """Follow Orthanc until :class:`Stopping`; an outage is waited out, never fatal.

    ``connect(probe)`` makes a client; a probe's client does not retry.
    """
    stop = watcher.stop
    cursor = watcher.state.load_cursor()
    next_reconcile = 0.0
    outage: str | None = None
    delays = backoff_delays()
    while True:
        try:
            if outage is not None:
                # Probe without the client's own retries (the backoff here is the wait),
                # then go on with a client that retries as usual.
                connect(True).system()
                watcher.use_client(connect(False))
                log.info("Orthanc at %s answers again; resuming", watcher.client.url)
                outage = None
                delays = backoff_delays()
            last = watcher.index.last_change()
            if cursor is None or last < cursor:
                if cursor is not None:
                    log.warning(
                        "Orthanc's change log restarted (last change %d < cursor %d); "
                        "reconciling everything",
                        last,
                        cursor,
                    )
                cursor = last  # what happens after this point arrives through /changes
                next_reconcile = 0.0
            if time.monotonic() >= next_reconcile:
                counts = watcher.reconcile()
                if counts.classified or counts.failed or counts.skipped or counts.present:
                    log.info("reconciled: %s", counts.summary())
                watcher.state.save_cursor(cursor)
                next_reconcile = time.monotonic() + reconcile_interval
            done = False
            while not done:
                cursor, done = watcher.follow_once(cursor)
            sleep_unless_stopped(stop, poll_interval)
        except CredentialsRefused:
            raise  # a configuration problem, not an outage: waiting would not fix it
        except (OrthancUnavailable, OrthancFatalError, OrthancError, OSError) as exc:
            if stop.is_set():
                raise Stopping() from exc
            if outage is None:
                outage = str(exc)
                log.warning(
                    "Orthanc at %s is unreachable (%s); waiting for it, with backoff",
                    watcher.client.url,
                    exc,
                )
            sleep_unless_stopped(stop, next(delays))
