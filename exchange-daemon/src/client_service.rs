//! The client service: local applications send, watch, read and acknowledge.
//!
//! Each request is made by a local client identified by its TLS certificate;
//! its configured role decides what it may do (`send_to`, `purposes`,
//! `read_purposes`). Inbox items a client may not read are reported as not
//! found, so that their existence is not disclosed either.
//!
//! A thin gRPC adapter: requests are converted to plain values here and
//! answered by [`Node`] (what they do is in the node's `send` module);
//! reads and refusals are audited here before the answer goes out. Page
//! tokens and the plaintext stream of a fetch are the adapter's.

use std::pin::Pin;
use std::sync::Arc;

use exchange_core::envelope::{InnerMetadata, SubjectId};
use exchange_core::receipt::Disposition;
use exchange_core::route::{HopRole, Provision};
use exchange_core::{MessageId, PartyUri};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use exchange_core::audit::{AuditAction, AuditOutcome};

use crate::accountability::client_actor;
use crate::config::ClientConfig;
use crate::error::Error;
use crate::node::Node;
use crate::node::send::{HopState, OutboundState, OutboundStatus, ReceiptStatus, SendOrder, Sent};
use crate::proto::client_server::Client;
use crate::proto::{
    self, AckRequest, AckResponse, FetchHeader, FetchRequest, FetchResponse, HopDeliveryState,
    InboxItem, ListInboxRequest, ListInboxResponse, MessageState, MessageStatus, ProvisionState,
    SendRequest, SendResponse, StatusRequest, SubjectIdentifier, fetch_response, send_request,
};
use crate::rpc::{Body, peer_of, receive_error};
use crate::store::{MessageKey, MessageRecord};

/// Plaintext slice per streamed message.
const SLICE: usize = 256 * 1024;
/// Inbox items per ListInbox page when the request names no page size.
pub(crate) const DEFAULT_INBOX_PAGE: usize = 100;
/// Most inbox items per ListInbox page (a larger page size is lowered).
pub(crate) const MAX_INBOX_PAGE: usize = 1000;
/// First byte of a page token: its format, so that a later one can differ.
const PAGE_TOKEN_VERSION: u8 = 1;

/// A page token: the position of the last item of the page (time
/// received, local key), hex-encoded behind a format byte. Opaque to clients.
fn encode_page_token((received_ms, key): (u64, MessageKey)) -> String {
    let mut b = Vec::with_capacity(25);
    b.push(PAGE_TOKEN_VERSION);
    b.extend_from_slice(&received_ms.to_be_bytes());
    b.extend_from_slice(key.as_bytes());
    hex::encode(b)
}

/// The position a page token names; `None` for the empty token (the first
/// page).
fn decode_page_token(token: &str) -> Result<Option<(u64, MessageKey)>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let b = hex::decode(token).map_err(|_| Error::BadPageToken)?;
    match b.as_slice() {
        [PAGE_TOKEN_VERSION, rest @ ..] if rest.len() == 24 => {
            let (ms, key) = rest.split_at(8);
            let ms = u64::from_be_bytes(<[u8; 8]>::try_from(ms).map_err(|_| Error::BadPageToken)?);
            let key = <[u8; 16]>::try_from(key).map_err(|_| Error::BadPageToken)?;
            // Positions beyond what the store can hold name no item.
            if i64::try_from(ms).is_err() {
                return Err(Error::BadPageToken);
            }
            Ok(Some((ms, MessageKey::from_bytes(key))))
        }
        _ => Err(Error::BadPageToken),
    }
}

/// The client gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct ClientService {
    node: Arc<Node>,
}

impl ClientService {
    /// Serves `node`.
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// The configured client behind a request; an unknown one is refused
    /// and recorded.
    async fn client<T>(
        &self,
        req: &Request<T>,
        action: AuditAction,
    ) -> Result<&ClientConfig, Status> {
        let party = peer_of(req)?;
        match self.node.client(&party) {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!(client = %party, "request from an unknown local client");
                let entry = self
                    .node
                    .refusal(&client_actor(party.as_str()), action, None, &e);
                self.node.audit_refusal(entry).await;
                Err(e.into())
            }
        }
    }
}

