//! Slots, tokens, sessions, login state and objects: pure state, no I/O. The C boundary
//! (`ffi`) reads files and runs the release; this module only holds what they produced.
//!
//! Locks: the session map and each token's login state are held only for bookkeeping, never
//! across the release or a crypto operation; each session has its own lock, held while an
//! operation on it runs. A poisoned lock (a panic inside a call) is recovered, never fatal.

#![forbid(unsafe_code)]

pub mod attr;
pub mod factory;
pub mod lease;
pub mod material;
pub mod object;
pub mod released;
mod rotation;
pub use rotation::{Follow, FollowOutcome};
pub mod session;

use crate::config::{Config, TokenConfig};
use crate::crypto::ops::AsymKey;
use crate::error::{Error, Result, Step};
use crate::secret::shared::SharedStore;
use crate::secret::SecretBytes;
pub use crate::sync::{lock, lock_bounded, read, write};
use cryptoki_sys::*;
use lease::{LeaseState, LeasedKey};
use object::{new_object_handle, Body, CertInfo, Object};
use released::{KeyMaterial, ReleasedKey};
use session::Session;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

static NEXT_SESSION_HANDLE: AtomicU64 = AtomicU64::new(1);

/// A released key after parsing: the AWS-LC key (in the locked arena) or the raw AES key.
#[derive(Clone)]
pub enum ParsedKey {
    Asym(Arc<AsymKey>),
    Secret(Arc<SecretBytes>),
}

/// One key this process serves: which configured key, which version, since when.
pub struct ServedKey {
    pub index: usize,
    pub version: String,
    /// Unix milliseconds of the release it came from (its lease runs from here).
    pub released_at_ms: u64,
    pub parsed: ParsedKey,
}

/// The released keys of one token, and the process tree's store they were published to.
pub struct Material {
    pub keys: Vec<ServedKey>,
    /// The tree's store (`secret::shared`): None only if the kernel refused the mapping.
    pub store: Option<Arc<SharedStore>>,
    /// The store generation these keys were read from or published as.
    pub generation: u64,
}

/// Store room per key: a PKCS#8 RSA-4096 key is about 2.4 KiB, so a rotation to a larger
/// key type still fits.
const STORE_BYTES_PER_KEY: usize = 8 * 1024;

/// Parse one key's released material.
fn parse_key(cfg: &crate::config::KeyConfig, material: &KeyMaterial) -> Result<ParsedKey> {
    match material {
        KeyMaterial::Pkcs8(der) => {
            let k = AsymKey::from_pkcs8(der.as_slice()).map_err(|e| {
                Error::integrity(
                    Step::Install,
                    format!(
                        "key {:?}: released key unusable: {}",
                        cfg.label,
                        e.message()
                    ),
                )
            })?;
            Ok(ParsedKey::Asym(Arc::new(k)))
        }
        KeyMaterial::Raw(bytes) => {
            if ![16, 24, 32].contains(&bytes.len()) {
                return Err(Error::integrity(
                    Step::Install,
                    format!(
                        "key {:?}: released symmetric key of {} bytes is not AES",
                        cfg.label,
                        bytes.len()
                    ),
                ));
            }
            Ok(ParsedKey::Secret(Arc::new(SecretBytes::from_slice(
                bytes.as_slice(),
            ))))
        }
    }
}

impl Material {
    /// Parse what a login's release returned (every configured key must be there) and
    /// publish it in a new store for this process and the children it forks.
    pub fn from_released(token: &TokenConfig, released: Vec<ReleasedKey>) -> Result<Material> {
        let now = lease::now_ms();
        let leased: Vec<LeasedKey> = released
            .into_iter()
            .map(|r| LeasedKey::from_released(r, now))
            .collect();
        for l in &leased {
            if token.keys.get(l.index).is_none() {
                return Err(Error::integrity(
                    Step::Install,
                    format!("released key index {} is not configured", l.index),
                ));
            }
        }
        for (i, k) in token.keys.iter().enumerate() {
            if !leased.iter().any(|l| l.index == i) {
                return Err(Error::integrity(
                    Step::Install,
                    format!("key {:?} was not released", k.label),
                ));
            }
        }
        let mut keys = Vec::with_capacity(leased.len());
        for l in &leased {
            if let LeaseState::Live(m) = &l.state {
                keys.push(ServedKey {
                    index: l.index,
                    version: l.version.clone(),
                    released_at_ms: l.released_at_ms,
                    parsed: parse_key(&token.keys[l.index], m)?,
                });
            }
        }
        let record = lease::encode(&leased);
        let capacity = (token.keys.len() * STORE_BYTES_PER_KEY).max(record.len());
        let (store, generation) = match SharedStore::create(capacity) {
            Some(store) => {
                let g = store.publish(record.as_slice()).unwrap_or(0);
                (Some(Arc::new(store)), g)
            }
            None => {
                log::warn!(
                    "token {:?}: cannot map the shared key store ({}); keys are not shared with forked children and rotate per process",
                    token.label,
                    std::io::Error::last_os_error()
                );
                (None, 0)
            }
        };
        Ok(Material {
            keys,
            store,
            generation,
        })
    }

