//! skr-pkcs11: a PKCS#11 token whose keys are released by Azure Secure Key Release to an
//! attested TEE. The cdylib exports only C_GetFunctionList, C_GetInterfaceList and
//! C_GetInterface (see `ffi`).

pub mod config;
pub mod crypto;
pub mod error;
pub mod ffi;
pub mod logging;
pub mod policy;
pub mod release;
pub mod secret;
pub mod sync;
pub mod token;
