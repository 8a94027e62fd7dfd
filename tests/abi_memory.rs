//! Secrets stay out of core dumps and do not outlive C_Logout. A known RSA key is imported into
//! the emulated vault; a helper process (examples/hold_logged_in.rs) logs in with the module.
//! Its live memory must contain the key while logged in (proves the scan works), its core dump
//! (gcore) must not, and its live memory after C_Logout must not.

mod common;

use common::Emulator;
use rsa::traits::PrivateKeyParts;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// 32-byte windows of the private exponent and primes, big-endian and as little-endian words
/// (how the engine's bignums sit in memory on x86-64).
fn secret_patterns(key: &rsa::RsaPrivateKey) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut parts = vec![key.d().to_bytes_be()];
    parts.extend(key.primes().iter().map(|p| p.to_bytes_be()));
    for be in parts {
        let le: Vec<u8> = be.iter().rev().copied().collect();
        for src in [be, le] {
            for start in [8usize, src.len() / 2] {
                out.push(src[start..start + 32].to_vec());
            }
        }
    }
    out
}

/// One pass over `hay` for equal-length patterns (a first-byte table keeps the debug build
/// of this test fast enough for a few hundred MiB).
fn contains_any(hay: &[u8], patterns: &[Vec<u8>]) -> bool {
    let n = patterns[0].len();
    let mut first = [false; 256];
    for p in patterns {
        first[p[0] as usize] = true;
    }
    if hay.len() < n {
        return false;
    }
    (0..=hay.len() - n)
        .any(|i| first[hay[i] as usize] && patterns.iter().any(|p| p.as_slice() == &hay[i..i + n]))
}

/// Every writable mapping of a live process, via /proc/PID/mem (includes MADV_DONTDUMP ones).
fn live_memory_contains(pid: u32, patterns: &[Vec<u8>]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem (needs ptrace rights over the child)");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        // Secrets can only be in writable memory; skipping code and read-only data keeps it fast.
        if !perms.starts_with("rw") || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_ok()
            && mem.read_exact(&mut buf).is_ok()
            && contains_any(&buf, patterns)
        {
            return true;
        }
    }
    false
}

#[test]
fn key_bytes_are_in_no_core_dump_and_gone_after_logout() {
    use rsa::pkcs8::EncodePrivateKey;
    let emu = Emulator::shared();
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA keygen");
    let patterns = secret_patterns(&key);
    {
        // Import it as an exportable RSA-HSM key with the demo policy.
        let vault = emu.var("SKR_EMULATOR_VAULT_URL").to_string();
        let (st, tls) = emu.akv(reqwest::Method::GET, &vault, "/keys/tls-rsa", None);
        assert_eq!(st, 200, "{tls}");
        let n = |b: &rsa::BigUint| b64url(&b.to_bytes_be());
        let p = key.primes();
        let jwk = serde_json::json!({
            "kty": "RSA-HSM", "n": n(rsa::traits::PublicKeyParts::n(&key)), "e": n(rsa::traits::PublicKeyParts::e(&key)),
            "d": n(key.d()), "p": n(&p[0]), "q": n(&p[1]),
            "dp": n(key.dp().unwrap()), "dq": n(key.dq().unwrap()),
            "qi": b64url(&key.qinv().unwrap().to_biguint().unwrap().to_bytes_be()),
            "key_ops": ["sign", "verify", "encrypt", "decrypt"],
        });
        let body = serde_json::json!({"key": jwk, "hsm": true, "attributes": {"exportable": true},
            "release_policy": {"contentType": tls["release_policy"]["contentType"], "data": tls["release_policy"]["data"]}});
        let (st, v) = emu.akv(reqwest::Method::PUT, &vault, "/keys/mem-rsa", Some(body));
        assert_eq!(st, 200, "import: {v}");
        let _ = key.to_pkcs8_der(); // the key is only used for patterns from here on
    }
    let cfg = emu.config_variant("memory.toml", |t| {
        t.replacen("[[token]]\nlabel = \"skr-denied\"", &format!(
            "[[token.key]]\nlabel = \"mem-rsa\"\nid = \"0e\"\nkid = \"{}/keys/mem-rsa\"\n\n[[token]]\nlabel = \"skr-denied\"",
            emu.var("SKR_EMULATOR_VAULT_URL")), 1)
    });
    let holder = common::artifact("examples/hold_logged_in");
    assert!(
        holder.exists(),
        "{} missing: cargo build --workspace --all-targets",
        holder.display()
    );
    let mut child = Command::new(&holder)
        .args([
            common::module_path().to_str().unwrap(),
            "skr-demo",
            "mem-rsa",
        ])
        .env("SKR_PKCS11_CONFIG", &cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start holder");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "holder did not log in");

    assert!(
        live_memory_contains(pid, &patterns),
        "positive control: the logged-in process holds the key"
    );

    let core_base = emu.path().join("holder-core");
    // gcore's own steps (gdb attach + `gcore`), without reading symbol files: the debug
    // module's symbols would make gdb take minutes and add nothing to the dump.
    let g = Command::new("gdb")
        .args([
            "--batch",
            "-nx",
            "--readnever",
            "-p",
            &pid.to_string(),
            "-ex",
        ])
        .arg(format!("gcore {}.{pid}", core_base.display()))
        .output()
        .expect("gdb (apt: gdb)");
    assert!(
        g.status.success(),
        "gdb gcore failed: {}",
        String::from_utf8_lossy(&g.stderr)
    );
    let core_path = core_base.with_extension(pid.to_string());
    let core = std::fs::read(&core_path).expect("core file");
    assert!(core.len() > 1 << 20, "a real core dump");
    assert!(
        !contains_any(&core, &patterns),
        "a secret of the released key is in the core dump"
    );
    std::fs::remove_file(Path::new(&core_path)).ok();

    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "logout").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "logged-out");
    assert!(
        !live_memory_contains(pid, &patterns),
        "a secret of the released key survives C_Logout"
    );
    writeln!(stdin, "exit").unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_zero_memlock_limit_warns_but_login_and_signing_still_work() {
    let emu = Emulator::shared();
    let holder = common::artifact("examples/hold_logged_in");
    // util-linux: RLIMIT_MEMLOCK = 0 (as a container might set it), and no CAP_IPC_LOCK
    // (which lets root lock memory whatever the limit) for the holder.
    let mut child = Command::new("prlimit")
        .args([
            "--memlock=0:0",
            "--",
            "setpriv",
            "--bounding-set=-ipc_lock",
            "--",
        ])
        .arg(&holder)
        .args([
            common::module_path().to_str().unwrap(),
            "skr-demo",
            "tls-rsa",
        ])
        .env("SKR_PKCS11_CONFIG", emu.config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit (util-linux)");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    writeln!(child.stdin.take().unwrap(), "exit").unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "login and signing must work without mlock; stderr:\n{err}"
    );
    assert!(status.success(), "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains("mlock") && l.contains("RLIMIT_MEMLOCK")),
        "one warning naming mlock and the limit to raise:\n{err}"
    );
}
