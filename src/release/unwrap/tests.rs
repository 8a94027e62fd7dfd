use super::*;
use crate::release::transfer_key::{rsa_thumbprint, SoftwareTransferKey};
use aws_lc_rs::encoding::AsDer;
use cryptoki_sys::CKR_GENERAL_ERROR;

fn testdata(rel: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Vector {
    key: SoftwareTransferKey,
    jwk_kid: String,
    ciphertext: Vec<u8>,
    expected: Vec<u8>,
}

/// The sidecar's verified unwrap vector: CKM_RSA_AES_KEY_WRAP to a known RSA-2048 key.
fn vector() -> Vector {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::EncodePrivateKey;
    let v: Value =
        serde_json::from_slice(&testdata("akv/unwrap-vector-ckm-rsa-aes-key-wrap.json")).unwrap();
    let pem = v["wrapping_private_key_pkcs1_pem"].as_str().unwrap();
    let pkcs8 = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
        .unwrap()
        .to_pkcs8_der()
        .unwrap();
    Vector {
        key: SoftwareTransferKey::from_pkcs8(pkcs8.as_bytes()).unwrap(),
        jwk_kid: v["wrapping_public_jwks_as_sent_in_runtimeData"]["keys"][0]["kid"]
            .as_str()
            .unwrap()
            .to_string(),
        ciphertext: b64url_decode(v["ciphertext_b64url"].as_str().unwrap()).unwrap(),
        expected: hex::decode(v["expected_plaintext_hex"].as_str().unwrap()).unwrap(),
    }
}

fn envelope(v: &Vector, kid: &str, enc: &str) -> KeyHsm {
    KeyHsm {
        kid: kid.to_string(),
        enc: enc.to_string(),
        ciphertext: v.ciphertext.clone(),
    }
}

#[test]
fn known_answer_vector_unwraps_to_the_expected_key() {
    let v = vector();
    // Our RFC 7638 thumbprint is the kid the vector's JWKS carries.
    assert_eq!(v.key.public_jwk().kid, v.jwk_kid);
    assert_eq!(v.ciphertext.len(), 296);
    let hsm = envelope(&v, &v.jwk_kid, "CKM_RSA_AES_KEY_WRAP");
    let out = unwrap_key_hsm(&hsm, &v.key, WrapAlg::CkmRsaAesKeyWrap).unwrap();
    assert_eq!(out.as_slice(), v.expected.as_slice());
    // And it is a valid oct key of 256 bits.
    match check_material(
        "oct",
        out,
        &PublicKeyInfo::Oct {
            key_size: Some(256),
        },
    )
    .unwrap()
    {
        KeyMaterial::Raw(k) => assert_eq!(k.len(), 32),
        KeyMaterial::Pkcs8(_) => panic!("oct must be raw"),
    }
}

#[test]
fn vector_negative_cases() {
    let v = vector();
    // Same ciphertext read as RSA_AES_KEY_WRAP_256 (OAEP-SHA-256): OAEP fails.
    let hsm = envelope(&v, &v.jwk_kid, "RSA_AES_KEY_WRAP_256");
    let e = unwrap_key_hsm(&hsm, &v.key, WrapAlg::RsaAesKeyWrap256).unwrap_err();
    assert_eq!(e.rv(), CKR_GENERAL_ERROR);
    assert_eq!(e.step(), Some(Step::Unwrap));
    assert!(e.message().contains("RSA-OAEP"), "{}", e.message());
    // A different RSA key (claiming the same kid): OAEP fails.
    let other = SoftwareTransferKey::generate().unwrap();
    let hsm = envelope(&v, &other.public_jwk().kid, "CKM_RSA_AES_KEY_WRAP");
    let e = unwrap_key_hsm(&hsm, &other, WrapAlg::CkmRsaAesKeyWrap).unwrap_err();
    assert!(e.message().contains("RSA-OAEP"), "{}", e.message());
    // An unknown enc is not an algorithm.
    assert!(WrapAlg::from_name("MY_OWN_WRAP").is_none());
    // enc in the envelope differs from what was requested.
    let hsm = envelope(&v, &v.jwk_kid, "CKM_RSA_AES_KEY_WRAP");
    let e = unwrap_key_hsm(&hsm, &v.key, WrapAlg::RsaAesKeyWrap256).unwrap_err();
    assert!(
        e.message().contains("differs from the requested"),
        "{}",
        e.message()
    );
    // Wrapped to another kid.
    let hsm = envelope(&v, "TpmEphemeralEncryptionKey", "CKM_RSA_AES_KEY_WRAP");
    let e = unwrap_key_hsm(&hsm, &v.key, WrapAlg::CkmRsaAesKeyWrap).unwrap_err();
    assert!(
        e.message().contains("not to this login's transfer key"),
        "{}",
        e.message()
    );
    // A flipped bit in the AES-KWP part fails the RFC 5649 integrity check.
    let mut hsm = envelope(&v, &v.jwk_kid, "CKM_RSA_AES_KEY_WRAP");
    hsm.ciphertext[290] ^= 1;
    let e = unwrap_key_hsm(&hsm, &v.key, WrapAlg::CkmRsaAesKeyWrap).unwrap_err();
    assert!(e.message().contains("RFC 5649"), "{}", e.message());
    // Truncated: no room for the KWP part.
    let mut hsm = envelope(&v, &v.jwk_kid, "CKM_RSA_AES_KEY_WRAP");
    hsm.ciphertext.truncate(260);
    let e = unwrap_key_hsm(&hsm, &v.key, WrapAlg::CkmRsaAesKeyWrap).unwrap_err();
    assert!(
        e.message().contains("296") || e.message().contains("260"),
        "{}",
        e.message()
    );
}

#[test]
fn rfc5649_unwrap_errors_name_the_step_and_the_kek_length() {
    let e = aes_kwp_unwrap(&[0u8; 20], &[0u8; 24]).unwrap_err();
    assert!(e.message().contains("20 bytes"), "{}", e.message());
    assert_eq!(e.step(), Some(Step::Unwrap));
    let e = aes_kwp_unwrap(&[0u8; 32], &[0u8; 24]).unwrap_err();
    assert!(e.message().contains("integrity check"), "{}", e.message());
}

#[test]
fn round_trip_rsa_aes_key_wrap_256_of_a_pkcs8_rsa_key() {
    use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
    use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
    let transfer = SoftwareTransferKey::generate().unwrap();
    // Wrap the way AKV does: OAEP-SHA-256 of a fresh KEK, then KWP of the PKCS#8 DER.
    let released = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let pkcs8 = released.as_der().unwrap().as_ref().to_vec();
    let kek = [0x42u8; 32];
    let mut wrapped = vec![0u8; pkcs8.len() + 16];
    let kwp = AesKek::new(&AES_256, &kek)
        .unwrap()
        .wrap_with_padding(&pkcs8, &mut wrapped)
        .unwrap()
        .to_vec();
    let jwk = transfer.public_jwk();
    let spki = aws_lc_rs::rsa::PublicKeyComponents {
        n: jwk.n.as_slice(),
        e: jwk.e.as_slice(),
    };
    let public: PublicEncryptingKey = spki.try_into().unwrap();
    let public = OaepPublicEncryptingKey::new(public).unwrap();
    let mut ct = vec![0u8; 256];
    public
        .encrypt(&OAEP_SHA256_MGF1SHA256, &kek, &mut ct, None)
        .unwrap();
    ct.extend_from_slice(&kwp);
    let hsm = KeyHsm {
        kid: jwk.kid.clone(),
        enc: "RSA_AES_KEY_WRAP_256".into(),
        ciphertext: ct,
    };
    let out = unwrap_key_hsm(&hsm, &transfer, WrapAlg::RsaAesKeyWrap256).unwrap();
    assert_eq!(out.as_slice(), pkcs8.as_slice());
    // Checked against its own public key: accepted; against another: integrity failure.
    use aws_lc_rs::signature::KeyPair;
    let pk = released.public_key();
    let public_info = PublicKeyInfo::Rsa {
        n: pk.modulus().big_endian_without_leading_zero().to_vec(),
        e: pk.exponent().big_endian_without_leading_zero().to_vec(),
    };
    assert!(matches!(
        check_material(
            "tls-rsa",
            SecretBytes::from_slice(out.as_slice()),
            &public_info
        )
        .unwrap(),
        KeyMaterial::Pkcs8(_)
    ));
    let other = PublicKeyInfo::Rsa {
        n: transfer.public_jwk().n.clone(),
        e: vec![1, 0, 1],
    };
    let e = check_material("tls-rsa", out, &other).unwrap_err();
    assert_eq!(e.rv(), CKR_GENERAL_ERROR);
    assert!(e.message().contains("\"tls-rsa\""), "{}", e.message());
    // The thumbprint is over the unpadded numbers.
    let mut padded_e = vec![0u8];
    padded_e.extend_from_slice(&jwk.e);
    assert_eq!(rsa_thumbprint(&jwk.n, &padded_e), jwk.kid);
}

#[test]
fn ec_and_oct_material_checks() {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref()).unwrap();
    let point = kp.public_key().as_ref().to_vec();
    let good = PublicKeyInfo::Ec {
        crv: "P-256".into(),
        x: point[1..33].to_vec(),
        y: point[33..].to_vec(),
    };
    check_material("ec", SecretBytes::from_slice(doc.as_ref()), &good).unwrap();
    let mut wrong_y = point[33..].to_vec();
    wrong_y[0] ^= 1;
    let bad_point = PublicKeyInfo::Ec {
        crv: "P-256".into(),
        x: point[1..33].to_vec(),
        y: wrong_y,
    };
    assert!(check_material("ec", SecretBytes::from_slice(doc.as_ref()), &bad_point).is_err());
    let wrong_curve = PublicKeyInfo::Ec {
        crv: "P-384".into(),
        x: point[1..33].to_vec(),
        y: point[33..].to_vec(),
    };
    assert!(check_material("ec", SecretBytes::from_slice(doc.as_ref()), &wrong_curve).is_err());
    // oct: length must match key_size, or be an AES length when the size is not given.
    assert!(check_material(
        "k",
        SecretBytes::zeroed(16),
        &PublicKeyInfo::Oct { key_size: None }
    )
    .is_ok());
    assert!(check_material(
        "k",
        SecretBytes::zeroed(20),
        &PublicKeyInfo::Oct { key_size: None }
    )
    .is_err());
    assert!(check_material(
        "k",
        SecretBytes::zeroed(16),
        &PublicKeyInfo::Oct {
            key_size: Some(256)
        }
    )
    .is_err());
}

