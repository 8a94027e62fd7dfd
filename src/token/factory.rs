//! Session objects: the attribute policy of every class and key type this token creates
//! (PKCS#11 2.40 §4, tables of common / data / certificate / key attributes and their footnotes),
//! as one table (`rule`) that C_CreateObject, C_GenerateKey(Pair), C_UnwrapKey, C_CopyObject and
//! C_SetAttributeValue all check templates against, with the spec's codes:
//!
//! - unknown for the class: CKR_ATTRIBUTE_TYPE_INVALID; a malformed value:
//!   CKR_ATTRIBUTE_VALUE_INVALID; never settable (CKA_LOCAL, CKA_ALWAYS_SENSITIVE, ...) or only by
//!   a security officer (CKA_TRUSTED = TRUE, this token has none): CKR_ATTRIBUTE_READ_ONLY;
//! - missing a required attribute: CKR_TEMPLATE_INCOMPLETE; an attribute the operation must not
//!   be given, two different values for one type, or conflicting roles: CKR_TEMPLATE_INCONSISTENT;
//! - CKA_TOKEN = TRUE: CKR_TOKEN_WRITE_PROTECTED (session objects only).
//!
//! Latching: CKA_SENSITIVE only to TRUE, CKA_EXTRACTABLE only to FALSE, CKA_WRAP_WITH_TRUSTED only
//! to TRUE, CKA_COPYABLE only to FALSE; CKA_ALWAYS_SENSITIVE / CKA_NEVER_EXTRACTABLE are derived.
//!
//! Role separation (the published key-management attacks, Clulow 2003; Bortolozzo et al. 2010):
//! a key is either a wrapping key (CKA_WRAP / CKA_UNWRAP) or a data key (CKA_ENCRYPT /
//! CKA_DECRYPT), never both, so nothing wrapped can be decrypted with the wrapping key and nothing
//! encrypted can be unwrapped into a key of known value. Defaults follow the role the template
//! asks for; private and secret keys are sensitive and unextractable unless asked otherwise.

use cryptoki_sys::*;
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// A caller's template: (type, value bytes) as given.
pub type Template = [(CK_ATTRIBUTE_TYPE, Vec<u8>)];
/// The stored attributes of a session object.
pub type Attrs = BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>>;

/// How a new object comes to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Create,
    Generate,
    Unwrap,
    Derive,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Bool,
    Ulong,
    Bytes,
    /// CK_DATE: empty or 8 digits.
    Date,
    /// An array of CK_MECHANISM_TYPE.
    Mechs,
    /// An attribute array (CKA_WRAP_TEMPLATE / CKA_UNWRAP_TEMPLATE), encoded by `attr::encode_template`.
    Nested,
}

/// Whether an operation may, must or must not be given the attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    May,
    Must,
    MustNot,
}

/// How an existing object's attribute may change (C_SetAttributeValue, C_CopyObject).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Free,
    Never,
    /// Only in the course of C_CopyObject.
    InCopy,
    OnlyToTrue,
    OnlyToFalse,
}

#[derive(Clone, Copy, Debug)]
struct Rule {
    kind: Kind,
    change: Change,
    create: Need,
    generate: Need,
    unwrap: Need,
    /// Never given by a caller (CKA_LOCAL, CKA_ALWAYS_SENSITIVE, ...).
    read_only: bool,
    /// TRUE only by a security officer.
    so_true: bool,
}

const fn r(kind: Kind, change: Change) -> Rule {
    Rule {
        kind,
        change,
        create: Need::May,
        generate: Need::May,
        unwrap: Need::May,
        read_only: false,
        so_true: false,
    }
}

impl Rule {
    const fn needs(mut self, create: Need, generate: Need, unwrap: Need) -> Rule {
        self.create = create;
        self.generate = generate;
        self.unwrap = unwrap;
        self
    }
    const fn read_only(mut self) -> Rule {
        self.read_only = true;
        self
    }
    const fn so(mut self) -> Rule {
        self.so_true = true;
        self
    }
    fn need(&self, origin: Origin) -> Need {
        match origin {
            Origin::Create => self.create,
            Origin::Generate => self.generate,
            Origin::Unwrap | Origin::Derive => self.unwrap,
        }
    }
}

