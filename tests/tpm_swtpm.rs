//! The module's vTPM layer (`release::tpm`) against a real TPM 2.0 simulator (swtpm,
//! platform-evidence §6.9), provisioned the way Azure provisions a vTPM: an RSA-2048 RSASSA
//! AK persisted at 0x81000003, an HCL report in NV 0x01400001 (the 2048-byte Kinvolk report:
//! swtpm caps NV indices at 2048 bytes), an AK certificate in NV 0x01C101D0. Every result is
//! checked independently: signatures with RustCrypto `rsa` and the AK public key the test
//! provisioned, PCRs and NV contents through the test's own TPM connection, decryption of
//! blobs encrypted in software. After every operation — failed ones too — no transient object
//! or session is left in the TPM.
#![cfg(feature = "cvm")]

use rsa::traits::PublicKeyParts;
use sha2::Digest as _;
use skr_pkcs11::release::evidence::hcl::{HclReport, NV_HCL_REPORT, NV_USER_DATA};
use skr_pkcs11::release::evidence::tpm_attest::{Attested, TpmsAttest, TPM_ST_ATTEST_CERTIFY};
use skr_pkcs11::release::tpm::{
    verify_certify, DecryptScheme, EchoWait, Tpm, AK_HANDLE, ATTESTED_PCRS, NV_AK_CERT,
};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};
use tss_esapi::abstraction::nv;
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_LOADED_SESSION_FIRST, TPM2_TRANSIENT_FIRST};
use tss_esapi::constants::CapabilityType;
use tss_esapi::handles::{NvIndexTpmHandle, PcrHandle, PersistentTpmHandle};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    CapabilityData, Digest, DigestValues, MaxNvBuffer, NvPublicBuilder, PcrSelectSize,
    PcrSelectionList, PcrSlot, Public, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;

fn testdata(rel: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(rel),
    )
    .unwrap()
}

/// A swtpm on two free loopback ports (the swtpm TCTI's control port is the command port + 1)
/// with its state in a temporary directory; killed when dropped.
struct Swtpm {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Swtpm {
    fn start() -> Swtpm {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--tpmstate"])
            .arg(&state)
            .output()
            .expect("swtpm_setup (Debian package swtpm-tools) must be installed");
        assert!(
            out.status.success(),
            "swtpm_setup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A pair of free ports P, P + 1 (the swtpm TCTI's control port is the command port + 1),
        // below the kernel's ephemeral range so that other tests' port-0 listeners never take
        // P + 1 while swtpm starts; per process, a pid-derived base and a counter.
        static NEXT: AtomicU16 = AtomicU16::new(0);
        for _ in 0..50 {
            let step = NEXT.fetch_add(2, Ordering::Relaxed);
            let port = 20000 + ((std::process::id() as u16 % 3000) * 4 + step) % 12000;
            let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
            if !free(port) || !free(port + 1) {
                continue;
            }
            let mut child = Command::new("swtpm")
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (Debian package swtpm) must be installed");
            if wait_ready(&mut child, port) {
                return Swtpm {
                    child,
                    port,
                    _dir: dir,
                };
            }
            // Lost a race for a port: stop this one, try the next pair.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("no free port pair for swtpm");
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The test's own connection (one at a time: swtpm serves one client).
    fn context(&self) -> Context {
        Context::new(TctiNameConf::from_str(&self.tcti()).unwrap()).unwrap()
    }

    fn open(&self) -> Tpm {
        Tpm::open(Some(&self.tcti())).unwrap()
    }

    /// Transient objects and loaded sessions currently in the TPM, asked on a connection of
    /// the test's own (after the layer's context is gone).
    fn leftovers(&self) -> (usize, usize) {
        leftovers(&mut self.context())
    }

    fn assert_nothing_left(&self, after: &str) {
        assert_eq!(
            self.leftovers(),
            (0, 0),
            "objects / sessions left after {after}"
        );
    }
}

/// Asked on the layer's own connection, while it is open: dropping a tss-esapi Context flushes
/// what it created, so only this shows that the layer's guards flushed on their own.
fn leftovers(ctx: &mut Context) -> (usize, usize) {
    {
        let mut count = |first: u32| match ctx
            .get_capability(CapabilityType::Handles, first, 64)
            .unwrap()
            .0
        {
            CapabilityData::Handles(list) => list.into_inner().len(),
            other => panic!("{other:?}"),
        };
        (
            count(TPM2_TRANSIENT_FIRST),
            count(TPM2_LOADED_SESSION_FIRST),
        )
    }
}

fn assert_clean(t: &mut Tpm, after: &str) {
    assert_eq!(
        leftovers(t.esys()),
        (0, 0),
        "objects / sessions left in the TPM after {after}"
    );
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ak_template() -> Public {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .build()
        .unwrap();
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_scheme(
                    RsaScheme::create(RsaSchemeAlgorithm::RsaSsa, Some(HashingAlgorithm::Sha256))
                        .unwrap(),
                )
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_signing_key(true)
                .with_restricted(true)
                .build()
                .unwrap(),
        )
        .with_rsa_unique_identifier(PublicKeyRsa::default())
        .build()
        .unwrap()
}

fn define_and_write(ctx: &mut Context, index: u32, data: &[u8]) {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).unwrap())
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(data.len())
        .build()
        .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        let h = c.nv_define_space(Provision::Owner, None, public).unwrap();
        for (i, chunk) in data.chunks(1024).enumerate() {
            c.nv_write(
                NvAuth::Owner,
                h,
                MaxNvBuffer::try_from(chunk.to_vec()).unwrap(),
                (i * 1024) as u16,
            )
            .unwrap();
        }
    });
}

