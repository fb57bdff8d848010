//! Envelopes: seal and open, streaming in constant memory.
//!
//! An envelope is a *head* (signed public header, signature, sender chain)
//! followed by the ciphertext stream (docs/envelope-format.md §2-§6).
//!
//! * [`SealerBuilder`] → [`Sealer`]: push plaintext in, take ciphertext out,
//!   `finish` signs and returns the [`EnvelopeHead`]. The head names the
//!   ciphertext digest, so it is complete only after the last byte.
//! * [`EnvelopeHead::verify`] → [`VerifiedHead`]: signature over the exact
//!   header bytes, sender chain, sender binding and expiry, before the header
//!   is trusted. A relay stops here and checks the stream with
//!   [`VerifiedHead::ciphertext_verifier`] without being able to decrypt.
//! * [`VerifiedHead::open`] → [`PayloadOpener`]: finds our recipient entry,
//!   unwraps the content key, checks the key commitment and decrypts the inner
//!   metadata; then decrypts chunks.
//!
//! Each chunk is authenticated with its position and a last-chunk flag, so
//! plaintext handed out by [`PayloadOpener::update`] is genuine and in order.
//! The message is complete only when [`PayloadOpener::finish`] returns `Ok`
//! (length and digest checked): callers write plaintext to a temporary place
//! and publish it only then.

use std::fmt;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::error::{Error, FormatError};
use crate::identity::{Certificate, DecryptionKey, Identity};
use crate::ids::{Fingerprint, MessageId, PartyUri};
use crate::proto;
use crate::route::{Hop, HopRole, Route};
use crate::suite::{self, ChunkCipher, Hasher, KeySchedule, SecretKey32, TAG_LEN};
use crate::trust::{TrustStore, VerifiedParty, VerifiedRecipientKey};

/// File-form magic (docs/envelope-format.md §2).
pub const MAGIC: &[u8; 6] = b"EXENV\0";
/// File-form version.
pub const FILE_VERSION: u16 = 1;
/// Largest head accepted (bytes).
pub const MAX_HEAD_LEN: u32 = 1 << 20;
/// Default plaintext chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 256;
/// Largest chunk size accepted.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Most recipients in one envelope.
pub const MAX_RECIPIENTS: usize = 256;
/// Most relays on a route.
pub const MAX_RELAYS: usize = 16;
/// Most certificates in a sender chain.
pub const MAX_CHAIN: usize = 8;
/// Default lifetime of an envelope.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Tolerated clock skew for a creation time in the future.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
const MAX_TEXT: usize = 256;

/// A patient or subject identifier with the system that issued it.
#[derive(Clone, PartialEq, Eq)]
pub struct SubjectId {
    /// Issuing system (e.g. `urn:oid:…` of a facility's patient-number namespace).
    pub system: String,
    /// The identifier.
    pub value: String,
}

impl fmt::Debug for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubjectId({}, [redacted])", self.system)
    }
}

/// The encrypted inner header: only recipients can read it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct InnerMetadata {
    /// Patient / subject identifiers.
    pub subject_ids: Vec<SubjectId>,
    /// Document title.
    pub title: String,
    /// Document type (e.g. 診療情報提供書, a LOINC code).
    pub document_type: String,
    /// Original file name.
    pub file_name: String,
}

impl fmt::Debug for InnerMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InnerMetadata")
            .field("subject_ids", &self.subject_ids)
            .field("title", &"[redacted]")
            .field("document_type", &self.document_type)
            .finish_non_exhaustive()
    }
}

impl InnerMetadata {
    fn to_proto(&self) -> proto::InnerMetadata {
        proto::InnerMetadata {
            subject_ids: self
                .subject_ids
                .iter()
                .map(|s| proto::SubjectId {
                    system: s.system.clone(),
                    value: s.value.clone(),
                })
                .collect(),
            title: self.title.clone(),
            document_type: self.document_type.clone(),
            file_name: self.file_name.clone(),
        }
    }

    fn from_proto(p: proto::InnerMetadata) -> Self {
        Self {
            subject_ids: p
                .subject_ids
                .into_iter()
                .map(|s| SubjectId {
                    system: s.system,
                    value: s.value,
                })
                .collect(),
            title: p.title,
            document_type: p.document_type,
            file_name: p.file_name,
        }
    }
}

