//! The login path: transfer key, evidence, MAA, identity, AKV release, unwrap.
//! The only part of the module that does network or device I/O.
//!
//! Contract with the rest of the module: `release_token` takes the configuration and one
//! token's config and returns the released private key material of every key of that token
//! (checked against the public key from `GET {kid}`), or one `Error` naming the failing step.

pub mod akv;
#[cfg(feature = "cvm")]
pub mod cvm;
pub mod evidence;
pub mod http;
pub mod identity;
pub mod jws;
pub mod maa;
#[cfg(feature = "cvm")]
pub mod tpm;
pub mod transfer_key;
pub mod unwrap;

use crate::config::{Config, TokenConfig};
use crate::error::{Error, Result, Step};
use base64::Engine;
use serde_json::Value;
use std::time::{Duration, Instant};
use transfer_key::{SoftwareTransferKey, TransferKey};

/// Unpadded base64url (RFC 4648 §5), the encoding of JOSE and of every Azure SKR field.
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Standard padded base64 (RFC 4648 §4): MSGA's "B64" in MAA's AzureGuest request.
pub fn b64std(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// base64url, padded or not. A decoder must keep trailing zero bytes (skr-protocol §3.3 step 1).
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim().trim_end_matches('='))
        .ok()
}

// The release path produces the token's released-key types.
pub use crate::token::released::{KeyMaterial, ReleasedKey};

/// Module-side time spent in each step of one login (for the benchmark's breakdown).
#[derive(Debug, Default, Clone)]
pub struct LoginTimings {
    pub transfer_key: Duration,
    pub evidence: Duration,
    pub attestation: Duration,
    pub identity: Duration,
    pub release: Duration,
    pub unwrap: Duration,
    /// On an Azure CVM, the vTPM's share of the steps above.
    pub tpm: Option<TpmTimings>,
}

/// The vTPM commands of a CVM login, by step (each includes libtss2 and the TPM itself).
#[derive(Debug, Default, Clone)]
pub struct TpmTimings {
    /// TPM2_CreatePrimary of the transfer key under its PolicyPCR (trial session included).
    pub create: Duration,
    /// TPM2_Certify of the transfer key by the AK.
    pub certify: Duration,
    /// User-data write to NV 0x01400002, then HCL report reads until it echoes (NV 0x01400001).
    pub nv_report: Duration,
    /// AK public and AK certificate reads.
    pub ak: Duration,
    /// TPM2_Quote and the PCR read that checks it.
    pub quote: Duration,
    /// TPM2_RSA_Decrypt of MAA's sealed token key (RSAES), part of the attestation step.
    pub token_decrypt: Duration,
}

/// A random nonce for MAA and AKV requests (freshness; echoed back and checked).
pub fn random_nonce() -> Result<String> {
    let mut b = [0u8; 16];
    crate::crypto::random(&mut b)?;
    Ok(hex::encode(b))
}

/// The per-login plumbing: trust anchors and the HTTP clients. Built inside each login, so that
/// nothing network-related is carried across fork.
pub struct Session {
    pub anchors: jws::TrustAnchors,
    pub http: http::Http,
}

impl Session {
    pub fn new(cfg: &Config) -> Result<Session> {
        let anchors = jws::TrustAnchors::load(cfg.tls.ca_file.as_deref())?;
        let http = http::Http::new(&cfg.release, &anchors)?;
        Ok(Session { anchors, http })
    }
}

/// The result of evidence + MAA: a verified token that carries `transfer`'s public key.
pub struct Attested {
    pub token: String,
    pub claims: Value,
    /// The configured MAA URL (the token's verified `iss`).
    pub issuer: String,
    pub transfer: Box<dyn TransferKey>,
    /// Name of the evidence provider used.
    pub evidence_source: &'static str,
}

/// Steps 1–3: transfer key, evidence, MAA (verified). Fills the matching timings.
pub fn attest(cfg: &Config, session: &Session, timings: &mut LoginTimings) -> Result<Attested> {
    attest_inner(cfg, session, timings).map_err(with_default_hint)
}

