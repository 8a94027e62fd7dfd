//! Message-based AES-GCM (PKCS#11 3.0 `C_MessageEncryptInit` / `C_EncryptMessage` and the
//! decryption twins): one key for many messages, each with its own IV, AAD and tag, and no
//! Init per message.
//!
//! The IV is the caller's (`CKG_NO_GENERATE`) or made here. The specification leaves the
//! construction of a generated IV to the token; the rules below are the safest reading of it
//! with NIST SP 800-38D §8.2, because a repeated IV under one GCM key gives away the
//! authentication key (docs/MODULE.md, "Message-based AES-GCM"):
//! - `CKG_GENERATE` and `CKG_GENERATE_COUNTER` (the deterministic construction): 12-byte IVs
//!   with at most 32 fixed bits. The count is the **process's**: one sequence for every
//!   operation, session and key of the process, handed out in blocks (one lock per
//!   `COUNTER_BLOCK` messages, not a shared atomic per message), so no two messages of a
//!   process share an IV. Its base — the low 64 bits' starting point and the bits between the
//!   fixed field and the count — is random per process, and a forked child draws a new one
//!   (it inherited the parent's position). Processes, and TEEs that were released the same
//!   key, are told apart only by that random base unless the caller's fixed field does it, as
//!   §8.2.1 intends the fixed field to.
//! - `CKG_GENERATE_RANDOM` (the RBG construction): 12-byte IVs with no fixed bits (96 random
//!   bits, as §8.2.2 asks). §8.3 limits them to 2^32 per key; the token counts per operation
//!   (at most 2^32 each), so an application with more random IVs under one key must count
//!   them itself or use the counter.

use super::aes::GcmKey;
use crate::error::{Error, Result};
use crate::secret::{SecretBytes, Wiped};
use aws_lc_rs::aead;
use cryptoki_sys::*;
use std::sync::Arc;
use std::sync::Mutex;

/// How a message's IV is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenerator {
    /// CKG_NO_GENERATE: the caller's IV, used as it is.
    Caller,
    /// CKG_GENERATE, CKG_GENERATE_COUNTER.
    Counter,
    /// CKG_GENERATE_RANDOM.
    Random,
}

impl IvGenerator {
    pub fn from_ckg(g: CK_GENERATOR_FUNCTION) -> Result<IvGenerator> {
        match g {
            CKG_NO_GENERATE => Ok(IvGenerator::Caller),
            CKG_GENERATE | CKG_GENERATE_COUNTER => Ok(IvGenerator::Counter),
            CKG_GENERATE_RANDOM => Ok(IvGenerator::Random),
            _ => Err(param_invalid(format!(
                "IV generator {g:#x} is not supported (CKG_NO_GENERATE, CKG_GENERATE, CKG_GENERATE_COUNTER, CKG_GENERATE_RANDOM)"
            ))),
        }
    }
}

fn param_invalid(msg: impl Into<String>) -> Error {
    Error::new(CKR_MECHANISM_PARAM_INVALID, msg)
}

/// The IV length generated IVs have.
const GENERATED_IV_LEN: usize = 12;
/// Largest fixed field of a counter IV: the 64 low bits are the count.
const MAX_COUNTER_FIXED_BITS: usize = 32;
/// Random IVs one operation may make (SP 800-38D §8.3).
const MAX_RANDOM_IVS: u64 = 1 << 32;
/// Counter values an operation takes from the process's sequence at a time.
const COUNTER_BLOCK: u64 = 1 << 16;

/// The process's counter IVs: a random base and the next count not handed out.
struct CounterSource {
    pid: u32,
    base: [u8; GENERATED_IV_LEN],
    next: u64,
}

static COUNTER: Mutex<Option<CounterSource>> = Mutex::new(None);

/// A block of counts of this process's sequence.
#[derive(Clone, Copy)]
struct CounterBlock {
    base: [u8; GENERATED_IV_LEN],
    next: u64,
    end: u64,
}