/// The rule of attribute `ty` on an object of `class` / `key_type`; None: not an attribute of it.
fn rule(class: CK_OBJECT_CLASS, key_type: CK_KEY_TYPE, ty: CK_ATTRIBUTE_TYPE) -> Option<Rule> {
    use Change::*;
    use Kind::*;
    use Need::*;
    let common = match ty {
        CKA_CLASS => Some(r(Ulong, Never)),
        CKA_TOKEN | CKA_PRIVATE | CKA_MODIFIABLE | CKA_DESTROYABLE => Some(r(Bool, InCopy)),
        CKA_COPYABLE => Some(r(Bool, OnlyToFalse)),
        CKA_LABEL => Some(r(Bytes, Free)),
        _ => None,
    };
    if common.is_some() {
        return common;
    }
    let is_key = matches!(class, CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY);
    if is_key {
        let key_common = match ty {
            CKA_KEY_TYPE => Some(r(Ulong, Never).needs(Must, May, Must)),
            CKA_ID => Some(r(Bytes, Free)),
            CKA_START_DATE | CKA_END_DATE => Some(r(Date, Free)),
            CKA_DERIVE => Some(r(Bool, Free)),
            CKA_LOCAL => Some(r(Bool, Never).read_only()),
            CKA_KEY_GEN_MECHANISM => Some(r(Ulong, Never).read_only()),
            CKA_ALLOWED_MECHANISMS => Some(r(Mechs, Never)),
            _ => None,
        };
        if key_common.is_some() {
            return key_common;
        }
    }
    match (class, ty) {
        (CKO_DATA, CKA_APPLICATION | CKA_OBJECT_ID | CKA_VALUE) => Some(r(Bytes, Free)),
        (CKO_CERTIFICATE, CKA_CERTIFICATE_TYPE) => Some(r(Ulong, Never).needs(Must, May, May)),
        (CKO_CERTIFICATE, CKA_TRUSTED) => Some(r(Bool, Never).so()),
        (CKO_CERTIFICATE, CKA_CERTIFICATE_CATEGORY | CKA_JAVA_MIDP_SECURITY_DOMAIN) => {
            Some(r(Ulong, Never))
        }
        (CKO_CERTIFICATE, CKA_NAME_HASH_ALGORITHM) => Some(r(Ulong, Never)),
        (CKO_CERTIFICATE, CKA_CHECK_VALUE | CKA_PUBLIC_KEY_INFO | CKA_URL) => Some(r(Bytes, Never)),
        (CKO_CERTIFICATE, CKA_HASH_OF_SUBJECT_PUBLIC_KEY | CKA_HASH_OF_ISSUER_PUBLIC_KEY) => {
            Some(r(Bytes, Never))
        }
        (CKO_CERTIFICATE, CKA_START_DATE | CKA_END_DATE) => Some(r(Date, Free)),
        (CKO_CERTIFICATE, CKA_SUBJECT) => Some(r(Bytes, Free).needs(Must, May, May)),
        (CKO_CERTIFICATE, CKA_ID | CKA_ISSUER | CKA_SERIAL_NUMBER) => Some(r(Bytes, Free)),
        (CKO_CERTIFICATE, CKA_VALUE) => Some(r(Bytes, Never).needs(Must, May, May)),

        (CKO_PUBLIC_KEY, CKA_SUBJECT) => Some(r(Bytes, Free)),
        (CKO_PUBLIC_KEY, CKA_ENCRYPT | CKA_VERIFY | CKA_VERIFY_RECOVER | CKA_WRAP) => {
            Some(r(Bool, Free))
        }
        (CKO_PUBLIC_KEY, CKA_TRUSTED) => Some(r(Bool, Never).so()),
        (CKO_PUBLIC_KEY, CKA_WRAP_TEMPLATE) => Some(r(Nested, Never)),
        (CKO_PUBLIC_KEY, CKA_PUBLIC_KEY_INFO) => Some(r(Bytes, Never).needs(May, MustNot, May)),
        (CKO_PUBLIC_KEY, CKA_MODULUS) if key_type == CKK_RSA => {
            Some(r(Bytes, Never).needs(Must, MustNot, MustNot))
        }
        (CKO_PUBLIC_KEY, CKA_MODULUS_BITS) if key_type == CKK_RSA => {
            Some(r(Ulong, Never).needs(MustNot, Must, MustNot))
        }
        (CKO_PUBLIC_KEY, CKA_PUBLIC_EXPONENT) if key_type == CKK_RSA => {
            Some(r(Bytes, Never).needs(Must, May, MustNot))
        }
        (CKO_PUBLIC_KEY, CKA_EC_PARAMS) if key_type == CKK_EC => {
            Some(r(Bytes, Never).needs(Must, Must, MustNot))
        }
        (CKO_PUBLIC_KEY, CKA_EC_POINT) if key_type == CKK_EC => {
            Some(r(Bytes, Never).needs(Must, MustNot, MustNot))
        }

        (CKO_PRIVATE_KEY, CKA_SUBJECT) => Some(r(Bytes, Free)),
        (CKO_PRIVATE_KEY, CKA_SENSITIVE) => Some(r(Bool, OnlyToTrue)),
        (CKO_PRIVATE_KEY, CKA_DECRYPT | CKA_SIGN | CKA_SIGN_RECOVER | CKA_UNWRAP) => {
            Some(r(Bool, Free))
        }
        (CKO_PRIVATE_KEY, CKA_EXTRACTABLE) => Some(r(Bool, OnlyToFalse)),
        (CKO_PRIVATE_KEY, CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE) => {
            Some(r(Bool, Never).read_only())
        }
        (CKO_PRIVATE_KEY, CKA_WRAP_WITH_TRUSTED) => Some(r(Bool, OnlyToTrue)),
        (CKO_PRIVATE_KEY, CKA_UNWRAP_TEMPLATE) => Some(r(Nested, Never)),
        (CKO_PRIVATE_KEY, CKA_ALWAYS_AUTHENTICATE) => Some(r(Bool, Never)),
        (CKO_PRIVATE_KEY, CKA_PUBLIC_KEY_INFO) => {
            Some(r(Bytes, Never).needs(May, MustNot, MustNot))
        }
        (
            CKO_PRIVATE_KEY,
            CKA_MODULUS | CKA_PUBLIC_EXPONENT | CKA_PRIVATE_EXPONENT | CKA_PRIME_1 | CKA_PRIME_2
            | CKA_EXPONENT_1 | CKA_EXPONENT_2 | CKA_COEFFICIENT,
        ) if key_type == CKK_RSA => Some(r(Bytes, Never).needs(Must, MustNot, MustNot)),
        (CKO_PRIVATE_KEY, CKA_EC_PARAMS | CKA_VALUE) if key_type == CKK_EC => {
            Some(r(Bytes, Never).needs(Must, MustNot, MustNot))
        }

        (CKO_SECRET_KEY, CKA_SENSITIVE) => Some(r(Bool, OnlyToTrue)),
        (
            CKO_SECRET_KEY,
            CKA_ENCRYPT | CKA_DECRYPT | CKA_SIGN | CKA_VERIFY | CKA_WRAP | CKA_UNWRAP,
        ) => Some(r(Bool, Free)),
        (CKO_SECRET_KEY, CKA_EXTRACTABLE) => Some(r(Bool, OnlyToFalse)),
        (CKO_SECRET_KEY, CKA_ALWAYS_SENSITIVE | CKA_NEVER_EXTRACTABLE) => {
            Some(r(Bool, Never).read_only())
        }
        (CKO_SECRET_KEY, CKA_CHECK_VALUE) => Some(r(Bytes, Never)),
        (CKO_SECRET_KEY, CKA_WRAP_WITH_TRUSTED) => Some(r(Bool, OnlyToTrue)),
        (CKO_SECRET_KEY, CKA_TRUSTED) => Some(r(Bool, Never).so()),
        (CKO_SECRET_KEY, CKA_WRAP_TEMPLATE | CKA_UNWRAP_TEMPLATE) => Some(r(Nested, Never)),
        (CKO_SECRET_KEY, CKA_VALUE) => Some(r(Bytes, Never).needs(Must, MustNot, MustNot)),
        (CKO_SECRET_KEY, CKA_VALUE_LEN) => Some(r(Ulong, Never).needs(MustNot, Must, May)),
        _ => None,
    }
}

