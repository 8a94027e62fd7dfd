//! p11-stress: seeded random call sequences against any PKCS#11 module, checked against
//! invariants that hold for every module (see `stress.rs`).
//!
//! `p11-stress --module /path/lib.so --token-label LABEL [--pin PIN] [--steps N] [--threads T]
//! [--seed S] [--no-fork]` prints the CK_RVs seen per function and every violation; the exit
//! status is 1 when there is a violation, 3 on a hang, 2 when the run could not start.

#[allow(dead_code)]
#[path = "../module.rs"]
mod module;
#[path = "../stress.rs"]
mod stress;

use clap::Parser;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Random C API stress test of any PKCS#11 module")]
struct Args {
    /// Path of the PKCS#11 module (.so).
    #[arg(long)]
    module: String,
    /// Label of the token to test (it must show at least one object after login).
    #[arg(long)]
    token_label: String,
    /// User PIN; omit for a protected authentication path (NULL PIN).
    #[arg(long)]
    pin: Option<String>,
    /// Random steps in total (a step makes one to about ten calls; the report counts calls).
    #[arg(long, default_value_t = 1_000_000)]
    steps: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed (default: from the clock; printed, so that a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Steps per phase; between phases: fork, close-all / re-initialise, login.
    #[arg(long, default_value_t = 50_000)]
    phase_steps: u64,
    /// Do not fork between phases.
    #[arg(long)]
    no_fork: bool,
    /// Steps a forked child runs.
    #[arg(long, default_value_t = 2_000)]
    fork_steps: u64,
    /// Seconds without a returning call that count as a hang.
    #[arg(long, default_value_t = 60)]
    hang_seconds: u64,
    /// Name every call on stderr before making it (slow; to locate a crash).
    #[arg(long)]
    trace: bool,
    /// Soak: run phases for this many seconds instead of --steps.
    #[arg(long)]
    duration_seconds: Option<u64>,
    /// Faults are injected into the services: a login between phases that fails with a
    /// documented CK_RV is counted and retried instead of ending the run.
    #[arg(long)]
    login_faults: bool,
}

fn main() {
    let a = Args::parse();
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "p11-stress of {} (token {:?}): seed {seed}, {} threads",
        a.module, a.token_label, a.threads
    );
    stress::TRACE.store(a.trace, std::sync::atomic::Ordering::Relaxed);
    let m = match module::Module::load(&a.module) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("p11-stress: {e}");
            std::process::exit(2);
        }
    };
    let o = stress::Options {
        seed,
        steps: a.steps,
        threads: a.threads,
        token_label: a.token_label,
        pin: a.pin.map(String::into_bytes),
        phase_steps: a.phase_steps,
        fork: !a.no_fork,
        fork_steps: a.fork_steps,
        hang: Duration::from_secs(a.hang_seconds),
        duration: a.duration_seconds.map(Duration::from_secs),
        login_faults: a.login_faults,
    };
    match stress::run(m, &o) {
        Ok(r) => {
            stress::print(&r);
            std::process::exit(if r.violations.is_empty() { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("p11-stress: {e}");
            std::process::exit(2);
        }
    }
}
