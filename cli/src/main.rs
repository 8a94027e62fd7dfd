//! `skr-pkcs11`: operator tool for the module's configuration and login path.
//!
//! * `doctor` — load the config, check the evidence source, reach MAA, identity and AKV; print a
//!   table. Never prints tokens or keys.
//! * `attest` — produce evidence, attest with MAA, verify the token, print its claims.
//! * `release` — run the whole login path for a token; print what was released (kinds and
//!   sizes only) and the step timings.
//! * `policy check` — evaluate a release policy against a claim set locally.
//! * `evidence show` — what an evidence file holds (HCL report, SNP report, TD quote,
//!   TPMS_ATTEST), as JSON.

use clap::{Parser, Subcommand};
use serde_json::Value;
use skr_pkcs11::config::Config;
use skr_pkcs11::error::Error;
use skr_pkcs11::policy;
use skr_pkcs11::release::{self, akv, evidence, identity, jws, unwrap, KeyMaterial, LoginTimings};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "skr-pkcs11",
    version,
    about = "Azure Secure Key Release PKCS#11 module: operator tool"
)]
pub(crate) struct Cli {
    /// Config file (default: $SKR_PKCS11_CONFIG, then /etc/skr-pkcs11/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log the login path's steps (debug level) to stderr; default: warnings only.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the configuration and every service the login path needs.
    Doctor,
    /// Attest with MAA and print the verified token's claims (JSON).
    Attest,
    /// Release the keys of a token (default: the first) and report what came back.
    Release {
        #[arg(long)]
        token: Option<String>,
    },
    /// Release-policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCmd,
    },
    /// Evidence tools.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCmd,
    },
    /// Show the lease status of the released keys of running processes (from the status
    /// file of `release.status_file`): version, released at, lease end, next refresh, failures.
    Status {
        /// Print the Prometheus text as it is.
        #[arg(long)]
        raw: bool,
    },
}

#[derive(Subcommand)]
enum EvidenceCmd {
    /// Print, as JSON, what an evidence file holds: an Azure HCL report (vTPM NV 0x01400001),
    /// a raw SNP report (binary or hex), a DCAP v4 TD quote, a TPMS_ATTEST, or a Trustee
    /// az-snp-vtpm evidence bundle (JSON). For an HCL report, binding_ok says whether the
    /// hardware report binds the runtime claims; for a bundle, report_signature_ok,
    /// quote_signature_ok, pcr_digest_ok and nonce_in_user_data say which checks hold.
    Show { file: PathBuf },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Evaluate a policy (JSON, or base64/base64url as in release_policy.data) against claims
    /// (a JSON claim object, a decoded {header, payload}, or a compact JWT).
    Check {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        claims: PathBuf,
        /// Token issuer (default: the claims' iss).
        #[arg(long)]
        issuer: Option<String>,
    },
}

