#![no_main]
//! `skr_pkcs11::fuzzing::gcm_message` (its doc says what the bytes are).

#[path = "fixtures.rs"]
mod fixtures;

// The fixtures are built before fuzzing starts, not inside the first input's time limit.
libfuzzer_sys::fuzz_target!(init: { std::sync::LazyLock::force(&fixtures::FIXTURES); }, |data: &[u8]| {
    let _ = skr_pkcs11::fuzzing::gcm_message(&fixtures::FIXTURES, data);
});
