//! Keys as leases: the background refresher of each logged-in token and the refresh itself.
//!
//! A refresh re-attests and re-releases every key of a token (`release::release_token_each`)
//! and publishes the result in the process tree's store (`secret::shared`). Whichever process
//! of the tree wins the store's claim when a refresh is due runs it — one release per key for
//! the whole tree; every process then follows the store on its own (`Token::follow`). The
//! refresher never runs on an operation's path and holds no lock an operation takes: it
//! touches only the configuration and the store. Where the application forbade new threads
//! (CKF_LIBRARY_CANT_CREATE_OS_THREADS) a due refresh runs inline at the next C_OpenSession
//! or object lookup instead.
//!
//! Outcomes per key: released → the new material (maybe a new version); refused with 403 →
//! revoked at once (wiped in every process at its next call); any other failure → the
//! current material keeps serving, retried with backoff, until `release.max_age` after its
//! release, then expired (wiped).

use super::process::Instance;
use crate::config::{Config, KeyConfig, TokenConfig};
use crate::crypto::ops::AsymKey;
use crate::error::{ErrorKind, Step};
use crate::release;
use crate::secret::shared::{FailureClass, SharedStore};
use crate::token::lease::{self, now_ms, LeaseState, LeaseTerms, LeasedKey, StopSignal};
use crate::token::object::CertInfo;
use crate::token::released::KeyMaterial;
use crate::token::{Material, Token};
use std::sync::Arc;
use std::time::Duration;

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = crate::crypto::random(&mut b);
    u64::from_le_bytes(b)
}

fn terms(cfg: &Config) -> LeaseTerms {
    LeaseTerms {
        refresh_ms: cfg.release.refresh.as_millis(),
        max_age_ms: cfg.release.max_age.as_millis(),
    }
}

/// How long a refresher may hold the claim before another process may take over (it died or
/// hung mid-way): the whole refresh is bounded by `release.deadline_seconds` (every call,
/// attempt and wait of its login), and renewing a version a certificate names may run a second
/// one; then a margin.
fn claim_hold_seconds(cfg: &Config) -> u64 {
    (cfg.release.deadline_seconds.saturating_mul(2) + 30).clamp(30, 7200)
}

/// After a login installed keys: schedule the first refresh (once per store) and start this
/// process's refresher, unless the application forbade threads.
pub(crate) fn after_login(inst: &Instance, token_index: usize) {
    let t = &inst.module.tokens[token_index];
    let Some(store) = t.store() else { return };
    if store.next_refresh_ms() == 0 {
        store.set_next_refresh_ms(t.terms.next_refresh(now_ms(), random_u64()));
    }
    if inst.no_threads || t.has_refresher() {
        return;
    }
    let stop = Arc::new(StopSignal::default());
    let (cfg, stop2) = (inst.module.config.clone(), stop.clone());
    let spawned = std::thread::Builder::new()
        .name("skr-refresh".into())
        .spawn(move || refresher(&cfg, token_index, &store, &stop2));
    match spawned {
        Ok(_) => t.set_refresher(stop),
        Err(e) => log::warn!(
            "token {:?}: cannot start the key refresher ({e}); refreshes run at the next session open or key lookup after they are due",
            t.config.label
        ),
    }
}

/// The refresher thread: wait until due, then try to refresh (or let the process holding the
/// claim do it). Ends at logout / finalize.
fn refresher(cfg: &Config, token_index: usize, store: &SharedStore, stop: &StopSignal) {
    let poll = Duration::from_millis((terms(cfg).refresh_ms / 20).clamp(50, 5000));
    loop {
        if stop.is_stopped() {
            return;
        }
        let now = now_ms();
        let due = store.next_refresh_ms();
        if due > now {
            if stop.wait(Duration::from_millis(due - now).min(poll)) {
                return;
            }
            continue;
        }
        let ran = refresh(cfg, token_index, store);
        if !ran && stop.wait(poll) {
            return;
        }
    }
}

/// Refresh now if due, inline (threads forbidden).
pub(crate) fn refresh_inline_if_due(inst: &Instance, t: &Token) {
    if t.has_refresher() {
        return;
    }
    if let Some(store) = t.store() {
        // 0: not scheduled yet. The login that created the store schedules the first refresh
        // after installing its keys; a lookup from a session that joined that login may run
        // in between and must not refresh a release a few milliseconds old.
        let due = store.next_refresh_ms();
        if due != 0 && due <= now_ms() {
            refresh(&inst.module.config, t.index, &store);
        }
    }
}

/// A lookup found a certificate file that names a key nobody has released yet: refresh now
/// (or wait for the process already refreshing), so that an application reloading its
/// configuration after a rotation finds the new version.
pub(crate) fn refresh_for_rotation(inst: &Instance, t: &Token) {
    if let Some(store) = t.store() {
        refresh_now(&inst.module.config, t.index, &store);
    }
}

