//! C_Login on a simulated Azure confidential VM, through the built .so: the module attests
//! through the vTPM (`skr-emulator up --platform cvm-snp | cvm-tdx`: swtpm provisioned like an
//! Azure vTPM, behind the emulator's paravisor relay) with MAA's AzureGuest flow, Key Vault
//! wraps to the TPM-held transfer key, and the OAEP step runs inside the TPM. Results are
//! checked with RustCrypto; denials name the unmet `x-ms-isolation-tee.*` claim; after every
//! login, successful or not, no transient object or session is left in the TPM (asked on a
//! TPM connection of the test's own). Shared by `abi_cvm_snp_login` and `abi_cvm_tdx_login`
//! (one platform per test binary: the module reads one config per process).

use crate::common::{self, tpm_leftovers, Emulator};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use serde_json::json;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// A known AES key imported into the emulated managed HSM under the CVM release policy, so
/// that the token's AES results can be checked independently.
const KNOWN_AES: [u8; 32] = *b"skr-pkcs11 known CVM AES-256 k!!";

pub struct Fixture {
    /// `cvm-snp` or `cvm-tdx`: also the prefix of the emulator's CVM demo key names.
    platform: &'static str,
    emu: &'static Emulator,
    p11: Pkcs11,
    log: PathBuf,
    slots: Vec<(String, Slot)>,
}

impl Fixture {
    fn slot(&self, label: &str) -> Slot {
        self.slots
            .iter()
            .find(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("token {label}"))
            .1
    }
}

fn fixture(platform: &'static str) -> MutexGuard<'static, Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let emu = Emulator::shared_cvm(platform);
        assert_eq!(emu.var("SKR_EMULATOR_GUEST_PLATFORM"), platform);
        import_known_aes(emu, platform);
        let log = emu.path().join("module-abi-cvm.log");
        let cfg = common::config_logging_to(emu, "abi-cvm.toml", &log);
        let mut t = std::fs::read_to_string(&cfg).unwrap();
        assert!(t.contains("evidence = \"azure-cvm\""), "{t}");
        // A security context left in the configuration (an ACI one, with another host's VCEK
        // chain) must not supply the chain: on a CVM it comes from IMDS THIM only.
        t = t.replacen(
            "evidence = \"azure-cvm\"\n",
            &format!(
                "evidence = \"azure-cvm\"\nsecurity_context_dir = \"{}/testdata/aci/security-context\"\n",
                env!("CARGO_MANIFEST_DIR")
            ),
            1,
        );
        let demo_end = t
            .find("[[token]]\nlabel = \"skr-denied\"")
            .expect("skr-denied token in the emulator's config");
        t.insert_str(
            demo_end,
            &format!(
                "[[token.key]]\nlabel = \"known-aes\"\nid = \"0f\"\nkid = \"{}/keys/{platform}-known-aes\"\n\n",
                emu.var("SKR_EMULATOR_MHSM_URL")
            ),
        );
        std::fs::write(&cfg, t).unwrap();
        // Set before the module is loaded, while no other thread of this binary reads the
        // environment (every test takes this fixture first).
        std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
        let p11 = Pkcs11::new(common::module_path()).expect("load module");
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
        let slots = p11
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .map(|s| (p11.get_token_info(s).unwrap().label().to_string(), s))
            .collect();
        Mutex::new(Fixture {
            platform,
            emu,
            p11,
            log,
            slots,
        })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

fn import_known_aes(emu: &Emulator, platform: &str) {
    use base64::Engine;
    let mhsm = emu.var("SKR_EMULATOR_MHSM_URL").to_string();
    let (st, data_aes) = emu.akv(
        reqwest::Method::GET,
        &mhsm,
        &format!("/keys/{platform}-data-aes"),
        None,
    );
    assert_eq!(st, 200, "GET {platform}-data-aes: {data_aes}");
    let policy = data_aes["release_policy"].clone();
    let body = json!({
        "key": {"kty": "oct-HSM", "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(KNOWN_AES),
                "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"]},
        "hsm": true,
        "attributes": {"exportable": true},
        "release_policy": {"contentType": policy["contentType"], "data": policy["data"]},
    });
    let (st, v) = emu.akv(
        reqwest::Method::PUT,
        &mhsm,
        &format!("/keys/{platform}-known-aes"),
        Some(body),
    );
    assert_eq!(st, 200, "import {platform}-known-aes: {v}");
}

