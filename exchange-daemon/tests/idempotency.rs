//! Idempotent Send on real daemons (real TLS on loopback, real SQLite): an
//! application that retries after a lost answer gets its original message
//! back, and the recipient one inbox item.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use exchange_core::MessageId;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::ListInboxRequest;
use tonic::Code;

fn keyed(to: &Party, key: &str, title: &str) -> exchange_daemon::proto::SendStart {
    let mut s = referral_start(&[to], &[], "treatment");
    s.idempotency_key = key.into();
    s.title = title.into();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_retried_after_a_lost_answer_is_stored_once() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let billing = net.client("billing", "urn:local:clinic:billing");
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&clinic, &[&hospital], &[&emr, &billing], "");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let mut app = client_of(&net, &clinic, &emr);
    let referral = b"referral letter".repeat(50_000);

    // The first Send commits; its caller goes away before reading the
    // answer (the connection dropped after the commit).
    let mut first = client_of(&net, &clinic, &emr);
    let start_msg = keyed(&hospital, "emr-0001", "紹介状");
    let body = referral.clone();
    let call = tokio::spawn(async move { send(&mut first, start_msg, &body).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store_counts(&clinic).messages == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    let stored: Vec<MessageId> = read_store(&clinic)
        .messages()
        .map(|m| MessageId::from_slice(&m.unwrap().message_id).unwrap())
        .collect();
    assert_eq!(stored.len(), 1);

    // The application retries, twice, with the same key and request.
    for _ in 0..2 {
        let id = send(&mut app, keyed(&hospital, "emr-0001", "紹介状"), &referral)
            .await
            .unwrap();
        assert_eq!(MessageId::from_slice(&id).unwrap(), stored[0]);
    }
    assert_eq!(store_counts(&clinic).messages, 1);

    // The same key for another request is refused, and stores nothing:
    // other content, or the same content with other parameters.
    let other_title = keyed(&hospital, "emr-0001", "診療情報提供書");
    let other_body = keyed(&hospital, "emr-0001", "紹介状");
    for (start_msg, body) in [
        (other_title, referral.as_slice()),
        (other_body, b"another letter".as_slice()),
    ] {
        let e = send(&mut app, start_msg, body).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert_eq!(status_reason(&e), Some("idempotency-conflict"));
    }
    assert_eq!(store_counts(&clinic).messages, 1);
    // Keys are per client: another application's "emr-0001" is its own.
    let mut other = client_of(&net, &clinic, &billing);
    let id = send(
        &mut other,
        keyed(&hospital, "emr-0001", "紹介状"),
        &referral,
    )
    .await
    .unwrap();
    assert_ne!(MessageId::from_slice(&id).unwrap(), stored[0]);
    // A claims batch: several Sends in a row, each its own key.
    let mut batch = Vec::new();
    for i in 0..5 {
        let id = send(
            &mut app,
            keyed(&hospital, &format!("claim-{i}"), "レセプト"),
            format!("claim {i}").as_bytes(),
        )
        .await
        .unwrap();
        batch.push(id);
    }
    batch.sort();
    batch.dedup();
    assert_eq!(batch.len(), 5);
    // A key that is not 1-128 printable ASCII characters is refused.
    for bad in ["x".repeat(129), "with space".to_owned(), "改行".to_owned()] {
        let e = send(&mut app, keyed(&hospital, &bad, "t"), b"x")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
    }

    // The recipient holds each message once: 1 + 1 + 5.
    wait_status(&mut app, stored[0].as_bytes(), |s| {
        s.state() == exchange_daemon::proto::MessageState::Delivered
    })
    .await;
    let mut his_app = client_of(&net, &hospital, &his);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let inbox = loop {
        let inbox = his_app
            .list_inbox(ListInboxRequest::default())
            .await
            .unwrap()
            .into_inner()
            .items;
        if inbox.len() >= 7 || tokio::time::Instant::now() > deadline {
            break inbox;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(inbox.len(), 7, "{inbox:?}");
    assert_eq!(
        inbox
            .iter()
            .filter(|i| i.message_id == stored[0].as_bytes())
            .count(),
        1
    );
    c.shutdown().await;
    h.shutdown().await;
}
