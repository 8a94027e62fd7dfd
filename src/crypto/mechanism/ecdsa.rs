//! ECDSA: raw (the input is the hash, output raw r‖s) and hashed.

use super::{Mechanism, Plain};

/// CKM_ECDSA and CKM_ECDSA_SHA*.
pub static ECDSA: Plain = Plain {
    raw: Mechanism::Ecdsa,
    hashed: Mechanism::EcdsaHash,
};
