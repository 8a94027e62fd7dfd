//! RSAES-PKCS1-v1_5 decryption with implicit rejection, as draft-irtf-cfrg-rsa-guidance
//! ("Implementation Guidance for the PKCS #1 RSA Cryptography Specification") §7 states it,
//! checked against the draft's Appendix B test vectors (2048-, 2049-, 3072- and 4096-bit keys;
//! `testdata/rsa-implicit-rejection/`). A ciphertext with bad padding does not fail: it
//! decrypts to an alternative message derived from the private exponent and the ciphertext,
//! so the caller (and an attacker timing it) cannot tell good padding from bad — the
//! Bleichenbacher/Marvin padding oracle is closed. The steps of §7.2:
//!
//! 1. Length checking: the ciphertext C is k octets (k, the modulus length, at least 11).
//! 2. RSA decryption: EM = I2OSP(RSADP(K, OS2IP(C)), k).
//! 3. The alternative message: KDK = HMAC-SHA256(SHA256(I2OSP(d, k)), C) with the private
//!    exponent d as the key holds it (`EvpKey::rsa_exponent_hash`); CL = IRPRF(KDK,
//!    "length", 256) read as 128 big-endian 16-bit candidates, each masked to the bit length
//!    of the largest message length k - 11, AL = the last of them not above k - 11 (0 if
//!    none is); AM = IRPRF(KDK, "message", k).
//! 4. EME-PKCS1-v1_5 decoding of EM: 0x00 0x02, at least 8 non-zero octets, a 0x00
//!    separator; L = the octets after the separator.
//! 5. The last L octets of EM if the padding is valid, the last AL octets of AM otherwise.
//!
//! IRPRF(KDK, label, length) (§7.1) is the first `length` octets of
//! HMAC-SHA256(KDK, I2OSP(i, 2) ‖ label ‖ I2OSP(8·length, 2)) for i = 0, 1, ….
//!
//! The padding check, the choice of AL and the selection between the two messages run in
//! constant time (masks, no branch or index on a secret). The mask of step 3 follows the
//! draft: OpenSSL 3.2's implementation derives it from k - 10 instead, which gives another
//! AL (so other bytes) only when k - 10 is a power of two (k = 2ⁿ + 10 octets, no common key
//! size), and no published vector exercises the difference.

use super::pkey::EvpKey;
use crate::error::{Error, Result};
use crate::secret::Wiped;
use aws_lc_rs::hmac;
use cryptoki_sys::*;

/// Number of 16-bit candidates drawn for the alternative length (CL is 256 octets).
const LENGTH_CANDIDATES: usize = 128;

