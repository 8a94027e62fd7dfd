//! AES key wrap: CKM_AES_KEY_WRAP (RFC 3394, default IV) and CKM_AES_KEY_WRAP_KWP (RFC 5649),
//! one-shot ciphers used by C_WrapKey / C_UnwrapKey and, as PKCS#11 allows, C_Encrypt /
//! C_Decrypt. The engines are `crypto::keywrap`.

use super::{param_invalid, Collected, Engine, Family, Mechanism, RawParam};
use crate::crypto::keywrap::{
    aes_kw_unwrap, aes_kw_wrap, aes_kwp_unwrap_any, aes_kwp_wrap, WrapError,
};
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use cryptoki_sys::*;
use std::sync::Arc;

pub struct KeyWrap;

fn wrap_error(e: WrapError, encrypt: bool) -> Error {
    match (e, encrypt) {
        (WrapError::KekLength(n), _) => {
            Error::new(CKR_KEY_SIZE_RANGE, format!("AES key of {n} bytes"))
        }
        (WrapError::Length, true) => Error::new(
            CKR_DATA_LEN_RANGE,
            "AES key wrap input must be at least 16 bytes, a multiple of 8 (KWP: any length)",
        ),
        (WrapError::Length, false) => Error::new(
            CKR_ENCRYPTED_DATA_LEN_RANGE,
            "wrapped data must be a multiple of 8 bytes, at least 16",
        ),
        (WrapError::Integrity, _) => Error::new(
            CKR_ENCRYPTED_DATA_INVALID,
            "AES key unwrap: integrity check failed",
        ),
    }
}

impl Family for KeyWrap {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        // Only the default IVs: an explicit one must equal it (RFC 3394 A6..A6, RFC 5649
        // A65959A6).
        let default: &[u8] = if ckm == CKM_AES_KEY_WRAP {
            &[0xA6; 8]
        } else {
            &[0xA6, 0x59, 0x59, 0xA6]
        };
        match &param {
            RawParam::None => {}
            RawParam::Bytes(b) if b.is_empty() || b.as_slice() == default => {}
            _ => {
                return Err(param_invalid(
                    "AES key wrap takes no parameter or its default IV",
                ))
            }
        }
        Ok(if ckm == CKM_AES_KEY_WRAP {
            Mechanism::AesKeyWrap
        } else {
            Mechanism::AesKeyWrapPad
        })
    }

    fn cipher(&self, m: &Mechanism, key: Arc<SecretBytes>, encrypt: bool) -> Engine {
        let pad = match m {
            Mechanism::AesKeyWrap => false,
            Mechanism::AesKeyWrapPad => true,
            _ => return None,
        };
        let run = move |input: &[u8]| -> Result<Wiped> {
            let kek = key.as_slice();
            let r = match (pad, encrypt) {
                (false, true) => aes_kw_wrap(kek, input).map(Wiped::new),
                (true, true) => aes_kwp_wrap(kek, input).map(Wiped::new),
                (false, false) => {
                    aes_kw_unwrap(kek, input).map(|s| Wiped::new(s.as_slice().to_vec()))
                }
                (true, false) => {
                    aes_kwp_unwrap_any(kek, input).map(|s| Wiped::new(s.as_slice().to_vec()))
                }
            };
            r.map_err(|e| wrap_error(e, encrypt))
        };
        Some(Ok(Box::new(Collected::new(run))))
    }
}
