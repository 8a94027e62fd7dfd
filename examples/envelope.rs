//! Envelope encryption with Secure Key Release, end to end (run by tests/example_programs.rs).
//!
//! Outside the TEE (a build server, a data pipeline): encrypt a file with a fresh AES-256 data
//! key (AES-GCM), wrap the data key to the token's public key `tls-rsa` (RSA-OAEP, SHA-256, from
//! its certificate: nothing secret is needed), and store the envelope (wrapped key, IV,
//! ciphertext) next to nothing else.
//!
//! Inside the TEE: C_Login releases `tls-rsa`; C_UnwrapKey turns the wrapped data key into a
//! sensitive, unextractable session key; C_Decrypt opens the file. The data key never exists in
//! the clear outside the locked memory of the token, and neither it nor the released key can
//! be wrapped back out.
//!
//! Usage: envelope MODULE_PATH EMULATOR_DIR   (SKR_PKCS11_CONFIG must point at the module config)

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::Error;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use cryptoki::session::UserType;
use std::path::Path;

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

/// The SubjectPublicKeyInfo of a demo key's certificate (the leaf, first in the file).
fn spki(dir: &Path, name: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use x509_cert::der::{Decode, Encode};
    let path = dir.join("certs").join(format!("{name}.pem"));
    let leaf = rustls_pki_types::CertificateDer::pem_file_iter(&path)
        .expect("certificate file")
        .next()
        .expect("a certificate")
        .expect("PEM certificate");
    let cert = x509_cert::Certificate::from_der(&leaf).expect("parse certificate");
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .expect("SPKI")
}

struct Envelope {
    wrapped_key: Vec<u8>,
    iv: [u8; 12],
    ciphertext: Vec<u8>,
}

/// Outside the TEE: RustCrypto only, no token.
fn seal(dir: &Path, plaintext: &[u8]) -> Envelope {
    use aes_gcm::aead::{Aead, KeyInit};
    use rand::RngCore;
    use rsa::pkcs8::DecodePublicKey;
    let mut data_key = [0u8; 32];
    let mut iv = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut data_key);
    rand::thread_rng().fill_bytes(&mut iv);
    let ciphertext = aes_gcm::Aes256Gcm::new_from_slice(&data_key)
        .unwrap()
        .encrypt(&aes_gcm::Nonce::from(iv), plaintext)
        .expect("AES-GCM");
    let public = rsa::RsaPublicKey::from_public_key_der(&spki(dir, "tls-rsa")).expect("RSA key");
    let wrapped_key = public
        .encrypt(
            &mut rand::thread_rng(),
            rsa::Oaep::new::<sha2::Sha256>(),
            &data_key,
        )
        .expect("RSA-OAEP");
    zeroize::Zeroize::zeroize(&mut data_key);
    Envelope {
        wrapped_key,
        iv,
        ciphertext,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (module, dir) = (&args[1], Path::new(&args[2]));
    let file = b"quarterly numbers: confidential";

    step(1, "Outside the TEE: encrypt the file under a fresh data key, wrap the key to tls-rsa's public key");
    let env = seal(dir, file);
    println!(
        "    envelope: wrapped key {} bytes (RSA-OAEP SHA-256), IV 12 bytes, ciphertext {} bytes (AES-256-GCM)",
        env.wrapped_key.len(),
        env.ciphertext.len()
    );

    step(2, "Inside the TEE: C_Login releases tls-rsa into the token");
    let p11 = Pkcs11::new(module).expect("load module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = *p11
        .get_slots_with_token()
        .unwrap()
        .iter()
        .find(|s| p11.get_token_info(**s).unwrap().label() == "skr-demo")
        .expect("token skr-demo");
    let s = p11.open_ro_session(slot).unwrap();
    s.login(UserType::User, None).expect("C_Login");
    let tls_rsa = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"tls-rsa".to_vec()),
        ])
        .unwrap()[0];

    step(
        3,
        "C_UnwrapKey: the data key becomes a sensitive AES session key (RSA-OAEP inside the token)",
    );
    let oaep = PkcsOaepParams::new(
        MechanismType::SHA256,
        PkcsMgfType::MGF1_SHA256,
        PkcsOaepSource::empty(),
    );
    let data_key = s
        .unwrap_key(
            &Mechanism::RsaPkcsOaep(oaep),
            tls_rsa,
            &env.wrapped_key,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Decrypt(true),
            ],
        )
        .expect("C_UnwrapKey");
    let attrs = s
        .get_attributes(
            data_key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::ValueLen,
            ],
        )
        .unwrap();
    println!("    session key attributes: {attrs:?}");

    step(4, "C_Decrypt: AES-256-GCM with the unwrapped key");
    let mut iv = env.iv;
    let gcm = GcmParams::new(&mut iv, &[], 128.into()).unwrap();
    let pt = s
        .decrypt(&Mechanism::AesGcm(gcm), data_key, &env.ciphertext)
        .expect("C_Decrypt");
    println!(
        "    decrypted inside the TEE: {:?}",
        String::from_utf8_lossy(&pt)
    );
    assert_eq!(pt, file);

    step(5, "Nothing goes back out: with a fresh wrapping key, the data key and the released key refuse C_WrapKey");
    let wrapping = s
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Unwrap(true),
            ],
        )
        .expect("C_GenerateKey");
    let refused = |r: cryptoki::error::Result<Vec<u8>>| match r {
        Err(Error::Pkcs11(rv, _)) => format!("{rv:?}"),
        Err(e) => format!("{e}"),
        Ok(_) => "WRAPPED (unexpected)".into(),
    };
    println!(
        "    C_WrapKey(data key): {}",
        refused(s.wrap_key(&Mechanism::AesKeyWrap, wrapping, data_key))
    );
    println!(
        "    C_WrapKey(tls-rsa): {}",
        refused(s.wrap_key(&Mechanism::AesKeyWrap, wrapping, tls_rsa))
    );
    s.logout().expect("C_Logout");
    println!("\nEnvelope complete.");
}
