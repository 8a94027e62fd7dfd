#!/usr/bin/env bash
# Fleet start (docs/BENCHMARKS.md, "Fleet start"): N module processes (default 100) log in at
# the same moment against one skr-emulator whose throttle applies Key Vault's and Managed
# HSM's documented limits (PUT /admin/limits {"preset":"azure"}), each host on its own with
# jittered backoff and Retry-After. Prints the time until the last host is logged in, the
# login-time percentiles, the releases and the 429s the emulator answered.
# Usage: scripts/fleet.sh [N]
#   FLEET_PROFILE=release  use a release build (default: debug, as the tests build it)
#   FLEET_DEADLINE=S       release.deadline_seconds for the hosts (default: the module's, 300)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
case "$N" in '' | *[!0-9]* | 0) echo "usage: scripts/fleet.sh [N > 0]" >&2; exit 2 ;; esac
PROFILE=${FLEET_PROFILE:-debug}
FLAGS=()
[ "$PROFILE" = release ] && FLAGS=(--release)
cargo build "${FLAGS[@]}" -q -p skr-emulator
cargo build "${FLAGS[@]}" -q -p skr-pkcs11 --lib --example fleet_login
T=$(pwd)/target/$PROFILE
W=$(mktemp -d /tmp/skr-fleet.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$T/skr-emulator" down --dir "$W/emu" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT

"$T/skr-emulator" up --dir "$W/emu" >/dev/null
# shellcheck disable=SC1091
source "$W/emu/env"
CFG="$W/emu/fleet.toml"
{
  sed 's/^level = "info"/level = "warn"/' "$SKR_PKCS11_CONFIG"
  if [ -n "${FLEET_DEADLINE:-}" ]; then printf '\n[release]\ndeadline_seconds = %s\n' "$FLEET_DEADLINE"; fi
} > "$CFG"
admin() { curl -sS --fail --cacert "$SKR_EMULATOR_CA" "$@"; }
admin -X PUT -H 'Content-Type: application/json' -d '{"preset": "azure"}' "$SKR_EMULATOR_PLATFORM_URL/admin/limits"
admin -X POST "$SKR_EMULATOR_PLATFORM_URL/admin/counters/reset"

# The start line: every host blocks on a shared lock of this file until it is released here.
exec 9> "$W/start"
flock -x 9
for i in $(seq 1 "$N"); do
  SKR_PKCS11_CONFIG="$CFG" "$T/examples/fleet_login" "$T/libskr_pkcs11.so" skr-demo "$W/start" \
    > "$W/host-$i.out" 2> "$W/host-$i.err" &
  PIDS+=($!)
done
# Every host loaded the module and opened its session (or stopped with an error).
waited=0
while :; do
  ready=$(cat "$W"/host-*.out 2>/dev/null | grep -c -e '^ready' -e '^failed' || true)
  [ "$ready" -ge "$N" ] && break
  waited=$((waited + 1))
  if [ "$waited" -gt 1200 ]; then echo "only $ready of $N hosts ready after 120 s" >&2; exit 1; fi
  sleep 0.1
done
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START_MS=$(date +%s%3N)
flock -u 9
FAILED=0
for p in "${PIDS[@]}"; do wait "$p" || FAILED=$((FAILED + 1)); done
PIDS=()
COUNTERS=$(admin "$SKR_EMULATOR_PLATFORM_URL/admin/counters")

echo "== fleet start: $N hosts, token skr-demo (tls-rsa, tls-ec on the vault; data-aes on the managed HSM), $PROFILE build"
echo "== machine: $(nproc) cores, load average at the start $LOAD_BEFORE, $(date -u +%FT%TZ)"
python3 - "$W" "$N" "$START_MS" "$COUNTERS" "$FAILED" <<'EOF'
import glob, json, sys
w, n, start_ms, counters, failed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
logins, done, errors = [], [], []
for path in glob.glob(f"{w}/host-*.out"):
    for line in open(path):
        if line.startswith("logged-in "):
            f = dict(kv.split("=", 1) for kv in line.split()[1:])
            logins.append(int(f["login_ms"])); done.append(int(f["done_unix_ms"]))
        elif line.startswith("failed"):
            errors.append(line.strip())
logins.sort()
pct = lambda p: logins[min(len(logins) - 1, int(p * len(logins)))] / 1000 if logins else float("nan")
print(f"logged in: {len(logins)} of {n} (failed: {len(errors)}, non-zero exits: {failed})")
if done:
    print(f"time until the last host was logged in: {(max(done) - start_ms) / 1000:.1f} s")
print(f"C_Login time: p50 {pct(0.5):.1f} s, p90 {pct(0.9):.1f} s, max {pct(1.0):.1f} s")
print(f"releases: {json.dumps(counters.get('releases', {}), sort_keys=True)}")
print(f"429 answered (throttled): {json.dumps(counters.get('throttled', {}), sort_keys=True)}")
for e in errors[:5]:
    print("  " + e)
sys.exit(0 if len(logins) == n else 1)
EOF
