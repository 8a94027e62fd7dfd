//! Mechanisms as owned Rust values, with their parameters already validated for shape, and
//! the table `C_GetMechanismList` / `C_GetMechanismInfo` answer from.

use super::HashAlg;
use crate::error::{Error, Result};
use cryptoki_sys::*;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PssParams {
    pub hash: HashAlg,
    pub mgf: HashAlg,
    pub salt_len: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OaepParams {
    pub hash: HashAlg,
    pub mgf: HashAlg,
    /// CKZ_DATA_SPECIFIED source data; empty when absent.
    pub label: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcmParams {
    pub iv: Vec<u8>,
    pub aad: Vec<u8>,
    pub tag_bits: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// CKM_RSA_PKCS: sign input is a DigestInfo (or any ≤ k−11 bytes); also encrypt/decrypt.
    RsaPkcs,
    /// CKM_SHA*_RSA_PKCS.
    RsaPkcsHash(HashAlg),
    /// CKM_RSA_PKCS_PSS: input is the hash.
    RsaPss(PssParams),
    /// CKM_SHA*_RSA_PKCS_PSS: hashes the data; params.hash equals the mechanism's hash.
    RsaPssHash(PssParams),
    RsaOaep(OaepParams),
    /// CKM_ECDSA: input is the hash, output raw r‖s.
    Ecdsa,
    EcdsaHash(HashAlg),
    AesGcm(GcmParams),
    AesCbcPad([u8; 16]),
    Digest(HashAlg),
}

impl Mechanism {
    pub fn ckm(&self) -> CK_MECHANISM_TYPE {
        match self {
            Mechanism::RsaPkcs => CKM_RSA_PKCS,
            Mechanism::RsaPkcsHash(h) => match h {
                HashAlg::Sha1 => CKM_SHA1_RSA_PKCS,
                HashAlg::Sha224 => CKM_SHA224_RSA_PKCS,
                HashAlg::Sha256 => CKM_SHA256_RSA_PKCS,
                HashAlg::Sha384 => CKM_SHA384_RSA_PKCS,
                HashAlg::Sha512 => CKM_SHA512_RSA_PKCS,
            },
            Mechanism::RsaPss(_) => CKM_RSA_PKCS_PSS,
            Mechanism::RsaPssHash(p) => pss_hash_ckm(p.hash),
            Mechanism::RsaOaep(_) => CKM_RSA_PKCS_OAEP,
            Mechanism::Ecdsa => CKM_ECDSA,
            Mechanism::EcdsaHash(h) => match h {
                HashAlg::Sha1 => CKM_ECDSA_SHA1,
                HashAlg::Sha224 => CKM_ECDSA_SHA224,
                HashAlg::Sha256 => CKM_ECDSA_SHA256,
                HashAlg::Sha384 => CKM_ECDSA_SHA384,
                HashAlg::Sha512 => CKM_ECDSA_SHA512,
            },
            Mechanism::AesGcm(_) => CKM_AES_GCM,
            Mechanism::AesCbcPad(_) => CKM_AES_CBC_PAD,
            Mechanism::Digest(h) => h.ckm(),
        }
    }
}

fn pss_hash_ckm(h: HashAlg) -> CK_MECHANISM_TYPE {
    match h {
        HashAlg::Sha1 => CKM_SHA1_RSA_PKCS_PSS,
        HashAlg::Sha224 => CKM_SHA224_RSA_PKCS_PSS,
        HashAlg::Sha256 => CKM_SHA256_RSA_PKCS_PSS,
        HashAlg::Sha384 => CKM_SHA384_RSA_PKCS_PSS,
        HashAlg::Sha512 => CKM_SHA512_RSA_PKCS_PSS,
    }
}

/// The hash a hashed RSA/ECDSA mechanism type implies.
pub fn hash_of_hashed(ckm: CK_MECHANISM_TYPE) -> Option<HashAlg> {
    Some(match ckm {
        CKM_SHA1_RSA_PKCS | CKM_SHA1_RSA_PKCS_PSS | CKM_ECDSA_SHA1 => HashAlg::Sha1,
        CKM_SHA224_RSA_PKCS | CKM_SHA224_RSA_PKCS_PSS | CKM_ECDSA_SHA224 => HashAlg::Sha224,
        CKM_SHA256_RSA_PKCS | CKM_SHA256_RSA_PKCS_PSS | CKM_ECDSA_SHA256 => HashAlg::Sha256,
        CKM_SHA384_RSA_PKCS | CKM_SHA384_RSA_PKCS_PSS | CKM_ECDSA_SHA384 => HashAlg::Sha384,
        CKM_SHA512_RSA_PKCS | CKM_SHA512_RSA_PKCS_PSS | CKM_ECDSA_SHA512 => HashAlg::Sha512,
        _ => return None,
    })
}

/// A mechanism parameter as decoded at the C boundary (owned copies, lengths checked there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawParam {
    None,
    Pss {
        hash_alg: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        salt_len: CK_ULONG,
    },
    Oaep {
        hash_alg: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        source: CK_RSA_PKCS_OAEP_SOURCE_TYPE,
        source_data: Vec<u8>,
    },
    Gcm {
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_bits: CK_ULONG,
    },
    Bytes(Vec<u8>),
}

fn param_invalid(msg: impl Into<String>) -> Error {
    Error::new(CKR_MECHANISM_PARAM_INVALID, msg)
}

impl Mechanism {
    /// Build a mechanism from its type and decoded parameter; shape checks only (key-dependent
    /// checks such as the PSS salt bound happen at init, against the key).
    pub fn from_raw(ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        let no_param = |p: &RawParam| -> Result<()> {
            match p {
                RawParam::None => Ok(()),
                RawParam::Bytes(b) if b.is_empty() => Ok(()),
                _ => Err(param_invalid(format!(
                    "mechanism {ckm:#x} takes no parameter"
                ))),
            }
        };
        let pss = |p: RawParam| -> Result<PssParams> {
            let RawParam::Pss {
                hash_alg,
                mgf,
                salt_len,
            } = p
            else {
                return Err(param_invalid("RSA-PSS needs CK_RSA_PKCS_PSS_PARAMS"));
            };
            let hash = HashAlg::from_ckm(hash_alg)
                .ok_or_else(|| param_invalid(format!("PSS hashAlg {hash_alg:#x} unsupported")))?;
            let mgf = HashAlg::from_mgf(mgf)
                .ok_or_else(|| param_invalid(format!("PSS mgf {mgf:#x} unsupported")))?;
            if mgf != hash {
                return Err(param_invalid("PSS mgf hash must match hashAlg"));
            }
            Ok(PssParams {
                hash,
                mgf,
                salt_len: salt_len as usize,
            })
        };
        Ok(match ckm {
            CKM_RSA_PKCS => {
                no_param(&param)?;
                Mechanism::RsaPkcs
            }
            CKM_SHA1_RSA_PKCS | CKM_SHA224_RSA_PKCS | CKM_SHA256_RSA_PKCS | CKM_SHA384_RSA_PKCS
            | CKM_SHA512_RSA_PKCS => {
                no_param(&param)?;
                Mechanism::RsaPkcsHash(hash_of_hashed(ckm).expect("listed"))
            }
            CKM_RSA_PKCS_PSS => Mechanism::RsaPss(pss(param)?),
            CKM_SHA1_RSA_PKCS_PSS
            | CKM_SHA224_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS => {
                let p = pss(param)?;
                if Some(p.hash) != hash_of_hashed(ckm) {
                    return Err(param_invalid(
                        "PSS hashAlg must be the mechanism's own hash",
                    ));
                }
                Mechanism::RsaPssHash(p)
            }
            CKM_RSA_PKCS_OAEP => {
                let RawParam::Oaep {
                    hash_alg,
                    mgf,
                    source,
                    source_data,
                } = param
                else {
                    return Err(param_invalid("RSA-OAEP needs CK_RSA_PKCS_OAEP_PARAMS"));
                };
                let hash = HashAlg::from_ckm(hash_alg).ok_or_else(|| {
                    param_invalid(format!("OAEP hashAlg {hash_alg:#x} unsupported"))
                })?;
                let mgf = HashAlg::from_mgf(mgf)
                    .ok_or_else(|| param_invalid(format!("OAEP mgf {mgf:#x} unsupported")))?;
                if mgf != hash {
                    return Err(param_invalid("OAEP mgf hash must match hashAlg"));
                }
                if source != 0 && source != CKZ_DATA_SPECIFIED {
                    return Err(param_invalid("OAEP source must be CKZ_DATA_SPECIFIED"));
                }
                Mechanism::RsaOaep(OaepParams {
                    hash,
                    mgf,
                    label: source_data,
                })
            }
            CKM_ECDSA => {
                no_param(&param)?;
                Mechanism::Ecdsa
            }
            CKM_ECDSA_SHA1 | CKM_ECDSA_SHA224 | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384
            | CKM_ECDSA_SHA512 => {
                no_param(&param)?;
                Mechanism::EcdsaHash(hash_of_hashed(ckm).expect("listed"))
            }
            CKM_AES_GCM => {
                let RawParam::Gcm { iv, aad, tag_bits } = param else {
                    return Err(param_invalid("AES-GCM needs CK_GCM_PARAMS"));
                };
                // Any IV of 1..=256 bytes; tags of 96..=128 bits (NIST SP 800-38D: shorter
                // tags only for special uses, which no client of this token has).
                if iv.is_empty() || iv.len() > 256 {
                    return Err(param_invalid(format!(
                        "AES-GCM IV must be 1..256 bytes, got {}",
                        iv.len()
                    )));
                }
                if !(96..=128).contains(&tag_bits) || tag_bits % 8 != 0 {
                    return Err(param_invalid(format!(
                        "AES-GCM tag must be 96, 104, 112, 120 or 128 bits, got {tag_bits}"
                    )));
                }
                Mechanism::AesGcm(GcmParams {
                    iv,
                    aad,
                    tag_bits: tag_bits as usize,
                })
            }
            CKM_AES_CBC_PAD => {
                let RawParam::Bytes(iv) = param else {
                    return Err(param_invalid("AES-CBC-PAD needs a 16-byte IV"));
                };
                let iv: [u8; 16] = iv
                    .as_slice()
                    .try_into()
                    .map_err(|_| param_invalid("AES-CBC-PAD IV must be 16 bytes"))?;
                Mechanism::AesCbcPad(iv)
            }
            CKM_SHA_1 | CKM_SHA224 | CKM_SHA256 | CKM_SHA384 | CKM_SHA512 => {
                no_param(&param)?;
                Mechanism::Digest(HashAlg::from_ckm(ckm).expect("listed"))
            }
            _ => {
                return Err(Error::new(
                    CKR_MECHANISM_INVALID,
                    format!("mechanism {ckm:#x} is not supported"),
                ))
            }
        })
    }
}

/// Every mechanism the token offers, with `C_GetMechanismInfo`'s answer.
///
/// CKF_HW is set on all of them: the keys live only inside the attested TEE, which is the
/// hardware boundary of this token, and pkcs11-tool hides mechanisms without CKF_HW unless
/// `--allow-sw`. Both directions are listed (SIGN|VERIFY, ENCRYPT|DECRYPT): SunPKCS11 drops
/// one-sided mechanisms. RSA and EC sizes are in bits; AES sizes in bytes, as PKCS#11 defines
/// them for AES mechanisms.
pub fn mechanism_table() -> &'static [(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] {
    const RSA_SV: CK_FLAGS = CKF_HW | CKF_SIGN | CKF_VERIFY;
    const RSA_ALL: CK_FLAGS = RSA_SV | CKF_ENCRYPT | CKF_DECRYPT;
    const RSA_ED: CK_FLAGS = CKF_HW | CKF_ENCRYPT | CKF_DECRYPT;
    const EC: CK_FLAGS =
        CKF_HW | CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
    const AES: CK_FLAGS = CKF_HW | CKF_ENCRYPT | CKF_DECRYPT;
    const DIG: CK_FLAGS = CKF_HW | CKF_DIGEST;
    &[
        (CKM_RSA_PKCS, 2048, 4096, RSA_ALL),
        (CKM_SHA1_RSA_PKCS, 2048, 4096, RSA_SV),
        (CKM_SHA224_RSA_PKCS, 2048, 4096, RSA_SV),
        (CKM_SHA256_RSA_PKCS, 2048, 4096, RSA_SV),
        (CKM_SHA384_RSA_PKCS, 2048, 4096, RSA_SV),
        (CKM_SHA512_RSA_PKCS, 2048, 4096, RSA_SV),
        (CKM_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_SHA1_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_SHA224_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, RSA_SV),
        (CKM_RSA_PKCS_OAEP, 2048, 4096, RSA_ED),
        (CKM_ECDSA, 256, 521, EC),
        (CKM_ECDSA_SHA1, 256, 521, EC),
        (CKM_ECDSA_SHA224, 256, 521, EC),
        (CKM_ECDSA_SHA256, 256, 521, EC),
        (CKM_ECDSA_SHA384, 256, 521, EC),
        (CKM_ECDSA_SHA512, 256, 521, EC),
        (CKM_AES_GCM, 16, 32, AES),
        (CKM_AES_CBC_PAD, 16, 32, AES),
        (CKM_SHA_1, 0, 0, DIG),
        (CKM_SHA224, 0, 0, DIG),
        (CKM_SHA256, 0, 0, DIG),
        (CKM_SHA384, 0, 0, DIG),
        (CKM_SHA512, 0, 0, DIG),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_params_are_checked() {
        let ok = RawParam::Pss {
            hash_alg: CKM_SHA256,
            mgf: CKG_MGF1_SHA256,
            salt_len: 32,
        };
        assert!(matches!(
            Mechanism::from_raw(CKM_SHA256_RSA_PKCS_PSS, ok.clone()),
            Ok(Mechanism::RsaPssHash(_))
        ));
        let e = Mechanism::from_raw(CKM_SHA384_RSA_PKCS_PSS, ok).unwrap_err();
        assert_eq!(e.rv(), CKR_MECHANISM_PARAM_INVALID);
        let bad_mgf = RawParam::Pss {
            hash_alg: CKM_SHA256,
            mgf: CKG_MGF1_SHA1,
            salt_len: 32,
        };
        assert_eq!(
            Mechanism::from_raw(CKM_RSA_PKCS_PSS, bad_mgf)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
        assert_eq!(
            Mechanism::from_raw(CKM_RSA_PKCS_PSS, RawParam::None)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
    }

    #[test]
    fn unknown_mechanism_is_invalid() {
        assert_eq!(
            Mechanism::from_raw(CKM_DES3_CBC, RawParam::None)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_INVALID
        );
    }

    #[test]
    fn every_listed_mechanism_is_paired_and_decodable_type() {
        for &(m, _, _, f) in mechanism_table() {
            assert_ne!(f & CKF_HW, 0);
            assert_eq!(f & CKF_SIGN != 0, f & CKF_VERIFY != 0, "{m:#x}");
            assert_eq!(f & CKF_ENCRYPT != 0, f & CKF_DECRYPT != 0, "{m:#x}");
        }
    }

    #[test]
    fn gcm_and_cbc_params() {
        let g = RawParam::Gcm {
            iv: vec![0; 12],
            aad: vec![1, 2],
            tag_bits: 128,
        };
        assert!(Mechanism::from_raw(CKM_AES_GCM, g).is_ok());
        let g = RawParam::Gcm {
            iv: vec![0; 12],
            aad: vec![],
            tag_bits: 64,
        };
        assert_eq!(
            Mechanism::from_raw(CKM_AES_GCM, g).unwrap_err().rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
        let g = RawParam::Gcm {
            iv: vec![],
            aad: vec![],
            tag_bits: 128,
        };
        assert_eq!(
            Mechanism::from_raw(CKM_AES_GCM, g).unwrap_err().rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
        let g = RawParam::Gcm {
            iv: vec![0; 16],
            aad: vec![],
            tag_bits: 96,
        };
        assert!(Mechanism::from_raw(CKM_AES_GCM, g).is_ok());
        assert!(Mechanism::from_raw(CKM_AES_CBC_PAD, RawParam::Bytes(vec![0; 16])).is_ok());
        assert!(Mechanism::from_raw(CKM_AES_CBC_PAD, RawParam::Bytes(vec![0; 15])).is_err());
    }
}
