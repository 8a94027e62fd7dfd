//! MAA's `AzureGuest` attestation of a confidential VM through its vTPM (platform-evidence
//! §6.6, skr-protocol §8.3, §9.4): the AK certificate chains to the (simulated) Azure vTPM CA,
//! the AK is the certificate's key and the HCL report's `HCLAkPub`, the PCR quote is signed by
//! it over the PCR values sent, the SNP report verifies (VCEK chain to a trusted ARK) and binds
//! SHA-256(runtime claims), the transfer key is certified by the AK and is a TPM-resident
//! decryption key. The token carries the `azurevm` claims, the TEE's claims in
//! `x-ms-isolation-tee`, and the transfer key as `TpmEphemeralEncryptionKey`; the response is
//! sealed to that key (AES-GCM under an RSAES-PKCS1-v1_5-wrapped key, AAD `Transport Key`).
//! The TCG event log (`TcgLogs`) is replayed: every quoted PCR must be the value its SHA-256
//! bank replays to.
//!
//! Not done (and said so in docs/EMULATOR.md): the Windows boot-state claims
//! (`x-ms-azurevm-*debug*`, `-elam-enabled`, …) that MAA derives from the log's events are not
//! issued.

use super::{compliance_status, policy_hash, sevsnp_claims, sorted, verify_evidence};
use crate::tcg_log::EventLog;
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

/// The quoted PCR values must be what the TCG event log replays to (SHA-256 bank), so that
/// the log's events describe the boot the quote attests.
fn check_event_log(log: &[u8], quoted: &[(u32, Vec<u8>)]) -> Result<(), String> {
    // An empty log is refused. Microsoft does not document whether MAA takes AzureGuest
    // evidence without one; PCR values mean nothing without their log (MAA derives its boot
    // claims from it), so refusing is the safe reading. The module sends an empty log when it
    // cannot read the file: say what to fix on the guest.
    if log.is_empty() {
        return Err(
            "TcgLogs is empty: the guest sent no TCG event log, so the quoted PCRs \
            cannot be checked against the boot; give the module read access to the event log \
            (/sys/kernel/security/tpm0/binary_bios_measurements) or point platform.tcg_log at \
            a readable copy"
                .into(),
        );
    }
    let replayed = EventLog::parse(log)
        .and_then(|l| l.replay_sha256())
        .map_err(|e| format!("TcgLogs: {e}"))?;
    for (pcr, value) in quoted {
        let expected = &replayed[*pcr as usize];
        if value[..] != expected[..] {
            return Err(format!(
                "PCR {pcr} does not match the TCG event log: quoted {}, the log replays to {}",
                hex::encode(value),
                hex::encode(expected)
            ));
        }
    }
    Ok(())
}

