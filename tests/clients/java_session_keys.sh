#!/usr/bin/env bash
# Java 17 SunPKCS11 as the JCE provider for AES/GCM with session keys (an imported SecretKeySpec,
# a generated key) and the released data-aes, every result checked against SunJCE
# (examples/java/SkrSessionKeys.java).
# Usage: java_session_keys.sh MODULE WORKDIR   (emulator env exported by the caller)
set -euo pipefail
MOD=$1; W=$2
EX="$(dirname "$0")/../../examples/java"
sed "s#@MODULE@#$MOD#" "$EX/pkcs11.cfg" > "$W/pkcs11.cfg"
javac -d "$W" "$EX/SkrSessionKeys.java"
java -cp "$W" SkrSessionKeys "$W/pkcs11.cfg" | tee "$W/java.out"
[ "$(grep -c '^ok ' "$W/java.out")" = 8 ] || { echo "FAIL: not every check ran" >&2; exit 1; }
