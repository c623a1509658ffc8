"""The SR builder: one TID 1500 Comprehensive 3D SR per classified radiograph.

The document (``shared/docs/sr-design.md`` Appendix A.1):

- IOD Comprehensive 3D SR (PS3.3 A.35.13), root TID 1500 "Imaging Measurement Report",
  as IHE AI Results requires for image-level AI findings;
- one TID 1501 measurement group per model label: the finding's code, the score as NUM
  (111012, DCM, "Certainty of Finding") with a Measurement Method saying it is an
  operating-point normalised score, a Present/Absent CODE, TID 4019 algorithm
  identification and an IMAGE reference to the source;
- a TID 1600 image library entry, a TID 1004 device observer context, the source in
  Current Requested Procedure Evidence Sequence, the model in Contributing Equipment.

Placement (PS3.3 C.17.1): Patient and Study are copied from the source image; the SR
gets its own series (Modality SR) in the source's study, because SR documents never
reside in a series of images. There is one SR series per source series and model weights.

The SOP Instance UID is derived from the document's complete content
(:func:`cxrsr.sr.uids.content_uid`): the same results make the same file, and two documents
that differ in any byte (another classification time, a value copied from a changed
source header) are two instances. Times are in the source's Timezone Offset From UTC, or
UTC clock values without an offset when the source states none (:mod:`cxrsr.sr.times`),
never the host's zone; Software Versions is :func:`cxrsr.sr.uids.software_versions`, not
the package version. So the same results give the same bytes on every host and after an
upgrade that leaves the encoding alone. Running the builder over a whole results file is
:mod:`cxrsr.sr.batch`'s job.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID
from pydicom.valuerep import DT, VR, validate_value

from cxrsr.dicomio.discovery import open_source
from cxrsr.dicomio.domain import view_code
from cxrsr.errors import InputError, PipelineError
from cxrsr.files import write_atomic
from cxrsr.results import ModelRecord
from cxrsr.sr import uids
from cxrsr.sr.codes import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    NO_UNITS,
    OPERATING_POINT_METHOD,
    PRESENT,
    PRIVATE_SCHEME,
    PRIVATE_SCHEME_NAME,
    PRIVATE_SCHEME_ORGANIZATION,
    PROCEDURE_REPORTED,
    finding_for_label,
)
from cxrsr.sr.keyimage import KeyImageRef
from cxrsr.sr.template import ContentTemplate, character_encodings, encode_document
from cxrsr.sr.times import document_time, state_time_zone, utc_offset

log = logging.getLogger("cxrsr")

#: Series Number of every SR series (PS3.3 C.17.1 requires one; a fixed, high number keeps
#: the AI series after the acquired ones in a viewer's series list).
SR_SERIES_NUMBER = 9901

#: Series Description (LO, at most 64 characters, ASCII so any source character set holds it).
SR_SERIES_DESCRIPTION = "AI CXR classification - NOT FOR DIAGNOSTIC USE"

#: General Equipment of the SR: the software that wrote it.
SR_MANUFACTURER = "cxrsr"
SR_MANUFACTURER_MODEL_NAME = "generate_sr.py"

#: Who publishes the model (TID 4019 Algorithm Manufacturer, TID 1004, Contributing Equipment).
MODEL_MANUFACTURER = "mlmed/torchxrayvision"

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

#: TID 1500 row 12: the root's container of qualitative evaluations (CODE and TEXT items).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: Keys of a results entry checked against the source header before an SR is written.
IDENTITY_KEYS = {
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "sop_class_uid": "SOPClassUID",
}


class SourceError(InputError):
    """The source named by a results entry is gone, unreadable, or not the classified image."""


class EntryError(InputError):
    """A results entry that cannot make an SR (missing keys, wrong types, invalid UIDs).

    It costs that entry only: the rest of the results file still makes its SRs.
    """


@dataclass(frozen=True)
class ModelInfo:
    """The ``model`` block of a results file: which network, which weights, what scores mean."""

    model_id: str
    weights_sha256: str
    torchxrayvision: str
    labels: tuple[str, ...]
    threshold: float
    score_kind: str
    int8_sha256: str = ""
    """SHA-256 of the int8 ONNX model that computed the scores ('' for fp32)."""

    @classmethod
    def from_results(cls, model: ModelRecord) -> ModelInfo:
        """Check the block; anything missing means the file cannot make an SR (exit 2)."""
        missing = [k for k in ("weights", "weights_sha256", "torchxrayvision") if not model.get(k)]
        if missing:
            raise PipelineError(f"results file: model lacks {', '.join(missing)}", exit_code=2)
        labels = model["labels"]
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise PipelineError("results file: model.labels must be non-empty strings", 2)
        if len(set(labels)) != len(labels):
            raise PipelineError("results file: model.labels has duplicates", exit_code=2)
        threshold = model.get("threshold", 0.5)
        if not _is_finite_number(threshold):
            raise PipelineError("results file: model.threshold is not a number", exit_code=2)
        # A reduced precision computes other scores: another algorithm, with its own UIDs.
        precision = str(model.get("precision") or "fp32")
        int8 = precision == "int8" and model.get("int8_onnx_sha256")
        return cls(
            model_id=str(model["weights"]) + ("" if precision == "fp32" else f" {precision}"),
            weights_sha256=str(model["weights_sha256"]),
            torchxrayvision=str(model["torchxrayvision"]),
            labels=tuple(labels),
            threshold=float(threshold),
            score_kind=str(model.get("score_kind", "")),
            int8_sha256=str(model["int8_onnx_sha256"]) if int8 else "",
        )

    @property
    def algorithm_name(self) -> str:
        return f"torchxrayvision {self.model_id}"

    @property
    def algorithm_version(self) -> str:
        version = f"{self.torchxrayvision}; weights sha256:{self.weights_sha256}"
        return f"{version}; int8 onnx sha256:{self.int8_sha256}" if self.int8_sha256 else version

    @property
    def algorithm_parameters(self) -> list[str]:
        """TID 4019 Algorithm Parameters: what a reader needs to interpret the scores."""
        return [
            f"threshold={self.threshold:g}",
            "score=operating-point normalised (0.5 = the label's operating point), "
            "not a probability",
        ]

    @property
    def device_uid(self) -> str:
        return uids.device_observer_uid(self.model_id, self.weights_sha256)


def _parse_time(value: object, where: str) -> datetime.datetime | None:
    """An ISO 8601 ``classified_at`` as an aware datetime (UTC when no offset is given)."""
    if value is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise EntryError(f"{where}: classified_at {value!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


#: The UIDs a results entry must carry, as the messages name them.
ENTRY_UIDS = {
    "sop_class_uid": "SOP Class UID",
    "sop_instance_uid": "SOP Instance UID",
    "series_instance_uid": "Series Instance UID",
    "study_instance_uid": "Study Instance UID",
}


@dataclass(frozen=True)
class Classification:
    """One ``classified`` results entry, checked: a score and a call for every label."""

    path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    scores: tuple[float, ...]
    present: tuple[bool, ...]
    classified_at: datetime.datetime | None = None
    """When process_dicom.py first produced this result: the SR's Content Date/Time."""
    domain_warnings: tuple[str, ...] = ()
    """The domain gates' caveats (a child, a view outside the domain): notes in the SR."""
    key_image: KeyImageRef | None = None
    """The key image generate_sr.py writes beside this SR, which the SR references."""

    @classmethod
    def from_entry(cls, entry: object, model: ModelInfo, index: int) -> Classification:
        """Check one entry; a bad one raises :class:`EntryError` (that entry gets no SR).

        Entries come from a file anyone can edit and from sources a fuzzer may have
        mangled, so every key, type and UID is checked here, before the source is opened.
        """
        if not isinstance(entry, Mapping):
            raise EntryError(f"results file: images[{index}]: not an object")
        path = entry.get("path")
        where = f"results file: images[{index}]" + (f" ({path})" if path else "")
        missing = [
            key for key in ("path", *IDENTITY_KEYS, "scores", "findings") if key not in entry
        ]
        if missing:
            raise EntryError(f"{where}: lacks {', '.join(missing)}")
        for key in ("path", *IDENTITY_KEYS):
            if not isinstance(entry[key], str) or not entry[key]:
                raise EntryError(f"{where}: '{key}' must be a non-empty string")
        bad_uids = [
            f"{name} {entry[key]!r} is not a valid DICOM UID (PS3.5 9.1): it {problem}"
            for key, name in ENTRY_UIDS.items()
            if (problem := uids.uid_problem(entry[key])) is not None
        ]
        if bad_uids:
            raise EntryError(
                f"{path}: {'; '.join(bad_uids)}; an SR referencing it would be invalid DICOM "
                "(fix the source's UIDs first)"
            )
        scores = entry["scores"]
        findings = entry["findings"]
        if not isinstance(scores, dict) or not isinstance(findings, list):
            raise EntryError(f"{where}: scores must be an object, findings a list")
        missing = [label for label in model.labels if label not in scores]
        if missing:
            raise EntryError(f"{where}: no score for {', '.join(missing)}")
        bad = [label for label in model.labels if not _is_finite_number(scores[label])]
        if bad:
            raise EntryError(f"{where}: score of {', '.join(bad)} is not a number")
        unknown = [repr(label) for label in findings if label not in model.labels]
        if unknown:
            raise EntryError(f"{where}: findings name unknown {', '.join(unknown)}")
        notes = entry.get("domain_warnings") or []
        if not isinstance(notes, list) or not all(isinstance(n, str) and n for n in notes):
            raise EntryError(f"{where}: 'domain_warnings' must be a list of strings")
        return cls(
            path=entry["path"],
            sop_instance_uid=entry["sop_instance_uid"],
            series_instance_uid=entry["series_instance_uid"],
            study_instance_uid=entry["study_instance_uid"],
            sop_class_uid=entry["sop_class_uid"],
            scores=tuple(float(scores[label]) for label in model.labels),
            present=tuple(label in findings for label in model.labels),
            classified_at=_parse_time(entry.get("classified_at"), where),
            domain_warnings=tuple(notes),
        )

    def content_datetime(self, fallback: datetime.datetime) -> datetime.datetime:
        """Content Date/Time: when the result was made, else ``fallback`` (older results files)."""
        return self.classified_at or fallback

    def result_digest(self, model: ModelInfo) -> str:
        """SHA-256 over what the model said about the image (labels, scores, calls, meaning).

        Floats are written by ``json`` as their shortest round-trip repr, so the digest
        changes exactly when a score does. Not the SR's identity (that is its whole
        content, :func:`cxrsr.sr.uids.content_uid`); used to tell entries apart.
        """
        payload = {
            "labels": model.labels,
            "scores": self.scores,
            "present": self.present,
            "threshold": model.threshold,
            "score_kind": model.score_kind,
        }
        if self.domain_warnings:
            payload["domain_warnings"] = self.domain_warnings
        if self.key_image is not None:
            payload["key_image"] = self.key_image.sop_instance_uid
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def sr_series_uid(self, model: ModelInfo) -> str:
        return uids.sr_series_uid(self.series_instance_uid, model.model_id, model.weights_sha256)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- the source -------------------------------------------------------------------------


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


