//! The vTPM of an Azure confidential VM (platform-evidence §6.2–§6.7), through tss-esapi 7 over
//! the system's libtss2. Device I/O, so it lives in `release/`.
//!
//! What it does: read the HCL report (NV 0x01400001) and the AK certificate (NV 0x01C101D0);
//! write the 64 bytes of user-data (NV 0x01400002) and read back an HCL report that echoes
//! them; quote PCRs with the AK (0x81000003); create the ephemeral RSA-2048 decryption key in
//! the NULL hierarchy under a PolicyPCR authPolicy, certify it with the AK, and RSA-decrypt
//! with it under a policy session.
//!
//! Every transient object and session is flushed on every path: `Scope` (per call) and
//! `TpmTransferKey` (the key, for the life of a login) flush in `Drop`. Sessions are given per
//! call, never set globally (§6.7 pitfall 1: StartAuthSession with a password session set
//! fails with TPM_RC_HANDLE).

use super::evidence::hcl::{self, HclReport, USER_DATA_LEN};
use super::evidence::tpm_attest::{Attested, TpmsAttest};
use crate::crypto::evidence_sig::verify_rsa_pkcs1_sha256;
use crate::crypto::HashAlg;
use crate::error::{Error, Result, Step};
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::time::Duration;
use tss_esapi::abstraction::nv;
use tss_esapi::attributes::{
    NvIndexAttributesBuilder, ObjectAttributesBuilder, SessionAttributesBuilder,
};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, PersistentTpmHandle, SessionHandle,
    TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, HashScheme, MaxNvBuffer, NvPublicBuilder, PcrSelectSize,
    PcrSelectionList, PcrSlot, Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
    RsaDecryptionScheme, RsaExponent, RsaScheme, Signature, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;
use zeroize::Zeroizing;

/// The kernel resource manager (MSGA's choice; §6.7 pitfall 4).
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The vTPM's attestation key, persisted by Azure (§6.2).
pub const AK_HANDLE: u32 = 0x8100_0003;
/// The AK certificate from Azure's vTPM CA (DER X.509).
pub const NV_AK_CERT: u32 = 0x01C1_01D0;
/// The PCRs AzureGuest attests on Linux (§6.6 step 3) and the ephemeral key's policy covers.
pub const ATTESTED_PCRS: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// How long to wait for the HCL to refresh its report after a user-data write. When it does is
/// [uncertain] (§6.4, open question 1: Kinvolk sleeps 3 s, Microsoft's Python client reads at
/// once). Safest reading: read at once, then retry with backoff, and never accept a report that
/// does not echo our user-data.
#[derive(Debug, Clone, Copy)]
pub struct EchoWait {
    /// Reads of NV 0x01400001 in all (at least one).
    pub attempts: u32,
    /// Delay before the second read; doubled for each further read.
    pub first_delay: Duration,
    /// Upper bound of one delay.
    pub max_delay: Duration,
}

impl EchoWait {
    /// One read, no wait (doctor, which reports what it sees now).
    pub const ONCE: EchoWait = EchoWait {
        attempts: 1,
        first_delay: Duration::ZERO,
        max_delay: Duration::ZERO,
    };
}

impl Default for EchoWait {
    /// 6 reads over at most 0.25 + 0.5 + 1 + 2 + 3 = 6.75 s.
    fn default() -> Self {
        EchoWait {
            attempts: 6,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(3),
        }
    }
}

/// RSA decryption schemes the transfer key is used with (§6.6 steps 9 and 11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecryptScheme {
    /// RSA-OAEP with SHA-256 and an empty label: AKV's RSA_AES_KEY_WRAP_256 first step.
    OaepSha256,
    /// RSA-OAEP with SHA-1 (CKM_RSA_AES_KEY_WRAP) or SHA-384 (RSA_AES_KEY_WRAP_384), empty label.
    OaepSha1,
    OaepSha384,
    /// RSAES-PKCS1-v1_5: MAA's sealed AzureGuest response key.
    RsaEs,
}

/// An RSA public key as the TPM holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmRsaPublic {
    /// Marshalled TPM2B_PUBLIC (what AzureGuest's `AikPub` / `EncKeyPub` carry).
    pub tpm2b_public: Vec<u8>,
    /// Modulus, big-endian.
    pub n: Vec<u8>,
    /// Public exponent, big-endian (the TPM's 0 means 65537).
    pub e: Vec<u8>,
    /// The `restricted` object attribute. Whether Azure's AK is restricted is [uncertain]
    /// (§6.2): it is shown by doctor, not required here; MAA judges the AK by its certificate.
    pub restricted: bool,
}

/// A PCR quote by the AK.
#[derive(Debug, Clone)]
pub struct PcrQuote {
    /// TPMS_ATTEST, exactly as signed.
    pub attest: Vec<u8>,
    /// RSASSA-PKCS#1 v1.5 / SHA-256 signature over `attest`.
    pub signature: Vec<u8>,
    /// (index, SHA-256 value) of each quoted PCR, read right after the quote and checked
    /// against its PCR digest.
    pub pcrs: Vec<(u8, [u8; 32])>,
}

fn tpm_error(what: &str, e: tss_esapi::Error) -> Error {
    let kind = match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    };
    let hint = match kind {
        Some(Tss2ResponseCodeKind::Lockout) => {
            "the TPM is in dictionary-attack lockout; wait for the lockout to expire (or have the owner reset it) and retry"
        }
        Some(
            Tss2ResponseCodeKind::Retry
            | Tss2ResponseCodeKind::Yielded
            | Tss2ResponseCodeKind::Testing,
        ) => "the TPM was busy; retry the login",
        Some(Tss2ResponseCodeKind::NvUninitialized) => {
            "the vTPM has not written this NV index yet (Azure's tools report it as code 330), typically just after boot; retry the login; if it persists: for 0x01400001 (the HCL report, written by the paravisor) restart the VM, for 0x01C101D0 (the AK certificate) install or refresh the guest attestation extension"
        }
        _ => "the vTPM refused a command of the Azure CVM attestation path; check that this is an Azure confidential VM with a current guest attestation extension",
    };
    Error::evidence(Step::Evidence, format!("TPM: {what} failed: {e}")).with_hint(hint)
}

