"""A race of watchers' claims (cxrsr.pacs.claims) on real Orthancs: for the tests and
``bench/bench_claims.py``.

``race()`` starts several processes (each one holder, as one watcher is) that claim the
same instances in rounds, through every Orthanc of a group in turn. In a round each
process tries every key once, in its own random order, all processes at once; between
two rounds the winners mark their claims ``done``, which any process may take over in
the next round. Round 0 races the *create if absent* of a free claim; every later round
races the *compare and swap* of a done one. Exactly one winner per key and round is the
promise under test.

``tiny_instances()`` makes small CR instances (8 x 8 pixels) with fresh UIDs, fast to
store in numbers.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrsr.config import OrthancSettings
from cxrsr.pacs.claims import Claims, new_holder_id
from cxrsr.pacs.orthanc import OrthancClient

WEIGHTS = "0" * 64
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def tiny_instance(study: str, series: str, patient: str = "RACE", modality: str = "CR") -> bytes:
    """A valid CR image of 8 x 8 pixels with a fresh SOP Instance UID, as a Part 10 file."""
    from io import BytesIO

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = patient, "Race^Test", modality
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def client(url: str, username: str, password: str) -> OrthancClient:
    return OrthancClient(OrthancSettings(url, username, password))


def store_tiny(url: str, username: str, password: str, count: int) -> list[str]:
    """Store ``count`` tiny instances, one series each; their Orthanc IDs."""
    orthanc = client(url, username, password)
    ids = []
    for _ in range(count):
        answer = orthanc.request(
            "POST", "/instances", body=tiny_instance(generate_uid(), generate_uid()),
            content_type="application/dicom",
        )  # fmt: skip
        assert answer.status == 200, answer.status
        ids.append(str(answer.json()["ID"]))
    return ids


@dataclass
class RaceResult:
    winners: dict[tuple[int, str], list[int]]
    """(round, key) -> the processes that won it (exactly one, if claims hold)."""
    attempts: int
    seconds: float
    acquire_ms: list[float]
    errors: list[str]


def _worker(
    index: int,
    urls: list[str],
    username: str,
    password: str,
    keys: list[str],
    rounds: int,
    barrier: Any,
    results: Any,
) -> None:
    holder = new_holder_id()
    claimers = [Claims(client(u, username, password), WEIGHTS, holder=holder) for u in urls]
    shuffle = random.Random(index)
    won: list[tuple[int, str]] = []
    timings: list[float] = []
    errors: list[str] = []
    attempt = 0
    for round_ in range(rounds):
        barrier.wait(120)
        leases = []
        order = list(keys)
        shuffle.shuffle(order)
        for key in order:
            claims = claimers[attempt % len(claimers)]  # through each Orthanc in turn
            attempt += 1
            started = time.perf_counter()
            try:
                lease = claims.acquire(key, f"2026-01-01T00:00:{round_ % 60:02d}+00:00")
            except Exception as exc:  # counted, and the test fails on any
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            timings.append((time.perf_counter() - started) * 1000)
            if lease is not None:
                won.append((round_, key))
                leases.append((claims, lease))
        barrier.wait(120)
        for claims, lease in leases:
            claims.finish(lease)
    results.put((index, won, attempt, timings, errors))


def race(
    urls: list[str], username: str, password: str, keys: list[str], processes: int, rounds: int
) -> RaceResult:
    """``processes`` processes x ``rounds`` x ``len(keys)`` claims; who won what."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes)
    queue = context.Queue()
    workers = [
        context.Process(
            target=_worker, args=(i, urls, username, password, keys, rounds, barrier, queue)
        )
        for i in range(processes)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    result = RaceResult({}, 0, 0.0, [], [])
    try:
        for _ in workers:
            index, won, attempts, timings, errors = queue.get(timeout=600)
            for round_key in won:
                result.winners.setdefault(tuple(round_key), []).append(index)
            result.attempts += attempts
            result.acquire_ms += timings
            result.errors += errors
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
    result.seconds = time.perf_counter() - started
    return result
