//! Large ciphertexts kept in the database, in numbered chunks, streamed in
//! constant memory both ways: replicas need no shared filesystem.

use std::io::Read;

use deadpool_postgres::Pool;
use tokio::io::AsyncReadExt;

use super::rows::col;
use super::{Conn, pg_error};
use crate::error::StoreError;
use crate::store::{CiphertextSource, MessageKey, SpoolFile};

/// The size of a chunk (the last one of a ciphertext may be shorter).
pub const CHUNK: usize = 1024 * 1024;

/// Copies a spool file into `blob_chunks` for `key`, one chunk at a time;
/// fails unless it holds exactly `len` bytes.
pub(super) async fn write_chunks(
    conn: &Conn<'_>,
    key: &MessageKey,
    spool: &SpoolFile,
    len: u64,
) -> Result<(), StoreError> {
    let io = |op, e| StoreError::Io {
        op,
        path: spool.path.clone(),
        source: e,
    };
    // The spool file was opened for writing only: read it anew.
    let mut file = tokio::fs::File::open(&spool.path)
        .await
        .map_err(|e| io("open", e))?;
    let insert = conn
        .prepare_cached("INSERT INTO blob_chunks (message_id, n, data) VALUES ($1, $2, $3)")
        .await
        .map_err(pg_error)?;
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    let mut n: i32 = 0;
    loop {
        let mut filled = 0;
        while filled < CHUNK {
            let k = file
                .read(&mut buf[filled..])
                .await
                .map_err(|e| io("read", e))?;
            if k == 0 {
                break;
            }
            filled += k;
        }
        if filled == 0 {
            break;
        }
        total += filled as u64;
        if total > len {
            break;
        }
        conn.execute(&insert, &[&key.as_bytes().as_slice(), &n, &&buf[..filled]])
            .await
            .map_err(pg_error)?;
        n = n
            .checked_add(1)
            .ok_or_else(|| StoreError::Invalid("ciphertext has too many chunks".into()))?;
        if filled < CHUNK {
            break;
        }
    }
    if total != len {
        return Err(StoreError::Invalid(format!(
            "ciphertext is {total} bytes or more, envelope declares {len}"
        )));
    }
    Ok(())
}

/// A chunked ciphertext, read back a chunk at a time by a blocking reader
/// (the callers read on the blocking pool).
#[derive(Debug)]
pub(super) struct Chunks {
    pub(super) pool: Pool,
    pub(super) key: MessageKey,
    /// The ciphertext's length: a chunk missing before it (the message
    /// purged while being read) is an error, not an early end.
    pub(super) len: u64,
    pub(super) runtime: tokio::runtime::Handle,
}

impl CiphertextSource for Chunks {
    fn open(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(ChunkReader {
            pool: self.pool.clone(),
            key: self.key,
            runtime: self.runtime.clone(),
            len: self.len,
            read: 0,
            next: 0,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }))
    }
}

struct ChunkReader {
    pool: Pool,
    key: MessageKey,
    runtime: tokio::runtime::Handle,
    len: u64,
    read: u64,
    next: i32,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChunkReader {
    async fn fetch(pool: &Pool, key: &MessageKey, n: i32) -> Result<Option<Vec<u8>>, StoreError> {
        let client = pool.get().await.map_err(super::pool_error)?;
        let stmt = client
            .prepare_cached("SELECT data FROM blob_chunks WHERE message_id = $1 AND n = $2")
            .await
            .map_err(pg_error)?;
        let row = client
            .query_opt(&stmt, &[&key.as_bytes().as_slice(), &n])
            .await
            .map_err(pg_error)?;
        row.map(|r| col::<Vec<u8>>(&r, 0)).transpose()
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() && !self.done {
            let chunk = self
                .runtime
                .block_on(Self::fetch(&self.pool, &self.key, self.next))
                .map_err(std::io::Error::other)?;
            match chunk {
                Some(c) if !c.is_empty() => {
                    self.buf = c;
                    self.pos = 0;
                    self.next += 1;
                }
                _ if self.read < self.len => {
                    return Err(std::io::Error::other(format!(
                        "message {}: chunk {} of its ciphertext is missing after {} of {} bytes",
                        self.key, self.next, self.read, self.len
                    )));
                }
                _ => self.done = true,
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.read += n as u64;
        Ok(n)
    }
}
