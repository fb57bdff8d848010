//! Sealing and opening a large stream runs in bounded memory.
//!
//! Peak RSS (VmHWM) is read from /proc, so this file holds one test only: the
//! process is not shared with other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use exchange_core::envelope::{EnvelopeHead, SealerBuilder};
use exchange_core::route::HopRole;
use sha2::{Digest, Sha256};

const LEN: u64 = 256 * 1024 * 1024;

/// Yields `LEN` bytes without holding them: a fixed 64 KiB block, each copy
/// stamped with its counter so no two chunks repeat.
struct Source {
    left: u64,
    block: Vec<u8>,
    pos: usize,
    counter: u64,
    hash: Sha256,
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.block.len() {
            self.counter += 1;
            self.block[..8].copy_from_slice(&self.counter.to_le_bytes());
            self.pos = 0;
        }
        let n = usize::try_from(
            self.left
                .min((self.block.len() - self.pos).min(buf.len()) as u64),
        )
        .unwrap();
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

struct HashSink(Sha256, u64);

impl Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn large_stream_seals_and_opens_in_bounded_memory() {
    let net = Net::new("Test CA");
    let clinic = net.party("urn:jp:mhlw:facility:1310000013");
    let hospital = net.party("urn:jp:mhlw:facility:1310000021");
    let trust = net.trust();
    let baseline = peak_rss_kib();

    let mut src = Source {
        left: LEN,
        block: payload(64 * 1024),
        pos: 0,
        counter: 0,
        hash: Sha256::new(),
    };
    let mut ct = tempfile::tempfile().unwrap();
    let head = SealerBuilder::new(&clinic.identity, "application/dicom")
        .recipient(net.recipient_key(&hospital), HopRole::ThirdParty)
        .start(now(), &mut rng(3))
        .unwrap()
        .seal_stream(&mut src, &mut std::io::BufWriter::new(&mut ct), |_| {})
        .unwrap();
    assert_eq!(src.left, 0);
    let plain_digest = src.hash.finalize();

    ct.seek(SeekFrom::Start(0)).unwrap();
    let head = EnvelopeHead::decode(head.as_bytes())
        .unwrap()
        .verify(&trust, now())
        .unwrap();
    assert_eq!(head.header().payload_length, LEN);
    let mut sink = HashSink(Sha256::new(), 0);
    head.open(std::slice::from_ref(&hospital.key))
        .unwrap()
        .decrypt_stream(&mut std::io::BufReader::new(ct), &mut sink, |_| {})
        .unwrap();
    assert_eq!(sink.1, LEN);
    assert_eq!(sink.0.finalize(), plain_digest);

    let grown_mib = (peak_rss_kib().saturating_sub(baseline)) / 1024;
    eprintln!(
        "peak RSS grew by {grown_mib} MiB while sealing and opening {} MiB",
        LEN >> 20
    );
    assert!(
        grown_mib < 32,
        "peak RSS grew by {grown_mib} MiB for a {} MiB stream",
        LEN >> 20
    );
}
