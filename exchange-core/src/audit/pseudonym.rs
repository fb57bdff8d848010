//! Patient pseudonyms: the audit log names patients only by a keyed hash.

use std::fmt;
use std::str::FromStr;

use rand_core::CryptoRng;

use crate::error::{Error, FormatError};
use crate::suite::{self, SecretKey32};

/// The facility's secret pseudonym key (32 bytes). Zeroized on drop; never printed.
///
/// Whoever holds it can test whether a given patient id appears in the log;
/// without it, the pseudonyms reveal nothing about the ids.
pub struct SubjectKey(SecretKey32);

impl SubjectKey {
    /// A fresh random key.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        Self(SecretKey32::random(rng))
    }

    /// Wraps stored key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(SecretKey32::from_bytes(bytes))
    }

    /// The key bytes, for writing the key file.
    pub fn expose_secret(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }

    /// The pseudonym of `subject_id`:
    /// `HMAC-SHA256(key, "exchange/v1 subject pseudonym" || 0x00 || subject_id)`.
    pub fn pseudonym(&self, subject_id: &str) -> Pseudonym {
        Pseudonym(suite::subject_pseudonym(&self.0, subject_id.as_bytes()))
    }
}

impl fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectKey([redacted])")
    }
}

/// A patient pseudonym: 32 bytes, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym([u8; 32]);

impl Pseudonym {
    /// Wraps 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits (the form in [`super::AuditEntry::subjects`]).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Result<Self, Error> {
        let bad = || FormatError::InvalidField("pseudonym");
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad().into());
        }
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|_| bad())?;
        Ok(Self(b))
    }
}

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({})", self.to_hex())
    }
}

impl FromStr for Pseudonym {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::from_hex(s)
    }
}
