//! `skr-pkcs11 evidence show` on the published Azure CVM artifacts.

use serde_json::Value;
use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skr-pkcs11"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn show(file: &str) -> Value {
    let (code, out, err) = run(&["evidence", "show", file]);
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn evidence_show_hcl_reports_snp_reports_and_td_quotes() {
    let snp = show("testdata/azure-cvm/hcl/trustee-snp-v1-2600.bin");
    assert_eq!(snp["kind"], "hcl-report");
    assert_eq!(snp["version"], 1);
    assert_eq!(snp["report_type"], 2);
    assert_eq!(snp["binding_ok"], true);
    let kids: Vec<&str> = snp["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, ["HCLAkPub", "HCLEkPub"]);
    let user_data = snp["user_data"].as_str().unwrap();
    assert_eq!(user_data.len(), 128);
    assert_eq!(user_data, user_data.to_uppercase());
    assert_eq!(snp["hardware_report"]["kind"], "snp-report");
    assert_eq!(
        snp["measurement"].as_str().unwrap().len(),
        96,
        "48-byte MEASUREMENT"
    );
    // report_data is SHA-256(claims) followed by zeros.
    let rd = snp["report_data"].as_str().unwrap();
    assert_eq!(&rd[..64], snp["claims_sha256"].as_str().unwrap());
    assert_eq!(&rd[64..], "0".repeat(64));

    let tdx = show("testdata/azure-cvm/hcl/trustee-tdx-v2-2600.bin");
    assert_eq!(
        (tdx["version"].as_u64(), tdx["report_type"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(tdx["binding_ok"], true);
    let quote = show("testdata/azure-cvm/tdx/trustee-td-quote-v4.bin");
    assert_eq!(quote["kind"], "td-quote");
    assert_eq!(quote["report_data"], tdx["report_data"]);
    assert_eq!(quote["rtmrs"], tdx["hardware_report"]["rtmrs"]);

    let raw = show("testdata/snp/trustee-milan-v2-report.bin");
    assert_eq!(raw["kind"], "snp-report");
    assert_eq!(raw["policy"], "0x3001f");
}

#[test]
fn evidence_show_refuses_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"not evidence").unwrap();
    let (code, out, err) = run(&["evidence", "show", junk.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("not a recognised evidence file"), "{err}");

    // A truncated HCL report names the rule it breaks.
    let hcl = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../testdata/azure-cvm/hcl/kinvolk-snp-v1-2048.bin"
    ))
    .unwrap();
    let cut = dir.path().join("cut.bin");
    std::fs::write(&cut, &hcl[..1500]).unwrap();
    let (code, _, err) = run(&["evidence", "show", cut.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("claims_size"), "{err}");

    let (code, _, err) = run(&["evidence", "show", "/nonexistent/file"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/file"), "{err}");
}

#[test]
fn evidence_show_a_trustee_az_snp_vtpm_bundle() {
    let b = show("testdata/kbs/az-snp-vtpm-evidence-v2.json");
    assert_eq!(b["kind"], "az-snp-vtpm-evidence");
    assert_eq!(b["hcl_report"]["binding_ok"], true);
    for check in [
        "report_signature_ok",
        "quote_signature_ok",
        "pcr_digest_ok",
        "nonce_in_user_data",
    ] {
        assert_eq!(b[check], true, "{check}");
    }
}