fn message_id(bytes: &[u8]) -> Result<MessageId, Error> {
    MessageId::from_slice(bytes)
        .map_err(|_| Error::BadRequest("message_id must be 16 bytes".into()))
}

/// The optional `sender` of a Fetch or Ack: empty for none.
fn sender_of(s: &str) -> Result<Option<PartyUri>, Error> {
    if s.is_empty() {
        return Ok(None);
    }
    PartyUri::new(s.to_owned())
        .map(Some)
        .map_err(|e| Error::BadRequest(format!("sender: {e}")))
}

fn refuse(client: &ClientConfig, what: &str, e: Error) -> Status {
    tracing::warn!(client = %client.name, reason = e.reason_code(), "{what} refused: {}", e.bounded());
    e.into()
}

/// A Send's first message as what the node takes: the parameters, with
/// their encoding (but for the key and the size hint) that an idempotency
/// key is bound to.
fn send_order(start: proto::SendStart) -> SendOrder {
    use prost::Message as _;
    let bound_params = proto::SendStart {
        idempotency_key: String::new(),
        size_hint: 0,
        ..start.clone()
    }
    .encode_to_vec();
    SendOrder {
        idempotency_key: start.idempotency_key,
        bound_params,
        size_hint: start.size_hint,
        recipients: start.recipients,
        entrusted_recipients: start.entrusted_recipients,
        relays: start.relays,
        content_type: start.content_type,
        purpose: start.purpose,
        lifetime_seconds: start.lifetime_seconds,
        metadata: InnerMetadata {
            subject_ids: start
                .subject_ids
                .into_iter()
                .map(|s| SubjectId {
                    system: s.system,
                    value: s.value,
                })
                .collect(),
            title: start.title,
            document_type: start.document_type,
            file_name: start.file_name,
        },
    }
}

/// The plaintext piece a Send's later message carries.
fn plaintext_piece(msg: SendRequest) -> Result<Vec<u8>, Error> {
    match msg.part {
        Some(send_request::Part::Chunk(data)) => Ok(data),
        _ => Err(Error::Protocol("a second SendStart".into())),
    }
}

fn send_response(sent: Sent) -> SendResponse {
    SendResponse {
        message_id: sent.message_id.as_bytes().to_vec(),
        ciphertext_length: sent.ciphertext_len,
    }
}

/// An outbound message's status as the API's message.
fn message_status(status: OutboundStatus) -> MessageStatus {
    let state = match status.state {
        OutboundState::Pending => MessageState::Pending,
        OutboundState::Relayed => MessageState::Relayed,
        OutboundState::Delivered => MessageState::Delivered,
        OutboundState::Processed => MessageState::Processed,
        OutboundState::Failed => MessageState::Failed,
    };
    MessageStatus {
        message_id: status.message_id.as_bytes().to_vec(),
        state: state.into(),
        created_ms: status.created_ms,
        expires_ms: status.expires_ms,
        hops: status
            .hops
            .into_iter()
            .map(|h| proto::HopState {
                party: h.party.to_string(),
                state: match h.state {
                    HopState::Pending => HopDeliveryState::Pending,
                    HopState::Delivered => HopDeliveryState::Delivered,
                    HopState::Failed => HopDeliveryState::Failed,
                }
                .into(),
                attempts: h.attempts,
                last_error: h.last_error,
                next_attempt_ms: h.next_attempt_ms,
            })
            .collect(),
        receipts: status.receipts.into_iter().map(proto_receipt).collect(),
        provisions: status
            .provisions
            .into_iter()
            .map(|p| {
                let (state, boundary, receipt) = match p.provision {
                    Provision::NotAProvision => {
                        (ProvisionState::NotAProvision, String::new(), None)
                    }
                    Provision::Pending { boundary } => {
                        (ProvisionState::Pending, boundary.party.to_string(), None)
                    }
                    Provision::Passed { boundary, receipt } => (
                        ProvisionState::Passed,
                        boundary.party.to_string(),
                        u32::try_from(receipt).ok(),
                    ),
                    Provision::Rejected { boundary, receipt } => (
                        ProvisionState::Rejected,
                        boundary.party.to_string(),
                        u32::try_from(receipt).ok(),
                    ),
                };
                proto::RecipientProvision {
                    recipient: p.recipient.to_string(),
                    provision: state.into(),
                    boundary,
                    receipt,
                }
            })
            .collect(),
    }
}

