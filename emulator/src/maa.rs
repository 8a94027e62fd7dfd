//! Microsoft Azure Attestation, SEV-SNP flavour: verifies real evidence (AMD chain to a trusted
//! ARK, VCEK extensions, report signature over the raw bytes, runtime-data binding) and issues
//! an RS256 token with the claims MAA derives (skr-protocol.md §8–§10).

use crate::admin::{generic_fault_response, FaultKind};
use crate::context::App;
use crate::pki::{self, vcek_extensions};
use crate::snp::{self, Generation, Report};
use crate::util::{b64_lenient, b64std, b64url, now_secs, random_hex};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use der::{Decode, Encode};
use rsa::pkcs1::DecodeRsaPublicKey;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256, Sha384};
use std::sync::Arc;
use std::time::SystemTime;
use x509_cert::Certificate;

pub(crate) mod guest;

/// Longest an attestation request may take to verify (it takes milliseconds).
const VERIFY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

/// MAA tokens live 8 hours (not configurable on the real service either).
pub const TOKEN_LIFETIME_SECS: u64 = 8 * 3600;

/// The attestation policy text the emulator's provider "runs"; only its hash is visible, as
/// `x-ms-policy-hash` = BASE64URL(SHA256(UTF8(BASE64URL(UTF8(policy))))).
pub const ATTESTATION_POLICY: &str =
    "version= 1.0;\nauthorizationrules\n{\n    => permit();\n};\nissuancerules\n{\n};\n";

pub fn policy_hash() -> String {
    b64url(&Sha256::digest(
        b64url(ATTESTATION_POLICY.as_bytes()).as_bytes(),
    ))
}

fn maa_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

const OID_RSASSA_PSS: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");

/// RSA-PSS SHA-384 (salt 48) signature of `subject` by `issuer`'s key, as AMD signs.
fn verify_pss_link(issuer: &Certificate, subject: &Certificate, what: &str) -> Result<(), String> {
    if subject.signature_algorithm.oid != OID_RSASSA_PSS {
        return Err(format!(
            "{what}: signature algorithm {} is not RSASSA-PSS",
            subject.signature_algorithm.oid
        ));
    }
    if subject.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(format!(
            "{what}: issuer name does not match the issuing certificate"
        ));
    }
    // The ARK / ASK key is often labelled with the PSS OID rather than rsaEncryption, so read
    // the PKCS#1 key directly.
    let key_bytes = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    let key = rsa::RsaPublicKey::from_pkcs1_der(key_bytes)
        .map_err(|e| format!("{what}: issuer key is not RSA ({e})"))?;
    let tbs = subject
        .tbs_certificate
        .to_der()
        .map_err(|e| format!("{what}: {e}"))?;
    let sig = subject.signature.raw_bytes();
    let digest = Sha384::digest(&tbs);
    key.verify(rsa::Pss::new_with_salt::<Sha384>(48), &digest, sig)
        .map_err(|_| format!("{what}: RSA-PSS SHA-384 signature does not verify"))
}

fn check_validity(cert: &Certificate, what: &str) -> Result<(), String> {
    let now = SystemTime::now();
    let v = &cert.tbs_certificate.validity;
    if now < v.not_before.to_system_time() || now > v.not_after.to_system_time() {
        return Err(format!(
            "{what} is outside its validity period ({} – {})",
            v.not_before, v.not_after
        ));
    }
    Ok(())
}

fn spki_der(cert: &Certificate) -> Vec<u8> {
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .unwrap_or_default()
}

