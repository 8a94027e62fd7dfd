//! The black-box conformance suite (pkcs11-conformance) run against this module, where every
//! check must pass, and against SoftHSMv2 with keys it provisions, where the report states
//! each departure from the spec (one suite, two modules: the checks are about the spec).

mod common;

use std::process::Command;

fn conformance_bin() -> std::path::PathBuf {
    common::artifact("pkcs11-conformance")
}

#[test]
fn skr_pkcs11_passes_every_conformance_check() {
    let emu = common::Emulator::shared();
    let out = Command::new(conformance_bin())
        .args([
            "--module",
            common::module_path().to_str().unwrap(),
            "--token-label",
            "skr-demo",
            "--strict",
        ])
        .envs(&emu.env)
        .output()
        .expect("run pkcs11-conformance");
    let o = String::from_utf8_lossy(&out.stdout);
    println!("{o}");
    assert!(
        o.contains("checks pass, 0 depart"),
        "departures:\n{o}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
}

fn softhsm_module() -> String {
    for p in [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("SoftHSMv2 is not installed (apt: softhsm2); scripts/install-deps.sh installs it");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh SoftHSMv2 token "conf" (PIN 1234) with an RSA-2048 and a P-256 key pair and an
/// AES-256 key, in `dir`. Returns the module path and the environment that selects the token.
fn softhsm_token(dir: &std::path::Path) -> (String, Vec<(&'static str, String)>) {
    let conf = dir.join("softhsm2.conf");
    std::fs::create_dir(dir.join("tokens")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\n",
            dir.display()
        ),
    )
    .unwrap();
    let m = softhsm_module();
    let env = [("SOFTHSM2_CONF", conf.to_str().unwrap().to_string())];
    let env = &env[..];
    run(Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "conf",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str()))));
    for args in [
        vec![
            "--keypairgen",
            "--key-type",
            "rsa:2048",
            "--id",
            "01",
            "--label",
            "rsa",
        ],
        vec![
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--id",
            "02",
            "--label",
            "ec",
        ],
        vec![
            "--keygen",
            "--key-type",
            "AES:32",
            "--id",
            "03",
            "--label",
            "aes",
        ],
    ] {
        run(Command::new("pkcs11-tool")
            .args([
                "--module",
                &m,
                "--token-label",
                "conf",
                "--login",
                "--pin",
                "1234",
            ])
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))));
    }
    (m, env.to_vec())
}

#[test]
fn softhsm_runs_the_same_suite_and_its_departures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (m, env) = softhsm_token(dir.path());
    let out = Command::new(conformance_bin())
        .args(["--module", &m, "--token-label", "conf", "--pin", "1234"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let o = String::from_utf8_lossy(&out.stdout);
    println!("{o}");
    assert!(
        out.status.success(),
        "the suite must complete on SoftHSMv2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = o
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("DEPARTS"))
        .count();
    assert_eq!(total, 23, "every check reported");
    // The spec-level basics hold on SoftHSMv2 too: the suite measures the spec, not our module.
    for basic in [
        "C_GetInfo identical across re-initialisation",
        "C_GetAttributeValue rules",
        "session state machine",
        "C_Initialize argument matrix",
    ] {
        assert!(
            o.lines()
                .any(|l| l.starts_with("PASS") && l.contains(basic)),
            "SoftHSMv2 should pass '{basic}':\n{o}"
        );
    }
}

fn stress_bin() -> std::path::PathBuf {
    let p = common::artifact("p11-stress");
    assert!(
        p.exists(),
        "{} missing: cargo build --workspace",
        p.display()
    );
    p
}

/// The calls a p11-stress report counted (its last line: "stress: N calls, V violations").
fn stress_calls(report: &str) -> u64 {
    report
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("stress: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The bounded C API stress run (issue 11): about a million random calls from two threads,
/// with forks and re-initialisation between phases; every invariant holds on this module.
/// A fixed seed, so that a failure here is reproducible with the same command.
#[test]
fn stress_run_keeps_every_invariant_on_skr_pkcs11() {
    let emu = common::Emulator::shared();
    let out = Command::new(stress_bin())
        .args([
            "--module",
            common::module_path().to_str().unwrap(),
            "--token-label",
            "skr-demo",
            "--steps",
            "720000",
            "--threads",
            "2",
            "--seed",
            "20261204",
        ])
        .envs(&emu.env)
        .output()
        .expect("run p11-stress");
    let o = String::from_utf8_lossy(&out.stdout);
    println!("{o}");
    assert!(
        out.status.success(),
        "p11-stress found violations or failed ({:?}):\n{o}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(o.contains(", 0 violations"), "{o}");
    assert!(stress_calls(&o) >= 1_000_000, "fewer calls than asked: {o}");
    assert!(
        o.contains("forks: ") && !o.contains("forks: 0,"),
        "no fork was exercised: {o}"
    );
}

/// The same tester drives SoftHSMv2 to a verdict (a report, or the crash it finds: SoftHSMv2
/// 2.6.1 dies in C_Sign after accepting CKM_DSA_SHA224 with an RSA key, see
/// docs/RELIABILITY.md): it works on any module, and never hangs or fails to start.
#[test]
fn stress_run_reaches_a_verdict_on_softhsm() {
    let dir = tempfile::tempdir().unwrap();
    let (m, env) = softhsm_token(dir.path());
    let out = Command::new(stress_bin())
        .args([
            "--module",
            &m,
            "--token-label",
            "conf",
            "--pin",
            "1234",
            "--steps",
            "100000",
            "--threads",
            "2",
            "--seed",
            "20261204",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run p11-stress");
    let o = String::from_utf8_lossy(&out.stdout);
    println!("{o}");
    use std::os::unix::process::ExitStatusExt;
    let verdict = match (out.status.code(), out.status.signal()) {
        (Some(0), _) => "clean".to_string(),
        (Some(1), _) => format!("{} violations", o.lines().filter(|l| l.starts_with("VIOLATION")).count()),
        (_, Some(sig)) => format!("crashed (signal {sig})"),
        // p11-stress's own codes are 0, 1, 2 (could not start) and 3 (hang); any other exit
        // after its first line is SoftHSMv2 ending the process from inside a call (seen:
        // exit 5, intermittently, with two threads and forks).
        (Some(code), _) if code > 3 => format!("the module ended the process (exit {code})"),
        (code, _) => panic!(
            "p11-stress did not reach a verdict on SoftHSMv2 (exit {code:?}: 2 = could not start, 3 = hang):\n{o}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    println!("SoftHSMv2 under p11-stress: {verdict}");
    assert!(o.starts_with("p11-stress of "), "{o}");
}
