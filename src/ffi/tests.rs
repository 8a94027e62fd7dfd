//! The C boundary through the function tables, in process: the C_Initialize matrix, interface
//! discovery, the size-query protocol, attribute templates, NULL pointers, operations and
//! login state. Keys are installed as C_Login installs them after a release; results are
//! checked with RustCrypto. The module state is process-wide, so these tests run one at a time.

use super::*;
use crate::token::tests::{login_with, Fixture};
use std::ptr::{null, null_mut};
use std::sync::Mutex;

pub(super) static SERIAL: Mutex<()> = Mutex::new(());

pub(super) fn fl() -> &'static CK_FUNCTION_LIST {
    let mut p: *mut CK_FUNCTION_LIST = null_mut();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { C_GetFunctionList(&mut p) }, CKR_OK);
    // SAFETY: points at the static table.
    unsafe { &*p }
}

macro_rules! call {
    ($f:ident($($a:expr),*)) => {
        // SAFETY: test calls with valid or deliberately NULL/bogus arguments the function
        // must reject without dereferencing.
        unsafe { (fl().$f.unwrap())($($a),*) }
    };
}

/// A test holding the module: serialised, initialised from a fixture config, finalised at
/// the end whatever happens.
pub(super) struct Live {
    pub(super) f: Fixture,
    _g: std::sync::MutexGuard<'static, ()>,
}

impl Live {
    pub(super) fn new(extra: &str) -> Live {
        let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let _ = call!(C_Finalize(null_mut()));
        let f = Fixture::new(extra);
        crate::config::use_config_on_this_thread(f.config_path().as_ref());
        assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
        Live { f, _g: g }
    }
    pub(super) fn login(&self) {
        let inst = instance().unwrap();
        login_with(&inst.module.tokens[0], self.f.released()).unwrap();
    }
    pub(super) fn session(&self, rw: bool) -> CK_SESSION_HANDLE {
        let mut h = 0;
        let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
        assert_eq!(
            call!(C_OpenSession(1, flags, null_mut(), None, &mut h)),
            CKR_OK
        );
        h
    }
    pub(super) fn find(
        &self,
        s: CK_SESSION_HANDLE,
        class: CK_OBJECT_CLASS,
        id: u8,
    ) -> CK_OBJECT_HANDLE {
        let mut class = class;
        let mut id = id;
        let mut tpl = [
            CK_ATTRIBUTE {
                type_: CKA_CLASS,
                pValue: &mut class as *mut _ as *mut std::ffi::c_void,
                ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
            },
            CK_ATTRIBUTE {
                type_: CKA_ID,
                pValue: &mut id as *mut u8 as *mut std::ffi::c_void,
                ulValueLen: 1,
            },
        ];
        assert_eq!(call!(C_FindObjectsInit(s, tpl.as_mut_ptr(), 2)), CKR_OK);
        let mut out = [0; 4];
        let mut n = 0;
        assert_eq!(call!(C_FindObjects(s, out.as_mut_ptr(), 4, &mut n)), CKR_OK);
        assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
        assert_eq!(n, 1, "exactly one object of class {class:#x} id {id}");
        out[0]
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = call!(C_Finalize(null_mut()));
    }
}

pub(super) fn mech(m: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: null_mut(),
        ulParameterLen: 0,
    }
}

pub(super) fn mech_with<T>(m: CK_MECHANISM_TYPE, p: &mut T) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: m,
        pParameter: p as *mut T as *mut std::ffi::c_void,
        ulParameterLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

fn sign(s: CK_SESSION_HANDLE, m: &mut CK_MECHANISM, key: CK_OBJECT_HANDLE, data: &[u8]) -> Vec<u8> {
    assert_eq!(call!(C_SignInit(s, m, key)), CKR_OK);
    let mut len = 0;
    let mut d = data.to_vec();
    assert_eq!(
        call!(C_Sign(
            s,
            d.as_mut_ptr(),
            d.len() as CK_ULONG,
            null_mut(),
            &mut len
        )),
        CKR_OK
    );
    let mut out = vec![0u8; len as usize];
    assert_eq!(
        call!(C_Sign(
            s,
            d.as_mut_ptr(),
            d.len() as CK_ULONG,
            out.as_mut_ptr(),
            &mut len
        )),
        CKR_OK
    );
    out.truncate(len as usize);
    out
}

#[test]
fn the_cdylib_exports_exactly_the_three_discovery_symbols() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let so = dir.join("debug").join("libskr_pkcs11.so");
    let bytes = std::fs::read(&so).unwrap_or_else(|e| {
        panic!(
            "{} not readable ({e}): build the cdylib first (cargo build -p skr-pkcs11)",
            so.display()
        )
    });
    let mut names = elf_defined_dynamic_symbols(&bytes);
    names.sort();
    assert_eq!(
        names,
        vec!["C_GetFunctionList", "C_GetInterface", "C_GetInterfaceList"]
    );
}