fn err(rv: CK_RV, msg: String) -> Error {
    Error::new(rv, msg)
}

pub fn decode_bool(ty: CK_ATTRIBUTE_TYPE, v: &[u8]) -> Result<bool> {
    match v {
        [0] => Ok(false),
        [1] => Ok(true),
        _ => Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            format!("attribute {ty:#x} must be a one-byte CK_BBOOL (0 or 1)"),
        )),
    }
}

pub fn decode_ulong(ty: CK_ATTRIBUTE_TYPE, v: &[u8]) -> Result<CK_ULONG> {
    let b: [u8; std::mem::size_of::<CK_ULONG>()] = v.try_into().map_err(|_| {
        err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            format!(
                "attribute {ty:#x} must be a CK_ULONG of {} bytes",
                std::mem::size_of::<CK_ULONG>()
            ),
        )
    })?;
    Ok(CK_ULONG::from_ne_bytes(b))
}

fn check_kind(ty: CK_ATTRIBUTE_TYPE, kind: Kind, v: &[u8]) -> Result<()> {
    match kind {
        Kind::Bool => decode_bool(ty, v).map(|_| ()),
        Kind::Ulong => decode_ulong(ty, v).map(|_| ()),
        Kind::Date if !(v.is_empty() || (v.len() == 8 && v.iter().all(u8::is_ascii_digit))) => {
            Err(err(
                CKR_ATTRIBUTE_VALUE_INVALID,
                format!("attribute {ty:#x} must be an empty or 8-digit CK_DATE"),
            ))
        }
        Kind::Mechs if !v.len().is_multiple_of(std::mem::size_of::<CK_ULONG>()) => Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            format!("attribute {ty:#x} must be an array of CK_MECHANISM_TYPE"),
        )),
        _ => Ok(()),
    }
}

