//! The raw AWS-LC calls of the module (aws-lc-sys), confined to this file: parsing keys into
//! `EVP_PKEY`s (whose memory comes from the locked arena, see `secret::arena`), and the RSA
//! and ECDSA operations aws-lc-rs offers no safe API for (pre-hashed input, PSS salt length,
//! OAEP label, raw r‖s).

use super::HashAlg;
use crate::error::{Error, Result};
use aws_lc_sys as sys;
use cryptoki_sys::*;
use std::ptr::{self, NonNull};

/// AWS-LC's EVP_PKEY_{sign,verify,encrypt,decrypt}_init.
type PkeyInit = unsafe extern "C" fn(*mut sys::EVP_PKEY_CTX) -> std::os::raw::c_int;
/// AWS-LC's EVP_PKEY_sign / EVP_PKEY_encrypt: (ctx, out, out_len, in, in_len).
type PkeyOutput = unsafe extern "C" fn(
    *mut sys::EVP_PKEY_CTX,
    *mut u8,
    *mut usize,
    *const u8,
    usize,
) -> std::os::raw::c_int;

fn aes_key_size(n: usize) -> Error {
    Error::new(CKR_KEY_SIZE_RANGE, format!("AES key of {n} bytes"))
}

fn failed(msg: &str) -> Error {
    refused(CKR_FUNCTION_FAILED, msg)
}

/// An AWS-LC call refused its input: the error for the caller, and this thread's AWS-LC error
/// queue cleared (so that no stale entry explains a later failure).
fn refused(rv: CK_RV, msg: &str) -> Error {
    // SAFETY: clears this thread's AWS-LC error queue; no preconditions.
    unsafe { sys::ERR_clear_error() };
    Error::new(rv, msg.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    P256,
    P384,
    P521,
}

impl Curve {
    fn from_nid(nid: i32) -> Option<Curve> {
        match nid {
            sys::NID_X9_62_prime256v1 => Some(Curve::P256),
            sys::NID_secp384r1 => Some(Curve::P384),
            sys::NID_secp521r1 => Some(Curve::P521),
            _ => None,
        }
    }
    pub const ALL: [Curve; 3] = [Curve::P256, Curve::P384, Curve::P521];

    /// The curve a CKA_EC_PARAMS (DER namedCurve OID) names.
    pub fn from_params_der(der: &[u8]) -> Option<Curve> {
        Curve::ALL.into_iter().find(|c| c.ec_params_der() == der)
    }

    fn nid(self) -> i32 {
        match self {
            Curve::P256 => sys::NID_X9_62_prime256v1,
            Curve::P384 => sys::NID_secp384r1,
            Curve::P521 => sys::NID_secp521r1,
        }
    }

    /// Bytes of one coordinate / one of r, s.
    pub fn field_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }
    pub fn bits(self) -> usize {
        match self {
            Curve::P256 => 256,
            Curve::P384 => 384,
            Curve::P521 => 521,
        }
    }
    /// CKA_EC_PARAMS: the DER named-curve OID.
    pub fn ec_params_der(self) -> &'static [u8] {
        match self {
            Curve::P256 => &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
            Curve::P384 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
            Curve::P521 => &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
        }
    }
}

/// The public half of a key, as the token's attributes present it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicParts {
    Rsa {
        modulus: Vec<u8>,
        exponent: Vec<u8>,
        bits: usize,
    },
    Ec {
        curve: Curve,
        /// Uncompressed point 04 ‖ X ‖ Y.
        point: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicInfo {
    pub parts: PublicParts,
    /// SubjectPublicKeyInfo DER (CKA_PUBLIC_KEY_INFO).
    pub spki_der: Vec<u8>,
}

impl PublicInfo {
    pub fn is_rsa(&self) -> bool {
        matches!(self.parts, PublicParts::Rsa { .. })
    }
    /// RSA modulus length in bytes, or the EC signature length.
    pub fn output_len(&self) -> usize {
        match &self.parts {
            PublicParts::Rsa { modulus, .. } => modulus.len(),
            PublicParts::Ec { curve, .. } => 2 * curve.field_len(),
        }
    }
}

/// An owned `EVP_PKEY` (RSA or EC). Immutable after parsing; AWS-LC allows concurrent use of
/// one key from several threads, each operation with its own `EVP_PKEY_CTX`.
pub struct EvpKey {
    ptr: NonNull<sys::EVP_PKEY>,
    private: bool,
}

unsafe impl Send for EvpKey {}
unsafe impl Sync for EvpKey {}

impl Drop for EvpKey {
    fn drop(&mut self) {
        // SAFETY: we own one reference; the arena zeroes the memory on free.
        unsafe { sys::EVP_PKEY_free(self.ptr.as_ptr()) }
    }
}

struct Ctx(*mut sys::EVP_PKEY_CTX);
impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: owned context (or null, which EVP_PKEY_CTX_free accepts).
        unsafe { sys::EVP_PKEY_CTX_free(self.0) }
    }
}

