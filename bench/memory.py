"""Peak memory of one reader process per file: the corpus, large radiographs, hostile headers.

Each file is read exactly as a process_dicom.py worker reads it (``classify.prepare``:
parse, check, decode, map to [-1024, 1024], resize to 224) in a fresh Python process,
and the script prints that process's resident-set high-water mark (``VmHWM`` from
``/proc/self/status``) after the imports and after the file, and the difference: what
the file itself cost. The worst figure is the one the README states.

The generated set (in a temporary folder, removed afterwards):

- *large*: a real radiograph (cxr04, 15-bit CR) tiled to 4280x3520 (a 43x35 cm detector
  at 100 µm), stored native, RLE and JPEG-LS; and to 8600x8600 (43x43 cm at 50 µm);
- *hostile*: real corpus files whose Rows/Columns claim 16384x16384 (or 12000x12000),
  with RLE, JPEG-LS and native pixel data: each is refused before decoding, within the
  per-worker budget (``cxrsr.dicomio.reading.MEMORY_BUDGET``).

Usage::

    .venv/bin/python bench/memory.py            # corpus + large + hostile
    .venv/bin/python bench/memory.py --skip-large
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "cxr-corpus"

CHILD = r"""
import json, sys
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from cxrsr.classify import prepare
from cxrsr.dicomio.discovery import Source
import numpy, pydicom, scipy.ndimage, skimage.transform, PIL.Image  # noqa: the worker's imports
import pydicom.pixels
base = hwm()
item = prepare(Source(sys.argv[1]))
peak = hwm()
estimate = 0
try:
    from cxrsr.dicomio.reading import decode_memory, open_dataset, _pixel_data_bytes
    with open_dataset(Source(sys.argv[1])) as ds:
        if "PixelData" in ds:
            estimate = decode_memory(ds, _pixel_data_bytes(ds))
except Exception:
    pass
print(json.dumps({"base": base, "peak": peak, "estimate": estimate, "status": item.status,
                  "reason": item.reason}))
"""


def measure(path: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if out.returncode != 0:
        return {"base": 0, "peak": 0, "status": f"died ({out.returncode})", "reason": ""}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiled(ds, rows: int, columns: int):  # type: ignore[no-untyped-def]
    import numpy as np

    image = ds.pixel_array
    reps = (-(-rows // image.shape[0]), -(-columns // image.shape[1]))
    return np.ascontiguousarray(np.tile(image, reps)[:rows, :columns])


def make_large(folder: Path) -> list[Path]:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

    made = []
    source = pydicom.dcmread(CORPUS / "cxr04_nema_RG1_JLSN.dcm")
    for rows, columns, syntaxes in (
        (4280, 3520, (ExplicitVRLittleEndian, RLELossless, JPEGLSLossless)),
        (8600, 8600, (ExplicitVRLittleEndian, JPEGLSLossless)),
    ):
        pixels = tiled(source, rows, columns)
        for syntax in syntaxes:
            ds = pydicom.dcmread(CORPUS / "cxr04_nema_RG1_JLSN.dcm")
            ds.Rows, ds.Columns = rows, columns
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = pixels.tobytes()
            if syntax != ExplicitVRLittleEndian:
                plugin = {"encoding_plugin": "pyjpegls"} if syntax == JPEGLSLossless else {}
                ds.compress(syntax, pixels, **plugin)
            path = folder / f"large_{rows}x{columns}_{syntax.name.split()[0]}.dcm"
            ds.save_as(path, enforce_file_format=True)
            made.append(path)
    return made


def make_hostile(folder: Path) -> list[Path]:
    import pydicom

    made = []
    for name, size in (
        ("bad_cr_hand_constant_rle.dcm", 16384),  # RLE
        ("cxr04_nema_RG1_JLSN.dcm", 16384),  # JPEG-LS
        ("cxr05_dx_canon_966_fixed_j2kr.dcm", 16384),  # JPEG 2000
        ("cxr04_nema_RG1_JLSN.dcm", 12000),
    ):
        ds = pydicom.dcmread(CORPUS / name)
        ds.Rows = ds.Columns = size
        path = folder / f"hostile_{size}_{name}"
        ds.save_as(path)
        made.append(path)
    # A JPEG-LS stream that really is 16384x16384 (a radiograph in a black field): a few
    # hundred kB on disk, gigabytes once decoded and mapped.
    import numpy as np
    from pydicom.uid import JPEGLSLossless

    ds = pydicom.dcmread(CORPUS / "cxr04_nema_RG1_JLSN.dcm")
    field = np.zeros((16384, 16384), dtype=np.uint16)
    real = ds.pixel_array
    field[: real.shape[0], : real.shape[1]] = real
    ds.Rows = ds.Columns = 16384
    ds.compress(JPEGLSLossless, field, encoding_plugin="pyjpegls")
    del field
    path = folder / "hostile_jpegls_true_16384.dcm"
    ds.save_as(path)
    made.append(path)
    # Native data that really is 12000x9000 16-bit (216 MB): too big to decode in budget.
    ds = pydicom.dcmread(CORPUS / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm")
    ds.Rows, ds.Columns = 12000, 9000
    ds.PixelData = bytes(12000 * 9000 * 2)
    path = folder / "hostile_native_12000x9000.dcm"
    ds.save_as(path)
    made.append(path)
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true", help="corpus and hostile only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cxrsr-memory-") as tmp:
        folder = Path(tmp)
        groups = {"corpus": sorted(CORPUS.glob("*.dcm")), "hostile": make_hostile(folder)}
        if not args.skip_large:
            groups["large"] = make_large(folder)
        worst = (0, "")
        for group, paths in groups.items():
            print(f"== {group}")
            for path in paths:
                result = measure(path)
                base, peak = int(result["base"]), int(result["peak"])  # type: ignore[call-overload]
                cost = max(peak - base, 0)
                estimate = int(result.get("estimate", 0))  # type: ignore[call-overload]
                reason = str(result["reason"])[:70]
                print(
                    f"{path.name[:44]:44} {result['status']:8} peak {peak / 2**20:5.0f} MiB"
                    f"  cost {cost / 2**20:5.0f}  budget estimate {estimate / 2**20:6.0f}  {reason}"
                )
                if peak > worst[0]:
                    worst = (peak, path.name)
        print(f"worst peak RSS of one reader process: {worst[0] / 2**20:.0f} MB ({worst[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
