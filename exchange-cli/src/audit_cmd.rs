//! Accountability commands that read a facility's data directory offline
//! (beside a running daemon): the disclosure report of provisions about one
//! patient, and the export and verification of the audit log.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::ValueEnum;
use exchange_core::envelope::SubjectId;
use exchange_core::receipt::SignedReceipt;
use exchange_daemon::accountability;
use exchange_daemon::store::{ProvisionDirection, ProvisionRecord, StoreLocation};

use crate::envelope_cmd::DEFAULT_SUBJECT_SYSTEM;
use crate::error::{CliError, Result};
use crate::files::{self, fmt_time};

/// Output format of the disclosure report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReportFormat {
    /// For people: one block per record.
    Text,
    /// One JSON document (receipts in base64 of the .exrcpt file form).
    Json,
    /// One row per record (RFC 4180).
    Csv,
}

/// `SYSTEM|VALUE`, or `VALUE` in the default system (as `exchange send --subject`).
pub(crate) fn parse_subject(s: &str) -> Result<SubjectId> {
    let (system, value) = match s.split_once('|') {
        Some((system, value)) => (system, value),
        None => (DEFAULT_SUBJECT_SYSTEM, s),
    };
    if value.is_empty() || system.is_empty() {
        return Err(CliError::Usage(format!(
            "invalid subject {s:?}: expected [SYSTEM|]VALUE"
        )));
    }
    Ok(SubjectId {
        system: system.to_owned(),
        value: value.to_owned(),
    })
}

fn daemon_err(what: &StoreLocation) -> impl FnOnce(exchange_daemon::Error) -> CliError {
    let what = what.to_string();
    move |source| CliError::Daemon { what, source }
}

/// `exchange provisions`: the disclosure report for one patient (the
/// pseudonym key from `data`, the records from `store`).
pub(crate) fn provisions(
    data: &Path,
    store: &StoreLocation,
    subject: &str,
    format: ReportFormat,
    receipts_dir: Option<&Path>,
) -> Result<()> {
    let id = parse_subject(subject)?;
    let records = accountability::provision_report(data, store, &id).map_err(daemon_err(store))?;
    let mut files_written = Vec::new();
    if let Some(dir) = receipts_dir {
        files::create_dir(dir)?;
        for r in &records {
            let path = receipt_path(dir, r);
            let signed = SignedReceipt::from_bytes(&r.receipt).map_err(CliError::about(
                format!("receipt of message {}", r.message_id),
            ))?;
            files::write_new(&path, &signed.to_file(), false)?;
            files_written.push(path);
        }
    }
    let out = match format {
        ReportFormat::Text => text_report(store, &id, &records, &files_written),
        ReportFormat::Json => json_report(&id, &records)?,
        ReportFormat::Csv => csv_report(&records)?,
    };
    print!("{out}");
    Ok(())
}

fn receipt_path(dir: &Path, r: &ProvisionRecord) -> PathBuf {
    dir.join(format!(
        "{}-{}-{}.exrcpt",
        r.message_id,
        r.direction.as_str(),
        hex::encode(&exchange_core::suite::sha256(r.recipient.as_str().as_bytes())[..4])
    ))
}

fn time_of(ms: u64) -> String {
    fmt_time(exchange_daemon::from_unix_ms(ms))
}

fn receipt_file_b64(r: &ProvisionRecord) -> Result<String> {
    let signed = SignedReceipt::from_bytes(&r.receipt).map_err(CliError::about(format!(
        "receipt of message {}",
        r.message_id
    )))?;
    Ok(B64.encode(signed.to_file()))
}

fn text_report(
    store: &StoreLocation,
    id: &SubjectId,
    records: &[ProvisionRecord],
    receipt_files: &[PathBuf],
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Disclosure report (第三者提供記録 / 確認記録) for patient {} ({})",
        id.value, id.system
    );
    let _ = writeln!(t, "store: {store}");
    let _ = writeln!(t, "records: {}", records.len());
    for (i, r) in records.iter().enumerate() {
        let _ = writeln!(t);
        match r.direction {
            ProvisionDirection::Provided => {
                let _ = writeln!(
                    t,
                    "{}. PROVIDED to {} ({}) at {}",
                    i + 1,
                    r.counterparty_name,
                    r.counterparty,
                    time_of(r.time_ms)
                );
            }
            ProvisionDirection::Received => {
                let _ = writeln!(
                    t,
                    "{}. RECEIVED from {} ({}) at {}",
                    i + 1,
                    r.counterparty_name,
                    r.counterparty,
                    time_of(r.time_ms)
                );
            }
        }
        let _ = writeln!(t, "   recipient      {} (role {})", r.recipient, r.role);
        let _ = writeln!(t, "   document type  {}", r.document_type);
        let _ = writeln!(t, "   title          {}", r.title);
        let _ = writeln!(t, "   purpose        {}", r.purpose);
        let _ = writeln!(t, "   content type   {}", r.content_type);
        let _ = writeln!(t, "   message id     {}", r.message_id);
        match receipt_files.get(i) {
            Some(f) => {
                let _ = writeln!(
                    t,
                    "   evidence       {} (exchange receipt verify --trust CA.pem {})",
                    f.display(),
                    f.display()
                );
            }
            None => {
                let _ = writeln!(
                    t,
                    "   evidence       signed receipt, {} bytes (--receipts DIR writes it)",
                    r.receipt.len()
                );
            }
        }
    }
    t
}

