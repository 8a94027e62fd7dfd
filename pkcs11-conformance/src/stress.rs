//! A C API stress tester for any PKCS#11 module: seeded random call sequences over the whole
//! function list — stale and random handles, NULL pointers, short and huge lengths with guard
//! bytes after every output buffer, bogus mechanism parameters, interleaved Init / Update /
//! Final, re-initialisation, several threads and fork — checked against invariants that hold
//! for every module:
//!
//! * no crash and no hang (a watchdog aborts with the last call of every thread);
//! * only CK_RVs the specification defines;
//! * never a byte written past the length given (guard bytes after every output);
//! * a size query (NULL output) that answers L is honoured by a call with L bytes, and the
//!   returned length never exceeds the buffer;
//! * `CKR_BUFFER_TOO_SMALL` keeps the operation (the next call is not
//!   `CKR_OPERATION_NOT_INITIALIZED`).
//!
//! Threads share handles only in ways that cannot break another thread's invariants
//! (operations on random handles draw them far outside the handles a module hands out);
//! logout, session closing, re-initialisation and fork happen between phases, while the worker
//! threads wait at a barrier. A run is reproducible from its seed when single-threaded.

use crate::module::{call, call3, rv_name, Module};
use cryptoki_sys::*;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// What a run is asked to do.
pub struct Options {
    pub seed: u64,
    /// Random steps in total (each makes one to about ten calls).
    pub steps: u64,
    pub threads: usize,
    pub token_label: String,
    pub pin: Option<Vec<u8>>,
    /// Steps per phase; between phases: logout / login, closing sessions, re-initialisation
    /// and a forked child.
    pub phase_steps: u64,
    /// Fork a child (which re-initialises and runs `fork_steps` steps) between phases.
    pub fork: bool,
    pub fork_steps: u64,
    /// No progress for this long is a hang.
    pub hang: Duration,
    /// Run phases until this much time has passed (a soak) instead of `steps`.
    pub duration: Option<Duration>,
    /// Logins between phases may fail with a documented CK_RV (faults injected into the
    /// services): counted and retried, not a reason to stop.
    pub login_faults: bool,
}

/// The outcome: counts per function and CK_RV, and every invariant violation.
#[derive(Default)]
pub struct Report {
    pub calls: u64,
    pub per_call: BTreeMap<(&'static str, CK_RV), u64>,
    pub violations: Vec<String>,
    pub forks: u64,
    pub reinitialisations: u64,
    /// Logins that failed with a documented CK_RV while faults were injected, then retried.
    pub failed_logins: BTreeMap<CK_RV, u64>,
    /// VmRSS and VmLck (kB) logged in and idle after the first setup, the largest VmRSS seen
    /// at a phase boundary, and both again after the last phase.
    pub memory: Option<Memory>,
}

#[derive(Default, Clone, Copy)]
pub struct Memory {
    pub rss_start: u64,
    pub lck_start: u64,
    pub rss_max: u64,
    pub rss_end: u64,
    pub lck_end: u64,
}

/// A `/proc/self/status` figure in kB.
fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

impl Report {
    fn merge(&mut self, o: Report) {
        self.calls += o.calls;
        for (k, v) in o.per_call {
            *self.per_call.entry(k).or_default() += v;
        }
        self.violations.extend(o.violations);
        self.forks += o.forks;
        self.reinitialisations += o.reinitialisations;
        for (rv, n) in o.failed_logins {
            *self.failed_logins.entry(rv).or_default() += n;
        }
    }
}

/// Every CK_RV of PKCS#11 3.x below CKR_VENDOR_DEFINED.
const DEFINED_RVS: &[CK_RV] = &[
    CKR_OK,
    CKR_CANCEL,
    CKR_HOST_MEMORY,
    CKR_SLOT_ID_INVALID,
    CKR_GENERAL_ERROR,
    CKR_FUNCTION_FAILED,
    CKR_ARGUMENTS_BAD,
    CKR_NO_EVENT,
    CKR_NEED_TO_CREATE_THREADS,
    CKR_CANT_LOCK,
    CKR_ATTRIBUTE_READ_ONLY,
    CKR_ATTRIBUTE_SENSITIVE,
    CKR_ATTRIBUTE_TYPE_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_ACTION_PROHIBITED,
    CKR_DATA_INVALID,
    CKR_DATA_LEN_RANGE,
    CKR_DEVICE_ERROR,
    CKR_DEVICE_MEMORY,
    CKR_DEVICE_REMOVED,
    CKR_ENCRYPTED_DATA_INVALID,
    CKR_ENCRYPTED_DATA_LEN_RANGE,
    CKR_AEAD_DECRYPT_FAILED,
    CKR_FUNCTION_CANCELED,
    CKR_FUNCTION_NOT_PARALLEL,
    CKR_FUNCTION_NOT_SUPPORTED,
    CKR_KEY_HANDLE_INVALID,
    CKR_KEY_SIZE_RANGE,
    CKR_KEY_TYPE_INCONSISTENT,
    CKR_KEY_NOT_NEEDED,
    CKR_KEY_CHANGED,
    CKR_KEY_NEEDED,
    CKR_KEY_INDIGESTIBLE,
    CKR_KEY_FUNCTION_NOT_PERMITTED,
    CKR_KEY_NOT_WRAPPABLE,
    CKR_KEY_UNEXTRACTABLE,
    CKR_MECHANISM_INVALID,
    CKR_MECHANISM_PARAM_INVALID,
    CKR_OBJECT_HANDLE_INVALID,
    CKR_OPERATION_ACTIVE,
    CKR_OPERATION_NOT_INITIALIZED,
    CKR_PIN_INCORRECT,
    CKR_PIN_INVALID,
    CKR_PIN_LEN_RANGE,
    CKR_PIN_EXPIRED,
    CKR_PIN_LOCKED,
    CKR_SESSION_CLOSED,
    CKR_SESSION_COUNT,
    CKR_SESSION_HANDLE_INVALID,
    CKR_SESSION_PARALLEL_NOT_SUPPORTED,
    CKR_SESSION_READ_ONLY,
    CKR_SESSION_EXISTS,
    CKR_SESSION_READ_ONLY_EXISTS,
    CKR_SESSION_READ_WRITE_SO_EXISTS,
    CKR_SIGNATURE_INVALID,
    CKR_SIGNATURE_LEN_RANGE,
    CKR_TEMPLATE_INCOMPLETE,
    CKR_TEMPLATE_INCONSISTENT,
    CKR_TOKEN_NOT_PRESENT,
    CKR_TOKEN_NOT_RECOGNIZED,
    CKR_TOKEN_WRITE_PROTECTED,
    CKR_UNWRAPPING_KEY_HANDLE_INVALID,
    CKR_UNWRAPPING_KEY_SIZE_RANGE,
    CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_USER_ALREADY_LOGGED_IN,
    CKR_USER_NOT_LOGGED_IN,
    CKR_USER_PIN_NOT_INITIALIZED,
    CKR_USER_TYPE_INVALID,
    CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
    CKR_USER_TOO_MANY_TYPES,
    CKR_WRAPPED_KEY_INVALID,
    CKR_WRAPPED_KEY_LEN_RANGE,
    CKR_WRAPPING_KEY_HANDLE_INVALID,
    CKR_WRAPPING_KEY_SIZE_RANGE,
    CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_RANDOM_SEED_NOT_SUPPORTED,
    CKR_RANDOM_NO_RNG,
    CKR_DOMAIN_PARAMS_INVALID,
    CKR_CURVE_NOT_SUPPORTED,
    CKR_BUFFER_TOO_SMALL,
    CKR_SAVED_STATE_INVALID,
    CKR_INFORMATION_SENSITIVE,
    CKR_STATE_UNSAVEABLE,
    CKR_CRYPTOKI_NOT_INITIALIZED,
    CKR_CRYPTOKI_ALREADY_INITIALIZED,
    CKR_MUTEX_BAD,
    CKR_MUTEX_NOT_LOCKED,
    CKR_NEW_PIN_MODE,
    CKR_NEXT_OTP,
    CKR_EXCEEDED_MAX_ITERATIONS,
    CKR_FIPS_SELF_TEST_FAILED,
    CKR_LIBRARY_LOAD_FAILED,
    CKR_PIN_TOO_WEAK,
    CKR_PUBLIC_KEY_INVALID,
    CKR_FUNCTION_REJECTED,
    CKR_TOKEN_RESOURCE_EXCEEDED,
    CKR_OPERATION_CANCEL_FAILED,
    CKR_KEY_EXHAUSTED,
    CKR_PENDING,
    CKR_SESSION_ASYNC_NOT_SUPPORTED,
    CKR_SEED_RANDOM_REQUIRED,
    CKR_OPERATION_NOT_VALIDATED,
    CKR_TOKEN_NOT_INITIALIZED,
    CKR_PARAMETER_SET_NOT_SUPPORTED,
];

/// splitmix64: small, seedable, reproducible; no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// Random bytes of a random length (see `len`), at most `max`.
    fn data(&mut self, max: usize) -> Vec<u8> {
        let n = self.len().min(max);
        self.bytes(n)
    }
    /// Random bytes of a length below `n`.
    fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let n = self.below(n) as usize;
        self.bytes(n)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<T> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.below(v.len() as u64) as usize])
        }
    }
    /// A length: mostly small, sometimes around a power of two, sometimes absurd.
    fn len(&mut self) -> usize {
        match self.below(10) {
            0..=5 => self.below(80) as usize,
            6..=7 => (1usize << self.below(13)).saturating_add(self.below(3) as usize) - 1,
            8 => 512 + self.below(600) as usize,
            _ => 4096 + self.below(4096) as usize,
        }
    }
}

