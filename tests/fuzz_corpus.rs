//! Every file of the module's fuzz corpora (`fuzz/corpus/<target>/`: seeds from the real
//! artifacts, and each input a fuzzer ever found a problem with) replayed on stable through the
//! same harness as its fuzz target (`skr_pkcs11::fuzzing`), so a fixed finding stays fixed
//! without nightly or cargo-fuzz. Each file must be handled within a deadline (a hang fails
//! here instead of stalling the suite); files named `accept-*` must pass every check of their
//! harness, which proves the structure-aware seeds reach the end of the parser.

use skr_pkcs11::fuzzing::{Fixtures, TARGETS};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Far above any corpus file's time (milliseconds, debug build); only a hang reaches it.
const DEADLINE: Duration = Duration::from_secs(20);

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

fn files_of(target: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir().join(target))
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_file_replays_through_its_harness() {
    let (to_worker, jobs) = mpsc::channel::<(usize, PathBuf)>();
    let (to_test, results) = mpsc::channel::<bool>();
    std::thread::spawn(move || {
        let fx = Fixtures::new(
            include_bytes!("../testdata/fuzz/test-key.pk8"),
            include_bytes!("../testdata/fuzz/test-ca.der"),
            include_bytes!("../testdata/fuzz/test-leaf.der"),
        );
        for (target, file) in jobs {
            let bytes = std::fs::read(&file).unwrap();
            if to_test.send((TARGETS[target].1)(&fx, &bytes)).is_err() {
                return;
            }
        }
    });
    let mut replayed = 0;
    for (index, (name, _)) in TARGETS.iter().enumerate() {
        let files = files_of(name);
        assert!(!files.is_empty(), "fuzz/corpus/{name} has no seed");
        let mut accepted_seeds = 0;
        for file in files {
            to_worker.send((index, file.clone())).unwrap();
            let accepted = results.recv_timeout(DEADLINE).unwrap_or_else(|_| {
                panic!("{} did not finish within {DEADLINE:?}", file.display())
            });
            let must_accept = file
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("accept-"));
            if must_accept {
                assert!(
                    accepted,
                    "{} must pass every check of {name}",
                    file.display()
                );
                accepted_seeds += 1;
            }
            replayed += 1;
        }
        assert!(
            accepted_seeds > 0,
            "fuzz/corpus/{name} has no accept-* seed"
        );
    }
    assert!(replayed >= TARGETS.len());
}

/// A corpus directory without a harness would never be replayed (or fuzzed).
#[test]
fn every_module_corpus_directory_has_a_harness() {
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.starts_with("emulator_") {
            continue; // replayed by emulator/tests/fuzz_corpus.rs
        }
        assert!(
            TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} has no harness in skr_pkcs11::fuzzing::TARGETS"
        );
    }
}
