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
# The login breakdown links the module (rlib): an example of the cli crate, not of the black-box
# conformance crate.
cargo build --release -q -p skr-pkcs11-cli --example p11-bench-login
T=target/release; W=$(mktemp -d /tmp/skr-bench.XXXXXX)
MOD=$(pwd)/$T/libskr_pkcs11.so
SOFTHSM=$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)
trap '"$T/skr-emulator" down --dir "$W/emu" >/dev/null 2>&1 || true; "$T/skr-emulator" down --dir "$W/emu-cvm" >/dev/null 2>&1 || true; [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true' EXIT

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "== $(date -u +%FT%TZ), load average $(cut -d" " -f1-3 /proc/loadavg), $(uname -r), $(openssl version), $(nginx -v 2>&1), softhsm2 $(dpkg-query -W -f='${Version}' softhsm2)"
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
  pkcs11-tool --module "$SOFTHSM" --token-label bench --login --pin 1234 --write-object "$W/keys/$k.der" --type privkey --label "bench-$k" --id "$(printf %x $i)" --usage-sign --usage-decrypt $(case $k in rsa*) echo --usage-wrap;; *) echo --usage-derive;; esac) >/dev/null
  # The public half too: libp11 (nginx) builds an EC key's EVP_PKEY from the public object.
  openssl pkey -inform DER -in "$W/keys/$k.der" -pubout -outform DER -out "$W/keys/$k.pub.der"
  pkcs11-tool --module "$SOFTHSM" --token-label bench --login --pin 1234 --write-object "$W/keys/$k.pub.der" --type pubkey --label "bench-$k" --id "$(printf %x $i)" >/dev/null
  i=$((i+1)); done
# (pkcs11-tool reads the new secret key's CKA_VALUE back and warns that it is sensitive.)
pkcs11-tool --module "$SOFTHSM" --token-label bench --login --pin 1234 --write-object "$W/keys/aes.bin" --type secrkey --key-type AES:32 --label bench-aes --id 1f --usage-decrypt >/dev/null 2>&1

# BENCH_SECTIONS picks sections (default all): ops login nginx (login includes the CVM path).
# BENCH_ONLY=AES: only the ops cases whose name contains it.
SECTIONS=${BENCH_SECTIONS:-ops login nginx}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }

if has ops; then
echo; echo "== PKCS#11 operations (median of $ROUNDS rounds of ${SECS}s; reference = SoftHSMv2 with the same keys)"
"$T/p11-bench" ops --module "$MOD" --label bench --reference "$SOFTHSM" --reference-label bench --reference-pin 1234 \
  --dir "$W/keys" --seconds "$SECS" --rounds "$ROUNDS" ${BENCH_ONLY:+--only "$BENCH_ONLY"} 2>/dev/null
fi
# BENCH_BEFORE=path/to/an/older/libskr_pkcs11.so: the same cases with that build as the
# reference column, in the same run (before / after a change; docs/BENCHMARKS.md).
if [ -n "${BENCH_BEFORE:-}" ]; then
echo; echo "== before / after (median of $ROUNDS rounds of ${SECS}s; reference = $BENCH_BEFORE, same config and keys)"
"$T/p11-bench" ops --module "$MOD" --label bench --reference "$BENCH_BEFORE" --reference-label bench \
  --dir "$W/keys" --seconds "$SECS" --rounds "$ROUNDS" 2>/dev/null
fi
if has login; then
echo; echo "== C_Login breakdown, module side (skr-emulator on loopback)"
"$T/examples/p11-bench-login" --config "$cfg" --token skr-demo --count 20 --emulator-log "$W/emu"
# The same on a simulated Azure SEV-SNP CVM (vTPM on swtpm, MAA AzureGuest), in the same run.
echo; echo "== C_Login breakdown on a simulated SNP CVM (vTPM: swtpm behind the emulator's paravisor)"
"$T/skr-emulator" up --dir "$W/emu-cvm" --platform cvm-snp >/dev/null
sed 's/^level = "info"/level = "warn"/' "$W/emu-cvm/skr-pkcs11.toml" > "$W/emu-cvm/bench.toml"
"$T/examples/p11-bench-login" --config "$W/emu-cvm/bench.toml" --token skr-demo --count 20 --emulator-log "$W/emu-cvm"
"$T/skr-emulator" down --dir "$W/emu-cvm" >/dev/null
fi

