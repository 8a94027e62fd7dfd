#![no_main]
//! `skr_emulator::fuzzing::KeyVault::request`: Key Vault / Managed HSM requests (operation,
//! service, JSON body) through the service's HTTP handler.

static KEY_VAULT: std::sync::LazyLock<skr_emulator::fuzzing::KeyVault> =
    std::sync::LazyLock::new(skr_emulator::fuzzing::KeyVault::new);

// The emulator state (a new PKI: seconds) is built before fuzzing starts, not inside the
// first input's time limit.
libfuzzer_sys::fuzz_target!(init: { std::sync::LazyLock::force(&KEY_VAULT); }, |data: &[u8]| {
    let _ = KEY_VAULT.request(data);
});
