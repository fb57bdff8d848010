//! Validated identifiers: party URIs, message ids, certificate fingerprints.
//!
//! Each newtype checks its invariant on construction, so code that holds one
//! never re-validates it.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, FormatError};

/// Longest party URI we accept (bytes).
const MAX_PARTY_URI: usize = 512;

/// The name of a party (facility, agent, payer): an absolute URI carried in the
/// SubjectAltName of its certificates, e.g. `urn:jp:mhlw:facility:1312345678`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartyUri(String);

impl PartyUri {
    /// Validates `s` as an absolute URI: `scheme ":" rest`, printable ASCII, no spaces.
    pub fn new(s: impl Into<String>) -> Result<Self, Error> {
        let s = s.into();
        let bad = || Error::Format(FormatError::InvalidPartyUri(s.escape_debug().to_string()));
        if s.is_empty() || s.len() > MAX_PARTY_URI {
            return Err(bad());
        }
        let Some((scheme, rest)) = s.split_once(':') else {
            return Err(bad());
        };
        let mut sc = scheme.chars();
        let scheme_ok = sc.next().is_some_and(|c| c.is_ascii_alphabetic())
            && sc.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        let rest_ok = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_graphic());
        if !scheme_ok || !rest_ok {
            return Err(bad());
        }
        Ok(Self(s))
    }

    /// The URI text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PartyUri {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl fmt::Display for PartyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PartyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PartyUri({})", self.0)
    }
}

/// A 128-bit random message identifier, shown in UUID text form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Wraps 16 bytes.
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// Parses the wire form (exactly 16 bytes).
    pub fn from_slice(b: &[u8]) -> Result<Self, Error> {
        <[u8; 16]>::try_from(b)
            .map(Self)
            .map_err(|_| FormatError::InvalidField("message_id").into())
    }

    /// The 16 bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let compact: String = s.chars().filter(|&c| c != '-').collect();
        let mut b = [0u8; 16];
        hex::decode_to_slice(&compact, &mut b)
            .map_err(|_| Error::Format(FormatError::InvalidField("message_id")))?;
        Ok(Self(b))
    }
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps 32 bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// Parses the wire form (exactly 32 bytes); `field` names it in the error.
    pub fn from_slice(b: &[u8], field: &'static str) -> Result<Self, Error> {
        <[u8; 32]>::try_from(b)
            .map(Self)
            .map_err(|_| FormatError::InvalidField(field).into())
    }

    /// The 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn party_uri_validation() {
        for ok in [
            "urn:jp:facility:1312345678",
            "https://payer.example/ep",
            "a:b",
        ] {
            assert_eq!(PartyUri::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "nocolon",
            ":x",
            "1a:b",
            "urn:",
            "urn:a b",
            "urn:\u{3042}",
            "ur n:x",
        ] {
            assert!(
                matches!(
                    PartyUri::new(bad),
                    Err(Error::Format(FormatError::InvalidPartyUri(_)))
                ),
                "{bad:?} accepted"
            );
        }
        assert!(PartyUri::new(format!("urn:{}", "x".repeat(MAX_PARTY_URI))).is_err());
    }

    #[test]
    fn message_id_text_round_trip() {
        let id = MessageId::from_bytes([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s, "abababab-abab-abab-abab-abababababab");
        assert_eq!(s.parse::<MessageId>().unwrap(), id);
        assert!("abab".parse::<MessageId>().is_err());
        assert!(MessageId::from_slice(&[0; 15]).is_err());
    }
}
