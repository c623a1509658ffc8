#!/usr/bin/env bash
# Set everything up and run the pipeline on data/:
#   process_dicom.py -> generate_sr.py -> upload_dicom.py, into an Orthanc on this machine.
# Safe to run again: nothing is stored twice.
# ./run.sh --demo first downloads a few public chest X-rays into data/demo/ (checked against
# pinned SHA-256 digests, licences printed) and runs on those alone, into output/demo/.
# ./run.sh --postgres keeps Orthanc's index in PostgreSQL instead of SQLite, as the hospital
# stack does, without Docker: a PostgreSQL cluster of its own on 127.0.0.1 (data in .postgres/,
# Debian 'postgresql') and the local Orthanc on it (data in .orthanc-postgres/, Debian
# 'orthanc-postgresql'). Both keep running afterwards, as the SQLite Orthanc does.
set -uo pipefail
cd "$(dirname "$0")" || exit 1
. scripts/common.sh

ensure_venv requirements.txt || { say "E: could not install the Python requirements"; exit 1; }
PY="$VENV/bin/python"
ensure_dotenv "$PY" || exit 3  # one E: line per value the readers of .env would disagree on
load_orthanc_settings "$PY" || exit 3

INPUT=data OUTPUT=output DEMO=0 POSTGRES=0
for arg in "$@"; do
  case $arg in
    --demo) DEMO=1 ;;
    --postgres) POSTGRES=1 ;;
    *) say "E: unknown argument '$arg'; usage: ./run.sh [--demo] [--postgres]"; exit 2 ;;
  esac
done
if [ $DEMO = 1 ]; then
  INPUT=data/demo OUTPUT=output/demo
  "$PY" -m cxrsr.demo --dir "$INPUT"
  rc=$?
  [ $rc -ge 2 ] && { say "E: no demo file could be downloaded (see above)"; exit 3; }
fi

# Is there anything to do?
count=$("$PY" -m cxrsr.dicomio.discovery --count-dicom "$INPUT")
if [ "$count" = 0 ]; then
  cat >&2 <<'MSG'
E: data/ holds no DICOM file. Put chest X-ray DICOM files there (any names, sub-folders or .zip
   archives), for example:
   - your own CR/DX exports (anonymised);
   - NIH ChestX-ray14 as DICOM (Google Cloud Healthcare public datasets), the SIIM-ACR
     Pneumothorax challenge set, or TCIA collections such as COVID-19-NY-SBU;
   - pydicom's and pylibjpeg-data's sample CR files.
   Then run ./run.sh again. Or try ./run.sh --demo: it downloads four public chest X-rays.
MSG
  exit 1
fi

# Make sure an Orthanc answers at ORTHANC_URL.
orthanc_status() {
  "$PY" - <<'PY'
import requests
from cxrsr.config import orthanc_settings
s = orthanc_settings()
try:
    r = requests.get(f"{s.url}/system", auth=(s.username, s.password), timeout=3)
    name = r.json().get("Name", "?") if r.status_code == 200 else ""
    print(r.status_code, name)
except (requests.RequestException, ValueError):
    print("down")
PY
}
orthanc_index() {  # Orthanc's database backend plugin; empty for its built-in SQLite
  "$PY" - <<'PY'
import requests
from cxrsr.config import orthanc_settings
s = orthanc_settings()
try:
    r = requests.get(f"{s.url}/system", auth=(s.username, s.password), timeout=3)
    print(r.json().get("DatabaseBackendPlugin") or "")
except (requests.RequestException, ValueError):
    print("")
PY
}
wait_for_orthanc() {
  for _ in $(seq 1 90); do
    [ "$(orthanc_status | cut -d' ' -f1)" = 200 ] && return 0
    sleep 1
  done
  return 1
}
answer=$(orthanc_status)
status=${answer%% *}
name=${answer#* }
if [ "$status" = 200 ] && [ "$name" != cxrsr ]; then
  say "W: the Orthanc at $ORTHANC_URL is named '$name', not this project's 'cxrsr' (orthanc.json); using it"
fi
if [ "$status" = 200 ] && [ $POSTGRES = 1 ]; then
  # Asked for PostgreSQL: an Orthanc already answering must have its index there.
  backend=$(orthanc_index)
  case $backend in
    *PostgreSQL*) ;;
    *) say "E: --postgres, but the Orthanc at $ORTHANC_URL keeps its index in ${backend:-SQLite}; stop it first (python -m cxrsr.pacs.local_orthanc stop --dir .orthanc) or point ORTHANC_URL elsewhere"
       exit 3 ;;
  esac
fi
if [ "$status" = 401 ] || [ "$status" = 403 ]; then
  say "E: an Orthanc answers at $ORTHANC_URL but refuses the credentials in .env; fix ORTHANC_USERNAME/ORTHANC_PASSWORD there (or stop that Orthanc)"
  exit 3
elif [ "$status" != 200 ] && [ $POSTGRES = 1 ]; then
  port=${ORTHANC_URL##*:}; port=${port%%/*}
  start_orthanc_on_postgres "$PY" "$port" || exit 3
  wait_for_orthanc || { say "E: Orthanc did not come up at $ORTHANC_URL"; exit 3; }
elif [ "$status" != 200 ]; then
  port=${ORTHANC_URL##*:}; port=${port%%/*}
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    "$PY" -m cxrsr.config check --orthanc-json || exit 3
    say "I: starting Orthanc with docker compose (data in the volume cxrsr_orthanc-db)"
    ORTHANC_HTTP_PORT=$port docker compose up -d || { say "E: docker compose up failed"; exit 3; }
  elif ensure_packages Orthanc:orthanc; then
    say "I: no Docker engine; starting the local Orthanc binary (data in .orthanc/db)"
    "$PY" -m cxrsr.pacs.local_orthanc start --dir .orthanc --http-port "$port" || exit 3
  else
    say "E: no Orthanc at $ORTHANC_URL, no Docker engine and no Orthanc binary. Install Docker and"
    say "   run 'docker compose up -d', or install Debian/Ubuntu's 'orthanc' package, then rerun."
    exit 3
  fi
  wait_for_orthanc || { say "E: Orthanc did not come up at $ORTHANC_URL"; exit 3; }
fi

worst=0
step() {
  "$PY" "$@"
  local rc=$?
  [ $rc -gt $worst ] && worst=$rc
  if [ $rc -ge 2 ]; then
    say "E: $1 stopped (exit $rc); see the message above"
    exit $rc
  fi
}
step process_dicom.py "$INPUT" --output "$OUTPUT/results.json"
step generate_sr.py --results "$OUTPUT/results.json" --output-dir "$OUTPUT/sr" --clean
step upload_dicom.py "$INPUT" "$OUTPUT/sr"

cat >&2 <<MSG

Done. Results: $OUTPUT/results.json   SRs: $OUTPUT/sr/
Report: $OUTPUT/report.html  (open it in a browser; it links each study into Orthanc)
Orthanc: $ORTHANC_URL/app/explorer.html  (user $ORTHANC_USERNAME, password in .env)
MSG
[ $worst -ne 0 ] && say "W: some files failed (exit $worst); each is named on an E: line above"
exit $worst
