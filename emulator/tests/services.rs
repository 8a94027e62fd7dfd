//! Every endpoint of a running emulator, with the documented Azure request shapes.

mod common;

use common::*;
use der::{Decode, Encode};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use signature::Verifier;
use std::sync::OnceLock;

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| Emu::start_shared("services"))
}

async fn vault_token(client: &reqwest::Client) -> String {
    access_token(emu(), client, "https://vault.azure.net").await
}

async fn mhsm_token(client: &reqwest::Client) -> String {
    access_token(emu(), client, "https://managedhsm.azure.net").await
}

fn policy_b64(policy: &Value) -> String {
    b64url(policy.to_string().as_bytes())
}

/// The policy the demo keys use, read back from tls-rsa (so tests follow the platform).
async fn demo_policy(client: &reqwest::Client) -> Value {
    let r = send(
        client
            .get(format!("{}/keys/tls-rsa?api-version=7.4", emu().vault))
            .bearer_auth(vault_token(client).await),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    serde_json::from_slice(&unb64url(
        r.json()["release_policy"]["data"].as_str().unwrap(),
    ))
    .unwrap()
}

#[tokio::test]
async fn imds_token_shape_and_errors() {
    let e = emu();
    let c = e.client();
    let url = format!("{}/metadata/identity/oauth2/token", e.imds);
    let ok = send(
        c.get(&url)
            .query(&[
                ("api-version", "2018-02-01"),
                ("resource", "https://vault.azure.net"),
            ])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(ok.status, 200);
    let body = ok.json();
    for field in ["expires_in", "expires_on", "not_before"] {
        let text = body[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} is a string"));
        assert!(text.parse::<u64>().is_ok(), "{field}={text}");
    }
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert_eq!(body["token_type"], "Bearer");
    let (header, claims, _) = jws_parts(body["access_token"].as_str().unwrap());
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["aud"], "https://vault.azure.net");

    let no_metadata = send(c.get(&url).query(&[
        ("api-version", "2018-02-01"),
        ("resource", "https://vault.azure.net"),
    ]))
    .await;
    assert_eq!(no_metadata.status, 400);
    assert_eq!(no_metadata.json()["error"], "invalid_request");
    assert!(no_metadata.json()["error_description"]
        .as_str()
        .unwrap()
        .to_lowercase()
        .contains("metadata"));

    let proxied = send(
        c.get(&url)
            .query(&[
                ("api-version", "2018-02-01"),
                ("resource", "https://vault.azure.net"),
            ])
            .header("Metadata", "true")
            .header("X-Forwarded-For", "10.0.0.1"),
    )
    .await;
    assert_eq!(proxied.status, 400, "a proxied request is refused");

    let no_resource = send(
        c.get(&url)
            .query(&[("api-version", "2018-02-01")])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(no_resource.status, 400);
    let no_api = send(
        c.get(&url)
            .query(&[("resource", "https://vault.azure.net")])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(no_api.status, 400);
    let two_ids = send(
        c.get(&url)
            .query(&[
                ("api-version", "2018-02-01"),
                ("resource", "https://vault.azure.net"),
                ("client_id", "a"),
                ("object_id", "b"),
            ])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(two_ids.status, 400);
    let user_assigned = send(
        c.get(&url)
            .query(&[
                ("api-version", "2018-02-01"),
                ("resource", "https://managedhsm.azure.net"),
                ("client_id", "1234"),
            ])
            .header("Metadata", "true"),
    )
    .await;
    assert_eq!(user_assigned.status, 200);
    assert_eq!(user_assigned.json()["client_id"], "1234");
}

#[tokio::test]
async fn thim_and_security_context_describe_the_simulated_platform() {
    let e = emu();
    let c = e.client();
    let url = format!("{}/metadata/THIM/amd/certification", e.imds);
    assert_eq!(send(c.get(&url)).await.status, 400);
    let r = send(c.get(&url).header("Metadata", "true")).await;
    assert_eq!(r.status, 200);
    let thim = r.json();
    let vcek =
        x509_cert::Certificate::load_pem_chain(thim["vcekCert"].as_str().unwrap().as_bytes())
            .unwrap();
    let chain = x509_cert::Certificate::load_pem_chain(
        thim["certificateChain"].as_str().unwrap().as_bytes(),
    )
    .unwrap();
    assert_eq!(vcek.len(), 1);
    assert_eq!(chain.len(), 2, "ASK then ARK");
    assert!(chain[1]
        .tbs_certificate
        .subject
        .to_string()
        .contains("ARK-Milan"));
    assert_eq!(thim["cacheControl"], "86400");
    // tcbm = REPORTED_TCB as a little-endian u64 in hex.
    let (report, _) = platform_report(e, &c, &[0u8; 64]).await;
    let tcb = u64::from_le_bytes(report[0x180..0x188].try_into().unwrap());
    assert_eq!(
        u64::from_str_radix(thim["tcbm"].as_str().unwrap(), 16).unwrap(),
        tcb
    );

    // The security-context dir: host data = SHA-256(policy); host-amd-cert = the THIM JSON.
    let sc = e.dir.join("security-context");
    let policy = unb64(
        std::fs::read_to_string(sc.join("security-policy-base64"))
            .unwrap()
            .trim(),
    );
    assert_eq!(&report[0xC0..0xE0], &Sha256::digest(&policy)[..]);
    let host_cert: Value = serde_json::from_slice(&unb64(
        std::fs::read_to_string(sc.join("host-amd-cert-base64"))
            .unwrap()
            .trim(),
    ))
    .unwrap();
    assert_eq!(host_cert, thim);
    let cose = unb64(
        std::fs::read_to_string(sc.join("reference-info-base64"))
            .unwrap()
            .trim(),
    );
    assert_eq!(&cose[..2], &[0xd2, 0x84], "COSE_Sign1: tag 18, array of 4");
}

#[tokio::test]
async fn platform_report_is_a_signed_v3_report() {
    let e = emu();
    let c = e.client();
    let rd = [0x5au8; 64];
    let (report, chain_pem) = platform_report(e, &c, &rd).await;
    assert_eq!(report.len(), 1184);
    assert_eq!(u32::from_le_bytes(report[0..4].try_into().unwrap()), 3);
    assert_eq!(&report[0x50..0x90], &rd[..]);
    let chain = x509_cert::Certificate::load_pem_chain(chain_pem.as_bytes()).unwrap();
    assert_eq!(chain.len(), 3, "VCEK, ASK, ARK");
    // Independent check with the sev crate: chain links (RSA-PSS) and the report signature.
    let ark = sev::certs::snp::Certificate::from_der(&chain[2].to_der().unwrap()).unwrap();
    let ask = sev::certs::snp::Certificate::from_der(&chain[1].to_der().unwrap()).unwrap();
    let vcek = sev::certs::snp::Certificate::from_der(&chain[0].to_der().unwrap()).unwrap();
    use sev::certs::snp::Verifiable;
    (&ark, &ark).verify().expect("ARK self-signed");
    (&ark, &ask).verify().expect("ARK signs ASK");
    (&ask, &vcek).verify().expect("ASK signs VCEK");
    let parsed =
        <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(
            &report,
        )
        .expect("sev parses the report");
    (&vcek, &parsed).verify().expect("VCEK signs the report");
    // VCEK hwID extension (raw 64 bytes) = CHIP_ID.
    let hwid = chain[0]
        .tbs_certificate
        .extensions
        .iter()
        .flatten()
        .find(|x| x.extn_id.to_string() == "1.3.6.1.4.1.3704.1.4")
        .unwrap();
    assert_eq!(hwid.extn_value.as_bytes(), &report[0x1A0..0x1E0]);

    for bad in [
        json!({}),
        json!({"report_data": b64url(&[1u8; 32])}),
        json!({"report_data": "!!"}),
    ] {
        let r = send(
            c.post(format!("{}/platform/snp/report", e.platform))
                .json(&bad),
        )
        .await;
        assert_eq!(r.status, 400, "{bad}");
    }
}

fn verify_rs256_with_x5c(token: &str, x5c0: &str) {
    let cert = x509_cert::Certificate::from_der(&unb64(x5c0)).unwrap();
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .unwrap();
    let key =
        <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki).unwrap();
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = rsa::pkcs1v15::Signature::try_from(unb64url(sig).as_slice()).unwrap();
    rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key)
        .verify(input.as_bytes(), &sig)
        .expect("RS256 signature verifies");
}

#[tokio::test]
async fn maa_token_has_maa_shape_and_verifies_through_jwks() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let token = maa_token(e, &c, &transfer).await;
    let (header, claims, _) = jws_parts(&token);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["jku"], format!("{}/certs", e.maa));
    let oidc = send(c.get(format!("{}/.well-known/openid-configuration", e.maa)))
        .await
        .json();
    assert_eq!(oidc["jwks_uri"], format!("{}/certs", e.maa));
    assert_eq!(oidc["issuer"], e.maa);
    let jwks = send(c.get(format!("{}/certs", e.maa))).await.json();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("kid in JWKS");
    assert_eq!(jwk["kty"], "RSA");
    verify_rs256_with_x5c(&token, jwk["x5c"][0].as_str().unwrap());

    assert_eq!(claims["iss"], e.maa);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        28800
    );
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(claims["nonce"], "n-1");
    assert_eq!(claims["x-ms-ver"], "1.0");
    assert_eq!(claims["x-ms-attestation-type"], "sevsnpvm");
    assert_eq!(claims["x-ms-compliance-status"], "azure-compliant-uvm");
    assert_eq!(claims["x-ms-sevsnpvm-is-debuggable"], false);
    assert_eq!(claims["x-ms-sevsnpvm-vmpl"], 0);
    assert_eq!(claims["x-ms-runtime"]["keys"][0]["kid"], transfer.kid);
    let mut rd = Sha256::digest(&transfer.runtime_data).to_vec();
    rd.extend([0u8; 32]);
    assert_eq!(claims["x-ms-sevsnpvm-reportdata"], hex::encode(rd));
    for name in [
        "x-ms-sevsnpvm-authorkeydigest",
        "x-ms-sevsnpvm-bootloader-svn",
        "x-ms-sevsnpvm-familyId",
        "x-ms-sevsnpvm-guestsvn",
        "x-ms-sevsnpvm-hostdata",
        "x-ms-sevsnpvm-idkeydigest",
        "x-ms-sevsnpvm-imageId",
        "x-ms-sevsnpvm-launchmeasurement",
        "x-ms-sevsnpvm-microcode-svn",
        "x-ms-sevsnpvm-migration-allowed",
        "x-ms-sevsnpvm-reportid",
        "x-ms-sevsnpvm-smt-allowed",
        "x-ms-sevsnpvm-snpfw-svn",
        "x-ms-sevsnpvm-tee-svn",
        "x-ms-policy-hash",
        "jti",
    ] {
        assert!(claims.get(name).is_some(), "claim {name}");
    }
}

