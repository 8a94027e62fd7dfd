#!/usr/bin/env bash
# Java 17 SunPKCS11 as the JCE provider for AES/GCM with a data key unwrapped on the token by the
# released tls-rsa (examples/java/SkrUnwrap.java, examples/java/pkcs11-unwrap.cfg).
# Usage: java_unwrap.sh MODULE WORKDIR   (emulator env exported by the caller)
set -euo pipefail
MOD=$1; W=$2
EX="$(dirname "$0")/../../examples/java"
sed "s#@MODULE@#$MOD#" "$EX/pkcs11-unwrap.cfg" > "$W/pkcs11-unwrap.cfg"
javac -d "$W" "$EX/SkrUnwrap.java"
java -cp "$W" SkrUnwrap "$W/pkcs11-unwrap.cfg" | tee "$W/java.out"
[ "$(grep -c '^ok ' "$W/java.out")" = 4 ] || { echo "FAIL: not every check ran" >&2; exit 1; }
