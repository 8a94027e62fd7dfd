//! p11-bench: PKCS#11 signing / decryption / encryption throughput of a module, side by side
//! with a reference token (SoftHSMv2) holding the same keys and with the raw engine (aws-lc-rs,
//! no PKCS#11), in one run so that only ratios count. The login breakdown is `p11-bench-login` (an
//! example of the `cli` crate):
//! this binary must not link skr-pkcs11, whose locked-memory arena would otherwise serve the
//! "raw" engine's allocations too (it is installed from `.init_array` wherever it is linked).
//!
//! Subcommands (scripts/bench.sh runs them all and writes the tables to docs/BENCHMARKS.md):
//!   p11-bench keys   --dir KEYS                      generate the benchmark keys (PKCS#8 DER, AES raw)
//!   p11-bench import --dir KEYS --env EMULATOR_ENV   import them into skr-emulator (vault / mHSM)
//!   p11-bench ops    --module M --label L [--pin P] --reference R --reference-label L2 --reference-pin P2 --dir KEYS

use aws_lc_rs::{aead, rand as lrand, rsa as lrsa, signature as lsig};
use clap::{Parser, Subcommand};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use cryptoki_sys as sys;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "PKCS#11 benchmarks: a module vs a reference token vs the raw engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate the benchmark keys into DIR.
    Keys {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Import the keys of DIR into a running skr-emulator (its env file).
    Import {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        env: PathBuf,
    },
    /// Throughput and latency table with ratios.
    Ops {
        #[arg(long)]
        module: String,
        #[arg(long)]
        label: String,
        #[arg(long)]
        pin: Option<String>,
        #[arg(long)]
        reference: String,
        #[arg(long)]
        reference_label: String,
        #[arg(long)]
        reference_pin: Option<String>,
        #[arg(long)]
        dir: PathBuf,
        /// Measured seconds per round.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Only the cases whose name contains this (e.g. "P-256", "AES"), for profiling.
        #[arg(long)]
        only: Option<String>,
        /// Thread counts to run (default 1 and 2).
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2])]
        threads: Vec<usize>,
        /// Skip the reference token and the raw engine (profiling the module alone).
        #[arg(long)]
        module_only: bool,
    },
}

const KEYS: [(&str, &str); 5] = [
    ("bench-rsa2048", "rsa2048"),
    ("bench-rsa3072", "rsa3072"),
    ("bench-p256", "p256"),
    ("bench-p384", "p384"),
    ("bench-aes", "aes"),
];

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Keys { dir } => keys(&dir),
        Cmd::Import { dir, env } => import(&dir, &env),
        Cmd::Ops {
            module,
            label,
            pin,
            reference,
            reference_label,
            reference_pin,
            dir,
            seconds,
            rounds,
            only,
            threads,
            module_only,
        } => ops(
            &Token { module, label, pin },
            &Token {
                module: reference,
                label: reference_label,
                pin: reference_pin,
            },
            &dir,
            &Run {
                dur: Duration::from_secs_f64(seconds),
                rounds,
                only,
                threads,
                module_only,
            },
        ),
    };
    if let Err(e) = r {
        eprintln!("p11-bench: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

fn keys(dir: &Path) -> Res<()> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let w = |name: &str, b: &[u8]| std::fs::write(dir.join(name), b).map_err(|e| e.to_string());
    for (name, size) in [
        ("rsa2048.der", lrsa::KeySize::Rsa2048),
        ("rsa3072.der", lrsa::KeySize::Rsa3072),
    ] {
        let k = lrsa::KeyPair::generate(size).map_err(|e| e.to_string())?;
        w(
            name,
            aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&k)
                .map_err(|e| e.to_string())?
                .as_ref(),
        )?;
    }
    let rng = lrand::SystemRandom::new();
    for (name, alg) in [
        ("p256.der", &lsig::ECDSA_P256_SHA256_ASN1_SIGNING),
        ("p384.der", &lsig::ECDSA_P384_SHA384_ASN1_SIGNING),
    ] {
        let doc = lsig::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| e.to_string())?;
        w(name, doc.as_ref())?;
    }
    let mut aes = [0u8; 32];
    lrand::fill(&mut aes).map_err(|e| e.to_string())?;
    w("aes.bin", &aes)?;
    println!("keys written to {}", dir.display());
    Ok(())
}

fn b64u(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn read_env(p: &Path) -> Res<std::collections::HashMap<String, String>> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(t.lines()
        .filter_map(|l| l.trim().trim_start_matches("export ").split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.trim().trim_matches('"').trim_matches('\'').to_string(),
            )
        })
        .collect())
}

fn https_client(ca: &str) -> Res<reqwest::blocking::Client> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::blocking::Client::builder()
        .use_preconfigured_tls(cfg)
        .build()
        .map_err(|e| e.to_string())
}

