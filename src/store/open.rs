//! Opening a store: [`StoreBuilder`] and its defaults, the `FORMAT` file and the upgrade from
//! format 1, the root lock, and clearing the debris of interrupted creates and removals.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{Core, IndexTally, Store, TaskMap};
use crate::error::{Error, Result};
use crate::format;
use crate::fs::Fs;
use crate::layout::{
    FORMAT_FILE, FORMAT_TEMP_PREFIX, LOCK_FILE, MANIFEST, PAYLOAD, ROOT_DIRS, STAGING, STATE,
    TRANSFERS, TRASH,
};
use crate::state_file::StateFiles;
use crate::transfer::TransferId;

/// The most threads a batch create uses by default.
const MAX_BATCH_THREADS: usize = 4;

type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Options for opening a store. `Store::open(path)` is `Store::builder().open(path)`.
#[derive(Clone)]
pub struct StoreBuilder {
    pub(super) lock_timeout: Duration,
    pub(super) flush_interval: Duration,
    pub(super) staging_grace: Duration,
    pub(super) clock: Clock,
    pub(super) create: bool,
    pub(super) clear_debris: bool,
    pub(super) background_flush: bool,
    pub(super) shared_sync_min: usize,
    pub(super) batch_threads: usize,
    pub(super) open_budget: Option<usize>,
    pub(super) hold_index: bool,
    pub(super) journal_thresholds: crate::index::Thresholds,
    pub(super) backend: Option<Arc<dyn crate::fs::Backend>>,
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

    /// The files a batch create or a group commit may keep open, instead of
    /// [`wfs::open_file_budget`] (tests: batches of many parts without thousands of members).
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
            group_part: cfg.open_budget.unwrap_or_else(crate::fs::group_file_budget),
            group_threads: cfg.batch_threads,
            shared_sync_min: cfg.shared_sync_min,
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
}
