//! Locked, non-dumpable heap for AWS-LC.
//!
//! A parsed key (`EVP_PKEY`, its `BIGNUM`s, Montgomery contexts, blinding values) lives in
//! memory AWS-LC allocates with `OPENSSL_malloc`. `install` points AWS-LC's allocator
//! (`CRYPTO_set_mem_functions`) at this arena, so everything AWS-LC allocates sits in
//! `mlock`ed, `MADV_DONTDUMP` pages and is zeroed when freed: released keys never reach swap
//! or a core dump, not even as the engine's internal copies.
//!
//! Layout: 1 MiB chunks (1 MiB-aligned) carved into power-of-two blocks (32 B .. 32 KiB, a
//! 16-byte header in front of each); bigger requests get a mapping of their own. Small blocks
//! come from one of `SHARDS` shards, each with its own spin lock, free lists and 64 KiB slab
//! of a chunk; a thread keeps to one shard, and a block goes back to the shard that made it
//! (the header says which). Whether a pointer is ours is decided without a lock for chunk
//! memory (chunk bases are published append-only and never unmapped). One global spin lock
//! guards chunk carving and the large mappings. Locks are held only for pointer bookkeeping,
//! never across a call out; zeroing happens outside them. With a single lock, two threads
//! signing with P-256 spent their time bouncing it (module 2 threads = 1.63x one thread, while
//! aws-lc-rs alone scaled 1.97x). All locks are taken in the `pthread_atfork` prepare handler
//! (shards, then global: the order `alloc` takes them in) and released in parent and child,
//! so a fork never snapshots a free list half-updated (what glibc's malloc does too).

use std::cell::{Cell, UnsafeCell};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

const HEADER: usize = 16;
const MIN_SHIFT: usize = 5; // 32-byte blocks
const MAX_SHIFT: usize = 15; // 32 KiB blocks
const CLASSES: usize = MAX_SHIFT - MIN_SHIFT + 1;
const CHUNK: usize = 1 << 20;
/// What a shard takes from a chunk at a time: locked memory grows with use, not with the
/// number of shards (RLIMIT_MEMLOCK is often small).
const SLAB: usize = 64 << 10;
const SHARDS: usize = 8;
const MAX_CHUNKS: usize = 4096;
const MAX_REGIONS: usize = 4096;
/// Marks a block served from a chunk (class in the low byte, shard in the next) or from its
/// own mapping.
const MAGIC_SMALL: usize = 0x5eb7_a11c_0000_0000;
const MAGIC_LARGE: usize = 0x5eb7_b16a_0000_0000;
const MAGIC_MASK: usize = 0xffff_ffff_0000_0000;

#[derive(Clone, Copy)]
struct Region {
    start: usize,
    len: usize,
}

/// Global: chunk carving and the large mappings.
struct State {
    bump: *mut u8,
    bump_end: *mut u8,
    regions: [Region; MAX_REGIONS],
    nregions: usize,
}

struct Arena {
    lock: AtomicBool,
    state: UnsafeCell<State>,
}

// All access to `state` happens under `lock`.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena {
    lock: AtomicBool::new(false),
    state: UnsafeCell::new(State {
        bump: ptr::null_mut(),
        bump_end: ptr::null_mut(),
        regions: [Region { start: 0, len: 0 }; MAX_REGIONS],
        nregions: 0,
    }),
};

struct ShardState {
    free: [*mut u8; CLASSES],
    bump: *mut u8,
    bump_end: *mut u8,
}

/// One cache line each, so that two shards' locks never share one.
#[repr(align(64))]
struct Shard {
    lock: AtomicBool,
    state: UnsafeCell<ShardState>,
}

// All access to `state` happens under `lock`.
unsafe impl Sync for Shard {}

static SHARD: [Shard; SHARDS] = [const {
    Shard {
        lock: AtomicBool::new(false),
        state: UnsafeCell::new(ShardState {
            free: [ptr::null_mut(); CLASSES],
            bump: ptr::null_mut(),
            bump_end: ptr::null_mut(),
        }),
    }
}; SHARDS];

/// Bases of the chunks, published append-only (written under the global lock, read without).
static CHUNK_BASES: [AtomicUsize; MAX_CHUNKS] = [const { AtomicUsize::new(0) }; MAX_CHUNKS];
static NCHUNKS: AtomicUsize = AtomicUsize::new(0);
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard (usize::MAX until its first allocation). A const Cell: no
    /// allocation and no destructor, safe inside the allocator.
    static MY_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

