"""The engine behind ``watch_orthanc.py``: classify what arrives in Orthanc, exactly once.

The watcher is the three scripts run against the PACS instead of a folder, with no
second copy of any of them: instances are fetched over the REST client
(``/instances/{id}/file``) into an owner-only work folder, classified by
:func:`cxrsr.classify.classify` (the same worker processes and batches as
``process_dicom.py``), turned into SRs by :func:`cxrsr.sr.batch.generate_srs` and stored
and verified by :mod:`cxrsr.pacs.upload`, as ``upload_dicom.py`` does.

Exactly once, by construction. This module is the one place that decides "done":

* **Done means a complete result in Orthanc, asked before work.** An image has a result
  from these weights when the SR series that the SR builder derives for its series, the
  model and the weights (:func:`cxrsr.sr.uids.sr_series_uid`) holds an SR whose evidence
  names the image's SOP Instance UID *and* every other object that SR names (its
  Pertinent Other Evidence: the key image) is in Orthanc too. An SR alone is not a
  result. Orthanc is asked before the watcher's own log (one list per series; each SR's
  evidence is read once), so a result deleted from Orthanc, or a study deleted and sent
  again, is stored again, and a lost state folder costs nothing.
* **Stored means stored and verified, key images first.** An image's objects go in two
  phases: its key image is sent and verified (MD5 and placement, as ``upload_dicom.py``
  checks); only when every other object of the image verified is its SR sent and
  verified. An image with any object not stored is a failure (``--once`` exits 1 and
  names it on an ``E:`` line), tried again at the next pass, and after
  ``max_attempts`` attempts a dead letter.
* **One watcher per image: a claim in Orthanc.** Before downloading an image a watcher
  claims it (:mod:`cxrsr.pacs.claims`: the instance's ``cxrsr-claim`` metadata, created
  only if absent, atomically). A second watcher, on this host or another, finds the
  claim and leaves the image to its holder while the holder's lease lives; the holder
  renews the lease while it works and stops working on an image (sends nothing for it)
  once a renewal fails.
* **Lease expiry hands the work over, byte-identically.** The claim holds the
  result's ``classified_at``, fixed before anything is sent. When a holder dies its
  lease expires and another watcher takes the claim over (compare and swap on the
  claim's ETag) and reuses that ``classified_at``, so the objects it rebuilds are
  byte-identical (their UIDs are derived from their content) and Orthanc answers
  ``AlreadyStored`` to any the dead holder had sent, instead of storing a second
  result. A watcher's own repeat (after ``kill -9``, or a result partly deleted from
  Orthanc) reuses its audit log's ``classified_at`` the same way. After storing, the
  claim is marked ``done``; "done" is still decided by the complete set in Orthanc.
  An Orthanc without claims is reported on one ``W:`` line and the watcher works alone.
* **The cursor only moves past finished work.** Changes are acted on a page at a time and
  the cursor is saved (atomically) after the whole page is done; a crash repeats a page.
* **No loops.** Only series whose Modality is CR or DX are looked at, so the watcher's
  own SRs (Modality SR) and anything else (CT, MR, SC, ...) are never fetched; an object
  whose Manufacturer is this project's is refused as well, whatever its Modality.
* **A bad instance is a dead letter**, recorded once with its reason and not retried
  unless asked (``--retry-failed``).
* **Stops lose nothing finished.** SIGTERM sets :attr:`Watcher.stop`, checked at safe
  points (between batches, requests and phases); Ctrl-C raises ``KeyboardInterrupt``,
  also during classification. Either way what was recorded stays recorded, what was in
  flight is given back (its claims released) and repeated.

Nothing is missed: on start, and every ``full_reconcile_interval`` seconds, every CR/DX
series in Orthanc is compared with what is known (the backfill of ``--once``), so
changes that arrived while the watcher was down or that Orthanc dropped from its log
(it keeps a bounded number) are still handled. Between two full comparisons a cheap
sweep every ``reconcile_interval`` seconds lists the CR/DX series (two requests) and
looks only at those not found complete before, so that it can run every minute on a
PACS of 100,000 series.

Alive: a running watcher rewrites a heartbeat (:mod:`cxrsr.pacs.health`) at every turn of
its loop and at its safe points while it works.
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
from cxrsr.pacs.claims import DONE, LEASE_SECONDS, Claims, Lease
from cxrsr.pacs.health import Heartbeat
from cxrsr.pacs.orthanc import (
    CredentialsRefused,
    OrthancClient,
    OrthancFatalError,
    OrthancUnavailable,
)
from cxrsr.pacs.watch_state import WatchState
from cxrsr.results import FAILED, FORMAT, SKIPPED, ClassifiedEntry, ResultsDocument, model_record
from cxrsr.sr.batch import generate_srs
from cxrsr.sr.entries import ModelInfo
from cxrsr.sr.tid1500 import SR_MANUFACTURER
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

#: Attempts to store an image's results (``--max-attempts``) before it is a dead letter.
DEFAULT_MAX_ATTEMPTS = 3


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
    elsewhere: int = 0
    """Images another watcher was classifying (it holds their claim)."""

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> str:
        return (
            f"{self.classified} classified, {self.stored} with results stored, "
            f"{self.present} already had results, {self.skipped} skipped, "
            f"{self.failed} failed, {self.known} known from earlier runs, "
            f"{self.elsewhere} left to another watcher"
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

    def evidence(self, sr_instance_id: str) -> Evidence:
        """What an SR names: the images it describes and the other objects of its result."""
        document = self._json("GET", f"/instances/{sr_instance_id}/tags?simplify")
        if not isinstance(document, dict):
            return Evidence(frozenset(), frozenset())
        described = frozenset(
            uid for _, uid in _references(document, "CurrentRequestedProcedureEvidenceSequence")
        )
        others = frozenset(_references(document, "PertinentOtherEvidenceSequence"))
        return Evidence(described, others)

    def series_sop_instance_uids(self, series_instance_uid: str) -> set[str]:
        """SOP Instance UIDs of the instances Orthanc holds in one series (none if absent)."""
        series_id = self.lookup_series(series_instance_uid)
        if series_id is None:
            return set()
        instances = self.series_instances(series_id, series_instance_uid)
        return {i.sop_instance_uid for i in instances}

    def download(self, instance_id: str) -> bytes | None:
        answer = self.client.request("GET", f"/instances/{instance_id}/file")
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise OrthancError(f"GET /instances/{instance_id}/file: HTTP {answer.status}")
        return bytes(answer.body)


@dataclass(frozen=True)
class Evidence:
    """What one of our SRs names (read once per SR: an SR's bytes never change)."""

    described: frozenset[str]
    """SOP Instance UIDs of the images it describes."""
    others: frozenset[tuple[str, str]]
    """(Series, SOP Instance UID) of the other objects of its result: the key image."""


def _references(document: dict[str, Any], keyword: str) -> Iterator[tuple[str, str]]:
    """(Series, SOP Instance UID) of a Hierarchical SOP Instance Reference sequence."""
    for study in document.get(keyword) or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            series_uid = str(series.get("SeriesInstanceUID", ""))
            for sop in series.get("ReferencedSOPSequence") or []:
                uid = sop.get("ReferencedSOPInstanceUID")
                if isinstance(uid, str):
                    yield series_uid, uid


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
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Attempts to store an image's results before it becomes a dead letter."""
    lease_seconds: float = LEASE_SECONDS
    on_progress: Callable[[int], None] = lambda n: None
    heartbeat: Heartbeat | None = None
    """Rewritten while the watcher works (``--check-health`` reads it); none with ``--once``."""

    def __post_init__(self) -> None:
        self.index = OrthancIndex(self.client)
        self.model = model_record(self.classifier.describe())
        self.model_info = ModelInfo.from_results(self.model)
        self.claims = Claims(self.client, self.model_info.weights_sha256, self.lease_seconds)
        self._evidence: dict[str, Evidence] = {}
        self._series_ids: dict[str, str] = {}
        """Series Instance UID -> Orthanc series ID, of the series looked at."""
        self._complete: set[str] = set()
        """Orthanc series IDs with every image settled or holding a complete result at
        their last look (skipped by the cheap sweep, see :meth:`reconcile`)."""
        self._revisit: dict[str, float] = {}
        """Orthanc series ID -> when to look again at images left to another watcher
        (once its lease could have expired, in case it died)."""
        self.work_root = self.state.folder / "work"
        self.work_root.mkdir(mode=0o700, exist_ok=True)
        # Work folders of a run that was killed hold nothing that is not in Orthanc.
        for leftover in self.work_root.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)

    def use_client(self, client: OrthancClient) -> None:
        """Continue with a new client (after Orthanc came back)."""
        self.client = client
        self.index = OrthancIndex(client)
        self.claims.client = client

    # -- deciding what to do -----------------------------------------------------------

    def _check_stop(self) -> None:
        """Stop here if asked; otherwise a safe point is also a sign of life."""
        if self.stop.is_set():
            raise Stopping()
        if self.heartbeat is not None:
            self.heartbeat.beat(force=False)

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
        """SOP Instance UIDs of the series' images with a complete result from these weights.

        Complete: an SR in the series' SR series describes the image, and every other
        object that SR names (its key image) is in Orthanc too. The SRs' evidence is read
        once per SR and remembered; what is asked every time is one list per series.
        """
        ours = sr_series_uid(series_uid, self.model_info.model_id, self.model_info.weights_sha256)
        sr_series = self.index.lookup_series(ours)
        if sr_series is None:
            return set()
        evidences = []
        for instance in self.index.series_instances(sr_series, ours):
            evidence = self._evidence.get(instance.orthanc_id)
            if evidence is None:
                evidence = self.index.evidence(instance.orthanc_id)
                self._evidence[instance.orthanc_id] = evidence
            evidences.append(evidence)
        in_orthanc: dict[str, set[str]] = {}
        for series in {series for e in evidences for series, _ in e.others}:
            in_orthanc[series] = self.index.series_sop_instance_uids(series)
        found: set[str] = set()
        for evidence in evidences:
            if all(uid in in_orthanc[series] for series, uid in evidence.others):
                found |= evidence.described
        return found

    def process_series(self, series_ids: Iterable[str]) -> Counts:
        """Classify the images of these series that have no complete result in Orthanc."""
        counts = Counts()
        todo: list[Instance] = []
        for series_id in series_ids:
            self._check_stop()
            found = self._radiograph_series(series_id)
            if found is None:
                continue
            series_uid, instances = found
            self._series_ids[series_uid] = series_id
            open_ = [i for i in instances if not self.state.is_settled(i.sop_instance_uid)]
            counts.known += len(instances) - len(open_)
            self._complete.discard(series_id)
            if not open_:
                self._complete.add(series_id)
                continue
            waiting = len(todo)
            # Orthanc, not the watcher's own log, says what has a result: a study
            # deleted and sent again gets its results again.
            present = self._results_in_orthanc(series_uid)
            for instance in open_:
                uid = instance.sop_instance_uid
                if uid in present:
                    if uid in self.state.results:
                        counts.known += 1
                    else:
                        self.state.record(
                            "present",
                            uid,
                            orthanc_instance=instance.orthanc_id,
                            model=self.model_info.model_id,
                        )
                        counts.present += 1
                    continue
                if uid in self.state.results:
                    log.info(
                        "Orthanc instance %s: its results are no longer all in Orthanc; "
                        "storing them again",
                        instance.orthanc_id,
                    )
                todo.append(instance)
            if len(todo) == waiting:
                self._complete.add(series_id)
            while len(todo) >= self.chunk_size:
                counts.add(self._process_chunk(todo[: self.chunk_size]))
                del todo[: self.chunk_size]
        if todo:
            counts.add(self._process_chunk(todo))
        return counts

    def revisit(self) -> Counts:
        """Look again at series with images left to another watcher whose lease has had
        time to expire: a watcher that died does not leave them undone until the next
        reconciliation."""
        now = time.monotonic()
        due = [series for series, when in self._revisit.items() if when <= now]
        for series in due:
            del self._revisit[series]
        return self.process_series(due) if due else Counts()

    def reconcile(self, full: bool = True) -> Counts:
        """The backfill: every CR/DX image in Orthanc without a result gets one.

        ``full=False`` is the cheap sweep: the same two ``/tools/find`` requests (series
        IDs only), but the series that this process found complete at its last look
        (every image settled or with a complete result, and no image added since:
        additions arrive through the change log, which looks again) are not asked
        about. What it catches is a series the change log lost or never reported; a
        result deleted from Orthanc in a complete series waits for the next full sweep.
        """
        series = self.index.radiograph_series()
        self._complete.intersection_update(series)  # forget series deleted from Orthanc
        if not full:
            series = [s for s in series if s not in self._complete]
        log.debug("reconciling %d CR/DX series (%s)", len(series), "full" if full else "cheap")
        return self.process_series(series)

    # -- doing it ------------------------------------------------------------------------

    def _claim(self, chunk: list[Instance], counts: Counts, leases: dict[str, Lease]) -> None:
        """Claim the chunk's images into ``leases``; those another watcher holds are left
        to it."""
        for instance in chunk:
            self._check_stop()
            earlier = self.state.classified_at.get(instance.sop_instance_uid)
            lease = self.claims.acquire(instance.orthanc_id, earlier[0] if earlier else _now())
            if lease is None:
                log.info(
                    "Orthanc instance %s: another watcher is classifying it; left to it",
                    instance.orthanc_id,
                )
                counts.elsewhere += 1
                series_id = self._series_ids.get(instance.series_instance_uid)
                if series_id is not None:
                    self._revisit[series_id] = time.monotonic() + self.lease_seconds + 1
                continue
            if lease.previous_state == DONE and instance.sop_instance_uid in (
                self._results_in_orthanc(instance.series_instance_uid)
            ):
                # Finished by another watcher since this pass asked Orthanc.
                self.claims.finish(lease)
                counts.elsewhere += 1
                continue
            leases[instance.orthanc_id] = lease

    def _process_chunk(self, chunk: list[Instance]) -> Counts:
        counts = Counts()
        leases: dict[str, Lease] = {}
        try:
            self._claim(chunk, counts, leases)
            with self.claims.renewing(list(leases.values())):
                self._work_on([i for i in chunk if i.orthanc_id in leases], leases, counts)
        finally:
            # Whatever was not finished (a stop, an error, results not all stored) is
            # given back at once, for this watcher's next pass or another watcher.
            self.claims.release([lease for lease in leases.values() if not lease.lost])
        return counts

    def _work_on(self, chunk: list[Instance], leases: dict[str, Lease], counts: Counts) -> None:
        if not chunk:
            return
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
                return
            sources = [Source(p) for p in by_path]
            # Previews and heatmaps go beside the images, for the key images (as
            # process_dicom.py writes them beside its results file).
            heatmaps = HeatmapWriter(folder) if self.key_images else None
            log.info("classifying %d images", len(sources))
            run = classify(
                sources,
                lambda: self.classifier,
                self.batch_size,
                self.workers,
                # SIGTERM stops between two batches: nothing was recorded or sent yet.
                on_entry=lambda entry: self._check_stop(),
                domain=self.domain,
                heatmaps=heatmaps,
                read_timeout=self.read_timeout,
                input_size=self.classifier.input_size,
            )
            if run.interrupted:
                # Ctrl-C: classify() kept what it finished, but nothing of it is sent
                # or recorded; the next run repeats these images.
                raise KeyboardInterrupt
            self._check_stop()
            entries: list[ClassifiedEntry] = []
            for entry in run.entries:
                instance = by_path[entry["path"]]
                lease = leases[instance.orthanc_id]
                name = f"Orthanc instance {instance.orthanc_id} ({instance.sop_instance_uid})"
                uid = instance.sop_instance_uid
                if entry["status"] == SKIPPED:
                    log.info("%s: skipped: %s", name, entry["reason"])
                    self.state.record(
                        "skipped", uid, orthanc_instance=instance.orthanc_id, reason=entry["reason"]
                    )
                    self.claims.finish(lease)
                    counts.skipped += 1
                elif entry["status"] == FAILED:
                    log.error("%s: %s (dead letter)", name, entry["reason"])
                    self.state.record(
                        "failed", uid, orthanc_instance=instance.orthanc_id, reason=entry["reason"]
                    )
                    self.claims.finish(lease)
                    counts.failed += 1
                else:
                    entries.append(self._fix_time(entry, instance, lease))
                    counts.classified += 1
            self.on_progress(len(by_path))
            if entries:
                self._store_results(entries, by_path, leases, folder / "out", counts)

    def _fix_time(
        self, entry: ClassifiedEntry, instance: Instance, lease: Lease
    ) -> ClassifiedEntry:
        """Give the entry its claimed ``classified_at`` and record it before anything is sent.

        The claim carries the time (this watcher's earlier one, or that of a watcher
        whose lease expired), so a repeat rebuilds the same bytes.
        """
        digest = _scores_digest(entry["scores"])
        entry["classified_at"] = lease.classified_at
        if self.state.classified_at.get(instance.sop_instance_uid) != (lease.classified_at, digest):
            self.state.record(
                "classified",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                classified_at=entry["classified_at"],
                scores_digest=digest,
                findings=entry["findings"],
            )
        return entry

    def _send(self, objects: list[_Output]) -> dict[str, upload.Outcome]:
        """Store and verify objects; every outcome by path (good: sent, verified, no problem)."""
        if not objects:
            return {}
        results = upload.upload(
            [Source(str(o.path)) for o in objects], self.client, self.upload_workers
        )
        report = upload.verify(results, self.client, workers=self.upload_workers)
        report.log_problems()
        return {o.name: o for o in report.outcomes}

    def _usable(self, instance: Instance, leases: dict[str, Lease], counts: Counts) -> bool:
        """Whether this watcher still holds the image's claim (checked before each send)."""
        if leases[instance.orthanc_id].usable():
            return True
        log.warning(
            "Orthanc instance %s: its claim was lost before its results were sent; "
            "left to the watcher that holds it",
            instance.orthanc_id,
        )
        counts.elsewhere += 1
        return False

    def _store_results(
        self,
        entries: list[ClassifiedEntry],
        by_path: dict[str, Instance],
        leases: dict[str, Lease],
        out: Path,
        counts: Counts,
    ) -> None:
        """Build each entry's objects, store and verify them in two phases; record what arrived.

        An SR that names a key image Orthanc does not hold would send a reader to
        nothing, and an SR in Orthanc is what marks an image done. So the key images go
        first, and only once every other object of an image is stored and verified is
        its SR sent.
        """
        document: ResultsDocument = {"format": FORMAT, "model": self.model, "images": [*entries]}
        fallback = datetime.datetime.now(datetime.UTC)
        outcome = generate_srs(
            document,
            out,
            fallback,
            disable_progress=True,
            jobs=1,
            results_dir=out.parent if self.key_images else None,
        )
        if outcome.errors:
            log.debug("SR errors: %s", outcome.errors)
        outputs: dict[str, list[_Output]] = {}
        for path in sorted(out.iterdir()) if out.exists() else []:
            output = _Output.read(path)
            for described in output.describes:
                outputs.setdefault(described, []).append(output)
        work: list[tuple[ClassifiedEntry, Instance, list[_Output]]] = []
        for entry in entries:
            instance = by_path[entry["path"]]
            written = outputs.get(entry["sop_instance_uid"], [])
            if not written:
                counts.failed += 1
                self.state.record(
                    "failed",
                    instance.sop_instance_uid,
                    orthanc_instance=instance.orthanc_id,
                    reason="no SR could be built (see the E: line above)",
                )
                self.claims.finish(leases[instance.orthanc_id])
                continue
            work.append((entry, instance, written))

        self._check_stop()
        work = [w for w in work if self._usable(w[1], leases, counts)]
        sent = self._send([o for _, _, written in work for o in written if not o.is_sr])
        good = {name for name, o in sent.items() if o.sent and o.verified and not o.problems}
        ready = [w for w in work if all(str(o.path) in good for o in w[2] if not o.is_sr)]
        self._check_stop()
        kept = [w for w in ready if self._usable(w[1], leases, counts)]
        lost = {w[1].orthanc_id for w in ready} - {w[1].orthanc_id for w in kept}
        sent.update(self._send([o for _, _, written in kept for o in written if o.is_sr]))
        good = {name for name, o in sent.items() if o.sent and o.verified and not o.problems}

        for entry, instance, written in work:
            if instance.orthanc_id in lost:
                continue  # another watcher holds its claim now
            if all(str(o.path) in good for o in written):
                counts.stored += 1
                self._record_stored(entry, instance, written, sent)
                self.claims.finish(leases[instance.orthanc_id])
            else:
                self._incomplete(instance, written, sent, counts)

    def _record_stored(
        self,
        entry: ClassifiedEntry,
        instance: Instance,
        written: list[_Output],
        sent: dict[str, upload.Outcome],
    ) -> None:
        self.state.record(
            "stored",
            instance.sop_instance_uid,
            orthanc_instance=instance.orthanc_id,
            study_instance_uid=entry.get("study_instance_uid"),
            model=self.model_info.model_id,
            classified_at=entry["classified_at"],
            findings=entry["findings"],
            objects=[
                {
                    "sop_instance_uid": o.sop_instance_uid,
                    "status": sent[str(o.path)].status,
                    "orthanc_instance": sent[str(o.path)].instance_id,
                }
                for o in written
            ],
        )

    def _incomplete(
        self,
        instance: Instance,
        written: list[_Output],
        sent: dict[str, upload.Outcome],
        counts: Counts,
    ) -> None:
        """An image whose objects were not all stored: a failure, retried a bounded number
        of times, then a dead letter (its SR was not sent unless all else was stored)."""
        problems = []
        for o in written:
            outcome = sent.get(str(o.path))
            kind = "SR" if o.is_sr else "key image"
            if outcome is None:
                problems.append(f"{kind} not sent, as the objects it names were not all stored")
            elif not (outcome.sent and outcome.verified and not outcome.problems):
                why = "; ".join(
                    [outcome.reason, *outcome.problems] if outcome.reason else outcome.problems
                )
                problems.append(f"{kind} {outcome.status}: {why or 'not verified'}")
        reason = "its results were not all stored: " + "; ".join(problems)
        attempt = self.state.attempts.get(instance.sop_instance_uid, 0) + 1
        name = f"Orthanc instance {instance.orthanc_id} ({instance.sop_instance_uid})"
        counts.failed += 1
        if attempt >= self.max_attempts:
            log.error(
                "%s: %s (attempt %d of %d; dead letter)", name, reason, attempt, self.max_attempts
            )
            self.state.record(
                "failed",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                reason=f"{reason} ({attempt} attempts)",
            )
        else:
            log.error(
                "%s: %s (attempt %d of %d; will retry)", name, reason, attempt, self.max_attempts
            )
            self.state.record(
                "incomplete",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                attempt=attempt,
                reason=reason,
            )

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


