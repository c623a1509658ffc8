"""How the SR is made fast: highdicom for each header, a compiled template for the content.

:mod:`cxrsr.sr.tid1500` builds every content item through highdicom; most of that time goes
into the TID 1501 groups, which differ between documents only in their scores, calls and
UIDs. :class:`SRBuilder` compiles those groups once per character set into a
:class:`~cxrsr.sr.template.ContentTemplate` and binds each document's values into it. The
first document of each template is also built by the reference and must match byte for
byte; the byte-identity tests (tests/test_sr.py, "fast path") compare every document.

The other speed-ups of the SR path, each byte-identical and tested: the key image's UID is
spliced into its placeholder file instead of encoding it again
(:func:`cxrsr.sr.uids.respliced`); one slow, pure highdicom check is memoised
(:mod:`cxrsr.sr.highdicom_memo`); and the batch lowers the interpreter's thread switch
interval while it builds (``SWITCH_INTERVAL`` in :mod:`cxrsr.sr.batch`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import UID

from cxrsr.sr import uids
from cxrsr.sr.document import EncodedSR
from cxrsr.sr.entries import Classification, ModelInfo
from cxrsr.sr.evidence import emptied_notes, evidence_dataset
from cxrsr.sr.template import ContentTemplate, character_encodings, encode_document
from cxrsr.sr.tid1500 import image_library, measurement_report, reference_sr, sr_document


class SRBuilder:
    """Writes SR documents fast: highdicom for each header, a compiled template for the content.

    Per image, highdicom still builds the header (patient, study, series, evidence,
    equipment: ``sr_document`` with an empty root), the Image Library entry and the IMAGE
    item; the TID 1501 groups come from a :class:`~cxrsr.sr.template.ContentTemplate`
    compiled once per character set from a document highdicom built in full. The first
    document of each template is also built by :func:`~cxrsr.sr.tid1500.build_sr_reference` and must match
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
