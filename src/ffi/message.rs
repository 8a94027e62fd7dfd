//! PKCS#11 3.0 message-based encryption and decryption with CKM_AES_GCM, single-part
//! messages: `C_MessageEncryptInit` once, one `C_EncryptMessage` per message (its IV, AAD and
//! tag in `CK_GCM_MESSAGE_PARAMS`), `C_MessageEncryptFinal`; the same for decryption. One C
//! call per message, no Init and no mechanism decoding per message: the fast way through
//! this token for many AES-GCM messages under one key. Multi-part messages
//! (`C_EncryptMessageBegin` / `Next`) are not offered: CKR_FUNCTION_NOT_SUPPORTED, and
//! CKF_MULTI_MESSAGE is not set.
//!
//! A message's error (a bad parameter, a short buffer, a wrong tag) does not end the
//! operation: it serves the next message; only Final, a logout for a logged-in key, the
//! session's end or C_SessionCancel end it.

use super::ops::{needs_login, op_active, with_key_object, Purpose};
use super::{bad, input, instance, out, p11_fn, read_len};
use crate::crypto::gcm_message::{GcmMessages, IvGenerator, MessageParams};
use crate::crypto::mechanism::lookup;
use crate::crypto::Mechanism;
use crate::error::{Error, Result};
use crate::token::object::Body;
use crate::token::session::{active, Active, Session};
use cryptoki_sys::*;
use std::ffi::c_void;

fn slot(s: &mut Session, encrypt: bool) -> &mut Option<Active<GcmMessages>> {
    if encrypt {
        &mut s.message_encrypt
    } else {
        &mut s.message_decrypt
    }
}

fn param_invalid(msg: impl Into<String>) -> Error {
    Error::new(CKR_MECHANISM_PARAM_INVALID, msg)
}

/// C_MessageEncryptInit / C_MessageDecryptInit.
///
/// # Safety
/// `p_mech` is NULL or a valid CK_MECHANISM.
unsafe fn message_init(
    encrypt: bool,
    h: CK_SESSION_HANDLE,
    p_mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> Result<()> {
    let inst = instance()?;
    if p_mech.is_null() {
        return Err(bad("pMechanism is NULL"));
    }
    // SAFETY: non-NULL API mechanism.
    let m = unsafe { p_mech.read_unaligned() };
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let slot = slot(&mut g, encrypt);
    if slot.is_some() {
        return Err(op_active());
    }
    let (flag, purpose) = if encrypt {
        (CKF_MESSAGE_ENCRYPT, Purpose::Encrypt)
    } else {
        (CKF_MESSAGE_DECRYPT, Purpose::Decrypt)
    };
    // The registry's flag says which mechanisms have it; this file implements CKM_AES_GCM's.
    if m.mechanism != CKM_AES_GCM || !lookup(m.mechanism).is_some_and(|i| i.can(flag)) {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            format!(
                "mechanism {:#x} has no message-based operation here (CKM_AES_GCM has)",
                m.mechanism
            ),
        ));
    }
    // Each message brings its own CK_GCM_MESSAGE_PARAMS; at Init a parameter is optional
    // (some clients pass their first message's) and its values are not used.
    let size = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG;
    if m.ulParameterLen != 0 && (m.pParameter.is_null() || m.ulParameterLen != size) {
        return Err(param_invalid(format!(
            "message-based CKM_AES_GCM takes no parameter or a {size}-byte CK_GCM_MESSAGE_PARAMS at Init"
        )));
    }
    let op = with_key_object(t, key, Mechanism::AesGcmMessage, purpose, |o, _, epoch| {
        let Body::SecretKey(k) = &o.body else {
            return Err(Error::new(
                CKR_KEY_TYPE_INCONSISTENT,
                "message-based AES-GCM needs an AES key",
            ));
        };
        Ok(Active::new(
            GcmMessages::new(k.clone())?,
            needs_login(t, o),
            epoch,
        ))
    })?;
    *slot = Some(op);
    Ok(())
}