fn overwrite(ctx: &mut Context, index: u32, data: &[u8]) {
    let h = ctx
        .execute_without_session(|c| {
            c.tr_from_tpm_public(NvIndexTpmHandle::new(index).unwrap().into())
        })
        .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        for (i, chunk) in data.chunks(1024).enumerate() {
            c.nv_write(
                NvAuth::Owner,
                h.into(),
                MaxNvBuffer::try_from(chunk.to_vec()).unwrap(),
                (i * 1024) as u16,
            )
            .unwrap();
        }
    });
}

/// What the test provisioned: the AK's public key (for independent verification).
struct Provisioned {
    ak: rsa::RsaPublicKey,
    ak_cert: Vec<u8>,
    hcl: Vec<u8>,
}

/// Azure-style provisioning: AK at 0x81000003, HCL report, AK certificate.
fn provision(tpm: &Swtpm) -> Provisioned {
    let mut ctx = tpm.context();
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(
                Hierarchy::Endorsement,
                ak_template(),
                None,
                None,
                None,
                None,
            )
        })
        .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.evict_control(
            Provision::Owner,
            created.key_handle.into(),
            Persistent::Persistent(PersistentTpmHandle::new(AK_HANDLE).unwrap()),
        )
    })
    .unwrap();
    ctx.flush_context(created.key_handle.into()).unwrap();
    let Public::Rsa { unique, .. } = &created.out_public else {
        panic!("not RSA")
    };
    let ak = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(unique.value()),
        rsa::BigUint::from(65537u32),
    )
    .unwrap();
    let hcl = testdata("azure-cvm/hcl/kinvolk-snp-v1-2048.bin");
    define_and_write(&mut ctx, NV_HCL_REPORT, &hcl);
    // Any DER certificate stands in for Azure's AK certificate here: the layer only reads it.
    let ak_cert = testdata("snp/trustee-milan-v2-vcek.der");
    define_and_write(&mut ctx, NV_AK_CERT, &ak_cert);
    drop(ctx);
    tpm.assert_nothing_left("provisioning");
    Provisioned { ak, ak_cert, hcl }
}

fn verify_with_ak(ak: &rsa::RsaPublicKey, msg: &[u8], sig: &[u8]) {
    ak.verify(
        rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
        &sha2::Sha256::digest(msg),
        sig,
    )
    .expect("signature verifies with the provisioned AK");
}

fn extend_pcr7(tpm: &Swtpm) {
    let mut ctx = tpm.context();
    let mut values = DigestValues::new();
    values.set(
        HashingAlgorithm::Sha256,
        Digest::try_from(vec![0x5a; 32]).unwrap(),
    );
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.pcr_extend(PcrHandle::Pcr7, values)
    })
    .unwrap();
}

