//! The built module refuses, at C_Initialize, a config (or a certificate / CA file it names)
//! that a user other than its owner or root can write — the config decides where keys come
//! from — and the packaged example config until it is edited: CKR_GENERAL_ERROR and one log
//! line naming the file and the fix. The same files, owner-writable only, initialise.
//!
//! One test in this binary: the cases run in order, each pointing SKR_PKCS11_CONFIG at its
//! file (no other test runs while the variable changes), and the module's stderr (where it
//! logs before a config is loaded) is captured into a file around each C_Initialize.

mod common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use std::fs::Permissions;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// C_Initialize with `config`; the outcome and what the module wrote to stderr meanwhile.
fn initialize(p11: &Pkcs11, config: &Path, capture: &Path) -> (Result<(), P11Error>, String) {
    std::env::set_var("SKR_PKCS11_CONFIG", config);
    let file = std::fs::File::create(capture).unwrap();
    // SAFETY: plain descriptor juggling on fd 2: saved, replaced by the capture file for the
    // call, restored; the descriptors are valid for the whole block.
    let result = unsafe {
        let saved = libc::dup(2);
        assert!(saved >= 0);
        assert_eq!(libc::dup2(file.as_raw_fd(), 2), 2);
        let r = p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        assert_eq!(libc::dup2(saved, 2), 2);
        libc::close(saved);
        r
    };
    let mut log = String::new();
    std::fs::File::open(capture)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    (result, log)
}

fn assert_refused(outcome: (Result<(), P11Error>, String), needles: &[&str]) {
    let (result, log) = outcome;
    assert!(
        matches!(result, Err(P11Error::Pkcs11(RvError::GeneralError, _))),
        "{result:?}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one log line expected:\n{log}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing in {:?}", lines[0]);
    }
}

#[test]
fn files_others_can_write_and_the_unedited_example_are_refused_at_initialize() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("stderr.log");
    let cert = dir.path().join("web.pem");
    std::fs::copy(
        common::workspace_root().join("testdata/aci/uvm_host_amd_certificate.pem"),
        &cert,
    )
    .unwrap();
    std::fs::set_permissions(&cert, Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"[platform]
evidence = "emulated"
emulator_url = "https://127.0.0.1:1"
[attestation]
url = "https://127.0.0.1:2"
[identity]
source = "imds"
imds_url = "http://127.0.0.1:3"
[[token]]
label = "perm"
[[token.key]]
label = "web"
id = "01"
kid = "https://127.0.0.1:4/keys/web"
certificate = "{}"
"#,
            cert.display()
        ),
    )
    .unwrap();
    let p11 = Pkcs11::new(common::module_path()).expect("load module");

    std::fs::set_permissions(&config, Permissions::from_mode(0o666)).unwrap();
    assert_refused(
        initialize(&p11, &config, &capture),
        &[
            &config.display().to_string(),
            "writable by every user",
            "mode 0666",
            &format!("chmod go-w {}", config.display()),
        ],
    );

    std::fs::set_permissions(&config, Permissions::from_mode(0o620)).unwrap();
    assert_refused(
        initialize(&p11, &config, &capture),
        &["config", "writable by its group", "mode 0620"],
    );

    std::fs::set_permissions(&config, Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(&cert, Permissions::from_mode(0o664)).unwrap();
    assert_refused(
        initialize(&p11, &config, &capture),
        &[
            &format!("certificate {}", cert.display()),
            "writable by its group",
        ],
    );

    // The packaged example: all comments until edited, even with safe permissions.
    let example = dir.path().join("example.toml");
    std::fs::copy(
        common::workspace_root().join("packaging/debian/config.toml"),
        &example,
    )
    .unwrap();
    std::fs::set_permissions(&example, Permissions::from_mode(0o640)).unwrap();
    assert_refused(
        initialize(&p11, &example, &capture),
        &["no settings", "packaged example", "skr-pkcs11 doctor"],
    );

    // Owner-writable only (group-readable, as for a service's group): initialises.
    std::fs::set_permissions(&cert, Permissions::from_mode(0o644)).unwrap();
    let (result, log) = initialize(&p11, &config, &capture);
    result.unwrap_or_else(|e| panic!("{e}: {log}"));
    let slots = p11.get_slots_with_token().unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!(p11.get_token_info(slots[0]).unwrap().label(), "perm");
    p11.finalize().unwrap();
}