/// Every CERTIFICATE block of `input`, decoded, in order. The blocks are read by
/// rustls-pki-types' PEM reader (one pass over the lines); x509-cert's own PEM reader is never
/// given request bytes: it panics on empty input and spins forever on a truncated block such
/// as `MIIB` between the BEGIN and END lines (issue 11).
pub fn load_pem_chain(input: &[u8]) -> Result<Vec<Certificate>, String> {
    use rustls_pki_types::pem::{Error as PemError, PemObject};
    use rustls_pki_types::CertificateDer;
    let mut certs = Vec::new();
    for block in CertificateDer::pem_slice_iter(input) {
        let n = certs.len() + 1;
        // Said in words: the crate's messages print labels and lines as byte arrays.
        let der = block.map_err(|e| match e {
            PemError::MissingSectionEnd { .. } => format!("PEM block {n} has no END line"),
            PemError::IllegalSectionStart { .. } => format!("PEM block {n}: malformed BEGIN line"),
            PemError::Base64Decode(_) => format!("PEM block {n} is not valid base64"),
            other => format!("PEM block {n}: {other}"),
        })?;
        let cert = Certificate::from_der(&der)
            .map_err(|e| format!("certificate {n} is not X.509 DER: {e}"))?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

/// AMD's real ARKs (Milan, Genoa, Turin; from the sev crate) plus the emulator's own.
pub fn trusted_arks(own_ark_der: &[u8]) -> Vec<(String, Certificate)> {
    let mut roots = Vec::new();
    for (name, pem) in [
        ("AMD ARK-Milan", sev::certs::snp::builtin::milan::ARK),
        ("AMD ARK-Genoa", sev::certs::snp::builtin::genoa::ARK),
        ("AMD ARK-Turin", sev::certs::snp::builtin::turin::ARK),
    ] {
        if let Some(cert) = load_pem_chain(pem).ok().and_then(|v| v.into_iter().next()) {
            roots.push((name.to_string(), cert));
        }
    }
    if let Ok(cert) = Certificate::from_der(own_ark_der) {
        roots.push(("skr-emulator simulated ARK".to_string(), cert));
    }
    roots
}

pub struct VerifiedEvidence {
    pub report: Vec<u8>,
    pub generation: Generation,
    pub root: String,
}

/// The full SEV-SNP evidence check MAA performs, on the raw report bytes.
pub fn verify_evidence(
    report: &[u8],
    chain_pem: &[u8],
    roots: &[(String, Certificate)],
) -> Result<VerifiedEvidence, String> {
    if report.len() != snp::REPORT_LEN {
        return Err(format!(
            "SnpReport is {} bytes, expected {}",
            report.len(),
            snp::REPORT_LEN
        ));
    }
    let view = Report(report);
    if view.version() < 1 || view.version() > 5 {
        return Err(format!("unsupported SNP report version {}", view.version()));
    }
    if view.signature_algo() != 1 {
        return Err(format!(
            "unsupported report signature algorithm {}",
            view.signature_algo()
        ));
    }
    let key_info = view.key_info();
    if key_info & 0b10 != 0 {
        return Err("report has MASK_CHIP_KEY set: it carries no signature".into());
    }
    if (key_info >> 2) & 0b111 != 0 {
        return Err(
            "report is not signed by a VCEK (VLEK-signed reports are not supported)".into(),
        );
    }
    let certs = load_pem_chain(chain_pem)
        .map_err(|e| format!("VcekCertChain is not a PEM certificate chain: {e}"))?;
    if certs.len() < 2 {
        return Err(format!(
            "VcekCertChain holds {} certificate(s); expected VCEK, ASK and ARK",
            certs.len()
        ));
    }
    let vcek = &certs[0];
    let ask = &certs[1];
    let ark = match certs.get(2) {
        Some(ark) => ark.clone(),
        None => roots
            .iter()
            .find(|(_, r)| r.tbs_certificate.subject == ask.tbs_certificate.issuer)
            .map(|(_, r)| r.clone())
            .ok_or("VcekCertChain has no ARK and the ASK's issuer is not a trusted root")?,
    };
    let ark_spki = spki_der(&ark);
    let root = roots
        .iter()
        .find(|(_, r)| spki_der(r) == ark_spki)
        .map(|(name, _)| name.clone())
        .ok_or("the ARK in VcekCertChain is not a trusted AMD root")?;
    verify_pss_link(&ark, &ark, "ARK self-signature")?;
    verify_pss_link(&ark, ask, "ASK signature by the ARK")?;
    verify_pss_link(ask, vcek, "VCEK signature by the ASK")?;
    check_validity(&ark, "ARK")?;
    check_validity(ask, "ASK")?;
    check_validity(vcek, "VCEK")?;

    let ext = vcek_extensions(vcek)?;
    let generation = view.generation(ext.product.as_deref());
    let hwid = ext.hwid.as_deref().ok_or("VCEK has no hwID extension")?;
    let chip = view.chip_id();
    let hw_match = match generation {
        Generation::Turin => hwid.len() >= 8 && hwid[..8] == chip[..8],
        _ => hwid == chip,
    };
    if !hw_match {
        return Err("VCEK hwID does not match the report's CHIP_ID".into());
    }
    let tcb = snp::decode_tcb(view.reported_tcb(), generation);
    let expected = [
        ("blSPL", pki::OID_AMD_BL_SPL, tcb.bootloader),
        ("teeSPL", pki::OID_AMD_TEE_SPL, tcb.tee),
        ("snpSPL", pki::OID_AMD_SNP_SPL, tcb.snp),
        ("ucodeSPL", pki::OID_AMD_UCODE_SPL, tcb.microcode),
    ];
    for (label, oid, want) in expected {
        match ext.spl(oid) {
            Some(have) if have == want => {}
            Some(have) => {
                return Err(format!(
                    "VCEK {label} {have} does not match REPORTED_TCB ({want})"
                ))
            }
            None => return Err(format!("VCEK has no {label} extension")),
        }
    }
    if let (Generation::Turin, Some(fmc)) = (generation, tcb.fmc) {
        if ext.spl(pki::OID_AMD_FMC_SPL) != Some(fmc) {
            return Err("VCEK fmcSPL does not match REPORTED_TCB".into());
        }
    }
    let vcek_key = p384::ecdsa::VerifyingKey::from_sec1_bytes(
        vcek.tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .map_err(|_| "VCEK public key is not a P-384 point")?;
    snp::verify_report_signature(report, &vcek_key)?;
    Ok(VerifiedEvidence {
        report: report.to_vec(),
        generation,
        root,
    })
}

/// The `x-ms-sevsnpvm-*` family, exactly as MAA derives it (SVNs from REPORTED_TCB).
pub fn sevsnp_claims(evidence: &VerifiedEvidence) -> Map<String, Value> {
    let r = Report(&evidence.report);
    let tcb = snp::decode_tcb(r.reported_tcb(), evidence.generation);
    let policy = r.policy();
    let mut c = Map::new();
    c.insert(
        "x-ms-sevsnpvm-authorkeydigest".into(),
        json!(hex::encode(r.author_key_digest())),
    );
    c.insert("x-ms-sevsnpvm-bootloader-svn".into(), json!(tcb.bootloader));
    c.insert(
        "x-ms-sevsnpvm-familyId".into(),
        json!(hex::encode(r.family_id())),
    );
    c.insert("x-ms-sevsnpvm-guestsvn".into(), json!(r.guest_svn()));
    c.insert(
        "x-ms-sevsnpvm-hostdata".into(),
        json!(hex::encode(r.host_data())),
    );
    c.insert(
        "x-ms-sevsnpvm-idkeydigest".into(),
        json!(hex::encode(r.id_key_digest())),
    );
    c.insert(
        "x-ms-sevsnpvm-imageId".into(),
        json!(hex::encode(r.image_id())),
    );
    c.insert(
        "x-ms-sevsnpvm-is-debuggable".into(),
        json!(policy & snp::POLICY_DEBUG != 0),
    );
    c.insert(
        "x-ms-sevsnpvm-launchmeasurement".into(),
        json!(hex::encode(r.measurement())),
    );
    c.insert("x-ms-sevsnpvm-microcode-svn".into(), json!(tcb.microcode));
    c.insert(
        "x-ms-sevsnpvm-migration-allowed".into(),
        json!(policy & snp::POLICY_MIGRATE_MA != 0),
    );
    c.insert(
        "x-ms-sevsnpvm-reportdata".into(),
        json!(hex::encode(r.report_data())),
    );
    c.insert(
        "x-ms-sevsnpvm-reportid".into(),
        json!(hex::encode(r.report_id())),
    );
    c.insert(
        "x-ms-sevsnpvm-smt-allowed".into(),
        json!(policy & snp::POLICY_SMT != 0),
    );
    c.insert("x-ms-sevsnpvm-snpfw-svn".into(), json!(tcb.snp));
    c.insert("x-ms-sevsnpvm-tee-svn".into(), json!(tcb.tee));
    c.insert("x-ms-sevsnpvm-vmpl".into(), json!(r.vmpl()));
    c
}

/// Emulator rule for `x-ms-compliance-status` (the real service decides by its own evaluation
/// of UVM endorsements and platform policy, which is not public): a guest launched with
/// HOST_DATA (ACI / confidential containers: the security-policy hash) is a compliant UVM, one
/// without (HCL-based CVM reports) a compliant CVM. Both published samples follow this rule.
pub fn compliance_status(report: &[u8]) -> &'static str {
    if Report(report).host_data().iter().any(|b| *b != 0) {
        "azure-compliant-uvm"
    } else {
        "azure-compliant-cvm"
    }
}

/// Recursively sorts object members: MAA re-serialises runtime data with sorted members.
pub fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(list) => Value::Array(list.into_iter().map(sorted).collect()),
        other => other,
    }
}

