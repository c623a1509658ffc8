# Shared set-up for run.sh and test.sh (sourced, not run). Idempotent: safe to run again.

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

say() { printf '%s\n' "$*" >&2; }

# The virtual environment with the given requirements file; reinstalls only when it changed.
ensure_venv() {
  local requirements=$1
  if [ ! -x "$VENV/bin/python" ]; then
    say "I: creating the virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(basename "$requirements")"
  local digest
  digest=$(cat "$requirements" requirements.txt | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    say "I: installing $requirements into $VENV (the first time takes a few minutes: PyTorch is large)"
    # torch and torchvision must come as a matching pair; pin the pair known to work.
    "$VENV/bin/python" -m pip install -qq "torch==2.14.1" "torchvision==0.29.1" \
      || "$VENV/bin/python" -m pip install --quiet "torch<2.15" "torchvision<0.30"
    "$VENV/bin/python" -m pip install -qq -r "$requirements"
    echo "$digest" > "$stamp"
  fi
}

# .env with the Orthanc URL and credentials: created with a random password on first use
# (owner-only, never committed), then checked. Never sourced: a shell would run a value
# such as $(...) as a command and read quotes its own way. Its values are read through
# python-dotenv, the scripts' own parser (python -m cxrsr.config, run with the Python given).
ensure_dotenv() {
  local py=$1
  "$py" -m cxrsr.config init || return 1
  "$py" -m cxrsr.config check
}

# ORTHANC_URL and ORTHANC_USERNAME as shell variables (for messages), not exported: the
# scripts read .env themselves. The environment wins over .env, as in the scripts.
load_orthanc_settings() {
  local py=$1
  ORTHANC_URL=$("$py" -m cxrsr.config get ORTHANC_URL) || return 1
  ORTHANC_USERNAME=$("$py" -m cxrsr.config get ORTHANC_USERNAME) || return 1
}

# Debian/Ubuntu packages, installed only when missing and when we are allowed to (root).
# Each argument is COMMAND:PACKAGE, or /ABSOLUTE/FILE:PACKAGE for a package without a command.
ensure_packages() {
  local missing=()
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] \
      || [[ "${pair%%:*}" == /* && -e "${pair%%:*}" ]] || missing+=("${pair##*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "I: installing ${missing[*]} from the system packages"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || return 1
    case " ${missing[*]} " in
      *" orthanc "*)
        # The package starts a system-wide Orthanc (no authentication, all interfaces,
        # port 8042) where systemd runs. We only want the binary: stop and disable it.
        if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled orthanc >/dev/null 2>&1; then
          systemctl disable --now orthanc >/dev/null 2>&1 || true
          say "I: disabled the orthanc system service that the package started; cxrsr runs its own"
        fi
        ;;
    esac
  else
    say "W: missing ${missing[*]}; install them with your package manager (e.g. sudo apt-get install ${missing[*]})"
    return 1
  fi
}

# A PostgreSQL cluster of the project's own (.postgres/, on 127.0.0.1) and the local Orthanc
# with its index in it (.orthanc-postgres/), for ./run.sh --postgres: the hospital stack's
# index without Docker. Both are started only if not running; their data is kept.
start_orthanc_on_postgres() {
  local py=$1 port=$2
  ensure_packages Orthanc:orthanc pg_ctlcluster:postgresql \
    /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so:orthanc-postgresql \
    || { say "E: --postgres needs Debian's orthanc, postgresql and orthanc-postgresql packages"; return 1; }
  say "I: starting PostgreSQL (data in .postgres) and the local Orthanc on it (data in .orthanc-postgres)"
  "$py" -m cxrsr.pacs.local_postgres start --dir .postgres || return 1
  "$py" -m cxrsr.pacs.local_orthanc start --dir .orthanc-postgres --http-port "$port" \
    --postgres .postgres
}
