"""A seeded mutation fuzzer over the shared corpus, and the checks of issue 9 item 9.

Used by ``tests/test_fuzz.py`` (a few hundred cases, a standing test) and by
``bench/fuzz.py`` (ten thousand and more). It is a test tool: nothing in ``cxrsr/``
imports it.

Each case is made from the corpus by one mutator (sometimes two stacked), chosen by a
``random.Random`` seeded with ``(seed, case number)`` alone: case N of a seed is the same
bytes whatever the case count, so a failure is reproduced by its seed and number
(``python bench/fuzz.py --seed S --write-case N DIR``).

The mutators work on bytes, not through pydicom, so they can write what pydicom would
refuse to (an odd length, a 4-byte US, a length past the end of the file) and cost
microseconds per case. A small walker finds the elements of a little-endian data set
(explicit or implicit VR, with or without file meta, nested sequences and encapsulated
pixel data), which the length, attribute and UID mutators then change in place.

The checks (:func:`check_process`, :func:`check_generate`, :func:`check_upload`) return
problems as strings, one per broken promise, so the test asserts on an empty list and
the benchmark prints them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Value representations with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
#: Walking stops after this many elements: a mutated length can make a file look like
#: millions of tiny elements, and the walker must stay cheap.
MAX_ELEMENTS = 4000

# Tags the attribute mutators target, with their VR.
ROWS, COLUMNS = 0x00280010, 0x00280011
IMAGE_PIXEL_US = {
    0x00280002: "SamplesPerPixel",
    0x00280006: "PlanarConfiguration",
    ROWS: "Rows",
    COLUMNS: "Columns",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280102: "HighBit",
    0x00280103: "PixelRepresentation",
}
NUMBER_OF_FRAMES = 0x00280008
UID_TAGS = {
    0x00020002: "MediaStorageSOPClassUID",
    0x00020003: "MediaStorageSOPInstanceUID",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
TRANSFER_SYNTAX = 0x00020010
TEXT_TAGS: dict[int, tuple[str, list[bytes]]] = {
    0x00080060: ("Modality", [b"CR", b"DX", b"CT", b"SR", b"", b"cr", b"D\0", b"DX\\CR", b"OT"]),
    0x00280004: (
        "PhotometricInterpretation",
        [
            b"MONOCHROME1",
            b"MONOCHROME2",
            b"RGB",
            b"PALETTE COLOR",
            b"YBR_FULL_422",
            b"",
            b"MONOCHROME3",
            b"\xff\xfe",
        ],
    ),
    0x00180015: (
        "BodyPartExamined",
        [b"CHEST", b"HIP", b"", b"\xc4\xe4", b"CHEST\\HIP", b" " * 70],
    ),
    0x00080008: ("ImageType", [b"ORIGINAL\\PRIMARY", b"", b"\\\\\\\\", b"DERIVED" * 20]),
}
US_VALUES = [
    0, 1, 2, 3, 7, 8, 9, 12, 15, 16, 17, 24, 31, 32, 33, 48, 64, 255, 256, 0x7FFF, 0x8000, 0xFFFF,
]  # fmt: skip
IS_VALUES = [
    b"0", b"-1", b"1", b"2", b"3 ", b"30", b"100000", b"2147483647", b"99999999999999", b"abc",
    b"", b"1.5", b"1\\2", b" ",
]  # fmt: skip
UID_VALUES = [
    b"",
    b"\0",
    b"  ",
    b"abc",
    b"1.2..3",
    b"1.2.3.",
    b".1.2",
    b"01.2.3",
    b"1.2.3\\4.5",
    b"1.2.\xe9",
    b"1." + b"9" * 70,
    b"1.2.840.10008.5.1.4.1.1.1.1.1",  # DX For Processing
    b"1.2.840.10008.5.1.4.1.1.88.34",  # an SR class on an image
    b"1.2.840.10008.1.3.10",  # DICOMDIR
    b"1.2.840.10008.5.1.4.1.1.1",  # CR, a valid class
]
TRANSFER_SYNTAXES = [
    b"1.2.840.10008.1.2",
    b"1.2.840.10008.1.2.1",
    b"1.2.840.10008.1.2.2",  # explicit big endian (retired)
    b"1.2.840.10008.1.2.1.99",  # deflated
    b"1.2.840.10008.1.2.4.50",
    b"1.2.840.10008.1.2.4.57",
    b"1.2.840.10008.1.2.4.80",
    b"1.2.840.10008.1.2.4.90",
    b"1.2.840.10008.1.2.4.201",  # HTJ2K
    b"1.2.840.10008.1.2.5",
    b"1.2.3.4",
    b"",
    b"\xff" * 8,
]


@dataclass(frozen=True)
class Element:
    """One element header found by :func:`walk`: where it is and what it declares."""

    tag: int
    vr: bytes | None
    """``None`` in an implicit VR data set."""
    offset: int
    length_offset: int
    length_size: int
    value_offset: int
    length: int
    depth: int

    @property
    def end(self) -> int:
        return self.value_offset + (0 if self.length == UNDEFINED else self.length)


@dataclass
class Walk:
    elements: list[Element]
    explicit: bool
    """Whether the data set after the file meta has explicit VRs."""
    dataset_offset: int
    """Where the data set (after the file meta) starts."""


def walk(data: bytes) -> Walk:
    """The element headers of a little-endian DICOM byte stream, in file order.

    Tolerant by design (it walks mutated files): it stops at the first header that
    does not fit, or after :data:`MAX_ELEMENTS`.
    """
    pos = 132 if data[128:132] == b"DICM" else 0
    elements: list[Element] = []
    explicit = _looks_explicit(data, pos)
    in_meta = True
    dataset_offset = pos
    stack: list[int | None] = []  # end offsets of the open sequences and items (None: undefined)
    in_fragments = False
    while pos + 8 <= len(data) and len(elements) < MAX_ELEMENTS:
        while stack and stack[-1] is not None and pos >= stack[-1]:
            stack.pop()
        group, number = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | number
        if in_meta and group != 0x0002:
            in_meta = False
            dataset_offset = pos
            ts = _meta_transfer_syntax(data, elements)
            explicit = (
                (ts.rstrip(b"\0 ") != IMPLICIT_VR_LE)
                if ts is not None
                else _looks_explicit(data, pos)
            )
        if group == 0xFFFE:
            (length,) = struct.unpack_from("<I", data, pos + 4)
            element = Element(tag, None, pos, pos + 4, 4, pos + 8, length, len(stack))
            elements.append(element)
            pos += 8
            if tag == ITEM:
                if in_fragments:
                    if length == UNDEFINED:
                        break
                    pos += length
                else:
                    stack.append(None if length == UNDEFINED else pos + length)
            elif tag in (ITEM_END, SEQUENCE_END):
                if tag == SEQUENCE_END:
                    in_fragments = False
                if stack:
                    stack.pop()
            continue
        if in_meta or explicit:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                if pos + 12 > len(data):
                    break
                (length,) = struct.unpack_from("<I", data, pos + 8)
                element = Element(tag, vr, pos, pos + 8, 4, pos + 12, length, len(stack))
            else:
                (length,) = struct.unpack_from("<H", data, pos + 6)
                element = Element(tag, vr, pos, pos + 6, 2, pos + 8, length, len(stack))
        else:
            (length,) = struct.unpack_from("<I", data, pos + 4)
            element = Element(tag, None, pos, pos + 4, 4, pos + 8, length, len(stack))
        elements.append(element)
        if length == UNDEFINED:
            pos = element.value_offset
            if tag == PIXEL_DATA:
                in_fragments = True
            stack.append(None)
            continue
        if element.end > len(data):
            break
        if element.vr == b"SQ":
            pos = element.value_offset
            stack.append(element.end)
            continue
        pos = element.end
    if in_meta:
        dataset_offset = pos
    return Walk(elements, explicit, dataset_offset)


def _looks_explicit(data: bytes, pos: int) -> bool:
    vr = data[pos + 4 : pos + 6]
    return len(vr) == 2 and vr.isalpha() and vr.isupper()


def _meta_transfer_syntax(data: bytes, elements: list[Element]) -> bytes | None:
    for element in elements:
        if element.tag == TRANSFER_SYNTAX:
            return data[element.value_offset : element.end]
    return None


def encode_element(tag: int, vr: bytes, value: bytes, explicit: bool) -> bytes:
    """One element, little endian; a value too long for a 2-byte length is cut to fit."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    value = value[:0xFFFF]
    return head + vr + struct.pack("<H", len(value)) + value


