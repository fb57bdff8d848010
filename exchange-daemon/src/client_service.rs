//! The client service: local applications send, watch, read and acknowledge.
//!
//! Each request is made by a local client identified by its TLS certificate;
//! its configured role decides what it may do (`send_to`, `purposes`,
//! `read_purposes`). Inbox items a client may not read are reported as not
//! found, so that their existence is not disclosed either.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use exchange_core::envelope::{InnerMetadata, SealerBuilder, SubjectId};
use exchange_core::receipt::Disposition;
use exchange_core::route::{Hop, HopRole, Provision};
use exchange_core::{MessageId, PartyUri};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use exchange_core::audit::{AuditAction, AuditOutcome};

use crate::accountability::client_actor;
use crate::clock::{from_unix_ms, unix_ms};
use crate::config::ClientConfig;
use crate::error::Error;
use crate::node::{Node, first_hops, next_message, position, receive_error};
use crate::peer::peer_of;
use crate::proto::client_server::Client;
use crate::proto::{
    self, AckRequest, AckResponse, FetchHeader, FetchRequest, FetchResponse, HopDeliveryState,
    HopState, InboxItem, ListInboxRequest, ListInboxResponse, MessageState, MessageStatus,
    ProvisionState, RecipientProvision, SendRequest, SendResponse, StatusRequest,
    SubjectIdentifier, fetch_response, send_request,
};
use crate::sink::Sink;
use crate::store::{
    Accepted, DeliveryKind, DeliveryState, MessageKey, MessageKind, MessageRecord, NewDelivery,
    NewEnvelope, SendKey, SendKeyRecord,
};

/// Plaintext slice per streamed message.
const SLICE: usize = 256 * 1024;
/// Inbox items per ListInbox page when the request names no page size.
pub const DEFAULT_INBOX_PAGE: usize = 100;
/// Most inbox items per ListInbox page (a larger page size is lowered).
pub const MAX_INBOX_PAGE: usize = 1000;
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
pub struct ClientService {
    node: Arc<Node>,
}

impl ClientService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
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

