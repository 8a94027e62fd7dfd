//! Azure confidential VMs (SEV-SNP or TDX behind Microsoft's paravisor): login evidence from
//! the vTPM and MAA's `AzureGuest` attestation (platform-evidence §6.6, skr-protocol §8.3,
//! §9.4).
//!
//! The transfer key is `TpmEphemeralEncryptionKey`, created inside the vTPM and certified by
//! its AK; it implements `TransferKey` like the software key, so the rest of the login path
//! (identity, release, unwrap, install) is the same. It lives for one login: dropping the
//! `Attested` that owns it flushes it from the TPM, on success and on every failure.

use super::evidence::hcl::{HclReport, USER_DATA_LEN};
use super::maa::{self, Binding, Expected};
use super::tpm::{
    check_ak_is_hcl_akpub, verify_certify, DecryptScheme, EchoWait, Tpm, TpmTransferKey,
    ATTESTED_PCRS,
};
use super::transfer_key::{strip_leading_zeros, OaepHash, RsaPublicJwk, TransferKey};
use super::Session;
use super::{
    b64std, b64url, b64url_decode, evidence, random_nonce, Attested, LoginTimings, TpmTimings,
};
use crate::config::Config;
use crate::crypto::HashAlg;
use crate::error::{Error, Result, Step};
use crate::secret::SecretBytes;
use serde_json::{json, Value};
use std::io::Read;
use std::sync::Mutex;
use std::time::Instant;

/// The kid MAA gives the TPM-held transfer key in the token's `x-ms-runtime.keys` (§6.6 step 10).
pub const TPM_KID: &str = "TpmEphemeralEncryptionKey";
/// MAA's AzureGuest api-version (MSGA and Microsoft's CVM tools use this one).
pub const AZURE_GUEST_API_VERSION: &str = "2020-10-01";
/// The TCG event log of the boot (§6.6 step 5) unless `platform.tcg_log` names another file;
/// sent empty when it cannot be read.
pub const TCG_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// More than any real boot log; a larger file is not sent.
const TCG_LOG_MAX: u64 = 4 << 20;

/// The vTPM's transfer key behind the transfer-key seam. The mutex serialises the release
/// threads' decryptions on the one TPM connection.
pub struct TpmKey {
    key: Mutex<TpmTransferKey>,
    jwk: RsaPublicJwk,
}

