#![no_main]
//! `skr_pkcs11::fuzzing::jwk` (its doc says what the bytes are).

#[path = "fixtures.rs"]
mod fixtures;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skr_pkcs11::fuzzing::jwk(&fixtures::FIXTURES, data);
});
