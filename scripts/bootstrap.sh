#!/usr/bin/env bash
# Installs everything `make test` and `make demo` need, from the project's own files:
# Debian packages, the pinned Python tree (.venv), npm tooling and the LiveKit server
# built from the Go module proxy. Idempotent: each step is skipped when already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."

LIVEKIT_VERSION="v1.13.5"
CACHE_DIR="${MATRIXRTC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/matrixrtc}"
LK_BIN="$CACHE_DIR/livekit-$LIVEKIT_VERSION/livekit-server"
PY="${PYTHON:-python3}"
# docker-compose (v1) and caddy: offline checks of compose.yaml and the Caddyfile (unit tests).
APT_PACKAGES=(chromium iproute2 util-linux redis-server coturn docker-compose caddy)

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# --- Debian packages --------------------------------------------------------------
# Pinned (Debian 12 versions): the chaos suite's fault tools (make chaos, bench/chaos.py):
# libfaketime for one participant's clock, ethtool to turn off offloads on relayed links.
APT_PINNED=(faketime=0.9.10-2.1 libfaketime=0.9.10-2.1 ethtool=1:6.1-1)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
for p in "${APT_PINNED[@]}"; do
  [[ "$(dpkg-query -W -f='${Status} ${Version}' "${p%%=*}" 2>/dev/null)" == "install ok installed ${p#*=}" ]] \
    || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packaged daemons must not run system-wide: the devstack starts its own instances.
  for svc in redis-server coturn caddy; do
    (systemctl disable --now "$svc" || service "$svc" stop || true) >/dev/null 2>&1
  done
fi

# --- Python -----------------------------------------------------------------------
stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  log "creating .venv and installing requirements.lock"
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.lock
  # The project itself is used in place (no build step): a .pth puts the checkout on sys.path.
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' "$PWD" > "$site/matrixrtc-checkout.pth"
  rm -f .venv/.installed-* && touch "$stamp"
fi

# --- npm (playwright-core drives Debian's Chromium; never download a browser) -----------
if [[ ! -f node_modules/.package-lock.json ]] || ! cmp -s package-lock.json node_modules/.lock-copy; then
  log "npm ci"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null
  cp package-lock.json node_modules/.lock-copy
fi

# --- the web call client (web/): its own pinned npm tree, built by Vite into web/dist ---
if [[ ! -f web/node_modules/.package-lock.json ]] || ! cmp -s web/package-lock.json web/node_modules/.lock-copy; then
  log "npm ci (web/)"
  (cd web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp web/package-lock.json web/node_modules/.lock-copy
fi
web_stamp="web/dist/.built-$(cat web/package-lock.json web/index.html web/vite.config.ts web/tsconfig.json \
  $(find web/src -type f | sort) | sha256sum | cut -c1-16)"
if [[ ! -f "$web_stamp" ]]; then
  log "vite build (web/)"
  (cd web && npx --no-install vite build --logLevel warn >/dev/null)
  touch "$web_stamp"
fi

# --- LiveKit server, pinned, from the Go module proxy ---------------------------------
if [[ -x "$LK_BIN" ]] && "$LK_BIN" --version 2>/dev/null | grep -q "${LIVEKIT_VERSION#v}"; then
  :
else
  # The Go toolchain lives outside Debian's PATH on these machines.
  command -v go >/dev/null || export PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || { echo "bootstrap: go (>= 1.26) not found; it builds livekit-server" >&2; exit 1; }
  log "building livekit-server $LIVEKIT_VERSION (go install; a few minutes on 2 cores)"
  tmp="$CACHE_DIR/livekit-$LIVEKIT_VERSION/gobin"
  mkdir -p "$tmp"
  GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-mod=mod \
    go install "github.com/livekit/livekit-server/cmd/server@$LIVEKIT_VERSION"
  mv "$tmp/server" "$LK_BIN"
  "$LK_BIN" --version
fi
mkdir -p .cache
ln -sfn "$LK_BIN" .cache/livekit-server
log "ready: $(.venv/bin/python --version), livekit-server $("$LK_BIN" --version 2>&1 | tail -1)"
