#!/usr/bin/env bash
# p11-kit and GnuTLS: a module file registers skr-pkcs11; p11-kit lists it, p11tool lists the
# token's objects and signs with the EC key (verified by OpenSSL).
# Usage: p11kit.sh MODULE WORKDIR   (emulator env exported by the caller)
set -euo pipefail
MOD=$1; W=$2
fail() { echo "FAIL: $*" >&2; exit 1; }
# p11-kit ignores per-user module files for root: register system-wide then (and remove
# it again on exit), per-user otherwise.
if [ "$(id -u)" = 0 ]; then
  MODDIR=/etc/pkcs11/modules; mkdir -p "$MODDIR"
  MODFILE="$MODDIR/skr-pkcs11-test-$$.module"
else
  export HOME="$W/home" XDG_CONFIG_HOME="$W/home/.config"
  MODDIR="$HOME/.config/pkcs11/modules"; mkdir -p "$MODDIR"
  MODFILE="$MODDIR/skr-pkcs11.module"
fi
trap 'rm -f "$MODFILE"' EXIT
sed "s#@MODULE@#$MOD#" "$(dirname "$0")/../../examples/p11-kit/skr-pkcs11.module" > "$MODFILE"
p11-kit list-modules > "$W/modules.txt" 2>&1 || true
grep -q "^skr-pkcs11.*: $MOD" "$W/modules.txt" || { cat "$W/modules.txt"; fail "p11-kit list-modules does not show skr-pkcs11"; }
grep -q "skr-demo" "$W/modules.txt" || { cat "$W/modules.txt"; fail "p11-kit does not show the skr-demo token"; }
# GnuTLS with the module named directly (a second, p11-kit-managed registration of the same
# module in the same process makes GnuTLS fail with "Thread locking error": unregister first).
rm -f "$MODFILE"
p11tool --provider "$MOD" --list-all "pkcs11:token=skr-demo" > "$W/all.txt" 2>&1 || true
grep -q "object=tls-rsa;type=cert" "$W/all.txt" || { cat "$W/all.txt"; fail "p11tool --list-all does not show the tls-rsa certificate"; }
for k in tls-ec tls-rsa; do
  p11tool --provider "$MOD" --login --set-pin="" --test-sign "pkcs11:token=skr-demo;object=$k;type=private" > "$W/testsign.txt" 2>&1 \
    || { cat "$W/testsign.txt"; fail "p11tool --test-sign with $k"; }
  grep -q "Verifying against public key in the token... ok" "$W/testsign.txt" || { cat "$W/testsign.txt"; fail "p11tool --test-sign $k did not verify"; }
done
echo "p11-kit: all checks passed"