    /// Re-lock the raw key pages and the shared store in a forked child (mlock is not
    /// inherited).
    pub fn relock(&self) {
        for k in &self.keys {
            if let ParsedKey::Secret(s) = &k.parsed {
                s.relock();
            }
        }
        if let Some(s) = &self.store {
            s.relock();
        }
    }

    /// The tree's current keys, read from its store (every configured key must be live).
    pub fn from_store(token: &TokenConfig, store: Arc<SharedStore>) -> Result<Material> {
        let unreadable = || {
            Error::integrity(
                Step::Install,
                "the shared key store holds no readable record",
            )
        };
        let (generation, bytes) = store.read().ok_or_else(unreadable)?;
        let leased = lease::decode(bytes.as_slice()).ok_or_else(unreadable)?;
        let mut keys = Vec::with_capacity(token.keys.len());
        for (i, k) in token.keys.iter().enumerate() {
            match leased.iter().find(|l| l.index == i).map(|l| (l, &l.state)) {
                Some((l, LeaseState::Live(m))) => keys.push(ServedKey {
                    index: i,
                    version: l.version.clone(),
                    released_at_ms: l.released_at_ms,
                    parsed: parse_key(k, m)?,
                }),
                Some((l, _)) => {
                    return Err(Error::denied(
                        Step::Release,
                        format!("key {:?}: {} in this process tree", k.label, l.state.name()),
                    ))
                }
                None => {
                    return Err(Error::integrity(
                        Step::Install,
                        format!("key {:?} is not in the shared key store", k.label),
                    ))
                }
            }
        }
        Ok(Material {
            keys,
            store: Some(store),
            generation,
        })
    }

    pub fn served(&self, index: usize) -> Option<&ServedKey> {
        self.keys.iter().find(|k| k.index == index)
    }
}

/// Released keys kept for the process tree (fork = "keep"): a child that re-initialises logs
/// in from here without a second release. Keyed by token label.
/// (token label, its released keys).
type RetainedList = Vec<(String, Arc<Material>)>;
static RETAINED: Mutex<RetainedList> = Mutex::new(Vec::new());
/// Held only for list bookkeeping; the bound matters only in a forked child whose parent had
/// a thread inside at the moment of fork (then the child behaves as if nothing was retained).
const RETAINED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn retained_list() -> Option<MutexGuard<'static, RetainedList>> {
    lock_bounded(&RETAINED, RETAINED_WAIT)
}

pub fn retained(label: &str) -> Option<Arc<Material>> {
    retained_list()?
        .iter()
        .find(|(l, _)| l == label)
        .map(|(_, m)| m.clone())
}
fn retain(label: &str, m: Arc<Material>) {
    if let Some(mut r) = retained_list() {
        r.retain(|(l, _)| l != label);
        r.push((label.to_string(), m));
    }
}
fn forget(label: &str) {
    // Drop outside the lock: freeing keys zeroes their memory.
    let gone: Vec<_> = match retained_list() {
        Some(mut r) => {
            let (gone, keep) = r.drain(..).partition(|(l, _)| l == label);
            *r = keep;
            gone
        }
        None => vec![],
    };
    drop(gone);
}
/// Wipe every retained key (C_Finalize in the process that released them, fork =
/// "re-release" in a child).
pub fn forget_all_retained() {
    let gone: Vec<_> = retained_list()
        .map(|mut r| r.drain(..).collect())
        .unwrap_or_default();
    drop(gone);
}
/// A forked child keeps the inherited keys: lock their pages again.
pub fn relock_retained() {
    if let Some(r) = retained_list() {
        for (_, m) in r.iter() {
            m.relock();
        }
    }
    crate::secret::arena::relock_after_fork();
}

/// The objects a login adds.
pub struct KeySet {
    pub objects: Vec<Arc<Object>>,
    pub material: Arc<Material>,
}

struct LoginState {
    keys: Option<Arc<KeySet>>,
    /// Certificates and, for keys with a certificate, the public key from it (replaced when
    /// a certificate file changes with a key rotation).
    public: Arc<Vec<Arc<Object>>>,
    /// Stops this process's background refresher of the token.
    refresher: Option<Arc<lease::StopSignal>>,
    /// The module was finalised: no login may install keys any more.
    closed: bool,
    in_flight: bool,
    attempt: u64,
    /// Callers waiting for the attempt in flight (tests wait on it instead of sleeping).
    joiners: usize,
    /// Result of the last finished attempt, for callers that joined it.
    outcome: Option<(u64, std::result::Result<(), Error>)>,
}

