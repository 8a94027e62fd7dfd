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

    #[test]
    fn pem_roundtrip_shape() {
        let pem = pem_encode("CERTIFICATE", &[1u8; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
    }
}
