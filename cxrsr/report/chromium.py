"""Headless Chromium, as the README's screenshot script and the browser tests run it.

The flags keep the browser from phoning home (component updates, sync, background
networking), so a page that renders proves it needs nothing from the network: the report
opens from a USB stick.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile

FLAGS = (
    "--no-sandbox",  # runs as root in CI containers, where the sandbox cannot start
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def find_binary() -> str | None:
    """The system Chromium (Debian's ``chromium``), or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run(
    binary: str, url: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """One headless run of ``binary`` on ``url`` with a throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="cxrsr-chromium-") as profile:
        return subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
