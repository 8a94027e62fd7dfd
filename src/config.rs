//! TOML configuration: schema, loading and validation. Errors name the file, the line and the
//! field, so an operator can fix them without reading code.
//!
//! Path: `SKR_PKCS11_CONFIG`, else `/etc/skr-pkcs11/config.toml`. A reference with every field
//! is in `docs/CONFIG.md`; `skr-emulator up` writes a working one.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const CONFIG_ENV: &str = "SKR_PKCS11_CONFIG";
pub const DEFAULT_CONFIG_PATH: &str = "/etc/skr-pkcs11/config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub logging: Logging,
    pub platform: Platform,
    pub attestation: Attestation,
    pub identity: Identity,
    #[serde(default)]
    pub release: Release,
    #[serde(default)]
    pub tls: Tls,
    /// What happens to released keys in a forked child.
    #[serde(default)]
    pub fork: ForkPolicy,
    #[serde(rename = "token", default)]
    pub tokens: Vec<TokenConfig>,
    /// Directory of the config file, to resolve relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub source_path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// error | warn | info | debug
    #[serde(default = "default_level")]
    pub level: String,
    /// "stderr", "syslog" or "file:/path/to/log". Never stdout.
    #[serde(default = "default_log_target")]
    pub target: String,
}
impl Default for Logging {
    fn default() -> Self {
        Logging {
            level: default_level(),
            target: default_log_target(),
        }
    }
}
fn default_level() -> String {
    "info".into()
}
fn default_log_target() -> String {
    "stderr".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvidenceSource {
    /// `/dev/sev-guest`, then `/dev/sev`, then an Azure vTPM (NV 0x01400001); never a fake
    /// report.
    Auto,
    SevGuest,
    SevLegacy,
    /// An Azure confidential VM: evidence from the vTPM (`platform.tpm_tcti`), MAA AzureGuest.
    AzureCvm,
    /// Ask skr-emulator's simulated SEV-SNP platform (development and tests only).
    Emulated,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    pub evidence: EvidenceSource,
    /// Base URL of skr-emulator's platform endpoint (evidence = "emulated").
    pub emulator_url: Option<String>,
    /// ACI security context dir (host-amd-cert-base64, reference-info-base64); default: env
    /// `UVM_SECURITY_CONTEXT_DIR`, then a `/security-context-*` dir.
    pub security_context_dir: Option<PathBuf>,
    /// IMDS base URL for THIM collateral (default `http://169.254.169.254`).
    pub imds_url: Option<String>,
    /// TPM TCTI of the Azure CVM path (tpm2-tss syntax, e.g. `device:/dev/tpmrm0`,
    /// `swtpm:host=127.0.0.1,port=2321`); default the kernel resource manager.
    pub tpm_tcti: Option<String>,
    /// The boot's TCG event log the Azure CVM path sends to MAA; default
    /// `/sys/kernel/security/tpm0/binary_bios_measurements`. Relative to the config's directory.
    pub tcg_log: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// MAA base URL, e.g. `https://sharedeus.eus.attest.azure.net`. The token's `jku` must be
    /// `<url>/certs` and its `iss` must equal this URL.
    pub url: String,
    #[serde(default = "default_maa_api")]
    pub api_version: String,
}
fn default_maa_api() -> String {
    "2022-08-01".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    Imds,
    IdentityEndpoint,
    WorkloadIdentity,
    TokenFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub source: IdentitySource,
    /// IMDS base URL (default `http://169.254.169.254`).
    pub imds_url: Option<String>,
    /// At most one of the three user-assigned identity selectors.
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub msi_res_id: Option<String>,
    /// token-file: a file holding a bearer token for the vault / managed HSM resource.
    pub token_file: Option<PathBuf>,
    /// workload-identity: authority host (default `https://login.microsoftonline.com`).
    pub authority_host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    #[serde(default = "default_akv_api")]
    pub api_version: String,
    /// CKM_RSA_AES_KEY_WRAP | RSA_AES_KEY_WRAP_256 | RSA_AES_KEY_WRAP_384
    #[serde(default = "default_enc")]
    pub enc: String,
    /// Per HTTP request.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Retries after the first attempt, for transport errors, 408, 429, 5xx.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff; doubles with jitter; a Retry-After header wins (capped).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
    /// Longest one login (or refresh) may spend on the network: all calls, attempts and waits.
    /// Throttled answers (429, or 503 with Retry-After) are retried until it passes; other
    /// failures stop after `retries`.
    #[serde(default = "default_deadline")]
    pub deadline_seconds: u64,
    /// How often released keys are re-attested and re-released in the background (±10 %).
    #[serde(default = "default_refresh")]
    pub refresh: DurationSetting,
    /// How long a release stays usable when refreshes keep failing; then the key is wiped.
    #[serde(default = "default_max_age")]
    pub max_age: DurationSetting,
    /// Prometheus text file with the keys' lease status, rewritten by the refreshing process.
    #[serde(default)]
    pub status_file: Option<PathBuf>,
}

/// A duration written as text: `"12h"`, `"90m"`, `"30s"`, `"500ms"`, `"2d"`, or sums of them
/// (`"1h30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSetting(pub std::time::Duration);

impl DurationSetting {
    pub fn parse(text: &str) -> Option<DurationSetting> {
        let t = text.trim();
        if t.is_empty() {
            return None;
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return None;
            }
            let n: u128 = rest[..digits].parse().ok()?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let ms_per = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return None,
            };
            rest = &rest[unit_len..];
            total = total.checked_add(n.checked_mul(ms_per)?)?;
        }
        let ms = u64::try_from(total).ok()?;
        Some(DurationSetting(std::time::Duration::from_millis(ms)))
    }
    pub fn as_millis(&self) -> u64 {
        self.0.as_millis() as u64
    }
}

