"""cxrsr: chest X-ray DICOM -> TorchXRayVision classification -> DICOM SR -> Orthanc.

The four top-level scripts (``process_dicom.py``, ``generate_sr.py``, ``upload_dicom.py``,
``watch_orthanc.py``) are thin command-line front ends; the logic is here:

- :mod:`cxrsr.dicomio`: files in, pixels and identity out (discovery of files and .zip
  archives, the header check before sending, reading and decoding, the pixel values' mapping
  to the model's range, the domain gates, the display preview);
- :mod:`cxrsr.model`: pixels in, scores and maps out (preprocessing, weights read as data,
  the ONNX Runtime and PyTorch backends, int8, heatmaps);
- :mod:`cxrsr.classify`, :mod:`cxrsr.reader_pool`: the classification run behind
  ``process_dicom.py`` (reader processes, batches);
- :mod:`cxrsr.results`, :mod:`cxrsr.results_types`, :mod:`cxrsr.journal`,
  :mod:`cxrsr.resume`: the results file, its types and JSON Schema, the journal of a run,
  and reusing unchanged files' results;
- :mod:`cxrsr.sr`: results in, DICOM objects out (the checked entries, the source header,
  the TID 1500 content, its fast builder, the file, key images, the batch behind
  ``generate_sr.py``);
- :mod:`cxrsr.report`: the HTML report beside the results file;
- :mod:`cxrsr.pacs`: the PACS side (the Orthanc REST client, upload and verification,
  DICOMweb and DIMSE targets, claims, the watcher, local Orthanc and PostgreSQL);
- :mod:`cxrsr.cli`, :mod:`cxrsr.config`, :mod:`cxrsr.errors`, :mod:`cxrsr.files`,
  :mod:`cxrsr.runlock`, :mod:`cxrsr.demo`: what every script shares (options, logging and
  exit codes; settings; error types; atomic writes; one run per output; the demo files).

Tooling the package never imports (the OHIF viewer server) is in ``tools/``.
"""

__version__ = "0.1.0"
