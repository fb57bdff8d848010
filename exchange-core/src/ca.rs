//! Issue a network CA, party credentials and CRLs (feature `ca`, rcgen).
//!
//! For test networks and small deployments; production networks bring their
//! own CA. Profiles (docs/envelope-format.md §3):
//!
//! * CA: basicConstraints CA, keyCertSign + cRLSign;
//! * identity: P-256, keyUsage digitalSignature, EKU clientAuth + serverAuth,
//!   one URI SubjectAltName (the party);
//! * encryption: P-256, keyUsage keyAgreement only, no EKU, the same URI;
//! * TLS server (a daemon's client listener, for stock gRPC clients that
//!   check host names): P-256, keyUsage digitalSignature, EKU serverAuth
//!   only, DNS and IP SubjectAltNames, optionally the facility's party URI
//!   (for clients that pin it). Without clientAuth it fails the identity
//!   profile, so its key can never sign for a party.
//!
//! Serial numbers are derived from the public key's hash by rcgen, so two
//! certificates never share one.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateRevocationListDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{CertificateRevocationList, FromDer};
use zeroize::Zeroizing;

use crate::error::{Error, FormatError};
use crate::identity::KeyRole;
use crate::ids::PartyUri;

fn issue_err(e: impl std::fmt::Display) -> Error {
    Error::Issue(e.to_string())
}

/// A validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: SystemTime,
    /// End.
    pub not_after: SystemTime,
}

impl Validity {
    /// From `now` (minus an hour of clock slack) for `days`.
    pub fn days_from(now: SystemTime, days: u32) -> Self {
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }
}

/// A certificate with its private key, both PEM.
pub struct IssuedCert {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// A party's four files: identity and encryption certificates and keys.
#[derive(Debug)]
pub struct PartyCredentials {
    /// Identity (signing / TLS) certificate and key.
    pub identity: IssuedCert,
    /// Encryption (HPKE) certificate and key.
    pub encryption: IssuedCert,
}

/// What to put in a leaf certificate. The defaults are the profiles above;
/// the other fields exist to build test PKIs with deliberately wrong certificates.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// The party URI (None: no SubjectAltName at all).
    pub party: Option<PartyUri>,
    /// Common name.
    pub name: String,
    /// Which profile.
    pub role: KeyRole,
    /// Validity.
    pub validity: Validity,
}

/// A revoked serial number and when it was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Serial number bytes (big-endian).
    pub serial: Vec<u8>,
    /// Revocation time.
    pub revoked_at: SystemTime,
}

/// What an existing CRL holds, so that a new one can extend it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrlState {
    /// The CRL number.
    pub number: u64,
    /// Revoked serials.
    pub revoked: Vec<RevokedSerial>,
}

/// A certificate authority able to issue party credentials and CRLs.
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: Zeroizing<String>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateAuthority { key: [redacted] }")
    }
}

fn new_key() -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_err)
}

