//! MAA's `AzureGuest` attestation of a confidential VM through its vTPM (platform-evidence
//! §6.6, skr-protocol §8.3, §9.4): the AK certificate chains to the (simulated) Azure vTPM CA,
//! the AK is the certificate's key and the HCL report's `HCLAkPub`, the PCR quote is signed by
//! it over the PCR values sent, the SNP report verifies (VCEK chain to a trusted ARK) and binds
//! SHA-256(runtime claims), the transfer key is certified by the AK and is a TPM-resident
//! decryption key. The token carries the `azurevm` claims, the TEE's claims in
//! `x-ms-isolation-tee`, and the transfer key as `TpmEphemeralEncryptionKey`; the response is
//! sealed to that key (AES-GCM under an RSAES-PKCS1-v1_5-wrapped key, AAD `Transport Key`).
//!
//! Not done (and said so in docs/EMULATOR.md): the TCG event log is not replayed (the quoted
//! PCR values are checked against the quote, not against the log), and Windows boot-state
//! claims (`x-ms-azurevm-*debug*`, `-elam-enabled`, …) that MAA derives from the log are not
//! issued.

use super::{compliance_status, policy_hash, sevsnp_claims, sorted, verify_evidence};
use crate::util::{b64_lenient, b64std, b64url};
use crate::vtpm::{self, Attest, AttestedInfo, RsaPublicArea};
use der::{Decode, Encode};
use rsa::pkcs8::DecodePublicKey;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;

pub struct GuestOutcome {
    pub claims: Map<String, Value>,
    pub root: String,
    /// The response is sealed to this key (the guest's TPM transfer key).
    pub seal_to: rsa::RsaPublicKey,
}

fn b64_field(v: &Value, path: &str) -> Result<Vec<u8>, String> {
    let text = v
        .pointer(path)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("AttestationInfo{} is missing", path.replace('/', ".")))?;
    b64_lenient(text).map_err(|e| format!("AttestationInfo{}: {e}", path.replace('/', ".")))
}

fn b64_text(v: &Value, path: &str) -> Result<String, String> {
    String::from_utf8(b64_field(v, path)?)
        .map_err(|_| format!("AttestationInfo{} is not UTF-8", path.replace('/', ".")))
}

fn verify_rsassa_sha256(
    key: &rsa::RsaPublicKey,
    msg: &[u8],
    sig: &[u8],
    what: &str,
) -> Result<(), String> {
    use rsa::signature::Verifier;
    let sig = rsa::pkcs1v15::Signature::try_from(sig)
        .map_err(|_| format!("{what}: malformed signature"))?;
    rsa::pkcs1v15::VerifyingKey::<Sha256>::new(key.clone())
        .verify(msg, &sig)
        .map_err(|_| format!("{what}: signature does not verify with the AK"))
}

