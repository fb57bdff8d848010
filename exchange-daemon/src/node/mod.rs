//! One facility's daemon state and the rules it applies at its edges.
//!
//! Envelope and receipt rules are exchange-core's (verify heads, check
//! receipts against heads, find the provision boundary); this module only
//! decides *who may do what here*: which TLS peer may deliver an envelope
//! (the hop before us on its route), which local client may send where and
//! read what, and what is stored and forwarded.
//!
//! * here: the state, its construction, the peer directory, the helpers
//!   the others share, the cache of heads sealed here;
//! * [`send`]: what a local client's requests do (a Send sealed and
//!   stored, the inbox read, a fetch opened, a status, an acknowledgement);
//! * [`receive`]: what an envelope or receipts from a peer do;
//! * [`deliver`]: the delivery loop and its attempts;
//! * [`audit`]: audit entries, checkpoints, the retention purge and the
//!   task that runs the last two.
//!
//! Every time a decision depends on is read from the node's [`Clock`].
//! Nothing here takes or returns a gRPC message: the services
//! ([`crate::peer`], [`crate::client_service`]) convert at their edge and
//! call in; only [`deliver`]'s outgoing calls speak gRPC themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use exchange_core::PartyUri;
use exchange_core::envelope::{EnvelopeHead, VerifiedHead};
use exchange_core::identity::{Certificate, DecryptionKey, Identity};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt, VerifiedReceipt};
use exchange_core::route::HopRole;
use exchange_core::trust::TrustStore;
use tokio::sync::{Notify, broadcast};
use tonic::transport::Channel;

use exchange_core::audit::{AuditAction, AuditOutcome};

use crate::clock::{Clock, SystemClock, from_unix_ms, unix_ms};
use crate::config::{ClientConfig, Config};
use crate::error::Error;
use crate::store::{
    MessageKey, MessageKind, MessageRecord, NewDelivery, NewReceipt, Store, StoreChange,
};
use crate::tls::{self, SharedTrust, TlsIdentity};

pub(crate) mod audit;
pub(crate) mod deliver;
#[cfg(test)]
pub(crate) mod fixture;
pub(crate) mod receive;
pub(crate) mod send;

/// How long receipts keep travelling upstream after the envelope expired (ms).
pub(crate) const RECEIPT_GRACE_MS: u64 = 7 * 86_400_000;

/// The pieces of a body a request streams in (the plaintext of a Send,
/// the ciphertext of a delivery), read by the adapter that serves the
/// request: `None` at the end; an error if the stream fails, stalls or
/// carries something else.
pub(crate) trait Pieces: Send {
    /// The next piece.
    fn next_piece(&mut self) -> impl Future<Output = Result<Option<Vec<u8>>, Error>> + Send;
}

/// Bytes available to the daemon (not root's reserved blocks) on the
/// filesystem that holds `path`.
pub fn free_disk_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A peer directory entry, loaded.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) address: Option<String>,
    /// Its encryption certificate, then the intermediates that issued it (the
    /// rest of the configured PEM file).
    pub(crate) encryption: Option<Vec<Certificate>>,
    /// Its role on any route, by contract.
    pub(crate) role: HopRole,
}

/// Where this facility stands on an envelope's route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Position {
    /// Relay or final recipient.
    pub(crate) kind: MessageKind,
    /// Our role on the route.
    pub(crate) role: HopRole,
    /// Who must deliver it to us.
    pub(crate) upstream: PartyUri,
    /// Whom we deliver it to next (empty for a final recipient).
    pub(crate) next: Vec<PartyUri>,
}

/// The hops the holder of an envelope delivers to: the first relay, or every
/// recipient when there is none.
pub(crate) fn first_hops(head: &VerifiedHead) -> Vec<PartyUri> {
    let route = head.route();
    match route.relays.first() {
        Some(r) => vec![r.party.clone()],
        None => route.recipients.into_iter().map(|h| h.party).collect(),
    }
}

