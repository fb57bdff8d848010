//! Signed delivery receipts (DESIGN.md §5, docs/envelope-format.md §7).
//!
//! A hop that takes custody of an envelope signs a receipt naming the message
//! id, the SHA-256 of the exact header bytes, its role and a disposition. A
//! receipt verifies offline with the CA certificate alone, and
//! [`VerifiedReceipt::check_for`] ties it to one envelope and its route.

use std::fmt;
use std::time::SystemTime;

use prost::Message;

use crate::envelope::{VerifiedHead, from_ms, to_ms};
use crate::error::{Error, FormatError, ReceiptError};
use crate::identity::{Certificate, Identity};
use crate::ids::{Fingerprint, MessageId, PartyUri};
use crate::proto;
use crate::route::HopRole;
use crate::suite;
use crate::trust::{TrustStore, VerifiedParty};

/// Receipt file magic.
pub const MAGIC: &[u8; 6] = b"EXRCT\0";
/// Receipt file version.
pub const FILE_VERSION: u16 = 1;
/// Largest receipt accepted (bytes).
pub const MAX_RECEIPT_LEN: usize = 64 * 1024;

/// What the issuer did with the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Verified and durably stored by a relay that will forward it.
    AcceptedForRelay,
    /// Verified and durably stored by the final recipient.
    Delivered,
    /// Opened or processed by the recipient's application.
    Processed,
    /// Refused, with a stable reason code (see [`Error::reason_code`]).
    Rejected(String),
}

impl Disposition {
    /// `ACCEPTED_FOR_RELAY`, `DELIVERED`, `PROCESSED` or `REJECTED`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::AcceptedForRelay => "ACCEPTED_FOR_RELAY",
            Self::Delivered => "DELIVERED",
            Self::Processed => "PROCESSED",
            Self::Rejected(_) => "REJECTED",
        }
    }

    fn to_wire(&self) -> (i32, String) {
        use proto::Disposition as D;
        match self {
            Self::AcceptedForRelay => (D::AcceptedForRelay as i32, String::new()),
            Self::Delivered => (D::Delivered as i32, String::new()),
            Self::Processed => (D::Processed as i32, String::new()),
            Self::Rejected(r) => (D::Rejected as i32, r.clone()),
        }
    }

    fn from_wire(v: i32, reason: String) -> Result<Self, Error> {
        use proto::Disposition as D;
        let d = match D::try_from(v) {
            Ok(D::AcceptedForRelay) => Self::AcceptedForRelay,
            Ok(D::Delivered) => Self::Delivered,
            Ok(D::Processed) => Self::Processed,
            Ok(D::Rejected) => {
                if reason.is_empty()
                    || reason.len() > 64
                    || !reason.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(ReceiptError::BadReason.into());
                }
                return Ok(Self::Rejected(reason));
            }
            _ => return Err(FormatError::InvalidField("disposition").into()),
        };
        if !reason.is_empty() {
            return Err(ReceiptError::BadReason.into());
        }
        Ok(d)
    }
}

impl fmt::Display for Disposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rejected(r) => write!(f, "REJECTED ({r})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// What a receipt says, before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptContent {
    /// The envelope's message id.
    pub message_id: MessageId,
    /// SHA-256 of the envelope's signed header bytes.
    pub header_sha256: [u8; 32],
    /// The issuer's role on the route.
    pub role: HopRole,
    /// What the issuer did.
    pub disposition: Disposition,
    /// When.
    pub issued: SystemTime,
}

impl ReceiptContent {
    /// Content for a receipt about `head`, issued at `now`.
    pub fn for_head(
        head: &VerifiedHead,
        role: HopRole,
        disposition: Disposition,
        now: SystemTime,
    ) -> Self {
        Self {
            message_id: head.header().message_id,
            header_sha256: head.head().header_sha256(),
            role,
            disposition,
            issued: now,
        }
    }
}

/// A signed receipt as received: not yet trusted.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedReceipt {
    body: Vec<u8>,
    signature: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl fmt::Debug for SignedReceipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedReceipt")
            .field("body_sha256", &hex::encode(suite::sha256(&self.body)))
            .finish_non_exhaustive()
    }
}

