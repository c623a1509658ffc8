"""Domain gates (issue 13): human, frontal, upright chest radiographs only, one policy.

The gates are tested on real corpus headers changed the way real files differ (a species,
a lateral view, a child, an image stored turned or mirrored), first alone
(``check_domain`` is pure), then through the real process_dicom.py with the tests'
random-weights model: a turned image must give the model the same input, and so the same
scores, as the upright original (the tolerances of tests/test_equivalence.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import require_program, run_script, sr_files
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxrsr.classify import prepare
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.domain import (
    DomainPolicy,
    Reorientation,
    age_of,
    check_domain,
    reorientation_for,
)
from cxrsr.dicomio.reading import read_radiograph
from cxrsr.model.classifier import load_classifier
from cxrsr.model.preprocess import preprocess

#: A CR CHEST PA, Patient Orientation L\F, 64-year-old patient, non-square (1955x1841).
UPRIGHT = "cxr04_nema_RG1_JLSN.dcm"
STRICT, WARN, OFF = DomainPolicy.STRICT, DomainPolicy.WARN, DomainPolicy.OFF


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.fixture
def header(corpus_dir: Path) -> Dataset:
    """A fresh copy of a real frontal adult header with no domain concerns."""
    ds = pydicom.dcmread(corpus_dir / UPRIGHT, stop_before_pixels=True)
    assert check_domain(ds).warnings == () and check_domain(ds).skip_reason is None
    return ds


# --- the gates alone ---------------------------------------------------------------------


def test_species_description_other_than_human(header: Dataset) -> None:
    header.PatientSpeciesDescription = "Feline"
    strict = check_domain(header, STRICT)
    assert strict.skip_reason == (
        "veterinary image (Feline): the model was trained on human chest X-rays"
    )
    warn = check_domain(header, WARN)
    assert warn.skip_reason is None
    assert warn.warnings == (
        "veterinary image (Feline): the model was trained on human chest X-rays "
        "(classified anyway: --domain warn)",
    )
    assert check_domain(header, OFF).warnings == ()
    header.PatientSpeciesDescription = "Homo sapiens"
    assert check_domain(header).skip_reason is None


def test_species_code_sequence(header: Dataset) -> None:
    header.PatientSpeciesCodeSequence = [code_item("448771007", "SCT", "Canis lupus familiaris")]
    reason = check_domain(header).skip_reason
    assert reason is not None
    assert "veterinary image (Canis lupus familiaris, SCT 448771007)" in reason
    header.PatientSpeciesCodeSequence = [code_item("337915000", "SCT", "Homo sapiens")]
    assert check_domain(header).skip_reason is None


@pytest.mark.parametrize(
    ("view_position", "kind"),
    [("LL", "lateral"), ("RL", "lateral"), ("RLO", "oblique"), ("LLD", "decubitus")],
)
def test_views_that_are_not_frontal(header: Dataset, view_position: str, kind: str) -> None:
    header.ViewPosition = view_position
    reason = check_domain(header).skip_reason
    assert reason == (
        f"{kind} view (View Position {view_position}): the model was trained on frontal "
        "(PA/AP) chest X-rays"
    )
    warn = check_domain(header, WARN)
    assert warn.skip_reason is None and warn.projection == view_position
    assert warn.warnings[0].startswith(f"{kind} view (View Position {view_position})")


def test_view_code_sequence(header: Dataset) -> None:
    """CID 4010 codes: a lateral code is outside the domain, a PA code names the projection."""
    del header.ViewPosition
    header.ViewCodeSequence = [code_item("399067008", "SCT", "lateral")]
    assert check_domain(header).skip_reason == (
        "lateral view (View Code Sequence lateral, SCT 399067008): the model was trained on "
        "frontal (PA/AP) chest X-rays"
    )
    header.ViewCodeSequence = [code_item("272479007", "SCT", "postero-anterior")]
    decision = check_domain(header)
    assert decision.skip_reason is None and decision.warnings == ()
    assert decision.projection == "PA"
    header.ViewPosition = "AP"
    header.ViewCodeSequence = [code_item("399348003", "SCT", "antero-posterior")]
    assert check_domain(header).projection == "AP"


def test_missing_view_is_accepted_with_a_warning(header: Dataset) -> None:
    del header.ViewPosition
    for policy in (STRICT, WARN):
        decision = check_domain(header, policy)
        assert decision.skip_reason is None
        assert decision.warnings == (
            "no View Position or View Code Sequence: the header cannot confirm a frontal "
            "(PA/AP) view",
        )
        assert decision.projection == ""
    assert check_domain(header, OFF).warnings == ()


@pytest.mark.parametrize(
    ("age", "said"),
    [
        ("007Y", "7 years (Patient Age 007Y)"),
        ("017Y", "17 years (Patient Age 017Y)"),
        ("006M", "6 months (Patient Age 006M)"),
        ("003W", "3 weeks (Patient Age 003W)"),
        ("001D", "1 day (Patient Age 001D)"),
        ("12", "12 years (Patient Age 12)"),  # NIH/SIIM exports: a bare number, in years
    ],
)
def test_children_are_classified_with_their_age(header: Dataset, age: str, said: str) -> None:
    header.PatientAge = age
    for policy in (STRICT, WARN):
        decision = check_domain(header, policy)
        assert decision.skip_reason is None
        assert decision.warnings == (
            f"paediatric patient, age {said}: the model was trained mostly on adult chest X-rays",
        )
    assert check_domain(header, OFF).warnings == ()


def test_age_from_birth_date_and_study_date(header: Dataset) -> None:
    header.PatientBirthDate, header.StudyDate = "20120615", "20190614"
    assert age_of(header) == (
        pytest.approx(83 / 12),
        "6 years (Patient Birth Date 20120615, Study Date 20190614)",
    )
    assert "age 6 years" in check_domain(header).warnings[0]
    header.StudyDate = "20300615"
    assert age_of(header) is not None and age_of(header)[0] == 18  # type: ignore[index]
    assert check_domain(header).warnings == ()
    header.PatientBirthDate = "not a date"  # cxr05 has a hash here: unknown, no warning
    assert age_of(header) is None


def test_adults_and_unknown_ages_say_nothing(header: Dataset) -> None:
    for age in ("018Y", "062Y", "81", "", "garbage"):
        header.PatientAge = age
        assert check_domain(header).warnings == (), age


def _orientation_of(stored: np.ndarray, upright: np.ndarray) -> tuple[str, str]:
    """Patient Orientation of ``stored`` by PS3.3 C.7.6.1.1.1, from where its pixels came from.

    ``upright`` holds unique values and lies L\\F (a column step goes to the patient's
    left, a row step to the feet). The first value is the direction from the first to the
    last pixel of the first row, the second from the first to the last of the first column.
    """

    def where(value: float) -> np.ndarray:
        return np.argwhere(upright == value)[0]

    def direction(start: float, end: float) -> str:
        d_row, d_column = where(end) - where(start)
        assert (d_row == 0) != (d_column == 0)
        return ("F" if d_row > 0 else "H") if d_row else ("L" if d_column > 0 else "R")

    return direction(stored[0, 0], stored[0, -1]), direction(stored[0, 0], stored[-1, 0])


#: Every way to store an image turned or mirrored, as Pillow names them.
PIL_TRANSPOSES = list(Image.Transpose)


@pytest.mark.parametrize(
    "stored_as", [None, *PIL_TRANSPOSES], ids=lambda t: getattr(t, "name", "upright")
)
def test_every_quarter_turn_and_mirror_is_undone_exactly(stored_as: Image.Transpose | None) -> None:
    upright = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    image = Image.fromarray(upright, mode="F")
    stored = np.asarray(image.transpose(stored_as) if stored_as is not None else image)
    orientation = _orientation_of(stored, upright)
    transform = reorientation_for(list(orientation))
    assert transform is not None, orientation
    assert np.array_equal(transform.apply(stored), upright)
    assert transform.is_identity == (stored_as is None)
    # Its name is the Pillow operation that does the same (the inverse of how it was stored).
    if not transform.is_identity:
        undo = _PIL_BY_NAME[transform.name]
        assert np.array_equal(np.asarray(Image.fromarray(stored, "F").transpose(undo)), upright)


_PIL_BY_NAME = {
    "flip_left_right": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_top_bottom": Image.Transpose.FLIP_TOP_BOTTOM,
    "rotate_180": Image.Transpose.ROTATE_180,
    "rotate_90_counterclockwise": Image.Transpose.ROTATE_90,
    "rotate_90_clockwise": Image.Transpose.ROTATE_270,
    "transpose": Image.Transpose.TRANSPOSE,
    "transverse": Image.Transpose.TRANSVERSE,
}


def test_orientation_is_recorded_and_applied_under_every_policy(header: Dataset) -> None:
    header.PatientOrientation = ["H", "L"]
    for policy in (STRICT, WARN, OFF):
        decision = check_domain(header, policy)
        assert decision.skip_reason is None and decision.warnings == ()
        assert decision.patient_orientation == "H\\L"
        assert decision.reorientation == Reorientation(transpose=True, flip_top_bottom=True)
        assert decision.record()["orientation_transform"] == "rotate_90_counterclockwise"


@pytest.mark.parametrize("orientation", [["A", "F"], ["LP", "F"], ["L", "FA"], ["L", "L"], ["L"]])
def test_orientations_no_turn_explains(header: Dataset, orientation: list[str]) -> None:
    header.PatientOrientation = orientation
    shown = "\\".join(orientation)
    assert check_domain(header).skip_reason == (
        f"orientation (Patient Orientation {shown}): no rotation or mirroring makes it the "
        "standard display L\\F (an oblique, lateral or tilted image plane)"
    )
    warn = check_domain(header, WARN)
    assert warn.skip_reason is None and warn.reorientation.is_identity
    assert warn.warnings[0].startswith(f"orientation (Patient Orientation {shown})")
    off = check_domain(header, OFF)
    assert off.skip_reason is None and off.warnings == () and off.reorientation.is_identity


def test_every_reason_is_given_at_once(header: Dataset) -> None:
    header.PatientSpeciesDescription = "Canine"
    header.ViewPosition = "LL"
    header.PatientOrientation = ["A", "F"]
    header.PatientAge = "005Y"
    reason = check_domain(header).skip_reason
    assert reason is not None
    assert [part.split(" (")[0] for part in reason.split("; ")] == [
        "veterinary image",
        "lateral view",
        "orientation",
    ]
    assert len(check_domain(header, WARN).warnings) == 4


def test_the_corpus_dog_has_no_species_tag(corpus_dir: Path) -> None:
    """The real dog DX THORAX says nothing of its species: the gate cannot know.

    Its header has neither Patient Species attribute (only Patient's Name "Dog^AVeryGood"
    and a processing description "CANINE LATERAL THORAX", free text no gate trusts), no
    View Position, and Patient Age 005Y: it is classified with those two warnings.
    """
    ds = pydicom.dcmread(corpus_dir / "edge_vet_dog_dx_thorax_small.dcm", stop_before_pixels=True)
    assert "PatientSpeciesDescription" not in ds and "PatientSpeciesCodeSequence" not in ds
    decision = check_domain(ds)
    assert decision.skip_reason is None
    assert [w.split(":")[0] for w in decision.warnings] == [
        "no View Position or View Code Sequence",
        "paediatric patient, age 5 years (Patient Age 005Y)",
    ]


# --- through process_dicom.py -------------------------------------------------------------


def _variant(upright: Dataset, folder: Path, name: str, **changes: Any) -> Path:
    """A copy of ``upright`` with its own SOP Instance UID, header ``changes`` and pixels."""
    ds = copy.deepcopy(upright)
    pixels = changes.pop("pixels", None)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if pixels is not None:
        pixels = np.ascontiguousarray(pixels)
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
    uid = generate_uid(entropy_srcs=["test_domain", name])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


#: Stored pixels for each variant, and the Patient Orientation they then have.
TURNS = {
    "rot90": (lambda p: np.rot90(p, 1), ["F", "R"]),  # turned a quarter counterclockwise
    "rot180": (lambda p: np.rot90(p, 2), ["R", "H"]),
    "rot270": (lambda p: np.rot90(p, 3), ["H", "L"]),
    "mirrored": (lambda p: p[:, ::-1], ["R", "F"]),
}


@pytest.fixture(scope="module")
def variants(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic variants of one real upright chest radiograph, decompressed."""
    folder = tmp_path_factory.mktemp("domain-variants")
    upright = pydicom.dcmread(corpus_dir / UPRIGHT)
    upright.decompress()
    upright.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert list(upright.PatientOrientation) == ["L", "F"]
    pixels = upright.pixel_array
    _variant(upright, folder, "upright")
    unique = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    for name, (turn, orientation) in TURNS.items():
        assert _orientation_of(turn(unique), unique) == tuple(orientation), name  # C.7.6.1.1.1
        _variant(upright, folder, name, pixels=turn(pixels), PatientOrientation=orientation)
    _variant(upright, folder, "feline", PatientSpeciesDescription="Feline", **VETERINARY)
    _variant(
        upright,
        folder,
        "dog_code",
        PatientSpeciesCodeSequence=[code_item("448771007", "SCT", "Canis lupus familiaris")],
        **VETERINARY,
    )
    _variant(upright, folder, "lateral", ViewPosition="LL")
    _variant(
        upright,
        folder,
        "lateral_code",
        ViewPosition=None,
        ViewCodeSequence=[code_item("399067008", "SCT", "lateral")],
    )
    _variant(upright, folder, "child_age", PatientAge="007Y")
    _variant(upright, folder, "child_birth", PatientBirthDate="19960101", StudyDate="20040826")
    _variant(upright, folder, "tilted", PatientOrientation=["LH", "FR"])
    return folder


