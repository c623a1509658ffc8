"""Session fixtures shared by every test: the shared corpus, a real Orthanc, model weights.

Integration fixtures skip on a developer machine that lacks a prerequisite, but fail
when ``CI`` is set: CI always has the corpus, Orthanc and the validators (test.sh
installs them), so a skip there would hide a broken setup.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cxrsr.config import PROJECT_ROOT
from cxrsr.pacs.local_orthanc import LocalOrthanc, find_orthanc_binary

CORPUS_DIR = PROJECT_ROOT.parent / "shared" / "cxr-corpus"

# Tests (and the scripts they start) must not read a developer's .env or Orthanc settings.
os.environ["CXRSR_DOTENV"] = os.devnull
for _name in ("ORTHANC_URL", "ORTHANC_USERNAME", "ORTHANC_PASSWORD"):
    os.environ.pop(_name, None)
# No test may download weights from the internet by accident: a download goes to a loopback
# port where nothing listens (refused at once) unless a test serves the weights itself.
os.environ["CXRSR_WEIGHTS_BASE_URL"] = "http://127.0.0.1:9/weights"
WEIGHTS_NAME = "densenet121-res224-all"


def missing_prerequisite(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a broken setup, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not (CORPUS_DIR / "MANIFEST.tsv").is_file():
        missing_prerequisite(f"shared corpus not found at {CORPUS_DIR}")
    return CORPUS_DIR


@pytest.fixture(scope="session")
def manifest(corpus_dir: Path) -> list[dict[str, str]]:
    """MANIFEST.tsv rows: filename, expected, and the file's properties."""
    with open(corpus_dir / "MANIFEST.tsv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def run_script(
    script: str, *args: str | Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run one of the project's scripts as a user would: a real process, from the project root.

    A results file that process_dicom.py writes is checked against the published JSON
    Schema (:func:`assert_valid_results`), so every run of every test checks the format.
    """
    before = _results_outputs(script, args)
    journals = {path: _stamp(_journal(path)) for path in before}
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=timeout,
    )
    for path, stamp in before.items():
        if _stamp(path) not in (None, stamp):  # written by this run
            assert_valid_results(path)
        if _stamp(_journal(path)) not in (None, journals[path]):  # left by a failed run
            assert_valid_journal(_journal(path))
    return proc


RESULTS_SCHEMA = PROJECT_ROOT / "docs" / "results.schema.json"


def results_validator(definition: str | None = None) -> Any:
    """A JSON Schema validator of the committed results schema (``docs/results.schema.json``),
    or of one of its definitions (``ModelRecord``, ...)."""
    import jsonschema

    schema = json.loads(RESULTS_SCHEMA.read_text(encoding="utf-8"))
    if definition == "ResultsEntry":  # an item of ``images``
        del schema["$ref"]
        schema |= schema["$defs"]["ResultsDocument"]["properties"]["images"]["items"]
    elif definition is not None:
        schema["$ref"] = f"#/$defs/{definition}"
    return jsonschema.Draft202012Validator(schema)


def assert_valid_journal(path: Path) -> None:
    """Check each line of a results journal: a model line's ``model`` and each ``entry``."""
    models, entries = results_validator("ModelRecord"), results_validator("ResultsEntry")
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # an empty line, or a line a killed run tore: readers pass over it
        assert isinstance(record, dict), f"{path}: line {number} is not an object"
        validator, value = (
            (models, record.get("model"))
            if "model" in record
            else (
                entries,
                record.get("entry"),
            )
        )
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, f"{path}: line {number} does not match the schema: {errors[:3]}"


def _journal(results: Path) -> Path:
    return results.with_name(results.name + ".journal")


def assert_valid_results(path: Path) -> dict[str, Any]:
    """Check the results file at ``path`` against the published schema; return it, parsed."""
    from jsonschema.exceptions import best_match

    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if document.get("format") == "cxrsr-results-sharded/1":  # a sharded run's manifest
        assert_valid_shards(path, document)
        return document
    error = best_match(results_validator().iter_errors(document))
    if error is not None:
        # For an entry (oneOf), what each variant found wrong; the entry itself is long.
        reasons = sorted({sub.message[:150] for sub in error.context}) or [error.message[:300]]
        where = "/".join(map(str, error.absolute_path))
        raise AssertionError(
            f"{path} does not match {RESULTS_SCHEMA.name}: {where}: {'; '.join(reasons)}"
        )
    return document


def assert_valid_shards(path: Path, manifest: dict[str, Any]) -> None:
    """Check a sharded run's manifest: its model block, and each shard's header model and
    entries, against the published schema (the entries are those of a results file)."""
    models, entries = results_validator("ModelRecord"), results_validator("ResultsEntry")
    errors = [e.message for e in models.iter_errors(manifest.get("model"))]
    assert not errors, f"{path}: model does not match the schema: {errors[:3]}"
    for name in manifest["shards"]:
        shard = Path(path).parent / name
        lines = shard.read_bytes().splitlines()
        header = json.loads(lines[0])
        assert header["format"] == "cxrsr-shard/1" and header["count"] == len(lines) - 1, shard
        errors = [e.message for e in models.iter_errors(header["model"])]
        assert not errors, f"{shard}: header model does not match the schema: {errors[:3]}"
        for number, raw in enumerate(lines[1:], start=2):
            errors = [e.message for e in entries.iter_errors(json.loads(raw))]
            assert not errors, f"{shard}: line {number} does not match the schema: {errors[:3]}"


def _results_outputs(
    script: str, args: Sequence[str | Path]
) -> dict[Path, tuple[int, int, int] | None]:
    """The results file a process_dicom.py command line names, with its stamp before the run."""
    if Path(script).name != "process_dicom.py":
        return {}
    words = list(map(str, args))
    outputs = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-o", "--output")]
    outputs += [word.split("=", 1)[1] for word in words if word.startswith("--output=")]
    paths = [PROJECT_ROOT / name for name in outputs]
    return {path: _stamp(path) for path in paths}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size) if path.is_file() else None


