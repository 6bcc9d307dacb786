//! The derived index (FORMAT.md §2.6, §2.7, §3.8): `index.redb` keeps every transfer's manifest and newest
//! state slot in a few large values, so opening and reconciling a large store reads one file
//! instead of every transfer directory. The directories stay the source of truth.
//!
//! redb holds an exclusive lock on its file while it is open, so one process at a time holds
//! the index. Every process, holder or not, appends to the change `journal` around each change
//! it makes to a transfer, while holding that transfer's lock: an *intent* frame before ("this
//! transfer may change now") and an *entry* frame after ("this is the transfer now"). The
//! holder brings the index up to date from the journal; an intent with no entry after it (a
//! process killed mid-change, or a change that writes no state) is resolved by reading that
//! transfer's directory. Journal appends are not synced: they survive a killed process in the
//! page cache, and a journal from an earlier boot (which may have lost frames) is discarded,
//! which makes the holder rebuild the index from the directories.
//!
//! The journal, the index's pages (through [`IndexFile`], our redb `StorageBackend`) and the
//! boot identity all go through the store's file system seam, so the crash simulator and the
//! fault injector see every write and sync of them. Their failures never poison the store: a
//! failed index write or sync drops the index (it is rebuilt from the directories when next
//! opened); a failed journal append deletes it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::format::index::{
    self as fmt, Boot, EntryBody, Frame, Holds, IndexMeta, IndexRecord, JOURNAL_HEADER_LEN,
    JournalHeader,
};
use crate::fs::{Backend, BootMark, Fs, Handle};
use crate::layout::{INDEX_FILE, JOURNAL_FILE, MANIFEST, RESUME, STAGING, STATE, TRANSFERS};
use crate::state_file;
use crate::{Error, Result, TransferId};

const CHUNKS: TableDefinition<u16, &[u8]> = TableDefinition::new("chunks");
/// The same chunks' facts alone: what planning reads.
const FACTS: TableDefinition<u16, &[u8]> = TableDefinition::new("facts");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_KEY: &str = "meta";

/// A journal longer than this is started afresh (and the index rebuilt) rather than read.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// The index's page cache: its values are read once per reconcile, so a large cache only
/// costs resident memory.
const CACHE_BYTES: usize = 256 * 1024;

/// When the journal's changes are written into the index, and when it is cut back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Thresholds {
    /// From this many journal bytes past the index's checkpoint, reading the index also writes
    /// the changes into it.
    pub(crate) checkpoint: u64,
    /// A fully consumed journal longer than this is started afresh (a new generation).
    pub(crate) compact: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            checkpoint: 256 * 1024,
            compact: 1024 * 1024,
        }
    }
}

/// The journal's record of a boot.
fn boot_of(m: BootMark) -> Boot {
    match m {
        BootMark::Id(id) => Boot::Id(id),
        BootMark::Since(ms) => Boot::Since(ms),
    }
}

/// A crate error as redb's, its source kept.
fn db_err(e: Error) -> redb::Error {
    redb::Error::Io(std::io::Error::other(e))
}

/// The store's change journal, open for appending.
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    /// The journal's own view of the store's backend: it never syncs, and its failures never
    /// poison the store.
    fs: Fs,
    /// Appends from this process go one at a time: the shared lock is per open file, so one
    /// thread's unlock would otherwise end another's.
    file: Mutex<Handle>,
    /// How many changes in this process keep the shared lock between their intent and their
    /// entry ([`Journal::intent_held`]); the lock is released when the last one ends. Read and
    /// written only with `file` locked.
    holds: std::sync::atomic::AtomicUsize,
    boot: Boot,
    lock_timeout: Duration,
    pub(crate) thresholds: Thresholds,
}

/// A change under way: this process keeps its shared lock on the journal from the change's
/// intent to its entry, so the pair costs one lock and one unlock, not two of each.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    journal: &'a Journal,
}

impl Held<'_> {
    /// [`Journal::entries`] for the change this hold began with.
    pub(crate) fn entry(self, id: TransferId, body: &EntryBody) {
        self.journal.entries(&[(id, body)]);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let j = self.journal;
        let f = j.file.lock().unwrap_or_else(|p| p.into_inner());
        if j.holds.fetch_sub(1, Relaxed) == 1
            && let Err(e) = j.fs.unlock(&f, &j.path)
        {
            tracing::warn!(error = %e, "could not unlock the journal");
        }
    }
}

impl Journal {
    /// Opens the store's journal, creating it when `create` is set. A journal written in
    /// another boot (or damaged) is reset to an empty one with a new generation first.
    /// `Ok(None)` when there is no journal to open, or this system cannot tell its boots apart.
    pub(crate) fn open(
        backend: Arc<dyn Backend>,
        root: &Path,
        create: bool,
        lock_timeout: Duration,
        thresholds: Thresholds,
    ) -> Result<Option<Self>> {
        let fs = Fs::new(backend);
        let Some(boot) = fs.boot().map(boot_of) else {
            return Ok(None);
        };
        let path = root.join(JOURNAL_FILE);
        let file = match fs.open_append(&path, create) {
            Ok(f) => f,
            Err(e) if e.is_not_found_io() && !create => return Ok(None),
            Err(e) => return Err(e),
        };
        let j = Journal {
            path,
            fs,
            file: Mutex::new(file),
            holds: std::sync::atomic::AtomicUsize::new(0),
            boot,
            lock_timeout,
            thresholds,
        };
        if !j.of_this_boot() {
            j.reset(false)?;
        }
        Ok(Some(j))
    }

    /// Reads up to `len` bytes at `off`.
    fn read_at(&self, f: &Handle, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(len);
        self.fs.read_at(f, &self.path, off, len, &mut buf)?;
        Ok(buf)
    }

