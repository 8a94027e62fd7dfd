//! The narrated demo (run by scripts/demo.sh): the module against a running skr-emulator.
//! Logs in (attestation + Secure Key Release), signs / decrypts / verifies with each demo key
//! through PKCS#11, checks every result with an independent implementation, and shows the
//! denied key and why it was denied.
//!
//! Usage: demo MODULE_PATH EMULATOR_DIR   (SKR_PKCS11_CONFIG must point at the module config)

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use std::path::Path;
use std::time::Instant;

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn find(s: &Session, class: ObjectClass, label: &str) -> ObjectHandle {
    s.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .expect("C_FindObjects")[0]
}

fn spki(dir: &Path, name: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    use x509_cert::der::{Decode, Encode};
    // The file holds the leaf then its chain: the first certificate is the key's.
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (module, dir) = (&args[1], Path::new(&args[2]));

    step(1, "Load libskr_pkcs11.so and list its tokens (no network yet: C_Initialize only reads the config)");
    let p11 = Pkcs11::new(module).expect("load module");
    p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let info = p11.get_library_info().expect("C_GetInfo");
    println!(
        "    library: {} {}",
        info.manufacturer_id(),
        info.library_description()
    );
    let slots = p11.get_slots_with_token().expect("slots");
    for s in &slots {
        let t = p11.get_token_info(*s).unwrap();
        println!(
            "    slot {}: token \"{}\" serial {}",
            s.id(),
            t.label(),
            t.serial_number()
        );
    }
    let slot_of = |l: &str| {
        *slots
            .iter()
            .find(|s| p11.get_token_info(**s).unwrap().label() == l)
            .expect("token")
    };

    step(
        2,
        "Before login the token shows only certificates and public keys",
    );
    let s = p11.open_ro_session(slot_of("skr-demo")).unwrap();
    let n_priv = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
        .len();
    let n_cert = s
        .find_objects(&[Attribute::Class(ObjectClass::CERTIFICATE)])
        .unwrap()
        .len();
    println!("    private keys visible: {n_priv}, certificates: {n_cert}");

    step(3, "C_Login = attestation + Secure Key Release: SNP report -> MAA token -> AKV/mHSM release -> unwrap in the TEE");
    let t = Instant::now();
    s.login(UserType::User, None).expect("C_Login");
    println!(
        "    logged in in {:?}; released keys now live only in locked, non-dumpable memory",
        t.elapsed()
    );
    for (class, what, l) in [
        (ObjectClass::PRIVATE_KEY, "private key", "tls-rsa"),
        (ObjectClass::PRIVATE_KEY, "private key", "tls-ec"),
        (ObjectClass::SECRET_KEY, "secret key", "data-aes"),
    ] {
        let _ = find(&s, class, l);
        println!("    found {what} \"{l}\"");
    }

    step(4, "tls-rsa: SHA256-RSA-PKCS and RSA-PSS signatures, verified with RustCrypto from the certificate");
    {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::signature::Verifier;
        use sha2::Digest;
        let key = find(&s, ObjectClass::PRIVATE_KEY, "tls-rsa");
        let pk = rsa::RsaPublicKey::from_public_key_der(&spki(dir, "tls-rsa")).unwrap();
        let msg = b"hello from an attested TEE";
        let sig = s.sign(&Mechanism::Sha256RsaPkcs, key, msg).unwrap();
        rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(pk.clone())
            .verify(
                msg,
                &rsa::pkcs1v15::Signature::try_from(sig.as_slice()).unwrap(),
            )
            .expect("verify");
        println!(
            "    SHA256-RSA-PKCS signature ({} bytes) verifies",
            sig.len()
        );
        let digest = sha2::Sha256::digest(msg);
        let pss = PkcsPssParams {
            hash_alg: MechanismType::SHA256,
            mgf: PkcsMgfType::MGF1_SHA256,
            s_len: 32.into(),
        };
        let sig = s.sign(&Mechanism::RsaPkcsPss(pss), key, &digest).unwrap();
        pk.verify(rsa::Pss::new_with_salt::<sha2::Sha256>(32), &digest, &sig)
            .expect("verify PSS");
        println!("    RSA-PSS (SHA-256, salt 32) signature verifies (what TLS 1.3 uses)");

        step(
            5,
            "tls-rsa: RSA-OAEP decryption of data encrypted outside the TEE",
        );
        let ct = pk
            .encrypt(
                &mut rand::thread_rng(),
                rsa::Oaep::new::<sha2::Sha256>(),
                b"a wrapped data key",
            )
            .unwrap();
        let oaep = PkcsOaepParams::new(
            MechanismType::SHA256,
            PkcsMgfType::MGF1_SHA256,
            PkcsOaepSource::empty(),
        );
        let pt = s.decrypt(&Mechanism::RsaPkcsOaep(oaep), key, &ct).unwrap();
        println!("    decrypted: {:?}", String::from_utf8_lossy(&pt));
    }

    step(6, "tls-ec: ECDSA P-256 signature, verified with RustCrypto");
    {
        use p256::ecdsa::signature::Verifier;
        use p256::pkcs8::DecodePublicKey;
        let key = find(&s, ObjectClass::PRIVATE_KEY, "tls-ec");
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki(dir, "tls-ec")).unwrap();
        let msg = b"ECDHE-ECDSA handshake";
        let sig = s.sign(&Mechanism::EcdsaSha256, key, msg).unwrap();
        vk.verify(msg, &p256::ecdsa::Signature::from_slice(&sig).unwrap())
            .expect("verify");
        println!(
            "    ECDSA-SHA256 signature (r||s, {} bytes) verifies",
            sig.len()
        );
    }

    step(
        7,
        "data-aes (managed HSM, oct-HSM 256): AES-CBC-PAD encrypt then decrypt inside the token",
    );
    {
        let key = find(&s, ObjectClass::SECRET_KEY, "data-aes");
        let iv = [9u8; 16];
        let ct = s
            .encrypt(&Mechanism::AesCbcPad(iv), key, b"customer record #42")
            .unwrap();
        let pt = s.decrypt(&Mechanism::AesCbcPad(iv), key, &ct).unwrap();
        println!(
            "    {} bytes of ciphertext, decrypted back to {:?}",
            ct.len(),
            String::from_utf8_lossy(&pt)
        );
    }

    step(
        8,
        "denied-rsa: its release policy asks for a launch measurement this TEE does not have",
    );
    let d = p11.open_ro_session(slot_of("skr-denied")).unwrap();
    match d.login(UserType::User, None) {
        Ok(()) => panic!("denied-rsa must not be released"),
        Err(e) => println!("    C_Login refused: {e}\n    (the module's log line above names the unmet policy claim)"),
    }

    step(9, "C_Logout wipes the released keys");
    s.logout().unwrap();
    let n_priv = s
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .unwrap()
        .len();
    println!("    private keys visible after logout: {n_priv}");
    println!("\nDemo complete.");
}
