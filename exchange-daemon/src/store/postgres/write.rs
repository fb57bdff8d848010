//! The statements of the write operations, each run inside the caller's
//! transaction.
//!
//! Lock order, the same in every transaction so that two replicas never
//! wait for each other in a cycle: rows of the message and its deliveries
//! first, receipts in digest order, provision records, and the audit head
//! last ([`append_audits`]), just before the commit. Audit entries are
//! therefore collected in an [`Audits`] list as the operation goes and
//! appended at its end.

use exchange_core::audit::{AuditEntry, MAX_INLINE_SUBJECTS};
use exchange_core::suite::sha256;

use super::rows::{DB_NOW_MS, col, find_message, load_purged, query_map, to_i64, to_u64};
use super::{Conn, pg_error};
use crate::error::StoreError;
use crate::store::{
    Accepted, DeliveryKind, MessageKey, MessageMeta, NewDelivery, NewEnvelope, NewProvision,
    NewReceipt,
};

/// Audit entries to append at the end of a transaction, each with the
/// message whose patients it concerns.
pub(super) type Audits = Vec<(AuditEntry, Option<MessageKey>)>;

/// A [`NewReceipt`] with its digest and values converted for `bigint`s.
pub(super) struct ReceiptRow {
    pub(super) digest: [u8; 32],
    pub(super) r: NewReceipt,
    issued_ms: i64,
    verified_ms: i64,
}

impl ReceiptRow {
    pub(super) fn new(r: NewReceipt) -> Result<Self, StoreError> {
        Ok(Self {
            digest: sha256(&r.signed),
            issued_ms: to_i64(r.issued_ms, "receipt issued_ms")?,
            verified_ms: to_i64(r.verified_ms, "receipt verified_ms")?,
            r,
        })
    }
}

/// Checks the values of an envelope before anything is written.
pub(super) fn check_envelope(e: &NewEnvelope) -> Result<(), StoreError> {
    to_i64(e.ciphertext_len, "ciphertext_len")?;
    to_i64(e.created_ms, "created_ms")?;
    to_i64(e.expires_ms, "expires_ms")?;
    to_i64(e.received_ms, "received_ms")?;
    for d in &e.deliveries {
        to_i64(d.expires_ms, "delivery expires_ms")?;
    }
    if let Some(p) = &e.provision {
        to_i64(p.time_ms, "provision time_ms")?;
    }
    Ok(())
}

/// Whether a key is used by a message, a purged message's record or a
/// provision record.
async fn key_used(conn: &Conn<'_>, key: &[u8]) -> Result<bool, StoreError> {
    let rows = query_map(
        conn,
        "SELECT EXISTS (SELECT 1 FROM messages WHERE id = $1) \
         OR EXISTS (SELECT 1 FROM purged_messages WHERE key = $1) \
         OR EXISTS (SELECT 1 FROM provisions WHERE message_id = $1)",
        &[&key],
        |r| col::<bool>(r, 0),
    )
    .await?;
    Ok(rows.into_iter().next().unwrap_or(true))
}

/// A key for a new message: its id if no row uses that key, else random.
async fn new_key(conn: &Conn<'_>, e: &NewEnvelope) -> Result<MessageKey, StoreError> {
    if !key_used(conn, e.id.as_bytes()).await? {
        return Ok(MessageKey::of_id(e.id));
    }
    random_key(conn).await
}

async fn random_key(conn: &Conn<'_>) -> Result<MessageKey, StoreError> {
    for _ in 0..8 {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k)
            .map_err(|e| StoreError::Corrupt(format!("no randomness for a message key: {e}")))?;
        if !key_used(conn, &k).await? {
            return Ok(MessageKey::from_bytes(k));
        }
    }
    Err(StoreError::Corrupt(
        "no unused message key after 8 random draws".into(),
    ))
}

