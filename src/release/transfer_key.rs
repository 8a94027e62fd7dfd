//! The transfer key: the RSA key pair AKV wraps the released key to (skr-protocol §4).
//!
//! `TransferKey` is the seam between where the private key lives and the rest of the login
//! path. The software key lives in process memory (SEV-SNP device path). An Azure CVM key lives
//! in the vTPM (`TpmEphemeralEncryptionKey`, fixed kid, OAEP decrypt by `TPM2_RSA_Decrypt`): it
//! implements the same trait, so evidence, MAA and unwrap code do not change.

use super::b64url;
use crate::crypto::rsa_oaep::OaepDecryptKey;
pub use crate::crypto::rsa_oaep::OaepHash;
use crate::error::{Error, Result, Step};
use crate::secret::SecretBytes;
use serde_json::{json, Value};

/// The public half as it goes into the runtime data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaPublicJwk {
    pub kid: String,
    /// Big-endian modulus without leading zero bytes.
    pub n: Vec<u8>,
    /// Big-endian public exponent without leading zero bytes.
    pub e: Vec<u8>,
}

impl RsaPublicJwk {
    /// `{"kid","key_ops":["encrypt"],"kty":"RSA","e","n"}` with unpadded base64url numbers.
    pub fn to_json(&self) -> Value {
        json!({
            "kid": self.kid,
            "key_ops": ["encrypt"],
            "kty": "RSA",
            "e": b64url(&self.e),
            "n": b64url(&self.n),
        })
    }

    /// The runtime data bytes: `{"keys":[jwk]}`. These exact bytes are hashed into REPORT_DATA
    /// and sent to MAA, so they are produced once and passed around as bytes.
    pub fn jwks_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": [self.to_json()] })).expect("JSON of strings")
    }
}

/// RFC 7638 JWK thumbprint of an RSA key: SHA-256 over the canonical `{"e","kty","n"}` JSON.
pub fn rsa_thumbprint(n: &[u8], e: &[u8]) -> String {
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        b64url(strip_leading_zeros(e)),
        b64url(strip_leading_zeros(n))
    );
    b64url(&crate::crypto::rsa_oaep::sha256(canonical.as_bytes()))
}

pub fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// A key AKV can wrap to, held wherever the platform keeps it.
pub trait TransferKey: Send + Sync {
    /// The public JWK (its `kid` selects this key in `key_hsm.header.kid`).
    fn public_jwk(&self) -> &RsaPublicJwk;
    /// Modulus length in bytes: the length of the OAEP block at the start of the ciphertext.
    fn modulus_len(&self) -> usize;
    /// RSA-OAEP decrypt with an empty label; the plaintext (an AES KEK) goes straight into
    /// locked memory.
    fn decrypt_oaep(&self, hash: OaepHash, ciphertext: &[u8]) -> Result<SecretBytes>;
}

/// An RSA-2048 key pair generated in process memory by aws-lc (`crypto::rsa_oaep`). Dropping it
/// frees the aws-lc key, whose allocator cleanses freed memory, so the private key is wiped when
/// the login ends.
pub struct SoftwareTransferKey {
    key: OaepDecryptKey,
    jwk: RsaPublicJwk,
}

impl SoftwareTransferKey {
    pub fn generate() -> Result<Self> {
        let key = OaepDecryptKey::generate_2048().ok_or_else(|| {
            Error::evidence(Step::TransferKey, "RSA-2048 key generation failed")
                .with_hint("the system random source or aws-lc is not usable in this process")
        })?;
        Ok(Self::from_key(key))
    }

    /// A transfer key from an existing PKCS#8 RSA private key (tests and known-answer vectors).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self> {
        let key = OaepDecryptKey::from_pkcs8(der).map_err(|e| {
            Error::general(format!("transfer key: {e}")).with_step(Step::TransferKey)
        })?;
        Ok(Self::from_key(key))
    }

    fn from_key(key: OaepDecryptKey) -> Self {
        let (n, e) = (key.modulus().to_vec(), key.exponent().to_vec());
        let kid = rsa_thumbprint(&n, &e);
        SoftwareTransferKey {
            key,
            jwk: RsaPublicJwk { kid, n, e },
        }
    }
}

impl TransferKey for SoftwareTransferKey {
    fn public_jwk(&self) -> &RsaPublicJwk {
        &self.jwk
    }

    fn modulus_len(&self) -> usize {
        self.key.modulus_len()
    }

    fn decrypt_oaep(&self, hash: OaepHash, ciphertext: &[u8]) -> Result<SecretBytes> {
        self.key.decrypt(hash, ciphertext).ok_or_else(|| {
            Error::integrity(
                Step::Unwrap,
                format!(
                    "RSA-OAEP ({hash:?}) decryption of the wrapped key failed: it was not encrypted to this login's transfer key with this hash"
                ),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_has_rfc7638_kid_and_encrypt_jwk() {
        let k = SoftwareTransferKey::generate().unwrap();
        let jwk = k.public_jwk();
        assert_eq!(k.modulus_len(), 256);
        assert_eq!(jwk.n.len(), 256);
        assert_eq!(jwk.e, vec![1, 0, 1]);
        assert_eq!(jwk.kid, rsa_thumbprint(&jwk.n, &jwk.e));
        let v: Value = serde_json::from_slice(&jwk.jwks_bytes()).unwrap();
        let key = &v["keys"][0];
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
        assert_eq!(key["kty"], "RSA");
        assert_eq!(key["e"], "AQAB");
        assert_eq!(key["key_ops"], json!(["encrypt"]));
        assert!(!key["n"].as_str().unwrap().contains('='));
        // Two logins never share a key.
        let other = SoftwareTransferKey::generate().unwrap();
        assert_ne!(other.public_jwk().kid, jwk.kid);
    }

    /// RustCrypto's `rsa` (not the engine) encrypts to the key the public JWK describes, so
    /// the JWK is the key's own; the wrong hash is a general error. (Every hash against
    /// RustCrypto: `crypto::rsa_oaep` tests.)
    #[test]
    fn decrypts_what_is_encrypted_to_its_jwk_and_wrong_hash_fails() {
        let k = SoftwareTransferKey::generate().unwrap();
        let jwk = k.public_jwk();
        let n = rsa::BigUint::from_bytes_be(&jwk.n);
        let public = rsa::RsaPublicKey::new(n, rsa::BigUint::from_bytes_be(&jwk.e)).unwrap();
        let oaep = rsa::Oaep::new::<sha2::Sha256>();
        let ct = public
            .encrypt(&mut rand::thread_rng(), oaep, &[9u8; 32])
            .unwrap();
        let kek = k.decrypt_oaep(OaepHash::Sha256, &ct).unwrap();
        assert_eq!(kek.as_slice(), &[9u8; 32]);
        let e = k.decrypt_oaep(OaepHash::Sha1, &ct).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
    }
}
