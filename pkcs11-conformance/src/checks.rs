//! The conformance checks. Each returns Ok(detail) when the module behaves as the PKCS#11
//! specification says, or Err(departure) describing what it did instead. They are about the
//! spec, not about one module: the same suite runs against skr-pkcs11 and SoftHSMv2.

use crate::module::{attr_bytes, attr_ulong, call, call3, mech, mech_with, rv_name, Module};
use cryptoki_sys::*;
use std::ffi::c_void;
use std::ptr;

pub struct Target {
    pub module: Module,
    pub token_label: String,
    pub pin: Option<Vec<u8>>,
}

pub type Outcome = Result<String, String>;

pub struct Check {
    pub name: &'static str,
    pub run: fn(&Target) -> Outcome,
}

pub(crate) fn expect(what: &str, got: CK_RV, want: &[CK_RV]) -> Result<(), String> {
    if want.contains(&got) {
        Ok(())
    } else {
        let w: Vec<String> = want.iter().map(|r| rv_name(*r)).collect();
        Err(format!(
            "{what}: got {}, spec: {}",
            rv_name(got),
            w.join(" or ")
        ))
    }
}

/// Initialise, run `body`, always finalise.
pub(crate) fn with_init<T>(
    t: &Target,
    body: impl FnOnce() -> Result<T, String>,
) -> Result<T, String> {
    expect("C_Initialize(NULL)", t.module.initialize(None), &[CKR_OK])?;
    let r = body();
    let _ = t.module.finalize();
    r
}

pub(crate) fn slot_of(t: &Target) -> Result<CK_SLOT_ID, String> {
    let slots = t
        .module
        .slots(true)
        .map_err(|rv| format!("C_GetSlotList: {}", rv_name(rv)))?;
    for s in slots {
        if let Ok(ti) = t.module.token_info(s) {
            if String::from_utf8_lossy(&ti.label).trim_end() == t.token_label {
                return Ok(s);
            }
        }
    }
    Err(format!("no token labelled {:?}", t.token_label))
}

pub(crate) fn login(t: &Target, s: CK_SESSION_HANDLE) -> Result<(), String> {
    let rv = t.module.login(s, CKU_USER, t.pin.as_deref());
    expect(
        "C_Login(CKU_USER)",
        rv,
        &[CKR_OK, CKR_USER_ALREADY_LOGGED_IN],
    )
}

fn find_class(
    t: &Target,
    s: CK_SESSION_HANDLE,
    class: CK_OBJECT_CLASS,
) -> Result<Vec<CK_OBJECT_HANDLE>, String> {
    let mut c = class;
    t.module
        .find(s, &mut [attr_ulong(CKA_CLASS, &mut c)])
        .map_err(|rv| format!("C_FindObjects: {}", rv_name(rv)))
}

pub fn all() -> Vec<Check> {
    vec![
        Check {
            name: "function table is complete (2.40)",
            run: function_table,
        },
        Check {
            name: "C_GetFunctionList(NULL) is refused",
            run: get_function_list_null,
        },
        Check {
            name: "C_GetInterface(NULL, NULL) gives the default interface",
            run: get_interface,
        },
        Check {
            name: "calls before C_Initialize: CKR_CRYPTOKI_NOT_INITIALIZED",
            run: before_init,
        },
        Check {
            name: "C_Initialize argument matrix",
            run: initialize_matrix,
        },
        Check {
            name: "C_Finalize rules",
            run: finalize_rules,
        },
        Check {
            name: "C_GetInfo identical across re-initialisation",
            run: info_stable,
        },
        Check {
            name: "size-query protocol (slot and mechanism lists)",
            run: size_query_lists,
        },
        Check {
            name: "token info flags and padding",
            run: token_info,
        },
        Check {
            name: "mechanism info: flags in pairs, sizes set",
            run: mechanism_pairs,
        },
        Check {
            name: "session state machine",
            run: sessions,
        },
        Check {
            name: "login state machine",
            run: login_state,
        },
        Check {
            name: "C_GetAttributeValue rules (five cases, whole template)",
            run: get_attribute_rules,
        },
        Check {
            name: "find objects: empty template, classes, CKO_PROFILE, lifecycle",
            run: find_rules,
        },
        Check {
            name: "operation lifecycle: size query, short buffer, end, cancel",
            run: operation_lifecycle,
        },
        Check {
            name: "advertised signature mechanisms sign and verify",
            run: advertised_signatures,
        },
        Check {
            name: "advertised encryption mechanisms round-trip",
            run: advertised_encryption,
        },
        Check {
            name: "advertised message-based AES-GCM (3.0) round-trips, generated IVs differ",
            run: message_encryption,
        },
        Check {
            name: "session objects: template codes, latching, copy, lifetime",
            run: crate::key_checks::session_objects,
        },
        Check {
            name: "key generation, wrap and unwrap round trip",
            run: crate::key_checks::generation_and_wrap,
        },
        Check {
            name: "key-management attacks refused (wrap/decrypt, encrypt/unwrap, known wrapping key, unwrap as non-sensitive)",
            run: crate::key_checks::wrap_attacks,
        },
        Check {
            name: "stale and foreign handles are refused",
            run: handle_validity,
        },
        Check {
            name: "fork: child C_Initialize works, parent handles invalid",
            run: fork_child,
        },
    ]
}

fn function_table(t: &Target) -> Outcome {
    let f = t.module.table();
    if f.version.major != 2 {
        return Err(format!(
            "C_GetFunctionList table version {}.{}, expected 2.x",
            f.version.major, f.version.minor
        ));
    }
    // Every slot of the 2.40 table is a pointer; a NULL one crashes clients that normalise tables.
    let base = f as *const CK_FUNCTION_LIST as *const Option<unsafe extern "C" fn()>;
    let n = (std::mem::size_of::<CK_FUNCTION_LIST>()
        - std::mem::size_of::<CK_VERSION>().next_multiple_of(8))
        / 8;
    let mut missing = 0;
    for i in 0..n {
        // SAFETY: reading function-pointer-sized slots inside the table, after the version.
        let slot = unsafe {
            *((base as *const u8).add(8 + i * 8) as *const Option<unsafe extern "C" fn()>)
        };
        if slot.is_none() {
            missing += 1;
        }
    }
    if missing > 0 {
        return Err(format!("{missing} of {n} entries are NULL"));
    }
    Ok(format!(
        "version {}.{}, {n} entries",
        f.version.major, f.version.minor
    ))
}

