//! Mechanisms as owned Rust values, with their parameters already validated for shape, and
//! the registry: one table keyed by CKM carrying flags, key sizes, the C parameter layout
//! and the family (one file each) that parses it.

mod aes;
mod digest;
mod ecdh;
mod ecdsa;
mod keygen;
mod keywrap;
mod mac;
mod rsa;

use super::HashAlg;
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use cryptoki_sys::*;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PssParams {
    pub hash: HashAlg,
    pub mgf: HashAlg,
    pub salt_len: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OaepParams {
    pub hash: HashAlg,
    pub mgf: HashAlg,
    /// CKZ_DATA_SPECIFIED source data; empty when absent.
    pub label: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcmParams {
    pub iv: Vec<u8>,
    pub aad: Vec<u8>,
    pub tag_bits: usize,
}

/// CK_ECDH1_DERIVE_PARAMS, checked: the KDF (None: CKD_NULL), shared info, the peer's point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EcdhParams {
    pub kdf: Option<HashAlg>,
    pub shared: Vec<u8>,
    pub public: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// CKM_RSA_PKCS: sign input is a DigestInfo (or any ≤ k−11 bytes); also encrypt/decrypt.
    RsaPkcs,
    /// CKM_SHA*_RSA_PKCS.
    RsaPkcsHash(HashAlg),
    /// CKM_RSA_PKCS_PSS: input is the hash.
    RsaPss(PssParams),
    /// CKM_SHA*_RSA_PKCS_PSS: hashes the data; params.hash equals the mechanism's hash.
    RsaPssHash(PssParams),
    RsaOaep(OaepParams),
    /// CKM_ECDSA: input is the hash, output raw r‖s.
    Ecdsa,
    EcdsaHash(HashAlg),
    AesGcm(GcmParams),
    /// CKM_AES_GCM for message-based encryption (C_MessageEncryptInit): each message brings
    /// its own parameters (`crypto::gcm_message`).
    AesGcmMessage,
    AesCbcPad([u8; 16]),
    AesCbc([u8; 16]),
    AesEcb,
    /// CKM_AES_CTR: the initial counter block and how many of its low bits count.
    AesCtr {
        iv: [u8; 16],
        counter_bits: usize,
    },
    AesCmac,
    /// CKM_SHA*_HMAC with a generic secret key, full-length output.
    Hmac(HashAlg),
    /// CKM_AES_KEY_WRAP (RFC 3394, default IV).
    AesKeyWrap,
    /// CKM_AES_KEY_WRAP_KWP (RFC 5649).
    AesKeyWrapPad,
    Digest(HashAlg),
    /// CKM_ECDH1_DERIVE.
    Ecdh(EcdhParams),
    /// A key or key-pair generation mechanism (CKM_AES_KEY_GEN, CKM_EC_KEY_PAIR_GEN, ...).
    KeyGen(CK_MECHANISM_TYPE),
}

impl Mechanism {
    pub fn ckm(&self) -> CK_MECHANISM_TYPE {
        match self {
            Mechanism::RsaPkcs => CKM_RSA_PKCS,
            Mechanism::RsaPkcsHash(h) => match h {
                HashAlg::Sha1 => CKM_SHA1_RSA_PKCS,
                HashAlg::Sha224 => CKM_SHA224_RSA_PKCS,
                HashAlg::Sha256 => CKM_SHA256_RSA_PKCS,
                HashAlg::Sha384 => CKM_SHA384_RSA_PKCS,
                HashAlg::Sha512 => CKM_SHA512_RSA_PKCS,
            },
            Mechanism::RsaPss(_) => CKM_RSA_PKCS_PSS,
            Mechanism::RsaPssHash(p) => pss_hash_ckm(p.hash),
            Mechanism::RsaOaep(_) => CKM_RSA_PKCS_OAEP,
            Mechanism::Ecdsa => CKM_ECDSA,
            Mechanism::EcdsaHash(h) => match h {
                HashAlg::Sha1 => CKM_ECDSA_SHA1,
                HashAlg::Sha224 => CKM_ECDSA_SHA224,
                HashAlg::Sha256 => CKM_ECDSA_SHA256,
                HashAlg::Sha384 => CKM_ECDSA_SHA384,
                HashAlg::Sha512 => CKM_ECDSA_SHA512,
            },
            Mechanism::AesGcm(_) | Mechanism::AesGcmMessage => CKM_AES_GCM,
            Mechanism::AesCbcPad(_) => CKM_AES_CBC_PAD,
            Mechanism::AesCbc(_) => CKM_AES_CBC,
            Mechanism::AesEcb => CKM_AES_ECB,
            Mechanism::AesCtr { .. } => CKM_AES_CTR,
            Mechanism::AesCmac => CKM_AES_CMAC,
            Mechanism::Hmac(h) => match h {
                HashAlg::Sha1 => CKM_SHA_1_HMAC,
                HashAlg::Sha224 => CKM_SHA224_HMAC,
                HashAlg::Sha256 => CKM_SHA256_HMAC,
                HashAlg::Sha384 => CKM_SHA384_HMAC,
                HashAlg::Sha512 => CKM_SHA512_HMAC,
            },
            Mechanism::AesKeyWrap => CKM_AES_KEY_WRAP,
            Mechanism::AesKeyWrapPad => CKM_AES_KEY_WRAP_KWP,
            Mechanism::Digest(h) => h.ckm(),
            Mechanism::KeyGen(ckm) => *ckm,
            Mechanism::Ecdh(_) => CKM_ECDH1_DERIVE,
        }
    }
}

fn pss_hash_ckm(h: HashAlg) -> CK_MECHANISM_TYPE {
    match h {
        HashAlg::Sha1 => CKM_SHA1_RSA_PKCS_PSS,
        HashAlg::Sha224 => CKM_SHA224_RSA_PKCS_PSS,
        HashAlg::Sha256 => CKM_SHA256_RSA_PKCS_PSS,
        HashAlg::Sha384 => CKM_SHA384_RSA_PKCS_PSS,
        HashAlg::Sha512 => CKM_SHA512_RSA_PKCS_PSS,
    }
}

/// The hash a hashed RSA/ECDSA mechanism type implies.
pub fn hash_of_hashed(ckm: CK_MECHANISM_TYPE) -> Option<HashAlg> {
    Some(match ckm {
        CKM_SHA1_RSA_PKCS | CKM_SHA1_RSA_PKCS_PSS | CKM_ECDSA_SHA1 => HashAlg::Sha1,
        CKM_SHA224_RSA_PKCS | CKM_SHA224_RSA_PKCS_PSS | CKM_ECDSA_SHA224 => HashAlg::Sha224,
        CKM_SHA256_RSA_PKCS | CKM_SHA256_RSA_PKCS_PSS | CKM_ECDSA_SHA256 => HashAlg::Sha256,
        CKM_SHA384_RSA_PKCS | CKM_SHA384_RSA_PKCS_PSS | CKM_ECDSA_SHA384 => HashAlg::Sha384,
        CKM_SHA512_RSA_PKCS | CKM_SHA512_RSA_PKCS_PSS | CKM_ECDSA_SHA512 => HashAlg::Sha512,
        _ => return None,
    })
}

/// A mechanism parameter as decoded at the C boundary (owned copies, lengths checked there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawParam {
    None,
    Pss {
        hash_alg: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        salt_len: CK_ULONG,
    },
    Oaep {
        hash_alg: CK_MECHANISM_TYPE,
        mgf: CK_RSA_PKCS_MGF_TYPE,
        source: CK_RSA_PKCS_OAEP_SOURCE_TYPE,
        source_data: Vec<u8>,
    },
    Gcm {
        iv: Vec<u8>,
        aad: Vec<u8>,
        tag_bits: CK_ULONG,
    },
    Bytes(Vec<u8>),
    Ctr {
        counter_bits: CK_ULONG,
        block: [u8; 16],
    },
    Ecdh {
        kdf: CK_EC_KDF_TYPE,
        shared: Vec<u8>,
        public: Vec<u8>,
    },
}

