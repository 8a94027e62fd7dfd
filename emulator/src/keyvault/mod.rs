//! Azure Key Vault (Premium) and Managed HSM data plane for keys: create, import, get, update
//! (release policy), and Secure Key Release (skr-protocol.md §1–§7).

mod target;

use crate::admin::{generic_fault_response, FaultKind, KeyOp, KeyWeight};
use crate::context::App;
use crate::keystore::{KeyVersion, Kind, StoredPolicy};
use crate::policy;
use crate::util::{b64_lenient, b64std, b64url, now_secs, random_hex};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rsa::traits::PublicKeyParts;
use rsa::BigUint;
use serde_json::{json, Map, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384};
use std::sync::Arc;

#[derive(Clone)]
pub struct Service {
    pub app: Arc<App>,
    pub kind: Kind,
}

impl Service {
    fn base_url(&self) -> &str {
        match self.kind {
            Kind::Vault => &self.app.urls.vault,
            Kind::Mhsm => &self.app.urls.mhsm,
        }
    }
}

#[derive(Debug)]
pub struct KvError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

fn kv_err(status: StatusCode, code: &'static str, message: impl Into<String>) -> KvError {
    KvError {
        status,
        code,
        message: message.into(),
    }
}

fn bad(message: impl Into<String>) -> KvError {
    kv_err(StatusCode::BAD_REQUEST, "BadParameter", message)
}

impl KvError {
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for KvError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response()
    }
}

// ---- key material --------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    Ec,
    Oct,
}

pub fn family(kty: &str) -> Option<KeyFamily> {
    match kty {
        "RSA" | "RSA-HSM" => Some(KeyFamily::Rsa),
        "EC" | "EC-HSM" => Some(KeyFamily::Ec),
        "oct" | "oct-HSM" => Some(KeyFamily::Oct),
        _ => None,
    }
}

fn material(v: &KeyVersion) -> Vec<u8> {
    crate::util::b64_lenient(&v.material).unwrap_or_default()
}

pub fn generate_material(
    fam: KeyFamily,
    key_size: Option<u64>,
    crv: Option<&str>,
) -> Result<(Vec<u8>, Option<String>), KvError> {
    match fam {
        KeyFamily::Rsa => {
            let bits = key_size.unwrap_or(2048);
            if ![2048, 3072, 4096].contains(&bits) {
                return Err(bad(format!(
                    "RSA key_size {bits} is not supported; use 2048, 3072 or 4096"
                )));
            }
            // AWS-LC generates (tenths of a second for 4096 bits); RustCrypto's prime search
            // took seconds per key and, fuzzed, a 4096-bit create passed libFuzzer's 20 s
            // limit. The emulator's cross-checks (wrap, sign, verify) stay on RustCrypto.
            use aws_lc_rs::encoding::AsDer;
            let size = match bits {
                2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                _ => aws_lc_rs::rsa::KeySize::Rsa4096,
            };
            let internal = |what: &str| {
                kv_err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    format!("RSA-{bits} key generation: {what}"),
                )
            };
            let key = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| internal("failed"))?;
            let der = key
                .as_der()
                .map_err(|_| internal("PKCS#8 encoding failed"))?;
            Ok((der.as_ref().to_vec(), None))
        }
        KeyFamily::Ec => {
            let crv = crv.unwrap_or("P-256");
            let der = match crv {
                "P-256" => p256::SecretKey::random(&mut rand::rngs::OsRng).to_pkcs8_der(),
                "P-384" => p384::SecretKey::random(&mut rand::rngs::OsRng).to_pkcs8_der(),
                "P-521" => p521::SecretKey::random(&mut rand::rngs::OsRng).to_pkcs8_der(),
                other => {
                    return Err(bad(format!(
                        "curve {other} is not supported by skr-emulator; use P-256, P-384 or P-521"
                    )))
                }
            }
            .map_err(|e| bad(e.to_string()))?;
            Ok((der.as_bytes().to_vec(), Some(crv.to_string())))
        }
        KeyFamily::Oct => {
            let bits = key_size.unwrap_or(256);
            if ![128, 192, 256].contains(&bits) {
                return Err(bad(format!(
                    "oct key_size {bits} is not supported; use 128, 192 or 256"
                )));
            }
            let mut k = vec![0u8; bits as usize / 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
            Ok((k, None))
        }
    }
}

/// The public JWK members (`n`/`e` or `crv`/`x`/`y`; nothing for oct).
pub fn public_jwk(v: &KeyVersion) -> Map<String, Value> {
    let mut m = Map::new();
    let der = material(v);
    match family(&v.kty) {
        Some(KeyFamily::Rsa) => {
            if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_der(&der) {
                m.insert("n".into(), json!(b64url(&key.n().to_bytes_be())));
                m.insert("e".into(), json!(b64url(&key.e().to_bytes_be())));
            }
        }
        Some(KeyFamily::Ec) => {
            let point = match v.crv.as_deref() {
                Some("P-256") => p256::SecretKey::from_pkcs8_der(&der)
                    .ok()
                    .map(|k| k.public_key().to_encoded_point(false).as_bytes().to_vec()),
                Some("P-384") => p384::SecretKey::from_pkcs8_der(&der)
                    .ok()
                    .map(|k| k.public_key().to_encoded_point(false).as_bytes().to_vec()),
                Some("P-521") => p521::SecretKey::from_pkcs8_der(&der)
                    .ok()
                    .map(|k| k.public_key().to_encoded_point(false).as_bytes().to_vec()),
                _ => None,
            };
            if let Some(point) = point {
                let coord = (point.len() - 1) / 2;
                m.insert("crv".into(), json!(v.crv));
                m.insert("x".into(), json!(b64url(&point[1..1 + coord])));
                m.insert("y".into(), json!(b64url(&point[1 + coord..])));
            }
        }
        _ => {}
    }
    m
}

/// SubjectPublicKeyInfo DER of an RSA or EC key version (for certificates of demo keys).
pub fn public_spki(v: &KeyVersion) -> Option<spki::SubjectPublicKeyInfoOwned> {
    let der = material(v);
    match (family(&v.kty)?, v.crv.as_deref()) {
        (KeyFamily::Rsa, _) => crate::pki::spki_of(
            &rsa::RsaPrivateKey::from_pkcs8_der(&der)
                .ok()?
                .to_public_key(),
        )
        .ok(),
        (KeyFamily::Ec, Some("P-256")) => {
            crate::pki::spki_of(&p256::SecretKey::from_pkcs8_der(&der).ok()?.public_key()).ok()
        }
        (KeyFamily::Ec, Some("P-384")) => {
            crate::pki::spki_of(&p384::SecretKey::from_pkcs8_der(&der).ok()?.public_key()).ok()
        }
        _ => None,
    }
}