/// The next `COUNTER_BLOCK` counts of the process's sequence. A process that is not the one
/// that drew the base (a forked child) draws its own base and starts the count again.
fn reserve_counter_block() -> Result<CounterBlock> {
    // A child may find the lock held forever by a parent's thread: bounded, then an error.
    let mut g = crate::sync::lock_bounded(&COUNTER, std::time::Duration::from_secs(2)).ok_or_else(
        || {
            Error::general(
                "the IV counter's lock stayed held (taken by a thread of the parent at fork?)",
            )
        },
    )?;
    let pid = std::process::id();
    let source = match g.as_mut() {
        Some(s) if s.pid == pid => s,
        _ => {
            let mut base = [0u8; GENERATED_IV_LEN];
            super::random(&mut base)?;
            g.insert(CounterSource { pid, base, next: 0 })
        }
    };
    let start = source.next;
    let end = start
        .checked_add(COUNTER_BLOCK)
        .ok_or_else(|| exhausted("counter"))?;
    source.next = end;
    Ok(CounterBlock {
        base: source.base,
        next: start,
        end,
    })
}

/// One message's parameters (CK_GCM_MESSAGE_PARAMS without its pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageParams {
    pub iv_len: usize,
    pub iv_fixed_bits: usize,
    pub generator: IvGenerator,
    pub tag_bits: usize,
}

impl MessageParams {
    /// Shape checks, before any output: IV of 1..=256 bytes, tags of 96..=128 bits (as the
    /// single-part CKM_AES_GCM), and for encryption the generation rules of this module.
    /// Decryption takes the IV as given whatever generator made it.
    pub fn check(&self, encrypt: bool) -> Result<()> {
        if self.iv_len == 0 || self.iv_len > 256 {
            return Err(param_invalid(format!(
                "AES-GCM IV must be 1..256 bytes, got {}",
                self.iv_len
            )));
        }
        if !(96..=128).contains(&self.tag_bits) || !self.tag_bits.is_multiple_of(8) {
            return Err(param_invalid(format!(
                "AES-GCM tag must be 96, 104, 112, 120 or 128 bits, got {}",
                self.tag_bits
            )));
        }
        if !encrypt {
            return Ok(());
        }
        let generated = self.generator != IvGenerator::Caller;
        if generated && self.iv_len != GENERATED_IV_LEN {
            return Err(param_invalid(format!(
                "a generated AES-GCM IV is 12 bytes, got ulIvLen {}",
                self.iv_len
            )));
        }
        match self.generator {
            IvGenerator::Counter if self.iv_fixed_bits > MAX_COUNTER_FIXED_BITS => {
                Err(param_invalid(format!(
                    "a counter IV keeps at most 32 fixed bits (64 bits count), got ulIvFixedBits {}",
                    self.iv_fixed_bits
                )))
            }
            IvGenerator::Random if self.iv_fixed_bits != 0 => Err(param_invalid(format!(
                "a random IV is 96 random bits (NIST SP 800-38D 8.2.2), got ulIvFixedBits {}; use CKG_GENERATE_COUNTER to keep a fixed field",
                self.iv_fixed_bits
            ))),
            _ => Ok(()),
        }
    }

    pub fn tag_len(&self) -> usize {
        self.tag_bits / 8
    }
}

/// One message-based AES-GCM operation: the key (its expanded form is kept with the key) and
/// the state of the IVs it generates.
pub struct GcmMessages {
    key: Arc<SecretBytes>,
    /// The counts this operation holds of the process's sequence, taken at its first counter IV.
    counter: Option<CounterBlock>,
    /// Random IVs made by this operation.
    random_ivs: u64,
}

impl GcmMessages {
    pub fn new(key: Arc<SecretBytes>) -> Result<GcmMessages> {
        if ![16, 24, 32].contains(&key.len()) {
            return Err(Error::new(
                CKR_KEY_SIZE_RANGE,
                format!("AES key of {} bytes", key.len()),
            ));
        }
        Ok(GcmMessages {
            key,
            counter: None,
            random_ivs: 0,
        })
    }

    /// The next generated IV into `iv` (12 bytes; its first `fixed_bits` are the caller's).
    fn generate_iv(&mut self, p: &MessageParams, iv: &mut [u8]) -> Result<()> {
        let mut fresh = [0u8; GENERATED_IV_LEN];
        match p.generator {
            IvGenerator::Caller => return Ok(()),
            IvGenerator::Counter => {
                let block = match self.counter {
                    Some(b) if b.next < b.end => b,
                    _ => reserve_counter_block()?,
                };
                fresh = block.base;
                let mut low = [0u8; 8];
                low.copy_from_slice(&block.base[4..]);
                let low = u64::from_be_bytes(low).wrapping_add(block.next);
                fresh[4..].copy_from_slice(&low.to_be_bytes());
                self.counter = Some(CounterBlock {
                    next: block.next + 1,
                    ..block
                });
            }
            IvGenerator::Random => {
                if self.random_ivs >= MAX_RANDOM_IVS {
                    return Err(exhausted("random"));
                }
                super::random(&mut fresh)?;
                self.random_ivs += 1;
            }
        }
        keep_fixed_bits(iv, &fresh, p.iv_fixed_bits);
        Ok(())
    }

