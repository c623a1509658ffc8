"""Domain gates: only human, frontal, upright chest radiographs reach the model.

The DenseNet learned from adult human frontal (PA/AP) chest X-rays shown the standard
way. Four gates read the header (never the pixels) and say what the file is:

- **species**: Patient Species Description (0010,2201) or Patient Species Code Sequence
  (0010,2202) naming anything but a human, (337915000, SCT, "Homo sapiens") (CID 7454);
- **view**: View Position (0018,5101) or View Code Sequence (0054,0220) naming a
  lateral, oblique or decubitus projection (CID 4010 "DX View"); PA and AP are the
  domain, and the projection is recorded; no view at all is accepted with a warning;
- **age**: a patient younger than 18 (Patient Age (0010,1010), else Patient Birth Date
  against the Study Date) is classified with a warning naming the age: the training
  data were mostly adults;
- **orientation**: Patient Orientation (0020,0020) says how the stored pixels lie.
  The model expects the standard display, ``L\\F``; an image stored rotated or mirrored
  is turned to ``L\\F`` exactly (a transpose and/or flips, no interpolation), and one
  that no rotation or flip explains is outside the domain.

Why ``L\\F`` (PS3.3 C.7.6.1.1.1): the first value is the patient direction of the rows
(from the first to the last pixel of a row: left to right on screen), the second that
of the columns (top to bottom). A chest radiograph is displayed as if facing the patient,
the patient's right on the viewer's left, head up (the radiological convention that
torchxrayvision's training sets follow): along a row the patient's Left, down a column
the Feet. This holds for AP as well as PA images: the projection changes which side the
beam entered, not how the image is displayed, and Patient Orientation describes the
stored pixels in patient terms whatever the projection. An AP image stored the way it
is displayed is therefore also ``L\\F``; one stored as seen from the tube side of a PA
exposure would say ``R\\F``, and is mirrored back. Values with more than one letter
(``LP\\F``, ``L\\FA``) describe an oblique or tilted image plane, and ``A``/``P`` as a
main direction a lateral one: no rotation by quarter turns makes those ``L\\F``.

One policy decides what a gate does (:class:`DomainPolicy`, like pydicom's validation
mode): ``strict`` skips what is outside the domain, ``warn`` classifies it with a
warning, ``off`` ignores the gates. Warnings that are not about the domain's edge
(a child, no view in the header) are given under ``strict`` and ``warn`` alike.
Re-orientation is not a gate: the header says how to show the image, so it is always
applied when it can be.

:func:`check_domain` is pure: a header in, a :class:`DomainDecision` out. process_dicom.py
applies it through :func:`cxrsr.dicomio.reading.read_radiograph`; a PACS watcher can call it on a
header before fetching any pixels.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


class DomainPolicy(enum.StrEnum):
    """What a gate does with an image outside the training domain (``--domain``)."""

    STRICT = "strict"
    """Skip it, with the reason."""
    WARN = "warn"
    """Classify it, with the reason as a warning (in the results and the SR)."""
    OFF = "off"
    """Classify it; the gates say nothing."""


#: (337915000, SCT, "Homo sapiens") and its retired SNOMED RT code (CID 7454).
HUMAN_SPECIES_CODES = {("SCT", "337915000"), ("SRT", "L-85B00")}
HUMAN_SPECIES_WORDS = {"HUMAN", "HOMO SAPIENS", "HOMO SAPIENS SAPIENS"}

#: View Position (0018,5101) defined terms (PS3.3 C.8.11.5, CR Series) and their kind.
FRONTAL_VIEW_POSITIONS = {"PA", "AP"}
OTHER_VIEW_POSITIONS = {
    "LL": "lateral",
    "RL": "lateral",
    "LATERAL": "lateral",
    "LAT": "lateral",
    "LLO": "oblique",
    "RLO": "oblique",
    "RLD": "decubitus",
    "LLD": "decubitus",
}

#: CID 4010 "DX View" codes of a frontal projection, and the projection they record.
FRONTAL_VIEW_CODES = {
    ("SCT", "272479007"): "PA",  # postero-anterior
    ("SCT", "399348003"): "AP",  # antero-posterior
    ("SCT", "399033003"): "frontal",  # frontal, PA or AP not said
    ("SRT", "R-10214"): "PA",
    ("SRT", "R-10206"): "AP",
}
FRONTAL_VIEW_MEANINGS = {"postero-anterior": "PA", "antero-posterior": "AP", "frontal": "frontal"}

#: View Position terms as CID 4010 codes, for the SR's Image View (111031) when the image
#: has no View Code Sequence.
VIEW_POSITION_CODES = {
    "PA": codes.cid4010.PosteroAnterior,
    "AP": codes.cid4010.AnteroPosterior,
    "LL": codes.cid4010.LeftLateral,
    "RL": codes.cid4010.RightLateral,
}

#: PS3.3 C.7.6.1.1.1: Anterior, Posterior, Right, Left, Head, Feet.
_DIRECTION_LETTERS = set("APRLHF")

ADULT_AGE_YEARS = 18

#: Results-entry keys a decision adds (besides warnings); see :meth:`DomainDecision.record`.
ENTRY_KEYS = ("projection", "patient_orientation", "orientation_transform", "domain_warnings")


@dataclass(frozen=True)
class Reorientation:
    """An exact turn or mirror of the stored pixels that makes them ``L\\F``.

    Applied as: transpose (if ``transpose``), then mirror left-right, then top-bottom.
    ``name`` says what a viewer would do; the same operation as Pillow's
    ``Image.Transpose`` member in brackets: ``none``, ``flip_left_right``
    (FLIP_LEFT_RIGHT), ``flip_top_bottom`` (FLIP_TOP_BOTTOM), ``rotate_180``
    (ROTATE_180), ``rotate_90_counterclockwise`` (ROTATE_90), ``rotate_90_clockwise``
    (ROTATE_270), ``transpose`` (TRANSPOSE), ``transverse`` (TRANSVERSE).
    """

    transpose: bool = False
    flip_left_right: bool = False
    flip_top_bottom: bool = False

    @property
    def name(self) -> str:
        return _TRANSFORM_NAMES[(self.transpose, self.flip_left_right, self.flip_top_bottom)]

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_left_right or self.flip_top_bottom)

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """The pixels as the model must see them (a contiguous copy unless nothing changes)."""
        if self.is_identity:
            return pixels
        out = pixels.T if self.transpose else pixels
        if self.flip_left_right:
            out = out[:, ::-1]
        if self.flip_top_bottom:
            out = out[::-1, :]
        return np.ascontiguousarray(out)


_TRANSFORM_NAMES = {
    (False, False, False): "none",
    (False, True, False): "flip_left_right",
    (False, False, True): "flip_top_bottom",
    (False, True, True): "rotate_180",
    (True, False, False): "transpose",
    (True, True, False): "rotate_90_clockwise",
    (True, False, True): "rotate_90_counterclockwise",
    (True, True, True): "transverse",
}
IDENTITY = Reorientation()


@dataclass(frozen=True)
class Concern:
    """One gate's finding about a header."""

    gate: str
    message: str
    outside: bool
    """True: the image is outside the training domain (skipped under ``strict``).
    False: a caveat to report, never a reason to skip."""


