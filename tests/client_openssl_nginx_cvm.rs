//! OpenSSL 3 (libp11 engine) and nginx (master + 2 workers, TLS 1.2 / 1.3) with keys released
//! on a simulated Azure SEV-SNP confidential VM (`skr-emulator up --platform cvm-snp`: vTPM
//! transfer key, MAA AzureGuest); one release per key for the process tree. The same script
//! as `client_openssl_nginx`, pointed at the CVM demo keys.
#![cfg(feature = "cvm")]

mod common;

#[test]
fn openssl_engine_and_nginx_workers_use_keys_released_on_a_cvm_once() {
    let emu = common::Emulator::shared_cvm("cvm-snp");
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::workspace_root().join("tests/clients/openssl_nginx.sh"))
        .arg(common::module_path())
        .arg(work.path())
        .envs(&emu.env)
        .env("SKR_EMU_DIR", emu.path())
        .env("SKR_KEY_PREFIX", "cvm-snp-")
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
