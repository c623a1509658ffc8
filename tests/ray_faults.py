"""Faulty decoders for the Ray engine's tests, and a process_dicom.py that runs them.

Ray workers import the decoder by name, so it lives in this module, which they find on
the ``PYTHONPATH`` the driver hands them. Run as::

    python -c "import ray_faults; ray_faults.main()" MODE process_dicom.py-arguments...

with ``tests`` and the project root on ``PYTHONPATH``. ``MODE`` picks the decoder the Ray
engine uses instead of :func:`cxrsr.classify.prepare`: ``crash`` (:func:`prepare_or_segfault`)
or ``slow`` (:func:`prepare_or_wait`).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

from cxrsr.classify import PreparedImage, prepare
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import DomainPolicy

CRASH_MARK = "segfault-here"
"""A file whose name holds this crashes its decoder (:func:`prepare_or_segfault`)."""

SLOW_MARK = "slow-here"
"""A file whose name holds this keeps its first decoder busy (:func:`prepare_or_wait`)."""

#: Seconds the first decoder of a slow file waits to be killed before it goes on.
SLOW_WAIT = 120.0


def attempts_log(path: str) -> Path:
    """Where the decoders of a marked file note each attempt: ``FILE.attempts``, one line
    (the process id) per attempt."""
    return Path(f"{path}.attempts")


def _note_attempt(path: str) -> None:
    fd = os.open(attempts_log(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_or_segfault(
    source: Source, domain: DomainPolicy, results_dir: Path | None, input_size: int
) -> PreparedImage:
    """:func:`cxrsr.classify.prepare`, but a file named with :data:`CRASH_MARK` crashes the
    process every time, the way a faulty C decoder does: a read through a null pointer."""
    if CRASH_MARK in source.name:
        _note_attempt(source.path)
        ctypes.string_at(0)
    return prepare(source, domain, results_dir, input_size)


def prepare_or_wait(
    source: Source, domain: DomainPolicy, results_dir: Path | None, input_size: int
) -> PreparedImage:
    """:func:`cxrsr.classify.prepare`, but the first decoder of a file named with
    :data:`SLOW_MARK` notes its process id in the attempts log and waits to be killed (at
    most :data:`SLOW_WAIT` s); a later attempt decodes at once."""
    if SLOW_MARK in source.name:
        first = not attempts_log(source.path).exists()
        _note_attempt(source.path)
        if first:
            time.sleep(SLOW_WAIT)  # the test kills this process; the bound is for a test gone wrong
    return prepare(source, domain, results_dir, input_size)


MODES = {"crash": prepare_or_segfault, "slow": prepare_or_wait}


def main() -> None:
    """process_dicom.py with the Ray engine decoding through the decoder ``sys.argv[1]`` names."""
    import process_dicom
    from cxrsr import engines
    from cxrsr.engines.ray_engine import process_ray

    prepare_one = MODES[sys.argv[1]]
    engines.run_engine = lambda args: process_ray(args, prepare_one)
    sys.exit(process_dicom.main(sys.argv[2:]))
