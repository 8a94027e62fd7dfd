//! Key and key-pair generation mechanisms (CKM_AES_KEY_GEN, CKM_GENERIC_SECRET_KEY_GEN,
//! CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_EC_KEY_PAIR_GEN): no parameter; the key's size and curve come
//! from the template, and the generators are `crypto::keygen`.

use super::{no_param, Family, Mechanism, RawParam};
use crate::error::Result;
use cryptoki_sys::*;

pub struct KeyGen;

impl Family for KeyGen {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        no_param(ckm, &param)?;
        Ok(Mechanism::KeyGen(ckm))
    }
}