struct DataBlob {
    bytes: Vec<u8>,
    is_json: bool,
}

impl DataBlob {
    /// Parsed only after the binding check, so a tampered blob is reported as unbound.
    fn json(&self, what: &str) -> Result<Option<Value>, String> {
        if !self.is_json {
            return Ok(None);
        }
        serde_json::from_slice(&self.bytes)
            .map(Some)
            .map_err(|e| format!("{what}: dataType is JSON but data is not JSON ({e})"))
    }
}

fn parse_data(value: &Value, what: &str) -> Result<DataBlob, String> {
    let data = value
        .get("data")
        .and_then(Value::as_str)
        .ok_or(format!("{what}.data is missing"))?;
    let bytes = b64_lenient(data).map_err(|e| format!("{what}.data: {e}"))?;
    let data_type = value
        .get("dataType")
        .and_then(Value::as_str)
        .unwrap_or("Binary");
    let is_json = if data_type.eq_ignore_ascii_case("json") {
        true
    } else if data_type.eq_ignore_ascii_case("binary") {
        false
    } else {
        return Err(format!(
            "{what}.dataType {data_type:?} is neither Binary nor JSON"
        ));
    };
    Ok(DataBlob { bytes, is_json })
}

/// `Endorsements` (ACI / Kata): base64url JSON `{"Uvm": [base64url COSE_Sign1, …]}`. The
/// structure is checked; the UVM endorsement signature (Microsoft's) is not verified.
fn check_endorsements(value: Option<&Value>) -> Result<(), String> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let text = value
        .as_str()
        .ok_or("Endorsements must be a base64url string")?;
    let json: Value =
        serde_json::from_slice(&b64_lenient(text).map_err(|e| format!("Endorsements: {e}"))?)
            .map_err(|e| format!("Endorsements is not JSON: {e}"))?;
    let uvm = json
        .get("Uvm")
        .and_then(Value::as_array)
        .ok_or("Endorsements has no Uvm array")?;
    for (i, entry) in uvm.iter().enumerate() {
        let bytes = entry
            .as_str()
            .ok_or(format!("Endorsements.Uvm[{i}] is not a string"))
            .and_then(|t| b64_lenient(t).map_err(|e| format!("Endorsements.Uvm[{i}]: {e}")))?;
        // COSE_Sign1: CBOR tag 18 around a four-element array.
        if !bytes.starts_with(&[0xD2, 0x84]) {
            return Err(format!(
                "Endorsements.Uvm[{i}] is not a COSE_Sign1 document"
            ));
        }
    }
    Ok(())
}

