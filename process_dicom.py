#!/usr/bin/env python3
"""Step 1: classify every chest X-ray DICOM with TorchXRayVision into one JSON results file."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from cxrsr import cli
from cxrsr.discovery import check_inputs_exist, iter_sources
from cxrsr.errors import PipelineError
from cxrsr.results import FAILED, SKIPPED, save_results

DESCRIPTION = """\
Classify chest radiographs (CR/DX) with a TorchXRayVision DenseNet and write one JSON
results file. Inputs are files, folders (searched recursively) and .zip archives;
DICOM files are recognised by content. Other modalities, colour, multi-frame and
non-chest images are skipped with the reason; unreadable files fail with the reason;
the rest of the batch always goes on.

Scores: for the default weights (densenet121-res224-all) they are operating-point
normalised, NOT probabilities: 0.5 is each label's decision threshold, and a label is
listed under "findings" when its score is >= 0.5.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.make_parser(
        "process_dicom.py",
        DESCRIPTION,
        "the model weights are missing and cannot be downloaded (the message says where to put them)",
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
    model = parser.add_argument_group("model options")
    model.add_argument(
        "--weights",
        default="densenet121-res224-all",
        help="torchxrayvision DenseNet weights name (default: %(default)s)",
    )
    model.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder holding the weights file (default: torchxrayvision's, ~/.torchxrayvision/models_data)",
    )
    model.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the network runs; auto uses CUDA when present (default: %(default)s)",
    )
    model.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "onnx", "eager"],
        help="auto: ONNX Runtime on the CPU (checked against PyTorch at start), "
        "eager PyTorch on CUDA (default: %(default)s)",
    )
    model.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=16,
        help="images per network call (default: %(default)s)",
    )
    model.add_argument(
        "--workers",
        type=cli.non_negative_int,
        default=cli.available_cpus(),
        help="reader processes; 0 reads in the main process (default: the CPUs available, %(default)s)",
    )
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
    args = parser.parse_args(argv)
    cli.setup_logging(args)
    missing = check_inputs_exist(args.inputs)
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    check_writable(args.output)  # before any work, not after it

    sources = list(iter_sources(args.inputs))
    if not sources:
        cli.log.warning(
            "no files found in %s; put chest X-ray DICOM files there (see data/README.md)",
            ", ".join(args.inputs),
        )

    from cxrsr.classify import classify
    from cxrsr.heatmaps import ALL_LABELS, FINDINGS, HeatmapWriter
    from cxrsr.model import Classifier, load_classifier

    def load() -> Classifier:
        classifier = load_classifier(args.weights, args.cache_dir, args.device, args.backend)
        cli.log.debug(
            "model %s on %s, %s backend", args.weights, classifier.device, classifier.backend
        )
        return classifier

    counts: Counter[str] = Counter()
    with cli.progress(args, total=len(sources), unit="img") as bar:

        def report(entry: dict) -> None:
            counts[entry["status"]] += 1
            if entry["status"] == SKIPPED:
                cli.log.warning("%s: skipped: %s", entry["path"], entry["reason"])
            elif entry["status"] == FAILED:
                cli.log.error("%s: %s", entry["path"], entry["reason"])
            else:
                for note in entry.get("warnings", []):
                    cli.log.warning("%s: %s", entry["path"], note)
            bar.update(1)

        which = ALL_LABELS if args.all_heatmaps else FINDINGS
        heatmaps = None if args.no_heatmaps else HeatmapWriter(args.output.parent, which)
        run = classify(sources, load, args.batch_size, args.workers, report, heatmaps)

    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    try:
        notes = save_results(
            args.output, run.classifier.describe(), run.entries, run.interrupted, now
        )
    except OSError as exc:
        raise PipelineError(f"{args.output}: cannot write results: {exc}", exit_code=3) from exc
    for note in notes:
        cli.log.warning("%s", note)
    cli.summary(
        f"{counts['classified']} classified, {counts['skipped']} skipped, {counts['failed']} failed"
        f" -> {args.output}"
    )
    if run.interrupted:
        cli.log.error(
            "interrupted after %d of %d files; their results are in %s (marked incomplete)",
            len(run.entries),
            len(sources),
            args.output,
        )
        return cli.EXIT_INTERRUPTED
    return cli.EXIT_FAILED if counts["failed"] else cli.EXIT_OK


def check_writable(output: Path) -> None:
    """Stop at once (exit 3) if the results file could not be written at the end."""
    if output.is_dir():
        raise PipelineError(f"{output}: is a folder; --output names the results file", exit_code=2)
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{folder}: cannot create the results folder: {exc}", 3) from exc
    if not os.access(folder, os.W_OK):
        raise PipelineError(f"{folder}: cannot write the results file there", exit_code=3)


if __name__ == "__main__":
    sys.exit(cli.run(main))
