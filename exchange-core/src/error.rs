//! The crate's one error type.
//!
//! Every rejection has its own variant and a stable [`Error::reason_code`], so
//! the daemon, the CLI and the audit log report the same reason. Crypto
//! failures stay opaque (`decryption failed`): they never say which byte or why.

use std::time::SystemTime;

/// Everything that can go wrong in `exchange-core`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Input is not in the expected format.
    #[error("malformed input: {0}")]
    Format(#[from] FormatError),
    /// A certificate or chain was rejected.
    #[error("certificate rejected: {0}")]
    Trust(#[from] TrustError),
    /// A signature (envelope header or receipt) does not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// The sender certificate does not match the party or fingerprint the header names.
    #[error("sender certificate does not match the header's sender")]
    SenderMismatch,
    /// None of the offered decryption keys is named in the recipient list.
    #[error("not a recipient: no recipient entry matches our encryption key")]
    NotARecipient,
    /// A private key does not belong to the certificate it was paired with.
    #[error("private key does not match certificate")]
    KeyMismatch,
    /// The recipient entry could not be unwrapped with our key.
    #[error("content key unwrap failed (wrong decryption key or altered recipient entry)")]
    KeyUnwrap,
    /// The unwrapped content key does not match the header's key commitment.
    #[error("key commitment mismatch: this recipient was given a different content key")]
    CommitmentMismatch,
    /// The encrypted inner metadata failed authentication.
    #[error("decryption failed (inner metadata)")]
    MetadataDecryption,
    /// A ciphertext chunk failed authentication (altered, reordered or duplicated).
    #[error("decryption failed (chunk {index})")]
    ChunkDecryption {
        /// Zero-based chunk index.
        index: u64,
    },
    /// The ciphertext ended before the length the header declares.
    #[error("ciphertext truncated: {received} of {expected} bytes")]
    Truncated {
        /// Bytes the header declares.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// More ciphertext than the header declares.
    #[error("ciphertext longer than the header declares")]
    TrailingData,
    /// The ciphertext's SHA-256 differs from the signed header's.
    #[error("ciphertext digest does not match the signed header")]
    DigestMismatch,
    /// The envelope's expiry time has passed.
    #[error("envelope expired")]
    Expired {
        /// When it expired.
        at: SystemTime,
    },
    /// The envelope claims a creation time in the future.
    #[error("envelope created in the future")]
    NotYetValid,
    /// A receipt was rejected.
    #[error("receipt rejected: {0}")]
    Receipt(#[from] ReceiptError),
    /// An audit-log proof, checkpoint or export was rejected.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// An argument to a builder was invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading or writing a stream failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Issuing a certificate or CRL failed.
    #[cfg(feature = "ca")]
    #[error("certificate issuance failed: {0}")]
    Issue(String),
}

impl Error {
    /// A stable, short reason code (for REJECTED receipts, gRPC status details and audit logs).
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::Format(_) => "malformed",
            Self::Trust(t) => t.reason_code(),
            Self::BadSignature => "bad-signature",
            Self::SenderMismatch => "sender-mismatch",
            Self::NotARecipient => "not-a-recipient",
            Self::KeyMismatch => "key-mismatch",
            Self::KeyUnwrap => "key-unwrap-failed",
            Self::CommitmentMismatch => "commitment-mismatch",
            Self::MetadataDecryption | Self::ChunkDecryption { .. } => "decryption-failed",
            Self::Truncated { .. } => "truncated",
            Self::TrailingData => "trailing-data",
            Self::DigestMismatch => "digest-mismatch",
            Self::Expired { .. } => "expired",
            Self::NotYetValid => "not-yet-valid",
            Self::Receipt(_) => "receipt-mismatch",
            Self::Audit(a) => a.reason_code(),
            Self::InvalidArgument(_) => "invalid-argument",
            Self::Io(_) => "io",
            #[cfg(feature = "ca")]
            Self::Issue(_) => "issue-failed",
        }
    }
}

/// Structural problems with input bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file does not start with the expected magic bytes. The text
    /// names what was expected with its article ("a receipt").
    #[error("not {0} file (bad magic)")]
    BadMagic(&'static str),
    /// Format version we do not implement.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// A length field exceeds its limit.
    #[error("{what} too large: {len} bytes (limit {limit})")]
    TooLarge {
        /// Which item.
        what: &'static str,
        /// Declared length.
        len: u64,
        /// Limit.
        limit: u64,
    },
    /// The input ended inside a fixed-size or length-delimited field.
    #[error("unexpected end of input in {0}")]
    UnexpectedEof(&'static str),
    /// Protobuf decoding failed.
    #[error("cannot decode {0}")]
    Decode(&'static str),
    /// A required field is missing or empty.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field has an invalid value or length.
    #[error("invalid field {0}")]
    InvalidField(&'static str),
    /// Not a valid party URI.
    #[error("invalid party URI {0:?}")]
    InvalidPartyUri(String),
    /// PEM input had no usable block of the expected kind.
    #[error("no {0} found in PEM input")]
    Pem(&'static str),
    /// A private key could not be parsed as a PKCS#8 P-256 key.
    #[error("not a PKCS#8 P-256 private key")]
    PrivateKey,
}

/// Why a certificate or chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The chain does not lead to a configured trust anchor.
    #[error("issuer not trusted")]
    UnknownIssuer,
    /// A certificate in the chain has a bad signature.
    #[error("invalid certificate signature")]
    BadCertificateSignature,
    /// A certificate in the chain has expired.
    #[error("certificate expired")]
    Expired,
    /// A certificate in the chain is not valid yet.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// A certificate in the chain is revoked by a configured CRL.
    #[error("certificate revoked")]
    Revoked,
    /// No CRL covers a certificate and the policy requires one.
    #[error("revocation status unknown (no CRL from the issuer)")]
    UnknownRevocationStatus,
    /// A CRL's nextUpdate has passed.
    #[error("CRL is stale (nextUpdate has passed)")]
    CrlExpired,
    /// A CRL could not be parsed or was not signed by its issuer.
    #[error("invalid CRL")]
    InvalidCrl,
    /// Two different CRLs from the same issuer cannot be ordered: they carry
    /// the same crlNumber, or one carries none.
    #[error(
        "conflicting CRLs: two different CRLs from one issuer with the same (or no) CRL number"
    )]
    ConflictingCrls,
    /// The certificate's key usage or EKU does not permit this use.
    #[error("wrong key usage: {0} certificate required")]
    WrongKeyUsage(&'static str),
    /// The certificate has no URI SubjectAltName.
    #[error("certificate names no party URI")]
    MissingPartyUri,
    /// The certificate has more than one URI SubjectAltName.
    #[error("certificate names more than one party URI")]
    MultiplePartyUris,
    /// The certificate's key is not an ECDSA/ECDH P-256 key.
    #[error("unsupported public key (P-256 required)")]
    UnsupportedKey,
    /// The certificate could not be parsed.
    #[error("malformed certificate")]
    Malformed,
    /// The certificate names a different party than required.
    #[error("certificate names {found}, expected {expected}")]
    PartyMismatch {
        /// Required party.
        expected: String,
        /// Party in the certificate.
        found: String,
    },
    /// No trust anchor is configured.
    #[error("no trust anchor configured")]
    NoAnchors,
    /// Any other path-validation failure.
    #[error("path validation failed: {0}")]
    Other(String),
}

impl TrustError {
    /// A stable, short reason code.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::UnknownIssuer | Self::NoAnchors => "untrusted-chain",
            Self::BadCertificateSignature => "bad-certificate-signature",
            Self::Expired => "certificate-expired",
            Self::NotYetValid => "certificate-not-yet-valid",
            Self::Revoked => "revoked",
            Self::UnknownRevocationStatus => "revocation-unknown",
            Self::CrlExpired => "crl-stale",
            Self::InvalidCrl | Self::ConflictingCrls => "crl-invalid",
            Self::WrongKeyUsage(_) => "wrong-key-usage",
            Self::MissingPartyUri | Self::MultiplePartyUris | Self::PartyMismatch { .. } => {
                "identity-mismatch"
            }
            Self::UnsupportedKey | Self::Malformed => "bad-certificate",
            Self::Other(_) => "untrusted-chain",
        }
    }
}

/// Why a receipt does not belong to an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    /// The receipt names another message id.
    #[error("receipt is for another message")]
    WrongMessage,
    /// Same message id, but a different header digest.
    #[error("receipt is for a different header of this message id")]
    WrongHeader,
    /// The issuer is neither a relay on the route nor a recipient.
    #[error("receipt issuer {0} is not on the envelope's route")]
    IssuerNotOnRoute(String),
    /// The issuer claims a role other than the one the route gives it.
    #[error("receipt role does not match the route")]
    RoleMismatch,
    /// The receipt claims a time before the envelope was created.
    #[error("receipt is dated before the envelope was created")]
    IssuedBeforeEnvelope,
    /// A REJECTED receipt without a reason, or a reason on another disposition.
    #[error("receipt reason is inconsistent with its disposition")]
    BadReason,
}