fn default_ops(fam: KeyFamily) -> Vec<String> {
    let ops: &[&str] = match fam {
        KeyFamily::Rsa => &[
            "encrypt",
            "decrypt",
            "sign",
            "verify",
            "wrapKey",
            "unwrapKey",
        ],
        KeyFamily::Ec => &["sign", "verify"],
        KeyFamily::Oct => &["encrypt", "decrypt", "wrapKey", "unwrapKey"],
    };
    ops.iter().map(|s| s.to_string()).collect()
}

// ---- wrapping (the SKR "key_hsm" blob) -----------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    RsaAesKeyWrap,
    RsaAesKeyWrap256,
    RsaAesKeyWrap384,
}

impl Enc {
    pub fn parse(name: Option<&str>) -> Result<Enc, String> {
        match name {
            None | Some("CKM_RSA_AES_KEY_WRAP") => Ok(Enc::RsaAesKeyWrap),
            Some("RSA_AES_KEY_WRAP_256") => Ok(Enc::RsaAesKeyWrap256),
            Some("RSA_AES_KEY_WRAP_384") => Ok(Enc::RsaAesKeyWrap384),
            Some(other) => Err(format!(
                "enc {other:?} is not one of CKM_RSA_AES_KEY_WRAP, RSA_AES_KEY_WRAP_256, RSA_AES_KEY_WRAP_384"
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Enc::RsaAesKeyWrap => "CKM_RSA_AES_KEY_WRAP",
            Enc::RsaAesKeyWrap256 => "RSA_AES_KEY_WRAP_256",
            Enc::RsaAesKeyWrap384 => "RSA_AES_KEY_WRAP_384",
        }
    }
    fn oaep(self) -> rsa::Oaep {
        // Oaep::new uses the same hash for MGF1 and an empty label, as AKV does.
        match self {
            Enc::RsaAesKeyWrap => rsa::Oaep::new::<Sha1>(),
            Enc::RsaAesKeyWrap256 => rsa::Oaep::new::<Sha256>(),
            Enc::RsaAesKeyWrap384 => rsa::Oaep::new::<Sha384>(),
        }
    }
}

/// RSA-OAEP(fresh 32-byte AES KEK) ‖ AES-KWP (RFC 5649) of the key material.
pub fn wrap(
    wrapping_key: &rsa::RsaPublicKey,
    enc: Enc,
    plaintext: &[u8],
) -> Result<Vec<u8>, String> {
    let kek: [u8; 32] = crate::util::random_bytes();
    let mut out = wrapping_key
        .encrypt(&mut rand::rngs::OsRng, enc.oaep(), &kek)
        .map_err(|e| format!("RSA-OAEP: {e}"))?;
    let kwp = aes_kw::KekAes256::new(&kek.into())
        .wrap_with_padding_vec(plaintext)
        .map_err(|e| format!("AES-KWP: {e}"))?;
    out.extend_from_slice(&kwp);
    Ok(out)
}

/// The first RSA JWK of the token's top-level `x-ms-runtime.keys` meant for encryption.
pub fn pick_wrapping_jwk(claims: &Value) -> Option<&Value> {
    claims
        .get("x-ms-runtime")?
        .get("keys")?
        .as_array()?
        .iter()
        .find(|k| {
            let rsa = k
                .get("kty")
                .and_then(Value::as_str)
                .map(|t| t.starts_with("RSA"))
                .unwrap_or(false);
            let ops = k
                .get("key_ops")
                .and_then(Value::as_array)
                .map(|ops| ops.iter().any(|o| o.as_str() == Some("encrypt")))
                .unwrap_or(false);
            let use_enc = k.get("use").and_then(Value::as_str) == Some("enc");
            rsa && (ops || use_enc)
        })
}

pub fn rsa_from_jwk(jwk: &Value) -> Result<rsa::RsaPublicKey, String> {
    let n = jwk
        .get("n")
        .and_then(Value::as_str)
        .ok_or("wrapping JWK has no n")?;
    let e = jwk
        .get("e")
        .and_then(Value::as_str)
        .ok_or("wrapping JWK has no e")?;
    rsa::RsaPublicKey::new(
        BigUint::from_bytes_be(&b64_lenient(n)?),
        BigUint::from_bytes_be(&b64_lenient(e)?),
    )
    .map_err(|e| format!("wrapping JWK is not a usable RSA key: {e}"))
}

// ---- HTTP ----------------------------------------------------------------------------------

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// true for 7.3 and later (7.3-preview included, date-style versions are all newer).
fn api_supports_skr(version: &str) -> Result<bool, KvError> {
    let head = version.split('-').next().unwrap_or_default();
    if head.len() == 4 && head.chars().all(|c| c.is_ascii_digit()) {
        return Ok(true);
    }
    let mut parts = head.split('.');
    let major: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad(format!("The specified api-version {version} is not valid")))?;
    let minor: u32 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| bad(format!("The specified api-version {version} is not valid")))?;
    Ok((major, minor) >= (7, 3))
}

fn challenge(kind: Kind) -> HeaderValue {
    let value = match kind {
        Kind::Vault => format!(
            "Bearer authorization=\"https://login.windows.net/{}\", resource=\"{}\"",
            crate::tenant::TENANT_ID,
            kind.audience()
        ),
        Kind::Mhsm => format!(
            "Bearer authorization=\"https://login.microsoftonline.com/{}\", resource=\"{}\"",
            crate::tenant::TENANT_ID,
            kind.audience()
        ),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer"))
}

fn unauthorized(kind: Kind, message: Option<String>) -> Response {
    let mut resp = match (kind, message) {
        (Kind::Vault, None) => kv_err(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "AKV10000: Request is missing a Bearer or PoP token.",
        )
        .into_response(),
        // Managed HSM answers the missing-token case with an empty body.
        (Kind::Mhsm, None) => StatusCode::UNAUTHORIZED.into_response(),
        (_, Some(m)) => kv_err(StatusCode::UNAUTHORIZED, "Unauthorized", m).into_response(),
    };
    resp.headers_mut()
        .insert("www-authenticate", challenge(kind));
    resp
}

fn check_bearer(svc: &Service, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return Err(Box::new(unauthorized(svc.kind, None)));
    };
    let Some(token) = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))
    else {
        return Err(Box::new(unauthorized(svc.kind, None)));
    };
    crate::tenant::verify_access_token(&svc.app, token.trim(), svc.kind.audience())
        .map_err(|m| Box::new(unauthorized(svc.kind, Some(m))))
}