/// Inserts a message row (ciphertext inline, or `chunked` to follow)
/// under a new key, or returns the record stored (or purged) for the same
/// sender and id. A concurrent insert of the same (sender, id) on another
/// replica waits for that one's transaction and then sees its row: the
/// unique constraint decides, not a check before the insert.
pub(super) async fn insert_message_row(
    conn: &Conn<'_>,
    e: &NewEnvelope,
    inline: Option<&[u8]>,
) -> Result<Result<MessageKey, Accepted>, StoreError> {
    if let Some(purged) = load_purged(conn, &e.sender, &e.id).await? {
        return Ok(Err(Accepted::Purged(Box::new(purged))));
    }
    let mut key = new_key(conn, e).await?;
    let insert = conn
        .prepare_cached(
            "INSERT INTO messages (id, header_sha256, kind, head, ciphertext, chunked, \
             ciphertext_len, sender, upstream, local_client, content_type, purpose, created_ms, \
             expires_ms, received_ms, our_receipt, wire_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_error)?;
    for _ in 0..3 {
        let n = conn
            .execute(
                &insert,
                &[
                    &key.as_bytes().as_slice(),
                    &e.header_sha256.as_slice(),
                    &e.kind.as_str(),
                    &e.head,
                    &inline,
                    &inline.is_none(),
                    &to_i64(e.ciphertext_len, "ciphertext_len")?,
                    &e.sender.as_str(),
                    &e.upstream.as_ref().map(|u| u.as_str()),
                    &e.local_client,
                    &e.content_type,
                    &e.purpose,
                    &to_i64(e.created_ms, "created_ms")?,
                    &to_i64(e.expires_ms, "expires_ms")?,
                    &to_i64(e.received_ms, "received_ms")?,
                    &e.our_receipt,
                    &e.id.as_bytes().as_slice(),
                ],
            )
            .await
            .map_err(pg_error)?;
        if n == 1 {
            return Ok(Ok(key));
        }
        if let Some(stored) = find_message(conn, &e.sender, &e.id).await? {
            return Ok(Err(Accepted::Duplicate(Box::new(stored))));
        }
        // Another sender's message took the key first: draw another.
        key = random_key(conn).await?;
    }
    Err(StoreError::Corrupt(
        "no unused message key after 3 attempts".into(),
    ))
}

/// Stores what comes with a new message: its deliveries, idempotency key,
/// awaited recipients, meta and provision record; its audit entries go to
/// `audits`.
pub(super) async fn insert_message_rest(
    conn: &Conn<'_>,
    key: &MessageKey,
    e: NewEnvelope,
    audits: &mut Audits,
) -> Result<(), StoreError> {
    let k = key.as_bytes().as_slice();
    for d in &e.deliveries {
        insert_delivery(conn, k, d).await?;
    }
    if let Some(s) = &e.send_key {
        // The primary key (client, key) makes a concurrent repeat on
        // another replica fail here rather than store a second envelope.
        conn.execute(
            "INSERT INTO send_keys (client, key, request_sha256, message_id, expires_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &s.client,
                &s.key,
                &s.request_sha256.as_slice(),
                &k,
                &to_i64(e.expires_ms, "expires_ms")?,
            ],
        )
        .await
        .map_err(pg_error)?;
    }
    let mut awaited: Vec<&str> = e.awaited.iter().map(|p| p.as_str()).collect();
    awaited.sort_unstable();
    awaited.dedup();
    for party in awaited {
        conn.execute(
            "INSERT INTO message_awaited (message_id, party) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
            &[&k, &party],
        )
        .await
        .map_err(pg_error)?;
    }
    if let Some(meta) = &e.meta {
        insert_meta(conn, k, meta).await?;
    }
    if let Some(p) = e.provision {
        insert_provision(conn, key, p, audits).await?;
    }
    audits.extend(e.audit.into_iter().map(|a| (a, Some(*key))));
    Ok(())
}

async fn insert_meta(
    conn: &Conn<'_>,
    message: &[u8],
    meta: &MessageMeta,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO message_meta (message_id, document_type, title) VALUES ($1, $2, $3)",
        &[&message, &meta.document_type, &meta.title],
    )
    .await
    .map_err(pg_error)?;
    let subject = conn
        .prepare_cached(
            "INSERT INTO message_subjects (message_id, pseudonym) VALUES ($1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_error)?;
    for p in &meta.subjects {
        conn.execute(&subject, &[&message, &p.as_bytes().as_slice()])
            .await
            .map_err(pg_error)?;
    }
    Ok(())
}

