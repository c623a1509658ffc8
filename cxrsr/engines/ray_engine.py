"""The Ray engine of process_dicom.py: the same classification as Ray Data tasks and actors.

The pipeline, per shard of inputs (:mod:`cxrsr.shards`)::

    shards to do ──flat_map──► one row per input ──map (CPU tasks)──► decoded input
        ──map_batches (actor pool, one model each)──► results entry ──driver──► shard file

- Decoding is :func:`cxrsr.classify.prepare`, the local engine's own function: the same
  reading, domain gates, reduced-resolution decode, preprocessing and display previews.
- Each actor loads the model with :func:`cxrsr.model.classifier.load_classifier` from a
  picklable spec (weights name, cache folder, device, backend, SHA-256, precision): no
  session or model object is ever pickled. It builds entries with
  :func:`cxrsr.classify.classified_entry` and :func:`cxrsr.classify.not_classified_entry`
  and writes heatmaps with :class:`cxrsr.model.heatmaps.HeatmapWriter`, flushing a
  batch's pictures before it returns the entries that name them.
- The driver writes each shard as soon as all its entries are back (atomic rename), so it
  holds at most the shards in flight; at the end it writes the Parquet table of scores
  and the manifest.

A worker or actor killed mid-run costs only a retry of the work it held: Ray runs its
task again (:data:`RETRIES` times). The inputs of a task that keeps dying (a decoder that
crashes on one of them every time, taking the others of its task with it) are then tried
once more one at a time, each decoded in a reader process of its own
(:mod:`cxrsr.reader_pool`) and classified alone: the culprit fails with the local
engine's reason ("reader process died (signal 11, SIGSEGV) while reading"), the others
come out as they would have. An input lost even alone fails with :data:`LOST_REASON`. A
rerun reuses every finished shard whose inputs (names and fingerprints) and
model still match, and redoes the others (a shard holding a failure is redone, as the
local engine tries failed files again).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
import socket
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from cxrsr import cli, shards
from cxrsr.classify import (
    PreparedImage,
    classified_entry,
    log_outcome,
    not_classified_entry,
    prepare,
    prepared_in_order,
)
from cxrsr.dicomio.discovery import Source, iter_sources
from cxrsr.dicomio.domain import DomainPolicy
from cxrsr.errors import PipelineError
from cxrsr.files import sync_files
from cxrsr.results import (
    CLASSIFIED,
    FAILED,
    SKIPPED,
    FileMark,
    ModelRecord,
    ResultsEntry,
    RunOptions,
    flag_shared_instance_uids,
    model_record,
)
from cxrsr.resume import fingerprint, utc_now

log = logging.getLogger("cxrsr")

#: Times Ray retries a task or an actor call whose process died before its inputs are
#: tried alone (and again before an input tried alone fails).
RETRIES = 2

#: The reason given to an input whose Ray tasks kept dying, also with it alone.
LOST_REASON = (
    f"lost: the Ray worker or actor holding it died {RETRIES + 1} times, and as often again "
    "with this file alone (see the Ray logs)"
)


def run_options(args: argparse.Namespace) -> RunOptions:
    """The run's settings that change what an entry says (as the local engine records them)."""
    from cxrsr.model.heatmaps import ALL_LABELS, FINDINGS

    which = ALL_LABELS if args.all_heatmaps else FINDINGS
    options: RunOptions = {"domain": args.domain, "heatmaps": "none" if args.no_heatmaps else which}
    if args.precision != "fp32":
        options["precision"] = args.precision
    return options


# --------------------------------------------------------------------------- the plan


@dataclass
class ShardPlan:
    """The shards of this run: which are kept from an earlier run, which are to do."""

    count: int = 0
    """Inputs in all."""
    shards: int = 0
    """Shards in all (numbered from 0, in input order)."""
    kept: list[int] = field(default_factory=list)
    kept_statuses: Counter[str] = field(default_factory=Counter)
    todo: list[dict[str, Any]] = field(default_factory=list)
    """``{"shard", "digest", "items"}`` per shard to do; ``items`` is a JSON list of
    ``[index, path, member, problem, mark]``."""


