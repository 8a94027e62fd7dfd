#!/usr/bin/env bash
# The Debian packages as an operator meets them (issue 13): build them, `dpkg -i` them on this
# machine, check what they installed, `p11-kit list-modules` showing the token and pkcs11-tool
# signing with the installed module against `skr-emulator up` (the installed one), then
# `dpkg --purge` leaving no file of theirs behind, and lintian finding no error.
# Needs root or sudo (dpkg). Run by scripts/test.sh; costs one release build (~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "test-package: need root or sudo for dpkg -i / --purge" >&2; exit 1; }
  SUDO=sudo
fi
PKGS=(skr-pkcs11 skr-pkcs11-dbgsym skr-emulator)
MODULE=/usr/lib/x86_64-linux-gnu/pkcs11/libskr_pkcs11.so
for p in "${PKGS[@]}"; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    echo "test-package: $p is already installed on this machine; purge it first (dpkg --purge $p)" >&2
    exit 1
  fi
done

W=$(mktemp -d /tmp/skr-test-package.XXXXXX)
installed=0
cleanup() {
  /usr/bin/skr-emulator down --dir "$W/emu" >/dev/null 2>&1 || true
  [ "$installed" = 1 ] && $SUDO dpkg --purge "${PKGS[@]}" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }
ok() { echo "test-package: ok: $*"; }

./scripts/package.sh
V=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
DEBS=(target/debian/skr-pkcs11_"$V"_amd64.deb target/debian/skr-pkcs11-dbgsym_"$V"_amd64.deb target/debian/skr-emulator_"$V"_amd64.deb)

lintian --fail-on error "${DEBS[@]}" > "$W/lintian.txt" 2>&1 || { cat "$W/lintian.txt"; fail "lintian reports errors"; }
ok "lintian: no errors ($(grep -c '^[WI]:' "$W/lintian.txt" || true) warnings / notes)"

installed=1
$SUDO dpkg -i "${DEBS[@]}" >/dev/null
for p in "${PKGS[@]}"; do dpkg -L "$p" > "$W/$p.list"; done
ok "dpkg -i ${PKGS[*]}"

# What the package put where.
[ -f "$MODULE" ] || fail "$MODULE missing"
readelf -S "$MODULE" | grep -q "\.symtab" && fail "$MODULE is not stripped"
readelf -S "$MODULE" | grep -q '\.debug_info' && fail "$MODULE carries debug info"
id=$(readelf -n "$MODULE" | awk '/Build ID:/ { print $3 }')
[ -f "/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug" ] || fail "no debug file for build-id $id"
[ "$(stat -c '%a %U:%G' /etc/skr-pkcs11/config.toml)" = "640 root:root" ] || fail "config.toml is $(stat -c '%a %U:%G' /etc/skr-pkcs11/config.toml)"
grep -qx /etc/skr-pkcs11/config.toml /var/lib/dpkg/info/skr-pkcs11.conffiles || fail "config.toml is not a conffile"
for page in skr-pkcs11 skr-pkcs11-doctor skr-pkcs11-release skr-pkcs11-policy-check; do
  [ -f "/usr/share/man/man1/$page.1.gz" ] || fail "man page $page missing"
done
[ -f /usr/share/doc/skr-pkcs11/copyright ] && [ -f /usr/share/doc/skr-pkcs11/README.md.gz ] || fail "docs missing"
/usr/bin/skr-pkcs11 --version | grep -q "skr-pkcs11 $V" || fail "skr-pkcs11 --version"
# Every shipped client config names the module where the package put it.
for ex in openssl-engine.cnf openssl-provider.cnf java-pkcs11.cfg; do
  grep -q "$MODULE" "/usr/share/doc/skr-pkcs11/examples/$ex" || fail "examples/$ex does not name $MODULE"
done
ok "module stripped, debug symbols by build-id, conffile 0640 root:root, man pages, docs"

# The unedited example is refused with the message that says so.
if out=$(env -u SKR_PKCS11_CONFIG /usr/bin/skr-pkcs11 doctor 2>&1); then fail "doctor accepted the unedited example"; fi
grep -q "packaged example" <<<"$out" || fail "doctor on the unedited example: $out"
ok "the unedited /etc/skr-pkcs11/config.toml is refused: $(head -1 <<<"$out" | cut -c1-100)…"

