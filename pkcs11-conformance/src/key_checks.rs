//! Session objects and key management, for any module: creating, modifying, copying and
//! destroying session objects (the template codes, latching attributes, lifetime), generating
//! keys, wrapping and unwrapping, and the published key-management attacks (Clulow 2003:
//! wrap-then-decrypt, encrypt-then-unwrap, unwrap as non-sensitive, wrapping unextractable
//! keys). The attack checks are security policy on top of the spec: a module that allows an
//! attack departs from what a key-protecting token must do.

use crate::checks::{expect, login, slot_of, with_init, Outcome, Target};
use crate::module::{call, mech, mech_with, rv_name, Module};
use cryptoki_sys::*;
use std::ptr;

/// Owned attribute values and the C template over them.
struct Tpl {
    _vals: Vec<Vec<u8>>,
    attrs: Vec<CK_ATTRIBUTE>,
}

fn tpl(entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Tpl {
    let mut vals: Vec<Vec<u8>> = entries.iter().map(|(_, v)| v.clone()).collect();
    let attrs = entries
        .iter()
        .zip(vals.iter_mut())
        .map(|((ty, _), v)| CK_ATTRIBUTE {
            type_: *ty,
            pValue: v.as_mut_ptr() as *mut _,
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect();
    Tpl { _vals: vals, attrs }
}

fn b(v: bool) -> Vec<u8> {
    vec![v as u8]
}
fn u(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn create(
    m: &Module,
    s: CK_SESSION_HANDLE,
    e: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = tpl(e);
    let mut h = 0;
    match call!(
        m,
        C_CreateObject,
        s,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG,
        &mut h
    ) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

fn set(
    m: &Module,
    s: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
    e: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> CK_RV {
    let mut t = tpl(e);
    call!(
        m,
        C_SetAttributeValue,
        s,
        o,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG
    )
}

fn generate(
    m: &Module,
    s: CK_SESSION_HANDLE,
    ckm: CK_MECHANISM_TYPE,
    e: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = tpl(e);
    let mut mk = mech(ckm);
    let mut h = 0;
    match call!(
        m,
        C_GenerateKey,
        s,
        &mut mk,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG,
        &mut h
    ) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

fn wrap(
    m: &Module,
    s: CK_SESSION_HANDLE,
    ckm: CK_MECHANISM_TYPE,
    w: CK_OBJECT_HANDLE,
    k: CK_OBJECT_HANDLE,
) -> Result<Vec<u8>, CK_RV> {
    let mut mk = mech(ckm);
    m.finish_sized(|out, len| call!(m, C_WrapKey, s, &mut mk, w, k, out, len))
}

fn unwrap(
    m: &Module,
    s: CK_SESSION_HANDLE,
    ckm: CK_MECHANISM_TYPE,
    w: CK_OBJECT_HANDLE,
    blob: &[u8],
    e: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut mk = mech(ckm);
    let mut t = tpl(e);
    let mut blob = blob.to_vec();
    let mut h = 0;
    match call!(
        m,
        C_UnwrapKey,
        s,
        &mut mk,
        w,
        blob.as_mut_ptr(),
        blob.len() as CK_ULONG,
        t.attrs.as_mut_ptr(),
        t.attrs.len() as CK_ULONG,
        &mut h
    ) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

fn aes_template(extra: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let mut v = vec![
        (CKA_CLASS, u(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, u(CKK_AES)),
        (CKA_TOKEN, b(false)),
    ];
    v.extend_from_slice(extra);
    v
}

/// AES-GCM of a fixed message under `k` (equal outputs: equal keys).
fn gcm(m: &Module, s: CK_SESSION_HANDLE, k: CK_OBJECT_HANDLE) -> Result<Vec<u8>, CK_RV> {
    let mut iv = [4u8; 12];
    let mut p = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: ptr::null_mut(),
        ulAADLen: 0,
        ulTagBits: 128,
    };
    let mut mk = mech_with(CKM_AES_GCM, &mut p);
    m.encrypt(s, &mut mk, k, b"same key, same output")
}

fn bool_attr(
    m: &Module,
    s: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
    ty: CK_ATTRIBUTE_TYPE,
) -> Result<bool, String> {
    m.attribute(s, o, ty)
        .map(|v| v.first() == Some(&CK_TRUE))
        .map_err(|rv| format!("C_GetAttributeValue({ty:#x}): {}", rv_name(rv)))
}

pub fn session_objects(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        let other = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        expect(
            "C_CreateObject without CKA_CLASS",
            create(m, s, &[(CKA_LABEL, b"x".to_vec())])
                .err()
                .unwrap_or(CKR_OK),
            &[CKR_TEMPLATE_INCOMPLETE],
        )?;
        expect(
            "C_CreateObject with CKA_ALWAYS_SENSITIVE",
            create(
                m,
                s,
                &aes_template(&[(CKA_VALUE, vec![1; 32]), (CKA_ALWAYS_SENSITIVE, b(true))]),
            )
            .err()
            .unwrap_or(CKR_OK),
            &[CKR_ATTRIBUTE_READ_ONLY, CKR_TEMPLATE_INCONSISTENT],
        )?;
        expect(
            "C_CreateObject with a malformed CK_BBOOL",
            create(
                m,
                s,
                &aes_template(&[(CKA_VALUE, vec![1; 32]), (CKA_ENCRYPT, vec![1, 1])]),
            )
            .err()
            .unwrap_or(CKR_OK),
            &[CKR_ATTRIBUTE_VALUE_INVALID],
        )?;
        expect(
            "C_CreateObject with an AES key of 15 bytes",
            create(m, s, &aes_template(&[(CKA_VALUE, vec![1; 15])]))
                .err()
                .unwrap_or(CKR_OK),
            &[CKR_ATTRIBUTE_VALUE_INVALID, CKR_TEMPLATE_INCONSISTENT],
        )?;
        let value: Vec<u8> = (0..32).collect();
        let k = create(
            m,
            s,
            &aes_template(&[
                (CKA_VALUE, value.clone()),
                (CKA_SENSITIVE, b(false)),
                (CKA_EXTRACTABLE, b(true)),
                (CKA_ENCRYPT, b(true)),
                (CKA_LABEL, b"conformance".to_vec()),
            ]),
        )
        .map_err(|rv| format!("C_CreateObject(AES session key): {}", rv_name(rv)))?;
        if m.attribute(other, k, CKA_VALUE).map_err(rv_name)? != value {
            return Err("a session key's CKA_VALUE does not read back from another session".into());
        }
        expect(
            "C_SetAttributeValue(CKA_SENSITIVE = TRUE)",
            set(m, s, k, &[(CKA_SENSITIVE, b(true))]),
            &[CKR_OK],
        )?;
        expect(
            "CKA_VALUE of a now sensitive key",
            m.attribute(s, k, CKA_VALUE).err().unwrap_or(CKR_OK),
            &[CKR_ATTRIBUTE_SENSITIVE],
        )?;
        expect(
            "CKA_SENSITIVE back to FALSE",
            set(m, s, k, &[(CKA_SENSITIVE, b(false))]),
            &[CKR_ATTRIBUTE_READ_ONLY],
        )?;
        expect(
            "CKA_EXTRACTABLE = FALSE",
            set(m, s, k, &[(CKA_EXTRACTABLE, b(false))]),
            &[CKR_OK],
        )?;
        expect(
            "CKA_EXTRACTABLE back to TRUE",
            set(m, s, k, &[(CKA_EXTRACTABLE, b(true))]),
            &[CKR_ATTRIBUTE_READ_ONLY],
        )?;
        if bool_attr(m, s, k, CKA_ALWAYS_SENSITIVE)? {
            return Err("a key created non-sensitive reports CKA_ALWAYS_SENSITIVE = TRUE".into());
        }
        let mut c = 0;
        let mut ct = tpl(&[(CKA_LABEL, b"copy".to_vec())]);
        expect(
            "C_CopyObject",
            call!(m, C_CopyObject, other, k, ct.attrs.as_mut_ptr(), 1, &mut c),
            &[CKR_OK],
        )?;
        if !bool_attr(m, s, c, CKA_SENSITIVE)? {
            return Err("the copy of a sensitive key is not sensitive".into());
        }
        // Lifetime: the key dies with its session; the copy lives in the other.
        expect("C_CloseSession", m.close_session(s), &[CKR_OK])?;
        expect(
            "a closed session's object",
            m.attribute(other, k, CKA_CLASS).err().unwrap_or(CKR_OK),
            &[CKR_OBJECT_HANDLE_INVALID],
        )?;
        m.attribute(other, c, CKA_CLASS).map_err(|rv| {
            format!(
                "the copy after its source's session closed: {}",
                rv_name(rv)
            )
        })?;
        expect(
            "C_DestroyObject",
            call!(m, C_DestroyObject, other, c),
            &[CKR_OK],
        )?;
        expect(
            "a destroyed object",
            m.attribute(other, c, CKA_CLASS).err().unwrap_or(CKR_OK),
            &[CKR_OBJECT_HANDLE_INVALID],
        )?;
        // CKA_TOKEN = TRUE: created (a writable token: removed again) or write-protected.
        match create(
            m,
            other,
            &[
                (CKA_CLASS, u(CKO_DATA)),
                (CKA_TOKEN, b(true)),
                (CKA_PRIVATE, b(false)),
            ],
        ) {
            Ok(h) => {
                call!(m, C_DestroyObject, other, h);
            }
            Err(rv) => expect(
                "C_CreateObject(CKA_TOKEN = TRUE)",
                rv,
                &[CKR_TOKEN_WRITE_PROTECTED, CKR_SESSION_READ_ONLY],
            )?,
        }
        Ok(String::new())
    })
}

pub fn generation_and_wrap(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, true).map_err(rv_name)?;
        login(t, s)?;
        let d = generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_EXTRACTABLE, b(true)),
                (CKA_SENSITIVE, b(true)),
                (CKA_ENCRYPT, b(true)),
            ]),
        )
        .map_err(|rv| format!("C_GenerateKey(AES-256): {}", rv_name(rv)))?;
        if !bool_attr(m, s, d, CKA_LOCAL)? || !bool_attr(m, s, d, CKA_ALWAYS_SENSITIVE)? {
            return Err("a generated sensitive key is not CKA_LOCAL / CKA_ALWAYS_SENSITIVE".into());
        }
        if bool_attr(m, s, d, CKA_NEVER_EXTRACTABLE)? {
            return Err("an extractable generated key reports CKA_NEVER_EXTRACTABLE = TRUE".into());
        }
        let w = generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_WRAP, b(true)),
                (CKA_UNWRAP, b(true)),
                (CKA_ENCRYPT, b(false)),
                (CKA_DECRYPT, b(false)),
            ]),
        )
        .map_err(|rv| format!("C_GenerateKey(AES-256 wrapping key): {}", rv_name(rv)))?;
        let blob = wrap(m, s, CKM_AES_KEY_WRAP, w, d)
            .map_err(|rv| format!("C_WrapKey(CKM_AES_KEY_WRAP): {}", rv_name(rv)))?;
        if blob.len() != 40 {
            return Err(format!(
                "RFC 3394 wrap of 32 bytes is 40 bytes, got {}",
                blob.len()
            ));
        }
        let back = unwrap(
            m,
            s,
            CKM_AES_KEY_WRAP,
            w,
            &blob,
            &aes_template(&[(CKA_ENCRYPT, b(true))]),
        )
        .map_err(|rv| format!("C_UnwrapKey(CKM_AES_KEY_WRAP): {}", rv_name(rv)))?;
        if gcm(m, s, d).map_err(rv_name)? != gcm(m, s, back).map_err(rv_name)? {
            return Err("the unwrapped key encrypts differently from the wrapped one".into());
        }
        if bool_attr(m, s, back, CKA_ALWAYS_SENSITIVE)?
            || bool_attr(m, s, back, CKA_NEVER_EXTRACTABLE)?
        {
            return Err(
                "an unwrapped key reports CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE".into(),
            );
        }
        let fixed = generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[(CKA_VALUE_LEN, u(16)), (CKA_EXTRACTABLE, b(false))]),
        )
        .map_err(rv_name)?;
        expect(
            "C_WrapKey(unextractable key)",
            wrap(m, s, CKM_AES_KEY_WRAP, w, fixed)
                .err()
                .unwrap_or(CKR_OK),
            &[CKR_KEY_UNEXTRACTABLE],
        )?;
        let mut bad = blob.clone();
        bad[5] ^= 1;
        expect(
            "C_UnwrapKey(tampered blob)",
            unwrap(m, s, CKM_AES_KEY_WRAP, w, &bad, &aes_template(&[]))
                .err()
                .unwrap_or(CKR_OK),
            &[CKR_WRAPPED_KEY_INVALID, CKR_ENCRYPTED_DATA_INVALID],
        )?;
        Ok(String::new())
    })
}