def set_element(data: bytes, tag: int, vr: bytes, value: bytes | None) -> bytes:
    """``data`` with the top-level element ``tag`` replaced, inserted or (``None``) removed.

    The file meta group length (0002,0000) is kept right, so only the element itself is
    wrong; elements inside sequences are never touched (their parents' lengths would
    then lie too).
    """
    found = walk(data)
    is_meta = tag >> 16 == 0x0002
    explicit = True if is_meta else found.explicit
    top = [e for e in found.elements if e.depth == 0 and e.tag != ITEM]
    start = end = None
    for element in top:
        if element.tag == tag:
            if element.length == UNDEFINED or element.end > len(data):
                return data  # not safely replaceable
            start, end = element.offset, element.end
            break
        if element.tag > tag and (element.tag >> 16 == 0x0002) == is_meta:
            start = end = element.offset
            break
    if start is None or end is None:
        if is_meta:
            return data  # no file meta to put it in
        start = end = len(data) if not top else top[-1].end
        if start > len(data):
            return data
    new = b"" if value is None else encode_element(tag, vr, value, explicit)
    result = data[:start] + new + data[end:]
    return fix_meta_group_length(result) if is_meta else result


def fix_meta_group_length(data: bytes) -> bytes:
    """Set (0002,0000) to the length of the meta elements after it, if it is there."""
    found = walk(data)
    meta = [e for e in found.elements if e.tag >> 16 == 0x0002 and e.depth == 0]
    if not meta or meta[0].tag != 0x00020000 or meta[0].length != 4:
        return data
    total = found.dataset_offset - meta[0].end
    out = bytearray(data)
    struct.pack_into("<I", out, meta[0].value_offset, total)
    return bytes(out)


