//! OpenSSL 3 with the libp11 engine (pkeyutl by RFC 7512 URI, req -x509) and nginx with two
//! workers serving TLS 1.2 / 1.3 with token keys; one release per key for the process tree.
//! Driven by tests/clients/openssl_nginx.sh with the configs in examples/.

mod common;

#[test]
fn openssl_engine_and_nginx_workers_use_token_keys_released_once() {
    let emu = common::Emulator::shared();
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::workspace_root().join("tests/clients/openssl_nginx.sh"))
        .arg(common::module_path())
        .arg(work.path())
        .envs(&emu.env)
        .env("SKR_EMU_DIR", emu.path())
        .output()
        .expect("run openssl_nginx.sh (needs bash, openssl, libengine-pkcs11-openssl, nginx, curl, python3)");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "openssl_nginx.sh failed\n--- stdout\n{o}\n--- stderr\n{e}"
    );
    assert!(o.contains("openssl engine: all checks passed"));
    assert!(o.contains("nginx: all checks passed"));
}
