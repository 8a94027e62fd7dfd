//! Java 17 SunPKCS11 (KeyStore, SHA256withRSA, RSASSA-PSS, SHA256withECDSA, RSA/ECB/PKCS1Padding,
//! a JSSE TLS 1.2/1.3 server checked with openssl s_client) and p11-kit / GnuTLS p11tool.

mod common;

fn run(script: &str, marker: &str) {
    let emu = common::Emulator::shared();
    let work = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::workspace_root().join("tests/clients").join(script))
        .arg(common::module_path())
        .arg(work.path())
        .envs(&emu.env)
        .env("SKR_EMU_DIR", emu.path())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{script} failed\n--- stdout\n{o}\n--- stderr\n{e}"
    );
    assert!(o.contains(marker), "{script}: no '{marker}' in\n{o}");
}

#[test]
fn java_sunpkcs11_keystore_signatures_decrypt_and_jsse_tls() {
    run("java.sh", "java: all checks passed");
}

/// SunPKCS11 imports a SecretKeySpec as a session object (C_CreateObject) and generates session
/// keys (C_GenerateKey); AES/GCM on them matches SunJCE both ways.
#[test]
fn java_sunpkcs11_aes_gcm_with_session_keys_matches_sunjce() {
    run(
        "java_session_keys.sh",
        "java session keys: all checks passed",
    );
}

/// A data key wrapped by SunJCE to tls-rsa's certificate is unwrapped on the token
/// (C_UnwrapKey with CKM_RSA_PKCS) into a sensitive session key that SunPKCS11 uses for AES/GCM.
#[test]
fn java_sunpkcs11_unwraps_a_data_key_on_the_token_for_aes_gcm() {
    run("java_unwrap.sh", "java unwrap: all checks passed");
}

#[test]
fn p11kit_lists_the_module_and_gnutls_signs() {
    run("p11kit.sh", "p11-kit: all checks passed");
}
