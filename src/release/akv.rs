//! Key Vault / Managed HSM: `GET {kid}` for the public key and release policy, `POST
//! {kid}/release` for the wrapped private key (skr-protocol §1, §2, §5, §6).

use super::http::{Http, Response};
use super::identity::{default_resource, is_key_vault_audience, resource_from_challenge, Identity};
use super::jws::{check_release_request, url_host, verify_release_jws, TrustAnchors};
use super::transfer_key::TransferKey;
use super::unwrap::{check_material, parse_key_hsm, unwrap_key_hsm, PublicKeyInfo, WrapAlg};
use super::ReleasedKey;
use crate::config::KeyConfig;
use crate::error::{Error, Result, Step};
use crate::policy;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What `GET {kid}` says about a key.
pub struct KeyBundle {
    /// `key.kid`: the versioned key URL GET answered for.
    pub kid: Option<String>,
    pub public: PublicKeyInfo,
    /// `release_policy.data` (base64url policy JSON), if the key has one.
    pub policy_data: Option<String>,
}

/// The verified attestation a release is asked for with.
pub struct Attestation<'a> {
    pub token: &'a str,
    pub issuer: &'a str,
    pub claims: &'a Value,
}

pub struct Akv<'a> {
    pub http: &'a Http,
    pub identity: &'a Identity<'a>,
    pub anchors: &'a TrustAnchors,
    pub api_version: String,
    pub enc: WrapAlg,
    /// Audience learned from a 401 challenge, per service origin (scheme://host:port: a vault
    /// and a managed HSM may share a host, as in the emulator).
    learned: Mutex<HashMap<String, String>>,
}

impl<'a> Akv<'a> {
    pub fn new(
        http: &'a Http,
        identity: &'a Identity<'a>,
        anchors: &'a TrustAnchors,
        api_version: &str,
        enc: WrapAlg,
    ) -> Self {
        Akv {
            http,
            identity,
            anchors,
            api_version: api_version.to_string(),
            enc,
            learned: Mutex::new(HashMap::new()),
        }
    }

