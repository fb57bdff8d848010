//! The audit log: RFC 9162 Merkle tree (known answers, every proof of small
//! trees, tampering), entries, pseudonyms, signed checkpoints, and the export
//! file with its offline verifier against each kind of tampering.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::*;
use exchange_core::audit::{
    AuditAction, AuditEntry, AuditOutcome, Checkpoint, ExportRange, ExportReport, ExportWriter,
    Frontier, Hash, MerkleTree, Problem, Pseudonym, SignedCheckpoint, SubjectKey,
    verify_consistency, verify_export, verify_inclusion,
};
use exchange_core::identity::{Certificate, KeyRole};
use exchange_core::suite::{merkle_empty_root, merkle_leaf_hash, merkle_node_hash, sha256};
use exchange_core::{AuditError, Error, FormatError, TrustError};
use proptest::prelude::*;

fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

// ---------------------------------------------------------------------------
// Merkle tree: known answers.
//
// The classic Certificate Transparency test vectors (8 leaves, their roots for
// sizes 1..8, and some proofs), as published in transparency-dev/merkle,
// proof/verify_test.go (`leaves`, `roots`, `inclusionProofs`,
// `consistencyProofs`; originally from google/certificate-transparency).
// Their inclusion vectors number leaves from 1; ours from 0.

const CT_LEAVES: [&str; 8] = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
];

const CT_ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn ct_tree() -> MerkleTree {
    MerkleTree::from_leaf_hashes(
        CT_LEAVES
            .iter()
            .map(|l| merkle_leaf_hash(&hex::decode(l).unwrap()))
            .collect(),
    )
}

