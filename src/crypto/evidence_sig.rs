//! Signature checks on TEE evidence: the SNP report's ECDSA P-384 / SHA-384 signature (VCEK or
//! VLEK) and the vTPM's RSASSA-PKCS#1 v1.5 / SHA-256 quote and certify signatures. Only the
//! primitives live here; the layouts (where r and s sit, what is signed) belong to the parsers
//! in `release::evidence`.

use crate::error::{Error, Result, Step};
use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};

/// Verify ECDSA P-384 over SHA-384(`msg`) with `public_point` (SEC1 uncompressed point, as in
/// the certificate's subjectPublicKey) and the signature as big-endian r ‖ s (48 bytes each).
pub fn verify_ecdsa_p384_sha384(public_point: &[u8], msg: &[u8], r_s: &[u8; 96]) -> Result<()> {
    UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, public_point)
        .verify(msg, r_s)
        .map_err(|_| {
            Error::integrity(
                Step::Evidence,
                "ECDSA P-384 / SHA-384 signature does not verify with the given public key",
            )
        })
}

/// Verify RSASSA-PKCS#1 v1.5 / SHA-256 with the public key given as big-endian modulus and
/// exponent (a JWK's `n` and `e`, or a TPM2B_PUBLIC's unique and exponent).
pub fn verify_rsa_pkcs1_sha256(n: &[u8], e: &[u8], msg: &[u8], sig: &[u8]) -> Result<()> {
    RsaPublicKeyComponents { n, e }
        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
        .map_err(|_| {
            Error::integrity(
                Step::Evidence,
                "RSASSA-PKCS1-v1.5 / SHA-256 signature does not verify with the given RSA key",
            )
        })
}

/// Verify RSASSA-PKCS#1 v1.5 / SHA-256 with a DER RSAPublicKey (PKCS#1, the subjectPublicKey
/// of an RSA SubjectPublicKeyInfo).
pub fn verify_rsa_pkcs1_sha256_der(
    rsa_public_key_der: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<()> {
    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, rsa_public_key_der)
        .verify(msg, sig)
        .map_err(|_| {
            Error::integrity(
                Step::Evidence,
                "RSASSA-PKCS1-v1.5 / SHA-256 signature does not verify with the given RSA key",
            )
        })
}
