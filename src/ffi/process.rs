//! Process state and fork: the one place that decides what a process, and a forked child of
//! it, sees of the module.
//!
//! # State
//! Each `C_Initialize` makes one [`Instance`] (the token state plus the process and fork
//! generation it belongs to) and puts it in the state slot of the current fork generation.
//! Every call finds it through [`instance`], which answers from a per-thread cache that is
//! refreshed whenever `STATE_EPOCH` moves (any slot change bumps it).
//!
//! # Fork protocol
//! What a child **inherits**: a copy of every slot (with whatever locks the parent's threads
//! held at that instant), each thread-local cache of the forking thread, the retained keys
//! (`token::retained`, fork = "keep") with each token's **shared store** (`secret::shared`: the
//! one mapping the tree shares, where refreshes publish; docs/MODULE.md "Keys as leases"), the
//! locked arena's pages (not locked any more: mlock is not inherited), and `RETAINED_OWNER`
//! (the parent's pid). No refresher thread survives fork: the child starts its own at its
//! login, and takes part in the tree's refresh election from then on.
//!
//! How the child **notices**: `atfork_child` bumps `FORK_GENERATION`, so the child works in
//! the next slot and never waits on a lock held by a parent thread that does not exist in
//! it; the fork witness page (`MADV_WIPEONFORK`, [`fork_mark`]) reads zero in any child,
//! however it was made, so `Instance::forked` is a memory load on every call (pid compare
//! where the kernel lacks it). Every call in a child that has not re-initialised answers
//! CKR_CRYPTOKI_NOT_INITIALIZED.
//!
//! What the child **re-locks**: at its `C_Initialize` with fork = "keep", the retained keys'
//! pages, their shared store and every arena page (`token::relock_retained`,
//! `secret::arena::relock_after_fork`). At its login it takes the store's newer keys if a
//! refresh ran since the fork (`lease::inherited_keys`).
//!
//! What the child **wipes**: with fork = "re-release", the retained keys at its
//! `C_Initialize` (the next login releases afresh; the shared store is only unmapped, never
//! zeroed: the parent still serves from it); in any case the parent's states in the
//! other slots (`drop_inherited_states`: sessions, handles, key references; a slot still
//! locked counts as used and is left alone). A child's `C_Finalize` never wipes the parent's
//! keys (they are the parent's too, copy-on-write).
//!
//! The arena's own `pthread_atfork` handlers (`secret::arena`) take every allocator lock
//! before fork and release them after, so no free list is copied half-updated; they belong to
//! the allocator hooks and are registered with them at library load, before any
//! `C_Initialize`. Bounded waits (`sync::lock_bounded`) guard the locks that a child may find
//! held forever (the retained list, the log writer).

use crate::config::ForkPolicy;
use crate::error::{Error, Result};
use crate::sync;
use crate::token::{self, Module};
use cryptoki_sys::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once, RwLock};

/// One `C_Initialize`: the module state, and the process and fork generation it belongs to.
pub(crate) struct Instance {
    pub module: Module,
    pub pid: u32,
    pub fork_generation: u64,
    /// This state's mark in the fork witness page (`fork_mark`), None without
    /// MADV_WIPEONFORK.
    pub fork_mark: Option<u64>,
    /// The application forbade new threads (CKF_LIBRARY_CANT_CREATE_OS_THREADS).
    pub no_threads: bool,
}

/// One state slot per fork generation. A forked child works in the next slot, so it never
/// waits on a lock that one of its parent's threads happened to hold at the moment of fork
/// (that thread does not exist in the child and would never release it).
const SLOTS: usize = 64;
type Slot = RwLock<Option<Arc<Instance>>>;
static STATE: [Slot; SLOTS] = [const { RwLock::new(None) }; SLOTS];
/// Bumped in a forked child by the atfork handler (an atomic add: no lock, no allocation).
static FORK_GENERATION: AtomicU64 = AtomicU64::new(0);

/// This process's state slot.
pub(crate) fn state() -> &'static Slot {
    &STATE[(FORK_GENERATION.load(Ordering::SeqCst) % SLOTS as u64) as usize]
}

/// Drop the states a parent left in the other slots (their sessions, handles and key
/// references), without waiting on their locks. Returns whether there was one (a slot held
/// at fork time counts: it was in use).
pub(crate) fn drop_inherited_states() -> bool {
    let current = state() as *const Slot;
    let mut found = false;
    for slot in STATE.iter().filter(|s| !std::ptr::eq(*s, current)) {
        match slot.try_write() {
            Ok(mut g) => {
                found |= g.take().is_some();
                state_changed();
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                found |= p.into_inner().take().is_some();
                state_changed();
            }
            Err(std::sync::TryLockError::WouldBlock) => found = true,
        }
    }
    found
}
static ATFORK: Once = Once::new();

