"""Key images: one Secondary Capture per classified image, beside its SR, valid and reproducible."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import process_files, require_program, run_script
from PIL import Image

from cxrsr.config import PROJECT_ROOT
from cxrsr.sr.keyimage import BANNER_HEIGHT, KEY_IMAGE_SERIES_DESCRIPTION, PANEL_WIDTH

NAMES = [
    "cxr04_nema_RG1_JLSN.dcm",  # taller than wide: preview rows outside the crop
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",  # wider than tall
]
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) attributes: copied as for the SR.
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SpecificCharacterSet",
)


@pytest.fixture(scope="module")
def results(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("keyimage") / "results.json"
    process_files(out, weights_cache_dir, *(corpus_dir / name for name in NAMES), "--workers", "1")
    return out


def generate(results: Path, output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = run_script("generate_sr.py", "--results", results, "--output-dir", output, *args)
    return proc


def read_all(folder: Path) -> tuple[list[pydicom.Dataset], dict[str, pydicom.Dataset]]:
    """The SRs, and the key images by SOP Instance UID."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    srs = [ds for ds in datasets if ds.Modality == "SR"]
    images = {ds.SOPInstanceUID: ds for ds in datasets if ds.SOPClassUID == SECONDARY_CAPTURE}
    return srs, images


@pytest.fixture(scope="module")
def written(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("sr")
    proc = generate(results, output)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(NAMES)} SRs and {len(NAMES)} key images written" in proc.stdout
    return output


def key_image_of(sr: pydicom.Dataset, images: dict[str, pydicom.Dataset]) -> pydicom.Dataset:
    (study,) = sr.PertinentOtherEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPClassUID == SECONDARY_CAPTURE
    image = images[instance.ReferencedSOPInstanceUID]
    assert study.StudyInstanceUID == image.StudyInstanceUID
    assert series.SeriesInstanceUID == image.SeriesInstanceUID
    return image


def test_each_sr_references_its_key_image_filed_like_the_sr(written: Path, results: Path) -> None:
    srs, images = read_all(written)
    assert len(srs) == len(images) == len(NAMES)
    entries = {e["sop_instance_uid"]: e for e in json.loads(results.read_text())["images"]}
    for sr in srs:
        image = key_image_of(sr, images)
        source = sr.CurrentRequestedProcedureEvidenceSequence[0]
        source_uid = source.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        entry = entries[source_uid.ReferencedSOPInstanceUID]
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == entry["sop_instance_uid"]
        for keyword in PATIENT_AND_STUDY:
            assert (keyword in image) == (keyword in sr), keyword
            if keyword in sr:
                assert image[keyword].value == sr[keyword].value, keyword
        assert image.StudyInstanceUID == entry["study_instance_uid"]
        assert image.SeriesInstanceUID not in (entry["series_instance_uid"], sr.SeriesInstanceUID)
        assert image.SeriesDescription == KEY_IMAGE_SERIES_DESCRIPTION
        assert image.BurnedInAnnotation == "YES"
        assert image.PhotometricInterpretation == "RGB" and image.SamplesPerPixel == 3
    # One key image series per source series, like the SR series.
    assert len({ds.SeriesInstanceUID for ds in images.values()}) == len(NAMES)


def test_key_images_and_srs_pass_dciodvfy(written: Path) -> None:
    dciodvfy = require_program("dciodvfy")
    for path in sorted(written.glob("*.dcm")):
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], (path.name, errors)