/// One value per type; a type given twice must be given the same value.
pub fn collapse(template: &Template) -> Result<Attrs> {
    let mut out = Attrs::new();
    for (ty, v) in template {
        if let Some(prev) = out.insert(*ty, v.clone()) {
            if prev != *v {
                return Err(err(
                    CKR_TEMPLATE_INCONSISTENT,
                    format!("attribute {ty:#x} is given twice with different values"),
                ));
            }
        }
    }
    Ok(out)
}

pub fn flag(attrs: &Attrs, ty: CK_ATTRIBUTE_TYPE) -> bool {
    attrs.get(&ty).is_some_and(|v| v.as_slice() == [1])
}

pub fn ulong(attrs: &Attrs, ty: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
    attrs.get(&ty).and_then(|v| decode_ulong(ty, v).ok())
}

fn set_bool(a: &mut Attrs, ty: CK_ATTRIBUTE_TYPE, b: bool) {
    a.insert(ty, vec![b as u8]);
}

pub fn ulong_bytes(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// The attributes of a new session object: `template` checked against the table for `origin`,
/// `implied` (what the mechanism or the key material fixes: class, key type, modulus, ...) merged
/// in (a template that contradicts them is inconsistent), defaults filled in, derived attributes
/// set. `mechanism` is the generating mechanism (CKA_KEY_GEN_MECHANISM).
/// Attributes whose values are wiped when dropped: copies of a template can hold key values.
struct Wiping(Attrs);

impl Drop for Wiping {
    fn drop(&mut self) {
        for v in self.0.values_mut() {
            crate::secret::wipe(v);
        }
    }
}

pub fn new_object(
    origin: Origin,
    template: &Template,
    implied: &Template,
    mechanism: Option<CK_MECHANISM_TYPE>,
) -> Result<Attrs> {
    let given = Wiping(collapse(template)?);
    let given = &given.0;
    let mut guard = Wiping(given.clone());
    let attrs = &mut guard.0;
    for (ty, v) in implied {
        match given.get(ty) {
            Some(g) if g != v => {
                return Err(err(
                    CKR_TEMPLATE_INCONSISTENT,
                    format!("attribute {ty:#x} contradicts what the operation makes"),
                ))
            }
            _ => {
                attrs.insert(*ty, v.clone());
            }
        }
    }
    let class = match attrs.get(&CKA_CLASS) {
        None => {
            return Err(err(
                CKR_TEMPLATE_INCOMPLETE,
                "the template has no CKA_CLASS".into(),
            ))
        }
        Some(v) => decode_ulong(CKA_CLASS, v)?,
    };
    if !matches!(
        class,
        CKO_DATA | CKO_CERTIFICATE | CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY
    ) {
        return Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            format!("objects of class {class:#x} cannot be created on this token"),
        ));
    }
    let is_key = matches!(class, CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY);
    let key_type = if is_key {
        match attrs.get(&CKA_KEY_TYPE) {
            None => {
                return Err(err(
                    CKR_TEMPLATE_INCOMPLETE,
                    "the template has no CKA_KEY_TYPE".into(),
                ))
            }
            Some(v) => decode_ulong(CKA_KEY_TYPE, v)?,
        }
    } else {
        CK_UNAVAILABLE_INFORMATION
    };
    let supported = match class {
        CKO_PUBLIC_KEY | CKO_PRIVATE_KEY => matches!(key_type, CKK_RSA | CKK_EC),
        CKO_SECRET_KEY => matches!(key_type, CKK_AES | CKK_GENERIC_SECRET),
        _ => true,
    };
    if !supported {
        return Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            format!("key type {key_type:#x} is not supported for class {class:#x}"),
        ));
    }
    if class == CKO_CERTIFICATE {
        if let Some(t) = attrs.get(&CKA_CERTIFICATE_TYPE) {
            if decode_ulong(CKA_CERTIFICATE_TYPE, t)? != CKC_X_509 {
                return Err(err(
                    CKR_ATTRIBUTE_VALUE_INVALID,
                    "only X.509 certificates (CKC_X_509) are supported".into(),
                ));
            }
        }
    }
    // Every given attribute: known for the class, well formed, allowed for the operation.
    for (ty, v) in given {
        let rule = rule(class, key_type, *ty).ok_or_else(|| {
            err(
                CKR_ATTRIBUTE_TYPE_INVALID,
                format!("attribute {ty:#x} is not an attribute of this object class/key type"),
            )
        })?;
        check_kind(*ty, rule.kind, v)?;
        if rule.read_only {
            return Err(err(
                CKR_ATTRIBUTE_READ_ONLY,
                format!("attribute {ty:#x} is set by the token, not by the caller"),
            ));
        }
        if rule.so_true && decode_bool(*ty, v)? {
            return Err(err(
                CKR_ATTRIBUTE_READ_ONLY,
                format!("attribute {ty:#x} = TRUE needs a security officer; this token has none"),
            ));
        }
        if rule.need(origin) == Need::MustNot && !implied.iter().any(|(t, _)| t == ty) {
            return Err(err(
                CKR_TEMPLATE_INCONSISTENT,
                format!("attribute {ty:#x} must not be given to this operation"),
            ));
        }
    }
    if flag(attrs, CKA_TOKEN) {
        return Err(err(
            CKR_TOKEN_WRITE_PROTECTED,
            "the token is write-protected: only session objects (CKA_TOKEN = FALSE) can be created"
                .into(),
        ));
    }
    // Required attributes.
    for ty in REQUIRED_CANDIDATES {
        if let Some(rule) = rule(class, key_type, *ty) {
            if rule.need(origin) == Need::Must && !attrs.contains_key(ty) {
                return Err(err(
                    CKR_TEMPLATE_INCOMPLETE,
                    format!("attribute {ty:#x} is required for this object"),
                ));
            }
        }
    }
    if class == CKO_PRIVATE_KEY && attrs.get(&CKA_SENSITIVE).is_some_and(|v| v == &[0]) {
        return Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            "private keys of this token are always sensitive (CKA_SENSITIVE = FALSE refused)"
                .into(),
        ));
    }
    if flag(attrs, CKA_ALWAYS_AUTHENTICATE) {
        return Err(err(
            CKR_ATTRIBUTE_VALUE_INVALID,
            "CKA_ALWAYS_AUTHENTICATE = TRUE is not supported (no context-specific login)".into(),
        ));
    }
    fill_defaults(attrs, class, key_type, origin, mechanism);
    check_roles(attrs)?;
    Ok(std::mem::take(attrs))
}

