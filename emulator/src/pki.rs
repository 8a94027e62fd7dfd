//! Certificates the emulator issues: its CA and TLS server certificate, the vault's JWS signing
//! chain, MAA's self-signed token signing certificate, and a simulated AMD chain
//! (ARK → ASK → VCEK) shaped like AMD's (RSA-4096, RSASSA-PSS SHA-384 salt 48, VCEK P-384
//! carrying the SPL and hwID extensions).

use der::asn1::{Ia5String, OctetString};
use der::{Decode, Encode, Length, Writer};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use sha2::Sha384;
use spki::{EncodePublicKey, SubjectPublicKeyInfoOwned};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::ext::AsExtension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use x509_cert::Certificate;

pub type PkiResult<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

pub fn name(text: &str) -> PkiResult<Name> {
    Name::from_str(text).map_err(err("name"))
}

fn validity(from: SystemTime, to: SystemTime) -> PkiResult<Validity> {
    Ok(Validity {
        not_before: Time::try_from(from).map_err(err("time"))?,
        not_after: Time::try_from(to).map_err(err("time"))?,
    })
}

/// Starts an hour back so that a client whose clock is slightly behind still accepts it.
fn validity_from_now(days: u64) -> PkiResult<Validity> {
    let now = SystemTime::now();
    validity(
        now - Duration::from_secs(3600),
        now + Duration::from_secs(days * 86400),
    )
}

fn random_serial() -> PkiResult<SerialNumber> {
    let mut bytes = crate::util::random_bytes::<16>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::new(&bytes).map_err(err("serial"))
}

pub fn spki_of<K: EncodePublicKey>(key: &K) -> PkiResult<SubjectPublicKeyInfoOwned> {
    let der = key.to_public_key_der().map_err(err("public key"))?;
    SubjectPublicKeyInfoOwned::from_der(der.as_bytes()).map_err(err("public key"))
}

pub fn cert_der(cert: &Certificate) -> PkiResult<Vec<u8>> {
    cert.to_der().map_err(err("certificate encoding"))
}

pub fn p256_key(pkcs8: &[u8]) -> PkiResult<p256::ecdsa::SigningKey> {
    p256::ecdsa::SigningKey::from_pkcs8_der(pkcs8).map_err(err("P-256 key"))
}

pub fn p384_key(pkcs8: &[u8]) -> PkiResult<p384::ecdsa::SigningKey> {
    p384::ecdsa::SigningKey::from_pkcs8_der(pkcs8).map_err(err("P-384 key"))
}

pub fn rsa_key(pkcs8: &[u8]) -> PkiResult<rsa::RsaPrivateKey> {
    rsa::RsaPrivateKey::from_pkcs8_der(pkcs8).map_err(err("RSA key"))
}

pub fn new_p256() -> PkiResult<(p256::ecdsa::SigningKey, Vec<u8>)> {
    let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let der = key.to_pkcs8_der().map_err(err("P-256 key"))?;
    Ok((key, der.as_bytes().to_vec()))
}

pub fn new_rsa(bits: usize) -> PkiResult<(rsa::RsaPrivateKey, Vec<u8>)> {
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).map_err(err("RSA keygen"))?;
    let der = key.to_pkcs8_der().map_err(err("RSA key"))?;
    Ok((key, der.as_bytes().to_vec()))
}

/// The emulator's root CA (P-256): signs the TLS certificates, the vault JWS chain and the
/// demo key certificates. `DIR/ca.pem` is this certificate.
pub fn issue_ca(key: &p256::ecdsa::SigningKey) -> PkiResult<Certificate> {
    let subject = name("CN=skr-emulator CA,O=skr-emulator")?;
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial()?,
        validity_from_now(3650)?,
        subject,
        spki_of(key.verifying_key())?,
        key,
    )
    .map_err(err("CA builder"))?;
    builder
        .build::<p256::ecdsa::DerSignature>()
        .map_err(err("CA signature"))
}

