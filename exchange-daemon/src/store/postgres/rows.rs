//! Rows read back as records, and the checks of values on their way into
//! and out of `bigint` columns.

use exchange_core::audit::Pseudonym;
use exchange_core::{MessageId, PartyUri};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::{Conn, pg_error};
use crate::error::StoreError;
pub(super) use crate::store::values::{message_id, message_key, party, to_i64, to_u64};
use crate::store::{
    DeliveryKind, DeliveryRecord, DeliveryState, MessageKey, MessageKind, MessageRecord,
    ProvisionDirection, ProvisionRecord, PurgedRecord,
};

pub(super) const MESSAGE_COLUMNS: &str = "id, header_sha256, kind, head, ciphertext_len, sender, \
     upstream, local_client, content_type, purpose, created_ms, expires_ms, received_ms, \
     our_receipt, acked_ms, fetched_ms, wire_id";

/// Delivery columns (of `deliveries d`), then its message's id.
pub(super) const DELIVERY_COLUMNS: &str = "d.id, d.message_id, d.target, d.kind, d.payload, \
     d.state, d.failure, d.attempts, d.next_attempt_ms, d.last_error, d.expires_ms, d.claim, \
     (SELECT m.wire_id FROM messages m WHERE m.id = d.message_id)";

/// The provision records naming the pseudonym `$1`, oldest first, each with
/// all its subjects (read by [`provision_from_row`]).
pub(super) const PROVISIONS_OF_SUBJECT: &str = "SELECT p.direction, p.wire_id, p.time_ms, \
     p.counterparty, p.counterparty_name, p.recipient, p.role, p.document_type, p.title, \
     p.purpose, p.content_type, p.receipt, \
     ARRAY(SELECT a.pseudonym FROM provision_subjects a \
           WHERE a.provision_id = p.id ORDER BY a.pseudonym) \
     FROM provisions p JOIN provision_subjects s ON s.provision_id = p.id \
     WHERE s.pseudonym = $1 ORDER BY p.time_ms, p.id";

/// A row of [`PROVISIONS_OF_SUBJECT`].
pub(super) fn provision_from_row(r: &Row) -> Result<ProvisionRecord, StoreError> {
    let direction: String = col(r, 0)?;
    Ok(ProvisionRecord {
        direction: ProvisionDirection::parse(&direction)
            .ok_or_else(|| StoreError::Corrupt(format!("provision direction {direction:?}")))?,
        message_id: message_id(col::<&[u8]>(r, 1)?)?,
        time_ms: to_u64(col(r, 2)?, "provision time_ms")?,
        counterparty: party(col(r, 3)?, "provision counterparty")?,
        counterparty_name: col(r, 4)?,
        recipient: party(col(r, 5)?, "provision recipient")?,
        role: col(r, 6)?,
        document_type: col(r, 7)?,
        title: col(r, 8)?,
        purpose: col(r, 9)?,
        content_type: col(r, 10)?,
        receipt: col(r, 11)?,
        subjects: col::<Vec<&[u8]>>(r, 12)?
            .into_iter()
            .map(|p| digest(p, "pseudonym").map(Pseudonym::from_bytes))
            .collect::<Result<_, _>>()?,
    })
}

/// The database's clock in Unix milliseconds: leases are reckoned by it,
/// so that replicas whose clocks differ agree on when a lease lapses.
pub(super) const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

pub(super) fn digest(b: &[u8], what: &str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(b).map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// Column `i` of a row, its type checked by the driver.
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a Row,
    i: usize,
) -> Result<T, StoreError> {
    r.try_get(i).map_err(pg_error)
}

/// Reads a row of [`MESSAGE_COLUMNS`].
pub(super) fn message_from_row(r: &Row) -> Result<MessageRecord, StoreError> {
    let kind: String = col(r, 2)?;
    Ok(MessageRecord {
        key: message_key(col::<&[u8]>(r, 0)?)?,
        header_sha256: digest(col::<&[u8]>(r, 1)?, "header_sha256")?,
        kind: MessageKind::parse(&kind).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "message kind {:?}",
                kind.escape_debug().to_string()
            ))
        })?,
        head: col(r, 3)?,
        ciphertext_len: to_u64(col(r, 4)?, "ciphertext_len")?,
        sender: party(col(r, 5)?, "sender")?,
        upstream: col::<Option<String>>(r, 6)?
            .map(|u| party(u, "upstream"))
            .transpose()?,
        local_client: col(r, 7)?,
        content_type: col(r, 8)?,
        purpose: col(r, 9)?,
        created_ms: to_u64(col(r, 10)?, "created_ms")?,
        expires_ms: to_u64(col(r, 11)?, "expires_ms")?,
        received_ms: to_u64(col(r, 12)?, "received_ms")?,
        our_receipt: col(r, 13)?,
        acked_ms: col::<Option<i64>>(r, 14)?
            .map(|a| to_u64(a, "acked_ms"))
            .transpose()?,
        fetched_ms: col::<Option<i64>>(r, 15)?
            .map(|f| to_u64(f, "fetched_ms"))
            .transpose()?,
        id: message_id(col::<&[u8]>(r, 16)?)?,
    })
}

