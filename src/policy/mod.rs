//! Release-policy grammar of Azure Key Vault / Managed HSM (skr-protocol §7): parse a key's
//! `release_policy.data`, evaluate it against attestation-token claims, and explain the first
//! condition that is not met. Used to turn AKV's bare "403 Forbidden" into an actionable message.
//!
//! AKV is the authority on release; this evaluator only explains. Where the service's semantics
//! are [uncertain] in the protocol notes, the reading chosen here is the strict one (a condition
//! counts as met only when it certainly is), and each such place says so.
//!
//! Case, decided once for this evaluator and skr-emulator's (both run the shared table
//! `testdata/policy/shared-cases.json`):
//! - grammar names (`version`, `anyOf`, `allOf`, `authority`, `claim`, the operators, the legacy
//!   `condition`/`value`) match without ASCII case: Microsoft's grammar page spells them both
//!   ways (`anyof:` in its EBNF, `anyOf` in its examples) and models the grammar on Azure Policy,
//!   whose names are case-insensitive. A name given twice in one object under different case is
//!   refused, never resolved by picking one;
//! - claim names and claim values compare exactly ([uncertain] in skr-protocol §7.5 item 2; a
//!   case-folded match could only ever release more, so the exact reading is the safe one);
//! - authorities compare like URLs: scheme and host without case (RFC 3986 §6.2.2.1), the path
//!   exactly, one trailing slash not significant ([uncertain]; folding the path could let one
//!   issuer stand for another, so it is not folded).

use base64::Engine;
use serde_json::{Map, Value};
use std::fmt;

/// A parsed release policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub version: Option<String>,
    /// How the authority rules combine. The grammar requires `anyOf`; `allOf` appears in one
    /// published documentation example and is read literally (every rule must hold).
    pub combinator: Combinator,
    pub rules: Vec<AuthorityRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combinator {
    AllOf,
    AnyOf,
}

impl Combinator {
    fn name(self) -> &'static str {
        match self {
            Combinator::AllOf => "allOf",
            Combinator::AnyOf => "anyOf",
        }
    }
}

/// Conditions that apply to tokens issued by one attestation authority.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorityRule {
    pub authority: String,
    pub combinator: Combinator,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Claim {
        claim: String,
        operator: Operator,
        value: Value,
    },
    Group(Combinator, Vec<Condition>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Equals,
    NotEquals,
    Less,
    LessOrEquals,
    Greater,
    GreaterOrEquals,
    Exists,
}

impl Operator {
    pub fn name(self) -> &'static str {
        match self {
            Operator::Equals => "equals",
            Operator::NotEquals => "notEquals",
            Operator::Less => "less",
            Operator::LessOrEquals => "lessOrEquals",
            Operator::Greater => "greater",
            Operator::GreaterOrEquals => "greaterOrEquals",
            Operator::Exists => "exists",
        }
    }
    /// Operator names match without ASCII case (see the module comment).
    fn from_name(name: &str) -> Option<Operator> {
        [
            Operator::Equals,
            Operator::NotEquals,
            Operator::Less,
            Operator::LessOrEquals,
            Operator::Greater,
            Operator::GreaterOrEquals,
            Operator::Exists,
        ]
        .into_iter()
        .find(|op| op.name().eq_ignore_ascii_case(name))
    }
}

/// Why a policy is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError(pub String);

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "release policy: {}", self.0)
    }
}

impl std::error::Error for PolicyError {}

/// Why a policy is not met: the first unmet condition, or no rule for the token's issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explanation {
    /// No authority rule names the token's issuer.
    NoAuthority {
        issuer: String,
        authorities: Vec<String>,
    },
    /// A claim condition failed.
    Unmet {
        authority: String,
        claim: String,
        operator: &'static str,
        /// The policy's value in string form.
        expected: String,
        /// The token's value in string form; `None` when the claim is absent.
        actual: Option<String>,
        /// How many alternatives of an enclosing `anyOf` also failed (0 if none).
        alternatives: usize,
    },
}

