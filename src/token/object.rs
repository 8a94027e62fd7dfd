//! Token objects and their attributes (pkcs11-clients.md §5). Objects are immutable; a login
//! adds a new set (fresh handles), a logout drops it. Handles come from one process-wide
//! counter and are never reused.

use super::attr::{bool_attr, bytes_attr, ck_date, der_octet_string, ulong_attr, Attr};
use crate::crypto::mechanism::{lookup, mechanisms};
use crate::crypto::ops::AsymKey;
use crate::crypto::pkey::PublicParts;
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use cryptoki_sys::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use x509_cert::der::{Decode, Encode};

static NEXT_OBJECT_HANDLE: AtomicU64 = AtomicU64::new(1);

pub fn new_object_handle() -> CK_OBJECT_HANDLE {
    NEXT_OBJECT_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_OBJECT_HANDLE
}

/// The parsed fields of an X.509 certificate the attributes need.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
    /// DER INTEGER of the serial number.
    pub serial: Vec<u8>,
    pub spki: Vec<u8>,
    pub not_before: Vec<u8>,
    pub not_after: Vec<u8>,
    /// CK_CERTIFICATE_CATEGORY: 1 = token user (leaf), 2 = authority (chain).
    pub category: CK_ULONG,
}

impl CertInfo {
    pub fn from_der(der: &[u8], category: CK_ULONG) -> Result<CertInfo> {
        let c = x509_cert::Certificate::from_der(der)
            .map_err(|e| Error::config(format!("not an X.509 certificate: {e}")))?;
        let enc = |r: std::result::Result<Vec<u8>, x509_cert::der::Error>| {
            r.map_err(|e| Error::config(format!("cannot re-encode certificate field: {e}")))
        };
        let tbs = &c.tbs_certificate;
        let date = |t: &x509_cert::time::Time| {
            let d = t.to_date_time();
            ck_date(d.year(), d.month(), d.day())
        };
        Ok(CertInfo {
            der: der.to_vec(),
            subject: enc(tbs.subject.to_der())?,
            issuer: enc(tbs.issuer.to_der())?,
            serial: enc(tbs.serial_number.to_der())?,
            spki: enc(tbs.subject_public_key_info.to_der())?,
            not_before: date(&tbs.validity.not_before),
            not_after: date(&tbs.validity.not_after),
            category,
        })
    }

    /// Every certificate of a PEM file, leaf first.
    pub fn chain_from_pem(pem: &[u8]) -> Result<Vec<CertInfo>> {
        let certs = crate::pem::certificates(pem)
            .map_err(|e| Error::config(format!("not a PEM certificate chain: {e}")))?;
        certs
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let category = if i == 0 {
                    CK_CERTIFICATE_CATEGORY_TOKEN_USER
                } else {
                    CK_CERTIFICATE_CATEGORY_AUTHORITY
                };
                CertInfo::from_der(der, category).map_err(|e| {
                    Error::config(format!(
                        "certificate {} of the file: {}",
                        i + 1,
                        e.message()
                    ))
                })
            })
            .collect()
    }
}

pub enum Body {
    Certificate(CertInfo),
    PublicKey(Arc<AsymKey>),
    PrivateKey {
        key: Arc<AsymKey>,
        allow_rsa_pkcs_decrypt: bool,
    },
    SecretKey(Arc<SecretBytes>),
}

pub struct Object {
    pub handle: CK_OBJECT_HANDLE,
    pub id: Vec<u8>,
    pub label: String,
    /// Index of the configured key this object belongs to (None for chain certificates).
    pub key_index: Option<usize>,
    /// Subject of the key's leaf certificate (CKA_SUBJECT of its keys), empty without one.
    pub subject: Vec<u8>,
    pub body: Body,
}

impl Object {
    pub fn class(&self) -> CK_OBJECT_CLASS {
        match self.body {
            Body::Certificate(_) => CKO_CERTIFICATE,
            Body::PublicKey(_) => CKO_PUBLIC_KEY,
            Body::PrivateKey { .. } => CKO_PRIVATE_KEY,
            Body::SecretKey(_) => CKO_SECRET_KEY,
        }
    }

