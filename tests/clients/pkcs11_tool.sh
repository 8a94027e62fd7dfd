#!/usr/bin/env bash
# OpenSC pkcs11-tool against the module (emulator running; SKR_PKCS11_CONFIG and the
# emulator's env exported by the caller). Every signature is verified with OpenSSL.
# Usage: pkcs11_tool.sh MODULE WORKDIR
set -euo pipefail
MOD=$1; W=$2
p11() { pkcs11-tool --module "$MOD" --token-label skr-demo "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

pkcs11-tool --module "$MOD" -L | tee "$W/L.txt"
grep -q "token label *: skr-demo" "$W/L.txt" || fail "-L does not show the skr-demo token"
grep -q "token label *: skr-denied" "$W/L.txt" || fail "-L does not show the skr-denied token"
grep -qi "PIN pad\|protected authentication path" "$W/L.txt" || fail "-L does not show the protected authentication path"

p11 -M | tee "$W/M.txt"
for m in RSA-PKCS RSA-PKCS-PSS RSA-PKCS-OAEP SHA256-RSA-PKCS ECDSA ECDSA-SHA256 AES-GCM AES-CBC-PAD; do
  grep -q "^  *$m\b\|^$m\b\|[ ,]$m[ ,]" "$W/M.txt" || grep -q "$m" "$W/M.txt" || fail "-M lacks $m"
done

# Before login: certificates and public keys only.
p11 -O | tee "$W/O-public.txt"
grep -q "Certificate Object" "$W/O-public.txt" || fail "no certificate before login"
if grep -q "Private Key Object" "$W/O-public.txt"; then fail "private key visible before login"; fi
p11 --login -O | tee "$W/O-login.txt"
grep -q "Private Key Object; RSA" "$W/O-login.txt" || fail "no RSA private key after login"
grep -q "Private Key Object; EC" "$W/O-login.txt" || fail "no EC private key after login"
grep -q "Secret Key Object; AES" "$W/O-login.txt" || fail "no AES secret key after login"

# Public keys for OpenSSL from the certificates.
openssl x509 -in "$SKR_EMU_DIR/certs/tls-rsa.pem" -pubkey -noout > "$W/rsa.pub"
openssl x509 -in "$SKR_EMU_DIR/certs/tls-ec.pem" -pubkey -noout > "$W/ec.pub"
printf 'the data to sign, from pkcs11-tool' > "$W/data"

for h in SHA1 SHA224 SHA256 SHA384 SHA512; do
  p11 --login --sign --id 01 -m "$h-RSA-PKCS" -i "$W/data" -o "$W/sig"
  openssl dgst "-${h,,}" -verify "$W/rsa.pub" -signature "$W/sig" "$W/data" || fail "$h-RSA-PKCS"
  p11 --login --sign --id 01 -m "$h-RSA-PKCS-PSS" --mgf "MGF1-$h" -i "$W/data" -o "$W/sig"
  openssl dgst "-${h,,}" -sigopt rsa_padding_mode:pss -sigopt rsa_pss_saltlen:digest -verify "$W/rsa.pub" -signature "$W/sig" "$W/data" || fail "$h-RSA-PKCS-PSS"
  p11 --login --sign --id 02 -m "ECDSA-$h" -f openssl -i "$W/data" -o "$W/sig"
  openssl dgst "-${h,,}" -verify "$W/ec.pub" -signature "$W/sig" "$W/data" || fail "ECDSA-$h"
done
# Raw mechanisms over a pre-computed hash.
openssl dgst -sha256 -binary "$W/data" > "$W/hash"
p11 --login --sign --id 01 -m RSA-PKCS-PSS --hash-algorithm SHA256 --mgf MGF1-SHA256 --salt-len 32 -i "$W/hash" -o "$W/sig"
openssl pkeyutl -verify -pubin -inkey "$W/rsa.pub" -pkeyopt digest:sha256 -pkeyopt rsa_padding_mode:pss -pkeyopt rsa_pss_saltlen:32 -in "$W/hash" -sigfile "$W/sig" || fail "RSA-PKCS-PSS"
p11 --login --sign --id 02 -m ECDSA -f openssl -i "$W/hash" -o "$W/sig"
openssl pkeyutl -verify -pubin -inkey "$W/ec.pub" -in "$W/hash" -sigfile "$W/sig" || fail "ECDSA"
# RSA-PKCS over a DigestInfo (SHA-256 prefix + hash): the signature must recover it.
{ printf '\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20'; cat "$W/hash"; } > "$W/digestinfo"
p11 --login --sign --id 01 -m RSA-PKCS -i "$W/digestinfo" -o "$W/sig"
openssl pkeyutl -verifyrecover -pubin -inkey "$W/rsa.pub" -in "$W/sig" -out "$W/recovered"
cmp -s "$W/recovered" "$W/digestinfo" || fail "RSA-PKCS"

# Decryption of data encrypted by OpenSSL with the certificate's key.
printf 'session key material' > "$W/plain"
openssl pkeyutl -encrypt -pubin -inkey "$W/rsa.pub" -pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 -in "$W/plain" -out "$W/ct"
p11 --login --decrypt --id 01 -m RSA-PKCS-OAEP --hash-algorithm SHA256 --mgf MGF1-SHA256 -i "$W/ct" -o "$W/pt"
cmp -s "$W/pt" "$W/plain" || fail "RSA-PKCS-OAEP decrypt"
openssl pkeyutl -encrypt -pubin -inkey "$W/rsa.pub" -pkeyopt rsa_padding_mode:pkcs1 -in "$W/plain" -out "$W/ct"
p11 --login --decrypt --id 01 -m RSA-PKCS -i "$W/ct" -o "$W/pt"
cmp -s "$W/pt" "$W/plain" || fail "RSA-PKCS decrypt"

# Key management as OpenSC 0.23 drives it. It creates token objects only (--keygen sets
# CKA_TOKEN = TRUE): the write-protected token answers CKR_TOKEN_WRITE_PROTECTED.
if p11 --login --keygen --key-type AES:32 --label gen > "$W/keygen.txt" 2>&1; then fail "--keygen made a token object"; fi
grep -q CKR_TOKEN_WRITE_PROTECTED "$W/keygen.txt" || fail "--keygen: $(cat "$W/keygen.txt")"
# Released keys never wrap and never leave: data-aes (id 03) as the wrapping key is refused.
if p11 --login --wrap --id 03 --application-id 03 -m AES-KEY-WRAP -o "$W/wrapped" > "$W/wrap.txt" 2>&1; then fail "--wrap with a released key"; fi
grep -q "CKR_KEY_FUNCTION_NOT_PERMITTED\|CKR_KEY_UNEXTRACTABLE" "$W/wrap.txt" || fail "--wrap: $(cat "$W/wrap.txt")"
# ECDH: pkcs11-tool's derive template asks for CKA_WRAP on a key whose value the peer knows;
# the role policy (docs/MODULE.md) refuses a wrapping key of known value.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/peer.key" 2>/dev/null
openssl pkey -in "$W/peer.key" -pubout -outform DER -out "$W/peer.der"
if p11 --login --derive --id 02 -m ECDH1-DERIVE -i "$W/peer.der" -o "$W/derived" > "$W/derive.txt" 2>&1; then fail "--derive made a wrapping key of known value"; fi
grep -q CKR_TEMPLATE_INCONSISTENT "$W/derive.txt" || fail "--derive: $(cat "$W/derive.txt")"

p11 --generate-random 32 -o "$W/rand"
[ "$(stat -c %s "$W/rand")" = 32 ] || fail "--generate-random"
pkcs11-tool --module "$MOD" --test-fork 2>&1 | tee "$W/fork.txt"
echo "pkcs11-tool: all checks passed"
