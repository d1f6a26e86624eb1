#!/usr/bin/env bash
# Install whatever Ferry needs that is missing, on Debian 12 or 13 (run as root). Idempotent and
# fast when everything is present: each step checks before it acts.
#   deploy/setup.sh            Debian packages + Python venv + unikernel builds
#   deploy/setup.sh --podman   also Podman + CRIU >= 4.1 (benchmarks, podman runtime)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

PACKAGES=(
  mosquitto mosquitto-clients
  swift swift-proxy swift-account swift-container swift-object python3-swift memcached
  qemu-system-x86 gcc make libc6-dev
  python3 python3-venv python3-dev
  iproute2 procps
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "setup: installing packages needs root" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # The packages start their system services; Ferry runs its own instances on free ports.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  for svc in mosquitto memcached swift-proxy swift-account swift-container swift-object; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Ferry needs Python >= 3.11; $PYTHON is $("$PYTHON" --version 2>&1)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.ferry-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  step "installing Ferry and its Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev,bench]'
  echo "$want" > "$stamp"
fi

if [ -f unikernel/Makefile ]; then
  step "building the unikernel apps (unix + microvm)"
  make -s -C unikernel
fi

# The official AsyncAPI parser checks schemas/asyncapi.yaml (tests/test_asyncapi.py): about 10 s
# and 55 MB from the npm registry, pinned by tests/asyncapi/package-lock.json. Node itself is not
# installed here (Debian's npm brings some 300 packages); without it those tests are skipped.
if command -v npm >/dev/null 2>&1; then
  lock=tests/asyncapi/package-lock.json
  stamp=tests/asyncapi/node_modules/.ferry-installed
  want=$(sha256sum "$lock" | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    step "installing the AsyncAPI parser into tests/asyncapi/node_modules"
    if npm ci --prefix tests/asyncapi --no-audit --no-fund --ignore-scripts --loglevel=error; then
      echo "$want" > "$stamp"
    else
      echo "setup: could not install @asyncapi/parser: its tests will be skipped" >&2
    fi
  fi
else
  echo "setup: npm not found: the AsyncAPI parser tests will be skipped (install nodejs and npm to run them)" >&2
fi

if [ "${1:-}" = "--podman" ]; then
  step "Podman + CRIU >= 4.1"
  if ! bash deploy/install-criu.sh; then
    echo "setup: Podman/CRIU unavailable: the podman runtime and its tests will be skipped" >&2
  fi
fi
step "setup complete"