/// A CK_GCM_MESSAGE_PARAMS: the message's parameters and the caller's IV and tag buffers.
///
/// # Safety
/// `p` is NULL or valid for `len` bytes.
unsafe fn message_params(
    p: *const c_void,
    len: CK_ULONG,
    encrypt: bool,
) -> Result<(MessageParams, *mut u8, *mut u8)> {
    let size = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>();
    if len as usize != size {
        return Err(param_invalid(format!(
            "pParameter must be a {size}-byte CK_GCM_MESSAGE_PARAMS, ulParameterLen is {len}"
        )));
    }
    // SAFETY: non-NULL (checked by the caller of this function) and `size` bytes.
    let g = unsafe { (p as *const CK_GCM_MESSAGE_PARAMS).read_unaligned() };
    if g.pIv.is_null() || g.pTag.is_null() {
        return Err(param_invalid(
            "CK_GCM_MESSAGE_PARAMS: pIv and pTag must point to the IV and tag buffers",
        ));
    }
    let params = MessageParams {
        iv_len: usize::try_from(g.ulIvLen).unwrap_or(usize::MAX),
        iv_fixed_bits: usize::try_from(g.ulIvFixedBits).unwrap_or(usize::MAX),
        // Decryption takes the IV as given, however it was made.
        generator: if encrypt {
            IvGenerator::from_ckg(g.ivGenerator)?
        } else {
            IvGenerator::Caller
        },
        tag_bits: usize::try_from(g.ulTagBits).unwrap_or(usize::MAX),
    };
    params.check(encrypt)?;
    Ok((params, g.pIv, g.pTag))
}

