//! The audit log stays exportable and its signed history stays honest, on
//! real daemons (real TLS on loopback, real SQLite or PostgreSQL): entries about messages
//! naming thousands of patients, hostile free text from peers and local
//! clients, and a database rewritten behind the daemon's back.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use exchange_core::audit::{AuditEntry, ExportReport, MAX_ENTRY_LEN, verify_export};
use exchange_core::envelope::EnvelopeHead;
use exchange_core::identity::Certificate;
use exchange_daemon::accountability::export_audit;
use exchange_daemon::proto::SubjectIdentifier;

/// Exports the whole audit log of `party`'s store and verifies the export
/// with `party`'s identity certificate.
fn export_and_verify(party: &Party) -> ExportReport {
    let mut out = Vec::new();
    export_audit(&store_location(party), None, None, &[], &mut out)
        .unwrap_or_else(|e| panic!("{}: audit export failed: {e}", party.uri));
    let cert = Certificate::from_pem(&std::fs::read(party.file("identity.pem")).unwrap())
        .unwrap()
        .remove(0);
    verify_export(&out[..], &cert)
        .unwrap_or_else(|e| panic!("{}: verification failed: {e}", party.uri))
}

/// Every stored entry, each within the limits a verifier applies.
fn stored_entries(party: &Party) -> Vec<AuditEntry> {
    read_store(party)
        .audit_entries(None, None)
        .map(|row| {
            let b = row.unwrap().entry;
            assert!(b.len() <= MAX_ENTRY_LEN, "an entry of {} bytes", b.len());
            AuditEntry::from_json(&b).unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_naming_5000_patients_leaves_an_exportable_audit_log() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;

    let mut app = client_of(&net, &clinic, &emr);
    let mut start_msg = referral_start(&[&hospital], &[], "claims");
    start_msg.subject_ids = (0..5000)
        .map(|i| SubjectIdentifier {
            system: "urn:oid:1.2.392.100495.20.3.51.11310000013".into(),
            value: format!("P-{i:06}"),
        })
        .collect();
    let id = send(&mut app, start_msg, b"monthly claims batch")
        .await
        .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    c.shutdown().await;
    h.shutdown().await;

    for party in [&clinic, &hospital] {
        let report = export_and_verify(party);
        assert!(report.is_ok(), "{}: {:?}", party.uri, report.problems);
        let entries = stored_entries(party);
        let mid = exchange_core::MessageId::from_slice(&id)
            .unwrap()
            .to_string();
        let about: Vec<&AuditEntry> = entries
            .iter()
            .filter(|e| e.message_id.as_deref() == Some(mid.as_str()))
            .collect();
        assert!(
            !about.is_empty(),
            "{}: the message is in the log",
            party.uri
        );
        let scrub = exchange_daemon::admin::verify_store(
            &party.data_dir(),
            &store_location(party),
            &net_trust(&net),
        )
        .unwrap();
        assert!(scrub.is_ok(), "{}: {:?}", party.uri, scrub.failures);
        // The 5,000 pseudonyms are referred to, not copied into each entry.
        for e in &about {
            assert!(e.subjects.is_empty(), "{e:?}");
            assert_eq!(e.subject_set.as_ref().unwrap().count, 5000);
        }
        assert_eq!(report.entries_verified as usize, entries.len());
    }
}

/// A head whose signed header names a sender URI of about 1 MiB, signed
/// with a throwaway key that no trust anchor certifies.
fn hostile_head(net: &Net, clinic: &Party, hospital: &Party) -> EnvelopeHead {
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use p256::pkcs8::DecodePrivateKey;

    fn varint(mut v: usize, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
        out.push(tag);
        varint(bytes.len(), out);
        out.extend_from_slice(bytes);
    }

    let (genuine, _) = seal_now(net, clinic, hospital, b"x");
    // Protobuf keeps the last value of a repeated scalar field: the
    // appended `sender` (field 3) replaces the genuine one.
    let mut header = genuine.header_bytes().to_vec();
    let party = format!("urn:{}", "x".repeat(1_040_000));
    field(0x1a, party.as_bytes(), &mut header);

    let rogue_net = Net::new();
    let rogue = rogue_net.party("rogue", OTHER);
    let key = SigningKey::from_pkcs8_pem(
        &std::fs::read_to_string(rogue.file("identity.key.pem")).unwrap(),
    )
    .unwrap();
    let mut input = b"exchange/v1 header\0".to_vec();
    input.extend_from_slice(&header);
    let sig: Signature = key.sign(&input);
    let sig = sig.normalize_s();
    let cert = Certificate::from_pem(&std::fs::read(rogue.file("identity.pem")).unwrap())
        .unwrap()
        .remove(0);

    let mut head = Vec::new();
    field(0x0a, &header, &mut head);
    field(0x12, &sig.to_bytes(), &mut head);
    field(0x1a, cert.der().as_ref(), &mut head);
    EnvelopeHead::decode(&head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_head_with_a_1_mib_party_uri_leaves_an_exportable_audit_log() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(&hospital, &[&clinic], &[], "");
    let h = start(&hospital).await;
    let head = hostile_head(&net, &clinic, &hospital);
    assert!(head.as_bytes().len() > 1_000_000);
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let e = deliver(&mut peer, &head, b"ciphertext").await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    h.shutdown().await;

    let report = export_and_verify(&hospital);
    assert!(report.is_ok(), "{:?}", report.problems);
    let entries = stored_entries(&hospital);
    let refused: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.outcome == exchange_core::audit::AuditOutcome::Rejected)
        .collect();
    assert_eq!(refused.len(), 1, "{entries:?}");
    assert_eq!(refused[0].actor, format!("peer:{CLINIC}"));
    assert!(refused[0].detail.as_deref().unwrap().len() <= 4096);
    assert_eq!(report.entries_verified as usize, entries.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_purpose_from_a_local_client_leaves_an_exportable_audit_log() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    let c = start(&clinic).await;
    let mut app = client_of(&net, &clinic, &emr);
    let purpose = "p\n\u{1b}[31m".to_owned() + &"x".repeat(1024 * 1024);
    // Refused (the purpose is not one the client may send for), with a
    // status the client can read: its message is bounded and escaped.
    let e = send(&mut app, referral_start(&[&hospital], &[], &purpose), b"a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert_eq!(
        exchange_daemon::error::status_reason(&e),
        Some("policy-violation")
    );
    assert!(e.message().len() <= exchange_daemon::error::MAX_STATUS_MESSAGE);
    assert!(
        !e.message().chars().any(char::is_control),
        "{:?}",
        e.message()
    );
    c.shutdown().await;

    let report = export_and_verify(&clinic);
    assert!(report.is_ok(), "{:?}", report.problems);
    let entries = stored_entries(&clinic);
    let refused: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| e.outcome == exchange_core::audit::AuditOutcome::Rejected)
        .collect();
    assert_eq!(refused.len(), 1, "{entries:?}");
    let detail = refused[0].detail.as_deref().unwrap();
    assert!(
        !detail.chars().any(char::is_control),
        "control characters are escaped: {detail:?}"
    );
    assert!(detail.len() <= 4096);
    assert_eq!(report.entries_verified as usize, entries.len());
}

/// The tree sizes of the stored checkpoints, ascending.
fn checkpoint_sizes(party: &Party) -> Vec<i64> {
    read_store(party)
        .checkpoints()
        .unwrap()
        .iter()
        .map(|c| c.tree_size)
        .collect()
}

/// The statements that let an insider change or delete audit log rows
/// (the triggers that forbid it dropped or disabled), then `then`.
fn with_audit_log_writable(party: &Party, then: &str) {
    tamper(
        party,
        &format!("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; {then}"),
        &format!("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only; {then}"),
    );
}

/// Rewrites audit entry `seq`'s detail, with a consistent leaf hash, and
/// runs `then` after it.
fn rewrite_entry(party: &Party, seq: u64, detail: &str, then: &str) {
    let bytes = read_store(party).audit_entry(seq).unwrap();
    let mut e = AuditEntry::from_json(&bytes).unwrap();
    e.detail = Some(detail.into());
    with_audit_log_writable(
        party,
        &format!(
            "UPDATE audit_log SET entry = {}, leaf_hash = {} WHERE seq = {seq}; {then}",
            bytes_sql(party, &e.to_canonical_json()),
            bytes_sql(party, &e.leaf_hash()),
        ),
    );
}

/// An insider with write access to the database rewrites entry 1 with a
/// consistent leaf hash, rewrites the latest checkpoint row's (unsigned)
/// frontier to match, and deletes the older checkpoints.
fn rewrite_history(party: &Party) {
    use exchange_core::audit::Frontier;

    let store = read_store(party);
    let latest = *checkpoint_sizes(party).last().unwrap();
    let mut e = AuditEntry::from_json(&store.audit_entry(1).unwrap()).unwrap();
    e.detail = Some("nothing happened here".into());
    let mut frontier = Frontier::new();
    for (seq, h) in store
        .audit_leaf_hashes(u64::try_from(latest).unwrap())
        .enumerate()
    {
        frontier.push(if seq == 1 { e.leaf_hash() } else { h.unwrap() });
    }
    drop(store);
    rewrite_entry(
        party,
        1,
        "nothing happened here",
        &format!(
            "UPDATE audit_checkpoints SET frontier = {} WHERE tree_size = {latest}; \
             DELETE FROM audit_checkpoints WHERE tree_size < {latest};",
            bytes_sql(party, &frontier.to_bytes())
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_to_sign_over_a_rewritten_history_and_verify_store_reports_it() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    net.configure(&clinic, &[], &[], "");
    start(&clinic).await.shutdown().await;
    start(&clinic).await.shutdown().await;
    let dir = clinic.data_dir();
    let store = store_location(&clinic);
    assert!(checkpoint_sizes(&clinic).len() >= 2);
    let trust = net_trust(&net);
    let report = exchange_daemon::admin::verify_store(&dir, &store, &trust).unwrap();
    assert!(report.is_ok(), "{:?}", report.failures);

    rewrite_history(&clinic);
    let signed_before = checkpoint_sizes(&clinic);
    match exchange_daemon::Daemon::start(clinic.config()).await {
        Err(e) => assert!(e.to_string().contains("audit"), "{e}"),
        Ok(d) => {
            d.shutdown().await;
            // What the insider does next: remove the one row that still
            // disagrees with the rewritten log.
            let delete = format!(
                "DELETE FROM audit_checkpoints WHERE tree_size <= {}",
                signed_before.last().unwrap()
            );
            tamper(&clinic, &delete, &delete);
            let report = exchange_daemon::admin::verify_store(&dir, &store, &trust).unwrap();
            panic!(
                "the daemon started and signed over the rewritten log: checkpoints {:?} -> {:?}; verify-store failures after the cleanup: {:?}",
                signed_before,
                checkpoint_sizes(&clinic),
                report.failures
            );
        }
    }
    assert_eq!(
        checkpoint_sizes(&clinic),
        signed_before,
        "nothing was signed"
    );
    let report = exchange_daemon::admin::verify_store(&dir, &store, &trust).unwrap();
    assert!(!report.is_ok());
    assert!(
        report
            .failures
            .iter()
            .any(|f| f.what.contains("audit") && f.error.contains("root")),
        "{:?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_every_checkpoint_row_is_detected_at_start_and_by_verify_store() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    net.configure(&clinic, &[], &[], "");
    start(&clinic).await.shutdown().await;
    let dir = clinic.data_dir();
    let store = store_location(&clinic);
    rewrite_entry(
        &clinic,
        0,
        "started elsewhere",
        "DELETE FROM audit_checkpoints",
    );

    let trust = net_trust(&net);
    let report = exchange_daemon::admin::verify_store(&dir, &store, &trust).unwrap();
    assert!(
        report.failures.iter().any(|f| f.what.contains("audit")),
        "the deleted checkpoints go unnoticed: {:?}",
        report.failures
    );
    let Err(e) = exchange_daemon::Daemon::start(clinic.config()).await else {
        panic!("the daemon started over a log whose signed checkpoints were deleted");
    };
    assert!(e.to_string().contains("audit"), "{e}");
    assert!(checkpoint_sizes(&clinic).is_empty(), "nothing was signed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_checkpoint_behind_the_database_is_checked_against_the_entries() {
    // As after a stop between a checkpoint's commit and the file's update:
    // the file holds an older checkpoint of the same log.
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    net.configure(&clinic, &[], &[], "");
    start(&clinic).await.shutdown().await;
    let dir = clinic.data_dir();
    let store = store_location(&clinic);
    let kept = dir.join(exchange_daemon::accountability::CHECKPOINT_FILE);
    let older = std::fs::read(&kept).unwrap();
    start(&clinic).await.shutdown().await;
    assert_ne!(std::fs::read(&kept).unwrap(), older);
    std::fs::write(&kept, &older).unwrap();
    let trust = net_trust(&net);
    let report = exchange_daemon::admin::verify_store(&dir, &store, &trust).unwrap();
    assert!(report.is_ok(), "{:?}", report.failures);
    // The daemon starts, signs, and the file moves forward again.
    start(&clinic).await.shutdown().await;
    let latest = *checkpoint_sizes(&clinic).last().unwrap();
    let cp = exchange_core::audit::SignedCheckpoint::from_bytes(&std::fs::read(&kept).unwrap())
        .unwrap()
        .unverified()
        .unwrap();
    assert_eq!(cp.tree_size as i64, latest);

    // The same older file over an altered first entry is refused.
    rewrite_entry(&clinic, 0, "started elsewhere", "");
    std::fs::write(&kept, &older).unwrap();
    let Err(e) = exchange_daemon::Daemon::start(clinic.config()).await else {
        panic!("the daemon started over an altered entry");
    };
    assert!(e.to_string().contains("audit"), "{e}");
}