def beat(watcher: Watcher) -> None:
    """Write the watcher's heartbeat, if it keeps one (``--check-health`` reads it)."""
    if watcher.heartbeat is not None:
        watcher.heartbeat.beat()


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
    full_reconcile_interval: float | None = None,
) -> None:
    """Follow Orthanc until :class:`Stopping`; an outage is waited out, never fatal.

    ``connect(probe)`` makes a client; a probe's client does not retry. A full
    reconciliation runs on start, after the change log restarted and every
    ``full_reconcile_interval`` seconds (default: every ``reconcile_interval``); the
    cheap sweep (:meth:`Watcher.reconcile` with ``full=False``) every
    ``reconcile_interval`` seconds between them.
    """
    stop = watcher.stop
    cursor = watcher.state.load_cursor()
    next_reconcile = next_full = 0.0
    full_interval = full_reconcile_interval or reconcile_interval
    outage: str | None = None
    delays = backoff_delays()
    beat(watcher)
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
                next_reconcile = next_full = 0.0
            if time.monotonic() >= next_reconcile:
                full = time.monotonic() >= next_full
                counts = watcher.reconcile(full)
                if counts.classified or counts.failed or counts.skipped or counts.present:
                    log.info("reconciled: %s", counts.summary())
                watcher.state.save_cursor(cursor)
                next_reconcile = time.monotonic() + reconcile_interval
                if full:
                    next_full = time.monotonic() + full_interval
            done = False
            while not done:
                cursor, done = watcher.follow_once(cursor)
            revisited = watcher.revisit()
            if revisited.classified or revisited.failed:
                log.info("looked again at images left to another watcher: %s", revisited.summary())
            beat(watcher)
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
            beat(watcher)  # waiting an outage out is healthy: a restart would not help
            sleep_unless_stopped(stop, next(delays))
