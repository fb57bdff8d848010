//! Signed checkpoints (signed tree heads) of a party's audit log.

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

use super::merkle::Hash;
use crate::error::{AuditError, Error, FormatError, TrustError};
use crate::identity::{Certificate, Identity, KeyRole};
use crate::ids::PartyUri;
use crate::suite;
use crate::trust::TrustStore;

/// Signed checkpoint storage magic.
pub const CHECKPOINT_MAGIC: &[u8; 6] = b"EXCKP\0";
/// Signed checkpoint storage version.
pub const CHECKPOINT_FILE_VERSION: u16 = 1;
/// Largest signed checkpoint accepted (bytes).
pub const MAX_CHECKPOINT_LEN: usize = 64 * 1024;
/// Most certificates in a checkpoint's signer chain.
const MAX_CHAIN: usize = crate::envelope::MAX_CHAIN;

/// A tree head of one party's audit log at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log owner.
    pub party: PartyUri,
    /// Number of entries in the log.
    pub tree_size: u64,
    /// Merkle tree head over those entries.
    pub root: Hash,
    /// When it was signed, in milliseconds since the Unix epoch.
    pub time_ms: u64,
}

impl Checkpoint {
    /// The signed body: `version` (u32 BE, 1), `party` (u16 BE length then
    /// UTF-8), `tree_size` (u64 BE), `root` (32 bytes), `time_ms` (u64 BE).
    pub fn to_body(&self) -> Vec<u8> {
        let party = self.party.as_str().as_bytes();
        let mut b = Vec::with_capacity(4 + 2 + party.len() + 8 + 32 + 8);
        b.extend_from_slice(&suite::FORMAT_VERSION.to_be_bytes());
        // Party URIs are at most 512 bytes (PartyUri::new).
        b.extend_from_slice(&(party.len() as u16).to_be_bytes());
        b.extend_from_slice(party);
        b.extend_from_slice(&self.tree_size.to_be_bytes());
        b.extend_from_slice(&self.root);
        b.extend_from_slice(&self.time_ms.to_be_bytes());
        b
    }