/// The attributes an operation may have to require (checked against the table per class).
const REQUIRED_CANDIDATES: &[CK_ATTRIBUTE_TYPE] = &[
    CKA_KEY_TYPE,
    CKA_CERTIFICATE_TYPE,
    CKA_SUBJECT,
    CKA_VALUE,
    CKA_VALUE_LEN,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
];

fn fill_defaults(
    a: &mut Attrs,
    class: CK_OBJECT_CLASS,
    key_type: CK_KEY_TYPE,
    origin: Origin,
    mechanism: Option<CK_MECHANISM_TYPE>,
) {
    let default_bool = |a: &mut Attrs, ty, b| {
        a.entry(ty).or_insert_with(|| vec![b as u8]);
    };
    let is_key = matches!(class, CKO_PUBLIC_KEY | CKO_PRIVATE_KEY | CKO_SECRET_KEY);
    let secretish = matches!(class, CKO_PRIVATE_KEY | CKO_SECRET_KEY);
    default_bool(a, CKA_TOKEN, false);
    default_bool(a, CKA_PRIVATE, secretish);
    default_bool(a, CKA_MODIFIABLE, true);
    default_bool(a, CKA_COPYABLE, true);
    default_bool(a, CKA_DESTROYABLE, true);
    a.entry(CKA_LABEL).or_default();
    match class {
        CKO_DATA => {
            for ty in [CKA_APPLICATION, CKA_OBJECT_ID, CKA_VALUE] {
                a.entry(ty).or_default();
            }
        }
        CKO_CERTIFICATE => {
            default_bool(a, CKA_TRUSTED, false);
            a.entry(CKA_CERTIFICATE_CATEGORY)
                .or_insert_with(|| ulong_bytes(CK_CERTIFICATE_CATEGORY_UNSPECIFIED));
            for ty in [
                CKA_ID,
                CKA_ISSUER,
                CKA_SERIAL_NUMBER,
                CKA_START_DATE,
                CKA_END_DATE,
                CKA_URL,
                CKA_HASH_OF_SUBJECT_PUBLIC_KEY,
                CKA_HASH_OF_ISSUER_PUBLIC_KEY,
            ] {
                a.entry(ty).or_default();
            }
            if !a.contains_key(&CKA_CHECK_VALUE) {
                let v = a.get(&CKA_VALUE).cloned().unwrap_or_default();
                let h = crate::crypto::HashAlg::Sha1.digest(&v);
                a.insert(CKA_CHECK_VALUE, h[..3].to_vec());
            }
            a.entry(CKA_JAVA_MIDP_SECURITY_DOMAIN)
                .or_insert_with(|| ulong_bytes(0));
            a.entry(CKA_NAME_HASH_ALGORITHM)
                .or_insert_with(|| ulong_bytes(CKM_SHA_1));
        }
        _ => {}
    }
    if !is_key {
        return;
    }
    for ty in [CKA_ID, CKA_START_DATE, CKA_END_DATE] {
        a.entry(ty).or_default();
    }
    default_bool(a, CKA_DERIVE, false);
    set_bool(a, CKA_LOCAL, origin == Origin::Generate);
    a.insert(
        CKA_KEY_GEN_MECHANISM,
        ulong_bytes(match (origin, mechanism) {
            (Origin::Generate, Some(m)) => m,
            _ => CK_UNAVAILABLE_INFORMATION,
        }),
    );
    // The role the template asks for decides the defaults of the other role's flags.
    let wrap_role = flag(a, CKA_WRAP) || flag(a, CKA_UNWRAP);
    let crypt_default = !wrap_role;
    match class {
        CKO_PUBLIC_KEY => {
            a.entry(CKA_SUBJECT).or_default();
            default_bool(a, CKA_ENCRYPT, crypt_default && key_type == CKK_RSA);
            default_bool(a, CKA_VERIFY, true);
            default_bool(a, CKA_VERIFY_RECOVER, false);
            default_bool(a, CKA_WRAP, false);
            default_bool(a, CKA_TRUSTED, false);
        }
        CKO_PRIVATE_KEY => {
            a.entry(CKA_SUBJECT).or_default();
            default_bool(a, CKA_DECRYPT, crypt_default && key_type == CKK_RSA);
            default_bool(a, CKA_SIGN, true);
            default_bool(a, CKA_SIGN_RECOVER, false);
            default_bool(a, CKA_UNWRAP, false);
            default_bool(a, CKA_WRAP_WITH_TRUSTED, false);
            default_bool(a, CKA_ALWAYS_AUTHENTICATE, false);
        }
        _ => {
            let aes = key_type == CKK_AES;
            default_bool(a, CKA_ENCRYPT, crypt_default && aes);
            default_bool(a, CKA_DECRYPT, crypt_default && aes);
            default_bool(a, CKA_SIGN, true);
            default_bool(a, CKA_VERIFY, true);
            default_bool(a, CKA_WRAP, false);
            default_bool(a, CKA_UNWRAP, false);
            default_bool(a, CKA_WRAP_WITH_TRUSTED, false);
            default_bool(a, CKA_TRUSTED, false);
        }
    }
    if secretish {
        default_bool(a, CKA_SENSITIVE, true);
        default_bool(a, CKA_EXTRACTABLE, false);
        // Only a key generated on the token has never been outside it.
        let generated = origin == Origin::Generate;
        let sensitive = flag(a, CKA_SENSITIVE);
        let extractable = flag(a, CKA_EXTRACTABLE);
        set_bool(a, CKA_ALWAYS_SENSITIVE, generated && sensitive);
        set_bool(a, CKA_NEVER_EXTRACTABLE, generated && !extractable);
    }
}

