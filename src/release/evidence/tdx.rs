//! Read-only views of a TDX TDREPORT (the hardware report in a type-4 HCL report) and of a
//! DCAP v4 TD quote (what IMDS `/acc/tdquote` returns for it; platform-evidence §6.5, §8).
//! Only what the module displays and cross-checks is read: report data, MRTD, RTMRs. Quote
//! verification (PCK chain, TCB) is MAA's job. Pure: no I/O, every length checked.

use crate::error::{Error, Result, Step};

/// TDREPORT_STRUCT: REPORTMACSTRUCT (256) ‖ TEE_TCB_INFO (239) ‖ reserved (17) ‖ TDINFO (512).
pub const TDREPORT_LEN: usize = 1024;
/// REPORTMACSTRUCT.REPORTTYPE.TYPE for TDX.
const TDREPORT_TYPE_TDX: u8 = 0x81;
const TDREPORT_REPORTDATA: usize = 128;
/// TDINFO at 512: ATTRIBUTES (8), XFAM (8), MRTD (48), MRCONFIGID, MROWNER, MROWNERCONFIG,
/// RTMR[4] (48 each).
const TDREPORT_MRTD: usize = 512 + 16;
const TDREPORT_RTMR0: usize = TDREPORT_MRTD + 4 * 48;

/// DCAP quote v4: header (48) ‖ TD report body (584) ‖ u32 signature-data length ‖ data.
const QUOTE_HEADER_LEN: usize = 48;
const TD_BODY_LEN: usize = 584;
const QUOTE_SIG_LEN_OFFSET: usize = QUOTE_HEADER_LEN + TD_BODY_LEN;
const QUOTE_MIN_LEN: usize = QUOTE_SIG_LEN_OFFSET + 4;
const QUOTE_VERSION_4: u16 = 4;
const TEE_TYPE_TDX: u32 = 0x81;
/// Offsets in the TD report body (TDX DCAP quote library, sgx_report2_body_t).
const BODY_MRTD: usize = 136;
const BODY_RTMR0: usize = 328;
const BODY_REPORTDATA: usize = 520;

fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// A TDREPORT (at least 1024 bytes; the HCL slot pads it to 1184).
#[derive(Debug, Clone, Copy)]
pub struct TdReport<'a>(&'a [u8]);

impl<'a> TdReport<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<TdReport<'a>> {
        let bad = |what: String| Error::evidence(Step::Evidence, format!("TDREPORT: {what}"));
        if bytes.len() < TDREPORT_LEN {
            return Err(bad(format!(
                "{} bytes, expected at least {TDREPORT_LEN}",
                bytes.len()
            )));
        }
        if bytes[0] != TDREPORT_TYPE_TDX {
            return Err(bad(format!(
                "REPORTTYPE.TYPE is 0x{:02x}, expected 0x81 (TDX)",
                bytes[0]
            )));
        }
        Ok(TdReport(&bytes[..TDREPORT_LEN]))
    }
    pub fn bytes(&self) -> &'a [u8] {
        self.0
    }
    pub fn report_data(&self) -> &'a [u8] {
        &self.0[TDREPORT_REPORTDATA..TDREPORT_REPORTDATA + 64]
    }
    pub fn mrtd(&self) -> &'a [u8] {
        &self.0[TDREPORT_MRTD..TDREPORT_MRTD + 48]
    }
    pub fn rtmr(&self, i: usize) -> &'a [u8] {
        let off = TDREPORT_RTMR0 + 48 * i.min(3);
        &self.0[off..off + 48]
    }
}

/// A DCAP v4 TD quote.
#[derive(Debug, Clone, Copy)]
pub struct TdQuote<'a> {
    bytes: &'a [u8],
    signature_data_len: usize,
}

impl<'a> TdQuote<'a> {
    /// Version 4, TEE type 0x81 (TDX), signature data inside the input. IMDS pads the quote
    /// with zero bytes after the signature data (both published quotes: 70 bytes); anything
    /// else after it is refused rather than ignored.
    pub fn parse(bytes: &'a [u8]) -> Result<TdQuote<'a>> {
        let bad = |what: String| Error::evidence(Step::Evidence, format!("TD quote: {what}"));
        if bytes.len() < QUOTE_MIN_LEN {
            return Err(bad(format!(
                "{} bytes, shorter than a v4 header, TD report body and signature length ({QUOTE_MIN_LEN})",
                bytes.len()
            )));
        }
        let version = le_u16(bytes, 0);
        if version != QUOTE_VERSION_4 {
            return Err(bad(format!("version {version}, only version 4 is read")));
        }
        let tee_type = le_u32(bytes, 4);
        if tee_type != TEE_TYPE_TDX {
            return Err(bad(format!("TEE type 0x{tee_type:x}, expected 0x81 (TDX)")));
        }
        let signature_data_len = le_u32(bytes, QUOTE_SIG_LEN_OFFSET) as usize;
        let rest = bytes.len() - QUOTE_MIN_LEN;
        if signature_data_len > rest {
            return Err(bad(format!(
                "signature data length {signature_data_len} exceeds the {rest} bytes that follow"
            )));
        }
        if bytes[QUOTE_MIN_LEN + signature_data_len..]
            .iter()
            .any(|b| *b != 0)
        {
            return Err(bad("non-zero bytes after the signature data".into()));
        }
        Ok(TdQuote {
            bytes,
            signature_data_len,
        })
    }
    pub fn version(&self) -> u16 {
        le_u16(self.bytes, 0)
    }
    pub fn attestation_key_type(&self) -> u16 {
        le_u16(self.bytes, 2)
    }
    pub fn tee_type(&self) -> u32 {
        le_u32(self.bytes, 4)
    }
    pub fn signature_data_len(&self) -> usize {
        self.signature_data_len
    }
    fn body(&self) -> &'a [u8] {
        &self.bytes[QUOTE_HEADER_LEN..QUOTE_HEADER_LEN + TD_BODY_LEN]
    }
    pub fn report_data(&self) -> &'a [u8] {
        &self.body()[BODY_REPORTDATA..BODY_REPORTDATA + 64]
    }
    pub fn mrtd(&self) -> &'a [u8] {
        &self.body()[BODY_MRTD..BODY_MRTD + 48]
    }
    pub fn rtmr(&self, i: usize) -> &'a [u8] {
        let off = BODY_RTMR0 + 48 * i.min(3);
        &self.body()[off..off + 48]
    }

    /// The quote must carry the TDREPORT it was made from: same report data (the binding of
    /// the HCL claims) and the same MRTD.
    pub fn check_matches(&self, report: &TdReport<'_>) -> Result<()> {
        if self.report_data() != report.report_data() {
            return Err(Error::integrity(
                Step::Evidence,
                "TD quote REPORTDATA differs from the TDREPORT's: the quote was not made from this HCL report",
            ));
        }
        if self.mrtd() != report.mrtd() {
            return Err(Error::integrity(
                Step::Evidence,
                "TD quote MRTD differs from the TDREPORT's",
            ));
        }
        Ok(())
    }
}