/// The module logs through `log`; the tool shows those records on stderr (never stdout, which
/// carries the tool's own output).
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        // Debug detail only from the module itself, not from the TLS and HTTP crates.
        // Without --verbose, errors are not logged: the tool prints the returned error once.
        let verbose = log::max_level() >= log::LevelFilter::Debug;
        m.level() <= log::max_level()
            && (verbose || m.level() != log::Level::Error)
            && (m.level() <= log::Level::Info || m.target().starts_with("skr_pkcs11"))
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("{:<5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if cli.verbose {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Warn
        });
    }
    let result = match &cli.command {
        Cmd::Doctor => load(&cli).map(|cfg| doctor(&cfg)),
        Cmd::Attest => load(&cli).and_then(|cfg| attest(&cfg)),
        Cmd::Release { token } => load(&cli).and_then(|cfg| release_cmd(&cfg, token.as_deref())),
        Cmd::Policy {
            command:
                PolicyCmd::Check {
                    policy,
                    claims,
                    issuer,
                },
        } => policy_check(policy, claims, issuer.as_deref()),
        Cmd::Evidence {
            command: EvidenceCmd::Show { file },
        } => evidence_show(file),
        Cmd::Status { raw } => load(&cli).and_then(|cfg| status(&cfg, *raw)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn load(cli: &Cli) -> Result<Config, Error> {
    match &cli.config {
        Some(p) => Config::load(p),
        None => Config::load_default(),
    }
}

/// One row of the doctor's table.
struct Check {
    what: String,
    ok: bool,
    detail: String,
}

fn doctor(cfg: &Config) -> ExitCode {
    let mut rows = vec![Check {
        what: "config".into(),
        ok: true,
        detail: format!(
            "{} ({} token(s), {} key(s))",
            cfg.source_path.display(),
            cfg.tokens.len(),
            cfg.tokens.iter().map(|t| t.keys.len()).sum::<usize>()
        ),
    }];
    let mut push = |what: &str, r: Result<String, Error>| {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, e.to_string()),
        };
        rows.push(Check {
            what: what.to_string(),
            ok,
            detail,
        });
    };
    let session = match release::Session::new(cfg) {
        Ok(s) => s,
        Err(e) => {
            push("tls", Err(e));
            print_table(&rows);
            return ExitCode::FAILURE;
        }
    };
    push(
        "tls",
        Ok(match &cfg.tls.ca_file {
            Some(p) => format!("web roots + {}", p.display()),
            None => "web roots".into(),
        }),
    );

    // Evidence: an actual report over a probe value, and its collateral.
    let mut timings = LoginTimings::default();
    let evidence_row = if evidence::uses_vtpm(cfg) {
        // The vTPM path has no SNP report of its own: the `tpm …` rows below check it step by
        // step, and `attestation` runs it whole.
        Ok(format!(
            "azure-cvm: the vTPM at {} holds an HCL report (NV 0x01400001)",
            cfg.platform
                .tpm_tcti
                .as_deref()
                .unwrap_or("device:/dev/tpmrm0")
        ))
    } else {
        evidence::provider(cfg, &session.http).and_then(|p| {
            let rd = evidence::report_data_for(b"skr-pkcs11 doctor");
            let ev = p.get_report(&rd)?;
            evidence::check_report(&ev.report, &rd)?;
            let chain = match ev.vcek_chain_pem {
                Some(_) => "VCEK chain from the provider".to_string(),
                None => {
                    let c = evidence::collateral(cfg, &session.http)?;
                    format!(
                        "VCEK chain from {}{}",
                        if evidence::security_context_dir(cfg).is_some() {
                            "the security context"
                        } else {
                            "IMDS THIM"
                        },
                        if c.uvm_reference_info.is_some() {
                            " + UVM endorsement"
                        } else {
                            ""
                        }
                    )
                }
            };
            Ok(format!(
                "{}: {}-byte report; {chain}",
                p.name(),
                ev.report.len()
            ))
        })
    };
    push("evidence", evidence_row);

    // The Azure CVM vTPM path, step by step, when there is a TPM to check (configured, or the
    // kernel resource manager exists). It writes nothing to the TPM's NV.
    #[cfg(feature = "cvm")]
    if cfg.platform.tpm_tcti.is_some() || Path::new("/dev/tpmrm0").exists() {
        for (what, r) in release::tpm::doctor_steps(cfg.platform.tpm_tcti.as_deref()) {
            push(what, r);
        }
        push("tcg log", release::cvm::tcg_log_row(cfg));
    }

    // MAA: the full attestation, so that policy mismatches show up here too.
    let attested = release::attest(cfg, &session, &mut timings);
    let claims = match &attested {
        Ok(a) => {
            push(
                "attestation",
                Ok(format!(
                    "{}: token verified (type {}, {:?})",
                    a.issuer,
                    a.claims["x-ms-attestation-type"].as_str().unwrap_or("?"),
                    timings.attestation
                )),
            );
            Some(a)
        }
        Err(e) => {
            push("attestation", Err(e.clone()));
            None
        }
    };

    // Identity and AKV for every key.
    let id = identity::Identity::new(&session.http, &cfg.identity);
    let enc =
        unwrap::WrapAlg::from_name(&cfg.release.enc).unwrap_or(unwrap::WrapAlg::RsaAesKeyWrap256);
    let vault = akv::Akv::new(
        &session.http,
        &id,
        &session.anchors,
        &cfg.release.api_version,
        enc,
    );
    let mut resources = std::collections::BTreeSet::new();
    for t in &cfg.tokens {
        for k in &t.keys {
            let host = jws::url_host(&k.kid).unwrap_or_default();
            resources.insert(identity::default_resource(&host));
        }
    }
    for r in resources {
        push(
            &format!("identity {r}"),
            id.token(r, false)
                .map(|_| format!("{}: token received", source_name(cfg))),
        );
    }
    for t in &cfg.tokens {
        for k in &t.keys {
            let row = format!("key {}/{}", t.label, k.label);
            push(
                &row,
                vault.get_key(k).and_then(|b| {
                    let version = b
                        .kid
                        .as_deref()
                        .and_then(akv::key_version)
                        .map(|v| {
                            let pinned = if akv::key_version(&k.kid).is_some() {
                                "pinned"
                            } else {
                                "current"
                            };
                            format!(" version {v} ({pinned})")
                        })
                        .unwrap_or_default();
                    let mut d = format!("{} key{version}", b.public.kind());
                    match (&b.policy_data, claims) {
                        (None, _) => d.push_str("; no release policy (not exportable?)"),
                        (Some(p), Some(a)) => match policy::parse_encoded(p) {
                            Err(e) => d.push_str(&format!("; {e}")),
                            Ok(p) => match policy::evaluate(&p, &a.issuer, &a.claims) {
                                Ok(()) => d.push_str("; release policy met by this TEE"),
                                Err(why) => {
                                    return Err(Error::denied(
                                        skr_pkcs11::error::Step::Release,
                                        format!("{d}; release policy NOT met: {why}"),
                                    ))
                                }
                            },
                        },
                        (Some(_), None) => {
                            d.push_str("; release policy not evaluated (no attestation)")
                        }
                    }
                    Ok(d)
                }),
            );
        }
    }
    for (origin, resource) in vault.learned_resources() {
        push(
            &format!("identity {resource}"),
            Ok(format!(
                "{}: token received (audience named by {origin}'s 401 challenge)",
                source_name(cfg)
            )),
        );
    }
    print_table(&rows);
    if rows.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn source_name(cfg: &Config) -> &'static str {
    use skr_pkcs11::config::IdentitySource::*;
    match cfg.identity.source {
        Imds => "imds",
        IdentityEndpoint => "identity-endpoint",
        WorkloadIdentity => "workload-identity",
        TokenFile => "token-file",
    }
}

