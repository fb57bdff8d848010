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
/// Most subjects an entry written by this version names in `subjects`; a
/// message naming more is referred to by a [`SubjectSet`] instead.
pub const MAX_INLINE_SUBJECTS: usize = 64;
/// Longest `actor` (bytes).
pub const MAX_ACTOR: usize = 1024;
/// Longest `detail` an entry written by this version carries (bytes): longer
/// free text is cut by [`log_text`].
pub const MAX_DETAIL: usize = 4096;
const MAX_REASON: usize = 64;
/// Domain separation of a [`SubjectSet`] digest.
const SUBJECT_SET_CONTEXT: &[u8] = b"exchange/v1 audit subject set";

/// Free text as it may enter the log: every control character (and the
/// backslash, so the escape is unambiguous) is written as a Rust-style
/// escape (`\n`, `\u{1b}`, `\\`), and the result is cut, at a character
/// boundary, to at most `max` bytes, ending in `…[N bytes]` (the length of
/// the original text) when it was cut. Text that came from a peer or a
/// client (error messages quoting a party URI or a purpose) can then neither
/// grow an entry beyond [`MAX_ENTRY_LEN`] nor forge lines in a terminal.
pub fn log_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    let mut cut = false;
    for c in text.chars() {
        let piece: String = if c.is_control() || c == '\\' {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max {
            cut = true;
            break;
        }
        out.push_str(&piece);
    }
    if cut {
        let marker = format!("…[{} bytes]", text.len());
        while out.len() + marker.len() > max {
            if out.pop().is_none() {
                break;
            }
        }
        if out.len() + marker.len() <= max {
            out.push_str(&marker);
        }
    }
    out
}

/// The subjects of an entry given by reference: the number of distinct
/// pseudonyms and a digest of the set, `SHA-256("exchange/v1 audit subject
/// set" || 0x00 || p1 || p2 || …)` over the 32-byte pseudonyms in ascending
/// byte order. The log owner stores each set once beside the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectSet {
    /// How many distinct pseudonyms the set holds.
    pub count: u64,
    /// The digest, 64 lowercase hex digits.
    pub sha256: String,
}

impl SubjectSet {
    /// The reference to a set of 32-byte pseudonyms (sorted and
    /// deduplicated here).
    pub fn of(pseudonyms: &[[u8; 32]]) -> Self {
        let mut sorted = pseudonyms.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut input = Vec::with_capacity(SUBJECT_SET_CONTEXT.len() + 1 + sorted.len() * 32);
        input.extend_from_slice(SUBJECT_SET_CONTEXT);
        input.push(0);
        for p in &sorted {
            input.extend_from_slice(p);
        }
        Self {
            count: sorted.len() as u64,
            sha256: hex::encode(suite::sha256(&input)),
        }
    }
}

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
    /// The message's subjects by reference, when they are too many to list
    /// in `subjects` (which is then empty). Absent from the JSON when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_set: Option<SubjectSet>,
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
    /// 64-hex subjects, subject set, reason code, and the size of the
    /// canonical entry. The one rule for entries: the daemon applies it when
    /// it appends, the export writer and the verifier when they read.
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
        if let Some(set) = &self.subject_set
            && (!self.subjects.is_empty() || set.count == 0 || !is_lower_hex(&set.sha256, 64))
        {
            return Err(FormatError::InvalidField("audit subject_set").into());
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