/// TPM_RC_NV_UNINITIALIZED: the index is defined but was never written. An Azure vTPM answers
/// it (Azure's tools print "code=330") while the paravisor has not yet written the HCL report or
/// the AK certificate, typically early after boot: worth a bounded wait, never a hang.
fn is_nv_uninitialized(e: &tss_esapi::Error) -> bool {
    matches!(
        e,
        tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Tss2ResponseCodeKind::NvUninitialized)
    )
}

const HCL_UNREADABLE_HINT: &str = "NV index 0x01400001 (the HCL report) cannot be read: this is not an Azure confidential VM vTPM, or the guest lacks owner access to it";

/// Whether `tpm_error` gives this error a hint of its own (lockout, busy, not written), which a
/// caller's generic "cannot read" hint must not replace.
fn has_specific_hint(e: &tss_esapi::Error) -> bool {
    is_transient(e)
        || is_nv_uninitialized(e)
        || matches!(
            e,
            tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Tss2ResponseCodeKind::Lockout)
        )
}

/// "1 read", "6 reads over the wait".
fn reads(n: u32) -> String {
    if n == 1 {
        "1 read".into()
    } else {
        format!("{n} reads over the wait")
    }
}

/// Busy answers are retried a few times; anything else is returned at once.
fn is_transient(e: &tss_esapi::Error) -> bool {
    matches!(
        e,
        tss_esapi::Error::Tss2Error(rc) if matches!(
            rc.kind(),
            Some(
                Tss2ResponseCodeKind::Retry
                    | Tss2ResponseCodeKind::Yielded
                    | Tss2ResponseCodeKind::Testing
            )
        )
    )
}

fn with_busy_retry<T>(
    mut f: impl FnMut() -> std::result::Result<T, tss_esapi::Error>,
) -> std::result::Result<T, tss_esapi::Error> {
    let mut delay = Duration::from_millis(20);
    for _ in 0..4 {
        match f() {
            Err(e) if is_transient(&e) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            other => return other,
        }
    }
    f()
}

/// SHA-256 bank, `pcrs` strictly ascending (the order of a quote's PCR digest).
fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    if pcrs.is_empty() || pcrs.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::general(format!(
            "PCR list {pcrs:?} must be non-empty and strictly ascending"
        )));
    }
    let slots = pcrs
        .iter()
        .map(|i| {
            1u32.checked_shl(u32::from(*i))
                .and_then(|bit| PcrSlot::try_from(bit).ok())
                .ok_or_else(|| Error::general(format!("PCR {i} is not a TPM PCR slot")))
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionList::builder()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| tpm_error("building the PCR selection", e))
}

fn rsa_public(public: &Public) -> Result<TpmRsaPublic> {
    let Public::Rsa {
        parameters,
        unique,
        object_attributes,
        ..
    } = public
    else {
        return Err(Error::evidence(
            Step::Evidence,
            "TPM: the key is not an RSA key",
        ));
    };
    let tpm2b_public = tss_esapi::structures::PublicBuffer::try_from(public.clone())
        .and_then(|b| b.marshall())
        .map_err(|e| tpm_error("marshalling TPM2B_PUBLIC", e))?;
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    let e = exponent.to_be_bytes();
    let first = e.iter().position(|b| *b != 0).unwrap_or(3);
    Ok(TpmRsaPublic {
        tpm2b_public,
        n: unique.value().to_vec(),
        e: e[first..].to_vec(),
        restricted: object_attributes.restricted(),
    })
}

/// What a `Scope` releases when it ends.
enum Held {
    /// Transient objects and sessions: TPM2_FlushContext.
    Flush(ObjectHandle),
    /// ESYS handles of persistent objects and NV indices: Esys_TR_Close (no TPM command).
    Close(ObjectHandle),
}

/// The context for one operation, releasing what it tracked on every path (errors and unwinding
/// included), last acquired first.
struct Scope<'a> {
    ctx: &'a mut Context,
    held: Vec<Held>,
}

impl<'a> Scope<'a> {
    fn new(ctx: &'a mut Context) -> Self {
        Scope {
            ctx,
            held: Vec::new(),
        }
    }
    fn flush_later(&mut self, h: ObjectHandle) {
        self.held.push(Held::Flush(h));
    }
    fn close_later(&mut self, h: ObjectHandle) {
        self.held.push(Held::Close(h));
    }
    /// A policy (or trial) session with SHA-256, flushed at the end of the scope.
    fn policy_session(&mut self, trial: bool) -> Result<PolicySession> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                if trial {
                    SessionType::Trial
                } else {
                    SessionType::Policy
                },
                SymmetricDefinition::Null,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| tpm_error("TPM2_StartAuthSession", e))?
            .ok_or_else(|| Error::evidence(Step::Evidence, "TPM: no session was started"))?;
        self.flush_later(SessionHandle::from(session).into());
        PolicySession::try_from(session).map_err(|e| tpm_error("policy session", e))
    }
    /// The ESYS handle of a persistent object (e.g. the AK), closed at the end of the scope.
    fn persistent(&mut self, handle: u32) -> Result<KeyHandle> {
        let tpm_handle =
            PersistentTpmHandle::new(handle).map_err(|e| tpm_error("persistent handle", e))?;
        let h = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle)))
            .map_err(|e| {
                tpm_error(&format!("reading persistent object 0x{handle:08x}"), e).with_hint(
                    "no attestation key at 0x81000003: this is not an Azure vTPM, or its guest attestation provisioning is missing",
                )
            })?;
        self.close_later(h);
        Ok(h.into())
    }
}