fn print_table(rows: &[Check]) {
    let width = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    for r in rows {
        println!(
            "{:<width$}  {:<4}  {}",
            r.what,
            if r.ok { "ok" } else { "FAIL" },
            r.detail
        );
    }
}

fn attest(cfg: &Config) -> Result<ExitCode, Error> {
    let session = release::Session::new(cfg)?;
    let mut timings = LoginTimings::default();
    let a = release::attest(cfg, &session, &mut timings)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&a.claims).expect("claims are JSON")
    );
    eprintln!(
        "evidence: {}; token verified against {} (evidence {:?}, attestation {:?})",
        a.evidence_source, a.issuer, timings.evidence, timings.attestation
    );
    Ok(ExitCode::SUCCESS)
}

fn release_cmd(cfg: &Config, label: Option<&str>) -> Result<ExitCode, Error> {
    let token = match label {
        Some(l) => cfg
            .tokens
            .iter()
            .find(|t| t.label == l)
            .ok_or_else(|| Error::config(format!("no token labelled {l:?} in the config")))?,
        None => &cfg.tokens[0],
    };
    let (keys, t) = release::release_token(cfg, token)?;
    for k in &keys {
        let kc = &token.keys[k.index];
        let (form, len) = match &k.material {
            KeyMaterial::Pkcs8(s) => ("PKCS#8", s.len()),
            KeyMaterial::Raw(s) => ("raw", s.len()),
        };
        println!(
            "{:<24} version {:<32} {form:<7} {len:>5} bytes  checked against GET {}",
            kc.label, k.version, kc.kid
        );
    }
    println!(
        "timings: transfer-key {:?}, evidence {:?}, attestation {:?}, identity {:?}, release {:?}, unwrap {:?}",
        t.transfer_key, t.evidence, t.attestation, t.identity, t.release, t.unwrap
    );
    Ok(ExitCode::SUCCESS)
}

