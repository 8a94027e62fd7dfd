#!/usr/bin/env bash
# Key rotation under nginx (master + 2 workers, libp11 engine), issue 9: while a client makes
# TLS 1.3 handshakes the whole time, a new version of tls-ec is imported into the vault, its
# certificate file replaced and `nginx -s reload` run. Checks: the reload is accepted, no
# handshake fails, new handshakes show the new certificate, and the tree released tls-ec once
# for the rotation (the short-lived `nginx -s reload` process releases on its own: measured
# first with `nginx -t`, which loads the same configuration).
# Usage: nginx_rotation.sh MODULE WORKDIR   (emulator env exported, SKR_EMU_DIR = its dir,
# SKR_PKCS11_CONFIG = a config whose tls-ec certificate is WORKDIR/certs/tls-ec.pem)
set -euo pipefail
MOD=$1; W=$2
fail() { echo "FAIL: $*" >&2; [ -f "$W/error.log" ] && tail -30 "$W/error.log" >&2; exit 1; }
ENGINE_SO=$(ls /usr/lib/*/engines-3/pkcs11.so 2>/dev/null | head -1)
[ -n "$ENGINE_SO" ] || fail "libp11 engine missing (apt: libengine-pkcs11-openssl)"
counter() { curl -s --cacert "$SKR_EMULATOR_CA" "$SKR_EMULATOR_PLATFORM_URL/admin/counters" | python3 -c "import json,sys; print(json.load(sys.stdin)['releases'].get('$1',0))"; }
sed -e "s#@ENGINE_SO@#$ENGINE_SO#" -e "s#@MODULE@#$MOD#" "$(dirname "$0")/../../examples/openssl/engine.cnf" > "$W/openssl.cnf"
export OPENSSL_CONF="$W/openssl.cnf"
# openssl for the test's own keys and certificates, without the engine.
ossl() { env -u OPENSSL_CONF openssl "$@"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P_RSA=$(free_port); P_EC=$(free_port)
mkdir -p "$W/nginx"
USER_LINE=""; [ "$(id -u)" = 0 ] && USER_LINE="user root;"
sed -e "s#@USER_LINE@#$USER_LINE#" -e "s#@W@#$W#g" -e "s#@P_RSA@#$P_RSA#" -e "s#@P_EC@#$P_EC#" \
    -e "s#@CERTS@#$W/certs#g" "$(dirname "$0")/../../examples/nginx/nginx.conf" > "$W/nginx.conf"

# What a short-lived process that only loads the configuration costs (nginx -t, nginx -s).
before=$(counter tls-ec)
nginx -t -p "$W/nginx" -c "$W/nginx.conf" 2>"$W/nginx-t.log" || { cat "$W/nginx-t.log" >&2; fail "nginx -t"; }
SHORT_LIVED=$(( $(counter tls-ec) - before ))
echo "nginx -t released tls-ec $SHORT_LIVED time(s)"

nginx -p "$W/nginx" -c "$W/nginx.conf" || fail "nginx did not start"
trap 'kill "$(cat "$W/nginx.pid" 2>/dev/null)" 2>/dev/null || true; touch "$W/stop"' EXIT
for i in $(seq 50); do [ -s "$W/nginx.pid" ] && break; sleep 0.1; done

# The client: TLS 1.3 handshakes back to back until $W/stop exists; per handshake one line,
# "ok <sha256 of the served certificate>" or "fail <error>". Python's ssl module checks the
# server's CertificateVerify against the certificate it presents even without chain checks.
cat > "$W/client.py" <<'EOF'
import hashlib, os, socket, ssl, sys
port, out, stop = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
with open(out, "w", buffering=1) as log:
    while not os.path.exists(stop):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname="localhost") as t:
                    der = t.getpeercert(binary_form=True)
                    t.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    while t.recv(4096):
                        pass
            log.write("ok " + hashlib.sha256(der).hexdigest() + "\n")
        except Exception as e:
            log.write("fail " + repr(e).replace("\n", " ") + "\n")
EOF
python3 "$W/client.py" "$P_EC" "$W/handshakes.log" "$W/stop" &
CLIENT=$!
cert_sha() { ossl x509 -in "$1" -outform DER | sha256sum | cut -d' ' -f1; }
OLD=$(cert_sha "$W/certs/tls-ec.pem")
for i in $(seq 100); do grep -q "^ok $OLD" "$W/handshakes.log" 2>/dev/null && break; sleep 0.1; done
grep -q "^ok $OLD" "$W/handshakes.log" || fail "no handshake with the old certificate"

# Rotate: a new P-256 key imported as a new version of tls-ec with the same release policy,
# and a certificate for it.
ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$W/new.key" 2>/dev/null
ossl req -new -x509 -key "$W/new.key" -subj "/CN=localhost" -days 1 -out "$W/new.pem" 2>/dev/null
NEW=$(cert_sha "$W/new.pem")
TOKEN=$(curl -s -H Metadata:true "$SKR_EMULATOR_IMDS_URL/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
curl -s --cacert "$SKR_EMULATOR_CA" -H "Authorization: Bearer $TOKEN" "$SKR_EMULATOR_VAULT_URL/keys/tls-ec?api-version=7.4" > "$W/tls-ec.json"
ossl ec -in "$W/new.key" -text -noout 2>/dev/null > "$W/new.txt"
python3 - "$W/new.txt" "$W/tls-ec.json" > "$W/import.json" <<'EOF'
import base64, json, re, sys
text = open(sys.argv[1]).read()
def hexblock(name):
    m = re.search(name + r":\s*\n((?:\s+[0-9a-f:]+\n)+)", text)
    return bytes.fromhex(re.sub(r"[\s:]", "", m.group(1)))
d, pub = hexblock("priv"), hexblock("pub")
d = d[-32:].rjust(32, b"\0")
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
old = json.load(open(sys.argv[2]))
print(json.dumps({
    "key": {"kty": "EC", "crv": "P-256", "d": b(d), "x": b(pub[1:33]), "y": b(pub[33:65]), "key_ops": ["sign", "verify"]},
    "hsm": True, "attributes": {"exportable": True},
    "release_policy": {"contentType": old["release_policy"]["contentType"], "data": old["release_policy"]["data"]},
}))
EOF
code=$(curl -s -o "$W/import.out" -w '%{http_code}' --cacert "$SKR_EMULATOR_CA" -X PUT -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' --data @"$W/import.json" "$SKR_EMULATOR_VAULT_URL/keys/tls-ec?api-version=7.4")
[ "$code" = 200 ] || fail "import of the new tls-ec version: $code $(cat "$W/import.out")"

OLD_WORKERS=$(pgrep -P "$(cat "$W/nginx.pid")" | tr '\n' ' ')
before=$(counter tls-ec)
cp "$W/new.pem" "$W/certs/tls-ec.pem.tmp" && mv "$W/certs/tls-ec.pem.tmp" "$W/certs/tls-ec.pem"
nginx -s reload -p "$W/nginx" -c "$W/nginx.conf" 2>"$W/reload.log" || { cat "$W/reload.log" >&2; fail "nginx -s reload"; }
for i in $(seq 150); do grep -q "^ok $NEW" "$W/handshakes.log" && break; sleep 0.1; done
grep -q "^ok $NEW" "$W/handshakes.log" || fail "no handshake shows the new certificate after the reload"
# nginx's graceful reload: old workers serve what they accepted until they exit. Once they
# are gone, every handshake must show the new certificate.
for i in $(seq 200); do alive=0; for p in $OLD_WORKERS; do kill -0 "$p" 2>/dev/null && alive=1; done; [ $alive = 0 ] && break; sleep 0.1; done
[ $alive = 0 ] || fail "the old workers did not exit"
SETTLED=$(wc -l < "$W/handshakes.log")
for i in $(seq 100); do [ $(( $(wc -l < "$W/handshakes.log") - SETTLED )) -ge 50 ] && break; sleep 0.1; done
touch "$W/stop"; wait $CLIENT || true
grep -q "emerg" "$W/error.log" && fail "nginx refused the reload: $(grep emerg "$W/error.log" | tail -1)"
total=$(wc -l < "$W/handshakes.log"); fails=$(grep -c '^fail' "$W/handshakes.log" || true)
[ "$fails" = 0 ] || fail "$fails of $total handshakes failed: $(grep '^fail' "$W/handshakes.log" | head -3)"
after=$(tail -n +"$((SETTLED + 1))" "$W/handshakes.log" | wc -l)
[ "$after" -ge 50 ] || fail "only $after handshakes after the old workers exited"
stale=$(tail -n +"$((SETTLED + 1))" "$W/handshakes.log" | grep -vc "^ok $NEW" || true)
[ "$stale" = 0 ] || fail "$stale handshakes after the reload did not show the new certificate"
ROTATION=$(( $(counter tls-ec) - before ))
TREE=$(( ROTATION - SHORT_LIVED ))
echo "rotation: $total handshakes, 0 failed; tls-ec releases: $ROTATION ($SHORT_LIVED by the nginx -s reload process, $TREE by the nginx tree)"
[ "$TREE" = 1 ] || fail "the nginx tree released tls-ec $TREE times for one rotation, expected 1"
echo "nginx rotation: all checks passed"
