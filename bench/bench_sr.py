#!/usr/bin/env python3
"""How fast generate_sr.py writes SRs, and where the time goes.

Builds a synthetic results file of ``--count`` classified entries. Each entry has its own
source file: a header-only copy (no Pixel Data, which generate_sr never reads) of one of a
few corpus files, with a fresh SOP Instance UID and one series per 50 images, so the
source check (UIDs re-read from the file) does its real work. Then:

1. end to end: ``cxrsr.sr.batch.generate_srs`` on the whole file, as generate_sr.py runs it,
   once per ``--jobs`` value (the files must be byte-identical across them);
2. per stage of the fast path, on the same entries: source header read and check,
   highdicom header (Comprehensive3DSR around an empty root), per-image highdicom items
   (IMAGE, Image Library), template fill, file encoding, atomic write;
3. with ``--reference N``: the highdicom reference build and pydicom serialisation on
   the first N entries, for comparison (the path generate_sr.py took before the template).

Run: ``.venv/bin/python bench/bench_sr.py [--count 2000] [--jobs 1 2] [--reference 50]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import itertools
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrsr.classify import PreparedImage, classified_entry
from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.reading import identity_of
from cxrsr.sr import batch as sr_batch
from cxrsr.sr import document as sr
from cxrsr.sr import entries as sr_entries
from cxrsr.sr import evidence as sr_evidence
from cxrsr.sr import fast as sr_fast
from cxrsr.sr import template as sr_template
from cxrsr.sr import tid1500 as sr_tid1500
from cxrsr.sr import uids

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
#: The issue's target for generate_sr.py with key images, in one process.
TARGET_KEY_IMAGE_RATE = 30.0


def write_pictures(results_dir: Path) -> list[dict]:
    """Per source: the preview and a heatmap, as process_dicom.py writes them (results keys)."""
    from cxrsr.classify import REDUCED_DECODE_MIN_SIZE, write_preview
    from cxrsr.dicomio.discovery import Source
    from cxrsr.dicomio.preview import png_bytes
    from cxrsr.dicomio.reading import read_radiograph
    from cxrsr.files import write_atomic
    from cxrsr.model.heatmaps import heatmap_image

    rng = np.random.default_rng(1)
    keys = []
    for index, name in enumerate(SOURCES):
        radiograph = read_radiograph(Source(str(CORPUS / name)), min_size=REDUCED_DECODE_MIN_SIZE)
        shape = (radiograph.identity["rows"], radiograph.identity["columns"])
        picture = write_preview(radiograph, shape, f"{index}", results_dir)
        heatmap = f"heatmaps/{index}.png"
        write_atomic(results_dir / heatmap, png_bytes(heatmap_image(rng.normal(size=(7, 7)))))
        keys.append({**picture, "heatmap": heatmap})
    return keys


def synthetic_results(count: int, folder: Path, pictures: list[dict] | None = None) -> dict:
    """``count`` classified entries, each with its own header-only source file.

    With ``pictures`` (from :func:`write_pictures`), entries also name a preview and a
    heatmap for the top label, so generate_sr.py writes key images.
    """
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
        prepared = PreparedImage(str(path), "ready", identity=identity_of(header))
        entry = classified_entry(prepared, scores, 0.5)
        if pictures is not None:
            picture = pictures[index % len(pictures)]
            top = max(scores, key=lambda label: scores[label])
            entry["preview"], entry["preview_crop"] = picture["preview"], picture["preview_crop"]
            entry["heatmaps"] = {top: picture["heatmap"]}
        images.append(entry)
    model = {
        "weights": "densenet121-res224-all",
        "weights_sha256": "0" * 64,
        "torchxrayvision": "1.5.7",
        "labels": LABELS,
        "threshold": 0.5,
    }
    return {"format": "cxrsr-results/1", "model": model, "images": images}


def end_to_end(
    document: dict,
    output_dir: Path,
    when: datetime.datetime,
    jobs: int,
    results_dir: Path | None = None,
) -> float:
    """Seconds for generate_srs on the whole document into ``output_dir``.

    With ``results_dir``, key images too (as generate_sr.py does by default).
    """
    start = time.perf_counter()
    outcome = sr_batch.generate_srs(document, output_dir, when, jobs=jobs, results_dir=results_dir)
    seconds = time.perf_counter() - start
    assert len(outcome.written) == len(document["images"]) and not outcome.errors
    if results_dir is not None:
        assert len(outcome.key_images) == len(document["images"])
    return seconds


def fast_stages(document: dict, output_dir: Path, when: datetime.datetime) -> dict[str, float]:
    """Seconds per stage of SRBuilder.encode + write, summed over the document.

    The two encodings stand apart: the placeholder pass (whose digest gives the UID,
    ``cxrsr.sr.uids.content_uid``) is what deriving the UID from the content costs.
    """
    model = sr_entries.ModelInfo.from_results(document["model"])
    builder = sr_fast.SRBuilder(model, when)
    stages = dict.fromkeys(
        (
            "read+check source header",
            "evidence + template lookup",
            "highdicom header",
            "highdicom IMAGE + library",
            "template fill",
            "placeholder pass + digest",
            "file encoding",
            "atomic write (fsync)",
        ),
        0.0,
    )
    names = list(stages)
    for _index, classification in sr_batch.classifications(document, model):
        ticks = [time.perf_counter()]
        header = sr_evidence.read_source_header(classification)
        ticks.append(time.perf_counter())
        evidence, _emptied = sr_evidence.evidence_dataset(header)
        template = builder.template(evidence, classification)
        ticks.append(time.perf_counter())
        document_sr = sr_tid1500.sr_document(
            evidence,
            copy.deepcopy(template.root_stub),
            header,
            classification,
            model,
            classification.content_datetime(when),
            uids.CONTENT_UID_PLACEHOLDER,
        )
        ticks.append(time.perf_counter())
        source_image = hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)
        library = sr_tid1500.image_library(evidence)
        ticks.append(time.perf_counter())

        content = template.bind(
            classification.scores, classification.present, source_image, library
        )
        ticks.append(time.perf_counter())
        placeholder = sr_template.encode_document(
            document_sr,
            content([uids.tracking_uid(uids.CONTENT_UID_PLACEHOLDER, x) for x in model.labels]),
        )
        sr_uid = uids.derive_uid(uids.SR_INSTANCE, [hashlib.sha256(placeholder).hexdigest()])
        document_sr.SOPInstanceUID = sr_uid
        document_sr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sr_uid)
        ticks.append(time.perf_counter())
        data = sr_template.encode_document(
            document_sr, content([uids.tracking_uid(sr_uid, x) for x in model.labels])
        )
        ticks.append(time.perf_counter())
        sr.write_encoded(sr.EncodedSR(str(sr_uid), data), output_dir)
        ticks.append(time.perf_counter())
        for name, (t0, t1) in zip(names, itertools.pairwise(ticks), strict=True):
            stages[name] += t1 - t0
    return stages


def reference_stages(document: dict, count: int, when: datetime.datetime) -> dict[str, float]:
    """Seconds per stage of the highdicom reference path on the first ``count`` entries."""
    model = sr_entries.ModelInfo.from_results(document["model"])
    stages = {"highdicom build": 0.0, "pydicom serialise": 0.0}
    for _index, classification in sr_batch.classifications(document, model)[:count]:
        header = sr_evidence.read_source_header(classification)
        t0 = time.perf_counter()
        document_sr = sr_tid1500.build_sr_reference(header, classification, model, when)
        t1 = time.perf_counter()
        sr.encode_reference(document_sr)
        t2 = time.perf_counter()
        stages["highdicom build"] += t1 - t0
        stages["pydicom serialise"] += t2 - t1
    return stages


def print_stages(title: str, stages: dict[str, float], count: int) -> None:
    total = sum(stages.values())
    print(f"{title}: {1000 * total / count:.1f} ms/SR = {count / total:.1f} SRs/s")
    for stage, seconds in stages.items():
        print(f"  {stage:28s} {1000 * seconds / count:7.2f} ms/SR  {100 * seconds / total:5.1f} %")


def key_images(folder: Path, count: int, when: datetime.datetime, jobs: list[int]) -> None:
    """generate_sr with and without key images on the same ``count`` entries: one process
    (the target's setting), then each of ``jobs``."""
    (folder / "src").mkdir(parents=True)
    document = synthetic_results(count, folder / "src", write_pictures(folder))
    plain = end_to_end(document, folder / "sr-only", when, 1)
    both = end_to_end(document, folder / "sr-and-key-images", when, 1, results_dir=folder)
    verdict = "PASS" if count / both >= TARGET_KEY_IMAGE_RATE else "FAIL"
    print(
        f"{verdict}: generate_sr --jobs 1 with key images: {count} images in {both:.1f} s = "
        f"{count / both:.1f} images/s (SRs only: {count / plain:.1f}/s; "
        f"target >= {TARGET_KEY_IMAGE_RATE:.0f}/s)"
    )
    for n in (n for n in jobs if n != 1):
        seconds = end_to_end(document, folder / f"key-images-{n}", when, n, results_dir=folder)
        print(f"generate_sr --jobs {n} with key images: {count / seconds:.1f} images/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="SRs to write (default: 2000)")
    parser.add_argument(
        "--jobs", type=int, nargs="+", default=[1, 2], help="end-to-end runs (default: 1 2)"
    )
    parser.add_argument(
        "--reference", type=int, default=0, metavar="N", help="time the reference on N entries"
    )
    parser.add_argument(
        "--key-images",
        type=int,
        default=300,
        metavar="N",
        help="also time generate_sr with key images on N entries, in one process and with "
        "each --jobs value (default: 300; 0 skips it)",
    )
    args = parser.parse_args()
    logging.getLogger("cxrsr").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    low, high = CLASSIFIER_RATE
    with tempfile.TemporaryDirectory(prefix="bench-sr-") as tmp:
        folder = Path(tmp)
        (folder / "src").mkdir()
        document = synthetic_results(args.count, folder / "src")
        outputs = {}
        for jobs in args.jobs:
            outputs[jobs] = folder / f"end-to-end-{jobs}"
            seconds = end_to_end(document, outputs[jobs], when, jobs)
            rate = args.count / seconds
            print(
                f"generate_sr --jobs {jobs}: {args.count} SRs in {seconds:.1f} s = "
                f"{rate:.1f} SRs/s; {rate / high:.1f}x-{rate / low:.1f}x process_dicom's "
                f"expected {low:.0f}-{high:.0f} images/s"
            )
        contents = [{p.name: p.read_bytes() for p in out.glob("*.dcm")} for out in outputs.values()]
        assert all(c == contents[0] for c in contents), "output depends on --jobs"
        print_stages(
            "fast path, one process", fast_stages(document, folder / "staged", when), args.count
        )
        staged = {p.name: p.read_bytes() for p in (folder / "staged").glob("*.dcm")}
        assert staged == contents[0], "the staged path no longer writes what generate_sr writes"
        if args.reference:
            count = min(args.reference, args.count)
            print_stages("highdicom reference", reference_stages(document, count, when), count)
        if args.key_images:
            key_images(folder / "with-key-images", args.key_images, when, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