/// Bind the fields of the `RawParam` variant a family needs, or answer
/// CKR_MECHANISM_PARAM_INVALID naming the C structure it takes.
macro_rules! take_param {
    ($param:expr => $variant:ident { $($field:ident),* }, $c_struct:literal) => {
        let RawParam::$variant { $($field),* } = $param else {
            return Err(param_invalid(concat!("the mechanism needs ", $c_struct)));
        };
    };
}
pub(super) use take_param;

pub(super) fn param_invalid(msg: impl Into<String>) -> Error {
    Error::new(CKR_MECHANISM_PARAM_INVALID, msg)
}

/// Refuse a parameter on a mechanism that takes none (an empty byte string is no parameter).
pub(super) fn no_param(ckm: CK_MECHANISM_TYPE, p: &RawParam) -> Result<()> {
    match p {
        RawParam::None => Ok(()),
        RawParam::Bytes(b) if b.is_empty() => Ok(()),
        _ => Err(param_invalid(format!(
            "mechanism {ckm:#x} takes no parameter"
        ))),
    }
}

/// How a mechanism's C parameter is laid out: the C boundary decodes it by this into a
/// `RawParam` before any family sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamShape {
    /// No parameter, or an opaque byte string (an IV).
    Bytes,
    /// CK_RSA_PKCS_PSS_PARAMS.
    Pss,
    /// CK_RSA_PKCS_OAEP_PARAMS (with its source data).
    Oaep,
    /// CK_GCM_PARAMS (with its IV and AAD).
    Gcm,
    /// CK_AES_CTR_PARAMS.
    Ctr,
    /// CK_ECDH1_DERIVE_PARAMS (with its shared and public data).
    Ecdh,
}

