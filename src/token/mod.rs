//! Slots, tokens, sessions, login state and objects: pure state, no I/O. The C boundary
//! (`ffi`) reads files and runs the release; this module only holds what they produced.
//!
//! Locks: the session map and each token's login state are held only for bookkeeping, never
//! across the release or a crypto operation; each session has its own lock, held while an
//! operation on it runs. A poisoned lock (a panic inside a call) is recovered, never fatal.

#![forbid(unsafe_code)]

pub mod attr;
pub mod factory;
pub mod material;
pub mod object;
pub mod released;
pub mod session;

use crate::config::{Config, TokenConfig};
use crate::crypto::ops::AsymKey;
use crate::error::{Error, Result, Step};
use crate::secret::SecretBytes;
pub use crate::sync::{lock, lock_bounded, read, write};
use cryptoki_sys::*;
use object::{new_object_handle, Body, CertInfo, Object};
use released::{KeyMaterial, ReleasedKey};
use session::Session;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

static NEXT_SESSION_HANDLE: AtomicU64 = AtomicU64::new(1);

/// A released key after parsing: the AWS-LC key (in the locked arena) or the raw AES key.
pub enum ParsedKey {
    Asym(Arc<AsymKey>),
    Secret(Arc<SecretBytes>),
}

/// The released keys of one token, by configured key index.
pub struct Material {
    pub keys: Vec<(usize, ParsedKey)>,
}

