//! Azure Instance Metadata Service: managed-identity tokens (issued by an emulator "Entra"
//! key, accepted by the emulator's vault and managed HSM) and THIM AMD collateral.

use crate::admin::generic_fault_response;
use crate::context::App;
use crate::tenant::{
    access_token_for, entra_kid, FEDERATION_AUDIENCE, SYSTEM_CLIENT_ID, SYSTEM_OBJECT_ID,
    TENANT_ID, TOKEN_LIFETIME_SECS,
};
use crate::util::now_secs;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::Arc;

fn imds_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// IMDS wants `Metadata: true` and refuses requests that came through a proxy
/// (`X-Forwarded-For`), as the real one does.
fn metadata_ok(headers: &HeaderMap) -> bool {
    headers.get("metadata").and_then(|v| v.to_str().ok()) == Some("true")
        && !headers.contains_key("x-forwarded-for")
}

fn query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex_val = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub async fn token(State(app): State<Arc<App>>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(f) = app.admin.take_fault("imds-token") {
        if let Some(resp) = generic_fault_response(&f).await {
            app.admin.log("imds", "fault", json!({"fault": f}));
            return resp;
        }
    }
    if !metadata_ok(&headers) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    let params = query(&uri);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if get("api-version").filter(|v| !v.is_empty()).is_none() {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'api-version' is missing",
        );
    }
    let Some(resource) = get("resource").filter(|r| !r.is_empty()) else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required audience parameter not specified",
        );
    };
    if !(resource.starts_with("https://") || resource.starts_with("api://")) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            "AADSTS500011: The resource principal named was not found in the tenant",
        );
    }
    let selectors: Vec<(String, String)> = ["client_id", "object_id", "msi_res_id"]
        .iter()
        .filter_map(|s| get(s).map(|v| (s.to_string(), v)))
        .collect();
    if selectors.len() > 1 {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Only one of client_id, object_id or msi_res_id may be specified",
        );
    }
    // Any user-assigned identity asked for is "assigned" to the emulated VM.
    let (client_id, object_id) = match selectors.first() {
        Some((k, v)) if k == "client_id" => (v.clone(), format!("oid-of-{v}")),
        Some((k, v)) if k == "object_id" => (format!("appid-of-{v}"), v.clone()),
        Some((_, v)) => (
            format!(
                "appid-of-{}",
                hex::encode(&Sha256::digest(v.as_bytes())[..8])
            ),
            format!("oid-of-{}", hex::encode(&Sha256::digest(v.as_bytes())[..8])),
        ),
        None => (SYSTEM_CLIENT_ID.to_string(), SYSTEM_OBJECT_ID.to_string()),
    };
    let now = now_secs();
    let exp = now + TOKEN_LIFETIME_SECS;
    let header =
        json!({"typ": "JWT", "alg": "RS256", "kid": entra_kid(&app), "x5t": entra_kid(&app)});
    let claims = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": now, "nbf": now, "exp": exp,
        "aio": "skr-emulator",
        "appid": client_id, "appidacr": "2",
        "idp": format!("https://sts.windows.net/{TENANT_ID}/"),
        "oid": object_id, "sub": object_id, "tid": TENANT_ID,
        "ver": "1.0",
        "xms_mirid": format!("/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/skr-emulator/providers/Microsoft.Compute/virtualMachines/skr-emulator-vm"),
    });
    let access_token = crate::jwt::sign_rs256(&header, &claims, &app.pki.entra_key);
    app.admin.count(|c| c.tokens += 1);
    app.admin.log(
        "imds",
        "token",
        json!({"resource": resource, "client_id": client_id}),
    );
    Json(json!({
        "access_token": access_token,
        "client_id": client_id,
        "expires_in": TOKEN_LIFETIME_SECS.to_string(),
        "expires_on": exp.to_string(),
        "ext_expires_in": TOKEN_LIFETIME_SECS.to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
        "refresh_token": "",
    }))
    .into_response()
}

/// App Service style `IDENTITY_ENDPOINT`: `GET /msi/token?api-version=2019-08-01&resource=…`
/// with `X-IDENTITY-HEADER` = the secret in `DIR/identity/identity-header`. Same JSON as IMDS.
pub async fn identity_endpoint(
    State(app): State<Arc<App>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let expected = app.identity_header();
    if headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return imds_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "X-IDENTITY-HEADER is missing or does not match",
        );
    }
    let params = query(&uri);
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if get("api-version").filter(|v| !v.is_empty()).is_none() {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "api-version is required",
        );
    }
    let Some(resource) =
        get("resource").filter(|r| r.starts_with("https://") || r.starts_with("api://"))
    else {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            "resource is missing or invalid",
        );
    };
    let client_id = get("client_id").unwrap_or_else(|| SYSTEM_CLIENT_ID.to_string());
    let (access_token, now, exp) = access_token_for(&app, &resource, &client_id, SYSTEM_OBJECT_ID);
    app.admin.count(|c| c.tokens += 1);
    app.admin
        .log("identity-endpoint", "token", json!({"resource": resource}));
    Json(json!({
        "access_token": access_token,
        "client_id": client_id,
        "expires_in": TOKEN_LIFETIME_SECS.to_string(),
        "expires_on": exp.to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    }))
    .into_response()
}

