//! What a release hands the token: the key material of each configured key. The release path
//! (`release`) produces these; the token parses and installs them and never imports from
//! `release`.

use crate::secret::SecretBytes;

/// Released material of one configured key.
#[derive(Debug)]
pub struct ReleasedKey {
    /// Index of the key in `TokenConfig::keys`.
    pub index: usize,
    pub material: KeyMaterial,
    /// The key version that was released (the last segment of its versioned kid).
    pub version: String,
}

#[derive(Debug)]
pub enum KeyMaterial {
    /// PKCS#8 `PrivateKeyInfo` DER of an RSA or EC private key.
    Pkcs8(SecretBytes),
    /// Raw symmetric key bytes (oct / oct-HSM).
    Raw(SecretBytes),
}
