//! The store's schema and its migrations.
//!
//! The schema version is kept in `PRAGMA user_version`; [`MIGRATIONS`]`[i]`
//! takes version `i` to `i + 1`, each in its own transaction. A database with
//! a newer version is refused ([`StoreError::SchemaTooNew`]). Version 1:
//!
//! * `messages`: one row per envelope. `id` (16-byte BLOB, primary key),
//!   `header_sha256` (32 bytes), `kind` (`outbound` | `relay` | `inbound`),
//!   `head`, the ciphertext either inline in `ciphertext` or in the blob file
//!   named by `blob` (exactly one of the two is non-NULL), `ciphertext_len`,
//!   `sender`, `upstream`, `local_client`, `content_type`, `purpose`,
//!   `created_ms`, `expires_ms`, `received_ms`, `our_receipt`, `acked_ms`.
//! * `deliveries`: the work queue. `id` (INTEGER PRIMARY KEY AUTOINCREMENT:
//!   never reused, so a stale id cannot name another delivery), `message_id`,
//!   `kind` (`envelope` | `receipt`, the receipt bytes in `payload`),
//!   `target`, `state` (`pending` | `done` | `failed`, the reason of a
//!   failure in `failure`), `attempts`, `next_attempt_ms`, `claimed_by`,
//!   `claim_until_ms`, `last_error`, `expires_ms`. Partial index
//!   `deliveries_due` over pending rows by (`next_attempt_ms`, `id`).
//! * `receipts`: `seq` (AUTOINCREMENT: insertion order), `message_id`,
//!   `digest` (SHA-256 of `signed`, unique per message), `issuer`,
//!   `disposition`, `issued_ms`, `signed`.
//!
//! Version 2 (accountability):
//!
//! * `audit_log`: `seq` (0-based leaf index), `time_ms`, `entry` (the
//!   canonical JSON of an `exchange_core::audit::AuditEntry`: the Merkle
//!   leaf), `leaf_hash`. Triggers refuse UPDATE and DELETE. Entries are
//!   appended in the same transaction as the action they record.
//! * `audit_checkpoints`: `tree_size`, `time_ms`, `root`, `frontier` (the
//!   compact range to extend the tree), `signed` (a `SignedCheckpoint`).
//! * `message_meta` (`document_type`, `title`) and `message_subjects`
//!   (`pseudonym`: HMAC-SHA256 of a patient identifier under the facility's
//!   `pseudonym.key`) per message the facility can read. Clear patient
//!   identifiers are never stored outside the sealed envelope.
//! * `provisions`: records of provision (`provided`, at the origin, when the
//!   boundary receipt arrives) and of receipt (`received`, at the final
//!   recipient), each with its receipt as evidence; `provision_subjects`
//!   indexes them by pseudonym. Neither references `messages`: they outlive a
//!   retention purge.
//!
//! Version 3: `audit_subject_sets` (`digest`, `pseudonym`): the patient
//! pseudonyms of a message naming more than an audit entry lists, stored
//! once under the digest its entries carry (`exchange_core::audit::SubjectSet`);
//! append-only, kept by the retention purge.
//!
//! Version 4 (custody and retention):
//!
//! * `messages.fetched_ms`: when a local client last completed a fetch of
//!   an inbox item (an acknowledgement needs one).
//! * `purged_messages`: what a purge removed (`id`, `sender`,
//!   `header_sha256`, `expires_ms`, `our_receipt`, `purged_ms`), kept until
//!   the envelope has expired, so that a redelivery is answered with the
//!   original verdict instead of being stored again.
//! * `message_awaited` (`message_id`, `party`): the final recipients whose
//!   own DELIVERED, PROCESSED or REJECTED receipt a sent or relayed message
//!   awaits; until each has answered (or the receipt grace period after the
//!   expiry has passed) the purge keeps the message.
//! * `purge_clock`: one row, `last_ms`: the newest wall-clock time a purge
//!   accepted; a later time too far beyond it stops the purge, and
//!   `suspended_ms` says since when (the stop is audited once).
//!
//! Version 5: `send_keys` (`client`, `key`, `request_sha256`, `message_id`,
//! `expires_ms`): the idempotency key of each Send that gave one, with a
//! digest of what it asked for, kept until a day after the envelope's
//! expiry; a repeat answers with the same message id.
//!
//! Version 6 (a received envelope is identified by its sender and its id):
//!
//! * `messages.id` is now the message's local key (16 opaque bytes, never
//!   reused: not by a message, a purged message's record or a provision
//!   record), which `deliveries`, `receipts`, `message_meta`,
//!   `message_subjects`, `message_awaited`, `send_keys` and `provisions`
//!   reference; `messages.wire_id` is the message id the envelope carries,
//!   unique with `sender` (index `messages_sender_wire`; `messages_wire`
//!   lists every sender's message under an id). A new message's key is its
//!   message id when no row uses that key yet, else random. Rows from
//!   before keep `id = wire_id`.
//! * `purged_messages` is keyed by (`sender`, `wire_id`), with the purged
//!   message's `key` kept (so that it is not reused while the record lasts).
//! * `provisions.wire_id`: the message id of the record's message
//!   (`message_id` holds its key); NULL in records from before, whose key
//!   is their message id.
//!
//! Version 7: `receipts` holds at most one receipt per (`message_id`,
//! `issuer`, `disposition`) (unique index `receipts_issuer_disposition`;
//! the migration keeps the first of any duplicates stored before it): a
//! later one, whatever its bytes or time, is not stored, forwarded or
//! audited again. `receipts.verified_ms`: when the receipt's signature and
//! issuer chain verified with the full policy, before it was stored; it is
//! read back without checking them again (NULL in rows from before version
//! 7, which are verified when read).
//!
//! Version 8: index `deliveries_target_due` over pending deliveries by
//! (`target`, `next_attempt_ms`, `id`).
//!
//! Version 9: `deliveries.claim`, the fencing token of a delivery's latest
//! claim (0: never claimed): each claim increments it, and renewing the
//! claim or recording the attempt's outcome must present it, so that a
//! worker whose lease lapsed cannot change a delivery claimed again since.
//!
//! Times are Unix milliseconds stored as SQLite integers (i64); a `u64`
//! above `i64::MAX` is refused on the way in, a negative value read back is
//! reported as [`StoreError::Corrupt`].