fn get_function_list_null(t: &Target) -> Outcome {
    expect(
        "C_GetFunctionList(NULL)",
        t.module.get_function_list_raw(ptr::null_mut()),
        &[CKR_ARGUMENTS_BAD, CKR_FUNCTION_FAILED],
    )?;
    Ok(String::new())
}

fn get_interface(t: &Target) -> Outcome {
    let Some(sym) = t.module.symbol("C_GetInterface") else {
        return Ok("C_GetInterface not exported (optional)".into());
    };
    // SAFETY: the exported symbol has the C_GetInterface signature (PKCS#11 3.0).
    let f: unsafe extern "C" fn(
        *mut u8,
        *mut CK_VERSION,
        *mut *mut CK_INTERFACE,
        CK_FLAGS,
    ) -> CK_RV = unsafe { std::mem::transmute(sym) };
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();
    // SAFETY: valid out pointer; NULL name and version ask for the default interface.
    let rv = unsafe { f(ptr::null_mut(), ptr::null_mut(), &mut iface, 0) };
    expect("C_GetInterface(NULL, NULL)", rv, &[CKR_OK])?;
    if iface.is_null() {
        return Err("C_GetInterface returned CKR_OK and a NULL interface".into());
    }
    // SAFETY: the module returned a pointer to its static interface.
    let i = unsafe { &*iface };
    // SAFETY: pInterfaceName is a NUL-terminated string per the spec.
    let name = unsafe { std::ffi::CStr::from_ptr(i.pInterfaceName as *const std::ffi::c_char) }
        .to_string_lossy()
        .into_owned();
    if name != "PKCS 11" {
        return Err(format!("default interface is named {name:?}"));
    }
    // SAFETY: the function list of a "PKCS 11" interface starts with a CK_VERSION.
    let v = unsafe { *(i.pFunctionList as *const CK_VERSION) };
    if let Some(sym) = t.module.symbol("C_GetInterfaceList") {
        // SAFETY: C_GetInterfaceList signature per PKCS#11 3.0.
        let gl: unsafe extern "C" fn(*mut CK_INTERFACE, *mut CK_ULONG) -> CK_RV =
            unsafe { std::mem::transmute(sym) };
        let mut n: CK_ULONG = 0;
        // SAFETY: size query with NULL list.
        expect(
            "C_GetInterfaceList(NULL, &n)",
            unsafe { gl(ptr::null_mut(), &mut n) },
            &[CKR_OK],
        )?;
        if n == 0 {
            return Err("C_GetInterfaceList reports no interface".into());
        }
        if n > 1 {
            let mut one = [CK_INTERFACE {
                pInterfaceName: ptr::null_mut(),
                pFunctionList: ptr::null_mut(),
                flags: 0,
            }; 1];
            let mut short: CK_ULONG = 1;
            // SAFETY: buffer of one element with its length.
            let rv = unsafe { gl(one.as_mut_ptr(), &mut short) };
            expect(
                "C_GetInterfaceList with a short buffer",
                rv,
                &[CKR_BUFFER_TOO_SMALL],
            )?;
            if short != n {
                return Err(format!(
                    "C_GetInterfaceList short buffer set count {short}, expected {n}"
                ));
            }
        }
    }
    Ok(format!("default interface {name} {}.{}", v.major, v.minor))
}

fn before_init(t: &Target) -> Outcome {
    expect(
        "C_GetInfo before C_Initialize",
        t.module.info().err().unwrap_or(CKR_OK),
        &[CKR_CRYPTOKI_NOT_INITIALIZED],
    )?;
    expect(
        "C_Finalize before C_Initialize",
        t.module.finalize(),
        &[CKR_CRYPTOKI_NOT_INITIALIZED],
    )?;
    expect(
        "C_GetSlotList before C_Initialize",
        t.module.slots(false).err().unwrap_or(CKR_OK),
        &[CKR_CRYPTOKI_NOT_INITIALIZED],
    )?;
    Ok(String::new())
}

unsafe extern "C" fn dummy_create(_m: *mut *mut c_void) -> CK_RV {
    CKR_OK
}
unsafe extern "C" fn dummy_mutex(_m: *mut c_void) -> CK_RV {
    CKR_OK
}

fn init_args(flags: CK_FLAGS, callbacks: usize) -> CK_C_INITIALIZE_ARGS {
    CK_C_INITIALIZE_ARGS {
        CreateMutex: if callbacks > 0 {
            Some(dummy_create)
        } else {
            None
        },
        DestroyMutex: if callbacks > 1 {
            Some(dummy_mutex)
        } else {
            None
        },
        LockMutex: if callbacks > 2 {
            Some(dummy_mutex)
        } else {
            None
        },
        UnlockMutex: if callbacks > 3 {
            Some(dummy_mutex)
        } else {
            None
        },
        flags,
        pReserved: ptr::null_mut(),
    }
}

fn initialize_matrix(t: &Target) -> Outcome {
    let m = &t.module;
    let mut notes = Vec::new();
    // pReserved must be checked, never dereferenced (pkcs11test passes (void*)1).
    let mut a = init_args(0, 0);
    a.pReserved = ptr::without_provenance_mut(1); // (void*)1, as pkcs11test passes
    let rv = m.initialize(Some(&mut a));
    if rv == CKR_OK {
        let _ = m.finalize();
    }
    expect(
        "C_Initialize with pReserved = (void*)1",
        rv,
        &[CKR_ARGUMENTS_BAD],
    )?;
    for n in 1..4 {
        let mut a = init_args(0, n);
        let rv = m.initialize(Some(&mut a));
        if rv == CKR_OK {
            let _ = m.finalize();
        }
        expect(
            &format!("C_Initialize with {n} of 4 mutex callbacks"),
            rv,
            &[CKR_ARGUMENTS_BAD],
        )?;
    }
    for (what, flags, cbs, ok) in [
        ("no flags, no callbacks", 0, 0, &[CKR_OK][..]),
        ("CKF_OS_LOCKING_OK", CKF_OS_LOCKING_OK, 0, &[CKR_OK][..]),
        ("all callbacks", 0, 4, &[CKR_OK, CKR_CANT_LOCK][..]),
        (
            "all callbacks + CKF_OS_LOCKING_OK",
            CKF_OS_LOCKING_OK,
            4,
            &[CKR_OK, CKR_CANT_LOCK][..],
        ),
        (
            "CKF_LIBRARY_CANT_CREATE_OS_THREADS",
            CKF_LIBRARY_CANT_CREATE_OS_THREADS,
            0,
            &[CKR_OK, CKR_NEED_TO_CREATE_THREADS][..],
        ),
    ] {
        let mut a = init_args(flags, cbs);
        let rv = m.initialize(Some(&mut a));
        expect(&format!("C_Initialize({what})"), rv, ok)?;
        if rv == CKR_OK {
            expect("C_Finalize", m.finalize(), &[CKR_OK])?;
        } else {
            notes.push(format!("{what}: {}", rv_name(rv)));
        }
    }
    expect("C_Initialize(NULL)", m.initialize(None), &[CKR_OK])?;
    let rv = m.initialize(None);
    let _ = m.finalize();
    expect(
        "second C_Initialize",
        rv,
        &[CKR_CRYPTOKI_ALREADY_INITIALIZED],
    )?;
    Ok(notes.join("; "))
}