#[derive(Debug)]
pub struct AttestOutcome {
    pub claims: Map<String, Value>,
    /// Name of the trusted ARK the evidence chains to.
    pub root: String,
}

/// Everything of `POST /attest/SevSnpVm` except HTTP: request JSON in, claims out.
pub fn attest_sevsnp(
    body: &Value,
    roots: &[(String, Certificate)],
) -> Result<AttestOutcome, String> {
    let report_field = body
        .get("report")
        .and_then(Value::as_str)
        .ok_or("request has no report")?;
    let evidence_bytes = b64_lenient(report_field).map_err(|e| format!("report: {e}"))?;
    let evidence_text =
        String::from_utf8(evidence_bytes).map_err(|_| "report is not UTF-8 JSON")?;
    let evidence: Value = serde_json::from_str(evidence_text.trim())
        .map_err(|e| format!("report is not JSON: {e}"))?;
    let snp_report = evidence
        .get("SnpReport")
        .and_then(Value::as_str)
        .ok_or("report has no SnpReport")?;
    let snp_report = b64_lenient(snp_report).map_err(|e| format!("SnpReport: {e}"))?;
    let chain = evidence
        .get("VcekCertChain")
        .and_then(Value::as_str)
        .ok_or("report has no VcekCertChain")?;
    let chain = b64_lenient(chain).map_err(|e| format!("VcekCertChain: {e}"))?;
    check_endorsements(evidence.get("Endorsements"))?;
    let verified = verify_evidence(&snp_report, &chain, roots)?;
    let view = Report(&verified.report);

    let mut claims = sevsnp_claims(&verified);
    if let Some(rt) = body.get("runtimeData").filter(|v| !v.is_null()) {
        let blob = parse_data(rt, "runtimeData")?;
        let digest = Sha256::digest(&blob.bytes);
        let rd = view.report_data();
        if rd[..32] != digest[..] || rd[32..].iter().any(|b| *b != 0) {
            return Err(format!(
                "runtimeData does not match the report: SHA-256(runtimeData) = {} but REPORT_DATA = {}",
                hex::encode(digest),
                hex::encode(rd)
            ));
        }
        if let Some(json) = blob.json("runtimeData")? {
            claims.insert("x-ms-runtime".into(), sorted(json));
        }
    }
    if let Some(it) = body.get("initTimeData").filter(|v| !v.is_null()) {
        let blob = parse_data(it, "initTimeData")?;
        let digest = Sha256::digest(&blob.bytes);
        if view.host_data() != &digest[..] {
            return Err(format!(
                "initTimeData does not match the report: SHA-256(initTimeData) = {} but HOST_DATA = {}",
                hex::encode(digest),
                hex::encode(view.host_data())
            ));
        }
        if let Some(json) = blob.json("initTimeData")? {
            claims.insert("x-ms-inittime".into(), sorted(json));
        }
    }
    match body.get("nonce") {
        Some(Value::String(n)) => {
            claims.insert("nonce".into(), json!(n));
        }
        // The sidecar sends a JSON number and MAA accepts it.
        Some(Value::Number(n)) => {
            claims.insert("nonce".into(), json!(n.to_string()));
        }
        _ => {}
    }
    claims.insert("x-ms-attestation-type".into(), json!("sevsnpvm"));
    claims.insert(
        "x-ms-compliance-status".into(),
        json!(compliance_status(&verified.report)),
    );
    claims.insert("x-ms-policy-hash".into(), json!(policy_hash()));
    claims.insert("x-ms-ver".into(), json!("1.0"));
    Ok(AttestOutcome {
        claims,
        root: verified.root,
    })
}

/// `kid` of MAA's signing key: standard padded base64 of 32 bytes, as in MAA's sample.
pub fn signing_kid(cert_der: &[u8]) -> String {
    b64std(&Sha256::digest(cert_der))
}

