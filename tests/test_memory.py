"""Memory stays bounded on hostile headers (issue 9, item 4).

Each file is read as a process_dicom.py worker reads it (``classify.prepare``), in a
fresh process whose address space (RLIMIT_AS) is capped at what it uses after its
imports plus a margin. A hostile header must be refused by the budget check, with a
reason that names the budget, before the decoder allocates: if it were decoded, the
allocation would fail and the reason would be a MemoryError instead. Real large
radiographs must still decode within their budget under the same kind of cap.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from cxrsr.config import PROJECT_ROOT
from cxrsr.dicomio.reading import MEMORY_BUDGET

_CHILD = r"""
import json, resource, sys
from cxrsr.classify import prepare
from cxrsr.dicomio.discovery import Source
import pydicom.pixels  # the worker's decoders, imported before the cap

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

limit = vm_size() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
item = prepare(Source(sys.argv[1]))
print(json.dumps({"status": item.status, "reason": item.reason}))
"""


def prepare_capped(path: Path, headroom: int) -> dict[str, str]:
    """``prepare(path)`` in a process allowed ``headroom`` more bytes of address space."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(headroom)],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _claiming(corpus_dir: Path, name: str, rows: int, columns: int, path: Path) -> Path:
    """A real corpus file whose header claims ``rows`` x ``columns`` pixels."""
    ds = pydicom.dcmread(corpus_dir / name)
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path)
    return path


def _sparse_native(corpus_dir: Path, rows: int, columns: int, path: Path) -> Path:
    """A native 16-bit file that really holds ``rows`` x ``columns`` pixels (sparse on disk)."""
    ds = pydicom.dcmread(corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = b"\0\0"
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    length_at = len(data) - 2 - 4  # OW: tag, VR, 2 reserved bytes, 4-byte length, value
    size = rows * columns * 2
    data[length_at : length_at + 4] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data[:-2]))
    with open(path, "r+b") as fh:
        fh.truncate(len(data) - 2 + size)  # a hole: no disk space, no time
    return path


HOSTILE = {
    "RLE 16384x16384": lambda c, p: _claiming(c, "bad_cr_hand_constant_rle.dcm", 16384, 16384, p),
    "JPEG-LS 16384x16384": lambda c, p: _claiming(c, "cxr04_nema_RG1_JLSN.dcm", 16384, 16384, p),
    "JPEG 2000 16384x16384": lambda c, p: _claiming(
        c, "cxr05_dx_canon_966_fixed_j2kr.dcm", 16384, 16384, p
    ),
    "native 16384x16384": lambda c, p: _sparse_native(c, 16384, 16384, p),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_header_is_refused_before_allocating(
    kind: str, corpus_dir: Path, tmp_path: Path
) -> None:
    path = HOSTILE[kind](corpus_dir, tmp_path / "hostile.dcm")
    # 256 MiB more address space than after the imports: half of one 16384² 16-bit frame.
    result = prepare_capped(path, 256 << 20)
    assert result["status"] == "failed", result
    assert f"per-worker memory budget of {MEMORY_BUDGET >> 20:,} MiB" in result["reason"], result
    assert "16384x16384" in result["reason"]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEGLSLossless])
def test_a_large_real_radiograph_decodes_within_the_budget(
    syntax: pydicom.uid.UID, corpus_dir: Path, tmp_path: Path
) -> None:
    """4280x3520 at 15 bits (43x35 cm at 100 µm), from a real CR tiled: classified."""
    ds = pydicom.dcmread(corpus_dir / "cxr04_nema_RG1_JLSN.dcm")
    image = ds.pixel_array
    pixels = np.ascontiguousarray(np.tile(image, (3, 2))[:4280, :3520])
    ds.Rows, ds.Columns = pixels.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = pixels.tobytes()
    if syntax == JPEGLSLossless:
        ds.compress(JPEGLSLossless, pixels, encoding_plugin="pyjpegls")
    path = tmp_path / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = prepare_capped(path, MEMORY_BUDGET)
    assert result == {"status": "ready", "reason": ""}