@dataclass(frozen=True)
class DomainDecision:
    """What :func:`check_domain` says about one image."""

    skip_reason: str | None
    """Why the image must not be classified (``strict`` only), else ``None``."""
    warnings: tuple[str, ...] = ()
    """Caveats to keep with the result (results file and SR)."""
    reorientation: Reorientation = IDENTITY
    """Apply to the decoded pixels before preprocessing."""
    projection: str = ""
    """The projection: PA, AP, frontal, another view as the header names it, or ""."""
    patient_orientation: str = ""
    """Patient Orientation as stored (``R\\F``), "" when absent."""
    concerns: tuple[Concern, ...] = field(default=(), compare=False)

    def record(self) -> dict[str, Any]:
        """The facts a results entry carries (:data:`ENTRY_KEYS`)."""
        return {
            "projection": self.projection,
            "patient_orientation": self.patient_orientation,
            "orientation_transform": self.reorientation.name,
            "domain_warnings": list(self.warnings),
        }


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _code(item: Dataset) -> tuple[str, str, str]:
    """(designator, value, meaning) of a code item; Long/URN Code Value when the short is absent."""
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
    return _text(item, "CodingSchemeDesignator").upper(), value, _text(item, "CodeMeaning")


def _sequence(ds: Dataset, keyword: str) -> Iterable[Dataset]:
    value = ds.get(keyword)
    return value if value else ()


