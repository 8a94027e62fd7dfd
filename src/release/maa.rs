//! Microsoft Azure Attestation: `POST /attest/SevSnpVm` and verification of the token it
//! returns (skr-protocol §8, §10.2). The token is checked before it is sent to AKV, so that a
//! wrong MAA, a stale token or a token not carrying our key fails here with a clear message.

use super::http::Http;
use super::jws::{split_compact, Compact};
use super::transfer_key::{strip_leading_zeros, RsaPublicJwk};
use super::{b64url, b64url_decode};
use crate::error::{Error, Result, Step};
use crate::secret::SecretBytes;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Allowed clock difference for `nbf` / `exp`.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// RSA public keys (PKCS#1 `RSAPublicKey` DER) of each MAA `/certs`, by `kid`; per process.
/// Only public data, so it may outlive a fork.
type SigningKeys = Vec<(Option<String>, Vec<u8>)>;
/// Per MAA URL: when its `/certs` was fetched, and the keys. Entries expire after
/// `CERTS_TTL`, so that a key MAA has withdrawn stops verifying tokens within that time (an
/// unknown `kid` refetches at once).
static CERTS_CACHE: Mutex<Option<HashMap<String, (Instant, SigningKeys)>>> = Mutex::new(None);
const CERTS_TTL: Duration = Duration::from_secs(3600);

pub struct Maa<'a> {
    http: &'a Http,
    /// Configured base URL without a trailing slash: also the expected `iss`.
    url: String,
    api_version: String,
    /// How long a fetched `/certs` is used (CERTS_TTL; tests shorten it).
    certs_ttl: Duration,
}

/// What the token must show about our request.
pub struct Expected<'a> {
    pub nonce: &'a str,
    pub transfer_key: &'a RsaPublicJwk,
    pub binding: Binding<'a>,
}

/// How the token ties the attested hardware report to this login.
#[derive(Clone, Copy)]
pub enum Binding<'a> {
    /// `SevSnpVm`: `x-ms-sevsnpvm-reportdata` is the REPORT_DATA of our report.
    SevSnp { report_data: &'a [u8; 64] },
    /// `AzureGuest` (skr-protocol §9.4): `x-ms-attestation-type` `azurevm`, the isolation TEE
    /// of the HCL report (`sevsnpvm` / `tdxvm`) in `x-ms-isolation-tee`, whose runtime claims
    /// (the HCL's own) echo the user-data this login wrote to NV 0x01400002; the nonce comes
    /// back in `x-ms-runtime.client-payload`.
    AzureGuest {
        tee: &'a str,
        user_data: &'a [u8; 64],
    },
}

fn bad(msg: impl Into<String>) -> Error {
    Error::integrity(Step::Attestation, msg).with_hint(
        "the attestation token failed verification; check that attestation.url is the MAA instance this host should use and that the system clock is correct",
    )
}

