//! Cryptographic functions: mechanism parameter decoding into owned values, the operation
//! lifecycle (NULL-mechanism cancel, one active operation per kind, any error but
//! CKR_BUFFER_TOO_SMALL ends it) and the size-query protocol.

use super::{deliver, input, instance, out, p11_fn, read_len};
use crate::crypto::mechanism::{mechanism_table, RawParam};
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
    let raw = match m.mechanism {
        CKM_RSA_PKCS_PSS
        | CKM_SHA1_RSA_PKCS_PSS
        | CKM_SHA224_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => {
            // SAFETY: as above.
            let pp: CK_RSA_PKCS_PSS_PARAMS = unsafe { param_struct(&m, "CK_RSA_PKCS_PSS_PARAMS")? };
            RawParam::Pss {
                hash_alg: pp.hashAlg,
                mgf: pp.mgf,
                salt_len: pp.sLen,
            }
        }
        CKM_RSA_PKCS_OAEP => {
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
        CKM_AES_GCM => {
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
        _ if m.pParameter.is_null() || m.ulParameterLen == 0 => RawParam::None,
        // SAFETY: as above.
        _ => RawParam::Bytes(unsafe {
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
enum Purpose {
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

/// The key object for an operation, checked against the mechanism and purpose.
fn key_object(
    t: &Token,
    h: CK_OBJECT_HANDLE,
    m: &Mechanism,
    purpose: Purpose,
) -> Result<Arc<Object>> {
    let o = t.object(h).map_err(|_| {
        Error::new(
            CKR_KEY_HANDLE_INVALID,
            format!("key handle {h} is not valid in this session"),
        )
    })?;
    let ckm = m.ckm();
    let listed = mechanism_table()
        .iter()
        .any(|&(x, _, _, f)| x == ckm && f & purpose.flag() != 0);
    if !listed {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            format!("mechanism {ckm:#x} does not support this operation"),
        ));
    }
    match (&o.body, purpose) {
        (Body::Certificate(_), _) => {
            return Err(Error::new(
                CKR_KEY_HANDLE_INVALID,
                "a certificate is not a key",
            ))
        }
        (Body::PrivateKey { .. }, Purpose::Sign | Purpose::Decrypt)
        | (Body::PublicKey(_), Purpose::Verify | Purpose::Encrypt)
        | (Body::SecretKey(_), Purpose::Encrypt | Purpose::Decrypt) => {}
        _ => return Err(not_permitted("the key cannot be used for this operation")),
    }
    if !o.allows(ckm) {
        return Err(Error::new(
            CKR_MECHANISM_INVALID,
            format!("mechanism {ckm:#x} is not allowed for this key"),
        ));
    }
    if let (
        Body::PrivateKey {
            allow_rsa_pkcs_decrypt: false,
            ..
        },
        Purpose::Decrypt,
        Mechanism::RsaPkcs,
    ) = (&o.body, purpose, m)
    {
        let e = Error::new(
            CKR_MECHANISM_INVALID,
            format!("CKM_RSA_PKCS decryption is disabled for key {:?}", o.label),
        )
        .with_hint("set allow_rsa_pkcs_decrypt = true for this key if TLS 1.2 RSA key exchange needs it (it is a padding oracle)");
        log::warn!("C_DecryptInit: {e}");
        return Err(e);
    }
    Ok(o)
}

fn asym(o: &Object) -> Result<Arc<AsymKey>> {
    match &o.body {
        Body::PublicKey(k) | Body::PrivateKey { key: k, .. } => Ok(k.clone()),
        _ => Err(Error::new(
            CKR_KEY_TYPE_INCONSISTENT,
            "not an RSA or EC key",
        )),
    }
}

fn cipher_key(o: &Object) -> Result<CipherKey> {
    match &o.body {
        Body::SecretKey(s) => Ok(CipherKey::Secret(s.clone())),
        _ => asym(o).map(CipherKey::Asym),
    }
}

fn op_active() -> Error {
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
fn needs_login(t: &Token, o: &Object) -> bool {
    o.is_private() || !t.is_permanent(o.handle)
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
    const DATA: &'static str;
    const PART: &'static str;
    fn slot(s: &mut Session) -> &mut Option<Active<Self::Op>>;
    fn build(m: Mechanism, key: Option<&Object>) -> Result<Self::Op>;
}

/// Families whose single-part and Final calls produce output.
trait Produce: Family {
    fn single(op: &mut Self::Op, data: &[u8]) -> Result<Wiped>;
    fn finish(op: &mut Self::Op) -> Result<Wiped>;
    /// The single-part output length when known without computing (see `produce_into`).
    fn known_len(_a: &Active<Self::Op>, _n: usize) -> Option<usize> {
        None
    }
}

/// Families whose Update only absorbs input (sign, verify, digest).
trait Absorb: Family {
    fn absorb(op: &mut Self::Op, data: &[u8]) -> Result<()>;
}

/// Families whose Update produces output as it goes (encrypt, decrypt).
trait Stream: Family {
    fn update(op: &mut Self::Op, data: &[u8]) -> Result<Wiped>;
}

fn asym_key(key: Option<&Object>) -> Result<Arc<AsymKey>> {
    asym(key.ok_or_else(|| Error::general("operation without a key"))?)
}

fn cipher_of(key: Option<&Object>) -> Result<CipherKey> {
    cipher_key(key.ok_or_else(|| Error::general("operation without a key"))?)
}

struct Sign;
impl Family for Sign {
    type Op = SignOp;
    const PURPOSE: Option<Purpose> = Some(Purpose::Sign);
    const DATA: &'static str = "pData";
    const PART: &'static str = "pPart";
    fn slot(s: &mut Session) -> &mut Option<Active<SignOp>> {
        &mut s.sign
    }
    fn build(m: Mechanism, key: Option<&Object>) -> Result<SignOp> {
        SignOp::new(m, asym_key(key)?)
    }
}
impl Produce for Sign {
    fn single(op: &mut SignOp, data: &[u8]) -> Result<Wiped> {
        op.update(data)?;
        Ok(Wiped::new(op.finish()?))
    }
    fn finish(op: &mut SignOp) -> Result<Wiped> {
        Ok(Wiped::new(op.finish()?))
    }
}
impl Absorb for Sign {
    fn absorb(op: &mut SignOp, data: &[u8]) -> Result<()> {
        op.update(data)
    }
}

struct Verify;
impl Family for Verify {
    type Op = VerifyOp;
    const PURPOSE: Option<Purpose> = Some(Purpose::Verify);
    const DATA: &'static str = "pData";
    const PART: &'static str = "pPart";
    fn slot(s: &mut Session) -> &mut Option<Active<VerifyOp>> {
        &mut s.verify
    }
    fn build(m: Mechanism, key: Option<&Object>) -> Result<VerifyOp> {
        VerifyOp::new(m, asym_key(key)?)
    }
}
impl Absorb for Verify {
    fn absorb(op: &mut VerifyOp, data: &[u8]) -> Result<()> {
        op.update(data)
    }
}

struct Encrypt;
impl Family for Encrypt {
    type Op = CipherOp;
    const PURPOSE: Option<Purpose> = Some(Purpose::Encrypt);
    const DATA: &'static str = "pData";
    const PART: &'static str = "pPart";
    fn slot(s: &mut Session) -> &mut Option<Active<CipherOp>> {
        &mut s.encrypt
    }
    fn build(m: Mechanism, key: Option<&Object>) -> Result<CipherOp> {
        CipherOp::new(m, cipher_of(key)?, true)
    }
}
impl Produce for Encrypt {
    fn single(op: &mut CipherOp, data: &[u8]) -> Result<Wiped> {
        op.single(data)
    }
    fn finish(op: &mut CipherOp) -> Result<Wiped> {
        op.finish()
    }
    fn known_len(a: &Active<CipherOp>, n: usize) -> Option<usize> {
        Some(a)
            .filter(|a| !a.multipart)
            .and_then(|a| a.op.single_output_len(n))
    }
}
impl Stream for Encrypt {
    fn update(op: &mut CipherOp, data: &[u8]) -> Result<Wiped> {
        op.update(data)
    }
}

struct Decrypt;
impl Family for Decrypt {
    type Op = CipherOp;
    const PURPOSE: Option<Purpose> = Some(Purpose::Decrypt);
    const DATA: &'static str = "pEncryptedData";
    const PART: &'static str = "pEncryptedPart";
    fn slot(s: &mut Session) -> &mut Option<Active<CipherOp>> {
        &mut s.decrypt
    }
    fn build(m: Mechanism, key: Option<&Object>) -> Result<CipherOp> {
        CipherOp::new(m, cipher_of(key)?, false)
    }
}
impl Produce for Decrypt {
    fn single(op: &mut CipherOp, data: &[u8]) -> Result<Wiped> {
        op.single(data)
    }
    fn finish(op: &mut CipherOp) -> Result<Wiped> {
        op.finish()
    }
}
impl Stream for Decrypt {
    fn update(op: &mut CipherOp, data: &[u8]) -> Result<Wiped> {
        op.update(data)
    }
}

struct Digest;
impl Family for Digest {
    type Op = DigestOp;
    const PURPOSE: Option<Purpose> = None;
    const DATA: &'static str = "pData";
    const PART: &'static str = "pPart";
    fn slot(s: &mut Session) -> &mut Option<Active<DigestOp>> {
        &mut s.digest
    }
    fn build(m: Mechanism, _key: Option<&Object>) -> Result<DigestOp> {
        let Mechanism::Digest(alg) = m else {
            return Err(Error::new(CKR_MECHANISM_INVALID, "not a digest mechanism"));
        };
        Ok(DigestOp::new(alg))
    }
}
impl Produce for Digest {
    fn single(op: &mut DigestOp, data: &[u8]) -> Result<Wiped> {
        op.update(data)?;
        Ok(Wiped::new(op.finish()?))
    }
    fn finish(op: &mut DigestOp) -> Result<Wiped> {
        Ok(Wiped::new(op.finish()?))
    }
}
impl Absorb for Digest {
    fn absorb(op: &mut DigestOp, data: &[u8]) -> Result<()> {
        op.update(data)
    }
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
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let slot = F::slot(&mut g);
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
        Some(purpose) => {
            let o = key_object(t, key, &m, purpose)?;
            Active::new(F::build(m, Some(&o))?, needs_login(t, &o), t.epoch())
        }
        None => Active::new(F::build(m, None)?, false, t.epoch()),
    };
    *slot = Some(active);
    Ok(())
}

/// C_Sign, C_Encrypt, C_Decrypt, C_Digest.
///
/// # Safety
/// API input buffer, output buffer and length.
unsafe fn single<F: Produce>(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    len: CK_ULONG,
    p_out: *mut CK_BYTE,
    p_out_len: *mut CK_ULONG,
) -> Result<()> {
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let slot = F::slot(&mut g);
    // SAFETY: API input buffer.
    let data = match unsafe { input(p_data, len, F::DATA) } {
        Ok(d) => d,
        Err(e) => {
            *slot = None;
            return Err(e);
        }
    };
    let known = slot.as_ref().and_then(|a| F::known_len(a, data.len()));
    // SAFETY: API output buffer and length.
    unsafe {
        produce_into(slot, t, Call::Single, data, p_out, p_out_len, known, |op| {
            F::single(op, data)
        })
    }
}

/// C_SignUpdate, C_VerifyUpdate, C_DigestUpdate.
///
/// # Safety
/// API input buffer.
unsafe fn absorb<F: Absorb>(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    len: CK_ULONG,
) -> Result<()> {
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let slot = F::slot(&mut g);
    let r = (|| {
        let a = active(slot, t.is_logged_in(), t.epoch())?;
        a.multipart = true;
        // SAFETY: API input buffer.
        F::absorb(&mut a.op, unsafe { input(p_data, len, F::PART)? })
    })();
    if r.is_err() {
        *slot = None;
    }
    r
}

/// C_EncryptUpdate, C_DecryptUpdate.
///
/// # Safety
/// API input buffer, output buffer and length.
unsafe fn stream<F: Stream>(
    h: CK_SESSION_HANDLE,
    p_data: *mut CK_BYTE,
    len: CK_ULONG,
    p_out: *mut CK_BYTE,
    p_out_len: *mut CK_ULONG,
) -> Result<()> {
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let slot = F::slot(&mut g);
    // SAFETY: API input buffer.
    let data = match unsafe { input(p_data, len, F::PART) } {
        Ok(d) => d,
        Err(e) => {
            *slot = None;
            return Err(e);
        }
    };
    // SAFETY: API output buffer and length.
    unsafe {
        produce_into(slot, t, Call::Update, data, p_out, p_out_len, None, |op| {
            F::update(op, data)
        })
    }
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
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    // SAFETY: API output buffer and length.
    unsafe {
        produce_into(
            F::slot(&mut g),
            t,
            Call::Final,
            &[],
            p_out,
            p_out_len,
            None,
            F::finish,
        )
    }
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
    let inst = instance()?;
    let (s, t) = inst.module.session_token(h)?;
    let mut g = s.lock();
    let r = (|| {
        let a = active(&mut g.verify, t.is_logged_in(), t.epoch())?;
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
    g.verify = None;
    r
}

p11_fn! {
    fn C_SignInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { init::<Sign>(h, p_mech, key) }
    }
    fn C_Sign(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_sig: *mut CK_BYTE, p_sig_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { single::<Sign>(h, p_data, len, p_sig, p_sig_len) }
    }
    fn C_SignUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { absorb::<Sign>(h, p_data, len) }
    }
    fn C_SignFinal(h: CK_SESSION_HANDLE, p_sig: *mut CK_BYTE, p_sig_len: *mut CK_ULONG) [h] {
        // SAFETY: API arguments.
        unsafe { finish::<Sign>(h, p_sig, p_sig_len) }
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

    fn C_EncryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { init::<Encrypt>(h, p_mech, key) }
    }
    fn C_Encrypt(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { single::<Encrypt>(h, p_data, len, p_out, p_out_len) }
    }
    fn C_EncryptUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { stream::<Encrypt>(h, p_data, len, p_out, p_out_len) }
    }
    fn C_EncryptFinal(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h] {
        // SAFETY: API arguments.
        unsafe { finish::<Encrypt>(h, p_out, p_out_len) }
    }

    fn C_DecryptInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM, key: CK_OBJECT_HANDLE) [h, key] {
        // SAFETY: API arguments.
        unsafe { init::<Decrypt>(h, p_mech, key) }
    }
    fn C_Decrypt(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { single::<Decrypt>(h, p_data, len, p_out, p_out_len) }
    }
    fn C_DecryptUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { stream::<Decrypt>(h, p_data, len, p_out, p_out_len) }
    }
    fn C_DecryptFinal(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h] {
        // SAFETY: API arguments.
        unsafe { finish::<Decrypt>(h, p_out, p_out_len) }
    }

    fn C_DigestInit(h: CK_SESSION_HANDLE, p_mech: *mut CK_MECHANISM) [h] {
        // SAFETY: API arguments.
        unsafe { init::<Digest>(h, p_mech, CK_INVALID_HANDLE) }
    }
    fn C_Digest(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG, p_out: *mut CK_BYTE, p_out_len: *mut CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { single::<Digest>(h, p_data, len, p_out, p_out_len) }
    }
    fn C_DigestUpdate(h: CK_SESSION_HANDLE, p_data: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        // SAFETY: API arguments.
        unsafe { absorb::<Digest>(h, p_data, len) }
    }
    fn C_DigestKey(h: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) [h, key] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "key values are never digested"))
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
    C_MessageEncryptInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_EncryptMessage(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_EncryptMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG);
    C_EncryptMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG, f: CK_FLAGS);
    C_MessageEncryptFinal(h: CK_SESSION_HANDLE);
    C_MessageDecryptInit(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM, k: CK_OBJECT_HANDLE);
    C_DecryptMessage(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG);
    C_DecryptMessageBegin(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, a: *mut CK_BYTE, al: CK_ULONG);
    C_DecryptMessageNext(h: CK_SESSION_HANDLE, p: *mut std::ffi::c_void, pl: CK_ULONG, d: *mut CK_BYTE, dl: CK_ULONG, o: *mut CK_BYTE, ol: *mut CK_ULONG, f: CK_FLAGS);
    C_MessageDecryptFinal(h: CK_SESSION_HANDLE);
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