# --- mutators ------------------------------------------------------------------------
# Each takes the case's Random and the corpus (name -> bytes) and returns the new bytes,
# the seed file names and a description of what it did.

Corpus = dict[str, bytes]
Mutation = tuple[bytes, list[str], str]


def _pick(rng: random.Random, corpus: Corpus) -> tuple[str, bytes]:
    """A corpus file, half the time uniformly, half the time favouring small files (cheap)."""
    names = sorted(corpus)
    if rng.random() < 0.5:
        name = rng.choice(names)
    else:
        weights = [1 / max(len(corpus[n]), 1) ** 0.5 for n in names]
        name = rng.choices(names, weights)[0]
    return name, corpus[name]


def header_region(data: bytes) -> int:
    """Where the header ends: the start of Pixel Data's value, else the first 4 kB."""
    for element in walk(data).elements:
        if element.tag == PIXEL_DATA and element.depth == 0:
            return element.value_offset
    return min(len(data), 4096)


def mutate_header_flips(rng: random.Random, corpus: Corpus) -> Mutation:
    name, data = _pick(rng, corpus)
    out = bytearray(data)
    end = max(header_region(data), 1)
    flips = []
    for _ in range(rng.randint(1, 16)):
        pos = rng.randrange(end)
        if rng.random() < 0.5:
            out[pos] ^= 1 << rng.randrange(8)
        else:
            out[pos] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        flips.append(pos)
    return bytes(out), [name], f"header byte flips at {sorted(flips)}"


def mutate_truncate(rng: random.Random, corpus: Corpus) -> Mutation:
    name, data = _pick(rng, corpus)
    if rng.random() < 0.5:
        cut = rng.randrange(min(header_region(data) + 16, len(data)) + 1)
    else:
        cut = rng.randrange(len(data) + 1)
    return data[:cut], [name], f"truncated to {cut} of {len(data)} bytes"


def _length_values(rng: random.Random, element: Element, size: int) -> int:
    limit = 0xFFFF if element.length_size == 2 else UNDEFINED
    candidates = [
        0,
        1,
        element.length + 1,
        max(element.length - 1, 0),
        element.length * 2 + 2,
        size - element.value_offset + rng.randrange(1, 1 << 16),  # past the end of the file
        size,
        limit,
        limit - 1,
        0x7FFFFFFF,
        0x80000000,
        rng.randrange(limit + 1),
    ]
    return min(rng.choice(candidates), limit)


def _set_length(data: bytes, element: Element, length: int) -> bytes:
    out = bytearray(data)
    fmt = "<H" if element.length_size == 2 else "<I"
    struct.pack_into(fmt, out, element.length_offset, length)
    return bytes(out)


def mutate_element_length(rng: random.Random, corpus: Corpus) -> Mutation:
    name, data = _pick(rng, corpus)
    elements = [e for e in walk(data).elements if e.length_offset + e.length_size <= len(data)]
    if not elements:
        return mutate_truncate(rng, corpus)
    element = rng.choice(elements)
    length = _length_values(rng, element, len(data))
    return (
        _set_length(data, element, length),
        [name],
        f"element ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X}) length "
        f"{element.length} -> {length}",
    )


def mutate_meta_length(rng: random.Random, corpus: Corpus) -> Mutation:
    """A file meta element whose length runs past the end of the file (Orthanc 1.10.1's
    segfault), or otherwise wrong."""
    with_meta = {n: d for n, d in corpus.items() if d[128:132] == b"DICM"}
    if not with_meta:  # a stacked mutation of a file that has lost its file meta
        return mutate_element_length(rng, corpus)
    name, data = _pick(rng, with_meta)
    meta = [e for e in walk(data).elements if e.tag >> 16 == 0x0002]
    if not meta:
        return mutate_element_length(rng, corpus)
    element = rng.choice(meta)
    if rng.random() < 0.7:
        length = len(data) - element.value_offset + rng.choice([1, 2, 100, 1 << 16, 1 << 20])
        length = min(length, 0xFFFF if element.length_size == 2 else UNDEFINED)
        if element.length_size == 2 and element.value_offset + length <= len(data):
            # a 2-byte length cannot pass the end of a large file: shorten the file instead
            data = data[: element.value_offset + max(length - rng.randrange(1, 64), 0)]
    else:
        length = _length_values(rng, element, len(data))
    return (
        _set_length(data, element, length),
        [name],
        f"file meta ({element.tag >> 16:04X},{element.tag & 0xFFFF:04X}) length "
        f"{element.length} -> {length} (file {len(data)} bytes)",
    )


def mutate_splice(rng: random.Random, corpus: Corpus) -> Mutation:
    (name_a, a), (name_b, b) = _pick(rng, corpus), _pick(rng, corpus)
    if rng.random() < 0.5:
        cut_a = rng.choice([e.offset for e in walk(a).elements] or [0])
        cut_b = rng.choice([e.offset for e in walk(b).elements] or [0])
    else:
        cut_a, cut_b = rng.randrange(len(a) + 1), rng.randrange(len(b) + 1)
    return a[:cut_a] + b[cut_b:], [name_a, name_b], f"{name_a}[:{cut_a}] + {name_b}[{cut_b}:]"


