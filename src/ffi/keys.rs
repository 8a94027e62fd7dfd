//! Key management: C_GenerateKey, C_GenerateKeyPair, C_WrapKey, C_UnwrapKey, C_DeriveKey.
//! New keys are session objects (`token::factory` checks their templates); wrapping and
//! unwrapping run the mechanism's own cipher (`crypto::mechanism`), so every wrap format is
//! also an encrypt / decrypt format of the same family.
//!
//! The key-management attacks refused here (each has a test with its CK_RV):
//! - wrapping with a key that may not wrap (CKA_WRAP = FALSE, e.g. every released key and its
//!   public half): CKR_KEY_FUNCTION_NOT_PERMITTED;
//! - wrapping a key that is not extractable (every released key): CKR_KEY_UNEXTRACTABLE;
//! - wrapping a CKA_WRAP_WITH_TRUSTED key (no key of this token is trusted: that needs a
//!   security officer) or one outside the wrapping key's CKA_WRAP_TEMPLATE:
//!   CKR_KEY_NOT_WRAPPABLE;
//! - a key that both wraps and decrypts (or unwraps and encrypts): CKR_TEMPLATE_INCONSISTENT at
//!   creation (`factory::check_roles`);
//! - unwrapping against the unwrapping key's CKA_UNWRAP_TEMPLATE, or unwrapping a wrapping key
//!   with a key that also decrypts / encrypts (its value may be known to whoever can
//!   C_Encrypt with that key): CKR_TEMPLATE_INCONSISTENT;
//! - unwrapped keys are never "always sensitive" or "never extractable" (PKCS#11 §5.18.8).

use super::objects::{handle_out, install, read_template};
use super::ops::{cipher_key, decode_mechanism};
use super::{bad, deliver, input, instance, p11_fn, read_len};
use crate::crypto::mechanism::lookup;
use crate::crypto::ops::{AsymKey, CipherOp};
use crate::crypto::pkey::Curve;
use crate::crypto::Mechanism;
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use crate::token::attr::decode_template;
use crate::token::factory::{self, collapse, flag, Origin};
use crate::token::material;
use crate::token::object::{Body, Object};
use crate::token::Token;
use cryptoki_sys::*;
use std::sync::Arc;

fn mechanism_arg(p: *mut CK_MECHANISM) -> Result<()> {
    if p.is_null() {
        return Err(bad("pMechanism is NULL"));
    }
    Ok(())
}

/// Refuse early (before any key is made) what the login state would refuse at the end.
fn check_private(t: &Token, attrs: &factory::Attrs) -> Result<()> {
    if flag(attrs, CKA_PRIVATE) && !t.is_logged_in() {
        return Err(Error::new(
            CKR_USER_NOT_LOGGED_IN,
            "private keys (CKA_PRIVATE = TRUE, the default) need C_Login first",
        ));
    }
    Ok(())
}

/// The mechanism's registry row, which must list `flag` (CKF_WRAP, CKF_GENERATE, ...).
fn mech_for(
    m: &Mechanism,
    flag: CK_FLAGS,
    what: &str,
) -> Result<&'static crate::crypto::mechanism::MechInfo> {
    lookup(m.ckm()).filter(|i| i.can(flag)).ok_or_else(|| {
        Error::new(
            CKR_MECHANISM_INVALID,
            format!("mechanism {:#x} cannot {what}", m.ckm()),
        )
    })
}

/// A wrapping or unwrapping key: a key of the mechanism's type, allowed this mechanism and
/// this use. `which` names the handle in errors; the codes are the wrap-specific ones.
fn wrap_key_object(
    t: &Token,
    h: CK_OBJECT_HANDLE,
    info: &crate::crypto::mechanism::MechInfo,
    unwrap: bool,
) -> Result<Arc<Object>> {
    let (handle_rv, type_rv, attr) = if unwrap {
        (
            CKR_UNWRAPPING_KEY_HANDLE_INVALID,
            CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
            CKA_UNWRAP,
        )
    } else {
        (
            CKR_WRAPPING_KEY_HANDLE_INVALID,
            CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
            CKA_WRAP,
        )
    };
    let o = t
        .object(h)
        .map_err(|_| Error::new(handle_rv, format!("key handle {h} is not valid")))?;
    let usable = matches!(
        (&o.body, unwrap),
        (Body::SecretKey(_), _) | (Body::PublicKey(_), false) | (Body::PrivateKey { .. }, true)
    );
    if !usable || o.key_type() != info.key {
        return Err(Error::new(
            type_rv,
            format!(
                "this key cannot {} with mechanism {:#x}",
                if unwrap { "unwrap" } else { "wrap" },
                info.ckm
            ),
        ));
    }
    if !o.flag(attr) {
        return Err(Error::new(
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            if unwrap {
                "the key may not unwrap (CKA_UNWRAP = FALSE)"
            } else {
                "the key may not wrap (CKA_WRAP = FALSE; released keys and their public halves never wrap)"
            },
        ));
    }
    if !o.allows(info.ckm) {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            format!("mechanism {:#x} is not allowed for this key", info.ckm),
        ));
    }
    Ok(o)
}