fn attest_inner(cfg: &Config, session: &Session, timings: &mut LoginTimings) -> Result<Attested> {
    if evidence::uses_vtpm(cfg) {
        #[cfg(feature = "cvm")]
        return cvm::attest(cfg, session, timings);
        #[cfg(not(feature = "cvm"))]
        return Err(Error::config(
            "platform.evidence = \"azure-cvm\" needs the module built with the cargo feature `cvm`",
        ));
    }
    let t = Instant::now();
    let transfer: Box<dyn TransferKey> = Box::new(SoftwareTransferKey::generate()?);
    timings.transfer_key = t.elapsed();

    let t = Instant::now();
    let runtime_data = transfer.public_jwk().jwks_bytes();
    let report_data = evidence::report_data_for(&runtime_data);
    let provider = evidence::provider(cfg, &session.http)?;
    let ev = provider.get_report(&report_data)?;
    evidence::check_report(&ev.report, &report_data)?;
    let (chain, uvm) = match ev.vcek_chain_pem {
        Some(chain) => {
            // The emulator delivers the chain; an ACI-style security context may still add
            // the UVM endorsement when one is configured.
            let uvm = evidence::security_context_dir(cfg)
                .filter(|_| cfg.platform.security_context_dir.is_some())
                .and_then(|d| evidence::collateral_from_dir(&d).ok())
                .and_then(|c| c.uvm_reference_info);
            (chain, uvm)
        }
        None => {
            let c = evidence::collateral(cfg, &session.http)?;
            if let (Some(tcbm), Some(reported)) = (c.tcbm, evidence::reported_tcb(&ev.report)) {
                if tcbm != reported {
                    log::warn!(
                        "VCEK collateral is for TCB {tcbm:016x} but the report's REPORTED_TCB is {reported:016x}; MAA may refuse the evidence"
                    );
                }
            }
            (c.vcek_chain_pem, c.uvm_reference_info)
        }
    };
    timings.evidence = t.elapsed();

    let t = Instant::now();
    let maa = maa::Maa::new(
        &session.http,
        &cfg.attestation.url,
        &cfg.attestation.api_version,
    );
    let nonce = random_nonce()?;
    let member = evidence::maa_report_member(&ev.report, &chain, uvm.as_deref());
    let token = maa.attest(member, &runtime_data, &nonce)?;
    let claims = maa.verify(
        &token,
        &maa::Expected {
            nonce: &nonce,
            transfer_key: transfer.public_jwk(),
            binding: maa::Binding::SevSnp {
                report_data: &report_data,
            },
        },
    )?;
    timings.attestation = t.elapsed();
    Ok(Attested {
        token,
        claims,
        issuer: maa.url().to_string(),
        transfer,
        evidence_source: provider.name(),
    })
}

/// Every login failure carries a hint an operator can act on: errors made without a specific
/// one get the hint of their class and step (`Error::with_default_hint`).
pub fn with_default_hint(e: Error) -> Error {
    e.with_default_hint()
}

/// Run the whole release for one token.
///
/// All or nothing: if any key fails, every key already released is dropped (wiped) and the
/// first failure in key order is returned. Keys are released concurrently, one thread each.
pub fn release_token(
    cfg: &Config,
    token: &TokenConfig,
) -> Result<(Vec<ReleasedKey>, LoginTimings)> {
    // No log line here: the caller (C_Login, the CLI) reports the failure once, with its CK_RV.
    release_token_inner(cfg, token).map_err(with_default_hint)
}

fn release_token_inner(
    cfg: &Config,
    token: &TokenConfig,
) -> Result<(Vec<ReleasedKey>, LoginTimings)> {
    let (each, timings) = release_each(cfg, token)?;
    let mut released = Vec::with_capacity(each.len());
    for (_, r) in each {
        released.push(r?);
    }
    Ok((released, timings))
}

/// The outcome of a release, key by key (a refresh keeps serving the keys that failed for
/// a reason that may pass, and wipes those the vault refused). The outer error is a failure
/// before any key: configuration, evidence, MAA, identity.
pub type EachReleased = Vec<(usize, Result<ReleasedKey>)>;

/// Like `release_token`, but every key's own result.
pub fn release_token_each(
    cfg: &Config,
    token: &TokenConfig,
) -> Result<(EachReleased, LoginTimings)> {
    match release_each(cfg, token) {
        Ok((each, t)) => Ok((
            each.into_iter()
                .map(|(i, r)| (i, r.map_err(with_default_hint)))
                .collect(),
            t,
        )),
        Err(e) => Err(with_default_hint(e)),
    }
}

