//! The state directory: generated PKI (CA, TLS, vault JWS chain, MAA and Entra signing keys,
//! simulated AMD chain), the simulated platform, ports and keys. Every file is written
//! atomically; a file that exists but does not parse stops the start with its path named and
//! is never overwritten.

use crate::pki::{self, PkiResult};
use crate::snp::PlatformConfig;
use crate::util::{b64std, write_atomic};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use x509_cert::Certificate;

#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: PathBuf) -> Self {
        Layout { dir }
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn pki_file(&self) -> PathBuf {
        self.state().join("pki.json")
    }
    pub fn platform_file(&self) -> PathBuf {
        self.state().join("platform.json")
    }
    pub fn ports_file(&self) -> PathBuf {
        self.state().join("ports.json")
    }
    pub fn keys_file(&self) -> PathBuf {
        self.state().join("keys.json")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("emulator.pid")
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("emulator.ready")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("emulator.log")
    }
    pub fn stderr_file(&self) -> PathBuf {
        self.dir.join("emulator.stderr")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("env")
    }
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("skr-pkcs11.toml")
    }
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }
    pub fn security_context_dir(&self) -> PathBuf {
        self.dir.join("security-context")
    }
}

/// Reads a JSON state file: Ok(None) when absent, an error naming the file when unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "state file {} is corrupt ({e}); fix or move it away (nothing was changed)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    write_atomic(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// On disk: every item base64 DER (keys PKCS#8).
#[derive(Serialize, Deserialize, Default)]
struct PkiFile {
    items: BTreeMap<String, String>,
}

pub struct Pki {
    pub ca_key: p256::ecdsa::SigningKey,
    pub ca_cert: Certificate,
    pub ca_der: Vec<u8>,
    pub tls_key_pkcs8: Vec<u8>,
    pub tls_cert_der: Vec<u8>,
    /// Vault / mHSM release JWS signer: RSA leaf, chain leaf → intermediate → CA.
    pub jws_key: rsa::RsaPrivateKey,
    pub jws_chain: Vec<Vec<u8>>,
    pub maa_key: rsa::RsaPrivateKey,
    pub maa_cert_der: Vec<u8>,
    pub entra_key: rsa::RsaPrivateKey,
    pub ark_der: Vec<u8>,
    pub ask_der: Vec<u8>,
    pub vcek_key: p384::ecdsa::SigningKey,
    pub vcek_der: Vec<u8>,
}

struct Items<'a>(&'a mut BTreeMap<String, String>, bool);

impl Items<'_> {
    fn get(&self, name: &str) -> PkiResult<Option<Vec<u8>>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(Some)
                .map_err(|e| format!("pki item {name}: {e}")),
        }
    }
    fn put(&mut self, name: &str, der: &[u8]) {
        self.0.insert(name.to_string(), b64std(der));
        self.1 = true;
    }
}

impl Pki {
    /// Loads `state/pki.json`, creating whatever is missing (first start: a few RSA keys,
    /// two of them 4096 bits for the simulated AMD roots, so it takes a few seconds).
    pub fn load_or_create(layout: &Layout, platform: &PlatformConfig) -> Result<Pki, String> {
        let path = layout.pki_file();
        let mut file: PkiFile = read_json(&path)?.unwrap_or_default();
        let mut items = Items(&mut file.items, false);
        let pki =
            Self::build(&mut items, platform).map_err(|e| format!("{}: {e}", path.display()))?;
        if items.1 {
            write_json(&path, &file)?;
        }
        Ok(pki)
    }