#[tokio::test]
async fn maa_accepts_padded_base64_and_any_path_case() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&Sha256::digest(&transfer.runtime_data));
    let (report, chain) = platform_report(e, &c, &rd).await;
    use base64::Engine;
    let padded = base64::engine::general_purpose::URL_SAFE;
    let evidence = json!({"SnpReport": padded.encode(&report), "VcekCertChain": padded.encode(chain.as_bytes())}).to_string();
    // The sidecar's shape: padded base64url, numeric nonce, path SevSnpVM.
    let body = json!({"report": padded.encode(evidence.as_bytes()),
                      "runtimeData": {"data": padded.encode(&transfer.runtime_data), "dataType": "JSON"},
                      "nonce": 1234567890123u64});
    for path in ["/attest/SevSnpVM", "/attest/sevsnpvm", "/ATTEST/SevSnpVm"] {
        let r = send(
            c.post(format!("{}{path}?api-version=2020-10-01", e.maa))
                .json(&body),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        let (_, claims, _) = jws_parts(r.json()["token"].as_str().unwrap());
        assert_eq!(claims["nonce"], "1234567890123");
    }
}

#[tokio::test]
async fn maa_rejects_bad_evidence_with_invalid_parameter() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&Sha256::digest(&transfer.runtime_data));
    let (report, chain) = platform_report(e, &c, &rd).await;
    let url = format!("{}/attest/SevSnpVm?api-version=2022-08-01", e.maa);
    let mut flipped = report.clone();
    flipped[0x90] ^= 0x80;
    let cases = vec![
        (
            "flipped bit",
            attest_body(&flipped, &chain, Some(&transfer.runtime_data), None),
        ),
        (
            "other runtime data",
            attest_body(&report, &chain, Some(b"{\"keys\":[]}"), None),
        ),
        (
            "chain missing",
            attest_body(&report, "", Some(&transfer.runtime_data), None),
        ),
        (
            "no report",
            json!({"runtimeData": {"data": "e30", "dataType": "JSON"}}),
        ),
    ];
    for (what, body) in cases {
        let r = send(c.post(&url).json(&body)).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "InvalidParameter", "{what}");
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    }
    let not_json = send(c.post(&url).body("{nope")).await;
    assert_eq!(not_json.status, 400);
    let no_api = send(
        c.post(format!("{}/attest/SevSnpVm", e.maa))
            .json(&attest_body(&report, &chain, None, None)),
    )
    .await;
    assert_eq!(no_api.status, 400);
    let tdx = send(
        c.post(format!("{}/attest/TdxVm?api-version=2022-08-01", e.maa))
            .json(&json!({})),
    )
    .await;
    let unknown = send(c.get(format!("{}/attest/nothing", e.maa))).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "NotFound");
    assert_eq!(tdx.status, 400);
}

