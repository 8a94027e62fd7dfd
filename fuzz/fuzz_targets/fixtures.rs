// The test key and certificates of the harnesses (testdata/fuzz/, made for fuzzing only).
pub static FIXTURES: std::sync::LazyLock<skr_pkcs11::fuzzing::Fixtures> =
    std::sync::LazyLock::new(|| {
        skr_pkcs11::fuzzing::Fixtures::new(
            include_bytes!("../../testdata/fuzz/test-key.pk8"),
            include_bytes!("../../testdata/fuzz/test-ca.der"),
            include_bytes!("../../testdata/fuzz/test-leaf.der"),
        )
    });
