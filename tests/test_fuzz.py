"""Fuzzing as a standing test (issue 9, item 9): hundreds of damaged files through all three
scripts and into a real Orthanc of the test's own.

The cases come from ``tests/fuzzing.py``: header byte flips, truncation, corrupted
element lengths (file meta lengths past the end of the file among them), splices of two
files, absurd Rows/Columns/BitsAllocated/BitsStored/SamplesPerPixel/NumberOfFrames,
empty and invalid SOP Class and Instance UIDs, other transfer syntaxes, junk, and zip
archives of such files, intact or damaged. Each script runs once over the folder of all
cases, bounded in time. The promises checked: no traceback, no hang, exit 0 or 1, one
results entry per input (classified, skipped or failed with a reason, named on its own
``E:``/``W:`` line), an SR or an ``E:`` line per classified entry, SRs that dciodvfy and
dsrdump accept, and an Orthanc that still answers afterwards (its own: a file that crashes
it must not take the session's Orthanc down).

``CXRSR_FUZZ_CASES`` (default 500) and ``CXRSR_FUZZ_SEED`` set the size and the seed,
e.g. ``CXRSR_FUZZ_CASES=60 ./test.sh tests/test_fuzz.py`` while developing.
``bench/fuzz.py`` runs the same with 10,000 cases and more.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import fuzzing
import pytest
from conftest import new_orthanc, require_program

CASES = int(os.environ.get("CXRSR_FUZZ_CASES", "500"))
SEED = int(os.environ.get("CXRSR_FUZZ_SEED", "20261201"))
#: Each script's whole run is bounded: a minute to start, plus 0.4 s per case (four to
#: eight times what a case costs on a loaded 2-core machine). A hang on any case trips it.
TIMEOUT = 60 + 0.4 * CASES


def uses_the_fuzz_run(test: Callable[..., None]) -> Callable[..., None]:
    """Marks a test of the shared fuzz run slow (4 minutes for 500 cases on a loaded 2-core
    machine) and gives it the harness's own bound (each script's TIMEOUT) plus five minutes
    for writing the cases, Orthanc and the validators, instead of pytest's default limit."""
    return pytest.mark.slow(pytest.mark.timeout(int(3 * TIMEOUT + 300))(test))


@pytest.fixture(scope="module")
def corpus(corpus_dir: Path) -> fuzzing.Corpus:
    return fuzzing.load_corpus(corpus_dir)


@pytest.fixture(scope="module")
def fuzz_run(
    tmp_path_factory: pytest.TempPathFactory,
    corpus: fuzzing.Corpus,
    weights_cache_dir: Path,
    orthanc_binary: str,
) -> fuzzing.FuzzRun:
    """The pipeline once over CASES fuzzed files, into an Orthanc of this module's own:
    a file that crashes Orthanc must not take the session's server down with it."""
    dciodvfy = require_program("dciodvfy")
    workdir = tmp_path_factory.mktemp("fuzz")
    folder = workdir / "cases"
    cases = fuzzing.write_cases(folder, corpus, SEED, range(CASES))
    with new_orthanc(workdir / "orthanc", orthanc_binary) as server:
        outcome = fuzzing.run_pipeline(
            workdir, folder, cases, weights_cache_dir, server, TIMEOUT, dciodvfy, CASES
        )
    print(f"\nfuzz: seed {SEED}, {CASES} cases in {folder}")
    print("\n".join(fuzzing.summary_lines(outcome)))
    return outcome


def problems(outcome: fuzzing.FuzzRun, *kinds: str) -> str:
    found = [p for kind in kinds for p in outcome.problems.get(kind, [])]
    if not found:
        return ""
    shown = "\n".join(found[:40])
    summary = "\n".join(fuzzing.summary_lines(outcome))
    return (
        f"{len(found)} problems (seed {SEED}; each case described in cases.jsonl beside "
        f"the cases):\n{shown}\n\nthe whole run:\n{summary}"
    )


# --- the fuzzer itself ------------------------------------------------------------------