/// One recipient entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientEntry {
    /// Recipient party.
    pub party: PartyUri,
    /// Fingerprint of its encryption certificate.
    pub key_fingerprint: Fingerprint,
    /// Its role on the route.
    pub role: HopRole,
    enc: Vec<u8>,
    wrapped: Vec<u8>,
}

impl RecipientEntry {
    /// The HPKE encapsulated key.
    pub fn enc(&self) -> &[u8] {
        &self.enc
    }

    /// The HPKE-wrapped content key.
    pub fn wrapped_key(&self) -> &[u8] {
        &self.wrapped
    }
}

/// The decoded public header. Trust it only through [`VerifiedHead`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// Message id.
    pub message_id: MessageId,
    /// Sending party.
    pub sender: PartyUri,
    /// Fingerprint of the sender's identity certificate.
    pub sender_fingerprint: Fingerprint,
    /// Recipient entries.
    pub recipients: Vec<RecipientEntry>,
    /// Creation time.
    pub created: SystemTime,
    /// Expiry time.
    pub expires: SystemTime,
    /// Payload content type (MIME type).
    pub content_type: String,
    /// Purpose or legal basis of the transfer.
    pub purpose: String,
    /// Relays in travel order.
    pub relays: Vec<Hop>,
    /// Plaintext length.
    pub payload_length: u64,
    /// Plaintext chunk size.
    pub chunk_size: u32,
    /// SHA-256 of the whole ciphertext stream.
    pub ciphertext_sha256: [u8; 32],
    /// Key commitment (HKDF of the content key).
    pub key_commitment: [u8; 32],
    sealed_metadata: Vec<u8>,
}

/// Unix milliseconds (docs/envelope-format.md §1); times before 1970 clamp to 0.
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn arr32(b: &[u8], field: &'static str) -> Result<[u8; 32], Error> {
    b.try_into()
        .map_err(|_| FormatError::InvalidField(field).into())
}

fn check_text(s: &str, field: &'static str, required: bool) -> Result<(), Error> {
    if (required && s.is_empty()) || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(FormatError::InvalidField(field).into());
    }
    Ok(())
}

/// Whether no party appears twice on a route (relays and recipients together):
/// receipts are matched to hops by party, so a repeated party would be ambiguous.
fn parties_unique<'p>(parties: impl Iterator<Item = &'p PartyUri>) -> bool {
    let mut all: Vec<&PartyUri> = parties.collect();
    all.sort_unstable();
    all.windows(2).all(|w| w[0] != w[1])
}

/// Number of chunks and ciphertext length for a payload (docs/envelope-format.md §6).
pub fn ciphertext_length(payload_length: u64, chunk_size: u32) -> Option<(u64, u64)> {
    let chunks = payload_length.div_ceil(u64::from(chunk_size)).max(1);
    let len = payload_length.checked_add(chunks.checked_mul(TAG_LEN as u64)?)?;
    Some((chunks, len))
}