enum Route {
    List,
    Versions(String),
    Create(String),
    Import(String),
    Get(String, Option<String>),
    Update(String, Option<String>),
    Release(String, Option<String>),
    Rotate(String),
}

fn route(method: &Method, path: &str) -> Option<Route> {
    if method == Method::GET && (path == "/keys" || path == "/keys/") {
        return Some(Route::List);
    }
    let rest = path.strip_prefix("/keys/")?;
    let segs: Vec<&str> = rest.split('/').collect();
    let name = segs.first()?.to_string();
    let version = |s: &str| (!s.is_empty()).then(|| s.to_string());
    Some(match (method, segs.as_slice()) {
        (&Method::POST, [_, "create"]) => Route::Create(name),
        (&Method::PUT, [_]) => Route::Import(name),
        (&Method::GET, [_]) => Route::Get(name, None),
        (&Method::GET, [_, "versions"]) => Route::Versions(name),
        (&Method::GET, [_, v]) => Route::Get(name, version(v)),
        (&Method::PATCH, [_]) => Route::Update(name, None),
        (&Method::PATCH, [_, v]) => Route::Update(name, version(v)),
        (&Method::POST, [_, "release"]) => Route::Release(name, None),
        (&Method::POST, [_, "rotate"]) => Route::Rotate(name),
        // `/keys/{name}//release`: the Azure SDKs' empty-version form.
        (&Method::POST, [_, v, "release"]) => Route::Release(name, version(v)),
        _ => return None,
    })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 127
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

pub async fn dispatch(
    State(svc): State<Service>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let Some(r) = route(&method, &path) else {
        return kv_err(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{method} {path} is not an operation of this service"),
        )
        .into_response();
    };
    if let Err(resp) = check_bearer(&svc, &headers) {
        svc.app
            .admin
            .log(svc.kind.name(), "unauthorized", json!({"path": path}));
        return *resp;
    }
    let Some(api) = query_param(&uri, "api-version") else {
        return bad("The 'api-version' query parameter is required").into_response();
    };
    let skr_api = match api_supports_skr(&api) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let body_json = || -> Result<Value, KvError> {
        if body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&body)
            .map_err(|e| bad(format!("The request body is not valid JSON: {e}")))
    };
    // Opt-in (`PUT /admin/limits`): the service's documented limits, or a test's budget.
    let (op, weight) = throttle_class(&svc, &r, &body);
    if let Some(retry_after) = svc.app.admin.throttle(svc.kind, op, weight) {
        svc.app.admin.log(
            svc.kind.name(),
            "throttled",
            json!({"path": path, "retry_after": retry_after}),
        );
        let mut resp = kv_err(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttled",
            "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached",
        )
        .into_response();
        if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
            resp.headers_mut().insert("retry-after", v);
        }
        return resp;
    }
    let result = match r {
        Route::List => list(&svc, None),
        Route::Versions(name) => list(&svc, Some(&name)),
        // Key generation (RSA-4096 takes seconds) runs off the async workers, bounded.
        Route::Create(name) => match body_json() {
            Ok(request) => {
                let worker_svc = svc.clone();
                crate::util::off_workers(std::time::Duration::from_secs(60), move || {
                    create(&worker_svc, &name, &request, skr_api)
                })
                .await
                .unwrap_or_else(|late| {
                    Err(kv_err(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        format!("key generation {late}"),
                    ))
                })
            }
            Err(e) => Err(e),
        },
        Route::Import(name) => body_json().and_then(|b| import(&svc, &name, &b, skr_api)),
        Route::Rotate(name) => {
            if !skr_api {
                return bad(format!(
                    "Key rotation is not supported in api-version {api}; use 7.3 or later"
                ))
                .into_response();
            }
            let worker_svc = svc.clone();
            crate::util::off_workers(std::time::Duration::from_secs(60), move || {
                rotate(&worker_svc, &name)
            })
            .await
            .unwrap_or_else(|late| {
                Err(kv_err(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    format!("key generation {late}"),
                ))
            })
        }
        Route::Get(name, version) => {
            if let Some(f) = svc.app.admin.take_fault("akv-get") {
                if let Some(resp) = generic_fault_response(&f).await {
                    svc.app
                        .admin
                        .log(svc.kind.name(), "fault", json!({"fault": f}));
                    return resp;
                }
            }
            get(&svc, &name, version.as_deref())
        }
        Route::Update(name, version) => {
            body_json().and_then(|b| update(&svc, &name, version.as_deref(), &b))
        }
        Route::Release(name, version) => {
            if !skr_api {
                return bad(format!(
                    "Key release is not supported in api-version {api}; use 7.3 or later"
                ))
                .into_response();
            }
            match body_json() {
                Ok(b) => release(&svc, &name, version.as_deref(), &b, &api).await,
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

/// The throttling category of a call and the key it weighs (docs/EMULATOR.md "Throttling").
fn throttle_class(svc: &Service, r: &Route, body: &[u8]) -> (KeyOp, KeyWeight) {
    let stored = |name: &str| -> KeyWeight {
        svc.app
            .keys
            .lock()
            .ok()
            .and_then(|mut keys| {
                keys.store(svc.kind)
                    .keys
                    .get(name)
                    .and_then(|v| v.last())
                    .map(|v| KeyWeight {
                        hsm: svc.kind == Kind::Mhsm || v.kty.ends_with("-HSM"),
                        rsa_bits: (family(&v.kty) == Some(KeyFamily::Rsa))
                            .then(|| key_size(v))
                            .flatten()
                            .and_then(|b| u32::try_from(b).ok()),
                    })
            })
            .unwrap_or_default()
    };
    match r {
        Route::Create(_) | Route::Import(_) => {
            // Weighed from the request; a body that does not parse is refused later anyway.
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let jwk = v.get("key");
            let kty = v
                .get("kty")
                .or_else(|| jwk.and_then(|k| k.get("kty")))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let hsm_flag = v
                .get("Hsm")
                .or_else(|| v.get("hsm"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let rsa_bits = (family(kty) == Some(KeyFamily::Rsa)).then(|| {
                let given = v.get("key_size").and_then(Value::as_u64).or_else(|| {
                    jwk.and_then(|k| k.get("n"))
                        .and_then(Value::as_str)
                        .and_then(|n| b64_lenient(n).ok())
                        .map(|n| n.len() as u64 * 8)
                });
                u32::try_from(given.unwrap_or(2048)).unwrap_or(u32::MAX)
            });
            let weight = KeyWeight {
                hsm: svc.kind == Kind::Mhsm || kty.ends_with("-HSM") || hsm_flag,
                rsa_bits,
            };
            (KeyOp::Create, weight)
        }
        Route::Rotate(name) => (KeyOp::Create, stored(name)),
        Route::Release(name, _) => (KeyOp::Release, stored(name)),
        Route::Get(name, _) | Route::Update(name, _) | Route::Versions(name) => {
            (KeyOp::Other, stored(name))
        }
        Route::List => (KeyOp::Other, KeyWeight::default()),
    }
}

/// Modulus bits (RSA) or key bits (oct) of a stored version; `None` for EC (the curve says it).
fn key_size(v: &KeyVersion) -> Option<u64> {
    let der = material(v);
    match family(&v.kty)? {
        KeyFamily::Rsa => {
            let info = rsa::pkcs8::PrivateKeyInfo::try_from(der.as_slice()).ok()?;
            let key =
                <rsa::pkcs1::RsaPrivateKey as rsa::pkcs1::der::Decode>::from_der(info.private_key)
                    .ok()?;
            Some(key.modulus.as_bytes().len() as u64 * 8)
        }
        KeyFamily::Oct => Some(der.len() as u64 * 8),
        KeyFamily::Ec => None,
    }
}

/// `POST /keys/{name}/rotate`: a new version of the current one's type, size and curve, with its
/// key_ops, exportable flag, release policy and tags (Key Vault's RotateKey; no rotation
/// policy, so no expiry is set). Answers the new KeyBundle.
fn rotate(svc: &Service, name: &str) -> Result<Response, KvError> {
    let current = {
        let mut keys = svc.app.keys.lock().map_err(|_| {
            kv_err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "state lock",
            )
        })?;
        keys.store(svc.kind)
            .keys
            .get(name)
            .and_then(|v| v.last())
            .cloned()
            .ok_or_else(|| not_found(name, None))?
    };
    let fam = family(&current.kty)
        .ok_or_else(|| bad(format!("kty {} cannot be rotated", current.kty)))?;
    let (new_material, crv) = generate_material(fam, key_size(&current), current.crv.as_deref())?;
    let params = CommonParams {
        exportable: Some(current.exportable),
        enabled: true,
        nbf: None,
        exp: None,
        tags: current.tags.clone(),
        key_ops: Some(current.key_ops.clone()),
        policy: current.release_policy.clone(),
    };
    let response = add_version(
        svc,
        name,
        current.kty.clone(),
        crv,
        new_material,
        params,
        true,
    )?;
    svc.app.admin.log(
        svc.kind.name(),
        "key-rotated",
        json!({"key": name, "previous_version": current.version}),
    );
    Ok(response)
}

fn not_found(name: &str, version: Option<&str>) -> KvError {
    let id = match version {
        Some(v) => format!("{name}/{v}"),
        None => name.to_string(),
    };
    kv_err(
        StatusCode::NOT_FOUND,
        "KeyNotFound",
        format!("A key with (name/id) {id} was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command."),
    )
}

fn find<'a>(versions: &'a mut [KeyVersion], version: Option<&str>) -> Option<&'a mut KeyVersion> {
    match version {
        None => versions.last_mut(),
        Some(v) => versions
            .iter_mut()
            .find(|k| k.version.eq_ignore_ascii_case(v)),
    }
}

pub fn bundle(base: &str, name: &str, kind: Kind, v: &KeyVersion) -> Value {
    let mut key = Map::new();
    key.insert(
        "kid".into(),
        json!(format!("{base}/keys/{name}/{}", v.version)),
    );
    key.insert("kty".into(), json!(v.kty));
    key.insert("key_ops".into(), json!(v.key_ops));
    key.extend(public_jwk(v));
    let mut out = Map::new();
    out.insert("key".into(), Value::Object(key));
    out.insert("attributes".into(), attributes_json(v));
    if let Some(tags) = &v.tags {
        out.insert("tags".into(), Value::Object(tags.clone()));
    }
    if let Some(p) = &v.release_policy {
        out.insert("release_policy".into(), policy_json(p, kind, false));
    }
    Value::Object(out)
}

fn attributes_json(v: &KeyVersion) -> Value {
    let mut a = json!({
        "enabled": v.enabled,
        "created": v.created,
        "updated": v.updated,
        "recoveryLevel": "Recoverable+Purgeable",
        "recoverableDays": 90,
        "exportable": v.exportable,
    });
    if let Some(nbf) = v.nbf {
        a["nbf"] = json!(nbf);
    }
    if let Some(exp) = v.exp {
        a["exp"] = json!(exp);
    }
    a
}

/// The policy as each service re-serialises it (observed in recordings): the vault writes
/// `version` first and each member in grammar order, the managed HSM sorts members.
fn policy_text(p: &StoredPolicy, kind: Kind) -> String {
    match (kind, policy::parse(&p.policy)) {
        (Kind::Vault, Ok(parsed)) => parsed.to_vault_text(),
        _ => p.policy.to_string(),
    }
}

/// `release_policy` of a KeyBundle (`in_release` false) or of the signed release payload, where
/// the vault sends only `data` and the managed HSM `contentType` and `data`.
fn policy_json(p: &StoredPolicy, kind: Kind, in_release: bool) -> Value {
    let mut m = Map::new();
    if !in_release || kind == Kind::Mhsm {
        m.insert("contentType".into(), json!(p.content_type));
    }
    m.insert(
        "data".into(),
        json!(b64url(policy_text(p, kind).as_bytes())),
    );
    if !in_release || p.immutable {
        m.insert("immutable".into(), json!(p.immutable));
    }
    Value::Object(m)
}

fn parse_release_policy(value: &Value) -> Result<StoredPolicy, KvError> {
    let data = value
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("release_policy.data is required"))?;
    let bytes = b64_lenient(data).map_err(|e| bad(format!("release_policy.data: {e}")))?;
    let doc: Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("release_policy.data is not JSON: {e}")))?;
    let parsed =
        policy::parse(&doc).map_err(|e| bad(format!("Invalid key release policy: {e}")))?;
    Ok(StoredPolicy {
        content_type: value
            .get("contentType")
            .and_then(Value::as_str)
            .unwrap_or("application/json; charset=utf-8")
            .to_string(),
        policy: parsed.to_json(),
        immutable: value
            .get("immutable")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

struct CommonParams {
    exportable: Option<bool>,
    enabled: bool,
    nbf: Option<u64>,
    exp: Option<u64>,
    tags: Option<Map<String, Value>>,
    key_ops: Option<Vec<String>>,
    policy: Option<StoredPolicy>,
}

fn common_params(body: &Value) -> Result<CommonParams, KvError> {
    let attrs = body.get("attributes").cloned().unwrap_or(json!({}));
    let key_ops = match body.get("key_ops") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => Some(
            list.iter()
                .map(|o| {
                    o.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad("key_ops must be strings"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(bad("key_ops must be an array")),
    };
    Ok(CommonParams {
        exportable: attrs.get("exportable").and_then(Value::as_bool),
        enabled: attrs
            .get("enabled")
            .and_then(Value::as_bool)
            .unwrap_or(true),
        nbf: attrs.get("nbf").and_then(Value::as_u64),
        exp: attrs.get("exp").and_then(Value::as_u64),
        tags: body.get("tags").and_then(Value::as_object).cloned(),
        key_ops,
        policy: match body.get("release_policy") {
            None | Some(Value::Null) => None,
            Some(p) => Some(parse_release_policy(p)?),
        },
    })
}

/// Stores a new version after the SKR rules on exportable / release_policy (AKV.SKR.*).
fn add_version(
    svc: &Service,
    name: &str,
    kty: String,
    crv: Option<String>,
    material: Vec<u8>,
    params: CommonParams,
    skr_api: bool,
) -> Result<Response, KvError> {
    let exportable = params.exportable.unwrap_or(false);
    if params.exportable.is_some() && !skr_api {
        return Err(bad("AKV.SKR.1001: The exportable attribute is only supported with premium vaults and API version >= '7.3-preview'."));
    }
    if exportable && svc.kind == Kind::Vault && !kty.ends_with("-HSM") {
        return Err(bad(
            "AKV.SKR.1006: Exportable keys must be HSM-protected (RSA-HSM, EC-HSM or oct-HSM).",
        ));
    }
    if params.policy.is_some() && !exportable {
        return Err(bad(
            "AKV.SKR.1005: Non-exportable keys must not have release policy.",
        ));
    }
    let fam = family(&kty).ok_or_else(|| bad(format!("kty {kty} is not supported")))?;
    let now = now_secs();
    let mut keys = svc.app.keys.lock().map_err(|_| {
        kv_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "state lock",
        )
    })?;
    let previous_policy = keys
        .store(svc.kind)
        .keys
        .get(name)
        .and_then(|v| v.last())
        .filter(|v| v.exportable)
        .and_then(|v| v.release_policy.clone());
    // Later versions inherit the key's policy; the first version of an exportable key needs one.
    let policy = params
        .policy
        .or(if exportable { previous_policy } else { None });
    if exportable && policy.is_none() {
        return Err(bad(
            "AKV.SKR.1004: Exportable keys must have release policy.",
        ));
    }
    let version = KeyVersion {
        version: random_hex(16),
        kty,
        crv,
        material: b64std(&material),
        key_ops: params.key_ops.unwrap_or_else(|| default_ops(fam)),
        enabled: params.enabled,
        created: now,
        updated: now,
        nbf: params.nbf,
        exp: params.exp,
        exportable,
        tags: params.tags,
        release_policy: policy,
    };
    let body = bundle(svc.base_url(), name, svc.kind, &version);
    keys.store(svc.kind)
        .keys
        .entry(name.to_string())
        .or_default()
        .push(version.clone());
    svc.app
        .persist_keys(&keys)
        .map_err(|e| kv_err(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e))?;
    drop(keys);
    svc.app.admin.log(
        svc.kind.name(),
        "key-version-created",
        json!({"key": name, "version": version.version, "kty": version.kty, "exportable": exportable}),
    );
    Ok((StatusCode::OK, Json(body)).into_response())
}

fn normalise_kty(kind: Kind, kty: &str) -> Result<String, KvError> {
    let fam = family(kty).ok_or_else(|| {
        bad(format!(
            "The kty {kty:?} is not valid; use RSA-HSM, EC-HSM or oct-HSM"
        ))
    })?;
    match (kind, fam) {
        (Kind::Vault, KeyFamily::Oct) => Err(bad(
            "oct-HSM keys are supported by Managed HSM only (skr-emulator vault)",
        )),
        // Every Managed HSM key is HSM-protected.
        (Kind::Mhsm, _) => Ok(match fam {
            KeyFamily::Rsa => "RSA-HSM",
            KeyFamily::Ec => "EC-HSM",
            KeyFamily::Oct => "oct-HSM",
        }
        .to_string()),
        (Kind::Vault, _) => Ok(kty.to_string()),
    }
}

pub fn create(svc: &Service, name: &str, body: &Value, skr_api: bool) -> Result<Response, KvError> {
    if !valid_name(name) {
        return Err(bad(format!(
            "The key name {name:?} is invalid: use 1-127 letters, digits and dashes"
        )));
    }
    let kty = body
        .get("kty")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("kty is required"))?;
    let kty = normalise_kty(svc.kind, kty)?;
    let fam = family(&kty).ok_or_else(|| bad("kty"))?;
    if let Some(pe) = body.get("public_exponent").and_then(Value::as_u64) {
        if pe != 65537 {
            return Err(bad(format!(
                "public_exponent {pe} is not supported; only 65537"
            )));
        }
    }
    let (material, crv) = generate_material(
        fam,
        body.get("key_size").and_then(Value::as_u64),
        body.get("crv").and_then(Value::as_str),
    )?;
    add_version(svc, name, kty, crv, material, common_params(body)?, skr_api)
}

fn jwk_bytes(jwk: &Value, member: &str) -> Result<Vec<u8>, KvError> {
    let text = jwk
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("JSON Web Key: {member} property is missing")))?;
    b64_lenient(text).map_err(|e| bad(format!("JSON Web Key: {member}: {e}")))
}

pub fn import(svc: &Service, name: &str, body: &Value, skr_api: bool) -> Result<Response, KvError> {
    if !valid_name(name) {
        return Err(bad(format!(
            "The key name {name:?} is invalid: use 1-127 letters, digits and dashes"
        )));
    }
    let jwk = body.get("key").ok_or_else(|| bad("key is required"))?;
    let given = jwk
        .get("kty")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("JSON Web Key: kty is required"))?;
    let hsm = body
        .get("Hsm")
        .or_else(|| body.get("hsm"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let fam = family(given)
        .ok_or_else(|| bad(format!("JSON Web Key: kty {given:?} is not supported")))?;
    let kty = if hsm && !given.ends_with("-HSM") {
        format!("{given}-HSM")
    } else {
        given.to_string()
    };
    let kty = normalise_kty(svc.kind, &kty)?;
    let (material, crv) = match fam {
        KeyFamily::Rsa => {
            let n = BigUint::from_bytes_be(&jwk_bytes(jwk, "n")?);
            let e = BigUint::from_bytes_be(&jwk_bytes(jwk, "e")?);
            let d = BigUint::from_bytes_be(&jwk_bytes(jwk, "d")?);
            let p = BigUint::from_bytes_be(&jwk_bytes(jwk, "p")?);
            let q = BigUint::from_bytes_be(&jwk_bytes(jwk, "q")?);
            let key = rsa::RsaPrivateKey::from_components(n, e, d, vec![p, q])
                .map_err(|e| bad(format!("JSON Web Key: not a valid RSA key ({e})")))?;
            key.validate()
                .map_err(|e| bad(format!("JSON Web Key: not a valid RSA key ({e})")))?;
            (
                key.to_pkcs8_der()
                    .map_err(|e| bad(e.to_string()))?
                    .as_bytes()
                    .to_vec(),
                None,
            )
        }
        KeyFamily::Ec => {
            let crv = jwk
                .get("crv")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("JSON Web Key: crv is required"))?;
            let d = jwk_bytes(jwk, "d")?;
            let der = match crv {
                "P-256" => p256::SecretKey::from_slice(&d)
                    .map_err(|_| bad("JSON Web Key: bad d"))?
                    .to_pkcs8_der(),
                "P-384" => p384::SecretKey::from_slice(&d)
                    .map_err(|_| bad("JSON Web Key: bad d"))?
                    .to_pkcs8_der(),
                "P-521" => p521::SecretKey::from_slice(&d)
                    .map_err(|_| bad("JSON Web Key: bad d"))?
                    .to_pkcs8_der(),
                other => return Err(bad(format!("JSON Web Key: curve {other} is not supported"))),
            }
            .map_err(|e| bad(e.to_string()))?;
            (der.as_bytes().to_vec(), Some(crv.to_string()))
        }
        KeyFamily::Oct => {
            let k = jwk_bytes(jwk, "k")?;
            if k.len() > 64 {
                return Err(bad(
                    "JSON Web Key: k property of oct key is too large, maximum size is 64",
                ));
            }
            if ![16, 24, 32].contains(&k.len()) {
                return Err(bad(format!(
                    "JSON Web Key: oct key of {} bytes is not supported (16, 24 or 32)",
                    k.len()
                )));
            }
            (k, None)
        }
    };
    let mut params = common_params(body)?;
    if params.key_ops.is_none() {
        params.key_ops = jwk.get("key_ops").and_then(Value::as_array).map(|l| {
            l.iter()
                .filter_map(|o| o.as_str().map(String::from))
                .collect()
        });
    }
    add_version(svc, name, kty, crv, material, params, skr_api)
}

/// `GET /keys` (current version of each key) and `GET /keys/{name}/versions`: KeyItems, in
/// one page (`nextLink` null).
fn list(svc: &Service, name: Option<&str>) -> Result<Response, KvError> {
    let mut keys = svc.app.keys.lock().map_err(|_| {
        kv_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "state lock",
        )
    })?;
    let store = &keys.store(svc.kind).keys;
    let item = |key_name: &str, v: &KeyVersion, versioned: bool| {
        let kid = if versioned {
            format!("{}/keys/{key_name}/{}", svc.base_url(), v.version)
        } else {
            format!("{}/keys/{key_name}", svc.base_url())
        };
        let mut out = json!({"kid": kid, "attributes": attributes_json(v)});
        if let Some(tags) = &v.tags {
            out["tags"] = Value::Object(tags.clone());
        }
        out
    };
    let value: Vec<Value> = match name {
        None => store
            .iter()
            .filter_map(|(n, versions)| versions.last().map(|v| item(n, v, false)))
            .collect(),
        Some(n) => store
            .get(n)
            .ok_or_else(|| not_found(n, None))?
            .iter()
            .map(|v| item(n, v, true))
            .collect(),
    };
    Ok(Json(json!({"value": value, "nextLink": null})).into_response())
}