/// Where `us` stands on `head`'s route, or [`Error::NotOnRoute`].
pub(crate) fn position(head: &VerifiedHead, us: &PartyUri) -> Result<Position, Error> {
    let route = head.route();
    let sender = head.sender().party().clone();
    if let Some(i) = route.relays.iter().position(|h| &h.party == us) {
        let upstream = if i == 0 {
            sender
        } else {
            route.relays[i - 1].party.clone()
        };
        let next = match route.relays.get(i + 1) {
            Some(h) => vec![h.party.clone()],
            None => route.recipients.iter().map(|h| h.party.clone()).collect(),
        };
        return Ok(Position {
            kind: MessageKind::Relay,
            role: route.relays[i].role,
            upstream,
            next,
        });
    }
    if let Some(h) = route.recipients.iter().find(|h| &h.party == us) {
        return Ok(Position {
            kind: MessageKind::Inbound,
            role: h.role,
            upstream: route.relays.last().map_or(sender, |r| r.party.clone()),
            next: Vec::new(),
        });
    }
    Err(Error::NotOnRoute)
}

/// The daemon's shared state.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) party: PartyUri,
    pub(crate) identity: Identity,
    pub(crate) keys: Vec<DecryptionKey>,
    pub(crate) trust_source: Arc<SharedTrust>,
    pub(crate) client_trust: Arc<SharedTrust>,
    pub(crate) tls_identity: TlsIdentity,
    pub(crate) store: Arc<dyn Store>,
    /// The facility secret patient identifiers are pseudonymised under.
    pub(crate) subject_key: exchange_core::audit::SubjectKey,
    pub(crate) peers: HashMap<PartyUri, Peer>,
    pub(crate) clients: HashMap<PartyUri, ClientConfig>,
    channels: Mutex<HashMap<PartyUri, Channel>>,
    /// Woken when new work is stored (here, or by a fellow replica).
    pub(crate) work: Notify,
    /// Message ids whose status changed (here, or at a fellow replica).
    pub(crate) events: broadcast::Sender<MessageKey>,
    /// Heads sealed and verified here, until their first delivery attempts.
    sealed: SealedHeads,
    /// The time every protocol decision is taken at.
    clock: Arc<dyn Clock>,
}

/// Heads of envelopes this daemon sealed and verified at Send, kept until
/// their first delivery attempt so that the attempt does not check the same
/// signature and chain again. A verdict is reused only under the trust store
/// it was given under (a reload makes a new one) and was given at the
/// envelope's stored arrival time, which is where [`Node::verify_stored`]
/// checks: reusing it is that same check, already done. Bounded in entries
/// and bytes; when full, new heads are not kept (the ones held are the
/// oldest, the next to be delivered) and their attempts verify as before.
struct SealedHeads {
    held: Mutex<Held>,
    /// Most heads held.
    max: usize,
    /// Most bytes of heads held.
    max_bytes: usize,
}

#[derive(Default)]
struct Held {
    heads: HashMap<[u8; 32], SealedHead>,
    /// The sum of the held heads' lengths.
    bytes: usize,
}

impl Held {
    fn remove(&mut self, header_sha256: &[u8; 32]) {
        if let Some(s) = self.heads.remove(header_sha256) {
            self.bytes -= s.head.head().as_bytes().len();
        }
    }
}

impl Default for SealedHeads {
    fn default() -> Self {
        Self::with_room(SEALED_HEADS, SEALED_HEAD_BYTES)
    }
}

struct SealedHead {
    trust: Arc<TrustStore>,
    head: VerifiedHead,
    /// Delivery attempts still to take it (one per first hop).
    uses: usize,
    kept: std::time::Instant,
}

/// Most heads [`SealedHeads`] holds, and most bytes of heads.
const SEALED_HEADS: usize = 4096;
const SEALED_HEAD_BYTES: usize = 16 << 20;
/// A head not taken within this time (its message purged or failed before
/// an attempt) is dropped when room is needed.
const SEALED_HEAD_AGE: Duration = Duration::from_secs(600);

