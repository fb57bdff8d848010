//! The tamper-evident audit log (DESIGN.md §6), in the style of Certificate
//! Transparency (RFC 9162): every access and transfer is an [`AuditEntry`],
//! the entries are the leaves of a Merkle tree, the log owner signs
//! [`Checkpoint`]s (tree heads), and an export file proves each exported
//! entry against a signed checkpoint. Anyone holding the party's identity
//! certificate verifies an export offline with [`verify_export`], without the
//! daemon.
//!
//! # Merkle tree
//!
//! Exactly RFC 9162 §2.1 with SHA-256 ([`crate::suite::merkle_leaf_hash`],
//! [`crate::suite::merkle_node_hash`]):
//!
//! * leaf hash `SHA-256(0x00 || leaf data)`, interior node `SHA-256(0x01 || left || right)`;
//! * the head of `n > 1` leaves splits at the largest power of two `k < n`:
//!   `MTH(D[0:n]) = node(MTH(D[0:k]), MTH(D[k:n]))`; the empty tree's head is `SHA-256("")`;
//! * inclusion proofs (audit paths, §2.1.3) and consistency proofs (§2.1.4)
//!   are lists of 32-byte hashes, verified with the RFC's algorithms
//!   ([`verify_inclusion`], [`verify_consistency`]).
//!
//! [`MerkleTree`] holds all leaf hashes and makes proofs for any historical
//! size; [`Frontier`] keeps only the `popcount(size)` subtree roots needed to
//! append and compute the head (the daemon stores it next to each checkpoint).
//! Its storage form is `size` (u64 big-endian) followed by the peaks, 32 bytes
//! each, largest (leftmost) subtree first.
//!
//! # Entries (leaf data)
//!
//! The leaf data of entry `e` is exactly `e.to_canonical_json()`: compact
//! JSON (no whitespace), fields in this order, `None` as `null`, strings
//! escaped as serde_json does:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `seq` | integer | zero-based leaf index of the entry in the log |
//! | `time_ms` | integer | milliseconds since the Unix epoch (non-decreasing along the log) |
//! | `party` | string | the log owner's party URI |
//! | `actor` | string | who: `client:<uri>`, `peer:<uri>`, `admin`, `daemon` |
//! | `action` | string | `send`, `receive`, `relay`, `forward`, `receipt`, `fetch`, `ack`, `list`, `status`, `provision`, `purge`, `admin`, `start`, `stop` |
//! | `message_id` | string or null | the message id as [`MessageId`](crate::MessageId) displays it: lowercase UUID form, 8-4-4-4-12 hex digits |
//! | `subjects` | array of strings | patient pseudonyms, 64 lowercase hex digits each |
//! | `outcome` | string | `ok`, `rejected`, `failed` |
//! | `reason` | string or null | reason code of a rejection or failure (printable ASCII, at most 64 bytes) |
//! | `detail` | string or null | free text |
//! | `subject_set` | object, left out when `None` | the subjects by reference ([`SubjectSet`]) when the message names more than [`MAX_INLINE_SUBJECTS`]; `subjects` is then empty |
//!
//! Free text enters the log through [`log_text`] (bounded, control
//! characters escaped), and [`AuditEntry::validate`] is the one rule for
//! entries: the daemon applies it on append, the export writer and the
//! verifier when they read. An entry the writer still cannot export is
//! written as an `unreadable` line (its proven leaf hash), which the verifier
//! reports as [`Problem::Unreadable`] before checking the rest.
//!
//! Example:
//! `{"seq":0,"time_ms":1780272000000,"party":"urn:jp:mhlw:facility:1310000013","actor":"daemon","action":"start","message_id":null,"subjects":[],"outcome":"ok","reason":null,"detail":null}`
//!
//! Readers refuse unknown fields. A verifier re-encodes a parsed entry
//! canonically before hashing, so what is authenticated is the entry's
//! content, not the spelling of the JSON around it.
//!
//! # Patient pseudonyms
//!
//! Patients appear only as `HMAC-SHA256(key, "exchange/v1 subject pseudonym"
//! || 0x00 || subject id)` under the facility's secret [`SubjectKey`]
//! ([`Pseudonym`], 64 hex digits). The key holder can find a given patient's
//! entries; nobody else learns patient ids from the log.
//!
//! # Signed checkpoints
//!
//! A [`Checkpoint`] `{party, tree_size, root, time_ms}` is signed
//! ([`SignedCheckpoint::sign`]) with the party's identity key: ECDSA P-256
//! over `"exchange/v1 audit checkpoint" || 0x00 || body`, where `body` is
//!
//! ```text
//! version    u32 BE (1)
//! party      u16 BE length, then the URI's bytes
//! tree_size  u64 BE
//! root       32 bytes
//! time_ms    u64 BE
//! ```
//!
//! The storage form ([`SignedCheckpoint::to_bytes`], at most 64 KiB) is
//! `"EXCKP\0"`, version u16 BE (1), body (u16 BE length, bytes), the 64-byte
//! signature `r || s` (low S), a u8 count of certificates (1 to 8), then each
//! certificate as u16 BE length and DER, the signer's leaf first.
//!
//! It verifies either with the party's identity certificate given out of
//! band ([`SignedCheckpoint::verify_with_certificate`]: that certificate must
//! be the carried chain's leaf, name the checkpoint's party, have the identity
//! key role, be valid at `time_ms` and have made the signature) or with a
//! [`TrustStore`](crate::trust::TrustStore) ([`SignedCheckpoint::verify`]: the
//! carried chain is path-validated at `time_ms`, as receipts are).
//!
//! # Export file (`exchange-audit-export/1`)
//!
//! UTF-8 JSON lines, each line one JSON object with a `"type"`, each line at
//! most 1 MiB. Hashes are 64 lowercase hex digits; checkpoints are standard
//! base64 (with padding) of the storage form. In this order:
//!
//! 1. **header** (line 1):
//!    `{"type":"header","format":"exchange-audit-export/1","party":P,"from_ms":F|null,"to_ms":T|null,"first":a,"end":b,"tree_size":n}`.
//!    The export contains the entries with `a <= seq < b` of the log of `n`
//!    entries: those dated in `[F, T)`, or all of them (`F` and `T` null,
//!    `a = 0`, `b = n`). A null `from_ms` means `a = 0`; a null `to_ms` means `b = n`.
//! 2. **before** witness, if `from_ms` is set and `a > 0`:
//!    `{"type":"before","entry":E,"proof":[...]}` with entry `a - 1`, dated before `F`.
//! 3. **entries**, one line each, in seq order:
//!    `{"type":"entry","entry":E,"proof":[h1,h2,...]}` where `E` is the
//!    entry as above and `proof` its inclusion proof at tree size `n`.
//! 4. **after** witness, if `to_ms` is set and `b < n`:
//!    `{"type":"after","entry":E,"proof":[...]}` with entry `b`, dated at or after `T`.
//! 5. **earlier checkpoints** (optional, any number):
//!    `{"type":"checkpoint","checkpoint":B64,"consistency":[...]}` with the
//!    consistency proof from that checkpoint's size to `n`.
//! 6. **latest** (the last line): `{"type":"latest","checkpoint":B64}`, the
//!    signed checkpoint of size `n` that everything is proven against.
//!
//! [`ExportWriter`] writes this and refuses anything that would not verify.
//!
//! # Verification
//!
//! [`verify_export`] reads the file with the owner's identity certificate.
//! It fails only if the file cannot be checked at all (no header on line 1,
//! another format, no latest checkpoint, or a latest checkpoint that does not
//! verify with the certificate: bad signature, other signer, other party).
//! Otherwise it returns an [`ExportReport`] whose [`Problem`]s name lines and
//! seqs:
//!
//! * the header is unsigned, so it is checked against the checkpoint: party
//!   and `tree_size` must match (if `tree_size` does not, no entry can be
//!   checked and only [`Problem::HeaderMismatch`] is reported); a full export
//!   must cover `[0, tree_size)`;
//! * an entry line is *authentic* if its inclusion proof at its own `seq`
//!   leads to the checkpoint's root. Authentic lines inside `[first, end)`
//!   count once per seq (`entries_verified`); a repeated seq, a seq outside
//!   the range, or a failing line whose seq an authentic line proves is
//!   [`Problem::Inserted`]; a failing line whose seq no authentic line proves
//!   is [`Problem::Modified`];
//! * a line that does not parse (bad JSON, unknown type or field, an entry
//!   failing validation, a proof hash that is not 64 lowercase hex digits) is
//!   [`Problem::Malformed`]; its seq then counts as missing;
//! * seqs of `[first, end)` that no line covers are [`Problem::Deleted`]
//!   ([`Problem::DeletedRange`] for several in a row), except a missing tail,
//!   which is one [`Problem::Truncated`];
//! * authentic entries off the longest increasing run of seqs (in file
//!   order) are [`Problem::Reordered`];
//! * for a partial range, the witnesses prove completeness: entry `first - 1`
//!   is dated before `from_ms` and entry `end` at or after `to_ms` (times are
//!   non-decreasing along the log), else [`Problem::BadWitness`];
//! * earlier checkpoints must verify with the same certificate
//!   ([`Problem::BadCheckpoint`]) and be consistent with the latest
//!   ([`Problem::Inconsistent`]: the log was rewritten or forked).
//!
//! Limits of what a single export proves: an attacker who deletes an entry
//! and renumbers the following ones changes each renumbered entry's leaf, so
//! each shows as `Modified` (and the lost last seq as `Truncated`); the
//! deletion is still detected, only not named as such. An export proves the
//! log as of its latest checkpoint; a log owner who signs two different
//! histories is caught only by comparing checkpoints
//! ([`verify_consistency`], earlier checkpoint lines).

mod checkpoint;
mod entry;
mod export;
mod merkle;
mod pseudonym;

pub use checkpoint::{
    CHECKPOINT_FILE_VERSION, CHECKPOINT_MAGIC, Checkpoint, MAX_CHECKPOINT_LEN, SignedCheckpoint,
};
pub use entry::{
    AuditAction, AuditEntry, AuditOutcome, MAX_ACTOR, MAX_DETAIL, MAX_ENTRY_LEN,
    MAX_INLINE_SUBJECTS, MAX_SUBJECTS, SubjectSet, log_text,
};
pub use export::{
    EXPORT_FORMAT, ExportRange, ExportReport, ExportWriter, MAX_LINE_LEN, Problem, verify_export,
};
pub use merkle::{
    Frontier, Hash, MAX_CONSISTENCY_PROOF, MAX_INCLUSION_PROOF, MerkleTree,
    root_from_inclusion_proof, verify_consistency, verify_inclusion,
};
pub use pseudonym::{Pseudonym, SubjectKey};
