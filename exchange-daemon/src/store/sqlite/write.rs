//! The statements of the write operations, run on the writer's connection
//! inside each operation's savepoint, and the rows they insert (the new
//! records with their values converted for SQLite).

use exchange_core::audit::{AuditEntry, MAX_INLINE_SUBJECTS};
use exchange_core::suite::sha256;
use exchange_core::{MessageId, PartyUri};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{find_message, load_purged, to_i64, to_u64};
use crate::error::StoreError;
use crate::store::{
    Accepted, DeliveryKind, MessageKey, MessageKind, MessageMeta, NewDelivery, NewProvision,
    NewReceipt, SendKey,
};

/// Where a new message's ciphertext is kept: in its row, or in the blob
/// file of that name.
pub(super) enum Body {
    Inline(Vec<u8>),
    Blob(String),
}

/// A [`NewEnvelope`](crate::store::NewEnvelope) with its values converted for SQLite.
pub(super) struct MessageRow {
    pub(super) id: MessageId,
    pub(super) header_sha256: [u8; 32],
    pub(super) kind: MessageKind,
    pub(super) head: Vec<u8>,
    pub(super) body: Body,
    pub(super) ciphertext_len: i64,
    pub(super) sender: PartyUri,
    pub(super) upstream: Option<PartyUri>,
    pub(super) local_client: Option<String>,
    pub(super) content_type: String,
    pub(super) purpose: String,
    pub(super) created_ms: i64,
    pub(super) expires_ms: i64,
    pub(super) received_ms: i64,
    pub(super) our_receipt: Option<Vec<u8>>,
    pub(super) deliveries: Vec<DeliveryRow>,
    pub(super) awaited: Vec<PartyUri>,
    pub(super) meta: Option<MessageMeta>,
    pub(super) provision: Option<ProvisionRow>,
    pub(super) audit: Vec<AuditEntry>,
    pub(super) send_key: Option<SendKey>,
}

/// A [`NewProvision`] with its values converted for SQLite.
pub(super) struct ProvisionRow {
    pub(super) p: NewProvision,
    pub(super) time_ms: i64,
}

impl ProvisionRow {
    pub(super) fn new(p: NewProvision) -> Result<Self, StoreError> {
        Ok(Self {
            time_ms: to_i64(p.time_ms, "provision time_ms")?,
            p,
        })
    }
}

/// An [`AttemptOutcome`](crate::store::AttemptOutcome) with its values converted for SQLite.
pub(super) enum Finish {
    Done,
    Retry(String, i64),
    Failed(String),
}

/// A [`NewDelivery`] with its values converted for SQLite.
pub(super) struct DeliveryRow {
    pub(super) target: PartyUri,
    pub(super) kind: DeliveryKind,
    pub(super) expires_ms: i64,
}

impl DeliveryRow {
    pub(super) fn new(d: NewDelivery) -> Result<Self, StoreError> {
        Ok(Self {
            expires_ms: to_i64(d.expires_ms, "delivery expires_ms")?,
            target: d.target,
            kind: d.kind,
        })
    }
}

/// A [`NewReceipt`] with its digest and values converted for SQLite.
pub(super) struct ReceiptRow {
    pub(super) digest: [u8; 32],
    pub(super) signed: Vec<u8>,
    pub(super) issuer: PartyUri,
    pub(super) disposition: String,
    pub(super) issued_ms: i64,
    pub(super) verified_ms: i64,
    pub(super) forward: Option<DeliveryRow>,
    pub(super) provisions: Vec<ProvisionRow>,
    pub(super) audit: Option<AuditEntry>,
}

impl ReceiptRow {
    pub(super) fn new(r: NewReceipt) -> Result<Self, StoreError> {
        Ok(Self {
            digest: sha256(&r.signed),
            issued_ms: to_i64(r.issued_ms, "receipt issued_ms")?,
            verified_ms: to_i64(r.verified_ms, "receipt verified_ms")?,
            forward: r.forward.map(DeliveryRow::new).transpose()?,
            provisions: r
                .provisions
                .into_iter()
                .map(ProvisionRow::new)
                .collect::<Result<_, _>>()?,
            audit: r.audit,
            signed: r.signed,
            issuer: r.issuer,
            disposition: r.disposition,
        })
    }
}

