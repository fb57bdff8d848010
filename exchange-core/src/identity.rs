//! Party identities: certificates, identity (signing) keys and encryption keys.
//!
//! A party holds two P-256 key pairs certified by the network CA
//! (DESIGN.md §3): an *identity* key that signs envelopes and receipts (and is
//! the TLS certificate), and an *encryption* key used only for HPKE key
//! agreement. The two are different types and cannot stand in for each other.
//! Private keys are zeroized on drop and print as `[redacted]`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::pkcs8::DecodePrivateKey;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, FormatError, TrustError};
use crate::ids::{Fingerprint, PartyUri};
use crate::suite;

/// OID of id-ecPublicKey.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// OID of the prime256v1 (P-256) curve.
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// What a certificate's key usage allows it to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// digitalSignature and EKU clientAuth: signs envelopes and receipts, TLS.
    Identity,
    /// keyAgreement only: HPKE recipient key.
    Encryption,
}

/// A parsed X.509 certificate with the fields the exchange uses.
///
/// Parsing checks structure only; trust comes from [`crate::trust::TrustStore`].
#[derive(Clone)]
pub struct Certificate {
    der: CertificateDer<'static>,
    party: Result<PartyUri, TrustError>,
    fingerprint: Fingerprint,
    public_key: Result<p256::PublicKey, TrustError>,
    role: Option<KeyRole>,
    subject: String,
    common_name: Option<String>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Certificate {
    /// Parses one DER certificate.
    pub fn from_der(der: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let der: Vec<u8> = der.into();
        let fingerprint = Fingerprint::from_bytes(suite::sha256(&der));
        let (rest, cert) =
            X509Certificate::from_der(&der).map_err(|_| Error::Trust(TrustError::Malformed))?;
        if !rest.is_empty() {
            return Err(TrustError::Malformed.into());
        }
        let party = party_from_cert(&cert);
        let public_key = p256_key(&cert);
        let role = key_role(&cert);
        let subject = cert.subject().to_string();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let serial = hex::encode(cert.raw_serial());
        let validity = cert.validity();
        let not_before = unix_to_system(validity.not_before.timestamp());
        let not_after = unix_to_system(validity.not_after.timestamp());
        drop(cert);
        Ok(Self {
            der: CertificateDer::from(der),
            party,
            fingerprint,
            public_key,
            role,
            subject,
            common_name,
            serial,
            not_before,
            not_after,
        })
    }

    /// Parses every `CERTIFICATE` block of a PEM document, in order.
    pub fn from_pem(pem: &[u8]) -> Result<Vec<Self>, Error> {
        let ders = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| FormatError::Pem("certificate"))?;
        if ders.is_empty() {
            return Err(FormatError::Pem("certificate").into());
        }
        ders.into_iter()
            .map(|d| Self::from_der(d.to_vec()))
            .collect()
    }

    /// The DER encoding.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The single URI SubjectAltName, or why there is none.
    pub fn party(&self) -> Result<&PartyUri, Error> {
        self.party.as_ref().map_err(|e| Error::Trust(e.clone()))
    }

    /// SHA-256 of the DER encoding.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The P-256 public key, or why the key is unsupported.
    pub fn public_key(&self) -> Result<&p256::PublicKey, Error> {
        self.public_key
            .as_ref()
            .map_err(|e| Error::Trust(e.clone()))
    }

    /// What the key usage allows, if it matches one of the two profiles.
    pub fn key_role(&self) -> Option<KeyRole> {
        self.role
    }

    /// Subject distinguished name, as text.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Subject common name (the facility's display name).
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// Serial number, lowercase hex.
    pub fn serial_hex(&self) -> &str {
        &self.serial
    }

    /// Start of the validity period.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of the validity period.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("subject", &self.subject)
            .field("party", &self.party)
            .field("fingerprint", &self.fingerprint)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn party_from_cert(cert: &X509Certificate<'_>) -> Result<PartyUri, TrustError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| TrustError::Malformed)?
        .ok_or(TrustError::MissingPartyUri)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next().ok_or(TrustError::MissingPartyUri)?;
    if uris.next().is_some() {
        return Err(TrustError::MultiplePartyUris);
    }
    PartyUri::new(first).map_err(|_| TrustError::MissingPartyUri)
}

fn p256_key(cert: &X509Certificate<'_>) -> Result<p256::PublicKey, TrustError> {
    let spki = cert.public_key();
    let curve_ok = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .is_some_and(|oid| oid.to_id_string() == OID_P256);
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY || !curve_ok {
        return Err(TrustError::UnsupportedKey);
    }
    p256::PublicKey::from_sec1_bytes(&spki.subject_public_key.data)
        .map_err(|_| TrustError::UnsupportedKey)
}

fn key_role(cert: &X509Certificate<'_>) -> Option<KeyRole> {
    let ku = cert.key_usage().ok()??.value;
    let eku = cert.extended_key_usage().ok().flatten().map(|e| e.value);
    let tls_eku = eku.is_some_and(|e| e.client_auth || e.server_auth);
    if ku.digital_signature() && !ku.key_agreement() && eku.is_some_and(|e| e.client_auth) {
        Some(KeyRole::Identity)
    } else if ku.key_agreement() && !ku.digital_signature() && !tls_eku {
        Some(KeyRole::Encryption)
    } else {
        None
    }
}

/// The identity (signing) private key. Zeroized on drop; never printed.
pub struct IdentityKey(SigningKey);

impl IdentityKey {
    /// Parses a PKCS#8 DER P-256 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        SigningKey::from_pkcs8_der(der)
            .map(Self)
            .map_err(|_| FormatError::PrivateKey.into())
    }

