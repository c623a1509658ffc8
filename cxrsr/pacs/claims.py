"""Claims in Orthanc: which watcher classifies an image, so that two never both do.

A claim is an instance's user metadata ``cxrsr-claim`` (declared in ``orthanc.json``
under ``UserMetadata``), holding a small JSON document::

    {"holder": "host:pid:random", "expires": 1733550000.0, "state": "working",
     "classified_at": "2026-12-07T05:50:00+00:00", "weights_sha256": "..."}

Orthanc with ``"CheckRevisions": true`` makes both steps of a claim atomic:

* **create if absent**: ``PUT /instances/{id}/metadata/cxrsr-claim`` without ``If-Match``
  is refused (HTTP 409) when the metadata already exists, so of any number of watchers
  racing for a free image exactly one gets it;
* **compare and swap**: with ``If-Match: <ETag>`` (the ETag of the value read, a
  revision and the MD5 of the value) it succeeds only if nobody changed the value since.
  Every value written holds the writer's random holder id and a new expiry, so no two
  values are equal and a swap can never succeed on a value that changed and changed back.

A claim is a lease: its holder renews it while it works (a thread, every third of the
lease) and gives up the image as soon as a renewal fails. An expired lease, a released
one, a ``done`` one and one whose holder was a process of this host that no longer
runs may be taken over (compare and swap); the taker reuses the
claim's ``classified_at``, so a result half stored by a holder that died is rebuilt
byte-identically (Orthanc answers ``AlreadyStored``) instead of being stored twice.
Expiry is compared with this machine's clock: hosts sharing an Orthanc need synchronised
clocks (NTP), within a small part of the lease.

The requests go through the shared client's connection pool directly, because they need
a request header (``If-Match``) and an answer header (``ETag``) that the general client
does not expose. An Orthanc without claims (``CheckRevisions`` off, or the metadata not
declared) is detected, reported once on a ``W:`` line, and the watcher continues alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError

from cxrsr.pacs.orthanc import CredentialsRefused, OrthancClient, OrthancUnavailable

log = logging.getLogger("cxrsr")

#: The user metadata that holds an instance's claim, and its index in ``UserMetadata``.
CLAIM_METADATA = "cxrsr-claim"
CLAIM_METADATA_INDEX = 4242

#: Seconds a claim lives without renewal. Renewed every third of it, so two renewals in
#: a row may fail (a slow Orthanc) before the lease is lost.
LEASE_SECONDS = 120.0

#: A lease this close to its expiry is no longer trusted for starting an upload.
SAFETY_SECONDS = 10.0

#: Seconds allowed, in all, for giving claims back when the watcher stops.
RELEASE_DEADLINE = 3.0

WORKING, RELEASED, DONE = "working", "released", "done"


def new_holder_id() -> str:
    """This watcher's identity in claims: host, process and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class Lease:
    """A claim this watcher holds on one instance."""

    instance_id: str
    classified_at: str
    """The classification time every object of the result is built with."""
    etag: str | None
    """The claim's ETag, for the next compare and swap; ``None`` without claims."""
    expires: float
    previous_state: str | None = None
    """The state of the claim taken over (``None``: it was free)."""
    lost: bool = False
    """A renewal failed: another watcher may have the image; do not upload for it."""

    def usable(self) -> bool:
        """Whether work may still be sent for this image."""
        if self.etag is None:
            return True
        return not self.lost and time.time() < self.expires - SAFETY_SECONDS


@dataclass
class _Answer:
    status: int
    etag: str | None
    body: bytes


