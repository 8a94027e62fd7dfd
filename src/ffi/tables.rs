//! The function tables and the three exported discovery symbols. Tables are immutable
//! statics; the 3.0 table adds C_GetInterface*, C_LoginUser, C_SessionCancel and the message
//! functions (CKR_FUNCTION_NOT_SUPPORTED).

#![allow(non_snake_case)]

use super::general::*;
use super::keys::*;
use super::message::*;
use super::objects::*;
use super::ops::*;
use super::{bad, deliver_list, out, run};
use cryptoki_sys::*;

/// One list of the 2.40 entries for both tables (the 3.0 table is the 2.40 one plus its
/// own additions), so that the two can never disagree.
macro_rules! function_table {
    ($ty:ident, $major:expr, $minor:expr $(, $extra:ident)* $(,)?) => {
        $ty {
            version: CK_VERSION { major: $major, minor: $minor },
            C_Initialize: Some(C_Initialize),
            C_Finalize: Some(C_Finalize),
            C_GetInfo: Some(C_GetInfo),
            C_GetFunctionList: Some(C_GetFunctionList),
            C_GetSlotList: Some(C_GetSlotList),
            C_GetSlotInfo: Some(C_GetSlotInfo),
            C_GetTokenInfo: Some(C_GetTokenInfo),
            C_GetMechanismList: Some(C_GetMechanismList),
            C_GetMechanismInfo: Some(C_GetMechanismInfo),
            C_InitToken: Some(C_InitToken),
            C_InitPIN: Some(C_InitPIN),
            C_SetPIN: Some(C_SetPIN),
            C_OpenSession: Some(C_OpenSession),
            C_CloseSession: Some(C_CloseSession),
            C_CloseAllSessions: Some(C_CloseAllSessions),
            C_GetSessionInfo: Some(C_GetSessionInfo),
            C_GetOperationState: Some(C_GetOperationState),
            C_SetOperationState: Some(C_SetOperationState),
            C_Login: Some(C_Login),
            C_Logout: Some(C_Logout),
            C_CreateObject: Some(C_CreateObject),
            C_CopyObject: Some(C_CopyObject),
            C_DestroyObject: Some(C_DestroyObject),
            C_GetObjectSize: Some(C_GetObjectSize),
            C_GetAttributeValue: Some(C_GetAttributeValue),
            C_SetAttributeValue: Some(C_SetAttributeValue),
            C_FindObjectsInit: Some(C_FindObjectsInit),
            C_FindObjects: Some(C_FindObjects),
            C_FindObjectsFinal: Some(C_FindObjectsFinal),
            C_EncryptInit: Some(C_EncryptInit),
            C_Encrypt: Some(C_Encrypt),
            C_EncryptUpdate: Some(C_EncryptUpdate),
            C_EncryptFinal: Some(C_EncryptFinal),
            C_DecryptInit: Some(C_DecryptInit),
            C_Decrypt: Some(C_Decrypt),
            C_DecryptUpdate: Some(C_DecryptUpdate),
            C_DecryptFinal: Some(C_DecryptFinal),
            C_DigestInit: Some(C_DigestInit),
            C_Digest: Some(C_Digest),
            C_DigestUpdate: Some(C_DigestUpdate),
            C_DigestKey: Some(C_DigestKey),
            C_DigestFinal: Some(C_DigestFinal),
            C_SignInit: Some(C_SignInit),
            C_Sign: Some(C_Sign),
            C_SignUpdate: Some(C_SignUpdate),
            C_SignFinal: Some(C_SignFinal),
            C_SignRecoverInit: Some(C_SignRecoverInit),
            C_SignRecover: Some(C_SignRecover),
            C_VerifyInit: Some(C_VerifyInit),
            C_Verify: Some(C_Verify),
            C_VerifyUpdate: Some(C_VerifyUpdate),
            C_VerifyFinal: Some(C_VerifyFinal),
            C_VerifyRecoverInit: Some(C_VerifyRecoverInit),
            C_VerifyRecover: Some(C_VerifyRecover),
            C_DigestEncryptUpdate: Some(C_DigestEncryptUpdate),
            C_DecryptDigestUpdate: Some(C_DecryptDigestUpdate),
            C_SignEncryptUpdate: Some(C_SignEncryptUpdate),
            C_DecryptVerifyUpdate: Some(C_DecryptVerifyUpdate),
            C_GenerateKey: Some(C_GenerateKey),
            C_GenerateKeyPair: Some(C_GenerateKeyPair),
            C_WrapKey: Some(C_WrapKey),
            C_UnwrapKey: Some(C_UnwrapKey),
            C_DeriveKey: Some(C_DeriveKey),
            C_SeedRandom: Some(C_SeedRandom),
            C_GenerateRandom: Some(C_GenerateRandom),
            C_GetFunctionStatus: Some(C_GetFunctionStatus),
            C_CancelFunction: Some(C_CancelFunction),
            C_WaitForSlotEvent: Some(C_WaitForSlotEvent),
            $($extra: Some($extra),)*
        }
    };
}