/// Keeps a provision record (once per message, direction and recipient),
/// copying what was provided from the message's meta and header fields.
async fn insert_provision(
    conn: &Conn<'_>,
    message: &MessageKey,
    p: NewProvision,
    audits: &mut Audits,
) -> Result<(), StoreError> {
    let k = message.as_bytes().as_slice();
    let inserted = query_map(
        conn,
        "INSERT INTO provisions (direction, message_id, time_ms, counterparty, \
         counterparty_name, recipient, role, document_type, title, purpose, content_type, \
         receipt, wire_id) \
         SELECT $1, m.id, $3, $4, $5, $6, $7, COALESCE(mm.document_type, ''), \
                COALESCE(mm.title, ''), m.purpose, m.content_type, $8, m.wire_id \
         FROM messages m LEFT JOIN message_meta mm ON mm.message_id = m.id WHERE m.id = $2 \
         ON CONFLICT (message_id, direction, recipient) DO NOTHING RETURNING id",
        &[
            &p.direction.as_str(),
            &k,
            &to_i64(p.time_ms, "provision time_ms")?,
            &p.counterparty.as_str(),
            &p.counterparty_name,
            &p.recipient.as_str(),
            &p.role,
            &p.receipt,
        ],
        |r| col::<i64>(r, 0),
    )
    .await?;
    if let Some(id) = inserted.first() {
        conn.execute(
            "INSERT INTO provision_subjects (provision_id, pseudonym) \
             SELECT $1, pseudonym FROM message_subjects WHERE message_id = $2",
            &[id, &k],
        )
        .await
        .map_err(pg_error)?;
        if let Some(e) = p.audit {
            audits.push((e, Some(*message)));
        }
    } else {
        let exists = query_map(conn, "SELECT 1 FROM messages WHERE id = $1", &[&k], |_| {
            Ok(())
        })
        .await?;
        if exists.is_empty() {
            return Err(StoreError::NotFound(format!("message {message}")));
        }
    }
    Ok(())
}

/// A new pending delivery, due at once.
pub(super) async fn insert_delivery(
    conn: &Conn<'_>,
    message: &[u8],
    d: &NewDelivery,
) -> Result<(), StoreError> {
    let (kind, payload) = match &d.kind {
        DeliveryKind::Envelope => ("envelope", None),
        DeliveryKind::Receipt(bytes) => ("receipt", Some(bytes.as_slice())),
    };
    let stmt = conn
        .prepare_cached(
            "INSERT INTO deliveries (message_id, kind, payload, target, state, attempts, \
             next_attempt_ms, expires_ms) VALUES ($1, $2, $3, $4, 'pending', 0, 0, $5)",
        )
        .await
        .map_err(pg_error)?;
    conn.execute(
        &stmt,
        &[
            &message,
            &kind,
            &payload,
            &d.target.as_str(),
            &to_i64(d.expires_ms, "delivery expires_ms")?,
        ],
    )
    .await
    .map_err(pg_error)?;
    Ok(())
}