def model_key(model: ModelRecord) -> list[object]:
    """What an earlier shard's model must match: the weights, torchxrayvision, the options."""
    return [model.get("weights_sha256"), model.get("torchxrayvision"), model.get("options")]


def make_plan(
    sources: Iterator[Source], shard_size: int, model: ModelRecord, folder: Path
) -> ShardPlan:
    """Fingerprint the inputs shard by shard and keep the finished shards that still hold.

    Reads only the headers of earlier shards; the inputs stream through, so the plan
    holds the shards to do (names and fingerprints) and nothing of the finished ones.
    """
    finished = shards.finished_shards(folder)
    key = model_key(model)
    plan = ShardPlan()
    chunk: list[Source] = []

    def close_chunk() -> None:
        marks = [fingerprint(source) for source in chunk]
        digest = shards.inputs_digest(((s.name, m) for s, m in zip(chunk, marks, strict=True)), key)
        number = plan.shards
        header = finished.get(number)
        if (
            header is not None
            and header["inputs_sha256"] == digest
            and header["count"] == len(chunk)
            and not header.get("statuses", {}).get(FAILED)
        ):
            plan.kept.append(number)
            plan.kept_statuses.update(header.get("statuses", {}))
        else:
            items = [
                [plan.count + i, s.path, s.member, s.problem, m]
                for i, (s, m) in enumerate(zip(chunk, marks, strict=True))
            ]
            plan.todo.append({"shard": number, "digest": digest, "items": json.dumps(items)})
        plan.shards += 1
        plan.count += len(chunk)
        chunk.clear()

    for source in sources:
        chunk.append(source)
        if len(chunk) >= shard_size:
            close_chunk()
    if chunk:
        close_chunk()
    return plan


# --------------------------------------------------------------------------- Ray stages


#: Inputs per decoding task: few, so that small runs spread over every core too, and a
#: worker that dies takes few inputs with it.
DECODE_BLOCK = 4


