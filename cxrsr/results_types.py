"""The results file as types: what process_dicom.py writes and every reader may rely on.

The classes here are :class:`~typing.TypedDict` s, so a results document is still the plain
``dict`` that ``json`` reads and writes (the file's bytes do not depend on them), while
mypy checks every place that builds or reads one. The same classes give the published
JSON Schema (:func:`json_schema`, committed as ``docs/results.schema.json``) and the
run-time check of data read from disk (:func:`problem`), so the three cannot drift apart.

Keys marked ``NotRequired`` are ones a reader must not count on: files written by
earlier versions lack some of them, and some are written only when they apply
(``warnings``, the pictures, an archive member's fingerprint). Readers ignore keys they
do not know: later versions of format ``cxrsr-results/1`` may add optional keys.
"""

import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, TypedDict, Union, cast

FORMAT: Literal["cxrsr-results/1"] = "cxrsr-results/1"


class FileMark(TypedDict):
    """The input file as it was read; a rerun reuses an entry only while it still matches."""

    size: int
    mtime_ns: int
    member_size: NotRequired[int]
    """For a member of an archive: the member's own size (``size`` is the archive's)."""
    member_crc32: NotRequired[int]


class RunOptions(TypedDict):
    """The run's settings that change what an entry says (earlier entries made with
    other options are not reused)."""

    domain: NotRequired[str]
    heatmaps: NotRequired[str]


class ModelRecord(TypedDict):
    """The ``model`` block: which network and weights made the scores, and what they mean."""

    weights: str
    weights_sha256: str
    torchxrayvision: str
    labels: list[str]
    """The model's labels, in its own order; every classified entry scores each of them."""
    threshold: NotRequired[float]
    """A label is a finding when its score is at or above this (0.5 when absent)."""
    score_kind: NotRequired[str]
    weights_file: NotRequired[str]
    architecture: NotRequired[str]
    excluded_labels: NotRequired[list[str]]
    preprocessing: NotRequired[str]
    precision: NotRequired[str]
    options: NotRequired[RunOptions]


class ClassifiedEntry(TypedDict):
    """An image the model classified: its identity, scores and findings."""

    path: str
    status: Literal["classified"]
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    patient_id: str
    scores: dict[str, float]
    """Each label's score, rounded to 6 decimals without crossing the threshold."""
    findings: list[str]
    """The labels whose score is at or above the threshold, in the model's order."""
    modality: NotRequired[str]
    body_part_examined: NotRequired[str]
    photometric_interpretation: NotRequired[str]
    rows: NotRequired[int]
    columns: NotRequired[int]
    transfer_syntax_uid: NotRequired[str]
    projection: NotRequired[str]
    patient_orientation: NotRequired[str]
    orientation_transform: NotRequired[str]
    domain_warnings: NotRequired[list[str]]
    warnings: NotRequired[list[str]]
    classified_at: NotRequired[str]
    """When the result was first produced (UTC, ISO 8601): the SR's Content Date/Time."""
    heatmaps: NotRequired[dict[str, str]]
    """Heatmap PNG by label, relative to the results file's folder."""
    preview: NotRequired[str]
    preview_crop: NotRequired[list[float]]
    """``[x, y, width, height]`` of the model's square in preview pixels."""
    file: NotRequired[FileMark]


class SkippedEntry(TypedDict):
    """A file that is not a chest radiograph the model may classify."""

    path: str
    status: Literal["skipped"]
    reason: str
    file: NotRequired[FileMark]


class FailedEntry(TypedDict):
    """A file that could not be read or classified."""

    path: str
    status: Literal["failed"]
    reason: str
    file: NotRequired[FileMark]


ResultsEntry = ClassifiedEntry | SkippedEntry | FailedEntry
"""One input file's entry, told apart by ``status``."""


class ResultsDocument(TypedDict):
    """A whole results file."""

    format: Literal["cxrsr-results/1"]
    model: ModelRecord
    images: list[ResultsEntry]
    complete: NotRequired[bool]
    """``false`` when Ctrl-C stopped the run: only the files finished before are listed."""


