"""One C-STORE request (PS3.7 9.1.1) on an established association, from a checked file.

The common case sends the file's own data set bytes, exactly those the header check
passed (:func:`cxrsr.pacs.upload.read_checked`), on a presentation context whose transfer
syntax is the file's own: nothing is decoded or encoded again. pynetdicom's
``send_c_store`` would read the file into a pydicom data set and write it back out
(measured with ``bench/bench_targets.py``: 5 to 15 ms of CPU per radiograph in the
upload process, which holds the GIL while every other worker waits, against well under
1 ms for the walk below; STOW-RS and Orthanc's REST API send the file's bytes too).

A data set is decoded and encoded again only when it must be:

* the peer accepted none of the file's own transfer syntax, only another uncompressed
  one, which pynetdicom converts to without loss (a compressed file is never transcoded:
  the peer then has no context for it, and pynetdicom raises ``ValueError``);
* a top-level value of odd length, which PS3.5 7.1.1 forbids and a DCMTK-based peer
  (Orthanc) aborts the association for ("Odd Fragment Length"): OB and UN values get
  their padding byte (:func:`pad_odd_values`);
* a deflated data set, whose element lengths cannot be walked without inflating it, or
  File Meta Information whose group length does not lead to the data set.
"""

from __future__ import annotations

import struct
import time
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext

from cxrsr.pacs.upload import Checked

#: A length field's value meaning "undefined length, ends with a delimiter" (PS3.5 7.1.1).
UNDEFINED_LENGTH = 0xFFFFFFFF
#: The Low priority pynetdicom's ``send_c_store`` uses too (PS3.7 9.1.1.1).
PRIORITY_LOW = 2
#: VRs whose odd-length values pydicom writes unpadded, and their padding (PS3.5 6.2).
_BYTE_VRS = ("OB", "UN")


def send_c_store(assoc: Association, checked: Checked) -> Dataset:
    """Send ``checked`` and return the C-STORE response's status data set (empty when the
    peer gave no answer). ``ValueError`` when the peer accepted no context that can carry
    it losslessly; ``RuntimeError``/``OSError`` when the association is gone."""
    context = _own_context(assoc, checked)
    payload = data_set_bytes(checked) if context is not None else None
    if context is None or payload is None or not _raw_sending_available(assoc):
        return assoc.send_c_store(decoded(checked))
    return _send_raw(assoc, checked, context, payload)


def _own_context(assoc: Association, checked: Checked) -> PresentationContext | None:
    """The accepted context for the file's SOP class in the file's own transfer syntax."""
    for context in assoc.accepted_contexts:
        if (
            context.abstract_syntax == checked.sop_class_uid
            and context.transfer_syntax
            and context.transfer_syntax[0] == checked.transfer_syntax
            and context.as_scu is not False
        ):
            return context
    return None


def data_set_bytes(checked: Checked) -> bytes | None:
    """The file's data set as encoded (without preamble and File Meta Information), or
    ``None`` when it has to be decoded and written anew (see the module docstring)."""
    syntax = UID(checked.transfer_syntax)
    if syntax == DeflatedExplicitVRLittleEndian or not syntax.is_transfer_syntax:
        return None
    data = checked.data
    offset = _data_set_offset(data)
    if offset is None or _has_odd_length(data, offset, syntax):
        return None
    return data[offset:]


def _data_set_offset(data: bytes) -> int | None:
    """Where the data set starts: after the File Meta Information, whose length its
    (0002,0000) group length element gives (PS3.10 7.1); 0 without preamble and meta."""
    if data[128:132] != b"DICM":
        return None if data[:2] == b"\x02\x00" else 0  # meta without preamble: let pydicom
    # (0002,0000) UL, explicit VR little endian: tag, "UL", length 4, value.
    if data[132:138] != b"\x02\x00\x00\x00UL" or len(data) < 144:
        return None
    (group_length,) = struct.unpack_from("<I", data, 140)
    offset = 144 + group_length
    if offset > len(data) or data[offset : offset + 2] == b"\x02\x00":
        return None  # a wrong group length: the next element is still file meta
    return offset