use std::time::Duration;

use rusqlite::Connection;

use crate::error::StoreError;

/// Schema migrations: entry `i` takes `PRAGMA user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    r"
CREATE TABLE messages (
    id             BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    header_sha256  BLOB NOT NULL CHECK (length(header_sha256) = 32),
    kind           TEXT NOT NULL CHECK (kind IN ('outbound', 'relay', 'inbound')),
    head           BLOB NOT NULL,
    ciphertext     BLOB,
    blob           TEXT,
    ciphertext_len INTEGER NOT NULL CHECK (ciphertext_len >= 0),
    sender         TEXT NOT NULL,
    upstream       TEXT,
    local_client   TEXT,
    content_type   TEXT NOT NULL,
    purpose        TEXT NOT NULL,
    created_ms     INTEGER NOT NULL,
    expires_ms     INTEGER NOT NULL,
    received_ms    INTEGER NOT NULL,
    our_receipt    BLOB,
    acked_ms       INTEGER,
    CHECK ((ciphertext IS NULL) <> (blob IS NULL))
);
CREATE INDEX messages_inbox ON messages (received_ms, id) WHERE kind = 'inbound';
CREATE UNIQUE INDEX messages_blob ON messages (blob) WHERE blob IS NOT NULL;

CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      BLOB NOT NULL REFERENCES messages (id),
    kind            TEXT NOT NULL CHECK (kind IN ('envelope', 'receipt')),
    payload         BLOB,
    target          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    failure         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_ms INTEGER NOT NULL,
    claimed_by      TEXT,
    claim_until_ms  INTEGER,
    last_error      TEXT,
    expires_ms      INTEGER NOT NULL,
    CHECK ((kind = 'receipt') = (payload IS NOT NULL)),
    CHECK ((state = 'failed') = (failure IS NOT NULL))
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_ms, id) WHERE state = 'pending';
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE TABLE receipts (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id  BLOB NOT NULL REFERENCES messages (id),
    digest      BLOB NOT NULL CHECK (length(digest) = 32),
    issuer      TEXT NOT NULL,
    disposition TEXT NOT NULL,
    issued_ms   INTEGER NOT NULL,
    signed      BLOB NOT NULL,
    UNIQUE (message_id, digest)
);
",
    // 2: accountability: audit log, checkpoints, pseudonymous
    // message subjects, provision records.
    r"