fn release_each(cfg: &Config, token: &TokenConfig) -> Result<(EachReleased, LoginTimings)> {
    let mut timings = LoginTimings::default();
    if token.keys.is_empty() {
        return Err(Error::config(format!(
            "token {:?} has no keys",
            token.label
        )));
    }
    let enc = unwrap::WrapAlg::from_name(&cfg.release.enc).ok_or_else(|| {
        Error::config(format!(
            "release.enc {:?} is not supported",
            cfg.release.enc
        ))
    })?;
    let session = Session::new(cfg)?;

    // The access token does not depend on the attestation: get it (for the audience of the
    // first key's host) while evidence and MAA run. Other audiences are fetched when a vault's
    // 401 challenge names them. An attestation failure is reported first.
    let identity = identity::Identity::new(&session.http, &cfg.identity);
    let first_host = jws::url_host(&token.keys[0].kid).unwrap_or_default();
    let (attested, prefetch) = std::thread::scope(|s| {
        let prefetch = s.spawn(|| {
            identity
                .token(identity::default_resource(&first_host), false)
                .map(drop)
        });
        let attested = attest(cfg, &session, &mut timings);
        let prefetch = prefetch.join().unwrap_or_else(|_| {
            Err(Error::general("the identity thread panicked").with_step(Step::Identity))
        });
        (attested, prefetch)
    });
    let attested = attested?;
    prefetch?;
    timings.identity = identity.spent();

    let t = Instant::now();
    let akv = akv::Akv::new(
        &session.http,
        &identity,
        &session.anchors,
        &cfg.release.api_version,
        enc,
    );
    let att = akv::Attestation {
        token: &attested.token,
        issuer: &attested.issuer,
        claims: &attested.claims,
    };
    let transfer: &dyn TransferKey = attested.transfer.as_ref();
    let results: Vec<Result<(ReleasedKey, Duration)>> = std::thread::scope(|s| {
        let handles: Vec<_> = token
            .keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let (akv, att) = (&akv, &att);
                s.spawn(move || akv.release_key(i, key, att, transfer))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::general("a release thread panicked")
                        .with_step(Step::Release)
                        .with_hint("internal error of the module; the log has the panic message, please report it"))
                })
            })
            .collect()
    });
    let phase = t.elapsed();
    let mut released: EachReleased = Vec::with_capacity(results.len());
    let mut unwrap_time = Duration::ZERO;
    for (i, r) in results.into_iter().enumerate() {
        released.push((
            i,
            r.map(|(key, spent)| {
                unwrap_time += spent;
                key
            }),
        ));
    }
    let late_identity = identity.spent().saturating_sub(timings.identity);
    timings.identity += late_identity;
    timings.unwrap = unwrap_time;
    timings.release = phase.saturating_sub(late_identity);
    let source = attested.evidence_source;
    // The transfer key is dropped (and wiped, or flushed from the TPM) here, with the session.
    drop(attested);
    // C_Login logs the outcome at info; this detail is for debugging the release itself.
    log::debug!(
        "token {:?}: released {} of {} key(s) via {} with {source} evidence (transfer key {:?}, evidence {:?}, attestation {:?}, identity {:?}, release {:?}, unwrap {:?})",
        token.label,
        released.iter().filter(|(_, r)| r.is_ok()).count(),
        released.len(),
        cfg.attestation.url,
        timings.transfer_key,
        timings.evidence,
        timings.attestation,
        timings.identity,
        timings.release,
        timings.unwrap
    );
    Ok((released, timings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_without_keys_fails_before_any_io() {
        let text = "[platform]\nevidence = \"auto\"\n[attestation]\nurl = \"https://maa.example\"\n[identity]\nsource = \"imds\"\n[[token]]\nlabel = \"empty\"\n";
        let cfg = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let e = release_token(&cfg, &cfg.tokens[0]).unwrap_err();
        assert_eq!(e.step(), Some(Step::Config));
        assert!(e.message().contains("\"empty\" has no keys"), "{e}");
        assert!(e.hint().is_some());
    }

    #[test]
    fn nonces_are_fresh() {
        let a = random_nonce().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_nonce().unwrap());
    }

    #[test]
    fn b64url_keeps_trailing_zero_bytes_and_accepts_padding() {
        let bytes = [0xffu8, 0, 0];
        let s = b64url(&bytes);
        assert_eq!(b64url_decode(&s).unwrap(), bytes);
        assert_eq!(b64url_decode(&format!("{s}=")).unwrap_or_default(), bytes);
        assert_eq!(b64url_decode("AAEAAQ==").unwrap(), vec![0, 1, 0, 1]);
        assert!(b64url_decode("a+b/").is_none());
    }
}