#[test]
fn hashing_is_rfc9162() {
    assert_eq!(merkle_empty_root(), sha256(b""));
    assert_eq!(
        merkle_empty_root(),
        h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    // Leaf of empty data = SHA-256(0x00) = the CT size-1 root.
    assert_eq!(merkle_leaf_hash(b""), h(CT_ROOTS[0]));
    assert_eq!(merkle_leaf_hash(b""), sha256(&[0]));
    let (a, b) = ([1u8; 32], [2u8; 32]);
    let mut input = vec![1u8];
    input.extend_from_slice(&a);
    input.extend_from_slice(&b);
    assert_eq!(merkle_node_hash(&a, &b), sha256(&input));
    assert_ne!(merkle_node_hash(&a, &b), merkle_node_hash(&b, &a));
}

#[test]
fn ct_roots_for_every_size() {
    let tree = ct_tree();
    assert_eq!(MerkleTree::new().root(), merkle_empty_root());
    assert_eq!(tree.root_at(0).unwrap(), merkle_empty_root());
    let mut incremental = MerkleTree::new();
    let mut frontier = Frontier::new();
    for (i, root) in CT_ROOTS.iter().enumerate() {
        let size = i as u64 + 1;
        assert_eq!(tree.root_at(size).unwrap(), h(root), "size {size}");
        incremental.push(tree.leaf(i as u64).unwrap());
        frontier.push(tree.leaf(i as u64).unwrap());
        assert_eq!(incremental.root(), h(root), "incremental size {size}");
        assert_eq!(frontier.root(), h(root), "frontier size {size}");
        assert_eq!(tree.frontier_at(size).unwrap(), frontier);
    }
    assert_eq!(incremental, tree);
    assert_eq!(tree.root(), h(CT_ROOTS[7]));
}

#[test]
fn ct_inclusion_proofs() {
    let tree = ct_tree();
    // (0-based index, size, proof)
    let vectors: [(u64, u64, Vec<&str>); 5] = [
        (0, 1, vec![]),
        (
            0,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            vec![
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            vec!["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            vec![
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    for (index, size, proof) in vectors {
        let want: Vec<Hash> = proof.iter().map(|p| h(p)).collect();
        assert_eq!(
            tree.inclusion_proof(index, size).unwrap(),
            want,
            "{index}/{size}"
        );
        verify_inclusion(
            &tree.leaf(index).unwrap(),
            index,
            size,
            &want,
            &h(CT_ROOTS[size as usize - 1]),
        )
        .unwrap();
    }
}

#[test]
fn ct_consistency_proofs() {
    let tree = ct_tree();
    let vectors: [(u64, u64, Vec<&str>); 5] = [
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            vec![
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            vec![
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    for (old, new, proof) in vectors {
        let want: Vec<Hash> = proof.iter().map(|p| h(p)).collect();
        assert_eq!(
            tree.consistency_proof(old, new).unwrap(),
            want,
            "{old}->{new}"
        );
        verify_consistency(
            old,
            new,
            &h(CT_ROOTS[old as usize - 1]),
            &h(CT_ROOTS[new as usize - 1]),
            &want,
        )
        .unwrap();
    }
}

// ---------------------------------------------------------------------------
// Merkle tree: every proof of small trees, and every way to alter it.

fn tree_of(n: u64) -> MerkleTree {
    MerkleTree::from_leaf_hashes(
        (0..n)
            .map(|i| merkle_leaf_hash(format!("leaf {i}").as_bytes()))
            .collect(),
    )
}

fn flip(hash: &Hash, bit: usize) -> Hash {
    let mut x = *hash;
    x[bit / 8 % 32] ^= 1 << (bit % 8);
    x
}

/// Every alteration of a valid inclusion proof that must fail.
fn inclusion_must_fail(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) {
    let fails = |leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash, what: &str| {
        assert!(
            verify_inclusion(leaf, index, size, proof, root).is_err(),
            "{what} verified: index {index} size {size}"
        );
    };
    for i in 0..proof.len() {
        for bit in [0, 77, 255] {
            let mut p = proof.to_vec();
            p[i] = flip(&p[i], bit);
            fails(leaf, index, size, &p, root, "altered proof hash");
        }
    }
    if index > 0 {
        fails(leaf, index - 1, size, proof, root, "index - 1");
    }
    fails(leaf, index + 1, size, proof, root, "index + 1");
    fails(leaf, index ^ 2, size, proof, root, "index ^ 2");
    // A wrong size: size * 2 or size / 2 changes the path's shape. (Size
    // +-1 may not: leaf 0 of 3 and of 4 have the same audit path and lead to
    // the same value, which is why the size is signed with the root.)
    fails(leaf, index, size * 2, proof, root, "size * 2");
    if index < size / 2 {
        fails(leaf, index, size / 2, proof, root, "size / 2");
    }
    fails(&flip(leaf, 3), index, size, proof, root, "altered leaf");
    fails(leaf, index, size, proof, &flip(root, 200), "altered root");
    fails(leaf, index, size, proof, &merkle_empty_root(), "empty root");
    let mut extra = proof.to_vec();
    extra.push(*root);
    fails(leaf, index, size, &extra, root, "trailing hash");
    let mut front = vec![*leaf];
    front.extend_from_slice(proof);
    fails(leaf, index, size, &front, root, "preceding hash");
    if !proof.is_empty() {
        fails(
            leaf,
            index,
            size,
            &proof[..proof.len() - 1],
            root,
            "missing hash",
        );
        fails(leaf, index, size, &proof[1..], root, "missing first hash");
    }
}

#[test]
fn every_inclusion_proof_up_to_70_verifies_and_every_alteration_fails() {
    let tree = tree_of(70);
    for size in 1..=70u64 {
        let root = tree.root_at(size).unwrap();
        for index in 0..size {
            let leaf = tree.leaf(index).unwrap();
            let proof = tree.inclusion_proof(index, size).unwrap();
            verify_inclusion(&leaf, index, size, &proof, &root).unwrap();
            inclusion_must_fail(&leaf, index, size, &proof, &root);
        }
    }
}

fn consistency_must_fail(old: u64, new: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) {
    let fails = |old: u64, new: u64, r1: &Hash, r2: &Hash, p: &[Hash], what: &str| {
        assert!(
            verify_consistency(old, new, r1, r2, p).is_err(),
            "{what} verified: {old} -> {new}"
        );
    };
    if old == 0 {
        // The empty tree is consistent with every tree: only its own root
        // and an empty proof are accepted.
        fails(
            old,
            new,
            &flip(old_root, 1),
            new_root,
            proof,
            "altered old root",
        );
        fails(
            old,
            new,
            old_root,
            new_root,
            &[*new_root],
            "non-empty proof",
        );
        return;
    }
    for i in 0..proof.len() {
        let mut p = proof.to_vec();
        p[i] = flip(&p[i], 100);
        fails(old, new, old_root, new_root, &p, "altered proof hash");
    }
    fails(
        old,
        new,
        &flip(old_root, 1),
        new_root,
        proof,
        "altered old root",
    );
    fails(
        old,
        new,
        old_root,
        &flip(new_root, 1),
        proof,
        "altered new root",
    );
    if old != new {
        fails(old, new, new_root, old_root, proof, "swapped roots");
    }
    let mut extra = proof.to_vec();
    extra.push(*new_root);
    fails(old, new, old_root, new_root, &extra, "trailing hash");
    let mut front = vec![*old_root];
    front.extend_from_slice(proof);
    fails(old, new, old_root, new_root, &front, "preceding hash");
    if !proof.is_empty() {
        fails(
            old,
            new,
            old_root,
            new_root,
            &proof[..proof.len() - 1],
            "missing hash",
        );
        fails(old, new, old_root, new_root, &[], "empty proof");
    }
    // Wrong sizes with the same proof (as in transparency-dev/merkle's
    // corruptConsistencyProof; new +- 1 may keep the path's shape).
    if old > 1 {
        fails(old - 1, new, old_root, new_root, proof, "old - 1");
    }
    if old < new {
        fails(old + 1, new, old_root, new_root, proof, "old + 1");
    }
    if old ^ 2 <= new && old ^ 2 != old {
        fails(old ^ 2, new, old_root, new_root, proof, "old ^ 2");
    }
    fails(old, new * 2, old_root, new_root, proof, "new * 2");
    if new / 2 >= old && new / 2 != new {
        fails(old, new / 2, old_root, new_root, proof, "new / 2");
    }
}

#[test]
fn every_consistency_proof_up_to_40_verifies_and_every_alteration_fails() {
    let tree = tree_of(40);
    for new in 0..=40u64 {
        let new_root = tree.root_at(new).unwrap();
        for old in 0..=new {
            let old_root = tree.root_at(old).unwrap();
            let proof = tree.consistency_proof(old, new).unwrap();
            verify_consistency(old, new, &old_root, &new_root, &proof)
                .unwrap_or_else(|e| panic!("{old} -> {new}: {e}"));
            consistency_must_fail(old, new, &old_root, &new_root, &proof);
        }
    }
}

#[test]
fn out_of_range_is_refused() {
    let tree = tree_of(10);
    let root = tree.root();
    let leaf = tree.leaf(9).unwrap();
    for (index, size) in [(10, 10), (11, 10), (0, 0), (u64::MAX, 10)] {
        assert!(matches!(
            verify_inclusion(&leaf, index, size, &[], &root),
            Err(Error::Audit(AuditError::OutOfRange { .. }))
        ));
    }
    assert!(matches!(
        tree.inclusion_proof(10, 10),
        Err(Error::Audit(AuditError::OutOfRange { .. }))
    ));
    assert!(tree.inclusion_proof(0, 11).is_err());
    assert!(tree.root_at(11).is_err());
    assert!(tree.consistency_proof(5, 11).is_err());
    assert!(matches!(
        tree.consistency_proof(6, 5),
        Err(Error::Audit(AuditError::OutOfRange { .. }))
    ));
    assert!(matches!(
        verify_consistency(6, 5, &root, &root, &[]),
        Err(Error::Audit(AuditError::OutOfRange { .. }))
    ));
    // Size 0: only the empty root, only an empty proof.
    verify_consistency(0, 10, &merkle_empty_root(), &root, &[]).unwrap();
    assert!(verify_consistency(0, 10, &root, &root, &[]).is_err());
    assert!(verify_consistency(0, 10, &merkle_empty_root(), &root, &[root]).is_err());
    // Equal sizes: equal roots and no proof.
    verify_consistency(10, 10, &root, &root, &[]).unwrap();
    assert!(verify_consistency(10, 10, &root, &leaf, &[]).is_err());
    assert!(verify_consistency(10, 10, &root, &root, &[leaf]).is_err());
}

#[test]
fn frontier_matches_tree_at_every_size_and_round_trips() {
    let tree = tree_of(600);
    let mut f = Frontier::new();
    assert_eq!(f.root(), merkle_empty_root());
    assert_eq!(Frontier::from_bytes(&f.to_bytes()).unwrap(), f);
    for i in 0..600u64 {
        f.push(tree.leaf(i).unwrap());
        assert_eq!(f.size(), i + 1);
        assert_eq!(f.peaks().len() as u32, (i + 1).count_ones());
        assert_eq!(f.root(), tree.root_at(i + 1).unwrap(), "size {}", i + 1);
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 8 + 32 * f.peaks().len());
        assert_eq!(Frontier::from_bytes(&bytes).unwrap(), f);
    }
    // The number of peaks must equal popcount(size).
    let bytes = f.to_bytes(); // size 600: 4 peaks
    assert!(Frontier::from_bytes(&bytes[..bytes.len() - 32]).is_err());
    let mut more = bytes.clone();
    more.extend_from_slice(&[0; 32]);
    assert!(Frontier::from_bytes(&more).is_err());
    assert!(Frontier::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut other_size = bytes.clone();
    other_size[7] ^= 1; // 601: 5 peaks
    assert!(Frontier::from_bytes(&other_size).is_err());
    assert!(Frontier::from_bytes(&[0; 7]).is_err());
    // A restored frontier keeps appending correctly.
    let big = tree_of(1000);
    let mut restored = Frontier::from_bytes(&big.frontier_at(600).unwrap().to_bytes()).unwrap();
    for i in 600..1000 {
        restored.push(big.leaf(i).unwrap());
    }
    assert_eq!(restored.root(), big.root());
}

#[test]
fn proofs_for_every_leaf_of_a_100k_tree() {
    // Not a timed assertion (DESIGN.md §8): this must simply finish quickly;
    // `cargo test --release -- --nocapture` prints the time.
    let n = 100_000u64;
    let tree = tree_of(n);
    let start = std::time::Instant::now();
    let mut total = 0usize;
    let mut sample = Vec::new();
    for i in 0..n {
        let p = tree.inclusion_proof(i, n).unwrap();
        total += p.len();
        if i % 997 == 0 || i == n - 1 {
            sample.push((i, p));
        }
    }
    eprintln!(
        "100k inclusion proofs: {:?} ({total} hashes)",
        start.elapsed()
    );
    let root = tree.root();
    for (i, p) in sample {
        verify_inclusion(&tree.leaf(i).unwrap(), i, n, &p, &root).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_trees_prove_inclusion_and_consistency(
        n in 1u64..3000,
        picks in proptest::collection::vec((any::<u64>(), any::<u64>()), 8),
    ) {
        let tree = tree_of(n);
        let mut f = Frontier::new();
        for i in 0..n {
            f.push(tree.leaf(i).unwrap());
        }
        prop_assert_eq!(f.root(), tree.root());
        for (a, b) in picks {
            let size = a % n + 1;
            let index = b % size;
            let root = tree.root_at(size).unwrap();
            let leaf = tree.leaf(index).unwrap();
            let proof = tree.inclusion_proof(index, size).unwrap();
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());
            prop_assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, 9)).is_err());
            if size > 1 {
                prop_assert!(verify_inclusion(&leaf, (index + 1) % size, size, &proof, &root).is_err());
            }
            let old = b % (size + 1);
            let old_root = tree.root_at(old).unwrap();
            let cproof = tree.consistency_proof(old, size).unwrap();
            prop_assert!(verify_consistency(old, size, &old_root, &root, &cproof).is_ok());
            if old > 0 && old < size {
                prop_assert!(verify_consistency(old, size, &flip(&old_root, 5), &root, &cproof).is_err());
                let mut bad = cproof.clone();
                let last = bad.len() - 1;
                bad[last] = flip(&bad[last], 7);
                prop_assert!(verify_consistency(old, size, &old_root, &root, &bad).is_err());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Entries.

const CLINIC: &str = "urn:jp:mhlw:facility:1310000013";
const HOSPITAL: &str = "urn:jp:mhlw:facility:1310000021";

fn ms(seq: u64) -> u64 {
    T0 * 1000 + seq * 1000
}

fn entry(seq: u64) -> AuditEntry {
    let key = SubjectKey::from_bytes([9; 32]);
    AuditEntry {
        seq,
        time_ms: ms(seq),
        party: CLINIC.into(),
        actor: format!("client:urn:example:app:{}", seq % 3),
        action: if seq.is_multiple_of(2) {
            AuditAction::Send
        } else {
            AuditAction::Fetch
        },
        message_id: Some(format!("00000000-0000-4000-8000-{:012x}", 0xabc0 + seq)),
        subjects: vec![key.pseudonym(&format!("P-{seq:06}")).to_hex()],
        outcome: if seq % 5 == 4 {
            AuditOutcome::Rejected
        } else {
            AuditOutcome::Ok
        },
        reason: (seq % 5 == 4).then(|| "not-a-recipient".to_owned()),
        detail: seq
            .is_multiple_of(7)
            .then(|| format!("note \"{seq}\" — 詳細")),
        subject_set: None,
    }
}

#[test]
fn canonical_json_is_exact() {
    let e = AuditEntry {
        seq: 0,
        time_ms: 1_780_272_000_000,
        party: CLINIC.into(),
        actor: "daemon".into(),
        action: AuditAction::Start,
        message_id: None,
        subjects: vec![],
        outcome: AuditOutcome::Ok,
        reason: None,
        detail: None,
        subject_set: None,
    };
    let want = r#"{"seq":0,"time_ms":1780272000000,"party":"urn:jp:mhlw:facility:1310000013","actor":"daemon","action":"start","message_id":null,"subjects":[],"outcome":"ok","reason":null,"detail":null}"#;
    assert_eq!(String::from_utf8(e.to_canonical_json()).unwrap(), want);
    assert_eq!(e.leaf_hash(), merkle_leaf_hash(want.as_bytes()));
    assert_eq!(AuditEntry::from_json(want.as_bytes()).unwrap(), e);

    let e = AuditEntry {
        seq: 7,
        action: AuditAction::Receive,
        message_id: Some("01234567-89ab-cdef-0123-456789abcdef".into()),
        subjects: vec!["ab".repeat(32)],
        outcome: AuditOutcome::Rejected,
        reason: Some("bad-signature".into()),
        detail: Some("from \"peer\"\n".into()),
        actor: "peer:urn:jp:mhlw:facility:1310000021".into(),
        ..e
    };
    let want = format!(
        r#"{{"seq":7,"time_ms":1780272000000,"party":"urn:jp:mhlw:facility:1310000013","actor":"peer:urn:jp:mhlw:facility:1310000021","action":"receive","message_id":"01234567-89ab-cdef-0123-456789abcdef","subjects":["{}"],"outcome":"rejected","reason":"bad-signature","detail":"from \"peer\"\n"}}"#,
        "ab".repeat(32)
    );
    assert_eq!(String::from_utf8(e.to_canonical_json()).unwrap(), want);
    assert_eq!(AuditEntry::from_json(want.as_bytes()).unwrap(), e);
}

#[test]
fn action_and_outcome_names() {
    let all = [
        (AuditAction::Send, "send"),
        (AuditAction::Receive, "receive"),
        (AuditAction::Relay, "relay"),
        (AuditAction::Forward, "forward"),
        (AuditAction::Receipt, "receipt"),
        (AuditAction::Fetch, "fetch"),
        (AuditAction::Ack, "ack"),
        (AuditAction::List, "list"),
        (AuditAction::Status, "status"),
        (AuditAction::Provision, "provision"),
        (AuditAction::Purge, "purge"),
        (AuditAction::Admin, "admin"),
        (AuditAction::Start, "start"),
        (AuditAction::Stop, "stop"),
    ];
    for (a, name) in all {
        assert_eq!(a.as_str(), name);
        assert_eq!(serde_json::to_string(&a).unwrap(), format!("\"{name}\""));
    }
    for (o, name) in [
        (AuditOutcome::Ok, "ok"),
        (AuditOutcome::Rejected, "rejected"),
        (AuditOutcome::Failed, "failed"),
    ] {
        assert_eq!(o.as_str(), name);
        assert_eq!(serde_json::to_string(&o).unwrap(), format!("\"{name}\""));
    }
}

#[test]
fn invalid_entries_are_refused() {
    let good = String::from_utf8(entry(4).to_canonical_json()).unwrap();
    AuditEntry::from_json(good.as_bytes()).unwrap();
    let sub = entry(4).subjects[0].clone();
    let cases = [
        // unknown field
        good.replacen("\"seq\":4,", "\"seq\":4,\"extra\":1,", 1),
        // missing field
        good.replacen("\"detail\":null", "", 1)
            .replacen(",}", "}", 1),
        // message id: uppercase, short, not in UUID form
        good.replacen("00000000abc4\"", "00000000ABC4\"", 1),
        good.replacen("00000000-0000-4000-8000-00000000abc4", "abc4", 1),
        good.replacen(
            "00000000-0000-4000-8000-00000000abc4",
            "0000000000004000800000000000abc4",
            1,
        ),
        good.replacen(
            "00000000-0000-4000-8000-00000000abc4",
            "0000000-00000-4000-8000-00000000abc4",
            1,
        ),
        // subject: uppercase, short
        good.replacen(&sub, &sub.to_uppercase(), 1),
        good.replacen(&sub, &sub[..62], 1),
        // reason with a space, empty reason
        good.replacen("not-a-recipient", "not a recipient", 1),
        good.replacen("\"not-a-recipient\"", "\"\"", 1),
        // party not a URI
        good.replacen(CLINIC, "clinic", 1),
        // unknown action, outcome
        good.replacen("\"send\"", "\"Send\"", 1),
        good.replacen("\"rejected\"", "\"denied\"", 1),
        // empty actor
        good.replacen("client:urn:example:app:1", "", 1),
        // negative seq
        good.replacen("\"seq\":4", "\"seq\":-4", 1),
    ];
    for (i, bad) in cases.iter().enumerate() {
        assert_ne!(bad, &good, "case {i} did not change the input");
        assert!(
            AuditEntry::from_json(bad.as_bytes()).is_err(),
            "case {i} accepted: {bad}"
        );
    }
    let huge = good.replacen(
        "\"detail\":null",
        &format!("\"detail\":\"{}\"", "x".repeat(70_000)),
        1,
    );
    assert!(matches!(
        AuditEntry::from_json(huge.as_bytes()),
        Err(Error::Format(FormatError::TooLarge { .. }))
    ));
}

// ---------------------------------------------------------------------------
// Pseudonyms.

#[test]
fn pseudonym_known_answer() {
    // python3 -c "import hmac,hashlib; print(hmac.new(bytes(range(32)),
    //   b'exchange/v1 subject pseudonym\x00' + 'P-000123'.encode(), hashlib.sha256).hexdigest())"
    let key = SubjectKey::from_bytes(std::array::from_fn(|i| i as u8));
    assert_eq!(
        key.pseudonym("P-000123").to_hex(),
        "84a1a9d64f93dcc0292e624523bfa3ac1385bf756f6ffb985591af77aac9888f"
    );
    // Same, with subject id '患者-0001' (UTF-8 bytes).
    assert_eq!(
        key.pseudonym("患者-0001").to_string(),
        "bf8e1f91ec245829cd7f2abb112fdf5295a2159cb90792bae2f40a7a6a0cebd5"
    );
}

#[test]
fn pseudonyms_are_deterministic_and_keyed() {
    let a = SubjectKey::generate(&mut rng(1));
    let b = SubjectKey::generate(&mut rng(2));
    assert_ne!(a.expose_secret(), b.expose_secret());
    assert_eq!(a.pseudonym("P-1"), a.pseudonym("P-1"));
    assert_ne!(a.pseudonym("P-1"), a.pseudonym("P-2"));
    assert_ne!(a.pseudonym("P-1"), b.pseudonym("P-1"));
    let again = SubjectKey::from_bytes(*a.expose_secret());
    assert_eq!(again.pseudonym("P-1"), a.pseudonym("P-1"));

    let p = a.pseudonym("P-1");
    assert_eq!(Pseudonym::from_hex(&p.to_hex()).unwrap(), p);
    assert_eq!(p.to_hex().parse::<Pseudonym>().unwrap(), p);
    assert_eq!(Pseudonym::from_bytes(*p.as_bytes()), p);
    assert!(Pseudonym::from_hex(&p.to_hex().to_uppercase()).is_err());
    assert!(Pseudonym::from_hex(&p.to_hex()[..62]).is_err());
    assert!(Pseudonym::from_hex(&"g".repeat(64)).is_err());
}

#[test]
fn subject_key_debug_never_shows_the_key() {
    let key = SubjectKey::from_bytes([0xab; 32]);
    let shown = format!("{key:?} {key:#?}");
    assert!(shown.contains("SubjectKey([redacted])"));
    assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    assert!(!shown.contains("171"), "{shown}");
}

// ---------------------------------------------------------------------------
// Signed checkpoints.

struct Log {
    net: Net,
    clinic: Party,
    hospital: Party,
    entries: Vec<AuditEntry>,
    tree: MerkleTree,
}

impl Log {
    fn new(n: u64) -> Self {
        let net = Net::new("Audit Test CA");
        let clinic = net.party(CLINIC);
        let hospital = net.party(HOSPITAL);
        let entries: Vec<AuditEntry> = (0..n).map(entry).collect();
        let tree =
            MerkleTree::from_leaf_hashes(entries.iter().map(AuditEntry::leaf_hash).collect());
        Self {
            net,
            clinic,
            hospital,
            entries,
            tree,
        }
    }

    fn cert(p: &Party) -> Certificate {
        p.identity.certificate().clone()
    }

    fn checkpoint(&self, size: u64) -> SignedCheckpoint {
        SignedCheckpoint::sign(
            &self.clinic.identity,
            &Checkpoint {
                party: self.clinic.uri.clone(),
                tree_size: size,
                root: self.tree.root_at(size).unwrap(),
                time_ms: ms(size) + 500,
            },
        )
        .unwrap()
    }

    /// A full export of the log with optional earlier checkpoints.
    fn export(&self, earlier: &[u64]) -> String {
        let n = self.tree.len();
        let latest = self.checkpoint(n);
        let mut w =
            ExportWriter::new(Vec::new(), &self.tree, &latest, ExportRange::all(n)).unwrap();
        for e in &self.entries {
            w.entry(e).unwrap();
        }
        for &size in earlier {
            w.earlier_checkpoint(&self.checkpoint(size)).unwrap();
        }
        String::from_utf8(w.finish().unwrap()).unwrap()
    }

    /// Entries [first, end) chosen by time, with witnesses.
    fn range_export(&self, first: u64, end: u64) -> String {
        let n = self.tree.len();
        let latest = self.checkpoint(n);
        let range = ExportRange {
            from_ms: Some(ms(first)),
            to_ms: Some(ms(end)),
            first,
            end,
        };
        let mut w = ExportWriter::new(Vec::new(), &self.tree, &latest, range).unwrap();
        if first > 0 {
            w.before(&self.entries[first as usize - 1]).unwrap();
        }
        for e in &self.entries[first as usize..end as usize] {
            w.entry(e).unwrap();
        }
        if end < n {
            w.after(&self.entries[end as usize]).unwrap();
        }
        String::from_utf8(w.finish().unwrap()).unwrap()
    }

    fn verify(&self, text: &str) -> Result<ExportReport, Error> {
        verify_export(text.as_bytes(), &Self::cert(&self.clinic))
    }
}

#[test]
fn checkpoint_signs_and_verifies() {
    let log = Log::new(5);
    let signed = log.checkpoint(5);
    let want = Checkpoint {
        party: log.clinic.uri.clone(),
        tree_size: 5,
        root: log.tree.root(),
        time_ms: ms(5) + 500,
    };
    let stored = SignedCheckpoint::from_bytes(&signed.to_bytes()).unwrap();
    assert_eq!(stored, signed);
    assert_eq!(stored.to_bytes(), signed.to_bytes());
    assert_eq!(
        stored
            .verify_with_certificate(&Log::cert(&log.clinic))
            .unwrap(),
        want
    );
    assert_eq!(stored.verify(&log.net.trust()).unwrap(), want);
    assert_eq!(stored.unverified().unwrap(), want);
    // Loading the certificate from PEM, as the CLI does, works the same.
    let pem = Certificate::from_pem(log.clinic.identity_pem.as_bytes())
        .unwrap()
        .remove(0);
    stored.verify_with_certificate(&pem).unwrap();
}

#[test]
fn checkpoint_for_another_party_is_not_signed() {
    let log = Log::new(3);
    let cp = Checkpoint {
        party: log.hospital.uri.clone(),
        tree_size: 3,
        root: log.tree.root(),
        time_ms: ms(3),
    };
    assert!(matches!(
        SignedCheckpoint::sign(&log.clinic.identity, &cp),
        Err(Error::Audit(AuditError::PartyMismatch { .. }))
    ));
}

#[test]
fn checkpoint_with_wrong_certificate_is_rejected() {
    let log = Log::new(5);
    let signed = log.checkpoint(5);
    // The other party's identity certificate.
    assert!(matches!(
        signed.verify_with_certificate(&Log::cert(&log.hospital)),
        Err(Error::Audit(AuditError::SignerMismatch))
    ));
    // The clinic's encryption certificate.
    assert!(matches!(
        signed.verify_with_certificate(&log.clinic.encryption_cert()),
        Err(Error::Trust(TrustError::WrongKeyUsage("identity")))
    ));
    // Another certificate for the same party URI from the same CA (another key).
    let (pem, _) = log.net.leaf(CLINIC, KeyRole::Identity);
    let twin = Certificate::from_pem(pem.as_bytes()).unwrap().remove(0);
    assert!(matches!(
        signed.verify_with_certificate(&twin),
        Err(Error::Audit(AuditError::SignerMismatch))
    ));
    // A trust store of another CA.
    let other = Net::new("Other CA");
    assert!(matches!(
        signed.verify(&other.trust()),
        Err(Error::Trust(TrustError::UnknownIssuer))
    ));
}

/// Offset of the body inside the storage form, and the party length.
fn body_offsets(bytes: &[u8]) -> (usize, usize) {
    let body = 6 + 2 + 2;
    let party_len = u16::from_be_bytes([bytes[body + 4], bytes[body + 5]]) as usize;
    (body, party_len)
}

#[test]
fn tampered_checkpoint_is_rejected() {
    let log = Log::new(5);
    let bytes = log.checkpoint(5).to_bytes();
    let (body, party_len) = body_offsets(&bytes);
    let size_at = body + 6 + party_len;
    let root_at = size_at + 8;
    let time_at = root_at + 32;
    let sig_at = time_at + 8;
    for (what, at) in [
        ("size", size_at + 7),
        ("root", root_at + 3),
        ("time", time_at + 7),
        ("party", body + 6 + 4),
        ("signature r", sig_at + 5),
        ("signature s", sig_at + 40),
    ] {
        let mut t = bytes.clone();
        t[at] ^= 1;
        let signed = SignedCheckpoint::from_bytes(&t).unwrap();
        assert!(
            matches!(
                signed.verify_with_certificate(&Log::cert(&log.clinic)),
                Err(Error::BadSignature)
            ),
            "{what}"
        );
        assert!(
            matches!(signed.verify(&log.net.trust()), Err(Error::BadSignature)),
            "{what}"
        );
    }
    // Structure.
    assert!(SignedCheckpoint::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(SignedCheckpoint::from_bytes(&trailing).is_err());
    let mut magic = bytes.clone();
    magic[0] ^= 1;
    assert!(matches!(
        SignedCheckpoint::from_bytes(&magic),
        Err(Error::Format(FormatError::BadMagic(_)))
    ));
    assert!(matches!(
        SignedCheckpoint::from_bytes(&vec![0; 70_000]),
        Err(Error::Format(FormatError::TooLarge { .. }))
    ));
}

// ---------------------------------------------------------------------------
// Exports.

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

fn join(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Line index (0-based) of the entry line with `seq` in a full export.
fn line_of(seq: u64) -> usize {
    seq as usize + 1
}

fn edit_entry(line: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
    f(&mut v["entry"]);
    serde_json::to_string(&v).unwrap()
}

#[test]
fn unmodified_export_verifies() {
    let log = Log::new(30);
    let text = log.export(&[]);
    let all = lines(&text);
    assert_eq!(all.len(), 32);
    assert!(all[0].starts_with(
        r#"{"type":"header","format":"exchange-audit-export/1","party":"urn:jp:mhlw:facility:1310000013","from_ms":null,"to_ms":null,"first":0,"end":30,"tree_size":30}"#
    ));
    assert!(all[1].starts_with(r#"{"type":"entry","entry":{"seq":0,"#));
    assert!(all[31].starts_with(r#"{"type":"latest","checkpoint":""#));
    let r = log.verify(&text).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.entries_verified, 30);
    assert_eq!((r.first, r.end), (0, 30));
    assert_eq!(r.checkpoint.tree_size, 30);
    assert_eq!(r.checkpoint.root, log.tree.root());
    assert_eq!(r.checkpoint.party, log.clinic.uri);
    // Without a trailing newline, and read through a BufReader, the same.
    let r = verify_export(
        std::io::BufReader::new(text.trim_end().as_bytes()),
        &Log::cert(&log.clinic),
    )
    .unwrap();
    assert!(r.is_ok());
}

#[test]
fn modified_entry_is_reported_as_modified() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    let i = line_of(12);
    all[i] = edit_entry(&all[i], |e| e["actor"] = "admin".into());
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Modified {
            line: i as u64 + 1,
            seq: 12
        }]
    );
    assert_eq!(r.entries_verified, 29);
    assert_eq!(
        r.problems[0].to_string(),
        "line 14: entry seq 12 was modified (its inclusion proof does not verify)"
    );

    // Changing the outcome, the time, a pseudonym: each is caught.
    for f in [
        (|e: &mut serde_json::Value| e["outcome"] = "failed".into()) as fn(&mut serde_json::Value),
        |e| e["time_ms"] = (ms(12) + 1).into(),
        |e| e["subjects"] = serde_json::json!([]),
        |e| e["detail"] = "x".into(),
    ] {
        let mut all = lines(&log.export(&[]));
        all[i] = edit_entry(&all[i], f);
        let r = log.verify(&join(&all)).unwrap();
        assert_eq!(
            r.problems,
            vec![Problem::Modified {
                line: i as u64 + 1,
                seq: 12
            }]
        );
    }
}

#[test]
fn altered_proof_is_reported_as_modified() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    let i = line_of(3);
    let mut v: serde_json::Value = serde_json::from_str(&all[i]).unwrap();
    v["proof"][0] = "00".repeat(32).into();
    all[i] = serde_json::to_string(&v).unwrap();
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Modified { line: 5, seq: 3 }]);
}

#[test]
fn deleted_entry_is_reported_as_deleted() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    all.remove(line_of(15));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Deleted { seq: 15 }]);
    assert_eq!(r.entries_verified, 29);
    assert_eq!(
        r.problems[0].to_string(),
        "entry seq 15 is missing (deleted)"
    );

    // Three in a row: one range.
    let mut all = lines(&log.export(&[]));
    all.drain(line_of(4)..line_of(7));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::DeletedRange { first: 4, last: 6 }]
    );
    // The first entry.
    let mut all = lines(&log.export(&[]));
    all.remove(line_of(0));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Deleted { seq: 0 }]);
}

#[test]
fn inserted_line_is_reported_as_inserted() {
    let log = Log::new(30);
    // A forged entry claiming the seq of an authentic one, inserted after it.
    let mut all = lines(&log.export(&[]));
    let forged = edit_entry(&all[line_of(7)], |e| {
        e["actor"] = "client:urn:example:app:9".into();
    });
    all.insert(line_of(7) + 1, forged);
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Inserted { line: 10, seq: 7 }]);
    assert_eq!(r.entries_verified, 30);

    // Inserted before the authentic line: still the forged line is named.
    let mut all = lines(&log.export(&[]));
    let forged = edit_entry(&all[line_of(7)], |e| e["outcome"] = "failed".into());
    all.insert(line_of(7), forged);
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Inserted { line: 9, seq: 7 }]);

    // A forged entry beyond the checkpoint (seq 30), before the latest line.
    let mut all = lines(&log.export(&[]));
    let forged = edit_entry(&all[line_of(29)], |e| e["seq"] = 30.into());
    all.insert(31, forged);
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Inserted { line: 32, seq: 30 }]);

    // An authentic line repeated.
    let mut all = lines(&log.export(&[]));
    let dup = all[line_of(20)].clone();
    all.insert(line_of(25), dup);
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems, vec![Problem::Inserted { line: 27, seq: 20 }]);
    assert_eq!(r.entries_verified, 30);
}

