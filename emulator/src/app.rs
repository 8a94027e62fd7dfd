//! The top of the emulator: start-up (state, ports, demo keys, generated files), the five
//! servers and their routers, the emulator's own platform and admin endpoints, and shutdown.
//! The shared state it builds (`App`) lives below, in `context`.

use crate::admin::{generic_fault_response, Admin, Fault};
use crate::context::{App, AppParts, Urls};
use crate::keystore::{KeysFile, Kind};
use crate::keyvault;
use crate::snp::{self, PlatformConfig};
use crate::state::{self, Layout, Pki, Ports};
use crate::util::{b64_lenient, b64std, b64url, pem_encode, write_atomic};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha384};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the emulator simulates on the guest side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestPlatform {
    /// A Confidential ACI container / SNP guest with an SNP report device (the default).
    Aci,
    /// An Azure confidential VM on SEV-SNP: evidence from a vTPM (swtpm + paravisor), MAA
    /// AzureGuest.
    CvmSnp,
    /// The same on Intel TDX (HCL report_type 4, TD quote from IMDS `/acc/tdquote`).
    CvmTdx,
}

impl GuestPlatform {
    pub fn from_name(name: &str) -> Result<GuestPlatform, String> {
        match name {
            "aci" => Ok(GuestPlatform::Aci),
            "cvm-snp" => Ok(GuestPlatform::CvmSnp),
            "cvm-tdx" => Ok(GuestPlatform::CvmTdx),
            other => Err(format!(
                "--platform {other:?}: expected aci, cvm-snp or cvm-tdx"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GuestPlatform::Aci => "aci",
            GuestPlatform::CvmSnp => "cvm-snp",
            GuestPlatform::CvmTdx => "cvm-tdx",
        }
    }
    /// The isolation TEE's MAA attestation type, for a CVM.
    fn tee(self) -> Option<&'static str> {
        match self {
            GuestPlatform::Aci => None,
            GuestPlatform::CvmSnp => Some("sevsnpvm"),
            GuestPlatform::CvmTdx => Some("tdxvm"),
        }
    }
}

/// Polls a future, turning a panic into `Err(message)`.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.get_mut().0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()))),
        }
    }
}

/// Request log: every call, its service and the status it got (admin reads are not logged).
async fn log_request(
    State((app, service)): State<(Arc<App>, &'static str)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    // A panicking handler becomes a 500 (and a log line) instead of a dropped connection.
    // Polled in place, not spawned, so a request the client abandons is cancelled rather than
    // completing later (and changing counters) behind a test's back.
    let response = match CatchUnwind(Box::pin(next.run(request))).await {
        Ok(response) => response,
        Err(e) => {
            app.admin.log(
                service,
                "handler-panicked",
                json!({"path": path, "error": e}),
            );
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": {"code": "InternalError", "message": "skr-emulator: the request handler failed; see DIR/emulator.log"}})),
            )
                .into_response()
        }
    };
    if !path.starts_with("/admin/") {
        app.admin.log(
            service,
            "request",
            json!({"method": method, "path": path, "status": response.status().as_u16(),
                   "ms": started.elapsed().as_millis() as u64,
                   // Microseconds too: p11-bench separates the module's login time from
                   // the emulator's handling time with it.
                   "us": started.elapsed().as_micros() as u64}),
        );
    }
    response
}

fn with_request_log(router: Router, app: &Arc<App>, service: &'static str) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        (app.clone(), service),
        log_request,
    ))
}

// ---- platform and admin endpoints ----------------------------------------------------------

async fn platform_report(State(app): State<Arc<App>>, body: Bytes) -> Response {
    if let Some(f) = app.admin.take_fault("platform-report") {
        if let Some(resp) = generic_fault_response(&f).await {
            app.admin.log("platform", "fault", json!({"fault": f}));
            return resp;
        }
    }
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"code": "BadRequest", "message": m}})),
        )
            .into_response()
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("body is not JSON: {e}")),
    };
    let Some(rd) = request.get("report_data").and_then(Value::as_str) else {
        return bad("report_data (base64url, 64 bytes) is required".into());
    };
    let rd = match b64_lenient(rd) {
        Ok(b) => b,
        Err(e) => return bad(format!("report_data: {e}")),
    };
    let Ok(rd) = <[u8; 64]>::try_from(rd.as_slice()) else {
        return bad(format!("report_data is {} bytes, expected 64", rd.len()));
    };
    match snp::build_report(&app.platform(), &rd, &app.pki.vcek_key) {
        Ok(report) => {
            app.admin.log(
                "platform",
                "report",
                json!({"report_data": hex::encode(rd)}),
            );
            Json(json!({"report": b64url(&report), "vcek_cert_chain": app.vcek_chain_pem()}))
                .into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"code": "InternalError", "message": e}})),
        )
            .into_response(),
    }
}

async fn admin_counters(State(app): State<Arc<App>>) -> Response {
    Json(app.admin.counters_json()).into_response()
}

