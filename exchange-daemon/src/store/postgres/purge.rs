//! The retention purge (the same rules as the SQLite store's: see
//! [`Store::purge`](crate::store::Store::purge)).

use exchange_core::audit::AuditEntry;

use super::rows::{col, message_id, query_map, to_i64, to_u64};
use super::write::Audits;
use super::{Conn, pg_error};
use crate::error::StoreError;
use crate::store::{ClockJump, PurgePolicy, PurgeSummary};

/// Most messages one purge call removes (its audit entry lists them).
const PURGE_BATCH: i64 = 500;

/// A redelivery is still answered from a purged message's record this long
/// after its expiry (clocks of peers differ).
const PURGED_RECORD_MARGIN_MS: i64 = 86_400_000;

/// Checks the clock against the newest time a purge accepted; `Some` if it
/// is too far ahead (the suspension recorded, `suspended` audited the first
/// time). Otherwise the clock is accepted as the newest time. The row is
/// locked: replicas purging at once take turns.
async fn check_purge_clock(
    conn: &Conn<'_>,
    now: i64,
    max_jump: i64,
    suspended: AuditEntry,
    audits: &mut Audits,
) -> Result<Option<ClockJump>, StoreError> {
    conn.execute(
        "INSERT INTO purge_clock (id, last_ms, suspended_ms) \
         VALUES (1, COALESCE((SELECT MAX(received_ms) FROM messages), $1), NULL) \
         ON CONFLICT (id) DO NOTHING",
        &[&now],
    )
    .await
    .map_err(pg_error)?;
    let row = query_map(
        conn,
        "SELECT last_ms, suspended_ms FROM purge_clock WHERE id = 1 FOR UPDATE",
        &[],
        |r| Ok((col::<i64>(r, 0)?, col::<Option<i64>>(r, 1)?)),
    )
    .await?;
    let Some(&(last, since)) = row.first() else {
        return Err(StoreError::Corrupt("the purge clock row is missing".into()));
    };
    if now > last.saturating_add(max_jump) {
        conn.execute(
            "UPDATE purge_clock SET suspended_ms = COALESCE(suspended_ms, $1) WHERE id = 1",
            &[&now],
        )
        .await
        .map_err(pg_error)?;
        if since.is_none() {
            audits.push((suspended, None));
        }
        return Ok(Some(ClockJump {
            last_ms: to_u64(last, "purge_clock.last_ms")?,
            now_ms: to_u64(now, "now_ms")?,
            first: since.is_none(),
        }));
    }
    conn.execute(
        "UPDATE purge_clock SET last_ms = GREATEST(last_ms, $1), suspended_ms = NULL WHERE id = 1",
        &[&now],
    )
    .await
    .map_err(pg_error)?;
    Ok(None)
}

/// Deletes what the policy makes due, keeping a record of each message
/// until its expiry; returns what went.
pub(super) async fn purge(
    conn: &Conn<'_>,
    p: PurgePolicy,
    mut audit: AuditEntry,
    suspended: AuditEntry,
    audits: &mut Audits,
) -> Result<PurgeSummary, StoreError> {
    let now = to_i64(p.now_ms, "now_ms")?;
    let period = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
    let received_before = to_i64(p.received_before_ms, "received_before_ms")?;
    let expired_before = now.saturating_sub(period(p.receipt_grace_ms));
    if let Some(jump) =
        check_purge_clock(conn, now, period(p.max_clock_jump_ms), suspended, audits).await?
    {
        return Ok(PurgeSummary {
            clock_jump: Some(jump),
            ..PurgeSummary::default()
        });
    }
    let margin = now.saturating_sub(PURGED_RECORD_MARGIN_MS);
    for sql in [
        "DELETE FROM purged_messages WHERE expires_ms < $1",
        "DELETE FROM send_keys WHERE expires_ms < $1",
    ] {
        conn.execute(sql, &[&margin]).await.map_err(pg_error)?;
    }
    // Rows another replica's purge holds are skipped, not waited for.
    let due = query_map(
        conn,
        "SELECT id, ciphertext_len, wire_id FROM messages m WHERE received_ms < $1 \
         AND NOT EXISTS (SELECT 1 FROM deliveries d \
                         WHERE d.message_id = m.id AND d.state = 'pending') \
         AND NOT (kind = 'inbound' AND fetched_ms IS NULL) \
         AND NOT (kind IN ('outbound', 'relay') AND expires_ms >= $3 AND ( \
             NOT EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id) \
             OR EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id \
                 AND NOT EXISTS (SELECT 1 FROM receipts x \
                     WHERE x.message_id = m.id AND x.issuer = a.party \
                     AND x.disposition IN ('DELIVERED', 'PROCESSED', 'REJECTED'))))) \
         ORDER BY received_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[&received_before, &PURGE_BATCH, &expired_before],
        |r| {
            Ok((
                col::<Vec<u8>>(r, 0)?,
                col::<i64>(r, 1)?,
                col::<Vec<u8>>(r, 2)?,
            ))
        },
    )
    .await?;
    let mut summary = PurgeSummary::default();
    for (id, len, wire_id) in due {
        conn.execute(
            "INSERT INTO purged_messages \
             (key, wire_id, sender, header_sha256, expires_ms, our_receipt, purged_ms) \
             SELECT id, wire_id, sender, header_sha256, expires_ms, our_receipt, $2 \
             FROM messages WHERE id = $1 \
             ON CONFLICT (key) DO UPDATE SET purged_ms = EXCLUDED.purged_ms",
            &[&id, &now],
        )
        .await
        .map_err(pg_error)?;
        for sql in [
            "DELETE FROM deliveries WHERE message_id = $1",
            "DELETE FROM receipts WHERE message_id = $1",
            "DELETE FROM message_awaited WHERE message_id = $1",
            "DELETE FROM message_subjects WHERE message_id = $1",
            "DELETE FROM message_meta WHERE message_id = $1",
            "DELETE FROM blob_chunks WHERE message_id = $1",
            "DELETE FROM messages WHERE id = $1",
        ] {
            conn.execute(sql, &[&id]).await.map_err(pg_error)?;
        }
        summary.messages.push(message_id(&wire_id)?);
        summary.bytes += to_u64(len, "ciphertext_len")?;
    }
    if !summary.messages.is_empty() {
        let ids = summary
            .messages
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let detail = format!(
            "{} message(s), {} ciphertext bytes: {ids}",
            summary.messages.len(),
            summary.bytes
        );
        audit.detail = Some(match audit.detail.take() {
            Some(d) => format!("{d}; {detail}"),
            None => detail,
        });
        audits.push((audit, None));
    }
    Ok(summary)
}
