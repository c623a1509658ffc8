"""Read a DICOM file's header with pydicom and decide whether it is safe to send to a PACS.

A PACS that parses a file is exposed to it: Orthanc 1.10.1 segfaults on a file whose
File Meta Information element declares a value longer than the file,
which takes the server down for every user. So a file is sent only when pydicom can read
its header and every length in it is true:

* the File Meta Information group (PS3.10 7.1), walked element by element with pydicom's
  own element reader, every declared length within the file;
* the data set up to Pixel Data (``dcmread(..., stop_before_pixels=True)``, large values
  deferred rather than read, ``defer_size``), every top-level element's declared length
  within the file, and Pixel Data's own declared length too;
* SOP Class UID (0008,0016) and SOP Instance UID (0008,0018) present: Orthanc files an
  instance by them, and an SR can only reference an instance that has them.

A file that fails raises :class:`MalformedDicom` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage
from pydicom.valuerep import AMBIGUOUS_VR, VR

from cxrsr.errors import InputError

#: Values longer than this are not read while parsing, only skipped over (and their
#: declared length checked): memory per file stays small whatever the file holds.
DEFER_SIZE = 64 * 1024

#: A length field's value meaning "undefined length, ends with a delimiter" (PS3.5 7.1.1).
UNDEFINED_LENGTH = 0xFFFFFFFF

PIXEL_DATA = Tag(0x7FE0, 0x0010)
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)

# Real-world headers break VR rules all the time (UIDs with leading zeros, ...): what
# matters for sending is decided here, not in a warning per value (as cxrsr.dicomio.reading does).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


class MalformedDicom(InputError):
    """The file's header cannot be read, or declares what the file does not hold."""


def is_dicomdir(ds: Dataset) -> bool:
    """Whether the file is a DICOMDIR, the index of a CD or USB export (PS3.10 8.6)."""
    meta = getattr(ds, "file_meta", None)
    return meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage


def read_header(fh: BinaryIO, size: int) -> Dataset:
    """The data set up to Pixel Data, from an open file of ``size`` bytes that is DICOM by
    its first bytes; :class:`MalformedDicom` when it is not safe to send.

    Large values are deferred: read them while ``fh`` is still open. A DICOMDIR is
    returned without the UID check (it has no SOP instance of its own; the caller
    passes it over).
    """
    fh.seek(0)
    _check_file_meta(fh, size)
    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True, defer_size=DEFER_SIZE, force=True)
        end_of_header = fh.tell()
        # A deflated data set's lengths count inflated bytes (PS3.5 A.5): only the file
        # meta, which is never deflated, can be held against the file's size.
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        _check_lengths(ds, size, deflated)
        # pydicom converts values lazily: an element it cannot convert (an unknown VR, a
        # number that is not one) would otherwise fail later, wherever it is first read.
        _convert_every_element(ds)
        if is_dicomdir(ds):
            return ds
        for keyword, tag in (("SOPClassUID", "(0008,0016)"), ("SOPInstanceUID", "(0008,0018)")):
            if not str(ds.get(keyword) or "").strip("\0 "):
                raise MalformedDicom(f"no {_spaced(keyword)} {tag}")
        if not deflated:
            _check_pixel_data(fh, ds, end_of_header, size)
    except MalformedDicom:
        raise
    except Exception as exc:  # pydicom raises many types on damaged data; each is the reason
        raise MalformedDicom(f"pydicom cannot read the header: {exc}") from exc
    return ds


def _check_file_meta(fh: BinaryIO, size: int) -> None:
    """Every File Meta Information element's declared length fits in the file.

    Walked with pydicom's element reader (explicit VR little endian, PS3.10 7.1), values
    skipped rather than read, so a length beyond the file is seen as declared: pydicom's
    ``dcmread`` would read the short value silently and carry on.
    """
    try:
        if read_preamble(fh, force=True) is None:
            return  # no preamble and "DICM": no file meta (an ACR-NEMA style file)
        start = fh.tell()
        for elem in data_element_generator(
            fh, False, True, stop_when=_past_group(0x0002), defer_size=0
        ):
            _check_length(elem, size, "File Meta Information element")
    except MalformedDicom:
        raise
    except Exception as exc:
        raise MalformedDicom(f"pydicom cannot read the File Meta Information: {exc}") from exc
    if fh.tell() == start:
        raise MalformedDicom("'DICM' is followed by no File Meta Information")


