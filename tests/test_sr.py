"""generate_sr.py and cxrsr.sr.tid1500: one valid, well-placed TID 1500 SR per classified image.

The SRs are written from the shared corpus by the real script (a subprocess), then checked
by two independent validators run as real programs (dicom3tools' dciodvfy, DCMTK's
dsrdump), read back with pydicom and parsed with highdicom's SR reader.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import missing_prerequisite, orthanc_env, require_program, run_script, sr_files
from pydicom.sr.codedict import codes
from test_pipeline import copy_with_new_uids

from cxrsr.classify import PreparedImage
from cxrsr.classify import classified_entry as production_entry
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.discovery import open_source
from cxrsr.dicomio.reading import identity_of
from cxrsr.files import write_json_atomic
from cxrsr.pacs.local_orthanc import LocalOrthanc
from cxrsr.sr import batch as sr_batch
from cxrsr.sr import document as sr_file
from cxrsr.sr import entries as sr_entries
from cxrsr.sr import evidence as sr_evidence
from cxrsr.sr import fast as sr_fast
from cxrsr.sr import tid1500 as sr_tid1500
from cxrsr.sr.codes import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    OPERATING_POINT_METHOD,
    PRESENT,
    PRIVATE_SCHEME,
    finding_for_label,
)
from cxrsr.sr.uids import is_valid_uid

SCRIPT = PROJECT_ROOT / "generate_sr.py"
WEIGHTS = "densenet121-res224-all"
WEIGHTS_SHA256 = "5" * 64
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)


@pytest.fixture(scope="session")
def labels() -> list[str]:
    """The 18 labels of the DenseNet "all" weights, in the model's order."""
    import torchxrayvision as xrv

    found = list(xrv.models.model_urls[WEIGHTS]["labels"])
    assert found == list(xrv.datasets.default_pathologies)
    return found


def model_block(labels: list[str], weights_sha256: str = WEIGHTS_SHA256) -> dict[str, Any]:
    return {
        "weights": WEIGHTS,
        "weights_sha256": weights_sha256,
        "torchxrayvision": "1.5.7",
        "labels": labels,
        "threshold": 0.5,
        "score_kind": "operating-point normalised",
    }


def classified_entry(path: str, labels: list[str], rng: np.random.Generator) -> dict[str, Any]:
    """A results entry for ``path``, made by process_dicom.py's own builder, with random scores."""
    source = open_source(path)
    with source.open() as stream:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, force=True)
    scores = {label: float(rng.random()) for label in labels}
    return production_entry(PreparedImage(path, "ready", identity=identity_of(ds)), scores, 0.5)


