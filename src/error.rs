//! The one error type of the module.
//!
//! Every failure has a **kind** (its class: what an operator or an application must do about
//! it), a message naming the cause, optionally the step of the login path it happened in, a
//! hint for the operator, the error it came from (`source()`), and whether it was already
//! logged. The kind decides the CK_RV in exactly one place, [`ErrorKind::rv`]; integrity
//! failures and configuration errors both become CKR_GENERAL_ERROR there but stay different
//! kinds in code (`kind()`) and in the log line (`class=integrity` / `class=config`).

use cryptoki_sys::*;
use std::fmt;
use std::sync::Arc;

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

/// The class of a failure (README "Failures").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TEE could not produce evidence, or MAA refused it: the platform is not attestable.
    Device,
    /// A remote service could not be reached or kept failing (network, timeout, 5xx, 429
    /// after retries, 404 / 400 that point at the configuration). Retrying later may work.
    Service,
    /// The release was refused: policy not met (403), identity not authorised (401/403).
    Rejected,
    /// A response failed verification (MAA token, release JWS, unwrap, key mismatch,
    /// malformed body). A security failure; never retried.
    Integrity,
    /// Invalid or unreadable configuration.
    Config,
    /// The caller passed a bad argument (NULL pointer, bad length, bad flag).
    Argument,
    /// A failure inside the module (a bug, an engine failure without a better code).
    Internal,
    /// A condition PKCS#11 names precisely (CKR_MECHANISM_INVALID, CKR_BUFFER_TOO_SMALL, ...):
    /// the return value is the class.
    Pkcs11(CK_RV),
}

impl ErrorKind {
    /// The one mapping from class to CK_RV.
    pub fn rv(self) -> CK_RV {
        match self {
            ErrorKind::Device => CKR_DEVICE_ERROR,
            ErrorKind::Service => CKR_FUNCTION_FAILED,
            ErrorKind::Rejected => CKR_FUNCTION_REJECTED,
            ErrorKind::Integrity | ErrorKind::Config | ErrorKind::Internal => CKR_GENERAL_ERROR,
            ErrorKind::Argument => CKR_ARGUMENTS_BAD,
            ErrorKind::Pkcs11(rv) => rv,
        }
    }