extern "C" fn atfork_child() {
    FORK_GENERATION.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn register_atfork() {
    ATFORK.call_once(|| {
        // SAFETY: the handler only bumps an atomic counter.
        unsafe { libc::pthread_atfork(None, None, Some(atfork_child)) };
    });
}

impl Instance {
    /// Whether this state was created in a parent of the current process.
    pub(crate) fn forked(&self) -> bool {
        self.fork_generation != FORK_GENERATION.load(Ordering::SeqCst)
            || match self.fork_mark {
                Some(m) => !fork_marked(m),
                None => self.pid != std::process::id(),
            }
    }
}

/// Bumped whenever a state slot changes (C_Initialize, C_Finalize, dropping a parent's
/// states), so that the per-thread cache below knows when its instance is stale.
static STATE_EPOCH: AtomicU64 = AtomicU64::new(1);

/// Call after changing a state slot (while still holding its write lock).
pub(crate) fn state_changed() {
    STATE_EPOCH.fetch_add(1, Ordering::SeqCst);
}

struct CachedInstance {
    epoch: u64,
    instance: Option<Arc<Instance>>,
    /// `Current` values of this thread that point into `instance`: while any is alive the
    /// cache is not replaced (a call that re-enters `instance()` after C_Finalize).
    borrows: usize,
}

thread_local! {
    /// This thread's view of the live state. Every PKCS#11 call needs it: taking the slot's
    /// read lock and cloning the Arc were two contended atomic read-modify-writes per call
    /// (15 % of a 2-thread AES-GCM profile); a hit here is a load of `STATE_EPOCH`.
    static CACHE: std::cell::RefCell<CachedInstance> = const {
        std::cell::RefCell::new(CachedInstance { epoch: 0, instance: None, borrows: 0 })
    };
}

/// The live state for the duration of one call.
pub(crate) enum Current {
    /// Points into this thread's cache, which holds it alive until this value is dropped.
    Cached(*const Instance),
    Owned(Arc<Instance>),
}

impl std::ops::Deref for Current {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        match self {
            // SAFETY: the cache keeps a strong reference and is not replaced while
            // `borrows` > 0, which this value holds up (it is neither Send nor Sync).
            Current::Cached(p) => unsafe { &**p },
            Current::Owned(a) => a,
        }
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        if let Current::Cached(_) = self {
            // A thread being torn down has no cache left to update.
            let _ = CACHE.try_with(|c| {
                if let Ok(mut c) = c.try_borrow_mut() {
                    c.borrows = c.borrows.saturating_sub(1);
                }
            });
        }
    }
}

fn not_usable(i: Option<&Instance>) -> Error {
    match i {
        Some(_) => Error::new(
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "the process forked: call C_Initialize in the child",
        ),
        None => Error::new(
            CKR_CRYPTOKI_NOT_INITIALIZED,
            "C_Initialize has not been called",
        ),
    }
}

/// The live state, or CKR_CRYPTOKI_NOT_INITIALIZED (also in a forked child that has not
/// called C_Initialize: the parent's sessions and handles are not valid there).
pub(crate) fn instance() -> Result<Current> {
    let epoch = STATE_EPOCH.load(Ordering::SeqCst);
    let hit = CACHE
        .try_with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            if c.epoch != epoch {
                return None;
            }
            let p = Arc::as_ptr(c.instance.as_ref()?);
            c.borrows += 1;
            Some(Current::Cached(p))
        })
        .ok()
        .flatten();
    if let Some(cur) = hit {
        // Checked on every call, hit or not: a fork leaves this thread's cache in the child.
        if cur.forked() {
            return Err(not_usable(Some(&cur)));
        }
        return Ok(cur);
    }
    let current = {
        let g = sync::read(state());
        match &*g {
            Some(i) if !i.forked() => Some(i.clone()),
            _ => None,
        }
    };
    // Refresh the cache, or empty it: a finalised state must not stay alive in a thread's
    // cache beyond that thread's next call (C_Finalize has wiped its keys already).
    let _ = CACHE.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            if c.borrows == 0 {
                c.epoch = epoch;
                c.instance = current.clone();
            }
        }
    });
    match current {
        Some(i) => Ok(Current::Owned(i)),
        None => Err(not_usable(sync::read(state()).as_deref())),
    }
}

