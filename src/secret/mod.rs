//! Holders for secret bytes: kept out of core dumps and swap, wiped on drop.
//!
//! `SecretBytes` owns a page-aligned anonymous mapping that is `mlock`ed (so it never reaches
//! swap) and `MADV_DONTDUMP` (so it never reaches a core dump), and zeroed before unmapping.
//! A failing `mlock` (small RLIMIT_MEMLOCK) is logged once as a warning, not an error.
//! After fork the child's copy is not locked (mlock is not inherited): `relock_after_fork`
//! re-locks every live holder.

pub mod arena;

use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroize;

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

pub struct SecretBytes {
    ptr: *mut u8,
    len: usize,
    map_len: usize,
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

    fn protect(&self) {
        // SAFETY: the range is our own live mapping.
        unsafe {
            libc::madvise(
                self.ptr as *mut libc::c_void,
                self.map_len,
                libc::MADV_DONTDUMP,
            );
            if libc::mlock(self.ptr as *const libc::c_void, self.map_len) != 0
                && !MLOCK_WARNED.swap(true, Ordering::Relaxed)
            {
                log::warn!(
                    "mlock of secret memory failed ({}); keys may reach swap. hint: raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK=)",
                    std::io::Error::last_os_error()
                );
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
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // SAFETY: our own mapping; volatile zeroing via zeroize, then unmap.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr, self.map_len).zeroize();
            libc::munlock(self.ptr as *const libc::c_void, self.map_len);
            libc::munmap(self.ptr as *mut libc::c_void, self.map_len);
        }
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
}
