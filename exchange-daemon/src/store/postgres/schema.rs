//! The PostgreSQL store's schema and its migrations.
//!
//! The version is kept in `exchange_schema` (one row); [`MIGRATIONS`]`[i]`
//! takes version `i` to `i + 1`, each in its own transaction, under a
//! transaction-scoped advisory lock so that replicas starting together
//! migrate once. A database with a newer version is refused
//! ([`StoreError::SchemaTooNew`]).
//!
//! The tables are those of the SQLite store at its version 9 (see
//! [`crate::store::sqlite::schema`]), with these differences:
//!
//! * `messages.ciphertext` holds an inline ciphertext; a large one is in
//!   `blob_chunks` (`message_id`, `n`, `data`: pieces of at most
//!   [`CHUNK`](super::blobs::CHUNK) bytes, numbered from 0), and
//!   `messages.chunked` says which. Chunks are stored without compression
//!   (ciphertext does not compress).
//! * `audit_head` (one row): the next audit `seq` and the newest entry's
//!   time. Every transaction that appends to the audit log locks this row
//!   last, just before it commits: the log stays one gap-free sequence for
//!   the facility whichever replica appends.
//! * `facility` (one row): a check value of the facility's pseudonym key
//!   (never the key), which every replica's key must match.
//! * `nodes`: one row per replica name, whose number keys the advisory lock
//!   a running replica holds (two replicas under one name are refused).
//! * Identity columns (`deliveries.id`, `receipts.seq`, `provisions.id`)
//!   are never reused.
//!
//! Times are Unix milliseconds in `bigint` columns.
//!
//! Triggers announce changes on the channel [`CHANGES_CHANNEL`], delivered
//! to listeners when the writing transaction commits (PostgreSQL folds
//! repeats within one transaction):
//!
//! * `w`: a delivery is due and unclaimed, because it was stored or a
//!   replica gave its claim back (a retry scheduled for later is not
//!   announced; the delivery loop's poll finds it);
//! * `m` and a message key in hex: a delivery of that message changed
//!   state or counted another attempt, or a receipt for it was stored.

use tokio_postgres::Client;

use super::pg_error;
use crate::error::StoreError;

/// The advisory lock key (first half) of schema migrations.
const MIGRATION_LOCK: i64 = 0x6578_6368_616e_6765; // "exchange"

/// Schema migrations: entry `i` takes the version from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the whole schema.
    r"
CREATE TABLE messages (
    id             bytea PRIMARY KEY CHECK (length(id) = 16),
    wire_id        bytea NOT NULL CHECK (length(wire_id) = 16),
    header_sha256  bytea NOT NULL CHECK (length(header_sha256) = 32),
    kind           text NOT NULL CHECK (kind IN ('outbound', 'relay', 'inbound')),
    head           bytea NOT NULL,
    ciphertext     bytea,
    chunked        boolean NOT NULL,
    ciphertext_len bigint NOT NULL CHECK (ciphertext_len >= 0),
    sender         text NOT NULL,
    upstream       text,
    local_client   text,
    content_type   text NOT NULL,
    purpose        text NOT NULL,
    created_ms     bigint NOT NULL,
    expires_ms     bigint NOT NULL,
    received_ms    bigint NOT NULL,
    our_receipt    bytea,
    acked_ms       bigint,
    fetched_ms     bigint,
    CHECK ((ciphertext IS NULL) = chunked),
    UNIQUE (sender, wire_id)
);
CREATE INDEX messages_wire ON messages (wire_id);
CREATE INDEX messages_inbox ON messages (received_ms, id) WHERE kind = 'inbound';
CREATE INDEX messages_received ON messages (received_ms, id);

CREATE TABLE blob_chunks (
    message_id bytea NOT NULL REFERENCES messages (id),
    n          integer NOT NULL CHECK (n >= 0),
    data       bytea NOT NULL,
    PRIMARY KEY (message_id, n)
);
ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;