fn read_pcrs_independently(tpm: &Swtpm) -> Vec<[u8; 32]> {
    let mut ctx = tpm.context();
    let slots: Vec<PcrSlot> = ATTESTED_PCRS
        .iter()
        .map(|i| PcrSlot::try_from(1u32 << i).unwrap())
        .collect();
    let sel = PcrSelectionList::builder()
        .with_size_of_select(PcrSelectSize::ThreeOctets)
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .unwrap();
    let (_, _, digests) = ctx.execute_without_session(|c| c.pcr_read(sel)).unwrap();
    digests
        .value()
        .iter()
        .map(|d| d.value().try_into().unwrap())
        .collect()
}

/// An HCL report built from the Kinvolk one with other runtime claims — `HCLAkPub` replaced
/// by `ak` and/or `user-data` set — and its SNP REPORT_DATA binding them (the VCEK signature no
/// longer holds; the TPM layer does not check it). This is what the paravisor does.
fn hcl_with(base: &[u8], ak: Option<&rsa::RsaPublicKey>, user_data: Option<&[u8; 64]>) -> Vec<u8> {
    let h = HclReport::parse(base).unwrap();
    let mut claims: serde_json::Value = serde_json::from_slice(h.claims_json).unwrap();
    if let Some(ak) = ak {
        let key = claims["keys"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|k| k["kid"] == "HCLAkPub")
            .unwrap();
        key["n"] = skr_pkcs11::release::b64url(&ak.n().to_bytes_be()).into();
        key["e"] = skr_pkcs11::release::b64url(&ak.e().to_bytes_be()).into();
    }
    if let Some(u) = user_data {
        claims["user-data"] = hex::encode_upper(u).into();
    }
    let claims = serde_json::to_vec(&claims).unwrap();
    let mut out = base[..1236].to_vec();
    out.extend_from_slice(&claims);
    assert!(out.len() <= base.len(), "fits the 2048-byte NV index");
    out.resize(base.len(), 0);
    let set = |b: &mut [u8], off: usize, v: usize| {
        b[off..off + 4].copy_from_slice(&(v as u32).to_le_bytes())
    };
    set(&mut out, 1232, claims.len());
    set(&mut out, 1216, 20 + claims.len());
    set(&mut out, 8, 1216 + 20 + claims.len());
    out[32 + 0x50..32 + 0x70].copy_from_slice(&sha2::Sha256::digest(&claims));
    assert!(HclReport::parse(&out).unwrap().binding_ok());
    out
}

#[test]
fn nv_reads_return_the_provisioned_hcl_report_and_ak_certificate() {
    let tpm = Swtpm::start();
    let p = provision(&tpm);
    let mut t = tpm.open();
    assert_eq!(t.hcl_report(EchoWait::ONCE).unwrap(), p.hcl);
    assert_eq!(t.ak_certificate(EchoWait::ONCE).unwrap(), p.ak_cert);
    let ak = t.ak_public().unwrap();
    assert_eq!(ak.n, p.ak.n().to_bytes_be());
    assert_eq!(ak.e, [1, 0, 1]);
    assert!(ak.restricted, "the test AK is a restricted signing key");
    // TPM2B_PUBLIC: a u16 size, then that many bytes.
    let size = u16::from_be_bytes([ak.tpm2b_public[0], ak.tpm2b_public[1]]) as usize;
    assert_eq!(size + 2, ak.tpm2b_public.len());
    // A missing index is a device error naming the index, with a hint.
    let e = t.nv_read(0x0140_0009).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("0x01400009"), "{e}");
    assert!(e.hint().is_some());
    assert_clean(&mut t, "NV reads");
    drop(t);
    tpm.assert_nothing_left("NV reads");
}

