//! The emulator's MAA `POST /attest/AzureGuest` over real HTTPS, with evidence built against its
//! simulated vTPM exactly as the module's login builds it (`cvm::azure_guest_evidence`: fresh
//! HCL report, AK and certificate, PCR quote, TCG event log, certified transfer key, VCEK chain
//! from IMDS THIM): the genuine request attests, and each tampering is answered like MAA, a 400
//! with `{"error": {"code", "message"}}` whose message names what is wrong. The transfer key is
//! flushed at the end: nothing is left in the TPM.
#![cfg(feature = "cvm")]

mod common;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{tpm_leftovers, Emulator};
use serde_json::{json, Value};
use skr_pkcs11::config::Config;
use skr_pkcs11::release::tpm::{DecryptScheme, Tpm, ATTESTED_PCRS};
use skr_pkcs11::release::{b64url, b64url_decode, cvm, evidence, maa, random_nonce};
use skr_pkcs11::release::{Session, TpmTimings};
use skr_pkcs11::secret::SecretBytes;

/// `POST /attest/AzureGuest` with `info` as the module sends it: (status, JSON body).
fn attest(emu: &Emulator, info: &Value) -> (u16, Value) {
    let url = format!(
        "{}/attest/AzureGuest?api-version={}",
        emu.var("SKR_EMULATOR_MAA_URL"),
        cvm::AZURE_GUEST_API_VERSION
    );
    let body = json!({ "AttestationInfo": b64url(info.to_string().as_bytes()) });
    let r = emu
        .client()
        .post(&url)
        .json(&body)
        .send()
        .expect("POST /attest/AzureGuest");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn decoded(info: &Value, path: &str) -> Vec<u8> {
    let text = info.pointer(path).and_then(Value::as_str).expect(path);
    STANDARD.decode(text).expect(path)
}

/// `info` with the member at `path` replaced.
fn with(info: &Value, path: &str, value: Value) -> Value {
    let mut v = info.clone();
    *v.pointer_mut(path).expect(path) = value;
    v
}

/// `info` with one bit of the base64 member at `path` flipped (at byte `at`).
fn flipped(info: &Value, path: &str, at: usize) -> Value {
    let mut bytes = decoded(info, path);
    bytes[at] ^= 1;
    with(info, path, json!(STANDARD.encode(&bytes)))
}

#[test]
fn azure_guest_endpoint_answers_each_tampering_with_an_maa_400() {
    let emu = Emulator::shared_cvm("cvm-snp");
    let cfg = Config::load(&emu.config_path()).expect("the emulator's module config");
    assert!(
        cfg.platform.tcg_log.as_ref().is_some_and(|p| p.is_file()),
        "the emulator's config names its event log: {:?}",
        cfg.platform.tcg_log
    );
    let session = Session::new(&cfg).expect("HTTP session");
    let tpm = Tpm::open(cfg.platform.tpm_tcti.as_deref()).expect("the simulated vTPM");
    let mut key = tpm
        .create_transfer_key(&ATTESTED_PCRS)
        .expect("transfer key");
    let nonce = random_nonce().unwrap();
    let genuine = cvm::azure_guest_evidence(
        &cfg,
        &session.http,
        &mut key,
        &nonce,
        || evidence::collateral_from_thim(&cfg, &session.http),
        &mut TpmTimings::default(),
    )
    .expect("AzureGuest evidence from the simulated vTPM");
    let info = genuine.info;
    assert!(
        !decoded(&info, "/TcgLogs").is_empty(),
        "the boot's log is sent"
    );

    // Genuine: a token sealed to the TPM-held transfer key, carrying the client payload.
    let (status, body) = attest(emu, &info);
    assert_eq!(status, 200, "genuine evidence: {body}");
    let key = std::cell::RefCell::new(key);
    let jwt = maa::open_sealed_token(body["token"].as_str().expect("token"), &|ct| {
        let plain = key.borrow_mut().decrypt(ct, DecryptScheme::RsaEs)?;
        Ok(SecretBytes::from_slice(&plain))
    })
    .expect("the token opens with the TPM-held transfer key");
    let claims: Value = serde_json::from_slice(
        &b64url_decode(jwt.split('.').nth(1).expect("JWT payload")).expect("base64url"),
    )
    .expect("JWT claims");
    assert_eq!(claims["x-ms-runtime"]["client-payload"]["nonce"], nonce);
    assert_eq!(claims["x-ms-azurevm-attested-pcrs"], json!(ATTESTED_PCRS));

    let proof_with_report = |report: Vec<u8>| {
        let mut proof: Value =
            serde_json::from_slice(&decoded(&info, "/IsolationInfo/Evidence/Proof")).unwrap();
        proof["SnpReport"] = json!(b64url(&report));
        with(
            &info,
            "/IsolationInfo/Evidence/Proof",
            json!(STANDARD.encode(proof.to_string())),
        )
    };
    let snp_report = {
        let proof: Value =
            serde_json::from_slice(&decoded(&info, "/IsolationInfo/Evidence/Proof")).unwrap();
        b64url_decode(proof["SnpReport"].as_str().unwrap()).unwrap()
    };
    let tcg_log = decoded(&info, "/TcgLogs");
    // Every separator measures the same 4 zero bytes; the first one is PCR 0's.
    let separator = {
        use sha2::Digest;
        sha2::Sha256::digest([0u8; 4])
    };
    let first_separator = tcg_log
        .windows(32)
        .position(|w| w == &separator[..])
        .expect("a separator in the event log");
    let other_issuer = common::first_cert_der(std::path::Path::new(emu.var("SKR_EMULATOR_CA")));
    let aik_pub = info["TpmInfo"]["AikPub"].clone();
    let enc_key_pub = info["TpmInfo"]["EncKeyPub"].clone();

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "AikCert issued by another CA (the emulator's TLS CA)",
            with(
                &info,
                "/TpmInfo/AikCert",
                json!(STANDARD.encode(&other_issuer)),
            ),
            "AikCert is not issued by the Azure vTPM CA",
        ),
        (
            "AikPub of another key (the transfer key's)",
            with(&info, "/TpmInfo/AikPub", enc_key_pub.clone()),
            "AikPub is not the key of AikCert",
        ),
        (
            "PcrSignature with a bit flipped",
            flipped(&info, "/TpmInfo/PcrSignature", 17),
            "PcrQuote: signature does not verify",
        ),
        (
            "a PCR value other than the quoted one",
            flipped(&info, "/TpmInfo/PCRs/3/Digest", 0),
            "PCR values do not match the quote's PCR digest",
        ),
        (
            "an event-log digest changed",
            {
                let mut log = tcg_log.clone();
                log[first_separator] ^= 1;
                with(&info, "/TcgLogs", json!(STANDARD.encode(&log)))
            },
            "PCR 0 does not match the TCG event log",
        ),
        (
            "an empty TcgLogs",
            with(&info, "/TcgLogs", json!("")),
            "platform.tcg_log",
        ),
        (
            "RunTimeData changed",
            with(
                &info,
                "/IsolationInfo/Evidence/RunTimeData",
                json!(STANDARD.encode(br#"{"keys":[]}"#)),
            ),
            "RunTimeData is not bound by the hardware report",
        ),
        (
            "SnpReport with a bit flipped (its measurement)",
            {
                let mut report = snp_report.clone();
                report[0x90] ^= 1;
                proof_with_report(report)
            },
            "does not verify with the VCEK",
        ),
        (
            "EncKeyPub swapped for another key (the AK's)",
            with(&info, "/TpmInfo/EncKeyPub", aik_pub.clone()),
            "EncKeyCertifyInfo certifies another key than EncKeyPub",
        ),
        (
            "EncKeyCertifyInfoSignature with a bit flipped",
            flipped(&info, "/TpmInfo/EncKeyCertifyInfoSignature", 17),
            "EncKeyCertifyInfo: signature does not verify",
        ),
    ];
    for (what, tampered, phrase) in cases {
        let (status, body) = attest(emu, &tampered);
        assert_eq!(status, 400, "{what}: {body}");
        let code = body["error"]["code"].as_str().unwrap_or("");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert_eq!(code, "InvalidParameter", "{what}: {body}");
        assert!(message.contains(phrase), "{what}: {message:?}");
    }

    drop(key);
    assert_eq!(
        tpm_leftovers(emu),
        (0, 0),
        "the transfer key and every session are flushed"
    );
}
