//! MACs over secret keys: HMAC (CKM_SHA*_HMAC, generic secret keys, full-length tags) and
//! AES-CMAC (CKM_AES_CMAC, 16-byte tags). Both through aws-lc-rs; their contexts hold the key
//! schedule in AWS-LC memory (the locked arena).

use super::{no_param, Family, Mac, Mechanism, RawParam};
use crate::crypto::HashAlg;
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use aws_lc_rs::{cmac, hmac};
use cryptoki_sys::*;
use std::sync::Arc;

fn failed(what: &str) -> Error {
    Error::new(CKR_FUNCTION_FAILED, format!("{what} failed"))
}

pub struct Hmac;

impl Family for Hmac {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        no_param(ckm, &param)?;
        let h = match ckm {
            CKM_SHA_1_HMAC => HashAlg::Sha1,
            CKM_SHA224_HMAC => HashAlg::Sha224,
            CKM_SHA256_HMAC => HashAlg::Sha256,
            CKM_SHA384_HMAC => HashAlg::Sha384,
            CKM_SHA512_HMAC => HashAlg::Sha512,
            _ => {
                return Err(Error::new(
                    CKR_MECHANISM_INVALID,
                    format!("mechanism {ckm:#x} is not an HMAC"),
                ))
            }
        };
        Ok(Mechanism::Hmac(h))
    }

    fn mac(&self, m: &Mechanism, key: &Arc<SecretBytes>) -> Option<Result<Box<dyn Mac>>> {
        let Mechanism::Hmac(h) = m else { return None };
        let alg = match h {
            HashAlg::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            HashAlg::Sha224 => hmac::HMAC_SHA224,
            HashAlg::Sha256 => hmac::HMAC_SHA256,
            HashAlg::Sha384 => hmac::HMAC_SHA384,
            HashAlg::Sha512 => hmac::HMAC_SHA512,
        };
        if key.is_empty() {
            return Some(Err(Error::new(CKR_KEY_SIZE_RANGE, "HMAC key is empty")));
        }
        let k = hmac::Key::new(alg, key.as_slice());
        Some(Ok(Box::new(HmacOp {
            ctx: Some(hmac::Context::with_key(&k)),
            len: h.output_len(),
        })))
    }
}

struct HmacOp {
    ctx: Option<hmac::Context>,
    len: usize,
}

impl Mac for HmacOp {
    fn update(&mut self, data: &[u8]) -> Result<()> {
        self.ctx
            .as_mut()
            .ok_or_else(|| failed("HMAC"))?
            .update(data);
        Ok(())
    }
    fn finish(&mut self) -> Result<Wiped> {
        let ctx = self.ctx.take().ok_or_else(|| failed("HMAC"))?;
        Ok(Wiped::new(ctx.sign().as_ref().to_vec()))
    }
    fn output_len(&self) -> usize {
        self.len
    }
}

pub struct Cmac;

impl Family for Cmac {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        no_param(ckm, &param)?;
        Ok(Mechanism::AesCmac)
    }

    fn mac(&self, m: &Mechanism, key: &Arc<SecretBytes>) -> Option<Result<Box<dyn Mac>>> {
        if *m != Mechanism::AesCmac {
            return None;
        }
        let alg = match key.len() {
            16 => cmac::AES_128,
            24 => cmac::AES_192,
            32 => cmac::AES_256,
            n => {
                return Some(Err(Error::new(
                    CKR_KEY_SIZE_RANGE,
                    format!("AES key of {n} bytes"),
                )))
            }
        };
        Some(
            cmac::Key::new(alg, key.as_slice())
                .map_err(|_| failed("AES-CMAC key setup"))
                .map(|k| {
                    Box::new(CmacOp {
                        ctx: Some(cmac::Context::with_key(&k)),
                    }) as Box<dyn Mac>
                }),
        )
    }
}

struct CmacOp {
    ctx: Option<cmac::Context>,
}

impl Mac for CmacOp {
    fn update(&mut self, data: &[u8]) -> Result<()> {
        self.ctx
            .as_mut()
            .ok_or_else(|| failed("AES-CMAC"))?
            .update(data)
            .map_err(|_| failed("AES-CMAC"))
    }
    fn finish(&mut self) -> Result<Wiped> {
        let ctx = self.ctx.take().ok_or_else(|| failed("AES-CMAC"))?;
        let tag = ctx.sign().map_err(|_| failed("AES-CMAC"))?;
        Ok(Wiped::new(tag.as_ref().to_vec()))
    }
    fn output_len(&self) -> usize {
        16
    }
}
