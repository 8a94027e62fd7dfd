//! The secret-key engines each family builds, checked against independent implementations
//! (RustCrypto): AES-ECB / CBC / CTR, AES-CMAC, HMAC, AES key wrap (RFC 3394 / 5649).

use super::*;
use crate::crypto::ops::{CipherKey, CipherOp, SignOp, VerifyOp};

fn key(bytes: &[u8]) -> Arc<SecretBytes> {
    Arc::new(SecretBytes::from_slice(bytes))
}

/// Encrypt `msg` in the given chunks (multipart), returning the whole output.
fn multipart(
    m: &Mechanism,
    k: &Arc<SecretBytes>,
    encrypt: bool,
    chunks: &[&[u8]],
) -> Result<Vec<u8>> {
    let mut op = CipherOp::new(m.clone(), CipherKey::Secret(k.clone()), encrypt)?;
    let mut out = vec![];
    for c in chunks {
        out.extend_from_slice(&op.update(c)?);
    }
    out.extend_from_slice(&op.finish()?);
    Ok(out)
}

fn single(m: &Mechanism, k: &Arc<SecretBytes>, encrypt: bool, data: &[u8]) -> Result<Vec<u8>> {
    let mut op = CipherOp::new(m.clone(), CipherKey::Secret(k.clone()), encrypt)?;
    Ok(op.single(data)?.to_vec())
}

#[allow(deprecated)] // aes 0.8's block type
fn rustcrypto_ecb_encrypt(k: &[u8], data: &[u8]) -> Vec<u8> {
    use ::aes::cipher::{BlockEncrypt, KeyInit};
    let mut out = data.to_vec();
    for block in out.chunks_mut(16) {
        let b = ::aes::Block::from_mut_slice(block);
        match k.len() {
            16 => ::aes::Aes128::new_from_slice(k).unwrap().encrypt_block(b),
            24 => ::aes::Aes192::new_from_slice(k).unwrap().encrypt_block(b),
            _ => ::aes::Aes256::new_from_slice(k).unwrap().encrypt_block(b),
        }
    }
    out
}

#[test]
fn aes_ecb_and_cbc_match_rustcrypto_for_every_key_size() {
    let msg: Vec<u8> = (0..64u8).collect();
    for len in [16usize, 24, 32] {
        let kb: Vec<u8> = (100..100 + len as u8).collect();
        let k = key(&kb);
        let ecb = single(&Mechanism::AesEcb, &k, true, &msg).unwrap();
        assert_eq!(ecb, rustcrypto_ecb_encrypt(&kb, &msg), "ECB {len}");
        assert_eq!(
            multipart(
                &Mechanism::AesEcb,
                &k,
                false,
                &[&ecb[..5], &ecb[5..40], &ecb[40..]]
            )
            .unwrap(),
            msg
        );
        // CBC by hand over the RustCrypto block cipher.
        let iv = [9u8; 16];
        let mut prev = iv;
        let mut expected = vec![];
        for block in msg.chunks(16) {
            let x: Vec<u8> = block.iter().zip(prev).map(|(a, b)| a ^ b).collect();
            let c = rustcrypto_ecb_encrypt(&kb, &x);
            prev.copy_from_slice(&c);
            expected.extend(c);
        }
        let m = Mechanism::AesCbc(iv);
        assert_eq!(
            multipart(&m, &k, true, &[&msg[..7], &msg[7..]]).unwrap(),
            expected
        );
        assert_eq!(single(&m, &k, false, &expected).unwrap(), msg);
    }
    // Unpadded modes need whole blocks.
    let k = key(&[1; 16]);
    assert_eq!(
        single(&Mechanism::AesEcb, &k, true, &[0; 17])
            .unwrap_err()
            .rv(),
        CKR_DATA_LEN_RANGE
    );
    assert_eq!(
        single(&Mechanism::AesCbc([0; 16]), &k, false, &[0; 20])
            .unwrap_err()
            .rv(),
        CKR_ENCRYPTED_DATA_LEN_RANGE
    );
}

