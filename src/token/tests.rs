//! Token state tests: objects and attributes before and after login, the login state machine
//! (coalescing, failures, aborted attempts), sessions, handles and find. Keys are generated
//! here and installed through `LoginLease::finish`, exactly what C_Login does after the
//! release.

use super::attr::Attr;
use super::*;
use crate::crypto::ops::tests::{ec_pkcs8, rsa_pkcs8};
use std::str::FromStr;
use std::time::Duration;
use x509_cert::der::{Decode, Encode, EncodePem};

/// Test material: keys, a CA and leaf certificates, a config that names them.
pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    /// Unique per fixture: retained keys are process-wide, keyed by token label.
    pub label: String,
    pub rsa: Vec<u8>,
    pub ec: Vec<u8>,
    pub aes: Vec<u8>,
    pub rsa_cert: Vec<u8>,
    pub ca_cert: Vec<u8>,
}

pub(crate) fn cert(
    subject: &str,
    spki: &[u8],
    issuer: &str,
    signer_pkcs8: &[u8],
    serial: u8,
) -> Vec<u8> {
    use x509_cert::spki::{AlgorithmIdentifierOwned, ObjectIdentifier, SubjectPublicKeyInfoOwned};
    let alg = AlgorithmIdentifierOwned {
        oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
        parameters: None,
    };
    let tbs = x509_cert::TbsCertificate {
        version: x509_cert::Version::V3,
        serial_number: x509_cert::serial_number::SerialNumber::new(&[serial]).unwrap(),
        signature: alg.clone(),
        issuer: x509_cert::name::Name::from_str(issuer).unwrap(),
        validity: x509_cert::time::Validity::from_now(Duration::from_secs(86400)).unwrap(),
        subject: x509_cert::name::Name::from_str(subject).unwrap(),
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(spki).unwrap(),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: None,
    };
    let signer = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        signer_pkcs8,
    )
    .unwrap();
    let sig = signer
        .sign(
            &aws_lc_rs::rand::SystemRandom::new(),
            &tbs.to_der().unwrap(),
        )
        .unwrap();
    x509_cert::Certificate {
        tbs_certificate: tbs,
        signature_algorithm: alg,
        signature: x509_cert::der::asn1::BitString::from_bytes(sig.as_ref()).unwrap(),
    }
    .to_der()
    .unwrap()
}

pub(crate) fn pem(der: &[u8]) -> String {
    x509_cert::Certificate::from_der(der)
        .unwrap()
        .to_pem(x509_cert::der::pem::LineEnding::LF)
        .unwrap()
}

pub(crate) fn spki_of(pkcs8: &[u8]) -> Vec<u8> {
    AsymKey::from_pkcs8(pkcs8).unwrap().info.spki_der
}