def test_key_image_shows_the_preview_and_the_top_findings_heatmap(
    written: Path, results: Path
) -> None:
    srs, images = read_all(written)
    folder = results.parent
    by_source = {
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID: key_image_of(sr, images)
        for sr in srs
    }
    for entry in json.loads(results.read_text())["images"]:
        pixels = by_source[entry["sop_instance_uid"]].pixel_array.astype(float)
        banner = pixels[: BANNER_HEIGHT - 4, :].reshape(-1, 3)
        assert np.median(banner[:, 0]) > 150 and np.median(banner[:, 1]) < 60  # red banner
        # The preview is stored at the detail process_dicom.py decoded; the key image shows
        # it with a long side of 1024 pixels, enlarged bilinearly (crop scaled with it).
        with Image.open(folder / entry["preview"]) as image:
            scale = 1024 / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            preview = np.asarray(image.resize(size, Image.Resampling.BILINEAR)).astype(float)
            sx, sy = size[0] / image.width, size[1] / image.height
        assert max(preview.shape) == 1024
        top = max(entry["heatmaps"], key=lambda label: entry["scores"][label])
        with Image.open(folder / entry["heatmaps"][top]) as image:
            heat_image = image.copy()
        picture = pixels[BANNER_HEIGHT : BANNER_HEIGHT + preview.shape[0], : preview.shape[1]]
        assert pixels.shape[1] == preview.shape[1] + PANEL_WIDTH
        left, top, w, h = entry["preview_crop"]
        left, top, w, h = left * sx, top * sy, w * sx, h * sy
        x, y = round(left), round(top)
        width, height = round(left + w) - x, round(top + h) - y
        inside = np.zeros(preview.shape, dtype=bool)
        inside[y : y + height, x : x + width] = True
        # Outside the square the model saw: the preview, grey and unchanged.
        if (~inside).any():
            for channel in range(3):
                assert np.abs(picture[..., channel][~inside] - preview[~inside]).max() <= 1
        # Inside: red where the heatmap is hot, blue where it is cold (jet), same geometry.
        heat = np.asarray(heat_image.resize((width, height), Image.Resampling.BILINEAR), float)
        region = picture[y : y + height, x : x + width]
        warmth = region[..., 0] - region[..., 2]
        correlation = np.corrcoef(warmth.ravel(), heat.ravel())[0, 1]
        assert correlation > 0.85, (entry["path"], correlation)
        for wrong in (heat[::-1], heat[:, ::-1], heat[::-1, ::-1]):
            assert np.corrcoef(warmth.ravel(), wrong.ravel())[0, 1] < correlation
        if os.environ.get("CXRSR_UPDATE_DOCS") and entry["path"].endswith(NAMES[0]):
            # The README's picture: CXRSR_UPDATE_DOCS=1 ./test.sh -k key_image_shows
            picture_path = PROJECT_ROOT / "docs" / "key-image.jpg"
            picture_path.parent.mkdir(exist_ok=True)
            image = Image.fromarray(pixels.astype(np.uint8))
            image.resize(
                (image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.LANCZOS
            ).save(picture_path, quality=88)


def test_same_results_same_bytes_changed_preview_new_uids(
    written: Path, results: Path, tmp_path: Path
) -> None:
    """A UID names one byte stream: a rerun writes the same files; a changed preview makes a
    new key image and a new SR (which names it), and --clean removes the old ones."""
    again = tmp_path / "again"
    assert generate(results, again).returncode == 0
    before = {p.name: p.read_bytes() for p in written.glob("*.dcm")}
    assert {p.name: p.read_bytes() for p in again.glob("*.dcm")} == before

    copy = tmp_path / "results"
    shutil.copytree(results.parent, copy)
    document = json.loads((copy / "results.json").read_text())
    preview_path = copy / document["images"][0]["preview"]
    with Image.open(preview_path) as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(preview_path)
    proc = generate(copy / "results.json", again, "--clean")
    assert proc.returncode == 0, proc.stderr
    after = {p.name for p in again.glob("*.dcm")}
    assert len(after) == len(before)
    assert len(after - set(before)) == 2  # one new key image, one new SR
    srs, images = read_all(again)
    for sr in srs:
        key_image_of(sr, images)


def test_no_heatmaps_no_key_images_and_a_missing_preview_is_an_error(
    corpus_dir: Path, weights_cache_dir: Path, results: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.json"
    process_files(plain, weights_cache_dir, corpus_dir / NAMES[0], "--no-heatmaps")
    proc = generate(plain, tmp_path / "plain")
    assert proc.returncode == 0, proc.stderr
    (sr,) = (pydicom.dcmread(p) for p in (tmp_path / "plain").glob("*.dcm"))
    assert sr.Modality == "SR" and "PertinentOtherEvidenceSequence" not in sr

    proc = generate(results, tmp_path / "flag", "--no-key-images")
    assert proc.returncode == 0 and f"{len(NAMES)} SRs written" in proc.stdout

    copy = tmp_path / "results"
    shutil.copytree(results.parent, copy)
    document = json.loads((copy / "results.json").read_text())
    (copy / document["images"][1]["preview"]).unlink()
    proc = generate(copy / "results.json", tmp_path / "missing")
    assert proc.returncode == 1
    assert f"{document['images'][1]['path']}: no key image: cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr
    srs, images = read_all(tmp_path / "missing")  # its SR is still written, without one
    assert len(srs) == len(NAMES) and len(images) == len(NAMES) - 1
    assert sum("PertinentOtherEvidenceSequence" in sr for sr in srs) == len(NAMES) - 1


def test_a_key_image_whose_sr_fails_is_not_left_behind(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key image is written while its SR is built, and renamed into place only once
    the SR is written: when the SR fails, its key image (and any temporary file) goes."""
    import datetime

    from cxrsr.sr import batch as sr_batch

    document = json.loads(results.read_text())
    refused = document["images"][1]["path"]
    real_encode = sr_batch.SRBuilder.encode

    def encode(self: sr_batch.SRBuilder, header: Any, classification: Any) -> Any:
        if classification.path == refused:
            raise ValueError("refused by the test")
        return real_encode(self, header, classification)

    monkeypatch.setattr(sr_batch.SRBuilder, "encode", encode)
    when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    outcome = sr_batch.generate_srs(document, tmp_path / "out", when, results_dir=results.parent)
    assert len(outcome.errors) == 1 and "refused by the test" in outcome.errors[0]
    srs, images = read_all(tmp_path / "out")
    assert len(srs) == len(images) == len(outcome.key_images) == len(NAMES) - 1
    assert {key_image_of(sr, images).SOPInstanceUID for sr in srs} == set(images)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in outcome.written + outcome.key_images
    )


def test_the_highdicom_memo_changes_no_byte(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cxrsr.sr.highdicom_memo memoises a highdicom lookup for speed: SRs and key images
    are byte for byte those that the unpatched library writes."""
    import datetime

    from highdicom import _standard_utils, base_content

    from cxrsr.sr import batch as sr_batch

    document = json.loads(results.read_text())
    when = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
    assert hasattr(base_content.does_iod_have_pixel_data, "cache_info"), "the memo is not in place"
    memo = sr_batch.generate_srs(document, tmp_path / "memo", when, results_dir=results.parent)
    monkeypatch.setattr(
        base_content, "does_iod_have_pixel_data", _standard_utils.does_iod_have_pixel_data
    )
    plain = sr_batch.generate_srs(document, tmp_path / "plain", when, results_dir=results.parent)
    assert len(memo.written) == len(plain.written) == len(NAMES)
    assert len(memo.key_images) == len(NAMES)
    files = sorted(p.name for p in (tmp_path / "memo").glob("*.dcm"))
    assert files == sorted(p.name for p in (tmp_path / "plain").glob("*.dcm"))
    assert len(files) == 2 * len(NAMES)
    for name in files:
        assert (tmp_path / "memo" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
