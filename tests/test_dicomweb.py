"""upload_dicom.py --to dicomweb against a real DICOMweb server: Orthanc's DICOMweb plugin.

STOW-RS stores, QIDO-RS proves, a rerun sends nothing the server holds, the server's own
per-instance refusals (Failed SOP Sequence) are reported, and a file whose header would
hurt the PACS never reaches it.
"""

from __future__ import annotations

import http.server
import os
import secrets
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import missing_prerequisite
from pydicom.uid import generate_uid
from test_dimse import make_certificates
from test_upload import SCRIPT, Run, file_meta_element, upload, write_copies

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs import stow
from cxrsr.pacs.local_orthanc import DICOMWEB_PLUGIN, LocalOrthanc


@pytest.fixture(scope="module")
def small_dicom(corpus_dir: Path) -> Path:
    return corpus_dir / "bad_cr_cspine_16x16.dcm"


@pytest.fixture
def dicomweb_orthanc(tmp_path: Path, orthanc_binary: str) -> Iterator[LocalOrthanc]:
    if not DICOMWEB_PLUGIN.is_file():
        missing_prerequisite("Debian's orthanc-dicomweb plugin is not installed")
    with LocalOrthanc(
        tmp_path / "orthanc-dicomweb",
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=orthanc_binary,
        dicomweb=True,
    ) as server:
        yield server