impl Header {
    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let p = proto::Header::decode(bytes).map_err(|_| FormatError::Decode("header"))?;
        if p.version != suite::FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(p.version).into());
        }
        if p.recipients.is_empty() {
            return Err(FormatError::MissingField("recipients").into());
        }
        if p.recipients.len() > MAX_RECIPIENTS {
            return Err(FormatError::InvalidField("recipients").into());
        }
        if p.route.len() > MAX_RELAYS {
            return Err(FormatError::InvalidField("route").into());
        }
        let recipients = p
            .recipients
            .into_iter()
            .map(|r| {
                if r.enc.len() != suite::ENC_LEN || r.wrapped_key.len() != suite::WRAPPED_LEN {
                    return Err(Error::Format(FormatError::InvalidField("recipient entry")));
                }
                Ok(RecipientEntry {
                    party: PartyUri::new(r.party)?,
                    key_fingerprint: Fingerprint::from_slice(
                        &r.key_fingerprint,
                        "key_fingerprint",
                    )?,
                    role: HopRole::from_wire(r.role, "recipient role")?,
                    enc: r.enc,
                    wrapped: r.wrapped_key,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut fps: Vec<_> = recipients.iter().map(|r| r.key_fingerprint).collect();
        fps.sort_unstable();
        if fps.windows(2).any(|w| w[0] == w[1]) {
            return Err(FormatError::InvalidField("recipients (duplicate key)").into());
        }
        let relays = p
            .route
            .into_iter()
            .map(|h| {
                Ok(Hop {
                    party: PartyUri::new(h.party)?,
                    role: HopRole::from_wire(h.role, "route role")?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let route_parties = relays.iter().map(|h| &h.party);
        if !parties_unique(route_parties.chain(recipients.iter().map(|r| &r.party))) {
            return Err(FormatError::InvalidField("route (party named twice)").into());
        }
        if p.expires_ms <= p.created_ms {
            return Err(FormatError::InvalidField("expires").into());
        }
        check_text(&p.content_type, "content_type", true)?;
        check_text(&p.purpose, "purpose", false)?;
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&p.chunk_size)
            || ciphertext_length(p.payload_length, p.chunk_size).is_none()
        {
            return Err(FormatError::InvalidField("chunk_size").into());
        }
        if p.sealed_metadata.len() < TAG_LEN {
            return Err(FormatError::InvalidField("sealed_metadata").into());
        }
        Ok(Self {
            version: p.version,
            message_id: MessageId::from_slice(&p.message_id)?,
            sender: PartyUri::new(p.sender)?,
            sender_fingerprint: Fingerprint::from_slice(
                &p.sender_fingerprint,
                "sender_fingerprint",
            )?,
            recipients,
            created: from_ms(p.created_ms),
            expires: from_ms(p.expires_ms),
            content_type: p.content_type,
            purpose: p.purpose,
            relays,
            payload_length: p.payload_length,
            chunk_size: p.chunk_size,
            ciphertext_sha256: arr32(&p.ciphertext_sha256, "ciphertext_sha256")?,
            key_commitment: arr32(&p.key_commitment, "key_commitment")?,
            sealed_metadata: p.sealed_metadata,
        })
    }

    fn to_proto(&self) -> proto::Header {
        proto::Header {
            version: self.version,
            message_id: self.message_id.as_bytes().to_vec(),
            sender: self.sender.to_string(),
            sender_fingerprint: self.sender_fingerprint.as_bytes().to_vec(),
            recipients: self
                .recipients
                .iter()
                .map(|r| proto::Recipient {
                    party: r.party.to_string(),
                    key_fingerprint: r.key_fingerprint.as_bytes().to_vec(),
                    enc: r.enc.clone(),
                    wrapped_key: r.wrapped.clone(),
                    role: r.role.to_wire(),
                })
                .collect(),
            created_ms: to_ms(self.created),
            expires_ms: to_ms(self.expires),
            content_type: self.content_type.clone(),
            purpose: self.purpose.clone(),
            route: self
                .relays
                .iter()
                .map(|h| proto::Hop {
                    party: h.party.to_string(),
                    role: h.role.to_wire(),
                })
                .collect(),
            payload_length: self.payload_length,
            chunk_size: self.chunk_size,
            ciphertext_sha256: self.ciphertext_sha256.to_vec(),
            key_commitment: self.key_commitment.to_vec(),
            sealed_metadata: self.sealed_metadata.clone(),
        }
    }

    /// The declared route: relays, then every recipient with its role.
    pub fn route(&self) -> Route {
        Route {
            relays: self.relays.clone(),
            recipients: self
                .recipients
                .iter()
                .map(|r| Hop {
                    party: r.party.clone(),
                    role: r.role,
                })
                .collect(),
        }
    }

    /// `(chunks, ciphertext bytes)` this header declares.
    pub fn ciphertext_length(&self) -> u64 {
        // Checked in `decode` and by the sealer.
        ciphertext_length(self.payload_length, self.chunk_size).map_or(u64::MAX, |(_, l)| l)
    }
}

/// The head of an envelope as received: not yet trusted.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeHead {
    bytes: Vec<u8>,
    header: Vec<u8>,
    signature: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl fmt::Debug for EnvelopeHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeHead")
            .field("len", &self.bytes.len())
            .field("header_sha256", &hex::encode(self.header_sha256()))
            .finish_non_exhaustive()
    }
}

impl EnvelopeHead {
    /// Decodes the network form: the encoded `Head` message.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_HEAD_LEN as usize {
            return Err(FormatError::TooLarge {
                what: "head",
                len: bytes.len() as u64,
                limit: u64::from(MAX_HEAD_LEN),
            }
            .into());
        }
        let p = proto::Head::decode(bytes).map_err(|_| FormatError::Decode("head"))?;
        if p.header.is_empty() {
            return Err(FormatError::MissingField("header").into());
        }
        if p.signature.len() != suite::SIGNATURE_LEN {
            return Err(FormatError::InvalidField("signature").into());
        }
        if p.sender_chain.is_empty() {
            return Err(FormatError::MissingField("sender_chain").into());
        }
        if p.sender_chain.len() > MAX_CHAIN {
            return Err(FormatError::InvalidField("sender_chain").into());
        }
        Ok(Self {
            bytes: bytes.to_vec(),
            header: p.header,
            signature: p.signature,
            chain: p.sender_chain,
        })
    }

    /// Reads the file-form prefix (magic, version, head length, head) from `r`,
    /// leaving `r` at the first ciphertext byte.
    pub fn read_from(r: &mut impl Read) -> Result<Self, Error> {
        let mut fixed = [0u8; 12];
        read_exact(r, &mut fixed, "envelope prefix")?;
        if &fixed[..6] != MAGIC {
            return Err(FormatError::BadMagic("an envelope").into());
        }
        let version = u16::from_be_bytes([fixed[6], fixed[7]]);
        if version != FILE_VERSION {
            return Err(FormatError::UnsupportedVersion(u32::from(version)).into());
        }
        let len = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if len > MAX_HEAD_LEN {
            return Err(FormatError::TooLarge {
                what: "head",
                len: u64::from(len),
                limit: u64::from(MAX_HEAD_LEN),
            }
            .into());
        }
        let mut head = vec![0u8; len as usize];
        read_exact(r, &mut head, "head")?;
        Self::decode(&head)
    }

    /// The file-form prefix: magic, version, head length, head. Ciphertext follows it.
    pub fn file_prefix(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.bytes.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FILE_VERSION.to_be_bytes());
        // Bounded by MAX_HEAD_LEN on construction.
        out.extend_from_slice(
            &u32::try_from(self.bytes.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.bytes);
        out
    }

    /// The network form (encoded `Head`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The signed header bytes.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// The header signature (64 bytes, `r || s`).
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// SHA-256 of the signed header bytes (what receipts name).
    pub fn header_sha256(&self) -> [u8; 32] {
        suite::sha256(&self.header)
    }

    /// Decodes the header *without verifying it*: for display and diagnostics only.
    pub fn header_unverified(&self) -> Result<Header, Error> {
        Header::decode(&self.header)
    }

    /// Parses the sender chain without validating it.
    pub fn sender_chain_unverified(&self) -> Result<Vec<Certificate>, Error> {
        self.chain
            .iter()
            .map(|d| Certificate::from_der(d.clone()))
            .collect()
    }

    /// Verifies the head at `now`: the signature over the exact header bytes
    /// (before the header is parsed), the binding of header sender to the
    /// signing certificate, the sender chain against `trust`, and expiry.
    pub fn verify(&self, trust: &TrustStore, now: SystemTime) -> Result<VerifiedHead, Error> {
        let head = self.verify_ignoring_expiry(trust, now)?;
        if now > head.header.expires {
            return Err(Error::Expired {
                at: head.header.expires,
            });
        }
        Ok(head)
    }

    /// Like [`verify`](Self::verify) but accepts an envelope past its expiry:
    /// for reading archived messages, never for accepting new ones.
    pub fn verify_ignoring_expiry(
        &self,
        trust: &TrustStore,
        now: SystemTime,
    ) -> Result<VerifiedHead, Error> {
        let chain = self.sender_chain_unverified()?;
        let leaf = &chain[0];
        suite::verify(
            &(*leaf.public_key()?).into(),
            suite::HEADER_CONTEXT,
            &self.header,
            &self.signature,
        )?;
        let header = Header::decode(&self.header)?;
        let sender = trust.verify_identity(&chain, now)?;
        if sender.party() != &header.sender || leaf.fingerprint() != header.sender_fingerprint {
            return Err(Error::SenderMismatch);
        }
        if header.created > now + MAX_CLOCK_SKEW {
            return Err(Error::NotYetValid);
        }
        Ok(VerifiedHead {
            head: self.clone(),
            header,
            sender,
        })
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Format(FormatError::UnexpectedEof(what))
        } else {
            Error::Io(e)
        }
    })
}

