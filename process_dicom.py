#!/usr/bin/env python3
"""Step 1: classify every chest X-ray DICOM with TorchXRayVision into one JSON results file."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrsr import cli, engines
from cxrsr.dicomio.discovery import check_inputs_exist, iter_sources
from cxrsr.dicomio.domain import DomainPolicy
from cxrsr.errors import PipelineError
from cxrsr.files import make_folders
from cxrsr.results import ModelRecord, ResultsEntry, RunOptions, model_record
from cxrsr.runlock import hold, lock_path

if TYPE_CHECKING:  # the model's imports wait until a file needs classifying
    from cxrsr.classify import Run
    from cxrsr.dicomio.discovery import Source
    from cxrsr.model.classifier import Classifier
    from cxrsr.resume import ResultsRun

DESCRIPTION = """\
Classify chest radiographs (CR/DX) with a TorchXRayVision DenseNet and write one JSON
results file. Inputs are files, folders (searched recursively) and .zip archives;
DICOM files are recognised by content. Other modalities, colour, multi-frame and
non-chest images are skipped with the reason; unreadable files fail with the reason;
the rest of the batch always goes on, even when a reader process dies. Domain gates
keep to what the model was trained on (human, frontal PA/AP, upright chest
radiographs; children are flagged): see --domain. Images stored rotated or mirrored
are turned upright as Patient Orientation says before the model sees them.

Finished results are journaled as the run goes (FILE.journal beside the results
file), so a killed run loses only the files in flight. Run the same command again:
results of unchanged files (same path, size, modification time and weights) are kept,
with their classified_at, and only new, changed, failed or unfinished files are read
(a different --domain policy reuses nothing).

One run per results file: a run holds FILE.lock beside it (owner-only; its pid, host,
start time and command inside) while it works, and a second run on the same results
file exits 3 at once, naming the holder. A killed run's lock never blocks: the kernel
frees it when the process ends, and the next run takes it over.

Several models: --weights a,b runs each listed model on every image (read once per
input size) and keeps their scores apart, one entry per image; generate_sr.py then
writes one SR per image and model. Scores are never averaged.

Scores: for the default weights (densenet121-res224-all) they are operating-point
normalised, NOT probabilities: 0.5 is each label's decision threshold, and a label is
listed under "findings" when its score is >= 0.5.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.make_parser(
        "process_dicom.py",
        DESCRIPTION,
        "the model weights are missing and cannot be downloaded (the message says where to put "
        "them), the weights file is refused (not plain DenseNet weights, or not the "
        "--weights-sha256 file), another run holds the results file (the E: line names it), "
        "or reader processes keep dying (finished results stay in FILE.journal)",
    )
    params = parser.add_argument_group("parameters")
    params.add_argument(
        "inputs",
        nargs="*",
        default=["data"],
        metavar="INPUT",
        help="DICOM files, folders or .zip archives (default: data/)",
    )
    params.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("output/results.json"),
        help="results file to write (default: %(default)s)",
    )
    cli.add_domain_option(params)
    cli.add_model_options(parser)
    output = parser.add_argument_group("output options")
    output.add_argument(
        "--no-heatmaps",
        action="store_true",
        help="write no heatmaps or display previews beside the results file (default: a "
        "heatmap per finding, or for the top label when there is none, under heatmaps/, and "
        "a preview per image under previews/; generate_sr.py needs them for key images)",
    )
    output.add_argument(
        "--all-heatmaps",
        action="store_true",
        help="a heatmap for every label, not only the findings (research; benchmarks)",
    )
    engines.add_engine_options(parser)
    args = parser.parse_args(argv)
    cli.setup_logging(args)
    missing = check_inputs_exist(args.inputs)
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    args.weights, args.other_weights = check_weights(args)
    check_writable(args.output)  # before any work, not after it
    # One run per results file: a second one would append to this run's journal, which
    # the first to finish folds into its results file and deletes.
    with hold(lock_path(args.output), str(args.output)):
        return process(args) if args.engine == "local" else engines.run_engine(args)


