#!/usr/bin/env bash
# The long C API stress run (issue 11; the suite runs a bounded ~1 M-call one): p11-stress
# against this module (skr-emulator on loopback) and, for comparison, against SoftHSMv2 with
# an RSA, an EC and an AES key. A fresh seed per run unless SEED is set; the seed is printed,
# and a single-threaded run (THREADS=1) with it replays the same calls (add --trace to name
# each call, e.g. to locate a crash).
# Usage: scripts/stress.sh [STEPS] [THREADS]    (default 7000000 steps ≈ 10 M calls, 2 threads)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-7000000}; THREADS=${2:-2}; SEED=${SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
cargo build -q -p skr-pkcs11 -p skr-emulator -p pkcs11-conformance
W=$(mktemp -d /tmp/skr-stress.XXXXXX)
trap 'target/debug/skr-emulator down --dir "$W/emu" >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
status=0

echo "== skr-pkcs11: $STEPS steps, $THREADS threads, seed $SEED"
target/debug/skr-emulator up --dir "$W/emu" >/dev/null
(
  # shellcheck disable=SC1091
  source "$W/emu/env"; export SKR_PKCS11_CONFIG
  # The module's log (a line per login) goes to a file; its last lines show on a failure.
  time target/debug/p11-stress --module "$(pwd)/target/debug/libskr_pkcs11.so" --token-label skr-demo \
    --steps "$STEPS" --threads "$THREADS" --seed "$SEED" 2> "$W/module.log"
) || { status=$?; tail -20 "$W/module.log"; }
echo "module log: $(grep -c ' INFO: C_Login' "$W/module.log" || true) logins, $(grep -c ' ERROR: ' "$W/module.log" || true) error lines"
grep ' ERROR: ' "$W/module.log" | head -5 || true

echo; echo "== SoftHSMv2 $(dpkg-query -W -f='${Version}' softhsm2 2>/dev/null): $STEPS steps, $THREADS threads, seed $SEED"
SOFTHSM=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)
mkdir -p "$W/softhsm/tokens"; echo "directories.tokendir = $W/softhsm/tokens" > "$W/softhsm/conf"
export SOFTHSM2_CONF="$W/softhsm/conf"
softhsm2-util --init-token --free --label stress --pin 1234 --so-pin 5678 >/dev/null
p11() { pkcs11-tool --module "$SOFTHSM" --token-label stress --login --pin 1234 "$@" >/dev/null 2>&1; }
p11 --keypairgen --key-type rsa:2048 --id 01 --label rsa
p11 --keypairgen --key-type EC:prime256v1 --id 02 --label ec
p11 --keygen --key-type AES:32 --id 03 --label aes
set +e
target/debug/p11-stress --module "$SOFTHSM" --token-label stress --pin 1234 --steps "$STEPS" --threads "$THREADS" --seed "$SEED"
rc=$?
set -e
case $rc in
  0) echo "SoftHSMv2: clean" ;;
  1) echo "SoftHSMv2: violations (above)" ;;
  3) echo "SoftHSMv2: hang" ;;
  *) echo "SoftHSMv2: exit $rc$( [ $rc -gt 128 ] && echo " (signal $((rc - 128)))")" ;;
esac
exit "$status"
