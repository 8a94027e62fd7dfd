//! General-purpose, slot and token, session and login functions.

use super::process::{self, drop_inherited_states, register_atfork, state, state_changed};
use super::{
    bad, c_struct, deliver_list, input, instance, out, out_struct, p11_fn, rv_name, Instance,
};
use crate::config::Config;
use crate::crypto::mechanism::{lookup, mechanisms};
use crate::error::{Error, Result, Step};
use crate::sync;
use crate::token::{self, padded, LoginStart, Material, Module};
use cryptoki_sys::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub(crate) const MANUFACTURER: &str = "skr-pkcs11";
// At most 32 bytes: the CK_INFO field is fixed-size and space padded.
const LIBRARY_DESCRIPTION: &str = "Keys released to an attested TEE";
const MODEL: &str = "SKR TEE token";
/// Longest local PIN accepted (CK_TOKEN_INFO.ulMaxPinLen).
const MAX_PIN_LEN: CK_ULONG = 255;

fn version() -> CK_VERSION {
    CK_VERSION {
        major: env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0),
        minor: env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0),
    }
}

/// What C_Initialize's arguments ask for, decoded without touching `pReserved`.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) struct InitArgs {
    /// CKF_LIBRARY_CANT_CREATE_OS_THREADS: run the release on the caller's thread.
    pub no_threads: bool,
}

