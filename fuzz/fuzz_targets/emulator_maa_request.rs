#![no_main]
//! `skr_emulator::fuzzing::maa_request`: the body of `POST /attest/SevSnpVm`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skr_emulator::fuzzing::maa_request(data);
});