fn finalize_rules(t: &Target) -> Outcome {
    let m = &t.module;
    expect("C_Initialize", m.initialize(None), &[CKR_OK])?;
    let rv = m.finalize_raw(ptr::without_provenance_mut(1));
    expect("C_Finalize((void*)1)", rv, &[CKR_ARGUMENTS_BAD])?;
    expect("C_Finalize(NULL)", m.finalize(), &[CKR_OK])?;
    expect(
        "second C_Finalize",
        m.finalize(),
        &[CKR_CRYPTOKI_NOT_INITIALIZED],
    )?;
    Ok(String::new())
}

fn info_stable(t: &Target) -> Outcome {
    let m = &t.module;
    let a = with_init(t, || {
        expect(
            "C_GetInfo(NULL)",
            call!(m, C_GetInfo, ptr::null_mut()),
            &[CKR_ARGUMENTS_BAD, CKR_FUNCTION_FAILED],
        )?;
        m.info().map_err(|rv| format!("C_GetInfo: {}", rv_name(rv)))
    })?;
    let b = with_init(t, || {
        m.info().map_err(|rv| format!("C_GetInfo: {}", rv_name(rv)))
    })?;
    // SAFETY: CK_INFO is plain old data; compare its bytes.
    let (ab, bb) = unsafe {
        (
            std::slice::from_raw_parts(
                &a as *const CK_INFO as *const u8,
                std::mem::size_of::<CK_INFO>(),
            ),
            std::slice::from_raw_parts(
                &b as *const CK_INFO as *const u8,
                std::mem::size_of::<CK_INFO>(),
            ),
        )
    };
    if ab != bb {
        return Err(
            "C_GetInfo differs after C_Finalize + C_Initialize (pkcs11-provider fails the child)"
                .into(),
        );
    }
    Ok(format!(
        "cryptoki {}.{}, \"{}\"",
        a.cryptokiVersion.major,
        a.cryptokiVersion.minor,
        String::from_utf8_lossy(&a.manufacturerID).trim_end()
    ))
}

fn size_query_lists(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let mut n: CK_ULONG = 0;
        expect(
            "C_GetSlotList(NULL list)",
            call!(m, C_GetSlotList, CK_FALSE, ptr::null_mut(), &mut n),
            &[CKR_OK],
        )?;
        if n >= 2 {
            let mut one = [0 as CK_SLOT_ID; 1];
            let mut short: CK_ULONG = 1;
            expect(
                "C_GetSlotList(short buffer)",
                call!(m, C_GetSlotList, CK_FALSE, one.as_mut_ptr(), &mut short),
                &[CKR_BUFFER_TOO_SMALL],
            )?;
            if short != n {
                return Err(format!(
                    "short slot buffer: count set to {short}, expected {n}"
                ));
            }
        }
        expect(
            "C_GetSlotList(NULL count)",
            call!(m, C_GetSlotList, CK_FALSE, ptr::null_mut(), ptr::null_mut()),
            &[CKR_ARGUMENTS_BAD],
        )?;
        let slot = slot_of(t)?;
        let mut k: CK_ULONG = 0;
        expect(
            "C_GetMechanismList(NULL list)",
            call!(m, C_GetMechanismList, slot, ptr::null_mut(), &mut k),
            &[CKR_OK],
        )?;
        if k >= 2 {
            let mut one = [0 as CK_MECHANISM_TYPE; 1];
            let mut short: CK_ULONG = 1;
            expect(
                "C_GetMechanismList(short buffer)",
                call!(m, C_GetMechanismList, slot, one.as_mut_ptr(), &mut short),
                &[CKR_BUFFER_TOO_SMALL],
            )?;
            if short != k {
                return Err(format!(
                    "short mechanism buffer: count set to {short}, expected {k}"
                ));
            }
        }
        expect(
            "C_GetTokenInfo(bad slot)",
            t.module.token_info(0xdead_beef).err().unwrap_or(CKR_OK),
            &[CKR_SLOT_ID_INVALID],
        )?;
        Ok(format!("{n} slots, {k} mechanisms"))
    })
}

fn token_info(t: &Target) -> Outcome {
    with_init(t, || {
        let slot = slot_of(t)?;
        let ti = t.module.token_info(slot).map_err(rv_name)?;
        let bad = CKF_USER_PIN_LOCKED
            | CKF_USER_PIN_FINAL_TRY
            | CKF_USER_PIN_TO_BE_CHANGED
            | CKF_SO_PIN_LOCKED;
        if ti.flags & bad != 0 {
            return Err(format!(
                "token flags 0x{:x} include a PIN-locked / final-try / to-be-changed flag",
                ti.flags
            ));
        }
        if ti.flags & CKF_TOKEN_INITIALIZED == 0 {
            return Err("CKF_TOKEN_INITIALIZED not set".into());
        }
        for (n, f) in [
            ("label", &ti.label[..]),
            ("manufacturerID", &ti.manufacturerID[..]),
            ("model", &ti.model[..]),
            ("serialNumber", &ti.serialNumber[..]),
        ] {
            if f.contains(&0) {
                return Err(format!("{n} contains NUL bytes; the spec pads with spaces"));
            }
        }
        Ok(format!("flags 0x{:x}", ti.flags))
    })
}