def results_document(images: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    return {"format": "cxrsr-results/1", "model": model_block(labels), "images": images}


def run_generate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_script("generate_sr.py", *args)


@pytest.fixture(scope="session")
def corpus_results(
    tmp_path_factory: pytest.TempPathFactory,
    corpus_dir: Path,
    manifest: list[dict[str, str]],
    labels: list[str],
) -> Path:
    """A results file for the whole corpus: ``classify`` rows classified, the rest not."""
    rng = np.random.default_rng(20240506)
    images = []
    for row in manifest:
        path = str(corpus_dir / row["filename"])
        if row["expected"].startswith("classify"):
            images.append(classified_entry(path, labels, rng))
        elif row["expected"].startswith("skip"):
            images.append({"path": path, "status": "skipped", "reason": row["expected"]})
        else:
            images.append({"path": path, "status": "failed", "reason": row["expected"]})
    results = tmp_path_factory.mktemp("results") / "results.json"
    write_json_atomic(results, results_document(images, labels))
    return results


@pytest.fixture(scope="session")
def corpus_run(
    tmp_path_factory: pytest.TempPathFactory, corpus_results: Path
) -> tuple[subprocess.CompletedProcess[str], Path]:
    output_dir = tmp_path_factory.mktemp("sr")
    done = run_generate("--results", corpus_results, "--output-dir", output_dir)
    return done, output_dir


def load_results_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def written_srs(output_dir: Path) -> dict[str, pydicom.Dataset]:
    """Every SR in ``output_dir`` by the source SOP Instance UID + first score it refers to."""
    return {p.name: pydicom.dcmread(p) for p in sorted(output_dir.glob("*.dcm"))}


def source_of(sr: pydicom.Dataset) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs the SR's evidence names (exactly one instance)."""
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    return study.StudyInstanceUID, series.SeriesInstanceUID, instance.ReferencedSOPInstanceUID


def entry_for(sr: pydicom.Dataset, results: dict[str, Any]) -> dict[str, Any]:
    """The results entry an SR was written from: same source SOP UID, same scores."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    first = report.get_image_measurement_groups()[0].get_measurements()[0].value
    labels = results["model"]["labels"]
    (entry,) = [
        e
        for e in results["images"]
        if e["status"] == "classified"
        and e["sop_instance_uid"] == source_of(sr)[2]
        and e["scores"][labels[0]] == first
    ]
    return entry


# --- the corpus run ------------------------------------------------------------------------


def test_one_sr_per_classified_image_and_a_summary(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path], corpus_results: Path
) -> None:
    done, output_dir = corpus_run
    results = load_results_json(corpus_results)
    statuses = [e["status"] for e in results["images"]]
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert len(list(output_dir.glob("*.dcm"))) == statuses.count("classified") == 9
    assert not list(output_dir.glob("*.tmp")), "temporary files left behind"
    summary = done.stdout.strip().splitlines()[-1]
    assert summary == (
        f"9 SRs written to {output_dir}, 13 passed over "
        f"({statuses.count('skipped')} skipped, {statuses.count('failed')} failed in "
        "classification), 0 errors"
    )
    # The Canon sample's hashed Accession Number breaks SH: said, not hidden.
    assert "AccessionNumber" in done.stderr and "written empty" in done.stderr


def test_every_sr_passes_dciodvfy(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    dciodvfy = require_program("dciodvfy")
    _, output_dir = corpus_run
    for path in sorted(output_dir.glob("*.dcm")):
        done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}:\n{output}"
        assert done.returncode == 0, f"{path.name}: exit {done.returncode}\n{output}"
        # Its warnings about our private scheme are expected; nothing about the SR IOD.
        assert "Comprehensive3DSR" in output


def test_every_sr_passes_dsrdump(corpus_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    dsrdump = require_program("dsrdump")
    _, output_dir = corpus_run
    for path in sorted(output_dir.glob("*.dcm")):
        done = subprocess.run(
            [dsrdump, "-Ee", str(path)], capture_output=True, text=True, timeout=60
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith(("E:", "F:"))]
        assert done.returncode == 0, f"{path.name}: exit {done.returncode}\n{done.stderr}"
        assert errors == [], f"{path.name}:\n{done.stderr}"
        assert "Comprehensive 3D SR Document" in done.stdout
        assert done.stdout.count('"Measurement Group"') == 18


def test_highdicom_reads_back_the_labels_and_scores(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path],
    corpus_results: Path,
    labels: list[str],
) -> None:
    _, output_dir = corpus_run
    results = load_results_json(corpus_results)
    for path in sorted(output_dir.glob("*.dcm")):
        document = hd.sr.srread(path)
        assert isinstance(document, hd.sr.Comprehensive3DSR)
        report = document.content
        assert isinstance(report, hd.sr.MeasurementReport)
        entry = entry_for(pydicom.dcmread(path), results)
        groups = report.get_image_measurement_groups()
        read: dict[str, float] = {}
        for group in groups:
            label = group.tracking_identifier.removeprefix("xrv-")
            assert group.finding_type == finding_for_label(label).code
            (measurement,) = group.get_measurements(name=CERTAINTY_OF_FINDING)
            assert measurement.method == OPERATING_POINT_METHOD
            (call,) = group.get_qualitative_evaluations()
            assert call.name == finding_for_label(label).code
            assert call.value == (PRESENT if label in entry["findings"] else ABSENT)
            (image,) = group.source_images
            assert image.referenced_sop_instance_uid == entry["sop_instance_uid"]
            read[label] = measurement.value
        assert list(read) == labels  # all 18, in the model's order
        assert read == entry["scores"]  # exactly: the NUM carries the float64 too


def test_identity_and_placement(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path], corpus_results: Path
) -> None:
    _, output_dir = corpus_run
    results = load_results_json(corpus_results)
    sr_series_by_source_series: dict[str, set[str]] = {}
    for path in sorted(output_dir.glob("*.dcm")):
        sr = pydicom.dcmread(path)
        entry = entry_for(sr, results)
        source = pydicom.dcmread(entry["path"], stop_before_pixels=True, force=True)
        # Same patient and study as the source, byte for byte where the source is valid.
        assert sr.PatientName == source.get("PatientName", "")
        assert "PatientID" in sr and sr.PatientID == source.get("PatientID", "")
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.get("SpecificCharacterSet") == source.get("SpecificCharacterSet")
        # Its own series, Modality SR (PS3.3 C.17.1).
        assert sr.Modality == "SR"
        assert sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        # Evidence and IMAGE items name the source series and instance.
        assert source_of(sr) == (
            source.StudyInstanceUID,
            source.SeriesInstanceUID,
            source.SOPInstanceUID,
        )
        library_image = _image_library_entry(sr)
        assert library_image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        assert library_image.ReferencedSOPSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        # Flags and description (PS3.3 C.17.2).
        assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
            "COMPLETE",
            "UNVERIFIED",
            "PRELIMINARY",
        )
        assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
        assert sr.SeriesNumber == sr_tid1500.SR_SERIES_NUMBER
        # The private scheme is declared; the model is contributing equipment.
        (scheme,) = sr.CodingSchemeIdentificationSequence
        assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME
        purposes = [
            (item.Manufacturer, item.PurposeOfReferenceCodeSequence[0].CodeValue)
            for item in sr.ContributingEquipmentSequence
        ]
        assert ("mlmed/torchxrayvision", "109102") in purposes
        for uid in _all_uids(sr):
            assert is_valid_uid(uid), uid
        sr_series_by_source_series.setdefault(source.SeriesInstanceUID, set()).add(
            sr.SeriesInstanceUID
        )
    # One SR series per source series.
    assert all(len(series) == 1 for series in sr_series_by_source_series.values())
    assert len({s for v in sr_series_by_source_series.values() for s in v}) == len(
        sr_series_by_source_series
    )


def test_source_without_patient_id_gets_an_empty_one(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path], corpus_dir: Path
) -> None:
    _, output_dir = corpus_run
    source = pydicom.dcmread(
        corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm", stop_before_pixels=True, force=True
    )
    assert "PatientID" not in source
    matching = [
        sr for sr in written_srs(output_dir).values() if source_of(sr)[2] == source.SOPInstanceUID
    ]
    assert matching
    for sr in matching:
        element = sr["PatientID"]
        assert element.value in ("", None) and element.VM == 0


def test_same_results_give_the_same_files(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path],
    corpus_results: Path,
    tmp_path: Path,
) -> None:
    _, first_dir = corpus_run
    done = run_generate("-q", "--results", corpus_results, "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SRs:" not in done.stderr  # -q: no progress bar
    first = {p.name: p.read_bytes() for p in first_dir.glob("*.dcm")}
    second = {p.name: p.read_bytes() for p in tmp_path.glob("*.dcm")}
    assert first.keys() == second.keys()
    assert first == second  # byte for byte
    # A rerun into the same folder replaces each file by the same bytes and adds nothing.
    again = run_generate("-q", "--results", corpus_results, "--output-dir", tmp_path)
    assert again.returncode == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.dcm")} == second


# --- changed results -----------------------------------------------------------------------


def _build(entry: dict[str, Any], model: dict[str, Any]) -> pydicom.Dataset:
    info = sr_entries.ModelInfo.from_results(model)
    classification = sr_entries.Classification.from_entry(entry, info, 0)
    header = sr_evidence.read_source_header(classification)
    return sr_tid1500.build_sr_reference(header, classification, info, WHEN)


def test_changed_scores_make_a_new_instance_in_the_same_series(
    corpus_dir: Path, labels: list[str]
) -> None:
    entry = classified_entry(
        str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, np.random.default_rng(1)
    )
    model = model_block(labels)
    original = _build(entry, model)
    assert _build(entry, model).SOPInstanceUID == original.SOPInstanceUID

    changed = json.loads(json.dumps(entry))
    changed["scores"]["Pneumothorax"] = np.nextafter(changed["scores"]["Pneumothorax"], 2.0)
    rescored = _build(changed, model)
    assert rescored.SOPInstanceUID != original.SOPInstanceUID
    assert rescored.SeriesInstanceUID == original.SeriesInstanceUID

    other_weights = _build(entry, model_block(labels, weights_sha256="6" * 64))
    assert other_weights.SOPInstanceUID != original.SOPInstanceUID
    assert other_weights.SeriesInstanceUID != original.SeriesInstanceUID


def test_unknown_label_gets_a_private_code_and_still_validates(
    corpus_dir: Path, tmp_path: Path
) -> None:
    dciodvfy = require_program("dciodvfy")
    labels = ["Pneumothorax", "Tension_Pneumothorax_Or_Other_Very_Long_Label"]
    entry = classified_entry(
        str(corpus_dir / "cxr10_nih_dx_8bit.dcm"), labels, np.random.default_rng(2)
    )
    sr = _build(entry, model_block(labels))
    path = sr_file.write_sr(sr, tmp_path)
    report = hd.sr.srread(path).content
    codes_found = [g.finding_type for g in report.get_image_measurement_groups()]
    assert codes_found[0] == finding_for_label("Pneumothorax").code
    assert codes_found[1].scheme_designator == PRIVATE_SCHEME
    assert len(codes_found[1].value) <= 16  # Code Value is SH
    done = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    assert not [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("Error")]


def test_non_ascii_patient_name_keeps_its_character_set(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    source = pydicom.dcmread(corpus_dir / "cxr04_nema_RG1_JLSN.dcm")
    assert source.SpecificCharacterSet == "ISO_IR 100"
    source.PatientName = "Müller^Jürgen"
    copy = tmp_path / "latin1.dcm"
    source.save_as(copy)
    entry = classified_entry(str(copy), labels, np.random.default_rng(3))
    path = sr_file.write_sr(_build(entry, model_block(labels)), tmp_path / "sr")
    assert "Müller^Jürgen".encode("latin-1") in path.read_bytes()
    sr = pydicom.dcmread(path)
    assert sr.SpecificCharacterSet == "ISO_IR 100"
    assert str(sr.PatientName) == "Müller^Jürgen"


# --- the fast path (SRBuilder) against the highdicom reference ------------------------------


def _both_paths(
    builder: sr_fast.SRBuilder, entry: dict[str, Any], model: dict[str, Any]
) -> tuple[bytes, bytes]:
    """(fast, reference) file bytes of one entry; ``builder`` keeps its templates across calls."""
    info = sr_entries.ModelInfo.from_results(model)
    classification = sr_entries.Classification.from_entry(entry, info, 0)
    header = sr_evidence.read_source_header(classification)
    reference = sr_file.encode_reference(
        sr_tid1500.build_sr_reference(header, classification, info, WHEN)
    )
    fast = builder.encode(header, classification)
    assert (
        fast.sop_instance_uid
        == pydicom.dcmread(pydicom.filebase.DicomBytesIO(reference)).SOPInstanceUID
    )
    return fast.data, reference


def _assert_identical(fast: bytes, reference: bytes, what: str) -> None:
    if fast == reference:
        return
    # Say where they part, element by element, rather than at a byte offset.
    ours = pydicom.dcmread(pydicom.filebase.DicomBytesIO(fast))
    theirs = pydicom.dcmread(pydicom.filebase.DicomBytesIO(reference))
    ours_elements = [(e.tag, e.VR, repr(e.value)) for e in ours.iterall()]
    theirs_elements = [(e.tag, e.VR, repr(e.value)) for e in theirs.iterall()]
    assert ours_elements == theirs_elements, what
    raise AssertionError(f"{what}: same elements, different bytes")


@pytest.fixture(scope="module")
def fast_builder(labels: list[str]) -> sr_fast.SRBuilder:
    """One builder for the whole module, without its run-time check (which would hide a
    difference by falling back to the reference): every document below is compared, and
    most use a template compiled from another source than their own."""
    info = sr_entries.ModelInfo.from_results(model_block(labels))
    return sr_fast.SRBuilder(info, WHEN, check_first=False)


def test_fast_path_is_byte_identical_on_every_classifiable_corpus_file(
    corpus_dir: Path,
    manifest: list[dict[str, str]],
    labels: list[str],
    fast_builder: sr_fast.SRBuilder,
) -> None:
    rng = np.random.default_rng(7)
    names = [row["filename"] for row in manifest if row["expected"].startswith("classify")]
    assert len(names) == 9
    for name in names:
        entry = classified_entry(str(corpus_dir / name), labels, rng)
        _assert_identical(*_both_paths(fast_builder, entry, model_block(labels)), name)
    assert not fast_builder.use_reference


@pytest.mark.parametrize(
    "scores",
    [
        "all-zero",
        "all-one",
        "threshold",
        "awkward",
    ],
)
def test_fast_path_is_byte_identical_for_any_scores(
    corpus_dir: Path, labels: list[str], fast_builder: sr_fast.SRBuilder, scores: str
) -> None:
    """DS is at most 16 characters (PS3.5 6.2): values that need rounding, exponents, 0, 1."""
    awkward = [
        0.1 + 0.2, 1e-300, 5e-324, 1 - 2**-53, 0.49999999999999994, 2 / 3, 1e-5, 0.123456789012345678,
        9.999999999999999e-05, 0.5 + 2**-52, 1e-10, 0.30000000000000004, 3e-7, 0.7, 0.05, 1e-16,
        0.999999, 0.0001,
    ]  # fmt: skip
    values = {
        "all-zero": [0.0] * len(labels),
        "all-one": [1.0] * len(labels),
        "threshold": [0.5] * len(labels),
        "awkward": awkward,
    }[scores]
    entry = classified_entry(
        str(corpus_dir / "cxr10_nih_dx_8bit.dcm"), labels, np.random.default_rng(8)
    )
    entry["scores"] = dict(zip(labels, values, strict=True))
    entry["findings"] = [label for label in labels if entry["scores"][label] >= 0.5]
    _assert_identical(*_both_paths(fast_builder, entry, model_block(labels)), scores)
    assert not fast_builder.use_reference


def test_fast_path_is_byte_identical_for_changed_scores_and_unknown_labels(
    corpus_dir: Path, labels: list[str]
) -> None:
    source = str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")
    unknown = [*labels[:3], "Tension_Pneumothorax_Or_Other_Very_Long_Label", "Épanchement"]
    for these_labels in (labels, unknown):
        model = model_block(these_labels)
        builder = sr_fast.SRBuilder(
            sr_entries.ModelInfo.from_results(model), WHEN, check_first=False
        )
        for seed in range(3):
            entry = classified_entry(source, these_labels, np.random.default_rng(seed))
            _assert_identical(*_both_paths(builder, entry, model), f"{len(these_labels)}/{seed}")


def _variant(corpus_dir: Path, tmp_path: Path, name: str, change: str) -> Path:
    source = pydicom.dcmread(corpus_dir / name)
    if change == "latin-1":
        assert source.SpecificCharacterSet == "ISO_IR 100"
        source.PatientName = "Müller^Jürgen"
        source.StudyDescription = "Thorax p.a. – Lunge"[:8] + "ä"
    elif change == "no-orientation":
        del source.PatientOrientation
    elif change == "no-spacing":
        del source.ImagerPixelSpacing
    elif change == "neither":
        for keyword in ("PatientOrientation", "ImagerPixelSpacing", "InstanceNumber"):
            if keyword in source:
                delattr(source, keyword)
    elif change == "no-character-set":
        del source.SpecificCharacterSet
    path = tmp_path / f"{change}.dcm"
    source.save_as(path)
    return path


@pytest.mark.parametrize(
    "name, change",
    [
        ("cxr04_nema_RG1_JLSN.dcm", "latin-1"),
        ("cxr04_nema_RG1_JLSN.dcm", "no-character-set"),
        ("edge_vet_dog_dx_thorax_small.dcm", "no-orientation"),
        ("edge_vet_dog_dx_thorax_small.dcm", "no-spacing"),
        ("edge_vet_dog_dx_thorax_small.dcm", "neither"),
    ],
)
def test_fast_path_is_byte_identical_for_synthetic_sources(
    corpus_dir: Path,
    tmp_path: Path,
    labels: list[str],
    fast_builder: sr_fast.SRBuilder,
    name: str,
    change: str,
) -> None:
    path = _variant(corpus_dir, tmp_path, name, change)
    entry = classified_entry(str(path), labels, np.random.default_rng(9))
    _assert_identical(*_both_paths(fast_builder, entry, model_block(labels)), change)
    # A label outside the table, with a non-ASCII meaning, in the source's character set.
    odd_labels = [*labels[:2], "Épanchement_pleural"]
    builder = sr_fast.SRBuilder(
        sr_entries.ModelInfo.from_results(model_block(odd_labels)), WHEN, check_first=False
    )
    entry = classified_entry(str(path), odd_labels, np.random.default_rng(10))
    _assert_identical(*_both_paths(builder, entry, model_block(odd_labels)), f"{change}, odd")
    assert not fast_builder.use_reference and not builder.use_reference


def test_fast_path_falls_back_to_the_reference_if_it_ever_differs(
    corpus_dir: Path, labels: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    info = sr_entries.ModelInfo.from_results(model_block(labels))
    entry = classified_entry(
        str(corpus_dir / "cxr10_nih_dx_8bit.dcm"), labels, np.random.default_rng(11)
    )
    classification = sr_entries.Classification.from_entry(entry, info, 0)
    header = sr_evidence.read_source_header(classification)
    real = sr_fast.encode_document
    monkeypatch.setattr(sr_fast, "encode_document", lambda sr, content: real(sr, content)[:-2])
    builder = sr_fast.SRBuilder(info, WHEN)
    encoded = builder.encode(header, classification)
    assert builder.use_reference
    assert encoded.data == sr_file.encode_reference(
        sr_tid1500.build_sr_reference(header, classification, info, WHEN)
    )
    assert any("differs from the highdicom reference" in note for _level, note in encoded.notes)


def test_jobs_change_neither_the_files_nor_their_order(
    corpus_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = load_results_json(corpus_results)
    one = sr_batch.generate_srs(document, tmp_path / "one", WHEN, jobs=1)
    monkeypatch.setattr(sr_batch, "MIN_SRS_PER_WORKER", 1)  # a pool even for 9 SRs
    two = sr_batch.generate_srs(document, tmp_path / "two", WHEN, jobs=2)
    assert [p.name for p in one.written] == [p.name for p in two.written]
    assert len(one.written) == 9 and not one.errors and not two.errors
    for first, second in zip(one.written, two.written, strict=True):
        assert first.read_bytes() == second.read_bytes()


def test_jobs_option_is_checked() -> None:
    done = run_generate("--jobs", "0")
    assert done.returncode == 2 and "--jobs" in done.stderr and "at least 1" in done.stderr


# --- sources that are gone, changed, or in an archive --------------------------------------


def test_vanished_and_changed_sources_are_reported_and_skipped(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    rng = np.random.default_rng(4)
    kept = tmp_path / "kept.dcm"
    vanished = tmp_path / "vanished.dcm"
    changed = tmp_path / "changed.dcm"
    for target in (kept, vanished, changed):
        shutil.copyfile(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm", target)
    kept_entry = classified_entry(str(kept), labels, rng)
    images = [
        classified_entry(str(vanished), labels, rng),
        classified_entry(str(changed), labels, rng),
        kept_entry,
    ]
    # Same source for three entries: make them distinct images, as they would be.
    images[0]["sop_instance_uid"] = pydicom.uid.generate_uid()
    images[1]["sop_instance_uid"] = pydicom.uid.generate_uid()
    pydicom.dcmwrite(vanished, _with_sop_uid(vanished, images[0]["sop_instance_uid"]))
    pydicom.dcmwrite(changed, _with_sop_uid(changed, images[1]["sop_instance_uid"]))
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document(images, labels))
    vanished.unlink()
    shutil.copyfile(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", changed)

    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("E: ")]
    assert len(error_lines) == 2, done.stderr
    assert str(vanished) in error_lines[0] and "gone" in error_lines[0]
    assert str(changed) in error_lines[1] and "SOPInstanceUID" in error_lines[1]
    (written,) = (tmp_path / "sr").glob("*.dcm")
    assert source_of(pydicom.dcmread(written))[2] == kept_entry["sop_instance_uid"]
    assert done.stdout.strip().endswith(
        "1 SRs written to "
        + str(tmp_path / "sr")
        + ", 0 passed over (0 skipped, 0 failed in classification), 2 errors"
    )


def _with_sop_uid(path: Path, sop_instance_uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    return ds


def test_zip_member_source(corpus_dir: Path, tmp_path: Path, labels: list[str]) -> None:
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm", "study/IMG1")
    name = f"{archive}!study/IMG1"
    entry = classified_entry(name, labels, np.random.default_rng(5))
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document([entry], labels))
    done = run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "sr").glob("*.dcm")
    assert source_of(pydicom.dcmread(written))[2] == entry["sop_instance_uid"]


def test_duplicate_entries_make_one_sr(corpus_dir: Path, tmp_path: Path, labels: list[str]) -> None:
    """cxr07 and cxr08 are one image (same SOP Instance UID, same pixels): one SR, not two."""
    rng = np.random.default_rng(6)
    first = classified_entry(
        str(corpus_dir / "cxr07_barre_CR-MONO1-10-chest_nometa.dcm"), labels, rng
    )
    second = classified_entry(
        str(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"), labels, rng
    )
    second["scores"], second["findings"] = first["scores"], first["findings"]
    document = results_document([first, second], labels)
    outcome = sr_batch.generate_srs(document, tmp_path, WHEN)
    assert len(outcome.written) == 1 and outcome.duplicates == 1 and not outcome.errors


def test_bad_entries_are_refused_one_by_one(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    """Each bad entry gets one E: line and no SR; the good ones still get theirs (issue 9.6).

    Before: the first bad entry rejected the whole results file with exit 2.
    """
    rng = np.random.default_rng(12)
    good = classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng)
    base = classified_entry(str(corpus_dir / "cxr10_nih_dx_8bit.dcm"), labels, rng)

    def variant(**changes: Any) -> dict[str, Any]:
        entry = json.loads(json.dumps(base))
        for key, value in changes.items():
            if value is None:
                del entry[key]
            else:
                entry[key] = value
        return entry

    # Each bad entry and a phrase its E: line must contain.
    bad: list[tuple[Any, str]] = [
        (variant(sop_class_uid=""), "'sop_class_uid' must be a non-empty string"),
        (variant(sop_class_uid="1.2.840.10008.5.1.4.1.1.1\n"), "SOP Class UID"),
        (variant(sop_class_uid="1.02.3"), "is not a valid DICOM UID"),
        (variant(scores=None), "lacks scores"),
        (variant(study_instance_uid=None, findings=None), "lacks study_instance_uid, findings"),
        (variant(scores={labels[0]: 0.1}), f"no score for {labels[1]}"),
        (variant(scores=dict.fromkeys(labels, "0.5")), "is not a number"),
        (variant(findings="Pneumonia"), "findings a list"),
        (variant(findings=[{"label": 1}]), "findings name unknown"),
        (variant(path=7), "'path' must be a non-empty string"),
        (variant(classified_at="yesterday"), "not an ISO 8601 time"),
        ("not an object", "images[11] has no valid 'status'"),
        (variant(status="maybe"), "images[12] has no valid 'status'"),
    ]
    images = [entry for entry, _ in bad] + [good]
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document(images, labels))
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("E: ")]
    assert len(errors) == len(bad), done.stderr
    for index, (line, (_entry, phrase)) in enumerate(zip(errors, bad, strict=True)):
        assert phrase in line, (index, line)
        assert line.endswith("no SR written"), line
    (written,) = written_srs(tmp_path / "sr").values()
    assert source_of(written)[2] == good["sop_instance_uid"]
    assert done.stdout.strip().endswith(
        f"1 SRs written to {tmp_path / 'sr'}, 0 passed over "
        f"(0 skipped, 0 failed in classification), {len(bad)} errors"
    )


def test_a_fuzzed_source_without_sop_class_uid_costs_only_its_own_sr(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    """A real file whose SOP Class UID is empty, as a fuzzer makes it, next to a good one."""
    source = pydicom.dcmread(corpus_dir / "cxr10_nih_dx_8bit.dcm")
    source.SOPClassUID = ""
    fuzzed = tmp_path / "fuzzed.dcm"
    source.save_as(fuzzed, enforce_file_format=False)
    rng = np.random.default_rng(13)
    entries = [
        classified_entry(str(fuzzed), labels, rng),
        classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng),
    ]
    assert entries[0]["sop_class_uid"] == ""
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document(entries, labels))
    done = run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 1, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("E: ")]
    assert str(fuzzed) in error and "sop_class_uid" in error
    assert len(written_srs(tmp_path / "sr")) == 1


def test_a_results_file_that_is_not_one_is_a_usage_error(tmp_path: Path, labels: list[str]) -> None:
    """File-level problems (no model block, no images list, not JSON) stay exit 2."""
    results = tmp_path / "results.json"
    for document in (
        {"format": "cxrsr-results/1", "images": []},
        {"format": "cxrsr-results/1", "model": model_block(labels), "images": {}},
    ):
        write_json_atomic(results, document)
        done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("E: ") and "Traceback" not in done.stderr
    results.write_text("{not json", encoding="utf-8")
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 2 and "not a readable results file" in done.stderr
    assert not (tmp_path / "sr").exists()
    missing = run_generate("--results", tmp_path / "nope.json")
    assert missing.returncode == 2 and "results file not found" in missing.stderr


def test_help_documents_defaults_and_exit_codes() -> None:
    done = run_generate("--help")
    assert done.returncode == 0
    for text in ("--results", "output/results.json", "--output-dir", "output/sr", "exit codes:"):
        assert text in done.stdout


# --- helpers -------------------------------------------------------------------------------


def _image_library_entry(sr: pydicom.Dataset) -> pydicom.Dataset:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImageLibrary.value:
            (group,) = item.ContentSequence
            (image,) = group.ContentSequence
            assert image.ValueType == "IMAGE"
            return image
    raise AssertionError("no Image Library (111028)")


def _all_uids(ds: pydicom.Dataset) -> list[str]:
    found: list[str] = []
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            found.extend(str(v) for v in values)
    return found


# --- content time and hostile sources ---------------------------------------------------


def test_content_date_is_when_the_result_was_made(
    corpus_dir: Path, labels: list[str], tmp_path: Path
) -> None:
    """ContentDate/Time come from the entry's classified_at, not the clock or the file's mtime."""
    rng = np.random.default_rng(3)
    entry = classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng)
    entry["classified_at"] = "2031-02-03T04:05:06+00:00"
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document([entry], labels))
    done = run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 0, done.stderr
    (sr,) = written_srs(tmp_path / "sr").values()
    assert (sr.ContentDate, sr.ContentTime) == ("20310203", "040506")
    first = next((tmp_path / "sr").glob("*.dcm")).read_bytes()
    os.utime(results, (0, 0))  # the file's time must not matter
    run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert next((tmp_path / "sr").glob("*.dcm")).read_bytes() == first


def test_a_source_highdicom_refuses_is_reported_not_a_crash(
    corpus_dir: Path, labels: list[str], tmp_path: Path
) -> None:
    """A DX-class image without Modality is classified; its SR fails with a reason, the rest go on."""
    source = pydicom.dcmread(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm")
    del source.Modality
    odd = tmp_path / "no-modality.dcm"
    source.save_as(odd)
    rng = np.random.default_rng(4)
    entries = [
        classified_entry(str(odd), labels, rng),
        classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng),
    ]
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document(entries, labels))
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert "Traceback" not in done.stderr
    assert done.returncode == 1
    assert f"E: {odd}: cannot build an SR from this source" in done.stderr
    assert len(written_srs(tmp_path / "sr")) == 1


def test_a_source_with_an_invalid_uid_gets_no_sr(
    corpus_dir: Path, labels: list[str], tmp_path: Path
) -> None:
    """An SR must reference its source's SOP Instance UID; an invalid one makes it invalid."""
    rng = np.random.default_rng(5)
    entries = [
        classified_entry(str(corpus_dir / "bad_cr_dental_panoramic.dcm"), labels, rng),
        classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng),
    ]
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document(entries, labels))
    done = run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 1
    assert "SOP Instance UID '999.999.01.23.45.6789' is not a valid DICOM UID" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(written_srs(tmp_path / "sr")) == 1


