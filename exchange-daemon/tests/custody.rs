//! What a custody receipt (DELIVERED, ACCEPTED_FOR_RELAY) and a PROCESSED
//! receipt stand for, on real daemons over mutual TLS with real stores:
//!
//! * DELIVERED is signed only after every payload chunk has been decrypted
//!   and authenticated with our key: a sender whose chunks do not open gets
//!   a REJECTED receipt and nothing is stored;
//! * the signed time of a custody receipt is when the whole envelope was
//!   received, verified and written, not when the transfer started;
//! * PROCESSED is signed only for an inbox item a local client fetched
//!   completely.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use exchange_core::envelope::EnvelopeHead;
use exchange_core::receipt::{Disposition, SignedReceipt, VerifiedReceipt};
use exchange_core::route::{Hop, HopRole};
use exchange_core::suite::sha256;
use exchange_daemon::error::{RECEIPT_METADATA, status_reason};
use exchange_daemon::proto::{AckRequest, DeliverRequest, FetchRequest, deliver_request};
use tokio_stream::StreamExt;
use tonic::Code;

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "expected exactly one occurrence");
    hits[0]
}

/// What a malicious sender can make: its own envelope with one ciphertext
/// byte changed, the header's ciphertext digest set to the changed stream's
/// and the header signed again with the sender's own identity key. The head
/// verifies and the stream matches its signed digest; only decrypting shows
/// that a chunk is not what the content key sealed.
fn garbage_under_a_valid_signature(
    sender: &Party,
    head: &EnvelopeHead,
    ct: &[u8],
) -> (EnvelopeHead, Vec<u8>) {
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::DecodePrivateKey;

    let mut garbage = ct.to_vec();
    let at = garbage.len() / 2;
    garbage[at] ^= 0x01;
    let old_digest = head.header_unverified().unwrap().ciphertext_sha256;
    let mut header = head.header_bytes().to_vec();
    let d = find(&header, &old_digest);
    header[d..d + 32].copy_from_slice(&sha256(&garbage));

    let pem = std::fs::read_to_string(sender.file("identity.key.pem")).unwrap();
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pem).unwrap();
    let mut input = b"exchange/v1 header\0".to_vec();
    input.extend_from_slice(&header);
    let sig: p256::ecdsa::Signature = key.sign(&input);
    let sig = sig.normalize_s().to_bytes();

    let mut bytes = head.as_bytes().to_vec();
    let h = find(&bytes, head.header_bytes());
    bytes[h..h + header.len()].copy_from_slice(&header);
    let s = find(&bytes, head.signature());
    bytes[s..s + sig.len()].copy_from_slice(&sig);
    (EnvelopeHead::decode(&bytes).unwrap(), garbage)
}

