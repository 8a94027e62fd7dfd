//! Operation objects: one per active Sign / Verify / Encrypt / Decrypt / Digest on a session.
//! Each is built from a mechanism and a key (checked against each other at init), takes input
//! in one or several parts and produces its output once. Hashed mechanisms hash as data
//! arrives (true multipart); raw mechanisms collect their (short) input.

use super::mechanism::{family_of, Mac, SecretCipher, MAX_COLLECT};
use super::pkey::{EvpKey, PublicInfo, PublicParts, RsaPad};
use super::{HashAlg, Hasher, Mechanism};
use crate::error::{Error, Result};
use crate::secret::SecretBytes;
use crate::secret::Wiped;
use cryptoki_sys::*;
use std::sync::Arc;

/// An asymmetric key usable for operations: the parsed AWS-LC key and its public half.
pub struct AsymKey {
    pub evp: EvpKey,
    pub info: PublicInfo,
}

impl AsymKey {
    pub fn from_pkcs8(der: &[u8]) -> Result<AsymKey> {
        let evp = EvpKey::from_pkcs8(der)?;
        let info = evp.public_info()?;
        Ok(AsymKey { evp, info })
    }
    /// A fresh RSA key pair (`bits` 2048..=4096).
    pub fn generate_rsa(bits: usize, exponent: &[u8]) -> Result<AsymKey> {
        if !(2048..=4096).contains(&bits) {
            return Err(Error::new(
                CKR_KEY_SIZE_RANGE,
                format!("RSA keys are 2048..4096 bits, asked for {bits}"),
            ));
        }
        let evp = EvpKey::generate_rsa(bits, exponent)?;
        let info = evp.public_info()?;
        Ok(AsymKey { evp, info })
    }
    /// A fresh EC key pair on `curve`.
    pub fn generate_ec(curve: super::pkey::Curve) -> Result<AsymKey> {
        let evp = EvpKey::generate_ec(curve)?;
        let info = evp.public_info()?;
        Ok(AsymKey { evp, info })
    }
    pub fn from_spki(der: &[u8]) -> Result<AsymKey> {
        let evp = EvpKey::from_spki(der)?;
        let info = evp.public_info()?;
        Ok(AsymKey { evp, info })
    }
    fn rsa_len(&self) -> Option<(usize, usize)> {
        match &self.info.parts {
            PublicParts::Rsa { modulus, bits, .. } => Some((modulus.len(), *bits)),
            _ => None,
        }
    }
    fn ec_field_len(&self) -> Option<usize> {
        match &self.info.parts {
            PublicParts::Ec { curve, .. } => Some(curve.field_len()),
            _ => None,
        }
    }
}

fn inconsistent(what: &str) -> Error {
    Error::new(
        CKR_KEY_TYPE_INCONSISTENT,
        format!("{what} does not fit this key type"),
    )
}

fn not_for(op: &str, m: &Mechanism) -> Error {
    Error::new(
        CKR_MECHANISM_INVALID,
        format!("mechanism {:#x} cannot {op}", m.ckm()),
    )
}

enum Input {
    Hash(Hasher),
    Collect(Wiped),
}

impl Input {
    fn for_mech(m: &Mechanism) -> Input {
        match m {
            Mechanism::RsaPkcsHash(h) | Mechanism::EcdsaHash(h) => Input::Hash(Hasher::new(*h)),
            Mechanism::RsaPssHash(p) => Input::Hash(Hasher::new(p.hash)),
            _ => Input::Collect(Wiped::new(Vec::new())),
        }
    }
    fn update(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Input::Hash(h) => h.update(data),
            Input::Collect(v) => {
                if v.len() + data.len() > MAX_COLLECT {
                    return Err(Error::new(CKR_DATA_LEN_RANGE, "input too long"));
                }
                v.extend_from_slice(data)
            }
        }
        Ok(())
    }
    /// The bytes the signature primitive sees: the hash, or the collected raw input.
    fn take(&mut self) -> Wiped {
        match std::mem::replace(self, Input::Collect(Wiped::new(Vec::new()))) {
            Input::Hash(h) => Wiped::new(h.finish()),
            Input::Collect(v) => v,
        }
    }
}

/// Check mechanism vs key and the key-dependent parameter bounds; shared by sign and verify.
fn check_sig_mech(m: &Mechanism, key: &AsymKey) -> Result<()> {
    match m {
        Mechanism::RsaPkcs | Mechanism::RsaPkcsHash(_) => {
            key.rsa_len().ok_or_else(|| inconsistent("RSA mechanism"))?;
        }
        Mechanism::RsaPss(p) | Mechanism::RsaPssHash(p) => {
            let (_, bits) = key.rsa_len().ok_or_else(|| inconsistent("RSA mechanism"))?;
            // RFC 8017 §9.1.1: emLen = ceil((modBits-1)/8), sLen ≤ emLen − hLen − 2.
            let em_len = (bits - 1).div_ceil(8);
            let max = em_len.saturating_sub(p.hash.output_len() + 2);
            if p.salt_len > max {
                return Err(Error::new(
                    CKR_MECHANISM_PARAM_INVALID,
                    format!("PSS sLen {} exceeds {max} for this key", p.salt_len),
                ));
            }
        }
        Mechanism::Ecdsa | Mechanism::EcdsaHash(_) => {
            key.ec_field_len()
                .ok_or_else(|| inconsistent("ECDSA mechanism"))?;
        }
        _ => return Err(not_for("sign or verify", m)),
    }
    Ok(())
}

