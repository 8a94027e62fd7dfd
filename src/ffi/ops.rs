//! Cryptographic functions: mechanism parameter decoding into owned values, the operation
//! lifecycle (NULL-mechanism cancel, one active operation per kind, any error but
//! CKR_BUFFER_TOO_SMALL ends it) and the size-query protocol.

use super::{deliver, input, instance, out, p11_fn, read_len};
use crate::crypto::mechanism::{lookup, ParamShape, RawParam};
use crate::crypto::ops::{AsymKey, CipherKey, CipherOp, DigestOp, SignOp, VerifyOp};
use crate::crypto::Mechanism;
use crate::error::{Error, Result};
use crate::secret::Wiped;
use crate::token::object::{Body, Object};
use crate::token::session::{active, Active, Call, Session};
use crate::token::Token;
use cryptoki_sys::*;
use std::sync::Arc;

/// Largest OAEP label / GCM AAD / IV accepted.
const MAX_PARAM_BYTES: CK_ULONG = 1 << 20;

fn param_invalid(msg: &str) -> Error {
    Error::new(CKR_MECHANISM_PARAM_INVALID, msg.to_string())
}

/// Copy a fixed-size parameter struct after checking its declared length.
///
/// # Safety
/// `m.pParameter` is NULL or valid for `m.ulParameterLen` bytes.
unsafe fn param_struct<T: Copy>(m: &CK_MECHANISM, what: &str) -> Result<T> {
    if m.pParameter.is_null() || m.ulParameterLen as usize != std::mem::size_of::<T>() {
        return Err(param_invalid(&format!(
            "{what}: parameter must be a {}-byte structure",
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: non-NULL and exactly size_of::<T>() bytes per the caller.
    Ok(unsafe { (m.pParameter as *const T).read_unaligned() })
}

/// # Safety
/// `p` is NULL or valid for `len` bytes.
unsafe fn param_bytes(p: *const u8, len: CK_ULONG, what: &str) -> Result<Vec<u8>> {
    if len > MAX_PARAM_BYTES {
        return Err(param_invalid(&format!("{what} is too long")));
    }
    // SAFETY: forwarded caller contract.
    unsafe { input(p, len, what) }
        .map(|s| s.to_vec())
        .map_err(|_| param_invalid(&format!("{what}: NULL pointer with a length")))
}

/// Decode CK_MECHANISM and its parameter into an owned `Mechanism`.
///
/// # Safety
/// `p` is non-NULL and points to a CK_MECHANISM whose parameter pointers are valid.
pub(crate) unsafe fn decode_mechanism(p: *const CK_MECHANISM) -> Result<Mechanism> {
    // SAFETY: caller contract.
    let m = unsafe { p.read_unaligned() };
    let shape = lookup(m.mechanism).map_or(ParamShape::Bytes, |i| i.param);
    let raw = match shape {
        ParamShape::Pss => {
            // SAFETY: as above.
            let pp: CK_RSA_PKCS_PSS_PARAMS = unsafe { param_struct(&m, "CK_RSA_PKCS_PSS_PARAMS")? };
            RawParam::Pss {
                hash_alg: pp.hashAlg,
                mgf: pp.mgf,
                salt_len: pp.sLen,
            }
        }
        ParamShape::Oaep => {
            // SAFETY: as above.
            let op: CK_RSA_PKCS_OAEP_PARAMS =
                unsafe { param_struct(&m, "CK_RSA_PKCS_OAEP_PARAMS")? };
            // SAFETY: pSourceData is valid for ulSourceDataLen bytes per the API.
            let source_data = unsafe {
                param_bytes(
                    op.pSourceData as *const u8,
                    op.ulSourceDataLen,
                    "OAEP source data",
                )?
            };
            RawParam::Oaep {
                hash_alg: op.hashAlg,
                mgf: op.mgf,
                source: op.source,
                source_data,
            }
        }
        ParamShape::Gcm => {
            // SAFETY: as above.
            let g: CK_GCM_PARAMS = unsafe { param_struct(&m, "CK_GCM_PARAMS")? };
            // SAFETY: pIv / pAAD are valid for their lengths per the API.
            let iv = unsafe { param_bytes(g.pIv, g.ulIvLen, "GCM IV")? };
            let aad = unsafe { param_bytes(g.pAAD, g.ulAADLen, "GCM AAD")? };
            RawParam::Gcm {
                iv,
                aad,
                tag_bits: g.ulTagBits,
            }
        }
        ParamShape::Ctr => {
            // SAFETY: as above.
            let c: CK_AES_CTR_PARAMS = unsafe { param_struct(&m, "CK_AES_CTR_PARAMS")? };
            RawParam::Ctr {
                counter_bits: c.ulCounterBits,
                block: c.cb,
            }
        }
        ParamShape::Ecdh => {
            // SAFETY: as above.
            let e: CK_ECDH1_DERIVE_PARAMS = unsafe { param_struct(&m, "CK_ECDH1_DERIVE_PARAMS")? };
            // SAFETY: pSharedData / pPublicData are valid for their lengths per the API.
            let shared =
                unsafe { param_bytes(e.pSharedData, e.ulSharedDataLen, "ECDH shared data")? };
            let public =
                unsafe { param_bytes(e.pPublicData, e.ulPublicDataLen, "ECDH public data")? };
            RawParam::Ecdh {
                kdf: e.kdf,
                shared,
                public,
            }
        }
        ParamShape::Bytes if m.pParameter.is_null() || m.ulParameterLen == 0 => RawParam::None,
        // SAFETY: as above.
        ParamShape::Bytes => RawParam::Bytes(unsafe {
            param_bytes(
                m.pParameter as *const u8,
                m.ulParameterLen,
                "mechanism parameter",
            )?
        }),
    };
    Mechanism::from_raw(m.mechanism, raw)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    Sign,
    Verify,
    Encrypt,
    Decrypt,
}

impl Purpose {
    fn flag(self) -> CK_FLAGS {
        match self {
            Purpose::Sign => CKF_SIGN,
            Purpose::Verify => CKF_VERIFY,
            Purpose::Encrypt => CKF_ENCRYPT,
            Purpose::Decrypt => CKF_DECRYPT,
        }
    }
}

fn not_permitted(msg: &str) -> Error {
    Error::new(CKR_KEY_FUNCTION_NOT_PERMITTED, msg.to_string())
}

impl Purpose {
    /// The key attribute that permits the purpose.
    fn attribute(self) -> CK_ATTRIBUTE_TYPE {
        match self {
            Purpose::Sign => CKA_SIGN,
            Purpose::Verify => CKA_VERIFY,
            Purpose::Encrypt => CKA_ENCRYPT,
            Purpose::Decrypt => CKA_DECRYPT,
        }
    }
}

/// `f` of the key object for an operation, checked against the mechanism and purpose: a key at
/// all (CKR_KEY_HANDLE_INVALID), of the mechanism's key type (CKR_KEY_TYPE_INCONSISTENT),
/// allowed this use (CKR_KEY_FUNCTION_NOT_PERMITTED) and this mechanism (CKR_MECHANISM_INVALID).
pub(super) fn with_key_object<R>(
    t: &Token,
    h: CK_OBJECT_HANDLE,
    m: Mechanism,
    purpose: Purpose,
    f: impl FnOnce(&Arc<Object>, Mechanism, u64) -> Result<R>,
) -> Result<R> {
    t.follow(
        crate::token::Follow::Operation,
        &super::general::reread_certificate,
    );
    // The epoch before the lookup: a rotation that drops the key between the two then leaves
    // the operation stale (ended at its next call), never current with a dropped key.
    let epoch = t.epoch();
    // Borrowed where the token keeps it: no reference count of the key object is written.
    t.with_object(h, |o| {
        check_key(o, &m, purpose).and_then(|()| f(o, m, epoch))
    })
    .unwrap_or_else(|| {
        Err(Error::new(
            CKR_KEY_HANDLE_INVALID,
            format!("key handle {h} is not valid in this session"),
        ))
    })
}

fn check_key(o: &Object, m: &Mechanism, purpose: Purpose) -> Result<()> {
    let ckm = m.ckm();
    let info = lookup(ckm)
        .filter(|i| i.can(purpose.flag()))
        .ok_or_else(|| {
            Error::new(
                CKR_MECHANISM_INVALID,
                format!("mechanism {ckm:#x} does not support this operation"),
            )
        })?;
    match (&o.body, purpose) {
        (Body::Certificate(_) | Body::Stored, _) => {
            return Err(Error::new(
                CKR_KEY_HANDLE_INVALID,
                "this object is not a key",
            ))
        }
        (Body::PrivateKey { .. }, Purpose::Sign | Purpose::Decrypt)
        | (Body::PublicKey(_), Purpose::Verify | Purpose::Encrypt)
        | (Body::SecretKey(_), _) => {}
        _ => return Err(not_permitted("the key cannot be used for this operation")),
    }
    if info.key != o.key_type() {
        return Err(Error::new(
            CKR_KEY_TYPE_INCONSISTENT,
            format!("mechanism {ckm:#x} needs another key type"),
        ));
    }
    if !o.flag(purpose.attribute()) {
        return Err(not_permitted(
            "the key's attributes do not permit this operation (CKA_SIGN / CKA_VERIFY / CKA_ENCRYPT / CKA_DECRYPT)",
        ));
    }
    if !o.allows(ckm) {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            format!("mechanism {ckm:#x} is not allowed for this key"),
        ));
    }
    if purpose == Purpose::Decrypt {
        pkcs1_decrypt_allowed(o, m, "C_DecryptInit")?;
    }
    Ok(())
}

/// PKCS#1 v1.5 decryption and unwrapping with a released key need its config's
/// `allow_rsa_pkcs_decrypt`: implicit rejection answers bad padding with a synthetic message,
/// but a protocol around it (TLS 1.2 RSA key exchange, a key length check) may still show it.
pub(super) fn pkcs1_decrypt_allowed(o: &Object, m: &Mechanism, call: &str) -> Result<()> {
    let Body::PrivateKey {
        allow_rsa_pkcs_decrypt: false,
        ..
    } = &o.body
    else {
        return Ok(());
    };
    if *m != Mechanism::RsaPkcs {
        return Ok(());
    }
    let e = Error::new(
        CKR_MECHANISM_INVALID,
        format!("CKM_RSA_PKCS decryption and unwrapping are disabled for key {:?}", o.label),
    )
    .with_hint("set allow_rsa_pkcs_decrypt = true for this key if TLS 1.2 RSA key exchange or a PKCS#1 v1.5 unwrap (Java SunPKCS11's Cipher.unwrap) needs it; prefer CKM_RSA_PKCS_OAEP");
    log::warn!("{call}: {e}");
    // The warning above is its one log line (it carries the hint); the boundary adds none.
    Err(e.mark_logged())
}

pub(super) fn asym(o: &Object) -> Result<Arc<AsymKey>> {
    match &o.body {
        Body::PublicKey(k) | Body::PrivateKey { key: k, .. } => Ok(k.clone()),
        _ => Err(Error::new(
            CKR_KEY_TYPE_INCONSISTENT,
            "not an RSA or EC key",
        )),
    }
}

pub(super) fn cipher_key(o: &Object) -> Result<CipherKey> {
    match &o.body {
        Body::SecretKey(s) => Ok(CipherKey::Secret(s.clone())),
        _ => asym(o).map(CipherKey::Asym),
    }
}

pub(super) fn op_active() -> Error {
    Error::new(
        CKR_OPERATION_ACTIVE,
        "an operation of this kind is already active",
    )
}

/// The common tail of every output-producing call (see `token::session`).
///
/// # Safety
/// `out_buf` is NULL or valid for `*out_len` bytes; `out_len` is valid.
// The pieces of one C call, passed through as they are: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
unsafe fn produce_into<T>(
    slot: &mut Option<Active<T>>,
    t: &Token,
    call: Call,
    data: &[u8],
    out_buf: *mut u8,
    out_len: *mut CK_ULONG,
    known_len: Option<usize>,
    into: impl FnOnce(&mut T, &mut [u8]) -> Option<Result<usize>>,
    compute: impl FnOnce(&mut T) -> Result<Wiped>,
) -> Result<()> {
    let (logged_in, epoch) = (t.is_logged_in(), t.epoch());
    let result = (|| {
        let a = active(slot, logged_in, epoch)?;
        if call == Call::Update {
            a.multipart = true;
        }
        // Output length known without computing: answer a size query or a short buffer
        // right away; the call with room computes and delivers in one go.
        if let Some(need) = known_len.filter(|_| call == Call::Single && !a.has_cached()) {
            // SAFETY: forwarded caller contract.
            let have = unsafe { read_len(out_len, "output length pointer")? };
            // SAFETY: as above.
            unsafe { out(out_len, need as CK_ULONG, "output length pointer")? };
            if out_buf.is_null() {
                return Ok(false);
            }
            if have < need as CK_ULONG {
                return Err(Error::new(
                    CKR_BUFFER_TOO_SMALL,
                    format!("output needs {need} bytes, buffer has {have}"),
                ));
            }
            // Room for all of it: a mode whose output is not secret writes it straight into
            // the caller's buffer (no intermediate to copy back and wipe). Not when the caller
            // encrypts in place (input and output overlap): that takes the copying path.
            let (d, o) = (data.as_ptr() as usize, out_buf as usize);
            if d.saturating_add(data.len()) <= o || o.saturating_add(need) <= d {
                // SAFETY: `out_buf` is non-NULL and valid for `have` ≥ `need` bytes (caller
                // contract) and does not overlap `data`.
                let dest = unsafe { std::slice::from_raw_parts_mut(out_buf, need) };
                if let Some(r) = into(&mut a.op, dest) {
                    let n = r?;
                    // SAFETY: forwarded caller contract.
                    unsafe { out(out_len, n as CK_ULONG, "output length pointer")? };
                    return Ok(true);
                }
            }
        }
        // SAFETY: forwarded caller contract.
        a.produce(call, data, compute, |bytes| unsafe {
            deliver(out_buf, out_len, bytes)
        })
    })();
    match result {
        // Taken: a single-part or final call ends the operation.
        Ok(true) => {
            if call != Call::Update {
                *slot = None;
            }
            Ok(())
        }
        // Size query: the operation and its computed output stay.
        Ok(false) => Ok(()),
        Err(e) if e.rv() == CKR_BUFFER_TOO_SMALL => Err(e),
        Err(e) => {
            *slot = None;
            Err(e)
        }
    }
}

/// Whether an operation on this key object must end with the login.
pub(super) fn needs_login(t: &Token, o: &Object) -> bool {
    o.is_private() || (!o.is_session() && !t.is_permanent(o.handle))
}

/// One operation family (Sign, Verify, Encrypt, Decrypt, Digest): where its active operation
/// lives on a session and how it is built from a mechanism and a key. The Init / single-part /
/// Update / Final calls of every family are the generic functions below; a family only says
/// what differs.
trait Family {
    type Op;
    /// CKF_SIGN, ... for the key checks; None for keyless families (digest).
    const PURPOSE: Option<Purpose>;
    /// The C parameter names of the single-part and Update inputs, for error messages.
    const DATA: &'static str = "pData";
    const PART: &'static str = "pPart";
    const SLOT: fn(&mut Session) -> &mut Option<Active<Self::Op>>;
    const BUILD: fn(Mechanism, Option<&Object>) -> Result<Self::Op>;
}

/// A single-part output written straight into the caller's buffer: Some(bytes written), or
/// None when the operation has no such path.
type IntoFn<Op> = fn(&mut Op, &[u8], &mut [u8]) -> Option<Result<usize>>;

/// Families whose single-part and Final calls produce output.
trait Produce: Family {
    const SINGLE: fn(&mut Self::Op, &[u8]) -> Result<Wiped>;
    const FINISH: fn(&mut Self::Op) -> Result<Wiped>;
    /// The single-part output length when known without computing (see `produce_into`).
    fn known_len(_a: &Active<Self::Op>, _n: usize) -> Option<usize> {
        None
    }
    /// The single-part output written straight into the caller's buffer (see
    /// `SecretCipher::single_into`); None: computed, then delivered.
    const SINGLE_INTO: IntoFn<Self::Op> = |_, _, _| None;
}

/// Families whose Update only absorbs input (sign, verify, digest).
trait Absorb: Family {
    const ABSORB: fn(&mut Self::Op, &[u8]) -> Result<()>;
}

/// Families whose Update produces output as it goes (encrypt, decrypt).
trait Stream: Family {
    const UPDATE: fn(&mut Self::Op, &[u8]) -> Result<Wiped>;
}

fn key_of(key: Option<&Object>) -> Result<&Object> {
    key.ok_or_else(|| Error::general("operation without a key"))
}

/// Sign and digest absorb input and make their output once, at the end.
macro_rules! absorb_then_output {
    ($($family:ty => $op:ty;)*) => {$(
        impl Produce for $family {
            const SINGLE: fn(&mut $op, &[u8]) -> Result<Wiped> = |op, data| {
                op.update(data)?;
                Ok(Wiped::new(op.finish()?))
            };
            const FINISH: fn(&mut $op) -> Result<Wiped> = |op| Ok(Wiped::new(op.finish()?));
        }
        impl Absorb for $family {
            const ABSORB: fn(&mut $op, &[u8]) -> Result<()> = <$op>::update;
        }
    )*};
}

/// A family that is one operation type in one session slot: its type, key purpose, slot
/// and builder.
macro_rules! family {
    ($($family:ident: $op:ty, $purpose:expr, $slot:ident, $build:expr;)*) => {$(
        struct $family;
        impl Family for $family {
            type Op = $op;
            const PURPOSE: Option<Purpose> = $purpose;
            const SLOT: fn(&mut Session) -> &mut Option<Active<$op>> = |s| &mut s.$slot;
            const BUILD: fn(Mechanism, Option<&Object>) -> Result<$op> = $build;
        }
    )*};
}

family! {
    Sign: SignOp, Some(Purpose::Sign), sign, |m, key| match &key_of(key)?.body {
        Body::SecretKey(s) => SignOp::mac(m, s),
        _ => SignOp::new(m, asym(key_of(key)?)?),
    };
    Verify: VerifyOp, Some(Purpose::Verify), verify, |m, key| match &key_of(key)?.body {
        Body::SecretKey(s) => VerifyOp::mac(m, s),
        _ => VerifyOp::new(m, asym(key_of(key)?)?),
    };
    Digest: DigestOp, None, digest, |m, _| match m {
        Mechanism::Digest(alg) => Ok(DigestOp::new(alg)),
        _ => Err(Error::new(CKR_MECHANISM_INVALID, "not a digest mechanism")),
    };
}

impl Absorb for Verify {
    const ABSORB: fn(&mut VerifyOp, &[u8]) -> Result<()> = VerifyOp::update;
}

absorb_then_output! {
    Sign => SignOp;
    Digest => DigestOp;
}

/// Encrypt (`Cipher<true>`) and decrypt (`Cipher<false>`): one operation type, two slots.
struct Cipher<const ENCRYPT: bool>;
type Encrypt = Cipher<true>;
type Decrypt = Cipher<false>;
impl<const ENCRYPT: bool> Family for Cipher<ENCRYPT> {
    type Op = CipherOp;
    const PURPOSE: Option<Purpose> = Some(if ENCRYPT {
        Purpose::Encrypt
    } else {
        Purpose::Decrypt
    });
    const DATA: &'static str = if ENCRYPT { "pData" } else { "pEncryptedData" };
    const PART: &'static str = if ENCRYPT { "pPart" } else { "pEncryptedPart" };
    const SLOT: fn(&mut Session) -> &mut Option<Active<CipherOp>> = |s| {
        if ENCRYPT {
            &mut s.encrypt
        } else {
            &mut s.decrypt
        }
    };
    const BUILD: fn(Mechanism, Option<&Object>) -> Result<CipherOp> =
        |m, key| CipherOp::new(m, cipher_key(key_of(key)?)?, ENCRYPT);
}
impl<const ENCRYPT: bool> Produce for Cipher<ENCRYPT> {
    const SINGLE: fn(&mut CipherOp, &[u8]) -> Result<Wiped> = CipherOp::single;
    const FINISH: fn(&mut CipherOp) -> Result<Wiped> = CipherOp::finish;
    const SINGLE_INTO: IntoFn<CipherOp> = CipherOp::single_into;
    fn known_len(a: &Active<CipherOp>, n: usize) -> Option<usize> {
        Some(a)
            .filter(|a| !a.multipart)
            .and_then(|a| a.op.single_output_len(n))
    }
}
impl<const ENCRYPT: bool> Stream for Cipher<ENCRYPT> {
    const UPDATE: fn(&mut CipherOp, &[u8]) -> Result<Wiped> = CipherOp::update;
}

/// Run `f` on the family's operation slot of session `h`, under the session's lock.
fn with_slot<F: Family, R>(
    h: CK_SESSION_HANDLE,
    f: impl FnOnce(&mut Option<Active<F::Op>>, &Token) -> Result<R>,
) -> Result<R> {
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    f(F::SLOT(&mut g), t)
}

/// C_*Init: a NULL mechanism cancels; one active operation per family; the key is checked
/// against the mechanism and the family's purpose.
///
/// # Safety
/// `p_mech` is NULL or a valid CK_MECHANISM.
unsafe fn init<F: Family>(
    h: CK_SESSION_HANDLE,
    p_mech: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> Result<()> {
    with_slot::<F, _>(h, |slot, t| {
        if p_mech.is_null() {
            *slot = None;
            return Ok(());
        }
        if slot.is_some() {
            return Err(op_active());
        }
        // SAFETY: non-NULL API mechanism.
        let m = unsafe { decode_mechanism(p_mech)? };
        let active = match F::PURPOSE {
            Some(purpose) => with_key_object(t, key, m, purpose, |o, m, epoch| {
                Ok(Active::new(F::BUILD(m, Some(o))?, needs_login(t, o), epoch))
            })?,
            None => Active::new(F::BUILD(m, None)?, false, t.epoch()),
        };
        *slot = Some(active);
        Ok(())
    })
}

/// An input-taking, output-producing call: C_Sign, C_Encrypt, C_Decrypt, C_Digest
/// (`Call::Single`) and C_EncryptUpdate, C_DecryptUpdate (`Call::Update`). A bad input
/// pointer ends the operation.
///
/// # Safety
/// API input buffer, output buffer and length.
// The pieces of one C call plus the family's two answers, passed through as they are.
#[allow(clippy::too_many_arguments)]
unsafe fn produce_part<F: Family>(
    h: CK_SESSION_HANDLE,
    (p_data, len, name): (*mut CK_BYTE, CK_ULONG, &str),
    p_out: *mut CK_BYTE,
    p_out_len: *mut CK_ULONG,
    call: Call,
    known_len: fn(&Active<F::Op>, usize) -> Option<usize>,
    into: IntoFn<F::Op>,
    compute: fn(&mut F::Op, &[u8]) -> Result<Wiped>,
) -> Result<()> {
    with_slot::<F, _>(h, |slot, t| {
        // SAFETY: API input buffer.
        let data = match unsafe { input(p_data, len, name) } {
            Ok(d) => d,
            Err(e) => {
                *slot = None;
                return Err(e);
            }
        };
        let known = slot.as_ref().and_then(|a| known_len(a, data.len()));
        // SAFETY: API output buffer and length.
        unsafe {
            produce_into(
                slot,
                t,
                call,
                data,
                p_out,
                p_out_len,
                known,
                |op, dest| into(op, data, dest),
                |op| compute(op, data),
            )
        }
    })
}

/// C_SignUpdate, C_VerifyUpdate, C_DigestUpdate.
///
/// # Safety
/// API input buffer.
unsafe fn absorb<F: Absorb>(h: CK_SESSION_HANDLE, data: *mut CK_BYTE, len: CK_ULONG) -> Result<()> {
    with_slot::<F, _>(h, |slot, t| {
        let r = (|| {
            let a = active(slot, t.is_logged_in(), t.epoch())?;
            a.multipart = true;
            // SAFETY: API input buffer.
            F::ABSORB(&mut a.op, unsafe { input(data, len, F::PART)? })
        })();
        if r.is_err() {
            *slot = None;
        }
        r
    })
}

/// C_SignFinal, C_EncryptFinal, C_DecryptFinal, C_DigestFinal.
///
/// # Safety
/// API output buffer and length.
unsafe fn finish<F: Produce>(
    h: CK_SESSION_HANDLE,
    p_out: *mut CK_BYTE,
    p_out_len: *mut CK_ULONG,
) -> Result<()> {
    with_slot::<F, _>(h, |slot, t| {
        // SAFETY: API output buffer and length.
        unsafe {
            produce_into(
                slot,
                t,
                Call::Final,
                &[],
                p_out,
                p_out_len,
                None,
                |_, _| None,
                F::FINISH,
            )
        }
    })
}

/// C_Verify and C_VerifyFinal: the signature is checked against what was absorbed; the
/// operation ends whatever the outcome.
///
/// # Safety
/// API input buffers.
unsafe fn verify_end(
    h: CK_SESSION_HANDLE,
    data: Option<(*mut CK_BYTE, CK_ULONG)>,
    p_sig: *mut CK_BYTE,
    sig_len: CK_ULONG,
) -> Result<()> {
    with_slot::<Verify, _>(h, |slot, t| {
        let r = (|| {
            let a = active(slot, t.is_logged_in(), t.epoch())?;
            if let Some((p_data, len)) = data {
                // SAFETY: API input buffer.
                let data = unsafe { input(p_data, len, "pData")? };
                let sig = unsafe { input(p_sig, sig_len, "pSignature")? };
                a.op.update(data)?;
                return a.op.finish(sig);
            }
            // SAFETY: API input buffer.
            a.op.finish(unsafe { input(p_sig, sig_len, "pSignature")? })
        })();
        *slot = None;
        r
    })
}

/// Init, single-part and Final of a family whose Init takes a key and whose single-part and
/// Final produce output.
macro_rules! produce_fns {
    ($($family:ty => $init:ident, $single:ident, $final:ident;)*) => {$(
        p11_fn! {
            fn $init(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
                // SAFETY: API arguments.
                unsafe { init::<$family>(h, p_mech, key) }
            }
            fn $single(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
                // SAFETY: API arguments.
                unsafe { produce_part::<$family>(h, (p_data, len, <$family>::DATA), p_out, p_out_len, Call::Single, <$family as Produce>::known_len, <$family as Produce>::SINGLE_INTO, <$family>::SINGLE) }
            }
            fn $final(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h] {
                // SAFETY: API arguments.
                unsafe { finish::<$family>(h, p_out, p_out_len) }
            }
        }
    )*};
}

produce_fns! {
    Sign => C_SignInit, C_Sign, C_SignFinal;
    Encrypt => C_EncryptInit, C_Encrypt, C_EncryptFinal;
    Decrypt => C_DecryptInit, C_Decrypt, C_DecryptFinal;
}

p11_fn! {
    fn C_SignUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { absorb::<Sign>(h, p_data, len) }
    }
    fn C_EncryptUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { produce_part::<Encrypt>(h, (p_data, len, Encrypt::PART), p_out, p_out_len, Call::Update, |_, _| None, |_, _, _| None, Encrypt::UPDATE) }
    }
    fn C_DecryptUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { produce_part::<Decrypt>(h, (p_data, len, Decrypt::PART), p_out, p_out_len, Call::Update, |_, _| None, |_, _, _| None, Decrypt::UPDATE) }
    }

    fn C_VerifyInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { init::<Verify>(h, p_mech, key) }
    }
    fn C_Verify(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_sig: *mut CK_BYTE, sig_len: CK_ULONG) [h, len, sig_len] {
        // SAFETY: API arguments.
        unsafe { verify_end(h, Some((p_data, len)), p_sig, sig_len) }
    }
    fn C_VerifyUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { absorb::<Verify>(h, p_data, len) }
    }
    fn C_VerifyFinal(h: CK_SESSION_HANDLE, p_sig: *mut CK_BYTE, sig_len: CK_ULONG) [h, sig_len] {
        // SAFETY: API arguments.
        unsafe { verify_end(h, None, p_sig, sig_len) }
    }

    fn C_DigestInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM) [h] {
        // SAFETY: API arguments.
        unsafe { init::<Digest>(h, p_mech, CK_INVALID_HANDLE) }
    }
    fn C_Digest(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { produce_part::<Digest>(h, (p_data, len, <Digest>::DATA), p_out, p_out_len, Call::Single, <Digest as Produce>::known_len, <Digest as Produce>::SINGLE_INTO, <Digest>::SINGLE) }
    }
    fn C_DigestUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { absorb::<Digest>(h, p_data, len) }
    }
    fn C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) [h, key] {
        with_slot::<Digest, _>(h, |slot, t| {
            let r = (|| {
                let a = active(slot, t.is_logged_in(), t.epoch())?;
                let o = t.object(key).map_err(|_| {
                    Error::new(CKR_KEY_HANDLE_INVALID, format!("key handle {key} is not valid"))
                })?;
                // A session secret key's value joins the digest; released keys give nothing
                // of themselves away, not even a hash.
                let value = match &o.body {
                    Body::SecretKey(v) if o.is_session() => v,
                    Body::SecretKey(_) => {
                        return Err(Error::new(CKR_KEY_INDIGESTIBLE, "released keys are never digested"))
                    }
                    _ => return Err(Error::new(CKR_KEY_INDIGESTIBLE, "only secret keys can be digested")),
                };
                a.multipart = true;
                a.op.update(value.as_slice())
            })();
            if r.as_ref().is_err_and(|e| e.rv() != CKR_KEY_HANDLE_INVALID && e.rv() != CKR_OPERATION_NOT_INITIALIZED) {
                *slot = None;
            }
            r
        })
    }
    fn C_DigestFinal(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h] {
        // SAFETY: API arguments.
        unsafe { finish::<Digest>(h, p_out, p_out_len) }
    }
}