# --- run-time checks and the JSON Schema, both derived from the classes above ----------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _is_typeddict(tp: object) -> bool:
    return isinstance(tp, type) and typing.is_typeddict(tp)


def _required(cls: type) -> list[str]:
    return [key for key in _hints(cls) if key in cast(Any, cls).__required_keys__]


def problem(value: object, tp: object = ResultsDocument, where: str = "") -> str | None:
    """What makes ``value`` not a ``tp`` (one line naming the place), or ``None`` if it is one.

    Keys the type does not name are allowed (readers ignore them). Floats accept integers
    (JSON writes 1.0 as 1.0, but other tools may write 1); booleans are never numbers.
    """
    origin = typing.get_origin(tp)
    if origin is NotRequired:
        return problem(value, typing.get_args(tp)[0], where)
    if _is_typeddict(tp):
        if not isinstance(value, Mapping):
            return f"{where or 'document'}: not an object"
        hints = _hints(cast(type, tp))
        for key in _required(cast(type, tp)):
            if key not in value:
                return f"{where or 'document'}: lacks '{key}'"
        for key, hint in hints.items():
            if key in value:
                found = problem(value[key], hint, f"{where}.{key}" if where else key)
                if found:
                    return found
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        return None if value in allowed else f"{where}: {value!r} is not one of {list(allowed)}"
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        reasons = [problem(value, option, where) for option in options]
        if None in reasons:
            return None
        status = value.get("status") if isinstance(value, Mapping) else None
        for option, reason in zip(options, reasons, strict=True):  # the variant it claims
            if _is_typeddict(option) and status in _status_of(option):
                return reason
        return reasons[0]
    if origin is list:
        if not isinstance(value, list):
            return f"{where}: not a list"
        (item,) = typing.get_args(tp)
        return next(
            (p for i, v in enumerate(value) if (p := problem(v, item, f"{where}[{i}]"))), None
        )
    if origin is dict:
        if not isinstance(value, dict):
            return f"{where}: not an object"
        _, item = typing.get_args(tp)
        return next((p for k, v in value.items() if (p := problem(v, item, f"{where}.{k}"))), None)
    return _scalar_problem(value, tp, where)


def _status_of(cls: type) -> tuple[object, ...]:
    hint = _hints(cls).get("status")
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _scalar_problem(value: object, tp: object, where: str) -> str | None:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"no check for {tp!r}")
    return None if ok else f"{where}: {value!r} is not {_NAMES[cast(type, tp)]}"


_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}
_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _schema(tp: object, definitions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin is NotRequired:
        return _schema(typing.get_args(tp)[0], definitions)
    if _is_typeddict(tp):
        cls = cast(type, tp)
        if cls.__name__ not in definitions:
            definitions[cls.__name__] = {}  # placeholder: a class met again is a reference
            definitions[cls.__name__] = _object_schema(cls, definitions)
        return {"$ref": f"#/$defs/{cls.__name__}"}
    if origin is Literal:
        (value,) = typing.get_args(tp)
        return {"const": value}
    if origin in (Union, types.UnionType):
        return {"oneOf": [_schema(option, definitions) for option in typing.get_args(tp)]}
    if origin is list:
        return {"type": "array", "items": _schema(typing.get_args(tp)[0], definitions)}
    if origin is dict:
        return {
            "type": "object",
            "additionalProperties": _schema(typing.get_args(tp)[1], definitions),
        }
    return {"type": _SCALARS[cast(type, tp)]}


def _object_schema(cls: type, definitions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    properties = {key: _schema(hint, definitions) for key, hint in _hints(cls).items()}
    schema: dict[str, Any] = {"type": "object", "description": _summary(cls)}
    schema["required"] = _required(cls)
    schema["properties"] = properties
    return schema


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split("\n\n")[0].split())


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a results file, generated from :class:`ResultsDocument`."""
    definitions: dict[str, dict[str, Any]] = {}
    root = _schema(ResultsDocument, definitions)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "cxrsr results file (format cxrsr-results/1)",
        **root,
        "$defs": dict(sorted(definitions.items())),
    }
