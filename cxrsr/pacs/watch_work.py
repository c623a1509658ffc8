"""The watcher's claim-driven work on a chunk of images: claim, fetch, classify, store.

Each chunk's images are claimed in Orthanc (:mod:`cxrsr.pacs.claims`), downloaded into an
owner-only work folder, classified by :func:`cxrsr.classify.classify`, turned into SRs and
key images by :func:`cxrsr.sr.batch.generate_srs`, and stored and verified by
:mod:`cxrsr.pacs.upload` in two phases (key images, then SRs), as the rule in
:mod:`cxrsr.pacs.watch_done` requires. What is not finished gives its claim back.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom

from cxrsr.classify import classify
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import DomainPolicy
from cxrsr.model.classifier import Classifier
from cxrsr.model.heatmaps import HeatmapWriter
from cxrsr.pacs import upload, verify
from cxrsr.pacs.claims import DONE, Claims, Lease
from cxrsr.pacs.health import Heartbeat
from cxrsr.pacs.orthanc import OrthancClient
from cxrsr.pacs.watch_done import ResultsInOrthanc
from cxrsr.pacs.watch_index import Instance, OrthancIndex
from cxrsr.pacs.watch_state import WatchState
from cxrsr.results import (
    CLASSIFIED,
    FORMAT,
    SKIPPED,
    ClassifiedEntry,
    FailedEntry,
    ModelRecord,
    ResultsDocument,
    SkippedEntry,
)
from cxrsr.sr.batch import generate_srs
from cxrsr.sr.entries import ModelInfo

log = logging.getLogger("cxrsr")


class Stopping(Exception):
    """SIGTERM or Ctrl-C arrived: abandon the work in flight (it will be repeated)."""


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


class ClaimedWork:
    """The part of :class:`cxrsr.pacs.watch.Watcher` that works on claimed images.

    A mixin: the attributes below are the watcher's (its settings and its state).
    """

    client: OrthancClient
    classifier: Classifier
    state: WatchState
    batch_size: int
    workers: int
    read_timeout: float | None
    upload_workers: int
    stop: threading.Event
    domain: DomainPolicy
    key_images: bool
    max_attempts: int
    lease_seconds: float
    on_progress: Callable[[int], None]
    heartbeat: Heartbeat | None
    index: OrthancIndex
    model: ModelRecord
    model_info: ModelInfo
    claims: Claims
    results_in_orthanc: ResultsInOrthanc
    work_root: Path
    _series_ids: dict[str, str]
    _revisit: dict[str, float]

    def _check_stop(self) -> None:
        """Stop here if asked; otherwise a safe point is also a sign of life."""
        if self.stop.is_set():
            raise Stopping()
        if self.heartbeat is not None:
            self.heartbeat.beat(force=False)

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
                self.results_in_orthanc(instance.series_instance_uid)
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
        """Fetch, classify and store the claimed images of a chunk, in a work folder."""
        if not chunk:
            return
        with tempfile.TemporaryDirectory(dir=self.work_root) as tmp:
            folder = Path(tmp)
            by_path = self._download(chunk, folder)
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
                if entry["status"] == CLASSIFIED:
                    entries.append(self._fix_time(entry, instance, lease))
                    counts.classified += 1
                else:
                    self._not_classified(entry, instance, lease, counts)
            self.on_progress(len(by_path))
            if entries:
                self._store_results(entries, by_path, leases, folder / "out", counts)

    def _download(self, chunk: list[Instance], folder: Path) -> dict[str, Instance]:
        """Each image's file in ``folder`` (owner-only), by path; an image deleted meanwhile
        is left out."""
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
        return by_path

    def _not_classified(
        self, entry: SkippedEntry | FailedEntry, instance: Instance, lease: Lease, counts: Counts
    ) -> None:
        """A skipped image, or a failed one (a dead letter): recorded, its claim finished."""
        name = f"Orthanc instance {instance.orthanc_id} ({instance.sop_instance_uid})"
        if entry["status"] == SKIPPED:
            log.info("%s: skipped: %s", name, entry["reason"])
            counts.skipped += 1
        else:
            log.error("%s: %s (dead letter)", name, entry["reason"])
            counts.failed += 1
        self.state.record(
            entry["status"],
            instance.sop_instance_uid,
            orthanc_instance=instance.orthanc_id,
            reason=entry["reason"],
        )
        self.claims.finish(lease)

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
        report = verify.verify(results, self.client, workers=self.upload_workers)
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
        dead = attempt >= self.max_attempts
        then = "dead letter" if dead else "will retry"
        log.error("%s: %s (attempt %d of %d; %s)", name, reason, attempt, self.max_attempts, then)
        if dead:
            self.state.record(
                "failed",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                reason=f"{reason} ({attempt} attempts)",
            )
        else:
            self.state.record(
                "incomplete",
                instance.sop_instance_uid,
                orthanc_instance=instance.orthanc_id,
                attempt=attempt,
                reason=reason,
            )