    /// The header, when it is whole.
    fn header(&self) -> Option<JournalHeader> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let b = self.read_at(&f, 0, JOURNAL_HEADER_LEN).ok()?;
        fmt::decode_journal_header(&b)
    }

    /// The journal's generation, when its header is whole. The boot is checked once, when a
    /// process opens the journal: a wall-clock step while it runs must not look like a reboot.
    pub(crate) fn generation(&self) -> Option<[u8; 16]> {
        self.header().map(|h| h.generation)
    }

    /// Whether the header is of this boot (checked when a process opens the journal).
    fn of_this_boot(&self) -> bool {
        self.header().is_some_and(|h| h.boot.same(&self.boot))
    }

    /// Starts the journal afresh with a new generation: when its header is not one of this
    /// boot, or (`always`) when its frames are damaged. Under the exclusive lock, so no append
    /// is cut; a header another process wrote meanwhile is kept unless `always`.
    pub(crate) fn reset(&self, always: bool) -> Result<()> {
        let path = &self.path;
        let f = self.fs.open_append(path, false)?;
        if !self.fs.lock_within(&f, path, false, self.lock_timeout)? {
            return Err(crate::error::ErrorKind::Busy { path: path.clone() }.into());
        }
        let r = (|| {
            if !always && self.of_this_boot() {
                return Ok(());
            }
            let h = JournalHeader {
                generation: *uuid::Uuid::new_v4().as_bytes(),
                boot: self.boot,
            };
            self.fs.set_len(&f, path, 0)?;
            self.fs
                .write_all(&f, path, &fmt::encode_journal_header(&h))?;
            tracing::debug!(path = %path.display(), "journal started afresh");
            Ok(())
        })();
        let u = self.fs.unlock(&f, path);
        r.and(u)
    }

    fn append_intent(&self, id: TransferId) -> Result<()> {
        self.append(&fmt::encode_frame(fmt::TAG_INTENT, id.as_bytes(), &[]))
    }

    fn append(&self, frame: &[u8]) -> Result<()> {
        self.append_keep(frame, false)
    }

    /// Appends under the shared lock (taken unless a hold of this process has it); with
    /// `keep`, a successful append adds a hold and leaves the lock taken.
    fn append_keep(&self, frame: &[u8], keep: bool) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let path = &self.path;
        let held = self.holds.load(Relaxed) > 0;
        if !held && !self.fs.lock_within(&f, path, true, self.lock_timeout)? {
            return Err(crate::error::ErrorKind::Busy { path: path.clone() }.into());
        }
        let r = self.fs.write_all(&f, path, frame);
        if keep && r.is_ok() {
            self.holds.fetch_add(1, Relaxed);
            return Ok(());
        }
        if held {
            return r;
        }
        let u = self.fs.unlock(&f, path);
        r.and(u)
    }

    /// [`Journal::intent`], keeping this process's shared lock on the journal until the
    /// returned hold's entry (or its drop). `None` when the intent could not be journaled and
    /// the index was deleted instead.
    pub(crate) fn intent_held(&self, root: &Path, id: TransferId) -> Result<Option<Held<'_>>> {
        match self.append_keep(
            &fmt::encode_frame(fmt::TAG_INTENT, id.as_bytes(), &[]),
            true,
        ) {
            Ok(()) => Ok(Some(Held { journal: self })),
            Err(e) => self.lost_intents(root, 1, e).map(|()| None),
        }
    }

    /// Records that `id` may change now. Called under the transfer's lock, before the change.
    /// When it cannot be recorded, the index is deleted (it is rebuilt from the directories
    /// when next opened) so it never goes stale; only when that fails too does the change fail.
    pub(crate) fn intent(&self, root: &Path, id: TransferId) -> Result<()> {
        self.intents(root, &[id])
    }

    /// [`Journal::intent`] for several transfers at once, in one append.
    pub(crate) fn intents(&self, root: &Path, ids: &[TransferId]) -> Result<()> {
        let frames: Vec<u8> = ids
            .iter()
            .flat_map(|id| fmt::encode_frame(fmt::TAG_INTENT, id.as_bytes(), &[]))
            .collect();
        match self.append(&frames) {
            Ok(()) => Ok(()),
            Err(e) => self.lost_intents(root, ids.len(), e),
        }
    }

    /// After intents could not be journaled (`e`): deletes the index so it never goes stale.
    fn lost_intents(&self, root: &Path, transfers: usize, e: Error) -> Result<()> {
        match self.fs.remove_file(&root.join(INDEX_FILE)) {
            Ok(()) => {
                tracing::warn!(transfers, error = %e, "could not journal a change; the index was deleted and will be rebuilt");
                Ok(())
            }
            Err(_) => Err(e),
        }
    }

    /// Records that `id` changed, after a change that journals no entry (a rename out of
    /// `transfers/`, files removed), still under its lock: the holder reads the directory again
    /// even when the intent before the change was consumed (or cut by a reset) mid-change.
    /// When it cannot be recorded, the index is deleted.
    pub(crate) fn after(&self, root: &Path, id: TransferId) {
        if let Err(e) = self.append_intent(id) {
            tracing::warn!(transfer = %id, error = %e, "could not journal a change; deleting the index so it is rebuilt");
            let _ = self.fs.remove_file(&root.join(INDEX_FILE));
        }
    }

    /// Records what transfers are after a change, under the same lock as their intents, in one
    /// append. A failure only costs the index holder a read of their directories (the intents
    /// stand).
    pub(crate) fn entries(&self, items: &[(TransferId, &EntryBody)]) {
        let mut frames = Vec::new();
        for (id, body) in items {
            let payload = postcard::to_allocvec(body).unwrap_or_default();
            frames.extend(fmt::encode_frame(fmt::TAG_ENTRY, id.as_bytes(), &payload));
        }
        if let Err(e) = self.append(&frames) {
            tracing::warn!(transfers = items.len(), error = %e, "could not journal a change; the index holder will read the transfers instead");
        }
    }

    fn len(&self) -> Result<u64> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.fs.len(&f, &self.path)
    }

    fn read_from(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.read_at(
            &f,
            off,
            usize::try_from(len.saturating_sub(off)).unwrap_or(0),
        )
    }

    /// Starts the journal afresh with a new generation if it is still `end` bytes long (no
    /// frame was appended since), under the exclusive lock. Returns the new generation; `None`
    /// when another process holds a lock on it or it grew.
    fn cut_back(&self, end: u64) -> Result<Option<[u8; 16]>> {
        let path = &self.path;
        let f = self.fs.open_append(path, false)?;
        if !self.fs.try_lock(&f, path)? {
            return Ok(None);
        }
        // Appenders wait on this lock: it covers the check and the cut, never a sync.
        let r = (|| -> Result<Option<[u8; 16]>> {
            if self.fs.len(&f, path)? != end {
                return Ok(None);
            }
            let h = JournalHeader {
                generation: *uuid::Uuid::new_v4().as_bytes(),
                boot: self.boot,
            };
            self.fs.set_len(&f, path, 0)?;
            self.fs
                .write_all(&f, path, &fmt::encode_journal_header(&h))?;
            Ok(Some(h.generation))
        })();
        let u = self.fs.unlock(&f, path);
        let cut = r?;
        u.map(|()| cut)
    }
}

/// What the journal's tail says about one transfer: its last frame wins.
enum Last {
    /// An entry, at this offset.
    Entry(EntryBody, u64),
    /// An intent with no entry after it, at this offset.
    Intent(u64),
}

/// What reading a transfer's directory found.
struct Reread {
    record: Option<IndexRecord>,
    /// False when a change may still be under way (its lock is held, or its create is not yet
    /// renamed into place): the journal is not consumed past its intent.
    settled: bool,
}

/// Reads one transfer's files as the index keeps them, as [`crate::Store::scan`] classifies
/// them: a directory whose manifest or state cannot be read as a file is a record with an
/// unreadable (corrupt) manifest; anything under its name that is not a directory is not a
/// record. Never follows symlinks (the paths are built from the id; files open `O_NOFOLLOW`)
/// and bounds every read. I/O errors other than "not found" are errors.
fn reread(fs: &Fs, root: &Path, id: TransferId) -> Result<Reread> {
    let name = id.to_string();
    let dir = root.join(TRANSFERS).join(&name);
    let gone = |settled| {
        Ok(Reread {
            record: None,
            settled,
        })
    };
    let before = match fs.lstat(&dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => return gone(true),
        Err(e) if e.is_not_found_io() => {
            // A create not yet renamed into place: its builder holds `staging/<id>/state`
            // locked from before its intent until after its entry.
            let st = root.join(STAGING).join(&name).join(STATE);
            let building = match fs.open_read(&st) {
                Ok(f) => !fs.try_lock(&f, &st)?,
                Err(e) if e.is_not_found_io() || e.is_corrupt() => false,
                Err(e) => return Err(e),
            };
            return gone(!building);
        }
        Err(e) => return Err(e),
    };
    let state_path = dir.join(STATE);
    let mut settled = true;
    let state = match fs.open_read(&state_path) {
        Ok(f) => {
            settled = fs.try_lock(&f, &state_path)?;
            state_file::newest_slot(&state_file::read_slots(fs, &f, &state_path)?)
        }
        Err(e) if e.is_corrupt() || e.is_not_found_io() => Vec::new(),
        Err(e) => return Err(e),
    };
    // Moved away meanwhile (a removal, under its lock): read again after the change.
    if !fs.same_entry(&dir, &before)? {
        return gone(false);
    }
    let manifest = match fs.read_bounded(&dir.join(MANIFEST), crate::format::manifest::MAX_FILE) {
        Ok(b) => b,
        Err(e) if e.is_corrupt() || e.is_not_found_io() => Vec::new(),
        Err(e) => return Err(e),
    };
    // The record's facts decode the manifest once; they say whether it is a (valid) download.
    let mut record = IndexRecord::new(*id.as_bytes(), false, &state, &manifest);
    let download = fmt::Facts::decode(record.facts()).is_some_and(|f| f.download);
    record.resume = download
        && match fs.lstat(&dir.join(RESUME)) {
            Ok(m) => m.is_file(),
            Err(e) if e.is_not_found_io() => false,
            Err(e) => return Err(e),
        };
    Ok(Reread {
        record: Some(record),
        settled,
    })
}

/// `index.redb` as redb sees it: pages read, written and synced through the seam, so the
/// simulator and the fault injector see every one. It holds the file's exclusive lock from
/// before redb opens it until redb closes it, as redb's own file backend does.
#[derive(Debug)]
struct IndexFile {
    b: Arc<dyn Backend>,
    h: Handle,
}

