//! The keys the emulated Key Vault and Managed HSM hold (`DIR/state/keys.json`): shared state,
//! below the services, so the running emulator's `App` can own it without importing the Key
//! Vault service.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Which of the two key services: Key Vault (Premium) or Managed HSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vault,
    Mhsm,
}

impl Kind {
    pub fn audience(self) -> &'static str {
        match self {
            Kind::Vault => "https://vault.azure.net",
            Kind::Mhsm => "https://managedhsm.azure.net",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vault => "vault",
            Kind::Mhsm => "mhsm",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPolicy {
    pub content_type: String,
    /// The normalised policy JSON.
    pub policy: Value,
    pub immutable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyVersion {
    pub version: String,
    pub kty: String,
    #[serde(default)]
    pub crv: Option<String>,
    /// PKCS#8 DER (RSA, EC) or raw bytes (oct), standard base64.
    pub material: String,
    pub key_ops: Vec<String>,
    pub enabled: bool,
    pub created: u64,
    pub updated: u64,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub exp: Option<u64>,
    pub exportable: bool,
    #[serde(default)]
    pub tags: Option<Map<String, Value>>,
    #[serde(default)]
    pub release_policy: Option<StoredPolicy>,
}

/// All versions of every key of one service; the last version is the current one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Store {
    pub keys: BTreeMap<String, Vec<KeyVersion>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    pub vault: Store,
    pub mhsm: Store,
}

impl KeysFile {
    pub fn store(&mut self, kind: Kind) -> &mut Store {
        match kind {
            Kind::Vault => &mut self.vault,
            Kind::Mhsm => &mut self.mhsm,
        }
    }
}

// ---- errors --------------------------------------------------------------------------------
