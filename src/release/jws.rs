//! Compact JWS handling and the release-response verification of skr-protocol §2.4: the
//! signer is AKV's TLS-style certificate (`x5c`), verified like a TLS server certificate for the
//! AKV host against the public web roots plus the configured CA file.

use super::b64url_decode;
use crate::error::{Error, Result, Step};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use serde_json::Value;
use std::path::Path;

/// Trust anchors for HTTPS and for the release JWS chain: webpki-roots + `tls.ca_file`.
#[derive(Clone)]
pub struct TrustAnchors {
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustAnchors {
    /// The public web roots plus every certificate of the PEM file `ca_file`.
    pub fn load(ca_file: Option<&Path>) -> Result<Self> {
        let mut extra = Vec::new();
        if let Some(path) = ca_file {
            let fail = |e: String| {
                Error::config(format!("tls.ca_file {}: {e}", path.display()))
                    .with_hint("tls.ca_file must be a readable PEM file of CA certificates")
            };
            let text = crate::config::read_named_file(path).map_err(|e| fail(e.to_string()))?;
            extra = crate::pem::certificates(&text).map_err(fail)?;
        }
        Self::with_extra(&extra).map_err(|e| match ca_file {
            Some(p) => Error::config(format!("tls.ca_file {}: {}", p.display(), e.message())),
            None => e,
        })
    }

    /// The public web roots plus the given DER certificates as anchors.
    pub fn with_extra(extra: &[CertificateDer<'_>]) -> Result<Self> {
        let mut anchors: Vec<TrustAnchor<'static>> = webpki_roots::TLS_SERVER_ROOTS.to_vec();
        for der in extra {
            let anchor = webpki::anchor_from_trusted_cert(der)
                .map_err(|e| Error::config(format!("not a usable CA certificate: {e}")))?;
            anchors.push(anchor.to_owned());
        }
        Ok(TrustAnchors { anchors })
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.anchors.clone(),
        }
    }
}

/// A decoded compact JWS / JWT (signature not yet checked).
pub struct Compact<'a> {
    pub header: Value,
    pub payload: Value,
    /// `header.payload` exactly as received: the signed bytes.
    pub signing_input: &'a str,
    pub signature: Vec<u8>,
}

/// Split and decode a compact JWS; `Err` names what is malformed.
pub fn split_compact(token: &str) -> std::result::Result<Compact<'_>, String> {
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let decode_json = |part: &str, what: &str| -> std::result::Result<Value, String> {
        let bytes = b64url_decode(part).ok_or_else(|| format!("{what} is not base64url"))?;
        let v: Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{what} is not JSON: {e}"))?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(format!("{what} is not a JSON object"))
        }
    };
    let header = decode_json(h, "header")?;
    let payload = decode_json(p, "payload")?;
    let signature = b64url_decode(s).ok_or("signature is not base64url")?;
    if signature.is_empty() {
        return Err("signature is empty".into());
    }
    Ok(Compact {
        header,
        payload,
        signing_input: &token[..h.len() + 1 + p.len()],
        signature,
    })
}

/// The host of a URL, without brackets for IPv6 literals.
pub fn url_host(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    Some(
        u.host_str()?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string(),
    )
}

fn bad(msg: impl Into<String>) -> Error {
    Error::integrity(Step::Release, msg)
}

