//! Test-facing admin API (docs/EMULATOR.md): counters, injected faults, the decision log.

use crate::keystore::Kind;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    pub attestations: u64,
    pub tokens: u64,
    pub releases: BTreeMap<String, u64>,
    pub release_denied: BTreeMap<String, u64>,
    /// 429s answered under `PUT /admin/limits`, per service (`vault`, `mhsm`).
    pub throttled: BTreeMap<String, u64>,
}

pub const ENDPOINTS: [&str; 8] = [
    "maa-attest",
    "akv-get",
    "akv-release",
    "imds-token",
    "platform-report",
    // CVM platforms: the paravisor does not refresh the HCL report after a user-data write
    // (any kind; `count` refreshes are skipped).
    "vtpm-hcl-refresh",
    // CVM platforms: the vTPM answers the next `count` TPM2_CreatePrimary commands with
    // TPM_RC_RETRY (kind `throttle`: busy) or TPM_RC_LOCKOUT (any other kind).
    "vtpm-command",
    // CVM platforms: the vTPM answers the next `count` TPM2_NV_Read commands of the HCL report
    // (NV 0x01400001) with TPM_RC_NV_UNINITIALIZED, Azure's "code 330" (any kind).
    "vtpm-nv-unwritten",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Status,
    Delay,
    Throttle,
    MalformedBody,
    TruncatedJws,
    WrongWrapKey,
    ExpiredToken,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub endpoint: String,
    pub kind: FaultKind,
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default = "default_retry_after")]
    pub retry_after: u64,
    #[serde(default = "default_count")]
    pub count: u32,
}
fn default_status() -> u16 {
    500
}
fn default_retry_after() -> u64 {
    1
}
fn default_count() -> u32 {
    1
}

impl Fault {
    pub fn validate(&self) -> Result<(), String> {
        if !ENDPOINTS.contains(&self.endpoint.as_str()) {
            return Err(format!(
                "unknown endpoint {:?}; one of {ENDPOINTS:?}",
                self.endpoint
            ));
        }
        let specific = match self.kind {
            FaultKind::TruncatedJws | FaultKind::WrongWrapKey => Some("akv-release"),
            FaultKind::ExpiredToken => Some("maa-attest"),
            _ => None,
        };
        if let Some(only) = specific {
            if self.endpoint != only {
                return Err(format!("fault kind {:?} applies to {only} only", self.kind));
            }
        }
        if StatusCode::from_u16(self.status).is_err() {
            return Err(format!("bad status {}", self.status));
        }
        if self.count == 0 {
            return Err("count must be at least 1".into());
        }
        Ok(())
    }
}

/// Opt-in service limits (`PUT /admin/limits`; docs/EMULATOR.md "Throttling"). Off unless set.
/// `preset: "azure"` applies Key Vault's and Managed HSM's documented limits per service
/// instance; the two `*_create_release_per_10s` members set a plain create + release budget
/// instead (over `window_ms`, default 10 s), which tests use to throttle hard and fast.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<Preset>,
    /// Key create (and rotate) + release calls per window on the vault.
    #[serde(default)]
    pub vault_create_release_per_10s: Option<u32>,
    /// The same on the managed HSM.
    #[serde(default)]
    pub mhsm_create_release_per_10s: Option<u32>,
    /// Window of the two budgets above, in milliseconds (default 10 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The limits Microsoft documents (service-limits.md, overview-throttling.md).
    Azure,
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_ms == Some(0) {
            return Err("window_ms must be at least 1".into());
        }
        if self.window_ms.is_some_and(|w| w > 3_600_000) {
            return Err("window_ms must be at most 3600000 (one hour)".into());
        }
        if self.vault_create_release_per_10s == Some(0)
            || self.mhsm_create_release_per_10s == Some(0)
        {
            return Err(
                "a budget of 0 would refuse every call; leave the member out to lift the limit"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What a throttled call does, in the categories of the documented limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    /// Create, import and rotate: a new key version.
    Create,
    Release,
    /// GET, list, versions, update.
    Other,
}

/// The key a call is about, as far as the documented limits weigh it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyWeight {
    pub hsm: bool,
    /// RSA modulus bits; `None` for EC, oct and calls on no key (list).
    pub rsa_bits: Option<u32>,
}

/// One sliding window: calls admitted in the last `window`, each with its cost.
#[derive(Debug)]
struct Bucket {
    capacity: u32,
    window: Duration,
    admitted: VecDeque<(Instant, u32)>,
}

impl Bucket {
    fn new(capacity: u32, window: Duration) -> Bucket {
        Bucket {
            capacity,
            window,
            admitted: VecDeque::new(),
        }
    }

