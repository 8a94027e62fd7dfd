//! TPMS_ATTEST (TPM 2.0 Part 2 §10.12): what `TPM2_Quote` and `TPM2_Certify` sign. Read here
//! to check a quote's nonce (extraData) and PCR digest, and a certify's certified name.
//! Big-endian throughout. Pure: no I/O, every length checked against the input, no panic.

use crate::crypto::HashAlg;
use crate::error::{Error, Result, Step};

/// TPM_GENERATED_VALUE: the TPM made this structure.
pub const TPM_GENERATED: u32 = 0xff54_4347;
pub const TPM_ST_ATTEST_CERTIFY: u16 = 0x8017;
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
pub const TPM_ALG_SHA256: u16 = 0x000b;
/// TPML_PCR_SELECTION holds at most one entry per hash algorithm (HASH_COUNT), and a
/// selection bitmap is at most PCR_SELECT_MAX bytes; both generous bounds.
const MAX_PCR_SELECTIONS: u32 = 16;
const MAX_PCR_SELECT_BYTES: u8 = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pub hash_alg: u16,
    /// Bitmap: bit i of byte j selects PCR 8·j + i.
    pub select: Vec<u8>,
}

impl PcrSelection {
    pub fn indices(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (j, byte) in self.select.iter().enumerate() {
            for i in 0..8 {
                if byte & (1 << i) != 0 {
                    out.push(8 * j as u32 + i);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    Quote {
        pcr_select: Vec<PcrSelection>,
        pcr_digest: Vec<u8>,
    },
    Certify {
        name: Vec<u8>,
        qualified_name: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmsAttest {
    pub attest_type: u16,
    pub qualified_signer: Vec<u8>,
    /// The caller's qualifyingData: the nonce of a quote.
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
    pub firmware_version: u64,
    pub attested: Attested,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let end = end.ok_or_else(|| bad(format!("truncated in {what}")))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    /// A TPM2B: u16 size, then that many bytes.
    fn tpm2b(&mut self, what: &str) -> Result<Vec<u8>> {
        let n = self.u16(what)? as usize;
        Ok(self.take(n, what)?.to_vec())
    }
}

fn bad(what: impl Into<String>) -> Error {
    Error::evidence(Step::Evidence, format!("TPMS_ATTEST: {}", what.into()))
}

impl TpmsAttest {
    /// Parse the whole input as one TPMS_ATTEST (quote or certify); trailing bytes are refused.
    pub fn parse(bytes: &[u8]) -> Result<TpmsAttest> {
        let mut r = Reader { b: bytes, at: 0 };
        let magic = r.u32("magic")?;
        if magic != TPM_GENERATED {
            return Err(bad(format!(
                "magic 0x{magic:08x}, expected 0xff544347 (TPM_GENERATED_VALUE)"
            )));
        }
        let attest_type = r.u16("type")?;
        let qualified_signer = r.tpm2b("qualifiedSigner")?;
        let extra_data = r.tpm2b("extraData")?;
        let clock = r.u64("clockInfo")?;
        let reset_count = r.u32("clockInfo")?;
        let restart_count = r.u32("clockInfo")?;
        let safe = match r.u8("clockInfo")? {
            0 => false,
            1 => true,
            other => return Err(bad(format!("clockInfo.safe is {other}, not 0 or 1"))),
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let attested = match attest_type {
            TPM_ST_ATTEST_QUOTE => {
                let count = r.u32("pcrSelect")?;
                if count > MAX_PCR_SELECTIONS {
                    return Err(bad(format!("{count} PCR selections")));
                }
                let mut pcr_select = Vec::new();
                for _ in 0..count {
                    let hash_alg = r.u16("pcrSelect")?;
                    let n = r.u8("pcrSelect")?;
                    if n > MAX_PCR_SELECT_BYTES {
                        return Err(bad(format!("a PCR selection of {n} bytes")));
                    }
                    let select = r.take(n as usize, "pcrSelect")?.to_vec();
                    pcr_select.push(PcrSelection { hash_alg, select });
                }
                let pcr_digest = r.tpm2b("pcrDigest")?;
                Attested::Quote {
                    pcr_select,
                    pcr_digest,
                }
            }
            TPM_ST_ATTEST_CERTIFY => Attested::Certify {
                name: r.tpm2b("certifyInfo.name")?,
                qualified_name: r.tpm2b("certifyInfo.qualifiedName")?,
            },
            other => {
                return Err(bad(format!(
                    "type 0x{other:04x} is neither a quote (0x8018) nor a certify (0x8017)"
                )))
            }
        };
        if r.at != bytes.len() {
            return Err(bad(format!(
                "{} bytes after the structure",
                bytes.len() - r.at
            )));
        }
        Ok(TpmsAttest {
            attest_type,
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            attested,
        })
    }

    /// For a quote over SHA-256 PCRs only: check that `pcr_digest` = SHA-256 of the selected
    /// PCR values concatenated in index order. `pcrs[i]` is the SHA-256 value of PCR i.
    pub fn check_pcr_digest(&self, pcrs: &[[u8; 32]]) -> Result<Vec<u32>> {
        let Attested::Quote {
            pcr_select,
            pcr_digest,
        } = &self.attested
        else {
            return Err(bad("not a quote"));
        };
        let mut indices = Vec::new();
        for sel in pcr_select {
            if sel.hash_alg != TPM_ALG_SHA256 {
                return Err(bad(format!(
                    "PCR bank 0x{:04x} selected; only SHA-256 is checked",
                    sel.hash_alg
                )));
            }
            indices.extend(sel.indices());
        }
        let mut h = crate::crypto::Hasher::new(HashAlg::Sha256);
        for i in &indices {
            let v = pcrs
                .get(*i as usize)
                .ok_or_else(|| bad(format!("PCR {i} is selected but its value is not given")))?;
            h.update(v);
        }
        if h.finish() != *pcr_digest {
            return Err(Error::integrity(
                Step::Evidence,
                "TPM quote: the PCR digest does not match the PCR values",
            ));
        }
        Ok(indices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quote TPMS_ATTEST over SHA-256 PCRs 0..7 with nonce `nonce`.
    fn quote(nonce: &[u8], digest: &[u8]) -> Vec<u8> {
        let mut b = TPM_GENERATED.to_be_bytes().to_vec();
        b.extend(TPM_ST_ATTEST_QUOTE.to_be_bytes());
        b.extend(2u16.to_be_bytes());
        b.extend([0x00, 0x0b]); // qualifiedSigner: a 2-byte name
        b.extend((nonce.len() as u16).to_be_bytes());
        b.extend(nonce);
        b.extend(7u64.to_be_bytes()); // clock
        b.extend(1u32.to_be_bytes()); // resetCount
        b.extend(2u32.to_be_bytes()); // restartCount
        b.push(1); // safe
        b.extend(0x2023_0101u64.to_be_bytes());
        b.extend(1u32.to_be_bytes());
        b.extend(TPM_ALG_SHA256.to_be_bytes());
        b.extend([3, 0xff, 0, 0]);
        b.extend((digest.len() as u16).to_be_bytes());
        b.extend(digest);
        b
    }

    #[test]
    fn quote_fields_and_pcr_digest() {
        let pcrs: Vec<[u8; 32]> = (0..24u8).map(|i| [i; 32]).collect();
        let mut h = crate::crypto::Hasher::new(HashAlg::Sha256);
        for p in &pcrs[..8] {
            h.update(p);
        }
        let a = TpmsAttest::parse(&quote(b"nonce", &h.finish())).unwrap();
        assert_eq!(a.extra_data, b"nonce");
        assert_eq!(
            (a.clock, a.reset_count, a.restart_count, a.safe),
            (7, 1, 2, true)
        );
        assert_eq!(
            a.check_pcr_digest(&pcrs).unwrap(),
            (0..8).collect::<Vec<_>>()
        );
        assert!(a
            .check_pcr_digest(&pcrs[..5])
            .unwrap_err()
            .message()
            .contains("PCR 5"));
        let wrong = TpmsAttest::parse(&quote(b"nonce", &[0; 32])).unwrap();
        assert!(wrong
            .check_pcr_digest(&pcrs)
            .unwrap_err()
            .message()
            .contains("does not match"));
    }

    #[test]
    fn malformed_attests_are_refused_and_never_panic() {
        let good = quote(b"n", &[0; 32]);
        let msg = |b: &[u8]| TpmsAttest::parse(b).unwrap_err().message().to_string();
        let mut b = good.clone();
        b[0] = 0;
        assert!(msg(&b).contains("magic"));
        let mut b = good.clone();
        b[5] = 0x19;
        assert!(msg(&b).contains("type 0x8019"));
        let mut b = good.clone();
        b.push(0);
        assert!(msg(&b).contains("1 bytes after"));
        assert!(msg(&good[..good.len() - 1]).contains("truncated in pcrDigest"));
        for n in 0..good.len() {
            assert!(TpmsAttest::parse(&good[..n]).is_err());
        }
        for at in 0..good.len() {
            let mut b = good.clone();
            b[at] = 0xff;
            let _ = TpmsAttest::parse(&b);
        }
    }
}