async fn admin_reset(State(app): State<Arc<App>>) -> Response {
    app.admin.reset_counters();
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_add_fault(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let fault: Fault = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("bad fault: {e}")})),
            )
                .into_response()
        }
    };
    if let Err(e) = fault.validate() {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response();
    }
    app.admin
        .log("admin", "fault-added", json!({"fault": fault}));
    app.admin.add_fault(fault);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_get_limits(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::to_value(app.admin.limits()).unwrap_or_default()).into_response()
}

async fn admin_put_limits(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match serde_json::from_slice::<crate::admin::Limits>(&body)
        .map_err(|e| e.to_string())
        .and_then(|l| l.validate().map(|()| l))
    {
        Ok(limits) => {
            app.admin
                .log("admin", "limits-set", json!({"limits": limits}));
            app.admin.set_limits(limits);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("bad limits: {e}")})),
        )
            .into_response(),
    }
}

async fn admin_clear_faults(State(app): State<Arc<App>>) -> Response {
    app.admin.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_log(State(app): State<Arc<App>>) -> Response {
    (
        [("content-type", "application/x-ndjson")],
        app.admin.log_text(),
    )
        .into_response()
}

async fn admin_get_platform(State(app): State<Arc<App>>) -> Response {
    Json(serde_json::to_value(app.platform()).unwrap_or_default()).into_response()
}

/// Merges the given `platform.json` members into the simulated guest, persists it, re-issues
/// the VCEK when the TCB or chip id changed, and rewrites the security-context files.
async fn admin_put_platform(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let bad = |m: String| (StatusCode::BAD_REQUEST, Json(json!({"error": m}))).into_response();
    let changes: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(_) => return bad("body must be a JSON object of platform.json members".into()),
        Err(e) => return bad(format!("body is not JSON: {e}")),
    };
    let mut merged = serde_json::to_value(app.platform()).unwrap_or_default();
    if let (Some(target), Some(source)) = (merged.as_object_mut(), changes.as_object()) {
        for (k, v) in source {
            target.insert(k.clone(), v.clone());
        }
    }
    let updated: PlatformConfig = match serde_json::from_value(merged) {
        Ok(p) => p,
        Err(e) => return bad(format!("invalid platform: {e}")),
    };
    if let Err(e) = updated.validate() {
        return bad(format!("invalid platform: {e}"));
    }
    let result = (|| -> Result<(), String> {
        let pki = Pki::load_or_create(&app.layout, &updated)?;
        state::write_json(&app.layout.platform_file(), &updated)?;
        app.set_platform(updated.clone(), pki.vcek_der)?;
        write_security_context(&app)
    })();
    match result {
        Ok(()) => {
            app.admin
                .log("admin", "platform-changed", json!({"changes": changes}));
            Json(serde_json::to_value(updated).unwrap_or_default()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e}))).into_response(),
    }
}

fn platform_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/platform/snp/report", post(platform_report))
        .route("/admin/counters", get(admin_counters))
        .route("/admin/counters/reset", post(admin_reset))
        .route(
            "/admin/faults",
            post(admin_add_fault).delete(admin_clear_faults),
        )
        .route("/admin/log", get(admin_log))
        .route("/admin/limits", get(admin_get_limits).put(admin_put_limits))
        .route(
            "/{tenant}/oauth2/v2.0/token",
            post(crate::imds::entra_token),
        )
        .route(
            "/admin/platform",
            get(admin_get_platform).put(admin_put_platform),
        )
        .with_state(app)
}

fn imds_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metadata/identity/oauth2/token", get(crate::imds::token))
        .route("/metadata/THIM/amd/certification", get(crate::imds::thim))
        .route("/acc/tdquote", post(crate::imds::td_quote))
        .route("/msi/token", get(crate::imds::identity_endpoint))
        .with_state(app)
}

// ---- start-up ------------------------------------------------------------------------------

pub fn check_dir(layout: &Layout) -> Result<(), String> {
    let dir = &layout.dir;
    if dir.exists() && !dir.is_dir() {
        return Err(format!("{} exists and is not a directory", dir.display()));
    }
    std::fs::create_dir_all(layout.state()).map_err(|e| {
        format!(
            "cannot use {} as the emulator directory: {e}",
            dir.display()
        )
    })?;
    // The state holds private keys: owner only.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(layout.state(), std::fs::Permissions::from_mode(0o700));
    let probe = layout.state().join(".write-probe");
    std::fs::write(&probe, b"").map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn lock_state(layout: &Layout) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = layout.state().join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = running_pid(layout)
            .map(|p| format!(" (pid {p})"))
            .unwrap_or_default();
        return Err(format!(
            "skr-emulator is already running for {}{pid}; run `skr-emulator down --dir {}` first",
            layout.dir.display(),
            layout.dir.display()
        ));
    }
    Ok(file)
}

