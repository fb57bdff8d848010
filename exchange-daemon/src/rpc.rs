//! What the two gRPC adapters ([`crate::peer`], [`crate::client_service`])
//! share: the authenticated party of a request, and reading a request's
//! stream as the pieces of a body [`Node`](crate::node::Node) takes.

use std::time::Duration;

use exchange_core::PartyUri;
use tonic::{Request, Status, Streaming};

use crate::error::Error;
use crate::node::Pieces;
use crate::tls::PeerInfo;

/// The authenticated party of a request (set by the TLS accept loop).
pub(crate) fn peer_of<T>(req: &Request<T>) -> Result<PartyUri, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .map(|p| p.party.clone())
        .ok_or_else(|| Status::unauthenticated("no authenticated TLS peer"))
}

/// The next message of a request stream; an error if the stream fails or
/// sends nothing for `progress` (a stalled sender holds nothing longer).
pub(crate) async fn next_message<T>(
    stream: &mut Streaming<T>,
    progress: Duration,
    what: &'static str,
    limit: usize,
) -> Result<Option<T>, Error> {
    match tokio::time::timeout(progress, stream.message()).await {
        Err(_) => Err(Error::Stalled {
            what,
            seconds: progress.as_secs(),
        }),
        Ok(r) => r.map_err(|s| receive_error(&s, what, limit)),
    }
}

/// What a failed read of a request stream means: a piece over the decoding
/// limit (`limit`, bytes) is the client's error and final; anything else is
/// the transport's.
pub(crate) fn receive_error(status: &Status, what: &'static str, limit: usize) -> Error {
    if status.code() == tonic::Code::OutOfRange {
        Error::PieceTooLarge {
            what,
            limit,
            detail: status.message().to_owned(),
        }
    } else {
        Error::Transport(format!("receiving {what}: {}", status.message()))
    }
}

/// The rest of a request stream after its first message, as the pieces of
/// a body: each message must carry one (`piece` takes it out, or says what
/// else came), read with [`next_message`].
pub(crate) struct Body<T> {
    pub(crate) stream: Streaming<T>,
    /// Longest wait for the next message.
    pub(crate) progress: Duration,
    /// What the pieces are, for errors (`plaintext`, `ciphertext`).
    pub(crate) what: &'static str,
    /// The decoding limit of one message (bytes), for errors.
    pub(crate) limit: usize,
    /// The piece a message carries, or the error for one that carries
    /// something else.
    pub(crate) piece: fn(T) -> Result<Vec<u8>, Error>,
}

impl<T: Send + 'static> Pieces for Body<T> {
    async fn next_piece(&mut self) -> Result<Option<Vec<u8>>, Error> {
        match next_message(&mut self.stream, self.progress, self.what, self.limit).await? {
            Some(msg) => (self.piece)(msg).map(Some),
            None => Ok(None),
        }
    }
}
