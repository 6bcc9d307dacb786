//! The store's side of the derived index: holding it, bringing it up to date, and the
//! planner's view of its records (facts read in place, files decoded only on demand).

use std::path::Path;
use std::time::SystemTime;

use super::read::Gathered;
use super::{Store, lock};
use crate::error::{Corruption, Error, Result};
use crate::format::index::IndexRecord;
use crate::format::manifest;
use crate::layout::{self, MANIFEST};
use crate::transfer::{Kind, Phase, State, Transfer, TransferId};

impl Store {
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
    pub(super) fn decode_indexed(&self, records: &[IndexRecord]) -> Gathered {
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
    pub(super) fn state(&self) -> State {
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
