"""Reusing finished results, so a rerun classifies only what is new, changed or unfinished.

A result is reused when its file is unchanged and the weights are the same:

- the file: same path, size and modification time in nanoseconds; for a zip member,
  the archive's size and time plus the member's CRC-32 and size (recorded in each
  entry under ``"file"``);
- the weights: same SHA-256 of the weights file (and the same torchxrayvision).

``classified`` and ``skipped`` entries are reused as they are, ``classified_at``
included; ``failed`` ones are tried again, since what failed them (a file being copied,
a reader killed by the OOM killer) may have passed. Earlier entries come from the results
file and from its journal (:mod:`cxrsr.journal`), where a killed run left what it had
finished. When nothing needs classifying, the model is never loaded: a rerun over an
unchanged folder costs little more than a ``stat`` per file.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from cxrsr.errors import PipelineError
from cxrsr.journal import Journal, ModelBlock, journal_path, read_journal
from cxrsr.results import (
    CLASSIFIED,
    FAILED,
    FileMark,
    ModelRecord,
    ModelRef,
    ResultsEntry,
    RunOptions,
    iter_entries,
    problem,
    save_results,
)
from cxrsr.shards import is_manifest

if TYPE_CHECKING:
    import zipfile

    from cxrsr.dicomio.discovery import Source

#: Key of the file's fingerprint in every results entry.
FILE_KEY: Final = "file"


@functools.lru_cache(maxsize=8)
def _zip_directory(path: str, size: int, mtime_ns: int) -> zipfile.ZipFile:
    import zipfile

    return zipfile.ZipFile(path)


def fingerprint(source: Source) -> FileMark | None:
    """What must not change for an entry of ``source`` to be reused; ``None`` if unknowable."""
    try:
        info = os.stat(source.path)
    except OSError:
        return None
    mark: FileMark = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    if source.member is not None:
        try:
            member = _zip_directory(source.path, info.st_size, info.st_mtime_ns).getinfo(
                source.member
            )
        except Exception:  # a damaged archive: such a source only ever fails, never reused
            return None
        mark["member_size"] = member.file_size
        mark["member_crc32"] = member.CRC
    return mark


def utc_now() -> str:
    """``classified_at`` for a new result: UTC, to the second, ISO 8601."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


ModelKey = tuple[object, object, object]


def _model_key(model: Mapping[str, object]) -> ModelKey:
    """What must match for an earlier entry to stand: the weights, torchxrayvision, and the
    run's options that change what an entry says (the domain policy, ...)."""
    return model.get("weights_sha256"), model.get("torchxrayvision"), model.get("options")


def _result_key(entry: ResultsEntry) -> tuple[object, ...]:
    if entry["status"] != CLASSIFIED:
        return (entry["path"], None, ())
    return (entry["path"], entry["sop_instance_uid"], tuple(sorted(entry["scores"].items())))


