//! Entra ID access tokens for Key Vault / Managed HSM (skr-protocol §11): IMDS managed
//! identity, `IDENTITY_ENDPOINT`, AKS workload identity, or a token file. Tokens are cached per
//! resource for one login and never logged.

use super::http::{Http, Response};
use crate::config::{Identity as IdentityConfig, IdentitySource};
use crate::error::{Error, Result, Step};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub const VAULT_RESOURCE: &str = "https://vault.azure.net";
pub const MHSM_RESOURCE: &str = "https://managedhsm.azure.net";

/// The audience to ask for first: by host name, as the sidecar does; a 401 challenge may
/// correct it (`resource_from_challenge`).
pub fn default_resource(host: &str) -> &'static str {
    if host.contains("managedhsm") {
        MHSM_RESOURCE
    } else {
        VAULT_RESOURCE
    }
}

/// The `resource="…"` of a `WWW-Authenticate: Bearer …` challenge.
pub fn resource_from_challenge(header: &str) -> Option<String> {
    let lower = header.to_ascii_lowercase();
    let mut search = 0;
    while let Some(pos) = lower[search..].find("resource=") {
        let start = search + pos;
        // Only the parameter itself, not a suffix of another name.
        let boundary = start == 0 || matches!(lower.as_bytes()[start - 1], b' ' | b',' | b'\t');
        let value = &header[start + "resource=".len()..];
        search = start + 1;
        if !boundary {
            continue;
        }
        let v = if let Some(rest) = value.strip_prefix('"') {
            rest.split('"').next()?
        } else {
            value.split([',', ' ']).next()?
        };
        if !v.is_empty() {
            return Some(v.trim_end_matches('/').to_string());
        }
    }
    None
}

/// Whether a challenge's `resource` is a Key Vault / Managed HSM audience
/// (`https://vault.<cloud>` or `https://managedhsm.<cloud>`). A challenge may only redirect the
/// module between these: a token for any other audience (e.g. Azure Resource Manager) must
/// never be sent to a vault host, whatever that host asks for.
pub fn is_key_vault_audience(resource: &str) -> bool {
    let Some(rest) = resource.strip_prefix("https://") else {
        return false;
    };
    let host = rest.trim_end_matches('/');
    !host.contains(['/', ':', '@', '?', '#'])
        && (host.starts_with("vault.") || host.starts_with("managedhsm."))
        && host.len() > "vault.".len() + 2
}

pub struct Identity<'a> {
    http: &'a Http,
    cfg: &'a IdentityConfig,
    cache: Mutex<HashMap<String, std::sync::Arc<Zeroizing<String>>>>,
    spent: Mutex<Duration>,
}

fn id_err_service(msg: String) -> Error {
    Error::service(Step::Identity, msg)
}

impl<'a> Identity<'a> {
    pub fn new(http: &'a Http, cfg: &'a IdentityConfig) -> Self {
        Identity {
            http,
            cfg,
            cache: Mutex::new(HashMap::new()),
            spent: Mutex::new(Duration::ZERO),
        }
    }

    /// Time spent getting tokens so far.
    pub fn spent(&self) -> Duration {
        *self.spent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bearer token for `resource`; `refresh` skips the cache (after a 401).
    pub fn token(
        &self,
        resource: &str,
        refresh: bool,
    ) -> Result<std::sync::Arc<Zeroizing<String>>> {
        // Holding the lock while fetching makes concurrent key threads share one request.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !refresh {
            if let Some(t) = cache.get(resource) {
                return Ok(t.clone());
            }
        }
        let started = Instant::now();
        let token = self.fetch(resource);
        *self.spent.lock().unwrap_or_else(|p| p.into_inner()) += started.elapsed();
        let token = std::sync::Arc::new(token?);
        cache.insert(resource.to_string(), token.clone());
        Ok(token)
    }

    fn fetch(&self, resource: &str) -> Result<Zeroizing<String>> {
        match self.cfg.source {
            IdentitySource::Imds => self.imds(resource),
            IdentitySource::IdentityEndpoint => self.identity_endpoint(resource),
            IdentitySource::WorkloadIdentity => self.workload_identity(resource),
            IdentitySource::TokenFile => self.token_file(),
        }
    }