/// Defined global symbols of an ELF64 little-endian shared object's .dynsym.
fn elf_defined_dynamic_symbols(b: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&b[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(b[4], 2, "not ELF64");
    let shoff = u64_at(0x28);
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    let section = |i: usize| shoff + i * shentsize;
    let dynsym = (0..shnum)
        .find(|&i| u32_at(section(i) + 4) == 11) // SHT_DYNSYM
        .expect("no .dynsym");
    let sh = section(dynsym);
    let (off, size, link, entsize) = (
        u64_at(sh + 0x18),
        u64_at(sh + 0x20),
        u32_at(sh + 0x28),
        u64_at(sh + 0x38),
    );
    let stroff = u64_at(section(link) + 0x18);
    let mut out = vec![];
    for i in 1..size / entsize {
        let e = off + i * entsize;
        let name = u32_at(e);
        let info = b[e + 4];
        let shndx = u16_at(e + 6);
        let bind = info >> 4;
        if shndx != 0 && (bind == 1 || bind == 2) {
            let s = &b[stroff + name..];
            let end = s.iter().position(|&c| c == 0).unwrap();
            out.push(String::from_utf8_lossy(&s[..end]).into_owned());
        }
    }
    out
}

#[test]
fn discovery_functions() {
    // SAFETY (all calls below): valid or deliberately NULL pointers.
    assert_eq!(unsafe { C_GetFunctionList(null_mut()) }, CKR_ARGUMENTS_BAD);
    assert_eq!(fl().version.major, 2);
    assert_eq!(fl().version.minor, 40);
    let mut count: CK_ULONG = 0;
    assert_eq!(
        unsafe { C_GetInterfaceList(null_mut(), &mut count) },
        CKR_OK
    );
    assert_eq!(count, 2);
    let mut one = [CK_INTERFACE {
        pInterfaceName: null_mut(),
        pFunctionList: null_mut(),
        flags: 0,
    }; 2];
    let mut short: CK_ULONG = 1;
    assert_eq!(
        unsafe { C_GetInterfaceList(one.as_mut_ptr(), &mut short) },
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 2);
    assert_eq!(
        unsafe { C_GetInterfaceList(one.as_mut_ptr(), &mut count) },
        CKR_OK
    );
    assert_eq!(
        unsafe { C_GetInterfaceList(null_mut(), null_mut()) },
        CKR_ARGUMENTS_BAD
    );
    let version_of = |i: *mut CK_INTERFACE| unsafe {
        let v = &*((*i).pFunctionList as *const CK_VERSION);
        (v.major, v.minor)
    };
    let mut i: *mut CK_INTERFACE = null_mut();
    assert_eq!(
        unsafe { C_GetInterface(null_mut(), null_mut(), &mut i, 0) },
        CKR_OK
    );
    assert_eq!(version_of(i), (3, 0));
    let name = unsafe { std::ffi::CStr::from_ptr((*i).pInterfaceName as *const _) };
    assert_eq!(name.to_bytes(), b"PKCS 11");
    let mut v = CK_VERSION {
        major: 2,
        minor: 40,
    };
    let mut n = *b"PKCS 11\0";
    assert_eq!(
        unsafe { C_GetInterface(n.as_mut_ptr(), &mut v, &mut i, 0) },
        CKR_OK
    );
    assert_eq!(version_of(i), (2, 40));
    let mut v32 = CK_VERSION { major: 3, minor: 2 };
    assert_eq!(
        unsafe { C_GetInterface(n.as_mut_ptr(), &mut v32, &mut i, 0) },
        CKR_ARGUMENTS_BAD
    );
    let mut other = *b"Vendor\0";
    assert_eq!(
        unsafe { C_GetInterface(other.as_mut_ptr(), null_mut(), &mut i, 0) },
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        unsafe { C_GetInterface(null_mut(), null_mut(), &mut i, CKF_INTERFACE_FORK_SAFE) },
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        unsafe { C_GetInterface(null_mut(), null_mut(), null_mut(), 0) },
        CKR_ARGUMENTS_BAD
    );
    // Every entry of the 3.0 table is filled (rust-cryptoki rejects NULL entries).
    let t30 = unsafe { &*((*one.as_ptr()).pFunctionList as *const CK_FUNCTION_LIST_3_0) };
    assert!(t30.C_SessionCancel.is_some() && t30.C_MessageVerifyFinal.is_some());
}

#[test]
fn initialize_argument_matrix_and_not_initialized() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = call!(C_Finalize(null_mut()));
    let mut info = std::mem::MaybeUninit::<CK_INFO>::zeroed();
    assert_eq!(
        call!(C_GetInfo(info.as_mut_ptr())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut n = 0;
    assert_eq!(
        call!(C_GetSlotList(CK_FALSE, null_mut(), &mut n)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    assert_eq!(call!(C_Finalize(null_mut())), CKR_CRYPTOKI_NOT_INITIALIZED);
    let f = Fixture::new("");
    crate::config::use_config_on_this_thread(f.config_path().as_ref());

    unsafe extern "C" fn create(_m: *mut *mut std::ffi::c_void) -> CK_RV {
        panic!("the module must never call the application's mutex callbacks")
    }
    unsafe extern "C" fn other(_m: *mut std::ffi::c_void) -> CK_RV {
        panic!("the module must never call the application's mutex callbacks")
    }
    let args = |flags, cbs: bool, partial: bool, reserved: usize| CK_C_INITIALIZE_ARGS {
        CreateMutex: (cbs || partial).then_some(create as unsafe extern "C" fn(_) -> _),
        DestroyMutex: cbs.then_some(other as unsafe extern "C" fn(_) -> _),
        LockMutex: cbs.then_some(other as unsafe extern "C" fn(_) -> _),
        UnlockMutex: cbs.then_some(other as unsafe extern "C" fn(_) -> _),
        flags,
        pReserved: reserved as *mut std::ffi::c_void,
    };
    let init = |mut a: CK_C_INITIALIZE_ARGS| {
        call!(C_Initialize(&mut a as *mut _ as *mut std::ffi::c_void))
    };
    // pReserved = (void*)1 is refused and never dereferenced (that would crash here).
    assert_eq!(init(args(0, false, false, 1)), CKR_ARGUMENTS_BAD);
    assert_eq!(
        init(args(CKF_OS_LOCKING_OK, false, true, 0)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetInfo(info.as_mut_ptr())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    // Accepted forms.
    // Callbacks are accepted with or without CKF_OS_LOCKING_OK and never called (they
    // panic if called); the module locks with OS primitives.
    for a in [
        args(0, false, false, 0),
        args(CKF_OS_LOCKING_OK, false, false, 0),
        args(CKF_OS_LOCKING_OK, true, false, 0),
        args(0, true, false, 0),
        args(
            CKF_LIBRARY_CANT_CREATE_OS_THREADS | CKF_OS_LOCKING_OK,
            false,
            false,
            0,
        ),
    ] {
        assert_eq!(init(a), CKR_OK);
        assert_eq!(
            init(args(0, false, false, 0)),
            CKR_CRYPTOKI_ALREADY_INITIALIZED
        );
        assert_eq!(
            call!(C_Finalize(std::ptr::dangling_mut::<std::ffi::c_void>())),
            CKR_ARGUMENTS_BAD
        );
        assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    }
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
    assert_eq!(call!(C_GetInfo(null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(C_GetInfo(info.as_mut_ptr())), CKR_OK);
    let first = unsafe { info.assume_init() };
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(C_Finalize(null_mut())), CKR_CRYPTOKI_NOT_INITIALIZED);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
    let mut again = std::mem::MaybeUninit::<CK_INFO>::zeroed();
    assert_eq!(call!(C_GetInfo(again.as_mut_ptr())), CKR_OK);
    let again = unsafe { again.assume_init() };
    // Byte-identical across re-initialisation.
    let bytes = |i: &CK_INFO| unsafe {
        std::slice::from_raw_parts(
            i as *const CK_INFO as *const u8,
            std::mem::size_of::<CK_INFO>(),
        )
        .to_vec()
    };
    assert_eq!(bytes(&first), bytes(&again));
    assert_eq!(&first.manufacturerID[..10], b"skr-pkcs11");
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
}

#[test]
fn bad_config_fails_initialize_with_its_line() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = call!(C_Finalize(null_mut()));
    let f = Fixture::new("");
    let bad = std::fs::read_to_string(f.config_path())
        .unwrap()
        .replace("[identity]", "[identity]\nsourse = 1");
    let path = f.dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    crate::config::use_config_on_this_thread(&path);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_GENERAL_ERROR);
    let mut info = std::mem::MaybeUninit::<CK_INFO>::zeroed();
    assert_eq!(
        call!(C_GetInfo(info.as_mut_ptr())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    // A missing certificate file is refused too, naming the file.
    let missing = std::fs::read_to_string(f.config_path())
        .unwrap()
        .replace("rsa.pem", "nope.pem");
    std::fs::write(&path, missing).unwrap();
    assert_eq!(call!(C_Initialize(null_mut())), CKR_GENERAL_ERROR);
    assert_eq!(
        call!(C_GetInfo(info.as_mut_ptr())),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
}

#[test]
fn slots_tokens_and_mechanisms() {
    let live = Live::new("");
    let mut n: CK_ULONG = 0;
    assert_eq!(call!(C_GetSlotList(CK_TRUE, null_mut(), &mut n)), CKR_OK);
    assert_eq!(n, 2);
    let mut slots = [0; 2];
    let mut short = 1;
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut short)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 2);
    assert_eq!(
        call!(C_GetSlotList(CK_TRUE, slots.as_mut_ptr(), &mut n)),
        CKR_OK
    );
    assert_eq!(slots, [1, 2]);
    let mut ti = std::mem::MaybeUninit::<CK_TOKEN_INFO>::zeroed();
    assert_eq!(call!(C_GetTokenInfo(1, ti.as_mut_ptr())), CKR_OK);
    let ti = unsafe { ti.assume_init() };
    let want = CKF_LOGIN_REQUIRED
        | CKF_PROTECTED_AUTHENTICATION_PATH
        | CKF_TOKEN_INITIALIZED
        | CKF_USER_PIN_INITIALIZED
        | CKF_WRITE_PROTECTED
        | CKF_RNG;
    assert_eq!(ti.flags, want);
    assert_eq!(&ti.label[..live.f.label.len()], live.f.label.as_bytes());
    assert!(ti.label[live.f.label.len()..].iter().all(|&b| b == b' '));
    assert_eq!(ti.ulMaxSessionCount, CK_EFFECTIVELY_INFINITE);
    let mut ti2 = std::mem::MaybeUninit::<CK_TOKEN_INFO>::zeroed();
    assert_eq!(
        call!(C_GetTokenInfo(3, ti2.as_mut_ptr())),
        CKR_SLOT_ID_INVALID
    );
    let mut si = std::mem::MaybeUninit::<CK_SLOT_INFO>::zeroed();
    assert_eq!(call!(C_GetSlotInfo(2, si.as_mut_ptr())), CKR_OK);
    assert_ne!(unsafe { si.assume_init() }.flags & CKF_TOKEN_PRESENT, 0);

    let mut count = 0;
    assert_eq!(call!(C_GetMechanismList(1, null_mut(), &mut count)), CKR_OK);
    let mut list = vec![0; count as usize];
    assert_eq!(
        call!(C_GetMechanismList(1, list.as_mut_ptr(), &mut count)),
        CKR_OK
    );
    assert!(list.contains(&CKM_RSA_PKCS_PSS) && list.contains(&CKM_ECDSA_SHA384));
    let mut mi = CK_MECHANISM_INFO {
        ulMinKeySize: 0,
        ulMaxKeySize: 0,
        flags: 0,
    };
    assert_eq!(call!(C_GetMechanismInfo(1, CKM_RSA_PKCS, &mut mi)), CKR_OK);
    // Unwrap needs the key's allow_rsa_pkcs_decrypt, as decrypt does (ffi::keys).
    assert_eq!(
        mi.flags,
        CKF_HW | CKF_SIGN | CKF_VERIFY | CKF_ENCRYPT | CKF_DECRYPT | CKF_WRAP | CKF_UNWRAP
    );
    assert_eq!((mi.ulMinKeySize, mi.ulMaxKeySize), (2048, 4096));
    assert_eq!(call!(C_GetMechanismInfo(1, CKM_ECDSA, &mut mi)), CKR_OK);
    assert_ne!(mi.flags & CKF_EC_NAMEDCURVE, 0);
    assert_eq!(
        call!(C_GetMechanismInfo(1, CKM_DES3_CBC, &mut mi)),
        CKR_MECHANISM_INVALID
    );
    // A configured PIN drops the protected authentication path.
    drop(live);
    let live = Live::new("pin = \"1234\"");
    let mut ti = std::mem::MaybeUninit::<CK_TOKEN_INFO>::zeroed();
    assert_eq!(call!(C_GetTokenInfo(1, ti.as_mut_ptr())), CKR_OK);
    assert_eq!(
        unsafe { ti.assume_init() }.flags & CKF_PROTECTED_AUTHENTICATION_PATH,
        0
    );
    drop(live);
}

#[test]
fn sessions_login_states_and_refusals() {
    let live = Live::new("pin = \"1234\"");
    let ro = live.session(false);
    let rw = live.session(true);
    let state = |s| {
        let mut i = std::mem::MaybeUninit::<CK_SESSION_INFO>::zeroed();
        assert_eq!(call!(C_GetSessionInfo(s, i.as_mut_ptr())), CKR_OK);
        unsafe { i.assume_init() }.state
    };
    assert_eq!(state(ro), CKS_RO_PUBLIC_SESSION);
    assert_eq!(state(rw), CKS_RW_PUBLIC_SESSION);
    assert_eq!(call!(C_GetSessionInfo(ro, null_mut())), CKR_ARGUMENTS_BAD);
    // CKU_SO is a valid user type; the token has no security officer.
    assert_eq!(
        call!(C_Login(ro, CKU_SO, null_mut(), 0)),
        CKR_SESSION_READ_ONLY_EXISTS
    );
    assert_eq!(
        call!(C_Login(ro, CKU_CONTEXT_SPECIFIC, null_mut(), 0)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    let mut wrong = *b"9999";
    assert_eq!(
        call!(C_Login(ro, CKU_USER, wrong.as_mut_ptr(), 4)),
        CKR_PIN_INCORRECT
    );
    assert_eq!(call!(C_Logout(ro)), CKR_USER_NOT_LOGGED_IN);
    live.login();
    assert_eq!(state(ro), CKS_RO_USER_FUNCTIONS);
    assert_eq!(state(rw), CKS_RW_USER_FUNCTIONS);
    let mut right = *b"1234";
    assert_eq!(
        call!(C_Login(rw, CKU_USER, right.as_mut_ptr(), 4)),
        CKR_USER_ALREADY_LOGGED_IN
    );
    // Token objects are read-only; an empty template is incomplete (no CKA_CLASS).
    let mut h = 0;
    assert_eq!(
        call!(C_CreateObject(rw, null_mut(), 0, &mut h)),
        CKR_TEMPLATE_INCOMPLETE
    );
    let key = live.find(rw, CKO_PRIVATE_KEY, 1);
    assert_eq!(call!(C_DestroyObject(rw, key)), CKR_TOKEN_WRITE_PROTECTED);
    assert_eq!(
        call!(C_SetAttributeValue(rw, key, null_mut(), 0)),
        CKR_TOKEN_WRITE_PROTECTED
    );
    assert_eq!(
        call!(C_CopyObject(rw, key, null_mut(), 0, &mut h)),
        CKR_ACTION_PROHIBITED
    );
    assert_eq!(
        call!(C_GenerateKeyPair(
            rw,
            null_mut(),
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_InitToken(1, null_mut(), 0, null_mut())),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_InitPIN(rw, null_mut(), 0)),
        CKR_FUNCTION_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_WrapKey(rw, null_mut(), key, key, null_mut(), &mut h)),
        CKR_ARGUMENTS_BAD
    );
    let mut rnd = [0u8; 48];
    assert_eq!(call!(C_GenerateRandom(rw, rnd.as_mut_ptr(), 48)), CKR_OK);
    assert_ne!(rnd, [0u8; 48]);
    assert_eq!(
        call!(C_GenerateRandom(rw, null_mut(), 4)),
        CKR_ARGUMENTS_BAD
    );
    // Logout wipes: the private key handle is gone, the session is public again.
    assert_eq!(call!(C_Logout(rw)), CKR_OK);
    assert_eq!(state(ro), CKS_RO_PUBLIC_SESSION);
    let mut class: CK_ULONG = 0;
    let mut tpl = [CK_ATTRIBUTE {
        type_: CKA_CLASS,
        pValue: &mut class as *mut _ as *mut std::ffi::c_void,
        ulValueLen: 8,
    }];
    assert_eq!(
        call!(C_GetAttributeValue(rw, key, tpl.as_mut_ptr(), 1)),
        CKR_OBJECT_HANDLE_INVALID
    );
    assert_eq!(call!(C_CloseAllSessions(1)), CKR_OK);
    assert_eq!(call!(C_CloseSession(ro)), CKR_SESSION_HANDLE_INVALID);
    assert_eq!(
        call!(C_OpenSession(1, 0, null_mut(), None, &mut h)),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(
        call!(C_OpenSession(
            1,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            null_mut()
        )),
        CKR_ARGUMENTS_BAD
    );
}

#[test]
fn a_failing_release_leaves_the_token_logged_out_with_one_log_line() {
    let live = Live::new("");
    let s = live.session(false);
    // The config points every service at 127.0.0.1:1 (refused), with no retries.
    let rv = call!(C_Login(s, CKU_USER, null_mut(), 0));
    assert_ne!(rv, CKR_OK);
    let inst = instance().unwrap();
    assert!(!inst.module.tokens[0].is_logged_in());
    log::logger().flush();
    let log = std::fs::read_to_string(live.f.dir.path().join("module.log")).unwrap_or_default();
    let lines: Vec<_> = log
        .lines()
        .filter(|l| l.contains("C_Login") && l.contains("failed"))
        .collect();
    // Exactly one line, in the documented shape (no secret, the cause, the step).
    assert_eq!(lines.len(), 1, "{log}");
    let l = lines[0];
    assert!(l.contains(&format!("token=\"{}\"", live.f.label)), "{l}");
    assert!(l.contains(&format!("rv={}", rv_name(rv))), "{l}");
    assert!(l.contains("step=") && l.contains("cause:"), "{l}");
    let mut i = std::mem::MaybeUninit::<CK_SESSION_INFO>::zeroed();
    assert_eq!(call!(C_GetSessionInfo(s, i.as_mut_ptr())), CKR_OK);
    assert_eq!(unsafe { i.assume_init() }.state, CKS_RO_PUBLIC_SESSION);
}

#[test]
fn get_attribute_value_template_rules() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let key = live.find(s, CKO_PRIVATE_KEY, 1);
    let mut modulus = [0u8; 512];
    let mut small = [0u8; 4];
    let mut sensitive = [0u8; 512];
    let mut tpl = [
        // Case 3: NULL buffer → length.
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        // Case 4: fits.
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: modulus.as_mut_ptr() as *mut _,
            ulValueLen: 512,
        },
        // Case 1: sensitive.
        CK_ATTRIBUTE {
            type_: CKA_PRIVATE_EXPONENT,
            pValue: sensitive.as_mut_ptr() as *mut _,
            ulValueLen: 512,
        },
        // Case 2: no such attribute.
        CK_ATTRIBUTE {
            type_: CKA_EC_POINT,
            pValue: null_mut(),
            ulValueLen: 0,
        },
        // Case 5: too small.
        CK_ATTRIBUTE {
            type_: CKA_PUBLIC_KEY_INFO,
            pValue: small.as_mut_ptr() as *mut _,
            ulValueLen: 4,
        },
    ];
    let rv = call!(C_GetAttributeValue(s, key, tpl.as_mut_ptr(), 5));
    assert!(
        [
            CKR_ATTRIBUTE_SENSITIVE,
            CKR_ATTRIBUTE_TYPE_INVALID,
            CKR_BUFFER_TOO_SMALL
        ]
        .contains(&rv),
        "{}",
        rv_name(rv)
    );
    assert_eq!(tpl[0].ulValueLen, 256);
    assert_eq!(tpl[1].ulValueLen, 256);
    assert_eq!(tpl[2].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(tpl[3].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert_eq!(tpl[4].ulValueLen, CK_UNAVAILABLE_INFORMATION);
    assert!(sensitive.iter().all(|&b| b == 0), "nothing secret written");
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let other = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa).unwrap();
    assert_eq!(&modulus[..256], &other.n().to_bytes_be()[..]);
    // Only available entries: CKR_OK.
    let mut tpl = [
        CK_ATTRIBUTE {
            type_: CKA_SIGN,
            pValue: small.as_mut_ptr() as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
    ];
    assert_eq!(
        call!(C_GetAttributeValue(s, key, tpl.as_mut_ptr(), 2)),
        CKR_OK
    );
    assert_eq!(small[0], CK_TRUE);
    assert_eq!(
        call!(C_GetAttributeValue(s, key, null_mut(), 2)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(C_GetAttributeValue(s, 999_999, tpl.as_mut_ptr(), 2)),
        CKR_OBJECT_HANDLE_INVALID
    );
    // Empty find template lists every visible object; CKO_PROFILE finds nothing.
    assert_eq!(call!(C_FindObjectsInit(s, null_mut(), 0)), CKR_OK);
    assert_eq!(
        call!(C_FindObjectsInit(s, null_mut(), 0)),
        CKR_OPERATION_ACTIVE
    );
    let mut out = [0; 32];
    let mut n = 0;
    assert_eq!(
        call!(C_FindObjects(s, out.as_mut_ptr(), 32, &mut n)),
        CKR_OK
    );
    assert_eq!(n, 8);
    assert_eq!(
        call!(C_FindObjects(s, out.as_mut_ptr(), 32, null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OPERATION_NOT_INITIALIZED);
    let mut profile = CKO_PROFILE;
    let mut tpl = [CK_ATTRIBUTE {
        type_: CKA_CLASS,
        pValue: &mut profile as *mut _ as *mut _,
        ulValueLen: 8,
    }];
    assert_eq!(call!(C_FindObjectsInit(s, tpl.as_mut_ptr(), 1)), CKR_OK);
    assert_eq!(
        call!(C_FindObjects(s, out.as_mut_ptr(), 32, &mut n)),
        CKR_OK
    );
    assert_eq!(n, 0);
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OK);
}

#[test]
fn sign_size_query_buffer_too_small_and_cancel() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let key = live.find(s, CKO_PRIVATE_KEY, 1);
    let mut m = mech(CKM_SHA256_RSA_PKCS);
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OK);
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OPERATION_ACTIVE);
    let mut data = *b"message";
    let mut len = 0;
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 7, null_mut(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 256);
    let mut sig = vec![0u8; 256];
    let mut short = 10;
    assert_eq!(
        call!(C_Sign(
            s,
            data.as_mut_ptr(),
            7,
            sig.as_mut_ptr(),
            &mut short
        )),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(short, 256, "required length reported, operation alive");
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)),
        CKR_OK
    );
    use rsa::pkcs8::DecodePrivateKey;
    use sha2::Digest;
    let other = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
        .unwrap()
        .to_public_key();
    other
        .verify(
            rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
            &sha2::Sha256::digest(b"message"),
            &sig,
        )
        .unwrap();
    // The operation ended with the delivered signature.
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    // NULL mechanism cancels.
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OK);
    assert_eq!(call!(C_SignInit(s, null_mut(), key)), CKR_OK);
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    // Multipart with the verify direction on the public key.
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OK);
    let (mut a, mut b) = (*b"mess", *b"age");
    assert_eq!(call!(C_SignUpdate(s, a.as_mut_ptr(), 4)), CKR_OK);
    assert_eq!(call!(C_SignUpdate(s, b.as_mut_ptr(), 3)), CKR_OK);
    let mut sig2 = vec![0u8; 256];
    let mut len2 = 256;
    assert_eq!(call!(C_SignFinal(s, sig2.as_mut_ptr(), &mut len2)), CKR_OK);
    assert_eq!(
        sig2, sig,
        "PKCS#1 v1.5 is deterministic: multipart equals single-part"
    );
    let pubkey = live.find(s, CKO_PUBLIC_KEY, 1);
    assert_eq!(call!(C_VerifyInit(s, &mut m, pubkey)), CKR_OK);
    assert_eq!(
        call!(C_Verify(s, data.as_mut_ptr(), 7, sig.as_mut_ptr(), 256)),
        CKR_OK
    );
    sig[0] ^= 1;
    assert_eq!(call!(C_VerifyInit(s, &mut m, pubkey)), CKR_OK);
    assert_eq!(
        call!(C_Verify(s, data.as_mut_ptr(), 7, sig.as_mut_ptr(), 256)),
        CKR_SIGNATURE_INVALID
    );
    // A signing key cannot verify, a public key cannot sign.
    assert_eq!(
        call!(C_SignInit(s, &mut m, pubkey)),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    assert_eq!(
        call!(C_SignInit(s, &mut m, 424_242)),
        CKR_KEY_HANDLE_INVALID
    );
    // Logout ends the operation: the key is wiped.
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OK);
    assert_eq!(call!(C_Logout(s)), CKR_OK);
    assert_eq!(
        call!(C_Sign(s, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_KEY_HANDLE_INVALID);
}

#[test]
fn pss_and_ecdsa_through_the_table() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let rsa_key = live.find(s, CKO_PRIVATE_KEY, 1);
    let hash = crate::crypto::HashAlg::Sha256.digest(b"transcript");
    let mut params = CK_RSA_PKCS_PSS_PARAMS {
        hashAlg: CKM_SHA256,
        mgf: CKG_MGF1_SHA256,
        sLen: 32,
    };
    let mut m = mech_with(CKM_RSA_PKCS_PSS, &mut params);
    let sig = sign(s, &mut m, rsa_key, &hash);
    use rsa::pkcs8::DecodePrivateKey;
    let other = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
        .unwrap()
        .to_public_key();
    other
        .verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &hash, &sig)
        .unwrap();
    // A short parameter structure is refused at init.
    m.ulParameterLen -= 1;
    assert_eq!(
        call!(C_SignInit(s, &mut m, rsa_key)),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut bad_mgf = CK_RSA_PKCS_PSS_PARAMS {
        hashAlg: CKM_SHA256,
        mgf: CKG_MGF1_SHA384,
        sLen: 32,
    };
    let mut m = mech_with(CKM_RSA_PKCS_PSS, &mut bad_mgf);
    assert_eq!(
        call!(C_SignInit(s, &mut m, rsa_key)),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut no_param = mech(CKM_RSA_PKCS_PSS);
    assert_eq!(
        call!(C_SignInit(s, &mut no_param, rsa_key)),
        CKR_MECHANISM_PARAM_INVALID
    );

    let ec_key = live.find(s, CKO_PRIVATE_KEY, 2);
    let mut m = mech(CKM_ECDSA);
    let sig = sign(s, &mut m, ec_key, &hash);
    assert_eq!(sig.len(), 64);
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    let sk = p256::ecdsa::SigningKey::from_pkcs8_der(&live.f.ec).unwrap();
    sk.verifying_key()
        .verify_prehash(&hash, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
        .unwrap();
    // Mechanism / key type mismatch.
    assert_eq!(
        call!(C_SignInit(s, &mut m, rsa_key)),
        CKR_KEY_TYPE_INCONSISTENT
    );
}

/// Single-part AES-GCM encryption with room writes ciphertext ‖ tag straight into the
/// caller's buffer (no intermediate): the bytes match RustCrypto for 128- and 96-bit tags,
/// nothing is written past the announced length, and encrypting in place (input and output
/// the same buffer) still gives the same ciphertext.
#[test]
fn single_part_gcm_encryption_seals_into_the_callers_buffer() {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    let msg: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let iv = [5u8; 12];
    let expected = aes_gcm::Aes256Gcm::new_from_slice(&live.f.aes)
        .unwrap()
        .encrypt(
            &aes_gcm::Nonce::from(iv),
            Payload {
                msg: &msg,
                aad: b"aad",
            },
        )
        .unwrap();
    for tag_bits in [128usize, 96] {
        // GCM's shorter tags are the leading bytes of the full tag (SP 800-38D).
        let want = &expected[..msg.len() + tag_bits / 8];
        let mut iv = iv;
        let mut aad = *b"aad";
        let mut gcm = CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: aad.as_mut_ptr(),
            ulAADLen: 3,
            ulTagBits: tag_bits as CK_ULONG,
        };
        let mut m = mech_with(CKM_AES_GCM, &mut gcm);

        // Into a separate buffer, with guard bytes after the announced room.
        assert_eq!(call!(C_EncryptInit(s, &mut m, aes)), CKR_OK);
        let mut input = msg.clone();
        let mut out = vec![0xA5u8; want.len() + 32];
        let mut n = want.len() as CK_ULONG;
        assert_eq!(
            call!(C_Encrypt(
                s,
                input.as_mut_ptr(),
                input.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut n
            )),
            CKR_OK
        );
        assert_eq!(n as usize, want.len());
        assert_eq!(&out[..want.len()], want, "tag of {tag_bits} bits");
        assert!(out[want.len()..].iter().all(|&b| b == 0xA5), "guard bytes");
        assert_eq!(input, msg, "the input is left as it was");

        // In place: the plaintext at the start of the output buffer.
        assert_eq!(call!(C_EncryptInit(s, &mut m, aes)), CKR_OK);
        let mut buf = msg.clone();
        buf.resize(want.len(), 0);
        let mut n = buf.len() as CK_ULONG;
        let p = buf.as_mut_ptr();
        assert_eq!(
            call!(C_Encrypt(s, p, msg.len() as CK_ULONG, p, &mut n)),
            CKR_OK
        );
        assert_eq!(&buf[..n as usize], want, "in place, tag of {tag_bits} bits");
    }
}

#[test]
fn encrypt_decrypt_and_digest_through_the_table() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let aes = live.find(s, CKO_SECRET_KEY, 3);
    let mut iv = [7u8; 12];
    let mut aad = *b"hdr";
    let mut gcm = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: aad.as_mut_ptr(),
        ulAADLen: 3,
        ulTagBits: 128,
    };
    let mut m = mech_with(CKM_AES_GCM, &mut gcm);
    assert_eq!(call!(C_EncryptInit(s, &mut m, aes)), CKR_OK);
    let mut part1 = *b"hello ";
    let mut part2 = *b"world";
    let mut out = vec![0u8; 64];
    let mut n = 64;
    assert_eq!(
        call!(C_EncryptUpdate(
            s,
            part1.as_mut_ptr(),
            6,
            out.as_mut_ptr(),
            &mut n
        )),
        CKR_OK
    );
    assert_eq!(n, 0, "GCM output comes at the end");
    n = 64;
    assert_eq!(
        call!(C_EncryptUpdate(
            s,
            part2.as_mut_ptr(),
            5,
            out.as_mut_ptr(),
            &mut n
        )),
        CKR_OK
    );
    let mut fin = 0;
    assert_eq!(call!(C_EncryptFinal(s, null_mut(), &mut fin)), CKR_OK);
    assert_eq!(fin, 11 + 16);
    let mut ct = vec![0u8; fin as usize];
    assert_eq!(call!(C_EncryptFinal(s, ct.as_mut_ptr(), &mut fin)), CKR_OK);
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let other = aes_gcm::Aes256Gcm::new_from_slice(&live.f.aes).unwrap();
    let pt = other
        .decrypt(
            &aes_gcm::Nonce::from(iv),
            Payload {
                msg: &ct,
                aad: b"hdr",
            },
        )
        .unwrap();
    assert_eq!(pt, b"hello world");
    assert_eq!(call!(C_DecryptInit(s, &mut m, aes)), CKR_OK);
    let mut plen = 64;
    let mut pbuf = vec![0u8; 64];
    assert_eq!(
        call!(C_Decrypt(
            s,
            ct.as_mut_ptr(),
            ct.len() as CK_ULONG,
            pbuf.as_mut_ptr(),
            &mut plen
        )),
        CKR_OK
    );
    assert_eq!(&pbuf[..plen as usize], b"hello world");

    // AES-CBC-PAD multipart; check against RustCrypto AES block by block.
    let mut cbc_iv = [9u8; 16];
    let mut m = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: cbc_iv.as_mut_ptr() as *mut _,
        ulParameterLen: 16,
    };
    let msg: Vec<u8> = (0..40u8).collect();
    assert_eq!(call!(C_EncryptInit(s, &mut m, aes)), CKR_OK);
    let mut ct = vec![];
    for chunk in msg.chunks(13) {
        let mut c = chunk.to_vec();
        let mut o = vec![0u8; 64];
        let mut on = 64;
        assert_eq!(
            call!(C_EncryptUpdate(
                s,
                c.as_mut_ptr(),
                c.len() as CK_ULONG,
                o.as_mut_ptr(),
                &mut on
            )),
            CKR_OK
        );
        ct.extend_from_slice(&o[..on as usize]);
    }
    let mut o = vec![0u8; 16];
    let mut on = 16;
    assert_eq!(call!(C_EncryptFinal(s, o.as_mut_ptr(), &mut on)), CKR_OK);
    ct.extend_from_slice(&o[..on as usize]);
    assert_eq!(ct.len(), 48);
    let plain = crate::crypto::aes::tests::cbc_decrypt_by_hand(&live.f.aes, cbc_iv, &ct);
    assert_eq!(&plain[..40], &msg[..]);
    assert_eq!(&plain[40..], &[8u8; 8], "PKCS#7 padding");

    // RSA-OAEP with a label, encrypted by RustCrypto.
    let rsa_key = live.find(s, CKO_PRIVATE_KEY, 1);
    use rsa::pkcs8::DecodePrivateKey;
    let public = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
        .unwrap()
        .to_public_key();
    let mut ct = public
        .encrypt(
            &mut rand::thread_rng(),
            rsa::Oaep::new_with_label::<sha2::Sha256, _>("lbl"),
            b"oaep secret",
        )
        .unwrap();
    let mut label = *b"lbl";
    let mut oaep = CK_RSA_PKCS_OAEP_PARAMS {
        hashAlg: CKM_SHA256,
        mgf: CKG_MGF1_SHA256,
        source: CKZ_DATA_SPECIFIED,
        pSourceData: label.as_mut_ptr() as *mut _,
        ulSourceDataLen: 3,
    };
    let mut m = mech_with(CKM_RSA_PKCS_OAEP, &mut oaep);
    assert_eq!(call!(C_DecryptInit(s, &mut m, rsa_key)), CKR_OK);
    let mut plen = 0;
    assert_eq!(
        call!(C_Decrypt(s, ct.as_mut_ptr(), 256, null_mut(), &mut plen)),
        CKR_OK
    );
    assert_eq!(plen, 11);
    let mut pt = vec![0u8; 11];
    assert_eq!(
        call!(C_Decrypt(
            s,
            ct.as_mut_ptr(),
            256,
            pt.as_mut_ptr(),
            &mut plen
        )),
        CKR_OK
    );
    assert_eq!(pt, b"oaep secret");

    // Digest, single and multipart.
    let mut m = mech(CKM_SHA384);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OK);
    let mut d = *b"abc";
    let mut dl = 48;
    let mut dg = [0u8; 48];
    assert_eq!(
        call!(C_Digest(s, d.as_mut_ptr(), 3, dg.as_mut_ptr(), &mut dl)),
        CKR_OK
    );
    use sha2::Digest;
    assert_eq!(&dg[..], &sha2::Sha384::digest(b"abc")[..]);
    assert_eq!(call!(C_DigestInit(s, &mut m)), CKR_OK);
    assert_eq!(call!(C_DigestUpdate(s, d.as_mut_ptr(), 3)), CKR_OK);
    assert_eq!(call!(C_DigestUpdate(s, d.as_mut_ptr(), 3)), CKR_OK);
    assert_eq!(call!(C_DigestFinal(s, dg.as_mut_ptr(), &mut dl)), CKR_OK);
    assert_eq!(&dg[..], &sha2::Sha384::digest(b"abcabc")[..]);
    let mut bad = mech(CKM_RSA_PKCS);
    assert_eq!(call!(C_DigestInit(s, &mut bad)), CKR_MECHANISM_INVALID);
    // No digest active (the refused init left none); released keys are never digested.
    assert_eq!(call!(C_DigestKey(s, aes)), CKR_OPERATION_NOT_INITIALIZED);
    let mut sha = mech(CKM_SHA256);
    assert_eq!(call!(C_DigestInit(s, &mut sha)), CKR_OK);
    assert_eq!(call!(C_DigestKey(s, aes)), CKR_KEY_INDIGESTIBLE);
    let _ = null::<u8>();
}

#[test]
fn rsa_pkcs_decrypt_needs_the_config_switch() {
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    // Key 1 allows it (fixture config); build a token without the switch.
    let inst = instance().unwrap();
    let rsa_obj = inst.module.tokens[0]
        .object(live.find(s, CKO_PRIVATE_KEY, 1))
        .unwrap();
    assert!(matches!(
        rsa_obj.body,
        crate::token::object::Body::PrivateKey {
            allow_rsa_pkcs_decrypt: true,
            ..
        }
    ));
    let mut m = mech(CKM_RSA_PKCS);
    assert_eq!(call!(C_DecryptInit(s, &mut m, rsa_obj.handle)), CKR_OK);
    use rsa::pkcs8::DecodePrivateKey;
    let public = rsa::RsaPrivateKey::from_pkcs8_der(&live.f.rsa)
        .unwrap()
        .to_public_key();
    let mut ct = public
        .encrypt(&mut rand::thread_rng(), rsa::Pkcs1v15Encrypt, b"premaster")
        .unwrap();
    let mut out = vec![0u8; 256];
    let mut n = 256;
    assert_eq!(
        call!(C_Decrypt(s, ct.as_mut_ptr(), 256, out.as_mut_ptr(), &mut n)),
        CKR_OK
    );
    assert_eq!(&out[..n as usize], b"premaster");
    drop(live);
    let live = Live::new("");
    let text = std::fs::read_to_string(live.f.config_path())
        .unwrap()
        .replace("allow_rsa_pkcs_decrypt = true\n", "");
    std::fs::write(live.f.config_path(), text).unwrap();
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
    live.login();
    let s = live.session(false);
    let key = live.find(s, CKO_PRIVATE_KEY, 1);
    assert_eq!(call!(C_DecryptInit(s, &mut m, key)), CKR_MECHANISM_INVALID);
}

#[test]
fn panics_become_general_error() {
    let rv = run("C_Test", || panic!("boom"));
    assert_eq!(rv, CKR_GENERAL_ERROR);
    assert_eq!(run("C_Test", || Ok(())), CKR_OK);
    assert_eq!(
        run("C_Test", || Err(Error::new(CKR_PIN_INCORRECT, "x"))),
        CKR_PIN_INCORRECT
    );
    assert_eq!(rv_name(CKR_BUFFER_TOO_SMALL), "CKR_BUFFER_TOO_SMALL");
}

/// Run one `#[ignore]`d scenario test in a fresh single-threaded copy of this test binary,
/// so that fork() happens with no other test thread holding a lock.
fn run_scenario(name: &str, env: &[(&str, &str)]) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed:\n{text}");
    assert!(text.contains("1 passed"), "{name} did not run:\n{text}");
}

