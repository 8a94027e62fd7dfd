//! A simulated Intel TDX guest of an Azure TDX confidential VM: the TDREPORT the paravisor puts
//! in the HCL report (report_type 4), the TD quote IMDS `/acc/tdquote` makes of it, and the
//! quote's check by the emulator's MAA (platform-evidence §6.5, §8; skr-protocol §9.5).
//!
//! Simplified where the real chain is Intel's: the TDREPORT's MAC is a keyed SHA-256 of the
//! emulator's (the TDX module's HMAC key is CPU-internal), and the quote's ECDSA P-256 signature
//! is by a simulated quoting enclave key that the emulator's MAA trusts directly (no PCK
//! certificate chain, QE report or TCB info collateral). Layouts are the real ones, so the
//! module's TDREPORT / TD quote parsers read them as they read Azure's.

use crate::snp::{fixed_hex, PlatformConfig};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub const TDREPORT_LEN: usize = 1024;
const REPORTDATA: usize = 128;
const MAC: usize = 224;
const TEE_TCB_SVN: usize = 256 + 8;
const MRSEAM: usize = 256 + 24;
const MRSIGNERSEAM: usize = 256 + 72;
const SEAM_ATTRIBUTES: usize = 256 + 120;
const TD_ATTRIBUTES: usize = 512;
const XFAM: usize = 520;
const MRTD: usize = 528;
const QUOTE_HEADER_LEN: usize = 48;
const TD_BODY_LEN: usize = 584;
/// TD attributes bit 0: the TD is debuggable.
const TD_ATTRIBUTES_DEBUG: u64 = 1;

/// The per-start secrets of the simulated TDX platform.
pub struct TdxKeys {
    pub mac_key: [u8; 32],
    pub quoting_key: p256::ecdsa::SigningKey,
}

impl TdxKeys {
    pub fn generate() -> TdxKeys {
        TdxKeys {
            mac_key: crate::util::random_bytes(),
            quoting_key: p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng),
        }
    }
}

fn mac(report: &[u8], key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key);
    h.update(&report[..MAC]);
    h.update(&report[MAC + 32..TDREPORT_LEN]);
    h.finalize().into()
}

