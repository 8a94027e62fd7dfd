//! A read-only view of an SNP ATTESTATION_REPORT (platform-evidence §2) and the check of its
//! signature against a VCEK / VLEK certificate. Pure: no I/O; every offset is inside the fixed
//! 1184 bytes that `SnpReport::parse` insists on.

use super::REPORT_LEN;
use crate::crypto::evidence_sig::verify_ecdsa_p384_sha384;
use crate::error::{Error, Result, Step};
use x509_cert::der::Decode;

const SIGNED_LEN: usize = 0x2A0;
const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
/// Each signature component field is 72 bytes little-endian; P-384 uses the low 48.
const SIG_FIELD: usize = 72;
const P384_LEN: usize = 48;

/// id-ecPublicKey and secp384r1 (RFC 5480): the only key a VCEK / VLEK carries.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_SECP384R1: &str = "1.3.132.0.34";

#[derive(Debug, Clone, Copy)]
pub struct SnpReport<'a>(&'a [u8]);

fn bad(what: impl Into<String>) -> Error {
    Error::evidence(Step::Evidence, format!("SNP report: {}", what.into()))
}

impl<'a> SnpReport<'a> {
    /// Exactly 1184 bytes, version 1 to 5 (1 is in Microsoft's published SevSnpVm example, 2, 3
    /// and 5 in the field; all share the fields read here).
    pub fn parse(bytes: &'a [u8]) -> Result<SnpReport<'a>> {
        if bytes.len() != REPORT_LEN {
            return Err(bad(format!("{} bytes, expected {REPORT_LEN}", bytes.len())));
        }
        let r = SnpReport(bytes);
        if !matches!(r.version(), 1..=5) {
            return Err(bad(format!(
                "version {} is not an SNP report version (1 to 5)",
                r.version()
            )));
        }
        Ok(r)
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_le_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_le_bytes(b)
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
    pub fn version(&self) -> u32 {
        self.u32_at(0)
    }
    pub fn guest_svn(&self) -> u32 {
        self.u32_at(4)
    }
    pub fn policy(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn vmpl(&self) -> u32 {
        self.u32_at(0x30)
    }
    pub fn signature_algo(&self) -> u32 {
        self.u32_at(0x34)
    }
    pub fn platform_info(&self) -> u64 {
        self.u64_at(0x40)
    }
    /// KEY_INFO bits 4:2: 0 VCEK, 1 VLEK, 7 none.
    pub fn signing_key(&self) -> u32 {
        (self.u32_at(0x48) >> 2) & 7
    }
    pub fn report_data(&self) -> &'a [u8] {
        &self.0[0x50..0x90]
    }
    pub fn measurement(&self) -> &'a [u8] {
        &self.0[0x90..0xC0]
    }
    pub fn host_data(&self) -> &'a [u8] {
        &self.0[0xC0..0xE0]
    }
    /// REPORTED_TCB as THIM's `tcbm` (the little-endian u64).
    pub fn reported_tcb(&self) -> u64 {
        self.u64_at(0x180)
    }
    pub fn chip_id(&self) -> &'a [u8] {
        &self.0[0x1A0..0x1E0]
    }

    /// Check the ECDSA P-384 / SHA-384 signature over bytes 0x000..0x29F with the public key
    /// of `cert_der` (the VCEK or VLEK). The certificate chain up to AMD's ARK is MAA's check
    /// (and the emulator's); this one tells an operator the report and certificate belong together.
    pub fn verify_signature(&self, cert_der: &[u8]) -> Result<()> {
        let cert = x509_cert::Certificate::from_der(cert_der)
            .map_err(|e| bad(format!("VCEK certificate is not DER X.509: {e}")))?;
        let spki = &cert.tbs_certificate.subject_public_key_info;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok());
        if spki.algorithm.oid.to_string() != OID_EC_PUBLIC_KEY
            || curve.map(|c| c.to_string()).as_deref() != Some(OID_SECP384R1)
        {
            return Err(bad(
                "the certificate's key is not an EC P-384 key (VCEK / VLEK)",
            ));
        }
        let point = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| bad("the certificate's public key is not a whole number of bytes"))?;
        let sig_r = &self.0[SIG_R..SIG_R + SIG_FIELD];
        let sig_s = &self.0[SIG_S..SIG_S + SIG_FIELD];
        if sig_r[P384_LEN..]
            .iter()
            .chain(&sig_s[P384_LEN..])
            .any(|b| *b != 0)
        {
            return Err(bad(
                "signature has non-zero bytes beyond the P-384 scalar size",
            ));
        }
        // r and s are little-endian in the report; the verifier wants big-endian r ‖ s.
        let mut rs = [0u8; 2 * P384_LEN];
        for i in 0..P384_LEN {
            rs[P384_LEN - 1 - i] = sig_r[i];
            rs[2 * P384_LEN - 1 - i] = sig_s[i];
        }
        verify_ecdsa_p384_sha384(point, &self.0[..SIGNED_LEN], &rs)
            .map_err(|_| bad("signature does not verify with the VCEK / VLEK public key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn testdata(rel: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("testdata")
                .join(rel),
        )
        .unwrap()
    }

    #[test]
    fn real_reports_verify_with_their_vcek_and_vlek() {
        for (report, cert) in [
            (
                "snp/trustee-milan-v2-report.bin",
                "snp/trustee-milan-v2-vcek.der",
            ),
            (
                "snp/trustee-milan-vlek-v3-report.bin",
                "snp/trustee-milan-vlek.der",
            ),
        ] {
            let bytes = testdata(report);
            let r = SnpReport::parse(&bytes).unwrap();
            r.verify_signature(&testdata(cert)).unwrap();
            // One flipped bit in the signed area breaks it.
            let mut tampered = bytes.clone();
            tampered[0x50] ^= 1;
            let e = SnpReport::parse(&tampered)
                .unwrap()
                .verify_signature(&testdata(cert))
                .unwrap_err();
            assert!(e.message().contains("does not verify"), "{e}");
        }
        let vlek = testdata("snp/trustee-milan-vlek-v3-report.bin");
        assert_eq!(SnpReport::parse(&vlek).unwrap().signing_key(), 1);
        assert_eq!(SnpReport::parse(&vlek).unwrap().version(), 3);
    }

    #[test]
    fn wrong_size_version_and_certificate_are_refused() {
        let bytes = testdata("snp/trustee-milan-v2-report.bin");
        assert!(SnpReport::parse(&bytes[..1183])
            .unwrap_err()
            .message()
            .contains("1183 bytes"));
        let mut v9 = bytes.clone();
        v9[0] = 9;
        assert!(SnpReport::parse(&v9)
            .unwrap_err()
            .message()
            .contains("version 9"));
        let r = SnpReport::parse(&bytes).unwrap();
        assert!(r
            .verify_signature(b"not der")
            .unwrap_err()
            .message()
            .contains("not DER"));
        // A VCEK of another chip: a well-formed key that does not verify.
        let e = r
            .verify_signature(&testdata("snp/milan-v2-vcek.der"))
            .unwrap_err();
        assert!(e.message().contains("does not verify"), "{e}");
    }
}
