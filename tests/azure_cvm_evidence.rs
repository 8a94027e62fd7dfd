//! Real Azure confidential-VM artifacts (issue 8 item 6; testdata/SOURCES.md): every published
//! HCL report parses and binds its runtime claims; the SNP reports inside verify with their
//! VCEKs, and the VCEKs chain to AMD's roots (checked with RustCrypto `rsa`, independent of the
//! module); the published TPM quote verifies with its AK; a TD quote carries its TDREPORT's
//! report data; the Trustee az-snp-vtpm evidence bundles decode and hold together.

use rsa::pkcs8::DecodePublicKey;
use serde_json::Value;
use sha2::Digest;
use skr_pkcs11::crypto::evidence_sig::verify_rsa_pkcs1_sha256;
use skr_pkcs11::release::b64url_decode;
use skr_pkcs11::release::evidence::hcl::{HardwareReport, HardwareReportType, HclReport};
use skr_pkcs11::release::evidence::show::describe;
use skr_pkcs11::release::evidence::tdx::TdQuote;
use skr_pkcs11::release::evidence::tpm_attest::{Attested, TpmsAttest, TPM_ST_ATTEST_QUOTE};
use std::path::PathBuf;
use x509_cert::der::{Decode, DecodePem, Encode};
use x509_cert::Certificate;

fn path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn pem_certs(rel: &str) -> Vec<Certificate> {
    Certificate::load_pem_chain(&read(rel)).unwrap()
}

/// `child` is signed by `issuer` with RSA-PSS / SHA-384, salt 48 (AMD's ARK → ASK → VCEK).
fn amd_signed_by(child: &Certificate, issuer: &Certificate) -> bool {
    let spki = issuer
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .unwrap();
    let key = rsa::RsaPublicKey::from_public_key_der(&spki).unwrap();
    let tbs = child.tbs_certificate.to_der().unwrap();
    let hash = sha2::Sha384::digest(&tbs);
    key.verify(
        rsa::Pss::new::<sha2::Sha384>(),
        &hash,
        child.signature.raw_bytes(),
    )
    .is_ok()
}

fn cn(cert: &Certificate) -> String {
    cert.tbs_certificate.subject.to_string()
}

/// VCEK ← ASK ← ARK, ARK self-signed; returns the VCEK's DER.
fn check_amd_chain(vcek: &Certificate, ask: &Certificate, ark: &Certificate) -> Vec<u8> {
    assert!(cn(vcek).contains("SEV-VCEK"), "{}", cn(vcek));
    assert!(cn(ask).contains("SEV-"), "{}", cn(ask));
    assert!(cn(ark).contains("ARK-"), "{}", cn(ark));
    assert!(amd_signed_by(ark, ark), "ARK self-signature");
    assert!(amd_signed_by(ask, ark), "ARK → ASK");
    assert!(amd_signed_by(vcek, ask), "ASK → VCEK");
    assert!(
        !amd_signed_by(vcek, ark),
        "the VCEK is not signed by the ARK directly"
    );
    vcek.to_der().unwrap()
}

const HCL_FILES: [(&str, HardwareReportType, u32, bool); 5] = [
    // (file, type, header version, has user-data)
    (
        "azure-cvm/hcl/kinvolk-snp-v1-2048.bin",
        HardwareReportType::Snp,
        1,
        false,
    ),
    (
        "azure-cvm/hcl/trustee-snp-v1-2600.bin",
        HardwareReportType::Snp,
        1,
        true,
    ),
    (
        "azure-cvm/hcl/kinvolk-tdx-v2-2600.bin",
        HardwareReportType::Tdx,
        2,
        true,
    ),
    (
        "azure-cvm/hcl/trustee-tdx-v2-2600.bin",
        HardwareReportType::Tdx,
        2,
        true,
    ),
    (
        "azure-cvm/hcl/cvm-attestation-tools-tdx-v2-2600.bin",
        HardwareReportType::Tdx,
        2,
        true,
    ),
];