impl SealedHeads {
    fn with_room(max: usize, max_bytes: usize) -> Self {
        Self {
            held: Mutex::new(Held::default()),
            max,
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keep(&self, trust: Arc<TrustStore>, head: VerifiedHead, uses: usize) {
        let mut held = self.lock();
        let size = head.head().as_bytes().len();
        let full = |h: &Held| h.heads.len() >= self.max || h.bytes + size > self.max_bytes;
        if full(&held) {
            held.heads.retain(|_, s| s.kept.elapsed() < SEALED_HEAD_AGE);
            held.bytes = held
                .heads
                .values()
                .map(|s| s.head.head().as_bytes().len())
                .sum();
            if full(&held) {
                return;
            }
        }
        let key = head.head().header_sha256();
        held.remove(&key);
        held.bytes += size;
        held.heads.insert(
            key,
            SealedHead {
                trust,
                head,
                uses,
                kept: std::time::Instant::now(),
            },
        );
    }

    /// The head kept under `header_sha256`, if it is `head` (the stored
    /// bytes) and was verified under `trust`.
    fn take(
        &self,
        header_sha256: &[u8; 32],
        head: &[u8],
        trust: &Arc<TrustStore>,
    ) -> Option<VerifiedHead> {
        let mut held = self.lock();
        let sealed = held.heads.get_mut(header_sha256)?;
        let found = (Arc::ptr_eq(&sealed.trust, trust) && sealed.head.head().as_bytes() == head)
            .then(|| sealed.head.clone());
        sealed.uses = sealed.uses.saturating_sub(1);
        if sealed.uses == 0 || found.is_none() {
            held.remove(header_sha256);
        }
        found
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("party", &self.party)
            .finish_non_exhaustive()
    }
}

/// Builds a trust store from configured anchor and CRL files, with the
/// profile's revocation policy.
pub(crate) fn trust_store(
    config: &Config,
    anchors: &[std::path::PathBuf],
    crls: &[std::path::PathBuf],
) -> Result<TrustStore, Error> {
    let mut builder = TrustStore::builder();
    for a in anchors {
        builder = builder.anchors_pem(&config.read(a)?)?;
    }
    for c in crls {
        builder = builder.crls_pem(&config.read(c)?)?;
    }
    if !config.network.allow_missing_crls {
        builder = builder.require_crls();
    }
    if config.network.allow_stale_crls {
        builder = builder.allow_stale_crls();
    }
    Ok(builder.build()?)
}

impl Node {
    /// Loads credentials, trust and directories from `config` over `store`.
    pub(crate) fn new(config: Config, store: Arc<dyn Store>) -> Result<Self, Error> {
        Self::with_clock(config, store, Arc::new(SystemClock))
    }

    /// [`Node::new`], with every protocol decision (leases, backoff,
    /// expiry, the purge, receipt and audit times) taken at `clock`'s time.
    pub(crate) fn with_clock(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let id = &config.identity;
        let identity = Identity::from_pem(&config.read(&id.cert)?, &config.read(&id.key)?)?;
        let tls_identity = TlsIdentity::from_pem(&config.read(&id.cert)?, &config.read(&id.key)?)?;
        let mut keys = vec![DecryptionKey::from_pem(
            &config.read(&id.encryption_cert)?,
            &config.read(&id.encryption_key)?,
        )?];
        for old in &id.previous_encryption {
            keys.push(DecryptionKey::from_pem(
                &config.read(&old.cert)?,
                &config.read(&old.key)?,
            )?);
        }
        let trust = trust_store(&config, &config.trust.anchors, &config.trust.crls)?;
        let client_trust = match config.client_trust_files() {
            None => None,
            Some((anchors, crls)) => Some(SharedTrust::new(trust_store(&config, anchors, crls)?)),
        };
        let trust_source = SharedTrust::new(trust);
        let client_trust = client_trust.unwrap_or_else(|| trust_source.clone());
        let trust = trust_source.get();
        let party = identity.party().clone();
        // Our own credentials must pass the checks every peer will apply.
        let now = clock.now();
        trust.verify_identity(identity.chain(), now)?;
        for k in &keys[..1] {
            let key = trust.verify_encryption_chain(k.chain(), now)?;
            if key.party() != &party {
                return Err(Error::Config(format!(
                    "encryption certificate names {}, identity names {party}",
                    key.party()
                )));
            }
        }
        let mut peers = HashMap::new();
        for p in &config.peers {
            let encryption = match &p.encryption_cert {
                // The leaf, then its chain: path building needs the intermediates.
                Some(path) => Some(Certificate::from_pem(&config.read(path)?)?),
                None => None,
            };
            peers.insert(
                PartyUri::new(p.party.clone())?,
                Peer {
                    address: p.address.clone(),
                    encryption,
                    role: p.role.hop_role(),
                },
            );
        }
        let clients = config
            .clients
            .iter()
            .map(|c| Ok((PartyUri::new(c.party.clone())?, c.clone())))
            .collect::<Result<HashMap<_, _>, Error>>()?;
        let subject_key = crate::accountability::load_or_create_subject_key_at(
            &config.path(&config.data_dir),
            &crate::store::StoreLocation::of_config(&config),
        )?;
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            config,
            party,
            identity,
            keys,
            trust_source,
            client_trust,
            tls_identity,
            store,
            subject_key,
            peers,
            clients,
            channels: Mutex::new(HashMap::new()),
            work: Notify::new(),
            events,
            sealed: SealedHeads::default(),
            clock,
        })
    }