def check_weights(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``--weights a,b``: the first model and the further ones, checked before any work.

    Several models need distinct, known names, the local engine, and no
    ``--weights-sha256`` (which names one file); a usage error (exit 2) otherwise.
    """
    if "," not in args.weights:
        return args.weights, []
    names = [name.strip() for name in args.weights.split(",")]
    if "" in names:
        raise PipelineError(f"--weights {args.weights}: an empty weights name", exit_code=2)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise PipelineError(f"--weights {args.weights}: {', '.join(twice)} named twice", 2)
    if args.engine != "local":
        raise PipelineError(
            f"--weights {args.weights}: several models run only on the local engine "
            f"(--engine local), not --engine {args.engine}",
            exit_code=2,
        )
    if args.weights_sha256:
        raise PipelineError(
            "--weights-sha256 names one weights file; it cannot be used with several --weights",
            exit_code=2,
        )
    from cxrsr.model.classifier import weights_names

    known = weights_names()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise PipelineError(
            f"unknown weights {unknown[0]!r}; choose one of: {', '.join(known)}", exit_code=2
        )
    return names[0], names[1:]


def process(args: argparse.Namespace) -> int:
    """Classify ``args.inputs`` into ``args.output`` (the results file's lock held)."""
    sources = list(iter_sources(args.inputs))
    if not sources:
        cli.log.warning(
            "no files found in %s; put chest X-ray DICOM files there (see data/README.md)",
            ", ".join(args.inputs),
        )
    results = open_results(args, sources)
    with cli.progress(args, total=len(sources), unit="img") as bar:
        bar.update(len(results.reused))
        tally = Tally(results, bar)
        try:
            run = classify_new(args, results, tally)
        finally:
            results.close()  # what is finished stays journaled, whatever happened
    if run is not None and run.classifier is not None:
        model_block = model_record(run.classifier.describe())
        others = [model_record(other.describe()) for other in run.others]
    else:  # nothing classified: the models are needed only for their descriptions
        model_block, others = described_models(args, results)
    interrupted = run is not None and run.interrupted
    entries, notes = results.save(model_block, run.entries if run else [], interrupted, others)
    for note in notes:
        cli.log.warning("%s", note)
    return tally.summarise(args, entries, len(sources), interrupted)


def described_models(
    args: argparse.Namespace, results: ResultsRun
) -> tuple[ModelRecord, list[ModelRecord]]:
    """The model blocks of a run that classified nothing: the earlier results', or the
    models loaded only for their descriptions."""
    earlier, earlier_all = results.earlier_model, results.earlier_models
    if earlier is not None and not args.other_weights:
        return earlier, []
    if earlier is not None and earlier_all is not None:
        return earlier, earlier_all[1:]
    first = model_record(load(args).describe())
    return first, [model_record(load(args, name).describe()) for name in args.other_weights]


def open_results(args: argparse.Namespace, sources: list[Source]) -> ResultsRun:
    """The results file's run: earlier results of unchanged files, and this run's journal."""
    from cxrsr.model.heatmaps import ALL_LABELS, FINDINGS
    from cxrsr.resume import ResultsRun

    which = ALL_LABELS if args.all_heatmaps else FINDINGS
    # Settings that change what an entry says: results made with others are not reused.
    options: RunOptions = {"domain": args.domain, "heatmaps": "none" if args.no_heatmaps else which}
    if args.precision != "fp32":
        options["precision"] = args.precision
    results = ResultsRun(
        args.output, sources, args.weights, args.cache_dir, options, args.other_weights
    )
    if args.weights_sha256 and results.digest and results.digest != args.weights_sha256:
        raise PipelineError(
            f"the weights file's SHA-256 is {results.digest}, not the {args.weights_sha256} "
            "that --weights-sha256 requires",
            exit_code=3,
        )
    if results.reused:
        cli.log.info(
            "%d of %d files unchanged since an earlier run: their results are kept; classifying %d",
            len(results.reused),
            len(sources),
            len(results.todo),
        )
    return results


def load(args: argparse.Namespace, weights: str | None = None) -> Classifier:
    """The model ``args`` name, or with ``weights`` that one with the same options (run on
    the loader thread while the readers start)."""
    from cxrsr.model.classifier import classifier_from_options

    if weights is not None:
        args = argparse.Namespace(**{**vars(args), "weights": weights})
    classifier = classifier_from_options(args)
    cli.log.debug("model %s on %s, %s backend", args.weights, classifier.device, classifier.backend)
    return classifier


class Tally:
    """Each finished entry: journaled, counted, shown; then the summary line and exit code."""

    def __init__(self, results: ResultsRun, bar: Any) -> None:
        self.results = results
        self.counts: Counter[str] = Counter(entry["status"] for entry in results.reused)
        self.bar = bar

    @property
    def new(self) -> int:
        """How many entries this run has finished."""
        return sum(self.counts.values()) - len(self.results.reused)

    def report(self, entry: ResultsEntry) -> None:
        from cxrsr.classify import log_outcome  # numpy and the model stack: not for --help

        self.results.record(entry)
        self.counts[entry["status"]] += 1
        log_outcome(entry)
        self.bar.update(1)

    def summarise(
        self, args: argparse.Namespace, entries: list[ResultsEntry], total: int, interrupted: bool
    ) -> int:
        """The summary line, and the exit code."""
        counts = self.counts
        kept = (
            f" ({len(self.results.reused)} kept from an earlier run)" if self.results.reused else ""
        )
        cli.summary(
            f"{counts['classified']} classified, {counts['skipped']} skipped, {counts['failed']} failed"
            f"{kept} -> {args.output}"
        )
        if interrupted:
            cli.log.error(
                "interrupted after %d of %d files; their results are in %s (marked incomplete)",
                len(entries),
                total,
                args.output,
            )
            return cli.EXIT_INTERRUPTED
        return cli.EXIT_FAILED if counts["failed"] else cli.EXIT_OK


def classify_new(args: argparse.Namespace, results: ResultsRun, tally: Tally) -> Run | None:
    """Classify the files no earlier result stands for; ``None`` when there are none (then no
    model, no reader processes, not even their imports)."""
    if not results.todo:
        return None
    from cxrsr.classify import OtherModel, classify
    from cxrsr.model.classifier import model_input_size
    from cxrsr.model.heatmaps import ALL_LABELS, FINDINGS, HeatmapWriter, model_heatmap_folder
    from cxrsr.reader_pool import ReaderPoolError

    which = ALL_LABELS if args.all_heatmaps else FINDINGS
    heatmaps = None if args.no_heatmaps else HeatmapWriter(args.output.parent, which)
    others = [
        OtherModel(
            name,
            functools.partial(load, args, name),
            None
            if args.no_heatmaps
            else HeatmapWriter(args.output.parent, which, folder=model_heatmap_folder(name)),
            model_input_size(name, args.cache_dir),
        )
        for name in args.other_weights
    ]
    try:
        return classify(
            results.todo,
            functools.partial(load, args),
            args.batch_size,
            args.workers,
            tally.report,
            results.sync,
            domain=DomainPolicy(args.domain),
            heatmaps=heatmaps,
            read_timeout=args.read_timeout,
            input_size=model_input_size(args.weights, args.cache_dir),
            others=others,
            on_models=functools.partial(begin, results),
        )
    except ReaderPoolError as exc:
        raise PipelineError(
            f"{exc}; the {tally.new} results finished are kept in {results.journal.path}: "
            "run again once it is fixed",
            exc.exit_code,
        ) from exc


def begin(results: ResultsRun, models: list[Classifier]) -> None:
    """The models are loaded: the journal starts under their descriptions."""
    first, *others = (model_record(model.describe()) for model in models)
    results.begin(first, others)


def check_writable(output: Path) -> None:
    """Stop at once (exit 3) if the results file could not be written at the end."""
    if output.is_dir():
        raise PipelineError(f"{output}: is a folder; --output names the results file", exit_code=2)
    folder = output.parent
    try:
        make_folders(folder)
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot create the results folder: {exc}", 3) from exc
    if not os.access(folder, os.W_OK):
        raise PipelineError(f"{folder}: cannot write the results file there", exit_code=3)


if __name__ == "__main__":
    sys.exit(cli.run(main))
