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
from tests.claim_race import race, store_tiny
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


@pytest.fixture
def group(postgres: LocalPostgres, orthanc_binary: str, tmp_path: Path) -> Iterator[list[LocalOrthanc]]:
    """Two Orthancs on one PostgreSQL index and one storage folder, with claims (the
    project's orthanc.json: CheckRevisions and the cxrsr-claim metadata), as in the
    hospital stack. The database is emptied first: each test has it to itself."""
    postgres.execute(
        "DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables "
        "WHERE schemaname = 'public' LOOP EXECUTE 'DROP TABLE ' || quote_ident(t) || "
        "' CASCADE'; END LOOP; END $$"
    )
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o700)
    password = secrets.token_urlsafe(16)
    settings = {**hospital_settings(postgres, storage), "StableAge": 2}
    servers = [
        LocalOrthanc(tmp_path / name, "cxrsr-test", password, binary=orthanc_binary,
                     overrides=settings)
        for name in ("a", "b")
    ]  # fmt: skip
    with servers[0], servers[1]:
        yield servers


def test_three_processes_racing_through_two_orthancs_on_postgresql_never_share_a_claim(
    group: list[LocalOrthanc],
) -> None:
    """3 processes x 1,000 claims (50 instances x 20 rounds) alternately through both
    Orthancs: each key has exactly one winner in every round (round 0 races the create
    of a free claim, later rounds the compare and swap of a done one)."""
    first = group[0]
    keys = store_tiny(first.url, first.username, first.password, 50)
    urls = [server.url for server in group]
    result = race(urls, first.username, first.password, keys, processes=3, rounds=20)
    assert result.errors == []
    assert result.attempts == 3 * 1000
    expected = {(round_, key) for round_ in range(20) for key in keys}
    assert set(result.winners) == expected, "a key had no winner in some round"
    shared = {k: v for k, v in result.winners.items() if len(v) != 1}
    assert shared == {}, f"double claims: {list(shared.items())[:5]}"
