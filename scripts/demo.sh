#!/usr/bin/env bash
# The demo, one command: build the module and the emulator, start a local Azure SKR stack
# (skr-emulator up), run the narrated PKCS#11 walk-through against it, stop the emulator.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$(pwd)/.skr-emulator-demo"
echo "== Building the module (libskr_pkcs11.so), the emulator and the demo client"
cargo build -q -p skr-pkcs11 -p skr-emulator --lib --bins --example demo
emu=target/debug/skr-emulator
"$emu" down --dir "$dir" >/dev/null 2>&1 || true
rm -rf "$dir"
trap '"$emu" down --dir "$dir" >/dev/null 2>&1 || true' EXIT
echo "== Starting skr-emulator: MAA + Key Vault + Managed HSM + IMDS + a simulated SEV-SNP platform"
"$emu" up --dir "$dir"
# shellcheck disable=SC1091
source "$dir/env"
echo "   config for the module: $SKR_PKCS11_CONFIG"
target/debug/examples/demo "$(pwd)/target/debug/libskr_pkcs11.so" "$dir"
echo
echo "== What the emulator saw (admin counters)"
curl -s --cacert "$SKR_EMULATOR_CA" "$SKR_EMULATOR_PLATFORM_URL/admin/counters" || true
echo
