//! The Merkle tree of RFC 9162 §2.1: tree heads, inclusion and consistency
//! proofs, and a compact frontier for appending without the leaves.

use crate::error::{AuditError, Error, FormatError};
use crate::suite;

/// A SHA-256 hash: a leaf hash, an interior node or a tree root.
pub type Hash = [u8; 32];

/// Longest inclusion proof for a 64-bit tree size.
pub const MAX_INCLUSION_PROOF: usize = 64;
/// Longest consistency proof for 64-bit tree sizes.
pub const MAX_CONSISTENCY_PROOF: usize = 128;

/// Largest power of two strictly smaller than `n` (`n >= 2`), the MTH split point.
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// An in-memory Merkle tree over leaf hashes, with every perfect subtree cached.
///
/// `levels[k][i]` is the hash of the perfect subtree over leaves
/// `[i * 2^k, (i + 1) * 2^k)`, so any node of any historical tree costs at
/// most `O(log n)` hashes (only nodes on a right edge that is not a perfect
/// subtree are computed). Memory is about two hashes per leaf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree over `leaves` (leaf hashes, in order).
    pub fn from_leaf_hashes(leaves: Vec<Hash>) -> Self {
        let mut levels = vec![leaves];
        while let Some(below) = levels.last().filter(|l| l.len() >= 2) {
            let above = below
                .chunks_exact(2)
                .map(|p| suite::merkle_node_hash(&p[0], &p[1]))
                .collect();
            levels.push(above);
        }
        Self { levels }
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf_hash: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
        }
        self.levels[0].push(leaf_hash);
        let mut k = 0;
        while self.levels[k].len().is_multiple_of(2) {
            let n = self.levels[k].len();
            let node = suite::merkle_node_hash(&self.levels[k][n - 2], &self.levels[k][n - 1]);
            if self.levels.len() == k + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[k + 1].push(node);
            k += 1;
        }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf hash at `index`, if there is one.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        let i = usize::try_from(index).ok()?;
        self.levels.first()?.get(i).copied()
    }

    /// The root of the whole tree (`SHA-256("")` when empty).
    pub fn root(&self) -> Hash {
        self.subtree(0, self.len())
    }

    /// The root the tree had when it held `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, Error> {
        self.check_size(size)?;
        Ok(self.subtree(0, size))
    }

    /// The inclusion proof (audit path, RFC 9162 §2.1.3.1) of leaf `index` in
    /// the tree of the first `tree_size` leaves.
    pub fn inclusion_proof(&self, index: u64, tree_size: u64) -> Result<Vec<Hash>, Error> {
        self.check_size(tree_size)?;
        if index >= tree_size {
            return Err(AuditError::OutOfRange {
                index,
                size: tree_size,
            }
            .into());
        }
        let mut proof = Vec::new();
        self.path(index, 0, tree_size, &mut proof);
        Ok(proof)
    }

    /// The consistency proof (RFC 9162 §2.1.4.1) from the tree of `old_size`
    /// leaves to the tree of `new_size` leaves. Empty when `old_size` is 0 or
    /// equals `new_size`.
    pub fn consistency_proof(&self, old_size: u64, new_size: u64) -> Result<Vec<Hash>, Error> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(AuditError::OutOfRange {
                index: old_size,
                size: new_size,
            }
            .into());
        }
        let mut proof = Vec::new();
        if old_size > 0 && old_size < new_size {
            self.subproof(old_size, 0, new_size, true, &mut proof);
        }
        Ok(proof)
    }

    /// The compact frontier of the tree of the first `size` leaves.
    pub fn frontier_at(&self, size: u64) -> Result<Frontier, Error> {
        self.check_size(size)?;
        let mut peaks = Vec::new();
        let mut start = 0;
        for bit in (0..64).rev() {
            let width = 1u64 << bit;
            if size & width != 0 {
                peaks.push(self.subtree(start, start + width));
                start += width;
            }
        }
        Ok(Frontier { size, peaks })
    }

    fn check_size(&self, size: u64) -> Result<(), Error> {
        if size > self.len() {
            return Err(AuditError::OutOfRange {
                index: size,
                size: self.len(),
            }
            .into());
        }
        Ok(())
    }

    /// MTH of leaves `[start, end)`, where `start` is a multiple of the
    /// largest power of two not above `end - start` (true of every range the
    /// RFC's recursion visits).
    fn subtree(&self, start: u64, end: u64) -> Hash {
        let n = end - start;
        if n == 0 {
            return suite::merkle_empty_root();
        }
        if n.is_power_of_two() {
            let k = n.trailing_zeros() as usize;
            // Every complete aligned subtree of the stored leaves is cached.
            return self.levels[k][(start >> k) as usize];
        }
        let k = split(n);
        suite::merkle_node_hash(
            &self.subtree(start, start + k),
            &self.subtree(start + k, end),
        )
    }

    /// PATH(m, D[start:end]) with `m` absolute.
    fn path(&self, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) {
        let n = end - start;
        if n <= 1 {
            return;
        }
        let k = split(n);
        if m < start + k {
            self.path(m, start, start + k, out);
            out.push(self.subtree(start + k, end));
        } else {
            self.path(m, start + k, end, out);
            out.push(self.subtree(start, start + k));
        }
    }

    /// SUBPROOF(m, D[start:end], b) with `m` relative to `start`.
    fn subproof(&self, m: u64, start: u64, end: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = end - start;
        if m == n {
            if !complete {
                out.push(self.subtree(start, end));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, start + k, complete, out);
            out.push(self.subtree(start + k, end));
        } else {
            self.subproof(m - k, start + k, end, false, out);
            out.push(self.subtree(start, start + k));
        }
    }
}