@dataclass
class EarlierResults:
    """What earlier runs left for the results file at one path: its entries and its journal's."""

    models: list[ModelBlock] = field(default_factory=list)
    """Every model block met, the results file's first (checked only when one is used)."""
    model_lists: list[object] = field(default_factory=list)
    """The results file's ``models`` (a multi-model run's), when it has one."""
    entries: dict[str, list[tuple[ModelBlock, ResultsEntry]]] = field(default_factory=dict)
    """``(model, entry)`` by path, oldest first (the journal is newer than the results file)."""

    @classmethod
    def load(cls, results_path: Path, journal: Path) -> EarlierResults:
        """Read the results file (if it is one) and the journal; damaged parts are passed over.

        An entry that is not what the types of :mod:`cxrsr.results_types` say is never
        reused.
        """
        earlier = cls()
        try:
            document = json.loads(Path(results_path).read_text(encoding="utf-8"))
            model, images = document["model"], document.get("images")
            if is_manifest(document):  # a sharded run's results: its shards' entries
                images = list(iter_entries(results_path))
            if isinstance(model, dict) and isinstance(images, list):
                entries = [e for e in images if problem(e, ResultsEntry) is None]
                earlier._add(model, cast(list[ResultsEntry], entries))
                if "models" in document:
                    earlier.model_lists.append(document["models"])
        except (OSError, ValueError, KeyError, TypeError, PipelineError):
            pass  # no usable results file: nothing to reuse from it
        for model, entry in read_journal(journal):
            earlier._add(model, [entry])
        return earlier

    def _add(self, model: ModelBlock, entries: list[ResultsEntry]) -> None:
        if not self.models or self.models[-1] != model:
            self.models.append(model)
        for entry in entries:
            self.entries.setdefault(entry["path"], []).append((model, entry))

    def weights_digest(self, weights: str, cache_dir: Path, torchxrayvision: str) -> str | None:
        """The SHA-256 of the weights file this run would load, found without loading it.

        An earlier model block of the same weights name and torchxrayvision version names
        the weights file (finding the name otherwise means importing torchxrayvision, and
        with it PyTorch: seconds). ``None`` when no earlier block fits or the file is gone.
        """
        listed = [m for ms in self.model_lists if isinstance(ms, list) for m in ms]
        for model in reversed([*self.models, *listed]):
            if not isinstance(model, dict):
                continue
            name = model.get("weights_file")
            if (
                model.get("weights") != weights
                or model.get("torchxrayvision") != torchxrayvision
                or not isinstance(name, str)
                or Path(name).name != name
            ):
                continue
            try:
                from cxrsr.model.classifier import sha256_of

                return sha256_of(Path(cache_dir) / name)
            except OSError:
                return None
        return None

    def model_for(
        self, digest: str, torchxrayvision: str, options: RunOptions | None
    ) -> ModelRecord | None:
        """The latest earlier model block of these weights, for a run that loads no model."""
        for model in reversed(self.models):
            if _model_key(model) == (digest, torchxrayvision, options):
                return cast(ModelRecord, model) if problem(model, ModelRecord) is None else None
        return None

    def models_for(self, model: ModelRecord) -> list[ModelRecord] | None:
        """The earlier results file's ``models`` that starts with ``model``, if any."""
        for models in self.model_lists:
            if (
                isinstance(models, list)
                and models
                and models[0] == model
                and problem(models, list[ModelRecord]) is None
            ):
                return cast(list[ModelRecord], models)
        return None

    def reusable(
        self,
        name: str,
        mark: FileMark | None,
        model: ModelKey,
        results_dir: Path | None = None,
    ) -> ResultsEntry | None:
        """The newest earlier entry for file ``name`` that may stand for this run, if any."""
        if mark is None:
            return None
        for entry_model, entry in reversed(self.entries.get(name, [])):
            if (
                _model_key(entry_model) == model
                and entry.get(FILE_KEY) == mark
                and entry.get("status") != FAILED
                and (results_dir is None or pictures_present(entry, results_dir))
            ):
                return copy.deepcopy(entry)
        return None

    def classified_at(self, entry: ResultsEntry, model: ModelRecord) -> str | None:
        """When an earlier run first produced this very result (same file, UID, weights, scores).

        A file touched but unchanged is classified again and gives the same scores: it
        keeps its time, so the same result is the same entry (and the same SR).
        """
        key = _result_key(entry)
        for entry_model, earlier in self.entries.get(entry["path"], []):
            if (
                earlier["status"] == CLASSIFIED
                and earlier.get("classified_at")
                and _model_key(entry_model) == _model_key(model)
                and _result_key(earlier) == key
            ):
                return earlier.get("classified_at")
        return None


@dataclass
class ReusePlan:
    """Which sources an earlier result stands for, and which must be classified."""

    sources: Sequence[Source]
    marks: list[FileMark | None]
    reused: dict[int, ResultsEntry]
    """Earlier entries by index into ``sources``."""
    model: ModelRecord | None
    """The earlier model block of the current weights (for a run that loads no model)."""
    models: list[ModelRecord] | None = None
    """A multi-model run's earlier ``models`` (for a run that loads no model)."""

    @property
    def todo(self) -> list[Source]:
        """The sources to classify, in input order."""
        return [s for i, s in enumerate(self.sources) if i not in self.reused]

    def merge(self, finished: list[ResultsEntry]) -> list[ResultsEntry]:
        """All entries in input order: reused ones, and ``finished`` (of :attr:`todo`, in order).

        ``finished`` may stop short (Ctrl-C): unfinished sources are left out.
        """
        by_path = {entry["path"]: entry for entry in finished}
        merged = []
        for index, source in enumerate(self.sources):
            entry = self.reused.get(index) or by_path.get(source.name)
            if entry is not None:
                merged.append(entry)
        return merged


