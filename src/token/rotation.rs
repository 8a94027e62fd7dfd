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

/// How stale an operation's view of the store may be (a rotation or a revocation reaches
/// the operations of every process within this, plus the refresh itself).
const FOLLOW_INTERVAL_MS: u64 = 100;

pub(crate) struct RotationState {
    /// Each key's certificate file as last used (None: the key has none).
    cert_pems: Vec<Option<Vec<u8>>>,
    /// What was already logged, so that each event has one log line per process.
    logged: Vec<(usize, String)>,
}

impl RotationState {
    pub(crate) fn new(cert_pems: Vec<Option<Vec<u8>>>) -> RotationState {
        RotationState {
            cert_pems,
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
        if !(stale || expired || (mode == Follow::Lookup && has_certs)) {
            return FollowOutcome::Current;
        }
        // One import at a time; the others go on with the keys they have.
        let Ok(mut rot) = self.rotation.try_lock() else {
            return FollowOutcome::Current;
        };
        let mut new_pems: Vec<Option<Vec<u8>>> = vec![None; self.config.keys.len()];
        // Lookups are rare next to operations (an application finds its keys when it loads
        // them), and reading a small PEM file costs microseconds: no rate limit, so a reload
        // right after the file was replaced sees it.
        if mode == Follow::Lookup && has_certs {
            for (i, k) in self.config.keys.iter().enumerate() {
                let Some(path) = &k.certificate else { continue };
                if let Some(pem) = read_pem(path) {
                    if rot.cert_pems[i].as_deref() != Some(pem.as_slice()) {
                        new_pems[i] = Some(pem);
                    }
                }
            }
        }
        if !stale && !expired && new_pems.iter().all(Option::is_none) {
            return FollowOutcome::Current;
        }
        // A held-back version waits in the store: a changed certificate may now admit it.
        let record = if stale || new_pems.iter().any(Option::is_some) {
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
                        if matches!(e.state, LeaseState::Revoked) {
                            log::error!("key {:?}: the vault refused its refresh (403: the release policy no longer admits this TEE, or the release right was removed): version {} wiped; operations on it fail with CKR_KEY_HANDLE_INVALID until a refresh releases it again", k.label, e.version);
                        } else if rot.first(i, format!("expired {}", e.version)) {
                            log::error!("key {:?}: the lease of version {} ended (no refresh succeeded within release.max_age = {} ms): wiped; operations on it fail with CKR_KEY_HANDLE_INVALID until a refresh succeeds", k.label, e.version, self.terms.max_age_ms);
                        }
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
            // A certificate file that changed to a key we do not serve: a re-issued certificate
            // of the same key is taken; one for a key nobody released asks for a release.
            if let (Some((_, objs)), false) = (&new_cert, take_cert) {
                match &choice {
                    Some(c) if matches(&c.parsed, objs) => take_cert = true,
                    Some(_) => needs_release = true,
                    None => {}
                }
            }
            if let Some(c) = &choice {
                let ends = self.terms.expires_at(c.released_at_ms);
                if ends <= now {
                    if rot.first(i, format!("expired {}", c.version)) {
                        log::error!("key {:?}: the lease of version {} ended (no refresh succeeded within release.max_age = {} ms): wiped; operations on it fail with CKR_KEY_HANDLE_INVALID until a refresh succeeds", k.label, c.version, self.terms.max_age_ms);
                    }
                    choice = None;
                    changed = true;
                    dropped = true;
                }
            }
            if choice.is_some() {
                // Served again: a later expiry is a new event with its own log line.
                rot.logged
                    .retain(|(j, e)| !(*j == i && e.starts_with("expired")));
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
        log::debug!(
            "token {:?}: store generation {generation} (had {}): serving {:?}{}",
            self.config.label,
            ks.material.generation,
            served
                .iter()
                .map(|k| (k.index, k.version.as_str()))
                .collect::<Vec<_>>(),
            if record.is_none() && stale {
                " (store unreadable)"
            } else {
                ""
            }
        );
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
        let new_ks = match self.build_keyset(material.clone(), &public) {
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
            self.visible.store(super::Visible::of(&st));
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

#[cfg(test)]
mod tests {
    use super::super::lease::{encode, LeasedKey};
    use super::super::tests::{cert, login_with, pem, spki_of, Fixture};
    use super::*;
    use crate::crypto::ops::tests::ec_pkcs8;
    use std::time::Duration;

    fn no_files(_: &Path) -> Option<Vec<u8>> {
        None
    }

    fn live(index: usize, version: &str, m: KeyMaterial) -> LeasedKey {
        LeasedKey {
            index,
            version: version.into(),
            released_at_ms: now_ms(),
            state: LeaseState::Live(m),
        }
    }

    /// The fixture's three keys as store entries, version v1, with `edit` applied.
    fn record(f: &Fixture, edit: impl FnOnce(&mut Vec<LeasedKey>)) -> SecretBytes {
        let mut keys = vec![
            live(0, "v1", KeyMaterial::Pkcs8(SecretBytes::from_slice(&f.rsa))),
            live(1, "v1", KeyMaterial::Pkcs8(SecretBytes::from_slice(&f.ec))),
            live(2, "v1", KeyMaterial::Raw(SecretBytes::from_slice(&f.aes))),
        ];
        edit(&mut keys);
        encode(&keys)
    }

    fn handle_of(t: &Token, class: CK_OBJECT_CLASS, label: &str) -> CK_OBJECT_HANDLE {
        t.visible_objects()
            .iter()
            .find(|o| o.class() == class && o.label == label)
            .map(|o| o.handle)
            .unwrap_or_else(|| panic!("no {class:#x} {label}"))
    }

    fn secret_of(t: &Token, h: CK_OBJECT_HANDLE) -> Vec<u8> {
        match &t.object(h).unwrap().body {
            Body::SecretKey(s) => s.as_slice().to_vec(),
            _ => panic!("not a secret key"),
        }
    }

    fn spki_served(t: &Token, h: CK_OBJECT_HANDLE) -> Vec<u8> {
        match &t.object(h).unwrap().body {
            Body::PrivateKey { key, .. } => key.info.spki_der.clone(),
            _ => panic!("not a private key"),
        }
    }

    #[test]
    fn a_new_version_of_a_key_without_certificate_is_served_at_the_next_operation_under_the_same_handle(
    ) {
        let f = Fixture::new("");
        let m = f.module();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let h = handle_of(t, CKO_SECRET_KEY, "data-aes");
        let epoch = t.epoch();
        let store = t.store().expect("a shared store");
        store.publish(
            record(&f, |k| {
                k[2] = live(2, "v2", KeyMaterial::Raw(SecretBytes::from_slice(&[9; 32])));
            })
            .as_slice(),
        );
        assert_eq!(
            t.follow(Follow::Operation, &no_files),
            FollowOutcome::Changed
        );
        assert_eq!(secret_of(t, h), vec![9; 32], "same handle, new material");
        assert_eq!(
            t.epoch(),
            epoch,
            "a rotation does not end operations in flight"
        );
        let versions = t.served_versions();
        assert!(versions.iter().any(|(i, v, _, _)| *i == 2 && v == "v2"));
        assert!(versions.iter().any(|(i, v, _, _)| *i == 0 && v == "v1"));
    }

    #[test]
    fn a_key_with_a_certificate_switches_only_at_a_lookup_that_finds_its_new_certificate() {
        let f = Fixture::new("");
        let m = f.module();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let (private, public, certificate) = (
            handle_of(t, CKO_PRIVATE_KEY, "tls-ec"),
            handle_of(t, CKO_PUBLIC_KEY, "tls-ec"),
            handle_of(t, CKO_CERTIFICATE, "tls-ec"),
        );
        let ec2 = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let store = t.store().unwrap();
        store.publish(
            record(&f, |k| {
                k[1] = live(1, "v2", KeyMaterial::Pkcs8(SecretBytes::from_slice(&ec2)));
            })
            .as_slice(),
        );
        let cert_path = f.dir.path().join("ec.pem");
        let read = |p: &Path| std::fs::read(p).ok();
        // The certificate file still names v1: operations and lookups keep v1.
        t.follow(Follow::Operation, &read);
        t.next_follow_ms.store(0, Ordering::Relaxed);
        t.follow(Follow::Lookup, &read);
        assert_eq!(spki_served(t, private), spki_of(&f.ec));
        // The operator replaces the certificate: an operation still keeps v1 (the application
        // may present the old certificate from memory), a lookup switches key and certificate.
        let signer = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let new_cert = cert("CN=tls-ec v2", &spki_of(&ec2), "CN=Test CA", &signer, 9);
        std::fs::write(&cert_path, pem(&new_cert)).unwrap();
        t.next_follow_ms.store(0, Ordering::Relaxed);
        t.follow(Follow::Operation, &read);
        assert_eq!(spki_served(t, private), spki_of(&f.ec));
        assert_eq!(t.follow(Follow::Lookup, &read), FollowOutcome::Changed);
        assert_eq!(spki_served(t, private), spki_of(&ec2));
        assert_eq!(handle_of(t, CKO_PRIVATE_KEY, "tls-ec"), private);
        assert_eq!(handle_of(t, CKO_PUBLIC_KEY, "tls-ec"), public);
        assert_eq!(handle_of(t, CKO_CERTIFICATE, "tls-ec"), certificate);
        match &t.object(certificate).unwrap().body {
            Body::Certificate(c) => assert_eq!(c.der, new_cert),
            _ => panic!("not a certificate"),
        }
    }

    #[test]
    fn a_certificate_naming_a_key_nobody_released_asks_for_a_release_and_keeps_serving() {
        let f = Fixture::new("");
        let m = f.module();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let private = handle_of(t, CKO_PRIVATE_KEY, "tls-ec");
        let other = ec_pkcs8(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let new_cert = cert("CN=tls-ec v2", &spki_of(&other), "CN=Test CA", &other, 9);
        std::fs::write(f.dir.path().join("ec.pem"), pem(&new_cert)).unwrap();
        let read = |p: &Path| std::fs::read(p).ok();
        assert_eq!(t.follow(Follow::Lookup, &read), FollowOutcome::NeedsRelease);
        assert_eq!(
            spki_served(t, private),
            spki_of(&f.ec),
            "served with its own certificate"
        );
    }

    #[test]
    fn a_revoked_key_is_dropped_at_once_and_ends_the_operations_using_it() {
        let f = Fixture::new("");
        let m = f.module();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let h = handle_of(t, CKO_PRIVATE_KEY, "tls-rsa");
        let aes = handle_of(t, CKO_SECRET_KEY, "data-aes");
        let epoch = t.epoch();
        t.store().unwrap().publish(
            record(&f, |k| {
                k[0].state = LeaseState::Revoked;
            })
            .as_slice(),
        );
        assert_eq!(
            t.follow(Follow::Operation, &no_files),
            FollowOutcome::Changed
        );
        assert_eq!(
            t.object(h).err().map(|e| e.rv()),
            Some(CKR_OBJECT_HANDLE_INVALID)
        );
        assert_ne!(t.epoch(), epoch);
        assert_eq!(secret_of(t, aes), f.aes, "the other keys keep serving");
        assert!(t.is_logged_in());
        // A later refresh that releases it again brings it back under its handle.
        t.store().unwrap().publish(record(&f, |_| {}).as_slice());
        t.next_follow_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            t.follow(Follow::Operation, &no_files),
            FollowOutcome::Changed
        );
        assert_eq!(spki_served(t, h), spki_of(&f.rsa));
    }

    #[test]
    fn a_lease_past_max_age_is_dropped_even_when_no_refresh_ever_ran() {
        let f = Fixture::new("");
        let mut cfg = crate::config::Config::load(&f.config_path()).unwrap();
        cfg.release.refresh = crate::config::DurationSetting(Duration::from_millis(100));
        cfg.release.max_age = crate::config::DurationSetting(Duration::from_millis(300));
        let mut pems = HashMap::new();
        for name in ["rsa.pem", "ec.pem"] {
            let p = f.dir.path().join(name);
            pems.insert(p.clone(), std::fs::read(&p).unwrap());
        }
        let m = Module::new(Arc::new(cfg), &pems).unwrap();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let h = handle_of(t, CKO_SECRET_KEY, "data-aes");
        assert_eq!(
            t.follow(Follow::Operation, &no_files),
            FollowOutcome::Current
        );
        // Wait out the lease on the clock the lease is measured with.
        let ends = t.served_versions()[0].3;
        while now_ms() <= ends {
            std::thread::sleep(Duration::from_millis(ends + 1 - now_ms().min(ends)));
        }
        t.next_follow_ms.store(0, Ordering::Relaxed);
        assert_eq!(
            t.follow(Follow::Operation, &no_files),
            FollowOutcome::Changed
        );
        assert!(t.object(h).is_err(), "expired keys are wiped");
        assert!(t.served_versions().is_empty());
    }

    #[test]
    fn logout_of_the_last_process_zeroes_the_shared_store() {
        let f = Fixture::new("");
        let m = f.module();
        let t = &m.tokens[0];
        login_with(t, f.released()).unwrap();
        let store = t.store().unwrap();
        assert!(store.read().is_some());
        assert_eq!(store.status().attached, 1);
        m.logout(0).unwrap();
        assert!(
            store.read().is_none(),
            "nothing left in the store after the last logout"
        );
    }
}