# --- the document -----------------------------------------------------------------------


def measurement_group(
    label: str,
    score: float,
    present: bool,
    model: ModelInfo,
    algorithm: hd.sr.AlgorithmIdentification,
    source_image: hd.sr.SourceImageForMeasurementGroup,
    sr_instance_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one label: finding, score (NUM), call (CODE), algorithm, source image."""
    finding = finding_for_label(label)
    sites = [hd.sr.FindingSite(finding.finding_site)] if finding.finding_site else None
    certainty = hd.sr.Measurement(
        name=CERTAINTY_OF_FINDING,
        value=score,
        unit=NO_UNITS,
        method=OPERATING_POINT_METHOD,
    )
    call = hd.sr.QualitativeEvaluation(name=finding.code, value=PRESENT if present else ABSENT)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=f"xrv-{label}", uid=uids.tracking_uid(sr_instance_uid, label)
        ),
        finding_type=finding.code,
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=[certainty],
        qualitative_evaluations=[call],
        source_images=[source_image],
    )


def measurement_report(
    evidence: Dataset, classification: Classification, model: ModelInfo, sr_instance_uid: str
) -> hd.sr.MeasurementReport:
    """TID 1500 root: device observer, procedure, image library, one group per label."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.algorithm_name,
        version=model.algorithm_version,
        parameters=model.algorithm_parameters,
        manufacturer=MODEL_MANUFACTURER,
    )
    source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)
    groups = [
        measurement_group(label, score, present, model, algorithm, source_image, sr_instance_uid)
        for label, score, present in zip(
            model.labels, classification.scores, classification.present, strict=True
        )
    ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name=model.algorithm_name,
        manufacturer_name=MODEL_MANUFACTURER,
        model_name=model.model_id,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    # TID 1500 row 6: the Image Library comes before the Imaging Measurements (the last item).
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, image_library(evidence))
    if classification.domain_warnings:
        root_items.append(domain_notes(classification.domain_warnings))
    return report


