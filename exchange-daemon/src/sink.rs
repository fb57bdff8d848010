//! Where incoming ciphertext goes while a stream is received: memory for
//! small envelopes, a spool file (written on a blocking thread) for large
//! ones. Nothing here is durable; [`crate::store::Store::accept`] makes it so.

use std::io::Write;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

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
        tx: mpsc::Sender<Vec<u8>>,
        writer: JoinHandle<Result<SpoolFile, StoreError>>,
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
            return Self::spool(&store, Vec::new());
        }
        Ok(Self::Memory {
            buf: Vec::with_capacity(usize::try_from(expected).unwrap_or(0)),
            limit: inline_limit,
            store,
        })
    }

    fn spool(store: &Arc<dyn Store>, first: Vec<u8>) -> Result<Self, Error> {
        let spool = store.spool()?;
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let writer = tokio::task::spawn_blocking(move || {
            let io = |source| StoreError::Io {
                op: "write",
                path: spool.path.clone(),
                source,
            };
            let mut w = std::io::BufWriter::with_capacity(256 * 1024, &spool.file);
            w.write_all(&first).map_err(io)?;
            while let Some(data) = rx.blocking_recv() {
                w.write_all(&data).map_err(io)?;
            }
            w.flush().map_err(io)?;
            drop(w);
            // Durable before the receiver dates its custody receipt.
            spool.file.sync_all().map_err(|source| StoreError::Io {
                op: "fsync",
                path: spool.path.clone(),
                source,
            })?;
            Ok(spool)
        });
        Ok(Self::Spool { tx, writer })
    }

    /// Appends `data`.
    pub(crate) async fn write(&mut self, data: Vec<u8>) -> Result<(), Error> {
        match self {
            Self::Memory { buf, limit, store } => {
                if (buf.len() + data.len()) as u64 > *limit {
                    let mut first = std::mem::take(buf);
                    first.extend_from_slice(&data);
                    *self = Self::spool(store, first)?;
                } else {
                    buf.extend_from_slice(&data);
                }
                Ok(())
            }
            Self::Spool { tx, .. } => {
                if tx.send(data).await.is_err() {
                    // The writer stopped early: its error is reported by `finish`.
                    return Ok(());
                }
                Ok(())
            }
        }
    }

    /// Everything written (a spool file flushed and fsynced), ready for
    /// [`Store::accept`].
    pub(crate) async fn finish(self) -> Result<Ciphertext, Error> {
        match self {
            Self::Memory { buf, .. } => Ok(Ciphertext::Inline(buf)),
            Self::Spool { tx, writer } => {
                drop(tx);
                let spool = writer
                    .await
                    .map_err(|_| Error::Store(StoreError::Closed))??;
                Ok(Ciphertext::Spooled(spool))
            }
        }
    }
}