#[test]
fn user_data_is_written_and_its_echo_is_required() {
    let tpm = Swtpm::start();
    let p = provision(&tpm);
    let user_data: [u8; 64] = std::array::from_fn(|i| i as u8 ^ 0xa5);
    let quick = EchoWait {
        attempts: 2,
        first_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(5),
    };

    // No paravisor behind swtpm: the report never changes, so the echo never comes.
    let mut t = tpm.open();
    let e = t.fresh_hcl_report(&user_data, quick).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("never echoed"), "{e}");
    assert!(e.message().contains("2 reads"), "{e}");
    assert_clean(&mut t, "a failed echo");
    drop(t);
    tpm.assert_nothing_left("a failed echo");
    // The index was defined (64 bytes) and holds what was written.
    let mut ctx = tpm.context();
    let written = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            nv::read_full(
                c,
                NvAuth::Owner,
                NvIndexTpmHandle::new(NV_USER_DATA).unwrap(),
            )
        })
        .unwrap();
    assert_eq!(written, user_data);

    // Playing the paravisor: a report that echoes the user-data is accepted.
    overwrite(
        &mut ctx,
        NV_HCL_REPORT,
        &hcl_with(&p.hcl, None, Some(&user_data)),
    );
    drop(ctx);
    let mut t = tpm.open();
    let fresh = t.fresh_hcl_report(&user_data, quick).unwrap();
    let h = HclReport::parse(&fresh).unwrap();
    assert!(h.binding_ok() && h.user_data_echoes(&user_data));
    // Other user-data (the index already exists: written in place) is not echoed.
    let mut other = user_data;
    other[0] ^= 1;
    assert!(t.fresh_hcl_report(&other, quick).is_err());
    assert_clean(&mut t, "user-data writes");
    drop(t);
    tpm.assert_nothing_left("user-data writes");
}

#[test]
fn quote_verifies_with_the_ak_and_carries_nonce_and_pcrs() {
    let tpm = Swtpm::start();
    let p = provision(&tpm);
    extend_pcr7(&tpm);
    let nonce = b"maa-nonce-0123456789";
    let mut t = tpm.open();
    let q = t.quote(nonce, &ATTESTED_PCRS).unwrap();
    assert_clean(&mut t, "a quote");
    drop(t);
    tpm.assert_nothing_left("a quote");
    verify_with_ak(&p.ak, &q.attest, &q.signature);
    let attest = TpmsAttest::parse(&q.attest).unwrap();
    assert_eq!(attest.extra_data, nonce);
    let independent = read_pcrs_independently(&tpm);
    let values: Vec<[u8; 32]> = q.pcrs.iter().map(|(_, v)| *v).collect();
    assert_eq!(values, independent);
    assert_eq!(
        q.pcrs.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        ATTESTED_PCRS
    );
    assert_ne!(independent[7], [0u8; 32], "PCR 7 was extended");
    let mut h = sha2::Sha256::new();
    for v in &independent {
        h.update(v);
    }
    let Attested::Quote { pcr_digest, .. } = &attest.attested else {
        panic!("not a quote")
    };
    assert_eq!(&h.finalize()[..], &pcr_digest[..]);
    // An over-long nonce is refused before the TPM is asked.
    let mut t = tpm.open();
    assert!(t.quote(&[0; 65], &ATTESTED_PCRS).is_err());
}