impl Fixture {
    /// `extra` is appended to the [[token]] table (e.g. a pin).
    pub fn new(extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let rsa = rsa_pkcs8().to_vec();
        let ec = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let ca = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let ca_cert = cert("CN=Test CA", &spki_of(&ca), "CN=Test CA", &ca, 1);
        let rsa_cert = cert("CN=tls-rsa", &spki_of(&rsa), "CN=Test CA", &ca, 7);
        let ec_cert = cert("CN=tls-ec", &spki_of(&ec), "CN=Test CA", &ca, 8);
        std::fs::write(dir.path().join("rsa.pem"), pem(&rsa_cert) + &pem(&ca_cert)).unwrap();
        std::fs::write(dir.path().join("ec.pem"), pem(&ec_cert) + &pem(&ca_cert)).unwrap();
        let d = dir.path().display();
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let label = format!("skr-test-{}", N.fetch_add(1, Ordering::Relaxed));
        let config_text = format!(
            r#"
[logging]
level = "debug"
target = "file:{d}/module.log"
[platform]
evidence = "emulated"
emulator_url = "https://127.0.0.1:1"
[attestation]
url = "https://127.0.0.1:1"
[identity]
source = "imds"
imds_url = "http://127.0.0.1:1"
[release]
retries = 0
timeout_seconds = 2
[[token]]
label = "{label}"
{extra}
[[token.key]]
label = "tls-rsa"
id = "01"
kid = "https://127.0.0.1:1/keys/tls-rsa"
certificate = "{d}/rsa.pem"
allow_rsa_pkcs_decrypt = true
[[token.key]]
label = "tls-ec"
id = "02"
kid = "https://127.0.0.1:1/keys/tls-ec"
certificate = "{d}/ec.pem"
[[token.key]]
label = "data-aes"
id = "03"
kid = "https://127.0.0.1:1/keys/data-aes"
[[token]]
label = "second"
[[token.key]]
label = "other"
id = "01"
kid = "https://127.0.0.1:1/keys/other"
"#
        );
        std::fs::write(dir.path().join("config.toml"), &config_text).unwrap();
        Fixture {
            dir,
            label,
            rsa,
            ec,
            aes: (0..32u8).collect(),
            rsa_cert,
            ca_cert,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn module(&self) -> Module {
        let cfg = Config::load(&self.config_path()).unwrap();
        let mut pems = HashMap::new();
        for f in ["rsa.pem", "ec.pem"] {
            let p = self.dir.path().join(f);
            pems.insert(p.clone(), std::fs::read(&p).unwrap());
        }
        Module::new(Arc::new(cfg), &pems).unwrap()
    }

    /// What `release_token` returns for the first token.
    pub fn released(&self) -> Vec<ReleasedKey> {
        vec![
            ReleasedKey {
                index: 0,
                material: KeyMaterial::Pkcs8(SecretBytes::from_slice(&self.rsa)),
                version: "v1".into(),
            },
            ReleasedKey {
                index: 1,
                material: KeyMaterial::Pkcs8(SecretBytes::from_slice(&self.ec)),
                version: "v1".into(),
            },
            ReleasedKey {
                index: 2,
                material: KeyMaterial::Raw(SecretBytes::from_slice(&self.aes)),
                version: "v1".into(),
            },
        ]
    }
}

/// Log a token in with fixture keys, as C_Login does after a successful release.
pub(crate) fn login_with(t: &Token, released: Vec<ReleasedKey>) -> Result<()> {
    match t.begin_login() {
        LoginStart::Lead(l) => {
            let m = Material::from_released(&t.config, released).map(Arc::new);
            l.finish(m)
        }
        LoginStart::AlreadyLoggedIn => Err(Error::new(CKR_USER_ALREADY_LOGGED_IN, "")),
        LoginStart::Joined(r) => r,
    }
}

fn classes(objs: &[Arc<Object>]) -> Vec<(CK_OBJECT_CLASS, Vec<u8>)> {
    let mut v: Vec<_> = objs.iter().map(|o| (o.class(), o.id.clone())).collect();
    v.sort();
    v
}

fn value(o: &Object, ty: CK_ATTRIBUTE_TYPE) -> Vec<u8> {
    match o.attribute(ty) {
        Attr::Value(v) => v,
        other => panic!("attribute {ty:#x}: {other:?}"),
    }
}

fn ulong(o: &Object, ty: CK_ATTRIBUTE_TYPE) -> CK_ULONG {
    CK_ULONG::from_ne_bytes(value(o, ty).try_into().unwrap())
}

#[test]
fn before_login_only_certificates_and_their_public_keys() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    assert_eq!(t.slot_id, 1);
    assert_eq!(m.tokens[1].slot_id, 2);
    let objs = t.visible_objects();
    // Two leaves, one shared CA (once), two public keys; nothing private.
    assert_eq!(objs.len(), 5);
    assert!(objs.iter().all(|o| !o.is_private()));
    let leaf = objs
        .iter()
        .find(|o| o.class() == CKO_CERTIFICATE && o.id == vec![1])
        .unwrap();
    assert_eq!(value(leaf, CKA_VALUE), f.rsa_cert);
    let parsed = x509_cert::Certificate::from_der(&f.rsa_cert).unwrap();
    assert_eq!(
        value(leaf, CKA_SUBJECT),
        parsed.tbs_certificate.subject.to_der().unwrap()
    );
    assert_eq!(
        value(leaf, CKA_ISSUER),
        parsed.tbs_certificate.issuer.to_der().unwrap()
    );
    assert_eq!(value(leaf, CKA_SERIAL_NUMBER), vec![0x02, 0x01, 0x07]);
    assert_eq!(ulong(leaf, CKA_CERTIFICATE_CATEGORY), 1);
    assert_eq!(ulong(leaf, CKA_CERTIFICATE_TYPE), CKC_X_509);
    assert_eq!(value(leaf, CKA_LABEL), b"tls-rsa");
    assert_eq!(value(leaf, CKA_PUBLIC_KEY_INFO), spki_of(&f.rsa));
    assert_eq!(value(leaf, CKA_START_DATE).len(), 8);
    let ca = objs
        .iter()
        .find(|o| o.class() == CKO_CERTIFICATE && o.key_index.is_none())
        .unwrap();
    assert_eq!(value(ca, CKA_VALUE), f.ca_cert);
    assert_eq!(ulong(ca, CKA_CERTIFICATE_CATEGORY), 2);
    assert_eq!(ca.id.len(), 20, "chain certificates get their own id");
    let ecpub = objs
        .iter()
        .find(|o| o.class() == CKO_PUBLIC_KEY && o.id == vec![2])
        .unwrap();
    assert_eq!(ulong(ecpub, CKA_KEY_TYPE), CKK_EC);
    let point = value(ecpub, CKA_EC_POINT);
    assert_eq!(
        &point[..3],
        &[0x04, 0x41, 0x04],
        "DER OCTET STRING of 04||X||Y"
    );
    assert_eq!(
        value(ecpub, CKA_EC_PARAMS),
        vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
    );
    assert_eq!(value(ecpub, CKA_PRIVATE), vec![CK_FALSE]);
    assert_eq!(ecpub.attribute(CKA_MODULUS), Attr::Invalid);
}

#[test]
fn login_adds_private_objects_and_logout_removes_them() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    let before = t.visible_objects();
    let rsa_pub_handle = before
        .iter()
        .find(|o| o.class() == CKO_PUBLIC_KEY && o.id == vec![1])
        .unwrap()
        .handle;
    let e0 = t.epoch();
    login_with(t, f.released()).unwrap();
    assert!(t.is_logged_in());
    assert!(t.epoch() > e0);
    assert!(matches!(t.begin_login(), LoginStart::AlreadyLoggedIn));
    let after = t.visible_objects();
    // Exact content: 3 certificates, 2 public keys (cert-backed, same handles), 2 private,
    // 1 secret.
    let count = |c| after.iter().filter(|o| o.class() == c).count();
    assert_eq!(count(CKO_CERTIFICATE), 3);
    assert_eq!(count(CKO_PUBLIC_KEY), 2);
    assert_eq!(count(CKO_PRIVATE_KEY), 2);
    assert_eq!(count(CKO_SECRET_KEY), 1);
    assert_eq!(
        classes(&after)
            .into_iter()
            .filter(|(c, _)| *c != CKO_CERTIFICATE)
            .collect::<Vec<_>>(),
        vec![
            (CKO_PUBLIC_KEY, vec![1]),
            (CKO_PUBLIC_KEY, vec![2]),
            (CKO_PRIVATE_KEY, vec![1]),
            (CKO_PRIVATE_KEY, vec![2]),
            (CKO_SECRET_KEY, vec![3]),
        ]
    );
    let rsa_pub = t.object(rsa_pub_handle).unwrap();
    assert!(matches!(rsa_pub.body, Body::PublicKey(_)));
    let rsa_priv = after
        .iter()
        .find(|o| o.class() == CKO_PRIVATE_KEY && o.id == vec![1])
        .unwrap()
        .clone();
    assert_eq!(value(&rsa_priv, CKA_SENSITIVE), vec![CK_TRUE]);
    assert_eq!(value(&rsa_priv, CKA_EXTRACTABLE), vec![CK_FALSE]);
    assert_eq!(value(&rsa_priv, CKA_ALWAYS_AUTHENTICATE), vec![CK_FALSE]);
    assert_eq!(rsa_priv.attribute(CKA_PRIVATE_EXPONENT), Attr::Sensitive);
    assert_eq!(rsa_priv.attribute(CKA_PRIME_1), Attr::Sensitive);
    assert_eq!(value(&rsa_priv, CKA_MODULUS), value(&rsa_pub, CKA_MODULUS));
    assert_eq!(value(&rsa_priv, CKA_PUBLIC_EXPONENT), vec![1, 0, 1]);
    assert_eq!(
        value(&rsa_priv, CKA_SUBJECT),
        value(&t.object(rsa_pub_handle).unwrap(), CKA_SUBJECT)
    );
    let mechs = value(&rsa_priv, CKA_ALLOWED_MECHANISMS);
    assert_eq!(mechs.len() % std::mem::size_of::<CK_ULONG>(), 0);
    assert!(mechs
        .chunks(8)
        .any(|c| CK_ULONG::from_ne_bytes(c.try_into().unwrap()) == CKM_SHA256_RSA_PKCS_PSS));
    let aes = after
        .iter()
        .find(|o| o.class() == CKO_SECRET_KEY)
        .unwrap()
        .clone();
    assert_eq!(aes.attribute(CKA_VALUE), Attr::Sensitive);
    assert_eq!(ulong(&aes, CKA_VALUE_LEN), 32);
    let ec_priv = after
        .iter()
        .find(|o| o.class() == CKO_PRIVATE_KEY && o.id == vec![2])
        .unwrap()
        .clone();
    assert_eq!(ec_priv.attribute(CKA_VALUE), Attr::Sensitive);
    assert_eq!(value(&ec_priv, CKA_EC_POINT)[..2], [0x04, 0x41]);