/// The audience Entra requires of a federated (workload identity) assertion.
fn entra_error(code: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": code, "error_description": description, "error_codes": [], "timestamp": crate::util::rfc3339(now_secs())})),
    )
        .into_response()
}

/// Entra ID v2 token endpoint for AKS workload identity: `POST /{tenant}/oauth2/v2.0/token`
/// (form) exchanging a federated service-account token (`DIR/identity/federated-token`,
/// issued by the emulator's OIDC issuer) for an access token of `scope` = `<resource>/.default`.
pub async fn entra_token(
    State(app): State<Arc<App>>,
    axum::extract::Path(tenant): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let form: Vec<(String, String)> = text
        .split('&')
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        })
        .collect();
    let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if tenant != TENANT_ID {
        return entra_error(
            "invalid_request",
            &format!(
                "AADSTS90002: Tenant '{tenant}' not found. The emulator's tenant is {TENANT_ID}."
            ),
        );
    }
    if get("grant_type").as_deref() != Some("client_credentials") {
        return entra_error(
            "unsupported_grant_type",
            "AADSTS70003: grant_type must be client_credentials",
        );
    }
    if get("client_assertion_type").as_deref()
        != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    {
        return entra_error("invalid_request", "AADSTS700024: client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    }
    let Some(client_id) = get("client_id").filter(|c| !c.is_empty()) else {
        return entra_error(
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
        );
    };
    let Some(scope) = get("scope") else {
        return entra_error(
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'scope'.",
        );
    };
    let Some(resource) = scope
        .strip_suffix("/.default")
        .filter(|r| r.starts_with("https://"))
    else {
        return entra_error(
            "invalid_scope",
            "AADSTS70011: The provided value for scope must be <resource>/.default",
        );
    };
    let assertion = get("client_assertion").unwrap_or_default();
    let checked = crate::jwt::decode(&assertion).and_then(|jws| {
        jws.verify_rs256(&app.pki.entra_key.to_public_key())
            .map_err(|_| "signature is not by the emulator's OIDC issuer".to_string())?;
        let aud_ok = match jws.payload.get("aud") {
            Some(Value::String(a)) => a == FEDERATION_AUDIENCE,
            Some(Value::Array(list)) => {
                list.iter().any(|a| a.as_str() == Some(FEDERATION_AUDIENCE))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(format!("audience must be {FEDERATION_AUDIENCE}"));
        }
        if jws.payload.get("exp").and_then(Value::as_u64).unwrap_or(0) < now_secs() {
            return Err("the assertion has expired".into());
        }
        Ok(())
    });
    if let Err(e) = checked {
        return entra_error(
            "invalid_client",
            &format!("AADSTS700211: the client assertion is not valid: {e}"),
        );
    }
    let (access_token, _, _) =
        access_token_for(&app, resource, &client_id, &format!("oid-of-{client_id}"));
    app.admin.count(|c| c.tokens += 1);
    app.admin.log(
        "entra",
        "token",
        json!({"resource": resource, "client_id": client_id}),
    );
    Json(json!({
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME_SECS,
        "ext_expires_in": TOKEN_LIFETIME_SECS,
        "access_token": access_token,
    }))
    .into_response()
}

pub async fn thim(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !metadata_ok(&headers) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    Json(app.thim_json()).into_response()
}

/// `POST /acc/tdquote` (platform-evidence §6.5): `{"report": base64url(TDREPORT)}` →
/// `{"quote": base64url(TD quote)}`, on a TDX CVM only. Like Azure's: `Metadata: true`, and
/// `Content-Type` exactly `application/json` (with a charset it is 415); only TDREPORTs of this
/// (simulated) TD are quoted.
pub async fn td_quote(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !metadata_ok(&headers) {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/json" {
        return imds_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
        );
    }
    let Some(keys) = app.tdx.get() else {
        return imds_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this VM is not a TDX confidential VM",
        );
    };
    let report = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("report").and_then(Value::as_str).map(str::to_string))
        .and_then(|r| crate::util::b64_lenient(&r).ok());
    match report {
        Some(r) if crate::tdx::tdreport_is_ours(&r, keys) => {
            app.admin.log("imds", "td-quote", json!({}));
            Json(json!({"quote": crate::util::b64url(&crate::tdx::quote(&r, keys))}))
                .into_response()
        }
        _ => imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "report must be base64url of a TDREPORT of this TD",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("https%3A%2F%2Fvault.azure.net"),
            "https://vault.azure.net"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
