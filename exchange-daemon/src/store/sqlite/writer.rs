//! The group-commit writer: one thread that owns the write connection and
//! commits the queued operations in batches (see "Group commit" in the
//! [module documentation](super)).

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::sqlite_error;
use crate::error::StoreError;

/// Most operations the writer commits in one transaction.
pub const MAX_BATCH: usize = 256;

/// Write operations that may wait for the writer beyond the batch it is
/// running. A caller finding the queue full waits (asynchronously, in
/// order) for a place, so a burst of writes holds at most this many
/// operations, each with its row (an inline ciphertext is at most
/// `limits.inline_ciphertext_bytes`), in memory. One full batch: when the
/// writer commits, the next batch is ready, so the bound costs no
/// throughput (a transaction takes at most [`MAX_BATCH`] anyway).
pub const WRITER_QUEUE: usize = MAX_BATCH;

/// Counters of the writer thread (metrics, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Write operations handed to the writer since open.
    pub ops_submitted: u64,
    /// Transactions the writer committed since open (one per batch).
    pub transactions_committed: u64,
}

/// Hands `work` to the writer through `tx` (see [`SqliteStore::submit`](super::SqliteStore::submit)).
/// Once sent, the job runs and commits whether or not its answer is awaited.
pub(super) async fn submit_to<T, F>(
    tx: &tokio::sync::mpsc::Sender<Box<dyn Job>>,
    submitted: &AtomicU64,
    work: F,
) -> Result<Result<T, StoreError>, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    let (reply, rx) = oneshot::channel();
    let job: Box<dyn Job> = Box::new(Pending {
        work: Some(Box::new(work)),
        out: None,
        reply: Some(reply),
    });
    // Waits for a place when the queue is full (backpressure).
    tx.send(job).await.map_err(|_| StoreError::Closed)?;
    submitted.fetch_add(1, Ordering::Relaxed);
    rx.await.map_err(|_| StoreError::Closed)?
}

/// One write operation queued for the writer.
pub(super) trait Job: Send {
    /// Runs the operation inside the batch transaction and keeps its
    /// result; true if it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller once the batch is settled: `None` if it committed,
    /// else why not.
    fn reply(self: Box<Self>, batch: Option<&rusqlite::Error>);
}

type Work<T> = Box<dyn FnOnce(&Connection) -> Result<T, StoreError> + Send>;
type Reply<T> = oneshot::Sender<Result<Result<T, StoreError>, StoreError>>;

struct Pending<T> {
    work: Option<Work<T>>,
    out: Option<Result<T, StoreError>>,
    reply: Option<Reply<T>>,
}

impl<T: Send> Job for Pending<T> {
    fn run(&mut self, conn: &Connection) -> bool {
        let out = match self.work.take() {
            // A panicking operation fails alone: its savepoint is rolled
            // back like any failing operation's, and the writer goes on.
            Some(work) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(conn))) {
                    Ok(out) => out,
                    Err(panic) => {
                        let why = panic_text(panic.as_ref());
                        tracing::error!(panic = %why, "a store write operation panicked; it alone is undone");
                        Err(StoreError::Panicked(why))
                    }
                }
            }
            None => Err(StoreError::Corrupt("write operation run twice".into())),
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn reply(mut self: Box<Self>, batch: Option<&rusqlite::Error>) {
        let answer = match batch {
            None => Ok(self
                .out
                .take()
                .unwrap_or_else(|| Err(StoreError::Corrupt("write operation not run".into())))),
            Some(e) => Err(sqlite_error(e)),
        };
        if let Some(reply) = self.reply.take() {
            // The caller may have gone away; its operation stands.
            let _ = reply.send(answer);
        }
    }
}

/// What a panic said, for the log and the caller's error.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    };
    exchange_core::audit::log_text(&text, 512)
}

/// The writer thread: runs [`writer_loop`] until the store is dropped. If
/// it dies instead (a panic outside any one operation), the queue is
/// closed, so every caller gets [`StoreError::Closed`], and `failed` says
/// why (the daemon then reports NOT_SERVING and exits).
pub(super) fn writer_thread(
    conn: Connection,
    mut rx: tokio::sync::mpsc::Receiver<Box<dyn Job>>,
    committed: &AtomicU64,
    failed: &tokio::sync::watch::Sender<Option<String>>,
) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        writer_loop(&conn, &mut rx, committed);
    }));
    if let Err(panic) = outcome {
        drop(rx);
        let why = format!("the store writer stopped: {}", panic_text(panic.as_ref()));
        tracing::error!(error = %why, "store writer died; no write can be made");
        failed.send_replace(Some(why));
    }
}

fn writer_loop(
    conn: &Connection,
    rx: &mut tokio::sync::mpsc::Receiver<Box<dyn Job>>,
    committed: &AtomicU64,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match run_batch(conn, &mut batch) {
            Ok(()) => {
                crash_point!("store::after-commit");
                committed.fetch_add(1, Ordering::Relaxed);
                for job in batch {
                    job.reply(None);
                }
            }
            Err(e) => {
                for job in batch {
                    job.reply(Some(&e));
                }
            }
        }
    }
}

/// Runs `batch` in one transaction, one savepoint per job, and commits.
/// On error nothing of the batch is committed (or, if COMMIT itself failed,
/// the outcome is unknown).
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), rusqlite::Error> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = batch
        .iter_mut()
        .try_for_each(|job| run_one(conn, job.as_mut()))
        .and_then(|()| {
            crash_point!("store::before-commit");
            conn.execute_batch("COMMIT")
        });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn run_one(conn: &Connection, job: &mut dyn Job) -> Result<(), rusqlite::Error> {
    conn.execute_batch("SAVEPOINT op")?;
    if job.run(conn) {
        conn.execute_batch("RELEASE op")
    } else if conn.is_autocommit() {
        // Some errors (disk full, I/O) make SQLite roll back the whole
        // transaction: the jobs before this one are lost too.
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
            Some("transaction rolled back by a failing operation".into()),
        ))
    } else {
        conn.execute_batch("ROLLBACK TO op; RELEASE op")
    }
}
