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
# zstd, skopeo: the hub (forkd pack/push/pull); docker-registry: the hub tests' local registry
# umoci (and skopeo): OCI/Docker images and their layers (forkd image import)
# bubblewrap: the jail of every QEMU process (docs/security.md)
# passt (pasta): the route out of a jailed sandbox's network namespace for egress internet/CIDRs
packages=(debootstrap e2fsprogs busybox-static ca-certificates nftables zstd skopeo umoci bubblewrap passt)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if [ "$action" = test ] && ! command -v npm >/dev/null; then packages+=(nodejs npm); fi
if [ "$action" = test ]; then packages+=(docker-registry); fi
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

# --- QEMU >= 8.2 (docs/security.md): Debian 12 ships 7.2, its own bookworm-backports has 10.0 ----
qemu_packages=(qemu-system-x86 qemu-utils)
qemu_ok() {
  local v
  v="$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" || return 1
  dpkg --compare-versions "$v" ge 1:8.2 && dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q "install ok installed"
}
# The archive this host already uses for bookworm (deb822 or one-line sources), never a fixed host.
bookworm_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; hit = 0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { split(substr($i, 6), u, " "); uri = u[1] }
          if ($i ~ /^Suites:/) { n = split(substr($i, 8), s, " "); for (j = 1; j <= n; j++) if (s[j] == "bookworm") hit = 1 }
        }
        if (hit && uri != "") { print uri; exit } }' "$f"
  done
  # either file may be absent (deb822-only hosts): a failed cat must not fail the whole script
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } | awk '
    $1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                  if ($(i + 1) == "bookworm") { print $i; exit } }'
}
if ! qemu_ok; then
  qemu_target=()
  if grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      mirror="$(bookworm_mirror | head -n1)" || true  # head closing the pipe early is fine
      [ -n "$mirror" ] || { echo "no bookworm archive in the apt sources: add bookworm-backports by hand" >&2; exit 1; }
      log "apt source: bookworm-backports from $mirror (QEMU >= 8.2)"
      keyring=/usr/share/keyrings/debian-archive-keyring.gpg
      {
        echo "Types: deb"; echo "URIs: $mirror"; echo "Suites: bookworm-backports"; echo "Components: main"
        [ -f "$keyring" ] && echo "Signed-By: $keyring"
      } > /etc/apt/sources.list.d/forkd-backports.sources
    fi
    qemu_target=(-t bookworm-backports)
  fi
  log "apt-get install ${qemu_target[*]} ${qemu_packages[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${qemu_target[@]}" "${qemu_packages[@]}"
  qemu_ok || { echo "QEMU >= 8.2 could not be installed; forkd doctor says why it is needed" >&2; exit 1; }
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
