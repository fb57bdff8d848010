//! The export file (JSON lines) and its offline verifier. The format is
//! specified in the [module documentation](super).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{BufRead, Read, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::entry::{AuditEntry, log_text};
use super::merkle::{
    Hash, MAX_CONSISTENCY_PROOF, MAX_INCLUSION_PROOF, MerkleTree, root_from_inclusion_proof,
    verify_consistency,
};
use crate::error::{AuditError, Error, FormatError};
use crate::identity::Certificate;

/// The `format` value of the header line.
pub const EXPORT_FORMAT: &str = "exchange-audit-export/1";
/// Longest line the verifier reads (bytes, without the newline).
pub const MAX_LINE_LEN: usize = 1024 * 1024;

/// Which part of the log an export covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportRange {
    /// Start of the time range (inclusive, ms), or `None` for "from the first entry".
    pub from_ms: Option<u64>,
    /// End of the time range (exclusive, ms), or `None` for "to the last entry".
    pub to_ms: Option<u64>,
    /// First exported seq.
    pub first: u64,
    /// One past the last exported seq.
    pub end: u64,
}

impl ExportRange {
    /// The whole log of `tree_size` entries.
    pub fn all(tree_size: u64) -> Self {
        Self {
            from_ms: None,
            to_ms: None,
            first: 0,
            end: tree_size,
        }
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    format: &'static str,
    party: &'a str,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    first: u64,
    end: u64,
    tree_size: u64,
}

#[derive(Serialize)]
struct UnreadableOut {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    leaf_hash: String,
    reason: String,
    proof: Vec<String>,
}

/// Longest `reason` of an `unreadable` line (bytes).
const MAX_UNREADABLE_REASON: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Before,
    Entries,
    After,
    Checkpoints,
}

/// Writes an export file, line by line, in the only order the format allows:
/// header, `before` witness, entries, `after` witness, earlier checkpoints,
/// latest checkpoint. It refuses anything that would not verify (wrong seq,
/// an entry whose leaf hash is not the tree's, a checkpoint of another tree).
pub struct ExportWriter<'t, W: Write> {
    out: W,
    tree: &'t MerkleTree,
    latest: SignedCheckpoint,
    checkpoint: Checkpoint,
    range: ExportRange,
    next: u64,
    stage: Stage,
    before_written: bool,
    after_written: bool,
    witness_unavailable: bool,
}

impl<W: Write> fmt::Debug for ExportWriter<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportWriter")
            .field("checkpoint", &self.checkpoint)
            .field("range", &self.range)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_owned())
}

fn hex_list(hashes: &[Hash]) -> String {
    let mut s = String::with_capacity(2 + hashes.len() * 67);
    s.push('[');
    for (i, h) in hashes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        s.push_str(&hex::encode(h));
        s.push('"');
    }
    s.push(']');
    s
}

impl<'t, W: Write> ExportWriter<'t, W> {
    /// Starts an export of `range` from `tree` (all leaf hashes of the log,
    /// at least `latest.tree_size` of them), proven against `latest` (the
    /// log owner's own checkpoint, whose root must be the tree's at its
    /// size), and writes the header line.
    pub fn new(
        mut out: W,
        tree: &'t MerkleTree,
        latest: &SignedCheckpoint,
        range: ExportRange,
    ) -> Result<Self, Error> {
        let checkpoint = latest.unverified()?;
        let n = checkpoint.tree_size;
        if tree.root_at(n)? != checkpoint.root {
            return Err(invalid("latest checkpoint root is not the tree's root"));
        }
        if range.first > range.end || range.end > n {
            return Err(AuditError::OutOfRange {
                index: range.end.max(range.first),
                size: n,
            }
            .into());
        }
        if (range.from_ms.is_none() && range.first != 0)
            || (range.to_ms.is_none() && range.end != n)
        {
            return Err(invalid(
                "an open-ended range must start at 0 or end at the tree size",
            ));
        }
        let header = HeaderOut {
            kind: "header",
            format: EXPORT_FORMAT,
            party: checkpoint.party.as_str(),
            from_ms: range.from_ms,
            to_ms: range.to_ms,
            first: range.first,
            end: range.end,
            tree_size: n,
        };
        let mut line = serde_json::to_vec(&header).map_err(|_| invalid("header"))?;
        line.push(b'\n');
        out.write_all(&line)?;
        Ok(Self {
            out,
            tree,
            latest: latest.clone(),
            range,
            next: range.first,
            stage: Stage::Before,
            before_written: false,
            after_written: false,
            witness_unavailable: false,
            checkpoint,
        })
    }

