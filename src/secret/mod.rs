//! Holders for secret bytes: kept out of core dumps and swap, wiped on drop.
//!
//! `SecretBytes` owns a page-aligned anonymous mapping that is `mlock`ed (so it never reaches
//! swap) and `MADV_DONTDUMP` (so it never reaches a core dump), and zeroed before unmapping.
//! A failing `mlock` (small RLIMIT_MEMLOCK) is logged once as a warning, not an error.
//! After fork the child's copy is not locked (mlock is not inherited): `relock_after_fork`
//! re-locks every live holder.

pub mod arena;
pub mod shared;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use zeroize::Zeroize;

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Aligned to 128 bytes: in an `Arc` the reference counts then sit on a cache line (pair) of
/// their own, so the threads that clone and drop a shared key per operation do not also
/// evict the line every seal reads the expanded key's pointer from.
#[repr(align(128))]
pub struct SecretBytes {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
    /// Engine state derived from the bytes (an expanded AES-GCM key), built by `crypto` on
    /// first use and dropped with them; it lives in AWS-LC memory, i.e. the locked arena.
    derived: OnceLock<Box<dyn Any + Send + Sync>>,
}

// The mapping is owned exclusively by this value.
unsafe impl Send for SecretBytes {}
unsafe impl Sync for SecretBytes {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

/// Log once per process that a lock failed (the cause is the same for every buffer).
fn warn_mlock_once() {
    if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "mlock of secret memory failed ({}); keys may reach swap. hint: raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK=)",
            std::io::Error::last_os_error()
        );
    }
}

impl SecretBytes {
    /// A zeroed secret buffer of `len` bytes.
    pub fn zeroed(len: usize) -> SecretBytes {
        let ps = page_size();
        let map_len = len.max(1).div_ceil(ps) * ps;
        // SAFETY: anonymous private mapping, checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            // Out of address space: nothing sensible to do but abort the allocation like Vec does.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(map_len, ps).expect("layout"),
            );
        }
        let s = SecretBytes {
            ptr: ptr as *mut u8,
            len,
            map_len,
            derived: OnceLock::new(),
        };
        s.protect();
        s
    }

    /// Copy `src` into a new secret buffer and wipe `src`.
    pub fn from_vec(mut src: Vec<u8>) -> SecretBytes {
        let s = Self::from_slice(&src);
        src.zeroize();
        s
    }

    pub fn from_slice(src: &[u8]) -> SecretBytes {
        let mut s = Self::zeroed(src.len());
        s.as_mut_slice().copy_from_slice(src);
        s
    }

    /// A zeroed secret buffer of `len` bytes in the locked arena (`LockedBuf`'s protection:
    /// mlock, MADV_DONTDUMP, zeroed when freed, re-locked after fork by the arena): for the many
    /// short-lived session keys, where an mmap + mlock + munmap per key would take the process's
    /// mmap lock and shoot down every core's TLB (RSA-OAEP unwrap on 2 threads scaled 1.18x).
    pub fn in_arena(len: usize) -> SecretBytes {
        let ptr = arena::alloc(len.max(1));
        if ptr.is_null() {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), 16).expect("layout"),
            );
        }
        // map_len 0 marks an arena block.
        SecretBytes {
            ptr,
            len,
            map_len: 0,
            derived: OnceLock::new(),
        }
    }

    /// Copy `src` into a new arena-backed secret buffer (see `in_arena`).
    pub fn in_arena_from(src: &[u8]) -> SecretBytes {
        let mut s = Self::in_arena(src.len());
        s.as_mut_slice().copy_from_slice(src);
        s
    }

    fn protect(&self) {
        if self.map_len == 0 {
            // Arena blocks: the arena locks (and re-locks after fork) its own pages.
            return;
        }
        // SAFETY: the range is our own live mapping.
        unsafe {
            libc::madvise(
                self.ptr as *mut libc::c_void,
                self.map_len,
                libc::MADV_DONTDUMP,
            );
            if libc::mlock(self.ptr as *const libc::c_void, self.map_len) != 0 {
                warn_mlock_once();
            }
        }
    }

    /// Re-apply mlock in a forked child (locks are not inherited across fork).
    pub fn relock(&self) {
        self.protect();
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // New bytes: what was derived from the old ones is stale.
        self.derived.take();
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The state `make` derives from these bytes, made once and kept until the bytes are
    /// dropped or changed. None when `make` fails or the slot holds another type (one
    /// derived state per key).
    pub fn derived<T: Any + Send + Sync>(
        &self,
        make: impl FnOnce(&[u8]) -> Option<T>,
    ) -> Option<&T> {
        if self.derived.get().is_none() {
            let made = make(self.as_slice())?;
            // Another thread may have been first: then its value stays and `made` is dropped.
            let _ = self.derived.set(Box::new(made));
        }
        self.derived.get()?.downcast_ref::<T>()
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        if self.map_len == 0 {
            // SAFETY: a live block from arena::alloc, freed once; free zeroes it.
            unsafe { arena::free(self.ptr) };
            return;
        }
        // SAFETY: our own mapping; zeroed (never elided), then unmapped.
        unsafe {
            wipe(std::slice::from_raw_parts_mut(self.ptr, self.map_len));
            libc::munlock(self.ptr as *const libc::c_void, self.map_len);
            libc::munmap(self.ptr as *mut libc::c_void, self.map_len);
        }
    }
}

