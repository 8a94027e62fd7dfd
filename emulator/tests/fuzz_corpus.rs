//! Every file of the emulator's fuzz corpora (`fuzz/corpus/emulator_*`: seeds from the real
//! artifacts, and each input a fuzzer ever found a problem with) replayed on stable through the
//! same harness as its fuzz target (`skr_emulator::fuzzing`), so a fixed finding stays fixed.
//! Each file must be handled within a deadline; files named `accept-*` must be accepted.

use skr_emulator::fuzzing::{azure_guest_request, maa_request, tcg_log, KeyVault};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Far above any corpus file's time (an RSA-4096 key generation is the slowest); only a hang
/// reaches it.
const DEADLINE: Duration = Duration::from_secs(60);

fn files_of(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no seed", dir.display());
    files
}

/// Runs `harness` over every file of `target` on a worker thread, bounded by DEADLINE per file.
fn replay(target: &str, harness: impl Fn(&[u8]) -> bool + Send + 'static) -> usize {
    let (to_worker, jobs) = mpsc::channel::<PathBuf>();
    let (to_test, results) = mpsc::channel::<bool>();
    std::thread::spawn(move || {
        for file in jobs {
            let bytes = std::fs::read(&file).unwrap();
            if to_test.send(harness(&bytes)).is_err() {
                return;
            }
        }
    });
    let mut accepted_seeds = 0;
    for file in files_of(target) {
        to_worker.send(file.clone()).unwrap();
        let accepted = results
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("{} did not finish within {DEADLINE:?}", file.display()));
        if file
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("accept-"))
        {
            assert!(accepted, "{} must be accepted", file.display());
            accepted_seeds += 1;
        }
    }
    accepted_seeds
}

#[test]
fn maa_request_corpus_replays() {
    replay("emulator_maa_request", maa_request);
}

#[test]
fn azure_guest_request_corpus_replays() {
    replay("emulator_azure_guest_request", azure_guest_request);
}

#[test]
fn tcg_log_corpus_replays() {
    let accepted = replay("emulator_tcg_log", tcg_log);
    assert!(accepted > 0, "no accept-* seed for emulator_tcg_log");
}

#[test]
fn keyvault_request_corpus_replays() {
    let accepted = replay("emulator_keyvault_request", {
        let kv = std::sync::OnceLock::new();
        move |bytes| kv.get_or_init(KeyVault::new).request(bytes)
    });
    assert!(
        accepted > 0,
        "no accept-* seed for emulator_keyvault_request"
    );
}