    /// Audiences learned from 401 challenges: (origin, resource).
    pub fn learned_resources(&self) -> Vec<(String, String)> {
        let m = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(h, r)| (h.clone(), r.clone())).collect();
        v.sort();
        v
    }

    fn resource_for(&self, origin: &str, host: &str) -> String {
        self.learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(origin)
            .cloned()
            .unwrap_or_else(|| default_resource(host).to_string())
    }

    /// Send with a bearer token; on 401 learn the audience from the challenge, get a fresh
    /// token and try once more.
    fn authed(
        &self,
        step: Step,
        what: &str,
        host: &str,
        url_for_origin: &str,
        build: &dyn Fn(&str) -> reqwest::blocking::RequestBuilder,
    ) -> Result<Response> {
        let origin = url_origin(url_for_origin);
        let mut resource = self.resource_for(&origin, host);
        let mut token = self.identity.token(&resource, false)?;
        for attempt in 0..2 {
            let resp = self.http.send(step, what, &|| {
                build(token.as_str()).header("Accept", "application/json")
            })?;
            if resp.status != 401 || attempt == 1 {
                if resp.status == 401 {
                    return Err(Error::denied(
                        step,
                        format!(
                            "{what}: the access token for {resource} was refused (401): {}",
                            resp.error_text()
                        ),
                    )
                    .with_hint("the identity's token is not accepted by this vault / managed HSM (wrong tenant or audience); check identity settings and the kid's host"));
                }
                return Ok(resp);
            }
            if let Some(r) = resp
                .header("www-authenticate")
                .and_then(resource_from_challenge)
            {
                if !is_key_vault_audience(&r) {
                    return Err(Error::denied(
                        step,
                        format!("{what}: {origin} asks for a token of {r:?}, which is not a Key Vault or Managed HSM audience; refused"),
                    )
                    .with_hint("the kid host is not behaving like Key Vault / Managed HSM; check the kid URLs in the config"));
                }
                if r != resource {
                    log::debug!("{what}: {origin} asks for tokens of resource {r}");
                    self.learned
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(origin.clone(), r.clone());
                    resource = r;
                }
            }
            token = self.identity.token(&resource, true)?;
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// `GET {kid}`: public key and release policy.
    pub fn get_key(&self, key: &KeyConfig) -> Result<KeyBundle> {
        self.get_key_at(key, &key.kid)
    }

    /// `GET` of one version of `key` (`kid` = the configured URL or a versioned one of it).
    fn get_key_at(&self, key: &KeyConfig, kid: &str) -> Result<KeyBundle> {
        let host = key_host(key)?;
        let url = format!(
            "{}?api-version={}",
            kid.trim_end_matches('/'),
            self.api_version
        );
        let what = format!("GET key {:?}", key.label);
        let resp = self.authed(Step::Release, &what, &host, &url, &|token| {
            self.http.client_for(&url).get(&url).bearer_auth(token)
        })?;
        if !resp.is_success() {
            return Err(status_error(Step::Release, &what, key, &resp));
        }
        let bad = |m: &str| Error::integrity(Step::Release, format!("{what}: {m}"));
        let v: Value =
            serde_json::from_slice(&resp.body).map_err(|_| bad("response is not JSON"))?;
        let jwk = v.get("key").ok_or_else(|| bad("response has no key"))?;
        let public = PublicKeyInfo::from_jwk(jwk).map_err(|m| bad(&m))?;
        let policy_data = v
            .pointer("/release_policy/data")
            .and_then(Value::as_str)
            .map(str::to_string);
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
        Ok(KeyBundle {
            kid,
            public,
            policy_data,
        })
    }

    /// The whole release of one key: GET, release, verify, unwrap, check.
    /// Returns the key and the time spent unwrapping.
    pub fn release_key(
        &self,
        index: usize,
        key: &KeyConfig,
        att: &Attestation<'_>,
        transfer: &dyn TransferKey,
    ) -> Result<(ReleasedKey, Duration)> {
        let host = key_host(key)?;
        let nonce = super::random_nonce()?;
        let url = format!(
            "{}/release?api-version={}",
            key.kid.trim_end_matches('/'),
            self.api_version
        );
        let body = json!({ "target": att.token, "enc": self.enc.name(), "nonce": nonce });
        let what = format!("release of {:?}", key.label);
        // GET (public key, policy) and release run side by side: one round trip less per login.
        // GET's failure wins: its 404 / 403 name the key problem as well as the release's would.
        let (bundle, resp) = std::thread::scope(|s| {
            let get = s.spawn(|| self.get_key(key));
            let resp = self.authed(Step::Release, &what, &host, &url, &|token| {
                self.http
                    .client_for(&url)
                    .post(&url)
                    .bearer_auth(token)
                    .json(&body)
            });
            let bundle = get.join().unwrap_or_else(|_| {
                Err(Error::general(format!("{what}: the GET thread panicked"))
                    .with_step(Step::Release))
            });
            (bundle, resp)
        });
        let mut bundle = bundle?;
        let resp = resp?;
        if resp.status == 403 {
            return Err(explain_403(key, &bundle, att, &resp));
        }
        if !resp.is_success() {
            return Err(status_error(Step::Release, &what, key, &resp));
        }
        let bad = |m: String| Error::integrity(Step::Release, format!("{what}: {m}"));
        let v: Value =
            serde_json::from_slice(&resp.body).map_err(|_| bad("response is not JSON".into()))?;
        let jws = v
            .get("value")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("response has no value (JWS)".into()))?;
        let payload =
            verify_release_jws(jws, &host, self.anchors, rustls_pki_types::UnixTime::now())
                .map_err(|e| e.context(&what))?;
        check_release_request(&payload, &key.kid, self.enc.name(), &nonce)
            .map_err(|e| e.context(&what))?;
        // The version that was released. An unversioned kid follows the key's current
        // version, which a rotation may move between our GET and the release: then describe
        // the released version by its own GET before comparing public keys.
        let released_kid = payload
            .pointer("/response/key/key/kid")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let (Some(released), Some(got)) = (&released_kid, &bundle.kid) {
            if !super::jws::same_key_url(released, got) && key_version(&key.kid).is_none() {
                log::info!("{what}: the key rotated during the release ({got} -> {released}); checking against the released version");
                bundle = self.get_key_at(key, released)?;
            }
        }
        let version = released_kid
            .as_deref()
            .or(bundle.kid.as_deref())
            .and_then(key_version)
            .unwrap_or_default()
            .to_string();
        // The signed public part (when present) must be the key GET described.
        if let Some(signed) = payload.pointer("/response/key/key") {
            check_signed_public(&what, signed, &bundle.public)?;
        }
        let key_hsm = payload
            .pointer("/response/key/key/key_hsm")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("signed payload has no response.key.key.key_hsm".into()))?;
        let started = Instant::now();
        let envelope = parse_key_hsm(key_hsm).map_err(|e| e.context(&what))?;
        let material =
            unwrap_key_hsm(&envelope, transfer, self.enc).map_err(|e| e.context(&what))?;
        let material = check_material(&key.label, material, &bundle.public)?;
        Ok((
            ReleasedKey {
                index,
                material,
                version,
            },
            started.elapsed(),
        ))
    }
}