/// Reads a row of [`DELIVERY_COLUMNS`].
pub(super) fn delivery_from_row(r: &Row) -> Result<DeliveryRecord, StoreError> {
    let id: i64 = col(r, 0)?;
    let kind: String = col(r, 3)?;
    let payload: Option<Vec<u8>> = col(r, 4)?;
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
    let state: String = col(r, 5)?;
    let failure: Option<String> = col(r, 6)?;
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
    let attempts: i32 = col(r, 7)?;
    Ok(DeliveryRecord {
        id,
        message: message_key(col::<&[u8]>(r, 1)?)?,
        target: party(col(r, 2)?, "delivery target")?,
        kind,
        state,
        attempts: u32::try_from(attempts)
            .map_err(|_| StoreError::Corrupt(format!("delivery {id}: attempts {attempts}")))?,
        next_attempt_ms: to_u64(col(r, 8)?, "next_attempt_ms")?,
        last_error: col(r, 9)?,
        expires_ms: to_u64(col(r, 10)?, "delivery expires_ms")?,
        claim: to_u64(col(r, 11)?, "delivery claim")?,
        message_id: message_id(col::<Option<&[u8]>>(r, 12)?.unwrap_or_default())?,
    })
}

/// Runs a query and maps its rows.
pub(super) async fn query_map<T>(
    conn: &Conn<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    map: impl Fn(&Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let stmt = conn.prepare_cached(sql).await.map_err(pg_error)?;
    conn.query(&stmt, params)
        .await
        .map_err(pg_error)?
        .iter()
        .map(map)
        .collect()
}

/// The message `sender` sent under `id`.
pub(super) async fn find_message(
    conn: &Conn<'_>,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<MessageRecord>, StoreError> {
    let rows = query_map(
        conn,
        &format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE sender = $1 AND wire_id = $2"),
        &[&sender.as_str(), &id.as_bytes().as_slice()],
        message_from_row,
    )
    .await?;
    Ok(rows.into_iter().next())
}

/// The message with key `key`.
pub(super) async fn load_message(
    conn: &Conn<'_>,
    key: &MessageKey,
) -> Result<Option<MessageRecord>, StoreError> {
    let rows = query_map(
        conn,
        &format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"),
        &[&key.as_bytes().as_slice()],
        message_from_row,
    )
    .await?;
    Ok(rows.into_iter().next())
}

/// What remains of a purged message `sender` sent under `id`, if any.
pub(super) async fn load_purged(
    conn: &Conn<'_>,
    sender: &PartyUri,
    id: &MessageId,
) -> Result<Option<PurgedRecord>, StoreError> {
    let rows = query_map(
        conn,
        "SELECT sender, header_sha256, expires_ms, our_receipt, purged_ms \
         FROM purged_messages WHERE sender = $1 AND wire_id = $2",
        &[&sender.as_str(), &id.as_bytes().as_slice()],
        |r| {
            Ok(PurgedRecord {
                id: *id,
                sender: party(col(r, 0)?, "sender")?,
                header_sha256: digest(col::<&[u8]>(r, 1)?, "header_sha256")?,
                expires_ms: to_u64(col(r, 2)?, "expires_ms")?,
                our_receipt: col(r, 3)?,
                purged_ms: to_u64(col(r, 4)?, "purged_ms")?,
            })
        },
    )
    .await?;
    Ok(rows.into_iter().next())
}

/// The kind and acknowledgement time of a stored message; `lock` takes
/// its row lock (for an update that depends on them).
pub(super) async fn load_kind_acked(
    conn: &Conn<'_>,
    key: &MessageKey,
    lock: bool,
) -> Result<Option<(MessageKind, Option<i64>)>, StoreError> {
    let sql = if lock {
        "SELECT kind, acked_ms FROM messages WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT kind, acked_ms FROM messages WHERE id = $1"
    };
    let rows = query_map(conn, sql, &[&key.as_bytes().as_slice()], |r| {
        let kind: String = col(r, 0)?;
        let kind = MessageKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message kind {kind:?}")))?;
        Ok((kind, col(r, 1)?))
    })
    .await?;
    Ok(rows.into_iter().next())
}
