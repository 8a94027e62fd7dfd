//! Harnesses of the emulator's fuzz targets (`fuzz/`, cargo-fuzz on nightly) and of their
//! corpus replay on stable (`emulator/tests/fuzz_corpus.rs`): the request bodies clients send
//! to its MAA and its Key Vault / Managed HSM (and the TCG event log inside an AzureGuest
//! request), through the same code the HTTP handlers run.
//! Each returns whether the request was accepted (the replay asserts it for `accept-*` files).
//! Not part of the emulator's API (hidden from its docs).

use crate::admin::Admin;
use crate::context::{App, AppParts, Urls};
use crate::keystore::{KeysFile, Kind};
use crate::keyvault::{self, Service};
use crate::state::{self, Layout, Pki};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use x509_cert::Certificate;

/// `POST /attest/SevSnpVm`: the body as the handler parses it, then the whole SEV-SNP evidence
/// check against AMD's real roots (report, VCEK chain, endorsements, runtime data).
pub fn maa_request(data: &[u8]) -> bool {
    static ROOTS: LazyLock<Vec<(String, Certificate)>> =
        LazyLock::new(|| crate::maa::trusted_arks(&[]));
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    crate::maa::attest_sevsnp(&body, &ROOTS).is_ok()
}

/// The body of `POST /attest/AzureGuest` (`maa::guest::attest_azure_guest`): the outer JSON,
/// the base64 `AttestationInfo` JSON and every TPM structure, certificate, SNP report and TD
/// quote inside it, against the real AMD roots, a simulated vTPM CA and TDX quoting key.
pub fn azure_guest_request(data: &[u8]) -> bool {
    static ROOTS: LazyLock<Vec<(String, Certificate)>> =
        LazyLock::new(|| crate::maa::trusted_arks(&[]));
    static CA: LazyLock<Option<crate::vtpm::VtpmCa>> =
        LazyLock::new(|| crate::vtpm::VtpmCa::new().ok());
    static TDX: LazyLock<crate::tdx::TdxKeys> = LazyLock::new(crate::tdx::TdxKeys::generate);
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    crate::maa::guest::attest_azure_guest(
        &body,
        &ROOTS,
        CA.as_ref().map(|c| &c.cert),
        Some(TDX.quoting_key.verifying_key()),
    )
    .is_ok()
}

/// `TcgLogs` of an AzureGuest request (`tcg_log::EventLog`): the crypto-agile log's header and
/// records, then the replay of its SHA-256 bank.
pub fn tcg_log(data: &[u8]) -> bool {
    crate::tcg_log::EventLog::parse(data)
        .and_then(|log| log.replay_sha256())
        .is_ok()
}

/// Authority of the release policy of the harness's exportable key: nothing listens there, so a
/// release whose token names it stops at fetching the issuer's keys.
pub const RELEASE_AUTHORITY: &str = "https://127.0.0.1:9";

/// A Key Vault and a Managed HSM over one emulator state in a scratch directory, with an
/// access token each and one exportable key, `fuzz-release`.
pub struct KeyVault {
    vault: Service,
    mhsm: Service,
    tokens: [HeaderValue; 2],
    /// The key store every request starts from (None while the harness sets it up).
    initial_keys: Option<KeysFile>,
    runtime: tokio::runtime::Runtime,
}