    /// Encrypt `data` in place under `p`: the IV is `iv` (generated bits written into it
    /// first); returns the tag, whose first `p.tag_len()` bytes count. `p` is checked.
    pub fn seal(
        &mut self,
        p: &MessageParams,
        iv: &mut [u8],
        aad: &[u8],
        data: &mut [u8],
    ) -> Result<[u8; 16]> {
        p.check(true)?;
        self.generate_iv(p, iv)?;
        let mut tag = [0u8; 16];
        if let Ok(nonce) = aead::Nonce::try_assume_unique_for_key(iv) {
            // A 12-byte IV: the expanded key kept with the token key. A shorter tag is the
            // leading bytes of the full one (SP 800-38D, MSB_t).
            let full = self.key.with_key(|k| {
                k.seal_in_place_separate_tag(nonce, aead::Aad::from(aad), data)
                    .map_err(|_| Error::new(CKR_FUNCTION_FAILED, "AES-GCM seal failed"))
            })?;
            tag.copy_from_slice(full.as_ref());
        } else {
            let sealed =
                super::pkey::aes_gcm_raw(true, self.key.as_slice(), iv, aad, data, p.tag_len())?;
            let (ct, t) = sealed.split_at(data.len());
            data.copy_from_slice(ct);
            tag[..t.len()].copy_from_slice(t);
        }
        Ok(tag)
    }

    /// Decrypt `data` in place under `p` and the caller's `iv` and `tag` (`p.tag_len()`
    /// bytes). A wrong tag is CKR_ENCRYPTED_DATA_INVALID and leaves `data` zeroed: no
    /// unauthenticated plaintext is given out. `p` is checked.
    pub fn open(
        &self,
        p: &MessageParams,
        iv: &[u8],
        aad: &[u8],
        tag: &[u8],
        data: &mut [u8],
    ) -> Result<()> {
        p.check(false)?;
        let opened = match aead::Nonce::try_assume_unique_for_key(iv) {
            Ok(nonce) if tag.len() == 16 => self.key.with_key(|k| {
                k.open_in_place_separate_tag(nonce, aead::Aad::from(aad), tag, data)
                    .map(drop)
                    .map_err(|_| tag_mismatch())
            }),
            _ => {
                let mut joined = Wiped::new(Vec::with_capacity(data.len() + tag.len()));
                joined.extend_from_slice(data);
                joined.extend_from_slice(tag);
                // Its own errors: a wrong tag is CKR_ENCRYPTED_DATA_INVALID there too, a message
                // too long for the EVP API CKR_DATA_LEN_RANGE.
                super::pkey::aes_gcm_raw(false, self.key.as_slice(), iv, aad, &joined, tag.len())
                    .map(|pt| data.copy_from_slice(&pt))
            }
        };
        if opened.is_err() {
            crate::secret::wipe(data);
        }
        opened
    }
}

fn tag_mismatch() -> Error {
    Error::new(CKR_ENCRYPTED_DATA_INVALID, "AES-GCM tag mismatch")
}

fn exhausted(what: &str) -> Error {
    Error::new(
        CKR_FUNCTION_FAILED,
        format!("this operation has made all the {what} IVs it may: end it (C_MessageEncryptFinal) and start another"),
    )
}