/// A head whose signature, sender chain and expiry verified. Only
/// [`EnvelopeHead::verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedHead {
    head: EnvelopeHead,
    header: Header,
    sender: VerifiedParty,
}

impl VerifiedHead {
    /// The verified header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The verified sender.
    pub fn sender(&self) -> &VerifiedParty {
        &self.sender
    }

    /// The head as received (for storage and forwarding, byte for byte).
    pub fn head(&self) -> &EnvelopeHead {
        &self.head
    }

    /// The declared route.
    pub fn route(&self) -> Route {
        self.header.route()
    }

    /// A checker for the ciphertext stream that does not decrypt (for relays).
    pub fn ciphertext_verifier(&self) -> CiphertextVerifier {
        CiphertextVerifier {
            hasher: Hasher::default(),
            expected_len: self.header.ciphertext_length(),
            received: 0,
            expected_digest: self.header.ciphertext_sha256,
        }
    }

    /// Opens the envelope with the first of `keys` that it names as a
    /// recipient: unwraps the content key, checks the key commitment and
    /// decrypts the inner metadata. No payload plaintext yet.
    pub fn open(&self, keys: &[DecryptionKey]) -> Result<PayloadOpener, Error> {
        let h = &self.header;
        let (key, entry) = keys
            .iter()
            .find_map(|k| {
                let cert = k.certificate();
                h.recipients
                    .iter()
                    .find(|r| {
                        r.key_fingerprint == cert.fingerprint()
                            && cert.party().is_ok_and(|p| p == &r.party)
                    })
                    .map(|r| (k, r))
            })
            .ok_or(Error::NotARecipient)?;
        let cek = suite::unwrap_key(
            key.key().secret(),
            &entry.enc,
            &entry.wrapped,
            &h.message_id,
            entry.key_fingerprint.as_bytes(),
        )?;
        let schedule = KeySchedule::derive(&cek, &h.message_id);
        if !suite::commitment_matches(&schedule.commitment, &h.key_commitment) {
            return Err(Error::CommitmentMismatch);
        }
        let meta = suite::open_metadata(&schedule.metadata_key, &h.sealed_metadata)?;
        let meta = proto::InnerMetadata::decode(meta.as_slice())
            .map_err(|_| FormatError::Decode("inner metadata"))?;
        Ok(PayloadOpener {
            recipient: entry.party.clone(),
            role: entry.role,
            metadata: InnerMetadata::from_proto(meta),
            cipher: ChunkCipher::new(&schedule.payload_key),
            chunk_size: h.chunk_size,
            payload_length: h.payload_length,
            index: 0,
            buf: Zeroizing::new(Vec::with_capacity(h.chunk_size as usize + TAG_LEN)),
            verifier: self.ciphertext_verifier(),
        })
    }
}

