//! Peers that stall mid-stream (real TLS on loopback, real spool files):
//! a stalled transfer is abandoned after the progress timeout with its spool
//! file removed and the refusal audited, and hundreds of stalled transfers
//! hold no thread the rest of the daemon needs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use exchange_core::audit::{AuditAction, AuditEntry, AuditOutcome};
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::peer_client::PeerClient;
use exchange_daemon::proto::{DeliverRequest, ListInboxRequest, StatusRequest, deliver_request};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Starts a Deliver of `head` that sends its first `first` ciphertext bytes
/// and then nothing, keeping the stream open. Returns the call and the
/// sender that keeps the stream open.
fn stall_after(
    peer: &PeerClient<Channel>,
    head: &exchange_core::envelope::EnvelopeHead,
    first: &[u8],
) -> (
    tokio::task::JoinHandle<Result<Vec<u8>, tonic::Status>>,
    mpsc::Sender<DeliverRequest>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(DeliverRequest {
        part: Some(deliver_request::Part::Head(head.as_bytes().to_vec())),
    })
    .unwrap();
    tx.try_send(DeliverRequest {
        part: Some(deliver_request::Part::Chunk(first.to_vec())),
    })
    .unwrap();
    let mut peer = peer.clone();
    let call = tokio::spawn(async move {
        peer.deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().receipt)
    });
    (call, tx)
}

