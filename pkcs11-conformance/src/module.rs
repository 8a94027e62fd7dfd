//! A PKCS#11 module loaded by path, called through its raw 2.40 function table, so that the
//! checks can pass exactly what a C client passes (NULL pointers, short buffers, bad handles).

use cryptoki_sys::*;
use std::ffi::c_void;
use std::ptr;

pub struct Module {
    _lib: libloading::Library,
    pub(crate) f: &'static CK_FUNCTION_LIST,
    /// The "PKCS 11" 3.0 interface's table, when the module has one (`C_GetInterface`).
    pub(crate) f3: Option<&'static CK_FUNCTION_LIST_3_0>,
}

/// Call an entry of the table; a NULL entry is reported as CKR_FUNCTION_NOT_SUPPORTED by the
/// caller's check (the table-completeness check reports it separately).
macro_rules! call {
    ($m:expr, $name:ident $(, $arg:expr)*) => {
        match $m.f.$name {
            // SAFETY: calling the module's own entry point with arguments that the check built
            // to be valid (or deliberately invalid in the way the spec says it must reject).
            Some(func) => unsafe { func($($arg),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}
pub(crate) use call;

/// `call!` for an entry of the 3.0 table: CKR_FUNCTION_NOT_SUPPORTED without one.
macro_rules! call3 {
    ($m:expr, $name:ident $(, $arg:expr)*) => {
        match $m.f3.and_then(|f| f.$name) {
            // SAFETY: as for `call!`.
            Some(func) => unsafe { func($($arg),*) },
            None => CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}
pub(crate) use call3;

/// The module's "PKCS 11" 3.0 function table, if it exports `C_GetInterface` and has one.
fn interface_3_0(lib: &libloading::Library) -> Option<&'static CK_FUNCTION_LIST_3_0> {
    type GetInterface = unsafe extern "C" fn(
        *mut CK_UTF8CHAR,
        *mut CK_VERSION,
        *mut *mut CK_INTERFACE,
        CK_FLAGS,
    ) -> CK_RV;
    // SAFETY: the symbol has the C_GetInterface signature per the PKCS#11 3.0 spec.
    let get = unsafe { lib.get::<GetInterface>(b"C_GetInterface\0") }.ok()?;
    let mut name = *b"PKCS 11\0";
    let mut version = CK_VERSION { major: 3, minor: 0 };
    let mut iface: *mut CK_INTERFACE = ptr::null_mut();
    // SAFETY: valid name, version and out-pointer.
    let rv = unsafe { get(name.as_mut_ptr(), &mut version, &mut iface, 0) };
    if rv != CKR_OK || iface.is_null() {
        return None;
    }
    // SAFETY: a "PKCS 11" 3.0 interface points at the module's CK_FUNCTION_LIST_3_0, alive as
    // long as the library (which the Module keeps).
    unsafe { ((*iface).pFunctionList as *const CK_FUNCTION_LIST_3_0).as_ref() }
}

impl Module {
    pub fn load(path: &str) -> Result<Module, String> {
        // SAFETY: loading a PKCS#11 module runs its initialisers, which is what any client does.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot load {path}: {e}"))?;
        // SAFETY: the symbol has the C_GetFunctionList signature per the PKCS#11 spec.
        let gfl: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            unsafe { lib.get(b"C_GetFunctionList\0") }
                .map_err(|e| format!("no C_GetFunctionList: {e}"))?;
        let mut p: *mut CK_FUNCTION_LIST = ptr::null_mut();
        // SAFETY: p is a valid out pointer.
        let rv = unsafe { gfl(&mut p) };
        if rv != CKR_OK || p.is_null() {
            return Err(format!("C_GetFunctionList returned {}", rv_name(rv)));
        }
        // SAFETY: the module keeps its function table alive while loaded; we keep the library.
        let f: &'static CK_FUNCTION_LIST = unsafe { &*p };
        let f3 = interface_3_0(&lib);
        Ok(Module { _lib: lib, f, f3 })
    }

    pub fn table(&self) -> &CK_FUNCTION_LIST {
        self.f
    }

    /// `C_GetFunctionList` called with the given out pointer (for the NULL check).
    pub fn get_function_list_raw(&self, out: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
        call!(self, C_GetFunctionList, out)
    }

    pub fn symbol(&self, name: &str) -> Option<*const c_void> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        // SAFETY: only the address is taken.
        unsafe { self._lib.get::<*const c_void>(&n) }
            .ok()
            .map(|s| *s)
    }

    pub fn initialize(&self, args: Option<&mut CK_C_INITIALIZE_ARGS>) -> CK_RV {
        let p = args
            .map(|a| a as *mut _ as *mut c_void)
            .unwrap_or(ptr::null_mut());
        call!(self, C_Initialize, p)
    }
    pub fn finalize(&self) -> CK_RV {
        call!(self, C_Finalize, ptr::null_mut())
    }
    pub fn finalize_raw(&self, p: *mut c_void) -> CK_RV {
        call!(self, C_Finalize, p)
    }
    pub fn info(&self) -> Result<CK_INFO, CK_RV> {
        // SAFETY: CK_INFO is plain old data.
        let mut i: CK_INFO = unsafe { std::mem::zeroed() };
        match call!(self, C_GetInfo, &mut i) {
            CKR_OK => Ok(i),
            rv => Err(rv),
        }
    }
    pub fn slots(&self, present: bool) -> Result<Vec<CK_SLOT_ID>, CK_RV> {
        let mut n: CK_ULONG = 0;
        let tp = if present { CK_TRUE } else { CK_FALSE };
        let rv = call!(self, C_GetSlotList, tp, ptr::null_mut(), &mut n);
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut v = vec![0; n as usize];
        let rv = call!(self, C_GetSlotList, tp, v.as_mut_ptr(), &mut n);
        if rv != CKR_OK {
            return Err(rv);
        }
        v.truncate(n as usize);
        Ok(v)
    }
    pub fn token_info(&self, slot: CK_SLOT_ID) -> Result<CK_TOKEN_INFO, CK_RV> {
        // SAFETY: plain old data.
        let mut t: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        match call!(self, C_GetTokenInfo, slot, &mut t) {
            CKR_OK => Ok(t),
            rv => Err(rv),
        }
    }
    pub fn mechanisms(&self, slot: CK_SLOT_ID) -> Result<Vec<CK_MECHANISM_TYPE>, CK_RV> {
        let mut n: CK_ULONG = 0;
        let rv = call!(self, C_GetMechanismList, slot, ptr::null_mut(), &mut n);
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut v = vec![0; n as usize];
        let rv = call!(self, C_GetMechanismList, slot, v.as_mut_ptr(), &mut n);
        if rv != CKR_OK {
            return Err(rv);
        }
        v.truncate(n as usize);
        Ok(v)
    }
    pub fn mechanism_info(
        &self,
        slot: CK_SLOT_ID,
        m: CK_MECHANISM_TYPE,
    ) -> Result<CK_MECHANISM_INFO, CK_RV> {
        // SAFETY: plain old data.
        let mut i: CK_MECHANISM_INFO = unsafe { std::mem::zeroed() };
        match call!(self, C_GetMechanismInfo, slot, m, &mut i) {
            CKR_OK => Ok(i),
            rv => Err(rv),
        }
    }
    pub fn open_session(&self, slot: CK_SLOT_ID, rw: bool) -> Result<CK_SESSION_HANDLE, CK_RV> {
        let mut h: CK_SESSION_HANDLE = 0;
        let flags = CKF_SERIAL_SESSION | if rw { CKF_RW_SESSION } else { 0 };
        match call!(
            self,
            C_OpenSession,
            slot,
            flags,
            ptr::null_mut(),
            None,
            &mut h
        ) {
            CKR_OK => Ok(h),
            rv => Err(rv),
        }
    }
    pub fn open_session_flags(&self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> CK_RV {
        let mut h: CK_SESSION_HANDLE = 0;
        call!(
            self,
            C_OpenSession,
            slot,
            flags,
            ptr::null_mut(),
            None,
            &mut h
        )
    }
    pub fn close_session(&self, s: CK_SESSION_HANDLE) -> CK_RV {
        call!(self, C_CloseSession, s)
    }
    pub fn close_all(&self, slot: CK_SLOT_ID) -> CK_RV {
        call!(self, C_CloseAllSessions, slot)
    }
    pub fn session_info(&self, s: CK_SESSION_HANDLE) -> Result<CK_SESSION_INFO, CK_RV> {
        // SAFETY: plain old data.
        let mut i: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        match call!(self, C_GetSessionInfo, s, &mut i) {
            CKR_OK => Ok(i),
            rv => Err(rv),
        }
    }
    pub fn login(&self, s: CK_SESSION_HANDLE, user: CK_USER_TYPE, pin: Option<&[u8]>) -> CK_RV {
        match pin {
            Some(p) => call!(
                self,
                C_Login,
                s,
                user,
                p.as_ptr() as *mut u8,
                p.len() as CK_ULONG
            ),
            None => call!(self, C_Login, s, user, ptr::null_mut(), 0),
        }
    }
    pub fn logout(&self, s: CK_SESSION_HANDLE) -> CK_RV {
        call!(self, C_Logout, s)
    }
    pub fn find(
        &self,
        s: CK_SESSION_HANDLE,
        template: &mut [CK_ATTRIBUTE],
    ) -> Result<Vec<CK_OBJECT_HANDLE>, CK_RV> {
        let rv = call!(
            self,
            C_FindObjectsInit,
            s,
            template.as_mut_ptr(),
            template.len() as CK_ULONG
        );
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut out = Vec::new();
        loop {
            let mut buf = [0 as CK_OBJECT_HANDLE; 16];
            let mut n: CK_ULONG = 0;
            let rv = call!(self, C_FindObjects, s, buf.as_mut_ptr(), 16, &mut n);
            if rv != CKR_OK {
                let _ = call!(self, C_FindObjectsFinal, s);
                return Err(rv);
            }
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        match call!(self, C_FindObjectsFinal, s) {
            CKR_OK => Ok(out),
            rv => Err(rv),
        }
    }
    pub fn get_attributes(
        &self,
        s: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        template: &mut [CK_ATTRIBUTE],
    ) -> CK_RV {
        call!(
            self,
            C_GetAttributeValue,
            s,
            o,
            template.as_mut_ptr(),
            template.len() as CK_ULONG
        )
    }
    /// One attribute's value, by the size-query protocol.
    pub fn attribute(
        &self,
        s: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        t: CK_ATTRIBUTE_TYPE,
    ) -> Result<Vec<u8>, CK_RV> {
        let mut a = [CK_ATTRIBUTE {
            type_: t,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        }];
        let rv = self.get_attributes(s, o, &mut a);
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut v = vec![0u8; a[0].ulValueLen as usize];
        a[0].pValue = v.as_mut_ptr() as *mut c_void;
        let rv = self.get_attributes(s, o, &mut a);
        if rv != CKR_OK {
            return Err(rv);
        }
        v.truncate(a[0].ulValueLen as usize);
        Ok(v)
    }
    /// Single-part operation with the size query first: Init, then Op(NULL) for the length,
    /// then Op(buffer).
    pub fn sign(
        &self,
        s: CK_SESSION_HANDLE,
        mech: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        let rv = call!(self, C_SignInit, s, mech, key);
        if rv != CKR_OK {
            return Err(rv);
        }
        self.finish_sized(|out, len| {
            call!(
                self,
                C_Sign,
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len
            )
        })
    }
    pub fn verify(
        &self,
        s: CK_SESSION_HANDLE,
        mech: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
        sig: &[u8],
    ) -> CK_RV {
        let rv = call!(self, C_VerifyInit, s, mech, key);
        if rv != CKR_OK {
            return rv;
        }
        call!(
            self,
            C_Verify,
            s,
            data.as_ptr() as *mut u8,
            data.len() as CK_ULONG,
            sig.as_ptr() as *mut u8,
            sig.len() as CK_ULONG
        )
    }
    pub fn encrypt(
        &self,
        s: CK_SESSION_HANDLE,
        mech: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        let rv = call!(self, C_EncryptInit, s, mech, key);
        if rv != CKR_OK {
            return Err(rv);
        }
        self.finish_sized(|out, len| {
            call!(
                self,
                C_Encrypt,
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len
            )
        })
    }
    pub fn decrypt(
        &self,
        s: CK_SESSION_HANDLE,
        mech: &mut CK_MECHANISM,
        key: CK_OBJECT_HANDLE,
        data: &[u8],
    ) -> Result<Vec<u8>, CK_RV> {
        let rv = call!(self, C_DecryptInit, s, mech, key);
        if rv != CKR_OK {
            return Err(rv);
        }
        self.finish_sized(|out, len| {
            call!(
                self,
                C_Decrypt,
                s,
                data.as_ptr() as *mut u8,
                data.len() as CK_ULONG,
                out,
                len
            )
        })
    }
    pub fn finish_sized(
        &self,
        mut op: impl FnMut(*mut u8, *mut CK_ULONG) -> CK_RV,
    ) -> Result<Vec<u8>, CK_RV> {
        let mut len: CK_ULONG = 0;
        let rv = op(ptr::null_mut(), &mut len);
        if rv != CKR_OK {
            return Err(rv);
        }
        let mut out = vec![0u8; len as usize];
        let rv = op(out.as_mut_ptr(), &mut len);
        if rv != CKR_OK {
            return Err(rv);
        }
        out.truncate(len as usize);
        Ok(out)
    }
}

pub fn mech(t: CK_MECHANISM_TYPE) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: t,
        pParameter: ptr::null_mut(),
        ulParameterLen: 0,
    }
}

pub fn mech_with<T>(t: CK_MECHANISM_TYPE, p: &mut T) -> CK_MECHANISM {
    CK_MECHANISM {
        mechanism: t,
        pParameter: p as *mut T as *mut c_void,
        ulParameterLen: std::mem::size_of::<T>() as CK_ULONG,
    }
}

pub fn attr_ulong(t: CK_ATTRIBUTE_TYPE, v: &mut CK_ULONG) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: v as *mut CK_ULONG as *mut c_void,
        ulValueLen: std::mem::size_of::<CK_ULONG>() as CK_ULONG,
    }
}

pub fn attr_bytes(t: CK_ATTRIBUTE_TYPE, v: &mut [u8]) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE {
        type_: t,
        pValue: v.as_mut_ptr() as *mut c_void,
        ulValueLen: v.len() as CK_ULONG,
    }
}

pub fn rv_name(rv: CK_RV) -> String {
    let names: &[(CK_RV, &str)] = &[
        (CKR_OK, "CKR_OK"),
        (CKR_CANCEL, "CKR_CANCEL"),
        (CKR_HOST_MEMORY, "CKR_HOST_MEMORY"),
        (CKR_SLOT_ID_INVALID, "CKR_SLOT_ID_INVALID"),
        (CKR_GENERAL_ERROR, "CKR_GENERAL_ERROR"),
        (CKR_FUNCTION_FAILED, "CKR_FUNCTION_FAILED"),
        (CKR_ARGUMENTS_BAD, "CKR_ARGUMENTS_BAD"),
        (CKR_NEED_TO_CREATE_THREADS, "CKR_NEED_TO_CREATE_THREADS"),
        (CKR_CANT_LOCK, "CKR_CANT_LOCK"),
        (CKR_ATTRIBUTE_SENSITIVE, "CKR_ATTRIBUTE_SENSITIVE"),
        (CKR_ATTRIBUTE_TYPE_INVALID, "CKR_ATTRIBUTE_TYPE_INVALID"),
        (CKR_DATA_INVALID, "CKR_DATA_INVALID"),
        (CKR_DATA_LEN_RANGE, "CKR_DATA_LEN_RANGE"),
        (CKR_DEVICE_ERROR, "CKR_DEVICE_ERROR"),
        (CKR_ENCRYPTED_DATA_INVALID, "CKR_ENCRYPTED_DATA_INVALID"),
        (CKR_FUNCTION_NOT_SUPPORTED, "CKR_FUNCTION_NOT_SUPPORTED"),
        (CKR_KEY_HANDLE_INVALID, "CKR_KEY_HANDLE_INVALID"),
        (CKR_KEY_TYPE_INCONSISTENT, "CKR_KEY_TYPE_INCONSISTENT"),
        (
            CKR_KEY_FUNCTION_NOT_PERMITTED,
            "CKR_KEY_FUNCTION_NOT_PERMITTED",
        ),
        (CKR_MECHANISM_INVALID, "CKR_MECHANISM_INVALID"),
        (CKR_MECHANISM_PARAM_INVALID, "CKR_MECHANISM_PARAM_INVALID"),
        (CKR_OBJECT_HANDLE_INVALID, "CKR_OBJECT_HANDLE_INVALID"),
        (CKR_OPERATION_ACTIVE, "CKR_OPERATION_ACTIVE"),
        (
            CKR_OPERATION_NOT_INITIALIZED,
            "CKR_OPERATION_NOT_INITIALIZED",
        ),
        (CKR_PIN_INCORRECT, "CKR_PIN_INCORRECT"),
        (CKR_SESSION_HANDLE_INVALID, "CKR_SESSION_HANDLE_INVALID"),
        (
            CKR_SESSION_PARALLEL_NOT_SUPPORTED,
            "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
        ),
        (CKR_SIGNATURE_INVALID, "CKR_SIGNATURE_INVALID"),
        (CKR_SIGNATURE_LEN_RANGE, "CKR_SIGNATURE_LEN_RANGE"),
        (CKR_TOKEN_WRITE_PROTECTED, "CKR_TOKEN_WRITE_PROTECTED"),
        (CKR_USER_ALREADY_LOGGED_IN, "CKR_USER_ALREADY_LOGGED_IN"),
        (CKR_USER_NOT_LOGGED_IN, "CKR_USER_NOT_LOGGED_IN"),
        (CKR_USER_TYPE_INVALID, "CKR_USER_TYPE_INVALID"),
        (CKR_BUFFER_TOO_SMALL, "CKR_BUFFER_TOO_SMALL"),
        (CKR_CRYPTOKI_NOT_INITIALIZED, "CKR_CRYPTOKI_NOT_INITIALIZED"),
        (
            CKR_CRYPTOKI_ALREADY_INITIALIZED,
            "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        ),
        (CKR_FUNCTION_REJECTED, "CKR_FUNCTION_REJECTED"),
        (CKR_NO_EVENT, "CKR_NO_EVENT"),
        (CKR_FUNCTION_NOT_PARALLEL, "CKR_FUNCTION_NOT_PARALLEL"),
        (
            CKR_RANDOM_SEED_NOT_SUPPORTED,
            "CKR_RANDOM_SEED_NOT_SUPPORTED",
        ),
        (CKR_RANDOM_NO_RNG, "CKR_RANDOM_NO_RNG"),
        (CKR_ATTRIBUTE_READ_ONLY, "CKR_ATTRIBUTE_READ_ONLY"),
        (CKR_ATTRIBUTE_VALUE_INVALID, "CKR_ATTRIBUTE_VALUE_INVALID"),
        (CKR_TEMPLATE_INCOMPLETE, "CKR_TEMPLATE_INCOMPLETE"),
        (CKR_WRAPPED_KEY_INVALID, "CKR_WRAPPED_KEY_INVALID"),
        (CKR_WRAPPED_KEY_LEN_RANGE, "CKR_WRAPPED_KEY_LEN_RANGE"),
        (CKR_KEY_UNEXTRACTABLE, "CKR_KEY_UNEXTRACTABLE"),
        (CKR_KEY_NOT_WRAPPABLE, "CKR_KEY_NOT_WRAPPABLE"),
        (CKR_SESSION_READ_ONLY_EXISTS, "CKR_SESSION_READ_ONLY_EXISTS"),
        (
            CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
            "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
        ),
        (CKR_TEMPLATE_INCONSISTENT, "CKR_TEMPLATE_INCONSISTENT"),
        (CKR_SESSION_READ_ONLY, "CKR_SESSION_READ_ONLY"),
        (CKR_ENCRYPTED_DATA_LEN_RANGE, "CKR_ENCRYPTED_DATA_LEN_RANGE"),
        (CKR_KEY_SIZE_RANGE, "CKR_KEY_SIZE_RANGE"),
    ];
    names
        .iter()
        .find(|(v, _)| *v == rv)
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| format!("0x{rv:x}"))
}