def to_dicomweb(server: LocalOrthanc, *args: str | Path, password: str | None = None) -> Run:
    """upload_dicom.py --to dicomweb with the server's credentials in DICOMWEB_*."""
    env = {
        "DICOMWEB_USERNAME": server.username,
        "DICOMWEB_PASSWORD": password if password is not None else server.password,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return upload(None, "--to", "dicomweb", f"{server.url}/dicom-web", *args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def instance_uids(server: LocalOrthanc) -> list[str]:
    """Every SOP Instance UID Orthanc holds, duplicates included (through its REST API)."""
    auth = (server.username, server.password)
    ids = requests.get(f"{server.url}/instances", auth=auth, timeout=10).json()
    return [
        requests.get(f"{server.url}/instances/{i}", auth=auth, timeout=10).json()["MainDicomTags"][
            "SOPInstanceUID"
        ]
        for i in ids
    ]


def test_corpus_is_stowed_proved_by_qido_and_a_rerun_sends_nothing(
    dicomweb_orthanc: LocalOrthanc, corpus_dir: Path
) -> None:
    dicom_files = sorted(corpus_dir.glob("*.dcm"))
    expected = {
        str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID)
        for p in dicom_files
    }
    first = to_dicomweb(dicomweb_orthanc, corpus_dir)
    assert first.returncode == 0, first.stderr
    assert first.counts["stored"] == len(dicom_files)
    assert first.counts["verified"] == first.counts["acknowledged"] == len(dicom_files)
    assert f"{len(dicom_files)} by QIDO-RS search" in first.stdout
    assert set(instance_uids(dicomweb_orthanc)) == expected

    again = to_dicomweb(dicomweb_orthanc, corpus_dir, "-v")
    assert again.returncode == 0, again.stderr
    assert again.counts["stored"] == 0
    assert again.counts["already"] == again.counts["verified"] == len(dicom_files)
    uids = instance_uids(dicomweb_orthanc)
    assert len(uids) == len(set(uids)) == len(expected)  # no duplicate


def test_the_servers_own_refusal_is_read_from_the_failed_sop_sequence(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """Orthanc cannot file an instance without a Study Instance UID: STOW-RS lists it in
    the Failed SOP Sequence with a Failure Reason, and only that file is rejected."""
    folder = tmp_path / "in"
    valid, no_study = write_copies(small_dicom, folder, 2)
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(no_study, enforce_file_format=True)
    run = to_dicomweb(dicomweb_orthanc, folder, "--batch", "2")
    assert run.returncode == 1
    assert run.counts["stored"] == 1 and run.counts["rejected"] == 1
    (error,) = run.lines("E: ")
    assert error.startswith(f"E: {no_study}: rejected: the server refused it: Failure Reason 0x")
    assert instance_uids(dicomweb_orthanc) == [str(pydicom.dcmread(valid).SOPInstanceUID)]


def test_malformed_headers_never_reach_the_dicomweb_server(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    (valid,) = write_copies(small_dicom, folder, 1)
    data = valid.read_bytes()
    crasher = bytearray(data)  # (0002,0001) declares far more bytes than the file has
    struct.pack_into("<I", crasher, file_meta_element(data, 0x0001) + 8, 0x7FFFFFF0)
    (folder / "a_meta_beyond_end.dcm").write_bytes(crasher)
    (folder / "c_truncated.dcm").write_bytes(data[:300])
    ds = pydicom.dcmread(valid)
    del ds.SOPInstanceUID
    ds.save_as(folder / "d_no_sop_instance_uid.dcm")
    run = to_dicomweb(dicomweb_orthanc, folder)
    assert run.returncode == 1
    assert run.counts["stored"] == 1 and run.counts["failed"] == 3
    errors = run.lines("E: ")
    assert len(errors) == 3 and all(": failed: not sent: malformed: " in e for e in errors)
    assert dicomweb_orthanc.process is not None and dicomweb_orthanc.process.poll() is None
    assert instance_uids(dicomweb_orthanc) == [str(pydicom.dcmread(valid).SOPInstanceUID)]


def test_wrong_dicomweb_credentials_stop_the_run_with_one_line(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    write_copies(small_dicom, tmp_path / "in", 2)
    run = to_dicomweb(dicomweb_orthanc, tmp_path / "in", password="wrong")
    assert run.returncode == 3
    assert run.lines("E: ") == [
        f"E: DICOMweb server at {dicomweb_orthanc.url}/dicom-web refused the credentials "
        "(HTTP 401); check DICOMWEB_USERNAME/DICOMWEB_PASSWORD or DICOMWEB_TOKEN"
    ]
    assert instance_uids(dicomweb_orthanc) == []


def test_help_documents_every_target_and_a_wrong_target_is_a_usage_error(
    small_dicom: Path,
) -> None:
    help_text = upload(None, "--help").stdout
    for text in ("--to", "'dicomweb URL'", "'dimse HOST:PORT'", "--called-aet", "--listen-port"):
        assert text in help_text
    for wrong in (["--to", "ftp", "host:21"], ["--to", "dimse", "no-port"], ["--to", "dicomweb"]):
        run = upload(None, *wrong, small_dicom)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr


class BearerGate(http.server.ThreadingHTTPServer):
    """A DICOMweb front that accepts one bearer token and forwards to Orthanc's plugin
    with Orthanc's own credentials, as an authenticating proxy before a PACS does."""

    def __init__(self, server: LocalOrthanc, token: str) -> None:
        self.orthanc = server
        self.token = token
        super().__init__(("127.0.0.1", 0), _GateHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


class _GateHandler(http.server.BaseHTTPRequestHandler):
    server: BearerGate

    def _forward(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        headers = {k: v for k, v in self.headers.items() if k in ("Content-Type", "Accept")}
        answer = requests.request(
            self.command,
            self.server.orthanc.url + self.path,
            data=self.rfile.read(length) if length else None,
            headers=headers,
            auth=(self.server.orthanc.username, self.server.orthanc.password),
            timeout=60,
        )
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "text/plain"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = _forward

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_bearer_token_from_the_environment_is_sent(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 2)
    gate = BearerGate(dicomweb_orthanc, secrets.token_urlsafe(16))
    thread = threading.Thread(target=gate.serve_forever, daemon=True)
    thread.start()
    saved = os.environ.get("DICOMWEB_TOKEN")
    try:
        os.environ["DICOMWEB_TOKEN"] = "not-" + gate.token
        refused = upload(None, "--to", "dicomweb", gate.url, tmp_path / "in")
        os.environ["DICOMWEB_TOKEN"] = gate.token
        run = upload(None, "--to", "dicomweb", gate.url, tmp_path / "in")
    finally:
        if saved is None:
            os.environ.pop("DICOMWEB_TOKEN", None)
        else:
            os.environ["DICOMWEB_TOKEN"] = saved
        gate.shutdown()
        gate.server_close()
    assert refused.returncode == 3 and "refused the credentials (HTTP 401)" in refused.stderr
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == 2
    assert sorted(instance_uids(dicomweb_orthanc)) == sorted(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in files
    )


def test_qido_reads_every_page_of_a_large_study(
    dicomweb_orthanc: LocalOrthanc,
    small_dicom: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five instances of one study, asked for two at a time: all five come back."""
    files = write_copies(small_dicom, tmp_path / "in", 5)
    study = generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path, enforce_file_format=True)
    assert to_dicomweb(dicomweb_orthanc, tmp_path / "in").returncode == 0
    monkeypatch.setattr(stow, "QIDO_PAGE", 2)
    settings = stow.DicomWebSettings(
        f"{dicomweb_orthanc.url}/dicom-web", dicomweb_orthanc.username, dicomweb_orthanc.password
    )
    client = stow.DicomWebClient(settings)
    try:
        assert client.instances_of_study(study) == {
            str(pydicom.dcmread(p).SOPInstanceUID) for p in files
        }
    finally:
        client.close()


def test_the_server_killed_mid_run_loses_nothing_and_a_rerun_completes(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 120)
    env = dict(
        os.environ,
        DICOMWEB_USERNAME=dicomweb_orthanc.username,
        DICOMWEB_PASSWORD=dicomweb_orthanc.password,
    )
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--to", "dicomweb", f"{dicomweb_orthanc.url}/dicom-web",
         "--workers", "1", "--batch", "2", "--timeout", "5", str(tmp_path / "in")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while count_instances(dicomweb_orthanc) < 10 and process.poll() is None:
        assert time.monotonic() < deadline, "no instance arrived within 60 s"
        time.sleep(0.01)
    dicomweb_orthanc.kill()
    stdout, stderr = process.communicate(timeout=120)
    cut = Run(process.returncode, stdout, stderr)
    assert cut.returncode == 1 and "Traceback" not in stderr
    assert cut.counts["failed"] > 0
    assert cut.counts["stored"] + cut.counts["failed"] == len(files)
    dicomweb_orthanc.start()
    held = len(instance_uids(dicomweb_orthanc))
    again = to_dicomweb(dicomweb_orthanc, tmp_path / "in")
    assert again.returncode == 0, again.stderr
    assert again.counts["already"] == held
    assert again.counts["stored"] == len(files) - held
    uids = instance_uids(dicomweb_orthanc)
    assert len(uids) == len(set(uids)) == len(files)


def count_instances(server: LocalOrthanc) -> int:
    auth = (server.username, server.password)
    try:
        answer = requests.get(f"{server.url}/statistics", auth=auth, timeout=5)
    except requests.RequestException:
        return 0
    return int(answer.json()["CountInstances"])


def test_https_is_checked_against_the_ca_bundle(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """A DICOMweb front over HTTPS with a certificate from a private CA: refused (exit 3,
    one line) until that CA is given with --ca-bundle."""
    certs = make_certificates(tmp_path / "certs")
    write_copies(small_dicom, tmp_path / "in", 2)
    gate = BearerGate(dicomweb_orthanc, secrets.token_urlsafe(16))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs["pacs"], certs["pacs-key"])
    gate.socket = context.wrap_socket(gate.socket, server_side=True)
    url = gate.url.replace("http://", "https://")
    thread = threading.Thread(target=gate.serve_forever, daemon=True)
    thread.start()
    saved = os.environ.get("DICOMWEB_TOKEN")
    os.environ["DICOMWEB_TOKEN"] = gate.token
    try:
        untrusted = upload(None, "--to", "dicomweb", url, "--timeout", "5", tmp_path / "in")
        trusted = upload(None, "--to", "dicomweb", url, "--ca-bundle", certs["ca"], tmp_path / "in")
    finally:
        if saved is None:
            os.environ.pop("DICOMWEB_TOKEN", None)
        else:
            os.environ["DICOMWEB_TOKEN"] = saved
        gate.shutdown()
        gate.server_close()
    assert untrusted.returncode == 3
    (line,) = untrusted.lines("E: ")
    assert line.startswith(f"E: DICOMweb server at {url} unreachable: ") and "CERTIFICATE" in line
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.counts["stored"] == trusted.counts["verified"] == 2


class RecordingGate(BearerGate):
    """The bearer gate, recording each request; ``blind`` drops a Study Instance UID
    list from a search, as a server that does not match UID lists ignores it."""

    def __init__(self, server: LocalOrthanc, token: str, blind: bool = False) -> None:
        self.requests: list[tuple[str, str]] = []
        self.blind = blind
        super().__init__(server, token)
        self.RequestHandlerClass = _RecordingHandler


class _RecordingHandler(_GateHandler):
    server: RecordingGate

    def _record(self) -> None:
        self.server.requests.append((self.command, self.path))
        if self.server.blind and "StudyInstanceUID=" in self.path:
            path, _, query = self.path.partition("?")
            kept = [p for p in query.split("&") if not p.startswith("StudyInstanceUID=")]
            self.path = f"{path}?{'&'.join(kept)}"
        self._forward()

    do_GET = do_POST = _record


def through_gate(gate: RecordingGate, *args: str | Path) -> Run:
    thread = threading.Thread(target=gate.serve_forever, daemon=True)
    thread.start()
    saved = os.environ.get("DICOMWEB_TOKEN")
    os.environ["DICOMWEB_TOKEN"] = gate.token
    try:
        return upload(None, "--to", "dicomweb", gate.url, *args)
    finally:
        if saved is None:
            os.environ.pop("DICOMWEB_TOKEN", None)
        else:
            os.environ["DICOMWEB_TOKEN"] = saved
        gate.shutdown()
        gate.server_close()


def test_stow_batches_in_flight_are_all_proved_by_a_few_list_searches(
    dicomweb_orthanc: LocalOrthanc, small_dicom: Path, tmp_path: Path
) -> None:
    """Twelve one-instance studies in six STOW-RS requests from four workers: every
    instance proved, and the searches before sending and after each request name all
    their studies at once (UID list matching), not one request per study. A rerun through a server that
    ignores UID lists finds out, asks study by study, and sends nothing."""
    files = write_copies(small_dicom, tmp_path / "in", 12)
    options = ("--workers", "4", "--batch", "2", tmp_path / "in")
    gate = RecordingGate(dicomweb_orthanc, secrets.token_urlsafe(16))
    run = through_gate(gate, *options)
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == 12
    assert "12 by QIDO-RS search" in run.stdout
    posts = [path for method, path in gate.requests if method == "POST"]
    searches = [path for method, path in gate.requests if "/instances?" in path]
    assert len(posts) == 6
    # One list search per chunk of four files (what the server holds) and one after each
    # request (the proof, mostly done before the last answer): none study by study.
    assert not [path for path in searches if "/studies/" in path], searches
    assert len(searches) <= 3 + 6, searches
    assert sorted(instance_uids(dicomweb_orthanc)) == sorted(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in files
    )

    blind = RecordingGate(dicomweb_orthanc, secrets.token_urlsafe(16), blind=True)
    again = through_gate(blind, *options)
    assert again.returncode == 0, again.stderr
    assert again.counts["stored"] == 0
    assert again.counts["already"] == again.counts["verified"] == 12
    assert "matches no UID lists: one search per study" in again.stderr
    assert sum("/studies/" in path for _method, path in blind.requests) >= 12