    /// Parses a signed body (exactly; no trailing bytes).
    pub fn from_body(body: &[u8]) -> Result<Self, Error> {
        let mut r = Reader(body);
        let version = u32::from_be_bytes(r.array("checkpoint version")?);
        if version != suite::FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version).into());
        }
        let len = u16::from_be_bytes(r.array("checkpoint party")?);
        let party = r.take(usize::from(len), "checkpoint party")?;
        let party = std::str::from_utf8(party)
            .map_err(|_| FormatError::InvalidField("checkpoint party"))?;
        let party = PartyUri::new(party)?;
        let tree_size = u64::from_be_bytes(r.array("checkpoint tree_size")?);
        let root = r.array("checkpoint root")?;
        let time_ms = u64::from_be_bytes(r.array("checkpoint time")?);
        if !r.0.is_empty() {
            return Err(FormatError::InvalidField("checkpoint body").into());
        }
        Ok(Self {
            party,
            tree_size,
            root,
            time_ms,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Error> {
        if self.0.len() < n {
            return Err(FormatError::UnexpectedEof(what).into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
}

/// A checkpoint with the log owner's signature and certificate chain, as
/// stored and exported: not yet trusted.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    body: Vec<u8>,
    signature: [u8; suite::SIGNATURE_LEN],
    chain: Vec<Vec<u8>>,
}

impl fmt::Debug for SignedCheckpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedCheckpoint")
            .field("body_sha256", &hex::encode(suite::sha256(&self.body)))
            .finish_non_exhaustive()
    }
}

impl SignedCheckpoint {
    /// Signs `checkpoint` as `identity`, which must be the checkpoint's party.
    pub fn sign(identity: &Identity, checkpoint: &Checkpoint) -> Result<Self, Error> {
        if identity.party() != &checkpoint.party {
            return Err(AuditError::PartyMismatch {
                expected: identity.party().to_string(),
                found: checkpoint.party.to_string(),
            }
            .into());
        }
        if identity.chain().len() > MAX_CHAIN
            || identity
                .chain()
                .iter()
                .any(|c| c.der().len() > usize::from(u16::MAX))
        {
            return Err(Error::InvalidArgument(
                "certificate chain too long for a checkpoint".into(),
            ));
        }
        let body = checkpoint.to_body();
        let signature = suite::sign(
            identity.key().signing_key(),
            suite::AUDIT_CHECKPOINT_CONTEXT,
            &body,
        );
        Ok(Self {
            body,
            signature,
            chain: identity.chain().iter().map(|c| c.der().to_vec()).collect(),
        })
    }

    /// Storage form: magic `EXCKP\0`, version (u16 BE, 1), body (u16 BE
    /// length then bytes), signature (64 bytes), chain count (u8), then each
    /// certificate (u16 BE length then DER), leaf first.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = CHECKPOINT_MAGIC.to_vec();
        out.extend_from_slice(&CHECKPOINT_FILE_VERSION.to_be_bytes());
        // The body is at most ~600 bytes; certificates are checked on decode
        // and made by our own CA (a few hundred bytes each).
        out.extend_from_slice(&(self.body.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.body);
        out.extend_from_slice(&self.signature);
        out.push(self.chain.len() as u8);
        for der in &self.chain {
            out.extend_from_slice(&(der.len() as u16).to_be_bytes());
            out.extend_from_slice(der);
        }
        out
    }

    /// Parses the storage form (structure only: see [`Self::verify`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_CHECKPOINT_LEN {
            return Err(FormatError::TooLarge {
                what: "checkpoint",
                len: bytes.len() as u64,
                limit: MAX_CHECKPOINT_LEN as u64,
            }
            .into());
        }
        let rest = bytes
            .strip_prefix(CHECKPOINT_MAGIC.as_slice())
            .ok_or(FormatError::BadMagic("an audit checkpoint"))?;
        let mut r = Reader(rest);
        let version = u16::from_be_bytes(r.array("checkpoint version")?);
        if version != CHECKPOINT_FILE_VERSION {
            return Err(FormatError::UnsupportedVersion(u32::from(version)).into());
        }
        let len = u16::from_be_bytes(r.array("checkpoint body")?);
        let body = r.take(usize::from(len), "checkpoint body")?.to_vec();
        let signature = r.array("checkpoint signature")?;
        let [count] = r.array("checkpoint chain")?;
        if count == 0 || usize::from(count) > MAX_CHAIN {
            return Err(FormatError::InvalidField("checkpoint chain").into());
        }
        let mut chain = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let len = u16::from_be_bytes(r.array("checkpoint certificate")?);
            chain.push(r.take(usize::from(len), "checkpoint certificate")?.to_vec());
        }
        if !r.0.is_empty() {
            return Err(FormatError::InvalidField("checkpoint trailing bytes").into());
        }
        Ok(Self {
            body,
            signature,
            chain,
        })
    }

    /// The checkpoint as it claims to be, without checking anything: for
    /// the log owner's own bookkeeping and for display, never for trust.
    pub fn unverified(&self) -> Result<Checkpoint, Error> {
        Checkpoint::from_body(&self.body)
    }

    fn parsed_chain(&self) -> Result<Vec<Certificate>, Error> {
        self.chain
            .iter()
            .map(|d| Certificate::from_der(d.clone()))
            .collect()
    }

    /// Verifies against the party's own identity certificate, given out of
    /// band (`exchange audit verify --cert IDENTITY.pem`): the certificate
    /// must be an identity certificate, be the first of the carried chain,
    /// name the checkpoint's party, be valid at the checkpoint's time, and
    /// its key must have made the signature. No path validation: the caller
    /// trusts this certificate.
    pub fn verify_with_certificate(&self, cert: &Certificate) -> Result<Checkpoint, Error> {
        if cert.key_role() != Some(KeyRole::Identity) {
            return Err(TrustError::WrongKeyUsage("identity").into());
        }
        let leaf = self
            .chain
            .first()
            .ok_or(FormatError::InvalidField("checkpoint chain"))?;
        if leaf.as_slice() != cert.der().as_ref() {
            return Err(AuditError::SignerMismatch.into());
        }
        suite::verify(
            &(*cert.public_key()?).into(),
            suite::AUDIT_CHECKPOINT_CONTEXT,
            &self.body,
            &self.signature,
        )?;
        let cp = Checkpoint::from_body(&self.body)?;
        let party = cert.party()?;
        if party != &cp.party {
            return Err(AuditError::PartyMismatch {
                expected: party.to_string(),
                found: cp.party.to_string(),
            }
            .into());
        }
        let at = UNIX_EPOCH + Duration::from_millis(cp.time_ms);
        if at < cert.not_before() {
            return Err(TrustError::NotYetValid.into());
        }
        if at > cert.not_after() {
            return Err(TrustError::Expired.into());
        }
        Ok(cp)
    }

    /// Verifies the signature with the carried chain's leaf key, then
    /// validates the chain against `trust` at the checkpoint's own time (as
    /// receipts are), and that the certified party is the checkpoint's.
    pub fn verify(&self, trust: &TrustStore) -> Result<Checkpoint, Error> {
        let chain = self.parsed_chain()?;
        let leaf = chain
            .first()
            .ok_or(FormatError::InvalidField("checkpoint chain"))?;
        suite::verify(
            &(*leaf.public_key()?).into(),
            suite::AUDIT_CHECKPOINT_CONTEXT,
            &self.body,
            &self.signature,
        )?;
        let cp = Checkpoint::from_body(&self.body)?;
        let at = UNIX_EPOCH + Duration::from_millis(cp.time_ms);
        let verified = trust.verify_identity(&chain, at)?;
        if verified.party() != &cp.party {
            return Err(AuditError::PartyMismatch {
                expected: verified.party().to_string(),
                found: cp.party.to_string(),
            }
            .into());
        }
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::ca::{CertificateAuthority, Validity};

    #[test]
    fn checkpoint_naming_another_party_than_its_signer_is_rejected() {
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
        // Mallory signs a tree head that claims to be the clinic's log.
        let body = Checkpoint {
            party: PartyUri::new("urn:t:clinic").unwrap(),
            tree_size: 3,
            root: [7; 32],
            time_ms: 1_780_272_000_000,
        }
        .to_body();
        let forged = SignedCheckpoint {
            signature: suite::sign(
                mallory.key().signing_key(),
                suite::AUDIT_CHECKPOINT_CONTEXT,
                &body,
            ),
            body,
            chain: vec![mallory.certificate().der().to_vec()],
        };
        let forged = SignedCheckpoint::from_bytes(&forged.to_bytes()).unwrap();
        assert!(matches!(
            forged.verify(&trust),
            Err(Error::Audit(AuditError::PartyMismatch { .. }))
        ));
        assert!(matches!(
            forged.verify_with_certificate(mallory.certificate()),
            Err(Error::Audit(AuditError::PartyMismatch { .. }))
        ));
        // A receipt signature over the same body is not a checkpoint signature.
        let mut cross = forged.clone();
        cross.signature = suite::sign(
            mallory.key().signing_key(),
            suite::RECEIPT_CONTEXT,
            &cross.body,
        );
        assert!(matches!(
            cross.verify_with_certificate(mallory.certificate()),
            Err(Error::BadSignature)
        ));
    }

    #[test]
    fn body_layout_is_fixed() {
        let cp = Checkpoint {
            party: PartyUri::new("urn:a:b").unwrap(),
            tree_size: 0x0102,
            root: [0xaa; 32],
            time_ms: 0x0304,
        };
        let mut want = vec![0, 0, 0, 1, 0, 7];
        want.extend_from_slice(b"urn:a:b");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[0xaa; 32]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 3, 4]);
        assert_eq!(cp.to_body(), want);
        assert_eq!(Checkpoint::from_body(&want).unwrap(), cp);
        let mut long = want.clone();
        long.push(0);
        assert!(Checkpoint::from_body(&long).is_err());
        assert!(Checkpoint::from_body(&want[..want.len() - 1]).is_err());
        let mut v2 = want;
        v2[3] = 2;
        assert!(matches!(
            Checkpoint::from_body(&v2),
            Err(Error::Format(FormatError::UnsupportedVersion(2)))
        ));
    }
}
