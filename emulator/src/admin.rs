//! Test-facing admin API (docs/EMULATOR.md): counters, injected faults, the decision log.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Counters {
    pub attestations: u64,
    pub tokens: u64,
    pub releases: BTreeMap<String, u64>,
    pub release_denied: BTreeMap<String, u64>,
}

pub const ENDPOINTS: [&str; 6] = [
    "maa-attest",
    "akv-get",
    "akv-release",
    "imds-token",
    "platform-report",
    // CVM platforms: the paravisor does not refresh the HCL report after a user-data write
    // (any kind; `count` refreshes are skipped).
    "vtpm-hcl-refresh",
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

/// Opt-in service limits, like Key Vault's "CREATE key and RELEASE key … 10 transactions per
/// 10 seconds for HSM-protected keys". Off unless set through `PUT /admin/limits`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Key create + release calls per 10 s on the vault.
    #[serde(default)]
    pub vault_create_release_per_10s: Option<u32>,
    /// The same on the managed HSM.
    #[serde(default)]
    pub mhsm_create_release_per_10s: Option<u32>,
}

/// Lines of the decision log kept for `GET /admin/log`.
const MEMORY_LOG_LINES: usize = 20_000;

pub struct Admin {
    pub counters: Mutex<Counters>,
    limits: Mutex<(Limits, BTreeMap<String, VecDeque<std::time::Instant>>)>,
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

    /// Counts one create / release call of `service` ("vault" or "mhsm"); `Some(seconds)` when
    /// the 10-second window is full (the call is refused and not counted).
    pub fn throttle(&self, service: &str) -> Option<u64> {
        let mut guard = self.limits.lock().ok()?;
        let (limits, windows) = &mut *guard;
        let limit = match service {
            "vault" => limits.vault_create_release_per_10s,
            _ => limits.mhsm_create_release_per_10s,
        }?;
        let window = std::time::Duration::from_secs(10);
        let now = std::time::Instant::now();
        let calls = windows.entry(service.to_string()).or_default();
        while calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            calls.pop_front();
        }
        if calls.len() as u64 >= u64::from(limit) {
            let oldest = calls.front().copied().unwrap_or(now);
            let wait = window.saturating_sub(now.duration_since(oldest));
            return Some(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        }
        calls.push_back(now);
        None
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

    #[test]
    fn limits_refuse_beyond_the_window() {
        let admin = Admin::new(
            std::env::temp_dir().join(format!("skr-emu-limits-{}.log", std::process::id())),
        );
        assert_eq!(admin.throttle("vault"), None, "off by default");
        admin.set_limits(Limits {
            vault_create_release_per_10s: Some(2),
            mhsm_create_release_per_10s: None,
        });
        assert_eq!(admin.throttle("vault"), None);
        assert_eq!(admin.throttle("vault"), None);
        let wait = admin.throttle("vault").expect("third call refused");
        assert!((1..=10).contains(&wait), "{wait}");
        assert_eq!(admin.throttle("mhsm"), None);
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