fn mechanism_pairs(t: &Target) -> Outcome {
    with_init(t, || {
        let slot = slot_of(t)?;
        let mut one_sided = Vec::new();
        for mt in t.module.mechanisms(slot).map_err(rv_name)? {
            let i = t
                .module
                .mechanism_info(slot, mt)
                .map_err(|rv| format!("C_GetMechanismInfo(0x{mt:x}): {}", rv_name(rv)))?;
            let sign = i.flags & CKF_SIGN != 0;
            let verify = i.flags & CKF_VERIFY != 0;
            let enc = i.flags & CKF_ENCRYPT != 0;
            let dec = i.flags & CKF_DECRYPT != 0;
            if sign != verify || enc != dec {
                one_sided.push(format!("0x{mt:x} flags 0x{:x}", i.flags));
            }
        }
        if t.module.mechanism_info(slot, 0x7fff_fff0).err() != Some(CKR_MECHANISM_INVALID) {
            return Err("C_GetMechanismInfo(unknown) is not CKR_MECHANISM_INVALID".into());
        }
        if !one_sided.is_empty() {
            return Err(format!(
                "one-sided mechanisms (SunPKCS11 disables them): {}",
                one_sided.join(", ")
            ));
        }
        Ok(String::new())
    })
}

fn sessions(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        expect(
            "C_OpenSession without CKF_SERIAL_SESSION",
            m.open_session_flags(slot, 0),
            &[CKR_SESSION_PARALLEL_NOT_SUPPORTED],
        )?;
        let ro = m
            .open_session(slot, false)
            .map_err(|rv| format!("C_OpenSession(RO): {}", rv_name(rv)))?;
        let i = m.session_info(ro).map_err(rv_name)?;
        if i.state != CKS_RO_PUBLIC_SESSION || i.slotID != slot || i.flags & CKF_SERIAL_SESSION == 0
        {
            return Err(format!(
                "RO session info: state {} slot {} flags 0x{:x}",
                i.state, i.slotID, i.flags
            ));
        }
        expect(
            "C_GetSessionInfo(NULL)",
            call!(m, C_GetSessionInfo, ro, ptr::null_mut()),
            &[CKR_ARGUMENTS_BAD],
        )?;
        match m.open_session(slot, true) {
            Ok(rw) => {
                let i = m.session_info(rw).map_err(rv_name)?;
                if i.state != CKS_RW_PUBLIC_SESSION {
                    return Err(format!("RW session state {}", i.state));
                }
            }
            Err(CKR_TOKEN_WRITE_PROTECTED) => {}
            Err(rv) => return Err(format!("C_OpenSession(RW): {}", rv_name(rv))),
        }
        expect("C_CloseAllSessions", m.close_all(slot), &[CKR_OK])?;
        expect(
            "C_GetSessionInfo on a closed session",
            m.session_info(ro).err().unwrap_or(CKR_OK),
            &[CKR_SESSION_HANDLE_INVALID],
        )?;
        expect(
            "C_CloseSession on a closed session",
            m.close_session(ro),
            &[CKR_SESSION_HANDLE_INVALID],
        )?;
        Ok(String::new())
    })
}

fn login_state(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        let s2 = m.open_session(slot, false).map_err(rv_name)?;
        expect(
            "C_Logout when not logged in",
            m.logout(s),
            &[CKR_USER_NOT_LOGGED_IN],
        )?;
        expect(
            "C_Login(CKU_USER)",
            m.login(s, CKU_USER, t.pin.as_deref()),
            &[CKR_OK],
        )?;
        expect(
            "second C_Login",
            m.login(s, CKU_USER, t.pin.as_deref()),
            &[CKR_USER_ALREADY_LOGGED_IN],
        )?;
        let i = m.session_info(s2).map_err(rv_name)?;
        if i.state != CKS_RO_USER_FUNCTIONS {
            return Err(format!(
                "login is per token: the other session's state is {} not CKS_RO_USER_FUNCTIONS",
                i.state
            ));
        }
        expect(
            "C_Login(CKU_SO) while the user is logged in",
            m.login(s, CKU_SO, t.pin.as_deref()),
            &[
                CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
                CKR_SESSION_READ_ONLY_EXISTS,
                CKR_USER_ALREADY_LOGGED_IN,
            ],
        )?;
        expect("C_Logout", m.logout(s2), &[CKR_OK])?;
        let i = m.session_info(s).map_err(rv_name)?;
        if i.state != CKS_RO_PUBLIC_SESSION {
            return Err(format!("after logout the state is {}", i.state));
        }
        expect(
            "C_Login(bad user type)",
            m.login(s, 77, t.pin.as_deref()),
            &[CKR_USER_TYPE_INVALID],
        )?;
        Ok(String::new())
    })
}

/// The first private key with the given key type, after login.
fn private_key(t: &Target, s: CK_SESSION_HANDLE, kt: CK_KEY_TYPE) -> Option<CK_OBJECT_HANDLE> {
    let (mut c, mut k) = (CKO_PRIVATE_KEY, kt);
    t.module
        .find(
            s,
            &mut [
                attr_ulong(CKA_CLASS, &mut c),
                attr_ulong(CKA_KEY_TYPE, &mut k),
            ],
        )
        .ok()?
        .first()
        .copied()
}

/// The public key object with the same CKA_ID as `key`.
fn public_of(t: &Target, s: CK_SESSION_HANDLE, key: CK_OBJECT_HANDLE) -> Option<CK_OBJECT_HANDLE> {
    let mut id = t.module.attribute(s, key, CKA_ID).ok()?;
    let mut c = CKO_PUBLIC_KEY;
    t.module
        .find(
            s,
            &mut [attr_ulong(CKA_CLASS, &mut c), attr_bytes(CKA_ID, &mut id)],
        )
        .ok()?
        .first()
        .copied()
}

