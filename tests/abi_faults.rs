//! Injected service faults (emulator admin API) each give their documented CK_RV from C_Login
//! (README "Failures"), leave the token logged out, and a later login succeeds.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use serde_json::json;

fn expect_login(s: &Session, expected: Option<RvError>, what: &str) {
    let got = s.login(UserType::User, None);
    match (expected, got) {
        (None, Ok(())) => {
            assert!(!s
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .unwrap()
                .is_empty());
            s.logout().expect("logout");
        }
        (Some(rv), Err(P11Error::Pkcs11(got, _))) if got == rv => {
            assert!(
                s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                    .unwrap()
                    .is_empty(),
                "{what}: token must stay logged out"
            );
        }
        (e, g) => panic!("{what}: expected {e:?}, got {g:?}"),
    }
}

#[test]
fn each_injected_fault_gives_its_ck_rv_and_a_later_login_succeeds() {
    let emu = Emulator::shared();
    // Short timeouts and backoff so that the retry paths run quickly.
    let cfg = emu.config_variant("faults.toml", |t| {
        format!("{t}\n[release]\ntimeout_seconds = 2\nretries = 2\nbackoff_ms = 50\n")
    });
    std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
    let p11 = Pkcs11::new(common::module_path()).expect("load module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = *p11
        .get_slots_with_token()
        .unwrap()
        .iter()
        .find(|s| p11.get_token_info(**s).unwrap().label() == "skr-demo")
        .unwrap();
    let s = p11.open_ro_session(slot).unwrap();

    let cases = [
        (
            json!({"endpoint": "maa-attest", "kind": "status", "status": 500, "count": 10}),
            Some(RvError::FunctionFailed),
            "MAA 500 after retries",
        ),
        (
            json!({"endpoint": "akv-release", "kind": "throttle", "retry_after": 1, "count": 1}),
            None,
            "AKV 429 then success",
        ),
        (
            json!({"endpoint": "akv-release", "kind": "delay", "delay_ms": 4000, "count": 10}),
            Some(RvError::FunctionFailed),
            "AKV timeout",
        ),
        (
            json!({"endpoint": "akv-release", "kind": "malformed-body", "count": 1}),
            Some(RvError::GeneralError),
            "malformed release body",
        ),
        (
            json!({"endpoint": "akv-release", "kind": "truncated-jws", "count": 1}),
            Some(RvError::GeneralError),
            "truncated JWS",
        ),
        (
            json!({"endpoint": "akv-release", "kind": "wrong-wrap-key", "count": 1}),
            Some(RvError::GeneralError),
            "wrapped to the wrong key",
        ),
        (
            json!({"endpoint": "maa-attest", "kind": "expired-token", "count": 1}),
            Some(RvError::GeneralError),
            "expired MAA token",
        ),
        (
            json!({"endpoint": "imds-token", "kind": "status", "status": 500, "count": 10}),
            Some(RvError::FunctionFailed),
            "IMDS 500 after retries",
        ),
    ];
    for (fault, expected, what) in cases {
        emu.admin_delete("/admin/faults");
        emu.inject(fault);
        expect_login(&s, expected, what);
        emu.admin_delete("/admin/faults");
        expect_login(&s, None, &format!("login after {what}"));
    }
}
