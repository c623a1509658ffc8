"""What the three scripts share: option groups, logging, exit codes, error handling.

Modelled on dcmtk's tools and pynetdicom's apps: every script has ``--version``,
``-q/--quiet`` and ``-v/--verbose``, and prints log lines prefixed by level
(``E: ``, ``W: ``, ``I: ``, ``D: ``) through tqdm so they never tear a progress bar.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrsr import __version__
from cxrsr.errors import PipelineError, one_line

#: Everything went fine.
EXIT_OK = 0
#: The run finished, but at least one item failed (see the per-item ``E:`` lines).
EXIT_FAILED = 1
#: Usage error (argparse's own convention).
EXIT_USAGE = 2
#: The run could not start or had to stop (missing weights, wrong credentials, server down).
EXIT_FATAL = 3
#: A bug: an unexpected exception (its traceback is printed, to report it).
EXIT_INTERNAL = 4
#: Interrupted by the user (Ctrl-C), as shells report SIGINT.
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success: every input ended as expected (skipped inputs are not failures)
  1    finished, but at least one input failed (each named on an E: line)
  2    usage error (bad option or argument)
  3    could not run: {fatal}
  4    internal error (a bug: the traceback is printed; please report it)
  130  interrupted (Ctrl-C); work already written is kept
"""

log = logging.getLogger("cxrsr")

_PREFIX = {
    logging.DEBUG: "D",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "E",
}


