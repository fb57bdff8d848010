//! `exchange seal`, `open`, `inspect` and `receipt verify`: offline envelopes.

use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use exchange_core::envelope::{
    EnvelopeHead, InnerMetadata, SealerBuilder, SubjectId, VerifiedHead,
};
use exchange_core::identity::Certificate;
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt, VerifiedReceipt};
use exchange_core::route::{Hop, HopRole, Provision};
use serde_json::json;

use crate::error::{CliError, Result};
use crate::files::{self, bytes, fmt_time};

const IO_BUF: usize = 256 * 1024;
/// Default subject-identifier system when `--subject-system` is not given.
pub(crate) const DEFAULT_SUBJECT_SYSTEM: &str = "urn:exchange:patient-id";

/// What to seal (the `seal` command's arguments).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SealArgs {
    /// Sender credentials directory (identity.pem, identity.key.pem).
    #[arg(long)]
    pub(crate) from: PathBuf,
    /// A recipient's encryption certificate (repeatable).
    #[arg(long = "to", required = true)]
    pub(crate) to: Vec<PathBuf>,
    /// The recipients' role: third-party (第三者提供) or entrusted (委託).
    #[arg(long, default_value = "third-party")]
    pub(crate) recipient_role: HopRole,
    /// CA certificate (trust anchor).
    #[arg(long)]
    pub(crate) trust: PathBuf,
    /// CRL to check the sender and recipient certificates against.
    #[arg(long)]
    pub(crate) crl: Option<PathBuf>,
    /// Payload content type, e.g. application/fhir+json.
    #[arg(long)]
    pub(crate) content_type: String,
    /// Patient / subject identifier (repeatable; encrypted).
    #[arg(long = "subject")]
    pub(crate) subjects: Vec<String>,
    /// System that issued the subject identifiers.
    #[arg(long, default_value = DEFAULT_SUBJECT_SYSTEM)]
    pub(crate) subject_system: String,
    /// Document title (encrypted).
    #[arg(long, default_value = "")]
    pub(crate) title: String,
    /// Document type (encrypted).
    #[arg(long, default_value = "")]
    pub(crate) document_type: String,
    /// Purpose or legal basis (public header).
    #[arg(long, default_value = "")]
    pub(crate) purpose: String,
    /// A relay, ROLE:URI, e.g. entrusted:urn:jp:agent:1 (repeatable, in travel order).
    #[arg(long)]
    pub(crate) route: Vec<String>,
    /// How long the envelope may be delivered: 30m, 12h, 7d.
    #[arg(long, default_value = "7d", value_parser = files::parse_duration)]
    pub(crate) expires_in: Duration,
    /// Plaintext input.
    #[arg(long = "in")]
    pub(crate) input: PathBuf,
    /// Envelope output (.exenv).
    #[arg(long = "out")]
    pub(crate) output: PathBuf,
}

/// Parses `entrusted:URI` / `third-party:URI`.
pub(crate) fn parse_hop(s: &str) -> Result<Hop> {
    let (role, party) = s.split_once(':').ok_or_else(|| {
        CliError::Usage(format!(
            "--route {s:?}: expected ROLE:URI, e.g. entrusted:urn:jp:agent:1"
        ))
    })?;
    Ok(Hop {
        role: role.parse()?,
        party: party.parse()?,
    })
}

