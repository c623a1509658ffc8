"""Durability (issue 9, items 2, 3 and 8): dead readers, killed runs, reruns, permissions.

Real processes and real signals throughout: reader processes killed with SIGKILL from
outside or crashing with a real SIGSEGV (a null pointer read), whole runs killed with
SIGKILL to their process group, then run again, on corpus files and the tests'
random-weights model.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import run_script

from cxrsr.classify import PreparedImage, classify, prepare, prepared_in_order
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import Source
from cxrsr.files import make_folders, write_atomic
from cxrsr.journal import Journal, journal_path, read_journal
from cxrsr.model.classifier import load_classifier
from cxrsr.reader_pool import ReaderPool, ReaderPoolError

SCRIPT = PROJECT_ROOT / "process_dicom.py"

#: Classifiable corpus files, small to large; the large ones keep a reader busy.
CLASSIFIABLE = [
    "cxr07_barre_CR-MONO1-10-chest_nometa.dcm",
    "cxr10_nih_dx_8bit.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr05_dx_canon_966_fixed_j2kr.dcm",
]

CRASH_MARK = "segfault-here"


def prepare_or_segfault(source: Source) -> PreparedImage:
    """:func:`cxrsr.classify.prepare`, but a file named with :data:`CRASH_MARK` crashes the
    process the way a faulty C decoder does: a read through a null pointer (SIGSEGV)."""
    if CRASH_MARK in source.name:
        ctypes.string_at(0)
    return prepare(source)


HANG_MARK = "hang-here"


def prepare_or_hang(source: Source) -> PreparedImage:
    """:func:`cxrsr.classify.prepare`, but a file named with :data:`HANG_MARK` never
    finishes, as a decoder caught in a loop by hostile data would not."""
    if HANG_MARK in source.name:
        while True:
            time.sleep(1)
    return prepare(source)


def sleep_if_negative(item: int) -> int:
    """A reader function for the pool's own tests: a negative item never finishes."""
    if item < 0:
        while True:
            time.sleep(1)
    return item * 2


def linked_copies(
    corpus_dir: Path, folder: Path, names: list[str], count: int, copy: bool = False
) -> list[Path]:
    """``count`` files in ``folder``: hard links to ``names`` in turn (or copies, when each
    must have its own modification time)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = names[i % len(names)]
        target = folder / f"{i:03d}-{name}"
        if copy:
            shutil.copy2(corpus_dir / name, target)
        else:
            os.link(corpus_dir / name, target)
        paths.append(target)
    return paths


def start_process(*args: str | Path, umask: int | None = None) -> subprocess.Popen[str]:
    """process_dicom.py as its own process group (as a shell job), output captured."""

    def setup() -> None:
        if umask is not None:
            os.umask(umask)

    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=setup,
    )


def journal_entries(path: Path) -> list[dict[str, Any]]:
    return [entry for _, entry in read_journal(path)]


Found = TypeVar("Found")


def wait_until(
    event: Callable[[], Found | None],
    what: str,
    process: subprocess.Popen[str] | None = None,
    timeout: float = 300,
) -> Found:
    """Poll ``event`` until it returns something (then that), while ``process`` runs.

    The timeout only turns a hang into a failure; the wait itself ends on the event.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = event()
        if found:
            return found
        assert process is None or process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.005)


def wait_for_journal(process: subprocess.Popen[str], path: Path, entries: int) -> None:
    wait_until(lambda: len(journal_entries(path)) >= entries, f"{entries} journal entries", process)


def reader_processes(pid: int) -> list[int]:
    """The spawned reader processes of process ``pid`` (not the resource tracker); none
    once it has ended. A reader that is dead but not yet reaped has no command line."""
    children = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    readers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                readers.append(child)
        except FileNotFoundError:
            continue
    return readers