#[test]
fn swapped_lines_are_reported_as_reordered() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    all.swap(line_of(10), line_of(11));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Reordered {
            line: 13,
            seq: 10,
            after_seq: Some(11)
        }]
    );
    assert_eq!(r.entries_verified, 30);
    assert_eq!(
        r.problems[0].to_string(),
        "line 13: entry seq 10 is out of order (it follows seq 11)"
    );

    // Far apart: exactly the two moved lines, not everything between them.
    let mut all = lines(&log.export(&[]));
    all.swap(line_of(5), line_of(20));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![
            Problem::Reordered {
                line: 7,
                seq: 20,
                after_seq: Some(4)
            },
            Problem::Reordered {
                line: 22,
                seq: 5,
                after_seq: Some(19)
            },
        ]
    );
}

#[test]
fn removed_tail_is_reported_as_truncated() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    all.drain(line_of(25)..line_of(30));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Truncated {
            expected_end: 30,
            last_seq: Some(24)
        }]
    );
    assert_eq!(r.entries_verified, 25);
    assert_eq!(
        r.problems[0].to_string(),
        "export truncated: entries seq 25 to 29 are missing after seq 24"
    );
    // Every entry removed.
    let mut all = lines(&log.export(&[]));
    all.drain(line_of(0)..line_of(30));
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Truncated {
            expected_end: 30,
            last_seq: None
        }]
    );
}