#[test]
fn aes_ctr_matches_rustcrypto_and_refuses_counter_wrap() {
    use ctr::cipher::{KeyIvInit, StreamCipher};
    let kb = [7u8; 32];
    let k = key(&kb);
    let iv = [0xF0u8; 16];
    let msg: Vec<u8> = (0..100u8).collect();
    let m = Mechanism::AesCtr {
        iv,
        counter_bits: 128,
    };
    let ours = multipart(&m, &k, true, &[&msg[..3], &msg[3..50], &msg[50..]]).unwrap();
    let mut theirs = msg.clone();
    ctr::Ctr128BE::<::aes::Aes256>::new(&kb.into(), &iv.into()).apply_keystream(&mut theirs);
    assert_eq!(ours, theirs);
    assert_eq!(single(&m, &k, false, &ours).unwrap(), msg);
    // An 8-bit counter at 0xFE has two blocks left: 32 bytes pass, 33 do not.
    let mut iv = [0u8; 16];
    iv[15] = 0xFE;
    let small = Mechanism::AesCtr {
        iv,
        counter_bits: 8,
    };
    assert_eq!(single(&small, &k, true, &[0; 32]).unwrap().len(), 32);
    assert_eq!(
        single(&small, &k, true, &[0; 33]).unwrap_err().rv(),
        CKR_DATA_LEN_RANGE
    );
    assert!(Mechanism::from_raw(
        CKM_AES_CTR,
        RawParam::Ctr {
            counter_bits: 0,
            block: [0; 16]
        }
    )
    .is_err());
}

fn mac(m: Mechanism, k: &Arc<SecretBytes>, chunks: &[&[u8]]) -> Vec<u8> {
    let mut op = SignOp::mac(m.clone(), k).unwrap();
    for c in chunks {
        op.update(c).unwrap();
    }
    let tag = op.finish().unwrap();
    assert_eq!(
        tag.len(),
        SignOp::mac(m.clone(), k).unwrap().signature_len()
    );
    let mut v = VerifyOp::mac(m.clone(), k).unwrap();
    v.update(&chunks.concat()).unwrap();
    v.finish(&tag).unwrap();
    let mut bad = tag.clone();
    bad[0] ^= 1;
    let mut v = VerifyOp::mac(m, k).unwrap();
    v.update(&chunks.concat()).unwrap();
    assert_eq!(v.finish(&bad).unwrap_err().rv(), CKR_SIGNATURE_INVALID);
    tag
}

#[test]
fn hmac_with_every_hash_matches_rustcrypto() {
    use hmac::{Hmac, Mac as _};
    let kb = b"a generic secret of some length".to_vec();
    let k = key(&kb);
    let data = b"message to authenticate";
    macro_rules! theirs {
        ($h:ty) => {{
            let mut m = Hmac::<$h>::new_from_slice(&kb).unwrap();
            m.update(data);
            m.finalize().into_bytes().to_vec()
        }};
    }
    let cases = [
        (HashAlg::Sha1, theirs!(sha1::Sha1)),
        (HashAlg::Sha224, theirs!(sha2::Sha224)),
        (HashAlg::Sha256, theirs!(sha2::Sha256)),
        (HashAlg::Sha384, theirs!(sha2::Sha384)),
        (HashAlg::Sha512, theirs!(sha2::Sha512)),
    ];
    for (h, expected) in cases {
        assert_eq!(
            mac(Mechanism::Hmac(h), &k, &[&data[..4], &data[4..]]),
            expected,
            "{h:?}"
        );
    }
}