def test_clean_removes_only_this_tools_outdated_srs(
    corpus_dir: Path, labels: list[str], tmp_path: Path
) -> None:
    rng = np.random.default_rng(6)
    entry = classified_entry(str(corpus_dir / "cxr11_siim_cr_jpeg8.dcm"), labels, rng)
    results, out = tmp_path / "results.json", tmp_path / "sr"
    write_json_atomic(results, results_document([entry], labels))
    assert run_generate("-q", "--results", results, "--output-dir", out).returncode == 0
    (old,) = out.glob("*.dcm")
    shutil.copy(corpus_dir / "cxr10_nih_dx_8bit.dcm", out / "someone-elses.dcm")
    entry["scores"][labels[0]] = 0.999  # new results: a new SR instance
    write_json_atomic(results, results_document([entry], labels))
    kept = run_generate("--results", results, "--output-dir", out)
    assert old.exists() and "2 other .dcm files" in kept.stderr  # without --clean: a warning
    cleaned = run_generate("--results", results, "--output-dir", out, "--clean")
    assert cleaned.returncode == 0, cleaned.stderr
    names = sorted(p.name for p in out.glob("*.dcm"))
    assert not old.exists()
    assert "someone-elses.dcm" in names and len(names) == 2
    assert "removed 1 SRs of earlier results" in cleaned.stderr


