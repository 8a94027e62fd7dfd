//! AES key wrap with padding (RFC 5649), unwrap only: the last step of a release (the KEK comes
//! from the RSA-OAEP block, `rsa_oaep`). AES-128 and AES-256 KEKs go through aws-lc-rs's
//! `key_wrap`; it has no AES-192, so a 24-byte KEK runs RFC 5649 §4.2 here over AES-192-ECB
//! (the same code is checked against aws-lc for 128 and 256 bits, and against RFC 5649's own
//! AES-192 vectors). Below it, the PKCS#11 key-wrap mechanisms' RFC 3394 and RFC 5649 wrap
//! and unwrap for every AES key size. Known answers (`testdata/aes-keywrap/`): RFC 3394 §4's
//! six vectors, and Wycheproof AES-KWP cases for AES-128, -192 and -256 KEKs, valid ones in
//! both directions and invalid ones that every unwrap path must refuse.

use crate::secret::SecretBytes;

/// Why an unwrap failed (the caller words it for its step).
#[derive(Debug, PartialEq, Eq)]
pub enum UnwrapError {
    /// The KEK is not an AES key (16, 24 or 32 bytes); carries its length.
    KekLength(usize),
    /// The integrity check (alternative IV, length indicator, zero padding) did not pass.
    Integrity,
}

/// AES key unwrap with padding (RFC 5649), into locked memory.
pub fn aes_kwp_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<SecretBytes, UnwrapError> {
    use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_128, AES_256};
    let mut out = SecretBytes::zeroed(wrapped.len());
    let len = match kek.len() {
        16 | 32 => {
            let cipher = if kek.len() == 16 { &AES_128 } else { &AES_256 };
            let kek = AesKek::new(cipher, kek).map_err(|_| UnwrapError::Integrity)?;
            kek.unwrap_with_padding(wrapped, out.as_mut_slice())
                .map_err(|_| UnwrapError::Integrity)?
                .len()
        }
        24 => kwp_unwrap_ecb(kek, wrapped, out.as_mut_slice()).ok_or(UnwrapError::Integrity)?,
        n => return Err(UnwrapError::KekLength(n)),
    };
    Ok(SecretBytes::from_slice(&out.as_slice()[..len]))
}

/// RFC 5649 §4.2 unwrap over an AES block decryptor; returns the plaintext length.
pub(crate) fn kwp_unwrap_ecb(kek: &[u8], wrapped: &[u8], out: &mut [u8]) -> Option<usize> {
    if wrapped.len() < 16 || !wrapped.len().is_multiple_of(8) || out.len() < wrapped.len() - 8 {
        return None;
    }
    let n = wrapped.len() / 8 - 1;
    // R[1..n] are the semiblocks after the first, decrypted into `out`.
    let r = &mut out[..n * 8];
    let a = if n == 1 {
        // One semiblock of key data: a single AES block holds A ‖ P (§4.2 n = 1).
        let mut block = [0u8; 16];
        block.copy_from_slice(wrapped);
        let decrypted = ecb_block(kek, &mut block, false);
        let mut a = [0u8; 8];
        a.copy_from_slice(&block[..8]);
        r.copy_from_slice(&block[8..]);
        zeroize::Zeroize::zeroize(&mut block);
        decrypted.ok()?;
        a
    } else {
        w_inverse(kek, wrapped, r).ok()?
    };
    // Alternative IV A65959A6 and a message length indicator within the last semiblock.
    if a[..4] != [0xA6, 0x59, 0x59, 0xA6] {
        return None;
    }
    let mli = u32::from_be_bytes([a[4], a[5], a[6], a[7]]) as usize;
    if mli == 0 || mli > n * 8 || mli <= (n - 1) * 8 {
        return None;
    }
    if r[mli..].iter().any(|&b| b != 0) {
        return None;
    }
    r[mli..].fill(0);
    Some(mli)
}

/// The RFC 3394 default IV (§2.2.3.1).
const KW_IV: [u8; 8] = [0xA6; 8];

