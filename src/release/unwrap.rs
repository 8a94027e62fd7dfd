//! `key_hsm` → released key material (skr-protocol §3): RSA-OAEP with the transfer key gives
//! an AES KEK, AES key wrap with padding (RFC 5649) under that KEK gives the key material, then
//! the material is checked against the public key that `GET {kid}` returned.

use super::b64url_decode;
use super::transfer_key::{strip_leading_zeros, OaepHash, TransferKey};
use super::KeyMaterial;
use crate::crypto::check;
use crate::crypto::keywrap::{self, UnwrapError};
use crate::error::{Error, Result, Step};
use crate::secret::SecretBytes;
use serde_json::Value;

/// The `enc` of a release (`KeyEncryptionAlgorithm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrapAlg {
    CkmRsaAesKeyWrap,
    RsaAesKeyWrap256,
    RsaAesKeyWrap384,
}

impl WrapAlg {
    pub fn from_name(name: &str) -> Option<WrapAlg> {
        Some(match name {
            "CKM_RSA_AES_KEY_WRAP" => WrapAlg::CkmRsaAesKeyWrap,
            "RSA_AES_KEY_WRAP_256" => WrapAlg::RsaAesKeyWrap256,
            "RSA_AES_KEY_WRAP_384" => WrapAlg::RsaAesKeyWrap384,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            WrapAlg::CkmRsaAesKeyWrap => "CKM_RSA_AES_KEY_WRAP",
            WrapAlg::RsaAesKeyWrap256 => "RSA_AES_KEY_WRAP_256",
            WrapAlg::RsaAesKeyWrap384 => "RSA_AES_KEY_WRAP_384",
        }
    }
    /// Only the OAEP/MGF1 hash differs between the three (skr-protocol §3.3).
    pub fn oaep_hash(self) -> OaepHash {
        match self {
            WrapAlg::CkmRsaAesKeyWrap => OaepHash::Sha1,
            WrapAlg::RsaAesKeyWrap256 => OaepHash::Sha256,
            WrapAlg::RsaAesKeyWrap384 => OaepHash::Sha384,
        }
    }
}

/// The decoded `key_hsm` envelope.
pub struct KeyHsm {
    pub kid: String,
    pub enc: String,
    pub ciphertext: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::integrity(Step::Unwrap, msg)
}

/// Decode `key_hsm` (base64url of JSON; members in any order, so parsed as JSON).
pub fn parse_key_hsm(key_hsm: &str) -> Result<KeyHsm> {
    let json = b64url_decode(key_hsm).ok_or_else(|| bad("key_hsm is not base64url"))?;
    let v: Value =
        serde_json::from_slice(&json).map_err(|e| bad(format!("key_hsm is not JSON: {e}")))?;
    let header = v
        .get("header")
        .ok_or_else(|| bad("key_hsm has no header"))?;
    let text = |obj: &Value, name: &str| -> Result<String> {
        obj.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(format!("key_hsm lacks {name}")))
    };
    let ciphertext = b64url_decode(&text(&v, "ciphertext")?)
        .ok_or_else(|| bad("key_hsm ciphertext is not base64url"))?;
    Ok(KeyHsm {
        kid: text(header, "kid")?,
        enc: text(header, "enc")?,
        ciphertext,
    })
}

/// Unwrap `key_hsm` with the transfer key; the KEK lives only in locked memory and is wiped on
/// return. The result is the raw key material (PKCS#8 DER or raw symmetric bytes).
pub fn unwrap_key_hsm(
    key_hsm: &KeyHsm,
    transfer: &dyn TransferKey,
    expected: WrapAlg,
) -> Result<SecretBytes> {
    let ours = &transfer.public_jwk().kid;
    if &key_hsm.kid != ours {
        return Err(bad(format!(
            "key_hsm is wrapped to key {:?}, not to this login's transfer key {:?}",
            key_hsm.kid, ours
        ))
        .with_hint("AKV wrapped to a key other than the one in the attestation token; check that nothing rewrites the MAA token between the module and AKV"));
    }
    if key_hsm.enc != expected.name() {
        return Err(bad(format!(
            "key_hsm enc {:?} differs from the requested {}",
            key_hsm.enc,
            expected.name()
        )));
    }
    let k = transfer.modulus_len();
    // The KWP part is at least two 8-byte semiblocks.
    if key_hsm.ciphertext.len() < k + 16 || !(key_hsm.ciphertext.len() - k).is_multiple_of(8) {
        return Err(bad(format!(
            "key_hsm ciphertext has {} bytes; expected {k} bytes of RSA-OAEP then a multiple of 8 (at least 16) of AES key wrap",
            key_hsm.ciphertext.len()
        )));
    }
    let (oaep_block, wrapped) = key_hsm.ciphertext.split_at(k);
    let kek = transfer.decrypt_oaep(expected.oaep_hash(), oaep_block)?;
    aes_kwp_unwrap(kek.as_slice(), wrapped)
}

