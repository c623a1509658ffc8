"""Deterministic, PS3.5-valid UIDs for the SR documents this project writes.

Why deterministic: the same results must give the same SR UIDs on every run, so uploading
twice stores nothing twice (a PACS keys instances by SOP Instance UID), while changed
results (other weights, other scores) give a new instance.

Why the ``2.25.`` form (PS3.5 B.2, "UUID Derived UID"): it needs no organisational root.
The project owns none, and borrowing pydicom's root (``1.2.826.0.1.3680043.8.498.``, which
``pydicom.uid.generate_uid(prefix=..., entropy_srcs=...)`` would use) would mint UIDs under
an organisation that does not issue them. PS3.5 B.2 lets anyone derive a UID from an ISO/IEC
9834-8 (RFC 4122) UUID; a name-based UUID (version 5, RFC 4122 4.3) is a pure function of
its name, which is exactly the determinism we need. ``2.25.`` + the UUID as one decimal
integer has only digits and dots, no leading zero in any component, and at most
5 + 39 = 44 characters (PS3.5 9.1: at most 64).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable

#: PS3.5 B.2: the root under which UUID-derived UIDs live.
UUID_ROOT = "2.25."

#: The namespace of every name-based UUID this project derives (itself a UUIDv5 of a URL,
#: so it cannot collide with another project's namespace by accident).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/cxrsr/cxrsr/uids")

#: PS3.5 9.1: components of digits without leading zeros (a lone "0" is allowed),
#: separated by dots; at most 64 characters in all.
_UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 9.1 defines it."""
    return len(value) <= UID_MAX_LENGTH and _UID_PATTERN.fullmatch(value) is not None


def derive_uid(purpose: str, parts: Iterable[str]) -> str:
    """A UID that depends on ``purpose`` and ``parts`` only, and on nothing else.

    ``purpose`` keeps UIDs for different things apart (a series UID never equals an instance
    UID made from the same inputs). The parts are joined as a JSON array, so
    ``("1.2", "3")`` and ``("1", "2.3")`` give different UIDs.
    """
    name = json.dumps([purpose, *parts], ensure_ascii=False, separators=(",", ":"))
    return f"{UUID_ROOT}{uuid.uuid5(NAMESPACE, name).int}"


def sr_series_uid(source_series_instance_uid: str, model_id: str, weights_sha256: str) -> str:
    """Series Instance UID of the SR series that holds one source series' SRs for one model.

    The weights digest is part of it: SRs from other weights go to another SR series, so a
    series never mixes two models' opinions about the same image (PS3.3 C.7.3.1: a series
    is instances made by one "equipment"; here the equipment is the model).
    """
    return derive_uid("sr-series", [source_series_instance_uid, model_id, weights_sha256])


def sr_instance_uid(
    source_sop_instance_uid: str,
    model_id: str,
    weights_sha256: str,
    result_digest: str,
    layout_version: str,
) -> str:
    """SOP Instance UID of the SR for one classified image.

    ``result_digest`` covers the scores, the calls and how they were made; ``layout_version``
    is bumped whenever the SR content changes for the same results, so a PACS that already
    holds the old document is given a new instance rather than a silently different one
    under the old UID.
    """
    return derive_uid(
        "sr-instance",
        [source_sop_instance_uid, model_id, weights_sha256, result_digest, layout_version],
    )


def device_observer_uid(model_id: str, weights_sha256: str) -> str:
    """Device Observer UID (121012, TID 1004) and Device UID of one model with one set of weights."""
    return derive_uid("device", [model_id, weights_sha256])


def tracking_uid(sr_sop_instance_uid: str, label: str) -> str:
    """Tracking Unique Identifier (112040, TID 4108) of one measurement group."""
    return derive_uid("tracking", [sr_sop_instance_uid, label])