fn md(h: HashAlg) -> *const sys::EVP_MD {
    // SAFETY: static digest tables.
    unsafe {
        match h {
            HashAlg::Sha1 => sys::EVP_sha1(),
            HashAlg::Sha224 => sys::EVP_sha224(),
            HashAlg::Sha256 => sys::EVP_sha256(),
            HashAlg::Sha384 => sys::EVP_sha384(),
            HashAlg::Sha512 => sys::EVP_sha512(),
        }
    }
}

/// RSA padding and its parameters for one operation.
pub enum RsaPad<'a> {
    Pkcs1,
    Pss {
        hash: HashAlg,
        mgf: HashAlg,
        salt_len: usize,
    },
    Oaep {
        hash: HashAlg,
        mgf: HashAlg,
        label: &'a [u8],
    },
}

impl EvpKey {
    /// The key's RSA data; CKR_KEY_TYPE_INCONSISTENT for another key type.
    fn rsa_data(&self) -> Result<*mut sys::RSA> {
        // SAFETY: live key; get0 returns a borrowed pointer or NULL.
        let rsa = unsafe { sys::EVP_PKEY_get0_RSA(self.ptr.as_ptr()) };
        (!rsa.is_null())
            .then_some(rsa)
            .ok_or_else(|| Error::new(CKR_KEY_TYPE_INCONSISTENT, "not an RSA key"))
    }

    /// The key's EC data; CKR_KEY_TYPE_INCONSISTENT for another key type.
    fn ec_data(&self) -> Result<*mut sys::EC_KEY> {
        // SAFETY: live key; get0 returns a borrowed pointer or NULL.
        let ec = unsafe { sys::EVP_PKEY_get0_EC_KEY(self.ptr.as_ptr()) };
        (!ec.is_null())
            .then_some(ec)
            .ok_or_else(|| Error::new(CKR_KEY_TYPE_INCONSISTENT, "not an EC key"))
    }

    /// Parse a PKCS#8 PrivateKeyInfo (RSA or EC P-256/384/521).
    pub fn from_pkcs8(der: &[u8]) -> Result<EvpKey> {
        // SAFETY: EVP_parse_private_key reads a CBS and returns an owned key or NULL.
        Self::parse(
            der,
            true,
            |c| unsafe { sys::EVP_parse_private_key(c) },
            "PKCS#8 key",
        )
        .map_err(|e| match e {
            None => failed("released key is not a PKCS#8 RSA/EC key"),
            Some(e) => e,
        })
    }

    /// A fresh RSA key of `bits` with public exponent `exponent` (big-endian).
    pub fn generate_rsa(bits: usize, exponent: &[u8]) -> Result<EvpKey> {
        crate::secret::arena::install();
        // SAFETY: every object is created here, checked for NULL, and either handed to the
        // next owner (RSA into the EVP_PKEY) or freed on the error path.
        unsafe {
            let e = sys::BN_bin2bn(exponent.as_ptr(), exponent.len(), ptr::null_mut());
            if e.is_null() {
                return Err(failed("out of memory"));
            }
            let rsa = sys::RSA_new();
            let ok = !rsa.is_null()
                && sys::RSA_generate_key_ex(rsa, bits as i32, e, ptr::null_mut()) == 1;
            sys::BN_free(e);
            if !ok {
                sys::RSA_free(rsa);
                return Err(refused(
                    CKR_TEMPLATE_INCONSISTENT,
                    "RSA key generation refused these parameters (public exponent)",
                ));
            }
            let pkey = sys::EVP_PKEY_new();
            if pkey.is_null() || sys::EVP_PKEY_assign_RSA(pkey, rsa) != 1 {
                sys::RSA_free(rsa);
                sys::EVP_PKEY_free(pkey);
                return Err(failed("out of memory"));
            }
            let k = EvpKey {
                ptr: NonNull::new(pkey).ok_or_else(|| failed("out of memory"))?,
                private: true,
            };
            k.check_supported()?;
            Ok(k)
        }
    }

    /// A fresh EC key on `curve`.
    pub fn generate_ec(curve: Curve) -> Result<EvpKey> {
        crate::secret::arena::install();
        // SAFETY: as in generate_rsa.
        unsafe {
            let ec = sys::EC_KEY_new_by_curve_name(curve.nid());
            if ec.is_null() || sys::EC_KEY_generate_key(ec) != 1 {
                sys::EC_KEY_free(ec);
                return Err(failed("EC key generation failed"));
            }
            let pkey = sys::EVP_PKEY_new();
            if pkey.is_null() || sys::EVP_PKEY_assign_EC_KEY(pkey, ec) != 1 {
                sys::EC_KEY_free(ec);
                sys::EVP_PKEY_free(pkey);
                return Err(failed("out of memory"));
            }
            Ok(EvpKey {
                ptr: NonNull::new(pkey).ok_or_else(|| failed("out of memory"))?,
                private: true,
            })
        }
    }