    // Logout: private objects and their handles are gone; certificates stay.
    m.logout(0).unwrap();
    assert!(!t.is_logged_in());
    assert!(retained(&f.label).is_none());
    assert_eq!(
        t.object(rsa_priv.handle).err().unwrap().rv(),
        CKR_OBJECT_HANDLE_INVALID
    );
    assert!(t.object(rsa_pub_handle).is_ok());
    assert_eq!(t.visible_objects().len(), 5);
    assert_eq!(m.logout(0).unwrap_err().rv(), CKR_USER_NOT_LOGGED_IN);
    // A new login gives new handles: none is ever reused.
    login_with(t, f.released()).unwrap();
    let again = t.visible_objects();
    assert!(again.iter().all(|o| o.handle != rsa_priv.handle));
    m.logout(0).unwrap();
}

/// Wait (without a timing assumption) until `n` callers are blocked joining the login in
/// flight on `t`.
fn wait_for_joiners(t: &Token, n: usize) {
    while t.login_joiners() < n {
        std::thread::yield_now();
    }
}

#[test]
fn concurrent_logins_share_one_release() {
    let f = Fixture::new("");
    let m = Arc::new(f.module());
    let t = &m.tokens[0];
    let LoginStart::Lead(lease) = t.begin_login() else {
        panic!("first login must lead")
    };
    // A second caller while the release runs waits for it instead of starting another.
    let m2 = m.clone();
    let joiner = std::thread::spawn(move || match m2.tokens[0].begin_login() {
        LoginStart::Joined(r) => r,
        _ => panic!("second login must join the first"),
    });
    wait_for_joiners(t, 1);
    assert!(
        !joiner.is_finished(),
        "the joiner returned before the release finished"
    );
    lease
        .finish(Material::from_released(&t.config, f.released()).map(Arc::new))
        .unwrap();
    joiner.join().unwrap().unwrap();
    assert_eq!(t.login_joiners(), 0);
    assert!(t.is_logged_in());
    m.logout(0).unwrap();
}

#[test]
fn failed_and_aborted_logins_leave_the_token_logged_out() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    let LoginStart::Lead(lease) = t.begin_login() else {
        panic!()
    };
    let e = lease
        .finish(Err(Error::denied(Step::Release, "policy not met")))
        .unwrap_err();
    assert_eq!(e.rv(), CKR_FUNCTION_REJECTED);
    assert!(!t.is_logged_in());
    // An attempt abandoned by a panic releases the waiters with an error.
    let m = Arc::new(m);
    let m2 = m.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let t = &m2.tokens[0];
        let LoginStart::Lead(_lease) = t.begin_login() else {
            panic!()
        };
        tx.send(()).unwrap();
        // Crash only once the other caller is waiting for this attempt.
        wait_for_joiners(t, 1);
        panic!("release crashed");
    });
    rx.recv().unwrap();
    match m.tokens[0].begin_login() {
        LoginStart::Joined(r) => assert!(r.is_err()),
        _ => panic!("must join"),
    }
    assert!(h.join().is_err());
    // The next login leads again.
    login_with(&m.tokens[0], f.released()).unwrap();
    m.logout(0).unwrap();
}

#[test]
fn released_material_is_checked() {
    let f = Fixture::new("");
    let m = f.module();
    let cfg = &m.tokens[0].config;
    let mut missing = f.released();
    missing.pop();
    let e = Material::from_released(cfg, missing).err().unwrap();
    assert_eq!(e.step(), Some(Step::Install));
    assert!(e.message().contains("data-aes"), "{}", e.message());
    let mut garbage = f.released();
    garbage[0].material = KeyMaterial::Pkcs8(SecretBytes::from_slice(b"not a key"));
    assert_eq!(
        Material::from_released(cfg, garbage).err().unwrap().rv(),
        CKR_GENERAL_ERROR
    );
    let mut short_aes = f.released();
    short_aes[2].material = KeyMaterial::Raw(SecretBytes::from_slice(&[1; 5]));
    assert!(Material::from_released(cfg, short_aes).is_err());
}