#[test]
fn real_vault_key_hsm_and_public_key_parse() {
    let jws = String::from_utf8(testdata("akv/vault-release-response.jws")).unwrap();
    let payload = jws.trim().split('.').nth(1).unwrap();
    let payload: Value = serde_json::from_slice(&b64url_decode(payload).unwrap()).unwrap();
    let key = &payload["response"]["key"]["key"];
    let hsm = parse_key_hsm(key["key_hsm"].as_str().unwrap()).unwrap();
    assert_eq!(hsm.kid, "fake-release-key");
    assert_eq!(hsm.enc, "CKM_RSA_AES_KEY_WRAP");
    assert_eq!(hsm.ciphertext.len(), 1480);
    match PublicKeyInfo::from_jwk(key).unwrap() {
        // "e":"AAEAAQ" carries a leading zero byte.
        PublicKeyInfo::Rsa { n, e } => {
            assert_eq!(e, vec![1, 0, 1]);
            assert_eq!(n.len(), 256);
        }
        other => panic!("{other:?}"),
    }
    // Wrapped to the SDK's mock key, so our transfer key refuses it by kid.
    let ours = SoftwareTransferKey::generate().unwrap();
    let e = unwrap_key_hsm(&hsm, &ours, WrapAlg::CkmRsaAesKeyWrap).unwrap_err();
    assert!(e.message().contains("fake-release-key"), "{}", e.message());
    assert!(parse_key_hsm("not base64!").is_err());
    assert!(parse_key_hsm(&crate::release::b64url(b"{\"header\":{}}")).is_err());
}