fn rsa_pad(m: &Mechanism) -> RsaPad<'_> {
    match m {
        Mechanism::RsaPss(p) | Mechanism::RsaPssHash(p) => RsaPad::Pss {
            hash: p.hash,
            mgf: p.mgf,
            salt_len: p.salt_len,
        },
        Mechanism::RsaOaep(p) => RsaPad::Oaep {
            hash: p.hash,
            mgf: p.mgf,
            label: &p.label,
        },
        _ => RsaPad::Pkcs1,
    }
}

/// The primitive's input from the hash or raw data: DigestInfo for hashed PKCS#1, with length
/// checks for the raw mechanisms.
fn primitive_input(m: &Mechanism, key: &AsymKey, data: Wiped) -> Result<Wiped> {
    match m {
        Mechanism::RsaPkcsHash(h) => {
            let mut v = Wiped::new(h.digest_info_prefix().to_vec());
            v.extend_from_slice(&data);
            Ok(v)
        }
        Mechanism::RsaPkcs => {
            let (k, _) = key.rsa_len().ok_or_else(|| inconsistent("RSA mechanism"))?;
            if data.len() > k.saturating_sub(11) {
                return Err(Error::new(
                    CKR_DATA_LEN_RANGE,
                    format!("CKM_RSA_PKCS input of {} bytes exceeds k-11", data.len()),
                ));
            }
            Ok(data)
        }
        Mechanism::RsaPss(p) => {
            if data.len() != p.hash.output_len() {
                return Err(Error::new(
                    CKR_DATA_LEN_RANGE,
                    format!(
                        "CKM_RSA_PKCS_PSS input must be the {}-byte hash, got {} bytes",
                        p.hash.output_len(),
                        data.len()
                    ),
                ));
            }
            Ok(data)
        }
        Mechanism::Ecdsa => {
            if data.is_empty() {
                return Err(Error::new(CKR_DATA_LEN_RANGE, "CKM_ECDSA input is empty"));
            }
            Ok(data)
        }
        _ => Ok(data),
    }
}

/// What a sign or verify works with: an RSA / EC key and its input, or a secret-key MAC.
enum SigKey {
    Asym { key: Arc<AsymKey>, input: Input },
    Mac(Box<dyn Mac>),
}

impl SigKey {
    /// An RSA / EC key for a signature mechanism it can serve.
    fn asym(mech: &Mechanism, key: Arc<AsymKey>) -> Result<SigKey> {
        check_sig_mech(mech, &key)?;
        let input = Input::for_mech(mech);
        Ok(SigKey::Asym { key, input })
    }
    /// A MAC (HMAC, CMAC) over a secret key.
    fn mac(mech: &Mechanism, key: &Arc<SecretBytes>) -> Result<SigKey> {
        mac_of(mech, key).map(SigKey::Mac)
    }
    /// The exact signature / tag length: RSA k bytes, ECDSA 2 × field bytes, the MAC's.
    fn output_len(&self) -> usize {
        match self {
            SigKey::Asym { key, .. } => key.info.output_len(),
            SigKey::Mac(m) => m.output_len(),
        }
    }
    fn update(&mut self, data: &[u8]) -> Result<()> {
        match self {
            SigKey::Asym { input, .. } => input.update(data),
            SigKey::Mac(m) => m.update(data),
        }
    }
}

/// The MAC engine of `m` from its family, or the reason there is none.
fn mac_of(m: &Mechanism, key: &Arc<SecretBytes>) -> Result<Box<dyn Mac>> {
    match family_of(m).and_then(|f| f.mac(m, key)) {
        Some(mac) => mac,
        None if is_signature(m) => Err(inconsistent("signature mechanism")),
        None => Err(not_for("sign or verify", m)),
    }
}

fn is_signature(m: &Mechanism) -> bool {
    super::mechanism::lookup(m.ckm()).is_some_and(|i| i.can(CKF_SIGN))
}

pub struct SignOp {
    mech: Mechanism,
    key: SigKey,
}