def mutate_image_pixel(rng: random.Random, corpus: Corpus) -> Mutation:
    """Absurd Rows, Columns, BitsAllocated, BitsStored, SamplesPerPixel, NumberOfFrames..."""
    name, data = _pick(rng, corpus)
    changes = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.2:
            value = rng.choice(IS_VALUES)
            data = set_element(data, NUMBER_OF_FRAMES, b"IS", value)
            changes.append(f"NumberOfFrames={value!r}")
            continue
        if rng.random() < 0.25:  # a consistent but huge image
            side = rng.choice([4096, 8192, 16384, 32768, 65535])
            data = set_element(data, ROWS, b"US", struct.pack("<H", side))
            data = set_element(data, COLUMNS, b"US", struct.pack("<H", side))
            changes.append(f"Rows=Columns={side}")
            continue
        tag = rng.choice(sorted(IMAGE_PIXEL_US))
        value = rng.choice(US_VALUES)
        raw = struct.pack("<H", value)
        shape = rng.random()
        if shape < 0.1:
            raw = b""
        elif shape < 0.15:
            raw = raw[:1]
        elif shape < 0.2:
            raw = struct.pack("<I", value | 0x10000)
        elif shape < 0.25:
            raw = None  # type: ignore[assignment]
        data = set_element(data, tag, b"US", raw)
        changes.append(f"{IMAGE_PIXEL_US[tag]}={'deleted' if raw is None else raw.hex()}")
    return data, [name], ", ".join(changes)


def mutate_uids(rng: random.Random, corpus: Corpus) -> Mutation:
    """Empty, invalid, missing or misleading SOP Class/Instance (and other) UIDs."""
    name, data = _pick(rng, corpus)
    changes = []
    weights = [3, 3, 6, 6, 1, 1]
    for _ in range(rng.randint(1, 2)):
        tag = rng.choices(sorted(UID_TAGS), weights)[0]
        value: bytes | None = None if rng.random() < 0.15 else rng.choice(UID_VALUES)
        if value is not None and len(value) % 2 and rng.random() < 0.8:
            value += b"\0"
        data = set_element(data, tag, b"UI", value)
        changes.append(f"{UID_TAGS[tag]}={'deleted' if value is None else value!r}")
    return data, [name], ", ".join(changes)


def mutate_header_values(rng: random.Random, corpus: Corpus) -> Mutation:
    """Another Transfer Syntax UID than the data's, or odd Modality/Photometric/... values."""
    name, data = _pick(rng, corpus)
    if rng.random() < 0.5:
        value = rng.choice(TRANSFER_SYNTAXES)
        if len(value) % 2:
            value += b"\0"
        return (
            set_element(data, TRANSFER_SYNTAX, b"UI", value),
            [name],
            f"TransferSyntaxUID={value!r}",
        )
    tag = rng.choice(sorted(TEXT_TAGS))
    keyword, values = TEXT_TAGS[tag]
    value = rng.choice(values)
    if len(value) % 2:
        value += b" "
    return set_element(data, tag, b"CS", value), [name], f"{keyword}={value!r}"


def mutate_junk(rng: random.Random, corpus: Corpus) -> Mutation:
    """Not DICOM at all, or only its first bytes."""
    kind = rng.randrange(5)
    if kind == 0:
        return b"", [], "empty file"
    if kind == 1:
        return rng.randbytes(rng.randrange(1, 4096)), [], "random bytes"
    if kind == 2:
        return (
            b"\0" * 128 + b"DICM" + rng.randbytes(rng.randrange(0, 64)),
            [],
            "preamble, DICM, junk",
        )
    if kind == 3:
        return b"PK\x03\x04" + rng.randbytes(rng.randrange(0, 256)), [], "zip magic, junk"
    name, data = _pick(rng, corpus)
    cut = rng.randrange(0, 140)
    return data[:cut], [name], f"first {cut} bytes"


#: Member names for archives: nested folders, separators, non-ASCII, a traversal.
MEMBER_NAMES = ["IM0001", "study/series/IM0002.dcm", "x!y.dcm", "../up.dcm", "ñame.DCM", "a b/c"]


