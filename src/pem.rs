//! PEM certificate files (a key's `certificate`, `tls.ca_file`). The blocks are read by
//! rustls-pki-types' PEM reader (one pass over the lines, fuzzed upstream), then each block's
//! DER is decoded on its own. x509-cert's PEM reader is never given input: it loops forever on
//! a truncated block such as `MIIB` between the BEGIN and END lines.

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::CertificateDer;

/// The DER of every CERTIFICATE block of `text`, in file order (other blocks, e.g. a private
/// key, are skipped). The error says what is wrong, for a log line that names the file.
pub fn certificates(text: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for block in CertificateDer::pem_slice_iter(text) {
        let der = block.map_err(|e| {
            let what = describe(&e);
            match out.len() {
                0 => what,
                n => format!("{what} (after {n} good certificate block(s))"),
            }
        })?;
        out.push(der);
    }
    if out.is_empty() {
        return Err("no -----BEGIN CERTIFICATE----- block".into());
    }
    Ok(out)
}

/// rustls-pki-types prints labels and lines as byte arrays; say it in words.
fn describe(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            let label: String = String::from_utf8_lossy(end_marker)
                .chars()
                .take(40)
                .collect();
            format!("a -----BEGIN {label}----- block has no -----END {label}----- line")
        }
        pem::Error::IllegalSectionStart { .. } => {
            "a -----BEGIN line is malformed (it must end in five dashes)".into()
        }
        pem::Error::Base64Decode(_) => "a block's body is not valid base64".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_CERT: &str = include_str!("../testdata/aci/uvm_host_amd_certificate.pem");

    #[test]
    fn a_real_chain_gives_every_certificate_in_order() {
        let certs = certificates(ONE_CERT.as_bytes()).unwrap();
        assert_eq!(certs.len(), ONE_CERT.matches("BEGIN CERTIFICATE").count());
        for der in &certs {
            assert_eq!(der[0], 0x30, "a DER SEQUENCE");
        }
    }

    #[test]
    fn a_truncated_block_is_returned_as_its_few_bytes() {
        // The input that made x509-cert's reader spin (issue 11): three DER bytes.
        let certs = certificates(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
            .unwrap();
        assert_eq!(certs, vec![CertificateDer::from(vec![0x30, 0x82, 0x01])]);
    }

    #[test]
    fn broken_files_are_described_in_words() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "no -----BEGIN CERTIFICATE----- block"),
            (b"hello\n", "no -----BEGIN CERTIFICATE----- block"),
            (
                b"-----BEGIN CERTIFICATE-----\nMIIB\n",
                "has no -----END CERTIFICATE----- line",
            ),
            (
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "not valid base64",
            ),
            (b"-----BEGIN CERTIFICATE--\n", "malformed"),
        ];
        for (input, needle) in cases {
            let e = certificates(input).unwrap_err();
            assert!(e.contains(needle), "{e:?} for {input:?}");
        }
    }

    #[test]
    fn an_error_after_good_blocks_says_how_many_were_good() {
        let text = format!("{ONE_CERT}\n-----BEGIN CERTIFICATE-----\nMIIB\n");
        let e = certificates(text.as_bytes()).unwrap_err();
        let good = ONE_CERT.matches("BEGIN CERTIFICATE").count();
        assert!(e.contains(&format!("after {good} good")), "{e}");
    }
}
