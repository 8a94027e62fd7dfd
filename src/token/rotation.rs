//! Following the process tree's store: how one process switches to what a refresh published.
//!
//! The rule that keeps TLS servers whole: a key **with a certificate** switches to a new
//! version only at an object lookup (`Follow::Lookup`: C_FindObjectsInit, C_Login), and only
//! when the certificate file then holds the certificate of that version; the certificate
//! objects switch with it. Until then the process keeps serving the version its certificate
//! matches: an application that loaded the old certificate into memory (an nginx worker
//! started before the rotation) would otherwise sign with a key its certificate does not
//! name, and every handshake would fail. A key **without** a certificate switches at the next
//! operation. A revoked or expired key is dropped at once either way (fail closed).

use super::lease::{now_ms, LeaseState};
use super::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// How stale an operation's view of the store may be (a rotation or a revocation reaches
/// the operations of every process within this, plus the refresh itself).
const FOLLOW_INTERVAL_MS: u64 = 100;

/// Certificate files are re-read at most this often by lookups.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct RotationState {
    /// Each key's certificate file as last used (None: the key has none).
    cert_pems: Vec<Option<Vec<u8>>>,
    last_cert_check: Option<Instant>,
    /// What was already logged, so that each event has one log line per process.
    logged: Vec<(usize, String)>,
}

