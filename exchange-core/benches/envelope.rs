//! Envelope, receipt and raw-primitive benchmarks (DESIGN.md §8).
//!
//! `cargo bench -p exchange-core --bench envelope` runs the criterion groups,
//! then prints a summary that puts each envelope operation next to the raw
//! primitives it is made of, measured in the same run on the same bytes:
//!
//! * small messages (4 KiB): the cost should be the public-key operations;
//! * large messages (64 MiB): throughput should be near AES-GCM + SHA-256;
//! * and, when an `openssl` binary is on the PATH, `openssl cms` doing the
//!   same job on the same credentials.
//!
//! Everything runs on one thread. The PKI is built in memory (feature `ca`),
//! the clock is fixed and the RNG seeded, so every run seals the same kind of
//! envelope. `cargo test --benches` (criterion's test mode) runs each
//! benchmark once and skips the summary. Figures: docs/performance.md.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use exchange_core::PartyUri;
use exchange_core::ca::{CertificateAuthority, Validity};
use exchange_core::envelope::{EnvelopeHead, SealerBuilder, open_slice};
use exchange_core::identity::{Certificate, DecryptionKey, Identity};
use exchange_core::receipt::{Disposition, ReceiptContent, SignedReceipt};
use exchange_core::route::HopRole;
use exchange_core::trust::{TrustStore, VerifiedRecipientKey};
use hpke::{Deserializable, Serializable};
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::DecodePrivateKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};

type Kem = hpke::kem::DhP256HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type HpkeAead = hpke::aead::AesGcm256;

const SMALL: usize = 4 * 1024;
const LARGE: usize = 64 * 1024 * 1024;
/// The envelope's default chunk size: the raw AES-GCM baseline uses the same.
const CHUNK: usize = 64 * 1024;
/// 2026-06-01T00:00:00Z: the fixed clock of every operation.
const T0: u64 = 1_780_272_000;
/// Same domain-separated input the header signature uses (docs/envelope-format.md §4.5).
const HEADER_CONTEXT: &[u8] = b"exchange/v1 header";
/// Label of the HPKE `info` of a recipient entry (docs/envelope-format.md §5.1).
const HPKE_INFO: &[u8] = b"exchange/v1 content key";

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(T0)
}

/// A CA, a sender and a recipient, plus the raw keys for the primitive baselines.
struct Fixture {
    sender: Identity,
    recipient: Identity,
    recipient_key: VerifiedRecipientKey,
    keys: Vec<DecryptionKey>,
    trust: TrustStore,
    /// Sender chain as the envelope carries it (parsed).
    sender_chain: Vec<Certificate>,
    /// The sender's identity key and the recipient's encryption key, as raw primitives.
    signing_key: SigningKey,
    hpke_pk: <Kem as hpke::Kem>::PublicKey,
    hpke_sk: <Kem as hpke::Kem>::PrivateKey,
    /// The recipient's encryption certificate fingerprint (HPKE info).
    recipient_fp: [u8; 32],
    /// The CA's public key (uncompressed SEC1 point), the sender leaf's TBSCertificate
    /// and the CA's DER signature over it: the aws-lc-rs verify webpki does per chain.
    ca_spki_point: Vec<u8>,
    leaf_tbs: Vec<u8>,
    leaf_sig_der: Vec<u8>,
    /// The same credentials as PEM files' contents, for the `openssl cms` comparison.
    pems: Pems,
}

/// PEM texts: CA certificate, sender identity certificate and key, recipient
/// encryption certificate and key.
struct Pems {
    ca: String,
    sender_cert: String,
    sender_key: String,
    recipient_cert: String,
    recipient_key: String,
}

