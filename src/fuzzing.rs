//! Harnesses of the fuzz targets (`fuzz/`, cargo-fuzz on nightly) and of their corpus replay
//! on stable (`tests/fuzz_corpus.rs`): one function per parser of untrusted bytes, taking the
//! fuzzer's bytes. None may panic, hang or leak on any input; each calls the module's own
//! functions exactly as the login path does, nothing re-implemented, and returns whether the
//! input passed every check (the replay asserts it for the corpus files named `accept-*`, so
//! the structure-aware seeds provably reach the end). Not part of the module's API (hidden
//! from its docs); it only calls code the module runs anyway.
//!
//! Structure-aware where plain bytes cannot get past a signature: the harness signs the
//! fuzzer's claims (MAA token) or payload (release JWS) with the test key of [`Fixtures`], whose
//! certificate the harness trusts, and wraps the fuzzer's KEK and key material to the test
//! transfer key (`key_hsm`), so every check after the signature or the decryption is reached.
//! Playing MAA and Key Vault, it signs and wraps with aws-lc-rs directly, as the unit tests do:
//! it is test code, kept in the library only so that the fuzz targets (another crate) and the
//! stable replay share one harness; nothing of the module calls it.

use crate::config::Config;
use crate::release::b64url;
use crate::release::evidence;
use crate::release::http::{httpdate_to_unix, parse_retry_after};
use crate::release::jws::{check_release_request, verify_release_jws, TrustAnchors};
use crate::release::maa::{self, Expected};
use crate::release::transfer_key::{SoftwareTransferKey, TransferKey};
use crate::release::unwrap::WrapAlg;
use crate::release::unwrap::{check_material, parse_key_hsm, unwrap_key_hsm, PublicKeyInfo};
use crate::secret::SecretBytes;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{json, Value};
use std::path::Path;

/// The configured MAA of the harnesses (`iss` and `jku` of a good token).
pub const MAA_URL: &str = "https://fuzz.attest.azure.net";
/// `kid` of the harness's MAA signing key.
pub const MAA_KID: &str = "fuzz-maa-signing-key";
/// Host the test leaf certificate is valid for: the vault of [`KEY_URL`].
pub const AKV_HOST: &str = "fuzz.vault.azure.net";
/// The key a release response must answer.
pub const KEY_URL: &str = "https://fuzz.vault.azure.net/keys/web/0123456789abcdef0123456789abcdef";
/// Nonce of the MAA request and of the release request.
pub const NONCE: &str = "fuzz-nonce";
/// `enc` of the release request.
pub const ENC: WrapAlg = WrapAlg::RsaAesKeyWrap256;
/// REPORT_DATA the harness's MAA token must carry.
pub const REPORT_DATA: [u8; 64] = [0x5a; 64];
/// 2030-01-01T00:00:00Z: inside the test certificates' validity; times in claims are judged
/// against it, so a corpus means the same on every day.
pub const NOW: i64 = 1_893_456_000;

/// Test keys and certificates (`testdata/fuzz/`): one RSA-2048 key signs MAA tokens and release
/// JWS (its certificate, for [`AKV_HOST`], is issued by a test CA the harness trusts) and is the
/// transfer key `key_hsm` is wrapped to.
pub struct Fixtures {
    key: aws_lc_rs::rsa::KeyPair,
    key_pkcs8: Vec<u8>,
    transfer: SoftwareTransferKey,
    oaep: aws_lc_rs::rsa::OaepPublicEncryptingKey,
    anchors: TrustAnchors,
    /// `x5c` of a release JWS: the leaf, then the CA (standard base64).
    x5c: Vec<String>,
}

