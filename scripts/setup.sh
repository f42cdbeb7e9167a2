#!/usr/bin/env bash
# forkd set-up for a fresh Debian or Ubuntu machine (run as root). Idempotent.
#   scripts/setup.sh demo   install everything, build the image, fork warm sandboxes, print timings
#   scripts/setup.sh test   install everything, then run lint, types and the whole test suite
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
action="${1:-demo}"
case "$action" in demo|test|install) ;; *) echo "usage: $0 demo|test|install" >&2; exit 2 ;; esac

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# --- host packages (only the package manager's default sources) ---------------------------------
# nftables: the egress guard of sandboxes with internet or allow-list egress (docs/network.md)
# skopeo, umoci: reading OCI/Docker images and applying their layers (forkd image import)
packages=(qemu-system-x86 qemu-utils debootstrap e2fsprogs busybox-static ca-certificates nftables
          skopeo umoci)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ "$action" = test ] && ! command -v npm >/dev/null; then packages+=(nodejs npm); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
elif [ ! -d /var/lib/apt/lists ] || [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock)" ]; then
  # apt-get download (guest kernel) needs package lists.
  apt-get update -q
fi

# --- Python environment ------------------------------------------------------------------------
stamp=".venv/.forkd-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "python environment (.venv)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"

case "$action" in
  install)
    log "installed: $(forkd --version); try 'forkd doctor'"
    ;;
  demo)
    forkd doctor || true
    log "forkd demo"
    forkd demo
    ;;
  test)
    log "ruff"; ruff check src tests bench; ruff format --check src tests bench
    log "mypy"; mypy
    if [ -d sdk/typescript ]; then
      log "TypeScript SDK: build and unit tests"
      (cd sdk/typescript && npm install --no-audit --no-fund --silent && npm test)
    fi
    log "pytest (unit, VM and daemon tiers)"
    pytest
    ;;
esac
