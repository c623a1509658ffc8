"""upload_dicom.py against a real Orthanc: arrival, repeats, faults, credentials, verification.

Every test runs the script as a subprocess, as a user would, and checks what Orthanc
holds afterwards through its own REST API. Tests that count instances or stop the
server start their own empty ``LocalOrthanc``; the rest share the session ``orthanc``.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from conftest import orthanc_env
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrsr.config import PROJECT_ROOT, OrthancSettings
from cxrsr.dicomio.discovery import Source
from cxrsr.pacs import upload as upload_module
from cxrsr.pacs import verify as verify_module
from cxrsr.pacs.local_orthanc import LocalOrthanc, free_port
from cxrsr.pacs.orthanc import OrthancClient

SCRIPT = PROJECT_ROOT / "upload_dicom.py"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SUMMARY = re.compile(
    r"^(?P<stored>\d+) stored, (?P<already>\d+) already stored, (?P<rejected>\d+) rejected, "
    r"(?P<failed>\d+) failed, (?P<passed>\d+) passed over, "
    r"verified (?P<verified>\d+)/(?P<acknowledged>\d+)",
    re.MULTILINE,
)
#: Corpus images the test SRs describe: with and without PatientID, 8 and 16 bit, DX/CR/SC.
SR_SOURCES = (
    "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr10_nih_dx_8bit.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
)


# -- helpers ---------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def counts(self) -> dict[str, int]:
        match = SUMMARY.search(self.stdout)
        assert match, f"no summary line in stdout:\n{self.stdout}\n{self.stderr}"
        return {key: int(value) for key, value in match.groupdict().items()}

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith(prefix)]


def upload(
    server: LocalOrthanc | None,
    *args: str | Path,
    url: str | None = None,
    password: str | None = None,
    timeout: float = 180,
) -> Run:
    """Run upload_dicom.py as a user would; credentials come from the environment."""
    env = dict(os.environ)
    for name in ("ORTHANC_URL", "ORTHANC_USERNAME", "ORTHANC_PASSWORD"):
        env.pop(name, None)
    if server is not None:
        env["ORTHANC_URL"] = url or server.url
        env["ORTHANC_USERNAME"] = server.username
        env["ORTHANC_PASSWORD"] = password if password is not None else server.password
    elif url is not None:
        env["ORTHANC_URL"] = url
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT_ROOT,
        timeout=timeout,
    )
    run = Run(result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    if server is not None:
        for secret in {server.password, password} - {None}:
            assert secret not in run.stdout + run.stderr
    return run


def start_upload(
    server: LocalOrthanc, *args: str | Path, ctrl_c_target: bool = False
) -> subprocess.Popen[str]:
    """upload_dicom.py started in the background, for tests that act while it runs.

    ``ctrl_c_target``: in its own process group with SIGINT at its default, so that
    ``os.killpg(process.pid, SIGINT)`` is what Ctrl-C in a terminal does.
    """
    extra: dict[str, Any] = {}
    if ctrl_c_target:
        extra = {
            "start_new_session": True,
            "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        }
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=orthanc_env(server),
        cwd=PROJECT_ROOT,
        **extra,
    )


def api(server: LocalOrthanc, path: str) -> requests.Response:
    return requests.get(f"{server.url}{path}", auth=(server.username, server.password), timeout=10)


def instance_count(server: LocalOrthanc) -> int:
    return int(api(server, "/statistics").json()["CountInstances"])


def lookup(server: LocalOrthanc, sop_instance_uid: str) -> list[str]:
    answer = requests.post(
        f"{server.url}/tools/lookup",
        data=sop_instance_uid,
        auth=(server.username, server.password),
        timeout=10,
    )
    answer.raise_for_status()
    return [item["ID"] for item in answer.json() if item["Type"] == "Instance"]


def sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def write_sr(source: Path, target: Path, patient_id: str | None = None) -> str:
    """A small Comprehensive 3D SR (PS3.3 A.35.13) describing ``source``, as generate_sr.py will.

    It shares the source's patient and study, lives in a series of its own, and names the
    source in its Current Requested Procedure Evidence Sequence (PS3.3 C.17.2.2).
    ``patient_id`` overrides the PatientID, to build an SR that Orthanc files elsewhere.
    """
    image = pydicom.dcmread(source, stop_before_pixels=True, force=True)
    ds = Dataset()
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = image.get("PatientName", "")
    if patient_id is not None:
        ds.PatientID = patient_id
    elif "PatientID" in image:
        ds.PatientID = image.PatientID
    ds.PatientBirthDate = image.get("PatientBirthDate", "")
    ds.PatientSex = image.get("PatientSex", "")
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.StudyDate = image.get("StudyDate", "")
    ds.StudyTime = image.get("StudyTime", "")
    ds.ReferringPhysicianName = ""
    ds.StudyID = image.get("StudyID", "")
    ds.AccessionNumber = image.get("AccessionNumber", "")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 999
    ds.Manufacturer = "cxrsr tests"
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    concept = Dataset()
    concept.CodeValue = "126000"
    concept.CodingSchemeDesignator = "DCM"
    concept.CodeMeaning = "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    sop = Dataset()
    sop.ReferencedSOPClassUID = image.SOPClassUID
    sop.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = image.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [study]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def write_copies(source: Path, folder: Path, count: int) -> list[Path]:
    """``count`` copies of ``source`` as new instances (fresh study, series and SOP UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source)
    paths = []
    for index in range(count):
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"IM{index:05d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sr_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sr")
    for name in SR_SOURCES:
        write_sr(corpus_dir / name, folder / f"{Path(name).stem}_sr.dcm")
    return folder