def domain_notes(notes: tuple[str, ...]) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 Qualitative Evaluations: one TEXT (121106, DCM, "Comment") per caveat.

    The domain gates' warnings (a child, a view or species outside the training domain
    classified under ``--domain warn``) belong with the result, in words a reader sees.
    """
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(codes.DCM.Comment, note, hd.sr.RelationshipTypeValues.CONTAINS)
            for note in notes
        ]
    )
    return container


def image_library(image: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one TID 1601 entry for the source image.

    Built here rather than by highdicom's ``ImageLibrary``, which requires Patient
    Orientation and Imager Pixel Spacing for every CR/DX image (TID 1603); both are Type 2
    in CR and DX and often empty, so they are described only when the source has them.
    OHIF 3 needs the library to exist (it reads (111028) unconditionally).
    """
    entry = hd.sr.ImageContentItem(
        name=codes.SCT.Source,
        referenced_sop_class_uid=image.SOPClassUID,
        referenced_sop_instance_uid=image.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    entry.ContentSequence = hd.sr.ContentSequence(image_descriptors(image))
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group.ContentSequence = hd.sr.ContentSequence([entry])
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def image_descriptors(image: Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 (Modality, Rows, Columns, Image View) and TID 1603 (orientation, spacing)."""
    acquisition = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    pixels = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
    items: list[hd.sr.ContentItem] = []
    modality = _coded_modality(str(image.get("Modality", "")))
    if modality is not None:
        items.append(hd.sr.CodeContentItem(codes.DCM.Modality, modality, acquisition))
    for name, keyword in (
        (codes.DCM.PixelDataRows, "Rows"),
        (codes.DCM.PixelDataColumns, "Columns"),
    ):
        if image.get(keyword):
            items.append(
                hd.sr.NumContentItem(
                    name, int(image[keyword].value), pixels, relationship_type=acquisition
                )
            )
    view = view_code(image)
    if view is not None:
        # The projection (AP films look different; readers want to know), as TID 4020 row 3.
        items.append(hd.sr.CodeContentItem(codes.DCM.ImageView, view, acquisition))
    orientation = image.get("PatientOrientation")
    spacing = image.get("ImagerPixelSpacing")
    if orientation and len(orientation) == 2 and spacing and len(spacing) == 2:
        items += [
            hd.sr.TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], acquisition),
            hd.sr.TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], acquisition),
            hd.sr.NumContentItem(
                codes.DCM.HorizontalPixelSpacing,
                float(spacing[1]),
                codes.UCUM.Millimeter,
                relationship_type=acquisition,
            ),
            hd.sr.NumContentItem(
                codes.DCM.VerticalPixelSpacing,
                float(spacing[0]),
                codes.UCUM.Millimeter,
                relationship_type=acquisition,
            ),
        ]
    return items


def _coded_modality(modality: str) -> Code | None:
    """The CID 29 "Acquisition Modality" code of a Modality value, or ``None``."""
    for name in codes.cid29.dir():
        code = getattr(codes.cid29, name)
        if code.value == modality:
            return code
    return None


def model_equipment(model: ModelInfo, when: datetime.datetime) -> hd.ContributingEquipment:
    """The model as Contributing Equipment (109102, DCM, "Processing Equipment"), PS3.3 C.12.1.

    DCM defines 109102 to include "a software component that ... applies an AI model";
    IHE AIR's (Newcode1, 99IHE) placeholder predates it.
    """
    return hd.ContributingEquipment(
        manufacturer=MODEL_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.model_id,
        # Software Versions is LO (64 characters a value): the full digest is in the
        # Algorithm Version of every measurement group and in the Device Observer UID.
        software_versions=[
            f"torchxrayvision {model.torchxrayvision}",
            f"weights sha256:{model.weights_sha256[:16]}",
        ],
        contribution_datetime=when,
        contribution_description="image-level classification of a chest radiograph",
    )


def private_coding_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    """PS3.3 C.12.1.1.4: a private scheme used in the document must be identified."""
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


def sr_document(
    evidence: Dataset,
    content: Dataset,
    header: Dataset,
    classification: Classification,
    model: ModelInfo,
    content_datetime: datetime.datetime,
    sop_instance_uid: str,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR around a root ``content`` item; both build paths share it.

    ``content_datetime`` (timezone-aware) becomes Content Date/Time, "the date the document
    content creation started" (PS3.3 C.17.2): the caller passes when the classification
    was made, not the wall clock, so a rerun writes the same bytes. It is stated in the
    source's time zone, or in UTC (:func:`cxrsr.sr.times.document_time`).
    """
    when = document_time(content_datetime, evidence)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=content,
        series_instance_uid=classification.sr_series_uid(model),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=SR_MANUFACTURER,
        manufacturer_model_name=SR_MANUFACTURER_MODEL_NAME,
        software_versions=uids.software_versions(),
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[model_equipment(model, when)],
        coding_schemes=[private_coding_scheme()],
        content_date=when.date(),
        content_time=when.time().replace(tzinfo=None),
    )
    if classification.key_image is not None:
        sr.PertinentOtherEvidenceSequence = [classification.key_image.evidence_item()]
    _make_reproducible(sr, when, evidence)
    return sr


def _reference_sr(
    header: Dataset,
    classification: Classification,
    model: ModelInfo,
    content_datetime: datetime.datetime,
    sop_instance_uid: str,
) -> tuple[hd.sr.Comprehensive3DSR, dict[str, str]]:
    evidence, emptied = evidence_dataset(header)
    report = measurement_report(evidence, classification, model, sop_instance_uid)
    sr = sr_document(
        evidence, report[0], header, classification, model, content_datetime, sop_instance_uid
    )
    return sr, emptied


@dataclass(frozen=True)
class ReferenceSR:
    """A document built entirely by highdicom, its file bytes, and the source values emptied."""

    dataset: hd.sr.Comprehensive3DSR
    data: bytes
    emptied: Mapping[str, str]


def reference_sr(
    header: Dataset,
    classification: Classification,
    model: ModelInfo,
    content_datetime: datetime.datetime,
) -> ReferenceSR:
    """The SR of one classified image built by highdicom, under its content-derived UID.

    Built twice, as :func:`cxrsr.sr.uids.content_uid` requires: once with the placeholder
    UID (its bytes give the UID), once with the UID.
    """
    built: list[tuple[hd.sr.Comprehensive3DSR, dict[str, str]]] = []

    def encode(sop_instance_uid: str) -> bytes:
        built.append(
            _reference_sr(header, classification, model, content_datetime, sop_instance_uid)
        )
        return encode_reference(built[-1][0])

    _uid, data = uids.content_uid(uids.SR_INSTANCE, encode)
    sr, emptied = built[-1]
    return ReferenceSR(sr, data, emptied)


def build_sr_reference(
    header: Dataset,
    classification: Classification,
    model: ModelInfo,
    content_datetime: datetime.datetime,
) -> hd.sr.Comprehensive3DSR:
    """The SR document for one classified image, built entirely by highdicom.

    The reference: every content item goes through highdicom's TID 1500/1501 classes and
    their checks. ``SRBuilder`` writes the same bytes about 20 times faster and is tested
    against this function; keep the two in step (tests/test_sr.py, "fast path").
    """
    reference = reference_sr(header, classification, model, content_datetime)
    for level, message in emptied_notes(classification, reference.dataset, reference.emptied):
        log.log(level, "%s", message)
    return reference.dataset


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


def encode_reference(sr: Dataset) -> bytes:
    """The bytes ``write_sr`` writes for a fully built dataset (Explicit VR LE, PS3.10 file)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedSR:
    """One SR document as the bytes of its file, and what to tell the user about it."""

    sop_instance_uid: str
    data: bytes
    notes: tuple[tuple[int, str], ...] = ()


class SRBuilder:
    """Writes SR documents fast: highdicom for each header, a compiled template for the content.

    Per image, highdicom still builds the header (patient, study, series, evidence,
    equipment: ``sr_document`` with an empty root), the Image Library entry and the IMAGE
    item; the TID 1501 groups come from a :class:`~cxrsr.sr.template.ContentTemplate`
    compiled once per character set from a document highdicom built in full. The first
    document of each template is also built by :func:`build_sr_reference` and must match
    byte for byte; if it does not (a highdicom or pydicom upgrade changed the layout), the
    builder says so and uses the reference for the rest of the run.
    """

    def __init__(
        self,
        model: ModelInfo,
        content_datetime: datetime.datetime,
        check_first: bool = True,
    ) -> None:
        """``check_first=False`` skips the run-time check (tests compare every document)."""
        self.model = model
        self.content_datetime = content_datetime
        self._templates: dict[tuple[str, ...], ContentTemplate] = {}
        self._checked: set[tuple[str, ...]] = set()
        self._check_first = check_first
        self.use_reference = False

    def encode(self, header: Dataset, classification: Classification) -> EncodedSR:
        """The SR file of one classified image, byte for byte what the reference writes."""
        if self.use_reference or classification.domain_warnings:
            # The template has no slot for domain notes; the few such documents (children,
            # --domain warn) are built by highdicom in full.
            return self._encode_reference(header, classification)
        evidence, emptied = evidence_dataset(header)
        template = self.template(evidence, classification)
        sr = sr_document(
            evidence,
            copy.deepcopy(template.root_stub),
            header,
            classification,
            self.model,
            classification.content_datetime(self.content_datetime),
            uids.CONTENT_UID_PLACEHOLDER,
        )
        if character_encodings(sr) != template.encodings:
            raise ValueError("SR template: the SR's character set is not the source's")
        content = template.bind(
            classification.scores,
            classification.present,
            hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence),
            image_library(evidence),
        )

        def encode(sop_instance_uid: str) -> bytes:
            sr.SOPInstanceUID = sop_instance_uid
            sr.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
            tracking = [uids.tracking_uid(sop_instance_uid, label) for label in self.model.labels]
            return encode_document(sr, content(tracking))

        sr_uid, data = uids.content_uid(uids.SR_INSTANCE, encode)
        notes = emptied_notes(classification, sr, emptied)
        encoded = EncodedSR(sr_uid, data, tuple(notes))
        if not self._check_first or template.encodings in self._checked:
            return encoded
        self._checked.add(template.encodings)
        return self._checked_against_reference(encoded, header, classification)

    def template(self, evidence: Dataset, classification: Classification) -> ContentTemplate:
        """The template for ``evidence``'s character set, compiled on first use."""
        encodings = character_encodings(evidence)
        template = self._templates.get(encodings)
        if template is None:
            template = self._templates[encodings] = self._compile(evidence, classification)
        return template

    def _compile(self, evidence: Dataset, classification: Classification) -> ContentTemplate:
        """A template from two full highdicom builds: every call Present, then every call Absent."""
        roots = [
            measurement_report(
                evidence,
                dataclasses.replace(
                    classification, present=(call,) * len(self.model.labels), domain_warnings=()
                ),
                self.model,
                uids.CONTENT_UID_PLACEHOLDER,
            )[0]
            for call in (True, False)
        ]
        return ContentTemplate.compile(roots[0], roots[1], character_encodings(evidence))

    def _checked_against_reference(
        self, encoded: EncodedSR, header: Dataset, classification: Classification
    ) -> EncodedSR:
        reference = self._encode_reference(header, classification)
        if reference.data == encoded.data:
            return encoded
        self.use_reference = True
        note = (
            logging.WARNING,
            f"{classification.path}: the fast SR encoder differs from the highdicom "
            "reference; using the reference (about 20 times slower) for the rest of the run",
        )
        return dataclasses.replace(reference, notes=(*reference.notes, note))

    def _encode_reference(self, header: Dataset, classification: Classification) -> EncodedSR:
        when = classification.content_datetime(self.content_datetime)
        reference = reference_sr(header, classification, self.model, when)
        notes = tuple(emptied_notes(classification, reference.dataset, reference.emptied))
        return EncodedSR(str(reference.dataset.SOPInstanceUID), reference.data, notes)


def instance_number(header: Dataset) -> int:
    """The source's Instance Number, so the SR series sorts like the image series it mirrors."""
    try:
        number = int(header.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return number if number >= 1 else 1


def _make_reproducible(sr: Dataset, when: datetime.datetime, evidence: Dataset) -> None:
    """Replace what highdicom stamps from the wall clock, and state the time zone.

    Instance Creation Date/Time are Type 3 (PS3.3 C.12.1) and would only record when this
    file was written, different on every run: they are left out. highdicom's own
    Contributing Equipment item gets the document's time (``when``) as its Contribution
    DateTime; the source's acquisition item, if highdicom added one, keeps the source's
    time. Timezone Offset From UTC is the source's, or absent (:mod:`cxrsr.sr.times`).
    """
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in sr:
            delattr(sr, keyword)
    for item in sr.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom" and "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    state_time_zone(sr, evidence)


def write_sr(sr: Dataset, output_dir: Path) -> Path:
    """Write a built dataset as ``<SOPInstanceUID>.dcm`` (see :func:`write_encoded`)."""
    return write_encoded(EncodedSR(str(sr.SOPInstanceUID), encode_reference(sr)), output_dir)


def write_encoded(encoded: EncodedSR, output_dir: Path) -> Path:
    """Write ``<SOPInstanceUID>.dcm`` atomically (temporary file, then ``os.replace``).

    The name is the SR's own UID, so a rerun with the same results overwrites the file with
    the same bytes, and an SR for changed results never replaces the earlier one's file.
    The folder is flushed once per batch, by :func:`cxrsr.sr.batch.generate_srs`.
    """
    target = encoded_path(encoded, output_dir)
    write_atomic(target, encoded.data, sync_folder=False)
    return target


def encoded_path(encoded: EncodedSR, output_dir: Path) -> Path:
    """Where :func:`write_encoded` writes ``encoded``: ``<SOPInstanceUID>.dcm``."""
    return output_dir / f"{encoded.sop_instance_uid}.dcm"