/// Why an audit-log proof, checkpoint or export was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// A leaf index is not below the tree size, or an old size exceeds the new one.
    #[error("index {index} out of range for tree size {size}")]
    OutOfRange {
        /// The index or old size given.
        index: u64,
        /// The tree size it must stay within.
        size: u64,
    },
    /// An inclusion proof does not lead to the root.
    #[error("inclusion proof does not verify")]
    InclusionProof,
    /// A consistency proof does not link the two tree heads.
    #[error("consistency proof does not verify")]
    ConsistencyProof,
    /// The checkpoint names another party than the signer or certificate.
    #[error("checkpoint is for {found}, expected {expected}")]
    PartyMismatch {
        /// Party of the identity or certificate.
        expected: String,
        /// Party named in the checkpoint.
        found: String,
    },
    /// The checkpoint's signer chain does not start with the given certificate.
    #[error("checkpoint was not signed with the given certificate")]
    SignerMismatch,
    /// An export file has no `latest` checkpoint line.
    #[error("export has no latest checkpoint")]
    MissingCheckpoint,
}

impl AuditError {
    /// A stable, short reason code.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::OutOfRange { .. } => "audit-out-of-range",
            Self::InclusionProof => "audit-bad-inclusion-proof",
            Self::ConsistencyProof => "audit-inconsistent",
            Self::PartyMismatch { .. } | Self::SignerMismatch => "identity-mismatch",
            Self::MissingCheckpoint => "audit-missing-checkpoint",
        }
    }
}
