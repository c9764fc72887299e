# Sourced by scripts/demo, scripts/test and scripts/bench: make the repo's
# virtualenv (.venv) ready on a fresh Debian machine that has only python3.
# Idempotent and quick when nothing changed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
EXTRAS="${TESSERA_EXTRAS:-test}"

_apt_install() {
  # Debian packages are installed only when missing; needs root (CI and dev machines are).
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  ((${#missing[@]})) || return 0
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [[ "${TESSERA_NEED_TOOLS:-}" == 1 ]]; then
  # openssl for interop checks, util-linux for setpriv, sqlite3 for tamper tests, faketime for clock
  # skew, nginx for file mode
  command -v openssl >/dev/null && command -v setpriv >/dev/null && command -v sqlite3 >/dev/null \
    && command -v faketime >/dev/null && command -v nginx >/dev/null \
    || _apt_install openssl util-linux sqlite3 faketime nginx
fi
if [[ "${TESSERA_NEED_POSTGRES:-}" == 1 ]]; then
  # PostgreSQL for the datastore tests (tests/pgcluster.py runs throwaway clusters with initdb and pg_ctl);
  # Debian puts them in /usr/lib/postgresql/<version>/bin, not on PATH, which is where pgcluster looks.
  command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
    || _apt_install postgresql
fi

if [[ "${TESSERA_NEED_CFSSL:-}" == 1 ]]; then
  # CloudFlare's cfssl, the peer scripts/bench loads beside Tessera (`cfssl serve`, its HTTP sign API).
  command -v cfssl >/dev/null || _apt_install golang-cfssl
fi

stamp="$VENV/.tessera-stamp-$EXTRAS"
want="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" | sha256sum | cut -c1-16)"
if [[ ! -x "$VENV/bin/python" ]]; then
  # Debian ships ensurepip disabled until python3-venv is installed: try, then install and retry.
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    _apt_install python3-venv
    python3 -m venv "$VENV"
  fi
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$REPO[$EXTRAS]"
  echo "$want" > "$stamp"
fi
# The editable install generated the gRPC code from proto/ in place (setup.py's build hook);
# it is redone whenever a .proto or the generator is newer than that output.
gen="$REPO/tessera/v1/issuer_pb2.py"
if [[ ! -f "$gen" ]] || [[ -n "$(find "$REPO/proto" "$REPO/scripts/gen_proto.py" -newer "$gen" -print -quit)" ]]; then
  "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO" >/dev/null
fi
export PATH="$VENV/bin:$PATH"
