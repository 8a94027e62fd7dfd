//! Attribute values and the per-entry rules of C_GetAttributeValue (PKCS#11 base spec;
//! pkcs11-clients.md §3.1), as pure functions the C boundary applies to each template entry.

use cryptoki_sys::*;

/// What an object says about one attribute type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    Value(Vec<u8>),
    /// Exists but cannot be revealed (case 1).
    Sensitive,
    /// The object has no such attribute (case 2).
    Invalid,
    /// An attribute array (CKA_WRAP_TEMPLATE, CKA_UNWRAP_TEMPLATE): answered entry by entry at
    /// the C boundary.
    Nested(Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>),
}

/// The stored form of an attribute array: (type, length, value) triples, native-endian.
pub fn encode_template(t: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ty, v) in t {
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&(v.len() as CK_ULONG).to_ne_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Inverse of `encode_template` (the bytes are always ours).
pub fn decode_template(mut b: &[u8]) -> Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)> {
    const W: usize = std::mem::size_of::<CK_ULONG>();
    let mut out = Vec::new();
    while b.len() >= 2 * W {
        let ty = CK_ULONG::from_ne_bytes(b[..W].try_into().unwrap_or([0; W]));
        let len = CK_ULONG::from_ne_bytes(b[W..2 * W].try_into().unwrap_or([0; W])) as usize;
        let end = (2 * W + len).min(b.len());
        out.push((ty, b[2 * W..end].to_vec()));
        b = &b[end..];
    }
    out
}

pub fn bool_attr(b: bool) -> Attr {
    Attr::Value(vec![if b { CK_TRUE } else { CK_FALSE }])
}

pub fn ulong_attr(v: CK_ULONG) -> Attr {
    Attr::Value(v.to_ne_bytes().to_vec())
}

pub fn bytes_attr(v: &[u8]) -> Attr {
    Attr::Value(v.to_vec())
}

/// The answer for one template entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Case 3: pValue NULL, report the length.
    Length(usize),
    /// Case 4: copy the value, set the length.
    Copy(Vec<u8>),
    /// Cases 1, 2, 5: length CK_UNAVAILABLE_INFORMATION, contributes this CK_RV.
    Unavailable(CK_RV),
}

/// Apply the rules to one entry. `buffer` is None for a NULL pValue, else its length.
pub fn answer(attr: Attr, buffer: Option<usize>) -> Entry {
    match attr {
        Attr::Sensitive => Entry::Unavailable(CKR_ATTRIBUTE_SENSITIVE),
        Attr::Invalid => Entry::Unavailable(CKR_ATTRIBUTE_TYPE_INVALID),
        // Arrays are answered by the C boundary; reaching here means a plain length query.
        Attr::Nested(v) => Entry::Length(v.len() * std::mem::size_of::<CK_ATTRIBUTE>()),
        Attr::Value(v) => match buffer {
            None => Entry::Length(v.len()),
            Some(n) if n >= v.len() => Entry::Copy(v),
            Some(_) => Entry::Unavailable(CKR_BUFFER_TOO_SMALL),
        },
    }
}

/// The call's return value: CKR_OK only if no entry was unavailable. When several cases
/// apply the spec allows any of them; the most informative one wins.
pub fn combine(entries: &[Entry]) -> CK_RV {
    let has = |rv| {
        entries
            .iter()
            .any(|e| matches!(e, Entry::Unavailable(r) if *r == rv))
    };
    for rv in [
        CKR_ATTRIBUTE_SENSITIVE,
        CKR_ATTRIBUTE_TYPE_INVALID,
        CKR_BUFFER_TOO_SMALL,
    ] {
        if has(rv) {
            return rv;
        }
    }
    CKR_OK
}

/// CK_DATE (YYYYMMDD as ASCII digits).
pub fn ck_date(year: u16, month: u8, day: u8) -> Vec<u8> {
    format!("{year:04}{month:02}{day:02}").into_bytes()
}

/// DER OCTET STRING around `content` (CKA_EC_POINT).
pub fn der_octet_string(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_five_cases() {
        let v = Attr::Value(vec![1, 2, 3]);
        assert_eq!(
            answer(Attr::Sensitive, Some(10)),
            Entry::Unavailable(CKR_ATTRIBUTE_SENSITIVE)
        );
        assert_eq!(
            answer(Attr::Invalid, None),
            Entry::Unavailable(CKR_ATTRIBUTE_TYPE_INVALID)
        );
        assert_eq!(answer(v.clone(), None), Entry::Length(3));
        assert_eq!(answer(v.clone(), Some(3)), Entry::Copy(vec![1, 2, 3]));
        assert_eq!(answer(v.clone(), Some(64)), Entry::Copy(vec![1, 2, 3]));
        assert_eq!(answer(v, Some(2)), Entry::Unavailable(CKR_BUFFER_TOO_SMALL));
    }

    #[test]
    fn mixed_templates_never_ok_next_to_unavailable() {
        let ok = Entry::Copy(vec![1]);
        assert_eq!(combine(&[ok.clone(), Entry::Length(4)]), CKR_OK);
        assert_eq!(
            combine(&[ok.clone(), Entry::Unavailable(CKR_BUFFER_TOO_SMALL)]),
            CKR_BUFFER_TOO_SMALL
        );
        assert_eq!(
            combine(&[
                Entry::Unavailable(CKR_BUFFER_TOO_SMALL),
                ok.clone(),
                Entry::Unavailable(CKR_ATTRIBUTE_TYPE_INVALID)
            ]),
            CKR_ATTRIBUTE_TYPE_INVALID
        );
        assert_eq!(
            combine(&[
                Entry::Unavailable(CKR_ATTRIBUTE_TYPE_INVALID),
                Entry::Unavailable(CKR_ATTRIBUTE_SENSITIVE),
                ok
            ]),
            CKR_ATTRIBUTE_SENSITIVE
        );
        assert_eq!(combine(&[]), CKR_OK);
    }

    #[test]
    fn der_octet_string_lengths() {
        assert_eq!(der_octet_string(&[0x04; 65])[..2], [0x04, 0x41]);
        assert_eq!(der_octet_string(&[0x04; 133])[..3], [0x04, 0x81, 0x85]);
        assert_eq!(der_octet_string(&[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(ck_date(2026, 1, 9), b"20260109");
    }
}