impl redb::StorageBackend for IndexFile {
    fn len(&self) -> std::io::Result<u64> {
        self.b.fstat(&self.h).map(|m| m.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.b.read_exact_at(&self.h, offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.b.set_len(&self.h, len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.b.sync_data(&self.h)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.b.write_at(&self.h, offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.b.unlock(&self.h)
    }
}

/// The index, held open by this process.
pub(crate) struct Index {
    db: redb::Database,
    path: PathBuf,
    /// The index file's (device, inode) when opened: another file there means this one was
    /// deleted (a process that could not journal a change does that).
    ident: (u64, u64),
    /// The index's own view of the store's backend: its failures drop or rebuild the index,
    /// never poison the store.
    fs: Fs,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).finish()
    }
}

/// Every record the index holds, in id order (when listed), and the names that are not
/// transfers as of the last rebuild.
pub(crate) struct Listing {
    pub(crate) records: Option<Vec<IndexRecord>>,
    pub(crate) unknown: Vec<String>,
    /// With [`Sync::Facts`], when some records hold less than their whole files: where the
    /// rest is read.
    pub(crate) wholes: Option<Wholes>,
    /// Whether the index was rebuilt from the directories (else it was read and brought up to
    /// date from the journal).
    pub(crate) rebuilt: bool,
    /// Whether the journal's changes were written into the index (a checkpoint).
    pub(crate) checkpoint: bool,
}

/// What [`Index::sync`] is for. Either way the index is rebuilt when it does not follow the
/// journal, and the journal's changes are written into it once its unconsumed tail is long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    /// Return every record.
    List,
    /// Return every record, read from the facts table where that is up to date (the records
    /// then hold their facts, and their state when the journal changed them since): what
    /// planning reads. The rest of each is read on demand from [`Listing::wholes`].
    Facts,
    /// Return no records (open, release, close).
    Refresh,
}

impl Index {
    /// Opens (or creates) the index. `Ok(None)` while another process holds it.
    pub(crate) fn open(backend: Arc<dyn Backend>, root: &Path) -> Result<Option<Index>> {
        let fs = Fs::new(backend);
        let path = root.join(INDEX_FILE);
        if fs.lstat(&path).is_ok_and(|m| !m.is_file()) {
            // The index is only ever a file of ours (a symlink is removed, never followed).
            tracing::warn!(path = %path.display(), "index is not a regular file; removing it");
            fs.remove_file(&path)?;
        }
        for attempt in 0..2 {
            let (h, _) = fs.open_or_create(&path)?;
            if !fs.try_lock(&h, &path)? {
                return Ok(None);
            }
            let (dev, ino, _, _) = fs.identity(&h, &path)?;
            let file = IndexFile { b: fs.backend(), h };
            // redb asserts on some damaged files (a truncated one, for instance): a panic there
            // is a damaged index like any other (with `panic = "abort"` it stays a crash).
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .create_with_backend(file)
            }))
            .unwrap_or_else(|_| {
                Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
                    "redb panicked opening the index".into(),
                )))
            });
            match opened {
                Ok(db) => {
                    return Ok(Some(Index {
                        db,
                        path,
                        ident: (dev, ino),
                        fs,
                    }));
                }
                Err(e) if attempt == 0 => {
                    tracing::warn!(path = %path.display(), error = %e, "index unreadable; deleting it to rebuild");
                    fs.remove_file(&path)?;
                }
                Err(e) => {
                    return Err(Error::io(
                        "open index",
                        &path,
                        std::io::Error::other(e.to_string()),
                    ));
                }
            }
        }
        Ok(None)
    }

    /// Whether the file at the index's path is still the one this handle has open.
    pub(crate) fn still_in_place(&self) -> bool {
        self.fs
            .lstat(&self.path)
            .is_ok_and(|m| (m.dev, m.ino) == self.ident)
    }

    fn meta(&self) -> std::result::Result<Option<IndexMeta>, redb::Error> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(t.get(META_KEY)?.and_then(|v| fmt::decode_meta(v.value())))
    }

    /// The records of the chunks in `only` (all chunks when `None`) of the whole records'
    /// table, or the facts table, in id order; `None` when a chunk is not one this build wrote.
    fn read_chunks(
        tx: &redb::ReadTransaction,
        parts: Holds,
        only: Option<&BTreeSet<u16>>,
    ) -> std::result::Result<Option<Vec<IndexRecord>>, redb::Error> {
        let t = tx.open_table(if parts == Holds::Facts { FACTS } else { CHUNKS })?;
        // The chunks are read into one buffer (which the records then share), so that once
        // the records are dropped their bytes go back to the system in one piece rather than
        // as a thousand holes in the heap.
        let mut bytes = Vec::new();
        let mut spans: Vec<(u16, std::ops::Range<usize>)> = Vec::new();
        let mut keep = |k: u16, v: &[u8]| {
            let start = bytes.len();
            bytes.extend_from_slice(v);
            spans.push((k, start..bytes.len()));
        };
        match only {
            None => {
                for e in t.iter()? {
                    let (k, v) = e?;
                    keep(k.value(), v.value());
                }
            }
            Some(set) => {
                for &c in set {
                    if let Some(v) = t.get(c)? {
                        keep(c, v.value());
                    }
                }
            }
        }
        Ok(decode_chunks(bytes, spans, parts))
    }

    /// Writes the chunks named in `dirty` from `records` (sorted by id), and the meta.
    fn write(
        &self,
        records: &[IndexRecord],
        dirty: Option<&BTreeSet<u16>>,
        meta: &IndexMeta,
    ) -> std::result::Result<(), redb::Error> {
        let mut tx = self.db.begin_write()?;
        // A killed holder then costs no full repair when the index is next opened.
        tx.set_quick_repair(true);
        {
            // Each chunk's span of `records`.
            let mut spans = Vec::new();
            let mut at = 0;
            while let Some(first) = records.get(at) {
                let c = fmt::chunk_of(&first.id);
                let n = records
                    .get(at..)
                    .unwrap_or_default()
                    .iter()
                    .take_while(|r| fmt::chunk_of(&r.id) == c)
                    .count();
                spans.push((c, at..at + n));
                at += n;
            }
            // One table after the other, facts first: each table's pages then lie together
            // in a new file, and the facts (what a reconcile reads) are read cold in few runs.
            for (table, parts) in [(FACTS, Holds::Facts), (CHUNKS, Holds::Whole)] {
                let mut t = tx.open_table(table)?;
                if dirty.is_none() {
                    t.retain(|_, _| false)?;
                }
                for (c, span) in &spans {
                    if dirty.is_none_or(|d| d.contains(c)) {
                        let part = records.get(span.clone()).unwrap_or_default();
                        t.insert(*c, fmt::encode_chunk(part, parts).as_slice())?;
                    }
                }
                // Chunks left with no records.
                for c in dirty.into_iter().flatten() {
                    if spans.binary_search_by_key(c, |(k, _)| *k).is_err() {
                        t.remove(*c)?;
                    }
                }
            }
            let mut m = tx.open_table(META)?;
            m.insert(META_KEY, fmt::encode_meta(meta).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Brings the index up to date from the journal; with [`Sync::List`], returns every record.
    /// Rebuilds it from the directories when it does not follow this journal (new, damaged,
    /// from another boot). When the journal's unconsumed tail is long, the changes are written
    /// into the index and a fully consumed long journal is cut back.
    pub(crate) fn sync(
        &self,
        root: &Path,
        journal: &Journal,
        mode: Sync,
    ) -> std::result::Result<Listing, redb::Error> {
        for _ in 0..2 {
            let once = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.sync_once(root, journal, mode)
            }))
            .unwrap_or_else(|_| {
                Err(redb::Error::Corrupted(
                    "redb panicked reading the index".into(),
                ))
            });
            if let Some(l) = once? {
                return Ok(l);
            }
            // Damaged frames (or a header not of this boot): nothing after them can be trusted.
            tracing::warn!(path = %journal.path.display(), "journal damaged; starting it afresh and rebuilding the index");
            journal.reset(true).map_err(db_err)?;
        }
        Err(redb::Error::Io(std::io::Error::other(
            "the journal stays damaged",
        )))
    }

    fn sync_once(
        &self,
        root: &Path,
        journal: &Journal,
        mode: Sync,
    ) -> std::result::Result<Option<Listing>, redb::Error> {
        let Some(generation) = journal.generation() else {
            return Ok(None);
        };
        let end = journal.len().map_err(db_err)?;
        if end > MAX_JOURNAL_BYTES {
            // Far longer than any holder lets it grow (none held the index for a long time, or
            // someone inflated it): cheaper to start afresh and read the directories.
            return Ok(None);
        }
        let mut meta = self.meta()?.filter(|m| {
            m.generation == generation && (JOURNAL_HEADER_LEN as u64..=end).contains(&m.consumed)
        });
        if let Some(m) = &meta
            && mode == Sync::Refresh
            && end.saturating_sub(m.consumed) < journal.thresholds.checkpoint
        {
            // Too short a tail to be written into the index yet: it is read (and checked)
            // when records are, not at every open and close.
            return Ok(Some(Listing {
                records: None,
                unknown: m.unknown.clone(),
                wholes: None,
                rebuilt: false,
                checkpoint: false,
            }));
        }
        let tail = match &meta {
            Some(m) => journal.read_from(m.consumed, end).map_err(db_err)?,
            None => Vec::new(),
        };
        let base = meta.as_ref().map_or(0, |m| m.consumed);
        let Some((mut last, mut parsed)) = parse_tail(&tail, base) else {
            return Ok(None);
        };
        let long = parsed.saturating_sub(base) >= journal.thresholds.checkpoint;
        if let Some(m) = &meta
            && mode == Sync::Refresh
            && !long
        {
            return Ok(Some(Listing {
                records: None,
                unknown: m.unknown.clone(),
                wholes: None,
                rebuilt: false,
                checkpoint: false,
            }));
        }
        let mut dirty: BTreeSet<u16> = last.keys().map(fmt::chunk_of).collect();
        // Facts alone suffice unless the changes are to be written into the index now (which
        // takes whole records).
        let facts_only = mode == Sync::Facts && !long;
        let tx = self.db.begin_read()?;
        let loaded = match (&meta, mode) {
            (Some(_), Sync::Facts) if facts_only => Index::read_chunks(&tx, Holds::Facts, None)?,
            (Some(_), Sync::List | Sync::Facts) => Index::read_chunks(&tx, Holds::Whole, None)?,
            (Some(_), Sync::Refresh) => Index::read_chunks(&tx, Holds::Whole, Some(&dirty))?,
            (None, _) => None,
        };
        // Kept for reading whole records from the same snapshot; otherwise let go before
        // writing.
        let tx = facts_only.then_some(tx);
        let (mut records, rebuilt) = match (meta.as_ref(), loaded) {
            (Some(_), Some(r)) => (r, false),
            _ => {
                // Every transfer the journal names is read again once the rest is read: its
                // change may have been under way. The frames' contents are not used: the
                // directories may have been changed behind the journal's back (which is one
                // reason to rebuild).
                let (records, unknown) = rebuild(&self.fs, root).map_err(db_err)?;
                let tail = journal
                    .read_from(JOURNAL_HEADER_LEN as u64, end)
                    .map_err(db_err)?;
                let Some((l, p)) = parse_tail(&tail, JOURNAL_HEADER_LEN as u64) else {
                    return Ok(None);
                };
                last = l
                    .into_iter()
                    .map(|(id, l)| match l {
                        Last::Entry(_, at) | Last::Intent(at) => (id, Last::Intent(at)),
                    })
                    .collect();
                parsed = p;
                dirty.clear();
                meta = Some(IndexMeta {
                    generation,
                    consumed: JOURNAL_HEADER_LEN as u64,
                    unknown,
                });
                tracing::debug!(
                    records = records.len(),
                    "index rebuilt from the directories"
                );
                (records, true)
            }
        };
        let Some(mut meta) = meta else {
            return Ok(None);
        };
        let mut unsettled: Option<u64> = None;
        let mut changed: HashMap<[u8; 16], Option<IndexRecord>> = HashMap::new();
        for (id, l) in last {
            let tid = TransferId::from_bytes(id);
            let known = records.binary_search_by(|r| r.id.cmp(&id)).ok();
            let rec = match l {
                Last::Entry(body, _) => match (body.manifest, known.and_then(|i| records.get(i))) {
                    (Some(manifest), _) => {
                        Some(IndexRecord::new(id, body.resume, &body.state, &manifest))
                    }
                    (None, Some(old)) if old.holds() == Holds::Whole => Some(IndexRecord::new(
                        id,
                        body.resume,
                        &body.state,
                        old.manifest(),
                    )),
                    // Read from the facts table: the manifest's facts are kept (a manifest
                    // never changes), the state's derived anew.
                    (None, Some(old)) => match old.with_state(body.resume, &body.state) {
                        Some(r) => Some(r),
                        None => reread(&self.fs, root, tid).map_err(db_err)?.record,
                    },
                    (None, None) => reread(&self.fs, root, tid).map_err(db_err)?.record,
                },
                Last::Intent(at) => {
                    let r = reread(&self.fs, root, tid).map_err(db_err)?;
                    if !r.settled {
                        unsettled = Some(unsettled.map_or(at, |u| u.min(at)));
                    }
                    r.record
                }
            };
            dirty.insert(fmt::chunk_of(&id));
            changed.insert(id, rec);
        }
        apply_changes(&mut records, changed.into_iter().collect());
        let consumed = unsettled.unwrap_or(parsed);
        let write = rebuilt || long;
        let checkpoint = write && !rebuilt && consumed != meta.consumed;
        if write && (consumed != meta.consumed || rebuilt) {
            meta.consumed = consumed;
            self.write(&records, (!rebuilt).then_some(&dirty), &meta)?;
        }
        if write && consumed == end && end > journal.thresholds.compact {
            self.compact(journal, end, &mut meta)?;
        }
        let wholes = tx
            .filter(|_| !rebuilt)
            .map(|tx| Wholes::new(tx, Fs::new(self.fs.backend()), root));
        Ok(Some(Listing {
            records: (mode != Sync::Refresh).then_some(records),
            unknown: meta.unknown,
            wholes,
            rebuilt,
            checkpoint,
        }))
    }

    /// Starts a fully consumed journal afresh (a new generation), unless a frame was appended
    /// since, then tells the index.
    fn compact(
        &self,
        journal: &Journal,
        end: u64,
        meta: &mut IndexMeta,
    ) -> std::result::Result<(), redb::Error> {
        // The cut journal has a new generation: a holder killed before the commit below finds
        // the index of the old one and rebuilds, never reading the new frames from an offset
        // of the old.
        if let Some(generation) = journal.cut_back(end).map_err(db_err)? {
            meta.generation = generation;
            meta.consumed = JOURNAL_HEADER_LEN as u64;
            let mut tx = self.db.begin_write()?;
            tx.set_quick_repair(true);
            {
                let mut m = tx.open_table(META)?;
                m.insert(META_KEY, fmt::encode_meta(meta).as_slice())?;
            }
            tx.commit()?;
            tracing::debug!(bytes = end, "journal compacted");
        }
        Ok(())
    }
}

