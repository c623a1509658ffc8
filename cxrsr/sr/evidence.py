"""The source header an SR is made from: re-read, checked, and cleaned for copying.

An SR copies Patient and Study from its source (PS3.3 C.17.1). The source is re-read and
its UIDs checked against the results entry (:func:`read_source_header`), so an SR is never
filed against another image; values that break their VR are emptied, which PS3.5 7.4
allows for Type 2 and 3 attributes, and reported (:func:`evidence_dataset`,
:func:`emptied_notes`). The key image starts from the same cleaned header.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.valuerep import VR, validate_value

from cxrsr.dicomio.discovery import open_source
from cxrsr.errors import InputError
from cxrsr.sr.entries import IDENTITY_KEYS, Classification
from cxrsr.sr.times import utc_offset

#: Attributes that place the SR in the PACS. They are copied even when the source's value
#: breaks its VR, because an SR that validates but lands in the wrong patient or study is
#: worse than a validator error (the source already carries the same value).
PLACEMENT_KEYWORDS = frozenset({"PatientID", "StudyInstanceUID"})

#: Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) attributes of Type 2: present, and
#: empty when the source has no value (a source without PatientID gets an empty one).
TYPE_2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class SourceError(InputError):
    """The source named by a results entry is gone, unreadable, or not the classified image."""


def read_source_header(classification: Classification) -> Dataset:
    """Re-read the source's header and check it is still the image that was classified.

    ``force=True`` because some sources have no preamble or file meta (ACR-NEMA style,
    PS3.10 7.1 not followed). A source that has gone, or whose UIDs no longer match the
    results entry, raises :class:`SourceError`: an SR must never be filed against an
    image other than the one the scores came from.
    """
    path = classification.path
    try:
        with open_source(path).open() as stream:
            header = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
    except (FileNotFoundError, KeyError):
        raise SourceError(f"{path}: source file has gone since classification") from None
    except Exception as exc:  # pydicom raises many types for unreadable input
        raise SourceError(f"{path}: cannot read the source header: {exc}") from exc
    for key, keyword in IDENTITY_KEYS.items():
        found = str(header.get(keyword, ""))
        expected = getattr(classification, key)
        if found != expected:
            raise SourceError(
                f"{path}: source changed since classification: {keyword} is "
                f"{found or '(none)'!r}, the results file says {expected!r}"
            )
    return header


def evidence_dataset(header: Dataset) -> tuple[Dataset, dict[str, str]]:
    """The source header as highdicom's ``evidence``, and the values that had to be emptied.

    highdicom copies Patient and Study from ``evidence[0]`` and reads ``PatientID`` and
    friends as attributes, so a source without them (the Barre sample has no PatientID)
    gets them empty here, exactly as PS3.3 Type 2 allows.

    Sources in the wild carry values that break their VR (PS3.5 6.2): the Canon sample has
    a 56-character hash as Accession Number (SH, at most 16) and as Patient's Birth Date
    (DA). Copied as they are, the SR would fail validation; the attributes concerned are
    Type 2 or 3, so they are emptied, which PS3.5 7.4 allows for both. Placement attributes
    (:data:`PLACEMENT_KEYWORDS`) are never changed. A Timezone Offset From UTC that is not
    an offset is removed: the SR then states none (:mod:`cxrsr.sr.times`).
    """
    evidence = Dataset()
    evidence.update(header)
    emptied: dict[str, str] = {}
    for element in list(evidence):
        # Elements the header had already converted are shared with it: each change goes
        # to a copy, so the header is left as read (the key image and the SR both start
        # from it, and each reports what it emptied).
        standard = _standard_vr(element)
        if element.keyword in PLACEMENT_KEYWORDS:
            if standard is not None:  # the value places the SR: kept, under the right VR
                evidence[element.tag] = fixed = copy.copy(element)
                fixed.VR = standard
            continue
        if standard is not None:
            # The element says one VR, the standard another (a damaged header; the fuzz test
            # found Patient's Name with VR AS): written with the standard's VR and no value,
            # since the value was read by the other VR's rules.
            emptied[element.keyword] = f"has VR {element.VR}, where the standard says {standard}"
            evidence[element.tag] = fixed = copy.copy(element)
            fixed.VR, fixed.value = standard, None
            continue
        problem = _vr_violation(element)
        if problem is not None:
            emptied[element.keyword] = problem
            evidence[element.tag] = fixed = copy.copy(element)
            fixed.value = None
    offset = evidence.get("TimezoneOffsetFromUTC")
    if offset is not None and utc_offset(evidence) is None:
        emptied["TimezoneOffsetFromUTC"] = f"{offset!r} is not an offset from UTC (&ZZXX)"
        del evidence.TimezoneOffsetFromUTC
    for keyword in TYPE_2_PATIENT_STUDY:
        if keyword not in evidence or evidence[keyword].value is None:
            setattr(evidence, keyword, "")
    return evidence, emptied


#: VRs whose values pydicom checks against PS3.5 6.2 (character repertoire and length).
_CHECKED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI"})


#: Control characters a value may hold (PS3.5 6.1.2, 6.2): ESC (ISO 2022 code extensions)
#: in every string VR, and TAB, LF, FF, CR in the text VRs. pydicom does not check these.
_ALLOWED_CONTROLS = {"\x1b"}
_TEXT_CONTROLS = {"\x1b", "\t", "\n", "\x0c", "\r"}
_TEXT_VRS = frozenset({"LT", "ST", "UT"})


def _control_character(vr: str, value: str) -> str | None:
    allowed = _TEXT_CONTROLS if vr in _TEXT_VRS else _ALLOWED_CONTROLS
    for character in value:
        if (ord(character) < 0x20 or ord(character) == 0x7F) and character not in allowed:
            return f"control character {character!r}"
    return None


def _standard_vr(element: pydicom.DataElement) -> str | None:
    """The standard's VR for a public element that carries another one, else ``None``."""
    if element.tag.is_private or element.VR in (VR.UN, VR.SQ):
        return None
    try:
        standard = dictionary_VR(element.tag)
    except KeyError:  # not in the dictionary: nothing to hold it against
        return None
    allowed = standard.split(" or ")  # "US or SS", "OB or OW"
    return None if element.VR in allowed else allowed[0]


def _vr_violation(element: pydicom.DataElement) -> str | None:
    """Why a string element's value breaks its VR, or ``None`` if it does not."""
    checked = element.VR in _CHECKED_VRS or element.VR in _TEXT_VRS
    if not checked or element.value in (None, ""):
        return None
    values = element.value if element.VM > 1 else [element.value]
    for value in values:
        control = _control_character(element.VR, str(value))
        if control is not None:
            return f"{value!r} is not a valid {element.VR}: it holds a {control}"
        if element.VR in _TEXT_VRS:
            continue
        try:
            validate_value(element.VR, str(value), pydicom.config.RAISE)
        except ValueError as exc:
            return f"{value!r} is not a valid {element.VR}: {exc}"
    return None


def emptied_notes(
    classification: Classification, sr: Dataset, emptied: Mapping[str, str]
) -> list[tuple[int, str]]:
    """The warnings for source values that broke their VR and were written empty or left out."""
    notes = []
    for keyword, problem in emptied.items():
        if keyword == "TimezoneOffsetFromUTC":
            outcome = "the SR states no offset"
        elif keyword in sr:
            outcome = "written empty in the SR"
        else:
            continue
        notes.append(
            (logging.WARNING, f"{classification.path}: source's {keyword} {problem}; {outcome}")
        )
    return notes
