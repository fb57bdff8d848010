//! Crash points for the crash tests, compiled only with the `failpoints`
//! feature (which the tests turn on; a release build never has it). Without
//! the feature [`crash_point!`] expands to nothing and the bookkeeping
//! functions below are empty.
//!
//! With the feature, `exchanged` reads the `FAILPOINTS` environment variable
//! at start (`fail::FailScenario`), e.g.
//! `FAILPOINTS='store::after-commit=3*off->return(abort)'`: the fourth time
//! that point is reached the process ends there. Besides the `fail` crate's
//! own actions (`sleep(ms)`, `pause`, ...), a crash point understands two
//! arguments of `return`:
//!
//! * `return(abort)`: the process aborts at once, as a SIGKILL would end it
//!   there (the page cache survives, so everything written stays);
//! * `return(power-loss)`: first what a power cut would lose is thrown away
//!   (every spool file not yet fsynced is cut back to its fsynced length,
//!   and every blob link whose directory was not yet fsynced is removed),
//!   then the process aborts. SQLite's own files are not touched: it
//!   fsyncs its WAL at every commit (`synchronous = FULL`) and its
//!   recovery is its own to test.
//!
//! Either way a line `crash point NAME: ACTION` is written to stderr first.
//!
//! Points, in the order of one accept: `store::spool-fsynced` (a spooled
//! ciphertext is fsynced, not yet linked), `store::blob-linked` (linked into
//! `blobs/`, directory not yet fsynced), `store::blob-dir-synced` (before the
//! row is committed), `store::before-commit` and `store::after-commit` (every
//! writer transaction, around its COMMIT, before any caller is answered),
//! then `peer::deliver-reply` (a received envelope is stored, its receipt not
//! yet sent back), `client::send-reply` (a Send is stored, its id not yet
//! returned), `delivery::answered` (a delivery attempt ended, answered or not;
//! its outcome and the receipts it brought not yet stored) and `peer::receipts-reply` (returned receipts
//! stored, not yet acknowledged).

#[cfg(feature = "failpoints")]
mod enabled {
    use std::collections::{HashMap, HashSet};
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    /// Files written but not fsynced (path, length at the last fsync), and
    /// links whose directory was not fsynced since.
    #[derive(Default)]
    struct Unsynced {
        files: HashMap<PathBuf, u64>,
        links: HashSet<PathBuf>,
    }

    static UNSYNCED: Mutex<Option<Unsynced>> = Mutex::new(None);

    fn with<T>(f: impl FnOnce(&mut Unsynced) -> T) -> T {
        let mut guard = UNSYNCED.lock().unwrap_or_else(PoisonError::into_inner);
        f(guard.get_or_insert_with(Unsynced::default))
    }

    pub(crate) fn created(path: &Path) {
        with(|u| u.files.insert(path.to_owned(), 0));
    }

    pub(crate) fn synced(path: &Path) {
        with(|u| u.files.remove(path));
    }

    pub(crate) fn forgotten(path: &Path) {
        with(|u| {
            u.files.remove(path);
            u.links.remove(path);
        });
    }

    pub(crate) fn linked(from: &Path, to: &Path) {
        with(|u| {
            // The new name reaches the same data, synced or not.
            if let Some(len) = u.files.get(from).copied() {
                u.files.insert(to.to_owned(), len);
            }
            u.links.insert(to.to_owned());
        });
    }

    pub(crate) fn dir_synced(path: &Path) {
        with(|u| u.links.remove(path));
    }

    /// Evaluates the crash point `name` (see the module docs).
    pub(crate) fn hit(name: &str) {
        let Some(action) = fail::eval(name, |arg| arg) else {
            return;
        };
        let action = action.unwrap_or_default();
        eprintln!("crash point {name}: {action}");
        if action == "power-loss" {
            with(|u| {
                for (path, len) in &u.files {
                    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
                        let _ = f.set_len(*len);
                    }
                }
                for path in &u.links {
                    let _ = std::fs::remove_file(path);
                }
            });
        }
        std::process::abort();
    }
}

#[cfg(feature = "failpoints")]
pub(crate) use enabled::{created, dir_synced, forgotten, hit, linked, synced};

/// A spool file was created (nothing of it is durable yet).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn created(_: &std::path::Path) {}

/// A file's data was fsynced.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn synced(_: &std::path::Path) {}

/// A file was removed, or a link undone.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn forgotten(_: &std::path::Path) {}

/// A hard link was made (its directory not yet fsynced).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn linked(_: &std::path::Path, _: &std::path::Path) {}

/// The directory of a link was fsynced.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn dir_synced(_: &std::path::Path) {}

/// A place where the crash tests may end the process (see the module docs).
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoints::hit($name);
    };
}
