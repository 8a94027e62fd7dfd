#!/usr/bin/env bash
# The module under AddressSanitizer and ThreadSanitizer (issue 11): its ABI tests and a
# p11-stress run, with the module, the test binaries, the examples they drive and p11-stress
# built by nightly rustc with -Zsanitizer (the emulator stays an ordinary debug build: it is
# the other side of the wire). Not part of scripts/test.sh (two nightly builds, ~30 min on
# 2 cores); results go to docs/RELIABILITY.md.
# Usage: scripts/sanitize.sh [STRESS_STEPS]    (SANITIZERS="address thread" by default)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300000}
TRIPLE=x86_64-unknown-linux-gnu
# Not abi_memory: it reads a process's whole address space for key bytes, and a sanitized
# process maps terabytes of shadow memory (it is about the module's memory hygiene, which a
# sanitizer build changes anyway).
ABI_TESTS=(abi_login abi_concurrency abi_faults abi_fork abi_config_permissions abi_lease abi_lease_no_threads abi_lease_outage)
cargo +nightly --version >/dev/null 2>&1 || { echo "sanitize: needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 2; }
cargo build -q -p skr-emulator -p skr-pkcs11-cli
status=0
for san in ${SANITIZERS:-address thread}; do
  T=target/sanitize-$san
  flags="-Zsanitizer=$san -Clink-arg=-rdynamic"
  buildstd=()
  # ThreadSanitizer needs std built with it (-Zbuild-std, the nightly rust-src component):
  # otherwise the slow paths of std's Mutex / RwLock / Arc are uninstrumented, TSan does not
  # see their synchronisation and reports races on data those locks guard (false positives;
  # docs/RELIABILITY.md). Without rust-src the run still happens, with the ABI check waived,
  # and its reports are not evidence.
  if [ "$san" = thread ]; then
    if rustup component list --toolchain nightly --installed 2>/dev/null | grep -q rust-src; then
      buildstd=(-Zbuild-std)
    else
      echo "sanitize: thread: no rust-src for nightly: std is not instrumented; reports on std-locked data are false positives"
      flags="$flags -Cunsafe-allow-abi-mismatch=sanitizer"
    fi
  fi
  A=$T/$TRIPLE/debug
  echo "== $san: build"
  # --target keeps the sanitizer out of build scripts and proc macros; -rdynamic exports the
  # executables' sanitizer runtime to the module they dlopen (else: undefined __asan_* / __tsan_*).
  RUSTFLAGS="$flags" cargo +nightly build -q "${buildstd[@]}" --target "$TRIPLE" --target-dir "$T" \
    -p skr-pkcs11 --lib --examples --tests -p pkcs11-conformance --bins
  ln -sf "$(pwd)/target/debug/skr-emulator" "$A/skr-emulator"
  # The status CLI that abi_lease_outage runs (an ordinary build: a reader of the status file).
  ln -sf "$(pwd)/target/debug/skr-pkcs11" "$A/skr-pkcs11"
  # Leaks at exit are not what this run is about (the module keeps process-wide state until
  # C_Finalize); halt on the first real report so that it is not lost in the output.
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
  # die_after_fork=0: a forked child that logs in from inherited keys starts its own key
  # refresher thread (as every nginx worker does); TSan's default kills any process that
  # starts a thread after a multi-threaded fork, which is TSan's limitation, not a finding.
  export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1:die_after_fork=0:suppressions=$(pwd)/scripts/tsan-suppressions.txt"
  echo "== $san: ABI tests"
  args=(); for t in "${ABI_TESTS[@]}"; do args+=(--test "$t"); done
  if ! SKR_TEST_ARTIFACTS="$A" RUSTFLAGS="$flags" cargo +nightly test -q --no-fail-fast "${buildstd[@]}" --target "$TRIPLE" \
      --target-dir "$T" -p skr-pkcs11 "${args[@]}" 2>&1 | tee "$T/abi.log" | grep -E "^test result|SUMMARY|WARNING: ThreadSanitizer|ERROR: AddressSanitizer"; then
    :
  fi
  grep -qE "SUMMARY: (Address|Thread)Sanitizer|^test result: FAILED|error: test failed" "$T/abi.log" && { echo "sanitize: $san: ABI tests report a problem ($T/abi.log)"; status=1; }
  echo "== $san: p11-stress ($STEPS steps)"
  W=$(mktemp -d /tmp/skr-sanitize.XXXXXX)
  target/debug/skr-emulator up --dir "$W/emu" >/dev/null
  # shellcheck disable=SC1091
  (source "$W/emu/env"; export SKR_PKCS11_CONFIG
   "$A/p11-stress" --module "$(pwd)/$A/libskr_pkcs11.so" --token-label skr-demo --steps "$STEPS" --threads 2 --seed 20261204 \
     > "$T/stress.log" 2> "$T/stress.err") || { echo "sanitize: $san: p11-stress failed ($T/stress.log, $T/stress.err)"; status=1; }
  target/debug/skr-emulator down --dir "$W/emu" >/dev/null; rm -rf "$W"
  tail -1 "$T/stress.log"
  grep -E "SUMMARY: (Address|Thread)Sanitizer" "$T/stress.err" && status=1
done
exit "$status"
