//! Legacy `/dev/sev` of the 5.15 Hyper-V kernels of Confidential ACI (platform-evidence §1.2):
//! `SEV_SNP_GUEST_MSG_REPORT`, a 40-byte request struct the sev crate does not support.

use super::{device_error, Evidence, EvidenceProvider, REPORT_LEN};
use crate::error::Result;
use crate::sys::{snp_report_ioctl, REQUEST_LEN, RESPONSE_LEN};
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/sev";

/// The report starts after status, report_size and 24 reserved bytes.
const REPORT_OFFSET: usize = 32;

pub struct SevLegacyProvider;

/// The MSG_REPORT_REQ: user data, VMPL 0, reserved zero (also `struct snp_report_req` of
/// /dev/sev-guest).
pub(super) fn report_request(report_data: &[u8; 64]) -> [u8; REQUEST_LEN] {
    let mut req = [0u8; REQUEST_LEN];
    req[..64].copy_from_slice(report_data);
    req
}

/// Check the MSG_REPORT_RSP and take the report out of it.
pub(crate) fn parse_response(rsp: &[u8; RESPONSE_LEN]) -> std::result::Result<Vec<u8>, String> {
    let status = u32::from_le_bytes(rsp[0..4].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(rsp[4..8].try_into().expect("4 bytes")) as usize;
    if status != 0 {
        return Err(format!("firmware status {status:#x} in MSG_REPORT_RSP"));
    }
    if size != REPORT_LEN {
        return Err(format!(
            "MSG_REPORT_RSP report size {size}, expected {REPORT_LEN}"
        ));
    }
    Ok(rsp[REPORT_OFFSET..REPORT_OFFSET + REPORT_LEN].to_vec())
}

impl EvidenceProvider for SevLegacyProvider {
    fn name(&self) -> &'static str {
        "sev-legacy"
    }

    fn get_report(&self, report_data: &[u8; 64]) -> Result<Evidence> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map_err(|e| device_error(DEVICE, format!("cannot open: {e}")))?;
        let request = report_request(report_data);
        let mut response = [0u8; RESPONSE_LEN];
        snp_report_ioctl(dev.as_raw_fd(), &request, &mut response)
            .map_err(|e| device_error(DEVICE, e))?;
        let report = parse_response(&response).map_err(|e| device_error(DEVICE, e))?;
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
    fn request_and_response_framing() {
        let rd = [7u8; 64];
        let req = report_request(&rd);
        assert_eq!(&req[..64], &rd);
        assert!(req[64..].iter().all(|&b| b == 0)); // VMPL 0, reserved zero
        let report = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/aci/snp_report.bin"
        ))
        .unwrap();
        let mut rsp = [0u8; RESPONSE_LEN];
        rsp[4..8].copy_from_slice(&(REPORT_LEN as u32).to_le_bytes());
        rsp[32..32 + REPORT_LEN].copy_from_slice(&report);
        assert_eq!(parse_response(&rsp).unwrap(), report);
        rsp[0] = 0x16; // INVALID_PARAM
        assert!(parse_response(&rsp).unwrap_err().contains("0x16"));
        rsp[0] = 0;
        rsp[4] = 0;
        assert!(parse_response(&rsp).is_err());
    }

    #[test]
    fn ioctl_on_a_non_sev_descriptor_fails_cleanly() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut rsp = [0u8; RESPONSE_LEN];
        let e = snp_report_ioctl(f.as_raw_fd(), &report_request(&[0; 64]), &mut rsp).unwrap_err();
        assert!(e.contains("ioctl failed"), "{e}");
    }
}