impl Fixture {
    fn new() -> Self {
        let validity = Validity::days_from(now(), 365);
        let ca = CertificateAuthority::generate("Bench CA", validity).unwrap();
        let sender_uri = PartyUri::new("urn:jp:mhlw:facility:1310000013").unwrap();
        let recipient_uri = PartyUri::new("urn:jp:mhlw:facility:1310000021").unwrap();
        let s = ca
            .issue_party(&sender_uri, "Bench Clinic", validity)
            .unwrap();
        let r = ca
            .issue_party(&recipient_uri, "Bench Hospital", validity)
            .unwrap();
        let sender = Identity::from_pem(
            s.identity.cert_pem.as_bytes(),
            s.identity.key_pem.as_bytes(),
        )
        .unwrap();
        let recipient = Identity::from_pem(
            r.identity.cert_pem.as_bytes(),
            r.identity.key_pem.as_bytes(),
        )
        .unwrap();
        let key = DecryptionKey::from_pem(
            r.encryption.cert_pem.as_bytes(),
            r.encryption.key_pem.as_bytes(),
        )
        .unwrap();
        let trust = TrustStore::builder()
            .anchors_pem(ca.certificate_pem().as_bytes())
            .unwrap()
            .build()
            .unwrap();
        let recipient_key = trust.verify_encryption(key.certificate(), now()).unwrap();
        let recipient_fp = *key.certificate().fingerprint().as_bytes();

        let signing_key = SigningKey::from_pkcs8_pem(s.identity.key_pem.as_str()).unwrap();
        let enc_sk = p256::SecretKey::from_pkcs8_pem(r.encryption.key_pem.as_str()).unwrap();
        let hpke_sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(&enc_sk.to_bytes()).unwrap();
        let hpke_pk =
            <Kem as hpke::Kem>::PublicKey::from_bytes(&enc_sk.public_key().to_sec1_bytes())
                .unwrap();

        // The signature webpki checks when it validates the sender chain: the CA's
        // ECDSA P-256/SHA-256 signature over the leaf's TBSCertificate.
        let ca_cert = Certificate::from_pem(ca.certificate_pem().as_bytes())
            .unwrap()
            .remove(0);
        let ca_spki_point = ca_cert.public_key().unwrap().to_sec1_bytes().to_vec();
        let (leaf_tbs, leaf_sig_der) = tbs_and_signature(sender.certificate().der());

        Self {
            sender_chain: sender.chain().to_vec(),
            sender,
            recipient,
            recipient_key,
            keys: vec![key],
            trust,
            signing_key,
            hpke_pk,
            hpke_sk,
            recipient_fp,
            ca_spki_point,
            leaf_tbs,
            leaf_sig_der,
            pems: Pems {
                ca: ca.certificate_pem().to_owned(),
                sender_cert: s.identity.cert_pem.clone(),
                sender_key: s.identity.key_pem.to_string(),
                recipient_cert: r.encryption.cert_pem.clone(),
                recipient_key: r.encryption.key_pem.to_string(),
            },
        }
    }

    fn builder(&self) -> SealerBuilder<'_> {
        SealerBuilder::new(&self.sender, "application/fhir+json")
            .recipient(self.recipient_key.clone(), HopRole::ThirdParty)
            .purpose("treatment")
    }

    /// Seals `plain` into `out` (file form), reusing its allocation.
    fn seal_into(&self, plain: &[u8], rng: &mut ChaCha20Rng, out: &mut Vec<u8>) {
        out.clear();
        let mut sealer = self.builder().start(now(), rng).unwrap();
        sealer.update(plain, out);
        let head = sealer.finish(out);
        black_box(head.file_prefix());
    }

    /// Seals `plain` into a complete file-form envelope.
    fn seal(&self, plain: &[u8], seed: u64) -> Vec<u8> {
        self.builder()
            .start(now(), &mut ChaCha20Rng::seed_from_u64(seed))
            .unwrap()
            .seal_to_vec(plain)
    }

    /// Opens a file-form envelope into `out`, reusing its allocation.
    fn open_into(&self, envelope: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let mut r = envelope;
        let head = EnvelopeHead::read_from(&mut r)
            .unwrap()
            .verify(&self.trust, now())
            .unwrap();
        let mut opener = head.open(&self.keys).unwrap();
        opener.update(r, out).unwrap();
        black_box(opener.finish().unwrap());
    }

    fn hpke_info(&self, message_id: &[u8; 16]) -> Vec<u8> {
        [HPKE_INFO, &[0], message_id, &self.recipient_fp].concat()
    }
}

/// Splits a DER certificate into its TBSCertificate bytes and its signature value.
fn tbs_and_signature(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    (
        cert.tbs_certificate.as_ref().to_vec(),
        cert.signature_value.data.to_vec(),
    )
}