    /// The time now, as this node's clock tells it.
    pub(crate) fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// The network trust store in force (CRLs are refreshed while running).
    pub(crate) fn trust(&self) -> Arc<TrustStore> {
        self.trust_source.get()
    }

    /// Rebuilds the trust stores from their files.
    pub(crate) fn reload_trust(&self) -> Result<(), Error> {
        let c = &self.config;
        let network = trust_store(c, &c.trust.anchors, &c.trust.crls)?;
        match c.client_trust_files() {
            Some((anchors, crls)) => {
                let client = trust_store(c, anchors, crls)?;
                self.trust_source.replace(network);
                self.client_trust.replace(client);
            }
            None => self.trust_source.replace(network),
        }
        Ok(())
    }

    /// This facility's party URI.
    pub(crate) fn party(&self) -> &PartyUri {
        &self.party
    }

    /// A check value of the facility's pseudonym key (a pseudonym of a
    /// fixed text: it does not reveal the key).
    pub(crate) fn pseudonym_key_check(&self) -> [u8; 32] {
        *self
            .subject_key
            .pseudonym("exchange-daemon: pseudonym key check")
            .as_bytes()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn versions(&self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        tls::versions(self.config.network.allow_tls12)
    }

    /// A (cached, lazily connecting) channel to `party`'s peer service, pinned to it.
    pub(crate) fn channel(&self, party: &PartyUri) -> Result<Channel, Error> {
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Error::Transport("channel cache poisoned".into()))?;
        if let Some(c) = channels.get(party) {
            return Ok(c.clone());
        }
        let address = self
            .peers
            .get(party)
            .and_then(|p| p.address.as_deref())
            .ok_or_else(|| Error::UnknownPeer(party.to_string()))?;
        let config = tls::client_config_shared(
            self.trust_source.clone(),
            party.clone(),
            Some(&self.tls_identity),
            self.versions(),
        )?;
        let channel = tls::channel(address, config, self.config.delivery.connect_timeout())?;
        channels.insert(party.clone(), channel.clone());
        Ok(channel)
    }

    /// The local client behind a connection.
    pub(crate) fn client(&self, party: &PartyUri) -> Result<&ClientConfig, Error> {
        self.clients
            .get(party)
            .ok_or_else(|| Error::UnknownClient(party.to_string()))
    }

