#!/usr/bin/env bash
# The whole test suite: unit tests, the module through its C ABI against skr-emulator,
# the emulator's HTTP tests, the real clients (pkcs11-tool, OpenSSL, nginx, Java, p11-kit)
# and the conformance suite. Installs the clients it needs when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# The module refuses configs and certificates its group or others can write; the tests write
# theirs with the umask's mode.
umask 022
# Build every binary and the cdylib first: the integration tests drive them as a user would.
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The Debian packages: build (a release build, ~10 min on CI's 2 cores), install, use, purge,
# lintian.
./scripts/test-package.sh || status=$?
# The deployment guides' az commands against azure-cli's parser (PyPI).
./scripts/check-az.sh || status=$?
# One closing line over every test binary (cargo's own last line is a doc-test run's).
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
