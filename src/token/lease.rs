//! Keys as leases: what the shared store (`secret::shared`) holds for one token, and the
//! timing rules of refresh and expiry. Pure: encoding, decoding and arithmetic only.
//!
//! A record is the token's current release, key by key: the configured index, the version,
//! when it was released, and either its material or why it has none (revoked by a 403, or its
//! lease expired). Layout (little endian):
//! `"SKRL" 1 count:u32 { index:u32 state:u8 released_at_ms:u64 version_len:u16 version
//! material_len:u32 material }*`.

use super::released::{KeyMaterial, ReleasedKey};
use crate::secret::SecretBytes;

const MAGIC: &[u8; 4] = b"SKRL";
const FORMAT: u8 = 1;
/// Longest version string kept (Key Vault versions are 32 hex digits).
const MAX_VERSION: usize = 256;

/// One key's entry in the record.
#[derive(Debug)]
pub struct LeasedKey {
    pub index: usize,
    pub version: String,
    /// Unix milliseconds of the release this material came from.
    pub released_at_ms: u64,
    pub state: LeaseState,
}

// `SecretBytes` is 128-byte aligned (secret/mod.rs says why), so `Live` is large next to the
// empty variants; a token has a handful of these, boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LeaseState {
    Live(KeyMaterial),
    /// The vault refused a refresh (403): the policy no longer admits this TEE or the
    /// release right was removed.
    Revoked,
    /// No refresh succeeded within `release.max_age` of the release.
    Expired,
}

impl LeaseState {
    fn code(&self) -> u8 {
        match self {
            LeaseState::Live(KeyMaterial::Pkcs8(_)) => 1,
            LeaseState::Live(KeyMaterial::Raw(_)) => 2,
            LeaseState::Revoked => 3,
            LeaseState::Expired => 4,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            LeaseState::Live(_) => "live",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
        }
    }
    fn material(&self) -> &[u8] {
        match self {
            LeaseState::Live(KeyMaterial::Pkcs8(b)) | LeaseState::Live(KeyMaterial::Raw(b)) => {
                b.as_slice()
            }
            _ => &[],
        }
    }
}

impl LeasedKey {
    pub fn from_released(r: ReleasedKey, released_at_ms: u64) -> LeasedKey {
        LeasedKey {
            index: r.index,
            version: r.version,
            released_at_ms,
            state: LeaseState::Live(r.material),
        }
    }

    /// A copy of this entry (material copied into new locked memory).
    pub fn duplicate(&self) -> LeasedKey {
        let state = match &self.state {
            LeaseState::Live(KeyMaterial::Pkcs8(b)) => {
                LeaseState::Live(KeyMaterial::Pkcs8(SecretBytes::from_slice(b.as_slice())))
            }
            LeaseState::Live(KeyMaterial::Raw(b)) => {
                LeaseState::Live(KeyMaterial::Raw(SecretBytes::from_slice(b.as_slice())))
            }
            LeaseState::Revoked => LeaseState::Revoked,
            LeaseState::Expired => LeaseState::Expired,
        };
        LeasedKey {
            index: self.index,
            version: self.version.clone(),
            released_at_ms: self.released_at_ms,
            state,
        }
    }

    pub fn is_live(&self) -> bool {
        matches!(self.state, LeaseState::Live(_))
    }
}

/// Serialize the entries into locked memory.
pub fn encode(keys: &[LeasedKey]) -> SecretBytes {
    let len = 9 + keys
        .iter()
        .map(|k| 4 + 1 + 8 + 2 + kept_version(&k.version).len() + 4 + k.state.material().len())
        .sum::<usize>();
    let mut out = SecretBytes::zeroed(len);
    let buf = out.as_mut_slice();
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(MAGIC);
    put(&[FORMAT]);
    put(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        let version = kept_version(&k.version).as_bytes();
        put(&(k.index as u32).to_le_bytes());
        put(&[k.state.code()]);
        put(&k.released_at_ms.to_le_bytes());
        put(&(version.len() as u16).to_le_bytes());
        put(version);
        let m = k.state.material();
        put(&(m.len() as u32).to_le_bytes());
        put(m);
    }
    out
}

