//! Keys as leases through the built .so against skr-emulator (issue 9): a rotated key reaches
//! a process that signs throughout without one failed signature, under the same handle; a
//! release policy that no longer admits the TEE wipes the key within one refresh, and
//! restoring it brings the key back; a child forked before a rotation sees the new version,
//! and the whole tree costs one release per refresh. Short lease terms: refresh 1 s, max_age
//! 6 s.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use p256::ecdsa::signature::Verifier;
use serde_json::json;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const MESSAGE: &[u8] = b"lease test message";

struct Fixture {
    emu: Emulator,
    p11: Pkcs11,
    log: std::path::PathBuf,
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn vault(emu: &Emulator) -> String {
    emu.var("SKR_EMULATOR_VAULT_URL").to_string()
}

/// Import a fresh P-256 key as a new version of `name` (the first import creates the key) with
/// the demo keys' release policy; returns its public key.
fn import_ec(emu: &Emulator, name: &str) -> p256::ecdsa::VerifyingKey {
    import_ec_versioned(emu, name).0
}

/// `import_ec`, also returning the new version's kid.
fn import_ec_versioned(emu: &Emulator, name: &str) -> (p256::ecdsa::VerifyingKey, String) {
    let (st, demo) = emu.akv(reqwest::Method::GET, &vault(emu), "/keys/tls-ec", None);
    assert_eq!(st, 200, "GET tls-ec: {demo}");
    let sk = p256::SecretKey::random(&mut rand::thread_rng());
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
    let body = json!({
        "key": {
            "kty": "EC", "crv": "P-256",
            "x": b64url(point.x().unwrap()), "y": b64url(point.y().unwrap()),
            "d": b64url(&sk.to_bytes()),
            "key_ops": ["sign", "verify"],
        },
        "hsm": true,
        "attributes": {"exportable": true},
        "release_policy": {
            "contentType": demo["release_policy"]["contentType"],
            "data": demo["release_policy"]["data"],
        },
    });
    let (st, v) = emu.akv(
        reqwest::Method::PUT,
        &vault(emu),
        &format!("/keys/{name}"),
        Some(body),
    );
    assert_eq!(st, 200, "import {name}: {v}");
    let kid = v["key"]["kid"]
        .as_str()
        .expect("kid of the new version")
        .to_string();
    (p256::ecdsa::VerifyingKey::from(sk.public_key()), kid)
}

/// Replace the release policy of `name`'s current version (`edit` on the policy JSON text).
fn set_policy(emu: &Emulator, name: &str, edit: impl FnOnce(String) -> String) {
    use base64::Engine;
    let (st, k) = emu.akv(
        reqwest::Method::GET,
        &vault(emu),
        &format!("/keys/{name}"),
        None,
    );
    assert_eq!(st, 200);
    let data = k["release_policy"]["data"].as_str().unwrap();
    let text = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(data.trim_end_matches('='))
            .unwrap(),
    )
    .unwrap();
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the policy edit must change the policy");
    let body = json!({"release_policy": {"contentType": "application/json; charset=utf-8", "data": b64url(edited.as_bytes())}});
    let (st, v) = emu.akv(
        reqwest::Method::PATCH,
        &vault(emu),
        &format!("/keys/{name}"),
        Some(body),
    );
    assert_eq!(st, 200, "PATCH {name}: {v}");
}

static PUBLIC: OnceLock<Mutex<std::collections::HashMap<String, p256::ecdsa::VerifyingKey>>> =
    OnceLock::new();

fn fixture() -> MutexGuard<'static, Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let emu = Emulator::start();
        // The fixture lives in a static that is never dropped: stop this emulator at exit.
        common::stop_at_exit(emu.path());
        let mut keys = std::collections::HashMap::new();
        for name in ["lease-rotate", "lease-revoke", "lease-fork"] {
            keys.insert(name.to_string(), import_ec(&emu, name));
        }
        let (pinned, pinned_kid) = import_ec_versioned(&emu, "lease-pinned");
        keys.insert("lease-pinned".to_string(), pinned);
        PUBLIC.set(Mutex::new(keys)).ok();
        let log = emu.path().join("module-lease.log");
        let cfg = common::config_logging_to(&emu, "lease.toml", &log);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str("\n[release]\nrefresh = \"1s\"\nmax_age = \"6s\"\ntimeout_seconds = 2\nretries = 1\nbackoff_ms = 100\n");
        for name in ["lease-rotate", "lease-revoke", "lease-fork"] {
            text.push_str(&format!(
                "\n[[token]]\nlabel = \"{name}\"\n[[token.key]]\nlabel = \"{name}\"\nid = \"01\"\nkid = \"{}/keys/{name}\"\n",
                vault(&emu)
            ));
        }
        text.push_str(&format!(
            "\n[[token]]\nlabel = \"lease-pinned\"\n[[token.key]]\nlabel = \"lease-pinned\"\nid = \"01\"\nkid = \"{pinned_kid}\"\n"
        ));
        std::fs::write(&cfg, text).unwrap();
        // Set before the module is loaded, while no other thread of this binary reads the
        // environment (every test takes this fixture first and waits for it here).
        std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
        let p11 = Pkcs11::new(common::module_path()).expect("load module");
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
        Mutex::new(Fixture { emu, p11, log })
    })
    .lock()
    .unwrap_or_else(|p| p.into_inner())
}

