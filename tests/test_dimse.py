"""upload_dicom.py --to dimse against real DICOM peers on loopback.

Orthanc's DICOM server stores by C-STORE, answers C-FIND and commits by Storage
Commitment (its N-EVENT-REPORT comes back on an association of its own, to the port
registered for our AE title); dcmtk's ``storescp`` is a plain storage SCP that offers
neither, so only its C-STORE status remains as proof.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
from conftest import require_program
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from test_upload import Run, file_meta_element, start_upload, upload, write_copies

from cxrsr.pacs.local_orthanc import LocalOrthanc, free_port

AET = "CXRSR"


@pytest.fixture(scope="module")
def small_dicom(corpus_dir: Path) -> Path:
    return corpus_dir / "bad_cr_cspine_16x16.dcm"


@pytest.fixture
def listen_port() -> int:
    return free_port()


def dicom_orthanc(workdir: Path, binary: str, listen_port: int) -> LocalOrthanc:
    """An Orthanc whose DICOM port knows our AE title (store, find, storage commitment)
    and reports commitments back to ``listen_port``; it checks the called AE title."""
    return LocalOrthanc(
        workdir,
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=binary,
        dicom_server=True,
        overrides={
            "DicomModalities": {"cxrsr": {"AET": AET, "Host": "127.0.0.1", "Port": listen_port}},
            "DicomCheckCalledAet": True,
        },
    )


@pytest.fixture
def pacs(tmp_path: Path, orthanc_binary: str, listen_port: int) -> Iterator[LocalOrthanc]:
    with dicom_orthanc(tmp_path / "orthanc-dimse", orthanc_binary, listen_port) as server:
        yield server


def dimse_args(server: LocalOrthanc, listen_port: int, *extra: str) -> list[str]:
    return [
        "--to",
        "dimse",
        f"127.0.0.1:{server.dicom_port}",
        "--aet",
        AET,
        "--called-aet",
        "ORTHANC",
        "--listen-port",
        str(listen_port),
        "--timeout",
        "20",
        *extra,
    ]


def instance_uids(server: LocalOrthanc) -> list[str]:
    """Every SOP Instance UID Orthanc holds, duplicates included (through its REST API)."""
    auth = (server.username, server.password)
    answer = requests.post(
        f"{server.url}/tools/find",
        json={"Level": "Instance", "Query": {}, "Expand": True},
        auth=auth,
        timeout=10,
    )
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in answer.json()]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def test_corpus_is_stored_committed_and_a_rerun_sends_nothing(
    pacs: LocalOrthanc, listen_port: int, corpus_dir: Path
) -> None:
    """Every transfer syntax of the corpus goes in its own syntax (no transcoding), every
    instance is committed by the N-EVENT-REPORT, and a rerun finds them all by C-FIND."""
    dicom_files = sorted(corpus_dir.glob("*.dcm"))
    expected = {sop_uid(p) for p in dicom_files}
    first = upload(None, *dimse_args(pacs, listen_port), corpus_dir)
    assert first.returncode == 0, first.stderr
    assert first.counts["stored"] == len(dicom_files)
    assert first.counts["verified"] == first.counts["acknowledged"] == len(dicom_files)
    assert f"{len(dicom_files)} by storage commitment" in first.stdout
    assert set(instance_uids(pacs)) == expected

    again = upload(None, *dimse_args(pacs, listen_port), corpus_dir)
    assert again.returncode == 0, again.stderr
    assert again.counts["stored"] == 0
    assert again.counts["already"] == again.counts["verified"] == len(dicom_files)
    uids = instance_uids(pacs)
    assert len(uids) == len(set(uids)) == len(expected)


def test_without_a_listen_port_the_proof_falls_back_to_c_find(
    pacs: LocalOrthanc, listen_port: int, small_dicom: Path, tmp_path: Path
) -> None:
    """No one accepts Orthanc's N-EVENT-REPORT: after --timeout the run says so and
    proves every instance by C-FIND at IMAGE level instead."""
    write_copies(small_dicom, tmp_path / "in", 3)
    args = dimse_args(pacs, listen_port, "--timeout", "2")
    args.remove("--listen-port")
    args.remove(str(listen_port))
    run = upload(None, *args, tmp_path / "in")
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == 3
    assert "3 by C-FIND" in run.stdout
    assert "no N-EVENT-REPORT within 2 s; proving by C-FIND at IMAGE level instead" in run.stderr


def test_malformed_headers_never_reach_the_dicom_peer(
    pacs: LocalOrthanc, listen_port: int, small_dicom: Path, tmp_path: Path
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
    run = upload(None, *dimse_args(pacs, listen_port), folder)
    assert run.returncode == 1
    assert run.counts["stored"] == 1 and run.counts["failed"] == 3
    errors = run.lines("E: ")
    assert len(errors) == 3 and all(": failed: not sent: malformed: " in e for e in errors)
    assert instance_uids(pacs) == [sop_uid(valid)]


def test_a_wrong_called_aet_stops_the_run_with_one_line(
    pacs: LocalOrthanc, listen_port: int, small_dicom: Path, tmp_path: Path
) -> None:
    write_copies(small_dicom, tmp_path / "in", 2)
    args = dimse_args(pacs, listen_port)
    args[args.index("ORTHANC")] = "NOT-ORTHANC"
    run = upload(None, *args, tmp_path / "in")
    assert run.returncode == 3
    assert run.lines("E: ") == [
        f"E: DICOM peer NOT-ORTHANC at 127.0.0.1:{pacs.dicom_port} rejected the association: "
        "Called AE title not recognised (Service User); check --called-aet and that the peer "
        f"knows our AE title '{AET}'"
    ]
    assert instance_uids(pacs) == []


def count_instances(server: LocalOrthanc) -> int:
    auth = (server.username, server.password)
    try:
        answer = requests.get(f"{server.url}/statistics", auth=auth, timeout=5)
    except requests.RequestException:
        return 0
    return int(answer.json()["CountInstances"])


def test_the_peer_killed_mid_association_loses_nothing_and_a_rerun_completes(
    tmp_path: Path, orthanc_binary: str, listen_port: int, small_dicom: Path
) -> None:
    files = write_copies(small_dicom, tmp_path / "in", 60)
    server = dicom_orthanc(tmp_path / "orthanc-killed", orthanc_binary, listen_port)
    server.start()
    try:
        process = start_upload(
            server,
            *dimse_args(server, listen_port, "--workers", "1", "--timeout", "5"),
            tmp_path / "in",
        )
        deadline = time.monotonic() + 60
        while count_instances(server) < 10 and process.poll() is None:
            assert time.monotonic() < deadline, "no instance arrived within 60 s"
            time.sleep(0.01)
        server.kill()
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 1, stderr
        cut = Run(process.returncode, stdout, stderr)
        assert cut.counts["failed"] > 0
        assert cut.counts["stored"] + cut.counts["failed"] == len(files)  # each accounted for
        assert "Traceback" not in stderr
        server.start()
        held = set(instance_uids(server))
        again = upload(None, *dimse_args(server, listen_port), tmp_path / "in")
        assert again.returncode == 0, again.stderr
        assert again.counts["already"] == len(held)
        assert again.counts["stored"] == len(files) - len(held)
        assert again.counts["verified"] == len(files)
        uids = instance_uids(server)
        assert len(uids) == len(set(uids)) == len(files)
    finally:
        server.stop()


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def start_storescp(received: Path, *options: str) -> tuple[subprocess.Popen[bytes], int]:
    """dcmtk's storescp on a free loopback port, writing what it receives to ``received``."""
    storescp = require_program("storescp")
    port = free_port()
    received.mkdir()
    process = subprocess.Popen(
        [
            storescp,
            *options,
            "--aetitle",
            "STORESCP",
            "--output-directory",
            str(received),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
    except BaseException:
        process.kill()
        process.wait(timeout=30)
        raise
    return process, port


def test_a_plain_storescp_leaves_only_the_c_store_status_as_proof(
    small_dicom: Path, tmp_path: Path
) -> None:
    received = tmp_path / "received"
    files = write_copies(small_dicom, tmp_path / "in", 3)
    process, port = start_storescp(received)
    try:
        run = upload(
            None,
            "--to",
            "dimse",
            f"127.0.0.1:{port}",
            "--called-aet",
            "STORESCP",
            "--timeout",
            "10",
            tmp_path / "in",
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == 3 and run.counts["verified"] == 3
    assert "3 by C-STORE status only" in run.stdout
    assert "and it answers no C-FIND: only its C-STORE status says the files landed" in run.stderr
    assert sorted(sop_uid(p) for p in received.iterdir()) == sorted(sop_uid(p) for p in files)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and two certificates it signs for 127.0.0.1: Orthanc's and ours."""
    openssl = require_program("openssl")
    folder.mkdir()
    paths = {
        name: folder / f"{name}.pem"
        for name in ("ca", "ca-key", "pacs", "pacs-key", "us", "us-key")
    }

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=cxrsr test CA",
        "-keyout",
        paths["ca-key"],
        "-out",
        paths["ca"],
    )
    for name in ("pacs", "us"):
        request = folder / f"{name}.csr"
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            paths[f"{name}-key"],
            "-out",
            request,
        )
        extensions = folder / f"{name}.ext"
        extensions.write_text("subjectAltName=IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            paths["ca"],
            "-CAkey",
            paths["ca-key"],
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            extensions,
            "-out",
            paths[name],
        )
    return paths


def test_dicom_tls_stores_and_commits_over_tls_only(
    tmp_path: Path, orthanc_binary: str, listen_port: int, small_dicom: Path
) -> None:
    """Orthanc's DICOM port speaks TLS only and requires our certificate; its storage
    commitment report comes back over TLS too."""
    certs = make_certificates(tmp_path / "certs")
    server = LocalOrthanc(
        tmp_path / "orthanc-tls",
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=orthanc_binary,
        dicom_server=True,
        overrides={
            "DicomModalities": {
                "cxrsr": {"AET": AET, "Host": "127.0.0.1", "Port": listen_port, "UseDicomTls": True}
            },
            "DicomCheckCalledAet": True,
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(certs["pacs"]),
            "DicomTlsPrivateKey": str(certs["pacs-key"]),
            "DicomTlsTrustedCertificates": str(certs["ca"]),
            "DicomTlsRemoteCertificateRequired": True,
        },
    )
    files = write_copies(small_dicom, tmp_path / "in", 3)
    tls = [
        "--tls",
        "--tls-ca",
        str(certs["ca"]),
        "--tls-cert",
        str(certs["us"]),
        "--tls-key",
        str(certs["us-key"]),
    ]
    with server:
        plain = upload(None, *dimse_args(server, listen_port, "--timeout", "5"), tmp_path / "in")
        assert plain.returncode == 3, plain.stderr
        assert instance_uids(server) == []
        run = upload(None, *dimse_args(server, listen_port), *tls, tmp_path / "in")
        assert run.returncode == 0, run.stderr
        assert run.counts["stored"] == 3
        assert "3 by storage commitment" in run.stdout
        assert sorted(instance_uids(server)) == sorted(sop_uid(p) for p in files)


def test_uncompressed_files_are_converted_losslessly_and_compressed_ones_never_transcoded(
    small_dicom: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """A peer that accepts Implicit VR Little Endian only (storescp +xi): the Explicit VR
    file goes as Implicit VR, the same data set; the JPEG file is refused by us, not
    decompressed or recompressed, with the reason."""
    (explicit,) = write_copies(small_dicom, tmp_path / "in", 1)
    (jpeg,) = write_copies(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", tmp_path / "in-jpeg", 1)
    jpeg = jpeg.rename(tmp_path / "in" / "jpeg.dcm")
    received = tmp_path / "received"
    process, port = start_storescp(received, "+xi")
    try:
        run = upload(
            None,
            "--to",
            "dimse",
            f"127.0.0.1:{port}",
            "--called-aet",
            "STORESCP",
            "--timeout",
            "5",
            tmp_path / "in",
        )
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.returncode == 1
    assert run.counts["stored"] == 1 and run.counts["rejected"] == 1
    (error,) = run.lines("E: ")
    assert error.startswith(
        f"E: {jpeg}: rejected: the peer accepts no lossless way to receive it (1.2.840.10008.1.2.4.50)"
    )
    (stored,) = received.iterdir()
    copy = pydicom.dcmread(stored)
    assert copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    original = pydicom.dcmread(explicit)
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert copy.PixelData == original.PixelData


class RecordingScp:
    """A pynetdicom storage SCP on loopback (no C-FIND, no storage commitment) that
    records each C-STORE: the association it came on and the data set bytes received."""

    def __init__(self, files: list[Path]) -> None:
        self.stores: list[tuple[object, str, bytes]] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="RECORDER")
        for sop_class, syntax in sorted(
            {
                (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in files)
            }
        ):
            self.ae.add_supported_context(
                sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian]))
            )
        self.ae.add_supported_context(Verification)
        self.ae.maximum_associations = 8
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.stores.append(
                (
                    event.assoc,
                    str(event.request.AffectedSOPInstanceUID),
                    event.request.DataSet.getvalue(),
                )
            )
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def data_set_bytes(path: Path) -> bytes:
    """The file's data set as encoded: what follows its File Meta Information."""
    data = path.read_bytes()
    (group_length,) = struct.unpack_from("<I", data, 140)
    return data[144 + group_length :]