@pytest.fixture(scope="module")
def small_dicom(corpus_dir: Path) -> Path:
    return corpus_dir / "bad_cr_cspine_16x16.dcm"


# -- the corpus ------------------------------------------------------------------------


def test_corpus_and_srs_arrive_once_and_again_as_already_stored(
    empty_orthanc: LocalOrthanc, corpus_dir: Path, sr_dir: Path
) -> None:
    dicom_files = sorted(corpus_dir.glob("*.dcm")) + sorted(sr_dir.iterdir())
    uids = [sop_instance_uid(p) for p in dicom_files]
    distinct = set(uids)
    # The corpus holds three pairs of different files under one SOP Instance UID
    # (cxr07/cxr08, cxr05/edge_cxr_corrupt, cxr11/edge_fake_mono1); Orthanc keeps one of each.
    duplicates = len(uids) - len(distinct)
    assert duplicates == 3

    first = upload(empty_orthanc, corpus_dir, sr_dir)
    assert first.counts == {
        "stored": len(distinct),
        "already": duplicates,
        "rejected": 0,
        "failed": 0,
        "passed": 1,  # MANIFEST.tsv
        "verified": len(uids) - duplicates,
        "acknowledged": len(uids),
    }
    # Each conflicting copy is named, with the SOP Instance UID it shares; exit code 1.
    conflicts = first.lines("E: ")
    assert len(conflicts) == duplicates
    assert all("already held a different file with SOP Instance UID" in c for c in conflicts)
    assert first.returncode == 1
    assert "W: " + str(corpus_dir / "MANIFEST.tsv") + ": not a DICOM file, not sent" in first.stderr
    assert f"SRs in source study {len(SR_SOURCES)}/{len(SR_SOURCES)}" in first.stdout

    assert instance_count(empty_orthanc) == len(distinct)
    for uid in distinct:
        assert len(lookup(empty_orthanc, uid)) == 1, uid

    second = upload(empty_orthanc, corpus_dir, sr_dir)
    counts = second.counts
    assert (counts["stored"], counts["already"]) == (0, len(uids))
    assert (counts["rejected"], counts["failed"]) == (0, 0)
    assert instance_count(empty_orthanc) == len(distinct)


