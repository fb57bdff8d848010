//! Where incoming ciphertext goes while a stream is received: memory for
//! small envelopes, a spool file for large ones, written with async file
//! I/O so that a sender that stalls mid-stream holds no thread while it
//! waits. Nothing here is durable; [`crate::store::Store::accept`] makes it
//! so.

use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::error::{Error, StoreError};
use crate::store::{Ciphertext, SpoolFile, Store};

/// Ciphertext being received.
pub(crate) enum Sink {
    Memory {
        buf: Vec<u8>,
        limit: u64,
        store: Arc<dyn Store>,
    },
    Spool {
        /// The file, removed on drop unless the store takes it over.
        spool: SpoolFile,
        out: BufWriter<tokio::fs::File>,
    },
}

impl Sink {
    /// A sink for ciphertext expected to be `expected` bytes (0 if unknown):
    /// memory up to `inline_limit`, a spool file beyond it.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        expected: u64,
        inline_limit: u64,
    ) -> Result<Self, Error> {
        if expected > inline_limit {
            return Self::spool(&store);
        }
        Ok(Self::Memory {
            buf: Vec::with_capacity(usize::try_from(expected).unwrap_or(0)),
            limit: inline_limit,
            store,
        })
    }

    /// An empty spool file in the store's spool directory.
    fn spool(store: &Arc<dyn Store>) -> Result<Self, Error> {
        let spool = store.spool()?;
        let file = spool.file.try_clone().map_err(|source| StoreError::Io {
            op: "open",
            path: spool.path.clone(),
            source,
        })?;
        Ok(Self::Spool {
            out: BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file)),
            spool,
        })
    }

    /// Appends `data`.
    pub(crate) async fn write(&mut self, data: Vec<u8>) -> Result<(), Error> {
        let data = match self {
            Self::Memory { buf, limit, store } => {
                if (buf.len() + data.len()) as u64 <= *limit {
                    buf.extend_from_slice(&data);
                    return Ok(());
                }
                // Past the inline limit: what came so far goes first.
                let mut first = std::mem::take(buf);
                first.extend_from_slice(&data);
                *self = Self::spool(store)?;
                first
            }
            Self::Spool { .. } => data,
        };
        if let Self::Spool { spool, out } = self {
            out.write_all(&data)
                .await
                .map_err(|source| StoreError::Io {
                    op: "write",
                    path: spool.path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Everything written (a spool file flushed and fsynced), ready for
    /// [`Store::accept`].
    pub(crate) async fn finish(self) -> Result<Ciphertext, Error> {
        match self {
            Self::Memory { buf, .. } => Ok(Ciphertext::Inline(buf)),
            Self::Spool { spool, mut out } => {
                let io = |op, source| StoreError::Io {
                    op,
                    path: spool.path.clone(),
                    source,
                };
                out.flush().await.map_err(|e| io("write", e))?;
                // Durable before the receiver dates its custody receipt.
                out.into_inner()
                    .sync_all()
                    .await
                    .map_err(|e| io("fsync", e))?;
                crate::failpoints::synced(&spool.path);
                Ok(Ciphertext::Spooled(spool))
            }
        }
    }
}
