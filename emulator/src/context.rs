//! The running emulator's shared state (`App`): layout, URLs, PKI, the simulated platform,
//! the key store, admin counters and faults, and the outbound HTTP client. Every service
//! module receives it; it imports no service (the layers are listed in main.rs).

use crate::admin::Admin;
use crate::keystore::KeysFile;
use crate::snp::PlatformConfig;
use crate::state::{self, Layout, Pki};
use crate::util::pem_encode;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use x509_cert::Certificate;

#[derive(Debug, Clone)]
pub struct Urls {
    pub maa: String,
    pub vault: String,
    pub mhsm: String,
    pub imds: String,
    pub platform: String,
}

pub struct App {
    pub layout: Layout,
    pub urls: Urls,
    pub pki: Pki,
    /// The simulated guest; `PUT /admin/platform` changes it at run time.
    platform: std::sync::RwLock<PlatformConfig>,
    /// The VCEK certificate for the current TCB and chip id.
    vcek_der: std::sync::RwLock<Vec<u8>>,
    pub keys: Mutex<KeysFile>,
    pub admin: Admin,
    pub trusted_arks: Vec<(String, Certificate)>,
    /// The simulated Azure vTPM CA (a CVM platform only): MAA's AzureGuest trusts AK
    /// certificates it issued.
    pub vtpm_ca: std::sync::OnceLock<Certificate>,
    /// The simulated TDX platform's keys (`--platform cvm-tdx` only): IMDS quotes TDREPOTs
    /// with them, MAA trusts their quoting key.
    pub tdx: std::sync::OnceLock<std::sync::Arc<crate::tdx::TdxKeys>>,
    /// Secret for the `IDENTITY_ENDPOINT` emulation (`DIR/identity/identity-header`).
    identity_header: String,
    http: reqwest::Client,
    jwks_cache: tokio::sync::Mutex<HashMap<String, (Instant, Vec<Value>)>>,
}

const JWKS_CACHE_TTL: Duration = Duration::from_secs(600);

/// What `App::new` needs besides the values it derives.
pub struct AppParts {
    pub layout: Layout,
    pub urls: Urls,
    pub pki: Pki,
    pub platform: PlatformConfig,
    pub keys: KeysFile,
    pub admin: Admin,
    pub trusted_arks: Vec<(String, Certificate)>,
    pub identity_header: String,
    pub http: reqwest::Client,
}

impl App {
    pub fn new(parts: AppParts) -> App {
        App {
            vcek_der: std::sync::RwLock::new(parts.pki.vcek_der.clone()),
            layout: parts.layout,
            urls: parts.urls,
            pki: parts.pki,
            platform: std::sync::RwLock::new(parts.platform),
            keys: Mutex::new(parts.keys),
            admin: parts.admin,
            trusted_arks: parts.trusted_arks,
            vtpm_ca: std::sync::OnceLock::new(),
            tdx: std::sync::OnceLock::new(),
            identity_header: parts.identity_header,
            http: parts.http,
            jwks_cache: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn persist_keys(&self, keys: &KeysFile) -> Result<(), String> {
        state::write_json(&self.layout.keys_file(), keys)
    }

    pub fn identity_header(&self) -> String {
        self.identity_header.clone()
    }

    pub fn platform(&self) -> PlatformConfig {
        self.platform
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn vcek_der(&self) -> Vec<u8> {
        self.vcek_der
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Replaces the simulated guest and its VCEK (`PUT /admin/platform`).
    pub fn set_platform(&self, platform: PlatformConfig, vcek_der: Vec<u8>) -> Result<(), String> {
        *self.platform.write().map_err(|_| "platform lock")? = platform;
        *self.vcek_der.write().map_err(|_| "VCEK lock")? = vcek_der;
        Ok(())
    }

    /// VCEK, ASK, ARK as PEM: MAA's `VcekCertChain`.
    pub fn vcek_chain_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.vcek_der()) + &self.pki.thim_chain_pem()
    }

    /// IMDS THIM response for the simulated host.
    pub fn thim_json(&self) -> Value {
        let tcbm = u64::from_le_bytes(self.platform().tcb_bytes());
        json!({
            "vcekCert": pem_encode("CERTIFICATE", &self.vcek_der()),
            "tcbm": format!("{tcbm:016X}"),
            "certificateChain": self.pki.thim_chain_pem(),
            "cacheControl": "86400",
        })
    }

    /// An OpenID issuer's signing keys (its openid-configuration, then its JWKS), cached for
    /// ten minutes; `refresh` skips the cache (a `kid` the cached set does not know).
    pub async fn issuer_keys(&self, issuer: &str, refresh: bool) -> Result<Vec<Value>, String> {
        let base = issuer.trim_end_matches('/').to_string();
        if !refresh {
            if let Some((at, keys)) = self.jwks_cache.lock().await.get(&base) {
                if at.elapsed() < JWKS_CACHE_TTL {
                    return Ok(keys.clone());
                }
            }
        }
        let config: Value = self
            .http
            .get(format!("{base}/.well-known/openid-configuration"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("cannot fetch {base}/.well-known/openid-configuration: {e}"))?
            .json()
            .await
            .map_err(|e| format!("openid-configuration of {base} is not JSON: {e}"))?;
        let jwks_uri = config
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or(format!("openid-configuration of {base} has no jwks_uri"))?;
        let jwks: Value = self
            .http
            .get(jwks_uri)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("cannot fetch {jwks_uri}: {e}"))?
            .json()
            .await
            .map_err(|e| format!("{jwks_uri} is not JSON: {e}"))?;
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .cloned()
            .ok_or(format!("{jwks_uri} has no keys"))?;
        self.jwks_cache
            .lock()
            .await
            .insert(base, (Instant::now(), keys.clone()));
        Ok(keys)
    }
}
