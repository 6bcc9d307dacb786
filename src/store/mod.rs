//! The store: one directory per transfer (FORMAT.md), opened by [`StoreBuilder`]; every
//! lifecycle change runs in one compare-and-set transaction on the transfer's state file
//! ([`update`]). This module holds the handle, the part of it the background flusher shares,
//! and the checks of names and requests every entry point runs.

mod apply;
mod batch;
mod check;
mod commit;
mod create;
mod downloads;
mod group;
#[cfg(test)]
mod group_tests;
mod indexed;
mod lifecycle;
mod open;
mod progress;
mod read;
mod remove;
#[cfg(test)]
mod tests;
mod update;

pub use apply::ApplyReport;
pub use batch::{Batch, Changed};
pub use check::{CheckReport, GcReport, RecordPart, RepairReport, Stats, Unreadable};
pub use downloads::MAX_RESUME_BYTES;
pub use group::{GroupClaim, GroupSummary};
pub use lifecycle::{CancelResult, Completion, ErrorClass, FailResult, MAX_ERROR_BYTES};
pub use open::{OpenReport, StoreBuilder};
pub use read::{Filter, Scan};

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::error::{Corruption, Error, Result};
use crate::format::manifest;
use crate::fs::Fs;
use crate::layout::{self, MANIFEST};
use crate::state_file::{Locked, StateFiles};
use crate::transfer::{Manifest, Request, TransferId};
use progress::{Flusher, PendingProgress};

/// The longest session, group name, idempotency key, tag or header name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 100;

/// How often a handle read the index, and how often it rebuilt it.
#[derive(Debug, Default)]
pub(crate) struct IndexTally {
    pub(crate) read: std::sync::atomic::AtomicU64,
    pub(crate) rebuilt: std::sync::atomic::AtomicU64,
    /// Syncs that wrote the journal's changes into the index.
    pub(crate) checkpoints: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
pub(super) struct TaskMap {
    by_task: HashMap<(String, u64), TransferId>,
    by_tag: HashMap<String, TransferId>,
}

/// A handle on one store directory. `Send + Sync`; one long-lived handle per process is the
/// normal use. Several processes may open the same store at once.
pub struct Store {
    pub(crate) core: Arc<Core>,
    cfg: StoreBuilder,
    /// Platform task and tag to transfer, for the lookups of [`Store::find_by_task`].
    tasks: Mutex<TaskMap>,
    /// The derived index, while this handle holds it.
    pub(crate) index: Mutex<Option<crate::index::Index>>,
    /// How often this handle read the index, rebuilt it from the directories, and wrote the
    /// journal's changes into it.
    pub(crate) index_tally: IndexTally,
    report: OpenReport,
    /// Started at the first coalesced report (`None` inside when it could not start).
    flusher: std::sync::OnceLock<Option<Flusher>>,
}

/// The part of a store the background flusher shares: enough to write one transfer's state.
#[derive(Debug)]
pub(crate) struct Core {
    root: PathBuf,
    pub(crate) fs: Fs,
    flush_interval: Duration,
    manifests: Mutex<HashMap<TransferId, Arc<Manifest>>>,
    pending: Mutex<HashMap<TransferId, PendingProgress>>,
    /// The state files: their locks, and those kept open between updates.
    states: StateFiles,
    /// The change journal (real file system only; `None` where this system cannot tell its
    /// boots apart, or on a store opened read-only without one).
    pub(crate) journal: Option<crate::index::Journal>,
    /// How many transfers one shared flush of a group commit covers at most (each keeps its
    /// state file open and locked until the flush): `fs::group_file_budget`.
    pub(crate) group_part: usize,
    /// Threads a large group commit locks and writes on ([`StoreBuilder::batch_threads`]).
    pub(crate) group_threads: usize,
    /// The fewest written files a group commit syncs with one `syncfs`.
    pub(crate) shared_sync_min: usize,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.core.root)
            .finish_non_exhaustive()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    pub(crate) fn transfer_dir(&self, id: TransferId) -> PathBuf {
        layout::transfer_dir(&self.root, id)
    }