#[test]
fn deletion_with_renumbering_shows_as_modified_entries() {
    // Documented limit: deleting seq 15 and renumbering 16..29 to 15..28
    // changes each renumbered leaf; each is reported as modified, the lost
    // last seq as truncation.
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    all.remove(line_of(15));
    for seq in 16..30u64 {
        let i = line_of(seq) - 1;
        all[i] = edit_entry(&all[i], |e| e["seq"] = (seq - 1).into());
    }
    let r = log.verify(&join(&all)).unwrap();
    let mut want: Vec<Problem> = (15..29u64)
        .map(|seq| Problem::Modified { line: seq + 2, seq })
        .collect();
    want.push(Problem::Truncated {
        expected_end: 30,
        last_seq: Some(28),
    });
    assert_eq!(r.problems, want);
    assert_eq!(r.entries_verified, 15);
}

fn replace_latest(all: &mut [String], signed: &SignedCheckpoint) {
    let last = all.len() - 1;
    all[last] = format!(
        r#"{{"type":"latest","checkpoint":"{}"}}"#,
        BASE64.encode(signed.to_bytes())
    );
}

#[test]
fn checkpoint_of_another_party_or_cert_is_refused() {
    let log = Log::new(30);
    let text = log.export(&[]);
    // Verified with the hospital's certificate.
    assert!(matches!(
        verify_export(text.as_bytes(), &Log::cert(&log.hospital)),
        Err(Error::Audit(AuditError::SignerMismatch))
    ));
    // The same tree head re-signed by the hospital (its own party).
    let mut all = lines(&text);
    let resigned = SignedCheckpoint::sign(
        &log.hospital.identity,
        &Checkpoint {
            party: log.hospital.uri.clone(),
            tree_size: 30,
            root: log.tree.root(),
            time_ms: ms(30),
        },
    )
    .unwrap();
    replace_latest(&mut all, &resigned);
    assert!(matches!(
        log.verify(&join(&all)),
        Err(Error::Audit(AuditError::SignerMismatch))
    ));
    // ... and verified with the hospital's certificate: the header names the clinic.
    let r = verify_export(join(&all).as_bytes(), &Log::cert(&log.hospital)).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, Problem::HeaderMismatch { .. })),
        "{:?}",
        r.problems
    );
    // A certificate for the clinic's URI with another key.
    let (pem, _) = log.net.leaf(CLINIC, KeyRole::Identity);
    let twin = Certificate::from_pem(pem.as_bytes()).unwrap().remove(0);
    assert!(verify_export(text.as_bytes(), &twin).is_err());
}