impl Fixtures {
    /// From the PKCS#8 test key, the CA certificate and the leaf certificate (DER); panics on
    /// bad fixtures (they are the repository's own files, not fuzz input).
    pub fn new(key_pkcs8: &[u8], ca_der: &[u8], leaf_der: &[u8]) -> Fixtures {
        use base64::Engine;
        let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(key_pkcs8).expect("fixture key");
        let private = aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(key_pkcs8)
            .expect("fixture key for OAEP");
        let oaep = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(private.public_key())
            .expect("fixture OAEP key");
        let std64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
        Fixtures {
            transfer: SoftwareTransferKey::from_pkcs8(key_pkcs8).expect("fixture transfer key"),
            key_pkcs8: key_pkcs8.to_vec(),
            oaep,
            anchors: TrustAnchors::with_extra(&[CertificateDer::from(ca_der.to_vec())])
                .expect("fixture CA"),
            x5c: vec![std64(leaf_der), std64(ca_der)],
            key,
        }
    }

    /// `b64url(header).b64url(payload).b64url(RS256 signature)` by the test key.
    fn sign_compact(&self, header: &[u8], payload: &[u8]) -> String {
        let input = format!("{}.{}", b64url(header), b64url(payload));
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &rng,
                input.as_bytes(),
                &mut sig,
            )
            .expect("RS256 with the fixture key");
        format!("{input}.{}", b64url(&sig))
    }

    fn maa_header(&self) -> Vec<u8> {
        json!({"alg": "RS256", "jku": format!("{MAA_URL}/certs"), "kid": MAA_KID, "typ": "JWT"})
            .to_string()
            .into_bytes()
    }

    fn release_header(&self) -> Vec<u8> {
        json!({"alg": "RS256", "x5c": self.x5c})
            .to_string()
            .into_bytes()
    }
}

/// `(header, payload)`: `rest` cut at its first newline (all payload without one).
fn header_and_payload(rest: &[u8]) -> (&[u8], &[u8]) {
    match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[], rest),
    }
}

/// MAA token verification (`maa::verify_token`, skr-protocol §10.2) and `/certs` parsing.
/// First byte: 0 the rest is the token text; 1 the rest is the claims, signed under the
/// harness's header; 2 the rest is `header \n claims`, signed; 3 the rest is a `/certs` body.
pub fn maa_token(fx: &Fixtures, data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let token = match mode % 4 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => fx.sign_compact(&fx.maa_header(), rest),
        2 => {
            let (header, claims) = header_and_payload(rest);
            fx.sign_compact(header, claims)
        }
        _ => return maa::parse_certs(rest).is_ok(),
    };
    let expected = Expected {
        nonce: NONCE,
        transfer_key: fx.transfer.public_jwk(),
        binding: crate::release::maa::Binding::SevSnp {
            report_data: &REPORT_DATA,
        },
    };
    let keys = vec![(
        Some(MAA_KID.to_string()),
        aws_lc_rs::signature::KeyPair::public_key(&fx.key)
            .as_ref()
            .to_vec(),
    )];
    maa::verify_token(&token, MAA_URL, &expected, NOW, &|_| Ok(keys.clone())).is_ok()
}

/// The inner AES key the harness's "TPM" unwraps from any `EncryptedInnerKey`.
const SEAL_KEY: [u8; 32] = [0x11; 32];
/// The HCL user-data the AzureGuest harness expects MAA to echo.
pub const USER_DATA: [u8; 64] = [0x5a; 64];

