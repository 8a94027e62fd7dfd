//! The emulated tenant's identity provider (Entra ID): its ids and the tokens its signing key
//! issues and the vault accepts. Shared below the services: IMDS and the Entra endpoint issue
//! these tokens, Key Vault verifies them, and neither service imports the other.

use crate::context::App;
use crate::util::{b64url, now_secs};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The emulator's tenant (appears in tokens and in the vault's WWW-Authenticate challenge).
pub const TENANT_ID: &str = "5e1c0de5-0000-4e6f-8a1d-736b72656d75";
/// The system-assigned identity the emulated VM has.
pub const SYSTEM_OBJECT_ID: &str = "0b1ec7ed-5e1f-4a55-9a6e-736b72656d75";
pub const SYSTEM_CLIENT_ID: &str = "c1e47001-5e1f-4a55-9a6e-736b72656d75";
pub const TOKEN_LIFETIME_SECS: u64 = 86399;

pub const FEDERATION_AUDIENCE: &str = "api://AzureADTokenExchange";

pub fn entra_kid(app: &App) -> String {
    let n = app.pki.entra_key.n().to_bytes_be();
    b64url(&Sha256::digest(&n)[..20])
}

/// An Entra access token (RS256 by the emulator's Entra key) for `resource`.
pub fn access_token_for(
    app: &App,
    resource: &str,
    client_id: &str,
    object_id: &str,
) -> (String, u64, u64) {
    let now = now_secs();
    let exp = now + TOKEN_LIFETIME_SECS;
    let header =
        json!({"typ": "JWT", "alg": "RS256", "kid": entra_kid(app), "x5t": entra_kid(app)});
    let claims = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": now, "nbf": now, "exp": exp,
        "aio": "skr-emulator",
        "appid": client_id, "appidacr": "2",
        "idp": format!("https://sts.windows.net/{TENANT_ID}/"),
        "oid": object_id, "sub": object_id, "tid": TENANT_ID,
        "ver": "1.0",
    });
    (
        crate::jwt::sign_rs256(&header, &claims, &app.pki.entra_key),
        now,
        exp,
    )
}

/// A projected service-account token as AKS would mount it (for `AZURE_FEDERATED_TOKEN_FILE`).
pub fn federated_token(app: &App) -> String {
    let now = now_secs();
    let header = json!({"alg": "RS256", "kid": entra_kid(app)});
    let claims = json!({
        "aud": [FEDERATION_AUDIENCE],
        "iss": format!("{}/oidc", app.urls.platform),
        "sub": "system:serviceaccount:default:skr-emulator",
        "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME_SECS,
    });
    crate::jwt::sign_rs256(&header, &claims, &app.pki.entra_key)
}

/// Checks an access token as the vault does: signature by the emulator's Entra key, time, and
/// audience (with or without a trailing slash). Err carries an AKV-style message.
pub fn verify_access_token(app: &App, token: &str, audience: &str) -> Result<(), String> {
    let jws = crate::jwt::decode(token).map_err(|e| format!("AKV10021: Invalid token: {e}"))?;
    jws.verify_rs256(&app.pki.entra_key.to_public_key())
        .map_err(|_| "AKV10032: Invalid issuer or signature: the token was not issued by this tenant's identity provider.".to_string())?;
    let now = now_secs();
    let exp = jws.payload.get("exp").and_then(Value::as_u64).unwrap_or(0);
    if exp + 300 < now {
        return Err("AKV10029: Token expired.".into());
    }
    let aud = jws
        .payload
        .get("aud")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if aud.trim_end_matches('/') != audience {
        return Err(format!(
            "AKV10022: Invalid audience. Expected {audience}, found: {aud}."
        ));
    }
    Ok(())
}