/// Decode and check CK_C_INITIALIZE_ARGS (pkcs11-clients.md §3.2).
///
/// Locking: the module always uses its own OS locks and never calls the application's mutex
/// callbacks. They are accepted with or without CKF_OS_LOCKING_OK: p11-kit and GnuTLS pass
/// callbacks without the flag and would not load a module answering CKR_CANT_LOCK, and OS
/// locks give the application the thread safety it asked for. A partial set of callbacks is
/// CKR_ARGUMENTS_BAD.
///
/// Threads: CKF_LIBRARY_CANT_CREATE_OS_THREADS (GnuTLS sets it) is accepted rather than
/// refused with CKR_NEED_TO_CREATE_THREADS, which would lock GnuTLS out: C_Login then runs
/// the release on the caller's thread instead of a login thread (so such a caller must not
/// call C_Login from inside an async runtime). The release itself still starts short-lived
/// threads (the blocking HTTP clients' runtime, the identity prefetch, a GET and a release per
/// key); none outlives C_Login.
///
/// # Safety
/// `p` is NULL or points to a CK_C_INITIALIZE_ARGS.
pub(crate) unsafe fn decode_init_args(p: *const CK_C_INITIALIZE_ARGS) -> Result<InitArgs> {
    if p.is_null() {
        return Ok(InitArgs { no_threads: false });
    }
    // SAFETY: non-NULL, caller-provided struct; copied, and pReserved is only compared.
    let a = unsafe { p.read_unaligned() };
    if !a.pReserved.is_null() {
        return Err(bad("pReserved must be NULL (it is never read)"));
    }
    let callbacks = [
        a.CreateMutex.is_some(),
        a.DestroyMutex.is_some(),
        a.LockMutex.is_some(),
        a.UnlockMutex.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if callbacks != 0 && callbacks != 4 {
        return Err(bad("give all four mutex callbacks or none"));
    }
    Ok(InitArgs {
        no_threads: a.flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS != 0,
    })
}

/// Read a certificate file again (key rotation): None when it cannot be read now (the
/// reason is logged; the certificate loaded before stays).
pub(crate) fn reread_certificate(path: &std::path::Path) -> Option<Vec<u8>> {
    crate::config::read_named_file(path)
        .map_err(|e| log::warn!("cannot re-read certificate {}: {e}", path.display()))
        .ok()
}

/// Bring a token's keys in line with the tree's store at an object lookup; a certificate
/// file that names a key not released yet triggers a refresh now.
pub(crate) fn follow_lookup(inst: &Instance, t: &token::Token) {
    super::lease::refresh_inline_if_due(inst, t);
    if t.follow(token::Follow::Lookup, &reread_certificate) == token::FollowOutcome::NeedsRelease {
        super::lease::refresh_for_rotation(inst, t);
        t.follow(token::Follow::Lookup, &reread_certificate);
    }
}

/// Read every certificate file the config names (the only file I/O besides the config).
fn read_certificates(cfg: &Config) -> Result<HashMap<std::path::PathBuf, Vec<u8>>> {
    let mut pems = HashMap::new();
    for t in &cfg.tokens {
        for k in &t.keys {
            if let Some(p) = &k.certificate {
                if pems.contains_key(p) {
                    continue;
                }
                let bytes = crate::config::read_named_file(p).map_err(|e| {
                    Error::config(format!(
                        "{}: token {:?} key {:?}: cannot read certificate {}: {e}",
                        cfg.source_path.display(),
                        t.label,
                        k.label,
                        p.display()
                    ))
                    .with_hint(
                        "fix key.certificate (relative paths are relative to the config file)",
                    )
                })?;
                pems.insert(p.clone(), bytes);
            }
        }
    }
    Ok(pems)
}

/// Build a fresh state from the configuration (C_Initialize, after argument checks).
pub(crate) fn initialize_from(cfg: Config, args: InitArgs) -> Result<()> {
    crate::logging::init(&cfg.logging);
    let me = std::process::id();
    process::apply_fork_policy(cfg.fork, me);
    let pems = read_certificates(&cfg)?;
    let module = Module::new(Arc::new(cfg), &pems)?;
    // The parent's states (if any) are dropped: their sessions and handles are not ours.
    drop_inherited_states();
    let mut g = sync::write(state());
    if let Some(i) = &*g {
        if !i.forked() {
            return Err(Error::new(
                CKR_CRYPTOKI_ALREADY_INITIALIZED,
                "C_Initialize was already called",
            ));
        }
    }
    *g = Some(Arc::new(Instance::new(module, me, args.no_threads)));
    state_changed();
    Ok(())
}

p11_fn! {
    fn C_Initialize(p_init_args: *mut std::ffi::c_void) [] {
        crate::secret::arena::install();
        register_atfork();
        crate::logging::init_default();
        // SAFETY: the API passes NULL or a CK_C_INITIALIZE_ARGS.
        let args = unsafe { decode_init_args(p_init_args as *const CK_C_INITIALIZE_ARGS)? };
        if instance().is_ok() {
            return Err(Error::new(CKR_CRYPTOKI_ALREADY_INITIALIZED, "C_Initialize was already called"));
        }
        let cfg = Config::load_default()?;
        initialize_from(cfg, args)
    }

    fn C_Finalize(p_reserved: *mut std::ffi::c_void) [] {
        if !p_reserved.is_null() {
            return Err(bad("pReserved must be NULL"));
        }
        let taken = {
            let mut g = sync::write(state());
            let taken = g.take();
            state_changed();
            taken
        };
        let Some(inst) = taken else {
            // A child finalising its parent's state (pkcs11-provider does, before
            // re-initialising): drop per-process state only; the inherited keys wait for
            // C_Initialize to apply the fork policy.
            if drop_inherited_states() {
                return Ok(());
            }
            return Err(Error::new(CKR_CRYPTOKI_NOT_INITIALIZED, "C_Initialize has not been called"));
        };
        if inst.forked() {
            return Ok(());
        }
        inst.module.wipe_all();
        process::forget_cached_instance();
        process::finalize_retained();
        Ok(())
    }

    fn C_GetInfo(p_info: *mut CK_INFO) [] {
        instance()?;
        let info = c_struct!(CK_INFO {
            cryptokiVersion: CK_VERSION { major: 3, minor: 0 },
            manufacturerID: padded(MANUFACTURER),
            flags: 0,
            libraryDescription: padded(LIBRARY_DESCRIPTION),
            libraryVersion: version(),
        });
        // SAFETY: API out-pointer.
        unsafe { out_struct(p_info, &info, "pInfo") }
    }

    fn C_GetSlotList(token_present: CK_BBOOL, p_slot_list: *mut CK_SLOT_ID, pul_count: *mut CK_ULONG) [token_present] {
        let inst = instance()?;
        let slots = inst.module.slot_ids();
        // SAFETY: API list and count pointers.
        unsafe { deliver_list(p_slot_list, pul_count, &slots, "slot list") }
    }

    fn C_GetSlotInfo(slot: CK_SLOT_ID, p_info: *mut CK_SLOT_INFO) [slot] {
        let inst = instance()?;
        let t = inst.module.token(slot)?;
        let info = c_struct!(CK_SLOT_INFO {
            slotDescription: padded(&format!("SKR slot {}", t.config.label)),
            manufacturerID: padded(MANUFACTURER),
            flags: CKF_TOKEN_PRESENT,
            hardwareVersion: version(),
            firmwareVersion: version(),
        });
        // SAFETY: API out-pointer.
        unsafe { out_struct(p_info, &info, "pInfo") }
    }

    fn C_GetTokenInfo(slot: CK_SLOT_ID, p_info: *mut CK_TOKEN_INFO) [slot] {
        let inst = instance()?;
        let t = inst.module.token(slot)?;
        let (sessions, rw) = inst.module.session_counts(t.index);
        let mut flags = CKF_RNG
            | CKF_WRITE_PROTECTED
            | CKF_LOGIN_REQUIRED
            | CKF_USER_PIN_INITIALIZED
            | CKF_TOKEN_INITIALIZED;
        // With a local PIN the client must ask for it; without one, clients log in with a
        // NULL PIN when they see the protected authentication path.
        if t.config.pin.is_none() {
            flags |= CKF_PROTECTED_AUTHENTICATION_PATH;
        }
        let info = c_struct!(CK_TOKEN_INFO {
            label: t.label_field(),
            manufacturerID: padded(MANUFACTURER),
            model: padded(MODEL),
            serialNumber: t.serial_field(),
            flags: flags,
            ulMaxSessionCount: CK_EFFECTIVELY_INFINITE,
            ulSessionCount: sessions as CK_ULONG,
            ulMaxRwSessionCount: CK_EFFECTIVELY_INFINITE,
            ulRwSessionCount: rw as CK_ULONG,
            ulMaxPinLen: MAX_PIN_LEN,
            ulMinPinLen: 0,
            ulTotalPublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePublicMemory: CK_UNAVAILABLE_INFORMATION,
            ulTotalPrivateMemory: CK_UNAVAILABLE_INFORMATION,
            ulFreePrivateMemory: CK_UNAVAILABLE_INFORMATION,
            hardwareVersion: version(),
            firmwareVersion: version(),
            utcTime: [b' '; 16],
        });
        // SAFETY: API out-pointer.
        unsafe { out_struct(p_info, &info, "pInfo") }
    }

    fn C_GetMechanismList(slot: CK_SLOT_ID, p_list: *mut CK_MECHANISM_TYPE, pul_count: *mut CK_ULONG) [slot] {
        let inst = instance()?;
        inst.module.token(slot)?;
        let mechs: Vec<CK_MECHANISM_TYPE> = mechanisms().iter().map(|m| m.ckm).collect();
        // SAFETY: API list and count pointers.
        unsafe { deliver_list(p_list, pul_count, &mechs, "mechanism list") }
    }

    fn C_GetMechanismInfo(slot: CK_SLOT_ID, mech: CK_MECHANISM_TYPE, p_info: *mut CK_MECHANISM_INFO) [slot, mech] {
        let inst = instance()?;
        inst.module.token(slot)?;
        let m = lookup(mech)
            .ok_or_else(|| Error::new(CKR_MECHANISM_INVALID, format!("mechanism {mech:#x} is not supported")))?;
        let info = c_struct!(CK_MECHANISM_INFO { ulMinKeySize: m.min_key, ulMaxKeySize: m.max_key, flags: m.flags });
        // SAFETY: API out-pointer.
        unsafe { out_struct(p_info, &info, "pInfo") }
    }

    fn C_InitToken(slot: CK_SLOT_ID, _pin: *mut CK_UTF8CHAR, _pin_len: CK_ULONG, _label: *mut CK_UTF8CHAR) [slot] {
        instance()?.module.token(slot)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "the token is defined by configuration and cannot be initialised"))
    }

    fn C_InitPIN(h: CK_SESSION_HANDLE, _pin: *mut CK_UTF8CHAR, _len: CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "PINs are configured, not set through PKCS#11"))
    }

    fn C_SetPIN(h: CK_SESSION_HANDLE, _old: *mut CK_UTF8CHAR, _old_len: CK_ULONG, _new: *mut CK_UTF8CHAR, _new_len: CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "PINs are configured, not set through PKCS#11"))
    }

    fn C_OpenSession(slot: CK_SLOT_ID, flags: CK_FLAGS, _app: *mut std::ffi::c_void, _notify: CK_NOTIFY, ph_session: *mut CK_SESSION_HANDLE) [slot, flags] {
        let inst = instance()?;
        if ph_session.is_null() {
            return Err(bad("phSession is NULL"));
        }
        let h = inst.module.open_session(slot, flags)?;
        if let Ok(t) = inst.module.token(slot) {
            super::lease::refresh_inline_if_due(&inst, t);
        }
        // SAFETY: checked non-NULL API out-pointer.
        unsafe { out(ph_session, h, "phSession") }
    }

    fn C_CloseSession(h: CK_SESSION_HANDLE) [h] {
        instance()?.module.close_session(h)
    }

    fn C_CloseAllSessions(slot: CK_SLOT_ID) [slot] {
        instance()?.module.close_all(slot)
    }

    fn C_GetSessionInfo(h: CK_SESSION_HANDLE, p_info: *mut CK_SESSION_INFO) [h] {
        let inst = instance()?;
        let (s, t) = inst.module.session_token(h)?;
        let state = match (s.rw, t.is_logged_in()) {
            (false, false) => CKS_RO_PUBLIC_SESSION,
            (false, true) => CKS_RO_USER_FUNCTIONS,
            (true, false) => CKS_RW_PUBLIC_SESSION,
            (true, true) => CKS_RW_USER_FUNCTIONS,
        };
        let info = c_struct!(CK_SESSION_INFO {
            slotID: t.slot_id,
            state: state,
            flags: CKF_SERIAL_SESSION | if s.rw { CKF_RW_SESSION } else { 0 },
            ulDeviceError: 0,
        });
        // SAFETY: API out-pointer.
        unsafe { out_struct(p_info, &info, "pInfo") }
    }

    fn C_SessionCancel(h: CK_SESSION_HANDLE, flags: CK_FLAGS) [h, flags] {
        let inst = instance()?;
        let (s, _) = inst.module.session_token(h)?;
        let mut g = s.lock();
        if flags & CKF_ENCRYPT != 0 { g.encrypt = None; }
        if flags & CKF_DECRYPT != 0 { g.decrypt = None; }
        if flags & CKF_DIGEST != 0 { g.digest = None; }
        if flags & CKF_SIGN != 0 { g.sign = None; }
        if flags & CKF_VERIFY != 0 { g.verify = None; }
        if flags & CKF_FIND_OBJECTS != 0 { g.find = None; }
        if flags & CKF_MESSAGE_ENCRYPT != 0 { g.message_encrypt = None; }
        if flags & CKF_MESSAGE_DECRYPT != 0 { g.message_decrypt = None; }
        Ok(())
    }

    fn C_GetOperationState(h: CK_SESSION_HANDLE, _state: *mut CK_BYTE, _len: *mut CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "operation state cannot be saved"))
    }

    fn C_SetOperationState(h: CK_SESSION_HANDLE, _state: *mut CK_BYTE, _len: CK_ULONG, _enc: CK_OBJECT_HANDLE, _auth: CK_OBJECT_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "operation state cannot be restored"))
    }

    fn C_Login(h: CK_SESSION_HANDLE, user_type: CK_USER_TYPE, p_pin: *mut CK_UTF8CHAR, pin_len: CK_ULONG) [h, user_type] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        match user_type {
            CKU_USER => {}
            // CKU_SO is a valid user type, but this token has no security officer: the codes
            // PKCS#11 gives an SO login in this state, and otherwise no SO PIN is correct.
            CKU_SO => {
                let (open, rw) = inst.module.session_counts(t.index);
                return Err(if t.is_logged_in() {
                    Error::new(CKR_USER_ANOTHER_ALREADY_LOGGED_IN, "the user is logged in; this token has no security officer")
                } else if open > rw {
                    Error::new(CKR_SESSION_READ_ONLY_EXISTS, "a read-only session is open; this token has no security officer anyway")
                } else {
                    Error::new(CKR_PIN_INCORRECT, "this token has no security officer: no SO PIN is correct (docs/MODULE.md)")
                });
            }
            // No key has CKA_ALWAYS_AUTHENTICATE, so no operation ever waits for this.
            CKU_CONTEXT_SPECIFIC => return Err(Error::new(CKR_OPERATION_NOT_INITIALIZED, "no operation needs context-specific login")),
            _ => return Err(Error::new(CKR_USER_TYPE_INVALID, format!("user type {user_type} is not CKU_USER"))),
        }
        if t.is_logged_in() {
            return Err(Error::new(CKR_USER_ALREADY_LOGGED_IN, "the token is already logged in"));
        }
        if let Some(expected) = &t.config.pin {
            if pin_len > MAX_PIN_LEN {
                return Err(Error::new(CKR_PIN_LEN_RANGE, "PIN too long"));
            }
            // SAFETY: API input buffer of pin_len bytes.
            let pin = unsafe { input(p_pin, pin_len, "pPin")? };
            check_pin(pin, expected.as_bytes()).map_err(|e| {
                Error::new(
                    e.rv(),
                    format!("token {:?}: {}", t.config.label, e.message()),
                )
                .with_hint("pass the pin set in the token's config (or remove it to use the protected authentication path)")
            })?;
        }
        login(&inst, t.index)
    }

    fn C_LoginUser(h: CK_SESSION_HANDLE, _user_type: CK_USER_TYPE, _pin: *mut CK_UTF8CHAR, _pin_len: CK_ULONG, _user: *mut CK_UTF8CHAR, _user_len: CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "the token has no user names; use C_Login"))
    }

    fn C_Logout(h: CK_SESSION_HANDLE) [h] {
        let inst = instance()?;
        let (_, t) = inst.module.session_token(h)?;
        inst.module.logout(t.index)?;
        log::info!("C_Logout token=\"{}\": keys wiped", t.config.label);
        Ok(())
    }

    fn C_SeedRandom(h: CK_SESSION_HANDLE, _seed: *mut CK_BYTE, _len: CK_ULONG) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_RANDOM_SEED_NOT_SUPPORTED, "AWS-LC seeds itself"))
    }

    fn C_GenerateRandom(h: CK_SESSION_HANDLE, p_out: *mut CK_BYTE, len: CK_ULONG) [h, len] {
        instance()?.module.session(h)?;
        if len == 0 {
            return Ok(());
        }
        if p_out.is_null() || len > isize::MAX as CK_ULONG {
            return Err(bad("pRandomData is NULL"));
        }
        // SAFETY: the caller's buffer holds len bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(p_out, len as usize) };
        crate::crypto::random(buf)
    }

    fn C_GetFunctionStatus(h: CK_SESSION_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_PARALLEL, "no parallel functions"))
    }

    fn C_CancelFunction(h: CK_SESSION_HANDLE) [h] {
        instance()?.module.session(h)?;
        Err(Error::new(CKR_FUNCTION_NOT_PARALLEL, "no parallel functions"))
    }

    fn C_WaitForSlotEvent(flags: CK_FLAGS, _slot: *mut CK_SLOT_ID, _reserved: *mut std::ffi::c_void) [flags] {
        instance()?;
        if flags & CKF_DONT_BLOCK != 0 {
            return Err(Error::new(CKR_NO_EVENT, "slots never change"));
        }
        Err(Error::new(CKR_FUNCTION_NOT_SUPPORTED, "slots never change"))
    }
}

