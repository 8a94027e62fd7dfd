//! `/dev/sev-guest` (upstream Linux SNP guest driver): `SNP_GET_REPORT`. Our own ioctl
//! (`crate::sys`), as for legacy `/dev/sev`: the sev crate would bring RSA and P-384 code (and
//! RUSTSEC-2023-0071) into the module for one ioctl.

use super::sev_legacy::{parse_response, report_request};
use super::{device_error, Evidence, EvidenceProvider};
use crate::error::Result;
use crate::sys::{snp_get_report_ioctl, REPORT_RESP_LEN, RESPONSE_LEN};
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/sev-guest";

pub struct SevGuestProvider;

impl EvidenceProvider for SevGuestProvider {
    fn name(&self) -> &'static str {
        "sev-guest"
    }

    fn get_report(&self, report_data: &[u8; 64]) -> Result<Evidence> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map_err(|e| device_error(DEVICE, format!("cannot open: {e}")))?;
        // Message version 1, VMPL 0 (release policies should require x-ms-sevsnpvm-vmpl = 0).
        let request = report_request(report_data);
        let mut response = [0u8; REPORT_RESP_LEN];
        snp_get_report_ioctl(dev.as_raw_fd(), &request, &mut response)
            .map_err(|e| device_error(DEVICE, e))?;
        let mut rsp = [0u8; RESPONSE_LEN];
        rsp.copy_from_slice(&response[..RESPONSE_LEN]);
        let report = parse_response(&rsp).map_err(|e| device_error(DEVICE, e))?;
        Ok(Evidence {
            report,
            vcek_chain_pem: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_report_on_a_non_sev_descriptor_fails_cleanly() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut rsp = [0u8; REPORT_RESP_LEN];
        let e =
            snp_get_report_ioctl(f.as_raw_fd(), &report_request(&[0; 64]), &mut rsp).unwrap_err();
        assert!(e.contains("SNP_GET_REPORT ioctl failed"), "{e}");
    }
}