def _has_odd_length(data: bytes, offset: int, syntax: UID) -> bool:
    """Whether a top-level element of the data set declares an odd length (values are
    skipped, not read: ``defer_size=0``)."""
    stream = BytesIO(data)
    stream.seek(offset)
    elements = data_element_generator(
        stream, syntax.is_implicit_VR, syntax.is_little_endian, defer_size=0
    )
    try:
        return any(_odd(element) for element in elements)
    except Exception:  # whatever pydicom raises on a damaged tail: decoded, as it was
        return True


def _odd(element: Any) -> bool:
    """Whether a top-level element declares an odd length. A sequence comes as a
    DataElement, read whole; its items are not padded either way. Every other element
    is a RawDataElement with its declared length."""
    length = getattr(element, "length", UNDEFINED_LENGTH)
    return bool(length != UNDEFINED_LENGTH and length % 2)


def _raw_sending_available(assoc: Association) -> bool:
    """Whether this pynetdicom has the internals :func:`_send_raw` drives (pynetdicom
    3.x); otherwise its public ``send_c_store`` is used."""
    return all(
        hasattr(assoc, name)
        for name in ("_reactor_checkpoint", "_is_paused", "_check_received_status", "dimse")
    )


def _send_raw(
    assoc: Association, checked: Checked, context: PresentationContext, payload: bytes
) -> Dataset:
    """``payload`` as the data set of a C-STORE request on ``context``: what pynetdicom's
    ``Association.send_c_store`` does after encoding its data set, the encoding left out."""
    request = C_STORE()
    request.MessageID = 1
    request.Priority = PRIORITY_LOW
    request.AffectedSOPClassUID = UID(checked.sop_class_uid)
    request.AffectedSOPInstanceUID = UID(checked.sop_instance_uid)
    request.DataSet = BytesIO(payload)
    internals: Any = assoc
    # Pause the association's reactor, as send_c_store does, so that it does not take
    # the response off the queue before get_msg waits for it.
    internals._reactor_checkpoint.clear()
    while not internals._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, int(context.context_id or 0))
        _context_id, response = assoc.dimse.get_msg(block=True)
    finally:
        internals._reactor_checkpoint.set()
    if response is None:  # the DIMSE timeout expired: pynetdicom aborts the association
        internals._handle_no_response()
        return Dataset()
    status: Dataset = internals._check_received_status(response)
    return status


def keep_responses(assoc: Association) -> None:
    """Give a response the association's reactor thread takes off the DIMSE queue back
    to the queue, for the request that waits for it.

    pynetdicom pauses that thread around each request (``_reactor_checkpoint``), but the
    flag it waits on (``_is_paused``) can still read True from the thread's previous
    pause while it is already running again: it then takes the response, drops it as
    "unexpected", and the request waits out the whole DIMSE timeout ("no C-STORE
    answer"). Seen once in the first run of ``bench/bench_targets.py``, a 35 s run for
    150 files, and in a two-association test, where back-to-back C-STOREs hit it.
    """
    internals: Any = assoc
    serve = getattr(internals, "_serve_request", None)
    queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if serve is None or queue is None:
        return

    def serve_or_give_back(message: Any, context_id: int) -> None:
        if getattr(message, "is_valid_response", False):
            queue.put((context_id, message))
        else:
            serve(message, context_id)

    internals._serve_request = serve_or_give_back


def decoded(checked: Checked) -> Dataset:
    """The file's data set read by pydicom, for pynetdicom to encode in the transfer
    syntax the peer accepted; odd-length byte values padded."""
    dataset = pydicom.dcmread(BytesIO(checked.data), force=True)
    # A file without File Meta Information: pynetdicom needs its encoding named.
    dataset.file_meta.TransferSyntaxUID = UID(checked.transfer_syntax)
    pad_odd_values(dataset)
    return dataset


def pad_odd_values(dataset: Dataset) -> None:
    """Pad each odd-length OB or UN value with one NUL byte, as PS3.5 6.2 requires.

    A file may carry, say, 8-bit Pixel Data of odd length (169 x 211 pixels): Orthanc's
    REST API stores it as it is, but over DIMSE the data set is then of odd length, and
    a DCMTK-based peer (Orthanc) aborts the association ("Odd Fragment Length"). The
    padding byte follows the last pixel; no value changes.
    """
    for element in dataset:
        if element.VR in _BYTE_VRS and isinstance(element.value, bytes) and len(element.value) % 2:
            element.value = element.value + b"\0"
