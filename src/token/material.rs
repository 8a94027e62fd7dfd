//! Session objects from checked attributes and their key material: C_CreateObject builds the
//! material from the template (a public key from its modulus / point, a secret key's value
//! into locked memory); generation and unwrap hand in what the mechanism made.

use super::attr::der_octet_string;
use super::factory::{self, new_object, ulong_bytes, Attrs, Origin, Template};
use super::object::{new_object_handle, Body, Object, Stored};
use crate::crypto::ops::AsymKey;
use crate::crypto::pkey::{Curve, PublicParts};
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use cryptoki_sys::*;
use std::sync::Arc;

fn value_invalid(msg: impl Into<String>) -> Error {
    Error::new(CKR_ATTRIBUTE_VALUE_INVALID, msg.into())
}

/// DER: tag, length, content.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else if n < 0x10000 {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    } else {
        out.extend_from_slice(&[0x83, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

/// DER INTEGER of a big-endian unsigned value.
fn der_uint(be: &[u8]) -> Vec<u8> {
    let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
    let mut v = be[first..].to_vec();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    tlv(0x02, &v)
}

const RSA_ALG: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

fn spki(alg: &[u8], key: &[u8]) -> Vec<u8> {
    let mut bits = vec![0u8];
    bits.extend_from_slice(key);
    let mut body = alg.to_vec();
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

/// The public key a C_CreateObject template describes.
fn public_key(attrs: &Attrs) -> Result<AsymKey> {
    let get = |ty| attrs.get(&ty).map(Vec::as_slice).unwrap_or_default();
    match factory::ulong(attrs, CKA_KEY_TYPE) {
        Some(CKK_RSA) => {
            let mut seq = der_uint(get(CKA_MODULUS));
            seq.extend(der_uint(get(CKA_PUBLIC_EXPONENT)));
            let der = spki(RSA_ALG, &tlv(0x30, &seq));
            AsymKey::from_spki(&der)
                .map_err(|_| value_invalid("CKA_MODULUS / CKA_PUBLIC_EXPONENT are not an RSA key"))
        }
        Some(CKK_EC) => {
            let params = get(CKA_EC_PARAMS);
            if Curve::from_params_der(params).is_none() {
                return Err(value_invalid(
                    "CKA_EC_PARAMS must name P-256, P-384 or P-521 (DER namedCurve OID)",
                ));
            }
            let mut alg = EC_PUBLIC_KEY_OID.to_vec();
            alg.extend_from_slice(params);
            let alg = tlv(0x30, &alg);
            let point = get(CKA_EC_POINT);
            // CKA_EC_POINT is a DER OCTET STRING; some callers pass the raw point.
            let unwrapped = der_octet_content(point);
            unwrapped
                .and_then(|p| AsymKey::from_spki(&spki(&alg, p)).ok())
                .or_else(|| AsymKey::from_spki(&spki(&alg, point)).ok())
                .ok_or_else(|| value_invalid("CKA_EC_POINT is not a point on the curve"))
        }
        _ => Err(value_invalid("public keys are RSA or EC")),
    }
}

/// The private components of a C_CreateObject template (taken out of the stored attributes and
/// wiped), as the PKCS#8 PrivateKeyInfo AWS-LC parses into the locked arena.
fn private_key(attrs: &mut Attrs) -> Result<AsymKey> {
    fn take(attrs: &mut Attrs, ty: CK_ATTRIBUTE_TYPE) -> zeroize::Zeroizing<Vec<u8>> {
        zeroize::Zeroizing::new(attrs.remove(&ty).unwrap_or_default())
    }
    let key_type = factory::ulong(attrs, CKA_KEY_TYPE);
    let pkcs8 = match key_type {
        Some(CKK_RSA) => {
            // RSAPrivateKey (RFC 8017 A.1.2): version 0, n, e, d, p, q, dP, dQ, qInv.
            let mut seq = zeroize::Zeroizing::new(der_uint(&[0]));
            let n = attrs.get(&CKA_MODULUS).cloned().unwrap_or_default();
            let e = attrs.get(&CKA_PUBLIC_EXPONENT).cloned().unwrap_or_default();
            seq.extend(der_uint(&n));
            seq.extend(der_uint(&e));
            for ty in [
                CKA_PRIVATE_EXPONENT,
                CKA_PRIME_1,
                CKA_PRIME_2,
                CKA_EXPONENT_1,
                CKA_EXPONENT_2,
                CKA_COEFFICIENT,
            ] {
                let v = take(attrs, ty);
                let mut int = der_uint(&v);
                seq.extend_from_slice(&int);
                crate::secret::wipe(&mut int);
            }
            let mut inner = zeroize::Zeroizing::new(tlv(0x30, &seq));
            let mut body = der_uint(&[0]);
            body.extend_from_slice(RSA_ALG);
            body.extend(tlv(0x04, &inner));
            crate::secret::wipe(&mut inner);
            zeroize::Zeroizing::new(tlv(0x30, &body))
        }
        Some(CKK_EC) => {
            let params = attrs.get(&CKA_EC_PARAMS).cloned().unwrap_or_default();
            let curve = Curve::from_params_der(&params).ok_or_else(|| {
                value_invalid("CKA_EC_PARAMS must name P-256, P-384 or P-521 (DER namedCurve OID)")
            })?;
            let d = take(attrs, CKA_VALUE);
            if d.is_empty() || d.len() > curve.field_len() {
                return Err(value_invalid(
                    "CKA_VALUE is not a private scalar of the curve",
                ));
            }
            // ECPrivateKey (RFC 5915) without the public key: AWS-LC computes it.
            let mut scalar = zeroize::Zeroizing::new(vec![0u8; curve.field_len() - d.len()]);
            scalar.extend_from_slice(&d);
            let mut ec = zeroize::Zeroizing::new(der_uint(&[1]));
            ec.extend(tlv(0x04, &scalar));
            let mut alg = EC_PUBLIC_KEY_OID.to_vec();
            alg.extend_from_slice(&params);
            let mut body = der_uint(&[0]);
            body.extend(tlv(0x30, &alg));
            let mut inner = tlv(0x30, &ec);
            body.extend(tlv(0x04, &inner));
            crate::secret::wipe(&mut inner);
            zeroize::Zeroizing::new(tlv(0x30, &body))
        }
        _ => return Err(value_invalid("private keys are RSA or EC")),
    };
    let k = AsymKey::from_pkcs8(&pkcs8)
        .map_err(|_| value_invalid("the private key components do not form a valid key"))?;
    // A key whose public half contradicts the template (another modulus) is inconsistent.
    if let (
        PublicParts::Rsa {
            modulus, exponent, ..
        },
        Some(n),
        Some(e),
    ) = (
        &k.info.parts,
        attrs.get(&CKA_MODULUS),
        attrs.get(&CKA_PUBLIC_EXPONENT),
    ) {
        let strip = |v: &[u8]| {
            v.iter()
                .skip_while(|b| **b == 0)
                .copied()
                .collect::<Vec<u8>>()
        };
        if strip(modulus) != strip(n) || strip(exponent) != strip(e) {
            return Err(Error::new(
                CKR_TEMPLATE_INCONSISTENT,
                "the private key does not match CKA_MODULUS / CKA_PUBLIC_EXPONENT",
            ));
        }
    }
    Ok(k)
}

/// The content of a DER OCTET STRING that spans all of `b`.
fn der_octet_content(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 2 || b[0] != 0x04 {
        return None;
    }
    let (len, off) = match b[1] {
        n if n < 0x80 => (n as usize, 2),
        0x81 if b.len() > 2 => (b[2] as usize, 3),
        0x82 if b.len() > 3 => (((b[2] as usize) << 8) | b[3] as usize, 4),
        _ => return None,
    };
    (off + len == b.len()).then(|| &b[off..])
}

/// The attributes a key's public half implies.
pub fn public_attrs(k: &AsymKey, private: bool) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let mut v = vec![(CKA_PUBLIC_KEY_INFO, k.info.spki_der.clone())];
    match &k.info.parts {
        PublicParts::Rsa {
            modulus,
            exponent,
            bits,
        } => {
            v.push((CKA_MODULUS, modulus.clone()));
            v.push((CKA_PUBLIC_EXPONENT, exponent.clone()));
            if !private {
                v.push((CKA_MODULUS_BITS, ulong_bytes(*bits as CK_ULONG)));
            }
        }
        PublicParts::Ec { curve, point } => {
            v.push((CKA_EC_PARAMS, curve.ec_params_der().to_vec()));
            if !private {
                v.push((CKA_EC_POINT, der_octet_string(point)));
            }
        }
    }
    v
}

/// Check a secret value's length against its key type.
pub fn check_secret_len(key_type: CK_KEY_TYPE, len: usize, code: CK_RV) -> Result<()> {
    let ok = match key_type {
        CKK_AES => [16, 24, 32].contains(&len),
        _ => (1..=512).contains(&len),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            code,
            format!("a key of type {key_type:#x} cannot be {len} bytes (AES: 16, 24, 32; generic secret: 1..512)"),
        ))
    }
}

