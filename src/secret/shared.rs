//! The key store a process tree shares: one `MAP_SHARED` anonymous mapping per token, made by
//! the process that releases first and inherited by every child it forks afterwards.
//!
//! It holds the serialized released keys of one token (the record format is `token::lease`'s),
//! in two halves: a writer fills the half not in use and then publishes it by bumping the
//! generation; a reader copies the current half and checks the generation did not move
//! (a seqlock over two buffers). Writers are serialized by the refresh claim, a word of the
//! header that one process wins by compare-and-swap and that expires by itself if that process
//! dies while it holds it (the next refresher takes over). Processes attached to the store are
//! listed by pid; the last one to detach (dead pids pruned) zeroes it.
//!
//! Like every holder of key bytes the mapping is `MADV_DONTDUMP` (inherited by children) and
//! `mlock`ed (not inherited: a child re-locks it, `relock`), never `MADV_WIPEONFORK`: sharing
//! it with the children is its purpose.

use super::{page_size, SecretBytes};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

const MAGIC: u64 = 0x736b_722d_6c65_6173; // "skr-leas"
/// Processes that can be attached at once (an nginx master and its workers, with room).
pub const MAX_ATTACHED: usize = 256;

#[repr(C)]
struct Header {
    magic: u64,
    /// Bumped once per publish. Readers compare it before and after copying.
    generation: AtomicU64,
    /// Index (0 / 1) of the half that holds the current record.
    current: AtomicU64,
    /// Record length in each half.
    lens: [AtomicU64; 2],
    /// `(deadline_unix_seconds << 32) | pid` of the process refreshing now; 0 when free.
    claim: AtomicU64,
    /// When the next refresh is due (unix milliseconds).
    next_refresh_ms: AtomicU64,
    /// Consecutive failed refreshes, the class of the last one and when it happened.
    failures: AtomicU64,
    last_failure_class: AtomicU64,
    last_failure_ms: AtomicU64,
    /// Last successful refresh (unix milliseconds), and the pid that made it.
    last_refresh_ms: AtomicU64,
    last_refresher: AtomicU64,
    attached: [AtomicU32; MAX_ATTACHED],
}

/// One token's shared store.
pub struct SharedStore {
    base: *mut u8,
    map_len: usize,
    half_capacity: usize,
}

// The mapping lives as long as this value; all shared fields are atomics and the halves are
// accessed through the seqlock protocol below.
unsafe impl Send for SharedStore {}
unsafe impl Sync for SharedStore {}

/// Why a refresh attempt ended (stored as a number in the header, shown by `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    None = 0,
    Service = 1,
    Rejected = 2,
    Device = 3,
    Integrity = 4,
    Other = 5,
}

impl FailureClass {
    pub fn from_u64(v: u64) -> FailureClass {
        match v {
            1 => FailureClass::Service,
            2 => FailureClass::Rejected,
            3 => FailureClass::Device,
            4 => FailureClass::Integrity,
            5 => FailureClass::Other,
            _ => FailureClass::None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FailureClass::None => "none",
            FailureClass::Service => "service",
            FailureClass::Rejected => "rejected",
            FailureClass::Device => "device",
            FailureClass::Integrity => "integrity",
            FailureClass::Other => "other",
        }
    }
}

/// A snapshot of the header's bookkeeping (no key bytes).
#[derive(Clone, Debug, Default)]
pub struct StoreStatus {
    pub generation: u64,
    pub next_refresh_ms: u64,
    pub failures: u64,
    pub last_failure_class: u64,
    pub last_failure_ms: u64,
    pub last_refresh_ms: u64,
    pub last_refresher: u64,
    pub claimed_by: u32,
    pub attached: usize,
}

