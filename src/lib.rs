//! skr-pkcs11: a PKCS#11 token whose keys are released by Azure Secure Key Release to an
//! attested TEE. The cdylib exports only C_GetFunctionList, C_GetInterfaceList and
//! C_GetInterface (see `ffi`). `docs/MODULE.md` maps the rooms and the login and operation
//! flows.
//!
//! Rooms and arrows: `ffi` (the C boundary) → `token` (pure state) → `crypto` (the only room
//! that calls the crypto engine) → `secret` (locked, wiped key memory); `release` (the only
//! room with network or device I/O) produces what `token` installs and calls `crypto`, never
//! the other way round. `sync` holds the lock helpers every room shares.
//!
//! `unsafe` is denied crate-wide and allowed only in `ffi` (raw pointers of the C API),
//! `secret` (mmap/mlock, the allocator hooks), `crypto` (aws-lc-sys where aws-lc-rs has no safe
//! API) and `sys` (the SEV-SNP report ioctl and syslog). This is `deny`, not `forbid`: a
//! crate-level `forbid` cannot be relaxed by an inner `#[allow]`, so the four rooms could not
//! opt back in; `deny` plus one `allow` per room gives the same guarantee (any other `unsafe`
//! fails to compile) and keeps the exceptions visible here. Rooms that must never gain one add
//! their own `#![forbid(unsafe_code)]` (token, sync).

#![deny(unsafe_code)]

pub mod config;
#[allow(unsafe_code)]
pub mod crypto;
pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod pem;
pub mod policy;
pub mod release;
#[allow(unsafe_code)]
pub mod secret;
pub mod sync;
#[allow(unsafe_code)]
pub mod sys;
pub mod token;
