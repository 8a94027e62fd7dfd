//! Legacy `/dev/sev` of the 5.15 Hyper-V kernels of Confidential ACI (platform-evidence §1.2):
//! `SEV_SNP_GUEST_MSG_REPORT`, a 40-byte request struct the sev crate does not support.

use super::{device_error, Evidence, EvidenceProvider, REPORT_LEN};
use crate::error::Result;
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/sev";

/// `_IOWR('S', 0x1, struct sev_snp_guest_request)`.
const SEV_SNP_GUEST_MSG_REPORT: u32 = 0xC028_5301;
const MSG_REPORT_REQ: u8 = 5;
const MSG_REPORT_RSP: u8 = 6;
pub(super) const REQUEST_LEN: usize = 96;
pub(super) const RESPONSE_LEN: usize = 1280;
/// The report starts after status, report_size and 24 reserved bytes.
const REPORT_OFFSET: usize = 32;

/// `struct sev_snp_guest_request` (SysV x86-64 layout, 40 bytes).
#[repr(C)]
struct SnpGuestRequest {
    req_msg_type: u8,
    rsp_msg_type: u8,
    msg_version: u8,
    request_len: u16,
    request_uaddr: u64,
    response_len: u16,
    response_uaddr: u64,
    error: u32,
}

const _: () = assert!(std::mem::size_of::<SnpGuestRequest>() == 40);
// _IOWR('S', 1, 40 bytes): direction read|write, size, type 'S', number 1.
const _: () =
    assert!(SEV_SNP_GUEST_MSG_REPORT == (3 << 30) | (40 << 16) | ((b'S' as u32) << 8) | 1);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequest, request_len) == 4);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequest, request_uaddr) == 8);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequest, response_len) == 16);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequest, response_uaddr) == 24);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequest, error) == 32);

pub struct SevLegacyProvider;

/// The MSG_REPORT_REQ: user data, VMPL 0, reserved zero (also `struct snp_report_req` of
/// /dev/sev-guest).
pub(super) fn report_request(report_data: &[u8; 64]) -> [u8; REQUEST_LEN] {
    let mut req = [0u8; REQUEST_LEN];
    req[..64].copy_from_slice(report_data);
    req
}

/// Check the MSG_REPORT_RSP and take the report out of it.
pub(super) fn parse_response(rsp: &[u8; RESPONSE_LEN]) -> std::result::Result<Vec<u8>, String> {
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

/// One SEV_SNP_GUEST_MSG_REPORT ioctl. The only unsafe code of the release path.
fn snp_report_ioctl(
    fd: libc::c_int,
    request: &[u8; REQUEST_LEN],
    response: &mut [u8; RESPONSE_LEN],
) -> std::result::Result<(), String> {
    let mut msg = SnpGuestRequest {
        req_msg_type: MSG_REPORT_REQ,
        rsp_msg_type: MSG_REPORT_RSP,
        msg_version: 1,
        request_len: REQUEST_LEN as u16,
        request_uaddr: request.as_ptr() as u64,
        response_len: RESPONSE_LEN as u16,
        response_uaddr: response.as_mut_ptr() as u64,
        error: 0,
    };
    // SAFETY: `fd` is an open descriptor of /dev/sev; `msg` is a properly laid out
    // sev_snp_guest_request (size and offsets asserted above) that lives across the call;
    // its two pointers refer to buffers of exactly the lengths it declares, which outlive the
    // call, the request buffer only read and the response buffer exclusively borrowed.
    let rc = unsafe {
        libc::ioctl(
            fd,
            SEV_SNP_GUEST_MSG_REPORT as _,
            &mut msg as *mut SnpGuestRequest,
        )
    };
    if rc != 0 {
        let os = std::io::Error::last_os_error();
        return Err(format!(
            "SEV_SNP_GUEST_MSG_REPORT ioctl failed: {os} (firmware error {:#x})",
            msg.error
        ));
    }
    Ok(())
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