impl RotationState {
    pub(crate) fn new(cert_pems: Vec<Option<Vec<u8>>>) -> RotationState {
        RotationState {
            cert_pems,
            last_cert_check: None,
            logged: Vec::new(),
        }
    }
    /// True the first time this (key, event) is seen.
    fn first(&mut self, index: usize, event: String) -> bool {
        if self.logged.iter().any(|(i, e)| *i == index && *e == event) {
            return false;
        }
        self.logged.push((index, event));
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// Before an operation.
    Operation,
    /// An object lookup: certificate files are re-read too.
    Lookup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowOutcome {
    /// Nothing to change.
    Current,
    /// A new key version, a renewed lease or a dropped key was installed.
    Changed,
    /// A certificate file now names a key that neither this process nor the store has: the
    /// caller should refresh now (a rotation the next scheduled refresh has not seen yet).
    NeedsRelease,
}

impl Token {
    /// Bring this process's keys in line with the tree's store and the lease terms.
    /// `read_pem` reads a certificate file (the caller does the I/O; None when unreadable).
    pub fn follow(
        &self,
        mode: Follow,
        read_pem: &dyn Fn(&Path) -> Option<Vec<u8>>,
    ) -> FollowOutcome {
        let now = now_ms();
        // Before an operation the store is looked at every FOLLOW_INTERVAL_MS at most: one
        // clock read and one load per call, no lock.
        if mode == Follow::Operation && now < self.next_follow_ms.load(Ordering::Relaxed) {
            return FollowOutcome::Current;
        }
        self.next_follow_ms
            .store(now + FOLLOW_INTERVAL_MS, Ordering::Relaxed);
        let Some(ks) = lock(&self.login).keys.clone() else {
            return FollowOutcome::Current;
        };
        let store = ks.material.store.clone();
        let stale = store
            .as_ref()
            .is_some_and(|s| s.generation() != ks.material.generation);
        let expired = ks
            .material
            .keys
            .iter()
            .any(|k| self.terms.expires_at(k.released_at_ms) <= now);
        let has_certs = self.config.keys.iter().any(|k| k.certificate.is_some());
        if !stale && !expired && !(mode == Follow::Lookup && has_certs) {
            return FollowOutcome::Current;
        }
        // One import at a time; the others go on with the keys they have.
        let Ok(mut rot) = self.rotation.try_lock() else {
            return FollowOutcome::Current;
        };
        let mut new_pems: Vec<Option<Vec<u8>>> = vec![None; self.config.keys.len()];
        if mode == Follow::Lookup
            && has_certs
            && rot
                .last_cert_check
                .is_none_or(|t| t.elapsed() >= CERT_CHECK_INTERVAL)
        {
            for (i, k) in self.config.keys.iter().enumerate() {
                let Some(path) = &k.certificate else { continue };
                if let Some(pem) = read_pem(path) {
                    if rot.cert_pems[i].as_deref() != Some(pem.as_slice()) {
                        new_pems[i] = Some(pem);
                    }
                }
            }
            // Unchanged files are not read again for a while; a changed one is looked at
            // again by the next lookup until it is taken.
            if new_pems.iter().all(Option::is_none) {
                rot.last_cert_check = Some(Instant::now());
            }
        }
        if !stale && !expired && new_pems.iter().all(Option::is_none) {
            return FollowOutcome::Current;
        }
        let record = if stale {
            store
                .as_ref()
                .and_then(|s| s.read())
                .and_then(|(g, bytes)| lease::decode(bytes.as_slice()).map(|r| (g, r)))
        } else {
            None
        };
        let generation = record
            .as_ref()
            .map(|(g, _)| *g)
            .unwrap_or(ks.material.generation);
        let public_now = lock(&self.login).public.clone();
        let mut public: Vec<Arc<Object>> = public_now.to_vec();
        let mut served: Vec<ServedKey> = Vec::new();
        let (mut changed, mut dropped, mut needs_release) = (false, false, false);
        for (i, k) in self.config.keys.iter().enumerate() {
            let cur = ks.material.served(i);
            let entry = record
                .as_ref()
                .and_then(|(_, r)| r.iter().find(|e| e.index == i));
            // A changed certificate file, parsed: its objects and the public key it names.
            let new_cert = new_pems[i].as_ref().and_then(|pem| {
                match certificate_objects(&self.config, i, pem, &public_now) {
                    Ok(objs) => Some((pem.clone(), objs)),
                    Err(e) => {
                        if rot.first(i, format!("bad certificate {}", e.message())) {
                            log::warn!("key {:?}: the certificate file changed but cannot be used ({}); keeping the one loaded before", k.label, e.message());
                        }
                        None
                    }
                }
            });
            let cert_key = |objs: &[Arc<Object>]| {
                objs.iter().find_map(|o| match (&o.body, o.key_index) {
                    (Body::PublicKey(p), Some(x)) if x == i => Some(p.info.clone()),
                    _ => None,
                })
            };
            let matches = |parsed: &ParsedKey, objs: &[Arc<Object>]| match (parsed, cert_key(objs))
            {
                (ParsedKey::Asym(key), Some(info)) => key.info == info,
                (_, None) => true,
                (ParsedKey::Secret(_), Some(_)) => false,
            };
            let mut take_cert = false;
            let mut choice: Option<ServedKey> = match entry.map(|e| (e, &e.state)) {
                Some((e, LeaseState::Revoked | LeaseState::Expired)) => {
                    if cur.is_some() {
                        log::error!(
                            "key {:?}: {} (version {}): wiped; operations on it fail with CKR_KEY_HANDLE_INVALID until a refresh releases it again",
                            k.label,
                            if matches!(e.state, LeaseState::Revoked) { "the vault refused its refresh (403): the release policy no longer admits this TEE or the release right was removed" } else { "its lease expired (no refresh succeeded within release.max_age)" },
                            e.version
                        );
                    }
                    changed = true;
                    dropped |= cur.is_some();
                    None
                }
                Some((e, LeaseState::Live(_))) if cur.is_some_and(|c| c.version == e.version) => {
                    let c = cur.expect("checked above");
                    changed |= c.released_at_ms != e.released_at_ms;
                    Some(ServedKey {
                        index: i,
                        version: c.version.clone(),
                        released_at_ms: e.released_at_ms.max(c.released_at_ms),
                        parsed: c.parsed.clone(),
                    })
                }
                Some((e, LeaseState::Live(m))) => match parse_key(k, m) {
                    Err(err) => {
                        if rot.first(i, format!("unusable {}", e.version)) {
                            log::error!("key {:?}: version {} from the shared store is unusable ({}); keeping the version served now", k.label, e.version, err.message());
                        }
                        cur.map(ServedKey::same)
                    }
                    Ok(parsed) => {
                        let judge_new = new_cert.as_ref().map(|(_, o)| o.as_slice());
                        if cur.is_none() || k.certificate.is_none() {
                            changed = true;
                            take_cert = judge_new.is_some_and(|o| matches(&parsed, o));
                            Some(ServedKey {
                                index: i,
                                version: e.version.clone(),
                                released_at_ms: e.released_at_ms,
                                parsed,
                            })
                        } else if mode == Follow::Lookup
                            && judge_new.is_some_and(|o| matches(&parsed, o))
                        {
                            log::info!(
                                "key {:?}: now serving version {} with its new certificate (was {})",
                                k.label,
                                e.version,
                                cur.map(|c| c.version.as_str()).unwrap_or("none")
                            );
                            changed = true;
                            take_cert = true;
                            Some(ServedKey {
                                index: i,
                                version: e.version.clone(),
                                released_at_ms: e.released_at_ms,
                                parsed,
                            })
                        } else {
                            if rot.first(i, format!("held {}", e.version)) {
                                log::warn!(
                                    "key {:?}: version {} was released but {} does not hold its certificate yet; serving version {} with the certificate it matches until the file is replaced and the application looks the key up again (its lease ends {} ms after its release)",
                                    k.label,
                                    e.version,
                                    k.certificate.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                                    cur.map(|c| c.version.as_str()).unwrap_or(""),
                                    self.terms.max_age_ms
                                );
                            }
                            cur.map(ServedKey::same)
                        }
                    }
                },
                None => cur.map(ServedKey::same),
            };
            // A certificate file that changed with no new version in the store.
            if let (Some((_, objs)), None) = (&new_cert, entry) {
                match &choice {
                    Some(c) if matches(&c.parsed, objs) => take_cert = true,
                    Some(_) => needs_release = true,
                    None => {}
                }
            }
            if let Some(c) = &choice {
                let ends = self.terms.expires_at(c.released_at_ms);
                if ends <= now {
                    if rot.first(i, format!("expired {} {}", c.version, c.released_at_ms)) {
                        log::error!("key {:?}: the lease of version {} ended (released {} ms ago, release.max_age {} ms) and no refresh renewed it: wiped; operations on it fail with CKR_KEY_HANDLE_INVALID until a refresh succeeds", k.label, c.version, now.saturating_sub(c.released_at_ms), self.terms.max_age_ms);
                    }
                    choice = None;
                    changed = true;
                    dropped = true;
                }
            }
            if take_cert {
                if let Some((pem, objs)) = new_cert {
                    let chain_prefix = format!("{} chain ", k.label);
                    public
                        .retain(|o| o.key_index != Some(i) && !o.label.starts_with(&chain_prefix));
                    public.extend(objs);
                    rot.cert_pems[i] = Some(pem);
                    changed = true;
                }
            }
            served.extend(choice);
        }
        if !changed && generation == ks.material.generation {
            return if needs_release {
                FollowOutcome::NeedsRelease
            } else {
                FollowOutcome::Current
            };
        }
        let material = Arc::new(Material {
            keys: served,
            store,
            generation,
        });
        let public = dedupe_chains(public);
        let new_ks = match self.build_keyset(material.clone(), &public, Some(&ks)) {
            Ok(n) => n,
            Err(e) => {
                log::error!(
                    "token {:?}: cannot install the refreshed keys: {e}",
                    self.config.label
                );
                return FollowOutcome::Current;
            }
        };
        {
            let mut st = lock(&self.login);
            // A logout or another install since we looked: leave it be.
            if !st.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, &ks)) {
                return FollowOutcome::Current;
            }
            st.keys = Some(Arc::new(new_ks));
            st.public = Arc::new(public);
            if dropped {
                // Operations started with a dropped key end (their epoch no longer matches).
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
        retain(&self.config.label, material);
        if needs_release {
            FollowOutcome::NeedsRelease
        } else if changed {
            FollowOutcome::Changed
        } else {
            FollowOutcome::Current
        }
    }
}

impl ServedKey {
    /// The same key, served on (its parsed form is shared, not copied).
    fn same(&self) -> ServedKey {
        ServedKey {
            index: self.index,
            version: self.version.clone(),
            released_at_ms: self.released_at_ms,
            parsed: self.parsed.clone(),
        }
    }
}
