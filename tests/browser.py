"""Debian's Chromium, headless, for the browser tests (the report and OHIF)."""

from __future__ import annotations

import subprocess

from conftest import missing_prerequisite

from cxrsr.report import chromium


def chromium_binary() -> str:
    """The system Chromium (test.sh installs Debian's ``chromium``)."""
    found = chromium.find_binary()
    if found is None:
        missing_prerequisite("chromium not installed (test.sh installs Debian's chromium)")
    assert found is not None
    return found


def run_chromium(url: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``url`` with a throw-away profile (flags:
    :data:`cxrsr.report.chromium.FLAGS`)."""
    return chromium.run(chromium_binary(), url, *extra, timeout=timeout)


def dump_dom(url: str) -> str:
    """The DOM after Chromium has parsed and laid out the page, serialised as HTML."""
    done = run_chromium(url, "--dump-dom")
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout
