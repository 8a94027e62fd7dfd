//! The module through its C ABI (the built .so, via the `cryptoki` crate) against a running
//! `skr-emulator up`: login releases the demo keys, every mechanism works and every result is
//! checked with an independent implementation (RustCrypto), logout wipes, the denied key fails
//! with its documented CK_RV and a log line naming the unmet claim.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// A known AES key imported into the emulated managed HSM, so that the token's AES results
/// can be checked independently (the demo key `data-aes` never leaves the TEE).
const KNOWN_AES: [u8; 32] = *b"skr-pkcs11 known AES-256 test k!";

struct Fixture {
    emu: &'static Emulator,
    p11: Pkcs11,
    log: PathBuf,
    demo: Slot,
    denied: Slot,
}

fn fixture() -> MutexGuard<'static, Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let emu = Emulator::shared();
        import_known_aes(emu);
        let log = emu.path().join("module-abi-login.log");
        let cfg = common::config_logging_to(emu, "abi-login.toml", &log);
        let cfg = {
            // Add the known AES key to the demo token, next to the demo keys.
            let mut t = std::fs::read_to_string(&cfg).unwrap();
            let demo_end = t.find("[[token]]\nlabel = \"skr-denied\"").expect("skr-denied token in emulator config");
            let extra = format!(
                "[[token.key]]\nlabel = \"known-aes\"\nid = \"0f\"\nkid = \"{}/keys/known-aes\"\n\n",
                emu.var("SKR_EMULATOR_MHSM_URL")
            );
            t.insert_str(demo_end, &extra);
            std::fs::write(&cfg, t).unwrap();
            cfg
        };
        // Set before the module is loaded, while no other thread of this binary reads the
        // environment (every test takes this fixture first and waits for it here).
        std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
        let p11 = Pkcs11::new(common::module_path()).expect("load module");
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("C_Initialize");
        let slots = p11.get_slots_with_token().expect("slots");
        let by_label = |l: &str| *slots.iter().find(|s| p11.get_token_info(**s).unwrap().label() == l).unwrap_or_else(|| panic!("token {l}"));
        let (demo, denied) = (by_label("skr-demo"), by_label("skr-denied"));
        Mutex::new(Fixture { emu, p11, log, demo, denied })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

fn import_known_aes(emu: &Emulator) {
    let mhsm = emu.var("SKR_EMULATOR_MHSM_URL").to_string();
    let (st, data_aes) = emu.akv(reqwest::Method::GET, &mhsm, "/keys/data-aes", None);
    assert_eq!(st, 200, "GET data-aes: {data_aes}");
    let policy = data_aes["release_policy"].clone();
    let body = serde_json::json!({
        "key": {"kty": "oct-HSM", "k": b64url(&KNOWN_AES), "key_ops": ["encrypt", "decrypt", "wrapKey", "unwrapKey"]},
        "hsm": true,
        "attributes": {"exportable": true},
        "release_policy": {"contentType": policy["contentType"], "data": policy["data"]},
    });
    let (st, v) = emu.akv(reqwest::Method::PUT, &mhsm, "/keys/known-aes", Some(body));
    assert_eq!(st, 200, "import known-aes: {v}");
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn logged_in(f: &Fixture) -> Session {
    let s = f.p11.open_rw_session(f.demo).expect("open session");
    match s.login(UserType::User, None) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login on skr-demo: {e}"),
    }
    s
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

fn cert_spki(emu: &Emulator, name: &str) -> Vec<u8> {
    use x509_cert::der::{Decode, Encode};
    let der = common::first_cert_der(&emu.path().join("certs").join(format!("{name}.pem")));
    let cert = x509_cert::Certificate::from_der(&der).expect("parse certificate");
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("SPKI")
}

fn rsa_public(emu: &Emulator) -> rsa::RsaPublicKey {
    use rsa::pkcs8::DecodePublicKey;
    rsa::RsaPublicKey::from_public_key_der(&cert_spki(emu, "tls-rsa")).expect("RSA SPKI")
}

fn pss(hash: MechanismType, mgf: PkcsMgfType, salt: u64) -> PkcsPssParams {
    PkcsPssParams {
        hash_alg: hash,
        mgf,
        s_len: salt.into(),
    }
}

#[test]
fn login_releases_each_demo_key_exactly_once_and_shows_private_objects() {
    let f = fixture();
    let before = ["tls-rsa", "tls-ec", "data-aes"].map(|k| f.emu.releases(k));
    let s = f.p11.open_ro_session(f.demo).unwrap();
    // Before login: certificates and public keys only.
    assert!(s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
        .is_empty());
    assert_eq!(
        s.find_objects(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::Label(b"tls-rsa".to_vec())
        ])
        .unwrap()
        .len(),
        1
    );
    let _ = s.logout();
    s.login(UserType::User, None).expect("C_Login");
    let after = ["tls-rsa", "tls-ec", "data-aes"].map(|k| f.emu.releases(k));
    for i in 0..3 {
        assert_eq!(after[i], before[i] + 1, "one release per key per login");
    }
    assert!(matches!(
        s.login(UserType::User, None),
        Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _))
    ));
    for (class, label) in [
        (ObjectClass::PRIVATE_KEY, "tls-rsa"),
        (ObjectClass::PRIVATE_KEY, "tls-ec"),
        (ObjectClass::SECRET_KEY, "data-aes"),
        (ObjectClass::PUBLIC_KEY, "tls-rsa"),
        (ObjectClass::CERTIFICATE, "tls-ec"),
    ] {
        find_one(&s, class, label);
    }
    // The private key carries its public half and hides its secret parts.
    let k = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    let attrs = s
        .get_attributes(
            k,
            &[
                AttributeType::Modulus,
                AttributeType::Id,
                AttributeType::Sensitive,
            ],
        )
        .unwrap();
    let modulus = attrs
        .iter()
        .find_map(|a| {
            if let Attribute::Modulus(m) = a {
                Some(m.clone())
            } else {
                None
            }
        })
        .expect("CKA_MODULUS");
    assert_eq!(
        rsa::BigUint::from_bytes_be(&modulus),
        *rsa::traits::PublicKeyParts::n(&rsa_public(f.emu))
    );
    assert!(attrs.contains(&Attribute::Id(vec![1])));
    assert!(attrs.contains(&Attribute::Sensitive(true)));
    let info = s
        .get_attribute_info(k, &[AttributeType::PrivateExponent])
        .unwrap();
    assert!(
        matches!(
            info.as_slice(),
            [cryptoki::object::AttributeInfo::Sensitive]
        ),
        "CKA_PRIVATE_EXPONENT must be sensitive, got {info:?}"
    );
}

#[test]
fn rsa_signatures_verify_with_an_independent_implementation() {
    use rsa::signature::Verifier;
    use sha2::Digest;
    let f = fixture();
    let s = logged_in(&f);
    let key = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    let pubkey = rsa_public(f.emu);
    let msg = b"attested TLS handshake transcript";

    let sig = s.sign(&Mechanism::Sha256RsaPkcs, key, msg).unwrap();
    rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pubkey.clone())
        .verify(
            msg,
            &rsa::pkcs1v15::Signature::try_from(sig.as_slice()).unwrap(),
        )
        .expect("SHA256-RSA-PKCS verifies");

    let sig = s.sign(&Mechanism::Sha384RsaPkcs, key, msg).unwrap();
    rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(pubkey.clone())
        .verify(
            msg,
            &rsa::pkcs1v15::Signature::try_from(sig.as_slice()).unwrap(),
        )
        .expect("SHA384-RSA-PKCS verifies");

    // CKM_RSA_PKCS over a caller-built DigestInfo (what pkcs11-provider and Java send).
    let digest = sha2::Sha512::digest(msg);
    let mut digest_info = hex::decode("3051300d060960864801650304020305000440").unwrap();
    digest_info.extend_from_slice(&digest);
    let sig = s.sign(&Mechanism::RsaPkcs, key, &digest_info).unwrap();
    pubkey
        .verify(rsa::Pkcs1v15Sign::new::<sha2::Sha512>(), &digest, &sig)
        .expect("RSA-PKCS over DigestInfo verifies");

    // PSS on a pre-computed hash with salt lengths 0, hLen and the maximum.
    let digest = sha2::Sha256::digest(msg);
    for salt in [0u64, 32, 256 - 32 - 2] {
        let sig = s
            .sign(
                &Mechanism::RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, salt)),
                key,
                &digest,
            )
            .unwrap();
        pubkey
            .verify(
                rsa::Pss::new_with_salt::<sha2::Sha256>(salt as usize),
                &digest,
                &sig,
            )
            .unwrap_or_else(|e| panic!("RSA-PSS salt {salt}: {e}"));
    }
    // Hashed PSS, multi-part.
    s.sign_init(
        &Mechanism::Sha256RsaPkcsPss(pss(MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32)),
        key,
    )
    .unwrap();
    s.sign_update(&msg[..10]).unwrap();
    s.sign_update(&msg[10..]).unwrap();
    let sig = s.sign_final().unwrap();
    pubkey
        .verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &digest, &sig)
        .expect("multi-part SHA256-RSA-PKCS-PSS verifies");

    // The token verifies too, and rejects a tampered signature.
    let pubh = find_one(&s, ObjectClass::PUBLIC_KEY, "tls-rsa");
    let sig = s.sign(&Mechanism::Sha256RsaPkcs, key, msg).unwrap();
    s.verify(&Mechanism::Sha256RsaPkcs, pubh, msg, &sig)
        .expect("C_Verify accepts");
    let mut bad = sig.clone();
    bad[10] ^= 1;
    assert!(matches!(
        s.verify(&Mechanism::Sha256RsaPkcs, pubh, msg, &bad),
        Err(P11Error::Pkcs11(RvError::SignatureInvalid, _))
    ));
}