impl Deref for Scope<'_> {
    type Target = Context;
    fn deref(&self) -> &Context {
        self.ctx
    }
}
impl DerefMut for Scope<'_> {
    fn deref_mut(&mut self) -> &mut Context {
        self.ctx
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        while let Some(h) = self.held.pop() {
            let result = match h {
                Held::Flush(h) => self.ctx.flush_context(h),
                Held::Close(mut h) => self.ctx.tr_close(&mut h),
            };
            if let Err(e) = result {
                log::warn!("TPM: releasing a handle failed: {e}");
            }
        }
    }
}

/// An open TPM.
pub struct Tpm {
    ctx: Context,
}

impl Tpm {
    /// Open the TPM named by a tpm2-tss TCTI string (default the kernel resource manager). A
    /// missing or inaccessible device is reported as such, with a hint, before libtss2 tries.
    pub fn open(tcti: Option<&str>) -> Result<Tpm> {
        let tcti = tcti.unwrap_or(DEFAULT_TCTI);
        let name = TctiNameConf::from_str(tcti).map_err(|_| {
            Error::config(format!(
                "platform.tpm_tcti = \"{tcti}\" is not a TCTI (device:PATH, swtpm:host=H,port=P, mssim:…, tabrmd:…)"
            ))
        })?;
        if let Some(path) = tcti
            .strip_prefix("device:")
            .or((tcti == "device").then_some("/dev/tpm0"))
        {
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => "this machine has no TPM at that path: on an Azure confidential VM the vTPM is /dev/tpmrm0; elsewhere choose another platform.evidence",
                    std::io::ErrorKind::PermissionDenied => "add the user running the module to the tss group (or run as root) so that it may open the TPM resource manager",
                    _ => "check platform.tpm_tcti and that the TPM device works",
                };
                return Err(Error::evidence(
                    Step::Evidence,
                    format!("TPM: cannot open {path}: {e}"),
                )
                .with_hint(hint));
            }
        }
        let ctx = Context::new(name)
            .map_err(|e| tpm_error(&format!("opening the TCTI \"{tcti}\""), e))?;
        Ok(Tpm { ctx })
    }

    /// The ESAPI context itself: for provisioning a simulated vTPM (tests, skr-emulator) and
    /// for commands this layer does not wrap.
    #[doc(hidden)]
    pub fn esys(&mut self) -> &mut Context {
        &mut self.ctx
    }

    /// Read a whole NV index with owner authorization (empty on Azure and on a fresh swtpm).
    pub fn nv_read(&mut self, index: u32) -> Result<Vec<u8>> {
        self.nv_read_tss(index)
            .map_err(|e| tpm_error(&format!("reading NV index 0x{index:08x}"), e))
    }

    fn nv_read_tss(&mut self, index: u32) -> std::result::Result<Vec<u8>, tss_esapi::Error> {
        let handle = NvIndexTpmHandle::new(index)?;
        with_busy_retry(|| {
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    nv::read_full(c, NvAuth::Owner, handle)
                })
        })
    }

    /// Read an NV index the paravisor or the guest attestation extension writes, waiting
    /// (bounded by `wait`) while it answers TPM_RC_NV_UNINITIALIZED. Any other error is
    /// returned at once, with `unreadable_hint`.
    fn nv_read_written(
        &mut self,
        index: u32,
        wait: EchoWait,
        unreadable_hint: &'static str,
    ) -> Result<Vec<u8>> {
        let attempts = wait.attempts.max(1);
        let mut delay = wait.first_delay;
        let mut attempt = 1;
        loop {
            match self.nv_read_tss(index) {
                Err(e) if is_nv_uninitialized(&e) && attempt < attempts => {
                    log::debug!(
                        "TPM: NV index 0x{index:08x} is not written yet (code 330), read {attempt} of {attempts}; retrying"
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(wait.max_delay);
                    attempt += 1;
                }
                Err(e) if is_nv_uninitialized(&e) => {
                    return Err(tpm_error(
                        &format!("reading NV index 0x{index:08x} ({})", reads(attempts)),
                        e,
                    ));
                }
                other => {
                    return other.map_err(|e| {
                        let specific = has_specific_hint(&e);
                        let e = tpm_error(&format!("reading NV index 0x{index:08x}"), e);
                        if specific {
                            e
                        } else {
                            e.with_hint(unreadable_hint)
                        }
                    });
                }
            }
        }
    }

    /// Whether an NV index is defined (TPM2_GetCapability, so that a missing index is an
    /// answer rather than a TPM error logged by libtss2).
    pub fn nv_defined(&mut self, index: u32) -> Result<bool> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, index, 1))
            .map_err(|e| tpm_error("TPM2_GetCapability (NV indices)", e))?;
        Ok(match data {
            CapabilityData::Handles(list) => list
                .into_inner()
                .first()
                .is_some_and(|h| u32::from(*h) == index),
            _ => false,
        })
    }

    /// The HCL report as it is now (NV 0x01400001), waiting (bounded by `wait`) while the
    /// paravisor has not written it yet.
    pub fn hcl_report(&mut self, wait: EchoWait) -> Result<Vec<u8>> {
        self.nv_read_written(hcl::NV_HCL_REPORT, wait, HCL_UNREADABLE_HINT)
    }

    /// The AK certificate (DER) from NV 0x01C101D0, waiting (bounded by `wait`) while the
    /// guest attestation extension has not written it yet.
    pub fn ak_certificate(&mut self, wait: EchoWait) -> Result<Vec<u8>> {
        let der = self.nv_read_written(
            NV_AK_CERT,
            wait,
            "no vTPM AK certificate at NV 0x01C101D0: install or refresh the VM's guest attestation extension",
        )?;
        if der.first() != Some(&0x30) {
            return Err(Error::evidence(
                Step::Evidence,
                "TPM: NV 0x01C101D0 does not hold a DER certificate",
            )
            .with_hint(
                "refresh the VM's guest attestation extension (it renews the AK certificate)",
            ));
        }
        Ok(der)
    }

    /// Write the user-data index (0x01400002), defining it as 64 bytes of owner/auth
    /// read-write NV if it is absent or of another size (§6.4).
    pub fn write_user_data(&mut self, data: &[u8; USER_DATA_LEN]) -> Result<()> {
        let index =
            NvIndexTpmHandle::new(hcl::NV_USER_DATA).map_err(|e| tpm_error("NV handle", e))?;
        let defined = self.nv_defined(hcl::NV_USER_DATA)?;
        let mut scope = Scope::new(&mut self.ctx);
        let nv_handle: NvIndexHandle = if defined {
            let h = scope
                .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(index)))
                .map_err(|e| tpm_error("opening NV index 0x01400002", e))?;
            {
                let (public, _) = scope
                    .execute_without_session(|c| c.nv_read_public(NvIndexHandle::from(h)))
                    .map_err(|e| tpm_error("TPM2_NV_ReadPublic of 0x01400002", e))?;
                if public.data_size() == USER_DATA_LEN {
                    scope.close_later(h);
                    NvIndexHandle::from(h)
                } else {
                    // Undefining also invalidates the ESYS handle.
                    scope
                        .execute_with_session(Some(AuthSession::Password), |c| {
                            c.nv_undefine_space(Provision::Owner, NvIndexHandle::from(h))
                        })
                        .map_err(|e| tpm_error("TPM2_NV_UndefineSpace of 0x01400002", e))?;
                    define_user_data(&mut scope, index)?
                }
            }
        } else {
            define_user_data(&mut scope, index)?
        };
        let buffer = MaxNvBuffer::try_from(data.to_vec()).map_err(|e| tpm_error("NV buffer", e))?;
        with_busy_retry(|| {
            scope.execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_write(NvAuth::Owner, nv_handle, buffer.clone(), 0)
            })
        })
        .map_err(|e| tpm_error("TPM2_NV_Write of 0x01400002 (user-data)", e))
    }

    /// Write `user_data`, then read the HCL report until its claims echo it (bounded by
    /// `wait`). Returns the report bytes, parsed and bound (the claims' SHA-256 in the
    /// hardware report data) — never a report that does not carry our user-data.
    pub fn fresh_hcl_report(
        &mut self,
        user_data: &[u8; USER_DATA_LEN],
        wait: EchoWait,
    ) -> Result<Vec<u8>> {
        self.write_user_data(user_data)?;
        let mut delay = wait.first_delay;
        let attempts = wait.attempts.max(1);
        let mut last = String::new();
        let mut unwritten = None;
        for attempt in 1..=attempts {
            // Not written yet (code 330) counts as "no echo yet": one wait for both.
            let bytes = match self.nv_read_tss(hcl::NV_HCL_REPORT) {
                Err(e) if is_nv_uninitialized(&e) => {
                    last = "no report: the index was not written (TPM_RC_NV_UNINITIALIZED)".into();
                    unwritten = Some(e);
                    if attempt < attempts {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(wait.max_delay);
                    }
                    continue;
                }
                other => other.map_err(|e| {
                    let specific = has_specific_hint(&e);
                    let e = tpm_error("reading NV index 0x01400001 (the HCL report)", e);
                    if specific {
                        e
                    } else {
                        e.with_hint(HCL_UNREADABLE_HINT)
                    }
                })?,
            };
            unwritten = None;
            let report = HclReport::parse(&bytes)?;
            report.check_binding()?;
            if report.user_data_echoes(user_data) {
                return Ok(bytes);
            }
            last = match report.claims.user_data {
                Some(u) => format!("user-data {}…", &hcl::user_data_hex(&u)[..16]),
                None => "no user-data".into(),
            };
            if attempt < attempts {
                std::thread::sleep(delay);
                delay = (delay * 2).min(wait.max_delay);
            }
        }
        if let Some(e) = unwritten {
            return Err(tpm_error(
                &format!(
                    "reading NV index 0x01400001 (the HCL report; {})",
                    reads(attempts)
                ),
                e,
            ));
        }
        Err(Error::evidence(
            Step::Evidence,
            format!(
                "TPM: the HCL report never echoed the user-data written to NV 0x01400002 ({attempts} reads; the last had {last})"
            ),
        )
        .with_hint("the paravisor did not refresh the HCL report; retry the login, and if it persists check the VM's guest attestation support (Azure confidential VM with a current HCL)"))
    }

    /// The AK's public key (TPM2_ReadPublic of 0x81000003).
    pub fn ak_public(&mut self) -> Result<TpmRsaPublic> {
        let mut scope = Scope::new(&mut self.ctx);
        let ak = scope.persistent(AK_HANDLE)?;
        let (public, _, _) = scope
            .execute_without_session(|c| c.read_public(ak))
            .map_err(|e| tpm_error("TPM2_ReadPublic of the AK", e))?;
        rsa_public(&public)
    }

    /// TPM2_Quote of SHA-256 `pcrs` with the AK over `nonce` (≤ 64 bytes), then TPM2_PCR_Read
    /// of the same PCRs; the values read must produce the quote's PCR digest (else the PCRs
    /// changed in between, and the quote is refused rather than sent with wrong values).
    pub fn quote(&mut self, nonce: &[u8], pcrs: &[u8]) -> Result<PcrQuote> {
        let selection = pcr_selection(pcrs)?;
        let nonce = Data::try_from(nonce.to_vec()).map_err(|_| {
            Error::general(format!("quote nonce of {} bytes (at most 64)", nonce.len()))
        })?;
        let mut scope = Scope::new(&mut self.ctx);
        let ak = scope.persistent(AK_HANDLE)?;
        let (attest, signature) = with_busy_retry(|| {
            scope.execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(ak, nonce.clone(), SignatureScheme::Null, selection.clone())
            })
        })
        .map_err(|e| tpm_error("TPM2_Quote with the AK", e))?;
        let signature = rsassa_bytes(signature, "quote")?;
        let attest = attest
            .marshall()
            .map_err(|e| tpm_error("marshalling TPMS_ATTEST", e))?;
        let values = read_pcrs(&mut scope, pcrs)?;
        let parsed = TpmsAttest::parse(&attest)?;
        let slots = values
            .iter()
            .map(|(i, _)| usize::from(*i) + 1)
            .max()
            .unwrap_or(0);
        let mut by_index = vec![[0u8; 32]; slots];
        for (i, v) in &values {
            by_index[usize::from(*i)] = *v;
        }
        parsed.check_pcr_digest(&by_index).map_err(|_| {
            Error::evidence(
                Step::Evidence,
                "TPM: PCR values changed between the quote and the PCR read",
            )
            .with_hint("something extended a PCR during the login; retry")
        })?;
        Ok(PcrQuote {
            attest,
            signature,
            pcrs: values,
        })
    }

    /// Create the ephemeral transfer key (§6.6 step 6) over the current values of `pcrs` and
    /// certify it with the AK. The key stays loaded until the returned value is dropped.
    pub fn create_transfer_key(mut self, pcrs: &[u8]) -> Result<TpmTransferKey> {
        let loaded = self.load_transfer_key(pcrs)?;
        Ok(TpmTransferKey {
            tpm: Some(self),
            key: Some(loaded.key),
            session: None,
            selection: loaded.selection,
            public: loaded.public,
            certify_info: loaded.certify_info,
            certify_signature: loaded.certify_signature,
            certify_time: loaded.certify_time,
        })
    }

    /// Create and certify the transfer key, then flush it: the whole TPM side of the key
    /// without keeping it (`skr-pkcs11 doctor`).
    pub fn probe_transfer_key(&mut self, pcrs: &[u8]) -> Result<CertifiedKey> {
        let loaded = self.load_transfer_key(pcrs)?;
        self.ctx
            .flush_context(loaded.key.into())
            .map_err(|e| tpm_error("flushing the transfer key", e))?;
        Ok(CertifiedKey {
            public: loaded.public,
            certify_info: loaded.certify_info,
            certify_signature: loaded.certify_signature,
        })
    }

    /// On success the key is loaded and the caller owns its flush; on any error nothing is
    /// left (the scope flushes the key and the trial session).
    fn load_transfer_key(&mut self, pcrs: &[u8]) -> Result<LoadedTransferKey> {
        let selection = pcr_selection(pcrs)?;
        let mut scope = Scope::new(&mut self.ctx);
        let policy_digest = {
            let trial = scope.policy_session(true)?;
            pcr_policy(&mut scope, trial, &selection)?;
            scope
                .policy_get_digest(trial)
                .map_err(|e| tpm_error("TPM2_PolicyGetDigest", e))?
        };
        let template = transfer_key_template(policy_digest)?;
        let created = with_busy_retry(|| {
            scope.execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Null, template.clone(), None, None, None, None)
            })
        })
        .map_err(|e| tpm_error("TPM2_CreatePrimary of the transfer key (NULL hierarchy)", e))?;
        let key = created.key_handle;
        scope.flush_later(key.into());
        let public = rsa_public(&created.out_public)?;
        let ak = scope.persistent(AK_HANDLE)?;
        let certify_started = std::time::Instant::now();
        // Certify: the key in the ADMIN role (authValue allowed: adminWithPolicy is clear), the AK.
        let (certify_info, certify_signature) = scope
            .execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.certify(key.into(), ak, Data::default(), SignatureScheme::Null),
            )
            .map_err(|e| tpm_error("TPM2_Certify of the transfer key with the AK", e))?;
        let certify_time = certify_started.elapsed();
        let certify_signature = rsassa_bytes(certify_signature, "certify")?;
        let certify_info = certify_info
            .marshall()
            .map_err(|e| tpm_error("marshalling TPMS_ATTEST", e))?;
        // Success: the key is handed over, the scope must not flush it.
        scope
            .held
            .retain(|h| !matches!(h, Held::Flush(o) if *o == ObjectHandle::from(key)));
        Ok(LoadedTransferKey {
            key,
            selection,
            public,
            certify_info,
            certify_signature,
            certify_time,
        })
    }
}