    /// Parses a `PRIVATE KEY` (PKCS#8) PEM block.
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, Error> {
        Self::from_pkcs8_der(private_key_der(pem)?.as_slice())
    }

    /// The public half.
    pub fn verifying_key(&self) -> &VerifyingKey {
        self.0.verifying_key()
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityKey([redacted])")
    }
}

/// The encryption (HPKE recipient) private key. Zeroized on drop; never printed.
pub struct EncryptionKey(p256::SecretKey);

impl EncryptionKey {
    /// Parses a PKCS#8 DER P-256 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, Error> {
        p256::SecretKey::from_pkcs8_der(der)
            .map(Self)
            .map_err(|_| FormatError::PrivateKey.into())
    }

    /// Parses a `PRIVATE KEY` (PKCS#8) PEM block.
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, Error> {
        Self::from_pkcs8_der(private_key_der(pem)?.as_slice())
    }

    /// The public half.
    pub fn public_key(&self) -> p256::PublicKey {
        self.0.public_key()
    }

    pub(crate) fn secret(&self) -> &p256::SecretKey {
        &self.0
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey([redacted])")
    }
}

/// Decodes a `PRIVATE KEY` (PKCS#8) PEM block into a buffer that is
/// zeroized on drop.
///
/// The base64 is decoded straight into a zeroizing document (RustCrypto's
/// `der`), with no intermediate copy of the key's text or DER left behind
/// in freed memory; the caller keeps `pem` itself in a zeroizing buffer.
pub fn private_key_der(pem: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
    let bad = || FormatError::Pem("PKCS#8 private key");
    const BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
    const END: &str = "-----END PRIVATE KEY-----";
    let text = std::str::from_utf8(pem).map_err(|_| bad())?;
    // The block alone: files may carry other blocks or text around it.
    let start = text.find(BEGIN).ok_or_else(bad)?;
    let end = start + text[start..].find(END).ok_or_else(bad)? + END.len();
    let (label, doc) =
        p256::pkcs8::SecretDocument::from_pem(&text[start..end]).map_err(|_| bad())?;
    if label != "PRIVATE KEY" {
        return Err(bad().into());
    }
    Ok(doc.to_bytes())
}

/// A party's signing identity: its certificate chain (leaf first) and identity key.
#[derive(Debug)]
pub struct Identity {
    chain: Vec<Certificate>,
    key: IdentityKey,
}

impl Identity {
    /// Pairs a chain (leaf first, intermediates after, no root) with the leaf's key.
    ///
    /// Checks that the key belongs to the leaf; key usage and trust are the
    /// verifier's business, so a misissued identity is still rejected by peers.
    pub fn new(chain: Vec<Certificate>, key: IdentityKey) -> Result<Self, Error> {
        let leaf = chain
            .first()
            .ok_or_else(|| Error::InvalidArgument("empty certificate chain".into()))?;
        leaf.party()?;
        if leaf.public_key()? != &p256::PublicKey::from(key.verifying_key()) {
            return Err(Error::KeyMismatch);
        }
        Ok(Self { chain, key })
    }

    /// Loads from PEM: the certificate file (leaf first) and a PKCS#8 key file.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        Self::new(
            Certificate::from_pem(cert_pem)?,
            IdentityKey::from_pkcs8_pem(key_pem)?,
        )
    }

    /// The leaf certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.chain[0]
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[Certificate] {
        &self.chain
    }

    /// The party this identity names.
    pub fn party(&self) -> &PartyUri {
        // Checked in `new`.
        #[allow(clippy::expect_used)]
        self.chain[0].party().expect("checked in Identity::new")
    }

    pub(crate) fn key(&self) -> &IdentityKey {
        &self.key
    }
}

/// A decryption key: an encryption certificate and its private key.
///
/// A party may hold several (old keys after rotation still open stored messages).
#[derive(Debug)]
pub struct DecryptionKey {
    /// The encryption certificate, then the intermediates that issued it.
    chain: Vec<Certificate>,
    key: EncryptionKey,
}

impl DecryptionKey {
    /// Pairs an encryption certificate with its key; fails with
    /// [`Error::KeyMismatch`] if they do not belong together.
    pub fn new(cert: Certificate, key: EncryptionKey) -> Result<Self, Error> {
        Self::with_chain(vec![cert], key)
    }

    /// Pairs an encryption certificate chain (leaf first, then the
    /// intermediates that issued it, no root) with the leaf's key; fails with
    /// [`Error::KeyMismatch`] if the key is not the leaf's.
    pub fn with_chain(chain: Vec<Certificate>, key: EncryptionKey) -> Result<Self, Error> {
        let leaf = chain.first().ok_or(FormatError::Pem("certificate"))?;
        if leaf.public_key()? != &key.public_key() {
            return Err(Error::KeyMismatch);
        }
        Ok(Self { chain, key })
    }

    /// Loads from PEM: the encryption certificate file (the leaf, then any
    /// intermediates: its chain) and its PKCS#8 key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, Error> {
        Self::with_chain(
            Certificate::from_pem(cert_pem)?,
            EncryptionKey::from_pkcs8_pem(key_pem)?,
        )
    }

    /// The encryption certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.chain[0]
    }

    /// The encryption certificate then its intermediates, as loaded: what
    /// [`crate::trust::TrustStore::verify_encryption_chain`] takes.
    pub fn chain(&self) -> &[Certificate] {
        &self.chain
    }

    pub(crate) fn key(&self) -> &EncryptionKey {
        &self.key
    }
}
