"""Orthanc with its index in PostgreSQL (Debian's orthanc-postgresql plugin), as the hospital
stack runs it: a throwaway cluster on loopback, the committed plugin configuration, and two
Orthancs sharing one database and one storage folder."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs.local_orthanc import LocalOrthanc, free_port
from cxrsr.pacs.local_postgres import INDEX_PLUGIN, LocalPostgres, find_postgres_bin
from tests.claim_race import race, store_tiny
from tests.conftest import missing_prerequisite, orthanc_env, run_script
from tests.test_watch import (
    Follower,
    audit,
    get,
    get_claim,
    instance_id_of,
    make_copies,
    one_result_each,
    results_by_image,
    run_once,
    start_once,
    store,
    uid_of,
    wait_for,
)

HOSPITAL_CONFIG = PROJECT_ROOT / "deploy" / "hospital" / "orthanc-postgresql.json"


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    if find_postgres_bin() is None:
        missing_prerequisite(
            "PostgreSQL (Debian 'postgresql') is not installed (test.sh installs it)"
        )
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
        assert len(requests.get(f"{second.url}/instances", auth=auth, timeout=10).json()) == len(
            files
        )
    tables = postgres.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'resources'"
    )
    assert tables == "1", "Orthanc's index is not in PostgreSQL"


def stored_in_index(server: LocalOrthanc, uids: list[str]) -> set[str]:
    """The SOP Instance UIDs among ``uids`` that the (shared) index holds."""
    found = set()
    for uid in uids:
        answer = requests.post(f"{server.url}/tools/lookup", data=uid, timeout=30,
                               auth=(server.username, server.password))  # fmt: skip
        answer.raise_for_status()
        if any(item["Type"] == "Instance" for item in answer.json()):
            found.add(uid)
    return found


def stable_series(server: LocalOrthanc) -> set[str]:
    """The Orthanc series that have a StableSeries in the (shared) change log."""
    changes = get(server, "/changes?since=0&limit=10000")["Changes"]  # type: ignore[index]
    return {c["ID"] for c in changes if c["ChangeType"] == "StableSeries"}


def all_claims_done(server: LocalOrthanc, uids: list[str]) -> bool:
    """Whether every image's claim says ``done`` (nobody is still working on one)."""
    for uid in uids:
        try:
            if get_claim(server, instance_id_of(server, uid))["state"] != "done":
                return False
        except requests.HTTPError:
            return False  # not claimed yet
    return True


@pytest.fixture
def group(
    postgres: LocalPostgres, orthanc_binary: str, tmp_path: Path
) -> Iterator[list[LocalOrthanc]]:
    """Two Orthancs on one PostgreSQL index and one storage folder, with claims (the
    project's orthanc.json: CheckRevisions and the cxrsr-claim metadata), as in the
    hospital stack. The database is emptied first: each test has it to itself."""
    postgres.execute(f'DROP DATABASE IF EXISTS "{postgres.database}"', database="postgres")
    postgres.execute(f'CREATE DATABASE "{postgres.database}"', database="postgres")
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


