//! The compare-and-set transaction every lifecycle change runs in: lock the transfer's state
//! file, journal the intent, read the newest slot, apply the change, write the next slot and
//! sync it, journal the entry.

use std::path::Path;
use std::time::Instant;

use super::{Core, Store, lock};
use crate::error::Result;
use crate::layout::RESUME;
use crate::transfer::{Kind, Manifest, State, TransferId};

impl Core {
    /// What the journal records of `id` after a change: its newest state slot `state`, and
    /// whether a download has resume data.
    pub(super) fn entry_body(
        &self,
        manifest: Option<&Manifest>,
        dir: &Path,
        state: Vec<u8>,
    ) -> crate::format::index::EntryBody {
        // Without the manifest, the file tells (an upload never has resume data).
        let resume = manifest.is_none_or(|m| m.kind == Kind::Download)
            && self.fs.lstat(&dir.join(RESUME)).is_ok_and(|m| m.is_file());
        crate::format::index::EntryBody {
            state,
            resume,
            manifest: None,
        }
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
            h.entry(id, &self.entry_body(Some(manifest), dir, state));
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
    pub(crate) fn modify_with<R>(
        &self,
        id: TransferId,
        op: &'static str,
        merge_pending: bool,
        f: impl FnOnce(&Manifest, &mut State, &Path) -> Result<(R, bool)>,
    ) -> Result<R> {
        self.core.modify_with(id, op, merge_pending, f)
    }

    /// A locked read-modify-write of one transfer's state. `f` returns its answer and whether
    /// the state changed; a changed state is written to the other slot and synced before the
    /// lock is released.
    pub(super) fn modify<R>(
        &self,
        id: TransferId,
        op: &'static str,
        f: impl FnOnce(&Manifest, &mut State, &Path) -> Result<(R, bool)>,
    ) -> Result<R> {
        self.modify_with(id, op, true, f)
    }
}
