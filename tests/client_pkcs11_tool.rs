//! OpenSC pkcs11-tool drives the module (tests/clients/pkcs11_tool.sh); every signature and
//! decryption is checked with OpenSSL against the key's certificate.

mod common;

#[test]
fn pkcs11_tool_lists_signs_with_every_mechanism_decrypts_and_forks() {
    let emu = common::Emulator::shared();
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::workspace_root().join("tests/clients/pkcs11_tool.sh"))
        .arg(common::module_path())
        .arg(work.path())
        .envs(&emu.env)
        .env("SKR_EMU_DIR", emu.path())
        .output()
        .expect("run pkcs11_tool.sh (needs bash, opensc, openssl)");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "pkcs11_tool.sh failed\n--- stdout\n{o}\n--- stderr\n{e}"
    );
    assert!(o.contains("pkcs11-tool: all checks passed"));
}