/// Why a wrap or unwrap of the PKCS#11 key-wrap mechanisms failed.
#[derive(Debug, PartialEq, Eq)]
pub enum WrapError {
    /// Input length impossible for the mode (KW: multiple of 8, at least 16 bytes).
    Length,
    /// The KEK is not 16, 24 or 32 bytes.
    KekLength(usize),
    /// The integrity check failed (unwrap).
    Integrity,
}

fn ecb_keys(
    kek: &[u8],
) -> Result<
    (
        aws_lc_rs::cipher::EncryptingKey,
        aws_lc_rs::cipher::DecryptingKey,
    ),
    WrapError,
> {
    use aws_lc_rs::cipher::{
        DecryptingKey, EncryptingKey, UnboundCipherKey, AES_128, AES_192, AES_256,
    };
    let alg = match kek.len() {
        16 => &AES_128,
        24 => &AES_192,
        32 => &AES_256,
        n => return Err(WrapError::KekLength(n)),
    };
    let e = UnboundCipherKey::new(alg, kek).and_then(EncryptingKey::ecb);
    let d = UnboundCipherKey::new(alg, kek).and_then(DecryptingKey::ecb);
    match (e, d) {
        (Ok(e), Ok(d)) => Ok((e, d)),
        _ => Err(WrapError::KekLength(kek.len())),
    }
}

/// One AES block en- or decrypted in place under `kek` (the n = 1 cases of RFC 5649).
fn ecb_block(kek: &[u8], block: &mut [u8; 16], encrypt: bool) -> Result<(), WrapError> {
    use aws_lc_rs::cipher::{DecryptionContext, EncryptionContext};
    let (enc, dec) = ecb_keys(kek)?;
    let done = if encrypt {
        enc.less_safe_encrypt(block, EncryptionContext::None)
            .map(drop)
    } else {
        dec.decrypt(block, DecryptionContext::None).map(drop)
    };
    done.map_err(|_| WrapError::Integrity)
}

/// RFC 3394 §2.2.1 W over the semiblocks of `plain` with initial value `a`: A ‖ R[1..n].
fn w(kek: &[u8], a: [u8; 8], plain: &[u8]) -> Result<Vec<u8>, WrapError> {
    use aws_lc_rs::cipher::EncryptionContext;
    let (enc, _) = ecb_keys(kek)?;
    let n = plain.len() / 8;
    let mut out = vec![0u8; 8 + plain.len()];
    let mut a = a;
    let mut block = [0u8; 16];
    out[8..].copy_from_slice(plain);
    for j in 0..6u64 {
        for i in 1..=n {
            block[..8].copy_from_slice(&a);
            block[8..].copy_from_slice(&out[i * 8..i * 8 + 8]);
            enc.less_safe_encrypt(&mut block, EncryptionContext::None)
                .map_err(|_| WrapError::Integrity)?;
            let t = (n as u64) * j + i as u64;
            a.copy_from_slice(&block[..8]);
            for (x, y) in a.iter_mut().zip(t.to_be_bytes()) {
                *x ^= y;
            }
            out[i * 8..i * 8 + 8].copy_from_slice(&block[8..]);
        }
    }
    zeroize::Zeroize::zeroize(&mut block);
    out[..8].copy_from_slice(&a);
    Ok(out)
}