    /// Verifies a stored head (stored envelopes were verified on arrival;
    /// this re-checks the signature and chain at the time of arrival, with
    /// today's CRLs).
    pub(crate) fn verify_stored(&self, record: &MessageRecord) -> Result<VerifiedHead, Error> {
        let head = EnvelopeHead::decode(&record.head)?;
        Ok(head.verify_ignoring_expiry(&self.trust(), from_unix_ms(record.received_ms))?)
    }

    /// Keeps the head of an envelope sealed here, verified under `trust`
    /// at its stored arrival time, for the first attempt to each of its
    /// `first_hops` next hops.
    pub(crate) fn keep_sealed_head(
        &self,
        trust: Arc<TrustStore>,
        head: VerifiedHead,
        first_hops: usize,
    ) {
        self.sealed.keep(trust, head, first_hops);
    }

    /// [`Node::verify_stored`] for a delivery attempt: a head sealed and
    /// verified here under the trust store still in force is not verified
    /// again.
    pub(crate) fn verify_for_delivery(
        &self,
        record: &MessageRecord,
    ) -> Result<VerifiedHead, Error> {
        let trust = self.trust();
        match self
            .sealed
            .take(&record.header_sha256, &record.head, &trust)
        {
            Some(head) => Ok(head),
            None => Ok(EnvelopeHead::decode(&record.head)?
                .verify_ignoring_expiry(&trust, from_unix_ms(record.received_ms))?),
        }
    }

    /// Signs a receipt about `head`.
    pub(crate) fn sign_receipt(
        &self,
        head: &VerifiedHead,
        role: HopRole,
        disposition: Disposition,
        now: SystemTime,
    ) -> SignedReceipt {
        SignedReceipt::issue(
            &self.identity,
            &ReceiptContent::for_head(head, role, disposition, now),
        )
    }

    /// The stored receipts of `record`, read back and tied to `head`. Each
    /// was verified with the full policy (signature, chain and revocation at
    /// its issue time) when it arrived, and only then stored with the time
    /// of that verdict; it is read back without checking the signature or
    /// the chain again, so a status poll costs no signature check per
    /// receipt, and a later revocation of its issuer does not unmake the
    /// verdict (see [`Node::issuer_revoked_since`]). A row stored before the
    /// verdict was recorded is verified as it is read, with the chain but
    /// without revocation. The reading runs on the blocking pool, off the
    /// runtime threads. One that no longer reads back (a damaged row) is
    /// logged and left out: it must not cost the others.
    pub(crate) async fn stored_receipts(
        &self,
        record: &MessageRecord,
        head: &VerifiedHead,
    ) -> Result<Vec<VerifiedReceipt>, Error> {
        let stored = self.store.receipts(record.key).await?;
        if stored.is_empty() {
            return Ok(Vec::new());
        }
        let trust = self.trust();
        let head = head.clone();
        let id = record.id;
        tokio::task::spawn_blocking(move || {
            let mut unrecorded: Option<TrustStore> = None;
            let mut out = Vec::with_capacity(stored.len());
            for r in &stored {
                let read_back = SignedReceipt::from_bytes(&r.signed)
                    .and_then(|signed| match r.verified_ms {
                        Some(_) => signed.read_back_verified(),
                        None => signed
                            .verify(unrecorded.get_or_insert_with(|| trust.without_revocation())),
                    })
                    .and_then(|receipt| receipt.check_for(&head).map(|()| receipt));
                match read_back {
                    Ok(v) => out.push(v),
                    Err(e) => tracing::error!(
                        message = %id,
                        issuer = %r.issuer,
                        error = %e,
                        "a stored receipt no longer reads back; run admin verify-store"
                    ),
                }
            }
            out
        })
        .await
        .map_err(|_| Error::Shutdown)
    }