impl<'de> Deserialize<'de> for DurationSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DurationSetting::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration (write e.g. \"12h\", \"90m\", \"30s\", \"500ms\")"
            ))
        })
    }
}

fn default_refresh() -> DurationSetting {
    DurationSetting(std::time::Duration::from_secs(12 * 3600))
}
fn default_max_age() -> DurationSetting {
    DurationSetting(std::time::Duration::from_secs(48 * 3600))
}
impl Default for Release {
    fn default() -> Self {
        Release {
            api_version: default_akv_api(),
            enc: default_enc(),
            timeout_seconds: default_timeout(),
            retries: default_retries(),
            backoff_ms: default_backoff_ms(),
            deadline_seconds: default_deadline(),
            refresh: default_refresh(),
            max_age: default_max_age(),
            status_file: None,
        }
    }
}
fn default_akv_api() -> String {
    "7.4".into()
}
fn default_enc() -> String {
    "RSA_AES_KEY_WRAP_256".into()
}
fn default_timeout() -> u64 {
    10
}
fn default_retries() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    500
}
fn default_deadline() -> u64 {
    300
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Extra PEM trust anchors for HTTPS and for the release JWS chain (added to the public
    /// web roots). skr-emulator writes its CA here.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForkPolicy {
    /// Released keys stay usable in a forked child; it logs in without a second release.
    #[default]
    Keep,
    /// The child wipes inherited keys; its C_Login releases again.
    ReRelease,
}

/// A token's local PIN: wiped when dropped, and never shown by `Debug` (a `{:?}` of the
/// configuration must not print it).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Pin(String);

impl Drop for Pin {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl Pin {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(redacted)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// CKA token label (≤ 32 bytes).
    pub label: String,
    /// Token serial (≤ 16 bytes); default derived from the label.
    pub serial: Option<String>,
    /// Optional local PIN check before release (plain text compared in constant time).
    pub pin: Option<Pin>,
    #[serde(rename = "key", default)]
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// CKA_LABEL of the key's objects.
    pub label: String,
    /// CKA_ID as hex (unique per token; pkcs11-tool picks keys by id).
    pub id: String,
    /// Key URL: `https://<vault>/keys/<name>[/<version>]`.
    pub kid: String,
    /// PEM certificate (leaf first, then chain) exposed as CKO_CERTIFICATE objects.
    pub certificate: Option<PathBuf>,
    /// Allow CKM_RSA_PKCS decryption (a padding oracle; needed for TLS 1.2 RSA key exchange).
    #[serde(default)]
    pub allow_rsa_pkcs_decrypt: bool,
}

impl KeyConfig {
    pub fn id_bytes(&self) -> Result<Vec<u8>> {
        hex::decode(&self.id).map_err(|_| {
            Error::config(format!("key {:?}: id {:?} is not hex", self.label, self.id))
        })
    }
    /// The vault or managed HSM base URL and whether it is a managed HSM.
    pub fn vault_base(&self) -> Result<(String, bool)> {
        let idx = self.kid.find("/keys/").ok_or_else(|| {
            Error::config(format!(
                "key {:?}: kid {:?} has no /keys/ segment",
                self.label, self.kid
            ))
        })?;
        let base = self.kid[..idx].to_string();
        let mhsm = base.contains("managedhsm");
        Ok((base, mhsm))
    }
}

#[cfg(test)]
thread_local! {
    /// The config path `load_default` uses on this test thread instead of `SKR_PKCS11_CONFIG`:
    /// tests that call C_Initialize name their config here, so that no test calls `set_var`
    /// while others run.
    static TEST_CONFIG_PATH: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Tests: the config `Config::load_default` reads on this thread (see `TEST_CONFIG_PATH`).
#[cfg(test)]
pub fn use_config_on_this_thread(path: &Path) {
    TEST_CONFIG_PATH.with(|p| *p.borrow_mut() = Some(path.to_path_buf()));
}

impl Config {
    /// Load from `SKR_PKCS11_CONFIG` or the default path.
    pub fn load_default() -> Result<Config> {
        #[cfg(test)]
        if let Some(path) = TEST_CONFIG_PATH.with(|p| p.borrow().clone()) {
            return Self::load(&path);
        }
        let path = std::env::var_os(CONFIG_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        Self::load(&path)
    }

    pub fn load(path: &Path) -> Result<Config> {
        let cannot_read = |e: std::io::Error| {
            Error::config(format!("cannot read config {}: {e}", path.display())).with_hint(format!(
                "set {CONFIG_ENV} to the config file (skr-emulator up writes one)"
            ))
        };
        // The permissions of the file actually read (no check-then-open race).
        let (file, meta) = open_regular(path).map_err(cannot_read)?;
        refuse_if_others_can_write(&meta, "config", path)?;
        let text = String::from_utf8(read_bounded(file).map_err(cannot_read)?)
            .map_err(|_| cannot_read(std::io::Error::other("not UTF-8 text")))?;
        let mut cfg = Self::parse(&text, path)?;
        cfg.source_path = path.to_path_buf();
        cfg.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        cfg.resolve_paths();
        cfg.refuse_named_files_others_can_write()?;
        Ok(cfg)
    }

    /// The files the config names feed trust (`tls.ca_file`), identity (`identity.token_file`)
    /// and the token's objects (certificates): same rule as the config. A missing file is left
    /// to whoever reads it, with its own error.
    fn refuse_named_files_others_can_write(&self) -> Result<()> {
        let certificates = self.tokens.iter().flat_map(|t| &t.keys);
        let named = [
            ("tls.ca_file", &self.tls.ca_file),
            ("identity.token_file", &self.identity.token_file),
        ]
        .into_iter()
        .chain(certificates.map(|k| ("certificate", &k.certificate)));
        for (what, path) in named {
            if let Some(path) = path {
                if let Ok(meta) = std::fs::metadata(path) {
                    if !meta.is_file() {
                        return Err(Error::config(format!(
                            "{what} {} is not a regular file",
                            path.display()
                        ))
                        .with_hint(format!("point {what} at a file")));
                    }
                    refuse_if_others_can_write(&meta, what, path)?;
                }
            }
        }
        Ok(())
    }

    /// Parse and validate; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        // The packaged /etc/skr-pkcs11/config.toml is all comments until the operator edits it.
        if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            return Err(Error::config(format!(
                "{}: the config has no settings (every line is blank or a comment): it is the packaged example, not yet edited",
                origin.display()
            ))
            .with_hint(format!(
                "uncomment and fill in [platform], [attestation], [identity] and a [[token]] with its keys (reference: /usr/share/doc/skr-pkcs11/CONFIG.md.gz), or set {CONFIG_ENV} to another config; then run skr-pkcs11 doctor"
            )));
        }
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let start = e.span().map(|s| s.start).unwrap_or(0);
            // For an unknown field the span covers its table; point at the field itself.
            let field_at = e
                .message()
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
                .and_then(|f| text[start.min(text.len())..].find(f).map(|o| start + o));
            let line = line_of(text, field_at.unwrap_or(start));
            Error::config(format!("{}:{}: {}", origin.display(), line, e.message()))
        })?;
        cfg.validate(text, origin)?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir.clone();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.tls.ca_file.as_mut() {
            fix(p)
        }
        if let Some(p) = self.identity.token_file.as_mut() {
            fix(p)
        }
        if let Some(p) = self.platform.security_context_dir.as_mut() {
            fix(p)
        }
        if let Some(p) = self.platform.tcg_log.as_mut() {
            fix(p)
        }
        for t in &mut self.tokens {
            for k in &mut t.keys {
                if let Some(p) = k.certificate.as_mut() {
                    fix(p)
                }
            }
        }
    }

    fn validate(&self, text: &str, origin: &Path) -> Result<()> {
        let at = |needle: &str| -> String {
            format!("{}:{}", origin.display(), find_line(text, needle))
        };
        if self.tokens.is_empty() {
            return Err(Error::config(format!(
                "{}: no [[token]] defined",
                origin.display()
            )));
        }
        if self.platform.evidence == EvidenceSource::Emulated
            && self.platform.emulator_url.is_none()
        {
            return Err(Error::config(format!(
                "{}: platform.emulator_url is required when platform.evidence = \"emulated\"",
                at("evidence")
            )));
        }
        // An empty value would resolve to the config's directory: never a log.
        if self
            .platform
            .tcg_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(Error::config(format!(
                "{}: platform.tcg_log must name the TCG event log file (default /sys/kernel/security/tpm0/binary_bios_measurements)",
                at("tcg_log")
            )));
        }
        if !matches!(
            self.release.enc.as_str(),
            "CKM_RSA_AES_KEY_WRAP" | "RSA_AES_KEY_WRAP_256" | "RSA_AES_KEY_WRAP_384"
        ) {
            return Err(Error::config(format!(
                "{}: release.enc {:?} is not one of CKM_RSA_AES_KEY_WRAP, RSA_AES_KEY_WRAP_256, RSA_AES_KEY_WRAP_384",
                at("enc"),
                self.release.enc
            )));
        }
        let (refresh, max_age) = (self.release.refresh.0, self.release.max_age.0);
        if refresh < std::time::Duration::from_millis(100) || max_age <= refresh {
            return Err(Error::config(format!(
                "{}: release.refresh ({refresh:?}) must be at least 100ms and shorter than release.max_age ({max_age:?}): a lease must be renewable before it runs out",
                at("refresh")
            )));
        }
        // The module trusts whatever key set these hosts serve (MAA's /certs) or hands them a
        // credential (the workload identity's client assertion): never over plain HTTP.
        if !self.attestation.url.starts_with("https://") {
            return Err(Error::config(format!(
                "{}: attestation.url {:?} must be an https:// URL",
                at(&self.attestation.url),
                self.attestation.url
            )));
        }
        if let Some(h) = &self.identity.authority_host {
            if !h.starts_with("https://") {
                return Err(Error::config(format!(
                    "{}: identity.authority_host {h:?} must be an https:// URL",
                    at(h)
                )));
            }
        }
        let selectors = [
            &self.identity.client_id,
            &self.identity.object_id,
            &self.identity.msi_res_id,
        ]
        .iter()
        .filter(|s| s.is_some())
        .count();
        if selectors > 1 {
            return Err(Error::config(format!(
                "{}: identity: set at most one of client_id, object_id, msi_res_id",
                at("[identity]")
            )));
        }
        if self.identity.source == IdentitySource::TokenFile && self.identity.token_file.is_none() {
            return Err(Error::config(format!(
                "{}: identity.token_file is required when identity.source = \"token-file\"",
                at("source")
            )));
        }
        let mut labels = std::collections::HashSet::new();
        for t in &self.tokens {
            if t.label.is_empty() || t.label.len() > 32 {
                return Err(Error::config(format!(
                    "{}: token.label {:?} must be 1..32 bytes",
                    at(&t.label),
                    t.label
                )));
            }
            if !labels.insert(&t.label) {
                return Err(Error::config(format!(
                    "{}: token.label {:?} is used twice",
                    at(&t.label),
                    t.label
                )));
            }
            if let Some(s) = &t.serial {
                if s.len() > 16 {
                    return Err(Error::config(format!(
                        "{}: token.serial {:?} is longer than 16 bytes",
                        at(s),
                        s
                    )));
                }
            }
            let mut ids = std::collections::HashSet::new();
            for k in &t.keys {
                let id = k
                    .id_bytes()
                    .map_err(|e| Error::config(format!("{}: {}", at(&k.id), e.message())))?;
                if id.is_empty() || id.len() > 32 {
                    return Err(Error::config(format!(
                        "{}: key {:?}: id must be 1..32 bytes",
                        at(&k.id),
                        k.label
                    )));
                }
                if !ids.insert(id) {
                    return Err(Error::config(format!(
                        "{}: key {:?}: id {} is used twice in token {:?}",
                        at(&k.id),
                        k.label,
                        k.id,
                        t.label
                    )));
                }
                k.vault_base()
                    .map_err(|e| Error::config(format!("{}: {}", at(&k.kid), e.message())))?;
                if !k.kid.starts_with("https://") {
                    return Err(Error::config(format!(
                        "{}: key {:?}: kid must be an https:// key URL",
                        at(&k.kid),
                        k.label
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The config decides where keys come from, and the files it names feed trust and identity:
/// refuse one that a user other than its owner (or root) can write, i.e. group- or
/// world-writable, as kmsp11 does with its config.
/// Most bytes read from the config or a file it names: far above any real one (a certificate
/// chain is a few KiB), low enough that a wrong path (a log, an image) is refused at once.
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// Opens a file the operator names, refusing anything but a regular file: a FIFO, a socket or a
/// device (`/dev/zero`, `/dev/stdin`) would block or never end. Opened non-blocking so that
/// opening a FIFO does not wait for a writer; reads of a regular file ignore the flag.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta))
}

/// All of `file`, or an error when it holds more than [`MAX_FILE_LEN`] bytes.
pub fn read_bounded(file: std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(std::io::Error::other(format!(
            "larger than {} KiB",
            MAX_FILE_LEN >> 10
        )));
    }
    Ok(bytes)
}

/// [`open_regular`] then [`read_bounded`]: how every file the config names is read.
pub fn read_named_file(path: &Path) -> std::io::Result<Vec<u8>> {
    read_bounded(open_regular(path)?.0)
}

fn refuse_if_others_can_write(meta: &std::fs::Metadata, what: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 == 0 {
        return Ok(());
    }
    let who = if mode & 0o002 != 0 {
        "every user"
    } else {
        "its group"
    };
    Err(Error::config(format!(
        "{what} {} is writable by {who} (mode {mode:04o}, owner uid {}, group gid {}): refused, it decides where keys come from",
        path.display(),
        meta.uid(),
        meta.gid()
    ))
    .with_hint(format!(
        "make it writable by its owner only: chmod go-w {} (readable by the service's group is fine)",
        path.display()
    )))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Best-effort line of the first occurrence of `needle` (for semantic errors after parsing).
fn find_line(text: &str, needle: &str) -> usize {
    text.find(needle).map(|o| line_of(text, o)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[platform]
evidence = "emulated"
emulator_url = "https://127.0.0.1:1"
[attestation]
url = "https://127.0.0.1:2"
[identity]
source = "imds"
imds_url = "http://127.0.0.1:3"
[[token]]
label = "skr"
[[token.key]]
label = "tls-rsa"
id = "01"
kid = "https://127.0.0.1:4/keys/tls-rsa"
"#;

    #[test]
    fn maa_and_authority_host_must_be_https() {
        let e = Config::parse(
            &GOOD.replace(
                "url = \"https://127.0.0.1:2\"",
                "url = \"http://127.0.0.1:2\"",
            ),
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(
            e.message().contains("c.toml:6: attestation.url"),
            "{}",
            e.message()
        );
        let e = Config::parse(
            &GOOD.replace(
                "source = \"imds\"",
                "source = \"workload-identity\"\nauthority_host = \"http://login.example\"",
            ),
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(e.message().contains("authority_host"), "{}", e.message());
    }

    #[test]
    fn pin_is_read_but_never_shown_by_debug() {
        let text = GOOD.replace("label = \"skr\"", "label = \"skr\"\npin = \"s3cr3t-pin\"");
        let c = Config::parse(&text, Path::new("c.toml")).unwrap();
        assert_eq!(c.tokens[0].pin.as_ref().unwrap().as_bytes(), b"s3cr3t-pin");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t-pin"), "{shown}");
        assert!(shown.contains("Pin(redacted)"));
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, Path::new("c.toml")).unwrap();
        assert_eq!(c.release.enc, "RSA_AES_KEY_WRAP_256");
        assert_eq!(c.fork, ForkPolicy::Keep);
        assert_eq!(c.tokens[0].keys[0].id_bytes().unwrap(), vec![1]);
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let bad = GOOD.replace("source = \"imds\"", "source = \"imds\"\nsourse = 1");
        let e = Config::parse(&bad, Path::new("c.toml")).unwrap_err();
        assert!(e.message().starts_with("c.toml:9:"), "{}", e.message());
        assert!(e.message().contains("sourse"), "{}", e.message());
    }

    #[test]
    fn tcg_log_resolves_against_the_config_directory_and_must_not_be_empty() {
        let with = |path: &str| {
            GOOD.replace(
                "emulator_url = \"https://127.0.0.1:1\"",
                &format!("emulator_url = \"https://127.0.0.1:1\"\ntcg_log = \"{path}\""),
            )
        };
        let mut c =
            Config::parse(&with("vtpm/binary_bios_measurements"), Path::new("c.toml")).unwrap();
        c.base_dir = PathBuf::from("/etc/skr-pkcs11");
        c.resolve_paths();
        assert_eq!(
            c.platform.tcg_log.as_deref(),
            Some(Path::new("/etc/skr-pkcs11/vtpm/binary_bios_measurements"))
        );
        assert!(Config::parse(GOOD, Path::new("c.toml"))
            .unwrap()
            .platform
            .tcg_log
            .is_none());
        let e = Config::parse(&with(""), Path::new("c.toml")).unwrap_err();
        assert!(
            e.message().starts_with("c.toml:5: platform.tcg_log"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn duplicate_key_id_is_refused() {
        let bad = format!(
            "{GOOD}\n[[token.key]]\nlabel = \"b\"\nid = \"01\"\nkid = \"https://h/keys/b\"\n"
        );
        let e = Config::parse(&bad, Path::new("c.toml")).unwrap_err();
        assert!(e.message().contains("used twice"), "{}", e.message());
    }
}
