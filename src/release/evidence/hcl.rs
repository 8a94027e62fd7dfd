//! The Azure HCL report: the content of vTPM NV index 0x01400001 on an Azure confidential VM
//! (platform-evidence §6.3). A 32-byte header, a 1184-byte hardware-report slot (SNP report,
//! or TDREPORT plus zero padding), a 20-byte variable-data header and the runtime-claims JSON
//! whose SHA-256 is bound into the hardware report's report data.
//!
//! `HclReport::parse` is a pure function over untrusted bytes (a fuzz target calls it): every
//! length is checked before use and nothing panics.

use super::snp::SnpReport;
use super::tdx::TdReport;
use super::REPORT_LEN;
use crate::crypto::HashAlg;
use crate::error::{Error, Result, Step};
use crate::release::b64url_decode;
use serde_json::Value;

/// NV index of the HCL report, and of the 64 bytes of user-data it echoes (§6.2).
pub const NV_HCL_REPORT: u32 = 0x0140_0001;
pub const NV_USER_DATA: u32 = 0x0140_0002;

pub const MAGIC: &[u8; 4] = b"HCLA";
const HEADER_LEN: usize = 32;
const VAR_HEADER_OFFSET: usize = HEADER_LEN + REPORT_LEN; // 1216
const VAR_HEADER_LEN: usize = 20;
pub const CLAIMS_OFFSET: usize = VAR_HEADER_OFFSET + VAR_HEADER_LEN; // 1236
/// The variable-data header's own version; the only one seen and documented.
const VAR_DATA_VERSION: u32 = 1;
/// hash_type 1: the claims are bound with SHA-256 (the only value seen in practice).
const HASH_TYPE_SHA256: u32 = 1;
pub const USER_DATA_LEN: usize = 64;

pub const KID_AK: &str = "HCLAkPub";
pub const KID_EK: &str = "HCLEkPub";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardwareReportType {
    /// report_type 2: an SEV-SNP ATTESTATION_REPORT.
    Snp,
    /// report_type 4: a TDX TDREPORT.
    Tdx,
}

impl HardwareReportType {
    pub fn code(self) -> u32 {
        match self {
            HardwareReportType::Snp => 2,
            HardwareReportType::Tdx => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            HardwareReportType::Snp => "snp",
            HardwareReportType::Tdx => "tdx",
        }
    }
}

/// The hardware report inside the slot, parsed.
#[derive(Debug, Clone, Copy)]
pub enum HardwareReport<'a> {
    Snp(SnpReport<'a>),
    Tdx(TdReport<'a>),
}

impl<'a> HardwareReport<'a> {
    pub fn report_data(&self) -> &'a [u8] {
        match self {
            HardwareReport::Snp(r) => r.report_data(),
            HardwareReport::Tdx(r) => r.report_data(),
        }
    }
    /// SNP MEASUREMENT, or TDX MRTD.
    pub fn measurement(&self) -> &'a [u8] {
        match self {
            HardwareReport::Snp(r) => r.measurement(),
            HardwareReport::Tdx(r) => r.mrtd(),
        }
    }
}

/// One JWK of the claims' `keys`. RSA members decoded; others kept as the JSON had them.
#[derive(Debug, Clone)]
pub struct RuntimeKey {
    pub kid: String,
    pub kty: String,
    pub key_ops: Vec<String>,
    /// RSA modulus and exponent (big-endian), when `kty` is RSA.
    pub rsa: Option<(Vec<u8>, Vec<u8>)>,
}

/// The runtime-claims JSON, as far as the module uses it.
#[derive(Debug, Clone)]
pub struct RuntimeClaims {
    pub keys: Vec<RuntimeKey>,
    pub vm_configuration: Option<Value>,
    /// The 64 bytes of NV 0x01400002 the HCL echoed (absent in the oldest format).
    pub user_data: Option<[u8; USER_DATA_LEN]>,
}

