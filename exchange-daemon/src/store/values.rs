//! What both backends do alike: values checked on their way into and out
//! of 64-bit signed integer columns and byte columns, and the order in
//! which due work is handed out.

use exchange_core::{MessageId, PartyUri};

use super::{DeliveryRecord, MessageKey};
use crate::error::StoreError;

/// A `u64` for an integer column (which holds at most `i64::MAX`).
pub(crate) fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{what} {v} exceeds i64::MAX")))
}

/// An integer column read back as `u64`: negative means corrupt.
pub(crate) fn to_u64(v: i64, what: &'static str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

/// A message id column.
pub(crate) fn message_id(b: &[u8]) -> Result<MessageId, StoreError> {
    MessageId::from_slice(b).map_err(|_| StoreError::Corrupt("message id is not 16 bytes".into()))
}

/// A message key column.
pub(crate) fn message_key(b: &[u8]) -> Result<MessageKey, StoreError> {
    <[u8; 16]>::try_from(b)
        .map(MessageKey::from_bytes)
        .map_err(|_| StoreError::Corrupt("message key is not 16 bytes".into()))
}

/// A party URI column.
pub(crate) fn party(s: String, what: &str) -> Result<PartyUri, StoreError> {
    PartyUri::new(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Due deliveries of every next hop (each queue oldest first), handed out
/// in turns: every target's first item (oldest first), then every target's
/// second, and so on, `limit` at most.
pub(crate) fn take_turns(
    mut queues: Vec<std::vec::IntoIter<DeliveryRecord>>,
    limit: usize,
) -> Vec<DeliveryRecord> {
    let mut due = Vec::new();
    while due.len() < limit && !queues.is_empty() {
        let mut turn: Vec<DeliveryRecord> = queues.iter_mut().filter_map(Iterator::next).collect();
        queues.retain(|q| !q.as_slice().is_empty());
        turn.sort_by_key(|d| (d.next_attempt_ms, d.id));
        turn.truncate(limit - due.len());
        due.extend(turn);
    }
    due
}
