//! One AWS-LC in the module, and it is the one whose allocator the locked-memory arena hooks.
//! Each aws-lc-sys version prefixes its symbols (`aws_lc_0_47_0_…`): a second version in the
//! dependency tree would be a second AWS-LC, and what aws-lc-rs allocates there (parsed keys)
//! would never reach the hooks of `secret::arena`. Cargo.toml pins aws-lc-sys to exactly the
//! version aws-lc-rs links; this checks the result in the built `.so` and at run time.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

/// `aws_lc_X_Y_Z_` of the aws-lc-sys version pinned in Cargo.toml (`aws-lc-sys = "=X.Y.Z"`).
fn pinned_prefix() -> String {
    let manifest = std::fs::read_to_string(common::workspace_root().join("Cargo.toml")).unwrap();
    let line = manifest
        .lines()
        .find(|l| l.starts_with("aws-lc-sys"))
        .expect("aws-lc-sys in Cargo.toml");
    let version = line
        .split('"')
        .nth(1)
        .and_then(|v| v.strip_prefix('='))
        .unwrap_or_else(|| panic!("aws-lc-sys is not pinned with \"=X.Y.Z\": {line}"));
    format!("aws_lc_{}_", version.replace('.', "_"))
}

/// Distinct `aws_lc_X_Y_Z_` prefixes among the symbol names (from `nm` output).
fn aws_lc_prefixes(symbols: &str) -> BTreeSet<String> {
    symbols
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|name| {
            let rest = name.strip_prefix("aws_lc_")?;
            let mut parts = rest.splitn(4, '_');
            let v: Vec<&str> = (0..3).map_while(|_| parts.next()).collect();
            (v.len() == 3 && v.iter().all(|p| p.chars().all(|c| c.is_ascii_digit())))
                .then(|| format!("aws_lc_{}_{}_{}_", v[0], v[1], v[2]))
        })
        .collect()
}

#[test]
fn the_module_links_exactly_one_aws_lc_the_pinned_version() {
    let lock = std::fs::read_to_string(common::workspace_root().join("Cargo.lock")).unwrap();
    assert_eq!(
        lock.matches("name = \"aws-lc-sys\"\n").count(),
        1,
        "Cargo.lock resolves more than one aws-lc-sys"
    );

    // The debug build keeps its symbol table (the packaged one is stripped).
    let out = Command::new("nm")
        .arg(common::module_path())
        .output()
        .expect("run nm (binutils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let symbols = String::from_utf8(out.stdout).unwrap();
    let prefix = pinned_prefix();
    assert_eq!(
        aws_lc_prefixes(&symbols),
        BTreeSet::from([prefix.clone()]),
        "the module carries AWS-LC copies other than (or besides) {prefix}"
    );
    let hook_setter = format!("{prefix}CRYPTO_set_mem_functions");
    assert_eq!(
        symbols
            .lines()
            .filter(|l| l.ends_with(&format!(" {hook_setter}")))
            .count(),
        1
    );
    // No unprefixed libcrypto either, linked in or loaded beside (OpenSSL, BoringSSL).
    for l in symbols.lines() {
        let name = l.split_whitespace().last().unwrap_or("");
        assert!(
            !matches!(
                name,
                "CRYPTO_set_mem_functions" | "OPENSSL_malloc" | "EVP_PKEY_new"
            ),
            "unprefixed libcrypto symbol in the module: {l}"
        );
    }
    let dynamic = Command::new("readelf")
        .args(["-d", "--wide"])
        .arg(common::module_path())
        .output()
        .expect("run readelf (binutils)");
    let dynamic = String::from_utf8(dynamic.stdout).unwrap();
    assert!(dynamic.contains("(NEEDED)"), "{dynamic}");
    assert!(
        !dynamic.contains("libcrypto") && !dynamic.contains("libssl"),
        "{dynamic}"
    );
}

#[test]
fn keys_aws_lc_rs_makes_are_allocated_by_the_hooked_allocator() {
    // The library constructor installs the hooks in the module; a test binary links the rlib,
    // whose constructor the linker may drop, so install explicitly (idempotent).
    skr_pkcs11::secret::arena::install();
    assert!(skr_pkcs11::secret::arena::is_hooked());
    let before = skr_pkcs11::secret::arena::bytes_in_use();
    // Through aws-lc-rs, not aws-lc-sys: the two only share an allocator if they share AWS-LC.
    let key = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
    )
    .unwrap();
    let during = skr_pkcs11::secret::arena::bytes_in_use();
    assert!(
        during > before,
        "an aws-lc-rs key did not come from the arena ({before} -> {during} bytes)"
    );
    drop(key);
    assert!(skr_pkcs11::secret::arena::bytes_in_use() < during);
}