/// `seal`: encrypts and signs `input` into the file form at `output`.
pub(crate) fn seal(a: &SealArgs, now: SystemTime) -> Result<VerifiedHead> {
    let identity = files::identity(&a.from)?;
    let trust = files::trust(&a.trust, a.crl.as_deref())?;
    // Our own certificate first: a revoked or expired sender writes nothing.
    trust
        .verify_identity(identity.chain(), now)
        .map_err(CliError::about(format!(
            "sender identity in {}",
            a.from.display()
        )))?;
    let file_name = a
        .input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut builder = SealerBuilder::new(&identity, a.content_type.clone())
        .purpose(a.purpose.clone())
        .lifetime(a.expires_in)
        .metadata(InnerMetadata {
            subject_ids: a
                .subjects
                .iter()
                .map(|v| SubjectId {
                    system: a.subject_system.clone(),
                    value: v.clone(),
                })
                .collect(),
            title: a.title.clone(),
            document_type: a.document_type.clone(),
            file_name,
        });
    for hop in &a.route {
        builder = builder.relay(parse_hop(hop)?);
    }
    if a.to.is_empty() {
        return Err(CliError::Usage(
            "at least one --to recipient encryption certificate is required".into(),
        ));
    }
    for path in &a.to {
        let about = format!("recipient {}", path.display());
        // The leaf, then the intermediates that issued it: its chain.
        let chain =
            Certificate::from_pem(&files::read(path)?).map_err(CliError::about(about.clone()))?;
        let key = trust
            .verify_encryption_chain(&chain, now)
            .map_err(CliError::about(about))?;
        builder = builder.recipient(key, a.recipient_role);
    }
    let sealer = builder.start(now, &mut files::rng())?;

    let input = files::open(&a.input)?;
    let len = input.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = files::progress(len, "sealing");
    // Ciphertext first (the head names its digest), then head + ciphertext into the output.
    let mut ct =
        tempfile::tempfile_in(files::dir_of(&a.output)).map_err(|source| CliError::Write {
            path: a.output.clone(),
            source,
        })?;
    let write_err = |source| CliError::Write {
        path: a.output.clone(),
        source,
    };
    let head = {
        let mut w = BufWriter::with_capacity(IO_BUF, &mut ct);
        let head = sealer
            .seal_stream(&mut BufReader::with_capacity(IO_BUF, input), &mut w, |n| {
                if let Some(b) = &bar {
                    b.set_position(n);
                }
            })
            .map_err(CliError::about(format!(
                "sealing {} into {}",
                a.input.display(),
                a.output.display()
            )))?;
        w.flush().map_err(write_err)?;
        head
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Self-check before anything is published.
    let verified = head
        .verify(&trust, now)
        .map_err(CliError::about("the envelope just sealed"))?;
    let mut out = files::temp_for(&a.output)?;
    out.write_all(&head.file_prefix()).map_err(write_err)?;
    ct.seek(SeekFrom::Start(0)).map_err(write_err)?;
    std::io::copy(&mut ct, &mut out).map_err(write_err)?;
    files::publish(out, &a.output)?;

    let h = verified.header();
    println!("sealed {} -> {}", a.input.display(), a.output.display());
    println!("  message id   {}", h.message_id);
    println!("  from         {}", h.sender);
    for r in &h.recipients {
        println!("  to           {} ({})", r.party, r.role);
    }
    for hop in &h.relays {
        println!("  via          {} ({})", hop.party, hop.role);
    }
    println!(
        "  payload      {}, expires {}",
        bytes(h.payload_length),
        fmt_time(h.expires)
    );
    Ok(verified)
}

/// `open`: verifies, decrypts to `output` and optionally signs a DELIVERED receipt
/// (returned). Writes nothing unless everything succeeded.
#[allow(clippy::too_many_arguments)]
pub(crate) fn open(
    as_dir: &Path,
    trust_path: &Path,
    crl: Option<&Path>,
    input: &Path,
    output: &Path,
    receipt: Option<&Path>,
    show_subjects: bool,
    now: SystemTime,
) -> Result<Option<VerifiedReceipt>> {
    let trust = files::trust(trust_path, crl)?;
    let keys = files::decryption_keys(as_dir)?;
    let identity = receipt.map(|_| files::identity(as_dir)).transpose()?;
    let file = files::open(input)?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = BufReader::with_capacity(IO_BUF, file);
    let head = EnvelopeHead::read_from(&mut r)?.verify(&trust, now)?;
    let opener = head.open(&keys)?;
    let role = opener.role();
    let recipient = opener.recipient().clone();

    let mut tmp = files::temp_for(output)?;
    let bar = files::progress(len, "opening");
    let metadata = {
        let mut w = BufWriter::with_capacity(IO_BUF, tmp.as_file_mut());
        let m = opener.decrypt_stream(&mut r, &mut w, |n| {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        })?;
        w.flush().map_err(|source| CliError::Write {
            path: output.to_owned(),
            source,
        })?;
        m
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Everything verified: sign the receipt, then publish both.
    let receipt_out = match (receipt, identity) {
        (Some(path), Some(identity)) => {
            if identity.party() != &recipient {
                return Err(CliError::Usage(format!(
                    "the identity in {} is {}, but the envelope was opened as {recipient}",
                    as_dir.display(),
                    identity.party()
                )));
            }
            let signed = SignedReceipt::issue(
                &identity,
                &ReceiptContent::for_head(&head, role, Disposition::Delivered, now),
            );
            Some((path, signed.to_file(), signed.verify(&trust)?))
        }
        _ => None,
    };
    files::publish(tmp, output)?;
    let written = match receipt_out {
        Some((path, file, verified)) => {
            files::write_atomic(path, &file)?;
            Some((path, verified))
        }
        None => None,
    };

    let h = head.header();
    let sender_cert = head.sender().certificate();
    println!(
        "opened {} -> {} ({})",
        input.display(),
        output.display(),
        bytes(h.payload_length)
    );
    println!(
        "  from         {} ({}), signature and certificate chain verified",
        h.sender,
        sender_cert.common_name().unwrap_or("?")
    );
    println!("  message id   {}", h.message_id);
    println!(
        "  content      {}{}",
        h.content_type,
        if h.purpose.is_empty() {
            String::new()
        } else {
            format!(", purpose: {}", h.purpose)
        }
    );
    println!(
        "  document     {} / {}",
        or_dash(&metadata.title),
        or_dash(&metadata.document_type)
    );
    if show_subjects {
        for s in &metadata.subject_ids {
            println!("  subject      {} ({})", s.value, s.system);
        }
    } else {
        println!(
            "  subjects     {} identifier(s) (--show-subjects to print them)",
            metadata.subject_ids.len()
        );
    }
    if let Some((path, _)) = &written {
        println!(
            "  receipt      DELIVERED by {recipient} ({role}) -> {}",
            path.display()
        );
    }
    Ok(written.map(|(_, v)| v))
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// `inspect`: the head in human-readable form or JSON, verified when `trust` is given.
/// Returns whether verification passed (`None`: not attempted).
pub(crate) fn inspect(
    file: &Path,
    trust: Option<(&Path, Option<&Path>)>,
    as_json: bool,
    now: SystemTime,
) -> Result<Option<bool>> {
    let f = files::open(file)?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = BufReader::new(f);
    let head =
        EnvelopeHead::read_from(&mut r).map_err(CliError::about(file.display().to_string()))?;
    let h = head
        .header_unverified()
        .map_err(CliError::about(file.display().to_string()))?;
    let chain = head.sender_chain_unverified().unwrap_or_default();
    let ct_actual = file_len.saturating_sub(12 + head.as_bytes().len() as u64);
    let verification = match trust {
        None => None,
        Some((ca, crl)) => {
            let trust = files::trust(ca, crl)?;
            // Signature, chain, expiry, then the stream's length and digest, as a relay checks it.
            Some(
                head.verify(&trust, now)
                    .and_then(|vh| vh.ciphertext_verifier().verify_stream(&mut r)),
            )
        }
    };
    let sender_name = chain.first().and_then(|c| c.common_name()).unwrap_or("?");
    if as_json {
        let v = json!({
            "file": file.display().to_string(),
            "message_id": h.message_id.to_string(),
            "sender": h.sender.to_string(),
            "sender_name": sender_name,
            "sender_fingerprint": h.sender_fingerprint.to_string(),
            "recipients": h.recipients.iter().map(|r| json!({
                "party": r.party.to_string(), "role": r.role.as_str(), "key_fingerprint": r.key_fingerprint.to_string(),
            })).collect::<Vec<_>>(),
            "route": h.relays.iter().map(|x| json!({"party": x.party.to_string(), "role": x.role.as_str()})).collect::<Vec<_>>(),
            "created": fmt_time(h.created),
            "expires": fmt_time(h.expires),
            "content_type": h.content_type,
            "purpose": h.purpose,
            "payload_length": h.payload_length,
            "chunk_size": h.chunk_size,
            "ciphertext_length": h.ciphertext_length(),
            "ciphertext_length_in_file": ct_actual,
            "ciphertext_sha256": hex::encode(h.ciphertext_sha256),
            "header_sha256": hex::encode(head.header_sha256()),
            "verified": verification.as_ref().map(Result::is_ok),
            "error": verification.as_ref().and_then(|v| v.as_ref().err()).map(ToString::to_string),
            "reason": verification.as_ref().and_then(|v| v.as_ref().err()).map(exchange_core::Error::reason_code),
        });
        println!("{v:#}");
    } else {
        println!("envelope {}", file.display());
        println!("  message id    {}", h.message_id);
        println!("  sender        {} ({sender_name})", h.sender);
        for r in &h.recipients {
            println!(
                "  recipient     {} ({}), key {}",
                r.party,
                r.role,
                &r.key_fingerprint.to_string()[..16]
            );
        }
        for x in &h.relays {
            println!("  relay         {} ({})", x.party, x.role);
        }
        println!("  created       {}", fmt_time(h.created));
        println!("  expires       {}", fmt_time(h.expires));
        println!("  content type  {}", h.content_type);
        println!("  purpose       {}", or_dash(&h.purpose));
        println!(
            "  payload       {} in {} KiB chunks",
            bytes(h.payload_length),
            h.chunk_size / 1024
        );
        println!(
            "  ciphertext    {} declared, {} in file, sha256 {}",
            h.ciphertext_length(),
            ct_actual,
            hex::encode(h.ciphertext_sha256)
        );
        match &verification {
            None => println!(
                "  UNVERIFIED: give --trust CA.pem to check the signature, sender chain and ciphertext digest"
            ),
            Some(Ok(())) => {
                println!("  verified: signature, sender chain and ciphertext digest OK")
            }
            Some(Err(e)) => println!("  NOT VERIFIED: {e}"),
        }
    }
    match verification {
        Some(Err(e)) => Err(CliError::About {
            what: format!("{} does not verify", file.display()),
            source: e,
        }),
        other => Ok(other.map(|r| r.is_ok())),
    }
}

/// `receipt verify`: verifies a receipt offline, and against its envelope when given.
pub(crate) fn verify_receipt(
    trust_path: &Path,
    crl: Option<&Path>,
    envelope: Option<&Path>,
    file: &Path,
    now: SystemTime,
) -> Result<VerifiedReceipt> {
    let trust = files::trust(trust_path, crl)?;
    let about = CliError::about(file.display().to_string());
    // The file form (.exrcpt) or the bare SignedReceipt message that the
    // daemon's Status and Ack answers carry.
    let r = SignedReceipt::from_file_or_bytes(&files::read(file)?)
        .and_then(|r| r.verify(&trust))
        .map_err(about)?;
    let cert = r.issuer_certificate();
    println!(
        "receipt {}: signature and issuer certificate verified",
        file.display()
    );
    println!(
        "  issuer        {} ({})",
        r.issuer(),
        cert.common_name().unwrap_or("?")
    );
    println!("  role          {}", r.role());
    println!("  disposition   {}", r.disposition());
    println!("  time          {}", fmt_time(r.issued()));
    println!("  message id    {}", r.message_id());
    match envelope {
        Some(env) => {
            let mut rd = BufReader::new(files::open(env)?);
            let head = EnvelopeHead::read_from(&mut rd)
                .and_then(|h| h.verify_ignoring_expiry(&trust, now))
                .map_err(CliError::about(env.display().to_string()))?;
            r.check_for(&head).map_err(CliError::about(format!(
                "{} against {}",
                file.display(),
                env.display()
            )))?;
            println!(
                "  envelope      {} (same message, same header, issuer on its route)",
                env.display()
            );
            for p in head.route().provision_boundaries(std::slice::from_ref(&r)) {
                let line = match &p.provision {
                    Provision::Passed { boundary, .. } if boundary.party == p.recipient => format!(
                        "MARKS THE PROVISION BOUNDARY (責任分界点): responsibility passed to {} when it took delivery at {}",
                        p.recipient,
                        fmt_time(r.issued())
                    ),
                    Provision::Passed { boundary, .. } => format!(
                        "MARKS THE PROVISION BOUNDARY (責任分界点): responsibility for the copy to {} passed to {} at {}",
                        p.recipient,
                        boundary.party,
                        fmt_time(r.issued())
                    ),
                    Provision::NotAProvision => format!(
                        "no third-party provision for {} (entrusted hops only, 委託)",
                        p.recipient
                    ),
                    Provision::Pending { boundary } => format!(
                        "does not mark the provision boundary for {} (that is {}'s custody receipt)",
                        p.recipient, boundary.party
                    ),
                    Provision::Rejected { boundary, .. } => {
                        format!("{} refused the message for {}", boundary.party, p.recipient)
                    }
                };
                println!("  boundary      {line}");
            }
        }
        None if r.is_third_party_custody() => println!(
            "  boundary      third-party custody receipt: it marks the provision boundary if it is the first on its route (give --envelope to check)"
        ),
        None => println!(
            "  boundary      not a third-party custody receipt: it does not mark the provision boundary"
        ),
    }
    Ok(r)
}
