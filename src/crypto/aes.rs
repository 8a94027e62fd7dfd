//! AES-GCM (one shot over the whole message: GCM decryption must see the tag before releasing
//! plaintext, so multipart calls collect their input; any IV length, tags of 96..128 bits) and AES-CBC with PKCS#7 padding
//! (streaming, the cipher context lives in AWS-LC memory, i.e. the locked arena).

use super::mechanism::SecretCipher;
use super::GcmParams;
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use aws_lc_rs::{aead, cipher, iv::FixedLength};
use cryptoki_sys::*;

/// The algorithm for an AES key of 16, 24 or 32 bytes, from `[aes128, aes192, aes256]`.
fn by_key_len<T: ?Sized>(key: &[u8], algs: [&'static T; 3]) -> Result<&'static T> {
    match key.len() {
        16 => Ok(algs[0]),
        24 => Ok(algs[1]),
        32 => Ok(algs[2]),
        n => Err(Error::new(
            CKR_KEY_SIZE_RANGE,
            format!("AES key of {n} bytes"),
        )),
    }
}

fn cipher_alg(key: &[u8]) -> Result<&'static cipher::Algorithm> {
    by_key_len(key, [&cipher::AES_128, &cipher::AES_192, &cipher::AES_256])
}

fn gcm_alg(key: &[u8]) -> Result<&'static aead::Algorithm> {
    by_key_len(
        key,
        [&aead::AES_128_GCM, &aead::AES_192_GCM, &aead::AES_256_GCM],
    )
}

fn gcm_key(key: &[u8]) -> Result<aead::LessSafeKey> {
    let k = aead::UnboundKey::new(gcm_alg(key)?, key)
        .map_err(|_| Error::new(CKR_KEY_SIZE_RANGE, "bad AES key"))?;
    Ok(aead::LessSafeKey::new(k))
}

fn nonce(p: &GcmParams) -> Result<aead::Nonce> {
    aead::Nonce::try_assume_unique_for_key(&p.iv)
        .map_err(|_| Error::new(CKR_MECHANISM_PARAM_INVALID, "AES-GCM IV must be 12 bytes"))
}

/// aws-lc-rs' AEAD takes 12-byte IVs and 16-byte tags; other lengths use the raw cipher.
fn standard(p: &GcmParams) -> bool {
    p.iv.len() == 12 && p.tag_bits == 128
}

/// An AES-GCM key: plain bytes get a fresh key schedule and GHASH table per call; a token's
/// `SecretBytes` builds its expanded key on first use and keeps it with the key (AWS-LC
/// memory, the locked arena; dropped with the key), so a C_Encrypt does not pay for one.
pub trait GcmKey {
    fn bytes(&self) -> &[u8];
    fn with_key<R>(&self, f: impl FnOnce(&aead::LessSafeKey) -> Result<R>) -> Result<R>;
}

impl GcmKey for [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn with_key<R>(&self, f: impl FnOnce(&aead::LessSafeKey) -> Result<R>) -> Result<R> {
        f(&gcm_key(self)?)
    }
}

impl GcmKey for SecretBytes {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
    fn with_key<R>(&self, f: impl FnOnce(&aead::LessSafeKey) -> Result<R>) -> Result<R> {
        match self.derived(|k| gcm_key(k).ok()) {
            Some(k) => f(k),
            None => f(&gcm_key(self.as_slice())?),
        }
    }
}

/// Ciphertext ‖ tag, as PKCS#11 returns it.
pub fn gcm_seal<K: GcmKey + ?Sized>(key: &K, p: &GcmParams, pt: &[u8]) -> Result<Vec<u8>> {
    if !standard(p) {
        return super::pkey::aes_gcm_raw(true, key.bytes(), &p.iv, &p.aad, pt, p.tag_bits / 8)
            .map(|v| v.to_vec());
    }
    // Room for the tag from the start: appending it must not reallocate and copy again.
    let mut buf = Vec::with_capacity(pt.len() + 16);
    buf.extend_from_slice(pt);
    let tag = key.with_key(|k| {
        k.seal_in_place_separate_tag(nonce(p)?, aead::Aad::from(&p.aad[..]), &mut buf)
            .map_err(|_| Error::new(CKR_FUNCTION_FAILED, "AES-GCM seal failed"))
    })?;
    buf.extend_from_slice(tag.as_ref());
    Ok(buf)
}

