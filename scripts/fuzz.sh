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
    { time nice -n 10 cargo +nightly fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 \
        >"target/logs/$t.log" 2>&1 || true; } 2>"target/logs/$t.cpu"
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
