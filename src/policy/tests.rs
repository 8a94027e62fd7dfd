use super::*;
use serde_json::json;
use std::path::PathBuf;

fn testdata(rel: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(rel);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

const AUTH: &str = "https://maa.example";

fn one(claim: &str, op: &str, value: Value) -> Policy {
    parse_value(&json!({"version":"1.0.0","anyOf":[{"authority": AUTH, "allOf":[{"claim": claim, op: value}]}]}))
        .unwrap()
}

fn check(claim: &str, op: &str, value: Value, claims: Value) -> bool {
    evaluate(&one(claim, op, value), AUTH, &claims).is_ok()
}

#[test]
fn operator_table() {
    let claims = json!({"s": "abc", "n": 40, "f": 1.5, "b": false, "t": true, "ns": "7"});
    let rows: &[(&str, &str, Value, bool)] = &[
        ("s", "equals", json!("abc"), true),
        ("s", "equals", json!("ABC"), false), // case-sensitive
        ("s", "notEquals", json!("abd"), true),
        ("s", "notEquals", json!("abc"), false),
        ("n", "equals", json!(40), true),
        ("n", "equals", json!("40"), true), // string form of a number
        ("n", "greater", json!(39), true),
        ("n", "greater", json!(40), false),
        ("n", "greaterOrEquals", json!(40), true),
        ("n", "greaterOrEquals", json!("41"), false),
        ("n", "less", json!(41), true),
        ("n", "less", json!(40), false),
        ("n", "lessOrEquals", json!(40), true),
        ("n", "lessOrEquals", json!(39.5), false),
        ("f", "equals", json!("1.5"), true),
        ("f", "less", json!(2), true),
        ("ns", "greater", json!(6), true), // numeric strings compare numerically
        ("ns", "less", json!("10"), true), // not lexicographically ("7" > "10" as text)
        ("s", "greater", json!(1), false), // not a number: never met
        ("b", "equals", json!("false"), true),
        ("b", "equals", json!(false), true),
        ("b", "equals", json!("False"), false),
        ("t", "equals", json!("true"), true),
        ("t", "notEquals", json!(false), true),
        ("s", "exists", json!(true), true),
        ("missing", "exists", json!(true), false),
        ("missing", "exists", json!(false), true),
        ("s", "exists", json!("false"), false),
    ];
    for (claim, op, value, want) in rows {
        assert_eq!(
            check(claim, op, value.clone(), claims.clone()),
            *want,
            "{claim} {op} {value}"
        );
    }
}

#[test]
fn missing_claim_is_false_for_every_comparison() {
    for op in [
        "equals",
        "notEquals",
        "less",
        "lessOrEquals",
        "greater",
        "greaterOrEquals",
    ] {
        let e = evaluate(&one("absent", op, json!("1")), AUTH, &json!({})).unwrap_err();
        assert_eq!(e.claim(), Some("absent"));
        assert!(e.to_string().contains("claim absent from the token"), "{e}");
    }
}

#[test]
fn number_string_forms_are_shortest_decimal() {
    assert_eq!(scalar_string(&json!(0)).unwrap(), "0");
    assert_eq!(scalar_string(&json!(-3)).unwrap(), "-3");
    assert_eq!(scalar_string(&json!(1.0)).unwrap(), "1");
    assert_eq!(scalar_string(&json!(0.1)).unwrap(), "0.1");
    assert_eq!(
        scalar_string(&json!(18446744073709551615u64)).unwrap(),
        "18446744073709551615"
    );
    assert!(scalar_string(&json!({"a":1})).is_none());
    assert!(scalar_string(&json!([1])).is_none());
    // 1.0 in a policy matches integer 1 in a token.
    assert!(check("n", "equals", json!(1.0), json!({"n": 1})));
}

#[test]
fn objects_and_arrays_never_match() {
    let claims = json!({"o": {"a": 1}, "arr": [0, 1]});
    assert!(!check("o", "equals", json!("{\"a\":1}"), claims.clone()));
    assert!(!check("arr", "equals", json!("0"), claims.clone()));
    assert!(!check("arr.0", "equals", json!(0), claims.clone())); // arrays cannot be indexed
    assert!(check("o", "exists", json!(true), claims));
}

#[test]
fn dot_paths_navigate_objects() {
    let claims =
        json!({"x-ms-isolation-tee": {"x-ms-attestation-type": "sevsnpvm", "deep": {"v": 0}}});
    assert!(check(
        "x-ms-isolation-tee.x-ms-attestation-type",
        "equals",
        json!("sevsnpvm"),
        claims.clone()
    ));
    assert!(check(
        "x-ms-isolation-tee.deep.v",
        "equals",
        json!("0"),
        claims.clone()
    ));
    assert!(!check(
        "x-ms-isolation-tee.nope",
        "equals",
        json!("0"),
        claims
    ));
    // A literal dotted top-level name is found too.
    assert!(check("a.b", "equals", json!(1), json!({"a.b": 1})));
}

#[test]
fn nesting_to_any_depth() {
    let p = parse_value(&json!({"anyOf":[{"authority": AUTH, "allOf":[
        {"claim":"a","equals":"1"},
        {"anyOf":[
            {"claim":"b","equals":"x"},
            {"allOf":[{"claim":"c","equals":"y"},{"anyOf":[{"claim":"d","equals":true},{"claim":"e","equals":0}]}]}
        ]}
    ]}]}))
    .unwrap();
    assert!(evaluate(&p, AUTH, &json!({"a":1,"b":"x"})).is_ok());
    assert!(evaluate(&p, AUTH, &json!({"a":1,"c":"y","e":0})).is_ok());
    assert!(evaluate(&p, AUTH, &json!({"a":1,"c":"y","d":"true"})).is_ok());
    let e = evaluate(&p, AUTH, &json!({"a":1,"c":"z"})).unwrap_err();
    // The first alternative of the failing anyOf is named, with the number of alternatives.
    assert_eq!(e.claim(), Some("b"));
    assert!(
        e.to_string().starts_with("none of 2 alternatives met"),
        "{e}"
    );
    let e = evaluate(&p, AUTH, &json!({"a":2,"b":"x"})).unwrap_err();
    assert_eq!(e.claim(), Some("a"));
    assert_eq!(
        e.to_string(),
        "policy condition a equals \"1\" not met (token has \"2\")"
    );
}

#[test]
fn authority_trailing_slash_is_normalised_once() {
    let p = parse_value(
        &json!({"anyOf":[{"authority":"https://m.example/","allOf":[{"claim":"a","equals":"1"}]}]}),
    )
    .unwrap();
    assert!(evaluate(&p, "https://m.example", &json!({"a":"1"})).is_ok());
    assert!(evaluate(&p, "https://m.example/", &json!({"a":"1"})).is_ok());
    assert!(!authority_matches(
        "https://m.example//",
        "https://m.example"
    ));
    let e = evaluate(&p, "https://other.example", &json!({"a":"1"})).unwrap_err();
    assert!(matches!(e, Explanation::NoAuthority { .. }));
    assert!(e.to_string().contains("https://other.example"), "{e}");
}

#[test]
fn second_authority_is_tried() {
    let p = parse_value(&json!({"anyOf":[
        {"authority": AUTH, "allOf":[{"claim":"a","equals":"1"}]},
        {"authority": AUTH, "allOf":[{"claim":"a","equals":"2"}]}
    ]}))
    .unwrap();
    assert!(evaluate(&p, AUTH, &json!({"a":2})).is_ok());
    // Failure names the first rule's condition.
    let e = evaluate(&p, AUTH, &json!({"a":3})).unwrap_err();
    assert!(e.to_string().contains("a equals \"1\""), "{e}");
}

#[test]
fn encodings_base64url_and_padded_standard() {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    // '?' in the value forces '/' or '_' into the encoding, so the alphabets differ.
    let text = br#"{"version":"1.0.0","anyOf":[{"authority":"https://m","allOf":[{"claim":"q","equals":"??>>"}]}]}"#;
    let a = parse_encoded(&URL_SAFE_NO_PAD.encode(text)).unwrap();
    let b = parse_encoded(&STANDARD.encode(text)).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.version.as_deref(), Some("1.0.0"));
    assert!(parse_encoded("%%%").is_err());
}

