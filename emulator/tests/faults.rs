//! The admin API: fault injection per endpoint, counters, the decision log. One emulator,
//! one sequential scenario (faults are global to the emulator).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn add_fault(emu: &Emu, c: &reqwest::Client, fault: Value) {
    let r = send(
        c.post(format!("{}/admin/faults", emu.platform))
            .json(&fault),
    )
    .await;
    assert_eq!(r.status, 204, "{fault}: {}", r.text);
}

#[tokio::test]
async fn faults_counters_and_log() {
    let e = Emu::start_shared("faults");
    let c = e.client();
    let transfer = transfer_key();
    let vt = access_token(&e, &c, "https://vault.azure.net").await;
    let target = maa_token(&e, &c, &transfer).await;
    let release_url = format!("{}/keys/tls-rsa/release?api-version=7.4", e.vault);
    let release = || {
        let c = c.clone();
        let (u, vt, target) = (release_url.clone(), vt.clone(), target.clone());
        async move {
            send(
                c.post(u)
                    .bearer_auth(vt)
                    .json(&json!({"target": target, "enc": "RSA_AES_KEY_WRAP_256"})),
            )
            .await
        }
    };
    let released_plaintext = |r: &Response| -> Result<Vec<u8>, String> {
        let (_, payload, _) = jws_parts(r.json()["value"].as_str().unwrap());
        let key_hsm: Value = serde_json::from_slice(&unb64url(
            payload["response"]["key"]["key"]["key_hsm"]
                .as_str()
                .unwrap(),
        ))
        .unwrap();
        unwrap(
            &transfer.key,
            "RSA_AES_KEY_WRAP_256",
            &unb64url(key_hsm["ciphertext"].as_str().unwrap()),
        )
    };

    // Bad fault bodies are refused.
    for bad in [
        json!({"endpoint": "nowhere", "kind": "status"}),
        json!({"endpoint": "maa-attest", "kind": "wrong-wrap-key"}),
        json!({"endpoint": "akv-release", "kind": "explode"}),
    ] {
        let r = send(c.post(format!("{}/admin/faults", e.platform)).json(&bad)).await;
        assert_eq!(r.status, 400, "{bad}");
    }

    send(c.post(format!("{}/admin/counters/reset", e.platform))).await;
    let counters = send(c.get(format!("{}/admin/counters", e.platform)))
        .await
        .json();
    assert_eq!(
        counters,
        json!({"attestations": 0, "tokens": 0, "releases": {}, "release_denied": {}, "throttled": {}})
    );

    // Throttle, then two 503s, in order, then normal service.
    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "throttle", "retry_after": 7}),
    )
    .await;
    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "status", "status": 503, "count": 2}),
    )
    .await;
    let r = release().await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "7");
    assert_eq!(release().await.status, 503);
    assert_eq!(release().await.status, 503);
    let ok = release().await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    released_plaintext(&ok).expect("normal release unwraps");

    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "malformed-body"}),
    )
    .await;
    let r = release().await;
    assert_eq!(r.status, 200);
    assert!(
        serde_json::from_str::<Value>(&r.text).is_err(),
        "malformed: {}",
        r.text
    );

    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "truncated-jws"}),
    )
    .await;
    let r = release().await;
    assert_eq!(r.status, 200);
    let jws = r.json()["value"].as_str().unwrap().to_string();
    let signature = jws.rsplit('.').next().unwrap();
    assert!(
        URL_SAFE_LEN_RSA2048 > signature.len(),
        "signature cut: {} chars",
        signature.len()
    );

    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "wrong-wrap-key"}),
    )
    .await;
    let r = release().await;
    assert_eq!(r.status, 200);
    assert!(released_plaintext(&r).is_err(), "wrapped to another key");
    released_plaintext(&release().await).expect("back to normal");

    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-get", "kind": "delay", "delay_ms": 400}),
    )
    .await;
    let started = Instant::now();
    let r = send(
        c.get(format!("{}/keys/tls-rsa?api-version=7.4", e.vault))
            .bearer_auth(&vt),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(400));

    add_fault(
        &e,
        &c,
        json!({"endpoint": "imds-token", "kind": "status", "status": 500}),
    )
    .await;
    let r = send(c.get(format!("{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net", e.imds)).header("Metadata", "true")).await;
    assert_eq!(r.status, 500);

    add_fault(
        &e,
        &c,
        json!({"endpoint": "platform-report", "kind": "throttle", "retry_after": 1}),
    )
    .await;
    let r = send(
        c.post(format!("{}/platform/snp/report", e.platform))
            .json(&json!({"report_data": b64url(&[0u8; 64])})),
    )
    .await;
    assert_eq!(r.status, 429);

    // An expired MAA token is refused by the vault.
    add_fault(
        &e,
        &c,
        json!({"endpoint": "maa-attest", "kind": "expired-token"}),
    )
    .await;
    let expired = maa_token(&e, &c, &transfer).await;
    let (_, claims, _) = jws_parts(&expired);
    assert!(
        claims["exp"].as_u64().unwrap()
            < std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
    );
    let r = send(
        c.post(&release_url)
            .bearer_auth(&vt)
            .json(&json!({"target": expired})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("expired"), "{}", r.text);

    // Clearing faults.
    add_fault(
        &e,
        &c,
        json!({"endpoint": "akv-release", "kind": "status", "count": 5}),
    )
    .await;
    assert_eq!(
        send(c.delete(format!("{}/admin/faults", e.platform)))
            .await
            .status,
        204
    );
    assert_eq!(release().await.status, 200);

    let counters = send(c.get(format!("{}/admin/counters", e.platform)))
        .await
        .json();
    assert_eq!(counters["attestations"], 1, "{counters}");
    assert_eq!(counters["tokens"], 0, "the failed IMDS call is not counted");
    // ok, truncated, wrong key, normal, final: faults that answer instead of the service do
    // not count.
    assert_eq!(counters["releases"]["tls-rsa"], 5, "{counters}");
    assert_eq!(counters["release_denied"]["tls-rsa"], 1, "{counters}");

    let log = send(c.get(format!("{}/admin/log", e.platform))).await.text;
    let entries: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    assert!(entries.iter().any(|l| l["event"] == "fault"));
    assert!(entries.iter().any(|l| l["event"] == "request"
        && l["service"] == "vault"
        && l["path"] == "/keys/tls-rsa/release"
        && l["status"] == 429));
    assert!(entries
        .iter()
        .any(|l| l["event"] == "released" && l["wrapping_kid"] == "transfer-key"));
    assert!(entries.iter().any(
        |l| l["event"] == "release-denied" && l["reason"].as_str().unwrap().contains("expired")
    ));
}