/// A secret-key cipher (C_Encrypt / C_Decrypt, and C_WrapKey / C_UnwrapKey over the same
/// engine): output as input arrives, the rest at the end. Output is `Wiped` in both
/// directions (a decryption's output is plaintext).
pub trait SecretCipher: Send {
    fn update(&mut self, input: &[u8]) -> Result<Wiped>;
    fn finish(&mut self) -> Result<Wiped>;
    /// Single-part C_Encrypt / C_Decrypt: by default update then finish; a one-shot mode
    /// works on `input` in place.
    fn single(&mut self, input: &[u8]) -> Result<Wiped> {
        let out = self.update(input)?;
        Ok(joined(out, self.finish()?))
    }
    /// The exact single-part output length for `n` input bytes when known without computing.
    fn single_output_len(&self, _n: usize) -> Option<usize> {
        None
    }
    /// Single-part output written straight into the caller's buffer (`out` holds at least
    /// `single_output_len` bytes and does not overlap `input`), for modes whose output is not
    /// secret (AES-GCM encryption); None: use `single`.
    fn single_into(&mut self, _input: &[u8], _out: &mut [u8]) -> Option<Result<usize>> {
        None
    }
}

/// Update's output followed by Final's: a single-part call made of the two.
pub fn joined(mut out: Wiped, last: Wiped) -> Wiped {
    if out.is_empty() {
        return last;
    }
    out.extend_from_slice(&last);
    out
}

/// A family's secret-key cipher: None when `m` is not its cipher mechanism.
pub type Engine = Option<Result<Box<dyn SecretCipher>>>;

/// A MAC over a secret key (C_Sign / C_Verify with HMAC, CMAC).
pub trait Mac: Send {
    fn update(&mut self, data: &[u8]) -> Result<()>;
    /// The tag; the MAC is spent afterwards.
    fn finish(&mut self) -> Result<Wiped>;
    fn output_len(&self) -> usize;
}

