#![no_main]
//! `skr_pkcs11::fuzzing::collateral` (its doc says what the bytes are).

#[path = "fixtures.rs"]
mod fixtures;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skr_pkcs11::fuzzing::collateral(&fixtures::FIXTURES, data);
});
