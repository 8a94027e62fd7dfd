#![no_main]
//! `skr_emulator::fuzzing::KeyVault::request`: Key Vault / Managed HSM requests (operation,
//! service, JSON body) through the service's HTTP handler.

static KEY_VAULT: std::sync::LazyLock<skr_emulator::fuzzing::KeyVault> =
    std::sync::LazyLock::new(skr_emulator::fuzzing::KeyVault::new);

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = KEY_VAULT.request(data);
});
