//! Lock helpers shared by every room (token state, the process state, the log writer).

#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock helpers that survive poisoning: every change behind these locks is a single
/// assignment, insert or removal, so a panic cannot leave the data half-changed, and a panic
/// elsewhere must not brick the token.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| {
        m.clear_poison();
        p.into_inner()
    })
}
/// A lock that a forked child may find held forever (a parent's thread held it at the moment
/// of fork): give up after `limit` instead of hanging the process.
pub fn lock_bounded<T>(m: &Mutex<T>, limit: std::time::Duration) -> Option<MutexGuard<'_, T>> {
    let start = std::time::Instant::now();
    let mut spins = 0u32;
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                m.clear_poison();
                return Some(p.into_inner());
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                if start.elapsed() > limit {
                    return None;
                }
                spins += 1;
                if spins < 100 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }
}

pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| {
        m.clear_poison();
        p.into_inner()
    })
}