/// The managed HSM variant: members sorted (also inside key_hsm), kty "RSA", versioned kid.
#[test]
fn real_mhsm_payload_parses_member_order_independently() {
    let v: Value =
        serde_json::from_slice(&testdata("akv/mhsm-release-response-payload.decoded.json"))
            .unwrap();
    let payload = &v["payload"];
    let kid = payload["request"]["kid"].as_str().unwrap();
    crate::release::jws::check_release_request(
        &{
            let mut p = payload.clone();
            p["request"]["nonce"] = "n".into();
            p
        },
        &kid.to_uppercase(),
        "CKM_RSA_AES_KEY_WRAP",
        "n",
    )
    .unwrap();
    let key = &payload["response"]["key"]["key"];
    assert_eq!(key["kty"], "RSA");
    let hsm = parse_key_hsm(key["key_hsm"].as_str().unwrap()).unwrap();
    // The sorted envelope starts with "ciphertext"; parsing does not depend on it.
    let raw = b64url_decode(key["key_hsm"].as_str().unwrap()).unwrap();
    assert!(raw.starts_with(b"{\"ciphertext\""));
    assert_eq!(hsm.enc, "CKM_RSA_AES_KEY_WRAP");
    assert_eq!(hsm.ciphertext.len(), 1480);
    assert!(matches!(
        PublicKeyInfo::from_jwk(key).unwrap(),
        PublicKeyInfo::Rsa { ref e, .. } if e == &vec![1, 0, 1]
    ));
    // The stored release policy (with contentType) parses.
    let data = payload["response"]["key"]["release_policy"]["data"]
        .as_str()
        .unwrap();
    crate::policy::parse_encoded(data).unwrap();
}
