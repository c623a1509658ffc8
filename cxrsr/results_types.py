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

import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, NotRequired, TypedDict, Union, cast

FORMAT: Literal["cxrsr-results/1"] = "cxrsr-results/1"


class FileMark(TypedDict):
    """The input file as it was read; a rerun reuses an entry only while it still matches."""

    size: int
    mtime_ns: int
    member_size: NotRequired[int]
    """For a member of an archive: the member's own size (``size`` is the archive's)."""
    member_crc32: NotRequired[int]


class ModelRef(TypedDict):
    """One model of a multi-model run, by weights name and the SHA-256 of its weights file."""

    weights: str
    weights_sha256: str


class RunOptions(TypedDict):
    """The run's settings that change what an entry says (earlier entries made with
    other options are not reused)."""

    domain: NotRequired[str]
    heatmaps: NotRequired[str]
    precision: NotRequired[str]
    """Present only when not ``fp32`` (results files of fp32 runs stay as they were)."""
    models: NotRequired[list[ModelRef]]
    """Every model of a multi-model run (``--weights a,b``), in order, the ``model`` block's
    first; absent for a single model. An entry made by another list is not reused."""


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
    input_size: NotRequired[int]
    """The network's input side in pixels (224 for the DenseNets, 512 for the ResNet)."""
    excluded_labels: NotRequired[list[str]]
    preprocessing: NotRequired[str]
    precision: NotRequired[str]
    """``fp32``, ``int8`` (quantized ONNX on the CPU) or ``fp16`` (CUDA)."""
    int8_onnx_sha256: NotRequired[str]
    """SHA-256 of the quantized model that ran, for ``int8``."""
    quantization: NotRequired[str]
    """How the int8 model was calibrated, for ``int8``."""
    options: NotRequired[RunOptions]


class ModelScores(TypedDict):
    """One further model's results for a classified image (a multi-model run)."""

    scores: dict[str, float]
    """Each of this model's labels' score, rounded as in ``scores`` of the entry."""
    findings: list[str]
    """This model's labels at or above its threshold, in its order."""
    heatmaps: NotRequired[dict[str, str]]
    """This model's heatmap PNG by label, relative to the results file's folder."""
    preview: NotRequired[str]
    """The preview this model's key image is drawn on, when its input size differs from
    the first model's (the image is decoded for each input size); else the entry's."""
    preview_crop: NotRequired[list[float]]


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
    by_model: NotRequired[dict[str, ModelScores]]
    """A multi-model run's other models' results, by weights name (the document's
    ``models`` after the first); the entry's own ``scores`` are the first model's. Never
    averaged: :func:`cxrsr.results.per_model` reads each model's as a results file of its own."""


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
    models: NotRequired[list[ModelRecord]]
    """A multi-model run's models, in ``--weights`` order; the first is ``model``."""


# --- run-time checks and the JSON Schema, both derived from the classes above ----------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _is_typeddict(tp: object) -> bool:
    return isinstance(tp, type) and typing.is_typeddict(tp)


def _required(cls: type) -> list[str]:
    return [key for key in _hints(cls) if key in cast(Any, cls).__required_keys__]


Failure = tuple[list[str], str]
"""Where a check failed (the keys and indexes, innermost first) and why."""
Check = Callable[[object], Failure | None]


def problem(value: object, tp: object = ResultsDocument, where: str = "") -> str | None:
    """What makes ``value`` not a ``tp`` (one line naming the place), or ``None`` if it is one.

    Keys the type does not name are allowed (readers ignore them). Floats accept integers
    (JSON writes 1.0 as 1.0, but other tools may write 1); booleans are never numbers.
    """
    failure = _check(tp)(value)
    if failure is None:
        return None
    steps, reason = failure
    place = where
    for step in reversed(steps):
        place = f"{place}{step}" if step.startswith("[") or not place else f"{place}.{step}"
    return f"{place or 'document'}: {reason}"


@functools.cache
def _check(tp: object) -> Check:
    """The check of values of ``tp``, built once per type (a results file has many entries)."""
    origin = typing.get_origin(tp)
    if origin is NotRequired:
        return _check(typing.get_args(tp)[0])
    if _is_typeddict(tp):
        return _object_check(cast(type, tp))
    if origin is Literal:
        return _literal_check(typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return _union_check(typing.get_args(tp))
    if origin is list:
        return _list_check(_check(typing.get_args(tp)[0]))
    if origin is dict:
        return _dict_check(_check(typing.get_args(tp)[1]))
    return _scalar_check(cast(type, tp))


def _object_check(cls: type) -> Check:
    required = _required(cls)
    fields = [(key, _check(hint)) for key, hint in _hints(cls).items()]

    def check(value: object) -> Failure | None:
        if not isinstance(value, Mapping):
            return [], "not an object"
        for key in required:
            if key not in value:
                return [], f"lacks '{key}'"
        for key, field_check in fields:
            if key in value:
                failure = field_check(value[key])
                if failure is not None:
                    failure[0].append(key)
                    return failure
        return None

    return check


def _literal_check(allowed: tuple[object, ...]) -> Check:
    def check(value: object) -> Failure | None:
        return None if value in allowed else ([], f"{value!r} is not one of {list(allowed)}")

    return check


def _union_check(options: tuple[object, ...]) -> Check:
    """Any of ``options``; a failure names the reason of the variant the value's ``status``
    claims (a classified entry that lacks a key is told so, not that it is no skipped one)."""
    checks = [(_check(option), _status_of(option)) for option in options]

    def check(value: object) -> Failure | None:
        failures = [option_check(value) for option_check, _ in checks]
        if None in failures:
            return None
        status = value.get("status") if isinstance(value, Mapping) else None
        for (_, statuses), failure in zip(checks, failures, strict=True):
            if status in statuses:
                return failure
        return failures[0]

    return check


def _status_of(tp: object) -> tuple[object, ...]:
    if not _is_typeddict(tp):
        return ()
    hint = _hints(cast(type, tp)).get("status")
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _list_check(item: Check) -> Check:
    def check(value: object) -> Failure | None:
        if not isinstance(value, list):
            return [], "not a list"
        for index, element in enumerate(value):
            failure = item(element)
            if failure is not None:
                failure[0].append(f"[{index}]")
                return failure
        return None

    return check


def _dict_check(item: Check) -> Check:
    def check(value: object) -> Failure | None:
        if not isinstance(value, dict):
            return [], "not an object"
        for key, element in value.items():
            failure = item(element)
            if failure is not None:
                failure[0].append(str(key))
                return failure
        return None

    return check


def _scalar_check(tp: type) -> Check:
    name = _NAMES[tp]
    accept: Callable[[object], bool]
    if tp is bool:
        accept = lambda value: isinstance(value, bool)  # noqa: E731
    elif tp is int:
        accept = lambda value: isinstance(value, int) and not isinstance(value, bool)  # noqa: E731
    elif tp is float:
        accept = _is_finite_number
    else:
        accept = lambda value: isinstance(value, tp)  # noqa: E731

    def check(value: object) -> Failure | None:
        return None if accept(value) else ([], f"{value!r} is not {name}")

    return check


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