/// The part of a version the record keeps: at most MAX_VERSION bytes, cut on a character
/// boundary so that what is written is valid UTF-8 and decodes to itself.
fn kept_version(v: &str) -> &str {
    let mut end = v.len().min(MAX_VERSION);
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// Parse a record (bounds-checked: a torn or foreign mapping yields None, never a panic).
pub fn decode(record: &[u8]) -> Option<Vec<LeasedKey>> {
    let mut r = Reader { b: record, at: 0 };
    if r.take(4)? != MAGIC || r.take(1)? != [FORMAT] {
        return None;
    }
    let count = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
    if count > 4096 {
        return None;
    }
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        let index = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let code = r.take(1)?[0];
        let released_at_ms = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let vlen = u16::from_le_bytes(r.take(2)?.try_into().ok()?) as usize;
        // encode never writes a longer one: a record that has one is not ours.
        if vlen > MAX_VERSION {
            return None;
        }
        let version = String::from_utf8(r.take(vlen)?.to_vec()).ok()?;
        let mlen = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
        let material = r.take(mlen)?;
        let state = match code {
            1 => LeaseState::Live(KeyMaterial::Pkcs8(SecretBytes::from_slice(material))),
            2 => LeaseState::Live(KeyMaterial::Raw(SecretBytes::from_slice(material))),
            3 if mlen == 0 => LeaseState::Revoked,
            4 if mlen == 0 => LeaseState::Expired,
            _ => return None,
        };
        keys.push(LeasedKey {
            index,
            version,
            released_at_ms,
            state,
        });
    }
    (r.at == record.len()).then_some(keys)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}
impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
}

/// The lease timing of a token (`release.refresh`, `release.max_age`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTerms {
    pub refresh_ms: u64,
    pub max_age_ms: u64,
}

impl LeaseTerms {
    /// When the next refresh is due after one finished at `now_ms`: `refresh` ±10 %, spread
    /// by `random` (any u64) so that a fleet started together does not refresh together.
    pub fn next_refresh(&self, now_ms: u64, random: u64) -> u64 {
        let spread = self.refresh_ms / 5; // the width of ±10 %
        let offset = if spread == 0 {
            0
        } else {
            random % (spread + 1)
        };
        now_ms + self.refresh_ms - self.refresh_ms / 10 + offset
    }

    /// When to retry after `failures` consecutive failed refreshes: doubling from
    /// `first_ms`, never more than a tenth of the lease, with full jitter.
    pub fn retry_after(&self, now_ms: u64, failures: u64, first_ms: u64, random: u64) -> u64 {
        let cap = (self.max_age_ms / 10).max(first_ms).max(1);
        let exp = first_ms
            .max(1)
            .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
            .min(cap);
        now_ms + exp / 2 + random % (exp / 2 + 1)
    }

    pub fn expires_at(&self, released_at_ms: u64) -> u64 {
        released_at_ms.saturating_add(self.max_age_ms)
    }
}

/// Stops a background refresher: set by logout / finalize, waited on by the refresher
/// between attempts (so a stop is prompt, never a sleep that runs out).
#[derive(Default)]
pub struct StopSignal {
    stopped: std::sync::Mutex<bool>,
    wake: std::sync::Condvar,
}

impl StopSignal {
    pub fn stop(&self) {
        *crate::sync::lock(&self.stopped) = true;
        self.wake.notify_all();
    }
    pub fn is_stopped(&self) -> bool {
        *crate::sync::lock(&self.stopped)
    }
    /// Wait up to `d`; true when stopped.
    pub fn wait(&self, d: std::time::Duration) -> bool {
        let g = crate::sync::lock(&self.stopped);
        if *g {
            return true;
        }
        let (g, _) = self
            .wake
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// Milliseconds since the Unix epoch (the store is shared by processes: wall clock, not
/// Instant).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_pkcs8(index: usize, version: &str, bytes: &[u8]) -> LeasedKey {
        LeasedKey {
            index,
            version: version.into(),
            released_at_ms: 1_700_000_000_000 + index as u64,
            state: LeaseState::Live(KeyMaterial::Pkcs8(SecretBytes::from_slice(bytes))),
        }
    }

