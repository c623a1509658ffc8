"""The HTML report beside the results file: results in, one self-contained page out.

``generate_sr.py`` writes ``report.html`` next to the results file with
:func:`write_report`; :mod:`cxrsr.report.page` builds the page, :mod:`cxrsr.report.images`
its pictures and :mod:`cxrsr.report.links` the links into Orthanc Explorer.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrsr.errors import PipelineError
from cxrsr.files import write_atomic
from cxrsr.report.page import Report, render_report
from cxrsr.results import ReadableResults

REPORT_NAME = "report.html"

__all__ = ["REPORT_NAME", "Report", "render_report", "report_path", "write_report"]


def report_path(results_path: Path) -> Path:
    """Where the report for ``results_path`` goes: ``report.html`` in the same folder."""
    return Path(results_path).parent / REPORT_NAME


def write_report(
    document: ReadableResults,
    results_path: Path,
    orthanc_url: str | None = None,
    jobs: int = 1,
) -> tuple[Path, Report]:
    """Write the report for the results file ``results_path`` (already loaded as ``document``).

    The report holds the same patient data as the results file, so it gets the results
    file's permissions. A report that cannot be written is a :class:`PipelineError`
    (exit 3, like an output folder that cannot be written).
    """
    results_path = Path(results_path)
    report = render_report(
        document, results_path.parent, orthanc_url, title=results_path.name, jobs=jobs
    )
    target = report_path(results_path)
    try:
        write_atomic(target, report.html.encode("utf-8"))
        os.chmod(target, results_path.stat().st_mode & 0o666)
    except OSError as exc:
        raise PipelineError(f"{target}: cannot write the report: {exc}", exit_code=3) from exc
    return target, report