impl SignOp {
    pub fn new(mech: Mechanism, key: Arc<AsymKey>) -> Result<SignOp> {
        if !key.evp.is_private() {
            return Err(Error::new(
                CKR_KEY_TYPE_INCONSISTENT,
                "signing needs a private key",
            ));
        }
        let key = SigKey::asym(&mech, key)?;
        Ok(SignOp { mech, key })
    }
    /// A MAC (HMAC, CMAC) with a secret key.
    pub fn mac(mech: Mechanism, key: &Arc<SecretBytes>) -> Result<SignOp> {
        let key = SigKey::mac(&mech, key)?;
        Ok(SignOp { mech, key })
    }
    pub fn mechanism(&self) -> &Mechanism {
        &self.mech
    }
    /// Signature length for this key (exact: RSA k bytes, ECDSA 2 × field bytes, the MAC's
    /// tag length).
    pub fn signature_len(&self) -> usize {
        self.key.output_len()
    }
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.key.update(data)
    }
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let (key, input) = match &mut self.key {
            SigKey::Mac(m) => return Ok(m.finish()?.to_vec()),
            SigKey::Asym { key, input } => (key, input),
        };
        let data = input.take();
        let input = primitive_input(&self.mech, key, data)?;
        match &self.mech {
            Mechanism::Ecdsa | Mechanism::EcdsaHash(_) => {
                let f = key.ec_field_len().ok_or_else(|| inconsistent("ECDSA"))?;
                key.evp.ecdsa_sign_raw(&input, f)
            }
            m => key.evp.rsa_sign(&input, &rsa_pad(m)),
        }
    }
}

pub struct VerifyOp {
    mech: Mechanism,
    key: SigKey,
}

impl VerifyOp {
    pub fn new(mech: Mechanism, key: Arc<AsymKey>) -> Result<VerifyOp> {
        let key = SigKey::asym(&mech, key)?;
        Ok(VerifyOp { mech, key })
    }
    /// A MAC check (HMAC, CMAC) with a secret key.
    pub fn mac(mech: Mechanism, key: &Arc<SecretBytes>) -> Result<VerifyOp> {
        let key = SigKey::mac(&mech, key)?;
        Ok(VerifyOp { mech, key })
    }
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.key.update(data)
    }
    /// Ok(()) for a valid signature; CKR_SIGNATURE_INVALID / CKR_SIGNATURE_LEN_RANGE otherwise.
    pub fn finish(&mut self, sig: &[u8]) -> Result<()> {
        let expected_len = self.key.output_len();
        if sig.len() != expected_len {
            return Err(Error::new(
                CKR_SIGNATURE_LEN_RANGE,
                format!(
                    "signature is {} bytes, the key makes {expected_len}",
                    sig.len(),
                ),
            ));
        }
        let ok = match &mut self.key {
            SigKey::Mac(m) => {
                let tag = m.finish()?;
                aws_lc_rs::constant_time::verify_slices_are_equal(&tag, sig).is_ok()
            }
            SigKey::Asym { key, input } => {
                let data = input.take();
                let input = primitive_input(&self.mech, key, data)?;
                match &self.mech {
                    Mechanism::Ecdsa | Mechanism::EcdsaHash(_) => {
                        key.evp.ecdsa_verify_raw(&input, sig)?
                    }
                    m => key.evp.rsa_verify(&input, sig, &rsa_pad(m))?,
                }
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::new(
                CKR_SIGNATURE_INVALID,
                "signature does not verify",
            ))
        }
    }
}

/// What an encrypt / decrypt works with.
#[derive(Clone)]
pub enum CipherKey {
    Asym(Arc<AsymKey>),
    Secret(Arc<SecretBytes>),
}

enum CipherState {
    /// RSA PKCS#1 / OAEP: the whole input, processed at the end.
    Collect(Wiped),
    /// A secret-key cipher, built by the mechanism's family.
    Secret(Box<dyn SecretCipher>),
}

/// Whether the registry lists `m` for encryption: a cipher mechanism whose key is the wrong
/// type is inconsistent with the key, any other mechanism is not a cipher at all.
fn is_cipher(m: &Mechanism) -> bool {
    super::mechanism::lookup(m.ckm()).is_some_and(|i| i.can(CKF_ENCRYPT))
}

pub struct CipherOp {
    mech: Mechanism,
    /// The RSA key of a collecting mechanism; a secret key lives in its cipher (`state`) only.
    asym: Option<Arc<AsymKey>>,
    encrypt: bool,
    state: CipherState,
}

impl CipherOp {
    /// A secret key is moved into its cipher, not kept twice: each reference count change
    /// of a token key is a write to memory every thread using that key shares.
    pub fn new(mech: Mechanism, key: CipherKey, encrypt: bool) -> Result<CipherOp> {
        let (state, asym) = match key {
            CipherKey::Asym(k) if matches!(mech, Mechanism::RsaPkcs | Mechanism::RsaOaep(_)) => {
                let (_, _) = k.rsa_len().ok_or_else(|| inconsistent("RSA mechanism"))?;
                if !encrypt && !k.evp.is_private() {
                    return Err(inconsistent("decryption with a public key"));
                }
                (CipherState::Collect(Wiped::new(Vec::new())), Some(k))
            }
            CipherKey::Secret(s) => {
                match family_of(&mech).and_then(|f| f.cipher(&mech, s, encrypt)) {
                    Some(c) => (CipherState::Secret(c?), None),
                    None if is_cipher(&mech) => return Err(inconsistent("cipher mechanism")),
                    None => return Err(not_for("encrypt or decrypt", &mech)),
                }
            }
            _ if is_cipher(&mech) => return Err(inconsistent("cipher mechanism")),
            _ => return Err(not_for("encrypt or decrypt", &mech)),
        };
        Ok(CipherOp {
            mech,
            asym,
            encrypt,
            state,
        })
    }