const GUARD: usize = 32;
const GUARD_BYTE: u8 = 0xA5;

/// An output buffer of `len` bytes followed by guard bytes that the module must not touch,
/// 8-byte aligned so that it can also hold structures.
struct Guarded {
    words: Vec<u64>,
    len: usize,
}

impl Guarded {
    fn new(len: usize) -> Guarded {
        let words = vec![u64::from_ne_bytes([GUARD_BYTE; 8]); (len + GUARD).div_ceil(8)];
        Guarded { words, len }
    }
    fn for_struct<T>() -> Guarded {
        Guarded::new(std::mem::size_of::<T>())
    }
    fn ptr<T>(&mut self) -> *mut T {
        self.words.as_mut_ptr() as *mut T
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: a Vec<u64> viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 8)
        }
    }
    fn guard_intact(&self) -> bool {
        self.bytes()[self.len..].iter().all(|&b| b == GUARD_BYTE)
    }
}

/// `--trace`: every call named on stderr before it is made (to find what a crash was doing).
pub static TRACE: AtomicBool = AtomicBool::new(false);

/// Names of the functions, for the report and the watchdog.
const FN_NAMES: &[&str] = &[
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
    "C_CopyObject",
    "C_DestroyObject",
    "C_GetObjectSize",
    "C_GetAttributeValue",
    "C_SetAttributeValue",
    "C_FindObjectsInit",
    "C_FindObjects",
    "C_FindObjectsFinal",
    "C_EncryptInit",
    "C_Encrypt",
    "C_EncryptUpdate",
    "C_EncryptFinal",
    "C_DecryptInit",
    "C_Decrypt",
    "C_DecryptUpdate",
    "C_DecryptFinal",
    "C_DigestInit",
    "C_Digest",
    "C_DigestUpdate",
    "C_DigestKey",
    "C_DigestFinal",
    "C_SignInit",
    "C_Sign",
    "C_SignUpdate",
    "C_SignFinal",
    "C_SignRecoverInit",
    "C_SignRecover",
    "C_VerifyInit",
    "C_Verify",
    "C_VerifyUpdate",
    "C_VerifyFinal",
    "C_VerifyRecoverInit",
    "C_VerifyRecover",
    "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate",
    "C_GenerateKey",
    "C_GenerateKeyPair",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_DeriveKey",
    "C_SeedRandom",
    "C_GenerateRandom",
    "C_GetFunctionStatus",
    "C_CancelFunction",
    "C_WaitForSlotEvent",
    "C_MessageEncryptInit",
    "C_EncryptMessage",
    "C_MessageEncryptFinal",
    "C_MessageDecryptInit",
    "C_DecryptMessage",
    "C_MessageDecryptFinal",
];

fn fn_index(name: &str) -> usize {
    FN_NAMES.iter().position(|n| *n == name).unwrap_or(0)
}

/// What every thread shares: the module, the slot, the keys found at setup, progress for the
/// watchdog, and an epoch that logout / re-initialisation bump (an operation that spans one
/// is not held to the "operation kept" invariant).
struct Shared {
    m: Module,
    label: String,
    pin: Option<Vec<u8>>,
    slot: AtomicU64,
    keys: Mutex<Vec<CK_OBJECT_HANDLE>>,
    mechs: Mutex<Vec<CK_MECHANISM_TYPE>>,
    progress: AtomicU64,
    epoch: AtomicU64,
    last_call: Vec<AtomicUsize>,
    stop: AtomicBool,
}

/// One thread's view: its RNG, its own sessions, its report.
struct Worker<'a> {
    s: &'a Shared,
    id: usize,
    rng: Rng,
    sessions: Vec<CK_SESSION_HANDLE>,
    rep: Report,
}

/// A random handle that no module hands out in practice (outside the small integers and
/// pointer-like values they use), so that a call on it cannot disturb another thread's work.
fn far_handle(rng: &mut Rng) -> CK_ULONG {
    0xDEAD_0000_0000 | (rng.next_u64() & 0xFFFF_FFFF)
}

/// Mechanism parameters: well-formed for the mechanisms that take them, or deliberately bogus.
/// Owns the memory the CK_MECHANISM points into.
struct MechBuf {
    mech: CK_MECHANISM,
    _param: Vec<u64>,
}

fn mechanism(rng: &mut Rng, mechs: &[CK_MECHANISM_TYPE]) -> MechBuf {
    let ty = match rng.below(10) {
        0 => rng.next_u64() & 0xFFFF_FFFF,
        1 => CKM_VENDOR_DEFINED | rng.below(16),
        _ => rng.pick(mechs).unwrap_or(CKM_SHA256),
    };
    let mut param: Vec<u64> = Vec::new();
    let (p, len): (*mut c_void, CK_ULONG) = match rng.below(8) {
        // NULL parameter, possibly with a length.
        0 => (ptr::null_mut(), rng.below(3) * 8),
        // Random bytes of a random length.
        1 => {
            let n = rng.below(64) as usize;
            param = (0..n.div_ceil(8)).map(|_| rng.next_u64()).collect();
            (param.as_mut_ptr() as *mut c_void, n as CK_ULONG)
        }
        _ => {
            let hash = rng
                .pick(&[CKM_SHA_1, CKM_SHA256, CKM_SHA384, CKM_SHA512, 0x4242])
                .unwrap_or(CKM_SHA256);
            let mgf = rng
                .pick(&[
                    CKG_MGF1_SHA1,
                    CKG_MGF1_SHA256,
                    CKG_MGF1_SHA384,
                    CKG_MGF1_SHA512,
                    99,
                ])
                .unwrap_or(CKG_MGF1_SHA256);
            match ty {
                CKM_RSA_PKCS_PSS
                | CKM_SHA256_RSA_PKCS_PSS
                | CKM_SHA384_RSA_PKCS_PSS
                | CKM_SHA512_RSA_PKCS_PSS
                | CKM_SHA1_RSA_PKCS_PSS => {
                    let pp = CK_RSA_PKCS_PSS_PARAMS {
                        hashAlg: hash,
                        mgf,
                        sLen: rng.pick(&[0, 20, 32, 48, 64, 1 << 20]).unwrap_or(32),
                    };
                    param = vec![0; std::mem::size_of_val(&pp).div_ceil(8)];
                    // SAFETY: the Vec is large enough and 8-byte aligned.
                    unsafe { ptr::write(param.as_mut_ptr() as *mut CK_RSA_PKCS_PSS_PARAMS, pp) };
                    (
                        param.as_mut_ptr() as *mut c_void,
                        std::mem::size_of_val(&pp) as CK_ULONG,
                    )
                }
                CKM_RSA_PKCS_OAEP => {
                    let op = CK_RSA_PKCS_OAEP_PARAMS {
                        hashAlg: hash,
                        mgf,
                        source: rng
                            .pick(&[0, CKZ_DATA_SPECIFIED, 7])
                            .unwrap_or(CKZ_DATA_SPECIFIED),
                        // A label pointer that is NULL with a length, or absent.
                        pSourceData: ptr::null_mut(),
                        ulSourceDataLen: rng.below(2) * 16,
                    };
                    param = vec![0; std::mem::size_of_val(&op).div_ceil(8)];
                    // SAFETY: as above.
                    unsafe { ptr::write(param.as_mut_ptr() as *mut CK_RSA_PKCS_OAEP_PARAMS, op) };
                    (
                        param.as_mut_ptr() as *mut c_void,
                        std::mem::size_of_val(&op) as CK_ULONG,
                    )
                }
                CKM_AES_GCM => {
                    // The IV lives after the structure in the same allocation.
                    let iv_len = rng.pick(&[0u64, 1, 12, 16, 300]).unwrap_or(12);
                    let words = std::mem::size_of::<CK_GCM_PARAMS>().div_ceil(8)
                        + (iv_len as usize).div_ceil(8)
                        + 1;
                    param = (0..words).map(|_| rng.next_u64()).collect();
                    let base = param.as_mut_ptr();
                    // SAFETY: the IV pointer points inside the same Vec.
                    let iv = unsafe { base.add(std::mem::size_of::<CK_GCM_PARAMS>().div_ceil(8)) }
                        as *mut u8;
                    let gp = CK_GCM_PARAMS {
                        pIv: if rng.chance(10) { ptr::null_mut() } else { iv },
                        ulIvLen: iv_len,
                        ulIvBits: iv_len * 8,
                        pAAD: ptr::null_mut(),
                        ulAADLen: rng.below(2) * 8,
                        ulTagBits: rng.pick(&[0, 64, 96, 128, 129, 1024]).unwrap_or(128),
                    };
                    // SAFETY: the Vec starts with room for the structure.
                    unsafe { ptr::write(base as *mut CK_GCM_PARAMS, gp) };
                    (
                        base as *mut c_void,
                        std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
                    )
                }
                _ => (ptr::null_mut(), 0),
            }
        }
    };
    MechBuf {
        mech: CK_MECHANISM {
            mechanism: ty,
            pParameter: p,
            ulParameterLen: len,
        },
        _param: param,
    }
}