# --- the gates ---------------------------------------------------------------------------


def species_concerns(ds: Dataset) -> list[Concern]:
    """Species gate: anything the header names that is not a human."""
    found = []
    description = _text(ds, "PatientSpeciesDescription")
    if description and description.upper() not in HUMAN_SPECIES_WORDS:
        found.append(description)
    for item in _sequence(ds, "PatientSpeciesCodeSequence"):
        scheme, value, meaning = _code(item)
        if (scheme, value) in HUMAN_SPECIES_CODES:
            continue
        if scheme == "SCT" or meaning.upper() not in HUMAN_SPECIES_WORDS:
            found.append(f"{meaning or 'no meaning'}, {scheme} {value}".strip(", "))
    return [
        Concern(
            "species",
            f"veterinary image ({name}): the model was trained on human chest X-rays",
            outside=True,
        )
        for name in dict.fromkeys(found)
    ]


def view_of(ds: Dataset) -> tuple[str, list[Concern]]:
    """View gate: the recorded projection and the concerns about it.

    The projection is View Position's when it is a defined term, else the View Code
    Sequence's; either one naming a lateral, oblique or decubitus view is a concern.
    """
    concerns: list[Concern] = []
    position = _text(ds, "ViewPosition").upper()
    projection = (
        position if position in FRONTAL_VIEW_POSITIONS | OTHER_VIEW_POSITIONS.keys() else ""
    )
    if position in OTHER_VIEW_POSITIONS:
        concerns.append(_not_frontal(OTHER_VIEW_POSITIONS[position], f"View Position {position}"))
    elif position and not projection:
        concerns.append(
            Concern(
                "view",
                f"View Position {position!r} is not a known projection: the header cannot "
                "confirm a frontal (PA/AP) view",
                outside=False,
            )
        )
    view_codes = list(_sequence(ds, "ViewCodeSequence"))[:1]  # Type 1C, a single item
    for item in view_codes:
        scheme, value, meaning = _code(item)
        frontal = FRONTAL_VIEW_CODES.get((scheme, value))
        if frontal is None and scheme != "SCT":
            frontal = FRONTAL_VIEW_MEANINGS.get(meaning.lower())
        projection = projection or frontal or meaning or value
        if frontal is None:
            words = meaning.lower()
            kind = next(
                (k for k in ("decubitus", "oblique", "lateral") if k in words), "non-frontal"
            )
            named = f"View Code Sequence {meaning or 'no meaning'}, {scheme} {value}"
            concerns.append(_not_frontal(kind, named))
    if not position and not view_codes:
        concerns.append(
            Concern(
                "view",
                "no View Position or View Code Sequence: the header cannot confirm a frontal "
                "(PA/AP) view",
                outside=False,
            )
        )
    return projection, concerns


def view_code(ds: Dataset) -> Code | None:
    """The image's view as a CID 4010 code: View Code Sequence's, else View Position's."""
    for item in list(_sequence(ds, "ViewCodeSequence"))[:1]:
        scheme, value, meaning = _code(item)
        if scheme and value and meaning:
            return Code(value, scheme, meaning)
    return VIEW_POSITION_CODES.get(_text(ds, "ViewPosition").upper())


def _not_frontal(kind: str, named: str) -> Concern:
    return Concern(
        "view",
        f"{kind} view ({named}): the model was trained on frontal (PA/AP) chest X-rays",
        outside=True,
    )


_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_UNITS = {"D": ("day", 1 / 365.25), "W": ("week", 7 / 365.25), "M": ("month", 1 / 12)}


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"


