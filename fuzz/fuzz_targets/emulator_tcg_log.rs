#![no_main]
//! `skr_emulator::fuzzing::tcg_log`: a TCG event log as the emulator's MAA reads `TcgLogs`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = skr_emulator::fuzzing::tcg_log(data);
});
