"""Settings from the environment and the project's git-ignored ``.env``, read by python-dotenv.

The run command (``run.sh``) creates ``.env`` with a random Orthanc password on first use;
``docker compose`` reads the same file (``env_file``), so the scripts, the container and
the user agree on one set of credentials without a password ever being committed.

Three programs read ``.env``: python-dotenv (these scripts), Docker Compose, and a POSIX
shell if a user sources it. They agree only on some spellings, so ``.env`` is written,
and checked, in those (:func:`dotenv_line`, :func:`dotenv_problems`):

* ``KEY='value'``: literal for all three, when the value holds no ``'``, no ``\\\\`` pair
  and does not end in ``\\`` (python-dotenv unescapes ``\\\\`` and ``\\'`` even in single
  quotes, Compose only ``\\'``);
* ``KEY="value"`` when the value holds a ``'`` but none of ``" \\ $ `````: each reader
  expands those differently inside double quotes;
* ``KEY=value`` unquoted for plain values (letters, digits and ``_ . / : @ % + , = -``).

No spelling carries a value with a ``'`` and one of ``" \\ $ ````` (for example ``it's$1``),
or with a line break, the same way to all three: such a value is refused.

Shell scripts never ``source`` ``.env``; they ask this module
(``python -m cxrsr.config get ORTHANC_URL``), which reads it with python-dotenv.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: The project root: the folder holding the three scripts and ``.env``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_ORTHANC_URL = "http://127.0.0.1:8042"
DEFAULT_ORTHANC_USERNAME = "cxrsr"

#: Unquoted values every reader takes literally: no white space, quotes, ``#``, ``$``,
#: backslash, or shell metacharacters.
_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+,=-]*")
#: ``KEY=`` (optionally after ``export``), the raw value, then nothing or a comment.
_BINDING = re.compile(
    r"""^\s*(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)\s*=[ \t]*
        (?P<raw>'[^']*'|"[^"]*"|[^\s#'"]*)[ \t]*(?:\#.*)?$""",
    re.VERBOSE,
)