#[test]
fn transfer_key_is_certified_by_the_ak_and_decrypts_oaep_and_rsaes() {
    let tpm = Swtpm::start();
    let p = provision(&tpm);
    let mut key = tpm.open().create_transfer_key(&ATTESTED_PCRS).unwrap();

    // Certified by the AK: signature, and the attested name is the key's name
    // (nameAlg SHA-256 ‖ SHA-256(TPMT_PUBLIC)).
    verify_with_ak(&p.ak, &key.certify_info, &key.certify_signature);
    let certify = TpmsAttest::parse(&key.certify_info).unwrap();
    assert_eq!(certify.attest_type, TPM_ST_ATTEST_CERTIFY);
    let Attested::Certify { name, .. } = &certify.attested else {
        panic!("not a certify")
    };
    let mut expected = vec![0x00, 0x0b];
    expected.extend_from_slice(&sha2::Sha256::digest(&key.public.tpm2b_public[2..]));
    assert_eq!(name, &expected);

    // The module's own check agrees, and refuses another key or another signer.
    let ak_pub = key.tpm().unwrap().ak_public().unwrap();
    verify_certify(
        &key.public,
        &key.certify_info,
        &key.certify_signature,
        &ak_pub,
    )
    .unwrap();
    let mut other_key = key.public.clone();
    other_key.tpm2b_public[20] ^= 1;
    let e = verify_certify(
        &other_key,
        &key.certify_info,
        &key.certify_signature,
        &ak_pub,
    )
    .unwrap_err();
    assert!(e.message().contains("another key"), "{e}");
    let e = verify_certify(
        &key.public,
        &key.certify_info,
        &key.certify_signature,
        &key.public,
    )
    .unwrap_err();
    assert!(e.message().contains("not signed by the AK"), "{e}");

    // Software encrypts to the TPM's public key; the TPM decrypts.
    let public = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&key.public.n),
        rsa::BigUint::from_bytes_be(&key.public.e),
    )
    .unwrap();
    assert_eq!(public.size(), 256);
    let secret = [0x42u8; 32];
    let mut rng = rand::thread_rng();
    let oaep = public
        .encrypt(&mut rng, rsa::Oaep::new::<sha2::Sha256>(), &secret)
        .unwrap();
    assert_eq!(
        &key.decrypt(&oaep, DecryptScheme::OaepSha256).unwrap()[..],
        &secret
    );
    let pkcs1 = public
        .encrypt(&mut rng, rsa::Pkcs1v15Encrypt, &secret)
        .unwrap();
    assert_eq!(
        &key.decrypt(&pkcs1, DecryptScheme::RsaEs).unwrap()[..],
        &secret
    );
    // The wrong scheme does not yield the secret.
    assert!(key
        .decrypt(&oaep, DecryptScheme::RsaEs)
        .map(|p| p[..] != secret)
        .unwrap_or(true));
    // While the key is loaded the AK still quotes (one TPM connection for the whole login).
    key.tpm().unwrap().quote(b"n", &ATTESTED_PCRS).unwrap();
    // While loaded, the key is the one transient object.
    assert_eq!(leftovers(key.tpm().unwrap().esys()), (1, 0));
    let mut t = key.into_tpm().unwrap();
    assert_clean(&mut t, "the transfer key");
    // doctor's probe: create, certify, flush.
    let probed = t.probe_transfer_key(&ATTESTED_PCRS).unwrap();
    assert_eq!(probed.public.n, public.n().to_bytes_be());
    verify_with_ak(&p.ak, &probed.certify_info, &probed.certify_signature);
    assert_clean(&mut t, "the probe");
    drop(t);
    tpm.assert_nothing_left("the transfer key");

    // Same template and PCRs: the NULL-hierarchy primary is the same key.
    let again = tpm.open().create_transfer_key(&ATTESTED_PCRS).unwrap();
    assert_eq!(again.public.n, public.n().to_bytes_be());
    drop(again);
    tpm.assert_nothing_left("the second transfer key");
}

#[test]
fn transfer_key_refuses_to_decrypt_after_a_pcr_change() {
    let tpm = Swtpm::start();
    provision(&tpm);
    let mut key = tpm.open().create_transfer_key(&ATTESTED_PCRS).unwrap();
    let public = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(&key.public.n),
        rsa::BigUint::from_bytes_be(&key.public.e),
    )
    .unwrap();
    let oaep = public
        .encrypt(
            &mut rand::thread_rng(),
            rsa::Oaep::new::<sha2::Sha256>(),
            b"k",
        )
        .unwrap();
    // Extend PCR 7 through the layer's own connection (swtpm serves one client at a time).
    let mut values = DigestValues::new();
    values.set(
        HashingAlgorithm::Sha256,
        Digest::try_from(vec![1u8; 32]).unwrap(),
    );
    key.tpm()
        .unwrap()
        .esys()
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.pcr_extend(PcrHandle::Pcr7, values)
        })
        .unwrap();
    let e = key.decrypt(&oaep, DecryptScheme::OaepSha256).unwrap_err();
    assert!(e.message().contains("PCRs changed"), "{e}");
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert_eq!(leftovers(key.tpm().unwrap().esys()), (1, 0), "only the key");
    let mut t = key.into_tpm().unwrap();
    assert_clean(&mut t, "a refused decryption");
    drop(t);
    tpm.assert_nothing_left("a refused decryption");
}