/// A one-shot mode (GCM, key wrap): its whole input at once.
pub trait OneShot: Send {
    fn run(&mut self, input: &[u8]) -> Result<Wiped>;
    /// Added to the input length: the exact output length, when known without computing
    /// (GCM encryption: the tag).
    fn grows_by(&self) -> Option<usize> {
        None
    }
    /// The output written straight into `out` (`grows_by` more bytes than the input, not
    /// overlapping it), for output that is not secret; None: use `run`.
    fn run_into(&mut self, _input: &[u8], _out: &mut [u8]) -> Option<Result<usize>> {
        None
    }
}

impl<F: FnMut(&[u8]) -> Result<Wiped> + Send> OneShot for F {
    fn run(&mut self, input: &[u8]) -> Result<Wiped> {
        self(input)
    }
}

/// Largest input a one-shot mode collects through Update calls.
pub const MAX_COLLECT: usize = 64 * 1024 * 1024;

/// A one-shot mode as a `SecretCipher`: Update collects, Final runs the mode over everything;
/// single-part runs it on the caller's input directly (no copy to collect and wipe again).
pub struct Collected<O> {
    buf: Wiped,
    mode: O,
}

impl<O: OneShot> Collected<O> {
    pub fn new(mode: O) -> Collected<O> {
        Collected {
            buf: Wiped::new(Vec::new()),
            mode,
        }
    }

    fn check_len(input: &[u8]) -> Result<()> {
        if input.len() > MAX_COLLECT {
            return Err(Error::new(CKR_DATA_LEN_RANGE, "input too long"));
        }
        Ok(())
    }
}

impl<O: OneShot> SecretCipher for Collected<O> {
    fn update(&mut self, input: &[u8]) -> Result<Wiped> {
        if self.buf.len() + input.len() > MAX_COLLECT {
            return Err(Error::new(CKR_DATA_LEN_RANGE, "input too long"));
        }
        self.buf.extend_from_slice(input);
        Ok(Wiped::new(Vec::new()))
    }
    fn finish(&mut self) -> Result<Wiped> {
        let input = std::mem::replace(&mut self.buf, Wiped::new(Vec::new()));
        self.mode.run(&input)
    }
    fn single(&mut self, input: &[u8]) -> Result<Wiped> {
        if !self.buf.is_empty() {
            self.update(input)?;
            return self.finish();
        }
        Self::check_len(input)?;
        self.mode.run(input)
    }
    fn single_output_len(&self, n: usize) -> Option<usize> {
        self.mode
            .grows_by()
            .filter(|_| self.buf.is_empty())
            .map(|g| n + g)
    }
    fn single_into(&mut self, input: &[u8], out: &mut [u8]) -> Option<Result<usize>> {
        if !self.buf.is_empty() || self.mode.grows_by().is_none() {
            return None;
        }
        if let Err(e) = Self::check_len(input) {
            return Some(Err(e));
        }
        self.mode.run_into(input, out)
    }
}

/// One mechanism family: parses its mechanisms' decoded parameters into a `Mechanism` and
/// builds their engines. One file per family (`rsa.rs`, `ecdsa.rs`, `aes.rs`, `mac.rs`,
/// `keywrap.rs`, `digest.rs`, `keygen.rs`); adding a family means a new file and its rows in
/// `MECHANISMS` (and, for a new parameter layout, a `ParamShape`). The engines a family does
/// not have keep their default (`None`: not this family's operation).
pub trait Family: Sync {
    /// Shape checks only; key-dependent checks (the PSS salt bound) happen at init.
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism>;
    /// The secret-key cipher of `m` in one direction; it keeps `key` if it needs it later.
    fn cipher(&self, _m: &Mechanism, _key: Arc<SecretBytes>, _encrypt: bool) -> Engine {
        None
    }
    /// The secret-key MAC of `m`.
    fn mac(&self, _m: &Mechanism, _key: &Arc<SecretBytes>) -> Option<Result<Box<dyn Mac>>> {
        None
    }
    /// A derived secret of `len` bytes from a base key (C_DeriveKey).
    fn derive(
        &self,
        _m: &Mechanism,
        _base: &crate::crypto::ops::AsymKey,
        _len: usize,
    ) -> Option<Result<SecretBytes>> {
        None
    }
}