/// C_WrapKey's output: the mechanism's cipher over the key value, or the refusal.
fn wrap(
    t: &Token,
    m: Mechanism,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
) -> Result<crate::secret::Wiped> {
    let info = mech_for(&m, CKF_WRAP, "wrap keys")?;
    let w = wrap_key_object(t, wrapping, info, false)?;
    let k = t.object(key).map_err(|_| {
        Error::new(
            CKR_KEY_HANDLE_INVALID,
            format!("key handle {key} is not valid"),
        )
    })?;
    let Body::SecretKey(value) = &k.body else {
        return Err(match k.body {
            Body::PrivateKey { .. } if k.is_session() && k.flag(CKA_EXTRACTABLE) => Error::new(
                CKR_KEY_NOT_WRAPPABLE,
                "private keys are not wrapped by this token (only secret keys)",
            ),
            Body::PrivateKey { .. } => {
                Error::new(CKR_KEY_UNEXTRACTABLE, "the key is not extractable")
            }
            _ => Error::new(CKR_KEY_NOT_WRAPPABLE, "only secret keys can be wrapped"),
        });
    };
    if !k.flag(CKA_EXTRACTABLE) {
        return Err(Error::new(
            CKR_KEY_UNEXTRACTABLE,
            if k.is_session() {
                "the key is not extractable (CKA_EXTRACTABLE = FALSE)"
            } else {
                "released keys never leave the TEE (CKA_EXTRACTABLE = FALSE)"
            },
        ));
    }
    if k.flag(CKA_WRAP_WITH_TRUSTED) && !w.flag(CKA_TRUSTED) {
        return Err(Error::new(
            CKR_KEY_NOT_WRAPPABLE,
            "the key may be wrapped only with a trusted key (CKA_WRAP_WITH_TRUSTED)",
        ));
    }
    if let Some(required) = w
        .stored
        .as_ref()
        .and_then(|s| s.attrs.get(&CKA_WRAP_TEMPLATE))
    {
        let attrs = k.stored.as_ref().map(|s| &s.attrs);
        if !attrs.is_some_and(|a| factory::satisfies(a, &decode_template(required))) {
            return Err(Error::new(
                CKR_KEY_NOT_WRAPPABLE,
                "the key does not match the wrapping key's CKA_WRAP_TEMPLATE",
            ));
        }
    }
    let mut op = CipherOp::new(m, cipher_key(&w)?, true)?;
    op.single(value.as_slice()).map_err(|e| match e.rv() {
        CKR_DATA_LEN_RANGE => Error::new(
            CKR_KEY_SIZE_RANGE,
            format!("this mechanism cannot wrap a key of {} bytes", value.len()),
        ),
        _ => e,
    })
}