/// The pid of a live emulator owning this directory, if any.
pub fn running_pid(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(layout.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists.
    let exists = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
    // A zombie (killed, not yet reaped by its parent) exists but no longer runs.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.get(stat.rfind(')')? + 2..)?.starts_with('Z')))
        .unwrap_or(false);
    (exists && !zombie).then_some(pid)
}

const PORT_NAMES: [&str; 5] = ["MAA", "Key Vault", "Managed HSM", "IMDS", "platform"];

/// Binds the five ports: `--base-port` (base … base+4) when given, else those of the previous
/// start, else free ones. Returns the ports, the listeners and the previous ports.
fn bind_ports(
    layout: &Layout,
    base_port: Option<u16>,
) -> Result<(Ports, Vec<TcpListener>, Option<Ports>), String> {
    let saved: Option<Ports> = state::read_json(&layout.ports_file())?;
    let wanted = match base_port {
        Some(b) if b == 0 || b > u16::MAX - 4 => {
            return Err(format!("--base-port {b} leaves no room for five ports"))
        }
        Some(b) => Some(Ports {
            maa: b,
            vault: b + 1,
            mhsm: b + 2,
            imds: b + 3,
            platform: b + 4,
        }),
        None => saved,
    };
    let mut listeners = Vec::new();
    let ports = match wanted {
        Some(p) => {
            for (name, port) in PORT_NAMES
                .iter()
                .zip([p.maa, p.vault, p.mhsm, p.imds, p.platform])
            {
                let l = TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
                    format!(
                        "cannot listen on 127.0.0.1:{port} for {name} ({e}). Another process uses the port; stop it, \
                         or start with another --base-port, or delete {} to choose free ports",
                        layout.ports_file().display()
                    )
                })?;
                listeners.push(l);
            }
            p
        }
        None => {
            for _ in 0..5 {
                listeners.push(
                    TcpListener::bind(("127.0.0.1", 0))
                        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?,
                );
            }
            let port = |i: usize| listeners[i].local_addr().map(|a| a.port()).unwrap_or(0);
            Ports {
                maa: port(0),
                vault: port(1),
                mhsm: port(2),
                imds: port(3),
                platform: port(4),
            }
        }
    };
    if saved != Some(ports) {
        state::write_json(&layout.ports_file(), &ports)?;
    }
    Ok((ports, listeners, saved))
}

/// When the MAA port changed, release policies that named the emulator's previous MAA URL
/// follow it (they meant "this emulator's MAA"); other authorities are left alone.
fn follow_maa_url(app: &App, previous: Option<Ports>) -> Result<(), String> {
    let Some(previous) = previous else {
        return Ok(());
    };
    let old_url = format!("https://127.0.0.1:{}", previous.maa);
    if crate::policy::normalise_authority(&old_url)
        == crate::policy::normalise_authority(&app.urls.maa)
    {
        return Ok(());
    }
    let mut keys = app.keys.lock().map_err(|_| "state lock")?;
    let mut changed = Vec::new();
    for kind in [Kind::Vault, Kind::Mhsm] {
        for (name, versions) in keys.store(kind).keys.iter_mut() {
            for version in versions.iter_mut() {
                let Some(stored) = version.release_policy.as_mut() else {
                    continue;
                };
                let Ok(mut parsed) = crate::policy::parse(&stored.policy) else {
                    continue;
                };
                let mut hit = false;
                for rule in parsed.authorities.iter_mut() {
                    if crate::policy::normalise_authority(&rule.authority)
                        == crate::policy::normalise_authority(&old_url)
                    {
                        rule.authority = app.urls.maa.clone();
                        hit = true;
                    }
                }
                if hit {
                    stored.policy = parsed.to_json();
                    changed.push(format!("{name}/{}", version.version));
                }
            }
        }
    }
    if !changed.is_empty() {
        app.persist_keys(&keys)?;
        drop(keys);
        app.admin.log(
            "emulator",
            "policies-follow-maa-url",
            json!({"from": old_url, "to": app.urls.maa, "key_versions": changed}),
        );
    }
    Ok(())
}

fn demo_policy(app: &App, extra: Option<Value>) -> Result<Value, String> {
    let host_data = app.platform().host_data()?;
    let compliance = if host_data.iter().any(|b| *b != 0) {
        "azure-compliant-uvm"
    } else {
        "azure-compliant-cvm"
    };
    let mut all = vec![
        json!({"claim": "x-ms-attestation-type", "equals": "sevsnpvm"}),
        json!({"claim": "x-ms-compliance-status", "equals": compliance}),
        json!({"claim": "x-ms-sevsnpvm-hostdata", "equals": hex::encode(host_data)}),
        json!({"claim": "x-ms-sevsnpvm-is-debuggable", "equals": false}),
        json!({"claim": "x-ms-sevsnpvm-vmpl", "equals": 0}),
    ];
    all.extend(extra);
    Ok(json!({"version": "1.0.0", "anyOf": [{"authority": app.urls.maa, "allOf": all}]}))
}

struct DemoKey {
    kind: Kind,
    name: &'static str,
    kty: &'static str,
    size: Option<u64>,
    crv: Option<&'static str>,
    denied: bool,
}