    /// ECDH: the shared secret Z (the x-coordinate, field length) of this private EC key and a
    /// peer's uncompressed or compressed point on the same curve. Into locked memory.
    pub fn ecdh(&self, peer_point: &[u8]) -> Result<crate::secret::LockedBuf> {
        if !self.private {
            return Err(Error::new(
                CKR_KEY_TYPE_INCONSISTENT,
                "ECDH needs a private key",
            ));
        }
        // SAFETY: live key; the peer point is created here, checked and freed on every path;
        // the output buffer holds the field length that ECDH_compute_key writes at most.
        unsafe {
            let ec = self.ec_data()?;
            let group = sys::EC_KEY_get0_group(ec);
            let curve = Curve::from_nid(sys::EC_GROUP_get_curve_name(group))
                .ok_or_else(|| failed("EC key on an unsupported curve"))?;
            let point = sys::EC_POINT_new(group);
            if point.is_null() {
                return Err(failed("out of memory"));
            }
            let ok = sys::EC_POINT_oct2point(
                group,
                point,
                peer_point.as_ptr(),
                peer_point.len(),
                ptr::null_mut(),
            ) == 1;
            if !ok {
                sys::EC_POINT_free(point);
                return Err(refused(
                    CKR_MECHANISM_PARAM_INVALID,
                    "the ECDH public data is not a point on the key's curve",
                ));
            }
            let mut out = crate::secret::LockedBuf::zeroed(curve.field_len());
            let n = sys::ECDH_compute_key(
                out.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
                out.len(),
                point,
                ec,
                None,
            );
            sys::EC_POINT_free(point);
            if n != curve.field_len() as i32 {
                sys::ERR_clear_error();
                return Err(failed("ECDH failed"));
            }
            Ok(out)
        }
    }

    /// Parse a SubjectPublicKeyInfo.
    pub fn from_spki(der: &[u8]) -> Result<EvpKey> {
        // SAFETY: EVP_parse_public_key reads a CBS and returns an owned key or NULL.
        Self::parse(
            der,
            false,
            |c| unsafe { sys::EVP_parse_public_key(c) },
            "SubjectPublicKeyInfo",
        )
        .map_err(|e| {
            e.unwrap_or_else(|| failed("public key is not an RSA or EC SubjectPublicKeyInfo"))
        })
    }

    /// Run one AWS-LC DER parser over the whole of `der`: None when it does not parse.
    fn parse(
        der: &[u8],
        private: bool,
        parser: impl FnOnce(*mut sys::CBS) -> *mut sys::EVP_PKEY,
        what: &str,
    ) -> std::result::Result<EvpKey, Option<Error>> {
        crate::secret::arena::install();
        let mut cbs = sys::CBS {
            data: ptr::null(),
            len: 0,
        };
        // SAFETY: CBS borrows `der` for the duration of the parse only.
        unsafe { sys::CBS_init(&mut cbs, der.as_ptr(), der.len()) };
        let ptr = NonNull::new(parser(&mut cbs)).ok_or(None)?;
        let k = EvpKey { ptr, private };
        if cbs.len != 0 {
            return Err(Some(failed(&format!("trailing bytes after the {what}"))));
        }
        k.check_supported().map_err(Some)?;
        Ok(k)
    }

    fn check_supported(&self) -> Result<()> {
        match self.public_info()?.parts {
            PublicParts::Rsa { .. } | PublicParts::Ec { .. } => Ok(()),
        }
    }

    pub fn is_private(&self) -> bool {
        self.private
    }

    /// Raw pointer of the key object (tests: prove it lives in the locked arena).
    pub fn raw_addr(&self) -> *const u8 {
        self.ptr.as_ptr() as *const u8
    }