/// PKCS#8 -> private JWK (RSA or EC) with the RustCrypto parsers.
fn jwk_of(name: &str, der: &[u8]) -> Res<serde_json::Value> {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    if name.starts_with("rsa") {
        let k = rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
        let p = k.primes();
        let qi = k.qinv().and_then(|v| v.to_biguint()).ok_or("no qinv")?;
        Ok(
            serde_json::json!({"kty": "RSA-HSM", "n": b64u(&k.n().to_bytes_be()), "e": b64u(&k.e().to_bytes_be()),
            "d": b64u(&k.d().to_bytes_be()), "p": b64u(&p[0].to_bytes_be()), "q": b64u(&p[1].to_bytes_be()),
            "dp": b64u(&k.dp().ok_or("dp")?.to_bytes_be()), "dq": b64u(&k.dq().ok_or("dq")?.to_bytes_be()), "qi": b64u(&qi.to_bytes_be()),
            "key_ops": ["sign", "verify", "encrypt", "decrypt"]}),
        )
    } else if name == "p256" {
        let k = p256::SecretKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
        let pt =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&k.public_key(), false);
        Ok(
            serde_json::json!({"kty": "EC-HSM", "crv": "P-256", "d": b64u(&k.to_bytes()), "x": b64u(pt.x().ok_or("x")?), "y": b64u(pt.y().ok_or("y")?), "key_ops": ["sign", "verify"]}),
        )
    } else {
        let k = p384::SecretKey::from_pkcs8_der(der).map_err(|e| e.to_string())?;
        let pt =
            p384::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&k.public_key(), false);
        Ok(
            serde_json::json!({"kty": "EC-HSM", "crv": "P-384", "d": b64u(&k.to_bytes()), "x": b64u(pt.x().ok_or("x")?), "y": b64u(pt.y().ok_or("y")?), "key_ops": ["sign", "verify"]}),
        )
    }
}

fn import(dir: &Path, env: &Path) -> Res<()> {
    let env = read_env(env)?;
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .ok_or(format!("{k} missing from the env file"))
    };
    let (vault, mhsm, imds, ca) = (
        get("SKR_EMULATOR_VAULT_URL")?,
        get("SKR_EMULATOR_MHSM_URL")?,
        get("SKR_EMULATOR_IMDS_URL")?,
        get("SKR_EMULATOR_CA")?,
    );
    let http = https_client(&ca)?;
    let token = |resource: &str| -> Res<String> {
        let v: serde_json::Value = http
            .get(format!("{imds}/metadata/identity/oauth2/token"))
            .query(&[("api-version", "2018-02-01"), ("resource", resource)])
            .header("Metadata", "true")
            .send()
            .and_then(|r| r.json())
            .map_err(|e| e.to_string())?;
        v["access_token"]
            .as_str()
            .map(String::from)
            .ok_or("no access_token".into())
    };
    let (vt, mt) = (
        token("https://vault.azure.net")?,
        token("https://managedhsm.azure.net")?,
    );
    // Reuse the release policy of the emulator's demo key (same simulated TEE).
    let demo: serde_json::Value = http
        .get(format!("{vault}/keys/tls-rsa?api-version=7.4"))
        .bearer_auth(&vt)
        .send()
        .and_then(|r| r.json())
        .map_err(|e| e.to_string())?;
    let policy = serde_json::json!({"contentType": demo["release_policy"]["contentType"], "data": demo["release_policy"]["data"]});
    for (label, file) in KEYS {
        let (base, bearer, key) = if file == "aes" {
            let raw = std::fs::read(dir.join("aes.bin")).map_err(|e| e.to_string())?;
            (
                &mhsm,
                &mt,
                serde_json::json!({"kty": "oct-HSM", "k": b64u(&raw), "key_ops": ["encrypt", "decrypt"]}),
            )
        } else {
            let der = std::fs::read(dir.join(format!("{file}.der"))).map_err(|e| e.to_string())?;
            (&vault, &vt, jwk_of(file, &der)?)
        };
        let body = serde_json::json!({"key": key, "hsm": true, "attributes": {"exportable": true}, "release_policy": policy});
        let r = http
            .put(format!("{base}/keys/{label}?api-version=7.4"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!(
                "import {label}: {} {}",
                r.status(),
                r.text().unwrap_or_default()
            ));
        }
        println!("imported {label} into {base}");
    }
    Ok(())
}

struct Token {
    module: String,
    label: String,
    pin: Option<String>,
}