/// Short-lived secret bytes on the operation path (an RSA decryption's output, the private
/// exponent hashed for implicit rejection), in the locked arena: the protection of
/// `SecretBytes` (mlock, MADV_DONTDUMP, zeroed when freed) without an mmap + mlock + munmap per
/// call. Those syscalls take the process-wide mmap lock and munmap shoots down the TLB of
/// every core: RSA-OAEP decryption on 2 threads scaled 1.46x because of them.
pub struct LockedBuf {
    ptr: *mut u8,
    len: usize,
}

// The block is owned exclusively by this value.
unsafe impl Send for LockedBuf {}
unsafe impl Sync for LockedBuf {}

impl LockedBuf {
    /// A zeroed buffer of `len` bytes (arena blocks are zero when handed out).
    pub fn zeroed(len: usize) -> LockedBuf {
        let ptr = arena::alloc(len.max(1));
        if ptr.is_null() {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), 16).expect("layout"),
            );
        }
        LockedBuf { ptr, len }
    }

    pub fn from_slice(src: &[u8]) -> LockedBuf {
        let mut b = Self::zeroed(src.len());
        b.as_mut_slice().copy_from_slice(src);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for LockedBuf {
    fn drop(&mut self) {
        // SAFETY: a live block from arena::alloc, freed once; free zeroes it.
        unsafe { arena::free(self.ptr) };
    }
}

impl std::fmt::Debug for LockedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockedBuf({} bytes)", self.len)
    }
}

/// Zero `buf` so that the compiler cannot drop the writes, at memset speed.
///
/// `zeroize` writes one volatile byte at a time (about a byte per cycle); on the operation path
/// that was most of an AES-GCM 4 KiB C_Encrypt. `explicit_bzero` is glibc's / musl's memset
/// that is never elided.
pub fn wipe(buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    // SAFETY: `buf` is valid for writes of its length.
    unsafe { libc::explicit_bzero(buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
}

/// A byte vector wiped (whole capacity) when dropped: plaintexts, padded blocks and outputs
/// that pass through the operation path. Same guarantee as `zeroize::Zeroizing<Vec<u8>>`,
/// faster (see `wipe`).
#[derive(Default, PartialEq, Eq)]
pub struct Wiped(Vec<u8>);

impl Wiped {
    pub fn new(v: Vec<u8>) -> Wiped {
        Wiped(v)
    }
}

impl From<Vec<u8>> for Wiped {
    fn from(v: Vec<u8>) -> Wiped {
        Wiped(v)
    }
}

impl std::ops::Deref for Wiped {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Wiped {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        let cap = self.0.capacity();
        // SAFETY: the allocation is valid for `cap` bytes; u8 has no invalid values, and the
        // Vec's length is irrelevant once it is being dropped.
        unsafe { wipe(std::slice::from_raw_parts_mut(self.0.as_mut_ptr(), cap)) };
    }
}

impl std::fmt::Debug for Wiped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Wiped({} bytes)", self.0.len())
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn holds_and_wipes_source() {
        let v = vec![7u8; 100];
        let s = SecretBytes::from_vec(v);
        assert_eq!(s.as_slice(), &[7u8; 100][..]);
        assert_eq!(format!("{s:?}"), "SecretBytes(100 bytes)");
    }

    #[test]
    fn locked_buf_lives_in_the_arena() {
        let b = LockedBuf::from_slice(&[5u8; 300]);
        assert!(arena::contains(b.as_slice().as_ptr()));
        assert_eq!(b.as_slice(), &[5u8; 300][..]);
        assert!(LockedBuf::zeroed(40).as_slice().iter().all(|&x| x == 0));
        assert_eq!(format!("{b:?}"), "LockedBuf(300 bytes)");
    }

    #[test]
    fn wiped_wipes_its_whole_capacity() {
        let mut w = Wiped::new(Vec::with_capacity(64));
        w.extend_from_slice(&[0xAA; 40]);
        w.truncate(10);
        let p = w.as_ptr();
        // Wipe in place, then look at the memory while it is still ours.
        // SAFETY: 64 bytes of capacity are allocated.
        unsafe { wipe(std::slice::from_raw_parts_mut(p as *mut u8, 64)) };
        // SAFETY: as above.
        assert!(unsafe { std::slice::from_raw_parts(p, 64) }
            .iter()
            .all(|&b| b == 0));
        assert_eq!(format!("{w:?}"), "Wiped(10 bytes)");
    }
}