fn public(name: &str) -> p256::ecdsa::VerifyingKey {
    PUBLIC.get().unwrap().lock().unwrap()[name]
}

fn logged_in(p11: &Pkcs11, token: &str) -> (Session, ObjectHandle) {
    logged_in_with(p11, token, token)
}

/// A logged-in session of `token` and its private key labelled `key`.
fn logged_in_with(p11: &Pkcs11, token: &str, key: &str) -> (Session, ObjectHandle) {
    let slot = *p11
        .get_slots_with_token()
        .unwrap()
        .iter()
        .find(|s| p11.get_token_info(**s).unwrap().label() == token)
        .unwrap();
    let s = p11.open_ro_session(slot).unwrap();
    match s.login(UserType::User, None) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("C_Login {token}: {e}"),
    }
    let k = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(key.as_bytes().to_vec()),
        ])
        .unwrap();
    (s, k[0])
}

fn verifies(key: &p256::ecdsa::VerifyingKey, sig: &[u8]) -> bool {
    p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| key.verify(MESSAGE, &s).is_ok())
}

/// Poll `cond` until it holds, for at most `limit` (a deadline, not a sleep that races).
fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rotated_key_reaches_a_process_signing_throughout_with_no_failed_signature() {
    let f = fixture();
    let (s, key) = logged_in(&f.p11, "lease-rotate");
    let old = public("lease-rotate");
    let new = import_ec(&f.emu, "lease-rotate");
    let (mut on_old, mut on_new, mut failed) = (0, 0, Vec::new());
    let end = Instant::now() + Duration::from_secs(20);
    // Sign with the handle found before the rotation until the new version has signed 50
    // times in a row: every signature must verify with one of the two versions, and once the
    // new one appears the old never comes back.
    let mut streak = 0;
    while streak < 50 {
        assert!(
            Instant::now() < end,
            "the new version never arrived (old {on_old}, new {on_new})"
        );
        match s.sign(&Mechanism::EcdsaSha256, key, MESSAGE) {
            Ok(sig) if verifies(&new, &sig) => {
                on_new += 1;
                streak += 1;
            }
            Ok(sig) if verifies(&old, &sig) && on_new == 0 => on_old += 1,
            Ok(_) => failed
                .push("a signature by neither version, or by the old after the new".to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        on_old > 0,
        "the process signed with the old version before the refresh"
    );
    PUBLIC
        .get()
        .unwrap()
        .lock()
        .unwrap()
        .insert("lease-rotate".into(), new);
    let log = std::fs::read_to_string(&f.log).unwrap_or_default();
    assert!(
        log.contains("key \"lease-rotate\": refreshed to version"),
        "the log names the new version"
    );
}

#[test]
fn a_policy_that_no_longer_admits_the_tee_wipes_the_key_within_one_refresh_and_restoring_it_brings_it_back(
) {
    let f = fixture();
    let (s, key) = logged_in(&f.p11, "lease-revoke");
    s.sign(&Mechanism::EcdsaSha256, key, MESSAGE)
        .expect("signs before");
    set_policy(&f.emu, "lease-revoke", |p| p.replace("sevsnpvm", "tdxvm"));
    let changed = Instant::now();
    wait_for(Duration::from_secs(10), "the key to be revoked", || {
        matches!(
            s.sign(&Mechanism::EcdsaSha256, key, MESSAGE),
            Err(P11Error::Pkcs11(RvError::KeyHandleInvalid, _))
        )
    });
    // refresh 1 s ±10 %, the refresh itself and the 100 ms follow interval.
    assert!(
        changed.elapsed() < Duration::from_secs(5),
        "revoked within one refresh: {:?}",
        changed.elapsed()
    );
    let log = std::fs::read_to_string(&f.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("lease-revoke") && l.contains("revoking the key")),
        "one log line says the key was revoked and why"
    );
    set_policy(&f.emu, "lease-revoke", |p| p.replace("tdxvm", "sevsnpvm"));
    wait_for(Duration::from_secs(10), "the key to come back", || {
        s.sign(&Mechanism::EcdsaSha256, key, MESSAGE)
            .is_ok_and(|sig| verifies(&public("lease-revoke"), &sig))
    });
}

#[test]
fn a_child_forked_before_a_rotation_sees_the_new_version_and_the_tree_releases_once_per_refresh() {
    let f = fixture();
    let (s, _) = logged_in(&f.p11, "lease-fork");
    let mut to_child = [0i32; 2];
    let mut from_child = [0i32; 2];
    // SAFETY: plain pipes.
    unsafe {
        assert_eq!(libc::pipe(to_child.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(from_child.as_mut_ptr()), 0);
    }
    // SAFETY: the child only uses the module, pipes and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        child_waits_for_the_rotation(to_child[0], from_child[1]);
    }
    // Wait for the child's "logged in" byte, then rotate and tell it the new public key.
    let mut b = [0u8; 1];
    // SAFETY: our pipe.
    assert_eq!(
        unsafe { libc::read(from_child[0], b.as_mut_ptr().cast(), 1) },
        1
    );
    let before = f.emu.releases("lease-fork");
    let started = Instant::now();
    let new = import_ec(&f.emu, "lease-fork");
    let point = new.to_encoded_point(false);
    // SAFETY: our pipe.
    unsafe { libc::write(to_child[1], point.as_bytes().as_ptr().cast(), point.len()) };
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child did not see the new version (its stderr above)"
    );
    let releases = f.emu.releases("lease-fork") - before;
    let periods = started.elapsed().as_millis() as u64 / 900 + 1;
    assert!(releases >= 1, "a refresh released the new version");
    assert!(
        releases <= periods,
        "{releases} releases in {periods} refresh periods for a tree of two processes: one per refresh, not one per process"
    );
    drop(s);
}