fn spool_files(party: &Party) -> usize {
    std::fs::read_dir(party.data_dir().join("spool"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_transfer_is_abandoned_its_spool_removed_and_the_refusal_audited() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    net.configure(
        &hospital,
        &[&clinic],
        &[],
        "\n[limits]\ninline_ciphertext_bytes = 1024\nprogress_timeout_seconds = 1\n",
    );
    let h = start(&hospital).await;
    let (head, ct) = seal_now(&net, &clinic, &hospital, &vec![7u8; 64 * 1024]);
    let peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let (call, _open) = stall_after(&peer, &head, &ct[..4096]);
    // Past the inline limit: the transfer is being spooled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while spool_files(&hospital) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never spooled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the stalled transfer was never abandoned")
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert_eq!(status_reason(&e), Some("stalled"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while spool_files(&hospital) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "spool file left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.shutdown().await;
    let log: Vec<AuditEntry> = audit_entries(&hospital)
        .iter()
        .map(|e| AuditEntry::from_json(e.as_bytes()).unwrap())
        .collect();
    assert!(
        log.iter().any(|e| e.action == AuditAction::Receive
            && e.outcome == AuditOutcome::Rejected
            && e.reason.as_deref() == Some("stalled")),
        "{log:?}"
    );
    assert_eq!(store_counts(&hospital).messages, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_stalled_transfers_do_not_wedge_the_daemon() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    let his = net.client("his", "urn:local:hospital:his");
    // Every transfer above 1 KiB is spooled to a file.
    net.configure(
        &hospital,
        &[&clinic, &payer],
        &[&his],
        "\n[limits]\ninline_ciphertext_bytes = 1024\n",
    );
    net.configure(&payer, &[&hospital], &[], "");
    let h = start(&hospital).await;
    let p = start(&payer).await;
    // 640 transfers, more than tokio's 512 blocking threads, over 8
    // connections, each stalled after its head and first 4 KiB.
    let (head, ct) = seal_now(&net, &clinic, &hospital, &vec![9u8; 64 * 1024]);
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let peer = peer_client(&net, &hospital, &clinic.tls_identity());
        for _ in 0..80 {
            stalled.push(stall_after(&peer, &head, &ct[..4096]));
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while spool_files(&hospital) < 600 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} transfers under way",
            spool_files(&hospital)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The daemon still answers its applications and delivers to others.
    let mut app = client_of(&net, &hospital, &his);
    let listed = tokio::time::timeout(
        Duration::from_secs(2),
        app.list_inbox(ListInboxRequest::default()),
    )
    .await
    .expect("the inbox listing did not answer within 2 s")
    .unwrap();
    assert!(listed.into_inner().items.is_empty());
    let id = tokio::time::timeout(
        Duration::from_secs(2),
        send(
            &mut app,
            referral_start(&[&payer], &[], "treatment"),
            &vec![1u8; 2 << 20],
        ),
    )
    .await
    .expect("Send did not answer within 2 s")
    .unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        wait_status(&mut app, &id, |s| {
            s.state() == exchange_daemon::proto::MessageState::Delivered
        }),
    )
    .await
    .expect("delivery to another peer did not complete within 10 s");
    assert_eq!(
        status.state(),
        exchange_daemon::proto::MessageState::Delivered
    );
    tokio::time::timeout(
        Duration::from_secs(2),
        app.status(StatusRequest {
            message_id: id.clone(),
        }),
    )
    .await
    .expect("Status did not answer within 2 s")
    .unwrap();
    drop(stalled);
    h.shutdown().await;
    p.shutdown().await;
}

/// A cheap call over `peer`'s connection: NOT_FOUND when the daemon took
/// the connection; UNAVAILABLE, CANCELLED or UNKNOWN when it closed it (the
/// call fails at the transport; which code depends on when the close is
/// seen).
async fn probe(peer: &mut PeerClient<Channel>) -> tonic::Code {
    peer.return_receipts(exchange_daemon::proto::ReturnReceiptsRequest {
        message_id: vec![0x11; 16],
        receipts: vec![],
    })
    .await
    .map_or_else(|e| e.code(), |_| tonic::Code::Ok)
}

fn closed(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_listener_caps_are_closed() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let payer = net.party("payer", PAYER);
    net.configure(
        &hospital,
        &[&clinic, &payer],
        &[],
        "\n[limits]\nmax_connections = 3\nmax_connections_per_party = 2\n",
    );
    let h = start(&hospital).await;
    let mut clinic_conns = Vec::new();
    for _ in 0..2 {
        let mut c = peer_client(&net, &hospital, &clinic.tls_identity());
        assert_eq!(probe(&mut c).await, tonic::Code::NotFound);
        clinic_conns.push(c);
    }
    // A third connection from the clinic is over its share.
    let mut third = peer_client(&net, &hospital, &clinic.tls_identity());
    let code = probe(&mut third).await;
    assert!(closed(code), "{code:?}");
    // Another party still gets in, up to the listener's total.
    let mut p1 = peer_client(&net, &hospital, &payer.tls_identity());
    assert_eq!(probe(&mut p1).await, tonic::Code::NotFound);
    let mut p2 = peer_client(&net, &hospital, &payer.tls_identity());
    assert!(closed(probe(&mut p2).await));
    // A closed connection gives its place back.
    drop(clinic_conns.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = peer_client(&net, &hospital, &clinic.tls_identity());
        match probe(&mut c).await {
            tonic::Code::NotFound => break,
            code => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place never came back: {code:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    h.shutdown().await;
}

/// A loopback TCP proxy to `target` for one connection that forwards both
/// ways until `forward` turns false, then reads and drops everything (a
/// VPN path that fails silently). Returns its address.
async fn proxy(
    target: String,
    forward: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (inbound, _) = listener.accept().await.unwrap();
        let outbound = tokio::net::TcpStream::connect(target).await.unwrap();
        let (ir, iw) = inbound.into_split();
        let (or, ow) = outbound.into_split();
        let pipe = |forward: std::sync::Arc<std::sync::atomic::AtomicBool>,
                    mut r: tokio::net::tcp::OwnedReadHalf,
                    mut w: tokio::net::tcp::OwnedWriteHalf| async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if forward.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        };
        let a = tokio::spawn(pipe(forward.clone(), ir, ow));
        let b = tokio::spawn(pipe(forward, or, iw));
        let _ = (a.await, b.await);
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_goes_silent_is_cut_by_keepalive_and_its_spool_removed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    // Keepalive, not the progress timeout, must cut it.
    net.configure(
        &hospital,
        &[&clinic],
        &[],
        "\n[limits]\ninline_ciphertext_bytes = 1024\nprogress_timeout_seconds = 600\n\
         keepalive_interval_seconds = 1\nkeepalive_timeout_seconds = 1\n",
    );
    let h = start(&hospital).await;
    let forward = Arc::new(AtomicBool::new(true));
    let via = proxy(hospital.peer_addr(), forward.clone()).await;
    exchange_daemon::tls::install_provider();
    let trust = exchange_core::trust::TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let config = exchange_daemon::tls::client_config(
        Arc::new(trust),
        hospital.party(),
        Some(&clinic.tls_identity()),
        exchange_daemon::tls::versions(false),
    )
    .unwrap();
    let peer = PeerClient::new(
        exchange_daemon::tls::channel(&via.to_string(), config, Duration::from_secs(5)).unwrap(),
    );
    let (head, ct) = seal_now(&net, &clinic, &hospital, &vec![3u8; 64 * 1024]);
    let (_call, _open) = stall_after(&peer, &head, &ct[..4096]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while spool_files(&hospital) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never spooled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The path goes silent: nothing reaches either end any more.
    forward.store(false, Ordering::SeqCst);
    let cut = tokio::time::Instant::now();
    let deadline = cut + Duration::from_secs(10);
    while spool_files(&hospital) > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent connection was not cut: its spool file is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("cut after {:?}", cut.elapsed());
    h.shutdown().await;
    assert_eq!(store_counts(&hospital).messages, 0);
}
