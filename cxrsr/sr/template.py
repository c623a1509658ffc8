"""The SR content tree encoded from a per-model template: constant parts once, the rest per image.

Why: for one model, all but a few elements of the TID 1500 content tree are the same in
every document, yet highdicom builds each document's ~740 coded concepts and deep-copies
the tree several times (~140 ms/SR), and pydicom then encodes the nested sequences element
by element (~40 ms/SR). Here a content tree that highdicom built (so its checks ran) is
compiled once per model and character set: every constant content item is encoded once by
pydicom, and per image only the open elements are encoded, again by pydicom, and joined
with the lengths pydicom writes (explicit-length items and sequences, PS3.5 7.5).

Open per image (everything else is constant for a model and its labels):

- in each TID 1501 group: the Tracking Unique Identifier (112040) UID, the score's
  Measured Value Sequence (NumericValue DS, FloatingPointValue FD), the Present/Absent
  CODE item (both variants pre-encoded) and the IMAGE (121112) item;
- at the root: the TID 1600 Image Library item (a whole item, built per image by highdicom).

The byte-identity of this path with the highdicom reference (``cxrsr.sr.tid1500.build_sr_reference``)
is tested on every classifiable corpus file and synthetic variants (tests/test_sr.py), and
checked at run time on the first document of every template (``cxrsr.sr.fast.SRBuilder``).
"""

from __future__ import annotations

import enum
import io
import itertools
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DS

from cxrsr.sr.codes import CERTAINTY_OF_FINDING

#: (0040,A730) Content Sequence, (0040,A300) Measured Value Sequence and the elements in it.
CONTENT_SEQUENCE = 0x0040A730
MEASURED_VALUE_SEQUENCE = 0x0040A300
NUMERIC_VALUE = 0x0040A30A
FLOATING_POINT_VALUE = 0x0040A161
#: (0040,A124) UID, the value of a UIDREF content item.
UID = 0x0040A124

#: PS3.5 7.5: (FFFE,E000) Item tag, little endian.
_ITEM_TAG = b"\xfe\xff\x00\xe0"

TRACKING_UID_CODE = codes.DCM.TrackingUniqueIdentifier.value
SOURCE_OF_MEASUREMENT_CODE = codes.DCM.SourceOfMeasurement.value
IMAGE_LIBRARY_CODE = codes.DCM.ImageLibrary.value
IMAGING_MEASUREMENTS_CODE = codes.DCM.ImagingMeasurements.value


class Slot(enum.Enum):
    """A content item that differs between documents of one template."""

    TRACKING_UID = "tracking-uid"
    SCORE = "score"
    CALL = "call"
    SOURCE_IMAGE = "source-image"
    IMAGE_LIBRARY = "image-library"
    MEASUREMENTS = "measurements"


# --- encoding: pydicom does every element; only items and sequences are joined here ------


def character_encodings(dataset: Dataset) -> tuple[str, ...]:
    """The Python encodings pydicom writes ``dataset``'s text with (filewriter.write_dataset)."""
    declared = dataset.get("SpecificCharacterSet", default_encoding)
    return tuple(convert_encodings(declared or [default_encoding]))


def _buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False  # Explicit VR Little Endian, as highdicom writes SRs
    return fp


def encode_elements(dataset: Dataset, encodings: Sequence[str]) -> bytes:
    """``dataset``'s elements as pydicom encodes an item's body (write_sequence_item)."""
    fp = _buffer()
    write_dataset(fp, dataset, parent_encoding=list(encodings))
    return fp.getvalue()


def encode_element(element: DataElement, encodings: Sequence[str]) -> bytes:
    fp = _buffer()
    write_data_element(fp, element, list(encodings))
    return fp.getvalue()


def item_bytes(body: bytes) -> bytes:
    """A sequence item of defined length, as pydicom writes one (PS3.5 7.5.1)."""
    return _ITEM_TAG + struct.pack("<I", len(body)) + body


def encode_item(item: Dataset, encodings: Sequence[str]) -> bytes:
    _require_defined_length(item)
    return item_bytes(encode_elements(item, encodings))


def sequence_bytes(tag: int, items: Iterable[bytes]) -> bytes:
    """An SQ element of defined length in Explicit VR Little Endian (PS3.5 7.1.2, 7.5.2)."""
    value = b"".join(items)
    return (
        struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        + b"SQ\x00\x00"
        + struct.pack("<I", len(value))
        + value
    )


def _require_defined_length(item: Dataset) -> None:
    """pydicom writes undefined lengths only when asked to; highdicom never asks."""
    if getattr(item, "is_undefined_length_sequence_item", False):
        raise ValueError("SR template: an item of undefined length cannot be templated")
    for element in item:
        if element.VR == "SQ" and element.is_undefined_length:
            raise ValueError(f"SR template: {element.tag} has undefined length")


