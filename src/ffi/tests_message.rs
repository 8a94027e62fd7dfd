//! Message-based AES-GCM (PKCS#11 3.0) through the C functions, in process: many messages
//! under one Init, generated IVs handed back, the size-query protocol, a wrong tag, the
//! argument and state refusals. Results are checked with RustCrypto.

use super::message::*;
use super::tests::{mech, mech_with, Live};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use cryptoki_sys::*;
use std::ptr::null_mut;

/// A CK_GCM_MESSAGE_PARAMS over the test's own IV and tag buffers.
fn params(
    iv: &mut [u8],
    fixed_bits: CK_ULONG,
    generator: CK_GENERATOR_FUNCTION,
    tag: &mut [u8],
) -> CK_GCM_MESSAGE_PARAMS {
    CK_GCM_MESSAGE_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: iv.len() as CK_ULONG,
        ulIvFixedBits: fixed_bits,
        ivGenerator: generator,
        pTag: tag.as_mut_ptr(),
        ulTagBits: (tag.len() * 8) as CK_ULONG,
    }
}

const PARAMS_LEN: CK_ULONG = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG;

/// One C_EncryptMessage (encrypt) or C_DecryptMessage into `out`; returns the CK_RV and
/// the length the module wrote back.
fn message(
    encrypt: bool,
    s: CK_SESSION_HANDLE,
    p: &mut CK_GCM_MESSAGE_PARAMS,
    aad: &[u8],
    input: &[u8],
    out: *mut u8,
    out_len: CK_ULONG,
) -> (CK_RV, CK_ULONG) {
    let mut n = out_len;
    let f = if encrypt {
        C_EncryptMessage
    } else {
        C_DecryptMessage
    };
    // SAFETY: valid buffers of the stated lengths.
    let rv = unsafe {
        f(
            s,
            p as *mut _ as *mut std::ffi::c_void,
            PARAMS_LEN,
            aad.as_ptr() as *mut u8,
            aad.len() as CK_ULONG,
            input.as_ptr() as *mut u8,
            input.len() as CK_ULONG,
            out,
            &mut n,
        )
    };
    (rv, n)
}

