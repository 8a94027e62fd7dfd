//! skr-emulator's simulated SEV-SNP platform (docs/EMULATOR.md): development and tests only.

use super::{Evidence, EvidenceProvider};
use crate::error::{Error, Result, Step};
use crate::release::http::Http;
use crate::release::{b64url, b64url_decode};
use serde_json::{json, Value};

pub struct EmulatedProvider<'a> {
    http: &'a Http,
    url: String,
}

impl<'a> EmulatedProvider<'a> {
    pub fn new(http: &'a Http, base_url: String) -> Self {
        EmulatedProvider {
            http,
            url: format!("{}/platform/snp/report", base_url.trim_end_matches('/')),
        }
    }
}

impl EvidenceProvider for EmulatedProvider<'_> {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn get_report(&self, report_data: &[u8; 64]) -> Result<Evidence> {
        let body = json!({ "report_data": b64url(report_data) });
        let resp = self
            .http
            .send(Step::Evidence, "emulated SNP platform", &|| {
                self.http.client_for(&self.url).post(&self.url).json(&body)
            })?;
        if !resp.is_success() {
            return Err(Error::evidence(
                Step::Evidence,
                format!(
                    "emulated SNP platform {} answered {}: {}",
                    self.url,
                    resp.status,
                    resp.error_text()
                ),
            )
            .with_hint("check platform.emulator_url and that skr-emulator is running"));
        }
        parse_platform_response(&resp.body)
    }
}

/// The emulated platform's answer: `{"report": base64url, "vcek_cert_chain": PEM}`.
pub fn parse_platform_response(body: &[u8]) -> Result<Evidence> {
    let bad = |what: &str| {
        Error::integrity(
            Step::Evidence,
            format!("emulated SNP platform response: {what}"),
        )
    };
    let v: Value = serde_json::from_slice(body).map_err(|_| bad("not JSON"))?;
    let report = v
        .get("report")
        .and_then(Value::as_str)
        .and_then(b64url_decode)
        .ok_or_else(|| bad("no base64url report"))?;
    let chain = v
        .get("vcek_cert_chain")
        .and_then(Value::as_str)
        .filter(|c| c.contains("BEGIN CERTIFICATE"))
        .ok_or_else(|| bad("no PEM vcek_cert_chain"))?;
    Ok(Evidence {
        report,
        vcek_chain_pem: Some(chain.to_string()),
    })
}
