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

/// What one change does to a transfer's state: its answer, and whether the state changed.
pub(crate) type ChangeFn<'a, A> = Box<dyn FnOnce(&Manifest, &mut State) -> Result<(A, bool)> + 'a>;

/// One compare-and-set change of a group commit.
pub(crate) struct Change<'a, A> {
    pub(crate) id: TransferId,
    pub(crate) op: &'static str,
    /// Coalesced progress of the transfer rides along, as in a single update.
    pub(crate) merge_pending: bool,
    pub(crate) f: ChangeFn<'a, A>,
}

impl<'a, A> Change<'a, A> {
    pub(crate) fn new(
        id: TransferId,
        op: &'static str,
        f: impl FnOnce(&Manifest, &mut State) -> Result<(A, bool)> + 'a,
    ) -> Self {
        Change {
            id,
            op,
            merge_pending: true,
            f: Box::new(f),
        }
    }
}

/// One transfer of a part: its changes (with their places in the caller's list), and once
/// locked, what the commit learned of it.
struct Member<'a, A> {
    id: TransferId,
    changes: Vec<(usize, Change<'a, A>)>,
}

/// A member whose state file is locked.
struct Held<'a, A> {
    id: TransferId,
    manifest: std::sync::Arc<Manifest>,
    locked: Locked,
    changes: Vec<(usize, Change<'a, A>)>,
}

/// A member whose next slot was written and awaits the shared flush.
struct Written<A> {
    id: TransferId,
    manifest: std::sync::Arc<Manifest>,
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
    /// write fails that transfer's changes; a failed flush fails (and poisons) every change of
    /// its part and of the parts after it.
    pub(crate) fn commit<'a, A>(
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

    /// One part of a group commit.
    fn commit_part<'a, A>(&self, part: Vec<Member<'a, A>>, out: &mut [Option<Result<A>>]) {
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
        // Lock every member, in id order.
        let mut held: Vec<Held<'a, A>> = Vec::with_capacity(part.len());
        for m in part {
            let locked = self.manifest(m.id).and_then(|manifest| {
                let dir = self.transfer_dir(m.id);
                let locked = self
                    .states
                    .lock_for_update(&self.fs, m.id, &dir, || self.checked_dir_meta(m.id))?;
                Ok((manifest, locked))
            });
            match locked {
                Ok((manifest, locked)) => held.push(Held {
                    id: m.id,
                    manifest,
                    locked,
                    changes: m.changes,
                }),
                Err(e) => fail_all(out, vec![m], &e),
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
        let mut unchanged: Vec<(TransferId, std::sync::Arc<Manifest>, Locked, Vec<u8>)> =
            Vec::new();
        for h in held {
            match self.change_one(h, out) {
                Ok(Ok(w)) => written.push(w),
                Ok(Err((id, manifest, locked, bytes))) => {
                    unchanged.push((id, manifest, locked, bytes))
                }
                Err(()) => {}
            }
        }
        // The shared flush, every member still locked.
        let files: Vec<(&Handle, &Path)> = written
            .iter()
            .map(|w| (&w.locked.file, w.locked.path.as_path()))
            .collect();
        let flushed = if files.is_empty() {
            Ok(())
        } else {
            self.fs
                .sync_group(sync_fs.as_ref().map(|h| (h, transfers.as_path())), &files)
                .and_then(|how| {
                    // A state file created by this commit needs its directory entry synced,
                    // which a `syncfs` already did.
                    if how == crate::fs::GroupSync::FileSystem {
                        return Ok(());
                    }
                    written
                        .iter()
                        .filter(|w| w.locked.created)
                        .try_for_each(|w| self.fs.sync_dir(&w.locked.dir))
                })
        };
        drop(files);
        if let Some(j) = journal {
            let bodies: Vec<(TransferId, crate::format::index::EntryBody)> = written
                .iter()
                .map(|w| {
                    (
                        w.id,
                        self.entry_body(&w.manifest, &w.locked.dir, w.slot.clone()),
                    )
                })
                .chain(unchanged.iter().filter_map(|(id, m, l, bytes)| {
                    self.fs
                        .lstat(&l.dir)
                        .is_ok_and(|d| d.is_dir())
                        .then(|| (*id, self.entry_body(m, &l.dir, bytes.clone())))
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

    /// Reads one locked member, runs its changes in order on its newest state, and writes the
    /// next slot when the state changed. `Ok(Ok(written))`, `Ok(Err(unchanged))` with the
    /// newest slot's bytes, or `Err(())` when it failed (its changes' results are set).
    #[allow(clippy::type_complexity)]
    fn change_one<A>(
        &self,
        h: Held<'_, A>,
        out: &mut [Option<Result<A>>],
    ) -> std::result::Result<
        std::result::Result<Written<A>, (TransferId, std::sync::Arc<Manifest>, Locked, Vec<u8>)>,
        (),
    > {
        let Held {
            id,
            manifest,
            locked,
            changes,
        } = h;
        let slots = match locked.read(&self.fs, id) {
            Ok(s) => s,
            Err(e) => {
                for (i, _) in changes {
                    set(out, i, Err(e.duplicate()));
                }
                return Err(());
            }
        };
        if slots.newest.is_none() {
            tracing::warn!(transfer = %id, "no valid state slot; state rebuilt from the manifest");
        }
        let mut state = slots.state.clone();
        let mut changed = false;
        let mut merged = None;
        if changes.iter().any(|(_, c)| c.merge_pending)
            && let Some(p) = lock(&self.pending).get(&id).copied().filter(|p| p.dirty)
        {
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
            match (c.f)(&manifest, &mut state) {
                Ok((a, ch)) => {
                    changed |= ch;
                    answers.push((i, a));
                }
                Err(e) => {
                    tracing::debug!(transfer = %id, op = c.op, error = %e, "change refused");
                    state = before;
                    set(out, i, Err(e));
                }
            }
        }
        if !changed {
            for (i, a) in answers {
                set(out, i, Ok(a));
            }
            if let Some(p) = merged {
                self.mark_written(id, p);
            }
            return Ok(Err((id, manifest, locked, slots.newest_bytes())));
        }
        match locked.put_next(&self.fs, slots.newest, &state) {
            Ok(slot) => Ok(Ok(Written {
                id,
                manifest,
                locked,
                slot,
                answers,
                merged,
            })),
            Err(e) => {
                for (i, _) in answers {
                    set(out, i, Err(e.duplicate()));
                }
                Err(())
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
