//! SEV-SNP evidence: the report that binds the transfer key, and its collateral (VCEK chain,
//! UVM endorsement) for MAA (platform-evidence §1, §5; skr-protocol §8.2).
//!
//! Providers: `/dev/sev-guest` and legacy `/dev/sev` (5.15 ACI kernels), each one ioctl of ours,
//! the emulator's simulated platform, and `auto` (device probing; never a fake report).

mod emulated;
pub mod hcl;
mod sev_guest;
pub(crate) mod sev_legacy;
pub mod show;
pub mod snp;
pub mod tdx;
pub mod tpm_attest;

pub use emulated::{parse_platform_response, EmulatedProvider};
pub use sev_guest::SevGuestProvider;
pub use sev_legacy::SevLegacyProvider;

use super::http::Http;
use super::{b64url, b64url_decode};
use crate::config::{Config, EvidenceSource};
use crate::error::{Error, Result, Step};
use base64::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Size of an SNP ATTESTATION_REPORT.
pub const REPORT_LEN: usize = 1184;
const REPORT_DATA_OFFSET: usize = 0x50;
const REPORTED_TCB_OFFSET: usize = 0x180;

/// A report and, when the provider delivers it, the VCEK chain (PEM: VCEK, ASK, ARK).
pub struct Evidence {
    pub report: Vec<u8>,
    pub vcek_chain_pem: Option<String>,
}

/// Something that can produce an SNP report over 64 bytes of REPORT_DATA.
pub trait EvidenceProvider: Send + Sync {
    fn name(&self) -> &'static str;
    fn get_report(&self, report_data: &[u8; 64]) -> Result<Evidence>;
}

/// REPORT_DATA = SHA-256(runtime data bytes exactly as sent) ‖ 32 zero bytes.
pub fn report_data_for(runtime_data: &[u8]) -> [u8; 64] {
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&crate::crypto::HashAlg::Sha256.digest(runtime_data));
    rd
}

/// The provider the configuration asks for. `auto` probes the devices and fails clearly if
/// there is none: a fake report would only fail later, at MAA, with a worse message.
pub fn provider<'a>(cfg: &Config, http: &'a Http) -> Result<Box<dyn EvidenceProvider + 'a>> {
    Ok(match cfg.platform.evidence {
        EvidenceSource::AzureCvm => {
            return Err(Error::general(
                "platform.evidence = \"azure-cvm\" has no SNP report provider (its evidence comes from the vTPM)",
            ))
        }
        EvidenceSource::SevGuest => Box::new(SevGuestProvider),
        EvidenceSource::SevLegacy => Box::new(SevLegacyProvider),
        EvidenceSource::Emulated => {
            let url = cfg.platform.emulator_url.clone().ok_or_else(|| {
                Error::config(
                    "platform.emulator_url is required when platform.evidence = \"emulated\"",
                )
            })?;
            Box::new(EmulatedProvider::new(http, url))
        }
        EvidenceSource::Auto => {
            if Path::new(sev_guest::DEVICE).exists() {
                Box::new(SevGuestProvider)
            } else if Path::new(sev_legacy::DEVICE).exists() {
                Box::new(SevLegacyProvider)
            } else {
                return Err(Error::evidence(
                    Step::Evidence,
                    "no SEV-SNP guest device (neither /dev/sev-guest nor /dev/sev exists) and no Azure vTPM with an HCL report (NV 0x01400001)",
                )
                .with_hint(
                    "run inside an AMD SEV-SNP confidential VM, a Confidential ACI container or an Azure confidential VM (vTPM at platform.tpm_tcti, default /dev/tpmrm0); for local development set platform.evidence = \"emulated\" (skr-emulator up)",
                ));
            }
        }
    })
}

/// Whether this login attests through the vTPM (Azure CVM, AzureGuest) rather than an SNP
/// report. `auto` keeps the SNP devices first (ACI, bare SNP guests) and then asks the TPM
/// for the HCL report's NV index; a TPM that cannot be opened or lacks it means "no".
pub fn uses_vtpm(cfg: &Config) -> bool {
    match cfg.platform.evidence {
        EvidenceSource::AzureCvm => true,
        EvidenceSource::Auto => {
            !Path::new(sev_guest::DEVICE).exists()
                && !Path::new(sev_legacy::DEVICE).exists()
                && vtpm_has_hcl_report(cfg)
        }
        _ => false,
    }
}