#[test]
fn fork_keep_and_re_release() {
    run_scenario(
        "ffi::tests::fork_scenario",
        &[("SKR_TEST_FORK_POLICY", "keep")],
    );
    run_scenario(
        "ffi::tests::fork_scenario",
        &[("SKR_TEST_FORK_POLICY", "re-release")],
    );
}

/// In the parent: log in and keep a session. In the child: the parent's session is invalid,
/// C_Initialize succeeds (after C_Finalize, or without; also when a parent thread held the
/// state lock at fork time), and C_Login either works
/// from the inherited keys with no release ("keep": the config's services are unreachable,
/// so a release would fail) or releases again and fails ("re-release").
#[test]
#[ignore = "run by fork_keep_and_re_release in a single-threaded process"]
fn fork_scenario() {
    let policy = std::env::var("SKR_TEST_FORK_POLICY").unwrap();
    let live = Live::new("");
    // Top-level key: it must come before the first table.
    let text =
        format!("fork = \"{policy}\"\n") + &std::fs::read_to_string(live.f.config_path()).unwrap();
    std::fs::write(live.f.config_path(), text).unwrap();
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
    assert_eq!(call!(C_Initialize(null_mut())), CKR_OK);
    live.login();
    let parent_session = live.session(false);
    let key = live.find(parent_session, CKO_PRIVATE_KEY, 2);
    // The third child is forked while another parent thread sits inside the module's state
    // lock: the child must not hang on it (that thread does not exist in the child).
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let _g = crate::sync::read(super::process::state());
        held_tx.send(()).unwrap();
        hold_rx.recv().unwrap();
    });
    for (n, finalize_first) in [(0, true), (1, false), (2, false)] {
        if n == 2 {
            held_rx.recv().unwrap();
        }
        // SAFETY: the child only calls the module and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // A hang (a lock held forever) kills the child instead of the test run.
            // SAFETY: alarm has no preconditions.
            unsafe { libc::alarm(20) };
            let code = std::panic::catch_unwind(|| child(&policy, parent_session, finalize_first))
                .unwrap_or(99);
            // SAFETY: leave the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child crashed: {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "child scenario {n} failed");
    }
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    // The parent is untouched: still logged in, still signing.
    let hash = crate::crypto::HashAlg::Sha256.digest(b"parent");
    let sig = sign(parent_session, &mut mech(CKM_ECDSA), key, &hash);
    assert_eq!(sig.len(), 64);
}

