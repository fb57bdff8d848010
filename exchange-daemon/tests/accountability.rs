//! Accountability on real daemons (real TLS on loopback, real SQLite or
//! PostgreSQL):
//! every access and transfer in the audit log with patient pseudonyms only,
//! signed checkpoints over the Merkle tree, provision records on both sides
//! of the boundary, and the retention purge recorded.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;

use common::*;
use exchange_core::MessageId;
use exchange_core::audit::{
    AuditAction, AuditEntry, AuditOutcome, MerkleTree, SignedCheckpoint, SubjectKey,
};
use exchange_core::envelope::SubjectId;
use exchange_core::identity::Certificate;
use exchange_core::receipt::{Disposition, SignedReceipt};
use exchange_daemon::accountability::{self, load_subject_key};
use exchange_daemon::proto::{AckRequest, FetchRequest, ListInboxRequest};
use exchange_daemon::store::ProvisionDirection;

const PATIENT: &str = "P-000123";
const PATIENT_SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.51.11310000013";

fn patient() -> SubjectId {
    SubjectId {
        system: PATIENT_SYSTEM.into(),
        value: PATIENT.into(),
    }
}

/// Every audit entry of `party`'s store, verified against its stored
/// leaf hash, in order.
fn audit_log(party: &Party) -> Vec<AuditEntry> {
    read_store(party)
        .audit_entries(None, None)
        .map(Result::unwrap)
        .enumerate()
        .map(|(i, row)| {
            let e = AuditEntry::from_json(&row.entry).unwrap();
            assert_eq!(row.seq as usize, i, "seq numbers are dense from 0");
            assert_eq!(e.seq, i as u64);
            assert_eq!(e.to_canonical_json(), row.entry, "stored in canonical form");
            assert_eq!(e.leaf_hash().to_vec(), row.leaf_hash);
            e
        })
        .collect()
}

/// The latest stored checkpoint, verified with `party`'s identity certificate.
fn latest_checkpoint(party: &Party) -> exchange_core::audit::Checkpoint {
    let signed = read_store(party).latest_checkpoint().unwrap().unwrap();
    let cert = Certificate::from_pem(&std::fs::read(party.file("identity.pem")).unwrap())
        .unwrap()
        .remove(0);
    SignedCheckpoint::from_bytes(&signed)
        .unwrap()
        .verify_with_certificate(&cert)
        .unwrap()
}