/// IRPRF (§7.1): HMAC-SHA256(KDK, I2OSP(i, 2) ‖ label ‖ I2OSP(bits, 2)) for i = 0, 1, …,
/// truncated to `bits / 8` octets. `bits` is 8·length, which the caller has checked fits in
/// two octets.
fn irprf(kdk: &hmac::Key, label: &[u8], bits: u16) -> Wiped {
    let out_len = usize::from(bits / 8);
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

/// Step 3.3: the alternative length AL from the candidate lengths CL (256 octets) for a
/// modulus of `k` octets: each big-endian 16-bit candidate masked to the bit length of the
/// largest message length k - 11; the last one not above k - 11 wins, 0 if none does. Every
/// candidate is read and compared the same way (no branch on a candidate's value).
fn alternative_length(cl: &[u8], k: usize) -> u32 {
    let max_len = (k - 11) as u32;
    // All-ones below the top set bit of k - 11: 2^bitlen(k - 11) - 1 (0 for k = 11).
    let mut mask = max_len;
    for shift in [1, 2, 4, 8, 16] {
        mask |= mask >> shift;
    }
    let mut al = 0u32;
    for c in cl.chunks_exact(2) {
        let cand = ((u32::from(c[0]) << 8) | u32::from(c[1])) & mask;
        // cand <= max_len, i.e. not (max_len < cand).
        al = ct_select(!ct_lt(max_len, cand), cand, al);
    }
    al
}

/// Decrypt a `k`-byte ciphertext; always succeeds for well-formed input (length k, value
/// below the modulus), returning the message or the alternative one.
pub fn pkcs1_decrypt(key: &EvpKey, k: usize, ct: &[u8]) -> Result<Wiped> {
    // Step 1.
    if ct.len() != k || k < 11 {
        return Err(Error::new(
            CKR_ENCRYPTED_DATA_LEN_RANGE,
            format!("ciphertext is {} bytes, the modulus {k}", ct.len()),
        ));
    }
    // IRPRF's output length in bits is two octets: k up to 8191 (a 65528-bit modulus).
    let Ok(message_bits) = u16::try_from(k * 8) else {
        return Err(Error::new(
            CKR_KEY_SIZE_RANGE,
            format!("a {k}-byte modulus is beyond implicit rejection's limit"),
        ));
    };
    // Step 2.
    let em = key.rsa_decrypt_raw(ct)?;
    let em = em.as_slice();
    // Step 3.1: KDK = HMAC-SHA256(key = SHA256(I2OSP(d, k)), message = C).
    let d_hash = key.rsa_exponent_hash(k)?;
    let kdk = Wiped::new(
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &d_hash), ct)
            .as_ref()
            .to_vec(),
    );
    let kdk = hmac::Key::new(hmac::HMAC_SHA256, &kdk);
    // Steps 3.2 and 3.3.
    let candidates = irprf(&kdk, b"length", (LENGTH_CANDIDATES * 2 * 8) as u16);
    let alternative = irprf(&kdk, b"message", message_bits);
    let alt_len = alternative_length(&candidates, k);
    // Step 4: 00 02, at least 8 non-zero padding bytes, a zero separator.
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
    // Step 5: both messages sit at the tail of their k-byte buffers; select byte by byte,
    // then keep the selected length (it is the output's length, so not a secret to hide).
    let out_len = ct_select(good, real_len, alt_len) as usize;
    let mut out = Wiped::new(vec![0u8; k]);
    for i in 0..k {
        out[i] = ct_select(good, u32::from(em[i]), u32::from(alternative[i])) as u8;
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

    /// One case of the draft's Appendix B (`testdata/rsa-implicit-rejection/vectors.json`).
    struct Case {
        id: String,
        valid_padding: bool,
        ciphertext: Vec<u8>,
        message: Vec<u8>,
    }

    /// One key of Appendix B with its cases: (PKCS#8 DER, modulus bytes k, cases).
    struct Group {
        der: Vec<u8>,
        k: usize,
        cases: Vec<Case>,
    }

    fn appendix_b() -> Vec<Group> {
        use base64::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join("rsa-implicit-rejection");
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        };
        let doc: serde_json::Value = serde_json::from_str(&read("vectors.json")).unwrap();
        let hex = |v: &serde_json::Value| hex::decode(v.as_str().unwrap()).unwrap();
        doc["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let pem = read(g["key"].as_str().unwrap());
                let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
                let der = base64::engine::general_purpose::STANDARD
                    .decode(body)
                    .unwrap();
                let bits = g["modulus_bits"].as_u64().unwrap() as usize;
                let cases = g["cases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| Case {
                        id: c["id"].as_str().unwrap().to_string(),
                        valid_padding: c["valid_padding"].as_bool().unwrap(),
                        ciphertext: hex(&c["ciphertext"]),
                        message: hex(&c["message"]),
                    })
                    .collect();
                Group {
                    der,
                    k: bits.div_ceil(8),
                    cases,
                }
            })
            .collect()
    }

    /// Decrypts every Appendix B case whose padding is (or is not) valid with the module's
    /// `pkcs1_decrypt`, comparing to the published output; returns how many it checked.
    fn decrypt_appendix_b(valid_padding: bool) -> usize {
        let mut checked = 0;
        for g in appendix_b() {
            let key = EvpKey::from_pkcs8(&g.der).unwrap();
            for c in g.cases.iter().filter(|c| c.valid_padding == valid_padding) {
                assert_eq!(c.ciphertext.len(), g.k, "{}", c.id);
                let got = pkcs1_decrypt(&key, g.k, &c.ciphertext)
                    .unwrap_or_else(|e| panic!("{}: {e:?}", c.id));
                assert_eq!(hex::encode(&got[..]), hex::encode(&c.message), "{}", c.id);
                checked += 1;
            }
        }
        checked
    }

    /// draft-irtf-cfrg-rsa-guidance Appendix B: the ciphertexts with valid padding (a
    /// message, an empty one, one whose ciphertext starts with a zero byte) decrypt to their
    /// messages, for the 2048-, 2049-, 3072- and 4096-bit keys.
    #[test]
    fn draft_appendix_b_valid_padding_decrypts_to_the_message() {
        assert_eq!(decrypt_appendix_b(true), 4 * 3);
    }

    /// draft-irtf-cfrg-rsa-guidance Appendix B: every ciphertext with bad padding (wrong
    /// first or second byte, short or missing padding, no separator; alternative messages
    /// of length 0, k - 11, from the second-to-last candidate length) decrypts to the
    /// published alternative message.
    #[test]
    fn draft_appendix_b_bad_padding_decrypts_to_the_published_alternative_message() {
        assert_eq!(decrypt_appendix_b(false), 4 * 9);
    }

    /// The vectors' padding labels, checked with an independent strict PKCS#1 v1.5 decoder
    /// (RustCrypto `rsa`, which errors on bad padding): the "valid" cases decrypt to their
    /// message, the others fail. So the alternative-message test does exercise rejection.
    #[test]
    fn draft_appendix_b_labels_agree_with_a_strict_decoder() {
        for g in appendix_b() {
            let key = rsa::RsaPrivateKey::from_pkcs8_der(&g.der).unwrap();
            for c in &g.cases {
                let strict = key.decrypt(rsa::Pkcs1v15Encrypt, &c.ciphertext);
                if c.valid_padding {
                    assert_eq!(strict.unwrap(), c.message, "{}", c.id);
                } else {
                    assert!(strict.is_err(), "{}", c.id);
                }
            }
        }
    }

    /// Step 3.3: AL is the last candidate not above k - 11 (candidates above it are
    /// skipped, not clamped), 0 when none qualifies.
    #[test]
    fn alternative_length_is_the_last_candidate_not_above_k_minus_11() {
        // k = 256: k - 11 = 245 (0xf5), mask 0xff.
        let mut cl = [0u8; 256];
        cl[0..2].copy_from_slice(&[0x00, 0x07]);
        cl[2..4].copy_from_slice(&[0x00, 0xf5]);
        cl[4..].fill(0xff); // 0xffff & 0xff = 255 > 245: skipped
        assert_eq!(alternative_length(&cl, 256), 245);
        cl[2..4].copy_from_slice(&[0x00, 0xf6]); // 246 > 245: skipped, 7 stays
        assert_eq!(alternative_length(&cl, 256), 7);
        cl[0..2].copy_from_slice(&[0x12, 0xf6]); // 0xf6 after the mask: skipped
        assert_eq!(alternative_length(&cl, 256), 0);
    }

    /// Step 3.3's mask is the bit length of k - 11, the largest message length. For
    /// k = 266 (k - 11 = 255) it is 0xff, so a candidate 0x0100 becomes 0 and is taken; a
    /// mask from k - 10 (= 256, OpenSSL 3.2's choice) would keep the 0x100 bit and skip it.
    #[test]
    fn alternative_length_masks_to_the_bit_length_of_k_minus_11() {
        let mut cl = [0u8; 256];
        for pair in cl.chunks_exact_mut(2) {
            pair.copy_from_slice(&[0x00, 0x05]);
        }
        cl[254..].copy_from_slice(&[0x01, 0x00]);
        assert_eq!(alternative_length(&cl, 266), 0);
        cl[254..].copy_from_slice(&[0x01, 0xff]);
        assert_eq!(alternative_length(&cl, 266), 255);
        // k = 267 (k - 11 = 256): mask 0x1ff, 0x100 is taken as 256, 0x101 skipped.
        cl[254..].copy_from_slice(&[0x01, 0x00]);
        assert_eq!(alternative_length(&cl, 267), 256);
        cl[254..].copy_from_slice(&[0x01, 0x01]);
        assert_eq!(alternative_length(&cl, 267), 5);
    }

    /// IRPRF encodes its output length in bits in two octets (§7.1): a modulus of 8192
    /// bytes or more is refused before any key operation.
    #[test]
    fn a_modulus_beyond_the_irprf_length_field_is_refused() {
        let key = EvpKey::from_pkcs8(rsa_pkcs8()).unwrap();
        assert_eq!(
            pkcs1_decrypt(&key, 8192, &[0u8; 8192]).unwrap_err().rv(),
            CKR_KEY_SIZE_RANGE
        );
    }
}