    #[test]
    fn a_record_round_trips_every_state() {
        let keys = vec![
            live_pkcs8(0, "0123abcd", b"pkcs8 der"),
            LeasedKey {
                index: 1,
                version: "v2".into(),
                released_at_ms: 5,
                state: LeaseState::Live(KeyMaterial::Raw(SecretBytes::from_slice(&[7; 32]))),
            },
            LeasedKey {
                index: 2,
                version: "v3".into(),
                released_at_ms: 6,
                state: LeaseState::Revoked,
            },
            LeasedKey {
                index: 3,
                version: String::new(),
                released_at_ms: 7,
                state: LeaseState::Expired,
            },
        ];
        let bytes = encode(&keys);
        let back = decode(bytes.as_slice()).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back[0].version, "0123abcd");
        assert_eq!(back[0].released_at_ms, 1_700_000_000_000);
        assert_eq!(back[0].state.material(), b"pkcs8 der");
        assert!(matches!(
            back[1].state,
            LeaseState::Live(KeyMaterial::Raw(_))
        ));
        assert_eq!(back[1].state.material(), &[7; 32]);
        assert!(matches!(back[2].state, LeaseState::Revoked));
        assert!(matches!(back[3].state, LeaseState::Expired));
        assert_eq!(back[3].index, 3);
    }

    #[test]
    fn a_long_version_is_kept_whole_characters_and_an_overlong_one_refused() {
        // 255 ASCII bytes, then a 2-byte character across the 256-byte limit.
        let long = format!("{}é and more", "v".repeat(255));
        let bytes = encode(&[live_pkcs8(0, &long, b"abc")]);
        let back = decode(bytes.as_slice()).unwrap();
        assert_eq!(back[0].version, "v".repeat(255));
        let again = encode(&back);
        assert_eq!(again.as_slice(), bytes.as_slice());
        // A record with a 257-byte version (fuzz finding: it decoded, then re-encoded shorter).
        let mut overlong = encode(&[live_pkcs8(0, &"w".repeat(256), b"abc")])
            .as_slice()
            .to_vec();
        let at = 9 + 4 + 1 + 8;
        overlong[at..at + 2].copy_from_slice(&257u16.to_le_bytes());
        overlong.insert(at + 2, b'w');
        assert!(decode(&overlong).is_none());
        overlong[at..at + 2].copy_from_slice(&256u16.to_le_bytes());
        overlong.remove(at + 2);
        assert!(decode(&overlong).is_some());
    }

    #[test]
    fn a_truncated_or_padded_record_is_refused() {
        let bytes = encode(&[live_pkcs8(0, "v", b"abc")]);
        let b = bytes.as_slice();
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = b.to_vec();
        longer.push(0);
        assert!(decode(&longer).is_none());
        let mut bad_state = b.to_vec();
        bad_state[13] = 9;
        assert!(decode(&bad_state).is_none());
    }

    #[test]
    fn refresh_times_stay_within_ten_percent() {
        let t = LeaseTerms {
            refresh_ms: 1000,
            max_age_ms: 4000,
        };
        for r in [0, 1, 57, 199, 200, 201, u64::MAX] {
            let at = t.next_refresh(10_000, r);
            assert!((10_900..=11_100).contains(&at), "{r}: {at}");
        }
        assert_eq!(t.next_refresh(0, 0), 900);
        assert_eq!(t.next_refresh(0, 200), 1100);
    }

    #[test]
    fn retries_back_off_and_stay_under_a_tenth_of_the_lease() {
        let t = LeaseTerms {
            refresh_ms: 1000,
            max_age_ms: 100_000,
        };
        assert!((50..=100).contains(&t.retry_after(0, 1, 100, 12345)));
        assert!((200..=400).contains(&t.retry_after(0, 3, 100, 12345)));
        for f in [10, 30, 1000] {
            assert!(t.retry_after(0, f, 100, u64::MAX) <= 10_000, "{f}");
        }
    }
}
