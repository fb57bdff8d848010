//! Rows read back as records (messages, deliveries, purged messages,
//! provision records, the audit tail), and the checks of values on their way
//! into and out of SQLite integers.

use exchange_core::audit::Pseudonym;
use exchange_core::{MessageId, PartyUri};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::StoreError;
pub(super) use crate::store::values::{message_id, message_key, party, to_i64, to_u64};
use crate::store::{
    AuditTail, DeliveryKind, DeliveryRecord, DeliveryState, MessageKey, MessageKind, MessageRecord,
    ProvisionDirection, ProvisionRecord, PurgedRecord,
};

pub(super) const MESSAGE_COLUMNS: &str = "id, header_sha256, kind, head, ciphertext_len, sender, upstream, \
     local_client, content_type, purpose, created_ms, expires_ms, received_ms, our_receipt, acked_ms, \
     fetched_ms, wire_id";

/// The last column but one is the message id of the delivery's message
/// (`message_id` is its key); the last, the fencing token of its claim.
pub(super) const DELIVERY_COLUMNS: &str = "id, message_id, target, kind, payload, state, failure, attempts, \
     next_attempt_ms, last_error, expires_ms, \
     (SELECT m.wire_id FROM messages m WHERE m.id = message_id), claim";

/// The first target after `?1` (in text order) with pending deliveries: a
/// step of the skip scan over `deliveries_target_due`.
pub(super) const NEXT_PENDING_TARGET: &str = "SELECT target FROM deliveries \
     WHERE state = 'pending' AND target > ?1 ORDER BY target LIMIT 1";

/// Up to `?3` deliveries to target `?1` due at `?2` and not claimed, oldest
/// first, from `deliveries_target_due`.
pub(super) fn due_for_target_sql() -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries \
         WHERE state = 'pending' AND target = ?1 AND next_attempt_ms <= ?2 \
           AND (claim_until_ms IS NULL OR claim_until_ms < ?2) \
         ORDER BY next_attempt_ms, id LIMIT ?3"
    )
}

/// See [`Store::audit_tail`](crate::store::Store::audit_tail); call inside a read transaction.
pub fn audit_tail(conn: &Connection) -> Result<AuditTail, StoreError> {
    let checkpoint: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT tree_size, frontier, signed FROM audit_checkpoints \
             ORDER BY tree_size DESC LIMIT 1",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let from = checkpoint.as_ref().map_or(0, |c| c.0);
    let entries = conn
        .prepare_cached("SELECT seq, entry, leaf_hash FROM audit_log WHERE seq >= ?1 ORDER BY seq")?
        .query_map([from], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?
        .map(|row| {
            let (seq, entry, leaf) = row?;
            let leaf = <[u8; 32]>::try_from(leaf.as_slice())
                .map_err(|_| StoreError::Corrupt("audit leaf hash is not 32 bytes".into()))?;
            Ok((to_u64(seq, "audit seq")?, entry, leaf))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(AuditTail {
        checkpoint: checkpoint
            .map(|(size, f, signed)| Ok::<_, StoreError>((to_u64(size, "tree_size")?, f, signed)))
            .transpose()?,
        entries,
    })
}

/// What remains of a purged message `sender` sent under `id`, if any.
pub(super) fn load_purged(
    conn: &Connection,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<PurgedRecord>, StoreError> {
    conn.prepare_cached(
        "SELECT sender, header_sha256, expires_ms, our_receipt, purged_ms \
         FROM purged_messages WHERE sender = ?1 AND wire_id = ?2",
    )?
    .query_row(params![sender.as_str(), id.as_bytes()], |r| {
        let sender: String = r.get(0)?;
        let header: Vec<u8> = r.get(1)?;
        let expires: i64 = r.get(2)?;
        let our_receipt: Option<Vec<u8>> = r.get(3)?;
        let purged: i64 = r.get(4)?;
        Ok((|| -> Result<PurgedRecord, StoreError> {
            Ok(PurgedRecord {
                id: *id,
                sender: party(sender, "sender")?,
                header_sha256: <[u8; 32]>::try_from(header.as_slice())
                    .map_err(|_| StoreError::Corrupt("header_sha256 is not 32 bytes".into()))?,
                expires_ms: to_u64(expires, "expires_ms")?,
                our_receipt,
                purged_ms: to_u64(purged, "purged_ms")?,
            })
        })())
    })
    .optional()?
    .transpose()
}

pub(super) fn load_message(
    conn: &Connection,
    key: &MessageKey,
) -> Result<Option<MessageRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?1"
    ))?
    .query_row([key.as_bytes()], message_from_row)
    .optional()?
    .transpose()
}

/// The message `sender` sent under `id`.
pub(super) fn find_message(
    conn: &Connection,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<MessageRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = ?1 AND wire_id = ?2"
    ))?
    .query_row(params![sender.as_str(), id.as_bytes()], message_from_row)
    .optional()?
    .transpose()
}