#[test]
fn edited_checkpoint_size_breaks_the_signature() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    let mut bytes = log.checkpoint(30).to_bytes();
    let (body, party_len) = body_offsets(&bytes);
    bytes[body + 6 + party_len + 7] = 25;
    all[31] = format!(
        r#"{{"type":"latest","checkpoint":"{}"}}"#,
        BASE64.encode(&bytes)
    );
    assert!(matches!(log.verify(&join(&all)), Err(Error::BadSignature)));
}

#[test]
fn unusable_files_are_errors() {
    let log = Log::new(30);
    let text = log.export(&[]);
    let mut all = lines(&text);
    all.pop();
    assert!(matches!(
        log.verify(&join(&all)),
        Err(Error::Audit(AuditError::MissingCheckpoint))
    ));
    let mut all = lines(&text);
    all[31] = r#"{"type":"latest","checkpoint":"!!"}"#.into();
    assert!(matches!(log.verify(&join(&all)), Err(Error::Format(_))));
    let mut all = lines(&text);
    all.remove(0);
    assert!(log.verify(&join(&all)).is_err());
    let mut all = lines(&text);
    all[0] = all[0].replace("exchange-audit-export/1", "exchange-audit-export/2");
    assert!(log.verify(&join(&all)).is_err());
    assert!(log.verify("").is_err());
    let long = format!("{}\n", "x".repeat(2 * 1024 * 1024));
    assert!(matches!(
        log.verify(&(long.clone() + &text)),
        Err(Error::Format(FormatError::TooLarge { .. }))
    ));
    // A long line after the header is reported, and the rest is checked.
    let mut all = lines(&text);
    all.insert(5, "x".repeat(2 * 1024 * 1024));
    let report = log.verify(&join(&all)).unwrap();
    assert_eq!(
        report.problems,
        vec![Problem::Malformed {
            line: 6,
            reason: format!("a line of {} bytes (at most 1048576)", 2 * 1024 * 1024)
        }]
    );
    assert_eq!(report.entries_verified, 30);
}