fn child(policy: &str, parent_session: CK_SESSION_HANDLE, finalize_first: bool) -> i32 {
    let mut info = std::mem::MaybeUninit::<CK_SESSION_INFO>::zeroed();
    if call!(C_GetSessionInfo(parent_session, info.as_mut_ptr())) != CKR_CRYPTOKI_NOT_INITIALIZED {
        return 1;
    }
    // pkcs11-provider finalises the parent's state first; libp11 and p11-kit do not.
    if finalize_first && call!(C_Finalize(null_mut())) != CKR_OK {
        return 2;
    }
    if call!(C_Initialize(null_mut())) != CKR_OK {
        return 3;
    }
    let mut s = 0;
    if call!(C_OpenSession(
        1,
        CKF_SERIAL_SESSION,
        null_mut(),
        None,
        &mut s
    )) != CKR_OK
    {
        return 4;
    }
    let rv = call!(C_Login(s, CKU_USER, null_mut(), 0));
    match policy {
        "keep" => {
            if rv != CKR_OK {
                return 5;
            }
            // Sign with the inherited EC key and check it with RustCrypto.
            let mut class = CKO_PRIVATE_KEY;
            let mut id = 2u8;
            let mut tpl = [
                CK_ATTRIBUTE {
                    type_: CKA_CLASS,
                    pValue: &mut class as *mut _ as *mut _,
                    ulValueLen: 8,
                },
                CK_ATTRIBUTE {
                    type_: CKA_ID,
                    pValue: &mut id as *mut u8 as *mut _,
                    ulValueLen: 1,
                },
            ];
            let mut found = [0; 2];
            let mut n = 0;
            if call!(C_FindObjectsInit(s, tpl.as_mut_ptr(), 2)) != CKR_OK
                || call!(C_FindObjects(s, found.as_mut_ptr(), 2, &mut n)) != CKR_OK
                || n != 1
            {
                return 6;
            }
            let hash = crate::crypto::HashAlg::Sha256.digest(b"child");
            let sig = sign(s, &mut mech(CKM_ECDSA), found[0], &hash);
            let inst = instance().unwrap();
            let o = inst.module.tokens[0].object(found[0]).unwrap();
            let crate::token::object::Body::PrivateKey { key, .. } = &o.body else {
                return 7;
            };
            let crate::crypto::pkey::PublicParts::Ec { point, .. } = &key.info.parts else {
                return 7;
            };
            use p256::ecdsa::signature::hazmat::PrehashVerifier;
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(point).unwrap();
            if vk
                .verify_prehash(&hash, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
                .is_err()
            {
                return 8;
            }
            0
        }
        _ => {
            // The inherited keys were wiped: the login had to release, and the services are
            // unreachable.
            if rv == CKR_OK
                || crate::token::retained(&instance().unwrap().module.tokens[0].config.label)
                    .is_some()
            {
                return 9;
            }
            0
        }
    }
}

#[test]
fn the_c_header_matches_the_code() {
    let h = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("include/skr_pkcs11.h"),
    )
    .unwrap();
    let define = |name: &str| -> String {
        let line = h
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} missing"));
        line.split_whitespace().nth(2).unwrap().to_string()
    };
    assert_eq!(
        define("SKR_PKCS11_CONFIG_ENV"),
        format!("\"{}\"", crate::config::CONFIG_ENV)
    );
    assert_eq!(
        define("SKR_PKCS11_DEFAULT_CONFIG_PATH"),
        format!("\"{}\"", crate::config::DEFAULT_CONFIG_PATH)
    );
    assert_eq!(
        define("SKR_PKCS11_LOG_ENV"),
        format!("\"{}\"", crate::logging::LOG_ENV)
    );
    let rv = |name: &str| {
        CK_RV::from_str_radix(
            define(name).trim_start_matches("0x").trim_end_matches("UL"),
            16,
        )
        .unwrap()
    };
    use crate::error::Step;
    assert_eq!(
        rv("SKR_PKCS11_RV_ATTESTATION_FAILED"),
        Error::evidence(Step::Attestation, "").rv()
    );
    assert_eq!(
        rv("SKR_PKCS11_RV_SERVICE_FAILED"),
        Error::service(Step::Release, "").rv()
    );
    assert_eq!(
        rv("SKR_PKCS11_RV_RELEASE_DENIED"),
        Error::denied(Step::Release, "").rv()
    );
    assert_eq!(
        rv("SKR_PKCS11_RV_INTEGRITY_OR_CONFIG"),
        Error::integrity(Step::Unwrap, "").rv()
    );
    assert_eq!(
        rv("SKR_PKCS11_RV_INTEGRITY_OR_CONFIG"),
        Error::config("").rv()
    );
    assert_eq!(rv("SKR_PKCS11_RV_PIN_INCORRECT"), CKR_PIN_INCORRECT);
    assert_eq!(define("SKR_PKCS11_FIRST_SLOT_ID"), "1UL");
}

