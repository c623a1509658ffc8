"""The PACS side: the Orthanc REST client, the uploader and its verification, the DICOMweb and
DIMSE targets, claims, the watcher, and a local Orthanc and PostgreSQL for tests and demos."""