/// One benchmark operation on one thread: a closure doing exactly one operation.
type Op = Box<dyn FnMut() -> Res<()> + Send>;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    RsaPkcs(usize),
    RsaPss(usize),
    OaepDecrypt,
    /// C_UnwrapKey of a 32-byte AES data key (RSA-OAEP SHA-1), then C_DestroyObject of it.
    OaepUnwrap,
    Ecdsa(usize),
    /// C_DeriveKey CKM_ECDH1_DERIVE (CKD_NULL, 32-byte generic secret), then C_DestroyObject.
    EcdhDerive,
    AesGcm4k,
    /// The same encryption as a C client makes it (Java's SunPKCS11 `Cipher.doFinal`, say):
    /// `C_EncryptInit`, then one `C_Encrypt` into a buffer of the right size, no size query.
    /// cryptoki's `encrypt` (AesGcm4k) adds a size query and a zeroed output `Vec` per call.
    AesGcm4kCalls,
    /// PKCS#11 3.0 message-based encryption: `C_MessageEncryptInit` once per session, then one
    /// `C_EncryptMessage` per message with a token-generated counter IV (CKG_GENERATE_COUNTER),
    /// ciphertext into a reused buffer and the tag into the parameter's tag buffer.
    AesGcm4kMessage,
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::RsaPkcs(b) => format!("RSA-{b} SHA256-RSA-PKCS sign"),
            Case::RsaPss(b) => format!("RSA-{b} SHA256-RSA-PKCS-PSS sign"),
            // SHA-1 OAEP: the only OAEP hash SoftHSMv2 accepts, so the reference can run it.
            Case::OaepDecrypt => "RSA-2048 OAEP (SHA-1) decrypt".into(),
            Case::OaepUnwrap => "RSA-2048 OAEP (SHA-1) unwrap of a 32-byte key".into(),
            Case::EcdhDerive => "P-256 ECDH derive (CKD_NULL)".into(),
            Case::Ecdsa(c) => format!("P-{c} ECDSA sign"),
            Case::AesGcm4k => "AES-256-GCM encrypt 4 KiB".into(),
            Case::AesGcm4kCalls => "AES-256-GCM encrypt 4 KiB, C calls (init + encrypt)".into(),
            Case::AesGcm4kMessage => {
                "AES-256-GCM encrypt 4 KiB, message-based (C_EncryptMessage)".into()
            }
        }
    }
    fn key(self) -> &'static str {
        match self {
            Case::RsaPkcs(2048) | Case::RsaPss(2048) | Case::OaepDecrypt | Case::OaepUnwrap => {
                "rsa2048"
            }
            Case::EcdhDerive => "p256",
            Case::RsaPkcs(_) | Case::RsaPss(_) => "rsa3072",
            Case::Ecdsa(256) => "p256",
            Case::Ecdsa(_) => "p384",
            Case::AesGcm4k | Case::AesGcm4kCalls | Case::AesGcm4kMessage => "aes",
        }
    }
}

const CASES: [Case; 12] = [
    Case::RsaPkcs(2048),
    Case::RsaPkcs(3072),
    Case::RsaPss(2048),
    Case::RsaPss(3072),
    Case::OaepDecrypt,
    Case::OaepUnwrap,
    Case::Ecdsa(256),
    Case::Ecdsa(384),
    Case::EcdhDerive,
    Case::AesGcm4k,
    Case::AesGcm4kCalls,
    Case::AesGcm4kMessage,
];

struct Loaded {
    p11: Pkcs11,
    slot: cryptoki::slot::Slot,
    pin: Option<String>,
    calls: EncryptCalls,
}

/// The module's own `C_EncryptInit` and `C_Encrypt`, from its function list (the same
/// initialised library cryptoki loaded: dlopen of one path gives one instance).
#[derive(Clone, Copy)]
struct EncryptCalls {
    init: unsafe extern "C" fn(
        sys::CK_SESSION_HANDLE,
        *mut sys::CK_MECHANISM,
        sys::CK_OBJECT_HANDLE,
    ) -> sys::CK_RV,
    encrypt: unsafe extern "C" fn(
        sys::CK_SESSION_HANDLE,
        *mut sys::CK_BYTE,
        sys::CK_ULONG,
        *mut sys::CK_BYTE,
        *mut sys::CK_ULONG,
    ) -> sys::CK_RV,
    /// The 3.0 message-based pair, when the module has the 3.0 interface (SoftHSMv2 2.6 has
    /// not: its column stays empty for that case).
    message: Option<MessageCalls>,
}

#[derive(Clone, Copy)]
struct MessageCalls {
    init: unsafe extern "C" fn(
        sys::CK_SESSION_HANDLE,
        *mut sys::CK_MECHANISM,
        sys::CK_OBJECT_HANDLE,
    ) -> sys::CK_RV,
    encrypt: unsafe extern "C" fn(
        sys::CK_SESSION_HANDLE,
        *mut std::ffi::c_void,
        sys::CK_ULONG,
        *mut sys::CK_BYTE,
        sys::CK_ULONG,
        *mut sys::CK_BYTE,
        sys::CK_ULONG,
        *mut sys::CK_BYTE,
        *mut sys::CK_ULONG,
    ) -> sys::CK_RV,
}