#[test]
fn every_published_hcl_report_parses_and_binds_its_claims() {
    for (file, kind, version, has_user_data) in HCL_FILES {
        let bytes = read(file);
        let h = HclReport::parse(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(h.report_type, kind, "{file}");
        assert_eq!(h.version, version, "{file}");
        assert_eq!(h.request_type, 2, "{file}");
        assert_eq!(h.report_size as usize, 1236 + h.claims_json.len(), "{file}");
        assert!(h.binding_ok(), "{file}");
        h.check_binding().unwrap();
        // The binding, recomputed independently.
        let digest = sha2::Sha256::digest(h.claims_json);
        assert_eq!(&h.hardware.report_data()[..32], &digest[..], "{file}");
        assert_eq!(&h.hardware.report_data()[32..], &[0u8; 32], "{file}");
        // HCLAkPub is an RSA-2048 key; HCLEkPub in all but the oldest sample.
        let ak = h.claims.key("HCLAkPub").unwrap();
        assert_eq!(ak.rsa.as_ref().unwrap().0.len(), 256, "{file}");
        assert_eq!(h.claims.key("HCLEkPub").is_some(), has_user_data, "{file}");
        assert_eq!(h.claims.user_data.is_some(), has_user_data, "{file}");
        assert!(h.claims.vm_configuration.is_some(), "{file}");
        match (kind, &h.hardware) {
            (HardwareReportType::Snp, HardwareReport::Snp(r)) => assert_eq!(r.vmpl(), 0),
            (HardwareReportType::Tdx, HardwareReport::Tdx(_)) => {}
            _ => panic!("{file}: hardware report of the wrong kind"),
        }
        // A changed report-data byte breaks the binding (the structure still parses).
        let mut tampered = bytes.clone();
        let report_data_at = 32
            + if kind == HardwareReportType::Snp {
                0x50
            } else {
                128
            };
        tampered[report_data_at] ^= 1;
        let t = HclReport::parse(&tampered).unwrap();
        assert!(!t.binding_ok(), "{file}");
        assert!(t
            .check_binding()
            .unwrap_err()
            .message()
            .contains("not bound"));
    }
}

#[test]
fn hcl_snp_report_verifies_with_the_published_vcek_chain() {
    let chain = pem_certs("azure-cvm/trustee-snp-vcek-chain.pem");
    assert_eq!(chain.len(), 3);
    let vcek = check_amd_chain(&chain[0], &chain[1], &chain[2]);
    let bytes = read("azure-cvm/hcl/trustee-snp-v1-2600.bin");
    let h = HclReport::parse(&bytes).unwrap();
    let HardwareReport::Snp(report) = h.hardware else {
        panic!("not SNP")
    };
    report.verify_signature(&vcek).unwrap();

    // Kinvolk's chain is a real, valid Milan chain, but for a chip whose report is not
    // published: the 2048-byte Kinvolk report must not verify with it (SOURCES.md).
    let kin = pem_certs("azure-cvm/kinvolk-certs.pem");
    let kin_vcek = check_amd_chain(&kin[0], &kin[1], &kin[2]);
    let bytes = read("azure-cvm/hcl/kinvolk-snp-v1-2048.bin");
    let h = HclReport::parse(&bytes).unwrap();
    let HardwareReport::Snp(report) = h.hardware else {
        panic!("not SNP")
    };
    assert!(report
        .verify_signature(&kin_vcek)
        .unwrap_err()
        .message()
        .contains("does not verify"));
}

/// Kinvolk's serialised `Quote`: u64-LE length ‖ signature, u64-LE length ‖ TPMS_ATTEST,
/// u64-LE count ‖ count × 32-byte PCR values (SOURCES.md).
fn kinvolk_quote(bytes: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<[u8; 32]>) {
    fn u64_at(bytes: &[u8], at: &mut usize) -> usize {
        let n = u64::from_le_bytes(bytes[*at..*at + 8].try_into().unwrap()) as usize;
        *at += 8;
        n
    }
    let mut at = 0usize;
    let n = u64_at(bytes, &mut at);
    let sig = bytes[at..at + n].to_vec();
    at += n;
    let n = u64_at(bytes, &mut at);
    let msg = bytes[at..at + n].to_vec();
    at += n;
    let count = u64_at(bytes, &mut at);
    assert_eq!(
        at + 32 * count,
        bytes.len(),
        "the layout accounts for every byte"
    );
    let pcrs: Vec<[u8; 32]> = bytes[at..]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap())
        .collect();
    (sig, msg, pcrs)
}