#[test]
fn an_entry_that_cannot_be_exported_is_reported_and_the_rest_verifies() {
    // A legacy entry far beyond the limits (as stored before entries were
    // checked on append) among valid ones.
    let mut entries: Vec<AuditEntry> = (0..6).map(entry).collect();
    entries[3].subjects = (0..3000u32)
        .map(|i| hex::encode(sha256(&i.to_be_bytes())))
        .collect();
    let stored: Vec<Vec<u8>> = entries.iter().map(AuditEntry::to_canonical_json).collect();
    assert!(AuditEntry::from_json(&stored[3]).is_err());
    let tree = MerkleTree::from_leaf_hashes(stored.iter().map(|b| merkle_leaf_hash(b)).collect());
    let net = Net::new("Audit Test CA");
    let clinic = net.party(CLINIC);
    let latest = SignedCheckpoint::sign(
        &clinic.identity,
        &Checkpoint {
            party: clinic.uri.clone(),
            tree_size: 6,
            root: tree.root(),
            time_ms: ms(6),
        },
    )
    .unwrap();
    let mut w = ExportWriter::new(Vec::new(), &tree, &latest, ExportRange::all(6)).unwrap();
    // The writer refuses an unreadable line whose bytes are not the leaf.
    let mut other = ExportWriter::new(Vec::new(), &tree, &latest, ExportRange::all(6)).unwrap();
    assert!(other.unreadable(0, b"{}", "x").is_err());
    for (seq, bytes) in stored.iter().enumerate() {
        match AuditEntry::from_json(bytes) {
            Ok(e) => w.entry(&e).unwrap(),
            Err(e) => w.unreadable(seq as u64, bytes, &e.to_string()).unwrap(),
        }
    }
    let out = w.finish().unwrap();
    let report = verify_export(&out[..], clinic.identity.certificate()).unwrap();
    assert_eq!(report.entries_verified, 5);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        matches!(&report.problems[0], Problem::Unreadable { line: 5, seq: 3, reason } if reason.contains("audit")),
        "{:?}",
        report.problems
    );
    // An altered unreadable line is not authentic: Modified.
    let text = String::from_utf8(out).unwrap();
    let mut all = lines(&text);
    let mut v: serde_json::Value = serde_json::from_str(&lines(&text)[4]).unwrap();
    v["leaf_hash"] = serde_json::Value::String("00".repeat(32));
    all[4] = v.to_string();
    let report = verify_export(join(&all).as_bytes(), clinic.identity.certificate()).unwrap();
    assert_eq!(report.problems, vec![Problem::Modified { line: 5, seq: 3 }]);
}