/// AES-256-GCM over `buf` in place, one tag per 64 KiB chunk, as the envelope's chunk cipher.
fn aes_gcm_chunks(cipher: &Aes256Gcm, buf: &mut [u8], tags: &mut Vec<[u8; 16]>) {
    tags.clear();
    let n = buf.len().div_ceil(CHUNK).max(1);
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        let mut nonce = [0u8; 12];
        nonce[3..11].copy_from_slice(&(i as u64).to_be_bytes());
        nonce[11] = u8::from(i + 1 == n);
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), &[], chunk.into())
            .unwrap();
        tags.push(tag.into());
    }
}

fn payload(len: usize) -> Vec<u8> {
    // Synthetic bytes; content does not affect the cost.
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn size_label(len: usize) -> &'static str {
    if len == SMALL { "4KiB" } else { "64MiB" }
}

/// Criterion settings for the 64 MiB cases: few samples, flat sampling.
fn large(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
}

fn small(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
}

fn bench_envelope(c: &mut Criterion, f: &Fixture) {
    for len in [SMALL, LARGE] {
        let plain = payload(len);
        let sealed = f.seal(&plain, 1);
        let mut group = c.benchmark_group("envelope");
        if len == LARGE {
            large(&mut group);
        } else {
            small(&mut group);
        }
        group.throughput(Throughput::Bytes(len as u64));
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut out = Vec::with_capacity(sealed.len());
        group.bench_function(format!("seal/{}", size_label(len)), |b| {
            b.iter(|| f.seal_into(black_box(&plain), &mut rng, &mut out));
        });
        if len == SMALL {
            group.bench_function("open_slice/4KiB", |b| {
                b.iter(|| open_slice(black_box(&sealed), &f.trust, &f.keys, now()).unwrap());
            });
        }
        group.bench_function(format!("open/{}", size_label(len)), |b| {
            b.iter(|| f.open_into(black_box(&sealed), &mut out));
        });
        group.finish();
    }
}

fn receipt_content(f: &Fixture, sealed: &[u8]) -> ReceiptContent {
    let head = EnvelopeHead::read_from(&mut &sealed[..])
        .unwrap()
        .verify(&f.trust, now())
        .unwrap();
    ReceiptContent::for_head(
        &head,
        HopRole::ThirdParty,
        Disposition::Delivered,
        now() + Duration::from_secs(60),
    )
}

fn bench_receipt(c: &mut Criterion, f: &Fixture) {
    let content = receipt_content(f, &f.seal(&payload(SMALL), 3));
    let signed = SignedReceipt::issue(&f.recipient, &content);
    let mut group = c.benchmark_group("receipt");
    small(&mut group);
    group.bench_function("issue", |b| {
        b.iter(|| SignedReceipt::issue(&f.recipient, black_box(&content)));
    });
    group.bench_function("verify", |b| {
        b.iter(|| black_box(&signed).verify(&f.trust).unwrap());
    });
    group.finish();
}

/// The signed input of a real 4 KiB envelope header.
fn header_input(f: &Fixture) -> Vec<u8> {
    let sealed = f.seal(&payload(SMALL), 4);
    let head = EnvelopeHead::read_from(&mut &sealed[..]).unwrap();
    [HEADER_CONTEXT, &[0], head.header_bytes()].concat()
}