/// AES key unwrap with padding (RFC 5649) of the released key under the KEK, into locked
/// memory (`crypto::keywrap`).
pub fn aes_kwp_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<SecretBytes> {
    keywrap::aes_kwp_unwrap(kek, wrapped).map_err(|e| match e {
        UnwrapError::KekLength(n) => bad(format!(
            "the RSA-OAEP block decrypts to {n} bytes, not an AES key (16, 24 or 32)"
        )),
        UnwrapError::Integrity => {
            bad("AES key unwrap (RFC 5649) failed: integrity check of the wrapped key did not pass")
        }
    })
}

/// The public half of a key as `GET {kid}` returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKeyInfo {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ec {
        crv: String,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    /// Symmetric: the service returns no material; `key_size` in bits when present.
    Oct {
        key_size: Option<usize>,
    },
}

impl PublicKeyInfo {
    /// Read the JWK of a `KeyBundle` (`kty` with or without `-HSM`).
    pub fn from_jwk(jwk: &Value) -> std::result::Result<PublicKeyInfo, String> {
        let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or_default();
        let field = |name: &str| -> std::result::Result<Vec<u8>, String> {
            jwk.get(name)
                .and_then(Value::as_str)
                .and_then(b64url_decode)
                .ok_or_else(|| format!("{kty} key has no base64url {name}"))
        };
        match kty.strip_suffix("-HSM").unwrap_or(kty) {
            "RSA" => Ok(PublicKeyInfo::Rsa {
                n: strip_leading_zeros(&field("n")?).to_vec(),
                // AKV may send e with a leading zero byte ("AAEAAQ").
                e: strip_leading_zeros(&field("e")?).to_vec(),
            }),
            "EC" => Ok(PublicKeyInfo::Ec {
                crv: jwk
                    .get("crv")
                    .and_then(Value::as_str)
                    .ok_or("EC key has no crv")?
                    .to_string(),
                x: field("x")?,
                y: field("y")?,
            }),
            "oct" => Ok(PublicKeyInfo::Oct {
                key_size: jwk
                    .get("key_size")
                    .and_then(Value::as_u64)
                    .map(|b| b as usize),
            }),
            other => Err(format!("unsupported key type {other:?}")),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PublicKeyInfo::Rsa { .. } => "RSA",
            PublicKeyInfo::Ec { .. } => "EC",
            PublicKeyInfo::Oct { .. } => "oct",
        }
    }
}

/// Check the released material against the public key and wrap it in the right form.
/// `label` names the key in messages; no key bytes ever appear in them.
pub fn check_material(
    label: &str,
    material: SecretBytes,
    public: &PublicKeyInfo,
) -> Result<KeyMaterial> {
    let mismatch = |what: &str| {
        Error::integrity(
            Step::Unwrap,
            format!("released key {label:?}: {what}"),
        )
        .with_hint("the released private key does not belong to the key the vault describes; do not use this vault response")
    };
    match public {
        PublicKeyInfo::Rsa { n, e } => {
            let (modulus, exponent) = check::rsa_public_of_pkcs8(material.as_slice())
                .map_err(|e| mismatch(&format!("not a valid PKCS#8 RSA private key ({e})")))?;
            if modulus != n.as_slice() || exponent != e.as_slice() {
                return Err(mismatch(
                    "RSA modulus/exponent differ from the public key of GET {kid}",
                ));
            }
            Ok(KeyMaterial::Pkcs8(material))
        }
        PublicKeyInfo::Ec { crv, x, y } => {
            let point =
                check::ec_public_point_of_pkcs8(crv, material.as_slice()).map_err(|e| match e {
                    check::PublicHalfError::UnsupportedCurve => {
                        mismatch(&format!("unsupported curve {crv:?}"))
                    }
                    check::PublicHalfError::Invalid(e) => {
                        mismatch(&format!("not a valid PKCS#8 {crv} private key ({e})"))
                    }
                })?;
            let point = point.as_slice();
            let clen = (point.len().saturating_sub(1)) / 2;
            let pad = |c: &[u8]| {
                let mut v = vec![0u8; clen.saturating_sub(c.len())];
                v.extend_from_slice(c);
                v
            };
            if point.first() != Some(&4)
                || point[1..1 + clen] != pad(x)[..]
                || point[1 + clen..] != pad(y)[..]
            {
                return Err(mismatch(
                    "EC public point differs from the public key of GET {kid}",
                ));
            }
            Ok(KeyMaterial::Pkcs8(material))
        }
        PublicKeyInfo::Oct { key_size } => {
            let bits = material.len() * 8;
            let ok = match key_size {
                Some(k) => *k == bits,
                None => matches!(material.len(), 16 | 24 | 32),
            };
            if !ok {
                return Err(mismatch(&format!(
                    "symmetric key of {bits} bits, expected {}",
                    key_size.map_or("128, 192 or 256".to_string(), |k| k.to_string())
                )));
            }
            Ok(KeyMaterial::Raw(material))
        }
    }
}

#[cfg(test)]
mod tests;