#: Type 2C attributes a real veterinary header has (PS3.3 C.7.1.1, C.7.2.2): empty is allowed.
VETERINARY: dict[str, Any] = {
    "PatientBreedDescription": "",
    "PatientBreedCodeSequence": [],
    "BreedRegistrationSequence": [],
    "ResponsiblePerson": "",
    "ResponsibleOrganization": "",
    "PatientSexNeutered": "",
}

OUTSIDE = {"feline", "dog_code", "lateral", "lateral_code", "tilted"}


def run_process(
    folder: Path, out: Path, cache_dir: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    proc = run_script("process_dicom.py", folder, "-o", out, "--cache-dir", cache_dir, *args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    entries = json.loads(out.read_text())["images"]
    return proc, {Path(e["path"]).stem: e for e in entries}


@pytest.fixture(scope="module")
def strict_run(
    variants: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("strict") / "results.json"
    return run_process(variants, out, weights_cache_dir)  # the default policy, worker processes


def test_strict_skips_what_is_outside_and_says_why(strict_run) -> None:
    proc, entries = strict_run
    for name in OUTSIDE:
        assert entries[name]["status"] == "skipped", name
        assert f"W: {entries[name]['path']}: skipped: {entries[name]['reason']}" in proc.stderr
    assert entries["feline"]["reason"] == (
        "veterinary image (Feline): the model was trained on human chest X-rays"
    )
    assert "veterinary image (Canis lupus familiaris" in entries["dog_code"]["reason"]
    assert entries["lateral"]["reason"].startswith("lateral view (View Position LL)")
    assert entries["lateral_code"]["reason"].startswith("lateral view (View Code Sequence lateral")
    assert entries["tilted"]["reason"].startswith("orientation (Patient Orientation LH\\FR)")
    assert "7 classified, 5 skipped, 0 failed" in proc.stdout


def test_children_are_classified_with_a_warning_naming_the_age(strict_run) -> None:
    proc, entries = strict_run
    for name, said in (
        ("child_age", "age 7 years (Patient Age 007Y)"),
        ("child_birth", "age 8 years (Patient Birth Date 19960101, Study Date 20040826)"),
    ):
        entry = entries[name]
        assert entry["status"] == "classified"
        (warning,) = entry["warnings"]
        assert said in warning
        assert entry["domain_warnings"] == [warning]
        assert f"W: {entry['path']}: {warning}" in proc.stderr


def test_turned_images_are_recorded_and_scored_like_the_upright_one(strict_run) -> None:
    _, entries = strict_run
    upright = entries["upright"]
    assert upright["projection"] == "PA"
    assert upright["patient_orientation"] == "L\\F"
    assert upright["orientation_transform"] == "none"
    assert "warnings" not in upright and upright["domain_warnings"] == []
    expected = {
        "rot90": "rotate_90_clockwise",
        "rot180": "rotate_180",
        "rot270": "rotate_90_counterclockwise",
        "mirrored": "flip_left_right",
    }
    for name, transform in expected.items():
        entry = entries[name]
        assert entry["status"] == "classified", name
        assert entry["patient_orientation"] == "\\".join(TURNS[name][1])
        assert entry["orientation_transform"] == transform
        assert (entry["rows"], entry["columns"]) == (
            (upright["columns"], upright["rows"])
            if name in ("rot90", "rot270")
            else (upright["rows"], upright["columns"])
        )
        for label, score in upright["scores"].items():
            assert abs(entry["scores"][label] - score) <= 0.01, (name, label)


def test_turned_images_give_the_model_the_upright_input(
    variants: Path, weights_cache_dir: Path
) -> None:
    """Model input and logits within tests/test_equivalence.py's tolerances of the upright one.

    Random weights saturate scores at 0 or 1, so the logits (<= 2 % of their spread) are
    the comparison that means something. Without re-orientation the same inputs differ by
    hundreds (asserted too, so this test cannot pass by comparing an image with itself).
    """
    classifier = load_classifier(cache_dir=weights_cache_dir, backend="eager")
    upright = prepare(Source(str(variants / "upright.dcm"))).model_input
    assert upright is not None
    reference = classifier.logits(upright[None])
    for name in TURNS:
        turned = prepare(Source(str(variants / f"{name}.dcm"))).model_input
        assert turned is not None
        difference = np.abs(turned - upright)[0]
        assert difference.mean() <= 4, (name, difference.mean())
        assert np.percentile(difference[3:-3, 3:-3], 99) <= 16, name
        logits = classifier.logits(turned[None])
        assert np.abs(logits - reference).max() <= 0.02 * reference.std(), name
        as_stored = prepare(Source(str(variants / f"{name}.dcm")), OFF).model_input
        assert as_stored is not None  # off still turns: the header says how to show it
        assert np.array_equal(as_stored, turned)
    # The pixels as stored in rot90.dcm, preprocessed without turning them: far off.
    pixels = read_radiograph(Source(str(variants / "rot90.dcm"))).pixels
    as_stored = preprocess(np.ascontiguousarray(np.rot90(pixels, 1)))
    assert np.abs(as_stored - upright).mean() > 50


@pytest.fixture(scope="module")
def warn_run(
    variants: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("warn") / "results.json"
    proc, entries = run_process(
        variants, out, weights_cache_dir, "--domain", "warn", "--workers", "0"
    )
    return proc, entries, out


def test_warn_classifies_everything_with_the_reason(warn_run, strict_run) -> None:
    _, strict = strict_run
    proc, entries, _ = warn_run
    assert all(entry["status"] == "classified" for entry in entries.values())
    for name in OUTSIDE:
        (warning,) = entries[name]["domain_warnings"]
        assert warning == f"{strict[name]['reason']} (classified anyway: --domain warn)"
        assert f"W: {entries[name]['path']}: {warning}" in proc.stderr
    assert entries["lateral"]["projection"] == "LL"
    assert entries["lateral_code"]["projection"] == "lateral"
    assert entries["tilted"]["orientation_transform"] == "none"
    assert "12 classified, 0 skipped, 0 failed" in proc.stdout


def _sr_items(sr: Dataset, concept: str) -> list[Dataset]:
    """Every content item, at any depth, named by code value ``concept``."""
    found = []
    for item in sr.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == concept:
            found.append(item)
        found += _sr_items(item, concept)
    return found


def test_sr_records_the_projection_and_the_notes(warn_run, tmp_path: Path) -> None:
    """generate_sr.py: Image View from the header, the gates' warnings as visible TEXT notes."""
    dciodvfy, dsrdump = require_program("dciodvfy"), require_program("dsrdump")
    _, entries, results = warn_run
    done = run_script("generate_sr.py", "--results", results, "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    by_source = {}
    for path in sr_files(tmp_path):
        checked = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        output = checked.stdout + checked.stderr
        assert [line for line in output.splitlines() if line.startswith("Error")] == [], output
        dumped = subprocess.run([dsrdump, "-Ee", "+Pl", str(path)], capture_output=True, text=True)
        assert dumped.returncode == 0 and not dumped.stderr.startswith(("E:", "F:")), path
        sr = pydicom.dcmread(path)
        instance = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        by_source[instance.ReferencedSOPSequence[0].ReferencedSOPInstanceUID] = (sr, dumped.stdout)
    assert len(by_source) == len(entries)

    def sr_of(name: str) -> tuple[Dataset, str]:
        return by_source[entries[name]["sop_instance_uid"]]

    def notes(sr: Dataset) -> list[str]:
        return [item.TextValue for item in _sr_items(sr, "121106")]

    upright, dump = sr_of("upright")
    (view,) = _sr_items(upright, "111031")
    assert view.ConceptCodeSequence[0].CodeValue == "272479007"  # postero-anterior
    assert "postero-anterior" in dump
    assert notes(upright) == [] and _sr_items(upright, "C0034375") == []
    child, dump = sr_of("child_age")
    assert notes(child) == entries["child_age"]["domain_warnings"]
    assert "age 7 years (Patient Age 007Y)" in dump
    (container,) = _sr_items(child, "C0034375")
    assert container.ValueType == "CONTAINER" and container.RelationshipType == "CONTAINS"
    report = hd.sr.Comprehensive3DSR.from_dataset(child).content  # readers still parse it
    assert len(report.get_image_measurement_groups()) == 18
    lateral, _ = sr_of("lateral")
    assert _sr_items(lateral, "111031")[0].ConceptCodeSequence[0].CodeMeaning == "left lateral"
    assert notes(lateral)[0].startswith("lateral view (View Position LL)")
    # The notes are part of what the SR says: the same scores without them are another SR.
    assert sr_of("child_age")[0].SOPInstanceUID != sr_of("child_birth")[0].SOPInstanceUID


def test_off_ignores_the_gates(
    variants: Path, weights_cache_dir: Path, tmp_path: Path, strict_run
) -> None:
    _, strict = strict_run
    _, entries = run_process(
        variants, tmp_path / "off.json", weights_cache_dir, "--domain", "off", "--workers", "0"
    )
    assert all(entry["status"] == "classified" for entry in entries.values())
    assert all(entry["domain_warnings"] == [] for entry in entries.values())
    assert entries["rot90"]["orientation_transform"] == "rotate_90_clockwise"
    for label, score in strict["rot90"]["scores"].items():
        assert abs(entries["rot90"]["scores"][label] - score) <= 1e-4


def test_bad_policy_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_script("process_dicom.py", tmp_path, "--domain", "lenient")
    assert proc.returncode == 2
    assert "invalid choice: 'lenient'" in proc.stderr
    assert "--domain {strict,warn,off}" in run_script("process_dicom.py", "--help").stdout
