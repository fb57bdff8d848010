//! The retention purge: what a purge may remove, the clock it runs by, and
//! the record it keeps of each removed message until its expiry.

use exchange_core::audit::AuditEntry;
use rusqlite::{Connection, OptionalExtension, params};

use super::files::valid_blob_name;
use super::rows::{message_id, to_i64, to_u64};
use super::write::append_audit;
use crate::error::StoreError;
use crate::store::{ClockJump, PurgePolicy, PurgeSummary};

/// Most messages one [`Store::purge`](crate::store::Store::purge) call removes (its audit entry lists them).
pub const PURGE_BATCH: i64 = 500;

/// A redelivery is still answered from a purged message's record this long
/// after its expiry (clocks of peers differ).
const PURGED_RECORD_MARGIN_MS: i64 = 86_400_000;

/// [`PurgePolicy`] in database integers.
pub(super) struct PurgeLimits {
    now: i64,
    received_before: i64,
    /// Sent and relayed messages expiring before this are past their grace period.
    expired_before: i64,
    max_jump: i64,
}

impl PurgeLimits {
    pub(super) fn new(p: PurgePolicy) -> Result<Self, StoreError> {
        let now = to_i64(p.now_ms, "now_ms")?;
        // Periods beyond the integer range mean "for ever".
        let period = |ms: u64| i64::try_from(ms).unwrap_or(i64::MAX);
        Ok(Self {
            now,
            received_before: to_i64(p.received_before_ms, "received_before_ms")?,
            expired_before: now.saturating_sub(period(p.receipt_grace_ms)),
            max_jump: period(p.max_clock_jump_ms),
        })
    }
}

/// Checks the clock against the newest time a purge accepted (before the
/// first purge: the newest time a message was received); `Some` if it is
/// too far ahead (the suspension recorded, `suspended` appended the first
/// time). Otherwise the clock is accepted as the newest time.
fn check_purge_clock(
    conn: &Connection,
    p: &PurgeLimits,
    suspended: AuditEntry,
) -> Result<Option<ClockJump>, StoreError> {
    let row: Option<(i64, Option<i64>)> = conn
        .prepare_cached("SELECT last_ms, suspended_ms FROM purge_clock WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (last, since) = match row {
        Some(r) => r,
        None => {
            let newest: Option<i64> = conn
                .prepare_cached("SELECT MAX(received_ms) FROM messages")?
                .query_row([], |r| r.get(0))?;
            (newest.unwrap_or(p.now), None)
        }
    };
    if p.now > last.saturating_add(p.max_jump) {
        conn.prepare_cached(
            "INSERT INTO purge_clock (id, last_ms, suspended_ms) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET suspended_ms = COALESCE(suspended_ms, ?2)",
        )?
        .execute([last, p.now])?;
        if since.is_none() {
            append_audit(conn, suspended, None)?;
        }
        return Ok(Some(ClockJump {
            last_ms: to_u64(last, "purge_clock.last_ms")?,
            now_ms: to_u64(p.now, "now_ms")?,
            first: since.is_none(),
        }));
    }
    conn.prepare_cached(
        "INSERT INTO purge_clock (id, last_ms, suspended_ms) VALUES (1, ?1, NULL) \
         ON CONFLICT (id) DO UPDATE SET last_ms = max(last_ms, ?1), suspended_ms = NULL",
    )?
    .execute([p.now])?;
    Ok(None)
}

/// Deletes what the policy makes due (see [`Store::purge`](crate::store::Store::purge)), keeping a
/// record of each message until its expiry; returns what went and the
/// blob files to remove after the commit.
pub(super) fn purge(
    conn: &Connection,
    p: &PurgeLimits,
    mut audit: AuditEntry,
    suspended: AuditEntry,
) -> Result<(PurgeSummary, Vec<String>), StoreError> {
    if let Some(jump) = check_purge_clock(conn, p, suspended)? {
        return Ok((
            PurgeSummary {
                clock_jump: Some(jump),
                ..PurgeSummary::default()
            },
            Vec::new(),
        ));
    }
    conn.prepare_cached("DELETE FROM purged_messages WHERE expires_ms < ?1")?
        .execute([p.now.saturating_sub(PURGED_RECORD_MARGIN_MS)])?;
    conn.prepare_cached("DELETE FROM send_keys WHERE expires_ms < ?1")?
        .execute([p.now.saturating_sub(PURGED_RECORD_MARGIN_MS)])?;
    let due = conn
        .prepare_cached(
            "SELECT id, blob, ciphertext_len, wire_id FROM messages m WHERE received_ms < ?1 \
             AND NOT EXISTS (SELECT 1 FROM deliveries d \
                             WHERE d.message_id = m.id AND d.state = 'pending') \
             AND NOT (kind = 'inbound' AND fetched_ms IS NULL) \
             AND NOT (kind IN ('outbound', 'relay') AND expires_ms >= ?3 AND ( \
                 NOT EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id) \
                 OR EXISTS (SELECT 1 FROM message_awaited a WHERE a.message_id = m.id \
                     AND NOT EXISTS (SELECT 1 FROM receipts x \
                         WHERE x.message_id = m.id AND x.issuer = a.party \
                         AND x.disposition IN ('DELIVERED', 'PROCESSED', 'REJECTED'))))) \
             ORDER BY received_ms, id LIMIT ?2",
        )?
        .query_map(
            params![p.received_before, PURGE_BATCH, p.expired_before],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let mut summary = PurgeSummary::default();
    let mut files = Vec::new();
    for (id, blob, len, wire_id) in due {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO purged_messages \
             (key, wire_id, sender, header_sha256, expires_ms, our_receipt, purged_ms) \
             SELECT id, wire_id, sender, header_sha256, expires_ms, our_receipt, ?2 \
             FROM messages WHERE id = ?1",
        )?
        .execute(params![&id, p.now])?;
        for sql in [
            "DELETE FROM deliveries WHERE message_id = ?1",
            "DELETE FROM receipts WHERE message_id = ?1",
            "DELETE FROM message_awaited WHERE message_id = ?1",
            "DELETE FROM message_subjects WHERE message_id = ?1",
            "DELETE FROM message_meta WHERE message_id = ?1",
            "DELETE FROM messages WHERE id = ?1",
        ] {
            conn.prepare_cached(sql)?.execute([&id])?;
        }
        summary.messages.push(message_id(&wire_id)?);
        summary.bytes += to_u64(len, "ciphertext_len")?;
        if let Some(name) = blob.filter(|n| valid_blob_name(n)) {
            files.push(name);
        }
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
        append_audit(conn, audit, None)?;
    }
    Ok((summary, files))
}