def mutate_zip(rng: random.Random, corpus: Corpus) -> Mutation:
    """An archive of one to three DICOMs (intact or fuzzed), then damaged or not."""
    members = []
    seeds: list[str] = []
    for index in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            name, data = _pick(rng, corpus)
            what = name
        else:
            mutator = rng.choice([m for m in MUTATORS if m not in ("zip", "junk")])
            data, names, what = MUTATORS[mutator][0](rng, corpus)
            name = "+".join(names)
        seeds.append(name)
        member = rng.choice(MEMBER_NAMES) if index == 0 else f"{index}/{rng.choice(MEMBER_NAMES)}"
        members.append((member, data, what))
    buffer = io.BytesIO()
    method = rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
    with zipfile.ZipFile(buffer, "w", method, compresslevel=1) as archive:
        for member, data, _ in members:
            # A ZipInfo with a fixed date: writestr(str) stamps the current time, and a case
            # made across a two-second boundary would be other bytes.
            archive.writestr(zipfile.ZipInfo(member, date_time=(2026, 1, 1, 0, 0, 0)), data, method)
    out = bytearray(buffer.getvalue())
    damage = rng.choice(
        ["intact", "truncate", "flip", "central-sizes", "local-sizes", "encrypted", "method", "crc"]
    )
    central = _find_all(out, b"PK\x01\x02")
    local = _find_all(out, b"PK\x03\x04")
    if damage == "truncate":
        del out[rng.randrange(len(out)) :]
    elif damage == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif damage == "central-sizes" and central:
        at = rng.choice(central)
        struct.pack_into(
            "<I",
            out,
            at + rng.choice([20, 24]),
            rng.choice([0, 1 << 31, UNDEFINED, 1 << 30 | 7, rng.randrange(1 << 32)]),
        )
    elif damage == "local-sizes" and local:
        at = rng.choice(local)
        struct.pack_into("<I", out, at + rng.choice([18, 22]), rng.randrange(1 << 32))
    elif damage == "encrypted":
        for at in local:
            out[at + 6] |= 1
        for at in central:
            out[at + 8] |= 1
    elif damage == "method":
        method_id = rng.choice([1, 6, 9, 12, 14, 93, 98, 99])
        for at in local:
            struct.pack_into("<H", out, at + 8, method_id)
        for at in central:
            struct.pack_into("<H", out, at + 10, method_id)
        damage += f" {method_id}"
    elif damage == "crc" and central:
        at = rng.choice(local or central)
        struct.pack_into("<I", out, at + (14 if at in local else 16), rng.randrange(1 << 32))
    described = "; ".join(f"{m}: {w}" for m, _, w in members)
    return bytes(out), seeds, f"zip ({damage}) of [{described}]"


def _find_all(data: bytes | bytearray, signature: bytes) -> list[int]:
    found, at = [], data.find(signature)
    while at >= 0:
        found.append(at)
        at = data.find(signature, at + 1)
    return found


MUTATORS: dict[str, tuple[Callable[[random.Random, Corpus], Mutation], int]] = {
    "header-flips": (mutate_header_flips, 14),
    "truncate": (mutate_truncate, 10),
    "element-length": (mutate_element_length, 14),
    "meta-length": (mutate_meta_length, 6),
    "splice": (mutate_splice, 8),
    "image-pixel": (mutate_image_pixel, 14),
    "uids": (mutate_uids, 10),
    "header-values": (mutate_header_values, 8),
    "junk": (mutate_junk, 3),
    "zip": (mutate_zip, 8),
}
"""Every mutator and its weight (per 95 cases, about)."""


@dataclass(frozen=True)
class Case:
    index: int
    mutator: str
    seeds: list[str]
    description: str
    data: bytes

    @property
    def file_name(self) -> str:
        return f"case{self.index:06d}-{self.mutator}" + (
            ".zip" if self.mutator == "zip" else ".dcm"
        )


def make_case(corpus: Corpus, seed: int, index: int) -> Case:
    """Case ``index`` of ``seed``: the same bytes whatever else is generated."""
    rng = random.Random(f"cxrsr-fuzz/{seed}/{index}")
    names = list(MUTATORS)
    mutator = rng.choices(names, [MUTATORS[n][1] for n in names])[0]
    data, seeds, description = MUTATORS[mutator][0](rng, corpus)
    if mutator not in ("zip", "junk") and rng.random() < 0.15:
        # Stack a second mutation on the first: damage rarely comes alone.
        second = rng.choice([n for n in names if n not in ("zip", "junk", "splice")])
        data, _, more = MUTATORS[second][0](rng, {"(first mutation)": data})
        mutator, description = f"{mutator}+{second}", f"{description}; then {more}"
    return Case(index, mutator, seeds, description, data)


def load_corpus(corpus_dir: Path) -> Corpus:
    """Every DICOM file of the shared corpus, by name (17 MB: read once, kept in memory)."""
    return {p.name: p.read_bytes() for p in sorted(Path(corpus_dir).glob("*.dcm"))}


def write_cases(
    folder: Path, corpus: Corpus, seed: int, indices: Iterable[int], manifest: bool = True
) -> list[Case]:
    """Write the cases into ``folder`` (and, with ``manifest``, ``cases.jsonl`` beside it:
    one line per case, what was done to which corpus file).

    The cases hold patient data from the corpus: files and folder are the owner's only.
    The returned cases do not keep their bytes (thousands of them would not fit).
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    cases = []
    lines = []
    for index in indices:
        case = make_case(corpus, seed, index)
        path = folder / case.file_name
        path.write_bytes(case.data)
        os.chmod(path, 0o600)
        cases.append(Case(case.index, case.mutator, case.seeds, case.description, b""))
        record = {"seed": seed, "case": index, "file": case.file_name, "mutator": case.mutator}
        lines.append(json.dumps({**record, "seeds": case.seeds, "description": case.description}))
    if manifest:
        with open(folder.parent / "cases.jsonl", "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
    return cases


# --- running the scripts, bounded -------------------------------------------------------


@dataclass
class ScriptRun:
    """One script's run: exit code (``None`` on a timeout), output, time, peak memory."""

    script: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    max_rss_kb: int
    """Largest resident set of the process or any child it waited for (``wait4``'s
    ru_maxrss: the biggest single process in the tree, not their sum)."""

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