fn init(encrypt: bool, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> CK_RV {
    let mut m = mech(CKM_AES_GCM);
    // SAFETY: a valid mechanism.
    unsafe {
        if encrypt {
            C_MessageEncryptInit(s, &mut m, key)
        } else {
            C_MessageDecryptInit(s, &mut m, key)
        }
    }
}

#[test]
fn many_messages_under_one_init_agree_with_rustcrypto_both_ways() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    let other = aes_gcm::Aes256Gcm::new_from_slice(&live.f.aes).unwrap();
    assert_eq!(init(true, s, aes), CKR_OK);
    assert_eq!(init(false, s, aes), CKR_OK);
    let mut counters = vec![];
    for (i, generator) in [
        CKG_NO_GENERATE,
        CKG_GENERATE_COUNTER,
        CKG_GENERATE_COUNTER,
        CKG_GENERATE_RANDOM,
        CKG_GENERATE,
    ]
    .into_iter()
    .enumerate()
    {
        let msg: Vec<u8> = (0..4096u32).map(|b| (b as usize * 3 + i) as u8).collect();
        let aad = format!("message {i}");
        let mut iv = [0x11u8; 12];
        let mut tag = [0u8; 16];
        let fixed = if generator == CKG_GENERATE_RANDOM {
            0
        } else {
            32
        };
        let mut p = params(&mut iv, fixed, generator, &mut tag);
        let mut buf = vec![0u8; msg.len()];
        let ptr = buf.as_mut_ptr();
        let (rv, n) = message(
            true,
            s,
            &mut p,
            aad.as_bytes(),
            &msg,
            ptr,
            buf.len() as CK_ULONG,
        );
        assert_eq!(
            (rv, n as usize),
            (CKR_OK, msg.len()),
            "generator {generator}"
        );
        if generator == CKG_NO_GENERATE {
            assert_eq!(iv, [0x11; 12], "a caller's IV is left as it was");
        } else {
            assert_ne!(
                iv, [0x11; 12],
                "generator {generator}: the IV made is handed back"
            );
        }
        if generator == CKG_GENERATE_COUNTER || generator == CKG_GENERATE {
            assert_eq!(iv[..4], [0x11; 4], "the 32 fixed bits are the caller's");
        }
        if generator == CKG_GENERATE_COUNTER {
            counters.push(u64::from_be_bytes(iv[4..].try_into().unwrap()));
        }
        let mut joined = buf.clone();
        joined.extend_from_slice(&tag);
        let nonce = aes_gcm::Nonce::from(iv);
        let plain = other
            .decrypt(
                &nonce,
                Payload {
                    msg: &joined,
                    aad: aad.as_bytes(),
                },
            )
            .unwrap();
        assert_eq!(plain, msg, "generator {generator}");
        // Back through C_DecryptMessage, into a separate buffer.
        let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
        let mut out = vec![0u8; msg.len()];
        let (rv, n) = message(
            false,
            s,
            &mut p,
            aad.as_bytes(),
            &buf,
            out.as_mut_ptr(),
            out.len() as CK_ULONG,
        );
        assert_eq!((rv, n as usize), (CKR_OK, msg.len()));
        assert_eq!(out, msg);
    }
    assert_eq!(
        counters[1],
        counters[0].wrapping_add(1),
        "the counter counts across messages"
    );
    // RustCrypto seals, the module opens (96-bit tag).
    let mut iv = [3u8; 12];
    let sealed = other
        .encrypt(
            &aes_gcm::Nonce::from(iv),
            Payload {
                msg: b"from outside",
                aad: b"",
            },
        )
        .unwrap();
    let mut tag = sealed[12..24].to_vec();
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let mut out = [0u8; 12];
    assert_eq!(
        message(false, s, &mut p, b"", &sealed[..12], out.as_mut_ptr(), 12),
        (CKR_OK, 12)
    );
    assert_eq!(&out, b"from outside");
    // SAFETY: a valid session.
    assert_eq!(unsafe { C_MessageEncryptFinal(s) }, CKR_OK);
    assert_eq!(unsafe { C_MessageDecryptFinal(s) }, CKR_OK);
    assert_eq!(
        unsafe { C_MessageEncryptFinal(s) },
        CKR_OPERATION_NOT_INITIALIZED
    );
}

/// One message call on raw pointers: in place, or with the AAD inside the output.
#[allow(clippy::too_many_arguments)]
fn message_raw(
    encrypt: bool,
    s: CK_SESSION_HANDLE,
    p: &mut CK_GCM_MESSAGE_PARAMS,
    aad: *mut u8,
    aad_len: usize,
    input: *mut u8,
    len: usize,
    out: *mut u8,
    out_len: CK_ULONG,
) -> (CK_RV, CK_ULONG) {
    let mut n = out_len;
    let f = if encrypt {
        C_EncryptMessage
    } else {
        C_DecryptMessage
    };
    // SAFETY: the caller's pointers are valid for their lengths.
    let rv = unsafe {
        f(
            s,
            p as *mut _ as *mut std::ffi::c_void,
            PARAMS_LEN,
            aad,
            aad_len as CK_ULONG,
            input,
            len as CK_ULONG,
            out,
            &mut n,
        )
    };
    (rv, n)
}