/// Everything of `POST /attest/AzureGuest` except HTTP.
pub fn attest_azure_guest(
    body: &Value,
    roots: &[(String, Certificate)],
    vtpm_ca: Option<&Certificate>,
) -> Result<GuestOutcome, String> {
    let outer = body
        .get("AttestationInfo")
        .or_else(|| body.get("attestationInfo"))
        .and_then(Value::as_str)
        .ok_or("request has no AttestationInfo")?;
    let info: Value =
        serde_json::from_slice(&b64_lenient(outer).map_err(|e| format!("AttestationInfo: {e}"))?)
            .map_err(|e| format!("AttestationInfo is not JSON: {e}"))?;
    let version = info
        .get("AttestationProtocolVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if version != "2.0" {
        return Err(format!(
            "AttestationProtocolVersion {version:?} is not supported (2.0)"
        ));
    }

    // The AK: its certificate chains to the vTPM CA and certifies exactly the AK sent.
    let ca = vtpm_ca.ok_or(
        "this emulator simulates no vTPM CA (start it with --platform cvm-snp for AzureGuest)",
    )?;
    let ak_cert_der = b64_field(&info, "/TpmInfo/AikCert")?;
    let ak_cert =
        Certificate::from_der(&ak_cert_der).map_err(|e| format!("AikCert is not X.509: {e}"))?;
    crate::pki::verify_p256_link(ca, &ak_cert)
        .map_err(|e| format!("AikCert is not issued by the Azure vTPM CA: {e}"))?;
    super::check_validity(&ak_cert, "AikCert")?;
    let cert_key = rsa::RsaPublicKey::from_public_key_der(
        &ak_cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| format!("AikCert key: {e}"))?,
    )
    .map_err(|e| format!("AikCert does not certify an RSA key: {e}"))?;
    let ak_pub = RsaPublicArea::parse(&b64_field(&info, "/TpmInfo/AikPub")?, "AikPub")?;
    let ak = ak_pub.rsa_key()?;
    if ak != cert_key {
        return Err("AikPub is not the key of AikCert".into());
    }
    if ak_pub.attributes & vtpm::ATTR_SIGN == 0 || ak_pub.attributes & vtpm::ATTR_FIXED_TPM == 0 {
        return Err("AikPub is not a fixedTPM signing key".into());
    }

    // The client payload (values base64 of the caller's strings).
    let mut client_payload = Map::new();
    if let Some(obj) = info.get("ClientPayload").and_then(Value::as_object) {
        for (k, v) in obj {
            let text = v
                .as_str()
                .and_then(|s| b64_lenient(s).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| format!("ClientPayload.{k} is not base64 of UTF-8 text"))?;
            client_payload.insert(k.clone(), json!(text));
        }
    }

    // The PCR quote: signed by the AK, over the PCR values sent, with no or our nonce.
    let quote_bytes = b64_field(&info, "/TpmInfo/PcrQuote")?;
    verify_rsassa_sha256(
        &ak,
        &quote_bytes,
        &b64_field(&info, "/TpmInfo/PcrSignature")?,
        "PcrQuote",
    )?;
    let quote = Attest::parse(&quote_bytes, "PcrQuote")?;
    let AttestedInfo::Quote { pcrs, digest } = quote.info else {
        return Err("PcrQuote is not a TPM2_Quote".into());
    };
    let nonce = client_payload
        .get("nonce")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !quote.extra_data.is_empty() && quote.extra_data != nonce.as_bytes() {
        return Err("PcrQuote qualifying data is neither empty nor the ClientPayload nonce".into());
    }
    let pcr_set: Vec<u32> = info
        .pointer("/TpmInfo/PcrSet")
        .and_then(Value::as_array)
        .ok_or("TpmInfo.PcrSet is missing")?
        .iter()
        .map(|v| v.as_u64().filter(|i| *i < 24).map(|i| i as u32))
        .collect::<Option<_>>()
        .ok_or("TpmInfo.PcrSet holds something other than PCR indices")?;
    if pcr_set != pcrs || pcrs.is_empty() {
        return Err(format!(
            "TpmInfo.PcrSet {pcr_set:?} is not the quoted PCR selection {pcrs:?}"
        ));
    }
    let values = info
        .pointer("/TpmInfo/PCRs")
        .and_then(Value::as_array)
        .ok_or("TpmInfo.PCRs is missing")?;
    if values.len() != pcrs.len() {
        return Err("TpmInfo.PCRs does not hold one value per quoted PCR".into());
    }
    let mut concatenated = Vec::new();
    for (want, entry) in pcrs.iter().zip(values) {
        if entry.get("Index").and_then(Value::as_u64) != Some(u64::from(*want)) {
            return Err(format!("TpmInfo.PCRs is not in PcrSet order at PCR {want}"));
        }
        let d = entry
            .get("Digest")
            .and_then(Value::as_str)
            .and_then(|s| b64_lenient(s).ok())
            .filter(|d| d.len() == 32)
            .ok_or_else(|| format!("TpmInfo.PCRs: PCR {want} is not a SHA-256 value"))?;
        concatenated.extend_from_slice(&d);
    }
    if Sha256::digest(&concatenated)[..] != digest[..] {
        return Err("PCR values do not match the quote's PCR digest".into());
    }

    // The isolation evidence: a verified SNP report binding the HCL runtime claims.
    let kind = info
        .pointer("/IsolationInfo/Type")
        .and_then(Value::as_str)
        .unwrap_or("");
    if kind != "SevSnp" {
        return Err(format!(
            "IsolationInfo.Type {kind:?} is not supported by skr-emulator (SevSnp)"
        ));
    }
    let proof: Value = serde_json::from_slice(&b64_field(&info, "/IsolationInfo/Evidence/Proof")?)
        .map_err(|e| format!("IsolationInfo.Evidence.Proof is not JSON: {e}"))?;
    let snp_report = b64_field(&proof, "/SnpReport")?;
    let chain = b64_field(&proof, "/VcekCertChain")?;
    let verified = verify_evidence(&snp_report, &chain, roots)?;
    let runtime = b64_field(&info, "/IsolationInfo/Evidence/RunTimeData")?;
    let rd = crate::snp::Report(&verified.report).report_data().to_vec();
    if rd[..32] != Sha256::digest(&runtime)[..] || rd[32..].iter().any(|b| *b != 0) {
        return Err(
            "RunTimeData is not bound by the SNP report (REPORT_DATA != SHA-256(RunTimeData))"
                .into(),
        );
    }
    let runtime_claims = vtpm::parse_claims(&runtime)?;
    let hcl_ak = runtime_claims
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| {
            keys.iter()
                .find(|k| k.get("kid").and_then(Value::as_str) == Some("HCLAkPub"))
        })
        .ok_or("RunTimeData has no HCLAkPub")?;
    let num = |name: &str| {
        hcl_ak
            .get(name)
            .and_then(Value::as_str)
            .and_then(|s| b64_lenient(s).ok())
            .map(|b| rsa::BigUint::from_bytes_be(&b))
    };
    let hcl_key = match (num("n"), num("e")) {
        (Some(n), Some(e)) => rsa::RsaPublicKey::new(n, e).ok(),
        _ => None,
    };
    if hcl_key.as_ref() != Some(&ak) {
        return Err("the quoting AK is not the HCL report's HCLAkPub".into());
    }

    // The transfer key: certified by the AK, a TPM-resident plain decryption key.
    let enc = RsaPublicArea::parse(&b64_field(&info, "/TpmInfo/EncKeyPub")?, "EncKeyPub")?;
    let certify = b64_field(&info, "/TpmInfo/EncKeyCertifyInfo")?;
    verify_rsassa_sha256(
        &ak,
        &certify,
        &b64_field(&info, "/TpmInfo/EncKeyCertifyInfoSignature")?,
        "EncKeyCertifyInfo",
    )?;
    let AttestedInfo::Certify { name } = Attest::parse(&certify, "EncKeyCertifyInfo")?.info else {
        return Err("EncKeyCertifyInfo is not a TPM2_Certify".into());
    };
    if enc.name().as_deref() != Some(name.as_slice()) {
        return Err("EncKeyCertifyInfo certifies another key than EncKeyPub".into());
    }
    let required = vtpm::ATTR_DECRYPT
        | vtpm::ATTR_FIXED_TPM
        | vtpm::ATTR_FIXED_PARENT
        | vtpm::ATTR_SENSITIVE_DATA_ORIGIN;
    if enc.attributes & required != required
        || enc.attributes & (vtpm::ATTR_SIGN | vtpm::ATTR_RESTRICTED) != 0
    {
        return Err(format!(
            "EncKeyPub attributes 0x{:08x} are not those of a TPM-generated, fixedTPM, unrestricted decryption key",
            enc.attributes
        ));
    }
    let seal_to = enc.rsa_key()?;

    // Claims (skr-protocol §9.4).
    let os_type = b64_text(&info, "/OSType")?;
    let mut tee = sevsnp_claims(&verified);
    tee.insert("x-ms-attestation-type".into(), json!("sevsnpvm"));
    tee.insert(
        "x-ms-compliance-status".into(),
        json!(compliance_status(&verified.report)),
    );
    tee.insert("x-ms-runtime".into(), sorted(runtime_claims.clone()));
    let mut runtime_keys = json!({
        "keys": [{
            "e": b64url(&enc.e.to_be_bytes()[enc.e.leading_zeros() as usize / 8..]),
            "key_ops": ["encrypt"],
            "kid": "TpmEphemeralEncryptionKey",
            "kty": "RSA",
            "n": b64url(&enc.n),
        }]
    });
    if !client_payload.is_empty() {
        runtime_keys["client-payload"] = Value::Object(client_payload);
    }
    let mut c = Map::new();
    c.insert("x-ms-attestation-type".into(), json!("azurevm"));
    c.insert("x-ms-azurevm-attestation-protocol-ver".into(), json!("2.0"));
    c.insert("x-ms-azurevm-attested-pcrs".into(), json!(pcrs));
    c.insert("x-ms-azurevm-ostype".into(), json!(os_type));
    c.insert(
        "x-ms-azurevm-osdistro".into(),
        json!(b64_text(&info, "/OSDistro")?),
    );
    c.insert(
        "x-ms-azurevm-osbuild".into(),
        json!(b64_text(&info, "/OSBuild")?),
    );
    for (claim, member) in [
        ("x-ms-azurevm-osversion-major", "OSVersionMajor"),
        ("x-ms-azurevm-osversion-minor", "OSVersionMinor"),
    ] {
        c.insert(
            claim.into(),
            json!(info.get(member).and_then(Value::as_u64).unwrap_or(0)),
        );
    }
    c.insert(
        "x-ms-azurevm-is-windows".into(),
        json!(os_type == "Windows"),
    );
    if let Some(vm_id) = runtime_claims
        .pointer("/vm-configuration/vmUniqueId")
        .and_then(Value::as_str)
    {
        c.insert("x-ms-azurevm-vmid".into(), json!(vm_id));
    }
    if let Some(sb) = runtime_claims
        .pointer("/vm-configuration/secure-boot")
        .and_then(Value::as_bool)
    {
        c.insert("secureboot".into(), json!(sb));
    }
    c.insert("x-ms-isolation-tee".into(), Value::Object(tee));
    c.insert("x-ms-runtime".into(), runtime_keys);
    c.insert("x-ms-policy-hash".into(), json!(policy_hash()));
    c.insert("x-ms-ver".into(), json!("1.0"));
    Ok(GuestOutcome {
        claims: c,
        root: verified.root,
        seal_to,
    })
}

