//! What a local client's requests do: a Send sealed and stored for
//! delivery (idempotent under a key), the status of what it sent, a page
//! of its inbox, an inbox item opened for a fetch, and the
//! acknowledgement of what it fetched. The client service
//! ([`crate::client_service`]) converts its messages to and from the plain
//! values here.

use std::time::Duration;

use exchange_core::audit::{AuditAction, AuditOutcome};
use exchange_core::envelope::{InnerMetadata, PayloadOpener, SealerBuilder};
use exchange_core::receipt::Disposition;
use exchange_core::route::{Hop, HopRole, Provision, RecipientProvision};
use exchange_core::{MessageId, PartyUri};

use super::{Node, Pieces, first_hops, position};
use crate::accountability::client_actor;
use crate::clock::{from_unix_ms, unix_ms};
use crate::config::ClientConfig;
use crate::error::Error;
use crate::sink::Sink;
use crate::store::{
    Accepted, DeliveryKind, DeliveryState, MessageKey, MessageKind, MessageRecord, NewDelivery,
    NewEnvelope, SendKey, SendKeyRecord, StoredCiphertext,
};

/// Ciphertext written to the store per slice of a Send.
const SLICE: usize = 256 * 1024;

/// What a local client asks to send: a Send's parameters, as plain values.
#[derive(Debug, Clone, Default)]
pub(crate) struct SendOrder {
    /// The client's idempotency key; empty for none.
    pub(crate) idempotency_key: String,
    /// The request's parameters as the client encoded them, but for the
    /// idempotency key and the size hint: what a key is bound to, with the
    /// plaintext.
    pub(crate) bound_params: Vec<u8>,
    /// The plaintext length the client declared; 0 if it did not.
    pub(crate) size_hint: u64,
    /// Recipient party URIs.
    pub(crate) recipients: Vec<String>,
    /// The recipients the client asked to be entrusted agents.
    pub(crate) entrusted_recipients: Vec<String>,
    /// Relays, `party` or `party=entrusted|third-party`.
    pub(crate) relays: Vec<String>,
    /// The payload's content type.
    pub(crate) content_type: String,
    /// The purpose of the transfer.
    pub(crate) purpose: String,
    /// Lifetime asked for; 0 for the configured default.
    pub(crate) lifetime_seconds: u64,
    /// The inner header: subject identifiers, title, type, file name.
    pub(crate) metadata: InnerMetadata,
}

/// What a Send stored (or, for a repeat, had stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    /// The message's id.
    pub(crate) message_id: MessageId,
    /// Its ciphertext length.
    pub(crate) ciphertext_len: u64,
}

/// Where an outbound message stands, as its sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboundState {
    /// Not yet in every recipient's custody.
    Pending,
    /// Every first hop took custody (a relay holds it).
    Relayed,
    /// Every recipient took custody.
    Delivered,
    /// Every recipient's application took the content.
    Processed,
    /// Refused or given up.
    Failed,
}

/// One next hop's delivery of an outbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HopState {
    /// Still being attempted.
    Pending,
    /// In the hop's custody.
    Delivered,
    /// Given up.
    Failed,
}

/// The delivery of an outbound message to one next hop.
#[derive(Debug, Clone)]
pub(crate) struct HopStatus {
    /// The next hop.
    pub(crate) party: PartyUri,
    /// Where its delivery stands.
    pub(crate) state: HopState,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// Why it failed for good, or why the last attempt failed; empty if none.
    pub(crate) last_error: String,
    /// When the next attempt is due (Unix ms).
    pub(crate) next_attempt_ms: u64,
}

/// A receipt about an outbound message, as stored.
#[derive(Debug, Clone)]
pub(crate) struct ReceiptStatus {
    /// Its signed form.
    pub(crate) signed: Vec<u8>,
    /// Its issuer.
    pub(crate) issuer: PartyUri,
    /// Its issuer's certificate name; empty if it has none.
    pub(crate) issuer_name: String,
    /// The issuer's role on the route.
    pub(crate) role: HopRole,
    /// What it says.
    pub(crate) disposition: Disposition,
    /// When it was issued (Unix ms).
    pub(crate) issued_ms: u64,
    /// Whether it marks a provision boundary.
    pub(crate) provision_boundary: bool,
    /// Whether its issuer has been revoked since it arrived.
    pub(crate) issuer_revoked_since: bool,
}