def process_state(pid: int) -> str:
    """The state letter of process ``pid`` (R running, S sleeping, Z dead...); X once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "X"
    return text[text.rindex(")") + 2]


def busy_reader(pid: int, folder: Path) -> int | None:
    """A reader of process ``pid`` that holds a file of ``folder`` open: inside a task,
    reading that file (a reader between two files holds none, and its state letter alone
    cannot tell: a reader waiting for the CPU to send its last result is in state R too)."""
    inside = str(folder.resolve()) + os.sep
    for reader in reader_processes(pid):
        try:
            descriptors = list(Path(f"/proc/{reader}/fd").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in descriptors:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(inside):
                return reader
    return None


def without_times(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k != "classified_at"} for e in entries]


# --------------------------------------------------------------------------- item 2


def test_a_segfaulting_decoder_fails_only_its_own_file(corpus_dir: Path, tmp_path: Path) -> None:
    """A reader that crashes costs its one file; every other file comes out as it would."""
    paths = linked_copies(corpus_dir, tmp_path / "in", CLASSIFIABLE[:4], 12)
    crash = paths[5].rename(paths[5].with_name(f"{CRASH_MARK}.dcm"))
    paths[5] = crash
    sources = [Source(str(p)) for p in paths]
    results = list(prepared_in_order(sources, 2, 6, prepare_or_segfault))
    assert [r.path for r in results] == [s.name for s in sources]
    failed = [r for r in results if r.status == "failed"]
    assert [(r.path, r.reason) for r in failed] == [
        (str(crash), "reader process died (signal 11, SIGSEGV) while reading")
    ]
    for source, result in zip(sources, results, strict=True):
        if source.path == str(crash):
            continue
        expected = prepare(source)
        assert (result.status, result.identity) == ("ready", expected.identity)
        assert (result.model_input == expected.model_input).all()


def test_a_hung_reader_is_stopped_and_fails_only_its_own_file(
    corpus_dir: Path, tmp_path: Path
) -> None:
    """A file whose reading never ends fails after the timeout, with the reason; the files
    before and after it come out as they would, and the run ends."""
    paths = linked_copies(corpus_dir, tmp_path / "in", CLASSIFIABLE[:4], 8)
    hang = paths[3].rename(paths[3].with_name(f"{HANG_MARK}.dcm"))
    paths[3] = hang
    sources = [Source(str(p)) for p in paths]
    started = time.monotonic()
    results = list(prepared_in_order(sources, 2, 6, prepare_or_hang, timeout=3))
    assert time.monotonic() - started < 60
    assert [r.path for r in results] == [s.name for s in sources]
    assert [(r.path, r.status, r.reason) for r in results if r.status != "ready"] == [
        (str(hang), "failed", "reading took longer than 3 s; the reader was stopped")
    ]


def test_the_reader_timeout_counts_from_when_an_item_begins() -> None:
    """Items queued behind a slow one are not charged for the wait, and a stopped reader
    is replaced: the pool goes on with every other item."""
    reasons: list[str] = []
    pool: ReaderPool[int, int] = ReaderPool(
        sleep_if_negative, 1, lambda item, reason: reasons.append(reason) or -1, timeout=2
    )
    with pool:
        futures = [pool.submit(item) for item in (-1, 1, -2, 2, 3)]
        assert [f.result(timeout=60) for f in futures] == [-1, 2, -1, 4, 6]
    assert reasons == ["reading took longer than 2 s; the reader was stopped"] * 2


def test_classify_goes_on_after_a_reader_crash(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    paths = linked_copies(corpus_dir, tmp_path / "in", CLASSIFIABLE[:3], 8)
    crash = paths[2].rename(paths[2].with_name(f"{CRASH_MARK}.dcm"))
    paths[2] = crash
    seen: list[str] = []
    run = classify(
        [Source(str(p)) for p in paths],
        lambda: load_classifier(cache_dir=weights_cache_dir, backend="eager", device="cpu"),
        batch_size=3,
        workers=2,
        on_entry=lambda entry: seen.append(entry["path"]),
        prepare_one=prepare_or_segfault,
    )
    assert [e["path"] for e in run.entries] == [str(p) for p in paths]
    assert sorted(seen) == sorted(str(p) for p in paths)
    assert [e["status"] for e in run.entries] == ["classified"] * 2 + ["failed"] + [
        "classified"
    ] * 5


def test_killing_a_reader_mid_batch_fails_only_its_file(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of one busy reader (as the OOM killer would): one file fails, exit 1, all written."""
    count = 24
    linked_copies(corpus_dir, tmp_path / "in", CLASSIFIABLE[4:], count)  # large, slow to decode
    out = tmp_path / "out" / "r.json"
    process = start_process(
        tmp_path / "in", "-o", out, "--cache-dir", weights_cache_dir, "--workers", "2",
        "--batch-size", "2",
    )  # fmt: skip
    try:
        wait_for_journal(process, journal_path(out), 2)  # mid-batch: results are flowing
        victim = wait_until(
            lambda: busy_reader(process.pid, tmp_path / "in"), "busy reader", process
        )
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    entries = json.loads(out.read_text())["images"]
    assert len(entries) == count
    failed = [e for e in entries if e["status"] == "failed"]
    reason = "reader process died (signal 9, SIGKILL) while reading"
    assert [e["reason"] for e in failed] == [reason]
    assert f"E: {failed[0]['path']}: {reason}" in stderr
    assert sum(e["status"] == "classified" for e in entries) == count - 1
    assert f"{count - 1} classified, 0 skipped, 1 failed" in stdout
    assert not journal_path(out).exists()