/// A key's public part and the AK's TPM2_Certify of it.
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    pub public: TpmRsaPublic,
    /// TPMS_ATTEST (type certify) and its RSASSA / SHA-256 signature by the AK.
    pub certify_info: Vec<u8>,
    pub certify_signature: Vec<u8>,
}

impl CertifiedKey {
    /// The certify is signed by `ak` and names exactly this key (nameAlg SHA-256 ‖
    /// SHA-256(TPMT_PUBLIC)): what MAA checks of `EncKeyCertifyInfo` (§6.6).
    pub fn verify(&self, ak: &TpmRsaPublic) -> Result<()> {
        verify_certify(
            &self.public,
            &self.certify_info,
            &self.certify_signature,
            ak,
        )
    }
}

/// Check a TPM2_Certify of `key` by `ak` (see `CertifiedKey::verify`).
pub fn verify_certify(
    key: &TpmRsaPublic,
    certify_info: &[u8],
    certify_signature: &[u8],
    ak: &TpmRsaPublic,
) -> Result<()> {
    verify_rsa_pkcs1_sha256(&ak.n, &ak.e, certify_info, certify_signature).map_err(|_| {
        Error::integrity(
            Step::Evidence,
            "TPM: the transfer key's certification is not signed by the AK",
        )
    })?;
    let attest = TpmsAttest::parse(certify_info)?;
    let Attested::Certify { name, .. } = attest.attested else {
        return Err(Error::integrity(
            Step::Evidence,
            "TPM: the transfer key's certification is not a TPM2_Certify",
        ));
    };
    if name != key.name_sha256() {
        return Err(Error::integrity(
            Step::Evidence,
            "TPM: the AK certified another key than the transfer key",
        ));
    }
    Ok(())
}