#[test]
fn published_tpm_quote_verifies_with_its_ak_and_reads_nonce_and_pcrs() {
    let (sig, msg, pcrs) = kinvolk_quote(&read("azure-cvm/tpm/kinvolk-quote.bin"));
    assert_eq!((sig.len(), msg.len(), pcrs.len()), (256, 122, 24));

    // The module's check (aws-lc) with n, e from the PEM, and RustCrypto's as a second opinion.
    let pem = String::from_utf8(read("azure-cvm/tpm/kinvolk-akpub.pem")).unwrap();
    let ak = rsa::RsaPublicKey::from_public_key_pem(&pem).unwrap();
    use rsa::traits::PublicKeyParts;
    let (n, e) = (ak.n().to_bytes_be(), ak.e().to_bytes_be());
    verify_rsa_pkcs1_sha256(&n, &e, &msg, &sig).unwrap();
    ak.verify(
        rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
        &sha2::Sha256::digest(&msg),
        &sig,
    )
    .unwrap();
    let mut bad = msg.clone();
    bad[20] ^= 1;
    assert!(verify_rsa_pkcs1_sha256(&n, &e, &bad, &sig).is_err());

    let attest = TpmsAttest::parse(&msg).unwrap();
    assert_eq!(attest.attest_type, TPM_ST_ATTEST_QUOTE);
    assert_eq!(attest.extra_data, b"challenge");
    let indices = attest.check_pcr_digest(&pcrs).unwrap();
    assert_eq!(indices, (0..24).collect::<Vec<u32>>());
    let Attested::Quote { pcr_digest, .. } = &attest.attested else {
        panic!("not a quote")
    };
    // The digest, recomputed independently.
    let mut h = sha2::Sha256::new();
    for p in &pcrs {
        h.update(p);
    }
    assert_eq!(&h.finalize()[..], &pcr_digest[..]);
    // A changed PCR value no longer matches.
    let mut other = pcrs.clone();
    other[7][0] ^= 1;
    assert!(attest.check_pcr_digest(&other).is_err());
}

#[test]
fn td_quote_carries_the_report_data_of_its_tdreport() {
    let hcl = read("azure-cvm/hcl/trustee-tdx-v2-2600.bin");
    let h = HclReport::parse(&hcl).unwrap();
    let HardwareReport::Tdx(tdreport) = h.hardware else {
        panic!("not TDX")
    };
    let quote_bytes = read("azure-cvm/tdx/trustee-td-quote-v4.bin");
    let quote = TdQuote::parse(&quote_bytes).unwrap();
    assert_eq!((quote.version(), quote.attestation_key_type()), (4, 2));
    assert_eq!(quote.tee_type(), 0x81);
    assert_eq!(quote.signature_data_len(), 4300);
    quote.check_matches(&tdreport).unwrap();
    assert_eq!(quote.report_data(), tdreport.report_data());
    assert_eq!(quote.mrtd(), tdreport.mrtd());
    for i in 0..4 {
        assert_eq!(quote.rtmr(i), tdreport.rtmr(i), "RTMR{i}");
    }
    // The other published quote is from another machine: it parses but does not match.
    let other_bytes = read("azure-cvm/tdx/cvm-attestation-tools-td-quote-v4.dat");
    let other = TdQuote::parse(&other_bytes).unwrap();
    assert!(other
        .check_matches(&tdreport)
        .unwrap_err()
        .message()
        .contains("REPORTDATA"));
    // Non-zero bytes after the signature data are refused, a short quote too.
    let mut padded = quote_bytes.clone();
    *padded.last_mut().unwrap() = 1;
    assert!(TdQuote::parse(&padded)
        .unwrap_err()
        .message()
        .contains("after the signature data"));
    assert!(TdQuote::parse(&quote_bytes[..4000])
        .unwrap_err()
        .message()
        .contains("exceeds"));
}

#[test]
fn standalone_runtime_claims_parse() {
    let claims = skr_pkcs11::release::evidence::hcl::parse_runtime_claims(&read(
        "azure-cvm/tpm/kinvolk-runtime-claims.json",
    ))
    .unwrap();
    assert!(claims.key("HCLAkPub").is_some() && claims.key("HCLEkPub").is_some());
    assert!(claims.user_data.is_some());
}

fn hex_bytes(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

fn byte_array(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| u8::try_from(b.as_u64().unwrap()).unwrap())
        .collect()
}

