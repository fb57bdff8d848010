//! ListInbox in pages: keyset pages over real daemons and a real store,
//! every item exactly once and in order; a token the daemon did not issue
//! is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::ListInboxRequest;

fn page(size: u32, token: &str) -> ListInboxRequest {
    ListInboxRequest {
        include_acked: true,
        page_size: size,
        page_token: token.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_inbox_is_listed_in_pages_each_item_once_in_order() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let emr = net.client("emr", "urn:local:clinic:emr");
    let his = net.client("his", "urn:local:hospital:his");
    // Sees claims only: its pages skip everything else.
    let rece = net.client("rece", "urn:local:hospital:rece");
    net.configure(&clinic, &[&hospital], &[&emr], "");
    net.configure(
        &hospital,
        &[&clinic],
        &[&his],
        &client_block("rece", &rece, &[], &[], &["claims"]),
    );
    let c = start(&clinic).await;
    let h = start(&hospital).await;
    let app = client_of(&net, &clinic, &emr);
    let mut tasks = Vec::new();
    for i in 0..250u32 {
        let mut app = app.clone();
        let to = hospital.clone();
        // Five of them are claims, spread out.
        let purpose = if i % 50 == 7 { "claims" } else { "treatment" };
        tasks.push(tokio::spawn(async move {
            send(
                &mut app,
                referral_start(&[&to], &[], purpose),
                &i.to_be_bytes(),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while c.node().store().pending_count().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not all delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = h.node().store().inbox(true).await.unwrap();
    let expected: Vec<Vec<u8>> = stored.iter().map(|m| m.id.as_bytes().to_vec()).collect();
    assert_eq!(expected.len(), 250);
    let claims: Vec<Vec<u8>> = stored
        .iter()
        .filter(|m| m.purpose == "claims")
        .map(|m| m.id.as_bytes().to_vec())
        .collect();
    assert_eq!(claims.len(), 5);

    let mut reader = client_of(&net, &hospital, &his);
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let r = reader
            .list_inbox(page(100, &token))
            .await
            .unwrap()
            .into_inner();
        pages.push(r.items);
        assert!(pages.len() <= 3, "more pages than items allow");
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![100, 100, 50]
    );
    let listed: Vec<Vec<u8>> = pages.concat().into_iter().map(|i| i.message_id).collect();
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), 250);
    assert_eq!(listed, expected);

    // A client that may read claims only: full pages of what it may read.
    let mut rece_app = client_of(&net, &hospital, &rece);
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let r = rece_app
            .list_inbox(page(2, &token))
            .await
            .unwrap()
            .into_inner();
        pages.push(
            r.items
                .into_iter()
                .map(|i| i.message_id)
                .collect::<Vec<_>>(),
        );
        assert!(pages.len() <= 3, "more pages than items allow");
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    assert_eq!(pages.concat(), claims);

    // No page size: the default (100); too large a one: the maximum
    // (1000), here everything at once.
    let r = reader.list_inbox(page(0, "")).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 100);
    assert!(!r.next_page_token.is_empty());
    let r = reader
        .list_inbox(page(u32::MAX, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), 250);
    assert!(r.next_page_token.is_empty());

    // Tokens the daemon did not issue.
    let good = reader
        .list_inbox(page(100, ""))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let mut wrong_version = good.clone();
    wrong_version.replace_range(0..2, "ff");
    for bad in [
        "not a token".to_owned(),
        "01".to_owned(),
        good[..good.len() - 2].to_owned(),
        format!("{good}00"),
        wrong_version,
    ] {
        let e = reader.list_inbox(page(100, &bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert_eq!(status_reason(&e), Some("bad-page-token"), "{bad}: {e:?}");
    }
    c.shutdown().await;
    h.shutdown().await;
}