/// A stored receipt as the API's message.
fn proto_receipt(r: ReceiptStatus) -> proto::Receipt {
    proto::Receipt {
        signed: r.signed,
        issuer: r.issuer.to_string(),
        issuer_name: r.issuer_name,
        role: proto_role(r.role).into(),
        disposition: proto_disposition(&r.disposition).into(),
        reason: match r.disposition {
            Disposition::Rejected(reason) => reason,
            _ => String::new(),
        },
        issued_ms: r.issued_ms,
        provision_boundary: r.provision_boundary,
        issuer_revoked_since: r.issuer_revoked_since,
    }
}

/// A receipt's role as the API's enum.
fn proto_role(role: HopRole) -> proto::HopRole {
    match role {
        HopRole::Entrusted => proto::HopRole::Entrusted,
        HopRole::ThirdParty => proto::HopRole::ThirdParty,
    }
}

/// A receipt's disposition as the API's enum (the reason travels beside it).
fn proto_disposition(d: &Disposition) -> proto::Disposition {
    match d {
        Disposition::AcceptedForRelay => proto::Disposition::AcceptedForRelay,
        Disposition::Delivered => proto::Disposition::Delivered,
        Disposition::Processed => proto::Disposition::Processed,
        Disposition::Rejected(_) => proto::Disposition::Rejected,
    }
}

/// A message state's short name (`DELIVERED`), for the audit log.
fn state_name(state: MessageState) -> &'static str {
    let name = state.as_str_name();
    name.strip_prefix("MESSAGE_STATE_").unwrap_or(name)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl ClientService {
    /// Records a refused request of `client` and turns the error into a status.
    async fn deny(
        &self,
        client: &ClientConfig,
        action: AuditAction,
        message: Option<MessageId>,
        e: Error,
    ) -> Status {
        let entry = self
            .node
            .refusal(&client_actor(&client.party), action, message, &e);
        self.node.audit_refusal(entry).await;
        refuse(client, action_name(action), e)
    }

    /// Records a successful read by `client` (of one stored message, if
    /// `message`); the read is refused if it cannot be recorded.
    async fn record(
        &self,
        client: &ClientConfig,
        action: AuditAction,
        message: Option<&MessageRecord>,
        detail: String,
    ) -> Result<(), Status> {
        let entry = self.node.entry(
            &client_actor(&client.party),
            action,
            message.map(|m| m.id),
            AuditOutcome::Ok,
            None,
            Some(detail),
        );
        let appended = match message {
            Some(m) => self.node.audit_about(m.key, vec![entry]).await,
            None => self.node.audit(vec![entry]).await,
        };
        appended.map_err(|e| {
            tracing::error!(error = %e, "cannot append to the audit log; request refused");
            Status::from(e)
        })
    }

    /// A client's own outbound message, the refusal recorded.
    async fn outbound_for(
        &self,
        client: &ClientConfig,
        action: AuditAction,
        raw_id: &[u8],
    ) -> Result<MessageRecord, Status> {
        let id = match message_id(raw_id) {
            Ok(id) => id,
            Err(e) => return Err(self.deny(client, action, None, e).await),
        };
        match self.node.own_outbound(client, id).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.deny(client, action, Some(id), e).await),
        }
    }

    /// An inbox item the client may read (from `sender`, if not empty),
    /// the refusal recorded.
    async fn inbound_for(
        &self,
        client: &ClientConfig,
        action: AuditAction,
        raw_id: &[u8],
        sender: &str,
    ) -> Result<MessageRecord, Status> {
        let (id, sender) = match message_id(raw_id).and_then(|id| Ok((id, sender_of(sender)?))) {
            Ok(r) => r,
            Err(e) => return Err(self.deny(client, action, None, e).await),
        };
        match self.node.readable_inbound(client, id, sender).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.deny(client, action, Some(id), e).await),
        }
    }
}

fn action_name(action: AuditAction) -> &'static str {
    match action {
        AuditAction::Send => "send",
        AuditAction::Status => "status",
        AuditAction::List => "list",
        AuditAction::Fetch => "fetch",
        AuditAction::Ack => "ack",
        _ => "request",
    }
}