fn login(f: &Fixture, token: &str) -> Result<Session, P11Error> {
    let s = f.p11.open_rw_session(f.slot(token)).expect("open session");
    match s.login(UserType::User, None) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(s),
        Err(e) => Err(e),
    }
}

fn find_one(s: &Session, class: ObjectClass, label: &str) -> ObjectHandle {
    let found = s
        .find_objects(&[
            Attribute::Class(class),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .expect("find");
    assert_eq!(found.len(), 1, "exactly one {class:?} labelled {label}");
    found[0]
}

fn rsa_public(emu: &Emulator, platform: &str) -> rsa::RsaPublicKey {
    use rsa::pkcs8::DecodePublicKey;
    use x509_cert::der::{Decode, Encode};
    let der = common::first_cert_der(
        &emu.path()
            .join("certs")
            .join(format!("{platform}-tls-rsa.pem")),
    );
    let cert = x509_cert::Certificate::from_der(&der).expect("certificate");
    rsa::RsaPublicKey::from_public_key_der(
        &cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap(),
    )
    .expect("RSA SPKI")
}

/// The last C_Login line of the module's log for `token`.
fn login_line(f: &Fixture, token: &str) -> String {
    let log = std::fs::read_to_string(&f.log).expect("module log file");
    log.lines()
        .rev()
        .find(|l| l.contains("C_Login") && l.contains(token))
        .unwrap_or_else(|| panic!("no C_Login line for {token} in the log:\n{log}"))
        .to_string()
}

pub fn login_releases_rsa_and_aes_that_verify_independently_and_leaves_the_tpm_clean(
    platform: &'static str,
) {
    let f = fixture(platform);
    let names = ["tls-rsa", "data-aes", "known-aes"].map(|k| format!("{platform}-{k}"));
    let before = names.clone().map(|k| f.emu.releases(&k));
    let attested = f.emu.admin_get("/admin/counters")["attestations"]
        .as_u64()
        .unwrap_or(0);
    if let Ok(s) = f.p11.open_rw_session(f.slot("skr-demo")) {
        let _ = s.logout();
    }
    let s = login(&f, "skr-demo").unwrap_or_else(|e| {
        panic!(
            "C_Login on the simulated CVM: {e}; log:\n{}",
            std::fs::read_to_string(&f.log).unwrap_or_default()
        )
    });
    assert_eq!(
        names.map(|k| f.emu.releases(&k)),
        before.map(|n| n + 1),
        "each key released once"
    );
    assert_eq!(
        f.emu.admin_get("/admin/counters")["attestations"].as_u64(),
        Some(attested + 1),
        "one AzureGuest attestation"
    );
    let log = std::fs::read_to_string(&f.log).unwrap();
    assert!(
        log.contains("with azure-cvm evidence"),
        "the release went through the vTPM path: {log}"
    );
    assert_eq!(
        tpm_leftovers(f.emu),
        (0, 0),
        "transfer key and sessions flushed after the login"
    );

    // RSA: PKCS#1 v1.5 signature checked by RustCrypto with the certificate's key.
    let public = rsa_public(f.emu, f.platform);
    let key = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    let msg = b"released on an Azure CVM through the vTPM";
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, key, msg).expect("C_Sign");
    use sha2::Digest;
    public
        .verify(
            rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
            &sha2::Sha256::digest(msg),
            &sig,
        )
        .expect("RSA signature verifies with RustCrypto");
    // RSA-OAEP: RustCrypto encrypts, the token decrypts.
    let ct = public
        .encrypt(
            &mut rand::thread_rng(),
            rsa::Oaep::new::<sha2::Sha256>(),
            b"secret",
        )
        .unwrap();
    let oaep = PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    );
    assert_eq!(
        s.decrypt(&Mechanism::RsaPkcsOaep(oaep), key, &ct).unwrap(),
        b"secret"
    );

    // AES-256-GCM with the known key equals RustCrypto's.
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let aes = find_one(&s, ObjectClass::SECRET_KEY, "known-aes");
    let mut iv = [9u8; 12];
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, b"aad", 128.into()).unwrap()),
            aes,
            b"data",
        )
        .unwrap();
    let expected = aes_gcm::Aes256Gcm::new_from_slice(&KNOWN_AES)
        .unwrap()
        .encrypt(
            &[9u8; 12].into(),
            Payload {
                msg: b"data",
                aad: b"aad",
            },
        )
        .unwrap();
    assert_eq!(ct, expected);
    // The demo AES key round-trips.
    let demo = find_one(&s, ObjectClass::SECRET_KEY, "data-aes");
    let ct = s
        .encrypt(&Mechanism::AesCbcPad([1u8; 16]), demo, b"plain")
        .unwrap();
    assert_eq!(
        s.decrypt(&Mechanism::AesCbcPad([1u8; 16]), demo, &ct)
            .unwrap(),
        b"plain"
    );
}