/// The TDREPORT of the simulated TD: MRTD is the platform's launch measurement; TD attributes
/// carry the platform's debug policy bit (SNP POLICY bit 19).
pub fn build_tdreport(
    platform: &PlatformConfig,
    report_data: &[u8; 64],
    keys: &TdxKeys,
) -> Result<Vec<u8>, String> {
    let mut r = vec![0u8; TDREPORT_LEN];
    r[0] = 0x81; // REPORTTYPE: TDX
    r[REPORTDATA..REPORTDATA + 64].copy_from_slice(report_data);
    r[TEE_TCB_SVN..TEE_TCB_SVN + 16]
        .copy_from_slice(&[3, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    r[MRSEAM..MRSEAM + 48]
        .copy_from_slice(&sha2::Sha384::digest(b"skr-emulator simulated TDX module"));
    let debug = platform.policy & (1 << 19) != 0;
    r[TD_ATTRIBUTES..TD_ATTRIBUTES + 8]
        .copy_from_slice(&(if debug { TD_ATTRIBUTES_DEBUG } else { 0 }).to_le_bytes());
    r[XFAM..XFAM + 8].copy_from_slice(&[0xe7, 0x18, 0x06, 0, 0, 0, 0, 0]);
    r[MRTD..MRTD + 48].copy_from_slice(&fixed_hex::<48>("measurement", &platform.measurement)?);
    let m = mac(&r, &keys.mac_key);
    r[MAC..MAC + 32].copy_from_slice(&m);
    Ok(r)
}

/// Whether this TDREPORT was made by this emulator's TDX platform (its MAC).
pub fn tdreport_is_ours(report: &[u8], keys: &TdxKeys) -> bool {
    report.len() == TDREPORT_LEN
        && report[0] == 0x81
        && report[MAC..MAC + 32] == mac(report, &keys.mac_key)
}

/// A DCAP v4 TD quote of `report` (header, TD report body, signature data = ECDSA P-256
/// signature ‖ attestation public key).
pub fn quote(report: &[u8], keys: &TdxKeys) -> Vec<u8> {
    use p256::ecdsa::signature::Signer;
    let mut q = Vec::with_capacity(QUOTE_HEADER_LEN + TD_BODY_LEN + 4 + 128);
    q.extend_from_slice(&4u16.to_le_bytes()); // version
    q.extend_from_slice(&2u16.to_le_bytes()); // ECDSA-256-with-P-256
    q.extend_from_slice(&0x81u32.to_le_bytes()); // TDX
    q.extend_from_slice(&[0; 4]);
    q.extend_from_slice(&[
        0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06,
        0x07,
    ]); // Intel QE vendor id
    q.extend_from_slice(&[0; 20]);
    // TD report body from the TDREPORT's TEE_TCB_INFO and TDINFO.
    q.extend_from_slice(&report[TEE_TCB_SVN..TEE_TCB_SVN + 16]);
    q.extend_from_slice(&report[MRSEAM..MRSEAM + 48]);
    q.extend_from_slice(&report[MRSIGNERSEAM..MRSIGNERSEAM + 48]);
    q.extend_from_slice(&report[SEAM_ATTRIBUTES..SEAM_ATTRIBUTES + 8]);
    q.extend_from_slice(&report[TD_ATTRIBUTES..TD_ATTRIBUTES + 16]); // attributes, xfam
    q.extend_from_slice(&report[MRTD..MRTD + 48 * 8]); // mrtd .. rtmr3
    q.extend_from_slice(&report[REPORTDATA..REPORTDATA + 64]);
    let sig: p256::ecdsa::Signature = keys.quoting_key.sign(&q);
    let point = keys.quoting_key.verifying_key().to_encoded_point(false);
    q.extend_from_slice(&128u32.to_le_bytes());
    q.extend_from_slice(&sig.to_bytes());
    q.extend_from_slice(&point.as_bytes()[1..]);
    q
}

/// The TD report body of a quote signed by the trusted quoting key.
pub fn verify_quote<'a>(
    quote: &'a [u8],
    trusted: &p256::ecdsa::VerifyingKey,
) -> Result<&'a [u8], String> {
    use p256::ecdsa::signature::Verifier;
    let signed = QUOTE_HEADER_LEN + TD_BODY_LEN;
    if quote.len() < signed + 4 + 128 {
        return Err(format!("TD quote of {} bytes is too short", quote.len()));
    }
    if quote[0..2] != [4, 0] || quote[4..8] != [0x81, 0, 0, 0] {
        return Err("not a version-4 TDX quote".into());
    }
    let sig_len = u32::from_le_bytes([
        quote[signed],
        quote[signed + 1],
        quote[signed + 2],
        quote[signed + 3],
    ]) as usize;
    if sig_len != 128 || quote.len() != signed + 4 + 128 {
        return Err("TD quote signature data is not the simulated quoting enclave's".into());
    }
    let sig = p256::ecdsa::Signature::from_slice(&quote[signed + 4..signed + 68])
        .map_err(|_| "TD quote signature is malformed".to_string())?;
    let mut point = vec![4u8];
    point.extend_from_slice(&quote[signed + 68..]);
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
        .map_err(|_| "TD quote attestation key is not a P-256 point".to_string())?;
    if &key != trusted {
        return Err("TD quote is not signed by a trusted quoting enclave".into());
    }
    key.verify(&quote[..signed], &sig)
        .map_err(|_| "TD quote signature does not verify".to_string())?;
    Ok(&quote[QUOTE_HEADER_LEN..signed])
}

