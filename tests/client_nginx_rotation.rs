//! Key rotation reaching a running nginx (master + 2 workers, libp11 engine) with no failed
//! handshake: the certificate file is replaced, `nginx -s reload` is accepted and new
//! handshakes show the new certificate; one release of the rotated key for the nginx tree.
//! Driven by tests/clients/nginx_rotation.sh. Own emulator: the rotation changes tls-ec.

mod common;

#[test]
fn nginx_reload_after_a_rotation_serves_the_new_key_with_no_failed_handshake() {
    let emu = common::Emulator::start();
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    for name in ["tls-rsa.pem", "tls-ec.pem"] {
        std::fs::copy(emu.path().join("certs").join(name), certs.join(name)).unwrap();
    }
    let log = work.path().join("module.log");
    let cfg = common::config_logging_to(&emu, "rotation.toml", &log);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"certs/", &format!("\"{}/", certs.display()));
    // No periodic refresh during the test: the rotation reaches the tree through the reload.
    std::fs::write(&cfg, format!("{text}\n[release]\nrefresh = \"1h\"\n")).unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::workspace_root().join("tests/clients/nginx_rotation.sh"))
        .arg(common::module_path())
        .arg(work.path())
        .envs(&emu.env)
        .env("SKR_EMU_DIR", emu.path())
        .env("SKR_PKCS11_CONFIG", &cfg)
        .output()
        .expect("run nginx_rotation.sh (needs bash, openssl, libengine-pkcs11-openssl, nginx, curl, python3)");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let module_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "nginx_rotation.sh failed\n--- stdout\n{o}\n--- stderr\n{e}\n--- module log (last 40 lines)\n{}",
        module_log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(o.contains("nginx rotation: all checks passed"), "{o}");
    // The figures (handshakes, releases by the tree and by the short-lived process).
    println!("{o}");
}
