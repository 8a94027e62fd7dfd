//! Sessions and their active operations, and the output protocol every producing call shares:
//! the output is computed once and kept until the caller fetches it, so a size query (NULL
//! buffer) or CKR_BUFFER_TOO_SMALL leaves the operation alive and the retry returns exactly
//! the same bytes (a randomised ECDSA signature included).

use crate::crypto::gcm_message::GcmMessages;
use crate::crypto::ops::{CipherOp, DigestOp, SignOp, VerifyOp};
use crate::error::{Error, Result};
use crate::secret::Wiped;
use cryptoki_sys::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// C_Sign, C_Encrypt, C_Decrypt, C_Digest.
    Single,
    /// C_EncryptUpdate, C_DecryptUpdate.
    Update,
    /// C_SignFinal, C_EncryptFinal, C_DecryptFinal, C_DigestFinal.
    Final,
}

struct Cached {
    call: Call,
    /// A copy of the input, so the retry can be checked to repeat it exactly. A copy and a
    /// compare cost far less than hashing (SHA-256 of a 4 KiB AES-GCM input was 85 % of the
    /// instructions of a whole C_Encrypt size query + call); wiped like the output.
    input: Wiped,
    output: Wiped,
}

/// An operation in progress on a session.
pub struct Active<T> {
    pub op: T,
    /// Uses a key visible only while logged in: ends with the login.
    pub needs_login: bool,
    /// The token's login epoch when the operation started.
    pub epoch: u64,
    /// Whether Update was called (C_Sign / C_Encrypt are then refused).
    pub multipart: bool,
    cached: Option<Cached>,
}

impl<T> Active<T> {
    pub fn new(op: T, needs_login: bool, epoch: u64) -> Active<T> {
        Active {
            op,
            needs_login,
            epoch,
            multipart: false,
            cached: None,
        }
    }

    /// Whether an output computed by an earlier size query waits to be fetched.
    pub fn has_cached(&self) -> bool {
        self.cached.is_some()
    }

    /// Compute the output of `call` on `input` (or take the one kept from an earlier size
    /// query of this exact call) and hand it to `deliver`, which reports whether the caller
    /// took it. Not taken (NULL buffer, or CKR_BUFFER_TOO_SMALL): the output is kept, with a
    /// copy of the input so the retry must repeat it. Only that path copies the input.
    pub fn produce(
        &mut self,
        call: Call,
        input: &[u8],
        compute: impl FnOnce(&mut T) -> Result<Wiped>,
        deliver: impl FnOnce(&[u8]) -> Result<bool>,
    ) -> Result<bool> {
        if let Some(c) = &self.cached {
            if c.call != call || c.input[..] != *input {
                return Err(Error::new(
                    CKR_ARGUMENTS_BAD,
                    "the call after a size query must repeat the same input",
                ));
            }
            let taken = deliver(&c.output)?;
            if taken {
                self.cached = None;
            }
            return Ok(taken);
        }
        let output = compute(&mut self.op)?;
        let r = deliver(&output);
        let keep = match &r {
            Ok(taken) => !taken,
            Err(e) => e.rv() == CKR_BUFFER_TOO_SMALL,
        };
        if keep {
            self.cached = Some(Cached {
                call,
                input: Wiped::new(input.to_vec()),
                output,
            });
        }
        r
    }
}

pub struct Find {
    pub handles: Vec<CK_OBJECT_HANDLE>,
    pub pos: usize,
}

impl Find {
    pub fn next(&mut self, max: usize) -> Vec<CK_OBJECT_HANDLE> {
        let end = (self.pos + max).min(self.handles.len());
        let out = self.handles[self.pos..end].to_vec();
        self.pos = end;
        out
    }
}

pub struct Session {
    pub handle: CK_SESSION_HANDLE,
    pub token: usize,
    pub rw: bool,
    pub find: Option<Find>,
    pub sign: Option<Active<SignOp>>,
    pub verify: Option<Active<VerifyOp>>,
    pub encrypt: Option<Active<CipherOp>>,
    pub decrypt: Option<Active<CipherOp>>,
    pub digest: Option<Active<DigestOp>>,
    /// Message-based encryption and decryption (PKCS#11 3.0): alive until their Final.
    pub message_encrypt: Option<Active<GcmMessages>>,
    pub message_decrypt: Option<Active<GcmMessages>>,
}

impl Session {
    pub fn new(handle: CK_SESSION_HANDLE, token: usize, rw: bool) -> Session {
        Session {
            handle,
            token,
            rw,
            find: None,
            sign: None,
            verify: None,
            encrypt: None,
            decrypt: None,
            digest: None,
            message_encrypt: None,
            message_decrypt: None,
        }
    }