/// Verify a release JWS: RS256 by the `x5c` leaf, the chain a valid TLS server chain for
/// `akv_host` at `now`. Returns the payload.
pub fn verify_release_jws(
    jws: &str,
    akv_host: &str,
    anchors: &TrustAnchors,
    now: UnixTime,
) -> Result<Value> {
    let c = split_compact(jws).map_err(|e| bad(format!("release response: {e}")))?;
    let alg = c.header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "RS256" {
        return Err(bad(format!(
            "release response JWS alg is {alg:?}, only RS256 is accepted"
        )));
    }
    let x5c = c
        .header
        .get("x5c")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("release response JWS has no x5c certificate chain"))?;
    let mut ders = Vec::with_capacity(x5c.len());
    for (i, cert) in x5c.iter().enumerate() {
        use base64::Engine;
        let der = cert
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .ok_or_else(|| bad(format!("release response x5c[{i}] is not base64 DER")))?;
        ders.push(CertificateDer::from(der));
    }
    let leaf = webpki::EndEntityCert::try_from(&ders[0])
        .map_err(|e| bad(format!("release response x5c[0] is not a certificate: {e}")))?;
    let algs = webpki::ALL_VERIFICATION_ALGS;
    leaf.verify_for_usage(
        algs,
        anchors.anchors(),
        &ders[1..],
        now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| {
        bad(format!(
            "release response signing certificate does not chain to a trusted root as a TLS server certificate: {e}"
        ))
        .with_hint("the vault's signing chain must lead to a public web root or to tls.ca_file; an unexpected signer means the response did not come from the vault")
    })?;
    let name = ServerName::try_from(akv_host.to_string()).map_err(|_| {
        bad(format!(
            "AKV host {akv_host:?} is not a DNS name or IP address"
        ))
    })?;
    leaf.verify_is_valid_for_subject_name(&name).map_err(|e| {
        bad(format!(
            "release response signing certificate is not valid for the AKV host {akv_host}: {e}"
        ))
    })?;
    leaf.verify_signature(
        webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
        c.signing_input.as_bytes(),
        &c.signature,
    )
    .map_err(|e| {
        bad(format!(
            "release response RS256 signature does not verify: {e}"
        ))
    })?;
    Ok(c.payload)
}

