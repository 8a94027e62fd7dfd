//! Fork behaviour through the C ABI (DESIGN.md "Fork"): by default a forked child
//! re-initialises and logs in from the inherited keys with no second release;
//! with `fork = "re-release"` the child's login releases again.

mod common;

use common::Emulator;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;

/// In the child: re-initialise, log in, sign with tls-ec. Exit code 0 = all worked.
/// `_exit` so the child never runs the parent's atexit handlers (they stop the emulator).
fn child_logs_in_and_signs() -> ! {
    let code = (|| -> Result<(), String> {
        let p11 = Pkcs11::new(common::module_path()).map_err(|e| e.to_string())?;
        p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("C_Initialize in child: {e}"))?;
        let slot = *p11
            .get_slots_with_token()
            .map_err(|e| e.to_string())?
            .iter()
            .find(|s| {
                p11.get_token_info(**s)
                    .map(|t| t.label() == "skr-demo")
                    .unwrap_or(false)
            })
            .ok_or("no skr-demo token")?;
        let s = p11.open_ro_session(slot).map_err(|e| e.to_string())?;
        s.login(UserType::User, None)
            .map_err(|e| format!("C_Login in child: {e}"))?;
        let k = s
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(b"tls-ec".to_vec()),
            ])
            .map_err(|e| e.to_string())?;
        let k = *k.first().ok_or("no tls-ec private key in child")?;
        let sig = s
            .sign(&Mechanism::EcdsaSha256, k, b"from the worker")
            .map_err(|e| format!("C_Sign in child: {e}"))?;
        if sig.len() != 64 {
            return Err("bad signature length".into());
        }
        Ok(())
    })();
    if let Err(e) = &code {
        eprintln!("child: {e}");
    }
    // SAFETY: terminating the forked child without running atexit handlers.
    unsafe { libc::_exit(if code.is_ok() { 0 } else { 1 }) }
}

fn run_parent_then_fork(config: &std::path::Path, emu: &Emulator) -> (u64, u64) {
    std::env::set_var("SKR_PKCS11_CONFIG", config);
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
    s.login(UserType::User, None).expect("parent login");
    let after_parent = emu.releases("tls-ec");
    // SAFETY: fork in a test process; the child only calls the module and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        child_logs_in_and_signs();
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed (see its stderr above)"
    );
    let after_child = emu.releases("tls-ec");
    drop(s);
    p11.finalize().expect("C_Finalize");
    (after_parent, after_child)
}

// One test function: the module is loaded once per process, and both policies are checked
// in sequence with C_Finalize between them.
#[test]
fn forked_child_logs_in_from_inherited_keys_or_releases_again_per_policy() {
    let emu = Emulator::shared();
    let (parent, child) = run_parent_then_fork(&emu.config_path(), emu);
    assert_eq!(
        child, parent,
        "fork = keep (default): the child's login must not release again"
    );

    let rerelease = emu.config_variant("fork-rerelease.toml", |t| {
        format!("fork = \"re-release\"\n{t}")
    });
    let (parent, child) = run_parent_then_fork(&rerelease, emu);
    assert_eq!(
        child,
        parent + 1,
        "fork = re-release: the child's login releases again"
    );
}