/// CKA_CHECK_VALUE of a secret key: the first 3 bytes of AES-ECB(key, 0¹²⁸) for AES (PKCS#11
/// 3.0 §6.7), none for a generic secret.
fn check_value(key_type: CK_KEY_TYPE, key: &SecretBytes) -> Result<Vec<u8>> {
    if key_type != CKK_AES {
        return Ok(vec![]);
    }
    let mut s = crate::crypto::pkey::EvpStream::new(
        crate::crypto::pkey::AesMode::Ecb,
        key.as_slice(),
        None,
        true,
    )?;
    let block = s.update(&[0u8; 16])?;
    Ok(block[..3].to_vec())
}

fn object(owner: CK_SESSION_HANDLE, attrs: Attrs, body: Body) -> Object {
    let label = String::from_utf8_lossy(attrs.get(&CKA_LABEL).map_or(&[][..], |v| v)).into_owned();
    let id = attrs.get(&CKA_ID).cloned().unwrap_or_default();
    Object {
        handle: new_object_handle(),
        id,
        label,
        key_index: None,
        subject: attrs.get(&CKA_SUBJECT).cloned().unwrap_or_default(),
        body,
        stored: Some(Stored { owner, attrs }),
    }
}

/// C_CreateObject.
pub fn create(owner: CK_SESSION_HANDLE, template: &Template) -> Result<Object> {
    let mut attrs = new_object(Origin::Create, template, &[], None)?;
    let class = factory::ulong(&attrs, CKA_CLASS).unwrap_or(CKO_DATA);
    let body = match class {
        CKO_SECRET_KEY => {
            let key_type = factory::ulong(&attrs, CKA_KEY_TYPE).unwrap_or(CKK_AES);
            let mut value = attrs.remove(&CKA_VALUE).unwrap_or_default();
            let secret = SecretBytes::in_arena_from(&value);
            crate::secret::wipe(&mut value);
            check_secret_len(key_type, secret.len(), CKR_ATTRIBUTE_VALUE_INVALID)?;
            finish_secret(&mut attrs, key_type, &secret)?;
            Body::SecretKey(Arc::new(secret))
        }
        CKO_PUBLIC_KEY => {
            let k = public_key(&attrs)?;
            for (ty, v) in public_attrs(&k, false) {
                attrs.entry(ty).or_insert(v);
            }
            Body::PublicKey(Arc::new(k))
        }
        CKO_PRIVATE_KEY => {
            let k = Arc::new(private_key(&mut attrs)?);
            return Ok(asym_key(owner, attrs, k));
        }
        _ => Body::Stored,
    };
    Ok(object(owner, attrs, body))
}

