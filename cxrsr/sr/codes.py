"""Coded concepts for the model's findings, and the project's private coding scheme.

Every standard code below is a row of the verified table in ``shared/docs/sr-design.md``
section 3 (PS3.16 CIDs first, then checked SNOMED CT sources); the table names the
source of each. Findings with no verified standard code get a code in the private scheme
``99XRV``: PS3.16 8.2 reserves designators starting with "99" for private schemes, and the
SR declares it in Coding Scheme Identification Sequence (PS3.3 C.12.1.1.4) because
highdicom does not yet (highdicom issue #451).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.sr.coding import Code

#: The private coding scheme designator (PS3.16 8.2: private designators begin with "99").
PRIVATE_SCHEME = "99XRV"
PRIVATE_SCHEME_NAME = "cxrsr torchxrayvision findings and methods"
PRIVATE_SCHEME_ORGANIZATION = "cxrsr project"

#: (363698007, SCT, "Finding Site") value for findings that are post-coordinated with
#: their anatomy (PS3.16 CID 6104 codes such as Mass or Opacity say nothing about where).
LUNG_STRUCTURE = Code("39607008", "SCT", "Lung structure")

#: Measurement Method of every score: the ``-all`` weights' outputs are not probabilities
#: (torchxrayvision rescales them so that 0.5 is each label's operating point,
#: mlmed/torchxrayvision#151), and the SR must not let a reader take them for one.
OPERATING_POINT_METHOD = Code(
    "XRV-OPNORM", PRIVATE_SCHEME, "XRV operating-point normalised score, 0.5 = threshold"
)

#: (111012, DCM, "Certainty of Finding"), CID 6048, as the CAD templates use it.
CERTAINTY_OF_FINDING = Code("111012", "DCM", "Certainty of Finding")
#: ("1", UCUM, "no units"), CID 7181: the score is a dimensionless number in [0, 1].
NO_UNITS = Code("1", "UCUM", "no units")
#: CID 240/241 "Present-Absent".
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
#: (121058, DCM, "Procedure reported") value: IHE AIR wants the imaging procedure that was
#: analysed, not the algorithm. TID 1500 row 4 draws it from CID 100 "Quantitative
#: Diagnostic Imaging Procedure", which has no chest radiograph code; its X-ray member is
#: "XR unspecified body region" (the body part is in the study and in every finding).
#: CID 100 is extensible, so (36554-4, LN, "XR Chest Single view") was allowed, but
#: template validators flag it, and "single view" misdescribes a PA + lateral study.
#: PixelMed 20220618 still flags 43468-8: it bundles CID 100 version 20190121, from
#: before the code was added (pydicom's current PS3.16 tables have it).
PROCEDURE_REPORTED = Code("43468-8", "LN", "XR unspecified body region")


@dataclass(frozen=True)
class Finding:
    """What one model label means, as a code and (when post-coordinated) a finding site."""

    code: Code
    finding_site: Code | None = None


#: torchxrayvision label -> coded finding (sr-design.md section 3, one row each).
FINDINGS: dict[str, Finding] = {
    "Atelectasis": Finding(Code("46621007", "SCT", "Atelectasis")),
    "Consolidation": Finding(Code("95436008", "SCT", "Lung consolidation")),
    "Infiltration": Finding(Code("112121", "DCM", "Infiltrate")),
    "Pneumothorax": Finding(Code("36118008", "SCT", "Pneumothorax")),
    "Edema": Finding(Code("19242006", "SCT", "Pulmonary edema")),
    "Emphysema": Finding(Code("87433001", "SCT", "Pulmonary emphysema")),
    "Fibrosis": Finding(Code("51615001", "SCT", "Fibrosis of lung")),
    "Effusion": Finding(Code("60046008", "SCT", "Pleural effusion")),
    "Pneumonia": Finding(Code("233604007", "SCT", "Pneumonia")),
    "Pleural_Thickening": Finding(Code("XRV-PLTHICK", PRIVATE_SCHEME, "Pleural thickening")),
    "Cardiomegaly": Finding(Code("8186001", "SCT", "Cardiomegaly")),
    "Nodule": Finding(Code("27925004", "SCT", "Nodule"), LUNG_STRUCTURE),
    "Mass": Finding(Code("4147007", "SCT", "Mass"), LUNG_STRUCTURE),
    "Hernia": Finding(Code("84089009", "SCT", "Hiatal hernia")),
    "Lung Lesion": Finding(Code("52988006", "SCT", "Lesion"), LUNG_STRUCTURE),
    "Fracture": Finding(Code("125605004", "SCT", "Fracture of bone")),
    "Lung Opacity": Finding(Code("112001", "DCM", "Opacity"), LUNG_STRUCTURE),
    "Enlarged Cardiomediastinum": Finding(
        Code("XRV-ECM", PRIVATE_SCHEME, "Enlarged cardiomediastinum")
    ),
}


def finding_for_label(label: str) -> Finding:
    """The coded finding of a model label; a label the table does not know gets a private code.

    Other weights have other labels, and the SR must still be writable for them. The code
    value is derived from the label (Code Value is SH, at most 16 characters, PS3.5 6.2),
    so the same label always gets the same code; the meaning is the label itself.
    """
    known = FINDINGS.get(label)
    if known is not None:
        return known
    digest = hashlib.sha256(label.encode("utf-8")).hexdigest()[:12].upper()
    meaning = label.replace("_", " ")[:64]  # Code Meaning is LO: at most 64 characters
    return Finding(Code(f"XRV-{digest}", PRIVATE_SCHEME, meaning))
