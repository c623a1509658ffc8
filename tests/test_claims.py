"""Claims in a real Orthanc (cxrsr.pacs.claims): one holder per image, leases, takeovers.

No model here: the claims alone, against the project's orthanc.json (CheckRevisions on,
the claim metadata declared) and against an Orthanc without them.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cxrsr.config import OrthancSettings
from cxrsr.pacs.claims import CLAIM_METADATA, DONE, RELEASED, SAFETY_SECONDS, WORKING, Claims
from cxrsr.pacs.local_orthanc import LocalOrthanc
from cxrsr.pacs.orthanc import OrthancClient
from tests.conftest import new_orthanc

WEIGHTS = "0" * 64


@pytest.fixture
def server(tmp_path: Path, orthanc_binary: str) -> Iterator[LocalOrthanc]:
    with new_orthanc(tmp_path / "orthanc", orthanc_binary) as started:
        yield started


def client_of(server: LocalOrthanc) -> OrthancClient:
    return OrthancClient(OrthancSettings(server.url, server.username, server.password))


def stored_instance(server: LocalOrthanc, corpus_dir: Path) -> str:
    answer = requests.post(
        f"{server.url}/instances",
        data=(corpus_dir / "cxr11_siim_cr_jpeg8.dcm").read_bytes(),
        auth=(server.username, server.password),
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.json()["ID"])


def claim_of(server: LocalOrthanc, instance_id: str) -> dict:
    answer = requests.get(
        f"{server.url}/instances/{instance_id}/metadata/{CLAIM_METADATA}",
        auth=(server.username, server.password),
        timeout=30,
    )
    answer.raise_for_status()
    return dict(answer.json())


def test_of_many_racing_watchers_exactly_one_holds_an_image(
    server: LocalOrthanc, corpus_dir: Path
) -> None:
    instance = stored_instance(server, corpus_dir)
    racers = [Claims(client_of(server), WEIGHTS) for _ in range(8)]
    won: list[Claims] = []
    start = threading.Barrier(len(racers))

    def race(claims: Claims) -> None:
        start.wait(30)
        if claims.acquire(instance, f"2026-01-01T00:00:0{racers.index(claims)}+00:00"):
            won.append(claims)

    threads = [threading.Thread(target=race, args=(c,)) for c in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 1
    claim = claim_of(server, instance)
    assert claim["holder"] == won[0].holder and claim["state"] == WORKING


def test_renewal_finish_and_takeover_keep_the_classification_time(
    server: LocalOrthanc, corpus_dir: Path
) -> None:
    instance = stored_instance(server, corpus_dir)
    first = Claims(client_of(server), WEIGHTS, lease_seconds=30)
    second = Claims(client_of(server), WEIGHTS, lease_seconds=30)
    lease = first.acquire(instance, "2026-01-01T00:00:00+00:00")
    assert lease is not None and lease.usable()
    assert second.acquire(instance, "2026-06-06T00:00:00+00:00") is None  # a live lease

    before = lease.expires
    first.renew(lease)  # renewals go on, however often (each needs the latest ETag)
    first.renew(lease)
    assert not lease.lost and lease.expires >= before

    # The holder "dies": its lease expires; the taker reuses its classification time.
    first.lease_seconds = 0.0
    first.renew(lease)
    time.sleep(0.01)
    taken = second.acquire(instance, "2026-06-06T00:00:00+00:00")
    assert taken is not None and taken.classified_at == "2026-01-01T00:00:00+00:00"
    assert taken.previous_state == WORKING
    first.renew(lease)  # the old holder's renewal fails: it must stop working on it
    assert lease.lost and not lease.usable()

    second.finish(taken)
    assert claim_of(server, instance)["state"] == DONE
    # A done claim may be taken again (its result may have been deleted since), also by
    # the same watcher in a later pass.
    again = second.acquire(instance, "2027-01-01T00:00:00+00:00")
    assert again is not None and again.previous_state == DONE and again.usable()
    second.release([again])
    assert claim_of(server, instance)["state"] == RELEASED


def test_an_orthanc_without_claims_is_reported_once_and_every_image_is_ours(
    tmp_path: Path, orthanc_binary: str, corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for overrides in ({"CheckRevisions": False}, {"UserMetadata": {}}):
        local = LocalOrthanc(
            tmp_path / f"orthanc-{len(json.dumps(overrides))}",
            "cxrsr-test",
            secrets.token_urlsafe(16),
            binary=orthanc_binary,
            overrides=overrides,
        )
        with local, caplog.at_level(logging.WARNING, logger="cxrsr"):
            caplog.clear()
            instance = stored_instance(local, corpus_dir)
            claims = Claims(client_of(local), WEIGHTS)
            for _ in range(3):
                lease = claims.acquire(instance, "2026-01-01T00:00:00+00:00")
                assert lease is not None and lease.etag is None and lease.usable()
            assert claims.enabled is False
            warnings = [r for r in caplog.records if "has no claims" in r.getMessage()]
            assert len(warnings) == 1, overrides


def test_a_holder_that_cannot_reach_orthanc_stops_using_and_renewing_its_claim(
    server: LocalOrthanc, corpus_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Unreachable Orthanc: the lease is kept while it has time left; once it is within
    SAFETY_SECONDS of its expiry it is lost for good (nothing more is sent for the image,
    and the claim is neither renewed nor given back when Orthanc answers again)."""
    instance = stored_instance(server, corpus_dir)
    claims = Claims(client_of(server), WEIGHTS)
    lease = claims.acquire(instance, "2026-01-01T00:00:00+00:00")
    assert lease is not None and lease.usable()
    written = claim_of(server, instance)

    server.stop()
    claims.renew(lease)  # refused connection: the lease has 120 s left
    assert not lease.lost and lease.usable()
    lease.expires = time.time() + SAFETY_SECONDS - 1  # as if the outage had lasted
    assert not lease.usable()  # no upload starts on a lease this close to its end
    with caplog.at_level(logging.WARNING, logger="cxrsr"):
        claims.renew(lease)
    assert lease.lost and not lease.usable()
    assert any("claim was lost" in r.getMessage() for r in caplog.records)

    server.start()
    claims.renew(lease)
    claims.release([lease])
    assert claim_of(server, instance) == written, "a lost claim was written to"