impl RuntimeClaims {
    pub fn key(&self, kid: &str) -> Option<&RuntimeKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

#[derive(Debug, Clone)]
pub struct HclReport<'a> {
    /// Header version: 1 or 2 (same layout).
    pub version: u32,
    pub report_size: u32,
    pub request_type: u32,
    pub status: u32,
    pub report_type: HardwareReportType,
    pub hardware: HardwareReport<'a>,
    /// The runtime-claims JSON exactly as bound (hashed) into the hardware report.
    pub claims_json: &'a [u8],
    pub claims: RuntimeClaims,
}

fn bad(what: impl Into<String>) -> Error {
    Error::evidence(Step::Evidence, format!("HCL report: {}", what.into())).with_hint(
        "NV index 0x01400001 does not hold a well-formed Azure HCL report; check that this is an Azure confidential VM (SEV-SNP or TDX) and that the guest attestation stack is current",
    )
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl<'a> HclReport<'a> {
    /// Parse and check the structure (§6.3): magic, version, sizes, report and hash type, the
    /// hardware report, the claims JSON. The binding (report data = SHA-256(claims)) is a
    /// separate check, `check_binding`, so that a tool can show a report whose binding fails.
    pub fn parse(bytes: &'a [u8]) -> Result<HclReport<'a>> {
        if bytes.len() < CLAIMS_OFFSET {
            return Err(bad(format!(
                "{} bytes, shorter than the fixed part ({CLAIMS_OFFSET} bytes)",
                bytes.len()
            )));
        }
        if &bytes[..4] != MAGIC {
            return Err(bad(format!(
                "magic is {:02x?}, expected \"HCLA\"",
                &bytes[..4]
            )));
        }
        let version = u32_at(bytes, 4);
        if !matches!(version, 1 | 2) {
            return Err(bad(format!("header version {version}, expected 1 or 2")));
        }
        let report_size = u32_at(bytes, 8);
        let request_type = u32_at(bytes, 12);
        let status = u32_at(bytes, 16);

        let data_size = u32_at(bytes, VAR_HEADER_OFFSET) as usize;
        let var_version = u32_at(bytes, VAR_HEADER_OFFSET + 4);
        let report_type_code = u32_at(bytes, VAR_HEADER_OFFSET + 8);
        let hash_type = u32_at(bytes, VAR_HEADER_OFFSET + 12);
        let claims_size = u32_at(bytes, VAR_HEADER_OFFSET + 16) as usize;

        if var_version != VAR_DATA_VERSION {
            // An unknown layout version is refused rather than guessed at.
            return Err(bad(format!(
                "variable-data version {var_version}, expected {VAR_DATA_VERSION}"
            )));
        }
        let report_type = match report_type_code {
            2 => HardwareReportType::Snp,
            4 => HardwareReportType::Tdx,
            other => {
                return Err(bad(format!(
                    "report_type {other} is neither 2 (SEV-SNP) nor 4 (TDX)"
                )))
            }
        };
        match hash_type {
            HASH_TYPE_SHA256 => {}
            2 | 3 => {
                return Err(bad(format!(
                    "hash_type {hash_type} ({}) is not supported: only 1 (SHA-256) is implemented",
                    if hash_type == 2 { "SHA-384" } else { "SHA-512" }
                )))
            }
            other => {
                return Err(bad(format!(
                    "hash_type {other} is unknown (1 SHA-256, 2 SHA-384, 3 SHA-512; only 1 is implemented)"
                )))
            }
        }
        let available = bytes.len() - CLAIMS_OFFSET;
        if claims_size > available {
            return Err(bad(format!(
                "claims_size {claims_size} exceeds the {available} bytes after the fixed part"
            )));
        }
        if data_size != VAR_HEADER_LEN + claims_size {
            return Err(bad(format!(
                "data_size {data_size} is not {VAR_HEADER_LEN} + claims_size {claims_size}"
            )));
        }
        // report_size = 32 + 1184 + data_size (not what Microsoft's docs say; §6.3 verified).
        let expected_size = VAR_HEADER_OFFSET + data_size;
        if report_size as usize != expected_size {
            return Err(bad(format!(
                "report_size {report_size} is not 32 + 1184 + data_size = {expected_size}"
            )));
        }

        let slot = &bytes[HEADER_LEN..VAR_HEADER_OFFSET];
        let hardware = match report_type {
            HardwareReportType::Snp => HardwareReport::Snp(SnpReport::parse(slot)?),
            HardwareReportType::Tdx => HardwareReport::Tdx(TdReport::parse(slot)?),
        };
        // Bytes after the claims (zero padding to the 2600-byte NV area in every sample) are
        // covered by nothing and read by nothing: ignored, not required to be zero. The same
        // holds for the TDX slot's padding after the 1024-byte TDREPORT.
        let claims_json = &bytes[CLAIMS_OFFSET..CLAIMS_OFFSET + claims_size];
        let claims = parse_runtime_claims(claims_json)?;
        Ok(HclReport {
            version,
            report_size,
            request_type,
            status,
            report_type,
            hardware,
            claims_json,
            claims,
        })
    }

    /// SHA-256(claims JSON bytes) = report data [0..32], and report data [32..64] all zero.
    pub fn binding_ok(&self) -> bool {
        let digest = HashAlg::Sha256.digest(self.claims_json);
        let rd = self.hardware.report_data();
        rd[..32] == digest[..] && rd[32..].iter().all(|b| *b == 0)
    }

    pub fn check_binding(&self) -> Result<()> {
        if self.binding_ok() {
            Ok(())
        } else {
            Err(Error::integrity(
                Step::Evidence,
                format!(
                    "HCL report: the {} report data is not SHA-256 of the runtime claims followed by 32 zero bytes: the claims are not bound to the hardware report",
                    self.report_type.name()
                ),
            ))
        }
    }

    /// The claims must echo exactly the user-data written to NV 0x01400002 (§6.4).
    pub fn user_data_echoes(&self, written: &[u8; USER_DATA_LEN]) -> bool {
        self.claims.user_data.as_ref() == Some(written)
    }
}

fn parse_key(v: &Value) -> Result<RuntimeKey> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad("runtime claims: a member of keys is not a JSON object"))?;
    let text = |name: &str| obj.get(name).and_then(Value::as_str);
    let kid = text("kid")
        .ok_or_else(|| bad("runtime claims: a key has no string kid"))?
        .to_string();
    let kty = text("kty")
        .ok_or_else(|| bad(format!("runtime claims: key {kid} has no string kty")))?
        .to_string();
    let key_ops = match obj.get("key_ops") {
        None => Vec::new(),
        Some(Value::Array(ops)) => ops
            .iter()
            .map(|o| o.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                bad(format!(
                    "runtime claims: key {kid} has a non-string key_ops"
                ))
            })?,
        Some(_) => {
            return Err(bad(format!(
                "runtime claims: key {kid} key_ops is not an array"
            )))
        }
    };
    let rsa = if kty == "RSA" {
        let member = |name: &str| {
            text(name)
                .and_then(b64url_decode)
                .filter(|b| !b.is_empty())
                .ok_or_else(|| {
                    bad(format!(
                        "runtime claims: RSA key {kid} has no base64url {name}"
                    ))
                })
        };
        Some((member("n")?, member("e")?))
    } else {
        None
    };
    Ok(RuntimeKey {
        kid,
        kty,
        key_ops,
        rsa,
    })
}