def test_three_watchers_on_two_orthancs_sharing_postgresql_store_one_result_per_image(
    group: list[LocalOrthanc], corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """Images sent alternately to both Orthancs; three watch_orthanc.py --once, one on the
    first Orthanc and two on the second, each with its own state folder: one SR and one
    key image per image, whoever classified it."""
    images = make_copies(corpus_dir, tmp_path / "in", 24, per_study=4)
    uids = [uid_of(p) for p in images]
    for n, path in enumerate(images):
        store(group[n % 2], [path])
    watchers = [
        start_once(group[min(n, 1)], tmp_path / f"state-{n}", weights_cache_dir,
                   tmp_path / f"w{n}.log")
        for n in range(3)
    ]  # fmt: skip
    try:
        codes = [w.process.wait(600) for w in watchers]
    finally:
        for watcher in watchers:
            if watcher.process.poll() is None:
                watcher.kill()
    logs = [w.text() for w in watchers]
    assert codes == [0, 0, 0], logs
    assert "Traceback" not in "".join(logs)
    one_result_each(group[0], uids)
    one_result_each(group[1], uids)
    # The work was shared through the claims, and each image's claim says done.
    stored = [sum(1 for r in audit(tmp_path / f"state-{n}") if r["event"] == "stored")
              for n in range(3)]  # fmt: skip
    assert sum(stored) == len(uids), stored
    for uid in uids:
        claim = get_claim(group[1], instance_id_of(group[1], uid))
        assert claim["state"] == "done", claim


def test_a_watcher_killed_with_claims_in_hand_leaves_them_to_the_others(
    group: list[LocalOrthanc], corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """kill -9 of a watcher that holds claims: a watcher on the other Orthanc takes its
    images over (its holder no longer runs on this host) and every image gets one result."""
    images = make_copies(corpus_dir, tmp_path / "in", 8, per_study=4)
    uids = [uid_of(p) for p in images]
    for n, path in enumerate(images):
        store(group[n % 2], [path])
    ids = [instance_id_of(group[0], uid) for uid in uids]
    victim = start_once(group[0], tmp_path / "state-victim", weights_cache_dir,
                        tmp_path / "victim.log")  # fmt: skip

    def victim_claims() -> list[dict]:
        claims = []
        for orthanc_id in ids:
            try:
                claim = get_claim(group[1], orthanc_id)
            except requests.HTTPError:
                continue  # not claimed yet
            if f":{victim.process.pid}:" in claim["holder"] and claim["state"] == "working":
                claims.append(claim)
        return claims

    try:
        wait_for(lambda: victim_claims(), "the first watcher's claims in Orthanc")
    finally:
        victim.kill()
    assert victim_claims(), "its claims are still held (working) after kill -9"
    rest = run_once(group[1], tmp_path / "state-rest", weights_cache_dir)
    assert rest.returncode == 0, rest.stderr
    assert "taking its work over" in rest.stderr, rest.stderr
    one_result_each(group[0], uids)
    for orthanc_id in ids:
        assert get_claim(group[0], orthanc_id)["state"] == "done"


def send_alternately_and_kill_one(
    group: list[LocalOrthanc], images: list[Path], after: int
) -> list[Path]:
    """Send ``images`` alternately to both Orthancs (a modality's thread) and ``kill -9``
    the first once ``after`` have been sent, while the sending goes on; the images whose
    sending failed (the dying Orthanc's, connection reset or refused)."""
    sent = threading.Semaphore(0)
    refused: list[Path] = []

    def modality() -> None:
        for n, path in enumerate(images):
            try:
                store(group[n % 2], [path])
            except requests.RequestException:
                refused.append(path)
            sent.release()

    sender = threading.Thread(target=modality, daemon=True)
    sender.start()
    for _ in range(after):
        assert sent.acquire(timeout=60), "the images are not being stored"
    group[0].kill()
    sender.join(120)
    assert not sender.is_alive(), "the sending did not end"
    return refused


def test_an_orthanc_killed_while_receiving_leaves_no_image_without_its_result(
    group: list[LocalOrthanc], corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """Two watchers follow the surviving Orthanc while images (one series each) are sent
    alternately to both; the other is ``kill -9``ed halfway through. The series it
    committed in its last StableAge never get a StableSeries (it died holding the timer):
    only the sweep finds them. The images it never committed are sent again to the
    survivor, as a modality would. Then every image has exactly one SR and one key image,
    and every claim says done."""
    survivor = group[1]
    images = make_copies(corpus_dir, tmp_path / "in", 12)
    uids = [uid_of(p) for p in images]
    options = ("--poll-interval", "0.2", "--reconcile-interval", "1", "--batch-size", "4",
               "--backend", "eager")  # fmt: skip
    watchers = [Follower(survivor, tmp_path / f"state-{n}", weights_cache_dir,
                         tmp_path / f"w{n}.log", options)
                for n in range(2)]  # fmt: skip
    try:
        # Their first full look (on start) is over once they saved a cursor: from then
        # on only StableSeries events and the sweep bring them images.
        wait_for(lambda: all((tmp_path / f"state-{n}" / "cursor.json").exists()
                             for n in range(2)), "both watchers past their first full look")  # fmt: skip
        refused = send_alternately_and_kill_one(group, images, after=len(images) // 2)
        assert len(refused) >= len(images) // 4, "the Orthanc was not killed while receiving"
        committed = stored_in_index(survivor, uids)
        from_dying = committed - set(uids[1::2])
        assert from_dying, "the dying Orthanc committed nothing"
        announced = stable_series(survivor)
        unannounced = [uid for uid in from_dying if get(survivor, f"/instances/"
                       f"{instance_id_of(survivor, uid)}")["ParentSeries"] not in announced]  # type: ignore[index]  # fmt: skip
        assert unannounced, "every series the dying Orthanc committed was announced"
        store(survivor, [p for p, u in zip(images, uids, strict=True) if u not in committed])
        wait_for(lambda: set(uids) <= set(results_by_image(survivor)), "an SR for every image")
        wait_for(lambda: all_claims_done(survivor, uids), "every claim done")
        for watcher in watchers:
            code, _ = watcher.terminate()
            assert code == 0, watcher.text()
    finally:
        for watcher in watchers:
            if watcher.process.poll() is None:
                watcher.kill()
    one_result_each(survivor, uids)
    assert "Traceback" not in "".join(w.text() for w in watchers)


def test_command_line_runs_a_kept_cluster_and_an_orthanc_indexed_in_it(
    postgres: LocalPostgres, tmp_path: Path
) -> None:
    """local_postgres start/stop --dir and local_orthanc start --postgres: the documented
    way to run the hospital layout without Docker. Started again, the cluster keeps its data."""
    env = dict(os.environ, CXRSR_DOTENV="/dev/null", ORTHANC_USERNAME="cxrsr-test",
               ORTHANC_PASSWORD=secrets.token_urlsafe(12))  # fmt: skip
    # As root the cluster runs as the postgres user, who must reach its folder: not
    # under pytest's owner-only tmp_path.
    outside = Path(tempfile.mkdtemp(prefix="cxrsr-test-pg-"))
    outside.chmod(0o711)
    cluster, orthanc_dir, port = outside / "pg", tmp_path / "orthanc", free_port()

    def module(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", f"cxrsr.pacs.{name}", *argv],
                              capture_output=True, text=True, env=env, timeout=120,
                              cwd=PROJECT_ROOT)  # fmt: skip

    started = module("local_postgres", "start", "--dir", str(cluster))
    assert started.returncode == 0 and "PostgreSQL running" in started.stderr, started.stderr
    try:
        orthanc = module("local_orthanc", "start", "--dir", str(orthanc_dir),
                         "--http-port", str(port), "--dicom-port", str(free_port()),
                         "--postgres", str(cluster))  # fmt: skip
        assert orthanc.returncode == 0, orthanc.stderr
        try:
            auth = (env["ORTHANC_USERNAME"], env["ORTHANC_PASSWORD"])
            system = requests.get(f"http://127.0.0.1:{port}/system", auth=auth, timeout=10)
            assert "PostgreSQLIndex" in system.json()["DatabaseBackendPlugin"]
            assert system.json()["CheckRevisions"] is True
        finally:
            assert module("local_orthanc", "stop", "--dir", str(orthanc_dir)).returncode == 0
        assert module("local_postgres", "stop", "--dir", str(cluster)).returncode == 0
        again = module("local_postgres", "start", "--dir", str(cluster))
        assert again.returncode == 0, again.stderr
        connection = json.loads((cluster / "connection.json").read_text())
        assert connection["Lock"] is False and connection["Host"] == "127.0.0.1"
    finally:
        module("local_postgres", "stop", "--dir", str(cluster))
        shutil.rmtree(outside, ignore_errors=True)


#: What a user's checkout holds that a throwaway copy of the project must not share.
OWN_STATE = {
    ".git",
    ".venv",
    ".env",
    "data",
    "output",
    ".orthanc",
    ".postgres",
    ".orthanc-postgres",
}


@pytest.fixture
def project(corpus_dir: Path, weights_cache_dir: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A checkout of the project to run ``run.sh`` in (links to this one's files, with its
    own data/ holding one radiograph, .env, state folders and home with the weights), and
    the environment to run it with: this test run's Python as its virtual environment
    (installed, by its stamp), an Orthanc URL on a free port. Outside pytest's owner-only
    folders: as root the cluster runs as the postgres user, who must reach it."""
    root = Path(tempfile.mkdtemp(prefix="cxrsr-test-run-"))
    root.chmod(0o711)
    checkout = root / "cxrsr"
    checkout.mkdir()
    for entry in PROJECT_ROOT.iterdir():
        if entry.name not in OWN_STATE:
            (checkout / entry.name).symlink_to(entry)
    (checkout / "data").mkdir()
    make_copies(corpus_dir, root / "copies", 1)[0].rename(checkout / "data" / "IM1")
    venv = root / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    requirements = (PROJECT_ROOT / "requirements.txt").read_bytes()
    stamp = hashlib.sha256(requirements * 2).hexdigest()  # scripts/common.sh's ensure_venv
    (venv / ".installed-requirements.txt").write_text(stamp + "\n")
    weights = root / "home" / ".torchxrayvision" / "models_data"
    weights.mkdir(parents=True)
    for path in weights_cache_dir.iterdir():
        if path.is_file():  # the weights; not the ONNX exports other tests left beside them
            shutil.copy(path, weights / path.name)
    env = dict(os.environ, VENV=str(venv), HOME=str(root / "home"),
               CXRSR_DOTENV=str(checkout / ".env"),
               ORTHANC_URL=f"http://127.0.0.1:{free_port()}", ORTHANC_USERNAME="cxrsr-test",
               ORTHANC_PASSWORD=secrets.token_urlsafe(12))  # fmt: skip
    try:
        yield checkout, env
    finally:
        for module, folder in (
            ("local_orthanc", ".orthanc-postgres"),
            ("local_postgres", ".postgres"),
        ):
            if (checkout / folder).exists():
                subprocess.run([sys.executable, "-m", f"cxrsr.pacs.{module}", "stop", "--dir",
                                str(checkout / folder)], capture_output=True, timeout=120,
                               cwd=PROJECT_ROOT, env=env)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def run_sh(checkout: Path, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(checkout / "run.sh"), *argv], capture_output=True,
                          text=True, env=env, cwd=checkout, timeout=600)  # fmt: skip


def test_run_sh_postgres_runs_the_pipeline_into_an_orthanc_indexed_in_postgresql(
    postgres: LocalPostgres, project: tuple[Path, dict[str, str]]
) -> None:
    """./run.sh --postgres starts a cluster of its own (.postgres/) and the local Orthanc
    on it (.orthanc-postgres/), and stores the image, its SR and its key image there."""
    checkout, env = project
    done = run_sh(checkout, env, "--postgres")
    assert done.returncode == 0, done.stderr
    assert "starting PostgreSQL" in done.stderr
    auth = (env["ORTHANC_USERNAME"], env["ORTHANC_PASSWORD"])
    system = requests.get(f"{env['ORTHANC_URL']}/system", auth=auth, timeout=10).json()
    assert "PostgreSQLIndex" in system["DatabaseBackendPlugin"]
    statistics = requests.get(f"{env['ORTHANC_URL']}/statistics", auth=auth, timeout=10).json()
    assert statistics["CountInstances"] == 3, statistics  # the image, its SR, its key image
    connection = json.loads((checkout / ".postgres" / "connection.json").read_text())
    assert connection["Host"] == "127.0.0.1" and connection["Lock"] is False


def test_run_sh_postgres_refuses_an_orthanc_on_sqlite(
    postgres: LocalPostgres,
    project: tuple[Path, dict[str, str]],
    orthanc_binary: str,
    tmp_path: Path,
) -> None:
    """An Orthanc already answering at ORTHANC_URL on its built-in SQLite is not what
    --postgres asked for: one E: line, exit 3, nothing classified."""
    checkout, env = project
    port = int(env["ORTHANC_URL"].rsplit(":", 1)[1])
    sqlite = LocalOrthanc(tmp_path / "sqlite", env["ORTHANC_USERNAME"], env["ORTHANC_PASSWORD"],
                          http_port=port, binary=orthanc_binary)  # fmt: skip
    with sqlite:
        refused = run_sh(checkout, env, "--postgres")
    assert refused.returncode == 3, refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("E:")]
    assert len(errors) == 1 and "SQLite" in errors[0], refused.stderr
    assert not (checkout / "output").exists()
