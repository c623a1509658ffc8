"""One run per results file and per SR folder (cxrsr.runlock), with real processes.

A second process_dicom.py on the same results file exits 3 at once naming the holder,
and the first goes on undisturbed; a holder killed with SIGKILL never blocks the next
run; generate_sr.py refuses an output folder another run holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_script

from cxrsr.config import PROJECT_ROOT
from cxrsr.journal import journal_path, read_journal
from cxrsr.runlock import RunInUseError, RunLock, hold, lock_path

#: Classifiable corpus files (large ones: the run lasts while the test looks at it).
CLASSIFIABLE = ["cxr09_orthanc_issue44_mono1_jpeg8.dcm", "cxr05_dx_canon_966_fixed_j2kr.dcm"]


def linked_inputs(corpus_dir: Path, folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        name = CLASSIFIABLE[i % len(CLASSIFIABLE)]
        os.link(corpus_dir / name, folder / f"{i:03d}-{name}")
    return folder


def start(script: str, *args: str | Path) -> subprocess.Popen[str]:
    """A script as its own process group, output captured."""
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / script), *map(str, args)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def holder_of(path: Path) -> dict[str, Any] | None:
    """The details in the lock file at ``path``, once a holder has written them."""
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return None


def wait_until(event: Any, what: str, process: subprocess.Popen[str], timeout: float = 300) -> None:
    """Poll ``event()`` until it is true, while ``process`` runs (the timeout only turns
    a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not event():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.005)


def held_by(process: subprocess.Popen[str], lock: Path) -> bool:
    details = holder_of(lock)
    return details is not None and details["pid"] == process.pid


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


# --------------------------------------------------------------------------- the module


def test_a_second_holder_is_refused_with_the_first_ones_details(
    tmp_path: Path, no_umask: None
) -> None:
    results = tmp_path / "out" / "results.json"
    path = lock_path(results)
    assert path == tmp_path / "out" / "results.json.lock"
    command = ["/opt/cxrsr/process_dicom.py", "data", "-o", "out/results file.json"]
    with hold(path, str(results), command):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # umask 000 all the same
        details = json.loads(path.read_text())
        assert details["pid"] == os.getpid()
        assert details["host"] == socket.gethostname()
        assert details["command"] == "process_dicom.py data -o 'out/results file.json'"
        with pytest.raises(RunInUseError) as refused:
            RunLock.acquire(path, str(results))
        assert refused.value.exit_code == 3
        assert str(refused.value) == (
            f"{results}: in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
            f"started {details['started']}: process_dicom.py data -o 'out/results file.json'); "
            f"wait for it to end (lock file {path})"
        )
    assert not path.exists()  # released: deleted
    with hold(path, str(results)):
        assert holder_of(path) is not None


def test_the_lock_of_a_killed_holder_never_blocks(tmp_path: Path) -> None:
    """A holder killed with SIGKILL leaves its lock file behind; the kernel freed the lock."""
    path = tmp_path / "r.json.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cxrsr.runlock import RunLock; "
            "RunLock.acquire(sys.argv[1], 'r.json'); time.sleep(600)",
            str(path),
        ],
        cwd=PROJECT_ROOT,
    )
    try:
        wait_until(lambda: held_by(holder, path), "lock held", holder, timeout=60)
        with pytest.raises(RunInUseError, match=f"pid {holder.pid} "):
            RunLock.acquire(path, "r.json")
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert holder_of(path) is not None  # the stale lock file is still there
    with hold(path, "r.json"):
        assert holder_of(path)["pid"] == os.getpid()  # type: ignore[index]


# --------------------------------------------------------------------------- process_dicom.py


def test_a_second_run_on_the_same_results_file_exits_3_naming_the_first(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """The first run, stopped (SIGSTOP) mid-run while it holds the lock and has journaled
    results; a second run on the same --output exits 3 at once with one E: line naming
    it and touches nothing; the first, continued, finishes with every result."""
    count = 12
    folder = linked_inputs(corpus_dir, tmp_path / "in", count)
    out = tmp_path / "out" / "results.json"
    args = [folder, "-o", out, "--cache-dir", weights_cache_dir, "--workers", "1"]
    first = start("process_dicom.py", *args, "--batch-size", "1")
    lock, journal = lock_path(out), journal_path(out)
    try:
        # The lock is taken before the journal is opened: journaled results mean it is held.
        wait_until(lambda: len(list(read_journal(journal))) >= 2, "journaled results", first)
        os.kill(first.pid, signal.SIGSTOP)
        journaled = journal.read_bytes()

        second = run_script("process_dicom.py", *args, timeout=120)
        assert second.returncode == 3, second.stderr
        details = holder_of(lock)
        assert details is not None and details["pid"] == first.pid
        assert second.stderr.splitlines() == [
            f"E: {out}: in use by another run (pid {first.pid} on {socket.gethostname()}, "
            f"started {details['started']}: process_dicom.py {folder} -o {out} --cache-dir "
            f"{weights_cache_dir} --workers 1 --batch-size 1); wait for it to end "
            f"(lock file {lock})"
        ]
        assert journal.read_bytes() == journaled
        assert not out.exists()
        assert holder_of(lock) == details

        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        stop(first)
    assert first.returncode == 0, stderr
    assert f"{count} classified, 0 skipped, 0 failed -> {out}" in stdout
    images = json.loads(out.read_text())["images"]
    assert [entry["status"] for entry in images] == ["classified"] * count
    assert not journal.exists()  # folded into the results file by its own run
    assert not lock.exists()


def test_a_run_killed_with_sigkill_does_not_block_the_next(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    folder = linked_inputs(corpus_dir, tmp_path / "in", 4)
    out = tmp_path / "out" / "results.json"
    args = [folder, "-o", out, "--cache-dir", weights_cache_dir]
    first = start("process_dicom.py", *args)
    lock = lock_path(out)
    try:
        wait_until(lambda: held_by(first, lock), "lock held", first)
    finally:
        stop(first)
    assert holder_of(lock)["pid"] == first.pid  # type: ignore[index]  # left behind
    again = run_script("process_dicom.py", *args)
    assert again.returncode == 0, again.stderr
    assert len(json.loads(out.read_text())["images"]) == 4
    assert not lock.exists()


# --------------------------------------------------------------------------- generate_sr.py


def test_generate_sr_refuses_an_output_folder_another_run_holds(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    model = {
        "labels": ["Effusion"],
        "weights": "densenet121-res224-all",
        "weights_sha256": "0" * 64,
        "torchxrayvision": "1.3.4",
    }
    results.write_text(json.dumps({"model": model, "images": []}))
    sr_dir = tmp_path / "sr"
    lock = sr_dir / ".generate_sr.lock"
    command = ["generate_sr.py", "--output-dir", str(sr_dir), "--clean"]
    with hold(lock, str(sr_dir), command):
        details = holder_of(lock)
        assert details is not None
        refused = run_script(
            "generate_sr.py", "--results", results, "--output-dir", sr_dir, "--clean"
        )
        assert refused.returncode == 3, refused.stderr
        assert refused.stderr.splitlines() == [
            f"E: {sr_dir}: in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
            f"started {details['started']}: generate_sr.py --output-dir {sr_dir} --clean); "
            f"wait for it to end (lock file {lock})"
        ]
    done = run_script("generate_sr.py", "--results", results, "--output-dir", sr_dir)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in sr_dir.iterdir()) == []  # no SR, and the lock file gone