fn json_report(id: &SubjectId, records: &[ProvisionRecord]) -> Result<String> {
    let items = records
        .iter()
        .map(|r| {
            Ok(serde_json::json!({
                "direction": r.direction.as_str(),
                "time": time_of(r.time_ms),
                "time_ms": r.time_ms,
                "counterparty": r.counterparty.as_str(),
                "counterparty_name": r.counterparty_name,
                "recipient": r.recipient.as_str(),
                "role": r.role,
                "document_type": r.document_type,
                "title": r.title,
                "purpose": r.purpose,
                "content_type": r.content_type,
                "message_id": r.message_id.to_string(),
                "receipt": receipt_file_b64(r)?,
            }))
        })
        .collect::<Result<Vec<_>>>()?;
    let doc = serde_json::json!({
        "subject": { "system": id.system, "value": id.value },
        "records": items,
    });
    let mut s = serde_json::to_string_pretty(&doc)
        .map_err(|e| CliError::Usage(format!("cannot encode the report: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// RFC 4180: quoted when needed, quotes doubled.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_report(records: &[ProvisionRecord]) -> Result<String> {
    let mut t = String::from(
        "direction,time,counterparty,counterparty_name,recipient,role,document_type,title,purpose,content_type,message_id,receipt\r\n",
    );
    for r in records {
        let fields = [
            r.direction.as_str().to_owned(),
            time_of(r.time_ms),
            r.counterparty.to_string(),
            r.counterparty_name.clone(),
            r.recipient.to_string(),
            r.role.clone(),
            r.document_type.clone(),
            r.title.clone(),
            r.purpose.clone(),
            r.content_type.clone(),
            r.message_id.to_string(),
            receipt_file_b64(r)?,
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        t.push_str(&row.join(","));
        t.push_str("\r\n");
    }
    Ok(t)
}

/// `exchange audit export`: the audit log (or a time range of it) with
/// inclusion proofs and the latest signed checkpoint, to `out` or stdout.
pub(crate) fn export(
    store: &StoreLocation,
    from: Option<&str>,
    to: Option<&str>,
    witnesses: &[PathBuf],
    out: Option<&Path>,
) -> Result<()> {
    let witnessed = witnesses
        .iter()
        .map(|w| latest_checkpoint_of(w))
        .collect::<Result<Vec<_>>>()?;
    let export_err = |e: exchange_daemon::Error| match e {
        exchange_daemon::Error::Core(exchange_core::Error::Audit(
            exchange_core::AuditError::ConsistencyProof,
        )) if !witnesses.is_empty() => CliError::Usage(format!(
            "{store}: the audit log does not extend a witnessed checkpoint: it was rewritten after that checkpoint was exported"
        )),
        e => CliError::Daemon {
            what: store.to_string(),
            source: e,
        },
    };
    let ms = |t: Option<&str>| -> Result<Option<u64>> {
        t.map(|s| files::parse_time(s).map(exchange_daemon::unix_ms))
            .transpose()
    };
    let (from_ms, to_ms) = (ms(from)?, ms(to)?);
    let summary = match out {
        Some(path) => {
            if path.exists() {
                return Err(CliError::Exists(path.to_path_buf()));
            }
            let tmp = files::temp_for(path)?;
            let summary = accountability::export_audit(
                store,
                from_ms,
                to_ms,
                &witnessed,
                std::io::BufWriter::new(tmp.as_file()),
            )
            .map_err(export_err)?;
            tmp.as_file().sync_all().map_err(|source| CliError::Write {
                path: path.to_path_buf(),
                source,
            })?;
            files::publish(tmp, path)?;
            summary
        }
        None => {
            let stdout = std::io::stdout();
            let out = crate::out::PipeAware(stdout.lock());
            accountability::export_audit(store, from_ms, to_ms, &witnessed, out)
                .map_err(export_err)?
        }
    };
    let cp = &summary.checkpoint;
    eprintln!(
        "exported entries {}..{} of {}'s audit log ({} entries under the checkpoint signed at {}; {} earlier checkpoint(s) with consistency proofs)",
        summary.first,
        summary.end,
        cp.party,
        cp.tree_size,
        time_of(cp.time_ms),
        summary.earlier_checkpoints
    );
    if summary.not_yet_checkpointed > 0 {
        eprintln!(
            "note: {} newer entries are not exported yet: the daemon's next checkpoint (within {} s) will cover them",
            summary.not_yet_checkpointed,
            accountability::CHECKPOINT_INTERVAL.as_secs()
        );
    }
    if let Some(path) = out {
        eprintln!("written to {}", path.display());
    }
    Ok(())
}

/// The latest signed checkpoint of an export file (its last `latest` line).
fn latest_checkpoint_of(file: &Path) -> Result<exchange_core::audit::SignedCheckpoint> {
    let text = String::from_utf8(files::read(file)?).map_err(|_| {
        CliError::Usage(format!(
            "{}: not an audit export (not UTF-8)",
            file.display()
        ))
    })?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"type\":\"latest\""))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: not an audit export (no latest checkpoint line)",
                file.display()
            ))
        })?;
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| CliError::Usage(format!("{}: latest checkpoint line: {e}", file.display())))?;
    let bytes = v["checkpoint"]
        .as_str()
        .and_then(|b| B64.decode(b).ok())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: latest checkpoint line: no base64 checkpoint",
                file.display()
            ))
        })?;
    exchange_core::audit::SignedCheckpoint::from_bytes(&bytes)
        .map_err(CliError::about(file.display().to_string()))
}