def test_results_of_another_format_are_a_usage_error(labels: list[str], tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    document = results_document([], labels)
    document["format"] = "cxrsr-results/99"
    write_json_atomic(results, document)
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 2
    assert "results format 'cxrsr-results/99'" in done.stderr
    assert not (tmp_path / "sr").exists()


# --- time zone (issue 9.6, PS3.3 C.12.1.1.8) ------------------------------------------------


def _dates_and_times(ds: pydicom.Dataset) -> dict[str, str]:
    """Every DA, TM and DT value in the dataset, by keyword (nested ones included)."""
    return {
        element.keyword: str(element.value)
        for element in ds.iterall()
        if element.VR in ("DA", "TM", "DT") and element.value
    }


def _with_timezone(corpus_dir: Path, tmp_path: Path, offset: str | None) -> Path:
    source = pydicom.dcmread(corpus_dir / "cxr11_siim_cr_jpeg8.dcm")
    if offset is None:
        assert "TimezoneOffsetFromUTC" not in source
    else:
        source.TimezoneOffsetFromUTC = offset
    source.StudyDate, source.StudyTime = "20310202", "201500"  # a local time, as sites write
    path = tmp_path / f"tz{offset or 'none'}.dcm"
    source.save_as(path)
    return path


@pytest.mark.parametrize("offset, local", [("+0530", "093506"), ("-0800", "200506")])
def test_sr_carries_its_sources_time_zone(
    corpus_dir: Path, tmp_path: Path, labels: list[str], offset: str, local: str
) -> None:
    """Content Date/Time are stated in the source's offset, which the SR carries."""
    entry = classified_entry(
        str(_with_timezone(corpus_dir, tmp_path, offset)), labels, np.random.default_rng(14)
    )
    entry["classified_at"] = "2031-02-03T04:05:06+00:00"
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document([entry], labels))
    done = run_generate("-q", "--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 0, done.stderr
    (sr,) = written_srs(tmp_path / "sr").values()
    assert sr.TimezoneOffsetFromUTC == offset
    day = "20310203" if offset.startswith("+") else "20310202"
    assert (sr.ContentDate, sr.ContentTime) == (day, local)
    assert (sr.StudyDate, sr.StudyTime) == ("20310202", "201500")  # copied as they are
    (ours,) = [
        i for i in sr.ContributingEquipmentSequence if i.Manufacturer == "mlmed/torchxrayvision"
    ]
    assert ours.ContributionDateTime == f"{day}{local}{offset}"
    assert "+0000" not in _dates_and_times(sr).values()


def test_sr_of_a_source_without_time_zone_states_none(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    """No offset in the source: none in the SR, and its own times as UTC clock values.

    Never "+0000" beside the source's local Study Date/Time, and never the host's zone
    (here New York's): the same results give the same bytes on every host.
    """
    entry = classified_entry(
        str(_with_timezone(corpus_dir, tmp_path, None)), labels, np.random.default_rng(15)
    )
    entry["classified_at"] = "2031-02-03T04:05:06+00:00"
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document([entry], labels))
    out = tmp_path / "sr"
    env = dict(os.environ, TZ="America/New_York")  # UTC-5 in February
    done = run_script("generate_sr.py", "-q", "--results", results, "--output-dir", out, env=env)
    assert done.returncode == 0, done.stderr
    (sr,) = written_srs(out).values()
    assert "TimezoneOffsetFromUTC" not in sr
    assert (sr.ContentDate, sr.ContentTime) == ("20310203", "040506")
    assert {i.ContributionDateTime for i in sr.ContributingEquipmentSequence} == {"20310203040506"}
    assert (sr.StudyDate, sr.StudyTime) == ("20310202", "201500")
    assert not any(v.endswith("+0000") for v in _dates_and_times(sr).values())
    # The same results on the same machine: the same bytes.
    first = {p.name: p.read_bytes() for p in out.glob("*.dcm")}
    again = run_script("generate_sr.py", "-q", "--results", results, "--output-dir", out, env=env)
    assert again.returncode == 0 and {p.name: p.read_bytes() for p in out.glob("*.dcm")} == first


def test_an_invalid_source_offset_is_left_out_with_a_warning(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    entry = classified_entry(
        str(_with_timezone(corpus_dir, tmp_path, "+2500")), labels, np.random.default_rng(16)
    )
    results = tmp_path / "results.json"
    write_json_atomic(results, results_document([entry], labels))
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 0, done.stderr
    assert "source's TimezoneOffsetFromUTC '+2500' is not an offset" in done.stderr
    (sr,) = written_srs(tmp_path / "sr").values()
    assert "TimezoneOffsetFromUTC" not in sr


# --- one UID, one byte stream (issue 9.1, PS3.3 C.12.1.1.1) -----------------------------------


#: Two valid values per VR (and for attributes with enumerated values): a mutation uses
#: the first that differs from the current value.
_OTHER_VALUES: dict[str, tuple[Any, Any]] = {
    "DA": ("19991231", "19990101"),
    "TM": ("123456", "010203"),
    "DT": ("19991231123456", "19990101010203"),
    "PN": ("Other^Name", "Another^Name"),
    "AS": ("042Y", "043Y"),
    "DS": ("2.5", "3.5"),
    "IS": ("7", "8"),
    "UI": ("1.2.3.4.5", "1.2.3.4.6"),
    "CS": ("OTHER", "ANOTHER"),
    "LO": ("other", "another"),
    "SH": ("other", "another"),
    "LT": ("other", "another"),
    "ST": ("other", "another"),
    "US": (7, 8),
    "PatientSex": ("O", "M"),
    "SpecificCharacterSet": ("ISO_IR 192", "ISO_IR 100"),
    "SOPClassUID": (
        pydicom.uid.DigitalXRayImageStorageForPresentation,
        pydicom.uid.ComputedRadiographyImageStorage,
    ),
}


def _other_value(element: pydicom.DataElement) -> Any:
    """A valid value for ``element`` that differs from its current one, or ``None``."""
    candidates = _OTHER_VALUES.get(element.keyword) or _OTHER_VALUES.get(element.VR)
    if candidates is None:
        return None
    current = list(element.value) if element.VM > 1 else [element.value]
    new = next(c for c in candidates if str(c) != str(current[0]))
    return [new, *current[1:]] if element.VM > 1 else new


def test_any_change_that_reaches_the_bytes_changes_the_uid(
    corpus_dir: Path, labels: list[str]
) -> None:
    """Change any one input of the builder: the UID changes exactly when the bytes do.

    Inputs: every score and call, the classification time, the model block, and every
    top-level element of the source header. Before, the UID came from the source UID,
    model and scores only: a changed Patient's Name or classification time gave other
    bytes under the same UID.
    """
    source = corpus_dir / "cxr04_nema_RG1_JLSN.dcm"
    entry = classified_entry(str(source), labels, np.random.default_rng(17))
    entry["classified_at"] = "2031-02-03T04:05:06+00:00"
    model = model_block(labels)
    info = sr_entries.ModelInfo.from_results(model)
    classification = sr_entries.Classification.from_entry(entry, info, 0)
    header = sr_evidence.read_source_header(classification)
    builder = sr_fast.SRBuilder(info, WHEN, check_first=False)
    base = builder.encode(header, classification)
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(base.data)).SOPInstanceUID == (
        base.sop_instance_uid
    )

    outcomes: list[tuple[str, bool]] = []  # (what changed, whether the bytes changed)

    def check(what: str, encoded: sr_file.EncodedSR) -> None:
        changed = encoded.data != base.data
        assert (encoded.sop_instance_uid != base.sop_instance_uid) == changed, what
        outcomes.append((what, changed))

    for i, label in enumerate(labels):
        scores = list(classification.scores)
        scores[i] = float(np.nextafter(scores[i], 2.0))
        nudged = dataclasses.replace(classification, scores=tuple(scores))
        check(f"score of {label}", builder.encode(header, nudged))
        present = list(classification.present)
        present[i] = not present[i]
        flipped = dataclasses.replace(classification, present=tuple(present))
        check(f"call of {label}", builder.encode(header, flipped))
    assert classification.classified_at is not None
    later = classification.classified_at + datetime.timedelta(seconds=1)
    check(
        "classified_at",
        builder.encode(header, dataclasses.replace(classification, classified_at=later)),
    )
    for key, value in (
        ("weights_sha256", "6" * 64),
        ("torchxrayvision", "1.5.8"),
        ("threshold", 0.6),
        ("weights", "densenet121-res224-nih"),
    ):
        other = sr_entries.ModelInfo.from_results({**model, key: value})
        other_builder = sr_fast.SRBuilder(other, WHEN, check_first=False)
        check(f"model {key}", other_builder.encode(header, classification))

    for element in list(header):
        new = _other_value(element)
        if new is None or element.tag.group == 0x7FE0:
            continue
        mutated = copy.deepcopy(header)
        mutated[element.tag].value = new
        try:
            encoded = builder.encode(mutated, classification)
        except Exception:  # highdicom refuses some values; generate_sr reports those
            continue
        check(f"source {element.keyword or element.tag}", encoded)

    changed = {what for what, reached in outcomes if reached}
    # Everything the document says about the image and its classification reached the bytes.
    assert all(what in changed for what, _ in outcomes if not what.startswith("source "))
    for keyword in (
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "Rows",
    ):
        assert f"source {keyword}" in changed, keyword
    # And some source values do not (not copied into the SR): same bytes, same UID.
    assert any(not reached for what, reached in outcomes if what.startswith("source "))


def test_two_independent_classifications_upload_without_conflict(
    orthanc: LocalOrthanc,
    corpus_dir: Path,
    weights_cache_dir: Path,
    tmp_path: Path,
) -> None:
    """The same images classified twice from scratch (a deleted output/, another -o).

    The two results files differ only in classified_at; the SRs either are identical or
    have different UIDs, and the PACS takes both sets. Before, the second set carried
    the first set's UIDs with other Content Times, and upload_dicom.py reported
    conflicts (exit 1).
    """
    data = tmp_path / "data"
    data.mkdir()
    for name in ("cxr11_siim_cr_jpeg8.dcm", "edge_vet_dog_dx_thorax_small.dcm"):
        copy_with_new_uids(corpus_dir / name, data / name)
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        if run is runs[1]:
            time.sleep(1.5)  # Content Time has whole seconds: make sure it differs
        done = run_script(
            "process_dicom.py", data, "-o", run / "results.json", "--cache-dir",
            weights_cache_dir, "-q",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        done = run_generate("-q", "--results", run / "results.json", "--output-dir", run / "sr")
        assert done.returncode == 0, done.stderr
    first, second = ({p.name: p.read_bytes() for p in sr_files(run / "sr")} for run in runs)
    assert len(first) == len(second) == 2
    times = [
        sorted(e["classified_at"] for e in load_results_json(run / "results.json")["images"])
        for run in runs
    ]
    assert times[0] != times[1]
    for name in first.keys() & second.keys():
        assert first[name] == second[name], name  # one UID, one byte stream
    for folder in (run / "sr" for run in runs):
        for path in folder.glob("*.dcm"):
            assert pydicom.dcmread(path).SOPInstanceUID == path.stem
    # Here the Content Times differ, so the two sets are different instances.
    assert not first.keys() & second.keys()
    upload = run_script(
        "upload_dicom.py", data, runs[0] / "sr", runs[1] / "sr", "-q", env=orthanc_env(orthanc)
    )
    assert upload.returncode == 0, upload.stdout + upload.stderr
    # The two images, and two SRs and two key images from each classification.
    assert "10 stored" in upload.stdout and "0 rejected, 0 failed" in upload.stdout


# --- PixelMed's template validator -----------------------------------------------------------

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")

#: PixelMed 20220618 (Debian's libpixelmed-java) bundles CID 100 version 20190121, from
#: before (43468-8, LN, "XR unspecified body region") was added to it (cxrsr/sr/codes.py).
PIXELMED_STALE_CID_100 = (
    'Code (43468-8,LN,"XR unspecified body region") not found in context group 100'
)


def test_pixelmed_template_validator_finds_no_errors(
    corpus_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """TID 1500 as PixelMed's DicomSRValidator checks it (content, order, template ids).

    Its warnings ("Content Item not in template" for the TID 1501 qualitative evaluation
    and the newer TID 4019 Algorithm Manufacturer row) are expected. One SR: the
    validator takes 15 to 60 seconds a file.
    """
    java = require_program("java")
    if not PIXELMED_JAR.is_file():
        missing_prerequisite(f"{PIXELMED_JAR} not installed (test.sh installs libpixelmed-java)")
    _, output_dir = corpus_run
    path = sorted(output_dir.glob("*.dcm"))[0]
    limits = [f"-Djdk.xml.{name}=0" for name in ("xpathExprOpLimit", "xpathExprGrpLimit", "xpathTotalOpLimit")]  # fmt: skip
    done = subprocess.run(
        [java, *limits, "-cp", str(PIXELMED_JAR), "com.pixelmed.validate.DicomSRValidator",
         "-checkcontentitemorder", "-checktemplateid", str(path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert "Found Root Template TID_1500 (MeasurementReport)" in output, output
    assert "Root Template Validation Complete" in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert [e for e in errors if PIXELMED_STALE_CID_100 not in e] == [], output


def _sr_of_changed_source(
    source: pydicom.Dataset, tmp_path: Path, labels: list[str], seed: int
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """generate_sr.py on one classified entry whose source is ``source`` (written first);
    its run and the one SR it wrote."""
    path = tmp_path / "source.dcm"
    source.save_as(path)
    rng = np.random.default_rng(seed)
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(results_document([classified_entry(str(path), labels, rng)], labels))
    )
    done = run_generate("--results", results, "--output-dir", tmp_path / "sr")
    assert done.returncode == 0, done.stderr
    (sr_path,) = (tmp_path / "sr").glob("*.dcm")
    return done, sr_path


def _dciodvfy_errors(path: Path) -> list[str]:
    dciodvfy = require_program("dciodvfy")
    checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if "Error" in line]


def test_control_characters_in_copied_values_are_emptied_and_the_sr_stays_valid(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    """A NUL in Manufacturer (LO) or a line break in Study Description (LO) breaks PS3.5 6.2,
    which pydicom does not check; found by the fuzz test (dciodvfy: 'Character invalid')."""
    require_program("dciodvfy")
    source = pydicom.dcmread(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm")
    source.Manufacturer = "FUJIFILM Corpo\x00ation"
    source.StudyDescription = "THORAX\r\nPA"
    done, sr_path = _sr_of_changed_source(source, tmp_path, labels, seed=3)
    assert "Manufacturer" in done.stderr and "control character" in done.stderr
    assert "StudyDescription" in done.stderr
    assert _dciodvfy_errors(sr_path) == []


def test_evidence_leaves_the_source_header_as_read(corpus_dir: Path) -> None:
    """generate_sr.py builds the key image's evidence and then the SR's from one header:
    the first must not empty the header's values, or the second would not know (nor say)
    what it emptied. Elements already converted are the ones shared with the header."""
    header = pydicom.dcmread(corpus_dir / "cxr10_nih_dx_8bit.dcm", stop_before_pixels=True)
    header.PatientAge = "62"  # not an AS
    header.AccessionNumber = "x" * 40  # longer than SH allows
    header["PatientName"] = pydicom.DataElement(0x00100010, "AS", "045Y")  # a foreign VR
    header["PatientID"] = pydicom.DataElement(0x00100020, "UN", b"123456")  # placement
    # Iterating converts every element: all of them are shared with the evidence.
    before = {element.tag: (element.VR, element.value) for element in header}
    first, first_emptied = sr_evidence.evidence_dataset(header)
    _second, second_emptied = sr_evidence.evidence_dataset(header)
    assert set(first_emptied) == {"PatientAge", "AccessionNumber", "PatientName"}
    assert second_emptied == first_emptied
    assert {element.tag: (element.VR, element.value) for element in header} == before
    assert first.PatientAge is None and first.AccessionNumber == ""
    assert first["PatientName"].VR == "PN" and first["PatientID"].VR == "LO"


def test_a_copied_element_with_a_foreign_vr_gets_the_standards_and_the_sr_stays_valid(
    corpus_dir: Path, tmp_path: Path, labels: list[str]
) -> None:
    """Found by the fuzz test (seed 1, case 7170): a flipped byte turned Patient Age's tag
    into Patient's Name, so the source held Patient's Name with VR AS, and the SR copied it
    (dciodvfy: 'Invalid Value Representation AS (PN Required)'). Such an element is written
    with the standard's VR and no value; Patient ID, which places the SR, keeps its value."""
    require_program("dciodvfy")
    source = pydicom.dcmread(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm")
    source["PatientName"] = pydicom.DataElement(0x00100010, "AS", "005Y")
    source["PatientID"] = pydicom.DataElement(0x00100020, "SH", "123456")
    done, sr_path = _sr_of_changed_source(source, tmp_path, labels, seed=5)
    assert "PatientName has VR AS, where the standard says PN" in done.stderr
    written = pydicom.dcmread(sr_path)
    assert written["PatientName"].VR == "PN" and not written.PatientName
    assert (written["PatientID"].VR, written.PatientID) == ("LO", "123456")
    assert _dciodvfy_errors(sr_path) == []