impl SignedReceipt {
    /// Signs `content` as `identity`.
    pub fn issue(identity: &Identity, content: &ReceiptContent) -> Self {
        let (disposition, reason) = content.disposition.to_wire();
        let body = proto::ReceiptBody {
            version: suite::FORMAT_VERSION,
            message_id: content.message_id.as_bytes().to_vec(),
            header_sha256: content.header_sha256.to_vec(),
            issuer: identity.party().to_string(),
            issuer_fingerprint: identity.certificate().fingerprint().as_bytes().to_vec(),
            role: content.role.to_wire(),
            disposition,
            reason,
            issued_ms: to_ms(content.issued),
        }
        .encode_to_vec();
        let signature = suite::sign(identity.key().signing_key(), suite::RECEIPT_CONTEXT, &body);
        Self {
            body,
            signature: signature.to_vec(),
            chain: identity.chain().iter().map(|c| c.der().to_vec()).collect(),
        }
    }

    /// Encodes the network form (a `SignedReceipt` message).
    pub fn to_bytes(&self) -> Vec<u8> {
        proto::SignedReceipt {
            body: self.body.clone(),
            signature: self.signature.clone(),
            issuer_chain: self.chain.clone(),
        }
        .encode_to_vec()
    }

    /// Decodes the network form.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_RECEIPT_LEN {
            return Err(FormatError::TooLarge {
                what: "receipt",
                len: bytes.len() as u64,
                limit: MAX_RECEIPT_LEN as u64,
            }
            .into());
        }
        let p = proto::SignedReceipt::decode(bytes).map_err(|_| FormatError::Decode("receipt"))?;
        if p.signature.len() != suite::SIGNATURE_LEN {
            return Err(FormatError::InvalidField("receipt signature").into());
        }
        if p.issuer_chain.is_empty() || p.issuer_chain.len() > crate::envelope::MAX_CHAIN {
            return Err(FormatError::InvalidField("issuer_chain").into());
        }
        Ok(Self {
            body: p.body,
            signature: p.signature,
            chain: p.issuer_chain,
        })
    }

    /// The file form: magic, version, then the network form.
    pub fn to_file(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&FILE_VERSION.to_be_bytes());
        out.extend_from_slice(&self.to_bytes());
        out
    }

    /// Parses the file form.
    pub fn from_file(bytes: &[u8]) -> Result<Self, Error> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(FormatError::BadMagic("a receipt"))?;
        let (version, rest) = rest
            .split_first_chunk::<2>()
            .ok_or(FormatError::UnexpectedEof("receipt version"))?;
        if u16::from_be_bytes(*version) != FILE_VERSION {
            return Err(
                FormatError::UnsupportedVersion(u32::from(u16::from_be_bytes(*version))).into(),
            );
        }
        Self::from_bytes(rest)
    }

    /// Parses either form: the file form when `bytes` start with [`MAGIC`],
    /// else the network form (the bare `SignedReceipt` message, as the
    /// daemon's `Receipt.signed` and `AckResponse.receipt` carry it).
    pub fn from_file_or_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.starts_with(MAGIC.as_slice()) {
            Self::from_file(bytes)
        } else {
            Self::from_bytes(bytes)
        }
    }

    /// Verifies the signature (before parsing the body), the issuer binding and
    /// the issuer's chain, validated at the receipt's own issue time.
    pub fn verify(&self, trust: &TrustStore) -> Result<VerifiedReceipt, Error> {
        let chain = self.issuer_chain()?;
        let leaf = &chain[0];
        suite::verify(
            &(*leaf.public_key()?).into(),
            suite::RECEIPT_CONTEXT,
            &self.body,
            &self.signature,
        )?;
        self.bind(|issued| trust.verify_identity(&chain, issued))
    }

    /// Reads back a receipt that [`SignedReceipt::verify`] accepted when its
    /// holder stored it, and whose verdict the holder recorded with it: the
    /// body and chain are parsed and the issuer binding (party and leaf
    /// fingerprint) is checked, but neither the signature nor the chain is
    /// checked again. Only for bytes from the holder's own store, never for
    /// anything received; a store audit re-runs [`SignedReceipt::verify`].
    pub fn read_back_verified(&self) -> Result<VerifiedReceipt, Error> {
        let chain = self.issuer_chain()?;
        let leaf = chain[0].clone();
        self.bind(|_| Ok(VerifiedParty::recorded(leaf.party()?.clone(), leaf)))
    }

    /// The issuer's certificate chain as carried (leaf first), parsed but
    /// not validated.
    pub fn issuer_chain(&self) -> Result<Vec<Certificate>, Error> {
        self.chain
            .iter()
            .map(|d| Certificate::from_der(d.clone()))
            .collect()
    }

    /// Parses the body and binds it to the issuer `issuer` vouches for at
    /// the receipt's issue time.
    fn bind(
        &self,
        issuer: impl FnOnce(SystemTime) -> Result<VerifiedParty, Error>,
    ) -> Result<VerifiedReceipt, Error> {
        let b = proto::ReceiptBody::decode(self.body.as_slice())
            .map_err(|_| FormatError::Decode("receipt body"))?;
        if b.version != suite::FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(b.version).into());
        }
        let party = PartyUri::new(b.issuer)?;
        let fp = Fingerprint::from_slice(&b.issuer_fingerprint, "issuer_fingerprint")?;
        let issued = from_ms(b.issued_ms);
        let verified_issuer = issuer(issued)?;
        if verified_issuer.party() != &party || verified_issuer.certificate().fingerprint() != fp {
            return Err(Error::SenderMismatch);
        }
        Ok(VerifiedReceipt {
            receipt: self.clone(),
            issuer: verified_issuer,
            message_id: MessageId::from_slice(&b.message_id)?,
            header_sha256: b
                .header_sha256
                .as_slice()
                .try_into()
                .map_err(|_| FormatError::InvalidField("header_sha256"))?,
            role: HopRole::from_wire(b.role, "receipt role")?,
            disposition: Disposition::from_wire(b.disposition, b.reason)?,
            issued,
        })
    }
}