/// The module's "PKCS 11" 3.0 interface, if it has one.
fn message_calls(lib: &'static libloading::Library) -> Option<MessageCalls> {
    type GetInterface = unsafe extern "C" fn(
        *mut sys::CK_UTF8CHAR,
        *mut sys::CK_VERSION,
        *mut *mut sys::CK_INTERFACE,
        sys::CK_FLAGS,
    ) -> sys::CK_RV;
    // SAFETY: C_GetInterface has this signature in every PKCS#11 3.0 module.
    let get = unsafe { lib.get::<GetInterface>(b"C_GetInterface\0") }.ok()?;
    let mut name = *b"PKCS 11\0";
    let mut version = sys::CK_VERSION { major: 3, minor: 0 };
    let mut iface: *mut sys::CK_INTERFACE = std::ptr::null_mut();
    // SAFETY: valid name, version and out-pointer.
    let rv = unsafe { get(name.as_mut_ptr(), &mut version, &mut iface, 0) };
    if rv != sys::CKR_OK || iface.is_null() {
        return None;
    }
    // SAFETY: a 3.0 "PKCS 11" interface points at a CK_FUNCTION_LIST_3_0 the module keeps.
    let list = unsafe { &*((*iface).pFunctionList as *const sys::CK_FUNCTION_LIST_3_0) };
    Some(MessageCalls {
        init: list.C_MessageEncryptInit?,
        encrypt: list.C_EncryptMessage?,
    })
}

fn encrypt_calls(module: &str) -> Res<EncryptCalls> {
    // SAFETY: loading a PKCS#11 module runs its initialisers, as cryptoki's load just did; the
    // library is leaked so the function pointers stay valid for the whole run.
    let lib = unsafe { libloading::Library::new(module) }.map_err(|e| format!("{module}: {e}"))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 module.
    let get = unsafe {
        lib.get::<unsafe extern "C" fn(*mut *mut sys::CK_FUNCTION_LIST) -> sys::CK_RV>(
            b"C_GetFunctionList\0",
        )
    }
    .map_err(|e| format!("{module}: {e}"))?;
    let mut list: *mut sys::CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: a valid out-pointer; the module returns a pointer to its static table.
    let rv = unsafe { get(&mut list) };
    if rv != sys::CKR_OK || list.is_null() {
        return Err(format!("{module}: C_GetFunctionList returned {rv:#x}"));
    }
    // SAFETY: non-NULL, the module's table, alive as long as the library.
    let list = unsafe { &*list };
    Ok(EncryptCalls {
        init: list.C_EncryptInit.ok_or("no C_EncryptInit")?,
        encrypt: list.C_Encrypt.ok_or("no C_Encrypt")?,
        message: message_calls(lib),
    })
}

fn load(t: &Token) -> Res<Arc<Loaded>> {
    let p11 = Pkcs11::new(&t.module).map_err(|e| format!("load {}: {e}", t.module))?;
    match p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // The same .so named twice (e.g. a module against itself) shares one initialisation.
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => return Err(format!("C_Initialize {}: {e}", t.module)),
    }
    let slot = *p11
        .get_slots_with_token()
        .map_err(|e| e.to_string())?
        .iter()
        .find(|s| {
            p11.get_token_info(**s)
                .map(|i| i.label() == t.label)
                .unwrap_or(false)
        })
        .ok_or(format!("no token {:?} in {}", t.label, t.module))?;
    Ok(Arc::new(Loaded {
        p11,
        slot,
        pin: t.pin.clone(),
        calls: encrypt_calls(&t.module)?,
    }))
}

fn p11_session(l: &Loaded) -> Res<Session> {
    let s = l.p11.open_ro_session(l.slot).map_err(|e| e.to_string())?;
    match s.login(UserType::User, l.pin.clone().map(AuthPin::from).as_ref()) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(s)
        }
        Err(e) => Err(format!("C_Login: {e}")),
    }
}

