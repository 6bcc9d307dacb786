//! Progress: durable reports, and coalesced ones kept in memory and written by the background
//! flusher, `flush()` and drop at most once per interval.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::commit::Change;
use super::{Core, Store, lock};
use crate::error::{ErrorKind, Result};
use crate::transfer::TransferId;

#[derive(Debug, Clone, Copy)]
pub(super) struct PendingProgress {
    pub(super) done: u64,
    pub(super) total: Option<u64>,
    pub(super) dirty: bool,
    pub(super) last_flush: Instant,
}

/// The background thread that writes coalesced progress once it is due.
#[derive(Debug)]
pub(super) struct Flusher {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(core: Arc<Core>) -> Option<Flusher> {
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("waybill-flush".into())
            .spawn(move || {
                let (m, cv) = &*signal;
                loop {
                    let wait = core.flush_due().unwrap_or(core.flush_interval);
                    let g = lock(m);
                    if *g {
                        break;
                    }
                    let (g, _) = cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner());
                    if *g {
                        break;
                    }
                }
            });
        match thread {
            Ok(t) => Some(Flusher {
                stop,
                thread: Some(t),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the progress flusher; coalesced progress is written by later reports, flush() and drop");
                None
            }
        }
    }

    pub(super) fn stop(mut self) {
        let (m, cv) = &*self.stop;
        *lock(m) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the progress flusher panicked");
        }
    }
}

impl Core {
    /// True when `p` is dirty and its last write is at least one interval old; then the write
    /// is claimed (its time set to now) so no other thread writes the same transfer within the
    /// interval.
    fn claim_if_due(&self, p: &mut PendingProgress) -> bool {
        if p.dirty && p.last_flush.elapsed() >= self.flush_interval {
            p.last_flush = Instant::now();
            return true;
        }
        false
    }

    /// Writes one transfer's pending progress. A transfer that is gone is forgotten.
    fn flush_one(&self, id: TransferId) -> Result<()> {
        match self.modify_with(id, "flush progress", true, |_, _, _| Ok(((), false))) {
            Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                lock(&self.pending).remove(&id);
                Ok(())
            }
            r => r,
        }
    }

    /// Writes the pending progress of `ids` with one group commit (one shared flush per part);
    /// transfers that are gone are forgotten. Returns the first error, in id order.
    fn flush_many(&self, ids: Vec<TransferId>) -> Result<()> {
        let changes = ids
            .iter()
            .map(|&id| Change::state_only(id, "flush progress", |_| Ok(((), false))))
            .collect();
        let mut first = None;
        for (id, r) in ids.iter().zip(self.commit(changes, self.group_part)) {
            match r {
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                    lock(&self.pending).remove(id);
                }
                Err(e) => {
                    tracing::warn!(transfer = %id, error = %e, "coalesced progress not written");
                    // Due again at once: the claim that took it must not delay it another
                    // interval.
                    if let Some(p) = lock(&self.pending).get_mut(id)
                        && let Some(earlier) = Instant::now().checked_sub(self.flush_interval)
                    {
                        p.last_flush = earlier;
                    }
                    first.get_or_insert(e);
                }
                Ok(()) => {}
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The background flusher's step: writes every report that is due, then says how long
    /// until the next one is (`None` when nothing is pending). Errors are logged; a failed
    /// sync poisons the store, so the caller's next call reports it.
    fn flush_due(&self) -> Option<Duration> {
        let mut due: Vec<TransferId> = {
            let mut g = lock(&self.pending);
            g.iter_mut()
                .filter_map(|(id, p)| self.claim_if_due(p).then_some(*id))
                .collect()
        };
        due.sort_unstable();
        if let Err(e) = self.flush_many(due) {
            tracing::warn!(error = %e, "background flush of coalesced progress failed");
        }
        lock(&self.pending)
            .values()
            .filter(|p| p.dirty)
            .map(|p| self.flush_interval.saturating_sub(p.last_flush.elapsed()))
            .min()
    }
}

impl Store {
    /// Records progress. With [`Durability::Immediate`](crate::Durability::Immediate) it is
    /// synced before returning; with `Coalesced` it is written at most once per flush interval.
    /// Progress on an ended transfer is ignored.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; I/O errors of a write this call performs.
    pub fn progress(
        &self,
        id: TransferId,
        done: u64,
        total: Option<u64>,
        durability: crate::Durability,
    ) -> Result<()> {
        match durability {
            crate::Durability::Immediate => self.modify(id, "progress", |_, s, _| {
                Ok(super::lifecycle::progress_change(s, done, total))
            }),
            crate::Durability::Coalesced => {
                self.core.fs.check()?;
                let due = {
                    let mut g = lock(&self.core.pending);
                    if !g.contains_key(&id) {
                        drop(g);
                        self.manifest(id)?;
                        g = lock(&self.core.pending);
                    }
                    self.core.claim_if_due(report(&mut g, id, done, total))
                };
                if due {
                    self.core.flush_one(id)?;
                } else if self.cfg.background_flush {
                    self.flusher
                        .get_or_init(|| Flusher::start(Arc::clone(&self.core)));
                }
                Ok(())
            }
        }
    }

    /// Writes every coalesced progress report not yet written, now, with one group commit:
    /// one shared flush per part (up to a quarter of the process's limit on open files, at most
    /// 4,096 transfers), not one sync per transfer.
    ///
    /// # Errors
    /// The first I/O error met; the other transfers are still flushed.
    pub fn flush(&self) -> Result<()> {
        // Claimed (their write time set to now), so the background flusher does not take
        // the same transfers at the same time and wait on their locks.
        let now = Instant::now();
        let mut dirty: Vec<TransferId> = lock(&self.core.pending)
            .iter_mut()
            .filter(|(_, p)| p.dirty)
            .map(|(id, p)| {
                p.last_flush = now;
                *id
            })
            .collect();
        // In id order, so the writes a flush makes come in the same order every time.
        dirty.sort_unstable();
        self.core.flush_many(dirty)
    }

    /// Keeps `done`/`total` as coalesced progress of `id` (no write now): written by the next
    /// update of `id`, the background flusher, [`Store::flush`] or drop.
    pub(super) fn coalesce(&self, id: TransferId, done: u64, total: Option<u64>) {
        report(&mut lock(&self.core.pending), id, done, total);
        if self.cfg.background_flush {
            self.flusher
                .get_or_init(|| Flusher::start(Arc::clone(&self.core)));
        }
    }
}

/// Records `done`/`total` as `id`'s pending (dirty) progress; a new entry counts as just
/// written, so it is due one interval from now.
fn report(
    pending: &mut std::collections::HashMap<TransferId, PendingProgress>,
    id: TransferId,
    done: u64,
    total: Option<u64>,
) -> &mut PendingProgress {
    let p = pending.entry(id).or_insert(PendingProgress {
        done,
        total,
        dirty: true,
        last_flush: Instant::now(),
    });
    p.done = done;
    p.total = total;
    p.dirty = true;
    p
}