def pictures_present(entry: ResultsEntry, results_dir: Path) -> bool:
    """Whether the preview and heatmaps an entry names are on disk.

    They are written on background threads and may lag the journal line that names
    them; a run killed in between left an entry whose pictures are missing, which is
    then classified again rather than reused.
    """
    if entry["status"] != CLASSIFIED:
        return True
    names: list[object] = []
    for part in [entry, *(entry.get("by_model") or {}).values()]:  # each model's (several)
        names += [part.get("preview"), *(part.get("heatmaps") or {}).values()]
    return all(isinstance(name, str) and (results_dir / name).is_file() for name in names if name)


def _file_digest(weights: str, cache_dir: Path) -> str | None:
    """The SHA-256 of the weights file of ``weights`` in ``cache_dir``, named by
    torchxrayvision's table, or ``None`` when it is not there.

    For a further model of a multi-model run that no earlier model block names (a killed
    run's journal names only the first model's file): costs importing torchxrayvision.
    """
    from cxrsr.model.classifier import sha256_of, weights_table

    files = {row["weights"]: row["file"] for row in weights_table()}
    try:
        return sha256_of(Path(cache_dir) / files[weights])
    except (KeyError, OSError):
        return None


def make_plan(
    sources: Sequence[Source],
    earlier: EarlierResults,
    digest: str | None,
    torchxrayvision: str,
    options: RunOptions | None = None,
    results_dir: Path | None = None,
) -> ReusePlan:
    """Fingerprint every source and pick the earlier entries that still hold."""
    marks = [fingerprint(source) for source in sources]
    reused: dict[int, ResultsEntry] = {}
    model = None
    if digest is not None:
        model = earlier.model_for(digest, torchxrayvision, options)
        for index, (source, mark) in enumerate(zip(sources, marks, strict=True)):
            entry = earlier.reusable(
                source.name, mark, (digest, torchxrayvision, options), results_dir
            )
            if entry is not None:
                reused[index] = entry
    models = earlier.models_for(model) if model is not None else None
    return ReusePlan(sources, marks, reused, model, models)


class JournalRecorder:
    """Completes each new entry (fingerprint, ``classified_at``) and appends it to the journal.

    :meth:`begin` runs once the model is loaded (in the loader's thread); entries
    finished before that are journaled then.
    """

    def __init__(
        self,
        plan: ReusePlan,
        earlier: EarlierResults,
        journal: Journal,
        clock: Callable[[], str] = utc_now,
    ) -> None:
        self._marks = {s.name: m for s, m in zip(plan.sources, plan.marks, strict=True)}
        self._earlier = earlier
        self._journal = journal
        self._clock = clock
        self.model: ModelRecord | None = None

    def begin(self, model: ModelRecord) -> None:
        self.model = model
        self._journal.start(model)

    def record(self, entry: ResultsEntry) -> None:
        mark = self._marks.get(entry["path"])
        if mark is not None:
            entry["file"] = mark
        if entry["status"] == CLASSIFIED and "classified_at" not in entry:
            assert self.model is not None, "a classified entry before the model loaded"
            entry["classified_at"] = self._earlier.classified_at(entry, self.model) or self._clock()
        self._journal.append(entry)