    fn build(items: &mut Items, platform: &PlatformConfig) -> PkiResult<Pki> {
        let (ca_key, ca_cert) = match (items.get("ca_key")?, items.get("ca_cert")?) {
            (Some(k), Some(c)) => (pki::p256_key(&k)?, pki::parse_cert(&c)?),
            _ => {
                let (key, der) = pki::new_p256()?;
                let cert = pki::issue_ca(&key)?;
                items.put("ca_key", &der);
                items.put("ca_cert", &pki::cert_der(&cert)?);
                (key, cert)
            }
        };
        let ca_der = pki::cert_der(&ca_cert)?;

        let (tls_key_pkcs8, tls_cert_der) = match (items.get("tls_key")?, items.get("tls_cert")?) {
            (Some(k), Some(c)) => (k, c),
            _ => {
                let (key, der) = pki::new_p256()?;
                let cert = pki::issue_server_leaf(
                    &ca_cert,
                    &ca_key,
                    "localhost",
                    pki::spki_of(key.verifying_key())?,
                    false,
                )?;
                let cert_der = pki::cert_der(&cert)?;
                items.put("tls_key", &der);
                items.put("tls_cert", &cert_der);
                (der, cert_der)
            }
        };

        let (jws_key, jws_chain) = match (
            items.get("jws_key")?,
            items.get("jws_leaf")?,
            items.get("jws_intermediate")?,
        ) {
            (Some(k), Some(leaf), Some(inter)) => {
                (pki::rsa_key(&k)?, vec![leaf, inter, ca_der.clone()])
            }
            _ => {
                let (inter_key, inter_key_der) = pki::new_p256()?;
                let inter = pki::issue_intermediate(
                    &ca_cert,
                    &ca_key,
                    "skr-emulator Key Vault Issuing CA",
                    &inter_key,
                )?;
                let (leaf_key, leaf_key_der) = pki::new_rsa(2048)?;
                let leaf = pki::issue_server_leaf(
                    &inter,
                    &inter_key,
                    "vault.skr-emulator.localhost",
                    pki::spki_of(&leaf_key.to_public_key())?,
                    true,
                )?;
                let leaf_der = pki::cert_der(&leaf)?;
                let inter_der = pki::cert_der(&inter)?;
                items.put("jws_intermediate_key", &inter_key_der);
                items.put("jws_intermediate", &inter_der);
                items.put("jws_key", &leaf_key_der);
                items.put("jws_leaf", &leaf_der);
                (leaf_key, vec![leaf_der, inter_der, ca_der.clone()])
            }
        };

        let (maa_key, maa_cert_der) = match (items.get("maa_key")?, items.get("maa_cert")?) {
            (Some(k), Some(c)) => (pki::rsa_key(&k)?, c),
            _ => {
                let (key, der) = pki::new_rsa(2048)?;
                let cert =
                    pki::issue_self_signed_rsa(&key, "https://skr-emulator.attest.localhost")?;
                let cert_der = pki::cert_der(&cert)?;
                items.put("maa_key", &der);
                items.put("maa_cert", &cert_der);
                (key, cert_der)
            }
        };

        let entra_key = match items.get("entra_key")? {
            Some(k) => pki::rsa_key(&k)?,
            None => {
                let (key, der) = pki::new_rsa(2048)?;
                items.put("entra_key", &der);
                key
            }
        };

        let (ark_key, ark_der) = match (items.get("ark_key")?, items.get("ark_cert")?) {
            (Some(k), Some(c)) => (pki::rsa_key(&k)?, c),
            _ => {
                let (key, der) = pki::new_rsa(4096)?;
                let cert = pki::issue_ark(&key)?;
                let cert_der = pki::cert_der(&cert)?;
                items.put("ark_key", &der);
                items.put("ark_cert", &cert_der);
                // A new root invalidates everything below it.
                items.0.remove("ask_cert");
                items.0.remove("vcek_cert");
                (key, cert_der)
            }
        };
        let ark = pki::parse_cert(&ark_der)?;
        let (ask_key, ask_der) = match (items.get("ask_key")?, items.get("ask_cert")?) {
            (Some(k), Some(c)) => (pki::rsa_key(&k)?, c),
            _ => {
                let key = match items.get("ask_key")? {
                    Some(k) => pki::rsa_key(&k)?,
                    None => {
                        let (key, der) = pki::new_rsa(4096)?;
                        items.put("ask_key", &der);
                        key
                    }
                };
                let cert = pki::issue_ask(&ark, &ark_key, &key)?;
                let cert_der = pki::cert_der(&cert)?;
                items.put("ask_cert", &cert_der);
                items.0.remove("vcek_cert");
                (key, cert_der)
            }
        };
        let ask = pki::parse_cert(&ask_der)?;

        let vcek_key = match items.get("vcek_key")? {
            Some(k) => pki::p384_key(&k)?,
            None => {
                let key = p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
                let der = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&key)
                    .map_err(|e| format!("VCEK key: {e}"))?;
                items.put("vcek_key", der.as_bytes());
                items.0.remove("vcek_cert");
                key
            }
        };
        // AMD issues one VCEK per chip and TCB: re-issue when platform.json changed either.
        let vcek_der = match items.get("vcek_cert")? {
            Some(c) if vcek_matches(&c, platform) => c,
            _ => {
                let cert = pki::issue_vcek(
                    &ask,
                    &ask_key,
                    &vcek_key,
                    platform.product_name(),
                    platform.tcb,
                    &platform.vcek_hwid()?,
                )?;
                let der = pki::cert_der(&cert)?;
                items.put("vcek_cert", &der);
                der
            }
        };

