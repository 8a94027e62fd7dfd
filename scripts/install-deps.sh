#!/usr/bin/env bash
# Installs the system packages the test suite and the demo use (Debian 12), when missing.
# The module itself needs none of them: they are the real clients it is tested with.
set -euo pipefail

pkgs=(
  opensc                     # pkcs11-tool
  libengine-pkcs11-openssl   # libp11 engine for OpenSSL 3 / nginx
  openssl
  nginx                      # Debian's nginx 1.22
  openjdk-17-jdk-headless    # SunPKCS11
  p11-kit
  gnutls-bin                 # p11tool, certtool
  softhsm2                   # reference token for conformance and benchmarks
  gdb                        # gcore for the core-dump secret check
  curl
  swtpm                      # TPM 2.0 simulator: the emulator's Azure CVM vTPM
  swtpm-tools                # swtpm_setup
  libtss2-dev                # tss-esapi links Debian's TSS (ESAPI, TCTI)
  pkg-config                 # tss-esapi-sys finds libtss2 with it
  python3
  dpkg-dev                   # dpkg-shlibdeps: the packages' computed Depends (scripts/package.sh)
  binutils                   # objcopy / strip / readelf (package.sh), nm (tests/single_aws_lc.rs)
  lintian                    # checks the built packages (scripts/test-package.sh)
  python3-venv               # azure-cli from PyPI for scripts/check-az.sh
  ca-certificates
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
