"""cxrsr.cli: what the three scripts share."""

from __future__ import annotations

import argparse
import logging
import sys
import types

import pytest

from cxrsr import cli


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
