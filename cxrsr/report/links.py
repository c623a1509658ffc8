"""Links from the report into Orthanc Explorer, computed offline.

Orthanc names every study by a public identifier derived from DICOM identity alone: the
SHA-1 of ``PatientID|StudyInstanceUID``, written as five groups of eight hex digits
(Orthanc's ``DicomInstanceHasher``; the tests check it against a real Orthanc). The
report can therefore link to a study without asking the server, and the link works as
soon as the study is uploaded.
"""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit, urlunsplit


def orthanc_study_id(patient_id: str, study_instance_uid: str) -> str:
    """Orthanc's public ID of the study ``study_instance_uid`` of patient ``patient_id``.

    An image without PatientID hashes as the empty string, as Orthanc does.
    """
    digest = hashlib.sha1(f"{patient_id}|{study_instance_uid}".encode()).hexdigest()
    return "-".join(digest[i : i + 8] for i in range(0, 40, 8))


def public_base_url(orthanc_url: str) -> str:
    """``orthanc_url`` without credentials or a trailing slash.

    ``ORTHANC_URL`` may be ``http://user:password@host:port``; a report is shared, so the
    password must never reach it. The browser asks for the login instead.
    """
    parts = urlsplit(orthanc_url.strip())
    if not parts.scheme or not parts.hostname:
        raise ValueError(f"not an absolute URL: {orthanc_url!r}")
    host = parts.hostname
    if ":" in host:  # an IPv6 literal goes back in brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def explorer_study_url(orthanc_url: str, patient_id: str, study_instance_uid: str) -> str:
    """The study's page in Orthanc Explorer (the classic ``/app/explorer.html``)."""
    study = orthanc_study_id(patient_id, study_instance_uid)
    return f"{public_base_url(orthanc_url)}/app/explorer.html#study?uuid={study}"