/// Applies the journal's changes to `records` (sorted by id, and kept so): each id's new
/// record, or `None` for a transfer that is gone. A change to a known transfer (the common case:
/// its state was rewritten) replaces its record in place; only added and removed transfers
/// cost a pass over all of them.
fn apply_changes(
    records: &mut Vec<IndexRecord>,
    mut changed: Vec<([u8; 16], Option<IndexRecord>)>,
) {
    changed.sort_unstable_by_key(|(id, _)| *id);
    let mut moved = Vec::new();
    for (id, rec) in changed {
        match (records.binary_search_by(|r| r.id.cmp(&id)), rec) {
            (Ok(i), Some(new)) => {
                if let Some(slot) = records.get_mut(i) {
                    *slot = new;
                }
            }
            (Ok(_), None) => moved.push((id, None)),
            (Err(_), Some(new)) => moved.push((id, Some(new))),
            (Err(_), None) => {}
        }
    }
    if moved.is_empty() {
        return;
    }
    let old = std::mem::take(records);
    records.reserve(old.len() + moved.len());
    let mut moved = moved.into_iter().peekable();
    for r in old {
        while let Some((_, new)) = moved.next_if(|(id, _)| *id < r.id) {
            records.extend(new);
        }
        match moved.next_if(|(id, _)| *id == r.id) {
            // Gone: nothing takes its place.
            Some((_, None)) => {}
            Some((_, Some(new))) => records.push(new),
            None => records.push(r),
        }
    }
    records.extend(moved.filter_map(|(_, new)| new));
}