        Ok(Pki {
            ca_key,
            ca_cert,
            ca_der,
            tls_key_pkcs8,
            tls_cert_der,
            jws_key,
            jws_chain,
            maa_key,
            maa_cert_der,
            entra_key,
            ark_der,
            ask_der,
            vcek_key,
            vcek_der,
        })
    }

    pub fn ca_pem(&self) -> String {
        crate::util::pem_encode("CERTIFICATE", &self.ca_der)
    }

    /// ASK then ARK, the THIM `certificateChain`.
    pub fn thim_chain_pem(&self) -> String {
        [&self.ask_der, &self.ark_der]
            .iter()
            .map(|d| crate::util::pem_encode("CERTIFICATE", d))
            .collect()
    }
}

fn vcek_matches(der: &[u8], platform: &PlatformConfig) -> bool {
    let (Ok(cert), Ok(hwid)) = (pki::parse_cert(der), platform.vcek_hwid()) else {
        return false;
    };
    let tcb = platform.tcb;
    match pki::vcek_extensions(&cert) {
        Ok(ext) => {
            ext.hwid.as_deref() == Some(&hwid[..])
                && ext.product.as_deref() == Some(platform.product_name())
                && ext.spl(pki::OID_AMD_FMC_SPL) == tcb.fmc
                && ext.spl(pki::OID_AMD_BL_SPL) == Some(tcb.bootloader)
                && ext.spl(pki::OID_AMD_TEE_SPL) == Some(tcb.tee)
                && ext.spl(pki::OID_AMD_SNP_SPL) == Some(tcb.snp)
                && ext.spl(pki::OID_AMD_UCODE_SPL) == Some(tcb.microcode)
        }
        Err(_) => false,
    }
}

/// Ports chosen on the first start and reused afterwards, so URLs (and the release policies'
/// MAA authority) stay stable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub maa: u16,
    pub vault: u16,
    pub mhsm: u16,
    pub imds: u16,
    pub platform: u16,
}

pub fn load_platform(layout: &Layout) -> Result<PlatformConfig, String> {
    let path = layout.platform_file();
    let cfg = match read_json::<PlatformConfig>(&path)? {
        Some(cfg) => cfg,
        None => {
            let cfg = PlatformConfig::generate();
            write_json(&path, &cfg)?;
            cfg
        }
    };
    cfg.validate()
        .map_err(|e| format!("{}: {e} (nothing was changed)", path.display()))?;
    Ok(cfg)
}
