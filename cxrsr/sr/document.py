"""The SR file: its bytes, its name and how it is written.

The SOP Instance UID is derived from the document's complete content
(:func:`cxrsr.sr.uids.content_uid`): the same results make the same file, and two documents
that differ in any byte (another classification time, a value copied from a changed
source header) are two instances. Times are in the source's Timezone Offset From UTC, or
UTC clock values without an offset when the source states none (:mod:`cxrsr.sr.times`),
never the host's zone; Software Versions is :func:`cxrsr.sr.uids.software_versions`, not
the package version. So the same results give the same bytes on every host and after an
upgrade that leaves the encoding alone.

What the document holds is :mod:`cxrsr.sr.tid1500`; how it is built fast is
:mod:`cxrsr.sr.fast`; running the builder over a whole results file is
:mod:`cxrsr.sr.batch`'s job.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from cxrsr.files import write_atomic


def encode_reference(sr: Dataset) -> bytes:
    """The bytes ``write_sr`` writes for a fully built dataset (Explicit VR LE, PS3.10 file)."""
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class EncodedSR:
    """One SR document as the bytes of its file, and what to tell the user about it."""

    sop_instance_uid: str
    data: bytes
    notes: tuple[tuple[int, str], ...] = ()


def write_sr(sr: Dataset, output_dir: Path) -> Path:
    """Write a built dataset as ``<SOPInstanceUID>.dcm`` (see :func:`write_encoded`)."""
    return write_encoded(EncodedSR(str(sr.SOPInstanceUID), encode_reference(sr)), output_dir)


def write_encoded(encoded: EncodedSR, output_dir: Path) -> Path:
    """Write ``<SOPInstanceUID>.dcm`` atomically (temporary file, then ``os.replace``).

    The name is the SR's own UID, so a rerun with the same results overwrites the file with
    the same bytes, and an SR for changed results never replaces the earlier one's file.
    The folder is flushed once per batch, by :func:`cxrsr.sr.batch.generate_srs`.
    """
    target = encoded_path(encoded, output_dir)
    write_atomic(target, encoded.data, sync_folder=False)
    return target


def encoded_path(encoded: EncodedSR, output_dir: Path) -> Path:
    """Where :func:`write_encoded` writes ``encoded``: ``<SOPInstanceUID>.dcm``."""
    return output_dir / f"{encoded.sop_instance_uid}.dcm"