fn p11_key(s: &Session, class: ObjectClass, label: &str) -> Res<ObjectHandle> {
    s.find_objects(&[
        Attribute::Class(class),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
    .map_err(|e| e.to_string())?
    .first()
    .copied()
    .ok_or(format!("no {class:?} labelled {label}"))
}

struct Fixtures {
    msg: Vec<u8>,
    sha256: Vec<u8>,
    sha384: Vec<u8>,
    oaep_ct: Vec<u8>,
    block: Vec<u8>,
    /// A P-256 peer's public point (uncompressed) for ECDH.
    peer_point: Vec<u8>,
}

fn p11_op(l: Arc<Loaded>, case: Case, fx: &Fixtures) -> Res<Op> {
    let s = p11_session(&l)?;
    let label = KEYS
        .iter()
        .find(|(_, f)| *f == case.key())
        .map(|(l, _)| *l)
        .unwrap_or_default();
    let class = if matches!(
        case,
        Case::AesGcm4k | Case::AesGcm4kCalls | Case::AesGcm4kMessage
    ) {
        ObjectClass::SECRET_KEY
    } else {
        ObjectClass::PRIVATE_KEY
    };
    let key = p11_key(&s, class, label)?;
    // ECDSA signs the digest that matches the curve (SHA-256 for P-256, SHA-384 for P-384).
    let digest = if case == Case::Ecdsa(384) {
        fx.sha384.clone()
    } else {
        fx.sha256.clone()
    };
    let (msg, ct, block) = (fx.msg.clone(), fx.oaep_ct.clone(), fx.block.clone());
    let peer_point = fx.peer_point.clone();
    let pss = PkcsPssParams {
        hash_alg: MechanismType::SHA256,
        mgf: PkcsMgfType::MGF1_SHA256,
        s_len: 32.into(),
    };
    if case == Case::AesGcm4kCalls {
        return Ok(c_calls_encrypt(l, s, key, fx.block.clone()));
    }
    if case == Case::AesGcm4kMessage {
        return message_encrypt(l, s, key, fx.block.clone());
    }
    let _keep = l.clone();
    Ok(Box::new(move || {
        let _ = &_keep;
        let e = |e: cryptoki::error::Error| e.to_string();
        match case {
            Case::RsaPkcs(_) => s
                .sign(&Mechanism::Sha256RsaPkcs, key, &msg)
                .map(drop)
                .map_err(e),
            Case::RsaPss(_) => s
                .sign(&Mechanism::Sha256RsaPkcsPss(pss), key, &msg)
                .map(drop)
                .map_err(e),
            Case::OaepDecrypt => {
                let p = PkcsOaepParams::new(
                    MechanismType::SHA1,
                    PkcsMgfType::MGF1_SHA1,
                    PkcsOaepSource::empty(),
                );
                s.decrypt(&Mechanism::RsaPkcsOaep(p), key, &ct)
                    .map(drop)
                    .map_err(e)
            }
            Case::OaepUnwrap => {
                let p = PkcsOaepParams::new(
                    MechanismType::SHA1,
                    PkcsMgfType::MGF1_SHA1,
                    PkcsOaepSource::empty(),
                );
                let k = s
                    .unwrap_key(
                        &Mechanism::RsaPkcsOaep(p),
                        key,
                        &ct,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(cryptoki::object::KeyType::AES),
                            Attribute::Token(false),
                            Attribute::Decrypt(true),
                        ],
                    )
                    .map_err(e)?;
                s.destroy_object(k).map_err(e)
            }
            Case::EcdhDerive => {
                use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
                let p = Ecdh1DeriveParams::new(EcKdf::null(), &peer_point);
                let k = s
                    .derive_key(
                        &Mechanism::Ecdh1Derive(p),
                        key,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(cryptoki::object::KeyType::GENERIC_SECRET),
                            Attribute::ValueLen(32.into()),
                            Attribute::Token(false),
                        ],
                    )
                    .map_err(e)?;
                s.destroy_object(k).map_err(e)
            }
            // CKM_ECDSA over a digest: the one ECDSA mechanism every token has.
            Case::Ecdsa(_) => s.sign(&Mechanism::Ecdsa, key, &digest).map(drop).map_err(e),
            Case::AesGcm4kCalls | Case::AesGcm4kMessage => Err("built by its own function".into()),
            Case::AesGcm4k => {
                let mut iv = [1u8; 12];
                let p = GcmParams::new(&mut iv, &[], 128.into()).map_err(|x| x.to_string())?;
                s.encrypt(&Mechanism::AesGcm(p), key, &block)
                    .map(drop)
                    .map_err(e)
            }
        }
    }))
}