fn overlaps(a: *const u8, a_len: usize, b: *const u8, b_len: usize) -> bool {
    let (a, b) = (a as usize, b as usize);
    a_len != 0 && b_len != 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// C_EncryptMessage / C_DecryptMessage: the output is as long as the input (the tag goes
/// through `pTag`); NULL output → the length only; a short buffer → CKR_BUFFER_TOO_SMALL.
/// Nothing is generated, written or consumed until the output has room.
///
/// # Safety
/// API buffers and lengths.
#[allow(clippy::too_many_arguments)] // the C call's own arguments
unsafe fn one_message(
    encrypt: bool,
    h: CK_SESSION_HANDLE,
    p_param: *mut c_void,
    param_len: CK_ULONG,
    (p_aad, aad_len): (*mut CK_BYTE, CK_ULONG),
    (p_in, in_len, in_name): (*mut CK_BYTE, CK_ULONG, &str),
    p_out: *mut CK_BYTE,
    p_out_len: *mut CK_ULONG,
) -> Result<()> {
    let inst = instance()?;
    // Pointers and lengths first, before the session or the operation.
    if p_param.is_null() {
        return Err(bad("pParameter is NULL"));
    }
    // SAFETY: API input buffers.
    let aad = unsafe { input(p_aad, aad_len, "pAssociatedData")? };
    let n = unsafe { input(p_in, in_len, in_name)? }.len();
    // SAFETY: API length pointer.
    let have = unsafe { read_len(p_out_len, "output length pointer")? };
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let a = active(slot(&mut g, encrypt), t.is_logged_in(), t.epoch())?;
    // SAFETY: non-NULL API parameter of `param_len` bytes.
    let (p, p_iv, p_tag) = unsafe { message_params(p_param, param_len, encrypt)? };
    // SAFETY: as above.
    unsafe { out(p_out_len, n as CK_ULONG, "output length pointer")? };
    if p_out.is_null() {
        return Ok(());
    }
    if have < n as CK_ULONG {
        return Err(Error::new(
            CKR_BUFFER_TOO_SMALL,
            format!("output needs {n} bytes, buffer has {have}"),
        ));
    }
    // The caller's IV and tag are copied in and written back at the end, and the AAD is
    // copied when it shares bytes with the output: no slice of caller memory overlaps the
    // output slice below.
    let tag_len = p.tag_len();
    let mut iv_buf = [0u8; 256];
    let iv = &mut iv_buf[..p.iv_len];
    let mut tag_in = [0u8; 16];
    // SAFETY: pIv holds ulIvLen bytes and pTag ulTagBits / 8 (the API's contract); the local
    // arrays are not caller memory.
    unsafe {
        std::ptr::copy_nonoverlapping(p_iv, iv.as_mut_ptr(), iv.len());
        if !encrypt {
            std::ptr::copy_nonoverlapping(p_tag, tag_in.as_mut_ptr(), tag_len);
        }
    }
    let aad_copy;
    let aad = if overlaps(aad.as_ptr(), aad.len(), p_out, n) {
        aad_copy = aad.to_vec();
        &aad_copy[..]
    } else {
        aad
    };
    let buf: &mut [u8] = if n == 0 {
        &mut []
    } else {
        // SAFETY: `p_in` holds `n` readable bytes and `p_out` `have` ≥ `n` writable ones; a
        // memmove, so in-place (the usual way to call it) and overlapping buffers both work.
        unsafe {
            std::ptr::copy(p_in, p_out, n);
            std::slice::from_raw_parts_mut(p_out, n)
        }
    };
    if encrypt {
        let tag = match a.op.seal(&p, iv, aad, buf) {
            Ok(tag) => tag,
            Err(e) => {
                // The output held a copy of the plaintext; in place it is the caller's own.
                if p_out != p_in {
                    crate::secret::wipe(buf);
                }
                return Err(e);
            }
        };
        // SAFETY: as above, pIv and pTag are the caller's IV and tag buffers.
        unsafe {
            if p.generator != IvGenerator::Caller {
                std::ptr::copy_nonoverlapping(iv.as_ptr(), p_iv, iv.len());
            }
            std::ptr::copy_nonoverlapping(tag.as_ptr(), p_tag, tag_len);
        }
    } else {
        a.op.open(&p, iv, aad, &tag_in[..tag_len], buf)?;
    }
    Ok(())
}

/// C_MessageEncryptFinal / C_MessageDecryptFinal.
fn message_final(encrypt: bool, h: CK_SESSION_HANDLE) -> Result<()> {
    let inst = instance()?;
    let (s, _) = inst.module.session_token(h)?;
    let mut g = s.lock();
    slot(&mut g, encrypt).take().map(drop).ok_or_else(|| {
        Error::new(
            CKR_OPERATION_NOT_INITIALIZED,
            "no message-based operation of this kind is active",
        )
    })
}

p11_fn! {
    fn C_MessageEncryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { message_init(true, h, p_mech, key) }
    }
    fn C_EncryptMessage(h: CK_SESSION_HANDLE, p_param: *mut c_void, param_len: CK_ULONG, p_aad: *mut CK_BYTE, aad_len: CK_ULONG, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { one_message(true, h, p_param, param_len, (p_aad, aad_len), (p_data, len, "pPlaintext"), p_out, p_out_len) }
    }
    fn C_MessageEncryptFinal(h: CK_SESSION_HANDLE) [h] {
        message_final(true, h)
    }
    fn C_MessageDecryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { message_init(false, h, p_mech, key) }
    }
    fn C_DecryptMessage(h: CK_SESSION_HANDLE, p_param: *mut c_void, param_len: CK_ULONG, p_aad: *mut CK_BYTE, aad_len: CK_ULONG, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { one_message(false, h, p_param, param_len, (p_aad, aad_len), (p_data, len, "pCiphertext"), p_out, p_out_len) }
    }
    fn C_MessageDecryptFinal(h: CK_SESSION_HANDLE) [h] {
        message_final(false, h)
    }
}