/// Checks a ciphertext stream's length and digest against the signed header.
#[derive(Clone)]
pub struct CiphertextVerifier {
    hasher: Hasher,
    expected_len: u64,
    received: u64,
    expected_digest: [u8; 32],
}

impl CiphertextVerifier {
    /// Feeds ciphertext. Fails as soon as more than the declared length arrives.
    pub fn update(&mut self, data: &[u8]) -> Result<(), Error> {
        self.received = self.received.saturating_add(data.len() as u64);
        if self.received > self.expected_len {
            return Err(Error::TrailingData);
        }
        self.hasher.update(data);
        Ok(())
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Reads `r` to its end through the checker, then [`finish`](Self::finish)es.
    pub fn verify_stream(mut self, r: &mut impl Read) -> Result<(), Error> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return self.finish(),
                Ok(n) => self.update(&buf[..n])?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks that the whole stream arrived and matches the signed digest.
    pub fn finish(self) -> Result<(), Error> {
        if self.received < self.expected_len {
            return Err(Error::Truncated {
                expected: self.expected_len,
                received: self.received,
            });
        }
        if self.hasher.finish() != self.expected_digest {
            return Err(Error::DigestMismatch);
        }
        Ok(())
    }
}

/// Decrypts the payload of an envelope addressed to us.
pub struct PayloadOpener {
    recipient: PartyUri,
    role: HopRole,
    metadata: InnerMetadata,
    cipher: ChunkCipher,
    chunk_size: u32,
    payload_length: u64,
    index: u64,
    buf: Zeroizing<Vec<u8>>,
    verifier: CiphertextVerifier,
}

impl fmt::Debug for PayloadOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadOpener")
            .field("recipient", &self.recipient)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl PayloadOpener {
    /// The decrypted inner metadata.
    pub fn metadata(&self) -> &InnerMetadata {
        &self.metadata
    }

    /// The recipient entry we opened as.
    pub fn recipient(&self) -> &PartyUri {
        &self.recipient
    }

    /// Our role on the route.
    pub fn role(&self) -> HopRole {
        self.role
    }

    fn chunk_ct_len(&self) -> usize {
        let cs = u64::from(self.chunk_size);
        let start = self.index * cs;
        let plain = (self.payload_length - start.min(self.payload_length)).min(cs);
        // plain <= chunk_size <= 16 MiB.
        usize::try_from(plain).unwrap_or(usize::MAX) + TAG_LEN
    }

    fn is_last(&self) -> bool {
        let cs = u64::from(self.chunk_size);
        (self.index + 1) * cs >= self.payload_length
    }

    /// Feeds ciphertext; appends authenticated plaintext of every completed chunk to `out`.
    /// Chunks are checked in order as they complete, so the error does not
    /// depend on how the stream was split.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        while !data.is_empty() {
            if self.verifier.received() == self.verifier.expected_len {
                return Err(Error::TrailingData);
            }
            let want = self.chunk_ct_len() - self.buf.len();
            let take = want.min(data.len());
            self.verifier.update(&data[..take])?;
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.chunk_ct_len() {
                let last = self.is_last();
                self.cipher.open(self.index, last, &mut self.buf)?;
                out.extend_from_slice(&self.buf);
                self.buf.clear();
                self.index += 1;
            }
        }
        Ok(())
    }

    /// Checks that every chunk arrived and the ciphertext digest matches.
    /// Only after this returns `Ok` is the plaintext complete and genuine.
    pub fn finish(self) -> Result<InnerMetadata, Error> {
        self.verifier.finish()?;
        Ok(self.metadata)
    }

    /// Reads ciphertext from `r` to its end and writes plaintext to `w`;
    /// `progress` gets the ciphertext bytes consumed so far.
    /// On error, what was written to `w` must be discarded.
    pub fn decrypt_stream(
        mut self,
        r: &mut impl Read,
        w: &mut impl Write,
        mut progress: impl FnMut(u64),
    ) -> Result<InnerMetadata, Error> {
        let mut inbuf = vec![0u8; self.chunk_size as usize + TAG_LEN];
        let mut out = Zeroizing::new(Vec::with_capacity(inbuf.len()));
        loop {
            let n = match r.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.update(&inbuf[..n], &mut out)?;
            w.write_all(&out)?;
            out.clear();
            progress(self.verifier.received());
        }
        self.finish()
    }
}