/// Everything an az-snp-vtpm verifier checks (platform-evidence §9), on one bundle.
fn check_bundle(
    hcl: &[u8],
    vcek_der: &[u8],
    roots: &str,
    sig: &[u8],
    msg: &[u8],
    pcrs: &[[u8; 32]],
) -> TpmsAttest {
    let h = HclReport::parse(hcl).unwrap();
    h.check_binding().unwrap();
    let HardwareReport::Snp(report) = h.hardware else {
        panic!("not SNP")
    };
    assert_eq!(report.version(), 3);
    assert_eq!(report.vmpl(), 0);
    report.verify_signature(vcek_der).unwrap();
    let vcek = Certificate::from_der(vcek_der).unwrap();
    let roots = pem_certs(roots);
    // ASK, ARK, ASVK.
    check_amd_chain(&vcek, &roots[0], &roots[1]);
    // The quote is signed by HCLAkPub, the AK the hardware report binds.
    let (n, e) = h.claims.key("HCLAkPub").unwrap().rsa.clone().unwrap();
    verify_rsa_pkcs1_sha256(&n, &e, msg, sig).unwrap();
    let attest = TpmsAttest::parse(msg).unwrap();
    attest.check_pcr_digest(pcrs).unwrap();
    attest
}

#[test]
fn kbs_az_snp_vtpm_evidence_v2_decodes_and_holds_together() {
    let v: Value = serde_json::from_slice(&read("kbs/az-snp-vtpm-evidence-v2.json")).unwrap();
    assert_eq!(v["version"], 2);
    let hcl = b64url_decode(v["hcl_report"].as_str().unwrap()).unwrap();
    assert_eq!(hcl.len(), 2600);
    let vcek = b64url_decode(v["vcek"].as_str().unwrap()).unwrap();
    let q = &v["tpm_quote"];
    let pcrs: Vec<[u8; 32]> = q["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| hex_bytes(p).try_into().unwrap())
        .collect();
    let attest = check_bundle(
        &hcl,
        &vcek,
        "snp/roots/milan_ask_ark_asvk.pem",
        &hex_bytes(&q["signature"]),
        &hex_bytes(&q["message"]),
        &pcrs,
    );
    // The quote nonce is the report data the attester wrote to NV 0x01400002: the claims'
    // user-data starts with it and is zero after it.
    let h = HclReport::parse(&hcl).unwrap();
    let user_data = h.claims.user_data.unwrap();
    assert_eq!(attest.extra_data.len(), 48);
    assert_eq!(&user_data[..48], &attest.extra_data[..]);
    assert_eq!(&user_data[48..], &[0u8; 16]);
}

#[test]
fn kbs_az_snp_vtpm_evidence_genoa_decodes_and_holds_together() {
    let v: Value = serde_json::from_slice(&read("kbs/az-snp-vtpm-evidence-genoa.json")).unwrap();
    let hcl = byte_array(&v["report"]);
    assert_eq!(hcl.len(), 2600);
    let vcek = Certificate::from_pem(v["vcek"].as_str().unwrap()).unwrap();
    // The published Genoa VCEK is the same certificate.
    let published = pem_certs("azure-cvm/trustee-genoa-vcek.pem");
    assert_eq!(published[0], vcek);
    let q = &v["quote"];
    let pcrs: Vec<[u8; 32]> = q["pcrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| byte_array(p).try_into().unwrap())
        .collect();
    check_bundle(
        &hcl,
        &vcek.to_der().unwrap(),
        "snp/roots/genoa_ask_ark_asvk.pem",
        &byte_array(&q["signature"]),
        &byte_array(&q["message"]),
        &pcrs,
    );
}

#[test]
fn evidence_describe_shows_each_kind() {
    let d = describe(&read("azure-cvm/hcl/trustee-snp-v1-2600.bin")).unwrap();
    assert_eq!(d["kind"], "hcl-report");
    assert_eq!(d["report_type"], 2);
    assert_eq!(d["binding_ok"], true);
    assert_eq!(d["keys"][0]["kid"], "HCLAkPub");
    assert_eq!(d["hardware_report"]["kind"], "snp-report");
    assert_eq!(d["user_data"].as_str().unwrap().len(), 128);
    let d = describe(&read("azure-cvm/hcl/kinvolk-tdx-v2-2600.bin")).unwrap();
    assert_eq!(d["report_type"], 4);
    assert_eq!(d["hardware_report"]["kind"], "tdreport");
    let q = describe(&read("azure-cvm/tdx/trustee-td-quote-v4.bin")).unwrap();
    assert_eq!(q["kind"], "td-quote");
    let d = describe(&read("azure-cvm/hcl/trustee-tdx-v2-2600.bin")).unwrap();
    assert_eq!(q["report_data"], d["report_data"]);
    assert_eq!(q["mrtd"], d["measurement"]);
    let s = describe(&read("snp/trustee-milan-v2-report.bin")).unwrap();
    assert_eq!(s["kind"], "snp-report");
    assert_eq!(s["vmpl"], 0);
    let hex_report = describe(&read("snp/milan-v2-report.hex")).unwrap();
    assert_eq!(hex_report["kind"], "snp-report");
    let (_, msg, _) = kinvolk_quote(&read("azure-cvm/tpm/kinvolk-quote.bin"));
    let a = describe(&msg).unwrap();
    assert_eq!(a["type"], "quote");
    assert_eq!(
        a["extra_data"],
        hex::encode(b"challenge"),
        "the quote's nonce"
    );
    let e = describe(b"hello").unwrap_err();
    assert!(e.message().contains("not a recognised evidence file"));
}

#[test]
fn evidence_describe_shows_a_trustee_az_snp_vtpm_bundle_with_each_check_passing() {
    for f in [
        "kbs/az-snp-vtpm-evidence-v2.json",
        "kbs/az-snp-vtpm-evidence-genoa.json",
    ] {
        let d = describe(&read(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(d["kind"], "az-snp-vtpm-evidence", "{f}");
        assert_eq!(d["hcl_report"]["kind"], "hcl-report", "{f}");
        assert_eq!(d["hcl_report"]["binding_ok"], true, "{f}");
        assert_eq!(
            d["hcl_report"]["hardware_report"]["kind"], "snp-report",
            "{f}"
        );
        assert_eq!(d["tpm_quote"]["type"], "quote", "{f}");
        assert_eq!(d["pcr_count"], 24, "{f}");
        assert_eq!(d["report_signature_ok"], true, "{f}");
        assert_eq!(d["quote_signature_ok"], true, "{f}");
        assert_eq!(d["pcr_digest_ok"], true, "{f}");
    }
    let d = describe(&read("kbs/az-snp-vtpm-evidence-v2.json")).unwrap();
    assert_eq!(d["version"], 2);
    assert_eq!(d["nonce_in_user_data"], true);
}

#[test]
fn evidence_describe_reports_a_tampered_az_snp_vtpm_bundle_as_failing_its_checks() {
    let v: Value = serde_json::from_slice(&read("kbs/az-snp-vtpm-evidence-v2.json")).unwrap();
    let flip_first_hex_digit = |s: &str| {
        let c = if s.starts_with('0') { "1" } else { "0" };
        format!("{c}{}", &s[1..])
    };
    let mut bad_sig = v.clone();
    bad_sig["tpm_quote"]["signature"] = Value::String(flip_first_hex_digit(
        v["tpm_quote"]["signature"].as_str().unwrap(),
    ));
    let d = describe(&serde_json::to_vec(&bad_sig).unwrap()).unwrap();
    assert_eq!(d["quote_signature_ok"], false);
    assert_eq!(d["pcr_digest_ok"], true);

    let mut bad_pcr = v.clone();
    bad_pcr["tpm_quote"]["pcrs"][0] = Value::String(flip_first_hex_digit(
        v["tpm_quote"]["pcrs"][0].as_str().unwrap(),
    ));
    let d = describe(&serde_json::to_vec(&bad_pcr).unwrap()).unwrap();
    assert_eq!(d["pcr_digest_ok"], false);
    assert_eq!(d["quote_signature_ok"], true);

    // The Genoa VCEK does not sign the Milan bundle's hardware report.
    let genoa: Value =
        serde_json::from_slice(&read("kbs/az-snp-vtpm-evidence-genoa.json")).unwrap();
    let mut other_vcek = v.clone();
    other_vcek["vcek"] = genoa["vcek"].clone();
    let d = describe(&serde_json::to_vec(&other_vcek).unwrap()).unwrap();
    assert_eq!(d["report_signature_ok"], false);

    let mut no_report = v.clone();
    no_report.as_object_mut().unwrap().remove("hcl_report");
    let e = describe(&serde_json::to_vec(&no_report).unwrap()).unwrap_err();
    assert!(e.to_string().contains("hcl_report is missing"), "{e}");
    let mut short_pcr = v;
    short_pcr["tpm_quote"]["pcrs"][3] = Value::String("00".into());
    let e = describe(&serde_json::to_vec(&short_pcr).unwrap()).unwrap_err();
    assert!(e.to_string().contains("not 32 bytes"), "{e}");
}