# Against the installed emulator.
/usr/bin/skr-emulator up --dir "$W/emu" >/dev/null
# shellcheck disable=SC1091
source "$W/emu/env"
export SKR_PKCS11_CONFIG
p11-kit list-modules > "$W/modules.txt" 2>&1 || { cat "$W/modules.txt"; fail "p11-kit list-modules"; }
grep -q "^skr-pkcs11:" "$W/modules.txt" && grep -q "$MODULE" "$W/modules.txt" \
  && grep -q "token: skr-demo" "$W/modules.txt" || { cat "$W/modules.txt"; fail "p11-kit list-modules does not show skr-pkcs11 and its token"; }
ok "p11-kit list-modules shows skr-pkcs11 ($MODULE) and token skr-demo"

printf 'signed through the installed module\n' > "$W/data"
pkcs11-tool --module "$MODULE" --token-label skr-demo --login --sign --id 01 -m SHA256-RSA-PKCS \
  -i "$W/data" -o "$W/sig" >/dev/null 2>"$W/p11tool.err" || { cat "$W/p11tool.err"; fail "pkcs11-tool sign"; }
cert=$(sed -n '/label = "tls-rsa"/,/^\[/ s/^certificate = "\(.*\)"$/\1/p' "$SKR_PKCS11_CONFIG" | head -1)
case $cert in /*) ;; *) cert=$(dirname "$SKR_PKCS11_CONFIG")/$cert ;; esac
openssl x509 -in "$cert" -pubkey -noout > "$W/pub.pem"
openssl dgst -sha256 -verify "$W/pub.pem" -signature "$W/sig" "$W/data" >/dev/null || fail "signature does not verify"
ok "pkcs11-tool --module $MODULE: RSA signature by tls-rsa verifies with OpenSSL against its certificate"

# nginx as the packaged systemd drop-in runs it: its Environment= and LimitMEMLOCK=, the
# packaged OpenSSL engine config copied into place (the config itself is the emulator's).
EX=/usr/share/doc/skr-pkcs11/examples
$SUDO install -m 0644 "$EX/openssl-engine.cnf" /etc/skr-pkcs11/openssl-engine.cnf
ossl_conf=$(sed -n 's/^Environment=OPENSSL_CONF=//p' "$EX/nginx-systemd-skr-pkcs11.conf")
memlock=$(sed -n 's/^LimitMEMLOCK=\([0-9]*\)M$/\1/p' "$EX/nginx-systemd-skr-pkcs11.conf")
[ "$ossl_conf" = /etc/skr-pkcs11/openssl-engine.cnf ] && [ -n "$memlock" ] || fail "drop-in: OPENSSL_CONF=$ossl_conf LimitMEMLOCK=${memlock}M"
user=""; [ "$(id -u)" = 0 ] && user="user root;"
cat > "$W/nginx.conf" <<CONF
$user
worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn;
env SKR_PKCS11_CONFIG; env OPENSSL_CONF;
events { worker_connections 16; }
http { access_log off;
  server { listen 127.0.0.1:18443 ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $cert;
    ssl_certificate_key "engine:pkcs11:pkcs11:token=skr-demo;object=tls-rsa;type=private";
    location / { return 200 "served with the packaged module\n"; } } }
CONF
mkdir -p "$W/nginx"
# The drop-in's limit, or the hard limit where a container caps it lower (then only a warning).
hard=$(ulimit -Hl); want=$((memlock * 1024))
if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
  echo "test-package: note: hard memlock limit ${hard} KiB < LimitMEMLOCK=${memlock}M here"; want=$hard
fi
(ulimit -l "$want" && OPENSSL_CONF=$ossl_conf nginx -p "$W/nginx" -c "$W/nginx.conf") \
  || { cat "$W/nginx-error.log" 2>/dev/null; fail "nginx with the installed module did not start"; }
for _ in $(seq 50); do [ -s "$W/nginx.pid" ] && break; sleep 0.1; done
# -k: the point is the handshake, whose signature (TLS 1.3 CertificateVerify) the module makes.
body=$(curl -sSk --tlsv1.3 https://127.0.0.1:18443/ 2>&1 || true)
kill "$(cat "$W/nginx.pid")"
[ "$body" = "served with the packaged module" ] || { cat "$W/nginx-error.log"; fail "nginx TLS with the installed module: $body"; }
ok "nginx (drop-in environment, LimitMEMLOCK=${memlock}M, packaged engine config) serves TLS with tls-rsa from the installed module"
$SUDO rm -f /etc/skr-pkcs11/openssl-engine.cnf

# Java with the provider registered statically, as the packaged examples say: java-pkcs11.cfg
# in /etc/skr-pkcs11 and java.security-skr-pkcs11 merged through -Djava.security.properties.
$SUDO install -m 0644 "$EX/java-pkcs11.cfg" /etc/skr-pkcs11/java-pkcs11.cfg
$SUDO install -m 0644 "$EX/java.security-skr-pkcs11" /etc/skr-pkcs11/java.security-skr-pkcs11
mkdir -p "$W/java"
cat > "$W/java/StaticProvider.java" <<'JAVA'
import java.security.*;
import java.security.cert.Certificate;
public class StaticProvider {
    public static void main(String[] a) throws Exception {
        Provider p = Security.getProvider("SunPKCS11-skr");
        if (p == null) throw new IllegalStateException("SunPKCS11-skr is not registered");
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        ks.load(null, null);
        PrivateKey k = (PrivateKey) ks.getKey("tls-rsa", null);
        Certificate c = ks.getCertificate("tls-rsa");
        byte[] d = "signed through the statically registered provider".getBytes("UTF-8");
        Signature s = Signature.getInstance("SHA256withRSA", p);
        s.initSign(k); s.update(d);
        byte[] sig = s.sign();
        Signature v = Signature.getInstance("SHA256withRSA", "SunRsaSign");
        v.initVerify(c.getPublicKey()); v.update(d);
        if (!v.verify(sig)) throw new IllegalStateException("signature does not verify");
        System.out.println("verified: " + p.getName());
    }
}
JAVA
javac -d "$W/java" "$W/java/StaticProvider.java"
jout=$(java -Djava.security.properties=/etc/skr-pkcs11/java.security-skr-pkcs11 -cp "$W/java" StaticProvider 2>&1) \
  || { echo "$jout"; fail "Java with the statically registered provider"; }
grep -q "^verified: SunPKCS11-skr" <<<"$jout" || { echo "$jout"; fail "Java static provider: $jout"; }
ok "Java (java.security-skr-pkcs11 + java-pkcs11.cfg from the package): SHA256withRSA by tls-rsa verifies with SunRsaSign"
$SUDO rm -f /etc/skr-pkcs11/java-pkcs11.cfg /etc/skr-pkcs11/java.security-skr-pkcs11
/usr/bin/skr-emulator down --dir "$W/emu" >/dev/null

# The confidential-container image, where docker works (pulling debian:12-slim needs a registry).
if timeout 20 docker info >/dev/null 2>&1; then
  docker build -q -f packaging/docker/Dockerfile -t skr-pkcs11-nginx:test . >/dev/null || fail "docker build packaging/docker/Dockerfile"
  docker run --rm skr-pkcs11-nginx:test skr-pkcs11 --version | grep -q "skr-pkcs11 $V" || fail "skr-pkcs11 in the image"
  docker rmi skr-pkcs11-nginx:test >/dev/null
  ok "docker image packaging/docker/Dockerfile builds and carries skr-pkcs11 $V"
else
  echo "test-package: skipped: docker build of packaging/docker/Dockerfile (no working docker daemon here)"
fi

# An operator's edit of the conffile: purge removes it all the same.
echo "# edited" | $SUDO tee -a /etc/skr-pkcs11/config.toml >/dev/null
$SUDO dpkg --purge "${PKGS[@]}" >/dev/null
installed=0
left=()
for p in "${PKGS[@]}"; do
  while read -r f; do
    [ "$f" = /. ] && continue
    if [ -d "$f" ] && [ ! -L "$f" ]; then
      # A directory may stay only if another package owns it.
      dpkg-query -S "$f" >/dev/null 2>&1 || left+=("$f/")
    elif [ -e "$f" ] || [ -L "$f" ]; then
      left+=("$f")
    fi
  done < "$W/$p.list"
done
for f in /etc/skr-pkcs11 /etc/skr-pkcs11/config.toml.dpkg-old /etc/skr-pkcs11/config.toml.dpkg-dist; do
  [ -e "$f" ] && left+=("$f")
done
[ ${#left[@]} -eq 0 ] || fail "dpkg --purge left: ${left[*]}"
ok "dpkg --purge: no file of the packages left (edited conffile and /etc/skr-pkcs11 included)"