/// A receipt whose signature and issuer chain verified. Only
/// [`SignedReceipt::verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedReceipt {
    receipt: SignedReceipt,
    issuer: VerifiedParty,
    message_id: MessageId,
    header_sha256: [u8; 32],
    role: HopRole,
    disposition: Disposition,
    issued: SystemTime,
}

impl VerifiedReceipt {
    /// The issuing party.
    pub fn issuer(&self) -> &PartyUri {
        self.issuer.party()
    }

    /// The issuer's certificate.
    pub fn issuer_certificate(&self) -> &Certificate {
        self.issuer.certificate()
    }

    /// Message id named.
    pub fn message_id(&self) -> MessageId {
        self.message_id
    }

    /// Header digest named.
    pub fn header_sha256(&self) -> &[u8; 32] {
        &self.header_sha256
    }

    /// Role the issuer claims.
    pub fn role(&self) -> HopRole {
        self.role
    }

    /// Disposition.
    pub fn disposition(&self) -> &Disposition {
        &self.disposition
    }

    /// Issue time.
    pub fn issued(&self) -> SystemTime {
        self.issued
    }

    /// The signed receipt, for storage and forwarding.
    pub fn signed(&self) -> &SignedReceipt {
        &self.receipt
    }

    /// Whether this receipt, on its own, is a custody receipt from a
    /// `THIRD_PARTY` hop (the kind that marks the provision boundary).
    pub fn is_third_party_custody(&self) -> bool {
        self.role == HopRole::ThirdParty
            && matches!(
                self.disposition,
                Disposition::AcceptedForRelay | Disposition::Delivered | Disposition::Processed
            )
    }

