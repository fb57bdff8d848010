//! Server reflection as stock clients use it: both grpc.reflection.v1 and
//! v1alpha (the version Python's grpcio-reflection and older grpcurl speak),
//! listing services on both listeners over real mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::time::Duration;

use common::*;
use exchange_daemon::tls::TlsIdentity;
use tonic::transport::Channel;

fn channel(net: &Net, server: &Party, addr: String, id: TlsIdentity) -> Channel {
    let trust = exchange_core::trust::TrustStore::builder()
        .anchors_pem(&std::fs::read(net.path("ca.pem")).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let config = exchange_daemon::tls::client_config(
        std::sync::Arc::new(trust),
        server.party(),
        Some(&id),
        exchange_daemon::tls::versions(false),
    )
    .unwrap();
    exchange_daemon::tls::channel(&addr, config, Duration::from_secs(5)).unwrap()
}

/// Lists services with a v1alpha reflection client.
async fn list_v1alpha(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner();
    let response = responses.message().await.unwrap().expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Lists services with a v1 reflection client.
async fn list_v1(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("v1 reflection is served")
        .into_inner();
    let response = responses.message().await.unwrap().expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1alpha_and_v1_list_services_on_both_listeners() {
    let net = Net::new();
    let hospital = net.party("hospital", HOSPITAL);
    let clinic = net.party("clinic", CLINIC);
    let his = net.client("his", "urn:local:hospital:his");
    net.configure(&hospital, &[&clinic], &[&his], "");
    let h = start(&hospital).await;
    let local = || {
        TlsIdentity::from_pem(
            &std::fs::read(&his.cert).unwrap(),
            &std::fs::read(&his.key).unwrap(),
        )
        .unwrap()
    };
    for (listener, addr, id) in [
        ("peer", hospital.peer_addr(), clinic.tls_identity()),
        ("client", hospital.client_addr(), local()),
    ] {
        let alpha = list_v1alpha(channel(&net, &hospital, addr.clone(), id)).await;
        let id = if listener == "peer" {
            clinic.tls_identity()
        } else {
            local()
        };
        let v1 = list_v1(channel(&net, &hospital, addr, id)).await;
        for want in [
            "exchange.v1.Peer",
            "exchange.v1.Client",
            "grpc.health.v1.Health",
        ] {
            assert!(
                alpha.iter().any(|s| s == want),
                "{listener} listener, v1alpha: {want} missing from {alpha:?}"
            );
            assert!(
                v1.iter().any(|s| s == want),
                "{listener} listener, v1: {want} missing from {v1:?}"
            );
        }
    }
    h.shutdown().await;
}