/// C_UnwrapKey: the new key object.
fn unwrap(
    t: &Token,
    h: CK_SESSION_HANDLE,
    m: Mechanism,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: &[u8],
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<Object> {
    let info = mech_for(&m, CKF_UNWRAP, "unwrap keys")?;
    let u = wrap_key_object(t, unwrapping, info, true)?;
    // PKCS#1 v1.5 unwrap is PKCS#1 v1.5 decryption: the same per-key opt-in.
    super::ops::pkcs1_decrypt_allowed(&u, &m, "C_UnwrapKey")?;
    // The unwrapping key's CKA_UNWRAP_TEMPLATE is part of every unwrap through it.
    let mut template = template.to_vec();
    if let Some(required) = u
        .stored
        .as_ref()
        .and_then(|s| s.attrs.get(&CKA_UNWRAP_TEMPLATE))
    {
        let given = collapse(&template)?;
        for (ty, v) in decode_template(required) {
            match given.get(&ty) {
                Some(g) if *g != v => {
                    return Err(Error::new(
                        CKR_TEMPLATE_INCONSISTENT,
                        format!(
                        "attribute {ty:#x} contradicts the unwrapping key's CKA_UNWRAP_TEMPLATE"
                    ),
                    ))
                }
                Some(_) => {}
                None => template.push((ty, v)),
            }
        }
    }
    let attrs = factory::new_object(Origin::Unwrap, &template, &[], None)?;
    if factory::ulong(&attrs, CKA_CLASS) != Some(CKO_SECRET_KEY) {
        return Err(Error::new(
            CKR_TEMPLATE_INCONSISTENT,
            "only secret keys are unwrapped by this token (CKA_CLASS = CKO_SECRET_KEY)",
        ));
    }
    // Unwrapped keys stay secret: unwrapping as non-sensitive would read any key wrapped
    // under this one in the clear.
    if !flag(&attrs, CKA_SENSITIVE) {
        return Err(Error::new(
            CKR_TEMPLATE_INCONSISTENT,
            "unwrapped keys are sensitive (CKA_SENSITIVE = FALSE refused)",
        ));
    }
    let unwrapper_crypts = u.flag(CKA_ENCRYPT) || u.flag(CKA_DECRYPT);
    if unwrapper_crypts && (flag(&attrs, CKA_WRAP) || flag(&attrs, CKA_UNWRAP)) {
        return Err(Error::new(
            CKR_TEMPLATE_INCONSISTENT,
            "a key unwrapped by a key that also encrypts or decrypts cannot become a wrapping key (its value may be known)",
        ));
    }
    check_private(t, &attrs)?;
    if wrapped.is_empty() {
        return Err(Error::new(
            CKR_WRAPPED_KEY_LEN_RANGE,
            "the wrapped key is empty",
        ));
    }
    let mut op = CipherOp::new(m, cipher_key(&u)?, false)?;
    let value = op.single(wrapped).map_err(|e| match e.rv() {
        CKR_ENCRYPTED_DATA_INVALID => Error::new(
            CKR_WRAPPED_KEY_INVALID,
            "the wrapped key does not unwrap (integrity check failed)",
        ),
        CKR_ENCRYPTED_DATA_LEN_RANGE | CKR_DATA_LEN_RANGE => Error::new(
            CKR_WRAPPED_KEY_LEN_RANGE,
            "the wrapped key has an impossible length",
        ),
        _ => e,
    })?;
    let secret = SecretBytes::in_arena_from(&value);
    material::secret_key(h, attrs, secret)
}

/// The two templates of a key pair, with the pair's role decided together: a pair whose
/// public half wraps or whose private half unwraps does not encrypt / decrypt unless asked
/// (which `check_roles` then refuses).
fn pair_attrs(
    public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    key_type: CK_KEY_TYPE,
    ckm: CK_MECHANISM_TYPE,
) -> Result<(factory::Attrs, factory::Attrs)> {
    let mut pub_a = material::key_attrs(
        Origin::Generate,
        public,
        CKO_PUBLIC_KEY,
        Some(key_type),
        Some(ckm),
    )?;
    let mut priv_a = material::key_attrs(
        Origin::Generate,
        private,
        CKO_PRIVATE_KEY,
        Some(key_type),
        Some(ckm),
    )?;
    let wrap_role = flag(&pub_a, CKA_WRAP) || flag(&priv_a, CKA_UNWRAP);
    if wrap_role {
        let (gp, gq) = (collapse(public)?, collapse(private)?);
        if !gp.contains_key(&CKA_ENCRYPT) {
            pub_a.insert(CKA_ENCRYPT, vec![0]);
        }
        if !gq.contains_key(&CKA_DECRYPT) {
            priv_a.insert(CKA_DECRYPT, vec![0]);
        }
    }
    let mut both = pub_a.clone();
    for ty in [CKA_DECRYPT, CKA_UNWRAP] {
        if flag(&priv_a, ty) {
            both.insert(
                if ty == CKA_DECRYPT {
                    CKA_ENCRYPT
                } else {
                    CKA_WRAP
                },
                vec![1],
            );
        }
    }
    factory::check_roles(&both)?;
    Ok((pub_a, priv_a))
}

p11_fn! {
    fn C_GenerateKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph: *mut CK_OBJECT_HANDLE) [h, count] {
        let inst = instance()?;
        mechanism_arg(p_mech)?;
        handle_out(ph, "phKey")?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let info = mech_for(&m, CKF_GENERATE, "generate a secret key (use C_GenerateKeyPair for key pairs)")?;
        let key_type = info.key.unwrap_or(CKK_GENERIC_SECRET);
        let attrs = material::key_attrs(Origin::Generate, &template, CKO_SECRET_KEY, Some(key_type), Some(info.ckm))?;
        check_private(t, &attrs)?;
        let len = factory::ulong(&attrs, CKA_VALUE_LEN).unwrap_or(0) as usize;
        material::check_secret_len(key_type, len, CKR_ATTRIBUTE_VALUE_INVALID)?;
        let mut secret = SecretBytes::in_arena(len);
        crate::crypto::random(secret.as_mut_slice())?;
        let o = material::secret_key(h, attrs, secret)?;
        // SAFETY: checked API out-pointer.
        unsafe { install(t, o, ph) }
    }

    fn C_GenerateKeyPair(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, p_pub: *mut CK_ATTRIBUTE, n_pub: CK_ULONG, p_priv: *mut CK_ATTRIBUTE, n_priv: CK_ULONG, ph_pub: *mut CK_OBJECT_HANDLE, ph_priv: *mut CK_OBJECT_HANDLE) [h, n_pub, n_priv] {
        let inst = instance()?;
        mechanism_arg(p_mech)?;
        handle_out(ph_pub, "phPublicKey")?;
        handle_out(ph_priv, "phPrivateKey")?;
        // SAFETY: API templates.
        let public = unsafe { read_template(p_pub, n_pub)? };
        let private = unsafe { read_template(p_priv, n_priv)? };
        let (_, t) = inst.module.session_token(h)?;
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let info = mech_for(&m, CKF_GENERATE_KEY_PAIR, "generate a key pair")?;
        let key_type = info.key.unwrap_or(CKK_RSA);
        let (pub_a, priv_a) = pair_attrs(&public, &private, key_type, info.ckm)?;
        check_private(t, &pub_a)?;
        check_private(t, &priv_a)?;
        let key = if key_type == CKK_RSA {
            let bits = factory::ulong(&pub_a, CKA_MODULUS_BITS).unwrap_or(0) as usize;
            let e = pub_a.get(&CKA_PUBLIC_EXPONENT).cloned().unwrap_or_else(|| vec![1, 0, 1]);
            if !(2048..=4096).contains(&bits) {
                return Err(Error::new(CKR_ATTRIBUTE_VALUE_INVALID, format!("CKA_MODULUS_BITS must be 2048..4096, got {bits}")));
            }
            AsymKey::generate_rsa(bits, &e)?
        } else {
            let params = pub_a.get(&CKA_EC_PARAMS).map(Vec::as_slice).unwrap_or_default();
            let curve = Curve::from_params_der(params).ok_or_else(|| {
                Error::new(CKR_CURVE_NOT_SUPPORTED, "CKA_EC_PARAMS must name P-256, P-384 or P-521")
            })?;
            AsymKey::generate_ec(curve)?
        };
        let public_half = Arc::new(AsymKey::from_spki(&key.info.spki_der)?);
        let pub_o = material::asym_key(h, pub_a, public_half);
        let priv_o = material::asym_key(h, priv_a, Arc::new(key));
        let (hp, hq) = (pub_o.handle, priv_o.handle);
        t.add_session_object(pub_o);
        t.add_session_object(priv_o);
        // SAFETY: checked API out-pointers.
        unsafe {
            super::out(ph_pub, hp, "phPublicKey")?;
            super::out(ph_priv, hq, "phPrivateKey")
        }
    }

    fn C_WrapKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, wrapping: CK_OBJECT_HANDLE, key: CK_OBJECT_HANDLE, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, wrapping, key] {
        let inst = instance()?;
        mechanism_arg(p_mech)?;
        // SAFETY: API length pointer (read only to check it).
        unsafe { read_len(p_out_len, "pulWrappedKeyLen")? };
        let (_, t) = inst.module.session_token(h)?;
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let wrapped = wrap(t, m, wrapping, key)?;
        // SAFETY: API output buffer and length.
        unsafe { deliver(p_out, p_out_len, &wrapped) }.map(|_| ())
    }

    fn C_UnwrapKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, unwrapping: CK_OBJECT_HANDLE, p_wrapped: *mut CK_BYTE, wrapped_len: CK_ULONG, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph: *mut CK_OBJECT_HANDLE) [h, unwrapping, wrapped_len, count] {
        let inst = instance()?;
        mechanism_arg(p_mech)?;
        handle_out(ph, "phKey")?;
        // SAFETY: API input buffer and template.
        let wrapped = unsafe { input(p_wrapped, wrapped_len, "pWrappedKey")? };
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let o = unwrap(t, h, m, unwrapping, wrapped, &template)?;
        // SAFETY: checked API out-pointer.
        unsafe { install(t, o, ph) }
    }

    fn C_DeriveKey(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, base: CK_OBJECT_HANDLE, p_template: *mut CK_ATTRIBUTE, count: CK_ULONG, ph: *mut CK_OBJECT_HANDLE) [h, base, count] {
        let inst = instance()?;
        mechanism_arg(p_mech)?;
        handle_out(ph, "phKey")?;
        // SAFETY: API template.
        let template = unsafe { read_template(p_template, count)? };
        let (_, t) = inst.module.session_token(h)?;
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let o = derive(t, h, m, base, &template)?;
        // SAFETY: checked API out-pointer.
        unsafe { install(t, o, ph) }
    }
}

