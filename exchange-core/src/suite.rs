//! The one fixed cipher suite, and every crypto decision of the format.
//!
//! Nothing outside this module picks an algorithm, a label or a nonce layout
//! (docs/envelope-format.md §5 and §6). There is no negotiation: a new suite
//! means a new format version.
//!
//! * signatures: ECDSA P-256 / SHA-256, RFC 6979 deterministic nonces, 64-byte `r || s`
//!   with low S (high-S is rejected, so signatures are not malleable),
//!   over `context || 0x00 || message`;
//! * key wrap: HPKE (RFC 9180) base mode, DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM;
//! * key schedule: HKDF-SHA256 from the content key, salted with the message id;
//! * payload: AES-256-GCM per chunk, nonce = 88-bit big-endian counter || last-chunk flag.

use std::fmt;

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use hkdf::Hkdf;
use hpke::{Deserializable, Serializable};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::Error;
use crate::ids::MessageId;

/// Format version written into headers and receipts.
pub const FORMAT_VERSION: u32 = 1;
/// Signature context for envelope headers.
pub(crate) const HEADER_CONTEXT: &[u8] = b"exchange/v1 header";
/// Signature context for receipt bodies.
pub(crate) const RECEIPT_CONTEXT: &[u8] = b"exchange/v1 receipt";
/// Signature context for audit-log checkpoints (signed tree heads).
pub(crate) const AUDIT_CHECKPOINT_CONTEXT: &[u8] = b"exchange/v1 audit checkpoint";
/// HMAC label of patient pseudonyms in the audit log.
const SUBJECT_PSEUDONYM_LABEL: &[u8] = b"exchange/v1 subject pseudonym";
const HPKE_INFO_LABEL: &[u8] = b"exchange/v1 content key";
const COMMITMENT_LABEL: &[u8] = b"exchange/v1 key commitment";
const PAYLOAD_LABEL: &[u8] = b"exchange/v1 payload key";
const METADATA_LABEL: &[u8] = b"exchange/v1 metadata key";
const METADATA_AAD: &[u8] = b"exchange/v1 metadata";

/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// HPKE encapsulated key length (uncompressed P-256 point).
pub const ENC_LEN: usize = 65;
/// Wrapped content key length (32-byte key + tag).
pub const WRAPPED_LEN: usize = 32 + TAG_LEN;
/// Signature length (`r || s`).
pub const SIGNATURE_LEN: usize = 64;

type Kem = hpke::kem::DhP256HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type HpkeAead = hpke::aead::AesGcm256;

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Incremental SHA-256 (the ciphertext digest; file checksums in backups).
#[derive(Clone, Default)]
pub struct Hasher(Sha256);

impl fmt::Debug for Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hasher(SHA-256)")
    }
}

impl Hasher {
    /// A fresh SHA-256 state.
    pub fn new() -> Self {
        Self::default()
    }
    /// Absorbs `data`.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything absorbed.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

fn signed_input(context: &[u8], message: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(context.len() + 1 + message.len());
    input.extend_from_slice(context);
    input.push(0);
    input.extend_from_slice(message);
    input
}

/// Signs `context || 0x00 || message` (RFC 6979: the same inputs give the same signature).
pub(crate) fn sign(key: &SigningKey, context: &[u8], message: &[u8]) -> [u8; SIGNATURE_LEN] {
    let sig: Signature = key.sign(&signed_input(context, message));
    sig.normalize_s().to_bytes().into()
}

/// Verifies a signature made by [`sign`].
pub(crate) fn verify(
    key: &VerifyingKey,
    context: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), Error> {
    let sig = Signature::from_slice(signature).map_err(|_| Error::BadSignature)?;
    // Only low-S signatures: each signed header or receipt has exactly one valid encoding.
    if sig.normalize_s() != sig {
        return Err(Error::BadSignature);
    }
    key.verify(&signed_input(context, message), &sig)
        .map_err(|_| Error::BadSignature)
}

/// Merkle leaf hash (RFC 9162 §2.1.1): `SHA-256(0x00 || data)`.
pub fn merkle_leaf_hash(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// Merkle interior node hash (RFC 9162 §2.1.1): `SHA-256(0x01 || left || right)`.
pub fn merkle_node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty Merkle tree (RFC 9162 §2.1.1): `SHA-256("")`.
pub fn merkle_empty_root() -> [u8; 32] {
    sha256(&[])
}

/// Patient pseudonym for the audit log:
/// `HMAC-SHA256(key, "exchange/v1 subject pseudonym" || 0x00 || subject_id)`.
pub fn subject_pseudonym(key: &SecretKey32, subject_id: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    // HMAC takes keys of any length; a 32-byte key cannot be refused.
    #[allow(clippy::expect_used)]
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC accepts any key length");
    mac.update(SUBJECT_PSEUDONYM_LABEL);
    mac.update(&[0x00]);
    mac.update(subject_id);
    mac.finalize().into_bytes().into()
}

/// A 32-byte secret (content key or derived key): zeroized on drop, never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey32([u8; 32]);

impl SecretKey32 {
    /// Wraps bytes (known-answer tests and vectors).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The key bytes. For test vectors and interoperability checks only.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn random(rng: &mut impl CryptoRng) -> Self {
        let mut b = [0u8; 32];
        rng.fill_bytes(&mut b);
        Self(b)
    }
}

impl std::fmt::Debug for SecretKey32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey32([redacted])")
    }
}