#[test]
fn malformed_policies_are_refused_with_reason() {
    let cases = [
        (json!([]), "not an object"),
        (json!({"anyOf":[]}), "no authority"),
        (json!({"version":1,"anyOf":[]}), "version"),
        (json!({"anyOf":[{"allOf":[]}]}), "authority string"),
        (
            json!({"anyOf":[{"authority":"a","allOf":[],"anyOf":[]}]}),
            "not allowed together",
        ),
        (json!({"anyOf":[{"authority":"a"}]}), "needs allOf or anyOf"),
        (
            json!({"anyOf":[{"authority":"a","allOf":[]}]}),
            "allOf has no conditions",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"anyOf":[]}]}]}),
            "anyOf has no conditions",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"claim":"c","like":"x"}]}]}),
            "unknown operator",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"claim":"c","equals":"x","notEquals":"y"}]}]}),
            "more than one operator",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"claim":"c"}]}]}),
            "no operator",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"claim":"c","equals":{"x":1}}]}]}),
            "not a string, number or boolean",
        ),
        (
            json!({"anyOf":[{"authority":"a","allOf":[{"claim":"c","condition":"matches","value":"x"}]}]}),
            "unknown condition",
        ),
    ];
    for (v, want) in cases {
        let e = parse_value(&v).unwrap_err();
        assert!(e.0.contains(want), "{v}: {e}");
    }
}

