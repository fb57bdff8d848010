//! What an envelope or receipts from a peer do here.
//!
//! Receiving an envelope (DESIGN.md §5-6): the head is verified first
//! (signature, sender chain, expiry), then our place on its route decides
//! whether the TLS peer may deliver it (it must be the hop before us) and
//! what we sign; the ciphertext is checked against the signed digest as it
//! streams in, and a final recipient also decrypts and authenticates every
//! chunk (keeping no plaintext); only a fully verified envelope is stored,
//! and only a stored one gets a receipt, dated when it was written. A relay
//! never holds a key that opens the payload. The peer service
//! ([`crate::peer`]) reads the request and calls in.

use std::time::{Duration, SystemTime};

use exchange_core::audit::{AuditAction, AuditOutcome};
use exchange_core::envelope::{CiphertextVerifier, EnvelopeHead, PayloadOpener, VerifiedHead};
use exchange_core::receipt::{Disposition, VerifiedReceipt};
use exchange_core::{MessageId, PartyUri};
use zeroize::{Zeroize, Zeroizing};

use super::{Node, Pieces, Position, first_hops, position};
use crate::accountability::{self, certificate_name, peer_actor};
use crate::clock::unix_ms;
use crate::error::Error;
use crate::sink::Sink;
use crate::store::{
    Accepted, DeliveryKind, MessageKey, MessageKind, MessageRecord, NewDelivery, NewEnvelope,
    NewProvision, NewReceipt, ProvisionDirection,
};

/// A refused delivery: the error, and our signed REJECTED receipt when the
/// envelope was authentic and came from the hop before us (evidence for the
/// sender of why, and by whom, it was refused).
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) error: Error,
    pub(crate) receipt: Option<Vec<u8>>,
}

impl From<Error> for Refusal {
    fn from(error: Error) -> Self {
        Self {
            error,
            receipt: None,
        }
    }
}

impl From<exchange_core::Error> for Refusal {
    fn from(e: exchange_core::Error) -> Self {
        Error::from(e).into()
    }
}

/// Refusals about the envelope itself (not our state or the transport),
/// which the sender gets a REJECTED receipt for.
fn deserves_receipt(e: &Error) -> bool {
    use exchange_core::Error as C;
    matches!(
        e,
        Error::TooLarge { .. }
            | Error::Replay(_)
            | Error::LifetimeTooLong { .. }
            | Error::Core(
                C::Expired { .. }
                    | C::DigestMismatch
                    | C::Truncated { .. }
                    | C::TrailingData
                    | C::NotARecipient
                    | C::KeyUnwrap
                    | C::CommitmentMismatch
                    | C::MetadataDecryption
                    | C::ChunkDecryption { .. }
            )
    )
}

/// How a received ciphertext stream is checked before we take custody.
enum StreamCheck {
    /// A relay cannot decrypt: length and signed digest.
    Digest(CiphertextVerifier),
    /// A final recipient also decrypts and authenticates every chunk; the
    /// plaintext is wiped, never kept. The stream is hashed on its own too,
    /// so that a stream altered on the way is reported as such
    /// (`digest-mismatch`) and a chunk that fails under a matching digest
    /// shows the sender sealed it so (`decryption-failed`).
    Open {
        digest: CiphertextVerifier,
        opener: Box<PayloadOpener>,
        scratch: Zeroizing<Vec<u8>>,
        failed: Option<exchange_core::Error>,
    },
}

impl StreamCheck {
    fn update(&mut self, data: &[u8]) -> Result<(), exchange_core::Error> {
        match self {
            Self::Digest(v) => v.update(data),
            Self::Open {
                digest,
                opener,
                scratch,
                failed,
            } => {
                digest.update(data)?;
                if failed.is_none() {
                    if let Err(e) = opener.update(data, scratch) {
                        *failed = Some(e);
                    }
                    scratch.zeroize();
                }
                Ok(())
            }
        }
    }

    fn finish(self) -> Result<(), exchange_core::Error> {
        match self {
            Self::Digest(v) => v.finish(),
            Self::Open {
                digest,
                opener,
                failed,
                ..
            } => {
                digest.finish()?;
                match failed {
                    Some(e) => Err(e),
                    None => opener.finish().map(drop),
                }
            }
        }
    }
}

