//! The peer service: envelopes and receipts from other facilities.
//!
//! A thin gRPC adapter: it reads the requests (the first message's head,
//! then the ciphertext's pieces), calls [`Node`] (what receiving does is in
//! [`crate::node::receive`]), and turns the answer or the refusal (with our
//! signed REJECTED receipt in its metadata, if any) into the response.
//! Refusals are audited and logged here.

use std::sync::Arc;

use exchange_core::MessageId;
use exchange_core::audit::AuditAction;
use exchange_core::envelope::EnvelopeHead;
use tonic::{Request, Response, Status, Streaming};

use crate::accountability::peer_actor;
use crate::error::{Error, RECEIPT_METADATA};
use crate::node::Node;
use crate::node::receive::Refusal;
use crate::proto::deliver_request::Part;
use crate::proto::peer_server::Peer;
use crate::proto::{
    DeliverRequest, DeliverResponse, ReturnReceiptsRequest, ReturnReceiptsResponse,
};
use crate::rpc::{Body, peer_of, receive_error};

/// The peer gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    /// Serves `node`.
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// The ciphertext piece a delivery's later message carries.
fn ciphertext_piece(msg: DeliverRequest) -> Result<Vec<u8>, Error> {
    match msg.part {
        Some(Part::Chunk(data)) => Ok(data),
        _ => Err(Error::Protocol("a head after the first message".into())),
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn deliver(
        &self,
        req: Request<Streaming<DeliverRequest>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let peer = peer_of(&req)?;
        let mut stream = req.into_inner();
        let limit = self.node.config.limits.max_message_bytes;
        let first = match stream.message().await {
            Ok(first) => Ok(first),
            Err(s) => match receive_error(&s, "head", limit) {
                e @ Error::PieceTooLarge { .. } => Err(e),
                _ => return Err(s),
            },
        };
        let head = match first {
            Ok(Some(DeliverRequest {
                part: Some(Part::Head(head)),
            })) => head,
            other => {
                let e = match other {
                    Err(e) => e,
                    _ => Error::Protocol("the first message must carry the head".into()),
                };
                tracing::warn!(from = %peer, reason = e.reason_code(), "envelope rejected: {}", e.bounded());
                let entry = self
                    .node
                    .refusal(&peer_actor(&peer), AuditAction::Receive, None, &e);
                self.node.audit_refusal(entry).await;
                return Err(e.into());
            }
        };
        let ciphertext = Body {
            stream,
            progress: self.node.config.limits.progress_timeout(),
            what: "ciphertext",
            limit,
            piece: ciphertext_piece,
        };
        match self.node.receive(&peer, &head, ciphertext).await {
            Ok(receipt) => {
                crash_point!("peer::deliver-reply");
                Ok(Response::new(DeliverResponse { receipt }))
            }
            Err(Refusal { error, receipt }) => {
                if error.is_internal() {
                    tracing::error!(from = %peer, reason = error.reason_code(), "envelope refused by an internal failure: {}", error.bounded());
                } else {
                    tracing::warn!(from = %peer, reason = error.reason_code(), "envelope rejected: {}", error.bounded());
                }
                // The id as the (possibly unauthentic) head claims it: named
                // in the entry, never linked to a stored message's patients.
                let claimed = EnvelopeHead::decode(&head)
                    .and_then(|h| h.header_unverified())
                    .ok()
                    .map(|h| h.message_id);
                let entry = self.node.claimed_refusal(
                    &peer_actor(&peer),
                    AuditAction::Receive,
                    claimed,
                    &error,
                );
                self.node.audit_refusal(entry).await;
                let mut status = Status::from(error);
                if let Some(r) = receipt {
                    status.metadata_mut().insert_bin(
                        RECEIPT_METADATA,
                        tonic::metadata::MetadataValue::from_bytes(&r),
                    );
                }
                Err(status)
            }
        }
    }

    async fn return_receipts(
        &self,
        req: Request<ReturnReceiptsRequest>,
    ) -> Result<Response<ReturnReceiptsResponse>, Status> {
        let peer = peer_of(&req)?;
        let req = req.into_inner();
        let id = MessageId::from_slice(&req.message_id).map_err(Error::from)?;
        match self.node.take_receipts(&peer, id, req.receipts).await {
            Ok((stored, held)) => {
                crash_point!("peer::receipts-reply");
                Ok(Response::new(ReturnReceiptsResponse {
                    stored: u32::try_from(stored).unwrap_or(u32::MAX),
                    already_held: u32::try_from(held).unwrap_or(u32::MAX),
                }))
            }
            Err(e) => {
                tracing::warn!(from = %peer, message = %id, reason = e.reason_code(), "receipts rejected: {}", e.bounded());
                let entry = self.node.claimed_refusal(
                    &peer_actor(&peer),
                    AuditAction::Receipt,
                    Some(id),
                    &e,
                );
                self.node.audit_refusal(entry).await;
                Err(e.into())
            }
        }
    }
}