/// A VcekCertChain whose block is truncated (`MIIB`: x509-cert's PEM reader spun forever on
/// it, taking an async worker with it, issue 11) is answered 400 at once, and the service
/// still attests real evidence afterwards.
#[tokio::test]
async fn maa_answers_a_truncated_pem_chain_with_400_at_once() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&Sha256::digest(&transfer.runtime_data));
    let (report, chain) = platform_report(e, &c, &rd).await;
    let url = format!("{}/attest/SevSnpVm?api-version=2022-08-01", e.maa);
    let truncated = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    for hostile in [
        truncated.to_string(),
        format!("{chain}{truncated}"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n".to_string(),
    ] {
        let body = attest_body(&report, &hostile, Some(&transfer.runtime_data), None);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            send(c.post(&url).json(&body)),
        )
        .await
        .expect("MAA did not answer within 10 s");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(r.status, 400, "{}", r.text);
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("VcekCertChain"), "{message}");
    }
    let good = attest_body(&report, &chain, Some(&transfer.runtime_data), None);
    let r = send(c.post(&url).json(&good)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn key_vault_and_managed_hsm_challenge_without_a_valid_token() {
    let e = emu();
    let c = e.client();
    let r = send(c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))).await;
    assert_eq!(r.status, 401);
    let challenge = r.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer authorization=\"https://login.windows.net/"),
        "{challenge}"
    );
    assert!(
        challenge.ends_with("resource=\"https://vault.azure.net\""),
        "{challenge}"
    );
    assert_eq!(r.json()["error"]["code"], "Unauthorized");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("AKV10000"));

    let r = send(
        c.post(format!("{}/keys/data-aes/release?api-version=7.4", e.mhsm))
            .json(&json!({"target": "x"})),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.text.is_empty(), "mHSM answers with an empty body");
    let challenge = r.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("login.microsoftonline.com"),
        "{challenge}"
    );
    assert!(
        challenge.contains("resource=\"https://managedhsm.azure.net\""),
        "{challenge}"
    );

    // A managed-HSM token is not good for the vault, and a forged token for neither.
    let wrong_aud = mhsm_token(&c).await;
    let r = send(
        c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))
            .bearer_auth(&wrong_aud),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("audience"),
        "{}",
        r.text
    );
    let good = vault_token(&c).await;
    let (h, p, _) = good
        .split('.')
        .map(String::from)
        .collect::<Vec<_>>()
        .try_into()
        .map(|v: [String; 3]| (v[0].clone(), v[1].clone(), v[2].clone()))
        .unwrap();
    let forged = format!("{h}.{p}.{}", b64url(&[0u8; 256]));
    let r = send(
        c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))
            .bearer_auth(forged),
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn demo_key_bundles() {
    let e = emu();
    let c = e.client();
    let vt = vault_token(&c).await;
    let rsa_b = send(
        c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(rsa_b["key"]["kty"], "RSA-HSM");
    assert_eq!(unb64url(rsa_b["key"]["n"].as_str().unwrap()).len(), 256);
    assert_eq!(rsa_b["key"]["e"], "AQAB");
    assert_eq!(rsa_b["attributes"]["exportable"], true);
    assert_eq!(rsa_b["attributes"]["enabled"], true);
    let kid = rsa_b["key"]["kid"].as_str().unwrap();
    assert!(
        kid.starts_with(&format!("{}/keys/tls-rsa/", e.vault)),
        "{kid}"
    );
    let version = kid.rsplit('/').next().unwrap();
    let by_version = send(
        c.get(format!(
            "{}/keys/tls-rsa/{version}?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await;
    assert_eq!(by_version.status, 200);
    assert_eq!(by_version.json()["key"]["n"], rsa_b["key"]["n"]);
    let policy: Value =
        serde_json::from_slice(&unb64url(rsa_b["release_policy"]["data"].as_str().unwrap()))
            .unwrap();
    assert_eq!(policy["anyOf"][0]["authority"], e.maa);
    let conditions: Vec<String> = policy["anyOf"][0]["allOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["claim"].as_str().unwrap().to_string())
        .collect();
    for claim in [
        "x-ms-attestation-type",
        "x-ms-compliance-status",
        "x-ms-sevsnpvm-hostdata",
        "x-ms-sevsnpvm-is-debuggable",
        "x-ms-sevsnpvm-vmpl",
    ] {
        assert!(conditions.contains(&claim.to_string()), "{claim}");
    }

    let ec = send(
        c.get(format!("{}/keys/tls-ec?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(ec["key"]["kty"], "EC-HSM");
    assert_eq!(ec["key"]["crv"], "P-256");
    assert_eq!(unb64url(ec["key"]["x"].as_str().unwrap()).len(), 32);
    assert_eq!(unb64url(ec["key"]["y"].as_str().unwrap()).len(), 32);

    let ht = mhsm_token(&c).await;
    let aes = send(
        c.get(format!("{}/keys/data-aes?api-version=7.4", e.mhsm))
            .bearer_auth(&ht),
    )
    .await
    .json();
    assert_eq!(aes["key"]["kty"], "oct-HSM");
    for member in ["k", "n", "e", "x", "y"] {
        assert!(
            aes["key"].get(member).is_none(),
            "no key material: {member}"
        );
    }

    let missing = send(
        c.get(format!("{}/keys/nope?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "KeyNotFound");
    let bad_version = send(
        c.get(format!("{}/keys/tls-rsa/0123?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await;
    assert_eq!(bad_version.status, 404);
    let no_api = send(c.get(format!("{}/keys/tls-rsa", e.vault)).bearer_auth(&vt)).await;
    assert_eq!(no_api.status, 400);

    // The demo certificates: leaf for localhost / 127.0.0.1 with the key's public key, then CA.
    let pem = std::fs::read(e.dir.join("certs/tls-ec.pem")).unwrap();
    let chain = x509_cert::Certificate::load_pem_chain(&pem).unwrap();
    assert_eq!(chain.len(), 2);
    let point = chain[0]
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes()
        .to_vec();
    let mut expected = vec![4u8];
    expected.extend(unb64url(ec["key"]["x"].as_str().unwrap()));
    expected.extend(unb64url(ec["key"]["y"].as_str().unwrap()));
    assert_eq!(point, expected);
    assert_eq!(chain[1].to_der().unwrap(), e.ca_der);
}

#[tokio::test]
async fn create_and_update_follow_the_skr_rules() {
    let e = emu();
    let c = e.client();
    let vt = vault_token(&c).await;
    let policy = demo_policy(&c).await;
    let url = |name: &str, api: &str| format!("{}/keys/{name}/create?api-version={api}", e.vault);
    let create = |name: &'static str, api: &'static str, body: Value| {
        let c = c.clone();
        let vt = vt.clone();
        let u = url(name, api);
        async move { send(c.post(u).bearer_auth(vt).json(&body)).await }
    };
    let expect_error = |r: Response, code: &str| {
        assert_eq!(r.status, 400, "{}", r.text);
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.starts_with(code), "expected {code}: {message}");
    };
    expect_error(
        create(
            "rules-a",
            "7.4",
            json!({"kty": "RSA-HSM", "attributes": {"exportable": true}}),
        )
        .await,
        "AKV.SKR.1004",
    );
    expect_error(
        create(
            "rules-b",
            "7.4",
            json!({"kty": "RSA-HSM", "release_policy": {"data": policy_b64(&policy)}}),
        )
        .await,
        "AKV.SKR.1005",
    );
    expect_error(
        create("rules-c", "7.2", json!({"kty": "RSA-HSM", "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&policy)}})).await,
        "AKV.SKR.1001",
    );
    expect_error(
        create("rules-d", "7.4", json!({"kty": "RSA", "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&policy)}})).await,
        "AKV.SKR.1006",
    );
    let bad_policy = create("rules-e", "7.4", json!({"kty": "RSA-HSM", "attributes": {"exportable": true},
        "release_policy": {"data": policy_b64(&json!({"allOf": [{"authority": e.maa, "allOf": [{"claim": "a", "equals": "b"}]}]}))}})).await;
    assert_eq!(bad_policy.status, 400, "{}", bad_policy.text);
    let oct_on_vault = create("rules-f", "7.4", json!({"kty": "oct-HSM", "key_size": 256})).await;
    assert_eq!(oct_on_vault.status, 400);
    let bad_size = create(
        "rules-g",
        "7.4",
        json!({"kty": "RSA-HSM", "key_size": 1024}),
    )
    .await;
    assert_eq!(bad_size.status, 400);
    let bad_name = send(
        c.post(format!("{}/keys/bad_name!/create?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"kty": "EC-HSM"})),
    )
    .await;
    assert_eq!(bad_name.status, 400);

    // A non-exportable key: fine, and without a policy.
    let plain = create(
        "rules-plain",
        "7.4",
        json!({"kty": "EC-HSM", "crv": "P-384"}),
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text);
    assert_eq!(plain.json()["attributes"]["exportable"], false);
    assert!(plain.json().get("release_policy").is_none());

    // Immutable policy: PATCH refused with 1020; exportable cannot change (1003).
    let immutable = create(
        "rules-immutable",
        "7.4",
        json!({"kty": "RSA-HSM", "attributes": {"exportable": true},
        "release_policy": {"data": policy_b64(&policy), "immutable": true}}),
    )
    .await;
    assert_eq!(immutable.status, 200, "{}", immutable.text);
    assert_eq!(immutable.json()["release_policy"]["immutable"], true);
    let patch = send(
        c.patch(format!("{}/keys/rules-immutable?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"release_policy": {"data": policy_b64(&policy)}})),
    )
    .await;
    expect_error(patch, "AKV.SKR.1020");
    let patch = send(
        c.patch(format!("{}/keys/rules-immutable?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"attributes": {"exportable": false}})),
    )
    .await;
    expect_error(patch, "AKV.SKR.1003");

    // A second version inherits the policy; both versions are addressable.
    let v2 = create(
        "rules-immutable",
        "7.4",
        json!({"kty": "RSA-HSM", "attributes": {"exportable": true}}),
    )
    .await;
    assert_eq!(v2.status, 200, "{}", v2.text);
    assert_ne!(v2.json()["key"]["kid"], immutable.json()["key"]["kid"]);
    assert!(v2.json()["release_policy"]["data"].is_string());
    let latest = send(
        c.get(format!("{}/keys/rules-immutable?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(latest["key"]["kid"], v2.json()["key"]["kid"]);

    // Legacy condition/value policies are accepted and stored as equals.
    let legacy = json!({"version": "1.0", "anyOf": [{"authority": e.maa, "allOf": [{"claim": "x-ms-sevsnpvm-vmpl", "condition": "equals", "value": "0"}]}]});
    let r = create("rules-legacy", "7.4", json!({"kty": "EC-HSM", "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&legacy)}})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let stored: Value = serde_json::from_slice(&unb64url(
        r.json()["release_policy"]["data"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(stored["version"], "1.0.0");
    assert_eq!(
        stored["anyOf"][0]["allOf"][0],
        json!({"claim": "x-ms-sevsnpvm-vmpl", "equals": "0"})
    );
}

/// The public key of a released private key must be the one GET returns.
fn check_released_material(kty: &str, bundle_key: &Value, plaintext: &[u8]) {
    match kty {
        "RSA-HSM" => {
            let key = rsa::RsaPrivateKey::from_pkcs8_der(plaintext).expect("PKCS#8 RSA");
            assert_eq!(
                b64url(&key.n().to_bytes_be()),
                bundle_key["n"].as_str().unwrap()
            );
            assert_eq!(
                b64url(&key.e().to_bytes_be()),
                bundle_key["e"].as_str().unwrap()
            );
        }
        "EC-HSM" => {
            let point = match bundle_key["crv"].as_str().unwrap() {
                "P-256" => p256::SecretKey::from_pkcs8_der(plaintext)
                    .unwrap()
                    .public_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
                "P-384" => p384::SecretKey::from_pkcs8_der(plaintext)
                    .unwrap()
                    .public_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
                "P-521" => p521::SecretKey::from_pkcs8_der(plaintext)
                    .unwrap()
                    .public_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
                other => panic!("curve {other}"),
            };
            let coord = (point.len() - 1) / 2;
            assert_eq!(
                b64url(&point[1..1 + coord]),
                bundle_key["x"].as_str().unwrap()
            );
            assert_eq!(
                b64url(&point[1 + coord..]),
                bundle_key["y"].as_str().unwrap()
            );
        }
        other => panic!("kty {other}"),
    }
}

#[tokio::test]
async fn release_round_trips_for_every_key_type_and_enc() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let target = maa_token(e, &c, &transfer).await;
    let policy = demo_policy(&c).await;
    let vt = vault_token(&c).await;
    let ht = mhsm_token(&c).await;
    let mut cases: Vec<(String, &str, String, Value)> = Vec::new();
    for size in [2048, 3072, 4096] {
        cases.push((
            e.vault.clone(),
            "RSA-HSM",
            vt.clone(),
            json!({"kty": "RSA-HSM", "key_size": size}),
        ));
    }
    for crv in ["P-256", "P-384", "P-521"] {
        cases.push((
            e.vault.clone(),
            "EC-HSM",
            vt.clone(),
            json!({"kty": "EC-HSM", "crv": crv}),
        ));
    }
    cases.push((
        e.mhsm.clone(),
        "RSA-HSM",
        ht.clone(),
        json!({"kty": "RSA-HSM", "key_size": 2048}),
    ));
    cases.push((
        e.mhsm.clone(),
        "EC-HSM",
        ht.clone(),
        json!({"kty": "EC-HSM", "crv": "P-256"}),
    ));
    for (i, (base, kty, token, mut body)) in cases.into_iter().enumerate() {
        body["attributes"] = json!({"exportable": true});
        body["release_policy"] =
            json!({"contentType": "application/json; charset=utf-8", "data": policy_b64(&policy)});
        let name = format!("roundtrip-{i}");
        let created = send(
            c.post(format!("{base}/keys/{name}/create?api-version=7.4"))
                .bearer_auth(&token)
                .json(&body),
        )
        .await;
        assert_eq!(created.status, 200, "{body}: {}", created.text);
        let bundle = created.json();
        for enc in [
            "CKM_RSA_AES_KEY_WRAP",
            "RSA_AES_KEY_WRAP_256",
            "RSA_AES_KEY_WRAP_384",
        ] {
            let r = send(
                c.post(format!("{base}/keys/{name}/release?api-version=7.4"))
                    .bearer_auth(&token)
                    .json(&json!({"target": target, "enc": enc})),
            )
            .await;
            assert_eq!(r.status, 200, "{name} {enc}: {}", r.text);
            let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
            let released = &payload["response"]["key"]["key"];
            let key_hsm: Value =
                serde_json::from_slice(&unb64url(released["key_hsm"].as_str().unwrap())).unwrap();
            assert_eq!(key_hsm["schema_version"], "1.0");
            assert_eq!(
                key_hsm["header"],
                json!({"kid": transfer.kid, "alg": "dir", "enc": enc})
            );
            let plain = unwrap(
                &transfer.key,
                enc,
                &unb64url(key_hsm["ciphertext"].as_str().unwrap()),
            )
            .expect("unwrap");
            check_released_material(kty, &bundle["key"], &plain);
            assert_eq!(released["kid"], bundle["key"]["kid"]);
        }
    }

    // Imported keys come back byte for byte: oct on the managed HSM, RSA on the vault.
    let k: [u8; 32] = rand::random();
    let imported = send(c.put(format!("{}/keys/imported-aes?api-version=7.4", e.mhsm)).bearer_auth(&ht).json(&json!({
        "key": {"kty": "oct-HSM", "k": b64url(&k), "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"]},
        "hsm": true,
        "attributes": {"exportable": true},
        "release_policy": {"data": policy_b64(&policy)}}))).await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    assert!(imported.json()["key"].get("k").is_none());
    for enc in [
        "CKM_RSA_AES_KEY_WRAP",
        "RSA_AES_KEY_WRAP_256",
        "RSA_AES_KEY_WRAP_384",
    ] {
        let r = send(
            c.post(format!(
                "{}/keys/imported-aes/release?api-version=7.4",
                e.mhsm
            ))
            .bearer_auth(&ht)
            .json(&json!({"target": target, "enc": enc})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
        let key_hsm: Value = serde_json::from_slice(&unb64url(
            payload["response"]["key"]["key"]["key_hsm"]
                .as_str()
                .unwrap(),
        ))
        .unwrap();
        assert_eq!(
            unwrap(
                &transfer.key,
                enc,
                &unb64url(key_hsm["ciphertext"].as_str().unwrap())
            )
            .unwrap(),
            k
        );
    }
    let demo = send(
        c.post(format!("{}/keys/data-aes/release?api-version=7.4", e.mhsm))
            .bearer_auth(&ht)
            .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(demo.status, 200, "{}", demo.text);
    let (_, payload, _) = jws_parts(demo.json()["value"].as_str().unwrap());
    let key_hsm: Value = serde_json::from_slice(&unb64url(
        payload["response"]["key"]["key"]["key_hsm"]
            .as_str()
            .unwrap(),
    ))
    .unwrap();
    assert_eq!(
        key_hsm["header"]["enc"], "CKM_RSA_AES_KEY_WRAP",
        "default enc"
    );
    assert_eq!(
        unwrap(
            &transfer.key,
            "CKM_RSA_AES_KEY_WRAP",
            &unb64url(key_hsm["ciphertext"].as_str().unwrap())
        )
        .unwrap()
        .len(),
        32
    );

    // EC import: the released PKCS#8 holds the imported scalar.
    let ec_key = p384::SecretKey::random(&mut rand::rngs::OsRng);
    let point = ec_key.public_key().to_encoded_point(false);
    let ec_jwk = json!({"kty": "EC-HSM", "crv": "P-384", "d": b64url(&ec_key.to_bytes()),
        "x": b64url(point.x().unwrap()), "y": b64url(point.y().unwrap())});
    let imported = send(c.put(format!("{}/keys/imported-ec?api-version=7.4", e.vault)).bearer_auth(&vt).json(&json!({
        "key": ec_jwk, "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&policy)}}))).await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    assert_eq!(imported.json()["key"]["x"], ec_jwk["x"]);
    assert!(
        imported.json()["key"].get("d").is_none(),
        "no private part in a KeyBundle"
    );
    let r = send(
        c.post(format!(
            "{}/keys/imported-ec/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target, "enc": "RSA_AES_KEY_WRAP_384"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
    let key_hsm: Value = serde_json::from_slice(&unb64url(
        payload["response"]["key"]["key"]["key_hsm"]
            .as_str()
            .unwrap(),
    ))
    .unwrap();
    let plain = unwrap(
        &transfer.key,
        "RSA_AES_KEY_WRAP_384",
        &unb64url(key_hsm["ciphertext"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(
        p384::SecretKey::from_pkcs8_der(&plain).unwrap().to_bytes(),
        ec_key.to_bytes()
    );

    let rsa_key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let primes = rsa_key.primes();
    let jwk = json!({"kty": "RSA", "n": b64url(&rsa_key.n().to_bytes_be()), "e": b64url(&rsa_key.e().to_bytes_be()),
        "d": b64url(&rsa_key.d().to_bytes_be()), "p": b64url(&primes[0].to_bytes_be()), "q": b64url(&primes[1].to_bytes_be())});
    let imported = send(c.put(format!("{}/keys/imported-rsa?api-version=7.4", e.vault)).bearer_auth(&vt).json(&json!({
        "key": jwk, "Hsm": true, "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&policy)}}))).await;
    assert_eq!(imported.status, 200, "{}", imported.text);
    assert_eq!(imported.json()["key"]["kty"], "RSA-HSM");
    let r = send(
        c.post(format!(
            "{}/keys/imported-rsa/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target, "enc": "RSA_AES_KEY_WRAP_256"})),
    )
    .await;
    let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
    let key_hsm: Value = serde_json::from_slice(&unb64url(
        payload["response"]["key"]["key"]["key_hsm"]
            .as_str()
            .unwrap(),
    ))
    .unwrap();
    let plain = unwrap(
        &transfer.key,
        "RSA_AES_KEY_WRAP_256",
        &unb64url(key_hsm["ciphertext"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(rsa::RsaPrivateKey::from_pkcs8_der(&plain).unwrap(), rsa_key);
}

fn verify_cert_signed_by(cert: &x509_cert::Certificate, issuer: &x509_cert::Certificate) {
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        issuer
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .expect("P-256 issuer");
    let sig = p256::ecdsa::DerSignature::try_from(cert.signature.raw_bytes()).unwrap();
    key.verify(&cert.tbs_certificate.to_der().unwrap(), &sig)
        .expect("certificate signature");
}

#[tokio::test]
async fn release_jws_is_signed_like_key_vault() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let target = maa_token(e, &c, &transfer).await;
    let vt = vault_token(&c).await;
    let bundle = send(
        c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await
    .json();
    let version = bundle["key"]["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    // The three URL forms: version-less, the SDKs' empty version, and versioned.
    for (path, requested) in [
        (
            "/keys/tls-rsa/release".to_string(),
            format!("{}/keys/tls-rsa", e.vault),
        ),
        (
            "/keys/tls-rsa//release".to_string(),
            format!("{}/keys/tls-rsa", e.vault),
        ),
        (
            format!("/keys/tls-rsa/{version}/release"),
            format!("{}/keys/tls-rsa/{version}", e.vault),
        ),
    ] {
        let r = send(
            c.post(format!("{}{path}?api-version=7.3", e.vault))
                .bearer_auth(&vt)
                .json(
                    &json!({"target": target, "nonce": "ADE0101", "enc": "RSA_AES_KEY_WRAP_256"}),
                ),
        )
        .await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        let jws = r.json()["value"].as_str().unwrap().to_string();
        let (header, payload, _) = jws_parts(&jws);
        assert_eq!(
            payload["request"],
            json!({"api-version": "7.3", "enc": "RSA_AES_KEY_WRAP_256", "kid": requested, "nonce": "ADE0101"})
        );
        assert_eq!(
            payload["response"]["key"]["key"]["kid"],
            bundle["key"]["kid"]
        );
        assert_eq!(payload["response"]["key"]["key"]["n"], bundle["key"]["n"]);
        assert_eq!(payload["response"]["key"]["attributes"]["exportable"], true);
        assert_eq!(
            payload["response"]["key"]["release_policy"]["data"],
            bundle["release_policy"]["data"]
        );
        assert!(
            payload["response"]["key"]["release_policy"]
                .get("contentType")
                .is_none(),
            "vault omits contentType"
        );
        let key_hsm_text = String::from_utf8(unb64url(
            payload["response"]["key"]["key"]["key_hsm"]
                .as_str()
                .unwrap(),
        ))
        .unwrap();
        assert!(
            key_hsm_text.starts_with(
                r#"{"schema_version":"1.0","header":{"kid":"transfer-key","alg":"dir""#
            ),
            "{key_hsm_text}"
        );
        let policy_text = String::from_utf8(unb64url(
            payload["response"]["key"]["release_policy"]["data"]
                .as_str()
                .unwrap(),
        ))
        .unwrap();
        assert!(
            policy_text.starts_with(r#"{"version":"1.0.0","anyOf":[{"authority":"#),
            "{policy_text}"
        );
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        let x5c: Vec<Vec<u8>> = header["x5c"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| unb64(v.as_str().unwrap()))
            .collect();
        assert_eq!(x5c.len(), 3);
        assert_eq!(
            header["kid"],
            hex::encode_upper(<sha1::Sha1 as Digest>::digest(&x5c[0]))
        );
        assert_eq!(
            header["x5t"],
            b64url(&<sha1::Sha1 as Digest>::digest(&x5c[0]))
        );
        assert_eq!(header["x5t#S256"], b64url(&Sha256::digest(&x5c[0])));
        assert_eq!(x5c[2], e.ca_der, "chain ends at the emulator CA");
        let certs: Vec<x509_cert::Certificate> = x5c
            .iter()
            .map(|d| x509_cert::Certificate::from_der(d).unwrap())
            .collect();
        verify_cert_signed_by(&certs[0], &certs[1]);
        verify_cert_signed_by(&certs[1], &certs[2]);
        let san = certs[0]
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|x| x.extn_id.to_string() == "2.5.29.17")
            .expect("SAN");
        let san =
            x509_cert::ext::pkix::SubjectAltName::from_der(san.extn_value.as_bytes()).unwrap();
        let names = format!("{:?}", san.0);
        assert!(
            names.contains("localhost") && names.contains("[127, 0, 0, 1]"),
            "{names}"
        );
        verify_rs256_with_x5c(&jws, header["x5c"][0].as_str().unwrap());
    }

    // Managed HSM header: kid = x5t#S256, no typ / x5t; the payload policy has contentType.
    let ht = mhsm_token(&c).await;
    let r = send(
        c.post(format!("{}/keys/data-aes/release?api-version=7.4", e.mhsm))
            .bearer_auth(&ht)
            .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (header, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
    assert_eq!(header["kid"], header["x5t#S256"]);
    assert!(header.get("typ").is_none() && header.get("x5t").is_none());
    assert!(payload["response"]["key"]["release_policy"]["contentType"].is_string());
    assert_eq!(payload["request"]["enc"], "CKM_RSA_AES_KEY_WRAP");
}

async fn counters(c: &reqwest::Client) -> Value {
    send(c.get(format!("{}/admin/counters", emu().platform)))
        .await
        .json()
}

#[tokio::test]
async fn denied_release_names_the_failed_condition() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let target = maa_token(e, &c, &transfer).await;
    let vt = vault_token(&c).await;
    let before = counters(&c).await["release_denied"]["denied-rsa"]
        .as_u64()
        .unwrap_or(0);
    let r = send(
        c.post(format!(
            "{}/keys/denied-rsa/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target, "enc": "RSA_AES_KEY_WRAP_256"})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "Forbidden");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("x-ms-sevsnpvm-launchmeasurement"),
        "{message}"
    );
    let after = counters(&c).await["release_denied"]["denied-rsa"]
        .as_u64()
        .unwrap();
    assert!(after > before);
    let log = send(c.get(format!("{}/admin/log", e.platform))).await.text;
    assert!(
        log.lines().any(|l| l.contains("release-denied")
            && l.contains("denied-rsa")
            && l.contains("launchmeasurement")),
        "{log}"
    );
    let file_log = std::fs::read_to_string(e.dir.join("emulator.log")).unwrap();
    assert!(file_log.contains("release-denied"));

    // A policy update changes the decision: require VMPL 1 on a fresh key, then relax it.
    let mut policy = demo_policy(&c).await;
    let created = send(c.post(format!("{}/keys/policy-switch/create?api-version=7.4", e.vault)).bearer_auth(&vt)
        .json(&json!({"kty": "EC-HSM", "attributes": {"exportable": true}, "release_policy": {"data": policy_b64(&policy)}}))).await;
    assert_eq!(created.status, 200, "{}", created.text);
    let strict = {
        let mut p = policy.clone();
        p["anyOf"][0]["allOf"]
            .as_array_mut()
            .unwrap()
            .push(json!({"claim": "x-ms-sevsnpvm-vmpl", "equals": 1}));
        p
    };
    let patched = send(
        c.patch(format!("{}/keys/policy-switch?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"release_policy": {"data": policy_b64(&strict)}})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    let r = send(
        c.post(format!(
            "{}/keys/policy-switch/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.text.contains("x-ms-sevsnpvm-vmpl"), "{}", r.text);
    // Another authority: denied because the token's issuer is not in the policy.
    policy["anyOf"][0]["authority"] = json!("https://sharedeus.eus.attest.azure.net/");
    send(
        c.patch(format!("{}/keys/policy-switch?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"release_policy": {"data": policy_b64(&policy)}})),
    )
    .await;
    let r = send(
        c.post(format!(
            "{}/keys/policy-switch/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.text.contains("not an authority"), "{}", r.text);
    // The same authority with a trailing slash is the same authority.
    policy["anyOf"][0]["authority"] = json!(format!("{}/", e.maa));
    send(
        c.patch(format!("{}/keys/policy-switch?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"release_policy": {"data": policy_b64(&policy)}})),
    )
    .await;
    let r = send(
        c.post(format!(
            "{}/keys/policy-switch/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        counters(&c).await["releases"]["policy-switch"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

#[tokio::test]
async fn release_request_errors() {
    let e = emu();
    let c = e.client();
    let vt = vault_token(&c).await;
    let url = format!("{}/keys/tls-rsa/release", e.vault);
    let transfer = transfer_key();
    let target = maa_token(e, &c, &transfer).await;
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({})),
    )
    .await;
    assert_eq!(r.status, 400, "missing target");
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({"target": target, "enc": "AES"})),
    )
    .await;
    assert_eq!(r.status, 400, "bad enc");
    let r = send(
        c.post(format!("{url}?api-version=7.2"))
            .bearer_auth(&vt)
            .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 400, "api-version before 7.3");
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({"target": "not-a-jwt"})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    // A token from an issuer the policy does not name is refused before that issuer is
    // contacted (an unreachable host proves no fetch happened: the answer is immediate).
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let foreign = format!(
        "{}.{}.c2ln",
        b64(&json!({"alg": "RS256", "jku": "https://issuer.invalid/certs"})),
        b64(&json!({"iss": "https://issuer.invalid", "exp": 4_000_000_000u64}))
    );
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({"target": foreign})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.text.contains("is not an authority of the policy"),
        "{}",
        r.text
    );
    let r = send(
        c.post(format!("{}/keys/nope/release?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 404);
    // A token signed by someone else (here: the Entra key, iss not a trusted authority).
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({"target": vt})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // Disabled or expired keys are not released.
    let policy = demo_policy(&c).await;
    let created = send(c.post(format!("{}/keys/expired-key/create?api-version=7.4", e.vault)).bearer_auth(&vt)
        .json(&json!({"kty": "EC-HSM", "attributes": {"exportable": true, "exp": 1_000_000_000u64}, "release_policy": {"data": b64url(policy.to_string().as_bytes())}}))).await;
    assert_eq!(created.status, 200, "{}", created.text);
    let r = send(
        c.post(format!(
            "{}/keys/expired-key/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    let patched = send(
        c.patch(format!("{}/keys/expired-key?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"attributes": {"exp": null, "enabled": false}})),
    )
    .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.json()["attributes"]["enabled"], false);
    let r = send(
        c.post(format!(
            "{}/keys/expired-key/release?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("disabled"), "{}", r.text);

    // A token whose runtime data has no RSA encryption key cannot be released to.
    let runtime =
        br#"{"keys":[{"kid":"sig","kty":"RSA","key_ops":["verify"],"e":"AQAB","n":"AQAB"}]}"#;
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&Sha256::digest(runtime));
    let (report, chain) = platform_report(e, &c, &rd).await;
    let attested = send(
        c.post(format!("{}/attest/SevSnpVm?api-version=2022-08-01", e.maa))
            .json(&attest_body(&report, &chain, Some(runtime), None)),
    )
    .await;
    let no_enc_key = attested.json()["token"].as_str().unwrap().to_string();
    let r = send(
        c.post(format!("{url}?api-version=7.4"))
            .bearer_auth(&vt)
            .json(&json!({"target": no_enc_key})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("x-ms-runtime"), "{}", r.text);
}

/// The test unwrap is itself proved against the sidecar's published vector.
#[test]
fn test_unwrap_matches_the_published_vector() {
    let vector: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/akv/unwrap-vector-ckm-rsa-aes-key-wrap.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let key = <rsa::RsaPrivateKey as rsa::pkcs1::DecodeRsaPrivateKey>::from_pkcs1_pem(
        vector["wrapping_private_key_pkcs1_pem"].as_str().unwrap(),
    )
    .unwrap();
    let ciphertext = unb64url(vector["ciphertext_b64url"].as_str().unwrap());
    assert_eq!(ciphertext.len(), 296);
    let plain = unwrap(&key, "CKM_RSA_AES_KEY_WRAP", &ciphertext).unwrap();
    assert_eq!(
        hex::encode(plain),
        vector["expected_plaintext_hex"].as_str().unwrap()
    );
    assert!(unwrap(&key, "RSA_AES_KEY_WRAP_256", &ciphertext).is_err());
}

fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The other identity sources the module supports: App Service `IDENTITY_ENDPOINT`, AKS
/// workload identity (Entra v2 token endpoint), and token files.
#[tokio::test]
async fn identity_endpoint_workload_identity_and_token_files() {
    let e = emu();
    let c = e.client();
    let env = read_env(&e.dir);
    let identity_dir = e.dir.join("identity");
    let get_key = |token: String, base: String| {
        let c = c.clone();
        async move {
            send(
                c.get(format!("{base}/keys/tls-ec?api-version=7.4"))
                    .bearer_auth(token),
            )
            .await
            .status
        }
    };

    let endpoint = &env["SKR_EMULATOR_IDENTITY_ENDPOINT"];
    let secret = std::fs::read_to_string(identity_dir.join("identity-header")).unwrap();
    let query = [
        ("api-version", "2019-08-01"),
        ("resource", "https://vault.azure.net"),
    ];
    assert_eq!(send(c.get(endpoint).query(&query)).await.status, 401);
    assert_eq!(
        send(
            c.get(endpoint)
                .query(&query)
                .header("X-IDENTITY-HEADER", "wrong")
        )
        .await
        .status,
        401
    );
    let r = send(
        c.get(endpoint)
            .query(&query)
            .header("X-IDENTITY-HEADER", secret.trim()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["resource"], "https://vault.azure.net");
    assert_eq!(
        get_key(
            r.json()["access_token"].as_str().unwrap().to_string(),
            e.vault.clone()
        )
        .await,
        200
    );

    let url = format!(
        "{}/{}/oauth2/v2.0/token",
        env["SKR_EMULATOR_AUTHORITY_HOST"], env["SKR_EMULATOR_TENANT_ID"]
    );
    let assertion = std::fs::read_to_string(identity_dir.join("federated-token")).unwrap();
    let form = |assertion: &str, scope: &str| {
        form_encode(&[
            ("client_assertion", assertion),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", "11111111-2222-3333-4444-555555555555"),
            ("grant_type", "client_credentials"),
            ("scope", scope),
        ])
    };
    let post = |url: String, body: String| {
        let c = c.clone();
        async move {
            send(
                c.post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await
        }
    };
    let r = post(
        url.clone(),
        form(assertion.trim(), "https://managedhsm.azure.net/.default"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["token_type"], "Bearer");
    assert!(r.json()["expires_in"].is_u64(), "Entra v2 sends numbers");
    let token = r.json()["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        send(
            c.get(format!("{}/keys/data-aes?api-version=7.4", e.mhsm))
                .bearer_auth(&token)
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get_key(token, e.vault.clone()).await,
        401,
        "audience is the managed HSM"
    );

    let forged = format!(
        "{}.{}",
        assertion.trim().rsplit_once('.').unwrap().0,
        b64url(&[1u8; 256])
    );
    let r = post(
        url.clone(),
        form(&forged, "https://vault.azure.net/.default"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_client");
    let r = post(
        url.clone(),
        form(assertion.trim(), "https://vault.azure.net"),
    )
    .await;
    assert_eq!(r.status, 400, "scope needs /.default");
    let wrong_tenant = url.replace(
        &env["SKR_EMULATOR_TENANT_ID"],
        "00000000-0000-0000-0000-000000000000",
    );
    assert_eq!(
        post(
            wrong_tenant,
            form(assertion.trim(), "https://vault.azure.net/.default")
        )
        .await
        .status,
        400
    );

    let vault_file = std::fs::read_to_string(identity_dir.join("vault-token")).unwrap();
    assert_eq!(
        get_key(vault_file.trim().to_string(), e.vault.clone()).await,
        200
    );
    let mhsm_file = std::fs::read_to_string(identity_dir.join("mhsm-token")).unwrap();
    assert_eq!(
        send(
            c.get(format!("{}/keys/data-aes?api-version=7.4", e.mhsm))
                .bearer_auth(mhsm_file.trim())
        )
        .await
        .status,
        200
    );
}

/// Releases `url` for `target` and returns the released `kid` and the unwrapped plaintext.
async fn release_plain(
    c: &reqwest::Client,
    url: &str,
    token: &str,
    target: &str,
    transfer: &Transfer,
) -> (String, Vec<u8>) {
    let r = send(
        c.post(url)
            .bearer_auth(token)
            .json(&json!({"target": target, "enc": "RSA_AES_KEY_WRAP_256"})),
    )
    .await;
    assert_eq!(r.status, 200, "{url}: {}", r.text);
    let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
    let released = &payload["response"]["key"]["key"];
    let key_hsm: Value =
        serde_json::from_slice(&unb64url(released["key_hsm"].as_str().unwrap())).unwrap();
    let plain = unwrap(
        &transfer.key,
        "RSA_AES_KEY_WRAP_256",
        &unb64url(key_hsm["ciphertext"].as_str().unwrap()),
    )
    .expect("unwrap");
    (released["kid"].as_str().unwrap().to_string(), plain)
}

#[tokio::test]
async fn rotation_makes_a_new_version_that_unversioned_calls_follow() {
    let e = emu();
    let c = e.client();
    let transfer = transfer_key();
    let target = maa_token(e, &c, &transfer).await;
    let policy = demo_policy(&c).await;
    let vt = vault_token(&c).await;
    let created = send(
        c.post(format!(
            "{}/keys/rotating-rsa/create?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt)
        .json(
            &json!({"kty": "RSA-HSM", "key_size": 3072, "key_ops": ["sign", "verify"],
                "tags": {"purpose": "rotation"}, "attributes": {"exportable": true},
                "release_policy": {"data": policy_b64(&policy)}}),
        ),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let v1 = created.json();

    let rotated = send(
        c.post(format!(
            "{}/keys/rotating-rsa/rotate?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let v2 = rotated.json();
    let kid1 = v1["key"]["kid"].as_str().unwrap();
    let kid2 = v2["key"]["kid"].as_str().unwrap();
    assert_ne!(kid1, kid2);
    assert!(kid2.starts_with(&format!("{}/keys/rotating-rsa/", e.vault)));
    // Same type, size, operations, exportable flag, policy and tags; new material.
    assert_eq!(v2["key"]["kty"], "RSA-HSM");
    assert_eq!(unb64url(v2["key"]["n"].as_str().unwrap()).len(), 384);
    assert_ne!(v2["key"]["n"], v1["key"]["n"]);
    assert_eq!(v2["key"]["key_ops"], json!(["sign", "verify"]));
    assert_eq!(v2["attributes"]["exportable"], true);
    assert_eq!(v2["attributes"]["enabled"], true);
    assert_eq!(v2["release_policy"], v1["release_policy"]);
    assert_eq!(v2["tags"], json!({"purpose": "rotation"}));

    // Unversioned GET and release follow the new version; the old one stays addressable.
    let latest = send(
        c.get(format!("{}/keys/rotating-rsa?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(latest["key"]["kid"], kid2);
    let versions = send(
        c.get(format!(
            "{}/keys/rotating-rsa/versions?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(versions["value"].as_array().unwrap().len(), 2);
    let unversioned = format!("{}/keys/rotating-rsa/release?api-version=7.4", e.vault);
    let (kid, plain) = release_plain(&c, &unversioned, &vt, &target, &transfer).await;
    assert_eq!(kid, kid2);
    check_released_material("RSA-HSM", &v2["key"], &plain);
    let pinned = format!("{kid1}/release?api-version=7.4");
    let (kid, plain) = release_plain(&c, &pinned, &vt, &target, &transfer).await;
    assert_eq!(kid, kid1);
    check_released_material("RSA-HSM", &v1["key"], &plain);

    // UpdateKey on the new version (PATCH /keys/{name}/{version}) replaces its policy: the
    // next unversioned release is judged by it; the pinned old version keeps its own.
    let strict = {
        let mut p = policy.clone();
        p["anyOf"][0]["allOf"]
            .as_array_mut()
            .unwrap()
            .push(json!({"claim": "x-ms-sevsnpvm-vmpl", "equals": 1}));
        p
    };
    let patch = |p: Value| {
        let c = c.clone();
        let (url, vt) = (format!("{kid2}?api-version=7.4"), vt.clone());
        async move {
            send(
                c.patch(url)
                    .bearer_auth(vt)
                    .json(&json!({"release_policy": {"data": policy_b64(&p)}})),
            )
            .await
        }
    };
    let r = patch(strict).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["key"]["kid"], kid2);
    let r = send(
        c.post(&unversioned)
            .bearer_auth(&vt)
            .json(&json!({"target": target})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("x-ms-sevsnpvm-vmpl"), "{}", r.text);
    release_plain(&c, &pinned, &vt, &target, &transfer).await;
    assert_eq!(patch(policy.clone()).await.status, 200);
    let (kid, _) = release_plain(&c, &unversioned, &vt, &target, &transfer).await;
    assert_eq!(kid, kid2);

    // A rotation inherits the updated policy.
    let v3 = send(
        c.post(format!(
            "{}/keys/rotating-rsa/rotate?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await
    .json();
    assert_eq!(v3["release_policy"], latest["release_policy"]);

    // Rotation needs api-version 7.3+ and an existing key.
    let old_api = send(
        c.post(format!(
            "{}/keys/rotating-rsa/rotate?api-version=7.2",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await;
    assert_eq!(old_api.status, 400, "{}", old_api.text);
    let missing = send(
        c.post(format!(
            "{}/keys/no-such-key/rotate?api-version=7.4",
            e.vault
        ))
        .bearer_auth(&vt),
    )
    .await;
    assert_eq!(missing.status, 404, "{}", missing.text);
    assert_eq!(missing.json()["error"]["code"], "KeyNotFound");

    // Managed HSM: an AES key rotates to a new key of the same size.
    let ht = mhsm_token(&c).await;
    let created = send(
        c.post(format!(
            "{}/keys/rotating-aes/create?api-version=7.4",
            e.mhsm
        ))
        .bearer_auth(&ht)
        .json(
            &json!({"kty": "oct-HSM", "key_size": 128, "attributes": {"exportable": true},
                "release_policy": {"data": policy_b64(&policy)}}),
        ),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text);
    let url = format!("{}/keys/rotating-aes/release?api-version=7.4", e.mhsm);
    let (kid_a, aes_a) = release_plain(&c, &url, &ht, &target, &transfer).await;
    let rotated = send(
        c.post(format!(
            "{}/keys/rotating-aes/rotate?api-version=7.4",
            e.mhsm
        ))
        .bearer_auth(&ht),
    )
    .await;
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let (kid_b, aes_b) = release_plain(&c, &url, &ht, &target, &transfer).await;
    assert_eq!(kid_b, rotated.json()["key"]["kid"].as_str().unwrap());
    assert_ne!(kid_a, kid_b);
    assert_eq!((aes_a.len(), aes_b.len()), (16, 16));
    assert_ne!(aes_a, aes_b);
}