class _TqdmHandler(logging.Handler):
    """Write log records with ``tqdm.write`` so an active progress bar is redrawn below them.

    Without a bar (tqdm not even imported, see :func:`progress`) a plain write does.
    So does a tqdm that another thread is still importing: ``import pydicom`` imports
    tqdm, and an upload thread that meets the first SR imports pydicom while the other
    threads log; the half-initialised module has no ``tqdm`` yet (and no bar).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            bar_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
            if bar_class is not None:
                bar_class.write(self.format(record), file=sys.stderr)
            else:
                print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{_PREFIX.get(record.levelno, 'I')}: {one_line(record.getMessage())}"


def make_parser(prog: str, description: str, fatal_reasons: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the suite's general options and exit codes in its epilog."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=EXIT_CODES_HELP.format(fatal=fatal_reasons),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    general = parser.add_argument_group("general options")
    general.add_argument("--version", action="version", version=f"%(prog)s (cxrsr {__version__})")
    verbosity = general.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="only errors and the summary line; no progress bar",
    )
    verbosity.add_argument("-v", "--verbose", action="store_true", help="more detail (debug lines)")
    return parser


def available_cpus() -> int:
    """The CPUs this process may run on (``sched_getaffinity`` honours taskset and cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def positive_int(text: str) -> int:
    """argparse ``type`` for counts that must be at least 1 (workers, batch size, jobs)."""
    return _bounded_int(text, 1)


def non_negative_int(text: str) -> int:
    """argparse ``type`` for counts that may be 0 (retries, in-process workers)."""
    return _bounded_int(text, 0)


def _bounded_int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
    return value


#: Longest wait :func:`positive_seconds` accepts: a day. Far beyond any useful network
#: timeout, and far below what sockets can represent (1e300 s overflows ``time_t``).
MAX_SECONDS = 86400.0


#: ``--domain`` choices: the values of :class:`cxrsr.dicomio.domain.DomainPolicy` (not imported
#: here, so that scripts which never classify do not load it).
DOMAIN_POLICIES = ("strict", "warn", "off")


def add_domain_option(group: argparse._ArgumentGroup) -> None:
    """``--domain``, the domain gates' policy, as process_dicom.py and the watcher take it."""
    group.add_argument(
        "--domain",
        default=DOMAIN_POLICIES[0],
        choices=DOMAIN_POLICIES,
        help="images outside the training domain (veterinary, lateral or oblique views, "
        "orientations no turn explains): strict skips them, warn classifies them with a "
        "warning, off ignores the gates (default: %(default)s)",
    )


#: Seconds a reader may spend on one file. Here the slowest corpus file takes 0.13 s and a
#: corrupt JPEG 2000 1 s, so this is far beyond any honest file, and short enough that a
#: decoder caught in a loop by hostile data does not hold a batch for long.
DEFAULT_READ_TIMEOUT = 120.0


def add_model_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The model options every classifying script shares: weights, device, readers."""
    model = parser.add_argument_group("model options")
    model.add_argument(
        "--weights",
        default="densenet121-res224-all",
        help="torchxrayvision classifier weights name, a DenseNet-121 at 224 pixels or "
        "resnet50-res512-all; --list-weights shows them all; process_dicom.py also takes a "
        "comma-separated list of one input size, each model's scores kept apart "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--list-weights",
        action=_ListWeights,
        help="print every weights name with its labels, input size and file name, and exit",
    )
    model.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32: the model's own precision; int8: ONNX Runtime static quantization on "
        "the CPU, faster, scores drift (see docs/performance.md); fp16: eager PyTorch on a "
        "CUDA GPU (default: %(default)s)",
    )
    model.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder holding the weights file (default: torchxrayvision's, "
        "~/.torchxrayvision/models_data)",
    )
    model.add_argument(
        "--weights-sha256",
        type=sha256_hex,
        metavar="HEX",
        help="refuse (exit 3) a weights file whose SHA-256 differs, before reading anything in it",
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
        "eager PyTorch on CUDA; onnx with --device cuda: ONNX Runtime's CUDA provider "
        "(the onnxruntime-gpu package) (default: %(default)s)",
    )
    model.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="images per network call (default: %(default)s)",
    )
    model.add_argument(
        "--workers",
        type=non_negative_int,
        default=available_cpus(),
        help="reader processes; 0 reads in the main process (default: the CPUs available, "
        "%(default)s)",
    )
    model.add_argument(
        "--read-timeout",
        type=positive_seconds,
        default=DEFAULT_READ_TIMEOUT,
        metavar="S",
        help="seconds a reader process may spend on one file before it is stopped and the "
        "file fails (default: %(default)g; not with --workers 0)",
    )
    return model


#: ``--precision`` choices.
PRECISIONS = ("fp32", "int8", "fp16")


class _ListWeights(argparse.Action):
    """``--list-weights``: print torchxrayvision's classifiers and exit, like ``--version``."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from cxrsr.model.classifier import weights_table

        lines = [
            f"{row['weights']}  {row['architecture']}  {row['input_size']}x{row['input_size']}"
            f"  {row['file']}\n    {len(row['labels'])} labels: " + ", ".join(row["labels"])
            for row in weights_table()
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        parser.exit()


def sha256_hex(text: str) -> str:
    """argparse ``type`` for ``--weights-sha256``: 64 hexadecimal digits, in either case."""
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 (64 hexadecimal digits)")
    return text.lower()


def positive_seconds(text: str) -> float:
    """argparse ``type`` for durations that must be more than 0 (timeouts), up to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:.0f} seconds, not {text}")
    return value


def setup_logging(args: argparse.Namespace) -> None:
    """Route the package's log through tqdm with level prefixes, at the level the flags ask for."""
    handler = _TqdmHandler()
    handler.setFormatter(_PrefixFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    if getattr(args, "verbose", False):
        log.setLevel(logging.DEBUG)
    elif getattr(args, "quiet", False):
        log.setLevel(logging.ERROR)
    else:
        log.setLevel(logging.INFO)


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars are shown unless ``--quiet``."""
    return not getattr(args, "quiet", False)


def progress_disabled(args: argparse.Namespace) -> bool | None:
    """tqdm's ``disable``: off with ``--quiet``; otherwise ``None``, drawn on a terminal only,
    so logs and pipes get clean lines."""
    return None if show_progress(args) else True


class _NoBar:
    """A progress bar that draws nothing: for ``--quiet``, pipes and log files."""

    total: float | None = None

    def update(self, n: float | None = 1) -> bool | None:
        return None

    def refresh(self) -> None:
        return None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def progress(
    args: argparse.Namespace, total: int | None, unit: str, desc: str | None = None
) -> Any:
    """A tqdm bar on standard error when it is a terminal (unless ``--quiet``), else a no-op.

    ``total`` may be ``None`` while the work is still being found; set ``bar.total`` and
    call ``bar.refresh()`` once it is known.

    tqdm is imported only when a bar is drawn: importing it costs about 25 ms (it looks
    its own version up among the installed packages), which is a tenth of the client's
    CPU in a 300-file upload run from a script or a pipeline.
    """
    if progress_disabled(args) or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr)


def summary(line: str) -> None:
    """The one-line summary every script ends with; printed even with ``--quiet``."""
    print(line, flush=True)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a script's ``main`` and turn expected failures into one line and an exit code."""
    try:
        return main(argv)
    except PipelineError as exc:
        print(f"E: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("E: interrupted; work already written is kept", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(
            "E: internal error (a bug, not a problem with your files): please report the "
            "traceback above",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERNAL
