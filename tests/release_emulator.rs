//! The login path (`release_token`) against a running skr-emulator: the demo keys release and
//! match their public keys, a policy denial names the claim, and injected faults map to their
//! failure classes, each followed by a successful release.
//!
//! Needs the emulator binary: `cargo build -p skr-emulator` first.

use cryptoki_sys::{CKR_FUNCTION_FAILED, CKR_FUNCTION_REJECTED, CKR_GENERAL_ERROR};
use serde_json::{json, Value};
use skr_pkcs11::config::{Config, TokenConfig};
use skr_pkcs11::error::{Error, Step};
use skr_pkcs11::release::{release_token, KeyMaterial, ReleasedKey, Session};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A binary of another workspace crate (`skr-emulator`, the `skr-pkcs11` tool of `cli/`), as
/// `cargo build --workspace` leaves it.
fn workspace_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let bin = target.join("debug").join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace`",
        bin.display()
    );
    bin
}

fn emulator_binary() -> PathBuf {
    workspace_binary("skr-emulator")
}

/// A running emulator in a temporary directory; `down` on drop.
struct Emulator {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Emulator {
    fn up() -> Emulator {
        let bin = emulator_binary();
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(&bin)
            .args(["up", "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skr-emulator up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Emulator { bin, dir }
    }

    fn config(&self) -> Config {
        let mut cfg = Config::load(&self.dir.path().join("skr-pkcs11.toml")).unwrap();
        // Quick retries keep the fault scenarios short.
        cfg.release.backoff_ms = 20;
        cfg
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["down", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}

/// Admin API calls through the module's own HTTPS client (it trusts the emulator's CA).
struct Admin {
    session: Session,
    base: String,
}

impl Admin {
    fn new(cfg: &Config) -> Admin {
        Admin {
            session: Session::new(cfg).unwrap(),
            base: cfg.platform.emulator_url.clone().unwrap(),
        }
    }
    fn fault(&self, fault: Value) {
        let r = self
            .session
            .http
            .client
            .post(format!("{}/admin/faults", self.base))
            .json(&fault)
            .send()
            .unwrap();
        assert!(
            r.status().is_success(),
            "adding fault {fault}: {}",
            r.status()
        );
    }
    fn clear(&self) {
        let r = self
            .session
            .http
            .client
            .delete(format!("{}/admin/faults", self.base))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
    /// Releases the emulator has completed, over all keys.
    fn releases_total(&self) -> u64 {
        self.counters()["releases"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    }
    fn counters(&self) -> Value {
        self.session
            .http
            .client
            .get(format!("{}/admin/counters", self.base))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

fn token<'a>(cfg: &'a Config, label: &str) -> &'a TokenConfig {
    cfg.tokens.iter().find(|t| t.label == label).unwrap()
}

fn expect_err(
    r: skr_pkcs11::error::Result<(Vec<ReleasedKey>, skr_pkcs11::release::LoginTimings)>,
) -> Error {
    match r {
        Ok((keys, _)) => panic!("expected a failure, released {} keys", keys.len()),
        Err(e) => {
            eprintln!("  -> CK_RV {:#x}: {e}", e.rv());
            // Every failure names its step and carries an operator hint.
            assert!(e.step().is_some(), "{e}");
            assert!(e.hint().is_some_and(|h| !h.is_empty()), "no hint: {e}");
            e
        }
    }
}

/// The SubjectPublicKeyInfo of the first certificate of a PEM file.
fn cert_spki(path: &Path) -> Vec<u8> {
    use x509_cert::der::{DecodePem, Encode};
    let pem = std::fs::read_to_string(path).unwrap();
    let first = pem.split("-----END CERTIFICATE-----").next().unwrap();
    let cert =
        x509_cert::Certificate::from_pem(format!("{first}-----END CERTIFICATE-----\n")).unwrap();
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .unwrap()
}

fn released_demo_keys(cfg: &Config) -> Vec<ReleasedKey> {
    let demo = token(cfg, "skr-demo");
    let (keys, timings) = release_token(cfg, demo).unwrap_or_else(|e| panic!("demo release: {e}"));
    assert_eq!(keys.len(), demo.keys.len());
    // Every step of the module's side was timed.
    let zero = std::time::Duration::ZERO;
    for (step, d) in [
        ("transfer_key", timings.transfer_key),
        ("evidence", timings.evidence),
        ("attestation", timings.attestation),
        ("identity", timings.identity),
        ("release", timings.release),
        ("unwrap", timings.unwrap),
    ] {
        assert!(d > zero, "{step} not timed: {timings:?}");
    }
    keys
}

fn scenario_demo_keys_release_and_match(cfg: &Config, admin: &Admin) {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::KeyPair;
    let before = admin.counters();
    let demo = token(cfg, "skr-demo");
    let keys = released_demo_keys(cfg);
    let mut aes = None;
    for k in &keys {
        let kc = &demo.keys[k.index];
        match (kc.label.as_str(), &k.material) {
            ("tls-rsa", KeyMaterial::Pkcs8(der)) => {
                // The released private key's public half is the certificate's key.
                let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(der.as_slice()).unwrap();
                let spki = kp.public_key().as_der().unwrap();
                assert_eq!(spki.as_ref(), cert_spki(kc.certificate.as_ref().unwrap()));
            }
            ("tls-ec", KeyMaterial::Pkcs8(der)) => {
                use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
                let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der.as_slice())
                    .unwrap();
                let spki = cert_spki(kc.certificate.as_ref().unwrap());
                assert!(
                    spki.ends_with(kp.public_key().as_ref()),
                    "EC point differs from the certificate"
                );
            }
            ("data-aes", KeyMaterial::Raw(key)) => {
                assert_eq!(key.len(), 32);
                aes = Some(key.as_slice().to_vec());
            }
            (label, _) => panic!("unexpected key {label} or material form"),
        }
    }
    // A second login releases the same AES key (from the managed HSM, a second audience).
    let again = released_demo_keys(cfg);
    let aes2 = again.iter().find_map(|k| match &k.material {
        KeyMaterial::Raw(k) => Some(k.as_slice().to_vec()),
        _ => None,
    });
    assert_eq!(aes, aes2);
    let after = admin.counters();
    for name in ["tls-rsa", "tls-ec", "data-aes"] {
        let n = |c: &Value| c["releases"][name].as_u64().unwrap_or(0);
        assert_eq!(n(&after), n(&before) + 2, "releases of {name}: {after}");
    }
}

fn scenario_denied_names_the_claim(cfg: &Config, _admin: &Admin) {
    let e = expect_err(release_token(cfg, token(cfg, "skr-denied")));
    assert_eq!(e.rv(), CKR_FUNCTION_REJECTED, "{e}");
    assert_eq!(e.step(), Some(Step::Release));
    assert!(e.message().contains("\"denied-rsa\""), "{e}");
    assert!(
        e.message().contains("x-ms-sevsnpvm-launchmeasurement"),
        "{e}"
    );
    assert!(
        e.hint()
            .unwrap()
            .contains("x-ms-sevsnpvm-launchmeasurement"),
        "{e}"
    );
}

fn scenario_maa_500_is_a_service_failure(cfg: &Config, admin: &Admin) {
    let attempts = cfg.release.retries + 1;
    admin.fault(json!({"endpoint":"maa-attest","kind":"status","status":500,"count":attempts}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
    assert_eq!(e.step(), Some(Step::Attestation));
    assert!(
        e.message()
            .contains(&format!("after {attempts} attempt(s)")),
        "{e}"
    );
    assert!(e.message().contains("500"), "{e}");
}

fn scenario_akv_429_then_success(cfg: &Config, admin: &Admin) {
    admin.fault(json!({"endpoint":"akv-release","kind":"throttle","retry_after":1,"count":1}));
    let started = std::time::Instant::now();
    released_demo_keys(cfg);
    // Retry-After was honoured.
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
}

fn scenario_timeout(cfg: &Config, admin: &Admin) {
    let mut cfg = cfg.clone();
    cfg.release.timeout_seconds = 1;
    cfg.release.retries = 0;
    let before = admin.releases_total();
    admin.fault(json!({"endpoint":"akv-release","kind":"delay","delay_ms":2500,"count":1}));
    let e = expect_err(release_token(&cfg, token(&cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
    assert!(e.message().contains("timed out"), "{e}");
    // Nothing of this scenario is left in flight, so the next one needs no drain: the key
    // threads are joined before release_token returns, and the abandoned request's
    // connection closed with the module's session, which cancels its handler in the emulator
    // (the delayed release never completes). Only the other keys were released.
    let keys = token(&cfg, "skr-demo").keys.len() as u64;
    assert_eq!(admin.releases_total(), before + keys - 1);
}

fn integrity_fault(cfg: &Config, admin: &Admin, endpoint: &str, kind: &str, step: Step) {
    admin.fault(json!({"endpoint":endpoint,"kind":kind,"count":1}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_GENERAL_ERROR, "{kind}: {e}");
    assert_eq!(e.step(), Some(step), "{kind}: {e}");
}

fn scenario_malformed_jws(cfg: &Config, admin: &Admin) {
    integrity_fault(cfg, admin, "akv-release", "malformed-body", Step::Release);
}

fn scenario_truncated_jws(cfg: &Config, admin: &Admin) {
    integrity_fault(cfg, admin, "akv-release", "truncated-jws", Step::Release);
}

fn scenario_wrong_wrap_key(cfg: &Config, admin: &Admin) {
    integrity_fault(cfg, admin, "akv-release", "wrong-wrap-key", Step::Unwrap);
}

fn scenario_expired_maa_token(cfg: &Config, admin: &Admin) {
    admin.fault(json!({"endpoint":"maa-attest","kind":"expired-token","count":1}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_GENERAL_ERROR, "{e}");
    assert_eq!(e.step(), Some(Step::Attestation));
    assert!(e.message().contains("expired"), "{e}");
}

fn scenario_wrong_kid_is_a_service_failure(cfg: &Config, _admin: &Admin) {
    let mut cfg = cfg.clone();
    let demo = cfg
        .tokens
        .iter_mut()
        .find(|t| t.label == "skr-demo")
        .unwrap();
    demo.keys.truncate(1);
    demo.keys[0].kid = demo.keys[0].kid.replace("tls-rsa", "no-such-key");
    let e = expect_err(release_token(&cfg, token(&cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
    assert!(e.hint().unwrap().contains("check kid in the config"), "{e}");
}

fn scenario_imds_failure_is_an_identity_service_failure(cfg: &Config, admin: &Admin) {
    let attempts = cfg.release.retries + 1;
    admin.fault(json!({"endpoint":"imds-token","kind":"status","status":503,"count":attempts}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
    assert_eq!(e.step(), Some(Step::Identity), "{e}");
}

fn scenario_imds_400_points_at_the_identity(cfg: &Config, admin: &Admin) {
    admin.fault(json!({"endpoint":"imds-token","kind":"status","status":400,"count":1}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
    assert_eq!(e.step(), Some(Step::Identity), "{e}");
    assert!(e.hint().unwrap().contains("managed identity"), "{e}");
}

fn scenario_403_with_policy_met_points_at_permissions(cfg: &Config, admin: &Admin) {
    admin.fault(json!({"endpoint":"akv-release","kind":"status","status":403,"count":1}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_REJECTED, "{e}");
    assert!(
        e.message().contains("although the release policy is met"),
        "{e}"
    );
    assert!(e.hint().unwrap().contains("release permission"), "{e}");
}

fn scenario_repeated_401_is_denied(cfg: &Config, admin: &Admin) {
    // One key, so that both injected 401s hit the same GET (first try and the retry with a
    // refreshed token).
    let mut cfg = cfg.clone();
    let demo = cfg
        .tokens
        .iter_mut()
        .find(|t| t.label == "skr-demo")
        .unwrap();
    demo.keys.truncate(1);
    admin.fault(json!({"endpoint":"akv-get","kind":"status","status":401,"count":2}));
    let e = expect_err(release_token(&cfg, token(&cfg, "skr-demo")));
    assert_eq!(e.rv(), CKR_FUNCTION_REJECTED, "{e}");
    assert!(e.message().contains("(401)"), "{e}");
    // A single 401 is absorbed by one token refresh.
    admin.fault(json!({"endpoint":"akv-get","kind":"status","status":401,"count":1}));
    let (keys, _) = release_token(&cfg, token(&cfg, "skr-demo")).unwrap();
    assert_eq!(keys.len(), 1);
}

fn scenario_platform_failure(cfg: &Config, admin: &Admin) {
    let attempts = cfg.release.retries + 1;
    admin
        .fault(json!({"endpoint":"platform-report","kind":"status","status":500,"count":attempts}));
    let e = expect_err(release_token(cfg, token(cfg, "skr-demo")));
    assert_eq!(e.step(), Some(Step::Evidence), "{e}");
    assert_eq!(e.rv(), CKR_FUNCTION_FAILED, "{e}");
}

/// Collateral the other ways: IMDS THIM and the ACI-style security context the emulator
/// writes; both give the same VCEK chain as the simulated platform.
fn scenario_collateral_sources(cfg: &Config, _admin: &Admin) {
    use skr_pkcs11::release::evidence;
    let session = Session::new(cfg).unwrap();
    let provider = evidence::provider(cfg, &session.http).unwrap();
    let rd = evidence::report_data_for(b"collateral");
    let ev = provider.get_report(&rd).unwrap();
    evidence::check_report(&ev.report, &rd).unwrap();
    let chain = ev.vcek_chain_pem.unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 3);
    let mut no_ctx = cfg.clone();
    no_ctx.platform.security_context_dir = None;
    if std::env::var_os("UVM_SECURITY_CONTEXT_DIR").is_none() {
        let thim = evidence::collateral(&no_ctx, &session.http).unwrap();
        assert_eq!(thim.vcek_chain_pem.trim(), chain.trim());
        assert!(thim.uvm_reference_info.is_none());
        assert_eq!(thim.tcbm, evidence::reported_tcb(&ev.report));
    }
    let dir = cfg.base_dir.join("security-context");
    let ctx = evidence::collateral_from_dir(&dir).unwrap();
    assert_eq!(ctx.vcek_chain_pem.trim(), chain.trim());
}

/// The CLI against the emulator: doctor flags the denied key by claim, attest prints verified
/// claims, release reports sizes; none of them prints an access token or key bytes.
fn scenario_cli_never_prints_secrets(cfg: &Config, _admin: &Admin) {
    let run = |args: &[&str]| {
        let out = Command::new(workspace_binary("skr-pkcs11"))
            .arg("--config")
            .arg(&cfg.source_path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // Secrets to look for: an access token from the same IMDS, and the released AES key.
    let session = Session::new(cfg).unwrap();
    let access_token = skr_pkcs11::release::identity::Identity::new(&session.http, &cfg.identity)
        .token(skr_pkcs11::release::identity::VAULT_RESOURCE, false)
        .unwrap()
        .as_str()
        .to_string();
    let aes = released_demo_keys(cfg)
        .into_iter()
        .find_map(|k| match k.material {
            KeyMaterial::Raw(s) => Some(s.as_slice().to_vec()),
            _ => None,
        })
        .unwrap();
    let secrets = [
        access_token.clone(),
        access_token[..access_token.len().min(40)].to_string(),
        hex::encode(&aes),
        skr_pkcs11::release::b64url(&aes),
    ];
    let (code, doctor) = run(&["doctor"]);
    assert_eq!(code, 1, "{doctor}");
    assert!(
        doctor.contains("key skr-denied/denied-rsa") && doctor.contains("FAIL"),
        "{doctor}"
    );
    assert!(
        doctor.contains("x-ms-sevsnpvm-launchmeasurement"),
        "{doctor}"
    );
    assert!(
        doctor.contains("key skr-demo/data-aes") && doctor.contains("release policy met"),
        "{doctor}"
    );
    let (code, attest) = run(&["attest"]);
    assert_eq!(code, 0, "{attest}");
    let claims: Value = serde_json::from_str(attest.split("\nevidence:").next().unwrap()).unwrap();
    assert_eq!(claims["x-ms-attestation-type"], "sevsnpvm");
    let (code, release) = run(&["release", "--token", "skr-demo"]);
    assert_eq!(code, 0, "{release}");
    assert!(
        release.contains("data-aes") && release.contains("32 bytes"),
        "{release}"
    );
    let (code, denied) = run(&["release", "--token", "skr-denied"]);
    assert_eq!(code, 2, "{denied}");
    assert!(denied.contains("refused (403)"), "{denied}");
    for out in [&doctor, &attest, &release, &denied] {
        for s in &secrets {
            assert!(!out.contains(s.as_str()), "a secret leaked into CLI output");
        }
    }
}

#[test]
fn release_against_the_emulator() {
    let emu = Emulator::up();
    let cfg = emu.config();
    let admin = Admin::new(&cfg);
    type Scenario = fn(&Config, &Admin);
    let scenarios: &[(&str, Scenario)] = &[
        (
            "demo keys release and match",
            scenario_demo_keys_release_and_match,
        ),
        (
            "denied key names the claim",
            scenario_denied_names_the_claim,
        ),
        (
            "MAA 500 after retries",
            scenario_maa_500_is_a_service_failure,
        ),
        ("AKV 429 then success", scenario_akv_429_then_success),
        ("timeout", scenario_timeout),
        ("malformed release body", scenario_malformed_jws),
        ("truncated JWS", scenario_truncated_jws),
        ("wrong wrapping key", scenario_wrong_wrap_key),
        ("expired MAA token", scenario_expired_maa_token),
        ("unknown kid", scenario_wrong_kid_is_a_service_failure),
        (
            "IMDS 503",
            scenario_imds_failure_is_an_identity_service_failure,
        ),
        ("IMDS 400", scenario_imds_400_points_at_the_identity),
        (
            "403 with the policy met",
            scenario_403_with_policy_met_points_at_permissions,
        ),
        ("401 twice", scenario_repeated_401_is_denied),
        ("platform 500", scenario_platform_failure),
        ("collateral sources", scenario_collateral_sources),
        (
            "CLI never prints secrets",
            scenario_cli_never_prints_secrets,
        ),
    ];
    let mut failures = Vec::new();
    for (name, run) in scenarios {
        eprintln!("scenario: {name}");
        admin.clear();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&cfg, &admin)));
        admin.clear();
        if let Err(p) = outcome {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {msg}"));
            continue;
        }
        // After every fault, a clean login works again.
        if let Err(p) = std::panic::catch_unwind(|| released_demo_keys(&cfg)) {
            failures.push(format!("{name}: the release after it failed: {p:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
}