impl Explanation {
    /// The claim named by the explanation, if any.
    pub fn claim(&self) -> Option<&str> {
        match self {
            Explanation::Unmet { claim, .. } => Some(claim),
            Explanation::NoAuthority { .. } => None,
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explanation::NoAuthority {
                issuer,
                authorities,
            } => write!(
                f,
                "no policy authority matches the token issuer {issuer:?} (policy authorities: {})",
                authorities
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Explanation::Unmet {
                claim,
                operator,
                expected,
                actual,
                alternatives,
                ..
            } => {
                if *alternatives > 1 {
                    write!(f, "none of {alternatives} alternatives met; first: ")?;
                }
                write!(
                    f,
                    "policy condition {claim} {operator} {expected:?} not met"
                )?;
                match actual {
                    Some(a) => write!(f, " (token has {a:?})"),
                    None => write!(f, " (claim absent from the token)"),
                }
            }
        }
    }
}

/// Parse `release_policy.data`: base64url (unpadded or padded) or padded standard base64 of the
/// policy JSON. AKV accepts both encodings (skr-protocol §6.2).
pub fn parse_encoded(data: &str) -> Result<Policy, PolicyError> {
    let trimmed = data.trim();
    let bytes = decode_any_base64(trimmed)
        .ok_or_else(|| PolicyError("data is neither base64url nor base64".into()))?;
    parse_json(&bytes)
}

fn decode_any_base64(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let unpadded = s.trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(unpadded)
        .ok()
        .or_else(|| STANDARD.decode(s).ok())
}

/// Parse the policy JSON text.
pub fn parse_json(bytes: &[u8]) -> Result<Policy, PolicyError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| PolicyError(format!("not JSON: {e}")))?;
    parse_value(&v)
}

/// Parse an already decoded policy JSON value.
pub fn parse_value(v: &Value) -> Result<Policy, PolicyError> {
    let obj = v
        .as_object()
        .ok_or_else(|| PolicyError("top level is not an object".into()))?;
    let version = match member(obj, "version", "policy")? {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(PolicyError(format!("version {other} is not a string"))),
    };
    let (combinator, list) = one_combinator(obj, "policy")?;
    let mut rules = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        rules.push(parse_rule(item, i)?);
    }
    if rules.is_empty() {
        return Err(PolicyError("policy has no authority".into()));
    }
    Ok(Policy {
        version,
        combinator,
        rules,
    })
}

/// The member `name` of a grammar object, its name compared without ASCII case; the same name
/// twice under different case is refused rather than resolved.
fn member<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    what: &str,
) -> Result<Option<&'a Value>, PolicyError> {
    let mut found = obj.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name));
    let first = found.next().map(|(_, v)| v);
    if found.next().is_some() {
        return Err(PolicyError(format!(
            "{what}: {name} is given more than once (names compare without case)"
        )));
    }
    Ok(first)
}

fn one_combinator<'a>(
    obj: &'a Map<String, Value>,
    what: &str,
) -> Result<(Combinator, &'a Vec<Value>), PolicyError> {
    let list = |key: &str| -> Result<Option<&'a Vec<Value>>, PolicyError> {
        match member(obj, key, what)? {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(_) => Err(PolicyError(format!("{what}: {key} is not an array"))),
        }
    };
    match (list("allOf")?, list("anyOf")?) {
        (Some(a), None) => Ok((Combinator::AllOf, a)),
        (None, Some(a)) => Ok((Combinator::AnyOf, a)),
        (Some(_), Some(_)) => Err(PolicyError(format!(
            "{what}: allOf and anyOf are not allowed together"
        ))),
        (None, None) => Err(PolicyError(format!("{what}: needs allOf or anyOf"))),
    }
}

/// An empty group is refused, as skr-emulator refuses it: an empty allOf would be met by any
/// token of the authority ([uncertain] what AKV does with one; refusing is the safe reading).
fn not_empty(
    combinator: Combinator,
    conditions: &[Condition],
    what: &str,
) -> Result<(), PolicyError> {
    if conditions.is_empty() {
        return Err(PolicyError(format!(
            "{what}: {} has no conditions",
            combinator.name()
        )));
    }
    Ok(())
}

fn parse_rule(v: &Value, index: usize) -> Result<AuthorityRule, PolicyError> {
    let what = format!("authority #{}", index + 1);
    let obj = v
        .as_object()
        .ok_or_else(|| PolicyError(format!("{what} is not an object")))?;
    let authority = member(obj, "authority", &what)?
        .and_then(Value::as_str)
        .ok_or_else(|| PolicyError(format!("{what} has no authority string")))?
        .to_string();
    let (combinator, list) = one_combinator(obj, &what)?;
    let conditions = list
        .iter()
        .map(|c| parse_condition(c, &what))
        .collect::<Result<Vec<_>, _>>()?;
    not_empty(combinator, &conditions, &what)?;
    Ok(AuthorityRule {
        authority,
        combinator,
        conditions,
    })
}

