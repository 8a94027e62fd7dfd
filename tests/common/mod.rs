//! Shared harness of the integration tests: a running skr-emulator in a temp dir (started
//! with the real `skr-emulator up`, stopped with `down`), its admin API, and the built module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the built module, binaries and examples are: the debug profile as `cargo test`
/// builds it, or `SKR_TEST_ARTIFACTS` (scripts/sanitize.sh points it at a sanitizer build).
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("SKR_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug"))
}

/// A built binary or example (`examples/NAME`) of the workspace.
pub fn artifact(name: &str) -> PathBuf {
    let p = artifacts_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The built cdylib (debug profile, as `cargo test` builds it).
pub fn module_path() -> PathBuf {
    let p = artifacts_dir().join("libskr_pkcs11.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn emulator_bin() -> PathBuf {
    let p = artifacts_dir().join("skr-emulator");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A running emulator; `down` on drop.
pub struct Emulator {
    pub dir: tempfile::TempDir,
    pub env: HashMap<String, String>,
}

impl Emulator {
    pub fn start() -> Emulator {
        Emulator::start_platform("aci")
    }

    /// `skr-emulator up --platform PLATFORM` (aci, cvm-snp) in a fresh directory.
    pub fn start_platform(platform: &str) -> Emulator {
        let dir = tempfile::Builder::new()
            .prefix("skr-emu-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new(emulator_bin())
            .arg("up")
            .arg("--dir")
            .arg(dir.path())
            .arg("--platform")
            .arg(platform)
            .output()
            .expect("run skr-emulator up");
        assert!(
            out.status.success(),
            "skr-emulator up failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = parse_env_file(&dir.path().join("env"));
        Emulator { dir, env }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn var(&self, k: &str) -> &str {
        self.env
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the emulator's env file"))
    }

    pub fn config_path(&self) -> PathBuf {
        PathBuf::from(self.var("SKR_PKCS11_CONFIG"))
    }

    /// Write a copy of the emulator's module config with `edit` applied; returns its path.
    pub fn config_variant(&self, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
        let text = std::fs::read_to_string(self.config_path()).expect("read module config");
        let p = self.path().join(name);
        std::fs::write(&p, edit(text)).expect("write config variant");
        p
    }

    /// An HTTPS client that trusts the emulator's CA (and nothing else).
    pub fn client(&self) -> reqwest::blocking::Client {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(self.var("SKR_EMULATOR_CA")).expect("read emulator CA");
        for c in rustls_pemfile_certs(&pem) {
            roots.add(c).expect("add CA");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        reqwest::blocking::Client::builder()
            .use_preconfigured_tls(cfg)
            .build()
            .expect("http client")
    }

    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        let url = format!("{}{}", self.var("SKR_EMULATOR_PLATFORM_URL"), path);
        let r = self.client().get(&url).send().expect("admin GET");
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().expect("admin JSON")
    }

    pub fn admin_post(&self, path: &str, body: serde_json::Value) {
        let url = format!("{}{}", self.var("SKR_EMULATOR_PLATFORM_URL"), path);
        let r = self
            .client()
            .post(&url)
            .json(&body)
            .send()
            .expect("admin POST");
        assert!(r.status().is_success(), "POST {url}: {}", r.status());
    }

    pub fn admin_put(&self, path: &str, body: serde_json::Value) {
        let url = format!("{}{}", self.var("SKR_EMULATOR_PLATFORM_URL"), path);
        let r = self
            .client()
            .put(&url)
            .json(&body)
            .send()
            .expect("admin PUT");
        assert!(r.status().is_success(), "PUT {url}: {}", r.status());
    }

    pub fn admin_delete(&self, path: &str) {
        let url = format!("{}{}", self.var("SKR_EMULATOR_PLATFORM_URL"), path);
        let r = self.client().delete(&url).send().expect("admin DELETE");
        assert!(r.status().is_success(), "DELETE {url}: {}", r.status());
    }

    /// Releases counted by the emulator for one key name.
    pub fn releases(&self, key: &str) -> u64 {
        self.admin_get("/admin/counters")["releases"][key]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn inject(&self, fault: serde_json::Value) {
        self.admin_post("/admin/faults", fault);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new(emulator_bin())
            .arg("down")
            .arg("--dir")
            .arg(self.dir.path())
            .output();
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.expect("PEM certificate"))
        .collect()
}

/// Parse `export K=V` / `K=V` lines (values optionally quoted).
pub fn parse_env_file(p: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let mut m = HashMap::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches("export ").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').trim_matches('\'');
            m.insert(k.trim().to_string(), v.to_string());
        }
    }
    m
}

/// Leaf certificate DER from a PEM file (first block).
pub fn first_cert_der(pem_path: &Path) -> Vec<u8> {
    let pem = std::fs::read(pem_path).expect("read certificate");
    rustls_pemfile_certs(&pem)
        .into_iter()
        .next()
        .expect("a certificate")
        .to_vec()
}

static SHARED_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
static EXIT_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

extern "C" fn stop_shared_emulator() {
    let dirs = EXIT_DIRS.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in SHARED_DIR.get().into_iter().chain(dirs.iter()) {
        let _ = Command::new(emulator_bin())
            .arg("down")
            .arg("--dir")
            .arg(dir)
            .output();
    }
}

static AT_EXIT: std::sync::Once = std::sync::Once::new();

fn register_exit_hook() {
    // SAFETY: registering a plain extern "C" fn with no captured state.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(stop_shared_emulator);
    });
}

/// Stop the emulator in `dir` when the test process exits (for emulators kept in statics,
/// which are never dropped).
#[allow(dead_code)]
pub fn stop_at_exit(dir: &Path) {
    if let Ok(mut d) = EXIT_DIRS.lock() {
        d.push(dir.to_path_buf());
    }
    register_exit_hook();
}

impl Emulator {
    /// One emulator for the whole test binary, stopped (`down`) when the process exits.
    pub fn shared() -> &'static Emulator {
        static EMU: std::sync::OnceLock<Emulator> = std::sync::OnceLock::new();
        EMU.get_or_init(|| {
            let e = Emulator::start();
            let _ = SHARED_DIR.set(e.path().to_path_buf());
            register_exit_hook();
            e
        })
    }

    /// One `--platform PLATFORM` (cvm-snp, cvm-tdx) emulator, a simulated Azure CVM with its
    /// swtpm vTPM, for the whole test binary (the first call's platform), stopped (`down`,
    /// which stops swtpm) when the process exits.
    pub fn shared_cvm(platform: &str) -> &'static Emulator {
        static EMU: std::sync::OnceLock<Emulator> = std::sync::OnceLock::new();
        EMU.get_or_init(|| {
            let e = Emulator::start_platform(platform);
            stop_at_exit(e.path());
            e
        })
    }

    /// An access token from the emulator's IMDS for `resource`.
    pub fn imds_token(&self, resource: &str) -> String {
        let url = format!(
            "{}/metadata/identity/oauth2/token",
            self.var("SKR_EMULATOR_IMDS_URL")
        );
        let r = self
            .client()
            .get(&url)
            .query(&[("api-version", "2018-02-01"), ("resource", resource)])
            .header("Metadata", "true")
            .send()
            .expect("IMDS token");
        assert!(r.status().is_success(), "IMDS: {}", r.status());
        let v: serde_json::Value = r.json().expect("IMDS JSON");
        v["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    /// Azure-shaped call to the emulated vault or managed HSM (`base` = its URL).
    pub fn akv(
        &self,
        method: reqwest::Method,
        base: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let resource = if base == self.var("SKR_EMULATOR_MHSM_URL") {
            "https://managedhsm.azure.net"
        } else {
            "https://vault.azure.net"
        };
        let token = self.imds_token(resource);
        let url = format!("{base}{path}?api-version=7.4");
        let mut req = self.client().request(method, &url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().expect("AKV request");
        let status = r.status().as_u16();
        let v = r.json().unwrap_or(serde_json::Value::Null);
        (status, v)
    }
}

/// A config variant that logs to a file, for tests that read the module's log line.
pub fn config_logging_to(emu: &Emulator, name: &str, log: &Path) -> PathBuf {
    emu.config_variant(name, |t| {
        let mut out = String::new();
        let mut in_logging = false;
        for line in t.lines() {
            if line.trim() == "[logging]" {
                in_logging = true;
                out.push_str(&format!(
                    "[logging]\nlevel = \"debug\"\ntarget = \"file:{}\"\n",
                    log.display()
                ));
                continue;
            }
            if in_logging && line.trim_start().starts_with('[') {
                in_logging = false;
            }
            if !in_logging {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    })
}

/// Transient objects and loaded sessions in the simulated vTPM (swtpm has no resource manager:
/// these are everything any client left behind), asked on a TPM connection of the test's own.
#[cfg(feature = "cvm")]
pub fn tpm_leftovers(emu: &Emulator) -> (usize, usize) {
    use std::str::FromStr;
    use tss_esapi::constants::tss::{TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST};
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::structures::CapabilityData;
    let tcti = tss_esapi::tcti_ldr::TctiNameConf::from_str(emu.var("SKR_EMULATOR_TPM_TCTI"))
        .expect("TCTI");
    let mut ctx = tss_esapi::Context::new(tcti).expect("connect to the simulated vTPM");
    let mut count = |first: u32| match ctx
        .get_capability(CapabilityType::Handles, first, 64)
        .expect("TPM2_GetCapability")
        .0
    {
        CapabilityData::Handles(list) => list.into_inner().len(),
        other => panic!("{other:?}"),
    };
    (
        count(TPM2_TRANSIENT_FIRST),
        count(TPM2_LOADED_SESSION_FIRST),
    )
}
