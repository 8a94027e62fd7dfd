//! RSA families: PKCS#1 v1.5 (raw and hashed), PSS (raw and hashed), OAEP.

use super::{
    hash_of_hashed, param_invalid, take_param, Family, Mechanism, OaepParams, Plain, PssParams,
    RawParam,
};
use crate::crypto::HashAlg;
use crate::error::Result;
use cryptoki_sys::*;

/// The hash and MGF1 hash of a PSS or OAEP parameter: both supported, and the same.
fn hash_and_mgf(
    what: &str,
    hash_alg: CK_MECHANISM_TYPE,
    mgf: CK_RSA_PKCS_MGF_TYPE,
) -> Result<(HashAlg, HashAlg)> {
    let hash = HashAlg::from_ckm(hash_alg)
        .ok_or_else(|| param_invalid(format!("{what} hashAlg {hash_alg:#x} unsupported")))?;
    let mgf = HashAlg::from_mgf(mgf)
        .ok_or_else(|| param_invalid(format!("{what} mgf {mgf:#x} unsupported")))?;
    if mgf != hash {
        return Err(param_invalid(format!("{what} mgf hash must match hashAlg")));
    }
    Ok((hash, mgf))
}

/// PKCS#1 v1.5: CKM_RSA_PKCS and CKM_SHA*_RSA_PKCS.
pub static PKCS1: Plain = Plain {
    raw: Mechanism::RsaPkcs,
    hashed: Mechanism::RsaPkcsHash,
};

pub struct Pss;

impl Family for Pss {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        take_param!(param => Pss { hash_alg, mgf, salt_len }, "CK_RSA_PKCS_PSS_PARAMS");
        let (hash, mgf) = hash_and_mgf("PSS", hash_alg, mgf)?;
        let p = PssParams {
            hash,
            mgf,
            salt_len: salt_len as usize,
        };
        match hash_of_hashed(ckm) {
            None => Ok(Mechanism::RsaPss(p)),
            Some(h) if h == p.hash => Ok(Mechanism::RsaPssHash(p)),
            Some(_) => Err(param_invalid(
                "PSS hashAlg must be the mechanism's own hash",
            )),
        }
    }
}

pub struct Oaep;

impl Family for Oaep {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        take_param!(param => Oaep { hash_alg, mgf, source, source_data }, "CK_RSA_PKCS_OAEP_PARAMS");
        let (hash, mgf) = hash_and_mgf("OAEP", hash_alg, mgf)?;
        if source != 0 && source != CKZ_DATA_SPECIFIED {
            return Err(param_invalid("OAEP source must be CKZ_DATA_SPECIFIED"));
        }
        Ok(Mechanism::RsaOaep(OaepParams {
            hash,
            mgf,
            label: source_data,
        }))
    }
}