CREATE TABLE audit_log (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 0),
    time_ms    INTEGER NOT NULL,
    entry      BLOB NOT NULL,
    leaf_hash  BLOB NOT NULL CHECK (length(leaf_hash) = 32)
);
CREATE INDEX audit_log_time ON audit_log (time_ms);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

CREATE TABLE audit_checkpoints (
    tree_size  INTEGER PRIMARY KEY CHECK (tree_size > 0),
    time_ms    INTEGER NOT NULL,
    root       BLOB NOT NULL CHECK (length(root) = 32),
    frontier   BLOB NOT NULL,
    signed     BLOB NOT NULL
);

CREATE TABLE message_meta (
    message_id    BLOB PRIMARY KEY NOT NULL REFERENCES messages (id),
    document_type TEXT NOT NULL,
    title         TEXT NOT NULL
);

CREATE TABLE message_subjects (
    message_id BLOB NOT NULL REFERENCES messages (id),
    pseudonym  BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (message_id, pseudonym)
);
CREATE INDEX message_subjects_pseudonym ON message_subjects (pseudonym);

CREATE TABLE provisions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    direction         TEXT NOT NULL CHECK (direction IN ('provided', 'received')),
    message_id        BLOB NOT NULL CHECK (length(message_id) = 16),
    time_ms           INTEGER NOT NULL,
    counterparty      TEXT NOT NULL,
    counterparty_name TEXT NOT NULL,
    recipient         TEXT NOT NULL,
    role              TEXT NOT NULL,
    document_type     TEXT NOT NULL,
    title             TEXT NOT NULL,
    purpose           TEXT NOT NULL,
    content_type      TEXT NOT NULL,
    receipt           BLOB NOT NULL,
    UNIQUE (message_id, direction, recipient)
);

CREATE TABLE provision_subjects (
    provision_id INTEGER NOT NULL REFERENCES provisions (id),
    pseudonym    BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (pseudonym, provision_id)
);
",
    // 3: the subject sets audit entries refer to (a message naming more
    // patients than an entry lists), each stored once; append-only like the
    // log, and kept by the retention purge.
    r"
CREATE TABLE audit_subject_sets (
    digest    BLOB NOT NULL CHECK (length(digest) = 32),
    pseudonym BLOB NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (digest, pseudonym)
);
CREATE INDEX audit_subject_sets_pseudonym ON audit_subject_sets (pseudonym);
CREATE TRIGGER audit_subject_sets_no_update BEFORE UPDATE ON audit_subject_sets
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_subject_sets_no_delete BEFORE DELETE ON audit_subject_sets
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
",
    // 4: custody and retention: when a local client completed a fetch,
    // ids of purged messages until their expiry, the purge's clock.
    r"
ALTER TABLE messages ADD COLUMN fetched_ms INTEGER;

CREATE TABLE purged_messages (
    id            BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
    sender        TEXT NOT NULL,
    header_sha256 BLOB NOT NULL CHECK (length(header_sha256) = 32),
    expires_ms    INTEGER NOT NULL,
    our_receipt   BLOB,
    purged_ms     INTEGER NOT NULL
);
CREATE INDEX purged_messages_expiry ON purged_messages (expires_ms);

