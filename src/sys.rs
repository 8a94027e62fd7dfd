//! The system calls that need `unsafe` outside the C boundary, the key memory and the crypto
//! engine: the SEV-SNP report ioctls (/dev/sev-guest and the legacy /dev/sev) and syslog. Each is a small safe function whose
//! arguments make the call sound.

use std::ffi::CStr;

// ---- syslog (logging target "syslog") ----

/// openlog(3) with the module's ident, once per process.
pub fn syslog_open() {
    static OPEN: std::sync::Once = std::sync::Once::new();
    OPEN.call_once(|| {
        // SAFETY: static NUL-terminated ident that lives for the whole process.
        unsafe { libc::openlog(c"skr-pkcs11".as_ptr(), libc::LOG_PID, libc::LOG_USER) };
    });
}

/// syslog(3) of one line at `priority` (LOG_ERR, ...).
pub fn syslog(priority: libc::c_int, line: &CStr) {
    // SAFETY: constant format string with one NUL-terminated argument.
    unsafe { libc::syslog(priority, c"%s".as_ptr(), line.as_ptr()) };
}

// ---- SEV-SNP report ioctl of the legacy /dev/sev ----

/// `_IOWR('S', 0x1, struct sev_snp_guest_request)`.
const SEV_SNP_GUEST_MSG_REPORT: u32 = 0xC028_5301;
const MSG_REPORT_REQ: u8 = 5;
const MSG_REPORT_RSP: u8 = 6;
pub const REQUEST_LEN: usize = 96;
pub const RESPONSE_LEN: usize = 1280;

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

/// One SEV_SNP_GUEST_MSG_REPORT ioctl on the legacy `/dev/sev` (`release::evidence::sev_legacy`).
pub fn snp_report_ioctl(
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

// ---- SEV-SNP report ioctl of /dev/sev-guest (upstream driver, include/uapi/linux/sev-guest.h) ----

/// `_IOWR('S', 0x0, struct snp_guest_request_ioctl)`.
const SNP_GET_REPORT: u32 = 0xC020_5300;
/// `struct snp_report_resp`: the firmware's MSG_REPORT_RSP, padded to 4000 bytes.
pub const REPORT_RESP_LEN: usize = 4000;

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

/// One SNP_GET_REPORT ioctl on `/dev/sev-guest` (`release::evidence::sev_guest`); the request
/// is a `struct snp_report_req` (user data, VMPL, reserved: the same 96 bytes as /dev/sev's).
pub fn snp_get_report_ioctl(
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
