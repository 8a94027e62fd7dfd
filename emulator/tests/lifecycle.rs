//! `skr-emulator up` / `down`: clean start, generated files, restart keeps state, and clear
//! errors for a used port, a bad directory, a corrupt state file, a second instance.

mod common;

use common::*;
use std::process::Command;

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str], dir: &std::path::Path) -> Run {
    let out = Command::new(EXE)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run skr-emulator");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Stops the emulator of a directory even when an assertion fails half-way.
struct DownOnDrop(std::path::PathBuf);
impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = Command::new(EXE)
            .args(["down", "--dir"])
            .arg(&self.0)
            .output();
    }
}

async fn current_version(emu: &Emu, name: &str) -> String {
    let c = emu.client();
    let token = access_token(emu, &c, "https://vault.azure.net").await;
    let r = send(
        c.get(format!("{}/keys/{name}?api-version=7.4", emu.vault))
            .bearer_auth(token),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The version id only: the host part moves with --base-port.
    r.json()["key"]["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn up_down_restart_and_errors() {
    let dir = temp_dir("lifecycle");
    let _guard = DownOnDrop(dir.clone());

    // Clean start, detached.
    let up = run(&["up"], &dir);
    assert!(up.ok, "up failed: {}{}", up.stdout, up.stderr);
    assert!(up.stdout.contains("SKR_EMULATOR_MAA_URL"), "{}", up.stdout);
    for file in [
        "ca.pem",
        "env",
        "skr-pkcs11.toml",
        "emulator.pid",
        "certs/tls-rsa.pem",
        "certs/tls-ec.pem",
        "security-context/host-amd-cert-base64",
        "security-context/security-policy-base64",
        "security-context/reference-info-base64",
        "state/pki.json",
        "state/platform.json",
        "state/keys.json",
        "state/ports.json",
    ] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    let env = read_env(&dir);
    assert_eq!(
        env["SKR_PKCS11_CONFIG"],
        dir.join("skr-pkcs11.toml").display().to_string()
    );
    assert_eq!(
        env["SKR_EMULATOR_CA"],
        dir.join("ca.pem").display().to_string()
    );
    assert!(env["SKR_EMULATOR_IMDS_URL"].starts_with("http://127.0.0.1:"));
    let emu = Emu::from_dir(&dir);
    let config = std::fs::read_to_string(dir.join("skr-pkcs11.toml")).unwrap();
    for line in [
        "evidence = \"emulated\"".to_string(),
        format!("emulator_url = \"{}\"", emu.platform),
        format!("imds_url = \"{}\"", emu.imds),
        format!("url = \"{}\"", emu.maa),
        "source = \"imds\"".to_string(),
        "ca_file = \"ca.pem\"".to_string(),
        format!("kid = \"{}/keys/tls-rsa\"", emu.vault),
        format!("kid = \"{}/keys/tls-ec\"", emu.vault),
        format!("kid = \"{}/keys/data-aes\"", emu.mhsm),
        format!("kid = \"{}/keys/denied-rsa\"", emu.vault),
        "certificate = \"certs/tls-rsa.pem\"".to_string(),
        "allow_rsa_pkcs_decrypt = true".to_string(),
        "label = \"skr-denied\"".to_string(),
    ] {
        assert!(config.contains(&line), "config lacks {line}:\n{config}");
    }
    let version = current_version(&emu, "tls-rsa").await;
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();

    let status = run(&["status"], &dir);
    assert!(
        status.ok
            && status.stdout.contains("is running")
            && status.stdout.contains("SKR_EMULATOR_VAULT_URL"),
        "{}",
        status.stdout
    );

    // A second instance for the same directory is refused.
    let again = run(&["up"], &dir);
    assert!(!again.ok);
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    let foreground = run(&["up", "--foreground"], &dir);
    assert!(!foreground.ok);
    assert!(
        foreground.stderr.contains("already running"),
        "{}",
        foreground.stderr
    );

    // Down, then up again: same ports, same CA, same key versions.
    let down = run(&["down"], &dir);
    assert!(down.ok, "{}", down.stderr);
    assert!(!dir.join("emulator.pid").exists());
    assert!(
        std::net::TcpStream::connect(emu.vault.trim_start_matches("https://")).is_err(),
        "vault port closed"
    );
    let up = run(&["up"], &dir);
    assert!(up.ok, "restart failed: {}", up.stderr);
    assert_eq!(read_env(&dir), env);
    assert_eq!(std::fs::read(dir.join("ca.pem")).unwrap(), ca);
    assert_eq!(current_version(&emu, "tls-rsa").await, version);
    assert!(run(&["down"], &dir).ok);
    let status = run(&["status"], &dir);
    assert!(
        !status.ok && status.stdout.contains("not running"),
        "{}",
        status.stdout
    );
    let not_running = run(&["down"], &dir);
    assert!(
        not_running.ok && not_running.stdout.contains("not running"),
        "{}",
        not_running.stdout
    );

    // A used port: clear error naming the port, nothing changed.
    let maa_port = emu.maa.rsplit(':').next().unwrap().to_string();
    let blocker =
        std::net::TcpListener::bind(format!("127.0.0.1:{maa_port}")).expect("take the MAA port");
    let keys_before = std::fs::read(dir.join("state/keys.json")).unwrap();
    let busy = run(&["up"], &dir);
    assert!(!busy.ok);
    assert!(
        busy.stderr.contains(&maa_port) && busy.stderr.contains("MAA"),
        "{}",
        busy.stderr
    );
    drop(blocker);
    assert_eq!(
        std::fs::read(dir.join("state/keys.json")).unwrap(),
        keys_before
    );

    // New fixed ports: URLs move, and policies naming the old MAA URL follow it.
    let base = free_port_range();
    let moved = run(&["up", "--base-port", &base.to_string()], &dir);
    assert!(moved.ok, "{}", moved.stderr);
    let moved_emu = Emu::from_dir(&dir);
    assert_eq!(moved_emu.maa, format!("https://127.0.0.1:{base}"));
    assert_eq!(
        moved_emu.platform,
        format!("https://127.0.0.1:{}", base + 4)
    );
    assert_eq!(current_version(&moved_emu, "tls-rsa").await, version);
    let c = moved_emu.client();
    let token = access_token(&moved_emu, &c, "https://vault.azure.net").await;
    let bundle = send(
        c.get(format!(
            "{}/keys/denied-rsa?api-version=7.4",
            moved_emu.vault
        ))
        .bearer_auth(&token),
    )
    .await
    .json();
    let policy: serde_json::Value = serde_json::from_slice(&unb64url(
        bundle["release_policy"]["data"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(policy["anyOf"][0]["authority"], moved_emu.maa);
    let transfer = transfer_key();
    let target = maa_token(&moved_emu, &c, &transfer).await;
    let r = send(
        c.post(format!(
            "{}/keys/tls-ec/release?api-version=7.4",
            moved_emu.vault
        ))
        .bearer_auth(&token)
        .json(&serde_json::json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(run(&["down"], &dir).ok);
    let keys_before = std::fs::read(dir.join("state/keys.json")).unwrap();

    // A corrupt state file: named in the error and left as it was.
    std::fs::write(dir.join("state/keys.json"), b"{ not json").unwrap();
    let corrupt = run(&["up"], &dir);
    assert!(!corrupt.ok);
    assert!(
        corrupt.stderr.contains("keys.json") && corrupt.stderr.contains("corrupt"),
        "{}",
        corrupt.stderr
    );
    assert_eq!(
        std::fs::read(dir.join("state/keys.json")).unwrap(),
        b"{ not json"
    );
    std::fs::write(dir.join("state/keys.json"), &keys_before).unwrap();
    let bad_platform = dir.join("state/platform.json");
    let platform_text = std::fs::read_to_string(&bad_platform).unwrap();
    std::fs::write(
        &bad_platform,
        platform_text.replace("\"measurement\": \"", "\"measurement\": \"zz"),
    )
    .unwrap();
    let invalid = run(&["up", "--foreground"], &dir);
    assert!(!invalid.ok);
    assert!(invalid.stderr.contains("measurement"), "{}", invalid.stderr);
    std::fs::write(&bad_platform, platform_text).unwrap();

    // A directory that is a file.
    let file = dir.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let bad_dir = run(&["up"], &file);
    assert!(!bad_dir.ok);
    assert!(
        bad_dir.stderr.contains("not a directory"),
        "{}",
        bad_dir.stderr
    );

    // And after all that, the state still starts, on the remembered ports.
    let up = run(&["up"], &dir);
    assert!(up.ok, "{}", up.stderr);
    assert_eq!(current_version(&moved_emu, "tls-rsa").await, version);
    assert!(run(&["down"], &dir).ok);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Five consecutive free ports (probed; another process could still take one meanwhile).
fn free_port_range() -> u16 {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base > 60000 {
            continue;
        }
        let all: Vec<_> = (base..base + 5)
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if all.iter().all(|l| l.is_ok()) {
            return base;
        }
    }
    panic!("no five consecutive free ports");
}

/// An emulator that does not stop on SIGTERM (here: stopped with SIGSTOP, as one whose
/// workers are stuck would be) is killed by `down` after its timeout, its files are removed,
/// and the directory starts again.
#[test]
fn down_kills_an_emulator_that_ignores_sigterm() {
    let dir = temp_dir("stuck");
    let _guard = DownOnDrop(dir.clone());
    let up = run(&["up"], &dir);
    assert!(up.ok, "up failed: {}{}", up.stdout, up.stderr);
    let pid: i32 = std::fs::read_to_string(dir.join("emulator.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: SIGSTOP to the emulator this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);

    let started = std::time::Instant::now();
    let down = run(&["down", "--timeout", "1"], &dir);
    let took = started.elapsed();
    assert!(down.ok, "{}{}", down.stdout, down.stderr);
    assert!(
        down.stdout.contains(&format!(
            "did not stop within 1 s of SIGTERM: killed (pid {pid})"
        )),
        "{}",
        down.stdout
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "down took {took:?}"
    );
    assert!(!dir.join("emulator.pid").exists());
    assert!(!dir.join("emulator.ready").exists());
    let status = run(&["status"], &dir);
    assert!(status.stdout.contains("not running"), "{}", status.stdout);

    // The state lock died with the process: the same directory starts and stops cleanly.
    let again = run(&["up"], &dir);
    assert!(again.ok, "{}", again.stderr);
    let down = run(&["down"], &dir);
    assert!(
        down.ok && down.stdout.contains("stopped (pid"),
        "{}",
        down.stdout
    );
    let _ = std::fs::remove_dir_all(&dir);
}