#[test]
fn rsa_decrypt_oaep_and_pkcs1_of_independently_encrypted_data() {
    let f = fixture();
    let s = logged_in(&f);
    let key = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
    let pubkey = rsa_public(f.emu);
    let mut rng = rand::thread_rng();
    let secret = b"premaster secret for the session";

    let ct = pubkey
        .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), secret)
        .unwrap();
    let params = PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    );
    assert_eq!(
        s.decrypt(&Mechanism::RsaPkcsOaep(params), key, &ct)
            .unwrap(),
        secret
    );

    let ct = pubkey
        .encrypt(
            &mut rng,
            rsa::Oaep::new_with_label::<sha1::Sha1, _>("lbl"),
            secret,
        )
        .unwrap();
    let params = PkcsOaepParams::new(
        MechanismType::SHA1,
        PkcsMgfType::MGF1_SHA1,
        PkcsOaepSource::data_specified(b"lbl"),
    );
    assert_eq!(
        s.decrypt(&Mechanism::RsaPkcsOaep(params), key, &ct)
            .unwrap(),
        secret
    );

    // tls-rsa opts in to CKM_RSA_PKCS decryption (TLS 1.2 RSA key exchange).
    let ct = pubkey
        .encrypt(&mut rng, rsa::Pkcs1v15Encrypt, secret)
        .unwrap();
    assert_eq!(s.decrypt(&Mechanism::RsaPkcs, key, &ct).unwrap(), secret);

    // Public-key encryption by the token, decrypted by the token.
    let pubh = find_one(&s, ObjectClass::PUBLIC_KEY, "tls-rsa");
    let params = PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    );
    let ct = s
        .encrypt(&Mechanism::RsaPkcsOaep(params), pubh, secret)
        .unwrap();
    assert_eq!(
        s.decrypt(&Mechanism::RsaPkcsOaep(params), key, &ct)
            .unwrap(),
        secret
    );
}

