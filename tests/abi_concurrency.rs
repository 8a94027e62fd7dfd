//! Concurrency through the C ABI: concurrent C_Login calls on one token coalesce into one
//! release; C_Login works from inside a tokio runtime; sessions sign in parallel.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use std::sync::{Arc, Barrier};

#[test]
fn concurrent_logins_coalesce_into_one_release_and_work_inside_tokio() {
    let emu = Emulator::shared();
    std::env::set_var("SKR_PKCS11_CONFIG", emu.config_path());
    let p11 = Arc::new(Pkcs11::new(common::module_path()).expect("load module"));
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = *p11
        .get_slots_with_token()
        .unwrap()
        .iter()
        .find(|s| p11.get_token_info(**s).unwrap().label() == "skr-demo")
        .unwrap();

    // Four sessions log in at the same moment.
    let before = emu.releases("tls-rsa");
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (p11, barrier) = (p11.clone(), barrier.clone());
            std::thread::spawn(move || {
                let s = p11.open_ro_session(slot).unwrap();
                barrier.wait();
                let r = s.login(UserType::User, None);
                let keys = s
                    .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                    .unwrap()
                    .len();
                (r, keys, s)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (r, keys, _) in &results {
        assert!(
            matches!(
                r,
                Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _))
            ),
            "concurrent C_Login: {r:?}"
        );
        assert_eq!(
            *keys, 2,
            "every session sees both private keys once any login completed"
        );
    }
    assert!(results.iter().any(|(r, _, _)| r.is_ok()));
    assert_eq!(
        emu.releases("tls-rsa"),
        before + 1,
        "one release for all concurrent logins"
    );

    // Two sessions sign in parallel (no global lock on the operation path).
    let signers: Vec<_> = (0..2)
        .map(|i| {
            let p11 = p11.clone();
            std::thread::spawn(move || {
                let s = p11.open_ro_session(slot).unwrap();
                let k = s
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"tls-ec".to_vec()),
                    ])
                    .unwrap()[0];
                let pubk = s
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PUBLIC_KEY),
                        Attribute::Label(b"tls-ec".to_vec()),
                    ])
                    .unwrap()[0];
                for n in 0..200 {
                    let msg = format!("thread {i} message {n}");
                    let sig = s.sign(&Mechanism::EcdsaSha256, k, msg.as_bytes()).unwrap();
                    s.verify(&Mechanism::EcdsaSha256, pubk, msg.as_bytes(), &sig)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in signers {
        h.join().expect("parallel signer");
    }

    // Log out, then log in again from inside a tokio runtime (the release's blocking HTTP
    // client runs on the module's own thread, so it must not panic inside the runtime).
    results[0].2.logout().expect("logout");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let p = p11.clone();
    let r = rt.block_on(async move {
        let s = p.open_ro_session(slot).unwrap();
        s.login(UserType::User, None).map(|_| {
            s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .unwrap()
                .len()
        })
    });
    assert_eq!(r.expect("C_Login inside a tokio runtime"), 2);
    assert_eq!(emu.releases("tls-rsa"), before + 2);
}