fn get(svc: &Service, name: &str, version: Option<&str>) -> Result<Response, KvError> {
    let mut keys = svc.app.keys.lock().map_err(|_| {
        kv_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "state lock",
        )
    })?;
    let versions = keys
        .store(svc.kind)
        .keys
        .get_mut(name)
        .ok_or_else(|| not_found(name, version))?;
    let v = find(versions, version).ok_or_else(|| not_found(name, version))?;
    Ok(Json(bundle(svc.base_url(), name, svc.kind, v)).into_response())
}

fn update(
    svc: &Service,
    name: &str,
    version: Option<&str>,
    body: &Value,
) -> Result<Response, KvError> {
    let params = common_params(body)?;
    let mut keys = svc.app.keys.lock().map_err(|_| {
        kv_err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "state lock",
        )
    })?;
    let versions = keys
        .store(svc.kind)
        .keys
        .get_mut(name)
        .ok_or_else(|| not_found(name, version))?;
    let v = find(versions, version).ok_or_else(|| not_found(name, version))?;
    if let Some(exp) = params.exportable {
        if exp != v.exportable {
            return Err(bad(
                "AKV.SKR.1003: The exportable attribute of an existing key cannot be changed.",
            ));
        }
    }
    if let Some(policy) = params.policy {
        if !v.exportable {
            return Err(bad(
                "AKV.SKR.1005: Non-exportable keys must not have release policy.",
            ));
        }
        if v.release_policy
            .as_ref()
            .map(|p| p.immutable)
            .unwrap_or(false)
        {
            return Err(bad(
                "AKV.SKR.1020: Immutable Key Release Policy cannot be modified.",
            ));
        }
        v.release_policy = Some(policy);
    }
    if let Some(attrs) = body.get("attributes") {
        if let Some(enabled) = attrs.get("enabled").and_then(Value::as_bool) {
            v.enabled = enabled;
        }
        if attrs.get("nbf").is_some() {
            v.nbf = params.nbf;
        }
        if attrs.get("exp").is_some() {
            v.exp = params.exp;
        }
    }
    if let Some(ops) = params.key_ops {
        v.key_ops = ops;
    }
    if let Some(tags) = params.tags {
        v.tags = Some(tags);
    }
    v.updated = now_secs();
    let out = bundle(svc.base_url(), name, svc.kind, v);
    let version_id = v.version.clone();
    svc.app
        .persist_keys(&keys)
        .map_err(|e| kv_err(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e))?;
    drop(keys);
    svc.app.admin.log(
        svc.kind.name(),
        "key-updated",
        json!({"key": name, "version": version_id}),
    );
    Ok(Json(out).into_response())
}

