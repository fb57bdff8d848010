//! A client of a daemon's client service, for local applications and the
//! `exchange` CLI: mutual TLS with a local client certificate, the daemon's
//! certificate validated and pinned to its facility's party URI, or (when
//! the client listener presents a TLS server certificate) checked for the
//! host name dialled, as stock gRPC clients check it.

use std::sync::Arc;
use std::time::Duration;

use exchange_core::PartyUri;
use exchange_core::trust::TrustStore;
use tonic::transport::Channel;

use crate::error::Error;
use crate::proto::client_client::ClientClient;
use crate::tls::{self, TlsIdentity};

/// How to reach and trust a daemon.
#[derive(Debug)]
pub struct ClientSettings {
    /// `host:port` of the daemon's client listener.
    pub address: String,
    /// The facility party URI the daemon's certificate must name (when it
    /// presents its identity certificate rather than a server certificate).
    pub server_party: PartyUri,
    /// Trust anchors (PEM) for the daemon's certificate.
    pub anchors_pem: Vec<u8>,
    /// CRLs (PEM) to check it against, if any.
    pub crls_pem: Option<Vec<u8>>,
    /// Our client certificate and key.
    pub identity: TlsIdentity,
    /// Allow TLS 1.2 (a daemon on a closed network that permits it).
    pub allow_tls12: bool,
}

/// Connects (lazily: the first call dials) to a daemon's client service.
pub fn connect(settings: &ClientSettings) -> Result<ClientClient<Channel>, Error> {
    tls::install_provider();
    let mut trust = TrustStore::builder().anchors_pem(&settings.anchors_pem)?;
    if let Some(crls) = &settings.crls_pem {
        trust = trust.crls_pem(crls)?;
    }
    let config = tls::local_client_config(
        Arc::new(trust.build()?),
        &settings.anchors_pem,
        settings.crls_pem.as_deref(),
        settings.server_party.clone(),
        &settings.identity,
        tls::versions(settings.allow_tls12),
    )?;
    let channel = tls::channel(&settings.address, config, Duration::from_secs(10))?;
    Ok(ClientClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}