#[cfg(feature = "cvm")]
fn vtpm_has_hcl_report(cfg: &Config) -> bool {
    let tcti = cfg.platform.tpm_tcti.as_deref();
    // Only a device that exists is opened (no TCTI noise on machines without a TPM).
    let device = tcti
        .unwrap_or(crate::release::tpm::DEFAULT_TCTI)
        .strip_prefix("device:");
    if device.is_some_and(|d| !Path::new(d).exists()) {
        return false;
    }
    match crate::release::tpm::Tpm::open(tcti).and_then(|mut t| t.nv_defined(hcl::NV_HCL_REPORT)) {
        Ok(found) => found,
        Err(e) => {
            log::debug!("evidence auto: no usable vTPM: {e}");
            false
        }
    }
}

#[cfg(not(feature = "cvm"))]
fn vtpm_has_hcl_report(_cfg: &Config) -> bool {
    false
}

/// Check a report's size and that it carries exactly the REPORT_DATA we asked for.
pub fn check_report(report: &[u8], expected: &[u8; 64]) -> Result<()> {
    if report.len() != REPORT_LEN {
        return Err(Error::evidence(
            Step::Evidence,
            format!(
                "SNP report has {} bytes, expected {REPORT_LEN}",
                report.len()
            ),
        ));
    }
    if &report[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + 64] != expected {
        return Err(Error::integrity(
            Step::Evidence,
            "SNP report REPORT_DATA differs from the hash of our runtime data: the report does not bind this login's transfer key",
        ));
    }
    Ok(())
}

/// REPORTED_TCB as a little-endian u64 (the value THIM writes as `tcbm` in hex).
pub fn reported_tcb(report: &[u8]) -> Option<u64> {
    let b = report.get(REPORTED_TCB_OFFSET..REPORTED_TCB_OFFSET + 8)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Collateral MAA needs besides the report.
#[derive(Debug)]
pub struct Collateral {
    pub vcek_chain_pem: String,
    /// THIM `tcbm` (the TCB the VCEK was issued for), when known.
    pub tcbm: Option<u64>,
    /// The UVM endorsement (COSE_Sign1 bytes) of Confidential ACI, when present.
    pub uvm_reference_info: Option<Vec<u8>>,
}

/// The ACI security-context directory: config, then `UVM_SECURITY_CONTEXT_DIR`, then a
/// `/security-context-*` directory (platform-evidence §5.2).
pub fn security_context_dir(cfg: &Config) -> Option<PathBuf> {
    if let Some(d) = &cfg.platform.security_context_dir {
        return Some(d.clone());
    }
    if let Some(d) = std::env::var_os("UVM_SECURITY_CONTEXT_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    std::fs::read_dir("/")
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("security-context-")
                && e.path().is_dir()
        })
        .map(|e| e.path())
}

fn std_b64(text: &str) -> Option<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(&clean)
        .ok()
        .or_else(|| b64url_decode(&clean))
}

/// Parse a THIM JSON (`{vcekCert, certificateChain, tcbm, cacheControl}`) into the MAA chain
/// (VCEK then ASK then ARK).
pub fn thim_chain(thim: &[u8], origin: &str) -> Result<(String, Option<u64>)> {
    let bad = |what: &str| {
        Error::evidence(Step::Evidence, format!("{origin}: {what}"))
            .with_hint("the AMD certificate collateral is malformed; on ACI redeploy the container group, on a VM check the IMDS THIM endpoint")
    };
    let v: Value =
        serde_json::from_slice(thim).map_err(|e| bad(&format!("not THIM JSON ({e})")))?;
    let vcek = v
        .get("vcekCert")
        .and_then(Value::as_str)
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .ok_or_else(|| bad("no PEM vcekCert"))?;
    let chain = v
        .get("certificateChain")
        .and_then(Value::as_str)
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .ok_or_else(|| bad("no PEM certificateChain"))?;
    let tcbm = v
        .get("tcbm")
        .and_then(Value::as_str)
        .and_then(|t| u64::from_str_radix(t, 16).ok());
    let mut pem = vcek.trim_end().to_string();
    pem.push('\n');
    pem.push_str(chain.trim_end());
    pem.push('\n');
    Ok((pem, tcbm))
}

/// Read collateral from an ACI security-context directory.
pub fn collateral_from_dir(dir: &Path) -> Result<Collateral> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let host_cert = read("host-amd-cert-base64").map_err(|e| {
        Error::evidence(
            Step::Evidence,
            format!("{}/host-amd-cert-base64: {e}", dir.display()),
        )
        .with_hint("platform.security_context_dir / UVM_SECURITY_CONTEXT_DIR must point at the ACI security context (host-amd-cert-base64, reference-info-base64)")
    })?;
    let reference_info = read("reference-info-base64").ok();
    collateral_from_files(dir, &host_cert, reference_info.as_deref())
}