#: Runs a script and writes its exit status and its tree's peak memory to a file. The
#: script is started from this small process, not from the test process: on Linux a
#: child's ru_maxrss includes the memory of the process it was forked from until its
#: exec, and a pytest that has imported torch would add most of a gigabyte to every
#: figure.
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
with open(sys.argv[1], "w") as fh:
    fh.write(f"{code} {peak}")
"""


def run_bounded(
    script: str,
    args: Sequence[str | os.PathLike[str]],
    timeout: float,
    env: dict[str, str] | None,
    log_dir: Path,
) -> ScriptRun:
    """Run one of the project's scripts; kill its whole process group after ``timeout`` s."""
    from cxrsr.config import PROJECT_ROOT

    stem = Path(script).stem
    out_path, err_path = log_dir / f"{stem}.stdout", log_dir / f"{stem}.stderr"
    status_path = log_dir / f"{stem}.status"
    status_path.unlink(missing_ok=True)
    command = [sys.executable, "-c", LAUNCHER, str(status_path), sys.executable]
    command += [str(PROJECT_ROOT / script), *map(str, args)]
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT,
            env=env,
            start_new_session=True,  # its own process group, so a timeout kills every child
        )
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    seconds = time.monotonic() - start
    returncode: int | None = None
    peak = 0
    if status_path.exists():
        code, peak_text = status_path.read_text().split()
        returncode, peak = int(code), int(peak_text)
    return ScriptRun(
        script,
        returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        seconds,
        peak,
    )