/// A TLS server / JWS signing leaf for `localhost` and 127.0.0.1, issued by `issuer_key`.
pub fn issue_server_leaf(
    issuer: &Certificate,
    issuer_signer: &p256::ecdsa::SigningKey,
    subject_cn: &str,
    subject_key: SubjectPublicKeyInfoOwned,
    key_encipherment: bool,
) -> PkiResult<Certificate> {
    let mut builder = CertificateBuilder::new(
        Profile::Leaf {
            issuer: issuer.tbs_certificate.subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: key_encipherment,
        },
        random_serial()?,
        validity_from_now(825)?,
        name(&format!("CN={subject_cn},O=skr-emulator"))?,
        subject_key,
        issuer_signer,
    )
    .map_err(err("leaf builder"))?;
    builder
        .add_extension(&SubjectAltName(vec![
            GeneralName::DnsName(Ia5String::new("localhost").map_err(err("SAN"))?),
            GeneralName::IpAddress(OctetString::new(vec![127, 0, 0, 1]).map_err(err("SAN"))?),
        ]))
        .map_err(err("SAN"))?;
    builder
        .add_extension(&ExtendedKeyUsage(vec![
            const_oid::db::rfc5280::ID_KP_SERVER_AUTH,
        ]))
        .map_err(err("EKU"))?;
    builder
        .build::<p256::ecdsa::DerSignature>()
        .map_err(err("leaf signature"))
}

/// A self-signed P-256 root with the given subject (the simulated Azure vTPM CA).
pub fn issue_named_ca(key: &p256::ecdsa::SigningKey, subject: &str) -> PkiResult<Certificate> {
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial()?,
        validity_from_now(3650)?,
        name(subject)?,
        spki_of(key.verifying_key())?,
        key,
    )
    .map_err(err("CA builder"))?;
    builder
        .build::<p256::ecdsa::DerSignature>()
        .map_err(err("CA signature"))
}

/// A plain leaf (no SAN, no EKU) for `subject_key`, e.g. a vTPM AK certificate.
pub fn issue_leaf_for(
    issuer: &Certificate,
    issuer_signer: &p256::ecdsa::SigningKey,
    subject: &str,
    subject_key: SubjectPublicKeyInfoOwned,
) -> PkiResult<Certificate> {
    let builder = CertificateBuilder::new(
        Profile::Leaf {
            issuer: issuer.tbs_certificate.subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
        },
        random_serial()?,
        validity_from_now(365)?,
        name(subject)?,
        subject_key,
        issuer_signer,
    )
    .map_err(err("leaf builder"))?;
    builder
        .build::<p256::ecdsa::DerSignature>()
        .map_err(err("leaf signature"))
}

/// The ECDSA P-256 / SHA-256 signature of `subject` by `issuer`'s key, and the names.
pub fn verify_p256_link(issuer: &Certificate, subject: &Certificate) -> PkiResult<()> {
    use p256::ecdsa::signature::Verifier;
    if subject.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err("issuer name does not match the issuing certificate".into());
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(
        issuer
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes(),
    )
    .map_err(|_| "issuer key is not a P-256 point".to_string())?;
    let sig = p256::ecdsa::DerSignature::from_bytes(subject.signature.raw_bytes())
        .map_err(|_| "signature is not a DER ECDSA signature".to_string())?;
    let tbs = subject.tbs_certificate.to_der().map_err(err("TBS"))?;
    key.verify(&tbs, &sig)
        .map_err(|_| "ECDSA P-256 signature does not verify".to_string())
}

#[cfg(test)]
pub fn new_p384() -> PkiResult<(p384::ecdsa::SigningKey, Vec<u8>)> {
    let key = p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
    let der = key.to_pkcs8_der().map_err(err("P-384 key"))?;
    Ok((key, der.as_bytes().to_vec()))
}

/// An intermediate CA below the emulator CA (the vault JWS chain is leaf → intermediate → root,
/// like Azure's).
pub fn issue_intermediate(
    ca: &Certificate,
    ca_key: &p256::ecdsa::SigningKey,
    subject_cn: &str,
    subject_key: &p256::ecdsa::SigningKey,
) -> PkiResult<Certificate> {
    let builder = CertificateBuilder::new(
        Profile::SubCA {
            issuer: ca.tbs_certificate.subject.clone(),
            path_len_constraint: Some(0),
        },
        random_serial()?,
        validity_from_now(1825)?,
        name(&format!("CN={subject_cn},O=skr-emulator"))?,
        spki_of(subject_key.verifying_key())?,
        ca_key,
    )
    .map_err(err("intermediate builder"))?;
    builder
        .build::<p256::ecdsa::DerSignature>()
        .map_err(err("intermediate signature"))
}

/// MAA's token signing certificate: self-signed RSA (RS256), like MAA's (which also embeds an
/// SGX quote of the service enclave; the emulator's does not).
pub fn issue_self_signed_rsa(key: &rsa::RsaPrivateKey, subject_cn: &str) -> PkiResult<Certificate> {
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key.clone());
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial()?,
        validity_from_now(3650)?,
        name(&format!("CN={subject_cn}"))?,
        spki_of(&key.to_public_key())?,
        &signer,
    )
    .map_err(err("self-signed builder"))?;
    builder
        .build::<rsa::pkcs1v15::Signature>()
        .map_err(err("self-signed signature"))
}

