//! Group commit (FORMAT.md §3.9): many compare-and-set changes of many transfers made durable
//! with one shared flush per part instead of one sync each. Each transfer's changes are
//! combined in memory and its next slot written once, under its lock, and the lock is held
//! until the shared flush returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use super::{Core, lock};
use crate::error::{Error, Result};
use crate::fs::Handle;
use crate::layout::TRANSFERS;
use crate::state_file::Locked;
use crate::transfer::{Manifest, State, TransferId};

/// Members per thread below which a group commit does not start another thread.
const MEMBERS_PER_THREAD: usize = 128;

/// A change that reads the manifest: its answer, and whether the state changed.
type WithManifestFn<'a, A> = dyn FnOnce(&Manifest, &mut State) -> Result<(A, bool)> + Send + 'a;
/// A change of the state alone: its answer, and whether the state changed.
type StateOnlyFn<'a, A> = dyn FnOnce(&mut State) -> Result<(A, bool)> + Send + 'a;

/// What one change does to a transfer's state.
pub(crate) enum ChangeFn<'a, A> {
    /// The change reads the manifest (its session, its retry policy).
    WithManifest(Box<WithManifestFn<'a, A>>),
    /// The change needs the state alone: the manifest is not read for it.
    StateOnly(Box<StateOnlyFn<'a, A>>),
}

/// One compare-and-set change of a group commit.
pub(crate) struct Change<'a, A> {
    pub(crate) id: TransferId,
    pub(crate) op: &'static str,
    pub(crate) f: ChangeFn<'a, A>,
}

impl<'a, A> Change<'a, A> {
    /// A change that reads the manifest.
    pub(crate) fn new(
        id: TransferId,
        op: &'static str,
        f: impl FnOnce(&Manifest, &mut State) -> Result<(A, bool)> + Send + 'a,
    ) -> Self {
        Change {
            id,
            op,
            f: ChangeFn::WithManifest(Box::new(f)),
        }
    }

    /// A change of the state alone (no manifest read: a flush of coalesced progress costs
    /// the state file only).
    pub(crate) fn state_only(
        id: TransferId,
        op: &'static str,
        f: impl FnOnce(&mut State) -> Result<(A, bool)> + Send + 'a,
    ) -> Self {
        Change {
            id,
            op,
            f: ChangeFn::StateOnly(Box::new(f)),
        }
    }
}

/// A member whose state did not change: its id, manifest (if read), locked file and newest
/// slot's bytes (for the journal).
type Unchanged = (
    TransferId,
    Option<std::sync::Arc<Manifest>>,
    Locked,
    Vec<u8>,
);

/// One transfer of a part: its changes (with their places in the caller's list), and once
/// locked, what the commit learned of it.
struct Member<'a, A> {
    id: TransferId,
    changes: Vec<(usize, Change<'a, A>)>,
}

/// A member whose state file is locked, with its manifest when a change reads it.
struct Held<'a, A> {
    id: TransferId,
    manifest: Option<std::sync::Arc<Manifest>>,
    locked: Locked,
    changes: Vec<(usize, Change<'a, A>)>,
}

/// A member whose next slot was written and awaits the shared flush.
struct Written<A> {
    id: TransferId,
    manifest: Option<std::sync::Arc<Manifest>>,
    locked: Locked,
    slot: Vec<u8>,
    /// Its changes' answers, each with its place.
    answers: Vec<(usize, A)>,
    /// The coalesced progress merged into the slot, to mark written once it is durable.
    merged: Option<(u64, Option<u64>)>,
}

