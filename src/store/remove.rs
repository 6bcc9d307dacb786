//! Removing transfers: acknowledge (purge an ended one), remove, and quarantine; each renames
//! the directory into `trash/` or `quarantine/` first.

use std::path::PathBuf;

use super::{Store, lock};
use crate::error::{Error, ErrorKind, Result};
use crate::layout::{QUARANTINE, TRANSFERS, TRASH};
use crate::transfer::{Outcome, TransferId};

impl Store {
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
    pub(super) fn move_to_trash(&self, id: TransferId) -> Result<()> {
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

    pub(super) fn forget(&self, id: TransferId) {
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
}