/// Encrypting and decrypting in place (input and output the same buffer, the usual C call),
/// a wrong tag in place, the AAD inside the output buffer, and an empty message (GMAC over
/// the AAD alone): each checked with RustCrypto.
#[test]
fn in_place_and_overlapping_buffers_give_rustcryptos_bytes() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    let other = aes_gcm::Aes256Gcm::new_from_slice(&live.f.aes).unwrap();
    assert_eq!(init(true, s, aes), CKR_OK);
    assert_eq!(init(false, s, aes), CKR_OK);
    let msg: Vec<u8> = (0..1000u32).map(|b| (b * 13) as u8).collect();
    let mut iv = [0x21u8; 12];
    let mut tag = [0u8; 16];
    let nonce = aes_gcm::Nonce::from(iv);
    let want = other
        .encrypt(
            &nonce,
            Payload {
                msg: &msg,
                aad: b"hdr",
            },
        )
        .unwrap();
    let mut aad = *b"hdr";
    // In place.
    let mut buf = msg.clone();
    let b = buf.as_mut_ptr();
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    assert_eq!(
        message_raw(true, s, &mut p, aad.as_mut_ptr(), 3, b, 1000, b, 1000),
        (CKR_OK, 1000)
    );
    assert_eq!(buf[..], want[..1000]);
    assert_eq!(tag[..], want[1000..]);
    let ct = buf.clone();
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    assert_eq!(
        message_raw(false, s, &mut p, aad.as_mut_ptr(), 3, b, 1000, b, 1000),
        (CKR_OK, 1000)
    );
    assert_eq!(buf, msg, "decrypted in place");
    // A wrong tag, in place: the buffer is zeroed, no unauthenticated plaintext.
    buf.copy_from_slice(&ct);
    let mut bad_tag = tag;
    bad_tag[3] ^= 0x10;
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut bad_tag);
    let b = buf.as_mut_ptr();
    assert_eq!(
        message_raw(false, s, &mut p, aad.as_mut_ptr(), 3, b, 1000, b, 1000).0,
        CKR_ENCRYPTED_DATA_INVALID
    );
    assert!(buf.iter().all(|x| *x == 0));
    // The AAD inside the output buffer: authenticated as it was before the output was written.
    let mut out = vec![0u8; 1000];
    out[10..13].copy_from_slice(b"hdr");
    let o = out.as_mut_ptr();
    let mut input = msg.clone();
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    // SAFETY: `o + 10` is inside `out`.
    let aad_in_out = unsafe { o.add(10) };
    assert_eq!(
        message_raw(
            true,
            s,
            &mut p,
            aad_in_out,
            3,
            input.as_mut_ptr(),
            1000,
            o,
            1000
        ),
        (CKR_OK, 1000)
    );
    assert_eq!(out[..], want[..1000]);
    assert_eq!(tag[..], want[1000..]);
    // An empty message: the tag is GMAC over the AAD.
    let gmac = other
        .encrypt(
            &nonce,
            Payload {
                msg: b"",
                aad: b"hdr",
            },
        )
        .unwrap();
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let mut none = [0u8; 1];
    assert_eq!(
        message_raw(
            true,
            s,
            &mut p,
            aad.as_mut_ptr(),
            3,
            null_mut(),
            0,
            none.as_mut_ptr(),
            0
        ),
        (CKR_OK, 0)
    );
    assert_eq!(tag[..], gmac[..]);
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    assert_eq!(
        message_raw(
            false,
            s,
            &mut p,
            aad.as_mut_ptr(),
            3,
            null_mut(),
            0,
            none.as_mut_ptr(),
            0
        ),
        (CKR_OK, 0)
    );
}

#[test]
fn a_size_query_or_short_buffer_generates_nothing_and_keeps_the_operation() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(init(true, s, aes), CKR_OK);
    let msg = [7u8; 100];
    let mut iv = [0u8; 12];
    let mut tag = [0u8; 16];
    let mut p = params(&mut iv, 0, CKG_GENERATE_COUNTER, &mut tag);
    assert_eq!(
        message(true, s, &mut p, b"", &msg, null_mut(), 0),
        (CKR_OK, 100)
    );
    let mut out = [0u8; 100];
    assert_eq!(
        message(true, s, &mut p, b"", &msg, out.as_mut_ptr(), 99),
        (CKR_BUFFER_TOO_SMALL, 100)
    );
    assert_eq!(
        (iv, tag),
        ([0u8; 12], [0u8; 16]),
        "no IV made, no tag written"
    );
    assert_eq!(
        message(true, s, &mut p, b"", &msg, out.as_mut_ptr(), 100),
        (CKR_OK, 100)
    );
    assert_ne!(iv, [0u8; 12]);
    assert_ne!(tag, [0u8; 16]);
}

