"""Settings from the environment and the project's git-ignored ``.env``.

The run command (``run.sh``) creates ``.env`` with a random Orthanc password on first use;
``docker compose`` reads the same file, so the scripts, the container and the user agree
on one set of credentials without a password ever being committed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: The project root: the folder holding the three scripts and ``.env``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ORTHANC_URL = "http://127.0.0.1:8042"


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``#`` comments, optional quotes); a missing file is empty."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def dotenv_path() -> Path:
    """The project's ``.env``, or the file ``CXRSR_DOTENV`` names (the tests point it away)."""
    return Path(os.environ.get("CXRSR_DOTENV") or PROJECT_ROOT / ".env")


def setting(name: str, default: str | None = None, dotenv: Path | None = None) -> str | None:
    """The environment wins over ``.env``, which wins over ``default``."""
    if name in os.environ:
        return os.environ[name]
    return read_dotenv(dotenv or dotenv_path()).get(name, default)


@dataclass(frozen=True)
class OrthancSettings:
    """Where Orthanc is and how to log in. ``repr`` never shows the password."""

    url: str
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        return f"OrthancSettings(url={self.url!r}, username={self.username!r}, password=***)"


def orthanc_settings(
    url: str | None = None, username: str | None = None, password: str | None = None
) -> OrthancSettings:
    """Command-line values first, then ``ORTHANC_URL``/``ORTHANC_USERNAME``/``ORTHANC_PASSWORD``."""
    return OrthancSettings(
        url=(url or setting("ORTHANC_URL", DEFAULT_ORTHANC_URL) or DEFAULT_ORTHANC_URL).rstrip("/"),
        username=username if username is not None else setting("ORTHANC_USERNAME"),
        password=password if password is not None else setting("ORTHANC_PASSWORD"),
    )
