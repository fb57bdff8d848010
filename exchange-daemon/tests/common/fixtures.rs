//! What the store-level tests store: an envelope a relay took in, an
//! audit entry. Each test adjusts the fields it is about.

use exchange_core::audit::{AuditAction, AuditEntry, AuditOutcome};
use exchange_core::suite::sha256;
use exchange_core::{MessageId, PartyUri};
use exchange_daemon::store::{Ciphertext, DeliveryKind, MessageKind, NewDelivery, NewEnvelope};

pub fn uri(s: &str) -> PartyUri {
    PartyUri::new(s).unwrap()
}

/// An audit entry by `actor`, with `detail`, for the store to number.
pub fn audit_entry(actor: &str, detail: String) -> AuditEntry {
    AuditEntry {
        seq: 0,
        time_ms: 0,
        party: "urn:test:us".into(),
        actor: actor.into(),
        action: AuditAction::Receipt,
        message_id: None,
        subjects: Vec::new(),
        outcome: AuditOutcome::Ok,
        reason: None,
        detail: Some(detail),
        subject_set: None,
    }
}

/// Envelope `id` from `sender`, taken in by a relay: one delivery onward
/// to `urn:test:next`, our receipt kept, its acceptance audited.
pub fn relayed(id: MessageId, sender: &str, ciphertext: Ciphertext, len: u64) -> NewEnvelope {
    NewEnvelope {
        id,
        header_sha256: sha256(id.as_bytes()),
        kind: MessageKind::Relay,
        head: b"head bytes".to_vec(),
        ciphertext,
        ciphertext_len: len,
        sender: uri(sender),
        upstream: Some(uri("urn:test:upstream")),
        local_client: None,
        content_type: "application/fhir+json".into(),
        purpose: "treatment".into(),
        created_ms: 1_000,
        expires_ms: 9_000_000,
        received_ms: 2_000,
        our_receipt: Some(b"our receipt".to_vec()),
        deliveries: vec![NewDelivery {
            target: uri("urn:test:next"),
            kind: DeliveryKind::Envelope,
            expires_ms: 9_000_000,
        }],
        awaited: Vec::new(),
        meta: None,
        provision: None,
        audit: vec![audit_entry("daemon", format!("accepted {id}"))],
        send_key: None,
    }
}
