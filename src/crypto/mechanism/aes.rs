//! AES: GCM and CBC with PKCS#7 padding.

use super::{param_invalid, Family, GcmParams, Mechanism, RawParam};
use crate::error::Result;
use cryptoki_sys::*;

pub struct Gcm;

impl Family for Gcm {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        let RawParam::Gcm { iv, aad, tag_bits } = param else {
            return Err(param_invalid("AES-GCM needs CK_GCM_PARAMS"));
        };
        // Any IV of 1..=256 bytes; tags of 96..=128 bits (NIST SP 800-38D: shorter tags only
        // for special uses, which no client of this token has).
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
        Ok(Mechanism::AesGcm(GcmParams {
            iv,
            aad,
            tag_bits: tag_bits as usize,
        }))
    }
}

pub struct CbcPad;

impl Family for CbcPad {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        let RawParam::Bytes(iv) = param else {
            return Err(param_invalid("AES-CBC-PAD needs a 16-byte IV"));
        };
        let iv: [u8; 16] = iv
            .as_slice()
            .try_into()
            .map_err(|_| param_invalid("AES-CBC-PAD IV must be 16 bytes"))?;
        Ok(Mechanism::AesCbcPad(iv))
    }
}