pub fn denials_name_the_unmet_isolation_tee_claim_and_leave_the_tpm_clean(platform: &'static str) {
    let f = fixture(platform);
    for (token, claim) in [
        ("skr-denied", "x-ms-isolation-tee.x-ms-attestation-type"),
        (
            "skr-denied-uvm",
            "x-ms-isolation-tee.x-ms-compliance-status",
        ),
        // The Azure CLI's default CVM policy checks top-level claims, which platform
        // (SevSnpVm / TdxVm) tokens carry and AzureGuest tokens do not (skr-protocol §9.4).
        ("skr-cli-default", "x-ms-compliance-status"),
    ] {
        match login(&f, token) {
            Err(P11Error::Pkcs11(RvError::FunctionRejected, _)) => {}
            other => panic!(
                "{token}: expected CKR_FUNCTION_REJECTED, got {:?}",
                other.map(drop)
            ),
        }
        let line = login_line(&f, token);
        assert!(line.contains("CKR_FUNCTION_REJECTED"), "{line}");
        assert!(line.contains("step=release"), "{line}");
        assert!(
            line.contains(&format!("claim {claim};"))
                || line.contains(&format!("condition {claim} ")),
            "the line names {claim}: {line}"
        );
        if token == "skr-cli-default" {
            assert!(
                line.contains("name x-ms-isolation-tee.x-ms-compliance-status"),
                "the line tells the operator to name the nested claim: {line}"
            );
        }
        assert_eq!(
            tpm_leftovers(f.emu),
            (0, 0),
            "nothing left in the TPM after the refused login of {token}"
        );
    }
}