/// A process of the tree logs in from the keys it inherited: take the tree's newer keys from
/// the store if a refresh ran since the fork, and refresh now if the certificate files (read
/// at this C_Initialize) name a version the tree does not have yet — an application
/// re-initialising to reload its configuration after a rotation (nginx's master after
/// `nginx -s reload`) finds the new version, not a mismatch.
pub(crate) fn inherited_keys(inst: &Instance, t: &Token, m: Arc<Material>) -> Arc<Material> {
    let Some(store) = m.store.clone() else {
        return m;
    };
    let tcfg = &inst.module.config.tokens[t.index];
    let current = |m: Arc<Material>| -> Arc<Material> {
        if store.generation() == m.generation {
            return m;
        }
        match Material::from_store(tcfg, store.clone()) {
            Ok(newer) => Arc::new(newer),
            Err(_) => m,
        }
    };
    let m = current(m);
    if t.certificates_match(&m) {
        return m;
    }
    log::info!(
        "token {:?}: a certificate file names a key version this process tree has not released yet: refreshing now",
        t.config.label
    );
    refresh_now(&inst.module.config, t.index, &store);
    current(m)
}

/// Refresh now, or wait for the process that holds the claim to publish (bounded).
fn refresh_now(cfg: &Config, token_index: usize, store: &SharedStore) {
    let before = store.generation();
    store.set_next_refresh_ms(0);
    if refresh(cfg, token_index, store) {
        return;
    }
    // Another process holds the claim: wait for its publish, bounded by its claim time.
    let deadline = std::time::Instant::now() + Duration::from_secs(claim_hold_seconds(cfg));
    let signal = StopSignal::default();
    while store.generation() == before && std::time::Instant::now() < deadline {
        signal.wait(Duration::from_millis(20));
        if refresh(cfg, token_index, store) {
            return;
        }
    }
}

/// Whether `kc`'s certificate file names the key of `material` (None: no certificate, or it
/// cannot be read or parsed now; the caller then takes the release as it is).
fn certificate_names(kc: &KeyConfig, material: &LeaseState) -> Option<bool> {
    let path = kc.certificate.as_ref()?;
    let LeaseState::Live(KeyMaterial::Pkcs8(der)) = material else {
        return None;
    };
    let pem = crate::config::read_named_file(path).ok()?;
    let leaf = CertInfo::chain_from_pem(&pem).ok()?.into_iter().next()?;
    let key = AsymKey::from_pkcs8(der.as_slice()).ok()?;
    Some(key.info.spki_der == AsymKey::from_spki(&leaf.spki).ok()?.info.spki_der)
}

/// The vault rotated a key whose certificate file still names the previous version (an
/// automatic rotation policy, or a certificate not replaced yet): renew the version the
/// certificate names instead, by its versioned kid, so that the server keeps a lease on the
/// key it presents and is not wiped at `max_age`. The new version is taken once the
/// certificate file names it (the next refresh, or a lookup that finds the new certificate).
fn keep_versions_certificates_name(
    cfg: &Config,
    tcfg: &TokenConfig,
    old: &[LeasedKey],
    merged: &mut [LeasedKey],
    now: u64,
) {
    for entry in merged.iter_mut() {
        let kc = &tcfg.keys[entry.index];
        if crate::release::akv::key_version(&kc.kid).is_some() {
            continue; // pinned: the configured version is what was released
        }
        let Some(prev) = old.iter().find(|o| o.index == entry.index && o.is_live()) else {
            continue;
        };
        if prev.version == entry.version || prev.version.is_empty() {
            continue;
        }
        if certificate_names(kc, &entry.state) != Some(false)
            || certificate_names(kc, &prev.state) != Some(true)
        {
            continue;
        }
        let mut pinned = kc.clone();
        pinned.kid = format!("{}/{}", kc.kid.trim_end_matches('/'), prev.version);
        let one = TokenConfig {
            keys: vec![pinned],
            ..tcfg.clone()
        };
        match release::release_token_each(cfg, &one) {
            Ok((mut each, _)) => match each.pop() {
                Some((_, Ok(mut k))) => {
                    log::warn!(
                        "key {:?}: the vault's current version is {} but {} still names version {}: renewed {} (replace the certificate to move to {})",
                        kc.label,
                        entry.version,
                        kc.certificate.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                        prev.version,
                        prev.version,
                        entry.version
                    );
                    k.index = entry.index;
                    *entry = LeasedKey::from_released(k, now);
                }
                Some((_, Err(e))) => log::warn!(
                    "key {:?}: cannot renew version {} that its certificate names ({e}); publishing the vault's current version {}",
                    kc.label,
                    prev.version,
                    entry.version
                ),
                None => {}
            },
            Err(e) => log::warn!(
                "key {:?}: cannot renew version {} that its certificate names ({e})",
                kc.label,
                prev.version
            ),
        }
    }
}