CREATE TABLE deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id      bytea NOT NULL REFERENCES messages (id),
    kind            text NOT NULL CHECK (kind IN ('envelope', 'receipt')),
    payload         bytea,
    target          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('pending', 'done', 'failed')),
    failure         text,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_ms bigint NOT NULL,
    claimed_by      text,
    claim_until_ms  bigint,
    claim           bigint NOT NULL DEFAULT 0 CHECK (claim >= 0),
    last_error      text,
    expires_ms      bigint NOT NULL,
    CHECK ((kind = 'receipt') = (payload IS NOT NULL)),
    CHECK ((state = 'failed') = (failure IS NOT NULL))
);
CREATE INDEX deliveries_target_due ON deliveries (target, next_attempt_ms, id)
    WHERE state = 'pending';
CREATE INDEX deliveries_message ON deliveries (message_id);
CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE TABLE receipts (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id  bytea NOT NULL REFERENCES messages (id),
    digest      bytea NOT NULL CHECK (length(digest) = 32),
    issuer      text NOT NULL,
    disposition text NOT NULL,
    issued_ms   bigint NOT NULL,
    signed      bytea NOT NULL,
    verified_ms bigint,
    UNIQUE (message_id, digest),
    UNIQUE (message_id, issuer, disposition)
);

CREATE TABLE audit_head (
    id       integer PRIMARY KEY CHECK (id = 1),
    next_seq bigint NOT NULL CHECK (next_seq >= 0),
    last_ms  bigint NOT NULL
);
INSERT INTO audit_head (id, next_seq, last_ms) VALUES (1, 0, 0);

CREATE TABLE audit_log (
    seq        bigint PRIMARY KEY CHECK (seq >= 0),
    time_ms    bigint NOT NULL,
    entry      bytea NOT NULL,
    leaf_hash  bytea NOT NULL CHECK (length(leaf_hash) = 32)
);
CREATE INDEX audit_log_time ON audit_log (time_ms);

CREATE TABLE audit_checkpoints (
    tree_size  bigint PRIMARY KEY CHECK (tree_size > 0),
    time_ms    bigint NOT NULL,
    root       bytea NOT NULL CHECK (length(root) = 32),
    frontier   bytea NOT NULL,
    signed     bytea NOT NULL
);

CREATE TABLE audit_subject_sets (
    digest    bytea NOT NULL CHECK (length(digest) = 32),
    pseudonym bytea NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (digest, pseudonym)
);
CREATE INDEX audit_subject_sets_pseudonym ON audit_subject_sets (pseudonym);

CREATE FUNCTION exchange_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION exchange_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION exchange_append_only();
CREATE TRIGGER audit_subject_sets_append_only BEFORE UPDATE OR DELETE ON audit_subject_sets
    FOR EACH ROW EXECUTE FUNCTION exchange_append_only();

CREATE TABLE message_meta (
    message_id    bytea PRIMARY KEY REFERENCES messages (id),
    document_type text NOT NULL,
    title         text NOT NULL
);

CREATE TABLE message_subjects (
    message_id bytea NOT NULL REFERENCES messages (id),
    pseudonym  bytea NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (message_id, pseudonym)
);
CREATE INDEX message_subjects_pseudonym ON message_subjects (pseudonym);

CREATE TABLE provisions (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    direction         text NOT NULL CHECK (direction IN ('provided', 'received')),
    message_id        bytea NOT NULL CHECK (length(message_id) = 16),
    wire_id           bytea NOT NULL CHECK (length(wire_id) = 16),
    time_ms           bigint NOT NULL,
    counterparty      text NOT NULL,
    counterparty_name text NOT NULL,
    recipient         text NOT NULL,
    role              text NOT NULL,
    document_type     text NOT NULL,
    title             text NOT NULL,
    purpose           text NOT NULL,
    content_type      text NOT NULL,
    receipt           bytea NOT NULL,
    UNIQUE (message_id, direction, recipient)
);

