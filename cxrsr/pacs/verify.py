"""Prove that what Orthanc acknowledged arrived: present, intact, and in the right study.

:func:`verify` runs after :func:`cxrsr.pacs.upload.upload` (``upload_dicom.py`` and the
watcher): it asks Orthanc for the MD5 it keeps of each stored file
(``GET /instances/{id}/attachments/dicom/md5``) and compares it with the MD5 of the bytes
sent; an Orthanc that keeps no MD5 (``"StoreMD5ForAttachments": false``) has each file read
back and hashed instead. It also checks that each object derived from an image (an SR, a
key image) sits in the same Orthanc study and patient as the image it references.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from cxrsr.pacs.orthanc import OrthancClient, OrthancUnavailable
from cxrsr.pacs.upload import (
    ALREADY_STORED,
    BY_READING_BACK,
    BY_STORED_MD5,
    Outcome,
    Placement,
    Report,
    in_parallel,
)

log = logging.getLogger("cxrsr")


def verify(outcomes: Iterable[Outcome], client: OrthancClient, workers: int = 8) -> Report:
    """Check through Orthanc's API that every acknowledged instance is there, intact.

    * presence and integrity: the ``dicom`` attachment's MD5 must equal the MD5 of the
      bytes sent. For ``already stored`` a different MD5 means Orthanc holds another
      file under the same SOP Instance UID (it keeps the first one,
      ``"OverwriteInstances": false``), so what was sent is not what the PACS has.
      An Orthanc configured with ``"StoreMD5ForAttachments": false`` records no MD5
      (the request answers 404 although the instance exists): the stored file is then
      read back and hashed, the same proof at the cost of a download. The first such
      404 is remembered on ``client``, so every later file goes straight to reading back.
    * placement: each derived object's (SR, key image; :data:`DERIVED_KINDS`) Orthanc
      study and patient must be those of the images it references (Orthanc derives its
      IDs from PatientID and the DICOM UIDs, so an SR with a different PatientID would
      land in a study of its own).

    Requests run in parallel; a GET is cheap for Orthanc and, across a network, each
    costs a round trip that parallelism hides.
    """
    report = Report(list(outcomes))
    sent = [o for o in report.outcomes if o.sent and o.instance_id]
    for outcome in report.outcomes:
        if outcome.sent and not outcome.instance_id:
            outcome.problems.append(
                "Orthanc's answer named no instance ID, so it cannot be checked"
            )
    if not sent:
        return report
    if client.is_down:
        report.verification_note = "Orthanc stopped answering before verification"
        return report
    by_id: dict[str, list[Outcome]] = {}
    for outcome in sent:
        by_id.setdefault(str(outcome.instance_id), []).append(outcome)
    derived = [o for o in sent if o.derived]
    instance_ids = list(by_id)

    def judge(index: int, result: _StoredCopy | BaseException) -> None:
        checked = by_id[instance_ids[index]]
        if isinstance(result, BaseException):
            for outcome in checked:
                outcome.problems.append(f"could not verify: {result}")
            return
        if result.md5 is not None:
            report.checked_by[result.method] = report.checked_by.get(result.method, 0) + 1
        for outcome in checked:
            _judge_md5(outcome, result.md5, result.sop_instance_uid)

    def place(index: int, result: tuple[str, str] | BaseException) -> None:
        outcome = derived[index]
        if isinstance(result, BaseException):
            verdict, message = _UNCHECKED, f"could not check the study: {result}"
        else:
            verdict, message = result
        placement = report.placements.setdefault(str(outcome.derived), Placement())
        placement.checked += 1
        if verdict == _IN_PLACE:
            placement.in_source_study += 1
        elif verdict == _SOURCE_MISSING:
            placement.source_missing += 1
            log.warning("%s: %s", outcome.name, message)
        else:
            placement.misplaced += 1
            outcome.problems.append(message)

    expected = (OrthancUnavailable,)
    stored_copy = lambda i: _stored_copy(client, i, by_id[i])  # noqa: E731
    in_parallel(stored_copy, instance_ids, workers, judge, expected)
    in_parallel(lambda o: _placement(o, client), derived, workers, place, expected)
    return report


@dataclass
class _StoredCopy:
    """What Orthanc holds under one instance ID, as far as verification needs it."""

    md5: str | None
    """The stored file's MD5; ``None`` when the instance is not in Orthanc."""
    method: str
    """How the MD5 was had: :data:`BY_STORED_MD5` or :data:`BY_READING_BACK`."""
    sop_instance_uid: str = ""
    """Its SOP Instance UID, fetched only when some sender's MD5 differs."""