    /// The public half: modulus/exponent or curve/point, and the SPKI DER.
    pub fn public_info(&self) -> Result<PublicInfo> {
        let k = self.ptr.as_ptr();
        // SAFETY: `k` is a live key; every pointer below is checked for null before use, and
        // buffers are sized by the lengths AWS-LC reports.
        unsafe {
            let parts = match sys::EVP_PKEY_id(k) {
                sys::EVP_PKEY_RSA => {
                    let rsa = self.rsa_data()?;
                    let (n, e) = (sys::RSA_get0_n(rsa), sys::RSA_get0_e(rsa));
                    if n.is_null() || e.is_null() {
                        return Err(failed("RSA key without modulus"));
                    }
                    PublicParts::Rsa {
                        modulus: bn_bytes(n),
                        exponent: bn_bytes(e),
                        bits: sys::BN_num_bits(n) as usize,
                    }
                }
                sys::EVP_PKEY_EC => {
                    let ec = self.ec_data()?;
                    let (group, point) =
                        (sys::EC_KEY_get0_group(ec), sys::EC_KEY_get0_public_key(ec));
                    if group.is_null() || point.is_null() {
                        return Err(failed("EC key without public point"));
                    }
                    let curve =
                        Curve::from_nid(sys::EC_GROUP_get_curve_name(group)).ok_or_else(|| {
                            Error::new(
                                CKR_FUNCTION_FAILED,
                                "EC key on a curve other than P-256, P-384, P-521",
                            )
                        })?;
                    let form = sys::point_conversion_form_t::POINT_CONVERSION_UNCOMPRESSED;
                    let len = sys::EC_POINT_point2oct(
                        group,
                        point,
                        form,
                        ptr::null_mut(),
                        0,
                        ptr::null_mut(),
                    );
                    let mut buf = vec![0u8; len];
                    if len == 0
                        || sys::EC_POINT_point2oct(
                            group,
                            point,
                            form,
                            buf.as_mut_ptr(),
                            len,
                            ptr::null_mut(),
                        ) != len
                    {
                        return Err(failed("cannot encode EC point"));
                    }
                    PublicParts::Ec { curve, point: buf }
                }
                _ => return Err(Error::new(CKR_FUNCTION_FAILED, "key is neither RSA nor EC")),
            };
            let mut cbb: sys::CBB = std::mem::zeroed();
            if sys::CBB_init(&mut cbb, 512) != 1 {
                return Err(failed("out of memory"));
            }
            if sys::EVP_marshal_public_key(&mut cbb, k) != 1 {
                sys::CBB_cleanup(&mut cbb);
                return Err(failed("cannot encode SubjectPublicKeyInfo"));
            }
            let mut out: *mut u8 = ptr::null_mut();
            let mut out_len = 0usize;
            if sys::CBB_finish(&mut cbb, &mut out, &mut out_len) != 1 {
                sys::CBB_cleanup(&mut cbb);
                return Err(failed("cannot encode SubjectPublicKeyInfo"));
            }
            let spki_der = std::slice::from_raw_parts(out, out_len).to_vec();
            sys::OPENSSL_free(out as *mut libc::c_void);
            Ok(PublicInfo { parts, spki_der })
        }
    }

    fn ctx(&self) -> Result<Ctx> {
        // SAFETY: live key; null engine.
        let c = unsafe { sys::EVP_PKEY_CTX_new(self.ptr.as_ptr(), ptr::null_mut()) };
        if c.is_null() {
            return Err(failed("out of memory"));
        }
        Ok(Ctx(c))
    }

    /// Configure an RSA context. The OAEP label is copied into AWS-LC-owned memory.
    fn set_rsa_pad(ctx: &Ctx, pad: &RsaPad) -> Result<()> {
        // SAFETY: ctx is live and initialised for an RSA operation; the label copy is
        // allocated with OPENSSL_malloc because set0 takes ownership of it.
        unsafe {
            let c = ctx.0;
            let ok = match pad {
                RsaPad::Pkcs1 => sys::EVP_PKEY_CTX_set_rsa_padding(c, sys::RSA_PKCS1_PADDING) == 1,
                RsaPad::Pss {
                    hash,
                    mgf,
                    salt_len,
                } => {
                    sys::EVP_PKEY_CTX_set_rsa_padding(c, sys::RSA_PKCS1_PSS_PADDING) == 1
                        && sys::EVP_PKEY_CTX_set_signature_md(c, md(*hash)) == 1
                        && sys::EVP_PKEY_CTX_set_rsa_mgf1_md(c, md(*mgf)) == 1
                        && sys::EVP_PKEY_CTX_set_rsa_pss_saltlen(c, *salt_len as i32) == 1
                }
                RsaPad::Oaep { hash, mgf, label } => {
                    let mut ok = sys::EVP_PKEY_CTX_set_rsa_padding(c, sys::RSA_PKCS1_OAEP_PADDING)
                        == 1
                        && sys::EVP_PKEY_CTX_set_rsa_oaep_md(c, md(*hash)) == 1
                        && sys::EVP_PKEY_CTX_set_rsa_mgf1_md(c, md(*mgf)) == 1;
                    if ok && !label.is_empty() {
                        let l = sys::OPENSSL_malloc(label.len()) as *mut u8;
                        if l.is_null() {
                            return Err(failed("out of memory"));
                        }
                        ptr::copy_nonoverlapping(label.as_ptr(), l, label.len());
                        ok = sys::EVP_PKEY_CTX_set0_rsa_oaep_label(c, l, label.len()) == 1;
                        if !ok {
                            sys::OPENSSL_free(l as *mut libc::c_void);
                        }
                    }
                    ok
                }
            };
            if ok {
                Ok(())
            } else {
                Err(Error::new(
                    CKR_MECHANISM_PARAM_INVALID,
                    "AWS-LC refused the RSA padding parameters",
                ))
            }
        }
    }

