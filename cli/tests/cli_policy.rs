//! `skr-pkcs11 policy check` on the published policies and real claim sets.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skr-pkcs11"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn policy_check_met_not_met_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // The ACI example policy, base64url-encoded as in release_policy.data.
    let ex: serde_json::Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/policy/published-examples.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let policy = ex["docs_skr_policy_examples_aci_1"]["policy"].to_string();
    let encoded = dir.path().join("policy.b64");
    std::fs::write(&encoded, skr_pkcs11::release::b64url(policy.as_bytes())).unwrap();
    let encoded = encoded.to_str().unwrap();
    let (code, out) = run(&[
        "policy",
        "check",
        "--policy",
        encoded,
        "--claims",
        "testdata/maa/sevsnpvm-claims.docs.json",
        "--issuer",
        "https://fabrikam1.wus.attest.azure.net",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("x-ms-compliance-status equals \"azure-compliant-uvm\" not met (token has \"azure-compliant-cvm\")"), "{out}");

    // The CVM platform policy file against the CVM claim set: met (trailing-slash authority).
    let (code, out) = run(&[
        "policy",
        "check",
        "--policy",
        "testdata/policy/cvm-platform-skr-policy.json",
        "--claims",
        "testdata/maa/sevsnpvm-claims.docs.json",
        "--issuer",
        "https://sharedeus.eus.attest.azure.net",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("policy met"), "{out}");

    // Issuer taken from the claims (a real JWT): no authority for it.
    let (code, out) = run(&[
        "policy",
        "check",
        "--policy",
        "testdata/policy/cvm-platform-skr-policy.json",
        "--claims",
        "testdata/maa/sevsnpvm-token.jwt",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("https://tenanttests.us"), "{out}");

    // Malformed policy: error, exit 2.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"anyOf":[{"authority":"a","allOf":[{"claim":"c","like":1}]}]}"#,
    )
    .unwrap();
    let (code, out) = run(&[
        "policy",
        "check",
        "--policy",
        bad.to_str().unwrap(),
        "--claims",
        "testdata/maa/sevsnpvm-claims.docs.json",
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown operator"), "{out}");
}
