"""Orthanc with its index in PostgreSQL (Debian's orthanc-postgresql plugin), as the hospital
stack runs it: a throwaway cluster on loopback, the committed plugin configuration, and two
Orthancs sharing one database and one storage folder."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs.local_orthanc import LocalOrthanc
from cxrsr.pacs.local_postgres import INDEX_PLUGIN, LocalPostgres, find_postgres_bin
from tests.conftest import missing_prerequisite, orthanc_env, run_script

HOSPITAL_CONFIG = PROJECT_ROOT / "deploy" / "hospital" / "orthanc-postgresql.json"


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    if find_postgres_bin() is None:
        missing_prerequisite("PostgreSQL (Debian 'postgresql') is not installed (test.sh installs it)")
    if not INDEX_PLUGIN.exists():
        missing_prerequisite("Debian 'orthanc-postgresql' is not installed (test.sh installs it)")
    with LocalPostgres() as cluster:
        yield cluster


def hospital_settings(cluster: LocalPostgres, storage: Path) -> dict[str, object]:
    """The committed deploy/hospital configuration, pointed at the test cluster."""
    section = json.loads(HOSPITAL_CONFIG.read_text())["PostgreSQL"]
    ours = cluster.orthanc_settings()["PostgreSQL"]
    assert isinstance(ours, dict)
    for key in ("Host", "Port", "Database", "Username", "Password"):
        section[key] = ours[key]
    return {
        "Plugins": [str(INDEX_PLUGIN)],
        "PostgreSQL": section,
        "StorageDirectory": str(storage),  # shared by every Orthanc of the group
    }


def test_two_orthancs_on_one_database_store_each_instance_once(
    postgres: LocalPostgres, orthanc_binary: str, corpus_dir: Path, tmp_path: Path
) -> None:
    """Sent to one Orthanc, found by the other; sent again to the other: already stored."""
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o700)
    password = secrets.token_urlsafe(16)
    settings = hospital_settings(postgres, storage)
    first = LocalOrthanc(tmp_path / "a", "cxrsr-test", password, binary=orthanc_binary,
                         overrides=settings)  # fmt: skip
    second = LocalOrthanc(tmp_path / "b", "cxrsr-test", password, binary=orthanc_binary,
                          overrides=settings)  # fmt: skip
    files = sorted(corpus_dir.glob("*.dcm"))[:3]
    assert files, "the corpus has no .dcm files at its top level"
    with first, second:
        sent = run_script("upload_dicom.py", *files, env=orthanc_env(first))
        assert sent.returncode == 0, sent.stderr
        auth = (first.username, first.password)
        ids_a = requests.get(f"{first.url}/instances", auth=auth, timeout=10).json()
        ids_b = requests.get(f"{second.url}/instances", auth=auth, timeout=10).json()
        assert len(ids_a) == len(files) and sorted(ids_a) == sorted(ids_b)
        # The file itself comes back through the other Orthanc (shared storage).
        for instance in ids_b:
            answer = requests.get(f"{second.url}/instances/{instance}/file", auth=auth, timeout=10)
            assert answer.status_code == 200 and answer.content[128:132] == b"DICM"
        again = run_script("upload_dicom.py", *files, env=orthanc_env(second))
        assert again.returncode == 0, again.stderr
        assert f"{len(files)} already" in again.stdout + again.stderr
        assert len(requests.get(f"{second.url}/instances", auth=auth, timeout=10).json()) == len(files)
    tables = postgres.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'resources'"
    )
    assert tables == "1", "Orthanc's index is not in PostgreSQL"