#[test]
fn info_structs_have_zeroed_padding() {
    let _live = Live::new("");
    // Whatever the caller's buffer held, every byte of the answer is the module's.
    let get = |fill: u8| {
        let mut raw = [fill; std::mem::size_of::<CK_INFO>()];
        assert_eq!(call!(C_GetInfo(raw.as_mut_ptr() as *mut CK_INFO)), CKR_OK);
        raw
    };
    assert_eq!(get(0xAA), get(0x55));
    let token = |fill: u8| {
        let mut raw = [fill; std::mem::size_of::<CK_TOKEN_INFO>()];
        assert_eq!(
            call!(C_GetTokenInfo(1, raw.as_mut_ptr() as *mut CK_TOKEN_INFO)),
            CKR_OK
        );
        raw
    };
    assert_eq!(token(0xAA), token(0x55));
}

#[test]
fn threads_sign_concurrently_on_their_own_sessions() {
    let live = Live::new("");
    live.login();
    let s0 = live.session(false);
    let key = live.find(s0, CKO_PRIVATE_KEY, 2);
    let point = {
        let inst = instance().unwrap();
        let o = inst.module.tokens[0].object(key).unwrap();
        let crate::token::object::Body::PrivateKey { key, .. } = &o.body else {
            panic!("not a private key")
        };
        let crate::crypto::pkey::PublicParts::Ec { point, .. } = &key.info.parts else {
            panic!("not EC")
        };
        point.clone()
    };
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let point = point.clone();
            std::thread::spawn(move || {
                let mut s = 0;
                assert_eq!(
                    call!(C_OpenSession(
                        1,
                        CKF_SERIAL_SESSION,
                        null_mut(),
                        None,
                        &mut s
                    )),
                    CKR_OK
                );
                use p256::ecdsa::signature::hazmat::PrehashVerifier;
                let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
                for i in 0..25 {
                    let hash = crate::crypto::HashAlg::Sha256.digest(format!("{t}/{i}").as_bytes());
                    let sig = sign(s, &mut mech(CKM_ECDSA), key, &hash);
                    vk.verify_prehash(&hash, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
                        .unwrap();
                }
                assert_eq!(call!(C_CloseSession(s)), CKR_OK);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let inst = instance().unwrap();
    assert!(inst.module.tokens[0].is_logged_in(), "s0 is still open");
}

#[test]
fn without_own_threads_the_release_runs_on_the_callers_thread() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _ = call!(C_Finalize(null_mut()));
    let f = Fixture::new("");
    crate::config::use_config_on_this_thread(f.config_path().as_ref());
    let mut a = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_LIBRARY_CANT_CREATE_OS_THREADS,
        pReserved: null_mut(),
    };
    assert_eq!(
        call!(C_Initialize(&mut a as *mut _ as *mut std::ffi::c_void)),
        CKR_OK
    );
    assert!(instance().unwrap().no_threads);
    let mut s = 0;
    assert_eq!(
        call!(C_OpenSession(
            1,
            CKF_SERIAL_SESSION,
            null_mut(),
            None,
            &mut s
        )),
        CKR_OK
    );
    // The services are unreachable: the inline release fails cleanly, the token stays out.
    assert_ne!(call!(C_Login(s, CKU_USER, null_mut(), 0)), CKR_OK);
    assert!(!instance().unwrap().module.tokens[0].is_logged_in());
    assert_eq!(call!(C_Finalize(null_mut())), CKR_OK);
}

#[test]
fn session_cancel_ends_the_chosen_operations() {
    // Through the 3.0 table, where C_SessionCancel lives.
    let cancel = |s, f| {
        let mut i: *mut CK_INTERFACE = null_mut();
        // SAFETY: valid out-pointer; the table is a static.
        unsafe {
            assert_eq!(C_GetInterface(null_mut(), null_mut(), &mut i, 0), CKR_OK);
            let t = &*((*i).pFunctionList as *const CK_FUNCTION_LIST_3_0);
            (t.C_SessionCancel.unwrap())(s, f)
        }
    };
    let live = Live::new("");
    live.login();
    let s = live.session(false);
    let key = live.find(s, CKO_PRIVATE_KEY, 2);
    let mut m = mech(CKM_ECDSA_SHA256);
    let mut d = mech(CKM_SHA256);
    assert_eq!(call!(C_SignInit(s, &mut m, key)), CKR_OK);
    assert_eq!(call!(C_DigestInit(s, &mut d)), CKR_OK);
    assert_eq!(call!(C_FindObjectsInit(s, null_mut(), 0)), CKR_OK);
    assert_eq!(cancel(s, CKF_SIGN | CKF_FIND_OBJECTS), CKR_OK);
    let mut len = 0;
    assert_eq!(
        call!(C_SignFinal(s, null_mut(), &mut len)),
        CKR_OPERATION_NOT_INITIALIZED
    );
    assert_eq!(call!(C_FindObjectsFinal(s)), CKR_OPERATION_NOT_INITIALIZED);
    // The digest was not chosen: still active.
    assert_eq!(call!(C_DigestFinal(s, null_mut(), &mut len)), CKR_OK);
    assert_eq!(len, 32);
    assert_eq!(cancel(999_999, CKF_SIGN), CKR_SESSION_HANDLE_INVALID);
}