def test_an_idle_reader_that_dies_is_replaced_and_costs_nothing() -> None:
    pool: ReaderPool[int, int] = ReaderPool(abs, 1, lambda item, reason: -1)
    with pool:
        assert pool.submit(-3).result(timeout=60) == 3
        (reader,) = pool._readers
        os.kill(reader.process.pid, signal.SIGKILL)
        reader.process.join()
        assert pool.submit(-4).result(timeout=60) == 4


def test_readers_that_cannot_even_start_end_the_run() -> None:
    """A reader that dies before taking any work is replaced a few times, then the pool gives up
    (an endless cycle of spawning would hang the run)."""
    pool: ReaderPool[int, int] = ReaderPool(abs, 1, lambda item, reason: -1, initializer=os.abort)
    with pool:
        future = pool.submit(-3)
        with pytest.raises(ReaderPoolError, match=r"keep dying before they read .*SIGABRT"):
            future.result(timeout=120)


def test_readers_that_keep_dying_end_the_run_with_exit_3_keeping_what_finished(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """Every reader killed with SIGKILL as soon as it appears, as a memory limit too small
    to start one would: the run ends with exit 3 and one E: line saying so, not a traceback
    (exit 4), and the results finished before stay in the journal for the next run."""
    count = 40
    folder = tmp_path / "in"
    linked_copies(corpus_dir, folder, CLASSIFIABLE[4:], count)  # large, slow to decode
    out = tmp_path / "out" / "r.json"
    args = [folder, "-o", out, "--cache-dir", weights_cache_dir, "--workers", "1"]
    process = start_process(*args, "--batch-size", "1")
    killed: set[int] = set()

    def kill_new_readers() -> bool:
        for reader in set(reader_processes(process.pid)) - killed:
            os.kill(reader, signal.SIGKILL)
            killed.add(reader)
        return process.poll() is not None

    try:
        wait_for_journal(process, journal_path(out), 2)
        wait_until(kill_new_readers, "end of the run")
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 3, stderr
    assert "Traceback" not in stderr
    finished = journal_entries(journal_path(out))
    assert len(finished) >= 2
    reason = (
        "E: reader processes keep dying before they read anything (killed by signal 9, "
        f"SIGKILL: out of memory?); the {len(finished)} results finished are kept in "
        f"{journal_path(out)}: run again once it is fixed"
    )
    assert [line for line in stderr.splitlines() if "keep dying" in line] == [reason]
    assert len(killed) > 3  # the first reader and at least three of its replacements
    assert not out.exists()

    again = run_script("process_dicom.py", *args)
    assert again.returncode == 0, again.stderr
    kept = sum(entry["status"] != "failed" for entry in finished)
    assert f"{kept} of {count} files unchanged since an earlier run" in again.stderr
    assert len(json.loads(out.read_text())["images"]) == count
    assert not journal_path(out).exists()


# --------------------------------------------------------------------------- item 3


@pytest.fixture
def mixed_folder(corpus_dir: Path, tmp_path: Path) -> Path:
    """40 files: the classifiable ones in turn, and one that is skipped."""
    folder = tmp_path / "in"
    linked_copies(corpus_dir, folder, CLASSIFIABLE, 39)
    os.link(corpus_dir / "bad_ct_small.dcm", folder / "zzz-ct.dcm")
    return folder


def produced_in_run(stderr: str) -> list[str]:
    """Files a ``-v`` run produced a new entry for (classified, skipped or failed)."""
    produced = []
    for line in stderr.splitlines():
        for prefix, suffix in (("D: ", ": classified"), ("W: ", ": skipped: "), ("E: ", ": ")):
            if line.startswith(prefix) and suffix in line:
                path = line[len(prefix) :].split(suffix, 1)[0]
                if path.startswith("/"):
                    produced.append(path)
                break
    return produced


def test_a_killed_run_resumes_where_it_stopped(
    mixed_folder: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of the whole process group mid-batch, then the same command: nothing done twice."""
    out = tmp_path / "out" / "results.json"
    args = [mixed_folder, "-o", out, "--cache-dir", weights_cache_dir, "--batch-size", "4", "-v"]
    process = start_process(*args, umask=0)
    try:
        wait_for_journal(process, journal_path(out), 10)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert not out.exists()  # the results file is written at the end only
    assert stat.S_IMODE(journal_path(out).stat().st_mode) == 0o640  # umask 000 all the same
    first = {e["path"]: e for e in journal_entries(journal_path(out))}
    assert 10 <= len(first) < 40

    again = run_script("process_dicom.py", *args)
    assert again.returncode == 0, again.stderr
    second = produced_in_run(again.stderr)
    everything = sorted(str(p) for p in mixed_folder.iterdir())
    assert len(second) == len(set(second))
    assert not set(first) & set(second), "a file finished before the kill was classified again"
    assert sorted([*first, *second]) == everything
    assert f"{len(first)} of 40 files unchanged since an earlier run" in again.stderr
    assert not journal_path(out).exists()

    results = json.loads(out.read_text())
    clean_out = tmp_path / "clean.json"
    clean = run_script("process_dicom.py", *args[:1], "-o", clean_out, *args[3:])
    assert clean.returncode == 0, clean.stderr
    reference = json.loads(clean_out.read_text())
    assert without_times(results["images"]) == without_times(reference["images"])
    assert results["model"] == reference["model"]
    for entry in results["images"]:
        if entry["path"] in first and entry["status"] == "classified":
            assert entry["classified_at"] == first[entry["path"]]["classified_at"]


def test_a_rerun_over_unchanged_files_reuses_everything_without_the_model(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    paths = linked_copies(corpus_dir, folder, CLASSIFIABLE[:3], 6, copy=True)
    out = tmp_path / "r.json"
    args = [folder, "-o", out, "--cache-dir", weights_cache_dir, "-v"]
    first = run_script("process_dicom.py", *args)
    assert first.returncode == 0, first.stderr
    assert "D: model densenet121-res224-all" in first.stderr
    before = out.read_bytes()

    again = run_script("process_dicom.py", *args)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == before
    assert "D: model" not in again.stderr  # never loaded
    assert produced_in_run(again.stderr) == []
    assert "6 classified, 0 skipped, 0 failed (6 kept from an earlier run)" in again.stdout

    # A file whose modification time changes is read again; the others are kept.
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns()))
    touched = run_script("process_dicom.py", *args)
    assert produced_in_run(touched.stderr) == [str(paths[1])]
    stamps = {e["path"]: e["classified_at"] for e in json.loads(before)["images"]}
    after = {e["path"]: e for e in json.loads(out.read_text())["images"]}
    # Same file content, same result: it keeps the time it was first classified.
    assert {p: e["classified_at"] for p, e in after.items()} == stamps
    assert after[str(paths[1])]["file"]["mtime_ns"] == paths[1].stat().st_mtime_ns


def test_other_weights_reuse_nothing(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    import torch
    import torchxrayvision as xrv

    folder = tmp_path / "in"
    linked_copies(corpus_dir, folder, CLASSIFIABLE[:2], 2)
    out = tmp_path / "r.json"
    cache = tmp_path / "cache"
    shutil.copytree(weights_cache_dir, cache)
    args = [folder, "-o", out, "--cache-dir", cache, "-v"]
    assert run_script("process_dicom.py", *args).returncode == 0
    weights_file = cache / json.loads(out.read_text())["model"]["weights_file"]
    torch.manual_seed(1)
    torch.save(xrv.models.DenseNet(), weights_file)
    shutil.rmtree(cache / "cxrsr-onnx", ignore_errors=True)
    again = run_script("process_dicom.py", *args)
    assert again.returncode == 0, again.stderr
    assert len(produced_in_run(again.stderr)) == 2
    assert "kept from an earlier run" not in again.stdout


def test_failed_files_are_tried_again_and_zip_members_reused(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    import zipfile

    folder = tmp_path / "in"
    folder.mkdir()
    archive = folder / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", "a/one")
        zf.write(corpus_dir / "bad_ct_small.dcm", "a/two.dcm")
    os.link(corpus_dir / "bad_cr_nopixel.dcm", folder / "nopixel.dcm")
    out = tmp_path / "r.json"
    args = [folder, "-o", out, "--cache-dir", weights_cache_dir, "-v"]
    first = run_script("process_dicom.py", *args)
    assert first.returncode == 1, first.stderr
    entries = {e["path"]: e for e in json.loads(out.read_text())["images"]}
    member = entries[f"{archive}!a/one"]
    assert member["file"] == {
        "size": archive.stat().st_size,
        "mtime_ns": archive.stat().st_mtime_ns,
        "member_size": (corpus_dir / "cxr11_siim_cr_jpeg8.dcm").stat().st_size,
        "member_crc32": zipfile.ZipFile(archive).getinfo("a/one").CRC,
    }
    again = run_script("process_dicom.py", *args)
    assert again.returncode == 1
    assert produced_in_run(again.stderr) == [str(folder / "nopixel.dcm")]  # only the failure


def test_a_torn_journal_line_is_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "r.json.journal"
    journal = Journal(path)
    journal.append({"path": "/a", "status": "skipped", "reason": "x"})  # before the model
    journal.start({"weights_sha256": "1" * 64})
    journal.append({"path": "/b", "status": "skipped", "reason": "y"})
    journal.close()
    with open(path, "ab") as fh:
        fh.write(b'{"entry":{"path":"/c","sta')  # killed mid-write
    assert [e["path"] for e in journal_entries(path)] == ["/a", "/b"]
    resumed = Journal(path)
    resumed.start({"weights_sha256": "2" * 64})
    resumed.append({"path": "/d", "status": "skipped", "reason": "z"})
    resumed.close()
    pairs = list(read_journal(path))
    assert [(m["weights_sha256"][0], e["path"]) for m, e in pairs] == [
        ("1", "/a"),
        ("1", "/b"),
        ("2", "/d"),
    ]


# --------------------------------------------------------------------------- item 8


def test_written_files_and_new_folders_are_not_world_readable(
    tmp_path: Path, no_umask: None
) -> None:
    target = tmp_path / "new" / "deeper" / "r.json"
    write_atomic(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o750
    assert stat.S_IMODE(target.parent.parent.stat().st_mode) == 0o750
    existing = tmp_path / "mine"
    existing.mkdir(mode=0o755)
    make_folders(existing / "sub")
    assert stat.S_IMODE(existing.stat().st_mode) == 0o755  # the user's folder is left alone
    assert stat.S_IMODE((existing / "sub").stat().st_mode) == 0o750


def test_results_and_srs_are_private_whatever_the_umask(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    linked_copies(corpus_dir, folder, CLASSIFIABLE[:2], 2)
    out = tmp_path / "output" / "results.json"
    process = start_process(folder, "-o", out, "--cache-dir", weights_cache_dir, umask=0)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o750
    sr_dir = tmp_path / "output" / "sr"
    sr = subprocess.run(
        [sys.executable, "generate_sr.py", "--results", str(out), "--output-dir", str(sr_dir)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0) and None,
    )
    assert sr.returncode == 0, sr.stderr
    written = list(sr_dir.rglob("*"))
    assert written
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


def test_entries_are_reported_only_once_their_pictures_are_synced(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pictures are flushed once per batch (not once per file), always before the entries
    that name them reach on_entry (the journal), and the journal is fsynced after them."""
    import cxrsr.classify
    from cxrsr.files import sync_files
    from cxrsr.model.heatmaps import ALL_LABELS, HeatmapWriter

    events: list[tuple[str, Any]] = []

    def recording_sync(paths: Any) -> None:
        paths = [Path(p) for p in paths]
        sync_files(paths)
        events.append(("sync", {str(p) for p in paths}))

    monkeypatch.setattr(cxrsr.classify, "sync_files", recording_sync)
    out = tmp_path / "out"
    paths = linked_copies(corpus_dir, tmp_path / "in", CLASSIFIABLE[:3], 7)
    run = classify(
        [Source(str(p)) for p in paths],
        lambda: load_classifier(cache_dir=weights_cache_dir, backend="onnx", device="cpu"),
        batch_size=3,
        workers=2,
        on_entry=lambda entry: events.append(("entry", entry)),
        on_batch=lambda: events.append(("batch", None)),
        heatmaps=HeatmapWriter(out, ALL_LABELS),
    )
    assert [e["status"] for e in run.entries] == ["classified"] * 7
    synced: set[str] = set()
    for kind, value in events:
        if kind == "sync":
            synced |= value
        elif kind == "entry":
            pictures = [value["preview"], *value["heatmaps"].values()]
            assert len(pictures) == 19
            for relative in pictures:
                assert str(out / relative) in synced, f"{relative} reported before its sync"
                assert (out / relative).read_bytes().startswith(b"\x89PNG")
    kinds = [kind for kind, _ in events]
    # Batches of 3, 3 and 1: one flush each, then its entries, then the journal's fsync.
    assert kinds == ["sync", *["entry"] * 3, "batch"] * 2 + ["sync", "entry", "batch"]


def test_sync_files_flushes_each_filesystem_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Linux one syncfs per filesystem, however many files and folders."""
    import cxrsr.files
    from cxrsr.files import sync_files

    real = cxrsr.files._SYNCFS
    assert real is not None, "syncfs is missing from this Linux C library"
    flushed: list[int] = []

    def recording_syncfs(fd: int) -> int:
        flushed.append(os.fstat(fd).st_dev)
        return real(fd)

    monkeypatch.setattr(cxrsr.files, "_SYNCFS", recording_syncfs)
    files = [tmp_path / folder / f"{n}.png" for folder in ("a", "b") for n in range(5)]
    for path in files:
        write_atomic(path, b"picture", durable=False)
    other = Path("/dev/shm")  # tmpfs: another filesystem
    assert os.stat(other).st_dev != os.stat(tmp_path).st_dev
    sync_files([*files, other / "nonexistent-file-only-its-folder-counts.png"])
    assert sorted(flushed) == sorted({os.stat(tmp_path).st_dev, os.stat(other).st_dev})
    flushed.clear()
    with pytest.raises(FileNotFoundError):
        sync_files([tmp_path / "missing" / "x.png"])
    assert flushed == []


def recorded_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the path of everything fsynced (the real fsync still runs)."""
    fsynced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return fsynced


def test_sync_files_without_syncfs_fsyncs_every_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no syncfs (not Linux), each file and each folder gets its fsync."""
    import cxrsr.files
    from cxrsr.files import sync_files

    monkeypatch.setattr(cxrsr.files, "_SYNCFS", None)
    fsynced = recorded_fsyncs(monkeypatch)
    files = [tmp_path / folder / f"{n}.png" for folder in ("a", "b") for n in range(3)]
    for path in files:
        write_atomic(path, b"picture", durable=False)
    assert fsynced == []  # durable=False: no flush at write time
    sync_files(files)
    assert sorted(fsynced) == sorted([*map(str, files), str(tmp_path / "a"), str(tmp_path / "b")])


def test_a_filesystem_without_syncfs_gets_an_fsync_per_file_and_a_failing_one_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """syncfs answering EINVAL (a filesystem that does not support it) falls back to an
    fsync per file; any other failure (EIO: the disk lost the data) is raised."""
    import ctypes
    import errno

    import cxrsr.files
    from cxrsr.files import sync_files

    answer = [errno.EINVAL]

    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(answer[0])
        return -1

    monkeypatch.setattr(cxrsr.files, "_SYNCFS", failing_syncfs)
    fsynced = recorded_fsyncs(monkeypatch)
    files = [tmp_path / f"{n}.png" for n in range(3)]
    for path in files:
        write_atomic(path, b"picture", durable=False)
    sync_files(files)
    assert sorted(fsynced) == sorted([*map(str, files), str(tmp_path)])
    answer[0] = errno.EIO
    with pytest.raises(OSError) as raised:
        sync_files(files)
    assert raised.value.errno == errno.EIO


def test_write_atomic_flushes_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A durable write flushes the file, renames it, then flushes its folder (a power cut
    must not bring back the old results file, or none); a preview (``durable=False``)
    flushes nothing: its batch's :func:`sync_files` does."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        assert target in (str(tmp_path), *map(str, tmp_path.glob(".r.json.*.tmp")))
        real_fsync(fd)

    def recording_replace(source: Any, target: Any) -> None:
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_atomic(tmp_path / "r.json", b"{}")
    assert events == ["fsync file", "rename", "fsync folder"]
    events.clear()
    write_atomic(tmp_path / "preview.png", b"picture", durable=False)
    assert events == ["rename"]


def test_a_reader_that_cannot_be_started_ends_the_run_with_the_reason() -> None:
    """No descriptor left for a new reader's pipe (a real RLIMIT_NOFILE, in a process of its
    own): a ReaderPoolError (exit 3) naming the cause, not an OSError's traceback."""
    script = """
import os, resource
from cxrsr.reader_pool import ReaderPool, ReaderPoolError
open_now = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    ReaderPool(abs, 8, lambda item, reason: -1)
except ReaderPoolError as exc:
    print(exc.exit_code, exc)
"""
    shown = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "3 cannot start a reader process: [Errno 24] Too many open files\n"


def test_items_submitted_after_the_readers_gave_up_get_the_reason() -> None:
    """The caller learns why through each item it submits later, not as 'pool closed'."""
    pool: ReaderPool[int, int] = ReaderPool(abs, 1, lambda item, reason: -1, initializer=os.abort)
    with pool:
        with pytest.raises(ReaderPoolError, match="keep dying"):
            pool.submit(-3).result(timeout=120)
        with pytest.raises(ReaderPoolError, match="keep dying"):
            pool.submit(-4).result(timeout=1)


def test_generate_srs_flushes_each_object_and_its_folder_once(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SR is flushed before its rename, and the output folder once, after the last
    rename: the names are durable when generate_srs returns, for one folder fsync in all
    instead of one per file (a journal commit each)."""
    import numpy as np
    import torchxrayvision as xrv

    from cxrsr.sr import batch as sr_batch
    from tests.test_sr import WEIGHTS, WHEN, classified_entry, results_document

    labels = list(xrv.models.model_urls[WEIGHTS]["labels"])
    rng = np.random.default_rng(3)
    names = ["cxr10_nih_dx_8bit.dcm", "cxr11_siim_cr_jpeg8.dcm"]
    entries = [classified_entry(str(corpus_dir / name), labels, rng) for name in names]
    document = results_document(entries, labels)
    out = tmp_path / "sr"
    fsynced = recorded_fsyncs(monkeypatch)
    outcome = sr_batch.generate_srs(document, out, WHEN, jobs=1)
    assert len(outcome.written) == 2 and not outcome.errors
    assert fsynced.count(str(out)) == 1
    assert fsynced[-1] == str(out)
    flushed_files = [p for p in fsynced if p != str(out)]
    assert len(flushed_files) == 2  # each SR's bytes, under its temporary name