/// `call!` on a worker's module, naming the function first (for `--trace` and the hang
/// watchdog: a crash or hang inside the call is reported under its own name).
macro_rules! marked {
    ($w:expr, $name:ident $(, $arg:expr)*) => {{
        $w.mark(stringify!($name));
        call!($w.s.m, $name $(, $arg)*)
    }};
}

/// The operation families that share the Init / single / Update / Final shape.
#[derive(Clone, Copy)]
enum Family {
    Sign,
    Verify,
    Encrypt,
    Decrypt,
    Digest,
}

impl<'a> Worker<'a> {
    fn note(&mut self, name: &'static str, rv: CK_RV) -> CK_RV {
        self.rep.calls += 1;
        *self.rep.per_call.entry((name, rv)).or_default() += 1;
        self.s.progress.fetch_add(1, Ordering::Relaxed);
        if !DEFINED_RVS.contains(&rv) {
            self.violation(format!(
                "{name} returned 0x{rv:x}, not a CK_RV the specification defines"
            ));
        }
        rv
    }
    fn violation(&mut self, what: String) {
        if self.rep.violations.len() < 200 {
            self.rep
                .violations
                .push(format!("thread {}: {what}", self.id));
        }
    }
    fn mark(&self, name: &str) {
        if TRACE.load(Ordering::Relaxed) {
            eprintln!("p11-stress: thread {} calls {name}", self.id);
        }
        self.s.last_call[self.id].store(fn_index(name), Ordering::Relaxed);
    }
    fn guard(&mut self, name: &'static str, g: &Guarded) {
        if !g.guard_intact() {
            self.violation(format!(
                "{name} wrote past the {} bytes it was given",
                g.len
            ));
        }
    }