/// Everything derived from one content key (docs/envelope-format.md §5.2).
#[derive(Debug)]
pub struct KeySchedule {
    /// Public: published in the header so every recipient can check its content key.
    pub commitment: [u8; 32],
    /// Encrypts the payload chunks.
    pub payload_key: SecretKey32,
    /// Encrypts the inner metadata.
    pub metadata_key: SecretKey32,
}

impl KeySchedule {
    /// Derives the schedule: `PRK = HKDF-Extract(salt = message id, IKM = CEK)`, then one
    /// HKDF-Expand per label.
    pub fn derive(cek: &SecretKey32, message_id: &MessageId) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(message_id.as_bytes()), &cek.0);
        let expand = |label: &[u8]| {
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
            #[allow(clippy::expect_used)]
            hk.expand(label, &mut out).expect("32-byte HKDF output");
            out
        };
        Self {
            commitment: expand(COMMITMENT_LABEL),
            payload_key: SecretKey32(expand(PAYLOAD_LABEL)),
            metadata_key: SecretKey32(expand(METADATA_LABEL)),
        }
    }
}

/// HPKE `info` for one recipient entry: binds the wrap to the message and the recipient key.
fn hpke_info(message_id: &MessageId, key_fingerprint: &[u8; 32]) -> Vec<u8> {
    let mut info = Vec::with_capacity(HPKE_INFO_LABEL.len() + 1 + 16 + 32);
    info.extend_from_slice(HPKE_INFO_LABEL);
    info.push(0);
    info.extend_from_slice(message_id.as_bytes());
    info.extend_from_slice(key_fingerprint);
    info
}

/// Wraps the content key to one recipient's encryption key. Returns `(enc, wrapped)`.
pub(crate) fn wrap_key(
    cek: &SecretKey32,
    recipient: &p256::PublicKey,
    message_id: &MessageId,
    key_fingerprint: &[u8; 32],
    rng: &mut impl CryptoRng,
) -> Result<([u8; ENC_LEN], Vec<u8>), Error> {
    let point = recipient.to_sec1_bytes();
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&point)
        .map_err(|_| Error::InvalidArgument("recipient key is not a valid P-256 point".into()))?;
    let (enc, wrapped) = hpke::single_shot_seal_with_rng::<HpkeAead, Kdf, Kem>(
        &hpke::OpModeS::Base,
        &pk,
        &hpke_info(message_id, key_fingerprint),
        &cek.0,
        &[],
        rng,
    )
    .map_err(|_| Error::InvalidArgument("HPKE encapsulation failed".into()))?;
    let enc_bytes = enc.to_bytes();
    let mut enc_out = [0u8; ENC_LEN];
    enc_out.copy_from_slice(&enc_bytes);
    Ok((enc_out, wrapped))
}

/// Unwraps a content key with our encryption key. Opaque on failure.
pub(crate) fn unwrap_key(
    secret: &p256::SecretKey,
    enc: &[u8],
    wrapped: &[u8],
    message_id: &MessageId,
    key_fingerprint: &[u8; 32],
) -> Result<SecretKey32, Error> {
    let sk_bytes = Zeroizing::new(secret.to_bytes());
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&sk_bytes).map_err(|_| Error::KeyUnwrap)?;
    let encapped =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).map_err(|_| Error::KeyUnwrap)?;
    let plain = Zeroizing::new(
        hpke::single_shot_open::<HpkeAead, Kdf, Kem>(
            &hpke::OpModeR::Base,
            &sk,
            &encapped,
            &hpke_info(message_id, key_fingerprint),
            wrapped,
            &[],
        )
        .map_err(|_| Error::KeyUnwrap)?,
    );
    let key: [u8; 32] = plain.as_slice().try_into().map_err(|_| Error::KeyUnwrap)?;
    Ok(SecretKey32(key))
}

/// Constant-time comparison of the commitment.
pub(crate) fn commitment_matches(a: &[u8; 32], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    b.len() == 32 && bool::from(a.ct_eq(b))
}

fn aead(key: &SecretKey32) -> Aes256Gcm {
    Aes256Gcm::new(&key.0.into())
}

/// Seals the inner metadata (key is unique per message, so a zero nonce is safe).
pub(crate) fn seal_metadata(key: &SecretKey32, plaintext: &[u8]) -> Vec<u8> {
    let mut buf = plaintext.to_vec();
    // AES-GCM only refuses inputs over 64 GiB; metadata is bounded by the 1 MiB head.
    #[allow(clippy::expect_used)]
    let tag = aead(key)
        .encrypt_inout_detached(&[0u8; 12].into(), METADATA_AAD, buf.as_mut_slice().into())
        .expect("metadata below the AES-GCM length limit");
    buf.extend_from_slice(&tag);
    buf
}