    /// The class as the log line shows it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Device => "device",
            ErrorKind::Service => "service",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Integrity => "integrity",
            ErrorKind::Config => "config",
            ErrorKind::Argument => "argument",
            ErrorKind::Internal => "internal",
            ErrorKind::Pkcs11(_) => "pkcs11",
        }
    }

    /// The class of a bare CK_RV (`Error::new`): the codes a kind owns map back to it.
    fn of_rv(rv: CK_RV) -> ErrorKind {
        match rv {
            CKR_ARGUMENTS_BAD => ErrorKind::Argument,
            CKR_GENERAL_ERROR => ErrorKind::Internal,
            rv => ErrorKind::Pkcs11(rv),
        }
    }

    /// What an operator can do about a login failure of this class in this step, when the
    /// error carries no more specific hint.
    fn default_hint(self, step: Option<Step>) -> &'static str {
        match (self, step) {
            (_, Some(Step::Config)) | (ErrorKind::Config, _) => {
                "fix the configuration file (see docs/CONFIG.md)"
            }
            (_, Some(Step::TransferKey)) => "the process could not create its transfer key; check that aws-lc can run here (memory limits, FIPS mode)",
            (ErrorKind::Integrity | ErrorKind::Internal, Some(Step::Evidence)) => "the platform returned evidence that does not bind this login's key; this is a security failure, do not retry blindly",
            (_, Some(Step::Evidence)) => "this host cannot produce SEV-SNP evidence; check platform.evidence and the SNP guest device",
            (_, Some(Step::Identity)) => "the identity endpoint answered something unexpected; check identity.source and its endpoint",
            (ErrorKind::Integrity | ErrorKind::Internal, _) => "a response failed verification; this is treated as a security failure (a proxy or an impostor may be altering responses); check that attestation.url and the kid hosts are the real services and that tls.ca_file is right",
            (ErrorKind::Rejected, _) => "the service refused the request; check the identity's permissions and the key's release policy",
            _ => "retry later; if it persists check network access to MAA, the identity endpoint and AKV",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    step: Option<Step>,
    hint: Option<String>,
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
    logged: bool,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn of_kind(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            step: None,
            hint: None,
            source: None,
            logged: false,
        }
    }
    /// An error with a precise CK_RV (the PKCS#11 conditions); CKR_ARGUMENTS_BAD and
    /// CKR_GENERAL_ERROR become the Argument and Internal kinds.
    pub fn new(rv: CK_RV, message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::of_rv(rv), message)
    }
    pub fn with_step(mut self, step: Step) -> Self {
        self.step = Some(step);
        self
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    /// Keep the error this one was made from (shown after the message, reachable through
    /// `source()`).
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(e));
        self
    }
    /// Prefix the message with what was being done ("release of \"tls-rsa\": ...").
    pub fn context(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
    /// This failure has been logged in its own format (C_Login's one line per failure):
    /// the C boundary does not log it again.
    pub fn mark_logged(mut self) -> Self {
        self.logged = true;
        self
    }
    pub fn is_logged(&self) -> bool {
        self.logged
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn rv(&self) -> CK_RV {
        self.kind.rv()
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn step(&self) -> Option<Step> {
        self.step
    }
    /// The hint given where the error was made, or else, for a failure of a login step, the
    /// one of its class and step (every login failure has one; API misuse has none).
    pub fn hint(&self) -> Option<&str> {
        match (&self.hint, self.step) {
            (Some(h), _) => Some(h),
            (None, Some(step)) => Some(self.kind.default_hint(Some(step))),
            (None, None) => None,
        }
    }
    /// Fix the hint of a login failure made without a step to its class's default (the login
    /// path gives every failure a hint).
    pub fn with_default_hint(self) -> Self {
        if self.hint().is_some() {
            return self;
        }
        let hint = self.kind.default_hint(self.step);
        self.with_hint(hint)
    }

    // ---- PKCS#11 API misuse (no log noise beyond debug) ----
    pub fn arguments_bad(msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Argument, msg)
    }
    pub fn general(msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Internal, msg)
    }

    // ---- Login failure classes (README "Failures") ----
    /// The TEE could not produce evidence, or MAA refused it: the platform is not attestable.
    pub fn evidence(step: Step, msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Device, msg).with_step(step)
    }
    /// A remote service could not be reached or kept failing.
    pub fn service(step: Step, msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Service, msg).with_step(step)
    }
    /// The release was refused: policy not met (403), identity not authorised (401/403).
    pub fn denied(step: Step, msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Rejected, msg).with_step(step)
    }
    /// A response failed verification. Treated as a security failure; never retried.
    pub fn integrity(step: Step, msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Integrity, msg).with_step(step)
    }
    /// Invalid or unreadable configuration.
    pub fn config(msg: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Config, msg).with_step(Step::Config)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !matches!(self.kind, ErrorKind::Pkcs11(_)) {
            write!(f, "class={} ", self.kind.name())?;
        }
        if let Some(step) = self.step {
            write!(f, "step={} ", step.name())?;
        }
        write!(f, "cause: {}", self.message)?;
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        if let Some(h) = self.hint() {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_and_config_share_a_ck_rv_but_not_a_class() {
        let i = Error::integrity(Step::Release, "bad signature");
        let c = Error::config("no such file");
        assert_eq!(i.rv(), CKR_GENERAL_ERROR);
        assert_eq!(c.rv(), CKR_GENERAL_ERROR);
        assert_eq!(i.kind(), ErrorKind::Integrity);
        assert_eq!(c.kind(), ErrorKind::Config);
        assert!(i
            .to_string()
            .starts_with("class=integrity step=release cause: bad signature"));
        assert!(c
            .to_string()
            .starts_with("class=config step=config cause: no such file"));
    }

    #[test]
    fn each_class_maps_to_one_ck_rv() {
        let cases = [
            (Error::evidence(Step::Evidence, "x"), CKR_DEVICE_ERROR),
            (Error::service(Step::Release, "x"), CKR_FUNCTION_FAILED),
            (Error::denied(Step::Release, "x"), CKR_FUNCTION_REJECTED),
            (Error::integrity(Step::Unwrap, "x"), CKR_GENERAL_ERROR),
            (Error::config("x"), CKR_GENERAL_ERROR),
            (Error::arguments_bad("x"), CKR_ARGUMENTS_BAD),
            (Error::general("x"), CKR_GENERAL_ERROR),
            (
                Error::new(CKR_MECHANISM_INVALID, "x"),
                CKR_MECHANISM_INVALID,
            ),
        ];
        for (e, rv) in cases {
            assert_eq!(e.rv(), rv, "{e}");
        }
        assert_eq!(
            Error::new(CKR_ARGUMENTS_BAD, "x").kind(),
            ErrorKind::Argument
        );
        assert_eq!(
            Error::new(CKR_GENERAL_ERROR, "x").kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn every_login_failure_class_has_a_hint_and_specific_hints_stay() {
        let cases = [
            Error::integrity(Step::Release, "x"),
            Error::integrity(Step::Evidence, "x"),
            Error::evidence(Step::Evidence, "x"),
            Error::service(Step::Attestation, "x"),
            Error::denied(Step::Release, "x"),
            Error::integrity(Step::Identity, "x"),
            Error::config("x"),
            Error::general("x").with_step(Step::TransferKey),
        ];
        for e in cases {
            assert!(e.hint().is_some_and(|h| !h.is_empty()), "{e}");
        }
        let e = Error::service(Step::Release, "x").with_hint("specific");
        assert_eq!(e.hint(), Some("specific"));
        // API misuse carries no operator hint; the login path gives one to any failure.
        assert_eq!(Error::new(CKR_MECHANISM_INVALID, "x").hint(), None);
        let e = Error::new(CKR_HOST_MEMORY, "x").with_default_hint();
        assert!(e.hint().is_some_and(|h| h.starts_with("retry later")));
    }

    #[test]
    fn the_cause_chain_is_kept_and_shown() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Error::config("cannot read /etc/skr.toml").with_source(io);
        let src = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(src.as_deref(), Some("no such file"));
        assert!(
            e.to_string()
                .contains("cannot read /etc/skr.toml: no such file"),
            "{e}"
        );
    }

    #[test]
    fn context_and_logged_keep_the_class() {
        let e = Error::denied(Step::Release, "403")
            .context("release of \"k\"")
            .mark_logged();
        assert_eq!(e.kind(), ErrorKind::Rejected);
        assert_eq!(e.message(), "release of \"k\": 403");
        assert!(e.is_logged());
        assert!(!Error::general("x").is_logged());
    }
}
