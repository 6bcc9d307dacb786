//! The store: one directory per transfer, a two-slot state file, crash-safe creation and removal.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Corruption, Error, ErrorKind, Result};
use crate::format::index::IndexRecord;
use crate::format::{self, manifest};
use crate::fs::{self as wfs, Fs, Handle, Placed};
use crate::layout::{
    self, FORMAT_FILE, FORMAT_TEMP_PREFIX, LOCK_FILE, MANIFEST, PARTIAL, PAYLOAD, PAYLOAD_TEMP,
    QUARANTINE, RESUME, RESUME_TEMP, ROOT_DIRS, STAGING, STATE, TRANSFERS, TRASH,
};
use crate::state_file::{self, Locked, StateFiles};
use crate::transfer::{
    FailReason, Kind, LinkMode, Manifest, NewTransfer, Outcome, PayloadFacts, Phase, Request,
    State, TaskBinding, Transfer, TransferId, UploadSource,
};

/// The longest session, group name, idempotency key, tag or header name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 100;
/// The longest error text kept in the state; longer text is cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 1024;
/// The most threads a batch create uses by default.
const MAX_BATCH_THREADS: usize = 4;
/// Members per thread below which a batch create does not start another thread.
const MEMBERS_PER_THREAD: usize = 256;
/// The largest resume data accepted.
pub const MAX_RESUME_BYTES: u64 = 4 * 1024 * 1024;

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Options for opening a store. `Store::open(path)` is `Store::builder().open(path)`.
#[derive(Clone)]
pub struct StoreBuilder {
    lock_timeout: Duration,
    flush_interval: Duration,
    staging_grace: Duration,
    clock: Clock,
    create: bool,
    clear_debris: bool,
    background_flush: bool,
    shared_sync_min: usize,
    batch_threads: usize,
    open_budget: Option<usize>,
    hold_index: bool,
    journal_thresholds: crate::index::Thresholds,
    backend: Option<Arc<dyn crate::fs::Backend>>,
}

impl fmt::Debug for StoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreBuilder")
            .field("lock_timeout", &self.lock_timeout)
            .field("flush_interval", &self.flush_interval)
            .field("staging_grace", &self.staging_grace)
            .field("create", &self.create)
            .field("clear_debris", &self.clear_debris)
            .finish_non_exhaustive()
    }
}

impl Default for StoreBuilder {
    fn default() -> Self {
        StoreBuilder {
            lock_timeout: Duration::from_secs(5),
            flush_interval: Duration::from_secs(1),
            staging_grace: Duration::from_secs(60),
            clock: Arc::new(SystemTime::now),
            create: true,
            clear_debris: true,
            background_flush: true,
            shared_sync_min: 8,
            batch_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get().min(MAX_BATCH_THREADS)),
            open_budget: None,
            hold_index: true,
            journal_thresholds: crate::index::Thresholds::default(),
            backend: None,
        }
    }
}

impl StoreBuilder {
    /// How long an operation waits for a transfer's lock before failing with
    /// [`ErrorKind::Busy`]. Default 5 s. Locks are only ever held for one operation.
    pub fn lock_timeout(mut self, t: Duration) -> Self {
        self.lock_timeout = t;
        self
    }

    /// How often a transfer's coalesced progress is written and synced. Default 1 s.
    ///
    /// The guarantee, for [`Durability::Coalesced`](crate::Durability::Coalesced) reports:
    /// - a transfer's progress is written and synced **at most once per interval** by each store
    ///   handle (two processes reporting on one transfer each write it once per interval; lifecycle
    ///   changes are never coalesced: they are written at once, and carry the latest progress
    ///   with them);
    /// - a report is durable **within one interval** of being made (plus the time of the write
    ///   itself), written by the caller's thread when it is already due, else by a background
    ///   thread the store starts at its first coalesced report;
    /// - [`Store::flush`] writes every pending report now, and dropping the store does too.
    ///
    /// The background thread holds a transfer's lock only while it writes it, never while idle.
    pub fn flush_interval(mut self, t: Duration) -> Self {
        self.flush_interval = t;
        self
    }

    /// Whether a background thread writes coalesced progress once it is due (default true).
    /// Without it, a report is written by the next report on the same transfer once the
    /// interval has passed, by a lifecycle change, by [`Store::flush`] or when the store is
    /// dropped, and the "within one interval" bound of [`StoreBuilder::flush_interval`] does
    /// not hold. For callers that run their own timer, and for deterministic tests.
    pub fn background_flush(mut self, on: bool) -> Self {
        self.background_flush = on;
        self
    }

    /// How old an unlocked staging directory must be before `open` clears it, unless it shows
    /// work done under its builder's lock (then it is cleared at once). Default 60 s.
    ///
    /// A live builder always holds its lock and is never cleared; the grace only covers the
    /// instant between a builder creating its directory and locking its state file.
    pub fn staging_grace(mut self, t: Duration) -> Self {
        self.staging_grace = t;
        self
    }

    /// The clock used for created times and retry times. Default [`SystemTime::now`].
    pub fn clock(mut self, clock: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Whether `open` creates a store that does not exist yet. Default `true`. With `false`,
    /// opening a path without a store fails with [`ErrorKind::NotFound`] and creates nothing
    /// (what an inspection tool wants).
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Whether `open` clears debris no live process owns (unfinished creates in `staging/`,
    /// interrupted removals in `trash/`). Default `true`. With `false` (and
    /// [`StoreBuilder::create`] off), opening writes nothing: [`Store::check`] then reports
    /// the debris as it is.
    pub fn clear_debris(mut self, clear: bool) -> Self {
        self.clear_debris = clear;
        self
    }

    /// Whether this handle holds the store's index (`index.redb`, on by default) so listing and
    /// reconciling a large store read one file instead of every transfer directory. One
    /// process at a time can hold it; the others read the directories and record their
    /// changes for the holder in the journal. A handle opened with [`StoreBuilder::create`] off
    /// never holds it. See [`Store::release_index`].
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let app = waybill::Store::open(dir.path())?;
    /// let extension = waybill::Store::builder().index(false).open(dir.path())?;
    /// assert!(app.list(&waybill::Filter::all())?.is_empty());
    /// assert!(extension.list(&waybill::Filter::all())?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn index(mut self, hold: bool) -> Self {
        self.hold_index = hold;
        self
    }

    /// How many threads [`Store::create_batch`] builds a large batch on. Default: the
    /// machine's available parallelism, at most 4. Creating files and directories is mostly
    /// the kernel's work, which runs in parallel on separate directories; 1 builds every batch
    /// on the caller's thread. Only batches of at least 512 members synced with one file-system
    /// sync (Linux, Android) use more than one thread, and at most one per 256 members; the
    /// threads share the batch's bound on open files.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = waybill::Store::builder().batch_threads(1).open(dir.path())?;
    /// # drop(store); Ok(()) }
    /// ```
    pub fn batch_threads(mut self, n: usize) -> Self {
        self.batch_threads = n.max(1);
        self
    }

    /// The smallest batch that syncs with one file-system sync instead of file by file.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn shared_sync_min(mut self, n: usize) -> Self {
        self.shared_sync_min = n;
        self
    }

    /// The files a batch create may keep open, instead of [`wfs::open_file_budget`] (tests:
    /// batches of many parts without thousands of members).
    #[cfg(test)]
    pub(crate) fn open_budget(mut self, n: usize) -> Self {
        self.open_budget = Some(n);
        self
    }

    /// When the journal's changes are written into the index and the journal is cut back
    /// (tests: small values, so short sequences reach both).
    #[cfg(test)]
    pub(crate) fn journal_thresholds(mut self, checkpoint: u64, compact: u64) -> Self {
        self.journal_thresholds = crate::index::Thresholds {
            checkpoint,
            compact,
        };
        self
    }

    /// Routes every file system call through `b` (tests: fault injection).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn backend(mut self, b: Arc<dyn crate::fs::Backend>) -> Self {
        self.backend = Some(b);
        self
    }

    /// Opens the store at `root`, creating it if the directory is missing or empty (unless
    /// [`StoreBuilder::create`] is off).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when there is no store and creating is off;
    /// [`ErrorKind::UnsupportedVersion`] for a store written by a newer format,
    /// [`ErrorKind::Corrupt`] for a damaged `FORMAT` file, I/O errors.
    pub fn open(self, root: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(self, root.as_ref())
    }
}

/// What opening the store found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenReport {
    /// True when this open created the store.
    pub created: bool,
    /// Staging directories cleared (debris of creates that never finished).
    pub staging_cleared: Vec<String>,
    /// Staging directories left alone: held by a live builder, or younger than the staging
    /// grace (cleared by a later open if their builder is gone).
    pub staging_live: Vec<String>,
    /// Trash entries removed (interrupted removals).
    pub trash_cleared: Vec<String>,
    /// Entries under `transfers/` that are not canonical transfer directories. Reported, never
    /// deleted.
    pub unknown_entries: Vec<PathBuf>,
}

/// Everything under `transfers/`, as one listing.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Scan {
    /// Readable transfers, in id order.
    pub transfers: Vec<Transfer>,
    /// Transfers whose manifest failed its checks: quarantine them.
    pub corrupt: Vec<(TransferId, Error)>,
    /// Entries that are not canonical transfer directories.
    pub unknown: Vec<PathBuf>,
}

/// A filter for [`Store::list`]; every field set must match.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Filter {
    /// Only this phase.
    pub phase: Option<Phase>,
    /// Only this group.
    pub group: Option<String>,
    /// Only this session.
    pub session: Option<String>,
    /// Only this kind.
    pub kind: Option<Kind>,
}

impl Filter {
    /// Matches every transfer.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Only this phase.
    pub fn phase(mut self, p: Phase) -> Self {
        self.phase = Some(p);
        self
    }

    /// Only this group.
    pub fn group(mut self, g: impl Into<String>) -> Self {
        self.group = Some(g.into());
        self
    }

    /// Only this session.
    pub fn session(mut self, s: impl Into<String>) -> Self {
        self.session = Some(s.into());
        self
    }

    /// Only this kind.
    pub fn kind(mut self, k: Kind) -> Self {
        self.kind = Some(k);
        self
    }

    fn matches(&self, t: &Transfer) -> bool {
        self.phase.is_none_or(|p| t.state.phase == p)
            && self
                .group
                .as_ref()
                .is_none_or(|g| t.manifest.group.as_ref() == Some(g))
            && self
                .session
                .as_ref()
                .is_none_or(|s| &t.manifest.session == s)
            && self.kind.is_none_or(|k| t.manifest.kind == k)
    }
}

/// The answer of [`Store::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// This call recorded the outcome.
    Won(Outcome),
    /// The transfer had already ended; this is the outcome recorded then. Nothing was changed.
    Lost(Outcome),
}

/// How a failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May succeed later: count a failure and retry after a backoff.
    Transient,
    /// Will not succeed: give up now.
    Permanent,
    /// The server asked to retry after this time: count a failure and retry then.
    RetryAfter(SystemTime),
}

/// The answer of [`Store::fail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailResult {
    /// Recreate the task at this time.
    RetryAt(SystemTime),
    /// The transfer failed for good (permanent error or retry policy spent).
    GaveUp,
    /// The transfer had already ended; nothing was changed.
    AlreadyEnded(Outcome),
}

/// The answer of [`Store::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResult {
    /// Cancelled now; cancel this platform task too, if any.
    Cancelled {
        /// The task that was bound.
        task: Option<TaskBinding>,
    },
    /// The transfer had already ended (or was cancelled before); nothing was changed.
    AlreadyEnded(Outcome),
}

#[derive(Debug, Clone, Copy)]
struct PendingProgress {
    done: u64,
    total: Option<u64>,
    dirty: bool,
    last_flush: Instant,
}

/// How often a handle read the index, and how often it rebuilt it.
#[derive(Debug, Default)]
pub(crate) struct IndexTally {
    pub(crate) read: std::sync::atomic::AtomicU64,
    pub(crate) rebuilt: std::sync::atomic::AtomicU64,
    /// Syncs that wrote the journal's changes into the index.
    pub(crate) checkpoints: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct TaskMap {
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

/// The background thread that writes coalesced progress once it is due.
#[derive(Debug)]
struct Flusher {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(core: Arc<Core>) -> Option<Flusher> {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("waybill-flush".into())
            .spawn(move || {
                let (m, cv) = &*signal;
                loop {
                    let wait = core.flush_due().unwrap_or(core.flush_interval);
                    let g = lock(m);
                    if *g {
                        break;
                    }
                    let (g, _) = cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner());
                    if *g {
                        break;
                    }
                }
            });
        match thread {
            Ok(t) => Some(Flusher {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the progress flusher; coalesced progress is written by later reports, flush() and drop");
                None
            }
        }
    }

    fn stop(mut self) {
        let (m, cv) = &*self.stop;
        *lock(m) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the progress flusher panicked");
        }
    }
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
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.core.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    /// True when `p` is dirty and its last write is at least one interval old; then the write
    /// is claimed (its time set to now) so no other thread writes the same transfer within the
    /// interval.
    fn claim_if_due(&self, p: &mut PendingProgress) -> bool {
        if p.dirty && p.last_flush.elapsed() >= self.flush_interval {
            p.last_flush = Instant::now();
            return true;
        }
        false
    }

    /// Writes one transfer's pending progress. A transfer that is gone is forgotten.
    fn flush_one(&self, id: TransferId) -> Result<()> {
        match self.modify_with(id, "flush progress", true, |_, _, _| Ok(((), false))) {
            Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                lock(&self.pending).remove(&id);
                Ok(())
            }
            r => r,
        }
    }

