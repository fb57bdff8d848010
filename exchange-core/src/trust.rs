//! Trust: anchors, intermediates, CRLs, and path validation at a given time.
//!
//! Path building and signature checks are rustls-webpki's; this module adds the
//! exchange's profile on top (DESIGN.md §3): exactly one party URI, a P-256
//! key, and key usage that matches the certificate's job (identity or
//! encryption). Success yields a value only this module can construct.
//!
//! Revocation: when CRLs are configured every certificate in the chain must be
//! covered by one (unknown status fails), and a CRL past its nextUpdate fails
//! unless [`TrustStoreBuilder::allow_stale_crls`] was called. Of several CRLs
//! from one issuer only the one with the highest crlNumber is used, in
//! whatever order they were added; two different CRLs from one issuer with
//! the same number (or without a number) are refused
//! ([`TrustError::ConflictingCrls`]).

use std::time::{SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use x509_parser::num_bigint::BigUint;
use x509_parser::prelude::FromDer;

use crate::error::{Error, FormatError, TrustError};
use crate::identity::{Certificate, KeyRole};
use crate::ids::{Fingerprint, PartyUri};

/// Trust anchors, intermediates and CRLs, with the revocation policy.
#[derive(Debug)]
pub struct TrustStore {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    require_crls: bool,
    allow_stale_crls: bool,
}

/// Builds a [`TrustStore`]. Strict by default; relaxations are named methods.
#[derive(Debug, Default)]
pub struct TrustStoreBuilder {
    anchors: Vec<CertificateDer<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    require_crls: bool,
    allow_stale_crls: bool,
}

impl TrustStoreBuilder {
    /// Adds every certificate in a PEM document as a trust anchor.
    pub fn anchors_pem(mut self, pem: &[u8]) -> Result<Self, Error> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| FormatError::Pem("certificate"))?;
        if certs.is_empty() {
            return Err(FormatError::Pem("certificate").into());
        }
        self.anchors.extend(certs);
        Ok(self)
    }

    /// Adds one DER trust anchor.
    pub fn anchor_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.anchors.push(CertificateDer::from(der.into()));
        self
    }

    /// Adds an intermediate CA certificate (DER) usable in path building.
    pub fn intermediate_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.intermediates.push(CertificateDer::from(der.into()));
        self
    }

    /// Adds every CRL in a PEM document.
    pub fn crls_pem(mut self, pem: &[u8]) -> Result<Self, Error> {
        let crls = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| FormatError::Pem("X509 CRL"))?;
        if crls.is_empty() {
            return Err(FormatError::Pem("X509 CRL").into());
        }
        self.crls.extend(crls);
        Ok(self)
    }

    /// Adds one DER CRL.
    pub fn crl_der(mut self, der: impl Into<Vec<u8>>) -> Self {
        self.crls
            .push(CertificateRevocationListDer::from(der.into()));
        self
    }

    /// Fails validation when no CRL is configured at all (the open-network profile).
    pub fn require_crls(mut self) -> Self {
        self.require_crls = true;
        self
    }

    /// Relaxation: accept CRLs whose nextUpdate has passed.
    pub fn allow_stale_crls(mut self) -> Self {
        self.allow_stale_crls = true;
        self
    }

    /// Parses anchors and CRLs.
    pub fn build(self) -> Result<TrustStore, Error> {
        if self.anchors.is_empty() {
            return Err(TrustError::NoAnchors.into());
        }
        let anchors = self
            .anchors
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|_| Error::Trust(TrustError::Malformed))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let crls = newest_per_issuer(&self.crls)?;
        Ok(TrustStore {
            anchors,
            intermediates: self.intermediates,
            crls,
            require_crls: self.require_crls,
            allow_stale_crls: self.allow_stale_crls,
        })
    }
}

/// A parsed CRL and what orders it among the CRLs of the same scope.
struct ScopedCrl<'a> {
    /// DER issuer name and issuing distribution point: one CRL in force per scope.
    scope: (Vec<u8>, Option<Vec<u8>>),
    /// The crlNumber extension (RFC 5280 §5.2.3), absent in non-conforming CRLs.
    number: Option<BigUint>,
    der: &'a [u8],
    crl: CertRevocationList<'static>,
}