impl TpmRsaPublic {
    /// The TPM name of the key: TPM_ALG_SHA256 ‖ SHA-256(TPMT_PUBLIC), the TPMT_PUBLIC being
    /// the TPM2B_PUBLIC without its size.
    pub fn name_sha256(&self) -> Vec<u8> {
        let mut name = vec![0x00, 0x0b];
        name.extend(HashAlg::Sha256.digest(self.tpm2b_public.get(2..).unwrap_or_default()));
        name
    }
}

/// The AK must be the key the HCL report's runtime claims carry as `HCLAkPub`: that is what
/// binds the TPM quote to the hardware report (MAA checks it; checking first gives a precise
/// error).
pub fn check_ak_is_hcl_akpub(report: &HclReport<'_>, ak: &TpmRsaPublic) -> Result<()> {
    let akpub = report
        .claims
        .key(hcl::KID_AK)
        .and_then(|k| k.rsa.as_ref())
        .ok_or_else(|| Error::evidence(Step::Evidence, "HCL report: no RSA HCLAkPub"))?;
    let strip = |b: &[u8]| -> Vec<u8> {
        let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[first..].to_vec()
    };
    if strip(&akpub.0) != strip(&ak.n) || strip(&akpub.1) != strip(&ak.e) {
        return Err(Error::integrity(
            Step::Evidence,
            "TPM: the AK at 0x81000003 is not the HCLAkPub of the HCL report",
        )
        .with_hint("the vTPM's AK and its HCL report disagree: this is not the vTPM the report was made for"));
    }
    Ok(())
}