// ---- simulated AMD chain -------------------------------------------------------------------

const AMD_SUBJECT_SUFFIX: &str =
    "OU=Engineering,C=US,L=Santa Clara,ST=CA,O=Advanced Micro Devices (skr-emulator simulation)";

/// Reported TCB of the simulated platform; `fmc` exists on Turin only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcb {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

fn amd_pss_signer(key: &rsa::RsaPrivateKey) -> rsa::pss::BlindedSigningKey<Sha384> {
    // Salt 48 = SHA-384 output length, as in AMD's certificates.
    rsa::pss::BlindedSigningKey::<Sha384>::new_with_salt_len(key.clone(), 48)
}

pub fn issue_ark(key: &rsa::RsaPrivateKey) -> PkiResult<Certificate> {
    let signer = amd_pss_signer(key);
    let subject = name(&format!("CN=ARK-Milan,{AMD_SUBJECT_SUFFIX}"))?;
    let now = SystemTime::now();
    let builder = CertificateBuilder::new(
        Profile::Root,
        random_serial()?,
        validity(
            now - Duration::from_secs(86400),
            now + Duration::from_secs(25 * 365 * 86400),
        )?,
        subject,
        spki_of(&key.to_public_key())?,
        &signer,
    )
    .map_err(err("ARK builder"))?;
    builder
        .build_with_rng::<rsa::pss::Signature>(&mut rand::rngs::OsRng)
        .map_err(err("ARK signature"))
}

pub fn issue_ask(
    ark: &Certificate,
    ark_key: &rsa::RsaPrivateKey,
    key: &rsa::RsaPrivateKey,
) -> PkiResult<Certificate> {
    let signer = amd_pss_signer(ark_key);
    let now = SystemTime::now();
    let builder = CertificateBuilder::new(
        Profile::SubCA {
            issuer: ark.tbs_certificate.subject.clone(),
            path_len_constraint: Some(0),
        },
        random_serial()?,
        validity(
            now - Duration::from_secs(86400),
            now + Duration::from_secs(25 * 365 * 86400),
        )?,
        name(&format!("CN=SEV-Milan,{AMD_SUBJECT_SUFFIX}"))?,
        spki_of(&key.to_public_key())?,
        &signer,
    )
    .map_err(err("ASK builder"))?;
    builder
        .build_with_rng::<rsa::pss::Signature>(&mut rand::rngs::OsRng)
        .map_err(err("ASK signature"))
}

pub const OID_AMD_STRUCT_VERSION: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.1");
pub const OID_AMD_PRODUCT_NAME: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.2");
pub const OID_AMD_BL_SPL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
pub const OID_AMD_TEE_SPL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
pub const OID_AMD_SNP_SPL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
pub const OID_AMD_UCODE_SPL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
pub const OID_AMD_FMC_SPL: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
pub const OID_AMD_HWID: const_oid::ObjectIdentifier =
    const_oid::ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");

/// One AMD VCEK extension: the OID is a const parameter of `AsExtension`, so each extension
/// is its own type; the value is pre-encoded (DER INTEGER / IA5String, or raw hwID bytes,
/// which AMD stores without any DER wrapper).
macro_rules! amd_extension {
    ($type:ident, $oid:ident) => {
        struct $type(Vec<u8>);
        impl const_oid::AssociatedOid for $type {
            const OID: const_oid::ObjectIdentifier = $oid;
        }
        impl Encode for $type {
            fn encoded_len(&self) -> der::Result<Length> {
                Length::try_from(self.0.len())
            }
            fn encode(&self, writer: &mut impl Writer) -> der::Result<()> {
                writer.write(&self.0)
            }
        }
        impl AsExtension for $type {
            fn critical(&self, _: &Name, _: &[x509_cert::ext::Extension]) -> bool {
                false
            }
        }
    };
}
amd_extension!(ExtStructVersion, OID_AMD_STRUCT_VERSION);
amd_extension!(ExtProductName, OID_AMD_PRODUCT_NAME);
amd_extension!(ExtBlSpl, OID_AMD_BL_SPL);
amd_extension!(ExtTeeSpl, OID_AMD_TEE_SPL);
amd_extension!(ExtSnpSpl, OID_AMD_SNP_SPL);
amd_extension!(ExtUcodeSpl, OID_AMD_UCODE_SPL);
amd_extension!(ExtFmcSpl, OID_AMD_FMC_SPL);
amd_extension!(ExtHwId, OID_AMD_HWID);