/// The version segment of a key URL `https://host/keys/{name}/{version}`, if it has one.
pub fn key_version(kid: &str) -> Option<&str> {
    let path = kid.split_once("/keys/")?.1.trim_end_matches('/');
    let (_, version) = path.split_once('/')?;
    let version = version.split(['?', '/']).next()?;
    (!version.is_empty()).then_some(version)
}

/// Compare the public key inside the signed release payload with the one from `GET {kid}`.
/// Symmetric keys have no public part; a payload without one is not an error (AKV always sends
/// it for RSA and EC, but nothing depends on it beyond this cross-check).
fn check_signed_public(what: &str, signed: &Value, from_get: &PublicKeyInfo) -> Result<()> {
    let has_public = ["n", "x"].iter().any(|m| signed.get(*m).is_some());
    if !has_public {
        return Ok(());
    }
    match PublicKeyInfo::from_jwk(signed) {
        Ok(p) if &p == from_get => Ok(()),
        Ok(_) => Err(Error::integrity(
            Step::Release,
            format!("{what}: the signed release payload describes another public key than GET {{kid}}"),
        )
        .with_hint("the key changed between GET and release (a new version?) or a response was altered; retry the login, and pin a key version in kid if keys rotate")),
        Err(m) => Err(Error::integrity(
            Step::Release,
            format!("{what}: signed release payload: {m}"),
        )),
    }
}

/// `scheme://host[:port]` of a URL (the URL itself if it does not parse).
fn url_origin(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| url.to_string())
}

fn key_host(key: &KeyConfig) -> Result<String> {
    url_host(&key.kid).ok_or_else(|| {
        Error::config(format!(
            "key {:?}: kid {:?} is not a URL with a host",
            key.label, key.kid
        ))
    })
}

/// Classify a non-success, non-403 status of AKV.
fn status_error(step: Step, what: &str, key: &KeyConfig, resp: &Response) -> Error {
    let text = resp.error_text();
    match resp.status {
        404 => Error::service(step, format!("{what}: key not found (404): {text}"))
            .with_hint(format!("check kid in the config: {:?} does not exist or has no such version", key.kid)),
        403 => Error::denied(step, format!("{what}: forbidden (403): {text}")).with_hint(
            "the identity lacks permission on this key (get / release); grant Key Vault Crypto Service Release User or an access policy with get and release",
        ),
        400 => Error::service(step, format!("{what}: AKV refused the request (400): {text}"))
            .with_hint("the key or request is not releasable as configured (exportable key with release policy, Premium vault or managed HSM, release.api_version >= 7.3)"),
        s => Error::service(step, format!("{what}: AKV answered {s}: {text}"))
            .with_hint("check the kid URL in the config and release.api_version"),
    }
}