impl TpmKey {
    pub fn new(key: TpmTransferKey) -> TpmKey {
        let jwk = RsaPublicJwk {
            kid: TPM_KID.to_string(),
            n: strip_leading_zeros(&key.public.n).to_vec(),
            e: strip_leading_zeros(&key.public.e).to_vec(),
        };
        TpmKey {
            key: Mutex::new(key),
            jwk,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, TpmTransferKey>> {
        // A poisoned lock means a release thread panicked mid-decrypt; the TPM key itself is
        // still valid (the TPM holds it), so the guard is taken over.
        Ok(self.key.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn decrypt(&self, ciphertext: &[u8], scheme: DecryptScheme) -> Result<SecretBytes> {
        let plain = self.lock()?.decrypt(ciphertext, scheme)?;
        Ok(SecretBytes::from_slice(&plain))
    }
}

impl TransferKey for TpmKey {
    fn public_jwk(&self) -> &RsaPublicJwk {
        &self.jwk
    }

    fn modulus_len(&self) -> usize {
        self.jwk.n.len()
    }

    /// TPM2_RSA_Decrypt inside the vTPM under the key's PolicyPCR session: the OAEP step of
    /// the unwrap never sees the private key.
    fn decrypt_oaep(&self, hash: OaepHash, ciphertext: &[u8]) -> Result<SecretBytes> {
        let scheme = match hash {
            OaepHash::Sha1 => DecryptScheme::OaepSha1,
            OaepHash::Sha256 => DecryptScheme::OaepSha256,
            OaepHash::Sha384 => DecryptScheme::OaepSha384,
        };
        self.decrypt(ciphertext, scheme)
    }
}

/// The 64 bytes written to NV 0x01400002: SHA-512 over a label, the MAA nonce and the transfer
/// key's TPM2B_PUBLIC. The HCL echoes them in its report, MAA in the token's
/// `x-ms-isolation-tee.x-ms-runtime.user-data`: the hardware report was made for this login.
pub fn user_data_for(nonce: &str, transfer_key_tpm2b_public: &[u8]) -> [u8; USER_DATA_LEN] {
    let mut input = b"skr-pkcs11 azure-cvm login v1\0".to_vec();
    input.extend_from_slice(nonce.as_bytes());
    input.push(0);
    input.extend_from_slice(transfer_key_tpm2b_public);
    let digest = HashAlg::Sha512.digest(&input);
    let mut out = [0u8; USER_DATA_LEN];
    out.copy_from_slice(&digest[..USER_DATA_LEN]);
    out
}

/// `NAME` and `VERSION_ID` (major, minor) of /etc/os-release, as MSGA reports them.
fn os_release() -> (String, u64, u64) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let version = field("VERSION_ID").unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        field("NAME").unwrap_or_else(|| "Linux".into()),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// The boot's TCG event log (`platform.tcg_log`, default [`TCG_LOG`]), or empty when this
/// process cannot read it (securityfs is root-only on most distributions), as MSGA sends it.
/// MAA may refuse evidence without a log (skr-emulator's does, naming the fix).
pub fn tcg_log(cfg: &Config) -> Vec<u8> {
    read_tcg_log(cfg).unwrap_or_else(|(path, e)| {
        log::log!(
            unreadable_tcg_log_level(cfg),
            "{}: {e}; sending an empty TCG log (set platform.tcg_log to a log this user can read)",
            path.display()
        );
        Vec::new()
    })
}

/// The default log is root-only on most systems, so not reading it is routine (debug); a log
/// the operator named in `platform.tcg_log` and the module cannot read is a mistake to fix.
fn unreadable_tcg_log_level(cfg: &Config) -> log::Level {
    if cfg.platform.tcg_log.is_some() {
        log::Level::Warn
    } else {
        log::Level::Debug
    }
}

fn tcg_log_path(cfg: &Config) -> &std::path::Path {
    cfg.platform
        .tcg_log
        .as_deref()
        .unwrap_or(std::path::Path::new(TCG_LOG))
}

fn read_tcg_log(cfg: &Config) -> std::result::Result<Vec<u8>, (&std::path::Path, std::io::Error)> {
    let path = tcg_log_path(cfg);
    // A FIFO or a device named by mistake must not block the login.
    crate::config::open_regular(path)
        .and_then(|(f, _)| {
            let mut log = Vec::new();
            f.take(TCG_LOG_MAX + 1).read_to_end(&mut log)?;
            // A cut log would not replay to the quoted PCRs: a larger one is not sent at all.
            if log.len() as u64 > TCG_LOG_MAX {
                return Err(std::io::Error::other(format!(
                    "larger than {TCG_LOG_MAX} bytes, more than any boot log"
                )));
            }
            Ok(log)
        })
        .map_err(|e| (path, e))
}

/// `skr-pkcs11 doctor`'s TCG log row: whether the login will send the boot's event log.
pub fn tcg_log_row(cfg: &Config) -> Result<String> {
    match read_tcg_log(cfg) {
        Ok(log) if !log.is_empty() => Ok(format!(
            "{}: {} bytes, sent with the evidence",
            tcg_log_path(cfg).display(),
            log.len()
        )),
        Ok(_) => Err(Error::evidence(
            Step::Evidence,
            format!("TCG log {} is empty", tcg_log_path(cfg).display()),
        )
        .with_hint("MAA judges the boot by this log; set platform.tcg_log to the boot's event log")),
        Err((path, e)) => Err(Error::evidence(
            Step::Evidence,
            format!("TCG log {}: {e}; the login sends an empty log", path.display()),
        )
        .with_hint("MAA may refuse evidence without the boot's event log: let the module's user read it (securityfs is root-only on most distributions) or set platform.tcg_log")),
    }
}

/// The evidence MAA's AzureGuest endpoint takes (§6.6 step 8), minus the isolation part.
pub struct TpmEvidence<'a> {
    pub ak_cert: &'a [u8],
    pub ak_pub: &'a [u8],
    pub quote: &'a super::tpm::PcrQuote,
    pub enc_key_pub: &'a [u8],
    pub enc_key_certify_info: &'a [u8],
    pub enc_key_certify_signature: &'a [u8],
}

/// The inner `AttestationInfo` JSON, encodings exactly as MSGA's ("B64" = standard base64).
pub fn attestation_info(
    tpm: &TpmEvidence<'_>,
    isolation: Value,
    nonce: &str,
    tcg_log: &[u8],
) -> Value {
    let (distro, major, minor) = os_release();
    let pcr_set: Vec<u8> = tpm.quote.pcrs.iter().map(|(i, _)| *i).collect();
    let pcrs: Vec<Value> = tpm
        .quote
        .pcrs
        .iter()
        .map(|(i, v)| json!({"Index": i, "Digest": b64std(v)}))
        .collect();
    json!({
        "AttestationProtocolVersion": "2.0",
        "OSType": b64std(b"Linux"),
        "OSDistro": b64std(distro.as_bytes()),
        "OSVersionMajor": major,
        "OSVersionMinor": minor,
        "OSBuild": b64std(b"NotApplication"),
        "TcgLogs": b64std(tcg_log),
        "ClientPayload": {"nonce": b64std(nonce.as_bytes())},
        "TpmInfo": {
            "AikCert": b64std(tpm.ak_cert),
            "AikPub": b64std(tpm.ak_pub),
            "PcrQuote": b64std(&tpm.quote.attest),
            "PcrSignature": b64std(&tpm.quote.signature),
            "EncKeyPub": b64std(tpm.enc_key_pub),
            "EncKeyCertifyInfo": b64std(tpm.enc_key_certify_info),
            "EncKeyCertifyInfoSignature": b64std(tpm.enc_key_certify_signature),
            "PcrSet": pcr_set,
            "PCRs": pcrs,
        },
        "IsolationInfo": isolation,
    })
}

/// `IsolationInfo` of an SEV-SNP CVM: the SNP report of the HCL report and its VCEK chain.
pub fn snp_isolation(snp_report: &[u8], vcek_chain_pem: &str, runtime_claims: &[u8]) -> Value {
    let proof = json!({
        "SnpReport": b64url(snp_report),
        "VcekCertChain": b64std(vcek_chain_pem.as_bytes()),
    });
    json!({
        "Type": "SevSnp",
        "Evidence": {
            "Proof": b64std(proof.to_string().as_bytes()),
            "RunTimeData": b64std(runtime_claims),
        }
    })
}

/// `IsolationInfo` of a TDX CVM: the TD quote of the HCL report's TDREPORT (§6.6 step 8, §8).
pub fn tdx_isolation(td_quote: &[u8], runtime_claims: &[u8]) -> Value {
    json!({
        "Type": "Tdx",
        "Evidence": {
            "Proof": b64std(td_quote),
            "RunTimeData": b64std(runtime_claims),
        }
    })
}

/// The TD quote of `report` from IMDS (platform-evidence §6.5: `Metadata: true` and a
/// Content-Type of exactly `application/json`, else 415). Its report data must be the
/// TDREPORT's: the quote is of this report.
pub fn td_quote(
    cfg: &Config,
    http: &super::http::Http,
    report: &evidence::tdx::TdReport<'_>,
) -> Result<Vec<u8>> {
    let base = cfg
        .platform
        .imds_url
        .as_deref()
        .unwrap_or("http://169.254.169.254")
        .trim_end_matches('/');
    let url = format!("{base}/acc/tdquote");
    let body = json!({ "report": b64url(report.bytes()) }).to_string();
    let resp = http.send(Step::Evidence, "IMDS TD quote", &|| {
        http.direct
            .post(&url)
            .header("Metadata", "true")
            .header("Content-Type", "application/json")
            .body(body.clone())
    })?;
    let bad = |what: String| {
        Error::evidence(Step::Evidence, format!("IMDS {url}: {what}")).with_hint(
            "the TDX quote service of this Azure TDX confidential VM did not quote the TDREPORT; check that IMDS is reachable from the VM (169.254.169.254, no proxy) and retry",
        )
    };
    if !resp.is_success() {
        return Err(bad(format!(
            "answered {}: {}",
            resp.status,
            resp.error_text()
        )));
    }
    let quote = serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| {
            v.get("quote")
                .and_then(Value::as_str)
                .and_then(b64url_decode)
        })
        .ok_or_else(|| bad("the answer has no base64url quote".into()))?;
    let parsed = evidence::tdx::TdQuote::parse(&quote)?;
    if parsed.report_data() != report.report_data() {
        return Err(Error::integrity(
            Step::Evidence,
            "IMDS returned a TD quote of another TDREPORT (its report data differs)",
        ));
    }
    Ok(quote)
}

/// The AK certificate must be X.509 and within its validity period at `now` (Unix seconds):
/// MAA refuses an expired one with a less precise message, and Azure's guest attestation
/// extension is what renews it (platform-evidence §6.6 step 1; open question 4).
pub fn check_ak_certificate(der: &[u8], now: u64) -> Result<()> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| {
        Error::evidence(
            Step::Evidence,
            format!("TPM: the AK certificate at NV 0x01C101D0 is not X.509 ({e})"),
        )
        .with_hint("refresh the VM's guest attestation extension (it renews the AK certificate)")
    })?;
    let v = &cert.tbs_certificate.validity;
    let (from, to) = (
        v.not_before.to_unix_duration().as_secs(),
        v.not_after.to_unix_duration().as_secs(),
    );
    if now < from || now > to {
        return Err(Error::evidence(
            Step::Evidence,
            format!(
                "TPM: the AK certificate at NV 0x01C101D0 is valid from {} to {}, not now",
                v.not_before, v.not_after
            ),
        )
        .with_hint("the vTPM's AK certificate has expired (or the clock is wrong): install or refresh the VM's guest attestation extension, which renews it"));
    }
    Ok(())
}

