//! What ends a delivery: only a signed refusal from the hop the envelope
//! went to, for this very envelope, is final; any other error answer is
//! retried until the envelope expires. A relay that gives up forwarding
//! says so upstream with a signed REJECTED (`undeliverable`) receipt, so
//! that the origin does not show RELAYED forever. Real daemons, real TLS on
//! loopback, real stores; the misbehaving peer is a real gRPC server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::MessageId;
use exchange_core::envelope::EnvelopeHead;
use exchange_core::identity::Identity;
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
use exchange_core::route::HopRole;
use exchange_daemon::error::{REASON_METADATA, RECEIPT_METADATA};
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::peer_server::Peer;
use exchange_daemon::proto::{
    DeliverRequest, DeliverResponse, ReturnReceiptsRequest, ReturnReceiptsResponse, deliver_request,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// How the flaky front answers one Deliver call before it lets calls through.
enum Answer {
    /// An error status with this reason code and no receipt.
    Bare(Code, &'static str),
    /// An error status carrying a REJECTED receipt signed by `signer` about
    /// `about` (the delivered head if `None`).
    Signed {
        code: Code,
        signer: Box<Identity>,
        role: HopRole,
        about: Option<Box<EnvelopeHead>>,
    },
}

/// A peer in front of the real hospital daemon: its first calls get the
/// scripted answers, later ones are passed to the hospital (authenticated
/// as the clinic, which the route names as the hop before it).
struct Flaky {
    script: Mutex<VecDeque<Answer>>,
    behind: PeerClient<Channel>,
    trust: exchange_core::trust::TrustStore,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn bare(code: Code, reason: &str) -> Status {
    let mut s = Status::new(
        code,
        format!("{reason}: scripted refusal without a receipt"),
    );
    s.metadata_mut()
        .insert(REASON_METADATA, reason.parse().unwrap());
    s
}

#[tonic::async_trait]
impl Peer for Flaky {
    async fn deliver(
        &self,
        req: Request<Streaming<DeliverRequest>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut stream = req.into_inner();
        let mut msgs = Vec::new();
        while let Some(m) = stream.message().await? {
            msgs.push(m);
        }
        let Some(deliver_request::Part::Head(head_bytes)) =
            msgs.first().and_then(|m| m.part.clone())
        else {
            return Err(Status::invalid_argument("no head"));
        };
        let answer = self.script.lock().unwrap().pop_front();
        match answer {
            None => {
                let r = self
                    .behind
                    .clone()
                    .deliver(tokio_stream::iter(msgs))
                    .await?;
                Ok(r)
            }
            Some(Answer::Bare(code, reason)) => Err(bare(code, reason)),
            Some(Answer::Signed {
                code,
                signer,
                role,
                about,
            }) => {
                let head = about.map_or_else(|| EnvelopeHead::decode(&head_bytes).unwrap(), |h| *h);
                let head = head
                    .verify_ignoring_expiry(&self.trust, SystemTime::now())
                    .unwrap();
                let receipt = SignedReceipt::issue(
                    &signer,
                    &ReceiptContent::for_head(
                        &head,
                        role,
                        Disposition::Rejected("oversize".into()),
                        SystemTime::now(),
                    ),
                );
                let mut s = bare(code, "oversize");
                s.metadata_mut().insert_bin(
                    RECEIPT_METADATA,
                    tonic::metadata::MetadataValue::from_bytes(&receipt.to_bytes()),
                );
                Err(s)
            }
        }
    }

    async fn return_receipts(
        &self,
        _req: Request<ReturnReceiptsRequest>,
    ) -> Result<Response<ReturnReceiptsResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_without_a_signed_refusal_from_the_next_hop_are_retried_until_delivered() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let other = net.party("other", OTHER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    // The clinic reaches the hospital at its usual address, where the
    // flaky front listens; the real hospital daemon listens behind it.
    net.configure(&clinic, &[&hospital], &[&emr], "");
    let mut behind = hospital.clone();
    behind.peer_port = free_port();
    net.configure(&behind, &[&clinic], &[], "");
    let h = start(&behind).await;
    let c = start(&clinic).await;

    // A REJECTED receipt the hospital really signed, but about another envelope.
    let (elsewhere, _) = seal_now(&net, &clinic, &hospital, b"another envelope");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let script = VecDeque::from([
        Answer::Bare(Code::PermissionDenied, "identity-mismatch"),
        Answer::Bare(Code::ResourceExhausted, "disk-reserve"),
        Answer::Bare(Code::NotFound, "not-found"),
        // Signed, but by a party that is not on the route.
        Answer::Signed {
            code: Code::ResourceExhausted,
            signer: Box::new(other.identity()),
            role: HopRole::ThirdParty,
            about: None,
        },
        // Signed by the hospital, but about another envelope.
        Answer::Signed {
            code: Code::ResourceExhausted,
            signer: Box::new(hospital.identity()),
            role: HopRole::ThirdParty,
            about: Some(Box::new(elsewhere)),
        },
    ]);
    serve_peer(
        &hospital,
        Flaky {
            script: Mutex::new(script),
            behind: peer_client(&net, &behind, &clinic.tls_identity()),
            trust: net_trust(&net),
            calls: calls.clone(),
        },
    )
    .await;

    let mut app = client_of(&net, &clinic, &emr);
    let id = send(
        &mut app,
        referral_start(&[&hospital], &[], "treatment"),
        b"referral after a bad start",
    )
    .await
    .unwrap();
    let mut errors_seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let s = app
            .status(exchange_daemon::proto::StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_ne!(
            s.state(),
            exchange_daemon::proto::MessageState::Failed,
            "an error answer without a signed refusal ended the delivery: {s:#?}"
        );
        if let Some(hop) = s.hops.first()
            && !hop.last_error.is_empty()
            && errors_seen.last() != Some(&hop.last_error)
        {
            errors_seen.push(hop.last_error.clone());
        }
        if s.state() == exchange_daemon::proto::MessageState::Delivered {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never delivered: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let hop = &status.hops[0];
    assert_eq!(
        hop.state(),
        exchange_daemon::proto::HopDeliveryState::Delivered
    );
    assert_eq!(
        hop.attempts, 6,
        "five answers retried, then delivered: {hop:?}"
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 6);
    assert!(
        errors_seen
            .iter()
            .any(|e| e.contains("PERMISSION_DENIED") && e.contains("identity-mismatch")),
        "the last error was visible while retrying: {errors_seen:?}"
    );
    // Only the hospital's real DELIVERED receipt is kept; none of the
    // scripted ones.
    assert_eq!(status.receipts.len(), 1, "{status:#?}");
    assert_eq!(status.receipts[0].issuer, HOSPITAL);
    assert_eq!(
        status.receipts[0].disposition(),
        exchange_daemon::proto::Disposition::Delivered
    );
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);

    // Each failed attempt is audited with the error it got.
    let retries: Vec<String> = audit_entries(&clinic)
        .into_iter()
        .filter(|e| e.contains("will retry"))
        .collect();
    assert_eq!(retries.len(), 5, "{retries:#?}");
    for (entry, expect) in retries.iter().zip([
        "PERMISSION_DENIED (identity-mismatch)",
        "RESOURCE_EXHAUSTED (disk-reserve)",
        "NOT_FOUND (not-found)",
        "unacceptable receipt",
        "unacceptable receipt",
    ]) {
        assert!(entry.contains(expect), "{entry} lacks {expect}");
    }
    assert!(retries[..3].iter().all(|e| e.contains("unsigned-refusal")));
    c.shutdown().await;
    h.shutdown().await;
}

/// The clinic sends through the agent (entrusted) to the payer.
fn via_agent(net: &Net, clinic: &Party, agent: &Party, payer: &Party, emr: &LocalClient) {
    net.configure_roles(clinic, &[agent, payer], &[emr], "", &[(agent, "entrusted")]);
    net.configure(agent, &[clinic, payer], &[], "");
}

/// The head of a message as the clinic stored it, verified.
async fn stored_head(
    daemon: &exchange_daemon::Daemon,
    net: &Net,
    id: &[u8],
) -> exchange_core::envelope::VerifiedHead {
    let mut stored = daemon
        .node()
        .store()
        .messages_by_id(MessageId::from_slice(id).unwrap())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "one message under this id");
    let stored = stored.remove(0);
    EnvelopeHead::decode(&stored.head)
        .unwrap()
        .verify_ignoring_expiry(&net_trust(net), SystemTime::now())
        .unwrap()
}

fn provision_rows(party: &Party) -> u64 {
    read_store(party).counts().unwrap().provisions.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_gives_up_returns_its_signed_undeliverable_receipt_to_the_origin() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    via_agent(&net, &clinic, &agent, &payer, &emr);
    // The payer never comes up.
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let mut app = client_of(&net, &clinic, &emr);
    let relay = format!("{AGENT}=entrusted");
    let mut start_msg = referral_start(&[&payer], &[relay.as_str()], "claims");
    start_msg.lifetime_seconds = 3;
    let id = send(&mut app, start_msg, b"claim").await.unwrap();
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Failed
    })
    .await;

    // The agent took custody, then gave up, and signed that.
    assert_eq!(status.hops.len(), 1);
    assert_eq!(status.hops[0].party, AGENT);
    assert_eq!(
        status.hops[0].state(),
        exchange_daemon::proto::HopDeliveryState::Delivered
    );
    let from_agent: Vec<_> = status
        .receipts
        .iter()
        .filter(|r| r.issuer == AGENT)
        .collect();
    assert_eq!(from_agent.len(), 2, "{status:#?}");
    assert_eq!(
        from_agent[0].disposition(),
        exchange_daemon::proto::Disposition::AcceptedForRelay
    );
    let refusal = from_agent[1];
    assert_eq!(
        refusal.disposition(),
        exchange_daemon::proto::Disposition::Rejected
    );
    assert_eq!(refusal.reason, "undeliverable");
    assert_eq!(refusal.role(), exchange_daemon::proto::HopRole::Entrusted);
    assert!(!refusal.provision_boundary);
    assert_eq!(
        status.receipts.len(),
        2,
        "nothing from the payer: {status:#?}"
    );
    // The evidence verifies offline and belongs to this envelope.
    let head = stored_head(&c, &net, &id).await;
    let verified = SignedReceipt::from_bytes(&refusal.signed)
        .unwrap()
        .verify(&net_trust(&net))
        .unwrap();
    verified.check_for(&head).unwrap();
    assert_eq!(verified.issuer().to_string(), AGENT);
    assert_eq!(
        verified.disposition(),
        &Disposition::Rejected("undeliverable".into())
    );
    // Not a provision: the payer never took it, and the agent is entrusted.
    assert_eq!(
        status.provisions[0].provision(),
        exchange_daemon::proto::ProvisionState::Pending
    );
    assert_eq!(provision_rows(&clinic), 0);

    // The agent's audit log says why, with the last error.
    let given_up: Vec<String> = audit_entries(&agent)
        .into_iter()
        .filter(|e| e.contains("undeliverable"))
        .collect();
    assert_eq!(given_up.len(), 1, "{given_up:#?}");
    assert!(
        given_up[0].contains("given up") && given_up[0].contains("transport"),
        "{}",
        given_up[0]
    );
    // Nothing left to do at either end once the receipt is home.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.node().store().pending_count().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "agent still busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.node().store().pending_count().await.unwrap(), 0);
    c.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_passes_a_signed_refusal_from_downstream_on_and_signs_none_of_its_own() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let agent = net.party("agent", AGENT);
    let payer = net.party("payer", PAYER);
    let emr = net.client("emr", "urn:local:clinic:emr");
    via_agent(&net, &clinic, &agent, &payer, &emr);
    net.configure(
        &payer,
        &[&agent],
        &[],
        "\n[limits]\nmax_envelope_bytes = 2000\n",
    );
    let c = start(&clinic).await;
    let a = start(&agent).await;
    let p = start(&payer).await;
    let mut app = client_of(&net, &clinic, &emr);
    let relay = format!("{AGENT}=entrusted");
    let id = send(
        &mut app,
        referral_start(&[&payer], &[relay.as_str()], "claims"),
        &[7u8; 10_000],
    )
    .await
    .unwrap();
    wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Failed
    })
    .await;
    // Wait for anything else the agent might send.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.node().store().pending_count().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "agent still busy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = wait_status(&mut app, &id, |s| {
        s.state() == exchange_daemon::proto::MessageState::Failed
    })
    .await;
    let rejected: Vec<_> = status
        .receipts
        .iter()
        .filter(|r| r.disposition() == exchange_daemon::proto::Disposition::Rejected)
        .collect();
    assert_eq!(rejected.len(), 1, "{status:#?}");
    assert_eq!(rejected[0].issuer, PAYER);
    assert_eq!(rejected[0].reason, "oversize");
    assert_eq!(
        status.provisions[0].provision(),
        exchange_daemon::proto::ProvisionState::Rejected
    );
    assert!(
        !audit_entries(&agent)
            .iter()
            .any(|e| e.contains("undeliverable")),
        "the agent signed a refusal of its own beside the payer's"
    );
    assert_eq!(provision_rows(&clinic), 0);
    c.shutdown().await;
    a.shutdown().await;
    p.shutdown().await;
}