    /// End every operation (C_SessionCancel, and recovery after a panic inside a call).
    pub fn cancel_all(&mut self) {
        self.find = None;
        self.sign = None;
        self.verify = None;
        self.encrypt = None;
        self.decrypt = None;
        self.digest = None;
        self.message_encrypt = None;
        self.message_decrypt = None;
    }

    /// End the operations that use logged-in keys (logout): their keys are being wiped.
    pub fn end_private_operations(&mut self) {
        fn end<T>(a: &mut Option<Active<T>>) {
            if a.as_ref().is_some_and(|x| x.needs_login) {
                *a = None;
            }
        }
        end(&mut self.sign);
        end(&mut self.verify);
        end(&mut self.encrypt);
        end(&mut self.decrypt);
        end(&mut self.message_encrypt);
        end(&mut self.message_decrypt);
        // A find started while logged in may list private handles; they are invalid now.
        self.find = None;
    }
}

/// The active operation of one kind, checked against the current login: an operation on a
/// logged-in key whose login ended is terminated here.
pub fn active<T>(
    slot: &mut Option<Active<T>>,
    logged_in: bool,
    epoch: u64,
) -> Result<&mut Active<T>> {
    match slot {
        None => Err(Error::new(
            CKR_OPERATION_NOT_INITIALIZED,
            "no operation of this kind is active",
        )),
        Some(a) if a.needs_login && a.epoch != epoch => {
            *slot = None;
            Err(if logged_in {
                Error::new(
                    CKR_KEY_HANDLE_INVALID,
                    "the key of this operation was wiped",
                )
            } else {
                Error::new(
                    CKR_USER_NOT_LOGGED_IN,
                    "the token was logged out during the operation",
                )
            })
        }
        Some(a) => Ok(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produce_keeps_output_until_delivered() {
        let mut a = Active::new(0u32, false, 1);
        let mut runs = 0;
        let mut seen = vec![];
        // Size query: computed, not taken, kept.
        let taken = a
            .produce(
                Call::Single,
                b"x",
                |n| {
                    *n += 1;
                    runs += 1;
                    Ok(Wiped::new(vec![1, 2, 3]))
                },
                |o| {
                    seen = o.to_vec();
                    Ok(false)
                },
            )
            .unwrap();
        assert!(!taken);
        assert_eq!(seen, vec![1, 2, 3]);
        // Short buffer: the same kept output, no second computation, still kept.
        let e = a
            .produce(
                Call::Single,
                b"x",
                |_| panic!("recomputed"),
                |_| Err(Error::new(CKR_BUFFER_TOO_SMALL, "short")),
            )
            .unwrap_err();
        assert_eq!(e.rv(), CKR_BUFFER_TOO_SMALL);
        // A different input before fetching is refused.
        assert_eq!(
            a.produce(Call::Single, b"y", |_| panic!("recomputed"), |_| Ok(true))
                .unwrap_err()
                .rv(),
            CKR_ARGUMENTS_BAD
        );
        // Fetched: the kept output, then forgotten.
        let mut got = vec![];
        assert!(a
            .produce(
                Call::Single,
                b"x",
                |_| panic!("recomputed"),
                |o| {
                    got = o.to_vec();
                    Ok(true)
                }
            )
            .unwrap());
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!((a.op, runs), (1, 1));
        // Next call computes afresh.
        assert!(a
            .produce(
                Call::Single,
                b"y",
                |_| Ok(Wiped::new(vec![9])),
                |o| {
                    assert_eq!(o, [9]);
                    Ok(true)
                }
            )
            .unwrap());
    }

    #[test]
    fn operations_end_with_their_login() {
        let mut slot = Some(Active::new((), true, 3));
        assert!(active(&mut slot, true, 3).is_ok());
        assert_eq!(
            active(&mut slot, false, 4).err().unwrap().rv(),
            CKR_USER_NOT_LOGGED_IN
        );
        assert!(slot.is_none());
        let mut slot = Some(Active::new((), true, 3));
        assert_eq!(
            active(&mut slot, true, 5).err().unwrap().rv(),
            CKR_KEY_HANDLE_INVALID
        );
        let mut public: Option<Active<()>> = Some(Active::new((), false, 3));
        assert!(active(&mut public, false, 9).is_ok());
        let mut none: Option<Active<()>> = None;
        assert_eq!(
            active(&mut none, true, 1).err().unwrap().rv(),
            CKR_OPERATION_NOT_INITIALIZED
        );
    }

    #[test]
    fn find_pages() {
        let mut f = Find {
            handles: vec![1, 2, 3, 4, 5],
            pos: 0,
        };
        assert_eq!(f.next(2), vec![1, 2]);
        assert_eq!(f.next(10), vec![3, 4, 5]);
        assert!(f.next(10).is_empty());
    }
}
