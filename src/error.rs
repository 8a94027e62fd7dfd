//! The one error type of the module. Every failure carries the CK_RV it becomes at the C
//! boundary, a message naming the cause, and (for login failures) the step and a hint for the
//! operator. The mapping to CK_RV is decided where the error is made, by the constructor used,
//! so that each failure class has exactly one return value (README "Failures").

use cryptoki_sys::*;
use std::fmt;

/// The step of the login path a failure happened in (for the operator's log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Config,
    TransferKey,
    Evidence,
    Attestation,
    Identity,
    Release,
    Unwrap,
    Install,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Config => "config",
            Step::TransferKey => "transfer-key",
            Step::Evidence => "evidence",
            Step::Attestation => "attestation",
            Step::Identity => "identity",
            Step::Release => "release",
            Step::Unwrap => "unwrap",
            Step::Install => "install",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    rv: CK_RV,
    message: String,
    step: Option<Step>,
    hint: Option<String>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(rv: CK_RV, message: impl Into<String>) -> Self {
        Error {
            rv,
            message: message.into(),
            step: None,
            hint: None,
        }
    }
    pub fn with_step(mut self, step: Step) -> Self {
        self.step = Some(step);
        self
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn rv(&self) -> CK_RV {
        self.rv
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn step(&self) -> Option<Step> {
        self.step
    }
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    // ---- PKCS#11 API misuse (no log noise beyond debug) ----
    pub fn arguments_bad(msg: impl Into<String>) -> Self {
        Self::new(CKR_ARGUMENTS_BAD, msg)
    }
    pub fn general(msg: impl Into<String>) -> Self {
        Self::new(CKR_GENERAL_ERROR, msg)
    }

    // ---- Login failure classes: one CK_RV each (README "Failures") ----
    /// The TEE could not produce evidence, or MAA refused it: the platform is not attestable.
    pub fn evidence(step: Step, msg: impl Into<String>) -> Self {
        Self::new(CKR_DEVICE_ERROR, msg).with_step(step)
    }
    /// A remote service could not be reached or kept failing (network, timeout, 5xx, 429
    /// after retries, 404 / 400 that point at the configuration). Retrying later may work.
    pub fn service(step: Step, msg: impl Into<String>) -> Self {
        Self::new(CKR_FUNCTION_FAILED, msg).with_step(step)
    }
    /// The release was refused: policy not met (403), identity not authorised (401/403).
    pub fn denied(step: Step, msg: impl Into<String>) -> Self {
        Self::new(CKR_FUNCTION_REJECTED, msg).with_step(step)
    }
    /// A response failed verification (MAA token, release JWS, unwrap, key mismatch,
    /// malformed body). Treated as a security failure; never retried.
    pub fn integrity(step: Step, msg: impl Into<String>) -> Self {
        Self::new(CKR_GENERAL_ERROR, msg).with_step(step)
    }
    /// Invalid or unreadable configuration.
    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(CKR_GENERAL_ERROR, msg).with_step(Step::Config)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(step) = self.step {
            write!(f, "step={} ", step.name())?;
        }
        write!(f, "cause: {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}
