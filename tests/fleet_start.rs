//! Fleet start (issue 9): many module processes logging in at the same moment against one
//! emulated vault whose release throttle is on must all get their keys, through jittered
//! backoff and Retry-After, with exactly one release per key per process. The full 100 hosts
//! with Key Vault's documented limits run in scripts/fleet.sh (docs/BENCHMARKS.md).

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const HOSTS: usize = 20;
const KEYS: [&str; 3] = ["tls-rsa", "tls-ec", "data-aes"];

struct Host {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    stderr: std::path::PathBuf,
}

impl Host {
    fn next_line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(line)) => line,
            other => panic!(
                "host {} ended without a line ({other:?}); stderr:\n{}",
                self.child.id(),
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            ),
        }
    }
}

#[test]
fn a_throttled_fleet_logs_in_with_one_release_per_key_and_host() {
    let emu = Emulator::start();
    // Bounded: a host that cannot get its keys within two minutes fails instead of hanging.
    let config = emu.config_variant("fleet.toml", |t| {
        t.replace("[tls]\n", "[release]\ndeadline_seconds = 120\n\n[tls]\n")
            .replace("level = \"info\"", "level = \"warn\"")
    });
    // Tight budgets over a 2 s window, so that the test is quick and the 40 vault releases
    // (20 hosts × 2 keys) and 20 managed-HSM releases asked for at once must queue.
    emu.admin_put(
        "/admin/limits",
        serde_json::json!({"vault_create_release_per_10s": 6, "mhsm_create_release_per_10s": 3, "window_ms": 2000}),
    );
    emu.admin_post("/admin/counters/reset", serde_json::json!({}));

    // The start line: held exclusively here until every host is ready.
    let start_path = emu.path().join("fleet.start");
    let start = std::fs::File::create(&start_path).expect("start lock file");
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(start.as_raw_fd(), libc::LOCK_EX) }, 0);

    let helper = artifact("examples/fleet_login");
    let mut hosts: Vec<Host> = (0..HOSTS)
        .map(|i| {
            let stderr = emu.path().join(format!("host-{i}.stderr"));
            let mut child = Command::new(&helper)
                .arg(module_path())
                .arg("skr-demo")
                .arg(&start_path)
                .env("SKR_PKCS11_CONFIG", &config)
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("start a host");
            let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
            Host {
                child,
                lines,
                stderr,
            }
        })
        .collect();
    for h in &mut hosts {
        assert_eq!(h.next_line(), "ready");
    }
    let started = Instant::now();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::flock(start.as_raw_fd(), libc::LOCK_UN) }, 0);

    let mut login_ms = Vec::new();
    for h in &mut hosts {
        let line = h.next_line();
        let status = h.child.wait().expect("wait for a host");
        assert!(
            line.starts_with("logged-in ") && status.success(),
            "host {}: {line} ({status}); stderr:\n{}",
            h.child.id(),
            std::fs::read_to_string(&h.stderr).unwrap_or_default()
        );
        let ms: u64 = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("login_ms="))
            .and_then(|v| v.parse().ok())
            .expect("login_ms");
        login_ms.push(ms);
    }
    let all_in = started.elapsed();
    login_ms.sort_unstable();
    eprintln!(
        "{HOSTS} hosts logged in within {all_in:?}; login p50 {} ms, max {} ms",
        login_ms[HOSTS / 2],
        login_ms[HOSTS - 1]
    );

    let counters = emu.admin_get("/admin/counters");
    for key in KEYS {
        assert_eq!(
            counters["releases"][key].as_u64(),
            Some(HOSTS as u64),
            "one release of {key} per host: {counters}"
        );
    }
    assert!(
        counters["release_denied"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{counters}"
    );
    // The fleet was throttled, and got through anyway.
    assert!(
        counters["throttled"]["vault"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );
    assert!(
        counters["throttled"]["mhsm"].as_u64().unwrap_or(0) > 0,
        "{counters}"
    );
}