    /// A context initialised by `init` (sign, verify, encrypt, decrypt) with RSA padding.
    fn rsa_ctx(&self, init: PkeyInit, pad: &RsaPad, what: &str) -> Result<Ctx> {
        let ctx = self.ctx()?;
        // SAFETY: ctx is live; `init` is one of AWS-LC's EVP_PKEY_*_init functions.
        if unsafe { init(ctx.0) } != 1 {
            return Err(failed(&format!("{what} init failed")));
        }
        Self::set_rsa_pad(&ctx, pad)?;
        Ok(ctx)
    }

    /// An RSA operation whose output is public (sign, encrypt): a size query, then the call
    /// into a buffer of that size; an input the key and padding cannot take is
    /// CKR_DATA_LEN_RANGE with `too_long` as its message.
    fn rsa_public_output(
        &self,
        (init, op): (PkeyInit, PkeyOutput),
        input: &[u8],
        pad: &RsaPad,
        (what, too_long): (&str, &str),
    ) -> Result<Vec<u8>> {
        let ctx = self.rsa_ctx(init, pad, what)?;
        // SAFETY: ctx live and initialised; the output buffer has the size AWS-LC reported.
        unsafe {
            let mut len = 0usize;
            if op(
                ctx.0,
                ptr::null_mut(),
                &mut len,
                input.as_ptr(),
                input.len(),
            ) != 1
            {
                return Err(failed(&format!("{what} size query failed")));
            }
            let mut out = vec![0u8; len];
            if op(
                ctx.0,
                out.as_mut_ptr(),
                &mut len,
                input.as_ptr(),
                input.len(),
            ) != 1
            {
                return Err(refused(CKR_DATA_LEN_RANGE, too_long));
            }
            out.truncate(len);
            Ok(out)
        }
    }

    /// RSA sign of `input` (a DigestInfo for PKCS#1, the hash for PSS).
    pub fn rsa_sign(&self, input: &[u8], pad: &RsaPad) -> Result<Vec<u8>> {
        let sign: (PkeyInit, PkeyOutput) = (sys::EVP_PKEY_sign_init, sys::EVP_PKEY_sign);
        let msgs = ("sign", "input does not fit the key and padding");
        self.rsa_public_output(sign, input, pad, msgs)
    }

    /// RSA verify; false for any mismatch.
    pub fn rsa_verify(&self, input: &[u8], sig: &[u8], pad: &RsaPad) -> Result<bool> {
        let ctx = self.rsa_ctx(sys::EVP_PKEY_verify_init, pad, "verify")?;
        // SAFETY: ctx live and initialised; slices valid for their lengths.
        unsafe {
            let ok =
                sys::EVP_PKEY_verify(ctx.0, sig.as_ptr(), sig.len(), input.as_ptr(), input.len())
                    == 1;
            if !ok {
                sys::ERR_clear_error();
            }
            Ok(ok)
        }
    }

    /// RSA decrypt (PKCS#1 v1.5 or OAEP). AWS-LC's unpadding is constant-time; a padding
    /// failure becomes CKR_ENCRYPTED_DATA_INVALID.
    pub fn rsa_decrypt(&self, ct: &[u8], pad: &RsaPad) -> Result<crate::secret::LockedBuf> {
        let ctx = self.rsa_ctx(sys::EVP_PKEY_decrypt_init, pad, "decrypt")?;
        let (out, written) = Self::decrypt_locked(&ctx, ct, "RSA decryption failed")?;
        Ok(crate::secret::LockedBuf::from_slice(
            &out.as_slice()[..written],
        ))
    }

    /// Raw RSA private operation (no padding; blinded and constant-time in AWS-LC): the
    /// encoded message of a `k`-byte ciphertext, in locked memory.
    pub fn rsa_decrypt_raw(&self, ct: &[u8]) -> Result<crate::secret::LockedBuf> {
        let ctx = self.ctx()?;
        // SAFETY: ctx is live.
        let ok = unsafe {
            sys::EVP_PKEY_decrypt_init(ctx.0) == 1
                && sys::EVP_PKEY_CTX_set_rsa_padding(ctx.0, sys::RSA_NO_PADDING) == 1
        };
        if !ok {
            return Err(failed("raw decrypt init failed"));
        }
        let (out, written) =
            Self::decrypt_locked(&ctx, ct, "ciphertext is not smaller than the modulus")?;
        if written != out.as_slice().len() {
            return Err(Error::new(
                CKR_ENCRYPTED_DATA_INVALID,
                "ciphertext is not smaller than the modulus",
            ));
        }
        Ok(out)
    }

    /// EVP_PKEY_decrypt on an initialised context: size query, then the decryption into a
    /// locked buffer of that size. Returns the buffer and the bytes written; a failed
    /// decryption is CKR_ENCRYPTED_DATA_INVALID with `invalid` as its message.
    fn decrypt_locked(
        ctx: &Ctx,
        ct: &[u8],
        invalid: &str,
    ) -> Result<(crate::secret::LockedBuf, usize)> {
        // SAFETY: ctx is live and initialised for decryption; the output buffer has the size
        // AWS-LC reported for this ciphertext.
        unsafe {
            let mut len = 0usize;
            if sys::EVP_PKEY_decrypt(ctx.0, ptr::null_mut(), &mut len, ct.as_ptr(), ct.len()) != 1 {
                return Err(failed("decrypt size query failed"));
            }
            let mut out = crate::secret::LockedBuf::zeroed(len);
            let mut written = len;
            if sys::EVP_PKEY_decrypt(
                ctx.0,
                out.as_mut_slice().as_mut_ptr(),
                &mut written,
                ct.as_ptr(),
                ct.len(),
            ) != 1
            {
                return Err(refused(CKR_ENCRYPTED_DATA_INVALID, invalid));
            }
            Ok((out, written.min(len)))
        }
    }