#[test]
fn without_an_ak_the_transfer_key_fails_and_nothing_is_left() {
    let tpm = Swtpm::start();
    // Nothing provisioned: the key is created, then certifying it needs the AK.
    let mut t = tpm.open();
    let e = t.probe_transfer_key(&ATTESTED_PCRS).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("0x81000003"), "{e}");
    assert!(e.hint().unwrap().contains("attestation key"), "{e:?}");
    assert_clean(&mut t, "a failed transfer-key creation");
    let e = t.quote(b"n", &ATTESTED_PCRS).unwrap_err();
    assert!(e.message().contains("0x81000003"), "{e}");
    let e = t.ak_certificate(EchoWait::ONCE).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("0x01c101d0"), "{e}");
    assert!(
        e.hint().unwrap().contains("guest attestation extension"),
        "{e:?}"
    );
    assert_clean(&mut t, "a failed quote");
}

/// Defines `index` (owner read / write, `size` bytes) without writing it: the TPM then answers
/// reads with TPM_RC_NV_UNINITIALIZED, Azure's "code 330".
fn define_unwritten(ctx: &mut Context, index: u32, size: usize) {
    let attributes = NvIndexAttributesBuilder::new()
        .with_owner_write(true)
        .with_owner_read(true)
        .build()
        .unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(NvIndexTpmHandle::new(index).unwrap())
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attributes)
        .with_data_area_size(size)
        .build()
        .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.nv_define_space(Provision::Owner, None, public).unwrap();
    });
}

#[test]
fn unwritten_nv_indices_are_read_again_over_the_wait_then_refused_with_the_code_330_hint() {
    let tpm = Swtpm::start();
    let mut ctx = tpm.context();
    define_unwritten(&mut ctx, NV_AK_CERT, 512);
    define_unwritten(&mut ctx, NV_HCL_REPORT, 2048);
    drop(ctx);
    let mut t = tpm.open();
    let wait = EchoWait {
        attempts: 3,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };
    let e = t.ak_certificate(wait).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("0x01c101d0 (3 reads"), "{e}");
    assert!(e.hint().unwrap().contains("code 330"), "{e:?}");
    let e = t.fresh_hcl_report(&[7; 64], wait).unwrap_err();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(
        e.message().contains("the HCL report; 3 reads")
            && e.message().contains("used before being initialized"),
        "{e}"
    );
    assert!(e.hint().unwrap().contains("code 330"), "{e:?}");
    tpm.assert_nothing_left("reads of unwritten NV indices");
}

#[test]
fn a_tpm_device_the_user_may_not_open_is_named_with_the_tss_group_hint() {
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("tpmrm0");
    std::fs::write(&device, b"").unwrap();
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Root (CI) opens as another user (below); anyone else is refused their own mode-000 file.
    let mode = if root { 0o600 } else { 0o000 };
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(mode)).unwrap();
    let tcti = format!("device:{}", device.display());
    let e = std::thread::spawn(move || {
        if root {
            // setfsuid changes this thread's filesystem user only (and drops its DAC override
            // capability), so the rest of the test process keeps root.
            // SAFETY: setfsuid takes a plain integer and affects only the calling thread.
            unsafe { libc::setfsuid(65534) };
        }
        Tpm::open(Some(&tcti)).err().unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("Permission denied"), "{e}");
    assert!(e.hint().unwrap().contains("tss group"), "{e:?}");
}

/// Ready when both ports accept, a TPM command is answered, and our swtpm is still the process
/// behind them (not another test's, holding a port ours failed to bind).
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok()
            && TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "swtpm did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let answered = Context::new(TctiNameConf::from_str(&tcti).unwrap())
        .and_then(|mut c| c.get_random(8))
        .is_ok();
    answered && matches!(child.try_wait(), Ok(None))
}

/// The leak check is not vacuous: what is left loaded is counted.
#[test]
fn leftover_objects_and_sessions_are_counted() {
    let tpm = Swtpm::start();
    let mut t = tpm.open();
    let ctx = t.esys();
    let created = ctx
        .execute_with_session(Some(AuthSession::Password), |c| {
            c.create_primary(Hierarchy::Null, ak_template(), None, None, None, None)
        })
        .unwrap();
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            tss_esapi::constants::SessionType::Hmac,
            tss_esapi::structures::SymmetricDefinition::Null,
            HashingAlgorithm::Sha256,
        )
        .unwrap()
        .unwrap();
    assert_eq!(leftovers(ctx), (1, 1));
    ctx.flush_context(created.key_handle.into()).unwrap();
    ctx.flush_context(tss_esapi::handles::SessionHandle::from(session).into())
        .unwrap();
    assert_eq!(leftovers(ctx), (0, 0));
}

