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

/// What `describe` reads, for the hint of an unrecognised file.
const KINDS: &str = "evidence show reads an Azure HCL report (NV 0x01400001, starts with \"HCLA\"), a raw 1184-byte SNP report (binary or hex), a DCAP v4 TD quote, a TPMS_ATTEST, or a Trustee az-snp-vtpm evidence bundle (JSON)";

/// Describe an HCL report, a raw SNP report (binary or hex text), a TD quote, a TPMS_ATTEST,
/// or a Trustee `az-snp-vtpm` evidence bundle.
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
    if bytes.trim_ascii_start().starts_with(b"{") {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            if v.get("tpm_quote").is_some() || v.get("quote").is_some() {
                return az_snp_vtpm_json(&v);
            }
        }
    }
    Err(Error::evidence(
        Step::Evidence,
        format!("not a recognised evidence file ({} bytes)", bytes.len()),
    )
    .with_hint(KINDS))
}

fn bundle_error(what: impl Into<String>) -> Error {
    Error::evidence(
        Step::Evidence,
        format!("az-snp-vtpm evidence bundle: {}", what.into()),
    )
    .with_hint(KINDS)
}

/// Bytes given as hex text (version 2 bundles) or as a JSON array of numbers (older ones).
fn bundle_bytes(v: &Value, field: &str) -> Result<Vec<u8>> {
    match v {
        Value::String(s) => hex::decode(s).map_err(|_| bundle_error(format!("{field} is not hex"))),
        Value::Array(a) => a
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| bundle_error(format!("{field} is not an array of bytes"))),
        _ => Err(bundle_error(format!("{field} is missing"))),
    }
}

/// A Trustee (CoCo KBS) `az-snp-vtpm` evidence bundle: version 2 is `{version, tpm_quote
/// {signature, message, pcrs} (hex), hcl_report (base64url), vcek (base64url DER)}`, the older
/// form `{quote {…} (byte arrays), report (byte array), vcek (PEM)}`. Each part is described as
/// its own file would be; the checks a verifier makes are reported, not enforced: the hardware
/// report's signature by the VCEK, the quote's by HCLAkPub, the PCR digest, the quote nonce as
/// the start of the HCL user-data.
fn az_snp_vtpm_json(v: &Value) -> Result<Value> {
    let quote = v
        .get("tpm_quote")
        .or_else(|| v.get("quote"))
        .unwrap_or(&Value::Null);
    let signature = bundle_bytes(&quote["signature"], "quote signature")?;
    let message = bundle_bytes(&quote["message"], "quote message")?;
    let pcrs = quote["pcrs"]
        .as_array()
        .ok_or_else(|| bundle_error("quote pcrs is missing"))?
        .iter()
        .map(|p| {
            bundle_bytes(p, "a PCR value")?
                .try_into()
                .map_err(|_| bundle_error("a PCR value is not 32 bytes"))
        })
        .collect::<Result<Vec<[u8; 32]>>>()?;
    let hcl_bytes = match (v.get("hcl_report"), v.get("report")) {
        (Some(Value::String(s)), _) => crate::release::b64url_decode(s)
            .ok_or_else(|| bundle_error("hcl_report is not base64url"))?,
        (_, Some(r)) => bundle_bytes(r, "report")?,
        _ => return Err(bundle_error("hcl_report is missing")),
    };
    let vcek = match &v["vcek"] {
        Value::String(s) if s.contains("-----BEGIN") => crate::pem::certificates(s.as_bytes())
            .map_err(|e| bundle_error(format!("vcek: {e}")))?
            .into_iter()
            .next()
            .map(|c| c.to_vec()),
        Value::String(s) => Some(
            crate::release::b64url_decode(s)
                .ok_or_else(|| bundle_error("vcek is not base64url"))?,
        ),
        _ => None,
    };
    let hcl = HclReport::parse(&hcl_bytes)?;
    let attest = TpmsAttest::parse(&message)?;
    let report_signature_ok = match (&hcl.hardware, &vcek) {
        (HardwareReport::Snp(r), Some(der)) => Some(r.verify_signature(der).is_ok()),
        _ => None,
    };
    let quote_signature_ok =
        hcl.claims
            .key("HCLAkPub")
            .and_then(|k| k.rsa.as_ref())
            .map(|(n, e)| {
                crate::crypto::evidence_sig::verify_rsa_pkcs1_sha256(n, e, &message, &signature)
                    .is_ok()
            });
    let nonce_in_user_data = hcl
        .claims
        .user_data
        .as_ref()
        .map(|u| !attest.extra_data.is_empty() && u.starts_with(&attest.extra_data));
    Ok(json!({
        "kind": "az-snp-vtpm-evidence",
        "version": v.get("version").cloned().unwrap_or(json!(1)),
        "hcl_report": hcl_json(&hcl),
        "tpm_quote": tpms_attest_json(&attest),
        "pcr_count": pcrs.len(),
        "vcek_der_len": vcek.as_ref().map(Vec::len),
        "report_signature_ok": report_signature_ok,
        "quote_signature_ok": quote_signature_ok,
        "pcr_digest_ok": attest.check_pcr_digest(&pcrs).is_ok(),
        "nonce_in_user_data": nonce_in_user_data,
    }))
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
