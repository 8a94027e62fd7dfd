//! Shared helpers for the emulator's HTTP tests: start an emulator in a temp dir, talk to it
//! with the documented Azure request shapes, and unwrap releases independently (RustCrypto).
#![allow(dead_code)]

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_skr-emulator");

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unb64url(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .expect("base64url")
}

pub fn unb64(text: &str) -> Vec<u8> {
    STANDARD.decode(text).expect("base64")
}

/// A fresh directory under the target's tmp dir; directories of test processes that are gone
/// are removed first, so runs do not accumulate state dirs.
pub fn temp_dir(tag: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("skr-emulator-tests");
    std::fs::create_dir_all(&base).expect("test tmp dir");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid: Option<i32> = name.rsplit('-').nth(1).and_then(|p| p.parse().ok());
            // SAFETY: signal 0 only probes whether the process exists.
            if pid.is_some_and(|p| unsafe { libc::kill(p, 0) } != 0) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let unique: u32 = rand::random();
    let dir = base.join(format!("{tag}-{}-{unique:08x}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `export NAME=value` lines of DIR/env.
pub fn read_env(dir: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(dir.join("env"))
        .expect("env file")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect()
}

#[derive(Clone)]
pub struct Emu {
    pub dir: PathBuf,
    pub maa: String,
    pub vault: String,
    pub mhsm: String,
    pub imds: String,
    pub platform: String,
    pub ca_der: Vec<u8>,
}

impl Emu {
    pub fn from_dir(dir: &Path) -> Emu {
        let env = read_env(dir);
        let ca_pem = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
        let ca = x509_cert::Certificate::load_pem_chain(&ca_pem).expect("CA PEM");
        Emu {
            dir: dir.to_path_buf(),
            maa: env["SKR_EMULATOR_MAA_URL"].clone(),
            vault: env["SKR_EMULATOR_VAULT_URL"].clone(),
            mhsm: env["SKR_EMULATOR_MHSM_URL"].clone(),
            imds: env["SKR_EMULATOR_IMDS_URL"].clone(),
            platform: env["SKR_EMULATOR_PLATFORM_URL"].clone(),
            ca_der: der::Encode::to_der(&ca[0]).unwrap(),
        }
    }

    /// An emulator in the foreground, owned by a thread that lives until the test process
    /// exits; the child gets SIGTERM (PR_SET_PDEATHSIG) when that happens.
    pub fn start_shared(tag: &str) -> Emu {
        Emu::start_shared_with(tag, &[])
    }

    /// `start_shared` with more arguments for `up` (e.g. `--platform cvm-tdx`).
    pub fn start_shared_with(tag: &str, args: &[&str]) -> Emu {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let dir = temp_dir(tag);
        let (tx, rx) = std::sync::mpsc::channel();
        let child_dir = dir.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new(EXE);
            cmd.args(["up", "--foreground", "--dir"])
                .arg(&child_dir)
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            // SAFETY: prctl in the child before exec; ties its life to this thread.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("spawn skr-emulator");
            tx.send(()).ok();
            let _ = child.wait();
            // Keep the thread (and so the death signal) alive until the process ends.
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("emulator spawned");
        wait_ready(&dir);
        Emu::from_dir(&dir)
    }

    pub fn client(&self) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))
            .unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }
}