    /// Whether the issuer of a stored receipt has been revoked since it
    /// arrived (shown beside the receipt; it stays evidence): a CRL in
    /// force lists a certificate of the chain it carries. A lookup in the
    /// CRLs, not a new verification.
    pub(crate) fn issuer_revoked_since(&self, receipt: &VerifiedReceipt) -> bool {
        let trust = self.trust();
        receipt
            .signed()
            .issuer_chain()
            .is_ok_and(|chain| chain.iter().any(|c| trust.lists_revoked(c)))
    }

    /// Verifies receipts a peer returned and ties each to `head`, on the
    /// blocking pool (signature and chain checks are CPU-bound; a call
    /// carries at most `limits.max_receipts_per_call`).
    pub(crate) async fn check_receipts(
        &self,
        head: &VerifiedHead,
        receipts: Vec<Vec<u8>>,
    ) -> Result<Vec<VerifiedReceipt>, Error> {
        let trust = self.trust();
        let head = head.clone();
        tokio::task::spawn_blocking(move || {
            receipts
                .iter()
                .map(|bytes| {
                    let receipt = SignedReceipt::from_bytes(bytes)?.verify(&trust)?;
                    receipt.check_for(&head)?;
                    Ok(receipt)
                })
                .collect()
        })
        .await
        .map_err(|_| Error::Shutdown)?
    }

    /// Verifies receipts a peer returned (signature, issuer chain and
    /// revocation at their issue time) on the blocking pool: the checks are
    /// CPU-bound, and a call carries at most `limits.max_receipts_per_call`.
    /// Each must still be tied to its envelope ([`VerifiedReceipt::check_for`]).
    pub(crate) async fn verify_receipts(
        &self,
        receipts: Vec<Vec<u8>>,
    ) -> Result<Vec<VerifiedReceipt>, Error> {
        let trust = self.trust();
        tokio::task::spawn_blocking(move || {
            receipts
                .iter()
                .map(|bytes| Ok(SignedReceipt::from_bytes(bytes)?.verify(&trust)?))
                .collect()
        })
        .await
        .map_err(|_| Error::Shutdown)?
    }

    /// Refuses a new envelope (`incoming` ciphertext bytes, 0 if not yet
    /// known) when the store's filesystem would keep less free space than
    /// `limits.min_free_disk_bytes`. Reads, acknowledgements, receipts, the
    /// purge and the audit log are not held to the reserve.
    pub(crate) fn check_disk_reserve(&self, incoming: u64) -> Result<(), Error> {
        let reserve = self.config.limits.min_free_disk_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let dir = self.config.path(&self.config.data_dir);
        let free = free_disk_bytes(&dir).map_err(|source| {
            Error::Store(crate::error::StoreError::Io {
                op: "statvfs",
                path: dir.clone(),
                source,
            })
        })?;
        let needed = reserve.saturating_add(incoming);
        if free < needed {
            tracing::warn!(
                free_bytes = free,
                reserve_bytes = reserve,
                incoming_bytes = incoming,
                "free disk space below the reserve: new envelope refused"
            );
            return Err(Error::DiskReserve {
                free,
                reserve,
                incoming,
            });
        }
        Ok(())
    }

    /// A receipt to keep, passed on upstream when we are a relay, with the
    /// audit entry of its arrival from `actor` (appended if it is new).
    pub(crate) fn keep_receipt(
        &self,
        record: &MessageRecord,
        receipt: &VerifiedReceipt,
        actor: &str,
    ) -> NewReceipt {
        let forward = match (record.kind, &record.upstream) {
            (MessageKind::Relay | MessageKind::Inbound, Some(up)) if receipt.issuer() != up => {
                Some(NewDelivery {
                    target: up.clone(),
                    kind: crate::store::DeliveryKind::Receipt(receipt.signed().to_bytes()),
                    expires_ms: record.expires_ms.saturating_add(RECEIPT_GRACE_MS),
                })
            }
            _ => None,
        };
        let audit = self.entry(
            actor,
            AuditAction::Receipt,
            Some(record.id),
            AuditOutcome::Ok,
            None,
            Some(format!(
                "{} by {} ({})",
                receipt.disposition(),
                receipt.issuer(),
                receipt.role()
            )),
        );
        NewReceipt {
            signed: receipt.signed().to_bytes(),
            issuer: receipt.issuer().clone(),
            disposition: receipt.disposition().as_str().to_owned(),
            issued_ms: unix_ms(receipt.issued()),
            verified_ms: unix_ms(self.now()),
            forward,
            provisions: Vec::new(),
            audit: Some(audit),
        }
    }

