"""Tooling around the pipeline that the pipeline itself never imports.

Run from the repository root, e.g. ``python -m tools.ohif``: the OHIF viewer served in
front of Orthanc's DICOMweb, for looking at what the scripts stored.
"""