/// Functions with no meaning for this token: CKR_FUNCTION_NOT_SUPPORTED once initialised.
macro_rules! not_supported {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        p11_fn! {$(
            fn $name($($arg: $ty),*) [] {
                $(let _ = $arg;)*
                instance()?;
                Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, concat!(stringify!($name), " is not supported")))
            }
        )*}
    };
}

not_supported! {
    C_SignRecoverInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_SignRecover(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_VerifyRecoverInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_VerifyRecover(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_DigestEncryptUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_DecryptDigestUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_SignEncryptUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_DecryptVerifyUpdate(h: CK_SESSION_HANDLE, d: *mut CK_BYTE, l: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_EncryptMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG);
    C_EncryptMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG, f: CK_FLAGS);
    C_DecryptMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG);
    C_DecryptMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG, f: CK_FLAGS);
    C_MessageSignInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_SignMessage(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_SignMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG);
    C_SignMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_MessageSignFinal(h: CK_SESSION_HANDLE);
    C_MessageVerifyInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_VerifyMessage(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, s: *mut CK_BYTE, sl: CK_ULONG);
    C_VerifyMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG);
    C_VerifyMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, s: *mut CK_BYTE, sl: CK_ULONG);
    C_MessageVerifyFinal(h: CK_SESSION_HANDLE);
}