impl<'a> Maa<'a> {
    pub fn new(http: &'a Http, url: &str, api_version: &str) -> Self {
        Maa {
            http,
            url: url.trim_end_matches('/').to_string(),
            api_version: api_version.to_string(),
            certs_ttl: CERTS_TTL,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Send the evidence; returns the compact JWT.
    pub fn attest(
        &self,
        report_member: String,
        runtime_data: &[u8],
        nonce: &str,
    ) -> Result<String> {
        let url = format!(
            "{}/attest/SevSnpVm?api-version={}",
            self.url, self.api_version
        );
        let body = json!({
            "report": report_member,
            "runtimeData": { "data": b64url(runtime_data), "dataType": "JSON" },
            "nonce": nonce,
        });
        let resp = self.http.send(Step::Attestation, "MAA attest", &|| {
            self.http.client_for(&url).post(&url).json(&body)
        })?;
        token_member(&resp, &url, "SNP evidence", "MAA did not accept this platform's report or collateral (VCEK chain, UVM endorsement) or its attestation policy denied it; the message above is MAA's reason")
    }

    /// `POST /attest/AzureGuest` with the vTPM evidence (`AttestationInfo`, platform-evidence
    /// §6.6 step 8); returns the response's `token` member (sealed to the transfer key).
    pub fn attest_azure_guest(&self, attestation_info: &Value) -> Result<String> {
        let url = format!(
            "{}/attest/AzureGuest?api-version={}",
            self.url, self.api_version
        );
        let body = json!({ "AttestationInfo": b64url(attestation_info.to_string().as_bytes()) });
        let resp = self.http.send(Step::Attestation, "MAA attest", &|| {
            self.http.client_for(&url).post(&url).json(&body)
        })?;
        token_member(&resp, &url, "AzureGuest evidence", "MAA did not accept this VM's vTPM evidence (AK certificate, PCR quote, HCL report, VCEK chain) or its attestation policy denied it; the message above is MAA's reason; a current guest attestation extension renews the AK certificate")
    }

    /// Fetch `/certs` (or take it from the cache).
    fn signing_keys(&self, refresh: bool) -> Result<SigningKeys> {
        // try_lock: a child forked while another thread held the lock must not deadlock;
        // it just fetches again.
        if !refresh {
            if let Ok(cache) = CERTS_CACHE.try_lock() {
                if let Some((fetched, keys)) = cache.as_ref().and_then(|m| m.get(&self.url)) {
                    if fetched.elapsed() < self.certs_ttl {
                        return Ok(keys.clone());
                    }
                }
            }
        }
        let url = format!("{}/certs", self.url);
        let resp = self.http.send(Step::Attestation, "MAA /certs", &|| {
            self.http.client_for(&url).get(&url)
        })?;
        if !resp.is_success() {
            return Err(Error::service(
                Step::Attestation,
                format!("MAA {url} answered {}: {}", resp.status, resp.error_text()),
            )
            .with_hint("check attestation.url"));
        }
        let keys = parse_certs(&resp.body)?;
        if let Ok(mut cache) = CERTS_CACHE.try_lock() {
            cache
                .get_or_insert_with(HashMap::new)
                .insert(self.url.clone(), (Instant::now(), keys.clone()));
        }
        Ok(keys)
    }

    /// Verify the token (signature by a key of the configured MAA's `/certs`, issuer, times,
    /// type, nonce, REPORT_DATA and our transfer key). Returns its claims.
    pub fn verify(&self, token: &str, expected: &Expected<'_>) -> Result<Value> {
        self.verify_at(token, expected, now_secs())
    }

    pub fn verify_at(&self, token: &str, expected: &Expected<'_>, now: i64) -> Result<Value> {
        verify_token(token, &self.url, expected, now, &|refresh| {
            self.signing_keys(refresh)
        })
    }

    /// RS256 by a key of the configured MAA's `/certs`: the key named by `kid` (cached), else
    /// after one refresh the named key or any key of the fresh set.
    fn verify_signature(c: &Compact<'_>, keys_for: KeysFor<'_>) -> Result<()> {
        let kid = c.header.get("kid").and_then(Value::as_str);
        let verify_with = |keys: &SigningKeys, only_kid: bool| -> Option<bool> {
            let mut tried = false;
            for (k, der) in keys {
                if only_kid && (k.as_deref() != kid || kid.is_none()) {
                    continue;
                }
                tried = true;
                if crate::crypto::check::verify_rs256(der, c.signing_input.as_bytes(), &c.signature)
                {
                    return Some(true);
                }
            }
            tried.then_some(false)
        };
        let mut keys = keys_for(false)?;
        let mut verdict = verify_with(&keys, true);
        if verdict.is_none() {
            // Unknown kid: MAA may have rotated its keys; refresh once, then try every key.
            keys = keys_for(true)?;
            verdict = verify_with(&keys, true).or_else(|| verify_with(&keys, false));
        }
        match verdict {
            Some(true) => Ok(()),
            Some(false) => Err(bad("MAA token RS256 signature does not verify")),
            None => Err(bad("MAA /certs holds no signing key")),
        }
    }
}

/// The `token` member of a successful attest response; MAA's reason on a 400.
fn token_member(
    resp: &super::http::Response,
    url: &str,
    what: &str,
    hint_400: &str,
) -> Result<String> {
    match resp.status {
        200..=299 => {}
        400 => {
            return Err(Error::evidence(
                Step::Attestation,
                format!("MAA rejected the {what} (400): {}", resp.error_text()),
            )
            .with_hint(hint_400));
        }
        404 => {
            return Err(Error::service(
                Step::Attestation,
                format!("MAA {url} answered 404: {}", resp.error_text()),
            )
            .with_hint("check attestation.url (e.g. https://sharedeus.eus.attest.azure.net) and attestation.api_version"));
        }
        s => {
            return Err(Error::service(
                Step::Attestation,
                format!("MAA attest answered {s}: {}", resp.error_text()),
            )
            .with_hint("check attestation.url and attestation.api_version"));
        }
    }
    let v: Value =
        serde_json::from_slice(&resp.body).map_err(|_| bad("MAA attest response is not JSON"))?;
    v.get("token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad("MAA attest response has no token"))
}

/// AAD of the sealed AzureGuest response (platform-evidence §6.6 step 9).
pub const SEAL_AAD: &[u8] = b"Transport Key";

fn sealed_bad(what: impl Into<String>) -> Error {
    Error::integrity(
        Step::Attestation,
        format!("MAA AzureGuest response: {}", what.into()),
    )
    .with_hint("the sealed attestation response could not be opened with this VM's TPM transfer key; check that attestation.url is the MAA instance this VM should use")
}

pub(crate) fn b64_any(text: &str) -> Option<Vec<u8>> {
    let clean = text.trim();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .ok()
        .or_else(|| b64url_decode(clean))
}

/// The JWT of an AzureGuest response's `token` member. MAA seals it to the transfer key
/// (§6.6 step 9: base64url JSON with `EncryptedInnerKey`, `EncryptionParams`,
/// `AuthenticationData`, `Jwt`); `unwrap_inner_key` is RSAES-PKCS1-v1_5 decryption with that key
/// (inside the TPM). A plain compact JWT is taken as it is: it is verified like any token
/// afterwards (signature, issuer, nonce, our key), so accepting it weakens nothing.
pub fn open_sealed_token(
    token: &str,
    unwrap_inner_key: &dyn Fn(&[u8]) -> Result<SecretBytes>,
) -> Result<String> {
    let token = token.trim();
    if token.starts_with("eyJ") && token.matches('.').count() == 2 {
        return Ok(token.to_string());
    }
    let outer = b64url_decode(token)
        .or_else(|| b64_any(token))
        .ok_or_else(|| sealed_bad("token is neither a JWT nor base64"))?;
    let sealed: Value =
        serde_json::from_slice(&outer).map_err(|_| sealed_bad("sealed token is not JSON"))?;
    let field = |name: &str| -> Result<Vec<u8>> {
        sealed
            .get(name)
            .and_then(Value::as_str)
            .and_then(b64_any)
            .ok_or_else(|| sealed_bad(format!("no base64 {name}")))
    };
    let params = sealed
        .get("EncryptionParams")
        .ok_or_else(|| sealed_bad("no EncryptionParams"))?;
    let param = |name: &str| params.get(name).and_then(Value::as_str).unwrap_or("");
    if param("Cipher") != "AES" || param("BlockMode") != "ChainingModeGCM" {
        return Err(sealed_bad(format!(
            "unsupported encryption {}/{} (expected AES/ChainingModeGCM)",
            param("Cipher"),
            param("BlockMode")
        )));
    }
    let iv = params
        .get("Iv")
        .and_then(Value::as_str)
        .and_then(b64_any)
        .ok_or_else(|| sealed_bad("no base64 EncryptionParams.Iv"))?;
    if iv.len() != 12 {
        return Err(sealed_bad(format!("IV of {} bytes, expected 12", iv.len())));
    }
    let encrypted_key = field("EncryptedInnerKey")?;
    let tag = field("AuthenticationData")?;
    if tag.len() != 16 {
        return Err(sealed_bad(format!(
            "tag of {} bytes, expected 16",
            tag.len()
        )));
    }
    let mut ciphertext = field("Jwt")?;
    let inner_key = unwrap_inner_key(&encrypted_key)?;
    let bits = params.get("KeySizeInBits").and_then(Value::as_u64);
    if !matches!(inner_key.len(), 16 | 24 | 32)
        || bits.is_some_and(|b| b != 8 * inner_key.len() as u64)
    {
        return Err(sealed_bad(format!(
            "inner key of {} bytes (KeySizeInBits {bits:?})",
            inner_key.len()
        )));
    }
    ciphertext.extend_from_slice(&tag);
    let p = crate::crypto::GcmParams {
        iv,
        aad: SEAL_AAD.to_vec(),
        tag_bits: 128,
    };
    let jwt = crate::crypto::aes::gcm_open(&inner_key, &p, &ciphertext)
        .map_err(|_| sealed_bad("AES-GCM authentication of the sealed token failed"))?;
    String::from_utf8(jwt.to_vec())
        .map(|s| s.trim().to_string())
        .map_err(|_| sealed_bad("the unsealed token is not text"))
}

/// The signing keys of the configured MAA (`true`: refreshed, not from the cache).
type KeysFor<'k> = &'k dyn Fn(bool) -> Result<SigningKeys>;

/// The whole check of [`Maa::verify_at`] with the signing keys from `keys_for`: header (RS256,
/// `jku` of the configured MAA), signature, claims. Pure, so the fuzz target runs it too.
pub fn verify_token(
    token: &str,
    maa_url: &str,
    expected: &Expected<'_>,
    now: i64,
    keys_for: KeysFor<'_>,
) -> Result<Value> {
    let c = split_compact(token).map_err(|e| bad(format!("MAA token: {e}")))?;
    let alg = c.header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != "RS256" {
        return Err(bad(format!(
            "MAA token alg is {alg:?}, only RS256 is accepted"
        )));
    }
    let jku = c.header.get("jku").and_then(Value::as_str).unwrap_or("");
    let want_jku = format!("{maa_url}/certs");
    if jku != want_jku {
        return Err(bad(format!(
            "MAA token jku {jku:?} is not {want_jku:?}: the token was not issued by the configured MAA"
        )));
    }
    Maa::verify_signature(&c, keys_for)?;
    check_claims(&c.payload, maa_url, expected, now)?;
    Ok(c.payload)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parse MAA's JWKS: keys with `x5c` (standard base64 DER); the RSA key of `x5c[0]`.
pub fn parse_certs(body: &[u8]) -> Result<SigningKeys> {
    use x509_cert::der::Decode;
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("MAA /certs is not JSON"))?;
    let mut out = Vec::new();
    for key in v
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(first) = key
            .get("x5c")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
        else {
            continue;
        };
        use base64::Engine;
        let Ok(der) = base64::engine::general_purpose::STANDARD.decode(first) else {
            continue;
        };
        let Ok(cert) = x509_cert::Certificate::from_der(&der) else {
            continue;
        };
        let Some(rsa) = cert
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .as_bytes()
        else {
            continue;
        };
        out.push((
            key.get("kid").and_then(Value::as_str).map(str::to_string),
            rsa.to_vec(),
        ));
    }
    if out.is_empty() {
        return Err(bad("MAA /certs holds no usable x5c certificate"));
    }
    Ok(out)
}

/// Claim checks of skr-protocol §10.2 steps 6–7.
pub fn check_claims(
    claims: &Value,
    maa_url: &str,
    expected: &Expected<'_>,
    now: i64,
) -> Result<()> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != maa_url {
        return Err(bad(format!(
            "MAA token iss {iss:?} is not the configured attestation.url {maa_url:?}"
        )));
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or_else(|| bad("MAA token has no exp"))?;
    // Saturating: exp / nbf are whatever the token says, and must not overflow here.
    if now > exp.saturating_add(CLOCK_SKEW_SECS) {
        return Err(bad(format!(
            "MAA token expired {} s ago (exp {exp})",
            now.saturating_sub(exp)
        )));
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64) {
        if now.saturating_add(CLOCK_SKEW_SECS) < nbf {
            return Err(bad(format!(
                "MAA token is not valid before {nbf}, {} s in the future",
                nbf.saturating_sub(now)
            )));
        }
    }
    match expected.binding {
        Binding::SevSnp { report_data } => {
            check_sevsnp_binding(claims, expected.nonce, report_data)?
        }
        Binding::AzureGuest { tee, user_data } => {
            check_azure_guest_binding(claims, expected.nonce, tee, user_data)?
        }
    }
    let keys = claims
        .pointer("/x-ms-runtime/keys")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("MAA token has no x-ms-runtime.keys"))?;
    let ours = expected.transfer_key;
    let is_ours = |k: &Value| {
        let num = |name: &str| {
            k.get(name)
                .and_then(Value::as_str)
                .and_then(b64url_decode)
                .map(|b| strip_leading_zeros(&b).to_vec())
        };
        k.get("kid").and_then(Value::as_str) == Some(ours.kid.as_str())
            && num("n").as_deref() == Some(ours.n.as_slice())
            && num("e").as_deref() == Some(ours.e.as_slice())
    };
    // Exactly our key: AKV wraps to the first suitable key, so no other may be there.
    if keys.len() != 1 || !is_ours(&keys[0]) {
        return Err(bad(format!(
            "MAA token x-ms-runtime.keys does not hold exactly this login's transfer key (kid {:?}; token has {} key(s))",
            ours.kid,
            keys.len()
        )));
    }
    Ok(())
}

fn check_sevsnp_binding(claims: &Value, nonce: &str, report_data: &[u8; 64]) -> Result<()> {
    let typ = claims
        .get("x-ms-attestation-type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if typ != "sevsnpvm" {
        return Err(bad(format!(
            "MAA token x-ms-attestation-type is {typ:?}, expected \"sevsnpvm\""
        )));
    }
    if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
        return Err(bad(
            "MAA token does not echo our nonce: a replayed or foreign token",
        ));
    }
    // Required, not merely checked when present: every SevSnpVm token carries it, and a token
    // without it would not bind the attested report to this login's runtime data.
    let rd = claims
        .get("x-ms-sevsnpvm-reportdata")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("MAA token has no x-ms-sevsnpvm-reportdata"))?;
    if !rd.eq_ignore_ascii_case(&hex::encode(report_data)) {
        return Err(bad(
            "MAA token x-ms-sevsnpvm-reportdata is not the REPORT_DATA of our report",
        ));
    }
    Ok(())
}

