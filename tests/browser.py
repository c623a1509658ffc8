"""Debian's Chromium, headless, for the browser tests (the report and OHIF).

The flags keep the browser from phoning home (component updates, sync, background
networking), so a test that passes proves the page needs nothing from the network.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile

from conftest import missing_prerequisite

QUIET_FLAGS = [
    "--no-sandbox",  # tests run as root in CI containers, where the sandbox cannot start
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def chromium_binary() -> str:
    """The system Chromium (test.sh installs Debian's ``chromium``)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        missing_prerequisite("chromium not installed (test.sh installs Debian's chromium)")
    assert found is not None
    return found


def run_chromium(url: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One headless Chromium run on ``url`` with a throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="cxrsr-chromium-") as profile:
        return subprocess.run(
            [chromium_binary(), *QUIET_FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def dump_dom(url: str) -> str:
    """The DOM after Chromium has parsed and laid out the page, serialised as HTML."""
    done = run_chromium(url, "--dump-dom")
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout
