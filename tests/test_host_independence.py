"""The same results give the same bytes on every host, and after an upgrade.

A SOP Instance UID names exactly one byte stream, forever, on any host (cxrsr.sr.uids). So
generate_sr.py, run as a real process on one results file, must write byte-identical SRs
and key images whatever the host's time zone and whatever ``cxrsr.__version__`` says; only
the encoding version (:data:`cxrsr.sr.uids.ENCODING_VERSION`) may change them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import run_script
from test_sr import WEIGHTS, classified_entry, results_document

from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.preview import png_bytes
from cxrsr.files import write_json_atomic

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: 20:05:06 UTC: already the next day in Tokyo (+0900) and in a "+0530" source's zone.
CLASSIFIED_AT = "2031-02-03T20:05:06+00:00"

#: generate_sr.py run in this interpreter after a few statements (``{prelude}``), with
#: the arguments after ``-c``'s program.
RUN_PATCHED = (
    "import runpy, sys\n"
    "{prelude}\n"
    "sys.argv = ['generate_sr.py', *sys.argv[1:]]\n"
    "runpy.run_path('generate_sr.py', run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def labels() -> list[str]:
    import torchxrayvision as xrv

    return list(xrv.models.model_urls[WEIGHTS]["labels"])


def _source(corpus_dir: Path, folder: Path, offset: str | None) -> Path:
    """cxr11 (no Timezone Offset From UTC) with ``offset`` set, under new UIDs."""
    ds = pydicom.dcmread(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")
    assert "TimezoneOffsetFromUTC" not in ds
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.StudyDate, ds.StudyTime = "20310203", "193000"  # a local time, as sites write
    path = folder / f"source-{offset or 'none'}.dcm"
    ds.save_as(path)
    return path


def _with_pictures(entry: dict[str, Any], folder: Path, stem: str, label: str) -> dict[str, Any]:
    """The entry with a preview and one heatmap, as process_dicom.py names them."""
    (folder / "previews").mkdir(exist_ok=True)
    (folder / "heatmaps").mkdir(exist_ok=True)
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    (folder / "previews" / f"{stem}.png").write_bytes(png_bytes(ramp))
    (folder / "heatmaps" / f"{stem}.png").write_bytes(png_bytes(ramp[:224, :224].T.copy()))
    entry["preview"] = f"previews/{stem}.png"
    entry["preview_crop"] = [16.0, 16.0, 224.0, 224.0]
    entry["heatmaps"] = {label: f"heatmaps/{stem}.png"}
    return entry


@pytest.fixture(scope="module")
def results(corpus_dir: Path, labels: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results file of two classified images, one with an offset, one without, with pictures."""
    folder = tmp_path_factory.mktemp("host")
    rng = np.random.default_rng(4)
    entries = []
    for offset in ("+0530", None):
        entry = classified_entry(str(_source(corpus_dir, folder, offset)), labels, rng)
        entry["classified_at"] = CLASSIFIED_AT
        top = max(entry["scores"], key=lambda label: entry["scores"][label])
        entries.append(_with_pictures(entry, folder, f"tz-{offset or 'none'}", top))
    path = folder / "results.json"
    write_json_atomic(path, results_document(entries, labels))
    return path


def generate(
    results: Path, output: Path, tz: str = "UTC", prelude: str | None = None
) -> dict[str, bytes]:
    """generate_sr.py under ``TZ=tz`` (after ``prelude``, if given): its files' bytes by name."""
    args = ["-q", "--jobs", "1", "--results", str(results), "--output-dir", str(output)]
    env = dict(os.environ, TZ=tz)
    if prelude is None:
        done = run_script("generate_sr.py", *args, env=env)
    else:
        program = RUN_PATCHED.format(prelude=prelude)
        done = subprocess.run(
            [sys.executable, "-c", program, *args],
            capture_output=True,
            text=True,
            cwd=PROJECT_ROOT,
            env=env,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr
    files = {path.name: path.read_bytes() for path in sorted(output.glob("*.dcm"))}
    assert len(files) == 4, sorted(files)  # two SRs, two key images
    return files


@pytest.fixture(scope="module")
def in_utc(results: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return generate(results, tmp_path_factory.mktemp("utc"))


def _datasets(files: dict[str, bytes], folder: Path) -> list[pydicom.Dataset]:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [pydicom.dcmread(folder / name) for name in files]


def test_the_hosts_time_zone_changes_no_byte(
    results: Path, in_utc: dict[str, bytes], tmp_path: Path
) -> None:
    """TZ=UTC and TZ=Asia/Tokyo: the same SRs and key images, byte for byte."""
    assert generate(results, tmp_path / "tokyo", tz="Asia/Tokyo") == in_utc
    assert generate(results, tmp_path / "new-york", tz="America/New_York") == in_utc


def test_sr_and_key_image_state_time_alike(in_utc: dict[str, bytes], tmp_path: Path) -> None:
    """Both carry the source's offset and state their times in it, or carry none and state
    UTC clock values; never "+0000" beside a source's local times."""
    datasets = _datasets(in_utc, tmp_path)
    by_offset: dict[str | None, list[pydicom.Dataset]] = {}
    for ds in datasets:
        assert (ds.StudyDate, ds.StudyTime) == ("20310203", "193000")  # copied as they are
        by_offset.setdefault(ds.get("TimezoneOffsetFromUTC"), []).append(ds)
    expected = {"+0530": ("20310204", "013506"), None: ("20310203", "200506")}
    assert set(by_offset) == set(expected)
    for offset, (date, time) in expected.items():
        kinds = sorted(ds.Modality for ds in by_offset[offset])
        assert kinds == ["OT", "SR"], (offset, kinds)  # one SR, one key image
        for ds in by_offset[offset]:
            assert (ds.ContentDate, ds.ContentTime) == (date, time), (offset, ds.Modality)
            for item in ds.get("ContributingEquipmentSequence", []):
                assert item.ContributionDateTime == f"{date}{time}{offset or ''}"
            values = [str(e.value) for e in ds.iterall() if e.VR in ("DA", "TM", "DT")]
            assert not any(value.endswith("+0000") for value in values)
        image = next(ds for ds in by_offset[offset] if ds.SOPClassUID == SECONDARY_CAPTURE)
        assert (image.DateOfSecondaryCapture, image.TimeOfSecondaryCapture) == (date, time)


def test_the_package_version_changes_no_byte(
    results: Path, in_utc: dict[str, bytes], tmp_path: Path
) -> None:
    """Another cxrsr release that encodes alike writes the same objects under the same UIDs."""
    prelude = "import cxrsr; cxrsr.__version__ = '99.1.2'"
    assert generate(results, tmp_path / "upgraded", prelude=prelude) == in_utc
    for ds in _datasets(in_utc, tmp_path):
        assert "99.1.2" not in str(ds.SoftwareVersions)
        assert ds.SoftwareVersions == "cxrsr encoding 1"


def test_the_encoding_version_changes_every_uid(
    results: Path, in_utc: dict[str, bytes], tmp_path: Path
) -> None:
    prelude = "import cxrsr.sr.uids as u; u.ENCODING_VERSION = 2"
    bumped = generate(results, tmp_path / "bumped", prelude=prelude)
    assert set(bumped).isdisjoint(in_utc)  # files are named by their SOP Instance UIDs
    datasets = _datasets(bumped, tmp_path)
    assert {ds.SoftwareVersions for ds in datasets} == {"cxrsr encoding 2"}
    assert all(f"{ds.SOPInstanceUID}.dcm" in bumped for ds in datasets)