/// `skr-pkcs11 doctor`'s TPM rows: each step of the Azure CVM path that does not change the
/// VM's state (no user-data write), each result checked. Stops after a failed open.
pub fn doctor_steps(tcti: Option<&str>) -> Vec<(&'static str, Result<String>)> {
    let mut rows = Vec::new();
    let mut tpm = match Tpm::open(tcti) {
        Ok(t) => {
            rows.push(("tpm", Ok(format!("{} open", tcti.unwrap_or(DEFAULT_TCTI)))));
            t
        }
        Err(e) => {
            rows.push(("tpm", Err(e)));
            return rows;
        }
    };
    let report = tpm.hcl_report(EchoWait::ONCE);
    rows.push((
        "tpm hcl report",
        report.as_ref().map_err(Clone::clone).and_then(|bytes| {
            let h = HclReport::parse(bytes)?;
            h.check_binding()?;
            let kids: Vec<&str> = h.claims.keys.iter().map(|k| k.kid.as_str()).collect();
            Ok(format!(
                "{} HCL report v{}, runtime claims bound, keys {}{}",
                match h.report_type {
                    hcl::HardwareReportType::Snp => "SEV-SNP",
                    hcl::HardwareReportType::Tdx => "TDX",
                },
                h.version,
                kids.join(", "),
                if h.claims.user_data.is_some() {
                    ", user-data"
                } else {
                    ""
                }
            ))
        }),
    ));
    let ak = tpm.ak_public();
    rows.push((
        "tpm ak",
        ak.as_ref().map_err(Clone::clone).and_then(|ak| {
            let cert = tpm.ak_certificate(EchoWait::ONCE)?;
            if let Ok(bytes) = &report {
                check_ak_is_hcl_akpub(&HclReport::parse(bytes)?, ak)?;
            }
            Ok(format!(
                "AK 0x81000003 RSA-{} ({}) = HCLAkPub; certificate at 0x01C101D0 ({} bytes)",
                8 * ak.n.len(),
                if ak.restricted {
                    "restricted"
                } else {
                    "not restricted"
                },
                cert.len()
            ))
        }),
    ));
    let Ok(ak) = ak else {
        return rows;
    };
    rows.push(("tpm quote", {
        let mut nonce = [0u8; 32];
        crate::crypto::random(&mut nonce).and_then(|()| {
            let q = tpm.quote(&nonce, &ATTESTED_PCRS)?;
            verify_rsa_pkcs1_sha256(&ak.n, &ak.e, &q.attest, &q.signature)?;
            if TpmsAttest::parse(&q.attest)?.extra_data != nonce {
                return Err(Error::integrity(
                    Step::Evidence,
                    "TPM: the quote does not carry our nonce",
                ));
            }
            Ok("PCRs 0-7 quoted by the AK; signature, nonce and PCR digest verified".into())
        })
    }));
    rows.push((
        "tpm transfer key",
        tpm.probe_transfer_key(&ATTESTED_PCRS).and_then(|k| {
            k.verify(&ak)?;
            Ok(format!(
                "RSA-{} created in the NULL hierarchy under PolicyPCR(0-7), certified by the AK, flushed",
                8 * k.public.n.len()
            ))
        }),
    ));
    rows
}