/// An AzureGuest response as `release::cvm` handles it: the `token` member opened
/// (`maa::open_sealed_token`, the RSAES inner-key step played by a stand-in returning
/// `SEAL_KEY`), then verified as an AzureGuest token (`maa::verify_token`, `Binding::AzureGuest`:
/// `azurevm`, `sevsnpvm` isolation TEE, client-payload nonce `NONCE`, user-data `USER_DATA`,
/// runtime key = the fixture key as `TpmEphemeralEncryptionKey`). First byte: 0 the rest is the
/// `token` text; 1 the rest is the sealed JSON (base64url-encoded by the harness); 2 the rest
/// is the claims, signed under the harness's MAA header and sealed with `SEAL_KEY`.
pub fn azure_guest_response(fx: &Fixtures, data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let token = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => b64url(rest),
        _ => {
            let jwt = fx.sign_compact(&fx.maa_header(), rest);
            let p = crate::crypto::GcmParams {
                iv: vec![7; 12],
                aad: maa::SEAL_AAD.to_vec(),
                tag_bits: 128,
            };
            let Ok(sealed) = crate::crypto::aes::gcm_seal(&SEAL_KEY[..], &p, jwt.as_bytes()) else {
                return false;
            };
            let (ct, tag) = sealed.split_at(sealed.len() - 16);
            let std64 = crate::release::b64std;
            let inner = json!({
                "EncryptedInnerKey": std64(b"in the TPM"),
                "EncryptionParams": {"BlockMode": "ChainingModeGCM", "Cipher": "AES",
                    "KeySizeInBits": 256, "Iv": std64(&[7; 12])},
                "AuthenticationData": std64(tag),
                "Jwt": std64(ct),
            });
            b64url(inner.to_string().as_bytes())
        }
    };
    let unwrap = |_: &[u8]| Ok(crate::secret::SecretBytes::from_slice(&SEAL_KEY));
    let Ok(jwt) = maa::open_sealed_token(&token, &unwrap) else {
        return false;
    };
    let ours = fx.transfer.public_jwk();
    let tpm_key = crate::release::transfer_key::RsaPublicJwk {
        kid: "TpmEphemeralEncryptionKey".into(),
        n: ours.n.clone(),
        e: ours.e.clone(),
    };
    let expected = Expected {
        nonce: NONCE,
        transfer_key: &tpm_key,
        binding: crate::release::maa::Binding::AzureGuest {
            tee: "sevsnpvm",
            user_data: &USER_DATA,
        },
    };
    let keys = vec![(
        Some(MAA_KID.to_string()),
        aws_lc_rs::signature::KeyPair::public_key(&fx.key)
            .as_ref()
            .to_vec(),
    )];
    maa::verify_token(&jwt, MAA_URL, &expected, NOW, &|_| Ok(keys.clone())).is_ok()
}

/// A release response as `Akv::release_key` handles it: the JWS and its `x5c` chain
/// (`verify_release_jws`), the request it answers, the signed public key, `key_hsm` and its
/// unwrap with the transfer key, the material against that public key. First byte: 0 the rest
/// is the JWS text; 1 the rest is the payload, signed under an `x5c` of the test chain; 2 the
/// rest is `header \n payload`, signed.
pub fn release_response(fx: &Fixtures, data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let jws = match mode % 3 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => fx.sign_compact(&fx.release_header(), rest),
        _ => {
            let (header, payload) = header_and_payload(rest);
            fx.sign_compact(header, payload)
        }
    };
    let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW as u64));
    let Ok(payload) = verify_release_jws(&jws, AKV_HOST, &fx.anchors, now) else {
        return false;
    };
    if check_release_request(&payload, KEY_URL, ENC.name(), NONCE).is_err() {
        return false;
    }
    let public = payload
        .pointer("/response/key/key")
        .and_then(|jwk| PublicKeyInfo::from_jwk(jwk).ok());
    let Some(key_hsm) = payload
        .pointer("/response/key/key/key_hsm")
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Ok(envelope) = parse_key_hsm(key_hsm) else {
        return false;
    };
    let Ok(material) = unwrap_key_hsm(&envelope, &fx.transfer, ENC) else {
        return false;
    };
    public.is_some_and(|public| check_material("fuzz", material, &public).is_ok())
}