#[test]
fn a_wrong_tag_leaves_a_zeroed_output_and_the_operation_serves_the_next_message() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(init(true, s, aes), CKR_OK);
    assert_eq!(init(false, s, aes), CKR_OK);
    let msg = *b"authenticated payload";
    let mut iv = [9u8; 12];
    let mut tag = [0u8; 16];
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let mut ct = [0u8; 21];
    assert_eq!(
        message(true, s, &mut p, b"aad", &msg, ct.as_mut_ptr(), 21),
        (CKR_OK, 21)
    );
    tag[15] ^= 1;
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let mut out = [0xA5u8; 21];
    let (rv, _) = message(false, s, &mut p, b"aad", &ct, out.as_mut_ptr(), 21);
    assert_eq!(rv, CKR_ENCRYPTED_DATA_INVALID);
    assert_eq!(
        out, [0u8; 21],
        "no unauthenticated plaintext is left in the output"
    );
    tag[15] ^= 1;
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    assert_eq!(
        message(false, s, &mut p, b"aad", &ct, out.as_mut_ptr(), 21),
        (CKR_OK, 21)
    );
    assert_eq!(out, msg);
}

#[test]
fn message_calls_refuse_bad_arguments_and_states_with_their_codes() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    let rsa = live.find(s, CKO_PUBLIC_KEY, 1);
    let mut iv = [0u8; 12];
    let mut tag = [0u8; 16];
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let msg = [1u8; 16];
    let mut out = [0u8; 16];
    // Before an Init.
    assert_eq!(
        message(true, s, &mut p, b"", &msg, out.as_mut_ptr(), 16).0,
        CKR_OPERATION_NOT_INITIALIZED
    );
    // SAFETY (all calls below): valid or deliberately NULL arguments.
    unsafe {
        assert_eq!(C_MessageEncryptInit(s, null_mut(), aes), CKR_ARGUMENTS_BAD);
        let mut cbc_iv = [0u8; 16];
        let mut cbc = mech_with(CKM_AES_CBC, &mut cbc_iv);
        assert_eq!(
            C_MessageEncryptInit(s, &mut cbc, aes),
            CKR_MECHANISM_INVALID
        );
        // A parameter at Init is none or a CK_GCM_MESSAGE_PARAMS (whose values are per message).
        let mut bytes = [0u8; 16];
        let mut not_params = mech_with(CKM_AES_GCM, &mut bytes);
        assert_eq!(
            C_MessageEncryptInit(s, &mut not_params, aes),
            CKR_MECHANISM_PARAM_INVALID
        );
        assert_eq!(init(true, s, rsa), CKR_KEY_TYPE_INCONSISTENT);
        assert_eq!(init(true, s, 0xdead), CKR_KEY_HANDLE_INVALID);
        // A parameter at Init as cryptoki passes it.
        let mut at_init = mech_with(CKM_AES_GCM, &mut p);
        assert_eq!(C_MessageEncryptInit(s, &mut at_init, aes), CKR_OK);
        assert_eq!(init(true, s, aes), CKR_OPERATION_ACTIVE);
        // NULL pointers and impossible lengths: CKR_ARGUMENTS_BAD.
        let mut n: CK_ULONG = 16;
        let pp = &mut p as *mut _ as *mut std::ffi::c_void;
        let (m, o) = (msg.as_ptr() as *mut u8, out.as_mut_ptr());
        assert_eq!(
            C_EncryptMessage(s, null_mut(), PARAMS_LEN, null_mut(), 0, m, 16, o, &mut n),
            CKR_ARGUMENTS_BAD
        );
        assert_eq!(
            C_EncryptMessage(s, pp, PARAMS_LEN, null_mut(), 5, m, 16, o, &mut n),
            CKR_ARGUMENTS_BAD
        );
        assert_eq!(
            C_EncryptMessage(s, pp, PARAMS_LEN, null_mut(), 0, null_mut(), 16, o, &mut n),
            CKR_ARGUMENTS_BAD
        );
        assert_eq!(
            C_EncryptMessage(s, pp, PARAMS_LEN, null_mut(), 0, m, 16, o, null_mut()),
            CKR_ARGUMENTS_BAD
        );
        // The parameter's own shape: CKR_MECHANISM_PARAM_INVALID.
        assert_eq!(
            C_EncryptMessage(s, pp, PARAMS_LEN - 1, null_mut(), 0, m, 16, o, &mut n),
            CKR_MECHANISM_PARAM_INVALID
        );
    }
    let bad = |p: &mut CK_GCM_MESSAGE_PARAMS, out: &mut [u8]| {
        message(true, s, p, b"", &msg, out.as_mut_ptr(), 16).0
    };
    let mut q = p;
    q.ulTagBits = 64;
    assert_eq!(
        bad(&mut q, &mut out),
        CKR_MECHANISM_PARAM_INVALID,
        "64-bit tag"
    );
    let mut q = p;
    q.pTag = null_mut();
    assert_eq!(
        bad(&mut q, &mut out),
        CKR_MECHANISM_PARAM_INVALID,
        "NULL pTag"
    );
    let mut q = p;
    q.ivGenerator = CKG_GENERATE_RANDOM;
    q.ulIvFixedBits = 32;
    assert_eq!(
        bad(&mut q, &mut out),
        CKR_MECHANISM_PARAM_INVALID,
        "random IV with a fixed field"
    );
    let mut q = p;
    q.ivGenerator = 99;
    assert_eq!(
        bad(&mut q, &mut out),
        CKR_MECHANISM_PARAM_INVALID,
        "unknown generator"
    );
    // Every refusal above left the operation alive.
    assert_eq!(
        message(true, s, &mut p, b"", &msg, out.as_mut_ptr(), 16),
        (CKR_OK, 16)
    );
    // Multi-part messages are not offered, and the mechanism says so.
    // SAFETY: valid arguments.
    unsafe {
        let pp = &mut p as *mut _ as *mut std::ffi::c_void;
        assert_eq!(
            super::ops::C_EncryptMessageBegin(s, pp, PARAMS_LEN, null_mut(), 0),
            CKR_FUNCTION_NOT_SUPPORTED
        );
        let mut info: CK_MECHANISM_INFO = std::mem::zeroed();
        assert_eq!(
            super::tests::fl().C_GetMechanismInfo.unwrap()(1, CKM_AES_GCM, &mut info),
            CKR_OK
        );
        assert_eq!(
            info.flags & (CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT | CKF_MULTI_MESSAGE),
            CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT
        );
        assert_eq!(C_MessageDecryptFinal(s), CKR_OPERATION_NOT_INITIALIZED);
    }
}

