//! Token objects and their attributes (pkcs11-clients.md §5). Objects are immutable; a login
//! adds a new set (fresh handles), a logout drops it. Handles come from one process-wide
//! counter and are never reused.

use super::attr::{bool_attr, bytes_attr, ck_date, der_octet_string, ulong_attr, Attr};
use super::factory::{self, Attrs};
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

#[derive(Clone)]
pub enum Body {
    Certificate(CertInfo),
    PublicKey(Arc<AsymKey>),
    PrivateKey {
        key: Arc<AsymKey>,
        allow_rsa_pkcs_decrypt: bool,
    },
    SecretKey(Arc<SecretBytes>),
    /// A session data object or certificate: everything is in its stored attributes.
    Stored,
}

/// What a session object keeps besides its key material: the session that made it (it dies
/// with that session) and every non-secret attribute, checked by `factory`.
#[derive(Clone)]
pub struct Stored {
    pub owner: CK_SESSION_HANDLE,
    pub attrs: Attrs,
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
    /// Session objects only: their owner and attributes. None for the configured and released
    /// (token) objects, whose attributes are fixed by `attribute`.
    pub stored: Option<Stored>,
}

impl Object {
    pub fn class(&self) -> CK_OBJECT_CLASS {
        if let Some(s) = &self.stored {
            return factory::ulong(&s.attrs, CKA_CLASS).unwrap_or(CKO_DATA);
        }
        match self.body {
            Body::Certificate(_) => CKO_CERTIFICATE,
            Body::PublicKey(_) => CKO_PUBLIC_KEY,
            Body::PrivateKey { .. } => CKO_PRIVATE_KEY,
            Body::SecretKey(_) => CKO_SECRET_KEY,
            Body::Stored => CKO_DATA,
        }
    }

    /// CKA_PRIVATE: private and secret keys are visible only to a logged-in user.
    pub fn is_private(&self) -> bool {
        if let Some(s) = &self.stored {
            return factory::flag(&s.attrs, CKA_PRIVATE);
        }
        matches!(self.body, Body::PrivateKey { .. } | Body::SecretKey(_))
    }

    /// A session object (CKA_TOKEN = FALSE).
    pub fn is_session(&self) -> bool {
        self.stored.is_some()
    }

    /// The session that created this session object.
    pub fn owner(&self) -> Option<CK_SESSION_HANDLE> {
        self.stored.as_ref().map(|s| s.owner)
    }

    /// A boolean attribute (FALSE when absent).
    pub fn flag(&self, ty: CK_ATTRIBUTE_TYPE) -> bool {
        match &self.stored {
            Some(s) => factory::flag(&s.attrs, ty),
            None => self.attribute(ty) == bool_attr(true),
        }
    }

    /// CKA_KEY_TYPE of a key object.
    pub fn key_type(&self) -> Option<CK_KEY_TYPE> {
        if let Some(s) = &self.stored {
            return factory::ulong(&s.attrs, CKA_KEY_TYPE);
        }
        match &self.body {
            Body::PublicKey(k) | Body::PrivateKey { key: k, .. } if k.info.is_rsa() => {
                Some(CKK_RSA)
            }
            Body::PublicKey(_) | Body::PrivateKey { .. } => Some(CKK_EC),
            Body::SecretKey(_) => Some(CKK_AES),
            Body::Certificate(_) | Body::Stored => None,
        }
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
        let Some(key_type) = self.key_type() else {
            return false;
        };
        if let Some(s) = &self.stored {
            // A caller's CKA_ALLOWED_MECHANISMS narrows the list (empty: no restriction).
            if let Some(list) = s
                .attrs
                .get(&CKA_ALLOWED_MECHANISMS)
                .filter(|l| !l.is_empty())
            {
                let listed = list
                    .chunks_exact(std::mem::size_of::<CK_ULONG>())
                    .any(|c| c == m.to_ne_bytes());
                if !listed {
                    return false;
                }
            }
        }
        // CKM_RSA_PKCS stays listed for signing even when its decryption is refused.
        lookup(m).is_some_and(|i| i.key == Some(key_type))
    }