pub(crate) static FUNCTION_LIST_240: CK_FUNCTION_LIST = function_table!(CK_FUNCTION_LIST, 2, 40);

pub(crate) static FUNCTION_LIST_300: CK_FUNCTION_LIST_3_0 = function_table!(
    CK_FUNCTION_LIST_3_0,
    3,
    0,
    C_GetInterfaceList,
    C_GetInterface,
    C_LoginUser,
    C_SessionCancel,
    C_MessageEncryptInit,
    C_EncryptMessage,
    C_EncryptMessageBegin,
    C_EncryptMessageNext,
    C_MessageEncryptFinal,
    C_MessageDecryptInit,
    C_DecryptMessage,
    C_DecryptMessageBegin,
    C_DecryptMessageNext,
    C_MessageDecryptFinal,
    C_MessageSignInit,
    C_SignMessage,
    C_SignMessageBegin,
    C_SignMessageNext,
    C_MessageSignFinal,
    C_MessageVerifyInit,
    C_VerifyMessage,
    C_VerifyMessageBegin,
    C_VerifyMessageNext,
    C_MessageVerifyFinal,
);

/// CK_INTERFACE holds raw pointers (to statics): a wrapper to keep it in a static.
#[repr(transparent)]
struct Interface(CK_INTERFACE);
// Points only at immutable statics.
unsafe impl Sync for Interface {}

const INTERFACE_NAME: &[u8; 8] = b"PKCS 11\0";

static INTERFACE_300: Interface = Interface(CK_INTERFACE {
    pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
    pFunctionList: &FUNCTION_LIST_300 as *const CK_FUNCTION_LIST_3_0 as *mut std::ffi::c_void,
    flags: 0,
});
static INTERFACE_240: Interface = Interface(CK_INTERFACE {
    pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
    pFunctionList: &FUNCTION_LIST_240 as *const CK_FUNCTION_LIST as *mut std::ffi::c_void,
    flags: 0,
});

/// Newest first: C_GetInterface(NULL, NULL) returns the first.
fn interfaces() -> [&'static Interface; 2] {
    [&INTERFACE_300, &INTERFACE_240]
}

/// The 2.40 function table.
///
/// # Safety
/// `pp` is NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetFunctionList(pp: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    run("C_GetFunctionList", || {
        crate::secret::arena::install();
        // SAFETY: API out-pointer.
        unsafe {
            out(
                pp,
                &FUNCTION_LIST_240 as *const CK_FUNCTION_LIST as *mut CK_FUNCTION_LIST,
                "ppFunctionList",
            )
        }
    })
}

/// The interfaces offered: "PKCS 11" 3.0 and 2.40.
///
/// # Safety
/// `p_list` is NULL or valid for `*pul_count` entries; `pul_count` valid.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterfaceList(
    p_list: *mut CK_INTERFACE,
    pul_count: *mut CK_ULONG,
) -> CK_RV {
    run("C_GetInterfaceList", || {
        crate::secret::arena::install();
        let all = interfaces().map(|i| i.0);
        // SAFETY: API list and count pointers.
        unsafe { deliver_list(p_list, pul_count, &all, "interface list") }
    })
}

/// One interface by name and version (NULL = the default, "PKCS 11" 3.0). Unknown names or
/// versions, and flags the module cannot honour (it is not fork-safe without
/// re-initialisation), give CKR_ARGUMENTS_BAD.
///
/// # Safety
/// `p_name` is NULL or a NUL-terminated string; `p_version` NULL or a CK_VERSION;
/// `pp_iface` valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn C_GetInterface(
    p_name: *mut CK_UTF8CHAR,
    p_version: *mut CK_VERSION,
    pp_iface: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    run("C_GetInterface", || {
        crate::secret::arena::install();
        if pp_iface.is_null() {
            return Err(bad("ppInterface is NULL"));
        }
        if !p_name.is_null() {
            // SAFETY: a NUL-terminated C string per the API.
            let name = unsafe { std::ffi::CStr::from_ptr(p_name as *const std::ffi::c_char) };
            if name.to_bytes() != b"PKCS 11" {
                return Err(bad("only the \"PKCS 11\" interface is offered"));
            }
        }
        let wanted = if p_version.is_null() {
            None
        } else {
            // SAFETY: non-NULL CK_VERSION per the API.
            let v = unsafe { p_version.read_unaligned() };
            Some((v.major, v.minor))
        };
        let found = interfaces().into_iter().find(|i| {
            // SAFETY: our own tables; the version is the first field of both list types.
            let v = unsafe { (i.0.pFunctionList as *const CK_VERSION).read() };
            wanted.is_none_or(|w| w == (v.major, v.minor)) && flags & !i.0.flags == 0
        });
        let iface = found.ok_or_else(|| bad("no interface with that version and flags"))?;
        // SAFETY: checked non-NULL out-pointer; the static lives for the whole process.
        unsafe {
            out(
                pp_iface,
                &iface.0 as *const CK_INTERFACE as *mut CK_INTERFACE,
                "ppInterface",
            )
        }
    })
}