@dataclass
class Claims:
    """Claims of one watcher (one holder id) on the instances of one Orthanc."""

    client: OrthancClient
    weights_sha256: str
    lease_seconds: float = LEASE_SECONDS
    holder: str = field(default_factory=new_holder_id)
    enabled: bool | None = None
    """``None`` until Orthanc was asked whether it supports claims."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- HTTP ----------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        if_match: str | None = None,
        timeout: float | None = None,
        retries: int = 2,
    ) -> _Answer:
        client = self.client
        headers = dict(client._headers)
        if body is not None:
            headers["Content-Type"] = "text/plain"
        if if_match is not None:
            headers["If-Match"] = if_match
        wait = timeout or client.timeout
        try:
            # Retrying a PUT is safe here: a repeat of a PUT that did arrive is refused
            # (409) and the value read back then names this holder (see acquire/renew).
            answer = client._pool.urlopen(
                method,
                client._prefix + path,
                body=body,
                headers=headers,
                retries=urllib3.Retry(
                    total=retries, allowed_methods=None, backoff_factor=0.2, redirect=0
                ),
                timeout=urllib3.Timeout(connect=wait, read=wait),
                preload_content=True,
                redirect=False,
            )
        except (HTTPError, OSError) as exc:
            raise OrthancUnavailable(f"no answer from Orthanc at {client.url}: {exc}") from exc
        if answer.status in (401, 403):
            raise CredentialsRefused(f"Orthanc at {client.url} refused the credentials")
        if answer.status >= 500:
            raise OrthancUnavailable(f"Orthanc answered HTTP {answer.status} to {method} {path}")
        return _Answer(answer.status, answer.headers.get("ETag"), bytes(answer.data))

    def _put(self, path: str, value: bytes, if_match: str | None = None, **kw: Any) -> _Answer:
        """PUT a claim; on success, ``etag`` is the ETag to compare with next time.

        Orthanc 1.10's answer to the PUT carries the next revision in its ETag, while
        its default database (SQLite) keeps revision 0 and answers that to a GET: only a
        GET tells what a later ``If-Match`` must say. The value read back must be ours.
        """
        answer = self._send("PUT", path, value, if_match=if_match, **kw)
        if answer.status != 200:
            return answer
        current = self._send("GET", path, **kw)
        if current.status != 200 or current.body != value:
            return _Answer(409, None, current.body)  # overwritten at once by another watcher
        return _Answer(200, current.etag, current.body)

    def _path(self, instance_id: str) -> str:
        return f"/instances/{instance_id}/metadata/{CLAIM_METADATA}"

    def _value(self, classified_at: str, state: str, expires: float) -> bytes:
        document = {
            "holder": self.holder,
            "expires": round(expires, 3),
            "state": state,
            "classified_at": classified_at,
            "weights_sha256": self.weights_sha256,
        }
        return json.dumps(document, separators=(",", ":")).encode("utf-8")

    # -- support -------------------------------------------------------------------

    def _disable(self, why: str) -> None:
        if self.enabled is not False:
            log.warning(
                "Orthanc at %s has no claims (%s): a second watcher on this Orthanc would "
                "duplicate work; continuing as the only watcher",
                self.client.url,
                why,
            )
        self.enabled = False

    def _check_support(self) -> None:
        """Ask ``/system`` once whether Orthanc checks revisions (claims need it)."""
        if self.enabled is not None:
            return
        answer = self.client.request("GET", "/system")
        document = answer.json() if answer.status == 200 else {}
        if not (isinstance(document, dict) and document.get("CheckRevisions") is True):
            self._disable('"CheckRevisions" is not true in its configuration')
        else:
            self.enabled = True

    # -- the lease's life ------------------------------------------------------------

    def acquire(self, instance_id: str, proposed_time: str) -> Lease | None:
        """Claim an instance; ``None`` when another watcher's live lease holds it, or the
        instance is gone.

        ``proposed_time`` is this watcher's ``classified_at`` for a free image; a claim
        taken over gives its own.
        """
        self._check_support()
        expires = time.time() + self.lease_seconds
        if not self.enabled:
            return Lease(instance_id, proposed_time, None, expires)
        path = self._path(instance_id)
        answer = self._put(path, self._value(proposed_time, WORKING, expires))
        if answer.status == 200:
            return Lease(instance_id, proposed_time, answer.etag, expires)
        if answer.status in (400, 404):
            return self._unsupported(instance_id, proposed_time, expires, answer)
        if answer.status != 409:
            raise OrthancUnavailable(f"Orthanc answered HTTP {answer.status} to PUT {path}")
        current = self._send("GET", path)
        if current.status == 404:
            return None  # the instance was deleted (or its claim: the next pass retries)
        if current.body == self._value(proposed_time, WORKING, expires):
            # Our own PUT, repeated after its answer was lost.
            return Lease(instance_id, proposed_time, current.etag, expires)
        claim = _decode(current.body)
        if (
            claim.get("state") == WORKING
            and _expiry(claim) > time.time()
            and not _holder_died(str(claim.get("holder", "")))
        ):
            return None
        if claim.get("weights_sha256") == self.weights_sha256 and claim.get("classified_at"):
            proposed_time = str(claim["classified_at"])
        taken = self._put(path, self._value(proposed_time, WORKING, expires), current.etag)
        if taken.status != 200:
            return None  # another watcher took it over first
        state = str(claim.get("state", "unreadable"))
        if state == WORKING:
            log.info(
                "Orthanc instance %s: the lease of %s expired; taking its work over",
                instance_id,
                claim.get("holder"),
            )
        return Lease(instance_id, proposed_time, taken.etag, expires, previous_state=state)

    def _unsupported(
        self, instance_id: str, proposed_time: str, expires: float, answer: _Answer
    ) -> Lease | None:
        """A PUT refused with 400/404: the metadata is not declared, or the instance is gone."""
        exists = self.client.request("GET", f"/instances/{instance_id}")
        if exists.status == 404:
            return None
        self._disable(
            f"the user metadata {CLAIM_METADATA!r} is not declared in its configuration "
            f"(HTTP {answer.status})"
        )
        return Lease(instance_id, proposed_time, None, expires)

    def _swap(self, lease: Lease, state: str, expires: float, timeout: float | None = None) -> bool:
        """Write the lease's claim with a new state and expiry; whether it is still ours."""
        assert lease.etag is not None
        path = self._path(lease.instance_id)
        value = self._value(lease.classified_at, state, expires)
        answer = self._put(path, value, lease.etag, timeout=timeout)
        if answer.status == 200:
            lease.etag, lease.expires = answer.etag, expires
            return True
        if answer.status == 409:
            current = self._send("GET", path, timeout=timeout)
            if current.status == 200 and current.body == value:  # a repeat of our own PUT
                lease.etag, lease.expires = current.etag, expires
                return True
        return False

    def renew(self, lease: Lease) -> None:
        """Extend one lease; mark it lost when another watcher has the claim, or when
        Orthanc cannot be reached before the lease would expire."""
        with self._lock:
            if lease.etag is None or lease.lost:
                return
            try:
                if not self._swap(lease, WORKING, time.time() + self.lease_seconds):
                    lease.lost = True
            except OrthancUnavailable:
                if time.time() >= lease.expires - SAFETY_SECONDS:
                    lease.lost = True
            if lease.lost:
                log.warning(
                    "Orthanc instance %s: its claim was lost; leaving it to whoever holds it",
                    lease.instance_id,
                )

    def finish(self, lease: Lease) -> None:
        """Mark the work done (its result is stored and verified, or it was skipped or failed)."""
        self._end(lease, DONE)

    def release(self, leases: list[Lease]) -> None:
        """Give unfinished claims back at once (the watcher stops or could not store),
        within :data:`RELEASE_DEADLINE` in all: a claim not given back simply expires."""
        deadline = time.monotonic() + RELEASE_DEADLINE
        for lease in leases:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(OrthancUnavailable, CredentialsRefused):
                self._end(lease, RELEASED, timeout=min(left, 2.0))

    def _end(self, lease: Lease, state: str, timeout: float | None = None) -> None:
        with self._lock:
            if lease.etag is None or lease.lost:
                return
            self._swap(lease, state, time.time(), timeout=timeout)
            lease.lost = True  # no longer ours to renew

    @contextlib.contextmanager
    def renewing(self, leases: list[Lease]) -> Iterator[None]:
        """Renew ``leases`` in a background thread while the block runs."""
        if not any(lease.etag is not None for lease in leases):
            yield
            return
        done = threading.Event()

        def renew_all() -> None:
            while not done.wait(self.lease_seconds / 3):
                for lease in leases:
                    if done.is_set():
                        return
                    try:
                        self.renew(lease)
                    except Exception as exc:  # never end the thread: the lease then expires
                        log.debug("renewing the claim on %s: %s", lease.instance_id, exc)

        thread = threading.Thread(target=renew_all, name="cxrsr-claims", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()


def _holder_died(holder: str) -> bool:
    """Whether the holder was a process of this host that no longer runs (``kill -9``, a
    crash): its claims need not wait for their leases to expire.

    A reused pid only makes this answer "alive", and the lease then expires as usual.
    """
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's process): alive
        return False
    return False


def _decode(body: bytes) -> dict[str, Any]:
    """A claim's JSON; anything unreadable counts as an expired claim of nobody."""
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _expiry(claim: dict[str, Any]) -> float:
    try:
        return float(claim.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0
