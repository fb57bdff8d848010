//! Audit entries: the leaf data of the log.

use serde::{Deserialize, Serialize};

use super::merkle::Hash;
use crate::error::{Error, FormatError};
use crate::ids::PartyUri;
use crate::suite;

/// Largest canonical entry accepted (bytes of JSON).
pub const MAX_ENTRY_LEN: usize = 64 * 1024;
/// Most subjects (patient pseudonyms) one entry may name.
pub const MAX_SUBJECTS: usize = 1024;
const MAX_ACTOR: usize = 1024;
const MAX_REASON: usize = 64;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// A local client submitted an envelope for sending.
    Send,
    /// An envelope was received from a peer for us.
    Receive,
    /// An envelope was accepted from a peer for relaying.
    Relay,
    /// An envelope was forwarded (delivered) to the next hop.
    Forward,
    /// A receipt was issued or received.
    Receipt,
    /// A client fetched an envelope or its content.
    Fetch,
    /// A client acknowledged an inbox item.
    Ack,
    /// A client listed its inbox or outbox.
    List,
    /// A client asked for the status of a message.
    Status,
    /// Keys, certificates or clients were provisioned.
    Provision,
    /// Stored data was purged (retention).
    Purge,
    /// Any other administrative action.
    Admin,
    /// The daemon started.
    Start,
    /// The daemon stopped.
    Stop,
}

impl AuditAction {
    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Receive => "receive",
            Self::Relay => "relay",
            Self::Forward => "forward",
            Self::Receipt => "receipt",
            Self::Fetch => "fetch",
            Self::Ack => "ack",
            Self::List => "list",
            Self::Status => "status",
            Self::Provision => "provision",
            Self::Purge => "purge",
            Self::Admin => "admin",
            Self::Start => "start",
            Self::Stop => "stop",
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// Done.
    Ok,
    /// Refused (policy, authentication, bad input): `reason` says why.
    Rejected,
    /// Attempted and failed (I/O, peer unreachable): `reason` says why.
    Failed,
}

impl AuditOutcome {
    /// The snake_case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Failed => "failed",
        }
    }
}

/// One audit record: who did what, when, to which message and patients, and
/// how it ended. Its leaf data in the Merkle tree is [`AuditEntry::to_canonical_json`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// Zero-based leaf index in the log.
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The party URI of the log owner.
    pub party: String,
    /// Who: `client:<uri>`, `peer:<uri>`, `admin`, `daemon`.
    pub actor: String,
    /// What.
    pub action: AuditAction,
    /// The message concerned, as `MessageId` displays it (lowercase UUID form).
    #[serde(deserialize_with = "Option::deserialize")]
    pub message_id: Option<String>,
    /// Patient pseudonyms ([`super::Pseudonym`]): 64 lowercase hex digits each.
    pub subjects: Vec<String>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// Reason code of a rejection or failure ([`Error::reason_code`]).
    #[serde(deserialize_with = "Option::deserialize")]
    pub reason: Option<String>,
    /// Free text.
    #[serde(deserialize_with = "Option::deserialize")]
    pub detail: Option<String>,
}

/// A message id as [`crate::MessageId`] displays it: lowercase UUID form,
/// 8-4-4-4-12 hex digits.
fn is_message_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, len)| is_lower_hex(p, len))
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl AuditEntry {
    /// The canonical leaf data: compact JSON, fields in declaration order,
    /// `None` as `null`, strings escaped as serde_json does.
    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Serializing plain strings, integers and enums to a Vec cannot fail.
        #[allow(clippy::expect_used)]
        serde_json::to_vec(self).expect("audit entry serializes")
    }

    /// The Merkle leaf hash of this entry: `SHA-256(0x00 || canonical JSON)`.
    pub fn leaf_hash(&self) -> Hash {
        suite::merkle_leaf_hash(&self.to_canonical_json())
    }

    /// Parses and validates an entry (unknown and missing fields are refused;
    /// optional values must be given as `null`).
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(FormatError::TooLarge {
                what: "audit entry",
                len: bytes.len() as u64,
                limit: MAX_ENTRY_LEN as u64,
            }
            .into());
        }
        let e: Self =
            serde_json::from_slice(bytes).map_err(|_| FormatError::Decode("audit entry"))?;
        e.validate()?;
        Ok(e)
    }

    /// Checks the field formats: party URI, actor, message id (UUID form),
    /// 64-hex subjects, reason code.
    pub fn validate(&self) -> Result<(), Error> {
        PartyUri::new(self.party.as_str())?;
        if self.actor.is_empty()
            || self.actor.len() > MAX_ACTOR
            || self.actor.chars().any(char::is_control)
        {
            return Err(FormatError::InvalidField("audit actor").into());
        }
        if let Some(m) = &self.message_id
            && !is_message_id(m)
        {
            return Err(FormatError::InvalidField("audit message_id").into());
        }
        if self.subjects.len() > MAX_SUBJECTS || !self.subjects.iter().all(|s| is_lower_hex(s, 64))
        {
            return Err(FormatError::InvalidField("audit subjects").into());
        }
        if let Some(r) = &self.reason
            && (r.is_empty() || r.len() > MAX_REASON || !r.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(FormatError::InvalidField("audit reason").into());
        }
        if self.to_canonical_json().len() > MAX_ENTRY_LEN {
            return Err(FormatError::TooLarge {
                what: "audit entry",
                len: self.to_canonical_json().len() as u64,
                limit: MAX_ENTRY_LEN as u64,
            }
            .into());
        }
        Ok(())
    }
}
