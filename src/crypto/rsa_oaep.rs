//! The transfer key's RSA: a key pair that only RSA-OAEP decrypts (empty label, MGF1 with the
//! OAEP hash: skr-protocol §3.3), whose plaintext (an AES KEK) goes straight into locked
//! memory. The release path holds one per login; dropping it frees the aws-lc key, whose
//! allocator cleanses freed memory.

use super::HashAlg;
use crate::secret::SecretBytes;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1,
    OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384,
};

/// OAEP hash (MGF1 uses the same hash, label empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OaepHash {
    Sha1,
    Sha256,
    Sha384,
}

pub struct OaepDecryptKey {
    key: OaepPrivateDecryptingKey,
    /// Big-endian modulus and public exponent without leading zero bytes.
    n: Vec<u8>,
    e: Vec<u8>,
}

impl OaepDecryptKey {
    /// A fresh RSA-2048 key pair; None when the random source or aws-lc is not usable.
    pub fn generate_2048() -> Option<Self> {
        Self::from_key(PrivateDecryptingKey::generate(KeySize::Rsa2048).ok()?).ok()
    }

    /// From a PKCS#8 RSA private key (tests and known-answer vectors).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let key = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|e| format!("not a PKCS#8 RSA private key ({e})"))?;
        Self::from_key(key)
    }

    fn from_key(key: PrivateDecryptingKey) -> Result<Self, String> {
        use aws_lc_rs::encoding::AsDer;
        let fail = || "cannot read the public key".to_string();
        let spki = key.public_key().as_der().map_err(|_| fail())?;
        let public = aws_lc_rs::rsa::PublicKey::from_der(spki.as_ref()).map_err(|_| fail())?;
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        let key = OaepPrivateDecryptingKey::new(key).map_err(|_| fail())?;
        Ok(OaepDecryptKey { key, n, e })
    }

    pub fn modulus(&self) -> &[u8] {
        &self.n
    }
    pub fn exponent(&self) -> &[u8] {
        &self.e
    }
    /// Modulus length in bytes: the length of an OAEP block.
    pub fn modulus_len(&self) -> usize {
        self.key.key_size_bytes()
    }

    /// RSA-OAEP decrypt into locked memory; None when `ciphertext` was not encrypted to this
    /// key with this hash (or is malformed).
    pub fn decrypt(&self, hash: OaepHash, ciphertext: &[u8]) -> Option<SecretBytes> {
        let alg = match hash {
            OaepHash::Sha1 => &OAEP_SHA1_MGF1SHA1,
            OaepHash::Sha256 => &OAEP_SHA256_MGF1SHA256,
            OaepHash::Sha384 => &OAEP_SHA384_MGF1SHA384,
        };
        let mut out = SecretBytes::zeroed(self.key.min_output_size());
        let len = self
            .key
            .decrypt(alg, ciphertext, out.as_mut_slice(), None)
            .ok()?
            .len();
        Some(SecretBytes::from_slice(&out.as_slice()[..len]))
    }
}

/// SHA-256 (RFC 7638 thumbprints of the transfer key).
pub fn sha256(data: &[u8]) -> Vec<u8> {
    HashAlg::Sha256.digest(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::DecodePrivateKey;

    /// Each OAEP hash decrypts what RustCrypto's `rsa` encrypts to the key; the wrong hash
    /// fails.
    #[test]
    fn oaep_decrypts_what_rustcrypto_encrypts_with_each_hash() {
        let der = crate::crypto::ops::tests::rsa_pkcs8();
        let k = OaepDecryptKey::from_pkcs8(der).unwrap();
        let other = rsa::RsaPrivateKey::from_pkcs8_der(der)
            .unwrap()
            .to_public_key();
        assert_eq!(k.modulus_len(), 256);
        assert_eq!(k.exponent(), &[1, 0, 1]);
        let mut rng = rand::thread_rng();
        let cases = [
            (OaepHash::Sha1, rsa::Oaep::new::<sha1::Sha1>()),
            (OaepHash::Sha256, rsa::Oaep::new::<sha2::Sha256>()),
            (OaepHash::Sha384, rsa::Oaep::new::<sha2::Sha384>()),
        ];
        for (hash, scheme) in cases {
            let ct = other.encrypt(&mut rng, scheme, &[9u8; 32]).unwrap();
            assert_eq!(k.decrypt(hash, &ct).unwrap().as_slice(), &[9u8; 32]);
            let wrong = if hash == OaepHash::Sha1 {
                OaepHash::Sha256
            } else {
                OaepHash::Sha1
            };
            assert!(k.decrypt(wrong, &ct).is_none(), "{hash:?}");
        }
        let fresh = OaepDecryptKey::generate_2048().unwrap();
        assert_eq!(fresh.modulus_len(), 256);
        assert_ne!(fresh.modulus(), k.modulus());
    }
}
