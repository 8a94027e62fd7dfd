//! Mechanisms over one engine, AWS-LC: aws-lc-rs where it has a safe API (digests, AES,
//! random), aws-lc-sys where it has none (pre-hashed RSA PKCS#1 / PSS input, PSS salt length,
//! OAEP label and mismatched MGF hash, pre-hashed ECDSA). All raw calls live in `pkey.rs`.
//!
//! Inputs arrive as owned Rust values (`Mechanism`): the C boundary decodes parameter structs
//! before anything here runs.

pub mod aes;
pub mod check;
pub mod evidence_sig;
pub mod gcm_message;
pub mod implicit;
pub mod keywrap;
pub mod mechanism;
pub mod ops;
pub mod pkey;
pub mod rsa_oaep;

pub use mechanism::{GcmParams, Mechanism, OaepParams, PssParams};

use crate::error::{Error, Result};
use cryptoki_sys::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlg {
    pub const ALL: [HashAlg; 5] = [
        HashAlg::Sha1,
        HashAlg::Sha224,
        HashAlg::Sha256,
        HashAlg::Sha384,
        HashAlg::Sha512,
    ];

    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// From a digest mechanism (CKM_SHA_1, CKM_SHA256, ...).
    pub fn from_ckm(m: CK_MECHANISM_TYPE) -> Option<HashAlg> {
        Some(match m {
            CKM_SHA_1 => HashAlg::Sha1,
            CKM_SHA224 => HashAlg::Sha224,
            CKM_SHA256 => HashAlg::Sha256,
            CKM_SHA384 => HashAlg::Sha384,
            CKM_SHA512 => HashAlg::Sha512,
            _ => return None,
        })
    }

    pub fn ckm(self) -> CK_MECHANISM_TYPE {
        match self {
            HashAlg::Sha1 => CKM_SHA_1,
            HashAlg::Sha224 => CKM_SHA224,
            HashAlg::Sha256 => CKM_SHA256,
            HashAlg::Sha384 => CKM_SHA384,
            HashAlg::Sha512 => CKM_SHA512,
        }
    }

    /// From an MGF1 generator (CKG_MGF1_SHA256, ...).
    pub fn from_mgf(g: CK_RSA_PKCS_MGF_TYPE) -> Option<HashAlg> {
        Some(match g {
            CKG_MGF1_SHA1 => HashAlg::Sha1,
            CKG_MGF1_SHA224 => HashAlg::Sha224,
            CKG_MGF1_SHA256 => HashAlg::Sha256,
            CKG_MGF1_SHA384 => HashAlg::Sha384,
            CKG_MGF1_SHA512 => HashAlg::Sha512,
            _ => return None,
        })
    }

    fn lc(self) -> &'static aws_lc_rs::digest::Algorithm {
        use aws_lc_rs::digest;
        match self {
            HashAlg::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            HashAlg::Sha224 => &digest::SHA224,
            HashAlg::Sha256 => &digest::SHA256,
            HashAlg::Sha384 => &digest::SHA384,
            HashAlg::Sha512 => &digest::SHA512,
        }
    }

    /// DER prefix of the PKCS#1 v1.5 DigestInfo for this hash (RFC 8017 §9.2 note 1).
    pub fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            HashAlg::Sha1 => &[
                0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
                0x14,
            ],
            HashAlg::Sha224 => &SHA224_DIGEST_INFO,
            HashAlg::Sha256 => &SHA256_DIGEST_INFO,
            HashAlg::Sha384 => &SHA384_DIGEST_INFO,
            HashAlg::Sha512 => &SHA512_DIGEST_INFO,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        aws_lc_rs::digest::digest(self.lc(), data).as_ref().to_vec()
    }
}

/// DigestInfo prefix of a SHA-2 hash: SEQUENCE { SEQUENCE { OID 2.16.840.1.101.3.4.2.`arc`,
/// NULL }, OCTET STRING of `len` bytes }, the hash bytes to follow (RFC 8017 §9.2 note 1).
const fn sha2_digest_info(arc: u8, len: u8) -> [u8; 19] {
    [
        0x30,
        0x11 + len,
        0x30,
        0x0d,
        0x06,
        0x09,
        0x60,
        0x86,
        0x48,
        0x01,
        0x65,
        0x03,
        0x04,
        0x02,
        arc,
        0x05,
        0x00,
        0x04,
        len,
    ]
}
const SHA224_DIGEST_INFO: [u8; 19] = sha2_digest_info(0x04, 28);
const SHA256_DIGEST_INFO: [u8; 19] = sha2_digest_info(0x01, 32);
const SHA384_DIGEST_INFO: [u8; 19] = sha2_digest_info(0x02, 48);
const SHA512_DIGEST_INFO: [u8; 19] = sha2_digest_info(0x03, 64);

/// A running hash (true multipart: C_DigestUpdate / C_SignUpdate feed it directly).
#[derive(Clone)]
pub struct Hasher {
    alg: HashAlg,
    ctx: aws_lc_rs::digest::Context,
}

impl Hasher {
    pub fn new(alg: HashAlg) -> Hasher {
        Hasher {
            alg,
            ctx: aws_lc_rs::digest::Context::new(alg.lc()),
        }
    }
    pub fn alg(&self) -> HashAlg {
        self.alg
    }
    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data)
    }
    pub fn finish(self) -> Vec<u8> {
        self.ctx.finish().as_ref().to_vec()
    }
}

/// Fill `out` from AWS-LC's DRBG.
pub fn random(out: &mut [u8]) -> Result<()> {
    use aws_lc_rs::rand::SecureRandom;
    aws_lc_rs::rand::SystemRandom::new()
        .fill(out)
        .map_err(|_| Error::new(CKR_FUNCTION_FAILED, "random generator failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_rustcrypto() {
        use sha2::Digest;
        let data = b"the quick brown fox";
        let rustcrypto: [(HashAlg, Vec<u8>); 5] = [
            (HashAlg::Sha1, sha1::Sha1::digest(data).to_vec()),
            (HashAlg::Sha224, sha2::Sha224::digest(data).to_vec()),
            (HashAlg::Sha256, sha2::Sha256::digest(data).to_vec()),
            (HashAlg::Sha384, sha2::Sha384::digest(data).to_vec()),
            (HashAlg::Sha512, sha2::Sha512::digest(data).to_vec()),
        ];
        for (h, expected) in rustcrypto {
            assert_eq!(h.digest(data), expected, "{h:?}");
        }
        for h in HashAlg::ALL {
            let mut m = Hasher::new(h);
            m.update(b"the quick ");
            m.update(b"brown fox");
            assert_eq!(m.finish(), h.digest(data));
            assert_eq!(h.digest(data).len(), h.output_len());
        }
    }

    #[test]
    fn digest_info_prefixes_end_with_hash_length() {
        for h in HashAlg::ALL {
            let p = h.digest_info_prefix();
            assert_eq!(*p.last().unwrap() as usize, h.output_len());
            assert_eq!(p[1] as usize + 2, p.len() + h.output_len());
        }
    }

    #[test]
    fn random_fills() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        random(&mut a).unwrap();
        random(&mut b).unwrap();
        assert_ne!(a, b);
    }
}