def read_dotenv(path: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` bindings of a ``.env`` file, as python-dotenv reads them; a missing
    file is empty. Keys without a value are left out."""
    from dotenv import dotenv_values  # only where a setting is not in the environment

    if not path.is_file():
        return {}
    return {k: v for k, v in dotenv_values(path, encoding="utf-8").items() if v is not None}


def dotenv_path() -> Path:
    """The project's ``.env``, or the file ``CXRSR_DOTENV`` names (the tests point it away)."""
    return Path(os.environ.get("CXRSR_DOTENV") or PROJECT_ROOT / ".env")


def setting(name: str, default: str | None = None, dotenv: Path | None = None) -> str | None:
    """The environment wins over ``.env``, which wins over ``default``."""
    if name in os.environ:
        return os.environ[name]
    return read_dotenv(dotenv or dotenv_path()).get(name, default)


def value_problem(value: str) -> str | None:
    """Why ``value`` cannot be written in ``.env`` so that python-dotenv, Docker Compose
    and a POSIX shell all read it back unchanged, or ``None``."""
    if any(c in value for c in "\n\r\0"):
        return "it holds a line break or NUL character"
    if "'" in value and any(c in value for c in '"\\$`'):
        return (
            "it holds a ' together with one of \" \\ $ `, which no quoting carries for all readers"
        )
    if "'" not in value and ("\\\\" in value or value.endswith("\\")):
        return "it holds \\\\ or ends in \\, which python-dotenv and Compose read differently"
    return None


def dotenv_line(key: str, value: str) -> str:
    """``KEY=value`` in the spelling every reader takes literally; ``ValueError`` if none does."""
    problem = value_problem(value)
    if problem is not None:
        raise ValueError(f"{key} cannot be written to .env: {problem}")
    if _PLAIN.fullmatch(value):
        return f"{key}={value}"
    if "'" not in value:
        return f"{key}='{value}'"
    return f'{key}="{value}"'


def dotenv_problems(path: Path) -> list[str]:
    """One line for each binding in ``path`` that the three readers of ``.env`` would read
    differently, naming the line and the key, never the value."""
    from dotenv.parser import parse_stream

    problems = []
    with open(path, encoding="utf-8") as fh:
        bindings = list(parse_stream(fh))
    for binding in bindings:
        line = binding.original.line
        text = binding.original.string.rstrip("\n")
        if binding.error:
            problems.append(f"{path}:{line}: not a KEY=VALUE line")
            continue
        if binding.key is None or binding.value is None:
            continue  # a comment, a blank line, or a bare KEY
        match = _BINDING.match(text)
        where = f"{path}:{line}: {binding.key}"
        if match is None:
            problems.append(f"{where}: write the value in single quotes, {binding.key}='...'")
            continue
        raw = match["raw"]
        # The value as a shell reads it: python-dotenv's unescaping is what may differ.
        reason = value_problem(raw[1:-1] if raw[:1] in "'\"" else raw)
        if reason is not None:
            problems.append(f"{where}: {reason}; choose another value")
        elif raw.startswith('"') and any(c in raw[1:-1] for c in "\\$`"):
            problems.append(
                f"{where}: \\ $ ` inside double quotes are read differently by each "
                f"reader; write it in single quotes, {binding.key}='...'"
            )
        elif raw[:1] not in "'\"" and not _PLAIN.fullmatch(raw):
            problems.append(f"{where}: write the value in single quotes, {binding.key}='...'")
    return problems


def write_dotenv(path: Path, values: dict[str, str], header: str = "") -> None:
    """Create ``path`` readable by its owner only, with each value in the shared spelling."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [dotenv_line(key, value) for key, value in values.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def orthanc_json_problems() -> list[str]:
    """Credentials that Orthanc cannot take from its environment.

    ``orthanc.json`` names them as ``"${ORTHANC_USERNAME}": "${ORTHANC_PASSWORD}"``, and
    Orthanc substitutes environment variables into the file's text before parsing it
    as JSON: a ``"`` or ``\\`` in either value breaks or changes the JSON. (The local
    Orthanc of :mod:`cxrsr.pacs.local_orthanc` writes them as JSON strings instead.)
    """
    problems = []
    for name in ("ORTHANC_USERNAME", "ORTHANC_PASSWORD"):
        value = setting(name) or ""
        if '"' in value or "\\" in value:
            problems.append(
                f"{name} holds a \" or \\, which Orthanc's Docker configuration "
                "(${...} substituted into JSON) cannot carry; choose another value in .env"
            )
    if ":" in (setting("ORTHANC_USERNAME") or ""):
        problems.append(
            "ORTHANC_USERNAME holds a ':', which HTTP Basic authentication cannot carry"
        )
    return problems


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


_USAGE = """\
usage: python -m cxrsr.config init | check | get NAME

  init      create .env (owner-only) with the default URL, user cxrsr and a random
            password, unless it exists
  check     one E: line for each .env binding that python-dotenv, Docker Compose and
            a POSIX shell would read differently; exit 3 if there is one
  check --orthanc-json
            also refuse credentials that Orthanc's own substitution of ${ORTHANC_...}
            into orthanc.json cannot carry (the Docker image reads them that way)
  get NAME  print the setting NAME (environment, then .env, then the default)

.env is CXRSR_DOTENV if set, else the project's .env.
"""


def _main(argv: Sequence[str]) -> int:
    """For shell scripts (run.sh), which must never ``source`` ``.env``."""
    path = dotenv_path()
    if len(argv) == 1 and argv[0] == "init":
        if path.exists():
            return 0
        import secrets

        write_dotenv(
            path,
            {
                "ORTHANC_URL": DEFAULT_ORTHANC_URL,
                "ORTHANC_USERNAME": DEFAULT_ORTHANC_USERNAME,
                "ORTHANC_PASSWORD": secrets.token_urlsafe(18),
            },
            "Orthanc connection for the cxrsr scripts and docker compose. Created by run.sh;\n"
            "git-ignored. Write values in single quotes: KEY='value' (see README, .env).",
        )
        print(
            f"I: created {path.name} with a random Orthanc password (user cxrsr)", file=sys.stderr
        )
        return 0
    if argv[:1] == ["check"] and argv[1:] in ([], ["--orthanc-json"]):
        problems = dotenv_problems(path) if path.is_file() else []
        if argv[1:] and not problems:
            problems = orthanc_json_problems()
        for problem in problems:
            print(f"E: {problem}", file=sys.stderr)
        return 3 if problems else 0
    if len(argv) == 2 and argv[0] == "get":
        defaults = {"ORTHANC_URL": DEFAULT_ORTHANC_URL}
        print(setting(argv[1], defaults.get(argv[1])) or "")
        return 0
    print(_USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