    /// A session handle: one of ours (most often), a far-away one, or NULL / 0.
    fn session(&mut self) -> CK_SESSION_HANDLE {
        match self.rng.below(10) {
            0 => far_handle(&mut self.rng),
            1 => 0,
            _ => self.rng.pick(&self.sessions).unwrap_or(0),
        }
    }
    fn key(&mut self) -> CK_OBJECT_HANDLE {
        match self.rng.below(10) {
            0 => far_handle(&mut self.rng),
            1 => 0,
            _ => {
                let keys = self.s.keys.lock().map(|k| k.clone()).unwrap_or_default();
                self.rng.pick(&keys).unwrap_or(0)
            }
        }
    }
    fn mechs(&self) -> Vec<CK_MECHANISM_TYPE> {
        self.s.mechs.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn open_session(&mut self) {
        let slot = self.slot();
        let mut h: CK_SESSION_HANDLE = 0;
        let flags = match self.rng.below(8) {
            0 => 0, // no CKF_SERIAL_SESSION: CKR_SESSION_PARALLEL_NOT_SUPPORTED
            1 => CKF_SERIAL_SESSION | CKF_RW_SESSION,
            _ => CKF_SERIAL_SESSION,
        };
        self.mark("C_OpenSession");
        let rv = if self.rng.chance(3) {
            call!(
                self.s.m,
                C_OpenSession,
                slot,
                flags,
                ptr::null_mut(),
                None,
                ptr::null_mut()
            )
        } else {
            call!(
                self.s.m,
                C_OpenSession,
                slot,
                flags,
                ptr::null_mut(),
                None,
                &mut h
            )
        };
        if self.note("C_OpenSession", rv) == CKR_OK && h != 0 {
            self.sessions.push(h);
        }
    }
    fn slot(&mut self) -> CK_SLOT_ID {
        if self.rng.chance(5) {
            far_handle(&mut self.rng)
        } else {
            self.s.slot.load(Ordering::Relaxed)
        }
    }

    /// One random step.
    fn step(&mut self) {
        if self.sessions.is_empty() || self.rng.chance(1) {
            self.open_session();
        }
        match self.rng.below(100) {
            0..=3 => self.info_calls(),
            4..=7 => self.slot_list(),
            8..=11 => self.mechanism_list(),
            12..=17 => self.attributes(),
            18..=22 => self.find(),
            23..=24 => self.session_info(),
            25..=26 => self.random(),
            27..=29 => self.unsupported(),
            30..=31 => self.close_own_session(),
            32..=45 => self.flow(Family::Sign),
            46..=53 => self.flow(Family::Verify),
            54..=61 => self.flow(Family::Encrypt),
            62..=71 => self.flow(Family::Decrypt),
            72..=81 => self.flow(Family::Digest),
            82..=86 => self.stray_update_final(),
            87..=88 => self.login_calls(),
            89..=91 => self.message_flow(),
            _ => self.null_pointers(),
        }
    }

    /// PKCS#11 3.0 message-based encryption or decryption on one of our sessions (a module
    /// without the 3.0 interface answers CKR_FUNCTION_NOT_SUPPORTED): an Init (mostly
    /// CKM_AES_GCM), a few messages with well-formed or bogus CK_GCM_MESSAGE_PARAMS, guarded
    /// output, IV and tag buffers, the size-query protocol, and usually a Final.
    fn message_flow(&mut self) {
        let Some(sess) = self.rng.pick(&self.sessions) else {
            return;
        };
        let encrypt = self.rng.chance(50);
        let key = self.key();
        let mechs = self.mechs();
        let mut mb = mechanism(&mut self.rng, &mechs);
        if self.rng.chance(70) {
            mb.mech = CK_MECHANISM {
                mechanism: CKM_AES_GCM,
                pParameter: ptr::null_mut(),
                ulParameterLen: 0,
            };
        }
        let epoch = self.s.epoch.load(Ordering::Acquire);
        let (name, rv) = if encrypt {
            self.mark("C_MessageEncryptInit");
            (
                "C_MessageEncryptInit",
                call3!(self.s.m, C_MessageEncryptInit, sess, &mut mb.mech, key),
            )
        } else {
            self.mark("C_MessageDecryptInit");
            (
                "C_MessageDecryptInit",
                call3!(self.s.m, C_MessageDecryptInit, sess, &mut mb.mech, key),
            )
        };
        let rv = self.note(name, rv);
        if rv != CKR_OK && rv != CKR_OPERATION_ACTIVE {
            return;
        }
        let name = if encrypt {
            "C_EncryptMessage"
        } else {
            "C_DecryptMessage"
        };
        for _ in 0..1 + self.rng.below(4) {
            let iv_len = [12, 12, 12, 16, 1, 0, 300][self.rng.below(7) as usize];
            let tag_bits: CK_ULONG = [128, 128, 96, 120, 64, 136][self.rng.below(6) as usize];
            let mut iv = Guarded::new(iv_len);
            let mut tag = Guarded::new(16);
            let mut p = CK_GCM_MESSAGE_PARAMS {
                pIv: if self.rng.chance(3) {
                    ptr::null_mut()
                } else {
                    iv.ptr()
                },
                ulIvLen: iv_len as CK_ULONG,
                ulIvFixedBits: [0, 0, 32, 33, 96][self.rng.below(5) as usize],
                ivGenerator: self.rng.below(6),
                pTag: if self.rng.chance(3) {
                    ptr::null_mut()
                } else {
                    tag.ptr()
                },
                ulTagBits: tag_bits,
            };
            let p_len = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG
                - CK_ULONG::from(self.rng.chance(3));
            let pp = if self.rng.chance(2) {
                ptr::null_mut()
            } else {
                &mut p as *mut _ as *mut c_void
            };
            let mut aad = self.rng.data(64);
            let mut input = self.rng.data(4096);
            let (ap, al) = (aad.as_mut_ptr(), aad.len() as CK_ULONG);
            let (ip, il) = (input.as_mut_ptr(), input.len() as CK_ULONG);
            let s = self.s;
            let mut one = |o: *mut u8, l: *mut CK_ULONG| {
                if encrypt {
                    call3!(s.m, C_EncryptMessage, sess, pp, p_len, ap, al, ip, il, o, l)
                } else {
                    call3!(s.m, C_DecryptMessage, sess, pp, p_len, ap, al, ip, il, o, l)
                }
            };
            // Every message is an operation of its own for the output protocol; the
            // message-based operation itself outlives it (the next message goes on).
            self.output_protocol(name, epoch, &mut one);
            self.guard(name, &iv);
            // A tag is at most 16 bytes, whatever ulTagBits claims.
            self.guard(name, &tag);
        }
        if self.rng.chance(80) {
            let (fin, rv) = if encrypt {
                self.mark("C_MessageEncryptFinal");
                (
                    "C_MessageEncryptFinal",
                    call3!(self.s.m, C_MessageEncryptFinal, sess),
                )
            } else {
                self.mark("C_MessageDecryptFinal");
                (
                    "C_MessageDecryptFinal",
                    call3!(self.s.m, C_MessageDecryptFinal, sess),
                )
            };
            self.note(fin, rv);
        }
    }

    fn info_calls(&mut self) {
        let slot = self.slot();
        let mut g = Guarded::for_struct::<CK_INFO>();
        self.mark("C_GetInfo");
        let rv = call!(self.s.m, C_GetInfo, g.ptr());
        self.note("C_GetInfo", rv);
        self.guard("C_GetInfo", &g);
        let mut g = Guarded::for_struct::<CK_SLOT_INFO>();
        self.mark("C_GetSlotInfo");
        let rv = call!(self.s.m, C_GetSlotInfo, slot, g.ptr());
        self.note("C_GetSlotInfo", rv);
        self.guard("C_GetSlotInfo", &g);
        let mut g = Guarded::for_struct::<CK_TOKEN_INFO>();
        self.mark("C_GetTokenInfo");
        let rv = call!(self.s.m, C_GetTokenInfo, slot, g.ptr());
        self.note("C_GetTokenInfo", rv);
        self.guard("C_GetTokenInfo", &g);
        let mechs = self.mechs();
        let fallback = self.rng.next_u64();
        let mech = self.rng.pick(&mechs).unwrap_or(fallback);
        let mut g = Guarded::for_struct::<CK_MECHANISM_INFO>();
        self.mark("C_GetMechanismInfo");
        let rv = call!(self.s.m, C_GetMechanismInfo, slot, mech, g.ptr());
        self.note("C_GetMechanismInfo", rv);
        self.guard("C_GetMechanismInfo", &g);
    }

    /// A list call: size query, then a buffer that is short, exact or large, with guards.
    fn list<T>(&mut self, name: &'static str, mut f: impl FnMut(*mut T, *mut CK_ULONG) -> CK_RV) {
        let mut n: CK_ULONG = 0;
        self.mark(name);
        let rv = self.note(name, f(ptr::null_mut(), &mut n));
        if rv != CKR_OK || n > 4096 {
            return;
        }
        let want = n;
        let give = match self.rng.below(3) {
            0 if want > 0 => self.rng.below(want),
            1 => want + self.rng.below(4),
            _ => want,
        };
        let mut g = Guarded::new(give as usize * std::mem::size_of::<T>());
        let mut count = give;
        self.mark(name);
        let rv = self.note(name, f(g.ptr(), &mut count));
        self.guard(name, &g);
        if rv == CKR_OK && count > give {
            self.violation(format!(
                "{name} answered CKR_OK with {count} entries for a {give}-entry buffer"
            ));
        }
        if rv == CKR_BUFFER_TOO_SMALL && give >= want {
            // The list may have grown in between only through another thread's doing, which
            // these calls do not do (slots and mechanisms are fixed).
            self.violation(format!(
                "{name}: size query said {want}, then CKR_BUFFER_TOO_SMALL for {give}"
            ));
        }
    }
    fn slot_list(&mut self) {
        let present = self.rng.below(2) as CK_BBOOL;
        let s = self.s;
        self.list("C_GetSlotList", |p: *mut CK_SLOT_ID, n| {
            call!(s.m, C_GetSlotList, present, p, n)
        });
    }
    fn mechanism_list(&mut self) {
        let slot = self.slot();
        let s = self.s;
        self.list("C_GetMechanismList", |p: *mut CK_MECHANISM_TYPE, n| {
            call!(s.m, C_GetMechanismList, slot, p, n)
        });
    }

    fn attributes(&mut self) {
        let sess = self.session();
        let obj = self.key();
        let types = [
            CKA_CLASS,
            CKA_KEY_TYPE,
            CKA_LABEL,
            CKA_ID,
            CKA_MODULUS,
            CKA_PUBLIC_EXPONENT,
            CKA_PRIVATE_EXPONENT,
            CKA_VALUE,
            CKA_EC_POINT,
            CKA_EC_PARAMS,
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_SIGN,
            CKA_ALLOWED_MECHANISMS,
            CKA_VALUE_LEN,
            CKA_TOKEN,
            CKA_PRIVATE,
            0x4242_4242,
            CKA_VENDOR_DEFINED | 7,
        ];
        let n = 1 + self.rng.below(4) as usize;
        let mut tmpl: Vec<CK_ATTRIBUTE> = (0..n)
            .map(|_| CK_ATTRIBUTE {
                type_: self.rng.pick(&types).unwrap_or(CKA_CLASS),
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            })
            .collect();
        // Size query.
        self.mark("C_GetAttributeValue");
        let rv = call!(
            self.s.m,
            C_GetAttributeValue,
            sess,
            obj,
            tmpl.as_mut_ptr(),
            n as CK_ULONG
        );
        if !matches!(
            self.note("C_GetAttributeValue", rv),
            CKR_OK | CKR_ATTRIBUTE_SENSITIVE | CKR_ATTRIBUTE_TYPE_INVALID
        ) {
            return;
        }
        let sizes: Vec<CK_ULONG> = tmpl.iter().map(|a| a.ulValueLen).collect();
        let mut bufs: Vec<Guarded> = Vec::new();
        for (a, &size) in tmpl.iter_mut().zip(&sizes) {
            let unavailable = size == CK_UNAVAILABLE_INFORMATION;
            let give = if unavailable || size > 1 << 16 {
                self.rng.below(64) as usize
            } else if size > 0 && self.rng.chance(30) {
                self.rng.below(size) as usize
            } else {
                size as usize + self.rng.below(3) as usize
            };
            let mut g = Guarded::new(give);
            a.pValue = g.ptr();
            a.ulValueLen = give as CK_ULONG;
            bufs.push(g);
        }
        self.mark("C_GetAttributeValue");
        let rv = call!(
            self.s.m,
            C_GetAttributeValue,
            sess,
            obj,
            tmpl.as_mut_ptr(),
            n as CK_ULONG
        );
        self.note("C_GetAttributeValue", rv);
        for (i, g) in bufs.iter().enumerate() {
            self.guard("C_GetAttributeValue", g);
            let back = tmpl[i].ulValueLen;
            if back != CK_UNAVAILABLE_INFORMATION && back as usize > g.len {
                self.violation(format!(
                    "C_GetAttributeValue: ulValueLen {back} exceeds the {}-byte buffer",
                    g.len
                ));
            }
            if sizes[i] != CK_UNAVAILABLE_INFORMATION
                && (sizes[i] as usize) <= g.len
                && back == CK_UNAVAILABLE_INFORMATION
                && rv == CKR_BUFFER_TOO_SMALL
            {
                self.violation(format!(
                    "C_GetAttributeValue: size query said {} bytes for 0x{:x}, a {}-byte buffer was too small",
                    sizes[i], tmpl[i].type_, g.len
                ));
            }
        }
        // C_GetObjectSize on the same object.
        let mut size: CK_ULONG = 0;
        self.mark("C_GetObjectSize");
        let rv = call!(self.s.m, C_GetObjectSize, sess, obj, &mut size);
        self.note("C_GetObjectSize", rv);
    }

    fn find(&mut self) {
        let sess = self.session();
        let class: CK_OBJECT_CLASS = self
            .rng
            .pick(&[
                CKO_PRIVATE_KEY,
                CKO_PUBLIC_KEY,
                CKO_CERTIFICATE,
                CKO_SECRET_KEY,
                77,
            ])
            .unwrap_or(CKO_PRIVATE_KEY);
        // The value lives in a 16-byte buffer: a template may lie about the value's type
        // (a length other than 8) but never about the memory behind pValue, which a module
        // cannot check (that would be the caller's bug, not the module's).
        let mut value = [class, 0];
        let mut tmpl = [CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: value.as_mut_ptr() as *mut c_void,
            ulValueLen: 8,
        }];
        let count = self.rng.below(2);
        if self.rng.chance(10) {
            // A length that does not match the value's type.
            tmpl[0].ulValueLen = self.rng.below(16);
        }
        self.mark("C_FindObjectsInit");
        let rv = call!(self.s.m, C_FindObjectsInit, sess, tmpl.as_mut_ptr(), count);
        self.note("C_FindObjectsInit", rv);
        for _ in 0..self.rng.below(3) {
            let max = self.rng.below(5);
            let mut g = Guarded::new(max as usize * 8);
            let mut got: CK_ULONG = 0;
            self.mark("C_FindObjects");
            let rv = call!(self.s.m, C_FindObjects, sess, g.ptr(), max, &mut got);
            self.note("C_FindObjects", rv);
            self.guard("C_FindObjects", &g);
            if rv == CKR_OK && got > max {
                self.violation(format!(
                    "C_FindObjects returned {got} handles for a maximum of {max}"
                ));
            }
        }
        if self.rng.chance(80) {
            self.mark("C_FindObjectsFinal");
            let rv = call!(self.s.m, C_FindObjectsFinal, sess);
            self.note("C_FindObjectsFinal", rv);
        }
    }

