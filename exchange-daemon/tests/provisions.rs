//! Provision records and status on real daemons (real TLS on loopback, real
//! SQLite or PostgreSQL): messages naming many patients, several recipients behind a
//! third-party relay, receipts whose issuer is revoked later, roles fixed by
//! contract in the configuration, the latest signed state per hop, and
//! audit entries that only a verified envelope links to patients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::audit::{AuditAction, AuditEntry, AuditOutcome};
use exchange_core::envelope::{EnvelopeHead, SubjectId};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
use exchange_core::route::HopRole;
use exchange_daemon::accountability;
use exchange_daemon::proto::{ReturnReceiptsRequest, SubjectIdentifier};
use exchange_daemon::store::ProvisionDirection;

const SYSTEM: &str = "urn:oid:1.2.392.100495.20.3.51.11310000013";

fn subject(i: usize) -> SubjectId {
    SubjectId {
        system: SYSTEM.into(),
        value: format!("P-{i:06}"),
    }
}

fn subjects(range: std::ops::Range<usize>) -> Vec<SubjectIdentifier> {
    range
        .map(|i| SubjectIdentifier {
            system: SYSTEM.into(),
            value: format!("P-{i:06}"),
        })
        .collect()
}

fn audit_log(party: &Party) -> Vec<AuditEntry> {
    audit_entries(party)
        .iter()
        .map(|e| AuditEntry::from_json(e.as_bytes()).unwrap())
        .collect()
}

/// How many patients the provision record of `message` in `direction` names.
fn provision_subject_count(party: &Party, message: MessageId, direction: &str) -> Vec<i64> {
    store_ints(
        party,
        &format!(
            "SELECT (SELECT count(*) FROM provision_subjects s WHERE s.provision_id = p.id) \
             FROM provisions p WHERE p.message_id = {} AND p.direction = '{direction}' \
             ORDER BY p.id",
            bytes_sql(party, message.as_bytes())
        ),
    )
}

