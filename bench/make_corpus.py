#!/usr/bin/env python3
"""Write a bench corpus of large, or of small, chest radiographs, beside the shared one.

``large``: the shared corpus's radiographs are mostly small (six of eight decode at 211-612
pixels), but archives hold detector-sized images: 12-bit 2614x3072, JPEG 2000 (lossy and
lossless), 16-bit, 8-bit JPEG, JPEG-LS. This makes one file of each from the corpus's DX
chest (``cxr05``, 2128x2000 12-bit JPEG 2000) resampled to 3072 rows by 2614 columns
(``--kinds`` picks a subset, for a worst mix alone: ``--kinds j2k-lossy,jpegls``).

``small``: the archive-scale benchmark's "small synthetic radiographs of varied sizes":
each radiograph of the shared corpus that classifies, resampled to ``--sizes`` long sides
(default 256 to 640 pixels), stored uncompressed with its own bit depth and photometric
interpretation.

Either way the folder gets a ``MANIFEST.tsv`` in the corpus's own columns, so the
benchmarks that read a corpus take it unchanged::

    .venv/bin/python bench/make_corpus.py large /tmp/large-corpus
    .venv/bin/python bench/bench_process.py --corpus /tmp/large-corpus --count 48
    .venv/bin/python bench/make_corpus.py small /tmp/small-corpus
    .venv/bin/python bench/bench_ray.py --corpus /tmp/small-corpus --n 20000

Every file is written by pydicom and its codec plugins (pylibjpeg-openjpeg for JPEG 2000,
pyjpegls for JPEG-LS, Pillow for 8-bit JPEG baseline), and read back before it is listed.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

CORPUS_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "cxr-corpus"
SOURCE = "cxr05_dx_canon_966_fixed_j2kr.dcm"
ROWS, COLUMNS = 3072, 2614
COLUMNS_OF_MANIFEST = ("filename", "expected", "transfer_syntax", "RowsxCols", "notes")


def chest_pixels(corpus: Path) -> np.ndarray:
    """The corpus DX chest, shown as MONOCHROME2, resampled to ROWS x COLUMNS, 0..1 float."""
    source = pydicom.dcmread(corpus / SOURCE)
    pixels = source.pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        pixels = 1.0 - pixels
    if source.get("PresentationLUTShape") == "INVERSE":
        pixels = 1.0 - pixels
    image = Image.fromarray(pixels, mode="F").resize((COLUMNS, ROWS), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


def base_dataset(corpus: Path, kind: str, bits: int) -> Dataset:
    """The corpus file's header as a new MONOCHROME2 instance of ``bits`` stored bits."""
    ds = pydicom.dcmread(corpus / SOURCE, stop_before_pixels=True)
    for keyword in ("PresentationLUTShape", "WindowCenter", "WindowWidth", "LossyImageCompression"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["large-set", kind, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["large-set", kind, "series"])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["large-set", kind, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _quantised(pixels: np.ndarray, bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.rint(pixels * top).astype(dtype)


def uncompressed(bits: int) -> Callable[[Dataset, np.ndarray], None]:
    def write(ds: Dataset, pixels: np.ndarray) -> None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = _quantised(pixels, bits).tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"

    return write


def pydicom_codec(syntax: str, **options: object) -> Callable[[Dataset, np.ndarray], None]:
    def write(ds: Dataset, pixels: np.ndarray) -> None:
        ds.compress(syntax, _quantised(pixels, ds.BitsStored), **options)  # type: ignore[arg-type]

    return write


def jpeg_baseline(ds: Dataset, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(_quantised(pixels, 8), mode="L").save(buffer, "JPEG", quality=90)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


KINDS: dict[str, tuple[int, Callable[[Dataset, np.ndarray], None], str]] = {
    "12bit": (12, uncompressed(12), "12-bit, explicit VR little endian"),
    "16bit": (16, uncompressed(16), "16-bit, explicit VR little endian"),
    "j2k-lossy": (12, pydicom_codec(JPEG2000, j2k_cr=[20]), "12-bit JPEG 2000, 20:1"),
    "j2k-lossless": (12, pydicom_codec(JPEG2000Lossless), "12-bit JPEG 2000 lossless"),
    "jpeg8": (8, jpeg_baseline, "8-bit JPEG baseline, quality 90"),
    "jpegls": (12, pydicom_codec(JPEGLSLossless), "12-bit JPEG-LS lossless"),
}


def small_copies(corpus: Path, folder: Path, sizes: list[int]) -> list[str]:
    """Each classifiable corpus radiograph at each long side of ``sizes``: manifest rows."""
    rows = []
    for row in read_manifest(corpus):
        if not row["expected"].startswith("classify"):
            continue
        source = pydicom.dcmread(corpus / row["filename"], force=True)
        if "TransferSyntaxUID" not in getattr(source, "file_meta", {}):
            continue  # the file without file meta: its copies would be a codec test, not size
        pixels = source.pixel_array
        for side in sizes:
            scale = side / max(pixels.shape)
            shape = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
            image = Image.fromarray(pixels.astype(np.float32), mode="F").resize(
                shape, Image.Resampling.BILINEAR
            )
            resized = np.clip(np.rint(np.asarray(image)), 0, (1 << source.BitsStored) - 1)
            ds = pydicom.dcmread(corpus / row["filename"], force=True, stop_before_pixels=True)
            entropy = ["small-set", row["filename"], str(side)]
            ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "sop"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            for keyword in ("LossyImageCompression", "LossyImageCompressionMethod"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.Rows, ds.Columns = resized.shape
            ds.BitsAllocated = 8 if source.BitsStored <= 8 else 16
            dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
            ds.PixelData = resized.astype(dtype).tobytes()
            ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
            name = f"small_{Path(row['filename']).stem}_{side}.dcm"
            ds.save_as(folder / name, enforce_file_format=True)
            if pydicom.dcmread(folder / name).pixel_array.shape != resized.shape:
                raise SystemExit(f"E: {name} does not read back")
            size = f"{ds.Columns}x{ds.Rows}"
            rows.append("\t".join((name, "classify", "Explicit VR Little Endian", size, "")))
    return rows


def read_manifest(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / "MANIFEST.tsv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("size", choices=("large", "small"), help="which corpus to make")
    parser.add_argument("folder", type=Path, help="where to write the files and MANIFEST.tsv")
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR, help="the shared corpus")
    parser.add_argument("--kinds", default=",".join(KINDS), help="large: comma list (all)")
    parser.add_argument("--sizes", default="256,320,384,448,512,640", help="small: long sides")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = ["\t".join(COLUMNS_OF_MANIFEST)]
    if args.size == "small":
        rows += small_copies(args.corpus, args.folder, [int(s) for s in args.sizes.split(",")])
        (args.folder / "MANIFEST.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        print(f"{len(rows) - 1} small radiographs in {args.folder}")
        return 0
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        parser.error(f"unknown kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    pixels = chest_pixels(args.corpus)
    for kind in kinds:
        bits, write, notes = KINDS[kind]
        ds = base_dataset(args.corpus, kind, bits)
        write(ds, pixels)
        name = f"large_{kind}.dcm"
        ds.save_as(args.folder / name, enforce_file_format=True)
        back = pydicom.dcmread(args.folder / name)
        if back.pixel_array.shape != (ROWS, COLUMNS):
            raise SystemExit(f"E: {name}: reads back as {back.pixel_array.shape}")
        syntax = back.file_meta.TransferSyntaxUID.name
        rows.append(
            "\t".join(("name", "classify", syntax, f"{COLUMNS}x{ROWS}", notes)).replace(
                "name", name, 1
            )
        )
        size = (args.folder / name).stat().st_size
        print(f"{name}: {notes}, {size / 1e6:.1f} MB")
    (args.folder / "MANIFEST.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