/// Constant-time PIN check: compares hashes, so neither content nor length leaks by timing.
fn check_pin(given: &[u8], expected: &[u8]) -> Result<()> {
    let a = crate::crypto::HashAlg::Sha256.digest(given);
    let b = crate::crypto::HashAlg::Sha256.digest(expected);
    aws_lc_rs::constant_time::verify_slices_are_equal(&a, &b).map_err(|_| {
        Error::new(
            CKR_PIN_INCORRECT,
            "the PIN does not match the token's configured pin",
        )
    })
}

/// Log in one token: join a release in flight, or run one (outside every lock, on a thread
/// of its own) and install its keys in one short write. A failure is logged in one line and
/// leaves the token logged out.
pub(crate) fn login(inst: &Instance, token_index: usize) -> Result<()> {
    let t = &inst.module.tokens[token_index];
    let lease = match t.begin_login() {
        LoginStart::AlreadyLoggedIn => {
            return Err(Error::new(
                CKR_USER_ALREADY_LOGGED_IN,
                "the token is already logged in",
            ))
        }
        LoginStart::Joined(r) => return r.map_err(Error::mark_logged),
        LoginStart::Lead(l) => l,
    };
    let started = Instant::now();
    let (material, timings, inherited) = match token::retained(&t.config.label) {
        Some(m) => (Ok(super::lease::inherited_keys(inst, t, m)), None, true),
        None => {
            let (r, timings) = run_release(&inst.module.config, token_index, !inst.no_threads);
            (r, timings, false)
        }
    };
    let install_started = Instant::now();
    let result = lease.finish(material);
    if result.is_ok() {
        // Keys inherited from the tree may be older than its store: catch up, then keep them
        // fresh.
        if inherited {
            follow_lookup(inst, t);
        }
        super::lease::after_login(inst, token_index);
    }
    let install = install_started.elapsed();
    match result {
        Ok(()) => {
            if crate::secret::arena::take_mlock_warning() {
                log::warn!("mlock of key memory failed; keys may reach swap. hint: raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK=)");
            }
            let n = t.config.keys.len();
            match timings {
                Some(tm) => log::info!(
                    "C_Login token=\"{}\" ok: {n} keys released; module time transfer_key={}ms evidence={}ms attestation={}ms identity={}ms release={}ms unwrap={}ms install={}ms total={}ms",
                    t.config.label,
                    tm.transfer_key.as_millis(),
                    tm.evidence.as_millis(),
                    tm.attestation.as_millis(),
                    tm.identity.as_millis(),
                    tm.release.as_millis(),
                    tm.unwrap.as_millis(),
                    install.as_millis(),
                    started.elapsed().as_millis()
                ),
                None if inherited => log::info!(
                    "C_Login token=\"{}\" ok: {n} keys from this process tree's earlier release (no network)",
                    t.config.label
                ),
                None => {}
            }
            Ok(())
        }
        Err(e) => {
            log::error!(
                "C_Login token=\"{}\" failed: rv={} {}",
                t.config.label,
                rv_name(e.rv()),
                e
            );
            Err(e.mark_logged())
        }
    }
}