/// The kind and acknowledgement time of a stored message.
pub(super) fn load_kind_acked(
    conn: &Connection,
    id: &MessageKey,
) -> Result<Option<(MessageKind, Option<i64>)>, StoreError> {
    let row: Option<(String, Option<i64>)> = conn
        .prepare_cached("SELECT kind, acked_ms FROM messages WHERE id = ?1")?
        .query_row([id.as_bytes()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    row.map(|(kind, acked)| Ok((message_kind(&kind)?, acked)))
        .transpose()
}

/// Reads a row of [`MESSAGE_COLUMNS`]. Outer error: SQLite; inner: content.
pub(super) fn message_from_row(r: &Row<'_>) -> rusqlite::Result<Result<MessageRecord, StoreError>> {
    let id: Vec<u8> = r.get(0)?;
    let header: Vec<u8> = r.get(1)?;
    let kind: String = r.get(2)?;
    let head: Vec<u8> = r.get(3)?;
    let ciphertext_len: i64 = r.get(4)?;
    let sender: String = r.get(5)?;
    let upstream: Option<String> = r.get(6)?;
    let local_client: Option<String> = r.get(7)?;
    let content_type: String = r.get(8)?;
    let purpose: String = r.get(9)?;
    let created_ms: i64 = r.get(10)?;
    let expires_ms: i64 = r.get(11)?;
    let received_ms: i64 = r.get(12)?;
    let our_receipt: Option<Vec<u8>> = r.get(13)?;
    let acked_ms: Option<i64> = r.get(14)?;
    let fetched_ms: Option<i64> = r.get(15)?;
    let wire_id: Vec<u8> = r.get(16)?;
    Ok((|| -> Result<MessageRecord, StoreError> {
        Ok(MessageRecord {
            key: message_key(&id)?,
            id: message_id(&wire_id)?,
            header_sha256: <[u8; 32]>::try_from(header.as_slice())
                .map_err(|_| StoreError::Corrupt("header_sha256 is not 32 bytes".into()))?,
            kind: message_kind(&kind)?,
            head,
            ciphertext_len: to_u64(ciphertext_len, "ciphertext_len")?,
            sender: party(sender, "sender")?,
            upstream: upstream.map(|u| party(u, "upstream")).transpose()?,
            local_client,
            content_type,
            purpose,
            created_ms: to_u64(created_ms, "created_ms")?,
            expires_ms: to_u64(expires_ms, "expires_ms")?,
            received_ms: to_u64(received_ms, "received_ms")?,
            our_receipt,
            acked_ms: acked_ms.map(|a| to_u64(a, "acked_ms")).transpose()?,
            fetched_ms: fetched_ms.map(|f| to_u64(f, "fetched_ms")).transpose()?,
        })
    })())
}

/// Reads a row of [`DELIVERY_COLUMNS`]. Outer error: SQLite; inner: content.
pub(super) fn delivery_from_row(
    r: &Row<'_>,
) -> rusqlite::Result<Result<DeliveryRecord, StoreError>> {
    let id: i64 = r.get(0)?;
    let message: Vec<u8> = r.get(1)?;
    let target: String = r.get(2)?;
    let kind: String = r.get(3)?;
    let payload: Option<Vec<u8>> = r.get(4)?;
    let state: String = r.get(5)?;
    let failure: Option<String> = r.get(6)?;
    let attempts: i64 = r.get(7)?;
    let next_attempt_ms: i64 = r.get(8)?;
    let last_error: Option<String> = r.get(9)?;
    let expires_ms: i64 = r.get(10)?;
    let wire_id: Option<Vec<u8>> = r.get(11)?;
    let claim: i64 = r.get(12)?;
    Ok((|| -> Result<DeliveryRecord, StoreError> {
        let kind = match (kind.as_str(), payload) {
            ("envelope", None) => DeliveryKind::Envelope,
            ("receipt", Some(bytes)) => DeliveryKind::Receipt(bytes),
            (k, _) => {
                return Err(StoreError::Corrupt(format!(
                    "delivery {id}: kind {:?} with or without payload",
                    k.escape_debug().to_string()
                )));
            }
        };
        let state = match (state.as_str(), failure) {
            ("pending", _) => DeliveryState::Pending,
            ("done", _) => DeliveryState::Done,
            ("failed", Some(reason)) => DeliveryState::Failed(reason),
            (s, _) => {
                return Err(StoreError::Corrupt(format!(
                    "delivery {id}: state {:?}",
                    s.escape_debug().to_string()
                )));
            }
        };
        Ok(DeliveryRecord {
            id,
            message: message_key(&message)?,
            message_id: message_id(wire_id.as_deref().unwrap_or_default())?,
            target: party(target, "delivery target")?,
            kind,
            state,
            attempts: u32::try_from(attempts)
                .map_err(|_| StoreError::Corrupt(format!("delivery {id}: attempts {attempts}")))?,
            next_attempt_ms: to_u64(next_attempt_ms, "next_attempt_ms")?,
            last_error,
            expires_ms: to_u64(expires_ms, "delivery expires_ms")?,
            claim: to_u64(claim, "delivery claim")?,
        })
    })())
}

pub(super) fn message_kind(s: &str) -> Result<MessageKind, StoreError> {
    MessageKind::parse(s).ok_or_else(|| {
        StoreError::Corrupt(format!("message kind {:?}", s.escape_debug().to_string()))
    })
}

pub(super) fn check_len(actual: Option<u64>, declared: u64) -> Result<(), StoreError> {
    if actual == Some(declared) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "ciphertext is {actual:?} bytes, envelope declares {declared}"
        )))
    }
}