/// Keeps, per issuer (and issuing distribution point), only the CRL with the
/// highest crlNumber, whatever the order the CRLs were given in: webpki uses
/// the first CRL that matches an issuer, so an older one listed first would
/// hide later revocations. Two different CRLs of one issuer that cannot be
/// ordered (the same number, or one without a number) are refused.
fn newest_per_issuer(
    ders: &[CertificateRevocationListDer<'static>],
) -> Result<Vec<CertRevocationList<'static>>, Error> {
    let mut kept: Vec<ScopedCrl<'_>> = Vec::new();
    for der in ders {
        let der = der.as_ref();
        let crl = CertRevocationList::from(
            OwnedCertRevocationList::from_der(der).map_err(|_| TrustError::InvalidCrl)?,
        );
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
            .map_err(|_| TrustError::InvalidCrl)?;
        let candidate = ScopedCrl {
            scope: (
                crl.issuer().to_vec(),
                crl.issuing_distribution_point().map(<[u8]>::to_vec),
            ),
            number: parsed.crl_number().cloned(),
            der,
            crl,
        };
        let Some(current) = kept.iter_mut().find(|k| k.scope == candidate.scope) else {
            kept.push(candidate);
            continue;
        };
        if current.der == candidate.der {
            continue;
        }
        match (&current.number, &candidate.number) {
            (Some(have), Some(new)) if new > have => *current = candidate,
            (Some(have), Some(new)) if new < have => {}
            _ => return Err(TrustError::ConflictingCrls.into()),
        }
    }
    Ok(kept.into_iter().map(|k| k.crl).collect())
}

/// A party whose identity certificate chain validated. Only [`TrustStore`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedParty {
    party: PartyUri,
    certificate: Certificate,
}

impl VerifiedParty {
    /// A party whose chain validated earlier, as its holder recorded
    /// ([`crate::receipt::SignedReceipt::read_back_verified`]).
    pub(crate) fn recorded(party: PartyUri, certificate: Certificate) -> Self {
        Self { party, certificate }
    }

    /// The validated party URI.
    pub fn party(&self) -> &PartyUri {
        &self.party
    }

    /// The validated leaf certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }
}

/// A recipient encryption certificate that validated. Only [`TrustStore`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedRecipientKey {
    party: PartyUri,
    certificate: Certificate,
    public_key: p256::PublicKey,
}

impl VerifiedRecipientKey {
    /// The recipient party.
    pub fn party(&self) -> &PartyUri {
        &self.party
    }

    /// The encryption certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    /// Fingerprint of the encryption certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        self.certificate.fingerprint()
    }

    pub(crate) fn public_key(&self) -> &p256::PublicKey {
        &self.public_key
    }
}

fn unix_time(at: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

fn wrong_usage(role: KeyRole) -> TrustError {
    TrustError::WrongKeyUsage(match role {
        KeyRole::Identity => "identity",
        KeyRole::Encryption => "encryption",
    })
}

fn map_webpki(e: webpki::Error) -> TrustError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => TrustError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => TrustError::BadCertificateSignature,
        W::CertExpired { .. } => TrustError::Expired,
        W::CertNotValidYet { .. } => TrustError::NotYetValid,
        W::CertRevoked => TrustError::Revoked,
        W::UnknownRevocationStatus => TrustError::UnknownRevocationStatus,
        W::CrlExpired { .. } => TrustError::CrlExpired,
        W::InvalidCrlSignatureForPublicKey | W::IssuerNotCrlSigner => TrustError::InvalidCrl,
        W::BadDer | W::BadDerTime | W::TrailingData(_) => TrustError::Malformed,
        other => TrustError::Other(format!("{other:?}")),
    }
}

impl TrustStore {
    /// Starts a builder.
    pub fn builder() -> TrustStoreBuilder {
        TrustStoreBuilder::default()
    }