/// Parse the runtime-claims JSON: `keys` (JWKs; `HCLAkPub` required, each of `HCLAkPub` and
/// `HCLEkPub` at most once), `vm-configuration` (an object, kept as is), `user-data` (128
/// upper-case hex characters, optional: the oldest format has none).
pub fn parse_runtime_claims(json: &[u8]) -> Result<RuntimeClaims> {
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| bad(format!("runtime claims are not JSON ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("runtime claims are not a JSON object"))?;
    let keys = obj
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("runtime claims have no keys array"))?
        .iter()
        .map(parse_key)
        .collect::<Result<Vec<_>>>()?;
    for kid in [KID_AK, KID_EK] {
        if keys.iter().filter(|k| k.kid == kid).count() > 1 {
            return Err(bad(format!("runtime claims carry {kid} more than once")));
        }
    }
    match keys.iter().find(|k| k.kid == KID_AK) {
        None => return Err(bad("runtime claims have no HCLAkPub key")),
        Some(k) if k.rsa.is_none() => {
            return Err(bad("runtime claims: HCLAkPub is not an RSA key"))
        }
        Some(_) => {}
    }
    let vm_configuration = match obj.get("vm-configuration") {
        None => None,
        Some(c @ Value::Object(_)) => Some(c.clone()),
        Some(_) => return Err(bad("runtime claims: vm-configuration is not an object")),
    };
    let user_data = match obj.get("user-data") {
        None => None,
        Some(Value::String(hex_text)) => Some(decode_user_data(hex_text)?),
        Some(_) => return Err(bad("runtime claims: user-data is not a string")),
    };
    Ok(RuntimeClaims {
        keys,
        vm_configuration,
        user_data,
    })
}

/// 128 upper-case hex characters, as the HCL writes them (§6.3).
fn decode_user_data(text: &str) -> Result<[u8; USER_DATA_LEN]> {
    if text.len() != 2 * USER_DATA_LEN
        || !text
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
    {
        return Err(bad(format!(
            "runtime claims: user-data is not {} upper-case hex characters",
            2 * USER_DATA_LEN
        )));
    }
    let mut out = [0u8; USER_DATA_LEN];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| bad("runtime claims: user-data is not hex"))?;
    Ok(out)
}