impl KeyVault {
    /// Builds the state (new PKI: a few seconds). Panics when the scratch directory cannot be
    /// made: that is the harness's environment, not fuzz input.
    pub fn new() -> KeyVault {
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let dir = base.join(format!("skr-emulator-fuzz-{}", std::process::id()));
        let layout = Layout::new(dir);
        std::fs::create_dir_all(layout.state()).expect("scratch state directory");
        let platform = state::load_platform(&layout).expect("default platform");
        // A new PKI (RSA-4096 AMD-style roots among others) takes minutes under the fuzzer's
        // instrumentation: reuse the one an earlier harness process made. Test keys of a
        // scratch emulator, nothing else.
        let cache = base.join("skr-emulator-fuzz-pki.json");
        if let Ok(bytes) = std::fs::read(&cache) {
            let _ = std::fs::write(layout.pki_file(), bytes);
        }
        let pki = Pki::load_or_create(&layout, &platform).expect("emulator PKI");
        if !cache.exists() {
            let tmp = base.join(format!("skr-emulator-fuzz-pki.{}.tmp", std::process::id()));
            if std::fs::copy(layout.pki_file(), &tmp).is_ok() {
                let _ = std::fs::rename(&tmp, &cache);
            }
        }
        let trusted_arks = crate::maa::trusted_arks(&pki.ark_der);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(2))
            .build()
            .expect("HTTP client");
        let nowhere = RELEASE_AUTHORITY.to_string();
        let app = Arc::new(App::new(AppParts {
            admin: Admin::new(PathBuf::from("/dev/null")),
            urls: Urls {
                maa: nowhere.clone(),
                vault: "https://fuzz.vault.azure.net".into(),
                mhsm: "https://fuzz.managedhsm.azure.net".into(),
                imds: nowhere.clone(),
                platform: nowhere,
            },
            layout,
            pki,
            platform,
            keys: KeysFile::default(),
            trusted_arks,
            identity_header: "fuzz".into(),
            http,
        }));
        let token = |kind: Kind| {
            let (token, _, _) = crate::tenant::access_token_for(
                &app,
                kind.audience(),
                crate::tenant::SYSTEM_CLIENT_ID,
                crate::tenant::SYSTEM_CLIENT_ID,
            );
            HeaderValue::from_str(&format!("Bearer {token}")).expect("token header")
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut kv = KeyVault {
            tokens: [token(Kind::Vault), token(Kind::Mhsm)],
            vault: Service {
                app: app.clone(),
                kind: Kind::Vault,
            },
            mhsm: Service {
                app: app.clone(),
                kind: Kind::Mhsm,
            },
            initial_keys: None,
            runtime,
        };
        let policy = json!({"version": "1.0.0", "anyOf": [{"authority": RELEASE_AUTHORITY,
            "allOf": [{"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}]}]});
        let create = json!({
            "kty": "EC-HSM", "crv": "P-256", "attributes": {"exportable": true},
            "release_policy": {"data": crate::util::b64url(policy.to_string().as_bytes())},
        });
        for mhsm in [false, true] {
            let body = Bytes::from(create.to_string());
            let created = kv.call(Method::POST, "/keys/fuzz-release/create", mhsm, body);
            assert!(created, "the harness's exportable key");
        }
        kv.initial_keys = Some(app.keys.lock().expect("key store").clone());
        kv
    }

    /// One Key Vault request through the service's HTTP handler (routing, bearer check, body,
    /// the operation). First byte: 0 create, 1 import, 2 update, 3 release (`fuzz-release`), 4
    /// get; second byte bit 0: Managed HSM instead of Key Vault; the rest is the JSON body. The
    /// key store is put back afterwards, so every input meets the same state.
    pub fn request(&self, data: &[u8]) -> bool {
        let op = data.first().copied().unwrap_or(0);
        let flags = data.get(1).copied().unwrap_or(0);
        let body = Bytes::copy_from_slice(data.get(2..).unwrap_or_default());
        let (method, path) = match op % 5 {
            0 => (Method::POST, "/keys/fuzz-create/create"),
            1 => (Method::PUT, "/keys/fuzz-import"),
            2 => (Method::PATCH, "/keys/fuzz-release"),
            3 => (Method::POST, "/keys/fuzz-release/release"),
            _ => (Method::GET, "/keys/fuzz-release"),
        };
        let accepted = self.call(method, path, flags & 1 == 1, body);
        if let (Some(initial), Ok(mut keys)) = (&self.initial_keys, self.vault.app.keys.lock()) {
            *keys = initial.clone();
        }
        accepted
    }

    fn call(&self, method: Method, path: &str, mhsm: bool, body: Bytes) -> bool {
        let svc = if mhsm { &self.mhsm } else { &self.vault };
        let mut headers = HeaderMap::new();
        headers.insert("authorization", self.tokens[usize::from(mhsm)].clone());
        let uri: Uri = format!("{path}?api-version=7.4")
            .parse()
            .expect("fixed URI");
        let response = self.runtime.block_on(keyvault::dispatch(
            State(svc.clone()),
            method,
            uri,
            headers,
            body,
        ));
        response.status().is_success()
    }
}

impl Default for KeyVault {
    fn default() -> Self {
        Self::new()
    }
}

/// Scratch directories of harness processes that no longer run.
fn remove_stale_dirs(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("skr-emulator-fuzz-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