    fn session_info(&mut self) {
        let sess = self.session();
        let mut g = Guarded::for_struct::<CK_SESSION_INFO>();
        self.mark("C_GetSessionInfo");
        let rv = call!(self.s.m, C_GetSessionInfo, sess, g.ptr());
        self.note("C_GetSessionInfo", rv);
        self.guard("C_GetSessionInfo", &g);
    }

    fn random(&mut self) {
        let sess = self.session();
        let n = self.rng.len();
        let mut g = Guarded::new(n);
        self.mark("C_GenerateRandom");
        let rv = call!(self.s.m, C_GenerateRandom, sess, g.ptr(), n as CK_ULONG);
        self.note("C_GenerateRandom", rv);
        self.guard("C_GenerateRandom", &g);
        let mut seed = self.rng.bytes_below(40);
        self.mark("C_SeedRandom");
        let rv = call!(
            self.s.m,
            C_SeedRandom,
            sess,
            seed.as_mut_ptr(),
            seed.len() as CK_ULONG
        );
        self.note("C_SeedRandom", rv);
    }

    fn close_own_session(&mut self) {
        if self.sessions.len() < 2 {
            return;
        }
        let i = self.rng.below(self.sessions.len() as u64) as usize;
        let h = self.sessions.swap_remove(i);
        self.mark("C_CloseSession");
        let rv = call!(self.s.m, C_CloseSession, h);
        self.note("C_CloseSession", rv);
        // Closing it again must fail cleanly.
        self.mark("C_CloseSession");
        let rv = call!(self.s.m, C_CloseSession, h);
        if self.note("C_CloseSession", rv) == CKR_OK {
            self.violation("C_CloseSession succeeded twice on one handle".into());
        }
    }

    fn login_calls(&mut self) {
        // Only calls that do not change the login state of the (shared) token: a second login
        // (already logged in / PIN checks), a user type that does not exist.
        let sess = self.session();
        let user = self.rng.pick(&[CKU_USER, CKU_SO, 7]).unwrap_or(CKU_USER);
        let mut bad_pin = self.rng.bytes_below(12);
        self.mark("C_Login");
        let rv = if self.rng.chance(50) {
            call!(self.s.m, C_Login, sess, user, ptr::null_mut(), 0)
        } else {
            call!(
                self.s.m,
                C_Login,
                sess,
                user,
                bad_pin.as_mut_ptr(),
                bad_pin.len() as CK_ULONG
            )
        };
        self.note("C_Login", rv);
    }

    /// Update / Final / single-part calls with no Init, or on random sessions.
    fn stray_update_final(&mut self) {
        let sess = self.session();
        let mut data = self.rng.data(600);
        let mut out = Guarded::new(self.rng.len().min(600));
        let mut out_len = out.len as CK_ULONG;
        let which = self.rng.below(8);
        let (name, rv) = match which {
            0 => (
                "C_SignUpdate",
                marked!(
                    self,
                    C_SignUpdate,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG
                ),
            ),
            1 => (
                "C_SignFinal",
                marked!(self, C_SignFinal, sess, out.ptr(), &mut out_len),
            ),
            2 => (
                "C_VerifyFinal",
                marked!(
                    self,
                    C_VerifyFinal,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG
                ),
            ),
            3 => (
                "C_EncryptUpdate",
                marked!(
                    self,
                    C_EncryptUpdate,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    out.ptr(),
                    &mut out_len
                ),
            ),
            4 => (
                "C_DecryptFinal",
                marked!(self, C_DecryptFinal, sess, out.ptr(), &mut out_len),
            ),
            5 => (
                "C_DigestFinal",
                marked!(self, C_DigestFinal, sess, out.ptr(), &mut out_len),
            ),
            6 => (
                "C_Decrypt",
                marked!(
                    self,
                    C_Decrypt,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    out.ptr(),
                    &mut out_len
                ),
            ),
            _ => (
                "C_Sign",
                marked!(
                    self,
                    C_Sign,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    out.ptr(),
                    &mut out_len
                ),
            ),
        };
        self.note(name, rv);
        self.guard(name, &out);
        if rv == CKR_OK && out_len as usize > out.len {
            self.violation(format!(
                "{name}: CKR_OK with length {out_len} for a {}-byte buffer",
                out.len
            ));
        }
    }

