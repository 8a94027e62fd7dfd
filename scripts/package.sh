#!/usr/bin/env bash
# Debian 12 packages, one command: target/debian/
#   skr-pkcs11_<version>_amd64.deb         the module, the skr-pkcs11 tool, man pages, the
#                                          p11-kit registration, /etc/skr-pkcs11/config.toml
#   skr-pkcs11-dbgsym_<version>_amd64.deb  their split debug symbols (/usr/lib/debug/.build-id)
#   skr-emulator_<version>_amd64.deb       the local Azure SKR stack, development machines only
#
# Staged by hand and built with dpkg-deb rather than cargo-deb: nothing to compile or download
# before packaging (cargo-deb is another crate tree to build on CI's 2 cores), and every
# Debian detail is explicit here: the conffile's 0640 mode, build-id debug files, the
# dbgsym package, Depends computed by dpkg-shlibdeps, reproducible tar metadata.
# Needs dpkg-dev (dpkg-shlibdeps) and binutils (objcopy, strip, readelf): scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH=amd64
TRIPLET=x86_64-linux-gnu
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
MAINTAINER="skr-pkcs11 team <skr-pkcs11@users.noreply.github.com>"
OUT=target/debian
WORK=$OUT/work

for tool in dpkg-deb dpkg-shlibdeps objcopy strip readelf gzip; do
  command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing: run scripts/install-deps.sh" >&2; exit 1; }
done

echo "== release build (module, tool, emulator, man page generator)"
# One invocation: the same feature resolution every time, so a rerun rebuilds nothing.
cargo build --release --locked -p skr-pkcs11 -p skr-pkcs11-cli -p skr-emulator --lib --bins --example mangen
REL=target/release
# Timestamps of the packaged files: the last commit (reproducible builds). Exported only after
# the build: build scripts that watch it would otherwise rebuild on every commit.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

rm -rf "$WORK"
mkdir -p "$WORK/debian"
# debhelper's layout (debian/<package>/), which dpkg-shlibdeps expects.
MAIN=$WORK/debian/skr-pkcs11
DBG=$WORK/debian/skr-pkcs11-dbgsym
EMU=$WORK/debian/skr-emulator
BUILD_IDS=()

# Install a binary stripped, its debug info as /usr/lib/debug/.build-id/xx/yyyy.debug in $3.
install_split() { # $1 = built file, $2 = staged path, $3 = dbgsym root (or "" to drop the symbols)
  install -D -m 0755 "$1" "$2"
  if [ -n "$3" ]; then
    local id
    id=$(readelf -n "$2" | awk '/Build ID:/ { print $3 }')
    [ -n "$id" ] || { echo "package.sh: $1 has no GNU build-id" >&2; exit 1; }
    local dbg=$3/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug
    mkdir -p "$(dirname "$dbg")"
    objcopy --only-keep-debug --compress-debug-sections=zlib "$2" "$dbg"
    chmod 0644 "$dbg"
    BUILD_IDS+=("$id")
  fi
  strip --strip-unneeded --remove-section=.comment "$2"
  if [ -n "$3" ]; then objcopy --add-gnu-debuglink="$dbg" "$2"; fi
}

# /usr/share/doc/<package>: copyright, changelog (native package), docs.
install_docs() { # $1 = package root, $2 = package name, $3... = docs
  local root=$1 pkg=$2 doc
  shift 2
  doc=$root/usr/share/doc/$pkg
  install -D -m 0644 packaging/debian/copyright "$doc/copyright"
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from git %s by scripts/package.sh.\n\n -- %s  %s\n' \
    "$pkg" "$VERSION" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$MAINTAINER" \
    "$(date -u -R -d "@$SOURCE_DATE_EPOCH")" | gzip -9n > "$doc/changelog.gz"
  chmod 0644 "$doc/changelog.gz"
  for f in "$@"; do
    gzip -9n -c "$f" > "$doc/$(basename "$f").gz"
    chmod 0644 "$doc/$(basename "$f").gz"
  done
}