    fn selector(&self) -> Option<(&'static str, &str)> {
        if let Some(v) = &self.cfg.client_id {
            Some(("client_id", v))
        } else if let Some(v) = &self.cfg.object_id {
            Some(("object_id", v))
        } else {
            self.cfg.msi_res_id.as_deref().map(|v| ("msi_res_id", v))
        }
    }

    fn imds(&self, resource: &str) -> Result<Zeroizing<String>> {
        let base = self
            .cfg
            .imds_url
            .as_deref()
            .unwrap_or("http://169.254.169.254")
            .trim_end_matches('/');
        let url = format!("{base}/metadata/identity/oauth2/token");
        let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
        if let Some(sel) = self.selector() {
            query.push(sel);
        }
        // IMDS answers 404/410 while it updates (back within 70 s): retried here on top of
        // the transport/5xx/429 retries of `send`.
        let mut resp = None;
        for attempt in 0..3 {
            let r = self.http.send(Step::Identity, "IMDS token", &|| {
                self.http
                    .direct
                    .get(&url)
                    .query(&query)
                    .header("Metadata", "true")
            })?;
            if matches!(r.status, 404 | 410) && attempt < 2 {
                std::thread::sleep(Duration::from_secs(2 << attempt));
                continue;
            }
            resp = Some(r);
            break;
        }
        let resp = resp.expect("loop sets resp");
        self.token_response("IMDS", resource, resp)
    }

    fn identity_endpoint(&self, resource: &str) -> Result<Zeroizing<String>> {
        let endpoint = env_required("IDENTITY_ENDPOINT", "identity-endpoint")?;
        let header = Zeroizing::new(env_required("IDENTITY_HEADER", "identity-endpoint")?);
        // Marked sensitive so that no Debug output of the request (ours or a library's) shows it.
        let mut header = reqwest::header::HeaderValue::from_str(header.as_str()).map_err(|_| {
            Error::config("IDENTITY_HEADER holds characters an HTTP header cannot carry")
                .with_hint("check the IDENTITY_HEADER the platform set for this process")
        })?;
        header.set_sensitive(true);
        let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
        if let Some(sel) = self.selector() {
            query.push(sel);
        }
        let resp = self
            .http
            .send(Step::Identity, "IDENTITY_ENDPOINT token", &|| {
                self.http
                    .direct
                    .get(&endpoint)
                    .query(&query)
                    .header("X-IDENTITY-HEADER", header.clone())
            })?;
        self.token_response("IDENTITY_ENDPOINT", resource, resp)
    }

    fn workload_identity(&self, resource: &str) -> Result<Zeroizing<String>> {
        let client_id = match &self.cfg.client_id {
            Some(c) => c.clone(),
            None => env_required("AZURE_CLIENT_ID", "workload-identity")?,
        };
        let tenant = env_required("AZURE_TENANT_ID", "workload-identity")?;
        let file = env_required("AZURE_FEDERATED_TOKEN_FILE", "workload-identity")?;
        // Read on every fetch: the kubelet rotates the projected token.
        let assertion = Zeroizing::new(
            std::fs::read_to_string(&file)
                .map_err(|e| {
                    Error::config(format!("AZURE_FEDERATED_TOKEN_FILE {file}: {e}")).with_hint(
                        "the projected service-account token is missing; check the pod's azure.workload.identity/use label and service account",
                    )
                })?
                .trim()
                .to_string(),
        );
        let host = self
            .cfg
            .authority_host
            .clone()
            .or_else(|| env_var("AZURE_AUTHORITY_HOST").filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "https://login.microsoftonline.com".into());
        let url = format!("{}/{tenant}/oauth2/v2.0/token", host.trim_end_matches('/'));
        let scope = format!("{}/.default", resource.trim_end_matches('/'));
        let form = [
            ("client_assertion", assertion.as_str()),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_id", client_id.as_str()),
            ("grant_type", "client_credentials"),
            ("scope", scope.as_str()),
        ];
        let resp = self
            .http
            .send(Step::Identity, "workload identity token", &|| {
                self.http.client_for(&url).post(&url).form(&form)
            })?;
        self.token_response("Entra ID (workload identity)", resource, resp)
    }