def _date(value: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(value.replace(".", ""), "%Y%m%d").date()
    except ValueError:
        return None


def age_of(ds: Dataset) -> tuple[float, str] | None:
    """The patient's age in years at the study and how to say it, or ``None`` if unknown.

    Patient Age (AS, ``nnnD|W|M|Y``) first: it is what the modality recorded. A bare
    number (``"62"``, as in NIH and SIIM exports, not valid AS) is read as years.
    Otherwise Patient Birth Date against the Study Date (or the Acquisition or Content
    Date when the study has none).
    """
    age = _text(ds, "PatientAge").upper()
    match = _AGE.match(age)
    if match:
        count, unit = int(match[1]), match[2] or "Y"
        if unit == "Y":
            return float(count), f"{_plural(count, 'year')} (Patient Age {age})"
        name, years = _UNITS[unit]
        return count * years, f"{_plural(count, name)} (Patient Age {age})"
    birth = _date(_text(ds, "PatientBirthDate"))
    if birth is None:
        return None
    dated = [
        (label, when)
        for keyword, label in (
            ("StudyDate", "Study Date"),
            ("AcquisitionDate", "Acquisition Date"),
            ("ContentDate", "Content Date"),
        )
        if (when := _date(_text(ds, keyword))) is not None
    ]
    if not dated:
        return None
    label, when = dated[0]
    if when < birth:
        return None
    months = (when.year - birth.year) * 12 + when.month - birth.month - (when.day < birth.day)
    source = f"Patient Birth Date {birth:%Y%m%d}, {label} {when:%Y%m%d}"
    if months >= 12:
        said = _plural(months // 12, "year")
    elif months >= 1:
        said = _plural(months, "month")
    else:
        said = _plural((when - birth).days, "day")
    return months / 12, f"{said} ({source})"


def age_concerns(ds: Dataset) -> list[Concern]:
    """Age gate: a child is classified, with a warning that names the age."""
    age = age_of(ds)
    if age is None or age[0] >= ADULT_AGE_YEARS:
        return []
    return [
        Concern(
            "age",
            f"paediatric patient, age {age[1]}: the model was trained mostly on adult chest X-rays",
            outside=False,
        )
    ]


def orientation_values(ds: Dataset) -> list[str]:
    """Patient Orientation's values, upper case; empty when absent or empty."""
    value = ds.get("PatientOrientation")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip().upper() for part in value.split("\\")]
    return [str(part).strip().upper() for part in value]


def reorientation_for(values: list[str]) -> Reorientation | None:
    """The exact transform that makes pixels lying as ``values`` say lie ``L\\F``, or ``None``."""
    if len(values) != 2 or any(len(v) != 1 or v not in _DIRECTION_LETTERS for v in values):
        return None
    row, column = values
    if {row, column} & {"A", "P"} or (row in "LR") == (column in "LR"):
        return None
    transpose = row in "HF"
    rows_run, columns_run = (column, row) if transpose else (row, column)
    return Reorientation(transpose, rows_run == "R", columns_run == "H")


def orientation_of(ds: Dataset) -> tuple[str, Reorientation, list[Concern]]:
    """Orientation gate: the stored value, the transform to ``L\\F``, the concerns."""
    values = orientation_values(ds)
    shown = "\\".join(values)
    if not values:
        # Type 2 in CR: empty means unknown. Every viewer then shows the pixels as stored,
        # so the model sees what the radiologist sees; nothing to warn about.
        return "", IDENTITY, []
    transform = reorientation_for(values)
    if transform is not None:
        return shown, transform, []
    concern = Concern(
        "orientation",
        f"orientation (Patient Orientation {shown}): no rotation or mirroring makes it the "
        "standard display L\\F (an oblique, lateral or tilted image plane)",
        outside=True,
    )
    return shown, IDENTITY, [concern]


# --- the decision ------------------------------------------------------------------------


def check_domain(ds: Dataset, policy: DomainPolicy | str = DomainPolicy.STRICT) -> DomainDecision:
    """Apply every gate to a header (pixels are never read) under ``policy``."""
    policy = DomainPolicy(policy)
    projection, view_concerns = view_of(ds)
    orientation, reorientation, orientation_concerns = orientation_of(ds)
    concerns = species_concerns(ds) + view_concerns + age_concerns(ds) + orientation_concerns
    decision = DomainDecision(
        skip_reason=None,
        reorientation=reorientation,
        projection=projection,
        patient_orientation=orientation,
        concerns=tuple(concerns),
    )
    if policy is DomainPolicy.OFF:
        return decision
    outside = [c.message for c in concerns if c.outside]
    caveats = [c.message for c in concerns if not c.outside]
    if policy is DomainPolicy.STRICT and outside:
        return dataclasses.replace(decision, skip_reason="; ".join(outside))
    flagged = [f"{message} (classified anyway: --domain warn)" for message in outside]
    return dataclasses.replace(decision, warnings=tuple(flagged + caveats))


def entry_fields(identity: dict[str, Any]) -> dict[str, Any]:
    """The :data:`ENTRY_KEYS` an image's identity carries, for its results entry."""
    return {key: identity[key] for key in ENTRY_KEYS if key in identity}
