//! One host of a fleet (tests/fleet_start.rs, scripts/fleet.sh): loads the module (argv[1]),
//! finds the token labelled argv[2] and prints `ready`; then waits for the start signal — a
//! shared flock on argv[3], which the launcher holds exclusively until every host is ready, so
//! that all of them call C_Login at the same moment — logs in, logs out and prints one line:
//! `logged-in login_ms=N done_unix_ms=N` (exit 0) or `failed login_ms=N: <error>` (exit 1).

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::session::UserType;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn fail(what: &str) -> ! {
    say(&format!("failed login_ms=0: {what}"));
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: fleet_login MODULE TOKEN_LABEL START_LOCK_FILE");
        std::process::exit(2);
    }
    let p11 = Pkcs11::new(&args[1]).unwrap_or_else(|e| fail(&format!("load module: {e}")));
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap_or_else(|e| fail(&format!("C_Initialize: {e}")));
    let slots = p11
        .get_slots_with_token()
        .unwrap_or_else(|e| fail(&format!("C_GetSlotList: {e}")));
    let slot = slots
        .into_iter()
        .find(|s| {
            p11.get_token_info(*s)
                .map(|t| t.label() == args[2])
                .unwrap_or(false)
        })
        .unwrap_or_else(|| fail(&format!("no token labelled {:?}", args[2])));
    let session = p11
        .open_ro_session(slot)
        .unwrap_or_else(|e| fail(&format!("C_OpenSession: {e}")));
    let start =
        std::fs::File::open(&args[3]).unwrap_or_else(|e| fail(&format!("open {}: {e}", args[3])));
    say("ready");
    // SAFETY: flock on a descriptor this process owns; blocks until the launcher unlocks.
    if unsafe { libc::flock(start.as_raw_fd(), libc::LOCK_SH) } != 0 {
        fail(&format!(
            "flock {}: {}",
            args[3],
            std::io::Error::last_os_error()
        ));
    }
    drop(start);
    let started = Instant::now();
    let result = session.login(UserType::User, None);
    let login_ms = started.elapsed().as_millis();
    match result {
        Ok(()) => {
            let done_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let _ = session.logout();
            say(&format!(
                "logged-in login_ms={login_ms} done_unix_ms={done_unix_ms}"
            ));
        }
        Err(e) => {
            say(&format!("failed login_ms={login_ms}: C_Login: {e}"));
            std::process::exit(1);
        }
    }
}