/// A key is a wrapping key or a data key, never both (see the module comment); and only a key
/// that never existed outside the token, and stays sensitive, may wrap: wrapping under a key
/// of known value (created, unwrapped, or readable) would export any extractable key in the
/// clear (the "wrap with a known key" attack).
pub fn check_roles(a: &Attrs) -> Result<()> {
    let class = ulong(a, CKA_CLASS);
    let readable = class == Some(CKO_SECRET_KEY) && !flag(a, CKA_SENSITIVE);
    if flag(a, CKA_WRAP) && (!flag(a, CKA_LOCAL) || readable) {
        return Err(err(
            CKR_TEMPLATE_INCONSISTENT,
            "only a sensitive key generated on this token (CKA_LOCAL = TRUE) may wrap other keys"
                .into(),
        ));
    }
    let wrap_role = flag(a, CKA_WRAP) || flag(a, CKA_UNWRAP);
    let crypt_role = flag(a, CKA_ENCRYPT) || flag(a, CKA_DECRYPT);
    if wrap_role && crypt_role {
        return Err(err(
            CKR_TEMPLATE_INCONSISTENT,
            "a key is either a wrapping key (CKA_WRAP / CKA_UNWRAP) or a data key (CKA_ENCRYPT / CKA_DECRYPT), never both: wrap-then-decrypt and encrypt-then-unwrap would reveal keys".into(),
        ));
    }
    Ok(())
}

