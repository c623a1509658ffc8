"""The inputs of an SR, checked: a results file's ``model`` block and one classified entry.

Entries come from a file anyone can edit and from sources a fuzzer may have mangled, so
every key, type and UID is checked here before any source is opened. A bad ``model``
block stops the whole file (exit 2); a bad entry raises :class:`EntryError` and costs that
entry only.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from cxrsr.errors import InputError, PipelineError
from cxrsr.results import ModelRecord
from cxrsr.sr import uids
from cxrsr.sr.keyimage import KeyImageRef

#: Keys of a results entry checked against the source header before an SR is written.
IDENTITY_KEYS = {
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "sop_class_uid": "SOPClassUID",
}


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