static INSTALLED: Once = Once::new();
static HOOKED: AtomicBool = AtomicBool::new(false);
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);
/// Bytes currently handed out (for tests and the doctor).
static IN_USE: AtomicUsize = AtomicUsize::new(0);

fn spin(l: &AtomicBool) {
    let mut spins = 0u32;
    while l
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

struct Guard;

fn lock() -> Guard {
    spin(&ARENA.lock);
    Guard
}

impl Drop for Guard {
    fn drop(&mut self) {
        ARENA.lock.store(false, Ordering::Release);
    }
}

impl Guard {
    #[allow(clippy::mut_from_ref)]
    fn state(&self) -> &mut State {
        // SAFETY: the guard proves we hold the lock; one guard exists at a time.
        unsafe { &mut *ARENA.state.get() }
    }
}

struct ShardGuard(usize);

fn lock_shard(i: usize) -> ShardGuard {
    spin(&SHARD[i].lock);
    ShardGuard(i)
}

impl Drop for ShardGuard {
    fn drop(&mut self) {
        SHARD[self.0].lock.store(false, Ordering::Release);
    }
}

impl ShardGuard {
    #[allow(clippy::mut_from_ref)]
    fn state(&self) -> &mut ShardState {
        // SAFETY: the guard proves we hold this shard's lock; one guard per shard at a time.
        unsafe { &mut *SHARD[self.0].state.get() }
    }
}

fn my_shard() -> usize {
    MY_SHARD
        .try_with(|c| {
            let mut i = c.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
                c.set(i);
            }
            i
        })
        // A thread whose thread-locals are being torn down still allocates: any shard works.
        .unwrap_or(0)
}

fn page_size() -> usize {
    // SAFETY: no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: anonymous private mapping; result checked.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        ptr::null_mut()
    } else {
        p as *mut u8
    }
}

/// Map `len` bytes of locked, non-dumpable memory.
fn map_locked(len: usize) -> *mut u8 {
    let p = mmap_anon(len);
    if !p.is_null() {
        protect(p, len);
    }
    p
}

/// A locked, non-dumpable chunk aligned to its size (so `chunk_of` is a mask).
fn map_chunk() -> *mut u8 {
    let p = mmap_anon(2 * CHUNK);
    if p.is_null() {
        return p;
    }
    let start = p as usize;
    let aligned = (start + CHUNK - 1) & !(CHUNK - 1);
    // SAFETY: trimming our own fresh mapping to the aligned chunk.
    unsafe {
        if aligned > start {
            libc::munmap(p as *mut libc::c_void, aligned - start);
        }
        let tail = start + 2 * CHUNK - (aligned + CHUNK);
        if tail > 0 {
            libc::munmap((aligned + CHUNK) as *mut libc::c_void, tail);
        }
    }
    protect(aligned as *mut u8, CHUNK);
    aligned as *mut u8
}

fn protect(p: *mut u8, len: usize) {
    // SAFETY: the range is a live mapping of ours.
    unsafe {
        libc::madvise(p as *mut libc::c_void, len, libc::MADV_DONTDUMP);
        if libc::mlock(p as *const libc::c_void, len) != 0
            && !MLOCK_WARNED.swap(true, Ordering::Relaxed)
        {
            // No allocation-free logging here is possible in every context; a flag and a
            // later warning from `take_mlock_warning` keep the hook itself allocation-free.
        }
    }
}

/// True once, after an `mlock` of engine memory failed (the caller logs the warning).
pub fn take_mlock_warning() -> bool {
    MLOCK_WARNED.load(Ordering::Relaxed) && !MLOCK_REPORTED.swap(true, Ordering::Relaxed)
}
static MLOCK_REPORTED: AtomicBool = AtomicBool::new(false);

fn add_region(st: &mut State, start: *mut u8, len: usize) -> bool {
    if st.nregions == MAX_REGIONS {
        return false;
    }
    st.regions[st.nregions] = Region {
        start: start as usize,
        len,
    };
    st.nregions += 1;
    true
}

fn remove_region(st: &mut State, start: *mut u8) {
    let s = start as usize;
    if let Some(i) = st.regions[..st.nregions].iter().position(|r| r.start == s) {
        st.nregions -= 1;
        st.regions[i] = st.regions[st.nregions];
    }
}

/// Whether `p` lies in one of our chunks. No lock: bases are published append-only, and a
/// pointer into a chunk can only exist after its base was published.
fn in_chunk(p: *const u8) -> bool {
    let base = p as usize & !(CHUNK - 1);
    let n = NCHUNKS.load(Ordering::Acquire).min(MAX_CHUNKS);
    CHUNK_BASES[..n]
        .iter()
        .any(|b| b.load(Ordering::Acquire) == base)
}