/// RFC 3394 §2.2.2 W⁻¹: (A, R[1..n]) into `out`, which holds n semiblocks.
fn w_inverse(kek: &[u8], wrapped: &[u8], out: &mut [u8]) -> Result<[u8; 8], WrapError> {
    use aws_lc_rs::cipher::DecryptionContext;
    let (_, dec) = ecb_keys(kek)?;
    let n = wrapped.len() / 8 - 1;
    let mut a = [0u8; 8];
    let mut block = [0u8; 16];
    a.copy_from_slice(&wrapped[..8]);
    out.copy_from_slice(&wrapped[8..]);
    for j in (0..6u64).rev() {
        for i in (1..=n).rev() {
            let t = (n as u64) * j + i as u64;
            for (x, y) in a.iter_mut().zip(t.to_be_bytes()) {
                *x ^= y;
            }
            block[..8].copy_from_slice(&a);
            block[8..].copy_from_slice(&out[(i - 1) * 8..i * 8]);
            dec.decrypt(&mut block, DecryptionContext::None)
                .map_err(|_| WrapError::Integrity)?;
            a.copy_from_slice(&block[..8]);
            out[(i - 1) * 8..i * 8].copy_from_slice(&block[8..]);
        }
    }
    zeroize::Zeroize::zeroize(&mut block);
    Ok(a)
}

/// CKM_AES_KEY_WRAP: RFC 3394 wrap with the default IV.
pub fn aes_kw_wrap(kek: &[u8], plain: &[u8]) -> Result<Vec<u8>, WrapError> {
    if plain.len() < 16 || !plain.len().is_multiple_of(8) {
        return Err(WrapError::Length);
    }
    w(kek, KW_IV, plain)
}

/// CKM_AES_KEY_WRAP: RFC 3394 unwrap, checking the default IV; into locked memory.
pub fn aes_kw_unwrap(kek: &[u8], wrapped: &[u8]) -> Result<SecretBytes, WrapError> {
    if wrapped.len() < 24 || !wrapped.len().is_multiple_of(8) {
        return Err(WrapError::Length);
    }
    let mut out = SecretBytes::in_arena(wrapped.len() - 8);
    let a = w_inverse(kek, wrapped, out.as_mut_slice())?;
    if aws_lc_rs::constant_time::verify_slices_are_equal(&a, &KW_IV).is_err() {
        return Err(WrapError::Integrity);
    }
    Ok(out)
}

/// CKM_AES_KEY_WRAP_KWP: RFC 5649 wrap (any non-empty length).
pub fn aes_kwp_wrap(kek: &[u8], plain: &[u8]) -> Result<Vec<u8>, WrapError> {
    if plain.is_empty() || plain.len() > u32::MAX as usize {
        return Err(WrapError::Length);
    }
    let mut aiv = [0xA6, 0x59, 0x59, 0xA6, 0, 0, 0, 0];
    aiv[4..].copy_from_slice(&(plain.len() as u32).to_be_bytes());
    let mut padded = zeroize::Zeroizing::new(vec![0u8; plain.len().div_ceil(8) * 8]);
    padded[..plain.len()].copy_from_slice(plain);
    if padded.len() == 8 {
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&aiv);
        block[8..].copy_from_slice(&padded);
        ecb_block(kek, &mut block, true)?;
        return Ok(block.to_vec());
    }
    w(kek, aiv, &padded)
}