def process_files(
    out: Path, cache_dir: Path, *inputs_and_options: str | Path
) -> subprocess.CompletedProcess[str]:
    """process_dicom.py on the inputs into the results file ``out`` with the tests' weights;
    it must exit 0."""
    proc = run_script("process_dicom.py", *inputs_and_options, "-o", out, "--cache-dir", cache_dir)
    assert proc.returncode == 0, proc.stderr
    return proc


#: SOP Class UIDs of the Structured Report family (PS3.4 B.5).
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def sr_files(folder: Path) -> list[Path]:
    """The SRs among generate_sr.py's outputs, in name order (key images sit beside them)."""
    import pydicom

    return [
        path
        for path in sorted(Path(folder).glob("*.dcm"))
        if str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID).startswith(
            SR_SOP_CLASS_PREFIX
        )
    ]


def orthanc_env(server: LocalOrthanc) -> dict[str, str]:
    """This process's environment plus the Orthanc URL and credentials of ``server``."""
    return dict(
        os.environ,
        ORTHANC_URL=server.url,
        ORTHANC_USERNAME=server.username,
        ORTHANC_PASSWORD=server.password,
    )


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing_prerequisite(f"{name} not installed (test.sh installs it)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def orthanc_binary() -> str:
    binary = find_orthanc_binary()
    if binary is None:
        missing_prerequisite("no Orthanc binary (test.sh installs Debian's orthanc package)")
    assert binary is not None
    return binary


@pytest.fixture(scope="session")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, orthanc_binary: str
) -> Iterator[LocalOrthanc]:
    """One real Orthanc for the whole test session, from the project's orthanc.json.

    Tests that need an empty server or must stop it start their own ``LocalOrthanc``.
    """
    with new_orthanc(tmp_path_factory.mktemp("orthanc"), orthanc_binary) as server:
        yield server


@pytest.fixture
def empty_orthanc(tmp_path: Path, orthanc_binary: str) -> Iterator[LocalOrthanc]:
    """An Orthanc of the test's own: empty at the start, free to be stopped and restarted."""
    with new_orthanc(tmp_path / "orthanc", orthanc_binary) as server:
        yield server


@pytest.fixture
def md5less_orthanc(tmp_path: Path, orthanc_binary: str) -> Iterator[LocalOrthanc]:
    """An empty Orthanc of the test's own that keeps no MD5 of stored files: the project's
    orthanc.json with ``"StoreMD5ForAttachments": false``, a documented Orthanc setting.

    Orthanc 1.10 refuses to start with that and ``"CheckRevisions": true`` (revisions are
    MD5s), so such an Orthanc has no revisions: watchers there work alone (no claims)."""
    with LocalOrthanc(
        tmp_path / "orthanc-md5less",
        "cxrsr-test",
        secrets.token_urlsafe(16),
        binary=orthanc_binary,
        overrides={"StoreMD5ForAttachments": False, "CheckRevisions": False},
    ) as server:
        yield server


def new_orthanc(workdir: Path, binary: str) -> LocalOrthanc:
    """A LocalOrthanc from the project's orthanc.json with a random password (a context manager)."""
    return LocalOrthanc(workdir, "cxrsr-test", secrets.token_urlsafe(16), binary=binary)


@pytest.fixture(scope="session")
def weights_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding a randomly initialised DenseNet under the real weights file name.

    The code under test then loads it through torchxrayvision's normal
    ``weights=``/``cache_dir=`` path, with no network access.
    """
    import torch
    import torchxrayvision as xrv

    cache_dir = tmp_path_factory.mktemp("xrv-weights")
    url = xrv.models.model_urls[WEIGHTS_NAME]["weights_url"]
    torch.manual_seed(0)
    model = xrv.models.DenseNet()
    torch.save(model, cache_dir / os.path.basename(url))
    return cache_dir


@pytest.fixture
def no_umask() -> Iterator[None]:
    """A umask of 0 for the test: files that must be owner-only cannot owe it to the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)
