"""The Orthanc queries ``watch_orthanc.py`` relies on, and what it reads from its own SRs.

A handful of REST requests over the shared pooled client (:class:`OrthancIndex`): the
change log, the CR/DX series, a series' instances, a UID lookup, an SR's evidence and an
instance's file. Anything but 200 (or 404 where absence is an answer) is an
:class:`OrthancError`, which the watcher's loop treats as an outage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cxrsr.pacs.orthanc import OrthancClient

#: The modalities the model was trained on; every other series is left alone.
RADIOGRAPH_MODALITIES = ("CR", "DX")

#: Changes read from ``/changes`` per request.
CHANGES_PAGE = 100


class OrthancError(Exception):
    """Orthanc answered something unexpected for a request the watcher relies on."""


@dataclass(frozen=True)
class Instance:
    """One image in Orthanc, as the watcher knows it before fetching it."""

    orthanc_id: str
    sop_instance_uid: str
    series_instance_uid: str


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
