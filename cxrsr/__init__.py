"""cxrsr: chest X-ray DICOM -> TorchXRayVision classification -> DICOM SR -> Orthanc.

The three top-level scripts (process_dicom.py, generate_sr.py, upload_dicom.py) are thin
command-line front ends; this package holds the logic, one module per concern:

- ``discovery``: find DICOM files in folders and .zip archives, recognised by content
- ``reading``: read and decode a radiograph, decide whether it is one at all
- ``preprocess``: torchxrayvision's input definition ([-1024, 1024], center crop, 224)
- ``model``: load weights, run the network in batches
- ``results``: the JSON results file shared by the scripts
- ``sr``: the TID 1500 Comprehensive 3D SR builder
- ``uids``: deterministic, PS3.5-valid UIDs
- ``orthanc``: the Orthanc REST client on urllib3
- ``header``, ``upload``: the header check before sending, upload and verification
- ``config``: settings from the environment and the project's ``.env``
- ``cli``: what the three scripts share (options, logging, exit codes)
"""

__version__ = "0.1.0"
