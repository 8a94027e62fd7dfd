//! skr-emulator: a local Microsoft Azure Attestation + Key Vault / Managed HSM + IMDS with a
//! simulated SEV-SNP platform, over HTTPS on 127.0.0.1 (docs/EMULATOR.md). The CLI; the
//! services are the library (`lib.rs`).

use clap::{Parser, Subcommand};
use skr_emulator::{app, state};
use state::Layout;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "skr-emulator",
    version,
    about = "Local Azure Attestation + Key Vault / Managed HSM + IMDS with a simulated SEV-SNP platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the emulator for DIR (state, CA, module config and env file live there).
    Up {
        #[arg(long)]
        dir: PathBuf,
        /// Stay in the foreground instead of detaching.
        #[arg(long)]
        foreground: bool,
        /// Listen on BASE (MAA), BASE+1 (vault), BASE+2 (managed HSM), BASE+3 (IMDS) and
        /// BASE+4 (platform); remembered for later starts. Default: the previous ports, or free
        /// ones on the first start.
        #[arg(long)]
        base_port: Option<u16>,
        /// Seconds to wait for a detached emulator to become ready.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// The simulated guest: `aci` (an SNP report device, the default) or `cvm-snp` (an
        /// Azure confidential VM: a vTPM on swtpm with an HCL report, MAA AzureGuest).
        #[arg(long, default_value = "aci")]
        platform: String,
    },
    /// Stop the emulator running for DIR: SIGTERM, then SIGKILL if it has not stopped in time.
    Down {
        #[arg(long)]
        dir: PathBuf,
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Say whether the emulator for DIR runs (exit 0, with its env lines) or not (exit 3).
    Status {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn absolute(dir: &Path) -> Result<PathBuf, String> {
    if dir.is_absolute() {
        Ok(dir.to_path_buf())
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .map_err(|e| format!("current directory: {e}"))
    }
}

fn up_detached(
    layout: Layout,
    base_port: Option<u16>,
    timeout: Duration,
    guest: app::GuestPlatform,
) -> Result<(), String> {
    app::check_dir(&layout)?;
    if let Some(pid) = app::running_pid(&layout) {
        return Err(format!(
            "skr-emulator is already running for {} (pid {pid})",
            layout.dir.display()
        ));
    }
    let _ = std::fs::remove_file(layout.ready_file());
    let stderr = std::fs::File::create(layout.stderr_file())
        .map_err(|e| format!("cannot create {}: {e}", layout.stderr_file().display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["up", "--foreground", "--dir"]).arg(&layout.dir);
    if let Some(base) = base_port {
        cmd.arg("--base-port").arg(base.to_string());
    }
    cmd.arg("--platform").arg(guest.name());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: setsid is async-signal-safe; it detaches the child from our session and terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the emulator: {e}"))?;
    let started = Instant::now();
    loop {
        if layout.ready_file().exists() {
            println!("skr-emulator is running (pid {}).", child.id());
            println!("  source {}", layout.env_file().display());
            print!(
                "{}",
                std::fs::read_to_string(layout.env_file()).unwrap_or_default()
            );
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(layout.stderr_file()).unwrap_or_default();
            return Err(format!(
                "the emulator exited ({status}) during start-up:\n{}",
                log.trim_end()
            ));
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            return Err(format!(
                "the emulator did not become ready within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(layout: Layout, grace: Duration) -> Result<(), String> {
    if layout.dir.exists() && !layout.dir.is_dir() {
        return Err(format!("{} is not a directory", layout.dir.display()));
    }
    let Some(pid) = app::running_pid(&layout) else {
        let _ = std::fs::remove_file(layout.pid_file());
        let _ = std::fs::remove_file(layout.ready_file());
        println!("skr-emulator is not running for {}", layout.dir.display());
        return Ok(());
    };
    let stopped_within = |limit: Duration| {
        let started = Instant::now();
        while app::running_pid(&layout) == Some(pid) {
            if started.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    };
    // SAFETY: plain kill(2) to the pid the emulator recorded for itself.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    if stopped_within(grace) {
        println!("skr-emulator stopped (pid {pid}).");
        return Ok(());
    }
    // Stuck (a busy or stopped process): a hard stop. It cannot remove its own files then.
    // SAFETY: as above; the pid still belongs to the emulator (running_pid checked it).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    if !stopped_within(Duration::from_secs(5)) {
        return Err(format!("pid {pid} survived SIGKILL"));
    }
    let _ = std::fs::remove_file(layout.pid_file());
    let _ = std::fs::remove_file(layout.ready_file());
    println!(
        "skr-emulator did not stop within {} s of SIGTERM: killed (pid {pid}).",
        grace.as_secs()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up {
            dir,
            foreground,
            base_port,
            timeout,
            platform,
        } => app::GuestPlatform::from_name(&platform).and_then(|guest| {
            absolute(&dir).and_then(|dir| {
                let layout = Layout::new(dir);
                if foreground {
                    app::run_foreground(layout, base_port, guest)
                } else {
                    up_detached(layout, base_port, Duration::from_secs(timeout), guest)
                }
            })
        }),
        Cmd::Down { dir, timeout } => {
            absolute(&dir).and_then(|dir| down(Layout::new(dir), Duration::from_secs(timeout)))
        }
        Cmd::Status { dir } => {
            let layout = match absolute(&dir) {
                Ok(dir) => Layout::new(dir),
                Err(e) => {
                    eprintln!("skr-emulator: {e}");
                    return ExitCode::FAILURE;
                }
            };
            return match app::running_pid(&layout) {
                Some(pid) if layout.ready_file().exists() => {
                    println!(
                        "skr-emulator is running for {} (pid {pid})",
                        layout.dir.display()
                    );
                    print!(
                        "{}",
                        std::fs::read_to_string(layout.env_file()).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Some(pid) => {
                    println!(
                        "skr-emulator is starting for {} (pid {pid})",
                        layout.dir.display()
                    );
                    ExitCode::from(3)
                }
                None => {
                    println!("skr-emulator is not running for {}", layout.dir.display());
                    ExitCode::from(3)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skr-emulator: {e}");
            ExitCode::FAILURE
        }
    }
}