impl SharedStore {
    /// A new zeroed store whose halves hold `half_capacity` bytes each. None when the kernel
    /// refuses the mapping.
    pub fn create(half_capacity: usize) -> Option<SharedStore> {
        let ps = page_size();
        let header = std::mem::size_of::<Header>().div_ceil(64) * 64;
        let map_len = (header + 2 * half_capacity).div_ceil(ps) * ps;
        // SAFETY: anonymous shared mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let store = SharedStore {
            base: p as *mut u8,
            map_len,
            half_capacity,
        };
        store.protect();
        // The mapping starts zeroed: only the magic needs writing.
        // SAFETY: the header is at the start of our fresh mapping, suitably aligned (page).
        unsafe { std::ptr::addr_of_mut!((*(store.base as *mut Header)).magic).write(MAGIC) };
        Some(store)
    }

    fn protect(&self) {
        // SAFETY: our own live mapping.
        unsafe {
            libc::madvise(
                self.base as *mut libc::c_void,
                self.map_len,
                libc::MADV_DONTDUMP,
            );
            if libc::mlock(self.base as *const libc::c_void, self.map_len) != 0 {
                super::warn_mlock_once();
            }
        }
    }

    /// Lock the pages again in a forked child (mlock is not inherited; DONTDUMP is).
    pub fn relock(&self) {
        self.protect();
    }

    fn header(&self) -> &Header {
        // SAFETY: the header lives at the start of the mapping for as long as `self`.
        unsafe { &*(self.base as *const Header) }
    }

    fn half(&self, i: u64) -> *mut u8 {
        let header = std::mem::size_of::<Header>().div_ceil(64) * 64;
        // SAFETY: both halves lie inside the mapping (see `create`).
        unsafe {
            self.base
                .add(header + (i as usize & 1) * self.half_capacity)
        }
    }

    pub fn capacity(&self) -> usize {
        self.half_capacity
    }

    pub fn generation(&self) -> u64 {
        self.header().generation.load(Ordering::Acquire)
    }

    /// Publish a record. The caller holds the claim (or is the only process that knows the
    /// store, at creation). Returns the new generation; None if the record does not fit.
    pub fn publish(&self, record: &[u8]) -> Option<u64> {
        if record.len() > self.half_capacity {
            return None;
        }
        let h = self.header();
        let next = 1 - (h.current.load(Ordering::Acquire) & 1);
        let dst = self.half(next);
        // SAFETY: `dst` is the half no reader is told to read; a reader still copying it from
        // two publishes ago sees the generation move and retries.
        unsafe {
            std::ptr::copy_nonoverlapping(record.as_ptr(), dst, record.len());
            super::wipe(std::slice::from_raw_parts_mut(
                dst.add(record.len()),
                self.half_capacity - record.len(),
            ));
        }
        h.lens[next as usize].store(record.len() as u64, Ordering::Release);
        h.current.store(next, Ordering::Release);
        Some(h.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// The current record and its generation, copied into locked memory; None while nothing
    /// was published (or after `wipe`).
    pub fn read(&self) -> Option<(u64, SecretBytes)> {
        let h = self.header();
        for _ in 0..1000 {
            let g1 = h.generation.load(Ordering::Acquire);
            let cur = h.current.load(Ordering::Acquire) & 1;
            let len = h.lens[cur as usize].load(Ordering::Acquire) as usize;
            if g1 == 0 || len == 0 {
                return None;
            }
            let len = len.min(self.half_capacity);
            let mut out = SecretBytes::zeroed(len);
            // SAFETY: the half is inside the mapping; a concurrent writer is detected below
            // and the copy discarded.
            unsafe {
                std::ptr::copy_nonoverlapping(self.half(cur), out.as_mut_slice().as_mut_ptr(), len)
            };
            fence(Ordering::Acquire);
            if h.generation.load(Ordering::Acquire) == g1 {
                return Some((g1, out));
            }
        }
        None
    }

    /// Zero both halves and publish "nothing" (the last process detaching, or a logout).
    pub fn wipe(&self) {
        let h = self.header();
        for i in 0..2 {
            h.lens[i].store(0, Ordering::Release);
            // SAFETY: both halves are ours to write; readers see len 0 or a moved generation.
            unsafe {
                super::wipe(std::slice::from_raw_parts_mut(
                    self.half(i as u64),
                    self.half_capacity,
                ))
            };
        }
        h.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Try to become the refresher until `deadline_s` (unix seconds). Wins when nobody holds
    /// the claim or the holder's deadline passed (it died or hung mid-way).
    pub fn try_claim(&self, pid: u32, now_s: u64, deadline_s: u64) -> bool {
        let h = self.header();
        let cur = h.claim.load(Ordering::Acquire);
        let holder_deadline = cur >> 32;
        let holder = (cur & 0xffff_ffff) as u32;
        if cur != 0 && holder != pid && holder_deadline > now_s && pid_alive(holder) {
            return false;
        }
        let new = (deadline_s.min(u32::MAX as u64) << 32) | u64::from(pid);
        h.claim
            .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn release_claim(&self, pid: u32) {
        let h = self.header();
        let cur = h.claim.load(Ordering::Acquire);
        if (cur & 0xffff_ffff) as u32 == pid {
            let _ = h
                .claim
                .compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    pub fn next_refresh_ms(&self) -> u64 {
        self.header().next_refresh_ms.load(Ordering::Acquire)
    }

    pub fn set_next_refresh_ms(&self, at: u64) {
        self.header().next_refresh_ms.store(at, Ordering::Release);
    }

    /// Record a successful refresh by `pid` at `now_ms`.
    pub fn note_success(&self, pid: u32, now_ms: u64) {
        let h = self.header();
        h.failures.store(0, Ordering::Release);
        h.last_refresh_ms.store(now_ms, Ordering::Release);
        h.last_refresher.store(u64::from(pid), Ordering::Release);
    }

    /// Record a failed refresh; returns the number of consecutive failures.
    pub fn note_failure(&self, class: FailureClass, now_ms: u64) -> u64 {
        let h = self.header();
        h.last_failure_class.store(class as u64, Ordering::Release);
        h.last_failure_ms.store(now_ms, Ordering::Release);
        h.failures.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn status(&self) -> StoreStatus {
        let h = self.header();
        StoreStatus {
            generation: h.generation.load(Ordering::Acquire),
            next_refresh_ms: h.next_refresh_ms.load(Ordering::Acquire),
            failures: h.failures.load(Ordering::Acquire),
            last_failure_class: h.last_failure_class.load(Ordering::Acquire),
            last_failure_ms: h.last_failure_ms.load(Ordering::Acquire),
            last_refresh_ms: h.last_refresh_ms.load(Ordering::Acquire),
            last_refresher: h.last_refresher.load(Ordering::Acquire),
            claimed_by: (h.claim.load(Ordering::Acquire) & 0xffff_ffff) as u32,
            attached: h
                .attached
                .iter()
                .filter(|a| a.load(Ordering::Acquire) != 0)
                .count(),
        }
    }

    /// List `pid` as a user of the store. False when the table is full (the store then is
    /// wiped only by its other users' detach, or when the last mapping goes away).
    pub fn attach(&self, pid: u32) -> bool {
        let h = self.header();
        if h.attached.iter().any(|a| a.load(Ordering::Acquire) == pid) {
            return true;
        }
        for _ in 0..2 {
            for a in h.attached.iter() {
                if a.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return true;
                }
            }
            self.prune_dead();
        }
        false
    }

    /// Remove `pid`; returns whether no live process is attached any more (the caller then
    /// wipes the store).
    pub fn detach(&self, pid: u32) -> bool {
        let h = self.header();
        for a in h.attached.iter() {
            let _ = a.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        self.prune_dead();
        h.attached.iter().all(|a| a.load(Ordering::Acquire) == 0)
    }

    /// Forget attached processes that no longer exist (crashed without detaching).
    fn prune_dead(&self) {
        for a in self.header().attached.iter() {
            let p = a.load(Ordering::Acquire);
            if p != 0 && !pid_alive(p) {
                let _ = a.compare_exchange(p, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        // Unmapping our view only: other processes of the tree may still use the store. Who
        // wipes it is decided by `detach`.
        // SAFETY: our own mapping, not used after this.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.map_len);
        }
    }
}

/// Whether a process with this pid exists (EPERM means it exists under another user, e.g. an
/// nginx master running as root seen from a worker).
fn pid_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as i32, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_record_reads_back_with_its_generation() {
        let s = SharedStore::create(4096).unwrap();
        assert!(s.read().is_none(), "nothing published yet");
        let g1 = s.publish(b"first").unwrap();
        let (g, r) = s.read().unwrap();
        assert_eq!((g, r.as_slice()), (g1, &b"first"[..]));
        let g2 = s.publish(b"second, longer").unwrap();
        assert_eq!(g2, g1 + 1);
        assert_eq!(s.read().unwrap().1.as_slice(), b"second, longer");
        assert!(s.publish(&vec![0u8; 4097]).is_none(), "too big for a half");
        s.wipe();
        assert!(s.read().is_none());
    }

    #[test]
    fn a_forked_child_sees_what_the_parent_publishes_later() {
        let s = SharedStore::create(4096).unwrap();
        s.publish(b"v1").unwrap();
        // A pipe as the event: the child waits for the parent's second publish.
        let mut fds = [0i32; 2];
        // SAFETY: plain pipe/fork/read/write; the child only reads memory and exits.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let (from_parent, to_child) = (fds[0], fds[1]);
            let pid = libc::fork();
            if pid == 0 {
                let mut b = [0u8; 1];
                libc::read(from_parent, b.as_mut_ptr() as *mut libc::c_void, 1);
                let ok = s
                    .read()
                    .map(|(_, r)| r.as_slice() == b"v2")
                    .unwrap_or(false);
                libc::_exit(if ok { 0 } else { 1 });
            }
            s.publish(b"v2").unwrap();
            libc::write(to_child, b"x".as_ptr() as *const libc::c_void, 1);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            libc::close(from_parent);
            libc::close(to_child);
        }
    }

    #[test]
    fn the_claim_is_exclusive_until_it_expires_or_is_released() {
        let s = SharedStore::create(64).unwrap();
        let me = std::process::id();
        // Our parent process (the test runner's parent) is alive: use its pid as "another".
        // SAFETY: getppid has no preconditions.
        let other = unsafe { libc::getppid() } as u32;
        assert!(s.try_claim(other, 100, 200));
        assert!(
            !s.try_claim(me, 150, 300),
            "held by a live process until 200"
        );
        assert!(s.try_claim(me, 201, 300), "the holder's deadline passed");
        assert!(!s.try_claim(other, 250, 400));
        s.release_claim(me);
        assert!(s.try_claim(other, 250, 400));
    }

    #[test]
    fn the_last_detach_reports_the_store_unused_and_dead_pids_do_not_count() {
        let s = SharedStore::create(64).unwrap();
        let me = std::process::id();
        assert!(s.attach(me));
        assert!(s.attach(me), "idempotent");
        // A pid that cannot exist (above pid_max on every Linux) counts as dead.
        assert!(s.attach(0x7fff_fff0));
        assert_eq!(s.status().attached, 2);
        assert!(s.detach(me), "the other entry is not a live process");
        assert_eq!(s.status().attached, 0);
    }
}