#[test]
fn aes_cmac_matches_rustcrypto() {
    use cmac::{Cmac, Mac as _};
    for len in [16usize, 24, 32] {
        let kb: Vec<u8> = (0..len as u8).collect();
        let k = key(&kb);
        let data = b"cmac over several parts of a message";
        let expected = match len {
            16 => {
                let mut m = <Cmac<::aes::Aes128> as cmac::Mac>::new_from_slice(&kb).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            24 => {
                let mut m = <Cmac<::aes::Aes192> as cmac::Mac>::new_from_slice(&kb).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            _ => {
                let mut m = <Cmac<::aes::Aes256> as cmac::Mac>::new_from_slice(&kb).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        };
        assert_eq!(
            mac(Mechanism::AesCmac, &k, &[&data[..10], &data[10..]]),
            expected
        );
    }
}

#[test]
fn aes_key_wrap_and_kwp_match_rustcrypto() {
    let kek128 = [3u8; 16];
    let kek256 = [4u8; 32];
    let data_key: Vec<u8> = (0..32u8).collect();
    // KW, 128- and 256-bit KEKs, against aes-kw.
    let w = single(&Mechanism::AesKeyWrap, &key(&kek128), true, &data_key).unwrap();
    assert_eq!(
        w,
        aes_kw::KekAes128::from(kek128).wrap_vec(&data_key).unwrap()
    );
    let w = single(&Mechanism::AesKeyWrap, &key(&kek256), true, &data_key).unwrap();
    assert_eq!(
        w,
        aes_kw::KekAes256::from(kek256).wrap_vec(&data_key).unwrap()
    );
    assert_eq!(
        single(&Mechanism::AesKeyWrap, &key(&kek256), false, &w).unwrap(),
        data_key
    );
    // KWP of an odd length, both ways.
    let odd = &data_key[..21];
    let theirs = aes_kw::KekAes256::from(kek256)
        .wrap_with_padding_vec(odd)
        .unwrap();
    assert_eq!(
        single(&Mechanism::AesKeyWrapPad, &key(&kek256), true, odd).unwrap(),
        theirs
    );
    assert_eq!(
        single(&Mechanism::AesKeyWrapPad, &key(&kek256), false, &theirs).unwrap(),
        odd
    );
    // Single-semiblock KWP (≤ 8 bytes) is one AES block.
    let short = single(&Mechanism::AesKeyWrapPad, &key(&kek128), true, b"seven!!").unwrap();
    assert_eq!(short.len(), 16);
    assert_eq!(
        aes_kw::KekAes128::from(kek128)
            .unwrap_with_padding_vec(&short)
            .unwrap(),
        b"seven!!"
    );
    // Tampering fails the integrity check; bad lengths are length errors.
    let mut bad = w.clone();
    bad[3] ^= 1;
    assert_eq!(
        single(&Mechanism::AesKeyWrap, &key(&kek256), false, &bad)
            .unwrap_err()
            .rv(),
        CKR_ENCRYPTED_DATA_INVALID
    );
    assert_eq!(
        single(&Mechanism::AesKeyWrap, &key(&kek256), true, &[0; 12])
            .unwrap_err()
            .rv(),
        CKR_DATA_LEN_RANGE
    );
}

/// RFC 3394 §4.2: the published 192-bit KEK vector (a KEK size aws-lc-rs' key_wrap lacks).
#[test]
fn aes_key_wrap_rfc3394_aes192_vector() {
    let hex = |s: &str| hex::decode(s.replace(' ', "")).unwrap();
    let kek = hex("000102030405060708090A0B0C0D0E0F1011121314151617");
    let data = hex("00112233445566778899AABBCCDDEEFF");
    let wrapped = hex("96778B25AE6CA435F92B5B97C050AED2468AB8A17AD84E5D");
    assert_eq!(
        single(&Mechanism::AesKeyWrap, &key(&kek), true, &data).unwrap(),
        wrapped
    );
    assert_eq!(
        single(&Mechanism::AesKeyWrap, &key(&kek), false, &wrapped).unwrap(),
        data
    );
}

#[test]
fn cipher_families_refuse_mac_use_and_the_reverse() {
    let k = key(&[1; 32]);
    assert_eq!(
        SignOp::mac(Mechanism::AesEcb, &k).err().unwrap().rv(),
        CKR_MECHANISM_INVALID
    );
    assert_eq!(
        CipherOp::new(Mechanism::AesCmac, CipherKey::Secret(k), true)
            .err()
            .unwrap()
            .rv(),
        CKR_MECHANISM_INVALID
    );
}