/// Decodes the chunks at `spans` of `bytes` (keyed by chunk), written with `parts`, into one
/// list in id order; `None` when a chunk is not one this build wrote.
fn decode_chunks(
    bytes: Vec<u8>,
    spans: Vec<(u16, std::ops::Range<usize>)>,
    parts: Holds,
) -> Option<Vec<IndexRecord>> {
    let buf = std::sync::Arc::new(bytes);
    let total = spans
        .iter()
        .map(|(_, r)| buf.get(r.clone()).map_or(0, fmt::chunk_len))
        .sum::<usize>();
    // A record takes at least its header: a damaged count cannot reserve more than the bytes
    // could hold.
    let mut out = Vec::with_capacity(total.min(buf.len() / fmt::FACTS_HEADER_LEN));
    for (k, r) in spans {
        let from = out.len();
        fmt::decode_chunk_into(&buf, r, parts, &mut out).ok()?;
        // Each chunk holds its own ids, sorted: anything else is not an index we wrote.
        let added = out.get(from..).unwrap_or_default();
        let ok = added.is_sorted_by(|a, b| a.id < b.id)
            && added.iter().all(|r| fmt::chunk_of(&r.id) == k);
        if !ok {
            return None;
        }
    }
    Some(out)
}

/// The whole records of a listing read from the facts table, read on demand (a chunk at a time,
/// from the snapshot the facts came from) for the records whose files planning decodes. The
/// planner visits records in id order, so a few chunks are kept: each is read once, and a plan
/// that needs every record's files holds no more of them than that.
/// A record the whole table lacks, or a damaged chunk, is read from its directory instead,
/// and the index is marked [damaged](Wholes::damaged).
pub(crate) struct Wholes {
    tx: redb::ReadTransaction,
    fs: Fs,
    root: PathBuf,
    /// The chunks read last, the newest last.
    chunks: Mutex<Vec<(u16, Option<Vec<IndexRecord>>)>>,
    damaged: std::sync::atomic::AtomicBool,
}

/// How many chunks [`Wholes`] keeps (the planner decides on up to two threads).
const WHOLE_CHUNKS_KEPT: usize = 2;

impl std::fmt::Debug for Wholes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wholes").field("root", &self.root).finish()
    }
}

