#![no_main]
//! `skr_emulator::fuzzing::azure_guest_request`: the body of `POST /attest/AzureGuest`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skr_emulator::fuzzing::azure_guest_request(data);
});