/// Provision records naming `subject`, oldest first (see [`Store::provisions`](crate::store::Store::provisions)).
pub fn provisions_for(
    conn: &Connection,
    subject: &Pseudonym,
) -> Result<Vec<ProvisionRecord>, StoreError> {
    let rows = conn
        .prepare_cached(
            "SELECT p.id, p.direction, COALESCE(p.wire_id, p.message_id), p.time_ms, p.counterparty, \
             p.counterparty_name, p.recipient, p.role, p.document_type, p.title, p.purpose, \
             p.content_type, p.receipt FROM provisions p \
             JOIN provision_subjects s ON s.provision_id = p.id \
             WHERE s.pseudonym = ?1 ORDER BY p.time_ms, p.id",
        )?
        .query_map([subject.as_bytes()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                (
                    r.get::<_, String>(8)?,
                    r.get::<_, String>(9)?,
                    r.get::<_, String>(10)?,
                    r.get::<_, String>(11)?,
                    r.get::<_, Vec<u8>>(12)?,
                ),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut subjects = conn.prepare_cached(
        "SELECT pseudonym FROM provision_subjects WHERE provision_id = ?1 ORDER BY pseudonym",
    )?;
    rows.into_iter()
        .map(
            |(id, direction, message, time_ms, counterparty, name, recipient, role, what)| {
                let (document_type, title, purpose, content_type, receipt) = what;
                let subjects = subjects
                    .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
                    .map(|p| {
                        let p = p?;
                        <[u8; 32]>::try_from(p.as_slice())
                            .map(Pseudonym::from_bytes)
                            .map_err(|_| StoreError::Corrupt("pseudonym is not 32 bytes".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ProvisionRecord {
                    direction: ProvisionDirection::parse(&direction).ok_or_else(|| {
                        StoreError::Corrupt(format!("provision direction {direction:?}"))
                    })?,
                    message_id: message_id(&message)?,
                    time_ms: to_u64(time_ms, "provision time_ms")?,
                    counterparty: party(counterparty, "provision counterparty")?,
                    counterparty_name: name,
                    recipient: party(recipient, "provision recipient")?,
                    role,
                    document_type,
                    title,
                    purpose,
                    content_type,
                    receipt,
                    subjects,
                })
            },
        )
        .collect()
}