    /// The manifest of `id`, from the cache or from disk.
    pub(crate) fn manifest(&self, id: TransferId) -> Result<Arc<Manifest>> {
        if let Some(m) = lock(&self.manifests).get(&id) {
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(self.load_manifest(id)?);
        lock(&self.manifests).insert(id, Arc::clone(&m));
        Ok(m)
    }

    /// Reads and checks the manifest from disk, bypassing the cache.
    pub(crate) fn load_manifest(&self, id: TransferId) -> Result<Manifest> {
        let dir = self.checked_dir(id)?;
        let path = dir.join(MANIFEST);
        let bytes = match self.fs.read_bounded(&path, manifest::MAX_FILE) {
            Err(e) if e.is_not_found_io() => {
                // Gone with its directory (a concurrent removal) is not corruption.
                self.checked_dir(id)?;
                return Err(Error::corrupt(
                    &path,
                    Corruption::Truncated {
                        needed: manifest::HEADER_LEN as u64,
                        found: 0,
                    },
                ));
            }
            r => r?,
        };
        let m = manifest::decode(&path, &bytes)?;
        if m.id != id {
            return Err(Error::corrupt(
                &path,
                Corruption::IdMismatch {
                    expected: id,
                    found: m.id,
                },
            ));
        }
        Ok(m)
    }

    /// The transfer's directory, checked to be a real directory (never followed through a
    /// symlink). A missing directory is `NotFound` and evicts the cached manifest.
    pub(crate) fn checked_dir(&self, id: TransferId) -> Result<PathBuf> {
        self.checked_dir_meta(id).map(|(dir, _)| dir)
    }

    /// [`Store::checked_dir`], with the directory's metadata.
    pub(crate) fn checked_dir_meta(&self, id: TransferId) -> Result<(PathBuf, crate::fs::Meta)> {
        let dir = self.transfer_dir(id);
        match self.fs.lstat(&dir) {
            Ok(m) if m.is_dir() => Ok((dir, m)),
            Ok(m) => Err(Error::corrupt(
                &dir,
                Corruption::WrongType {
                    found: if m.is_symlink() {
                        "symbolic link".into()
                    } else {
                        "not a directory".into()
                    },
                },
            )),
            Err(e) if e.is_not_found_io() => {
                lock(&self.manifests).remove(&id);
                Err(Error::not_found(format!("transfer {id}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Opens the transfer's state file and takes its lock ([`StateFiles::lock`]).
    pub(crate) fn lock_state(&self, id: TransferId) -> Result<Locked> {
        self.states.lock(&self.fs, &self.transfer_dir(id), || {
            self.checked_dir_meta(id)
        })
    }

    /// Closes the state file kept open for `id`, if any (its directory is going away).
    pub(crate) fn forget_state(&self, id: TransferId) {
        self.states.forget(id);
    }
}

impl Store {
    pub(crate) fn transfer_dir(&self, id: TransferId) -> PathBuf {
        self.core.transfer_dir(id)
    }

    pub(crate) fn manifest(&self, id: TransferId) -> Result<Arc<Manifest>> {
        self.core.manifest(id)
    }

    pub(super) fn checked_dir(&self, id: TransferId) -> Result<PathBuf> {
        self.core.checked_dir(id)
    }

    pub(crate) fn lock_state(&self, id: TransferId) -> Result<Locked> {
        self.core.lock_state(id)
    }
}

pub(super) fn check_name(what: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes, got {}",
            s.len()
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "{what} {s:?} contains control characters"
        )));
    }
    Ok(())
}

pub(super) fn check_request(r: &Request) -> Result<()> {
    if r.url.is_empty() {
        return Err(Error::invalid("the URL is empty"));
    }
    check_name("the method", &r.method)?;
    for h in &r.headers {
        check_name("a header name", &h.name)?;
        if h.value.contains(['\r', '\n']) {
            return Err(Error::invalid(format!(
                "header {} contains a line break",
                h.name
            )));
        }
    }
    Ok(())
}

impl Store {
    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.core.root.join(name)
    }

    pub(crate) fn lock_timeout(&self) -> Duration {
        self.cfg.lock_timeout
    }

    pub(crate) fn now(&self) -> SystemTime {
        (self.cfg.clock)()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(f) = self.flusher.take().flatten() {
            f.stop();
        }
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "coalesced progress not flushed at close");
        }
        self.release_index();
    }
}