struct LoadedTransferKey {
    key: KeyHandle,
    selection: PcrSelectionList,
    public: TpmRsaPublic,
    certify_info: Vec<u8>,
    certify_signature: Vec<u8>,
    certify_time: std::time::Duration,
}

fn define_user_data(scope: &mut Scope<'_>, index: NvIndexTpmHandle) -> Result<NvIndexHandle> {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .with_auth_write(true)
        .with_auth_read(true)
        .build()
        .map_err(|e| tpm_error("NV attributes", e))?;
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(USER_DATA_LEN)
        .build()
        .map_err(|e| tpm_error("NV public", e))?;
    let h = scope
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.nv_define_space(Provision::Owner, None, public)
        })
        .map_err(|e| tpm_error("TPM2_NV_DefineSpace of 0x01400002 (64 bytes)", e))?;
    scope.close_later(h.into());
    Ok(h)
}

fn rsassa_bytes(signature: Signature, what: &str) -> Result<Vec<u8>> {
    match signature {
        Signature::RsaSsa(s) if s.hashing_algorithm() == HashingAlgorithm::Sha256 => {
            Ok(s.signature().value().to_vec())
        }
        other => Err(Error::evidence(
            Step::Evidence,
            format!(
                "TPM: the AK's {what} signature is {:?}, expected RSASSA with SHA-256",
                other.algorithm()
            ),
        )
        .with_hint("the key at 0x81000003 is not an Azure vTPM AK (RSA-2048, RSASSA / SHA-256)")),
    }
}

fn read_pcrs(scope: &mut Scope<'_>, pcrs: &[u8]) -> Result<Vec<(u8, [u8; 32])>> {
    let mut out = Vec::with_capacity(pcrs.len());
    // One TPM2_PCR_Read returns at most 8 digests (§6.7 row 6).
    for chunk in pcrs.chunks(8) {
        let selection = pcr_selection(chunk)?;
        let (_, selected, digests) = scope
            .execute_without_session(|c| c.pcr_read(selection))
            .map_err(|e| tpm_error("TPM2_PCR_Read", e))?;
        let got: Vec<u8> = selected
            .get_selections()
            .iter()
            .flat_map(|s| {
                s.selected()
                    .into_iter()
                    .map(|slot| u32::from(slot).trailing_zeros() as u8)
            })
            .collect();
        if got != chunk || digests.len() != chunk.len() {
            return Err(Error::evidence(
                Step::Evidence,
                format!("TPM: TPM2_PCR_Read returned PCRs {got:?} for {chunk:?}"),
            ));
        }
        for (i, d) in chunk.iter().zip(digests.value()) {
            let v: [u8; 32] = d.value().try_into().map_err(|_| {
                Error::evidence(
                    Step::Evidence,
                    format!("TPM: PCR {i} is not a SHA-256 value"),
                )
            })?;
            out.push((*i, v));
        }
    }
    Ok(out)
}

fn pcr_policy(
    scope: &mut Scope<'_>,
    session: PolicySession,
    selection: &PcrSelectionList,
) -> Result<()> {
    // An empty digest: the TPM uses its current PCR values.
    scope
        .execute_without_session(|c| c.policy_pcr(session, Digest::default(), selection.clone()))
        .map_err(|e| tpm_error("TPM2_PolicyPCR", e))
}

/// §6.6 step 6: RSA-2048, SHA-256 names, decrypt | fixedTPM | fixedParent |
/// sensitiveDataOrigin | noDA, no userWithAuth (use needs the PCR policy), not restricted,
/// scheme NULL (the caller picks OAEP or RSAES), default exponent.
fn transfer_key_template(policy_digest: Digest) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_decrypt(true)
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_no_da(true)
        .with_user_with_auth(false)
        .with_restricted(false)
        .with_sign_encrypt(false)
        .build()
        .map_err(|e| tpm_error("object attributes", e))?;
    let parameters = PublicRsaParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::Null)
        .with_scheme(RsaScheme::Null)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_decryption_key(true)
        .with_is_signing_key(false)
        .with_restricted(false)
        .build()
        .map_err(|e| tpm_error("RSA parameters", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy_digest)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .map_err(|e| tpm_error("transfer key template", e))
}

/// The ephemeral RSA-2048 key inside the TPM, loaded for one login. Dropping it flushes it.
pub struct TpmTransferKey {
    /// Always Some until `into_tpm` takes it.
    tpm: Option<Tpm>,
    key: Option<KeyHandle>,
    /// The policy session of the decryptions, started at the first and kept (continueSession)
    /// for the next ones: each needs only TPM2_PolicyPCR before it. Flushed with the key, and
    /// after any failed decryption (its policy state is then unknown).
    session: Option<PolicySession>,
    selection: PcrSelectionList,
    pub public: TpmRsaPublic,
    /// TPMS_ATTEST of TPM2_Certify(key, AK) and its RSASSA signature.
    pub certify_info: Vec<u8>,
    pub certify_signature: Vec<u8>,
    /// How long TPM2_Certify took (the benchmark's breakdown).
    pub certify_time: std::time::Duration,
}

impl TpmTransferKey {
    /// The TPM, e.g. to quote with the AK while the key is loaded.
    pub fn tpm(&mut self) -> Result<&mut Tpm> {
        self.tpm
            .as_mut()
            .ok_or_else(|| Error::general("the TPM transfer key was already released"))
    }

