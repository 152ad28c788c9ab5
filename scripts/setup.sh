#!/usr/bin/env bash
# Install everything ipop needs on a Debian machine (as root), then run one job:
#   bash scripts/setup.sh demo     install, then run the demo overlay (`ipop demo`)
#   bash scripts/setup.sh test     install, then run the whole test suite
#   bash scripts/setup.sh install  install only
# Idempotent: a second run reuses the virtual environment in .venv.
set -euo pipefail
job="${1:-install}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (network namespaces, TUN devices and apt need it)" >&2
  exit 1
fi

APT_PACKAGES=(
  python3 python3-venv python3-pip
  iproute2 iputils-ping nftables conntrack tcpdump iperf3 ethtool procps
  prosody coturn ejabberd
  wireguard-go wireguard-tools tinc
  systemd prometheus util-linux
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup.sh: ipop needs Python 3.11 or newer ($PY is $($PY --version))" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ipop-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev,bench]'
  touch "$stamp"
fi

case "$job" in
  demo) exec .venv/bin/ipop demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q "$@" ;;
  install) echo "setup.sh: installed; run .venv/bin/ipop --help" ;;
  *) echo "setup.sh: unknown job $job (demo|test|install)" >&2; exit 2 ;;
esac