    /// A relay as a client names it, `party` or `party=entrusted|third-party`:
    /// the party and the role the client asked for, if any.
    pub(crate) fn parse_relay(spec: &str) -> Result<(PartyUri, Option<HopRole>), Error> {
        let (party, role) = match spec.split_once('=') {
            Some((p, r)) => (p, Some(r.parse::<HopRole>()?)),
            None => (spec, None),
        };
        Ok((PartyUri::new(party.to_owned())?, role))
    }

    /// The role `party` takes on any route: what the peer directory's
    /// contract says (third-party for a party it does not list). A client
    /// that `asked` for another role is refused.
    pub(crate) fn contracted_role(
        &self,
        party: &PartyUri,
        asked: Option<HopRole>,
    ) -> Result<HopRole, Error> {
        let contracted = self
            .peers
            .get(party)
            .map_or(HopRole::ThirdParty, |p| p.role);
        match asked {
            Some(asked) if asked != contracted => Err(Error::RoleMismatch {
                party: party.to_string(),
                asked: asked.as_str().to_owned(),
                contracted: contracted.as_str().to_owned(),
            }),
            _ => Ok(contracted),
        }
    }
}

/// Passes on the changes the store announces (its other writers', the
/// facility's fellow replicas): due work wakes the delivery loop, a
/// message's change wakes its status watches. Returns at `stop`, or at once
/// when the store announces nothing (this daemon is its only writer).
pub(crate) async fn follow_changes(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(mut changes) = node.store.changes() else {
        return;
    };
    loop {
        let change = tokio::select! {
            change = changes.recv() => change,
            _ = stop.wait_for(|s| *s) => return,
        };
        match change {
            Ok(StoreChange::Work) => node.work.notify_one(),
            Ok(StoreChange::Message(key)) => {
                // No watch listening is not an error.
                let _ = node.events.send(key);
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // Some are lost: look for work now; the watches' polls
                // find the rest.
                tracing::debug!(missed, "store changes missed");
                node.work.notify_one();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exchange_core::ca::{CertificateAuthority, Validity};
    use exchange_core::envelope::SealerBuilder;

    /// A trust store and `n` heads sealed by one sender and verified under it.
    fn sealed_heads(n: usize) -> (Arc<TrustStore>, Vec<VerifiedHead>, Vec<u8>) {
        let now = SystemTime::now();
        let validity = Validity::days_from(now - Duration::from_secs(60), 30);
        let ca = CertificateAuthority::generate("CA", validity).unwrap();
        let anchors = ca.certificate_pem().as_bytes().to_vec();
        let trust = Arc::new(
            TrustStore::builder()
                .anchors_pem(&anchors)
                .unwrap()
                .build()
                .unwrap(),
        );
        let issue = |uri: &str| {
            ca.issue_party(&PartyUri::new(uri).unwrap(), uri, validity)
                .unwrap()
        };
        let (sender, to) = (issue("urn:t:clinic"), issue("urn:t:hospital"));
        let identity = Identity::from_pem(
            sender.identity.cert_pem.as_bytes(),
            sender.identity.key_pem.as_bytes(),
        )
        .unwrap();
        let to = Certificate::from_pem(to.encryption.cert_pem.as_bytes())
            .unwrap()
            .remove(0);
        let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
        let heads = (0..n)
            .map(|_| {
                let key = trust.verify_encryption(&to, now).unwrap();
                let mut out = Vec::new();
                SealerBuilder::new(&identity, "text/plain")
                    .recipient(key, HopRole::ThirdParty)
                    .purpose("treatment")
                    .start(now, &mut rng)
                    .unwrap()
                    .finish(&mut out)
                    .verify(&trust, now)
                    .unwrap()
            })
            .collect();
        (trust, heads, anchors)
    }

    fn take(cache: &SealedHeads, head: &VerifiedHead, trust: &Arc<TrustStore>) -> bool {
        let bytes = head.head().as_bytes();
        cache
            .take(&head.head().header_sha256(), bytes, trust)
            .is_some_and(|h| h.head().as_bytes() == bytes)
    }

    #[test]
    fn a_sealed_head_serves_one_attempt_per_first_hop_then_is_gone() {
        let (trust, heads, _) = sealed_heads(2);
        let cache = SealedHeads::default();
        cache.keep(trust.clone(), heads[0].clone(), 2);
        assert!(!take(&cache, &heads[1], &trust), "a head never kept");
        assert!(take(&cache, &heads[0], &trust));
        assert!(take(&cache, &heads[0], &trust));
        assert!(!take(&cache, &heads[0], &trust), "kept for two hops only");
        assert!(cache.lock().heads.is_empty() && cache.lock().bytes == 0);
    }

    #[test]
    fn a_head_verified_under_another_trust_store_is_not_reused() {
        let (trust, heads, anchors) = sealed_heads(1);
        let cache = SealedHeads::default();
        cache.keep(trust.clone(), heads[0].clone(), 2);
        // A reload builds a new store, even from the same files: its CRLs
        // may revoke the sender, so the verdict must be given again.
        let reloaded = Arc::new(
            TrustStore::builder()
                .anchors_pem(&anchors)
                .unwrap()
                .build()
                .unwrap(),
        );
        assert!(!take(&cache, &heads[0], &reloaded));
        assert!(
            !take(&cache, &heads[0], &trust),
            "dropped, not kept for later"
        );
        // Other bytes under the same digest are never answered from it.
        cache.keep(trust.clone(), heads[0].clone(), 1);
        let mut other = heads[0].head().as_bytes().to_vec();
        other.push(0);
        assert!(
            cache
                .take(&heads[0].head().header_sha256(), &other, &trust)
                .is_none()
        );
        assert!(cache.lock().heads.is_empty() && cache.lock().bytes == 0);
    }

    #[test]
    fn when_full_new_heads_are_not_kept_and_the_held_ones_stay() {
        let (trust, heads, _) = sealed_heads(3);
        let cache = SealedHeads::with_room(2, SEALED_HEAD_BYTES);
        for h in &heads {
            cache.keep(trust.clone(), h.clone(), 1);
        }
        assert_eq!(cache.lock().heads.len(), 2);
        assert!(take(&cache, &heads[0], &trust));
        assert!(take(&cache, &heads[1], &trust));
        assert!(!take(&cache, &heads[2], &trust), "kept past its room");

        // The same in bytes: room for two heads' bytes holds two (signature
        // encodings differ in length by a few bytes, hence the slack).
        let two = heads[0].head().as_bytes().len() + heads[1].head().as_bytes().len();
        let cache = SealedHeads::with_room(SEALED_HEADS, two + 8);
        for h in &heads {
            cache.keep(trust.clone(), h.clone(), 1);
        }
        assert_eq!(cache.lock().heads.len(), 2);
        assert_eq!(cache.lock().bytes, two);
        assert!(!take(&cache, &heads[2], &trust), "kept past its bytes");
        // Taken heads free their bytes for new ones.
        assert!(take(&cache, &heads[0], &trust));
        cache.keep(trust.clone(), heads[2].clone(), 1);
        assert!(take(&cache, &heads[2], &trust));
    }
}