/// The collateral of a security-context directory from its two files' contents (`dir` names
/// them in messages).
pub fn collateral_from_files(
    dir: &Path,
    host_cert: &str,
    reference_info: Option<&str>,
) -> Result<Collateral> {
    let thim = std_b64(host_cert).ok_or_else(|| {
        Error::evidence(
            Step::Evidence,
            format!("{}/host-amd-cert-base64 is not base64", dir.display()),
        )
    })?;
    let (vcek_chain_pem, tcbm) = thim_chain(&thim, "host-amd-cert-base64")?;
    let uvm_reference_info = match reference_info {
        Some(text) if !text.trim().is_empty() => Some(std_b64(text).ok_or_else(|| {
            Error::evidence(
                Step::Evidence,
                format!("{}/reference-info-base64 is not base64", dir.display()),
            )
        })?),
        _ => None,
    };
    Ok(Collateral {
        vcek_chain_pem,
        tcbm,
        uvm_reference_info,
    })
}

/// Collateral from the security context if there is one, else from IMDS THIM.
pub fn collateral(cfg: &Config, http: &Http) -> Result<Collateral> {
    if let Some(dir) = security_context_dir(cfg) {
        return collateral_from_dir(&dir);
    }
    collateral_from_thim(cfg, http)
}

/// The VCEK chain from IMDS THIM: the only source on an Azure confidential VM (§6; a
/// security context is an ACI thing, and one left in the environment must not supply the
/// chain of another host).
pub fn collateral_from_thim(cfg: &Config, http: &Http) -> Result<Collateral> {
    let base = cfg
        .platform
        .imds_url
        .as_deref()
        .unwrap_or("http://169.254.169.254")
        .trim_end_matches('/');
    let url = format!("{base}/metadata/THIM/amd/certification");
    let resp = http.send(Step::Evidence, "IMDS THIM", &|| {
        http.direct.get(&url).header("Metadata", "true")
    })?;
    if !resp.is_success() {
        return Err(Error::evidence(
            Step::Evidence,
            format!(
                "IMDS THIM {url} answered {}: {}",
                resp.status,
                resp.error_text()
            ),
        )
        .with_hint("the VCEK certificate chain is not available from IMDS; on Confidential ACI set UVM_SECURITY_CONTEXT_DIR or platform.security_context_dir"));
    }
    let (vcek_chain_pem, tcbm) = thim_chain(&resp.body, "IMDS THIM")?;
    Ok(Collateral {
        vcek_chain_pem,
        tcbm,
        uvm_reference_info: None,
    })
}

/// MAA's `report` member: base64url of `{SnpReport, VcekCertChain, Endorsements?}`.
pub fn maa_report_member(report: &[u8], vcek_chain_pem: &str, uvm: Option<&[u8]>) -> String {
    let mut evidence = json!({
        "SnpReport": b64url(report),
        "VcekCertChain": b64url(vcek_chain_pem.as_bytes()),
    });
    if let Some(uvm) = uvm {
        let endorsements = json!({ "Uvm": [b64url(uvm)] });
        evidence["Endorsements"] = Value::String(b64url(endorsements.to_string().as_bytes()));
    }
    b64url(evidence.to_string().as_bytes())
}