    pub fn mechanism(&self) -> &Mechanism {
        &self.mech
    }

    /// Multipart input; returns whatever output is ready (nothing for collected mechanisms).
    pub fn update(&mut self, data: &[u8]) -> Result<Wiped> {
        match &mut self.state {
            CipherState::Collect(v) => {
                if v.len() + data.len() > MAX_COLLECT {
                    return Err(Error::new(CKR_DATA_LEN_RANGE, "input too long"));
                }
                v.extend_from_slice(data);
                Ok(Wiped::new(Vec::new()))
            }
            CipherState::Secret(s) => s.update(data),
        }
    }

    /// The exact output length of `single` on `n` input bytes, when it is known without
    /// computing: AES-GCM encryption (input + tag). A size query then needs no computation,
    /// no copy of the input to check the retry against and nothing to wipe afterwards.
    pub fn single_output_len(&self, n: usize) -> Option<usize> {
        match &self.state {
            CipherState::Secret(s) => s.single_output_len(n),
            CipherState::Collect(_) => None,
        }
    }

    /// Single-part output straight into the caller's buffer, where the mechanism has such a
    /// path (see `SecretCipher::single_into`); None: use `single`.
    pub fn single_into(&mut self, data: &[u8], out: &mut [u8]) -> Option<Result<usize>> {
        match &mut self.state {
            CipherState::Secret(s) => s.single_into(data, out),
            CipherState::Collect(_) => None,
        }
    }

    /// Single-part C_Encrypt / C_Decrypt. A collecting mechanism (AES-GCM, RSA) with nothing
    /// collected works on `data` in place: no copy of the input to collect and wipe again
    /// (a quarter of the memory traffic of a 4 KiB AES-GCM C_Encrypt).
    pub fn single(&mut self, data: &[u8]) -> Result<Wiped> {
        if let CipherState::Secret(s) = &mut self.state {
            return s.single(data);
        }
        if let CipherState::Collect(v) = &self.state {
            if v.is_empty() {
                if data.len() > MAX_COLLECT {
                    return Err(Error::new(CKR_DATA_LEN_RANGE, "input too long"));
                }
                return self.finish_collected(data);
            }
        }
        let out = self.update(data)?;
        Ok(super::mechanism::joined(out, self.finish()?))
    }

    /// The remaining output; the operation is spent afterwards.
    pub fn finish(&mut self) -> Result<Wiped> {
        match &mut self.state {
            CipherState::Secret(s) => s.finish(),
            CipherState::Collect(v) => {
                let input = std::mem::take(v);
                self.finish_collected(&input)
            }
        }
    }

    /// The output of a collecting mechanism over its whole input.
    fn finish_collected(&self, input: &[u8]) -> Result<Wiped> {
        match (&self.mech, &self.asym) {
            (_, None) => Err(Error::general("cipher state does not match its key")),
            (m, Some(k)) => {
                let (klen, _) = k.rsa_len().ok_or_else(|| inconsistent("RSA"))?;
                let pad = rsa_pad(m);
                if self.encrypt {
                    let max = match m {
                        Mechanism::RsaOaep(p) => klen.saturating_sub(2 * p.hash.output_len() + 2),
                        _ => klen.saturating_sub(11),
                    };
                    if input.len() > max {
                        return Err(Error::new(
                            CKR_DATA_LEN_RANGE,
                            format!(
                                "plaintext of {} bytes exceeds {max} for this key",
                                input.len()
                            ),
                        ));
                    }
                    Ok(Wiped::new(k.evp.rsa_encrypt(input, &pad)?))
                } else {
                    if input.len() != klen {
                        return Err(Error::new(
                            CKR_ENCRYPTED_DATA_LEN_RANGE,
                            format!("ciphertext is {} bytes, the modulus {klen}", input.len()),
                        ));
                    }
                    if matches!(m, Mechanism::RsaPkcs) {
                        // No padding oracle: bad padding yields a synthetic message.
                        return super::implicit::pkcs1_decrypt(&k.evp, klen, input);
                    }
                    let pt = k.evp.rsa_decrypt(input, &pad)?;
                    Ok(Wiped::new(pt.as_slice().to_vec()))
                }
            }
        }
    }
}

pub struct DigestOp(Option<Hasher>);

