//! pkcs11-conformance: black-box PKCS#11 conformance checks of any module path.
//!
//! `pkcs11-conformance --module /path/lib.so --token-label LABEL [--pin PIN] [--strict]`
//! prints one line per check (PASS, or DEPARTS with what the module did instead of what the
//! spec says) and a summary. With `--strict` the exit code is 1 when any check departs.

mod checks;
mod key_checks;
mod module;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Black-box PKCS#11 conformance checks of any module")]
struct Args {
    /// Path of the PKCS#11 module (.so).
    #[arg(long)]
    module: String,
    /// Label of the token to test (it must hold at least one private key).
    #[arg(long)]
    token_label: String,
    /// User PIN; omit for a protected authentication path (NULL PIN).
    #[arg(long)]
    pin: Option<String>,
    /// Exit 1 if any check departs from the spec.
    #[arg(long)]
    strict: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<String>,
}

fn main() {
    let args = Args::parse();
    let module = match module::Module::load(&args.module) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("pkcs11-conformance: {e}");
            std::process::exit(2);
        }
    };
    let target = checks::Target {
        module,
        token_label: args.token_label.clone(),
        pin: args.pin.map(String::into_bytes),
    };
    println!(
        "PKCS#11 conformance of {} (token {:?})",
        args.module, args.token_label
    );
    let mut report = Vec::new();
    let (mut pass, mut depart) = (0, 0);
    for c in checks::all() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.run)(&target)))
            .unwrap_or_else(|_| Err("the check itself panicked".into()));
        match &r {
            Ok(d) => {
                pass += 1;
                println!(
                    "PASS    {}{}",
                    c.name,
                    if d.is_empty() {
                        String::new()
                    } else {
                        format!(" — {d}")
                    }
                );
            }
            Err(d) => {
                depart += 1;
                println!("DEPARTS {} — {d}", c.name);
            }
        }
        report.push(serde_json::json!({"check": c.name, "pass": r.is_ok(), "detail": r.unwrap_or_else(|e| e)}));
    }
    println!("conformance: {pass} checks pass, {depart} depart from the spec");
    if let Some(path) = args.json {
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        ) {
            eprintln!("pkcs11-conformance: cannot write {path}: {e}");
        }
    }
    if args.strict && depart > 0 {
        std::process::exit(1);
    }
}
