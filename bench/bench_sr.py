#!/usr/bin/env python3
"""How fast generate_sr.py writes SRs, and where the time goes.

Builds a synthetic results file of ``--count`` classified entries. Each entry has its own
source file: a header-only copy (no Pixel Data, which generate_sr never reads) of one of a
few corpus files, with a fresh SOP Instance UID and one series per 50 images, so the
source check (UIDs re-read from the file) does its real work. Then:

1. end to end: ``cxrsr.sr.generate_srs`` on the whole file, as generate_sr.py runs it;
2. per stage, on the same entries: source header read and check, highdicom construction
   of the document, pydicom serialisation and atomic write.

Run: ``.venv/bin/python bench/bench_sr.py [--count 2000]``
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr import sr
from cxrsr.config import PROJECT_ROOT

CORPUS = PROJECT_ROOT.parent / "shared" / "cxr-corpus"
SOURCES = (
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr07_barre_CR-MONO1-10-chest_nometa.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
)
LABELS = [
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
]  # fmt: skip
#: What process_dicom.py is expected to manage on CPU (images per second), for the ratio.
CLASSIFIER_RATE = (10.0, 20.0)


def synthetic_results(count: int, folder: Path) -> dict:
    """``count`` classified entries, each with its own header-only source file."""
    rng = np.random.default_rng(0)
    headers = [
        pydicom.dcmread(CORPUS / name, stop_before_pixels=True, force=True) for name in SOURCES
    ]
    images = []
    series_uid = ""
    for index in range(count):
        header = headers[index % len(headers)]
        if index % 50 == 0:
            series_uid = generate_uid()
        header.SOPInstanceUID = generate_uid()
        header.SeriesInstanceUID = series_uid
        path = folder / f"src{index:05d}.dcm"
        pydicom.dcmwrite(path, header, enforce_file_format=False)
        scores = {label: float(rng.random()) for label in LABELS}
        images.append(
            {
                "path": str(path),
                "status": "classified",
                "sop_instance_uid": header.SOPInstanceUID,
                "series_instance_uid": header.SeriesInstanceUID,
                "study_instance_uid": header.StudyInstanceUID,
                "sop_class_uid": header.SOPClassUID,
                "patient_id": str(header.get("PatientID", "")),
                "scores": scores,
                "findings": [label for label in LABELS if scores[label] >= 0.5],
            }
        )
    model = {
        "weights": "densenet121-res224-all",
        "weights_sha256": "0" * 64,
        "torchxrayvision": "1.5.7",
        "labels": LABELS,
        "threshold": 0.5,
    }
    return {"format": "cxrsr-results/1", "model": model, "images": images}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="SRs to write (default: 2000)")
    args = parser.parse_args()
    logging.getLogger("cxrsr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="bench-sr-") as tmp:
        folder = Path(tmp)
        (folder / "src").mkdir()
        document = synthetic_results(args.count, folder / "src")

        start = time.perf_counter()
        outcome = sr.generate_srs(document, folder / "end-to-end", when)
        end_to_end = time.perf_counter() - start
        assert len(outcome.written) == args.count and not outcome.errors

        model = sr.ModelInfo.from_results(document["model"])
        stages = {"read+check source header": 0.0, "highdicom build": 0.0, "serialise+write": 0.0}
        for _index, classification in sr.classifications(document, model):
            t0 = time.perf_counter()
            header = sr.read_source_header(classification)
            t1 = time.perf_counter()
            document_sr = sr.build_sr(header, classification, model, when)
            t2 = time.perf_counter()
            sr.write_sr(document_sr, folder / "staged")
            t3 = time.perf_counter()
            stages["read+check source header"] += t1 - t0
            stages["highdicom build"] += t2 - t1
            stages["serialise+write"] += t3 - t2

    rate = args.count / end_to_end
    staged = sum(stages.values())
    print(f"generate_sr: {args.count} SRs in {end_to_end:.1f} s = {rate:.1f} SRs/s (one process)")
    for stage, seconds in stages.items():
        print(
            f"  {stage:26s} {1000 * seconds / args.count:7.1f} ms/SR  {100 * seconds / staged:5.1f} %"
        )
    low, high = CLASSIFIER_RATE
    print(
        f"ratio to process_dicom's expected {low:.0f}-{high:.0f} images/s: "
        f"{rate / high:.2f}x-{rate / low:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
