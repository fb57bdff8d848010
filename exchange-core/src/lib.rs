//! # exchange-core
//!
//! Sealed, signed envelopes and signed delivery receipts for exchanging
//! medical records between facilities (DESIGN.md), with no I/O of its own:
//! time and randomness come in as arguments, bytes go through `std::io`
//! traits or slices.
//!
//! * [`identity`]: certificates, identity and encryption keys;
//! * [`trust`]: path validation (rustls-webpki), CRLs, key-usage profile;
//! * [`envelope`]: seal and open, streaming in constant memory;
//! * [`receipt`]: signed delivery receipts;
//! * [`route`]: hops, roles and the provision boundary (責任分界点);
//! * [`audit`]: the tamper-evident audit log (Merkle tree, signed checkpoints, verifiable exports);
//! * [`suite`]: the fixed cipher suite and key schedule;
//! * `ca` (feature `ca`): issue CA, party certificates and CRLs.
//!
//! The byte formats are specified in `docs/envelope-format.md`.
//!
//! ## Example: seal, open, receipt
//!
//! ```
//! # fn main() -> Result<(), exchange_core::Error> {
//! use std::time::SystemTime;
//!
//! use exchange_core::ca::{CertificateAuthority, Validity};
//! use exchange_core::envelope::{open_slice, InnerMetadata, SealerBuilder, SubjectId};
//! use exchange_core::identity::{Certificate, DecryptionKey, Identity};
//! use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
//! use exchange_core::route::{HopRole, Provision};
//! use exchange_core::trust::TrustStore;
//! use exchange_core::PartyUri;
//!
//! let now = SystemTime::now();
//! let mut rng = rand_core::UnwrapErr(getrandom::SysRng);
//!
//! // A test network; real parties load their PEM files the same way.
//! let ca = CertificateAuthority::generate("Test CA", Validity::days_from(now, 30))?;
//! let clinic = ca.issue_party(&PartyUri::new("urn:jp:mhlw:facility:1310000013")?, "Sakura Clinic", Validity::days_from(now, 30))?;
//! let hospital = ca.issue_party(&PartyUri::new("urn:jp:mhlw:facility:1310000021")?, "Minato General Hospital", Validity::days_from(now, 30))?;
//! let trust = TrustStore::builder().anchors_pem(ca.certificate_pem().as_bytes())?.build()?;
//!
//! // The clinic seals a referral to the hospital's (validated) encryption certificate.
//! let clinic_id = Identity::from_pem(clinic.identity.cert_pem.as_bytes(), clinic.identity.key_pem.as_bytes())?;
//! let to = Certificate::from_pem(hospital.encryption.cert_pem.as_bytes())?.remove(0);
//! let envelope = SealerBuilder::new(&clinic_id, "application/fhir+json")
//!     .recipient(trust.verify_encryption(&to, now)?, HopRole::ThirdParty)
//!     .purpose("treatment")
//!     .metadata(InnerMetadata {
//!         subject_ids: vec![SubjectId { system: "urn:example:patient-id".into(), value: "P-000123".into() }],
//!         title: "診療情報提供書".into(),
//!         ..InnerMetadata::default()
//!     })
//!     .start(now, &mut rng)?
//!     .seal_to_vec(br#"{"resourceType":"Bundle"}"#);
//!
//! // The hospital opens it: signature, chain, recipient entry and commitment are checked first.
//! let key = DecryptionKey::from_pem(hospital.encryption.cert_pem.as_bytes(), hospital.encryption.key_pem.as_bytes())?;
//! let (head, metadata, plaintext) = open_slice(&envelope, &trust, &[key], now)?;
//! assert_eq!(plaintext, br#"{"resourceType":"Bundle"}"#);
//! assert_eq!(metadata.subject_ids[0].value, "P-000123");
//!
//! // It signs a DELIVERED receipt; the clinic verifies it and finds the provision boundary.
//! let hospital_id = Identity::from_pem(hospital.identity.cert_pem.as_bytes(), hospital.identity.key_pem.as_bytes())?;
//! let receipt = SignedReceipt::issue(&hospital_id, &ReceiptContent::for_head(&head, HopRole::ThirdParty, Disposition::Delivered, now));
//! let verified = SignedReceipt::from_file(&receipt.to_file())?.verify(&trust)?;
//! verified.check_for(&head)?;
//! let boundary = &head.route().provision_boundaries(&[verified])[0];
//! assert!(matches!(boundary.provision, Provision::Passed { receipt: 0, .. }));
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]

pub mod audit;
#[cfg(feature = "ca")]
pub mod ca;
pub mod envelope;
pub mod error;
pub mod identity;
pub mod ids;
mod proto;
pub mod receipt;
pub mod route;
pub mod suite;
pub mod trust;

pub use error::{AuditError, Error, FormatError, ReceiptError, TrustError};
pub use ids::{Fingerprint, MessageId, PartyUri};
