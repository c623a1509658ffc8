"""The engine behind ``watch_orthanc.py``: classify what arrives in Orthanc, exactly once.

The watcher is the three scripts run against the PACS instead of a folder, with no
second copy of any of them: instances are fetched over the REST client
(``/instances/{id}/file``) into an owner-only work folder, classified by
:func:`cxrsr.classify.classify` (the same worker processes and batches as
``process_dicom.py``), turned into SRs by :func:`cxrsr.sr.batch.generate_srs` and stored
and verified by :mod:`cxrsr.pacs.upload`, as ``upload_dicom.py`` does.

Exactly once: the rule, and the function that decides when an image is done, are
:mod:`cxrsr.pacs.watch_done`. This module finds the work (the change log, the sweeps, the
loop that waits out an outage); :mod:`cxrsr.pacs.watch_work` does it on claimed images;
:mod:`cxrsr.pacs.watch_index` holds the Orthanc queries.

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

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from cxrsr.dicomio.domain import DomainPolicy
from cxrsr.model.classifier import Classifier
from cxrsr.pacs.claims import LEASE_SECONDS, Claims
from cxrsr.pacs.health import Heartbeat
from cxrsr.pacs.orthanc import (
    CredentialsRefused,
    OrthancClient,
    OrthancFatalError,
    OrthancUnavailable,
)
from cxrsr.pacs.watch_done import ResultsInOrthanc
from cxrsr.pacs.watch_index import RADIOGRAPH_MODALITIES, Instance, OrthancError, OrthancIndex
from cxrsr.pacs.watch_state import WatchState
from cxrsr.pacs.watch_work import ClaimedWork, Counts, Stopping
from cxrsr.results import model_record
from cxrsr.sr.entries import ModelInfo
from cxrsr.sr.tid1500 import SR_MANUFACTURER

log = logging.getLogger("cxrsr")

#: Images fetched and classified together: large enough for full network batches and
#: to amortise the worker processes' start, small enough to keep memory and the work
#: lost to a crash small.
CHUNK_SIZE = 128

#: Attempts to store an image's results (``--max-attempts``) before it is a dead letter.
DEFAULT_MAX_ATTEMPTS = 3


@dataclass
class Watcher(ClaimedWork):
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
        self.results_in_orthanc = ResultsInOrthanc(self.index, self.model_info)
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
        self.results_in_orthanc.index = self.index
        self.claims.client = client

    # -- deciding what to do -----------------------------------------------------------

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
        """SOP Instance UIDs of the series' images that are done (:mod:`cxrsr.pacs.watch_done`)."""
        return self.results_in_orthanc(series_uid)

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