pub struct Token {
    pub index: usize,
    pub slot_id: CK_SLOT_ID,
    pub config: TokenConfig,
    login: Mutex<LoginState>,
    /// Key rotation bookkeeping (`rotation.rs`): one import at a time, certificate files.
    rotation: Mutex<rotation::RotationState>,
    /// Lease timing from `[release]`.
    pub terms: lease::LeaseTerms,
    /// When an operation next looks at the store (`rotation.rs`).
    next_follow_ms: AtomicU64,
    /// (key index, class, handle) of the released keys' objects, until logout.
    key_handles: Mutex<Vec<(usize, CK_OBJECT_CLASS, CK_OBJECT_HANDLE)>>,
    login_done: Condvar,
    /// Bumped by every login and logout; operations remember it.
    epoch: AtomicU64,
    /// `login.keys.is_some()`, written under the login lock with `keys`, read without it:
    /// every C_Sign / C_Encrypt asks, and taking the token's mutex for it made the two
    /// sessions of one token contend on every call.
    logged_in: AtomicBool,
    /// Session objects (CKA_TOKEN = FALSE) of every session of this token, by handle.
    session_objects: RwLock<HandleMap<Arc<Object>>>,
    /// `login.keys` and `login.public` as one snapshot, republished under the login lock
    /// whenever either changes. Every C_*Init looks its key up here: arc-swap's load takes
    /// no lock and writes no shared reference count, so threads using one key do not contend
    /// on the token (with the mutex and an `Arc<Object>` clone per lookup, two threads ran
    /// AES-GCM at 1.1× one).
    visible: arc_swap::ArcSwap<Visible>,
}

/// What object handles name when looked up (see `Token::visible`).
struct Visible {
    keys: Option<Arc<KeySet>>,
    public: Arc<Vec<Arc<Object>>>,
}

impl Visible {
    fn of(st: &LoginState) -> Arc<Visible> {
        Arc::new(Visible {
            keys: st.keys.clone(),
            public: st.public.clone(),
        })
    }

    /// A logged-in key object shadows the public object of the same handle.
    fn find(&self, handle: CK_OBJECT_HANDLE) -> Option<&Arc<Object>> {
        self.keys
            .as_ref()
            .and_then(|ks| ks.objects.iter().find(|o| o.handle == handle))
            .or_else(|| self.public.iter().find(|o| o.handle == handle))
    }
}

/// How a C_Login call proceeds.
pub enum LoginStart<'a> {
    AlreadyLoggedIn,
    /// This caller runs the release and must `finish` the lease.
    Lead(LoginLease<'a>),
    /// Another caller's release finished while this one waited: its result.
    Joined(Result<()>),
}

/// The right and duty to finish one login attempt. Dropped unfinished (a panic), it ends
/// the attempt with an error so waiting callers never hang.
pub struct LoginLease<'a> {
    token: &'a Token,
    attempt: u64,
    done: bool,
}

impl LoginLease<'_> {
    /// Install the keys (one short write) or record the failure; wake the joined callers.
    pub fn finish(mut self, result: Result<Arc<Material>>) -> Result<()> {
        self.done = true;
        let token = self.token;
        let public = lock(&token.login).public.clone();
        let outcome = match result.and_then(|m| token.build_keyset(m, &public)) {
            Ok(ks) => {
                let mut st = lock(&token.login);
                if st.closed {
                    // C_Finalize ran while the release was in flight: the keys go nowhere.
                    drop(st);
                    drop(ks);
                    Err(Error::new(
                        CKR_CRYPTOKI_NOT_INITIALIZED,
                        "C_Finalize was called during the login",
                    ))
                } else {
                    if let Some(store) = &ks.material.store {
                        if !store.attach(std::process::id()) {
                            log::warn!("token {:?}: the shared key store lists too many processes; this one will not zero it when it is the last to leave", token.config.label);
                        }
                    }
                    retain(&token.config.label, ks.material.clone());
                    st.keys = Some(Arc::new(ks));
                    token.visible.store(Visible::of(&st));
                    token.logged_in.store(true, Ordering::SeqCst);
                    token.epoch.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        let mut st = lock(&token.login);
        st.in_flight = false;
        st.outcome = Some((self.attempt, outcome.clone()));
        drop(st);
        token.login_done.notify_all();
        outcome
    }
}

impl Drop for LoginLease<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut st = lock(&self.token.login);
            st.in_flight = false;
            st.outcome = Some((
                self.attempt,
                Err(Error::general("login attempt aborted").with_step(Step::Install)),
            ));
            drop(st);
            self.token.login_done.notify_all();
        }
    }
}

/// A fixed-size, space-padded text field of the PKCS#11 info structs (truncated at N bytes;
/// config validation keeps labels and serials within their fields).
pub fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let b = s.as_bytes();
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

