"""C-FIND at IMAGE level (Study Root, PS3.4 C.4.1): which SOP instances a peer holds."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

#: Series named in one C-FIND (a UI value list stays far below its 64 KiB limit).
FIND_BATCH = 256


def find_instances(assoc: Association, series: list[tuple[str, str]]) -> set[str]:
    """The SOP Instance UIDs in each (study, series): one C-FIND at IMAGE level for up to
    :data:`FIND_BATCH` series at a time, their Study and Series Instance UIDs given as
    lists (UID list matching, PS3.4 C.2.2.2.2.2); a peer that refuses a list query is
    asked series by series, the strictly hierarchical query every Query/Retrieve SCP
    answers (PS3.4 C.4.1.2.1)."""
    found: set[str] = set()
    for start in range(0, len(series), FIND_BATCH):
        part = series[start : start + FIND_BATCH]
        answered = _query(assoc, [s for s, _ in part], [s for _, s in part], found)
        if not answered:
            for study, serie in part:
                _query(assoc, [study], [serie], found)
    return found


def _query(assoc: Association, studies: list[str], series: list[str], found: set[str]) -> bool:
    """Add to ``found`` the SOP Instance UIDs in ``series`` of ``studies``; whether the
    peer answered with success."""
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = sorted(set(studies)) if len(set(studies)) > 1 else studies[0]
    query.SeriesInstanceUID = sorted(set(series)) if len(set(series)) > 1 else series[0]
    query.SOPInstanceUID = ""
    final = None
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        final = status.get("Status") if status else None
        if final in (0xFF00, 0xFF01) and identifier:
            found.add(str(identifier.get("SOPInstanceUID", "")))
    return final == 0x0000