/// `key_hsm` (skr-protocol §3): the envelope, RSA-OAEP with the transfer key, AES key wrap with
/// padding, the released material against a public key. Structure-aware; the bytes are read
/// as: flags (bits 0–1: OAEP hash SHA-1 / SHA-256 / SHA-384, 3 = the rest is `key_hsm` text;
/// bit 2: another kid; bit 3: another enc in the header), KEK length, KEK, material length
/// (2 bytes LE), material, then the public JWK (JSON) the material is checked against.
pub fn key_hsm(fx: &Fixtures, data: &[u8]) -> bool {
    let mut r = Reader(data);
    let flags = r.byte();
    let alg = match flags & 3 {
        0 => WrapAlg::CkmRsaAesKeyWrap,
        1 => WrapAlg::RsaAesKeyWrap256,
        2 => WrapAlg::RsaAesKeyWrap384,
        _ => {
            let text = String::from_utf8_lossy(r.0).into_owned();
            return parse_key_hsm(&text)
                .is_ok_and(|envelope| unwrap_key_hsm(&envelope, &fx.transfer, ENC).is_ok());
        }
    };
    let kek_len = usize::from(r.byte());
    let kek = r.take(kek_len);
    let material_len = usize::from(u16::from_le_bytes([r.byte(), r.byte()]));
    let material = r.take(material_len);
    let public = serde_json::from_slice::<Value>(r.0)
        .ok()
        .and_then(|jwk| PublicKeyInfo::from_jwk(&jwk).ok());

    let k = fx.transfer.modulus_len();
    let oaep_alg = match alg {
        WrapAlg::CkmRsaAesKeyWrap => &aws_lc_rs::rsa::OAEP_SHA1_MGF1SHA1,
        WrapAlg::RsaAesKeyWrap256 => &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
        WrapAlg::RsaAesKeyWrap384 => &aws_lc_rs::rsa::OAEP_SHA384_MGF1SHA384,
    };
    let mut block = vec![0u8; k];
    let oaep_ok = fx
        .oaep
        .encrypt(oaep_alg, kek, &mut block, None)
        .map(|c| c.len() == k)
        .unwrap_or(false);
    if !oaep_ok {
        // Too long for OAEP: the KEK bytes stand in for the block, as a forged one would.
        block = kek
            .iter()
            .copied()
            .chain(std::iter::repeat(0))
            .take(k)
            .collect();
    }
    let wrapped = match kek.len() {
        16 | 32 if !material.is_empty() => {
            use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_128, AES_256};
            let cipher = if kek.len() == 16 { &AES_128 } else { &AES_256 };
            let mut out = vec![0u8; material.len() + 16];
            match AesKek::new(cipher, kek).ok().and_then(|kek| {
                kek.wrap_with_padding(material, &mut out)
                    .ok()
                    .map(|w| w.len())
            }) {
                Some(n) => out[..n].to_vec(),
                None => material.to_vec(),
            }
        }
        // aws-lc-rs wraps with AES-128 / AES-256 only: for others the material is the wrap.
        _ => material.to_vec(),
    };
    let kid = if flags & 4 != 0 {
        "another-transfer-key".to_string()
    } else {
        fx.transfer.public_jwk().kid.clone()
    };
    let enc = if flags & 8 != 0 {
        "RSA_AES_KEY_WRAP_512"
    } else {
        alg.name()
    };
    let envelope = json!({
        "schema_version": "1.0",
        "header": {"kid": kid, "alg": "dir", "enc": enc},
        "ciphertext": b64url(&[block, wrapped].concat()),
        "generator": "skr-pkcs11 fuzz harness",
    });
    let text = b64url(envelope.to_string().as_bytes());
    let Ok(envelope) = parse_key_hsm(&text) else {
        return false;
    };
    let Ok(released) = unwrap_key_hsm(&envelope, &fx.transfer, alg) else {
        return false;
    };
    public.is_some_and(|public| check_material("fuzz", released, &public).is_ok())
}

/// JWK public keys (`GET {kid}` and the signed release payload): `PublicKeyInfo::from_jwk`, then
/// the test key's PKCS#8 checked against it as released material would be.
pub fn jwk(fx: &Fixtures, data: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let Ok(public) = PublicKeyInfo::from_jwk(&v) else {
        return false;
    };
    let _ = public.kind();
    check_material("fuzz", SecretBytes::from_slice(&fx.key_pkcs8), &public).is_ok()
}

/// SEV-SNP reports: the size and REPORT_DATA check, REPORTED_TCB, and the legacy `/dev/sev`
/// response framing around a report.
pub fn snp_report(_fx: &Fixtures, data: &[u8]) -> bool {
    let _ = evidence::reported_tcb(data);
    let mut rsp = [0u8; crate::sys::RESPONSE_LEN];
    let n = data.len().min(rsp.len());
    rsp[..n].copy_from_slice(&data[..n]);
    let _ = evidence::sev_legacy::parse_response(&rsp);
    evidence::check_report(data, &REPORT_DATA).is_ok()
}