    /// Functions a token may not support, called with random and NULL arguments: they must
    /// answer a defined CK_RV and write nothing out of bounds.
    fn unsupported(&mut self) {
        let sess = self.session();
        let key = self.key();
        let mechs = self.mechs();
        let mut mb = mechanism(&mut self.rng, &mechs);
        let mut data = self.rng.bytes_below(64);
        let mut out = Guarded::new(self.rng.below(64) as usize);
        let mut out_len = out.len as CK_ULONG;
        let mut h: CK_OBJECT_HANDLE = 0;
        let mut h2: CK_OBJECT_HANDLE = 0;
        let mut class: CK_OBJECT_CLASS = CKO_DATA;
        let mut tokv: CK_BBOOL = self.rng.below(2) as CK_BBOOL;
        let mut tmpl = [
            CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: &mut class as *mut _ as *mut c_void,
                ulValueLen: 8,
            },
            CK_ATTRIBUTE {
                type_: CKA_TOKEN,
                pValue: &mut tokv as *mut _ as *mut c_void,
                ulValueLen: 1,
            },
        ];
        let tn = self.rng.below(3);
        let (name, rv): (&'static str, CK_RV) = match self.rng.below(16) {
            0 => ("C_InitToken", {
                let mut label = [b' '; 32];
                marked!(
                    self,
                    C_InitToken,
                    far_handle(&mut self.rng),
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    label.as_mut_ptr()
                )
            }),
            1 => (
                "C_InitPIN",
                marked!(
                    self,
                    C_InitPIN,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG
                ),
            ),
            2 => ("C_SetPIN", {
                // Never the real PIN as the old one: the token must keep its PIN.
                let mut other = self.rng.bytes(9);
                other[0] = 0xFF;
                marked!(
                    self,
                    C_SetPIN,
                    sess,
                    other.as_mut_ptr(),
                    other.len() as CK_ULONG,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG
                )
            }),
            3 => (
                "C_GetOperationState",
                marked!(self, C_GetOperationState, sess, out.ptr(), &mut out_len),
            ),
            4 => (
                "C_SetOperationState",
                marked!(
                    self,
                    C_SetOperationState,
                    sess,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    0,
                    0
                ),
            ),
            5 => (
                "C_CreateObject",
                marked!(self, C_CreateObject, sess, tmpl.as_mut_ptr(), tn, &mut h),
            ),
            6 => (
                "C_CopyObject",
                marked!(self, C_CopyObject, sess, key, tmpl.as_mut_ptr(), tn, &mut h),
            ),
            7 => (
                "C_DestroyObject",
                marked!(self, C_DestroyObject, sess, far_handle(&mut self.rng)),
            ),
            8 => (
                "C_SetAttributeValue",
                marked!(
                    self,
                    C_SetAttributeValue,
                    sess,
                    far_handle(&mut self.rng),
                    tmpl.as_mut_ptr(),
                    tn
                ),
            ),
            9 => (
                "C_GenerateKey",
                marked!(
                    self,
                    C_GenerateKey,
                    sess,
                    &mut mb.mech,
                    tmpl.as_mut_ptr(),
                    tn,
                    &mut h
                ),
            ),
            10 => (
                "C_GenerateKeyPair",
                marked!(
                    self,
                    C_GenerateKeyPair,
                    sess,
                    &mut mb.mech,
                    tmpl.as_mut_ptr(),
                    tn,
                    tmpl.as_mut_ptr(),
                    tn,
                    &mut h,
                    &mut h2
                ),
            ),
            11 => (
                "C_WrapKey",
                marked!(
                    self,
                    C_WrapKey,
                    sess,
                    &mut mb.mech,
                    key,
                    key,
                    out.ptr(),
                    &mut out_len
                ),
            ),
            12 => (
                "C_UnwrapKey",
                marked!(
                    self,
                    C_UnwrapKey,
                    sess,
                    &mut mb.mech,
                    key,
                    data.as_mut_ptr(),
                    data.len() as CK_ULONG,
                    tmpl.as_mut_ptr(),
                    tn,
                    &mut h
                ),
            ),
            13 => (
                "C_DeriveKey",
                marked!(
                    self,
                    C_DeriveKey,
                    sess,
                    &mut mb.mech,
                    key,
                    tmpl.as_mut_ptr(),
                    tn,
                    &mut h
                ),
            ),
            14 => (
                "C_GetFunctionStatus",
                marked!(self, C_GetFunctionStatus, sess),
            ),
            _ => ("C_WaitForSlotEvent", {
                // Never a blocking wait: that would be a hang by design.
                let mut slot: CK_SLOT_ID = 0;
                marked!(
                    self,
                    C_WaitForSlotEvent,
                    CKF_DONT_BLOCK,
                    &mut slot,
                    ptr::null_mut()
                )
            }),
        };
        self.note(name, rv);
        self.guard(name, &out);
        // Session objects this run created are destroyed again (a module that supports them
        // keeps working for the other calls).
        for o in [h, h2] {
            if rv == CKR_OK && o != 0 {
                self.mark("C_DestroyObject");
                let rv = marked!(self, C_DestroyObject, sess, o);
                self.note("C_DestroyObject", rv);
            }
        }
    }

    /// NULL where the specification requires a pointer: must be an error (no crash).
    fn null_pointers(&mut self) {
        let sess = self.session();
        let key = self.key();
        let mechs = self.mechs();
        let mut mb = mechanism(&mut self.rng, &mechs);
        let mut len: CK_ULONG = self.rng.len() as CK_ULONG;
        let (name, rv): (&'static str, CK_RV) = match self.rng.below(12) {
            0 => ("C_GetInfo", marked!(self, C_GetInfo, ptr::null_mut())),
            1 => (
                "C_GetSlotList",
                marked!(self, C_GetSlotList, 0, ptr::null_mut(), ptr::null_mut()),
            ),
            2 => (
                "C_GetTokenInfo",
                marked!(
                    self,
                    C_GetTokenInfo,
                    self.s.slot.load(Ordering::Relaxed),
                    ptr::null_mut()
                ),
            ),
            3 => (
                "C_SignInit",
                marked!(self, C_SignInit, sess, ptr::null_mut(), key),
            ),
            4 => (
                "C_Sign",
                marked!(
                    self,
                    C_Sign,
                    sess,
                    ptr::null_mut(),
                    len,
                    ptr::null_mut(),
                    ptr::null_mut()
                ),
            ),
            5 => (
                "C_Decrypt",
                marked!(
                    self,
                    C_Decrypt,
                    sess,
                    ptr::null_mut(),
                    len,
                    ptr::null_mut(),
                    &mut len
                ),
            ),
            6 => (
                "C_GetAttributeValue",
                marked!(
                    self,
                    C_GetAttributeValue,
                    sess,
                    key,
                    ptr::null_mut(),
                    1 + self.rng.below(3)
                ),
            ),
            7 => (
                "C_FindObjects",
                marked!(
                    self,
                    C_FindObjects,
                    sess,
                    ptr::null_mut(),
                    4,
                    ptr::null_mut()
                ),
            ),
            8 => (
                "C_GenerateRandom",
                marked!(
                    self,
                    C_GenerateRandom,
                    sess,
                    ptr::null_mut(),
                    1 + self.rng.below(64)
                ),
            ),
            9 => (
                "C_EncryptInit",
                marked!(self, C_EncryptInit, sess, &mut mb.mech, key),
            ),
            10 => (
                "C_DigestUpdate",
                marked!(
                    self,
                    C_DigestUpdate,
                    sess,
                    ptr::null_mut(),
                    1 + self.rng.below(64)
                ),
            ),
            _ => (
                "C_GetSessionInfo",
                marked!(self, C_GetSessionInfo, sess, ptr::null_mut()),
            ),
        };
        self.note(name, rv);
    }

    /// Init, then single-part or Update / Final, with size queries, short buffers and
    /// abandonment, holding the size-query and "operation kept" invariants.
    fn flow(&mut self, fam: Family) {
        // Flows run on our own sessions so that the invariants are ours to hold.
        let Some(sess) = self.rng.pick(&self.sessions) else {
            return;
        };
        let key = self.key();
        let mechs = self.mechs();
        let mut mb = mechanism(&mut self.rng, &mechs);
        let epoch = self.s.epoch.load(Ordering::Acquire);
        let (init_name, rv) = match fam {
            Family::Sign => (
                "C_SignInit",
                call!(self.s.m, C_SignInit, sess, &mut mb.mech, key),
            ),
            Family::Verify => (
                "C_VerifyInit",
                call!(self.s.m, C_VerifyInit, sess, &mut mb.mech, key),
            ),
            Family::Encrypt => (
                "C_EncryptInit",
                call!(self.s.m, C_EncryptInit, sess, &mut mb.mech, key),
            ),
            Family::Decrypt => (
                "C_DecryptInit",
                call!(self.s.m, C_DecryptInit, sess, &mut mb.mech, key),
            ),
            Family::Digest => (
                "C_DigestInit",
                call!(self.s.m, C_DigestInit, sess, &mut mb.mech),
            ),
        };
        self.mark(init_name);
        if TRACE.load(Ordering::Relaxed) {
            eprintln!(
                "p11-stress: thread {} {init_name}(session {sess}, mechanism 0x{:x} with {} parameter bytes, key {key}) = {}",
                self.id, mb.mech.mechanism, mb.mech.ulParameterLen, rv_name(rv)
            );
        }
        if self.note(init_name, rv) != CKR_OK {
            return;
        }
        let mut input = self.rng.data(usize::MAX);
        if self.rng.chance(10) {
            return; // abandoned: the next Init on this session meets CKR_OPERATION_ACTIVE
        }
        let multipart = self.rng.chance(40);
        if multipart {
            for _ in 0..self.rng.below(4) {
                let mut chunk = self.rng.data(300);
                let mut out = Guarded::new(chunk.len() + 32);
                let mut out_len = out.len as CK_ULONG;
                let (name, rv) = match fam {
                    Family::Sign => (
                        "C_SignUpdate",
                        call!(
                            self.s.m,
                            C_SignUpdate,
                            sess,
                            chunk.as_mut_ptr(),
                            chunk.len() as CK_ULONG
                        ),
                    ),
                    Family::Verify => (
                        "C_VerifyUpdate",
                        call!(
                            self.s.m,
                            C_VerifyUpdate,
                            sess,
                            chunk.as_mut_ptr(),
                            chunk.len() as CK_ULONG
                        ),
                    ),
                    Family::Digest => (
                        "C_DigestUpdate",
                        call!(
                            self.s.m,
                            C_DigestUpdate,
                            sess,
                            chunk.as_mut_ptr(),
                            chunk.len() as CK_ULONG
                        ),
                    ),
                    Family::Encrypt => (
                        "C_EncryptUpdate",
                        call!(
                            self.s.m,
                            C_EncryptUpdate,
                            sess,
                            chunk.as_mut_ptr(),
                            chunk.len() as CK_ULONG,
                            out.ptr(),
                            &mut out_len
                        ),
                    ),
                    Family::Decrypt => (
                        "C_DecryptUpdate",
                        call!(
                            self.s.m,
                            C_DecryptUpdate,
                            sess,
                            chunk.as_mut_ptr(),
                            chunk.len() as CK_ULONG,
                            out.ptr(),
                            &mut out_len
                        ),
                    ),
                };
                self.mark(name);
                self.note(name, rv);
                self.guard(name, &out);
                if rv != CKR_OK {
                    return;
                }
            }
            if let Family::Verify = fam {
                let mut sig = self.rng.data(600);
                self.mark("C_VerifyFinal");
                let rv = call!(
                    self.s.m,
                    C_VerifyFinal,
                    sess,
                    sig.as_mut_ptr(),
                    sig.len() as CK_ULONG
                );
                self.note("C_VerifyFinal", rv);
                return;
            }
            let name = match fam {
                Family::Sign => "C_SignFinal",
                Family::Encrypt => "C_EncryptFinal",
                Family::Decrypt => "C_DecryptFinal",
                _ => "C_DigestFinal",
            };
            let s = self.s;
            let mut call_final = |p: *mut u8, l: *mut CK_ULONG| match fam {
                Family::Sign => call!(s.m, C_SignFinal, sess, p, l),
                Family::Encrypt => call!(s.m, C_EncryptFinal, sess, p, l),
                Family::Decrypt => call!(s.m, C_DecryptFinal, sess, p, l),
                _ => call!(s.m, C_DigestFinal, sess, p, l),
            };
            self.output_protocol(name, epoch, &mut call_final);
        } else {
            if let Family::Verify = fam {
                let mut sig = self.rng.data(600);
                self.mark("C_Verify");
                let rv = call!(
                    self.s.m,
                    C_Verify,
                    sess,
                    input.as_mut_ptr(),
                    input.len() as CK_ULONG,
                    sig.as_mut_ptr(),
                    sig.len() as CK_ULONG
                );
                self.note("C_Verify", rv);
                return;
            }
            let name = match fam {
                Family::Sign => "C_Sign",
                Family::Encrypt => "C_Encrypt",
                Family::Decrypt => "C_Decrypt",
                _ => "C_Digest",
            };
            let s = self.s;
            let (ip, il) = (input.as_mut_ptr(), input.len() as CK_ULONG);
            let mut call_single = |p: *mut u8, l: *mut CK_ULONG| match fam {
                Family::Sign => call!(s.m, C_Sign, sess, ip, il, p, l),
                Family::Encrypt => call!(s.m, C_Encrypt, sess, ip, il, p, l),
                Family::Decrypt => call!(s.m, C_Decrypt, sess, ip, il, p, l),
                _ => call!(s.m, C_Digest, sess, ip, il, p, l),
            };
            self.output_protocol(name, epoch, &mut call_single);
        }
    }

    /// The output half of a call: a size query (sometimes), a short buffer (sometimes), then
    /// the size asked for; guards and the size / "operation kept" invariants checked.
    fn output_protocol(
        &mut self,
        name: &'static str,
        epoch: u64,
        f: &mut dyn FnMut(*mut u8, *mut CK_ULONG) -> CK_RV,
    ) {
        let mut asked: Option<CK_ULONG> = None;
        if self.rng.chance(70) {
            let mut n: CK_ULONG = 0;
            self.mark(name);
            let rv = self.note(name, f(ptr::null_mut(), &mut n));
            if rv != CKR_OK {
                return; // the operation ended with an error
            }
            asked = Some(n);
        }
        let stale = |s: &Shared| s.epoch.load(Ordering::Acquire) != epoch;
        if let Some(n) = asked {
            if n > 0 && n <= 1 << 20 && self.rng.chance(40) {
                let short = self.rng.below(n) as usize;
                let mut g = Guarded::new(short);
                let mut l = short as CK_ULONG;
                self.mark(name);
                let rv = self.note(name, f(g.ptr(), &mut l));
                self.guard(name, &g);
                if rv != CKR_BUFFER_TOO_SMALL {
                    // A module may produce less than its size query's upper bound (ECDSA,
                    // decryption); then a short buffer can be enough.
                    if rv == CKR_OK && l as usize > short {
                        self.violation(format!(
                            "{name}: CKR_OK with length {l} for a {short}-byte buffer"
                        ));
                    }
                    return;
                }
            }
        }
        let give = match asked {
            Some(n) if n <= 1 << 20 => n as usize,
            _ => self.rng.len(),
        };
        let mut g = Guarded::new(give);
        let mut l = give as CK_ULONG;
        self.mark(name);
        let rv = self.note(name, f(g.ptr(), &mut l));
        self.guard(name, &g);
        if stale(self.s) {
            return;
        }
        if rv == CKR_OK && l as usize > give {
            self.violation(format!(
                "{name}: CKR_OK with length {l} for a {give}-byte buffer"
            ));
        }
        if asked.is_some() && rv == CKR_BUFFER_TOO_SMALL {
            self.violation(format!("{name}: the size query answered {give}, then CKR_BUFFER_TOO_SMALL for {give} bytes"));
        }
        if asked.is_some() && rv == CKR_OPERATION_NOT_INITIALIZED {
            self.violation(format!("{name}: the operation ended after a successful size query (CKR_OPERATION_NOT_INITIALIZED)"));
        }
    }
}