/// Run `release::release_token` and parse what it returns: on a thread of its own (the caller
/// may be inside an async runtime), joined before returning; or on the caller's thread when
/// the application forbade new threads.
fn run_release(
    cfg: &Arc<Config>,
    token_index: usize,
    own_thread: bool,
) -> (Result<Arc<Material>>, Option<crate::release::LoginTimings>) {
    let cfg2 = cfg.clone();
    let work = move || {
        let tcfg = &cfg2.tokens[token_index];
        crate::release::release_token(&cfg2, tcfg)
            .and_then(|(keys, tm)| Ok((Material::from_released(tcfg, keys)?, tm)))
    };
    if !own_thread {
        return match work() {
            Ok((m, tm)) => (Ok(Arc::new(m)), Some(tm)),
            Err(e) => (Err(e), None),
        };
    }
    let spawned = std::thread::Builder::new()
        .name("skr-login".into())
        .spawn(work);
    let joined = match spawned {
        Ok(handle) => handle.join(),
        Err(e) => {
            return (
                Err(Error::new(
                    CKR_HOST_MEMORY,
                    format!("cannot start the login thread: {e}"),
                )
                .with_step(Step::Install)),
                None,
            )
        }
    };
    match joined {
        Ok(Ok((m, tm))) => (Ok(Arc::new(m)), Some(tm)),
        Ok(Err(e)) => (Err(e), None),
        Err(_) => (
            Err(Error::general("the login thread panicked")
                .with_step(Step::Install)
                .with_hint("report this bug with the log")),
            None,
        ),
    }
}
