"""What is in the SR: one TID 1500 Comprehensive 3D SR per classified radiograph.

The document (``shared/docs/sr-design.md`` Appendix A.1):

- IOD Comprehensive 3D SR (PS3.3 A.35.13), root TID 1500 "Imaging Measurement Report",
  as IHE AI Results requires for image-level AI findings;
- one TID 1501 measurement group per model label: the finding's code, the score as NUM
  (111012, DCM, "Certainty of Finding") with a Measurement Method saying it is an
  operating-point normalised score, a Present/Absent CODE, TID 4019 algorithm
  identification and an IMAGE reference to the source;
- a TID 1600 image library entry, a TID 1004 device observer context, the source in
  Current Requested Procedure Evidence Sequence, the model in Contributing Equipment.

Placement (PS3.3 C.17.1): Patient and Study are copied from the source image
(:mod:`cxrsr.sr.evidence`); the SR gets its own series (Modality SR) in the source's study,
because SR documents never reside in a series of images. There is one SR series per source
series and model weights.

Everything here is built by highdicom's TID 1500/1501 classes and their checks: this is the
reference. :mod:`cxrsr.sr.fast` writes the same bytes about 20 times faster.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DT

from cxrsr.dicomio.domain import view_code
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
from cxrsr.sr.document import encode_reference
from cxrsr.sr.entries import Classification, ModelInfo
from cxrsr.sr.evidence import emptied_notes, evidence_dataset
from cxrsr.sr.times import document_time, state_time_zone

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

#: TID 1500 row 12: the root's container of qualitative evaluations (CODE and TEXT items).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


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