    /// SHA-256 of the private exponent as a big-endian integer of the modulus length: the
    /// HMAC key of the implicit-rejection key derivation.
    pub fn rsa_exponent_hash(&self, k: usize) -> Result<crate::secret::Wiped> {
        // SAFETY: live private RSA key; d is written into locked memory of k bytes.
        unsafe {
            let d = sys::RSA_get0_d(self.rsa_data()?);
            if d.is_null() {
                return Err(Error::new(
                    CKR_KEY_TYPE_INCONSISTENT,
                    "not a private RSA key",
                ));
            }
            let mut buf = crate::secret::LockedBuf::zeroed(k);
            if sys::BN_bn2bin_padded(buf.as_mut_slice().as_mut_ptr(), k, d) != 1 {
                return Err(failed("private exponent longer than the modulus"));
            }
            Ok(crate::secret::Wiped::new(
                HashAlg::Sha256.digest(buf.as_slice()),
            ))
        }
    }

    pub fn rsa_encrypt(&self, pt: &[u8], pad: &RsaPad) -> Result<Vec<u8>> {
        let encrypt: (PkeyInit, PkeyOutput) = (sys::EVP_PKEY_encrypt_init, sys::EVP_PKEY_encrypt);
        let msgs = ("encrypt", "plaintext too long for the key and padding");
        self.rsa_public_output(encrypt, pt, pad, msgs)
    }

    /// ECDSA over a pre-computed hash; raw r‖s, each `field_len` bytes.
    pub fn ecdsa_sign_raw(&self, digest: &[u8], field_len: usize) -> Result<Vec<u8>> {
        // SAFETY: live key; the signature object is freed on every path; r and s are written
        // into buffers of exactly field_len bytes.
        unsafe {
            let ec = self.ec_data()?;
            let sig = sys::ECDSA_do_sign(digest.as_ptr(), digest.len(), ec);
            if sig.is_null() {
                return Err(failed("ECDSA signing failed"));
            }
            let mut r: *const sys::BIGNUM = ptr::null();
            let mut s: *const sys::BIGNUM = ptr::null();
            sys::ECDSA_SIG_get0(sig, &mut r, &mut s);
            let mut out = vec![0u8; 2 * field_len];
            let ok = sys::BN_bn2bin_padded(out.as_mut_ptr(), field_len, r) == 1
                && sys::BN_bn2bin_padded(out.as_mut_ptr().add(field_len), field_len, s) == 1;
            sys::ECDSA_SIG_free(sig);
            if !ok {
                return Err(failed("ECDSA signature encoding failed"));
            }
            Ok(out)
        }
    }

    /// Verify raw r‖s over a hash.
    pub fn ecdsa_verify_raw(&self, digest: &[u8], sig: &[u8]) -> Result<bool> {
        let half = sig.len() / 2;
        // SAFETY: live key; r and s are handed to the ECDSA_SIG (set0 takes ownership) or freed.
        unsafe {
            let ec = self.ec_data()?;
            let s_obj = sys::ECDSA_SIG_new();
            if s_obj.is_null() {
                return Err(failed("out of memory"));
            }
            let r = sys::BN_bin2bn(sig.as_ptr(), half, ptr::null_mut());
            let s = sys::BN_bin2bn(sig.as_ptr().add(half), half, ptr::null_mut());
            if r.is_null() || s.is_null() || sys::ECDSA_SIG_set0(s_obj, r, s) != 1 {
                sys::BN_free(r);
                sys::BN_free(s);
                sys::ECDSA_SIG_free(s_obj);
                return Err(failed("out of memory"));
            }
            let ok = sys::ECDSA_do_verify(digest.as_ptr(), digest.len(), s_obj, ec) == 1;
            sys::ECDSA_SIG_free(s_obj);
            if !ok {
                sys::ERR_clear_error();
            }
            Ok(ok)
        }
    }
}

/// Big-endian bytes of a BIGNUM, no leading zeros.
unsafe fn bn_bytes(bn: *const sys::BIGNUM) -> Vec<u8> {
    // SAFETY: caller passes a live BIGNUM; the buffer has BN_num_bytes bytes.
    unsafe {
        let n = sys::BN_num_bytes(bn) as usize;
        let mut v = vec![0u8; n];
        sys::BN_bn2bin_padded(v.as_mut_ptr(), n, bn);
        v
    }
}