fn bench_primitives(c: &mut Criterion, f: &Fixture) {
    let input = header_input(f);
    let sig: Signature = f.signing_key.sign(&input);
    let vk = VerifyingKey::from(&f.signing_key);
    let ecdsa_aws = webpki::aws_lc_rs::ECDSA_P256_SHA256;
    let info = f.hpke_info(&[7; 16]);
    let cek = [9u8; 32];
    let (enc, wrapped) = hpke::single_shot_seal_with_rng::<HpkeAead, Kdf, Kem>(
        &hpke::OpModeS::Base,
        &f.hpke_pk,
        &info,
        &cek,
        &[],
        &mut ChaCha20Rng::seed_from_u64(5),
    )
    .unwrap();
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc.to_bytes()).unwrap();

    let mut group = c.benchmark_group("primitives");
    small(&mut group);
    group.bench_function("ecdsa_p256_sign/header", |b| {
        b.iter(|| -> Signature { f.signing_key.sign(black_box(&input)) });
    });
    group.bench_function("ecdsa_p256_verify/header", |b| {
        b.iter(|| vk.verify(black_box(&input), &sig).unwrap());
    });
    group.bench_function("ecdsa_p256_verify_aws_lc/leaf_cert", |b| {
        b.iter(|| {
            ecdsa_aws
                .verify_signature(&f.ca_spki_point, black_box(&f.leaf_tbs), &f.leaf_sig_der)
                .unwrap();
        });
    });
    group.bench_function("chain_validation/sender", |b| {
        b.iter(|| {
            f.trust
                .verify_identity(black_box(&f.sender_chain), now())
                .unwrap()
        });
    });
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    group.bench_function("hpke_seal/32B", |b| {
        b.iter(|| {
            hpke::single_shot_seal_with_rng::<HpkeAead, Kdf, Kem>(
                &hpke::OpModeS::Base,
                &f.hpke_pk,
                &info,
                black_box(&cek),
                &[],
                &mut rng,
            )
            .unwrap()
        });
    });
    group.bench_function("hpke_open/32B", |b| {
        b.iter(|| {
            hpke::single_shot_open::<HpkeAead, Kdf, Kem>(
                &hpke::OpModeR::Base,
                &f.hpke_sk,
                &enc,
                &info,
                black_box(&wrapped),
                &[],
            )
            .unwrap()
        });
    });
    group.finish();

    let cipher = Aes256Gcm::new(&[3u8; 32].into());
    for len in [SMALL, LARGE] {
        let mut group = c.benchmark_group("primitives");
        if len == LARGE {
            large(&mut group);
        } else {
            small(&mut group);
        }
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = payload(len);
        let mut tags = Vec::with_capacity(len / CHUNK + 1);
        group.bench_function(format!("aes256gcm_64KiB_chunks/{}", size_label(len)), |b| {
            b.iter(|| aes_gcm_chunks(&cipher, black_box(&mut buf), &mut tags));
        });
        // The envelope hashes the ciphertext: payload plus one tag per chunk.
        let ct = payload(len + 16 * len.div_ceil(CHUNK));
        group.bench_function(format!("sha256/{}", size_label(len)), |b| {
            b.iter(|| Sha256::digest(black_box(&ct)));
        });
        group.finish();
    }
}

// ---------------------------------------------------------------- summary

