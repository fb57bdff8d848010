//! Rotating a recipient's encryption key (docs/operations.md §2.2): messages
//! stored under the old key stay readable while the old pair is listed in
//! `[[identity.previous_encryption]]`; without it they cannot be opened, but
//! nothing is lost, and they open again once the old pair is back.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use exchange_core::envelope::EnvelopeHead;
use exchange_core::identity::Certificate;
use exchange_core::trust::TrustStore;
use exchange_daemon::Daemon;
use exchange_daemon::error::status_reason;
use exchange_daemon::proto::client_client::ClientClient;
use exchange_daemon::proto::{FetchHeader, FetchRequest, ListInboxRequest, fetch_response};
use tonic::transport::Channel;

/// Seals `payload` from `sender` to the encryption certificate in `cert`.
fn seal_to_cert(net: &Net, sender: &Party, cert: &Path, payload: &[u8]) -> (EnvelopeHead, Vec<u8>) {
    let trust = TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let cert = Certificate::from_pem(&std::fs::read(cert).unwrap())
        .unwrap()
        .remove(0);
    let key = trust.verify_encryption(&cert, SystemTime::now()).unwrap();
    let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
    let identity = sender.identity();
    let mut sealer = exchange_core::envelope::SealerBuilder::new(&identity, "application/pdf")
        .recipient(key, exchange_core::route::HopRole::ThirdParty)
        .purpose("treatment")
        .lifetime(Duration::from_secs(3600))
        .start(SystemTime::now(), &mut rng)
        .unwrap();
    let mut ct = Vec::new();
    sealer.update(payload, &mut ct);
    let head = sealer.finish(&mut ct);
    (head, ct)
}

fn id_of(head: &EnvelopeHead) -> Vec<u8> {
    head.header_unverified()
        .unwrap()
        .message_id
        .as_bytes()
        .to_vec()
}

