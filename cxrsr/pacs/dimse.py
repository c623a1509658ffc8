"""Store instances in a PACS over the DICOM network protocol (DIMSE) and prove them there.

* C-STORE (PS3.4 Annex B) through pynetdicom on at most ``associations`` associations,
  each kept open for the whole run and used by one worker at a time, file after file;
  the presentation contexts proposed are those of the files themselves (SOP Class,
  Transfer Syntax), plus Explicit and Implicit VR Little Endian for uncompressed files
  only, which pynetdicom converts between without loss. A compressed file is never
  transcoded: if the peer accepts none of its own transfer syntax, it is rejected with
  that reason. The file's own data set bytes are sent as they are whenever the peer
  accepted its transfer syntax (:mod:`cxrsr.pacs.dimse_send`).
* Each C-STORE status is mapped to an outcome: 0x0000 stored; the warnings 0xB000,
  0xB006, 0xB007 stored with the warning named; anything else rejected (with its status);
  no answer (association lost) failed, to be sent again by a rerun.
* Before sending, a C-FIND at IMAGE level per series (Study Root) lists the instances the
  peer holds already; those are not sent again. It goes over one of the same
  associations (each proposes the C-FIND context too): a peer such as Orthanc serves a
  fixed number of associations at a time (4 by default), so an association of its own
  would wait for a sending one to end.
* Proof: Storage Commitment Push Model (PS3.4 Annex J, :mod:`cxrsr.pacs.commitment`):
  an N-ACTION names every instance acknowledged, and the peer's N-EVENT-REPORT, on this
  association or on a new one to ``listen_port`` (Orthanc opens a new one to the
  modality registered for our AE title), says which it has committed to keep. A peer that refuses storage commitment is asked
  with C-FIND instead; a peer that offers neither (a plain storage SCP such as dcmtk's
  ``storescp``) leaves only its C-STORE status, and the summary says so.

Where the peer is and DICOM TLS are in :mod:`cxrsr.pacs.dimse_peer`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from cxrsr.errors import PipelineError
from cxrsr.pacs import commitment
from cxrsr.pacs.dimse_find import find_instances
from cxrsr.pacs.dimse_peer import Peer, parse_address, tls_context, tls_server_context
from cxrsr.pacs.dimse_send import keep_responses, send_c_store
from cxrsr.pacs.upload import REJECTED, SEND_FAILED, STORED, Checked, Outcome, Report

log = logging.getLogger("cxrsr")

#: What upload_dicom.py takes from here.
__all__ = [
    "DimseTarget",
    "Peer",
    "parse_address",
    "tls_context",
    "tls_server_context",
]

EXIT_ENVIRONMENT = 3
#: At most this many presentation contexts in one association (PS3.8 9.3.2.2: odd IDs 1-255).
MAX_CONTEXTS = 128
#: Uncompressed transfer syntaxes pynetdicom converts between losslessly.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
#: C-STORE warning statuses (PS3.4 B.2.3): the instance is stored, with a remark.
WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
#: Files one worker sends before it takes the next batch: a whole --batch per worker left
#: the other associations idle at the end of the run while one worker sent its last 16.
SEND_BATCH = 4

BY_CFIND = "C-FIND"
BY_STATUS = "C-STORE status only"


def _contexts_for(keys: set[tuple[str, str]]) -> list[PresentationContext]:
    """One presentation context per (SOP class, transfer syntax) of the files, the C-FIND
    context that asks what the peer holds, and storage commitment's."""
    contexts = [
        build_context(StudyRootQueryRetrieveInformationModelFind),
        build_context(StorageCommitmentPushModel),
    ]
    for sop_class, syntax in sorted(keys):
        if syntax in UNCOMPRESSED:
            syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        else:
            syntaxes = [syntax]
        contexts.append(build_context(sop_class, syntaxes))
    return contexts


@dataclass
class _Link:
    """One association and the (SOP class, transfer syntax) pairs it proposed."""

    assoc: Association | None = None
    keys: set[tuple[str, str]] = field(default_factory=set)