def test_a_case_is_the_same_bytes_from_its_seed_and_number_alone(
    corpus: fuzzing.Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else was generated before, and whenever: case 3 is a ZIP archive, whose
    members carry a date that must not be the clock's."""
    import time

    first = [fuzzing.make_case(corpus, SEED, index).data for index in (7, 3, 250)]
    later = time.time() + 400 * 86400
    monkeypatch.setattr(time, "time", lambda: later)
    assert fuzzing.make_case(corpus, SEED, 3).mutator.startswith("zip")
    again = [fuzzing.make_case(corpus, SEED, index).data for index in (250, 3, 7)][::-1]
    assert first == again
    assert fuzzing.make_case(corpus, SEED + 1, 7).data != first[0]


def test_the_cases_cover_every_promised_kind_of_damage(corpus: fuzzing.Corpus) -> None:
    count = max(CASES, 500)  # the promise holds for the standing size, even in a quick run
    cases = [fuzzing.make_case(corpus, SEED, index) for index in range(count)]
    kinds = {case.mutator.split("+")[0] for case in cases}
    assert kinds == set(fuzzing.MUTATORS)
    descriptions = " ".join(case.description for case in cases)
    for attribute in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"):
        assert f"{attribute}=" in descriptions
    assert "NumberOfFrames=" in descriptions
    assert "SOPClassUID=b''" in descriptions and "SOPInstanceUID=" in descriptions

    def meta_past_end(data: bytes) -> bool:
        return any(
            e.tag >> 16 == 2 and e.value_offset + e.length > len(data)
            for e in fuzzing.walk(data).elements
        )

    # Orthanc 1.10.1's segfault: a file meta element longer than the file.
    assert sum(meta_past_end(c.data) for c in cases if c.mutator == "meta-length") >= max(
        1, CASES // 100
    )

    def zip_is_damaged(data: bytes) -> bool:
        import io

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return archive.testzip() is not None
        except Exception:
            return True

    zips = [c for c in cases if c.mutator == "zip"]
    assert sum(zip_is_damaged(c.data) for c in zips) >= max(1, count // 100)
    assert sum(not zip_is_damaged(c.data) for c in zips) >= max(1, count // 250)


def test_set_element_changes_only_that_element(corpus: fuzzing.Corpus) -> None:
    import io

    import pydicom

    data = corpus["cxr11_siim_cr_jpeg8.dcm"]
    changed = fuzzing.set_element(data, fuzzing.ROWS, b"US", struct.pack("<H", 65535))
    changed = fuzzing.set_element(changed, 0x00080016, b"UI", b"")
    changed = fuzzing.set_element(changed, 0x00020003, b"UI", b"1.2.3.4")
    before, after = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(changed))
    assert after.Rows == 65535 and after.SOPClassUID == ""
    assert after.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    # (0002,0000) still counts the meta bytes after it (12: its own element).
    meta_end = fuzzing.walk(changed).dataset_offset
    assert after.file_meta.FileMetaInformationGroupLength == meta_end - 132 - 12
    assert before.Rows != 65535
    assert after.PixelData == before.PixelData


# --- the pipeline under fuzzing ------------------------------------------------------------


@uses_the_fuzz_run
def test_process_dicom_ends_with_0_or_1_no_traceback_no_hang(fuzz_run: fuzzing.FuzzRun) -> None:
    assert not problems(fuzz_run, "process_dicom"), problems(fuzz_run, "process_dicom")


@uses_the_fuzz_run
def test_every_input_has_one_result_with_a_status_and_reason(fuzz_run: fuzzing.FuzzRun) -> None:
    assert not problems(fuzz_run, "accounting"), problems(fuzz_run, "accounting")
    assert sum(fuzz_run.statuses.values()) >= fuzz_run.cases


@uses_the_fuzz_run
def test_every_failed_or_skipped_file_is_named_on_its_own_line(fuzz_run: fuzzing.FuzzRun) -> None:
    assert not problems(fuzz_run, "messages"), problems(fuzz_run, "messages")


@uses_the_fuzz_run
def test_generate_sr_writes_an_sr_or_an_error_line_for_each_classified_entry(
    fuzz_run: fuzzing.FuzzRun,
) -> None:
    assert "generate_sr" in fuzz_run.runs, problems(fuzz_run, "accounting")
    assert not problems(fuzz_run, "generate_sr"), problems(fuzz_run, "generate_sr")
    assert fuzz_run.sr_count > 0  # the fuzz set always keeps some classifiable images


@uses_the_fuzz_run
def test_the_srs_written_from_fuzzed_sources_pass_dciodvfy_and_dsrdump(
    fuzz_run: fuzzing.FuzzRun,
) -> None:
    assert fuzz_run.sr_count > 0
    assert not problems(fuzz_run, "dciodvfy", "dsrdump"), problems(fuzz_run, "dciodvfy", "dsrdump")


@uses_the_fuzz_run
def test_upload_ends_with_0_or_1_and_orthanc_still_answers(fuzz_run: fuzzing.FuzzRun) -> None:
    assert "upload_dicom" in fuzz_run.runs, problems(fuzz_run, "accounting")
    assert not problems(fuzz_run, "orthanc", "upload_dicom"), problems(
        fuzz_run, "orthanc", "upload_dicom"
    )
    assert fuzz_run.orthanc is not None and fuzz_run.orthanc.alive


def assert_killed(pid: int, timeout: float) -> None:
    """``pid`` ends (gone, or a zombie waiting for its reaper) within ``timeout`` seconds:
    the kill signal is delivered asynchronously, so its effect is awaited, bounded."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)  # a poll interval, not a wait for the outcome
    pytest.fail(f"process {pid} still running {timeout:.0f} s after its group was killed")


def test_the_checks_catch_a_traceback_a_hang_and_a_bad_exit_code(tmp_path: Path) -> None:
    """The harness itself: a check that cannot fail proves nothing."""
    ok = fuzzing.ScriptRun("x.py", 1, "1 failed\n", "E: a.dcm: bad\n", 1.0, 0)
    assert fuzzing.script_problems(ok) == []
    crashed = fuzzing.ScriptRun("x.py", 4, "", "Traceback (most recent call last):\n  boom\n", 1, 0)
    assert len(fuzzing.script_problems(crashed)) == 2  # the traceback and exit 4
    hung = fuzzing.ScriptRun("x.py", None, "", "", 99.0, 0)
    assert "timed out" in fuzzing.script_problems(hung)[0]
    killed = fuzzing.ScriptRun("x.py", -11, "", "", 1.0, 0)
    assert "exit -11" in fuzzing.script_problems(killed)[0]

    # run_bounded kills a hanging script (and its children) at the timeout. The script
    # hangs for an hour: were it not killed, pytest's per-test timeout would fail the test.
    script, child_pid = tmp_path / "hang.py", tmp_path / "child.pid"
    script.write_text(
        "import pathlib, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        f"pathlib.Path({str(child_pid)!r}).write_text(str(child.pid))\n"
        "time.sleep(3600)\n"
    )
    run = fuzzing.run_bounded(str(script), [], 15.0, None, tmp_path)
    assert run.timed_out
    assert child_pid.is_file(), "the script did not start its child within 15 s"
    assert_killed(int(child_pid.read_text()), timeout=30)


def test_the_accounting_catches_a_lost_file_and_a_reason_on_two_lines(tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    cases = [fuzzing.Case(i, "truncate", [], "", b"") for i in range(3)]
    zip_case = fuzzing.Case(3, "zip", [], "", b"")
    base = str(folder.absolute())
    entries = [
        {"path": f"{base}/{cases[0].file_name}", "status": "classified"},
        {"path": f"{base}/{cases[1].file_name}", "status": "failed", "reason": "two\nlines"},
        {"path": f"{base}/{zip_case.file_name}!IM1", "status": "skipped", "reason": "CT"},
        {"path": f"{base}/elsewhere.dcm", "status": "failed", "reason": "x"},
    ]
    found = fuzzing.accounting_problems({"images": entries}, folder, [*cases, zip_case])
    assert len(found) == 3, found
    assert any(cases[2].file_name in p and "no entry" in p for p in found)
    assert any("not one line" in p for p in found)
    assert any("elsewhere.dcm" in p for p in found)


# --- bugs the fuzzer found, each reduced to a small file ---------------------------------


def test_a_decoder_panic_fails_one_file_not_the_batch(
    corpus_dir: Path, tmp_path: Path, weights_cache_dir: Path
) -> None:
    """Seed 1, case 750: the RLE corpus file with Columns 1663 instead of 1720 makes
    pylibjpeg-rle's Rust decoder panic. pyo3's PanicException is a BaseException, so the
    reader's ``except Exception`` missed it, the worker could not pickle it back, and
    process_dicom.py ended with a traceback, exit 4 and no results file."""
    import pydicom
    from conftest import run_script

    data = tmp_path / "data"
    data.mkdir()
    ds = pydicom.dcmread(corpus_dir / "bad_cr_hand_constant_rle.dcm")
    ds.Columns = 1663
    ds.save_as(data / "narrow_rle.dcm")
    shutil.copy(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm", data / "fine.dcm")
    results = tmp_path / "results.json"
    done = run_script("process_dicom.py", data, "-o", results, "--cache-dir", weights_cache_dir)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    entries = {Path(e["path"]).name: e for e in json.loads(results.read_text())["images"]}
    assert entries["fine.dcm"]["status"] == "classified"
    assert entries["narrow_rle.dcm"]["status"] == "failed"
    assert f"E: {data / 'narrow_rle.dcm'}: " in done.stderr