/// Azure confidential-VM evidence (the vTPM path): HCL reports, TD quotes, TPMS_ATTEST
/// quotes, runtime claims. First byte: 0 the rest goes to `show::describe` (which recognises
/// each format); 1 an HCL report (structure, binding, user-data echo); 2 a TD quote and the
/// TDREPORT of an HCL report, cut at the first `HCLA`; 3 a TPMS_ATTEST (with all-zero PCRs);
/// 4 runtime-claims JSON.
pub fn cvm_evidence(_fx: &Fixtures, data: &[u8]) -> bool {
    use evidence::{hcl, show, tdx, tpm_attest};
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    match mode % 5 {
        // A bundle passes only when every check it reports holds (so its seeds reach them).
        0 => show::describe(rest).is_ok_and(|d| {
            d["kind"] != "az-snp-vtpm-evidence"
                || ["report_signature_ok", "quote_signature_ok", "pcr_digest_ok"]
                    .iter()
                    .all(|k| d[*k] == true)
        }),
        1 => hcl::HclReport::parse(rest).is_ok_and(|h| {
            let _ = h.user_data_echoes(&[0; hcl::USER_DATA_LEN]);
            let _ = show::hcl_json(&h);
            h.check_binding().is_ok()
        }),
        2 => {
            let at = rest
                .windows(hcl::MAGIC.len())
                .position(|w| w == hcl::MAGIC)
                .unwrap_or(rest.len());
            let (quote, report) = rest.split_at(at);
            let Ok(quote) = tdx::TdQuote::parse(quote) else {
                return false;
            };
            let _ = show::td_quote_json(&quote);
            match hcl::HclReport::parse(report).map(|h| h.hardware) {
                Ok(hcl::HardwareReport::Tdx(td)) => quote.check_matches(&td).is_ok(),
                _ => false,
            }
        }
        3 => tpm_attest::TpmsAttest::parse(rest).is_ok_and(|a| {
            let _ = show::tpms_attest_json(&a);
            let _ = a.check_pcr_digest(&[[0u8; 32]; 24]);
            true
        }),
        _ => hcl::parse_runtime_claims(rest).is_ok(),
    }
}

/// THIM / security-context collateral. First byte: 0 the rest is a THIM JSON (IMDS); 1 the
/// rest is the `host-amd-cert-base64` and `reference-info-base64` texts of a security-context
/// directory, cut at the first NUL.
pub fn collateral(_fx: &Fixtures, data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    if mode % 2 == 0 {
        evidence::thim_chain(rest, "fuzz THIM").is_ok()
    } else {
        let (host, reference) = match rest.iter().position(|b| *b == 0) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let host = String::from_utf8_lossy(host);
        let reference = reference.map(String::from_utf8_lossy);
        evidence::collateral_from_files(
            Path::new("/fuzz/security-context"),
            &host,
            reference.as_deref(),
        )
        .is_ok()
    }
}

/// The TOML config: parse and validate, then build the module's tokens from it (no
/// certificate files: a config naming one is refused there, after its other checks).
pub fn config(_fx: &Fixtures, data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(cfg) = Config::parse(text, Path::new("/fuzz/config.toml")) else {
        return false;
    };
    for key in cfg.tokens.iter().flat_map(|t| &t.keys) {
        let _ = key.id_bytes();
        let _ = key.vault_base();
    }
    crate::token::Module::new(std::sync::Arc::new(cfg), &Default::default()).is_ok()
}

/// PEM certificate files (a key's `certificate`, `tls.ca_file`): the blocks, then each
/// certificate's fields as the token's objects expose them.
pub fn pem_chain(_fx: &Fixtures, data: &[u8]) -> bool {
    let _ = crate::pem::certificates(data);
    crate::token::object::CertInfo::chain_from_pem(data).is_ok()
}