    /// The background flusher's step: writes every report that is due, then says how long
    /// until the next one is (`None` when nothing is pending). Errors are logged; a failed
    /// sync poisons the store, so the caller's next call reports it.
    fn flush_due(&self) -> Option<Duration> {
        let mut due: Vec<TransferId> = {
            let mut g = lock(&self.pending);
            g.iter_mut()
                .filter_map(|(id, p)| self.claim_if_due(p).then_some(*id))
                .collect()
        };
        due.sort_unstable();
        for id in due {
            if let Err(e) = self.flush_one(id) {
                tracing::warn!(transfer = %id, error = %e, "background flush of coalesced progress failed");
            }
        }
        lock(&self.pending)
            .values()
            .filter(|p| p.dirty)
            .map(|p| self.flush_interval.saturating_sub(p.last_flush.elapsed()))
            .min()
    }

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

    /// Journals what `id` is now (its newest state slot `state`), under its lock, with the
    /// hold its intent began.
    fn journal_entry(
        &self,
        held: Option<crate::index::Held<'_>>,
        id: TransferId,
        manifest: &Manifest,
        dir: &Path,
        state: Vec<u8>,
    ) {
        if let Some(h) = held {
            let resume = manifest.kind == Kind::Download
                && self.fs.lstat(&dir.join(RESUME)).is_ok_and(|m| m.is_file());
            h.entry(
                id,
                &crate::format::index::EntryBody {
                    state,
                    resume,
                    manifest: None,
                },
            );
        }
    }

    /// [`Store::modify`]; `merge_pending` says whether coalesced progress rides along.
    pub(crate) fn modify_with<R>(
        &self,
        id: TransferId,
        op: &'static str,
        merge_pending: bool,
        f: impl FnOnce(&Manifest, &mut State, &Path) -> Result<(R, bool)>,
    ) -> Result<R> {
        self.fs.check()?;
        let manifest = self.manifest(id)?;
        let dir_path = self.transfer_dir(id);
        let locked = self
            .states
            .lock_for_update(&self.fs, id, &dir_path, || self.checked_dir_meta(id))?;
        let dir = &locked.dir;
        let held = match &self.journal {
            Some(j) => j.intent_held(&self.root, id)?,
            None => None,
        };
        let slots = locked.read(&self.fs, id)?;
        let newest = slots.newest;
        let mut state = slots.state.clone();
        if newest.is_none() {
            tracing::warn!(transfer = %id, "no valid state slot; state rebuilt from the manifest");
        }
        let pending = if merge_pending {
            lock(&self.pending).get(&id).copied().filter(|p| p.dirty)
        } else {
            None
        };
        let mut changed = false;
        if let Some(p) = pending
            && !state.phase.is_terminal()
            && (p.done, p.total) != (state.bytes_done, state.bytes_total)
        {
            state.bytes_done = p.done;
            state.bytes_total = p.total.or(state.bytes_total);
            changed = true;
        }
        let (answer, f_changed) = f(&manifest, &mut state, dir)?;
        let mut keep = false;
        if changed || f_changed {
            let enc = locked.write_next(&self.fs, newest, &state)?;
            self.journal_entry(held, id, &manifest, dir, enc);
            tracing::debug!(transfer = %id, op, phase = %state.phase, "state written");
            keep = true;
        } else {
            // `f` may have changed files (resume data) or moved the directory away (a purge):
            // an entry only for a directory still in place; the intent covers the rest.
            if held.is_some() && self.fs.lstat(dir).is_ok_and(|m| m.is_dir()) {
                self.journal_entry(held, id, &manifest, dir, slots.newest_bytes());
            }
            tracing::debug!(transfer = %id, op, "no change");
        }
        if let Some(p) = pending {
            let mut g = lock(&self.pending);
            if let Some(cur) = g.get_mut(&id)
                && (cur.done, cur.total) == (p.done, p.total)
            {
                cur.dirty = false;
                cur.last_flush = Instant::now();
            }
        }
        if keep {
            self.states.keep(&self.fs, id, locked);
        }
        Ok(answer)
    }
}

impl Store {
    pub(crate) fn transfer_dir(&self, id: TransferId) -> PathBuf {
        self.core.transfer_dir(id)
    }

    pub(crate) fn manifest(&self, id: TransferId) -> Result<Arc<Manifest>> {
        self.core.manifest(id)
    }

    fn checked_dir(&self, id: TransferId) -> Result<PathBuf> {
        self.core.checked_dir(id)
    }

    pub(crate) fn lock_state(&self, id: TransferId) -> Result<Locked> {
        self.core.lock_state(id)
    }

    pub(crate) fn modify_with<R>(
        &self,
        id: TransferId,
        op: &'static str,
        merge_pending: bool,
        f: impl FnOnce(&Manifest, &mut State, &Path) -> Result<(R, bool)>,
    ) -> Result<R> {
        self.core.modify_with(id, op, merge_pending, f)
    }
}

/// What one create call has learned of the file system: each upload source resolved, and the
/// device `staging/` is on.
#[derive(Debug, Default, Clone)]
struct Sources {
    resolved: HashMap<PathBuf, (PathBuf, wfs::Meta)>,
    staging_dev: Option<u64>,
}

/// What every share of one batch create has in common.
struct Batch<'a> {
    now: SystemTime,
    /// Synced with one file-system sync per part instead of file by file.
    shared: bool,
    part_len: usize,
    /// Set by the first share that fails, so the others stop at their next part.
    stop: &'a AtomicBool,
}

/// What one share of a batch create did.
struct BatchRun {
    /// Members renamed into `transfers/`, in order.
    moved: Vec<TransferId>,
    manifests: Vec<(TransferId, Manifest)>,
    failed: Option<Error>,
    /// Stopped early because another share failed.
    stopped: bool,
}

/// A file of a staged transfer that must be synced.
struct ToSync {
    file: Handle,
    path: PathBuf,
    /// Written by the build (not a linked file of the caller's, whose cached pages the early
    /// write-back must not drop).
    written: bool,
}

/// A transfer built in `staging/`, not yet visible.
struct Staged {
    id: TransferId,
    dir: PathBuf,
    /// The state file, locked for as long as the build runs so no cleaner takes the directory.
    state: Handle,
    /// Files whose data must be synced before the directory becomes visible, in the order
    /// they were written (the state last).
    to_sync: Vec<ToSync>,
    manifest: Manifest,
    /// The manifest file and the first state slot as written, for the journal.
    files: (Vec<u8>, Vec<u8>),
}

