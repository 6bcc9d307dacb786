//! Groups: files uploaded together. Counts survive acknowledgement because every purged
//! member leaves a checksummed record in its group's `purged` file; "finished" is claimed once
//! by creating the group's `finished` file exclusively.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Error, ErrorKind, Result};
use crate::format::group::{
    FAILED, MAX_TALLY_FILE, SUCCEEDED, TALLY_RECORD_LEN, decode_records, encode_record,
    outcome_code,
};
use crate::layout::{FINISHED, GROUPS, PURGED, group_dir_name};
use crate::store::{CancelResult, Store};
use crate::transfer::{Outcome, Phase, TransferId};

/// Where a group stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// Members still in the store (not yet purged), in id order.
    pub members: Vec<TransferId>,
    /// Members ever seen: live ones plus purged ones.
    pub total: usize,
    /// Members that have not ended.
    pub active: usize,
    /// Members that succeeded.
    pub succeeded: usize,
    /// Members that failed for good.
    pub failed: usize,
    /// Members cancelled.
    pub cancelled: usize,
    /// Bytes done across members (purged members count as fully done).
    pub bytes_done: u64,
    /// Bytes expected across members, where known.
    pub bytes_total: u64,
    /// True when every member has ended.
    pub all_ended: bool,
    /// True when "finished" has been claimed.
    pub finished_claimed: bool,
}

/// The answer of [`Store::claim_group_finished`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupClaim {
    /// This call claimed "finished"; no other caller ever will.
    Won(GroupSummary),
    /// Another caller claimed it first.
    Lost,
    /// Some member has not ended yet.
    NotFinished(GroupSummary),
}

impl Store {
    fn group_dir(&self, name: &str) -> PathBuf {
        self.dir(GROUPS).join(group_dir_name(name))
    }

    /// Creates the group's directory if needed, syncing `groups/` when it is new.
    fn ensure_group_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.group_dir(name);
        if self.core.fs.create_dir(&d)? {
            self.core.fs.sync_dir(&self.dir(GROUPS))?;
        }
        Ok(d)
    }

    /// Records a member's final outcome before it is purged. Called with the member's lock
    /// held; a crash after this and before the purge leaves the member both live and tallied,
    /// which the counts treat as one member.
    pub(crate) fn tally(
        &self,
        group: &str,
        id: TransferId,
        outcome: &Outcome,
        bytes: u64,
    ) -> Result<()> {
        let d = self.ensure_group_dir(group)?;
        let path = d.join(PURGED);
        let (f, created) = self.core.fs.open_or_create(&path)?;
        self.core.fs.lock(&f, &path, self.lock_timeout())?;
        let len = self.core.fs.len(&f, &path)?;
        // Append at a record boundary: a torn last record is overwritten.
        let at = len - len % TALLY_RECORD_LEN as u64;
        let rec = encode_record(id, outcome_code(outcome), bytes);
        self.core.fs.write_at(&f, &path, at, &rec)?;
        self.core.fs.sync_data(&f, &path)?;
        if created {
            self.core.fs.sync_dir(&d)?;
        }
        Ok(())
    }

    fn tallies(&self, name: &str) -> Result<HashMap<TransferId, (u8, u64)>> {
        let path = self.group_dir(name).join(PURGED);
        match self.core.fs.read_bounded(&path, MAX_TALLY_FILE) {
            Ok(b) => Ok(decode_records(&b)),
            Err(e) if e.is_not_found_io() => Ok(HashMap::new()),
            Err(e) => Err(e),
        }
    }

    /// Members, counts and aggregate progress of a group. Counts include purged members.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] when no member was ever seen; I/O errors.
    pub fn group(&self, name: &str) -> Result<GroupSummary> {
        let live = self.list(&crate::Filter::all().group(name))?;
        let tallied = self.tallies(name)?;
        let mut g = GroupSummary {
            name: name.to_owned(),
            members: live.iter().map(|t| t.id()).collect(),
            total: 0,
            active: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            bytes_done: 0,
            bytes_total: 0,
            all_ended: false,
            finished_claimed: false,
        };
        let mut count = |code: u8| match code {
            SUCCEEDED => g.succeeded += 1,
            FAILED => g.failed += 1,
            _ => g.cancelled += 1,
        };
        for t in &live {
            if tallied.contains_key(&t.id()) {
                continue;
            }
            match &t.state.outcome {
                Some(o) if t.state.phase.is_terminal() => count(outcome_code(o)),
                _ => g.active += 1,
            }
            g.bytes_done = g.bytes_done.saturating_add(t.state.bytes_done);
            g.bytes_total = g.bytes_total.saturating_add(
                t.state
                    .bytes_total
                    .unwrap_or_else(|| t.manifest.payload.len()),
            );
        }
        for (code, bytes) in tallied.values() {
            count(*code);
            g.bytes_done = g.bytes_done.saturating_add(*bytes);
            g.bytes_total = g.bytes_total.saturating_add(*bytes);
        }
        g.total = g.active + g.succeeded + g.failed + g.cancelled;
        if g.total == 0 {
            return Err(Error::not_found(format!("group {name:?}")));
        }
        g.all_ended = g.active == 0;
        g.finished_claimed = self
            .core
            .fs
            .lstat(&self.group_dir(name).join(FINISHED))
            .is_ok();
        Ok(g)
    }

    /// Claims "the last member ended" for a group. Exactly one caller, across threads and
    /// processes, ever gets [`GroupClaim::Won`].
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown group; I/O errors.
    pub fn claim_group_finished(&self, name: &str) -> Result<GroupClaim> {
        self.core.fs.check()?;
        let mut g = self.group(name)?;
        if !g.all_ended {
            return Ok(GroupClaim::NotFinished(g));
        }
        let d = self.ensure_group_dir(name)?;
        let path = d.join(FINISHED);
        match self.core.fs.create_new(&path) {
            Ok(_) => {
                self.core.fs.sync_dir(&d)?;
                g.finished_claimed = true;
                tracing::debug!(group = name, "group finished claimed");
                Ok(GroupClaim::Won(g))
            }
            Err(e) if crate::fs::is_exists(&e) => Ok(GroupClaim::Lost),
            Err(e) => Err(e),
        }
    }

    /// Cancels every member of a group that has not ended, with one group commit (one shared
    /// flush per part, see [`Store::batch`]).
    ///
    /// # Errors
    /// The first error met, in list order; the other members' cancels stay applied.
    pub fn cancel_group(&self, name: &str) -> Result<Vec<(TransferId, CancelResult)>> {
        let ids: Vec<TransferId> = self
            .list(&crate::Filter::all().group(name))?
            .into_iter()
            .filter(|t| t.state.phase != Phase::Cancelled)
            .map(|t| t.id())
            .collect();
        let mut batch = self.batch();
        for id in &ids {
            batch.cancel(*id);
        }
        let mut out = Vec::new();
        let mut first = None;
        for (id, r) in ids.into_iter().zip(batch.commit()) {
            match r {
                Ok(crate::Changed::Cancelled(c)) => out.push((id, c)),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.map_or(Ok(out), Err)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn group_dir_names_are_safe() {
        assert_eq!(crate::layout::group_dir_name("a/../b"), "g-612f2e2e2f62");
    }
}
