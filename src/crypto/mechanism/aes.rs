//! AES block modes: GCM (one shot), CBC with PKCS#7 padding, CBC and ECB without padding
//! (whole blocks), CTR (a stream). Parameters are parsed here and each mode's engine is built
//! here; the engines themselves run in `crypto::aes` (aws-lc-rs) and `crypto::pkey` (raw EVP).

use super::{
    param_invalid, take_param, Collected, Engine, Family, GcmParams, Mechanism, OneShot, RawParam,
    SecretCipher,
};
use crate::crypto::aes::{gcm_open, gcm_seal, gcm_seal_into, CbcDecrypt, CbcEncrypt};
use crate::crypto::pkey::{AesMode, EvpStream};
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use cryptoki_sys::*;
use std::sync::Arc;

fn boxed<C: SecretCipher + 'static>(c: Result<C>) -> Engine {
    Some(c.map(|c| Box::new(c) as Box<dyn SecretCipher>))
}

fn iv16(param: RawParam, what: &str) -> Result<[u8; 16]> {
    let RawParam::Bytes(iv) = param else {
        return Err(param_invalid(format!("{what} needs a 16-byte IV")));
    };
    iv.as_slice()
        .try_into()
        .map_err(|_| param_invalid(format!("{what} IV must be 16 bytes")))
}

pub struct Gcm;

impl Family for Gcm {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        take_param!(param => Gcm { iv, aad, tag_bits }, "CK_GCM_PARAMS");
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

    fn cipher(&self, m: &Mechanism, key: Arc<SecretBytes>, encrypt: bool) -> Engine {
        let Mechanism::AesGcm(p) = m else { return None };
        // GCM decryption must see the tag before releasing plaintext: one shot.
        let gcm = GcmOneShot {
            key,
            p: p.clone(),
            encrypt,
        };
        boxed(Ok(Collected::new(gcm)))
    }
}

/// One AES-GCM operation: the token key (with its cached expanded key) and the parameters.
struct GcmOneShot {
    key: Arc<SecretBytes>,
    p: GcmParams,
    encrypt: bool,
}

impl OneShot for GcmOneShot {
    fn run(&mut self, input: &[u8]) -> Result<Wiped> {
        if self.encrypt {
            gcm_seal(&*self.key, &self.p, input).map(Wiped::new)
        } else {
            gcm_open(&*self.key, &self.p, input)
        }
    }
    fn grows_by(&self) -> Option<usize> {
        self.encrypt.then_some(self.p.tag_bits / 8)
    }
    fn run_into(&mut self, input: &[u8], out: &mut [u8]) -> Option<Result<usize>> {
        self.encrypt
            .then(|| gcm_seal_into(&*self.key, &self.p, input, out))
    }
}

/// AES-CBC with PKCS#7 padding (CKM_AES_CBC_PAD, AWS-LC's streaming CBC) and without
/// (CKM_AES_CBC, whole blocks over a raw EVP stream).
pub struct Cbc;

impl Family for Cbc {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        Ok(if ckm == CKM_AES_CBC_PAD {
            Mechanism::AesCbcPad(iv16(param, "AES-CBC-PAD")?)
        } else {
            Mechanism::AesCbc(iv16(param, "AES-CBC")?)
        })
    }

    fn cipher(&self, m: &Mechanism, key: Arc<SecretBytes>, encrypt: bool) -> Engine {
        match (m, encrypt) {
            (Mechanism::AesCbcPad(iv), true) => boxed(CbcEncrypt::new(key.as_slice(), *iv)),
            (Mechanism::AesCbcPad(iv), false) => boxed(CbcDecrypt::new(key.as_slice(), *iv)),
            (Mechanism::AesCbc(iv), _) => {
                boxed(EvpStream::new(AesMode::Cbc, key.as_slice(), Some(iv), encrypt).map(Raw))
            }
            _ => None,
        }
    }
}

/// A raw EVP stream as a `SecretCipher`.
struct Raw(EvpStream);

impl SecretCipher for Raw {
    fn update(&mut self, input: &[u8]) -> Result<Wiped> {
        self.0.update(input)
    }
    fn finish(&mut self) -> Result<Wiped> {
        self.0.finish()
    }
}

pub struct Ecb;

impl Family for Ecb {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        super::no_param(ckm, &param)?;
        Ok(Mechanism::AesEcb)
    }

    fn cipher(&self, m: &Mechanism, key: Arc<SecretBytes>, encrypt: bool) -> Engine {
        if *m != Mechanism::AesEcb {
            return None;
        }
        boxed(EvpStream::new(AesMode::Ecb, key.as_slice(), None, encrypt).map(Raw))
    }
}

pub struct Ctr;

impl Family for Ctr {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        take_param!(param => Ctr { counter_bits, block }, "CK_AES_CTR_PARAMS");
        if !(1..=128).contains(&counter_bits) {
            return Err(param_invalid(format!(
                "AES-CTR ulCounterBits must be 1..128, got {counter_bits}"
            )));
        }
        Ok(Mechanism::AesCtr {
            iv: block,
            counter_bits: counter_bits as usize,
        })
    }

    fn cipher(&self, m: &Mechanism, key: Arc<SecretBytes>, encrypt: bool) -> Engine {
        let Mechanism::AesCtr { iv, counter_bits } = m else {
            return None;
        };
        // The engine counts with all 128 bits; PKCS#11 counts with the low `counter_bits`
        // only, so a counter that would wrap inside them is refused instead of carrying into
        // the nonce bits.
        let blocks_left = if *counter_bits >= 64 {
            u64::MAX
        } else {
            let low = u128::from_be_bytes(*iv) & ((1u128 << counter_bits) - 1);
            ((1u128 << counter_bits) - low) as u64
        };
        boxed(
            EvpStream::new(AesMode::Ctr, key.as_slice(), Some(iv), encrypt).map(|s| CtrStream {
                s,
                bytes: 0,
                blocks_left,
            }),
        )
    }
}

struct CtrStream {
    s: EvpStream,
    bytes: u64,
    blocks_left: u64,
}

impl SecretCipher for CtrStream {
    fn update(&mut self, input: &[u8]) -> Result<Wiped> {
        let bytes = self.bytes.saturating_add(input.len() as u64);
        if bytes.div_ceil(16) > self.blocks_left {
            return Err(Error::new(
                CKR_DATA_LEN_RANGE,
                "AES-CTR: the counter would wrap within ulCounterBits",
            ));
        }
        self.bytes = bytes;
        self.s.update(input)
    }
    fn finish(&mut self) -> Result<Wiped> {
        self.s.finish()
    }
}