/// The family of a parsed mechanism.
pub fn family_of(m: &Mechanism) -> Option<&'static dyn Family> {
    lookup(m.ckm()).map(|i| i.family)
}

/// A family whose mechanisms take no parameter and come raw (the input is the hash) or with
/// the hash built in (CKM_SHA256_RSA_PKCS, CKM_ECDSA_SHA256, ...): PKCS#1 v1.5 and ECDSA.
pub struct Plain {
    pub raw: Mechanism,
    pub hashed: fn(HashAlg) -> Mechanism,
}

impl Family for Plain {
    fn parse(&self, ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        no_param(ckm, &param)?;
        Ok(hash_of_hashed(ckm).map_or_else(|| self.raw.clone(), self.hashed))
    }
}

/// One row of the registry: what `C_GetMechanismInfo` answers and who parses the mechanism.
pub struct MechInfo {
    pub ckm: CK_MECHANISM_TYPE,
    /// Key sizes: RSA and EC in bits, AES in bytes (as PKCS#11 defines them).
    pub min_key: CK_ULONG,
    pub max_key: CK_ULONG,
    pub flags: CK_FLAGS,
    /// The key type it works with (CKK_RSA, CKK_EC, CKK_AES); None for keyless digests.
    pub key: Option<CK_KEY_TYPE>,
    pub param: ParamShape,
    pub family: &'static dyn Family,
}

impl MechInfo {
    /// Whether the mechanism supports an operation (CKF_SIGN, CKF_DECRYPT, ...).
    pub fn can(&self, flag: CK_FLAGS) -> bool {
        self.flags & flag != 0
    }
}

impl Mechanism {
    /// Build a mechanism from its type and decoded parameter, through its family.
    pub fn from_raw(ckm: CK_MECHANISM_TYPE, param: RawParam) -> Result<Mechanism> {
        let info = lookup(ckm).ok_or_else(|| {
            Error::new(
                CKR_MECHANISM_INVALID,
                format!("mechanism {ckm:#x} is not supported"),
            )
        })?;
        info.family.parse(ckm, param)
    }
}

/// The registry row of a mechanism type.
pub fn lookup(ckm: CK_MECHANISM_TYPE) -> Option<&'static MechInfo> {
    MECHANISMS.iter().find(|m| m.ckm == ckm)
}

/// Every mechanism the token offers: the one table `C_GetMechanismList`,
/// `C_GetMechanismInfo`, CKA_ALLOWED_MECHANISMS and every C_*Init answer from.
pub fn mechanisms() -> &'static [MechInfo] {
    MECHANISMS
}

// CKF_HW is set on all of them: the keys live only inside the attested TEE, which is the
// hardware boundary of this token, and pkcs11-tool hides mechanisms without CKF_HW unless
// `--allow-sw`. Both directions are listed (SIGN|VERIFY, ENCRYPT|DECRYPT): SunPKCS11 drops
// one-sided mechanisms.
const RSA_SV: CK_FLAGS = CKF_HW | CKF_SIGN | CKF_VERIFY;
const RSA_ALL: CK_FLAGS = RSA_SV | CKF_ENCRYPT | CKF_DECRYPT;
const RSA_ED: CK_FLAGS = CKF_HW | CKF_ENCRYPT | CKF_DECRYPT;
const EC: CK_FLAGS =
    CKF_HW | CKF_SIGN | CKF_VERIFY | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