/// Collects what goes into a new envelope. Strict defaults; see each method.
pub struct SealerBuilder<'a> {
    identity: &'a Identity,
    recipients: Vec<(VerifiedRecipientKey, HopRole)>,
    relays: Vec<Hop>,
    content_type: String,
    purpose: String,
    metadata: InnerMetadata,
    lifetime: Duration,
    chunk_size: u32,
}

impl fmt::Debug for SealerBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealerBuilder")
            .field("sender", self.identity.party())
            .field("recipients", &self.recipients.len())
            .finish_non_exhaustive()
    }
}

impl<'a> SealerBuilder<'a> {
    /// Starts an envelope signed by `identity`.
    pub fn new(identity: &'a Identity, content_type: impl Into<String>) -> Self {
        Self {
            identity,
            recipients: Vec::new(),
            relays: Vec::new(),
            content_type: content_type.into(),
            purpose: String::new(),
            metadata: InnerMetadata::default(),
            lifetime: DEFAULT_LIFETIME,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }

    /// Adds a recipient (its validated encryption certificate) with its role.
    pub fn recipient(mut self, key: VerifiedRecipientKey, role: HopRole) -> Self {
        self.recipients.push((key, role));
        self
    }

    /// Appends a relay to the route.
    pub fn relay(mut self, hop: Hop) -> Self {
        self.relays.push(hop);
        self
    }

    /// Purpose or legal basis (e.g. `treatment`, `claims`, `APPI 27-1-3`).
    pub fn purpose(mut self, purpose: impl Into<String>) -> Self {
        self.purpose = purpose.into();
        self
    }

    /// The encrypted inner metadata.
    pub fn metadata(mut self, metadata: InnerMetadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// How long the envelope may be delivered (default 7 days).
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Plaintext chunk size (default 64 KiB).
    pub fn chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    /// Validates the options, draws the message id and content key from
    /// `rng` (in that order), and wraps the key to every recipient.
    pub fn start(self, now: SystemTime, rng: &mut impl CryptoRng) -> Result<Sealer<'a>, Error> {
        let arg = |m: &str| Err(Error::InvalidArgument(m.into()));
        if self.recipients.is_empty() {
            return arg("at least one recipient is required");
        }
        if self.recipients.len() > MAX_RECIPIENTS || self.relays.len() > MAX_RELAYS {
            return arg("too many recipients or relays");
        }
        let relays = self.relays.iter().map(|h| &h.party);
        if !parties_unique(relays.chain(self.recipients.iter().map(|(k, _)| k.party()))) {
            return arg("a party is named twice on the route (as relay or recipient)");
        }
        if check_text(&self.content_type, "content_type", true).is_err() {
            return arg("content type must be 1-256 printable characters");
        }
        if check_text(&self.purpose, "purpose", false).is_err() {
            return arg("purpose must be at most 256 printable characters");
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return arg("chunk size out of range");
        }
        if self.lifetime.is_zero() {
            return arg("lifetime must be positive");
        }
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        let message_id = MessageId::from_bytes(id);
        let cek = SecretKey32::random(rng);
        let schedule = KeySchedule::derive(&cek, &message_id);
        let recipients = self
            .recipients
            .iter()
            .map(|(key, role)| {
                let fp = key.fingerprint();
                let (enc, wrapped) =
                    suite::wrap_key(&cek, key.public_key(), &message_id, fp.as_bytes(), rng)?;
                Ok(RecipientEntry {
                    party: key.party().clone(),
                    key_fingerprint: fp,
                    role: *role,
                    enc: enc.to_vec(),
                    wrapped,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let created_ms = to_ms(now);
        let lifetime_ms = u64::try_from(self.lifetime.as_millis()).unwrap_or(u64::MAX);
        let sealed_metadata = suite::seal_metadata(
            &schedule.metadata_key,
            &self.metadata.to_proto().encode_to_vec(),
        );
        let header = Header {
            version: suite::FORMAT_VERSION,
            message_id,
            sender: self.identity.party().clone(),
            sender_fingerprint: self.identity.certificate().fingerprint(),
            recipients,
            created: from_ms(created_ms),
            expires: from_ms(created_ms.saturating_add(lifetime_ms)),
            content_type: self.content_type,
            purpose: self.purpose,
            relays: self.relays,
            payload_length: 0,
            chunk_size: self.chunk_size,
            ciphertext_sha256: [0; 32],
            key_commitment: schedule.commitment,
            sealed_metadata,
        };
        Ok(Sealer {
            identity: self.identity,
            cipher: ChunkCipher::new(&schedule.payload_key),
            header,
            index: 0,
            buf: Zeroizing::new(Vec::with_capacity(self.chunk_size as usize)),
            hasher: Hasher::default(),
        })
    }
}

/// Encrypts a payload chunk by chunk; [`finish`](Self::finish) signs the head.
pub struct Sealer<'a> {
    identity: &'a Identity,
    cipher: ChunkCipher,
    header: Header,
    index: u64,
    buf: Zeroizing<Vec<u8>>,
    hasher: Hasher,
}

impl fmt::Debug for Sealer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("message_id", &self.header.message_id)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Sealer<'_> {
    /// The message id of the envelope being sealed.
    pub fn message_id(&self) -> MessageId {
        self.header.message_id
    }

    fn flush(&mut self, last: bool, out: &mut Vec<u8>) {
        let mut chunk = std::mem::take(&mut *self.buf);
        self.cipher.seal(self.index, last, &mut chunk);
        self.hasher.update(&chunk);
        out.extend_from_slice(&chunk);
        chunk.clear();
        *self.buf = chunk;
        self.index += 1;
    }

    /// Feeds plaintext; appends the ciphertext of every completed chunk to `out`.
    pub fn update(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        let cs = self.header.chunk_size as usize;
        while !data.is_empty() {
            // A full buffer is flushed only once more data shows it is not the last chunk.
            if self.buf.len() == cs {
                self.flush(false, out);
            }
            let take = (cs - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.header.payload_length += take as u64;
        }
    }

    /// Encrypts the last chunk into `out`, then builds and signs the head.
    pub fn finish(mut self, out: &mut Vec<u8>) -> EnvelopeHead {
        self.flush(true, out);
        self.header.ciphertext_sha256 = std::mem::take(&mut self.hasher).finish();
        let header = self.header.to_proto().encode_to_vec();
        let signature = suite::sign(
            self.identity.key().signing_key(),
            suite::HEADER_CONTEXT,
            &header,
        );
        let chain: Vec<Vec<u8>> = self
            .identity
            .chain()
            .iter()
            .map(|c| c.der().to_vec())
            .collect();
        let head = proto::Head {
            header: header.clone(),
            signature: signature.to_vec(),
            sender_chain: chain.clone(),
        };
        EnvelopeHead {
            bytes: head.encode_to_vec(),
            header,
            signature: signature.to_vec(),
            chain,
        }
    }

    /// Seals everything `r` yields, writing ciphertext to `w`; `progress` gets
    /// the plaintext bytes consumed so far. Returns the head.
    pub fn seal_stream(
        mut self,
        r: &mut impl Read,
        w: &mut impl Write,
        mut progress: impl FnMut(u64),
    ) -> Result<EnvelopeHead, Error> {
        let mut inbuf = Zeroizing::new(vec![0u8; self.header.chunk_size as usize]);
        let mut out = Vec::with_capacity(inbuf.len() + TAG_LEN);
        loop {
            let n = match r.read(&mut inbuf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.update(&inbuf[..n], &mut out);
            w.write_all(&out)?;
            out.clear();
            progress(self.header.payload_length);
        }
        let head = self.finish(&mut out);
        w.write_all(&out)?;
        Ok(head)
    }

    /// Seals a whole in-memory payload into the file form.
    pub fn seal_to_vec(mut self, plaintext: &[u8]) -> Vec<u8> {
        let mut ct = Vec::with_capacity(plaintext.len() + plaintext.len() / 1024 + 64);
        self.update(plaintext, &mut ct);
        let head = self.finish(&mut ct);
        let mut file = head.file_prefix();
        file.extend_from_slice(&ct);
        file
    }
}

/// Opens a whole in-memory envelope (file form): verify, open, decrypt.
pub fn open_slice(
    envelope: &[u8],
    trust: &TrustStore,
    keys: &[DecryptionKey],
    now: SystemTime,
) -> Result<(VerifiedHead, InnerMetadata, Vec<u8>), Error> {
    let mut r = envelope;
    let head = EnvelopeHead::read_from(&mut r)?.verify(trust, now)?;
    let mut opener = head.open(keys)?;
    let mut plain = Vec::with_capacity(r.len());
    opener.update(r, &mut plain)?;
    let meta = opener.finish()?;
    Ok((head, meta, plain))
}

#[cfg(test)]
mod tests;