fn initialize(m: &Module, rng: &mut Rng, threads: bool) -> CK_RV {
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: ptr::null_mut(),
    };
    if !threads && rng.chance(30) {
        return m.initialize(None);
    }
    if rng.chance(20) {
        args.flags |= CKF_LIBRARY_CANT_CREATE_OS_THREADS;
    }
    m.initialize(Some(&mut args))
}

/// Finds the slot of the token, its keys and mechanisms, and logs in (on a session that the
/// setup keeps open for the phase).
/// Why a setup failed: a message, and the CK_RV of C_Login when that was the step.
struct SetupError {
    message: String,
    login_rv: Option<CK_RV>,
}

impl From<String> for SetupError {
    fn from(message: String) -> SetupError {
        SetupError {
            message,
            login_rv: None,
        }
    }
}

/// What a login may answer while the services fail on purpose (README's failure table).
const LOGIN_FAULT_RVS: &[CK_RV] = &[
    CKR_FUNCTION_FAILED,
    CKR_GENERAL_ERROR,
    CKR_DEVICE_ERROR,
    CKR_FUNCTION_REJECTED,
];

/// `setup`, retried while a login fails with a documented CK_RV and faults are expected.
fn setup_retrying(s: &Shared, faults: bool, rep: &mut Report) -> Result<(), String> {
    let mut attempts = 0;
    loop {
        match setup(s) {
            Ok(()) => return Ok(()),
            Err(e) => match e.login_rv {
                Some(rv) if faults && LOGIN_FAULT_RVS.contains(&rv) && attempts < 60 => {
                    *rep.failed_logins.entry(rv).or_default() += 1;
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                _ => return Err(e.message),
            },
        }
    }
}

fn setup(s: &Shared) -> Result<(), SetupError> {
    let slots =
        s.m.slots(true)
            .map_err(|rv| format!("C_GetSlotList: {}", rv_name(rv)))?;
    let slot = slots
        .into_iter()
        .find(|&sl| {
            s.m.token_info(sl)
                .map(|t| String::from_utf8_lossy(&t.label).trim_end() == s.label)
                .unwrap_or(false)
        })
        .ok_or_else(|| format!("no token labelled {:?}", s.label))?;
    s.slot.store(slot, Ordering::Relaxed);
    let mechs =
        s.m.mechanisms(slot)
            .map_err(|rv| format!("C_GetMechanismList: {}", rv_name(rv)))?;
    let h =
        s.m.open_session(slot, false)
            .map_err(|rv| format!("C_OpenSession: {}", rv_name(rv)))?;
    let mut pin = s.pin.clone();
    let rv = match pin.as_mut() {
        Some(p) => call!(
            s.m,
            C_Login,
            h,
            CKU_USER,
            p.as_mut_ptr(),
            p.len() as CK_ULONG
        ),
        None => call!(s.m, C_Login, h, CKU_USER, ptr::null_mut(), 0),
    };
    if rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN {
        call!(s.m, C_CloseSession, h);
        return Err(SetupError {
            message: format!("C_Login: {}", rv_name(rv)),
            login_rv: Some(rv),
        });
    }
    // Every object the token shows (private ones need the login above).
    let mut keys = Vec::new();
    if call!(s.m, C_FindObjectsInit, h, ptr::null_mut(), 0) == CKR_OK {
        let mut buf = [0 as CK_OBJECT_HANDLE; 64];
        let mut n: CK_ULONG = 0;
        if call!(s.m, C_FindObjects, h, buf.as_mut_ptr(), 64, &mut n) == CKR_OK {
            keys.extend_from_slice(&buf[..n.min(64) as usize]);
        }
        call!(s.m, C_FindObjectsFinal, h);
    }
    if keys.is_empty() {
        return Err(String::from("the token shows no objects").into());
    }
    *s.keys.lock().map_err(|_| String::from("poisoned"))? = keys;
    *s.mechs.lock().map_err(|_| String::from("poisoned"))? = mechs;
    Ok(())
}

/// A forked child: re-initialises (a PKCS#11 child must), runs a short single-threaded
/// sequence and reports through its exit status; the parent waits with a deadline.
fn fork_child(s: &Shared, faults: bool, seed: u64, steps: u64, hang: Duration, rep: &mut Report) {
    // SAFETY: fork in a process whose other threads wait at a barrier (they hold no lock of
    // ours); the child only calls the module and exits with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        rep.violations.push("fork failed".into());
        return;
    }
    if pid == 0 {
        let mut rng = Rng::new(seed);
        // A module that keeps its state across fork answers CKR_CRYPTOKI_ALREADY_INITIALIZED;
        // the child then goes on with that state.
        let rv = initialize(&s.m, &mut rng, false);
        let code = if rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED {
            eprintln!("p11-stress: child C_Initialize: {}", rv_name(rv));
            2
        } else if let Err(e) = setup_retrying(s, faults, &mut Report::default()) {
            eprintln!("p11-stress: child setup: {e}");
            3
        } else {
            let mut w = Worker {
                s,
                id: 0,
                rng,
                sessions: Vec::new(),
                rep: Report::default(),
            };
            for _ in 0..steps {
                w.step();
            }
            for v in &w.rep.violations {
                eprintln!("p11-stress: child: {v}");
            }
            s.m.finalize();
            if w.rep.violations.is_empty() {
                0
            } else {
                1
            }
        };
        // SAFETY: leave without running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    rep.forks += 1;
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFSIGNALED(status) {
                rep.violations.push(format!(
                    "forked child died of signal {}",
                    libc::WTERMSIG(status)
                ));
            } else if libc::WEXITSTATUS(status) != 0 {
                rep.violations.push(format!(
                    "forked child exited with {} (its stderr says why)",
                    libc::WEXITSTATUS(status)
                ));
            }
            return;
        }
        if start.elapsed() > hang {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reap it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            rep.violations
                .push(format!("forked child hung for {hang:?}"));
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs the stress test; returns the report. Exits the process (status 3) on a hang, printing
/// the last call of every thread.
pub fn run(module: Module, o: &Options) -> Result<Report, String> {
    let threads = o.threads.max(1);
    let s = Arc::new(Shared {
        m: module,
        label: o.token_label.clone(),
        pin: o.pin.clone(),
        slot: AtomicU64::new(0),
        keys: Mutex::new(Vec::new()),
        mechs: Mutex::new(Vec::new()),
        progress: AtomicU64::new(0),
        epoch: AtomicU64::new(0),
        last_call: (0..threads).map(|_| AtomicUsize::new(0)).collect(),
        stop: AtomicBool::new(false),
    });
    let mut main_rng = Rng::new(o.seed);
    let rv = initialize(&s.m, &mut main_rng, true);
    if rv != CKR_OK {
        return Err(format!("C_Initialize: {}", rv_name(rv)));
    }
    let mut report = Report::default();
    setup_retrying(&s, o.login_faults, &mut report)?;
    let mut memory = Memory {
        rss_start: proc_status_kb("VmRSS:"),
        lck_start: proc_status_kb("VmLck:"),
        ..Memory::default()
    };
    memory.rss_max = memory.rss_start;

    // The watchdog: no progress for `hang` is a hang.
    let wd = {
        let s = Arc::clone(&s);
        let hang = o.hang;
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            let mut since = Instant::now();
            while !s.stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let p = s.progress.load(Ordering::Relaxed);
                if p != last {
                    last = p;
                    since = Instant::now();
                } else if since.elapsed() > hang {
                    let calls: Vec<&str> = s
                        .last_call
                        .iter()
                        .map(|c| FN_NAMES[c.load(Ordering::Relaxed)])
                        .collect();
                    eprintln!("p11-stress: HANG: no call returned for {hang:?}; last call per thread: {calls:?}");
                    std::process::exit(3);
                }
            }
        })
    };

    let phases = o.steps.div_ceil(o.phase_steps.max(1)).max(1);
    let per_thread = (o.phase_steps.max(1) / threads as u64).max(1);
    let started = Instant::now();
    // With a duration: phases until it has passed; else `phases` of them.
    let last_phase = |phase: u64| match o.duration {
        Some(d) => started.elapsed() >= d,
        None => phase + 1 >= phases,
    };
    let mut phase: u64 = 0;
    loop {
        let barrier = Arc::new(Barrier::new(threads));
        let results: Vec<Report> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let s = &*s;
                    let barrier = Arc::clone(&barrier);
                    let seed = o.seed ^ (phase << 32) ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9);
                    scope.spawn(move || {
                        let mut w = Worker {
                            s,
                            id: t,
                            rng: Rng::new(seed),
                            sessions: Vec::new(),
                            rep: Report::default(),
                        };
                        barrier.wait();
                        for _ in 0..per_thread {
                            w.step();
                        }
                        for h in w.sessions.drain(..) {
                            call!(s.m, C_CloseSession, h);
                        }
                        w.rep
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| Report {
                        violations: vec!["a worker thread panicked".into()],
                        ..Default::default()
                    })
                })
                .collect()
        });
        for r in results {
            report.merge(r);
        }
        // Between phases, single-threaded: a fork, then logout / close-all / re-initialise.
        if o.fork && phase.is_multiple_of(2) {
            fork_child(
                &s,
                o.login_faults,
                o.seed ^ phase ^ 0xF0F0,
                o.fork_steps,
                o.hang,
                &mut report,
            );
        }
        memory.rss_max = memory.rss_max.max(proc_status_kb("VmRSS:"));
        if last_phase(phase) {
            break;
        }
        phase += 1;
        {
            s.epoch.fetch_add(1, Ordering::AcqRel);
            match main_rng.below(3) {
                0 => {
                    let rv = call!(s.m, C_CloseAllSessions, s.slot.load(Ordering::Relaxed));
                    *report
                        .per_call
                        .entry(("C_CloseAllSessions", rv))
                        .or_default() += 1;
                }
                1 => {
                    let rv = s.m.finalize();
                    *report.per_call.entry(("C_Finalize", rv)).or_default() += 1;
                    let again = s.m.finalize();
                    if again != CKR_CRYPTOKI_NOT_INITIALIZED {
                        report
                            .violations
                            .push(format!("C_Finalize twice: {}", rv_name(again)));
                    }
                    let rv = initialize(&s.m, &mut main_rng, true);
                    if rv != CKR_OK {
                        return Err(format!("re-initialisation: C_Initialize: {}", rv_name(rv)));
                    }
                    let twice = initialize(&s.m, &mut main_rng, true);
                    if twice != CKR_CRYPTOKI_ALREADY_INITIALIZED {
                        report
                            .violations
                            .push(format!("C_Initialize twice: {}", rv_name(twice)));
                    }
                    report.reinitialisations += 1;
                }
                _ => {}
            }
            setup_retrying(&s, o.login_faults, &mut report)?;
        }
    }
    memory.rss_end = proc_status_kb("VmRSS:");
    memory.lck_end = proc_status_kb("VmLck:");
    report.memory = Some(memory);
    s.stop.store(true, Ordering::Relaxed);
    let _ = wd.join();
    let rv = s.m.finalize();
    if rv != CKR_OK {
        report
            .violations
            .push(format!("final C_Finalize: {}", rv_name(rv)));
    }
    Ok(report)
}