pub fn login_faults_give_their_ck_rv_flush_the_tpm_key_and_a_later_login_succeeds(
    platform: &'static str,
) {
    let f = fixture(platform);
    for (fault, expected) in [
        (
            json!({"endpoint": "maa-attest", "kind": "status", "status": 400, "count": 1}),
            RvError::DeviceError,
        ),
        // Key Vault wraps to another key: the TPM's RSA-OAEP decryption refuses it.
        (
            json!({"endpoint": "akv-release", "kind": "wrong-wrap-key", "count": 1}),
            RvError::GeneralError,
        ),
        (
            json!({"endpoint": "maa-attest", "kind": "expired-token", "count": 1}),
            RvError::GeneralError,
        ),
        // The paravisor never refreshes the HCL report: the user-data is never echoed, and
        // the module gives up after its bounded wait rather than attest a stale report.
        (
            json!({"endpoint": "vtpm-hcl-refresh", "kind": "status", "count": 1}),
            RvError::DeviceError,
        ),
        // The vTPM in dictionary-attack lockout when the transfer key is created.
        (
            json!({"endpoint": "vtpm-command", "kind": "status", "count": 1}),
            RvError::DeviceError,
        ),
    ] {
        if let Ok(s) = f.p11.open_rw_session(f.slot("skr-demo")) {
            let _ = s.logout();
        }
        f.emu.inject(fault.clone());
        match login(&f, "skr-demo") {
            Err(P11Error::Pkcs11(rv, _)) => assert_eq!(rv, expected, "{fault}"),
            Ok(_) => panic!("{fault}: login succeeded"),
            Err(e) => panic!("{fault}: {e}"),
        }
        if fault["endpoint"] == "vtpm-hcl-refresh" {
            let line = login_line(&f, "skr-demo");
            assert!(
                line.contains("step=evidence") && line.contains("never echoed"),
                "{line}"
            );
        }
        if fault["endpoint"] == "vtpm-command" {
            let line = login_line(&f, "skr-demo");
            assert!(
                line.contains("CreatePrimary") && line.contains("lockout"),
                "{line}"
            );
        }
        assert_eq!(tpm_leftovers(f.emu), (0, 0), "after {fault}");
        f.emu.admin_delete("/admin/faults");
        let s = login(&f, "skr-demo").expect("the next login succeeds");
        find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
        assert_eq!(tpm_leftovers(f.emu), (0, 0));
    }
    // A busy vTPM (TPM_RC_RETRY twice) is retried: the login succeeds, the TPM is left clean.
    if let Ok(s) = f.p11.open_rw_session(f.slot("skr-demo")) {
        let _ = s.logout();
    }
    f.emu
        .inject(json!({"endpoint": "vtpm-command", "kind": "throttle", "count": 2}));
    let s = login(&f, "skr-demo").expect("a busy TPM is retried");
    find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    assert_eq!(tpm_leftovers(f.emu), (0, 0));
    let log = std::fs::read_to_string(f.emu.path().join("emulator.log")).unwrap();
    assert_eq!(
        log.matches("\"rc\":2338").count(),
        2,
        "both injected TPM_RC_RETRY answers were given"
    );
}

pub fn an_unwritten_hcl_report_is_read_again_then_refused_with_the_code_330_hint(
    platform: &'static str,
) {
    let f = fixture(platform);
    let logout = || {
        if let Ok(s) = f.p11.open_rw_session(f.slot("skr-demo")) {
            let _ = s.logout();
        }
    };
    let answered_330 = || {
        std::fs::read_to_string(f.emu.path().join("emulator.log"))
            .unwrap()
            .matches("\"rc\":330")
            .count()
    };
    // Early after boot an Azure vTPM answers reads of the HCL report with
    // TPM_RC_NV_UNINITIALIZED ("code=330"): two such answers are waited out.
    logout();
    let before = answered_330();
    f.emu
        .inject(json!({"endpoint": "vtpm-nv-unwritten", "kind": "status", "count": 2}));
    let s = login(&f, "skr-demo").expect("an HCL report written late is waited for");
    find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    assert_eq!(
        answered_330() - before,
        2,
        "both injected answers were given"
    );
    assert_eq!(tpm_leftovers(f.emu), (0, 0));

    // Never written within the module's wait (six reads): CKR_DEVICE_ERROR with the hint.
    logout();
    f.emu
        .inject(json!({"endpoint": "vtpm-nv-unwritten", "kind": "status", "count": 6}));
    match login(&f, "skr-demo") {
        Err(P11Error::Pkcs11(RvError::DeviceError, _)) => {}
        other => panic!("expected CKR_DEVICE_ERROR, got {:?}", other.map(drop)),
    }
    let line = login_line(&f, "skr-demo");
    assert!(
        line.contains("step=evidence")
            && line.contains("0x01400001")
            && line.contains("6 reads")
            && line.contains("code 330"),
        "{line}"
    );
    assert_eq!(tpm_leftovers(f.emu), (0, 0));
    f.emu.admin_delete("/admin/faults");
    let s = login(&f, "skr-demo").expect("the next login succeeds");
    find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
}