/// A compact range over the whole log: the roots of its perfect subtrees
/// ("peaks"), largest first. Enough to append and to compute the root without
/// the leaves; the daemon stores it next to each checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// The frontier of the empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The peaks, largest (leftmost) subtree first: one per set bit of `size`.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf_hash: Hash) {
        let mut node = leaf_hash;
        let mut s = self.size;
        while s & 1 == 1 {
            // popcount(size) peaks are held, so one is there for each set bit.
            if let Some(left) = self.peaks.pop() {
                node = suite::merkle_node_hash(&left, &node);
            }
            s >>= 1;
        }
        self.peaks.push(node);
        self.size += 1;
    }

    /// The tree head (`SHA-256("")` when empty).
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        let Some(last) = it.next() else {
            return suite::merkle_empty_root();
        };
        it.fold(*last, |right, left| suite::merkle_node_hash(left, &right))
    }

    /// Storage form: `size` (u64 big-endian) then the peaks, 32 bytes each, largest first.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 32 * self.peaks.len());
        out.extend_from_slice(&self.size.to_be_bytes());
        for p in &self.peaks {
            out.extend_from_slice(p);
        }
        out
    }

    /// Parses the storage form; the number of peaks must equal `popcount(size)`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let (size, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or(FormatError::UnexpectedEof("frontier size"))?;
        let size = u64::from_be_bytes(*size);
        if rest.len() != 32 * size.count_ones() as usize {
            return Err(FormatError::InvalidField("frontier peaks").into());
        }
        let peaks = rest
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(Self { size, peaks })
    }
}

/// Computes the root an inclusion proof leads to (RFC 9162 §2.1.3.2, steps
/// 1 to 3), or `None` if the index is not below the size or the proof has
/// the wrong number of hashes.
pub fn root_from_inclusion_proof(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
) -> Option<Hash> {
    if index >= tree_size {
        return None;
    }
    let mut f_n = index;
    let mut s_n = tree_size - 1;
    let mut r = *leaf_hash;
    for p in proof {
        if s_n == 0 {
            return None;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = suite::merkle_node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = suite::merkle_node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    (s_n == 0).then_some(r)
}

/// Verifies that `leaf_hash` is leaf `index` of the tree of `tree_size`
/// leaves with head `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), Error> {
    if index >= tree_size {
        return Err(AuditError::OutOfRange {
            index,
            size: tree_size,
        }
        .into());
    }
    match root_from_inclusion_proof(leaf_hash, index, tree_size, proof) {
        Some(r) if &r == root => Ok(()),
        _ => Err(AuditError::InclusionProof.into()),
    }
}

/// Verifies that the tree of `new_size` leaves with head `new_root` extends
/// the tree of `old_size` leaves with head `old_root` (RFC 9162 §2.1.4.2).
///
/// Edge cases: `old_size == new_size` needs an empty proof and equal roots;
/// `old_size == 0` needs an empty proof and `old_root` equal to the empty
/// tree's root (stricter than the RFC, which leaves size 0 undefined).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), Error> {
    if old_size > new_size {
        return Err(AuditError::OutOfRange {
            index: old_size,
            size: new_size,
        }
        .into());
    }
    let bad = || Err(AuditError::ConsistencyProof.into());
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            bad()
        };
    }
    if old_size == 0 {
        return if proof.is_empty() && *old_root == suite::merkle_empty_root() {
            Ok(())
        } else {
            bad()
        };
    }
    // 1. An empty path is never a proof for 0 < first < second.
    let Some((head, tail)) = proof.split_first() else {
        return bad();
    };
    // 2. If first is a power of two, first_hash is the implicit first element.
    let (c0, rest) = if old_size.is_power_of_two() {
        (old_root, proof)
    } else {
        (head, tail)
    };
    // 3, 4.
    let mut f_n = old_size - 1;
    let mut s_n = new_size - 1;
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    // 5.
    let mut fr = *c0;
    let mut sr = *c0;
    // 6.
    for c in rest {
        if s_n == 0 {
            return bad();
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = suite::merkle_node_hash(c, &fr);
            sr = suite::merkle_node_hash(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = suite::merkle_node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    // 7.
    if &fr == old_root && &sr == new_root && s_n == 0 {
        Ok(())
    } else {
        bad()
    }
}