#[test]
fn an_unavailable_witness_leaves_the_range_unproven_not_the_export_failed() {
    let log = Log::new(10);
    let latest = log.checkpoint(10);
    let range = ExportRange {
        from_ms: Some(ms(3)),
        to_ms: None,
        first: 3,
        end: 10,
    };
    let mut w = ExportWriter::new(Vec::new(), &log.tree, &latest, range).unwrap();
    for e in &log.entries[3..] {
        w.entry(e).unwrap();
    }
    assert!(
        ExportWriter::new(Vec::new(), &log.tree, &latest, range)
            .unwrap()
            .finish()
            .is_err()
    );
    w.witness_unavailable();
    let out = w.finish().unwrap();
    let report = log.verify(&String::from_utf8(out).unwrap()).unwrap();
    assert_eq!(report.entries_verified, 7);
    assert!(
        matches!(&report.problems[..], [Problem::BadWitness { line: None, reason }] if reason.contains("missing before")),
        "{:?}",
        report.problems
    );
}

#[test]
fn free_text_is_bounded_and_escaped_for_the_log() {
    use exchange_core::audit::log_text;
    assert_eq!(log_text("plain — テキスト", 100), "plain — テキスト");
    assert_eq!(log_text("a\nb\u{1b}[31m\\", 100), "a\\nb\\u{1b}[31m\\\\");
    let long = "x".repeat(1024 * 1024);
    let cut = log_text(&long, 4096);
    assert!(cut.len() <= 4096);
    assert!(cut.ends_with("…[1048576 bytes]"), "{}", &cut[4000..]);
    let wide = "詳".repeat(2000);
    let cut = log_text(&wide, 100);
    assert!(cut.len() <= 100 && cut.starts_with("詳詳"));
    assert!(!log_text("\u{7}\u{85}", 100).chars().any(char::is_control));
}

#[test]
fn many_subjects_are_kept_by_reference() {
    use exchange_core::audit::SubjectSet;
    let a = [1u8; 32];
    let b = [2u8; 32];
    let set = SubjectSet::of(&[b, a, b]);
    assert_eq!(set.count, 2);
    assert_eq!(set, SubjectSet::of(&[a, b]));
    let mut input = b"exchange/v1 audit subject set\0".to_vec();
    input.extend_from_slice(&a);
    input.extend_from_slice(&b);
    assert_eq!(set.sha256, hex::encode(sha256(&input)));
    let mut e = entry(1);
    e.subjects.clear();
    e.subject_set = Some(set.clone());
    let json = e.to_canonical_json();
    assert!(String::from_utf8(json.clone()).unwrap().ends_with(&format!(
        ",\"subject_set\":{{\"count\":2,\"sha256\":\"{}\"}}}}",
        set.sha256
    )));
    assert_eq!(AuditEntry::from_json(&json).unwrap(), e);
    // Not both, and a well-formed digest.
    let mut both = e.clone();
    both.subjects = entry(1).subjects;
    assert!(both.validate().is_err());
    let mut bad = e.clone();
    bad.subject_set = Some(SubjectSet {
        count: 2,
        sha256: "AB".repeat(32),
    });
    assert!(bad.validate().is_err());
}

#[test]
fn header_disagreeing_with_the_checkpoint_is_reported() {
    let log = Log::new(30);
    let text = log.export(&[]);
    // tree_size: nothing can be checked.
    let mut all = lines(&text);
    all[0] = all[0].replace("\"tree_size\":30", "\"tree_size\":29");
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(r.problems.len(), 1);
    assert!(matches!(r.problems[0], Problem::HeaderMismatch { .. }));
    assert_eq!(r.entries_verified, 0);
    // A full export must start at 0 and end at tree_size.
    let mut all = lines(&text);
    all[0] = all[0].replace("\"end\":30", "\"end\":20");
    let r = log.verify(&join(&all)).unwrap();
    assert!(matches!(r.problems[..], [Problem::HeaderMismatch { .. }]));
    assert_eq!((r.first, r.end), (0, 30));
    let mut all = lines(&text);
    all[0] = all[0].replace("\"first\":0", "\"first\":3");
    all.drain(line_of(0)..line_of(3));
    let r = log.verify(&join(&all)).unwrap();
    assert!(matches!(
        r.problems[..],
        [
            Problem::HeaderMismatch { .. },
            Problem::DeletedRange { first: 0, last: 2 }
        ]
    ));
    // Party.
    let mut all = lines(&text);
    all[0] = all[0].replace(CLINIC, HOSPITAL);
    let r = log.verify(&join(&all)).unwrap();
    assert!(matches!(r.problems[..], [Problem::HeaderMismatch { .. }]));
}

#[test]
fn malformed_lines_are_reported() {
    let log = Log::new(30);
    let mut all = lines(&log.export(&[]));
    all.insert(5, "not json".into());
    all.insert(6, r#"{"type":"comment","text":"hi"}"#.into());
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(
            r.problems[..],
            [
                Problem::Malformed { line: 6, .. },
                Problem::Malformed { line: 7, .. }
            ]
        ),
        "{:?}",
        r.problems
    );
    assert_eq!(r.entries_verified, 30);
    // A line after the latest checkpoint.
    let mut all = lines(&log.export(&[]));
    let moved = all.remove(line_of(29));
    all.push(moved);
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::Malformed { line: 31, .. }]),
        "{:?}",
        r.problems
    );
}

