#!/usr/bin/env bash
# p11-kit and GnuTLS: a module file registers skr-pkcs11; p11-kit lists it, p11tool lists the
# token's objects and signs with the EC key (verified by OpenSSL).
# Usage: p11kit.sh MODULE WORKDIR   (emulator env exported by the caller)
set -euo pipefail
MOD=$1; W=$2
fail() { echo "FAIL: $*" >&2; exit 1; }
mkdir -p "$W/home/.config/pkcs11/modules"
sed "s#@MODULE@#$MOD#" "$(dirname "$0")/../../examples/p11-kit/skr-pkcs11.module" > "$W/home/.config/pkcs11/modules/skr-pkcs11.module"
export HOME="$W/home" XDG_CONFIG_HOME="$W/home/.config"
p11-kit list-modules > "$W/modules.txt" 2>&1 || true
grep -q "skr-pkcs11" "$W/modules.txt" || { cat "$W/modules.txt"; fail "p11-kit list-modules does not show skr-pkcs11"; }
grep -q "skr-demo" "$W/modules.txt" || { cat "$W/modules.txt"; fail "p11-kit does not show the skr-demo token"; }
GNUTLS_PIN="" p11tool --provider "$MOD" --list-all "pkcs11:token=skr-demo" > "$W/all.txt" 2>&1 || true
grep -q "tls-rsa" "$W/all.txt" || { cat "$W/all.txt"; fail "p11tool --list-all does not show tls-rsa"; }
printf 'signed through GnuTLS' > "$W/data"
openssl x509 -in "$SKR_EMU_DIR/certs/tls-ec.pem" -pubkey -noout > "$W/ec.pub"
p11tool --provider "$MOD" --login --set-pin "" --test-sign "pkcs11:token=skr-demo;object=tls-ec;type=private" > "$W/testsign.txt" 2>&1 \
  || { cat "$W/testsign.txt"; fail "p11tool --test-sign with the EC key"; }
grep -qi "verified\|success" "$W/testsign.txt" || { cat "$W/testsign.txt"; fail "p11tool --test-sign did not verify"; }
echo "p11-kit: all checks passed"