impl Core {
    /// Applies `changes` as a group commit and returns one result per change, in their order.
    /// Transfers are locked in id order, `part_len` at a time; each part is made durable by
    /// one shared flush ([`crate::fs::Fs::sync_group`]) before its locks are released. A change
    /// whose closure fails leaves its transfer as the changes before it left it; a failed
    /// write fails that transfer's changes; a failed flush fails every change of its part that
    /// wrote (a change that wrote nothing keeps its answer) and poisons the store, so every
    /// part after it fails too.
    pub(crate) fn commit<'a, A: Send>(
        &self,
        changes: Vec<Change<'a, A>>,
        part_len: usize,
    ) -> Vec<Result<A>> {
        let n = changes.len();
        let mut out: Vec<Option<Result<A>>> = (0..n).map(|_| None).collect();
        let mut by_id: BTreeMap<TransferId, Vec<(usize, Change<'a, A>)>> = BTreeMap::new();
        for (i, c) in changes.into_iter().enumerate() {
            by_id.entry(c.id).or_default().push((i, c));
        }
        let mut members = by_id
            .into_iter()
            .map(|(id, changes)| Member { id, changes })
            .peekable();
        while members.peek().is_some() {
            let part: Vec<Member<'a, A>> = members.by_ref().take(part_len.max(1)).collect();
            self.commit_part(part, &mut out);
        }
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::invalid("a change of the batch was not run"))))
            .collect()
    }

    /// One part of a group commit: lock every member (in id order), journal their intents,
    /// read, change and write each member's next slot, one shared flush, journal the entries,
    /// release the locks. A large part locks and writes on several threads (each taking its
    /// members in id order, so two commits never wait on each other in a cycle).
    fn commit_part<'a, A: Send>(&self, part: Vec<Member<'a, A>>, out: &mut [Option<Result<A>>]) {
        let fail_all = |out: &mut [Option<Result<A>>], members: Vec<Member<'a, A>>, e: &Error| {
            for m in members {
                for (i, _) in m.changes {
                    set(out, i, Err(e.duplicate()));
                }
            }
        };
        if let Err(e) = self.fs.check() {
            return fail_all(out, part, &e);
        }
        // Opened before anything of the part is written, so its `syncfs` reports every
        // write-back error of these writes (Linux reports them per open file since 5.8).
        let transfers = self.root.join(TRANSFERS);
        let sync_fs = match self.fs.open_dir(&transfers) {
            Ok(h) => self.fs.can_sync_fs(&h).then_some(h),
            Err(e) => return fail_all(out, part, &e),
        };
        // Lock every member. On several threads only by trying (a thread that waited while
        // another held later locks of this commit could close a cycle with another commit):
        // if any member is busy, every lock is given back and all are taken again on this
        // thread, in id order, waiting for each.
        let mut held: Vec<Held<'a, A>> = Vec::with_capacity(part.len());
        let mut again: Vec<Member<'a, A>> = Vec::new();
        let parallel = self.threads_for(part.len()) > 1;
        let tries = if parallel {
            self.par_map(part, |m| self.lock_member(m, false))
        } else {
            again = part;
            Vec::new()
        };
        for r in tries {
            match r {
                Ok(h) => held.push(h),
                Err((m, e)) if matches!(e.kind(), crate::ErrorKind::Busy { .. }) => again.push(m),
                Err((m, e)) => fail_all(out, vec![m], &e),
            }
        }
        if !again.is_empty() {
            if parallel {
                again.extend(held.drain(..).map(|h| Member {
                    id: h.id,
                    changes: h.changes,
                }));
                again.sort_by_key(|m| m.id);
            }
            for m in again {
                match self.lock_member(m, true) {
                    Ok(h) => held.push(h),
                    Err((m, e)) => fail_all(out, vec![m], &e),
                }
            }
        }
        let ids: Vec<TransferId> = held.iter().map(|h| h.id).collect();
        let journal = match &self.journal {
            Some(j) if !ids.is_empty() => match j.intents_held(&self.root, &ids) {
                Ok(h) => h,
                Err(e) => {
                    for h in held {
                        for (i, _) in h.changes {
                            set(out, i, Err(e.duplicate()));
                        }
                    }
                    return;
                }
            },
            _ => None,
        };
        // Read, change in memory, write each member's next slot once, without syncing.
        let mut written: Vec<Written<A>> = Vec::with_capacity(held.len());
        let mut unchanged: Vec<Unchanged> = Vec::new();
        for (done, answers) in self.par_map(held, |h| self.change_one(h)) {
            for (i, r) in answers {
                set(out, i, r);
            }
            match done {
                Some(Ok(w)) => written.push(w),
                Some(Err(u)) => unchanged.push(u),
                None => {}
            }
        }
        // The shared flush, every member still locked.
        let files: Vec<(&Handle, &Path)> = written
            .iter()
            .map(|w| (&w.locked.file, w.locked.path.as_path()))
            .collect();
        // `syncfs` waits for everything dirty on the file system (a download being written
        // beside us): worth it from `shared_sync_min` files on, as for a batch create (§3.1).
        let sync_fs = sync_fs
            .as_ref()
            .filter(|_| files.len() >= self.shared_sync_min)
            .map(|h| (h, transfers.as_path()));
        let flushed = if files.is_empty() {
            Ok(())
        } else {
            self.fs.sync_group(sync_fs, &files).and_then(|how| {
                // A state file created by this commit needs its directory entry synced,
                // which a `syncfs` already did.
                if how == crate::fs::GroupSync::FileSystem {
                    return Ok(());
                }
                // Any failure here (opening the directory too) poisons: the slots are
                // written, and visible once the locks are released.
                written
                    .iter()
                    .filter(|w| w.locked.created)
                    .try_for_each(|w| self.fs.sync_dir(&w.locked.dir))
                    .inspect_err(|e| self.fs.poison(e))
            })
        };
        drop(files);
        if let Some(j) = journal {
            // After a failed flush the written members get no entry: their intents stand, so
            // the index holder reads them from their directories.
            let durable = if flushed.is_ok() { written.len() } else { 0 };
            let bodies: Vec<(TransferId, crate::format::index::EntryBody)> = written
                .iter()
                .take(durable)
                .map(|w| {
                    let body =
                        self.entry_body(w.manifest.as_deref(), &w.locked.dir, w.slot.clone());
                    (w.id, body)
                })
                // A group commit moves no directory: an unchanged member is still in place.
                .chain(unchanged.iter().map(|(id, m, l, bytes)| {
                    (*id, self.entry_body(m.as_deref(), &l.dir, bytes.clone()))
                }))
                .collect();
            let items: Vec<(TransferId, &crate::format::index::EntryBody)> =
                bodies.iter().map(|(id, b)| (*id, b)).collect();
            j.entries(&items);
        }
        match flushed {
            Ok(()) => {
                for w in written {
                    if let Some(p) = w.merged {
                        self.mark_written(w.id, p);
                    }
                    for (i, a) in w.answers {
                        set(out, i, Ok(a));
                    }
                    tracing::debug!(transfer = %w.id, "state written (group commit)");
                    self.states.keep(&self.fs, w.id, w.locked);
                }
            }
            Err(e) => {
                // Every change the flush covered fails; the store is poisoned.
                for w in written {
                    for (i, _) in w.answers {
                        set(out, i, Err(e.duplicate()));
                    }
                }
            }
        }
        // Dropping the unchanged members' files releases their locks.
        drop(unchanged);
    }

    /// `f` over `items`, in order: on up to `group_threads` threads (contiguous shares) when
    /// there are enough items to pay for them, else on this thread.
    fn par_map<T: Send, R: Send>(&self, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
        let threads = self.threads_for(items.len());
        if threads == 1 {
            return items.into_iter().map(f).collect();
        }
        let per = items.len().div_ceil(threads);
        let mut shares: Vec<Vec<T>> = Vec::with_capacity(threads);
        let mut rest = items.into_iter();
        loop {
            let share: Vec<T> = rest.by_ref().take(per).collect();
            if share.is_empty() {
                break;
            }
            shares.push(share);
        }
        let f = &f;
        std::thread::scope(|scope| {
            let mut shares = shares.into_iter();
            let first = shares.next().unwrap_or_default();
            let started: Vec<_> = shares
                .map(|share| {
                    let (tx, rx) = std::sync::mpsc::channel::<Vec<T>>();
                    let spawned = std::thread::Builder::new()
                        .name("waybill-commit".into())
                        .spawn_scoped(scope, move || {
                            rx.recv()
                                .unwrap_or_default()
                                .into_iter()
                                .map(f)
                                .collect::<Vec<R>>()
                        });
                    match spawned {
                        Ok(h) => {
                            // Cannot fail: the thread waits for its share first.
                            let _ = tx.send(share);
                            Ok(h)
                        }
                        Err(_) => Err(share),
                    }
                })
                .collect();
            let mut out: Vec<R> = first.into_iter().map(f).collect();
            for s in started {
                match s {
                    Ok(h) => out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                    Err(share) => out.extend(share.into_iter().map(f)),
                }
            }
            out
        })
    }

    /// How many threads [`Core::par_map`] uses for `n` items.
    fn threads_for(&self, n: usize) -> usize {
        self.group_threads.min(n / MEMBERS_PER_THREAD).max(1)
    }

    /// Locks one member's state file (reading its manifest first when a change reads it),
    /// waiting for the lock (`wait`) or only trying it.
    #[allow(
        clippy::result_large_err,
        reason = "the member is handed back with its error"
    )]
    fn lock_member<'a, A>(
        &self,
        m: Member<'a, A>,
        wait: bool,
    ) -> std::result::Result<Held<'a, A>, (Member<'a, A>, Error)> {
        let reads_manifest = m
            .changes
            .iter()
            .any(|(_, c)| matches!(c.f, ChangeFn::WithManifest(_)));
        let locked = (|| {
            let manifest = if reads_manifest {
                Some(self.manifest(m.id)?)
            } else {
                None
            };
            let dir = self.transfer_dir(m.id);
            let checked = || self.checked_dir_meta(m.id);
            let locked = if wait {
                self.states.lock_for_update(&self.fs, m.id, &dir, checked)?
            } else {
                self.states
                    .try_lock_for_update(&self.fs, m.id, &dir, checked)?
            };
            Ok((manifest, locked))
        })();
        match locked {
            Ok((manifest, locked)) => Ok(Held {
                id: m.id,
                manifest,
                locked,
                changes: m.changes,
            }),
            Err(e) => Err((m, e)),
        }
    }

    /// Reads one locked member, runs its changes in order on its newest state, and writes the
    /// next slot when the state changed. Returns the member (written, unchanged, or `None`
    /// when it failed and its lock is released) and the results known now: every change's
    /// when nothing awaits the flush, else the refused ones'.
    #[allow(clippy::type_complexity)]
    fn change_one<A>(
        &self,
        h: Held<'_, A>,
    ) -> (
        Option<std::result::Result<Written<A>, Unchanged>>,
        Vec<(usize, Result<A>)>,
    ) {
        let Held {
            id,
            manifest,
            locked,
            changes,
        } = h;
        let mut results = Vec::new();
        let slots = match locked.read(&self.fs, id) {
            Ok(s) => s,
            Err(e) => {
                for (i, _) in changes {
                    results.push((i, Err(e.duplicate())));
                }
                return (None, results);
            }
        };
        if slots.newest.is_none() {
            tracing::warn!(transfer = %id, "no valid state slot; state rebuilt from the manifest");
        }
        let mut state = slots.state.clone();
        let mut changed = false;
        let mut merged = None;
        if let Some(p) = lock(&self.pending).get(&id).copied().filter(|p| p.dirty) {
            merged = Some((p.done, p.total));
            if !state.phase.is_terminal()
                && (p.done, p.total) != (state.bytes_done, state.bytes_total)
            {
                state.bytes_done = p.done;
                state.bytes_total = p.total.or(state.bytes_total);
                changed = true;
            }
        }
        let mut answers = Vec::with_capacity(changes.len());
        for (i, c) in changes {
            // A change that fails leaves the state as the changes before it left it.
            let before = state.clone();
            let r = match (c.f, manifest.as_deref()) {
                (ChangeFn::WithManifest(f), Some(m)) => f(m, &mut state),
                (ChangeFn::StateOnly(f), _) => f(&mut state),
                (ChangeFn::WithManifest(_), None) => {
                    Err(Error::invalid("the manifest was not read for this change"))
                }
            };
            match r {
                Ok((a, ch)) => {
                    changed |= ch;
                    answers.push((i, a));
                }
                Err(e) => {
                    tracing::debug!(transfer = %id, op = c.op, error = %e, "change refused");
                    state = before;
                    results.push((i, Err(e)));
                }
            }
        }
        if !changed {
            results.extend(answers.into_iter().map(|(i, a)| (i, Ok(a))));
            if let Some(p) = merged {
                self.mark_written(id, p);
            }
            return (
                Some(Err((id, manifest, locked, slots.newest_bytes()))),
                results,
            );
        }
        match locked.put_next(&self.fs, slots.newest, &state) {
            Ok(slot) => (
                Some(Ok(Written {
                    id,
                    manifest,
                    locked,
                    slot,
                    answers,
                    merged,
                })),
                results,
            ),
            Err(e) => {
                results.extend(answers.into_iter().map(|(i, _)| (i, Err(e.duplicate()))));
                (None, results)
            }
        }
    }

    /// Marks coalesced progress `p` of `id` as written (unless newer progress came meanwhile).
    pub(super) fn mark_written(&self, id: TransferId, p: (u64, Option<u64>)) {
        let mut g = lock(&self.pending);
        if let Some(cur) = g.get_mut(&id)
            && (cur.done, cur.total) == p
        {
            cur.dirty = false;
            cur.last_flush = Instant::now();
        }
    }
}

fn set<A>(out: &mut [Option<Result<A>>], i: usize, r: Result<A>) {
    if let Some(slot) = out.get_mut(i) {
        *slot = Some(r);
    }
}