/// `exchange audit verify`: checks an export offline against the log
/// owner's identity certificate and reports every problem found; with
/// witnesses (earlier exports kept elsewhere), also that the log only grew
/// since each of their checkpoints.
pub(crate) fn verify(cert: &Path, file: &Path, witnesses: &[PathBuf]) -> Result<()> {
    let cert = exchange_core::identity::Certificate::from_pem(&files::read(cert)?)
        .map_err(CliError::about(cert.display().to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| CliError::Usage(format!("{}: no certificate", cert.display())))?;
    let reader = std::io::BufReader::new(files::open(file)?);
    let report = exchange_core::audit::verify_export(reader, &cert)
        .map_err(CliError::about(file.display().to_string()))?;
    let cp = &report.checkpoint;
    println!(
        "checkpoint: {} entries, root {}, signed by {} at {} (signature verified with {})",
        cp.tree_size,
        hex::encode(cp.root),
        cp.party,
        time_of(cp.time_ms),
        cert.common_name().unwrap_or("the given certificate")
    );
    let range = match (report.from_ms, report.to_ms) {
        (None, None) => "the whole log".to_owned(),
        (f, t) => format!(
            "{} to {}",
            f.map_or_else(|| "the start".to_owned(), time_of),
            t.map_or_else(|| "the end".to_owned(), time_of)
        ),
    };
    println!(
        "range: {range}, entries {}..{}; {} entries proven included; {} earlier checkpoint(s) consistent",
        report.first, report.end, report.entries_verified, report.checkpoints_verified
    );
    let mut problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    for w in witnesses {
        let witnessed = latest_checkpoint_of(w)?
            .verify_with_certificate(&cert)
            .map_err(CliError::about(w.display().to_string()))?;
        let same = |c: &exchange_core::audit::Checkpoint| {
            c.tree_size == witnessed.tree_size && c.root == witnessed.root
        };
        if same(&report.checkpoint) || report.consistent_checkpoints.iter().any(same) {
            println!(
                "witness {}: its checkpoint ({} entries, signed at {}) is consistent with this export: the log only grew since",
                w.display(),
                witnessed.tree_size,
                time_of(witnessed.time_ms)
            );
        } else {
            problems.push(format!(
                "witness {}: its checkpoint ({} entries, signed at {}) is not proven consistent with this export: the log was rewritten since, or the export was made without --witness {}",
                w.display(),
                witnessed.tree_size,
                time_of(witnessed.time_ms),
                w.display()
            ));
        }
    }
    if problems.is_empty() {
        println!("OK: complete and unaltered");
        return Ok(());
    }
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    Err(CliError::Tampered {
        file: file.to_path_buf(),
        problems: problems.len(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn subjects_parse_like_send() {
        let s = parse_subject("urn:oid:1.2|12345").unwrap();
        assert_eq!(
            (s.system.as_str(), s.value.as_str()),
            ("urn:oid:1.2", "12345")
        );
        let s = parse_subject("12345").unwrap();
        assert_eq!(s.system, DEFAULT_SUBJECT_SYSTEM);
        assert!(parse_subject("sys|").is_err());
        assert!(parse_subject("").is_err());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
