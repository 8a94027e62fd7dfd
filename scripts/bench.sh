#!/usr/bin/env bash
# Benchmarks (docs/BENCHMARKS.md): skr-pkcs11 vs SoftHSMv2 (same keys) vs raw aws-lc-rs, the
# login breakdown against skr-emulator, and nginx TLS handshakes/s with the key from the
# module, from a PEM file and from SoftHSMv2 — all in one run, release builds.
# Usage: scripts/bench.sh [SECONDS_PER_ROUND] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-2}; ROUNDS=${2:-3}
./scripts/install-deps.sh
cargo build --release -q -p skr-pkcs11 -p skr-emulator -p pkcs11-conformance
T=target/release; W=$(mktemp -d /tmp/skr-bench.XXXXXX)
MOD=$(pwd)/$T/libskr_pkcs11.so
SOFTHSM=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)
trap '"$T/skr-emulator" down --dir "$W/emu" >/dev/null 2>&1 || true; [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true' EXIT

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
"$T/skr-emulator" up --dir "$W/emu" >/dev/null
source "$W/emu/env"
"$T/p11-bench" keys --dir "$W/keys" >/dev/null
"$T/p11-bench" import --dir "$W/keys" --env "$W/emu/env" >/dev/null
# A bench token in the module config with the imported keys.
cfg="$W/emu/bench.toml"
{ cat "$SKR_PKCS11_CONFIG"; printf '\n[[token]]\nlabel = "bench"\nserial = "bench-0001"\n'
  i=16; for k in rsa2048 rsa3072 p256 p384; do printf '[[token.key]]\nlabel = "bench-%s"\nid = "%x"\nkid = "%s/keys/bench-%s"\n' $k $i "$SKR_EMULATOR_VAULT_URL" $k; i=$((i+1)); done
  printf '[[token.key]]\nlabel = "bench-aes"\nid = "1f"\nkid = "%s/keys/bench-aes"\n' "$SKR_EMULATOR_MHSM_URL"; } > "$cfg"
sed -i 's/^level = "info"/level = "warn"/' "$cfg"
export SKR_PKCS11_CONFIG="$cfg"
# The same keys in SoftHSMv2.
mkdir -p "$W/softhsm/tokens"; echo "directories.tokendir = $W/softhsm/tokens" > "$W/softhsm/conf"
export SOFTHSM2_CONF="$W/softhsm/conf"
softhsm2-util --init-token --free --label bench --pin 1234 --so-pin 5678 >/dev/null
i=16; for k in rsa2048 rsa3072 p256 p384; do
  pkcs11-tool --module "$SOFTHSM" --token-label bench --login --pin 1234 --write-object "$W/keys/$k.der" --type privkey --label "bench-$k" --id "$(printf %x $i)" --usage-sign --usage-decrypt >/dev/null; i=$((i+1)); done
pkcs11-tool --module "$SOFTHSM" --token-label bench --login --pin 1234 --write-object "$W/keys/aes.bin" --type secrkey --key-type AES:32 --label bench-aes --id 1f --usage-decrypt >/dev/null

echo; echo "== PKCS#11 operations (median of $ROUNDS rounds of ${SECS}s; reference = SoftHSMv2 with the same keys)"
"$T/p11-bench" ops --module "$MOD" --label bench --reference "$SOFTHSM" --reference-label bench --reference-pin 1234 \
  --dir "$W/keys" --seconds "$SECS" --rounds "$ROUNDS" 2>/dev/null
echo; echo "== C_Login breakdown, module side (skr-emulator on loopback)"
"$T/p11-bench" login --config "$cfg" --token skr-demo --count 10

echo; echo "== nginx TLS handshakes/s (new sessions, openssl s_time, 1 client, ${SECS}x3 s)"
ENGINE_SO=$(ls /usr/lib/*/engines-3/pkcs11.so | head -1)
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$W/file-rsa.key" 2>/dev/null
cp "$W/keys/rsa2048.der" "$W/x.der"; openssl pkey -inform DER -in "$W/keys/rsa2048.der" -out "$W/file-rsa.key"
openssl pkey -inform DER -in "$W/keys/p256.der" -out "$W/file-ec.key"
for k in rsa2048 p256; do
  key=$W/file-rsa.key; [ $k = p256 ] && key=$W/file-ec.key
  openssl req -new -x509 -key "$key" -subj /CN=localhost -days 1 -out "$W/$k.crt" 2>/dev/null
done
run_nginx() { # $1 = module path or "file", $2 = port
  local src=$1 port=$2 keyrsa keyec
  if [ "$src" = file ]; then keyrsa=$W/file-rsa.key; keyec=$W/file-ec.key
  else keyrsa="engine:pkcs11:pkcs11:token=bench;object=bench-rsa2048;type=private"; keyec="engine:pkcs11:pkcs11:token=bench;object=bench-p256;type=private"; fi
  local pinq=""; [ "$src" = "$SOFTHSM" ] && pinq="?pin-value=1234"
  cat > "$W/ossl.cnf" <<CNF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = $ENGINE_SO
MODULE_PATH = ${src/file/$MOD}
init = 1
CNF
  local user=""; [ "$(id -u)" = 0 ] && user="user root;"
  cat > "$W/nginx.conf" <<CONF
$user
worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn;
env SKR_PKCS11_CONFIG; env SOFTHSM2_CONF; env OPENSSL_CONF;
events { worker_connections 256; }
http { access_log off;
  server { listen 127.0.0.1:$port ssl; ssl_certificate $W/rsa2048.crt; ssl_certificate_key "$keyrsa${keyrsa:+}$( [ "$src" = file ] || echo "$pinq")"; location / { return 200; } }
  server { listen 127.0.0.1:$((port+1)) ssl; ssl_certificate $W/p256.crt; ssl_certificate_key "$keyec$( [ "$src" = file ] || echo "$pinq")"; location / { return 200; } } }
CONF
  mkdir -p "$W/nginx"; OPENSSL_CONF=$W/ossl.cnf nginx -p "$W/nginx" -c "$W/nginx.conf"
  for i in $(seq 50); do [ -s "$W/nginx.pid" ] && break; sleep 0.1; done
}
stop_nginx() { kill "$(cat "$W/nginx.pid")"; for i in $(seq 50); do [ -e "$W/nginx.pid" ] || break; sleep 0.1; done; sleep 0.3; }
hs() { openssl s_time -connect "127.0.0.1:$1" -new -time "$SECS" $2 2>/dev/null | awk '/connections in .* real seconds/ {print $1/$4}' ; }
printf '| key | TLS | module | PEM file | SoftHSMv2 | module ÷ file |\n|---|---|---|---|---|---|\n'
declare -A R
p=20443
for src in "$MOD" file "$SOFTHSM"; do
  run_nginx "$src" $p
  for tls in 1.3 1.2; do
    flag=-tls1_3; [ $tls = 1.2 ] && flag=-tls1_2
    R["$src-rsa-$tls"]=$(hs $p $flag); R["$src-ec-$tls"]=$(hs $((p+1)) $flag)
  done
  stop_nginx; p=$((p+2))
done
for k in rsa ec; do for tls in 1.3 1.2; do
  m=${R["$MOD-$k-$tls"]:-0}; f=${R["file-$k-$tls"]:-0}; s=${R["$SOFTHSM-$k-$tls"]:-0}
  printf '| %s | %s | %.0f | %.0f | %.0f | %s |\n' "$k" "$tls" "$m" "$f" "$s" "$(awk -v a="$m" -v b="$f" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "–"}')"
done; done