#: Makes the switch to reading back (and its log line) happen once per client.
_method_lock = threading.Lock()


def _stored_copy(client: OrthancClient, instance_id: str, outcomes: list[Outcome]) -> _StoredCopy:
    """The stored file's MD5, by the cheapest proof this Orthanc offers, and its SOP
    Instance UID when some sender's MD5 differs.

    One request in the common case: the recorded MD5, or, from an Orthanc known to
    keep none, the file itself. The UID costs a request only for a mismatch.
    """
    copy = None
    if client.keeps_md5 is not False:
        stored_md5 = client.attachment_md5(instance_id)
        if stored_md5 is not None:
            if client.keeps_md5 is None:
                client.keeps_md5 = True
            copy = _StoredCopy(stored_md5, BY_STORED_MD5)
    if copy is None:
        # No MD5: the instance is gone, or Orthanc keeps none. Reading it back tells which.
        read_back = client.stored_file_md5(instance_id)
        if read_back is None:
            return _StoredCopy(None, BY_READING_BACK)
        if client.keeps_md5 is not False:
            _keeps_no_md5(client)
        copy = _StoredCopy(read_back[0], BY_READING_BACK)
    if all(o.md5 == copy.md5 for o in outcomes):
        return copy
    answer = client.request("GET", f"/instances/{instance_id}")
    if answer.status == 200:
        copy.sop_instance_uid = str(
            answer.json().get("MainDicomTags", {}).get("SOPInstanceUID", "")
        )
    return copy


def _keeps_no_md5(client: OrthancClient) -> None:
    """Remember that ``client``'s Orthanc keeps no MD5, and say so once."""
    with _method_lock:
        if client.keeps_md5 is False:
            return
        client.keeps_md5 = False
    log.info(
        'Orthanc at %s keeps no MD5 of stored files ("StoreMD5ForAttachments": false): '
        "verifying each by reading it back",
        client.url,
    )


def _judge_md5(outcome: Outcome, stored_md5: str | None, sop_instance_uid: str) -> None:
    if stored_md5 is None:
        outcome.problems.append(
            f"Orthanc acknowledged it ({outcome.status}) but instance {outcome.instance_id} "
            "is not there now"
        )
    elif stored_md5 == outcome.md5:
        outcome.verified = True
    elif outcome.status == ALREADY_STORED:
        outcome.problems.append(
            f"Orthanc already held a different file with SOP Instance UID {sop_instance_uid} "
            f"(Orthanc ID {outcome.instance_id}; stored MD5 {stored_md5}, sent {outcome.md5}); "
            "Orthanc keeps the first copy, so these bytes are not in Orthanc"
        )
    else:
        outcome.problems.append(
            f"stored file differs from the file sent (stored MD5 {stored_md5}, sent {outcome.md5})"
        )


#: Verdicts of :func:`_placement`.
_IN_PLACE = "in place"
_SOURCE_MISSING = "source missing"
_MISPLACED = "misplaced"
_UNCHECKED = "unchecked"


def _placement(outcome: Outcome, client: OrthancClient) -> tuple[str, str]:
    """Whether a derived object shares an Orthanc study and patient with the images it
    references, and why not.

    A source that is not in Orthanc is a warning (it may be uploaded later); an object
    in another study or patient than its source is an error.
    """
    what = "SR" if outcome.derived == "SRs" else "object"
    if not outcome.references:
        return _SOURCE_MISSING, (
            f"the {what} names no source image, so its study cannot be checked"
        )
    for uid in outcome.references:
        candidates = client.lookup_instances(uid)
        if not candidates:
            return _SOURCE_MISSING, (
                f"source instance {uid} is not in Orthanc, so the {what}'s study cannot be checked"
            )
        places = [client.study_of_instance(c) for c in candidates]
        if (outcome.study_id, outcome.patient_id) not in places:
            found = ", ".join(f"study {p[0]} of patient {p[1]}" for p in places if p)
            return _MISPLACED, (
                f"{what} is in Orthanc study {outcome.study_id} of patient {outcome.patient_id}, "
                f"but its source {uid} is in {found or 'no study'}"
            )
    return _IN_PLACE, ""
