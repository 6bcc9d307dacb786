//! The derived index (FORMAT.md §1.6, §1.7, §3.8): `index.redb` keeps every transfer's manifest and newest
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

mod db;
mod journal;
mod reread;
#[cfg(test)]
mod tests;

pub(crate) use journal::{Held, Journal, Thresholds};

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use db::{IndexFile, db_err};
use journal::{Last, MAX_JOURNAL_BYTES, parse_tail};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use reread::{rebuild, reread};

use crate::format::index::{self as fmt, Holds, IndexMeta, IndexRecord, JOURNAL_HEADER_LEN};
use crate::fs::{Backend, Fs};
use crate::layout::INDEX_FILE;
use crate::{Error, Result, TransferId};

pub(super) const CHUNKS: TableDefinition<u16, &[u8]> = TableDefinition::new("chunks");

/// The same chunks' facts alone: what planning reads.
const FACTS: TableDefinition<u16, &[u8]> = TableDefinition::new("facts");

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(super) const META_KEY: &str = "meta";

/// The index's page cache: its values are read once per reconcile, so a large cache only
/// costs resident memory.
const CACHE_BYTES: usize = 256 * 1024;

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
    pub(super) fn write(
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
    pub(super) fn compact(
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
pub(super) fn apply_changes(
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
    pub(super) fn new(tx: redb::ReadTransaction, fs: Fs, root: &Path) -> Wholes {
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