def _convert_every_element(ds: Dataset) -> None:
    """Convert every element's value as pydicom would when it is first read, to raise here
    what would otherwise be raised wherever that happens.

    The common element (read in full, its VR unambiguous) goes straight through pydicom's
    own converter, :func:`pydicom.dataelem.convert_raw_data_element`, with the encoding
    ``Dataset.__getitem__`` would give it, and the result is dropped. Measured on the
    upload benchmark's 300 files, ``for _ in ds.iterall()`` cost 1.1 ms of CPU per file,
    three quarters of the uploader's header check, mostly in storing each converted
    element back into the data set; this costs about half of that, and on loopback the
    uploader's CPU is Orthanc's too. Everything else (sequences, deferred values,
    ambiguous VRs, Specific Character Set) takes ``Dataset.__getitem__`` itself, which
    also prepares nested data sets (their encoding, Pixel Representation) for their own
    elements.
    """
    character_set = ds.original_character_set or ds._character_set
    for tag in list(ds.keys()):  # not the Dataset itself: iterating it converts every element
        elem = ds.get_item(tag)  # as read: raw unless already converted
        # An implicit VR (None) is looked up by the converter; a lookup that gives SQ or an
        # ambiguous VR is done again below, the way Dataset.__getitem__ does it.
        if (
            isinstance(elem, RawDataElement)
            and elem.VR not in _SLOW_VRS  # None (implicit VR) included
            and (elem.value is not None or elem.length == 0)
            and tag != SPECIFIC_CHARACTER_SET
            and convert_raw_data_element(elem, encoding=character_set, ds=ds).VR not in _SLOW_VRS
        ):
            continue
        converted = ds[tag]
        if converted.VR == VR.SQ:
            for item in converted.value:
                _convert_every_element(item)


#: VRs that ``Dataset.__getitem__`` handles beyond converting: SQ (nested data sets) and
#: the ambiguous ones (corrected from Pixel Representation and friends).
_SLOW_VRS = frozenset({VR.SQ, *AMBIGUOUS_VR})


def _past_group(group: int) -> Callable[[BaseTag, str | None, int], bool]:
    return lambda tag, vr, length: tag.group != group


def _check_lengths(ds: Dataset, size: int, deflated: bool = False) -> None:
    """Every top-level element read (file meta and data set) ends within the file.

    Deferred values were skipped with a seek, which succeeds past the end of a file.
    Sequences are checked as a whole: their items lie within their declared length.
    """
    for dataset in (getattr(ds, "file_meta", Dataset()), *(() if deflated else (ds,))):
        for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset converts every element
            _check_length(dataset.get_item(tag), size, "element")


def _check_length(elem: RawDataElement | DataElement | None, size: int, what: str) -> None:
    if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
        return  # converted while parsing (read in full), or delimited rather than counted
    end = elem.value_tell + elem.length
    if elem.value_tell > size:
        raise MalformedDicom(
            f"{what} {elem.tag} starts at byte {elem.value_tell}, beyond the end of the file "
            f"({size} bytes)"
        )
    if end > size:
        raise MalformedDicom(
            f"{what} {elem.tag} declares {elem.length} bytes, "
            f"but the file ends {size - elem.value_tell} bytes after its header"
        )


def _check_pixel_data(fh: BinaryIO, ds: Dataset, end_of_header: int, size: int) -> None:
    """Pixel Data's declared length (read from its element header, not its value) fits."""
    declared: list[tuple[BaseTag, int]] = []

    def note(tag: BaseTag, vr: str | None, length: int) -> bool:
        declared.append((tag, length))
        return True  # stop before the value: only the header is read

    fh.seek(end_of_header)
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    for _ in data_element_generator(fh, implicit, little, stop_when=note):
        break
    if not declared or declared[0][0] != PIXEL_DATA or declared[0][1] == UNDEFINED_LENGTH:
        return
    length = declared[0][1]
    header = 8 if implicit else 12
    if end_of_header + header + length > size:
        raise MalformedDicom(
            f"truncated: Pixel Data {PIXEL_DATA} declares {length} bytes, "
            f"the file holds {max(0, size - end_of_header - header)}"
        )


def _spaced(keyword: str) -> str:
    """``SOPClassUID`` -> ``SOP Class UID``."""
    return keyword.replace("SOPC", "SOP C").replace("SOPI", "SOP I").replace("UID", " UID")