pub fn issue_token(app: &App, mut claims: Map<String, Value>, expired: bool) -> String {
    let now = now_secs();
    let (iat, exp) = if expired {
        (now - TOKEN_LIFETIME_SECS - 600, now - 600)
    } else {
        (now, now + TOKEN_LIFETIME_SECS)
    };
    claims.insert("iss".into(), json!(app.urls.maa));
    claims.insert("iat".into(), json!(iat));
    claims.insert("nbf".into(), json!(iat));
    claims.insert("exp".into(), json!(exp));
    claims.insert("jti".into(), json!(random_hex(32)));
    let header = json!({
        "alg": "RS256",
        "jku": format!("{}/certs", app.urls.maa),
        "kid": signing_kid(&app.pki.maa_cert_der),
        "typ": "JWT",
    });
    crate::jwt::sign_rs256(&header, &sorted(Value::Object(claims)), &app.pki.maa_key)
}

/// MAA paths are case-insensitive (`SevSnpVM` works like `SevSnpVm`), so route by hand.
pub async fn dispatch(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_ascii_lowercase();
    match (method, path.as_str()) {
        (Method::POST, "/attest/sevsnpvm") => attest(app, uri, body, Flavour::SevSnpVm).await,
        (Method::POST, "/attest/azureguest") => attest(app, uri, body, Flavour::AzureGuest).await,
        (Method::POST, p) if p.starts_with("/attest/") => maa_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            format!(
                "attestation type {} is not supported by skr-emulator (SevSnpVm, AzureGuest)",
                &uri.path()[8..]
            ),
        ),
        (Method::GET, "/certs") => certs(&app),
        (Method::GET, "/.well-known/openid-configuration") => openid_configuration(&app),
        _ => maa_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "The requested resource was not found",
        ),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    SevSnpVm,
    AzureGuest,
}

async fn attest(app: Arc<App>, uri: Uri, body: Bytes, flavour: Flavour) -> Response {
    let fault = app.admin.take_fault("maa-attest");
    if let Some(f) = &fault {
        if let Some(resp) = generic_fault_response(f).await {
            app.admin.log("maa", "fault", json!({"fault": f}));
            return resp;
        }
    }
    let expired = matches!(fault, Some(ref f) if f.kind == FaultKind::ExpiredToken);
    if !uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv.starts_with("api-version=") && kv.len() > 12)
    {
        return maa_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "The api-version query parameter is required",
        );
    }
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            app.admin.log(
                "maa",
                "attest-rejected",
                json!({"reason": format!("body is not JSON: {e}")}),
            );
            return maa_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameter",
                format!("The request body is not valid JSON: {e}"),
            );
        }
    };
    let worker_app = app.clone();
    let verified = crate::util::off_workers(VERIFY_DEADLINE, move || match flavour {
        Flavour::SevSnpVm => attest_sevsnp(&request, &worker_app.trusted_arks).map(|o| (o, None)),
        Flavour::AzureGuest => guest::attest_azure_guest(
            &request,
            &worker_app.trusted_arks,
            worker_app.vtpm_ca.get(),
            worker_app.tdx.get().map(|k| k.quoting_key.verifying_key()),
        )
        .map(|g| {
            (
                AttestOutcome {
                    claims: g.claims,
                    root: g.root,
                },
                Some(g.seal_to),
            )
        }),
    })
    .await;
    let verified = match verified {
        Ok(verified) => verified,
        Err(late) => {
            let reason = format!("evidence verification {late}");
            app.admin
                .log("maa", "attest-rejected", json!({ "reason": reason }));
            return maa_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                reason,
            );
        }
    };
    match verified {
        Ok((outcome, seal_to)) => {
            app.admin.count(|c| c.attestations += 1);
            let tee = outcome
                .claims
                .get("x-ms-isolation-tee")
                .unwrap_or(&Value::Null);
            let claim = |name: &str| outcome.claims.get(name).or_else(|| tee.get(name)).cloned();
            app.admin.log(
                "maa",
                "attested",
                json!({
                    "type": outcome.claims.get("x-ms-attestation-type"),
                    "launchmeasurement": claim("x-ms-sevsnpvm-launchmeasurement"),
                    "hostdata": claim("x-ms-sevsnpvm-hostdata"),
                    "compliance": claim("x-ms-compliance-status"),
                    "root": outcome.root,
                    "expired_token_fault": expired,
                }),
            );
            let token = issue_token(&app, outcome.claims, expired);
            let token = match seal_to {
                None => token,
                Some(key) => match guest::seal(&token, &key) {
                    Ok(sealed) => sealed,
                    Err(e) => {
                        return maa_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e)
                    }
                },
            };
            (StatusCode::OK, Json(json!({ "token": token }))).into_response()
        }
        Err(reason) => {
            app.admin
                .log("maa", "attest-rejected", json!({ "reason": reason }));
            let what = match flavour {
                Flavour::SevSnpVm => "SEV-SNP evidence",
                Flavour::AzureGuest => "AzureGuest evidence",
            };
            maa_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameter",
                format!("Invalid {what}: {reason}"),
            )
        }
    }
}

fn certs(app: &App) -> Response {
    Json(json!({
        "keys": [{
            "kid": signing_kid(&app.pki.maa_cert_der),
            "kty": "RSA",
            "x5c": [b64std(&app.pki.maa_cert_der)],
        }]
    }))
    .into_response()
}