/// Steps 1–3 of the login on an Azure CVM: TPM transfer key, vTPM evidence, AzureGuest.
pub fn attest(cfg: &Config, session: &Session, timings: &mut LoginTimings) -> Result<Attested> {
    // The VCEK chain does not depend on the TPM: fetch it while the TPM works. Only an SNP CVM
    // uses it (known once the HCL report is read); on a TDX CVM the answer is dropped.
    std::thread::scope(|s| {
        let collateral = s.spawn(|| evidence::collateral_from_thim(cfg, &session.http));
        let collateral = move || {
            collateral.join().unwrap_or_else(|_| {
                Err(Error::general("the collateral thread panicked").with_step(Step::Evidence))
            })
        };
        attest_with(cfg, session, timings, collateral)
    })
}

fn attest_with(
    cfg: &Config,
    session: &Session,
    timings: &mut LoginTimings,
    collateral: impl FnOnce() -> Result<evidence::Collateral>,
) -> Result<Attested> {
    let t = Instant::now();
    let tpm = Tpm::open(cfg.platform.tpm_tcti.as_deref())?;
    // From here on the key is owned by a value whose drop flushes it: every `?` below
    // leaves nothing in the TPM.
    let mut key = tpm.create_transfer_key(&ATTESTED_PCRS)?;
    timings.transfer_key = t.elapsed();
    let mut tpm_time = TpmTimings {
        create: timings.transfer_key.saturating_sub(key.certify_time),
        certify: key.certify_time,
        ..TpmTimings::default()
    };

    let t = Instant::now();
    let nonce = random_nonce()?;
    let evidence = azure_guest_evidence(
        cfg,
        &session.http,
        &mut key,
        &nonce,
        collateral,
        &mut tpm_time,
    )?;
    timings.evidence = t.elapsed();

    let t = Instant::now();
    let maa = maa::Maa::new(&session.http, &cfg.attestation.url, AZURE_GUEST_API_VERSION);
    let sealed = maa.attest_azure_guest(&evidence.info)?;
    let transfer = TpmKey::new(key);
    let token_decrypt = std::cell::Cell::new(std::time::Duration::ZERO);
    let token = maa::open_sealed_token(&sealed, &|ct| {
        let step = Instant::now();
        let key = transfer.decrypt(ct, DecryptScheme::RsaEs);
        token_decrypt.set(token_decrypt.get() + step.elapsed());
        key
    })?;
    tpm_time.token_decrypt = token_decrypt.get();
    timings.tpm = Some(tpm_time);
    let claims = maa.verify(
        &token,
        &Expected {
            nonce: &nonce,
            transfer_key: transfer.public_jwk(),
            binding: Binding::AzureGuest {
                tee: evidence.tee,
                user_data: &evidence.user_data,
            },
        },
    )?;
    timings.attestation = t.elapsed();
    Ok(Attested {
        token,
        claims,
        issuer: maa.url().to_string(),
        transfer: Box::new(transfer),
        evidence_source: "azure-cvm",
    })
}

