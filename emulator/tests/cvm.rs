//! The simulated Azure TDX confidential VM (`up --platform cvm-tdx`) seen from the guest, with a
//! TPM client of the test's own (tss-esapi) and plain HTTP: the paravisor refreshes the HCL
//! report after a user-data write (type 4, TDREPORT binding SHA-256 of the runtime claims, which
//! echo the user-data), and IMDS `/acc/tdquote` quotes that TDREPORT, with Azure's header rules.

mod common;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::str::FromStr;
use std::sync::OnceLock;
use tss_esapi::abstraction::nv;
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::handles::NvIndexTpmHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{MaxNvBuffer, NvPublicBuilder};

fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| Emu::start_shared_with("cvm-tdx", &["--platform", "cvm-tdx"]))
}

fn tpm() -> tss_esapi::Context {
    let tcti = read_env(&emu().dir)["SKR_EMULATOR_TPM_TCTI"].clone();
    tss_esapi::Context::new(tss_esapi::tcti_ldr::TctiNameConf::from_str(&tcti).unwrap()).unwrap()
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Writes `user_data` to NV 0x01400002 (defining it), then reads NV 0x01400001.
fn write_and_read(user_data: &[u8; 64]) -> Vec<u8> {
    let mut ctx = tpm();
    let index = NvIndexTpmHandle::new(0x0140_0002).unwrap();
    let public = NvPublicBuilder::new()
        .with_nv_index(index)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(
            NvIndexAttributesBuilder::new()
                .with_owner_write(true)
                .with_owner_read(true)
                .build()
                .unwrap(),
        )
        .with_data_area_size(64)
        .build()
        .unwrap();
    // Defined by the first round; later rounds open it (ESYS commands that take no
    // authorization must run without the password session: libtss2 crashes otherwise).
    let defined = ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.nv_define_space(Provision::Owner, None, public)
    });
    let h = match defined {
        Ok(h) => h,
        Err(_) => ctx
            .execute_without_session(|c| c.tr_from_tpm_public(index.into()))
            .unwrap()
            .into(),
    };
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        c.nv_write(
            NvAuth::Owner,
            h,
            MaxNvBuffer::try_from(user_data.to_vec()).unwrap(),
            0,
        )
    })
    .unwrap();
    ctx.execute_with_session(Some(AuthSession::Password), |c| {
        nv::read_full(
            c,
            NvAuth::Owner,
            NvIndexTpmHandle::new(0x0140_0001).unwrap(),
        )
    })
    .unwrap()
}

#[tokio::test]
async fn the_paravisor_echoes_user_data_and_imds_quotes_the_tdreport() {
    let e = emu();
    for round in [0x42u8, 0x43] {
        let ud = [round; 64];
        let hcl = tokio::task::spawn_blocking(move || write_and_read(&ud))
            .await
            .unwrap();
        assert_eq!(&hcl[..4], b"HCLA");
        assert_eq!(u32_le(&hcl, 1224), 4, "report_type TDX");
        let claims_len = u32_le(&hcl, 1232) as usize;
        let claims = &hcl[1236..1236 + claims_len];
        let v: Value = serde_json::from_slice(claims).unwrap();
        assert_eq!(
            v["user-data"],
            hex::encode_upper(ud),
            "the next read echoes the write"
        );
        assert_eq!(v["keys"][0]["kid"], "HCLAkPub");
        let tdreport = &hcl[32..32 + 1024];
        assert_eq!(tdreport[0], 0x81);
        assert_eq!(tdreport[128..160], Sha256::digest(claims)[..]);
        assert!(tdreport[160..192].iter().all(|b| *b == 0));

        let c = e.client();
        let url = format!("{}/acc/tdquote", e.imds);
        let body = json!({ "report": b64url(tdreport) }).to_string();
        let ok = send(
            c.post(&url)
                .header("Metadata", "true")
                .header("Content-Type", "application/json")
                .body(body.clone()),
        )
        .await;
        assert_eq!(ok.status, 200, "{}", ok.text);
        let quote = unb64url(ok.json()["quote"].as_str().unwrap());
        assert_eq!(&quote[0..2], &[4, 0], "DCAP quote v4");
        assert_eq!(&quote[48 + 520..48 + 584], &tdreport[128..192]);
        assert_eq!(&quote[48 + 136..48 + 184], &tdreport[528..576], "MRTD");

        // Azure's rules: a charset earns 415, no Metadata header 400, a foreign TDREPORT 400.
        let charset = send(
            c.post(&url)
                .header("Metadata", "true")
                .header("Content-Type", "application/json; charset=utf-8")
                .body(body.clone()),
        )
        .await;
        assert_eq!(charset.status, 415);
        let no_metadata = send(
            c.post(&url)
                .header("Content-Type", "application/json")
                .body(body.clone()),
        )
        .await;
        assert_eq!(no_metadata.status, 400);
        let mut forged = tdreport.to_vec();
        forged[128] ^= 1;
        let foreign = send(
            c.post(&url)
                .header("Metadata", "true")
                .header("Content-Type", "application/json")
                .body(json!({ "report": b64url(&forged) }).to_string()),
        )
        .await;
        assert_eq!(foreign.status, 400, "{}", foreign.text);
    }
}