/// The sealed `token` member: `{EncryptedInnerKey, EncryptionParams, AuthenticationData, Jwt}`
/// as base64url JSON (§6.6 step 9).
pub fn seal(jwt: &str, to: &rsa::RsaPublicKey) -> Result<String, String> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let key: [u8; 32] = crate::util::random_bytes();
    let iv: [u8; 12] = crate::util::random_bytes();
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).map_err(|e| e.to_string())?;
    let sealed = cipher
        .encrypt(
            &iv.into(),
            Payload {
                msg: jwt.as_bytes(),
                aad: b"Transport Key",
            },
        )
        .map_err(|e| format!("sealing the token: {e}"))?;
    let (ct, tag) = sealed.split_at(sealed.len() - 16);
    let wrapped = to
        .encrypt(&mut rand::rngs::OsRng, rsa::Pkcs1v15Encrypt, &key)
        .map_err(|e| format!("wrapping the token key: {e}"))?;
    let inner = json!({
        "EncryptedInnerKey": b64std(&wrapped),
        "EncryptionParams": {
            "BlockMode": "ChainingModeGCM",
            "BlockPadding": "PKCS7",
            "Cipher": "AES",
            "KeySizeInBits": 256,
            "Iv": b64std(&iv),
        },
        "AuthenticationData": b64std(tag),
        "Jwt": b64std(ct),
    });
    Ok(b64url(inner.to_string().as_bytes()))
}