struct CipherCtx(*mut sys::EVP_CIPHER_CTX);
impl CipherCtx {
    fn new() -> Result<CipherCtx> {
        // SAFETY: no preconditions; NULL (out of memory) is checked.
        let ctx = CipherCtx(unsafe { sys::EVP_CIPHER_CTX_new() });
        if ctx.0.is_null() {
            return Err(failed("out of memory"));
        }
        Ok(ctx)
    }
}
impl Drop for CipherCtx {
    fn drop(&mut self) {
        // SAFETY: owned context; EVP_CIPHER_CTX_free cleanses it.
        unsafe { sys::EVP_CIPHER_CTX_free(self.0) }
    }
}

/// AES-GCM through the raw cipher API, for the IV and tag lengths aws-lc-rs' AEAD interface
/// does not take (it fixes 12-byte IVs and 16-byte tags). Encrypt returns ciphertext ‖ tag;
/// decrypt takes ciphertext ‖ tag and checks the tag before returning anything.
pub fn aes_gcm_raw(
    encrypt: bool,
    key: &[u8],
    iv: &[u8],
    aad: &[u8],
    input: &[u8],
    tag_len: usize,
) -> Result<crate::secret::Wiped> {
    let data = if encrypt {
        input
    } else {
        if input.len() < tag_len {
            return Err(Error::new(
                CKR_ENCRYPTED_DATA_LEN_RANGE,
                "AES-GCM input shorter than the tag",
            ));
        }
        &input[..input.len() - tag_len]
    };
    let to_int = |n: usize| {
        i32::try_from(n).map_err(|_| Error::new(CKR_DATA_LEN_RANGE, "AES-GCM input too long"))
    };
    let (iv_len, aad_len, data_len) = (to_int(iv.len())?, to_int(aad.len())?, to_int(data.len())?);
    // SAFETY: static cipher tables; the context is owned and freed by CipherCtx; every buffer
    // passed is valid for the length given; the output has room for the input (GCM adds no
    // bytes before the tag) plus one block.
    unsafe {
        let cipher = match key.len() {
            16 => sys::EVP_aes_128_gcm(),
            24 => sys::EVP_aes_192_gcm(),
            32 => sys::EVP_aes_256_gcm(),
            n => return Err(aes_key_size(n)),
        };
        let ctx = CipherCtx::new()?;
        let init = if encrypt {
            sys::EVP_EncryptInit_ex
        } else {
            sys::EVP_DecryptInit_ex
        };
        let update = if encrypt {
            sys::EVP_EncryptUpdate
        } else {
            sys::EVP_DecryptUpdate
        };
        if init(ctx.0, cipher, ptr::null_mut(), ptr::null(), ptr::null()) != 1
            || sys::EVP_CIPHER_CTX_ctrl(ctx.0, sys::EVP_CTRL_GCM_SET_IVLEN, iv_len, ptr::null_mut())
                != 1
            || init(
                ctx.0,
                ptr::null(),
                ptr::null_mut(),
                key.as_ptr(),
                iv.as_ptr(),
            ) != 1
        {
            return Err(Error::new(
                CKR_MECHANISM_PARAM_INVALID,
                "AES-GCM refused the IV",
            ));
        }
        let mut n = 0i32;
        if !aad.is_empty() && update(ctx.0, ptr::null_mut(), &mut n, aad.as_ptr(), aad_len) != 1 {
            return Err(failed("AES-GCM AAD failed"));
        }
        let mut out = crate::secret::Wiped::new(vec![0u8; data.len() + 16 + tag_len]);
        let mut written = 0usize;
        if !data.is_empty() {
            if update(ctx.0, out.as_mut_ptr(), &mut n, data.as_ptr(), data_len) != 1 {
                return Err(failed("AES-GCM update failed"));
            }
            written = n as usize;
        }
        if encrypt {
            if sys::EVP_EncryptFinal_ex(ctx.0, out.as_mut_ptr().add(written), &mut n) != 1 {
                return Err(failed("AES-GCM final failed"));
            }
            written += n as usize;
            if sys::EVP_CIPHER_CTX_ctrl(
                ctx.0,
                sys::EVP_CTRL_GCM_GET_TAG,
                tag_len as i32,
                out.as_mut_ptr().add(written) as *mut libc::c_void,
            ) != 1
            {
                return Err(failed("AES-GCM tag failed"));
            }
            written += tag_len;
        } else {
            let mut tag = input[input.len() - tag_len..].to_vec();
            if sys::EVP_CIPHER_CTX_ctrl(
                ctx.0,
                sys::EVP_CTRL_GCM_SET_TAG,
                tag_len as i32,
                tag.as_mut_ptr() as *mut libc::c_void,
            ) != 1
            {
                return Err(Error::new(
                    CKR_MECHANISM_PARAM_INVALID,
                    "AES-GCM tag length refused",
                ));
            }
            if sys::EVP_DecryptFinal_ex(ctx.0, out.as_mut_ptr().add(written), &mut n) != 1 {
                return Err(refused(CKR_ENCRYPTED_DATA_INVALID, "AES-GCM tag mismatch"));
            }
            written += n as usize;
        }
        out.truncate(written);
        Ok(out)
    }
}