/// Opens the inner metadata.
pub(crate) fn open_metadata(key: &SecretKey32, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
    if sealed.len() < TAG_LEN {
        return Err(Error::MetadataDecryption);
    }
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut buf = Zeroizing::new(ct.to_vec());
    aead(key)
        .decrypt_inout_detached(
            &[0u8; 12].into(),
            METADATA_AAD,
            buf.as_mut_slice().into(),
            tag.try_into().map_err(|_| Error::MetadataDecryption)?,
        )
        .map_err(|_| Error::MetadataDecryption)?;
    Ok(buf)
}

/// The chunk cipher (docs/envelope-format.md §6): one key, a counter nonce, a last-chunk flag.
pub(crate) struct ChunkCipher(Aes256Gcm);

impl ChunkCipher {
    pub(crate) fn new(key: &SecretKey32) -> Self {
        Self(aead(key))
    }

    fn nonce(index: u64, last: bool) -> [u8; 12] {
        // 88-bit counter: the top 3 bytes stay zero for any u64 index.
        let mut n = [0u8; 12];
        n[3..11].copy_from_slice(&index.to_be_bytes());
        n[11] = u8::from(last);
        n
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal(&self, index: u64, last: bool, buf: &mut Vec<u8>) {
        // AES-GCM only refuses inputs over 64 GiB; chunks are at most 16 MiB.
        #[allow(clippy::expect_used)]
        let tag = self
            .0
            .encrypt_inout_detached(
                &Self::nonce(index, last).into(),
                &[],
                buf.as_mut_slice().into(),
            )
            .expect("chunk below the AES-GCM length limit");
        buf.extend_from_slice(&tag);
    }

    /// Decrypts `chunk` (ciphertext || tag) in place; on success `chunk` holds the plaintext.
    pub(crate) fn open(&self, index: u64, last: bool, chunk: &mut Vec<u8>) -> Result<(), Error> {
        if chunk.len() < TAG_LEN {
            return Err(Error::ChunkDecryption { index });
        }
        let split = chunk.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&chunk[split..]);
        chunk.truncate(split);
        self.0
            .decrypt_inout_detached(
                &Self::nonce(index, last).into(),
                &[],
                chunk.as_mut_slice().into(),
                &tag.into(),
            )
            .map_err(|_| {
                chunk.zeroize();
                Error::ChunkDecryption { index }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_nonce_layout() {
        assert_eq!(ChunkCipher::nonce(0, false), [0; 12]);
        // 3 zero bytes || u64 big-endian index || flag.
        assert_eq!(
            ChunkCipher::nonce(0x0102, true),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 1]
        );
        assert_eq!(ChunkCipher::nonce(u64::MAX, false)[3..11], [0xff; 8]);
    }

    #[test]
    fn chunk_open_rejects_wrong_position_or_flag() {
        let c = ChunkCipher::new(&SecretKey32([7; 32]));
        let mut buf = b"hello".to_vec();
        c.seal(3, false, &mut buf);
        for (i, last) in [(2, false), (3, true), (4, false)] {
            let mut b = buf.clone();
            assert!(
                matches!(c.open(i, last, &mut b), Err(Error::ChunkDecryption { index }) if index == i)
            );
        }
        c.open(3, false, &mut buf).unwrap();
        assert_eq!(buf, b"hello");
    }

    #[test]
    fn signature_is_domain_separated() {
        let key = SigningKey::from_slice(&[1; 32]).unwrap();
        let sig = sign(&key, HEADER_CONTEXT, b"m");
        verify(key.verifying_key(), HEADER_CONTEXT, b"m", &sig).unwrap();
        assert!(matches!(
            verify(key.verifying_key(), RECEIPT_CONTEXT, b"m", &sig),
            Err(Error::BadSignature)
        ));
        // RFC 6979: deterministic.
        assert_eq!(sig, sign(&key, HEADER_CONTEXT, b"m"));
    }

    #[test]
    fn high_s_twin_of_a_valid_signature_is_rejected() {
        let key = SigningKey::from_slice(&[1; 32]).unwrap();
        for msg in [&b"a"[..], b"b", b"c", b"d"] {
            let low = Signature::from_slice(&sign(&key, HEADER_CONTEXT, msg)).unwrap();
            let (r, s) = low.split_scalars();
            let high = Signature::from_scalars(r.to_bytes(), (-s).to_bytes()).unwrap();
            // Mathematically valid, but a second encoding of the same signature.
            assert!(
                key.verifying_key()
                    .verify(&signed_input(HEADER_CONTEXT, msg), &high)
                    .is_ok()
            );
            verify(key.verifying_key(), HEADER_CONTEXT, msg, &low.to_bytes()).unwrap();
            assert!(matches!(
                verify(key.verifying_key(), HEADER_CONTEXT, msg, &high.to_bytes()),
                Err(Error::BadSignature)
            ));
        }
    }
}