const AES: CK_FLAGS = CKF_HW | CKF_ENCRYPT | CKF_DECRYPT;
/// PKCS#11 3.0 message-based encryption, single-part messages only (no CKF_MULTI_MESSAGE:
/// C_EncryptMessageBegin / Next are not offered).
const MESSAGE: CK_FLAGS = CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT;
// Key wrapping only with the authenticated formats (key wrap, GCM, OAEP): CBC-PAD unwrap would
// be a padding oracle, ECB and CBC leak structure.
const WRAP: CK_FLAGS = CKF_WRAP | CKF_UNWRAP;
const AES_WRAP: CK_FLAGS = AES | WRAP;
/// CKM_RSA_PKCS: decrypt and unwrap only with a key whose config allows PKCS#1 v1.5 decryption
/// (`ffi::ops::pkcs1_decrypt_allowed`).
const RSA_PKCS1: CK_FLAGS = RSA_ALL | WRAP;
const MAC: CK_FLAGS = CKF_HW | CKF_SIGN | CKF_VERIFY;
const DIG: CK_FLAGS = CKF_HW | CKF_DIGEST;
const GEN: CK_FLAGS = CKF_HW | CKF_GENERATE;
const GEN_PAIR: CK_FLAGS = CKF_HW | CKF_GENERATE_KEY_PAIR;
const EC_GEN: CK_FLAGS = GEN_PAIR | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
const EC_DERIVE: CK_FLAGS =
    CKF_HW | CKF_DERIVE | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;

const fn row(
    ckm: CK_MECHANISM_TYPE,
    key: Option<CK_KEY_TYPE>,
    min_key: CK_ULONG,
    max_key: CK_ULONG,
    flags: CK_FLAGS,
    param: ParamShape,
    family: &'static dyn Family,
) -> MechInfo {
    MechInfo {
        ckm,
        min_key,
        max_key,
        flags,
        key,
        param,
        family,
    }
}

