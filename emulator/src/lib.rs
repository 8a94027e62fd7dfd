//! skr-emulator's services: a local Microsoft Azure Attestation + Key Vault / Managed HSM +
//! IMDS with a simulated SEV-SNP platform, over HTTPS on 127.0.0.1 (docs/EMULATOR.md). The
//! `skr-emulator` CLI (main.rs) runs them through `app`; `fuzzing` holds the fuzz targets'
//! harnesses.
//!
//! Modules import only downwards (`layers.rs` checks it):
//! - helpers: `util`, `jwt`, `pki`, `policy`, `snp`, `tcg_log`;
//! - shared state and types: `state` (files), `admin` (counters, faults, log), `keystore`
//!   (the vault's keys), `context` (`App`, the running emulator), then `cose` and `tenant`
//!   (Entra ids and tokens) which read it;
//! - one module per Azure service: `maa`, `keyvault`, `imds`;
//! - on top `app` (start-up, the emulator's own platform and admin endpoints, the routers),
//!   `fuzzing` and the CLI.

mod admin;
pub mod app;
mod context;
mod cose;
#[doc(hidden)]
pub mod fuzzing;
mod imds;
mod jwt;
mod keystore;
mod keyvault;
#[cfg(test)]
mod layers;
mod maa;
mod pki;
mod policy;
mod snp;
pub mod state;
mod tcg_log;
mod tdx;
mod tenant;
mod util;
mod vtpm;