/// What a login sends to MAA's AzureGuest endpoint, and what the token must then carry.
pub struct GuestEvidence {
    /// The `AttestationInfo` JSON (§6.6 step 8), to be sent base64url-encoded.
    pub info: Value,
    /// The TEE type the token's `x-ms-isolation-tee.x-ms-attestation-type` must name.
    pub tee: &'static str,
    /// What was written to NV 0x01400002: the token's `x-ms-isolation-tee.x-ms-runtime.user-data`.
    pub user_data: [u8; USER_DATA_LEN],
}

/// §6.6 steps 1–8 for the transfer key `key` and the MAA nonce `nonce`: a fresh HCL report over
/// the user-data binding both, the AK and its certificate (checked), the PCR quote, the TCG log
/// (`platform.tcg_log`) and the isolation evidence (`collateral` supplies an SNP CVM's VCEK
/// chain; a TDX CVM's quote comes from IMDS), as the `AttestationInfo` MAA takes. The time of
/// each vTPM step goes to `tpm_time`.
pub fn azure_guest_evidence(
    cfg: &Config,
    http: &super::http::Http,
    key: &mut TpmTransferKey,
    nonce: &str,
    collateral: impl FnOnce() -> Result<evidence::Collateral>,
    tpm_time: &mut TpmTimings,
) -> Result<GuestEvidence> {
    let user_data = user_data_for(nonce, &key.public.tpm2b_public);
    let enc_key_pub = key.public.clone();
    let (certify_info, certify_signature) =
        (key.certify_info.clone(), key.certify_signature.clone());
    let tpm = key.tpm()?;
    let step = Instant::now();
    let hcl_bytes = tpm.fresh_hcl_report(&user_data, EchoWait::default())?;
    tpm_time.nv_report = step.elapsed();
    let hcl = HclReport::parse(&hcl_bytes)?;
    let step = Instant::now();
    let ak = tpm.ak_public()?;
    check_ak_is_hcl_akpub(&hcl, &ak)?;
    let ak_cert = tpm.ak_certificate(EchoWait::default())?;
    tpm_time.ak = step.elapsed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    check_ak_certificate(&ak_cert, now)?;
    // What MAA will check of the certification, checked first for a precise error.
    verify_certify(&enc_key_pub, &certify_info, &certify_signature, &ak)?;
    // AzureGuest quotes carry no qualifying data (§6.6 step 3, §6.7 row 5); the nonce travels
    // in ClientPayload and, through the user-data, in the hardware report.
    let step = Instant::now();
    let quote = tpm.quote(&[], &ATTESTED_PCRS)?;
    tpm_time.quote = step.elapsed();
    let (isolation, tee) = match hcl.hardware {
        evidence::hcl::HardwareReport::Snp(report) => {
            let collateral = collateral()?;
            if let Some(tcbm) = collateral.tcbm.filter(|t| *t != report.reported_tcb()) {
                log::warn!(
                    "VCEK collateral is for TCB {tcbm:016x} but the HCL report's SNP REPORTED_TCB is {:016x}; MAA may refuse the evidence",
                    report.reported_tcb()
                );
            }
            (
                snp_isolation(report.bytes(), &collateral.vcek_chain_pem, hcl.claims_json),
                "sevsnpvm",
            )
        }
        evidence::hcl::HardwareReport::Tdx(report) => {
            // Joined (its answer unused) so that the scope never has to re-raise a panic.
            let _ = collateral();
            let quote = td_quote(cfg, http, &report)?;
            (tdx_isolation(&quote, hcl.claims_json), "tdxvm")
        }
    };
    let info = attestation_info(
        &TpmEvidence {
            ak_cert: &ak_cert,
            ak_pub: &ak.tpm2b_public,
            quote: &quote,
            enc_key_pub: &enc_key_pub.tpm2b_public,
            enc_key_certify_info: &certify_info,
            enc_key_certify_signature: &certify_signature,
        },
        isolation,
        nonce,
        &tcg_log(cfg),
    );
    Ok(GuestEvidence {
        info,
        tee,
        user_data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_binds_nonce_and_key() {
        let a = user_data_for("n1", b"key");
        assert_ne!(a, user_data_for("n2", b"key"));
        assert_ne!(a, user_data_for("n1", b"kez"));
        // No ambiguity between the nonce and the key bytes.
        assert_ne!(user_data_for("n1k", b"ey"), a);
    }

    #[test]
    fn ak_certificates_must_parse_and_be_current() {
        let der = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/fuzz/test-leaf.der"
        ))
        .unwrap();
        use x509_cert::der::Decode;
        let v = x509_cert::Certificate::from_der(&der)
            .unwrap()
            .tbs_certificate
            .validity;
        let (from, to) = (
            v.not_before.to_unix_duration().as_secs(),
            v.not_after.to_unix_duration().as_secs(),
        );
        check_ak_certificate(&der, from + 1).unwrap();
        let e = check_ak_certificate(&der, to + 1).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
        assert!(
            e.hint().unwrap().contains("guest attestation extension"),
            "{e}"
        );
        assert!(check_ak_certificate(&der, from - 1).is_err());
        let e = check_ak_certificate(&der[..40], from + 1).unwrap_err();
        assert!(e.message().contains("not X.509"), "{e}");
    }

    #[test]
    fn the_tcg_log_is_read_from_platform_tcg_log_and_sent_empty_when_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("binary_bios_measurements");
        std::fs::write(&log, b"\x00\x00\x00\x00log").unwrap();
        let cfg =
            |path: &std::path::Path| cvm_config(&format!("tcg_log = \"{}\"\n", path.display()));
        assert_eq!(tcg_log(&cfg(&log)), b"\x00\x00\x00\x00log");
        // Missing, or not a regular file: an empty log, and the login goes on to MAA.
        assert!(tcg_log(&cfg(&dir.path().join("missing"))).is_empty());
        assert!(tcg_log(&cfg(dir.path())).is_empty());
    }

    #[test]
    fn an_unreadable_tcg_log_warns_only_when_platform_tcg_log_names_it() {
        let named = cvm_config("tcg_log = \"/nonexistent/binary_bios_measurements\"\n");
        assert_eq!(unreadable_tcg_log_level(&named), log::Level::Warn);
        assert_eq!(unreadable_tcg_log_level(&cvm_config("")), log::Level::Debug);
    }

    /// An azure-cvm config with `platform_lines` added to its `[platform]` table.
    fn cvm_config(platform_lines: &str) -> Config {
        let text = format!(
            "[platform]\nevidence = \"azure-cvm\"\n{platform_lines}[attestation]\nurl = \"https://maa.example\"\n[identity]\nsource = \"imds\"\n[[token]]\nlabel = \"t\"\n"
        );
        Config::parse(&text, std::path::Path::new("t.toml")).unwrap()
    }

    #[test]
    fn doctor_says_whether_the_tcg_log_is_sent_and_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("binary_bios_measurements");
        let cfg =
            |path: &std::path::Path| cvm_config(&format!("tcg_log = \"{}\"\n", path.display()));
        std::fs::write(&log, [7u8; 40]).unwrap();
        let row = tcg_log_row(&cfg(&log)).unwrap();
        assert!(row.contains("40 bytes"), "{row}");
        std::fs::write(&log, b"").unwrap();
        let e = tcg_log_row(&cfg(&log)).unwrap_err();
        assert!(e.message().contains("is empty"), "{e}");
        // A log cut at the cap would not replay: a larger file is not sent at all.
        std::fs::write(&log, vec![0u8; TCG_LOG_MAX as usize + 1]).unwrap();
        assert!(tcg_log(&cfg(&log)).is_empty());
        let e = tcg_log_row(&cfg(&log)).unwrap_err();
        assert!(e.message().contains("larger than"), "{e}");
        let e = tcg_log_row(&cfg(&dir.path().join("missing"))).unwrap_err();
        assert!(e.message().contains("sends an empty log"), "{e}");
        assert!(e.hint().unwrap().contains("platform.tcg_log"), "{e:?}");
    }

    #[test]
    fn attestation_info_has_msga_members_and_encodings() {
        let quote = super::super::tpm::PcrQuote {
            attest: vec![1, 2],
            signature: vec![3],
            pcrs: vec![(0, [0xaa; 32]), (7, [0xbb; 32])],
        };
        let tpm = TpmEvidence {
            ak_cert: &[0x30],
            ak_pub: &[0, 1],
            quote: &quote,
            enc_key_pub: &[0, 2],
            enc_key_certify_info: &[4],
            enc_key_certify_signature: &[5],
        };
        let iso = snp_isolation(&[9; 4], "PEM", br#"{"keys":[]}"#);
        let v = attestation_info(&tpm, iso, "abc", b"");
        assert_eq!(v["AttestationProtocolVersion"], "2.0");
        assert_eq!(v["OSType"], b64std(b"Linux"));
        assert_eq!(v["ClientPayload"]["nonce"], b64std(b"abc"));
        assert_eq!(v["TpmInfo"]["PcrSet"], json!([0, 7]));
        assert_eq!(v["TpmInfo"]["PCRs"][1]["Index"], 7);
        assert_eq!(v["TpmInfo"]["PCRs"][1]["Digest"], b64std(&[0xbb; 32]));
        assert_eq!(v["TpmInfo"]["AikCert"], "MA==");
        assert_eq!(v["IsolationInfo"]["Type"], "SevSnp");
        let proof: Value = serde_json::from_slice(
            &maa::b64_any(v["IsolationInfo"]["Evidence"]["Proof"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(proof["SnpReport"], b64url(&[9; 4]));
        assert_eq!(proof["VcekCertChain"], b64std(b"PEM"));
        assert_eq!(
            maa::b64_any(
                v["IsolationInfo"]["Evidence"]["RunTimeData"]
                    .as_str()
                    .unwrap()
            )
            .unwrap(),
            br#"{"keys":[]}"#
        );
    }
}