use ParamShape::{Bytes, Ctr, Ecdh, Gcm, Oaep, Pss};
const R: Option<CK_KEY_TYPE> = Some(CKK_RSA);
const E: Option<CK_KEY_TYPE> = Some(CKK_EC);
const A: Option<CK_KEY_TYPE> = Some(CKK_AES);
const G: Option<CK_KEY_TYPE> = Some(CKK_GENERIC_SECRET);
const NOKEY: Option<CK_KEY_TYPE> = None;
#[rustfmt::skip]
static MECHANISMS: &[MechInfo] = &[
    row(CKM_RSA_PKCS, R, 2048, 4096, RSA_PKCS1, Bytes, &rsa::PKCS1),
    row(CKM_SHA1_RSA_PKCS, R, 2048, 4096, RSA_SV, Bytes, &rsa::PKCS1),
    row(CKM_SHA224_RSA_PKCS, R, 2048, 4096, RSA_SV, Bytes, &rsa::PKCS1),
    row(CKM_SHA256_RSA_PKCS, R, 2048, 4096, RSA_SV, Bytes, &rsa::PKCS1),
    row(CKM_SHA384_RSA_PKCS, R, 2048, 4096, RSA_SV, Bytes, &rsa::PKCS1),
    row(CKM_SHA512_RSA_PKCS, R, 2048, 4096, RSA_SV, Bytes, &rsa::PKCS1),
    row(CKM_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_SHA1_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_SHA224_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_SHA256_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_SHA384_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_SHA512_RSA_PKCS_PSS, R, 2048, 4096, RSA_SV, Pss, &rsa::Pss),
    row(CKM_RSA_PKCS_OAEP, R, 2048, 4096, RSA_ED | WRAP, Oaep, &rsa::Oaep),
    row(CKM_ECDSA, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_ECDSA_SHA1, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_ECDSA_SHA224, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_ECDSA_SHA256, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_ECDSA_SHA384, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_ECDSA_SHA512, E, 256, 521, EC, Bytes, &ecdsa::ECDSA),
    row(CKM_AES_GCM, A, 16, 32, AES_WRAP | MESSAGE, Gcm, &aes::Gcm),
    row(CKM_AES_CBC_PAD, A, 16, 32, AES, Bytes, &aes::Cbc),
    row(CKM_AES_CBC, A, 16, 32, AES, Bytes, &aes::Cbc),
    row(CKM_AES_ECB, A, 16, 32, AES, Bytes, &aes::Ecb),
    row(CKM_AES_CTR, A, 16, 32, AES, Ctr, &aes::Ctr),
    row(CKM_AES_KEY_WRAP, A, 16, 32, AES_WRAP, Bytes, &keywrap::KeyWrap),
    row(CKM_AES_KEY_WRAP_KWP, A, 16, 32, AES_WRAP, Bytes, &keywrap::KeyWrap),
    row(CKM_AES_CMAC, A, 16, 32, MAC, Bytes, &mac::Cmac),
    row(CKM_SHA_1_HMAC, G, 1, 512, MAC, Bytes, &mac::Hmac),
    row(CKM_SHA224_HMAC, G, 1, 512, MAC, Bytes, &mac::Hmac),
    row(CKM_SHA256_HMAC, G, 1, 512, MAC, Bytes, &mac::Hmac),
    row(CKM_SHA384_HMAC, G, 1, 512, MAC, Bytes, &mac::Hmac),
    row(CKM_SHA512_HMAC, G, 1, 512, MAC, Bytes, &mac::Hmac),
    row(CKM_ECDH1_DERIVE, E, 256, 521, EC_DERIVE, Ecdh, &ecdh::Ecdh),
    row(CKM_AES_KEY_GEN, A, 16, 32, GEN, Bytes, &keygen::KeyGen),
    row(CKM_GENERIC_SECRET_KEY_GEN, G, 1, 512, GEN, Bytes, &keygen::KeyGen),
    row(CKM_RSA_PKCS_KEY_PAIR_GEN, R, 2048, 4096, GEN_PAIR, Bytes, &keygen::KeyGen),
    row(CKM_EC_KEY_PAIR_GEN, E, 256, 521, EC_GEN, Bytes, &keygen::KeyGen),
    row(CKM_SHA_1, NOKEY, 0, 0, DIG, Bytes, &digest::Digest),
    row(CKM_SHA224, NOKEY, 0, 0, DIG, Bytes, &digest::Digest),
    row(CKM_SHA256, NOKEY, 0, 0, DIG, Bytes, &digest::Digest),
    row(CKM_SHA384, NOKEY, 0, 0, DIG, Bytes, &digest::Digest),
    row(CKM_SHA512, NOKEY, 0, 0, DIG, Bytes, &digest::Digest),
];