/// The report as text: totals, then per function the CK_RVs seen.
pub fn print(r: &Report) {
    println!(
        "calls: {}, forks: {}, re-initialisations: {}",
        r.calls, r.forks, r.reinitialisations
    );
    let mut by_fn: BTreeMap<&str, Vec<(CK_RV, u64)>> = BTreeMap::new();
    for ((f, rv), n) in &r.per_call {
        by_fn.entry(f).or_default().push((*rv, *n));
    }
    for (f, rvs) in by_fn {
        let list: Vec<String> = rvs
            .iter()
            .map(|(rv, n)| format!("{}={n}", rv_name(*rv)))
            .collect();
        println!("  {f}: {}", list.join(" "));
    }
    if let Some(m) = r.memory {
        println!(
            "memory: VmRSS {} kB at the start, {} kB at the end, {} kB at most; VmLck {} kB at the start, {} kB at the end",
            m.rss_start, m.rss_end, m.rss_max, m.lck_start, m.lck_end
        );
    }
    if !r.failed_logins.is_empty() {
        let list: Vec<String> = r
            .failed_logins
            .iter()
            .map(|(rv, n)| format!("{}={n}", rv_name(*rv)))
            .collect();
        println!(
            "logins failed under injected faults (retried): {}",
            list.join(" ")
        );
    }
    for v in &r.violations {
        println!("VIOLATION {v}");
    }
    println!(
        "stress: {} calls, {} violations",
        r.calls,
        r.violations.len()
    );
}
