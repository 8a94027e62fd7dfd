//! `/dev/sev-guest` (upstream Linux SNP guest driver, `include/uapi/linux/sev-guest.h`):
//! `SNP_GET_REPORT`. Our own ioctl, as for legacy `/dev/sev`: the sev crate would bring RSA and
//! P-384 code (and RUSTSEC-2023-0071) into the module for one ioctl.

use super::sev_legacy::{parse_response, report_request, REQUEST_LEN, RESPONSE_LEN};
use super::{device_error, Evidence, EvidenceProvider};
use crate::error::Result;
use std::os::fd::AsRawFd;

pub const DEVICE: &str = "/dev/sev-guest";

/// `_IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
const SNP_GET_REPORT: u32 = 0xC020_5300;
/// `struct snp_report_resp`: the firmware's MSG_REPORT_RSP, padded to 4000 bytes.
const REPORT_RESP_LEN: usize = 4000;

/// `struct snp_guest_request_ioctl` (x86-64 layout, 32 bytes); `exitinfo2` is the union of
/// the firmware and VMM error codes.
#[repr(C)]
struct SnpGuestRequestIoctl {
    msg_version: u8,
    req_data: u64,
    resp_data: u64,
    exitinfo2: u64,
}

const _: () = assert!(std::mem::size_of::<SnpGuestRequestIoctl>() == 32);
// _IOWR('S', 0, 32 bytes): direction read|write, size, type 'S', number 0.
const _: () = assert!(SNP_GET_REPORT == (3 << 30) | (32 << 16) | ((b'S' as u32) << 8));
const _: () = assert!(std::mem::offset_of!(SnpGuestRequestIoctl, req_data) == 8);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequestIoctl, resp_data) == 16);
const _: () = assert!(std::mem::offset_of!(SnpGuestRequestIoctl, exitinfo2) == 24);

/// One SNP_GET_REPORT ioctl.
fn get_report_ioctl(
    fd: libc::c_int,
    request: &[u8; REQUEST_LEN],
    response: &mut [u8; REPORT_RESP_LEN],
) -> std::result::Result<(), String> {
    let mut msg = SnpGuestRequestIoctl {
        msg_version: 1,
        req_data: request.as_ptr() as u64,
        resp_data: response.as_mut_ptr() as u64,
        exitinfo2: 0,
    };
    // SAFETY: `fd` is an open descriptor; `msg` is a properly laid out snp_guest_request_ioctl
    // (size and offsets asserted above) that lives across the call; its pointers refer to a
    // 96-byte snp_report_req (only read) and a 4000-byte snp_report_resp (exclusively
    // borrowed), the sizes the driver copies, both outliving the call.
    let rc = unsafe {
        libc::ioctl(
            fd,
            SNP_GET_REPORT as _,
            &mut msg as *mut SnpGuestRequestIoctl,
        )
    };
    if rc != 0 {
        let os = std::io::Error::last_os_error();
        return Err(format!(
            "SNP_GET_REPORT ioctl failed: {os} (firmware error {:#x}, VMM error {:#x})",
            msg.exitinfo2 as u32,
            (msg.exitinfo2 >> 32) as u32
        ));
    }
    Ok(())
}

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
        get_report_ioctl(dev.as_raw_fd(), &request, &mut response)
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
        let e = get_report_ioctl(f.as_raw_fd(), &report_request(&[0; 64]), &mut rsp).unwrap_err();
        assert!(e.contains("SNP_GET_REPORT ioctl failed"), "{e}");
    }
}
