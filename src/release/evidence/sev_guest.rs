//! `/dev/sev-guest` (upstream Linux SNP guest driver) through the sev crate.

use super::{device_error, Evidence, EvidenceProvider};
use crate::error::Result;

pub const DEVICE: &str = "/dev/sev-guest";

pub struct SevGuestProvider;

impl EvidenceProvider for SevGuestProvider {
    fn name(&self) -> &'static str {
        "sev-guest"
    }

    fn get_report(&self, report_data: &[u8; 64]) -> Result<Evidence> {
        let mut fw = sev::firmware::guest::Firmware::open()
            .map_err(|e| device_error(DEVICE, format!("cannot open: {e}")))?;
        // Message version 1; VMPL 0 explicitly (the crate's default request uses VMPL 1, and
        // release policies should require x-ms-sevsnpvm-vmpl = 0).
        let report = fw
            .get_report(Some(1), Some(*report_data), Some(0))
            .map_err(|e| device_error(DEVICE, format!("SNP_GET_REPORT failed: {e}")))?;
        Ok(Evidence {
            report,
            vcek_chain_pem: None,
        })
    }
}