/// Fetches an inbox item: its header and the whole plaintext.
async fn fetch(
    client: &mut ClientClient<Channel>,
    id: &[u8],
) -> Result<(FetchHeader, Vec<u8>), tonic::Status> {
    let mut stream = client
        .fetch(FetchRequest {
            message_id: id.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut header = None;
    let mut data = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.part {
            Some(fetch_response::Part::Header(h)) => header = Some(h),
            Some(fetch_response::Part::Chunk(c)) => data.extend_from_slice(&c),
            None => {}
        }
    }
    Ok((header.expect("no header"), data))
}

async fn inbox_ids(client: &mut ClientClient<Channel>) -> Vec<Vec<u8>> {
    let mut ids: Vec<Vec<u8>> = client
        .list_inbox(ListInboxRequest {
            include_acked: true,
            ..ListInboxRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .map(|i| i.message_id)
        .collect();
    ids.sort();
    ids
}

/// The hospital's configuration with `current` as its encryption pair and
/// `previous` listed as earlier pairs (file stems in its directory).
fn configure_keys(
    net: &Net,
    hospital: &Party,
    clinic: &Party,
    app: &LocalClient,
    current: &str,
    previous: &[&str],
) {
    net.configure(hospital, &[clinic], &[app], "");
    let text = std::fs::read_to_string(hospital.config_path()).unwrap();
    let mut keys = String::new();
    for p in previous {
        keys.push_str(&format!(
            "\n[[identity.previous_encryption]]\ncert = \"{p}.pem\"\nkey = \"{p}.key.pem\"\n"
        ));
    }
    let text = text
        .replace(
            "encryption_cert = \"encryption.pem\"\nencryption_key = \"encryption.key.pem\"\n",
            &format!(
                "encryption_cert = \"{current}.pem\"\nencryption_key = \"{current}.key.pem\"\n{keys}"
            ),
        )
        .replacen("\n[trust]", "\n\n[trust]", 1);
    assert!(text.contains(&format!("encryption_cert = \"{current}.pem\"")));
    std::fs::write(hospital.config_path(), text).unwrap();
}

async fn start_checked(hospital: &Party) -> Daemon {
    Daemon::start(hospital.config()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_messages_stay_readable_after_an_encryption_key_rotation() {
    let net = Net::new();
    let clinic = net.party("clinic", CLINIC);
    let hospital = net.party("hospital", HOSPITAL);
    let app = net.client("his", "urn:local:hospital:his");
    let key1 = hospital.file("encryption.pem");

    // Key 1: three messages (one large enough for a blob file) stored and readable.
    net.configure(&hospital, &[&clinic], &[&app], "");
    let daemon = start_checked(&hospital).await;
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    let mut old = Vec::new();
    for (i, len) in [1_000usize, 70_000, 2 * 1024 * 1024 + 5]
        .into_iter()
        .enumerate()
    {
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
        let (head, ct) = seal_to_cert(&net, &clinic, &key1, &payload);
        deliver(&mut peer, &head, &ct).await.unwrap();
        old.push((id_of(&head), payload));
    }
    let mut client = client_of(&net, &hospital, &app);
    for (id, payload) in &old {
        assert_eq!(&fetch(&mut client, id).await.unwrap().1, payload);
    }
    let before = store_counts(&hospital);
    assert_eq!(before.messages, 3);
    assert_eq!(before.blob_files, 1);
    daemon.shutdown().await;

    // Rotate: a new encryption pair (key 2) for the same party from the CA.
    let creds = net
        .ca
        .issue_party(&hospital.party(), "hospital", validity(net.now))
        .unwrap();
    std::fs::write(
        hospital.file("encryption-2.pem"),
        &creds.encryption.cert_pem,
    )
    .unwrap();
    std::fs::write(
        hospital.file("encryption-2.key.pem"),
        creds.encryption.key_pem.as_bytes(),
    )
    .unwrap();
    let key2 = hospital.file("encryption-2.pem");
    assert_ne!(std::fs::read(&key1).unwrap(), std::fs::read(&key2).unwrap());

    // Key 2 current, key 1 previous: old messages open, new ones sealed to key 2 too.
    configure_keys(
        &net,
        &hospital,
        &clinic,
        &app,
        "encryption-2",
        &["encryption"],
    );
    let daemon = start_checked(&hospital).await;
    let mut client = client_of(&net, &hospital, &app);
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    for (id, payload) in &old {
        let (header, data) = fetch(&mut client, id).await.unwrap();
        assert_eq!(&data, payload);
        assert_eq!(header.sender, CLINIC);
    }
    let mut new = Vec::new();
    for len in [500usize, 300_000] {
        let payload: Vec<u8> = (0..len).map(|b| (b % 251) as u8).collect();
        let (head, ct) = seal_to_cert(&net, &clinic, &key2, &payload);
        deliver(&mut peer, &head, &ct).await.unwrap();
        new.push((id_of(&head), payload));
    }
    for (id, payload) in &new {
        assert_eq!(&fetch(&mut client, id).await.unwrap().1, payload);
    }
    // A sender not yet given the new certificate still reaches us.
    let late: Vec<u8> = b"sealed to the old certificate after the rotation".to_vec();
    let (head, ct) = seal_to_cert(&net, &clinic, &key1, &late);
    deliver(&mut peer, &head, &ct).await.unwrap();
    old.push((id_of(&head), late));
    let all_ids = inbox_ids(&mut client).await;
    assert_eq!(all_ids.len(), old.len() + new.len());
    daemon.shutdown().await;
    let with_both = store_counts(&hospital);

    // Key 1 dropped from the configuration: old messages cannot be opened,
    // with a specific reason, and nothing is lost.
    configure_keys(&net, &hospital, &clinic, &app, "encryption-2", &[]);
    let daemon = start_checked(&hospital).await;
    let mut client = client_of(&net, &hospital, &app);
    let mut peer = peer_client(&net, &hospital, &clinic.tls_identity());
    for (id, _) in &old {
        let status = fetch(&mut client, id).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status_reason(&status),
            Some("not-a-recipient"),
            "{status:?}"
        );
    }
    for (id, payload) in &new {
        assert_eq!(&fetch(&mut client, id).await.unwrap().1, payload);
    }
    // A new envelope sealed to key 1 is refused at the door, and not stored.
    let (head, ct) = seal_to_cert(&net, &clinic, &key1, b"too late for key 1");
    let refused = deliver(&mut peer, &head, &ct).await.unwrap_err();
    assert_eq!(
        status_reason(&refused),
        Some("not-a-recipient"),
        "{refused:?}"
    );
    assert_eq!(inbox_ids(&mut client).await, all_ids);
    daemon.shutdown().await;
    assert_eq!(store_counts(&hospital), with_both);

    // Key 1 back: every old message opens again, byte for byte.
    configure_keys(
        &net,
        &hospital,
        &clinic,
        &app,
        "encryption-2",
        &["encryption"],
    );
    let daemon = start_checked(&hospital).await;
    let mut client = client_of(&net, &hospital, &app);
    for (id, payload) in old.iter().chain(&new) {
        assert_eq!(&fetch(&mut client, id).await.unwrap().1, payload);
    }
    daemon.shutdown().await;
    assert_eq!(store_counts(&hospital), with_both);
}