impl Wholes {
    fn new(tx: redb::ReadTransaction, fs: Fs, root: &Path) -> Wholes {
        Wholes {
            tx,
            fs,
            root: root.to_path_buf(),
            chunks: Mutex::new(Vec::with_capacity(WHOLE_CHUNKS_KEPT + 1)),
            damaged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The chunk `c` of the whole records' table; `None` when it cannot be read.
    fn chunk(&self, c: u16) -> Option<Vec<IndexRecord>> {
        let read = || -> std::result::Result<Option<Vec<IndexRecord>>, redb::Error> {
            let t = self.tx.open_table(CHUNKS)?;
            let Some(v) = t.get(c)? else {
                return Ok(None);
            };
            let bytes = v.value().to_vec();
            let span = 0..bytes.len();
            Ok(decode_chunks(bytes, vec![(c, span)], Holds::Whole))
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
            .ok()
            .and_then(|r| r.ok())
            .flatten()
    }

    /// The whole record of `id` (a record the listing holds); `None` when it is in neither the
    /// index nor its directory.
    pub(crate) fn get(&self, id: [u8; 16]) -> Option<IndexRecord> {
        let c = fmt::chunk_of(&id);
        let found = {
            let mut chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner());
            match chunks.iter().position(|(k, _)| *k == c) {
                Some(i) => {
                    let hit = chunks.remove(i);
                    chunks.push(hit);
                }
                None => {
                    if chunks.len() == WHOLE_CHUNKS_KEPT {
                        chunks.remove(0);
                    }
                    chunks.push((c, self.chunk(c)));
                }
            }
            chunks
                .last()
                .and_then(|(_, chunk)| chunk.as_ref())
                .and_then(|records| {
                    records
                        .binary_search_by(|r| r.id.cmp(&id))
                        .ok()
                        .and_then(|i| records.get(i).cloned())
                })
        };
        if found.is_some() {
            return found;
        }
        // The facts table named it: the whole table must hold it too.
        self.damaged
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let id = TransferId::from_bytes(id);
        tracing::warn!(%id, "index lacks a whole record its facts name; reading its directory");
        match reread(&self.fs, &self.root, id) {
            Ok(r) => r.record,
            Err(e) => {
                tracing::warn!(%id, error = %e, "reading a transfer's directory");
                None
            }
        }
    }

    /// Whether a whole record was missing or damaged: the index is then to be rebuilt.
    pub(crate) fn damaged(&self) -> bool {
        self.damaged.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Parses the journal tail starting at file offset `base`: the last frame per transfer, and
/// the offset after the last whole frame. A frame still being appended (the bytes end before
/// its header says it does) ends the tail; `None` when a whole frame is damaged.
fn parse_tail(tail: &[u8], base: u64) -> Option<(HashMap<[u8; 16], Last>, u64)> {
    let mut last = HashMap::new();
    let mut at = 0usize;
    while let Some((frame, n)) = tail.get(at..).and_then(fmt::decode_frame) {
        match frame {
            Frame::Intent(id) => {
                last.insert(id, Last::Intent(base + at as u64));
            }
            Frame::Entry(id, body) => {
                last.insert(id, Last::Entry(body, base + at as u64));
            }
        }
        at += n;
    }
    let rest = tail.get(at..).unwrap_or_default();
    if fmt::frame_len(rest).is_some_and(|n| n <= rest.len()) {
        return None;
    }
    Some((last, base + at as u64))
}

/// Reads every transfer directory: the records in id order, and the names that are not
/// transfers (not a canonical id, or not a directory), as [`crate::Store::scan`] sorts them.
fn rebuild(fs: &Fs, root: &Path) -> Result<(Vec<IndexRecord>, Vec<String>)> {
    let mut records = Vec::new();
    let mut unknown = Vec::new();
    for e in fs.list(&root.join(TRANSFERS))? {
        match e.name.to_str().and_then(TransferId::parse_canonical) {
            Some(id) if e.is_dir => records.extend(reread(fs, root, id)?.record),
            _ => unknown.push(e.name.to_string_lossy().into_owned()),
        }
    }
    records.sort_unstable_by_key(|r| r.id);
    unknown.sort();
    Ok((records, unknown))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;
    use crate::{
        Durability, ErrorClass, Filter, NewTransfer, Store, TaskBinding, Transfer, UploadSource,
    };

    /// Small journal thresholds, so a few changes reach a checkpoint and a cut-back.
    const SMALL: Thresholds = Thresholds {
        checkpoint: 2 * 1024,
        compact: 4 * 1024,
    };

    fn small() -> crate::StoreBuilder {
        Store::builder().journal_thresholds(SMALL.checkpoint, SMALL.compact)
    }

    proptest::proptest! {
        /// Applying the journal's changes in place (replacements) and by one merge (added and
        /// removed transfers) gives what removing every changed id, adding the new records and
        /// sorting gives, and the records stay sorted.
        #[test]
        fn changes_applied_in_place_equal_a_rebuilt_sorted_list(
            have in proptest::collection::btree_set(0u8..64, 0..40),
            changes in proptest::collection::hash_map(0u8..64, proptest::option::of(0u8..4), 0..30),
        ) {
            let rec = |k: u8, v: u8| {
                let mut id = [0u8; 16];
                id[0] = k;
                IndexRecord::new(id, v % 2 == 1, &[v; 3], &[k; 5])
            };
            let mut records: Vec<IndexRecord> = have.iter().map(|&k| rec(k, 9)).collect();
            let changed: Vec<([u8; 16], Option<IndexRecord>)> = changes
                .iter()
                .map(|(&k, v)| (rec(k, 0).id, v.map(|v| rec(k, v))))
                .collect();
            let mut expected = records.clone();
            expected.retain(|r| !changes.contains_key(&r.id[0]));
            expected.extend(changed.iter().filter_map(|(_, r)| r.clone()));
            expected.sort_unstable_by_key(|r| r.id);
            apply_changes(&mut records, changed);
            proptest::prop_assert_eq!(records, expected);
        }
    }

    /// What the directories hold (the source of truth), beside what the holder lists.
    fn assert_follows(holder: &Store, what: &str) {
        let listed = holder.list(&Filter::all()).unwrap();
        let truth: Vec<Transfer> = holder.scan().unwrap().transfers;
        assert_eq!(listed, truth, "{what}");
        for (t, resume) in holder.gather(true).unwrap().transfers {
            let on_disk = holder.has_resume_data(t.id()).unwrap();
            assert_eq!(resume, on_disk, "{what}: resume flag of {}", t.id());
        }
        assert_plans_match(holder, &truth, what);
    }

    /// The holder plans from the index's facts exactly what the planner plans from the
    /// directories' whole records, for tasks matched by tag, by URL, finished and unknown.
    fn assert_plans_match(holder: &Store, truth: &[Transfer], what: &str) {
        use crate::reconcile::{self, ReconcileOptions, Sessions, Task};
        let now = crate::transfer::from_ms(1_900_000_000_000);
        let mut tasks: Vec<Task> = truth
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let task = Task::running(crate::DEFAULT_SESSION, 1000 + k as u64, &t.request().url);
                match k % 4 {
                    0 => task.tag(t.id().to_string()),
                    1 => task,
                    2 => task.tag(t.id().to_string()).completed(200),
                    _ => task.failed("reset"),
                }
            })
            .collect();
        tasks.push(Task::running(
            crate::DEFAULT_SESSION,
            1,
            "https://x/unknown",
        ));
        let (records, corrupt) = whole_records(holder);
        let opts = ReconcileOptions::default();
        for tasks in [&tasks[..0], &tasks[..]] {
            let want = reconcile::plan(&Sessions::All, tasks, &records, &corrupt, now, &opts);
            let got = holder.reconcile_with(&Sessions::All, tasks, now, &opts);
            assert_eq!(got.unwrap(), want.unwrap(), "{what}: plan");
            let want = reconcile::plan_reset(&Sessions::All, tasks, &records, &corrupt);
            let got = holder.reset_plan(&Sessions::All, tasks);
            assert_eq!(got.unwrap(), want.unwrap(), "{what}: reset plan");
        }
    }

    /// Every fact the planner reads from the index (key, deadline, retry policy, replaced
    /// request, binding and its tag, failures and the next attempt, partial bytes, resume data,
    /// outcome, phase), and a corrupt manifest: the plan from the facts is the plan from the
    /// whole records, for tasks that match by tag, by key, by binding and by URL.
    #[test]
    fn the_plan_read_from_the_index_facts_is_the_plan_from_whole_records() {
        use crate::{ErrorClass, Request, RetryPolicy};
        use std::time::Duration;
        let d = tempfile::tempdir().unwrap();
        let s = small().open(d.path()).unwrap();
        let now = crate::transfer::from_ms(1_900_000_000_000);
        let mk = |t: NewTransfer| s.create(t).unwrap();
        let dl = |i: usize| NewTransfer::download(format!("https://x/f{i}"));
        mk(dl(0).idempotency_key("order-7"));
        let late = mk(dl(1).deadline(now - Duration::from_secs(5)));
        let soon = mk(dl(2)
            .deadline(now + Duration::from_secs(5))
            .retry(RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1500),
                max_backoff: Duration::from_secs(7),
            }));
        let moved = mk(
            NewTransfer::upload("https://x/u", UploadSource::Bytes(vec![1; 9]))
                .method("POST")
                .header("x-a", "1")
                .secret_header("authorization", "t"),
        );
        let mut r = Request::new("PUT", "https://x/moved");
        r.headers.push(crate::Header {
            name: "x-b".into(),
            value: "2".into(),
            secret: false,
        });
        s.replace_request(moved, r).unwrap();
        let bound = mk(dl(3).session("bg"));
        s.bind(
            bound,
            TaskBinding {
                session: "bg".into(),
                task_id: 77,
                tag: Some("mine".into()),
            },
        )
        .unwrap();
        let bound_by_id = mk(dl(4));
        s.bind(
            bound_by_id,
            TaskBinding {
                session: crate::DEFAULT_SESSION.into(),
                task_id: 78,
                tag: Some(bound_by_id.to_string()),
            },
        )
        .unwrap();
        let waiting = mk(dl(5));
        s.bind(
            waiting,
            TaskBinding {
                session: crate::DEFAULT_SESSION.into(),
                task_id: 79,
                tag: None,
            },
        )
        .unwrap();
        s.fail(waiting, ErrorClass::Transient, "reset").unwrap();
        let partial = mk(dl(6));
        s.append_received(partial, b"0123456789").unwrap();
        let resumable = mk(dl(7));
        s.store_resume_data(resumable, b"resume").unwrap();
        let done = mk(dl(8));
        s.complete(done, Some(201)).unwrap();
        let failed = mk(dl(9));
        s.fail(failed, ErrorClass::Permanent, "gone").unwrap();
        let cancelled = mk(dl(10));
        s.cancel(cancelled).unwrap();
        let broken = mk(dl(11));
        drop(s);
        std::fs::write(
            d.path()
                .join("transfers")
                .join(broken.to_string())
                .join("manifest"),
            b"junk",
        )
        .unwrap();
        // Damage behind the journal's back: the index learns of it when rebuilt.
        std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
        let s = small().open(d.path()).unwrap();
        let truth = s.scan().unwrap().transfers;
        assert_plans_match(&s, &truth, "states");
        // Tasks that find their records each way there is.
        use crate::reconcile::{self, ReconcileOptions, Sessions, Task};
        let t = |id: u64, url: &str| Task::running(crate::DEFAULT_SESSION, id, url);
        let tasks = vec![
            t(1, "https://x/f0").tag("order-7"),
            Task::running("bg", 77, "https://x/f3").tag("mine"),
            t(78, "https://x/f4").tag(bound_by_id.to_string()),
            t(79, "https://x/f5").failed("again"),
            t(80, "https://x/f6"),
            t(81, "https://x/f1").tag(late.to_string()),
            t(82, "https://x/f2").tag(soon.to_string()).failed("x"),
            t(83, "https://x/moved")
                .tag(moved.to_string())
                .completed(500),
            t(84, "https://x/f8").tag(done.to_string()).completed(201),
            t(85, "https://x/f11").tag(broken.to_string()),
            t(86, "https://x/nothing"),
        ];
        let (records, corrupt) = whole_records(&s);
        assert_eq!(corrupt, vec![broken]);
        let opts = ReconcileOptions::default();
        for sessions in [Sessions::All, Sessions::only(["bg"])] {
            let tasks: Vec<Task> = tasks
                .iter()
                .filter(|t| sessions.contains(&t.session))
                .cloned()
                .collect();
            let want = reconcile::plan(&sessions, &tasks, &records, &corrupt, now, &opts).unwrap();
            let got = s.reconcile_with(&sessions, &tasks, now, &opts).unwrap();
            assert_eq!(got, want);
            assert!(s.index.lock().unwrap().is_some(), "planned from the index");
        }
        let _ = (waiting, partial, resumable, failed, cancelled);
    }

