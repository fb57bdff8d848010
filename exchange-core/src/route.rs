//! Routes, hop roles and the provision boundary (責任分界点).
//!
//! A header declares its relays in travel order and a role for each recipient.
//! `ENTRUSTED` (委託) hops act for the sender: the data stays under the
//! sender's responsibility. `THIRD_PARTY` (第三者提供) hops are where the data
//! is provided to someone else. Responsibility passes at the first
//! `THIRD_PARTY` hop on a recipient's path that returns a receipt showing it
//! took custody: `ACCEPTED_FOR_RELAY` from a relay, `DELIVERED` (or
//! `PROCESSED`) from the recipient (docs/envelope-format.md §8).

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, FormatError};
use crate::ids::PartyUri;
use crate::receipt::{Disposition, VerifiedReceipt};

/// The role of a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HopRole {
    /// 委託: acts for the sender; responsibility stays with the sender.
    Entrusted,
    /// 第三者提供: custody here moves responsibility to this party.
    ThirdParty,
}

impl HopRole {
    pub(crate) fn to_wire(self) -> i32 {
        match self {
            Self::Entrusted => crate::proto::HopRole::Entrusted as i32,
            Self::ThirdParty => crate::proto::HopRole::ThirdParty as i32,
        }
    }

    pub(crate) fn from_wire(v: i32, field: &'static str) -> Result<Self, Error> {
        match crate::proto::HopRole::try_from(v) {
            Ok(crate::proto::HopRole::Entrusted) => Ok(Self::Entrusted),
            Ok(crate::proto::HopRole::ThirdParty) => Ok(Self::ThirdParty),
            _ => Err(FormatError::InvalidField(field).into()),
        }
    }

    /// `ENTRUSTED` or `THIRD_PARTY`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entrusted => "ENTRUSTED",
            Self::ThirdParty => "THIRD_PARTY",
        }
    }
}

impl fmt::Display for HopRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HopRole {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "entrusted" => Ok(Self::Entrusted),
            "third-party" => Ok(Self::ThirdParty),
            _ => Err(Error::InvalidArgument(format!(
                "unknown hop role {s:?} (entrusted or third-party)"
            ))),
        }
    }
}

/// One party on a route with its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The party.
    pub party: PartyUri,
    /// Its role.
    pub role: HopRole,
}

/// A declared route: relays in travel order, then the recipients (in parallel).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Relays, in travel order.
    pub relays: Vec<Hop>,
    /// Final recipients.
    pub recipients: Vec<Hop>,
}

/// Where responsibility for one recipient's copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provision {
    /// Every hop on the path is `ENTRUSTED`: no third-party provision (委託 only).
    NotAProvision,
    /// The boundary hop has not yet returned a custody receipt.
    Pending {
        /// The hop whose receipt will mark the boundary.
        boundary: Hop,
    },
    /// Responsibility passed: `receipt` (an index into the receipts given) marks it.
    Passed {
        /// The boundary hop.
        boundary: Hop,
        /// Index of the boundary receipt.
        receipt: usize,
    },
    /// The boundary hop refused the message.
    Rejected {
        /// The boundary hop.
        boundary: Hop,
        /// Index of the REJECTED receipt.
        receipt: usize,
    },
}

/// The provision status for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientProvision {
    /// The final recipient.
    pub recipient: PartyUri,
    /// Where responsibility stands on its path.
    pub provision: Provision,
}

impl Route {
    /// The role `party` plays on this route, relays first.
    pub fn role_of(&self, party: &PartyUri) -> Option<HopRole> {
        self.relays
            .iter()
            .chain(&self.recipients)
            .find(|h| &h.party == party)
            .map(|h| h.role)
    }

    /// Computes, per recipient, where the provision boundary lies given the
    /// receipts received so far. Receipts must already be checked against the
    /// envelope ([`VerifiedReceipt::check_for`]); receipts from parties off the
    /// path are ignored.
    pub fn provision_boundaries(&self, receipts: &[VerifiedReceipt]) -> Vec<RecipientProvision> {
        self.recipients
            .iter()
            .map(|recipient| {
                let is_final = |hop: &Hop| std::ptr::eq(hop, recipient);
                let boundary = self
                    .relays
                    .iter()
                    .chain(std::iter::once(recipient))
                    .find(|h| h.role == HopRole::ThirdParty);
                let provision = match boundary {
                    None => Provision::NotAProvision,
                    Some(hop) => {
                        let custody = |d: Disposition| {
                            if is_final(hop) {
                                matches!(d, Disposition::Delivered | Disposition::Processed)
                            } else {
                                matches!(d, Disposition::AcceptedForRelay)
                            }
                        };
                        let from_hop = || {
                            receipts
                                .iter()
                                .enumerate()
                                .filter(|(_, r)| r.issuer() == &hop.party)
                        };
                        let passed = from_hop()
                            .filter(|(_, r)| custody(r.disposition().clone()))
                            .min_by_key(|(_, r)| r.issued());
                        let rejected = from_hop()
                            .find(|(_, r)| matches!(r.disposition(), Disposition::Rejected(_)));
                        match (passed, rejected) {
                            (Some((i, _)), _) => Provision::Passed {
                                boundary: hop.clone(),
                                receipt: i,
                            },
                            (None, Some((i, _))) => Provision::Rejected {
                                boundary: hop.clone(),
                                receipt: i,
                            },
                            (None, None) => Provision::Pending {
                                boundary: hop.clone(),
                            },
                        }
                    }
                };
                RecipientProvision {
                    recipient: recipient.party.clone(),
                    provision,
                }
            })
            .collect()
    }
}
