"""The JSON results file: the contract between process_dicom.py and generate_sr.py.

Its types are in :mod:`cxrsr.results_types` (re-exported here), which also give the
published JSON Schema (``python -m cxrsr.results schema``, committed as
``docs/results.schema.json``). In short (names are fixed; more keys may be added)::

    {"format": "cxrsr-results/1",
     "model": {"weights": "densenet121-res224-all", "weights_sha256": "...",
               "torchxrayvision": "1.5.7", "labels": [...], "threshold": 0.5,
               "score_kind": "...", ...},
     "images": [
       {"path": "...", "status": "classified", "sop_instance_uid": "...",
        "series_instance_uid": "...", "study_instance_uid": "...", "sop_class_uid": "...",
        "patient_id": "...", "scores": {label: score}, "findings": [labels >= threshold],
        "warnings": [...]},
       {"path": "...", "status": "skipped", "reason": "..."},
       {"path": "...", "status": "failed", "reason": "..."}]}

Scores and findings: ``findings`` are decided on the model's unrounded (float32) scores,
``score >= threshold``, and so are the heatmaps drawn for them. ``scores`` holds each score
rounded to 6 decimals, except that rounding never crosses the threshold: a score below it
whose rounding would reach it is stored as the largest 6-decimal value below it (0.4999996
as 0.499999), and the reverse. So ``score >= threshold`` on a stored score always gives
the stored finding, wherever it is compared again (SR, key image, report).

Each classified entry carries ``classified_at`` (UTC, ISO 8601), the time its result
was first produced: a rerun reuses or reproduces a result and keeps the earlier time
(see :mod:`cxrsr.resume`), so the same inputs give the same bytes, and the SR built
from an entry (whose Content Date/Time comes from it) is the same document on every
run. Every entry also carries ``"file"``, the fingerprint of its file when it was read
(``size``, ``mtime_ns``; for a zip member also ``member_size``, ``member_crc32``), which
tells a rerun whether the entry still holds.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NotRequired, TypedDict, cast

from cxrsr import shards
from cxrsr.errors import PipelineError
from cxrsr.files import write_json_atomic
from cxrsr.results_types import (
    FORMAT,
    ClassifiedEntry,
    FailedEntry,
    FileMark,
    ModelRecord,
    ModelRef,
    ModelScores,
    ResultsDocument,
    ResultsEntry,
    RunOptions,
    SkippedEntry,
    json_schema,
    problem,
)

__all__ = [
    "CLASSIFIED",
    "FAILED",
    "FORMAT",
    "SKIPPED",
    "STATUSES",
    "ClassifiedEntry",
    "FailedEntry",
    "FileMark",
    "LoadedResults",
    "ModelRecord",
    "ModelRef",
    "ModelScores",
    "ReadableResults",
    "ResultsDocument",
    "ResultsEntry",
    "RunOptions",
    "SkippedEntry",
    "iter_entries",
    "json_schema",
    "load_results",
    "model_record",
    "per_model",
    "save_results",
    "schema_text",
]

#: Decimals of a score in the results file: enough to tell results apart (float32 holds
#: about 7 significant digits), few enough for files that read well and compare stably.
SCORE_DECIMALS = 6

CLASSIFIED: Final = "classified"
SKIPPED: Final = "skipped"
FAILED: Final = "failed"
STATUSES = (CLASSIFIED, SKIPPED, FAILED)


class LoadedResults(TypedDict):
    """A results file as :func:`load_results` reads it: the document and its ``model``
    block checked, its entries not yet. Entries come from a file anyone can edit, and a
    bad one costs only itself: each reader checks the entries it uses
    (:func:`cxrsr.sr.batch.check_entry`, the report's cards)."""

    format: Literal["cxrsr-results/1"]
    model: ModelRecord
    images: Sequence[object]
    """A list, or for a sharded run the shards' entries read as they are iterated."""
    complete: NotRequired[bool]
    models: NotRequired[list[ModelRecord]]
    """A multi-model run's models (checked); read each one's results with :func:`per_model`."""


ReadableResults = ResultsDocument | LoadedResults
"""What the SR builder and the report read: a file as loaded, or a document built in
memory (the watcher's), whose entries are typed already."""


def rounded_score(score: float, threshold: float, decimals: int = SCORE_DECIMALS) -> float:
    """``score`` rounded to ``decimals`` decimals, never across ``threshold``.

    A finding is decided on the unrounded score (``score >= threshold``); a rounded value
    must tell the same story to anyone who compares it with the threshold again, or reads
    it beside the call. So when rounding would cross the threshold, the result is the
    nearest value of that many decimals on the score's own side: 0.4999996 is stored as
    0.499999 and shown as 0.49 at two decimals (Absent), never as 0.5. The results file
    stores scores with the default decimals; the key image and the report show them so.
    """
    rounded = round(score, decimals)
    if (score >= threshold) == (rounded >= threshold):
        return rounded
    scale: int = 10**decimals
    if score < threshold:  # the largest value below the threshold
        units = math.ceil(threshold * scale)
        while round(units / scale, decimals) >= threshold:
            units -= 1
    else:  # the smallest value at or above it
        units = math.floor(threshold * scale)
        while round(units / scale, decimals) < threshold:
            units += 1
    return round(units / scale, decimals)


def _shared_uid_note_prefix(uid: str) -> str:
    return f"SOP Instance UID {uid} is also used by "


def flag_shared_instance_uids(entries: list[ResultsEntry]) -> list[str]:
    """Warn on classified entries that share a SOP Instance UID, and say so in each entry.

    Two different files with one SOP Instance UID are one instance to a PACS: Orthanc keeps
    whichever arrives first, and both SRs would point at it. Exports that re-encode a file,
    and hand-edited test files, produce this. Notes left by an earlier run on a reused
    entry are dropped first, so they are neither doubled nor kept once the other file is
    gone.
    """
    by_uid: dict[str, list[ClassifiedEntry]] = {}
    for entry in entries:
        if entry["status"] == CLASSIFIED:
            prefix = _shared_uid_note_prefix(entry["sop_instance_uid"])
            kept = [w for w in entry.get("warnings", []) if not w.startswith(prefix)]
            if kept:
                entry["warnings"] = kept
            else:
                entry.pop("warnings", None)
            by_uid.setdefault(entry["sop_instance_uid"], []).append(entry)
    messages = []
    for uid, group in by_uid.items():
        if len(group) < 2:
            continue
        for entry in group:
            other = next(e["path"] for e in group if e is not entry)
            more = f" and {len(group) - 2} more files" if len(group) > 2 else ""
            note = f"{_shared_uid_note_prefix(uid)}{other}{more}: a PACS keeps only one"
            entry.setdefault("warnings", []).append(note)
            messages.append(f"{entry['path']}: {note}")
    return messages


def save_results(
    path: Path,
    model: ModelRecord,
    entries: list[ResultsEntry],
    interrupted: bool,
    models: list[ModelRecord] | None = None,
) -> list[str]:
    """Write the results file for ``entries``; return the warnings to show.

    Flags shared SOP Instance UIDs, and marks a run stopped by Ctrl-C as
    ``"complete": false``. Each classified entry already carries its ``classified_at``
    (see :mod:`cxrsr.resume`). ``models``: a multi-model run's models, ``model`` first.
    """
    messages = flag_shared_instance_uids(entries)
    document: ResultsDocument = {"format": FORMAT, "model": model, "images": entries}
    if models:
        document = {"format": FORMAT, "model": model, "models": models, "images": entries}
    if interrupted:
        document["complete"] = False
    write_json_atomic(path, document)
    return messages


def load_results(path: Path) -> LoadedResults:
    """Read and check a results file; a missing or malformed one is a :class:`PipelineError`.

    A sharded run's manifest (:mod:`cxrsr.shards`) reads as the same document: its
    ``images`` are the shards' entries, read one shard at a time as they are iterated.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{path}: results file not found (run process_dicom.py first)", exit_code=2
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not a readable results file: {exc}", exit_code=2) from exc
    if shards.is_manifest(document):
        return _load_manifest(path, document)
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise PipelineError(f"{path}: not a results file (no 'images' list)", exit_code=2)
    found = document.get("format", FORMAT)
    if found != FORMAT:
        raise PipelineError(
            f"{path}: results format {found!r} is not {FORMAT!r}, the one this version reads",
            exit_code=2,
        )
    model = document.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("labels"), list):
        raise PipelineError(f"{path}: not a results file (no 'model.labels')", exit_code=2)
    found_problem = problem(model, ModelRecord, "model")
    if found_problem is not None:
        raise PipelineError(f"{path}: not a valid results file: {found_problem}", exit_code=2)
    if "models" in document:
        found_problem = _models_problem(document["models"], model)
        if found_problem is not None:
            raise PipelineError(f"{path}: not a valid results file: {found_problem}", exit_code=2)
    if "complete" in document and not isinstance(document["complete"], bool):
        raise PipelineError(f"{path}: not a valid results file: 'complete' is not a boolean", 2)
    # Entries are not checked here: a bad entry costs only its own SR (cxrsr.sr.batch).
    return cast(LoadedResults, document)


def _models_problem(models: object, model: object) -> str | None:
    """What is wrong with a multi-model file's ``models`` list, or ``None``."""
    found = problem(models, list[ModelRecord], "models")
    if found is not None:
        return found
    assert isinstance(models, list)
    if not models or models[0] != model:
        return "'models' does not start with the 'model' block"
    names = [block["weights"] for block in models]
    if len(set(names)) != len(names):
        return "'models' names a weights name twice"
    return None


def _load_manifest(path: Path, manifest: dict[str, Any]) -> LoadedResults:
    """A sharded run's manifest as a results document whose entries stream from its shards."""
    found = shards.manifest_problem(manifest)
    if found is not None:
        raise PipelineError(f"{path}: not a valid results manifest: {found}", exit_code=2)
    missing = [name for name in manifest["shards"] if not (path.parent / name).is_file()]
    if missing:
        raise PipelineError(f"{path}: shard {missing[0]} is missing", exit_code=2)
    count = manifest.get("count")
    images = shards.ShardedEntries(
        path.parent, manifest["shards"], count if isinstance(count, int) else 0
    )
    document: dict[str, Any] = {"format": FORMAT, "model": manifest["model"], "images": images}
    if manifest.get("complete") is False:
        document["complete"] = False
    return cast(LoadedResults, document)


#: The keys of a classified entry that belong to one model (the others are the image's).
MODEL_KEYS: Final = ("scores", "findings", "heatmaps")
#: The keys that belong to one input size: a further model's own when it has them.
SIZE_KEYS: Final = ("preview", "preview_crop")
#: An entry's other models' results (a multi-model run).
BY_MODEL: Final = "by_model"


class _ModelEntries(Sequence[object]):
    """The entries of a multi-model results file as one model's: read as they are iterated.

    The first model's view is each entry without ``by_model``; a later model's has that
    model's ``scores``, ``findings`` and ``heatmaps`` in their place (and its ``preview``
    and ``preview_crop``, when its input size gave it its own). A classified entry
    without the model's results (a hand edit) is a ``failed`` entry in that view, with
    the reason. Other entries are the same in every view.
    """

    def __init__(self, entries: Sequence[object], weights: str | None) -> None:
        self._entries = entries
        self._weights = weights

    def __iter__(self) -> Iterator[object]:
        for entry in self._entries:
            yield self._view(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._view(entry) for entry in self._entries[index]]
        return self._view(self._entries[index])

    def _view(self, entry: object) -> object:
        if not isinstance(entry, dict) or BY_MODEL not in entry:
            return entry
        view = {key: value for key, value in entry.items() if key != BY_MODEL}
        if self._weights is None:
            return view
        by_model = entry[BY_MODEL]
        mine = by_model.get(self._weights) if isinstance(by_model, dict) else None
        for key in MODEL_KEYS:
            view.pop(key, None)
        if not isinstance(mine, dict):
            return {
                "path": entry.get("path"),
                "status": FAILED,
                "reason": f"the results file holds no scores of {self._weights} for it",
            }
        view.update({key: mine[key] for key in (*MODEL_KEYS, *SIZE_KEYS) if key in mine})
        return view


def per_model(document: ReadableResults) -> Iterator[LoadedResults]:
    """Each model's results as a single-model results document, in ``--weights`` order.

    A single-model file gives itself. A multi-model run's file (``models`` and each
    classified entry's ``by_model``) gives one document per model: its ``model`` block
    and its ``scores``, ``findings`` and ``heatmaps`` in each entry, so every reader of
    single-model files (the SR builder, the report) reads each model's as it is, and no
    two models' scores are ever mixed. The entries stream from ``document`` (which may be
    sharded) as each view is iterated; none is held.
    """
    models = document.get("models")
    if not isinstance(models, list) or len(models) < 2:
        yield cast(LoadedResults, document)
        return
    for index, model in enumerate(models):
        view: dict[str, Any] = {
            "format": FORMAT,
            "model": model,
            "images": _ModelEntries(document["images"], None if index == 0 else model["weights"]),
        }
        if "complete" in document:
            view["complete"] = document["complete"]
        yield cast(LoadedResults, view)


def iter_entries(path: Path) -> Iterator[object]:
    """Every entry of a results file of any layout, streaming where the layout allows.

    A ``results.json``, a sharded run's manifest (its shards in order), one shard file, or
    a journal (its entry lines). Entries are as stored, unchecked.
    """
    path = Path(path)
    header = shards.read_header(path)
    if header is not None:
        yield from shards.iter_shard(path)
        return
    if path.name.endswith(".journal"):
        from cxrsr.journal import read_journal

        for _model, entry in read_journal(path):
            yield entry
        return
    yield from load_results(path)["images"]


def model_record(block: object) -> ModelRecord:
    """A ``model`` block made in this process (the classifier's description), checked."""
    found = problem(block, ModelRecord, "model")
    if found is not None:
        raise ValueError(f"not a results model block: {found}")
    return cast(ModelRecord, block)


def schema_text() -> str:
    """The JSON Schema of the results file, as committed in ``docs/results.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


USAGE = "usage: python -m cxrsr.results schema | dump PATH"


def dump(path: Path) -> int:
    """Print every entry of the results at ``path`` as JSON Lines (one entry a line)."""
    try:
        for entry in iter_entries(path):
            sys.stdout.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n")
    except PipelineError as exc:
        print(f"E: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `dump ... | head`: the reader has all it wants
        return 0
    except (OSError, ValueError) as exc:
        print(f"E: {path}: cannot read: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    """``python -m cxrsr.results schema``: print the JSON Schema of the results file;
    ``dump PATH``: print every entry of a results file of any layout as JSON Lines."""
    if argv == ["schema"]:
        sys.stdout.write(schema_text())
        return 0
    if len(argv) == 2 and argv[0] == "dump":
        return dump(Path(argv[1]))
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