/// The attacks, each answered: CKR_OK means the module let it happen.
pub fn wrap_attacks(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, true).map_err(rv_name)?;
        login(t, s)?;
        let mut allowed = Vec::new();
        // Wrap-then-decrypt: a key that both wraps and decrypts.
        match generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_WRAP, b(true)),
                (CKA_DECRYPT, b(true)),
            ]),
        ) {
            Ok(_) => allowed.push("a key with both CKA_WRAP and CKA_DECRYPT (wrap-then-decrypt)"),
            Err(rv) => expect(
                "wrap+decrypt key",
                rv,
                &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_VALUE_INVALID],
            )?,
        }
        // Encrypt-then-unwrap: a key that both encrypts and unwraps.
        match generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_UNWRAP, b(true)),
                (CKA_ENCRYPT, b(true)),
            ]),
        ) {
            Ok(_) => {
                allowed.push("a key with both CKA_UNWRAP and CKA_ENCRYPT (encrypt-then-unwrap)")
            }
            Err(rv) => expect(
                "unwrap+encrypt key",
                rv,
                &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_VALUE_INVALID],
            )?,
        }
        // A wrapping key of known value (created from the caller's bytes).
        match create(
            m,
            s,
            &aes_template(&[
                (CKA_VALUE, vec![7; 32]),
                (CKA_WRAP, b(true)),
                (CKA_ENCRYPT, b(false)),
                (CKA_DECRYPT, b(false)),
            ]),
        ) {
            Ok(_) => {
                allowed.push("a wrapping key of caller-known value (C_CreateObject with CKA_WRAP)")
            }
            Err(rv) => expect(
                "wrapping key of known value",
                rv,
                &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_VALUE_INVALID],
            )?,
        }
        // Unwrap as non-sensitive: read a sensitive key through wrap + unwrap.
        let w = generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_WRAP, b(true)),
                (CKA_UNWRAP, b(true)),
                (CKA_ENCRYPT, b(false)),
                (CKA_DECRYPT, b(false)),
            ]),
        )
        .map_err(|rv| format!("C_GenerateKey(wrapping key): {}", rv_name(rv)))?;
        let d = generate(
            m,
            s,
            CKM_AES_KEY_GEN,
            &aes_template(&[
                (CKA_VALUE_LEN, u(32)),
                (CKA_EXTRACTABLE, b(true)),
                (CKA_SENSITIVE, b(true)),
            ]),
        )
        .map_err(rv_name)?;
        let blob = wrap(m, s, CKM_AES_KEY_WRAP, w, d)
            .map_err(|rv| format!("C_WrapKey: {}", rv_name(rv)))?;
        match unwrap(
            m,
            s,
            CKM_AES_KEY_WRAP,
            w,
            &blob,
            &aes_template(&[(CKA_SENSITIVE, b(false)), (CKA_EXTRACTABLE, b(true))]),
        ) {
            Ok(k) if m.attribute(s, k, CKA_VALUE).is_ok() => {
                allowed.push("unwrapping a sensitive key as non-sensitive and reading it")
            }
            Ok(_) => {}
            Err(rv) => expect(
                "unwrap as non-sensitive",
                rv,
                &[CKR_TEMPLATE_INCONSISTENT, CKR_ATTRIBUTE_VALUE_INVALID],
            )?,
        }
        if allowed.is_empty() {
            Ok("4 attacks refused".into())
        } else {
            Err(format!("allowed: {}", allowed.join("; ")))
        }
    })
}