    /// CKA_PRIVATE: private and secret keys are visible only to a logged-in user.
    pub fn is_private(&self) -> bool {
        matches!(self.body, Body::PrivateKey { .. } | Body::SecretKey(_))
    }

    fn asym(&self) -> Option<&AsymKey> {
        match &self.body {
            Body::PublicKey(k) | Body::PrivateKey { key: k, .. } => Some(k),
            _ => None,
        }
    }

    /// Mechanisms this key can be used with (CKA_ALLOWED_MECHANISMS).
    pub fn allowed_mechanisms(&self) -> Vec<CK_MECHANISM_TYPE> {
        mechanisms()
            .iter()
            .map(|i| i.ckm)
            .filter(|&m| self.allows(m))
            .collect()
    }

    /// Whether `m` is in `allowed_mechanisms()`, without building the list (every C_*Init
    /// asks).
    pub fn allows(&self, m: CK_MECHANISM_TYPE) -> bool {
        let key_type = match &self.body {
            Body::PublicKey(k) | Body::PrivateKey { key: k, .. } if k.info.is_rsa() => CKK_RSA,
            Body::PublicKey(_) | Body::PrivateKey { .. } => CKK_EC,
            Body::SecretKey(_) => CKK_AES,
            Body::Certificate(_) => return false,
        };
        // CKM_RSA_PKCS stays listed for signing even when its decryption is refused.
        lookup(m).is_some_and(|i| i.key == Some(key_type))
    }

    pub fn attribute(&self, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        // Common to every object.
        match ty {
            CKA_CLASS => return ulong_attr(self.class()),
            CKA_TOKEN => return bool_attr(true),
            CKA_PRIVATE => return bool_attr(self.is_private()),
            CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE => return bool_attr(false),
            CKA_LABEL => return bytes_attr(self.label.as_bytes()),
            CKA_ID => return bytes_attr(&self.id),
            _ => {}
        }
        match &self.body {
            Body::Certificate(c) => cert_attribute(c, ty),
            Body::SecretKey(k) => self.secret_attribute(k, ty),
            Body::PublicKey(_) | Body::PrivateKey { .. } => self.asym_attribute(ty),
        }
    }