/// The `TdxVm` claims MAA derives from a TD report body (skr-protocol §9.5).
pub fn tdx_claims(body: &[u8]) -> Map<String, Value> {
    let hex_at = |off: usize, len: usize| json!(hex::encode(&body[off..off + len]));
    let td_attributes = u64::from_le_bytes(body[120..128].try_into().unwrap_or([0; 8]));
    let debug = td_attributes & TD_ATTRIBUTES_DEBUG != 0;
    let mut c = Map::new();
    c.insert("attester_tcb_status".into(), json!("UpToDate"));
    c.insert(
        "dbgstat".into(),
        json!(if debug { "enabled" } else { "disabled" }),
    );
    c.insert(
        "eat_profile".into(),
        json!("https://aka.ms/maa-eat-profile-tdxvm"),
    );
    c.insert("intuse".into(), json!("generic"));
    c.insert("tdx_tee_tcb_svn".into(), hex_at(0, 16));
    c.insert("tdx_mrseam".into(), hex_at(16, 48));
    c.insert("tdx_mrsignerseam".into(), hex_at(64, 48));
    c.insert("tdx_seam_attributes".into(), hex_at(112, 8));
    c.insert("tdx_td_attributes".into(), hex_at(120, 8));
    c.insert("tdx_xfam".into(), hex_at(128, 8));
    c.insert("tdx_mrtd".into(), hex_at(136, 48));
    c.insert("tdx_mrconfigid".into(), hex_at(184, 48));
    c.insert("tdx_mrowner".into(), hex_at(232, 48));
    c.insert("tdx_mrownerconfig".into(), hex_at(280, 48));
    for i in 0..4 {
        c.insert(format!("tdx_rtmr{i}"), hex_at(328 + 48 * i, 48));
    }
    c.insert("tdx_report_data".into(), hex_at(520, 64));
    c.insert("tdx_seamsvn".into(), json!(body[0]));
    c.insert("tdx_td_attributes_debug".into(), json!(debug));
    for (name, bit) in [
        ("key_locker", 31),
        ("perfmon", 63),
        ("protection_keys", 30),
        ("septve_disable", 28),
    ] {
        c.insert(
            format!("tdx_td_attributes_{name}"),
            json!(td_attributes & (1u64 << bit) != 0),
        );
    }
    c.insert("x-ms-attestation-type".into(), json!("tdxvm"));
    c.insert(
        "x-ms-compliance-status".into(),
        json!(if debug {
            "azure-non-compliant-cvm"
        } else {
            "azure-compliant-cvm"
        }),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_carry_the_tdreport_and_verify_only_with_the_trusted_key() {
        let keys = TdxKeys::generate();
        let platform = PlatformConfig::generate();
        let rd = [0x42u8; 64];
        let report = build_tdreport(&platform, &rd, &keys).unwrap();
        assert!(tdreport_is_ours(&report, &keys));
        let mut forged = report.clone();
        forged[REPORTDATA] ^= 1;
        assert!(!tdreport_is_ours(&forged, &keys));
        assert!(!tdreport_is_ours(&report, &TdxKeys::generate()));
        let q = quote(&report, &keys);
        let body = verify_quote(&q, keys.quoting_key.verifying_key()).unwrap();
        assert_eq!(&body[520..584], &rd[..]);
        assert_eq!(&body[136..184], &report[MRTD..MRTD + 48]);
        let c = tdx_claims(body);
        assert_eq!(c["tdx_mrtd"], platform.measurement);
        assert_eq!(c["x-ms-compliance-status"], "azure-compliant-cvm");
        assert_eq!(c["tdx_seamsvn"], 3);
        let other = TdxKeys::generate();
        assert!(verify_quote(&q, other.quoting_key.verifying_key()).is_err());
        let mut tampered = q.clone();
        tampered[QUOTE_HEADER_LEN + 520] ^= 1;
        assert!(verify_quote(&tampered, keys.quoting_key.verifying_key()).is_err());
        for cut in 0..q.len() {
            assert!(verify_quote(&q[..cut], keys.quoting_key.verifying_key()).is_err());
        }
    }
}
