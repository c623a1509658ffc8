"""Storage Commitment Push Model (PS3.4 Annex J) as an SCU: the proof of a DIMSE upload.

An N-ACTION names the instances the peer acknowledged (:func:`request`); the peer's
N-EVENT-REPORT says which it has committed to keep. That report comes on our own
association, or on a new one the peer opens to us (Orthanc opens one to the modality
registered for our AE title): :class:`Reports` takes it either way.
"""

from __future__ import annotations

import socketserver
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from cxrsr.pacs.upload import Outcome, Report

#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
#: Instances named in one N-ACTION request.
COMMIT_BATCH = 500
#: Seconds between the report server's checks for shutdown.
SERVER_POLL = 0.02

BY_COMMITMENT = "storage commitment"


class Reports:
    """The N-EVENT-REPORTs received, by Transaction UID."""

    def __init__(self) -> None:
        self._reports: dict[str, Dataset] = {}
        self._reported = threading.Condition()
        self._server: ThreadedAssociationServer | None = None

    def on_event_report(self, event: Any) -> tuple[int, None]:
        """pynetdicom's ``EVT_N_EVENT_REPORT`` handler, on any association."""
        info = event.event_information
        with self._reported:
            self._reports[str(info.get("TransactionUID", ""))] = info
            self._reported.notify_all()
        return 0x0000, None

    def serve(
        self, ae_title: str, address: tuple[str, int], timeout: float, tls: ssl.SSLContext | None
    ) -> None:
        """Accept the peer's N-EVENT-REPORT on an association it opens to ``address``."""
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        ae.network_timeout = timeout
        server = ae.make_server(
            address,
            ssl_context=tls,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.on_event_report)],
            server_class=ThreadedAssociationServer,
        )
        # Our own thread rather than start_server's: its poll interval, socketserver's
        # default 0.5 s, is what shutting the server down waits for (measured: close()
        # took 0.4 s of every run's 5 to 9 s with it).
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": SERVER_POLL},
            name="cxrsr-commitment-server",
            daemon=True,
        ).start()
        self._server = server

    def wait(self, transactions: set[str], timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds for a report on each transaction; those missing."""
        deadline = time.monotonic() + timeout
        with self._reported:
            while not transactions <= set(self._reports):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._reported.wait(left)
            return transactions - set(self._reports)

    def get(self, transaction: str) -> Dataset:
        with self._reported:
            return self._reports[transaction]

    def close(self) -> None:
        if self._server is not None:
            # socketserver's own shutdown: pynetdicom's also unlists the server from the
            # AE's start_server list, which this one (made by make_server) is not on.
            socketserver.BaseServer.shutdown(self._server)
            self._server.server_close()
            self._server = None


def request(
    assoc: Association, sent: Sequence[Outcome]
) -> tuple[dict[str, Sequence[Outcome]], str | None]:
    """N-ACTION requests naming every instance in ``sent``, :data:`COMMIT_BATCH` a time:
    the outcomes by Transaction UID, and why not when the peer refused one."""
    transactions: dict[str, Sequence[Outcome]] = {}
    for start in range(0, len(sent), COMMIT_BATCH):
        part = sent[start : start + COMMIT_BATCH]
        action = Dataset()
        action.TransactionUID = generate_uid()
        action.ReferencedSOPSequence = [_reference(o) for o in part]
        status, _reply = assoc.send_n_action(
            action, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
        )
        if not status or status.Status != 0x0000:
            code = f"0x{status.Status:04X}" if status else "no answer"
            return transactions, f"it refused the storage commitment request ({code})"
        transactions[action.TransactionUID] = part
    return transactions, None


def judge(info: Dataset, part: Sequence[Outcome], report: Report) -> None:
    """Each outcome of ``part`` verified or not by the report ``info``."""
    committed = {
        str(item.get("ReferencedSOPInstanceUID", ""))
        for item in info.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
        for item in info.get("FailedSOPSequence", [])
    }
    for outcome in part:
        uid = outcome.sop_instance_uid
        if uid in committed:
            outcome.verified = True
            report.checked_by[BY_COMMITMENT] = report.checked_by.get(BY_COMMITMENT, 0) + 1
        elif uid in failed:
            code = failed[uid]
            reason = f"0x{code:04X}" if isinstance(code, int) else "no reason given"
            outcome.problems.append(
                f"the PACS refused to commit to storing it (Failure Reason {reason})"
            )
        else:
            outcome.problems.append("the storage commitment report does not name it")


def _reference(outcome: Outcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    return item
