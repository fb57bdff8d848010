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

/// A subject set as an audit entry refers to it and as the store keeps it.
pub(crate) struct SubjectSetRows {
    /// The reference the entry carries.
    pub(crate) reference: exchange_core::audit::SubjectSet,
    /// The pseudonyms, as bytes.
    pub(crate) set: Vec<[u8; 32]>,
    /// The set's digest: the key it is kept under in `audit_subject_sets`.
    pub(crate) digest: Vec<u8>,
}

/// The subject set an audit entry naming these pseudonyms (64 hex digits
/// each) refers to.
pub(crate) fn subject_set(subjects: &[String]) -> Result<SubjectSetRows, StoreError> {
    let set = subjects
        .iter()
        .map(|h| {
            let mut p = [0u8; 32];
            hex::decode_to_slice(h, &mut p)
                .map_err(|_| StoreError::Invalid("audit subject is not 64 hex digits".into()))?;
            Ok(p)
        })
        .collect::<Result<Vec<[u8; 32]>, StoreError>>()?;
    let reference = exchange_core::audit::SubjectSet::of(&set);
    let digest = hex::decode(&reference.sha256)
        .map_err(|_| StoreError::Invalid("subject set digest".into()))?;
    Ok(SubjectSetRows {
        reference,
        set,
        digest,
    })
}

/// Resolves with the reason once `failed` holds one; never if its sender
/// is dropped (the store was closed normally). See
/// [`Store::failure`](super::Store::failure).
pub(crate) fn failure_of(
    mut failed: tokio::sync::watch::Receiver<Option<String>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> {
    Box::pin(async move {
        let why = failed
            .wait_for(Option::is_some)
            .await
            .map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            Err(_) => std::future::pending().await,
        }
    })
}
