//! Test helper (used by tests/abi_memory.rs): loads the module (path in argv[1]), logs in to
//! the token labelled argv[2], signs once with the RSA key labelled argv[3], prints `ready`
//! and then obeys stdin lines: `logout` (C_Logout, prints `logged-out`) and `exit`.
//! It never sees key material itself, so any secret found in its memory came from the module.

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use std::io::BufRead;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: hold_logged_in MODULE TOKEN_LABEL KEY_LABEL");
        std::process::exit(2);
    }
    let p11 = Pkcs11::new(&args[1]).expect("load module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = *p11
        .get_slots_with_token()
        .expect("slots")
        .iter()
        .find(|s| {
            p11.get_token_info(**s)
                .map(|t| t.label() == args[2])
                .unwrap_or(false)
        })
        .expect("token");
    let session = p11.open_ro_session(slot).expect("session");
    session.login(UserType::User, None).expect("C_Login");
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(args[3].as_bytes().to_vec()),
        ])
        .expect("find")[0];
    session
        .sign(&Mechanism::Sha256RsaPkcs, key, b"warm up the key")
        .expect("C_Sign");
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        match line.expect("stdin").trim() {
            "logout" => {
                session.logout().expect("C_Logout");
                println!("logged-out");
            }
            "exit" => break,
            _ => {}
        }
    }
}