fn device_error(device: &str, what: String) -> Error {
    Error::evidence(Step::Evidence, format!("{device}: {what}")).with_hint(format!(
        "the SNP guest device {device} did not produce a report; check that the process may open it (permissions, container device mapping) and that this is an SEV-SNP guest"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(rel)
    }

    #[test]
    fn report_data_binds_the_exact_runtime_bytes() {
        // The spec example: SHA-256 of its 605-byte runtime data is the first half of
        // x-ms-sevsnpvm-reportdata, the second half zero.
        let runtime = std::fs::read(testdata("maa/sevsnpvm-runtimedata.json")).unwrap();
        assert_eq!(runtime.len(), 605);
        let rd = report_data_for(&runtime);
        assert_eq!(
            hex::encode(rd),
            "99dd4593a43f4b0f5f10f1856c7326eba309b943251fededc15592e3250ca9e90000000000000000000000000000000000000000000000000000000000000000"
        );
    }

    #[test]
    fn real_aci_report_checks() {
        let report = std::fs::read(testdata("aci/snp_report.bin")).unwrap();
        let mut rd = [0u8; 64];
        rd.copy_from_slice(&report[0x50..0x90]);
        check_report(&report, &rd).unwrap();
        let mut other = rd;
        other[0] ^= 1;
        let e = check_report(&report, &other).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_GENERAL_ERROR);
        assert!(e.message().contains("REPORT_DATA"), "{}", e.message());
        let e = check_report(&report[..1000], &rd).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
        // REPORTED_TCB 03 00 00 00 00 00 08 73 is THIM's tcbm 7308000000000003.
        assert_eq!(reported_tcb(&report), Some(0x7308000000000003));
    }

    #[test]
    fn aci_security_context_collateral() {
        let c = collateral_from_dir(&testdata("aci/security-context")).unwrap();
        assert_eq!(c.vcek_chain_pem.matches("BEGIN CERTIFICATE").count(), 3);
        assert_eq!(c.tcbm, Some(0x7308000000000003));
        let uvm = c.uvm_reference_info.unwrap();
        assert_eq!(&uvm[..2], &[0xd2, 0x84]); // COSE_Sign1
                                              // The VCEK comes first, parseable as X.509.
        use x509_cert::der::DecodePem;
        let first = c
            .vcek_chain_pem
            .split("-----END CERTIFICATE-----")
            .next()
            .unwrap();
        let cert = x509_cert::Certificate::from_pem(format!("{first}-----END CERTIFICATE-----\n"))
            .unwrap();
        assert!(cert
            .tbs_certificate
            .subject
            .to_string()
            .contains("SEV-VCEK"));
        let e = collateral_from_dir(&testdata("nonexistent")).unwrap_err();
        assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
        assert!(e.hint().unwrap().contains("UVM_SECURITY_CONTEXT_DIR"));
    }

    fn config(evidence: &str) -> Config {
        let text = format!(
            "[platform]\nevidence = \"{evidence}\"\n[attestation]\nurl = \"https://maa.example\"\n[identity]\nsource = \"imds\"\n[[token]]\nlabel = \"t\"\n[[token.key]]\nlabel = \"k\"\nid = \"01\"\nkid = \"https://kv.vault.azure.net/keys/k\"\n"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    /// On this host: a real report if an SNP guest device exists, else a device error with a
    /// hint (never a fake report).
    #[test]
    fn device_providers_report_or_fail_with_device_error() {
        let anchors = crate::release::jws::TrustAnchors::with_extra(&[]).unwrap();
        let http = Http::new(&crate::config::Release::default(), &anchors).unwrap();
        let rd = report_data_for(b"probe");
        for (source, device) in [
            ("sev-guest", sev_guest::DEVICE),
            ("sev-legacy", sev_legacy::DEVICE),
        ] {
            let p = provider(&config(source), &http).unwrap();
            assert_eq!(p.name(), source);
            match p.get_report(&rd) {
                Ok(ev) => {
                    assert!(Path::new(device).exists());
                    check_report(&ev.report, &rd).unwrap();
                }
                Err(e) => {
                    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR, "{e}");
                    assert_eq!(e.step(), Some(Step::Evidence));
                    assert!(e.message().starts_with(device), "{e}");
                    assert!(e.hint().is_some());
                }
            }
        }
        let none =
            !Path::new(sev_guest::DEVICE).exists() && !Path::new(sev_legacy::DEVICE).exists();
        match provider(&config("auto"), &http) {
            Ok(p) => assert!(!none && ["sev-guest", "sev-legacy"].contains(&p.name())),
            Err(e) => {
                assert!(none);
                assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
                assert!(e.hint().unwrap().contains("emulated"), "{e}");
            }
        };
    }

    #[test]
    fn maa_report_member_shape() {
        let m = maa_report_member(&[1, 2, 3], "PEM", Some(&[0xd2, 0x84]));
        let v: Value = serde_json::from_slice(&b64url_decode(&m).unwrap()).unwrap();
        assert_eq!(v["SnpReport"], "AQID");
        assert_eq!(
            b64url_decode(v["VcekCertChain"].as_str().unwrap()).unwrap(),
            b"PEM"
        );
        let e: Value =
            serde_json::from_slice(&b64url_decode(v["Endorsements"].as_str().unwrap()).unwrap())
                .unwrap();
        assert_eq!(e["Uvm"][0], "0oQ");
        let m = maa_report_member(&[1], "PEM", None);
        let v: Value = serde_json::from_slice(&b64url_decode(&m).unwrap()).unwrap();
        assert!(v.get("Endorsements").is_none());
    }
}