#[test]
fn sessions_closing_the_last_one_logs_out() {
    let f = Fixture::new("");
    let m = f.module();
    assert_eq!(
        m.open_session(1, 0).unwrap_err().rv(),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(
        m.open_session(9, CKF_SERIAL_SESSION).unwrap_err().rv(),
        CKR_SLOT_ID_INVALID
    );
    let a = m.open_session(1, CKF_SERIAL_SESSION).unwrap();
    let b = m
        .open_session(1, CKF_SERIAL_SESSION | CKF_RW_SESSION)
        .unwrap();
    let other = m.open_session(2, CKF_SERIAL_SESSION).unwrap();
    assert!(b > a && other > b, "handles increase, never reused");
    assert_eq!(m.session_counts(0), (2, 1));
    login_with(&m.tokens[0], f.released()).unwrap();
    m.close_session(a).unwrap();
    assert!(m.tokens[0].is_logged_in(), "b is still open");
    m.close_session(b).unwrap();
    assert!(
        !m.tokens[0].is_logged_in(),
        "last session closed: logged out"
    );
    assert_eq!(
        m.close_session(b).unwrap_err().rv(),
        CKR_SESSION_HANDLE_INVALID
    );
    login_with(&m.tokens[0], f.released()).unwrap();
    let c = m.open_session(1, CKF_SERIAL_SESSION).unwrap();
    m.close_all(1).unwrap();
    assert!(!m.tokens[0].is_logged_in());
    assert!(m.session(c).is_err());
    assert!(m.session(other).is_ok(), "other slot untouched");
}

#[test]
fn a_panic_inside_a_session_lock_does_not_brick_it() {
    let f = Fixture::new("");
    let m = Arc::new(f.module());
    let h = m.open_session(1, CKF_SERIAL_SESSION).unwrap();
    let s = m.session(h).unwrap();
    s.lock().digest = Some(session::Active::new(
        crate::crypto::ops::DigestOp::new(crate::crypto::HashAlg::Sha256),
        false,
        1,
    ));
    let s2 = s.clone();
    let _ = std::thread::spawn(move || {
        let _g = s2.lock();
        panic!("crash while holding the session");
    })
    .join();
    let g = s.lock();
    assert!(
        g.digest.is_none(),
        "operations ended after the recovered panic"
    );
}

#[test]
fn find_templates() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    let find = |tpl: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]| {
        t.visible_objects()
            .iter()
            .filter(|o| o.matches(tpl))
            .map(|o| o.class())
            .collect::<Vec<_>>()
    };
    assert_eq!(find(&[]).len(), 5);
    let class = |c: CK_ULONG| (CKA_CLASS, c.to_ne_bytes().to_vec());
    assert!(find(&[class(CKO_PROFILE)]).is_empty());
    assert!(find(&[class(CKO_PRIVATE_KEY)]).is_empty());
    assert_eq!(
        find(&[class(CKO_CERTIFICATE), (CKA_ID, vec![2])]),
        vec![CKO_CERTIFICATE]
    );
    assert_eq!(
        find(&[(CKA_LABEL, b"tls-ec".to_vec()), (CKA_ID, vec![2])]).len(),
        2
    );
    // A sensitive or unknown attribute never matches.
    assert!(find(&[(CKA_PRIVATE_EXPONENT, vec![1])]).is_empty());
    login_with(t, f.released()).unwrap();
    assert_eq!(
        find(&[
            class(CKO_PRIVATE_KEY),
            (CKA_ID, vec![1]),
            (CKA_LABEL, b"tls-rsa".to_vec())
        ]),
        vec![CKO_PRIVATE_KEY]
    );
    m.logout(0).unwrap();
}