class ResultsRun:
    """One run's view of its results file: what earlier runs left that still holds, the
    journal of this run, and the results file written at the end.

    ``record`` each new entry as it is finished, ``sync`` after each network batch,
    ``close`` when classification stops (however it stops), then ``save``.
    """

    def __init__(
        self,
        output: Path,
        sources: Sequence[Source],
        weights: str,
        cache_dir: Path | None,
        options: RunOptions | None = None,
        others: Sequence[str] = (),
    ) -> None:
        """``others``: a multi-model run's further weights names (its entries are reused
        only when the same models, by name and weights SHA-256, in the same order, made them)."""
        from cxrsr.model.classifier import default_cache_dir, torchxrayvision_version

        self.options = options
        """Settings that change what an entry says; recorded in the model block as
        ``options``, and earlier entries made with other options are not reused."""
        self.output = Path(output)
        self.journal = Journal(journal_path(self.output))
        earlier = EarlierResults.load(self.output, self.journal.path)
        xrv = torchxrayvision_version()
        cache = cache_dir or default_cache_dir()
        self.digest = earlier.weights_digest(weights, cache, xrv)
        key_digest = self.digest
        if others:
            digests = [
                self.digest,
                *(
                    earlier.weights_digest(name, cache, xrv) or _file_digest(name, cache)
                    for name in others
                ),
            ]
            if None in digests:
                key_digest = None  # a model never seen here: nothing earlier can stand
            else:
                refs = [
                    ModelRef(weights=name, weights_sha256=cast(str, digest))
                    for name, digest in zip([weights, *others], digests, strict=True)
                ]
                self.options = {**(options or RunOptions()), "models": refs}
        self.planned_options = self.options
        self.plan = make_plan(sources, earlier, key_digest, xrv, self.options, self.output.parent)
        self.recorder = JournalRecorder(self.plan, earlier, self.journal)

    @property
    def todo(self) -> list[Source]:
        """The sources to classify in this run, in input order."""
        return self.plan.todo

    @property
    def reused(self) -> list[ResultsEntry]:
        """The earlier entries kept for this run."""
        return list(self.plan.reused.values())

    @property
    def earlier_model(self) -> ModelRecord | None:
        """The model block of the earlier results kept, for a run that loads no model."""
        return self.plan.model

    @property
    def earlier_models(self) -> list[ModelRecord] | None:
        """A multi-model run's earlier ``models``, for a run that loads no model."""
        return self.plan.models

    def _with_options(self, model: ModelRecord) -> ModelRecord:
        return model if self.options is None else {**model, "options": self.options}

    def begin(self, model: ModelRecord, others: Sequence[ModelRecord] = ()) -> None:
        """The model (and a multi-model run's ``others``) loaded: start journaling under
        its description, which for several models lists them all (``options.models``)."""
        self._name_models(model, others)
        self.recorder.begin(self._with_options(model))

    def _name_models(self, model: ModelRecord, others: Sequence[ModelRecord]) -> None:
        """Record every model of a multi-model run, with its weights' SHA-256, in the options."""
        if others:
            refs = [
                ModelRef(weights=m["weights"], weights_sha256=m["weights_sha256"])
                for m in (model, *others)
            ]
            self.options = {**(self.options or RunOptions()), "models": refs}

    def record(self, entry: ResultsEntry) -> None:
        """A new entry is finished (adds ``file`` and ``classified_at``, journals it)."""
        self.recorder.record(entry)

    def sync(self) -> None:
        self.journal.sync()

    def close(self) -> None:
        """Classification has stopped: what is journaled stays for a later run."""
        self.journal.close()

    def save(
        self,
        model: ModelRecord,
        finished: list[ResultsEntry],
        interrupted: bool,
        others: Sequence[ModelRecord] = (),
    ) -> tuple[list[ResultsEntry], list[str]]:
        """Write the results file (kept and new entries, in input order), then drop the journal.

        ``others``: a multi-model run's further models' blocks (the document's ``models``
        lists them after ``model``). Returns the entries and the warnings to show. A
        :class:`PipelineError` (exit 3) when the weights changed under the run or the file
        cannot be written; the journal then stays, so the next run loses nothing.
        """
        if self.plan.reused and (
            model.get("weights_sha256") != self.digest or self.options != self.planned_options
        ):
            raise PipelineError(
                f"the weights file changed during the run; run again ({self.journal.path} "
                "keeps the results finished so far)",
                exit_code=3,
            )
        entries = self.plan.merge(finished)
        self._name_models(model, others)  # also when no model was loaded (no begin)
        model = self._with_options(model)
        models = [model, *(self._with_options(other) for other in others)] if others else None
        try:
            notes = save_results(self.output, model, entries, interrupted, models)
        except OSError as exc:
            raise PipelineError(f"{self.output}: cannot write results: {exc}", 3) from exc
        self.journal.remove()  # folded into the results file
        return entries, notes