    /// An index written by an earlier release (index version 1: no facts, no checksum; version
    /// 2: no facts table), following this boot's journal, is rebuilt rather than read: the
    /// fixture store lists and plans exactly as its directories say, and the index is then of
    /// the current version.
    #[test]
    fn an_index_of_an_earlier_version_is_rebuilt_not_misread() {
        fn copy_tree(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    copy_tree(&e.path(), &to.join(e.file_name()));
                } else {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
        assert_eq!(fmt::INDEX_VERSION, 3);
        for old in [1u32, 2] {
            let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
            let d = tempfile::tempdir().unwrap();
            let root = d.path().join("store");
            copy_tree(&fixtures.join("store"), &root);
            // A journal of this boot, then the old index made to follow it.
            drop(small().index(false).open(&root).unwrap());
            let generation = Journal::open(
                Arc::new(crate::fs::Real),
                &root,
                false,
                Duration::from_secs(1),
                SMALL,
            )
            .unwrap()
            .unwrap()
            .generation()
            .unwrap();
            std::fs::copy(
                fixtures.join(format!("index-v{old}.redb")),
                root.join(INDEX_FILE),
            )
            .unwrap();
            {
                let db = redb::Database::open(root.join(INDEX_FILE)).unwrap();
                let tx = db.begin_write().unwrap();
                {
                    let mut t = tx.open_table(META).unwrap();
                    let was = t.get(META_KEY).unwrap().unwrap().value().to_vec();
                    assert_eq!(
                        was[..4],
                        old.to_le_bytes(),
                        "the fixture is index version {old}"
                    );
                    let mut m: IndexMeta = crate::format::decode_exact(&was[4..]).unwrap();
                    m.generation = generation;
                    m.consumed = JOURNAL_HEADER_LEN as u64;
                    let mut new = old.to_le_bytes().to_vec();
                    new.extend(postcard::to_allocvec(&m).unwrap());
                    t.insert(META_KEY, new.as_slice()).unwrap();
                }
                tx.commit().unwrap();
            }
            let holder = small().open(&root).unwrap();
            assert_eq!(holder.list(&Filter::all()).unwrap().len(), 4);
            assert_follows(&holder, &format!("an index of version {old}"));
            drop(holder);
            let db = redb::Database::open(root.join(INDEX_FILE)).unwrap();
            let tx = db.begin_read().unwrap();
            let meta = tx
                .open_table(META)
                .unwrap()
                .get(META_KEY)
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            assert_eq!(meta[..4], fmt::INDEX_VERSION.to_le_bytes());
        }
    }

    /// The parts the records planning reads hold: `(facts only, facts and state, whole)`.
    fn holds(s: &Store) -> (usize, usize, usize) {
        let (records, wholes) = s.index_facts().unwrap();
        let n = |h: Holds| records.iter().filter(|r| r.holds() == h).count();
        let counts = (n(Holds::Facts), n(Holds::State), n(Holds::Whole));
        assert_eq!(wholes.is_some(), counts.0 + counts.1 > 0);
        counts
    }

    /// Planning reads the facts table; the request of a `recreate`/`resume` and the outcome of
    /// a `deliver` are read from the whole records' table, or (when a change since the index
    /// was written is in the journal) from the state the journal holds. The plans equal the
    /// plans from whole records throughout; a whole-records table that lacks records is read
    /// around (their directories) and the index then deleted, to be rebuilt.
    #[test]
    fn planning_reads_the_facts_table_and_the_rest_on_demand() {
        let d = tempfile::tempdir().unwrap();
        let s = small().open(d.path()).unwrap();
        let ids = ids(40, &s);
        for (k, &id) in ids.iter().enumerate() {
            match k % 5 {
                0 => drop(s.complete(id, Some(200)).unwrap()),
                1 => drop(s.fail(id, ErrorClass::Transient, "reset").unwrap()),
                2 => s
                    .replace_request(id, crate::Request::new("PUT", format!("https://y/{k}")))
                    .unwrap(),
                _ => {}
            }
        }
        drop(s);
        // Written into the index whole (a rebuild), then read back as facts.
        std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
        let s = small().open(d.path()).unwrap();
        assert_eq!(holds(&s), (40, 0, 0));
        let truth = s.scan().unwrap().transfers;
        assert_plans_match(&s, &truth, "facts table");

        // Changes since (fewer than a checkpoint's worth): a state the journal holds, or a
        // new transfer whole.
        drop(s.complete(ids[3], Some(201)).unwrap());
        drop(s.fail(ids[4], ErrorClass::Permanent, "gone").unwrap());
        s.replace_request(ids[8], crate::Request::new("PUT", "https://z/8"))
            .unwrap();
        drop(s.cancel(ids[9]).unwrap());
        s.create(NewTransfer::download("https://x/new")).unwrap();
        let (facts, state, whole) = holds(&s);
        assert_eq!((facts, state, whole), (36, 4, 1));
        let truth = s.scan().unwrap().transfers;
        assert_plans_match(&s, &truth, "facts table and journal");

        // The whole records' table loses its chunks; the facts table keeps them.
        drop(s);
        {
            let db = redb::Database::open(d.path().join(INDEX_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(CHUNKS).unwrap().retain(|_, _| false).unwrap();
            tx.commit().unwrap();
        }
        let s = small().open(d.path()).unwrap();
        let (records, corrupt) = whole_records(&s);
        let now = crate::transfer::from_ms(1_900_000_000_000);
        let opts = crate::ReconcileOptions::default();
        let want =
            crate::reconcile::plan(&crate::Sessions::All, &[], &records, &corrupt, now, &opts);
        let got = s.reconcile_with(&crate::Sessions::All, &[], now, &opts);
        assert_eq!(got.unwrap(), want.unwrap());
        assert!(
            !d.path().join(INDEX_FILE).exists(),
            "a lacking index is deleted"
        );
        assert_follows(&s, "rebuilt after lacking whole records");
        assert_eq!(holds(&s), (s.scan().unwrap().transfers.len(), 0, 0));
    }

    /// The records as the directories hold them, whole, and the corrupt ids.
    fn whole_records(s: &Store) -> (Vec<crate::Record>, Vec<crate::TransferId>) {
        let scanned = s.gather_scanned(true).unwrap();
        let corrupt = scanned.corrupt.iter().map(|(id, _)| *id).collect();
        let records = scanned
            .transfers
            .into_iter()
            .map(|(transfer, has_resume_data)| crate::Record {
                transfer,
                has_resume_data,
            })
            .collect();
        (records, corrupt)
    }

    fn ids(n: usize, s: &Store) -> Vec<crate::TransferId> {
        (0..n)
            .map(|i| {
                let t = if i % 3 == 0 {
                    NewTransfer::upload(format!("https://x/u{i}"), UploadSource::Bytes(vec![7; 10]))
                } else {
                    NewTransfer::download(format!("https://x/d{i}"))
                };
                s.create(t).unwrap()
            })
            .collect()
    }

    #[test]
    fn the_index_follows_changes_from_a_handle_that_does_not_hold_it() {
        let d = tempfile::tempdir().unwrap();
        let holder = small().open(d.path()).unwrap();
        let other = small().index(false).open(d.path()).unwrap();
        assert!(
            holder.index.lock().unwrap().is_some(),
            "the first handle holds the index"
        );
        let mut all = ids(6, &holder);
        all.extend(ids(6, &other));
        all.extend(
            other
                .create_batch(
                    (0..20)
                        .map(|i| NewTransfer::download(format!("https://x/b{i}")))
                        .collect(),
                )
                .unwrap(),
        );
        assert_follows(&holder, "creates");
        let src = d.path().join("done.bin");
        for (i, id) in all.iter().copied().enumerate() {
            // Every other change comes from the handle that does not hold the index.
            let s = if i % 2 == 0 { &other } else { &holder };
            let download = s.get(id).unwrap().manifest.kind == crate::Kind::Download;
            let b = TaskBinding {
                session: crate::DEFAULT_SESSION.into(),
                task_id: i as u64 + 1,
                tag: Some(id.to_string()),
            };
            let step = match i % 7 {
                0 => s.bind(id, b).map(|_| ()),
                1 => s.progress(id, 5, Some(10), Durability::Immediate),
                2 => s.complete(id, Some(200)).map(|_| ()),
                3 => s.fail(id, ErrorClass::Transient, "timeout").map(|_| ()),
                4 => s.cancel(id).map(|_| ()),
                5 => s.remove(id),
                _ if download => s.store_resume_data(id, b"resume"),
                _ => s.complete(id, None).map(|_| ()),
            };
            step.unwrap();
            if i % 5 == 0 && download && i % 7 == 6 {
                std::fs::write(&src, b"body").unwrap();
                s.accept_download(id, &src).unwrap();
            }
            if i % 4 == 0 {
                // Acknowledged outcomes purge the record.
                let _ = s.acknowledge(id);
            }
            assert_follows(&holder, &format!("step {i}"));
            if i % 9 == 0 {
                assert!(holder.release_index());
            }
        }
        drop(holder);
        drop(other);
        let again = small().open(d.path()).unwrap();
        assert_follows(&again, "reopened");
        // A damaged manifest, found by a rebuild: quarantined alike from the index and the
        // directories.
        drop(again);
        let victim = all.iter().rev().find_map(|id| {
            let m = d
                .path()
                .join("transfers")
                .join(id.to_string())
                .join("manifest");
            m.exists().then_some(m)
        });
        let mut bytes = std::fs::read(victim.as_ref().unwrap()).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(victim.unwrap(), bytes).unwrap();
        std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
        let again = small().open(d.path()).unwrap();
        assert_eq!(again.gather(true).unwrap().corrupt.len(), 1);
        assert_follows(&again, "a damaged manifest");
    }

    /// The journal's frames: (offset, length).
    fn frames(root: &Path) -> Vec<(usize, usize)> {
        let b = std::fs::read(root.join(JOURNAL_FILE)).unwrap();
        let mut at = JOURNAL_HEADER_LEN;
        let mut out = Vec::new();
        while let Some((_, n)) = b.get(at..).and_then(fmt::decode_frame) {
            out.push((at, n));
            at += n;
        }
        assert_eq!(at, b.len(), "the journal parses to its end");
        out
    }

    /// Cuts the journal at byte `at`, as if the process appending it was killed there.
    fn cut_journal(root: &Path, at: usize) {
        let j = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join(JOURNAL_FILE))
            .unwrap();
        j.set_len(at as u64).unwrap();
    }

    #[test]
    fn a_change_killed_before_its_entry_is_read_from_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let holder = small().open(d.path()).unwrap();
        let id = ids(1, &holder)[0];
        holder.list(&Filter::all()).unwrap();
        let other = small().index(false).open(d.path()).unwrap();
        let before = frames(d.path()).len();
        let b = TaskBinding {
            session: crate::DEFAULT_SESSION.into(),
            task_id: 9,
            tag: None,
        };
        other.bind(id, b.clone()).unwrap();
        let f = frames(d.path());
        assert_eq!(f.len(), before + 2, "an intent and an entry");
        // The process died after writing the state and before journaling the entry.
        let (last_at, _) = f[f.len() - 1];
        cut_journal(d.path(), last_at);
        let t = holder.list(&Filter::all()).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].state.binding, Some(b));
        assert_follows(&holder, "after the lost entry");
    }

    #[test]
    fn a_batch_killed_before_its_entries_is_read_from_the_directories() {
        let d = tempfile::tempdir().unwrap();
        let holder = small().open(d.path()).unwrap();
        ids(1, &holder);
        holder.list(&Filter::all()).unwrap();
        let other = small().index(false).open(d.path()).unwrap();
        let before = frames(d.path()).len();
        let batch = other
            .create_batch(
                (0..20)
                    .map(|i| NewTransfer::download(format!("https://x/b{i}")))
                    .collect(),
            )
            .unwrap();
        let f = frames(d.path());
        assert_eq!(f.len(), before + 40, "an intent and an entry per member");
        // The process died after the members were renamed into place, before their entries
        // were journaled: each member's intent alone must send the holder to its directory.
        let (first_entry_at, _) = f[before + 20];
        cut_journal(d.path(), first_entry_at);
        let listed: BTreeSet<TransferId> = holder
            .list(&Filter::all())
            .unwrap()
            .iter()
            .map(Transfer::id)
            .collect();
        assert!(
            batch.iter().all(|id| listed.contains(id)),
            "every member listed"
        );
        assert_follows(&holder, "after the lost entries");
    }

    #[test]
    fn a_deleted_or_damaged_index_is_rebuilt_from_the_directories() {
        let d = tempfile::tempdir().unwrap();
        let s = small().open(d.path()).unwrap();
        ids(5, &s);
        let want = s.list(&Filter::all()).unwrap();
        drop(s);
        let index = d.path().join(INDEX_FILE);
        for damage in ["garbage", "truncated", "deleted"] {
            match damage {
                "garbage" => std::fs::write(&index, vec![0x5a; 64 * 1024]).unwrap(),
                "truncated" => {
                    let b = std::fs::read(&index).unwrap();
                    std::fs::write(&index, &b[..b.len() / 3]).unwrap();
                }
                _ => std::fs::remove_file(&index).unwrap(),
            }
            let s = small().open(d.path()).unwrap();
            assert_eq!(s.list(&Filter::all()).unwrap(), want, "{damage}");
            drop(s);
        }
    }

    /// Rewrites the journal's header as another boot wrote it, keeping its frames.
    fn from_another_boot(root: &Path) {
        let p = root.join(JOURNAL_FILE);
        let mut b = std::fs::read(&p).unwrap();
        let mut h = fmt::decode_journal_header(&b).unwrap();
        h.boot = Boot::Id([0xee; 16]);
        b[..JOURNAL_HEADER_LEN].copy_from_slice(&fmt::encode_journal_header(&h));
        std::fs::write(&p, b).unwrap();
    }

    #[test]
    fn a_journal_from_another_boot_is_never_trusted() {
        let d = tempfile::tempdir().unwrap();
        let s = small().open(d.path()).unwrap();
        let all = ids(4, &s);
        drop(s);
        // Lost in the power cut: a removal whose journal frames never reached the disk. Only
        // a rebuild from the directories can know.
        std::fs::rename(
            d.path().join(TRANSFERS).join(all[0].to_string()),
            d.path().join("trash").join(all[0].to_string()),
        )
        .unwrap();
        from_another_boot(d.path());
        let s = small().open(d.path()).unwrap();
        let listed: Vec<_> = s
            .list(&Filter::all())
            .unwrap()
            .iter()
            .map(Transfer::id)
            .collect();
        assert_eq!(listed.len(), 3);
        assert!(!listed.contains(&all[0]));
        assert_eq!(frames(d.path()).len(), 0, "the journal started afresh");
        let h = fmt::decode_journal_header(&std::fs::read(d.path().join(JOURNAL_FILE)).unwrap());
        assert!(h.is_some_and(|h| h.boot.same(&boot_of(
            crate::fs::Backend::boot(&crate::fs::Real).unwrap()
        ))));
    }

    #[test]
    fn a_damaged_frame_restarts_the_journal_and_rebuilds_the_index() {
        let d = tempfile::tempdir().unwrap();
        let holder = small().open(d.path()).unwrap();
        let all = ids(3, &holder);
        holder.list(&Filter::all()).unwrap();
        let other = small().index(false).open(d.path()).unwrap();
        for id in &all {
            other.progress(*id, 1, None, Durability::Immediate).unwrap();
        }
        let f = frames(d.path());
        let (at, _) = f[f.len() / 2];
        let p = d.path().join(JOURNAL_FILE);
        let mut b = std::fs::read(&p).unwrap();
        b[at + 10] ^= 0x01;
        std::fs::write(&p, &b).unwrap();
        let generation = fmt::decode_journal_header(&b).unwrap().generation;
        assert_follows(&holder, "after the damaged frame");
        let now = fmt::decode_journal_header(&std::fs::read(&p).unwrap()).unwrap();
        assert_ne!(now.generation, generation, "a new journal");
        // And the index keeps following it.
        other
            .progress(all[0], 2, None, Durability::Immediate)
            .unwrap();
        assert_follows(&holder, "after the restart");
    }

    #[test]
    fn a_consumed_journal_is_cut_back_and_the_index_still_follows() {
        let d = tempfile::tempdir().unwrap();
        let holder = small().open(d.path()).unwrap();
        let all = ids(4, &holder);
        let other = small().index(false).open(d.path()).unwrap();
        for i in 0..40u64 {
            other
                .progress(all[(i % 4) as usize], i, None, Durability::Immediate)
                .unwrap();
        }
        let p = d.path().join(JOURNAL_FILE);
        assert!(std::fs::metadata(&p).unwrap().len() > SMALL.compact);
        assert!(holder.release_index());
        assert_eq!(
            std::fs::metadata(&p).unwrap().len(),
            JOURNAL_HEADER_LEN as u64
        );
        other
            .progress(all[1], 99, None, Durability::Immediate)
            .unwrap();
        assert_follows(&holder, "after compaction");
        assert_eq!(holder.get(all[1]).unwrap().state.bytes_done, 99);
    }
}