    pub fn attribute(&self, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        if let Some(s) = &self.stored {
            return self.stored_attribute(s, ty);
        }
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
            Body::Stored => Attr::Invalid,
        }
    }

    /// A session object's attribute: secret parts are sensitive (a secret key's CKA_VALUE is
    /// revealed only when it is neither sensitive nor unextractable); the rest is stored.
    fn stored_attribute(&self, s: &Stored, ty: CK_ATTRIBUTE_TYPE) -> Attr {
        let class = self.class();
        match (&self.body, class, ty) {
            (Body::SecretKey(k), _, CKA_VALUE) => {
                if factory::flag(&s.attrs, CKA_SENSITIVE)
                    || !factory::flag(&s.attrs, CKA_EXTRACTABLE)
                {
                    Attr::Sensitive
                } else {
                    bytes_attr(k.as_slice())
                }
            }
            (Body::SecretKey(k), _, CKA_VALUE_LEN) => ulong_attr(k.len() as CK_ULONG),
            (
                _,
                CKO_PRIVATE_KEY,
                CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2 | CKA_EXPONENT_1 | CKA_EXPONENT_2
                | CKA_COEFFICIENT,
            ) if self.key_type() == Some(CKK_RSA) => Attr::Sensitive,
            (_, CKO_PRIVATE_KEY, CKA_VALUE) if self.key_type() == Some(CKK_EC) => Attr::Sensitive,
            (_, _, CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE) => match s.attrs.get(&ty) {
                Some(v) => Attr::Nested(super::attr::decode_template(v)),
                None => Attr::Invalid,
            },
            _ => match s.attrs.get(&ty) {
                Some(v) => Attr::Value(v.clone()),
                None => Attr::Invalid,
            },
        }
    }

    /// C_GetObjectSize: the bytes its attributes and key material take (session objects).
    pub fn size(&self) -> Option<usize> {
        let s = self.stored.as_ref()?;
        let attrs: usize = s.attrs.values().map(Vec::len).sum();
        let material = match &self.body {
            Body::SecretKey(k) => k.len(),
            Body::PublicKey(k) | Body::PrivateKey { key: k, .. } => k.info.spki_der.len(),
            _ => 0,
        };
        Some(attrs + material)
    }

    fn key_common(&self, ty: CK_ATTRIBUTE_TYPE) -> Option<Attr> {
        Some(match ty {
            CKA_START_DATE | CKA_END_DATE => Attr::Value(vec![]),
            // A released EC private key derives (ECDH) session keys.
            CKA_DERIVE => bool_attr(
                matches!(self.body, Body::PrivateKey { .. }) && self.key_type() == Some(CKK_EC),
            ),
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
                | CKA_SIGN_RECOVER => bool_attr(false),
                // A released RSA key unwraps data keys wrapped to its public key (RSA-OAEP).
                CKA_UNWRAP => bool_attr(rsa),
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
            | CKA_UNWRAP
            | CKA_SENSITIVE
            | CKA_ALWAYS_SENSITIVE
            | CKA_NEVER_EXTRACTABLE => bool_attr(true),
            CKA_SIGN
            | CKA_VERIFY
            | CKA_WRAP
            | CKA_EXTRACTABLE
            | CKA_TRUSTED
            | CKA_WRAP_WITH_TRUSTED
            | CKA_ALWAYS_AUTHENTICATE => bool_attr(false),
            _ => Attr::Invalid,
        }
    }

    /// Whether every (type, value) of a find template matches this object.
    pub fn matches(&self, template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
        if let Some(s) = &self.stored {
            // Secret parts never match; everything else compares with its stored bytes.
            return template
                .iter()
                .all(|(ty, want)| match self.stored_attribute(s, *ty) {
                    Attr::Value(v) => &v == want,
                    _ => false,
                });
        }
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
