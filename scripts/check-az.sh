#!/usr/bin/env bash
# The deployment guides' az commands against the Azure CLI's own parser: azure-cli from PyPI in
# a venv (target/azure-cli-venv, ~3 min to install once), then scripts/check-az-commands.py.
# Without PyPI access the check is skipped with a message (the guides are unchanged by it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/azure-cli-venv
# A venv that no longer runs (e.g. the checkout moved: its scripts name their interpreter by
# absolute path) is made again.
if [ ! -x "$VENV/bin/az" ] || ! "$VENV/bin/az" --version >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q azure-cli; } > target/azure-cli-install.log 2>&1; then
    tail -3 target/azure-cli-install.log
    echo "check-az: skipped: azure-cli could not be installed from PyPI (log: target/azure-cli-install.log)"
    rm -rf "$VENV"
    exit 0
  fi
fi
python3 scripts/check-az-commands.py "$VENV/bin/az" docs/DEPLOY-*.md
