//! The change journal (FORMAT.md §1.6, §3.8): intent and entry frames appended around every
//! change to a transfer, under its lock; whether it is of this boot; reading its unconsumed
//! tail; cutting it back once the index consumed it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::format::index::{
    self as fmt, Boot, EntryBody, Frame, JOURNAL_HEADER_LEN, JournalHeader,
};
use crate::fs::{Backend, BootMark, Fs, Handle};
use crate::layout::{INDEX_FILE, JOURNAL_FILE};
use crate::{Error, Result, TransferId};

/// A journal longer than this is started afresh (and the index rebuilt) rather than read.
pub(super) const MAX_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

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
pub(super) fn boot_of(m: BootMark) -> Boot {
    match m {
        BootMark::Id(id) => Boot::Id(id),
        BootMark::Since(ms) => Boot::Since(ms),
    }
}

/// The store's change journal, open for appending.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(super) path: PathBuf,
    /// The journal's own view of the store's backend: it never syncs, and its failures never
    /// poison the store.
    pub(super) fs: Fs,
    /// Appends from this process go one at a time: the shared lock is per open file, so one
    /// thread's unlock would otherwise end another's.
    pub(super) file: Mutex<Handle>,
    /// How many changes in this process keep the shared lock between their intent and their
    /// entry ([`Journal::intent_held`]); the lock is released when the last one ends. Read and
    /// written only with `file` locked.
    pub(super) holds: std::sync::atomic::AtomicUsize,
    pub(super) boot: Boot,
    pub(super) lock_timeout: Duration,
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

    /// [`Journal::entries`] for the changes of a group commit this hold began with.
    pub(crate) fn entries(self, items: &[(TransferId, &EntryBody)]) {
        self.journal.entries(items);
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
    pub(super) fn header(&self) -> Option<JournalHeader> {
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

    /// [`Journal::intents`], keeping this process's shared lock on the journal until the
    /// returned hold's entries (or its drop): a group commit's intents, in one append.
    pub(crate) fn intents_held(&self, root: &Path, ids: &[TransferId]) -> Result<Option<Held<'_>>> {
        let frames: Vec<u8> = ids
            .iter()
            .flat_map(|id| fmt::encode_frame(fmt::TAG_INTENT, id.as_bytes(), &[]))
            .collect();
        match self.append_keep(&frames, true) {
            Ok(()) => Ok(Some(Held { journal: self })),
            Err(e) => self.lost_intents(root, ids.len(), e).map(|()| None),
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

    pub(super) fn len(&self) -> Result<u64> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        self.fs.len(&f, &self.path)
    }

    pub(super) fn read_from(&self, off: u64, len: u64) -> Result<Vec<u8>> {
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
    pub(super) fn cut_back(&self, end: u64) -> Result<Option<[u8; 16]>> {
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
pub(super) enum Last {
    /// An entry, at this offset.
    Entry(EntryBody, u64),
    /// An intent with no entry after it, at this offset.
    Intent(u64),
}

/// Parses the journal tail starting at file offset `base`: the last frame per transfer, and
/// the offset after the last whole frame. A frame still being appended (the bytes end before
/// its header says it does) ends the tail; `None` when a whole frame is damaged.
pub(super) fn parse_tail(tail: &[u8], base: u64) -> Option<(HashMap<[u8; 16], Last>, u64)> {
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