    /// Checks that this receipt is about `head` and that its issuer is on the
    /// declared route with the role it claims.
    pub fn check_for(&self, head: &VerifiedHead) -> Result<(), Error> {
        if self.message_id != head.header().message_id {
            return Err(ReceiptError::WrongMessage.into());
        }
        if self.header_sha256 != head.head().header_sha256() {
            return Err(ReceiptError::WrongHeader.into());
        }
        if self.issued + crate::envelope::MAX_CLOCK_SKEW < head.header().created {
            return Err(ReceiptError::IssuedBeforeEnvelope.into());
        }
        match head.route().role_of(self.issuer()) {
            None => Err(ReceiptError::IssuerNotOnRoute(self.issuer().to_string()).into()),
            Some(role) if role != self.role => Err(ReceiptError::RoleMismatch.into()),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::ca::{CertificateAuthority, Validity};

    #[test]
    fn receipt_naming_another_issuer_than_its_signer_is_rejected() {
        let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
        let validity = Validity::days_from(now, 30);
        let ca = CertificateAuthority::generate("CA", validity).unwrap();
        let trust = TrustStore::builder()
            .anchors_pem(ca.certificate_pem().as_bytes())
            .unwrap()
            .build()
            .unwrap();
        let mallory = ca
            .issue_party(&PartyUri::new("urn:t:mallory").unwrap(), "m", validity)
            .unwrap();
        let mallory = Identity::from_pem(
            mallory.identity.cert_pem.as_bytes(),
            mallory.identity.key_pem.as_bytes(),
        )
        .unwrap();
        // Mallory signs a body that claims the payer issued it.
        let body = proto::ReceiptBody {
            version: 1,
            message_id: vec![1; 16],
            header_sha256: vec![2; 32],
            issuer: "urn:t:payer".into(),
            issuer_fingerprint: mallory.certificate().fingerprint().as_bytes().to_vec(),
            role: HopRole::ThirdParty.to_wire(),
            disposition: proto::Disposition::Delivered as i32,
            reason: String::new(),
            issued_ms: 1_780_272_000_000,
        }
        .encode_to_vec();
        let forged = SignedReceipt {
            signature: suite::sign(mallory.key().signing_key(), suite::RECEIPT_CONTEXT, &body)
                .to_vec(),
            body,
            chain: vec![mallory.certificate().der().to_vec()],
        };
        assert!(matches!(forged.verify(&trust), Err(Error::SenderMismatch)));
    }

    #[test]
    fn read_back_binds_the_issuer_and_revocation_is_a_crl_lookup() {
        use crate::ca::{CrlState, RevokedSerial};
        let now = UNIX_EPOCH + Duration::from_secs(1_780_272_000);
        let validity = Validity::days_from(now, 30);
        let ca = CertificateAuthority::generate("CA", validity).unwrap();
        let issue = |uri: &str| {
            let c = ca
                .issue_party(&PartyUri::new(uri).unwrap(), "p", validity)
                .unwrap();
            Identity::from_pem(
                c.identity.cert_pem.as_bytes(),
                c.identity.key_pem.as_bytes(),
            )
            .unwrap()
        };
        let payer = issue("urn:t:payer");
        let other = issue("urn:t:other");
        let trust_with = |revoked: Vec<RevokedSerial>| {
            let crl = ca
                .crl(
                    &CrlState {
                        number: revoked.len() as u64 + 1,
                        revoked,
                    },
                    now - Duration::from_secs(60),
                    now + Duration::from_secs(86_400),
                )
                .unwrap();
            TrustStore::builder()
                .anchors_pem(ca.certificate_pem().as_bytes())
                .unwrap()
                .crls_pem(crl.as_bytes())
                .unwrap()
                .allow_stale_crls()
                .build()
                .unwrap()
        };
        let body = |issuer: &Identity, claimed: &str| {
            proto::ReceiptBody {
                version: 1,
                message_id: vec![1; 16],
                header_sha256: vec![2; 32],
                issuer: claimed.into(),
                issuer_fingerprint: issuer.certificate().fingerprint().as_bytes().to_vec(),
                role: HopRole::ThirdParty.to_wire(),
                disposition: proto::Disposition::Delivered as i32,
                reason: String::new(),
                issued_ms: 1_780_272_000_000,
            }
            .encode_to_vec()
        };
        let signed = |issuer: &Identity, body: Vec<u8>| SignedReceipt {
            signature: suite::sign(issuer.key().signing_key(), suite::RECEIPT_CONTEXT, &body)
                .to_vec(),
            body,
            chain: vec![issuer.certificate().der().to_vec()],
        };
        let genuine = signed(&payer, body(&payer, "urn:t:payer"));
        let verified = genuine.verify(&trust_with(Vec::new())).unwrap();
        let read = genuine.read_back_verified().unwrap();
        assert_eq!(read.issuer(), verified.issuer());
        assert_eq!(read.disposition(), verified.disposition());
        assert_eq!(read.issued(), verified.issued());
        assert_eq!(read.message_id(), verified.message_id());
        // Reading back still binds the issuer to the carried leaf.
        let misbound = signed(&other, body(&other, "urn:t:payer"));
        assert!(matches!(
            misbound.read_back_verified(),
            Err(Error::SenderMismatch)
        ));
        // Revocation after the fact shows as a CRL listing of the issuer only.
        let revoked = trust_with(vec![RevokedSerial {
            serial: hex::decode(payer.certificate().serial_hex()).unwrap(),
            revoked_at: now,
        }]);
        assert!(revoked.lists_revoked(payer.certificate()));
        assert!(!revoked.lists_revoked(other.certificate()));
        assert!(!trust_with(Vec::new()).lists_revoked(payer.certificate()));
        assert!(matches!(
            genuine.verify(&revoked),
            Err(Error::Trust(crate::error::TrustError::Revoked))
        ));
    }

    #[test]
    fn disposition_reason_rules() {
        assert!(matches!(
            Disposition::from_wire(4, String::new()),
            Err(Error::Receipt(ReceiptError::BadReason))
        ));
        assert!(matches!(
            Disposition::from_wire(2, "x".into()),
            Err(Error::Receipt(ReceiptError::BadReason))
        ));
        assert!(matches!(
            Disposition::from_wire(0, String::new()),
            Err(Error::Format(_))
        ));
        assert_eq!(
            Disposition::from_wire(4, "expired".into()).unwrap(),
            Disposition::Rejected("expired".into())
        );
    }
}
