//! Compact JWS (RS256) as MAA, Entra and Key Vault use it.

use crate::util::{b64_lenient, b64url};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use serde_json::Value;
use sha2::Sha256;

pub fn sign_rs256(header: &Value, payload: &Value, key: &rsa::RsaPrivateKey) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(payload.to_string().as_bytes())
    );
    let signer = SigningKey::<Sha256>::new(key.clone());
    let sig = signer.sign(input.as_bytes());
    format!("{input}.{}", b64url(&sig.to_bytes()))
}

/// A compact JWS split and decoded, not yet verified.
pub struct Jws {
    pub header: Value,
    pub payload: Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

pub fn decode(token: &str) -> Result<Jws, String> {
    let parts: Vec<&str> = token.trim().split('.').collect();
    if parts.len() != 3 {
        return Err(format!("not a compact JWS ({} parts)", parts.len()));
    }
    let header: Value = serde_json::from_slice(&b64_lenient(parts[0])?)
        .map_err(|e| format!("JWS header is not JSON: {e}"))?;
    let payload: Value = serde_json::from_slice(&b64_lenient(parts[1])?)
        .map_err(|e| format!("JWS payload is not JSON: {e}"))?;
    let signature = b64_lenient(parts[2])?;
    Ok(Jws {
        header,
        payload,
        signing_input: format!("{}.{}", parts[0], parts[1]),
        signature,
    })
}

impl Jws {
    pub fn verify_rs256(&self, key: &rsa::RsaPublicKey) -> Result<(), String> {
        if self.header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("JWS alg is not RS256".into());
        }
        let sig = Signature::try_from(self.signature.as_slice())
            .map_err(|_| "JWS signature is malformed".to_string())?;
        VerifyingKey::<Sha256>::new(key.clone())
            .verify(self.signing_input.as_bytes(), &sig)
            .map_err(|_| "JWS signature does not verify".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sign_then_verify_and_tamper() {
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let token = sign_rs256(&json!({"alg":"RS256","typ":"JWT"}), &json!({"a":1}), &key);
        let jws = decode(&token).unwrap();
        assert_eq!(jws.payload["a"], 1);
        jws.verify_rs256(&key.to_public_key()).unwrap();
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[1] = b64url(br#"{"a":2}"#);
        let forged = decode(&parts.join(".")).unwrap();
        assert!(forged.verify_rs256(&key.to_public_key()).is_err());
    }
}