/// Everything of `POST /attest/AzureGuest` except HTTP.
pub fn attest_azure_guest(
    body: &Value,
    roots: &[(String, Certificate)],
    vtpm_ca: Option<&Certificate>,
    tdx_quoting_key: Option<&p256::ecdsa::VerifyingKey>,
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
    let mut quoted = Vec::with_capacity(pcrs.len());
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
        quoted.push((*want, d));
    }
    if Sha256::digest(&concatenated)[..] != digest[..] {
        return Err("PCR values do not match the quote's PCR digest".into());
    }
    check_event_log(&b64_field(&info, "/TcgLogs")?, &quoted)?;

    // The isolation evidence: a verified SNP report or TD quote binding the HCL runtime claims.
    let kind = info
        .pointer("/IsolationInfo/Type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (mut tee, report_data, root) = match kind {
        "SevSnp" => {
            let proof: Value =
                serde_json::from_slice(&b64_field(&info, "/IsolationInfo/Evidence/Proof")?)
                    .map_err(|e| format!("IsolationInfo.Evidence.Proof is not JSON: {e}"))?;
            let snp_report = b64_field(&proof, "/SnpReport")?;
            let chain = b64_field(&proof, "/VcekCertChain")?;
            let verified = verify_evidence(&snp_report, &chain, roots)?;
            let mut tee = sevsnp_claims(&verified);
            tee.insert("x-ms-attestation-type".into(), json!("sevsnpvm"));
            tee.insert(
                "x-ms-compliance-status".into(),
                json!(compliance_status(&verified.report)),
            );
            let rd = crate::snp::Report(&verified.report).report_data().to_vec();
            (tee, rd, verified.root)
        }
        "Tdx" => {
            let key = tdx_quoting_key.ok_or(
                "this emulator simulates no TDX quoting enclave (start it with --platform cvm-tdx)",
            )?;
            let quote = b64_field(&info, "/IsolationInfo/Evidence/Proof")?;
            let body = crate::tdx::verify_quote(&quote, key)?;
            let rd = body[520..584].to_vec();
            (
                crate::tdx::tdx_claims(body),
                rd,
                "skr-emulator simulated TDX quoting enclave".to_string(),
            )
        }
        other => {
            return Err(format!(
                "IsolationInfo.Type {other:?} is not supported by skr-emulator (SevSnp, Tdx)"
            ))
        }
    };
    let runtime = b64_field(&info, "/IsolationInfo/Evidence/RunTimeData")?;
    if report_data[..32] != Sha256::digest(&runtime)[..]
        || report_data[32..].iter().any(|b| *b != 0)
    {
        return Err(
            "RunTimeData is not bound by the hardware report (report data != SHA-256(RunTimeData))"
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
        root,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::{self, PlatformConfig};
    use crate::state::{self, Layout, Pki};
    use crate::tcg_log;
    use crate::vtpm::{CvmIdentity, VtpmCa};
    use rsa::signature::{SignatureEncoding, Signer};
    use rsa::traits::PublicKeyParts;

    const SIGN_ATTRS: u32 = vtpm::ATTR_SIGN
        | vtpm::ATTR_RESTRICTED
        | vtpm::ATTR_FIXED_TPM
        | vtpm::ATTR_FIXED_PARENT
        | vtpm::ATTR_SENSITIVE_DATA_ORIGIN;
    const DECRYPT_ATTRS: u32 = vtpm::ATTR_DECRYPT
        | vtpm::ATTR_FIXED_TPM
        | vtpm::ATTR_FIXED_PARENT
        | vtpm::ATTR_SENSITIVE_DATA_ORIGIN;

    fn tpm2b_public(key: &rsa::RsaPublicKey, attributes: u32) -> Vec<u8> {
        let mut t = vec![];
        t.extend_from_slice(&vtpm::TPM_ALG_RSA.to_be_bytes());
        t.extend_from_slice(&vtpm::TPM_ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&attributes.to_be_bytes());
        t.extend_from_slice(&0u16.to_be_bytes());
        t.extend_from_slice(&vtpm::TPM_ALG_NULL.to_be_bytes());
        t.extend_from_slice(&vtpm::TPM_ALG_NULL.to_be_bytes());
        t.extend_from_slice(&2048u16.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        let n = key.n().to_bytes_be();
        t.extend_from_slice(&(n.len() as u16).to_be_bytes());
        t.extend_from_slice(&n);
        let mut out = (t.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&t);
        out
    }

    fn attest(typ: u16, extra: &[u8], body: &[u8]) -> Vec<u8> {
        let mut a = vtpm::TPM_GENERATED.to_be_bytes().to_vec();
        a.extend_from_slice(&typ.to_be_bytes());
        a.extend_from_slice(&[0, 0]); // qualifiedSigner
        a.extend_from_slice(&(extra.len() as u16).to_be_bytes());
        a.extend_from_slice(extra);
        a.extend_from_slice(&[0; 17 + 8]);
        a.extend_from_slice(body);
        a
    }

    fn quote(pcrs: &[[u8; 32]], extra: &[u8]) -> Vec<u8> {
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&vtpm::TPM_ALG_SHA256.to_be_bytes());
        body.extend_from_slice(&[3, 0xff, 0, 0]);
        let digest = Sha256::digest(pcrs.concat());
        body.extend_from_slice(&32u16.to_be_bytes());
        body.extend_from_slice(&digest);
        attest(vtpm::TPM_ST_ATTEST_QUOTE, extra, &body)
    }

    fn certify(tpm2b: &[u8]) -> Vec<u8> {
        let area = RsaPublicArea::parse(tpm2b, "test").unwrap();
        let name = area.name().unwrap();
        let mut body = (name.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&name);
        body.extend_from_slice(&[0, 0]);
        attest(vtpm::TPM_ST_ATTEST_CERTIFY, &[], &body)
    }

    fn sign(key: &rsa::RsaPrivateKey, msg: &[u8]) -> Vec<u8> {
        rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone())
            .sign(msg)
            .to_vec()
    }

    /// A simulated CVM's evidence, built in software with the emulator's simulated AMD chain.
    struct Guest {
        platform: PlatformConfig,
        pki: Pki,
        roots: Vec<(String, Certificate)>,
        ca: VtpmCa,
        ak: rsa::RsaPrivateKey,
        enc: rsa::RsaPrivateKey,
        _dir: std::path::PathBuf,
    }

    impl Guest {
        fn new() -> Guest {
            // One directory per Guest: tests build theirs concurrently.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("skr-emu-guest-test-{}-{n}", std::process::id()));
            let layout = Layout::new(dir.clone());
            std::fs::create_dir_all(layout.state()).unwrap();
            let platform = state::load_platform(&layout).unwrap();
            let pki = Pki::load_or_create(&layout, &platform).unwrap();
            let roots = super::super::trusted_arks(&pki.ark_der);
            let _ = std::fs::remove_dir_all(&dir);
            Guest {
                platform,
                pki,
                roots,
                ca: VtpmCa::new().unwrap(),
                ak: rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap(),
                enc: rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap(),
                _dir: dir,
            }
        }

        fn runtime_claims(&self, ak: &rsa::RsaPublicKey) -> Vec<u8> {
            let id = CvmIdentity {
                ak_n: ak.n().to_bytes_be(),
                ak_e: 65537,
                vm_id: "0000AAAA-0000-0000-0000-000000000001".into(),
            };
            vtpm::runtime_claims(&id, &[7; 64])
        }

        /// The AttestationInfo JSON (as the module builds it) for a consistent guest.
        fn info(&self) -> Value {
            let ak_pub = self.ak.to_public_key();
            let claims = self.runtime_claims(&ak_pub);
            let mut rd = [0u8; 64];
            rd[..32].copy_from_slice(&Sha256::digest(&claims));
            let report =
                snp::build_report(&vtpm::cvm_platform(&self.platform), &rd, &self.pki.vcek_key)
                    .unwrap();
            let chain = crate::util::pem_encode("CERTIFICATE", &self.pki.vcek_der)
                + &self.pki.thim_chain_pem();
            // The emulator's simulated boot: its log, and the PCRs a TPM holds after it.
            let boot = tcg_log::simulated_boot();
            let log = tcg_log::encode(&boot);
            let pcrs = tcg_log::extended_sha256(&boot)[..8].to_vec();
            let q = quote(&pcrs, b"n0nce");
            let enc_pub = tpm2b_public(&self.enc.to_public_key(), DECRYPT_ATTRS);
            let cert_info = certify(&enc_pub);
            let proof =
                json!({"SnpReport": b64url(&report), "VcekCertChain": b64std(chain.as_bytes())});
            json!({
                "AttestationProtocolVersion": "2.0",
                "OSType": b64std(b"Linux"),
                "OSDistro": b64std(b"Debian GNU/Linux"),
                "OSVersionMajor": 12,
                "OSVersionMinor": 0,
                "OSBuild": b64std(b"NotApplication"),
                "TcgLogs": b64std(&log),
                "ClientPayload": {"nonce": b64std(b"n0nce")},
                "TpmInfo": {
                    "AikCert": b64std(&self.ca.issue_ak_cert(&ak_pub, "vm").unwrap()),
                    "AikPub": b64std(&tpm2b_public(&ak_pub, SIGN_ATTRS)),
                    "PcrQuote": b64std(&q),
                    "PcrSignature": b64std(&sign(&self.ak, &q)),
                    "EncKeyPub": b64std(&enc_pub),
                    "EncKeyCertifyInfo": b64std(&cert_info),
                    "EncKeyCertifyInfoSignature": b64std(&sign(&self.ak, &cert_info)),
                    "PcrSet": [0, 1, 2, 3, 4, 5, 6, 7],
                    "PCRs": pcrs.iter().enumerate().map(|(i, v)| json!({"Index": i, "Digest": b64std(v)})).collect::<Vec<_>>(),
                },
                "IsolationInfo": {"Type": "SevSnp", "Evidence": {
                    "Proof": b64std(proof.to_string().as_bytes()),
                    "RunTimeData": b64std(&claims),
                }},
            })
        }

        fn attest(&self, info: &Value) -> Result<GuestOutcome, String> {
            let body = json!({"AttestationInfo": b64url(info.to_string().as_bytes())});
            attest_azure_guest(&body, &self.roots, Some(&self.ca.cert), None)
        }
    }

    /// One simulated guest for the tests of this module (its PKI takes seconds to make).
    fn guest() -> &'static Guest {
        static G: std::sync::LazyLock<Guest> = std::sync::LazyLock::new(Guest::new);
        &G
    }

    #[test]
    fn consistent_cvm_evidence_attests_and_each_tampering_is_refused() {
        let g = guest();
        let info = g.info();
        let ok = g.attest(&info).unwrap();
        let c = &ok.claims;
        assert_eq!(c["x-ms-attestation-type"], "azurevm");
        assert_eq!(
            c["x-ms-azurevm-attested-pcrs"],
            json!([0, 1, 2, 3, 4, 5, 6, 7])
        );
        assert_eq!(
            c["x-ms-azurevm-vmid"],
            "0000AAAA-0000-0000-0000-000000000001"
        );
        let tee = &c["x-ms-isolation-tee"];
        assert_eq!(tee["x-ms-attestation-type"], "sevsnpvm");
        assert_eq!(tee["x-ms-compliance-status"], "azure-compliant-cvm");
        assert_eq!(
            tee["x-ms-runtime"]["user-data"],
            hex::encode_upper([7u8; 64])
        );
        let key = &c["x-ms-runtime"]["keys"][0];
        assert_eq!(key["kid"], "TpmEphemeralEncryptionKey");
        assert_eq!(key["n"], b64url(&g.enc.n().to_bytes_be()));
        assert_eq!(key["e"], "AQAB");
        assert_eq!(c["x-ms-runtime"]["client-payload"]["nonce"], "n0nce");
        assert_eq!(ok.seal_to, g.enc.to_public_key());

        let ak_pub = g.ak.to_public_key();
        let other = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let set = |path: &str, value: Value| {
            let mut v = info.clone();
            *v.pointer_mut(path).unwrap() = value;
            v
        };
        let flip = |path: &str, at: usize| {
            let mut b = b64_lenient(info.pointer(path).unwrap().as_str().unwrap()).unwrap();
            b[at] ^= 1;
            set(path, json!(b64std(&b)))
        };
        let other_enc = tpm2b_public(&other.to_public_key(), DECRYPT_ATTRS);
        let signing_enc = tpm2b_public(&g.enc.to_public_key(), DECRYPT_ATTRS | vtpm::ATTR_SIGN);
        let signing_certify = certify(&signing_enc);
        let mut wrong_hcl_ak = info.clone();
        {
            // The HCL claims of another AK, bound by a fresh SNP report: the binding holds,
            // the AK does not match.
            let claims = g.runtime_claims(&other.to_public_key());
            let mut rd = [0u8; 64];
            rd[..32].copy_from_slice(&Sha256::digest(&claims));
            let report =
                snp::build_report(&vtpm::cvm_platform(&g.platform), &rd, &g.pki.vcek_key).unwrap();
            let chain =
                crate::util::pem_encode("CERTIFICATE", &g.pki.vcek_der) + &g.pki.thim_chain_pem();
            let proof =
                json!({"SnpReport": b64url(&report), "VcekCertChain": b64std(chain.as_bytes())});
            wrong_hcl_ak["IsolationInfo"]["Evidence"] = json!({
                "Proof": b64std(proof.to_string().as_bytes()),
                "RunTimeData": b64std(&claims),
            });
        }
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "AK certificate of another CA",
                set(
                    "/TpmInfo/AikCert",
                    json!(b64std(
                        &VtpmCa::new().unwrap().issue_ak_cert(&ak_pub, "vm").unwrap()
                    )),
                ),
                "vTPM CA",
            ),
            (
                "AikPub of another key",
                set(
                    "/TpmInfo/AikPub",
                    json!(b64std(&tpm2b_public(&other.to_public_key(), SIGN_ATTRS))),
                ),
                "AikPub is not the key of AikCert",
            ),
            (
                "quote signature",
                flip("/TpmInfo/PcrSignature", 10),
                "PcrQuote: signature",
            ),
            (
                "quoted PCR value",
                set("/TpmInfo/PCRs/3/Digest", json!(b64std(&[9u8; 32]))),
                "PCR values do not match",
            ),
            (
                "event log digest",
                {
                    // The first separator (PCR 0's): all separators measure the same 4 bytes.
                    let mut log = b64_lenient(info["TcgLogs"].as_str().unwrap()).unwrap();
                    let separator = Sha256::digest([0u8; 4]);
                    let at = log.windows(32).position(|w| w == &separator[..]).unwrap();
                    log[at] ^= 1;
                    set("/TcgLogs", json!(b64std(&log)))
                },
                "PCR 0 does not match the TCG event log",
            ),
            (
                "truncated event log",
                {
                    let log = b64_lenient(info["TcgLogs"].as_str().unwrap()).unwrap();
                    set("/TcgLogs", json!(b64std(&log[..log.len() - 3])))
                },
                "TcgLogs: event",
            ),
            (
                "empty event log",
                set("/TcgLogs", json!("")),
                "platform.tcg_log",
            ),
            (
                "nonce other than the quote's",
                set("/ClientPayload/nonce", json!(b64std(b"other"))),
                "qualifying data",
            ),
            (
                "PCR set",
                set("/TpmInfo/PcrSet", json!([0, 1, 2, 3, 4, 5, 6])),
                "PcrSet",
            ),
            (
                "runtime claims",
                set(
                    "/IsolationInfo/Evidence/RunTimeData",
                    json!(b64std(br#"{"keys":[]}"#)),
                ),
                "not bound",
            ),
            ("HCLAkPub of another AK", wrong_hcl_ak, "HCLAkPub"),
            (
                "transfer key not the certified one",
                set("/TpmInfo/EncKeyPub", json!(b64std(&other_enc))),
                "certifies another key",
            ),
            (
                "certify signature",
                set(
                    "/TpmInfo/EncKeyCertifyInfoSignature",
                    json!(b64std(&sign(
                        &other,
                        &certify(
                            &b64_lenient(info["TpmInfo"]["EncKeyPub"].as_str().unwrap()).unwrap()
                        )
                    ))),
                ),
                "EncKeyCertifyInfo: signature",
            ),
            (
                "a signing transfer key",
                {
                    let mut v = set("/TpmInfo/EncKeyPub", json!(b64std(&signing_enc)));
                    v["TpmInfo"]["EncKeyCertifyInfo"] = json!(b64std(&signing_certify));
                    v["TpmInfo"]["EncKeyCertifyInfoSignature"] =
                        json!(b64std(&sign(&g.ak, &signing_certify)));
                    v
                },
                "attributes",
            ),
            (
                "isolation type",
                set("/IsolationInfo/Type", json!("TrustedLaunch")),
                "IsolationInfo.Type",
            ),
            (
                "protocol version",
                set("/AttestationProtocolVersion", json!("1.0")),
                "AttestationProtocolVersion",
            ),
        ];
        for (what, tampered, expected) in cases {
            let e = g
                .attest(&tampered)
                .err()
                .unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(e.contains(expected), "{what}: {e}");
        }
        // A flipped bit of the SNP report fails its VCEK signature.
        let mut proof: Value = serde_json::from_slice(
            &b64_lenient(info["IsolationInfo"]["Evidence"]["Proof"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let mut report = b64_lenient(proof["SnpReport"].as_str().unwrap()).unwrap();
        report[0x90] ^= 1;
        proof["SnpReport"] = json!(b64url(&report));
        let e = g
            .attest(&set(
                "/IsolationInfo/Evidence/Proof",
                json!(b64std(proof.to_string().as_bytes())),
            ))
            .err()
            .unwrap();
        assert!(e.contains("signature"), "{e}");
        // No simulated vTPM CA (an ACI emulator): refused before anything else.
        let body = json!({"AttestationInfo": b64url(info.to_string().as_bytes())});
        let e = attest_azure_guest(&body, &g.roots, None, None)
            .err()
            .unwrap();
        assert!(e.contains("no vTPM CA"), "{e}");
    }

    /// A TDX CVM's evidence: the TD quote of a TDREPORT binding the runtime claims, signed by
    /// the trusted quoting key; refused with another quoting key or other runtime claims.
    #[test]
    fn tdx_evidence_attests_with_tdxvm_claims_and_tampering_is_refused() {
        let g = guest();
        let keys = crate::tdx::TdxKeys::generate();
        let claims = g.runtime_claims(&g.ak.to_public_key());
        let mut rd = [0u8; 64];
        rd[..32].copy_from_slice(&Sha256::digest(&claims));
        let report = crate::tdx::build_tdreport(&g.platform, &rd, &keys).unwrap();
        let mut info = g.info();
        info["IsolationInfo"] = json!({"Type": "Tdx", "Evidence": {
            "Proof": b64std(&crate::tdx::quote(&report, &keys)),
            "RunTimeData": b64std(&claims),
        }});
        let body = json!({"AttestationInfo": b64url(info.to_string().as_bytes())});
        let qe = keys.quoting_key.verifying_key();
        let ok = attest_azure_guest(&body, &g.roots, Some(&g.ca.cert), Some(qe)).unwrap();
        let tee = &ok.claims["x-ms-isolation-tee"];
        assert_eq!(tee["x-ms-attestation-type"], "tdxvm");
        assert_eq!(tee["x-ms-compliance-status"], "azure-compliant-cvm");
        assert_eq!(tee["tdx_report_data"], hex::encode(rd));
        assert_eq!(tee["tdx_mrtd"], g.platform.measurement);
        assert_eq!(
            tee["x-ms-runtime"]["user-data"],
            hex::encode_upper([7u8; 64])
        );
        // Another quoting enclave; no TDX platform at all; other runtime claims.
        let other = crate::tdx::TdxKeys::generate();
        let e = attest_azure_guest(
            &body,
            &g.roots,
            Some(&g.ca.cert),
            Some(other.quoting_key.verifying_key()),
        )
        .err()
        .unwrap();
        assert!(e.contains("trusted quoting enclave"), "{e}");
        let e = attest_azure_guest(&body, &g.roots, Some(&g.ca.cert), None)
            .err()
            .unwrap();
        assert!(e.contains("no TDX quoting enclave"), "{e}");
        let mut changed = info.clone();
        changed["IsolationInfo"]["Evidence"]["RunTimeData"] = json!(b64std(br#"{"keys":[]}"#));
        let body = json!({"AttestationInfo": b64url(changed.to_string().as_bytes())});
        let e = attest_azure_guest(&body, &g.roots, Some(&g.ca.cert), Some(qe))
            .err()
            .unwrap();
        assert!(e.contains("not bound"), "{e}");
    }

    #[test]
    fn sealed_responses_open_with_the_transfer_key_only() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let sealed = seal("a.b.c", &key.to_public_key()).unwrap();
        let v: Value = serde_json::from_slice(&b64_lenient(&sealed).unwrap()).unwrap();
        let inner = key
            .decrypt(
                rsa::Pkcs1v15Encrypt,
                &b64_lenient(v["EncryptedInnerKey"].as_str().unwrap()).unwrap(),
            )
            .unwrap();
        let mut ct = b64_lenient(v["Jwt"].as_str().unwrap()).unwrap();
        ct.extend(b64_lenient(v["AuthenticationData"].as_str().unwrap()).unwrap());
        let iv = b64_lenient(v["EncryptionParams"]["Iv"].as_str().unwrap()).unwrap();
        let jwt = aes_gcm::Aes256Gcm::new_from_slice(&inner)
            .unwrap()
            .decrypt(
                iv.as_slice().into(),
                Payload {
                    msg: &ct,
                    aad: b"Transport Key",
                },
            )
            .unwrap();
        assert_eq!(jwt, b"a.b.c");
        assert_eq!(v["EncryptionParams"]["KeySizeInBits"], 256);
        let other = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        assert!(other
            .decrypt(
                rsa::Pkcs1v15Encrypt,
                &b64_lenient(v["EncryptedInnerKey"].as_str().unwrap()).unwrap()
            )
            .is_err());
    }
}