fn find<'a>(
    log: &'a [AuditEntry],
    action: AuditAction,
    outcome: AuditOutcome,
    message: Option<&str>,
) -> Vec<&'a AuditEntry> {
    log.iter()
        .filter(|e| {
            e.action == action
                && e.outcome == outcome
                && message.is_none_or(|m| e.message_id.as_deref() == Some(m))
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn pseudonym_hex(dir: &Path) -> String {
    let key: SubjectKey = load_subject_key(dir).unwrap();
    accountability::pseudonym(&key, &patient()).to_hex()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_access_and_transfer_is_audited_under_signed_checkpoints() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;

    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"referral",
    )
    .await
    .unwrap();
    let mid = MessageId::from_slice(&id).unwrap().to_string();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;

    let mut reader = client_of(&net, &hospital, &his);
    reader
        .list_inbox(ListInboxRequest {
            include_acked: false,
            ..ListInboxRequest::default()
        })
        .await
        .unwrap();
    let mut s = reader
        .fetch(FetchRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    reader
        .ack(AckRequest {
            message_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // A refused read is recorded with its reason.
    let unknown = [7u8; 16];
    let refused = reader
        .fetch(FetchRequest {
            message_id: unknown.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Processed
    })
    .await;

    // What the origin keeps after sending is sealed to the recipient: its
    // own keys do not open it (what it holds is the sealed envelope, not
    // the record).
    let stored = c
        .node()
        .store()
        .messages_by_id(MessageId::from_slice(&id).unwrap())
        .await
        .unwrap()
        .remove(0);
    let head = exchange_core::envelope::EnvelopeHead::decode(&stored.head)
        .unwrap()
        .verify(&net_trust(&net), std::time::SystemTime::now())
        .unwrap();
    let own_key = exchange_core::identity::DecryptionKey::from_pem(
        &std::fs::read(clinic.file("encryption.pem")).unwrap(),
        &std::fs::read(clinic.file("encryption.key.pem")).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        head.open(&[own_key]),
        Err(exchange_core::Error::NotARecipient)
    ));
    c.shutdown().await;
    h.shutdown().await;

    let clinic_p = pseudonym_hex(&clinic.data_dir());
    let hospital_p = pseudonym_hex(&hospital.data_dir());
    assert_ne!(
        clinic_p, hospital_p,
        "each facility pseudonymises under its own secret"
    );

    // The clinic: start, send, forward, both receipts, status reads, stop.
    let log = audit_log(&clinic);
    assert_eq!(log.first().unwrap().action, AuditAction::Start);
    assert_eq!(log.last().unwrap().action, AuditAction::Stop);
    let sent = find(&log, AuditAction::Send, AuditOutcome::Ok, Some(&mid));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].actor, "client:urn:local:clinic:emr");
    assert_eq!(sent[0].subjects, vec![clinic_p.clone()]);
    assert_eq!(sent[0].party, CLINIC);
    let fwd = find(&log, AuditAction::Forward, AuditOutcome::Ok, Some(&mid));
    assert_eq!(fwd.len(), 1, "{fwd:?}");
    assert!(fwd[0].detail.as_deref().unwrap().contains(HOSPITAL));
    let receipts = find(&log, AuditAction::Receipt, AuditOutcome::Ok, Some(&mid));
    let details: Vec<&str> = receipts
        .iter()
        .map(|e| e.detail.as_deref().unwrap())
        .collect();
    assert_eq!(receipts.len(), 2, "{details:?}");
    assert!(details[0].starts_with("DELIVERED by urn:jp:mhlw:facility:1310000021"));
    assert!(details[1].starts_with("PROCESSED by urn:jp:mhlw:facility:1310000021"));
    assert!(
        receipts
            .iter()
            .all(|e| e.subjects == vec![clinic_p.clone()])
    );
    assert!(!find(&log, AuditAction::Status, AuditOutcome::Ok, Some(&mid)).is_empty());
    // Times never go backwards.
    assert!(log.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));

    // The hospital: receive, list, fetch, ack, the refused fetch.
    let log = audit_log(&hospital);
    let got = find(&log, AuditAction::Receive, AuditOutcome::Ok, Some(&mid));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].actor, format!("peer:{CLINIC}"));
    assert_eq!(got[0].subjects, vec![hospital_p.clone()]);
    let his_actor = "client:urn:local:hospital:his";
    let list = find(&log, AuditAction::List, AuditOutcome::Ok, None);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].actor, his_actor);
    let fetched = find(&log, AuditAction::Fetch, AuditOutcome::Ok, Some(&mid));
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].actor, his_actor);
    assert_eq!(fetched[0].subjects, vec![hospital_p.clone()]);
    assert_eq!(
        find(&log, AuditAction::Ack, AuditOutcome::Ok, Some(&mid)).len(),
        1
    );
    let unknown_id = MessageId::from_slice(&unknown).unwrap().to_string();
    let denied = find(
        &log,
        AuditAction::Fetch,
        AuditOutcome::Rejected,
        Some(&unknown_id),
    );
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].reason.as_deref(), Some("not-found"));
    assert_eq!(denied[0].actor, his_actor);

    // Signed checkpoints cover the whole log, and their root is the Merkle
    // root of exactly these entries.
    for party in [&clinic, &hospital] {
        let log = audit_log(party);
        let cp = latest_checkpoint(party);
        assert_eq!(
            cp.tree_size,
            log.len() as u64,
            "the final checkpoint covers all"
        );
        assert_eq!(cp.party.as_str(), party.uri);
        let tree = MerkleTree::from_leaf_hashes(log.iter().map(AuditEntry::leaf_hash).collect());
        assert_eq!(cp.root, tree.root());
    }

    // Patient identifiers are nowhere in clear in either store: not in an
    // index, not in the log (the envelope carries them sealed).
    for party in [&clinic, &hospital] {
        let bytes = stored_bytes(party);
        assert!(
            !contains(&bytes, PATIENT.as_bytes()),
            "{} leaks the id",
            party.uri
        );
        assert!(contains(&bytes, clinic_p.as_bytes()) || contains(&bytes, hospital_p.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_append_only_in_the_database() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    net.configure(&clinic, &[], &[], "");
    let c = start(&clinic).await;
    c.shutdown().await;
    let before = audit_log(&clinic);
    assert_eq!(before.len(), 2, "start and stop: {before:?}");
    let statements = [
        format!(
            "UPDATE audit_log SET entry = {} WHERE seq = 0",
            bytes_sql(&clinic, b"\0")
        ),
        "DELETE FROM audit_log WHERE seq = 1".to_owned(),
        "DELETE FROM audit_log".to_owned(),
    ];
    for sql in &statements {
        let e = match store_url(&clinic) {
            Some(url) => common::pg::try_execute(&url, sql).unwrap_err(),
            None => {
                let conn =
                    rusqlite::Connection::open(clinic.data_dir().join("store.sqlite3")).unwrap();
                conn.execute(sql, []).unwrap_err().to_string()
            }
        };
        assert!(e.contains("append-only"), "{sql}: {e}");
    }
    assert_eq!(audit_log(&clinic), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_peers_are_audited_with_the_reason() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    net.configure(&hospital, &[&clinic, &other], &[], "");
    let h = start(&hospital).await;
    // OTHER delivers an envelope the clinic signed: not the hop before us.
    let (head, ct) = seal_now(&net, &clinic, &hospital, b"x");
    let mut peer = peer_client(&net, &hospital, &other.tls_identity());
    let e = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    h.shutdown().await;
    let log = audit_log(&hospital);
    let mid = head.header_unverified().unwrap().message_id.to_string();
    // The entry names the id the head claims (in its detail: an id is
    // linked to patients only by a verified envelope we accepted).
    let refused = find(&log, AuditAction::Receive, AuditOutcome::Rejected, None);
    assert_eq!(refused.len(), 1, "{log:?}");
    assert!(refused[0].detail.as_deref().unwrap().contains(&mid));
    assert!(refused[0].subjects.is_empty());
    assert_eq!(refused[0].actor, format!("peer:{OTHER}"));
    assert_eq!(refused[0].reason.as_deref(), Some("identity-mismatch"));
    assert!(find(&log, AuditAction::Receive, AuditOutcome::Ok, None).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_records_are_kept_on_both_sides_of_the_boundary() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    // The clinic entrusts the agent by contract (委託).
    net.configure_roles(
        &clinic,
        &[&agent, &payer],
        &[&emr],
        "",
        &[(&agent, "entrusted")],
    );
    net.configure(&agent, &[&clinic, &payer], &[], "");
    net.configure(&payer, &[&agent], &[], "");
    // The payer is reached only through the agent.
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let p = start(&payer).await;
    let mut app = client_of(&net, &clinic, &emr);
    let mut start_msg = referral_start(&[&payer], &[&format!("{AGENT}=entrusted")], "claims");
    start_msg.title = "レセプト 2026-10".into();
    start_msg.document_type = "claim".into();
    let id = send(&mut app, start_msg, b"claim").await.unwrap();
    let mid = MessageId::from_slice(&id).unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    // The receipt reaches the clinic through the agent's queue; wait for
    // the record.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let provided = loop {
        let r = accountability::provision_report(
            &clinic.data_dir(),
            &store_location(&clinic),
            &patient(),
        )
        .unwrap();
        if !r.is_empty() || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    c.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;

    // The origin's record of provision: to the payer (the boundary), not
    // the entrusted agent; what, why, and the payer's DELIVERED receipt.
    assert_eq!(provided.len(), 1, "{provided:?}");
    let r = &provided[0];
    assert_eq!(r.direction, ProvisionDirection::Provided);
    assert_eq!(r.message_id, mid);
    assert_eq!(r.counterparty.as_str(), PAYER);
    assert_eq!(r.recipient.as_str(), PAYER);
    assert_eq!(r.counterparty_name, "payer");
    assert_eq!(r.role, "THIRD_PARTY");
    assert_eq!(r.title, "レセプト 2026-10");
    assert_eq!(r.document_type, "claim");
    assert_eq!(r.purpose, "claims");
    let receipt = SignedReceipt::from_bytes(&r.receipt)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(receipt.issuer().as_str(), PAYER);
    assert_eq!(receipt.disposition(), &Disposition::Delivered);
    assert_eq!(receipt.message_id(), mid);
    assert_eq!(r.time_ms, exchange_daemon::unix_ms(receipt.issued()));
    // Another patient's report is empty.
    let stranger = SubjectId {
        system: PATIENT_SYSTEM.into(),
        value: "P-999".into(),
    };
    assert!(
        accountability::provision_report(&clinic.data_dir(), &store_location(&clinic), &stranger)
            .unwrap()
            .is_empty()
    );

    // The moment responsibility passed is in the clinic's log too, with
    // the patient's pseudonym.
    let log = audit_log(&clinic);
    let passed = find(
        &log,
        AuditAction::Provision,
        AuditOutcome::Ok,
        Some(&mid.to_string()),
    );
    assert_eq!(passed.len(), 1, "{log:?}");
    let detail = passed[0].detail.as_deref().unwrap();
    assert!(
        detail.contains(&format!("passed to {PAYER} (THIRD_PARTY)")),
        "{detail}"
    );
    assert_eq!(passed[0].subjects, vec![pseudonym_hex(&clinic.data_dir())]);
    let log = audit_log(&payer);
    let recorded = find(
        &log,
        AuditAction::Provision,
        AuditOutcome::Ok,
        Some(&mid.to_string()),
    );
    assert_eq!(recorded.len(), 1, "{log:?}");
    assert!(recorded[0].detail.as_deref().unwrap().contains(CLINIC));

    // The recipient's record of receipt: from the clinic, with its own receipt.
    let received =
        accountability::provision_report(&payer.data_dir(), &store_location(&payer), &patient())
            .unwrap();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.direction, ProvisionDirection::Received);
    assert_eq!(r.counterparty.as_str(), CLINIC);
    assert_eq!(r.counterparty_name, "clinic");
    assert_eq!(r.title, "レセプト 2026-10");
    let own = SignedReceipt::from_bytes(&r.receipt)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    assert_eq!(own.issuer().as_str(), PAYER);
    assert_eq!(own.message_id(), mid);

    // The agent cannot read the envelope: no provision record, no
    // pseudonyms in its log, but its relay is recorded.
    assert_eq!(read_store(&agent).counts().unwrap().provisions, Some(0));
    let log = audit_log(&agent);
    let relayed = find(
        &log,
        AuditAction::Relay,
        AuditOutcome::Ok,
        Some(&mid.to_string()),
    );
    assert_eq!(relayed.len(), 1);
    assert!(log.iter().all(|e| e.subjects.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_old_envelopes_and_records_the_purge() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital, &payer], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let done = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"a",
    )
    .await
    .unwrap();
    wait_status(&mut app, &done, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    // The payer never comes up: this one stays pending.
    let pending = send(&mut app, referral_start(&[&payer], &[], "treatment"), b"b")
        .await
        .unwrap();
    c.shutdown().await;
    h.shutdown().await;

    // Restart with a retention of 0 days: the purge runs at start.
    net.configure(
        &clinic,
        &[&hospital, &payer],
        &[&emr],
        "\n[retention]\nmessages_days = 0\n",
    );
    let c = start(&clinic).await;
    let store = c.node().store().clone();
    let done_id = MessageId::from_slice(&done).unwrap();
    let pending_id = MessageId::from_slice(&pending).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.messages_by_id(done_id).await.unwrap().len() == 1 {
        assert!(tokio::time::Instant::now() < deadline, "never purged");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        store
            .receipts(exchange_daemon::store::MessageKey::of_id(done_id))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store.messages_by_id(pending_id).await.unwrap().len() == 1,
        "a message with a pending delivery is kept"
    );
    c.shutdown().await;

    let log = audit_log(&clinic);
    let purges = find(&log, AuditAction::Purge, AuditOutcome::Ok, None);
    assert_eq!(purges.len(), 1, "{purges:?}");
    let detail = purges[0].detail.as_deref().unwrap();
    assert!(detail.contains(&done_id.to_string()), "{detail}");
    assert!(!detail.contains(&pending_id.to_string()), "{detail}");
    assert_eq!(purges[0].actor, "daemon");
    // The provision record outlives the envelope.
    let report =
        accountability::provision_report(&clinic.data_dir(), &store_location(&clinic), &patient())
            .unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].message_id, done_id);
    // So do the Send entries about it.
    assert_eq!(
        find(
            &log,
            AuditAction::Send,
            AuditOutcome::Ok,
            Some(&done_id.to_string())
        )
        .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_store_detects_a_rewritten_audit_entry_and_provision_receipt() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"a",
    )
    .await
    .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    c.shutdown().await;
    h.shutdown().await;

    let trust = net_trust(&net);
    let report =
        exchange_daemon::admin::verify_store(&clinic.data_dir(), &store_location(&clinic), &trust)
            .unwrap();
    assert!(report.is_ok(), "{:?}", report.failures);
    assert!(report.audit_entries.unwrap() > 3);
    assert_eq!(report.provision_receipts_verified, 1);

    // An insider with write access to the database: drops the triggers,
    // rewrites entry 1 (with a consistent leaf hash) and swaps the
    // provision record's receipt for another one.
    let bytes = read_store(&clinic).audit_entry(1).unwrap();
    let mut e = AuditEntry::from_json(&bytes).unwrap();
    e.actor = "client:urn:local:clinic:someone-else".into();
    let rewrite = format!(
        "UPDATE audit_log SET entry = {}, leaf_hash = {} WHERE seq = 1; \
         UPDATE provisions SET receipt = {};",
        bytes_sql(&clinic, &e.to_canonical_json()),
        bytes_sql(&clinic, &e.leaf_hash()),
        bytes_sql(&clinic, &[0x0a, 0x00]),
    );
    tamper(
        &clinic,
        &format!("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete; {rewrite}"),
        &format!("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only; {rewrite}"),
    );

    let report =
        exchange_daemon::admin::verify_store(&clinic.data_dir(), &store_location(&clinic), &trust)
            .unwrap();
    assert!(!report.is_ok());
    let failures: Vec<String> = report
        .failures
        .iter()
        .map(|f| format!("{}: {}", f.what, f.error))
        .collect();
    assert!(
        failures
            .iter()
            .any(|f| f.contains("checkpoint") && f.contains("root")),
        "the signed checkpoints no longer match the rewritten log: {failures:?}"
    );
    assert!(
        report.failures.iter().any(|f| f.what.contains("provision")
            && f.message == Some(MessageId::from_slice(&id).unwrap())),
        "{failures:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_history_refuses_to_start_without_its_pseudonym_key() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    net.configure(&clinic, &[], &[], "");
    start(&clinic).await.shutdown().await;
    let key = clinic.data_dir().join("pseudonym.key");
    let original = std::fs::read(&key).unwrap();
    assert_eq!(original.len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    std::fs::remove_file(&key).unwrap();
    let e = exchange_daemon::Daemon::start(clinic.config())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pseudonym.key is missing"), "{e}");
    assert!(!key.exists(), "no new key was made");
    // With the key restored it starts, and keeps the same key.
    std::fs::write(&key, &original).unwrap();
    start(&clinic).await.shutdown().await;
    assert_eq!(std::fs::read(&key).unwrap(), original);
}
