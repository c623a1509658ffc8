"""``python -m cxrsr.demo`` (``./run.sh --demo``) against a local server with GitHub's raw
layout, serving the shared corpus's copies of the demo files. No test touches the internet."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxrsr.config import PROJECT_ROOT
from cxrsr.demo import DEMO_FILES, DemoFile, fetch_demo
from tests.local_http import serve_folder

#: The corpus copy of each demo file (MANIFEST.tsv names their sources).
CORPUS_COPY = {
    "cxr_nema_cr_jpegls.dcm": "cxr04_nema_RG1_JLSN.dcm",
    "cxr_canon_dx_j2k.dcm": "cxr05_dx_canon_966_fixed_j2kr.dcm",
    "cxr_nih_dx.dcm": "cxr10_nih_dx_8bit.dcm",
    "cxr_siim_cr_jpeg.dcm": "cxr11_siim_cr_jpeg8.dcm",
}


@pytest.fixture
def mirror(tmp_path: Path, corpus_dir: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A local HTTP server on loopback: (base URL, its document root, requested paths)."""
    root = tmp_path / "www"
    for demo in DEMO_FILES:
        target = root / demo.repository / demo.commit / demo.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus_dir / CORPUS_COPY[demo.name], target)
    with serve_folder(root) as (url, requested):
        yield url, root, requested


def run_demo(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrsr.demo", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )


def test_pinned_digests_are_the_corpus_files(
    corpus_dir: Path, manifest: list[dict[str, str]]
) -> None:
    by_name = {row["filename"]: row for row in manifest}
    for demo in DEMO_FILES:
        copy = corpus_dir / CORPUS_COPY[demo.name]
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == demo.sha256
        row = by_name[copy.name]
        assert demo.sha256.startswith(row["sha256_12"])
        # The pinned source is the one the corpus names: repository, commit and path.
        assert f"{demo.repository}@{demo.commit} {demo.path}" in row["source"]


def test_download_checks_each_file_prints_licences_and_reruns_fetch_nothing(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base_url, _, requested = mirror
    target = tmp_path / "data" / "demo"
    first = run_demo("--dir", target, "--base-url", base_url)
    assert first.returncode == 0, first.stderr
    assert f"4 demo files in {target} (4 downloaded, 0 already there), 0 failed" in first.stdout
    for demo in DEMO_FILES:
        assert hashlib.sha256((target / demo.name).read_bytes()).hexdigest() == demo.sha256
        assert f"I: {demo.name}: " in first.stderr and demo.licence in first.stderr
    assert len(requested) == 4
    second = run_demo("--dir", target, "--base-url", base_url)
    assert second.returncode == 0, second.stderr
    assert "(0 downloaded, 4 already there), 0 failed" in second.stdout
    assert len(requested) == 4  # nothing fetched again


def test_wrong_digest_and_missing_file_fail_alone(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base_url, root, _ = mirror
    tampered, missing = DEMO_FILES[0], DEMO_FILES[1]
    tampered_path = root / tampered.repository / tampered.commit / tampered.path
    data = bytearray(tampered_path.read_bytes())
    data[-1] ^= 0xFF
    tampered_path.write_bytes(bytes(data))
    (root / missing.repository / missing.commit / missing.path).unlink()
    target = tmp_path / "demo"
    done = run_demo("--dir", target, "--base-url", base_url)
    assert done.returncode == 1
    bad_digest = hashlib.sha256(bytes(data)).hexdigest()
    assert (
        f"E: {tampered.name}: {tampered.url(base_url)}: SHA-256 {bad_digest} is not the pinned "
        f"{tampered.sha256}; not saved"
    ) in done.stderr
    assert f"E: {missing.name}: {missing.url(base_url)}: HTTP 404" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in target.iterdir()) == sorted(d.name for d in DEMO_FILES[2:])
    assert "2 demo files" in done.stdout and "2 failed" in done.stdout


def test_a_damaged_local_copy_is_replaced(
    mirror: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base_url, _, requested = mirror
    demo = DEMO_FILES[3]
    (tmp_path / demo.name).write_bytes(b"half a file")
    outcome = fetch_demo(tmp_path, base_url, [demo])
    assert outcome.downloaded == [tmp_path / demo.name] and not outcome.failed
    assert hashlib.sha256((tmp_path / demo.name).read_bytes()).hexdigest() == demo.sha256
    assert requested == ["/" + demo.url(base_url).split("/", 3)[3]]


def test_nothing_fetched_is_exit_3_and_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    done = run_demo("--dir", tmp_path, "--base-url", "http://127.0.0.1:9/")
    assert done.returncode == 3
    assert done.stderr.count("E: ") == len(DEMO_FILES) and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def test_urls_follow_githubs_raw_layout() -> None:
    demo = DemoFile("a.dcm", "o/r", "c" * 40, "Test Data/x y.dcm", "0" * 64, "MIT", "x")
    assert demo.url("https://raw.githubusercontent.com/") == (
        f"https://raw.githubusercontent.com/o/r/{'c' * 40}/Test%20Data/x%20y.dcm"
    )
