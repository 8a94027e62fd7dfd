//! An outage longer than `release.max_age` (issue 9): the key keeps serving while refreshes
//! fail, then is wiped and its operations fail closed with CKR_KEY_HANDLE_INVALID and one log
//! line; the status file shows the failures and their class and no secret; when the service
//! is back the next refresh brings the key back under the same handle. Own emulator: the
//! injected faults would disturb other tests' refreshes.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use serde_json::json;
use std::time::{Duration, Instant};

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `skr-pkcs11 status` with this config: (exit code, output).
fn status_cli(cfg: &std::path::Path) -> (i32, String) {
    let out = std::process::Command::new(common::artifacts_dir().join("skr-pkcs11"))
        .arg("--config")
        .arg(cfg)
        .arg("status")
        .output()
        .expect("run skr-pkcs11 status (cargo build --workspace builds it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn an_outage_longer_than_max_age_fails_closed_and_the_key_returns_with_the_service() {
    let emu = Emulator::start();
    let log = emu.path().join("module-outage.log");
    let status = emu.path().join("status.prom");
    let cfg = common::config_logging_to(&emu, "outage.toml", &log);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}\n[release]\nrefresh = \"500ms\"\nmax_age = \"3s\"\ntimeout_seconds = 2\nretries = 0\nbackoff_ms = 100\nstatus_file = \"{}\"\n",
            status.display()
        ),
    )
    .unwrap();
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
    s.login(UserType::User, None).expect("login");
    let key = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"tls-ec".to_vec()),
        ])
        .unwrap()[0];
    let sign = || s.sign(&Mechanism::EcdsaSha256, key, b"outage");
    sign().expect("signs before the outage");
    wait_for(
        Duration::from_secs(10),
        "a first refresh and its status file",
        || {
            std::fs::read_to_string(&status).is_ok_and(|t| {
                t.contains("skr_pkcs11_token_last_refresh_seconds{token=\"skr-demo\"} 1")
            })
        },
    );

    // MAA answers 503 to everything: every refresh fails before any key.
    let outage = Instant::now();
    emu.inject(json!({"endpoint": "maa-attest", "kind": "status", "status": 503, "count": 100000}));
    let mut served_during = 0;
    wait_for(Duration::from_secs(15), "the lease to end", || {
        match sign() {
            Ok(_) => {
                served_during += 1;
                false
            }
            Err(P11Error::Pkcs11(RvError::KeyHandleInvalid, _)) => true,
            Err(e) => panic!("unexpected failure during the outage: {e}"),
        }
    });
    let lasted = outage.elapsed();
    assert!(
        served_during > 0,
        "the key kept serving while refreshes failed"
    );
    // The lease runs from the last successful release (at most one refresh period before
    // the outage began) for max_age = 3 s.
    assert!(
        lasted >= Duration::from_millis(2400),
        "wiped too early: {lasted:?}"
    );
    assert!(
        lasted <= Duration::from_secs(5),
        "wiped too late: {lasted:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = text
        .lines()
        .filter(|l| l.contains("\"tls-ec\"") && l.contains("lease") && l.contains("ended"))
        .collect();
    assert_eq!(lines.len(), 1, "one log line for the wipe: {lines:?}");
    assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    // The refresher's next (failing) attempt records the expiry in the store and the file.
    wait_for(
        Duration::from_secs(5),
        "the status file to show the expiry",
        || std::fs::read_to_string(&status).is_ok_and(|t| t.contains("state=\"expired\"")),
    );
    let prom = std::fs::read_to_string(&status).unwrap();
    assert!(
        prom.contains("skr_pkcs11_token_last_failure_info{token=\"skr-demo\",class=\"service\"} 1"),
        "{prom}"
    );
    let failures: u64 = prom
        .lines()
        .find(|l| l.starts_with("skr_pkcs11_token_refresh_failures{token=\"skr-demo\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("failure count");
    assert!(failures >= 2, "{prom}");
    assert!(
        !prom.contains("BEGIN") && !prom.contains("\"d\""),
        "no key material in the status file"
    );

    let (code, table) = status_cli(&cfg);
    assert_eq!(code, 1, "status exits 1 while a key is not live:\n{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("tls-ec") && l.contains("expired")),
        "{table}"
    );
    assert!(table.contains("(last: service)"), "{table}");

    emu.admin_delete("/admin/faults");
    wait_for(Duration::from_secs(10), "the key to return", || {
        sign().is_ok()
    });
    let prom = std::fs::read_to_string(&status).unwrap();
    assert!(
        prom.contains("skr_pkcs11_token_refresh_failures{token=\"skr-demo\"} 0"),
        "{prom}"
    );
    drop(s);
    p11.finalize().expect("C_Finalize");
}