/// Ciphertext ‖ tag written into `out` (at least `pt.len()` + tag bytes), returning the length
/// written: a single-part C_Encrypt with room seals straight into the caller's buffer. The
/// output is ciphertext, so there is no intermediate copy to wipe; on failure `out` is zeroed
/// (it briefly held the plaintext).
pub fn gcm_seal_into<K: GcmKey + ?Sized>(
    key: &K,
    p: &GcmParams,
    pt: &[u8],
    out: &mut [u8],
) -> Result<usize> {
    let tag_len = p.tag_bits / 8;
    let n = pt.len();
    if out.len() < n + tag_len {
        return Err(Error::general(
            "AES-GCM output buffer shorter than announced",
        ));
    }
    if !standard(p) {
        let sealed = super::pkey::aes_gcm_raw(true, key.bytes(), &p.iv, &p.aad, pt, tag_len)?;
        out[..sealed.len()].copy_from_slice(&sealed);
        return Ok(sealed.len());
    }
    let (body, rest) = out.split_at_mut(n);
    body.copy_from_slice(pt);
    let sealed = key.with_key(|k| {
        let tag = k
            .seal_in_place_separate_tag(nonce(p)?, aead::Aad::from(&p.aad[..]), body)
            .map_err(|_| Error::new(CKR_FUNCTION_FAILED, "AES-GCM seal failed"))?;
        rest[..tag_len].copy_from_slice(tag.as_ref());
        Ok(n + tag_len)
    });
    if sealed.is_err() {
        crate::secret::wipe(&mut out[..n + tag_len]);
    }
    sealed
}