fn parse_condition(v: &Value, what: &str) -> Result<Condition, PolicyError> {
    let obj = v
        .as_object()
        .ok_or_else(|| PolicyError(format!("{what}: condition {v} is not an object")))?;
    let Some(claim) = member(obj, "claim", what)? else {
        let (combinator, list) = one_combinator(obj, what)?;
        let inner = list
            .iter()
            .map(|c| parse_condition(c, what))
            .collect::<Result<Vec<_>, _>>()?;
        not_empty(combinator, &inner, what)?;
        return Ok(Condition::Group(combinator, inner));
    };
    let claim = claim
        .as_str()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| PolicyError(format!("{what}: claim {claim} is not a non-empty string")))?
        .to_string();
    // Legacy form {claim, condition, value} (7.4 REST example, 2021 SDK tests).
    if let Some(cond) = member(obj, "condition", what)? {
        let name = cond.as_str().unwrap_or_default();
        let operator = Operator::from_name(name).ok_or_else(|| {
            PolicyError(format!("{what}: claim {claim}: unknown condition {cond}"))
        })?;
        let value = member(obj, "value", what)?.ok_or_else(|| {
            PolicyError(format!("{what}: claim {claim}: condition without value"))
        })?;
        check_value(operator, value, what, &claim)?;
        return Ok(Condition::Claim {
            claim,
            operator,
            value: value.clone(),
        });
    }
    let mut found = None;
    for (key, value) in obj {
        if key.eq_ignore_ascii_case("claim") {
            continue;
        }
        let operator = Operator::from_name(key).ok_or_else(|| {
            PolicyError(format!("{what}: claim {claim}: unknown operator {key:?}"))
        })?;
        if found.is_some() {
            return Err(PolicyError(format!(
                "{what}: claim {claim}: more than one operator"
            )));
        }
        check_value(operator, value, what, &claim)?;
        found = Some((operator, value.clone()));
    }
    let (operator, value) =
        found.ok_or_else(|| PolicyError(format!("{what}: claim {claim}: no operator")))?;
    Ok(Condition::Claim {
        claim,
        operator,
        value,
    })
}

fn check_value(operator: Operator, v: &Value, what: &str, claim: &str) -> Result<(), PolicyError> {
    match v {
        // [uncertain] `exists` takes true or false; anything else (say "yes") has no safe
        // meaning, so it is refused instead of being read as "must be absent".
        _ if operator == Operator::Exists && exists_wanted(v).is_none() => Err(PolicyError(
            format!("{what}: claim {claim}: exists takes true or false, not {v}"),
        )),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(()),
        _ => Err(PolicyError(format!(
            "{what}: claim {claim}: value {v} is not a string, number or boolean"
        ))),
    }
}

/// The value of an `exists` condition: `true`/`false`, as JSON booleans or strings in any case.
fn exists_wanted(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Compare an authority with a token issuer as URLs: scheme and host without ASCII case, the
/// path exactly, one trailing slash not significant (skr-protocol §7.5 item 4; the module
/// comment says why the path is not folded). Scheme-less authorities are not assumed.
pub fn authority_matches(authority: &str, issuer: &str) -> bool {
    /// (scheme://host[:port] lower-cased, the rest as it is) without one trailing slash.
    fn norm(s: &str) -> (String, &str) {
        let s = s.strip_suffix('/').unwrap_or(s);
        let origin_end = s
            .find("://")
            .map(|scheme_end| {
                let host_from = scheme_end + 3;
                s[host_from..].find('/').map_or(s.len(), |p| host_from + p)
            })
            .unwrap_or(0);
        (s[..origin_end].to_ascii_lowercase(), &s[origin_end..])
    }
    norm(authority) == norm(issuer)
}

/// Evaluate `policy` for a token issued by `iss` with `claims` (the JWT payload object).
pub fn evaluate(policy: &Policy, iss: &str, claims: &Value) -> Result<(), Explanation> {
    let matching: Vec<&AuthorityRule> = policy
        .rules
        .iter()
        .filter(|r| authority_matches(&r.authority, iss))
        .collect();
    let no_authority = || Explanation::NoAuthority {
        issuer: iss.to_string(),
        authorities: policy.rules.iter().map(|r| r.authority.clone()).collect(),
    };
    match policy.combinator {
        Combinator::AnyOf => {
            let mut first_failure = None;
            for rule in &matching {
                match eval_group(rule.combinator, &rule.conditions, &rule.authority, claims) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first_failure.get_or_insert(e);
                    }
                }
            }
            Err(first_failure.unwrap_or_else(no_authority))
        }
        Combinator::AllOf => {
            if matching.len() != policy.rules.len() {
                return Err(no_authority());
            }
            for rule in matching {
                eval_group(rule.combinator, &rule.conditions, &rule.authority, claims)?;
            }
            Ok(())
        }
    }
}