    /// Admits a call costing `cost` at `now`, or tells how long until it would fit.
    fn admit(&mut self, cost: u32, now: Instant) -> Result<(), Duration> {
        while self
            .admitted
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.admitted.pop_front();
        }
        let used: u32 = self.admitted.iter().map(|(_, c)| c).sum();
        let cost = cost.min(self.capacity);
        if used + cost <= self.capacity {
            self.admitted.push_back((now, cost));
            return Ok(());
        }
        // The call fits once enough of the oldest calls have left the window.
        let mut freed = 0;
        for (t, c) in &self.admitted {
            freed += c;
            if used - freed + cost <= self.capacity {
                return Err(self.window.saturating_sub(now.duration_since(*t)));
            }
        }
        Err(self.window)
    }
}

/// Which budget a call draws on, and at what cost; `None` when no limit applies.
fn bucket_for(
    limits: &Limits,
    service: Kind,
    op: KeyOp,
    key: KeyWeight,
) -> Option<(&'static str, u32, Duration, u32)> {
    let custom = match service {
        Kind::Vault => limits.vault_create_release_per_10s,
        Kind::Mhsm => limits.mhsm_create_release_per_10s,
    };
    if let (Some(n), KeyOp::Create | KeyOp::Release) = (custom, op) {
        let window = Duration::from_millis(limits.window_ms.unwrap_or(10_000));
        return Some(("create-release", n, window, 1));
    }
    limits.preset?;
    let ten = Duration::from_secs(10);
    let one = Duration::from_secs(1);
    Some(match (service, op) {
        // Vault, per 10 s: CREATE 10 for HSM keys, 20 for software keys; release shares the
        // category. Weighted like the other transactions, in units of a software-key create.
        (Kind::Vault, KeyOp::Create | KeyOp::Release) => {
            ("create-release", 20, ten, if key.hsm { 2 } else { 1 })
        }
        // Vault, per 10 s, weighted, in units of a software RSA-2048 / EC transaction: 4000
        // such, 1000 RSA-3072, 500 RSA-4096; an HSM key costs twice a software key.
        (Kind::Vault, KeyOp::Other) => {
            let size = match key.rsa_bits {
                Some(b) if b > 3072 => 8,
                Some(b) if b > 2048 => 4,
                _ => 1,
            };
            ("other", 4000, ten, if key.hsm { size * 2 } else { size })
        }
        // Managed HSM, per second per instance: Create Key 1, Get Key Information 1100.
        (Kind::Mhsm, KeyOp::Create) => ("create", 1, one, 1),
        (Kind::Mhsm, KeyOp::Other) => ("other", 1100, one, 1),
        // Release is not listed; Backup Key (10 per second) is the listed operation that, like
        // a release, exports the key wrapped. Stricter than the unthrottled crypto operations.
        (Kind::Mhsm, KeyOp::Release) => ("release", 10, one, 1),
    })
}

type Windows = BTreeMap<(&'static str, &'static str), Bucket>;
/// Lines of the decision log kept for `GET /admin/log`.
const MEMORY_LOG_LINES: usize = 20_000;

pub struct Admin {
    pub counters: Mutex<Counters>,
    limits: Mutex<(Limits, Windows)>,
    faults: Mutex<VecDeque<Fault>>,
    log: Mutex<Vec<String>>,
    log_file: PathBuf,
}