/// Apply C_SetAttributeValue (`in_copy` false) or the template of C_CopyObject (`in_copy` true)
/// to an object's attributes: the new attribute set, or the spec's refusal.
pub fn modify(current: &Attrs, changes: &Template, in_copy: bool) -> Result<Attrs> {
    let changes = Wiping(collapse(changes)?);
    let changes = &changes.0;
    let class = ulong(current, CKA_CLASS).unwrap_or(CKO_DATA);
    let key_type = ulong(current, CKA_KEY_TYPE).unwrap_or(CK_UNAVAILABLE_INFORMATION);
    let mut out = current.clone();
    for (ty, v) in changes {
        let rule = rule(class, key_type, *ty).ok_or_else(|| {
            err(
                CKR_ATTRIBUTE_TYPE_INVALID,
                format!("attribute {ty:#x} is not an attribute of this object"),
            )
        })?;
        check_kind(*ty, rule.kind, v)?;
        if current.get(ty) == Some(v) {
            continue;
        }
        if *ty == CKA_TOKEN && decode_bool(*ty, v)? {
            return Err(err(
                CKR_TOKEN_WRITE_PROTECTED,
                "the token is write-protected: a copy stays a session object".into(),
            ));
        }
        if rule.so_true && decode_bool(*ty, v)? {
            return Err(err(
                CKR_ATTRIBUTE_READ_ONLY,
                format!("attribute {ty:#x} = TRUE needs a security officer; this token has none"),
            ));
        }
        let allowed = match rule.change {
            Change::Free => true,
            Change::Never => false,
            Change::InCopy => in_copy,
            Change::OnlyToTrue => decode_bool(*ty, v)?,
            Change::OnlyToFalse => !decode_bool(*ty, v)?,
        };
        if !allowed || rule.read_only {
            return Err(err(
                CKR_ATTRIBUTE_READ_ONLY,
                format!("attribute {ty:#x} cannot be changed to this value"),
            ));
        }
        out.insert(*ty, v.clone());
    }
    check_roles(&out)?;
    Ok(out)
}

/// Whether `attrs` satisfy every entry of a CKA_UNWRAP_TEMPLATE / CKA_WRAP_TEMPLATE.
pub fn satisfies(attrs: &Attrs, required: &Template) -> bool {
    required.iter().all(|(ty, v)| attrs.get(ty) == Some(v))
}