    /// The same anchors and intermediates, without revocation checking: for
    /// re-reading evidence (a stored receipt) whose verdict was reached with
    /// this store's full policy when it arrived, so that a later revocation
    /// of its issuer does not unmake it. Never for anything new.
    pub fn without_revocation(&self) -> TrustStore {
        TrustStore {
            anchors: self.anchors.clone(),
            intermediates: self.intermediates.clone(),
            crls: Vec::new(),
            require_crls: false,
            allow_stale_crls: self.allow_stale_crls,
        }
    }

    /// Validates `cert` (with extra chain certificates) at time `at`, for `role`.
    fn validate(
        &self,
        cert: &Certificate,
        extra: &[Certificate],
        at: SystemTime,
        role: KeyRole,
    ) -> Result<PartyUri, Error> {
        let party = cert.party()?.clone();
        cert.public_key()?;
        let ee = EndEntityCert::try_from(cert.der()).map_err(|e| Error::Trust(map_webpki(e)))?;
        let mut intermediates: Vec<CertificateDer<'_>> =
            extra.iter().map(|c| c.der().clone()).collect();
        intermediates.extend(self.intermediates.iter().cloned());
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        if self.require_crls && crl_refs.is_empty() {
            return Err(TrustError::UnknownRevocationStatus.into());
        }
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Deny)
                .with_expiration_policy(if self.allow_stale_crls {
                    ExpirationPolicy::Ignore
                } else {
                    ExpirationPolicy::Enforce
                })
                .build()
        });
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.anchors,
            &intermediates,
            unix_time(at),
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::RequiredEkuNotFoundContext(_) => Error::Trust(wrong_usage(role)),
            other => Error::Trust(map_webpki(other)),
        })?;
        if cert.key_role() != Some(role) {
            return Err(wrong_usage(role).into());
        }
        Ok(party)
    }

    /// Validates an identity chain (leaf first) at `at`: path, validity,
    /// revocation, identity key usage. Returns the party it proves.
    pub fn verify_identity(
        &self,
        chain: &[Certificate],
        at: SystemTime,
    ) -> Result<VerifiedParty, Error> {
        let (leaf, rest) = chain.split_first().ok_or(TrustError::Malformed)?;
        let party = self.validate(leaf, rest, at, KeyRole::Identity)?;
        Ok(VerifiedParty {
            party,
            certificate: leaf.clone(),
        })
    }

    /// Validates a recipient's encryption certificate at `at`, with only the
    /// store's own intermediates for path building. A certificate read from a
    /// file that may carry its chain goes through
    /// [`TrustStore::verify_encryption_chain`] instead.
    pub fn verify_encryption(
        &self,
        cert: &Certificate,
        at: SystemTime,
    ) -> Result<VerifiedRecipientKey, Error> {
        self.verify_encryption_chain(std::slice::from_ref(cert), at)
    }

    /// Validates a recipient's encryption certificate given as a chain, leaf
    /// first and the intermediates that issued it after (as in a PEM file
    /// holding the leaf then its intermediate): path, validity, revocation of
    /// every certificate on the path, encryption key usage.
    pub fn verify_encryption_chain(
        &self,
        chain: &[Certificate],
        at: SystemTime,
    ) -> Result<VerifiedRecipientKey, Error> {
        let (cert, rest) = chain.split_first().ok_or(TrustError::Malformed)?;
        let party = self.validate(cert, rest, at, KeyRole::Encryption)?;
        Ok(VerifiedRecipientKey {
            party,
            public_key: *cert.public_key()?,
            certificate: cert.clone(),
        })
    }

    /// Whether a CRL in force lists `cert` as revoked: one from its issuer
    /// names its serial number. A lookup only, with no path validation and
    /// no signature check: for showing that the issuer of evidence verified
    /// earlier (a stored receipt) has been revoked since. Never a trust
    /// decision about anything new ([`TrustStore::verify_identity`] is).
    pub fn lists_revoked(&self, cert: &Certificate) -> bool {
        let Ok(parsed) = EndEntityCert::try_from(cert.der()) else {
            return false;
        };
        self.crls.iter().any(|crl| {
            crl.issuer() == parsed.issuer()
                && matches!(crl.find_serial(parsed.serial()), Ok(Some(_)))
        })
    }

    /// Whether any CRL is configured.
    pub fn has_crls(&self) -> bool {
        !self.crls.is_empty()
    }
}
