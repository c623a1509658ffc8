#!/usr/bin/env python3
"""Write one DICOM SR (TID 1500, Comprehensive 3D SR) per image the results file marks classified.

Each SR is filed under the source image's patient and study, in its own SR series, and
references the source image; see the README's "Structured Report" section.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

from cxrsr import cli
from cxrsr.config import setting
from cxrsr.report import write_report
from cxrsr.results import LoadedResults, load_results
from cxrsr.runlock import hold
from cxrsr.sr.batch import generate_srs

DEFAULT_RESULTS = Path("output/results.json")
DEFAULT_OUTPUT_DIR = Path("output/sr")
#: The lock file of an output folder, inside it (hidden: uploads and --clean pass it over).
LOCK_NAME = ".generate_sr.lock"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(
        "generate_sr.py",
        description=__doc__.strip().splitlines()[0]
        + "\n\nReads the results file written by process_dicom.py and the source files it "
        "names; a bad entry, or a source that has gone or changed since classification, is "
        "reported and passed over. Each SR's UID is derived from its complete content: the "
        "same results file gives the same files, byte for byte.\n\n"
        "One run per output folder: a run holds DIR/.generate_sr.lock (owner-only; its pid, "
        "host, start time and command inside) while it writes, so two runs never mix or "
        "--clean each other's files; a second run on the same --output-dir exits 3 at once, "
        "naming the holder. A killed run's lock never blocks: the kernel frees it when the "
        "process ends. The results file is not locked: it is always whole (written "
        "atomically), and a run beside process_dicom.py reads the last one written.",
        fatal_reasons="the output folder cannot be written, or another run holds it (the E: "
        "line names it)\n       (a missing file, or one that is not a results file, is a "
        "usage error: 2)",
    )
    parameters = parser.add_argument_group("parameters")
    parameters.add_argument(
        "--results",
        type=Path,
        default=DEFAULT_RESULTS,
        metavar="FILE",
        help=f"results file from process_dicom.py (default: {DEFAULT_RESULTS})",
    )
    parameters.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help=f"where the SRs go, one <SOPInstanceUID>.dcm each (default: {DEFAULT_OUTPUT_DIR})",
    )
    parameters.add_argument(
        "--jobs",
        type=cli.positive_int,
        default=cli.available_cpus(),
        metavar="N",
        help="worker processes (default: the CPUs available, here %(default)s); the files "
        "and their bytes do not depend on N, and small runs use one process anyway",
    )
    parameters.add_argument(
        "--no-key-images",
        action="store_true",
        help="write SRs only; by default each SR comes with a key image (a Secondary "
        "Capture of the radiograph with the top finding's heatmap and every score, from the "
        "previews and heatmaps process_dicom.py wrote beside the results file)",
    )
    parameters.add_argument(
        "--clean",
        action="store_true",
        help="remove this tool's SRs in the output folder that these results no longer "
        "produce (run.sh uses it, so a PACS never receives outdated results)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup_logging(args)
    document = load_results(args.results)
    if document.get("complete") is False:
        cli.log.warning(
            "%s: process_dicom.py was interrupted; SRs only for the files it finished",
            args.results,
        )
    # One run per output folder, so that two runs never mix or --clean each other's files.
    with hold(args.output_dir / LOCK_NAME, str(args.output_dir)):
        return write_outputs(args, document)


def write_outputs(args: argparse.Namespace, document: LoadedResults) -> int:
    """Write the SRs, key images and report of ``document`` (the output folder's lock held)."""
    # Content Date/Time is each entry's classified_at; results files without it fall back
    # to when the file was written, never to the clock, so reruns write the same bytes.
    classified_at = datetime.datetime.fromtimestamp(args.results.stat().st_mtime, datetime.UTC)
    outcome = generate_srs(
        document,
        args.output_dir,
        classified_at,
        cli.progress_disabled(args),
        jobs=args.jobs,
        clean=args.clean,
        results_dir=None if args.no_key_images else args.results.parent,
    )
    # The HTML report beside the results file (README "The HTML report"); it links each
    # study into Orthanc Explorer when ORTHANC_URL is set in the environment or .env.
    report_file, report = write_report(
        document, args.results, setting("ORTHANC_URL"), jobs=args.jobs
    )
    for problem in report.problems:
        cli.log.warning(problem)
    cli.log.info("report: %s", report_file)
    cli.summary(outcome.summary(args.output_dir))
    return cli.EXIT_FAILED if outcome.errors else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run(main))