    fn stage(&mut self, stage: Stage) -> Result<(), Error> {
        if stage < self.stage {
            return Err(invalid("export lines out of order"));
        }
        self.stage = stage;
        Ok(())
    }

    fn write_entry_line(&mut self, kind: &str, entry: &AuditEntry) -> Result<(), Error> {
        let n = self.checkpoint.tree_size;
        if self.tree.leaf(entry.seq) != Some(entry.leaf_hash()) {
            return Err(invalid("entry is not the tree's leaf at its seq"));
        }
        let proof = self.tree.inclusion_proof(entry.seq, n)?;
        let json = entry.to_canonical_json();
        let mut line = Vec::with_capacity(json.len() + 64 + proof.len() * 67);
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(kind.as_bytes());
        line.extend_from_slice(b"\",\"entry\":");
        line.extend_from_slice(&json);
        line.extend_from_slice(b",\"proof\":");
        line.extend_from_slice(hex_list(&proof).as_bytes());
        line.extend_from_slice(b"}\n");
        self.out.write_all(&line)?;
        Ok(())
    }

    /// Writes the `before` witness: entry `first - 1`, dated before `from_ms`.
    pub fn before(&mut self, entry: &AuditEntry) -> Result<(), Error> {
        self.stage(Stage::Before)?;
        let Some(from) = self.range.from_ms else {
            return Err(invalid("no before witness without from_ms"));
        };
        if self.before_written
            || self.range.first == 0
            || entry.seq != self.range.first - 1
            || entry.time_ms >= from
        {
            return Err(invalid(
                "before witness must be entry first-1, dated before from_ms",
            ));
        }
        self.write_entry_line("before", entry)?;
        self.before_written = true;
        Ok(())
    }