/// `iv` becomes its own first `fixed_bits` bits (counted from the most significant bit of
/// the first byte) followed by the rest of `fresh`.
fn keep_fixed_bits(iv: &mut [u8], fresh: &[u8], fixed_bits: usize) {
    for (i, (b, f)) in iv.iter_mut().zip(fresh).enumerate() {
        let fixed_here = fixed_bits.saturating_sub(i * 8).min(8);
        let keep = !(0xFFu8.checked_shr(fixed_here as u32).unwrap_or(0));
        *b = (*b & keep) | (f & !keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit, Payload};

    fn params(generator: IvGenerator, iv_fixed_bits: usize, tag_bits: usize) -> MessageParams {
        MessageParams {
            iv_len: 12,
            iv_fixed_bits,
            generator,
            tag_bits,
        }
    }

    fn messages(key: &[u8]) -> GcmMessages {
        GcmMessages::new(Arc::new(SecretBytes::from_slice(key))).unwrap()
    }

    /// Ciphertext ‖ tag of a sealed message, for RustCrypto.
    fn seal_joined(
        m: &mut GcmMessages,
        p: &MessageParams,
        iv: &mut [u8],
        aad: &[u8],
        pt: &[u8],
    ) -> Vec<u8> {
        let mut data = pt.to_vec();
        let tag = m.seal(p, iv, aad, &mut data).unwrap();
        data.extend_from_slice(&tag[..p.tag_len()]);
        data
    }

    #[test]
    fn caller_iv_messages_agree_with_rustcrypto_both_ways() {
        let key = [3u8; 32];
        let other = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
        let mut m = messages(&key);
        let p = params(IvGenerator::Caller, 0, 128);
        for (i, msg) in [&b"first"[..], b"", &[0x5a; 4096]].iter().enumerate() {
            let mut iv = [i as u8 + 1; 12];
            let joined = seal_joined(&mut m, &p, &mut iv, b"aad", msg);
            assert_eq!(iv, [i as u8 + 1; 12], "a caller's IV is used as it is");
            let nonce = aes_gcm::Nonce::from(iv);
            let pt = other
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &joined,
                        aad: b"aad",
                    },
                )
                .unwrap();
            assert_eq!(&pt[..], *msg);
            // And the other way: RustCrypto seals, the operation opens.
            let ct = other
                .encrypt(&nonce, Payload { msg, aad: b"more" })
                .unwrap();
            let (body, tag) = ct.split_at(msg.len());
            let mut data = body.to_vec();
            m.open(&p, &iv, b"more", tag, &mut data).unwrap();
            assert_eq!(&data[..], *msg);
        }
    }

    #[test]
    fn short_tags_and_other_iv_lengths_agree_with_rustcrypto() {
        use aes_gcm::aead::consts::{U12, U16};
        let key = [9u8; 32];
        let mut m = messages(&key);
        // 12-byte IV, 96-bit tag: the fast path's tag cut to its leading 12 bytes.
        type Tag12 = aes_gcm::AesGcm<aes_gcm::aes::Aes256, U12, U12>;
        let p = params(IvGenerator::Caller, 0, 96);
        let mut iv = [4u8; 12];
        let joined = seal_joined(&mut m, &p, &mut iv, b"h", b"short tag");
        let other = Tag12::new_from_slice(&key).unwrap();
        #[allow(deprecated)] // aes-gcm 0.10's nonce type
        let nonce = aes_gcm::aead::generic_array::GenericArray::from(iv);
        assert_eq!(
            other
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &joined,
                        aad: b"h"
                    }
                )
                .unwrap(),
            b"short tag"
        );
        let (body, tag) = joined.split_at(9);
        let mut data = body.to_vec();
        m.open(&p, &iv, b"h", tag, &mut data).unwrap();
        assert_eq!(data, b"short tag");
        // A 16-byte IV (the raw EVP path), full tag.
        type Iv16 = aes_gcm::AesGcm<aes_gcm::aes::Aes256, U16>;
        let p = MessageParams {
            iv_len: 16,
            ..params(IvGenerator::Caller, 0, 128)
        };
        let mut iv = [6u8; 16];
        let joined = seal_joined(&mut m, &p, &mut iv, b"", b"long iv");
        let other = Iv16::new_from_slice(&key).unwrap();
        #[allow(deprecated)]
        let nonce = aes_gcm::aead::generic_array::GenericArray::from(iv);
        assert_eq!(
            other
                .decrypt(
                    &nonce,
                    Payload {
                        msg: &joined,
                        aad: b""
                    }
                )
                .unwrap(),
            b"long iv"
        );
        let (body, tag) = joined.split_at(7);
        let mut data = body.to_vec();
        m.open(&p, &iv, b"", tag, &mut data).unwrap();
        assert_eq!(data, b"long iv");
    }

    #[test]
    fn a_wrong_tag_is_refused_and_leaves_no_plaintext() {
        let key = [1u8; 16];
        let mut m = messages(&key);
        for (iv_len, tag_bits) in [(12, 128), (12, 112), (13, 128)] {
            let p = MessageParams {
                iv_len,
                ..params(IvGenerator::Caller, 0, tag_bits)
            };
            let mut iv = vec![2u8; iv_len];
            let mut data = b"secret payload".to_vec();
            let mut tag = m.seal(&p, &mut iv, b"a", &mut data).unwrap();
            tag[0] ^= 1;
            let e = m
                .open(&p, &iv, b"a", &tag[..p.tag_len()], &mut data)
                .unwrap_err();
            assert_eq!(
                e.rv(),
                CKR_ENCRYPTED_DATA_INVALID,
                "iv {iv_len} tag {tag_bits}"
            );
            assert!(
                data.iter().all(|b| *b == 0),
                "iv {iv_len} tag {tag_bits}: output wiped"
            );
        }
    }

    #[test]
    fn counter_ivs_keep_the_fixed_field_and_count_one_sequence_for_the_process() {
        let p = params(IvGenerator::Counter, 20, 128);
        let caller = [0xAB, 0xCD, 0xEF, 0x12, 0, 0, 0, 0, 0, 0, 0, 0];
        let count = |iv: &[u8; 12]| u64::from_be_bytes(iv[4..].try_into().unwrap());
        // Two operations on one key, interleaved, as two sessions would.
        let (mut a, mut b) = (messages(&[5u8; 32]), messages(&[5u8; 32]));
        let mut seen = std::collections::HashSet::new();
        let mut of_a = vec![];
        for i in 0..6 {
            let op = if i % 2 == 0 { &mut a } else { &mut b };
            let mut iv = caller;
            let _ = seal_joined(op, &p, &mut iv, b"", b"x");
            // The first 20 bits are the caller's.
            assert_eq!(iv[..2], caller[..2]);
            assert_eq!(iv[2] & 0xF0, caller[2] & 0xF0);
            assert!(seen.insert(iv), "message {i}: an IV came twice");
            if i % 2 == 0 {
                of_a.push(iv);
            }
        }
        // One operation counts up by one within its block; the bits between the fixed field
        // and the count are the process's.
        assert_eq!(count(&of_a[1]), count(&of_a[0]).wrapping_add(1));
        assert_eq!(count(&of_a[2]), count(&of_a[0]).wrapping_add(2));
        assert!(seen
            .iter()
            .all(|iv| iv[2] & 0x0F == of_a[0][2] & 0x0F && iv[3] == of_a[0][3]));
    }

    #[test]
    fn an_operation_takes_a_new_block_when_its_counts_run_out() {
        let p = params(IvGenerator::Counter, 0, 128);
        let mut m = messages(&[4u8; 16]);
        let mut first = [0u8; 12];
        let _ = seal_joined(&mut m, &p, &mut first, b"", b"x");
        let block = m.counter.expect("a block was taken");
        m.counter = Some(CounterBlock {
            next: block.end,
            ..block
        });
        let mut next = [0u8; 12];
        let _ = seal_joined(&mut m, &p, &mut next, b"", b"y");
        let taken = m.counter.expect("a new block");
        assert!(
            taken.next > block.end,
            "the new block lies after the spent one"
        );
        assert_ne!(first, next);
    }

    /// A forked child inherits the process's counter position: it must draw its own base and
    /// start again, or it would repeat the parent's IVs.
    #[test]
    fn a_forked_child_draws_its_own_counter_base() {
        let parent = reserve_counter_block().unwrap();
        let mut fds = [0i32; 2];
        // SAFETY: a pipe into a valid two-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only reserves a block (bounded lock, DRBG), writes it and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let mut out = [0u8; 20];
            if let Ok(b) = reserve_counter_block() {
                out[..12].copy_from_slice(&b.base);
                out[12..].copy_from_slice(&b.next.to_be_bytes());
            }
            // SAFETY: write to the pipe, then leave without running the parent's destructors.
            unsafe {
                libc::write(fds[1], out.as_ptr().cast(), out.len());
                libc::_exit(0);
            }
        }
        let mut got = [0u8; 20];
        // SAFETY: read the child's 20 bytes from the pipe, reap the child.
        unsafe {
            libc::close(fds[1]);
            assert_eq!(libc::read(fds[0], got.as_mut_ptr().cast(), 20), 20);
            libc::close(fds[0]);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        assert_ne!(got[..12], [0u8; 12], "the child reserved a block");
        assert_ne!(got[..12], parent.base, "the child's base is its own");
        assert_eq!(
            got[12..],
            0u64.to_be_bytes(),
            "the child's count starts again"
        );
    }

    #[test]
    fn generated_ivs_decrypt_with_rustcrypto() {
        let key = [8u8; 16];
        let other = aes_gcm::Aes128Gcm::new_from_slice(&key).unwrap();
        let mut m = messages(&key);
        for g in [IvGenerator::Counter, IvGenerator::Random] {
            let p = params(g, 0, 128);
            let mut iv = [0u8; 12];
            let joined = seal_joined(&mut m, &p, &mut iv, b"aad", b"generated");
            assert_ne!(iv, [0u8; 12], "{g:?}: the IV was generated");
            let nonce = aes_gcm::Nonce::from(iv);
            assert_eq!(
                other
                    .decrypt(
                        &nonce,
                        Payload {
                            msg: &joined,
                            aad: b"aad"
                        }
                    )
                    .unwrap(),
                b"generated"
            );
        }
    }

    #[test]
    fn random_ivs_differ_and_stop_at_the_limit() {
        let mut m = messages(&[2u8; 32]);
        let p = params(IvGenerator::Random, 0, 128);
        let (mut a, mut b) = ([0u8; 12], [0u8; 12]);
        let _ = seal_joined(&mut m, &p, &mut a, b"", b"1");
        let _ = seal_joined(&mut m, &p, &mut b, b"", b"2");
        assert_ne!(a, b);
        m.random_ivs = MAX_RANDOM_IVS;
        let mut data = *b"3";
        let e = m.seal(&p, &mut a, b"", &mut data).unwrap_err();
        assert_eq!(e.rv(), CKR_FUNCTION_FAILED);
        assert_eq!(data, *b"3", "nothing encrypted");
    }

    #[test]
    fn generation_rules_are_checked() {
        let ok = |p: MessageParams, encrypt| p.check(encrypt).map_err(|e| e.rv());
        let bad = Err(CKR_MECHANISM_PARAM_INVALID);
        assert_eq!(ok(params(IvGenerator::Counter, 32, 128), true), Ok(()));
        assert_eq!(ok(params(IvGenerator::Counter, 33, 128), true), bad);
        assert_eq!(ok(params(IvGenerator::Random, 0, 128), true), Ok(()));
        assert_eq!(ok(params(IvGenerator::Random, 8, 128), true), bad);
        let long = MessageParams {
            iv_len: 16,
            ..params(IvGenerator::Counter, 0, 128)
        };
        assert_eq!(ok(long, true), bad, "generated IVs are 12 bytes");
        assert_eq!(ok(long, false), Ok(()), "decryption takes any IV as given");
        let caller = MessageParams {
            iv_len: 16,
            ..params(IvGenerator::Caller, 96, 128)
        };
        assert_eq!(
            ok(caller, true),
            Ok(()),
            "fixed bits mean nothing for a caller's IV"
        );
        assert_eq!(ok(params(IvGenerator::Caller, 0, 64), true), bad);
        assert_eq!(ok(params(IvGenerator::Caller, 0, 100), true), bad);
        assert_eq!(
            ok(
                MessageParams {
                    iv_len: 0,
                    ..params(IvGenerator::Caller, 0, 128)
                },
                false
            ),
            bad
        );
        assert_eq!(
            ok(
                MessageParams {
                    iv_len: 257,
                    ..params(IvGenerator::Caller, 0, 128)
                },
                false
            ),
            bad
        );
        assert!(
            IvGenerator::from_ckg(4).is_err(),
            "CKG_GENERATE_COUNTER_XOR (3.1) is not offered"
        );
        assert_eq!(
            IvGenerator::from_ckg(CKG_GENERATE).unwrap(),
            IvGenerator::Counter
        );
    }

    #[test]
    fn fixed_bits_are_kept_to_the_bit() {
        let mut iv = [0xFFu8; 3];
        keep_fixed_bits(&mut iv, &[0u8; 3], 11);
        assert_eq!(iv, [0xFF, 0xE0, 0x00]);
        let mut iv = [0u8; 2];
        keep_fixed_bits(&mut iv, &[0xFF; 2], 0);
        assert_eq!(iv, [0xFF, 0xFF]);
        let mut iv = [0x12u8, 0x34];
        keep_fixed_bits(&mut iv, &[0xFF; 2], 16);
        assert_eq!(iv, [0x12, 0x34]);
    }
}