fn dn(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

impl CertificateAuthority {
    /// Creates a self-signed P-256 CA.
    pub fn generate(name: &str, validity: Validity) -> Result<Self, Error> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::from(validity.not_before);
        params.not_after = OffsetDateTime::from(validity.not_after);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).map_err(issue_err)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a subordinate (intermediate) CA signed by this one. Parties it
    /// issues present `[leaf, intermediate]` as their chain.
    pub fn issue_subordinate(&self, name: &str, validity: Validity) -> Result<Self, Error> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::from(validity.not_before);
        params.not_after = OffsetDateTime::from(validity.not_after);
        params.key_identifier_method = KeyIdMethod::Sha256;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| FormatError::PrivateKey)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(issue_err)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: Zeroizing::new(key_pem.to_owned()),
            issuer,
        })
    }

    /// The CA certificate (PEM): the trust anchor parties install.
    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM). Keep it offline.
    pub fn key_pem(&self) -> &Zeroizing<String> {
        &self.key_pem
    }

    /// Issues one leaf certificate with a fresh P-256 key.
    pub fn issue_leaf(&self, spec: &LeafSpec) -> Result<IssuedCert, Error> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&spec.name);
        if let Some(party) = &spec.party {
            params.subject_alt_names =
                vec![SanType::URI(party.as_str().try_into().map_err(issue_err)?)];
        }
        match spec.role {
            KeyRole::Identity => {
                params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ClientAuth,
                    ExtendedKeyUsagePurpose::ServerAuth,
                ];
            }
            KeyRole::Encryption => {
                params.key_usages = vec![KeyUsagePurpose::KeyAgreement];
            }
        }
        params.not_before = OffsetDateTime::from(spec.validity.not_before);
        params.not_after = OffsetDateTime::from(spec.validity.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Issues a TLS server certificate valid for the host names `dns` and
    /// the addresses `ips`, naming `party` too if given (see the module
    /// profile). It cannot pass as an identity.
    pub fn issue_tls_server(
        &self,
        name: &str,
        party: Option<&PartyUri>,
        dns: &[String],
        ips: &[std::net::IpAddr],
        validity: Validity,
    ) -> Result<IssuedCert, Error> {
        if dns.is_empty() && ips.is_empty() {
            return Err(Error::Issue(
                "a server certificate needs at least one DNS name or IP address".into(),
            ));
        }
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name);
        for d in dns {
            rustls_pki_types::DnsName::try_from(d.as_str())
                .map_err(|_| Error::Issue(format!("{d:?} is not a valid DNS name")))?;
            params.subject_alt_names.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|e| Error::Issue(format!("DNS name {d:?}: {e}")))?,
            ));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        if let Some(party) = party {
            params
                .subject_alt_names
                .push(SanType::URI(party.as_str().try_into().map_err(issue_err)?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::from(validity.not_before);
        params.not_after = OffsetDateTime::from(validity.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Issues a party's identity and encryption credentials.
    pub fn issue_party(
        &self,
        party: &PartyUri,
        name: &str,
        validity: Validity,
    ) -> Result<PartyCredentials, Error> {
        let spec = |role| LeafSpec {
            party: Some(party.clone()),
            name: name.to_owned(),
            role,
            validity,
        };
        Ok(PartyCredentials {
            identity: self.issue_leaf(&spec(KeyRole::Identity))?,
            encryption: self.issue_leaf(&spec(KeyRole::Encryption))?,
        })
    }

    /// Issues a CRL (PEM) listing `state.revoked`, numbered `state.number`.
    pub fn crl(
        &self,
        state: &CrlState,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String, Error> {
        let params = CertificateRevocationListParams {
            this_update: OffsetDateTime::from(this_update),
            next_update: OffsetDateTime::from(next_update),
            crl_number: SerialNumber::from(state.number),
            issuing_distribution_point: None,
            revoked_certs: state
                .revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: OffsetDateTime::from(r.revoked_at),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(issue_err)
    }
}

/// Reads the number and revoked serials of an existing CRL (PEM), to extend it.
pub fn read_crl(pem: &[u8]) -> Result<CrlState, Error> {
    let der = CertificateRevocationListDer::from_pem_slice(pem)
        .map_err(|_| FormatError::Pem("X509 CRL"))?;
    let (_, crl) = CertificateRevocationList::from_der(&der)
        .map_err(|_| Error::Trust(crate::error::TrustError::InvalidCrl))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| RevokedSerial {
            serial: r.raw_serial().to_vec(),
            revoked_at: SystemTime::UNIX_EPOCH
                + Duration::from_secs(u64::try_from(r.revocation_date.timestamp()).unwrap_or(0)),
        })
        .collect();
    Ok(CrlState { number, revoked })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{DecryptionKey, Identity};

    #[test]
    fn debug_output_never_shows_private_keys() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_272_000);
        let ca = CertificateAuthority::generate("CA", Validity::days_from(now, 1)).unwrap();
        let creds = ca
            .issue_party(
                &PartyUri::new("urn:t:p").unwrap(),
                "p",
                Validity::days_from(now, 1),
            )
            .unwrap();
        let id = Identity::from_pem(
            creds.identity.cert_pem.as_bytes(),
            creds.identity.key_pem.as_bytes(),
        )
        .unwrap();
        let dk = DecryptionKey::from_pem(
            creds.encryption.cert_pem.as_bytes(),
            creds.encryption.key_pem.as_bytes(),
        )
        .unwrap();
        // The base64 body of each key PEM, a line at a time, must appear in no Debug output.
        let secrets: Vec<String> = [
            ca.key_pem().as_str(),
            creds.identity.key_pem.as_str(),
            creds.encryption.key_pem.as_str(),
        ]
        .iter()
        .flat_map(|pem| {
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
        let outputs = [
            format!("{ca:?}"),
            format!("{creds:?}"),
            format!("{id:?}"),
            format!("{dk:?}"),
        ];
        for out in &outputs {
            assert!(out.contains("[redacted]"), "{out}");
            for s in &secrets {
                assert!(!out.contains(s.as_str()), "key material in {out}");
            }
        }
    }
}