def children_max_rss_kb() -> int:
    """ru_maxrss of every child this process has waited for, in kB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# --- the checks ------------------------------------------------------------------------

ALLOWED_EXIT_CODES = (0, 1)


def _is_sr(path: Path) -> bool:
    """An SR, not a key image written beside it."""
    import pydicom

    return bool(pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR")


def script_problems(run: ScriptRun) -> list[str]:
    """A timeout, a traceback, or an exit code other than 0/1."""
    problems = []
    if run.timed_out:
        tail = "\n".join(run.stderr.splitlines()[-5:])
        problems.append(f"{run.script}: timed out after {run.seconds:.0f} s; last lines:\n{tail}")
    if "Traceback (most recent call last)" in run.output:
        start = run.output.index("Traceback (most recent call last)")
        problems.append(f"{run.script}: traceback:\n{run.output[start : start + 3000]}")
    if not run.timed_out and run.returncode not in ALLOWED_EXIT_CODES:
        tail = "\n".join(run.output.splitlines()[-8:])
        problems.append(f"{run.script}: exit {run.returncode} (only 0 or 1 allowed):\n{tail}")
    return problems


def load_results_document(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"results file {path} unreadable: {exc}"


def accounting_problems(document: dict[str, Any], folder: Path, cases: Sequence[Case]) -> list[str]:
    """One entry per input file (at least one per archive), each classified, skipped or
    failed, the latter two with a reason; nothing that is not an input."""
    problems = []
    entries = document.get("images") or []
    by_file: dict[str, list[dict[str, Any]]] = {}
    names = {case.file_name for case in cases}
    base = str(Path(folder).absolute())
    for entry in entries:
        path = str(entry.get("path", ""))
        status = entry.get("status")
        if status not in ("classified", "skipped", "failed"):
            problems.append(f"{path}: status {status!r}")
        elif status != "classified" and not str(entry.get("reason") or "").strip():
            problems.append(f"{path}: {status} without a reason")
        elif status != "classified" and not is_one_line(str(entry["reason"])):
            problems.append(
                f"{path}: {status} with a reason that is not one line: {entry['reason']!r:.300}"
            )
        relative = path[len(base) + 1 :] if path.startswith(base + os.sep) else None
        file_name = relative.split("!", 1)[0] if relative is not None else None
        if file_name not in names:
            problems.append(f"{path}: an entry for no input file")
            continue
        by_file.setdefault(file_name, []).append(entry)
    for case in cases:
        found = by_file.get(case.file_name, [])
        if not found:
            problems.append(f"{case.file_name}: no entry in the results ({case.description[:200]})")
        elif case.mutator != "zip" and len(found) > 1:
            problems.append(f"{case.file_name}: {len(found)} entries")
    paths = [str(e.get("path")) for e in entries]
    for path, count in Counter(paths).items():
        if count > 1:
            problems.append(f"{path}: {count} entries with this path")
    return problems


#: Longest reason that still reads as one line on a terminal.
MAX_REASON = 1000


def is_one_line(text: str) -> bool:
    """No line breaks or other control characters, and not a page long: a reason that
    breaks its ``E:`` line in two, or copies a swallowed header into it, is unreadable."""
    return len(text) <= MAX_REASON and not any(ord(c) < 0x20 or c == "\x7f" for c in text)


def message_problems(document: dict[str, Any], run: ScriptRun) -> list[str]:
    """Each failed file named on an ``E:`` line, each skipped one on a ``W:`` line."""
    problems = []
    lines = run.stderr.splitlines()
    errors = {line for line in lines if line.startswith("E: ")}
    warnings = {line for line in lines if line.startswith("W: ")}
    for entry in document.get("images") or []:
        status, path = entry.get("status"), str(entry.get("path"))
        if status == "failed" and not any(line.startswith(f"E: {path}: ") for line in errors):
            problems.append(f"{path}: failed but no E: line names it")
        if status == "skipped" and not any(line.startswith(f"W: {path}: ") for line in warnings):
            problems.append(f"{path}: skipped but no W: line names it")
    return problems


def sr_problems(document: dict[str, Any], sr_dir: Path, run: ScriptRun) -> list[str]:
    """Each classified entry has an SR, or an ``E:`` line that names its source."""
    import pydicom

    problems = []
    referenced: set[str] = set()
    for path in sorted(Path(sr_dir).glob("*.dcm")) if Path(sr_dir).is_dir() else []:
        try:
            sr = pydicom.dcmread(path)
            if sr.Modality != "SR":
                continue  # a key image beside its SR
            evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
            referenced.add(
                evidence.ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
            )
        except Exception as exc:  # any failure to read our own SR back is a finding
            problems.append(f"{path.name}: SR unreadable: {type(exc).__name__}: {exc}")
    errors = [line for line in run.stderr.splitlines() if line.startswith("E: ")]
    classified = [e for e in document.get("images") or [] if e.get("status") == "classified"]
    if run.returncode not in ALLOWED_EXIT_CODES:  # refused or broke: script_problems says how
        missing = [e for e in classified if e.get("sop_instance_uid") not in referenced]
        if missing:
            problems.append(f"{len(missing)} of {len(classified)} classified entries got no SR")
        return problems
    for entry in classified:
        if entry.get("sop_instance_uid") in referenced:
            continue
        if not any(str(entry.get("path")) in line for line in errors):
            problems.append(f"{entry.get('path')}: classified, but no SR and no E: line")
    return problems


def dsrdump_problems(paths: Iterable[Path], dsrdump: str) -> list[str]:
    problems = []
    for path in paths:
        try:
            done = subprocess.run(
                [dsrdump, "-Ee", str(path)],
                capture_output=True,
                text=True,
                errors="replace",  # values in the SR's own character set (Latin-1, ...)
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            problems.append(f"{path.name}: dsrdump timed out")
            continue
        errors = [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))]
        if errors or done.returncode != 0:
            problems.append(f"{path.name}: dsrdump exit {done.returncode}: {errors[:5]}")
    return problems


def dciodvfy_problems(paths: Iterable[Path], dciodvfy: str) -> list[str]:
    problems = []
    for path in paths:
        try:
            done = subprocess.run(
                [dciodvfy, str(path)],
                capture_output=True,
                text=True,
                errors="replace",  # values in the SR's own character set (Latin-1, ...)
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            problems.append(f"{path.name}: dciodvfy timed out")
            continue
        output = done.stdout + done.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        if errors or done.returncode != 0:
            problems.append(f"{path.name}: dciodvfy exit {done.returncode}: {errors[:5]}")
    return problems


@dataclass
class OrthancState:
    alive: bool
    detail: str


def orthanc_state(server: Any) -> OrthancState:
    """Whether the Orthanc process still runs and ``GET /system`` answers 200."""
    import requests

    process = getattr(server, "process", None)
    if process is not None and process.poll() is not None:
        code = process.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return OrthancState(False, f"Orthanc {how} (see {server.log_path})")
    try:
        response = requests.get(
            f"{server.url}/system", auth=(server.username, server.password), timeout=10
        )
    except requests.RequestException as exc:
        return OrthancState(False, f"GET /system failed: {exc}")
    if response.status_code != 200:
        return OrthancState(False, f"GET /system answered {response.status_code}")
    return OrthancState(True, "GET /system answered 200")


def find_orthanc_killers(
    server: Any, folder: Path, limit: int = 3, budget: float = 180.0
) -> list[str]:
    """After a crash: restart Orthanc and POST the inputs one by one to name the files
    that crash it (at most ``limit``, within ``budget`` seconds)."""
    import requests

    from cxrsr.dicomio.discovery import iter_sources

    killers: list[str] = []
    deadline = time.monotonic() + budget
    server.stop()
    server.start()
    for source in iter_sources([folder]):
        if len(killers) >= limit or time.monotonic() > deadline:
            break
        try:
            body = source.read_bytes()
        except OSError:
            continue
        with contextlib.suppress(requests.RequestException):
            requests.post(
                f"{server.url}/instances",
                data=body,
                auth=(server.username, server.password),
                timeout=30,
            )
        if server.process.poll() is not None:
            killers.append(source.name)
            server.stop()
            server.start()
    return killers


@dataclass
class FuzzRun:
    """Everything one pipeline run over a folder of cases found."""

    cases: int
    runs: dict[str, ScriptRun] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    sr_count: int = 0
    orthanc: OrthancState | None = None
    killers: list[str] = field(default_factory=list)

    def unexpected(self) -> list[str]:
        """Failures the reader labelled "unexpected error": a swallowed exception, not
        a clear reason. Not a broken promise (the file is accounted for), but each is
        worth a proper message."""
        return [r for r in self.reasons if "unexpected error" in r]

    def all_problems(self) -> list[str]:
        return [f"[{kind}] {p}" for kind, items in self.problems.items() for p in items]


def summary_lines(outcome: FuzzRun) -> list[str]:
    """What a run found, for people: statuses, SRs, Orthanc, time and peak memory per script."""
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(outcome.statuses.items()))
    lines = [f"{outcome.cases} cases -> {statuses}; {outcome.sr_count} SRs"]
    for name, run in outcome.runs.items():
        last = run.stdout.strip().splitlines()[-1:] or ["(no summary line)"]
        exit_text = "TIMEOUT" if run.timed_out else f"exit {run.returncode}"
        lines.append(
            f"  {name}: {exit_text}, {run.seconds:.1f} s, peak RSS {run.max_rss_kb / 1024:.0f} MB: {last[0]}"
        )
    if outcome.orthanc is not None:
        lines.append(f"  orthanc: {outcome.orthanc.detail}")
    unexpected = outcome.unexpected()
    if unexpected:
        count = sum(outcome.reasons[r] for r in unexpected)
        lines.append(
            f"  failed as 'unexpected error' (unclear reasons, not counted as problems): {count}"
        )
        lines += [f"    {outcome.reasons[r]} x {r}" for r in unexpected]
    found = outcome.all_problems()
    lines.append(f"  problems: {len(found)}")
    return lines


def reason_kind(reason: str) -> str:
    """A reason with file-specific numbers dropped, for counting kinds of failure."""
    import re

    text = re.sub(r"/\S+", "PATH", reason)
    text = re.sub(r"\d+", "N", text)
    return text[:90]


def run_pipeline(
    workdir: Path,
    folder: Path,
    cases: Sequence[Case],
    cache_dir: Path,
    server: Any,
    timeout: float,
    dciodvfy: str | None = None,
    dciodvfy_sample: int = 10,
) -> FuzzRun:
    """process_dicom.py, generate_sr.py and upload_dicom.py once each over ``folder``, then
    every check. ``server`` is a started LocalOrthanc of the caller's own."""
    outcome = FuzzRun(len(cases))
    results, sr_dir = workdir / "results.json", workdir / "sr"
    env = dict(
        os.environ,
        ORTHANC_URL=server.url,
        ORTHANC_USERNAME=server.username,
        ORTHANC_PASSWORD=server.password,
    )
    process = run_bounded(
        "process_dicom.py", [folder, "-o", results, "--cache-dir", cache_dir], timeout, env, workdir
    )
    outcome.runs["process_dicom"] = process
    outcome.problems["process_dicom"] = script_problems(process)
    document, unreadable = load_results_document(results)
    if document is None:
        outcome.problems["accounting"] = [str(unreadable)]
        return outcome
    for entry in document.get("images") or []:
        outcome.statuses[str(entry.get("status"))] += 1
        if entry.get("status") != "classified":
            outcome.reasons[f"{entry.get('status')}: {reason_kind(str(entry.get('reason')))}"] += 1
    outcome.problems["accounting"] = accounting_problems(document, folder, cases)
    outcome.problems["messages"] = message_problems(document, process)

    generate = run_bounded(
        "generate_sr.py", ["--results", results, "--output-dir", sr_dir], timeout, env, workdir
    )
    outcome.runs["generate_sr"] = generate
    outcome.problems["generate_sr"] = script_problems(generate) + sr_problems(
        document, sr_dir, generate
    )
    srs = [p for p in sorted(sr_dir.glob("*.dcm")) if _is_sr(p)] if sr_dir.is_dir() else []
    outcome.sr_count = len(srs)
    if dciodvfy is not None and srs:
        sample = random.Random(len(srs)).sample(srs, min(dciodvfy_sample, len(srs)))
        outcome.problems["dciodvfy"] = dciodvfy_problems(sample, dciodvfy)
    dsrdump = shutil.which("dsrdump")
    if dsrdump is not None and srs:
        sample = random.Random(len(srs)).sample(srs, min(dciodvfy_sample, len(srs)))
        outcome.problems["dsrdump"] = dsrdump_problems(sample, dsrdump)

    inputs = [folder, sr_dir] if sr_dir.is_dir() else [folder]
    upload = run_bounded("upload_dicom.py", [*inputs, "--retries", "1"], timeout, env, workdir)
    outcome.runs["upload_dicom"] = upload
    outcome.problems["upload_dicom"] = script_problems(upload)
    outcome.orthanc = orthanc_state(server)
    if not outcome.orthanc.alive:
        outcome.problems["orthanc"] = [
            f"Orthanc did not survive the upload: {outcome.orthanc.detail}"
        ]
        if getattr(server, "process", None) is not None and server.process.poll() is not None:
            outcome.killers = find_orthanc_killers(server, folder)
            outcome.problems["orthanc"].append(
                "files that crash Orthanc when POSTed alone: "
                + (", ".join(outcome.killers) or "none found")
            )
    return outcome