# DEBIAN/control (+ md5sums), then the .deb. $3 = extra control fields.
build_deb() { # $1 = package root, $2 = package name, $3 = control fields after Version/Arch
  local root=$1 pkg=$2
  mkdir -p "$root/DEBIAN"
  find "$root" -type d -exec chmod 0755 {} +
  {
    printf 'Package: %s\nVersion: %s\nArchitecture: %s\nMaintainer: %s\n' "$pkg" "$VERSION" "$ARCH" "$MAINTAINER"
    printf 'Installed-Size: %s\n' "$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
    printf '%s\n' "$3"
  } > "$root/DEBIAN/control"
  (cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
  chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
  find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  dpkg-deb --root-owner-group -Zxz --build "$root" "$OUT/${pkg}_${VERSION}_${ARCH}.deb" >/dev/null
  echo "   $OUT/${pkg}_${VERSION}_${ARCH}.deb"
}

# Depends of a package's ELF files, from the shlibs of the installed libraries they link.
shlibs_depends() { # $1 = package name, $2... = ELF paths inside the package
  local pkg=$1 args=()
  shift
  printf 'Source: skr-pkcs11\n\nPackage: %s\nArchitecture: any\n' "$pkg" > "$WORK/debian/control"
  for f in "$@"; do args+=("-edebian/$pkg/$f"); done
  (cd "$WORK" && dpkg-shlibdeps -O "${args[@]}") | sed -n 's/^shlibs:Depends=//p'
}

echo "== staging"
# The module: in the multiarch PKCS#11 directory where p11-kit and clients look for modules.
install_split "$REL/libskr_pkcs11.so" "$MAIN/usr/lib/$TRIPLET/pkcs11/libskr_pkcs11.so" "$DBG"
chmod 0644 "$MAIN/usr/lib/$TRIPLET/pkcs11/libskr_pkcs11.so"
install_split "$REL/skr-pkcs11" "$MAIN/usr/bin/skr-pkcs11" "$DBG"
install -D -m 0644 packaging/debian/skr-pkcs11.module "$MAIN/usr/share/p11-kit/modules/skr-pkcs11.module"
# The conffile: an example that the module refuses until it is edited; 0640 (it names the
# vault and keys, and may carry a PIN).
install -D -m 0640 packaging/debian/config.toml "$MAIN/etc/skr-pkcs11/config.toml"
printf '/etc/skr-pkcs11/config.toml\n' > "$WORK/conffiles"
mkdir -p "$MAIN/DEBIAN" && install -m 0644 "$WORK/conffiles" "$MAIN/DEBIAN/conffiles"
# Man pages from the clap definition.
"$REL/examples/mangen" "$WORK/man"
for m in "$WORK"/man/*.1; do
  install -D -m 0644 /dev/null "$MAIN/usr/share/man/man1/$(basename "$m").gz"
  gzip -9n -c "$m" > "$MAIN/usr/share/man/man1/$(basename "$m").gz"
done
install_docs "$MAIN" skr-pkcs11 README.md docs/MODULE.md docs/CONFIG.md
# Service integration examples (uncompressed: they are copied into place as they are).
for f in packaging/debian/examples/*; do
  install -D -m 0644 "$f" "$MAIN/usr/share/doc/skr-pkcs11/examples/$(basename "$f")"
done
# OpenSSL 3 with pkcs11-provider (not in Debian 12; users build it): keys as store: URIs.
install -m 0644 examples/pkcs11-provider/openssl.cnf "$MAIN/usr/share/doc/skr-pkcs11/examples/openssl-provider.cnf"
install -D -m 0644 packaging/debian/skr-pkcs11.lintian-overrides "$MAIN/usr/share/lintian/overrides/skr-pkcs11"

# Debug symbols: the doc directory is the main package's (as debhelper's dbgsym packages do).
mkdir -p "$DBG/usr/share/doc"
ln -s skr-pkcs11 "$DBG/usr/share/doc/skr-pkcs11-dbgsym"

mkdir -p "$EMU/DEBIAN"
install_split "$REL/skr-emulator" "$EMU/usr/bin/skr-emulator" ""
install_docs "$EMU" skr-emulator docs/EMULATOR.md
install -D -m 0644 packaging/debian/skr-emulator.lintian-overrides "$EMU/usr/share/lintian/overrides/skr-emulator"

echo "== Depends"
MAIN_DEPENDS=$(shlibs_depends skr-pkcs11 "usr/lib/$TRIPLET/pkcs11/libskr_pkcs11.so" usr/bin/skr-pkcs11)
# The vTPM path (cvm feature) links libtss2-esys (today into skr-pkcs11's doctor; into the
# module once C_Login uses it); the TCTI module that reaches /dev/tpmrm0 is dlopen'ed at run
# time, so dpkg-shlibdeps cannot see it.
if grep -aq libtss2-esys "$MAIN/usr/lib/$TRIPLET/pkcs11/libskr_pkcs11.so" "$MAIN/usr/bin/skr-pkcs11"; then
  MAIN_DEPENDS="$MAIN_DEPENDS, libtss2-tcti-device0 | libtss2-tcti-device0t64"
fi
EMU_DEPENDS=$(shlibs_depends skr-emulator usr/bin/skr-emulator)
echo "   skr-pkcs11: $MAIN_DEPENDS"
echo "   skr-emulator: $EMU_DEPENDS"

echo "== packages"
mkdir -p "$OUT"
rm -f "$OUT"/*.deb
build_deb "$MAIN" skr-pkcs11 "Depends: $MAIN_DEPENDS
Recommends: p11-kit
Suggests: opensc, libengine-pkcs11-openssl, skr-pkcs11-dbgsym
Section: libs
Priority: optional
Description: PKCS#11 module with keys released by Azure Secure Key Release
 A PKCS#11 token (libskr_pkcs11.so) whose private and secret keys come from
 Azure Key Vault or Managed HSM by Secure Key Release: at C_Login the module
 attests the confidential VM or container (AMD SEV-SNP) with Microsoft Azure
 Attestation and the vault releases the keys to it, wrapped for this TEE only.
 .
 The package installs the module in the PKCS#11 module directory, registers it
 with p11-kit (loaded only on request, see the module file), and ships the
 skr-pkcs11 tool (doctor, attest, release, policy check) and an example
 /etc/skr-pkcs11/config.toml that must be edited before use."
build_deb "$DBG" skr-pkcs11-dbgsym "Depends: skr-pkcs11 (= $VERSION)
Section: debug
Priority: optional
Description: debug symbols for skr-pkcs11
Auto-Built-Package: debug-symbols
Build-Ids: ${BUILD_IDS[*]}"
build_deb "$EMU" skr-emulator "Depends: $EMU_DEPENDS
Section: devel
Priority: optional
Description: local Azure Secure Key Release stack for skr-pkcs11 development
 skr-emulator runs Microsoft Azure Attestation, Key Vault, Managed HSM and IMDS
 look-alikes over HTTPS on 127.0.0.1 with simulated SEV-SNP platforms, so that
 skr-pkcs11 can be developed and tested without Azure. For development
 machines only: its keys, CA and attestation are not secure and never were
 meant to be."

so=$MAIN/usr/lib/$TRIPLET/pkcs11/libskr_pkcs11.so
echo "== module: $(stat -c %s "$so") bytes stripped, debug symbols $(du -b "$DBG/usr/lib/debug" | tail -1 | cut -f1) bytes in skr-pkcs11-dbgsym"