#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_params_are_checked() {
        let ok = RawParam::Pss {
            hash_alg: CKM_SHA256,
            mgf: CKG_MGF1_SHA256,
            salt_len: 32,
        };
        assert!(matches!(
            Mechanism::from_raw(CKM_SHA256_RSA_PKCS_PSS, ok.clone()),
            Ok(Mechanism::RsaPssHash(_))
        ));
        let e = Mechanism::from_raw(CKM_SHA384_RSA_PKCS_PSS, ok).unwrap_err();
        assert_eq!(e.rv(), CKR_MECHANISM_PARAM_INVALID);
        let bad_mgf = RawParam::Pss {
            hash_alg: CKM_SHA256,
            mgf: CKG_MGF1_SHA1,
            salt_len: 32,
        };
        assert_eq!(
            Mechanism::from_raw(CKM_RSA_PKCS_PSS, bad_mgf)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
        assert_eq!(
            Mechanism::from_raw(CKM_RSA_PKCS_PSS, RawParam::None)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
    }

    #[test]
    fn unknown_mechanism_is_invalid() {
        assert_eq!(
            Mechanism::from_raw(CKM_DES3_CBC, RawParam::None)
                .unwrap_err()
                .rv(),
            CKR_MECHANISM_INVALID
        );
    }

    #[test]
    fn every_listed_mechanism_is_paired_and_decodable_type() {
        for info in mechanisms() {
            let (m, f) = (info.ckm, info.flags);
            assert_ne!(f & CKF_HW, 0);
            assert_eq!(f & CKF_SIGN != 0, f & CKF_VERIFY != 0, "{m:#x}");
            assert_eq!(f & CKF_ENCRYPT != 0, f & CKF_DECRYPT != 0, "{m:#x}");
            let message = f & (CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT);
            assert!(
                message == 0 || message == CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT,
                "{m:#x}"
            );
            assert_eq!(f & CKF_MULTI_MESSAGE, 0, "{m:#x}: no multi-part messages");
        }
    }

    /// Each row's family parses its own mechanism type back to it, and no type is listed
    /// twice: the registry and `Mechanism::ckm` cannot drift apart.
    #[test]
    fn every_row_parses_to_its_own_type() {
        for (i, info) in mechanisms().iter().enumerate() {
            assert!(
                mechanisms()[..i].iter().all(|m| m.ckm != info.ckm),
                "{:#x} listed twice",
                info.ckm
            );
            let hash = hash_of_hashed(info.ckm).unwrap_or(HashAlg::Sha256);
            let mgf = match hash {
                HashAlg::Sha1 => CKG_MGF1_SHA1,
                HashAlg::Sha224 => CKG_MGF1_SHA224,
                HashAlg::Sha256 => CKG_MGF1_SHA256,
                HashAlg::Sha384 => CKG_MGF1_SHA384,
                HashAlg::Sha512 => CKG_MGF1_SHA512,
            };
            let param = match (info.param, info.ckm) {
                (ParamShape::Pss, _) => RawParam::Pss {
                    hash_alg: hash.ckm(),
                    mgf,
                    salt_len: 0,
                },
                (ParamShape::Oaep, _) => RawParam::Oaep {
                    hash_alg: hash.ckm(),
                    mgf,
                    source: CKZ_DATA_SPECIFIED,
                    source_data: vec![],
                },
                (ParamShape::Gcm, _) => RawParam::Gcm {
                    iv: vec![0; 12],
                    aad: vec![],
                    tag_bits: 128,
                },
                (ParamShape::Bytes, CKM_AES_CBC_PAD | CKM_AES_CBC) => RawParam::Bytes(vec![0; 16]),
                (ParamShape::Ecdh, _) => RawParam::Ecdh {
                    kdf: CKD_NULL,
                    shared: vec![],
                    public: vec![4; 65],
                },
                (ParamShape::Ctr, _) => RawParam::Ctr {
                    counter_bits: 128,
                    block: [0; 16],
                },
                (ParamShape::Bytes, _) => RawParam::None,
            };
            let m = Mechanism::from_raw(info.ckm, param)
                .unwrap_or_else(|e| panic!("{:#x}: {e}", info.ckm));
            assert_eq!(m.ckm(), info.ckm);
            assert_eq!(info.key.is_none(), info.can(CKF_DIGEST), "{:#x}", info.ckm);
        }
    }

    #[test]
    fn gcm_and_cbc_params() {
        // (IV length, AAD length, tag bits, accepted)
        let gcm = [
            (12, 2, 128, true),
            (12, 0, 64, false),
            (0, 0, 128, false),
            (16, 0, 96, true),
        ];
        for (iv, aad, tag_bits, ok) in gcm {
            let g = RawParam::Gcm {
                iv: vec![0; iv],
                aad: vec![1; aad],
                tag_bits,
            };
            match Mechanism::from_raw(CKM_AES_GCM, g) {
                Ok(_) => assert!(ok, "iv {iv} tag {tag_bits} accepted"),
                Err(e) => {
                    assert!(!ok, "iv {iv} tag {tag_bits} refused");
                    assert_eq!(e.rv(), CKR_MECHANISM_PARAM_INVALID);
                }
            }
        }
        assert!(Mechanism::from_raw(CKM_AES_CBC_PAD, RawParam::Bytes(vec![0; 16])).is_ok());
        assert!(Mechanism::from_raw(CKM_AES_CBC_PAD, RawParam::Bytes(vec![0; 15])).is_err());
    }
}
