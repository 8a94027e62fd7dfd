//! Man pages of `skr-pkcs11`, generated from its clap definition (the tool's own `Cli`, not a
//! copy): `skr-pkcs11.1` and one page per subcommand (`skr-pkcs11-doctor.1`, …).
//! scripts/package.sh runs it; an example, so clap_mangen stays out of the tool's binary.
//!
//!   cargo run -p skr-pkcs11-cli --example mangen -- OUT_DIR

// The tool's source as a module: only its `Cli` is used here.
#[allow(dead_code)]
#[path = "../src/main.rs"]
mod tool;

use clap::CommandFactory;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: mangen OUT_DIR");
        return ExitCode::from(2);
    };
    let cmd = tool::Cli::command();
    match std::fs::create_dir_all(&out).and_then(|()| clap_mangen::generate_to(cmd, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mangen: {}: {e}", out.display());
            ExitCode::FAILURE
        }
    }
}