CREATE TABLE message_awaited (
    message_id BLOB NOT NULL REFERENCES messages (id),
    party      TEXT NOT NULL,
    PRIMARY KEY (message_id, party)
);

CREATE TABLE purge_clock (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    last_ms      INTEGER NOT NULL,
    suspended_ms INTEGER
);
",
    // 5: idempotent Send: each client's keys with what they asked for.
    r"
CREATE TABLE send_keys (
    client         TEXT NOT NULL,
    key            TEXT NOT NULL,
    request_sha256 BLOB NOT NULL CHECK (length(request_sha256) = 32),
    message_id     BLOB NOT NULL CHECK (length(message_id) = 16),
    expires_ms     INTEGER NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX send_keys_expiry ON send_keys (expires_ms);
",
    // 6: a received envelope is identified by (sender, message id): the
    // primary key becomes an opaque local key, the id on the wire a column.
    r"
ALTER TABLE messages ADD COLUMN wire_id BLOB NOT NULL
    DEFAULT x'00000000000000000000000000000000' CHECK (length(wire_id) = 16);
UPDATE messages SET wire_id = id;
CREATE UNIQUE INDEX messages_sender_wire ON messages (sender, wire_id);
CREATE INDEX messages_wire ON messages (wire_id);

CREATE TABLE purged_messages_v6 (
    key           BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 16),
    wire_id       BLOB NOT NULL CHECK (length(wire_id) = 16),
    sender        TEXT NOT NULL,
    header_sha256 BLOB NOT NULL CHECK (length(header_sha256) = 32),
    expires_ms    INTEGER NOT NULL,
    our_receipt   BLOB,
    purged_ms     INTEGER NOT NULL,
    UNIQUE (sender, wire_id)
);
INSERT INTO purged_messages_v6
    (key, wire_id, sender, header_sha256, expires_ms, our_receipt, purged_ms)
    SELECT id, id, sender, header_sha256, expires_ms, our_receipt, purged_ms
    FROM purged_messages;
DROP TABLE purged_messages;
ALTER TABLE purged_messages_v6 RENAME TO purged_messages;
CREATE INDEX purged_messages_expiry ON purged_messages (expires_ms);

ALTER TABLE provisions ADD COLUMN wire_id BLOB
    CHECK (wire_id IS NULL OR length(wire_id) = 16);
",
    // 7: at most one receipt per issuer and disposition per message (the
    // first kept), and when each receipt's signature and chain verified.
    r"
DELETE FROM receipts WHERE seq NOT IN (
    SELECT MIN(seq) FROM receipts GROUP BY message_id, issuer, disposition
);
CREATE UNIQUE INDEX receipts_issuer_disposition ON receipts (message_id, issuer, disposition);
ALTER TABLE receipts ADD COLUMN verified_ms INTEGER;
",
    // 8: pending deliveries by next hop, so that claiming work fairly
    // across next hops reads only the items it takes.
    r"
CREATE INDEX deliveries_target_due ON deliveries (target, next_attempt_ms, id)
    WHERE state = 'pending';
",
    // 9: a fencing token per claim.
    r"
ALTER TABLE deliveries ADD COLUMN claim INTEGER NOT NULL DEFAULT 0 CHECK (claim >= 0);
",
];

/// The newest schema version this build knows (and writes).
pub fn supported_schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// How long a connection waits for a lock held by another connection.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection settings shared by the writer and the reader.
pub(super) fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
    conn.execute_batch("PRAGMA trusted_schema = OFF;")?;
    Ok(())
}

/// Brings the schema to the newest version, one transaction per step.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = u32::try_from(MIGRATIONS.len())
        .map_err(|_| StoreError::Corrupt("too many migrations".into()))?;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let version = u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {version}")))?;
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        let Some(sql) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
        tx.commit()?;
    }
}
