"""Exceptions for expected failures.

Anything derived from :class:`PipelineError` is reported by the scripts as one
``E: ...`` line without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

#: C0 and C1 control characters, DEL included: line breaks and terminal escape sequences.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

#: Longest reason kept in a results file: a damaged length can make a "value" swallow
#: kilobytes of the header after it, which nobody can read in one line.
MAX_REASON = 400


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` with control characters written as ``\\xNN``, cut to ``limit`` characters.

    Messages quote values from the files they are about; a damaged or hostile header
    can hold line breaks (which would split an ``E:`` line or a results entry's reason in
    two), NULs, or terminal escape sequences (which would rewrite the user's screen).
    """
    text = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class PipelineError(Exception):
    """An expected failure that ends a whole run (bad arguments, missing weights, ...).

    ``exit_code`` is what the script exits with; see each script's ``--help``.
    """

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(Exception):
    """One input file cannot be used; the batch goes on and the reason is recorded."""


class NotARadiographError(InputError):
    """The file is valid DICOM but not something the model should see (skipped, not failed)."""


class SourceReadError(InputError, OSError):
    """A file or archive member cannot be read: a damaged or hostile zip, a vanished member.

    Both an :class:`InputError` (process_dicom.py records the file as failed) and an
    ``OSError`` (upload_dicom.py reports it as "cannot read"), so every consumer that
    handles one unreadable file and goes on handles this one too.
    """


class SourceMissingError(SourceReadError, FileNotFoundError):
    """A named archive member is not (or no longer) in its archive: the source has gone."""