/// C_DeriveKey: a secret key from a base key through the mechanism's family.
fn derive(
    t: &Token,
    h: CK_SESSION_HANDLE,
    m: Mechanism,
    base: CK_OBJECT_HANDLE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<Object> {
    let info = mech_for(&m, CKF_DERIVE, "derive keys")?;
    let b = t.object(base).map_err(|_| {
        Error::new(
            CKR_KEY_HANDLE_INVALID,
            format!("key handle {base} is not valid"),
        )
    })?;
    let Body::PrivateKey { key, .. } = &b.body else {
        return Err(Error::new(
            CKR_KEY_TYPE_INCONSISTENT,
            "ECDH derives from a private EC key",
        ));
    };
    if b.key_type() != info.key {
        return Err(Error::new(
            CKR_KEY_TYPE_INCONSISTENT,
            "ECDH derives from a private EC key",
        ));
    }
    if !b.flag(CKA_DERIVE) {
        return Err(Error::new(
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "the key may not derive (CKA_DERIVE = FALSE)",
        ));
    }
    if !b.allows(info.ckm) {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            "the mechanism is not allowed for this key",
        ));
    }
    let mut attrs = material::key_attrs(Origin::Derive, template, CKO_SECRET_KEY, None, None)?;
    check_private(t, &attrs)?;
    let key_type = factory::ulong(&attrs, CKA_KEY_TYPE).unwrap_or(CKK_GENERIC_SECRET);
    let field = match &key.info.parts {
        crate::crypto::pkey::PublicParts::Ec { curve, .. } => curve.field_len(),
        _ => 0,
    };
    let len = match (factory::ulong(&attrs, CKA_VALUE_LEN), key_type, &m) {
        (Some(n), _, _) => n as usize,
        (None, CKK_GENERIC_SECRET, Mechanism::Ecdh(p)) if p.kdf.is_none() => field,
        _ => {
            return Err(Error::new(
                CKR_TEMPLATE_INCOMPLETE,
                "CKA_VALUE_LEN is needed for this derived key",
            ))
        }
    };
    material::check_secret_len(key_type, len, CKR_TEMPLATE_INCONSISTENT)?;
    let secret = info.family.derive(&m, key, len).unwrap_or_else(|| {
        Err(Error::new(
            CKR_MECHANISM_INVALID,
            "not a derivation mechanism",
        ))
    })?;
    // PKCS#11 §5.18.5: a derived key is always sensitive / never extractable only if its base
    // key was and it is itself.
    let always = b.flag(CKA_ALWAYS_SENSITIVE) && flag(&attrs, CKA_SENSITIVE);
    let never = b.flag(CKA_NEVER_EXTRACTABLE) && !flag(&attrs, CKA_EXTRACTABLE);
    attrs.insert(CKA_ALWAYS_SENSITIVE, vec![always as u8]);
    attrs.insert(CKA_NEVER_EXTRACTABLE, vec![never as u8]);
    material::secret_key(h, attrs, secret)
}