/// The AES modes the raw streaming cipher runs (no padding: the caller's input must fill
/// whole blocks for ECB and CBC; CTR is a stream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AesMode {
    Ecb,
    Cbc,
    Ctr,
}

/// A streaming AES cipher over the raw EVP interface (ECB, CBC without padding, CTR): its
/// context, and with it the key schedule, lives in AWS-LC memory (the locked arena).
pub struct EvpStream {
    ctx: CipherCtx,
    encrypt: bool,
}

// The context is owned exclusively by this value and only used through &mut self.
unsafe impl Send for EvpStream {}

impl EvpStream {
    pub fn new(
        mode: AesMode,
        key: &[u8],
        iv: Option<&[u8; 16]>,
        encrypt: bool,
    ) -> Result<EvpStream> {
        crate::secret::arena::install();
        // SAFETY: static cipher tables; the context is owned by CipherCtx; key and IV are
        // valid for the lengths the cipher reads (checked key length, 16-byte IV).
        unsafe {
            let cipher = match (mode, key.len()) {
                (AesMode::Ecb, 16) => sys::EVP_aes_128_ecb(),
                (AesMode::Ecb, 24) => sys::EVP_aes_192_ecb(),
                (AesMode::Ecb, 32) => sys::EVP_aes_256_ecb(),
                (AesMode::Cbc, 16) => sys::EVP_aes_128_cbc(),
                (AesMode::Cbc, 24) => sys::EVP_aes_192_cbc(),
                (AesMode::Cbc, 32) => sys::EVP_aes_256_cbc(),
                (AesMode::Ctr, 16) => sys::EVP_aes_128_ctr(),
                (AesMode::Ctr, 24) => sys::EVP_aes_192_ctr(),
                (AesMode::Ctr, 32) => sys::EVP_aes_256_ctr(),
                (_, n) => return Err(aes_key_size(n)),
            };
            let ctx = CipherCtx::new()?;
            let iv_ptr = iv.map_or(ptr::null(), |v| v.as_ptr());
            if sys::EVP_CipherInit_ex(
                ctx.0,
                cipher,
                ptr::null_mut(),
                key.as_ptr(),
                iv_ptr,
                encrypt as i32,
            ) != 1
                || sys::EVP_CIPHER_CTX_set_padding(ctx.0, 0) != 1
            {
                return Err(failed("AES cipher setup failed"));
            }
            Ok(EvpStream { ctx, encrypt })
        }
    }

    /// Output for `input` (whole blocks so far; partial blocks wait inside the context).
    pub fn update(&mut self, input: &[u8]) -> Result<crate::secret::Wiped> {
        let len = i32::try_from(input.len())
            .map_err(|_| Error::new(CKR_DATA_LEN_RANGE, "input too long"))?;
        let mut out = crate::secret::Wiped::new(vec![0u8; input.len() + 16]);
        if input.is_empty() {
            out.truncate(0);
            return Ok(out);
        }
        let mut n = 0i32;
        // SAFETY: live context; `out` has room for the input plus one block.
        let ok = unsafe {
            if self.encrypt {
                sys::EVP_EncryptUpdate(self.ctx.0, out.as_mut_ptr(), &mut n, input.as_ptr(), len)
            } else {
                sys::EVP_DecryptUpdate(self.ctx.0, out.as_mut_ptr(), &mut n, input.as_ptr(), len)
            }
        };
        if ok != 1 {
            return Err(failed("AES update failed"));
        }
        out.truncate(n as usize);
        Ok(out)
    }

    /// The end: an unfinished block (ECB, CBC) is a length error.
    pub fn finish(&mut self) -> Result<crate::secret::Wiped> {
        let mut out = crate::secret::Wiped::new(vec![0u8; 16]);
        let mut n = 0i32;
        // SAFETY: live context; `out` holds one block.
        let ok = unsafe {
            if self.encrypt {
                sys::EVP_EncryptFinal_ex(self.ctx.0, out.as_mut_ptr(), &mut n)
            } else {
                sys::EVP_DecryptFinal_ex(self.ctx.0, out.as_mut_ptr(), &mut n)
            }
        };
        if ok != 1 {
            // SAFETY: clears this thread's AWS-LC error queue.
            unsafe { sys::ERR_clear_error() };
            return Err(if self.encrypt {
                Error::new(
                    CKR_DATA_LEN_RANGE,
                    "input is not a whole number of AES blocks",
                )
            } else {
                Error::new(
                    CKR_ENCRYPTED_DATA_LEN_RANGE,
                    "input is not a whole number of AES blocks",
                )
            });
        }
        out.truncate(n as usize);
        Ok(out)
    }
}