impl DigestOp {
    pub fn new(h: HashAlg) -> DigestOp {
        DigestOp(Some(Hasher::new(h)))
    }
    pub fn len(&self) -> usize {
        self.0.as_ref().map(|h| h.alg().output_len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
    pub fn update(&mut self, data: &[u8]) -> Result<()> {
        self.0
            .as_mut()
            .ok_or_else(|| Error::new(CKR_OPERATION_NOT_INITIALIZED, "digest finished"))?
            .update(data);
        Ok(())
    }
    pub fn finish(&mut self) -> Result<Vec<u8>> {
        Ok(self
            .0
            .take()
            .ok_or_else(|| Error::new(CKR_OPERATION_NOT_INITIALIZED, "digest finished"))?
            .finish())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::{OaepParams, PssParams};
    use aws_lc_rs::encoding::AsDer;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    use std::sync::OnceLock;

    /// One RSA-2048 PKCS#8 per test run (generation is slow in debug builds).
    pub fn rsa_pkcs8() -> &'static [u8] {
        static K: OnceLock<Vec<u8>> = OnceLock::new();
        K.get_or_init(|| {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            kp.as_der().unwrap().as_ref().to_vec()
        })
    }

    pub fn ec_pkcs8(alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm) -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn rsa_key() -> (Arc<AsymKey>, rsa::RsaPrivateKey) {
        let der = rsa_pkcs8();
        (
            Arc::new(AsymKey::from_pkcs8(der).unwrap()),
            rsa::RsaPrivateKey::from_pkcs8_der(der).unwrap(),
        )
    }

    /// RSAPublicKey DER (inside the SPKI's BIT STRING), as aws-lc-rs verifiers take it.
    fn public_der(k: &AsymKey) -> Vec<u8> {
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::DecodePublicKey;
        rsa::RsaPublicKey::from_public_key_der(&k.info.spki_der)
            .unwrap()
            .to_pkcs1_der()
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    fn sign(m: Mechanism, k: &Arc<AsymKey>, parts: &[&[u8]]) -> Result<Vec<u8>> {
        let mut op = SignOp::new(m, k.clone())?;
        for p in parts {
            op.update(p)?;
        }
        op.finish()
    }

    #[test]
    fn parsed_keys_live_in_the_locked_arena() {
        let (k, _) = rsa_key();
        assert!(crate::secret::arena::is_hooked());
        assert!(crate::secret::arena::contains(k.evp.raw_addr()));
    }

    #[test]
    fn rsa_pkcs1_hashed_and_raw_verify_with_rustcrypto() {
        let (k, other) = rsa_key();
        let public = other.to_public_key();
        // Public half matches the independent parse.
        let expected = PublicParts::Rsa {
            modulus: public.n().to_bytes_be(),
            exponent: public.e().to_bytes_be(),
            bits: 2048,
        };
        assert_eq!(k.info.parts, expected);
        let msg = b"sign me in parts";
        for h in HashAlg::ALL {
            let sig = sign(Mechanism::RsaPkcsHash(h), &k, &[&msg[..4], &msg[4..]]).unwrap();
            let hashed = h.digest(msg);
            let scheme = match h {
                HashAlg::Sha1 => {
                    // RustCrypto's sha1 lacks its OID here; aws-lc-rs' own verifier builds the
                    // SHA-1 DigestInfo independently of our table.
                    let pk = aws_lc_rs::signature::UnparsedPublicKey::new(
                        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                        public_der(&k),
                    );
                    pk.verify(msg, &sig).unwrap();
                    continue;
                }
                HashAlg::Sha224 => rsa::Pkcs1v15Sign::new::<sha2::Sha224>(),
                HashAlg::Sha256 => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
                HashAlg::Sha384 => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
                HashAlg::Sha512 => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
            };
            public.verify(scheme, &hashed, &sig).unwrap();
            // Raw CKM_RSA_PKCS over the caller's own DigestInfo gives the same signature
            // (PKCS#1 v1.5 is deterministic).
            let mut di = h.digest_info_prefix().to_vec();
            di.extend_from_slice(&hashed);
            assert_eq!(sign(Mechanism::RsaPkcs, &k, &[&di]).unwrap(), sig);
            let mut v = VerifyOp::new(Mechanism::RsaPkcsHash(h), k.clone()).unwrap();
            v.update(msg).unwrap();
            v.finish(&sig).unwrap();
        }
        let big = vec![1u8; 246];
        assert_eq!(
            sign(Mechanism::RsaPkcs, &k, &[&big]).unwrap_err().rv(),
            CKR_DATA_LEN_RANGE
        );
    }

    #[test]
    fn rsa_pss_salt_lengths_verify_with_rustcrypto() {
        let (k, other) = rsa_key();
        let public = other.to_public_key();
        let hash = HashAlg::Sha256.digest(b"tls 1.3 transcript");
        for salt in [0usize, 32, 256 - 32 - 2] {
            let p = PssParams {
                hash: HashAlg::Sha256,
                mgf: HashAlg::Sha256,
                salt_len: salt,
            };
            let sig = sign(Mechanism::RsaPss(p.clone()), &k, &[&hash]).unwrap();
            public
                .verify(rsa::Pss::new_with_salt::<sha2::Sha256>(salt), &hash, &sig)
                .unwrap();
            let mut v = VerifyOp::new(Mechanism::RsaPss(p), k.clone()).unwrap();
            v.update(&hash).unwrap();
            v.finish(&sig).unwrap();
        }
        let too_big = PssParams {
            hash: HashAlg::Sha256,
            mgf: HashAlg::Sha256,
            salt_len: 256 - 32 - 1,
        };
        assert_eq!(
            SignOp::new(Mechanism::RsaPss(too_big), k.clone())
                .err()
                .unwrap()
                .rv(),
            CKR_MECHANISM_PARAM_INVALID
        );
        let p = PssParams {
            hash: HashAlg::Sha384,
            mgf: HashAlg::Sha384,
            salt_len: 48,
        };
        assert_eq!(
            sign(Mechanism::RsaPss(p.clone()), &k, &[&hash])
                .unwrap_err()
                .rv(),
            CKR_DATA_LEN_RANGE
        );
        let sig = sign(Mechanism::RsaPssHash(p), &k, &[b"ab", b"cd"]).unwrap();
        public
            .verify(
                rsa::Pss::new_with_salt::<sha2::Sha384>(48),
                &HashAlg::Sha384.digest(b"abcd"),
                &sig,
            )
            .unwrap();
    }

    #[test]
    fn rsa_oaep_and_pkcs1_decrypt_what_rustcrypto_encrypts() {
        let (k, other) = rsa_key();
        let public = other.to_public_key();
        let mut rng = rand::thread_rng();
        let ct = public
            .encrypt(
                &mut rng,
                rsa::Oaep::new_with_label::<sha2::Sha256, _>("label"),
                b"secret",
            )
            .unwrap();
        let m = Mechanism::RsaOaep(OaepParams {
            hash: HashAlg::Sha256,
            mgf: HashAlg::Sha256,
            label: b"label".to_vec(),
        });
        let mut d = CipherOp::new(m.clone(), CipherKey::Asym(k.clone()), false).unwrap();
        d.update(&ct).unwrap();
        assert_eq!(&d.finish().unwrap()[..], b"secret");
        // Encrypt here, decrypt there.
        let mut e = CipherOp::new(m, CipherKey::Asym(k.clone()), true).unwrap();
        e.update(b"to rustcrypto").unwrap();
        let ct = e.finish().unwrap();
        let pt = other
            .decrypt(rsa::Oaep::new_with_label::<sha2::Sha256, _>("label"), &ct)
            .unwrap();
        assert_eq!(pt, b"to rustcrypto");
        // SHA-1 OAEP without label.
        let ct = public
            .encrypt(&mut rng, rsa::Oaep::new::<sha1::Sha1>(), b"sha1")
            .unwrap();
        let m1 = Mechanism::RsaOaep(OaepParams {
            hash: HashAlg::Sha1,
            mgf: HashAlg::Sha1,
            label: vec![],
        });
        let mut d = CipherOp::new(m1, CipherKey::Asym(k.clone()), false).unwrap();
        d.update(&ct).unwrap();
        assert_eq!(&d.finish().unwrap()[..], b"sha1");
        // PKCS#1 v1.5.
        let ct = public
            .encrypt(&mut rng, rsa::Pkcs1v15Encrypt, b"pms")
            .unwrap();
        let mut d = CipherOp::new(Mechanism::RsaPkcs, CipherKey::Asym(k.clone()), false).unwrap();
        d.update(&ct).unwrap();
        assert_eq!(&d.finish().unwrap()[..], b"pms");
        let mut bad = ct.clone();
        bad[5] ^= 0xff;
        let mut d = CipherOp::new(Mechanism::RsaPkcs, CipherKey::Asym(k.clone()), false).unwrap();
        d.update(&bad).unwrap();
        // Implicit rejection: a garbled ciphertext decrypts to a synthetic message, no error.
        assert_ne!(&d.finish().unwrap()[..], b"pms");
    }

    #[test]
    fn ecdsa_raw_and_hashed_verify_with_rustcrypto() {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let der = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let k = Arc::new(AsymKey::from_pkcs8(&der).unwrap());
        let point = match &k.info.parts {
            PublicParts::Ec { point, curve } => {
                assert_eq!(curve.field_len(), 32);
                point.clone()
            }
            _ => panic!("not EC"),
        };
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
        let hash = HashAlg::Sha256.digest(b"hello");
        let sig = sign(Mechanism::Ecdsa, &k, &[&hash]).unwrap();
        assert_eq!(sig.len(), 64);
        let s = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        vk.verify_prehash(&hash, &s).unwrap();
        let sig = sign(Mechanism::EcdsaHash(HashAlg::Sha256), &k, &[b"hel", b"lo"]).unwrap();
        let s = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        vk.verify_prehash(&hash, &s).unwrap();
        let mut v = VerifyOp::new(Mechanism::Ecdsa, k.clone()).unwrap();
        v.update(&hash).unwrap();
        v.finish(&sig).unwrap();
        let mut v = VerifyOp::new(Mechanism::Ecdsa, k.clone()).unwrap();
        v.update(&HashAlg::Sha256.digest(b"other")).unwrap();
        assert_eq!(v.finish(&sig).unwrap_err().rv(), CKR_SIGNATURE_INVALID);
        assert_eq!(
            SignOp::new(Mechanism::RsaPkcs, k.clone())
                .err()
                .unwrap()
                .rv(),
            CKR_KEY_TYPE_INCONSISTENT
        );
    }

    /// A fresh EC key of `alg`'s curve and its uncompressed public point.
    pub fn ec_key_and_point(
        alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
    ) -> (Arc<AsymKey>, Vec<u8>) {
        let k = Arc::new(AsymKey::from_pkcs8(&ec_pkcs8(alg)).unwrap());
        let PublicParts::Ec { point, .. } = &k.info.parts else {
            panic!("not EC")
        };
        let point = point.clone();
        (k, point)
    }

    #[test]
    fn ecdsa_p384_verifies_with_rustcrypto() {
        use p384::ecdsa::signature::hazmat::PrehashVerifier;
        let (k, point) = ec_key_and_point(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING);
        let vk = p384::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
        let sig = sign(Mechanism::EcdsaHash(HashAlg::Sha384), &k, &[b"data"]).unwrap();
        assert_eq!(sig.len(), 96);
        let s = p384::ecdsa::Signature::from_slice(&sig).unwrap();
        vk.verify_prehash(&HashAlg::Sha384.digest(b"data"), &s)
            .unwrap();
    }

    #[test]
    fn ecdsa_p521_round_trips_and_spki_parses() {
        let der = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED_SIGNING);
        let k = Arc::new(AsymKey::from_pkcs8(&der).unwrap());
        let sig = sign(Mechanism::EcdsaHash(HashAlg::Sha512), &k, &[b"x"]).unwrap();
        assert_eq!(sig.len(), 132);
        // Verify through aws-lc-rs' own (independent of our raw path) fixed-format verifier.
        let PublicParts::Ec { point, .. } = &k.info.parts else {
            panic!("not EC")
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P521_SHA512_FIXED,
            point,
        )
        .verify(b"x", &sig)
        .unwrap();
        let pubk = Arc::new(AsymKey::from_spki(&k.info.spki_der).unwrap());
        assert_eq!(pubk.info, k.info);
        let mut v = VerifyOp::new(Mechanism::EcdsaHash(HashAlg::Sha512), pubk).unwrap();
        v.update(b"x").unwrap();
        v.finish(&sig).unwrap();
    }

    /// The registry decides: a cipher mechanism with the wrong key type is inconsistent with
    /// the key; a mechanism that is no cipher at all is invalid for encrypt / decrypt.
    #[test]
    fn cipher_init_checks_the_key_type_from_the_registry() {
        let (rsa, _) = rsa_key();
        let aes = Arc::new(SecretBytes::from_slice(&[7; 16]));
        let gcm = Mechanism::AesGcm(super::super::GcmParams {
            iv: vec![0; 12],
            aad: vec![],
            tag_bits: 128,
        });
        let rv = |m: Mechanism, key: CipherKey| {
            CipherOp::new(m, key, true).map(|_| ()).unwrap_err().rv()
        };
        assert_eq!(
            rv(gcm.clone(), CipherKey::Asym(rsa.clone())),
            CKR_KEY_TYPE_INCONSISTENT
        );
        assert_eq!(
            rv(Mechanism::AesCbcPad([0; 16]), CipherKey::Asym(rsa.clone())),
            CKR_KEY_TYPE_INCONSISTENT
        );
        assert_eq!(
            rv(Mechanism::RsaPkcs, CipherKey::Secret(aes.clone())),
            CKR_KEY_TYPE_INCONSISTENT
        );
        assert_eq!(
            rv(
                Mechanism::RsaPkcsHash(HashAlg::Sha256),
                CipherKey::Secret(aes.clone())
            ),
            CKR_MECHANISM_INVALID
        );
        assert_eq!(
            rv(
                Mechanism::Digest(HashAlg::Sha256),
                CipherKey::Secret(aes.clone())
            ),
            CKR_MECHANISM_INVALID
        );
        assert_eq!(
            rv(Mechanism::Ecdsa, CipherKey::Asym(rsa)),
            CKR_MECHANISM_INVALID
        );
        // Both AES modes still start with an AES key: GCM collects, CBC-PAD streams.
        let mut g = CipherOp::new(gcm, CipherKey::Secret(aes.clone()), true).unwrap();
        assert_eq!(g.single(b"sixteen byte msg").unwrap().len(), 16 + 16);
        let mut c =
            CipherOp::new(Mechanism::AesCbcPad([0; 16]), CipherKey::Secret(aes), true).unwrap();
        assert_eq!(c.update(b"sixteen byte msg").unwrap().len(), 16);
        assert_eq!(c.finish().unwrap().len(), 16);
    }
}

#[cfg(test)]
mod every_hash {
    use super::tests::{ec_key_and_point, rsa_pkcs8};
    use super::*;
    use crate::crypto::{OaepParams, PssParams};
    use rsa::pkcs8::DecodePrivateKey;

    fn rsa() -> (Arc<AsymKey>, rsa::RsaPrivateKey) {
        (
            Arc::new(AsymKey::from_pkcs8(rsa_pkcs8()).unwrap()),
            rsa::RsaPrivateKey::from_pkcs8_der(rsa_pkcs8()).unwrap(),
        )
    }

    fn pss_scheme(h: HashAlg, salt: usize) -> rsa::Pss {
        match h {
            HashAlg::Sha1 => rsa::Pss::new_with_salt::<sha1::Sha1>(salt),
            HashAlg::Sha224 => rsa::Pss::new_with_salt::<sha2::Sha224>(salt),
            HashAlg::Sha256 => rsa::Pss::new_with_salt::<sha2::Sha256>(salt),
            HashAlg::Sha384 => rsa::Pss::new_with_salt::<sha2::Sha384>(salt),
            HashAlg::Sha512 => rsa::Pss::new_with_salt::<sha2::Sha512>(salt),
        }
    }

    fn oaep_scheme(h: HashAlg) -> rsa::Oaep {
        match h {
            HashAlg::Sha1 => rsa::Oaep::new_with_label::<sha1::Sha1, _>("L"),
            HashAlg::Sha224 => rsa::Oaep::new_with_label::<sha2::Sha224, _>("L"),
            HashAlg::Sha256 => rsa::Oaep::new_with_label::<sha2::Sha256, _>("L"),
            HashAlg::Sha384 => rsa::Oaep::new_with_label::<sha2::Sha384, _>("L"),
            HashAlg::Sha512 => rsa::Oaep::new_with_label::<sha2::Sha512, _>("L"),
        }
    }

    #[test]
    fn rsa_pss_hashed_with_every_hash_verifies_with_rustcrypto() {
        let (k, other) = rsa();
        let public = other.to_public_key();
        for h in HashAlg::ALL {
            let p = PssParams {
                hash: h,
                mgf: h,
                salt_len: h.output_len(),
            };
            let mut op = SignOp::new(Mechanism::RsaPssHash(p), k.clone()).unwrap();
            op.update(b"every ").unwrap();
            op.update(b"hash").unwrap();
            let sig = op.finish().unwrap();
            public
                .verify(
                    pss_scheme(h, h.output_len()),
                    &h.digest(b"every hash"),
                    &sig,
                )
                .unwrap_or_else(|e| panic!("{h:?}: {e}"));
        }
    }

    #[test]
    fn rsa_oaep_with_every_hash_round_trips_with_rustcrypto() {
        let (k, other) = rsa();
        let public = other.to_public_key();
        for h in HashAlg::ALL {
            let m = Mechanism::RsaOaep(OaepParams {
                hash: h,
                mgf: h,
                label: b"L".to_vec(),
            });
            let ct = public
                .encrypt(&mut rand::thread_rng(), oaep_scheme(h), b"oaep")
                .unwrap();
            let mut d = CipherOp::new(m.clone(), CipherKey::Asym(k.clone()), false).unwrap();
            d.update(&ct).unwrap();
            assert_eq!(&d.finish().unwrap()[..], b"oaep", "{h:?}");
            let mut e = CipherOp::new(m, CipherKey::Asym(k.clone()), true).unwrap();
            e.update(b"back").unwrap();
            let ct = e.finish().unwrap();
            assert_eq!(
                other.decrypt(oaep_scheme(h), &ct).unwrap(),
                b"back",
                "{h:?}"
            );
        }
    }

    #[test]
    fn ecdsa_hashed_with_every_hash_verifies_with_rustcrypto() {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let (k, point) = ec_key_and_point(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
        for h in HashAlg::ALL {
            let mut op = SignOp::new(Mechanism::EcdsaHash(h), k.clone()).unwrap();
            op.update(b"ec").unwrap();
            op.update(b"dsa").unwrap();
            let sig = op.finish().unwrap();
            vk.verify_prehash(
                &h.digest(b"ecdsa"),
                &p256::ecdsa::Signature::from_slice(&sig).unwrap(),
            )
            .unwrap_or_else(|e| panic!("{h:?}: {e}"));
        }
    }
}
