//! The example programs stay working: the narrated demo (examples/demo.rs, what
//! scripts/demo.sh runs) against the emulator, and the pkcs11-provider PEM URI file maker.

mod common;

use std::process::Command;

#[test]
fn demo_example_runs_every_step_against_the_emulator() {
    let emu = common::Emulator::shared();
    let demo = common::artifact("examples/demo");
    assert!(
        demo.exists(),
        "{} missing: cargo build --workspace --all-targets",
        demo.display()
    );
    let out = Command::new(demo)
        .arg(common::module_path())
        .arg(emu.path())
        .envs(&emu.env)
        .output()
        .expect("run demo");
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{o}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "signature (256 bytes) verifies",
        "RSA-PSS (SHA-256, salt 32) signature verifies",
        "decrypted: \"a wrapped data key\"",
        "ECDSA-SHA256 signature (r||s, 64 bytes) verifies",
        "decrypted back to \"customer record #42\"",
        "C_Login refused",
        "private keys visible after logout: 0",
        "Demo complete.",
    ] {
        assert!(o.contains(expected), "demo output lacks {expected:?}:\n{o}");
    }
}

/// The envelope-encryption walk-through: a file encrypted outside the TEE under a data key
/// wrapped to tls-rsa's public key is opened inside by C_UnwrapKey + C_Decrypt, and neither
/// the data key nor the released key can be wrapped back out.
#[test]
fn envelope_example_unwraps_on_the_token_and_decrypts() {
    let emu = common::Emulator::shared();
    let out = Command::new(common::artifact("examples/envelope"))
        .arg(common::module_path())
        .arg(emu.path())
        .envs(&emu.env)
        .output()
        .expect("run envelope");
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "envelope failed:\n{o}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "decrypted inside the TEE: \"quarterly numbers: confidential\"",
        "Sensitive(true)",
        "Extractable(false)",
        "C_WrapKey(data key): KeyUnextractable",
        "C_WrapKey(tls-rsa): KeyUnextractable",
        "Envelope complete.",
    ] {
        assert!(
            o.contains(expected),
            "envelope output lacks {expected:?}:\n{o}"
        );
    }
}

#[test]
fn pkcs11_provider_uri_pem_has_the_documented_asn1_shape() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("key.pem");
    let uri = "pkcs11:token=skr-demo;object=tls-rsa;type=private";
    let out = Command::new("bash")
        .arg(common::workspace_root().join("examples/pkcs11-provider/make-uri-pem.sh"))
        .arg(uri)
        .arg(&pem)
        .output()
        .expect("run make-uri-pem.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&pem).unwrap();
    assert!(text.starts_with("-----BEGIN PKCS#11 PROVIDER URI-----\n"));
    let parsed = Command::new("openssl")
        .args(["asn1parse", "-inform", "PEM", "-in"])
        .arg(&pem)
        .output()
        .expect("openssl asn1parse");
    let p = String::from_utf8_lossy(&parsed.stdout);
    // SEQUENCE { VisibleString "PKCS#11 Provider URI v1.0", UTF8String <uri> }
    let lines: Vec<&str> = p.lines().collect();
    assert_eq!(lines.len(), 3, "{p}");
    assert!(lines[0].contains("cons: SEQUENCE"), "{p}");
    assert!(
        lines[1].contains("VISIBLESTRING") && lines[1].ends_with(":PKCS#11 Provider URI v1.0"),
        "{p}"
    );
    assert!(
        lines[2].contains("UTF8STRING") && lines[2].ends_with(&format!(":{uri}")),
        "{p}"
    );
}
