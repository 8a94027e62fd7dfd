//! Refresh where the application forbids new threads (CKF_LIBRARY_CANT_CREATE_OS_THREADS,
//! issue 9): no refresher thread is made; a due refresh runs inline at the application's next
//! C_OpenSession, so a rotated key still arrives. Own process: one C_Initialize per process.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use std::time::{Duration, Instant};

fn secret_kcv(s: &cryptoki::session::Session) -> Vec<u8> {
    // The AES key's own value stays sensitive: compare the token's encryption of a fixed block.
    let k = s
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(b"data-aes".to_vec()),
        ])
        .unwrap()[0];
    assert!(!s
        .get_attributes(k, &[AttributeType::Label])
        .unwrap()
        .is_empty());
    s.encrypt(
        &cryptoki::mechanism::Mechanism::AesCbcPad([0u8; 16]),
        k,
        &[0u8; 16],
    )
    .unwrap()
}

#[test]
fn without_threads_a_due_refresh_runs_at_the_next_session_open() {
    let emu = Emulator::start();
    let log = emu.path().join("module-no-threads.log");
    let cfg = common::config_logging_to(&emu, "no-threads.toml", &log);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[release]\nrefresh = \"500ms\"\nmax_age = \"1h\"\n"),
    )
    .unwrap();
    std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
    let p11 = Pkcs11::new(common::module_path()).expect("load module");
    p11.initialize(CInitializeArgs::new(
        CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS,
    ))
    .expect("C_Initialize");
    let slot = *p11
        .get_slots_with_token()
        .unwrap()
        .iter()
        .find(|s| p11.get_token_info(**s).unwrap().label() == "skr-demo")
        .unwrap();
    let s = p11.open_ro_session(slot).unwrap();
    s.login(UserType::User, None).expect("login");
    let refresher_running = || {
        std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .is_ok_and(|c| c.trim() == "skr-refresh")
        })
    };
    let before = emu.releases("data-aes");
    let first = secret_kcv(&s);
    // Past the refresh time with the application idle: nothing happens on its own.
    let due = Instant::now() + Duration::from_millis(700);
    while Instant::now() < due {
        std::thread::sleep(due - Instant::now());
    }
    assert_eq!(
        emu.releases("data-aes"),
        before,
        "no background refresh without threads"
    );
    assert!(
        !refresher_running(),
        "no refresher thread without permission to create threads"
    );
    // The next session open refreshes inline.
    let _s2 = p11.open_ro_session(slot).unwrap();
    assert_eq!(
        emu.releases("data-aes"),
        before + 1,
        "one inline refresh at C_OpenSession"
    );
    assert_eq!(secret_kcv(&s), first, "same key version, lease renewed");
    assert!(!refresher_running());
    drop(s);
    p11.finalize().expect("C_Finalize");
}
