"""The PACS side: the Orthanc REST client, the uploader and its verification, a local Orthanc
for tests and demos, OHIF, and the watcher."""