has nginx || exit 0
echo; echo "== nginx TLS handshakes/s (new session per connection, 1 openssl s_time client, median of $ROUNDS rounds of ${SECS}s)"
ENGINE_SO=$(ls /usr/lib/*/engines-3/pkcs11.so | head -1)
# The very keys of the PKCS#11 cases, as PEM files for the "file" column; one certificate per
# key serves all three columns.
openssl pkey -inform DER -in "$W/keys/rsa2048.der" -out "$W/file-rsa.key"
openssl pkey -inform DER -in "$W/keys/p256.der" -out "$W/file-ec.key"
openssl req -new -x509 -key "$W/file-rsa.key" -subj /CN=localhost -days 1 -out "$W/rsa.crt" 2>/dev/null
openssl req -new -x509 -key "$W/file-ec.key" -subj /CN=localhost -days 1 -out "$W/ec.crt" 2>/dev/null
# nginx loads keys with ENGINE_load_private_key without ENGINE_init: the engine is initialised
# at load (init = 1). The "file" run uses no engine at all.
engine_cnf() { cat <<CNF
openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
dynamic_path = $ENGINE_SO
MODULE_PATH = $1
init = 1
CNF
}
run_nginx() { # $1 = module | file | softhsm, $2 = port (RSA; EC on port+1)
  local src=$1 port=$2 krsa kec
  case $src in
    file) krsa=$W/file-rsa.key; kec=$W/file-ec.key; printf 'openssl_conf = openssl_init\n[openssl_init]\n' > "$W/ossl.cnf" ;;
    module) krsa="engine:pkcs11:pkcs11:token=bench;object=bench-rsa2048;type=private"
            kec="engine:pkcs11:pkcs11:token=bench;object=bench-p256;type=private"; engine_cnf "$MOD" > "$W/ossl.cnf" ;;
    softhsm) krsa="engine:pkcs11:pkcs11:token=bench;object=bench-rsa2048;type=private?pin-value=1234"
             kec="engine:pkcs11:pkcs11:token=bench;object=bench-p256;type=private?pin-value=1234"; engine_cnf "$SOFTHSM" > "$W/ossl.cnf" ;;
  esac
  local user=""; [ "$(id -u)" = 0 ] && user="user root;"
  cat > "$W/nginx.conf" <<CONF
$user
worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn;
env SKR_PKCS11_CONFIG; env SOFTHSM2_CONF; env OPENSSL_CONF;
events { worker_connections 256; }
http { access_log off;
  server { listen 127.0.0.1:$port ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $W/rsa.crt; ssl_certificate_key "$krsa"; location / { return 200; } }
  server { listen 127.0.0.1:$((port+1)) ssl; ssl_protocols TLSv1.2 TLSv1.3; ssl_certificate $W/ec.crt; ssl_certificate_key "$kec"; location / { return 200; } } }
CONF
  rm -f "$W/nginx.pid"; mkdir -p "$W/nginx"
  OPENSSL_CONF=$W/ossl.cnf nginx -p "$W/nginx" -c "$W/nginx.conf" || { tail -5 "$W/nginx-error.log"; exit 1; }
  for _ in $(seq 50); do [ -s "$W/nginx.pid" ] && break; sleep 0.1; done
}
stop_nginx() { local pid; pid=$(cat "$W/nginx.pid"); kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; }
# CPU seconds (user + system) of the nginx workers so far.
workers_cpu() { local t=0 p; for p in $(pgrep -P "$(cat "$W/nginx.pid")"); do
  t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t $(getconf CLK_TCK)"; }
# One round: handshakes per wall second (measured here: s_time's own figures are client CPU
# time or whole seconds) and nginx worker CPU µs per handshake.
hs_round() { # $1 port, $2 flag
  local c0 c1 t0 t1 n
  c0=$(workers_cpu); t0=$(date +%s.%N)
  n=$(openssl s_time -connect "127.0.0.1:$1" -new -time "$SECS" "$2" 2>/dev/null | awk '/connections in .*s;/ {print $1; exit}')
  t1=$(date +%s.%N); c1=$(workers_cpu)
  awk -v n="${n:-0}" -v t0="$t0" -v t1="$t1" -v c0="$c0" -v c1="$c1" 'BEGIN {
    split(c0, a, " "); split(c1, b, " ");
    printf "%.0f %.0f\n", n / (t1 - t0), (n > 0 ? (b[1] - a[1]) / a[2] * 1e6 / n : 0) }'
}
hs() { # median round by handshakes/s: "hs/s cpu-µs"
  local r; for r in $(seq "$ROUNDS"); do hs_round "$@"; done | sort -n | sed -n "$(( (ROUNDS + 1) / 2 ))p"
}
declare -A R
p=20443
for src in module file softhsm; do
  run_nginx "$src" $p
  for tls in 1.3 1.2; do
    flag=-tls1_3; [ $tls = 1.2 ] && flag=-tls1_2
    hs_round $p $flag >/dev/null # warm-up (the workers' first handshakes)
    R["$src-rsa-$tls"]=$(hs $p $flag); R["$src-ec-$tls"]=$(hs $((p+1)) $flag)
  done
  stop_nginx; p=$((p+2))
done
printf '| key | TLS | module hs/s (worker CPU µs/hs) | PEM file | SoftHSMv2 | module ÷ file | module ÷ SoftHSMv2 |\n|---|---|---|---|---|---|---|\n'
for k in rsa ec; do for tls in 1.3 1.2; do
  read -r m mc <<<"${R["module-$k-$tls"]}"; read -r f fc <<<"${R["file-$k-$tls"]}"; read -r s sc <<<"${R["softhsm-$k-$tls"]}"
  name=RSA-2048; [ $k = ec ] && name=P-256
  printf '| %s | %s | %s (%s) | %s (%s) | %s (%s) | %s | %s |\n' "$name" "$tls" "$m" "$mc" "$f" "$fc" "$s" "$sc" \
    "$(awk -v a="$m" -v b="$f" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "–"}')" \
    "$(awk -v a="$m" -v b="$s" 'BEGIN{ if (b>0) printf "%.2f", a/b; else print "–"}')"
done; done
