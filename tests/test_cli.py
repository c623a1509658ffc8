"""cxrsr.cli: what the three scripts share."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import types

import pytest

from cxrsr import cli
from cxrsr.config import PROJECT_ROOT


def test_a_log_line_survives_tqdm_being_imported_by_another_thread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``import pydicom`` imports tqdm; while one upload thread does that, the others log.

    Found by the fuzz test: the handler met the half-initialised module (no ``tqdm``
    attribute yet), and the file's E: line became a "--- Logging error ---" traceback.
    """
    cli.setup_logging(argparse.Namespace(quiet=False, verbose=False))
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))  # as mid-import
    monkeypatch.setattr(logging, "raiseExceptions", True)
    cli.log.error("%s: rejected: %s", "/data/a.dcm", "HTTP 400")
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert "E: /data/a.dcm: rejected: HTTP 400\n" in err


def test_a_message_quoting_a_hostile_header_stays_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found by fuzzing (seed 1, case 71): a SOP Class UID whose length swallowed the next
    elements put NULs and other control bytes into a W: line. A header could as well hold
    a line break, or an escape sequence that rewrites the user's terminal."""
    cli.setup_logging(argparse.Namespace(quiet=False, verbose=False))
    cli.log.warning("%s: skipped: %s is not an image", "/d/a.dcm", "1.2\x00\x02UI\n\x1b[2J\x9b")
    err = capsys.readouterr().err
    assert err == "W: /d/a.dcm: skipped: 1.2\\x00\\x02UI\\x0a\\x1b[2J\\x9b is not an image\n"
    assert cli.one_line("Bäcken 1.2.3") == "Bäcken 1.2.3"  # printable text is left alone


def test_a_fatal_error_message_stays_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from cxrsr.errors import PipelineError

    def main(argv: object) -> int:
        raise PipelineError("results.json: images[3] (/d/x\n.dcm) lacks scores", exit_code=2)

    assert cli.run(main) == 2
    assert capsys.readouterr().err == "E: results.json: images[3] (/d/x\\x0a.dcm) lacks scores\n"


@pytest.mark.parametrize(
    ("script", "rule"),
    [
        ("process_dicom.py", "a second run on the same results file exits 3 at once, naming"),
        ("generate_sr.py", "a second run on the same --output-dir exits 3 at once, naming"),
    ],
)
def test_help_states_the_lock_rule_and_the_exit_codes(script: str, rule: str) -> None:
    """Each script's --help says which run wins, and that a killed run's lock never blocks."""
    shown = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "100", "PATH": ""},
    )
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert rule in text
    assert "A killed run's lock never blocks" in text
    assert "another run holds" in text  # among the reasons for exit 3
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130 "):
        assert f"\n  {code}" in shown.stdout
