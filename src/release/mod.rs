//! The login path: transfer key, evidence, MAA, identity, AKV release, unwrap.
//! The only part of the module that does network or device I/O.
//!
//! Contract with the rest of the module: `release_token` takes the configuration and one
//! token's config and returns the released private key material of every key of that token
//! (checked against the public key from `GET {kid}`), or one `Error` naming the failing step.

use crate::config::{Config, TokenConfig};
use crate::error::Result;
use crate::secret::SecretBytes;
use std::time::Duration;

/// Released material of one configured key.
pub struct ReleasedKey {
    /// Index of the key in `TokenConfig::keys`.
    pub index: usize,
    pub material: KeyMaterial,
}

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