#[test]
fn a_message_operation_on_a_released_key_ends_with_the_logout() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(init(true, s, aes), CKR_OK);
    // SAFETY: a valid session.
    assert_eq!(unsafe { super::tests::fl().C_Logout.unwrap()(s) }, CKR_OK);
    let mut iv = [0u8; 12];
    let mut tag = [0u8; 16];
    let mut p = params(&mut iv, 0, CKG_NO_GENERATE, &mut tag);
    let mut out = [0u8; 4];
    // The logout ended it (its key is wiped): nothing left to encrypt with or to finish.
    assert_eq!(
        message(true, s, &mut p, b"", b"data", out.as_mut_ptr(), 4).0,
        CKR_OPERATION_NOT_INITIALIZED
    );
    // SAFETY: a valid session.
    assert_eq!(
        unsafe { C_MessageEncryptFinal(s) },
        CKR_OPERATION_NOT_INITIALIZED
    );
}

#[test]
fn session_cancel_ends_the_chosen_message_operation() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    assert_eq!(init(true, s, aes), CKR_OK);
    assert_eq!(init(false, s, aes), CKR_OK);
    let cancel = super::general::C_SessionCancel;
    // SAFETY: a valid session.
    unsafe {
        assert_eq!(cancel(s, CKF_MESSAGE_ENCRYPT), CKR_OK);
        assert_eq!(
            C_MessageEncryptFinal(s),
            CKR_OPERATION_NOT_INITIALIZED,
            "cancelled"
        );
        assert_eq!(C_MessageDecryptFinal(s), CKR_OK, "not chosen, still active");
    }
}