impl Admin {
    pub fn new(log_file: PathBuf) -> Self {
        Admin {
            counters: Mutex::new(Counters::default()),
            limits: Mutex::new((Limits::default(), BTreeMap::new())),
            faults: Mutex::new(VecDeque::new()),
            log: Mutex::new(Vec::new()),
            log_file,
        }
    }

    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        if let Ok(mut c) = self.counters.lock() {
            f(&mut c);
        }
    }

    pub fn counters_json(&self) -> Value {
        self.counters
            .lock()
            .map(|c| serde_json::to_value(&*c).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn reset_counters(&self) {
        if let Ok(mut c) = self.counters.lock() {
            *c = Counters::default();
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits.lock().map(|l| l.0.clone()).unwrap_or_default()
    }

    pub fn set_limits(&self, limits: Limits) {
        if let Ok(mut l) = self.limits.lock() {
            *l = (limits, BTreeMap::new());
        }
    }

    /// Admits one call of `service` under the limits; `Some(seconds)` (for `Retry-After`) when
    /// its window is full: the call is refused, counted in `throttled`, and, as Key Vault
    /// documents, does not count toward the limit.
    pub fn throttle(&self, service: Kind, op: KeyOp, key: KeyWeight) -> Option<u64> {
        let wait = {
            let mut guard = self.limits.lock().ok()?;
            let (limits, windows) = &mut *guard;
            let (name, capacity, window, cost) = bucket_for(limits, service, op, key)?;
            windows
                .entry((service.name(), name))
                .or_insert_with(|| Bucket::new(capacity, window))
                .admit(cost, Instant::now())
                .err()?
        };
        self.count(|c| *c.throttled.entry(service.name().to_string()).or_default() += 1);
        Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
    }

    pub fn add_fault(&self, fault: Fault) {
        if let Ok(mut f) = self.faults.lock() {
            f.push_back(fault);
        }
    }

    pub fn clear_faults(&self) {
        if let Ok(mut f) = self.faults.lock() {
            f.clear();
        }
    }

    /// Takes one use of the first queued fault for `endpoint`.
    pub fn take_fault(&self, endpoint: &str) -> Option<Fault> {
        let mut faults = self.faults.lock().ok()?;
        let index = faults.iter().position(|f| f.endpoint == endpoint)?;
        let fault = faults[index].clone();
        if faults[index].count <= 1 {
            faults.remove(index);
        } else {
            faults[index].count -= 1;
        }
        Some(fault)
    }

    /// One decision: kept in memory for `GET /admin/log` and appended to `DIR/emulator.log`.
    pub fn log(&self, service: &str, event: &str, details: Value) {
        let mut entry = json!({
            "time": crate::util::rfc3339(crate::util::now_secs()),
            "service": service,
            "event": event,
        });
        if let (Some(obj), Value::Object(extra)) = (entry.as_object_mut(), details) {
            obj.extend(extra);
        }
        let line = entry.to_string();
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
        {
            let _ = writeln!(file, "{line}");
        }
        if let Ok(mut log) = self.log.lock() {
            // Memory stays bounded in long sessions; DIR/emulator.log keeps everything.
            if log.len() >= MEMORY_LOG_LINES {
                log.drain(..MEMORY_LOG_LINES / 10);
            }
            log.push(line);
        }
    }

    pub fn log_text(&self) -> String {
        self.log
            .lock()
            .map(|l| l.iter().map(|s| format!("{s}\n")).collect())
            .unwrap_or_default()
    }
}

/// Applies the generic part of a fault. `Some(response)` short-circuits the request;
/// `None` lets the handler continue (after a delay, or for handler-specific kinds).
pub async fn generic_fault_response(fault: &Fault) -> Option<Response> {
    match fault.kind {
        FaultKind::Delay => {
            tokio::time::sleep(Duration::from_millis(fault.delay_ms)).await;
            None
        }
        FaultKind::Status => {
            let status =
                StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some(
                (
                    status,
                    axum::Json(json!({"error": {"code": "InjectedFault", "message": format!("skr-emulator injected status {}", status.as_u16())}})),
                )
                    .into_response(),
            )
        }
        FaultKind::Throttle => {
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(json!({"error": {"code": "Throttled", "message": "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached"}})),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&fault.retry_after.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
            Some(resp)
        }
        FaultKind::MalformedBody => Some(
            (
                StatusCode::OK,
                [("content-type", "application/json; charset=utf-8")],
                "{\"value\": \"eyJ\u{1}not json",
            )
                .into_response(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(endpoint: &str, kind: FaultKind, count: u32) -> Fault {
        Fault {
            endpoint: endpoint.into(),
            kind,
            status: 503,
            delay_ms: 0,
            retry_after: 2,
            count,
        }
    }

    #[test]
    fn faults_are_consumed_in_order_and_counted() {
        let admin = Admin::new(
            std::env::temp_dir().join(format!("skr-emu-admin-{}.log", std::process::id())),
        );
        admin.add_fault(fault("akv-release", FaultKind::Status, 2));
        admin.add_fault(fault("akv-release", FaultKind::Throttle, 1));
        admin.add_fault(fault("maa-attest", FaultKind::ExpiredToken, 1));
        assert_eq!(
            admin.take_fault("akv-release").unwrap().kind,
            FaultKind::Status
        );
        assert_eq!(
            admin.take_fault("akv-release").unwrap().kind,
            FaultKind::Status
        );
        assert_eq!(
            admin.take_fault("akv-release").unwrap().kind,
            FaultKind::Throttle
        );
        assert!(admin.take_fault("akv-release").is_none());
        assert_eq!(
            admin.take_fault("maa-attest").unwrap().kind,
            FaultKind::ExpiredToken
        );
        assert!(admin.take_fault("maa-attest").is_none());
    }

    fn admin(tag: &str) -> Admin {
        Admin::new(std::env::temp_dir().join(format!("skr-emu-{tag}-{}.log", std::process::id())))
    }

    const HSM_RSA2048: KeyWeight = KeyWeight {
        hsm: true,
        rsa_bits: Some(2048),
    };

    #[test]
    fn limits_refuse_beyond_the_window_and_count_the_refusals() {
        let admin = admin("limits");
        let release = |admin: &Admin, kind| admin.throttle(kind, KeyOp::Release, HSM_RSA2048);
        assert_eq!(release(&admin, Kind::Vault), None, "off by default");
        admin.set_limits(Limits {
            vault_create_release_per_10s: Some(2),
            ..Limits::default()
        });
        assert_eq!(release(&admin, Kind::Vault), None);
        assert_eq!(
            admin.throttle(Kind::Vault, KeyOp::Create, HSM_RSA2048),
            None
        );
        let wait = release(&admin, Kind::Vault).expect("third call refused");
        assert!((1..=10).contains(&wait), "{wait}");
        assert_eq!(
            admin.throttle(Kind::Vault, KeyOp::Other, HSM_RSA2048),
            None,
            "GET is not in the create + release budget"
        );
        assert_eq!(release(&admin, Kind::Mhsm), None, "per service instance");
        assert_eq!(admin.counters.lock().unwrap().throttled["vault"], 1);
        assert!(!admin
            .counters
            .lock()
            .unwrap()
            .throttled
            .contains_key("mhsm"));
    }

    #[test]
    fn a_short_window_frees_its_budget_when_it_passes() {
        let mut bucket = Bucket::new(2, Duration::from_millis(50));
        let t0 = Instant::now();
        assert_eq!(bucket.admit(1, t0), Ok(()));
        assert_eq!(bucket.admit(1, t0 + Duration::from_millis(20)), Ok(()));
        // Full: the first call leaves the window at t0 + 50 ms.
        assert_eq!(
            bucket.admit(1, t0 + Duration::from_millis(30)),
            Err(Duration::from_millis(20))
        );
        assert_eq!(bucket.admit(1, t0 + Duration::from_millis(50)), Ok(()));
        // A cost of 2 waits for both older calls to leave.
        assert_eq!(
            bucket.admit(2, t0 + Duration::from_millis(60)),
            Err(Duration::from_millis(40))
        );
    }

    #[test]
    fn azure_preset_applies_the_documented_limits() {
        let admin = admin("azure");
        admin.set_limits(Limits {
            preset: Some(Preset::Azure),
            ..Limits::default()
        });
        // Vault: 10 HSM-key creates + releases per 10 s, together.
        for i in 0..10 {
            let op = if i % 2 == 0 {
                KeyOp::Create
            } else {
                KeyOp::Release
            };
            assert_eq!(admin.throttle(Kind::Vault, op, HSM_RSA2048), None, "{i}");
        }
        assert!(admin
            .throttle(Kind::Vault, KeyOp::Release, HSM_RSA2048)
            .is_some());
        // ... while other transactions have their own, weighted budget: 250 RSA-4096 HSM GETs.
        let rsa4096 = KeyWeight {
            hsm: true,
            rsa_bits: Some(4096),
        };
        for i in 0..250 {
            assert_eq!(
                admin.throttle(Kind::Vault, KeyOp::Other, rsa4096),
                None,
                "{i}"
            );
        }
        assert!(admin.throttle(Kind::Vault, KeyOp::Other, rsa4096).is_some());
        // Managed HSM, per second: 1 create, 10 releases.
        assert_eq!(admin.throttle(Kind::Mhsm, KeyOp::Create, HSM_RSA2048), None);
        assert_eq!(
            admin.throttle(Kind::Mhsm, KeyOp::Create, HSM_RSA2048),
            Some(1)
        );
        for i in 0..10 {
            assert_eq!(
                admin.throttle(Kind::Mhsm, KeyOp::Release, HSM_RSA2048),
                None,
                "{i}"
            );
        }
        assert_eq!(
            admin.throttle(Kind::Mhsm, KeyOp::Release, HSM_RSA2048),
            Some(1)
        );
    }

    #[test]
    fn limits_validation() {
        assert!(Limits::default().validate().is_ok());
        for bad in [
            r#"{"window_ms": 0}"#,
            r#"{"vault_create_release_per_10s": 0}"#,
        ] {
            let l: Limits = serde_json::from_str(bad).unwrap();
            assert!(l.validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Limits>(r#"{"preset": "aws"}"#).is_err());
        let l: Limits = serde_json::from_str(r#"{"preset": "azure"}"#).unwrap();
        assert_eq!(l.preset, Some(Preset::Azure));
    }

    #[test]
    fn fault_validation() {
        assert!(fault("akv-release", FaultKind::WrongWrapKey, 1)
            .validate()
            .is_ok());
        assert!(fault("maa-attest", FaultKind::WrongWrapKey, 1)
            .validate()
            .is_err());
        assert!(fault("nowhere", FaultKind::Status, 1).validate().is_err());
        assert!(fault("imds-token", FaultKind::Status, 0)
            .validate()
            .is_err());
    }
}
