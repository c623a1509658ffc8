"""Deterministic, PS3.5-valid UIDs for the DICOM objects this project writes.

The rule every object obeys (PS3.3 C.12.1.1.1: a SOP Instance UID names one instance,
and an instance never changes): its SOP Instance UID is derived from a digest of
everything the object contains except that UID (:func:`content_uid`). Two objects share
a UID only if they are the same bytes, whoever made them and whenever: the same results
give the same file, and anything that reaches the bytes (a score, the classification
time, a value copied from the source, a new content item, a library upgrade that encodes
differently) gives a new instance. This holds by construction, so content added later
needs no change here.

So the bytes must depend on nothing but the results file and the source, never on the
host or on the running package: "a SOP Instance UID names exactly one byte stream,
forever, on any host", and a rerun of the same results on another machine, or after an
upgrade, must name the same instances (else a PACS holds a second SR per image). Times
come from the results and the source, never the host's zone (:mod:`cxrsr.sr.times`).
The package version (``cxrsr.__version__``) is in no object: it changes with releases that
leave the objects alone, and as Software Versions it would give every release new UIDs
for unchanged content (or, were it kept out of the UID, one UID for two byte streams).
Software Versions carries :data:`ENCODING_VERSION` instead (:func:`software_versions`),
which is bumped exactly when a change to this project changes the bytes it writes for
the same results: the new bytes then hold the new number, and the digest gives them new
UIDs. A library upgrade that changes the encoding (highdicom and pydicom record their
versions in the files they write) gives new bytes, hence new UIDs, by construction.

Series UIDs are different: a series groups instances and may grow, so it is derived from
what it groups (:func:`sr_series_uid`).

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

import copy
import hashlib
import io
import json
import struct
import uuid
from collections.abc import Callable, Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import VR

#: PS3.5 B.2: the root under which UUID-derived UIDs live.
UUID_ROOT = "2.25."

#: The namespace of every name-based UUID this project derives (itself a UUIDv5 of a URL,
#: so it cannot collide with another project's namespace by accident).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/cxrsr/cxrsr/uids")

#: The version of what this project encodes: bump it with any change that alters the bytes
#: of an SR or key image written from the same results (a new content item, another
#: value, another layout), and only then. It is written as Software Versions
#: (:func:`software_versions`), so it is part of every content digest.
ENCODING_VERSION = 1

#: PS3.5 9.1: at most 64 characters in all.
UID_MAX_LENGTH = 64

#: The value an object's own UID takes while its content digest is computed
#: (:func:`content_uid`). Any fixed valid UID would do; this one is short and obviously
#: not a real instance's.
CONTENT_UID_PLACEHOLDER = "2.25.0"


def software_versions() -> str:
    """Software Versions (0018,1020) of the SRs and key images: the encoding, not the
    package release (see the module docstring)."""
    return f"cxrsr encoding {ENCODING_VERSION}"


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a UID as PS3.5 9.1 defines it, or ``None`` if it is one.

    A UID is components of digits separated by dots, no component empty and none with a
    leading zero (a lone "0" is allowed), at most 64 characters in all. The one rule for
    every UID this project reads or writes: reading refuses a source whose UIDs break it
    (an SR could not reference the image), the SR builder refuses such a results entry.
    Not ``pydicom.uid.UID.is_valid``: pydicom 3.0 matches ``^...$`` with ``re.match``, and
    ``$`` also matches before a trailing newline, so it calls "1.2.3\\n" valid.
    """
    if not value:
        return "is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"has {len(value)} characters (at most {UID_MAX_LENGTH})"
    others = sorted(set(value) - set("0123456789."))
    if others:
        shown = ", ".join(repr(c) for c in others[:3])
        return f"holds characters other than digits and dots ({shown})"
    for component in value.split("."):
        if not component:
            return "has an empty component"
        if len(component) > 1 and component.startswith("0"):
            return f"has a component with a leading zero ({component!r})"
    return None


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 9.1 defines it (:func:`uid_problem`)."""
    return uid_problem(value) is None


def derive_uid(purpose: str, parts: Iterable[str]) -> str:
    """A UID that depends on ``purpose`` and ``parts`` only, and on nothing else.

    ``purpose`` keeps UIDs for different things apart (a series UID never equals an instance
    UID made from the same inputs). The parts are joined as a JSON array, so
    ``("1.2", "3")`` and ``("1", "2.3")`` give different UIDs.
    """
    name = json.dumps([purpose, *parts], ensure_ascii=False, separators=(",", ":"))
    return f"{UUID_ROOT}{uuid.uuid5(NAMESPACE, name).int}"


def content_uid(purpose: str, encode: Callable[[str], bytes]) -> tuple[str, bytes]:
    """An object's SOP Instance UID derived from its complete content, and its bytes.

    ``encode(uid)`` returns the object's file, byte for byte as it will be written, with
    ``uid`` as its own SOP Instance UID. It must depend on ``uid`` only through values
    computed from it (the SOP Instance UID, Media Storage SOP Instance UID, UIDs derived
    from it such as an SR's Tracking Unique Identifiers). The UID is derived from the
    SHA-256 of ``encode(CONTENT_UID_PLACEHOLDER)``, i.e. of everything else the object
    holds, file meta included; so one UID always names one byte stream.

    Returns ``(uid, encode(uid))``. Costs two encodings, which is the price of the rule.
    """
    digest = hashlib.sha256(encode(CONTENT_UID_PLACEHOLDER)).hexdigest()
    uid = derive_uid(purpose, [digest])
    return uid, encode(uid)


def encode_with_content_uid(
    dataset: Dataset,
    purpose: str,
    set_derived: Callable[[Dataset, str], None] | None = None,
) -> tuple[str, bytes]:
    """:func:`content_uid` for a pydicom dataset written as a PS3.10 file.

    Sets SOP Instance UID and Media Storage SOP Instance UID (``dataset.file_meta`` must
    exist), calls ``set_derived(dataset, uid)`` for anything else computed from the UID,
    and encodes with ``save_as(enforce_file_format=True)``. Leaves ``dataset`` carrying
    the final UID; returns ``(uid, file bytes)``.

    When Pixel Data is the data set's last element (a key image: 4 MB of RGB), it is
    encoded once: the file is the other elements' bytes followed by Pixel Data's own
    encoding, and the digest is taken over the same sequence of bytes. Measured on key
    images, this halves the cost of the two encodings (7 ms to 3.5 ms). Without
    ``set_derived``, the other elements are encoded once too: the final UIDs are spliced
    into the placeholder's bytes (:func:`respliced`). ``tests/test_uids.py`` checks the
    bytes against ``save_as`` of the whole data set, twice.
    """

    def encode(uid: str) -> bytes:
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = UID(uid)
        if set_derived is not None:
            set_derived(dataset, uid)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    def encode_final(placeholder_file: bytes, uid: str) -> bytes:
        # With nothing derived from the UID, the final file differs from the placeholder's
        # only in the two UID elements (and the meta group's length): splice them in
        # instead of encoding the header again (a key image's header costs ~2 ms, with
        # the GIL held). Anything unexpected takes the whole encoding.
        if set_derived is None:
            spliced = respliced(placeholder_file, uid)
            if spliced is not None:
                dataset.SOPInstanceUID = uid
                dataset.file_meta.MediaStorageSOPInstanceUID = UID(uid)
                return spliced
        return encode(uid)

    pixel_data = _last_pixel_data(dataset)
    if pixel_data is None:
        first = encode(CONTENT_UID_PLACEHOLDER)
        uid = derive_uid(purpose, [hashlib.sha256(first).hexdigest()])
        return uid, encode_final(first, uid)
    tail = _encode_element(pixel_data)
    original = dataset[PIXEL_DATA]  # as given: its VR may still be "OB or OW"
    del dataset[PIXEL_DATA]
    try:
        first = encode(CONTENT_UID_PLACEHOLDER)
        digest = hashlib.sha256(first)
        digest.update(tail)
        uid = derive_uid(purpose, [digest.hexdigest()])
        return uid, encode_final(first, uid) + tail
    finally:
        dataset[PIXEL_DATA] = original


def _ui_element(group: int, element: int, uid: str) -> bytes:
    """A UI element in explicit VR little endian, padded to even length with NUL (PS3.5 6.2)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HH2sH", group, element, b"UI", len(value)) + value


def respliced(placeholder_file: bytes, uid: str) -> bytes | None:
    """A PS3.10 file written with :data:`CONTENT_UID_PLACEHOLDER` as its SOP Instance UID and
    Media Storage SOP Instance UID, with ``uid`` in both instead; ``None`` when the file is
    not laid out as expected (each element exactly once, explicit VR little endian).

    Byte for byte what writing the data set again with ``uid`` gives: the elements are
    the same but for those two values, and the file meta group's length is adjusted
    (``tests/test_uids.py`` compares the two for UIDs of odd and even length).
    """
    old_meta = _ui_element(0x0002, 0x0003, CONTENT_UID_PLACEHOLDER)
    old_sop = _ui_element(0x0008, 0x0018, CONTENT_UID_PLACEHOLDER)
    preamble = 128
    if placeholder_file[preamble : preamble + 4] != b"DICM":
        return None
    start = preamble + 4
    if placeholder_file[start : start + 8] != b"\x02\x00\x00\x00UL\x04\x00":
        return None  # no (0002,0000) File Meta Information Group Length first
    (length,) = struct.unpack("<I", placeholder_file[start + 8 : start + 12])
    meta_start = start + 12
    meta = placeholder_file[meta_start : meta_start + length]
    body = placeholder_file[meta_start + length :]
    if len(meta) != length or meta.count(old_meta) != 1 or body.count(old_sop) != 1:
        return None
    meta = meta.replace(old_meta, _ui_element(0x0002, 0x0003, uid))
    return b"".join(
        [
            placeholder_file[: start + 8],
            struct.pack("<I", len(meta)),
            meta,
            body.replace(old_sop, _ui_element(0x0008, 0x0018, uid)),
        ]
    )


#: (7FE0,0010) Pixel Data.
PIXEL_DATA = BaseTag(0x7FE00010)


def _last_pixel_data(dataset: Dataset) -> DataElement | None:
    """Pixel Data, when it is the last element and its encoding needs no other element
    (native, explicit VR little endian, OB or OW), with the VR it will be written with;
    otherwise ``None``.

    highdicom leaves Pixel Data's VR as "OB or OW" for pydicom to settle when it writes
    (PS3.5 A.2: OW when Bits Allocated > 8, else OB); it is settled here the same way, by
    pydicom's own function, on a copy.
    """
    if PIXEL_DATA not in dataset or max(dataset.keys()) != PIXEL_DATA:
        return None
    if dataset.file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    element = dataset[PIXEL_DATA]
    if element.VR == VR.OB_OW and "BitsAllocated" in dataset:
        settled = correct_ambiguous_vr_element(copy.copy(element), dataset, True)
        if not isinstance(settled, DataElement):
            return None
        element = settled
    if element.VR not in (VR.OB, VR.OW) or not isinstance(element.value, bytes):
        return None
    return element


def _encode_element(element: DataElement) -> bytes:
    """One element as ``save_as`` writes it in explicit VR little endian."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element)  # OB or OW: no text, no character set
    return buffer.getvalue()


def sr_series_uid(source_series_instance_uid: str, model_id: str, weights_sha256: str) -> str:
    """Series Instance UID of the SR series that holds one source series' SRs for one model.

    The weights digest is part of it: SRs from other weights go to another SR series, so a
    series never mixes two models' opinions about the same image (PS3.3 C.7.3.1: a series
    is instances made by one "equipment"; here the equipment is the model).
    """
    return derive_uid("sr-series", [source_series_instance_uid, model_id, weights_sha256])


#: :func:`content_uid` purpose of the SR documents.
SR_INSTANCE = "sr-instance"

#: :func:`content_uid` purpose of the key images (Secondary Capture).
KEY_IMAGE_INSTANCE = "key-image-instance"


def device_observer_uid(model_id: str, weights_sha256: str) -> str:
    """Device Observer UID (121012, TID 1004) and Device UID of one model with one set of weights."""
    return derive_uid("device", [model_id, weights_sha256])


def tracking_uid(sr_sop_instance_uid: str, label: str) -> str:
    """Tracking Unique Identifier (112040, TID 4108) of one measurement group.

    Derived from the SR's own UID, so no two documents share one (a viewer that loads two
    SRs of one image keeps their findings apart); :func:`content_uid` computes the SR's
    digest with the tracking UIDs of the placeholder.
    """
    return derive_uid("tracking", [sr_sop_instance_uid, label])