/// One page of the inbox items a client may read.
#[derive(Debug, Clone)]
pub(crate) struct InboxPage {
    /// The items, in `(received_ms, key)` order.
    pub(crate) items: Vec<MessageRecord>,
    /// The position of the page's last item when another page follows.
    pub(crate) next: Option<(u64, MessageKey)>,
}

/// An inbox item opened for a fetch: what its signed and inner headers
/// say, the opener of its payload and its ciphertext.
pub(crate) struct OpenedInbound {
    /// Its sender.
    pub(crate) sender: PartyUri,
    /// The sender's certificate name; empty if it has none.
    pub(crate) sender_name: String,
    /// The payload's content type.
    pub(crate) content_type: String,
    /// The purpose it was sent for.
    pub(crate) purpose: String,
    /// The inner header.
    pub(crate) metadata: InnerMetadata,
    /// The plaintext length.
    pub(crate) payload_length: u64,
    /// When it was sealed (Unix ms).
    pub(crate) created_ms: u64,
    /// Decrypts and authenticates the payload.
    pub(crate) opener: PayloadOpener,
    /// The stored ciphertext.
    pub(crate) ciphertext: StoredCiphertext,
}

/// The status of an outbound message: hops, receipts, provision boundaries.
#[derive(Debug, Clone)]
pub(crate) struct OutboundStatus {
    /// The message's id.
    pub(crate) message_id: MessageId,
    /// Where it stands.
    pub(crate) state: OutboundState,
    /// When it was sealed (Unix ms).
    pub(crate) created_ms: u64,
    /// When it expires (Unix ms).
    pub(crate) expires_ms: u64,
    /// Its deliveries to the next hops.
    pub(crate) hops: Vec<HopStatus>,
    /// Its receipts, as stored.
    pub(crate) receipts: Vec<ReceiptStatus>,
    /// Each recipient's provision boundary (receipts named by their
    /// index in `receipts`).
    pub(crate) provisions: Vec<RecipientProvision>,
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
/// request but the key itself and the (untrusted) size hint (as the client
/// encoded them: `bound_params`), then the plaintext, absorbed as it
/// streams in.
fn request_digest(bound_params: &[u8]) -> exchange_core::suite::Hasher {
    let mut h = exchange_core::suite::Hasher::new();
    h.update(b"exchange/v1 send request\0");
    h.update(&(bound_params.len() as u64).to_be_bytes());
    h.update(bound_params);
    h
}

impl Node {
    /// Seals what a local client streams (`plaintext`) and stores it for
    /// delivery.
    pub(crate) async fn send(
        &self,
        client: &ClientConfig,
        start: SendOrder,
        mut plaintext: impl Pieces,
    ) -> Result<Sent, Error> {
        // To the millisecond, as the arrival time is stored: the head is
        // verified below at the time a delivery attempt would verify it.
        let now = from_unix_ms(unix_ms(self.now()));
        if !client.may_send_for(&start.purpose) {
            return Err(Error::Forbidden(format!(
                "client {} may not send for purpose {:?}",
                client.name, start.purpose
            )));
        }
        let key = idempotency_key(&start.idempotency_key)?;
        let mut request = request_digest(&start.bound_params);
        if let Some(key) = &key
            && let Some(prior) = self
                .store
                .send_key(client.party.clone(), key.clone())
                .await?
        {
            // A repeat: read what it asks for, store nothing.
            while let Some(data) = plaintext.next_piece().await? {
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
        let metadata = start.metadata;
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
        let mut received = 0u64;
        while let Some(data) = plaintext.next_piece().await? {
            received += data.len() as u64;
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
        if start.size_hint != 0 && received != start.size_hint {
            return Err(Error::SizeMismatch {
                declared: start.size_hint,
                received,
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
        Ok(Sent {
            message_id: id,
            ciphertext_len: total,
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
    ) -> Result<Sent, Error> {
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
        Ok(Sent {
            message_id: prior.message_id,
            ciphertext_len: prior.ciphertext_len,
        })
    }

    /// An outbound message `client` sent (we are its sender: the id is unique).
    pub(crate) async fn own_outbound(
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
    pub(crate) async fn readable_inbound(
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

    /// Opens a stored inbox item for a fetch: its head verified as stored
    /// ([`Node::verify_stored`]), its recipient entry and inner header
    /// opened with our keys.
    pub(crate) async fn open_inbound(
        &self,
        record: &MessageRecord,
    ) -> Result<OpenedInbound, Error> {
        let head = self.verify_stored(record)?;
        let opener = head.open(&self.keys)?;
        let header = head.header();
        let sender = head.sender();
        let opened = OpenedInbound {
            sender: sender.party().clone(),
            sender_name: sender
                .certificate()
                .common_name()
                .unwrap_or_default()
                .to_owned(),
            content_type: header.content_type.clone(),
            purpose: header.purpose.clone(),
            metadata: opener.metadata().clone(),
            payload_length: header.payload_length,
            created_ms: unix_ms(header.created),
            opener,
            ciphertext: self.store.ciphertext(record.key).await?,
        };
        Ok(opened)
    }

    /// Records that a fetch of the inbox item under `key` delivered all of
    /// its content, authenticated (an acknowledgement may follow).
    pub(crate) async fn fetched(&self, key: MessageKey) -> Result<(), Error> {
        Ok(self.store.mark_fetched(key, unix_ms(self.now())).await?)
    }

    /// Up to `page_size` inbox items `client` may read that come after
    /// `after` (a `(received_ms, key)` position; `None`: from the start),
    /// acknowledged ones only if `include_acked`.
    pub(crate) async fn inbox_page(
        &self,
        client: &ClientConfig,
        include_acked: bool,
        mut after: Option<(u64, MessageKey)>,
        page_size: usize,
    ) -> Result<InboxPage, Error> {
        // Rows the client may not read are skipped, so a page is read in
        // scans until it is full (one item more tells whether another
        // page follows) or the inbox ends.
        let mut items = Vec::new();
        let mut last = None;
        let mut more = false;
        'scan: loop {
            let rows = self
                .store
                .inbox_page(include_acked, after, page_size + 1)
                .await?;
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
                items.push(r);
            }
            if end {
                break;
            }
        }
        Ok(InboxPage {
            items,
            next: if more { last } else { None },
        })
    }

    /// The status of an outbound message: hops, receipts, provision boundaries.
    pub(crate) async fn status(&self, record: &MessageRecord) -> Result<OutboundStatus, Error> {
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
            .map(|(i, r)| ReceiptStatus {
                signed: r.signed().to_bytes(),
                issuer: r.issuer().clone(),
                issuer_name: r
                    .issuer_certificate()
                    .common_name()
                    .unwrap_or_default()
                    .to_owned(),
                role: r.role(),
                disposition: r.disposition().clone(),
                issued_ms: unix_ms(r.issued()),
                provision_boundary: boundary_receipts.contains(&i),
                issuer_revoked_since: self.issuer_revoked_since(r),
            })
            .collect();
        let hops: Vec<HopStatus> = deliveries
            .iter()
            .filter(|d| d.kind == DeliveryKind::Envelope)
            .map(|d| HopStatus {
                party: d.target.clone(),
                state: match d.state {
                    DeliveryState::Pending => HopState::Pending,
                    DeliveryState::Done => HopState::Delivered,
                    DeliveryState::Failed(_) => HopState::Failed,
                },
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
        let state = if rejected || hops.iter().any(|h| h.state == HopState::Failed) {
            OutboundState::Failed
        } else if recipients
            .iter()
            .all(|h| has(&h.party, &[Disposition::Processed]))
        {
            OutboundState::Processed
        } else if recipients
            .iter()
            .all(|h| has(&h.party, &[Disposition::Delivered, Disposition::Processed]))
        {
            OutboundState::Delivered
        } else if !hops.is_empty() && hops.iter().all(|h| h.state == HopState::Delivered) {
            OutboundState::Relayed
        } else {
            OutboundState::Pending
        };
        Ok(OutboundStatus {
            message_id: record.id,
            state,
            created_ms: record.created_ms,
            expires_ms: record.expires_ms,
            hops,
            receipts,
            provisions,
        })
    }

    /// Signs and keeps a PROCESSED receipt for an inbox item (idempotent).
    pub(crate) async fn acknowledge(
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
        let now = self.now();
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