/// Whether a key is used by a message, a purged message's record or a
/// provision record.
fn key_used(conn: &Connection, key: &[u8; 16]) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE id = ?1) \
             OR EXISTS (SELECT 1 FROM purged_messages WHERE key = ?1) \
             OR EXISTS (SELECT 1 FROM provisions WHERE message_id = ?1)",
        )?
        .query_row([key.as_slice()], |r| r.get::<_, bool>(0))?)
}

/// A key for a new message: its id if no row uses that key, else random.
fn new_key(conn: &Connection, id: &MessageId) -> Result<MessageKey, StoreError> {
    if !key_used(conn, id.as_bytes())? {
        return Ok(MessageKey::of_id(*id));
    }
    for _ in 0..8 {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k)
            .map_err(|e| StoreError::Corrupt(format!("no randomness for a message key: {e}")))?;
        if !key_used(conn, &k)? {
            return Ok(MessageKey::from_bytes(k));
        }
    }
    Err(StoreError::Corrupt(
        "no unused message key after 8 random draws".into(),
    ))
}

/// Inserts a message with its deliveries under a new key, or returns the
/// record stored (or purged) for the same sender and id.
pub(super) fn insert_message(conn: &Connection, m: &MessageRow) -> Result<Accepted, StoreError> {
    if let Some(stored) = find_message(conn, &m.sender, &m.id)? {
        return Ok(Accepted::Duplicate(Box::new(stored)));
    }
    if let Some(purged) = load_purged(conn, &m.sender, &m.id)? {
        return Ok(Accepted::Purged(Box::new(purged)));
    }
    let key = new_key(conn, &m.id)?;
    let (inline, blob) = match &m.body {
        Body::Inline(bytes) => (Some(bytes.as_slice()), None),
        Body::Blob(name) => (None, Some(name.as_str())),
    };
    conn.prepare_cached(
        "INSERT INTO messages (id, header_sha256, kind, head, ciphertext, blob, ciphertext_len, \
         sender, upstream, local_client, content_type, purpose, created_ms, expires_ms, \
         received_ms, our_receipt, acked_ms, wire_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, NULL, ?17)",
    )?
    .execute(params![
        key.as_bytes(),
        m.header_sha256,
        m.kind.as_str(),
        m.head,
        inline,
        blob,
        m.ciphertext_len,
        m.sender.as_str(),
        m.upstream.as_ref().map(PartyUri::as_str),
        m.local_client,
        m.content_type,
        m.purpose,
        m.created_ms,
        m.expires_ms,
        m.received_ms,
        m.our_receipt,
        m.id.as_bytes(),
    ])?;
    for d in &m.deliveries {
        insert_delivery(conn, key.as_bytes(), d)?;
    }
    if let Some(k) = &m.send_key {
        // The primary key (client, key) makes a concurrent repeat fail
        // here rather than store a second envelope.
        conn.prepare_cached(
            "INSERT INTO send_keys (client, key, request_sha256, message_id, expires_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            k.client,
            k.key,
            k.request_sha256,
            key.as_bytes(),
            m.expires_ms
        ])?;
    }
    for party in &m.awaited {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO message_awaited (message_id, party) VALUES (?1, ?2)",
        )?
        .execute(params![key.as_bytes(), party.as_str()])?;
    }
    if let Some(meta) = &m.meta {
        insert_meta(conn, key.as_bytes(), meta)?;
    }
    if let Some(p) = &m.provision {
        insert_provision(conn, &key, p)?;
    }
    for e in &m.audit {
        append_audit(conn, e.clone(), Some(&key))?;
    }
    Ok(Accepted::Stored)
}