fn openid_configuration(app: &App) -> Response {
    Json(json!({
        "issuer": app.urls.maa,
        "jwks_uri": format!("{}/certs", app.urls.maa),
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token", "none"],
        "revocation_endpoint": format!("{}/revocations/get?api-version=1.0", app.urls.maa),
        "claims_supported": [
            "iss", "iat", "nbf", "exp", "jti", "nonce", "x-ms-ver", "x-ms-attestation-type",
            "x-ms-policy-hash", "x-ms-runtime", "x-ms-inittime", "x-ms-compliance-status",
            "x-ms-sevsnpvm-authorkeydigest", "x-ms-sevsnpvm-bootloader-svn", "x-ms-sevsnpvm-familyId",
            "x-ms-sevsnpvm-guestsvn", "x-ms-sevsnpvm-hostdata", "x-ms-sevsnpvm-idkeydigest",
            "x-ms-sevsnpvm-imageId", "x-ms-sevsnpvm-is-debuggable", "x-ms-sevsnpvm-launchmeasurement",
            "x-ms-sevsnpvm-microcode-svn", "x-ms-sevsnpvm-migration-allowed", "x-ms-sevsnpvm-reportdata",
            "x-ms-sevsnpvm-reportid", "x-ms-sevsnpvm-smt-allowed", "x-ms-sevsnpvm-snpfw-svn",
            "x-ms-sevsnpvm-tee-svn", "x-ms-sevsnpvm-vmpl"
        ],
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn testdata(path: &str) -> Vec<u8> {
        let full = format!("{}/../testdata/{path}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"))
    }

    fn amd_roots() -> Vec<(String, Certificate)> {
        trusted_arks(&[])
    }

    fn aci_request(report: &[u8], padded: bool) -> Value {
        let chain = testdata("aci/uvm_host_amd_certificate.pem");
        let enc = |b: &[u8]| {
            if padded {
                base64::engine::general_purpose::URL_SAFE.encode(b)
            } else {
                b64url(b)
            }
        };
        let evidence = json!({"SnpReport": enc(report), "VcekCertChain": enc(&chain)}).to_string();
        json!({"report": enc(evidence.as_bytes())})
    }

    /// Microsoft's published request → token pair: every x-ms-sevsnpvm-* claim and
    /// x-ms-runtime must come out exactly as in the token MAA issued.
    #[test]
    fn spec_example_reproduces_every_sevsnp_claim() {
        let example: Value =
            serde_json::from_slice(&testdata("maa/attest-sevsnpvm-example.json")).unwrap();
        let request = &example["parameters"]["request"];
        let token = example["responses"]["200"]["body"]["token"]
            .as_str()
            .unwrap();
        let expected = crate::jwt::decode(token).unwrap().payload;
        let outcome = attest_sevsnp(request, &amd_roots()).expect("the spec example attests");
        assert_eq!(outcome.root, "AMD ARK-Milan");
        let mut compared = 0;
        for (name, value) in expected.as_object().unwrap() {
            if name.starts_with("x-ms-sevsnpvm-")
                || name == "x-ms-runtime"
                || name == "x-ms-attestation-type"
                || name == "x-ms-compliance-status"
            {
                assert_eq!(outcome.claims.get(name), Some(value), "claim {name}");
                compared += 1;
            }
        }
        assert_eq!(compared, 17 + 3);
        // And no SEV-SNP claim the token lacks.
        for name in outcome
            .claims
            .keys()
            .filter(|n| n.starts_with("x-ms-sevsnpvm-"))
        {
            assert!(expected.get(name).is_some(), "extra claim {name}");
        }
        // Member order of x-ms-runtime is MAA's (sorted), as in the token's JSON text.
        let runtime_text = outcome.claims["x-ms-runtime"].to_string();
        assert!(
            runtime_text.starts_with(
                "{\"keys\":[{\"e\":\"AQAB\",\"key_ops\":[\"encrypt\"],\"kid\":\"HCLTransferKey\""
            ),
            "{runtime_text}"
        );
        // The exact runtime-data bytes are what the report binds.
        let runtime = b64_lenient(request["runtimeData"]["data"].as_str().unwrap()).unwrap();
        assert_eq!(runtime, testdata("maa/sevsnpvm-runtimedata.json"));
    }

    #[test]
    fn spec_example_with_tampered_runtime_data_is_rejected() {
        let example: Value =
            serde_json::from_slice(&testdata("maa/attest-sevsnpvm-example.json")).unwrap();
        let mut request = example["parameters"]["request"].clone();
        let mut runtime = testdata("maa/sevsnpvm-runtimedata.json");
        runtime[10] ^= 0x20;
        request["runtimeData"]["data"] = json!(b64url(&runtime));
        let err = attest_sevsnp(&request, &amd_roots()).unwrap_err();
        assert!(err.contains("runtimeData does not match"), "{err}");
    }

    /// The real ACI report: its runtime data is not published (REPORT_DATA = SHA-256 of a JSON
    /// we do not have), so it is attested without runtimeData, which skips only the binding.
    #[test]
    fn aci_report_attests_with_the_documented_claims() {
        let report = testdata("aci/snp_report.bin");
        let outcome =
            attest_sevsnp(&aci_request(&report, true), &amd_roots()).expect("ACI report attests");
        let c = &outcome.claims;
        let policy = base64::engine::general_purpose::STANDARD
            .decode(
                String::from_utf8(testdata("aci/uvm_security_policy.base64"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
        assert_eq!(
            c["x-ms-sevsnpvm-hostdata"],
            json!(hex::encode(Sha256::digest(&policy)))
        );
        assert_eq!(
            c["x-ms-sevsnpvm-hostdata"],
            json!("cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c")
        );
        assert_eq!(c["x-ms-compliance-status"], json!("azure-compliant-uvm"));
        assert_eq!(c["x-ms-sevsnpvm-is-debuggable"], json!(false));
        assert_eq!(c["x-ms-sevsnpvm-migration-allowed"], json!(false));
        assert_eq!(c["x-ms-sevsnpvm-smt-allowed"], json!(true));
        assert_eq!(c["x-ms-sevsnpvm-vmpl"], json!(0));
        assert_eq!(c["x-ms-sevsnpvm-bootloader-svn"], json!(3));
        assert_eq!(c["x-ms-sevsnpvm-tee-svn"], json!(0));
        assert_eq!(c["x-ms-sevsnpvm-snpfw-svn"], json!(8));
        assert_eq!(c["x-ms-sevsnpvm-microcode-svn"], json!(115));
        assert_eq!(
            c["x-ms-sevsnpvm-reportdata"],
            json!("ee986ff2bd7e3f22e29f640918627816cf8e23b9d9c312767168eab68c861c710000000000000000000000000000000000000000000000000000000000000000")
        );
        assert!(c.get("x-ms-runtime").is_none());
        // Any runtime data offered for it fails the binding check.
        let mut with_runtime = aci_request(&report, false);
        with_runtime["runtimeData"] = json!({"data": b64url(b"{\"keys\":[]}"), "dataType": "JSON"});
        assert!(attest_sevsnp(&with_runtime, &amd_roots())
            .unwrap_err()
            .contains("REPORT_DATA"));
    }

    /// The sidecar's request: UVM reference info as `Endorsements`.
    #[test]
    fn aci_report_with_endorsements() {
        let report = testdata("aci/snp_report.bin");
        let chain = testdata("aci/uvm_host_amd_certificate.pem");
        let reference = base64::engine::general_purpose::STANDARD
            .decode(
                String::from_utf8(testdata("aci/security-context/reference-info-base64"))
                    .unwrap()
                    .trim(),
            )
            .unwrap();
        let endorsements =
            |uvm: &[u8]| b64url(json!({"Uvm": [b64url(uvm)]}).to_string().as_bytes());
        let request = |e: String| {
            let evidence = json!({"SnpReport": b64url(&report), "VcekCertChain": b64url(&chain), "Endorsements": e}).to_string();
            json!({"report": b64url(evidence.as_bytes())})
        };
        attest_sevsnp(&request(endorsements(&reference)), &amd_roots())
            .expect("with UVM endorsement");
        let err = attest_sevsnp(&request(endorsements(b"not cose")), &amd_roots()).unwrap_err();
        assert!(err.contains("COSE_Sign1"), "{err}");
        assert!(attest_sevsnp(&request(b64url(b"[]")), &amd_roots()).is_err());
    }

    #[test]
    fn aci_report_with_the_thim_chain_attests() {
        let thim: Value =
            serde_json::from_slice(&testdata("aci/uvm_host_amd_certificate.json")).unwrap();
        let chain = format!(
            "{}{}",
            thim["vcekCert"].as_str().unwrap(),
            thim["certificateChain"].as_str().unwrap()
        );
        let report = testdata("aci/snp_report.bin");
        let evidence =
            json!({"SnpReport": b64url(&report), "VcekCertChain": b64url(chain.as_bytes())})
                .to_string();
        attest_sevsnp(
            &json!({"report": b64url(evidence.as_bytes())}),
            &amd_roots(),
        )
        .unwrap();
    }

    /// The sidecar's security-context sample carries the VCEK of another chip: refused.
    #[test]
    fn aci_report_with_another_chips_vcek_is_rejected() {
        let text =
            String::from_utf8(testdata("aci/security-context/host-amd-cert-base64")).unwrap();
        let thim: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .unwrap(),
        )
        .unwrap();
        let chain = format!(
            "{}{}",
            thim["vcekCert"].as_str().unwrap(),
            thim["certificateChain"].as_str().unwrap()
        );
        let report = testdata("aci/snp_report.bin");
        let evidence =
            json!({"SnpReport": b64url(&report), "VcekCertChain": b64url(chain.as_bytes())})
                .to_string();
        let err = attest_sevsnp(
            &json!({"report": b64url(evidence.as_bytes())}),
            &amd_roots(),
        )
        .unwrap_err();
        assert!(err.contains("hwID does not match"), "{err}");
    }

    #[test]
    fn every_flipped_bit_class_is_rejected() {
        let report = testdata("aci/snp_report.bin");
        // Signed fields (measurement, host data, report data, TCB, chip id), the signature.
        for offset in [0x08, 0x50, 0x95, 0xC0, 0x180, 0x1A0, 0x29F, 0x2A0, 0x2E8] {
            let mut flipped = report.clone();
            flipped[offset] ^= 0x01;
            let err = attest_sevsnp(&aci_request(&flipped, false), &amd_roots()).unwrap_err();
            assert!(
                err.contains("signature")
                    || err.contains("REPORTED_TCB")
                    || err.contains("CHIP_ID"),
                "offset {offset:#x}: {err}"
            );
        }
    }

    #[test]
    fn untrusted_root_and_broken_requests_are_rejected() {
        let report = testdata("aci/snp_report.bin");
        let err = attest_sevsnp(&aci_request(&report, false), &[]).unwrap_err();
        assert!(err.contains("not a trusted AMD root"), "{err}");
        assert!(attest_sevsnp(&json!({}), &amd_roots())
            .unwrap_err()
            .contains("no report"));
        assert!(attest_sevsnp(&json!({"report": "!!"}), &amd_roots()).is_err());
        let short = json!({"SnpReport": b64url(&report[..100]), "VcekCertChain": ""}).to_string();
        assert!(
            attest_sevsnp(&json!({"report": b64url(short.as_bytes())}), &amd_roots())
                .unwrap_err()
                .contains("1184")
        );
    }

    fn chain_with_builtin_milan(vcek_der: &[u8]) -> String {
        let vcek = Certificate::from_der(vcek_der).unwrap();
        crate::util::pem_encode("CERTIFICATE", &vcek.to_der().unwrap())
            + std::str::from_utf8(sev::certs::snp::builtin::milan::ASK).unwrap()
            + std::str::from_utf8(sev::certs::snp::builtin::milan::ARK).unwrap()
    }

    fn request_for(report: &[u8], chain: &str) -> Value {
        let evidence =
            json!({"SnpReport": b64url(report), "VcekCertChain": b64url(chain.as_bytes())})
                .to_string();
        json!({"report": b64url(evidence.as_bytes())})
    }

    /// Two more real Milan reports (the sev crate's and Trustee's), each with its own VCEK.
    #[test]
    fn other_real_milan_reports_attest() {
        let hex_text = String::from_utf8(testdata("snp/milan-v2-report.hex")).unwrap();
        let report = hex::decode(hex_text.trim()).unwrap();
        let chain = chain_with_builtin_milan(&testdata("snp/milan-v2-vcek.der"));
        let outcome =
            attest_sevsnp(&request_for(&report, &chain), &amd_roots()).expect("sev crate report");
        assert_eq!(outcome.claims["x-ms-sevsnpvm-vmpl"], json!(0));
        assert_eq!(outcome.claims["x-ms-sevsnpvm-smt-allowed"], json!(true));
        assert_eq!(outcome.claims["x-ms-sevsnpvm-is-debuggable"], json!(false));

        let report = testdata("snp/trustee-milan-v2-report.bin");
        let chain = chain_with_builtin_milan(&testdata("snp/trustee-milan-v2-vcek.der"));
        attest_sevsnp(&request_for(&report, &chain), &amd_roots()).expect("Trustee report");
        // The same report with the other VCEK: hwID, TCB or signature must fail.
        let wrong = chain_with_builtin_milan(&testdata("snp/milan-v2-vcek.der"));
        assert!(attest_sevsnp(&request_for(&report, &wrong), &amd_roots()).is_err());
    }

    #[test]
    fn vlek_signed_reports_are_refused_explicitly() {
        let report = testdata("snp/trustee-milan-vlek-v3-report.bin");
        let chain = chain_with_builtin_milan(&testdata("snp/trustee-milan-vlek.der"));
        let err = attest_sevsnp(&request_for(&report, &chain), &amd_roots()).unwrap_err();
        assert!(err.contains("VLEK"), "{err}");
    }

    #[test]
    fn pem_chains_with_truncated_or_unterminated_blocks_are_refused() {
        let real = testdata("aci/uvm_host_amd_certificate.pem");
        assert_eq!(load_pem_chain(&real).unwrap().len(), 3);
        let truncated = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let cases: [(Vec<u8>, &str); 5] = [
            (truncated.to_vec(), "certificate 1 is not X.509 DER"),
            (
                [real.clone(), truncated.to_vec()].concat(),
                "certificate 4 is not X.509 DER",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\nMIIB\n".to_vec(),
                "PEM block 1 has no END line",
            ),
            (b"".to_vec(), "no PEM certificate found"),
            (vec![0xff, 0xfe], "no PEM certificate found"),
        ];
        for (input, needle) in cases {
            let e = load_pem_chain(&input).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn policy_hash_follows_maa_definition() {
        let expected = b64url(&Sha256::digest(
            b64url(ATTESTATION_POLICY.as_bytes()).as_bytes(),
        ));
        assert_eq!(policy_hash(), expected);
        assert_eq!(policy_hash().len(), 43);
    }
}
