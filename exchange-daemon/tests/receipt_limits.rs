//! What an authenticated peer can make a daemon hold, on real daemons (real
//! TLS on loopback, real SQLite): at most one receipt per issuer and
//! disposition per message, whatever a downstream hop returns; a cap on
//! the receipts one call may carry; and a free-disk reserve below which new
//! envelopes are refused while reads, fetch and acknowledgement still work.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::envelope::{EnvelopeHead, VerifiedHead};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
use exchange_core::route::HopRole;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::{
    AckRequest, FetchRequest, ListInboxRequest, ReturnReceiptsRequest, fetch_response,
};
use tonic::Code;

/// Rows of `party`'s audit log.
fn audit_len(party: &Party) -> i64 {
    i64::try_from(read_store(party).audit_len().unwrap().unwrap()).unwrap()
}

/// The (issuer, disposition) of every receipt `party` stores for `id`.
fn receipts_of(party: &Party, id: &[u8]) -> Vec<(String, String)> {
    store_texts(
        party,
        &format!(
            "SELECT issuer, disposition FROM receipts WHERE message_id = {} ORDER BY seq",
            bytes_sql(party, id)
        ),
    )
    .into_iter()
    .map(|mut row| {
        let disposition = row.pop().unwrap();
        (row.pop().unwrap(), disposition)
    })
    .collect()
}

/// Audit entries of `party` with `reason`.
fn audited_with_reason(party: &Party, reason: &str) -> usize {
    audit_entries(party)
        .iter()
        .map(|e| exchange_core::audit::AuditEntry::from_json(e.as_bytes()).unwrap())
        .filter(|e| e.reason.as_deref() == Some(reason))
        .count()
}

/// `n` receipts of `disposition` about `head` signed by `issuer`, each
/// issued a millisecond after the one before (all different bytes).
fn variants(
    issuer: &Party,
    head: &VerifiedHead,
    disposition: &Disposition,
    n: u64,
) -> Vec<Vec<u8>> {
    let identity = issuer.identity();
    let base = SystemTime::now();
    (0..n)
        .map(|i| {
            SignedReceipt::issue(
                &identity,
                &ReceiptContent::for_head(
                    head,
                    HopRole::ThirdParty,
                    disposition.clone(),
                    base + Duration::from_millis(i),
                ),
            )
            .to_bytes()
        })
        .collect()
}