#[test]
fn legacy_condition_value_form() {
    let examples = testdata("policy/published-examples.json");
    let p = parse_value(&examples["azure_sdk_js_test_policy_condition_value_syntax"]["policy"])
        .unwrap();
    assert_eq!(
        p.rules[0].conditions[0],
        Condition::Claim {
            claim: "sdk-test".into(),
            operator: Operator::Equals,
            value: json!("true")
        }
    );
    // The mHSM stored the sent legacy policy as `equals`: both forms mean the same.
    let sent = parse_value(&examples["azure_sdk_js_recording_mhsm_create_sent_vs_stored"]["sent"])
        .unwrap();
    let stored =
        parse_value(&examples["azure_sdk_js_recording_mhsm_create_sent_vs_stored"]["stored"])
            .unwrap();
    assert_eq!(sent.rules, stored.rules);
}

/// The real mock token AKV released against: boolean `sdk-test: true` meets `"equals":"true"`,
/// and its issuer has a trailing slash that the policy also has.
#[test]
fn js_sdk_policy_against_the_token_akv_accepted() {
    let examples = testdata("policy/published-examples.json");
    let token = testdata("akv/mock-attestation-target.decoded.json");
    let claims = &token["payload"];
    let iss = claims["iss"].as_str().unwrap();
    // That token's issuer is the sibling mock site; the policy names malegeskr5.
    let p = parse_value(&examples["azure_sdk_js_test_policy_condition_value_syntax"]["policy"])
        .unwrap();
    assert!(matches!(
        evaluate(&p, iss, claims),
        Err(Explanation::NoAuthority { .. })
    ));
    assert!(evaluate(&p, "https://malegeskr5.azurewebsites.net", claims).is_ok());
}