fn insert_meta(conn: &Connection, message: &[u8], meta: &MessageMeta) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO message_meta (message_id, document_type, title) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![message, meta.document_type, meta.title])?;
    let mut subject = conn.prepare_cached(
        "INSERT INTO message_subjects (message_id, pseudonym) VALUES (?1, ?2) \
         ON CONFLICT DO NOTHING",
    )?;
    for p in &meta.subjects {
        subject.execute(params![message, p.as_bytes()])?;
    }
    Ok(())
}

/// Keeps a provision record (once per message, direction and recipient),
/// copying what was provided from the message's meta and header fields.
fn insert_provision(
    conn: &Connection,
    message: &MessageKey,
    row: &ProvisionRow,
) -> Result<(), StoreError> {
    let p = &row.p;
    let what: Option<(String, String, String, String, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT COALESCE(mm.document_type, ''), COALESCE(mm.title, ''), m.purpose, \
             m.content_type, m.wire_id FROM messages m \
             LEFT JOIN message_meta mm ON mm.message_id = m.id WHERE m.id = ?1",
        )?
        .query_row([message.as_bytes()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((document_type, title, purpose, content_type, wire_id)) = what else {
        return Err(StoreError::NotFound(format!("message {message}")));
    };
    let inserted = conn
        .prepare_cached(
            "INSERT INTO provisions (direction, message_id, time_ms, counterparty, \
             counterparty_name, recipient, role, document_type, title, purpose, content_type, \
             receipt, wire_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT (message_id, direction, recipient) DO NOTHING",
        )?
        .execute(params![
            p.direction.as_str(),
            message.as_bytes(),
            row.time_ms,
            p.counterparty.as_str(),
            p.counterparty_name,
            p.recipient.as_str(),
            p.role,
            document_type,
            title,
            purpose,
            content_type,
            p.receipt,
            wire_id,
        ])?;
    if inserted == 1 {
        // The provision's id is read once, before the copy: inside
        // `INSERT ... SELECT`, `last_insert_rowid()` would change after each
        // copied row.
        let provision_id = conn.last_insert_rowid();
        conn.prepare_cached(
            "INSERT INTO provision_subjects (provision_id, pseudonym) \
             SELECT ?1, pseudonym FROM message_subjects WHERE message_id = ?2",
        )?
        .execute(params![provision_id, message.as_bytes()])?;
        if let Some(e) = &p.audit {
            append_audit(conn, e.clone(), Some(message))?;
        }
    }
    Ok(())
}

/// Appends one audit entry: the next `seq`, its time (the caller's clock)
/// raised to the last entry's if that is later, and the message's pseudonyms if the entry names none: listed
/// when they are at most [`MAX_INLINE_SUBJECTS`], else by reference (a
/// [`SubjectSet`], the set itself kept once in `audit_subject_sets`). The
/// entry must then pass [`AuditEntry::validate`], the rule exports and
/// verifiers apply, or nothing is appended.
///
/// The pseudonyms are those of the message with key `about`; without one,
/// those of the only message stored under the entry's message id (none if
/// several senders' messages carry it: the entry is never linked to the
/// patients of another sender's message).
pub(super) fn append_audit(
    conn: &Connection,
    mut entry: AuditEntry,
    about: Option<&MessageKey>,
) -> Result<(), StoreError> {
    let (next, last_ms): (i64, i64) = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(seq) + 1, 0), \
             COALESCE((SELECT time_ms FROM audit_log ORDER BY seq DESC LIMIT 1), 0) FROM audit_log",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let time_ms = to_i64(entry.time_ms, "audit time")?.max(last_ms);
    entry.seq = to_u64(next, "audit seq")?;
    entry.time_ms = to_u64(time_ms, "audit time")?;
    let key = match (about, entry.message_id.as_deref()) {
        _ if !entry.subjects.is_empty() => None,
        (_, None) => None,
        (Some(key), Some(_)) => Some(key.as_bytes().to_vec()),
        (None, Some(id)) => match hex::decode(id.replace('-', "")) {
            Ok(id) => {
                let keys = conn
                    .prepare_cached("SELECT id FROM messages WHERE wire_id = ?1 LIMIT 2")?
                    .query_map([id], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                match <[Vec<u8>; 1]>::try_from(keys) {
                    Ok([key]) => Some(key),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        },
    };
    if let Some(key) = key {
        entry.subjects = conn
            .prepare_cached(
                "SELECT pseudonym FROM message_subjects WHERE message_id = ?1 \
                 ORDER BY pseudonym",
            )?
            .query_map([key], |r| r.get::<_, Vec<u8>>(0))?
            .map(|p| Ok(hex::encode(p?)))
            .collect::<Result<_, StoreError>>()?;
    }
    if entry.subjects.len() > MAX_INLINE_SUBJECTS {
        let crate::store::values::SubjectSetRows {
            reference,
            set,
            digest,
        } = crate::store::values::subject_set(&entry.subjects)?;
        let known = conn
            .prepare_cached("SELECT 1 FROM audit_subject_sets WHERE digest = ?1 LIMIT 1")?
            .query_row([&digest], |_| Ok(()))
            .optional()?
            .is_some();
        if !known {
            let mut insert = conn.prepare_cached(
                "INSERT OR IGNORE INTO audit_subject_sets (digest, pseudonym) VALUES (?1, ?2)",
            )?;
            for p in &set {
                insert.execute(params![digest, p.as_slice()])?;
            }
        }
        entry.subjects.clear();
        entry.subject_set = Some(reference);
    }
    entry
        .validate()
        .map_err(|e| StoreError::Invalid(format!("audit entry {}: {e}", entry.seq)))?;
    let json = entry.to_canonical_json();
    let leaf = exchange_core::suite::merkle_leaf_hash(&json);
    conn.prepare_cached(
        "INSERT INTO audit_log (seq, time_ms, entry, leaf_hash) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![next, time_ms, json, leaf])?;
    Ok(())
}

/// A new pending delivery, due at once.
fn insert_delivery(conn: &Connection, message: &[u8], d: &DeliveryRow) -> Result<(), StoreError> {
    let (kind, payload) = match &d.kind {
        DeliveryKind::Envelope => ("envelope", None),
        DeliveryKind::Receipt(bytes) => ("receipt", Some(bytes.as_slice())),
    };
    conn.prepare_cached(
        "INSERT INTO deliveries (message_id, kind, payload, target, state, attempts, \
         next_attempt_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, 'pending', 0, 0, ?5)",
    )?
    .execute(params![
        message,
        kind,
        payload,
        d.target.as_str(),
        d.expires_ms
    ])?;
    Ok(())
}

/// Keeps the receipts not yet stored for `message` (and creates their
/// forward deliveries, provision records and audit entries); returns how
/// many were new. A receipt whose bytes, or whose issuer and disposition,
/// are already held for the message is ignored with all it brings.
pub(super) fn insert_receipts(
    conn: &Connection,
    key: &MessageKey,
    receipts: &[ReceiptRow],
) -> Result<usize, StoreError> {
    let message = key.as_bytes().as_slice();
    let mut new = 0;
    for r in receipts {
        let inserted = conn
            .prepare_cached(
                "INSERT INTO receipts \
                 (message_id, digest, issuer, disposition, issued_ms, signed, verified_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
            )?
            .execute(params![
                message,
                r.digest,
                r.issuer.as_str(),
                r.disposition,
                r.issued_ms,
                r.signed,
                r.verified_ms
            ])?;
        if inserted == 1 {
            new += 1;
            if let Some(forward) = &r.forward {
                insert_delivery(conn, message, forward)?;
            }
            for p in &r.provisions {
                insert_provision(conn, key, p)?;
            }
            if let Some(e) = &r.audit {
                append_audit(conn, e.clone(), Some(key))?;
            }
        }
    }
    Ok(new)
}
