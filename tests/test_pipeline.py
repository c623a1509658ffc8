"""The three scripts end to end, as run.sh chains them, into the session's real Orthanc.

The images are corpus files with fresh UIDs, so what other tests stored cannot collide
with them, and Orthanc's instance count is compared before and after.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import orthanc_env, run_script
from pydicom.uid import generate_uid

from cxrsr.pacs.local_orthanc import LocalOrthanc

IMAGES = [
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr05_dx_canon_966_fixed_j2kr.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
]
NOT_CLASSIFIED = ["bad_ct_small.dcm", "edge_cxr_corrupt_j2k_966.dcm"]


def copy_with_new_uids(source: Path, target: Path) -> None:
    """The same image (pixel data and transfer syntax untouched) as a new instance."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target)


@pytest.mark.slow  # 104 s (plus 26 s of fixtures) on a loaded 2-core machine
def test_pipeline_lands_each_sr_in_its_image_study_and_reruns_add_nothing(
    orthanc: LocalOrthanc, corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in IMAGES + NOT_CLASSIFIED[:1]:
        copy_with_new_uids(corpus_dir / name, data / name)
    results, sr_dir = tmp_path / "results.json", tmp_path / "sr"
    server = orthanc
    env = orthanc_env(server)

    def run_all() -> list[subprocess.CompletedProcess[str]]:
        return [
            run_script(
                "process_dicom.py", data, "-o", results, "--cache-dir", weights_cache_dir, "-q"
            ),
            run_script("generate_sr.py", "--results", results, "--output-dir", sr_dir, "-q"),
            run_script("upload_dicom.py", data, sr_dir, "-q", env=env),
        ]

    before = requests.get(
        f"{server.url}/statistics", auth=(server.username, server.password), timeout=10
    ).json()["CountInstances"]
    first = run_all()
    assert [p.returncode for p in first] == [0, 0, 0], [p.stderr for p in first]
    assert "5 classified, 1 skipped, 0 failed" in first[0].stdout
    n = len(IMAGES) + 1 + 2 * len(IMAGES)  # images, the CT, one SR and key image per image
    assert f"{n} stored, 0 already stored, 0 rejected, 0 failed" in first[2].stdout
    assert f"verified {n}/{n}" in first[2].stdout
    k = len(IMAGES)  # each SR and each key image is checked against its image's study
    assert f"SRs in source study {k}/{k}, key images in source study {k}/{k}" in first[2].stdout

    auth = (server.username, server.password)

    def get(path: str) -> dict:
        return requests.get(f"{server.url}{path}", auth=auth, timeout=10).json()

    def lookup(sop_instance_uid: str) -> str:
        (match,) = requests.post(
            f"{server.url}/tools/lookup", data=sop_instance_uid, auth=auth, timeout=10
        ).json()
        return match["ID"]

    srs = [pydicom.dcmread(f) for f in sr_dir.glob("*.dcm")]
    srs = [ds for ds in srs if ds.Modality == "SR"]
    assert len(srs) == len(IMAGES)
    for sr in srs:
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        source_uid = (
            evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        )
        source_id, sr_id = lookup(source_uid), lookup(sr.SOPInstanceUID)
        source_study, sr_study = (
            get(f"/instances/{source_id}/study"),
            get(f"/instances/{sr_id}/study"),
        )
        assert sr_study["ID"] == source_study["ID"]
        assert (
            get(f"/instances/{sr_id}/patient")["ID"] == get(f"/instances/{source_id}/patient")["ID"]
        )
        sr_series, source_series = (
            get(f"/instances/{sr_id}/series"),
            get(f"/instances/{source_id}/series"),
        )
        assert sr_series["ID"] != source_series["ID"]
        assert sr_series["MainDicomTags"]["Modality"] == "SR"
        key_image = sr.PertinentOtherEvidenceSequence[0].ReferencedSeriesSequence[0]
        key_image_id = lookup(key_image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        assert get(f"/instances/{key_image_id}/study")["ID"] == source_study["ID"]
        key_image_series = get(f"/instances/{key_image_id}/series")
        assert key_image_series["ID"] not in (sr_series["ID"], source_series["ID"])
        assert key_image_series["MainDicomTags"]["Modality"] == "OT"
    count = get("/statistics")["CountInstances"]
    assert count == before + n

    second = run_all()
    assert [p.returncode for p in second] == [0, 0, 0], [p.stderr for p in second]
    assert f"0 stored, {n} already stored, 0 rejected, 0 failed" in second[2].stdout
    assert f"verified {n}/{n}" in second[2].stdout
    assert get("/statistics")["CountInstances"] == count
    assert json.loads(results.read_text())["images"]  # the results file is still there