/// Release policies (`GET {kid}`'s `release_policy.data`, explained on a 403) evaluated against
/// MAA claims: the bytes up to the first NUL are the policy (as JSON, and as the base64 text
/// of the bundle), the rest the claims (JSON).
pub fn release_policy(_fx: &Fixtures, data: &[u8]) -> bool {
    let (policy, claims) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let claims: Value = serde_json::from_slice(claims).unwrap_or_else(|_| json!({}));
    let parsed = [
        crate::policy::parse_json(policy),
        crate::policy::parse_encoded(&String::from_utf8_lossy(policy)),
    ];
    let mut granted = false;
    for p in parsed.into_iter().flatten() {
        match crate::policy::evaluate(&p, MAA_URL, &claims) {
            Ok(()) => granted = true,
            Err(explanation) => {
                let _ = explanation.to_string();
                let _ = explanation.claim();
            }
        }
    }
    granted
}

/// `Retry-After` values (seconds or an HTTP date) and IMF-fixdate parsing.
pub fn http_dates(_fx: &Fixtures, data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let _ = httpdate_to_unix(&text);
    parse_retry_after(&text).is_some()
}

/// The attribute types a session-object template harness draws from (by one byte each).
const TEMPLATE_TYPES: &[cryptoki_sys::CK_ATTRIBUTE_TYPE] = {
    use cryptoki_sys::*;
    &[
        CKA_CLASS,
        CKA_KEY_TYPE,
        CKA_TOKEN,
        CKA_PRIVATE,
        CKA_LABEL,
        CKA_VALUE,
        CKA_VALUE_LEN,
        CKA_SENSITIVE,
        CKA_EXTRACTABLE,
        CKA_ENCRYPT,
        CKA_DECRYPT,
        CKA_WRAP,
        CKA_UNWRAP,
        CKA_SIGN,
        CKA_VERIFY,
        CKA_MODULUS,
        CKA_PUBLIC_EXPONENT,
        CKA_EC_PARAMS,
        CKA_EC_POINT,
        CKA_CERTIFICATE_TYPE,
        CKA_SUBJECT,
        CKA_CHECK_VALUE,
        CKA_ALLOWED_MECHANISMS,
        CKA_START_DATE,
        CKA_WRAP_TEMPLATE,
        CKA_UNWRAP_TEMPLATE,
        CKA_LOCAL,
        CKA_TRUSTED,
        CKA_WRAP_WITH_TRUSTED,
        CKA_COPYABLE,
        CKA_MODIFIABLE,
        CKA_APPLICATION,
    ]
};

/// A C_CreateObject template, then a C_SetAttributeValue / C_CopyObject template on the new
/// object: each entry is a type byte (index into a table of the attributes that matter), a
/// length byte and that many value bytes; a type byte 0xFF ends the first template. Passes
/// when the object is made and modified.
pub fn session_object(_fx: &Fixtures, data: &[u8]) -> bool {
    use crate::token::{factory, material};
    let mut r = Reader(data);
    let mut templates: [Vec<(cryptoki_sys::CK_ATTRIBUTE_TYPE, Vec<u8>)>; 2] = Default::default();
    let mut which = 0;
    while !r.0.is_empty() {
        let t = r.byte();
        if t == 0xFF && which == 0 {
            which = 1;
            continue;
        }
        let ty = TEMPLATE_TYPES[t as usize % TEMPLATE_TYPES.len()];
        let len = r.byte() as usize;
        templates[which].push((ty, r.take(len).to_vec()));
    }
    let Ok(o) = material::create(1, &templates[0]) else {
        return false;
    };
    let attrs = o
        .stored
        .as_ref()
        .map(|s| s.attrs.clone())
        .unwrap_or_default();
    let in_copy = data.len().is_multiple_of(2);
    factory::modify(&attrs, &templates[1], in_copy).is_ok()
}