/// AES-256-GCM of `block` by `C_EncryptInit` + one `C_Encrypt` into a reused buffer of the
/// right size, the output length checked.
fn c_calls_encrypt(l: Arc<Loaded>, s: Session, key: ObjectHandle, block: Vec<u8>) -> Op {
    let (sh, kh, calls) = (s.handle(), key.handle(), l.calls);
    let mut out = vec![0u8; block.len() + 16];
    Box::new(move || {
        let _ = (&l, &s);
        let mut iv = [1u8; 12];
        let mut gcm = sys::CK_GCM_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvBits: 96,
            pAAD: std::ptr::null_mut(),
            ulAADLen: 0,
            ulTagBits: 128,
        };
        let mut mech = sys::CK_MECHANISM {
            mechanism: sys::CKM_AES_GCM,
            pParameter: (&mut gcm as *mut sys::CK_GCM_PARAMS).cast(),
            ulParameterLen: std::mem::size_of::<sys::CK_GCM_PARAMS>() as sys::CK_ULONG,
        };
        // SAFETY: the session and key are alive (held by this closure), the mechanism and its
        // parameters are valid for the call.
        let rv = unsafe { (calls.init)(sh, &mut mech, kh) };
        if rv != sys::CKR_OK {
            return Err(format!("C_EncryptInit: {rv:#x}"));
        }
        let mut len = out.len() as sys::CK_ULONG;
        // SAFETY: `block` and `out` are valid for their lengths; the module only reads `block`.
        let rv = unsafe {
            (calls.encrypt)(
                sh,
                block.as_ptr().cast_mut(),
                block.len() as sys::CK_ULONG,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        if rv != sys::CKR_OK || len as usize != out.len() {
            return Err(format!("C_Encrypt: {rv:#x}, {len} bytes"));
        }
        Ok(())
    })
}

fn raw_op(dir: &Path, case: Case, fx: &Fixtures) -> Res<Op> {
    let rd = |f: &str| std::fs::read(dir.join(f)).map_err(|e| e.to_string());
    let rng = lrand::SystemRandom::new();
    let (msg, digest, ct, block) = (
        fx.msg.clone(),
        fx.sha256.clone(),
        fx.oaep_ct.clone(),
        fx.block.clone(),
    );
    Ok(match case {
        Case::RsaPkcs(_) | Case::RsaPss(_) => {
            let k = lrsa::KeyPair::from_pkcs8(&rd(&format!("{}.der", case.key()))?)
                .map_err(|e| e.to_string())?;
            let alg: &'static dyn lsig::RsaEncoding = if matches!(case, Case::RsaPkcs(_)) {
                &lsig::RSA_PKCS1_SHA256
            } else {
                &lsig::RSA_PSS_SHA256
            };
            let mut sig = vec![0u8; k.public_modulus_len()];
            Box::new(move || k.sign(alg, &rng, &msg, &mut sig).map_err(|e| e.to_string()))
        }
        Case::EcdhDerive => {
            use aws_lc_rs::agreement;
            let k = agreement::PrivateKey::from_private_key_der(
                &agreement::ECDH_P256,
                &rd("p256.der")?,
            )
            .map_err(|e| e.to_string())?;
            let peer = fx.peer_point.clone();
            Box::new(move || {
                agreement::agree(
                    &k,
                    agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &peer),
                    "ECDH failed".to_string(),
                    |z| Ok(z.len()),
                )
                .map(drop)
            })
        }
        // The raw engine's unwrap is the OAEP decryption of the wrapped key.
        Case::OaepDecrypt | Case::OaepUnwrap => {
            let k = lrsa::OaepPrivateDecryptingKey::new(
                lrsa::PrivateDecryptingKey::from_pkcs8(&rd("rsa2048.der")?)
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            let mut out = vec![0u8; 256];
            Box::new(move || {
                k.decrypt(&lrsa::OAEP_SHA1_MGF1SHA1, &ct, &mut out, None)
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        }
        Case::Ecdsa(c) => {
            let alg = if c == 256 {
                &lsig::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &lsig::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let k = lsig::EcdsaKeyPair::from_pkcs8(alg, &rd(&format!("{}.der", case.key()))?)
                .map_err(|e| e.to_string())?;
            let d = if c == 256 {
                aws_lc_rs::digest::Digest::import_less_safe(&digest, &aws_lc_rs::digest::SHA256)
            } else {
                aws_lc_rs::digest::Digest::import_less_safe(&fx.sha384, &aws_lc_rs::digest::SHA384)
            }
            .map_err(|e| e.to_string())?;
            let _ = msg;
            Box::new(move || k.sign_digest(&d).map(drop).map_err(|e| e.to_string()))
        }
        Case::AesGcm4k | Case::AesGcm4kCalls | Case::AesGcm4kMessage => {
            let key = aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_256_GCM, &rd("aes.bin")?)
                    .map_err(|e| e.to_string())?,
            );
            let seal = move |buf: &mut [u8]| {
                key.seal_in_place_separate_tag(
                    aead::Nonce::assume_unique_for_key([1u8; 12]),
                    aead::Aad::empty(),
                    buf,
                )
                .map_err(|e| e.to_string())
            };
            if case != Case::AesGcm4k {
                // Like the C calls: into one kept buffer, ciphertext then tag.
                let mut out = vec![0u8; block.len() + 16];
                Box::new(move || {
                    let (ct, tag) = out.split_at_mut(block.len());
                    ct.copy_from_slice(&block);
                    tag.copy_from_slice(seal(ct)?.as_ref());
                    Ok(())
                })
            } else {
                // Like cryptoki's `encrypt`: a new buffer per call.
                Box::new(move || seal(&mut block.clone()).map(drop))
            }
        }
    })
}

#[derive(Clone)]
struct Stats {
    ops_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// One timed round: each op on its own thread for `d`; total throughput and the latency
/// percentiles of all threads.
fn round(ops: &mut Vec<Op>, d: Duration) -> Res<Stats> {
    let handles: Vec<_> = ops
        .drain(..)
        .map(|mut op| {
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(4096);
                let start = Instant::now();
                let mut err = None;
                while start.elapsed() < d {
                    let t = Instant::now();
                    if let Err(e) = op() {
                        err = Some(e);
                        break;
                    }
                    lat.push(t.elapsed());
                }
                (op, lat, start.elapsed(), err)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut total_ops = 0.0;
    let mut failed = None;
    for h in handles {
        let (op, lat, el, err) = h.join().map_err(|_| "benchmark thread panicked")?;
        failed = failed.or(err);
        total_ops += lat.len() as f64 / el.as_secs_f64();
        all.extend(lat);
        ops.push(op);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Stats {
        ops_per_s: total_ops,
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

/// A contender of one case: how to make one thread's op, or None when it is not measured
/// (no reference, or a reference without the case).
type Maker<'a> = Option<Box<dyn FnMut() -> Res<Op> + 'a>>;

/// Every contender at every thread count (a slot: its maker and thread count; each op on its
/// own thread / session): a warm-up round of each slot, then `rounds` rounds of `dur` in which
/// the slots take turns (round r of every slot before round r + 1 of any). On a shared VM whose
/// speed drifts over minutes the drift falls on every slot alike, so the ratios between them —
/// module ÷ raw, 2 threads ÷ 1 — stay honest. Median round by throughput of each slot.
fn measure(slots: Vec<(Maker, usize)>, dur: Duration, rounds: usize) -> Res<Vec<Option<Stats>>> {
    let mut ops: Vec<Option<Vec<Op>>> = Vec::new();
    for (mut make, threads) in slots {
        ops.push(match make.as_mut() {
            Some(m) => Some((0..threads).map(|_| m()).collect::<Res<_>>()?),
            None => None,
        });
    }
    let mut results: Vec<Vec<Stats>> = ops.iter().map(|_| Vec::new()).collect();
    for r in 0..=rounds {
        let d = if r == 0 { dur / 4 } else { dur }; // round 0 = warm-up
        for (o, res) in ops.iter_mut().zip(&mut results) {
            if let Some(o) = o {
                let st = round(o, d)?;
                if r > 0 {
                    res.push(st);
                }
            }
        }
    }
    Ok(results
        .into_iter()
        .map(|mut res| {
            res.sort_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
            (!res.is_empty()).then(|| res.swap_remove(res.len() / 2))
        })
        .collect())
}

/// AES-256-GCM of `block` by one `C_EncryptMessage` per message after one
/// `C_MessageEncryptInit`: the token makes each IV (counter), the ciphertext goes into a
/// reused buffer and the tag into the parameter's.
fn message_encrypt(l: Arc<Loaded>, s: Session, key: ObjectHandle, block: Vec<u8>) -> Res<Op> {
    let calls = l
        .calls
        .message
        .ok_or("the module has no PKCS#11 3.0 message-based encryption")?;
    let (sh, kh) = (s.handle(), key.handle());
    let mut mech = sys::CK_MECHANISM {
        mechanism: sys::CKM_AES_GCM,
        pParameter: std::ptr::null_mut(),
        ulParameterLen: 0,
    };
    // SAFETY: a live session and key, a valid mechanism.
    let rv = unsafe { (calls.init)(sh, &mut mech, kh) };
    if rv != sys::CKR_OK {
        return Err(format!("C_MessageEncryptInit: {rv:#x}"));
    }
    let mut out = vec![0u8; block.len()];
    let (mut iv, mut tag) = ([0u8; 12], [0u8; 16]);
    Ok(Box::new(move || {
        let _ = (&l, &s);
        let mut p = sys::CK_GCM_MESSAGE_PARAMS {
            pIv: iv.as_mut_ptr(),
            ulIvLen: 12,
            ulIvFixedBits: 0,
            ivGenerator: sys::CKG_GENERATE_COUNTER,
            pTag: tag.as_mut_ptr(),
            ulTagBits: 128,
        };
        let mut len = out.len() as sys::CK_ULONG;
        // SAFETY: the parameter, `block`, `out` and the IV and tag buffers are valid for their
        // lengths; the module only reads `block`.
        let rv = unsafe {
            (calls.encrypt)(
                sh,
                (&mut p as *mut sys::CK_GCM_MESSAGE_PARAMS).cast(),
                std::mem::size_of::<sys::CK_GCM_MESSAGE_PARAMS>() as sys::CK_ULONG,
                std::ptr::null_mut(),
                0,
                block.as_ptr().cast_mut(),
                block.len() as sys::CK_ULONG,
                out.as_mut_ptr(),
                &mut len,
            )
        };
        if rv != sys::CKR_OK || len as usize != out.len() {
            return Err(format!("C_EncryptMessage: {rv:#x}, {len} bytes"));
        }
        Ok(())
    }))
}

struct Run {
    dur: Duration,
    rounds: usize,
    only: Option<String>,
    threads: Vec<usize>,
    module_only: bool,
}

fn ops(module: &Token, reference: &Token, dir: &Path, run: &Run) -> Res<()> {
    let (dur, rounds) = (run.dur, run.rounds);
    let msg = b"benchmark message: a TLS 1.3 CertificateVerify input is about this long".to_vec();
    let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &msg)
        .as_ref()
        .to_vec();
    let oaep_ct = {
        let k = lrsa::PrivateDecryptingKey::from_pkcs8(
            &std::fs::read(dir.join("rsa2048.der")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let pk = lrsa::OaepPublicEncryptingKey::new(k.public_key()).map_err(|e| e.to_string())?;
        let mut out = vec![0u8; 256];
        pk.encrypt(
            &lrsa::OAEP_SHA1_MGF1SHA1,
            b"a 32-byte data encryption key!!!",
            &mut out,
            None,
        )
        .map_err(|e| e.to_string())?
        .to_vec()
    };
    let sha384 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA384, &msg)
        .as_ref()
        .to_vec();
    let peer_point = {
        use aws_lc_rs::agreement;
        let k =
            agreement::PrivateKey::generate(&agreement::ECDH_P256).map_err(|e| e.to_string())?;
        k.compute_public_key()
            .map_err(|e| e.to_string())?
            .as_ref()
            .to_vec()
    };
    let fx = Fixtures {
        msg,
        sha256,
        sha384,
        oaep_ct,
        block: vec![0x5a; 4096],
        peer_point,
    };
    let m = load(module)?;
    let r = if run.module_only {
        None
    } else {
        Some(load(reference)?)
    };
    println!("| case | threads | skr-pkcs11 ops/s | p50 / p99 µs | reference ops/s | p50 / p99 µs | raw aws-lc-rs ops/s | module ÷ reference | module ÷ raw | module 2T ÷ 1T | raw 2T ÷ 1T |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let none = Stats {
        ops_per_s: f64::NAN,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
    };
    for case in CASES {
        if run
            .only
            .as_ref()
            .is_some_and(|o| !case.name().contains(o.as_str()))
        {
            continue;
        }
        let reference_has_case = |r: &Arc<Loaded>| {
            // A reference without the 3.0 message functions has no figure there.
            case != Case::AesGcm4kMessage || r.calls.message.is_some()
        };
        let fx = &fx;
        let mut slots: Vec<(Maker, usize)> = Vec::new();
        for &threads in &run.threads {
            slots.push((Some(Box::new(|| p11_op(m.clone(), case, fx))), threads));
            slots.push((
                r.as_ref().filter(|r| reference_has_case(r)).map(|r| {
                    Box::new(move || p11_op(r.clone(), case, fx)) as Box<dyn FnMut() -> Res<Op>>
                }),
                threads,
            ));
            slots.push((
                r.as_ref()
                    .map(|_| Box::new(|| raw_op(dir, case, fx)) as Box<dyn FnMut() -> Res<Op>>),
                threads,
            ));
        }
        let stats = measure(slots, dur, rounds)?;
        let got = |i: usize| stats[i].clone().unwrap_or_else(|| none.clone());
        let (one_thread, raw_one_thread) = match run.threads.iter().position(|&t| t == 1) {
            Some(i) => (got(3 * i).ops_per_s, got(3 * i + 2).ops_per_s),
            None => (f64::NAN, f64::NAN),
        };
        for (i, &threads) in run.threads.iter().enumerate() {
            let (sm, sr, sw) = (got(3 * i), got(3 * i + 1), got(3 * i + 2));
            let scale = |v: f64, one: f64| {
                if threads > 1 && one.is_finite() && v.is_finite() {
                    format!("{:.2}", v / one)
                } else {
                    "–".into()
                }
            };
            println!(
                "| {} | {threads} | {:.0} | {} / {} | {:.0} | {} / {} | {:.0} | {:.2} | {:.2} | {} | {} |",
                case.name(),
                sm.ops_per_s,
                sm.p50.as_micros(),
                sm.p99.as_micros(),
                sr.ops_per_s,
                sr.p50.as_micros(),
                sr.p99.as_micros(),
                sw.ops_per_s,
                sm.ops_per_s / sr.ops_per_s,
                sm.ops_per_s / sw.ops_per_s,
                scale(sm.ops_per_s, one_thread),
                scale(sw.ops_per_s, raw_one_thread),
            );
        }
    }
    Ok(())
}