#[test]
fn token_fields_are_padded_and_stable() {
    let f = Fixture::new("serial = \"SER123\"");
    let m = f.module();
    let t = &m.tokens[0];
    let mut label = [b' '; 32];
    label[..f.label.len()].copy_from_slice(f.label.as_bytes());
    assert_eq!(t.label_field(), label);
    assert_eq!(&t.serial_field()[..6], b"SER123");
    assert!(t.serial_field()[6..].iter().all(|&b| b == b' '));
    // Without a configured serial, one derived from the label, identical each time.
    let s = m.tokens[1].serial_field();
    assert_eq!(s, f.module().tokens[1].serial_field());
    assert!(s.iter().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn a_login_finishing_after_finalize_installs_nothing() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    let LoginStart::Lead(lease) = t.begin_login() else {
        panic!()
    };
    m.wipe_all();
    let material = Material::from_released(&t.config, f.released()).map(Arc::new);
    assert_eq!(
        lease.finish(material).unwrap_err().rv(),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert!(!t.is_logged_in());
    assert!(retained(&f.label).is_none(), "no key outlives C_Finalize");
}

#[test]
fn public_objects_never_hold_private_keys() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    login_with(t, f.released()).unwrap();
    for o in t.visible_objects() {
        if let Body::PublicKey(k) = &o.body {
            assert!(
                !k.evp.is_private(),
                "public object {:?} holds a private key",
                o.label
            );
        }
    }
    m.logout(0).unwrap();
}

#[test]
fn a_released_key_that_does_not_match_its_certificate_fails_the_login() {
    let f = Fixture::new("");
    let m = f.module();
    let t = &m.tokens[0];
    let mut released = f.released();
    // Another P-256 key than the one ec.pem certifies (as after a rotation without the
    // certificate file).
    let other = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    released[1].material = KeyMaterial::Pkcs8(SecretBytes::from_slice(&other));
    let e = login_with(t, released).unwrap_err();
    assert_eq!(e.rv(), CKR_GENERAL_ERROR);
    assert_eq!(e.kind(), crate::error::ErrorKind::Integrity);
    let msg = e.message();
    assert!(
        msg.contains("tls-ec") && msg.contains("keys/tls-ec") && msg.contains("ec.pem"),
        "the error names the key and the certificate: {msg}"
    );
    assert!(!t.logged_in.load(Ordering::SeqCst), "nothing installed");
    // The matching keys log in.
    login_with(t, f.released()).unwrap();
}

#[test]
fn handles_of_one_session_shard_spread_over_the_hash_table() {
    use std::hash::BuildHasher;
    let build = BuildHasherDefault::<HandleHasher>::default();
    // One shard holds handles that share their low four bits; the table indexes buckets by
    // the low bits of the hash, so those must differ.
    let buckets: std::collections::HashSet<u64> = (0..1024u64)
        .map(|i| build.hash_one(3 + i * SESSION_SHARDS as u64) & 1023)
        .collect();
    assert!(
        buckets.len() > 600,
        "{} of 1024 buckets used",
        buckets.len()
    );
    // And a map keyed by them finds every one.
    let mut map = HandleMap::default();
    for h in (1..5000u64).step_by(16) {
        map.insert(h, h * 2);
    }
    assert!((1..5000u64)
        .step_by(16)
        .all(|h| map.get(&h) == Some(&(h * 2))));
    assert_eq!(map.get(&2), None);
}