#[test]
fn range_export_verifies_with_its_witnesses() {
    let log = Log::new(30);
    let text = log.range_export(10, 20);
    let all = lines(&text);
    // header, before, 10 entries, after, latest
    assert_eq!(all.len(), 14);
    assert!(all[1].starts_with(r#"{"type":"before","entry":{"seq":9,"#));
    assert!(all[12].starts_with(r#"{"type":"after","entry":{"seq":20,"#));
    let r = log.verify(&text).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.entries_verified, 10);
    assert_eq!((r.first, r.end), (10, 20));
    assert_eq!((r.from_ms, r.to_ms), (Some(ms(10)), Some(ms(20))));

    // From the start / to the end: no witness needed on that side.
    assert!(log.verify(&log.range_export(0, 20)).unwrap().is_ok());
    assert!(log.verify(&log.range_export(10, 30)).unwrap().is_ok());
    assert!(log.verify(&log.range_export(12, 12)).unwrap().is_ok());
}

#[test]
fn range_export_without_after_witness_is_reported() {
    let log = Log::new(30);
    let mut all = lines(&log.range_export(10, 20));
    all.remove(12);
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadWitness { line: None, .. }]),
        "{:?}",
        r.problems
    );
    let mut all = lines(&log.range_export(10, 20));
    all.remove(1);
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadWitness { line: None, .. }]),
        "{:?}",
        r.problems
    );
}

#[test]
fn range_export_without_its_last_entry_is_reported() {
    let log = Log::new(30);
    let mut all = lines(&log.range_export(10, 20));
    all.remove(11); // seq 19
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Truncated {
            expected_end: 20,
            last_seq: Some(18)
        }]
    );
    // Hiding it by shrinking the (unsigned) header's range: the after
    // witness no longer fits.
    let mut all = lines(&log.range_export(10, 20));
    all.remove(11);
    all[0] = all[0].replace("\"end\":20", "\"end\":19");
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadWitness { line: Some(12), .. }]),
        "{:?}",
        r.problems
    );
    // ... and replacing the witness by entry 19 (dated inside the range).
    let mut all = lines(&log.range_export(10, 20));
    let nineteen = all
        .remove(11)
        .replacen("\"type\":\"entry\"", "\"type\":\"after\"", 1);
    all[11] = nineteen;
    all[0] = all[0].replace("\"end\":20", "\"end\":19");
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadWitness { line: Some(12), .. }]),
        "{:?}",
        r.problems
    );
    // A forged witness.
    let mut all = lines(&log.range_export(10, 20));
    all[12] = edit_entry(&all[12], |e| e["time_ms"] = (ms(25)).into());
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadWitness { line: Some(13), .. }]),
        "{:?}",
        r.problems
    );
}

#[test]
fn earlier_consistent_checkpoints_verify() {
    let log = Log::new(30);
    let text = log.export(&[1, 12, 16, 30]);
    let all = lines(&text);
    assert_eq!(all.len(), 36);
    assert!(all[31].starts_with(r#"{"type":"checkpoint","checkpoint":""#));
    let r = log.verify(&text).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.checkpoints_verified, 4);
}

#[test]
fn earlier_checkpoint_of_a_forked_log_is_inconsistent() {
    let log = Log::new(30);
    // The same party signed a different history of 15 entries.
    let mut forked: Vec<AuditEntry> = (0..15).map(entry).collect();
    forked[9].outcome = AuditOutcome::Failed;
    let fork_tree =
        MerkleTree::from_leaf_hashes(forked.iter().map(AuditEntry::leaf_hash).collect());
    let fork_cp = SignedCheckpoint::sign(
        &log.clinic.identity,
        &Checkpoint {
            party: log.clinic.uri.clone(),
            tree_size: 15,
            root: fork_tree.root(),
            time_ms: ms(15),
        },
    )
    .unwrap();
    // The writer refuses it.
    let latest = log.checkpoint(30);
    let mut w = ExportWriter::new(Vec::new(), &log.tree, &latest, ExportRange::all(30)).unwrap();
    for e in &log.entries {
        w.entry(e).unwrap();
    }
    assert!(matches!(
        w.earlier_checkpoint(&fork_cp),
        Err(Error::Audit(AuditError::ConsistencyProof))
    ));
    // Written by hand with the real log's proof from 15 to 30.
    let proof: Vec<String> = log
        .tree
        .consistency_proof(15, 30)
        .unwrap()
        .iter()
        .map(hex::encode)
        .collect();
    let mut all = lines(&log.export(&[12]));
    all.insert(
        32,
        serde_json::json!({
            "type": "checkpoint",
            "checkpoint": BASE64.encode(fork_cp.to_bytes()),
            "consistency": proof,
        })
        .to_string(),
    );
    let r = log.verify(&join(&all)).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Inconsistent {
            line: 33,
            old_size: 15
        }]
    );
    assert_eq!(r.checkpoints_verified, 1);
    assert_eq!(r.entries_verified, 30);
    // An earlier checkpoint signed by someone else.
    let other = SignedCheckpoint::sign(
        &log.hospital.identity,
        &Checkpoint {
            party: log.hospital.uri.clone(),
            tree_size: 12,
            root: log.tree.root_at(12).unwrap(),
            time_ms: ms(12),
        },
    )
    .unwrap();
    let mut all = lines(&log.export(&[]));
    all.insert(
        31,
        serde_json::json!({
            "type": "checkpoint",
            "checkpoint": BASE64.encode(other.to_bytes()),
            "consistency": [],
        })
        .to_string(),
    );
    let r = log.verify(&join(&all)).unwrap();
    assert!(
        matches!(r.problems[..], [Problem::BadCheckpoint { line: 32, .. }]),
        "{:?}",
        r.problems
    );
}

#[test]
fn writer_refuses_what_would_not_verify() {
    let log = Log::new(30);
    let latest = log.checkpoint(30);
    // Entries out of order, skipped, or not the tree's.
    let mut w = ExportWriter::new(Vec::new(), &log.tree, &latest, ExportRange::all(30)).unwrap();
    assert!(w.entry(&log.entries[1]).is_err());
    w.entry(&log.entries[0]).unwrap();
    let mut changed = log.entries[1].clone();
    changed.actor = "admin".into();
    assert!(w.entry(&changed).is_err());
    w.entry_json(&log.entries[1].to_canonical_json()).unwrap();
    assert!(w.finish().is_err(), "unfinished range");
    // A checkpoint whose root is not the tree's.
    let other = SignedCheckpoint::sign(
        &log.clinic.identity,
        &Checkpoint {
            party: log.clinic.uri.clone(),
            tree_size: 30,
            root: [0; 32],
            time_ms: ms(30),
        },
    )
    .unwrap();
    assert!(ExportWriter::new(Vec::new(), &log.tree, &other, ExportRange::all(30)).is_err());
    // A range outside the tree, an open range not at the ends.
    assert!(ExportWriter::new(Vec::new(), &log.tree, &latest, ExportRange::all(31)).is_err());
    let open = ExportRange {
        from_ms: None,
        to_ms: Some(ms(20)),
        first: 5,
        end: 20,
    };
    assert!(ExportWriter::new(Vec::new(), &log.tree, &latest, open).is_err());
    // Missing or misdated witnesses.
    let range = ExportRange {
        from_ms: Some(ms(10)),
        to_ms: Some(ms(20)),
        first: 10,
        end: 20,
    };
    let mut w = ExportWriter::new(Vec::new(), &log.tree, &latest, range).unwrap();
    assert!(w.before(&log.entries[10]).is_err());
    for e in &log.entries[10..20] {
        w.entry(e).unwrap();
    }
    assert!(w.after(&log.entries[19]).is_err());
    assert!(w.finish().is_err(), "missing witnesses");
}