/// Polls `f` until it returns `Some` (20 s at most).
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_naming_many_patients_are_delivered_with_every_patient_recorded() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);

    // Several messages in a row on one store, each naming more patients;
    // their numbers overlap so that one patient appears in several.
    let mut sent = Vec::new();
    let mut first = 0;
    for n in [2usize, 3, 2, 1_000, 5_000] {
        let mut start_msg = referral_start(&[&hospital], &[], "claims");
        start_msg.subject_ids = subjects(first..first + n);
        let id = send(&mut app, start_msg, format!("batch of {n}").as_bytes())
            .await
            .unwrap();
        sent.push((MessageId::from_slice(&id).unwrap(), first, n));
        first += n / 2;
    }
    for (id, _, _) in &sent {
        let s = wait_status(&mut app, id.as_bytes(), |s| {
            s.state() == exchange_daemon::proto::MessageState::Delivered
                || s.state() == exchange_daemon::proto::MessageState::Failed
        })
        .await;
        assert_eq!(
            s.state(),
            exchange_daemon::proto::MessageState::Delivered,
            "{s:#?}"
        );
    }
    // The origin's records of provision follow the receipts.
    eventually("every provision record at the clinic", || {
        sent.iter()
            .all(|(id, _, _)| !provision_subject_count(&clinic, *id, "provided").is_empty())
            .then_some(())
    })
    .await;
    c.shutdown().await;
    h.shutdown().await;

    for (id, from, n) in &sent {
        // Each record names every patient of its message, at both ends.
        assert_eq!(
            provision_subject_count(&hospital, *id, "received"),
            vec![*n as i64],
            "the hospital's record of receipt for {id}"
        );
        assert_eq!(
            provision_subject_count(&clinic, *id, "provided"),
            vec![*n as i64],
            "the clinic's record of provision for {id}"
        );
        // And a patient's disclosure report finds it, first and last.
        for i in [*from, from + n - 1] {
            let report = accountability::provision_report(
                &hospital.data_dir(),
                &store_location(&hospital),
                &subject(i),
            )
            .unwrap();
            assert!(
                report
                    .iter()
                    .any(|r| r.message_id == *id && r.direction == ProvisionDirection::Received),
                "patient {i} of {id}: {report:?}"
            );
        }
    }
    // A patient named in three messages has three records of receipt.
    let report = accountability::provision_report(
        &hospital.data_dir(),
        &store_location(&hospital),
        &subject(3),
    )
    .unwrap();
    let ids: Vec<MessageId> = report.iter().map(|r| r.message_id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for (id, from, n) in &sent {
        assert_eq!(ids.contains(id), (*from..from + n).contains(&3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_at_the_recipient_is_reported_as_such_not_as_a_transport_failure() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    // The hospital's store refuses to keep messages (as a full or damaged
    // disk would), behind the running daemon's back.
    tamper(
        &hospital,
        "CREATE TRIGGER broken BEFORE INSERT ON messages \
         BEGIN SELECT RAISE(ABORT, 'simulated store failure'); END;",
        "CREATE FUNCTION broken() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'simulated store failure'; END; $$; \
         CREATE TRIGGER broken BEFORE INSERT ON messages \
         FOR EACH ROW EXECUTE FUNCTION broken();",
    );
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"x",
    )
    .await
    .unwrap();
    let mid = MessageId::from_slice(&id).unwrap();
    let status = wait_status(&mut app, &id, |s| s.hops.iter().any(|h| h.attempts >= 2)).await;
    c.shutdown().await;
    h.shutdown().await;
    // The sender sees the recipient's internal failure for what it is.
    let hop = &status.hops[0];
    assert!(
        hop.last_error.contains("peer-internal") && hop.last_error.contains(HOSPITAL),
        "{hop:?}"
    );
    let log = audit_log(&clinic);
    let failed: Vec<_> = log
        .iter()
        .filter(|e| {
            e.action == AuditAction::Forward
                && e.outcome == AuditOutcome::Failed
                && e.message_id.as_deref() == Some(&mid.to_string())
        })
        .collect();
    assert!(!failed.is_empty());
    assert!(
        failed
            .iter()
            .all(|e| e.reason.as_deref() == Some("peer-internal")),
        "{failed:?}"
    );
    // The recipient recorded each refusal with its cause.
    let log = audit_log(&hospital);
    let refused: Vec<_> = log
        .iter()
        .filter(|e| e.action == AuditAction::Receive && e.outcome == AuditOutcome::Rejected)
        .collect();
    assert!(refused.len() >= 2, "{log:?}");
    assert!(refused.iter().all(|e| e.reason.as_deref() == Some("store")));
}

/// A clinic sends to a hospital and a payer through a claims agent that is
/// a third party (its custody receipt is the boundary for both).
struct ThirdPartyRelay {
    net: Net,
    clinic: Party,
    agent: Party,
    hospital: Party,
    payer: Party,
    emr: LocalClient,
}

fn third_party_relay() -> ThirdPartyRelay {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&agent, &hospital, &payer], &[&emr], "");
    net.configure(&agent, &[&clinic, &hospital, &payer], &[], "");
    net.configure(&hospital, &[&agent], &[], "");
    net.configure(&payer, &[&agent], &[], "");
    ThirdPartyRelay {
        net,
        clinic,
        agent,
        hospital,
        payer,
        emr,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_recipient_behind_a_third_party_relay_gets_its_own_provision_record() {
    let t = third_party_relay();
    let c = start(&t.clinic).await;
    let a = start(&t.agent).await;
    let h = start(&t.hospital).await;
    let p = start(&t.payer).await;
    let mut app = client_of(&t.net, &t.clinic, &t.emr);
    let mut msg = referral_start(
        &[&t.hospital, &t.payer],
        &[&format!("{AGENT}=third-party")],
        "claims",
    );
    msg.subject_ids = subjects(0..3);
    let id = send(&mut app, msg, b"to two behind a third party")
        .await
        .unwrap();
    let mid = MessageId::from_slice(&id).unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    assert_eq!(status.provisions.len(), 2);
    assert!(
        status.provisions.iter().all(|p| p.provision()
            == exchange_daemon::proto::ProvisionState::Passed
            && p.boundary == AGENT),
        "{status:#?}"
    );
    let records = eventually("two records of provision", || {
        let r = accountability::provision_report(
            &t.clinic.data_dir(),
            &store_location(&t.clinic),
            &subject(1),
        )
        .unwrap();
        (r.len() >= 2).then_some(r)
    })
    .await;
    c.shutdown().await;
    a.shutdown().await;
    h.shutdown().await;
    p.shutdown().await;
    // One record per recipient, both naming the agent, the boundary.
    let mut recipients: Vec<&str> = records.iter().map(|r| r.recipient.as_str()).collect();
    recipients.sort_unstable();
    let mut expected = vec![HOSPITAL, PAYER];
    expected.sort_unstable();
    assert_eq!(recipients, expected, "{records:?}");
    for r in &records {
        assert_eq!(r.message_id, mid);
        assert_eq!(r.direction, ProvisionDirection::Provided);
        assert_eq!(r.counterparty.as_str(), AGENT);
        assert_eq!(r.role, "THIRD_PARTY");
    }
    assert_eq!(
        provision_subject_count(&t.clinic, mid, "provided"),
        vec![3, 3]
    );
    let log = audit_log(&t.clinic);
    let passed = log
        .iter()
        .filter(|e| e.action == AuditAction::Provision && e.outcome == AuditOutcome::Ok)
        .count();
    assert_eq!(passed, 2, "one provision entry per recipient");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_whose_issuer_is_revoked_later_stays_evidence_and_others_still_count() {
    let mut net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital, &payer], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    net.configure(&payer, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let mut msg = referral_start(&[&hospital, &payer], &[], "claims");
    msg.subject_ids = subjects(0..2);
    let id = send(&mut app, msg, b"to two third parties").await.unwrap();
    let mid = MessageId::from_slice(&id).unwrap();
    // The hospital delivers; the payer is not up yet.
    wait_status(&mut app, &id, |s| {
        s.receipts.iter().any(|r| {
            r.issuer == HOSPITAL
                && r.disposition() == exchange_daemon::proto::Disposition::Delivered
        })
    })
    .await;
    h.shutdown().await;
    // Then the hospital's certificate is revoked, and the clinic knows it.
    net.revoke(&hospital.file("identity.pem"));
    c.reload_trust().unwrap();
    // The payer delivers afterwards.
    let p = start(&payer).await;
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let records = eventually("both records of provision", || {
        let r = accountability::provision_report(
            &clinic.data_dir(),
            &store_location(&clinic),
            &subject(0),
        )
        .unwrap();
        (r.len() >= 2).then_some(r)
    })
    .await;
    c.shutdown().await;
    p.shutdown().await;

    // Both receipts are shown; the hospital's carries the later revocation
    // beside it, and both mark a boundary.
    assert_eq!(status.receipts.len(), 2, "{status:#?}");
    for r in &status.receipts {
        assert_eq!(
            r.disposition(),
            exchange_daemon::proto::Disposition::Delivered
        );
        assert!(r.provision_boundary);
        assert_eq!(r.issuer_revoked_since, r.issuer == HOSPITAL, "{r:?}");
    }
    assert!(
        status
            .provisions
            .iter()
            .all(|p| p.provision() == exchange_daemon::proto::ProvisionState::Passed)
    );
    let mut recipients: Vec<&str> = records.iter().map(|r| r.recipient.as_str()).collect();
    recipients.sort_unstable();
    let mut expected = vec![HOSPITAL, PAYER];
    expected.sort_unstable();
    assert_eq!(recipients, expected);
    assert!(records.iter().all(|r| r.message_id == mid));
}

/// A `policy-violation` refusal of message `id` signed by `hospital` at `at_ms`.
async fn refusal(
    c: &exchange_daemon::Daemon,
    net: &Net,
    hospital: &Party,
    id: Vec<u8>,
    at_ms: u64,
) -> SignedReceipt {
    let record = c
        .node()
        .store()
        .messages_by_id(MessageId::from_slice(&id).unwrap())
        .await
        .unwrap()
        .remove(0);
    let head = EnvelopeHead::decode(&record.head)
        .unwrap()
        .verify_ignoring_expiry(&net_trust(net), SystemTime::now())
        .unwrap();
    SignedReceipt::issue(
        &hospital.identity(),
        &ReceiptContent::for_head(
            &head,
            HopRole::ThirdParty,
            Disposition::Rejected("policy-violation".into()),
            std::time::UNIX_EPOCH + Duration::from_millis(at_ms),
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_latest_signed_state_of_each_hop() {
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
        b"x",
    )
    .await
    .unwrap();
    let delivered = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let custody_ms = delivered.receipts[0].issued_ms;
    // A REJECTED signed by the hospital before its custody receipt (as a
    // relay that truncated once would bring back) reaches the clinic late.
    let record = c
        .node()
        .store()
        .messages_by_id(MessageId::from_slice(&id).unwrap())
        .await
        .unwrap()
        .remove(0);
    let head = EnvelopeHead::decode(&record.head)
        .unwrap()
        .verify_ignoring_expiry(&net_trust(&net), SystemTime::now())
        .unwrap();
    let rejected = SignedReceipt::issue(
        &hospital.identity(),
        &ReceiptContent::for_head(
            &head,
            HopRole::ThirdParty,
            Disposition::Rejected("truncated".into()),
            std::time::UNIX_EPOCH + Duration::from_millis(custody_ms - 2_000),
        ),
    );
    let mut peer = peer_client(&net, &clinic, &hospital.tls_identity());
    peer.return_receipts(ReturnReceiptsRequest {
        message_id: id.clone(),
        receipts: vec![rejected.to_bytes()],
    })
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| s.receipts.len() == 2).await;
    // The earlier refusal is shown, but the hop's latest signed state is
    // custody: the message is delivered.
    assert!(status.receipts.iter().any(|r| r.disposition()
        == exchange_daemon::proto::Disposition::Rejected
        && r.reason == "truncated"));
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{status:#?}"
    );
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{status:#?}"
    );
    // A message keeps one receipt per issuer and disposition: a second
    // refusal from the same hop is already held, whatever it says.
    let held = peer
        .return_receipts(ReturnReceiptsRequest {
            message_id: id.clone(),
            receipts: vec![
                refusal(&c, &net, &hospital, id.clone(), custody_ms + 1_000)
                    .await
                    .to_bytes(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((held.stored, held.already_held), (0, 1));
    let status = wait_status(&mut app, &id, |s| s.receipts.len() == 2).await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered,
        "{status:#?}"
    );
    // A refusal signed after the custody receipt is the hop's latest state.
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"y",
    )
    .await
    .unwrap();
    let delivered = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    peer.return_receipts(ReturnReceiptsRequest {
        message_id: id.clone(),
        receipts: vec![
            refusal(
                &c,
                &net,
                &hospital,
                id.clone(),
                delivered.receipts[0].issued_ms + 1_000,
            )
            .await
            .to_bytes(),
        ],
    })
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| s.receipts.len() == 2).await;
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Failed,
        "{status:#?}"
    );
    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_unverified_claims_are_not_linked_to_a_stored_patient() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic, &payer], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"x",
    )
    .await
    .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let mid = MessageId::from_slice(&id).unwrap();
    let genuine = c
        .node()
        .store()
        .messages_by_id(mid)
        .await
        .unwrap()
        .remove(0)
        .head;
    // The payer knows the id. It sends a head claiming it whose signature
    // does not verify, the genuine head (it is not the upstream), and
    // receipts for it (it is not on the route).
    // The head is `1: header, 2: signature (64 bytes), 3: chain`: flip a
    // bit of the signature.
    let mut forged = genuine.clone();
    assert_eq!(forged[0], 0x0a);
    let (mut header_len, mut at) = (0usize, 1usize);
    for shift in (0..).step_by(7) {
        let b = forged[at];
        at += 1;
        header_len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let signature = at + header_len;
    assert_eq!(&forged[signature..signature + 2], &[0x12, 0x40]);
    forged[signature + 10] ^= 1;
    let mut peer = peer_client(&net, &hospital, &payer.tls_identity());
    for head in [forged, genuine] {
        let h = EnvelopeHead::decode(&head).unwrap();
        assert!(deliver(&mut peer, &h, b"").await.is_err());
    }
    assert!(
        peer.return_receipts(ReturnReceiptsRequest {
            message_id: id.clone(),
            receipts: vec![],
        })
        .await
        .is_err()
    );
    c.shutdown().await;
    h.shutdown().await;

    let log = audit_log(&hospital);
    let mine = |e: &&AuditEntry| e.actor == format!("peer:{PAYER}");
    let refused: Vec<&AuditEntry> = log.iter().filter(mine).collect();
    assert_eq!(refused.len(), 3, "{log:?}");
    for e in &refused {
        assert_eq!(e.outcome, AuditOutcome::Rejected);
        // Still findable by the id it claimed, but linked to no patient.
        assert!(
            e.detail.as_deref().unwrap_or("").contains(&mid.to_string()),
            "{e:?}"
        );
        assert!(e.subjects.is_empty(), "{e:?}");
    }
    // The genuine receipt of the message is linked to its patient.
    let received = log
        .iter()
        .find(|e| e.action == AuditAction::Receive && e.outcome == AuditOutcome::Ok)
        .unwrap();
    assert_eq!(received.subjects.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_come_from_the_contract_in_the_configuration_not_from_the_application() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    // The clinic entrusts the agent (委託); the payer and the hospital are
    // third parties (the default).
    net.configure_roles(
        &clinic,
        &[&agent, &payer, &hospital],
        &[&emr],
        "",
        &[(&agent, "entrusted")],
    );
    net.configure(&agent, &[&clinic, &payer], &[], "");
    net.configure(&payer, &[&agent], &[], "");
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let p = start(&payer).await;
    let mut app = client_of(&net, &clinic, &emr);

    // An application cannot relabel a third party as an entrusted agent.
    let mut to_hospital = referral_start(&[&hospital], &[], "treatment");
    to_hospital.entrusted_recipients = vec![HOSPITAL.into()];
    let refusals = [
        to_hospital,
        referral_start(&[&payer], &[&format!("{PAYER}=entrusted")], "claims"),
        referral_start(&[&payer], &[&format!("{AGENT}=third-party")], "claims"),
    ];
    for msg in refusals {
        let e = send(&mut app, msg, b"x").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert_eq!(
            exchange_daemon::error::status_reason(&e),
            Some("role-mismatch"),
            "{e:?}"
        );
    }
    // Naming no role, or the contracted one, is accepted; the route carries
    // the contracted roles.
    for via in [AGENT.to_owned(), format!("{AGENT}=entrusted")] {
        let id = send(
            &mut app,
            referral_start(&[&payer], &[via.as_str()], "claims"),
            b"claim",
        )
        .await
        .unwrap();
        let s = wait_status(&mut app, &id, |s| {
            s.state() == exchange_daemon::proto::MessageState::Delivered
        })
        .await;
        assert_eq!(s.provisions.len(), 1);
        assert_eq!(
            s.provisions[0].provision(),
            exchange_daemon::proto::ProvisionState::Passed
        );
        assert_eq!(s.provisions[0].boundary, PAYER, "the agent is entrusted");
    }
    c.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;
    // Each refusal is in the clinic's audit log with its reason.
    let log = audit_log(&clinic);
    let refused = log
        .iter()
        .filter(|e| {
            e.action == AuditAction::Send
                && e.outcome == AuditOutcome::Rejected
                && e.reason.as_deref() == Some("role-mismatch")
        })
        .count();
    assert_eq!(refused, 3, "{log:?}");
}