/// A 403 on release: evaluate the key's policy against the token locally and name the claim.
fn explain_403(
    key: &KeyConfig,
    bundle: &KeyBundle,
    att: &Attestation<'_>,
    resp: &Response,
) -> Error {
    let akv_says = resp.error_text();
    let head = format!("release of {:?} refused (403)", key.label);
    let Some(data) = &bundle.policy_data else {
        return Error::denied(Step::Release, format!("{head}: {akv_says}; the key has no release policy to explain it"))
            .with_hint("the key must be exportable with a release policy, and the identity needs the release permission");
    };
    match policy::parse_encoded(data) {
        Err(e) => Error::denied(Step::Release, format!("{head}: {akv_says}; its {e}"))
            .with_hint("the key's release policy could not be read locally; inspect it with `skr-pkcs11 policy check`"),
        Ok(p) => match policy::evaluate(&p, att.issuer, att.claims) {
            Err(why) => {
                let hint = match &why {
                    policy::Explanation::NoAuthority { .. } => format!(
                        "the policy does not trust the MAA this module uses ({}); set attestation.url to one of the policy authorities or add it to the policy",
                        att.issuer
                    ),
                    // A CVM guest's AzureGuest token carries the TEE claims nested under
                    // x-ms-isolation-tee; a policy naming them at the top level (the Azure CLI's
                    // --default-cvm-policy, written for platform / disk-encryption tokens) can
                    // never be met by a guest, whatever the TEE.
                    policy::Explanation::Unmet { claim, actual: None, .. }
                        if !claim.contains('.')
                            && att.claims.get("x-ms-isolation-tee").and_then(|t| t.get(claim)).is_some() => format!(
                        "this VM is attested by guest attestation, whose token carries {claim} under x-ms-isolation-tee; the policy checks it at the top level, as the Azure CLI's --default-cvm-policy (a platform / disk-encryption policy) does: name x-ms-isolation-tee.{claim} in the key's release policy (docs/DEPLOY-CVM.md)"
                    ),
                    policy::Explanation::Unmet { claim, .. } => format!(
                        "this TEE's attestation does not satisfy the key's release policy at claim {claim}; deploy a TEE that matches (e.g. the expected measurement / host data) or update the policy"
                    ),
                };
                Error::denied(Step::Release, format!("{head}: {why}")).with_hint(hint)
            }
            Ok(()) => Error::denied(
                Step::Release,
                format!("{head} although the release policy is met by the token locally: {akv_says}"),
            )
            .with_hint("check that the identity has the release permission (Key Vault Crypto Service Release User / Managed HSM Crypto Service Release User) on this key"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyConfig {
        KeyConfig {
            label: "denied-rsa".into(),
            id: "01".into(),
            kid: "https://kv.vault.azure.net/keys/denied-rsa".into(),
            certificate: None,
            allow_rsa_pkcs_decrypt: false,
        }
    }

    fn resp(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: Default::default(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn forbidden_release_names_the_unmet_claim() {
        let policy = json!({"version":"1.0.0","anyOf":[{"authority":"https://maa.example/","allOf":[
            {"claim":"x-ms-attestation-type","equals":"sevsnpvm"},
            {"claim":"x-ms-sevsnpvm-launchmeasurement","equals":"ab01"}]}]});
        let bundle = KeyBundle {
            kid: None,
            public: PublicKeyInfo::Oct { key_size: None },
            policy_data: Some(crate::release::b64url(policy.to_string().as_bytes())),
        };
        let claims =
            json!({"x-ms-attestation-type":"sevsnpvm","x-ms-sevsnpvm-launchmeasurement":"cd02"});
        let att = Attestation {
            token: "t",
            issuer: "https://maa.example",
            claims: &claims,
        };
        let e = explain_403(
            &key(),
            &bundle,
            &att,
            &resp(403, r#"{"error":{"code":"Forbidden","message":"denied"}}"#),
        );
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_REJECTED);
        assert_eq!(
            e.message(),
            "release of \"denied-rsa\" refused (403): policy condition x-ms-sevsnpvm-launchmeasurement equals \"ab01\" not met (token has \"cd02\")"
        );
        assert!(e
            .hint()
            .unwrap()
            .contains("x-ms-sevsnpvm-launchmeasurement"));
        // Another MAA: the authority is named.
        let att2 = Attestation {
            token: "t",
            issuer: "https://other.example",
            claims: &claims,
        };
        let e = explain_403(&key(), &bundle, &att2, &resp(403, "{}"));
        assert!(
            e.message().contains("no policy authority matches"),
            "{}",
            e.message()
        );
        assert!(e.hint().unwrap().contains("attestation.url"));
        // Policy met locally: points at permissions and quotes AKV.
        let ok_claims =
            json!({"x-ms-attestation-type":"sevsnpvm","x-ms-sevsnpvm-launchmeasurement":"ab01"});
        let att3 = Attestation {
            token: "t",
            issuer: "https://maa.example",
            claims: &ok_claims,
        };
        let e = explain_403(
            &key(),
            &bundle,
            &att3,
            &resp(403, r#"{"error":{"message":"Operation not permitted"}}"#),
        );
        assert!(
            e.message().contains("Operation not permitted"),
            "{}",
            e.message()
        );
        assert!(e.hint().unwrap().contains("release permission"));
    }

    #[test]
    fn signed_public_part_must_match_get() {
        let get = PublicKeyInfo::Rsa {
            n: vec![0xc1, 2, 3],
            e: vec![1, 0, 1],
        };
        let signed = json!({"kty":"RSA-HSM","n":crate::release::b64url(&[0xc1,2,3]),"e":"AAEAAQ","key_hsm":"x"});
        check_signed_public("r", &signed, &get).unwrap();
        let other = json!({"kty":"RSA","n":crate::release::b64url(&[0xc1,2,4]),"e":"AQAB"});
        let e = check_signed_public("r", &other, &get).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
        // oct: no public part to compare.
        check_signed_public(
            "r",
            &json!({"kty":"oct-HSM","key_hsm":"x"}),
            &PublicKeyInfo::Oct { key_size: None },
        )
        .unwrap();
    }

    #[test]
    fn status_classes() {
        let e = status_error(
            Step::Release,
            "GET key",
            &key(),
            &resp(404, r#"{"error":{"message":"Key not found"}}"#),
        );
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_FAILED);
        assert!(e.hint().unwrap().contains("check kid in the config"));
        let e = status_error(
            Step::Release,
            "release",
            &key(),
            &resp(400, r#"{"error":{"message":"AKV.SKR.1004"}}"#),
        );
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_FAILED);
        assert!(e.message().contains("AKV.SKR.1004"));
        let e = status_error(Step::Release, "GET key", &key(), &resp(403, "{}"));
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_REJECTED);
    }

    #[test]
    fn a_top_level_policy_claim_that_a_guest_token_nests_under_isolation_tee_gets_a_hint_to_name_the_nested_claim(
    ) {
        // Microsoft's AzureGuest sample token against the Azure CLI's --default-cvm-policy.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");
        let read = |p: &str| -> Value {
            serde_json::from_slice(&std::fs::read(format!("{dir}/{p}")).unwrap()).unwrap()
        };
        let claims = read("maa/azureguest-cvm-claims.json");
        let mut policy = read("policy/published-examples.json")["azure_cli_default_cvm_policy"]
            ["policy"]
            .clone();
        let issuer = claims["iss"].as_str().unwrap().to_string();
        policy["anyOf"][0]["authority"] = json!(issuer);
        let bundle = KeyBundle {
            kid: None,
            public: PublicKeyInfo::Oct { key_size: None },
            policy_data: Some(crate::release::b64url(policy.to_string().as_bytes())),
        };
        let att = Attestation {
            token: "t",
            issuer: &issuer,
            claims: &claims,
        };
        let e = explain_403(&key(), &bundle, &att, &resp(403, "{}"));
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_REJECTED);
        assert!(
            e.message().contains("x-ms-compliance-status") && e.message().contains("absent"),
            "{}",
            e.message()
        );
        let hint = e.hint().unwrap();
        assert!(
            hint.contains("name x-ms-isolation-tee.x-ms-compliance-status")
                && hint.contains("--default-cvm-policy"),
            "{hint}"
        );
        // A claim the guest token does not carry anywhere keeps the general hint.
        policy["anyOf"][0]["allOf"] = json!([{"claim":"x-ms-sgx-mrsigner","equals":"00"}]);
        let bundle = KeyBundle {
            policy_data: Some(crate::release::b64url(policy.to_string().as_bytes())),
            ..bundle
        };
        let e = explain_403(&key(), &bundle, &att, &resp(403, "{}"));
        assert!(e
            .hint()
            .unwrap()
            .starts_with("this TEE's attestation does not satisfy"));
    }
}