class ItemPattern:
    """A content item whose ``open_tags`` elements are encoded per document, the rest once."""

    def __init__(self, item: Dataset, open_tags: Iterable[int], encodings: Sequence[str]) -> None:
        _require_defined_length(item)
        self.open_tags = tuple(sorted(open_tags))
        missing = [f"{tag:08X}" for tag in self.open_tags if tag not in item]
        if missing:
            raise ValueError(f"SR template: item lacks the open elements {', '.join(missing)}")
        bounds = (-1, *self.open_tags, 0x100000000)
        self._runs = tuple(
            encode_elements(_elements_between(item, low, high), encodings)
            for low, high in itertools.pairwise(bounds)
        )

    def encode(self, values: Mapping[int, bytes]) -> bytes:
        """The item with each open element's encoded bytes put in its place (tag order)."""
        parts = [self._runs[0]]
        for tag, run in zip(self.open_tags, self._runs[1:], strict=True):
            parts += (values[tag], run)
        return item_bytes(b"".join(parts))


def _elements_between(item: Dataset, low: int, high: int) -> Dataset:
    part = Dataset()
    for element in item:
        if low < element.tag < high:
            part.add(element)
    return part


# --- the template ------------------------------------------------------------------------


def _concept(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


@dataclass(frozen=True)
class GroupTemplate:
    """One TID 1501 measurement group: its constant items encoded, four slots open."""

    group: ItemPattern
    children: tuple[bytes | Slot, ...]
    tracking: ItemPattern
    measurement: ItemPattern
    measured_value: ItemPattern
    present: bytes
    absent: bytes

    def bind(
        self, score: float, present: bool, source_image: bytes, encodings: Sequence[str]
    ) -> Callable[[str], bytes]:
        """The group with everything but its Tracking Unique Identifier encoded.

        The UID comes last because it derives from the SR's own UID, which is known only
        after a first encoding (:func:`cxrsr.sr.uids.content_uid`).
        """
        filled = {
            Slot.SCORE: self._measurement(score, encodings),
            Slot.CALL: self.present if present else self.absent,
            Slot.SOURCE_IMAGE: source_image,
        }

        def encode(tracking_uid: str) -> bytes:
            parts: list[bytes] = []
            for child in self.children:
                if isinstance(child, bytes):
                    parts.append(child)
                elif child is Slot.TRACKING_UID:
                    uid = encode_element(DataElement(UID, "UI", tracking_uid), encodings)
                    parts.append(self.tracking.encode({UID: uid}))
                else:
                    parts.append(filled[child])
            return self.group.encode({CONTENT_SEQUENCE: sequence_bytes(CONTENT_SEQUENCE, parts)})

        return encode

    def _measurement(self, score: float, encodings: Sequence[str]) -> bytes:
        """The NUM item, its value set as highdicom's NumContentItem sets it (DS and FD)."""
        value = self.measured_value.encode(
            {
                FLOATING_POINT_VALUE: encode_element(
                    DataElement(FLOATING_POINT_VALUE, "FD", score), encodings
                ),
                NUMERIC_VALUE: encode_element(
                    DataElement(NUMERIC_VALUE, "DS", DS(score, auto_format=True)), encodings
                ),
            }
        )
        return self.measurement.encode(
            {MEASURED_VALUE_SEQUENCE: sequence_bytes(MEASURED_VALUE_SEQUENCE, [value])}
        )


def _group_template(
    with_present: Dataset, with_absent: Dataset, encodings: Sequence[str]
) -> GroupTemplate:
    """Compile one group from the same group built with every call Present, then Absent."""
    present_items = list(with_present.ContentSequence)
    absent_items = list(with_absent.ContentSequence)
    if len(present_items) != len(absent_items):
        raise ValueError("SR template: a group's structure depends on its call")
    children: list[bytes | Slot] = []
    calls: list[tuple[bytes, bytes]] = []
    patterns: dict[Slot, Dataset] = {}
    for item, other in zip(present_items, absent_items, strict=True):
        slot = _group_slot(item)
        if slot is not None:
            children.append(slot)
            patterns[slot] = item
            continue
        encoded, encoded_other = encode_item(item, encodings), encode_item(other, encodings)
        if encoded == encoded_other:
            children.append(encoded)
        else:
            children.append(Slot.CALL)
            calls.append((encoded, encoded_other))
    if len(calls) != 1 or set(patterns) != {Slot.TRACKING_UID, Slot.SCORE, Slot.SOURCE_IMAGE}:
        raise ValueError(f"SR template: unexpected group layout {children}")
    measurement = patterns[Slot.SCORE]
    return GroupTemplate(
        group=ItemPattern(with_present, [CONTENT_SEQUENCE], encodings),
        children=tuple(children),
        tracking=ItemPattern(patterns[Slot.TRACKING_UID], [UID], encodings),
        measurement=ItemPattern(measurement, [MEASURED_VALUE_SEQUENCE], encodings),
        measured_value=ItemPattern(
            measurement.MeasuredValueSequence[0], [NUMERIC_VALUE, FLOATING_POINT_VALUE], encodings
        ),
        present=calls[0][0],
        absent=calls[0][1],
    )


def _group_slot(item: Dataset) -> Slot | None:
    value_type, concept = item.ValueType, _concept(item)
    if value_type == "UIDREF" and concept == TRACKING_UID_CODE:
        return Slot.TRACKING_UID
    if value_type == "NUM" and concept == CERTAINTY_OF_FINDING.value:
        return Slot.SCORE
    if value_type == "IMAGE" and concept == SOURCE_OF_MEASUREMENT_CODE:
        return Slot.SOURCE_IMAGE
    return None


@dataclass(frozen=True)
class ContentTemplate:
    """A whole TID 1500 content tree for one model and character set, ready to fill."""

    encodings: tuple[str, ...]
    root_stub: Dataset
    root_children: tuple[bytes | Slot, ...]
    measurements: ItemPattern
    groups: tuple[GroupTemplate, ...]

    @classmethod
    def compile(
        cls, with_present: Dataset, with_absent: Dataset, encodings: Sequence[str]
    ) -> ContentTemplate:
        """From the root container highdicom built twice: all calls Present, all Absent."""
        children: list[bytes | Slot] = []
        measurements: Dataset | None = None
        absent_measurements: Dataset | None = None
        for item, other in zip(
            with_present.ContentSequence, with_absent.ContentSequence, strict=True
        ):
            concept = _concept(item)
            if concept == IMAGE_LIBRARY_CODE:
                children.append(Slot.IMAGE_LIBRARY)
            elif concept == IMAGING_MEASUREMENTS_CODE:
                children.append(Slot.MEASUREMENTS)
                measurements, absent_measurements = item, other
            else:
                children.append(encode_item(item, encodings))
        if measurements is None or absent_measurements is None:
            raise ValueError("SR template: no Imaging Measurements (126010) container")
        if children.count(Slot.IMAGE_LIBRARY) != 1 or children.count(Slot.MEASUREMENTS) != 1:
            raise ValueError(f"SR template: unexpected root layout {children}")
        # The root item as highdicom wants it (it looks for IMAGE references in the
        # Content Sequence), with an empty Content Sequence that encode_document replaces.
        stub = Dataset()
        for element in with_present:
            if element.tag != CONTENT_SEQUENCE:
                stub.add(element)
        stub.ContentSequence = []
        return cls(
            encodings=tuple(encodings),
            root_stub=stub,
            root_children=tuple(children),
            measurements=ItemPattern(measurements, [CONTENT_SEQUENCE], encodings),
            groups=tuple(
                _group_template(group, other, encodings)
                for group, other in zip(
                    measurements.ContentSequence, absent_measurements.ContentSequence, strict=True
                )
            ),
        )

    def encode(
        self,
        tracking_uids: Sequence[str],
        scores: Sequence[float],
        present: Sequence[bool],
        source_image: Dataset,
        image_library: Dataset,
    ) -> bytes:
        """The root Content Sequence element, exactly as pydicom would encode the full tree."""
        return self.bind(scores, present, source_image, image_library)(tracking_uids)

    def bind(
        self,
        scores: Sequence[float],
        present: Sequence[bool],
        source_image: Dataset,
        image_library: Dataset,
    ) -> Callable[[Sequence[str]], bytes]:
        """The tree with everything but the Tracking Unique Identifiers encoded; fill them in.

        The SR is encoded twice, with a placeholder UID and then with its own
        (:func:`cxrsr.sr.uids.content_uid`); only the tracking UIDs differ between the two.
        """
        source = encode_item(source_image, self.encodings)
        groups = [
            group.bind(score, call, source, self.encodings)
            for group, score, call in zip(self.groups, scores, present, strict=True)
        ]
        library = encode_item(image_library, self.encodings)

        def encode(tracking_uids: Sequence[str]) -> bytes:
            items = [group(uid) for group, uid in zip(groups, tracking_uids, strict=True)]
            measurements = self.measurements.encode(
                {CONTENT_SEQUENCE: sequence_bytes(CONTENT_SEQUENCE, items)}
            )
            parts = [
                library if child is Slot.IMAGE_LIBRARY else measurements
                if child is Slot.MEASUREMENTS else child
                for child in self.root_children
            ]  # fmt: skip
            return sequence_bytes(CONTENT_SEQUENCE, parts)  # type: ignore[arg-type]

        return encode


def encode_document(sr: Dataset, content_sequence: bytes) -> bytes:
    """The file ``sr.save_as(enforce_file_format=True)`` writes, with a pre-encoded Content Sequence.

    ``sr``'s own Content Sequence must be empty (the root stub's placeholder). It and the
    elements that sort after it (none in our SRs, handled all the same) are set aside
    while the rest is encoded, then put back: ``sr`` is unchanged afterwards, so it can be
    encoded again under another UID (:func:`cxrsr.sr.uids.content_uid` encodes twice).
    """
    if sr.get("ContentSequence"):
        raise ValueError("encode_document: the dataset already has content items")
    encodings = character_encodings(sr)
    set_aside = [element for element in sr if element.tag >= CONTENT_SEQUENCE]
    tail = Dataset()
    for element in set_aside:
        if element.tag > CONTENT_SEQUENCE:
            tail.add(element)
        del sr[element.tag]
    try:
        head = io.BytesIO()
        sr.save_as(head, enforce_file_format=True)
    finally:
        for element in set_aside:
            sr.add(element)
    return head.getvalue() + content_sequence + encode_elements(tail, encodings)
