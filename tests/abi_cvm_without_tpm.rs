//! C_Login through the built .so with `platform.evidence = "azure-cvm"` where the TPM cannot be
//! used: the device is missing (not an Azure CVM, or a container without /dev/tpmrm0), or the
//! user running the module may not open it (not in the tss group). Each answers
//! CKR_DEVICE_ERROR with one log line that names the device and the fix, and a later login
//! still gets the same precise answer (nothing is left half-initialised).
//!
//! One test in this binary: the module reads one config per process, and the two cases use
//! the same device path, first absent, then present but not openable.
#![cfg(feature = "cvm")]

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::session::UserType;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The module's log lines for C_Login that mention `needle`.
fn login_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("C_Login") && l.contains(needle))
        .map(str::to_string)
        .collect()
}

fn login_once(p11: &Pkcs11) -> Result<(), P11Error> {
    let slot = p11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| p11.get_token_info(*s).unwrap().label() == "skr-demo")
        .expect("skr-demo token");
    let session = p11.open_ro_session(slot).expect("open session");
    session.login(UserType::User, None)
}

#[test]
fn a_missing_or_forbidden_tpm_device_fails_login_with_device_error_naming_the_fix() {
    let emu = Emulator::shared();
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("tpmrm0");
    let log = dir.path().join("module.log");
    let cfg = common::config_logging_to(emu, "abi-cvm-without-tpm.toml", &log);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let evidence = text
        .lines()
        .find(|l| l.starts_with("evidence = "))
        .expect("the emulator's config names its evidence provider")
        .to_string();
    let text = text.replacen(
        &evidence,
        &format!(
            "evidence = \"azure-cvm\"\ntpm_tcti = \"device:{}\"",
            device.display()
        ),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    // Set before the module is loaded; no other test runs in this binary.
    std::env::set_var("SKR_PKCS11_CONFIG", &cfg);
    let p11 = Pkcs11::new(common::module_path()).expect("load module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize: the TPM is opened at login, not before");

    // No device at that path: twice, the same precise answer.
    for attempt in 1..=2 {
        match login_once(&p11) {
            Err(P11Error::Pkcs11(RvError::DeviceError, _)) => {}
            other => panic!("attempt {attempt}: expected CKR_DEVICE_ERROR, got {other:?}"),
        }
        let lines = login_lines(&log, "skr-demo");
        assert_eq!(lines.len(), attempt, "one line per failed login: {lines:?}");
        let line = lines.last().unwrap();
        assert!(
            line.contains("CKR_DEVICE_ERROR")
                && line.contains("step=evidence")
                && line.contains(&device.display().to_string())
                && line.contains("no TPM at that path"),
            "{line}"
        );
    }

    // The device exists but this user may not open it. Root (CI) logs in from a thread whose
    // filesystem user is `nobody` (setfsuid is per thread and drops root's DAC override; the
    // module opens the TPM on the calling thread); anyone else is refused a mode-000 file.
    std::fs::write(&device, b"").unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mode = if root { 0o600 } else { 0o000 };
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(mode)).unwrap();
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            if root {
                // SAFETY: setfsuid takes a plain integer and affects only this thread.
                unsafe { libc::setfsuid(65534) };
            }
            login_once(&p11)
        })
        .join()
        .unwrap()
    });
    match outcome {
        Err(P11Error::Pkcs11(RvError::DeviceError, _)) => {}
        other => panic!("expected CKR_DEVICE_ERROR, got {other:?}"),
    }
    let lines = login_lines(&log, "skr-demo");
    assert_eq!(lines.len(), 3, "{lines:?}");
    let line = lines.last().unwrap();
    assert!(
        line.contains("Permission denied") && line.contains("tss group"),
        "{line}"
    );
}
