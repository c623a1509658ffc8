"""Send files to a PACS that is not reached through Orthanc's REST API: the common run.

A target (:class:`Target`; :mod:`cxrsr.pacs.stow` for DICOMweb, :mod:`cxrsr.pacs.dimse`
for DIMSE) only knows its protocol; this module does the rest the same way for every one:

* each file goes through :func:`cxrsr.pacs.upload.read_checked`, the same header check
  as the Orthanc REST upload, so a file that could hurt the PACS never reaches it;
* the files are taken in chunks (memory stays bounded however many there are); for each
  chunk the target first says which SOP instances it already holds (those are "already
  stored" and not sent again), then the rest is sent in batches by parallel workers;
* afterwards the target proves what it acknowledged (:meth:`Target.prove`), and the
  summary and exit code are those of :class:`cxrsr.pacs.upload.Report`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from cxrsr.dicomio.discovery import Source
from cxrsr.pacs.upload import (
    ALREADY_STORED,
    Checked,
    Outcome,
    Report,
    in_parallel,
    read_checked,
)


class Target(Protocol):
    """A PACS reached by one protocol."""

    description: str
    """How log lines name it (``DICOMweb server at https://...``)."""

    def check(self) -> None:
        """Reach the peer once: raise :class:`~cxrsr.errors.PipelineError` (exit 3) when it
        cannot be used at all (unreachable, credentials or AE title refused)."""

    def held(self, checked: Sequence[Checked]) -> set[str]:
        """The SOP Instance UIDs among ``checked`` that the peer holds already (empty
        when the protocol offers no way to ask)."""

    def store(self, batch: Sequence[Checked]) -> list[Outcome]:
        """Send ``batch``; one outcome per file, in order. Called from several threads."""

    def prove(self, report: Report) -> None:
        """Set ``verified`` (or a problem) on each acknowledged outcome, and say how in
        ``report.checked_by`` / ``report.verification_note``."""

    def close(self) -> None: ...


def send(
    sources: Iterable[Source],
    target: Target,
    workers: int,
    batch_size: int,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Check, filter and send every source; outcomes in input order."""
    outcomes: list[Outcome] = []
    numbered = iter(sources)
    while chunk := list(itertools.islice(numbered, max(1, workers) * batch_size)):
        outcomes.extend(_send_chunk(chunk, target, workers, batch_size, on_done))
    return outcomes


def _send_chunk(
    chunk: Sequence[Source],
    target: Target,
    workers: int,
    batch_size: int,
    on_done: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    results: dict[int, Checked | Outcome] = {}

    def keep(index: int, result: Checked | Outcome | BaseException) -> None:
        assert not isinstance(result, BaseException)
        results[index] = result

    in_parallel(read_checked, chunk, workers, keep)
    checked = [(i, r) for i, r in sorted(results.items()) if isinstance(r, Checked)]
    held = target.held([c for _i, c in checked]) if checked else set()
    outcomes: dict[int, Outcome] = {}
    for index, result in results.items():
        if isinstance(result, Outcome):
            outcomes[index] = result
        elif result.sop_instance_uid in held:
            outcomes[index] = result.outcome(ALREADY_STORED, "the PACS holds it already: not sent")
    if on_done is not None:
        for index in sorted(outcomes):
            on_done(outcomes[index])
    to_send = [(i, c) for i, c in checked if i not in outcomes]
    batches = [to_send[i : i + batch_size] for i in range(0, len(to_send), batch_size)]

    def stored(index: int, result: list[Outcome] | BaseException) -> None:
        assert not isinstance(result, BaseException)
        for (position, _checked), outcome in zip(batches[index], result, strict=True):
            outcomes[position] = outcome
            if on_done is not None:
                on_done(outcome)

    in_parallel(lambda b: target.store([c for _i, c in b]), batches, workers, stored)
    return [outcomes[i] for i in sorted(outcomes)]