#[test]
fn published_examples_against_real_claim_sets() {
    let ex = testdata("policy/published-examples.json");
    let snp = testdata("maa/sevsnpvm-claims.docs.json");
    let cvm = testdata("maa/azureguest-cvm-claims.json");
    let tdx = testdata("maa/tdxvm-claims.docs.json");
    let policy =
        |name: &str| parse_value(&ex[name]["policy"]).unwrap_or_else(|e| panic!("{name}: {e}"));
    let weu = "https://sharedweu.weu.attest.azure.net";
    let eus2 = "https://sharedeus2.eus2.attest.azure.net";

    // Every published policy parses.
    for (name, entry) in ex.as_object().unwrap() {
        if let Some(p) = entry.get("policy") {
            parse_value(p).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    // CVM platform claims meet the CVM example from the right authority, not from another.
    assert!(evaluate(&policy("docs_skr_policy_examples_cvm_1"), weu, &snp).is_ok());
    assert!(matches!(
        evaluate(
            &policy("docs_skr_policy_examples_cvm_1"),
            snp["iss"].as_str().unwrap(),
            &snp
        ),
        Err(Explanation::NoAuthority { .. })
    ));
    // ACI example wants azure-compliant-uvm; the CVM sample has azure-compliant-cvm.
    let e = evaluate(
        &policy("docs_skr_policy_examples_aci_1"),
        "https://fabrikam1.wus.attest.azure.net",
        &snp,
    )
    .unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-compliance-status"));
    assert!(
        e.to_string()
            .contains("(token has \"azure-compliant-cvm\")"),
        "{e}"
    );
    // Guest-attestation (nested x-ms-isolation-tee) policy: the AzureGuest claims meet it.
    assert!(evaluate(&policy("docs_skr_flow_cvm_guest"), weu, &cvm).is_ok());
    let e = evaluate(&policy("docs_skr_flow_cvm_guest"), weu, &snp).unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-isolation-tee.x-ms-attestation-type"));
    // Documentation example 2 (top-level allOf, vmid) fails on the vmid of another VM.
    let e = evaluate(&policy("docs_skr_policy_examples_cvm_2_vmid"), weu, &cvm).unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-azurevm-vmid"));
    // Azure Local: string "false" meets boolean false; x-ms-policy is absent in this token.
    let e = evaluate(&policy("cvm_guest_attestation_azure_local"), weu, &cvm).unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-policy.edge-compliant-cvm"));
    // Sidecar ACI test policy: string "false"/"0" meet boolean/number claims; the placeholder
    // hostdata is the first unmet condition.
    let e = evaluate(
        &policy("sidecar_aci_tests"),
        "https://<maa-endpoint-host>",
        &snp,
    )
    .unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-sevsnpvm-hostdata"));
    // SGX policies: the claim is absent from an SNP token.
    let e = evaluate(
        &policy("docs_skr_policy_examples_sgx_3_greater"),
        eus2,
        &snp,
    )
    .unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-sgx-mrsigner"));
    assert!(e.to_string().contains("absent"), "{e}");
    // Kata setup policy (version 0.2) with an SNP token.
    let kata = policy("sidecar_aks_kata_setup_key_mhsm");
    assert_eq!(kata.version.as_deref(), Some("0.2"));
    assert!(evaluate(&kata, "https://${MAA_ENDPOINT}", &snp).is_ok());
    // Azure CLI data-disk policy: nested anyOf inside allOf over x-ms-isolation-tee.
    let dd = policy("azure_cli_default_data_disk_policy");
    assert!(evaluate(&dd, "<attestUri>", &cvm).is_ok());
    assert!(evaluate(&dd, "<attestUri>", &tdx).is_err());
    // TDX claims meet the CLI's default CVM policy (top-level compliance status).
    assert!(evaluate(&policy("azure_cli_default_cvm_policy"), "<attestUri>", &tdx).is_ok());
}

#[test]
fn microsoft_cvm_policy_files() {
    let platform = parse_json(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/policy/cvm-platform-skr-policy.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let datadisk = parse_json(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/policy/cvm-datadisk-skr-policy.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // (The protocol notes say "no version"; the file itself ends with "version": "1.0.0".)
    assert_eq!(platform.version.as_deref(), Some("1.0.0"));
    let snp = testdata("maa/sevsnpvm-claims.docs.json");
    let cvm = testdata("maa/azureguest-cvm-claims.json");
    let tdx = testdata("maa/tdxvm-claims.docs.json");
    // Trailing-slash authority in the file, no slash in MAA's iss.
    let eus = "https://sharedeus.eus.attest.azure.net";
    assert!(evaluate(&platform, eus, &snp).is_ok());
    assert!(evaluate(&platform, eus, &tdx).is_ok());
    // The AzureGuest token carries attestation type azurevm at top level and no top-level
    // compliance status: the platform policy is not for it.
    let e = evaluate(&platform, eus, &cvm).unwrap_err();
    assert_eq!(e.claim(), Some("x-ms-compliance-status"));
    assert!(evaluate(&datadisk, eus, &cvm).is_ok());
    let e = evaluate(&datadisk, eus, &snp).unwrap_err();
    assert!(e.claim().unwrap().starts_with("x-ms-isolation-tee."), "{e}");
    // An authority not in the file.
    assert!(matches!(
        evaluate(
            &platform,
            "https://maasandbox0001.wus.attest.azure.net",
            &snp
        ),
        Err(Explanation::NoAuthority { .. })
    ));
}

/// The table both evaluators run (emulator/src/policy.rs reads the same file): what each case
/// expects is the rule stated in the module comment.
#[test]
fn shared_table_with_the_emulator() {
    let table = testdata("policy/shared-cases.json");
    let authority = table["authority"].as_str().expect("authority");
    let cases = table["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "the shared table lost cases");
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let policy = case.get("policy").cloned().unwrap_or_else(|| {
            json!({"version": "1.0.0", "anyOf": [{"authority": authority, "allOf": [case["condition"].clone()]}]})
        });
        let issuer = case
            .get("issuer")
            .and_then(Value::as_str)
            .unwrap_or(authority);
        let claims = case.get("claims").unwrap_or(&table["claims"]);
        let outcome = match parse_value(&policy) {
            Err(_) => "malformed",
            Ok(p) if evaluate(&p, issuer, claims).is_ok() => "met",
            Ok(_) => "unmet",
        };
        assert_eq!(outcome, case["expect"], "case {name:?}");
    }
}
