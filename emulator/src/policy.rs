//! Azure Key Vault release-policy grammar (skr-protocol.md §7): parse, normalise, evaluate
//! against attestation-token claims, and say which condition failed. Written for the emulator,
//! independent of the module's evaluator, so that each can test the other; both run the shared
//! table `testdata/policy/shared-cases.json`.
//!
//! Case (the same rule as the module's, decided from Microsoft's grammar page):
//! - grammar names (`version`, `anyOf`, `allOf`, `authority`, `claim`, operators, legacy
//!   `condition`/`value`) match without ASCII case — the grammar page writes `anyof:` in its
//!   EBNF and `anyOf` in its examples, and the grammar is modelled on Azure Policy, whose names
//!   ignore case. One name twice in an object under different case is refused;
//! - claim names and values compare exactly ([uncertain], skr-protocol §7.5 item 2: folding
//!   could only release more, so exact is the safe reading);
//! - authorities compare as URLs: scheme and host without case, path exactly, one trailing
//!   slash ignored ([uncertain]; folding the path could let one issuer pass for another).

use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equals,
    NotEquals,
    Less,
    LessOrEquals,
    Greater,
    GreaterOrEquals,
    Exists,
}

impl Op {
    fn from_name(name: &str) -> Option<Op> {
        Some(match name.to_ascii_lowercase().as_str() {
            "equals" => Op::Equals,
            "notequals" => Op::NotEquals,
            "less" => Op::Less,
            "lessorequals" => Op::LessOrEquals,
            "greater" => Op::Greater,
            "greaterorequals" => Op::GreaterOrEquals,
            "exists" => Op::Exists,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Op::Equals => "equals",
            Op::NotEquals => "notEquals",
            Op::Less => "less",
            Op::LessOrEquals => "lessOrEquals",
            Op::Greater => "greater",
            Op::GreaterOrEquals => "greaterOrEquals",
            Op::Exists => "exists",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    AllOf(Vec<Node>),
    AnyOf(Vec<Node>),
    Claim { claim: String, op: Op, value: Value },
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityRule {
    pub authority: String,
    pub rule: Node,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: Option<String>,
    pub authorities: Vec<AuthorityRule>,
}

const OPERATORS: [&str; 7] = [
    "equals",
    "notEquals",
    "less",
    "lessOrEquals",
    "greater",
    "greaterOrEquals",
    "exists",
];

/// `obj`'s member `name`, compared without ASCII case; refused when present twice.
fn get<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a Value>, String> {
    let mut hits = obj
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, v)| v);
    let first = hits.next();
    if hits.next().is_some() {
        return Err(format!(
            "member `{name}` appears more than once (names ignore case)"
        ));
    }
    Ok(first)
}

fn is(key: &str, name: &str) -> bool {
    key.eq_ignore_ascii_case(name)
}

pub fn parse(policy: &Value) -> Result<Policy, String> {
    let obj = policy
        .as_object()
        .ok_or("release policy must be a JSON object")?;
    let version = match get(obj, "version")? {
        None => None,
        Some(Value::String(v)) => Some(v.clone()),
        Some(_) => return Err("release policy version must be a string".into()),
    };
    if get(obj, "allOf")?.is_some() {
        return Err(
            "the top level of a release policy must be anyOf (over authorities), not allOf".into(),
        );
    }
    let any = get(obj, "anyOf")?
        .and_then(Value::as_array)
        .ok_or("release policy needs a top-level anyOf array of authorities")?;
    if any.is_empty() {
        return Err("release policy anyOf is empty".into());
    }
    let authorities = any
        .iter()
        .enumerate()
        .map(|(i, a)| parse_authority(a).map_err(|e| format!("anyOf[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    for key in obj.keys() {
        if !is(key, "version") && !is(key, "anyOf") {
            return Err(format!(
                "unknown member `{key}` at the top of the release policy"
            ));
        }
    }
    Ok(Policy {
        version,
        authorities,
    })
}

fn parse_authority(value: &Value) -> Result<AuthorityRule, String> {
    let obj = value
        .as_object()
        .ok_or("authority entry must be an object")?;
    let authority = get(obj, "authority")?
        .and_then(Value::as_str)
        .ok_or("authority entry needs an `authority` string")?
        .to_string();
    let rule = match (get(obj, "allOf")?, get(obj, "anyOf")?) {
        (Some(_), Some(_)) => return Err("authority has both allOf and anyOf".into()),
        (Some(all), None) => Node::AllOf(parse_list(all)?),
        (None, Some(any)) => Node::AnyOf(parse_list(any)?),
        (None, None) => return Err("authority needs allOf or anyOf".into()),
    };
    Ok(AuthorityRule { authority, rule })
}

fn parse_list(value: &Value) -> Result<Vec<Node>, String> {
    let list = value.as_array().ok_or("allOf / anyOf must be an array")?;
    if list.is_empty() {
        return Err("allOf / anyOf is empty".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, c)| parse_condition(c).map_err(|e| format!("[{i}]: {e}")))
        .collect()
}

fn parse_condition(value: &Value) -> Result<Node, String> {
    let obj = value.as_object().ok_or("condition must be an object")?;
    if let Some(claim) = get(obj, "claim")? {
        let claim = claim
            .as_str()
            .ok_or("`claim` must be a string")?
            .to_string();
        // Legacy form: {"claim", "condition": "equals", "value"} (7.4 REST spec example).
        if let Some(cond) = get(obj, "condition")? {
            let op = cond
                .as_str()
                .and_then(Op::from_name)
                .ok_or_else(|| format!("unsupported condition {cond}"))?;
            let value = get(obj, "value")?.ok_or("legacy condition needs `value`")?;
            return Ok(Node::Claim {
                claim,
                op,
                value: operand(op, value)?,
            });
        }
        let mut ops = Vec::new();
        for (key, value) in obj {
            if is(key, "claim") {
                continue;
            }
            let op = Op::from_name(key)
                .ok_or_else(|| format!("unknown member `{key}` in the condition on `{claim}`"))?;
            ops.push((op, value));
        }
        let [(op, value)] = ops[..] else {
            return Err(format!(
                "claim condition on `{claim}` needs exactly one operator of {OPERATORS:?}"
            ));
        };
        return Ok(Node::Claim {
            claim,
            op,
            value: operand(op, value)?,
        });
    }
    match (get(obj, "allOf")?, get(obj, "anyOf")?) {
        (Some(all), None) => Ok(Node::AllOf(parse_list(all)?)),
        (None, Some(any)) => Ok(Node::AnyOf(parse_list(any)?)),
        (Some(_), Some(_)) => Err("condition has both allOf and anyOf".into()),
        (None, None) => Err("condition needs `claim`, allOf or anyOf".into()),
    }
}

/// An operator's value; `exists` takes only true or false (booleans, or strings in any case):
/// anything else has no safe meaning ([uncertain] in skr-protocol §7.2) and is refused.
fn operand(op: Op, value: &Value) -> Result<Value, String> {
    if op == Op::Exists && exists_wants(value).is_none() {
        return Err(format!("exists takes true or false, not {value}"));
    }
    scalar(value)
}

fn exists_wants(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn scalar(value: &Value) -> Result<Value, String> {
    match value {
        Value::String(_) | Value::Bool(_) | Value::Number(_) => Ok(value.clone()),
        other => Err(format!(
            "condition value must be a string, number or boolean, not {other}"
        )),
    }
}

impl Policy {
    /// The stored form: legacy conditions as operators, `"1.0"` as `"1.0.0"` (what a managed
    /// HSM was observed to store).
    pub fn to_json(&self) -> Value {
        let mut top = Map::new();
        if let Some(v) = &self.version {
            let v = if v == "1.0" { "1.0.0" } else { v.as_str() };
            top.insert("version".into(), json!(v));
        }
        let any: Vec<Value> = self
            .authorities
            .iter()
            .map(|a| {
                let mut m = Map::new();
                m.insert("authority".into(), json!(a.authority));
                match &a.rule {
                    Node::AllOf(list) => m.insert("allOf".into(), nodes_json(list)),
                    Node::AnyOf(list) => m.insert("anyOf".into(), nodes_json(list)),
                    node => m.insert("allOf".into(), nodes_json(std::slice::from_ref(node))),
                };
                Value::Object(m)
            })
            .collect();
        top.insert("anyOf".into(), Value::Array(any));
        Value::Object(top)
    }

    /// Minified JSON in the vault's member order: `version`, then `anyOf`; `authority` before
    /// its rule; `claim` before the operator.
    pub fn to_vault_text(&self) -> String {
        fn node(n: &Node) -> String {
            match n {
                Node::AllOf(list) => format!("{{\"allOf\":{}}}", list_text(list)),
                Node::AnyOf(list) => format!("{{\"anyOf\":{}}}", list_text(list)),
                Node::Claim { claim, op, value } => {
                    format!("{{\"claim\":{},\"{}\":{value}}}", json!(claim), op.name())
                }
            }
        }
        fn list_text(list: &[Node]) -> String {
            format!("[{}]", list.iter().map(node).collect::<Vec<_>>().join(","))
        }
        let authorities: Vec<String> = self
            .authorities
            .iter()
            .map(|a| {
                let (key, list) = match &a.rule {
                    Node::AnyOf(list) => ("anyOf", list.clone()),
                    Node::AllOf(list) => ("allOf", list.clone()),
                    other => ("allOf", vec![other.clone()]),
                };
                format!(
                    "{{\"authority\":{},\"{key}\":{}}}",
                    json!(a.authority),
                    list_text(&list)
                )
            })
            .collect();
        let any = format!("\"anyOf\":[{}]", authorities.join(","));
        match self.to_json().get("version") {
            Some(v) => format!("{{\"version\":{v},{any}}}"),
            None => format!("{{{any}}}"),
        }
    }

    /// Ok when some authority equal to `issuer` has its conditions met; otherwise the reason,
    /// naming the first condition that failed.
    pub fn evaluate(&self, issuer: &str, claims: &Value) -> Result<(), String> {
        let issuer_norm = normalise_authority(issuer);
        let mut failures = Vec::new();
        for rule in &self.authorities {
            if normalise_authority(&rule.authority) != issuer_norm {
                continue;
            }
            match eval(&rule.rule, claims) {
                Ok(()) => return Ok(()),
                Err(reason) => failures.push(reason),
            }
        }
        if failures.is_empty() {
            let list: Vec<&str> = self
                .authorities
                .iter()
                .map(|a| a.authority.as_str())
                .collect();
            return Err(format!(
                "attestation token issuer {issuer} is not an authority of the release policy (authorities: {})",
                list.join(", ")
            ));
        }
        Err(failures.join("; "))
    }
}

fn nodes_json(list: &[Node]) -> Value {
    Value::Array(list.iter().map(node_json).collect())
}

fn node_json(node: &Node) -> Value {
    match node {
        Node::AllOf(list) => json!({ "allOf": nodes_json(list) }),
        Node::AnyOf(list) => json!({ "anyOf": nodes_json(list) }),
        Node::Claim { claim, op, value } => {
            let mut m = Map::new();
            m.insert("claim".into(), json!(claim));
            m.insert(op.name().into(), value.clone());
            Value::Object(m)
        }
    }
}

/// Authorities are compared like `iss`, as URLs: scheme and host lower-cased, the path kept,
/// one trailing slash dropped.
pub fn normalise_authority(url: &str) -> String {
    let url = url.strip_suffix('/').unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    format!(
        "{}://{}{path}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    )
}

/// Exact member first (claim names may contain dots), then dot notation through objects.
pub fn lookup<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut current = claims;
    for part in name.split('.') {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

/// The string form used for comparisons: AKV matches `"false"` with `false` and `"0"` with `0`.
fn string_form(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(number_text(n)),
        _ => None,
    }
}

/// Integers as they are; other numbers by f64's shortest round-trip text, so `1.0` reads `1`.
fn number_text(n: &serde_json::Number) -> String {
    match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i.to_string(),
        (_, Some(u), _) => u.to_string(),
        (_, _, Some(f)) => f.to_string(),
        _ => n.to_string(),
    }
}

fn as_number(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    t.parse::<f64>().ok().filter(|f| f.is_finite())
}

fn eval(node: &Node, claims: &Value) -> Result<(), String> {
    match node {
        Node::AllOf(list) => {
            for n in list {
                eval(n, claims)?;
            }
            Ok(())
        }
        Node::AnyOf(list) => {
            let mut reasons = Vec::new();
            for n in list {
                match eval(n, claims) {
                    Ok(()) => return Ok(()),
                    Err(r) => reasons.push(r),
                }
            }
            Err(format!(
                "no branch of anyOf is met ({})",
                reasons.join(" | ")
            ))
        }
        Node::Claim { claim, op, value } => eval_claim(claim, *op, value, claims),
    }
}

fn eval_claim(claim: &str, op: Op, expected: &Value, claims: &Value) -> Result<(), String> {
    let found = lookup(claims, claim);
    if op == Op::Exists {
        let want = exists_wants(expected) == Some(true);
        return match (want, found.is_some()) {
            (true, true) | (false, false) => Ok(()),
            (true, false) => Err(format!(
                "claim {claim}: expected to exist, but it is missing"
            )),
            (false, true) => Err(format!(
                "claim {claim}: expected not to exist, but it is present"
            )),
        };
    }
    let Some(found) = found else {
        return Err(format!("claim {claim}: missing from the attestation token"));
    };
    let Some(actual) = string_form(found) else {
        return Err(format!(
            "claim {claim}: is an object or array, which cannot be compared"
        ));
    };
    let want = string_form(expected).unwrap_or_default();
    let numbers = as_number(&actual).zip(as_number(&want));
    // Ordering operators compare numbers only: how AKV orders strings is undocumented
    // ([uncertain] in skr-protocol §7.5), so a non-number is "not met" — the safe reading,
    // and the one the module's local explanation uses.
    let ordering = numbers.and_then(|(a, w)| a.partial_cmp(&w));
    use std::cmp::Ordering::{Equal, Greater, Less};
    // [uncertain] whether "1.0" equals 1: equals needs the same text, notEquals needs different
    // text and different numbers, so neither is met on a case the service might read otherwise.
    let met = match op {
        Op::Equals => actual == want,
        Op::NotEquals => actual != want && ordering != Some(Equal),
        Op::Less => ordering == Some(Less),
        Op::LessOrEquals => matches!(ordering, Some(Less | Equal)),
        Op::Greater => ordering == Some(Greater),
        Op::GreaterOrEquals => matches!(ordering, Some(Greater | Equal)),
        Op::Exists => unreachable!("handled above"),
    };
    if met {
        Ok(())
    } else {
        Err(format!(
            "claim {claim}: expected {} {expected}, got {found}",
            op.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAA: &str = "https://maa.example";

    fn policy(conditions: Value) -> Policy {
        parse(&json!({"version":"1.0.0","anyOf":[{"authority": MAA, "allOf": conditions}]}))
            .unwrap()
    }

    fn claims() -> Value {
        json!({
            "iss": MAA,
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-sevsnpvm-is-debuggable": false,
            "x-ms-sevsnpvm-vmpl": 0,
            "x-ms-sevsnpvm-guestsvn": 3,
            "x-ms-sevsnpvm-hostdata": "abcd",
            "x-ms-isolation-tee": {"x-ms-attestation-type": "sevsnpvm", "x-ms-compliance-status": "azure-compliant-cvm"},
            "x-ms-runtime": {"keys": [{"kid": "k"}]}
        })
    }

    #[test]
    fn operator_table() {
        let c = claims();
        let cases: Vec<(Value, bool)> = vec![
            (
                json!({"claim":"x-ms-attestation-type","equals":"sevsnpvm"}),
                true,
            ),
            (
                json!({"claim":"x-ms-attestation-type","equals":"SEVSNPVM"}),
                false,
            ),
            (
                json!({"claim":"x-ms-attestation-type","notEquals":"tdxvm"}),
                true,
            ),
            (
                json!({"claim":"x-ms-attestation-type","notEquals":"sevsnpvm"}),
                false,
            ),
            // Coercion of booleans and numbers through their string form, both directions.
            (
                json!({"claim":"x-ms-sevsnpvm-is-debuggable","equals":"false"}),
                true,
            ),
            (
                json!({"claim":"x-ms-sevsnpvm-is-debuggable","equals":false}),
                true,
            ),
            (
                json!({"claim":"x-ms-sevsnpvm-is-debuggable","equals":"true"}),
                false,
            ),
            (json!({"claim":"x-ms-sevsnpvm-vmpl","equals":"0"}), true),
            (json!({"claim":"x-ms-sevsnpvm-vmpl","equals":0}), true),
            // Same number, different text: neither equal nor not equal ([uncertain]).
            (json!({"claim":"x-ms-sevsnpvm-vmpl","equals":"0.0"}), false),
            (
                json!({"claim":"x-ms-sevsnpvm-vmpl","notEquals":"0.0"}),
                false,
            ),
            (json!({"claim":"x-ms-sevsnpvm-guestsvn","less":4}), true),
            (json!({"claim":"x-ms-sevsnpvm-guestsvn","less":"3"}), false),
            (
                json!({"claim":"x-ms-sevsnpvm-guestsvn","lessOrEquals":"3"}),
                true,
            ),
            (json!({"claim":"x-ms-sevsnpvm-guestsvn","greater":2}), true),
            (json!({"claim":"x-ms-sevsnpvm-guestsvn","greater":3}), false),
            // Numeric, not lexicographic: "10" > 3.
            (
                json!({"claim":"x-ms-sevsnpvm-guestsvn","greaterOrEquals":"10"}),
                false,
            ),
            (
                json!({"claim":"x-ms-sevsnpvm-guestsvn","greaterOrEquals":3}),
                true,
            ),
            // Strings are not ordered (safe reading of an undocumented rule).
            (
                json!({"claim":"x-ms-sevsnpvm-hostdata","greater":"abcc"}),
                false,
            ),
            (
                json!({"claim":"x-ms-sevsnpvm-hostdata","exists":true}),
                true,
            ),
            (json!({"claim":"x-ms-nothing","exists":true}), false),
            (json!({"claim":"x-ms-nothing","exists":false}), true),
            (
                json!({"claim":"x-ms-sevsnpvm-hostdata","exists":"false"}),
                false,
            ),
            // Missing claims make any comparison false, including notEquals.
            (json!({"claim":"x-ms-nothing","equals":"x"}), false),
            (json!({"claim":"x-ms-nothing","notEquals":"x"}), false),
            // Dot paths into nested objects; objects themselves cannot be matched.
            (
                json!({"claim":"x-ms-isolation-tee.x-ms-compliance-status","equals":"azure-compliant-cvm"}),
                true,
            ),
            (
                json!({"claim":"x-ms-isolation-tee.x-ms-missing","equals":"x"}),
                false,
            ),
            (json!({"claim":"x-ms-isolation-tee","equals":"x"}), false),
            (json!({"claim":"x-ms-runtime.keys","equals":"x"}), false),
            // Legacy form.
            (
                json!({"claim":"x-ms-attestation-type","condition":"equals","value":"sevsnpvm"}),
                true,
            ),
            (
                json!({"claim":"x-ms-attestation-type","condition":"equals","value":"tdxvm"}),
                false,
            ),
            // Nesting.
            (
                json!({"anyOf":[{"claim":"x-ms-attestation-type","equals":"tdxvm"},{"claim":"x-ms-attestation-type","equals":"sevsnpvm"}]}),
                true,
            ),
            (
                json!({"anyOf":[{"claim":"x-ms-attestation-type","equals":"tdxvm"},{"claim":"x-ms-sevsnpvm-vmpl","equals":1}]}),
                false,
            ),
            (
                json!({"allOf":[{"claim":"x-ms-sevsnpvm-vmpl","equals":0},{"anyOf":[{"claim":"x-ms-nothing","exists":true},{"claim":"x-ms-sevsnpvm-guestsvn","equals":3}]}]}),
                true,
            ),
            (
                json!({"allOf":[{"claim":"x-ms-sevsnpvm-vmpl","equals":0},{"claim":"x-ms-sevsnpvm-guestsvn","equals":4}]}),
                false,
            ),
        ];
        for (cond, expected) in cases {
            let p = policy(json!([cond.clone()]));
            assert_eq!(p.evaluate(MAA, &c).is_ok(), expected, "condition {cond}");
        }
    }

    #[test]
    fn authority_matching() {
        let p = parse(&json!({"anyOf":[{"authority":"https://maa.example/","allOf":[{"claim":"x-ms-sevsnpvm-vmpl","equals":0}]}]})).unwrap();
        assert!(p.evaluate("https://maa.example", &claims()).is_ok());
        assert!(p.evaluate("https://MAA.example/", &claims()).is_ok());
        let err = p.evaluate("https://other.example", &claims()).unwrap_err();
        assert!(err.contains("not an authority"), "{err}");
        // Top-level anyOf over authorities: the second authority's rules apply to its tokens.
        let two = parse(&json!({"anyOf":[
            {"authority":"https://a","allOf":[{"claim":"x-ms-sevsnpvm-vmpl","equals":1}]},
            {"authority":"https://maa.example","anyOf":[{"claim":"x-ms-sevsnpvm-vmpl","equals":0}]}]})).unwrap();
        assert!(two.evaluate(MAA, &claims()).is_ok());
        assert!(two.evaluate("https://a", &claims()).is_err());
    }

    #[test]
    fn denial_names_the_failed_condition() {
        let p = policy(json!([
            {"claim":"x-ms-attestation-type","equals":"sevsnpvm"},
            {"claim":"x-ms-sevsnpvm-hostdata","equals":"ffff"}
        ]));
        let reason = p.evaluate(MAA, &claims()).unwrap_err();
        assert_eq!(
            reason,
            "claim x-ms-sevsnpvm-hostdata: expected equals \"ffff\", got \"abcd\""
        );
    }

    #[test]
    fn malformed_policies_are_rejected() {
        for bad in [
            json!([]),
            json!({"version":"1.0.0"}),
            json!({"anyOf":[]}),
            json!({"allOf":[{"authority":MAA,"allOf":[{"claim":"a","equals":"b"}]}]}),
            json!({"anyOf":[{"authority":MAA}]}),
            json!({"anyOf":[{"allOf":[{"claim":"a","equals":"b"}]}]}),
            json!({"anyOf":[{"authority":MAA,"allOf":[{"claim":"a","equals":"b"}],"anyOf":[{"claim":"a","equals":"b"}]}]}),
            json!({"anyOf":[{"authority":MAA,"allOf":[{"claim":"a"}]}]}),
            json!({"anyOf":[{"authority":MAA,"allOf":[{"claim":"a","equals":"b","less":"c"}]}]}),
            json!({"anyOf":[{"authority":MAA,"allOf":[{"claim":"a","matches":"b"}]}]}),
            json!({"anyOf":[{"authority":MAA,"allOf":[{"claim":"a","equals":{"x":1}}]}]}),
        ] {
            assert!(parse(&bad).is_err(), "accepted {bad}");
        }
    }

    /// The vault recording's re-serialised policy, byte for byte.
    #[test]
    fn vault_text_matches_the_recorded_form() {
        let p = parse(&json!({"anyOf":[{"allOf":[{"equals":"true","claim":"sdk-test"}],"authority":"https://malegeskrkvsite.azurewebsites.net"}],"version":"1.0.0"})).unwrap();
        assert_eq!(
            p.to_vault_text(),
            r#"{"version":"1.0.0","anyOf":[{"authority":"https://malegeskrkvsite.azurewebsites.net","allOf":[{"claim":"sdk-test","equals":"true"}]}]}"#
        );
        let nested = parse(
            &json!({"anyOf":[{"authority":"a","anyOf":[{"allOf":[{"claim":"x","greater":1}]}]}]}),
        )
        .unwrap();
        assert_eq!(
            nested.to_vault_text(),
            r#"{"anyOf":[{"authority":"a","anyOf":[{"allOf":[{"claim":"x","greater":1}]}]}]}"#
        );
        assert_eq!(
            parse(&serde_json::from_str(&p.to_vault_text()).unwrap()).unwrap(),
            p
        );
    }

    #[test]
    fn legacy_form_is_stored_as_equals() {
        let sent = json!({"version":"1.0","anyOf":[{"authority":MAA,"allOf":[{"claim":"sdk-test","condition":"equals","value":"true"}]}]});
        let stored = parse(&sent).unwrap().to_json();
        assert_eq!(
            stored,
            json!({"version":"1.0.0","anyOf":[{"authority":MAA,"allOf":[{"claim":"sdk-test","equals":"true"}]}]})
        );
        // The stored form parses back to the same policy.
        assert_eq!(
            parse(&stored).unwrap().authorities,
            parse(&sent).unwrap().authorities
        );
    }
    fn testdata(path: &str) -> Value {
        let full = format!("{}/../testdata/{path}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}")))
            .unwrap()
    }

    #[test]
    fn published_examples_parse_except_the_documented_defect() {
        let examples = testdata("policy/published-examples.json");
        let mut parsed = 0;
        for (name, entry) in examples.as_object().unwrap() {
            let Some(p) = entry.get("policy") else {
                continue;
            };
            let result = parse(p);
            if name == "docs_skr_policy_examples_cvm_2_vmid" {
                // Top-level allOf: a documentation defect the grammar does not allow.
                assert!(result.is_err(), "{name}");
            } else {
                result.unwrap_or_else(|e| panic!("{name}: {e}"));
                parsed += 1;
            }
        }
        assert_eq!(parsed, 13);
        let pair = &examples["azure_sdk_js_recording_mhsm_create_sent_vs_stored"];
        assert_eq!(parse(&pair["sent"]).unwrap().to_json(), pair["stored"]);
        for file in [
            "policy/cvm-platform-skr-policy.json",
            "policy/cvm-datadisk-skr-policy.json",
        ] {
            parse(&testdata(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    #[test]
    fn microsoft_policies_against_real_claim_sets() {
        // CVM platform policy (top-level claims, trailing-slash authorities) vs a SEV-SNP token.
        let platform = parse(&testdata("policy/cvm-platform-skr-policy.json")).unwrap();
        let mut snp = testdata("maa/sevsnpvm-claims.docs.json");
        assert!(platform
            .evaluate("https://sharedeus.eus.attest.azure.net", &snp)
            .is_ok());
        assert!(platform
            .evaluate("https://maasandbox0001.wus.attest.azure.net", &snp)
            .unwrap_err()
            .contains("not an authority"));
        snp["x-ms-compliance-status"] = json!("azure-compliant-uvm");
        let err = platform
            .evaluate("https://sharedeus.eus.attest.azure.net", &snp)
            .unwrap_err();
        assert!(err.contains("x-ms-compliance-status"), "{err}");

        // Data-disk policy on nested x-ms-isolation-tee claims vs the CVM (AzureGuest) token.
        let datadisk = parse(&testdata("policy/cvm-datadisk-skr-policy.json")).unwrap();
        let mut cvm = testdata("maa/azureguest-cvm-claims.json");
        assert!(datadisk
            .evaluate("https://sharedeus.eus.attest.azure.net/", &cvm)
            .is_ok());
        cvm["x-ms-isolation-tee"]["x-ms-attestation-type"] = json!("sgx");
        let err = datadisk
            .evaluate("https://sharedeus.eus.attest.azure.net/", &cvm)
            .unwrap_err();
        assert!(
            err.contains("anyOf") && err.contains("x-ms-isolation-tee.x-ms-attestation-type"),
            "{err}"
        );

        // The JS SDK's release: legacy form, string "true" vs boolean claim, authority with a
        // trailing slash vs the mock issuer's iss.
        let examples = testdata("policy/published-examples.json");
        let sdk =
            parse(&examples["azure_sdk_js_test_policy_condition_value_syntax"]["policy"]).unwrap();
        let mock = testdata("akv/mock-attestation-target.decoded.json");
        let mut claims = mock["payload"].clone();
        assert_eq!(claims["sdk-test"], json!(true));
        claims["iss"] = json!("https://malegeskr5.azurewebsites.net");
        assert!(sdk
            .evaluate("https://malegeskr5.azurewebsites.net", &claims)
            .is_ok());
        claims["sdk-test"] = json!(false);
        assert!(sdk
            .evaluate("https://malegeskr5.azurewebsites.net", &claims)
            .is_err());

        // The ACI documentation example against ACI-style claims.
        let aci = parse(&examples["docs_skr_policy_examples_aci_1"]["policy"]).unwrap();
        let mut claims = json!({
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-uvm",
            "x-ms-sevsnpvm-hostdata": "532eaabd9574880dbf76b9b8cc00832c20a6ec113d682299550d7a6e0f345e25"
        });
        assert!(aci
            .evaluate("https://fabrikam1.wus.attest.azure.net/", &claims)
            .is_ok());
        claims["x-ms-sevsnpvm-hostdata"] =
            json!("cadd74f71ebb8fbf9782baab649612520f3c416bc5ce9ac768808ddc8d9b031c");
        let err = aci
            .evaluate("https://fabrikam1.wus.attest.azure.net", &claims)
            .unwrap_err();
        assert!(
            err.starts_with("claim x-ms-sevsnpvm-hostdata: expected equals"),
            "{err}"
        );
    }

    /// The table both evaluators run (src/policy/tests.rs reads the same file).
    #[test]
    fn shared_table_with_the_module() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/policy/shared-cases.json");
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let table: Value = serde_json::from_slice(&text).expect("shared table is JSON");
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
            let outcome = match parse(&policy) {
                Err(_) => "malformed",
                Ok(p) if p.evaluate(issuer, claims).is_ok() => "met",
                Ok(_) => "unmet",
            };
            assert_eq!(outcome, case["expect"], "case {name:?}");
        }
    }
}