CREATE TABLE provision_subjects (
    provision_id bigint NOT NULL REFERENCES provisions (id),
    pseudonym    bytea NOT NULL CHECK (length(pseudonym) = 32),
    PRIMARY KEY (pseudonym, provision_id)
);

CREATE TABLE purged_messages (
    key           bytea PRIMARY KEY CHECK (length(key) = 16),
    wire_id       bytea NOT NULL CHECK (length(wire_id) = 16),
    sender        text NOT NULL,
    header_sha256 bytea NOT NULL CHECK (length(header_sha256) = 32),
    expires_ms    bigint NOT NULL,
    our_receipt   bytea,
    purged_ms     bigint NOT NULL,
    UNIQUE (sender, wire_id)
);
CREATE INDEX purged_messages_expiry ON purged_messages (expires_ms);

CREATE TABLE message_awaited (
    message_id bytea NOT NULL REFERENCES messages (id),
    party      text NOT NULL,
    PRIMARY KEY (message_id, party)
);

CREATE TABLE purge_clock (
    id           integer PRIMARY KEY CHECK (id = 1),
    last_ms      bigint NOT NULL,
    suspended_ms bigint
);

CREATE TABLE send_keys (
    client         text NOT NULL,
    key            text NOT NULL,
    request_sha256 bytea NOT NULL CHECK (length(request_sha256) = 32),
    message_id     bytea NOT NULL CHECK (length(message_id) = 16),
    expires_ms     bigint NOT NULL,
    PRIMARY KEY (client, key)
);
CREATE INDEX send_keys_expiry ON send_keys (expires_ms);

CREATE TABLE facility (
    id                  integer PRIMARY KEY CHECK (id = 1),
    pseudonym_key_check bytea NOT NULL CHECK (length(pseudonym_key_check) = 32)
);

CREATE TABLE nodes (
    id      integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name    text NOT NULL UNIQUE,
    seen_ms bigint NOT NULL
);
",
    // 2: changes announced to the replicas (see the module documentation).
    r"
CREATE FUNCTION exchange_announce_delivery() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'pending' AND NEW.claimed_by IS NULL
       AND (TG_OP = 'INSERT' OR OLD.claimed_by IS NOT NULL)
       AND NEW.next_attempt_ms <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        PERFORM pg_notify('exchange_changes', 'w');
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.state <> OLD.state OR NEW.attempts <> OLD.attempts) THEN
        PERFORM pg_notify('exchange_changes', 'm' || encode(NEW.message_id, 'hex'));
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER deliveries_announce AFTER INSERT OR UPDATE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION exchange_announce_delivery();

CREATE FUNCTION exchange_announce_receipt() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('exchange_changes', 'm' || encode(NEW.message_id, 'hex'));
    RETURN NULL;
END
$$;
CREATE TRIGGER receipts_announce AFTER INSERT ON receipts
    FOR EACH ROW EXECUTE FUNCTION exchange_announce_receipt();
",
];

/// The channel on which the schema's triggers announce changes.
pub const CHANGES_CHANNEL: &str = "exchange_changes";

/// The newest schema version this build knows (and writes).
pub fn supported_schema_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Brings the schema to the newest version, one transaction per step,
/// each under the migration lock.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let supported = supported_schema_version();
    loop {
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_error)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS exchange_schema (\
                 id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL); \
             INSERT INTO exchange_schema (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
        )
        .await
        .map_err(pg_error)?;
        let version: i32 = tx
            .query_one("SELECT version FROM exchange_schema WHERE id = 1", &[])
            .await
            .map_err(pg_error)?
            .get(0);
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
            return tx.commit().await.map_err(pg_error);
        };
        tx.batch_execute(sql).await.map_err(pg_error)?;
        let next = i32::try_from(version + 1)
            .map_err(|_| StoreError::Corrupt("too many migrations".into()))?;
        tx.execute(
            "UPDATE exchange_schema SET version = $1 WHERE id = 1",
            &[&next],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
    }
}
