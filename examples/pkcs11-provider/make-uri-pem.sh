#!/usr/bin/env bash
# Writes a "PKCS#11 PROVIDER URI" PEM file for OpenSSL's pkcs11-provider: applications that
# only load key files (nginx before 1.29 `store:`) can then use a token key as a "file".
# Format (pkcs11-provider src/pk11_uri.h): SEQUENCE { VisibleString "PKCS#11 Provider URI v1.0",
# UTF8String <RFC 7512 URI> }, base64 in a PEM block labelled PKCS#11 PROVIDER URI.
# Usage: make-uri-pem.sh "pkcs11:token=skr-demo;object=tls-rsa;type=private" out.pem
set -euo pipefail
uri=$1; out=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# OpenSSL's config syntax treats '#' as a comment and '$' as a variable: escape both.
esc=$(printf '%s' "$uri" | sed -e 's/[#$\\]/\\&/g')
cat > "$tmp/asn1.cnf" <<CNF
asn1 = SEQUENCE:uri_seq
[uri_seq]
desc = VISIBLESTRING:PKCS\#11 Provider URI v1.0
uri = UTF8:$esc
CNF
openssl asn1parse -genconf "$tmp/asn1.cnf" -noout -out "$tmp/uri.der"
{ echo "-----BEGIN PKCS#11 PROVIDER URI-----"; base64 -w 64 "$tmp/uri.der"; echo "-----END PKCS#11 PROVIDER URI-----"; } > "$out"
