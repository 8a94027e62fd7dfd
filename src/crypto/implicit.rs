//! RSA PKCS#1 v1.5 decryption with implicit rejection, modelled on the construction of
//! draft-irtf-cfrg-rsa-guidance (KDK = HMAC(SHA-256(d), c); synthetic message and length
//! from an HMAC-SHA256 PRF; not checked against that draft's test vectors, so the synthetic
//! bytes may differ from other implementations' — which only matters for interop tests,
//! not for the security property). A ciphertext with bad
//! padding does not fail: it decrypts to a synthetic message derived from the private key
//! and the ciphertext, so the caller (and an attacker timing it) cannot tell good padding
//! from bad — the Bleichenbacher/Marvin padding oracle is closed. The padding check and the
//! selection between real and synthetic message run in constant time.

use super::pkey::EvpKey;
use crate::error::{Error, Result};
use crate::secret::Wiped;
use aws_lc_rs::hmac;
use cryptoki_sys::*;

/// Candidate lengths drawn for the synthetic message (the draft's value).
const LENGTH_CANDIDATES: usize = 128;

/// IRPRF: HMAC-SHA256(kdk, BE16(i) ‖ label ‖ BE16(bits)) for i = 0, 1, … truncated.
fn prf(kdk: &hmac::Key, label: &[u8], out_len: usize) -> Wiped {
    let bits = (out_len * 8) as u16;
    let mut out = Wiped::new(Vec::with_capacity(out_len + 32));
    let mut i: u16 = 0;
    while out.len() < out_len {
        let mut ctx = hmac::Context::with_key(kdk);
        ctx.update(&i.to_be_bytes());
        ctx.update(label);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        i += 1;
    }
    out.truncate(out_len);
    out
}

// Constant-time helpers on u32 masks (all-ones for true, zero for false).
fn ct_is_zero(x: u32) -> u32 {
    // Top bit of (~x & (x - 1)) is set only for x == 0.
    0u32.wrapping_sub((!x & x.wrapping_sub(1)) >> 31)
}
fn ct_eq(a: u32, b: u32) -> u32 {
    ct_is_zero(a ^ b)
}
fn ct_lt(a: u32, b: u32) -> u32 {
    // For values below 2^31: the sign bit of a - b.
    0u32.wrapping_sub(a.wrapping_sub(b) >> 31)
}
fn ct_select(mask: u32, a: u32, b: u32) -> u32 {
    (mask & a) | (!mask & b)
}

/// Decrypt a `k`-byte ciphertext; always succeeds for well-formed input (length k, value
/// below the modulus), returning the message or the synthetic one.
pub fn pkcs1_decrypt(key: &EvpKey, k: usize, ct: &[u8]) -> Result<Wiped> {
    if ct.len() != k || k < 11 + 2 {
        return Err(Error::new(
            CKR_ENCRYPTED_DATA_LEN_RANGE,
            format!("ciphertext is {} bytes, the modulus {k}", ct.len()),
        ));
    }
    let em = key.rsa_decrypt_raw(ct)?;
    let em = em.as_slice();
    // Key derivation key: HMAC-SHA256(SHA-256(d), ciphertext).
    let d_hash = key.rsa_exponent_hash(k)?;
    let kdk = Wiped::new(
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &d_hash), ct)
            .as_ref()
            .to_vec(),
    );
    let kdk = hmac::Key::new(hmac::HMAC_SHA256, &kdk);
    let synthetic = prf(&kdk, b"message", k);
    let candidates = prf(&kdk, b"length", LENGTH_CANDIDATES * 2);
    // Synthetic length: the last candidate (masked to the bit size of the bound) that is
    // below the largest message length.
    let max_sep_offset = (k - 2 - 8) as u32;
    let mut len_mask = max_sep_offset;
    for shift in [1, 2, 4, 8, 16] {
        len_mask |= len_mask >> shift;
    }
    let mut synthetic_len = 0u32;
    for c in candidates.chunks(2) {
        let cand = ((u32::from(c[0]) << 8) | u32::from(c[1])) & len_mask;
        synthetic_len = ct_select(ct_lt(cand, max_sep_offset), cand, synthetic_len);
    }
    // Padding check: 00 02, at least 8 non-zero padding bytes, a zero separator.
    let mut good = ct_eq(u32::from(em[0]), 0) & ct_eq(u32::from(em[1]), 2);
    let mut found = 0u32;
    let mut zero_index = 0u32;
    for (i, &b) in em.iter().enumerate().skip(2) {
        let is_zero = ct_is_zero(u32::from(b));
        zero_index = ct_select(!found & is_zero, i as u32, zero_index);
        found |= is_zero;
    }
    good &= found;
    good &= !ct_lt(zero_index, 2 + 8);
    let real_len = (k as u32).wrapping_sub(zero_index + 1);
    let out_len = ct_select(good, real_len, synthetic_len) as usize;
    // Both messages sit at the tail of their k-byte buffers: select byte by byte.
    let mut out = Wiped::new(vec![0u8; k]);
    for i in 0..k {
        out[i] = ct_select(good, u32::from(em[i]), u32::from(synthetic[i])) as u8;
    }
    Ok(Wiped::new(out[k - out_len..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::ops::tests::rsa_pkcs8;
    use rsa::pkcs8::DecodePrivateKey;

    #[test]
    fn constant_time_helpers() {
        assert_eq!(ct_is_zero(0), u32::MAX);
        assert_eq!(ct_is_zero(5), 0);
        assert_eq!(ct_eq(7, 7), u32::MAX);
        assert_eq!(ct_lt(3, 9), u32::MAX);
        assert_eq!(ct_lt(9, 3), 0);
        assert_eq!(ct_lt(9, 9), 0);
        assert_eq!(ct_select(u32::MAX, 1, 2), 1);
        assert_eq!(ct_select(0, 1, 2), 2);
    }

    #[test]
    fn good_padding_decrypts_bad_padding_gives_a_stable_synthetic_message() {
        let der = rsa_pkcs8();
        let key = EvpKey::from_pkcs8(der).unwrap();
        let public = rsa::RsaPrivateKey::from_pkcs8_der(der)
            .unwrap()
            .to_public_key();
        let mut rng = rand::thread_rng();
        for msg in [
            &b""[..],
            b"x",
            b"48-byte TLS premaster secret..................",
            &[0xAB; 245],
        ] {
            let ct = public.encrypt(&mut rng, rsa::Pkcs1v15Encrypt, msg).unwrap();
            assert_eq!(&pkcs1_decrypt(&key, 256, &ct).unwrap()[..], msg);
        }
        // OAEP ciphertexts have no PKCS#1 v1.5 padding: implicit rejection, no error.
        let ct = public
            .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), b"secret")
            .unwrap();
        let a = pkcs1_decrypt(&key, 256, &ct).unwrap();
        let b = pkcs1_decrypt(&key, 256, &ct).unwrap();
        assert_eq!(a, b, "the synthetic message is deterministic");
        assert!(a.len() <= 256 - 11);
        assert_ne!(&a[..], b"secret");
        let mut ct2 = ct.clone();
        ct2[255] ^= 1;
        assert_ne!(
            pkcs1_decrypt(&key, 256, &ct2).unwrap(),
            a,
            "depends on the ciphertext"
        );
        assert_eq!(
            pkcs1_decrypt(&key, 256, &ct[..100]).unwrap_err().rv(),
            CKR_ENCRYPTED_DATA_LEN_RANGE
        );
    }
}