impl Token {
    fn new(
        index: usize,
        config: TokenConfig,
        pems: &HashMap<PathBuf, Vec<u8>>,
        terms: lease::LeaseTerms,
    ) -> Result<Token> {
        let mut public_objects: Vec<Arc<Object>> = Vec::new();
        let mut cert_pems = vec![None; config.keys.len()];
        for (ki, k) in config.keys.iter().enumerate() {
            let Some(path) = &k.certificate else { continue };
            let pem = pems.get(path).ok_or_else(|| {
                Error::config(format!(
                    "key {:?}: certificate {} not loaded",
                    k.label,
                    path.display()
                ))
            })?;
            let objects = certificate_objects(&config, ki, pem, &[])?;
            public_objects.extend(objects);
            cert_pems[ki] = Some(pem.clone());
        }
        let login = LoginState {
            keys: None,
            public: Arc::new(dedupe_chains(public_objects)),
            refresher: None,
            closed: false,
            in_flight: false,
            attempt: 0,
            joiners: 0,
            outcome: None,
        };
        Ok(Token {
            index,
            slot_id: index as CK_SLOT_ID + 1,
            config,
            visible: arc_swap::ArcSwap::new(Visible::of(&login)),
            login: Mutex::new(login),
            rotation: Mutex::new(rotation::RotationState::new(cert_pems)),
            terms,
            next_follow_ms: AtomicU64::new(0),
            key_handles: Mutex::new(Vec::new()),
            login_done: Condvar::new(),
            epoch: AtomicU64::new(1),
            logged_in: AtomicBool::new(false),
            session_objects: RwLock::new(HandleMap::default()),
        })
    }
}

/// Chain certificates appear once per token (keys issued by one CA share them).
pub(crate) fn dedupe_chains(objects: Vec<Arc<Object>>) -> Vec<Arc<Object>> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    objects
        .into_iter()
        .filter(|o| match (&o.body, o.key_index) {
            (Body::Certificate(c), None) => {
                if seen.contains(&c.der) {
                    false
                } else {
                    seen.push(c.der.clone());
                    true
                }
            }
            _ => true,
        })
        .collect()
}

/// The objects of key `ki`'s certificate file: the public key from its leaf, the leaf and the
/// chain certificates. `previous` objects of the same key keep their handles (a certificate
/// replaced with a key rotation is the same object to a client that holds its handle).
pub(crate) fn certificate_objects(
    config: &TokenConfig,
    ki: usize,
    pem: &[u8],
    previous: &[Arc<Object>],
) -> Result<Vec<Arc<Object>>> {
    let k = &config.keys[ki];
    let id = k.id_bytes()?;
    let path = k.certificate.clone().unwrap_or_default();
    let mut handles = previous
        .iter()
        .filter(|o| o.key_index == Some(ki) || o.label.starts_with(&format!("{} chain ", k.label)))
        .map(|o| (o.class(), o.label.clone(), o.handle))
        .collect::<Vec<_>>();
    let mut handle_for = |class: CK_OBJECT_CLASS, label: &str| match handles
        .iter()
        .position(|(c, l, _)| *c == class && l == label)
    {
        Some(i) => handles.remove(i).2,
        None => new_object_handle(),
    };
    let mut out: Vec<Arc<Object>> = Vec::new();
    {
        {
            let chain = CertInfo::chain_from_pem(pem).map_err(|e| {
                Error::config(format!(
                    "key {:?}: certificate {}: {}",
                    k.label,
                    path.display(),
                    e.message()
                ))
            })?;
            let leaf = chain[0].clone();
            let public = AsymKey::from_spki(&leaf.spki).map_err(|e| {
                Error::config(format!(
                    "key {:?}: certificate {}: public key: {}",
                    k.label,
                    path.display(),
                    e.message()
                ))
            })?;
            out.push(Arc::new(Object {
                handle: handle_for(CKO_PUBLIC_KEY, &k.label),
                id: id.clone(),
                label: k.label.clone(),
                key_index: Some(ki),
                subject: leaf.subject.clone(),
                body: Body::PublicKey(Arc::new(public)),
                stored: None,
            }));
            out.push(Arc::new(Object {
                handle: handle_for(CKO_CERTIFICATE, &k.label),
                id: id.clone(),
                label: k.label.clone(),
                key_index: Some(ki),
                subject: leaf.subject.clone(),
                body: Body::Certificate(leaf),
                stored: None,
            }));
            // Chain certificates, each with its own CKA_ID (SHA-1 of its SubjectPublicKeyInfo,
            // the usual key identifier) so pairing by the key's id finds only the leaf.
            for (n, c) in chain.into_iter().enumerate().skip(1) {
                let label = format!("{} chain {n}", k.label);
                out.push(Arc::new(Object {
                    handle: handle_for(CKO_CERTIFICATE, &label),
                    id: crate::crypto::HashAlg::Sha1.digest(&c.spki),
                    label,
                    key_index: None,
                    subject: c.subject.clone(),
                    body: Body::Certificate(c),
                    stored: None,
                }));
            }
        }
    }
    Ok(out)
}

impl Token {
    /// CK_TOKEN_INFO.label: 32 bytes, space padded.
    pub fn label_field(&self) -> [u8; 32] {
        padded(&self.config.label)
    }