/// A wrapped key as C_UnwrapKey hands it to the mechanism: the first byte picks CKM_AES_KEY_WRAP,
/// CKM_AES_KEY_WRAP_KWP or CKM_AES_GCM (12-byte IV), the second the KEK size; the rest is the
/// wrapped key. Passes when it unwraps.
pub fn key_unwrap(_fx: &Fixtures, data: &[u8]) -> bool {
    use crate::crypto::mechanism::{Mechanism, RawParam};
    use crate::crypto::ops::{CipherKey, CipherOp};
    use cryptoki_sys::*;
    let mut r = Reader(data);
    let ckm = [CKM_AES_KEY_WRAP, CKM_AES_KEY_WRAP_KWP, CKM_AES_GCM][r.byte() as usize % 3];
    let kek_len = [16, 24, 32][r.byte() as usize % 3];
    let param = if ckm == CKM_AES_GCM {
        RawParam::Gcm {
            iv: vec![7; 12],
            aad: vec![],
            tag_bits: 128,
        }
    } else {
        RawParam::None
    };
    let Ok(m) = Mechanism::from_raw(ckm, param) else {
        return false;
    };
    let kek = std::sync::Arc::new(SecretBytes::from_slice(&vec![0x4b; kek_len]));
    CipherOp::new(m, CipherKey::Secret(kek), false)
        .and_then(|mut op| op.single(r.0))
        .is_ok()
}

/// Message-based AES-GCM (C_EncryptMessage / C_DecryptMessage) with the caller's
/// CK_GCM_MESSAGE_PARAMS values: key size, IV length, fixed bits, generator, tag bits, AAD
/// length, then AAD and the message. The parameters are checked as the C call checks them; an
/// accepted message seals, keeps the caller's fixed IV bits, opens back to itself, and a
/// flipped tag bit is refused with a zeroed output. The message as a ciphertext with a tag of
/// zeroes must be refused too (no forgery from the fuzzer's bytes). Passes when the message
/// was sealed and opened.
pub fn gcm_message(_fx: &Fixtures, data: &[u8]) -> bool {
    use crate::crypto::gcm_message::{GcmMessages, IvGenerator, MessageParams};
    use cryptoki_sys::*;
    let mut r = Reader(data);
    let key_len = [16, 24, 32][r.byte() as usize % 3];
    let iv_len = r.byte() as usize + 1;
    let fixed_bits = r.byte() as usize;
    let ckg = r.byte() as CK_GENERATOR_FUNCTION % 6;
    let tag_bits = r.byte() as usize;
    let aad_len = r.byte() as usize;
    let aad = r.take(aad_len);
    let message = r.0;
    let Ok(generator) = IvGenerator::from_ckg(ckg) else {
        assert!(![
            CKG_NO_GENERATE,
            CKG_GENERATE,
            CKG_GENERATE_COUNTER,
            CKG_GENERATE_RANDOM
        ]
        .contains(&ckg));
        return false;
    };
    let p = MessageParams {
        iv_len,
        iv_fixed_bits: fixed_bits,
        generator,
        tag_bits,
    };
    let key = std::sync::Arc::new(SecretBytes::from_slice(&vec![0x6b; key_len]));
    let Ok(mut op) = GcmMessages::new(key) else {
        return false;
    };
    let decrypt_only = MessageParams {
        generator: IvGenerator::Caller,
        ..p
    };
    let caller_iv: Vec<u8> = (0..iv_len).map(|i| i as u8 ^ 0xc3).collect();
    // The fuzzer's bytes as a ciphertext under an all-zero tag: never authentic.
    let mut forged = message.to_vec();
    let zero_tag = [0u8; 16];
    if decrypt_only.check(false).is_ok() {
        let tag = &zero_tag[..decrypt_only.tag_len()];
        let e = op.open(&decrypt_only, &caller_iv, aad, tag, &mut forged);
        assert_eq!(e.map_err(|e| e.rv()), Err(CKR_ENCRYPTED_DATA_INVALID));
        assert!(
            forged.iter().all(|b| *b == 0),
            "a refused message leaves zeroes"
        );
    }
    let mut iv = caller_iv.clone();
    let mut buf = message.to_vec();
    let Ok(tag) = op.seal(&p, &mut iv, aad, &mut buf) else {
        assert!(p.check(true).is_err(), "accepted parameters sealed");
        assert_eq!(buf, message, "a refused message is left as it was");
        return false;
    };
    // The caller's leading fixed bits survive generation, to the bit.
    if generator != IvGenerator::Caller {
        for bit in 0..fixed_bits.min(iv_len * 8) {
            let mask = 0x80u8 >> (bit % 8);
            assert_eq!(
                iv[bit / 8] & mask,
                caller_iv[bit / 8] & mask,
                "fixed bit {bit}"
            );
        }
    } else {
        assert_eq!(iv, caller_iv, "a caller's IV is used as it is");
    }
    let tag = &tag[..p.tag_len()];
    let mut back = buf.clone();
    op.open(&decrypt_only, &iv, aad, tag, &mut back)
        .expect("a sealed message opens");
    assert_eq!(back, message);
    let mut bad = tag.to_vec();
    bad[0] ^= 1;
    let mut again = buf.clone();
    assert!(op.open(&decrypt_only, &iv, aad, &bad, &mut again).is_err());
    assert!(again.iter().all(|b| *b == 0));
    true
}

