"""process_dicom.py --engine ray on a local Ray over the shared corpus: the same results as
the local engine, in shards; a killed actor and a killed driver cost only their work.

One small Ray (2 CPUs, no dashboard, loopback) serves the whole module; each run of
process_dicom.py joins it with ``--ray-address``, as a cluster's driver would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_valid_results, missing_prerequisite, run_script, sr_files

from cxrsr.config import PROJECT_ROOT

#: Seconds any one run may take on a loaded 2-core machine.
RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray for this module: 2 CPUs, no dashboard, loopback only."""
    try:
        import ray
    except ImportError:
        missing_prerequisite("ray is not installed (requirements-ray.txt; test.sh installs it)")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def ray_args(address: str, out: Path, cache_dir: Path, *more: str | Path) -> list[str | Path]:
    return [
        "--engine",
        "ray",
        "--ray-address",
        address,
        "-o",
        out,
        "--cache-dir",
        cache_dir,
        "-q",
        *more,
    ]


def dump(path: Path) -> list[dict[str, Any]]:
    """``python -m cxrsr.results dump PATH``: every entry, one JSON object a line."""
    proc = subprocess.run(
        [sys.executable, "-m", "cxrsr.results", "dump", str(path)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_same_results(local: list[dict[str, Any]], ray: list[dict[str, Any]]) -> None:
    """Same files in the same order; same status, reason, findings and warnings; scores
    within 1e-6."""
    assert [e["path"] for e in ray] == [e["path"] for e in local]
    for a, b in zip(local, ray, strict=True):
        for key in ("status", "reason", "findings", "warnings", "sop_instance_uid", "file"):
            assert a.get(key) == b.get(key), (a["path"], key)
        assert a.get("scores", {}).keys() == b.get("scores", {}).keys()
        for label, score in a.get("scores", {}).items():
            assert abs(score - b["scores"][label]) <= 1e-6, (a["path"], label)
        assert bool(a.get("heatmaps")) == bool(b.get("heatmaps")), a["path"]


@pytest.fixture(scope="module")
def local_results(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("local") / "results.json"
    proc = run_script("process_dicom.py", corpus_dir, "-o", out, "--cache-dir", weights_cache_dir)
    assert proc.returncode == 1, proc.stderr  # the corpus holds undecodable files
    return dump(out)


@pytest.fixture(scope="module")
def ray_run(
    ray_address: str,
    corpus_dir: Path,
    weights_cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("ray") / "results.json"
    args = ray_args(ray_address, out, weights_cache_dir, "--shard-size", "4")
    proc = run_script("process_dicom.py", corpus_dir, *args, timeout=RUN_TIMEOUT)
    return proc, out


def test_ray_engine_gives_the_local_engines_results(ray_run, local_results) -> None:
    proc, out = ray_run
    assert proc.returncode == 1, proc.stderr  # as the local engine: failed files
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip().endswith(f"(6 shards in {out.parent / 'results.d'})")
    assert_same_results(local_results, dump(out))


def test_results_are_shards_a_manifest_and_a_parquet_table(ray_run, local_results) -> None:
    import pyarrow.parquet as pq

    _, out = ray_run
    manifest = assert_valid_results(out)  # and every shard entry against the schema
    assert manifest["format"] == "cxrsr-results-sharded/1"
    assert manifest["shards"] == [f"results.d/part-{n:05d}.jsonl" for n in range(6)]
    assert manifest["count"] == len(local_results) and "complete" not in manifest
    table = pq.read_table(out.parent / manifest["parquet"]).to_pylist()
    assert [row["path"] for row in table] == [e["path"] for e in local_results]
    for row, entry in zip(table, local_results, strict=True):
        assert row["status"] == entry["status"] and row["reason"] == entry.get("reason")
        for label in manifest["model"]["labels"]:
            assert row[label] == entry.get("scores", {}).get(label)


def test_generate_sr_reads_sharded_results(ray_run, local_results, tmp_path) -> None:
    _, out = ray_run
    proc = run_script("generate_sr.py", "--results", out, "--output-dir", tmp_path / "sr", "-q")
    assert proc.returncode == 0, proc.stderr
    # Every classified entry has its SR. Entries that are the same instance (the corpus has
    # pairs sharing a SOP Instance UID, such as cxr07 and cxr08 with the same pixels) may
    # make one SR between them, byte for byte, when all of the SR's content agrees, down to
    # the second of classification: so the count lies between UIDs and entries.
    import pydicom

    classified = [e for e in dump(out) if e["status"] == "classified"]
    assert len(classified) == len([e for e in local_results if e["status"] == "classified"])
    srs = [pydicom.dcmread(path) for path in sr_files(tmp_path / "sr")]
    referenced = {
        sop.ReferencedSOPInstanceUID
        for sr in srs
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    uids = {e["sop_instance_uid"] for e in classified}
    assert uids <= referenced, proc.stderr
    assert len(uids) <= len(srs) <= len(classified), proc.stderr
    assert (out.parent / "report.html").is_file(), proc.stderr


def test_dump_prints_any_results_format(ray_run, tmp_path) -> None:
    _, out = ray_run
    entries = dump(out)
    shard = out.parent / "results.d" / "part-00000.jsonl"
    assert dump(shard) == entries[:4]
    legacy = tmp_path / "results.json"
    model = json.loads(out.read_text())["model"]
    legacy.write_text(json.dumps({"format": "cxrsr-results/1", "model": model, "images": entries}))
    assert dump(legacy) == entries


def _part_files(folder: Path) -> dict[str, int]:
    try:
        return {p.name: p.stat().st_ino for p in folder.glob("part-*.jsonl")}
    except FileNotFoundError:
        return {}


def _wait_for(condition: Any, proc: subprocess.Popen[str], what: str, timeout: float) -> None:
    """Wait until ``condition()`` holds while ``proc`` runs (polling: a file appearing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _actor_pids() -> list[int]:
    """The processes of the model actors (Ray names them after their class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ClassifyBatches" in title and b"ray::" in title:
                pids.append(int(entry.name))
    return pids


def test_killed_driver_then_killed_actor_cost_only_their_work(
    ray_address, corpus_dir, weights_cache_dir, local_results, tmp_path
) -> None:
    """kill -9 of the driver at about half the shards: the same command again keeps every
    finished shard as it is, redoes the rest; an actor killed during that rerun costs only
    a retry of its batch. The results are the local engine's."""
    out = tmp_path / "results.json"
    folder = tmp_path / "results.d"
    args = ray_args(ray_address, out, weights_cache_dir, "--shard-size", "2", "--batch-size", "2")
    command = [sys.executable, str(PROJECT_ROOT / "process_dicom.py"), str(corpus_dir)]
    command += list(map(str, args))
    shards = (len(local_results) + 1) // 2
    first = subprocess.Popen(command, cwd=PROJECT_ROOT, text=True, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(_part_files(folder)) >= shards // 2, first, "half the shards", 240)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=60)
    finished = _part_files(folder)
    assert shards // 2 <= len(finished) < shards
    assert not out.exists()  # the manifest is written at the end only

    second = subprocess.Popen(command, cwd=PROJECT_ROOT, text=True, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: len(_part_files(folder)) > len(finished), second, "a new shard", 240)
        victims = _actor_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, stderr = second.communicate(timeout=RUN_TIMEOUT)
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate(timeout=60)
    assert second.returncode == 1, stderr
    assert victims, "no model actor found to kill"
    assert "lost:" not in stderr
    assert_valid_results(out)
    assert_same_results(local_results, dump(out))
    now = _part_files(folder)
    # Finished shards are kept as they are (the same file), except those holding a failure
    # (tried again, as the local engine tries failed files again) and those whose entries
    # gained a shared-UID note once the other file's shard was finished.
    kept = 0
    for name, inode in finished.items():
        text = (folder / name).read_text()
        if '"failed":' in text.splitlines()[0] or " is also used by " in text:
            continue
        assert now[name] == inode, f"{name} was written again"
        kept += 1
    assert kept >= 2
    assert not list(folder.glob(".*.tmp"))


#: A few corpus files, in name order: skipped, classified and failed ones, none sharing
#: its SOP Instance UID with another corpus file. A marked copy of cxr09 joins them
#: fourth, sharing its shard and its decoding task with cxr10.
FEW = [
    "bad_ct_small.dcm",
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr10_nih_dx_8bit.dcm",
    "edge_cxr_corrupt_j2k_966.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
]
MARKED_COPY_OF = "cxr09_orthanc_issue44_mono1_jpeg8.dcm"


def few_files(corpus_dir: Path, folder: Path, mark: str) -> Path:
    """Hard links to :data:`FEW` in ``folder``, and one to cxr09 named with ``mark``
    (returned): same sizes and times as the corpus files, so the same ``file`` marks."""
    folder.mkdir()
    for name in FEW:
        os.link(corpus_dir / name, folder / name)
    marked = folder / f"cxr10b-{mark}.dcm"
    os.link(corpus_dir / MARKED_COPY_OF, marked)
    return marked


def local_entries_for(local: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """The local engine's entries of :func:`few_files`' files (the marked one as cxr09's)."""
    by_name = {Path(e["path"]).name: e for e in local}
    entries = []
    for path in sorted(folder.glob("*.dcm")):
        name = MARKED_COPY_OF if path.name.startswith("cxr10b-") else path.name
        entries.append({**by_name[name], "path": str(path)})
    return entries


def faulty_command(mode: str, *args: str | Path) -> list[str]:
    """process_dicom.py whose Ray engine decodes with ``tests/ray_faults.py``'s ``mode``."""
    code = "import ray_faults; ray_faults.main()"
    return [sys.executable, "-c", code, mode, *map(str, args)]


def faulty_env() -> dict[str, str]:
    """The tests folder on the driver's path, which it hands on to its Ray workers."""
    paths = [str(Path(__file__).parent), str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def test_a_decoder_crashing_on_one_file_fails_only_that_file(
    ray_address, corpus_dir, weights_cache_dir, local_results, tmp_path
) -> None:
    """A decode worker that dies (SIGSEGV) on one file every time: Ray runs its task again
    RETRIES times; then that file fails with the reason, alone, as in the local engine.
    Every other file's entry is the local engine's, and every shard is written."""
    from ray_faults import CRASH_MARK, attempts_log

    from cxrsr.engines.ray_engine import RETRIES

    crash = few_files(corpus_dir, tmp_path / "in", CRASH_MARK)
    out = tmp_path / "results.json"
    args = ray_args(ray_address, out, weights_cache_dir, "--shard-size", "2", "--batch-size", "2")
    proc = subprocess.run(
        faulty_command("crash", tmp_path / "in", *args),
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=faulty_env(),
        timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "lost:" not in proc.stderr, proc.stderr
    reason = "reader process died (signal 11, SIGSEGV) while reading"
    assert [line for line in proc.stderr.splitlines() if str(crash) in line] == [
        f"E: {crash}: {reason}"
    ], proc.stderr
    expected = local_entries_for(local_results, tmp_path / "in")
    for entry in expected:
        if entry["path"] == str(crash):
            mark = entry["file"]
            entry.clear()
            entry.update({"path": str(crash), "status": "failed", "reason": reason, "file": mark})
    assert_valid_results(out)
    assert_same_results(expected, dump(out))
    assert sorted(p.name for p in (tmp_path / "results.d").glob("part-*.jsonl")) == [
        f"part-{n:05d}.jsonl" for n in range(3)
    ]
    # Ray's tries with its task's other file, then one alone.
    assert len(attempts_log(str(crash)).read_text().split()) == RETRIES + 2


def _decode_worker(pid: int) -> bool:
    """Whether ``pid`` is a Ray worker running a decoding task (titled after its function)."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ray::" in title and b"decode_row" in title


def test_a_decode_worker_killed_once_costs_only_a_retry(
    ray_address, corpus_dir, weights_cache_dir, local_results, tmp_path
) -> None:
    """kill -9 of a decode worker busy with a file: Ray runs its task again, and the
    results are the local engine's."""
    from ray_faults import SLOW_MARK, attempts_log

    slow = few_files(corpus_dir, tmp_path / "in", SLOW_MARK)
    out = tmp_path / "results.json"
    args = ray_args(ray_address, out, weights_cache_dir, "--shard-size", "2", "--batch-size", "2")
    command = faulty_command("slow", tmp_path / "in", *args)
    run = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=faulty_env(), text=True, stderr=subprocess.PIPE
    )
    log = attempts_log(str(slow))
    try:
        _wait_for(lambda: log.is_file() and log.read_text().strip(), run, "the slow file", 240)
        victim = int(log.read_text().split()[0])
        assert _decode_worker(victim), f"process {victim} is no Ray decode worker"
        os.kill(victim, signal.SIGKILL)
        _, stderr = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate(timeout=60)
    assert run.returncode == 1, stderr  # the corpus's corrupt file
    assert "Traceback" not in stderr and "lost:" not in stderr, stderr
    assert_valid_results(out)
    assert_same_results(local_entries_for(local_results, tmp_path / "in"), dump(out))
    tries = log.read_text().split()
    assert len(tries) == 2 and tries[0] != tries[1]


def test_a_cluster_that_does_not_answer_exits_3(corpus_dir, weights_cache_dir, tmp_path) -> None:
    import socket

    with socket.socket() as unused:  # a loopback port where nothing listens
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    out = tmp_path / "results.json"
    args = ray_args(address, out, weights_cache_dir)
    proc = run_script("process_dicom.py", corpus_dir / "cxr11_siim_cr_jpeg8.dcm", *args, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith(f"E: cannot reach the Ray cluster at {address}: ")
    assert "Traceback" not in proc.stderr and not out.exists()


def test_the_local_engine_resumes_from_sharded_results(
    ray_run, corpus_dir, weights_cache_dir, local_results, tmp_path
) -> None:
    """A local run over the Ray engine's results keeps their unchanged entries (read from
    the shards), and writes one results file."""
    import shutil

    _, out = ray_run
    shutil.copytree(out.parent, tmp_path / "out")
    results = tmp_path / "out" / "results.json"
    proc = run_script(
        "process_dicom.py", corpus_dir, "-o", results, "--cache-dir", weights_cache_dir
    )
    assert proc.returncode == 1, proc.stderr
    kept = sum(e["status"] != "failed" for e in local_results)
    assert f"({kept} kept from an earlier run)" in proc.stdout
    document = json.loads(results.read_text())
    assert document["format"] == "cxrsr-results/1"
    assert_same_results(local_results, document["images"])


@pytest.mark.parametrize(
    ("shard", "reason"),
    [
        ("results.d/part-00000.jsonl", "shard results.d/part-00000.jsonl is missing"),
        ("../elsewhere.jsonl", "not a valid results manifest: shards: a shard outside"),
    ],
)
def test_a_broken_manifest_is_one_usage_error(tmp_path, shard: str, reason: str) -> None:
    """A manifest naming a missing shard, or one outside its folder, is refused with one
    line (exit 2) by every reader: dump here, generate_sr.py through the same loader."""
    manifest = tmp_path / "results.json"
    model = {"weights": "w", "weights_sha256": "0" * 64, "torchxrayvision": "1.5.7", "labels": []}
    manifest.write_text(
        json.dumps({"format": "cxrsr-results-sharded/1", "model": model, "shards": [shard]})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cxrsr.results", "dump", str(manifest)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"E: {manifest}: {reason}")
    assert proc.stderr.count("\n") == 1 and not proc.stdout
