//! Small helpers shared by the services: base64 flavours, time, ids, atomic file writes.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::RngCore;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64std(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes base64url with or without padding, and also standard base64: Azure clients send
/// all of these (the sidecar pads, the spec examples do not, some scripts use standard).
pub fn b64_lenient(text: &str) -> Result<Vec<u8>, String> {
    let trimmed: String = text
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && *c != '=')
        .collect();
    if let Ok(bytes) = URL_SAFE_NO_PAD.decode(&trimmed) {
        return Ok(bytes);
    }
    STANDARD_NO_PAD
        .decode(&trimmed)
        .map_err(|e| format!("not valid base64url: {e}"))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

pub fn random_hex(bytes: usize) -> String {
    let mut out = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut out);
    hex::encode(out)
}

/// Writes through a temporary file and a rename, so a crash never leaves half a state file.
/// Mode 0644 whatever the umask: the module refuses a config (or a certificate it names) that
/// its group or others can write, and a umask of 002 would make them so.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// CPU-heavy work of a request (SEV-SNP evidence verification, key generation) runs here: on
/// tokio's blocking pool, at most `HEAVY_JOBS` at a time, answered within `deadline` (waiting for
/// a slot included). The async workers never run it, so the other services, the admin API and
/// SIGTERM stay responsive whatever a request holds. Work past its deadline keeps its slot
/// until it ends (a thread cannot be stopped), so runaway work cannot pile up either.
pub async fn off_workers<T: Send + 'static>(
    deadline: std::time::Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    const HEAVY_JOBS: usize = 4;
    static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HEAVY_JOBS);
    let run = async {
        // Moved into the job: the slot is held until the work returns.
        let permit = SLOTS.acquire().await.map_err(|e| e.to_string())?;
        tokio::task::spawn_blocking(move || {
            let out = work();
            drop(permit);
            out
        })
        .await
        .map_err(|e| format!("the work failed: {e}"))
    };
    tokio::time::timeout(deadline, run)
        .await
        .map_err(|_| format!("not finished within {deadline:?}"))?
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// RFC 3339 UTC from unix seconds, without pulling a formatter into every caller.
pub fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_base64_accepts_all_flavours() {
        let data = b"\xfb\xff\xfe hello!";
        assert_eq!(b64_lenient(&b64url(data)).unwrap(), data);
        assert_eq!(b64_lenient(&STANDARD.encode(data)).unwrap(), data);
        let padded = base64::engine::general_purpose::URL_SAFE.encode(data);
        assert!(padded.ends_with('='));
        assert_eq!(b64_lenient(&padded).unwrap(), data);
        assert!(b64_lenient("!!!").is_err());
    }

    /// Work past its deadline is answered at the deadline, and while it runs the async
    /// workers (one here) stay free for other requests.
    #[tokio::test(flavor = "current_thread")]
    async fn heavy_work_past_its_deadline_is_answered_and_leaves_the_workers_free() {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let stuck = tokio::spawn(off_workers(
            std::time::Duration::from_millis(200),
            move || {
                let _ = wait.recv();
            },
        ));
        // The only worker thread runs this while the job blocks a thread of the pool.
        let quick = off_workers(std::time::Duration::from_secs(5), || 7).await;
        assert_eq!(quick, Ok(7));
        let late = stuck.await.unwrap().unwrap_err();
        assert!(late.contains("not finished within 200ms"), "{late}");
        release.send(()).unwrap();
    }

    #[test]
    fn pem_roundtrip_shape() {
        let pem = pem_encode("CERTIFICATE", &[1u8; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
    }
}