fn check_name(what: &str, s: &str) -> Result<()> {
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

fn check_request(r: &Request) -> Result<()> {
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

/// Records a replacement request (secret values dropped), keeping room in the state slot for
/// the largest terminal state (an error text in both `last_error` and the outcome), so the
/// transfer can always fail or be cancelled later.
fn set_request(s: &mut State, mut r: Request) -> Result<()> {
    for h in &mut r.headers {
        if h.secret {
            h.value.clear();
        }
    }
    s.current_request = Some(r);
    let mut worst = s.clone();
    let text = "x".repeat(MAX_ERROR_BYTES);
    worst.last_error = Some(text.clone());
    worst.outcome = Some(Outcome::Failed {
        reason: FailReason::GaveUp,
        error: text,
    });
    state_file::check_fits(&worst)
}

fn truncate_text(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

impl Store {
    /// Opens the store at `root` with default options, creating it if needed.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = waybill::Store::open(dir.path())?;
    /// assert!(store.open_report().created);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// See [`StoreBuilder::open`].
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        Store::builder().open(root)
    }

    /// Options for opening a store.
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.core.root
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.core.root.join(name)
    }

    pub(crate) fn lock_timeout(&self) -> Duration {
        self.cfg.lock_timeout
    }

    pub(crate) fn now(&self) -> SystemTime {
        (self.cfg.clock)()
    }

    fn open_with(cfg: StoreBuilder, root: &Path) -> Result<Store> {
        let fs = cfg.backend.clone().map_or_else(Fs::real, Fs::new);
        let mut report = OpenReport::default();
        if !cfg.create {
            // Nothing is created: the root must be a directory holding a `FORMAT` file.
            let format_path = root.join(FORMAT_FILE);
            match fs.lstat(&format_path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Err(Error::corrupt(
                        &format_path,
                        crate::error::Corruption::WrongType {
                            found: "not a regular file".into(),
                        },
                    ));
                }
                Err(e) if e.is_not_found_io() => {
                    return Err(Error::not_found(format!("a store at {}", root.display())));
                }
                Err(e) => return Err(e),
            }
        }
        if fs.create_dir(root)?
            && let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty())
        {
            fs.sync_dir(parent)?;
        }
        let format_path = root.join(FORMAT_FILE);
        // Write to a unique temporary name, sync, then rename: racing creators write identical
        // bytes, so whichever rename lands last changes nothing.
        let write_format = || -> Result<()> {
            let tmp = root.join(format!("{FORMAT_TEMP_PREFIX}{}", TransferId::new_v4()));
            let f = fs.create_new(&tmp)?;
            fs.write_all(&f, &tmp, &format::encode_store_format())?;
            fs.sync_data(&f, &tmp)?;
            fs.rename(&tmp, &format_path)
        };
        let mut version = format::FORMAT_VERSION;
        match fs.read_bounded(&format_path, format::STORE_FORMAT_LEN as u64 * 4) {
            Ok(bytes) => {
                let found = format::decode_store_format(&format_path, &bytes)?;
                if !cfg.create {
                    version = found;
                }
                if found < format::FORMAT_VERSION && cfg.create {
                    // Format 2 adds the journal, which a format-1 build would not write to:
                    // from now on, such builds refuse this store (FORMAT.md §5).
                    write_format()?;
                    fs.sync_dir(root)?;
                    tracing::info!(root = %root.display(), from = found, to = format::FORMAT_VERSION, "store format upgraded");
                }
            }
            Err(e) if e.is_not_found_io() => {
                write_format()?;
                report.created = true;
                tracing::debug!(root = %root.display(), "created store");
            }
            Err(e) => return Err(e),
        }
        let lock_path = root.join(LOCK_FILE);
        // A store opened without `create` gets nothing created (not even a missing directory
        // or the lock file), so inspecting it writes nothing.
        let lock_file = if cfg.create {
            let mut made = false;
            for d in ROOT_DIRS {
                made |= fs.create_dir(&root.join(d))?;
            }
            let (f, lock_created) = fs.open_or_create(&lock_path)?;
            if made || lock_created || report.created {
                fs.sync_dir(root)?;
            }
            Some(f)
        } else if cfg.clear_debris {
            fs.open_rw(&lock_path).ok()
        } else {
            None
        };
        // A handle opened without `create` still changes transfers when asked to, so it
        // journals too: it creates the journal a format-2 store is missing (deleted by hand),
        // unless it cannot write there.
        let journal = if version >= 2 {
            match crate::index::Journal::open(
                fs.backend(),
                root,
                true,
                cfg.lock_timeout,
                cfg.journal_thresholds,
            ) {
                Ok(j) => j,
                Err(e) if !cfg.create => {
                    tracing::debug!(error = %e, "no journal for a handle opened without create");
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let core = Arc::new(Core {
            root: root.to_path_buf(),
            fs,
            flush_interval: cfg.flush_interval,
            manifests: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            states: StateFiles::new(cfg.lock_timeout),
            journal,
        });
        let mut store = Store {
            core,
            cfg,
            tasks: Mutex::new(TaskMap::default()),
            index: Mutex::new(None),
            index_tally: IndexTally::default(),
            report,
            flusher: std::sync::OnceLock::new(),
        };
        // One cleaner at a time: a process that finds the root lock taken skips cleaning, since
        // the holder is cleaning the same debris.
        if store.cfg.clear_debris
            && let Some(f) = &lock_file
            && store.core.fs.try_lock(f, &lock_path)?
        {
            let d = store.clear_debris()?;
            store.report.staging_cleared = d.staging_cleared;
            store.report.staging_live = d.staging_live;
            store.report.trash_cleared = d.trash_cleared;
        }
        match store.index_sync(crate::index::Sync::Refresh) {
            Some(l) => {
                let transfers = store.dir(TRANSFERS);
                // One plain name each: the index's bytes are not trusted to stay inside.
                store.report.unknown_entries = l
                    .unknown
                    .iter()
                    .filter(|n| {
                        let mut c = Path::new(n).components();
                        matches!(c.next(), Some(std::path::Component::Normal(_)))
                            && c.next().is_none()
                    })
                    .map(|n| transfers.join(n))
                    .collect();
            }
            None => store.scan_unknown()?,
        }
        drop(lock_file);
        Ok(store)
    }
}

/// What clearing debris did.
pub(crate) struct Debris {
    pub(crate) staging_cleared: Vec<String>,
    pub(crate) staging_live: Vec<String>,
    pub(crate) trash_cleared: Vec<String>,
}

impl Store {
    /// [`Store::clear_debris`] under the store's lock, waiting for it up to the lock timeout.
    pub(crate) fn clear_debris_locked(&self) -> Result<Debris> {
        let lock_path = self.core.root.join(LOCK_FILE);
        let (f, _) = self.core.fs.open_or_create(&lock_path)?;
        self.core.fs.lock(&f, &lock_path, self.cfg.lock_timeout)?;
        self.clear_debris()
    }

    /// Clears `staging/` debris that no live process owns, and interrupted removals in `trash/`.
    /// The caller holds the store's lock.
    fn clear_debris(&self) -> Result<Debris> {
        let staging = self.dir(STAGING);
        let mut cleared = Vec::new();
        let mut live = Vec::new();
        for e in self.core.fs.list(&staging)? {
            let name = e.name.to_string_lossy().into_owned();
            let path = staging.join(&e.name);
            if TransferId::parse_canonical(&name).is_none() || !e.is_dir || e.is_symlink {
                tracing::warn!(path = %path.display(), "unexpected entry in staging left alone");
                continue;
            }
            // Another process's work (a builder renaming, another cleaner) can make any step
            // fail; one entry never makes `open` fail.
            match self.clear_staged(&path) {
                Ok(true) => {
                    tracing::warn!(transfer = %name, "cleared staging debris of an unfinished create");
                    cleared.push(name);
                }
                Ok(false) => live.push(name),
                Err(e) if e.is_not_found_io() => {}
                Err(e) => {
                    tracing::warn!(transfer = %name, error = %e, "could not clear staging debris")
                }
            }
        }
        if !cleared.is_empty() {
            self.core.fs.sync_dir(&staging)?;
        }
        // A `FORMAT` being created by a process that died before its rename (young ones may
        // belong to a process creating the store right now).
        for e in self.core.fs.list(&self.core.root)? {
            let path = self.core.root.join(&e.name);
            if e.name.to_string_lossy().starts_with("FORMAT.tmp-")
                && !e.is_dir
                && self.older_than_grace(&path).unwrap_or(false)
                && let Err(e) = self.core.fs.remove_file(&path)
            {
                tracing::warn!(error = %e, "could not remove a FORMAT leftover");
            }
        }
        let trash = self.dir(TRASH);
        let mut trashed = Vec::new();
        for e in self.core.fs.list(&trash)? {
            let name = e.name.to_string_lossy().into_owned();
            if TransferId::parse_canonical(&name).is_none() {
                tracing::warn!(entry = %name, "unexpected entry in trash left alone");
                continue;
            }
            match self.core.fs.remove_tree(&trash.join(&e.name)) {
                Ok(()) => {
                    tracing::warn!(transfer = %name, "finished an interrupted removal");
                    trashed.push(name);
                }
                Err(e) => tracing::warn!(transfer = %name, error = %e, "could not clear trash"),
            }
        }
        Ok(Debris {
            staging_cleared: cleared,
            staging_live: live,
            trash_cleared: trashed,
        })
    }

    pub(crate) fn older_than_grace(&self, path: &Path) -> Result<bool> {
        let age = self
            .core
            .fs
            .lstat(path)?
            .modified()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .unwrap_or(Duration::ZERO);
        Ok(age >= self.cfg.staging_grace)
    }

    /// Clears one staging directory unless a live builder owns it. Returns whether it cleared.
    pub(crate) fn clear_staged(&self, path: &Path) -> Result<bool> {
        let state_path = path.join(STATE);
        // Hold the builder's lock (if we can take it) while deleting, so no builder can resume
        // in a directory being removed.
        let held = match self.core.fs.open_read(&state_path) {
            Ok(f) => {
                if !self.core.fs.try_lock(&f, &state_path)? {
                    return Ok(false);
                }
                Some(f)
            }
            Err(_) => None,
        };
        if (held.is_none() || !self.builder_locked_once(path)) && !self.older_than_grace(path)? {
            return Ok(false);
        }
        self.core.fs.remove_tree(path)?;
        Ok(true)
    }

    /// Whether a staging directory shows work its builder did only while holding the lock
    /// (FORMAT.md §3.1: the state file written, or a payload or manifest placed). Unlocked
    /// now, such a directory's builder is gone, whatever its age; the staging grace only
    /// covers the instant between creating the state file and locking it.
    pub(crate) fn builder_locked_once(&self, path: &Path) -> bool {
        let state_written = self
            .core
            .fs
            .lstat(&path.join(STATE))
            .is_ok_and(|m| m.is_file() && m.len() > 0);
        state_written
            || self.core.fs.lstat(&path.join(MANIFEST)).is_ok()
            || self.core.fs.lstat(&path.join(PAYLOAD)).is_ok()
    }

    fn scan_unknown(&mut self) -> Result<()> {
        let transfers = self.dir(TRANSFERS);
        for e in self.core.fs.list(&transfers)? {
            let ok = e.is_dir
                && !e.is_symlink
                && e.name
                    .to_str()
                    .and_then(TransferId::parse_canonical)
                    .is_some();
            if !ok {
                let p = transfers.join(&e.name);
                tracing::warn!(path = %p.display(), "entry under transfers/ is not a transfer; left alone");
                self.report.unknown_entries.push(p);
            }
        }
        Ok(())
    }

    /// Creates one transfer. When this returns `Ok`, the transfer survives a crash; if it does
    /// not return, no part of the transfer is visible after a crash.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{NewTransfer, Store, UploadSource};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let id = store.create(
    ///     NewTransfer::upload("https://example.com/u", UploadSource::Bytes(b"hello".to_vec()))
    ///         .secret_header("Authorization", "Bearer t0ken")
    ///         .meta("album", "holiday"),
    /// )?;
    /// let t = store.get(id)?;
    /// assert_eq!(t.manifest.payload.len(), 5);
    /// assert_eq!(t.manifest.request.headers[0].value, ""); // secrets never reach the disk
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a bad name, request or metadata; I/O errors (nothing
    /// is left visible then).
    pub fn create(&self, t: NewTransfer) -> Result<TransferId> {
        let ids = self.create_batch(vec![t])?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::invalid("empty batch"))
    }

    /// Creates many transfers in one call, sharing syncs: on Linux and Android a batch of 8 or
    /// more is made durable with one `syncfs` per part and one directory sync, instead of four
    /// syncs per transfer; elsewhere, and for smaller batches, the directory sync is shared. A
    /// batch of any size holds a bounded number of files open: it is built and renamed in parts
    /// (with `syncfs`, as many members as a quarter of the process's soft limit on open files,
    /// between 32 and 1,024; 16 when syncing file by file), so members of earlier parts can be
    /// seen by other readers before the call returns. A large batch is built on several threads
    /// (see [`StoreBuilder::batch_threads`]), which share that bound. Each transfer is whole or
    /// absent after a crash; on `Ok` all of them survive, and the ids come back in the order of
    /// `items`.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{NewTransfer, Store};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let ids = store.create_batch(
    ///     (0..100).map(|i| NewTransfer::download(format!("https://example.com/{i}"))).collect(),
    /// )?;
    /// assert_eq!(store.list(&waybill::Filter::all())?.len(), ids.len());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Store::create`]; on an error, no transfer of the batch is left visible. What the
    /// caller's input can make fail (names, requests, metadata, upload sources, hard links
    /// across file systems) fails before any part is renamed.
    pub fn create_batch(&self, items: Vec<NewTransfer>) -> Result<Vec<TransferId>> {
        self.core.fs.check()?;
        for t in &items {
            Self::validate(t)?;
        }
        let now = self.now();
        let staging = self.dir(STAGING);
        let shared = items.len() >= self.cfg.shared_sync_min
            && self.core.fs.can_sync_fs(&self.core.fs.open_dir(&staging)?);
        let threads = if shared {
            self.cfg
                .batch_threads
                .min(items.len() / MEMBERS_PER_THREAD)
                .max(1)
        } else {
            1
        };
        // Built and renamed in parts, so a batch of any size holds a bounded number of open
        // files (iOS allows 256 by default): a part keeps each member's locked state file
        // open, and, when syncing file by file, up to three more files per member. Threads
        // share the bound.
        let part_len = if shared {
            (self.cfg.open_budget.unwrap_or_else(wfs::open_file_budget) / threads).max(16)
        } else {
            16
        };
        let mut sources = Sources::default();
        if items.len() > part_len || threads > 1 {
            // Earlier parts (or another thread's) become visible before later ones are built:
            // check up front what a later build could refuse, so input errors fail the batch
            // before anything shows.
            for t in &items {
                self.precheck(t, now, &mut sources)?;
            }
        }
        let stop = AtomicBool::new(false);
        let job = Batch {
            now,
            shared,
            part_len,
            stop: &stop,
        };
        let runs = if threads == 1 {
            vec![self.create_parts(&job, items, sources)]
        } else {
            self.create_parallel(&job, items, &sources, threads)
        };
        let mut moved = Vec::with_capacity(runs.iter().map(|r| r.moved.len()).sum());
        let mut manifests = Vec::with_capacity(moved.capacity());
        let mut failed = None;
        let mut stopped = false;
        for r in runs {
            moved.extend(r.moved);
            manifests.extend(r.manifests);
            stopped |= r.stopped;
            if failed.is_none() {
                failed = r.failed;
            }
        }
        if stopped && failed.is_none() {
            // Only a failure stops a share; never left incomplete and called a success.
            failed = Some(Error::io(
                "create a batch in",
                &staging,
                std::io::Error::other("a share of the batch stopped early"),
            ));
        }
        if let Some(e) = failed {
            self.roll_back(&moved);
            return Err(e);
        }
        if let Err(e) = self.core.fs.sync_dir(&self.dir(TRANSFERS)) {
            // Not acknowledged: take the batch back out so an `Err` leaves nothing visible.
            self.roll_back(&moved);
            return Err(e);
        }
        let mut cache = lock(&self.core.manifests);
        for (id, m) in manifests {
            tracing::debug!(transfer = %id, kind = %m.kind, "created");
            cache.insert(id, Arc::new(m));
        }
        Ok(moved)
    }

    /// Builds `items` on `threads` threads, each taking a contiguous share, and returns their
    /// runs in the items' order. A share whose thread could not be started is built on the
    /// caller's thread.
    fn create_parallel(
        &self,
        job: &Batch<'_>,
        mut items: Vec<NewTransfer>,
        sources: &Sources,
        threads: usize,
    ) -> Vec<BatchRun> {
        let per = items.len().div_ceil(threads);
        let mut shares = Vec::with_capacity(threads);
        while items.len() > per {
            let rest = items.split_off(per);
            shares.push(items);
            items = rest;
        }
        shares.push(items);
        std::thread::scope(|scope| {
            let mut shares = shares.into_iter();
            let first = shares.next().unwrap_or_default();
            let mut started = Vec::with_capacity(threads);
            for share in shares {
                let (tx, rx) = std::sync::mpsc::channel();
                let theirs = sources.clone();
                let spawned = std::thread::Builder::new()
                    .name("waybill-batch".into())
                    .spawn_scoped(scope, move || {
                        let share = rx.recv().unwrap_or_default();
                        self.create_parts(job, share, theirs)
                    });
                match spawned {
                    Ok(h) => {
                        // Cannot fail: the thread waits for its share before anything else,
                        // so the receiver lives until it has it.
                        let _ = tx.send(share);
                        started.push(Ok(h));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "could not start a batch thread; building on the caller's");
                        started.push(Err(share));
                    }
                }
            }
            let mut runs = vec![self.create_parts(job, first, sources.clone())];
            for s in started {
                runs.push(match s {
                    Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    Err(share) => self.create_parts(job, share, sources.clone()),
                });
            }
            runs
        })
    }

    /// Builds, syncs and renames `items` into `transfers/` part by part, until done, failed, or
    /// another share of the batch failed. Members renamed before a failure are in the run's
    /// `moved`, for the caller to roll back with the rest of the batch.
    fn create_parts(
        &self,
        job: &Batch<'_>,
        items: Vec<NewTransfer>,
        mut sources: Sources,
    ) -> BatchRun {
        let staging = self.dir(STAGING);
        let transfers = self.dir(TRANSFERS);
        let mut run = BatchRun {
            moved: Vec::with_capacity(items.len()),
            manifests: Vec::with_capacity(items.len()),
            failed: None,
            stopped: false,
        };
        let fail = |run: &mut BatchRun, e: Error| {
            job.stop.store(true, Ordering::Relaxed);
            run.failed = Some(e);
        };
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            if job.stop.load(Ordering::Relaxed) {
                // Another share failed; the batch is rolled back whole.
                run.stopped = true;
                return run;
            }
            let part: Vec<NewTransfer> = items.by_ref().take(job.part_len).collect();
            let mut staged = Vec::with_capacity(part.len());
            // Opened before the part is written, so its `syncfs` reports any write-back error
            // that happens after this point.
            let sync_with = if job.shared {
                match self.core.fs.open_dir(&staging) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        fail(&mut run, e);
                        return run;
                    }
                }
            } else {
                None
            };
            let built = self
                .stage_all(part, job.now, sync_with.as_ref(), &mut sources, &mut staged)
                .and_then(|()| match &self.core.journal {
                    // Each member's lock is held from here until its entry is journaled.
                    Some(j) => j.intents(
                        &self.core.root,
                        &staged.iter().map(|s| s.id).collect::<Vec<_>>(),
                    ),
                    None => Ok(()),
                });
            if let Err(e) = built {
                for s in &staged {
                    let _ = self.core.fs.remove_tree(&s.dir);
                }
                fail(&mut run, e);
                return run;
            }
            for (i, s) in staged.iter().enumerate() {
                let to = transfers.join(s.id.to_string());
                if let Err(e) = self.core.fs.rename(&s.dir, &to) {
                    let rest: Vec<PathBuf> = staged.iter().skip(i).map(|s| s.dir.clone()).collect();
                    // Releases this part's locks, so the rollback can take each member's lock.
                    drop(staged);
                    for d in rest {
                        let _ = self.core.fs.remove_tree(&d);
                    }
                    fail(&mut run, e);
                    return run;
                }
                run.moved.push(s.id);
            }
            let mut bodies = Vec::with_capacity(staged.len());
            let mut locks = Vec::with_capacity(staged.len());
            for s in staged {
                let (manifest, state) = s.files;
                bodies.push((
                    s.id,
                    crate::format::index::EntryBody {
                        state,
                        resume: false,
                        manifest: Some(manifest),
                    },
                ));
                run.manifests.push((s.id, s.manifest));
                locks.push(s.state);
            }
            if let Some(j) = &self.core.journal {
                let items: Vec<_> = bodies.iter().map(|(id, b)| (*id, b)).collect();
                j.entries(&items);
            }
            // The members' locks are held until their entries are journaled.
            drop(locks);
        }
        run
    }

    /// Moves already-renamed members of a failed batch to `trash/` and deletes them. Failures
    /// are logged: the caller already has the error that made the batch fail.
    fn roll_back(&self, moved: &[TransferId]) {
        for id in moved {
            // Under the member's lock, so no update another process has under way is cut off.
            let r = self.core.lock_state(*id).and_then(|held| {
                let r = self.move_to_trash(*id);
                drop(held);
                r
            });
            let r = r.and_then(|()| {
                self.core
                    .fs
                    .remove_tree(&self.dir(TRASH).join(id.to_string()))
            });
            if let Err(e) = r {
                tracing::error!(transfer = %id, error = %e, "could not roll back a member of a failed batch create");
            }
        }
    }

    /// An upload source's absolute path and metadata, resolved once per create call: the
    /// members of a batch often name one file. What is linked is checked on the link itself
    /// (the payload's identity is read from the linked file), so a source replaced meanwhile
    /// is recorded as what it is, or refused.
    fn resolve_source(&self, sources: &mut Sources, path: &Path) -> Result<(PathBuf, wfs::Meta)> {
        if let Some(r) = sources.resolved.get(path) {
            return Ok(r.clone());
        }
        let r = self.core.fs.resolve(path)?;
        sources.resolved.insert(path.to_path_buf(), r.clone());
        Ok(r)
    }

    /// What `build` could refuse about `t` beyond [`Store::validate`]: an upload source that is
    /// missing or not a regular file, a hard link across file systems, a manifest over its
    /// size limit. Checked before a multi-part batch shows its first part.
    fn precheck(&self, t: &NewTransfer, now: SystemTime, sources: &mut Sources) -> Result<()> {
        let mut payload = PayloadFacts::None;
        if let Some(UploadSource::File { path, link }) = &t.source {
            let (_, meta) = self.resolve_source(sources, path)?;
            if !meta.is_file() {
                return Err(Error::invalid(format!(
                    "the upload source {} is not a regular file",
                    path.display()
                )));
            }
            let staging_dev = match sources.staging_dev {
                Some(d) => d,
                None => *sources
                    .staging_dev
                    .insert(self.core.fs.lstat(&self.dir(STAGING))?.dev),
            };
            if *link == LinkMode::HardLink && meta.dev != staging_dev {
                return Err(Error::invalid(format!(
                    "the upload source {} is on another file system; it cannot be hard-linked",
                    path.display()
                )));
            }
            payload = PayloadFacts::Linked {
                len: u64::MAX,
                dev: u64::MAX,
                ino: u64::MAX,
                mtime_ns: i128::MAX,
            };
        } else if let Some(UploadSource::Bytes(b)) = &t.source {
            payload = PayloadFacts::Written {
                len: b.len() as u64,
            };
        }
        let probe = Manifest {
            id: TransferId::from_bytes([0; 16]),
            kind: t.kind,
            session: t.session.clone(),
            request: t.request.clone(),
            group: t.group.clone(),
            created: now,
            deadline: t.deadline,
            retry: t.retry,
            payload,
            idempotency_key: t
                .idempotency_key
                .clone()
                .unwrap_or_else(|| TransferId::from_bytes([0; 16]).to_string()),
            metadata: t.metadata.clone(),
        };
        manifest::encode(&probe).map(|_| ())
    }

    fn validate(t: &NewTransfer) -> Result<()> {
        check_name("the session", &t.session)?;
        if let Some(g) = &t.group {
            check_name("the group", g)?;
        }
        if let Some(k) = &t.idempotency_key {
            check_name("the idempotency key", k)?;
        }
        check_request(&t.request)?;
        if t.retry.max_attempts == 0 {
            return Err(Error::invalid("max_attempts must be at least 1"));
        }
        match (t.kind, &t.source) {
            (Kind::Upload, None) => Err(Error::invalid("an upload needs a source")),
            (Kind::Download, Some(_)) => Err(Error::invalid("a download takes no source")),
            _ => Ok(()),
        }
    }

    /// Builds each item in `staging/` and makes it durable: file by file, or, given the
    /// `staging/` handle to sync through, with one sync of the whole file system (the files
    /// are then closed as soon as they are written; each member's locked state file stays open
    /// until it is renamed).
    fn stage_all(
        &self,
        items: Vec<NewTransfer>,
        now: SystemTime,
        sync_with: Option<&Handle>,
        sources: &mut Sources,
        staged: &mut Vec<Staged>,
    ) -> Result<()> {
        let shared = sync_with.is_some();
        for t in items {
            let id = TransferId::new_v4();
            let dir = self.dir(STAGING).join(id.to_string());
            self.core.fs.create_dir(&dir)?;
            match self.build(id, &dir, t, now, shared, sources) {
                Ok(mut s) => {
                    if shared {
                        s.to_sync.clear();
                    }
                    staged.push(s);
                }
                Err(e) => {
                    let _ = self.core.fs.remove_tree(&dir);
                    return Err(e);
                }
            }
        }
        // One sync of the whole file system also writes out other dirty data on it, so small
        // batches and single creates, often made beside a large download, sync file by file.
        if let Some(h) = sync_with {
            return self.core.fs.sync_fs(h, &self.dir(STAGING));
        }
        // Write-back of every file but the first to be synced starts now, so that first sync
        // writes all their data and the metadata their block allocations changed in one go
        // (one journal transaction, or one write of the inode-table block they share), and the
        // syncs after it find little left to write. Each file is still synced: the early start
        // is a hint that makes nothing durable.
        for t in staged
            .iter()
            .flat_map(|s| s.to_sync.iter().rev())
            .skip(1)
            .filter(|t| t.written)
        {
            self.core.fs.start_write_back(&t.file);
        }
        for s in staged.iter() {
            // The state first: it was written last, so its write-back has not started.
            for t in s.to_sync.iter().rev() {
                self.core.fs.sync_data(&t.file, &t.path)?;
            }
            self.core.fs.sync_dir(&s.dir)?;
        }
        Ok(())
    }

    fn build(
        &self,
        id: TransferId,
        dir: &Path,
        t: NewTransfer,
        now: SystemTime,
        shared: bool,
        sources: &mut Sources,
    ) -> Result<Staged> {
        let state_path = dir.join(STATE);
        let state = self.core.fs.create_new(&state_path)?;
        self.core
            .fs
            .lock(&state, &state_path, self.cfg.lock_timeout)?;
        let mut to_sync = Vec::new();
        let payload_path = dir.join(PAYLOAD);
        let payload = match t.source {
            None => PayloadFacts::None,
            Some(UploadSource::Bytes(bytes)) => {
                let f = self.core.fs.create_new(&payload_path)?;
                self.core.fs.write_all(&f, &payload_path, &bytes)?;
                to_sync.push(ToSync {
                    file: f,
                    path: payload_path,
                    written: true,
                });
                PayloadFacts::Written {
                    len: bytes.len() as u64,
                }
            }
            Some(UploadSource::File { path, link }) => {
                let (src, meta) = self.resolve_source(sources, &path)?;
                if !meta.is_file() {
                    return Err(Error::invalid(format!(
                        "the upload source {} is not a regular file",
                        path.display()
                    )));
                }
                // Synced with the whole file system, a linked file needs no handle: its
                // identity is read through the link, in this builder's locked directory.
                let (placed, f) = self.core.fs.link_or_copy(
                    &src,
                    &payload_path,
                    link != LinkMode::Copy,
                    link != LinkMode::HardLink,
                    !shared,
                )?;
                let (dev, ino, len, mtime_ns) = match &f {
                    Some(f) => self.core.fs.identity(f, &payload_path)?,
                    None => {
                        let m = self.core.fs.lstat(&payload_path)?;
                        (m.dev, m.ino, m.len, m.mtime_ns)
                    }
                };
                // A linked file's data must be durable too before the transfer is: the caller
                // may have written it moments ago. Syncing does not modify it.
                if let Some(f) = f {
                    to_sync.push(ToSync {
                        file: f,
                        path: payload_path,
                        written: placed == Placed::Copied,
                    });
                }
                match placed {
                    Placed::Linked => PayloadFacts::Linked {
                        len,
                        dev,
                        ino,
                        mtime_ns,
                    },
                    Placed::Copied => PayloadFacts::Copied { len },
                }
            }
        };
        let manifest = Manifest {
            id,
            kind: t.kind,
            session: t.session,
            request: t.request,
            group: t.group,
            created: now,
            deadline: t.deadline,
            retry: t.retry,
            payload,
            idempotency_key: t.idempotency_key.unwrap_or_else(|| id.to_string()),
            metadata: t.metadata,
        };
        let bytes = manifest::encode(&manifest)?;
        let mpath = dir.join(MANIFEST);
        // Cache exactly what a reader will decode (secret values dropped, times in ms).
        let stored = manifest::decode(&mpath, &bytes)?;
        let mf = self.core.fs.create_new(&mpath)?;
        self.core.fs.write_all(&mf, &mpath, &bytes)?;
        to_sync.push(ToSync {
            file: mf,
            path: mpath,
            written: true,
        });
        let slot = state_file::first_slot()?;
        self.core.fs.write_at(&state, &state_path, 0, &slot)?;
        if !shared {
            let sf = self.core.fs.dup(&state, &state_path)?;
            to_sync.push(ToSync {
                file: sf,
                path: state_path,
                written: true,
            });
        }
        Ok(Staged {
            id,
            dir: dir.to_path_buf(),
            state,
            to_sync,
            manifest: stored,
            files: (bytes, slot),
        })
    }

    fn read_state(&self, id: TransferId) -> Result<State> {
        let dir = self.checked_dir(id)?;
        let path = dir.join(STATE);
        let read = || -> Result<Vec<u8>> {
            match self.core.fs.open_read(&path) {
                Ok(f) => state_file::read_slots(&self.core.fs, &f, &path),
                // Missing state: the transfer is being removed (NotFound), or the file was lost
                // (rebuilt below).
                Err(e) if e.is_not_found_io() => self.checked_dir(id).map(|_| Vec::new()),
                Err(e) => Err(e),
            }
        };
        let bytes = read()?;
        let (state, newest) = state_file::decode(id, &path, &bytes);
        if newest.is_some() || bytes.is_empty() {
            return Ok(state);
        }
        // Both slots invalid: two writes may have overlapped this lock-free read. Read again.
        let bytes = read()?;
        let (state, newest) = state_file::decode(id, &path, &bytes);
        if newest.is_none() {
            tracing::warn!(transfer = %id, "no valid state slot; state rebuilt from the manifest");
        }
        Ok(state)
    }

    /// Reads one transfer. Needs no lock: a torn state slot reads as the older one.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`], [`ErrorKind::Corrupt`] when the manifest fails its checks (the
    /// state never does: it is rebuilt and flagged), I/O errors.
    pub fn get(&self, id: TransferId) -> Result<Transfer> {
        self.core.fs.check()?;
        tracing::debug!(transfer = %id, "get");
        let manifest = self.manifest(id)?;
        let state = self.read_state(id)?;
        Ok(Transfer {
            manifest: (*manifest).clone(),
            state,
        })
    }

    /// A locked read-modify-write of one transfer's state. `f` returns its answer and whether
    /// the state changed; a changed state is written to the other slot and synced before the
    /// lock is released.
    fn modify<R>(
        &self,
        id: TransferId,
        op: &'static str,
        f: impl FnOnce(&Manifest, &mut State, &Path) -> Result<(R, bool)>,
    ) -> Result<R> {
        self.modify_with(id, op, true, f)
    }

    /// Binds a platform task to the transfer. Durable before it returns, so call it before
    /// resuming the task. The task's session must be the transfer's session.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for another session or an ended transfer;
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn bind(&self, id: TransferId, task: TaskBinding) -> Result<()> {
        self.bind_with(id, task, None)
    }

    fn bind_with(&self, id: TransferId, task: TaskBinding, request: Option<Request>) -> Result<()> {
        if let Some(tag) = &task.tag {
            check_name("the tag", tag)?;
        }
        self.modify(id, "bind", |m, s, _| {
            if task.session != m.session {
                return Err(Error::invalid(format!(
                    "task session {:?} is not the transfer's session {:?}",
                    task.session, m.session
                )));
            }
            if s.phase.is_terminal() {
                return Err(Error::invalid(format!(
                    "transfer {id} has ended ({}); it cannot be bound",
                    s.phase
                )));
            }
            if let Some(r) = request {
                set_request(s, r)?;
            }
            s.binding = Some(task.clone());
            s.phase = Phase::Running;
            s.next_attempt = None;
            Ok(((), true))
        })?;
        let mut idx = lock(&self.tasks);
        idx.by_task.insert((task.session, task.task_id), id);
        if let Some(tag) = task.tag {
            idx.by_tag.insert(tag, id);
        }
        Ok(())
    }

    /// Records progress. With [`Durability::Immediate`](crate::Durability::Immediate) it is
    /// synced before returning; with `Coalesced` it is written at most once per flush interval.
    /// Progress on an ended transfer is ignored.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; I/O errors of a write this call performs.
    pub fn progress(
        &self,
        id: TransferId,
        done: u64,
        total: Option<u64>,
        durability: crate::Durability,
    ) -> Result<()> {
        match durability {
            crate::Durability::Immediate => self.modify(id, "progress", |_, s, _| {
                if s.phase.is_terminal() || (s.bytes_done, s.bytes_total) == (done, total) {
                    return Ok(((), false));
                }
                s.bytes_done = done;
                s.bytes_total = total.or(s.bytes_total);
                Ok(((), true))
            }),
            crate::Durability::Coalesced => {
                self.core.fs.check()?;
                let due = {
                    let mut g = lock(&self.core.pending);
                    if !g.contains_key(&id) {
                        drop(g);
                        self.manifest(id)?;
                        g = lock(&self.core.pending);
                    }
                    let p = g.entry(id).or_insert(PendingProgress {
                        done,
                        total,
                        dirty: true,
                        last_flush: Instant::now(),
                    });
                    p.done = done;
                    p.total = total;
                    p.dirty = true;
                    self.core.claim_if_due(p)
                };
                if due {
                    self.core.flush_one(id)?;
                } else if self.cfg.background_flush {
                    self.flusher
                        .get_or_init(|| Flusher::start(Arc::clone(&self.core)));
                }
                Ok(())
            }
        }
    }

    /// Writes every coalesced progress report not yet written, now.
    ///
    /// # Errors
    /// The first I/O error met; the other transfers are still flushed.
    pub fn flush(&self) -> Result<()> {
        let mut dirty: Vec<TransferId> = lock(&self.core.pending)
            .iter()
            .filter(|(_, p)| p.dirty)
            .map(|(id, _)| *id)
            .collect();
        // In id order, so the writes a flush makes come in the same order every time.
        dirty.sort_unstable();
        let mut first = None;
        for id in dirty {
            if let Err(e) = self.core.flush_one(id) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Records success. Compare-and-set: exactly one caller (thread or process) wins; a caller
    /// that lost gets the outcome already recorded and nothing is applied twice.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{Completion, NewTransfer, Store};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let id = store.create(NewTransfer::download("https://example.com/f"))?;
    /// assert!(matches!(store.complete(id, Some(200))?, Completion::Won(_)));
    /// assert!(matches!(store.complete(id, Some(200))?, Completion::Lost(_)));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn complete(&self, id: TransferId, status: Option<u16>) -> Result<Completion> {
        self.modify(id, "complete", |_, s, _| {
            if s.phase.is_terminal() {
                return Ok((
                    Completion::Lost(s.outcome.clone().unwrap_or(Outcome::Cancelled)),
                    false,
                ));
            }
            let o = Outcome::Succeeded { status };
            s.phase = Phase::Completed;
            s.outcome = Some(o.clone());
            s.next_attempt = None;
            Ok((Completion::Won(o), true))
        })
    }

    /// Records a failed attempt. A permanent error gives up at once; otherwise one failure is
    /// counted and the answer is a retry time (the backoff, or the server's retry-after) or
    /// [`FailResult::GaveUp`] once the retry policy's `max_attempts` failures are reached.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn fail(&self, id: TransferId, class: ErrorClass, error: &str) -> Result<FailResult> {
        self.fail_task(id, None, class, error)
    }

    /// [`Store::fail`], also recording `task` as the binding: the task whose failure was
    /// counted, so that meeting it again never counts it twice.
    pub(crate) fn fail_task(
        &self,
        id: TransferId,
        task: Option<TaskBinding>,
        class: ErrorClass,
        error: &str,
    ) -> Result<FailResult> {
        let now = self.now();
        self.modify(id, "fail", |m, s, _| {
            if s.phase.is_terminal() {
                let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
                return Ok((FailResult::AlreadyEnded(o), false));
            }
            if let Some(task) = task {
                s.binding = Some(task);
            }
            let error = truncate_text(error);
            s.last_error = Some(error.clone());
            // The binding is kept: it names the task whose failure was just counted (the phase
            // says it no longer runs), so a reconcile that meets that finished task again does
            // not count it twice. Binding a new task replaces it.
            let give_up = |s: &mut State, reason| {
                s.phase = Phase::Failed;
                s.next_attempt = None;
                s.outcome = Some(Outcome::Failed {
                    reason,
                    error: error.clone(),
                });
                Ok((FailResult::GaveUp, true))
            };
            if class == ErrorClass::Permanent {
                return give_up(s, FailReason::Permanent);
            }
            s.failures = s.failures.saturating_add(1);
            if s.failures >= m.retry.max_attempts {
                return give_up(s, FailReason::GaveUp);
            }
            let at = match class {
                ErrorClass::RetryAfter(t) => t,
                _ => now
                    .checked_add(m.retry.backoff(s.failures))
                    .unwrap_or_else(|| format::from_ms(u64::MAX)),
            };
            let at = format::from_ms(format::to_ms(at));
            s.phase = Phase::WaitingToRetry;
            s.next_attempt = Some(at);
            Ok((FailResult::RetryAt(at), true))
        })
    }

    /// The platform lost the task, or the user's force-quit cancelled it: not a failure. The
    /// binding is cleared and the transfer waits to be recreated; no failure is counted.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn task_lost(&self, id: TransferId) -> Result<()> {
        self.modify(id, "task lost", |_, s, _| {
            if s.phase.is_terminal() || s.binding.is_none() && s.phase != Phase::Running {
                return Ok(((), false));
            }
            s.binding = None;
            if s.phase == Phase::Running {
                s.phase = Phase::Pending;
            }
            Ok(((), true))
        })
    }

    /// Replaces the request to run from now on (a fresh pre-signed URL, new headers). Secret
    /// header values are not stored.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a bad request or one too large for a state slot.
    pub fn replace_request(&self, id: TransferId, request: Request) -> Result<()> {
        check_request(&request)?;
        self.modify(id, "replace request", |_, s, _| {
            set_request(s, request)?;
            Ok(((), true))
        })
    }

    /// Durably records the platform task that now runs a recreated or resumed transfer (and
    /// the fresh request it was given, if any), before the caller resumes that task. The
    /// manifest is read from disk and checked first, never taken from a cache.
    ///
    /// # Errors
    /// As [`Store::bind`]; [`ErrorKind::Corrupt`] when the manifest fails its checks.
    pub fn rebind(
        &self,
        id: TransferId,
        task: TaskBinding,
        request: Option<Request>,
    ) -> Result<()> {
        self.core.fs.check()?;
        self.core.load_manifest(id)?;
        if let Some(r) = &request {
            check_request(r)?;
        }
        self.bind_with(id, task, request)
    }

    /// Fails a transfer as expired (its deadline passed). Returns false when it had already
    /// ended (nothing changed).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn expire(&self, id: TransferId) -> Result<bool> {
        self.modify(id, "expire", |_, s, _| {
            if s.phase.is_terminal() {
                return Ok((false, false));
            }
            s.phase = Phase::Failed;
            s.next_attempt = None;
            s.outcome = Some(Outcome::Failed {
                reason: FailReason::Expired,
                error: "the deadline passed".to_owned(),
            });
            Ok((true, true))
        })
    }

    /// Binds `task` and refreshes the counters in one durable write (a reconcile's `adopt`).
    /// Writes nothing when the binding and counters are already those.
    pub(crate) fn adopt(
        &self,
        id: TransferId,
        task: TaskBinding,
        done: u64,
        total: Option<u64>,
    ) -> Result<()> {
        self.modify(id, "adopt", |m, s, _| {
            if task.session != m.session || s.phase.is_terminal() {
                return Err(Error::invalid(format!(
                    "transfer {id} cannot adopt task {} of session {:?}",
                    task.task_id, task.session
                )));
            }
            let tag = task
                .tag
                .clone()
                .or_else(|| s.binding.as_ref().and_then(|b| b.tag.clone()));
            let binding = TaskBinding { tag, ..task };
            let before = (s.binding.clone(), s.phase, s.bytes_done, s.bytes_total);
            s.binding = Some(binding);
            s.phase = Phase::Running;
            s.next_attempt = None;
            s.bytes_done = done;
            s.bytes_total = total.or(s.bytes_total);
            Ok((
                (),
                before != (s.binding.clone(), s.phase, s.bytes_done, s.bytes_total),
            ))
        })
    }

    /// Cancels a transfer. The answer carries the bound task, which the caller cancels on the
    /// platform. The record stays (phase cancelled) until it is purged by
    /// [`Store::acknowledge`] or [`Store::remove`].
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn cancel(&self, id: TransferId) -> Result<CancelResult> {
        self.modify(id, "cancel", |_, s, _| {
            if s.phase.is_terminal() {
                let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
                return Ok((CancelResult::AlreadyEnded(o), false));
            }
            s.phase = Phase::Cancelled;
            s.outcome = Some(Outcome::Cancelled);
            s.next_attempt = None;
            Ok((
                CancelResult::Cancelled {
                    task: s.binding.clone(),
                },
                true,
            ))
        })
    }

    /// The app has handled the outcome of an ended transfer: its directory and payload are
    /// purged, and its outcome stays counted in its group.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] when the transfer has not ended; [`ErrorKind::NotFound`].
    pub fn acknowledge(&self, id: TransferId) -> Result<()> {
        self.purge(id, true)
    }

    /// Removes a transfer in any phase (a member that had not ended counts as cancelled in its
    /// group). Renamed into `trash/` and synced first, so it never reappears.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn remove(&self, id: TransferId) -> Result<()> {
        self.purge(id, false)
    }

    fn purge(&self, id: TransferId, require_ended: bool) -> Result<()> {
        self.modify_with(id, "purge", false, |m, s, _| {
            if require_ended && !s.phase.is_terminal() {
                return Err(Error::invalid(format!(
                    "transfer {id} has not ended ({}); only an outcome can be acknowledged",
                    s.phase
                )));
            }
            if let Some(g) = &m.group {
                let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
                self.tally(g, id, &o, s.bytes_done.max(m.payload.len()))?;
            }
            self.move_to_trash(id)?;
            Ok(((), false))
        })?;
        self.forget(id);
        let trashed = self.dir(TRASH).join(id.to_string());
        if let Err(e) = self.core.fs.remove_tree(&trashed) {
            // The removal is already durable; `open` finishes clearing the trash.
            tracing::warn!(transfer = %id, error = %e, "left a removed transfer in trash");
        }
        tracing::debug!(transfer = %id, "purged");
        Ok(())
    }

    /// Renames the transfer's directory into `trash/` and syncs `transfers/`. The caller holds
    /// the transfer's lock.
    fn move_to_trash(&self, id: TransferId) -> Result<()> {
        if let Some(j) = &self.core.journal {
            j.intent(&self.core.root, id)?;
        }
        let from = self.transfer_dir(id);
        let to = self.dir(TRASH).join(id.to_string());
        self.core.fs.rename(&from, &to)?;
        if let Some(j) = &self.core.journal {
            j.after(&self.core.root, id);
        }
        self.core.fs.sync_dir(&self.dir(TRANSFERS))
    }

    fn forget(&self, id: TransferId) {
        self.core.forget_state(id);
        lock(&self.core.manifests).remove(&id);
        lock(&self.core.pending).remove(&id);
        let mut idx = lock(&self.tasks);
        idx.by_task.retain(|_, v| *v != id);
        idx.by_tag.retain(|_, v| *v != id);
    }

    /// Moves a transfer aside into `quarantine/` (used when its manifest fails its checks).
    /// Nothing is deleted.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; I/O errors.
    pub fn quarantine(&self, id: TransferId) -> Result<PathBuf> {
        self.core.fs.check()?;
        let from = self.checked_dir(id).or_else(|e| match e.kind() {
            // A symlink in place of the directory is moved aside as it is.
            ErrorKind::Corrupt { .. } => Ok(self.transfer_dir(id)),
            _ => Err(e),
        })?;
        // Hold the transfer's lock (when its state file can be locked) so no update lands in a
        // directory being moved aside.
        let _held = match self.lock_state(id) {
            Ok(l) => Some(l.file),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::NotFound { .. } | ErrorKind::Busy { .. }
                ) =>
            {
                return Err(e);
            }
            Err(_) => None,
        };
        if let Some(j) = &self.core.journal {
            j.intent(&self.core.root, id)?;
        }
        let to = self.dir(QUARANTINE).join(id.to_string());
        self.core.forget_state(id);
        self.core.fs.rename(&from, &to)?;
        if let Some(j) = &self.core.journal {
            j.after(&self.core.root, id);
        }
        self.core.fs.sync_dir(&self.dir(QUARANTINE))?;
        self.core.fs.sync_dir(&self.dir(TRANSFERS))?;
        self.forget(id);
        tracing::warn!(transfer = %id, to = %to.display(), "quarantined");
        Ok(to)
    }

    /// Reads every record under `transfers/`: readable transfers, corrupt ones, and entries
    /// that are not transfers. Never reads payloads.
    ///
    /// # Errors
    /// I/O errors other than a damaged record (those are listed in [`Scan::corrupt`]);
    /// [`ErrorKind::Unavailable`] while the files cannot be read.
    pub fn scan(&self) -> Result<Scan> {
        self.core.fs.check()?;
        let dir = self.dir(TRANSFERS);
        let mut out = Scan::default();
        tracing::debug!("scan");
        for e in self.core.fs.list(&dir)? {
            let id = e.name.to_str().and_then(TransferId::parse_canonical);
            let Some(id) = id.filter(|_| e.is_dir && !e.is_symlink) else {
                out.unknown.push(dir.join(&e.name));
                continue;
            };
            let manifest = match self.manifest(id) {
                Ok(m) => m,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => continue,
                Err(e)
                    if e.is_corrupt()
                        || matches!(e.kind(), ErrorKind::UnsupportedVersion { .. }) =>
                {
                    out.corrupt.push((id, e));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.read_state(id) {
                Ok(state) => out.transfers.push(Transfer {
                    manifest: (*manifest).clone(),
                    state,
                }),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) if e.is_corrupt() => out.corrupt.push((id, e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Lists transfers matching `filter`, in id order, without reading payloads. Corrupt
    /// records are skipped (see [`Store::scan`]). Read from the index while this handle holds
    /// it ([`StoreBuilder::index`]), else from the directories.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn list(&self, filter: &Filter) -> Result<Vec<Transfer>> {
        let mut v: Vec<Transfer> = self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        v.retain(|t| filter.matches(t));
        Ok(v)
    }

    /// Every readable transfer (with whether resume data is stored, when `resume` is asked
    /// for) and every corrupt record: from the index while this handle holds it, else from the
    /// directories.
    pub(crate) fn gather(&self, resume: bool) -> Result<Gathered> {
        self.core.fs.check()?;
        match self.index_records() {
            Some(records) => Ok(self.decode_indexed(&records)),
            None => self.gather_scanned(resume),
        }
    }

    /// [`Store::gather`] from the directories.
    pub(crate) fn gather_scanned(&self, resume: bool) -> Result<Gathered> {
        let scan = self.scan()?;
        let mut transfers = Vec::with_capacity(scan.transfers.len());
        for t in scan.transfers {
            let r = resume && t.manifest.kind == Kind::Download && self.has_resume_data(t.id())?;
            transfers.push((t, r));
        }
        Ok(Gathered {
            transfers,
            corrupt: scan.corrupt,
        })
    }

    /// Every record the index holds, in id order, while this handle holds the index.
    pub(crate) fn index_records(&self) -> Option<Vec<IndexRecord>> {
        self.index_sync(crate::index::Sync::List)
            .and_then(|l| l.records)
    }

    /// Every record the index holds, in id order, as planning reads them (see
    /// [`crate::index::Sync::Facts`]), while this handle holds the index.
    pub(crate) fn index_facts(&self) -> Option<(Vec<IndexRecord>, Option<crate::index::Wholes>)> {
        let l = self.index_sync(crate::index::Sync::Facts)?;
        Some((l.records?, l.wholes))
    }

    /// Deletes the index (to be rebuilt) when reading whole records on demand found it
    /// lacking.
    pub(crate) fn after_wholes(&self, wholes: Option<&crate::index::Wholes>) {
        if wholes.is_some_and(crate::index::Wholes::damaged) {
            tracing::error!("index lacks whole records its facts name; deleting it to rebuild");
            *lock(&self.index) = None;
            let _ = self
                .core
                .fs
                .remove_file(&self.core.root.join(layout::INDEX_FILE));
        }
    }

    /// Decodes the index's records as [`Store::scan`] would read the directories.
    fn decode_indexed(&self, records: &[IndexRecord]) -> Gathered {
        let part = |part: &[IndexRecord]| {
            let mut out = Gathered {
                transfers: Vec::with_capacity(part.len()),
                corrupt: Vec::new(),
            };
            for r in part {
                let id = TransferId::from_bytes(r.id);
                // The path only names the file in an error: built when there is one.
                let m = manifest::decode(Path::new(""), r.manifest())
                    .and_then(|m| same_id(id, m.id).map(|()| m))
                    .map_err(|e| e.with_path(&self.transfer_dir(id).join(MANIFEST)));
                match m {
                    Ok(manifest) => {
                        let state = crate::format::index::indexed_state(r.state());
                        out.transfers.push((Transfer { manifest, state }, r.resume));
                    }
                    Err(e) => out.corrupt.push((id, e)),
                }
            }
            out
        };
        let (mut all, second) = in_halves(records, part);
        if let Some(b) = second {
            all.transfers.extend(b.transfers);
            all.corrupt.extend(b.corrupt);
        }
        all
    }

    /// The index's records as the planner reads them (their facts, read in place), and the ids
    /// of the corrupt ones: what [`Store::decode_indexed`] finds, decoded less. `None` when a
    /// record's facts do not decode (only a bug writes such facts: the chunk's checksum held):
    /// the index is then deleted, to be rebuilt, and the caller reads the directories.
    pub(crate) fn plan_view<'a>(
        &self,
        records: &'a [IndexRecord],
        wholes: Option<&'a crate::index::Wholes>,
    ) -> Option<(PlanView<'a>, Vec<TransferId>)> {
        // The halves stay apart (the planner reads both, in order): no copy joins them.
        let (first, second) = in_halves(records, |part| view_part(part, wholes));
        let viewed = first.and_then(|(a, mut bad)| {
            let (b, bad_b) = match second {
                Some(s) => s?,
                None => Default::default(),
            };
            bad.extend(bad_b);
            Some(((a, b), bad))
        });
        if viewed.is_none() {
            tracing::error!(
                "index record facts do not decode; deleting the index to rebuild, reading the directories"
            );
            *lock(&self.index) = None;
            let _ = self
                .core
                .fs
                .remove_file(&self.core.root.join(layout::INDEX_FILE));
        }
        viewed
    }

    /// Brings the index up to date when this handle holds it (opening it if it can); `None`
    /// when it does not hold it or the index failed (it is then deleted, to be rebuilt).
    pub(crate) fn index_sync(&self, mode: crate::index::Sync) -> Option<crate::index::Listing> {
        let journal = self.core.journal.as_ref()?;
        if !self.cfg.hold_index || !self.cfg.create {
            return None;
        }
        let mut held = lock(&self.index);
        if held.as_ref().is_some_and(|i| !i.still_in_place()) {
            *held = None;
        }
        if held.is_none() {
            match crate::index::Index::open(self.core.fs.backend(), &self.core.root) {
                Ok(i) => *held = i,
                Err(e) => {
                    tracing::warn!(error = %e, "index unavailable; reading the directories");
                    return None;
                }
            }
        }
        let r = held.as_ref()?.sync(&self.core.root, journal, mode);
        match r {
            Ok(l) => {
                use std::sync::atomic::Ordering::Relaxed;
                let t = &self.index_tally;
                let n = if l.rebuilt { &t.rebuilt } else { &t.read };
                n.fetch_add(1, Relaxed);
                if l.checkpoint {
                    t.checkpoints.fetch_add(1, Relaxed);
                }
                Some(l)
            }
            Err(e) => {
                tracing::warn!(error = %e, "index failed; deleting it to rebuild, reading the directories");
                *held = None;
                let _ = self
                    .core
                    .fs
                    .remove_file(&self.core.root.join(layout::INDEX_FILE));
                None
            }
        }
    }

    /// Closes the index, so another process can hold it. Call it before the app is suspended
    /// (iOS ends a suspended app that holds a file lock in a shared container). Cheap: the
    /// changes the journal gathered are written into the index first only when many have
    /// gathered. The index is reopened when next needed. Returns whether this handle held it.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let app = waybill::Store::open(dir.path())?;
    /// app.list(&waybill::Filter::all())?; // the app holds the index
    /// assert!(app.release_index());
    /// let extension = waybill::Store::open(dir.path())?;
    /// extension.list(&waybill::Filter::all())?; // now the extension does
    /// assert!(!app.release_index() && extension.release_index());
    /// # Ok(()) }
    /// ```
    pub fn release_index(&self) -> bool {
        let mut held = lock(&self.index);
        let Some(index) = held.as_ref() else {
            return false;
        };
        if let Some(j) = &self.core.journal
            && let Err(e) = index.sync(&self.core.root, j, crate::index::Sync::Refresh)
        {
            tracing::warn!(error = %e, "index not brought up to date before release");
        }
        *held = None;
        true
    }

    /// Outcomes (succeeded, or failed for good) that wait for [`Store::acknowledge`].
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn pending_outcomes(&self) -> Result<Vec<(TransferId, Outcome)>> {
        Ok(self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .filter(|t| matches!(t.state.phase, Phase::Completed | Phase::Failed))
            .filter_map(|t| t.state.outcome.clone().map(|o| (t.id(), o)))
            .collect())
    }

    fn rebuild_index(&self) -> Result<Vec<Transfer>> {
        let all: Vec<Transfer> = self
            .gather(false)?
            .transfers
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        let mut idx = TaskMap::default();
        for t in &all {
            if let Some(b) = &t.state.binding {
                idx.by_task.insert((b.session.clone(), b.task_id), t.id());
                if let Some(tag) = &b.tag {
                    idx.by_tag.insert(tag.clone(), t.id());
                }
            }
        }
        *lock(&self.tasks) = idx;
        Ok(all)
    }

    fn lookup(
        &self,
        key: impl Fn(&TaskMap) -> Option<TransferId>,
        accept: impl Fn(&Transfer) -> bool,
    ) -> Result<Option<Transfer>> {
        self.core.fs.check()?;
        let hit = key(&lock(&self.tasks));
        if let Some(id) = hit {
            match self.get(id) {
                Ok(t) if accept(&t) => return Ok(Some(t)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // A miss or a stale hit: another process may have bound the task. Rescan.
        Ok(self.rebuild_index()?.into_iter().find(|t| accept(t)))
    }

    /// The transfer bound to `(session, task_id)`, as a platform callback needs on every event.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn find_by_task(&self, session: &str, task_id: u64) -> Result<Option<Transfer>> {
        let key = (session.to_owned(), task_id);
        self.lookup(
            |i| i.by_task.get(&key).copied(),
            |t| {
                t.state
                    .binding
                    .as_ref()
                    .is_some_and(|b| b.session == session && b.task_id == task_id)
            },
        )
    }

    /// The transfer whose bound task carries `tag`, or, when no binding records it, the
    /// transfer whose id is `tag`.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn find_by_tag(&self, tag: &str) -> Result<Option<Transfer>> {
        let by_binding =
            |t: &Transfer| t.state.binding.as_ref().and_then(|b| b.tag.as_deref()) == Some(tag);
        if let Some(t) = self.lookup(|i| i.by_tag.get(tag).copied(), by_binding)? {
            return Ok(Some(t));
        }
        match TransferId::parse_canonical(tag).map(|id| self.get(id)) {
            Some(Ok(t)) => Ok(Some(t)),
            Some(Err(e)) if !matches!(e.kind(), ErrorKind::NotFound { .. }) => Err(e),
            _ => Ok(None),
        }
    }

    /// Appends bytes a download received to its `partial` file, durably: the data is synced
    /// before the durable length is recorded. Returns the new durable length. Bytes past the
    /// durable length (from a crash mid-append) are discarded first.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload or an ended transfer; I/O errors.
    pub fn append_received(&self, id: TransferId, bytes: &[u8]) -> Result<u64> {
        self.modify(id, "append received", |m, s, dir| {
            if m.kind != Kind::Download || s.phase.is_terminal() {
                return Err(Error::invalid(format!(
                    "transfer {id} is not a download in progress"
                )));
            }
            let path = dir.join(PARTIAL);
            let (f, created) = self.core.fs.open_or_create(&path)?;
            let have = self.core.fs.len(&f, &path)?;
            if have < s.partial_len {
                // Received bytes were lost outside our control; never pad with zeros. Resume
                // from what is really there.
                tracing::warn!(transfer = %id, recorded = s.partial_len, found = have, "partial file shorter than recorded; resuming from its length");
                s.partial_len = have;
            }
            self.core.fs.set_len(&f, &path, s.partial_len)?;
            self.core.fs.write_at(&f, &path, s.partial_len, bytes)?;
            self.core.fs.sync_data(&f, &path)?;
            if created {
                self.core.fs.sync_dir(dir)?;
            }
            s.partial_len = s.partial_len.saturating_add(bytes.len() as u64);
            s.bytes_done = s.partial_len;
            Ok((s.partial_len, true))
        })
    }

    /// Stores a download's resume data, replacing any earlier copy atomically.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload or data over [`MAX_RESUME_BYTES`].
    pub fn store_resume_data(&self, id: TransferId, data: &[u8]) -> Result<()> {
        if data.len() as u64 > MAX_RESUME_BYTES {
            return Err(Error::invalid(format!(
                "resume data is {} bytes; the limit is {MAX_RESUME_BYTES}",
                data.len()
            )));
        }
        self.modify(id, "store resume data", |m, _, dir| {
            if m.kind != Kind::Download {
                return Err(Error::invalid(format!("transfer {id} is not a download")));
            }
            let tmp = dir.join(RESUME_TEMP);
            let f = self.core.fs.create_truncate(&tmp)?;
            self.core.fs.write_all(&f, &tmp, data)?;
            self.core.fs.sync_data(&f, &tmp)?;
            self.core.fs.rename(&tmp, &dir.join(RESUME))?;
            self.core.fs.sync_dir(dir)?;
            Ok(((), false))
        })
    }

    /// The resume data stored for a download, if any.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown transfer; I/O errors.
    pub fn resume_data(&self, id: TransferId) -> Result<Option<Vec<u8>>> {
        self.core.fs.check()?;
        self.manifest(id)?;
        let path = self.checked_dir(id)?.join(RESUME);
        match self.core.fs.read_bounded(&path, MAX_RESUME_BYTES) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found_io() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Moves a finished download into the transfer's directory before returning (a rename, or
    /// a synced copy across file systems, after which the source is removed).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload, a cancelled transfer or a source that is
    /// not a regular file; I/O errors.
    pub fn accept_download(&self, id: TransferId, file: &Path) -> Result<()> {
        let meta = self.core.fs.lstat(file)?;
        if !meta.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        self.modify(id, "accept download", |m, s, dir| {
            if m.kind != Kind::Download || s.phase == Phase::Cancelled {
                return Err(Error::invalid(format!(
                    "transfer {id} is not a download that can accept a file"
                )));
            }
            let dst = dir.join(PAYLOAD);
            // The data is durable before the file is reachable as `payload`, and the source is
            // removed only after the new name is durable.
            let src = self.core.fs.open_read(file)?;
            self.core.fs.sync_data(&src, file)?;
            let moved = match self.core.fs.rename(file, &dst) {
                Ok(()) => true,
                Err(e) if wfs::is_cross_device(&e) => {
                    let tmp = dir.join(PAYLOAD_TEMP);
                    self.core.fs.remove_file(&tmp)?;
                    let (_, f) = self.core.fs.link_or_copy(file, &tmp, false, true, true)?;
                    let f = match f {
                        Some(f) => f,
                        None => self.core.fs.open_read(&tmp)?,
                    };
                    self.core.fs.sync_data(&f, &tmp)?;
                    self.core.fs.rename(&tmp, &dst)?;
                    false
                }
                Err(e) => return Err(e),
            };
            self.core.fs.sync_dir(dir)?;
            if !moved {
                self.core.fs.remove_file(file)?;
            }
            let len = self.core.fs.lstat(&dst)?.len();
            s.downloaded = true;
            s.bytes_done = len;
            s.bytes_total = Some(len);
            Ok(((), true))
        })?;
        // Only now that the state says "downloaded" are the partial bytes and resume data moot.
        // Under the lock, journaled, since the index keeps whether resume data exists.
        let held = self.lock_state(id)?;
        let dir = &held.dir;
        if let Some(j) = &self.core.journal {
            j.intent(&self.core.root, id)?;
        }
        for leftover in [PARTIAL, RESUME] {
            if let Err(e) = self.core.fs.remove_file(&dir.join(leftover)) {
                tracing::warn!(transfer = %id, error = %e, "left a moot download file behind");
            }
        }
        if let Some(j) = &self.core.journal {
            j.after(&self.core.root, id);
        }
        Ok(())
    }

    /// Whether resume data is stored for a download.
    pub(crate) fn has_resume_data(&self, id: TransferId) -> Result<bool> {
        match self.core.fs.lstat(&self.transfer_dir(id).join(RESUME)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.is_not_found_io() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Where the payload lives: the upload body, or a download's accepted file.
    pub fn payload_path(&self, id: TransferId) -> PathBuf {
        self.transfer_dir(id).join(PAYLOAD)
    }

    /// Opens the payload for reading after checking it is the one recorded: for a linked
    /// upload the same device, inode, size and modification time; for a copy or written
    /// bytes the same size.
    ///
    /// # Errors
    /// [`ErrorKind::PayloadChanged`] when it differs; [`ErrorKind::NotFound`] when there is
    /// none (a download not yet accepted).
    pub fn open_payload(&self, id: TransferId) -> Result<File> {
        let path = self.transfer_dir(id).join(PAYLOAD);
        self.checked_payload(id)?
            .into_file()
            .map_err(|e| Error::io("open", &path, e))
    }

    /// [`Store::open_payload`] behind the file system seam.
    pub(crate) fn checked_payload(&self, id: TransferId) -> Result<Handle> {
        self.core.fs.check()?;
        let m = self.manifest(id)?;
        let path = self.checked_dir(id)?.join(PAYLOAD);
        let f = match self.core.fs.open_read(&path) {
            Err(e) if e.is_not_found_io() => {
                return Err(Error::not_found(format!("the payload of transfer {id}")));
            }
            r => r?,
        };
        let (dev, ino, len, mtime_ns) = self.core.fs.identity(&f, &path)?;
        let changed = |detail: String| -> Result<Handle> {
            Err(ErrorKind::PayloadChanged { id, detail }.into())
        };
        match m.payload {
            PayloadFacts::Linked {
                len: l,
                dev: d,
                ino: i,
                mtime_ns: t,
            } => {
                if (d, i) != (dev, ino) {
                    return changed(format!("file identity {dev}:{ino}, recorded {d}:{i}"));
                }
                if l != len || t != mtime_ns {
                    return changed(format!(
                        "size {len} and mtime {mtime_ns} ns, recorded {l} and {t} ns"
                    ));
                }
            }
            PayloadFacts::Written { len: l } | PayloadFacts::Copied { len: l } if l != len => {
                return changed(format!("size {len}, recorded {l}"));
            }
            _ => {}
        }
        Ok(f)
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

/// A record read from the index as the planner sees it: its facts, read in place; its files
/// are decoded only for a request or an outcome.
pub(crate) struct IndexedRecord<'a> {
    id: TransferId,
    facts: crate::format::index::Facts<'a>,
    phase: Phase,
    record: &'a IndexRecord,
    /// Where the rest of a record that holds less than its whole files is read.
    wholes: Option<&'a crate::index::Wholes>,
}

impl IndexedRecord<'_> {
    /// The whole record, when this one holds less (`None` when it cannot be had: gone from
    /// the index and from its directory).
    fn whole(&self) -> Option<IndexRecord> {
        self.wholes.and_then(|w| w.get(self.record.id))
    }

    /// The newest state: the record's own, unless it holds its facts only.
    fn state(&self) -> State {
        use crate::format::index::{Holds, indexed_state};
        match self.record.holds() {
            Holds::Whole | Holds::State => indexed_state(self.record.state()),
            Holds::Facts => indexed_state(self.whole().as_ref().map_or(&[], |w| w.state())),
        }
    }

    /// The record holding the manifest: this one, or the whole record (`None` when it cannot
    /// be had).
    fn with_manifest(&self) -> Option<std::borrow::Cow<'_, IndexRecord>> {
        match self.record.holds() {
            crate::format::index::Holds::Whole => Some(std::borrow::Cow::Borrowed(self.record)),
            _ => self.whole().map(std::borrow::Cow::Owned),
        }
    }
}

impl crate::reconcile::Planned for IndexedRecord<'_> {
    fn id(&self) -> TransferId {
        self.id
    }
    fn session(&self) -> &str {
        self.facts.session
    }
    fn other_key(&self) -> Option<&str> {
        self.facts.key
    }
    fn kind(&self) -> Kind {
        if self.facts.download {
            Kind::Download
        } else {
            Kind::Upload
        }
    }
    fn deadline(&self) -> Option<SystemTime> {
        self.facts.deadline_ms.map(crate::transfer::from_ms)
    }
    fn retry(&self) -> crate::transfer::RetryPolicy {
        crate::transfer::RetryPolicy {
            max_attempts: self.facts.max_attempts,
            initial_backoff: std::time::Duration::from_millis(self.facts.initial_backoff_ms),
            max_backoff: std::time::Duration::from_millis(self.facts.max_backoff_ms),
        }
    }
    fn phase(&self) -> Phase {
        self.phase
    }
    fn failures(&self) -> u32 {
        self.facts.failures
    }
    fn next_attempt(&self) -> Option<SystemTime> {
        self.facts.next_attempt_ms.map(crate::transfer::from_ms)
    }
    fn binding(&self) -> Option<(&str, u64, Option<&str>)> {
        self.facts.binding
    }
    fn partial_len(&self) -> u64 {
        self.facts.partial_len
    }
    fn outcome(&self) -> Option<crate::transfer::Outcome> {
        self.state().outcome
    }
    fn has_resume_data(&self) -> bool {
        self.record.resume
    }
    fn url(&self) -> &str {
        self.facts.replaced_url.unwrap_or(self.facts.url)
    }
    fn request(&self) -> crate::transfer::Request {
        // The facts say whether the state holds a replacement (they were derived from it): the
        // state is decoded only then.
        if self.facts.replaced_url.is_some()
            && let Some(r) = self.state().current_request
        {
            return r;
        }
        // Decoded in place (no copy of the manifest per request).
        let holder = self.with_manifest();
        let bytes = holder.as_ref().map_or(&[][..], |r| r.manifest());
        match manifest::decode_ref(Path::new(""), bytes) {
            Ok(m) => m.request(),
            Err(e) => {
                // The facts were derived from these very bytes (the chunk's checksum holds):
                // only a bug gets here. The URL the facts hold is the best left.
                tracing::error!(id = %self.id, error = %e, "indexed manifest no longer decodes");
                let method = if self.facts.download { "GET" } else { "PUT" };
                crate::transfer::Request::new(method, self.url())
            }
        }
    }
}

/// The index's records as the planner reads them, in two halves (in order).
pub(crate) type PlanView<'a> = (Vec<IndexedRecord<'a>>, Vec<IndexedRecord<'a>>);

/// From this many records on, the index's records decode on two threads.
const PARALLEL_DECODE_FROM: usize = 16_384;

/// `part` over `records`; for many records, over each half on its own thread (each record
/// decodes on its own).
fn in_halves<'a, O: Send>(
    records: &'a [IndexRecord],
    part: impl Fn(&'a [IndexRecord]) -> O + Sync,
) -> (O, Option<O>) {
    if records.len() < PARALLEL_DECODE_FROM {
        return (part(records), None);
    }
    let (a, b) = records.split_at(records.len() / 2);
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("waybill-decode".into())
            .spawn_scoped(s, || part(b));
        let first = part(a);
        let second = match h {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            Err(_) => part(b),
        };
        (first, Some(second))
    })
}

/// The planner's view of some of the index's records, and the ids of the corrupt ones (whose
/// facts say their manifest failed its checks); `None` when some facts do not decode.
fn view_part<'a>(
    records: &'a [IndexRecord],
    wholes: Option<&'a crate::index::Wholes>,
) -> Option<(Vec<IndexedRecord<'a>>, Vec<TransferId>)> {
    let mut out = (Vec::with_capacity(records.len()), Vec::new());
    for r in records {
        let id = TransferId::from_bytes(r.id);
        let facts = crate::format::index::Facts::decode(r.facts())?;
        if !facts.ok {
            out.1.push(id);
            continue;
        }
        let phase = Phase::ALL.get(usize::from(facts.phase)).copied()?;
        out.0.push(IndexedRecord {
            id,
            facts,
            phase,
            record: r,
            wholes,
        });
    }
    Some(out)
}

/// A manifest read under `id` must name `id`.
fn same_id(id: TransferId, found: TransferId) -> Result<()> {
    if found == id {
        Ok(())
    } else {
        Err(Error::corrupt(
            Path::new(""),
            Corruption::IdMismatch {
                expected: id,
                found,
            },
        ))
    }
}

/// What [`Store::gather`] found.
pub(crate) struct Gathered {
    pub(crate) transfers: Vec<(Transfer, bool)>,
    pub(crate) corrupt: Vec<(TransferId, Error)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    /// The real file system, counting every sync (data, directory, file system).
    fn counting_all_syncs() -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&n);
        let spy = crate::testkit::spy::Spy::new(move |c| {
            if matches!(c.name, "sync_data" | "sync_dir" | "sync_fs") {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        });
        (Arc::new(spy), n)
    }

    /// The real file system, recording which files (by inode) get an early write-back and a
    /// data sync, in order.
    /// What [`recording_write_back`] records: ("start" or "sync", inode), in order.
    type WriteBackLog = Arc<Mutex<Vec<(&'static str, u64)>>>;

    fn recording_write_back() -> (Arc<dyn crate::fs::Backend>, WriteBackLog) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let rec = Arc::clone(&log);
        let spy = crate::testkit::spy::Spy::new(move |c| {
            let what = match c.name {
                "start_write_back" => "start",
                "sync_data" => "sync",
                _ => return Ok(()),
            };
            if let Some(h) = c.handle {
                lock(&rec).push((what, crate::fs::Backend::fstat(&crate::fs::Real, h)?.ino));
            }
            Ok(())
        });
        (Arc::new(spy), log)
    }

    /// A single create starts the write-back of the files it wrote before its first sync, which
    /// is of the state (written last), so that sync writes all their allocations at once; it
    /// never does so for a linked file of the caller's (that would drop the caller's cached
    /// pages); and it still syncs every file once.
    #[cfg(unix)]
    #[test]
    fn a_create_starts_write_back_of_its_own_files_before_syncing_the_state_first() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let (backend, rec) = recording_write_back();
        let store = Store::builder()
            .backend(backend)
            .open(dir.path().join("store"))?;
        let src = dir.path().join("photo.jpg");
        std::fs::write(&src, b"caller's bytes").map_err(|e| Error::io("write", &src, e))?;
        let ino = |p: &Path| -> Result<u64> {
            let m = std::fs::symlink_metadata(p).map_err(|e| Error::io("lstat", p, e))?;
            Ok(std::os::unix::fs::MetadataExt::ino(&m))
        };
        let sources = [
            (
                crate::UploadSource::File {
                    path: src.clone(),
                    link: LinkMode::HardLink,
                },
                false,
            ),
            (crate::UploadSource::Bytes(b"ours".to_vec()), true),
        ];
        for (source, payload_ours) in sources {
            lock(&rec).clear();
            let id = store.create(NewTransfer::upload("https://example.com/u", source))?;
            let t = dir
                .path()
                .join("store")
                .join(TRANSFERS)
                .join(id.to_string());
            let (manifest, state, payload) = (
                ino(&t.join(MANIFEST))?,
                ino(&t.join(STATE))?,
                ino(&t.join(PAYLOAD))?,
            );
            let events = lock(&rec).clone();
            let first_sync = events.iter().position(|e| e.0 == "sync");
            assert_eq!(
                first_sync.and_then(|i| events.get(i)),
                Some(&("sync", state)),
                "the state is synced first: {events:?}"
            );
            let started: Vec<u64> = events
                .iter()
                .take(first_sync.unwrap_or(0))
                .filter(|e| e.0 == "start")
                .map(|e| e.1)
                .collect();
            let mut expected = vec![manifest];
            if payload_ours {
                expected.push(payload);
            }
            assert_eq!(started, expected, "started early: {events:?}");
            for f in [manifest, state, payload] {
                assert_eq!(
                    events.iter().filter(|e| **e == ("sync", f)).count(),
                    1,
                    "each file synced once: {events:?}"
                );
            }
        }
        Ok(())
    }

    /// One create needs five syncs (manifest, state, payload, its directory, `transfers/`); a
    /// batch shares them: one file-system sync per part and one directory sync where `syncfs`
    /// exists, else four per transfer and one shared directory sync. A batch built on two
    /// threads syncs each thread's parts, and its ids come back in the order of its items.
    #[test]
    fn a_batch_create_shares_its_syncs() -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let (backend, counter) = counting_all_syncs();
        let store = Store::builder()
            .backend(backend)
            .batch_threads(2)
            .open(dir.path())?;
        let syncfs = cfg!(any(target_os = "linux", target_os = "android"));
        let budget = crate::fs::open_file_budget() as u64;
        let upload = || {
            NewTransfer::upload(
                "https://example.com/u",
                crate::UploadSource::Bytes(b"x".to_vec()),
            )
        };
        let before = counter.load(SeqCst);
        store.create(upload())?;
        assert_eq!(counter.load(SeqCst) - before, 5, "one create");
        let before = counter.load(SeqCst);
        let ids = store.create_batch((0..100).map(|_| upload()).collect())?;
        let used = counter.load(SeqCst) - before;
        if syncfs {
            assert_eq!(used, 100u64.div_ceil(budget) + 1, "a batch of 100");
        } else {
            assert_eq!(used, 4 * 100 + 1, "a batch of 100");
        }
        // And the batch is whole: every member reads back.
        for id in ids {
            assert_eq!(store.get(id)?.manifest.payload.len(), 1);
        }
        // 1,100 members on two threads of 550: each thread's parts share half the budget.
        let before = counter.load(SeqCst);
        let items = (0..1100)
            .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
            .collect();
        let ids = store.create_batch(items)?;
        let used = counter.load(SeqCst) - before;
        if syncfs {
            assert_eq!(
                used,
                2 * 550u64.div_ceil(budget / 2) + 1,
                "a batch of 1,100"
            );
        } else {
            assert_eq!(used, 3 * 1100 + 1, "a batch of 1,100");
        }
        assert_eq!(ids.len(), 1100);
        for (i, id) in ids.into_iter().enumerate() {
            let url = format!("https://example.com/{i}");
            assert_eq!(
                store.get(id)?.manifest.request.url,
                url,
                "ids in item order"
            );
        }
        Ok(())
    }

    /// The guarantee `StoreBuilder::flush_interval` documents: a transfer's coalesced progress
    /// is synced at most once per interval however often it is reported, and every report is
    /// durable within one interval without any further call.
    #[test]
    fn coalesced_progress_is_synced_at_most_once_per_interval_and_within_one() -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let (backend, counter) = counting_all_syncs();
        let interval = Duration::from_millis(100);
        let store = Store::builder()
            .backend(backend)
            .flush_interval(interval)
            .open(dir.path())?;
        let ids = store.create_batch(
            (0..3)
                .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
                .collect(),
        )?;
        let before = counter.load(SeqCst);
        let run = Duration::from_millis(1000);
        let start = Instant::now();
        let mut reports = 0u64;
        while start.elapsed() < run {
            for id in &ids {
                reports += 1;
                store.progress(*id, reports, Some(u64::MAX), crate::Durability::Coalesced)?;
            }
        }
        let elapsed = start.elapsed();
        let syncs = counter.load(SeqCst) - before;
        // One sync per transfer per whole interval that passed, plus one for a partial interval.
        let bound = ids.len() as u64 * (elapsed.as_millis() / interval.as_millis() + 1) as u64;
        assert!(
            syncs <= bound,
            "{syncs} syncs for {reports} reports in {elapsed:?} (bound {bound})"
        );
        assert!(
            syncs >= ids.len() as u64,
            "progress was written during the run"
        );
        // Nothing more is reported; the last reports become durable within an interval (the
        // wait allows for a slow machine), without flush() or drop.
        let last: Vec<u64> = ids
            .iter()
            .map(|id| lock(&store.core.pending).get(id).map_or(0, |p| p.done))
            .collect();
        std::thread::sleep(interval * 5);
        let other = Store::builder().background_flush(false).open(dir.path())?;
        for (id, want) in ids.iter().zip(&last) {
            assert_eq!(other.get(*id)?.state.bytes_done, *want);
        }
        assert!(
            counter.load(SeqCst) - before - syncs <= ids.len() as u64,
            "one write per transfer after the run"
        );
        Ok(())
    }

    /// The real file system, counting renames.
    fn counting_renames() -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&n);
        let spy = crate::testkit::spy::Spy::new(move |c| {
            if c.name == "rename" {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(())
        });
        (Arc::new(spy), n)
    }

    /// A batch larger than one part whose late member has a bad input (a missing upload
    /// source, metadata over the manifest's limit) fails before any member is renamed into
    /// `transfers/`, so no other reader ever sees part of it.
    #[test]
    fn a_multi_part_batch_with_a_bad_member_renames_nothing() -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let (backend, counter) = counting_renames();
        let store = Store::builder()
            .backend(backend)
            .open_budget(64)
            .open(dir.path())?;
        let good = |i: usize| NewTransfer::download(format!("https://example.com/{i}"));
        let bad: [NewTransfer; 2] = [
            NewTransfer::upload(
                "https://example.com/u",
                UploadSource::File {
                    path: dir.path().join("missing"),
                    link: LinkMode::Auto,
                },
            ),
            good(0).meta("big", "x".repeat(300 * 1024)),
        ];
        for b in bad {
            let mut items: Vec<NewTransfer> = (0..200).map(good).collect();
            items.insert(150, b);
            let before = counter.load(SeqCst);
            assert!(store.create_batch(items).is_err());
            assert_eq!(counter.load(SeqCst), before, "no member was renamed");
            assert!(store.list(&Filter::all())?.is_empty());
        }
        Ok(())
    }

    /// The real file system, whose `fail_at`-th rename fails.
    fn failing_rename(fail_at: u64) -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
        let n = Arc::new(AtomicU64::new(0));
        let renames = Arc::clone(&n);
        let spy = crate::testkit::spy::Spy::new(move |c| {
            if c.name == "rename"
                && renames.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == fail_at
            {
                return Err(std::io::Error::other("injected rename failure"));
            }
            Ok(())
        });
        (Arc::new(spy), n)
    }

    /// A batch built on two threads whose rename fails half way, after both threads have
    /// renamed parts into `transfers/`, leaves nothing anywhere: the whole batch is rolled
    /// back, and the error is the failure itself, not the other thread's stop.
    #[test]
    fn a_batch_failing_on_one_thread_rolls_back_every_thread() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let (backend, renames) = failing_rename(300);
        let store = Store::builder()
            .backend(backend)
            .batch_threads(2)
            .open_budget(64)
            .open(dir.path())?;
        let items: Vec<NewTransfer> = (0..600)
            .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
            .collect();
        let err = store.create_batch(items).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("injected rename failure")),
            "{err:?}"
        );
        assert!(
            renames.load(std::sync::atomic::Ordering::SeqCst) >= 300,
            "the failure was reached"
        );
        assert!(store.list(&Filter::all())?.is_empty());
        for sub in [STAGING, TRANSFERS, TRASH] {
            let left = std::fs::read_dir(dir.path().join(sub))
                .map_err(|e| Error::io("read", &dir.path().join(sub), e))?
                .count();
            assert_eq!(left, 0, "{sub} is empty");
        }
        Ok(())
    }

    #[test]
    fn error_text_is_cut_at_a_char_boundary() {
        let s = "é".repeat(MAX_ERROR_BYTES);
        let t = truncate_text(&s);
        assert!(t.len() <= MAX_ERROR_BYTES && t.chars().all(|c| c == 'é'));
    }
}