impl Material {
    /// Parse what the release returned; every configured key must be there.
    pub fn from_released(token: &TokenConfig, released: Vec<ReleasedKey>) -> Result<Material> {
        let mut keys = Vec::with_capacity(released.len());
        for r in released {
            let cfg = token.keys.get(r.index).ok_or_else(|| {
                Error::integrity(
                    Step::Install,
                    format!("released key index {} is not configured", r.index),
                )
            })?;
            let parsed = match r.material {
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
                    ParsedKey::Asym(Arc::new(k))
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
                    ParsedKey::Secret(Arc::new(bytes))
                }
            };
            keys.push((r.index, parsed));
        }
        for (i, k) in token.keys.iter().enumerate() {
            if !keys.iter().any(|(j, _)| *j == i) {
                return Err(Error::integrity(
                    Step::Install,
                    format!("key {:?} was not released", k.label),
                ));
            }
        }
        Ok(Material { keys })
    }

    /// Re-lock the raw key pages in a forked child (mlock is not inherited).
    pub fn relock(&self) {
        for (_, k) in &self.keys {
            if let ParsedKey::Secret(s) = k {
                s.relock();
            }
        }
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
    /// Certificates and, for keys with a certificate, the public key from it.
    public_objects: Vec<Arc<Object>>,
    login: Mutex<LoginState>,
    login_done: Condvar,
    /// Bumped by every login and logout; operations remember it.
    epoch: AtomicU64,
    /// `login.keys.is_some()`, written under the login lock with `keys`, read without it:
    /// every C_Sign / C_Encrypt asks, and taking the token's mutex for it made the two
    /// sessions of one token contend on every call.
    logged_in: AtomicBool,
    /// Session objects (CKA_TOKEN = FALSE) of every session of this token, by handle.
    session_objects: RwLock<HashMap<CK_OBJECT_HANDLE, Arc<Object>>>,
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
        let outcome = match result.and_then(|m| token.build_keyset(m)) {
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
                    retain(&token.config.label, ks.material.clone());
                    st.keys = Some(Arc::new(ks));
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
    fn new(index: usize, config: TokenConfig, pems: &HashMap<PathBuf, Vec<u8>>) -> Result<Token> {
        let mut public_objects: Vec<Arc<Object>> = Vec::new();
        let mut chain_seen: Vec<Vec<u8>> = Vec::new();
        for (ki, k) in config.keys.iter().enumerate() {
            let id = k.id_bytes()?;
            let Some(path) = &k.certificate else { continue };
            let pem = pems.get(path).ok_or_else(|| {
                Error::config(format!(
                    "key {:?}: certificate {} not loaded",
                    k.label,
                    path.display()
                ))
            })?;
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
            public_objects.push(Arc::new(Object {
                handle: new_object_handle(),
                id: id.clone(),
                label: k.label.clone(),
                key_index: Some(ki),
                subject: leaf.subject.clone(),
                body: Body::PublicKey(Arc::new(public)),
                stored: None,
            }));
            public_objects.push(Arc::new(Object {
                handle: new_object_handle(),
                id: id.clone(),
                label: k.label.clone(),
                key_index: Some(ki),
                subject: leaf.subject.clone(),
                body: Body::Certificate(leaf),
                stored: None,
            }));
            // Chain certificates once per token, each with its own CKA_ID (SHA-1 of its
            // SubjectPublicKeyInfo, the usual key identifier) so pairing by the key's id finds
            // only the leaf.
            for (n, c) in chain.into_iter().enumerate().skip(1) {
                if chain_seen.contains(&c.der) {
                    continue;
                }
                chain_seen.push(c.der.clone());
                public_objects.push(Arc::new(Object {
                    handle: new_object_handle(),
                    id: crate::crypto::HashAlg::Sha1.digest(&c.spki),
                    label: format!("{} chain {n}", k.label),
                    key_index: None,
                    subject: c.subject.clone(),
                    body: Body::Certificate(c),
                    stored: None,
                }));
            }
        }
        Ok(Token {
            index,
            slot_id: index as CK_SLOT_ID + 1,
            config,
            public_objects,
            login: Mutex::new(LoginState {
                keys: None,
                closed: false,
                in_flight: false,
                attempt: 0,
                joiners: 0,
                outcome: None,
            }),
            login_done: Condvar::new(),
            epoch: AtomicU64::new(1),
            logged_in: AtomicBool::new(false),
            session_objects: RwLock::new(HashMap::new()),
        })
    }

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

    /// Objects for released material: private (and secret) keys with fresh handles, and the
    /// public keys taken from the released keys (keeping the handle of the certificate-derived
    /// public key object where there is one). A released key that does not match its
    /// configured certificate fails the login (integrity).
    fn build_keyset(&self, material: Arc<Material>) -> Result<KeySet> {
        let mut objects = Vec::new();
        for (ki, parsed) in &material.keys {
            let k = &self.config.keys[*ki];
            let id = k.id_bytes()?;
            let cert_pub = self
                .public_objects
                .iter()
                .find(|o| o.key_index == Some(*ki) && matches!(o.body, Body::PublicKey(_)));
            let subject = cert_pub.map(|o| o.subject.clone()).unwrap_or_default();
            match parsed {
                ParsedKey::Asym(key) => {
                    // A key served next to a certificate it does not match breaks every TLS
                    // handshake in a way clients report as a bad signature: refuse the login
                    // instead (the released material is wiped when `material` drops).
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
                                    "key {:?}: the key released from {} does not match its certificate {cert} (different public keys)",
                                    k.label, k.kid
                                ),
                            )
                            .with_hint("configure the certificate issued for this key version (after a rotation, replace the certificate file too)"));
                        }
                    }
                    objects.push(Arc::new(Object {
                        handle: new_object_handle(),
                        id: id.clone(),
                        label: k.label.clone(),
                        key_index: Some(*ki),
                        subject: subject.clone(),
                        body: Body::PrivateKey {
                            key: key.clone(),
                            allow_rsa_pkcs_decrypt: k.allow_rsa_pkcs_decrypt,
                        },
                        stored: None,
                    }));
                    // A public-only key: operations on the public object never hold the
                    // private key, so a logout wipes it even while such an operation runs.
                    let public = Arc::new(AsymKey::from_spki(&key.info.spki_der).map_err(|e| {
                        Error::integrity(
                            Step::Install,
                            format!("key {:?}: public half unusable: {}", k.label, e.message()),
                        )
                    })?);
                    objects.push(Arc::new(Object {
                        handle: cert_pub.map(|o| o.handle).unwrap_or_else(new_object_handle),
                        id,
                        label: k.label.clone(),
                        key_index: Some(*ki),
                        subject,
                        body: Body::PublicKey(public),
                        stored: None,
                    }));
                }
                ParsedKey::Secret(s) => objects.push(Arc::new(Object {
                    handle: new_object_handle(),
                    id,
                    label: k.label.clone(),
                    key_index: Some(*ki),
                    subject,
                    body: Body::SecretKey(s.clone()),
                    stored: None,
                })),
            }
        }
        Ok(KeySet { objects, material })
    }

    /// Drop the released keys of this token (logout, last session closed, C_Finalize).
    /// Returns whether the token was logged in.
    fn wipe(&self) -> bool {
        let old = {
            let mut st = lock(&self.login);
            let old = st.keys.take();
            self.logged_in.store(false, Ordering::SeqCst);
            if old.is_some() {
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
            old
        };
        forget(&self.config.label);
        old.is_some()
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
        let keys = lock(&self.login).keys.clone();
        match keys {
            None => self.public_objects.clone(),
            Some(ks) => {
                let mut v: Vec<Arc<Object>> = self
                    .public_objects
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
        self.public_objects.iter().any(|o| o.handle == handle)
    }

    pub fn object(&self, handle: CK_OBJECT_HANDLE) -> Result<Arc<Object>> {
        // What `visible_objects` would find, without building and sorting that list on every
        // C_*Init: a logged-in key object shadows the public object of the same handle.
        let found = {
            let st = lock(&self.login);
            st.keys
                .as_ref()
                .and_then(|ks| ks.objects.iter().find(|o| o.handle == handle).cloned())
        };
        found
            .or_else(|| {
                self.public_objects
                    .iter()
                    .find(|o| o.handle == handle)
                    .cloned()
            })
            .or_else(|| {
                read(&self.session_objects)
                    .get(&handle)
                    .filter(|o| !o.is_private() || self.is_logged_in())
                    .cloned()
            })
            .ok_or_else(|| {
                Error::new(
                    CKR_OBJECT_HANDLE_INVALID,
                    format!("object handle {handle} is not valid in this session"),
                )
            })
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

#[repr(align(64))]
struct SessionShard(RwLock<HashMap<CK_SESSION_HANDLE, Arc<SessionEntry>>>);

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
        let tokens = config
            .tokens
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, t)| Token::new(i, t, pems))
            .collect::<Result<Vec<_>>>()?;
        Ok(Module {
            config,
            tokens,
            sessions: std::array::from_fn(|_| SessionShard(RwLock::new(HashMap::new()))),
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

    fn shard(
        &self,
        h: CK_SESSION_HANDLE,
    ) -> &RwLock<HashMap<CK_SESSION_HANDLE, Arc<SessionEntry>>> {
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