def test_parallel_associations_are_each_reused_and_carry_the_files_own_bytes(
    small_dicom: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Two workers send 24 files over at most two associations, kept open from batch to
    batch (not one per chunk of files); a JPEG 2000 radiograph arrives byte for byte as
    its file holds it (pydicom would write that data set 24 bytes shorter)."""
    files = write_copies(small_dicom, tmp_path / "in", 24)
    # First in discovery order: the first associations propose its context already (one
    # that meets a new (SOP class, transfer syntax) pair later is renewed, by design).
    radiograph = tmp_path / "in" / "A_radiograph.dcm"
    radiograph.write_bytes((corpus_dir / "cxr05_dx_canon_966_fixed_j2kr.dcm").read_bytes())
    scp = RecordingScp([*files, radiograph])
    try:
        run = upload(
            None,
            "--to",
            "dimse",
            f"127.0.0.1:{scp.port}",
            "--called-aet",
            "RECORDER",
            "--workers",
            "2",
            "--batch",
            "4",
            "--timeout",
            "20",
            tmp_path / "in",
        )
    finally:
        scp.close()
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == 25
    per_association: dict[int, int] = {}
    for assoc, _uid, _data in scp.stores:
        per_association[id(assoc)] = per_association.get(id(assoc), 0) + 1
    assert len(per_association) <= 2, per_association
    assert max(per_association.values()) >= 2
    received = {uid: data for _assoc, uid, data in scp.stores}
    assert sorted(received) == sorted([*map(sop_uid, files), sop_uid(radiograph)])
    assert received[sop_uid(radiograph)] == data_set_bytes(radiograph)


def test_storage_commitment_is_asked_while_files_are_still_being_sent(
    pacs: LocalOrthanc, listen_port: int, small_dicom: Path, tmp_path: Path
) -> None:
    """With a report port, the instances stored so far are named in an N-ACTION at each
    chunk of files, on a sending association, not all in one request at the end: Orthanc
    runs one storage commitment job per request, and every instance is still committed."""
    write_copies(small_dicom, tmp_path / "in", 12)
    run = upload(
        None, *dimse_args(pacs, listen_port, "--workers", "2", "--batch", "2"), tmp_path / "in"
    )
    assert run.returncode == 0, run.stderr
    assert run.counts["stored"] == run.counts["verified"] == 12
    assert "12 by storage commitment" in run.stdout
    jobs = requests.get(
        f"{pacs.url}/jobs?expand", auth=(pacs.username, pacs.password), timeout=10
    ).json()
    commitments = [job for job in jobs if job.get("Type") == "StorageCommitmentScp"]
    assert len(commitments) >= 2, jobs
