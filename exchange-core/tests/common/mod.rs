//! A test network built at run time: CA, parties, trust stores, a fixed clock.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exchange_core::PartyUri;
use exchange_core::ca::{CertificateAuthority, CrlState, LeafSpec, RevokedSerial, Validity};
use exchange_core::envelope::{InnerMetadata, SealerBuilder, SubjectId};
use exchange_core::identity::{Certificate, DecryptionKey, Identity, KeyRole};
use exchange_core::route::HopRole;
use exchange_core::trust::{TrustStore, VerifiedRecipientKey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// 2026-06-01T00:00:00Z.
pub const T0: u64 = 1_780_272_000;
pub const DAY: Duration = Duration::from_secs(86_400);

pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0)
}

pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

pub struct Party {
    pub uri: PartyUri,
    pub identity: Identity,
    pub key: DecryptionKey,
    pub identity_pem: String,
    pub identity_key_pem: String,
    pub encryption_pem: String,
    pub encryption_key_pem: String,
}

impl Party {
    pub fn encryption_cert(&self) -> Certificate {
        self.key.certificate().clone()
    }
}

pub struct Net {
    pub ca: CertificateAuthority,
    pub ca_pem: String,
}

impl Net {
    pub fn new(name: &str) -> Self {
        let ca = CertificateAuthority::generate(
            name,
            Validity {
                not_before: now() - 365 * DAY,
                not_after: now() + 3650 * DAY,
            },
        )
        .unwrap();
        let ca_pem = ca.certificate_pem().to_owned();
        Self { ca, ca_pem }
    }

    pub fn party_with(&self, uri: &str, validity: Validity) -> Party {
        let uri = PartyUri::new(uri).unwrap();
        let creds = self.ca.issue_party(&uri, uri.as_str(), validity).unwrap();
        Party {
            identity: Identity::from_pem(
                creds.identity.cert_pem.as_bytes(),
                creds.identity.key_pem.as_bytes(),
            )
            .unwrap(),
            key: DecryptionKey::from_pem(
                creds.encryption.cert_pem.as_bytes(),
                creds.encryption.key_pem.as_bytes(),
            )
            .unwrap(),
            uri,
            identity_pem: creds.identity.cert_pem,
            identity_key_pem: creds.identity.key_pem.to_string(),
            encryption_pem: creds.encryption.cert_pem,
            encryption_key_pem: creds.encryption.key_pem.to_string(),
        }
    }

    pub fn party(&self, uri: &str) -> Party {
        self.party_with(
            uri,
            Validity {
                not_before: now() - 30 * DAY,
                not_after: now() + 365 * DAY,
            },
        )
    }

    /// A leaf with an explicit profile (for wrong-usage tests): cert PEM and key PEM.
    pub fn leaf(&self, uri: &str, role: KeyRole) -> (String, String) {
        let c = self
            .ca
            .issue_leaf(&LeafSpec {
                party: Some(PartyUri::new(uri).unwrap()),
                name: uri.to_owned(),
                role,
                validity: Validity {
                    not_before: now() - DAY,
                    not_after: now() + 365 * DAY,
                },
            })
            .unwrap();
        (c.cert_pem, c.key_pem.to_string())
    }

    pub fn trust(&self) -> TrustStore {
        TrustStore::builder()
            .anchors_pem(self.ca_pem.as_bytes())
            .unwrap()
            .build()
            .unwrap()
    }

    /// A CRL revoking `revoked` (identity certificates), valid for 30 days from `now()`.
    pub fn crl(&self, revoked: &[&Party], next_update: SystemTime) -> String {
        let state = CrlState {
            number: 2,
            revoked: revoked
                .iter()
                .map(|p| RevokedSerial {
                    serial: hex::decode(p.identity.certificate().serial_hex()).unwrap(),
                    revoked_at: now() - DAY,
                })
                .collect(),
        };
        self.ca.crl(&state, now() - DAY, next_update).unwrap()
    }

    pub fn trust_with_crl(&self, crl_pem: &str) -> TrustStore {
        TrustStore::builder()
            .anchors_pem(self.ca_pem.as_bytes())
            .unwrap()
            .crls_pem(crl_pem.as_bytes())
            .unwrap()
            .build()
            .unwrap()
    }

    pub fn recipient_key(&self, p: &Party) -> VerifiedRecipientKey {
        self.trust()
            .verify_encryption(&p.encryption_cert(), now())
            .unwrap()
    }
}

pub fn metadata() -> InnerMetadata {
    InnerMetadata {
        subject_ids: vec![SubjectId {
            system: "urn:oid:1.2.392.100495.20.3.51.11310000013".into(),
            value: "P-000123 (synthetic)".into(),
        }],
        title: "診療情報提供書".into(),
        document_type: "57133-1".into(),
        file_name: "referral.json".into(),
    }
}

/// Seals `plaintext` from `from` to `to` (third party) into the file form.
pub fn seal(
    net: &Net,
    from: &Party,
    to: &[&Party],
    plaintext: &[u8],
    chunk: u32,
    seed: u64,
) -> Vec<u8> {
    let mut b = SealerBuilder::new(&from.identity, "application/fhir+json")
        .purpose("treatment")
        .metadata(metadata())
        .chunk_size(chunk);
    for p in to {
        b = b.recipient(net.recipient_key(p), HopRole::ThirdParty);
    }
    b.start(now(), &mut rng(seed))
        .unwrap()
        .seal_to_vec(plaintext)
}

/// Deterministic pseudo-random payload.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}
