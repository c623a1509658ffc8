#!/usr/bin/env bash
# Set everything up and run the tests: ruff, then pytest against a real Orthanc,
# real DICOM validators (dciodvfy, dsrdump) and the real model architecture.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/common.sh

ensure_packages Orthanc:orthanc dsrdump:dcmtk storescu:dcmtk dciodvfy:dicom3tools openssl:openssl \
  java:default-jre-headless /usr/share/java/pixelmed.jar:libpixelmed-java \
  || say "W: integration tests will be skipped (or fail under CI) without these"
ensure_venv requirements-dev.txt
"$VENV/bin/ruff" check .
"$VENV/bin/mypy"
"$VENV/bin/python" -m pytest "$@"