#[test]
fn open_reports_missing_device_and_bad_tcti_precisely() {
    let e = Tpm::open(Some("device:/nonexistent/tpmrm0")).err().unwrap();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("/nonexistent/tpmrm0"), "{e}");
    assert!(e.hint().unwrap().contains("no TPM"), "{e:?}");
    let e = Tpm::open(Some("carrier-pigeon")).err().unwrap();
    assert!(e.message().contains("platform.tpm_tcti"), "{e}");
    // Nothing listens here: libtss2's connect fails, reported as a device error.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = Tpm::open(Some(&format!("swtpm:host=127.0.0.1,port={port}")))
        .err()
        .unwrap();
    assert_eq!(e.rv(), cryptoki_sys::CKR_DEVICE_ERROR);
    assert!(e.message().contains("opening the TCTI"), "{e}");
}

#[test]
fn doctor_checks_each_step_and_names_the_one_that_fails() {
    let tpm = Swtpm::start();
    let p = provision(&tpm);
    let rows = skr_pkcs11::release::tpm::doctor_steps(Some(&tpm.tcti()));
    let names: Vec<&str> = rows.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "tpm",
            "tpm hcl report",
            "tpm ak",
            "tpm quote",
            "tpm transfer key"
        ]
    );
    // The Kinvolk report carries another VM's HCLAkPub: only the AK row fails, and says why.
    for (name, r) in &rows {
        if *name == "tpm ak" {
            let e = r.as_ref().unwrap_err();
            assert!(e.message().contains("not the HCLAkPub"), "{e}");
        } else {
            assert!(r.is_ok(), "{name}: {r:?}");
        }
    }
    tpm.assert_nothing_left("doctor");

    // With a report that names this vTPM's AK, every row passes.
    let mut ctx = tpm.context();
    overwrite(
        &mut ctx,
        NV_HCL_REPORT,
        &hcl_with(&p.hcl, Some(&p.ak), None),
    );
    drop(ctx);
    let rows = skr_pkcs11::release::tpm::doctor_steps(Some(&tpm.tcti()));
    for (name, r) in &rows {
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    assert!(rows[2].1.as_ref().unwrap().contains("= HCLAkPub"));
    tpm.assert_nothing_left("doctor");

    // No TPM behind the TCTI: one row, the open, failed.
    let rows = skr_pkcs11::release::tpm::doctor_steps(Some("device:/nonexistent/tpmrm0"));
    assert_eq!(rows.len(), 1);
    assert!(rows[0].1.is_err());
}

/// `platform.evidence = "auto"` on a machine without an SNP guest device takes the vTPM path
/// when the configured TPM has the HCL report's NV index, and not when it lacks it.
#[test]
fn auto_evidence_takes_the_vtpm_only_when_it_has_an_hcl_report() {
    let config = |tcti: &str| {
        let text = format!(
            "[platform]\nevidence = \"auto\"\ntpm_tcti = \"{tcti}\"\n[attestation]\nurl = \"https://maa.example\"\n[identity]\nsource = \"imds\"\n[[token]]\nlabel = \"t\"\n[[token.key]]\nlabel = \"k\"\nid = \"01\"\nkid = \"https://kv.vault.azure.net/keys/k\"\n"
        );
        skr_pkcs11::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap()
    };
    let snp_device = std::path::Path::new("/dev/sev-guest").exists()
        || std::path::Path::new("/dev/sev").exists();
    let tpm = Swtpm::start();
    let bare = config(&tpm.tcti());
    assert!(!skr_pkcs11::release::evidence::uses_vtpm(&bare));
    provision(&tpm);
    assert_eq!(
        skr_pkcs11::release::evidence::uses_vtpm(&config(&tpm.tcti())),
        !snp_device,
        "an SNP guest device keeps its provider; otherwise the provisioned vTPM is used"
    );
    tpm.assert_nothing_left("probing");
    // No TPM at the configured device: not the vTPM path (and no TCTI noise).
    assert!(!skr_pkcs11::release::evidence::uses_vtpm(&config(
        "device:/nonexistent/tpmrm0"
    )));
}