/// Drop this thread's cached state (C_Finalize: the finalising thread keeps nothing alive).
pub(crate) fn forget_cached_instance() {
    let _ = CACHE.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            if c.borrows == 0 {
                c.instance = None;
                c.epoch = 0;
            }
        }
    });
}

impl Instance {
    pub fn new(module: Module, pid: u32, no_threads: bool) -> Instance {
        Instance {
            module,
            pid,
            fork_generation: FORK_GENERATION.load(Ordering::SeqCst),
            fork_mark: fork_mark(),
            no_threads,
        }
    }
}

/// The process whose login produced the retained keys (0: none yet). A different pid at
/// C_Initialize means we are a forked child holding inherited keys.
static RETAINED_OWNER: AtomicU32 = AtomicU32::new(0);

/// At C_Initialize: a forked child that inherited released keys applies the fork policy
/// once (keep: re-lock them; re-release: wipe them); this process owns the retained keys
/// from now on.
pub(crate) fn apply_fork_policy(policy: ForkPolicy, me: u32) {
    let owner = RETAINED_OWNER.load(Ordering::SeqCst);
    if owner != 0 && owner != me {
        match policy {
            ForkPolicy::Keep => {
                token::relock_retained();
                log::info!("forked child (parent pid {owner}): keeping the released keys (fork = \"keep\")");
            }
            ForkPolicy::ReRelease => {
                token::forget_all_retained();
                // Whatever the child cannot free (a reference a parent thread held at the
                // moment of fork, whose owner does not exist here) stays locked, not swappable.
                crate::secret::arena::relock_after_fork();
                log::info!("forked child (parent pid {owner}): wiped inherited keys (fork = \"re-release\")");
            }
        }
    }
    RETAINED_OWNER.store(me, Ordering::SeqCst);
}

/// At C_Finalize in the process that owns them: wipe the retained keys.
pub(crate) fn finalize_retained() {
    token::forget_all_retained();
    RETAINED_OWNER.store(0, Ordering::SeqCst);
}

/// The fork witness: one page that the kernel zeroes in every child process
/// (`MADV_WIPEONFORK`, Linux 4.14+), however the child was made (fork, `_Fork`, clone without
/// CLONE_VM: no atfork handler needed). Checking it is a memory load, where `getpid` was a
/// system call on every PKCS#11 call (3 % of the AES-GCM path, twice per operation).
static WITNESS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
static NEXT_MARK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn witness() -> Option<&'static std::sync::atomic::AtomicU64> {
    let addr = *WITNESS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let len = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: anonymous private mapping, checked; never unmapped (lives as long as the
        // process, like the mark it holds).
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return None;
            }
            if libc::madvise(p, len, libc::MADV_WIPEONFORK) != 0 {
                libc::munmap(p, len);
                return None;
            }
            Some(p as usize)
        }
    });
    // SAFETY: a live page-aligned mapping of ours, only ever accessed as this atomic.
    addr.map(|a| unsafe { &*(a as *const std::sync::atomic::AtomicU64) })
}

/// Set a fresh mark in the witness page and return it; None when the kernel has no
/// MADV_WIPEONFORK (the caller then compares pids).
pub fn fork_mark() -> Option<u64> {
    let w = witness()?;
    let m = NEXT_MARK.fetch_add(1, Ordering::Relaxed);
    w.store(m, Ordering::SeqCst);
    Some(m)
}

/// Whether `mark` is still the witness page's mark: false in any child of the process that
/// set it (the page reads zero there), and after a newer `fork_mark`.
pub fn fork_marked(mark: u64) -> bool {
    witness().is_some_and(|w| w.load(Ordering::Acquire) == mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fork_witness_is_zero_in_a_child() {
        // A new mark makes every live instance's mark stale, i.e. "forked": not while an ffi
        // test has one (they hold SERIAL for their instance's life; without it this test made
        // a parallel C_Login test see CKR_CRYPTOKI_NOT_INITIALIZED).
        let _g = super::super::tests::SERIAL
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(m) = fork_mark() else { return }; // kernel without MADV_WIPEONFORK
        assert_ne!(m, 0);
        let page = |w: &AtomicU64| w.load(Ordering::SeqCst);
        assert_ne!(witness().map(page), Some(0));
        // SAFETY: the child only reads memory and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if witness().map(page) == Some(0) { 0 } else { 1 };
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: our child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_ne!(witness().map(page), Some(0));
    }
}