/// The stored attributes a secret value implies (length, check value), checked against what
/// the caller gave.
fn finish_secret(attrs: &mut Attrs, key_type: CK_KEY_TYPE, secret: &SecretBytes) -> Result<()> {
    if let Some(len) = factory::ulong(attrs, CKA_VALUE_LEN) {
        if len as usize != secret.len() {
            return Err(Error::new(
                CKR_TEMPLATE_INCONSISTENT,
                format!("CKA_VALUE_LEN {len} but the key is {} bytes", secret.len()),
            ));
        }
    }
    attrs.remove(&CKA_VALUE_LEN);
    let cv = check_value(key_type, secret)?;
    match attrs.get(&CKA_CHECK_VALUE) {
        Some(given) if !given.is_empty() && *given != cv => {
            return Err(value_invalid("CKA_CHECK_VALUE does not match the key"))
        }
        Some(given) if given.is_empty() => {}
        _ => {
            attrs.insert(CKA_CHECK_VALUE, cv);
        }
    }
    Ok(())
}

/// A secret key made by a mechanism (C_GenerateKey, C_UnwrapKey, C_DeriveKey): `attrs` were
/// checked by `factory::new_object` for `origin`.
pub fn secret_key(
    owner: CK_SESSION_HANDLE,
    mut attrs: Attrs,
    secret: SecretBytes,
) -> Result<Object> {
    let key_type = factory::ulong(&attrs, CKA_KEY_TYPE).unwrap_or(CKK_GENERIC_SECRET);
    check_secret_len(key_type, secret.len(), CKR_TEMPLATE_INCONSISTENT)?;
    finish_secret(&mut attrs, key_type, &secret)?;
    Ok(object(owner, attrs, Body::SecretKey(Arc::new(secret))))
}

/// A public or private key made by a mechanism; its public attributes are added.
pub fn asym_key(owner: CK_SESSION_HANDLE, mut attrs: Attrs, key: Arc<AsymKey>) -> Object {
    let private = key.evp.is_private();
    for (ty, v) in public_attrs(&key, private) {
        attrs.insert(ty, v);
    }
    let body = if private {
        Body::PrivateKey {
            key,
            allow_rsa_pkcs_decrypt: true,
        }
    } else {
        Body::PublicKey(key)
    };
    object(owner, attrs, body)
}

/// A session object with new attributes (C_SetAttributeValue keeps the handle; C_CopyObject
/// takes a new one and the copier's session as owner).
pub fn with_attrs(o: &Object, attrs: Attrs, copy_to: Option<CK_SESSION_HANDLE>) -> Object {
    let owner = copy_to.or(o.owner()).unwrap_or(0);
    let mut n = object(owner, attrs, o.body.clone());
    if copy_to.is_none() {
        n.handle = o.handle;
    }
    n
}

/// The checked attributes for a new key of `origin` (class and key type implied by the
/// mechanism or the wrapped key).
pub fn key_attrs(
    origin: Origin,
    template: &Template,
    class: CK_OBJECT_CLASS,
    key_type: Option<CK_KEY_TYPE>,
    mechanism: Option<CK_MECHANISM_TYPE>,
) -> Result<Attrs> {
    let mut implied = vec![(CKA_CLASS, ulong_bytes(class))];
    if let Some(kt) = key_type {
        implied.push((CKA_KEY_TYPE, ulong_bytes(kt)));
    }
    new_object(origin, template, &implied, mechanism)
}
