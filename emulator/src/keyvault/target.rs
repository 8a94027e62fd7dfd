//! The release `target`: an attestation token from any issuer, verified as AKV does before it
//! evaluates the key's release policy.

use super::TargetError;
use crate::context::App;
use crate::util::{b64_lenient, now_secs};
use der::{Decode, Encode};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use serde_json::Value;
use x509_cert::Certificate;

/// Verifies a release `target` as AKV does: the issuer's openid-configuration and JWKS
/// (keys with kid, kty, x5c) over HTTPS, RS256, time. Returns the claims.
pub async fn verify_attestation_token(app: &App, token: &str) -> Result<Value, TargetError> {
    let jws = crate::jwt::decode(token).map_err(TargetError::Malformed)?;
    let issuer = jws
        .payload
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| TargetError::Malformed("token has no iss".into()))?
        .to_string();
    if !issuer.starts_with("https://") {
        return Err(TargetError::Untrusted(format!(
            "issuer {issuer} is not an https URL"
        )));
    }
    let kid = jws
        .header
        .get("kid")
        .and_then(Value::as_str)
        .map(String::from);
    let mut verified = false;
    for refresh in [false, true] {
        let keys = app
            .issuer_keys(&issuer, refresh)
            .await
            .map_err(TargetError::Untrusted)?;
        let matching: Vec<&Value> = match &kid {
            Some(k)
                if keys
                    .iter()
                    .any(|j| j.get("kid").and_then(Value::as_str) == Some(k)) =>
            {
                keys.iter()
                    .filter(|j| j.get("kid").and_then(Value::as_str) == Some(k))
                    .collect()
            }
            _ => keys.iter().collect(),
        };
        if matching
            .iter()
            .filter_map(|j| jwk_x5c_key(j))
            .any(|key| jws.verify_rs256(&key).is_ok())
        {
            verified = true;
            break;
        }
    }
    if !verified {
        return Err(TargetError::Untrusted(format!(
            "the token signature does not verify with any signing key of {issuer}"
        )));
    }
    check_token_times(&jws.payload, now_secs())?;
    Ok(jws.payload)
}

/// `exp` (required) and `nbf` of an attestation token against `now`, with 60 s of skew. The
/// token's issuer is whoever the token names, so its numbers are attacker-chosen: no
/// arithmetic here may overflow.
fn check_token_times(payload: &Value, now: u64) -> Result<(), TargetError> {
    const SKEW: u64 = 60;
    match payload.get("exp").and_then(Value::as_u64) {
        Some(exp) if exp.saturating_add(SKEW) < now => {
            return Err(TargetError::Untrusted(format!(
                "the attestation token expired at {}",
                crate::util::rfc3339(exp)
            )))
        }
        None => {
            return Err(TargetError::Untrusted(
                "the attestation token has no exp".into(),
            ))
        }
        _ => {}
    }
    if let Some(nbf) = payload.get("nbf").and_then(Value::as_u64) {
        if nbf > now.saturating_add(SKEW) {
            return Err(TargetError::Untrusted(
                "the attestation token is not valid yet (nbf)".into(),
            ));
        }
    }
    Ok(())
}

/// The RSA key of a JWKS entry's `x5c[0]` (AKV requires x5c).
fn jwk_x5c_key(jwk: &Value) -> Option<rsa::RsaPublicKey> {
    let first = jwk.get("x5c")?.as_array()?.first()?.as_str()?;
    let der = b64_lenient(first).ok()?;
    let cert = Certificate::from_der(&der).ok()?;
    let spki = cert.tbs_certificate.subject_public_key_info;
    rsa::RsaPublicKey::from_public_key_der(&spki.to_der().ok()?)
        .ok()
        .or_else(|| rsa::RsaPublicKey::from_pkcs1_der(spki.subject_public_key.raw_bytes()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_times_never_overflow_on_issuer_chosen_numbers() {
        let untrusted =
            |p: Value, now| matches!(check_token_times(&p, now), Err(TargetError::Untrusted(_)));
        let now = 1_700_000_000;
        assert!(check_token_times(&json!({"exp": now + 10}), now).is_ok());
        assert!(check_token_times(&json!({"exp": now - 60}), now).is_ok());
        assert!(untrusted(json!({"exp": now - 61}), now));
        assert!(untrusted(json!({}), now));
        assert!(untrusted(json!({"exp": now + 10, "nbf": now + 61}), now));
        // Extremes: far-future exp is valid; nothing panics near u64::MAX.
        assert!(check_token_times(&json!({"exp": u64::MAX}), now).is_ok());
        assert!(check_token_times(&json!({"exp": u64::MAX}), u64::MAX).is_ok());
        assert!(untrusted(json!({"exp": u64::MAX, "nbf": u64::MAX}), now));
    }
}