def test_identical_repeat_is_already_stored_and_exit_0(
    orthanc: LocalOrthanc, corpus_dir: Path, sr_dir: Path, tmp_path: Path
) -> None:
    images = write_copies(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", tmp_path / "images", 3)
    write_sr(images[0], tmp_path / "sr" / "report.dcm")
    first = upload(orthanc, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.counts["stored"] == 4
    assert "verified 4/4 by stored MD5, SRs in source study 1/1" in first.stdout
    again = upload(orthanc, tmp_path, "-q")
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert again.stdout.startswith("0 stored, 4 already stored, 0 rejected, 0 failed")


# -- files that are not (valid) DICOM ------------------------------------------------


def test_non_dicom_and_empty_files_are_passed_over_and_valid_ones_arrive(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    valid = write_copies(small_dicom, tmp_path / "in", 2)
    (tmp_path / "in" / "notes.dcm").write_text("these are not DICOM\n" * 20)
    (tmp_path / "in" / "empty.dcm").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "in" / "batch.zip", "w") as archive:
        archive.write(write_copies(small_dicom, tmp_path / "zipped", 1)[0], "study/IM1")
    run = upload(orthanc, tmp_path / "in")
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == 3
    assert run.counts["passed"] == 2
    assert f"W: {tmp_path / 'in' / 'notes.dcm'}: not a DICOM file, not sent" in run.stderr
    assert f"W: {tmp_path / 'in' / 'empty.dcm'}: empty file, not sent" in run.stderr
    assert not run.lines("E: ")
    for path in valid:
        assert lookup(orthanc, sop_instance_uid(path))


def test_dicom_that_orthanc_refuses_is_rejected_with_its_message(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    (valid,) = write_copies(small_dicom, tmp_path / "in", 1)
    ds = pydicom.dcmread(valid)
    del ds.StudyInstanceUID  # a sound header, but Orthanc files instances by study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_study = tmp_path / "in" / "no_study.dcm"
    ds.save_as(no_study, enforce_file_format=True)
    run = upload(orthanc, tmp_path / "in")
    assert run.returncode == 1
    assert run.counts["rejected"] == 1 and run.counts["stored"] == 1
    (error,) = run.lines("E: ")
    assert error.startswith(f"E: {no_study}: rejected: HTTP 4")
    assert lookup(orthanc, sop_instance_uid(valid))


def file_meta_element(data: bytes, element: int) -> int:
    """Offset of file meta element (0002,element) in an explicit VR little endian file meta."""
    offset = 132
    while True:
        group, number = struct.unpack_from("<HH", data, offset)
        assert group == 0x0002, f"(0002,{element:04X}) not found"
        if number == element:
            return offset
        vr = data[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
        else:
            offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]


def test_malformed_headers_are_never_sent_and_orthanc_survives(
    empty_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """Orthanc 1.10.1 segfaults on a file whose File Meta Information element declares a
    value longer than the file (issue 9): such a file, and every other header that pydicom
    cannot read in full, is "not sent: malformed", and Orthanc answers afterwards."""
    folder = tmp_path / "in"
    (valid,) = write_copies(small_dicom, folder, 1)
    data = valid.read_bytes()
    crasher = bytearray(data)  # (0002,0001) File Meta Information Version, OB
    struct.pack_into("<I", crasher, file_meta_element(data, 0x0001) + 8, 0x7FFFFFF0)
    (folder / "a_meta_beyond_end.dcm").write_bytes(crasher)
    long_name = bytearray(data)  # (0002,0013) Implementation Version Name, SH
    struct.pack_into("<H", long_name, file_meta_element(data, 0x0013) + 6, 60000)
    (folder / "b_meta_sh_beyond_end.dcm").write_bytes(long_name)
    (folder / "c_truncated.dcm").write_bytes(data[:300])  # sniffs as DICOM, then ends
    ds = pydicom.dcmread(valid)
    del ds.SOPInstanceUID
    ds.save_as(folder / "d_no_sop_instance_uid.dcm")
    ds = pydicom.dcmread(valid)
    ds.SOPClassUID = ""
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "e_empty_sop_class_uid.dcm")

    dry = upload(None, folder, "--dry-run")
    assert dry.returncode == 1
    assert dry.stdout.splitlines()[0] == str(valid)
    assert len(dry.lines("E: ")) == 5 and "5 would fail" in dry.stdout

    run = upload(empty_orthanc, folder)
    assert run.returncode == 1
    assert run.counts["stored"] == 1 and run.counts["failed"] == 5
    errors = sorted(run.lines("E: "))
    assert errors == [
        f"E: {folder / 'a_meta_beyond_end.dcm'}: failed: not sent: malformed: File Meta "
        "Information element (0002,0001) declares 2147483632 bytes, but the file ends "
        f"{len(data) - file_meta_element(data, 0x0001) - 12} bytes after its header",
        f"E: {folder / 'b_meta_sh_beyond_end.dcm'}: failed: not sent: malformed: File Meta "
        f"Information element (0002,0013) declares 60000 bytes, but the file ends "
        f"{len(data) - file_meta_element(data, 0x0013) - 8} bytes after its header",
        errors[2],
        f"E: {folder / 'd_no_sop_instance_uid.dcm'}: failed: not sent: malformed: "
        "no SOP Instance UID (0008,0018)",
        f"E: {folder / 'e_empty_sop_class_uid.dcm'}: failed: not sent: malformed: "
        "no SOP Class UID (0008,0016)",
    ]
    assert errors[2].startswith(f"E: {folder / 'c_truncated.dcm'}: failed: not sent: malformed: ")
    # Never sent: Orthanc is still the same process, answering, holding the one valid file.
    assert empty_orthanc.process is not None and empty_orthanc.process.poll() is None
    assert api(empty_orthanc, "/system").status_code == 200
    assert instance_count(empty_orthanc) == 1


# -- credentials and reachability ----------------------------------------------------


def test_wrong_password_stops_at_once_with_one_line(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 5)
    wrong = "not-" + orthanc.password
    run = upload(orthanc, tmp_path / "in", password=wrong)
    assert run.returncode == 3
    assert run.lines("E: ") == [
        f"E: Orthanc at {orthanc.url} refused the credentials for user "
        f"'{orthanc.username}' (HTTP 401); check ORTHANC_USERNAME/ORTHANC_PASSWORD in .env"
    ]
    assert wrong not in run.stdout + run.stderr
    assert not lookup(orthanc, sop_instance_uid(files[0]))


def test_unreachable_url_is_named_after_the_retries(small_dicom: Path, tmp_path: Path) -> None:
    """The waits between the attempts are checked in test_orthanc.py
    (test_default_retries_wait_at_most_the_documented_time)."""
    url = f"http://127.0.0.1:{free_port()}"
    run = upload(None, small_dicom, "--retries", "2", url=url)
    assert run.returncode == 3
    (error,) = run.lines("E: ")
    assert f"cannot reach Orthanc at {url}" in error
    assert "after 3 attempts: connection refused" in error


def test_password_in_the_url_is_used_but_never_shown(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    (image,) = write_copies(small_dicom, tmp_path, 1)
    url = f"http://{orthanc.username}:{orthanc.password}@127.0.0.1:{orthanc.http_port}"
    run = upload(None, image, "-v", url=url)
    assert run.returncode == 0, run.stderr
    assert orthanc.password not in run.stdout + run.stderr
    assert f"at {orthanc.url}" in run.stderr


def test_orthanc_coming_up_during_the_retries_is_waited_for(
    tmp_path: Path, orthanc_binary: str, small_dicom: Path
) -> None:
    server = LocalOrthanc(
        tmp_path / "o", "uploader", secrets.token_urlsafe(16), binary=orthanc_binary
    )
    files = write_copies(small_dicom, tmp_path / "in", 3)
    # Until Orthanc starts, its port answers the first attempt with a reset, then refuses.
    early = socket.create_server(("127.0.0.1", server.http_port))
    early.settimeout(60)
    process = start_upload(server, tmp_path / "in", "--retries", "6")
    try:
        with early:
            attempt, _ = early.accept()  # the upload has tried, and found no Orthanc
            attempt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            attempt.close()  # a reset: no TIME_WAIT left to keep Orthanc off the port
        server.start()
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        assert stdout.startswith("3 stored, 0 already stored, 0 rejected, 0 failed")
        assert all(lookup(server, sop_instance_uid(p)) for p in files)
    finally:
        process.kill()
        server.stop()


# -- a server that stops partway -----------------------------------------------------


def test_orthanc_killed_mid_upload_is_reported_truthfully_then_completed(
    empty_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    total = 1500
    files = write_copies(small_dicom, tmp_path / "in", total)
    workers = 2
    process = start_upload(empty_orthanc, tmp_path / "in", "-v", "--workers", str(workers))
    try:
        deadline = time.monotonic() + 60
        while instance_count(empty_orthanc) < 100:
            assert process.poll() is None, "the upload finished before Orthanc could be stopped"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # SIGKILL, as a crash or power loss: a SIGTERM'd Orthanc 1.10.1 keeps serving
        # open keep-alive connections until they go idle, so the upload would just finish.
        empty_orthanc.kill()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    first = Run(process.returncode, stdout, stderr)
    assert "Traceback" not in stderr
    assert first.returncode == 1
    counts = first.counts
    assert 100 <= counts["stored"] < total
    assert counts["stored"] + counts["failed"] == total
    assert counts["already"] == counts["rejected"] == counts["passed"] == 0
    assert f"E: Orthanc at {empty_orthanc.url} stopped answering" in stderr
    assert len([line for line in first.lines("E: ") if ": failed: " in line]) == counts["failed"]
    reported_stored = re.findall(r"^D: .*: stored as (\S+)$", stderr, re.MULTILINE)
    assert len(reported_stored) == counts["stored"]

    empty_orthanc.start()  # same storage
    present = instance_count(empty_orthanc)
    for instance_id in reported_stored:  # every "stored" was true ...
        assert api(empty_orthanc, f"/instances/{instance_id}").status_code == 200
    # ... and at most the uploads in flight when it stopped were stored unannounced.
    assert counts["stored"] <= present <= counts["stored"] + workers

    second = upload(empty_orthanc, tmp_path / "in")
    assert second.returncode == 0, second.stderr
    assert second.counts["already"] == present
    assert second.counts["stored"] == total - present
    assert second.counts["verified"] == total
    assert instance_count(empty_orthanc) == total
    assert len({sop_instance_uid(p) for p in files}) == total


def test_ctrl_c_stops_the_upload_at_once_and_a_rerun_completes_it(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the process group): exit 130, one line, files not yet started are
    not sent, and every "stored" line was true."""
    total = 1500
    write_copies(small_dicom, tmp_path / "in", total)
    before = instance_count(orthanc)
    process = start_upload(orthanc, tmp_path / "in", "-v", ctrl_c_target=True)
    assert process.stderr is not None
    reported_stored = []
    try:
        deadline = time.monotonic() + 60
        while len(reported_stored) < 50 and time.monotonic() < deadline:
            match = re.match(r"D: .*: stored as (\S+)$", process.stderr.readline())
            if match:
                reported_stored.append(match.group(1))
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "E: interrupted; work already written is kept" in stderr
    reported_stored += re.findall(r"^D: .*: stored as (\S+)$", stderr, re.MULTILINE)
    sent = instance_count(orthanc) - before
    assert 50 <= len(reported_stored) <= sent < total  # stopped early; each "stored" is there
    for instance_id in reported_stored:
        assert api(orthanc, f"/instances/{instance_id}").status_code == 200

    rerun = upload(orthanc, tmp_path / "in")
    assert rerun.returncode == 0, rerun.stderr
    assert (rerun.counts["already"], rerun.counts["stored"]) == (sent, total - sent)
    assert instance_count(orthanc) - before == total


def test_broken_zips_and_special_files_fail_one_by_one_and_the_rest_arrive(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    # The archives of test_discovery.py: each is damaged the way real ones are.
    from test_discovery import (
        bomb_zip,
        crc_error_zip,
        damaged_directory_zip,
        deflate64_zip,
        encrypted_zip,
    )

    (valid,) = write_copies(small_dicom, tmp_path / "in", 1)
    dicom = valid.read_bytes()
    folder = tmp_path / "in"
    damaged_directory_zip(folder / "a_broken.zip", dicom)
    crc_error_zip(folder / "b_crc.zip", dicom)
    encrypted_zip(folder / "c_encrypted.zip", dicom)
    deflate64_zip(folder / "d_deflate64.zip", dicom)
    bomb_zip(folder / "e_bomb.zip")
    os.mkfifo(folder / "pipe")  # would block a reader forever
    (folder / "zero").symlink_to("/dev/zero")  # would be read until MemoryError
    run = upload(orthanc, folder, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.counts["stored"] == 1 and run.counts["failed"] == 5
    errors = sorted(run.lines("E: "))  # in the order the workers finished
    assert errors[0] == (
        f"E: {folder / 'a_broken.zip'}: failed: cannot read: "
        "corrupt zip archive: Bad magic number for central directory"
    )
    assert errors[1] == (
        f"E: {folder / 'b_crc.zip'}!IM1: failed: cannot read: "
        "damaged zip member: Bad CRC-32 for file 'IM1'"
    )
    assert "encrypted zip member" in errors[2] and "(Deflate64)" in errors[3]
    assert "zip bomb" in errors[4]
    assert len(errors) == 5
    assert f"W: {folder / 'pipe'}: not a regular file (FIFO), passed over" in run.stderr
    assert f"W: {folder / 'zero'}: not a regular file (character device), passed over" in (
        run.stderr
    )
    assert lookup(orthanc, sop_instance_uid(valid))


def test_dicomdir_is_passed_over_not_rejected(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    write_copies(small_dicom, tmp_path / "in", 1)
    dicomdir = Dataset()
    dicomdir.FileSetID = "CXR"
    dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = []
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.save_as(tmp_path / "in" / "DICOMDIR", enforce_file_format=True)
    run = upload(orthanc, tmp_path / "in")
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] + run.counts["already"] == 1
    assert (run.counts["rejected"], run.counts["passed"]) == (0, 1)
    assert (
        f"W: {tmp_path / 'in' / 'DICOMDIR'}: DICOMDIR (media directory), not an image: not sent"
        in run.stderr
    )
    dry = upload(None, tmp_path / "in", "--dry-run")
    assert dry.returncode == 0 and "1 passed over" in dry.stdout


@pytest.mark.parametrize(
    "option",
    [
        ["--timeout", "-1"],
        ["--timeout", "0"],
        ["--timeout", "nan"],
        ["--timeout", "inf"],
        ["--timeout", "1e300"],
        ["--timeout", "soon"],
        ["--url", "http://alice:pw-s3cret@127.0.0.1:abc"],
        ["--url", "http://alice:pw-s3cret@127.0.0.1:99999"],
        ["--url", "http://alice:pw-s3cret@[::1"],
        ["--url", "ftp://alice:pw-s3cret@127.0.0.1:8042"],
    ],
)
def test_bad_timeout_and_url_are_usage_errors(option: list[str], small_dicom: Path) -> None:
    run = upload(None, small_dicom, *option)
    assert run.returncode == 2, run.stderr
    (error,) = [line for line in run.stderr.splitlines() if "error:" in line]
    assert error.startswith(f"upload_dicom.py: error: argument {option[0]}: ")
    assert "pw-s3cret" not in run.stdout + run.stderr
    assert option[0] == "--timeout" or "URL: " in error  # names the URL, without the user


def test_malformed_orthanc_url_in_the_environment_is_one_line(small_dicom: Path) -> None:
    run = upload(None, small_dicom, url="http://alice:pw-s3cret@127.0.0.1:99999")
    assert run.returncode == 3, run.stderr
    (error,) = run.lines("E: ")
    assert "not a valid URL: 'http://127.0.0.1:99999'" in error
    assert "pw-s3cret" not in run.stdout + run.stderr


# -- SR placement and dry run --------------------------------------------------------


def test_sr_outside_its_source_study_is_an_error_and_missing_source_a_warning(
    orthanc: LocalOrthanc, corpus_dir: Path, tmp_path: Path
) -> None:
    (image,) = write_copies(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm", tmp_path / "img", 1)
    upload(orthanc, image)
    write_sr(image, tmp_path / "misplaced" / "sr.dcm", patient_id="SOMEONE-ELSE")
    misplaced = upload(orthanc, tmp_path / "misplaced")
    assert misplaced.returncode == 1
    (error,) = misplaced.lines("E: ")
    assert "SR is in Orthanc study" in error and sop_instance_uid(image) in error
    assert "SRs in source study 0/1" in misplaced.stdout

    (unsent,) = write_copies(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm", tmp_path / "u", 1)
    write_sr(unsent, tmp_path / "orphan" / "sr.dcm")
    orphan = upload(orthanc, tmp_path / "orphan")
    assert orphan.returncode == 0, orphan.stderr
    (warning,) = orphan.lines("W: ")
    assert f"source instance {sop_instance_uid(unsent)} is not in Orthanc" in warning
    assert "SRs in source study 0/1 (1 without their source in Orthanc)" in orphan.stdout


def test_dry_run_lists_and_sends_nothing(small_dicom: Path, tmp_path: Path) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 2)
    (tmp_path / "in" / "notes.txt").write_text("hello")
    # No Orthanc at this URL: a dry run must not need one.
    run = upload(None, tmp_path / "in", "--dry-run", url=f"http://127.0.0.1:{free_port()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[:2] == [str(p) for p in files]
    assert "2 files" in run.stdout and "1 passed over; nothing sent" in run.stdout


# -- verification on an Orthanc that keeps no MD5 --------------------------------------


def first_copy_of_each_uid(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``paths`` split into the first file (in name order) of each SOP Instance UID and
    the later files that share a UID with an earlier one but hold other bytes."""
    firsts: dict[str, Path] = {}
    later = []
    for path in sorted(paths):
        uid = sop_instance_uid(path)
        if uid in firsts:
            later.append(path)
        else:
            firsts[uid] = path
    return list(firsts.values()), later


def test_orthanc_without_md5_verifies_the_corpus_by_reading_files_back(
    md5less_orthanc: LocalOrthanc, corpus_dir: Path, sr_dir: Path, tmp_path: Path
) -> None:
    """``"StoreMD5ForAttachments": false``: Orthanc answers 404 for the MD5 of an instance
    it holds. Every file is still proven intact, by reading it back, and the summary says
    so; a file whose bytes differ from Orthanc's copy is still a mismatch."""
    firsts, conflicting = first_copy_of_each_uid(list(corpus_dir.glob("*.dcm")))
    assert len(conflicting) == 3  # cxr07/cxr08, cxr05/edge_cxr_corrupt, cxr11/edge_fake_mono1
    unique = tmp_path / "unique"
    unique.mkdir()
    for path in firsts:
        (unique / path.name).symlink_to(path)
    expected = len(firsts) + len(SR_SOURCES)

    run = upload(md5less_orthanc, unique, sr_dir)
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == expected
    assert (
        f"verified {expected}/{expected} by re-reading {expected} files (Orthanc keeps no MD5), "
        f"SRs in source study {len(SR_SOURCES)}/{len(SR_SOURCES)}"
    ) in run.stdout
    said = f"I: Orthanc at {md5less_orthanc.url} keeps no MD5 of stored files "
    said += '("StoreMD5ForAttachments": false): verifying each by reading it back'
    assert run.lines("I: ").count(said) == 1
    assert not run.lines("E: ")

    # The other file of each pair: Orthanc keeps its first copy, which differs from these.
    clash = upload(md5less_orthanc, *conflicting)
    assert clash.returncode == 1
    assert clash.counts["already"] == 3 and clash.counts["verified"] == 0
    assert "verified 0/3 by re-reading 3 files (Orthanc keeps no MD5)" in clash.stdout
    errors = clash.lines("E: ")
    assert sorted(e.split(":")[1].strip() for e in errors) == sorted(map(str, conflicting))
    for path, error in zip(sorted(conflicting), sorted(errors), strict=True):
        assert f"already held a different file with SOP Instance UID {sop_instance_uid(path)}" in (
            error
        )


def test_orthanc_with_md5_is_verified_by_its_stored_md5(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    write_copies(small_dicom, tmp_path / "in", 2)
    run = upload(orthanc, tmp_path / "in")
    assert run.returncode == 0, run.stderr
    assert "verified 2/2 by stored MD5" in run.stdout
    assert "keeps no MD5" not in run.stderr


class CountingClient(OrthancClient):
    """The real client, counting how each stored file was checked."""

    def __init__(self, server: LocalOrthanc) -> None:
        super().__init__(OrthancSettings(server.url, server.username, server.password))
        self.md5_requests = 0
        self.files_read = 0

    def attachment_md5(self, instance_id: str) -> str | None:
        self.md5_requests += 1
        return super().attachment_md5(instance_id)

    def stored_file_md5(self, instance_id: str) -> tuple[str, int] | None:
        self.files_read += 1
        return super().stored_file_md5(instance_id)


def test_missing_md5_is_detected_once_and_a_deleted_instance_is_still_missing(
    md5less_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """The first 404 on an MD5 is enough: every later file, in this verification and the
    next ones on the same client (the watcher's batches), is read back at once. An
    instance that is gone is told apart from one that merely has no MD5."""
    files = write_copies(small_dicom, tmp_path / "in", 4)
    client = CountingClient(md5less_orthanc)
    outcomes = upload_module.upload([Source(str(p)) for p in files], client, workers=2)
    assert [o.status for o in outcomes] == [upload_module.STORED] * 4

    report = verify_module.verify(outcomes, client, workers=1)
    assert report.ok and report.verified == 4
    assert (client.md5_requests, client.files_read) == (1, 4)
    assert client.keeps_md5 is False
    assert report.checked_by == {upload_module.BY_READING_BACK: 4}

    gone = outcomes[0].instance_id
    deleted = requests.delete(
        f"{md5less_orthanc.url}/instances/{gone}",
        auth=(md5less_orthanc.username, md5less_orthanc.password),
        timeout=10,
    )
    assert deleted.status_code == 200
    fresh = [replace(o, verified=False, problems=[]) for o in outcomes]
    again = verify_module.verify(fresh, client, workers=2)
    assert client.md5_requests == 1  # not asked again: this Orthanc keeps none
    assert not again.ok and again.verified == 3
    assert fresh[0].problems == [
        f"Orthanc acknowledged it (stored) but instance {gone} is not there now"
    ]
    assert again.summary().endswith("verified 3/4 by re-reading 3 files (Orthanc keeps no MD5)")
    client.close()


def test_orthanc_with_md5_is_never_read_back(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 3)
    client = CountingClient(orthanc)
    outcomes = upload_module.upload([Source(str(p)) for p in files], client, workers=2)
    report = verify_module.verify(outcomes, client, workers=2)
    assert report.ok and report.verified == 3
    assert (client.md5_requests, client.files_read) == (3, 0)
    assert client.keeps_md5 is True
    assert report.summary().endswith("verified 3/3 by stored MD5")
    client.close()


def test_only_the_orthanc_upload_hashes_what_it_sends(
    orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """The REST upload still sends each file's MD5 for verification to compare with the
    one Orthanc stored; the read for DICOMweb and DIMSE, which prove by SOP Instance
    UID, passes the same header check but spends no CPU on a digest nobody reads."""
    files = write_copies(small_dicom, tmp_path / "in", 2)
    checked = upload_module.read_checked(Source(str(files[0])))
    assert isinstance(checked, upload_module.Checked)
    assert checked.data == files[0].read_bytes()
    assert not hasattr(checked, "md5")
    assert checked.outcome(upload_module.STORED).md5 is None

    client = OrthancClient(OrthancSettings(orthanc.url, orthanc.username, orthanc.password))
    outcomes = upload_module.upload([Source(str(p)) for p in files], client, workers=2)
    assert [o.md5 for o in outcomes] == [hashlib.md5(p.read_bytes()).hexdigest() for p in files]
    report = verify_module.verify(outcomes, client, workers=2)
    assert report.checked_by == {upload_module.BY_STORED_MD5: 2}
    client.close()


def test_summary_names_both_ways_when_some_files_had_no_md5() -> None:
    """An Orthanc whose older files were stored without MD5 (the setting changed since):
    the files checked by each way are counted apart."""
    report = upload_module.Report(
        [upload_module.Outcome(f"f{i}", upload_module.STORED, verified=True) for i in range(3)],
        checked_by={upload_module.BY_STORED_MD5: 2, upload_module.BY_READING_BACK: 1},
    )
    assert report.summary().endswith(
        "verified 3/3: 2 by stored MD5, 1 by re-reading the file (Orthanc keeps no MD5 of those)"
    )


def test_files_stored_before_md5_was_turned_on_are_read_back(
    md5less_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """Files stored while Orthanc kept no MD5 still have none after the setting is turned
    on: each is read back, while newer files are checked by their stored MD5 until the
    first file without one is met."""
    old, new = write_copies(small_dicom, tmp_path / "in", 2)
    before = CountingClient(md5less_orthanc)
    (old_outcome,) = upload_module.upload([Source(str(old))], before, workers=1)
    before.close()
    md5less_orthanc.stop()
    md5less_orthanc.overrides["StoreMD5ForAttachments"] = True
    md5less_orthanc.start()
    client = CountingClient(md5less_orthanc)
    (new_outcome,) = upload_module.upload([Source(str(new))], client, workers=1)
    report = verify_module.verify([new_outcome, old_outcome], client, workers=1)
    assert report.ok and report.verified == 2
    assert (client.md5_requests, client.files_read) == (2, 1)
    assert "verified 2/2: 1 by stored MD5, 1 by re-reading the file" in report.summary()
    client.close()
