//! The client API's contract as proto/exchange/v1/daemon.proto states it:
//! the piece limit of Send and Deliver streams (INVALID_ARGUMENT, reason
//! piece-too-large, on both listeners, on both sides of the limit), the
//! enums of MessageStatus, and the bare form of Receipt.signed.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use common::*;
use exchange_core::receipt::SignedReceipt;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::{
    Disposition, HopDeliveryState, HopRole, MessageState, ProvisionState, SendRequest, send_request,
};

/// Sends a SendStart and then `pieces` as they are (one gRPC message each).
async fn send_pieces(
    client: &mut exchange_daemon::proto::client_client::ClientClient<tonic::transport::Channel>,
    to: &Party,
    pieces: Vec<Vec<u8>>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut msgs = vec![SendRequest {
        part: Some(send_request::Part::Start(referral_start(
            &[to],
            &[],
            "treatment",
        ))),
    }];
    msgs.extend(pieces.into_iter().map(|p| SendRequest {
        part: Some(send_request::Part::Chunk(p)),
    }));
    client
        .send(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner().message_id)
}

fn assert_piece_too_large(err: &tonic::Status) {
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(status_reason(err), Some("piece-too-large"), "{err:?}");
    assert!(
        err.message().contains("limits.max_message_bytes"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5_mib_piece_is_invalid_argument_not_unavailable_on_both_listeners() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;

    // Client listener: a Send whose one piece is 5 MiB (the default limit is 4 MiB).
    let mut app = client_of(&net, &clinic, &emr);
    let err = send_pieces(&mut app, &hospital, vec![vec![7u8; 5 << 20]])
        .await
        .unwrap_err();
    assert_piece_too_large(&err);
    assert_nothing_stored(&c, &clinic).await;

    // Peer listener: a Deliver whose ciphertext comes as one 5 MiB piece.
    let payload = vec![3u8; 5 << 20];
    let (head, ct) = seal_now(&net, &clinic, &hospital, &payload);
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let msgs = vec![
        exchange_daemon::proto::DeliverRequest {
            part: Some(exchange_daemon::proto::deliver_request::Part::Head(
                head.as_bytes().to_vec(),
            )),
        },
        exchange_daemon::proto::DeliverRequest {
            part: Some(exchange_daemon::proto::deliver_request::Part::Chunk(
                ct.clone(),
            )),
        },
    ];
    let err = peer.deliver(tokio_stream::iter(msgs)).await.unwrap_err();
    assert_piece_too_large(&err);
    assert_nothing_stored(&h, &hospital).await;
    // The same envelope in 64 KiB pieces is delivered.
    deliver(&mut peer, &head, &ct).await.unwrap();
    assert_eq!(h.node().store().inbox(true).await.unwrap().len(), 1);

    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_piece_limit_is_a_setting_and_holds_on_both_sides() {
    const LIMIT: usize = 2 << 20;
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    net.configure(
        &clinic,
        &[&hospital],
        &[&emr],
        &format!("\n[limits]\nmax_message_bytes = {LIMIT}\n"),
    );
    net.configure(&hospital, &[&clinic], &[], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);

    // One byte over: a SendRequest carries 1 tag byte and a 3-byte varint
    // length before a piece of this size, so LIMIT - 4 bytes is the
    // largest piece that fits and LIMIT - 3 is one byte over.
    let err = send_pieces(&mut app, &hospital, vec![vec![1u8; LIMIT - 3]])
        .await
        .unwrap_err();
    assert_piece_too_large(&err);
    assert!(err.message().contains(&LIMIT.to_string()), "{err:?}");
    assert_nothing_stored(&c, &clinic).await;

    // At the limit: accepted, sealed and delivered.
    let id = send_pieces(
        &mut app,
        &hospital,
        vec![vec![1u8; LIMIT - 4], vec![2u8; 10]],
    )
    .await
    .expect("a piece at the limit is accepted");
    let status = wait_status(&mut app, &id, |s| s.state() == MessageState::Delivered).await;
    assert_eq!(status.hops[0].state(), HopDeliveryState::Delivered);

    // A limit below what a head needs is refused at start.
    net.configure(
        &clinic,
        &[&hospital],
        &[&emr],
        "\n[limits]\nmax_message_bytes = 1048576\n",
    );
    let e = exchange_daemon::Config::load(&clinic.config_path()).unwrap_err();
    assert!(e.to_string().contains("limits.max_message_bytes"), "{e}");

    c.shutdown().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_carries_enums_and_receipt_signed_is_the_bare_receipt() {
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
        b"enum check",
    )
    .await
    .unwrap();
    let status = wait_status(&mut app, &id, |s| s.state() == MessageState::Delivered).await;
    // The wire values are the enums' numbers, not strings.
    assert_eq!(status.state, MessageState::Delivered as i32);
    assert_eq!(status.hops[0].state, HopDeliveryState::Delivered as i32);
    let r = &status.receipts[0];
    assert_eq!(r.disposition, Disposition::Delivered as i32);
    assert_eq!(r.role, HopRole::ThirdParty as i32);
    assert_eq!(
        status.provisions[0].provision,
        ProvisionState::Passed as i32
    );
    assert_eq!(status.provisions[0].receipt, Some(0));

    // Receipt.signed is the bare SignedReceipt: it parses as the network
    // form, not as the file form, and verifies with the CA alone.
    let bare = SignedReceipt::from_bytes(&r.signed).unwrap();
    assert!(SignedReceipt::from_file(&r.signed).is_err());
    let verified = bare.verify(&net_trust(&net)).unwrap();
    assert_eq!(verified.issuer().as_str(), HOSPITAL);
    let either = SignedReceipt::from_file_or_bytes(&bare.to_file()).unwrap();
    assert_eq!(either.to_bytes(), r.signed);
    assert_eq!(
        SignedReceipt::from_file_or_bytes(&r.signed)
            .unwrap()
            .to_bytes(),
        r.signed
    );
    // Garbage is neither form.
    assert!(SignedReceipt::from_file_or_bytes(b"EXRCT\0\0\x09rest").is_err());
    assert!(SignedReceipt::from_file_or_bytes(b"not a receipt").is_err());

    c.shutdown().await;
    h.shutdown().await;
}