fn get_attribute_rules(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        let key = private_key(t, s, CKK_RSA)
            .or_else(|| private_key(t, s, CKK_EC))
            .ok_or("no private key to inspect")?;
        let sensitive_attr = if private_key(t, s, CKK_RSA) == Some(key) {
            CKA_PRIVATE_EXPONENT
        } else {
            CKA_VALUE
        };
        // Case 3 and 4: size query then fetch.
        let id = m
            .attribute(s, key, CKA_ID)
            .map_err(|rv| format!("CKA_ID: {}", rv_name(rv)))?;
        // Mixed template: sensitive, invalid type, NULL value, too small, fits.
        let mut class: CK_ULONG = 0;
        let mut small = [0u8; 0];
        let mut label_len_probe = [0u8; 1];
        let mut tmpl = [
            CK_ATTRIBUTE {
                type_: sensitive_attr,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            },
            CK_ATTRIBUTE {
                type_: 0x7fff_ff00,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            },
            CK_ATTRIBUTE {
                type_: CKA_ID,
                pValue: ptr::null_mut(),
                ulValueLen: 0,
            },
            attr_bytes(CKA_ID, &mut small),
            attr_ulong(CKA_CLASS, &mut class),
            attr_bytes(CKA_LABEL, &mut label_len_probe),
        ];
        let rv = m.get_attributes(s, key, &mut tmpl);
        expect(
            "mixed template",
            rv,
            &[
                CKR_ATTRIBUTE_SENSITIVE,
                CKR_ATTRIBUTE_TYPE_INVALID,
                CKR_BUFFER_TOO_SMALL,
            ],
        )?;
        let unavailable = CK_UNAVAILABLE_INFORMATION;
        if tmpl[0].ulValueLen != unavailable {
            return Err("sensitive attribute: length not CK_UNAVAILABLE_INFORMATION".into());
        }
        if tmpl[1].ulValueLen != unavailable {
            return Err("unknown attribute: length not CK_UNAVAILABLE_INFORMATION".into());
        }
        if tmpl[2].ulValueLen != id.len() as CK_ULONG {
            return Err(format!(
                "NULL pValue: length {} not {}",
                tmpl[2].ulValueLen,
                id.len()
            ));
        }
        if tmpl[3].ulValueLen != unavailable {
            return Err("buffer too small: length not CK_UNAVAILABLE_INFORMATION".into());
        }
        if class != CKO_PRIVATE_KEY
            || tmpl[4].ulValueLen != std::mem::size_of::<CK_ULONG>() as CK_ULONG
        {
            return Err("entries after an error were not processed (whole template rule)".into());
        }
        // Single cases, each alone.
        let mut one = [CK_ATTRIBUTE {
            type_: sensitive_attr,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        }];
        expect(
            "sensitive attribute alone",
            m.get_attributes(s, key, &mut one),
            &[CKR_ATTRIBUTE_SENSITIVE],
        )?;
        let mut one = [CK_ATTRIBUTE {
            type_: 0x7fff_ff00,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        }];
        expect(
            "unknown attribute alone",
            m.get_attributes(s, key, &mut one),
            &[CKR_ATTRIBUTE_TYPE_INVALID],
        )?;
        // Standard booleans every client reads must be answered.
        for a in [
            CKA_TOKEN,
            CKA_PRIVATE,
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_SIGN,
            CKA_DECRYPT,
            CKA_ALWAYS_AUTHENTICATE,
            CKA_MODIFIABLE,
        ] {
            let v = m
                .attribute(s, key, a)
                .map_err(|rv| format!("private key attribute 0x{a:x}: {}", rv_name(rv)))?;
            if v.len() != 1 {
                return Err(format!("boolean attribute 0x{a:x} has length {}", v.len()));
            }
        }
        expect(
            "C_GetAttributeValue(NULL template, 1)",
            call!(m, C_GetAttributeValue, s, key, ptr::null_mut(), 1),
            &[CKR_ARGUMENTS_BAD],
        )?;
        Ok(String::new())
    })
}

fn find_rules(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        let mut buf = [0 as CK_OBJECT_HANDLE; 4];
        let mut n: CK_ULONG = 0;
        expect(
            "C_FindObjects without Init",
            call!(m, C_FindObjects, s, buf.as_mut_ptr(), 4, &mut n),
            &[CKR_OPERATION_NOT_INITIALIZED],
        )?;
        let public_all = m
            .find(s, &mut [])
            .map_err(|rv| format!("empty template: {}", rv_name(rv)))?;
        if !find_class(t, s, CKO_PRIVATE_KEY)?.is_empty() && t.pin.is_none() {
            return Err("private keys are visible before login".into());
        }
        let profiles = find_class(t, s, CKO_PROFILE)?;
        expect(
            "C_FindObjectsInit twice",
            {
                let _ = call!(m, C_FindObjectsInit, s, ptr::null_mut(), 0);
                let rv = call!(m, C_FindObjectsInit, s, ptr::null_mut(), 0);
                let _ = call!(m, C_FindObjectsFinal, s);
                rv
            },
            &[CKR_OPERATION_ACTIVE],
        )?;
        login(t, s)?;
        let all = m.find(s, &mut []).map_err(rv_name)?;
        if all.len() < public_all.len() {
            return Err("fewer objects after login than before".into());
        }
        let privs = find_class(t, s, CKO_PRIVATE_KEY)?;
        if privs.is_empty() {
            return Err("no private key after login".into());
        }
        Ok(format!(
            "{} objects before login, {} after, {} profile objects",
            public_all.len(),
            all.len(),
            profiles.len()
        ))
    })
}