/// `PUT /admin/platform`: the simulated guest changes at run time; MAA and the vault follow.
#[tokio::test]
async fn platform_changes_at_run_time() {
    let e = Emu::start_shared("platform");
    let c = e.client();
    let transfer = transfer_key();
    let vt = access_token(&e, &c, "https://vault.azure.net").await;
    let url = format!("{}/admin/platform", e.platform);
    let original = send(c.get(&url)).await.json();
    assert_eq!(original["vmpl"], 0);
    assert_eq!(original["policy"], 0x3001F);

    for bad in [
        json!({"bogus": 1}),
        json!({"measurement": "zz"}),
        json!([1]),
    ] {
        assert_eq!(send(c.put(&url).json(&bad)).await.status, 400, "{bad}");
    }

    // A debuggable guest: MAA says so and the demo policy refuses it.
    let r = send(c.put(&url).json(&json!({"policy": 0x3001Fu64 | (1 << 19)}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = maa_token(&e, &c, &transfer).await;
    let (_, claims, _) = jws_parts(&token);
    assert_eq!(claims["x-ms-sevsnpvm-is-debuggable"], true);
    let r = send(
        c.post(format!("{}/keys/tls-rsa/release?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"target": token})),
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(r.text.contains("x-ms-sevsnpvm-is-debuggable"), "{}", r.text);

    // A new TCB: the VCEK is re-issued, THIM and the security context follow, MAA verifies it.
    let tcb = json!({"bootloader": 4, "tee": 1, "snp": 9, "microcode": 210});
    let r = send(c.put(&url).json(&json!({"policy": 0x3001F, "tcb": tcb}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let thim = send(
        c.get(format!("{}/metadata/THIM/amd/certification", e.imds))
            .header("Metadata", "true"),
    )
    .await
    .json();
    assert_eq!(thim["tcbm"], "D209000000000104");
    let sc = std::fs::read_to_string(e.dir.join("security-context/host-amd-cert-base64")).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&unb64(sc.trim())).unwrap(),
        thim
    );
    let token = maa_token(&e, &c, &transfer).await;
    let (_, claims, _) = jws_parts(&token);
    assert_eq!(claims["x-ms-sevsnpvm-snpfw-svn"], 9);
    assert_eq!(claims["x-ms-sevsnpvm-microcode-svn"], 210);
    assert_eq!(claims["x-ms-sevsnpvm-is-debuggable"], false);
    let r = send(
        c.post(format!("{}/keys/tls-rsa/release?api-version=7.4", e.vault))
            .bearer_auth(&vt)
            .json(&json!({"target": token})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // initTimeData binds to HOST_DATA: a guest whose "security policy" is JSON can send it.
    let init = br#"{"workload":"demo","version":2}"#;
    let r = send(
        c.put(&url)
            .json(&json!({"security_policy": std::str::from_utf8(init).unwrap()})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (report, chain) = platform_report(&e, &c, &[0u8; 64]).await;
    let mut body = attest_body(&report, &chain, None, None);
    body["initTimeData"] = json!({"data": b64url(init), "dataType": "JSON"});
    let r = send(
        c.post(format!("{}/attest/SevSnpVm?api-version=2022-08-01", e.maa))
            .json(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, claims, _) = jws_parts(r.json()["token"].as_str().unwrap());
    assert_eq!(
        claims["x-ms-inittime"],
        json!({"version": 2, "workload": "demo"})
    );
    body["initTimeData"] = json!({"data": b64url(b"{}"), "dataType": "JSON"});
    let r = send(
        c.post(format!("{}/attest/SevSnpVm?api-version=2022-08-01", e.maa))
            .json(&body),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("HOST_DATA"), "{}", r.text);

    // Persisted for the next start.
    let saved: Value =
        serde_json::from_slice(&std::fs::read(e.dir.join("state/platform.json")).unwrap()).unwrap();
    assert_eq!(saved["tcb"], tcb);

    // Other generations: Turin (FMC in the TCB, 8-byte chip id) and Genoa attest and release.
    assert_eq!(
        send(c.put(&url).json(&json!({"generation": "Turin"})))
            .await
            .status,
        400,
        "Turin needs tcb.fmc"
    );
    for (generation, tcb) in [
        (
            "Turin",
            json!({"fmc": 1, "bootloader": 2, "tee": 0, "snp": 3, "microcode": 5}),
        ),
        (
            "Genoa",
            json!({"bootloader": 7, "tee": 0, "snp": 21, "microcode": 72}),
        ),
    ] {
        let r = send(
            c.put(&url)
                .json(&json!({"generation": generation, "tcb": tcb, "security_policy": original["security_policy"]})),
        )
        .await;
        assert_eq!(r.status, 200, "{generation}: {}", r.text);
        let (report, chain) = platform_report(&e, &c, &[0u8; 64]).await;
        let chip = &report[0x1A0..0x1E0];
        assert_eq!(chip[8..].iter().all(|b| *b == 0), generation == "Turin");
        let vcek = x509_cert::Certificate::load_pem_chain(chain.as_bytes())
            .unwrap()
            .remove(0);
        let hwid = vcek
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|x| x.extn_id.to_string() == "1.3.6.1.4.1.3704.1.4")
            .unwrap();
        assert_eq!(
            hwid.extn_value.as_bytes().len(),
            if generation == "Turin" { 8 } else { 64 }
        );
        let token = maa_token(&e, &c, &transfer).await;
        let (_, claims, _) = jws_parts(&token);
        assert_eq!(
            claims["x-ms-sevsnpvm-bootloader-svn"], tcb["bootloader"],
            "{generation}"
        );
        assert_eq!(
            claims["x-ms-sevsnpvm-snpfw-svn"], tcb["snp"],
            "{generation}"
        );
        assert_eq!(
            claims["x-ms-sevsnpvm-microcode-svn"], tcb["microcode"],
            "{generation}"
        );
        let r = send(
            c.post(format!("{}/keys/tls-rsa/release?api-version=7.4", e.vault))
                .bearer_auth(&vt)
                .json(&json!({"target": token})),
        )
        .await;
        assert_eq!(r.status, 200, "{generation}: {}", r.text);
    }

    // Opt-in Key Vault throttling: create + release share 10-second windows.
    let limits = format!("{}/admin/limits", e.platform);
    assert_eq!(
        send(
            c.put(&limits)
                .json(&json!({"vault_create_release_per_10s": 2}))
        )
        .await
        .status,
        204
    );
    assert_eq!(
        send(c.get(&limits)).await.json()["vault_create_release_per_10s"],
        2
    );
    assert_eq!(
        send(c.put(&limits).json(&json!({"unknown": 1})))
            .await
            .status,
        400
    );
    let release = || {
        let c = c.clone();
        let (url, vt, token) = (
            format!("{}/keys/tls-ec/release?api-version=7.4", e.vault),
            vt.clone(),
            token.clone(),
        );
        async move { send(c.post(url).bearer_auth(vt).json(&json!({"target": token}))).await }
    };
    assert_eq!(release().await.status, 200);
    assert_eq!(release().await.status, 200);
    let throttled = release().await;
    assert_eq!(throttled.status, 429);
    let wait: u64 = throttled.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    assert_eq!(throttled.json()["error"]["code"], "Throttled");
    let counted = send(c.get(format!("{}/admin/counters", e.platform)))
        .await
        .json();
    assert_eq!(counted["throttled"]["vault"], 1, "{counted}");
    assert_eq!(
        send(c.put(&limits).json(&json!({"window_ms": 0})))
            .await
            .status,
        400
    );
    // The documented limits: per vault, 10 HSM-key creates + releases per 10 s.
    assert_eq!(
        send(c.put(&limits).json(&json!({"preset": "azure"})))
            .await
            .status,
        204
    );
    assert_eq!(send(c.get(&limits)).await.json()["preset"], "azure");
    let mut statuses = Vec::new();
    for _ in 0..11 {
        statuses.push(release().await.status);
    }
    assert_eq!(statuses[..10], [200; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    // The managed HSM has its own (unset) limit; clearing the vault's lifts it.
    assert_eq!(send(c.put(&limits).json(&json!({}))).await.status, 204);
    assert_eq!(release().await.status, 200);
}

/// base64url length of an RSA-2048 signature (256 bytes).
const URL_SAFE_LEN_RSA2048: usize = 342;