    /// Writes the next entry of the range (seqs must come in order, none skipped).
    pub fn entry(&mut self, entry: &AuditEntry) -> Result<(), Error> {
        self.stage(Stage::Entries)?;
        if entry.seq != self.next || self.next >= self.range.end {
            return Err(invalid(
                "entries must be written in seq order within the range",
            ));
        }
        self.write_entry_line("entry", entry)?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next entry from its canonical JSON (as stored by the daemon).
    pub fn entry_json(&mut self, canonical: &[u8]) -> Result<(), Error> {
        let entry = AuditEntry::from_json(canonical)?;
        if entry.to_canonical_json() != canonical {
            return Err(invalid("stored entry is not in canonical form"));
        }
        self.entry(&entry)
    }

    /// Writes the next entry of the range as an `unreadable` line, for a
    /// stored entry that cannot be exported as it is (it does not parse,
    /// breaks the rules of an entry, or is not in canonical form): its seq,
    /// the leaf hash of its stored bytes (which must be the tree's leaf at
    /// that seq), the inclusion proof and `reason`. A verifier reports it
    /// as [`Problem::Unreadable`] and goes on: one bad entry does not make
    /// the rest of the log unexportable.
    pub fn unreadable(&mut self, seq: u64, stored: &[u8], reason: &str) -> Result<(), Error> {
        self.stage(Stage::Entries)?;
        if seq != self.next || self.next >= self.range.end {
            return Err(invalid(
                "entries must be written in seq order within the range",
            ));
        }
        let leaf = crate::suite::merkle_leaf_hash(stored);
        if self.tree.leaf(seq) != Some(leaf) {
            return Err(invalid("entry is not the tree's leaf at its seq"));
        }
        let proof = self.tree.inclusion_proof(seq, self.checkpoint.tree_size)?;
        let line = UnreadableOut {
            kind: "unreadable",
            seq,
            leaf_hash: hex::encode(leaf),
            reason: log_text(reason, MAX_UNREADABLE_REASON),
            proof: proof.iter().map(hex::encode).collect(),
        };
        let mut bytes = serde_json::to_vec(&line).map_err(|_| invalid("unreadable line"))?;
        bytes.push(b'\n');
        self.out.write_all(&bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Writes the `after` witness: entry `end`, dated at or after `to_ms`.
    pub fn after(&mut self, entry: &AuditEntry) -> Result<(), Error> {
        self.stage(Stage::After)?;
        let Some(to) = self.range.to_ms else {
            return Err(invalid("no after witness without to_ms"));
        };
        if self.after_written
            || self.next != self.range.end
            || entry.seq != self.range.end
            || entry.time_ms < to
        {
            return Err(invalid(
                "after witness must follow all entries, be entry end, dated at or after to_ms",
            ));
        }
        self.write_entry_line("after", entry)?;
        self.after_written = true;
        Ok(())
    }

    /// Writes an earlier checkpoint of this log with its consistency proof to the latest.
    pub fn earlier_checkpoint(&mut self, earlier: &SignedCheckpoint) -> Result<(), Error> {
        self.stage(Stage::Checkpoints)?;
        let old = earlier.unverified()?;
        if old.party != self.checkpoint.party {
            return Err(invalid("earlier checkpoint of another party"));
        }
        let n = self.checkpoint.tree_size;
        if old.tree_size > n || self.tree.root_at(old.tree_size)? != old.root {
            return Err(AuditError::ConsistencyProof.into());
        }
        let proof = self.tree.consistency_proof(old.tree_size, n)?;
        let line = format!(
            "{{\"type\":\"checkpoint\",\"checkpoint\":\"{}\",\"consistency\":{}}}\n",
            BASE64.encode(earlier.to_bytes()),
            hex_list(&proof)
        );
        self.out.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Records that a boundary witness of the range cannot be written (its
    /// stored entry cannot be exported): [`finish`](Self::finish) then
    /// accepts the export without it, and a verifier reports the missing
    /// witness ([`Problem::BadWitness`]: the range's completeness unproven)
    /// instead of the whole export failing.
    pub fn witness_unavailable(&mut self) {
        self.witness_unavailable = true;
    }

    /// Checks that the range is complete (with its witnesses, unless one
    /// was [unavailable](Self::witness_unavailable)), writes the latest
    /// checkpoint line and returns the writer.
    pub fn finish(mut self) -> Result<W, Error> {
        let n = self.checkpoint.tree_size;
        if self.next != self.range.end {
            return Err(invalid("not every entry of the range was written"));
        }
        let missing_ok = self.witness_unavailable;
        if self.range.from_ms.is_some()
            && self.range.first > 0
            && !self.before_written
            && !missing_ok
        {
            return Err(invalid("missing before witness"));
        }
        if self.range.to_ms.is_some() && self.range.end < n && !self.after_written && !missing_ok {
            return Err(invalid("missing after witness"));
        }
        let line = format!(
            "{{\"type\":\"latest\",\"checkpoint\":\"{}\"}}\n",
            BASE64.encode(self.latest.to_bytes())
        );
        self.out.write_all(line.as_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One finding of [`verify_export`]. Line numbers are 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// An entry line whose proof fails at its seq, while no authentic line
    /// has that seq: the entry was altered.
    Modified {
        /// Line number.
        line: u64,
        /// The seq the line claims.
        seq: u64,
    },
    /// A line that is not part of the exported range of the log: its seq
    /// duplicates an authentic line's, lies outside `[first, end)`, or its
    /// proof fails while another line proves that seq.
    Inserted {
        /// Line number.
        line: u64,
        /// The seq the line claims.
        seq: u64,
    },
    /// An entry of the range is present only as its proven leaf hash (an
    /// `unreadable` line): the log holds an entry at that seq, unaltered
    /// since it was signed, whose content the exporter could not export.
    Unreadable {
        /// Line number.
        line: u64,
        /// The seq of the entry.
        seq: u64,
        /// Why the exporter could not export it, as it says (not verified).
        reason: String,
    },
    /// An entry inside `[first, end)` is missing.
    Deleted {
        /// The missing seq.
        seq: u64,
    },
    /// Several consecutive entries inside `[first, end)` are missing.
    DeletedRange {
        /// First missing seq.
        first: u64,
        /// Last missing seq (inclusive).
        last: u64,
    },
    /// An authentic entry out of seq order (not on the longest increasing
    /// run of authentic seqs in file order).
    Reordered {
        /// Line number.
        line: u64,
        /// Its seq.
        seq: u64,
        /// The seq of the authentic entry just before it in the file
        /// (`None` if it is the first).
        after_seq: Option<u64>,
    },
    /// The entries stop before `expected_end`: every seq after `last_seq`
    /// (or all of them, if `None`) is missing.
    Truncated {
        /// One past the last seq the export must contain.
        expected_end: u64,
        /// Last seq present, if any.
        last_seq: Option<u64>,
    },
    /// The (unsigned) header disagrees with the checkpoint or with itself.
    HeaderMismatch {
        /// What disagrees.
        reason: String,
    },
    /// A boundary witness is missing, not authentic, at the wrong seq, or
    /// dated inside the range.
    BadWitness {
        /// Line number of the witness, if there is one.
        line: Option<u64>,
        /// What is wrong.
        reason: String,
    },
    /// An earlier checkpoint that does not verify with the certificate.
    BadCheckpoint {
        /// Line number.
        line: u64,
        /// Why.
        reason: String,
    },
    /// An earlier checkpoint that is not consistent with the latest: the log
    /// was rewritten or forked.
    Inconsistent {
        /// Line number.
        line: u64,
        /// The earlier checkpoint's tree size.
        old_size: u64,
    },
    /// A line that cannot be parsed.
    Malformed {
        /// Line number.
        line: u64,
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Modified { line, seq } => write!(
                f,
                "line {line}: entry seq {seq} was modified (its inclusion proof does not verify)"
            ),
            Self::Inserted { line, seq } => write!(
                f,
                "line {line}: entry claiming seq {seq} is not part of the exported log (inserted or duplicated)"
            ),
            Self::Deleted { seq } => write!(f, "entry seq {seq} is missing (deleted)"),
            Self::DeletedRange { first, last } => {
                write!(f, "entries seq {first} to {last} are missing (deleted)")
            }
            Self::Reordered {
                line,
                seq,
                after_seq: Some(after),
            } => write!(
                f,
                "line {line}: entry seq {seq} is out of order (it follows seq {after})"
            ),
            Self::Reordered {
                line,
                seq,
                after_seq: None,
            } => write!(
                f,
                "line {line}: entry seq {seq} is out of order (it comes first)"
            ),
            Self::Truncated {
                expected_end,
                last_seq: Some(last),
            } => write!(
                f,
                "export truncated: entries seq {} to {} are missing after seq {last}",
                last + 1,
                expected_end.saturating_sub(1)
            ),
            Self::Truncated {
                expected_end,
                last_seq: None,
            } => write!(
                f,
                "export truncated: no entry of the range is present (expected up to seq {})",
                expected_end.saturating_sub(1)
            ),
            Self::HeaderMismatch { reason } => write!(f, "header mismatch: {reason}"),
            Self::BadWitness {
                line: Some(line),
                reason,
            } => write!(f, "line {line}: bad boundary witness: {reason}"),
            Self::BadWitness { line: None, reason } => {
                write!(f, "bad boundary witness: {reason}")
            }
            Self::BadCheckpoint { line, reason } => {
                write!(f, "line {line}: earlier checkpoint rejected: {reason}")
            }
            Self::Inconsistent { line, old_size } => write!(
                f,
                "line {line}: earlier checkpoint of size {old_size} is not consistent with the latest (log rewritten or forked)"
            ),
            Self::Malformed { line, reason } => write!(f, "line {line}: malformed: {reason}"),
            Self::Unreadable { line, seq, reason } => write!(
                f,
                "line {line}: entry seq {seq} is in the log but could not be exported ({reason})"
            ),
        }
    }
}

/// What [`verify_export`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The latest checkpoint, verified with the certificate.
    pub checkpoint: Checkpoint,
    /// Authentic entries of the range (each proven against the checkpoint, once per seq).
    pub entries_verified: u64,
    /// Earlier checkpoints that verified and are consistent with the latest.
    pub checkpoints_verified: u64,
    /// Those checkpoints, in file order (to match against checkpoints kept
    /// elsewhere: a witness).
    pub consistent_checkpoints: Vec<Checkpoint>,
    /// Start of the time range, as the header claims.
    pub from_ms: Option<u64>,
    /// End of the time range, as the header claims.
    pub to_ms: Option<u64>,
    /// First seq of the range checked for completeness.
    pub first: u64,
    /// One past the last seq of the range checked for completeness.
    pub end: u64,
    /// Everything found wrong, in file order where it has a line.
    pub problems: Vec<Problem>,
}

impl ExportReport {
    /// Whether the export is complete and unaltered.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum LineIn {
    Header {
        format: String,
        party: String,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        first: u64,
        end: u64,
        tree_size: u64,
    },
    Entry {
        entry: serde_json::Value,
        proof: Vec<String>,
    },
    Before {
        entry: serde_json::Value,
        proof: Vec<String>,
    },
    After {
        entry: serde_json::Value,
        proof: Vec<String>,
    },
    Unreadable {
        seq: u64,
        leaf_hash: String,
        reason: String,
        proof: Vec<String>,
    },
    Checkpoint {
        checkpoint: String,
        consistency: Vec<String>,
    },
    Latest {
        checkpoint: String,
    },
}

struct Header {
    party: String,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    first: u64,
    end: u64,
    tree_size: u64,
}

/// An entry or witness line, reduced to what the analysis needs.
struct Leaf {
    line: u64,
    seq: u64,
    time_ms: u64,
    /// Root the proof leads to at the header's tree size.
    root: Option<Hash>,
}

fn parse_hashes(list: &[String], max: usize) -> Result<Vec<Hash>, String> {
    if list.len() > max {
        return Err(format!("proof of {} hashes (at most {max})", list.len()));
    }
    list.iter()
        .map(|s| {
            let mut h = [0u8; 32];
            if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("proof hash {s:?} is not 64 lowercase hex digits"));
            }
            hex::decode_to_slice(s, &mut h)
                .map_err(|_| format!("proof hash {s:?} is not 64 lowercase hex digits"))?;
            Ok(h)
        })
        .collect()
}

fn parse_leaf(
    line: u64,
    entry: serde_json::Value,
    proof: &[String],
    tree_size: u64,
) -> Result<Leaf, String> {
    let entry: AuditEntry =
        serde_json::from_value(entry).map_err(|e| format!("audit entry: {e}"))?;
    entry.validate().map_err(|e| format!("audit entry: {e}"))?;
    let proof = parse_hashes(proof, MAX_INCLUSION_PROOF)?;
    Ok(Leaf {
        line,
        seq: entry.seq,
        time_ms: entry.time_ms,
        root: root_from_inclusion_proof(&entry.leaf_hash(), entry.seq, tree_size, &proof),
    })
}

fn parse_unreadable(
    line: u64,
    seq: u64,
    leaf_hash: &str,
    proof: &[String],
    tree_size: u64,
) -> Result<Leaf, String> {
    let leaf = parse_hashes(&[leaf_hash.to_owned()], 1)?
        .pop()
        .ok_or_else(|| "unreadable entry without a leaf hash".to_owned())?;
    let proof = parse_hashes(proof, MAX_INCLUSION_PROOF)?;
    Ok(Leaf {
        line,
        seq,
        time_ms: 0,
        root: root_from_inclusion_proof(&leaf, seq, tree_size, &proof),
    })
}

/// Reads one line of at most [`MAX_LINE_LEN`] bytes (without its `\n`);
/// `None` at the end of input. A longer line is skipped to its end and
/// reported as `Some(Err(length))`.
fn read_line(
    reader: &mut impl BufRead,
    buf: &mut Vec<u8>,
) -> Result<Option<Result<(), u64>>, Error> {
    buf.clear();
    let limit = MAX_LINE_LEN as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE_LEN {
        let mut len = buf.len() as u64;
        loop {
            let (done, used, content) = {
                let available = reader.fill_buf()?;
                match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (true, i + 1, i),
                    None => (available.is_empty(), available.len(), available.len()),
                }
            };
            reader.consume(used);
            len += content as u64;
            if done {
                break;
            }
        }
        buf.clear();
        return Ok(Some(Err(len)));
    }
    Ok(Some(Ok(())))
}

fn decode_checkpoint(b64: &str) -> Result<SignedCheckpoint, Error> {
    let bytes = BASE64
        .decode(b64)
        .map_err(|_| FormatError::InvalidField("checkpoint base64"))?;
    SignedCheckpoint::from_bytes(&bytes)
}

/// Verifies an export file against the log owner's identity certificate.
///
/// Fails (`Err`) only when the file cannot be checked at all: no parsable
/// header on line 1, an unknown format, no `latest` checkpoint, or a latest
/// checkpoint that does not verify with `cert` (bad signature, another
/// signer, another party). Everything else is a [`Problem`] in the report.
pub fn verify_export(mut reader: impl BufRead, cert: &Certificate) -> Result<ExportReport, Error> {
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    let mut problems = Vec::new();

    // Line 1: the header.
    match read_line(&mut reader, &mut buf)? {
        None => return Err(FormatError::UnexpectedEof("audit export header").into()),
        Some(Err(len)) => {
            return Err(FormatError::TooLarge {
                what: "audit export line",
                len,
                limit: MAX_LINE_LEN as u64,
            }
            .into());
        }
        Some(Ok(())) => {}
    }
    line_no += 1;
    let header = match serde_json::from_slice::<LineIn>(&buf) {
        Ok(LineIn::Header {
            format,
            party,
            from_ms,
            to_ms,
            first,
            end,
            tree_size,
        }) => {
            if format != EXPORT_FORMAT {
                return Err(FormatError::InvalidField("audit export format").into());
            }
            Header {
                party,
                from_ms,
                to_ms,
                first,
                end,
                tree_size,
            }
        }
        _ => return Err(FormatError::MissingField("audit export header").into()),
    };

    let mut entries: Vec<Leaf> = Vec::new();
    let mut befores: Vec<Leaf> = Vec::new();
    let mut afters: Vec<Leaf> = Vec::new();
    let mut earlier: Vec<(u64, Result<SignedCheckpoint, Error>, Vec<Hash>)> = Vec::new();
    let mut latest: Vec<(u64, String)> = Vec::new();

    let mut unreadable: Vec<(u64, u64, String)> = Vec::new();
    while let Some(read) = read_line(&mut reader, &mut buf)? {
        line_no += 1;
        let line = line_no;
        if let Err(len) = read {
            problems.push(Problem::Malformed {
                line,
                reason: format!("a line of {len} bytes (at most {MAX_LINE_LEN})"),
            });
            continue;
        }
        let parsed = match serde_json::from_slice::<LineIn>(&buf) {
            Ok(l) => l,
            Err(e) => {
                problems.push(Problem::Malformed {
                    line,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let result = match parsed {
            LineIn::Header { .. } => Err("a second header".to_owned()),
            LineIn::Entry { entry, proof } => {
                parse_leaf(line, entry, &proof, header.tree_size).map(|l| entries.push(l))
            }
            LineIn::Before { entry, proof } => {
                parse_leaf(line, entry, &proof, header.tree_size).map(|l| befores.push(l))
            }
            LineIn::After { entry, proof } => {
                parse_leaf(line, entry, &proof, header.tree_size).map(|l| afters.push(l))
            }
            LineIn::Unreadable {
                seq,
                leaf_hash,
                reason,
                proof,
            } => parse_unreadable(line, seq, &leaf_hash, &proof, header.tree_size).map(|l| {
                entries.push(l);
                unreadable.push((line, seq, log_text(&reason, MAX_UNREADABLE_REASON)));
            }),
            LineIn::Checkpoint {
                checkpoint,
                consistency,
            } => parse_hashes(&consistency, MAX_CONSISTENCY_PROOF)
                .map(|proof| earlier.push((line, decode_checkpoint(&checkpoint), proof))),
            LineIn::Latest { checkpoint } => {
                latest.push((line, checkpoint));
                Ok(())
            }
        };
        if let Err(reason) = result {
            problems.push(Problem::Malformed { line, reason });
        }
    }

    // The latest checkpoint: the last line, exactly once.
    let Some((latest_line, latest_b64)) = latest.pop() else {
        return Err(AuditError::MissingCheckpoint.into());
    };
    for (line, _) in &latest {
        problems.push(Problem::Malformed {
            line: *line,
            reason: "more than one latest checkpoint".into(),
        });
    }
    if latest_line != line_no {
        problems.push(Problem::Malformed {
            line: latest_line,
            reason: "the latest checkpoint is not the last line".into(),
        });
    }
    let cp = decode_checkpoint(&latest_b64)?.verify_with_certificate(cert)?;
    let n = cp.tree_size;

    let mut report = ExportReport {
        checkpoint: cp.clone(),
        entries_verified: 0,
        checkpoints_verified: 0,
        consistent_checkpoints: Vec::new(),
        from_ms: header.from_ms,
        to_ms: header.to_ms,
        first: 0,
        end: 0,
        problems: Vec::new(),
    };

    // Earlier checkpoints: consistency does not depend on the header.
    for (line, signed, proof) in earlier {
        let old = match signed.and_then(|s| s.verify_with_certificate(cert)) {
            Ok(old) => old,
            Err(e) => {
                problems.push(Problem::BadCheckpoint {
                    line,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        if verify_consistency(old.tree_size, n, &old.root, &cp.root, &proof).is_ok() {
            report.checkpoints_verified += 1;
            report.consistent_checkpoints.push(old);
        } else {
            problems.push(Problem::Inconsistent {
                line,
                old_size: old.tree_size,
            });
        }
    }

    // The header is not signed: check it against the checkpoint.
    let mut header_problem = |reason: String| problems.push(Problem::HeaderMismatch { reason });
    if header.party != cp.party.as_str() {
        header_problem(format!(
            "header names party {:?}, the checkpoint {}",
            header.party, cp.party
        ));
    }
    if header.tree_size != n {
        header_problem(format!(
            "header tree_size {} differs from the checkpoint's {n}: no entry can be checked",
            header.tree_size
        ));
        report.problems = problems;
        return Ok(report);
    }
    let first = if header.from_ms.is_none() {
        if header.first != 0 {
            header_problem(format!(
                "from_ms is null (export from the start) but first is {}",
                header.first
            ));
        }
        0
    } else {
        header.first.min(n)
    };
    let end = if header.to_ms.is_none() {
        if header.end != n {
            header_problem(format!(
                "to_ms is null (export to the end) but end is {}, tree_size {n}",
                header.end
            ));
        }
        n
    } else {
        header.end.clamp(first, n)
    };
    if header.first > header.end || header.end > n {
        header_problem(format!(
            "range [{}, {}) is not within [0, {n})",
            header.first, header.end
        ));
    }
    if let (Some(from), Some(to)) = (header.from_ms, header.to_ms)
        && from > to
    {
        header_problem(format!("from_ms {from} is after to_ms {to}"));
    }
    report.first = first;
    report.end = end;

    // Boundary witnesses.
    let authentic = |l: &Leaf| l.root == Some(cp.root);
    check_witness(
        &mut problems,
        "before",
        &befores,
        header
            .from_ms
            .filter(|_| first > 0)
            .map(|from| (first - 1, from)),
        |l, from| l.time_ms < from,
        &authentic,
    );
    check_witness(
        &mut problems,
        "after",
        &afters,
        header.to_ms.filter(|_| end < n).map(|to| (end, to)),
        |l, to| l.time_ms >= to,
        &authentic,
    );

    // Entries.
    let in_range = |seq: u64| seq >= first && seq < end;
    let mut accepted: Vec<&Leaf> = Vec::new();
    let mut authentic_seqs: HashSet<u64> = HashSet::new();
    for l in entries.iter().filter(|l| authentic(l) && in_range(l.seq)) {
        if authentic_seqs.insert(l.seq) {
            accepted.push(l);
        }
    }
    let accepted_lines: HashSet<u64> = accepted.iter().map(|l| l.line).collect();
    let mut covered: Vec<u64> = authentic_seqs.iter().copied().collect();
    let mut line_problems: BTreeMap<u64, Problem> = BTreeMap::new();
    let mut modified_seqs: HashSet<u64> = HashSet::new();
    for l in &entries {
        if accepted_lines.contains(&l.line) {
            continue;
        }
        let (line, seq) = (l.line, l.seq);
        let p = if authentic(l) || !in_range(seq) || authentic_seqs.contains(&seq) {
            Problem::Inserted { line, seq }
        } else if modified_seqs.insert(seq) {
            covered.push(seq);
            Problem::Modified { line, seq }
        } else {
            Problem::Inserted { line, seq }
        };
        line_problems.insert(line, p);
    }
    for (l, after_seq) in out_of_order(&accepted) {
        line_problems.insert(
            l.line,
            Problem::Reordered {
                line: l.line,
                seq: l.seq,
                after_seq,
            },
        );
    }
    let mut unreadable_accepted = 0u64;
    for (line, seq, reason) in unreadable {
        if accepted_lines.contains(&line) {
            unreadable_accepted += 1;
            line_problems
                .entry(line)
                .or_insert(Problem::Unreadable { line, seq, reason });
        }
    }
    problems.extend(line_problems.into_values());
    problems.extend(missing(&mut covered, first, end));
    report.entries_verified = accepted.len() as u64 - unreadable_accepted;

    problems.sort_by_key(|p| match p {
        Problem::HeaderMismatch { .. } => (0, 0),
        Problem::Malformed { line, .. }
        | Problem::Modified { line, .. }
        | Problem::Inserted { line, .. }
        | Problem::Reordered { line, .. }
        | Problem::BadCheckpoint { line, .. }
        | Problem::Inconsistent { line, .. }
        | Problem::Unreadable { line, .. }
        | Problem::BadWitness {
            line: Some(line), ..
        } => (1, *line),
        _ => (2, 0),
    });
    report.problems = problems;
    Ok(report)
}

/// Checks the witness lines of one kind: `need` is `(seq, bound)` when a
/// witness is required.
fn check_witness(
    problems: &mut Vec<Problem>,
    kind: &str,
    lines: &[Leaf],
    need: Option<(u64, u64)>,
    dated_ok: impl Fn(&Leaf, u64) -> bool,
    authentic: &impl Fn(&Leaf) -> bool,
) {
    let Some((seq, bound)) = need else {
        for l in lines {
            problems.push(Problem::BadWitness {
                line: Some(l.line),
                reason: format!("unexpected {kind} witness (the range needs none)"),
            });
        }
        return;
    };
    let Some((w, extra)) = lines.split_first() else {
        problems.push(Problem::BadWitness {
            line: None,
            reason: format!("missing {kind} witness (entry seq {seq}): completeness is unproven"),
        });
        return;
    };
    for l in extra {
        problems.push(Problem::BadWitness {
            line: Some(l.line),
            reason: format!("more than one {kind} witness"),
        });
    }
    let reason = if w.seq != seq {
        Some(format!("{kind} witness is seq {}, expected {seq}", w.seq))
    } else if !authentic(w) {
        Some(format!(
            "{kind} witness seq {seq}: inclusion proof does not verify"
        ))
    } else if !dated_ok(w, bound) {
        Some(format!(
            "{kind} witness seq {seq} is dated {} ms, inside the exported time range",
            w.time_ms
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        problems.push(Problem::BadWitness {
            line: Some(w.line),
            reason,
        });
    }
}

/// The accepted lines not on a longest strictly increasing run of seqs (in
/// file order), each with the seq of the accepted line just before it. Of
/// equally long runs, the one keeping earlier lines wins, so of two swapped
/// lines the second is reported (it follows a larger seq).
fn out_of_order<'a>(accepted: &[&'a Leaf]) -> Vec<(&'a Leaf, Option<u64>)> {
    // Patience sorting over the lines from last to first, looking for a
    // strictly decreasing run of seqs: tails[k] = index of the largest last
    // seq of a run of length k + 1.
    let len = accepted.len();
    let mut tails: Vec<usize> = Vec::new();
    let mut prev: Vec<Option<usize>> = vec![None; len];
    for i in (0..len).rev() {
        let seq = accepted[i].seq;
        let k = tails.partition_point(|&t| accepted[t].seq > seq);
        prev[i] = k.checked_sub(1).map(|j| tails[j]);
        if k == tails.len() {
            tails.push(i);
        } else {
            tails[k] = i;
        }
    }
    let mut on_run = vec![false; len];
    let mut cur = tails.last().copied();
    while let Some(i) = cur {
        on_run[i] = true;
        cur = prev[i];
    }
    accepted
        .iter()
        .enumerate()
        .filter(|(i, _)| !on_run[*i])
        .map(|(i, l)| {
            let before = i.checked_sub(1).and_then(|j| accepted.get(j));
            (*l, before.map(|b| b.seq))
        })
        .collect()
}

/// Deleted seqs (single or ranges) and the truncated tail of `[first, end)`
/// not in `covered`.
fn missing(covered: &mut Vec<u64>, first: u64, end: u64) -> Vec<Problem> {
    covered.sort_unstable();
    covered.dedup();
    let mut out = Vec::new();
    let mut next = first;
    for &s in covered.iter() {
        if s > next {
            out.push(if s - next == 1 {
                Problem::Deleted { seq: next }
            } else {
                Problem::DeletedRange {
                    first: next,
                    last: s - 1,
                }
            });
        }
        next = s + 1;
    }
    if next < end {
        out.push(Problem::Truncated {
            expected_end: end,
            last_seq: covered.last().copied(),
        });
    }
    out
}