fn failure_class(kind: ErrorKind) -> FailureClass {
    match kind {
        ErrorKind::Service => FailureClass::Service,
        ErrorKind::Rejected => FailureClass::Rejected,
        ErrorKind::Device => FailureClass::Device,
        ErrorKind::Integrity => FailureClass::Integrity,
        _ => FailureClass::Other,
    }
}

/// One refresh of the token's keys by this process, if it wins the claim. Returns whether it
/// ran (false: another process is refreshing, or nothing was due any more).
pub(crate) fn refresh(cfg: &Config, token_index: usize, store: &SharedStore) -> bool {
    let me = std::process::id();
    let now_s = now_ms() / 1000;
    if !store.try_claim(me, now_s, now_s + claim_hold_seconds(cfg)) {
        return false;
    }
    // Another process may have refreshed between our look and our claim.
    if store.next_refresh_ms() > now_ms() {
        store.release_claim(me);
        return false;
    }
    let tcfg = &cfg.tokens[token_index];
    let terms = terms(cfg);
    let old = store
        .read()
        .and_then(|(_, bytes)| lease::decode(bytes.as_slice()))
        .unwrap_or_default();
    let result = release::release_token_each(cfg, tcfg);
    let now = now_ms();
    // Keep serving what we had, unless its lease is over.
    let carry = |i: usize| -> Option<LeasedKey> {
        let mut k = old.iter().find(|k| k.index == i)?.duplicate();
        if k.is_live() && terms.expires_at(k.released_at_ms) <= now {
            k.state = LeaseState::Expired;
        }
        Some(k)
    };
    let mut merged = Vec::with_capacity(tcfg.keys.len());
    let mut transient: Option<FailureClass> = None;
    let mut revoked = 0;
    match result {
        Ok((each, _)) => {
            for (i, r) in each {
                let label = &tcfg.keys[i].label;
                match r {
                    Ok(k) => {
                        let previous = old
                            .iter()
                            .find(|o| o.index == i)
                            .map(|o| o.version.as_str());
                        if previous.is_some_and(|p| p != k.version) {
                            log::info!(
                                "key {label:?}: refreshed to version {} (was {})",
                                k.version,
                                previous.unwrap_or("")
                            );
                        }
                        merged.push(LeasedKey::from_released(k, now));
                    }
                    Err(e)
                        if e.kind() == ErrorKind::Rejected && e.step() == Some(Step::Release) =>
                    {
                        log::error!("key {label:?}: refresh refused, revoking the key in every process of this tree: {e}");
                        revoked += 1;
                        merged.push(LeasedKey {
                            index: i,
                            version: old
                                .iter()
                                .find(|o| o.index == i)
                                .map(|o| o.version.clone())
                                .unwrap_or_default(),
                            released_at_ms: now,
                            state: LeaseState::Revoked,
                        });
                    }
                    Err(e) => {
                        log::warn!("key {label:?}: refresh failed, serving the current release until its lease ends: {e}");
                        transient = Some(failure_class(e.kind()));
                        merged.extend(carry(i));
                    }
                }
            }
        }
        Err(e) => {
            log::warn!(
                "token {:?}: refresh failed before any key, serving the current releases until their leases end: {e}",
                tcfg.label
            );
            transient = Some(failure_class(e.kind()));
            merged.extend((0..tcfg.keys.len()).filter_map(carry));
        }
    }
    keep_versions_certificates_name(cfg, tcfg, &old, &mut merged, now);
    let record = lease::encode(&merged);
    if store.publish(record.as_slice()).is_none() {
        log::error!(
            "token {:?}: the refreshed keys do not fit the shared store ({} bytes, room for {}); processes keep their current keys",
            tcfg.label,
            record.len(),
            store.capacity()
        );
    }
    let next = match transient {
        None => {
            store.note_success(me, now);
            if revoked > 0 {
                store.note_failure(FailureClass::Rejected, now);
            }
            terms.next_refresh(now, random_u64())
        }
        Some(class) => {
            let failures = store.note_failure(class, now);
            terms.retry_after(now, failures, cfg.release.backoff_ms, random_u64())
        }
    };
    store.set_next_refresh_ms(next);
    if let Some(path) = &cfg.release.status_file {
        if let Err(e) = super::status::write_status_file(path, cfg, token_index, store) {
            log::warn!("status file {}: {e}", path.display());
        }
    }
    store.release_claim(me);
    true
}