async fn wait_idle(daemon: &exchange_daemon::Daemon) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while daemon.node().store().pending_count().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries still pending"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_hop_cannot_multiply_its_receipts() {
    const PER_CALL: u64 = 50;
    const CALLS: u64 = 20;
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure_roles(
        &clinic,
        &[&agent, &payer],
        &[&emr],
        "",
        &[(&agent, "entrusted")],
    );
    net.configure(
        &agent,
        &[&clinic, &payer],
        &[],
        &format!("[limits]\nmax_receipts_per_call = {PER_CALL}\n"),
    );
    net.configure(&payer, &[&agent], &[], "");
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let p = start(&payer).await;
    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&payer], &[&format!("{AGENT}=entrusted")], "claims"),
        b"claim",
    )
    .await
    .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered && s.receipts.len() == 2
    })
    .await;
    wait_idle(&a).await;
    let mid = MessageId::from_slice(&id).unwrap();
    let head = c
        .node()
        .store()
        .messages_by_id(mid)
        .await
        .unwrap()
        .remove(0)
        .head;
    let head = EnvelopeHead::decode(&head)
        .unwrap()
        .verify_ignoring_expiry(&net_trust(&net), SystemTime::now())
        .unwrap();
    let expected = vec![(PAYER.to_owned(), "DELIVERED".to_owned())];
    assert_eq!(receipts_of(&agent, &id), expected);
    let audit_before = audit_len(&agent);

    // The payer, authenticated, returns 1,000 DELIVERED receipts for the
    // message: new signatures at new times, and exact copies.
    let mut as_payer = peer_client(&net, &agent, &payer.tls_identity());
    let delivered = variants(&payer, &head, &Disposition::Delivered, CALLS * PER_CALL / 2);
    for call in 0..CALLS {
        let start = usize::try_from(call * PER_CALL / 2).unwrap();
        let half = &delivered[start..start + usize::try_from(PER_CALL / 2).unwrap()];
        let mut receipts = half.to_vec();
        receipts.extend(half.iter().cloned());
        let r = as_payer
            .return_receipts(ReturnReceiptsRequest {
                message_id: id.clone(),
                receipts,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((r.stored, u64::from(r.already_held)), (0, PER_CALL));
    }
    // One kept, nothing new forwarded; the log grew by one entry per call
    // at most, not one per receipt.
    assert_eq!(receipts_of(&agent, &id), expected);
    let grown = audit_len(&agent) - audit_before;
    assert!(
        grown <= i64::try_from(CALLS).unwrap(),
        "the audit log grew by {grown}"
    );
    wait_idle(&a).await;
    assert_eq!(
        receipts_of(&clinic, &id),
        vec![
            (AGENT.to_owned(), "ACCEPTED_FOR_RELAY".to_owned()),
            (PAYER.to_owned(), "DELIVERED".to_owned()),
        ]
    );

    // More receipts in one call than allowed: refused whole, before any
    // is verified or stored, with the reason.
    let processed = variants(&payer, &head, &Disposition::Processed, PER_CALL + 1);
    let refused = as_payer
        .return_receipts(ReturnReceiptsRequest {
            message_id: id.clone(),
            receipts: processed.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(status_reason(&refused), Some("too-many-receipts"));
    assert_eq!(receipts_of(&agent, &id), expected);
    assert_eq!(audited_with_reason(&agent, "too-many-receipts"), 1);
    // At the limit, taken: one PROCESSED kept and passed upstream once.
    let r = as_payer
        .return_receipts(ReturnReceiptsRequest {
            message_id: id.clone(),
            receipts: processed[..usize::try_from(PER_CALL).unwrap()].to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, u64::from(r.already_held)), (1, PER_CALL - 1));
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Processed
    })
    .await;
    wait_idle(&a).await;
    assert_eq!(
        receipts_of(&clinic, &id),
        vec![
            (AGENT.to_owned(), "ACCEPTED_FOR_RELAY".to_owned()),
            (PAYER.to_owned(), "DELIVERED".to_owned()),
            (PAYER.to_owned(), "PROCESSED".to_owned()),
        ]
    );

    // The origin's status reads its receipts back as verified on arrival:
    // the payer's DELIVERED is the provision boundary, no issuer revoked.
    assert_eq!(status.receipts.len(), 3, "{status:#?}");
    let boundary: Vec<_> = status
        .receipts
        .iter()
        .filter(|r| r.provision_boundary)
        .collect();
    assert_eq!(boundary.len(), 1, "{status:#?}");
    assert_eq!(boundary[0].issuer, PAYER);
    assert_eq!(
        boundary[0].disposition(),
        exchange_daemon::proto::Disposition::Delivered
    );
    assert!(status.receipts.iter().all(|r| !r.issuer_revoked_since));
    assert_eq!(status.provisions.len(), 1);
    assert_eq!(
        status.provisions[0].provision(),
        exchange_daemon::proto::ProvisionState::Passed
    );
    assert_eq!(status.provisions[0].boundary, PAYER);
    let unrecorded = store_ints(
        &clinic,
        "SELECT count(*) FROM receipts WHERE verified_ms IS NULL",
    )[0];
    assert_eq!(
        unrecorded, 0,
        "every stored receipt records its verification"
    );
    c.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;
}

/// A reserve above the filesystem's free space refuses new envelopes, from
/// a peer and from a local client, and keeps reads, fetch and
/// acknowledgement working; below it, the same sends succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_disk_reserve_new_envelopes_are_refused_and_reads_work() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let app_cert = net.client("his", "urn:local:hospital:his");
    // Larger than the inline limit: received through a spool file.
    let big = vec![0x5au8; (1 << 20) + 4096];

    // Below the threshold (a 1 MiB reserve): both kinds of send succeed.
    net.configure(
        &hospital,
        &[&clinic],
        &[&app_cert],
        "[limits]\nmin_free_disk_bytes = 1048576\n",
    );
    let h = start(&hospital).await;
    let mut app = client_of(&net, &hospital, &app_cert);
    let mut as_clinic = peer_client(&net, &hospital, &clinic.tls_identity());
    let (head, ct) = seal_now(&net, &clinic, &hospital, &big);
    deliver(&mut as_clinic, &head, &ct).await.unwrap();
    let earlier_in = head.header_unverified().unwrap().message_id;
    let earlier_out = send(&mut app, referral_start(&[&clinic], &[], "treatment"), &big)
        .await
        .unwrap();
    h.shutdown().await;
    let before = store_counts(&hospital);
    assert_eq!(before.messages, 2);

    // Above it: the reserve is the free space plus 1 TiB.
    let free = exchange_daemon::free_disk_bytes(&hospital.data_dir()).unwrap();
    net.configure(
        &hospital,
        &[&clinic],
        &[&app_cert],
        &format!("[limits]\nmin_free_disk_bytes = {}\n", free + (1u64 << 40)),
    );
    let h = start(&hospital).await;
    let mut app = client_of(&net, &hospital, &app_cert);
    let mut as_clinic = peer_client(&net, &hospital, &clinic.tls_identity());
    for payload in [&b"small"[..], &big[..]] {
        let (head, ct) = seal_now(&net, &clinic, &hospital, payload);
        let refused = deliver(&mut as_clinic, &head, &ct).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(status_reason(&refused), Some("disk-reserve"));
        // Our state, not the envelope's: no signed refusal, the sender retries.
        assert!(
            refused
                .metadata()
                .get_bin(exchange_daemon::error::RECEIPT_METADATA)
                .is_none()
        );
        let refused = send(
            &mut app,
            referral_start(&[&clinic], &[], "treatment"),
            payload,
        )
        .await
        .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert_eq!(status_reason(&refused), Some("disk-reserve"));
    }
    // Nothing stored, no spool file left; each refusal audited.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while store_counts(&hospital).spool_files > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a spool file is left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = store_counts(&hospital);
    assert_eq!(after.messages, before.messages);
    assert_eq!(after.blob_files, before.blob_files);
    assert_eq!(audited_with_reason(&hospital, "disk-reserve"), 4);

    // Status, inbox, fetch and acknowledgement of earlier messages work.
    let status = app
        .status(exchange_daemon::proto::StatusRequest {
            message_id: earlier_out.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.message_id, earlier_out);
    let inbox = app
        .list_inbox(ListInboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.items.len(), 1);
    assert_eq!(inbox.items[0].message_id, earlier_in.as_bytes().to_vec());
    let mut fetched = Vec::new();
    let mut stream = app
        .fetch(FetchRequest {
            message_id: earlier_in.as_bytes().to_vec(),
            ..FetchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(fetch_response::Part::Chunk(c)) = m.part {
            fetched.extend_from_slice(&c);
        }
    }
    assert_eq!(fetched, big);
    let ack = app
        .ack(AckRequest {
            message_id: earlier_in.as_bytes().to_vec(),
            ..AckRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.receipt.is_empty());
    h.shutdown().await;
}