/// Whether `p` lies in one of the large mappings (under the global lock).
fn in_region(st: &State, p: *const u8) -> bool {
    let a = p as usize;
    st.regions[..st.nregions]
        .iter()
        .any(|r| a >= r.start && a < r.start + r.len)
}

fn class_of(size: usize) -> Option<usize> {
    let need = size.checked_add(HEADER)?;
    (MIN_SHIFT..=MAX_SHIFT)
        .find(|&s| need <= 1 << s)
        .map(|s| s - MIN_SHIFT)
}

/// Allocate `size` bytes from the arena; null on exhaustion.
pub fn alloc(size: usize) -> *mut u8 {
    match class_of(size) {
        Some(c) => alloc_small(c),
        None => alloc_large(size),
    }
}

/// A fresh SLAB of chunk memory for a shard (global lock; maps a chunk when needed).
fn take_slab() -> *mut u8 {
    let g = lock();
    let st = g.state();
    if (st.bump_end as usize) - (st.bump as usize) < SLAB {
        let n = NCHUNKS.load(Ordering::Relaxed);
        if n == MAX_CHUNKS {
            return ptr::null_mut();
        }
        let c = map_chunk();
        if c.is_null() {
            return ptr::null_mut();
        }
        CHUNK_BASES[n].store(c as usize, Ordering::Release);
        NCHUNKS.store(n + 1, Ordering::Release);
        st.bump = c;
        // SAFETY: within the chunk just mapped.
        st.bump_end = unsafe { c.add(CHUNK) };
    }
    let s = st.bump;
    // SAFETY: checked above that SLAB bytes remain.
    st.bump = unsafe { s.add(SLAB) };
    s
}

fn alloc_small(class: usize) -> *mut u8 {
    let block = 1usize << (class + MIN_SHIFT);
    let shard = my_shard();
    let g = lock_shard(shard);
    let st = g.state();
    let b = if !st.free[class].is_null() {
        let b = st.free[class];
        // SAFETY: a free block stores the next free block in its first word.
        st.free[class] = unsafe { *(b as *mut *mut u8) };
        b
    } else {
        if (st.bump_end as usize) - (st.bump as usize) < block {
            // Lock order: shard, then global (atfork_prepare takes them in this order too).
            let s = take_slab();
            if s.is_null() {
                return ptr::null_mut();
            }
            st.bump = s;
            // SAFETY: the slab is SLAB bytes.
            st.bump_end = unsafe { s.add(SLAB) };
        }
        let b = st.bump;
        // SAFETY: checked above that `block` bytes remain (block <= SLAB).
        st.bump = unsafe { b.add(block) };
        b
    };
    drop(g);
    // No zeroing here: fresh chunk memory is zero (anonymous mapping) and `free` zeroes every
    // block before it goes back on a free list (the list link lives in the header words).
    // SAFETY: `b` is a block of `block` >= HEADER bytes owned by the caller now.
    unsafe {
        *(b as *mut usize) = MAGIC_SMALL | (shard << 8) | class;
        *(b.add(8) as *mut usize) = block - HEADER;
    }
    IN_USE.fetch_add(block, Ordering::Relaxed);
    // SAFETY: HEADER < block.
    unsafe { b.add(HEADER) }
}