    fn token_file(&self) -> Result<Zeroizing<String>> {
        let path = self.cfg.token_file.as_ref().ok_or_else(|| {
            Error::config("identity.token_file is required for source = \"token-file\"")
        })?;
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                Error::config(format!("identity.token_file {}: {e}", path.display()))
            })?);
        let token = text.trim();
        if token.is_empty() {
            return Err(Error::config(format!(
                "identity.token_file {} is empty",
                path.display()
            )));
        }
        Ok(Zeroizing::new(token.to_string()))
    }

    fn token_response(
        &self,
        who: &str,
        resource: &str,
        resp: Response,
    ) -> Result<Zeroizing<String>> {
        // The body holds the token: wipe it whatever happens.
        let resp = WipeOnDrop(resp);
        let resp = &resp.0;
        match resp.status {
            200..=299 => {}
            401 | 403 => {
                return Err(Error::denied(
                    Step::Identity,
                    format!("{who} refused a token for {resource} ({}): {}", resp.status, resp.error_text()),
                )
                .with_hint("the identity is not allowed to get tokens here; check the managed identity / federated credential assignment"));
            }
            400 => {
                return Err(id_err_service(format!(
                    "{who} could not issue a token for {resource} (400): {}",
                    resp.error_text()
                ))
                .with_hint(match self.cfg.source {
                    IdentitySource::WorkloadIdentity => "Entra ID refused the federated token exchange; check the federated credential (issuer, subject = system:serviceaccount:<ns>:<sa>, audience api://AzureADTokenExchange) and AZURE_CLIENT_ID / AZURE_TENANT_ID",
                    _ => "no managed identity is assigned to this VM/container, or identity.client_id/object_id/msi_res_id names one that is not attached",
                }));
            }
            s => {
                return Err(id_err_service(format!(
                    "{who} token request for {resource} answered {s}: {}",
                    resp.error_text()
                ))
                .with_hint("check identity.source and the identity endpoint settings"));
            }
        }
        access_token_from(who, &resp.body)
    }
}

/// The access token of a token response body (IMDS, identity endpoint, Entra): only the token
/// is kept (moved, not copied, into a wiping holder); the other members (numbers as strings or
/// as numbers, depending on the source) are ignored.
pub fn access_token_from(who: &str, body: &[u8]) -> Result<Zeroizing<String>> {
    #[derive(serde::Deserialize)]
    struct TokenBody {
        access_token: Option<String>,
    }
    let parsed: std::result::Result<TokenBody, _> = serde_json::from_slice(body);
    parsed
        .map_err(|_| Error::integrity(Step::Identity, format!("{who} token response is not JSON")))?
        .access_token
        .map(Zeroizing::new)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Error::integrity(
                Step::Identity,
                format!("{who} token response has no access_token"),
            )
        })
}

struct WipeOnDrop(Response);

impl Drop for WipeOnDrop {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0.body);
    }
}

/// A variable of the process environment. Tests substitute an environment of their own for
/// their thread, so that no test calls `set_var` while others run.
fn env_var(name: &str) -> Option<String> {
    #[cfg(test)]
    if let Some(v) = tests::TEST_ENV.with(|e| e.borrow().as_ref().map(|m| m.get(name).cloned())) {
        return v;
    }
    std::env::var(name).ok()
}