    fn key_common(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<Attr> {
        Some(match ty {
            CKA_START_DATE | CKA_END_DATE => Attr::Value(vec![]),
            CKA_DERIVE => bool_attr(false),
            // Generated by Key Vault, not by this token.
            CKA_LOCAL => bool_attr(false),
            CKA_KEY_GEN_MECHANISM => ulong_attr(CK_UNAVAILABLE_INFORMATION),
            CKA_ALLOWED_MECHANISMS => Attr::Value(
                self.allowed_mechanisms()
                    .iter()
                    .flat_map(|m| m.to_ne_bytes())
                    .collect(),
            ),
            _ => return None,
        })
    }

    fn asym_attribute(&self, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        let k = self.asym().expect("asymmetric body");
        if let Some(a) = self.key_common(ty) {
            return a;
        }
        let private = matches!(self.body, Body::PrivateKey { .. });
        let rsa = k.info.is_rsa();
        let by_kind = match (&k.info.parts, ty) {
            (_, CKA_KEY_TYPE) => Some(ulong_attr(if rsa { CKK_RSA } else { CKK_EC })),
            (_, CKA_SUBJECT) => Some(bytes_attr(&self.subject)),
            (_, CKA_PUBLIC_KEY_INFO) => Some(bytes_attr(&k.info.spki_der)),
            (PublicParts::Rsa { modulus, .. }, CKA_MODULUS) => Some(bytes_attr(modulus)),
            (PublicParts::Rsa { exponent, .. }, CKA_PUBLIC_EXPONENT) => Some(bytes_attr(exponent)),
            (PublicParts::Rsa { bits, .. }, CKA_MODULUS_BITS) => {
                Some(ulong_attr(*bits as CK_ULONG))
            }
            (PublicParts::Ec { curve, .. }, CKA_EC_PARAMS) => {
                Some(bytes_attr(curve.ec_params_der()))
            }
            (PublicParts::Ec { point, .. }, CKA_EC_POINT) => {
                Some(Attr::Value(der_octet_string(point)))
            }
            _ => None,
        };
        if let Some(a) = by_kind {
            return a;
        }
        if private {
            match ty {
                CKA_SENSITIVE | CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE => bool_attr(true),
                CKA_EXTRACTABLE
                | CKA_ALWAYS_AUTHENTICATE
                | CKA_WRAP_WITH_TRUSTED
                | CKA_SIGN_RECOVER
                | CKA_UNWRAP => bool_attr(false),
                CKA_SIGN => bool_attr(true),
                CKA_DECRYPT => bool_attr(rsa),
                CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2 | CKA_EXPONENT_1
                | CKA_EXPONENT_2 | CKA_COEFFICIENT
                    if rsa =>
                {
                    Attr::Sensitive
                }
                CKA_VALUE if !rsa => Attr::Sensitive,
                _ => Attr::Invalid,
            }
        } else {
            match ty {
                CKA_VERIFY => bool_attr(true),
                CKA_ENCRYPT => bool_attr(rsa),
                CKA_VERIFY_RECOVER | CKA_WRAP | CKA_TRUSTED => bool_attr(false),
                _ => Attr::Invalid,
            }
        }
    }

    fn secret_attribute(&self, k: &SecretBytes, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        if let Some(a) = self.key_common(ty) {
            return a;
        }
        match ty {
            CKA_KEY_TYPE => ulong_attr(CKK_AES),
            CKA_VALUE => Attr::Sensitive,
            CKA_VALUE_LEN => ulong_attr(k.len() as CK_ULONG),
            CKA_ENCRYPT
            | CKA_DECRYPT
            | CKA_SENSITIVE
            | CKA_ALWAYS_SENSITIVE
            | CKA_NEVER_EXTRACTABLE => bool_attr(true),
            CKA_SIGN
            | CKA_VERIFY
            | CKA_WRAP
            | CKA_UNWRAP
            | CKA_EXTRACTABLE
            | CKA_TRUSTED
            | CKA_WRAP_WITH_TRUSTED
            | CKA_ALWAYS_AUTHENTICATE => bool_attr(false),
            _ => Attr::Invalid,
        }
    }

    /// Whether every (type, value) of a find template matches this object.
    pub fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        template.iter().all(|(ty, want)| match self.attribute(*ty) {
            Attr::Value(v) => &v == want,
            _ => false,
        })
    }
}

fn cert_attribute(c: &CertInfo, ty: CK_ATTRIBUTE_TYPE) -> Attr {
    match ty {
        CKA_CERTIFICATE_TYPE => ulong_attr(CKC_X_509),
        CKA_TRUSTED => bool_attr(false),
        CKA_CERTIFICATE_CATEGORY => ulong_attr(c.category),
        CKA_CHECK_VALUE => {
            let h = crate::crypto::HashAlg::Sha1.digest(&c.der);
            bytes_attr(&h[..3])
        }
        CKA_START_DATE => bytes_attr(&c.not_before),
        CKA_END_DATE => bytes_attr(&c.not_after),
        CKA_SUBJECT => bytes_attr(&c.subject),
        CKA_ISSUER => bytes_attr(&c.issuer),
        CKA_SERIAL_NUMBER => bytes_attr(&c.serial),
        CKA_VALUE => bytes_attr(&c.der),
        CKA_PUBLIC_KEY_INFO => bytes_attr(&c.spki),
        CKA_URL | CKA_HASH_OF_SUBJECT_PUBLIC_KEY | CKA_HASH_OF_ISSUER_PUBLIC_KEY => {
            Attr::Value(vec![])
        }
        CKA_JAVA_MIDP_SECURITY_DOMAIN => ulong_attr(0),
        CKA_NAME_HASH_ALGORITHM => ulong_attr(CKM_SHA_1),
        _ => Attr::Invalid,
    }
}
