//! CKM_ECDH1_DERIVE: ECDH (the x-coordinate Z, RFC 5903 / SEC 1 §3.3.1) with no KDF (CKD_NULL:
//! the key is the leading bytes of Z) or the ANSI X9.63 KDF over SHA-1 / SHA-2
//! (CKD_SHA*_KDF: Hash(Z ‖ counter ‖ shared info), counter from 1, concatenated).

use super::{param_invalid, take_param, EcdhParams, Family, Mechanism, RawParam};
use crate::crypto::ops::AsymKey;
use crate::crypto::{HashAlg, Hasher};
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use cryptoki_sys::*;

pub struct Ecdh;

/// The peer point: CKA_EC_POINT form (DER OCTET STRING) or the raw point.
fn raw_point(p: &[u8]) -> &[u8] {
    let (len, off) = match p {
        [0x04, n, ..] if *n < 0x80 => (*n as usize, 2),
        [0x04, 0x81, n, ..] => (*n as usize, 3),
        _ => return p,
    };
    if off + len == p.len() && matches!(p.get(off), Some(0x02..=0x04)) {
        &p[off..]
    } else {
        p
    }
}

impl Family for Ecdh {
    fn parse(&self, _ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        take_param!(param => Ecdh { kdf, shared, public }, "CK_ECDH1_DERIVE_PARAMS");
        let kdf = match kdf {
            CKD_NULL => None,
            CKD_SHA1_KDF => Some(HashAlg::Sha1),
            CKD_SHA224_KDF => Some(HashAlg::Sha224),
            CKD_SHA256_KDF => Some(HashAlg::Sha256),
            CKD_SHA384_KDF => Some(HashAlg::Sha384),
            CKD_SHA512_KDF => Some(HashAlg::Sha512),
            k => return Err(param_invalid(format!("ECDH KDF {k:#x} is not supported"))),
        };
        if kdf.is_none() && !shared.is_empty() {
            return Err(param_invalid("CKD_NULL takes no shared data"));
        }
        if public.is_empty() {
            return Err(param_invalid("ECDH needs the other party's public point"));
        }
        Ok(Mechanism::Ecdh(EcdhParams {
            kdf,
            shared,
            public: raw_point(&public).to_vec(),
        }))
    }

    fn derive(&self, m: &Mechanism, base: &AsymKey, len: usize) -> Option<Result<SecretBytes>> {
        let Mechanism::Ecdh(p) = m else { return None };
        Some(derive(p, base, len))
    }
}

fn derive(p: &EcdhParams, base: &AsymKey, len: usize) -> Result<SecretBytes> {
    let z = base.evp.ecdh(&p.public)?;
    let mut out = SecretBytes::in_arena(len);
    match p.kdf {
        None => {
            if len > z.len() {
                return Err(Error::new(
                    CKR_TEMPLATE_INCONSISTENT,
                    format!("CKD_NULL gives {} bytes, {len} asked", z.len()),
                ));
            }
            out.as_mut_slice().copy_from_slice(&z.as_slice()[..len]);
        }
        Some(h) => {
            let mut filled = 0;
            let mut counter: u32 = 1;
            while filled < len {
                let mut hasher = Hasher::new(h);
                hasher.update(z.as_slice());
                hasher.update(&counter.to_be_bytes());
                hasher.update(&p.shared);
                let mut block = crate::secret::Wiped::new(hasher.finish());
                let n = block.len().min(len - filled);
                out.as_mut_slice()[filled..filled + n].copy_from_slice(&block[..n]);
                crate::secret::wipe(&mut block);
                filled += n;
                counter += 1;
            }
        }
    }
    Ok(out)
}