    /// Flush the key and give the TPM back (the end of a login that keeps using the TPM).
    pub fn into_tpm(mut self) -> Result<Tpm> {
        let flushed = self.flush();
        let tpm = self
            .tpm
            .take()
            .ok_or_else(|| Error::general("the TPM transfer key was already released"))?;
        flushed.map(|()| tpm)
    }

    fn flush(&mut self) -> Result<()> {
        self.end_session();
        match (self.key.take(), self.tpm.as_mut()) {
            (Some(key), Some(tpm)) => tpm
                .ctx
                .flush_context(key.into())
                .map_err(|e| tpm_error("flushing the transfer key", e)),
            _ => Ok(()),
        }
    }

    fn end_session(&mut self) {
        if let (Some(session), Some(tpm)) = (self.session.take(), self.tpm.as_mut()) {
            if let Err(e) = tpm.ctx.flush_context(SessionHandle::from(session).into()) {
                log::warn!("TPM: flushing the decryption session failed: {e}");
            }
        }
    }

    /// TPM2_RSA_Decrypt with an empty label, under a PolicyPCR session over the same PCRs
    /// (if they changed since the key was created, the TPM refuses: TPM_RC_POLICY_FAIL).
    pub fn decrypt(
        &mut self,
        ciphertext: &[u8],
        scheme: DecryptScheme,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let key = self
            .key
            .ok_or_else(|| Error::general("the TPM transfer key was already released"))?;
        let scheme = match scheme {
            DecryptScheme::OaepSha256 => {
                RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256))
            }
            DecryptScheme::OaepSha1 => {
                RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha1))
            }
            DecryptScheme::OaepSha384 => {
                RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha384))
            }
            DecryptScheme::RsaEs => RsaDecryptionScheme::RsaEs,
        };
        let ct = PublicKeyRsa::try_from(ciphertext.to_vec()).map_err(|_| {
            Error::integrity(
                Step::Unwrap,
                format!(
                    "RSA ciphertext of {} bytes is too long for the TPM key",
                    ciphertext.len()
                ),
            )
        })?;
        let selection = self.selection.clone();
        let tpm = self
            .tpm
            .as_mut()
            .ok_or_else(|| Error::general("the TPM transfer key was already released"))?;
        let session = match self.session {
            Some(s) => s,
            None => {
                // Started outside a Scope: it outlives this call (the key's drop flushes it).
                let started = tpm
                    .ctx
                    .start_auth_session(
                        None,
                        None,
                        None,
                        SessionType::Policy,
                        SymmetricDefinition::Null,
                        HashingAlgorithm::Sha256,
                    )
                    .map_err(|e| tpm_error("TPM2_StartAuthSession", e))?
                    .ok_or_else(|| Error::evidence(Step::Unwrap, "TPM: no session was started"))?;
                // continueSession: the session survives each decryption (the TPM resets its
                // policy state after a successful use).
                let (attributes, mask) = SessionAttributesBuilder::new()
                    .with_continue_session(true)
                    .build();
                let s = tpm
                    .ctx
                    .tr_sess_set_attributes(started, attributes, mask)
                    .and_then(|()| PolicySession::try_from(started))
                    .map_err(|e| {
                        let _ = tpm.ctx.flush_context(SessionHandle::from(started).into());
                        tpm_error("policy session", e)
                    })?;
                self.session = Some(s);
                s
            }
        };
        let result = tpm
            .ctx
            .execute_without_session(|c| {
                c.policy_pcr(session, Digest::default(), selection.clone())
            })
            .map_err(|e| tpm_error("TPM2_PolicyPCR", e))
            .and_then(|()| decrypt_under(&mut tpm.ctx, session, key, ct, scheme));
        if result.is_err() {
            self.end_session();
        }
        result
    }
}

/// TPM2_RSA_Decrypt with `session` (its PolicyPCR just satisfied).
fn decrypt_under(
    ctx: &mut Context,
    session: PolicySession,
    key: KeyHandle,
    ct: PublicKeyRsa,
    scheme: RsaDecryptionScheme,
) -> Result<Zeroizing<Vec<u8>>> {
    let plain = ctx
            .execute_with_session(Some(AuthSession::from(session)), |c| {
                c.rsa_decrypt(key, ct, scheme, Data::default())
            })
            .map_err(|e| {
                let policy_failed = matches!(
                    e,
                    tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Tss2ResponseCodeKind::PolicyFail)
                );
                if policy_failed {
                    Error::evidence(
                        Step::Unwrap,
                        "TPM: the PCRs changed since the transfer key was attested; the TPM refuses to decrypt",
                    )
                    .with_hint("something extended a measured PCR during the login; retry the login")
                } else {
                    Error::integrity(Step::Unwrap, format!("TPM: TPM2_RSA_Decrypt failed: {e}"))
                }
            })?;
    // PublicKeyRsa keeps its bytes in a Zeroizing buffer; so does the copy.
    Ok(Zeroizing::new(plain.value().to_vec()))
}

impl Drop for TpmTransferKey {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            log::warn!("{e}");
        }
    }
}
#[cfg(test)]
mod tests {
    fn is_send<T: Send>() {}

    /// C_Login runs the login path on a thread of its own: the TPM and the loaded transfer key
    /// must be able to move there (a compile-time check).
    #[test]
    fn tpm_and_transfer_key_move_across_threads() {
        is_send::<super::Tpm>();
        is_send::<super::TpmTransferKey>();
    }

    #[test]
    fn pcr_lists_must_be_ascending_and_in_range() {
        assert!(super::pcr_selection(&super::ATTESTED_PCRS).is_ok());
        for bad in [&[][..], &[7, 0], &[1, 1], &[40]] {
            assert!(super::pcr_selection(bad).is_err(), "{bad:?}");
        }
    }
}
