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
//! * [`suite`]: the fixed cipher suite and key schedule;
//! * `ca` (feature `ca`): issue CA, party certificates and CRLs.
//!
//! The byte formats are specified in `docs/envelope-format.md`.

#![forbid(unsafe_code)]

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

pub use error::{Error, FormatError, ReceiptError, TrustError};
pub use ids::{Fingerprint, MessageId, PartyUri};