fn receipt_of(net: &Net, bytes: &[u8]) -> VerifiedReceipt {
    SignedReceipt::from_bytes(bytes)
        .unwrap()
        .verify(&net_trust(net))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_do_not_decrypt_get_a_rejected_receipt_not_delivered() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    // Two sizes: kept in the row, and spooled to a file while it streams in.
    net.configure(
        &hospital,
        &[&clinic],
        &[],
        "\n[limits]\ninline_ciphertext_bytes = 100000\n",
    );
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());

    for len in [3 * 1024, 300 * 1024] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let (head, ct) = seal_now(&net, &clinic, &hospital, &payload);
        let (forged, garbage) = garbage_under_a_valid_signature(&clinic, &head, &ct);
        // The forgery is authentic as far as signature and digest go.
        let verified = forged.verify(&net_trust(&net), SystemTime::now()).unwrap();
        let mut v = verified.ciphertext_verifier();
        v.update(&garbage).unwrap();
        v.finish().unwrap();

        let e = deliver(&mut peer, &forged, &garbage).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(status_reason(&e), Some("decryption-failed"), "{e:?}");
        let rejected = e
            .metadata()
            .get_bin(RECEIPT_METADATA)
            .expect("a signed REJECTED receipt")
            .to_bytes()
            .unwrap();
        let rejected = receipt_of(&net, &rejected);
        assert_eq!(
            rejected.disposition(),
            &Disposition::Rejected("decryption-failed".into())
        );
        assert_eq!(rejected.issuer(), &hospital.party());
        assert_nothing_stored(&h, &hospital).await;
    }

    // The sender's honest envelope is delivered.
    let (head, ct) = seal_now(&net, &clinic, &hospital, &[7u8; 300 * 1024]);
    let delivered = receipt_of(&net, &deliver(&mut peer, &head, &ct).await.unwrap());
    assert_eq!(delivered.disposition(), &Disposition::Delivered);
    assert_eq!(store_counts(&hospital).messages, 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_is_refused_until_a_fetch_completed() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let mut app = client_of(&net, &hospital, &his);

    let payload: Vec<u8> = (0..8 << 20).map(|i| (i % 253) as u8).collect();
    let (head, ct) = seal_now(&net, &clinic, &hospital, &payload);
    let id = head.header_unverified().unwrap().message_id;
    deliver(&mut peer, &head, &ct).await.unwrap();
    let ack = AckRequest {
        message_id: id.as_bytes().to_vec(),
        ..Default::default()
    };
    let fetch = FetchRequest {
        message_id: id.as_bytes().to_vec(),
        ..Default::default()
    };

    // Never fetched.
    let e = app.ack(ack.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(status_reason(&e), Some("not-fetched"), "{e:?}");

    // A fetch abandoned after its first message is not a completed fetch.
    let mut partial = app.fetch(fetch.clone()).await.unwrap().into_inner();
    partial.next().await.unwrap().unwrap();
    drop(partial);
    let e = app.ack(ack.clone()).await.unwrap_err();
    assert_eq!(status_reason(&e), Some("not-fetched"), "{e:?}");
    assert!(
        h.node()
            .store()
            .messages_by_id(id)
            .await
            .unwrap()
            .remove(0)
            .acked_ms
            .is_none()
    );

    // Fetched to the end: the ack is signed.
    let mut stream = app.fetch(fetch).await.unwrap().into_inner();
    let mut got = 0usize;
    while let Some(part) = stream.next().await {
        if let Some(exchange_daemon::proto::fetch_response::Part::Chunk(c)) = part.unwrap().part {
            got += c.len();
        }
    }
    assert_eq!(got, payload.len());
    let r = app.ack(ack).await.unwrap().into_inner().receipt;
    assert_eq!(receipt_of(&net, &r).disposition(), &Disposition::Processed);
    h.shutdown().await;
}

/// Delivers `head` and `ct` over the peer service, holding the stream open
/// for `pause` after the head and the first slice; returns the receipt and
/// the moment just before the last slice was handed to the stream.
async fn slow_deliver(
    net: &Net,
    to: &Party,
    from: &Party,
    head: &EnvelopeHead,
    ct: &[u8],
    pause: Duration,
) -> (Vec<u8>, SystemTime) {
    let mut peer = peer_client(net, to, &from.tls_identity());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let slices: Vec<Vec<u8>> = ct.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
    let head_bytes = head.as_bytes().to_vec();
    let feeder = tokio::spawn(async move {
        let part = |p| DeliverRequest { part: Some(p) };
        tx.send(part(deliver_request::Part::Head(head_bytes)))
            .await
            .unwrap();
        let (first, rest) = slices.split_first().unwrap();
        tx.send(part(deliver_request::Part::Chunk(first.clone())))
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
        let last_sent = SystemTime::now();
        for s in rest {
            tx.send(part(deliver_request::Part::Chunk(s.clone())))
                .await
                .unwrap();
        }
        last_sent
    });
    let receipt = peer
        .deliver(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner()
        .receipt;
    (receipt, feeder.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custody_receipt_is_dated_when_the_whole_envelope_was_stored() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let agent = net.party("agent", AGENT);
    // A blob file for the large envelope: written and fsynced before the receipt.
    let limits = "\n[limits]\ninline_ciphertext_bytes = 1024\n";
    net.configure(&hospital, &[&clinic], &[], limits);
    net.configure(&agent, &[&clinic, &hospital], &[], limits);
    let h = start(&hospital).await;
    let a = start(&agent).await;
    let pause = Duration::from_secs(2);

    // Final recipient: DELIVERED, and the 確認記録 carries the same time.
    let payload = vec![5u8; 200 * 1024];
    let before = SystemTime::now();
    let (head, ct) = seal_now(&net, &clinic, &hospital, &payload);
    let (receipt, last_sent) = slow_deliver(&net, &hospital, &clinic, &head, &ct, pause).await;
    let r = receipt_of(&net, &receipt);
    assert_eq!(r.disposition(), &Disposition::Delivered);
    assert!(last_sent >= before + pause);
    assert!(
        unix_ms(r.issued()) >= unix_ms(last_sent),
        "DELIVERED dated {} ms, the last slice was sent at {} ms",
        unix_ms(r.issued()),
        unix_ms(last_sent)
    );
    let stored = h
        .node()
        .store()
        .messages_by_id(head.header_unverified().unwrap().message_id)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(stored.received_ms, unix_ms(r.issued()));

    // Relay: ACCEPTED_FOR_RELAY (the hospital behind it is running).
    let identity = clinic.identity();
    let trust = net_trust(&net);
    let cert = exchange_core::identity::Certificate::from_pem(
        &std::fs::read(hospital.file("encryption.pem")).unwrap(),
    )
    .unwrap()
    .remove(0);
    let key = trust.verify_encryption(&cert, SystemTime::now()).unwrap();
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let mut sealer = exchange_core::envelope::SealerBuilder::new(&identity, "application/pdf")
        .recipient(key, HopRole::ThirdParty)
        .relay(Hop {
            party: agent.party(),
            role: HopRole::Entrusted,
        })
        .purpose("claims")
        .lifetime(Duration::from_secs(3600))
        .start(SystemTime::now(), &mut rng)
        .unwrap();
    let mut ct = Vec::new();
    sealer.update(&payload, &mut ct);
    let head = sealer.finish(&mut ct);
    let (receipt, last_sent) = slow_deliver(&net, &agent, &clinic, &head, &ct, pause).await;
    let r = receipt_of(&net, &receipt);
    assert_eq!(r.disposition(), &Disposition::AcceptedForRelay);
    assert!(
        unix_ms(r.issued()) >= unix_ms(last_sent),
        "ACCEPTED_FOR_RELAY dated {} ms, the last slice was sent at {} ms",
        unix_ms(r.issued()),
        unix_ms(last_sent)
    );
    a.shutdown().await;
    h.shutdown().await;
}
