//! The lease status of the released keys as Prometheus text (`release.status_file`), written
//! atomically by the process that refreshed. Versions, times and failure classes only: no key
//! bytes, no tokens, nothing secret.

use crate::config::Config;
use crate::secret::shared::{FailureClass, SharedStore};
use crate::token::lease::{self, LeaseState, LeaseTerms};
use std::fmt::Write as _;
use std::path::Path;

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// The metrics of one token's store.
pub fn render_token(out: &mut String, cfg: &Config, token_index: usize, store: &SharedStore) {
    let t = &cfg.tokens[token_index];
    let terms = LeaseTerms {
        refresh_ms: cfg.release.refresh.as_millis(),
        max_age_ms: cfg.release.max_age.as_millis(),
    };
    let tl = label(&t.label);
    let record = store
        .read()
        .and_then(|(_, b)| lease::decode(b.as_slice()))
        .unwrap_or_default();
    for k in &record {
        let Some(kc) = t.keys.get(k.index) else {
            continue;
        };
        let kl = format!("token=\"{tl}\",key=\"{}\"", label(&kc.label));
        let _ = writeln!(
            out,
            "skr_pkcs11_key_info{{{kl},version=\"{}\",state=\"{}\"}} 1",
            label(&k.version),
            k.state.name()
        );
        let _ = writeln!(
            out,
            "skr_pkcs11_key_released_at_seconds{{{kl}}} {}",
            seconds(k.released_at_ms)
        );
        if matches!(k.state, LeaseState::Live(_)) {
            let _ = writeln!(
                out,
                "skr_pkcs11_key_expires_at_seconds{{{kl}}} {}",
                seconds(terms.expires_at(k.released_at_ms))
            );
        }
    }
    let s = store.status();
    let _ = writeln!(
        out,
        "skr_pkcs11_token_next_refresh_seconds{{token=\"{tl}\"}} {}",
        seconds(s.next_refresh_ms)
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_last_refresh_seconds{{token=\"{tl}\"}} {}",
        seconds(s.last_refresh_ms)
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_refresh_failures{{token=\"{tl}\"}} {}",
        s.failures
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_last_failure_info{{token=\"{tl}\",class=\"{}\"}} 1",
        FailureClass::from_u64(s.last_failure_class).name()
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_last_failure_seconds{{token=\"{tl}\"}} {}",
        seconds(s.last_failure_ms)
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_processes{{token=\"{tl}\"}} {}",
        s.attached
    );
    let _ = writeln!(
        out,
        "skr_pkcs11_token_store_generation{{token=\"{tl}\"}} {}",
        s.generation
    );
}

const HEADER: &str = "\
# HELP skr_pkcs11_key_info The key version a token serves, and its state (live, revoked, expired).
# TYPE skr_pkcs11_key_info gauge
# HELP skr_pkcs11_key_released_at_seconds When the served release was made (Unix time).
# TYPE skr_pkcs11_key_released_at_seconds gauge
# HELP skr_pkcs11_key_expires_at_seconds When the key is wiped unless a refresh renews it (Unix time).
# TYPE skr_pkcs11_key_expires_at_seconds gauge
# HELP skr_pkcs11_token_next_refresh_seconds When the next refresh is due (Unix time).
# TYPE skr_pkcs11_token_next_refresh_seconds gauge
# HELP skr_pkcs11_token_last_refresh_seconds When the last successful refresh ended (Unix time, 0: none yet).
# TYPE skr_pkcs11_token_last_refresh_seconds gauge
# HELP skr_pkcs11_token_refresh_failures Consecutive failed refreshes.
# TYPE skr_pkcs11_token_refresh_failures gauge
# HELP skr_pkcs11_token_last_failure_info Class of the last failed refresh (service, rejected, device, integrity, other; none).
# TYPE skr_pkcs11_token_last_failure_info gauge
# HELP skr_pkcs11_token_last_failure_seconds When the last refresh failed (Unix time, 0: never).
# TYPE skr_pkcs11_token_last_failure_seconds gauge
# HELP skr_pkcs11_token_processes Processes of the tree using the token's shared key store.
# TYPE skr_pkcs11_token_processes gauge
# HELP skr_pkcs11_token_store_generation Publishes to the token's shared key store.
# TYPE skr_pkcs11_token_store_generation gauge
";

/// Every logged-in token of this process tree, as one Prometheus text document.
pub fn render(cfg: &Config) -> String {
    let mut out = String::from(HEADER);
    for (i, t) in cfg.tokens.iter().enumerate() {
        if let Some(store) = crate::token::retained(&t.label).and_then(|m| m.store.clone()) {
            render_token(&mut out, cfg, i, &store);
        }
    }
    out
}

/// Write the status file atomically (a temporary file beside it, then rename), mode 0644.
pub fn write_status_file(
    path: &Path,
    cfg: &Config,
    _token_index: usize,
    _store: &SharedStore,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = render(cfg);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("skr-pkcs11.prom");
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