#[tonic::async_trait]
impl Client for ClientService {
    async fn send(
        &self,
        req: Request<Streaming<SendRequest>>,
    ) -> Result<Response<SendResponse>, Status> {
        let client = self.client(&req, AuditAction::Send).await?;
        let mut stream = req.into_inner();
        let limit = self.node.config.limits.max_message_bytes;
        let first = match stream.message().await {
            Ok(first) => first,
            Err(s) => {
                let e = receive_error(&s, "SendStart", limit);
                if matches!(e, Error::PieceTooLarge { .. }) {
                    return Err(self.deny(client, AuditAction::Send, None, e).await);
                }
                return Err(s);
            }
        };
        let start = match first {
            Some(SendRequest {
                part: Some(send_request::Part::Start(start)),
            }) => start,
            _ => {
                let e = Error::Protocol("the first message must be SendStart".into());
                return Err(self.deny(client, AuditAction::Send, None, e).await);
            }
        };
        let plaintext = Body {
            stream,
            progress: self.node.config.limits.progress_timeout(),
            what: "plaintext",
            limit,
            piece: plaintext_piece,
        };
        match self.node.send(client, send_order(start), plaintext).await {
            Ok(sent) => Ok(Response::new(send_response(sent))),
            Err(e) => Err(self.deny(client, AuditAction::Send, None, e).await),
        }
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<MessageStatus>, Status> {
        let client = self.client(&req, AuditAction::Status).await?;
        let record = self
            .outbound_for(client, AuditAction::Status, &req.get_ref().message_id)
            .await?;
        let status = match self.node.status(&record).await {
            Ok(s) => message_status(s),
            Err(e) => {
                return Err(self
                    .deny(client, AuditAction::Status, Some(record.id), e)
                    .await);
            }
        };
        self.record(
            client,
            AuditAction::Status,
            Some(&record),
            format!("state {}", state_name(status.state())),
        )
        .await?;
        Ok(Response::new(status))
    }

    type WatchStatusStream = BoxStream<MessageStatus>;

    async fn watch_status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        let client = self.client(&req, AuditAction::Status).await?;
        let record = self
            .outbound_for(client, AuditAction::Status, &req.get_ref().message_id)
            .await?;
        let key = record.key;
        self.record(client, AuditAction::Status, Some(&record), "watch".into())
            .await?;
        let node = self.node.clone();
        let mut events = node.events.subscribe();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let status = match node.status(&record).await {
                    Ok(s) => message_status(s),
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let done = matches!(
                    status.state(),
                    MessageState::Processed | MessageState::Failed
                );
                if last.as_ref() != Some(&status) {
                    last = Some(status.clone());
                    if tx.send(Ok(status)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                // Wake on our message's events; poll now and then in case
                // events were dropped under load.
                let wait = async {
                    loop {
                        match events.recv().await {
                            Ok(changed) if changed == key => return,
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                };
                tokio::select! {
                    () = wait => {}
                    () = tokio::time::sleep(node.config.delivery.status_poll()) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_inbox(
        &self,
        req: Request<ListInboxRequest>,
    ) -> Result<Response<ListInboxResponse>, Status> {
        let client = self.client(&req, AuditAction::List).await?;
        let req = req.into_inner();
        let page_size = match req.page_size {
            0 => DEFAULT_INBOX_PAGE,
            n => usize::try_from(n)
                .unwrap_or(MAX_INBOX_PAGE)
                .min(MAX_INBOX_PAGE),
        };
        let after = match decode_page_token(&req.page_token) {
            Ok(after) => after,
            Err(e) => return Err(self.deny(client, AuditAction::List, None, e).await),
        };
        let page = match self
            .node
            .inbox_page(client, req.include_acked, after, page_size)
            .await
        {
            Ok(page) => page,
            Err(e) => return Err(self.deny(client, AuditAction::List, None, e).await),
        };
        let items: Vec<InboxItem> = page
            .items
            .into_iter()
            .map(|r| InboxItem {
                message_id: r.id.as_bytes().to_vec(),
                sender: r.sender.to_string(),
                content_type: r.content_type,
                purpose: r.purpose,
                received_ms: r.received_ms,
                payload_length: r.ciphertext_len,
                acked: r.acked_ms.is_some(),
            })
            .collect();
        let next_page_token = page.next.map(encode_page_token).unwrap_or_default();
        self.record(
            client,
            AuditAction::List,
            None,
            format!("{} inbox item(s) listed", items.len()),
        )
        .await?;
        Ok(Response::new(ListInboxResponse {
            items,
            next_page_token,
        }))
    }

    type FetchStream = BoxStream<FetchResponse>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let client = self.client(&req, AuditAction::Fetch).await?;
        let record = self
            .inbound_for(
                client,
                AuditAction::Fetch,
                &req.get_ref().message_id,
                &req.get_ref().sender,
            )
            .await?;
        let id = record.id;
        let opened = match self.node.open_inbound(&record).await {
            Ok(o) => o,
            Err(e) => return Err(self.deny(client, AuditAction::Fetch, Some(id), e).await),
        };
        let (mut opener, ciphertext) = (opened.opener, opened.ciphertext);
        let payload_length = opened.payload_length;
        let meta = opened.metadata;
        let first = FetchHeader {
            message_id: id.as_bytes().to_vec(),
            sender: opened.sender.to_string(),
            sender_name: opened.sender_name,
            content_type: opened.content_type,
            purpose: opened.purpose,
            title: meta.title,
            document_type: meta.document_type,
            file_name: meta.file_name,
            subject_ids: meta
                .subject_ids
                .into_iter()
                .map(|s| SubjectIdentifier {
                    system: s.system,
                    value: s.value,
                })
                .collect(),
            payload_length,
            created_ms: opened.created_ms,
        };
        // Recorded before any plaintext leaves.
        self.record(
            client,
            AuditAction::Fetch,
            Some(&record),
            format!("{payload_length} plaintext bytes, from {}", record.sender),
        )
        .await?;
        tracing::info!(message = %id, client = %client.name, "inbox item fetched");
        let (tx, rx) = mpsc::channel::<Result<FetchResponse, Status>>(4);
        let chunk = |data| FetchResponse {
            part: Some(fetch_response::Part::Chunk(data)),
        };
        let done = tx.clone();
        let decrypt = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            if tx
                .blocking_send(Ok(FetchResponse {
                    part: Some(fetch_response::Part::Header(first)),
                }))
                .is_err()
            {
                return false;
            }
            let run = || -> Result<bool, Status> {
                let mut r = ciphertext
                    .reader()
                    .map_err(|e| Status::internal(format!("store: {e}")))?;
                let mut buf = vec![0u8; SLICE];
                let mut out = Vec::with_capacity(SLICE);
                loop {
                    let n = r
                        .read(&mut buf)
                        .map_err(|e| Status::internal(format!("store: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    opener
                        .update(&buf[..n], &mut out)
                        .map_err(|e| Status::from(Error::from(e)))?;
                    if !out.is_empty()
                        && tx
                            .blocking_send(Ok(chunk(std::mem::take(&mut out))))
                            .is_err()
                    {
                        return Ok(false);
                    }
                }
                // The last-chunk flag and the whole digest: an error here
                // ends the stream with an error, so the client discards
                // what it received.
                opener.finish().map_err(|e| Status::from(Error::from(e)))?;
                Ok(true)
            };
            match run() {
                Ok(complete) => complete,
                Err(status) => {
                    let _ = tx.blocking_send(Err(status));
                    false
                }
            }
        });
        // A completed fetch is recorded before the stream ends, so that an
        // acknowledgement sent after the last byte finds it.
        let node = self.node.clone();
        let key = record.key;
        tokio::spawn(async move {
            if !matches!(decrypt.await, Ok(true)) {
                return;
            }
            if let Err(e) = node.fetched(key).await {
                tracing::error!(message = %id, error = %e, "cannot record a completed fetch");
                let _ = done.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Result<Response<AckResponse>, Status> {
        let client = self.client(&req, AuditAction::Ack).await?;
        let record = self
            .inbound_for(
                client,
                AuditAction::Ack,
                &req.get_ref().message_id,
                &req.get_ref().sender,
            )
            .await?;
        let id = record.id;
        let receipt = match self.node.acknowledge(client, &record).await {
            Ok(r) => r,
            Err(e) => return Err(self.deny(client, AuditAction::Ack, Some(id), e).await),
        };
        tracing::info!(message = %id, client = %client.name, "inbox item acknowledged");
        Ok(Response::new(AckResponse { receipt }))
    }
}