/// Keeps the receipts not yet stored for `message` (and creates their
/// forward deliveries, provision records and audit entries); returns how
/// many were new. Receipts are inserted in digest order (the lock order).
pub(super) async fn insert_receipts(
    conn: &Conn<'_>,
    key: &MessageKey,
    mut receipts: Vec<ReceiptRow>,
    audits: &mut Audits,
) -> Result<usize, StoreError> {
    receipts.sort_by_key(|r| r.digest);
    let message = key.as_bytes().as_slice();
    let insert = conn
        .prepare_cached(
            "INSERT INTO receipts \
             (message_id, digest, issuer, disposition, issued_ms, signed, verified_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_error)?;
    let mut new = 0;
    for row in receipts {
        let r = &row.r;
        let inserted = conn
            .execute(
                &insert,
                &[
                    &message,
                    &row.digest.as_slice(),
                    &r.issuer.as_str(),
                    &r.disposition,
                    &row.issued_ms,
                    &r.signed,
                    &row.verified_ms,
                ],
            )
            .await
            .map_err(pg_error)?;
        if inserted == 1 {
            new += 1;
            let r = row.r;
            if let Some(forward) = &r.forward {
                insert_delivery(conn, message, forward).await?;
            }
            for p in r.provisions {
                insert_provision(conn, key, p, audits).await?;
            }
            if let Some(e) = r.audit {
                audits.push((e, Some(*key)));
            }
        }
    }
    Ok(new)
}

/// Appends the collected audit entries, in order: under the audit head's
/// row lock (taken here, last in the transaction), each gets the next
/// `seq`, a time never before the last entry's (the database's clock), and
/// the message's pseudonyms if it names none: listed when they are at most
/// [`MAX_INLINE_SUBJECTS`], else by reference (a [`SubjectSet`], the set
/// kept once in `audit_subject_sets`). Each entry must then pass
/// [`AuditEntry::validate`] or the whole transaction fails.
///
/// The pseudonyms are those of the message with the entry's key; without
/// one, those of the only message stored under the entry's message id
/// (none if several senders' messages carry it).
pub(super) async fn append_audits(conn: &Conn<'_>, audits: Audits) -> Result<(), StoreError> {
    if audits.is_empty() {
        return Ok(());
    }
    // Everything that does not need the head is done before taking it: the
    // lock is held from here through the commit, so what it covers is kept
    // to two pipelined statements.
    let mut entries = Vec::with_capacity(audits.len());
    for (mut entry, about) in audits {
        fill_subjects(conn, &mut entry, about.as_ref()).await?;
        entries.push(entry);
    }
    let head = query_map(
        conn,
        &format!("SELECT next_seq, last_ms, {DB_NOW_MS} FROM audit_head WHERE id = 1 FOR UPDATE"),
        &[],
        |r| Ok((col::<i64>(r, 0)?, col::<i64>(r, 1)?, col::<i64>(r, 2)?)),
    )
    .await?;
    let Some(&(first, last_ms, now)) = head.first() else {
        return Err(StoreError::Corrupt("the audit head row is missing".into()));
    };
    let time_ms = now.max(last_ms);
    let (mut seqs, mut jsons, mut leaves) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = first;
    for mut entry in entries {
        entry.seq = to_u64(next, "audit seq")?;
        entry.time_ms = to_u64(time_ms, "audit time")?;
        entry
            .validate()
            .map_err(|e| StoreError::Invalid(format!("audit entry {}: {e}", entry.seq)))?;
        let json = entry.to_canonical_json();
        leaves.push(exchange_core::suite::merkle_leaf_hash(&json).to_vec());
        jsons.push(json);
        seqs.push(next);
        next += 1;
    }
    let entry_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&seqs, &time_ms, &jsons, &leaves];
    let head_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&next, &time_ms];
    let insert = conn.execute(
        "INSERT INTO audit_log (seq, time_ms, entry, leaf_hash) \
         SELECT seq, $2, entry, leaf FROM unnest($1::bigint[], $3::bytea[], $4::bytea[]) \
         AS e (seq, entry, leaf)",
        &entry_params,
    );
    let head = conn.execute(
        "UPDATE audit_head SET next_seq = $1, last_ms = $2 WHERE id = 1",
        &head_params,
    );
    // Sent together: the connection pipelines them.
    let (inserted, _) = futures_util::future::try_join(insert, head)
        .await
        .map_err(pg_error)?;
    if inserted != seqs.len() as u64 {
        return Err(StoreError::Corrupt(format!(
            "{inserted} of {} audit entries written",
            seqs.len()
        )));
    }
    Ok(())
}

/// The subjects of an entry that names none (see [`append_audits`]).
async fn fill_subjects(
    conn: &Conn<'_>,
    entry: &mut AuditEntry,
    about: Option<&MessageKey>,
) -> Result<(), StoreError> {
    let key = match (about, entry.message_id.as_deref()) {
        _ if !entry.subjects.is_empty() => None,
        (_, None) => None,
        (Some(key), Some(_)) => Some(key.as_bytes().to_vec()),
        (None, Some(id)) => match hex::decode(id.replace('-', "")) {
            Ok(id) => {
                let keys = query_map(
                    conn,
                    "SELECT id FROM messages WHERE wire_id = $1 LIMIT 2",
                    &[&id],
                    |r| col::<Vec<u8>>(r, 0),
                )
                .await?;
                match <[Vec<u8>; 1]>::try_from(keys) {
                    Ok([key]) => Some(key),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        },
    };
    if let Some(key) = key {
        entry.subjects = query_map(
            conn,
            "SELECT pseudonym FROM message_subjects WHERE message_id = $1 ORDER BY pseudonym",
            &[&key],
            |r| Ok(hex::encode(col::<&[u8]>(r, 0)?)),
        )
        .await?;
    }
    if entry.subjects.len() > MAX_INLINE_SUBJECTS {
        let crate::store::values::SubjectSetRows {
            reference,
            set,
            digest,
        } = crate::store::values::subject_set(&entry.subjects)?;
        let insert = conn
            .prepare_cached(
                "INSERT INTO audit_subject_sets (digest, pseudonym) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
            )
            .await
            .map_err(pg_error)?;
        for p in &set {
            conn.execute(&insert, &[&digest, &p.as_slice()])
                .await
                .map_err(pg_error)?;
        }
        entry.subjects.clear();
        entry.subject_set = Some(reference);
    }
    Ok(())
}