fn deny(
    svc: &Service,
    name: &str,
    status: StatusCode,
    code: &'static str,
    message: String,
) -> KvError {
    svc.app
        .admin
        .count(|c| *c.release_denied.entry(name.to_string()).or_default() += 1);
    svc.app.admin.log(
        svc.kind.name(),
        "release-denied",
        json!({"key": name, "reason": message}),
    );
    kv_err(status, code, message)
}

async fn release(
    svc: &Service,
    name: &str,
    version: Option<&str>,
    body: &Value,
    api: &str,
) -> Result<Response, KvError> {
    let fault = svc.app.admin.take_fault("akv-release");
    if let Some(f) = &fault {
        if let Some(resp) = generic_fault_response(f).await {
            svc.app
                .admin
                .log(svc.kind.name(), "fault", json!({"fault": f}));
            return Ok(resp);
        }
    }
    let target = body
        .get("target")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("target is required: the attestation token of the release target"))?;
    let enc = Enc::parse(body.get("enc").and_then(Value::as_str)).map_err(bad)?;
    let nonce = body.get("nonce").and_then(Value::as_str).map(String::from);

    let key = {
        let mut keys = svc.app.keys.lock().map_err(|_| {
            kv_err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "state lock",
            )
        })?;
        let versions = keys
            .store(svc.kind)
            .keys
            .get_mut(name)
            .ok_or_else(|| not_found(name, version))?;
        find(versions, version)
            .ok_or_else(|| not_found(name, version))?
            .clone()
    };
    if !key.enabled {
        return Err(deny(
            svc,
            name,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation release is not allowed on a disabled key.".into(),
        ));
    }
    let now = now_secs();
    if key.exp.is_some_and(|exp| exp < now) || key.nbf.is_some_and(|nbf| nbf > now) {
        return Err(deny(
            svc,
            name,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation release is not allowed on a key outside its nbf / exp validity.".into(),
        ));
    }
    let Some(stored) = key.release_policy.clone().filter(|_| key.exportable) else {
        return Err(deny(
            svc,
            name,
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Operation release is not allowed on a non-exportable key.".into(),
        ));
    };
    let parsed = policy::parse(&stored.policy)
        .map_err(|e| kv_err(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e))?;
    // Only issuers the policy names are ever contacted: the token's (still unverified) `iss`
    // must be one of the policy's authorities before its metadata and keys are fetched.
    let claimed_issuer = match crate::jwt::decode(target) {
        Ok(j) => j
            .payload
            .get("iss")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        Err(m) => {
            return Err(bad(format!(
                "The target is not a valid attestation token: {m}"
            )))
        }
    };
    if !parsed.authorities.iter().any(|a| {
        policy::normalise_authority(&a.authority) == policy::normalise_authority(&claimed_issuer)
    }) {
        return Err(deny(
            svc,
            name,
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "Target environment attestation statement cannot be verified against the key's release policy: issuer {claimed_issuer:?} is not an authority of the policy"
            ),
        ));
    }
    // The exact wording of AKV's denial messages is not public (skr-protocol.md §5.2); these
    // keep the service's 403 and add the reason, which is what a developer needs.
    let claims = match target::verify_attestation_token(&svc.app, target).await {
        Ok(c) => c,
        Err(TargetError::Malformed(m)) => {
            return Err(bad(format!(
                "The target is not a valid attestation token: {m}"
            )))
        }
        Err(TargetError::Untrusted(m)) => {
            return Err(deny(
                svc,
                name,
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!("Target environment attestation statement cannot be verified: {m}"),
            ))
        }
    };
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Err(reason) = parsed.evaluate(&issuer, &claims) {
        return Err(deny(
            svc,
            name,
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("Target environment attestation statement cannot be verified against the key's release policy: {reason}"),
        ));
    }
    let jwk = pick_wrapping_jwk(&claims).ok_or_else(|| {
        bad("The attestation token has no RSA key for encryption in x-ms-runtime.keys (key_ops encrypt or use enc)")
    })?;
    let wrap_kid = jwk
        .get("kid")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let wrong_key = matches!(fault, Some(ref f) if f.kind == FaultKind::WrongWrapKey);
    let wrapping_key = if wrong_key {
        rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)
            .map_err(|e| {
                kv_err(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    e.to_string(),
                )
            })?
            .to_public_key()
    } else {
        rsa_from_jwk(jwk).map_err(bad)?
    };
    let ciphertext = wrap(&wrapping_key, enc, &material(&key)).map_err(bad)?;
    // Member order as recorded: the vault writes schema_version, header, ciphertext; the
    // managed HSM sorts members (what serde_json's map does).
    let key_hsm = match svc.kind {
        Kind::Vault => format!(
            "{{\"schema_version\":\"1.0\",\"header\":{{\"kid\":{},\"alg\":\"dir\",\"enc\":\"{}\"}},\"ciphertext\":\"{}\"}}",
            json!(wrap_kid),
            enc.name(),
            b64url(&ciphertext)
        ),
        Kind::Mhsm => json!({
            "schema_version": "1.0",
            "header": {"kid": wrap_kid, "alg": "dir", "enc": enc.name()},
            "ciphertext": b64url(&ciphertext),
        })
        .to_string(),
    };
    let mut released_key = Map::new();
    released_key.insert(
        "kid".into(),
        json!(format!("{}/keys/{name}/{}", svc.base_url(), key.version)),
    );
    // The managed HSM names RSA / EC keys without "-HSM" in release payloads (recorded).
    let released_kty = match svc.kind {
        Kind::Mhsm => key.kty.trim_end_matches("-HSM").to_string(),
        Kind::Vault => key.kty.clone(),
    };
    let released_kty = if released_kty == "oct" {
        key.kty.clone()
    } else {
        released_kty
    };
    released_key.insert("kty".into(), json!(released_kty));
    released_key.insert("key_ops".into(), json!(key.key_ops));
    released_key.extend(public_jwk(&key));
    released_key.insert("key_hsm".into(), json!(b64url(key_hsm.as_bytes())));
    let mut response_key = Map::new();
    response_key.insert("key".into(), Value::Object(released_key));
    response_key.insert("attributes".into(), attributes_json(&key));
    if let Some(tags) = &key.tags {
        response_key.insert("tags".into(), Value::Object(tags.clone()));
    }
    // The vault omits contentType in the signed payload, the managed HSM includes it.
    response_key.insert(
        "release_policy".into(),
        policy_json(&stored, svc.kind, true),
    );
    let requested_kid = match version {
        Some(v) => format!("{}/keys/{name}/{v}", svc.base_url()),
        None => format!("{}/keys/{name}", svc.base_url()),
    };
    let mut request = json!({"api-version": api, "enc": enc.name(), "kid": requested_kid});
    if let Some(n) = &nonce {
        request["nonce"] = json!(n);
    }
    let payload = json!({"request": request, "response": {"key": Value::Object(response_key)}});
    let mut jws = crate::jwt::sign_rs256(
        &jws_header(&svc.app, svc.kind),
        &payload,
        &svc.app.pki.jws_key,
    );
    let truncated = matches!(fault, Some(ref f) if f.kind == FaultKind::TruncatedJws);
    if truncated {
        let keep = jws.len() - 12;
        jws.truncate(keep);
    }
    svc.app
        .admin
        .count(|c| *c.releases.entry(name.to_string()).or_default() += 1);
    svc.app.admin.log(
        svc.kind.name(),
        "released",
        json!({"key": name, "version": key.version, "enc": enc.name(), "wrapping_kid": wrap_kid, "issuer": issuer,
               "fault": fault.as_ref().map(|f| f.kind)}),
    );
    Ok(Json(json!({ "value": jws })).into_response())
}