fn env_required(name: &str, source: &str) -> Result<String> {
    env_var(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        Error::config(format!(
            "identity.source = \"{source}\" needs the environment variable {name}"
        ))
        .with_hint(format!(
            "set {name} in the environment of the process that loads the module"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_key_vault_audiences_are_followed() {
        for ok in [
            VAULT_RESOURCE,
            MHSM_RESOURCE,
            "https://vault.azure.cn",
            "https://vault.usgovcloudapi.net/",
            "https://managedhsm.azure.cn",
        ] {
            assert!(is_key_vault_audience(ok), "{ok}");
        }
        for bad in [
            "https://management.azure.com",
            "https://graph.microsoft.com",
            "http://vault.azure.net",
            "https://vault.azure.net.evil.com/x",
            "https://vault.azure.net@evil.com",
            "https://evil.com/vault.azure.net",
            "vault.azure.net",
            "https://vault.",
        ] {
            assert!(!is_key_vault_audience(bad), "{bad}");
        }
    }

    #[test]
    fn resources_by_host_and_challenge() {
        assert_eq!(default_resource("kv.vault.azure.net"), VAULT_RESOURCE);
        assert_eq!(default_resource("hsm.managedhsm.azure.net"), MHSM_RESOURCE);
        assert_eq!(default_resource("127.0.0.1"), VAULT_RESOURCE);
        let vault = r#"Bearer authorization="https://login.windows.net/72f988bf", resource="https://vault.azure.net""#;
        assert_eq!(
            resource_from_challenge(vault).as_deref(),
            Some(VAULT_RESOURCE)
        );
        let mhsm = r#"Bearer authorization="https://login.microsoftonline.com/t", resource="https://managedhsm.azure.net/""#;
        assert_eq!(
            resource_from_challenge(mhsm).as_deref(),
            Some(MHSM_RESOURCE)
        );
        assert_eq!(
            resource_from_challenge("Bearer resource=https://x.example, scope=y").as_deref(),
            Some("https://x.example")
        );
        assert_eq!(resource_from_challenge("Bearer authorization=\"a\""), None);
        assert_eq!(resource_from_challenge("Bearer myresource=\"a\""), None);
    }

    #[test]
    fn imds_token_round_trip_against_a_local_server() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in [
                r#"{"access_token":"tok-1","expires_in":"3599","expires_on":"1506484173","resource":"https://vault.azure.net","token_type":"Bearer"}"#,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            ] {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut req = String::new();
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 2 {
                    req.push_str(&line);
                    line.clear();
                }
                seen.push(req);
                let status = if reply.contains("error") {
                    "400 Bad Request"
                } else {
                    "200 OK"
                };
                write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                )
                .unwrap();
            }
            seen
        });
        let cfg = IdentityConfig {
            source: IdentitySource::Imds,
            imds_url: Some(format!("http://127.0.0.1:{port}")),
            client_id: Some("cid-1".into()),
            object_id: None,
            msi_res_id: None,
            token_file: None,
            authority_host: None,
        };
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();
        let id = Identity::new(&http, &cfg);
        let t = id.token(VAULT_RESOURCE, false).unwrap();
        assert_eq!(t.as_str(), "tok-1");
        // Cached per resource: no second request.
        assert_eq!(id.token(VAULT_RESOURCE, false).unwrap().as_str(), "tok-1");
        let e = id.token(MHSM_RESOURCE, false).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_FAILED);
        assert!(
            e.message().contains("Identity not found"),
            "{}",
            e.message()
        );
        assert!(e.hint().unwrap().contains("managed identity"));
        let seen = server.join().unwrap();
        let first = seen[0].to_ascii_lowercase();
        assert!(first.starts_with("get /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3a%2f%2fvault.azure.net&client_id=cid-1"), "{first}");
        assert!(first.contains("\r\nmetadata: true\r\n"), "{first}");
        assert!(seen[1].contains("managedhsm.azure.net"));
    }

    /// A one-shot HTTP server: answers each of `replies` in turn, returns the raw requests.
    fn serve(replies: Vec<(u16, String)>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in replies {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut req = String::new();
                let mut line = String::new();
                let mut len = 0usize;
                while r.read_line(&mut line).unwrap() > 2 {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    req.push_str(&line);
                    line.clear();
                }
                let mut body_in = vec![0u8; len];
                r.read_exact(&mut body_in).unwrap();
                req.push_str("\r\n");
                req.push_str(&String::from_utf8_lossy(&body_in));
                seen.push(req);
                write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            seen
        });
        (port, h)
    }

    fn config(source: IdentitySource) -> IdentityConfig {
        IdentityConfig {
            source,
            imds_url: None,
            client_id: None,
            object_id: None,
            msi_res_id: None,
            token_file: None,
            authority_host: None,
        }
    }

    thread_local! {
        /// This test thread's environment for `env_var` (None: the process's).
        pub(super) static TEST_ENV: std::cell::RefCell<Option<std::collections::HashMap<String, String>>> =
            const { std::cell::RefCell::new(None) };
    }

    fn set_test_env(vars: &[(&str, &str)]) {
        let m = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TEST_ENV.with(|e| *e.borrow_mut() = Some(m));
    }

    /// Workload identity and IDENTITY_ENDPOINT read the environment: this test gives its own
    /// thread an environment of its own (no `set_var` while other tests run).
    #[test]
    fn workload_identity_and_identity_endpoint_requests() {
        let dir = tempfile::tempdir().unwrap();
        let assertion = dir.path().join("federated-token");
        std::fs::write(&assertion, "fed.jwt.sig\n").unwrap();
        let ok = r#"{"token_type":"Bearer","expires_in":3599,"access_token":"at-wi"}"#.to_string();
        let (port, server) = serve(vec![
            (200, ok),
            (401, r#"{"error":"invalid_client","error_description":"AADSTS700213: No matching federated identity record found"}"#.into()),
        ]);
        let assertion = assertion.to_string_lossy();
        set_test_env(&[
            ("AZURE_CLIENT_ID", "11111111-2222"),
            ("AZURE_TENANT_ID", "tenant-x"),
            ("AZURE_FEDERATED_TOKEN_FILE", &assertion),
        ]);
        let mut cfg = config(IdentitySource::WorkloadIdentity);
        cfg.authority_host = Some(format!("http://127.0.0.1:{port}/"));
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();
        let id = Identity::new(&http, &cfg);
        assert_eq!(id.token(MHSM_RESOURCE, false).unwrap().as_str(), "at-wi");
        let e = id.token(VAULT_RESOURCE, false).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_FUNCTION_REJECTED);
        assert!(e.message().contains("AADSTS700213"), "{}", e.message());
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("POST /tenant-x/oauth2/v2.0/token "),
            "{}",
            seen[0]
        );
        let form = seen[0].split("\r\n\r\n").nth(1).unwrap();
        for field in [
            "client_assertion=fed.jwt.sig",
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
            "client_id=11111111-2222",
            "grant_type=client_credentials",
            "scope=https%3A%2F%2Fmanagedhsm.azure.net%2F.default",
        ] {
            assert!(form.contains(field), "{field} not in {form}");
        }
        assert!(seen[1].contains("scope=https%3A%2F%2Fvault.azure.net%2F.default"));

        let (port, server) = serve(vec![(
            200,
            r#"{"access_token":"at-ep","expires_on":"1"}"#.into(),
        )]);
        let endpoint = format!("http://127.0.0.1:{port}/msi/token");
        set_test_env(&[
            ("IDENTITY_ENDPOINT", &endpoint),
            ("IDENTITY_HEADER", "hdr-secret"),
        ]);
        let cfg = config(IdentitySource::IdentityEndpoint);
        let id = Identity::new(&http, &cfg);
        assert_eq!(id.token(VAULT_RESOURCE, false).unwrap().as_str(), "at-ep");
        let seen = server.join().unwrap();
        let req = seen[0].to_ascii_lowercase();
        assert!(
            req.starts_with(
                "get /msi/token?api-version=2019-08-01&resource=https%3a%2f%2fvault.azure.net "
            ),
            "{req}"
        );
        assert!(
            req.contains("\r\nx-identity-header: hdr-secret\r\n"),
            "{req}"
        );
    }

    #[test]
    fn token_file_and_missing_env() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tok");
        std::fs::write(&p, "abc.def.ghi\n").unwrap();
        let cfg = IdentityConfig {
            source: IdentitySource::TokenFile,
            imds_url: None,
            client_id: None,
            object_id: None,
            msi_res_id: None,
            token_file: Some(p.clone()),
            authority_host: None,
        };
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();
        let id = Identity::new(&http, &cfg);
        assert_eq!(
            id.token(VAULT_RESOURCE, false).unwrap().as_str(),
            "abc.def.ghi"
        );
        std::fs::write(&p, "").unwrap();
        assert!(id.token(VAULT_RESOURCE, true).is_err());
        let e = env_required("SKR_TEST_SURELY_UNSET_VARIABLE", "workload-identity").unwrap_err();
        assert!(e.message().contains("SKR_TEST_SURELY_UNSET_VARIABLE"));
    }
}
