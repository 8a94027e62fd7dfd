//! The engine calls the release path needs (`src/release` never calls AWS-LC itself): RS256
//! signatures of MAA tokens and release JWSs, and the public half of a released private key,
//! which the release path compares with the public key the vault describes.

/// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`), RSA 2048 to 8192 bits. `public_key` is the
/// DER the signer's certificate carries (PKCS#1 RSAPublicKey).
pub fn verify_rs256(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    )
    .verify(message, signature)
    .is_ok()
}

/// Why a private key's public half could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicHalfError {
    /// The JWK curve name is not one the engine signs with.
    UnsupportedCurve,
    /// Not a valid PKCS#8 key of the expected type and curve (the engine's reason).
    Invalid(String),
}

impl std::fmt::Display for PublicHalfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicHalfError::UnsupportedCurve => f.write_str("unsupported curve"),
            PublicHalfError::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// Modulus and public exponent (big-endian, no leading zeros) of a PKCS#8 RSA private key,
/// after the engine's consistency checks of the key.
pub fn rsa_public_of_pkcs8(pkcs8: &[u8]) -> Result<(Vec<u8>, Vec<u8>), PublicHalfError> {
    use aws_lc_rs::signature::KeyPair;
    let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(pkcs8)
        .map_err(|e| PublicHalfError::Invalid(e.to_string()))?;
    let pk = kp.public_key();
    Ok((
        pk.modulus().big_endian_without_leading_zero().to_vec(),
        pk.exponent().big_endian_without_leading_zero().to_vec(),
    ))
}

/// The uncompressed public point (04 ‖ X ‖ Y) of a PKCS#8 EC private key on the JWK curve
/// `crv` (P-256, P-384, P-521, P-256K).
pub fn ec_public_point_of_pkcs8(crv: &str, pkcs8: &[u8]) -> Result<Vec<u8>, PublicHalfError> {
    use aws_lc_rs::signature::{self as sig, KeyPair};
    let alg = match crv {
        "P-256" => &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
        "P-384" => &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
        "P-521" => &sig::ECDSA_P521_SHA512_ASN1_SIGNING,
        "P-256K" => &sig::ECDSA_P256K1_SHA256_ASN1_SIGNING,
        _ => return Err(PublicHalfError::UnsupportedCurve),
    };
    let kp = sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8)
        .map_err(|e| PublicHalfError::Invalid(e.to_string()))?;
    Ok(kp.public_key().as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{KeyPair, RsaKeyPair, RSA_PKCS1_SHA256};

    #[test]
    fn rs256_verifies_only_the_signed_message() {
        let kp = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut sig = vec![0; kp.public_modulus_len()];
        kp.sign(&RSA_PKCS1_SHA256, &rng, b"header.payload", &mut sig)
            .unwrap();
        let public = kp.public_key().as_ref().to_vec();
        assert!(verify_rs256(&public, b"header.payload", &sig));
        assert!(!verify_rs256(&public, b"header.payloaD", &sig));
        sig[0] ^= 1;
        assert!(!verify_rs256(&public, b"header.payload", &sig));
        assert!(!verify_rs256(b"not a key", b"header.payload", &sig));
    }

    #[test]
    fn public_halves_of_private_keys() {
        let kp = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = kp.as_der().unwrap();
        let (n, e) = rsa_public_of_pkcs8(der.as_ref()).unwrap();
        assert_eq!(n.len(), 256);
        assert_eq!(e, [1, 0, 1]);
        assert!(matches!(
            rsa_public_of_pkcs8(b"junk"),
            Err(PublicHalfError::Invalid(_))
        ));

        let rng = aws_lc_rs::rand::SystemRandom::new();
        let alg = &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1_SIGNING;
        let pkcs8 = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let point = ec_public_point_of_pkcs8("P-384", pkcs8.as_ref()).unwrap();
        let expected = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref())
            .unwrap()
            .public_key()
            .as_ref()
            .to_vec();
        assert_eq!(point, expected);
        assert_eq!(point.len(), 97);
        // The right key on the wrong curve, and a curve the engine does not sign with.
        assert!(matches!(
            ec_public_point_of_pkcs8("P-256", pkcs8.as_ref()),
            Err(PublicHalfError::Invalid(_))
        ));
        assert_eq!(
            ec_public_point_of_pkcs8("X25519", pkcs8.as_ref()),
            Err(PublicHalfError::UnsupportedCurve)
        );
    }
}
