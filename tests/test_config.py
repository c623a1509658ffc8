""".env: one parser (python-dotenv), one spelling every reader agrees on, never sourced.

A password with a space, ``"``, ``$`` and ``#`` goes through everything that reads it:
python-dotenv, a POSIX shell, run.sh's own pieces (scripts/common.sh), the local Orthanc
that run.sh starts, and the three scripts.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import run_script
from pydicom.uid import generate_uid

from cxrsr.config import PROJECT_ROOT, dotenv_line, dotenv_problems, read_dotenv, write_dotenv
from cxrsr.pacs.local_orthanc import free_port

NASTY_PASSWORD = 'pa ss"wo$rd#1 $(touch pwned)'
PY = sys.executable


def shell_reads(path: Path, key: str) -> str:
    """What a POSIX shell that sources ``path`` sees in ``key`` (the test's own reading)."""
    result = subprocess.run(
        ["sh", "-c", f'. "$1" && printf %s "${key}"', "sh", str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=path.parent,
    )
    return result.stdout


@pytest.mark.parametrize(
    "value",
    [NASTY_PASSWORD, "it's", "plain-Value_1.2", "a\\b", " lead and trail ", "#start", "x=y"],
)
def test_written_values_read_back_the_same_in_python_dotenv_and_sh(
    value: str, tmp_path: Path
) -> None:
    path = tmp_path / ".env"
    write_dotenv(path, {"ORTHANC_PASSWORD": value})
    assert read_dotenv(path)["ORTHANC_PASSWORD"] == value
    assert shell_reads(path, "ORTHANC_PASSWORD") == value
    assert dotenv_problems(path) == []
    assert not (tmp_path / "pwned").exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_nasty_password_is_written_in_single_quotes() -> None:
    assert dotenv_line("ORTHANC_PASSWORD", NASTY_PASSWORD) == f"ORTHANC_PASSWORD='{NASTY_PASSWORD}'"
    assert dotenv_line("ORTHANC_PASSWORD", "it's") == 'ORTHANC_PASSWORD="it\'s"'


@pytest.mark.parametrize(
    "value", ["it's$1", "it's\"", "it's\\n", "it`s'", "two\nlines", "a\\\\b", "end\\"]
)
def test_values_no_spelling_carries_for_every_reader_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"cannot be written to \.env"):
        dotenv_line("ORTHANC_PASSWORD", value)


def run_common_sh(script: str, cwd: Path, dotenv: Path) -> subprocess.CompletedProcess[str]:
    """run.sh's own pieces (scripts/common.sh), as run.sh calls them."""
    env = dict(os.environ, CXRSR_DOTENV=str(dotenv), PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run(
        ["bash", "-c", f'. "{PROJECT_ROOT}/scripts/common.sh" && {script}'],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def test_env_lines_the_readers_disagree_on_are_refused_and_never_run(tmp_path: Path) -> None:
    """Before, run.sh sourced .env: ``$(touch pwned)`` ran as a command."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a user's edits\n"
        "ORTHANC_URL=http://127.0.0.1:8042\n"
        "ORTHANC_PASSWORD=$(touch pwned)\n"
        'ORTHANC_USERNAME="it\'s$1"\n'
        "OTHER='a\\\\b'\n"
        "SPACED=two words\n"
        "FINE='two words # and $HOME'\n"
    )
    result = run_common_sh(f'ensure_dotenv "{PY}"', tmp_path, dotenv)
    assert result.returncode == 3, result.stderr
    assert not (tmp_path / "pwned").exists()
    errors = result.stderr.splitlines()
    assert [e.split(": ")[2] for e in errors] == [
        "ORTHANC_PASSWORD",
        "ORTHANC_USERNAME",
        "OTHER",
        "SPACED",
    ]
    assert all(e.startswith(f"E: {dotenv}:") for e in errors)
    assert "it's" not in result.stderr and "touch" not in result.stderr  # values never shown


def test_nasty_password_end_to_end_through_run_sh_pieces_local_orthanc_and_the_scripts(
    tmp_path: Path, corpus_dir: Path, weights_cache_dir: Path, orthanc_binary: str
) -> None:
    dotenv = tmp_path / ".env"
    port = free_port()
    created = run_common_sh(f'ensure_dotenv "{PY}"', tmp_path, dotenv)  # first run: init
    assert created.returncode == 0, created.stderr
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    assert read_dotenv(dotenv)["ORTHANC_USERNAME"] == "cxrsr"
    dotenv.unlink()  # as a user who sets their own password would edit it
    settings = {
        "ORTHANC_URL": f"http://127.0.0.1:{port}",
        "ORTHANC_USERNAME": "cxrsr",
        "ORTHANC_PASSWORD": NASTY_PASSWORD,
    }
    write_dotenv(dotenv, settings)

    loaded = run_common_sh(
        f'ensure_dotenv "{PY}" && load_orthanc_settings "{PY}" && '
        'printf "%s|%s" "$ORTHANC_URL" "$ORTHANC_USERNAME"',
        tmp_path,
        dotenv,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == f"{settings['ORTHANC_URL']}|cxrsr"

    # run.sh's local Orthanc start path, with the credentials from .env.
    orthanc_dir = tmp_path / "orthanc"
    env = dict(os.environ, CXRSR_DOTENV=str(dotenv))
    start = [PY, "-m", "cxrsr.pacs.local_orthanc", "start", "--dir", str(orthanc_dir)]
    start += ["--http-port", str(port), "--dicom-port", str(free_port())]
    try:
        started = subprocess.run(
            start, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=90
        )
        assert started.returncode == 0, started.stderr
        url = settings["ORTHANC_URL"]
        assert requests.get(f"{url}/system", auth=("cxrsr", NASTY_PASSWORD), timeout=5).ok
        assert requests.get(f"{url}/system", auth=("cxrsr", "pa ss"), timeout=5).status_code == 401

        data = tmp_path / "data"
        data.mkdir()
        ds = pydicom.dcmread(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(data / "IM1")
        results, sr_dir = tmp_path / "results.json", tmp_path / "sr"
        runs = [
            run_script(
                "process_dicom.py",
                data,
                "-o",
                results,
                "--cache-dir",
                weights_cache_dir,
                "-q",
                env=env,
            ),
            run_script(
                "generate_sr.py", "--results", results, "--output-dir", sr_dir, "-q", env=env
            ),
            run_script("upload_dicom.py", data, sr_dir, "-q", env=env),
        ]
        assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
        # The image, its SR and its key image.
        assert runs[2].stdout.startswith("3 stored, 0 already stored, 0 rejected, 0 failed")
        assert all(NASTY_PASSWORD not in r.stdout + r.stderr for r in runs)
    finally:
        stop = [PY, "-m", "cxrsr.pacs.local_orthanc", "stop", "--dir", str(orthanc_dir)]
        subprocess.run(stop, capture_output=True, env=env, cwd=PROJECT_ROOT, timeout=60)
    assert not (tmp_path / "pwned").exists() and not (PROJECT_ROOT / "pwned").exists()


def test_docker_path_refuses_credentials_orthanc_json_substitution_breaks(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    write_dotenv(dotenv, {"ORTHANC_USERNAME": "cxrsr", "ORTHANC_PASSWORD": NASTY_PASSWORD})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORTHANC_")}
    env["CXRSR_DOTENV"] = str(dotenv)
    command = [PY, "-m", "cxrsr.config", "check", "--orthanc-json"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    assert result.returncode == 3
    assert result.stderr.startswith('E: ORTHANC_PASSWORD holds a " or \\')
    assert len(result.stderr.splitlines()) == 1
    plain = subprocess.run(command[:-1], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    assert plain.returncode == 0, plain.stderr