fn alloc_large(size: usize) -> *mut u8 {
    let Some(total) = size.checked_add(HEADER) else {
        return ptr::null_mut();
    };
    let ps = page_size();
    let map_len = total.div_ceil(ps) * ps;
    let m = map_locked(map_len);
    if m.is_null() {
        return ptr::null_mut();
    }
    {
        let g = lock();
        if !add_region(g.state(), m, map_len) {
            drop(g);
            // SAFETY: our fresh mapping.
            unsafe { libc::munmap(m as *mut libc::c_void, map_len) };
            return ptr::null_mut();
        }
    }
    // SAFETY: the mapping holds at least HEADER bytes.
    unsafe {
        *(m as *mut usize) = MAGIC_LARGE;
        *(m.add(8) as *mut usize) = map_len - HEADER;
    }
    IN_USE.fetch_add(map_len, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { m.add(HEADER) }
}

/// Whether `p` is arena memory.
fn owns(p: *const u8) -> bool {
    in_chunk(p) || in_region(lock().state(), p)
}

/// Usable size of an arena block, or None if `p` is not ours.
fn usable_size(p: *mut u8) -> Option<usize> {
    if p.is_null() || !owns(p) {
        return None;
    }
    // SAFETY: p lies in our memory and was returned by alloc, so a header precedes it.
    Some(unsafe { *(p.sub(8) as *const usize) })
}

/// Zero and release a block. Pointers the arena does not own are ignored (returns false).
///
/// # Safety
/// `p` is NULL, not arena memory, or a live block from `alloc` not freed before.
pub unsafe fn free(p: *mut u8) -> bool {
    if p.is_null() {
        return true;
    }
    if in_chunk(p) {
        // SAFETY: ours, so a header precedes it.
        let (h, tag, usable) = unsafe {
            let h = p.sub(HEADER);
            (h, *(h as *const usize), *(h.add(8) as *const usize))
        };
        let (shard, class) = ((tag >> 8) & 0xff, tag & 0xff);
        if tag & MAGIC_MASK != MAGIC_SMALL
            || shard >= SHARDS
            || class >= CLASSES
            || usable + HEADER != 1 << (class + MIN_SHIFT)
        {
            // A corrupted header: never hand the block out again.
            return true;
        }
        // Zero outside any lock: the block is still the caller's until it is linked into
        // its shard's free list below.
        // SAFETY: the header says how much memory belongs to the block.
        unsafe { zero(h, usable + HEADER) };
        let g = lock_shard(shard);
        let st = g.state();
        // SAFETY: a free block's first word links the free list.
        unsafe { *(h as *mut *mut u8) = st.free[class] };
        st.free[class] = h;
        drop(g);
        IN_USE.fetch_sub(usable + HEADER, Ordering::Relaxed);
        return true;
    }
    let g = lock();
    if !in_region(g.state(), p) {
        return false;
    }
    // SAFETY: ours, so a header precedes it.
    let (h, tag, usable) = unsafe {
        let h = p.sub(HEADER);
        (h, *(h as *const usize), *(h.add(8) as *const usize))
    };
    if tag & MAGIC_MASK == MAGIC_LARGE {
        remove_region(g.state(), h);
        drop(g);
        // SAFETY: the header says how much memory belongs to the mapping.
        unsafe {
            zero(h, usable + HEADER);
            libc::munlock(h as *const libc::c_void, usable + HEADER);
            libc::munmap(h as *mut libc::c_void, usable + HEADER);
        }
        IN_USE.fetch_sub(usable + HEADER, Ordering::Relaxed);
    }
    // Otherwise a corrupted header: never hand the block out again.
    true
}

/// Zeroing that the optimiser cannot drop, at memset speed (`explicit_bzero`; a volatile
/// byte loop cost about a cycle per byte on every AWS-LC free).
unsafe fn zero(p: *mut u8, len: usize) {
    // SAFETY: caller guarantees p..p+len is writable.
    super::wipe(unsafe { std::slice::from_raw_parts_mut(p, len) });
}

/// Bytes handed out right now.
pub fn bytes_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Whether `p` points into arena memory (tests: prove a parsed key lives here).
pub fn contains(p: *const u8) -> bool {
    owns(p)
}

/// Re-lock every arena page in a forked child (mlock is not inherited).
pub fn relock_after_fork() {
    let g = lock();
    let n = NCHUNKS.load(Ordering::Acquire).min(MAX_CHUNKS);
    for b in &CHUNK_BASES[..n] {
        protect(b.load(Ordering::Acquire) as *mut u8, CHUNK);
    }
    let st = g.state();
    for r in &st.regions[..st.nregions] {
        protect(r.start as *mut u8, r.len);
    }
}

/// Whether AWS-LC allocates from the arena in this process.
pub fn is_hooked() -> bool {
    HOOKED.load(Ordering::Acquire)
}

// ---- AWS-LC hooks ----
// Memory AWS-LC allocated before the hooks went in carries its default 8-byte size prefix;
// it is handled exactly as OPENSSL_free / OPENSSL_realloc would (cleanse, libc free).
const FOREIGN_PREFIX: usize = 8;

unsafe extern "C" fn hook_malloc(
    size: usize,
    _f: *const libc::c_char,
    _l: libc::c_int,
) -> *mut libc::c_void {
    alloc(size) as *mut libc::c_void
}

unsafe extern "C" fn hook_free(p: *mut libc::c_void, _f: *const libc::c_char, _l: libc::c_int) {
    let p = p as *mut u8;
    // SAFETY: AWS-LC frees only what it allocated.
    if !unsafe { free(p) } {
        // SAFETY: a pre-hook OPENSSL_malloc block: its size sits in the 8 bytes before it.
        unsafe {
            let base = p.sub(FOREIGN_PREFIX);
            let size = *(base as *const usize);
            zero(base, size + FOREIGN_PREFIX);
            libc::free(base as *mut libc::c_void);
        }
    }
}

unsafe extern "C" fn hook_realloc(
    p: *mut libc::c_void,
    size: usize,
    _f: *const libc::c_char,
    _l: libc::c_int,
) -> *mut libc::c_void {
    let old = p as *mut u8;
    if old.is_null() {
        return alloc(size) as *mut libc::c_void;
    }
    let old_size = match usable_size(old) {
        Some(s) => s,
        // SAFETY: pre-hook block, size prefix as above.
        None => unsafe { *(old.sub(FOREIGN_PREFIX) as *const usize) },
    };
    let new = alloc(size);
    if new.is_null() {
        return ptr::null_mut();
    }
    // SAFETY: both blocks are valid for the copied length.
    unsafe {
        ptr::copy_nonoverlapping(old, new, old_size.min(size));
        hook_free(p, ptr::null(), 0);
    }
    new as *mut libc::c_void
}

extern "C" fn atfork_prepare() {
    // Hold every lock across fork so the child never sees half-updated free lists; shards
    // first, then global, the order alloc_small takes them in.
    for i in 0..SHARDS {
        std::mem::forget(lock_shard(i));
    }
    std::mem::forget(lock());
}
extern "C" fn atfork_release() {
    ARENA.lock.store(false, Ordering::Release);
    for s in &SHARD {
        s.lock.store(false, Ordering::Release);
    }
}

/// Route AWS-LC's allocations into the arena. Idempotent; must run before AWS-LC allocates
/// keys (the library constructor below calls it at load time).
pub fn install() {
    INSTALLED.call_once(|| {
        // SAFETY: plain function pointers with the signatures AWS-LC expects.
        let ok = unsafe {
            aws_lc_sys::CRYPTO_set_mem_functions(
                Some(hook_malloc),
                Some(hook_realloc),
                Some(hook_free),
            )
        };
        if ok == 1 {
            // SAFETY: handlers only touch an atomic flag.
            unsafe {
                libc::pthread_atfork(
                    Some(atfork_prepare),
                    Some(atfork_release),
                    Some(atfork_release),
                )
            };
            HOOKED.store(true, Ordering::Release);
        }
    });
}

/// Run `install` when the library is loaded, before any caller can reach AWS-LC.
#[used]
#[link_section = ".init_array"]
static INSTALL_AT_LOAD: extern "C" fn() = {
    extern "C" fn at_load() {
        install();
    }
    at_load
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_zeroed_reused_and_sized() {
        install();
        let a = alloc(100);
        assert!(!a.is_null());
        assert!(contains(a));
        // SAFETY: 100 bytes were allocated.
        unsafe {
            assert!(std::slice::from_raw_parts(a, 100).iter().all(|&b| b == 0));
            ptr::write_bytes(a, 0xAB, 100);
        }
        assert!(usable_size(a).unwrap() >= 100);
        assert!(unsafe { free(a) });
        let b = alloc(100);
        // SAFETY: fresh allocation of 100 bytes.
        unsafe { assert!(std::slice::from_raw_parts(b, 100).iter().all(|&x| x == 0)) };
        assert!(unsafe { free(b) });
    }

    #[test]
    fn large_blocks_get_their_own_mapping() {
        let p = alloc(200_000);
        assert!(!p.is_null());
        assert!(contains(p));
        // SAFETY: 200_000 bytes were allocated.
        unsafe { ptr::write_bytes(p, 1, 200_000) };
        assert!(unsafe { free(p) });
        assert!(!contains(p));
    }

    #[test]
    fn foreign_pointers_are_not_claimed() {
        let v = [0u8; 16];
        assert!(!contains(v.as_ptr()));
        assert!(!unsafe { free(v.as_ptr() as *mut u8) });
    }

    #[test]
    fn realloc_keeps_contents() {
        install();
        let p = alloc(10) as *mut libc::c_void;
        // SAFETY: 10 bytes allocated; realloc hook contract.
        unsafe {
            ptr::copy_nonoverlapping(b"0123456789".as_ptr(), p as *mut u8, 10);
            let q = hook_realloc(p, 5000, ptr::null(), 0) as *mut u8;
            assert_eq!(std::slice::from_raw_parts(q, 10), b"0123456789");
            hook_free(q as *mut libc::c_void, ptr::null(), 0);
        }
    }

    #[test]
    fn threads_can_allocate_concurrently() {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let n = (i * 37 + t) % 3000 + 1;
                        let p = alloc(n);
                        // SAFETY: n bytes allocated.
                        unsafe { ptr::write_bytes(p, t as u8, n) };
                        assert!(unsafe { free(p) });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
    }
}