/// Median wall time of `runs` calls of `f`, after one warm-up call.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort_unstable();
    t[runs / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn summary(f: &Fixture) {
    const N: usize = 201;
    const N_LARGE: usize = 7;
    println!();
    println!("== summary: median of {N} runs (4 KiB) / {N_LARGE} runs (64 MiB), one thread ==");

    // Primitives, on the bytes the envelope uses.
    let input = header_input(f);
    let sig: Signature = f.signing_key.sign(&input);
    let vk = VerifyingKey::from(&f.signing_key);
    let info = f.hpke_info(&[7; 16]);
    let cek = [9u8; 32];
    let mut rng = ChaCha20Rng::seed_from_u64(10);
    let t_sign = median(N, || {
        let s: Signature = f.signing_key.sign(black_box(&input));
        black_box(s);
    });
    let t_verify = median(N, || vk.verify(black_box(&input), &sig).unwrap());
    let t_aws_verify = median(N, || {
        webpki::aws_lc_rs::ECDSA_P256_SHA256
            .verify_signature(&f.ca_spki_point, black_box(&f.leaf_tbs), &f.leaf_sig_der)
            .unwrap();
    });
    let t_chain = median(N, || {
        black_box(f.trust.verify_identity(&f.sender_chain, now()).unwrap());
    });
    let mut last = None;
    let t_hpke_seal = median(N, || {
        last = Some(
            hpke::single_shot_seal_with_rng::<HpkeAead, Kdf, Kem>(
                &hpke::OpModeS::Base,
                &f.hpke_pk,
                &info,
                black_box(&cek),
                &[],
                &mut rng,
            )
            .unwrap(),
        );
    });
    let (enc, wrapped) = last.unwrap();
    let t_hpke_open = median(N, || {
        black_box(
            hpke::single_shot_open::<HpkeAead, Kdf, Kem>(
                &hpke::OpModeR::Base,
                &f.hpke_sk,
                &enc,
                &info,
                &wrapped,
                &[],
            )
            .unwrap(),
        );
    });
    let cipher = Aes256Gcm::new(&[3u8; 32].into());
    let mut tags = Vec::new();
    let aes = |len: usize, runs: usize, tags: &mut Vec<[u8; 16]>| {
        let mut buf = payload(len);
        median(runs, || aes_gcm_chunks(&cipher, black_box(&mut buf), tags))
    };
    let sha = |len: usize, runs: usize| {
        let ct = payload(len + 16 * len.div_ceil(CHUNK));
        median(runs, || {
            black_box(Sha256::digest(black_box(&ct)));
        })
    };
    let t_aes_s = aes(SMALL, N, &mut tags);
    let t_sha_s = sha(SMALL, N);
    let t_aes_l = aes(LARGE, N_LARGE, &mut tags);
    let t_sha_l = sha(LARGE, N_LARGE);

    // Envelope operations.
    let mut seal_rng = ChaCha20Rng::seed_from_u64(11);
    let plain_s = payload(SMALL);
    let sealed_s = f.seal(&plain_s, 12);
    let mut out = Vec::with_capacity(LARGE + LARGE / 1024 + 4096);
    let t_seal_s = median(N, || f.seal_into(&plain_s, &mut seal_rng, &mut out));
    let t_open_s = median(N, || f.open_into(&sealed_s, &mut out));
    let content = receipt_content(f, &sealed_s);
    let signed = SignedReceipt::issue(&f.recipient, &content);
    let t_issue = median(N, || {
        black_box(SignedReceipt::issue(&f.recipient, &content));
    });
    let t_rverify = median(N, || {
        black_box(signed.verify(&f.trust).unwrap());
    });
    let plain_l = payload(LARGE);
    let sealed_l = f.seal(&plain_l, 13);
    drop(plain_s);
    let t_seal_l = median(N_LARGE, || f.seal_into(&plain_l, &mut seal_rng, &mut out));
    let t_open_l = median(N_LARGE, || f.open_into(&sealed_l, &mut out));

    println!(
        "primitives: ECDSA P-256 sign {:.1} µs, verify {:.1} µs (RustCrypto p256); \
         verify {:.1} µs (aws-lc-rs, inside webpki); sender chain validation {:.1} µs; \
         HPKE seal {:.1} µs, open {:.1} µs",
        us(t_sign),
        us(t_verify),
        us(t_aws_verify),
        us(t_chain),
        us(t_hpke_seal),
        us(t_hpke_open)
    );
    println!(
        "primitives: AES-256-GCM 4 KiB {:.1} µs, 64 MiB {:.0} MB/s; SHA-256 4 KiB {:.1} µs, \
         64 MiB {:.0} MB/s (MB = 10^6 bytes)",
        us(t_aes_s),
        mbps(LARGE, t_aes_l),
        us(t_sha_s),
        mbps(LARGE, t_sha_l)
    );
    let seal_bound = t_sign + t_hpke_seal + t_aes_s + t_sha_s;
    println!(
        "seal 4 KiB: {:.1} µs = {:.2} x (ECDSA sign + HPKE seal + AES-GCM 4 KiB + SHA-256 4 KiB \
         = {:.1} µs)",
        us(t_seal_s),
        t_seal_s.as_secs_f64() / seal_bound.as_secs_f64(),
        us(seal_bound)
    );
    let open_bound = t_verify + t_aws_verify + t_hpke_open + t_aes_s + t_sha_s;
    println!(
        "open 4 KiB: {:.1} µs = {:.2} x (ECDSA verify header + ECDSA verify leaf by CA (aws-lc-rs) \
         + HPKE open + AES-GCM 4 KiB + SHA-256 4 KiB = {:.1} µs)",
        us(t_open_s),
        t_open_s.as_secs_f64() / open_bound.as_secs_f64(),
        us(open_bound)
    );
    println!(
        "receipt issue: {:.1} µs = {:.2} x (ECDSA sign {:.1} µs)",
        us(t_issue),
        t_issue.as_secs_f64() / t_sign.as_secs_f64(),
        us(t_sign)
    );
    let rverify_bound = t_verify + t_aws_verify;
    println!(
        "receipt verify: {:.1} µs = {:.2} x (ECDSA verify + ECDSA verify leaf by CA = {:.1} µs)",
        us(t_rverify),
        t_rverify.as_secs_f64() / rverify_bound.as_secs_f64(),
        us(rverify_bound)
    );
    let round = t_seal_s + t_open_s + t_issue + t_rverify;
    println!(
        "round trip 4 KiB (seal + open + receipt issue + receipt verify): {:.1} µs = {:.0} per \
         second per core",
        us(round),
        1.0 / round.as_secs_f64()
    );
    let bound_l = t_aes_l + t_sha_l;
    let bound_mbps = mbps(LARGE, bound_l);
    for (op, t) in [("seal", t_seal_l), ("open", t_open_l)] {
        println!(
            "{op} 64 MiB: {:.0} MB/s = {:.2} x (AES-GCM + SHA-256 bound {:.0} MB/s)",
            mbps(LARGE, t),
            mbps(LARGE, t) / bound_mbps,
            bound_mbps
        );
    }
    drop(out);
    drop(sealed_l);
    drop(plain_l);
    openssl_cms(f, [t_seal_s, t_open_s], [t_seal_l, t_open_l]);
}

/// `openssl cms` doing the same job on the same credentials (DESIGN.md §8): seal =
/// `cms -sign` then `cms -encrypt -aes-256-gcm` (ECDH to the encryption certificate),
/// open = `cms -decrypt` then `cms -verify` (signature and chain). Two processes
/// per operation, through files in a temporary directory, as a script would do it.
fn openssl_cms(f: &Fixture, ours_small: [Duration; 2], ours_large: [Duration; 2]) {
    use std::process::Command;
    let available = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        println!("openssl cms: skipped (no openssl binary on PATH)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    for (name, pem) in [
        ("ca.pem", &f.pems.ca),
        ("id.pem", &f.pems.sender_cert),
        ("id.key", &f.pems.sender_key),
        ("enc.pem", &f.pems.recipient_cert),
        ("enc.key", &f.pems.recipient_key),
    ] {
        std::fs::write(path(name), pem).unwrap();
    }
    // Relative names in the temporary directory: no path needs quoting.
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .arg("cms")
            .args(args.split_whitespace())
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl cms {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let seal = || {
        openssl(
            "-sign -binary -nodetach -in plain -signer id.pem -inkey id.key -outform DER -out signed.der",
        );
        openssl("-encrypt -binary -aes-256-gcm -in signed.der -outform DER -out env.der enc.pem");
    };
    let verify = format!(
        "-verify -binary -inform DER -in signed2.der -CAfile ca.pem -purpose any -attime {} -out plain.out",
        T0 + 60
    );
    let open = || {
        openssl(
            "-decrypt -binary -inform DER -in env.der -recip enc.pem -inkey enc.key -out signed2.der",
        );
        openssl(&verify);
    };
    for (len, runs, ours, label) in [
        (SMALL, 21, ours_small, "4 KiB"),
        (LARGE, 3, ours_large, "64 MiB"),
    ] {
        let data = payload(len);
        std::fs::write(path("plain"), &data).unwrap();
        let t_seal = median(runs, seal);
        let t_open = median(runs, open);
        assert_eq!(
            std::fs::read(path("plain.out")).unwrap(),
            data,
            "openssl round trip"
        );
        println!(
            "openssl cms {label} (2 processes per operation, files): seal {:.1} ms, open {:.1} ms; \
             this crate is {:.1} x (seal) and {:.1} x (open) faster",
            t_seal.as_secs_f64() * 1e3,
            t_open.as_secs_f64() * 1e3,
            t_seal.as_secs_f64() / ours[0].as_secs_f64(),
            t_open.as_secs_f64() / ours[1].as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    // Criterion's rule: `--bench` without `--test` benchmarks; anything else is test mode.
    let benchmarking = flag("--bench") && !flag("--test") && !flag("--list");
    let f = Fixture::new();
    let mut c = Criterion::default().configure_from_args();
    bench_envelope(&mut c, &f);
    bench_receipt(&mut c, &f);
    bench_primitives(&mut c, &f);
    c.final_summary();
    if benchmarking {
        summary(&f);
    }
}