def split_shards(todo: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The shards to do as pieces of :data:`DECODE_BLOCK` inputs: one decoding task each."""
    for shard in todo:
        items = json.loads(shard["items"])
        for first in range(0, len(items), DECODE_BLOCK):
            piece = json.dumps(items[first : first + DECODE_BLOCK])
            yield {"shard": shard["shard"], "items": piece}


def expand_shard(row: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per input of a piece of a shard to do."""
    return [
        {
            "shard": int(row["shard"]),
            "index": index,
            "path": path,
            "member": member or "",
            "problem": problem or "",
            "mark": json.dumps(mark),
        }
        for index, path, member, problem, mark in json.loads(row["items"])
    ]


class PrepareOne(Protocol):
    """Reads, checks, decodes and preprocesses one input, as :func:`cxrsr.classify.prepare`.

    Ray workers and reader processes import it by name: a module-level function.
    """

    def __call__(
        self, source: Source, domain: DomainPolicy, results_dir: Path | None, input_size: int
    ) -> PreparedImage: ...


def decode_row(
    row: dict[str, Any],
    domain: str,
    results_dir: str | None,
    input_size: int,
    prepare_one: PrepareOne = prepare,
) -> dict[str, Any]:
    """Read, check, decode and preprocess one input (a CPU task): :func:`cxrsr.classify.prepare`."""
    prepared = prepare_one(
        _source(row), DomainPolicy(domain), Path(results_dir) if results_dir else None, input_size
    )
    return _decoded(row, prepared)


def decode_row_alone(
    row: dict[str, Any],
    domain: str,
    results_dir: str | None,
    input_size: int,
    prepare_one: PrepareOne = prepare,
) -> dict[str, Any]:
    """:func:`decode_row` in a reader process of its own (:mod:`cxrsr.reader_pool`).

    For an input whose decoding task kept dying: a decoder that crashes on it kills the
    reader, not the Ray worker, and the input fails with the local engine's reason
    ("reader process died (signal 11, SIGSEGV) while reading").
    """
    one = functools.partial(
        prepare_one,
        domain=DomainPolicy(domain),
        results_dir=Path(results_dir) if results_dir else None,
        input_size=input_size,
    )
    (prepared,) = prepared_in_order([_source(row)], 1, 1, one)
    return _decoded(row, prepared)


def _source(row: dict[str, Any]) -> Source:
    """The input a row of :func:`expand_shard` names."""
    return Source(row["path"], row["member"] or None, row["problem"] or None)


def _decoded(row: dict[str, Any], prepared: PreparedImage) -> dict[str, Any]:
    return {
        "shard": row["shard"],
        "index": row["index"],
        "mark": row["mark"],
        "prepared": pickle.dumps(prepared, protocol=pickle.HIGHEST_PROTOCOL),
    }


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to load the model itself: plain values, picklable anywhere."""

    weights: str
    cache_dir: str | None
    device: str
    backend: str
    weights_sha256: str | None
    precision: str


@dataclass(frozen=True)
class ActorSettings:
    """An actor's settings: the model spec, the pictures' folder and which heatmaps."""

    spec: ModelSpec
    results_dir: str | None
    which: str
    threshold: float = 0.5


class ClassifyBatches:
    """A Ray Data actor: one model, loaded once; classifies a batch of decoded inputs.

    Used through :func:`configured_actor`, whose subclass carries the settings.
    """

    settings: ActorSettings

    def __init__(self) -> None:
        from cxrsr.model.classifier import classifier_from_options
        from cxrsr.model.heatmaps import HeatmapWriter

        spec, results_dir, which = (
            self.settings.spec,
            self.settings.results_dir,
            self.settings.which,
        )

        self.classifier = classifier_from_options(spec)
        self.results_dir = Path(results_dir) if results_dir else None
        self.heatmaps = HeatmapWriter(self.results_dir, which) if self.results_dir else None
        self.threshold = self.settings.threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        items: list[PreparedImage] = [pickle.loads(data) for data in batch["prepared"]]
        # Skipped and failed inputs now; the ready ones' places are filled by _classify.
        entries: list[Any] = [
            None if item.status == "ready" else not_classified_entry(item) for item in items
        ]
        ready = [i for i, item in enumerate(items) if item.status == "ready"]
        if ready:
            self._classify(items, ready, entries)
        for entry, mark in zip(entries, batch["mark"], strict=True):
            found: FileMark | None = json.loads(mark)
            if found is not None:
                entry["file"] = found
            if entry["status"] == CLASSIFIED:
                entry["classified_at"] = utc_now()
        return {
            "shard": list(batch["shard"]),
            "index": list(batch["index"]),
            "entry": [json.dumps(entry, ensure_ascii=False) for entry in entries],
        }

    def _classify(self, items: list[PreparedImage], ready: list[int], entries: list[Any]) -> None:
        inputs = np.stack([items[i].model_input for i in ready])  # type: ignore[misc]
        all_scores, all_maps = self.classifier.predict_with_maps(inputs)
        pictures: list[Path] = []
        tasks = []
        for i, scores, maps in zip(ready, all_scores, all_maps, strict=True):
            entry = classified_entry(items[i], scores, self.threshold)
            if self.heatmaps is not None:
                entry["heatmaps"], task = self.heatmaps.write(
                    items[i].path, scores, maps, self.classifier.input_size
                )
                tasks.append(task)
            if self.results_dir is not None and "preview" in entry:
                pictures.append(self.results_dir / entry["preview"])
            entries[i] = entry
        for task in tasks:
            pictures.extend(task.result())
        sync_files(pictures)  # the pictures are durable before any entry naming them is


def configured_actor(settings: ActorSettings) -> type[ClassifyBatches]:
    """:class:`ClassifyBatches` with ``settings`` built in.

    The settings travel inside the class (pickled by value with it), not as constructor
    arguments: Ray keeps those in its object store, from which a restarted actor may no
    longer get them.
    """
    return type("ClassifyBatches", (ClassifyBatches,), {"settings": settings})


# --------------------------------------------------------------------------- the driver


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Exit 3 at once when a ``HOST:PORT`` cluster address does not answer (Ray itself
    would retry for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PipelineError(f"cannot reach the Ray cluster at {address}: {exc}", 3) from exc


def _join_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise PipelineError(
            "--engine ray needs Ray: pip install -r requirements-ray.txt", exit_code=3
        ) from None
    from cxrsr.config import PROJECT_ROOT

    # Workers import cxrsr as the driver does: from this checkout, or the installed package.
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    # A Ray started for this run uses the loopback address: its servers take no password.
    try:
        ray.init(
            address=address or "local",  # never a cluster RAY_ADDRESS or `ray start` left
            _node_ip_address=None if address else "127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    except Exception as exc:  # ConnectionError, a bad address, a version mismatch
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise PipelineError(f"cannot start or join {where}: {exc}", exit_code=3) from exc
    quiet_ray_logs()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A lost block costs a second try of its inputs one at a time, not the run.
    context.max_errored_blocks = -1
    return ray


def quiet_ray_logs() -> None:
    """Ray's own INFO and WARNING lines stay in its log files, off the console: the run's
    messages are the suite's ``E:``/``W:``/``I:`` lines and its summary."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
                handler.addFilter(_not_an_ignored_block)


def _not_an_ignored_block(record: logging.LogRecord) -> bool:
    """Off the console: Ray Data's error and traceback for a block whose worker or actor
    kept dying, ignored as ``max_errored_blocks`` says. Its inputs are tried again alone,
    then fail with one ``E:`` line each; the traceback stays in Ray's log files. An
    exception raised by code (a bug) is still shown with its traceback."""
    from ray.exceptions import (
        NodeDiedError,
        ObjectLostError,
        OutOfMemoryError,
        RayActorError,
        WorkerCrashedError,
    )

    if "Ignoring this exception with remaining max_errored_blocks" not in record.getMessage():
        return True
    error = record.exc_info[1] if record.exc_info else None
    died = (WorkerCrashedError, RayActorError, NodeDiedError, OutOfMemoryError, ObjectLostError)
    return not isinstance(error, died)


def process_ray(args: argparse.Namespace, prepare_one: PrepareOne = prepare) -> int:
    """process_dicom.py --engine ray: classify ``args.inputs`` into sharded results.

    ``prepare_one`` decodes one input in the Ray tasks: :func:`cxrsr.classify.prepare`, or
    a module-level stand-in the workers can import (tests pass one that crashes).
    """
    from cxrsr.model.classifier import classifier_from_options

    if args.ray_address:
        check_reachable(args.ray_address)  # before minutes of work, not after
    started = time.monotonic()
    output = Path(args.output)
    folder = shards.shard_folder(output)
    options = run_options(args)
    # The model loads here first: missing or refused weights end the run (exit 3) before
    # Ray starts, the ONNX export is made once for every actor, and its description is
    # the results' model block.
    classifier = classifier_from_options(args)
    model = model_record({**classifier.describe(), "options": options})
    spec = ModelSpec(
        args.weights,
        str(args.cache_dir) if args.cache_dir else None,
        classifier.device,
        classifier.backend,
        args.weights_sha256,
        args.precision,
    )
    input_size = classifier.input_size
    del classifier

    plan = make_plan(iter_sources(args.inputs), args.shard_size, model, folder)
    if plan.count == 0:
        cli.log.warning(
            "no files found in %s; put chest X-ray DICOM files there (see data/README.md)",
            ", ".join(args.inputs),
        )
    if plan.kept:
        cli.log.info(
            "%d of %d shards unchanged since an earlier run: kept; classifying %d files",
            len(plan.kept),
            plan.shards,
            sum(len(json.loads(t["items"])) for t in plan.todo),
        )
    statuses: Counter[str] = Counter(plan.kept_statuses)
    written: set[int] = set(plan.kept)
    interrupted = False
    if plan.todo:
        try:
            run = ShardRun(
                args, plan, model, folder, spec, input_size, statuses, written, prepare_one
            )
            run.execute()
            cli.log.debug("ray engine: %.1f s", time.monotonic() - started)
        except KeyboardInterrupt:
            interrupted = True
    numbers = sorted(written)
    parquet = None
    if not interrupted:
        for note in flag_shared_uids(folder, numbers):
            cli.log.warning("%s", note)
        files = [folder / shards.shard_name(n) for n in numbers]
        parquet = shards.write_parquet(shards.parquet_path(output), model["labels"], files)
        remove_stale(folder, plan.shards)
    shards.write_manifest(output, model, numbers, statuses, parquet, complete=not interrupted)
    cli.summary(
        f"{statuses[CLASSIFIED]} classified, {statuses[SKIPPED]} skipped, "
        f"{statuses[FAILED]} failed"
        + (f" ({len(plan.kept)} shards kept from an earlier run)" if plan.kept else "")
        + f" -> {output} ({len(numbers)} shards in {folder})"
    )
    if interrupted:
        cli.log.error(
            "interrupted after %d of %d shards; they are kept in %s, and a rerun redoes the rest",
            len(numbers),
            plan.shards,
            folder,
        )
        return cli.EXIT_INTERRUPTED
    return cli.EXIT_FAILED if statuses[FAILED] else cli.EXIT_OK


def flag_shared_uids(folder: Path, numbers: list[int]) -> list[str]:
    """:func:`cxrsr.results.flag_shared_instance_uids` over all shards; returns its warnings.

    One pass over the shards finds the SOP Instance UIDs used by more than one entry (and
    notes an earlier run left); only the shards holding them are read whole and written
    again, with the same notes a results file would hold.
    """
    where: dict[str, list[int]] = {}
    stale: set[int] = set()
    for number in numbers:
        for entry in shards.iter_shard(folder / shards.shard_name(number)):
            if isinstance(entry, dict) and entry.get("status") == CLASSIFIED:
                where.setdefault(str(entry.get("sop_instance_uid")), []).append(number)
                if any(" is also used by " in str(note) for note in entry.get("warnings", [])):
                    stale.add(number)
    affected = sorted(stale.union(*(set(n) for n in where.values() if len(n) > 1)))
    del where
    if not affected:
        return []
    loaded = {
        number: cast(
            list[ResultsEntry], list(shards.iter_shard(folder / shards.shard_name(number)))
        )
        for number in affected
    }
    before = {number: json.dumps(entries) for number, entries in loaded.items()}
    notes = flag_shared_instance_uids([entry for n in affected for entry in loaded[n]])
    for number, entries in loaded.items():
        if json.dumps(entries) == before[number]:
            continue  # already so (a shard kept from an earlier run)
        header = shards.read_header(folder / shards.shard_name(number))
        assert header is not None
        shards.write_shard(folder, number, header["inputs_sha256"], header["model"], entries)
    return notes


def remove_stale(folder: Path, count: int) -> None:
    """Delete shard files numbered beyond this run's (left by a run over more inputs)."""
    for number in shards.finished_shards(folder):
        if number >= count:
            (folder / shards.shard_name(number)).unlink(missing_ok=True)


class ShardRun:
    """The Ray Data pipeline over the shards to do, and the driver's writing of shards."""

    def __init__(
        self,
        args: argparse.Namespace,
        plan: ShardPlan,
        model: ModelRecord,
        folder: Path,
        spec: ModelSpec,
        input_size: int,
        statuses: Counter[str],
        written: set[int],
        prepare_one: PrepareOne = prepare,
    ) -> None:
        self.args = args
        self.prepare_one = prepare_one
        """Decodes one input in the Ray tasks (tests pass one that crashes on some files)."""
        self.plan = plan
        self.model = model
        self.folder = folder
        self.spec = spec
        self.input_size = input_size
        self.statuses = statuses
        self.written = written
        self.waiting: dict[int, dict[int, ResultsEntry]] = {}
        """Entries back from the actors, by shard, until the shard is complete."""
        self.expected = {int(t["shard"]): _names(t["items"]) for t in plan.todo}
        self.digests = {int(t["shard"]): str(t["digest"]) for t in plan.todo}

    def execute(self) -> None:
        ray = _join_ray(self.args.ray_address)
        try:
            self._stream(ray)
        finally:
            ray.shutdown()

    def _dataset(self, ray: Any, pieces: list[dict[str, Any]], alone: bool) -> Any:
        # Ray 2.60 names no replacement for its retry options: its deprecation notes stay quiet.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated and will be removed in Ray")
            return self._build(ray, pieces, alone)

    def _build(self, ray: Any, pieces: list[dict[str, Any]], alone: bool) -> Any:
        """The pipeline over ``pieces`` (:func:`split_shards`); ``alone``: inputs lost
        before, each decoded in a reader process of its own and classified by itself."""
        from cxrsr.model.heatmaps import ALL_LABELS, FINDINGS

        args = self.args
        results_dir = None if args.no_heatmaps else str(Path(args.output).parent.resolve())
        which = ALL_LABELS if args.all_heatmaps else FINDINGS
        gpu = self.spec.device.startswith("cuda")
        dataset = ray.data.from_items(pieces, override_num_blocks=len(pieces))
        dataset = dataset.flat_map(expand_shard)
        dataset = dataset.map(
            decode_row_alone if alone else decode_row,
            fn_kwargs={
                "domain": args.domain,
                "results_dir": results_dir,
                "input_size": self.input_size,
                "prepare_one": self.prepare_one,
            },
            num_cpus=1,
            max_retries=RETRIES,  # a task whose worker died runs again, twice
        )
        return dataset.map_batches(
            configured_actor(ActorSettings(self.spec, results_dir, which)),
            batch_size=1 if alone else args.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=args.ray_actors),
            # No CPU reserved: the model runs beside the decoding tasks, as the local
            # engine's runs beside its readers (ONNX Runtime's threads share the cores).
            num_cpus=0,
            num_gpus=1 if gpu else 0,
            # A dead actor restarts, and the batch it held runs again, twice.
            max_restarts=-1,
            max_task_retries=RETRIES,
        )

    def _stream(self, ray: Any) -> None:
        """Every input through the pipeline; those lost with their task (a worker or actor
        that kept dying, and everything it held) once more, one at a time; then the
        inputs still lost fail with :data:`LOST_REASON`."""
        total = self.plan.count
        with cli.progress(self.args, total=total, unit="img") as bar:
            bar.update(sum(self.plan.kept_statuses.values()))
            self._receive(ray, list(split_shards(self.plan.todo)), False, bar)
            lost = self._lost_pieces()
            if lost:
                cli.log.info(
                    "%d files lost with the Ray tasks holding them: trying each alone", len(lost)
                )
                self._receive(ray, lost, True, bar)
        for number in sorted(self.waiting.keys() | self.expected.keys()):
            self._fill_lost(number)

    def _receive(self, ray: Any, pieces: list[dict[str, Any]], alone: bool, bar: Any) -> None:
        for row in self._dataset(ray, pieces, alone).iter_rows():
            entry: ResultsEntry = json.loads(row["entry"])
            self._report(entry)
            bar.update(1)
            self._arrived(int(row["shard"]), int(row["index"]), entry)

    def _lost_pieces(self) -> list[dict[str, Any]]:
        """The inputs that have not come back, one piece (:func:`split_shards`) each."""
        pieces = []
        for shard in self.plan.todo:
            number = int(shard["shard"])
            if number not in self.expected:
                continue  # written
            got = self.waiting.get(number, {})
            for item in json.loads(shard["items"]):
                if item[0] not in got:
                    pieces.append({"shard": number, "items": json.dumps([item])})
        return pieces

    def _report(self, entry: ResultsEntry) -> None:
        self.statuses[entry["status"]] += 1
        log_outcome(entry)

    def _arrived(self, number: int, index: int, entry: ResultsEntry) -> None:
        got = self.waiting.setdefault(number, {})
        got[index] = entry
        if len(got) == len(self.expected[number]):
            self._write(number)

    def _write(self, number: int) -> None:
        got = self.waiting.pop(number)
        entries = [got[index] for index in sorted(got)]
        shards.write_shard(self.folder, number, self.digests[number], self.model, entries)
        self.expected.pop(number)
        self.written.add(number)

    def _fill_lost(self, number: int) -> None:
        """A shard some of whose inputs never came back: those fail with the reason."""
        got = self.waiting.setdefault(number, {})
        for index, name in self.expected[number].items():
            if index not in got:
                lost: ResultsEntry = {"path": name, "status": FAILED, "reason": LOST_REASON}
                self._report(lost)
                got[index] = lost
        self._write(number)


def _names(items: str) -> dict[int, str]:
    """Input index to source name, for the items of one shard to do."""
    return {
        int(index): Source(path, member).name for index, path, member, _p, _m in json.loads(items)
    }
