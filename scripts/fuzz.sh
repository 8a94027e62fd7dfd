#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz / libFuzzer with AddressSanitizer, nightly) for
# SECONDS each (default 60), one after the other, then prints per target the executions,
# executions per second, coverage and findings. Needs a nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly && cargo install cargo-fuzz`); the build and the test
# suite stay on stable, and tests/fuzz_corpus.rs / emulator/tests/fuzz_corpus.rs replay the
# corpora there.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS is wall time per target. With FUZZ_BUDGET=cpu it is CPU time instead: each fuzzer
# runs until it has used SECONDS of CPU (user + system, all its threads), however long that
# takes on a shared machine, then is interrupted (libFuzzer prints its final stats on SIGINT).
# The figures in docs/RELIABILITY.md are CPU time: `FUZZ_BUDGET=cpu scripts/fuzz.sh 1800`.
#
# New inputs the fuzzer finds go to fuzz/target/corpus/<target>/ (not committed); the seeds
# in fuzz/corpus/<target>/ are read, never written. A crash, leak or timeout leaves its input
# in fuzz/artifacts/<target>/ and makes the script exit 1: minimise it
# (`cargo +nightly fuzz tmin <target> <file>`), copy it into fuzz/corpus/<target>/ as
# crash-<what> (or slow-<what>), fix the cause, and the stable replay keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs cargo-fuzz on a nightly toolchain:" >&2
    echo "  rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# Release with debug assertions and overflow checks (cargo-fuzz's default), AddressSanitizer.
nice -n 10 cargo +nightly fuzz build

# FUZZ_BUDGET=cpu: run target $1 until its fuzzer process has used $seconds of CPU.
run_cpu_budget() {
    local t=$1 tick fpid used
    tick=$(getconf CLK_TCK)
    # The wall-time bound only stops a fuzzer that gets no CPU at all.
    nice -n 10 cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time=$((seconds * 50)) -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        >"target/logs/$t.log" 2>&1 &
    local cargo_pid=$!
    while kill -0 "$cargo_pid" 2>/dev/null; do
        sleep 5
        # The fuzzer runs under cargo-fuzz; its command line names this checkout's artifacts by
        # their physical path.
        fpid=$(pgrep -f "release/$t -artifact_prefix=$(pwd -P)/artifacts/$t/" | head -1 || true)
        [ -n "$fpid" ] && [ -r "/proc/$fpid/stat" ] || continue
        # utime + stime (fields 14 and 15; the name in field 2 is a target name, no spaces).
        used=$(awk -v tick="$tick" '{ printf "%d", ($14 + $15) / tick }' "/proc/$fpid/stat" 2>/dev/null || echo 0)
        if [ "$used" -ge "$seconds" ]; then
            kill -INT "$fpid" 2>/dev/null || true
        fi
    done
    wait "$cargo_pid" || true
}

mkdir -p target/logs
status=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "target/corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "== $t: ${seconds} s"
    # -timeout: one input taking longer is a finding (a hang); -rss_limit_mb: so is a blow-up.
    # -max_total_time is wall time; the CPU seconds the fuzzer really had (user + system,
    # children included) are measured beside it, since other work on the machine takes its share.
    TIMEFORMAT='%U %S'
    if [ "${FUZZ_BUDGET:-wall}" = cpu ]; then
        { time run_cpu_budget "$t"; } 2>"target/logs/$t.cpu"
    else
        { time nice -n 10 cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
            -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
            >"target/logs/$t.log" 2>&1 || true; } 2>"target/logs/$t.cpu"
    fi
    cpu=$(awk '{ printf "%d", $1 + $2 }' "target/logs/$t.cpu")
    log="target/logs/$t.log"
    # A run that stops early (a finding) may lack any of these lines.
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1 || true)
    cov=$({ grep -o 'cov: [0-9]*' "$log" || true; } | tail -1 | cut -d' ' -f2)
    after=$(find "artifacts/$t" -type f | wc -l)
    found=$((after - before))
    if [ "$found" -gt 0 ] || grep -q '^==[0-9]*==ERROR\|^SUMMARY: \|panicked at' "$log"; then
        status=1
        echo "   FINDING: see $log and fuzz/artifacts/$t/"
        grep -m3 'panicked at\|^SUMMARY: \|^==[0-9]*==ERROR' "$log" | sed 's/^/   /' || true
    fi
    summary+=("$(printf '%-28s %6s cpu-s %12s execs %8s exec/s  cov %6s  findings %s' "$t" "${cpu:-?}" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$found")")
done
echo
printf '%s\n' "${summary[@]}"
exit "$status"