class _Links:
    """At most ``limit`` associations, each lent to one thread at a time and kept open
    between uses. Releasing them all before each chunk's C-FIND, and associating again
    after it, cost 0.5 s of a 7 s run for 150 files through a 5 ms each-way delay
    (cProfile of ``bench/bench_targets.py``'s ``--to dimse``: ``held`` alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.every: list[_Link] = []
        self.idle: list[_Link] = []
        self._changed = threading.Condition()

    def take(self) -> _Link:
        """An idle link, a new one while fewer than ``limit`` exist, else the next one
        given back."""
        with self._changed:
            while not self.idle and len(self.every) >= self.limit:
                self._changed.wait()
            if self.idle:
                return self.idle.pop()
            link = _Link()
            self.every.append(link)
            return link

    def give(self, link: _Link) -> None:
        with self._changed:
            self.idle.append(link)
            self._changed.notify()


class DimseTarget:
    """A DICOM storage SCP as an upload target (:class:`cxrsr.pacs.targets.Target`)."""

    def __init__(self, peer: Peer, associations: int = 4) -> None:
        self.peer = peer
        self.description = f"DICOM peer {peer.called_aet} at {peer.address}"
        self.send_batch: int | None = SEND_BATCH
        self.ae = AE(ae_title=peer.calling_aet)
        self.ae.acse_timeout = peer.timeout
        self.ae.dimse_timeout = peer.timeout
        self.ae.network_timeout = peer.timeout
        self.ae.maximum_pdu_size = 0  # no limit from our side
        self._links = _Links(associations)
        self._keys: set[tuple[str, str]] = set()
        """Every (SOP class, transfer syntax) seen: a renewed association proposes them all."""
        self._lock = threading.Lock()
        self._find_refused = False
        self._reports = commitment.Reports()
        self._unrequested: list[Outcome] = []
        """Stored, and not yet named in a storage commitment request."""
        self._requested: dict[str, Sequence[Outcome]] | None = {}
        """Early storage commitment requests by Transaction UID; ``None`` once one failed
        (the proof then asks for every instance again, as if none had been made)."""
        self.down_reason: str | None = None
        """Set when the peer accepts no association any more: nothing more is tried."""

    # -- associations ---------------------------------------------------------------

    def _associate(self, contexts: list[PresentationContext], fatal: bool = True) -> Association:
        """An association with the peer; a refusal ends the run (exit 3) when ``fatal``,
        else raises :class:`ConnectionError` with the reason (a peer that stores but
        refuses an association for another service)."""
        rejection: list[str] = []

        def on_acse(event: Any) -> None:
            primitive = event.primitive
            if getattr(primitive, "result", None) in (0x01, 0x02):
                rejection.append(f"{primitive.reason_str} ({primitive.source_str})")

        tls = (self.peer.tls, self.peer.host) if self.peer.tls is not None else None
        assoc = self.ae.associate(
            self.peer.host,
            self.peer.port,
            contexts=contexts,
            ae_title=self.peer.called_aet,
            tls_args=tls,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, _no_delay),
                (evt.EVT_ACSE_RECV, on_acse),
                (evt.EVT_N_EVENT_REPORT, self._reports.on_event_report),
            ],
        )
        if assoc.is_established:
            keep_responses(assoc)
            return assoc
        if assoc.is_rejected:
            reason = rejection[0] if rejection else "no reason given"
            if not fatal:
                raise ConnectionError(f"association rejected: {reason}")
            raise PipelineError(
                f"{self.description} rejected the association: {reason}; check --called-aet "
                f"and that the peer knows our AE title {self.peer.calling_aet!r}",
                EXIT_ENVIRONMENT,
            )
        raise ConnectionError(f"no association with {self.description}")

    def check(self) -> None:
        """C-ECHO once: an unreachable peer or a refused association ends the run."""
        try:
            assoc = self._associate([build_context(Verification)])
        except ConnectionError:
            raise PipelineError(
                f"{self.description} unreachable (no DICOM association)", EXIT_ENVIRONMENT
            ) from None
        try:
            if assoc.accepted_contexts:
                assoc.send_c_echo()
        finally:
            assoc.release()
        if self.peer.listen_port:
            self._serve_reports()

    def _ready(self, link: _Link, needed: set[tuple[str, str]]) -> Association:
        """``link``'s association, renewed when it lacks a context ``needed`` or was lost;
        a new one proposes every pair seen so far, so that it is seldom renewed again."""
        alive = link.assoc is not None and link.assoc.is_established
        if alive and needed <= link.keys:
            assert link.assoc is not None
            return link.assoc
        if alive:
            assert link.assoc is not None
            link.assoc.release()
        with self._lock:
            self._keys |= needed
            keys = set(self._keys)
        if len(keys) > MAX_CONTEXTS - 2:  # two are C-FIND's and storage commitment's
            keys = set(needed)
        link.keys = keys
        link.assoc = self._associate(_contexts_for(keys))
        return link.assoc

    # -- C-STORE ---------------------------------------------------------------------

    def store(self, batch: Sequence[Checked]) -> list[Outcome]:
        """Send ``batch`` on an association of the pool. A lost association is renewed
        once; when the peer then accepts none, it is taken as down: this file and every
        later one fail at once, not sent, for a rerun to send."""
        needed = {(c.sop_class_uid, c.transfer_syntax) for c in batch}
        outcomes = []
        link = self._links.take()
        try:
            for checked in batch:
                if self.down_reason is not None:
                    outcomes.append(checked.outcome(SEND_FAILED, f"not sent: {self.down_reason}"))
                    continue
                try:
                    assoc = self._ready(link, needed)
                except ConnectionError as exc:
                    self._went_down(str(exc))
                    outcomes.append(checked.outcome(SEND_FAILED, f"not sent: {exc}"))
                    continue
                outcomes.append(self._store_one(assoc, checked))
        finally:
            self._links.give(link)
        with self._lock:
            self._unrequested.extend(o for o in outcomes if o.status == STORED)
        return outcomes

    def _went_down(self, reason: str) -> None:
        with self._lock:
            if self.down_reason is not None:
                return
            self.down_reason = f"{self.description} stopped answering"
        log.error(
            "%s stopped answering (%s); files not yet sent are marked failed without "
            "further attempts",
            self.description,
            reason,
        )

    def _store_one(self, assoc: Association, checked: Checked) -> Outcome:
        try:
            status = send_c_store(assoc, checked)
        except ValueError as exc:  # no accepted presentation context for it
            return checked.outcome(
                REJECTED,
                f"the peer accepts no lossless way to receive it ({checked.transfer_syntax}): "
                f"{exc}",
            )
        except (RuntimeError, OSError) as exc:
            return checked.outcome(SEND_FAILED, f"association lost: {exc}; run again")
        code = status.get("Status") if status else None
        if code is None:
            # No answer within the timeout, or the connection closed: this association is
            # done for (the next file opens a new one, or finds the peer down).
            assoc.abort()
            return checked.outcome(SEND_FAILED, "no C-STORE answer (association lost); run again")
        if code == 0x0000:
            return checked.outcome(STORED)
        if code in WARNINGS:
            return checked.outcome(STORED, f"stored with warning 0x{code:04X} ({WARNINGS[code]})")
        comment = status.get("ErrorComment", "")
        return checked.outcome(
            REJECTED, f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")
        )

    # -- C-FIND ----------------------------------------------------------------------

    def held(self, checked: Sequence[Checked]) -> set[str]:
        """A C-FIND on an association of the pool, which is then ready to send these
        files too (it proposes their contexts)."""
        if self.down_reason is not None or self._find_refused:
            return set()
        needed = {(c.sop_class_uid, c.transfer_syntax) for c in checked}
        series = sorted({(c.study_uid, c.series_uid) for c in checked})
        link = self._links.take()
        try:
            assoc = self._ready(link, needed)
            self._commit_early(assoc)
            if not _accepts(assoc, StudyRootQueryRetrieveInformationModelFind):
                self._find_refused = True
                log.info(
                    "%s answers no C-FIND: nothing is checked before sending", self.description
                )
                return set()
            return find_instances(assoc, series)
        except ConnectionError as exc:
            self._went_down(str(exc))
            return set()
        except (RuntimeError, OSError) as exc:  # the association ended under the query
            log.warning("%s: C-FIND cut short: %s", self.description, exc)
            return set()
        finally:
            self._links.give(link)

    def _find(self, series: set[tuple[str, str]]) -> set[str] | None:
        """The SOP Instance UIDs the peer holds in each (study, series); ``None`` when it
        answers no C-FIND (its refusal is logged once)."""
        if self._find_refused:
            return None
        try:
            assoc = self._associate(
                [build_context(StudyRootQueryRetrieveInformationModelFind)], fatal=False
            )
        except ConnectionError as exc:
            self._find_refused = True
            log.info(
                "%s answers no C-FIND (%s): nothing is checked before sending",
                self.description,
                exc,
            )
            return None
        found: set[str] = set()
        try:
            if not assoc.accepted_contexts:
                self._find_refused = True
                log.info(
                    "%s answers no C-FIND: nothing is checked before sending", self.description
                )
                return None
            found = find_instances(assoc, sorted(series))
        except (RuntimeError, OSError) as exc:  # the association ended under the query
            log.warning("%s: C-FIND cut short: %s", self.description, exc)
            return None
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    # -- storage commitment ------------------------------------------------------------

    def _serve_reports(self) -> None:
        local = self.peer.host in ("127.0.0.1", "localhost")
        address = ("127.0.0.1" if local else "0.0.0.0", int(self.peer.listen_port or 0))
        self._reports.serve(self.peer.calling_aet, address, self.peer.timeout, self.peer.tls_server)

    def prove(self, report: Report) -> None:
        # The sending is over: a peer that serves one association at a time (storescp)
        # would otherwise keep the next one waiting for as long as these stay open.
        self._release_links()
        sent = [o for o in report.outcomes if o.sent]
        if not sent:
            return
        if self.down_reason is not None:
            report.verification_note = "the peer stopped answering before verification"
            return
        why_not = self._commit(sent, report)
        if why_not is None:
            return
        series = {(o.study_uid, o.series_uid) for o in sent}
        found = self._find(series)
        if found is not None:
            log.info("%s: %s; proving by C-FIND at IMAGE level instead", self.description, why_not)
            report.found_by_search(sent, found, BY_CFIND, "a C-FIND")
            return
        if not self._find_refused:
            for outcome in sent:
                outcome.problems.append(f"could not verify: {why_not}, and the C-FIND failed")
            return
        log.warning(
            "%s: %s, and it answers no C-FIND: only its C-STORE status says the files landed",
            self.description,
            why_not,
        )
        for outcome in sent:
            outcome.verified = True
        report.checked_by[BY_STATUS] = len(sent)

    def _commit_early(self, assoc: Association) -> None:
        """Ask for storage commitment of the instances stored since the last request, on an
        association of the pool, while the rest is being sent: the peer's reports then
        come in during the sending rather than after it (Orthanc answers an N-ACTION after
        0.5 to 0.9 s, measured with ``bench/bench_targets.py``: that much off every run).
        Only with ``listen_port``, where a report comes on an association of the peer's
        own: one meant for this association could come after it is released."""
        if not self.peer.listen_port or self._requested is None:
            return
        with self._lock:
            part, self._unrequested = self._unrequested, []
        if not part:
            return
        if not _accepts(assoc, StorageCommitmentPushModel):
            self._requested = None
            return
        transactions, refused = commitment.request(assoc, part)
        if refused is not None:
            self._requested = None
            return
        self._requested.update(transactions)

    def _commit(self, sent: Sequence[Outcome], report: Report) -> str | None:
        """Ask the peer to commit to every instance in ``sent`` not yet asked about (all of
        them when an early request failed); ``None`` when it answered, else why not."""
        transactions: dict[str, Sequence[Outcome]] = dict(self._requested or {})
        asked = {id(o) for part in transactions.values() for o in part}
        rest = [o for o in sent if id(o) not in asked]
        if rest:
            try:
                assoc = self._associate([build_context(StorageCommitmentPushModel)], fatal=False)
            except ConnectionError as exc:
                return f"it accepts no association for storage commitment ({exc})"
            try:
                if not assoc.accepted_contexts:
                    return "it refuses storage commitment"
                more, refused = commitment.request(assoc, rest)
                if refused is not None:
                    return refused
                transactions.update(more)
            finally:
                if assoc.is_established:
                    assoc.release()
        missing = self._reports.wait(set(transactions), self.peer.timeout)
        if missing:
            return f"no N-EVENT-REPORT within {self.peer.timeout:.0f} s"
        for uid, part in transactions.items():
            commitment.judge(self._reports.get(uid), part, report)
        return None

    def _release_links(self) -> None:
        for link in self._links.every:
            if link.assoc is not None and link.assoc.is_established:
                link.assoc.release()
            link.assoc = None

    def close(self) -> None:
        self._release_links()
        self._reports.close()


def _accepts(assoc: Association, abstract_syntax: str) -> bool:
    """Whether the peer accepted a presentation context for ``abstract_syntax``."""
    return any(c.abstract_syntax == abstract_syntax for c in assoc.accepted_contexts)


def _no_delay(event: Any) -> None:
    """Send each PDU at once (TCP_NODELAY). pynetdicom writes a C-STORE's command and its
    data set as separate PDUs: with Nagle's algorithm the second waits for the peer's
    delayed ACK of the first, about 40 ms per instance on Linux (measured: 100 ms per
    C-STORE of a small file on loopback without this, a few ms with it)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