/// The user-data hex as the HCL writes it (for messages and tests).
pub fn user_data_hex(user_data: &[u8; USER_DATA_LEN]) -> String {
    hex::encode_upper(user_data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn sample(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("testdata/azure-cvm/hcl")
                .join(name),
        )
        .unwrap()
    }

    fn set_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn err_of(b: &[u8]) -> String {
        HclReport::parse(b).unwrap_err().message().to_string()
    }

    #[test]
    fn each_structural_rule_is_enforced_with_a_precise_message() {
        let good = sample("trustee-snp-v1-2600.bin");
        let h = HclReport::parse(&good).unwrap();
        let claims_size = h.claims_json.len() as u32;

        assert!(err_of(&good[..1235]).contains("shorter than the fixed part"));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err_of(&b).contains("magic"));
        let mut b = good.clone();
        set_u32(&mut b, 4, 3);
        assert!(err_of(&b).contains("header version 3"));
        let mut b = good.clone();
        set_u32(&mut b, 1220, 2);
        assert!(err_of(&b).contains("variable-data version 2"));
        let mut b = good.clone();
        set_u32(&mut b, 1224, 3);
        assert!(err_of(&b).contains("report_type 3 is neither 2 (SEV-SNP) nor 4 (TDX)"));
        let mut b = good.clone();
        set_u32(&mut b, 1228, 2);
        assert!(err_of(&b).contains("hash_type 2 (SHA-384) is not supported"));
        set_u32(&mut b, 1228, 3);
        assert!(err_of(&b).contains("hash_type 3 (SHA-512) is not supported"));
        set_u32(&mut b, 1228, 0);
        assert!(err_of(&b).contains("hash_type 0 is unknown"));
        let mut b = good.clone();
        set_u32(&mut b, 1232, 2600);
        assert!(err_of(&b).contains("claims_size 2600 exceeds the 1364 bytes"));
        let mut b = good.clone();
        set_u32(&mut b, 1216, claims_size + 21);
        assert!(err_of(&b).contains("is not 20 + claims_size"));
        let mut b = good.clone();
        set_u32(&mut b, 8, 1184);
        assert!(err_of(&b).contains("report_size 1184 is not 32 + 1184 + data_size"));
        // The hardware report inside is checked too.
        let mut b = good.clone();
        set_u32(&mut b, 32, 0);
        assert!(err_of(&b).contains("SNP report: version 0"));
        let mut b = sample("trustee-tdx-v2-2600.bin");
        b[32] = 0;
        assert!(err_of(&b).contains("TDREPORT: REPORTTYPE.TYPE is 0x00"));
        // A structure error carries the operator hint.
        let e = HclReport::parse(&good[..100]).unwrap_err();
        assert!(e.hint().unwrap().contains("0x01400001"));
        assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    }

    #[test]
    fn runtime_claims_rules() {
        let rsa = r#"{"kid":"HCLAkPub","kty":"RSA","key_ops":["sign"],"n":"AQAB","e":"AQAB"}"#;
        let ud = "AB".repeat(64);
        let ok = format!(r#"{{"keys":[{rsa}],"vm-configuration":{{}},"user-data":"{ud}"}}"#);
        let c = parse_runtime_claims(ok.as_bytes()).unwrap();
        assert_eq!(c.user_data, Some([0xAB; 64]));
        assert_eq!(c.key(KID_AK).unwrap().key_ops, ["sign"]);
        let e = |json: String| {
            parse_runtime_claims(json.as_bytes())
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(e("[1]".into()).contains("not a JSON object"));
        assert!(e("{".into()).contains("not JSON"));
        assert!(e("{}".into()).contains("no keys array"));
        assert!(e(r#"{"keys":[]}"#.into()).contains("no HCLAkPub"));
        assert!(e(format!(r#"{{"keys":[{rsa},{rsa}]}}"#)).contains("HCLAkPub more than once"));
        assert!(e(r#"{"keys":[{"kid":"HCLAkPub","kty":"EC"}]}"#.into()).contains("not an RSA key"));
        assert!(
            e(r#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB"}]}"#.into())
                .contains("no base64url n")
        );
        assert!(e(r#"{"keys":[{"kty":"RSA"}]}"#.into()).contains("no string kid"));
        let lower = "ab".repeat(64);
        assert!(
            e(format!(r#"{{"keys":[{rsa}],"user-data":"{lower}"}}"#)).contains("upper-case hex")
        );
        assert!(e(format!(r#"{{"keys":[{rsa}],"user-data":"ABCD"}}"#)).contains("128 upper-case"));
        assert!(e(format!(r#"{{"keys":[{rsa}],"user-data":7}}"#)).contains("not a string"));
        assert!(e(format!(r#"{{"keys":[{rsa}],"vm-configuration":1}}"#)).contains("not an object"));
    }

    #[test]
    fn user_data_echo_is_compared_byte_for_byte() {
        let b = sample("trustee-snp-v1-2600.bin");
        let h = HclReport::parse(&b).unwrap();
        let echoed = h.claims.user_data.unwrap();
        assert!(h.user_data_echoes(&echoed));
        let mut other = echoed;
        other[63] ^= 1;
        assert!(!h.user_data_echoes(&other));
        // The oldest format has no user-data: nothing is echoed.
        let old = sample("kinvolk-snp-v1-2048.bin");
        assert!(!HclReport::parse(&old).unwrap().user_data_echoes(&echoed));
    }

    /// No input makes the parser panic: every prefix, and every single-byte change in the
    /// headers of the real reports (the fuzz target goes further).
    #[test]
    fn truncations_and_header_corruptions_never_panic() {
        for name in ["trustee-snp-v1-2600.bin", "kinvolk-tdx-v2-2600.bin"] {
            let good = sample(name);
            for n in 0..good.len() {
                let _ = HclReport::parse(&good[..n]);
            }
            for at in (0..32).chain(1216..1236) {
                for v in [0u8, 1, 0x7f, 0xff] {
                    let mut b = good.clone();
                    b[at] = v;
                    let _ = HclReport::parse(&b);
                }
            }
        }
    }
}