/// Compare key URLs case-insensitively, ignoring trailing slashes (an empty version segment).
pub fn same_key_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// Check that the signed payload answers our request (kid, enc, nonce).
pub fn check_release_request(payload: &Value, kid: &str, enc: &str, nonce: &str) -> Result<()> {
    let req = payload
        .get("request")
        .ok_or_else(|| bad("release response payload has no request member"))?;
    let field = |name: &str| req.get(name).and_then(Value::as_str).unwrap_or("");
    if !same_key_url(field("kid"), kid) {
        return Err(bad(format!(
            "release response answers key {:?}, not the requested {kid:?}",
            field("kid")
        )));
    }
    if field("enc") != enc {
        return Err(bad(format!(
            "release response enc {:?} differs from the requested {enc}",
            field("enc")
        )));
    }
    if field("nonce") != nonce {
        return Err(bad(
            "release response nonce differs from ours: a replayed or foreign response",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn real_jws() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/akv/vault-release-response.jws"
        ))
        .unwrap()
    }

    /// The chain's root (Baltimore CyberTrust Root, expired 2025) as an extra anchor, in case
    /// the current webpki-roots no longer carries it.
    fn anchors_with_root(jws: &str) -> TrustAnchors {
        use base64::Engine;
        let c = split_compact(jws).unwrap();
        let root = c.header["x5c"][2].as_str().unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(root)
            .unwrap();
        TrustAnchors::with_extra(&[CertificateDer::from(der)]).unwrap()
    }

    /// 2022-01-01: inside the leaf's validity (2021-09-25 … 2022-09-25).
    fn in_2022() -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(1_641_000_000))
    }

    #[test]
    fn real_vault_release_jws_verifies_for_vault_hosts() {
        let jws = real_jws();
        let anchors = anchors_with_root(&jws);
        for host in [
            "malegeskrkv.vault.azure.net",
            "vault.azure.net",
            "x.vaultcore.azure.net",
        ] {
            let payload = verify_release_jws(&jws, host, &anchors, in_2022()).unwrap();
            assert_eq!(payload["request"]["enc"], "CKM_RSA_AES_KEY_WRAP");
        }
        let payload =
            verify_release_jws(&jws, "malegeskrkv.vault.azure.net", &anchors, in_2022()).unwrap();
        // The echoed version-less kid matches with or without a trailing empty version.
        let asked = "https://MALEGESKRKV.vault.azure.net/keys/exportkey164012519943008083//";
        let mut with_nonce = payload.clone();
        with_nonce["request"]["nonce"] = "n1".into();
        check_release_request(&with_nonce, asked, "CKM_RSA_AES_KEY_WRAP", "n1").unwrap();
        let e =
            check_release_request(&with_nonce, asked, "RSA_AES_KEY_WRAP_256", "n1").unwrap_err();
        assert!(e.message().contains("enc"), "{}", e.message());
        let e =
            check_release_request(&with_nonce, asked, "CKM_RSA_AES_KEY_WRAP", "n2").unwrap_err();
        assert!(e.message().contains("nonce"), "{}", e.message());
        let e = check_release_request(
            &with_nonce,
            "https://malegeskrkv.vault.azure.net/keys/other",
            "CKM_RSA_AES_KEY_WRAP",
            "n1",
        )
        .unwrap_err();
        assert!(e.message().contains("not the requested"), "{}", e.message());
        // The recorded request had no nonce: ours would not match it.
        assert!(check_release_request(&payload, asked, "CKM_RSA_AES_KEY_WRAP", "n1").is_err());
    }

    #[test]
    fn wrong_host_expired_chain_and_tampering_are_refused() {
        let jws = real_jws();
        let anchors = anchors_with_root(&jws);
        let e = verify_release_jws(&jws, "evil.example.com", &anchors, in_2022()).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
        assert!(
            e.message().contains("not valid for the AKV host"),
            "{}",
            e.message()
        );
        let e =
            verify_release_jws(&jws, "kv.managedhsm.azure.net", &anchors, in_2022()).unwrap_err();
        assert!(
            e.message().contains("not valid for the AKV host"),
            "{}",
            e.message()
        );
        // Today the leaf has expired.
        let e = verify_release_jws(&jws, "vault.azure.net", &anchors, UnixTime::now()).unwrap_err();
        assert!(e.message().contains("chain"), "{}", e.message());
        // Without the (expired, removed) Baltimore root and no CA file: untrusted.
        let public_only = TrustAnchors::with_extra(&[]).unwrap();
        assert!(verify_release_jws(&jws, "vault.azure.net", &public_only, in_2022()).is_err());
        // A changed payload byte breaks the signature.
        let parts: Vec<&str> = jws.trim().split('.').collect();
        let mut payload = b64url_decode(parts[1]).unwrap();
        let pos = payload.windows(7).position(|w| w == b"7.3-pre").unwrap();
        payload[pos] = b'9';
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            crate::release::b64url(&payload),
            parts[2]
        );
        let e = verify_release_jws(&tampered, "vault.azure.net", &anchors, in_2022()).unwrap_err();
        assert!(e.message().contains("signature"), "{}", e.message());
        // Truncated signature, missing parts, alg none.
        let truncated = &jws.trim()[..jws.trim().len() - 20];
        assert!(verify_release_jws(truncated, "vault.azure.net", &anchors, in_2022()).is_err());
        assert!(verify_release_jws("a.b", "vault.azure.net", &anchors, in_2022()).is_err());
        let none_header = crate::release::b64url(br#"{"alg":"none","x5c":[]}"#);
        let forged = format!("{none_header}.{}.{}", parts[1], parts[2]);
        let e = verify_release_jws(&forged, "vault.azure.net", &anchors, in_2022()).unwrap_err();
        assert!(e.message().contains("RS256"), "{}", e.message());
    }

    #[test]
    fn hosts_from_urls() {
        assert_eq!(
            url_host("https://kv.vault.azure.net/keys/a").unwrap(),
            "kv.vault.azure.net"
        );
        assert_eq!(
            url_host("https://127.0.0.1:8443/keys/a").unwrap(),
            "127.0.0.1"
        );
        assert_eq!(url_host("https://[::1]:8443/keys/a").unwrap(), "::1");
    }
}
