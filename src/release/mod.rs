//! The login path: transfer key, evidence, MAA, identity, AKV release, unwrap.
//! The only part of the module that does network or device I/O.
//!
//! Contract with the rest of the module: `release_token` takes the configuration and one
//! token's config and returns the released private key material of every key of that token
//! (checked against the public key from `GET {kid}`), or one `Error` naming the failing step.

pub mod http;
pub mod jws;
pub mod transfer_key;
pub mod unwrap;

use crate::config::{Config, TokenConfig};
use crate::error::Result;
use crate::secret::SecretBytes;
use base64::Engine;
use std::time::Duration;

/// Unpadded base64url (RFC 4648 §5), the encoding of JOSE and of every Azure SKR field.
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// base64url, padded or not. A decoder must keep trailing zero bytes (skr-protocol §3.3 step 1).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim().trim_end_matches('='))
        .ok()
}

/// Released material of one configured key.
#[derive(Debug)]
pub struct ReleasedKey {
    /// Index of the key in `TokenConfig::keys`.
    pub index: usize,
    pub material: KeyMaterial,
}

#[derive(Debug)]
pub enum KeyMaterial {
    /// PKCS#8 `PrivateKeyInfo` DER of an RSA or EC private key.
    Pkcs8(SecretBytes),
    /// Raw symmetric key bytes (oct / oct-HSM).
    Raw(SecretBytes),
}

/// Module-side time spent in each step of one login (for the benchmark's breakdown).
#[derive(Debug, Default, Clone)]
pub struct LoginTimings {
    pub transfer_key: Duration,
    pub evidence: Duration,
    pub attestation: Duration,
    pub identity: Duration,
    pub release: Duration,
    pub unwrap: Duration,
}

/// Run the whole release for one token.
pub fn release_token(
    _cfg: &Config,
    _token: &TokenConfig,
) -> Result<(Vec<ReleasedKey>, LoginTimings)> {
    Err(crate::error::Error::general("release path not built yet"))
}
