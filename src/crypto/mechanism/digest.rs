//! Digests (CKM_SHA_1, CKM_SHA224 ... CKM_SHA512).

use super::{no_param, Family, Mechanism, RawParam};
use crate::crypto::HashAlg;
use crate::error::{Error, Result};
use cryptoki_sys::*;

pub struct Digest;

impl Family for Digest {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        no_param(ckm, &param)?;
        let h = HashAlg::from_ckm(ckm).ok_or_else(|| {
            Error::new(
                CKR_MECHANISM_INVALID,
                format!("mechanism {ckm:#x} is not a digest"),
            )
        })?;
        Ok(Mechanism::Digest(h))
    }
}
