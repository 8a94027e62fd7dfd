//! `skr-pkcs11 evidence show`: what an evidence file holds, as JSON. Pure over the file's
//! bytes (a fuzz target can call `describe`); the CLI only reads the file and prints.

use super::hcl::{user_data_hex, HardwareReport, HclReport, USER_DATA_LEN};
use super::snp::SnpReport;
use super::tdx::{TdQuote, TdReport};
use super::tpm_attest::{Attested, TpmsAttest, TPM_GENERATED};
use super::REPORT_LEN;
use crate::crypto::HashAlg;
use crate::error::{Error, Result, Step};
use serde_json::{json, Value};

/// Describe an HCL report, a raw SNP report (binary or hex text), a TD quote, or a TPMS_ATTEST.
pub fn describe(bytes: &[u8]) -> Result<Value> {
    if bytes.starts_with(super::hcl::MAGIC) {
        return Ok(hcl_json(&HclReport::parse(bytes)?));
    }
    if bytes.starts_with(&TPM_GENERATED.to_be_bytes()) {
        return Ok(tpms_attest_json(&TpmsAttest::parse(bytes)?));
    }
    if bytes.len() >= 8 && bytes[..2] == [4, 0] && bytes[4..8] == [0x81, 0, 0, 0] {
        return Ok(td_quote_json(&TdQuote::parse(bytes)?));
    }
    if bytes.len() == REPORT_LEN {
        return Ok(snp_json(&SnpReport::parse(bytes)?));
    }
    if let Some(raw) = hex_text(bytes) {
        if raw.len() == REPORT_LEN {
            return Ok(snp_json(&SnpReport::parse(&raw)?));
        }
    }
    Err(Error::evidence(
        Step::Evidence,
        format!("not a recognised evidence file ({} bytes)", bytes.len()),
    )
    .with_hint("evidence show reads an Azure HCL report (NV 0x01400001, starts with \"HCLA\"), a raw 1184-byte SNP report (binary or hex), a DCAP v4 TD quote, or a TPMS_ATTEST"))
}

/// Hex text (whitespace ignored), as some SNP samples are stored.
fn hex_text(bytes: &[u8]) -> Option<Vec<u8>> {
    let clean: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    hex::decode(clean).ok()
}

fn signing_key_name(code: u32) -> &'static str {
    match code {
        0 => "vcek",
        1 => "vlek",
        7 => "none",
        _ => "reserved",
    }
}

pub fn snp_json(r: &SnpReport<'_>) -> Value {
    json!({
        "kind": "snp-report",
        "version": r.version(),
        "guest_svn": r.guest_svn(),
        "policy": format!("0x{:x}", r.policy()),
        "vmpl": r.vmpl(),
        "signature_algo": r.signature_algo(),
        "signing_key": signing_key_name(r.signing_key()),
        "platform_info": format!("0x{:x}", r.platform_info()),
        "measurement": hex::encode(r.measurement()),
        "report_data": hex::encode(r.report_data()),
        "host_data": hex::encode(r.host_data()),
        "reported_tcb": format!("{:016x}", r.reported_tcb()),
        "chip_id": hex::encode(r.chip_id()),
    })
}

fn rtmrs(get: impl Fn(usize) -> String) -> Value {
    Value::Array((0..4).map(|i| Value::String(get(i))).collect())
}

fn td_report_json(r: &TdReport<'_>) -> Value {
    json!({
        "kind": "tdreport",
        "report_data": hex::encode(r.report_data()),
        "mrtd": hex::encode(r.mrtd()),
        "rtmrs": rtmrs(|i| hex::encode(r.rtmr(i))),
    })
}

pub fn td_quote_json(q: &TdQuote<'_>) -> Value {
    json!({
        "kind": "td-quote",
        "version": q.version(),
        "attestation_key_type": q.attestation_key_type(),
        "tee_type": format!("0x{:x}", q.tee_type()),
        "report_data": hex::encode(q.report_data()),
        "mrtd": hex::encode(q.mrtd()),
        "rtmrs": rtmrs(|i| hex::encode(q.rtmr(i))),
        "signature_data_len": q.signature_data_len(),
    })
}

pub fn hcl_json(h: &HclReport<'_>) -> Value {
    let keys: Vec<Value> = h
        .claims
        .keys
        .iter()
        .map(|k| json!({ "kid": k.kid, "kty": k.kty, "key_ops": k.key_ops }))
        .collect();
    let hardware = match &h.hardware {
        HardwareReport::Snp(r) => snp_json(r),
        HardwareReport::Tdx(r) => td_report_json(r),
    };
    json!({
        "kind": "hcl-report",
        "version": h.version,
        "report_size": h.report_size,
        "request_type": h.request_type,
        "status": h.status,
        "report_type": h.report_type.code(),
        "tee": h.report_type.name(),
        "hash_type": "sha256",
        "user_data": h.claims.user_data.as_ref().map(|u: &[u8; USER_DATA_LEN]| user_data_hex(u)),
        "keys": keys,
        "vm_configuration": h.claims.vm_configuration,
        "claims_sha256": hex::encode(HashAlg::Sha256.digest(h.claims_json)),
        "hardware_report": hardware,
        "measurement": hex::encode(h.hardware.measurement()),
        "report_data": hex::encode(h.hardware.report_data()),
        "binding_ok": h.binding_ok(),
    })
}

pub fn tpms_attest_json(a: &TpmsAttest) -> Value {
    let mut v = json!({
        "kind": "tpms-attest",
        "qualified_signer": hex::encode(&a.qualified_signer),
        "extra_data": hex::encode(&a.extra_data),
        "clock": a.clock,
        "reset_count": a.reset_count,
        "restart_count": a.restart_count,
        "safe": a.safe,
        "firmware_version": format!("0x{:016x}", a.firmware_version),
    });
    match &a.attested {
        Attested::Quote {
            pcr_select,
            pcr_digest,
        } => {
            v["type"] = json!("quote");
            v["pcr_select"] = Value::Array(
                pcr_select
                    .iter()
                    .map(|s| json!({ "hash_alg": format!("0x{:04x}", s.hash_alg), "pcrs": s.indices() }))
                    .collect(),
            );
            v["pcr_digest"] = json!(hex::encode(pcr_digest));
        }
        Attested::Certify {
            name,
            qualified_name,
        } => {
            v["type"] = json!("certify");
            v["name"] = json!(hex::encode(name));
            v["qualified_name"] = json!(hex::encode(qualified_name));
        }
    }
    v
}