/// `skr-pkcs11 status`: the status file the refreshing process writes, as a table.
fn status(cfg: &Config, raw: bool) -> Result<ExitCode, Error> {
    let path = cfg.release.status_file.as_ref().ok_or_else(|| {
        Error::config("release.status_file is not set: the running processes publish no status")
            .with_hint("set release.status_file in the config (e.g. /run/skr-pkcs11/status.prom) and restart the service")
    })?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!("{}: {e}", path.display()))
            .with_hint("the file appears after the first refresh of a running process (release.refresh after its login)")
    })?;
    if raw {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let samples = parse_prometheus(&text);
    let get = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|(_, l, v)| (l.clone(), *v))
    };
    let when = |secs: f64| -> String {
        if secs <= 0.0 {
            return "never".into();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let d = secs - now;
        if d >= 0.0 {
            format!("in {}", human(d))
        } else {
            format!("{} ago", human(-d))
        }
    };
    let mut failed = false;
    for t in &cfg.tokens {
        let tl = t.label.as_str();
        let Some((_, next)) = get("skr_pkcs11_token_next_refresh_seconds", &[("token", tl)]) else {
            println!("token {tl}: no status (not logged in by a running process)");
            continue;
        };
        let failures = get("skr_pkcs11_token_refresh_failures", &[("token", tl)])
            .map(|x| x.1)
            .unwrap_or(0.0);
        let class = get("skr_pkcs11_token_last_failure_info", &[("token", tl)])
            .and_then(|(l, _)| l.into_iter().find(|(k, _)| k == "class").map(|(_, v)| v))
            .unwrap_or_default();
        let processes = get("skr_pkcs11_token_processes", &[("token", tl)])
            .map(|x| x.1)
            .unwrap_or(0.0);
        println!(
            "token {tl}: next refresh {}, {} process(es), {} consecutive failure(s){}",
            when(next),
            processes as u64,
            failures as u64,
            if failures > 0.0 {
                format!(" (last: {class})")
            } else {
                String::new()
            }
        );
        for k in &t.keys {
            let Some((labels, _)) = get("skr_pkcs11_key_info", &[("token", tl), ("key", &k.label)])
            else {
                println!("  {:<24} not released", k.label);
                continue;
            };
            let label = |name: &str| {
                labels
                    .iter()
                    .find(|(a, _)| a == name)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default()
            };
            let state = label("state");
            failed |= state != "live";
            let released = get(
                "skr_pkcs11_key_released_at_seconds",
                &[("token", tl), ("key", &k.label)],
            )
            .map(|x| x.1)
            .unwrap_or(0.0);
            let expires = get(
                "skr_pkcs11_key_expires_at_seconds",
                &[("token", tl), ("key", &k.label)],
            )
            .map(|x| when(x.1));
            println!(
                "  {:<24} {state:<8} version {:<32} released {}{}",
                k.label,
                label("version"),
                when(released),
                expires
                    .map(|e| format!(", lease ends {e}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// One sample of a Prometheus text document: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus text document (comments skipped).
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (head, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut parsed = Vec::new();
        let mut rest = labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let mut v = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(if n == 'n' { '\n' } else { n });
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            parsed.push((k.trim_start_matches(',').to_string(), v));
            rest = &after[end..];
        }
        out.push((name.to_string(), parsed, value));
    }
    out
}

fn read_json_or_base64(path: &Path) -> Result<Value, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
        return Ok(v);
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    // A compact JWT: its payload.
    if let Ok(c) = jws::split_compact(text) {
        return Ok(c.payload);
    }
    use base64::Engine;
    let decoded = release::b64url_decode(text)
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok())
        .ok_or_else(|| {
            Error::config(format!(
                "{}: neither JSON, a JWT, nor base64 of JSON",
                path.display()
            ))
        })?;
    serde_json::from_slice(&decoded).map_err(|e| {
        Error::config(format!(
            "{}: decoded content is not JSON: {e}",
            path.display()
        ))
    })
}

fn policy_check(
    policy_path: &Path,
    claims_path: &Path,
    issuer: Option<&str>,
) -> Result<ExitCode, Error> {
    let p = read_json_or_base64(policy_path)?;
    // A whole release_policy object or KeyBundle is accepted too.
    let p = match p.pointer("/release_policy/data").or_else(|| p.get("data")) {
        Some(Value::String(data)) => policy::parse_encoded(data),
        _ => policy::parse_value(&p),
    }
    .map_err(|e| Error::config(format!("{}: {e}", policy_path.display())))?;
    let claims = read_json_or_base64(claims_path)?;
    let claims = match claims.get("payload") {
        Some(payload) if payload.is_object() => payload.clone(),
        _ => claims,
    };
    let iss = issuer
        .map(str::to_string)
        .or_else(|| {
            claims
                .get("iss")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .ok_or_else(|| Error::config("the claims have no iss; pass --issuer"))?;
    match policy::evaluate(&p, &iss, &claims) {
        Ok(()) => {
            println!("policy met for issuer {iss}");
            Ok(ExitCode::SUCCESS)
        }
        Err(why) => {
            println!("policy NOT met: {why}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn evidence_show(file: &Path) -> Result<ExitCode, Error> {
    // Evidence files are small (an HCL report is 2600 bytes, a TD quote ~5 KB); refuse
    // anything large instead of reading it whole.
    const MAX_EVIDENCE: u64 = 1 << 20;
    let meta =
        std::fs::metadata(file).map_err(|e| Error::config(format!("{}: {e}", file.display())))?;
    if meta.len() > MAX_EVIDENCE {
        return Err(Error::config(format!(
            "{}: {} bytes is too large for an evidence file",
            file.display(),
            meta.len()
        )));
    }
    let bytes =
        std::fs::read(file).map_err(|e| Error::config(format!("{}: {e}", file.display())))?;
    let described =
        evidence::show::describe(&bytes).map_err(|e| e.context(&file.display().to_string()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&described).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}