#[test]
fn ecdsa_signatures_verify_with_an_independent_implementation() {
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;
    use sha2::Digest;
    let f = fixture();
    let s = logged_in(&f);
    let key = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-ec");
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&cert_spki(f.emu, "tls-ec"))
        .expect("P-256 SPKI");
    let msg = b"ECDHE-ECDSA transcript";

    let sig = s.sign(&Mechanism::EcdsaSha256, key, msg).unwrap();
    assert_eq!(sig.len(), 64, "raw r||s");
    vk.verify(msg, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
        .expect("ECDSA-SHA256 verifies");

    let digest = sha2::Sha256::digest(msg);
    let sig = s.sign(&Mechanism::Ecdsa, key, &digest).unwrap();
    vk.verify_prehash(&digest, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
        .expect("CKM_ECDSA verifies");

    s.sign_init(&Mechanism::EcdsaSha256, key).unwrap();
    s.sign_update(&msg[..3]).unwrap();
    s.sign_update(&msg[3..]).unwrap();
    let sig = s.sign_final().unwrap();
    vk.verify(msg, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
        .expect("multi-part ECDSA-SHA256 verifies");
}

#[test]
fn aes_gcm_and_cbc_pad_match_an_independent_implementation() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let f = fixture();
    let s = logged_in(&f);
    let key = find_one(&s, ObjectClass::SECRET_KEY, "known-aes");
    let plain = b"data key material, 4 KiB in production";
    let aad = b"header";
    let mut iv = [7u8; 12];
    let ct = s
        .encrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()),
            key,
            plain,
        )
        .unwrap();
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&KNOWN_AES).unwrap();
    let expected = cipher
        .encrypt(&[7u8; 12].into(), Payload { msg: plain, aad })
        .unwrap();
    assert_eq!(ct, expected, "AES-GCM ciphertext||tag equals RustCrypto's");
    let mut iv = [7u8; 12];
    assert_eq!(
        s.decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()),
            key,
            &ct
        )
        .unwrap(),
        plain
    );
    let mut tampered = ct.clone();
    tampered[0] ^= 1;
    let mut iv = [7u8; 12];
    assert!(s
        .decrypt(
            &Mechanism::AesGcm(GcmParams::new(&mut iv, aad, 128.into()).unwrap()),
            key,
            &tampered
        )
        .is_err());

    // CBC-PAD both ways, and the demo key round-trips.
    let iv16 = [3u8; 16];
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv16), key, plain).unwrap();
    assert_eq!(
        ct.len(),
        (plain.len() / 16 + 1) * 16 // PKCS#7 always adds 1..=16 bytes
    );
    assert_eq!(
        s.decrypt(&Mechanism::AesCbcPad(iv16), key, &ct).unwrap(),
        plain
    );
    let demo = find_one(&s, ObjectClass::SECRET_KEY, "data-aes");
    let ct = s.encrypt(&Mechanism::AesCbcPad(iv16), demo, plain).unwrap();
    assert_eq!(
        s.decrypt(&Mechanism::AesCbcPad(iv16), demo, &ct).unwrap(),
        plain
    );
}

#[test]
fn logout_wipes_keys_and_the_next_login_releases_again() {
    let f = fixture();
    let s = logged_in(&f);
    let key = find_one(&s, ObjectClass::PRIVATE_KEY, "tls-ec");
    let before = f.emu.releases("tls-ec");
    s.logout().expect("C_Logout");
    assert!(
        s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .unwrap()
            .is_empty(),
        "private keys gone after logout"
    );
    match s.sign(&Mechanism::EcdsaSha256, key, b"x") {
        Err(P11Error::Pkcs11(RvError::UserNotLoggedIn | RvError::KeyHandleInvalid, _)) => {}
        other => panic!("sign after logout must fail with USER_NOT_LOGGED_IN or KEY_HANDLE_INVALID, got {other:?}"),
    }
    s.login(UserType::User, None).expect("login again");
    assert_eq!(f.emu.releases("tls-ec"), before + 1);
}

#[test]
fn denied_key_fails_with_function_rejected_and_the_log_names_the_claim() {
    let f = fixture();
    let s = f.p11.open_ro_session(f.denied).unwrap();
    match s.login(UserType::User, None) {
        Err(P11Error::Pkcs11(RvError::FunctionRejected, _)) => {}
        other => panic!("denied-rsa login must give CKR_FUNCTION_REJECTED, got {other:?}"),
    }
    assert!(
        s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
            .unwrap()
            .is_empty(),
        "still logged out"
    );
    let log = std::fs::read_to_string(&f.log).expect("module log file");
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("C_Login") && l.contains("skr-denied"))
        .unwrap_or_else(|| panic!("no C_Login line in log:\n{log}"));
    assert!(line.contains("CKR_FUNCTION_REJECTED"), "{line}");
    assert!(line.contains("step=release"), "{line}");
    assert!(
        line.contains("x-ms-sevsnpvm-"),
        "the line names the unmet claim: {line}"
    );
    // The demo token is unaffected.
    let ok = logged_in(&f);
    find_one(&ok, ObjectClass::PRIVATE_KEY, "tls-rsa");
}