    /// CK_TOKEN_INFO.serialNumber: the configured serial, else 16 hex digits of the label's
    /// SHA-256 (stable across processes and re-initialisation).
    pub fn serial_field(&self) -> [u8; 16] {
        match &self.config.serial {
            Some(s) => padded(s),
            None => {
                let h = crate::crypto::HashAlg::Sha256.digest(self.config.label.as_bytes());
                padded(&hex::encode(&h[..8]))
            }
        }
    }

    pub fn is_logged_in(&self) -> bool {
        self.logged_in.load(Ordering::SeqCst)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Start a login: already logged in, lead the release, or wait for the one in flight.
    /// How many callers wait for the login in flight.
    #[cfg(test)]
    pub(crate) fn login_joiners(&self) -> usize {
        lock(&self.login).joiners
    }

    pub fn begin_login(&self) -> LoginStart<'_> {
        let mut st = lock(&self.login);
        if st.keys.is_some() {
            return LoginStart::AlreadyLoggedIn;
        }
        if st.in_flight {
            let waiting_for = st.attempt;
            st.joiners += 1;
            while st.in_flight && st.attempt == waiting_for {
                st = self.login_done.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.joiners -= 1;
            return match &st.outcome {
                Some((a, r)) if *a == waiting_for => LoginStart::Joined(r.clone()),
                _ => LoginStart::Joined(Err(Error::general("login attempt aborted"))),
            };
        }
        st.in_flight = true;
        st.attempt += 1;
        LoginStart::Lead(LoginLease {
            token: self,
            attempt: st.attempt,
            done: false,
        })
    }

    /// Objects for released material: private (and secret) keys, and the public keys taken
    /// from the released keys (keeping the handle of the certificate-derived public key object
    /// where there is one). A key's objects keep their handles for the life of the token, so a
    /// rotation is invisible to a client holding them. A released key that does not match its
    /// configured certificate fails (integrity).
    fn build_keyset(&self, material: Arc<Material>, public: &[Arc<Object>]) -> Result<KeySet> {
        let mut objects = Vec::new();
        // A key's objects keep their handles while the token is logged in: across rotations,
        // and across a revocation or an expiry and the release that brings the key back.
        let handle_of = |ki: usize, class: CK_OBJECT_CLASS| {
            let mut known = lock(&self.key_handles);
            match known.iter().find(|(i, c, _)| *i == ki && *c == class) {
                Some((_, _, h)) => *h,
                None => {
                    let h = new_object_handle();
                    known.push((ki, class, h));
                    h
                }
            }
        };
        for served in &material.keys {
            let ki = served.index;
            let k = &self.config.keys[ki];
            let id = k.id_bytes()?;
            let cert_pub = public
                .iter()
                .find(|o| o.key_index == Some(ki) && matches!(o.body, Body::PublicKey(_)));
            let subject = cert_pub.map(|o| o.subject.clone()).unwrap_or_default();
            match &served.parsed {
                ParsedKey::Asym(key) => {
                    // A key served next to a certificate it does not match breaks every TLS
                    // handshake in a way clients report as a bad signature: refuse instead
                    // (the released material is wiped when `material` drops).
                    if let Some(Body::PublicKey(cp)) = cert_pub.map(|o| &o.body) {
                        if cp.info != key.info {
                            let cert = k
                                .certificate
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default();
                            return Err(Error::integrity(
                                Step::Install,
                                format!(
                                    "key {:?}: the key released from {} (version {}) does not match its certificate {cert} (different public keys)",
                                    k.label, k.kid, served.version
                                ),
                            )
                            .with_hint("configure the certificate issued for this key version (after a rotation, replace the certificate file too)"));
                        }
                    }
                    objects.push(Arc::new(Object {
                        handle: handle_of(ki, CKO_PRIVATE_KEY),
                        id: id.clone(),
                        label: k.label.clone(),
                        key_index: Some(ki),
                        subject: subject.clone(),
                        body: Body::PrivateKey {
                            key: key.clone(),
                            allow_rsa_pkcs_decrypt: k.allow_rsa_pkcs_decrypt,
                        },
                        stored: None,
                    }));
                    // A public-only key: operations on the public object never hold the
                    // private key, so a logout wipes it even while such an operation runs.
                    let public_key =
                        Arc::new(AsymKey::from_spki(&key.info.spki_der).map_err(|e| {
                            Error::integrity(
                                Step::Install,
                                format!("key {:?}: public half unusable: {}", k.label, e.message()),
                            )
                        })?);
                    objects.push(Arc::new(Object {
                        handle: cert_pub
                            .map(|o| o.handle)
                            .unwrap_or_else(|| handle_of(ki, CKO_PUBLIC_KEY)),
                        id,
                        label: k.label.clone(),
                        key_index: Some(ki),
                        subject,
                        body: Body::PublicKey(public_key),
                        stored: None,
                    }));
                }
                ParsedKey::Secret(secret) => objects.push(Arc::new(Object {
                    handle: handle_of(ki, CKO_SECRET_KEY),
                    id,
                    label: k.label.clone(),
                    key_index: Some(ki),
                    subject,
                    body: Body::SecretKey(secret.clone()),
                    stored: None,
                })),
            }
        }
        Ok(KeySet { objects, material })
    }

    /// Drop the released keys of this token (logout, last session closed, C_Finalize).
    /// Returns whether the token was logged in.
    fn wipe(&self) -> bool {
        let (old, refresher) = {
            let mut st = lock(&self.login);
            let old = st.keys.take();
            self.visible.store(Visible::of(&st));
            self.logged_in.store(false, Ordering::SeqCst);
            if old.is_some() {
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
            (old, st.refresher.take())
        };
        if let Some(r) = refresher {
            r.stop();
        }
        // A new login gives new handles: a handle from before the logout never names a key
        // again.
        lock(&self.key_handles).clear();
        // This process no longer uses the tree's store; the last one out zeroes it.
        if let Some(store) = old.as_ref().and_then(|ks| ks.material.store.as_ref()) {
            if store.detach(std::process::id()) {
                store.wipe();
            }
        }
        forget(&self.config.label);
        old.is_some()
    }

    /// Whether every released asymmetric key of `m` matches the certificate configured for
    /// it (as read at C_Initialize).
    pub fn certificates_match(&self, m: &Material) -> bool {
        let public = lock(&self.login).public.clone();
        m.keys.iter().all(|k| {
            let cert_key = public.iter().find_map(|o| match (&o.body, o.key_index) {
                (Body::PublicKey(p), Some(i)) if i == k.index => Some(p.info.clone()),
                _ => None,
            });
            match (&k.parsed, cert_key) {
                (ParsedKey::Asym(key), Some(info)) => key.info == info,
                _ => true,
            }
        })
    }

    /// Keep the stop signal of this process's refresher for the token (ended by logout).
    pub fn set_refresher(&self, stop: Arc<lease::StopSignal>) {
        let mut st = lock(&self.login);
        if st.keys.is_some() {
            if let Some(old) = st.refresher.replace(stop) {
                old.stop();
            }
        } else {
            stop.stop();
        }
    }

    /// Whether a refresher runs for this token in this process.
    pub fn has_refresher(&self) -> bool {
        lock(&self.login).refresher.is_some()
    }

    /// The tree's store of this token's keys, while logged in.
    pub fn store(&self) -> Option<Arc<SharedStore>> {
        lock(&self.login)
            .keys
            .as_ref()
            .and_then(|ks| ks.material.store.clone())
    }

    /// Version, released-at and lease expiry of each key served now, by configured index.
    pub fn served_versions(&self) -> Vec<(usize, String, u64, u64)> {
        let keys = lock(&self.login).keys.clone();
        keys.map(|ks| {
            ks.material
                .keys
                .iter()
                .map(|k| {
                    (
                        k.index,
                        k.version.clone(),
                        k.released_at_ms,
                        self.terms.expires_at(k.released_at_ms),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// What a session of this token sees now.
    pub fn visible_objects(&self) -> Vec<Arc<Object>> {
        let mut v = self.token_objects();
        let logged_in = self.is_logged_in();
        v.extend(
            read(&self.session_objects)
                .values()
                .filter(|o| logged_in || !o.is_private())
                .cloned(),
        );
        v.sort_by_key(|o| o.handle);
        v
    }

    /// The configured and released objects visible now.
    fn token_objects(&self) -> Vec<Arc<Object>> {
        let (keys, public) = {
            let st = lock(&self.login);
            (st.keys.clone(), st.public.clone())
        };
        match keys {
            None => public.to_vec(),
            Some(ks) => {
                let mut v: Vec<Arc<Object>> = public
                    .iter()
                    .filter(|o| !ks.objects.iter().any(|k| k.handle == o.handle))
                    .cloned()
                    .collect();
                v.extend(ks.objects.iter().cloned());
                v.sort_by_key(|o| o.handle);
                v
            }
        }
    }

    /// Whether the handle names an object that exists logged in or not (certificates and
    /// certificate-backed public keys).
    pub fn is_permanent(&self, handle: CK_OBJECT_HANDLE) -> bool {
        self.visible
            .load()
            .public
            .iter()
            .any(|o| o.handle == handle)
    }

    pub fn object(&self, handle: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        self.with_object(handle, Arc::clone).ok_or_else(|| {
            Error::new(
                CKR_OBJECT_HANDLE_INVALID,
                format!("object handle {handle} is not valid in this session"),
            )
        })
    }

    /// `f` of the object a handle names, borrowed where it is (None: no such object). What
    /// `visible_objects` would find, without building and sorting that list, and for a token
    /// object without a lock or a reference-count write (see `visible`).
    pub fn with_object<R>(
        &self,
        handle: CK_OBJECT_HANDLE,
        f: impl FnOnce(&Arc<Object>) -> R,
    ) -> Option<R> {
        if let Some(o) = self.visible.load().find(handle) {
            return Some(f(o));
        }
        // A session object is cloned out, so that `f` never runs under the map's lock.
        let session_object = read(&self.session_objects)
            .get(&handle)
            .filter(|o| !o.is_private() || self.is_logged_in())
            .cloned();
        session_object.as_ref().map(f)
    }
}

impl Token {
    /// Add a session object; its handle is the object's.
    pub fn add_session_object(&self, o: Object) -> CK_OBJECT_HANDLE {
        let h = o.handle;
        write(&self.session_objects).insert(h, Arc::new(o));
        h
    }

    /// Replace a session object by a new version of it (C_SetAttributeValue): operations that
    /// started on the old version keep its key material.
    pub fn replace_session_object(&self, o: Object) -> Result<()> {
        let mut map = write(&self.session_objects);
        match map.get_mut(&o.handle) {
            Some(slot) => {
                let old = std::mem::replace(slot, Arc::new(o));
                drop(map);
                drop(old);
                Ok(())
            }
            None => Err(Error::new(
                CKR_OBJECT_HANDLE_INVALID,
                "the object was destroyed meanwhile",
            )),
        }
    }

    /// Destroy one session object.
    pub fn remove_session_object(&self, handle: CK_OBJECT_HANDLE) -> Result<()> {
        let gone = write(&self.session_objects).remove(&handle);
        match gone {
            Some(o) => {
                drop(o);
                Ok(())
            }
            None => Err(Error::new(
                CKR_OBJECT_HANDLE_INVALID,
                format!("object handle {handle} is not valid in this session"),
            )),
        }
    }

    /// Destroy the session objects `which` selects; their memory is wiped after the lock.
    fn drop_session_objects(&self, which: impl Fn(&Object) -> bool) {
        let gone: Vec<Arc<Object>> = {
            let mut map = write(&self.session_objects);
            let handles: Vec<_> = map
                .values()
                .filter(|o| which(o))
                .map(|o| o.handle)
                .collect();
            handles.iter().filter_map(|h| map.remove(h)).collect()
        };
        drop(gone);
    }

    /// How many session objects exist (tests, the memory checks).
    pub fn session_object_count(&self) -> usize {
        read(&self.session_objects).len()
    }
}

const SESSION_SHARDS: usize = 16;

/// A map keyed by session or object handles. The module makes the handles (consecutive
/// numbers) and callers only look them up, so the keys are not attacker-chosen and SipHash's
/// flooding resistance buys nothing; a multiply-and-fold hash is a fraction of its cost on
/// every call (2 % of an AES-GCM C_Encrypt). The fold brings the product's high bits down:
/// handles in one session shard share their low bits.
type HandleMap<V> = HashMap<CK_ULONG, V, BuildHasherDefault<HandleHasher>>;

#[derive(Default)]
struct HandleHasher(u64);

impl Hasher for HandleHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[repr(align(64))]
struct SessionShard(RwLock<HandleMap<Arc<SessionEntry>>>);

/// One initialisation of the module: its tokens and sessions.
pub struct Module {
    pub config: Arc<Config>,
    pub tokens: Vec<Token>,
    /// Looked up on every call: sharded by handle (consecutive handles land in different
    /// shards, each on a cache line of its own), so two threads working on their own sessions
    /// do not bounce one lock word between cores (11 % of a 2-thread AES-GCM profile with a
    /// single map).
    sessions: [SessionShard; SESSION_SHARDS],
    /// Serialises opening and closing (rare), so "the token's last session" is decided on a
    /// consistent view of all shards.
    membership: Mutex<()>,
}

/// An open session: its fixed facts readable without its lock, its state behind it.
/// Aligned (and so padded) to 128 bytes: two threads' sessions are separate allocations that
/// may sit side by side, and every call writes a session's reference count, lock word and
/// operation; sharing a cache line (or the pair the prefetcher fetches) would make each
/// thread's writes evict the other's.
#[repr(align(128))]
pub struct SessionEntry {
    pub handle: CK_SESSION_HANDLE,
    pub token: usize,
    pub rw: bool,
    state: Mutex<Session>,
}

impl SessionEntry {
    /// The session state. A lock poisoned by a panic inside a call is recovered with every
    /// operation of the session ended (their state may be half-updated).
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => {
                self.state.clear_poison();
                let mut g = p.into_inner();
                g.cancel_all();
                g
            }
        }
    }
}

impl Module {
    /// Build from the config and the certificate files it names (read by the caller).
    pub fn new(config: Arc<Config>, pems: &HashMap<PathBuf, Vec<u8>>) -> Result<Module> {
        let terms = lease::LeaseTerms {
            refresh_ms: config.release.refresh.as_millis(),
            max_age_ms: config.release.max_age.as_millis(),
        };
        let tokens = config
            .tokens
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, t)| Token::new(i, t, pems, terms))
            .collect::<Result<Vec<_>>>()?;
        Ok(Module {
            config,
            tokens,
            sessions: std::array::from_fn(|_| SessionShard(RwLock::new(HandleMap::default()))),
            membership: Mutex::new(()),
        })
    }

    pub fn slot_ids(&self) -> Vec<CK_SLOT_ID> {
        self.tokens.iter().map(|t| t.slot_id).collect()
    }

    pub fn token(&self, slot: CK_SLOT_ID) -> Result<&Token> {
        self.tokens
            .iter()
            .find(|t| t.slot_id == slot)
            .ok_or_else(|| Error::new(CKR_SLOT_ID_INVALID, format!("no slot {slot}")))
    }

    pub fn open_session(&self, slot: CK_SLOT_ID, flags: CK_FLAGS) -> Result<CK_SESSION_HANDLE> {
        let token = self.token(slot)?;
        if flags & CKF_SERIAL_SESSION == 0 {
            return Err(Error::new(
                CKR_SESSION_PARALLEL_NOT_SUPPORTED,
                "CKF_SERIAL_SESSION is required",
            ));
        }
        let h = NEXT_SESSION_HANDLE.fetch_add(1, Ordering::Relaxed) as CK_SESSION_HANDLE;
        let rw = flags & CKF_RW_SESSION != 0;
        let entry = SessionEntry {
            handle: h,
            token: token.index,
            rw,
            state: Mutex::new(Session::new(h, token.index, rw)),
        };
        let _m = lock(&self.membership);
        write(self.shard(h)).insert(h, Arc::new(entry));
        Ok(h)
    }

    fn shard(&self, h: CK_SESSION_HANDLE) -> &RwLock<HandleMap<Arc<SessionEntry>>> {
        &self.sessions[(h as usize) % SESSION_SHARDS].0
    }

    fn all_sessions(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions
            .iter()
            .flat_map(|s| read(&s.0).values().cloned().collect::<Vec<_>>())
            .collect()
    }

    pub fn session(&self, h: CK_SESSION_HANDLE) -> Result<Arc<SessionEntry>> {
        read(self.shard(h)).get(&h).cloned().ok_or_else(|| {
            Error::new(
                CKR_SESSION_HANDLE_INVALID,
                format!("session handle {h} is not open"),
            )
        })
    }

    /// A session and its token.
    pub fn session_token(&self, h: CK_SESSION_HANDLE) -> Result<(Arc<SessionEntry>, &Token)> {
        let s = self.session(h)?;
        let t = &self.tokens[s.token];
        Ok((s, t))
    }

    pub fn close_session(&self, h: CK_SESSION_HANDLE) -> Result<()> {
        let (token, last) = {
            let _m = lock(&self.membership);
            let s = write(self.shard(h)).remove(&h).ok_or_else(|| {
                Error::new(
                    CKR_SESSION_HANDLE_INVALID,
                    format!("session handle {h} is not open"),
                )
            })?;
            let t = s.token;
            let last = !self
                .sessions
                .iter()
                .any(|m| read(&m.0).values().any(|o| o.token == t));
            (t, last)
        };
        // Session objects die with the session that made them.
        self.tokens[token].drop_session_objects(|o| o.owner() == Some(h));
        if last {
            // PKCS#11: closing the last session of a token logs it out.
            self.tokens[token].wipe();
        }
        Ok(())
    }

    pub fn close_all(&self, slot: CK_SLOT_ID) -> Result<()> {
        let t = self.token(slot)?.index;
        {
            let _m = lock(&self.membership);
            for m in &self.sessions {
                write(&m.0).retain(|_, s| s.token != t);
            }
        }
        self.tokens[t].drop_session_objects(|_| true);
        self.tokens[t].wipe();
        Ok(())
    }

    /// (open sessions, read-write sessions) of a token.
    pub fn session_counts(&self, token: usize) -> (usize, usize) {
        let all = self.all_sessions();
        let mine: Vec<bool> = all
            .iter()
            .filter(|s| s.token == token)
            .map(|s| s.rw)
            .collect();
        (mine.len(), mine.iter().filter(|rw| **rw).count())
    }

    /// Log a token out: wipe its keys and end the operations that used them.
    pub fn logout(&self, token: usize) -> Result<()> {
        if !self.tokens[token].wipe() {
            return Err(Error::new(
                CKR_USER_NOT_LOGGED_IN,
                "the token is not logged in",
            ));
        }
        // Private session objects belong to the login: they go with it.
        self.tokens[token].drop_session_objects(|o| o.is_private());
        let sessions = self.all_sessions();
        for s in sessions.iter().filter(|s| s.token == token) {
            s.lock().end_private_operations();
        }
        Ok(())
    }

    /// Drop every session and wipe every token's keys (C_Finalize).
    pub fn wipe_all(&self) {
        {
            let _m = lock(&self.membership);
            for m in &self.sessions {
                write(&m.0).clear();
            }
        }
        for t in &self.tokens {
            lock(&t.login).closed = true;
            t.drop_session_objects(|_| true);
            t.wipe();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
