#!/usr/bin/env bash
# Set everything up and run the tests: ruff, then pytest against a real Orthanc,
# real DICOM validators (dciodvfy, dsrdump) and the real model architecture.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/common.sh

ensure_packages Orthanc:orthanc dsrdump:dcmtk storescu:dcmtk dciodvfy:dicom3tools openssl:openssl \
  chromium:chromium npm:npm systemd-analyze:systemd \
  java:default-jre-headless /usr/share/java/pixelmed.jar:libpixelmed-java \
  || say "W: integration tests will be skipped (or fail under CI) without these"
# OHIF's browser test needs Orthanc's DICOMweb plugin, a library with no command to look for.
# (Never orthanc-gdcm 1.5: its transcoding segfaults Orthanc 1.10.1.) The test fetches the
# OHIF viewer itself with npm into the project's git-ignored .cache/cxrsr-test/ when it is missing (then offline).
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
  || ensure_packages libOrthancDicomWeb.so:orthanc-dicomweb \
  || say "W: the OHIF test will be skipped (or fail under CI) without orthanc-dicomweb"
# Orthanc with its index in PostgreSQL (the hospital stack): a throwaway cluster per test module.
ensure_packages pg_ctlcluster:postgresql \
  /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so:orthanc-postgresql \
  || say "W: the PostgreSQL tests will be skipped (or fail under CI) without postgresql and orthanc-postgresql"
ensure_venv requirements-dev.txt
# The Ray engine (--engine ray) and its tests; run.sh does not need it.
ensure_venv requirements-ray.txt
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
