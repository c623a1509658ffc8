"""The foundation: a real Orthanc from the project's config, credentials, discovery."""

from __future__ import annotations

import zipfile
from pathlib import Path

import requests

from cxrsr.config import orthanc_settings, read_dotenv
from cxrsr.dicomio.discovery import iter_sources, open_source, sniff_dicom
from cxrsr.pacs.local_orthanc import LocalOrthanc


def test_orthanc_requires_the_configured_credentials(orthanc: LocalOrthanc) -> None:
    ok = requests.get(f"{orthanc.url}/system", auth=(orthanc.username, orthanc.password), timeout=5)
    assert ok.status_code == 200
    assert ok.json()["Name"] == "cxrsr"  # the project's orthanc.json, not a default config
    wrong = requests.get(f"{orthanc.url}/system", auth=(orthanc.username, "wrong"), timeout=5)
    assert wrong.status_code == 401
    anonymous = requests.get(f"{orthanc.url}/system", timeout=5)
    assert anonymous.status_code == 401


def test_dotenv_and_environment(tmp_path: Path, monkeypatch) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nORTHANC_URL=http://127.0.0.1:9999/\nORTHANC_PASSWORD='s3cret'\n")
    assert read_dotenv(env)["ORTHANC_PASSWORD"] == "s3cret"
    monkeypatch.setenv("ORTHANC_USERNAME", "alice")
    settings = orthanc_settings(url="http://h:1/", password="pw")
    assert settings.url == "http://h:1"
    assert settings.username == "alice"
    assert "pw" not in repr(settings)


def test_discovery_by_content_in_folders_and_zips(corpus_dir: Path, tmp_path: Path) -> None:
    dicom = corpus_dir / "cxr11_siim_cr_jpeg8.dcm"
    no_meta = corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "IM0001").write_bytes(dicom.read_bytes())  # no extension
    (tmp_path / "notes.dcm").write_text("not dicom")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 10)
    with zipfile.ZipFile(tmp_path / "batch.zip", "w") as archive:
        archive.write(no_meta, "study/IMG1")
    names = [s.name for s in iter_sources([tmp_path])]
    assert names == [
        str(tmp_path / "batch.zip") + "!study/IMG1",
        str(tmp_path / "notes.dcm"),
        str(tmp_path / "sub" / "IM0001"),
    ]
    sniffed = {n: sniff_dicom(open_source(n).head()) for n in names}
    assert sniffed == {names[0]: True, names[1]: False, names[2]: True}
    assert open_source(names[0]).read_bytes() == no_meta.read_bytes()