fn der_integer(value: u32) -> PkiResult<Vec<u8>> {
    value.to_der().map_err(err("INTEGER"))
}

/// The VCEK for one chip at one TCB (AMD issues a new one per TCB), serial number 0 like AMD's.
/// `hwid` is the whole CHIP_ID (64 bytes), or its first 8 bytes on Turin.
pub fn issue_vcek(
    ask: &Certificate,
    ask_key: &rsa::RsaPrivateKey,
    vcek_key: &p384::ecdsa::SigningKey,
    product_name: &str,
    tcb: Tcb,
    hwid: &[u8],
) -> PkiResult<Certificate> {
    let signer = amd_pss_signer(ask_key);
    let now = SystemTime::now();
    let mut builder = CertificateBuilder::new(
        Profile::Leaf {
            issuer: ask.tbs_certificate.subject.clone(),
            enable_key_agreement: false,
            enable_key_encipherment: false,
        },
        SerialNumber::new(&[0]).map_err(err("serial"))?,
        validity(
            now - Duration::from_secs(86400),
            now + Duration::from_secs(7 * 365 * 86400),
        )?,
        name(&format!("CN=SEV-VCEK,{AMD_SUBJECT_SUFFIX}"))?,
        spki_of(vcek_key.verifying_key())?,
        &signer,
    )
    .map_err(err("VCEK builder"))?;
    let product = Ia5String::new(product_name)
        .and_then(|s| s.to_der())
        .map_err(err("productName"))?;
    builder
        .add_extension(&ExtStructVersion(der_integer(1)?))
        .map_err(err("ext"))?;
    builder
        .add_extension(&ExtProductName(product))
        .map_err(err("ext"))?;
    builder
        .add_extension(&ExtBlSpl(der_integer(tcb.bootloader.into())?))
        .map_err(err("ext"))?;
    builder
        .add_extension(&ExtTeeSpl(der_integer(tcb.tee.into())?))
        .map_err(err("ext"))?;
    builder
        .add_extension(&ExtSnpSpl(der_integer(tcb.snp.into())?))
        .map_err(err("ext"))?;
    builder
        .add_extension(&ExtUcodeSpl(der_integer(tcb.microcode.into())?))
        .map_err(err("ext"))?;
    if let Some(fmc) = tcb.fmc {
        builder
            .add_extension(&ExtFmcSpl(der_integer(fmc.into())?))
            .map_err(err("ext"))?;
    }
    builder
        .add_extension(&ExtHwId(hwid.to_vec()))
        .map_err(err("ext"))?;
    builder
        .build_with_rng::<rsa::pss::Signature>(&mut rand::rngs::OsRng)
        .map_err(err("VCEK signature"))
}

pub fn parse_cert(der: &[u8]) -> PkiResult<Certificate> {
    Certificate::from_der(der).map_err(err("certificate"))
}

/// VCEK extensions by OID (read by MAA's chain check and by the state loader deciding
/// whether a stored VCEK still matches the platform) (SPLs are DER INTEGERs; hwID is raw bytes).
pub struct VcekExtensions {
    pub spls: BTreeMap<String, u8>,
    pub hwid: Option<Vec<u8>>,
    pub product: Option<String>,
}

impl VcekExtensions {
    pub fn spl(&self, oid: const_oid::ObjectIdentifier) -> Option<u8> {
        self.spls.get(&oid.to_string()).copied()
    }
}

pub fn vcek_extensions(cert: &Certificate) -> Result<VcekExtensions, String> {
    let mut out = VcekExtensions {
        spls: BTreeMap::new(),
        hwid: None,
        product: None,
    };
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        let oid = ext.extn_id;
        let value = ext.extn_value.as_bytes();
        if oid == OID_AMD_HWID {
            out.hwid = Some(value.to_vec());
        } else if oid == OID_AMD_PRODUCT_NAME {
            out.product = Ia5String::from_der(value).map(|s| s.to_string()).ok();
        } else if oid.to_string().starts_with("1.3.6.1.4.1.3704.1.3.") {
            let n = <u32 as Decode>::from_der(value)
                .map_err(|e| format!("VCEK extension {oid}: not a DER INTEGER ({e})"))?;
            let n = u8::try_from(n)
                .map_err(|_| format!("VCEK extension {oid}: SPL {n} out of range"))?;
            out.spls.insert(oid.to_string(), n);
        }
    }
    Ok(out)
}
