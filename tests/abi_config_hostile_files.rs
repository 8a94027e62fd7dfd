//! The built module, given hostile files through its config, answers C_Initialize at once with
//! CKR_GENERAL_ERROR and one log line naming the file and what is wrong: a certificate file
//! whose block is truncated (`MIIB`, which made x509-cert's PEM reader spin forever, issue 11),
//! a block without its END line, a FIFO (opening it would wait for a writer), `/dev/zero`
//! (reading it never ends) and a file over the size bound. Each call runs on a thread of its
//! own and must return within a deadline, so a regression fails instead of hanging the suite.
//!
//! One test in this binary: the cases run in order, each pointing SKR_PKCS11_CONFIG at its
//! file (no other test runs while the variable changes), and the module's stderr (where it
//! logs before a config is loaded) is captured into a file around each C_Initialize.

mod common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Far above what C_Initialize takes on a debug build (milliseconds); only a hang reaches it.
const DEADLINE: Duration = Duration::from_secs(10);

fn config_naming(dir: &Path, name: &str, certificate: &Path) -> PathBuf {
    let config = dir.join(format!("{name}.toml"));
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
label = "hostile"
[[token.key]]
label = "web"
id = "01"
kid = "https://127.0.0.1:4/keys/web"
certificate = "{}"
"#,
            certificate.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    config
}

/// C_Initialize with `config` on its own thread, bounded by DEADLINE; the outcome, the time it
/// took and what the module wrote to stderr meanwhile.
fn initialize(
    p11: &Pkcs11,
    config: &Path,
    capture: &Path,
) -> (Result<(), P11Error>, Duration, String) {
    std::env::set_var("SKR_PKCS11_CONFIG", config);
    let file = std::fs::File::create(capture).unwrap();
    // SAFETY: plain descriptor juggling on fd 2: saved, replaced by the capture file for the
    // call, restored; the descriptors are valid for the whole block.
    let saved = unsafe { libc::dup(2) };
    assert!(saved >= 0);
    assert_eq!(unsafe { libc::dup2(file.as_raw_fd(), 2) }, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let p = p11.clone();
    let started = Instant::now();
    std::thread::spawn(move || {
        let r = p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        let _ = tx.send(r);
    });
    let result = rx.recv_timeout(DEADLINE);
    let took = started.elapsed();
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::dup2(saved, 2), 2);
        libc::close(saved);
    }
    let result = result.unwrap_or_else(|_| {
        panic!(
            "C_Initialize with {} did not return within {DEADLINE:?}",
            config.display()
        )
    });
    let mut log = String::new();
    std::fs::File::open(capture)
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    (result, took, log)
}

fn assert_refused(outcome: (Result<(), P11Error>, Duration, String), needles: &[&str]) {
    let (result, took, log) = outcome;
    assert!(
        matches!(result, Err(P11Error::Pkcs11(RvError::GeneralError, _))),
        "{result:?}"
    );
    assert!(took < Duration::from_secs(2), "C_Initialize took {took:?}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one log line expected:\n{log}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} missing in {:?}", lines[0]);
    }
}

#[test]
fn hostile_certificate_files_are_refused_at_once_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("stderr.log");
    let p11 = Pkcs11::new(common::module_path()).expect("load module");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };

    let truncated = write(
        "truncated.pem",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    let config = config_naming(dir.path(), "truncated", &truncated);
    assert_refused(
        initialize(&p11, &config, &capture),
        &[
            &truncated.display().to_string(),
            "certificate 1 of the file: not an X.509 certificate",
        ],
    );

    let unterminated = write("unterminated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
    let config = config_naming(dir.path(), "unterminated", &unterminated);
    assert_refused(
        initialize(&p11, &config, &capture),
        &[
            &unterminated.display().to_string(),
            "has no -----END CERTIFICATE----- line",
        ],
    );

    let fifo = dir.path().join("fifo.pem");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let config = config_naming(dir.path(), "fifo", &fifo);
    assert_refused(
        initialize(&p11, &config, &capture),
        &[&fifo.display().to_string(), "not a regular file"],
    );

    let config = config_naming(dir.path(), "zero", Path::new("/dev/zero"));
    assert_refused(
        initialize(&p11, &config, &capture),
        &["/dev/zero", "not a regular file"],
    );

    let huge = write("huge.pem", &vec![b'A'; (1 << 20) + 1]);
    let config = config_naming(dir.path(), "huge", &huge);
    assert_refused(
        initialize(&p11, &config, &capture),
        &[&huge.display().to_string(), "larger than 1024 KiB"],
    );

    // The same config with a real certificate initialises: the refusals above are the files'.
    let good = write(
        "good.pem",
        &std::fs::read(common::workspace_root().join("testdata/aci/uvm_host_amd_certificate.pem"))
            .unwrap(),
    );
    let config = config_naming(dir.path(), "good", &good);
    let (result, _, log) = initialize(&p11, &config, &capture);
    result.unwrap_or_else(|e| panic!("{e}: {log}"));
    let slots = p11.get_slots_with_token().unwrap();
    assert_eq!(p11.get_token_info(slots[0]).unwrap().label(), "hostile");
    p11.finalize().unwrap();
}