pub fn gcm_open<K: GcmKey + ?Sized>(key: &K, p: &GcmParams, ct: &[u8]) -> Result<Wiped> {
    if !standard(p) {
        return super::pkey::aes_gcm_raw(false, key.bytes(), &p.iv, &p.aad, ct, p.tag_bits / 8);
    }
    if ct.len() < 16 {
        return Err(Error::new(
            CKR_ENCRYPTED_DATA_LEN_RANGE,
            "AES-GCM input shorter than the tag",
        ));
    }
    let mut buf = Wiped::new(ct.to_vec());
    let n = key.with_key(|k| {
        k.open_in_place(nonce(p)?, aead::Aad::from(&p.aad[..]), &mut buf)
            .map(|pt| pt.len())
            .map_err(|_| Error::new(CKR_ENCRYPTED_DATA_INVALID, "AES-GCM tag mismatch"))
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Streaming AES-CBC-PAD encryption.
pub struct CbcEncrypt(Option<cipher::StreamingEncryptingKey>);
/// Streaming AES-CBC-PAD decryption.
pub struct CbcDecrypt(Option<cipher::StreamingDecryptingKey>);

fn unbound(key: &[u8]) -> Result<cipher::UnboundCipherKey> {
    cipher::UnboundCipherKey::new(cipher_alg(key)?, key)
        .map_err(|_| Error::new(CKR_KEY_SIZE_RANGE, "bad AES key"))
}

fn cbc_failed() -> Error {
    Error::new(CKR_FUNCTION_FAILED, "AES-CBC operation failed")
}

/// One step of a streaming key: `run` writes into a buffer of `len` bytes and says how many
/// it wrote. Wiped in both directions (a decryption's output is plaintext).
fn written(len: usize, run: impl FnOnce(&mut [u8]) -> Result<usize>) -> Result<Wiped> {
    let mut out = Wiped::new(vec![0u8; len]);
    let n = run(&mut out)?;
    out.truncate(n);
    Ok(out)
}

/// The CBC streams: the same steps over AWS-LC's encrypting and decrypting keys, which share
/// no trait; only how `finish` reports differs.
macro_rules! cbc_stream {
    ($($stream:ident: $context:ident, $key:ident::$make:ident => $finish:expr;)*) => {$(
        impl $stream {
            pub fn new(key: &[u8], iv: [u8; 16]) -> Result<$stream> {
                let ctx = cipher::$context::Iv128(FixedLength::from(iv));
                let k = cipher::$key::$make(unbound(key)?, ctx).map_err(|_| cbc_failed())?;
                Ok($stream(Some(k)))
            }
        }
        impl SecretCipher for $stream {
            fn update(&mut self, input: &[u8]) -> Result<Wiped> {
                let k = self.0.as_mut().ok_or_else(cbc_failed)?;
                written(input.len() + 16, |out| {
                    Ok(k.update(input, out).map_err(|_| cbc_failed())?.written().len())
                })
            }
            fn finish(&mut self) -> Result<Wiped> {
                let k = self.0.take().ok_or_else(cbc_failed)?;
                written(16, |out| $finish(k, out))
            }
        }
    )*};
}

cbc_stream! {
    CbcEncrypt: EncryptionContext, StreamingEncryptingKey::less_safe_cbc_pkcs7 =>
        |k: cipher::StreamingEncryptingKey, out: &mut [u8]| -> Result<usize> {
        Ok(k.finish(out).map_err(|_| cbc_failed())?.1.written().len())
    };
    CbcDecrypt: DecryptionContext, StreamingDecryptingKey::cbc_pkcs7 =>
        |k: cipher::StreamingDecryptingKey, out: &mut [u8]| -> Result<usize> {
        let bad = Error::new(CKR_ENCRYPTED_DATA_INVALID, "AES-CBC-PAD: bad padding or length");
        Ok(k.finish(out).map_err(|_| bad)?.written().len())
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit, Payload};

    /// Both directions against an independent AES-GCM (`other`: same key, IV and tag length):
    /// it opens what `gcm_seal` makes, `gcm_open` opens what it makes, and a flipped byte of
    /// the ciphertext (`tamper`, from the end when negative) fails.
    fn agrees_with<C: Aead>(
        other: &C,
        nonce: &aes_gcm::aead::Nonce<C>,
        key: &[u8],
        p: &GcmParams,
        tamper: isize,
    ) {
        let ct = gcm_seal(key, p, b"one way").unwrap();
        assert_eq!(ct.len(), 7 + p.tag_bits / 8);
        let aad = &p.aad[..];
        let pt = other.decrypt(nonce, Payload { msg: &ct, aad }).unwrap();
        assert_eq!(pt, b"one way");
        let msg = b"other way";
        let ct2 = other.encrypt(nonce, Payload { msg, aad }).unwrap();
        assert_eq!(&gcm_open(key, p, &ct2).unwrap()[..], b"other way");
        let mut bad = ct2.clone();
        let i = tamper.rem_euclid(bad.len() as isize) as usize;
        bad[i] ^= 1;
        assert_eq!(
            gcm_open(key, p, &bad).unwrap_err().rv(),
            CKR_ENCRYPTED_DATA_INVALID
        );
    }

    #[test]
    fn gcm_matches_rustcrypto() {
        let key = [7u8; 32];
        let p = GcmParams {
            iv: vec![9; 12],
            aad: b"header".to_vec(),
            tag_bits: 128,
        };
        let other = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
        let nonce = aes_gcm::Nonce::from([9u8; 12]);
        agrees_with(&other, &nonce, &key, &p, 0);
    }

    #[test]
    fn gcm_other_iv_and_tag_lengths_match_rustcrypto() {
        use aes_gcm::aead::consts::{U12, U16};
        type Gcm16Iv12Tag = aes_gcm::AesGcm<aes_gcm::aes::Aes256, U16, U12>;
        let key = [5u8; 32];
        let p = GcmParams {
            iv: vec![1; 16],
            aad: b"aad".to_vec(),
            tag_bits: 96,
        };
        let other = Gcm16Iv12Tag::new_from_slice(&key).unwrap();
        #[allow(deprecated)] // aes-gcm 0.10's nonce type
        let nonce = aes_gcm::aead::generic_array::GenericArray::from([1u8; 16]);
        agrees_with(&other, &nonce, &key, &p, -1);
        // The standard sizes agree between both paths.
        let std = GcmParams {
            iv: vec![2; 12],
            aad: vec![],
            tag_bits: 128,
        };
        let a = gcm_seal(&key[..], &std, b"same").unwrap();
        let b = crate::crypto::pkey::aes_gcm_raw(true, &key, &std.iv, &[], b"same", 16).unwrap();
        assert_eq!(a, b.to_vec());
    }

    #[test]
    fn a_token_key_builds_its_expanded_gcm_key_once_and_a_changed_key_builds_a_new_one() {
        let p = GcmParams {
            iv: vec![9; 12],
            aad: b"aad".to_vec(),
            tag_bits: 128,
        };
        let mut key = SecretBytes::in_arena_from(&[7u8; 32]);
        let built = |k: &SecretBytes| {
            k.derived::<aead::LessSafeKey>(|_| None)
                .map(|e| e as *const aead::LessSafeKey)
        };
        assert_eq!(built(&key), None, "nothing is built before the first use");
        let sealed = gcm_seal(&key, &p, b"cached").unwrap();
        let first = built(&key).expect("the first seal keeps the expanded key");
        // The same answers as a fresh key schedule, from the same cached key.
        assert_eq!(sealed, gcm_seal(&[7u8; 32][..], &p, b"cached").unwrap());
        let mut out = vec![0u8; 6 + 16];
        assert_eq!(gcm_seal_into(&key, &p, b"cached", &mut out).unwrap(), 22);
        assert_eq!(out, sealed);
        assert_eq!(&gcm_open(&key, &p, &sealed).unwrap()[..], b"cached");
        assert_eq!(built(&key), Some(first), "built once, reused");
        // New bytes: the old expanded key is gone and the next use builds one for them.
        key.as_mut_slice().copy_from_slice(&[8u8; 32]);
        assert_eq!(built(&key), None);
        assert_eq!(
            gcm_seal(&key, &p, b"cached").unwrap(),
            gcm_seal(&[8u8; 32][..], &p, b"cached").unwrap()
        );
    }

    /// Independent AES-256-CBC decryption (no padding removed): CBC by hand over RustCrypto's
    /// AES block cipher.
    pub fn cbc_decrypt_by_hand(key: &[u8], iv: [u8; 16], ct: &[u8]) -> Vec<u8> {
        use aes_gcm::aes::cipher::{BlockDecrypt, KeyInit as _};
        let c = aes_gcm::aes::Aes256::new_from_slice(key).unwrap();
        let mut prev = iv;
        let mut plain = vec![];
        for block in ct.chunks(16) {
            let mut b = aes_gcm::aes::Block::from(<[u8; 16]>::try_from(block).unwrap());
            c.decrypt_block(&mut b);
            plain.extend(b.iter().zip(prev.iter()).map(|(x, y)| x ^ y));
            prev.copy_from_slice(block);
        }
        plain
    }

    #[test]
    fn cbc_pad_streams_and_round_trips() {
        let (key, iv, msg) = ([3u8; 32], [5u8; 16], (0..100u8).collect::<Vec<u8>>());
        let mut e = CbcEncrypt::new(&key, iv).unwrap();
        let mut ct = e.update(&msg[..7]).unwrap().to_vec();
        ct.extend(e.update(&msg[7..50]).unwrap().iter());
        ct.extend(e.update(&msg[50..]).unwrap().iter());
        ct.extend(e.finish().unwrap().iter());
        assert_eq!(ct.len(), 112);
        let plain = cbc_decrypt_by_hand(&key, iv, &ct);
        assert_eq!(&plain[..100], &msg[..]);
        assert_eq!(&plain[100..], &[12u8; 12], "PKCS#7 padding");
        let mut d = CbcDecrypt::new(&key, iv).unwrap();
        let mut pt = d.update(&ct[..33]).unwrap().to_vec();
        pt.extend(d.update(&ct[33..]).unwrap().iter());
        pt.extend(d.finish().unwrap().iter());
        assert_eq!(pt, msg);
        let mut bad = ct.clone();
        let n = bad.len();
        bad[n - 1] ^= 0x55;
        let mut d = CbcDecrypt::new(&key, iv).unwrap();
        let _ = d.update(&bad).unwrap();
        assert_eq!(d.finish().unwrap_err().rv(), CKR_ENCRYPTED_DATA_INVALID);
    }
}
