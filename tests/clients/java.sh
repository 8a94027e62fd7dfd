#!/usr/bin/env bash
# Java 17 SunPKCS11 against the module: KeyStore, signatures, decrypt, and a JSSE TLS server
# checked with openssl s_client (TLS 1.2 with the RSA and EC keys, TLS 1.3).
# Usage: java.sh MODULE WORKDIR   (emulator env exported by the caller)
set -euo pipefail
MOD=$1; W=$2
fail() { echo "FAIL: $*" >&2; cat "$W/java.out" >&2 2>/dev/null || true; exit 1; }
EX="$(dirname "$0")/../../examples/java"
sed "s#@MODULE@#$MOD#" "$EX/pkcs11.cfg" > "$W/pkcs11.cfg"
javac -d "$W" "$EX/SkrPkcs11Example.java"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
java -cp "$W" SkrPkcs11Example "$W/pkcs11.cfg" "$PORT" 3 > "$W/java.out" 2>&1 &
JPID=$!
trap 'kill $JPID 2>/dev/null || true' EXIT
for i in $(seq 300); do grep -q "^listening" "$W/java.out" 2>/dev/null && break; kill -0 $JPID 2>/dev/null || fail "java exited early"; sleep 0.1; done
grep -q "^listening" "$W/java.out" || fail "JSSE server did not start"
hs() { echo | openssl s_client -connect "127.0.0.1:$PORT" -CAfile "$SKR_EMULATOR_CA" -verify_return_error "$@" 2>&1; }
hs -tls1_3 | grep -q "Verify return code: 0" || fail "TLS 1.3 handshake"
hs -tls1_2 -sigalgs "RSA-PSS+SHA256:RSA+SHA256" -cipher ECDHE-RSA-AES128-GCM-SHA256 | grep -q "Verify return code: 0" || fail "TLS 1.2 handshake with the RSA key"
hs -tls1_2 -sigalgs "ECDSA+SHA256" -cipher ECDHE-ECDSA-AES128-GCM-SHA256 | grep -q "Verify return code: 0" || fail "TLS 1.2 handshake with the EC key"
wait $JPID || fail "java exited with an error"
cat "$W/java.out"
[ "$(grep -c '^served' "$W/java.out")" = 3 ] || fail "not all handshakes were served"
grep -q "^served TLSv1.3" "$W/java.out" || fail "no TLS 1.3"
[ "$(grep -c '^served TLSv1.2' "$W/java.out")" = 2 ] || fail "no TLS 1.2"
echo "java: all checks passed"