/// A lease record as a process of the tree reads it from the shared key store (a torn or
/// foreign mapping must be refused, never panic): decode, re-encode, and decode again to the
/// same entries.
pub fn lease_record(_fx: &Fixtures, data: &[u8]) -> bool {
    use crate::token::lease::{decode, encode};
    let Some(keys) = decode(data) else {
        return false;
    };
    let again = encode(&keys);
    let back = decode(again.as_slice()).expect("a record we encoded decodes");
    assert_eq!(back.len(), keys.len());
    for (a, b) in keys.iter().zip(&back) {
        assert_eq!(
            (a.index, &a.version, a.released_at_ms),
            (b.index, &b.version, b.released_at_ms)
        );
        assert_eq!(a.state.name(), b.state.name());
    }
    true
}

/// An identity service's answer: the first line is a vault's `WWW-Authenticate` challenge
/// (whose `resource=` the module may follow), the rest a token response body (IMDS, identity
/// endpoint, Entra). Passes when the body yields a token.
pub fn identity_response(_fx: &Fixtures, data: &[u8]) -> bool {
    use crate::release::identity::{
        access_token_from, is_key_vault_audience, resource_from_challenge,
    };
    let (header, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    if let Some(r) = resource_from_challenge(&String::from_utf8_lossy(header)) {
        let _ = is_key_vault_audience(&r);
    }
    access_token_from("fuzz", body).is_ok()
}

/// skr-emulator's simulated platform answer (`POST /platform/snp/report`), then what the login
/// does with it: the report checked against the report data asked for, the chain parsed.
/// Passes when the response parses.
pub fn platform_response(_fx: &Fixtures, data: &[u8]) -> bool {
    match evidence::parse_platform_response(data) {
        Ok(ev) => {
            let _ = evidence::check_report(&ev.report, &[0x5A; 64]);
            if let Some(chain) = &ev.vcek_chain_pem {
                let _ = crate::pem::certificates(chain.as_bytes());
            }
            true
        }
        Err(_) => false,
    }
}

/// A harness: the fixtures and the fuzzer's bytes in, whether they passed every check out.
pub type Harness = fn(&Fixtures, &[u8]) -> bool;

/// Every harness by the name of its fuzz target (and corpus directory).
pub const TARGETS: &[(&str, Harness)] = &[
    ("maa_token", maa_token),
    ("azure_guest_response", azure_guest_response),
    ("release_response", release_response),
    ("key_hsm", key_hsm),
    ("jwk", jwk),
    ("snp_report", snp_report),
    ("cvm_evidence", cvm_evidence),
    ("collateral", collateral),
    ("config", config),
    ("pem_chain", pem_chain),
    ("release_policy", release_policy),
    ("http_dates", http_dates),
    ("session_object", session_object),
    ("key_unwrap", key_unwrap),
    ("lease_record", lease_record),
    ("gcm_message", gcm_message),
    ("identity_response", identity_response),
    ("platform_response", platform_response),
];

/// Reads structure-aware input front to back; past the end every read is empty / zero.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}