fn operation_lifecycle(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        // A multi-part-capable hashed mechanism the token advertises, with a matching key.
        let mechs = m.mechanisms(slot).map_err(rv_name)?;
        let (key, mt) = [
            (CKK_RSA, CKM_SHA256_RSA_PKCS),
            (CKK_EC, CKM_ECDSA_SHA256),
            (CKK_RSA, CKM_SHA1_RSA_PKCS),
        ]
        .iter()
        .find_map(|&(kt, mt)| {
            if mechs.contains(&mt) {
                private_key(t, s, kt).map(|k| (k, mt))
            } else {
                None
            }
        })
        .ok_or("no advertised hashed signature mechanism with a matching key")?;
        let mut mk = mech(mt);
        let data = b"lifecycle";
        let sign = |out: *mut u8, len: *mut CK_ULONG| {
            call!(
                m,
                C_Sign,
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len
            )
        };
        expect(
            "C_Sign without C_SignInit",
            sign(ptr::null_mut(), &mut 0),
            &[CKR_OPERATION_NOT_INITIALIZED],
        )?;
        expect(
            "C_SignInit",
            call!(m, C_SignInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        expect(
            "C_SignInit while active",
            call!(m, C_SignInit, s, &mut mk, key),
            &[CKR_OPERATION_ACTIVE],
        )?;
        let mut len: CK_ULONG = 0;
        expect(
            "C_Sign(NULL) size query",
            sign(ptr::null_mut(), &mut len),
            &[CKR_OK],
        )?;
        let mut tiny = [0u8; 1];
        let mut tl: CK_ULONG = 1;
        expect(
            "C_Sign(short buffer)",
            sign(tiny.as_mut_ptr(), &mut tl),
            &[CKR_BUFFER_TOO_SMALL],
        )?;
        if tl < len.min(64) {
            return Err(format!(
                "BUFFER_TOO_SMALL set length {tl}, size query said {len}"
            ));
        }
        let mut out = vec![0u8; len as usize];
        expect(
            "C_Sign after BUFFER_TOO_SMALL (operation must still be active)",
            sign(out.as_mut_ptr(), &mut len),
            &[CKR_OK],
        )?;
        expect(
            "C_Sign after the operation ended",
            sign(ptr::null_mut(), &mut 0),
            &[CKR_OPERATION_NOT_INITIALIZED],
        )?;
        // NULL mechanism cancels (pkcs11-provider relies on it).
        expect(
            "C_SignInit",
            call!(m, C_SignInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        expect(
            "C_SignInit(NULL mechanism) cancels",
            call!(m, C_SignInit, s, ptr::null_mut(), key),
            &[CKR_OK],
        )?;
        expect(
            "C_SignInit after cancel",
            call!(m, C_SignInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        expect(
            "C_SignInit(NULL) cancel",
            call!(m, C_SignInit, s, ptr::null_mut(), key),
            &[CKR_OK],
        )?;
        // Multi-part, and an error ends the operation.
        expect(
            "C_SignInit",
            call!(m, C_SignInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        expect(
            "C_SignUpdate",
            call!(
                m,
                C_SignUpdate,
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG
            ),
            &[CKR_OK],
        )?;
        let fin = m
            .finish_sized(|o, l| call!(m, C_SignFinal, s, o, l))
            .map_err(|rv| format!("C_SignFinal: {}", rv_name(rv)))?;
        if fin.is_empty() {
            return Err("empty multi-part signature".into());
        }
        expect(
            "C_SignInit(wrong-class key handle)",
            call!(m, C_SignInit, s, &mut mk, 0x7fff_fff1),
            &[CKR_KEY_HANDLE_INVALID, CKR_OBJECT_HANDLE_INVALID],
        )?;
        Ok(String::new())
    })
}

fn oaep(hash: CK_MECHANISM_TYPE, mgf: CK_RSA_PKCS_MGF_TYPE) -> CK_RSA_PKCS_OAEP_PARAMS {
    CK_RSA_PKCS_OAEP_PARAMS {
        hashAlg: hash,
        mgf,
        source: CKZ_DATA_SPECIFIED,
        pSourceData: ptr::null_mut(),
        ulSourceDataLen: 0,
    }
}

fn pss(
    hash: CK_MECHANISM_TYPE,
    mgf: CK_RSA_PKCS_MGF_TYPE,
    salt: CK_ULONG,
) -> CK_RSA_PKCS_PSS_PARAMS {
    CK_RSA_PKCS_PSS_PARAMS {
        hashAlg: hash,
        mgf,
        sLen: salt,
    }
}

fn advertised_signatures(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        let mechs = m.mechanisms(slot).map_err(rv_name)?;
        let rsa = private_key(t, s, CKK_RSA);
        let ec = private_key(t, s, CKK_EC);
        let (mut ok, mut failed, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        let data = b"advertised mechanisms must work";
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
        let mut digest_info = vec![
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ];
        digest_info.extend_from_slice(sha256.as_ref());
        for &mt in &mechs {
            let info = m.mechanism_info(slot, mt).map_err(rv_name)?;
            if info.flags & CKF_SIGN == 0 {
                continue;
            }
            let mut p_pss;
            let (key, mut mk, input): (Option<CK_OBJECT_HANDLE>, CK_MECHANISM, &[u8]) = match mt {
                CKM_RSA_PKCS => (rsa, mech(mt), &digest_info),
                CKM_SHA1_RSA_PKCS | CKM_SHA224_RSA_PKCS | CKM_SHA256_RSA_PKCS
                | CKM_SHA384_RSA_PKCS | CKM_SHA512_RSA_PKCS => (rsa, mech(mt), data),
                CKM_RSA_PKCS_PSS => {
                    p_pss = pss(CKM_SHA256, CKG_MGF1_SHA256, 32);
                    (rsa, mech_with(mt, &mut p_pss), sha256.as_ref())
                }
                CKM_SHA256_RSA_PKCS_PSS => {
                    p_pss = pss(CKM_SHA256, CKG_MGF1_SHA256, 32);
                    (rsa, mech_with(mt, &mut p_pss), data)
                }
                CKM_SHA384_RSA_PKCS_PSS => {
                    p_pss = pss(CKM_SHA384, CKG_MGF1_SHA384, 48);
                    (rsa, mech_with(mt, &mut p_pss), data)
                }
                CKM_SHA512_RSA_PKCS_PSS => {
                    p_pss = pss(CKM_SHA512, CKG_MGF1_SHA512, 64);
                    (rsa, mech_with(mt, &mut p_pss), data)
                }
                CKM_ECDSA => (ec, mech(mt), sha256.as_ref()),
                CKM_ECDSA_SHA1 | CKM_ECDSA_SHA224 | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384
                | CKM_ECDSA_SHA512 => (ec, mech(mt), data),
                _ => {
                    skipped.push(format!("0x{mt:x}"));
                    continue;
                }
            };
            let Some(key) = key else {
                skipped.push(format!("0x{mt:x} (no key)"));
                continue;
            };
            let Some(pubk) = public_of(t, s, key) else {
                failed.push(format!(
                    "0x{mt:x}: no public key object with the key's CKA_ID"
                ));
                continue;
            };
            match m.sign(s, &mut mk, key, input) {
                Ok(sig) => match m.verify(s, &mut mk, pubk, input, &sig) {
                    CKR_OK => {
                        let mut bad = sig.clone();
                        bad[sig.len() / 2] ^= 0x40;
                        match m.verify(s, &mut mk, pubk, input, &bad) {
                            CKR_SIGNATURE_INVALID => ok.push(format!("0x{mt:x}")),
                            rv => failed
                                .push(format!("0x{mt:x}: tampered signature gave {}", rv_name(rv))),
                        }
                    }
                    rv => failed.push(format!("0x{mt:x}: verify {}", rv_name(rv))),
                },
                Err(rv) => failed.push(format!("0x{mt:x}: sign {}", rv_name(rv))),
            }
        }
        if !failed.is_empty() {
            return Err(format!("advertised but failing: {}", failed.join("; ")));
        }
        Ok(format!(
            "{} worked; not exercised: {}",
            ok.len(),
            if skipped.is_empty() {
                "none".into()
            } else {
                skipped.join(", ")
            }
        ))
    })
}

fn advertised_encryption(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        let mechs = m.mechanisms(slot).map_err(rv_name)?;
        let rsa = private_key(t, s, CKK_RSA);
        let aes = {
            let (mut c, mut k) = (CKO_SECRET_KEY, CKK_AES);
            m.find(
                s,
                &mut [
                    attr_ulong(CKA_CLASS, &mut c),
                    attr_ulong(CKA_KEY_TYPE, &mut k),
                ],
            )
            .ok()
            .and_then(|v| v.first().copied())
        };
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        let data = b"round trip through the token";
        for &mt in &mechs {
            let info = m.mechanism_info(slot, mt).map_err(rv_name)?;
            if info.flags & CKF_ENCRYPT == 0 {
                continue;
            }
            let mut p_oaep = oaep(CKM_SHA256, CKG_MGF1_SHA256);
            let mut iv = [5u8; 16];
            let mut gcm_iv = [6u8; 12];
            let mut gcm = CK_GCM_PARAMS {
                pIv: gcm_iv.as_mut_ptr(),
                ulIvLen: 12,
                ulIvBits: 96,
                pAAD: ptr::null_mut(),
                ulAADLen: 0,
                ulTagBits: 128,
            };
            let (enc_key, dec_key, mut mk) = match mt {
                CKM_RSA_PKCS_OAEP => (
                    rsa.and_then(|k| public_of(t, s, k)),
                    rsa,
                    mech_with(mt, &mut p_oaep),
                ),
                CKM_AES_CBC_PAD => (
                    aes,
                    aes,
                    CK_MECHANISM {
                        mechanism: mt,
                        pParameter: iv.as_mut_ptr() as *mut c_void,
                        ulParameterLen: 16,
                    },
                ),
                CKM_AES_GCM => (aes, aes, mech_with(mt, &mut gcm)),
                _ => continue,
            };
            let (Some(ek), Some(dk)) = (enc_key, dec_key) else {
                continue;
            };
            let mut enc = m.encrypt(s, &mut mk, ek, data);
            if mt == CKM_RSA_PKCS_OAEP && enc == Err(CKR_MECHANISM_PARAM_INVALID) {
                // SHA-256 OAEP is optional; SHA-1 is the baseline every OAEP token supports.
                p_oaep = oaep(CKM_SHA_1, CKG_MGF1_SHA1);
                mk = mech_with(mt, &mut p_oaep);
                enc = m.encrypt(s, &mut mk, ek, data);
            }
            match enc {
                Ok(ct) => match m.decrypt(s, &mut mk, dk, &ct) {
                    Ok(pt) if pt == data => ok.push(format!("0x{mt:x}")),
                    Ok(_) => failed.push(format!("0x{mt:x}: round trip differs")),
                    Err(rv) => failed.push(format!("0x{mt:x}: decrypt {}", rv_name(rv))),
                },
                Err(rv) => failed.push(format!("0x{mt:x}: encrypt {}", rv_name(rv))),
            }
        }
        if !failed.is_empty() {
            return Err(format!("advertised but failing: {}", failed.join("; ")));
        }
        Ok(format!("{} round-tripped", ok.len()))
    })
}

/// One C_EncryptMessage / C_DecryptMessage of `input` with AES-GCM message parameters over
/// `iv` and `tag`; the output, or the CK_RV. A size query first: its length must be honoured.
fn gcm_message(
    m: &Module,
    encrypt: bool,
    s: CK_SESSION_HANDLE,
    p: &mut CK_GCM_MESSAGE_PARAMS,
    input: &[u8],
) -> Result<Vec<u8>, CK_RV> {
    let pp = p as *mut _ as *mut c_void;
    let pl = std::mem::size_of::<CK_GCM_MESSAGE_PARAMS>() as CK_ULONG;
    let (ip, il) = (input.as_ptr() as *mut u8, input.len() as CK_ULONG);
    let one = |o: *mut u8, l: &mut CK_ULONG| {
        let aad = b"conformance".as_ptr() as *mut u8;
        if encrypt {
            call3!(m, C_EncryptMessage, s, pp, pl, aad, 11, ip, il, o, l)
        } else {
            call3!(m, C_DecryptMessage, s, pp, pl, aad, 11, ip, il, o, l)
        }
    };
    let mut n: CK_ULONG = 0;
    let rv = one(ptr::null_mut(), &mut n);
    if rv != CKR_OK {
        return Err(rv);
    }
    let mut out = vec![0u8; n as usize];
    let rv = one(out.as_mut_ptr(), &mut n);
    if rv != CKR_OK {
        return Err(rv);
    }
    out.truncate(n as usize);
    Ok(out)
}

/// PKCS#11 3.0 message-based encryption, for a module whose mechanism info claims it on
/// CKM_AES_GCM: many messages under one Init (a caller's IV and token-generated ones), each
/// decrypted by a message-based decryption, generated IVs handed back and distinct, Final
/// ending the operation. A module without the 3.0 interface or the flag has nothing to check.
fn message_encryption(t: &Target) -> Outcome {
    let m = &t.module;
    if m.f3.is_none() {
        return Ok("no PKCS#11 3.0 interface: nothing advertised".into());
    }
    with_init(t, || {
        let slot = slot_of(t)?;
        let info = m.mechanism_info(slot, CKM_AES_GCM);
        let flags = CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT;
        if !info.is_ok_and(|i| i.flags & flags == flags) {
            return Ok("CKM_AES_GCM does not claim message-based encryption".into());
        }
        let s = m.open_session(slot, false).map_err(rv_name)?;
        login(t, s)?;
        let (mut c, mut k) = (CKO_SECRET_KEY, CKK_AES);
        let key = m
            .find(
                s,
                &mut [
                    attr_ulong(CKA_CLASS, &mut c),
                    attr_ulong(CKA_KEY_TYPE, &mut k),
                ],
            )
            .ok()
            .and_then(|v| v.first().copied())
            .ok_or("CKM_AES_GCM claims message-based encryption but the token has no AES key")?;
        let mut mk = mech(CKM_AES_GCM);
        expect(
            "C_MessageEncryptInit",
            call3!(m, C_MessageEncryptInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        expect(
            "C_MessageDecryptInit",
            call3!(m, C_MessageDecryptInit, s, &mut mk, key),
            &[CKR_OK],
        )?;
        let data = b"one of many messages under one key";
        let mut ivs = Vec::new();
        for generator in [CKG_NO_GENERATE, CKG_GENERATE, CKG_GENERATE] {
            let (mut iv, mut tag) = ([7u8; 12], [0u8; 16]);
            let mut p = CK_GCM_MESSAGE_PARAMS {
                pIv: iv.as_mut_ptr(),
                ulIvLen: 12,
                ulIvFixedBits: 0,
                ivGenerator: generator,
                pTag: tag.as_mut_ptr(),
                ulTagBits: 128,
            };
            let ct = gcm_message(m, true, s, &mut p, data).map_err(|rv| {
                format!("C_EncryptMessage (generator {generator}): {}", rv_name(rv))
            })?;
            if ct.len() != data.len() {
                return Err(format!(
                    "C_EncryptMessage gave {} bytes for {}",
                    ct.len(),
                    data.len()
                ));
            }
            let mut p = CK_GCM_MESSAGE_PARAMS {
                ivGenerator: CKG_NO_GENERATE,
                ..p
            };
            let pt = gcm_message(m, false, s, &mut p, &ct).map_err(|rv| {
                format!("C_DecryptMessage (generator {generator}): {}", rv_name(rv))
            })?;
            if pt != data {
                return Err(format!("generator {generator}: the round trip differs"));
            }
            ivs.push(iv);
        }
        if ivs[0] != [7u8; 12] {
            return Err("CKG_NO_GENERATE changed the caller's IV".into());
        }
        if ivs[1] == ivs[2] {
            return Err("two generated IVs under one key are the same".into());
        }
        expect(
            "C_MessageEncryptFinal",
            call3!(m, C_MessageEncryptFinal, s),
            &[CKR_OK],
        )?;
        expect(
            "C_MessageDecryptFinal",
            call3!(m, C_MessageDecryptFinal, s),
            &[CKR_OK],
        )?;
        expect(
            "C_MessageEncryptFinal after Final",
            call3!(m, C_MessageEncryptFinal, s),
            &[CKR_OPERATION_NOT_INITIALIZED],
        )?;
        Ok("3 messages under one Init, generated IVs distinct".into())
    })
}

fn handle_validity(t: &Target) -> Outcome {
    let m = &t.module;
    with_init(t, || {
        let slot = slot_of(t)?;
        let s = m.open_session(slot, false).map_err(rv_name)?;
        expect(
            "C_GetAttributeValue(bogus object)",
            m.attribute(s, 0x7fff_fff7, CKA_CLASS)
                .err()
                .unwrap_or(CKR_OK),
            &[CKR_OBJECT_HANDLE_INVALID],
        )?;
        expect(
            "C_GetSessionInfo(bogus session)",
            m.session_info(0x7fff_fff7).err().unwrap_or(CKR_OK),
            &[CKR_SESSION_HANDLE_INVALID],
        )?;
        let objs = m.find(s, &mut []).map_err(rv_name)?;
        // Token object handles are valid in every session of the application.
        let s2 = m.open_session(slot, false).map_err(rv_name)?;
        if let Some(&o) = objs.first() {
            m.attribute(s2, o, CKA_CLASS)
                .map_err(|rv| format!("token object handle in another session: {}", rv_name(rv)))?;
        }
        m.close_session(s);
        let s3 = m.open_session(slot, false).map_err(rv_name)?;
        if s3 == s {
            return Err("a closed session's handle was reused".into());
        }
        expect(
            "C_GetSessionInfo(closed session)",
            m.session_info(s).err().unwrap_or(CKR_OK),
            &[CKR_SESSION_HANDLE_INVALID],
        )?;
        Ok(String::new())
    })
}

fn fork_child(t: &Target) -> Outcome {
    let m = &t.module;
    expect("C_Initialize", m.initialize(None), &[CKR_OK])?;
    let slot = slot_of(t)?;
    let s = m.open_session(slot, false).map_err(rv_name)?;
    // SAFETY: fork; the child only calls the module and _exits with a code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let _ = m.finalize();
        return Err("fork failed".into());
    }
    if pid == 0 {
        let code = (|| {
            let rv = m.initialize(None);
            if rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED {
                return 10;
            }
            if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED {
                // Spec-conformant modules may keep state; still the parent's session must not be usable.
                return 11;
            }
            if m.session_info(s).is_ok() {
                return 12;
            }
            if m.slots(true).is_err() {
                return 13;
            }
            let s2 = match m.open_session(slot, false) {
                Ok(s2) => s2,
                Err(_) => return 14,
            };
            if m.login(s2, CKU_USER, t.pin.as_deref()) != CKR_OK {
                return 15;
            }
            let _ = m.finalize();
            0
        })();
        // SAFETY: leaving the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let alive = m.session_info(s).is_ok();
    let _ = m.finalize();
    if !alive {
        return Err("the parent's session died when a child re-initialised".into());
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok("child: C_Initialize OK, parent session invalid, login OK".into()),
        10 => Err("child C_Initialize failed".into()),
        11 => Err("child C_Initialize returned CKR_CRYPTOKI_ALREADY_INITIALIZED (pkcs11-tool --test-fork expects CKR_OK)".into()),
        12 => Err("the parent's session handle works in the child".into()),
        13 => Err("C_GetSlotList fails in the child".into()),
        14 => Err("C_OpenSession fails in the child".into()),
        15 => Err("C_Login fails in the child".into()),
        c => Err(format!("child exited with {c}")),
    }
}