/// Vault: kid = upper-case hex SHA-1 thumbprint, x5t, x5t#S256, typ; mHSM: kid = x5t#S256.
fn jws_header(app: &App, kind: Kind) -> Value {
    let leaf = &app.pki.jws_chain[0];
    let s1 = Sha1::digest(leaf);
    let s256 = Sha256::digest(leaf);
    let x5c: Vec<String> = app.pki.jws_chain.iter().map(|d| b64std(d)).collect();
    match kind {
        Kind::Vault => json!({
            "alg": "RS256",
            "kid": hex::encode_upper(s1),
            "x5t": b64url(&s1),
            "x5t#S256": b64url(&s256),
            "typ": "JWT",
            "x5c": x5c,
        }),
        Kind::Mhsm => json!({
            "alg": "RS256",
            "kid": b64url(&s256),
            "x5t#S256": b64url(&s256),
            "x5c": x5c,
        }),
    }
}

pub enum TargetError {
    Malformed(String),
    Untrusted(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(
            matches!(route(&Method::POST, "/keys/a/create"), Some(Route::Create(n)) if n == "a")
        );
        assert!(
            matches!(route(&Method::POST, "/keys/a//release"), Some(Route::Release(n, None)) if n == "a")
        );
        assert!(
            matches!(route(&Method::POST, "/keys/a/release"), Some(Route::Release(n, None)) if n == "a")
        );
        assert!(
            matches!(route(&Method::POST, "/keys/a/v1/release"), Some(Route::Release(_, Some(v))) if v == "v1")
        );
        assert!(
            matches!(route(&Method::GET, "/keys/a/v1"), Some(Route::Get(_, Some(v))) if v == "v1")
        );
        assert!(matches!(
            route(&Method::PATCH, "/keys/a"),
            Some(Route::Update(_, None))
        ));
        assert!(
            matches!(route(&Method::POST, "/keys/a/rotate"), Some(Route::Rotate(n)) if n == "a")
        );
        assert!(route(&Method::GET, "/keys/a/rotate/x").is_none());
        assert!(route(&Method::DELETE, "/keys/a").is_none());
        assert!(matches!(route(&Method::GET, "/keys"), Some(Route::List)));
        assert!(
            matches!(route(&Method::GET, "/keys/a/versions"), Some(Route::Versions(n)) if n == "a")
        );
        assert!(route(&Method::GET, "/secrets/a").is_none());
    }

    #[test]
    fn api_versions() {
        assert!(api_supports_skr("7.3").unwrap());
        assert!(api_supports_skr("7.3-preview").unwrap());
        assert!(api_supports_skr("7.6").unwrap());
        assert!(api_supports_skr("2025-07-01").unwrap());
        assert!(!api_supports_skr("7.2").unwrap());
        assert!(api_supports_skr("seven").is_err());
    }

    #[test]
    fn wrapping_key_choice() {
        let claims = json!({"x-ms-runtime": {"keys": [
            {"kid": "sig", "kty": "RSA", "key_ops": ["verify"], "n": "AQ", "e": "AQAB"},
            {"kid": "ec", "kty": "EC", "key_ops": ["encrypt"]},
            {"kid": "enc", "kty": "RSA", "use": "enc", "n": "AQ", "e": "AQAB"},
            {"kid": "later", "kty": "RSA", "key_ops": ["encrypt"], "n": "AQ", "e": "AQAB"}
        ]}});
        assert_eq!(pick_wrapping_jwk(&claims).unwrap()["kid"], "enc");
        assert!(
            pick_wrapping_jwk(&json!({"x-ms-isolation-tee": {"x-ms-runtime": {"keys": []}}}))
                .is_none()
        );
    }
}
