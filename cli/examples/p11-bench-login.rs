//! p11-bench-login: skr-pkcs11's C_Login breakdown, module side. Calls the module's release
//! path (`skr_pkcs11::release::release_token`, what C_Login runs) against skr-emulator, and
//! subtracts the emulator's own handling time (from its request log) on the critical path.
//! A binary of its own: linking skr-pkcs11 installs its arena allocator under AWS-LC, which
//! must not happen in p11-bench, whose "raw engine" column is aws-lc-rs alone.
//!
//!   p11-bench-login --config CONFIG --token L [--count N] [--emulator-log EMULATOR_DIR]

use clap::Parser;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "skr-pkcs11 C_Login breakdown against skr-emulator, module side")]
struct Cli {
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// skr-emulator's directory: its request log (DIR/emulator.log) gives the emulator's
    /// own handling time, which is subtracted to get the module side.
    #[arg(long)]
    emulator_log: Option<PathBuf>,
}

type Res<T> = Result<T, String>;

fn main() {
    let c = Cli::parse();
    if let Err(e) = login(&c.config, &c.token, c.count, c.emulator_log.as_deref()) {
        eprintln!("p11-bench-login: {e}");
        std::process::exit(1);
    }
}

/// The emulator's handling time of the requests of one login, from its request log: per
/// step, and on the login's critical path (platform / CVM collateral + MAA, then the slowest
/// key's requests; the identity requests run beside evidence and MAA except a second
/// audience's token). The vTPM's own time (swtpm) is not in the log: on a CVM it counts as
/// module side, like a real vTPM's would.
#[derive(Default, Clone, Copy)]
struct EmuTime {
    evidence: Duration,
    maa: Duration,
    identity: Duration,
    release_sum: Duration,
    critical: Duration,
    requests: usize,
}

fn emulator_time(log: &Path, from: u64) -> Res<EmuTime> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(log).map_err(|e| format!("{}: {e}", log.display()))?;
    f.seek(std::io::SeekFrom::Start(from))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let mut t = EmuTime::default();
    let mut per_key: std::collections::HashMap<String, Duration> = Default::default();
    let mut late_identity = Duration::ZERO;
    let mut seen_release = false;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["event"] != "request" {
            continue;
        }
        let us = v["us"]
            .as_u64()
            .ok_or("the emulator log has no \"us\" field (rebuild skr-emulator)")?;
        let d = Duration::from_micros(us);
        t.requests += 1;
        let path = v["path"].as_str().unwrap_or_default();
        match v["service"].as_str().unwrap_or_default() {
            "platform" => t.evidence += d,
            "maa" => t.maa += d,
            // On a CVM the evidence step asks IMDS for collateral (THIM) or a TD quote.
            "imds" if path.contains("/THIM/") || path.starts_with("/acc/") => t.evidence += d,
            "imds" => {
                t.identity += d;
                if seen_release {
                    late_identity += d;
                }
            }
            "vault" | "mhsm" => {
                seen_release = true;
                t.release_sum += d;
                let key = path.split('/').nth(2).unwrap_or_default().to_string();
                *per_key.entry(key).or_default() += d;
            }
            _ => {}
        }
    }
    t.critical =
        t.evidence + t.maa + per_key.values().max().copied().unwrap_or_default() + late_identity;
    Ok(t)
}

fn login(config: &Path, token: &str, count: usize, emu: Option<&Path>) -> Res<()> {
    let cfg = skr_pkcs11::config::Config::load(config).map_err(|e| e.to_string())?;
    let tok = cfg
        .tokens
        .iter()
        .find(|t| t.label == token)
        .ok_or(format!("no token {token} in the config"))?;
    let log = emu.map(|d| d.join("emulator.log"));
    type Row = (
        Duration,
        skr_pkcs11::release::LoginTimings,
        EmuTime,
        Duration,
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut first = None;
    for i in 0..=count {
        let from = match &log {
            Some(l) => std::fs::metadata(l).map(|m| m.len()).unwrap_or(0),
            None => 0,
        };
        let (c0, t) = (cpu_time(), Instant::now());
        let (keys, timings) =
            skr_pkcs11::release::release_token(&cfg, tok).map_err(|e| e.to_string())?;
        let (total, cpu) = (t.elapsed(), cpu_time().saturating_sub(c0));
        drop(keys);
        // The emulator appends its log line after the response is sent: let it land.
        std::thread::sleep(Duration::from_millis(20));
        let e = match &log {
            Some(l) => emulator_time(l, from)?,
            None => EmuTime::default(),
        };
        if i == 0 {
            // The process's first login also pays one-time costs (AWS-LC's entropy source
            // initialisation, TLS session caches, the MAA signing keys): shown apart.
            first = Some(total);
        } else {
            rows.push((total, timings, e, cpu));
        }
    }
    rows.sort_by_key(|r| r.0);
    let (total, t, e, cpu) = &rows[rows.len() / 2];
    let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    let both = |d: &Duration, em: &Duration| {
        if log.is_some() {
            format!("{} ({})", ms(d), ms(em))
        } else {
            ms(d)
        }
    };
    println!("Median of {count} logins (the first login of the process, not counted: {} ms). Per step: wall time seen by the module (of which the emulator's own handling, from its request log). Module side = total − the emulator's handling on the critical path.", first.map(|d| ms(&d)).unwrap_or_default());
    println!();
    println!("| token | keys | login total ms | module side ms | module CPU ms (all threads) | transfer key | evidence | MAA | identity (beside evidence + MAA) | AKV release, all keys (sum over keys) | unwrap |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {token} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        tok.keys.len(),
        ms(total),
        if log.is_some() {
            ms(&total.saturating_sub(e.critical))
        } else {
            "–".into()
        },
        ms(cpu),
        ms(&t.transfer_key),
        both(&t.evidence, &e.evidence),
        both(&t.attestation, &e.maa),
        both(&t.identity, &e.identity),
        both(&t.release, &e.release_sum),
        ms(&t.unwrap)
    );
    if let Some(tpm) = &t.tpm {
        // The same median login: its vTPM commands (libtss2 + the TPM), by step.
        println!();
        println!("| vTPM, same login | create (CreatePrimary + PolicyPCR) | certify | NV user-data write + HCL report read | AK public + certificate | quote + PCR read | MAA token key decrypt (RSAES) | key unwraps (OAEP + AES-KWP, = unwrap above) |");
        println!("|---|---|---|---|---|---|---|---|");
        println!(
            "| {token} | {} | {} | {} | {} | {} | {} | {} |",
            ms(&tpm.create),
            ms(&tpm.certify),
            ms(&tpm.nv_report),
            ms(&tpm.ak),
            ms(&tpm.quote),
            ms(&tpm.token_decrypt),
            ms(&t.unwrap)
        );
    }
    Ok(())
}

/// CPU time of this process (all threads): the module's work, the emulator excluded.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