const DEMO_KEYS: [DemoKey; 4] = [
    DemoKey {
        kind: Kind::Vault,
        name: "tls-rsa",
        kty: "RSA-HSM",
        size: Some(2048),
        crv: None,
        denied: false,
    },
    DemoKey {
        kind: Kind::Vault,
        name: "tls-ec",
        kty: "EC-HSM",
        size: None,
        crv: Some("P-256"),
        denied: false,
    },
    DemoKey {
        kind: Kind::Vault,
        name: "denied-rsa",
        kty: "RSA-HSM",
        size: Some(2048),
        crv: None,
        denied: true,
    },
    DemoKey {
        kind: Kind::Mhsm,
        name: "data-aes",
        kty: "oct-HSM",
        size: Some(256),
        crv: None,
        denied: false,
    },
];

/// The guest-attestation policy of an Azure CVM (skr-protocol §9.4): the TEE's claims live in
/// `x-ms-isolation-tee` of an AzureGuest token. `tee` and `compliance` as required.
fn cvm_policy(app: &App, tee: &str, compliance: &str) -> Value {
    json!({"version": "1.0.0", "anyOf": [{"authority": app.urls.maa, "allOf": [
        {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": tee},
        {"claim": "x-ms-isolation-tee.x-ms-compliance-status", "equals": compliance},
    ]}]})
}

/// The Azure CLI's `--default-cvm-policy` (published-examples.json
/// `azure_cli_default_cvm_policy`) with this emulator's MAA as its authority. Its claims are
/// top-level: they describe platform (SevSnpVm / TdxVm) tokens, not AzureGuest ones.
fn cli_default_cvm_policy(app: &App) -> Value {
    json!({"version": "1.0.0", "anyOf": [{"authority": app.urls.maa, "allOf": [
        {"claim": "x-ms-compliance-status", "equals": "azure-compliant-cvm"},
        {"anyOf": [
            {"claim": "x-ms-attestation-type", "equals": "tdxvm"},
            {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
        ]},
    ]}]})
}

/// (kind, name, kty, size, crv, policy) of a CVM platform's demo keys.
type CvmDemoKey = (
    Kind,
    String,
    &'static str,
    Option<u64>,
    Option<&'static str>,
    Value,
);

/// The CVM demo keys of `guest` (named `<platform>-…`, e.g. `cvm-snp-tls-rsa`, so that one
/// directory can hold both flavours): three under the guest policy of its TEE, one asking for
/// the other TEE, one for a UVM, one under the CLI's default CVM policy.
fn cvm_demo_keys(app: &App, guest: GuestPlatform) -> Vec<CvmDemoKey> {
    let Some(tee) = guest.tee() else {
        return Vec::new();
    };
    let other_tee = if tee == "sevsnpvm" {
        "tdxvm"
    } else {
        "sevsnpvm"
    };
    let p = guest.name();
    let ok = cvm_policy(app, tee, "azure-compliant-cvm");
    let rsa = |name: &str, policy: Value| -> CvmDemoKey {
        (
            Kind::Vault,
            format!("{p}-{name}"),
            "RSA-HSM",
            Some(2048),
            None,
            policy,
        )
    };
    vec![
        rsa("tls-rsa", ok.clone()),
        (
            Kind::Vault,
            format!("{p}-tls-ec"),
            "EC-HSM",
            None,
            Some("P-256"),
            ok.clone(),
        ),
        (
            Kind::Mhsm,
            format!("{p}-data-aes"),
            "oct-HSM",
            Some(256),
            None,
            ok,
        ),
        rsa(
            "denied-tee",
            cvm_policy(app, other_tee, "azure-compliant-cvm"),
        ),
        rsa("denied-uvm", cvm_policy(app, tee, "azure-compliant-uvm")),
        rsa("cli-default", cli_default_cvm_policy(app)),
    ]
}

fn create_demo_key(
    app: &Arc<App>,
    kind: Kind,
    name: &str,
    kty: &str,
    size: Option<u64>,
    crv: Option<&str>,
    policy: &Value,
) -> Result<(), String> {
    let exists = app
        .keys
        .lock()
        .map_err(|_| "state lock")?
        .store(kind)
        .keys
        .contains_key(name);
    if exists {
        return Ok(());
    }
    let mut body = json!({
        "kty": kty,
        "attributes": {"exportable": true},
        "release_policy": {"contentType": "application/json; charset=utf-8", "data": b64url(policy.to_string().as_bytes())},
    });
    if let Some(size) = size {
        body["key_size"] = json!(size);
    }
    if let Some(crv) = crv {
        body["crv"] = json!(crv);
    }
    let svc = keyvault::Service {
        app: app.clone(),
        kind,
    };
    keyvault::create(&svc, name, &body, true)
        .map(drop)
        .map_err(|e| format!("provisioning {name}: {}", e.message()))
}

/// Creates the demo keys that do not exist yet (through the same create path as the REST API).
fn provision_demo_keys(app: &Arc<App>, guest: GuestPlatform) -> Result<(), String> {
    for (kind, name, kty, size, crv, policy) in cvm_demo_keys(app, guest) {
        create_demo_key(app, kind, &name, kty, size, crv, &policy)?;
    }
    for demo in &DEMO_KEYS {
        let exists = app
            .keys
            .lock()
            .map_err(|_| "state lock")?
            .store(demo.kind)
            .keys
            .contains_key(demo.name);
        if exists {
            continue;
        }
        // The denied key asks for a launch measurement the simulated guest does not have.
        let extra = demo.denied.then(|| {
            let other = Sha384::digest(b"skr-emulator: a different launch measurement");
            json!({"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": hex::encode(other)})
        });
        let policy = demo_policy(app, extra)?;
        let mut body = json!({
            "kty": demo.kty,
            "attributes": {"exportable": true},
            "release_policy": {"contentType": "application/json; charset=utf-8", "data": b64url(policy.to_string().as_bytes())},
        });
        if let Some(size) = demo.size {
            body["key_size"] = json!(size);
        }
        if let Some(crv) = demo.crv {
            body["crv"] = json!(crv);
        }
        let svc = keyvault::Service {
            app: app.clone(),
            kind: demo.kind,
        };
        keyvault::create(&svc, demo.name, &body, true)
            .map_err(|e| format!("provisioning {}: {}", demo.name, e.message()))?;
    }
    Ok(())
}

/// `DIR/certs/<name>.pem` (leaf then CA) for the demo TLS keys, re-issued when the key changed.
fn write_demo_certs(app: &App) -> Result<(), String> {
    let dir = app.layout.certs_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let keys = app.keys.lock().map_err(|_| "state lock")?;
    for name in [
        "tls-rsa",
        "tls-ec",
        "cvm-snp-tls-rsa",
        "cvm-snp-tls-ec",
        "cvm-tdx-tls-rsa",
        "cvm-tdx-tls-ec",
    ] {
        let Some(current) = keys.vault.keys.get(name).and_then(|v| v.last()) else {
            continue;
        };
        let Some(spki) = keyvault::public_spki(current) else {
            continue;
        };
        let path = dir.join(format!("{name}.pem"));
        let up_to_date = std::fs::read(&path)
            .ok()
            .and_then(|pem| crate::maa::load_pem_chain(&pem).ok())
            .and_then(|chain| chain.into_iter().next())
            .map(|leaf| leaf.tbs_certificate.subject_public_key_info == spki)
            .unwrap_or(false);
        if up_to_date {
            continue;
        }
        let leaf = crate::pki::issue_server_leaf(
            &app.pki.ca_cert,
            &app.pki.ca_key,
            "localhost",
            spki,
            name.ends_with("tls-rsa"),
        )?;
        let text = pem_encode("CERTIFICATE", &crate::pki::cert_der(&leaf)?) + &app.pki.ca_pem();
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn shell_value(text: &str) -> String {
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/:._-+,=@".contains(c))
    {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// The identity-endpoint secret, made once per directory.
fn load_identity_header(layout: &Layout) -> Result<String, String> {
    let dir = layout.dir.join("identity");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("identity-header");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        _ => {
            let secret = crate::util::random_hex(32);
            write_atomic(&path, secret.as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(secret)
        }
    }
}

/// `DIR/identity/`: a federated token (workload identity) and ready-made access tokens for
/// the vault and the managed HSM (identity source `token-file`), valid 24 h from this start.
fn write_identity_files(app: &App) -> Result<(), String> {
    let dir = app.layout.dir.join("identity");
    let w = |name: &str, text: String| {
        let path = dir.join(name);
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    w("federated-token", crate::tenant::federated_token(app))?;
    let client = crate::tenant::SYSTEM_CLIENT_ID;
    let object = crate::tenant::SYSTEM_OBJECT_ID;
    w(
        "vault-token",
        crate::tenant::access_token_for(app, "https://vault.azure.net", client, object).0,
    )?;
    w(
        "mhsm-token",
        crate::tenant::access_token_for(app, "https://managedhsm.azure.net", client, object).0,
    )?;
    Ok(())
}

/// `DIR/security-context/`: THIM JSON, security policy and UVM reference info, each base64.
fn write_security_context(app: &App) -> Result<(), String> {
    let sc = app.layout.security_context_dir();
    let w = |name: &str, text: String| {
        let path = sc.join(name);
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    std::fs::create_dir_all(&sc).map_err(|e| format!("cannot create {}: {e}", sc.display()))?;
    w(
        "host-amd-cert-base64",
        b64std(app.thim_json().to_string().as_bytes()),
    )?;
    w(
        "security-policy-base64",
        b64std(app.platform().security_policy.as_bytes()),
    )?;
    w(
        "reference-info-base64",
        b64std(&crate::cose::reference_info(app)?),
    )?;
    Ok(())
}

/// The module config's `[platform]` and tokens for the ACI guest (the emulator's simulated SNP
/// report device).
fn aci_config_sections(u: &Urls) -> (String, String) {
    let platform = format!(
        r#"[platform]
evidence = "emulated"
emulator_url = "{platform}"
imds_url = "{imds}"
"#,
        platform = u.platform,
        imds = u.imds
    );
    let tokens = format!(
        r#"[[token]]
label = "skr-demo"
serial = "skr-demo-0001"

[[token.key]]
label = "tls-rsa"
id = "01"
kid = "{vault}/keys/tls-rsa"
certificate = "certs/tls-rsa.pem"
allow_rsa_pkcs_decrypt = true

[[token.key]]
label = "tls-ec"
id = "02"
kid = "{vault}/keys/tls-ec"
certificate = "certs/tls-ec.pem"

[[token.key]]
label = "data-aes"
id = "03"
kid = "{mhsm}/keys/data-aes"

[[token]]
label = "skr-denied"
serial = "skr-denied-0001"

[[token.key]]
label = "denied-rsa"
id = "04"
kid = "{vault}/keys/denied-rsa"
"#,
        vault = u.vault,
        mhsm = u.mhsm
    );
    (platform, tokens)
}

/// The module config's `[platform]` and tokens for a CVM guest: evidence and the boot's event
/// log from the simulated vTPM, the CVM demo keys under the usual token labels.
fn cvm_config_sections(u: &Urls, tcti: &str, tcg_log: &str, p: &str) -> (String, String) {
    let platform = format!(
        r#"[platform]
evidence = "azure-cvm"
tpm_tcti = "{tcti}"
tcg_log = "{tcg_log}"
imds_url = "{imds}"
"#,
        imds = u.imds
    );
    let tokens = format!(
        r#"[[token]]
label = "skr-demo"
serial = "skr-demo-0001"

[[token.key]]
label = "tls-rsa"
id = "01"
kid = "{vault}/keys/{p}-tls-rsa"
certificate = "certs/{p}-tls-rsa.pem"
allow_rsa_pkcs_decrypt = true

[[token.key]]
label = "tls-ec"
id = "02"
kid = "{vault}/keys/{p}-tls-ec"
certificate = "certs/{p}-tls-ec.pem"

[[token.key]]
label = "data-aes"
id = "03"
kid = "{mhsm}/keys/{p}-data-aes"

[[token]]
label = "skr-denied"
serial = "skr-denied-0001"

[[token.key]]
label = "denied-rsa"
id = "04"
kid = "{vault}/keys/{p}-denied-tee"

[[token]]
label = "skr-denied-uvm"
serial = "skr-denied-0002"

[[token.key]]
label = "denied-uvm"
id = "05"
kid = "{vault}/keys/{p}-denied-uvm"

[[token]]
label = "skr-cli-default"
serial = "skr-cli-dflt-01"

[[token.key]]
label = "cli-default"
id = "06"
kid = "{vault}/keys/{p}-cli-default"
"#,
        vault = u.vault,
        mhsm = u.mhsm
    );
    (platform, tokens)
}

fn write_files(
    app: &App,
    guest: GuestPlatform,
    vtpm: Option<&crate::vtpm::SimulatedVtpm>,
) -> Result<(), String> {
    let l = &app.layout;
    let w = |path: std::path::PathBuf, text: &str| {
        write_atomic(&path, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    w(l.ca_file(), &app.pki.ca_pem())?;
    write_demo_certs(app)?;

    write_security_context(app)?;
    write_identity_files(app)?;
    let sc = l.security_context_dir();
    let dir = l.dir.display().to_string();
    let cvm = vtpm.map(|v| (v.paravisor.tcti(), v.tcg_log.clone()));
    let env = [
        ("SKR_PKCS11_CONFIG", l.config_file().display().to_string()),
        ("SKR_EMULATOR_MAA_URL", app.urls.maa.clone()),
        ("SKR_EMULATOR_VAULT_URL", app.urls.vault.clone()),
        ("SKR_EMULATOR_MHSM_URL", app.urls.mhsm.clone()),
        ("SKR_EMULATOR_IMDS_URL", app.urls.imds.clone()),
        ("SKR_EMULATOR_PLATFORM_URL", app.urls.platform.clone()),
        ("SKR_EMULATOR_CA", l.ca_file().display().to_string()),
        ("SKR_EMULATOR_DIR", dir),
        ("UVM_SECURITY_CONTEXT_DIR", sc.display().to_string()),
        (
            "SKR_EMULATOR_IDENTITY_ENDPOINT",
            format!("{}/msi/token", app.urls.imds),
        ),
        ("SKR_EMULATOR_AUTHORITY_HOST", app.urls.platform.clone()),
        (
            "SKR_EMULATOR_TENANT_ID",
            crate::tenant::TENANT_ID.to_string(),
        ),
        ("SKR_EMULATOR_GUEST_PLATFORM", guest.name().to_string()),
    ]
    .iter()
    .chain(
        cvm.iter()
            .flat_map(|(tcti, log)| {
                [
                    ("SKR_EMULATOR_TPM_TCTI", tcti.clone()),
                    ("SKR_EMULATOR_TCG_LOG", log.display().to_string()),
                ]
            })
            .collect::<Vec<_>>()
            .iter(),
    )
    .map(|(k, v)| format!("export {k}={}\n", shell_value(v)))
    .collect::<String>();
    w(l.env_file(), &env)?;

    let u = &app.urls;
    let (platform_section, token_sections) = match &cvm {
        Some((tcti, log)) => {
            // Relative to the config's directory (the module resolves it there), like ca_file.
            let log = log.strip_prefix(&l.dir).unwrap_or(log);
            cvm_config_sections(u, tcti, &log.display().to_string(), guest.name())
        }
        None => aci_config_sections(u),
    };
    let config = format!(
        r#"# Written by skr-emulator for the emulator in this directory.
[logging]
level = "info"
target = "stderr"

{platform_section}
[attestation]
url = "{maa}"

[identity]
source = "imds"
imds_url = "{imds}"

[tls]
ca_file = "ca.pem"

{token_sections}"#,
        imds = u.imds,
        maa = u.maa,
    );
    w(l.config_file(), &config)?;
    Ok(())
}

fn tls_configs(pki: &Pki) -> Result<(rustls::ServerConfig, rustls::ClientConfig), String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = vec![
        CertificateDer::from(pki.tls_cert_der.clone()),
        CertificateDer::from(pki.ca_der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.tls_key_pkcs8.clone()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("TLS server certificate: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.ca_der.clone()))
        .map_err(|e| format!("emulator CA: {e}"))?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((server, client))
}

fn start_vtpm(app: &Arc<App>, guest: GuestPlatform) -> Result<crate::vtpm::SimulatedVtpm, String> {
    let isolation = if guest == GuestPlatform::CvmTdx {
        let keys = Arc::new(crate::tdx::TdxKeys::generate());
        let _ = app.tdx.set(keys.clone());
        crate::vtpm::Isolation::Tdx(keys)
    } else {
        crate::vtpm::Isolation::Snp(app.pki.vcek_key.clone())
    };
    let platform_app = app.clone();
    struct Hooks(Arc<App>);
    impl crate::vtpm::ParavisorHooks for Hooks {
        fn skip_refresh(&self) -> bool {
            self.0.admin.take_fault("vtpm-hcl-refresh").is_some()
        }
        fn command_fault(&self, command: &[u8]) -> Option<u32> {
            let cc = crate::vtpm::command_code(command)?;
            let rc = if cc == crate::vtpm::TPM_CC_CREATE_PRIMARY {
                match self.0.admin.take_fault("vtpm-command")?.kind {
                    crate::admin::FaultKind::Throttle => crate::vtpm::TPM_RC_RETRY,
                    _ => crate::vtpm::TPM_RC_LOCKOUT,
                }
            } else if crate::vtpm::is_nv_read_of(command, crate::vtpm::NV_HCL_REPORT) {
                self.0.admin.take_fault("vtpm-nv-unwritten")?;
                crate::vtpm::TPM_RC_NV_UNINITIALIZED
            } else {
                return None;
            };
            self.0
                .admin
                .log("vtpm", "fault", json!({"command": cc, "rc": rc}));
            Some(rc)
        }
        fn refreshed(&self, outcome: Option<Result<(), String>>) {
            match outcome {
                Some(Ok(())) => self.0.admin.log("vtpm", "hcl-report-refreshed", json!({})),
                Some(Err(e)) => {
                    self.0
                        .admin
                        .log("vtpm", "hcl-report-refresh-failed", json!({"reason": e}))
                }
                None => {
                    self.0
                        .admin
                        .log("vtpm", "hcl-report-refresh-skipped", json!({"fault": true}))
                }
            }
        }
    }
    let vtpm = crate::vtpm::SimulatedVtpm::start(
        &app.layout.dir.join("vtpm"),
        Arc::new(move || platform_app.platform()),
        isolation,
        Arc::new(Hooks(app.clone())),
    )?;
    let _ = app.vtpm_ca.set(vtpm.ca.cert.clone());
    app.admin.log(
        "vtpm",
        "started",
        json!({"tcti": vtpm.paravisor.tcti(), "vmid": vtpm.identity.vm_id}),
    );
    Ok(vtpm)
}

/// Runs the emulator in this process until SIGTERM / SIGINT.
pub fn run_foreground(
    layout: Layout,
    base_port: Option<u16>,
    guest: GuestPlatform,
) -> Result<(), String> {
    check_dir(&layout)?;
    // Held for the life of the process: two emulators never share a state directory, even
    // when started at the same moment.
    let _state_lock = lock_state(&layout)?;
    // Read every state file before changing anything, so a corrupt one stops us cleanly.
    let platform = state::load_platform(&layout)?;
    let keys: KeysFile = state::read_json(&layout.keys_file())?.unwrap_or_default();
    let _: Option<Ports> = state::read_json(&layout.ports_file())?;
    let pki = Pki::load_or_create(&layout, &platform)?;
    let (ports, listeners, previous_ports) = bind_ports(&layout, base_port)?;
    let (server_tls, client_tls) = tls_configs(&pki)?;
    let https = |p: u16| format!("https://127.0.0.1:{p}");
    let urls = Urls {
        maa: https(ports.maa),
        vault: https(ports.vault),
        mhsm: https(ports.mhsm),
        imds: format!("http://127.0.0.1:{}", ports.imds),
        platform: https(ports.platform),
    };
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(client_tls)
        .timeout(Duration::from_secs(15))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let trusted_arks = crate::maa::trusted_arks(&pki.ark_der);
    let app = Arc::new(App::new(AppParts {
        admin: Admin::new(layout.log_file()),
        layout: layout.clone(),
        urls,
        pki,
        platform,
        keys,
        trusted_arks,
        identity_header: load_identity_header(&layout)?,
        http,
    }));
    follow_maa_url(&app, previous_ports)?;
    // A CVM guest: a fresh simulated vTPM (like a VM's boot) behind the paravisor relay, for
    // the life of this process (swtpm stops with it).
    let vtpm = match guest {
        GuestPlatform::Aci => None,
        GuestPlatform::CvmSnp | GuestPlatform::CvmTdx => Some(start_vtpm(&app, guest)?),
    };
    provision_demo_keys(&app, guest)?;
    write_files(&app, guest, vtpm.as_ref())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let served = runtime.block_on(serve(app, listeners, server_tls));
    // Dropping the runtime would wait for every blocking job; one stuck in CPU-heavy work
    // would keep the process alive after SIGTERM. Give them a moment, then exit regardless.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

async fn serve(
    app: Arc<App>,
    listeners: Vec<TcpListener>,
    tls: rustls::ServerConfig,
) -> Result<(), String> {
    for l in &listeners {
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let mut listeners = listeners.into_iter();
    let mut next = || listeners.next().ok_or("listener");
    let (maa_l, vault_l, mhsm_l, imds_l, platform_l) =
        (next()?, next()?, next()?, next()?, next()?);
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
    let handle = axum_server::Handle::new();

    let maa = Router::new()
        .fallback(crate::maa::dispatch)
        .with_state(app.clone());
    let vault = Router::new()
        .fallback(keyvault::dispatch)
        .with_state(keyvault::Service {
            app: app.clone(),
            kind: Kind::Vault,
        });
    let mhsm = Router::new()
        .route("/{*path}", any(keyvault::dispatch))
        .fallback(keyvault::dispatch)
        .with_state(keyvault::Service {
            app: app.clone(),
            kind: Kind::Mhsm,
        });
    let mut tasks = Vec::new();
    for (listener, router) in [
        (maa_l, with_request_log(maa, &app, "maa")),
        (vault_l, with_request_log(vault, &app, "vault")),
        (mhsm_l, with_request_log(mhsm, &app, "mhsm")),
        (
            platform_l,
            with_request_log(platform_router(app.clone()), &app, "platform"),
        ),
    ] {
        // TCP_NODELAY: without it a response written in two segments waited for the client's
        // delayed ACK (40 ms on Linux), which p11-bench saw as 40 ms of MAA and of AKV
        // release time per login that neither side spent working. Azure's front ends do not
        // add that delay either.
        let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls.clone())
            .acceptor(axum_server::accept::NoDelayAcceptor::new());
        let server = axum_server::from_tcp(listener)
            .acceptor(acceptor)
            .handle(handle.clone());
        tasks.push(tokio::spawn(server.serve(router.into_make_service())));
    }
    let imds_listener = tokio::net::TcpListener::from_std(imds_l).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let imds_app = app.clone();
    let imds_task = tokio::spawn(async move {
        let router = with_request_log(imds_router(imds_app.clone()), &imds_app, "imds");
        axum::serve(imds_listener, router)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    // Signal handlers first: a `down` right after start-up must find them installed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let (pid_file, ready_file) = (app.layout.pid_file(), app.layout.ready_file());
    for file in [&pid_file, &ready_file] {
        std::fs::write(file, std::process::id().to_string())
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    app.admin.log(
        "emulator",
        "started",
        json!({"urls": {
        "maa": app.urls.maa, "vault": app.urls.vault, "mhsm": app.urls.mhsm,
        "imds": app.urls.imds, "platform": app.urls.platform}}),
    );
    eprintln!(
        "skr-emulator running: MAA {} vault {} mHSM {} IMDS {} platform {}",
        app.urls.maa, app.urls.vault, app.urls.mhsm, app.urls.imds, app.urls.platform
    );
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    app.admin.log("emulator", "stopping", json!({}));
    handle.graceful_shutdown(Some(Duration::from_secs(3)));
    let _ = stop_tx.send(());
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), imds_task).await;
    let _ = std::fs::remove_file(&ready_file);
    let _ = std::fs::remove_file(&pid_file);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn catch_unwind_turns_a_panic_into_an_error() {
        let ok = CatchUnwind(Box::pin(async { 7 })).await;
        assert_eq!(ok, Ok(7));
        let failed = CatchUnwind(Box::pin(async {
            tokio::task::yield_now().await;
            panic!("handler bug");
        }))
        .await;
        assert_eq!(failed, Err::<(), _>("handler bug".to_string()));
    }

    #[test]
    fn shell_values_are_quoted_only_when_needed() {
        assert_eq!(shell_value("/tmp/skr-1/env"), "/tmp/skr-1/env");
        assert_eq!(
            shell_value("https://127.0.0.1:443"),
            "https://127.0.0.1:443"
        );
        assert_eq!(shell_value("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_value("it's"), "'it'\\''s'");
    }
}
