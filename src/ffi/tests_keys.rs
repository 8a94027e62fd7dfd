//! Session objects, key generation, wrap / unwrap and the secret-key mechanisms through the
//! function table, in process. Every result is checked with an independent implementation
//! (RustCrypto); every refused key-management attack with its CK_RV.

use super::tests::{fl, mech, mech_with, Live};
use cryptoki_sys::*;
use std::ptr::null_mut;

macro_rules! call {
    ($f:ident($($a:expr),*)) => {
        // SAFETY: test calls with valid or deliberately NULL arguments.
        unsafe { (fl().$f.unwrap())($($a),*) }
    };
}

fn b(v: bool) -> Vec<u8> {
    vec![v as u8]
}
fn u(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// A C template over owned values.
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
            pValue: if v.is_empty() {
                null_mut()
            } else {
                v.as_mut_ptr() as *mut _
            },
            ulValueLen: v.len() as CK_ULONG,
        })
        .collect();
    Tpl { _vals: vals, attrs }
}

impl Tpl {
    fn p(&mut self) -> *mut CK_ATTRIBUTE {
        self.attrs.as_mut_ptr()
    }
    fn n(&self) -> CK_ULONG {
        self.attrs.len() as CK_ULONG
    }
}

fn create(
    s: CK_SESSION_HANDLE,
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = tpl(entries);
    let mut h = 0;
    match call!(C_CreateObject(s, t.p(), t.n(), &mut h)) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

fn get(s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, ty: CK_ATTRIBUTE_TYPE) -> Result<Vec<u8>, CK_RV> {
    let mut a = CK_ATTRIBUTE {
        type_: ty,
        pValue: null_mut(),
        ulValueLen: 0,
    };
    let rv = call!(C_GetAttributeValue(s, o, &mut a, 1));
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut v = vec![0u8; a.ulValueLen as usize];
    a.pValue = v.as_mut_ptr() as *mut _;
    match call!(C_GetAttributeValue(s, o, &mut a, 1)) {
        CKR_OK => Ok(v),
        rv => Err(rv),
    }
}

fn set(
    s: CK_SESSION_HANDLE,
    o: CK_OBJECT_HANDLE,
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> CK_RV {
    let mut t = tpl(entries);
    call!(C_SetAttributeValue(s, o, t.p(), t.n()))
}

fn find(s: CK_SESSION_HANDLE, entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Vec<CK_OBJECT_HANDLE> {
    let mut t = tpl(entries);
    assert_eq!(call!(C_FindObjectsInit(s, t.p(), t.n())), CKR_OK);
    let mut out = [0; 64];
    let mut n = 0;
    assert_eq!(
        call!(C_FindObjects(s, out.as_mut_ptr(), 64, &mut n)),
        CKR_OK
    );
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
    out[..n as usize].to_vec()
}

fn aes_key(
    value: &[u8],
    extra: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let mut v = vec![
        (CKA_CLASS, u(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, u(CKK_AES)),
        (CKA_TOKEN, b(false)),
        (CKA_VALUE, value.to_vec()),
    ];
    v.extend_from_slice(extra);
    v
}

/// Run a single-part producing call twice (size query, then the call).
fn produce(mut f: impl FnMut(*mut u8, *mut CK_ULONG) -> CK_RV) -> Result<Vec<u8>, CK_RV> {
    let mut len = 0;
    let rv = f(null_mut(), &mut len);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut out = vec![0u8; len as usize];
    let rv = f(out.as_mut_ptr(), &mut len);
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(len as usize);
    Ok(out)
}

fn encrypt(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    k: CK_OBJECT_HANDLE,
    data: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    let rv = call!(C_EncryptInit(s, m, k));
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut d = data.to_vec();
    produce(|o, l| call!(C_Encrypt(s, d.as_mut_ptr(), d.len() as CK_ULONG, o, l)))
}

fn decrypt(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    k: CK_OBJECT_HANDLE,
    data: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    let rv = call!(C_DecryptInit(s, m, k));
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut d = data.to_vec();
    produce(|o, l| call!(C_Decrypt(s, d.as_mut_ptr(), d.len() as CK_ULONG, o, l)))
}

fn sign(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    k: CK_OBJECT_HANDLE,
    data: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    let rv = call!(C_SignInit(s, m, k));
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut d = data.to_vec();
    produce(|o, l| call!(C_Sign(s, d.as_mut_ptr(), d.len() as CK_ULONG, o, l)))
}

fn verify(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    k: CK_OBJECT_HANDLE,
    data: &[u8],
    sig: &[u8],
) -> CK_RV {
    let rv = call!(C_VerifyInit(s, m, k));
    if rv != CKR_OK {
        return rv;
    }
    let (mut d, mut g) = (data.to_vec(), sig.to_vec());
    call!(C_Verify(
        s,
        d.as_mut_ptr(),
        d.len() as CK_ULONG,
        g.as_mut_ptr(),
        g.len() as CK_ULONG
    ))
}

fn gcm_params(iv: &mut [u8; 12]) -> CK_GCM_PARAMS {
    CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: null_mut(),
        ulAADLen: 0,
        ulTagBits: 128,
    }
}

fn rustcrypto_gcm_encrypt(key: &[u8], iv: &[u8; 12], pt: &[u8]) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit};
    aes_gcm::Aes256Gcm::new_from_slice(key)
        .unwrap()
        .encrypt(&aes_gcm::Nonce::from(*iv), pt)
        .unwrap()
}

fn aes_ecb_zero_block(key: &[u8]) -> Vec<u8> {
    use ::aes::cipher::{BlockEncrypt, KeyInit};
    let mut block = ::aes::Block::default();
    ::aes::Aes256::new_from_slice(key)
        .unwrap()
        .encrypt_block(&mut block);
    block.to_vec()
}

#[test]
fn session_secret_key_attributes_latch_and_die_with_the_session() {
    let live = Live::new("");
    let s = live.session(false);
    let other = live.session(false);
    live.login();
    let value: Vec<u8> = (1..=32).collect();
    let k = create(
        s,
        &aes_key(
            &value,
            &[
                (CKA_LABEL, b"dk".to_vec()),
                (CKA_SENSITIVE, b(false)),
                (CKA_EXTRACTABLE, b(true)),
            ],
        ),
    )
    .unwrap();
    // Read back: the value (neither sensitive nor unextractable), derived attributes.
    assert_eq!(get(s, k, CKA_VALUE).unwrap(), value);
    assert_eq!(get(s, k, CKA_VALUE_LEN).unwrap(), u(32));
    assert_eq!(
        get(s, k, CKA_CHECK_VALUE).unwrap(),
        aes_ecb_zero_block(&value)[..3]
    );
    assert_eq!(get(s, k, CKA_TOKEN).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_PRIVATE).unwrap(), b(true));
    assert_eq!(get(s, k, CKA_LOCAL).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_ALWAYS_SENSITIVE).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_NEVER_EXTRACTABLE).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_ENCRYPT).unwrap(), b(true));
    assert_eq!(get(s, k, CKA_WRAP).unwrap(), b(false));
    // Visible from every session of the token, found by its label.
    assert_eq!(find(other, &[(CKA_LABEL, b"dk".to_vec())]), vec![k]);
    let mut size = 0;
    assert_eq!(call!(C_GetObjectSize(s, k, &mut size)), CKR_OK);
    assert!(size as usize >= 32);
    // Latching: SENSITIVE only to TRUE, EXTRACTABLE only to FALSE.
    assert_eq!(set(s, k, &[(CKA_LABEL, b"renamed".to_vec())]), CKR_OK);
    assert_eq!(get(s, k, CKA_LABEL).unwrap(), b"renamed");
    assert_eq!(set(s, k, &[(CKA_SENSITIVE, b(true))]), CKR_OK);
    assert_eq!(get(s, k, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    assert_eq!(
        set(s, k, &[(CKA_SENSITIVE, b(false))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    assert_eq!(set(s, k, &[(CKA_EXTRACTABLE, b(false))]), CKR_OK);
    assert_eq!(
        set(s, k, &[(CKA_EXTRACTABLE, b(true))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    // ALWAYS_SENSITIVE stays FALSE: the key was not always sensitive.
    assert_eq!(get(s, k, CKA_ALWAYS_SENSITIVE).unwrap(), b(false));
    assert_eq!(
        set(s, k, &[(CKA_ALWAYS_SENSITIVE, b(true))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    assert_eq!(
        set(s, k, &[(CKA_VALUE, value.clone())]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    assert_eq!(
        set(s, k, &[(CKA_MODULUS, vec![1])]),
        CKR_ATTRIBUTE_TYPE_INVALID
    );
    // Copy: a new handle owned by the copier, the latches kept.
    let mut t = tpl(&[(CKA_LABEL, b"copy".to_vec())]);
    let mut c = 0;
    assert_eq!(call!(C_CopyObject(other, k, t.p(), t.n(), &mut c)), CKR_OK);
    assert_ne!(c, k);
    assert_eq!(get(s, c, CKA_SENSITIVE).unwrap(), b(true));
    let mut t = tpl(&[(CKA_TOKEN, b(true))]);
    assert_eq!(
        call!(C_CopyObject(s, k, t.p(), t.n(), &mut c)),
        CKR_TOKEN_WRITE_PROTECTED
    );
    // The key works: AES-GCM on the token opens with RustCrypto.
    let mut iv = [7u8; 12];
    let mut p = gcm_params(&mut iv);
    let mut m = mech_with(CKM_AES_GCM, &mut p);
    let ct = encrypt(s, &mut m, k, b"session key").unwrap();
    assert_eq!(ct, rustcrypto_gcm_encrypt(&value, &iv, b"session key"));
    // Dies with its session; the copy lives in the other session until that one closes.
    assert_eq!(call!(C_CloseSession(s)), CKR_OK);
    let s2 = live.session(false);
    assert_eq!(get(s2, k, CKA_LABEL), Err(CKR_OBJECT_HANDLE_INVALID));
    assert_eq!(get(s2, c, CKA_LABEL).unwrap(), b"copy");
    assert_eq!(call!(C_DestroyObject(s2, c)), CKR_OK);
    assert_eq!(call!(C_DestroyObject(s2, c)), CKR_OBJECT_HANDLE_INVALID);
}

#[test]
fn private_session_objects_need_and_die_with_the_login() {
    let live = Live::new("");
    let s = live.session(false);
    // Keys are private by default: not before C_Login.
    assert_eq!(
        create(s, &aes_key(&[1; 16], &[])),
        Err(CKR_USER_NOT_LOGGED_IN)
    );
    let data = [
        (CKA_CLASS, u(CKO_DATA)),
        (CKA_LABEL, b"note".to_vec()),
        (CKA_APPLICATION, b"app".to_vec()),
        (CKA_VALUE, b"public data".to_vec()),
    ];
    let d = create(s, &data).unwrap();
    assert_eq!(get(s, d, CKA_VALUE).unwrap(), b"public data");
    live.login();
    let k = create(s, &aes_key(&[1; 16], &[])).unwrap();
    assert_eq!(
        find(s, &[(CKA_CLASS, u(CKO_SECRET_KEY)), (CKA_TOKEN, b(false))]),
        vec![k]
    );
    // Logout: the private key dies, the public data object stays.
    assert_eq!(call!(C_Logout(s)), CKR_OK);
    assert_eq!(get(s, k, CKA_CLASS), Err(CKR_OBJECT_HANDLE_INVALID));
    live.login();
    assert_eq!(get(s, k, CKA_CLASS), Err(CKR_OBJECT_HANDLE_INVALID));
    assert_eq!(get(s, d, CKA_APPLICATION).unwrap(), b"app");
    // C_CloseAllSessions ends every session object.
    assert_eq!(call!(C_CloseAllSessions(1)), CKR_OK);
    let s = live.session(false);
    assert_eq!(get(s, d, CKA_CLASS), Err(CKR_OBJECT_HANDLE_INVALID));
    let inst = super::instance().unwrap();
    assert_eq!(inst.module.tokens[0].session_object_count(), 0);
}

#[test]
fn templates_are_checked_with_the_spec_codes() {
    let live = Live::new("");
    let s = live.session(true);
    live.login();
    let k = |extra: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]| create(s, &aes_key(&[5; 32], extra));
    assert_eq!(
        create(s, &[(CKA_LABEL, b"x".to_vec())]),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    assert_eq!(
        create(
            s,
            &[(CKA_CLASS, u(CKO_SECRET_KEY)), (CKA_VALUE, vec![1; 16])]
        ),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    assert_eq!(
        create(
            s,
            &[(CKA_CLASS, u(CKO_SECRET_KEY)), (CKA_KEY_TYPE, u(CKK_AES))]
        ),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    assert_eq!(
        create(s, &[(CKA_CLASS, u(CKO_DATA)), (CKA_TOKEN, b(true))]),
        Err(CKR_TOKEN_WRITE_PROTECTED)
    );
    assert_eq!(
        k(&[(CKA_MODULUS, vec![1])]),
        Err(CKR_ATTRIBUTE_TYPE_INVALID)
    );
    assert_eq!(
        k(&[(CKA_ENCRYPT, vec![1, 0])]),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        k(&[(CKA_START_DATE, b"2026-1-1".to_vec())]),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(k(&[(CKA_LOCAL, b(true))]), Err(CKR_ATTRIBUTE_READ_ONLY));
    assert_eq!(
        k(&[(CKA_ALWAYS_SENSITIVE, b(true))]),
        Err(CKR_ATTRIBUTE_READ_ONLY)
    );
    assert_eq!(k(&[(CKA_TRUSTED, b(true))]), Err(CKR_ATTRIBUTE_READ_ONLY));
    assert_eq!(k(&[(CKA_VALUE_LEN, u(32))]), Err(CKR_TEMPLATE_INCONSISTENT));
    assert_eq!(
        k(&[(CKA_SENSITIVE, b(true)), (CKA_SENSITIVE, b(false))]),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    assert_eq!(
        k(&[(CKA_WRAP, b(true)), (CKA_DECRYPT, b(true))]),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    assert_eq!(
        create(s, &aes_key(&[5; 15], &[])),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        create(
            s,
            &[
                (CKA_CLASS, u(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, u(CKK_DES3)),
                (CKA_VALUE, vec![1; 24])
            ]
        ),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        create(
            s,
            &[(CKA_CLASS, u(CKO_PRIVATE_KEY)), (CKA_KEY_TYPE, u(CKK_EC))]
        ),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    // A wrapping key defaults to no data role; asking for one is inconsistent.
    let w = k(&[(CKA_UNWRAP, b(true))]).unwrap();
    assert_eq!(get(s, w, CKA_ENCRYPT).unwrap(), b(false));
    assert_eq!(
        set(s, w, &[(CKA_DECRYPT, b(true))]),
        CKR_TEMPLATE_INCONSISTENT
    );
    // Not modifiable, not destroyable.
    let fixed = k(&[(CKA_MODIFIABLE, b(false)), (CKA_DESTROYABLE, b(false))]).unwrap();
    assert_eq!(
        set(s, fixed, &[(CKA_LABEL, b"x".to_vec())]),
        CKR_ACTION_PROHIBITED
    );
    assert_eq!(call!(C_DestroyObject(s, fixed)), CKR_ACTION_PROHIBITED);
    // Released keys: never extractable, never modified, copied or destroyed.
    let released = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(get(s, released, CKA_EXTRACTABLE).unwrap(), b(false));
    assert_eq!(get(s, released, CKA_NEVER_EXTRACTABLE).unwrap(), b(true));
    assert_eq!(
        set(s, released, &[(CKA_LABEL, b"x".to_vec())]),
        CKR_TOKEN_WRITE_PROTECTED
    );
    assert_eq!(
        call!(C_DestroyObject(s, released)),
        CKR_TOKEN_WRITE_PROTECTED
    );
    let mut h = 0;
    assert_eq!(
        call!(C_CopyObject(s, released, null_mut(), 0, &mut h)),
        CKR_ACTION_PROHIBITED
    );
    // NULL out-pointer: CKR_ARGUMENTS_BAD before the template is looked at.
    let mut t = tpl(&[(CKA_TOKEN, b(true))]);
    assert_eq!(
        call!(C_CreateObject(s, t.p(), t.n(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_CreateObject(s, null_mut(), 3, &mut h)),
        CKR_ARGUMENTS_BAD
    );
}

#[test]
fn created_public_keys_verify_what_released_keys_sign() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let rsa_priv = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa).unwrap();
    let pubk = create(
        s,
        &[
            (CKA_CLASS, u(CKO_PUBLIC_KEY)),
            (CKA_KEY_TYPE, u(CKK_RSA)),
            (CKA_MODULUS, rsa_priv.n().to_bytes_be()),
            (CKA_PUBLIC_EXPONENT, rsa_priv.e().to_bytes_be()),
        ],
    )
    .unwrap();
    assert_eq!(get(s, pubk, CKA_MODULUS_BITS).unwrap(), u(2048));
    assert_eq!(get(s, pubk, CKA_PRIVATE).unwrap(), b(false));
    let released = live.find(s, CKO_PRIVATE_KEY, 1);
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    let sig = sign(s, &mut m, released, b"msg").unwrap();
    assert_eq!(verify(s, &mut m, pubk, b"msg", &sig), CKR_OK);
    assert_eq!(
        verify(s, &mut m, pubk, b"other", &sig),
        CKR_SIGNATURE_INVALID
    );
    // EC: the point as a DER OCTET STRING, from RustCrypto.
    let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&live.f.ec).unwrap();
    let point = sk
        .verifying_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let ec = create(
        s,
        &[
            (CKA_CLASS, u(CKO_PUBLIC_KEY)),
            (CKA_KEY_TYPE, u(CKK_EC)),
            (
                CKA_EC_PARAMS,
                vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            ),
            (CKA_EC_POINT, crate::token::attr::der_octet_string(&point)),
        ],
    )
    .unwrap();
    use p256::ecdsa::signature::Signer;
    let sig: p256::ecdsa::Signature = sk.sign(b"ec msg");
    let mut m = mech(CKM_ECDSA_SHA256);
    assert_eq!(verify(s, &mut m, ec, b"ec msg", &sig.to_bytes()), CKR_OK);
    // Not a point: refused at creation.
    assert_eq!(
        create(
            s,
            &[
                (CKA_CLASS, u(CKO_PUBLIC_KEY)),
                (CKA_KEY_TYPE, u(CKK_EC)),
                (
                    CKA_EC_PARAMS,
                    vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
                ),
                (CKA_EC_POINT, vec![0x04, 3, 1, 2, 3]),
            ],
        ),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    // A certificate object: stored as given.
    let cert = create(
        s,
        &[
            (CKA_CLASS, u(CKO_CERTIFICATE)),
            (CKA_CERTIFICATE_TYPE, u(CKC_X_509)),
            (CKA_SUBJECT, b"subject".to_vec()),
            (CKA_VALUE, live.f.rsa_cert.clone()),
        ],
    )
    .unwrap();
    assert_eq!(get(s, cert, CKA_VALUE).unwrap(), live.f.rsa_cert);
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    assert_eq!(call!(C_VerifyInit(s, &mut m, cert)), CKR_KEY_HANDLE_INVALID);
}

fn gen_secret(
    s: CK_SESSION_HANDLE,
    ckm: CK_MECHANISM_TYPE,
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut m = mech(ckm);
    let mut t = tpl(entries);
    let mut h = 0;
    match call!(C_GenerateKey(s, &mut m, t.p(), t.n(), &mut h)) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

#[test]
fn generated_secret_keys_work_and_match_rustcrypto() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    // AES-256, extractable so that RustCrypto can check what the token computes with it.
    let k = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(32)),
            (CKA_SENSITIVE, b(false)),
            (CKA_EXTRACTABLE, b(true)),
        ],
    )
    .unwrap();
    let value = get(s, k, CKA_VALUE).unwrap();
    assert_eq!(value.len(), 32);
    assert_eq!(get(s, k, CKA_LOCAL).unwrap(), b(true));
    assert_eq!(
        get(s, k, CKA_KEY_GEN_MECHANISM).unwrap(),
        u(CKM_AES_KEY_GEN)
    );
    assert_eq!(get(s, k, CKA_ALWAYS_SENSITIVE).unwrap(), b(false));
    let mut iv = [1u8; 12];
    let mut p = gcm_params(&mut iv);
    let mut m = mech_with(CKM_AES_GCM, &mut p);
    assert_eq!(
        encrypt(s, &mut m, k, b"generated").unwrap(),
        rustcrypto_gcm_encrypt(&value, &iv, b"generated")
    );
    // AES-CTR with the same key, against the ctr crate.
    {
        use ctr::cipher::{KeyIvInit, StreamCipher};
        let mut cp = CK_AES_CTR_PARAMS {
            ulCounterBits: 128,
            cb: [0xAB; 16],
        };
        let mut m = mech_with(CKM_AES_CTR, &mut cp);
        let ct = encrypt(s, &mut m, k, b"counter mode text").unwrap();
        let mut theirs = b"counter mode text".to_vec();
        ctr::Ctr128BE::<::aes::Aes256>::new(value.as_slice().into(), &[0xAB; 16].into())
            .apply_keystream(&mut theirs);
        assert_eq!(ct, theirs);
        assert_eq!(decrypt(s, &mut m, k, &ct).unwrap(), b"counter mode text");
    }
    // AES-CMAC through C_Sign / C_Verify.
    {
        use cmac::Mac;
        let mut m = mech(CKM_AES_CMAC);
        let tag = sign(s, &mut m, k, b"mac me").unwrap();
        let mut c = <cmac::Cmac<::aes::Aes256> as Mac>::new_from_slice(&value).unwrap();
        c.update(b"mac me");
        assert_eq!(tag, c.finalize().into_bytes().to_vec());
        assert_eq!(verify(s, &mut m, k, b"mac me", &tag), CKR_OK);
        assert_eq!(
            verify(s, &mut m, k, b"mac you", &tag),
            CKR_SIGNATURE_INVALID
        );
    }
    // Defaults: sensitive, unextractable, always sensitive, never extractable.
    let d = gen_secret(s, CKM_AES_KEY_GEN, &[(CKA_VALUE_LEN, u(16))]).unwrap();
    assert_eq!(get(s, d, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    assert_eq!(get(s, d, CKA_ALWAYS_SENSITIVE).unwrap(), b(true));
    assert_eq!(get(s, d, CKA_NEVER_EXTRACTABLE).unwrap(), b(true));
    assert_eq!(
        gen_secret(s, CKM_AES_KEY_GEN, &[(CKA_VALUE_LEN, u(20))]),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        gen_secret(s, CKM_AES_KEY_GEN, &[]),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    assert_eq!(
        gen_secret(
            s,
            CKM_AES_KEY_GEN,
            &[(CKA_VALUE_LEN, u(16)), (CKA_VALUE, vec![0; 16])]
        ),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    assert_eq!(
        gen_secret(
            s,
            CKM_AES_KEY_GEN,
            &[
                (CKA_VALUE_LEN, u(16)),
                (CKA_KEY_TYPE, u(CKK_GENERIC_SECRET))
            ]
        ),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    assert_eq!(
        gen_secret(s, CKM_SHA256, &[(CKA_VALUE_LEN, u(16))]),
        Err(CKR_MECHANISM_INVALID)
    );
    // A generic secret for HMAC-SHA256, against the hmac crate.
    let g = gen_secret(
        s,
        CKM_GENERIC_SECRET_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(48)),
            (CKA_SENSITIVE, b(false)),
            (CKA_EXTRACTABLE, b(true)),
        ],
    )
    .unwrap();
    let gv = get(s, g, CKA_VALUE).unwrap();
    assert_eq!(gv.len(), 48);
    for (ckm, expected) in [
        (CKM_SHA256_HMAC, {
            use hmac::Mac;
            let mut h = hmac::Hmac::<sha2::Sha256>::new_from_slice(&gv).unwrap();
            h.update(b"hmac data");
            h.finalize().into_bytes().to_vec()
        }),
        (CKM_SHA512_HMAC, {
            use hmac::Mac;
            let mut h = hmac::Hmac::<sha2::Sha512>::new_from_slice(&gv).unwrap();
            h.update(b"hmac data");
            h.finalize().into_bytes().to_vec()
        }),
    ] {
        let mut m = mech(ckm);
        assert_eq!(sign(s, &mut m, g, b"hmac data").unwrap(), expected);
        assert_eq!(verify(s, &mut m, g, b"hmac data", &expected), CKR_OK);
    }
    // HMAC needs a generic secret; AES-GCM needs an AES key.
    let mut m = mech(CKM_SHA256_HMAC);
    assert_eq!(call!(C_SignInit(s, &mut m, k)), CKR_KEY_TYPE_INCONSISTENT);
    let mut p = gcm_params(&mut iv);
    let mut m = mech_with(CKM_AES_GCM, &mut p);
    assert_eq!(
        call!(C_EncryptInit(s, &mut m, g)),
        CKR_KEY_TYPE_INCONSISTENT
    );
}

fn gen_pair(
    s: CK_SESSION_HANDLE,
    ckm: CK_MECHANISM_TYPE,
    public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), CK_RV> {
    let mut m = mech(ckm);
    let (mut tp, mut tq) = (tpl(public), tpl(private));
    let (mut hp, mut hq) = (0, 0);
    match call!(C_GenerateKeyPair(
        s,
        &mut m,
        tp.p(),
        tp.n(),
        tq.p(),
        tq.n(),
        &mut hp,
        &mut hq
    )) {
        CKR_OK => Ok((hp, hq)),
        rv => Err(rv),
    }
}

const P256: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const P521: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];

/// The raw point of a CKA_EC_POINT (DER OCTET STRING).
fn ec_point(s: CK_SESSION_HANDLE, h: CK_OBJECT_HANDLE) -> Vec<u8> {
    let der = get(s, h, CKA_EC_POINT).unwrap();
    let off = if der[1] == 0x81 { 3 } else { 2 };
    der[off..].to_vec()
}

#[test]
fn generated_key_pairs_sign_what_rustcrypto_verifies() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    // RSA-2048 (e = 65537 by default).
    let (pubk, privk) = gen_pair(
        s,
        CKM_RSA_PKCS_KEY_PAIR_GEN,
        &[(CKA_MODULUS_BITS, u(2048))],
        &[],
    )
    .unwrap();
    let n = get(s, pubk, CKA_MODULUS).unwrap();
    assert_eq!(n.len(), 256);
    assert_eq!(get(s, privk, CKA_MODULUS).unwrap(), n);
    assert_eq!(
        get(s, privk, CKA_PRIVATE_EXPONENT),
        Err(CKR_ATTRIBUTE_SENSITIVE)
    );
    assert_eq!(get(s, privk, CKA_LOCAL).unwrap(), b(true));
    assert_eq!(get(s, privk, CKA_ALWAYS_SENSITIVE).unwrap(), b(true));
    let e = get(s, pubk, CKA_PUBLIC_EXPONENT).unwrap();
    let rp = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&n),
        rsa::BigUint::from_bytes_be(&e),
    )
    .unwrap();
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    let sig = sign(s, &mut m, privk, b"generated rsa").unwrap();
    use sha2::Digest;
    rp.verify(
        rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
        &sha2::Sha256::digest(b"generated rsa"),
        &sig,
    )
    .unwrap();
    // EC on every curve, verified by RustCrypto.
    for params in [P256.to_vec(), P384.to_vec(), P521.to_vec()] {
        let (pubk, privk) = gen_pair(
            s,
            CKM_EC_KEY_PAIR_GEN,
            &[(CKA_EC_PARAMS, params.clone())],
            &[],
        )
        .unwrap();
        assert_eq!(get(s, privk, CKA_EC_PARAMS).unwrap(), params);
        assert_eq!(get(s, privk, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
        let point = ec_point(s, pubk);
        let mut m = mech(CKM_ECDSA);
        match params.len() {
            10 => {
                use p256::ecdsa::signature::hazmat::PrehashVerifier;
                let h = sha2::Sha256::digest(b"ec").to_vec();
                let sig = sign(s, &mut m, privk, &h).unwrap();
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                    .unwrap()
                    .verify_prehash(&h, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
                    .unwrap();
            }
            _ if params == P384 => {
                use p384::ecdsa::signature::hazmat::PrehashVerifier;
                let h = sha2::Sha384::digest(b"ec").to_vec();
                let sig = sign(s, &mut m, privk, &h).unwrap();
                p384::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                    .unwrap()
                    .verify_prehash(&h, &p384::ecdsa::Signature::from_slice(&sig).unwrap())
                    .unwrap();
            }
            _ => {
                use p521::ecdsa::signature::hazmat::PrehashVerifier;
                let h = sha2::Sha512::digest(b"ec").to_vec();
                let sig = sign(s, &mut m, privk, &h).unwrap();
                p521::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                    .unwrap()
                    .verify_prehash(&h, &p521::ecdsa::Signature::from_slice(&sig).unwrap())
                    .unwrap();
            }
        }
    }
    // Refusals.
    assert_eq!(
        gen_pair(s, CKM_RSA_PKCS_KEY_PAIR_GEN, &[], &[]),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    assert_eq!(
        gen_pair(
            s,
            CKM_RSA_PKCS_KEY_PAIR_GEN,
            &[(CKA_MODULUS_BITS, u(1024))],
            &[]
        ),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        gen_pair(
            s,
            CKM_EC_KEY_PAIR_GEN,
            &[(CKA_EC_PARAMS, vec![0x06, 0x03, 1, 2, 3])],
            &[]
        ),
        Err(CKR_CURVE_NOT_SUPPORTED)
    );
    assert_eq!(
        gen_pair(
            s,
            CKM_EC_KEY_PAIR_GEN,
            &[(CKA_EC_PARAMS, P256.to_vec())],
            &[(CKA_SENSITIVE, b(false))]
        ),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
    assert_eq!(
        gen_pair(
            s,
            CKM_EC_KEY_PAIR_GEN,
            &[(CKA_EC_PARAMS, P256.to_vec()), (CKA_TOKEN, b(true))],
            &[]
        ),
        Err(CKR_TOKEN_WRITE_PROTECTED)
    );
    // A pair that would both unwrap and decrypt.
    assert_eq!(
        gen_pair(
            s,
            CKM_RSA_PKCS_KEY_PAIR_GEN,
            &[(CKA_MODULUS_BITS, u(2048))],
            &[(CKA_UNWRAP, b(true)), (CKA_DECRYPT, b(true))]
        ),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
}

fn oaep_params() -> CK_RSA_PKCS_OAEP_PARAMS {
    CK_RSA_PKCS_OAEP_PARAMS {
        hashAlg: CKM_SHA256,
        mgf: CKG_MGF1_SHA256,
        source: CKZ_DATA_SPECIFIED,
        pSourceData: null_mut(),
        ulSourceDataLen: 0,
    }
}

fn unwrap_key(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    with: CK_OBJECT_HANDLE,
    wrapped: &[u8],
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let mut t = tpl(entries);
    let mut w = wrapped.to_vec();
    let mut h = 0;
    match call!(C_UnwrapKey(
        s,
        m,
        with,
        w.as_mut_ptr(),
        w.len() as CK_ULONG,
        t.p(),
        t.n(),
        &mut h
    )) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

fn wrap_key(
    s: CK_SESSION_HANDLE,
    m: &mut CK_MECHANISM,
    with: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
) -> Result<Vec<u8>, CK_RV> {
    produce(|o, l| call!(C_WrapKey(s, m, with, key, o, l)))
}

fn data_key_template() -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    vec![
        (CKA_CLASS, u(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, u(CKK_AES)),
        (CKA_TOKEN, b(false)),
        (CKA_DECRYPT, b(true)),
    ]
}

/// The envelope: a data key wrapped outside the TEE (RustCrypto) to a released key unwraps on
/// the token into a sensitive session key that decrypts what RustCrypto encrypted.
#[test]
fn data_keys_wrapped_outside_unwrap_under_released_keys() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let dk: Vec<u8> = (100..132).collect();
    let iv = [3u8; 12];
    let ct = rustcrypto_gcm_encrypt(&dk, &iv, b"the enveloped file");
    let open = |k: CK_OBJECT_HANDLE| {
        let mut iv = iv;
        let mut p = gcm_params(&mut iv);
        let mut m = mech_with(CKM_AES_GCM, &mut p);
        decrypt(s, &mut m, k, &ct)
    };
    // RSA-OAEP (SHA-256) to tls-rsa's public key.
    use rsa::pkcs8::DecodePrivateKey;
    let public = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
        .unwrap()
        .to_public_key();
    let wrapped = public
        .encrypt(
            &mut rand::thread_rng(),
            rsa::Oaep::new::<sha2::Sha256>(),
            &dk,
        )
        .unwrap();
    let tls_rsa = live.find(s, CKO_PRIVATE_KEY, 1);
    assert_eq!(get(s, tls_rsa, CKA_UNWRAP).unwrap(), b(true));
    let mut op = oaep_params();
    let mut m = mech_with(CKM_RSA_PKCS_OAEP, &mut op);
    let k = unwrap_key(s, &mut m, tls_rsa, &wrapped, &data_key_template()).unwrap();
    assert_eq!(open(k).unwrap(), b"the enveloped file");
    assert_eq!(get(s, k, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    // The unwrapped value lives in the locked, non-dumpable arena.
    {
        let inst = super::instance().unwrap();
        let o = inst.module.tokens[0].object(k).unwrap();
        let crate::token::object::Body::SecretKey(v) = &o.body else {
            panic!("not a secret key")
        };
        assert!(crate::secret::arena::contains(v.as_slice().as_ptr()));
    }
    assert_eq!(get(s, k, CKA_SENSITIVE).unwrap(), b(true));
    assert_eq!(get(s, k, CKA_ALWAYS_SENSITIVE).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_NEVER_EXTRACTABLE).unwrap(), b(false));
    assert_eq!(get(s, k, CKA_LOCAL).unwrap(), b(false));
    let mut bad = wrapped.clone();
    bad[10] ^= 1;
    assert_eq!(
        unwrap_key(s, &mut m, tls_rsa, &bad, &data_key_template()),
        Err(CKR_WRAPPED_KEY_INVALID)
    );
    // AES key wrap with padding (RFC 5649) under data-aes.
    let data_aes = live.find(s, CKO_SECRET_KEY, 3);
    let kek: [u8; 32] = live.f.aes.clone().try_into().unwrap();
    let wrapped = aes_kw::KekAes256::from(kek)
        .wrap_with_padding_vec(&dk)
        .unwrap();
    let mut m = mech(CKM_AES_KEY_WRAP_KWP);
    let k = unwrap_key(s, &mut m, data_aes, &wrapped, &data_key_template()).unwrap();
    assert_eq!(open(k).unwrap(), b"the enveloped file");
    let mut bad = wrapped.clone();
    bad[0] ^= 1;
    assert_eq!(
        unwrap_key(s, &mut m, data_aes, &bad, &data_key_template()),
        Err(CKR_WRAPPED_KEY_INVALID)
    );
    assert_eq!(
        unwrap_key(s, &mut m, data_aes, &wrapped[..20], &data_key_template()),
        Err(CKR_WRAPPED_KEY_LEN_RANGE)
    );
    // RFC 3394 key wrap.
    let wrapped = aes_kw::KekAes256::from(kek).wrap_vec(&dk).unwrap();
    let mut m = mech(CKM_AES_KEY_WRAP);
    let k = unwrap_key(s, &mut m, data_aes, &wrapped, &data_key_template()).unwrap();
    assert_eq!(open(k).unwrap(), b"the enveloped file");
    // AES-GCM as the wrapping format.
    let wiv = [9u8; 12];
    let wrapped = rustcrypto_gcm_encrypt(&kek, &wiv, &dk);
    let mut wiv2 = wiv;
    let mut p = gcm_params(&mut wiv2);
    let mut m = mech_with(CKM_AES_GCM, &mut p);
    let k = unwrap_key(s, &mut m, data_aes, &wrapped, &data_key_template()).unwrap();
    assert_eq!(open(k).unwrap(), b"the enveloped file");
    // The unwrapped key dies with the login, like the key that unwrapped it.
    assert_eq!(call!(C_Logout(s)), CKR_OK);
    live.login();
    assert_eq!(get(s, k, CKA_CLASS), Err(CKR_OBJECT_HANDLE_INVALID));
}

/// PKCS#1 v1.5 unwrap (what Java SunPKCS11's Cipher.unwrap sends): a data key wrapped by
/// RustCrypto to tls-rsa unwraps on the token when the key's config allows PKCS#1 v1.5
/// decryption, a corrupted blob never yields the data key, and without the opt-in the
/// mechanism is refused like C_DecryptInit.
#[test]
fn pkcs1_v15_unwrap_follows_the_keys_pkcs1_decrypt_opt_in() {
    use rsa::pkcs8::DecodePrivateKey;
    let dk: Vec<u8> = (7..39).collect();
    let iv = [4u8; 12];
    let ct = rustcrypto_gcm_encrypt(&dk, &iv, b"for java");
    let public = |live: &Live| {
        rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
            .unwrap()
            .to_public_key()
    };
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let wrapped = public(&live)
        .encrypt(&mut rand::thread_rng(), rsa::Pkcs1v15Encrypt, &dk)
        .unwrap();
    let tls_rsa = live.find(s, CKO_PRIVATE_KEY, 1);
    let mut m = mech(CKM_RSA_PKCS);
    let k = unwrap_key(s, &mut m, tls_rsa, &wrapped, &data_key_template()).unwrap();
    let mut iv2 = iv;
    let mut p = gcm_params(&mut iv2);
    let mut gcm = mech_with(CKM_AES_GCM, &mut p);
    assert_eq!(decrypt(s, &mut gcm, k, &ct).unwrap(), b"for java");
    assert_eq!(get(s, k, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    // A corrupted blob: implicit rejection gives a synthetic value, never the data key
    // (an unwrap that succeeds makes a key that does not open the data).
    let mut bad = wrapped.clone();
    bad[5] ^= 0x40;
    if let Ok(k2) = unwrap_key(s, &mut m, tls_rsa, &bad, &data_key_template()) {
        let mut iv3 = iv;
        let mut p = gcm_params(&mut iv3);
        let mut gcm = mech_with(CKM_AES_GCM, &mut p);
        assert_eq!(
            decrypt(s, &mut gcm, k2, &ct),
            Err(CKR_ENCRYPTED_DATA_INVALID)
        );
    }
    drop(live);
    // Without allow_rsa_pkcs_decrypt: refused before anything is decrypted.
    let live = Live::new("");
    let text = std::fs::read_to_string(live.f.config_path())
        .unwrap()
        .replace("allow_rsa_pkcs_decrypt = true\n", "");
    std::fs::write(live.f.config_path(), text).unwrap();
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
    live.login();
    let s = live.session(false);
    let tls_rsa = live.find(s, CKO_PRIVATE_KEY, 1);
    assert_eq!(
        unwrap_key(s, &mut m, tls_rsa, &wrapped, &data_key_template()),
        Err(CKR_MECHANISM_INVALID)
    );
}

/// A generated wrapping key wraps an extractable data key; the blob unwraps back into a key
/// that encrypts exactly like the original (whose value RustCrypto knows).
#[test]
fn generated_wrapping_keys_wrap_and_unwrap_session_keys() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let w = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(32)),
            (CKA_WRAP, b(true)),
            (CKA_UNWRAP, b(true)),
        ],
    )
    .unwrap();
    assert_eq!(get(s, w, CKA_ENCRYPT).unwrap(), b(false));
    let d = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(32)),
            (CKA_SENSITIVE, b(false)),
            (CKA_EXTRACTABLE, b(true)),
        ],
    )
    .unwrap();
    let dv = get(s, d, CKA_VALUE).unwrap();
    let iv = [5u8; 12];
    let expected = rustcrypto_gcm_encrypt(&dv, &iv, b"same key");
    let seal = |k: CK_OBJECT_HANDLE| {
        let mut iv = iv;
        let mut p = gcm_params(&mut iv);
        let mut m = mech_with(CKM_AES_GCM, &mut p);
        encrypt(s, &mut m, k, b"same key").unwrap()
    };
    let mut wiv = [1u8; 12];
    let mut gp = gcm_params(&mut wiv);
    let mut kw = mech(CKM_AES_KEY_WRAP);
    let mut kwp = mech(CKM_AES_KEY_WRAP_KWP);
    let mut gcm = mech_with(CKM_AES_GCM, &mut gp);
    for (m, len) in [(&mut kw, 40usize), (&mut kwp, 40), (&mut gcm, 48)] {
        let blob = wrap_key(s, m, w, d).unwrap();
        assert_eq!(blob.len(), len);
        let back = unwrap_key(
            s,
            m,
            w,
            &blob,
            &[
                (CKA_CLASS, u(CKO_SECRET_KEY)),
                (CKA_KEY_TYPE, u(CKK_AES)),
                (CKA_ENCRYPT, b(true)),
            ],
        )
        .unwrap();
        assert_eq!(seal(back), expected);
    }
    // The size-query protocol: a short buffer answers the length and CKR_BUFFER_TOO_SMALL.
    let mut out = [0u8; 8];
    let mut len: CK_ULONG = 8;
    assert_eq!(
        call!(C_WrapKey(s, &mut kw, w, d, out.as_mut_ptr(), &mut len)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 40);
    // RSA-OAEP with a generated pair whose public half wraps and private half unwraps.
    let (pubk, privk) = gen_pair(
        s,
        CKM_RSA_PKCS_KEY_PAIR_GEN,
        &[(CKA_MODULUS_BITS, u(2048)), (CKA_WRAP, b(true))],
        &[(CKA_UNWRAP, b(true))],
    )
    .unwrap();
    assert_eq!(get(s, pubk, CKA_ENCRYPT).unwrap(), b(false));
    // OAEP, and PKCS#1 v1.5 (its flags claim wrap and unwrap too).
    let mut op = oaep_params();
    for mut m in [mech_with(CKM_RSA_PKCS_OAEP, &mut op), mech(CKM_RSA_PKCS)] {
        let blob = wrap_key(s, &mut m, pubk, d).unwrap();
        assert_eq!(blob.len(), 256);
        let back = unwrap_key(
            s,
            &mut m,
            privk,
            &blob,
            &[(CKA_CLASS, u(CKO_SECRET_KEY)), (CKA_KEY_TYPE, u(CKK_AES))],
        )
        .unwrap();
        assert_eq!(seal(back), expected);
    }
}

/// The published PKCS#11 key-management attacks, each refused with its code.
#[test]
fn key_management_attacks_are_refused() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let data_aes = live.find(s, CKO_SECRET_KEY, 3);
    let tls_rsa_pub = live.find(s, CKO_PUBLIC_KEY, 1);
    let w = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(32)),
            (CKA_WRAP, b(true)),
            (CKA_UNWRAP, b(true)),
        ],
    )
    .unwrap();
    let d = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[(CKA_VALUE_LEN, u(32)), (CKA_EXTRACTABLE, b(true))],
    )
    .unwrap();
    let mut kw = mech(CKM_AES_KEY_WRAP);
    // Released keys never leave the TEE.
    assert_eq!(
        wrap_key(s, &mut kw, w, data_aes),
        Err(CKR_KEY_UNEXTRACTABLE)
    );
    let tls_rsa = live.find(s, CKO_PRIVATE_KEY, 1);
    assert_eq!(wrap_key(s, &mut kw, w, tls_rsa), Err(CKR_KEY_UNEXTRACTABLE));
    // Released keys (and their public halves) never wrap: they also decrypt.
    assert_eq!(
        wrap_key(s, &mut kw, data_aes, d),
        Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
    );
    let mut op = oaep_params();
    let mut oaep = mech_with(CKM_RSA_PKCS_OAEP, &mut op);
    assert_eq!(
        wrap_key(s, &mut oaep, tls_rsa_pub, d),
        Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
    );
    // Wrap-then-decrypt: no key both wraps and decrypts, and a wrapping key cannot decrypt.
    assert_eq!(
        gen_secret(
            s,
            CKM_AES_KEY_GEN,
            &[
                (CKA_VALUE_LEN, u(32)),
                (CKA_WRAP, b(true)),
                (CKA_DECRYPT, b(true))
            ]
        ),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    assert_eq!(
        set(s, w, &[(CKA_DECRYPT, b(true))]),
        CKR_TEMPLATE_INCONSISTENT
    );
    let mut iv = [0u8; 12];
    let mut p = gcm_params(&mut iv);
    let mut gcm = mech_with(CKM_AES_GCM, &mut p);
    assert_eq!(
        call!(C_DecryptInit(s, &mut gcm, w)),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    // Encrypt-then-unwrap: a wrapping key does not encrypt, and a key unwrapped by a key that
    // encrypts (a released key) cannot become a wrapping key.
    assert_eq!(
        call!(C_EncryptInit(s, &mut gcm, w)),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    let blob = aes_kw::KekAes256::from(<[u8; 32]>::try_from(live.f.aes.clone()).unwrap())
        .wrap_vec(&[7u8; 32])
        .unwrap();
    let mut unwrap_tpl = data_key_template();
    unwrap_tpl.push((CKA_UNWRAP, b(true)));
    unwrap_tpl.retain(|(t, _)| *t != CKA_DECRYPT);
    assert_eq!(
        unwrap_key(s, &mut kw, data_aes, &blob, &unwrap_tpl),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    // Wrap with a key of known value: created or unwrapped keys never wrap.
    assert_eq!(
        create(s, &aes_key(&[1; 32], &[(CKA_WRAP, b(true))])),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    let public_wrap = [
        (CKA_CLASS, u(CKO_PUBLIC_KEY)),
        (CKA_KEY_TYPE, u(CKK_RSA)),
        (CKA_MODULUS, get(s, tls_rsa_pub, CKA_MODULUS).unwrap()),
        (CKA_PUBLIC_EXPONENT, vec![1, 0, 1]),
        (CKA_WRAP, b(true)),
    ];
    assert_eq!(create(s, &public_wrap), Err(CKR_TEMPLATE_INCONSISTENT));
    // Unwrapping as non-sensitive would read the wrapped key in the clear.
    let blob = wrap_key(s, &mut kw, w, d).unwrap();
    let mut readable = data_key_template();
    readable.push((CKA_SENSITIVE, b(false)));
    assert_eq!(
        unwrap_key(s, &mut kw, w, &blob, &readable),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    // Unextractable keys are not wrapped.
    let fixed = gen_secret(s, CKM_AES_KEY_GEN, &[(CKA_VALUE_LEN, u(16))]).unwrap();
    assert_eq!(wrap_key(s, &mut kw, w, fixed), Err(CKR_KEY_UNEXTRACTABLE));
    // CKA_WRAP_WITH_TRUSTED: no key of this token is trusted; the flag latches.
    let guarded = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[
            (CKA_VALUE_LEN, u(16)),
            (CKA_EXTRACTABLE, b(true)),
            (CKA_WRAP_WITH_TRUSTED, b(true)),
        ],
    )
    .unwrap();
    assert_eq!(wrap_key(s, &mut kw, w, guarded), Err(CKR_KEY_NOT_WRAPPABLE));
    assert_eq!(
        set(s, guarded, &[(CKA_WRAP_WITH_TRUSTED, b(false))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    assert_eq!(
        set(s, w, &[(CKA_TRUSTED, b(true))]),
        CKR_ATTRIBUTE_READ_ONLY
    );
    // Role checks on the (un)wrapping key itself.
    let g = gen_secret(
        s,
        CKM_GENERIC_SECRET_KEY_GEN,
        &[(CKA_VALUE_LEN, u(32)), (CKA_EXTRACTABLE, b(true))],
    )
    .unwrap();
    assert_eq!(
        wrap_key(s, &mut kw, g, d),
        Err(CKR_WRAPPING_KEY_TYPE_INCONSISTENT)
    );
    assert_eq!(
        unwrap_key(s, &mut kw, d, &blob, &data_key_template()),
        Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
    );
    assert_eq!(
        unwrap_key(s, &mut kw, 0xdead_beef, &blob, &data_key_template()),
        Err(CKR_UNWRAPPING_KEY_HANDLE_INVALID)
    );
    assert_eq!(
        wrap_key(s, &mut kw, 0xdead_beef, d),
        Err(CKR_WRAPPING_KEY_HANDLE_INVALID)
    );
    let mut cbc_iv = [0u8; 16];
    let mut cbc = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: cbc_iv.as_mut_ptr() as *mut _,
        ulParameterLen: 16,
    };
    assert_eq!(wrap_key(s, &mut cbc, w, d), Err(CKR_MECHANISM_INVALID));
    assert_eq!(
        unwrap_key(s, &mut kw, w, &blob, &[(CKA_CLASS, u(CKO_DATA))]),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
}

/// CKA_UNWRAP_TEMPLATE and CKA_WRAP_TEMPLATE bind what a key may unwrap into or wrap.
#[test]
fn wrap_and_unwrap_templates_are_enforced() {
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let mut sensitive = [CK_TRUE];
    let mut unextractable = [CK_FALSE];
    let mut inner = [
        CK_ATTRIBUTE {
            type_: CKA_SENSITIVE,
            pValue: sensitive.as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_EXTRACTABLE,
            pValue: unextractable.as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
    ];
    let mut len = [32u8, 0, 0, 0, 0, 0, 0, 0];
    let mut class = CKO_SECRET_KEY.to_ne_bytes();
    let mut kt = CKK_AES.to_ne_bytes();
    let mut yes = [CK_TRUE];
    let mut outer = [
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: class.as_mut_ptr() as *mut _,
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_KEY_TYPE,
            pValue: kt.as_mut_ptr() as *mut _,
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_VALUE_LEN,
            pValue: len.as_mut_ptr() as *mut _,
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_WRAP,
            pValue: yes.as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_UNWRAP,
            pValue: yes.as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_UNWRAP_TEMPLATE,
            pValue: inner.as_mut_ptr() as *mut _,
            ulValueLen: (2 * std::mem::size_of::<CK_ATTRIBUTE>()) as CK_ULONG,
        },
    ];
    let mut m = mech(CKM_AES_KEY_GEN);
    let mut w = 0;
    assert_eq!(
        call!(C_GenerateKey(s, &mut m, outer.as_mut_ptr(), 6, &mut w)),
        CKR_OK
    );
    // The template reads back as an attribute array (two-level size query).
    let mut a = CK_ATTRIBUTE {
        type_: CKA_UNWRAP_TEMPLATE,
        pValue: null_mut(),
        ulValueLen: 0,
    };
    assert_eq!(call!(C_GetAttributeValue(s, w, &mut a, 1)), CKR_OK);
    assert_eq!(
        a.ulValueLen as usize,
        2 * std::mem::size_of::<CK_ATTRIBUTE>()
    );
    let mut vals = [[9u8; 1]; 2];
    let mut back = [
        CK_ATTRIBUTE {
            type_: 0,
            pValue: vals[0].as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: 0,
            pValue: vals[1].as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
    ];
    a.pValue = back.as_mut_ptr() as *mut _;
    assert_eq!(call!(C_GetAttributeValue(s, w, &mut a, 1)), CKR_OK);
    let got: Vec<(CK_ULONG, u8)> = back
        .iter()
        .zip(vals)
        .map(|(e, v)| (e.type_, v[0]))
        .collect();
    assert!(
        got.contains(&(CKA_SENSITIVE, CK_TRUE)) && got.contains(&(CKA_EXTRACTABLE, CK_FALSE)),
        "{got:?}"
    );
    // A key to carry around.
    let d = gen_secret(
        s,
        CKM_AES_KEY_GEN,
        &[(CKA_VALUE_LEN, u(32)), (CKA_EXTRACTABLE, b(true))],
    )
    .unwrap();
    let mut kw = mech(CKM_AES_KEY_WRAP);
    let blob = wrap_key(s, &mut kw, w, d).unwrap();
    let mut extractable = data_key_template();
    extractable.push((CKA_EXTRACTABLE, b(true)));
    assert_eq!(
        unwrap_key(s, &mut kw, w, &blob, &extractable),
        Err(CKR_TEMPLATE_INCONSISTENT)
    );
    let k = unwrap_key(s, &mut kw, w, &blob, &data_key_template()).unwrap();
    assert_eq!(get(s, k, CKA_EXTRACTABLE).unwrap(), b(false));
    // CKA_WRAP_TEMPLATE: this wrapping key wraps only keys labelled "export".
    let mut label = *b"export";
    let mut winner = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: label.as_mut_ptr() as *mut _,
        ulValueLen: 6,
    }];
    outer[5] = CK_ATTRIBUTE {
        type_: CKA_WRAP_TEMPLATE,
        pValue: winner.as_mut_ptr() as *mut _,
        ulValueLen: std::mem::size_of::<CK_ATTRIBUTE>() as CK_ULONG,
    };
    let mut w2 = 0;
    assert_eq!(
        call!(C_GenerateKey(s, &mut m, outer.as_mut_ptr(), 6, &mut w2)),
        CKR_OK
    );
    assert_eq!(wrap_key(s, &mut kw, w2, d), Err(CKR_KEY_NOT_WRAPPABLE));
    assert_eq!(set(s, d, &[(CKA_LABEL, b"export".to_vec())]), CKR_OK);
    assert_eq!(wrap_key(s, &mut kw, w2, d).unwrap().len(), 40);
}

fn derive_key(
    s: CK_SESSION_HANDLE,
    base: CK_OBJECT_HANDLE,
    kdf: CK_EC_KDF_TYPE,
    shared: &[u8],
    peer_point: &[u8],
    entries: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, CK_RV> {
    let (mut sd, mut pd) = (shared.to_vec(), peer_point.to_vec());
    let mut p = CK_ECDH1_DERIVE_PARAMS {
        kdf,
        ulSharedDataLen: sd.len() as CK_ULONG,
        pSharedData: if sd.is_empty() {
            null_mut()
        } else {
            sd.as_mut_ptr()
        },
        ulPublicDataLen: pd.len() as CK_ULONG,
        pPublicData: pd.as_mut_ptr(),
    };
    let mut m = mech_with(CKM_ECDH1_DERIVE, &mut p);
    let mut t = tpl(entries);
    let mut h = 0;
    match call!(C_DeriveKey(s, &mut m, base, t.p(), t.n(), &mut h)) {
        CKR_OK => Ok(h),
        rv => Err(rv),
    }
}

/// ANSI X9.63 KDF with SHA-256, written out independently of the module.
fn x963_sha256(z: &[u8], shared: &[u8], len: usize) -> Vec<u8> {
    use sha2::Digest;
    let mut out = vec![];
    let mut counter = 1u32;
    while out.len() < len {
        let mut h = sha2::Sha256::new();
        h.update(z);
        h.update(counter.to_be_bytes());
        h.update(shared);
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

fn readable_secret(kt: CK_KEY_TYPE, len: Option<CK_ULONG>) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    let mut v = vec![
        (CKA_CLASS, u(CKO_SECRET_KEY)),
        (CKA_KEY_TYPE, u(kt)),
        (CKA_SENSITIVE, b(false)),
        (CKA_EXTRACTABLE, b(true)),
    ];
    if let Some(n) = len {
        v.push((CKA_VALUE_LEN, u(n)));
    }
    v
}

#[test]
fn ecdh_derives_what_rustcrypto_agrees_on() {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::DecodePrivateKey;
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    // The released tls-ec key (P-256) with a RustCrypto peer.
    let released = live.find(s, CKO_PRIVATE_KEY, 2);
    assert_eq!(get(s, released, CKA_DERIVE).unwrap(), b(true));
    let token_point = {
        let sk = p256::SecretKey::from_pkcs8_der(&live.f.ec).unwrap();
        sk.public_key()
    };
    let peer = p256::SecretKey::random(&mut rand::thread_rng());
    let peer_point = peer
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let z = p256::ecdh::diffie_hellman(peer.to_nonzero_scalar(), token_point.as_affine());
    let z = z.raw_secret_bytes().to_vec();
    // CKD_NULL: Z itself (the peer point given raw).
    let k = derive_key(
        s,
        released,
        CKD_NULL,
        &[],
        &peer_point,
        &readable_secret(CKK_GENERIC_SECRET, None),
    )
    .unwrap();
    assert_eq!(get(s, k, CKA_VALUE).unwrap(), z);
    // SHA-256 KDF with shared info into an AES key (the peer point as CKA_EC_POINT DER).
    let der_point = crate::token::attr::der_octet_string(&peer_point);
    let k = derive_key(
        s,
        released,
        CKD_SHA256_KDF,
        b"info",
        &der_point,
        &readable_secret(CKK_AES, Some(32)),
    )
    .unwrap();
    assert_eq!(get(s, k, CKA_VALUE).unwrap(), x963_sha256(&z, b"info", 32));
    // A derived key from a released key stays sensitive by default; ALWAYS_SENSITIVE follows
    // the base key.
    let k = derive_key(
        s,
        released,
        CKD_SHA256_KDF,
        &[],
        &peer_point,
        &[
            (CKA_CLASS, u(CKO_SECRET_KEY)),
            (CKA_KEY_TYPE, u(CKK_AES)),
            (CKA_VALUE_LEN, u(16)),
        ],
    )
    .unwrap();
    assert_eq!(get(s, k, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    assert_eq!(get(s, k, CKA_ALWAYS_SENSITIVE).unwrap(), b(true));
    // A session P-384 key that may derive, against p384's ECDH.
    let (pubk, privk) = gen_pair(
        s,
        CKM_EC_KEY_PAIR_GEN,
        &[(CKA_EC_PARAMS, P384.to_vec())],
        &[(CKA_DERIVE, b(true))],
    )
    .unwrap();
    let token_pub = p384::PublicKey::from_sec1_bytes(&ec_point(s, pubk)).unwrap();
    let peer = p384::SecretKey::random(&mut rand::thread_rng());
    let z = p384::ecdh::diffie_hellman(peer.to_nonzero_scalar(), token_pub.as_affine());
    let peer_point = peer
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let k = derive_key(
        s,
        privk,
        CKD_NULL,
        &[],
        &peer_point,
        &readable_secret(CKK_GENERIC_SECRET, None),
    )
    .unwrap();
    assert_eq!(get(s, k, CKA_VALUE).unwrap(), z.raw_secret_bytes().to_vec());
    // Refusals: a key without CKA_DERIVE, a point on another curve, an unknown KDF, no length.
    let (_, no_derive) = gen_pair(
        s,
        CKM_EC_KEY_PAIR_GEN,
        &[(CKA_EC_PARAMS, P384.to_vec())],
        &[],
    )
    .unwrap();
    assert_eq!(
        derive_key(
            s,
            no_derive,
            CKD_NULL,
            &[],
            &peer_point,
            &readable_secret(CKK_GENERIC_SECRET, None)
        ),
        Err(CKR_KEY_FUNCTION_NOT_PERMITTED)
    );
    let p256_point = p256::SecretKey::random(&mut rand::thread_rng())
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    assert_eq!(
        derive_key(
            s,
            privk,
            CKD_NULL,
            &[],
            &p256_point,
            &readable_secret(CKK_GENERIC_SECRET, None)
        ),
        Err(CKR_MECHANISM_PARAM_INVALID)
    );
    assert_eq!(
        derive_key(
            s,
            privk,
            0x77,
            &[],
            &peer_point,
            &readable_secret(CKK_GENERIC_SECRET, None)
        ),
        Err(CKR_MECHANISM_PARAM_INVALID)
    );
    assert_eq!(
        derive_key(
            s,
            privk,
            CKD_SHA256_KDF,
            &[],
            &peer_point,
            &readable_secret(CKK_GENERIC_SECRET, None)
        ),
        Err(CKR_TEMPLATE_INCOMPLETE)
    );
    let rsa = live.find(s, CKO_PRIVATE_KEY, 1);
    assert_eq!(
        derive_key(
            s,
            rsa,
            CKD_NULL,
            &[],
            &peer_point,
            &readable_secret(CKK_GENERIC_SECRET, None)
        ),
        Err(CKR_KEY_TYPE_INCONSISTENT)
    );
}

#[test]
fn digest_key_hashes_session_secret_keys_only() {
    use sha2::Digest;
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let value = [0x42u8; 32];
    let k = create(s, &aes_key(&value, &[])).unwrap();
    let mut m = mech(CKM_SHA256);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OK);
    let mut pre = *b"prefix";
    assert_eq!(call!(C_DigestUpdate(s, pre.as_mut_ptr(), 6)), CKR_OK);
    assert_eq!(call!(C_DigestKey(s, k)), CKR_OK);
    let out = produce(|o, l| call!(C_DigestFinal(s, o, l))).unwrap();
    let mut h = sha2::Sha256::new();
    h.update(b"prefix");
    h.update(value);
    assert_eq!(out, h.finalize().to_vec());
    // Released keys and non-secret keys are indigestible; no digest active: not initialised.
    assert_eq!(call!(C_DigestKey(s, k)), CKR_OPERATION_NOT_INITIALIZED);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OK);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OPERATION_ACTIVE);
    let released = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(call!(C_DigestKey(s, released)), CKR_KEY_INDIGESTIBLE);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OK);
    let public = live.find(s, CKO_PUBLIC_KEY, 1);
    assert_eq!(call!(C_DigestKey(s, public)), CKR_KEY_INDIGESTIBLE);
}

#[test]
fn login_as_security_officer_is_answered_with_spec_codes() {
    let live = Live::new("");
    let rw = live.session(true);
    assert_eq!(call!(C_Login(rw, CKU_SO, null_mut(), 0)), CKR_PIN_INCORRECT);
    let ro = live.session(false);
    assert_eq!(
        call!(C_Login(rw, CKU_SO, null_mut(), 0)),
        CKR_SESSION_READ_ONLY_EXISTS
    );
    assert_eq!(call!(C_CloseSession(ro)), CKR_OK);
    live.login();
    assert_eq!(
        call!(C_Login(rw, CKU_SO, null_mut(), 0)),
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN
    );
}

/// NULL pointers and impossible lengths are CKR_ARGUMENTS_BAD before anything else is looked
/// at (the session handle, the mechanism, the template, write protection).
#[test]
fn null_arguments_come_first() {
    let live = Live::new("");
    let s = live.session(false);
    let bogus_session = 0xdead;
    let mut h = 0;
    let mut t = tpl(&[(CKA_TOKEN, b(true))]);
    let mut m = mech(0xFFFF_FFF0);
    assert_eq!(
        call!(C_CreateObject(bogus_session, t.p(), t.n(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_CreateObject(bogus_session, null_mut(), 1, &mut h)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GenerateKey(
            bogus_session,
            null_mut(),
            t.p(),
            t.n(),
            &mut h
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GenerateKey(
            bogus_session,
            &mut m,
            t.p(),
            t.n(),
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GenerateKeyPair(
            bogus_session,
            &mut m,
            t.p(),
            t.n(),
            t.p(),
            t.n(),
            &mut h,
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_WrapKey(
            bogus_session,
            &mut m,
            1,
            2,
            null_mut(),
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_UnwrapKey(
            bogus_session,
            &mut m,
            1,
            null_mut(),
            5,
            t.p(),
            t.n(),
            &mut h
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_DeriveKey(
            bogus_session,
            &mut m,
            1,
            t.p(),
            t.n(),
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_CopyObject(bogus_session, 1, t.p(), t.n(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetObjectSize(bogus_session, 1, null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_SetAttributeValue(bogus_session, 1, null_mut(), 2)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_FindObjectsInit(s, null_mut(), 1)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_FindObjects(bogus_session, null_mut(), 1, &mut h)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetAttributeValue(bogus_session, 1, null_mut(), 1)),
        CKR_ARGUMENTS_BAD
    );
}

/// Private keys imported from their components (what SunPKCS11 does with a software key) sign
/// what RustCrypto verifies; their secret parts are never readable and never stored as
/// attributes.
#[test]
fn imported_private_keys_sign_what_rustcrypto_verifies() {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    let live = Live::new("");
    let s = live.session(false);
    live.login();
    let mut k = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa).unwrap();
    k.precompute().unwrap();
    let primes = k.primes();
    let crt = k.crt_coefficient().unwrap();
    let mut rsa_tpl = vec![
        (CKA_CLASS, u(CKO_PRIVATE_KEY)),
        (CKA_KEY_TYPE, u(CKK_RSA)),
        (CKA_MODULUS, k.n().to_bytes_be()),
        (CKA_PUBLIC_EXPONENT, k.e().to_bytes_be()),
        (CKA_PRIVATE_EXPONENT, k.d().to_bytes_be()),
        (CKA_PRIME_1, primes[0].to_bytes_be()),
        (CKA_PRIME_2, primes[1].to_bytes_be()),
        (CKA_EXPONENT_1, k.dp().unwrap().to_bytes_be()),
        (CKA_EXPONENT_2, k.dq().unwrap().to_bytes_be()),
        (CKA_COEFFICIENT, crt.to_bytes_be()),
    ];
    let h = create(s, &rsa_tpl).unwrap();
    assert_eq!(
        get(s, h, CKA_PRIVATE_EXPONENT),
        Err(CKR_ATTRIBUTE_SENSITIVE)
    );
    assert_eq!(get(s, h, CKA_SENSITIVE).unwrap(), b(true));
    assert_eq!(get(s, h, CKA_ALWAYS_SENSITIVE).unwrap(), b(false));
    assert_eq!(get(s, h, CKA_MODULUS).unwrap(), k.n().to_bytes_be());
    {
        let inst = super::instance().unwrap();
        let o = inst.module.tokens[0].object(h).unwrap();
        let attrs = &o.stored.as_ref().unwrap().attrs;
        assert!(!attrs.contains_key(&CKA_PRIVATE_EXPONENT) && !attrs.contains_key(&CKA_PRIME_1));
    }
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    let sig = sign(s, &mut m, h, b"imported").unwrap();
    use sha2::Digest;
    k.to_public_key()
        .verify(
            rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
            &sha2::Sha256::digest(b"imported"),
            &sig,
        )
        .unwrap();
    // A modulus that is not the key's (AWS-LC's key check refuses it); a readable private key.
    rsa_tpl[2].1[10] ^= 1;
    assert_eq!(create(s, &rsa_tpl), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    rsa_tpl[2].1[10] ^= 1;
    rsa_tpl.push((CKA_SENSITIVE, b(false)));
    assert_eq!(create(s, &rsa_tpl), Err(CKR_ATTRIBUTE_VALUE_INVALID));
    // EC: the scalar only; the token computes the public point.
    let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&live.f.ec).unwrap();
    let ec = create(
        s,
        &[
            (CKA_CLASS, u(CKO_PRIVATE_KEY)),
            (CKA_KEY_TYPE, u(CKK_EC)),
            (CKA_EC_PARAMS, P256.to_vec()),
            (CKA_VALUE, sk.to_bytes().to_vec()),
        ],
    )
    .unwrap();
    assert_eq!(get(s, ec, CKA_VALUE), Err(CKR_ATTRIBUTE_SENSITIVE));
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    let hash = sha2::Sha256::digest(b"ec import").to_vec();
    let mut m = mech(CKM_ECDSA);
    let sig = sign(s, &mut m, ec, &hash).unwrap();
    sk.verifying_key()
        .verify_prehash(&hash, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
        .unwrap();
    assert_eq!(
        create(
            s,
            &[
                (CKA_CLASS, u(CKO_PRIVATE_KEY)),
                (CKA_KEY_TYPE, u(CKK_EC)),
                (CKA_EC_PARAMS, P256.to_vec()),
                (CKA_VALUE, vec![0xff; 40]),
            ],
        ),
        Err(CKR_ATTRIBUTE_VALUE_INVALID)
    );
}