impl Node {
    /// Receives one envelope from `peer`; returns our signed receipt (bytes).
    pub(crate) async fn receive(
        &self,
        peer: &PartyUri,
        head: &[u8],
        ciphertext: impl Pieces,
    ) -> Result<Vec<u8>, Refusal> {
        let now = self.now();
        // Expiry is checked below, so that an expired envelope can be refused with a receipt.
        let head = EnvelopeHead::decode(head)?.verify_ignoring_expiry(&self.trust(), now)?;
        let pos = position(&head, &self.party)?;
        if peer != &pos.upstream {
            return Err(Error::PeerNotUpstream {
                peer: peer.to_string(),
                expected: pos.upstream.to_string(),
            }
            .into());
        }
        // A redelivery (the sender retrying after a lost answer) is answered
        // with the receipt we signed the first time, before any of its body
        // is read and whatever the clock says now: it was in our custody
        // before it expired.
        if let Some(original) = self.original_receipt(peer, &head).await? {
            return Ok(original);
        }
        // Our own state, not the envelope's: no receipt, the sender retries.
        self.check_disk_reserve(head.header().ciphertext_length())?;
        match self
            .receive_verified(peer, &head, &pos, now, ciphertext)
            .await
        {
            Ok(receipt) => Ok(receipt),
            Err(error) if deserves_receipt(&error) => {
                let reason = Disposition::Rejected(error.reason_code().to_owned());
                // Dated when the refusal was decided, not when the transfer started.
                let receipt = self
                    .sign_receipt(&head, pos.role, reason, self.now())
                    .to_bytes();
                Err(Refusal {
                    error,
                    receipt: Some(receipt),
                })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Our receipt for `head` if we already hold this very envelope (same
    /// id and same signed header), with the redelivery audited.
    async fn original_receipt(
        &self,
        peer: &PartyUri,
        head: &VerifiedHead,
    ) -> Result<Option<Vec<u8>>, Error> {
        let id = head.header().message_id;
        let sender = head.sender().party().clone();
        let Some(stored) = self.store.find(sender, id).await? else {
            return Ok(None);
        };
        if stored.header_sha256 != head.head().header_sha256() || stored.our_receipt.is_none() {
            // Another envelope under a known id: refused after verification.
            return Ok(None);
        }
        let action = match stored.kind {
            MessageKind::Relay => AuditAction::Relay,
            _ => AuditAction::Receive,
        };
        self.redelivered(
            peer,
            head,
            action,
            Some(stored.key),
            stored.header_sha256,
            stored.our_receipt,
            "redelivery (body not read)",
        )
        .await
        .map(Some)
    }

    /// The answer to an envelope its sender gave us before (stored under
    /// `key`, or purged since): our original receipt if it is the very same
    /// envelope, with the redelivery audited; else a replay.
    #[allow(clippy::too_many_arguments)]
    async fn redelivered(
        &self,
        peer: &PartyUri,
        head: &VerifiedHead,
        action: AuditAction,
        key: Option<MessageKey>,
        stored_header_sha256: [u8; 32],
        our_receipt: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Vec<u8>, Error> {
        let id = head.header().message_id;
        match (
            stored_header_sha256 == head.head().header_sha256(),
            our_receipt,
        ) {
            (true, Some(original)) => {
                tracing::info!(message = %id, from = %peer, "{what}: original receipt returned");
                let entry = self.entry(
                    &peer_actor(peer),
                    action,
                    Some(id),
                    AuditOutcome::Ok,
                    None,
                    Some(format!(
                        "{what} from {}: the original receipt returned, nothing stored",
                        head.sender().party()
                    )),
                );
                match key {
                    Some(key) => self.audit_about(key, vec![entry]).await?,
                    None => self.audit(vec![entry]).await?,
                }
                Ok(original)
            }
            _ => Err(Error::Replay(id.to_string())),
        }
    }

    async fn receive_verified(
        &self,
        peer: &PartyUri,
        head: &VerifiedHead,
        pos: &Position,
        now: SystemTime,
        mut pieces: impl Pieces,
    ) -> Result<Vec<u8>, Error> {
        let header = head.header();
        if now > header.expires {
            return Err(exchange_core::Error::Expired { at: header.expires }.into());
        }
        // A bounded lifetime bounds how long a purged message's id must be
        // remembered to keep delivery exactly-once.
        let lifetime = header
            .expires
            .duration_since(header.created)
            .unwrap_or_default();
        let max = self.config.delivery.max_lifetime_seconds;
        if lifetime > Duration::from_secs(max) {
            return Err(Error::LifetimeTooLong {
                seconds: lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0),
                max,
            });
        }
        let limit = self.config.limits.max_envelope_bytes;
        let len = header.ciphertext_length();
        if len > limit {
            return Err(Error::TooLarge { len, limit });
        }
        let (meta, mut check) = if pos.kind == MessageKind::Inbound {
            // Our key must open it (recipient entry, key commitment, inner
            // metadata, then every payload chunk) before we take
            // responsibility for it.
            let opener = head.open(&self.keys)?;
            (
                Some(self.meta(opener.metadata())),
                StreamCheck::Open {
                    digest: head.ciphertext_verifier(),
                    opener: Box::new(opener),
                    scratch: Zeroizing::new(Vec::new()),
                    failed: None,
                },
            )
        } else {
            (None, StreamCheck::Digest(head.ciphertext_verifier()))
        };
        let mut sink = Sink::new(
            self.store.clone(),
            len,
            self.config.limits.inline_ciphertext_bytes,
        )?;
        while let Some(data) = pieces.next_piece().await? {
            check.update(&data)?;
            sink.write(data).await?;
        }
        check.finish()?;
        // Written (a spool file fsynced) before the custody time is taken.
        let ciphertext = sink.finish().await?;
        // Other transfers may have used the space meanwhile; what this one
        // wrote is already counted as used.
        self.check_disk_reserve(0)?;
        // The custody time: the whole envelope received, verified and
        // written; the store commits it with our receipt next.
        let custody = self.now();
        if custody > header.expires {
            return Err(exchange_core::Error::Expired { at: header.expires }.into());
        }

        let disposition = match pos.kind {
            MessageKind::Relay => Disposition::AcceptedForRelay,
            _ => Disposition::Delivered,
        };
        let receipt = self
            .sign_receipt(head, pos.role, disposition.clone(), custody)
            .to_bytes();
        let deliveries = pos
            .next
            .iter()
            .map(|target| NewDelivery {
                target: target.clone(),
                kind: DeliveryKind::Envelope,
                expires_ms: unix_ms(header.expires),
            })
            .collect();
        let id = header.message_id;
        let actor = peer_actor(peer);
        let sender = head.sender().party();
        let (action, provision) = match pos.kind {
            MessageKind::Inbound => (
                AuditAction::Receive,
                Some(NewProvision {
                    direction: ProvisionDirection::Received,
                    counterparty: sender.clone(),
                    counterparty_name: certificate_name(head.sender().certificate()),
                    recipient: self.party.clone(),
                    role: pos.role.as_str().to_owned(),
                    time_ms: unix_ms(custody),
                    receipt: receipt.clone(),
                    audit: Some(self.entry(
                        accountability::DAEMON,
                        AuditAction::Provision,
                        Some(id),
                        AuditOutcome::Ok,
                        None,
                        Some(format!(
                            "received: record of receipt from {sender} ({}), DELIVERED receipt issued",
                            pos.role
                        )),
                    )),
                }),
            ),
            _ => (AuditAction::Relay, None),
        };
        let audit = self.entry(
            &actor,
            action,
            Some(id),
            AuditOutcome::Ok,
            None,
            Some(format!(
                "from {sender} as {}, {len} ciphertext bytes; {disposition}",
                pos.role
            )),
        );
        let accepted = self
            .store
            .accept(NewEnvelope {
                id,
                header_sha256: head.head().header_sha256(),
                kind: pos.kind,
                head: head.head().as_bytes().to_vec(),
                ciphertext,
                ciphertext_len: len,
                sender: head.sender().party().clone(),
                upstream: Some(pos.upstream.clone()),
                local_client: None,
                content_type: header.content_type.clone(),
                purpose: header.purpose.clone(),
                created_ms: unix_ms(header.created),
                expires_ms: unix_ms(header.expires),
                received_ms: unix_ms(custody),
                our_receipt: Some(receipt.clone()),
                deliveries,
                awaited: match pos.kind {
                    MessageKind::Inbound => Vec::new(),
                    _ => header.recipients.iter().map(|r| r.party.clone()).collect(),
                },
                meta,
                provision,
                audit: vec![audit],
                send_key: None,
            })
            .await?;
        match accepted {
            Accepted::Stored => {
                tracing::info!(
                    message = %id,
                    from = %peer,
                    sender = %head.sender().party(),
                    kind = pos.kind.as_str(),
                    bytes = len,
                    "envelope accepted"
                );
                if pos.kind == MessageKind::Relay {
                    self.work.notify_one();
                }
                Ok(receipt)
            }
            Accepted::Duplicate(stored) => {
                self.redelivered(
                    peer,
                    head,
                    action,
                    Some(stored.key),
                    stored.header_sha256,
                    stored.our_receipt,
                    "redelivery",
                )
                .await
            }
            Accepted::Purged(purged) => {
                self.redelivered(
                    peer,
                    head,
                    action,
                    None,
                    purged.header_sha256,
                    purged.our_receipt,
                    "redelivery of a purged message",
                )
                .await
            }
        }
    }

    /// Keeps receipts that `peer` (a hop after us) returns for message `id`.
    /// Several senders' envelopes may carry that id: each receipt names the
    /// header it is about, and is kept with the message we sent or relay
    /// under that very header (never matched by the id alone). At most one
    /// per issuer and disposition is kept; later ones (whatever their bytes
    /// or times) are answered as already held, not stored, not forwarded,
    /// and audited once per call. A call carries at most
    /// `limits.max_receipts_per_call`; they are verified on the blocking
    /// pool. Returns how many were stored and how many were already held.
    pub(crate) async fn take_receipts(
        &self,
        peer: &PartyUri,
        id: MessageId,
        receipts: Vec<Vec<u8>>,
    ) -> Result<(usize, usize), Error> {
        let limit = self.config.limits.max_receipts_per_call;
        if receipts.len() > limit {
            return Err(Error::TooManyReceipts {
                count: receipts.len(),
                limit,
            });
        }
        let candidates: Vec<MessageRecord> = self
            .store
            .messages_by_id(id)
            .await?
            .into_iter()
            .filter(|r| r.kind != MessageKind::Inbound)
            .collect();
        if candidates.is_empty() {
            return Err(Error::NotFound(id.to_string()));
        }
        let verified = self.verify_receipts(receipts).await?;
        let mut groups: Vec<(usize, Vec<VerifiedReceipt>)> = Vec::new();
        for verified in verified {
            let Some(i) = candidates
                .iter()
                .position(|c| &c.header_sha256 == verified.header_sha256())
            else {
                // About another message, or another header under this id.
                return Err(exchange_core::Error::from(if verified.message_id() == id {
                    exchange_core::ReceiptError::WrongHeader
                } else {
                    exchange_core::ReceiptError::WrongMessage
                })
                .into());
            };
            match groups.iter_mut().find(|(j, _)| *j == i) {
                Some((_, rs)) => rs.push(verified),
                None => groups.push((i, vec![verified])),
            }
        }
        let (mut stored, mut held) = (0, 0);
        for (i, rs) in groups {
            let (s, h) = self.take_receipts_for(peer, &candidates[i], rs).await?;
            stored += s;
            held += h;
        }
        Ok((stored, held))
    }

    async fn take_receipts_for(
        &self,
        peer: &PartyUri,
        record: &MessageRecord,
        verified: Vec<VerifiedReceipt>,
    ) -> Result<(usize, usize), Error> {
        let head = self.verify_stored(record)?;
        let next = match record.kind {
            MessageKind::Outbound => first_hops(&head),
            _ => position(&head, &self.party)?.next,
        };
        if !next.contains(peer) {
            return Err(Error::PeerNotUpstream {
                peer: peer.to_string(),
                expected: next
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
        for r in &verified {
            r.check_for(&head)?;
        }
        let count = verified.len();
        let actor = peer_actor(peer);
        let mut new: Vec<NewReceipt> = verified
            .iter()
            .map(|r| self.keep_receipt(record, r, &actor))
            .collect();
        if record.kind == MessageKind::Outbound {
            let provisions = self.boundary_provisions(record, &head, &verified).await?;
            for (k, p) in new.iter_mut().zip(provisions) {
                k.provisions = p;
            }
        }
        let stored = self.store.add_receipts(record.key, new).await?;
        let held = count.saturating_sub(stored);
        if held > 0 {
            tracing::info!(
                message = %record.id,
                from = %peer,
                stored,
                held,
                "receipts already held: not stored or forwarded again"
            );
            self.audit(vec![self.entry(
                &actor,
                AuditAction::Receipt,
                Some(record.id),
                AuditOutcome::Ok,
                None,
                Some(format!(
                    "{held} of {count} receipts already held (the same issuer and disposition): \
                     not stored or forwarded again"
                )),
            )])
            .await?;
        }
        if stored > 0 {
            if record.kind != MessageKind::Outbound {
                self.work.notify_one();
            }
            let _ = self.events.send(record.key);
        }
        Ok((stored, held))
    }
}