/// CKM_AES_KEY_WRAP_KWP: RFC 5649 unwrap for any AES KEK size.
pub fn aes_kwp_unwrap_any(kek: &[u8], wrapped: &[u8]) -> Result<SecretBytes, WrapError> {
    if ![16, 24, 32].contains(&kek.len()) {
        return Err(WrapError::KekLength(kek.len()));
    }
    if wrapped.len() < 16 || !wrapped.len().is_multiple_of(8) {
        return Err(WrapError::Length);
    }
    let mut out = SecretBytes::in_arena(wrapped.len() - 8);
    let n = kwp_unwrap_ecb(kek, wrapped, out.as_mut_slice()).ok_or(WrapError::Integrity)?;
    Ok(SecretBytes::in_arena_from(&out.as_slice()[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5649 §6: the published vectors (AES-192 KEK), both the 20-byte and the
    /// single-block 7-byte case.
    #[test]
    fn rfc5649_published_vectors_aes192() {
        let kek = hex("5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8");
        let cases = [
            (
                "138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a",
                "c37b7e6492584340 bed1220780894115 5068f738",
            ),
            ("afbeb0f07dfbf541 9200f2ccb50bb24f", "466f7250617369"),
        ];
        for (wrapped, plain) in cases {
            let (wrapped, plain) = (hex(wrapped), hex(plain));
            assert_eq!(aes_kwp_unwrap(&kek, &wrapped).unwrap().as_slice(), plain);
            let mut tampered = wrapped.clone();
            *tampered.last_mut().unwrap() ^= 1;
            assert_eq!(
                aes_kwp_unwrap(&kek, &tampered).unwrap_err(),
                UnwrapError::Integrity
            );
        }
    }

    /// Every AES key size, lengths that exercise padding and the single-block case, wrapped
    /// by an independent implementation (RustCrypto `aes-kw`).
    #[test]
    fn every_kek_size_unwraps_what_rustcrypto_wraps() {
        for kek_len in [16usize, 24, 32] {
            let kek: Vec<u8> = (0..kek_len as u8).map(|i| i.wrapping_mul(7)).collect();
            for len in [1usize, 7, 8, 9, 20, 32, 1216] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 3) as u8).collect();
                let mut wrapped = vec![0u8; len.div_ceil(8) * 8 + 8];
                match kek_len {
                    16 => aes_kw::KekAes128::try_from(&kek[..])
                        .unwrap()
                        .wrap_with_padding(&plain, &mut wrapped),
                    24 => aes_kw::KekAes192::try_from(&kek[..])
                        .unwrap()
                        .wrap_with_padding(&plain, &mut wrapped),
                    _ => aes_kw::KekAes256::try_from(&kek[..])
                        .unwrap()
                        .wrap_with_padding(&plain, &mut wrapped),
                }
                .unwrap();
                let got = aes_kwp_unwrap(&kek, &wrapped).unwrap();
                assert_eq!(got.as_slice(), plain.as_slice(), "kek {kek_len} len {len}");
                // The own RFC 5649 code agrees for every size, not only AES-192.
                let mut out = vec![0u8; wrapped.len()];
                let n = kwp_unwrap_ecb(&kek, &wrapped, &mut out).unwrap();
                assert_eq!(&out[..n], plain.as_slice());
                let mut tampered = wrapped.clone();
                tampered[0] ^= 0x80;
                assert_eq!(
                    aes_kwp_unwrap(&kek, &tampered).unwrap_err(),
                    UnwrapError::Integrity
                );
            }
        }
    }

    #[test]
    fn a_kek_that_is_not_an_aes_key_is_refused_by_length() {
        assert_eq!(
            aes_kwp_unwrap(&[0u8; 20], &[0u8; 24]).unwrap_err(),
            UnwrapError::KekLength(20)
        );
    }

    fn testdata(name: &str) -> serde_json::Value {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join("aes-keywrap")
            .join(name);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn field(v: &serde_json::Value, name: &str) -> Vec<u8> {
        hex(v[name].as_str().unwrap())
    }

    /// An RFC 3394 §4 vector (`testdata/aes-keywrap/rfc3394-vectors.json`).
    struct KwVector {
        section: String,
        kek: Vec<u8>,
        data: Vec<u8>,
        ct: Vec<u8>,
    }

    /// RFC 3394 §4.1–4.6: one 128-bit, two 192-bit and three 256-bit KEKs.
    fn rfc3394_vectors() -> Vec<KwVector> {
        let doc = testdata("rfc3394-vectors.json");
        let v: Vec<_> = doc["tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| KwVector {
                section: t["section"].as_str().unwrap().to_string(),
                kek: field(t, "kek"),
                data: field(t, "key_data"),
                ct: field(t, "ciphertext"),
            })
            .collect();
        let kek_sizes: Vec<usize> = v.iter().map(|t| t.kek.len()).collect();
        assert_eq!(kek_sizes, [16, 24, 32, 24, 32, 32]);
        v
    }

    #[test]
    fn rfc3394_vectors_wrap_to_the_published_ciphertext() {
        for t in rfc3394_vectors() {
            assert_eq!(
                aes_kw_wrap(&t.kek, &t.data).unwrap(),
                t.ct,
                "§{}",
                t.section
            );
        }
    }

    #[test]
    fn rfc3394_vectors_unwrap_to_the_published_key_data() {
        for t in rfc3394_vectors() {
            assert_eq!(
                aes_kw_unwrap(&t.kek, &t.ct).unwrap().as_slice(),
                t.data.as_slice(),
                "§{}",
                t.section
            );
        }
    }

    /// A Wycheproof AES-KWP case (`testdata/aes-keywrap/wycheproof-aes-kwp-subset.json`).
    struct KwpCase {
        tc: u64,
        kek: Vec<u8>,
        msg: Vec<u8>,
        ct: Vec<u8>,
    }

    /// The Wycheproof KWP cases whose result is (or is not) "valid", after checking how many
    /// there are per KEK size (16, 24, 32 bytes).
    fn wycheproof_kwp(valid: bool, per_kek_size: [usize; 3]) -> Vec<KwpCase> {
        let doc = testdata("wycheproof-aes-kwp-subset.json");
        let mut cases = vec![];
        for g in doc["testGroups"].as_array().unwrap() {
            for t in g["tests"].as_array().unwrap() {
                if (t["result"] == "valid") != valid {
                    continue;
                }
                let kek = field(t, "key");
                assert_eq!(kek.len() * 8, g["keySize"].as_u64().unwrap() as usize);
                cases.push(KwpCase {
                    tc: t["tcId"].as_u64().unwrap(),
                    kek,
                    msg: field(t, "msg"),
                    ct: field(t, "ct"),
                });
            }
        }
        let count = |n: usize| cases.iter().filter(|c| c.kek.len() == n).count();
        assert_eq!([count(16), count(24), count(32)], per_kek_size);
        cases
    }

    /// Wycheproof AES-KWP, valid cases with AES-128, -192 and -256 KEKs (single-block
    /// 7-byte keys, padded 9-byte keys, 16/24/32-byte keys, RFC 5649's own two): the RFC 5649
    /// wrap gives the published ciphertext.
    #[test]
    fn wycheproof_kwp_valid_vectors_wrap_to_the_published_ciphertext() {
        for c in wycheproof_kwp(true, [5, 7, 5]) {
            assert_eq!(aes_kwp_wrap(&c.kek, &c.msg).unwrap(), c.ct, "tcId {}", c.tc);
        }
    }

    /// The same valid cases unwrap to the published key, both through the release path
    /// (`aes_kwp_unwrap`: aws-lc for AES-128/256, the own RFC 5649 code for AES-192) and the
    /// mechanism path (`aes_kwp_unwrap_any`: the own code for every size).
    #[test]
    fn wycheproof_kwp_valid_vectors_unwrap_to_the_published_key() {
        for c in wycheproof_kwp(true, [5, 7, 5]) {
            assert_eq!(
                aes_kwp_unwrap(&c.kek, &c.ct).unwrap().as_slice(),
                c.msg.as_slice(),
                "tcId {}",
                c.tc
            );
            assert_eq!(
                aes_kwp_unwrap_any(&c.kek, &c.ct).unwrap().as_slice(),
                c.msg.as_slice(),
                "tcId {}",
                c.tc
            );
        }
    }

    /// Wycheproof AES-KWP, invalid cases for each KEK size (modified alternative IV,
    /// non-zero padding, message length 0, length 9 in a single block): both unwrap paths
    /// refuse them as integrity failures.
    #[test]
    fn wycheproof_kwp_invalid_vectors_fail_the_integrity_check() {
        for c in wycheproof_kwp(false, [4, 4, 4]) {
            assert_eq!(
                aes_kwp_unwrap(&c.kek, &c.ct).unwrap_err(),
                UnwrapError::Integrity,
                "tcId {}",
                c.tc
            );
            assert_eq!(
                aes_kwp_unwrap_any(&c.kek, &c.ct).unwrap_err(),
                WrapError::Integrity,
                "tcId {}",
                c.tc
            );
        }
    }
}
