"""watch_orthanc.py against a real Orthanc with a short StableAge: exactly one result per image.

Every test is bounded in time: subprocesses have timeouts and every wait polls with a
deadline. Images are copies of a real corpus radiograph with fresh UIDs, so each is a
new instance (and, where the test says so, a new study).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs.local_orthanc import LocalOrthanc
from tests.conftest import orthanc_env

STABLE_AGE = 2
WAIT = 120.0


@pytest.fixture
def watched(tmp_path: Path, orthanc_binary: str) -> Iterator[LocalOrthanc]:
    """An Orthanc of the test's own whose series become stable after two seconds."""
    server = LocalOrthanc(
        tmp_path / "orthanc",
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=orthanc_binary,
        overrides={"StableAge": STABLE_AGE},
    )
    with server:
        yield server


def make_copies(corpus_dir: Path, folder: Path, count: int, per_study: int = 1) -> list[Path]:
    """``count`` copies of a real CR chest image with fresh UIDs, ``per_study`` to a study."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    study = series = ""
    for index in range(count):
        ds = pydicom.dcmread(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")
        if index % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"WATCH{index // per_study}"
        path = folder / f"img{index}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def store(server: LocalOrthanc, paths: list[Path]) -> list[dict]:
    answers = []
    for path in paths:
        answer = requests.post(
            f"{server.url}/instances",
            data=path.read_bytes(),
            auth=(server.username, server.password),
            timeout=30,
        )
        answer.raise_for_status()
        answers.append(answer.json())
    return answers


def get(server: LocalOrthanc, path: str, body: object = None) -> object:
    auth = (server.username, server.password)
    if body is None:
        answer = requests.get(f"{server.url}{path}", auth=auth, timeout=30)
    else:
        answer = requests.post(f"{server.url}{path}", json=body, auth=auth, timeout=30)
    answer.raise_for_status()
    return answer.json()


def results_by_image(server: LocalOrthanc) -> dict[str, list[tuple[str, str]]]:
    """Source SOP Instance UID -> [(SR SOP Instance UID, Orthanc study of the SR)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for series_id in get(server, "/tools/find", {"Level": "Series", "Query": {"Modality": "SR"}}):  # type: ignore[union-attr]
        for instance in get(server, f"/series/{series_id}/instances"):  # type: ignore[union-attr]
            tags = get(server, f"/instances/{instance['ID']}/tags?simplify")
            study = get(server, f"/instances/{instance['ID']}/study")["ID"]  # type: ignore[index]
            for item in tags["CurrentRequestedProcedureEvidenceSequence"]:  # type: ignore[index]
                for series in item["ReferencedSeriesSequence"]:
                    for sop in series["ReferencedSOPSequence"]:
                        found.setdefault(sop["ReferencedSOPInstanceUID"], []).append(
                            (tags["SOPInstanceUID"], study)  # type: ignore[index]
                        )
    return found


def key_images_by_image(server: LocalOrthanc) -> dict[str, list[tuple[str, str]]]:
    """Source SOP Instance UID -> [(key image SOP Instance UID, Orthanc study)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    query = {"Level": "Series", "Query": {"Modality": "OT"}}
    for series_id in get(server, "/tools/find", query):  # type: ignore[union-attr]
        for instance in get(server, f"/series/{series_id}/instances"):  # type: ignore[union-attr]
            tags = get(server, f"/instances/{instance['ID']}/tags?simplify")
            study = get(server, f"/instances/{instance['ID']}/study")["ID"]  # type: ignore[index]
            for item in tags["SourceImageSequence"]:  # type: ignore[index]
                found.setdefault(item["ReferencedSOPInstanceUID"], []).append(
                    (tags["SOPInstanceUID"], study)  # type: ignore[index]
                )
    return found


def instance_count(server: LocalOrthanc) -> int:
    return int(get(server, "/statistics")["CountInstances"])  # type: ignore[index]


def watcher_args(state: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(PROJECT_ROOT / "watch_orthanc.py"),
        "--state-dir",
        str(state),
        "--cache-dir",
        str(cache_dir),
        "--workers",
        "1",
        *extra,
    ]


def run_once(
    server: LocalOrthanc, state: Path, cache_dir: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        watcher_args(state, cache_dir, "--once", *extra),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=orthanc_env(server),
        timeout=300,
    )


_followers: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_watcher_outlives_its_test() -> Iterator[None]:
    yield
    while _followers:
        process = _followers.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


class Follower:
    """watch_orthanc.py in its default mode, as a process group of its own."""

    def __init__(
        self,
        server: LocalOrthanc,
        state: Path,
        cache_dir: Path,
        log: Path,
        options: tuple[str, ...] = ("--poll-interval", "0.2"),
    ) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                watcher_args(state, cache_dir, *options),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                env=orthanc_env(server),
                start_new_session=True,
            )
        _followers.append(self.process)

    def kill(self) -> None:
        """``kill -9`` of the watcher and its reader processes, as a power cut would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def terminate(self, sig: int = signal.SIGTERM) -> tuple[int, float]:
        started = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(30)
        return code, time.monotonic() - started

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(condition, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def audit(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def test_once_backfills_each_image_once_and_leaves_everything_else_alone(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    images = make_copies(corpus_dir, tmp_path / "in", 3, per_study=2)
    others = [corpus_dir / "bad_ct_small.dcm", corpus_dir / "edge_cxr_corrupt_j2k_966.dcm"]
    answers = store(watched, images + others)
    state = tmp_path / "state"

    first = run_once(watched, state, weights_cache_dir)
    assert first.returncode == 1, first.stderr  # the undecodable DX is a failure...
    assert "edge" not in first.stderr and "Traceback" not in first.stderr
    dead = (state / "dead-letters.jsonl").read_text().splitlines()
    assert len(dead) == 1 and "cannot decode JPEG 2000" in dead[0]  # ...recorded once
    results = results_by_image(watched)
    for path, answer in zip(images, answers, strict=False):
        srs = results[uid_of(path)]
        assert len(srs) == 1, srs
        assert srs[0][1] == answer["ParentStudy"]  # in the image's own study
    assert set(results) == {uid_of(p) for p in images}  # CT and the broken DX: no result
    key_images = key_images_by_image(watched)
    for path, answer in zip(images, answers, strict=False):
        assert [study for _, study in key_images[uid_of(path)]] == [answer["ParentStudy"]]
    assert set(key_images) == set(results)
    count = instance_count(watched)
    assert count == 5 + 3 + 3  # the inputs, an SR and a key image each

    # Its own SRs are never candidates: the audit names source images only.
    sr_uids = {sr for srs in results.values() for sr, _ in srs}
    assert not sr_uids & {record["sop_instance_uid"] for record in audit(state)}

    second = run_once(watched, state, weights_cache_dir)
    assert second.returncode == 0, second.stderr  # the dead letter is not retried
    assert instance_count(watched) == count
    assert "0 classified" in second.stdout
    assert len((state / "dead-letters.jsonl").read_text().splitlines()) == 1

    # Without any state, the answer comes from Orthanc itself: nothing is stored again.
    fresh = run_once(watched, tmp_path / "other-state", weights_cache_dir)
    assert fresh.returncode == 1  # the broken DX fails again for a watcher that never saw it
    assert "3 already had results" in fresh.stdout, fresh.stdout
    assert instance_count(watched) == count

    retried = run_once(watched, state, weights_cache_dir, "--retry-failed")
    assert retried.returncode == 1 and "cannot decode" in retried.stderr
    assert instance_count(watched) == count


def test_follows_arrivals_and_survives_kill_9_with_exactly_one_result_each(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    log = tmp_path / "watch.log"
    images = make_copies(corpus_dir, tmp_path / "in", 12, per_study=2)
    uids = [uid_of(p) for p in images]
    rng = random.Random(7)

    follower = Follower(watched, state, weights_cache_dir, log)
    store(watched, images[:2])
    wait_for(lambda: set(uids[:2]) <= set(results_by_image(watched)), "the first SRs")
    # More arrive; the watcher is killed at random moments while it works on them.
    store(watched, images[2:8])
    for _ in range(3):
        time.sleep(rng.uniform(STABLE_AGE, STABLE_AGE + 6))
        follower.kill()
        follower = Follower(watched, state, weights_cache_dir, log)
    store(watched, images[8:])
    wait_for(lambda: set(uids) <= set(results_by_image(watched)), "an SR for every image")
    time.sleep(STABLE_AGE + 2)  # anything duplicated would arrive now
    code, seconds = follower.terminate()
    assert code == 0 and seconds < 10, (code, seconds, follower.text())
    results = results_by_image(watched)
    assert {uid: len(results[uid]) for uid in uids} == dict.fromkeys(uids, 1)
    assert set(results) == set(uids)
    key_images = key_images_by_image(watched)
    assert {uid: len(key_images[uid]) for uid in uids} == dict.fromkeys(uids, 1)
    assert "Traceback" not in follower.text()


def test_waits_out_an_orthanc_restart_and_stops_on_ctrl_c(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    log = tmp_path / "watch.log"
    images = make_copies(corpus_dir, tmp_path / "in", 4)
    follower = Follower(watched, state, weights_cache_dir, log)
    store(watched, images[:2])
    wait_for(lambda: len(results_by_image(watched)) == 2, "the first SRs")

    watched.kill()  # Orthanc crashes for longer than one request's retries last
    time.sleep(12)
    assert follower.process.poll() is None, follower.text()
    watched.start()
    store(watched, images[2:])
    wait_for(lambda: len(results_by_image(watched)) == 4, "SRs after the restart")
    text = follower.text()
    assert text.count("is unreachable") == 1, text  # logged once, not once per retry
    assert "answers again" in text

    code, seconds = follower.terminate(signal.SIGINT)
    assert code == 130 and seconds < 10, (code, seconds, follower.text())
    assert "Traceback" not in follower.text()
    results = results_by_image(watched)
    assert sorted(len(v) for v in results.values()) == [1, 1, 1, 1]


def test_systemd_unit_template_is_valid_and_runs_each_watcher_with_its_own_state(
    tmp_path: Path,
) -> None:
    """The template in deploy/ passes systemd's own checker for an instance, and each
    instance's ExecStart parses with a state folder of its own."""
    import shlex

    from tests.conftest import require_program

    analyze = require_program("systemd-analyze")
    text = (PROJECT_ROOT / "deploy" / "cxrsr-watch@.service").read_text()
    assert "StateDirectory=cxrsr-watch/%i\n" in text
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    sys.path.insert(0, str(PROJECT_ROOT))
    import watch_orthanc

    for instance in ("1", "ward-b"):
        argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%i", instance))
        assert argv[1] == "/opt/cxrsr/watch_orthanc.py"
        args = watch_orthanc.build_parser().parse_args(argv[2:])
        assert not args.once and str(args.state_dir) == f"/var/lib/cxrsr-watch/{instance}"
        assert str(args.cache_dir) == "/var/lib/cxrsr-watch/weights"

    # Checked where it would run: paths of this checkout, a user that exists here.
    local = (
        text.replace("/opt/cxrsr/.venv/bin/python", sys.executable)
        .replace("/opt/cxrsr", str(PROJECT_ROOT))
        .replace("User=cxrsr", "User=root")
        .replace("Group=cxrsr", "Group=root")
        .replace("EnvironmentFile=/etc", "EnvironmentFile=-/etc")
    )
    (tmp_path / "cxrsr-watch@.service").write_text(local)
    checked = subprocess.run(
        [analyze, "verify", str(tmp_path / "cxrsr-watch@ward-b.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


# -- exactly once: complete sets, claims, stops ----------------------------------------

#: Refuses every key image (Modality OT, Secondary Capture), as a Lua filter, a full
#: disk or a proxy error would make Orthanc refuse some objects of a result.
REFUSE_KEY_IMAGES_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'OT' then
    return false
  end
  return true
end
"""


def own_orthanc(tmp_path: Path, orthanc_binary: str, **overrides: object) -> LocalOrthanc:
    """An Orthanc of the test's own (a context manager) with more settings over the project's."""
    return LocalOrthanc(
        tmp_path / "orthanc",
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=orthanc_binary,
        overrides={"StableAge": STABLE_AGE, **overrides},
    )


def delete(server: LocalOrthanc, path: str) -> None:
    answer = requests.delete(
        f"{server.url}{path}", auth=(server.username, server.password), timeout=30
    )
    answer.raise_for_status()


def instance_id_of(server: LocalOrthanc, sop_instance_uid: str) -> str:
    answer = requests.post(
        f"{server.url}/tools/lookup",
        data=sop_instance_uid,
        auth=(server.username, server.password),
        timeout=30,
    )
    answer.raise_for_status()
    return next(item["ID"] for item in answer.json() if item["Type"] == "Instance")


def one_result_each(server: LocalOrthanc, uids: list[str]) -> None:
    """Exactly one SR and one key image per image, and nothing else derived."""
    results, key_images = results_by_image(server), key_images_by_image(server)
    assert {uid: len(results.get(uid, [])) for uid in uids} == dict.fromkeys(uids, 1), results
    assert {uid: len(key_images.get(uid, [])) for uid in uids} == dict.fromkeys(uids, 1)
    assert set(results) == set(key_images) == set(uids)


def test_refused_key_images_leave_no_sr_and_fail_until_a_dead_letter(
    tmp_path: Path, orthanc_binary: str, corpus_dir: Path, weights_cache_dir: Path
) -> None:
    lua = tmp_path / "refuse-key-images.lua"
    lua.write_text(REFUSE_KEY_IMAGES_LUA)
    images = make_copies(corpus_dir, tmp_path / "in", 2)
    uids = [uid_of(p) for p in images]
    state = tmp_path / "state"
    server = own_orthanc(tmp_path, orthanc_binary, LuaScripts=[str(lua)])
    with server:
        store(server, images)
        ids = [instance_id_of(server, uid) for uid in uids]
        first = run_once(server, state, weights_cache_dir, "--max-attempts", "2")
        assert first.returncode == 1, first.stderr
        assert "Traceback" not in first.stderr
        for orthanc_id in ids:  # each image named on an E: line
            assert any(
                line.startswith("E:") and orthanc_id in line and "not all stored" in line
                for line in first.stderr.splitlines()
            ), first.stderr
        assert results_by_image(server) == {}  # no SR without its key image
        assert instance_count(server) == 2

        # Not "present" now: tried again, and after --max-attempts a dead letter.
        second = run_once(server, state, weights_cache_dir, "--max-attempts", "2")
        assert second.returncode == 1, second.stderr
        assert "2 classified" in second.stdout, second.stdout
        dead = (state / "dead-letters.jsonl").read_text().splitlines()
        assert len(dead) == 2 and all("not all stored" in line for line in dead)
        third = run_once(server, state, weights_cache_dir, "--max-attempts", "2")
        assert third.returncode == 0, third.stderr
        assert "0 classified" in third.stdout  # not downloaded and classified forever
        assert results_by_image(server) == {}

        # The same Orthanc without the filter gets the complete set.
        server.stop()
        server.overrides.pop("LuaScripts")
        server.start()
        fixed = run_once(server, state, weights_cache_dir, "--retry-failed")
        assert fixed.returncode == 0, fixed.stderr
        one_result_each(server, uids)
        complete = instance_count(server)

        # Orthanc is asked before the watcher's own log: a key image deleted is stored
        # again (the same bytes: its SR is not duplicated)...
        key_image = key_images_by_image(server)[uids[0]][0][0]
        delete(server, f"/instances/{instance_id_of(server, key_image)}")
        again = run_once(server, state, weights_cache_dir)
        assert again.returncode == 0, again.stderr
        one_result_each(server, uids)
        assert instance_count(server) == complete

        # ...and a study deleted and sent again gets its results again.
        study = results_by_image(server)[uids[1]][0][1]
        delete(server, f"/studies/{study}")
        store(server, images[1:])
        resent = run_once(server, state, weights_cache_dir)
        assert resent.returncode == 0, resent.stderr
        assert "1 classified" in resent.stdout, resent.stdout
        one_result_each(server, uids)
        assert instance_count(server) == complete


def start_once(server: LocalOrthanc, state: Path, cache_dir: Path, log: Path) -> Follower:
    """watch_orthanc.py --once in the background (small batches), its output in ``log``."""
    return Follower(server, state, cache_dir, log, ("--once", "--batch-size", "2"))


def test_two_watchers_on_one_orthanc_store_one_result_per_image(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    images = make_copies(corpus_dir, tmp_path / "in", 12, per_study=3)
    uids = [uid_of(p) for p in images]

    # Started together.
    store(watched, images[:4])
    pair = [
        start_once(watched, tmp_path / f"state-a{n}", weights_cache_dir, tmp_path / f"a{n}.log")
        for n in range(2)
    ]
    codes = [w.process.wait(300) for w in pair]
    assert codes == [0, 0], [w.text() for w in pair]
    one_result_each(watched, uids[:4])

    # The second started while the first classifies.
    store(watched, images[4:])
    first = start_once(watched, tmp_path / "state-b0", weights_cache_dir, tmp_path / "b0.log")
    wait_for(lambda: "classifying" in first.text(), "the first watcher classifying")
    second = start_once(watched, tmp_path / "state-b1", weights_cache_dir, tmp_path / "b1.log")
    codes = [w.process.wait(300) for w in (first, second)]
    assert codes == [0, 0], (first.text(), second.text())
    one_result_each(watched, uids)
    assert "Traceback" not in first.text() + second.text()


def put_claim(server: LocalOrthanc, orthanc_id: str, claim: dict) -> None:
    answer = requests.put(
        f"{server.url}/instances/{orthanc_id}/metadata/cxrsr-claim",
        data=json.dumps(claim),
        auth=(server.username, server.password),
        timeout=30,
    )
    answer.raise_for_status()


def get_claim(server: LocalOrthanc, orthanc_id: str) -> dict:
    return get(server, f"/instances/{orthanc_id}/metadata/cxrsr-claim")  # type: ignore[return-value]


def test_a_live_claim_is_left_to_its_holder_and_an_expired_one_taken_over(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    images = make_copies(corpus_dir, tmp_path / "in", 2)
    uids = [uid_of(p) for p in images]
    store(watched, images)
    ids = [instance_id_of(watched, uid) for uid in uids]
    from cxrsr.model.classifier import load_classifier

    weights = load_classifier(
        "densenet121-res224-all", weights_cache_dir, "cpu", "eager", None
    ).card.weights_sha256
    # Another watcher holds the first image with a live lease; a killed one left the
    # second image's claim expired, with the classification time it had fixed.
    live = {
        "holder": "other-host:1:ab",
        "expires": time.time() + 3600,
        "state": "working",
        "classified_at": "2021-01-01T00:00:00+00:00",
        "weights_sha256": weights,
    }
    dead = {
        "holder": "killed-host:2:cd",
        "expires": time.time() - 5,
        "state": "working",
        "classified_at": "2020-02-03T04:05:06+00:00",
        "weights_sha256": weights,
    }
    put_claim(watched, ids[0], live)
    put_claim(watched, ids[1], dead)

    state = tmp_path / "state"
    first = run_once(watched, state, weights_cache_dir)
    assert first.returncode == 0, first.stderr
    assert "1 left to another watcher" in first.stdout, first.stdout
    results = results_by_image(watched)
    assert set(results) == {uids[1]}
    sr = get(watched, f"/instances/{instance_id_of(watched, results[uids[1]][0][0])}/tags?simplify")
    assert sr["ContentDate"] == "20200203" and sr["ContentTime"].startswith("040506")  # type: ignore[index]
    assert get_claim(watched, ids[1])["state"] == "done"
    assert get_claim(watched, ids[0]) == live  # untouched

    # The holder of the first dies: once its lease expires, the claim is taken over.
    with requests.Session() as session:
        session.auth = (watched.username, watched.password)
        url = f"{watched.url}/instances/{ids[0]}/metadata/cxrsr-claim"
        etag = session.get(url, timeout=30).headers["ETag"]
        expired = {**live, "expires": time.time() - 1}
        answer = session.put(url, data=json.dumps(expired), headers={"If-Match": etag}, timeout=30)
        answer.raise_for_status()
    second = run_once(watched, state, weights_cache_dir)
    assert second.returncode == 0, second.stderr
    one_result_each(watched, uids)
    sr = get(
        watched,
        f"/instances/{instance_id_of(watched, results_by_image(watched)[uids[0]][0][0])}/tags?simplify",
    )
    assert sr["ContentDate"] == "20210101"  # type: ignore[index]


def test_an_orthanc_without_claims_is_named_once_and_the_watcher_works_alone(
    tmp_path: Path, orthanc_binary: str, corpus_dir: Path, weights_cache_dir: Path
) -> None:
    images = make_copies(corpus_dir, tmp_path / "in", 2)
    with own_orthanc(tmp_path, orthanc_binary, CheckRevisions=False) as server:
        store(server, images)
        done = run_once(server, tmp_path / "state", weights_cache_dir)
        assert done.returncode == 0, done.stderr
        warnings = [line for line in done.stderr.splitlines() if "has no claims" in line]
        assert len(warnings) == 1 and warnings[0].startswith("W:"), done.stderr
        one_result_each(server, [uid_of(p) for p in images])


def test_ctrl_c_and_sigterm_during_classification_stop_within_10_s(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    images = make_copies(corpus_dir, tmp_path / "in", 24, per_study=4)
    uids = [uid_of(p) for p in images]
    store(watched, images)
    state = tmp_path / "state"
    for sig, expected in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
        log = tmp_path / f"watch-{sig.name}.log"
        follower = start_once(watched, state, weights_cache_dir, log)
        wait_for(lambda: "classifying" in follower.text(), "classification to start")  # noqa: B023
        code, seconds = follower.terminate(sig)
        assert code == expected and seconds < 10, (sig, code, seconds, follower.text())
        assert "Traceback" not in follower.text()
        # Whatever was stored is complete: no SR without its key image.
        results, key_images = results_by_image(watched), key_images_by_image(watched)
        assert set(results) <= set(key_images)
    # Nothing finished was lost, nothing is duplicated: a last run completes the rest.
    last = run_once(watched, state, weights_cache_dir)
    assert last.returncode == 0, last.stderr
    one_result_each(watched, uids)


# -- health ----------------------------------------------------------------------------


def check_health(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "watch_orthanc.py"), "--check-health",
         "--state-dir", str(state)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip


def test_check_health_is_fresh_while_the_watcher_runs_and_fails_once_it_is_stale(
    watched: LocalOrthanc, weights_cache_dir: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    missing = check_health(state)
    assert missing.returncode == 1 and "no heartbeat" in missing.stderr, missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and missing.stderr.startswith("E:")

    follower = Follower(watched, state, weights_cache_dir, tmp_path / "watch.log",
                        ("--poll-interval", "5"))  # fmt: skip
    heartbeat = state / "heartbeat.json"
    wait_for(heartbeat.exists, "the first heartbeat")
    first = json.loads(heartbeat.read_text())
    assert first["pid"] == follower.process.pid and first["stale_after"] == 60
    healthy = check_health(state)
    assert healthy.returncode == 0, healthy.stderr
    # It keeps beating at every turn of its loop (every 5 s here).
    wait_for(lambda: json.loads(heartbeat.read_text())["time"] > first["time"], "a new heartbeat")

    follower.kill()
    stale = dict(json.loads(heartbeat.read_text()), time=time.time() - 61)
    heartbeat.write_text(json.dumps(stale))
    dead = check_health(state)
    assert dead.returncode == 1, dead.stdout
    assert dead.stderr.startswith("E:") and "61 s old" in dead.stderr, dead.stderr
    assert len(dead.stderr.strip().splitlines()) == 1


# -- reconciliation ----------------------------------------------------------------------


def test_the_cheap_sweep_asks_only_about_series_not_found_complete(
    watched: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """After a full sweep, the cheap sweep costs two requests for complete series; a new
    series is still found, a deleted result waits for the next full sweep."""
    from cxrsr.config import OrthancSettings
    from cxrsr.model.classifier import load_classifier
    from cxrsr.pacs.orthanc import OrthancClient
    from cxrsr.pacs.watch import Watcher
    from cxrsr.pacs.watch_state import WatchState

    images = make_copies(corpus_dir, tmp_path / "in", 3)
    uids = [uid_of(p) for p in images]
    store(watched, images[:2])
    client = OrthancClient(OrthancSettings(watched.url, watched.username, watched.password))
    classifier = load_classifier(cache_dir=weights_cache_dir, backend="eager", device="cpu")
    state = WatchState.open(tmp_path / "state", classifier.card.weights_sha256)
    watcher = Watcher(client, classifier, state)
    requests_sent: list[str] = []
    send = client.request

    def counting(method: str, path: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        requests_sent.append(f"{method} {path}")
        return send(method, path, *args, **kwargs)

    client.request = counting  # type: ignore[method-assign]
    try:
        assert watcher.reconcile().stored == 2
        # Series are complete once a look finds them so (here the next sweep's).
        assert watcher.reconcile(full=False).known == 2
        requests_sent.clear()
        cheap = watcher.reconcile(full=False)
        assert (cheap.known, cheap.classified) == (0, 0)
        assert requests_sent == ["POST /tools/find"] * 2, requests_sent

        store(watched, images[2:])  # a series the change log would report: found anyway
        assert watcher.reconcile(full=False).stored == 1
        one_result_each(watched, uids)
        watcher.reconcile(full=False)

        # A result deleted from Orthanc (its SR and key image).
        for found in (results_by_image(watched), key_images_by_image(watched)):
            delete(watched, f"/instances/{instance_id_of(watched, found[uids[0]][0][0])}")
        assert watcher.reconcile(full=False).stored == 0
        full = watcher.reconcile()
        assert (full.stored, full.known) == (1, 2)
        one_result_each(watched, uids)
    finally:
        state.close()