#[test]
fn a_kid_with_a_version_stays_on_that_version_across_rotations_while_its_lease_is_refreshed() {
    let f = fixture();
    let (s, key) = logged_in(&f.p11, "lease-pinned");
    let pinned = public("lease-pinned");
    import_ec(&f.emu, "lease-pinned");
    let before = f.emu.releases("lease-pinned");
    // Two refreshes after the rotation: the pinned version is what they release.
    wait_for(Duration::from_secs(10), "two refreshes", || {
        f.emu.releases("lease-pinned") >= before + 2
    });
    let sig = s.sign(&Mechanism::EcdsaSha256, key, MESSAGE).expect("sign");
    assert!(
        verifies(&pinned, &sig),
        "a pinned kid does not follow the rotation"
    );
}

#[test]
fn a_vault_rotation_the_certificate_does_not_name_yet_renews_the_certified_version() {
    use rsa::pkcs8::DecodePublicKey;
    let f = fixture();
    let (s, key) = logged_in_with(&f.p11, "skr-demo", "tls-ec");
    let cert = {
        use x509_cert::der::{Decode, Encode};
        let der = common::first_cert_der(&f.emu.path().join("certs/tls-ec.pem"));
        let c = x509_cert::Certificate::from_der(&der).unwrap();
        c.tbs_certificate.subject_public_key_info.to_der().unwrap()
    };
    let certified = p256::ecdsa::VerifyingKey::from_public_key_der(&cert).unwrap();
    // An automatic rotation in the vault; nobody replaces the certificate file.
    import_ec(&f.emu, "tls-ec");
    let before = f.emu.releases("tls-ec");
    wait_for(
        Duration::from_secs(10),
        "two refreshes after the rotation",
        || f.emu.releases("tls-ec") >= before + 4,
    );
    let sig = s
        .sign(&Mechanism::EcdsaSha256, key, MESSAGE)
        .expect("still signs");
    assert!(
        verifies(&certified, &sig),
        "the key its certificate names keeps serving"
    );
    let log = std::fs::read_to_string(&f.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("\"tls-ec\"") && l.contains("still names version")),
        "the log says which version is renewed and why"
    );
    // Well past max_age (6 s) since the login: the lease was renewed, not left to run out.
    let end = Instant::now() + Duration::from_secs(7);
    while Instant::now() < end {
        assert!(s
            .sign(&Mechanism::EcdsaSha256, key, MESSAGE)
            .is_ok_and(|sig| verifies(&certified, &sig)));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// In the forked child: log in from the inherited keys, report it, then sign until the
/// signature verifies with the public key the parent sends after rotating. `_exit`s.
fn child_waits_for_the_rotation(from_parent: i32, to_parent: i32) -> ! {
    let code = (|| -> Result<(), String> {
        let p11 = Pkcs11::new(common::module_path()).map_err(|e| e.to_string())?;
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("C_Initialize in child: {e}"))?;
        let (s, key) = logged_in(&p11, "lease-fork");
        // SAFETY: our pipes.
        unsafe { libc::write(to_parent, b"x".as_ptr().cast(), 1) };
        let mut buf = [0u8; 65];
        // SAFETY: our pipe.
        let n = unsafe { libc::read(from_parent, buf.as_mut_ptr().cast(), 65) };
        let new = p256::ecdsa::VerifyingKey::from_sec1_bytes(&buf[..n.max(0) as usize])
            .map_err(|e| format!("bad key from parent: {e}"))?;
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let sig = s
                .sign(&Mechanism::EcdsaSha256, key, MESSAGE)
                .map_err(|e| format!("C_Sign in child: {e}"))?;
            if verifies(&new, &sig) {
                return Ok(());
            }
            if Instant::now() > end {
                return Err("the child never signed with the new version".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    if let Err(e) = &code {
        eprintln!("child: {e}");
    }
    // SAFETY: end the forked child without the parent's atexit handlers.
    unsafe { libc::_exit(if code.is_ok() { 0 } else { 1 }) }
}