fn check_azure_guest_binding(
    claims: &Value,
    nonce: &str,
    tee: &str,
    user_data: &[u8; 64],
) -> Result<()> {
    let typ = claims
        .get("x-ms-attestation-type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if typ != "azurevm" {
        return Err(bad(format!(
            "MAA token x-ms-attestation-type is {typ:?}, expected \"azurevm\" (AzureGuest)"
        )));
    }
    let tee_type = claims
        .pointer("/x-ms-isolation-tee/x-ms-attestation-type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if tee_type != tee {
        return Err(bad(format!(
            "MAA token x-ms-isolation-tee.x-ms-attestation-type is {tee_type:?}, but this VM's HCL report is {tee:?}"
        )));
    }
    // MAA echoes ClientPayload values; whether decoded or as the base64 we sent is not
    // documented, so either form of our own random nonce is accepted (both bind this login).
    let echoed = claims
        .pointer("/x-ms-runtime/client-payload/nonce")
        .and_then(Value::as_str);
    let sent_b64 = crate::release::b64std(nonce.as_bytes());
    if echoed != Some(nonce) && echoed != Some(sent_b64.as_str()) {
        return Err(bad(
            "MAA token does not echo our nonce in x-ms-runtime.client-payload: a replayed or foreign token",
        ));
    }
    // The isolation TEE's runtime claims are the HCL report's own (platform-evidence §6.6
    // step 10), so they carry the user-data this login wrote: the hardware report is fresh.
    let echoed_user_data = claims
        .pointer("/x-ms-isolation-tee/x-ms-runtime/user-data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("MAA token has no x-ms-isolation-tee.x-ms-runtime.user-data"))?;
    if !echoed_user_data.eq_ignore_ascii_case(&hex::encode(user_data)) {
        return Err(bad(
            "MAA token x-ms-isolation-tee.x-ms-runtime.user-data is not the user-data of this login's HCL report",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::b64std;
    use crate::secret::SecretBytes;

    fn seal(jwt: &[u8], key: &[u8; 32], encrypted_key: &[u8]) -> String {
        let iv = [5u8; 12];
        let p = crate::crypto::GcmParams {
            iv: iv.to_vec(),
            aad: SEAL_AAD.to_vec(),
            tag_bits: 128,
        };
        let sealed = crate::crypto::aes::gcm_seal(&key[..], &p, jwt).unwrap();
        let (ct, tag) = sealed.split_at(sealed.len() - 16);
        let inner = json!({
            "EncryptedInnerKey": b64std(encrypted_key),
            "EncryptionParams": {"BlockMode": "ChainingModeGCM", "BlockPadding": "PKCS7",
                "Cipher": "AES", "KeySizeInBits": 256, "Iv": b64std(&iv)},
            "AuthenticationData": b64std(tag),
            "Jwt": b64std(ct),
        });
        b64url(inner.to_string().as_bytes())
    }

    #[test]
    fn sealed_tokens_open_with_the_inner_key_and_refuse_tampering() {
        let key = [7u8; 32];
        let jwt = b"eyJhbGciOiJSUzI1NiJ9.eyJ4IjoxfQ.c2ln";
        let token = seal(jwt, &key, b"wrapped");
        let unwrap = |ct: &[u8]| -> Result<SecretBytes> {
            assert_eq!(ct, b"wrapped");
            Ok(SecretBytes::from_slice(&key))
        };
        assert_eq!(open_sealed_token(&token, &unwrap).unwrap().as_bytes(), jwt);
        // A plain JWT passes through (verified afterwards like any token).
        let plain = std::str::from_utf8(jwt).unwrap();
        assert_eq!(open_sealed_token(plain, &unwrap).unwrap(), plain);
        // Another inner key: GCM authentication fails.
        let wrong = |_: &[u8]| -> Result<SecretBytes> { Ok(SecretBytes::from_slice(&[8u8; 32])) };
        let e = open_sealed_token(&token, &wrong).unwrap_err();
        assert!(e.message().contains("AES-GCM"), "{e}");
        // A flipped ciphertext bit.
        let mut v: Value = serde_json::from_slice(&b64url_decode(&token).unwrap()).unwrap();
        let mut ct = b64_any(v["Jwt"].as_str().unwrap()).unwrap();
        ct[0] ^= 1;
        v["Jwt"] = b64std(&ct).into();
        let tampered = b64url(v.to_string().as_bytes());
        assert!(open_sealed_token(&tampered, &unwrap).is_err());
        // Key size and cipher checks; garbage.
        v["EncryptionParams"]["KeySizeInBits"] = 128.into();
        assert!(open_sealed_token(&b64url(v.to_string().as_bytes()), &unwrap).is_err());
        v["EncryptionParams"]["Cipher"] = "DES".into();
        let e = open_sealed_token(&b64url(v.to_string().as_bytes()), &unwrap).unwrap_err();
        assert!(e.message().contains("unsupported"), "{e}");
        assert!(open_sealed_token("!!", &unwrap).is_err());
        assert_eq!(
            open_sealed_token("!!", &unwrap).unwrap_err().step(),
            Some(Step::Attestation)
        );
    }

    use crate::release::transfer_key::RsaPublicJwk;

    fn spec_token() -> (String, Value) {
        let jwt = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/maa/sevsnpvm-token.jwt"
        ))
        .unwrap();
        let claims = split_compact(&jwt).unwrap().payload;
        (jwt.trim().to_string(), claims)
    }

    fn spec_key(claims: &Value) -> RsaPublicJwk {
        let k = &claims["x-ms-runtime"]["keys"][0];
        RsaPublicJwk {
            kid: k["kid"].as_str().unwrap().into(),
            n: b64url_decode(k["n"].as_str().unwrap()).unwrap(),
            e: b64url_decode(k["e"].as_str().unwrap()).unwrap(),
        }
    }

    fn report_data(claims: &Value) -> [u8; 64] {
        let v = hex::decode(claims["x-ms-sevsnpvm-reportdata"].as_str().unwrap()).unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn spec_token_claims_pass_and_each_check_bites() {
        let (_, claims) = spec_token();
        let key = spec_key(&claims);
        let rd = report_data(&claims);
        let exp = Expected {
            nonce: "noncesevsnp987",
            transfer_key: &key,
            binding: Binding::SevSnp { report_data: &rd },
        };
        let iat = claims["iat"].as_i64().unwrap();
        let url = "https://tenanttests.us";
        check_claims(&claims, url, &exp, iat + 10).unwrap();
        let msg = |r: Result<()>| r.unwrap_err().message().to_string();
        // Issuer: exact, and a trailing slash in the config is stripped before (Maa::new).
        assert!(msg(check_claims(&claims, "https://other.us", &exp, iat)).contains("iss"));
        // Expired (beyond the skew) and not yet valid.
        let e = claims["exp"].as_i64().unwrap();
        check_claims(&claims, url, &exp, e + CLOCK_SKEW_SECS).unwrap();
        assert!(msg(check_claims(&claims, url, &exp, e + CLOCK_SKEW_SECS + 1)).contains("expired"));
        assert!(msg(check_claims(&claims, url, &exp, iat - 120)).contains("not valid before"));
        // Extreme numbers are judged, never overflow.
        let mut far = claims.clone();
        far["exp"] = i64::MAX.into();
        check_claims(&far, url, &exp, iat).unwrap();
        far["nbf"] = i64::MAX.into();
        assert!(msg(check_claims(&far, url, &exp, i64::MIN)).contains("not valid before"));
        far["exp"] = i64::MIN.into();
        assert!(msg(check_claims(&far, url, &exp, iat)).contains("expired"));
        // Nonce.
        let other_nonce = Expected { nonce: "x", ..exp };
        assert!(msg(check_claims(&claims, url, &other_nonce, iat)).contains("nonce"));
        // Another transfer key (same kid, other modulus).
        let mut other_key = key.clone();
        other_key.n[5] ^= 1;
        let k2 = Expected {
            transfer_key: &other_key,
            nonce: "noncesevsnp987",
            binding: Binding::SevSnp { report_data: &rd },
        };
        assert!(msg(check_claims(&claims, url, &k2, iat)).contains("transfer key"));
        // A second key in the runtime data.
        let mut two = claims.clone();
        let k = two["x-ms-runtime"]["keys"][0].clone();
        two["x-ms-runtime"]["keys"].as_array_mut().unwrap().push(k);
        assert!(
            msg(check_claims(&two, url, &exp, iat)).contains("1 key")
                || msg(check_claims(&two, url, &exp, iat)).contains("2 key")
        );
        // REPORT_DATA of another report.
        let mut rd2 = rd;
        rd2[0] ^= 1;
        let r2 = Expected {
            binding: Binding::SevSnp { report_data: &rd2 },
            nonce: "noncesevsnp987",
            transfer_key: &key,
        };
        assert!(msg(check_claims(&claims, url, &r2, iat)).contains("reportdata"));
        // No REPORT_DATA claim at all: nothing binds the report to our runtime data.
        let mut no_rd = claims.clone();
        no_rd
            .as_object_mut()
            .unwrap()
            .remove("x-ms-sevsnpvm-reportdata");
        assert!(msg(check_claims(&no_rd, url, &exp, iat)).contains("reportdata"));
        // Attestation type.
        let mut t = claims.clone();
        t["x-ms-attestation-type"] = "sgx".into();
        assert!(msg(check_claims(&t, url, &exp, iat)).contains("sevsnpvm"));
        let err = check_claims(&t, url, &exp, iat).unwrap_err();
        assert_eq!(err.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
        assert_eq!(err.step(), Some(Step::Attestation));
    }

    /// MSGA's sample AzureGuest claims, with this login's nonce and user-data added as MAA
    /// echoes them: every AzureGuest check passes, and each bites.
    #[test]
    fn azure_guest_claims_pass_and_each_check_bites() {
        let mut claims: Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/maa/azureguest-cvm-claims.json"
        )))
        .unwrap();
        let user_data = [0xab; 64];
        claims["x-ms-runtime"]["client-payload"] = json!({"nonce": "n0nce"});
        claims["x-ms-isolation-tee"]["x-ms-runtime"]["user-data"] =
            hex::encode_upper(user_data).into();
        let k = &claims["x-ms-runtime"]["keys"][0];
        let key = RsaPublicJwk {
            kid: "TpmEphemeralEncryptionKey".into(),
            n: b64url_decode(k["n"].as_str().unwrap()).unwrap(),
            e: b64url_decode(k["e"].as_str().unwrap()).unwrap(),
        };
        let url = "https://sharedeus.eus.test.attest.azure.net";
        let iat = claims["iat"].as_i64().unwrap();
        let exp = |nonce, tee, ud| Expected {
            nonce,
            transfer_key: &key,
            binding: Binding::AzureGuest { tee, user_data: ud },
        };
        check_claims(&claims, url, &exp("n0nce", "sevsnpvm", &user_data), iat).unwrap();
        let msg = |c: &Value, e: &Expected<'_>| {
            check_claims(c, url, e, iat)
                .unwrap_err()
                .message()
                .to_string()
        };
        // The nonce may come back as the base64 we sent.
        let mut b64 = claims.clone();
        b64["x-ms-runtime"]["client-payload"]["nonce"] = crate::release::b64std(b"n0nce").into();
        check_claims(&b64, url, &exp("n0nce", "sevsnpvm", &user_data), iat).unwrap();
        assert!(msg(&claims, &exp("other", "sevsnpvm", &user_data)).contains("nonce"));
        assert!(msg(&claims, &exp("n0nce", "tdxvm", &user_data)).contains("isolation-tee"));
        assert!(msg(&claims, &exp("n0nce", "sevsnpvm", &[0xac; 64])).contains("user-data"));
        let mut no_ud = claims.clone();
        no_ud["x-ms-isolation-tee"]["x-ms-runtime"]
            .as_object_mut()
            .unwrap()
            .remove("user-data");
        assert!(msg(&no_ud, &exp("n0nce", "sevsnpvm", &user_data)).contains("user-data"));
        let mut snp = claims.clone();
        snp["x-ms-attestation-type"] = "sevsnpvm".into();
        assert!(msg(&snp, &exp("n0nce", "sevsnpvm", &user_data)).contains("azurevm"));
        // Our TPM key, and only it: the HCL's AK is not a transfer key.
        let mut other = key.clone();
        other.n[3] ^= 1;
        let e = Expected {
            nonce: "n0nce",
            transfer_key: &other,
            binding: Binding::AzureGuest {
                tee: "sevsnpvm",
                user_data: &user_data,
            },
        };
        assert!(msg(&claims, &e).contains("transfer key"));
        // A SevSnpVm expectation never accepts an AzureGuest token.
        let rd = [0u8; 64];
        let e = Expected {
            nonce: "n0nce",
            transfer_key: &key,
            binding: Binding::SevSnp { report_data: &rd },
        };
        assert!(msg(&claims, &e).contains("sevsnpvm"));
    }

    #[test]
    fn header_checks_refuse_foreign_jku_and_algs() {
        let (jwt, claims) = spec_token();
        let key = spec_key(&claims);
        let rd = report_data(&claims);
        let exp = Expected {
            nonce: "noncesevsnp987",
            transfer_key: &key,
            binding: Binding::SevSnp { report_data: &rd },
        };
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();
        // The spec token's jku is https://tenanttests.us/certs: any other MAA refuses it before
        // any network access.
        let maa = Maa::new(
            &http,
            "https://sharedeus.eus.attest.azure.net/",
            "2022-08-01",
        );
        let e = maa.verify(&jwt, &exp).unwrap_err();
        assert!(e.message().contains("jku"), "{}", e.message());
        let none = format!(
            "{}.{}",
            b64url(br#"{"alg":"none"}"#),
            jwt.split_once('.').unwrap().1
        );
        let e = maa.verify(&none, &exp).unwrap_err();
        assert!(e.message().contains("RS256"), "{}", e.message());
        assert!(maa.verify("garbage", &exp).is_err());
    }

    /// Serves `bodies` as `GET /certs` replies in turn; returns the number of requests served.
    fn certs_server(bodies: Vec<String>) -> (String, std::thread::JoinHandle<usize>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        listener.set_nonblocking(false).unwrap();
        let h = std::thread::spawn(move || {
            let mut served = 0;
            for body in bodies {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                assert!(line.starts_with("GET /certs "), "{line}");
                while r.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                served += 1;
            }
            served
        });
        (url, h)
    }

    /// The signing-key logic with a real RS256 signature: the vault release JWS (signed by its
    /// x5c[0]) stands in for a token; its header kid is the certificate's SHA-1 thumbprint.
    #[test]
    fn unknown_kid_refreshes_certs_once_then_tries_every_key() {
        let jws = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/akv/vault-release-response.jws"
        ))
        .unwrap();
        let c = split_compact(&jws).unwrap();
        let leaf = c.header["x5c"][0].as_str().unwrap().to_string();
        let other = c.header["x5c"][1].as_str().unwrap().to_string();
        let jwks = |kid: &str, cert: &str| {
            json!({"keys":[{"kid":kid,"kty":"RSA","x5c":[cert]}]}).to_string()
        };
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();

        // Cache holds a stale key under another kid: one refresh; the fresh set names the key
        // differently, so every key is tried and the signature verifies.
        let (url, server) = certs_server(vec![jwks("rotated", &leaf), jwks("x", &other)]);
        let maa = Maa::new(&http, &url, "2022-08-01");
        let stale = parse_certs(jwks("stale", &other).as_bytes()).unwrap();
        CERTS_CACHE
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(maa.url.clone(), (Instant::now(), stale));
        Maa::verify_signature(&c, &|r| maa.signing_keys(r)).unwrap();
        // Now the cache holds the fresh set; the kid is still unknown, so the next check
        // refreshes again and this time gets only a wrong key: refused.
        let e = Maa::verify_signature(&c, &|r| maa.signing_keys(r)).unwrap_err();
        assert!(e.message().contains("does not verify"), "{}", e.message());
        assert_eq!(server.join().unwrap(), 2);

        // A known kid is served from the cache: no request at all (the server answers none).
        let (url, server) = certs_server(vec![]);
        let maa = Maa::new(&http, &url, "2022-08-01");
        let kid = c.header["kid"].as_str().unwrap();
        let known = parse_certs(jwks(kid, &leaf).as_bytes()).unwrap();
        CERTS_CACHE
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(maa.url.clone(), (Instant::now(), known.clone()));
        Maa::verify_signature(&c, &|r| maa.signing_keys(r)).unwrap();

        // The same known kid, cached longer than the TTL ago: fetched again (one request).
        let (url, server_ttl) = certs_server(vec![jwks(kid, &leaf)]);
        let mut maa = Maa::new(&http, &url, "2022-08-01");
        maa.certs_ttl = Duration::ZERO;
        CERTS_CACHE
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .insert(maa.url.clone(), (Instant::now(), known));
        Maa::verify_signature(&c, &|r| maa.signing_keys(r)).unwrap();
        assert_eq!(
            server_ttl.join().unwrap(),
            1,
            "an expired entry is refetched"
        );
        assert_eq!(server.join().unwrap(), 0);
    }

    #[test]
    fn certs_parsing_takes_x5c_keys() {
        // A JWKS built from the release JWS leaf certificate (any RSA certificate will do).
        let jws = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/akv/vault-release-response.jws"
        ))
        .unwrap();
        let c = split_compact(&jws).unwrap();
        let leaf = c.header["x5c"][0].as_str().unwrap();
        let body = json!({"keys":[{"kid":"k1","kty":"RSA","x5c":[leaf]},{"kty":"RSA"}]});
        let keys = parse_certs(body.to_string().as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0.as_deref(), Some("k1"));
        // The release JWS verifies with the key taken this way (same RS256 path as MAA tokens).
        assert!(crate::crypto::check::verify_rs256(
            &keys[0].1,
            c.signing_input.as_bytes(),
            &c.signature
        ));
        assert!(parse_certs(b"{\"keys\":[]}").is_err());
    }
}