pub fn wait_ready(dir: &Path) {
    let started = Instant::now();
    while !dir.join("emulator.ready").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "emulator in {} did not become ready",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Response {
    let resp = req.send().await.expect("HTTP request");
    Response {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().await.unwrap_or_default(),
    }
}

pub async fn access_token(emu: &Emu, client: &reqwest::Client, resource: &str) -> String {
    let r = send(
        client
            .get(format!("{}/metadata/identity/oauth2/token", emu.imds))
            .query(&[("api-version", "2018-02-01"), ("resource", resource)])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["access_token"].as_str().unwrap().to_string()
}

/// The module's side of SKR: a transfer key, runtime data = JWKS with it, a report binding it.
pub struct Transfer {
    pub key: rsa::RsaPrivateKey,
    pub kid: String,
    pub runtime_data: Vec<u8>,
}

pub fn transfer_key() -> Transfer {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    let key = KEY
        .get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap())
        .clone();
    let kid = "transfer-key".to_string();
    let runtime_data = json!({"keys": [{
        "kid": kid, "key_ops": ["encrypt"], "kty": "RSA",
        "e": b64url(&key.e().to_bytes_be()), "n": b64url(&key.n().to_bytes_be())
    }]})
    .to_string()
    .into_bytes();
    Transfer {
        key,
        kid,
        runtime_data,
    }
}

pub async fn platform_report(
    emu: &Emu,
    client: &reqwest::Client,
    report_data: &[u8; 64],
) -> (Vec<u8>, String) {
    let r = send(
        client
            .post(format!("{}/platform/snp/report", emu.platform))
            .json(&json!({"report_data": b64url(report_data)})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = r.json();
    (
        unb64url(body["report"].as_str().unwrap()),
        body["vcek_cert_chain"].as_str().unwrap().to_string(),
    )
}

pub fn attest_body(
    report: &[u8],
    chain_pem: &str,
    runtime_data: Option<&[u8]>,
    nonce: Option<&str>,
) -> Value {
    let evidence =
        json!({"SnpReport": b64url(report), "VcekCertChain": b64url(chain_pem.as_bytes())})
            .to_string();
    let mut body = json!({"report": b64url(evidence.as_bytes())});
    if let Some(rd) = runtime_data {
        body["runtimeData"] = json!({"data": b64url(rd), "dataType": "JSON"});
    }
    if let Some(n) = nonce {
        body["nonce"] = json!(n);
    }
    body
}

/// Full guest flow: report for the transfer key, MAA attest, token.
pub async fn maa_token(emu: &Emu, client: &reqwest::Client, transfer: &Transfer) -> String {
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&Sha256::digest(&transfer.runtime_data));
    let (report, chain) = platform_report(emu, client, &rd).await;
    let r = send(
        client
            .post(format!(
                "{}/attest/SevSnpVm?api-version=2022-08-01",
                emu.maa
            ))
            .json(&attest_body(
                &report,
                &chain,
                Some(&transfer.runtime_data),
                Some("n-1"),
            )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["token"].as_str().unwrap().to_string()
}

pub fn jws_parts(jws: &str) -> (Value, Value, Vec<u8>) {
    let parts: Vec<&str> = jws.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS");
    (
        serde_json::from_slice(&unb64url(parts[0])).unwrap(),
        serde_json::from_slice(&unb64url(parts[1])).unwrap(),
        unb64url(parts[2]),
    )
}

/// Independent unwrap of `key_hsm.ciphertext`: RSA-OAEP (hash per enc, MGF1 same, empty
/// label) of the first modulus-length bytes, then AES-KWP (RFC 5649) of the rest.
pub fn unwrap(
    private: &rsa::RsaPrivateKey,
    enc: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, String> {
    let k = private.size();
    if ciphertext.len() <= k {
        return Err("ciphertext too short".into());
    }
    let padding = match enc {
        "CKM_RSA_AES_KEY_WRAP" => rsa::Oaep::new::<sha1::Sha1>(),
        "RSA_AES_KEY_WRAP_256" => rsa::Oaep::new::<sha2::Sha256>(),
        "RSA_AES_KEY_WRAP_384" => rsa::Oaep::new::<sha2::Sha384>(),
        other => return Err(format!("enc {other}")),
    };
    let kek = private
        .decrypt(padding, &ciphertext[..k])
        .map_err(|e| format!("OAEP: {e}"))?;
    let rest = &ciphertext[k..];
    match kek.len() {
        16 => aes_kw::KekAes128::new(kek.as_slice().into()).unwrap_with_padding_vec(rest),
        24 => aes_kw::KekAes192::new(kek.as_slice().into()).unwrap_with_padding_vec(rest),
        32 => aes_kw::KekAes256::new(kek.as_slice().into()).unwrap_with_padding_vec(rest),
        n => return Err(format!("KEK of {n} bytes")),
    }
    .map_err(|e| format!("AES-KWP: {e}"))
}

pub fn rsa_private_from_pkcs8(der: &[u8]) -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::from_pkcs8_der(der).expect("PKCS#8 RSA")
}