fn eval_group(
    combinator: Combinator,
    conditions: &[Condition],
    authority: &str,
    claims: &Value,
) -> Result<(), Explanation> {
    match combinator {
        Combinator::AllOf => {
            for c in conditions {
                eval_condition(c, authority, claims)?;
            }
            Ok(())
        }
        Combinator::AnyOf => {
            let mut first = None;
            for c in conditions {
                match eval_condition(c, authority, claims) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
            match first {
                Some(Explanation::Unmet {
                    authority,
                    claim,
                    operator,
                    expected,
                    actual,
                    alternatives,
                }) => Err(Explanation::Unmet {
                    authority,
                    claim,
                    operator,
                    expected,
                    actual,
                    alternatives: alternatives.max(conditions.len()),
                }),
                Some(other) => Err(other),
                // An empty anyOf can never be met; name it as such.
                None => Err(Explanation::Unmet {
                    authority: authority.to_string(),
                    claim: format!("({} with no conditions)", combinator.name()),
                    operator: "anyOf",
                    expected: String::new(),
                    actual: None,
                    alternatives: 0,
                }),
            }
        }
    }
}

fn eval_condition(c: &Condition, authority: &str, claims: &Value) -> Result<(), Explanation> {
    match c {
        Condition::Group(comb, inner) => eval_group(*comb, inner, authority, claims),
        Condition::Claim {
            claim,
            operator,
            value,
        } => {
            let found = lookup(claims, claim);
            let actual = found.and_then(scalar_string);
            let expected = scalar_string(value).unwrap_or_default();
            let met = match operator {
                // [uncertain] `exists` semantics: `true` requires the claim, `false` its absence.
                Operator::Exists => Some(found.is_some()) == exists_wanted(value),
                Operator::Equals => actual.as_deref() == Some(expected.as_str()),
                // [uncertain] whether AKV compares "1.0" and 1 as numbers: notEquals holds only
                // when they differ both as text and as numbers.
                Operator::NotEquals => actual.as_deref().is_some_and(|a| {
                    a != expected
                        && compare_numbers(a, &expected) != Some(std::cmp::Ordering::Equal)
                }),
                Operator::Less
                | Operator::LessOrEquals
                | Operator::Greater
                | Operator::GreaterOrEquals => actual
                    .as_deref()
                    .and_then(|a| compare_numbers(a, &expected))
                    .is_some_and(|ord| {
                        use std::cmp::Ordering::*;
                        match operator {
                            Operator::Less => ord == Less,
                            Operator::LessOrEquals => ord != Greater,
                            Operator::Greater => ord == Greater,
                            _ => ord != Less,
                        }
                    }),
            };
            if met {
                Ok(())
            } else {
                Err(Explanation::Unmet {
                    authority: authority.to_string(),
                    claim: claim.clone(),
                    operator: operator.name(),
                    expected,
                    actual: found.map(|v| scalar_string(v).unwrap_or_else(|| v.to_string())),
                    alternatives: 0,
                })
            }
        }
    }
}

/// [uncertain] ordering of non-numbers: only numeric comparison is assumed; a side that does not
/// parse as a number makes the condition unmet rather than guessing a string order.
fn compare_numbers(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let x: f64 = a.trim().parse().ok().filter(|x: &f64| x.is_finite())?;
    let y: f64 = b.trim().parse().ok().filter(|y: &f64| y.is_finite())?;
    x.partial_cmp(&y)
}

/// Find a claim: dot notation navigates nested objects; a literal top-level name wins if present.
/// Arrays cannot be indexed (skr-protocol §7.3).
fn lookup<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut cur = claims;
    for part in name.split('.') {
        cur = cur.as_object()?.get(part)?;
    }
    Some(cur)
}

/// The string form AKV compares (skr-protocol §7.5 item 1): strings as they are, booleans as
/// `true`/`false`, numbers in shortest decimal form. Objects, arrays and null cannot be matched.
pub fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(number_string(n)),
        _ => None,
    }
}

fn number_string(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    // 1.0 → "1": integral floats print without a fraction, like the integer they equal.
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
        return format!("{}", f as i64);
    }
    // Rust's f64 Display is the shortest representation that round-trips.
    format!("{f}")
}

#[cfg(test)]
mod tests;