/// Longest idempotency key a client may give.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// A Send's idempotency key, if it gave one: 1 to 128 printable ASCII
/// characters.
fn idempotency_key(key: &str) -> Result<Option<String>, Error> {
    if key.is_empty() {
        return Ok(None);
    }
    if key.len() > MAX_IDEMPOTENCY_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::BadRequest(format!(
            "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// The digest a Send's idempotency key is bound to: every parameter of its
/// `SendStart` but the key itself and the (untrusted) size hint, then the
/// plaintext, absorbed as it streams in.
fn request_digest(start: &proto::SendStart) -> exchange_core::suite::Hasher {
    use prost::Message as _;
    let params = proto::SendStart {
        idempotency_key: String::new(),
        size_hint: 0,
        ..start.clone()
    }
    .encode_to_vec();
    let mut h = exchange_core::suite::Hasher::new();
    h.update(b"exchange/v1 send request\0");
    h.update(&(params.len() as u64).to_be_bytes());
    h.update(&params);
    h
}

fn refuse(client: &ClientConfig, what: &str, e: Error) -> Status {
    tracing::warn!(client = %client.name, reason = e.reason_code(), "{what} refused: {}", e.bounded());
    e.into()
}

impl Node {
    /// Seals what a local client streams and stores it for delivery.
    async fn send(
        &self,
        client: &ClientConfig,
        start: proto::SendStart,
        mut stream: Streaming<SendRequest>,
    ) -> Result<SendResponse, Error> {
        // To the millisecond, as the arrival time is stored: the head is
        // verified below at the time a delivery attempt would verify it.
        let now = from_unix_ms(unix_ms(SystemTime::now()));
        if !client.may_send_for(&start.purpose) {
            return Err(Error::Forbidden(format!(
                "client {} may not send for purpose {:?}",
                client.name, start.purpose
            )));
        }
        let key = idempotency_key(&start.idempotency_key)?;
        let mut request = request_digest(&start);
        if let Some(key) = &key
            && let Some(prior) = self
                .store
                .send_key(client.party.clone(), key.clone())
                .await?
        {
            // A repeat: read what it asks for, store nothing.
            let progress = self.config.limits.progress_timeout();
            while let Some(msg) = next_message(
                &mut stream,
                progress,
                "plaintext",
                self.config.limits.max_message_bytes,
            )
            .await?
            {
                let Some(send_request::Part::Chunk(data)) = msg.part else {
                    return Err(Error::Protocol("a second SendStart".into()));
                };
                request.update(&data);
            }
            return self.repeat(client, key, &prior, request.finish()).await;
        }
        if start.recipients.is_empty() {
            return Err(Error::BadRequest("no recipient".into()));
        }
        if start.content_type.is_empty() {
            return Err(Error::BadRequest("no content type".into()));
        }
        let mut builder = SealerBuilder::new(&self.identity, start.content_type.clone());
        for r in &start.recipients {
            let party = PartyUri::new(r.clone())?;
            if !client.may_send_to(&party) {
                return Err(Error::Forbidden(format!(
                    "client {} may not send to {party}",
                    client.name
                )));
            }
            let cert = self
                .peers
                .get(&party)
                .and_then(|p| p.encryption.as_ref())
                .ok_or_else(|| {
                    Error::UnknownPeer(format!("{party} (no encryption certificate configured)"))
                })?;
            let key = self.trust().verify_encryption_chain(cert, now)?;
            if key.party() != &party {
                return Err(Error::Config(format!(
                    "the encryption certificate configured for {party} names {}",
                    key.party()
                )));
            }
            let asked = start
                .entrusted_recipients
                .contains(r)
                .then_some(HopRole::Entrusted);
            builder = builder.recipient(key, self.contracted_role(&party, asked)?);
        }
        if let Some(stray) = start
            .entrusted_recipients
            .iter()
            .find(|e| !start.recipients.contains(e))
        {
            return Err(Error::BadRequest(format!(
                "entrusted recipient {stray} is not a recipient"
            )));
        }
        for relay in &start.relays {
            let (party, asked) = Node::parse_relay(relay)?;
            if !client.may_send_to(&party) {
                return Err(Error::Forbidden(format!(
                    "client {} may not send through {party}",
                    client.name
                )));
            }
            let role = self.contracted_role(&party, asked)?;
            builder = builder.relay(Hop { party, role });
        }
        let lifetime = if start.lifetime_seconds > 0 {
            start.lifetime_seconds
        } else {
            self.config.delivery.default_lifetime_seconds
        };
        let max = self.config.delivery.max_lifetime_seconds;
        if lifetime > max {
            return Err(Error::LifetimeTooLong {
                seconds: lifetime,
                max,
            });
        }
        builder = builder.lifetime(Duration::from_secs(lifetime));
        let metadata = InnerMetadata {
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
        };
        let meta = self.meta(&metadata);
        let recipients = start.recipients.clone();
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let mut sealer = builder
            .purpose(start.purpose.clone())
            .metadata(metadata)
            .start(now, &mut rng)?;
        let id = sealer.message_id();

        // Nothing new is taken while the disk is below its reserve (a
        // repeat of an earlier Send, above, stores nothing and is answered).
        self.check_disk_reserve(0)?;
        let limit = self.config.limits.max_envelope_bytes;
        let mut sink = Sink::new(
            self.store.clone(),
            0,
            self.config.limits.inline_ciphertext_bytes,
        )?;
        let mut total = 0u64;
        let mut out = Vec::with_capacity(SLICE + 1024);
        let progress = self.config.limits.progress_timeout();
        let mut plaintext = 0u64;
        while let Some(msg) = next_message(
            &mut stream,
            progress,
            "plaintext",
            self.config.limits.max_message_bytes,
        )
        .await?
        {
            let Some(send_request::Part::Chunk(data)) = msg.part else {
                return Err(Error::Protocol("a second SendStart".into()));
            };
            plaintext += data.len() as u64;
            request.update(&data);
            sealer.update(&data, &mut out);
            total += out.len() as u64;
            if total > limit {
                return Err(Error::TooLarge { len: total, limit });
            }
            if !out.is_empty() {
                sink.write(std::mem::replace(
                    &mut out,
                    Vec::with_capacity(SLICE + 1024),
                ))
                .await?;
            }
        }
        // A client cut off mid-request can look like one that finished: a
        // declared length is held to, so a partial record is never sealed.
        if start.size_hint != 0 && plaintext != start.size_hint {
            return Err(Error::SizeMismatch {
                declared: start.size_hint,
                received: plaintext,
            });
        }
        let head = sealer.finish(&mut out);
        total += out.len() as u64;
        if total > limit {
            return Err(Error::TooLarge { len: total, limit });
        }
        sink.write(out).await?;
        let ciphertext = sink.finish().await?;
        // What this Send wrote is counted as used by now.
        self.check_disk_reserve(0)?;
        // Our own head must pass what every hop will check (a revoked or
        // expired identity fails here, not at each peer).
        let trust = self.trust();
        let verified = head.verify(&trust, now)?;
        let header = verified.header();
        let hops = first_hops(&verified);
        let first_hop_count = hops.len();
        for hop in &hops {
            if self
                .peers
                .get(hop)
                .and_then(|p| p.address.as_ref())
                .is_none()
            {
                return Err(Error::UnknownPeer(hop.to_string()));
            }
        }
        let request_sha256 = request.finish();
        let send_key = key.as_ref().map(|key| SendKey {
            client: client.party.clone(),
            key: key.clone(),
            request_sha256,
        });
        let accepted = self
            .store
            .accept(NewEnvelope {
                id,
                header_sha256: head.header_sha256(),
                kind: MessageKind::Outbound,
                head: head.as_bytes().to_vec(),
                ciphertext,
                ciphertext_len: total,
                sender: self.party.clone(),
                upstream: None,
                // Ownership by certificate URI (unique in the configuration), not by name.
                local_client: Some(client.party.clone()),
                content_type: header.content_type.clone(),
                purpose: header.purpose.clone(),
                created_ms: unix_ms(header.created),
                expires_ms: unix_ms(header.expires),
                received_ms: unix_ms(now),
                our_receipt: None,
                awaited: header.recipients.iter().map(|r| r.party.clone()).collect(),
                meta: Some(meta),
                provision: None,
                audit: vec![self.entry(
                    &client_actor(&client.party),
                    AuditAction::Send,
                    Some(id),
                    AuditOutcome::Ok,
                    None,
                    Some(format!(
                        "to {} for {:?}, {total} ciphertext bytes",
                        recipients.join(", "),
                        header.purpose
                    )),
                )],
                deliveries: hops
                    .into_iter()
                    .map(|target| NewDelivery {
                        target,
                        kind: DeliveryKind::Envelope,
                        expires_ms: unix_ms(header.expires),
                    })
                    .collect(),
                send_key,
            })
            .await;
        let accepted = match (accepted, &key) {
            (Ok(a), _) => a,
            // The same key committed by a concurrent repeat in the meantime.
            (Err(e), Some(key)) => match self
                .store
                .send_key(client.party.clone(), key.clone())
                .await?
            {
                Some(prior) => return self.repeat(client, key, &prior, request_sha256).await,
                None => return Err(e.into()),
            },
            (Err(e), None) => return Err(e.into()),
        };
        if let Accepted::Duplicate(_) | Accepted::Purged(_) = accepted {
            // A fresh random 128-bit id cannot collide unless the RNG is broken.
            return Err(Error::Replay(id.to_string()));
        }
        tracing::info!(message = %id, client = %client.name, bytes = total, "envelope sealed and stored");
        self.keep_sealed_head(trust, verified, first_hop_count);
        self.work.notify_one();
        crash_point!("client::send-reply");
        Ok(SendResponse {
            message_id: id.as_bytes().to_vec(),
            ciphertext_length: total,
        })
    }

    /// The answer to a repeated Send: the original message if the request
    /// is the same (the repeat is audited), else a conflict.
    async fn repeat(
        &self,
        client: &ClientConfig,
        key: &str,
        prior: &SendKeyRecord,
        request_sha256: [u8; 32],
    ) -> Result<SendResponse, Error> {
        if prior.request_sha256 != request_sha256 {
            return Err(Error::IdempotencyConflict(key.to_owned()));
        }
        self.audit(vec![self.entry(
            &client_actor(&client.party),
            AuditAction::Send,
            Some(prior.message_id),
            AuditOutcome::Ok,
            None,
            Some(
                "a repeat under the same idempotency key: the original message returned, nothing stored"
                    .into(),
            ),
        )])
        .await?;
        tracing::info!(message = %prior.message_id, client = %client.name, "repeated send answered with the original message");
        Ok(SendResponse {
            message_id: prior.message_id.as_bytes().to_vec(),
            ciphertext_length: prior.ciphertext_len,
        })
    }

    /// An outbound message `client` sent (we are its sender: the id is unique).
    async fn own_outbound(
        &self,
        client: &ClientConfig,
        id: MessageId,
    ) -> Result<MessageRecord, Error> {
        match self.store.find(self.party.clone(), id).await? {
            Some(r)
                if r.kind == MessageKind::Outbound
                    && r.local_client.as_deref() == Some(client.party.as_str()) =>
            {
                Ok(r)
            }
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    /// An inbound message `client` may read: the one `sender` sent under
    /// `id`, or, without a sender, the only one under `id` that the client
    /// may read. Two senders' messages may carry one id: then the sender
    /// must be named; one is never picked silently.
    async fn readable_inbound(
        &self,
        client: &ClientConfig,
        id: MessageId,
        sender: Option<PartyUri>,
    ) -> Result<MessageRecord, Error> {
        let readable =
            |r: &MessageRecord| r.kind == MessageKind::Inbound && client.may_read(&r.purpose);
        let mut found: Vec<MessageRecord> = match sender {
            Some(sender) => self.store.find(sender, id).await?.into_iter().collect(),
            None => self.store.messages_by_id(id).await?,
        };
        found.retain(readable);
        match found.len() {
            0 => Err(Error::NotFound(id.to_string())),
            1 => Ok(found.remove(0)),
            n => Err(Error::AmbiguousId {
                id: id.to_string(),
                senders: n,
            }),
        }
    }

    /// The status of an outbound message: hops, receipts, provision boundaries.
    async fn status(&self, record: &MessageRecord) -> Result<MessageStatus, Error> {
        let head = self.verify_stored(record)?;
        let deliveries = self.store.deliveries(record.key).await?;
        // Each receipt was verified when it arrived; a later revocation of
        // its issuer is shown beside it, not as a failure of the message.
        let verified = self.stored_receipts(record, &head).await?;
        let provisions = head.route().provision_boundaries(&verified);
        let boundary_receipts: Vec<usize> = provisions
            .iter()
            .filter_map(|p| match p.provision {
                Provision::Passed { receipt, .. } => Some(receipt),
                _ => None,
            })
            .collect();
        let receipts = verified
            .iter()
            .enumerate()
            .map(|(i, r)| proto::Receipt {
                signed: r.signed().to_bytes(),
                issuer: r.issuer().to_string(),
                issuer_name: r
                    .issuer_certificate()
                    .common_name()
                    .unwrap_or_default()
                    .to_owned(),
                role: proto_role(r.role()).into(),
                disposition: proto_disposition(r.disposition()).into(),
                reason: match r.disposition() {
                    Disposition::Rejected(reason) => reason.clone(),
                    _ => String::new(),
                },
                issued_ms: unix_ms(r.issued()),
                provision_boundary: boundary_receipts.contains(&i),
                issuer_revoked_since: self.issuer_revoked_since(r),
            })
            .collect();
        let hops: Vec<HopState> = deliveries
            .iter()
            .filter(|d| d.kind == DeliveryKind::Envelope)
            .map(|d| HopState {
                party: d.target.to_string(),
                state: match d.state {
                    DeliveryState::Pending => HopDeliveryState::Pending,
                    DeliveryState::Done => HopDeliveryState::Delivered,
                    DeliveryState::Failed(_) => HopDeliveryState::Failed,
                }
                .into(),
                attempts: d.attempts,
                last_error: match &d.state {
                    DeliveryState::Failed(reason) => reason.clone(),
                    _ => d.last_error.clone().unwrap_or_default(),
                },
                next_attempt_ms: d.next_attempt_ms,
            })
            .collect();
        let recipients = head.route().recipients;
        let has = |party: &PartyUri, d: &[Disposition]| {
            verified
                .iter()
                .any(|r| r.issuer() == party && d.contains(r.disposition()))
        };
        // Each hop's latest signed state counts: a REJECTED that a later
        // custody receipt from the same party supersedes is history.
        let rejected = verified.iter().any(|r| {
            matches!(r.disposition(), Disposition::Rejected(_))
                && !verified.iter().any(|later| {
                    later.issuer() == r.issuer()
                        && later.issued() > r.issued()
                        && !matches!(later.disposition(), Disposition::Rejected(_))
                })
        });
        let state = if rejected || hops.iter().any(|h| h.state() == HopDeliveryState::Failed) {
            MessageState::Failed
        } else if recipients
            .iter()
            .all(|h| has(&h.party, &[Disposition::Processed]))
        {
            MessageState::Processed
        } else if recipients
            .iter()
            .all(|h| has(&h.party, &[Disposition::Delivered, Disposition::Processed]))
        {
            MessageState::Delivered
        } else if !hops.is_empty()
            && hops
                .iter()
                .all(|h| h.state() == HopDeliveryState::Delivered)
        {
            MessageState::Relayed
        } else {
            MessageState::Pending
        };
        Ok(MessageStatus {
            message_id: record.id.as_bytes().to_vec(),
            state: state.into(),
            created_ms: record.created_ms,
            expires_ms: record.expires_ms,
            hops,
            receipts,
            provisions: provisions
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
                    RecipientProvision {
                        recipient: p.recipient.to_string(),
                        provision: state.into(),
                        boundary,
                        receipt,
                    }
                })
                .collect(),
        })
    }

    /// Signs and keeps a PROCESSED receipt for an inbox item (idempotent).
    async fn acknowledge(
        &self,
        client: &ClientConfig,
        record: &MessageRecord,
    ) -> Result<Vec<u8>, Error> {
        // PROCESSED says a local application took the content: only after a
        // fetch delivered all of it, authenticated (an earlier
        // acknowledgement returns its receipt below).
        if record.acked_ms.is_none() && record.fetched_ms.is_none() {
            return Err(Error::NotFetched(record.id.to_string()));
        }
        let head = self.verify_stored(record)?;
        let pos = position(&head, &self.party)?;
        let now = SystemTime::now();
        let receipt = self.sign_receipt(&head, pos.role, Disposition::Processed, now);
        let verified = receipt.verify(&self.trust())?;
        let actor = client_actor(&client.party);
        let mut keep = self.keep_receipt(record, &verified, &actor);
        keep.audit = Some(self.entry(
            &actor,
            AuditAction::Ack,
            Some(record.id),
            AuditOutcome::Ok,
            None,
            Some("PROCESSED receipt signed".into()),
        ));
        if self
            .store
            .acknowledge(record.key, unix_ms(now), keep)
            .await?
        {
            self.work.notify_one();
            return Ok(receipt.to_bytes());
        }
        // Acknowledged before: return the receipt signed then.
        self.audit_about(
            record.key,
            vec![self.entry(
                &actor,
                AuditAction::Ack,
                Some(record.id),
                AuditOutcome::Ok,
                None,
                Some("acknowledged before: the original PROCESSED receipt returned".into()),
            )],
        )
        .await?;
        self.store
            .receipts(record.key)
            .await?
            .into_iter()
            .find(|r| r.issuer == self.party && r.disposition == Disposition::Processed.as_str())
            .map(|r| r.signed)
            .ok_or_else(|| {
                Error::Store(crate::error::StoreError::Corrupt(
                    "acknowledged message without a PROCESSED receipt".into(),
                ))
            })
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
        match self.node.send(client, start, stream).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => Err(self.deny(client, AuditAction::Send, None, e).await),
        }
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<MessageStatus>, Status> {
        let client = self.client(&req, AuditAction::Status).await?;
        let record = self
            .outbound_for(client, AuditAction::Status, &req.get_ref().message_id)
            .await?;
        let status = match self.node.status(&record).await {
            Ok(s) => s,
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
                    Ok(s) => s,
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
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
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
        let mut after = match decode_page_token(&req.page_token) {
            Ok(after) => after,
            Err(e) => return Err(self.deny(client, AuditAction::List, None, e).await),
        };
        // Rows the client may not read are skipped, so a page is read in
        // scans until it is full (one item more tells whether another
        // page follows) or the inbox ends.
        let mut items: Vec<InboxItem> = Vec::new();
        let mut last = None;
        let mut more = false;
        'scan: loop {
            let rows = match self
                .node
                .store
                .inbox_page(req.include_acked, after, page_size + 1)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return Err(self.deny(client, AuditAction::List, None, e.into()).await),
            };
            let end = rows.len() <= page_size;
            for r in rows {
                after = Some((r.received_ms, r.key));
                if !client.may_read(&r.purpose) {
                    continue;
                }
                if items.len() == page_size {
                    more = true;
                    break 'scan;
                }
                last = Some((r.received_ms, r.key));
                items.push(InboxItem {
                    message_id: r.id.as_bytes().to_vec(),
                    sender: r.sender.to_string(),
                    content_type: r.content_type,
                    purpose: r.purpose,
                    received_ms: r.received_ms,
                    payload_length: r.ciphertext_len,
                    acked: r.acked_ms.is_some(),
                });
            }
            if end {
                break;
            }
        }
        let next_page_token = match (more, last) {
            (true, Some(position)) => encode_page_token(position),
            _ => String::new(),
        };
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
        let opened = self
            .node
            .verify_stored(&record)
            .and_then(|head| Ok((head.open(&self.node.keys)?, head)));
        let (mut opener, head) = match opened {
            Ok(o) => o,
            Err(e) => return Err(self.deny(client, AuditAction::Fetch, Some(id), e).await),
        };
        let meta = opener.metadata().clone();
        let header = head.header();
        let first = FetchHeader {
            message_id: id.as_bytes().to_vec(),
            sender: head.sender().party().to_string(),
            sender_name: head
                .sender()
                .certificate()
                .common_name()
                .unwrap_or_default()
                .to_owned(),
            content_type: header.content_type.clone(),
            purpose: header.purpose.clone(),
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
            payload_length: header.payload_length,
            created_ms: unix_ms(header.created),
        };
        let ciphertext = match self.node.store.ciphertext(record.key).await {
            Ok(c) => c,
            Err(e) => {
                return Err(self
                    .deny(client, AuditAction::Fetch, Some(id), e.into())
                    .await);
            }
        };
        // Recorded before any plaintext leaves.
        self.record(
            client,
            AuditAction::Fetch,
            Some(&record),
            format!(
                "{} plaintext bytes, from {}",
                header.payload_length, record.sender
            ),
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
            if let Err(e) = node
                .store
                .mark_fetched(key, unix_ms(SystemTime::now()))
                .await
            {
                tracing::error!(message = %id, error = %e, "cannot record a completed fetch");
                let _ = done.send(Err(Error::from(e).into())).await;
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
