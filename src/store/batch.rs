//! A batch of lifecycle changes made durable together by group commit (FORMAT.md §3.9): the
//! caller's bursts (binding the tasks of a batch create, completions delivered on one serial
//! queue, cancelling a group, acknowledging many outcomes).

use super::commit::Change;
use super::lifecycle::{
    bind_change, cancel_change, complete_change, fail_change, progress_change, task_lost_change,
};
use super::{CancelResult, Completion, ErrorClass, FailResult, Store, check_name, lock};
use crate::error::{Error, Result};
use crate::transfer::{TaskBinding, TransferId};

/// What one change of a [`Batch`] did: the answer the single call would have given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Changed {
    /// [`Batch::bind`]: the task is bound.
    Bound,
    /// [`Batch::complete`]: as [`Store::complete`].
    Completed(Completion),
    /// [`Batch::fail`]: as [`Store::fail`].
    Failed(FailResult),
    /// [`Batch::cancel`]: as [`Store::cancel`].
    Cancelled(CancelResult),
    /// [`Batch::task_lost`]: the binding is cleared (or there was none).
    TaskLost,
    /// [`Batch::progress`]: the counters are recorded (or the transfer had ended).
    Progressed,
    /// [`Batch::acknowledge`]: the record is purged.
    Acknowledged,
}

/// One change waiting in a batch.
#[derive(Debug, Clone)]
enum Item {
    Bind(TransferId, TaskBinding),
    Complete(TransferId, Option<u16>),
    Fail(TransferId, ErrorClass, String),
    Cancel(TransferId),
    TaskLost(TransferId),
    Progress(TransferId, u64, Option<u64>),
    Acknowledge(TransferId),
}

/// Lifecycle changes of many transfers, committed together: [`Batch::commit`] makes all of
/// them durable with one shared flush per part (on Linux and Android one `syncfs`; on Apple
/// platforms one `F_FULLFSYNC` after each file is sent to the drive) instead of one sync per
/// change. Each change is the same compare-and-set as the single call of the same name, with
/// the same answer; several changes to one transfer are applied in the order given and
/// written once. One difference: a change that needs only the state (complete, cancel, task
/// lost, progress) does not read the manifest, so it does not report a damaged manifest as the
/// single call would (`check` and a reconcile still do). Made by [`Store::batch`].
///
/// ```
/// # fn main() -> Result<(), waybill::Error> {
/// use waybill::{Changed, NewTransfer, Store, TaskBinding};
/// let dir = tempfile::tempdir().expect("tempdir");
/// let store = Store::open(dir.path())?;
/// let ids = store.create_batch(
///     (0..3).map(|i| NewTransfer::download(format!("https://example.com/{i}"))).collect(),
/// )?;
/// let mut batch = store.batch();
/// for (n, id) in ids.iter().enumerate() {
///     batch.bind(*id, TaskBinding { session: "default".into(), task_id: n as u64, tag: None });
/// }
/// batch.complete(ids[0], Some(200));
/// let results = batch.commit();
/// assert_eq!(results.len(), 4);
/// assert!(results.iter().all(|r| r.is_ok()));
/// assert!(matches!(results[3], Ok(Changed::Completed(waybill::Completion::Won(_)))));
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a batch does nothing until it is committed"]
pub struct Batch<'s> {
    store: &'s Store,
    items: Vec<Item>,
}

impl Store {
    /// Starts a [`Batch`] of lifecycle changes.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            items: Vec::new(),
        }
    }

    /// Whether the volume refused to flush the drive's cache (`F_FULLFSYNC`, Apple platforms)
    /// in a group commit since this handle was opened: the changes committed since reached the
    /// drive, whose cache a power loss may still empty (some network and FUSE mounts). Not an
    /// error, and nothing is poisoned; logged once as a warning.
    pub fn durability_weakened(&self) -> bool {
        self.core.fs.weakened()
    }
}

impl Batch<'_> {
    /// Binds `task` to `id`, as [`Store::bind`].
    pub fn bind(&mut self, id: TransferId, task: TaskBinding) -> &mut Self {
        self.items.push(Item::Bind(id, task));
        self
    }

    /// Records success, as [`Store::complete`].
    pub fn complete(&mut self, id: TransferId, status: Option<u16>) -> &mut Self {
        self.items.push(Item::Complete(id, status));
        self
    }

    /// Records a failed attempt, as [`Store::fail`].
    pub fn fail(&mut self, id: TransferId, class: ErrorClass, error: &str) -> &mut Self {
        self.items.push(Item::Fail(id, class, error.to_owned()));
        self
    }

    /// Cancels a transfer, as [`Store::cancel`].
    pub fn cancel(&mut self, id: TransferId) -> &mut Self {
        self.items.push(Item::Cancel(id));
        self
    }

    /// The platform lost the task, as [`Store::task_lost`].
    pub fn task_lost(&mut self, id: TransferId) -> &mut Self {
        self.items.push(Item::TaskLost(id));
        self
    }

    /// Records progress durably, as [`Store::progress`] with
    /// [`Durability::Immediate`](crate::Durability::Immediate).
    pub fn progress(&mut self, id: TransferId, done: u64, total: Option<u64>) -> &mut Self {
        self.items.push(Item::Progress(id, done, total));
        self
    }

    /// Purges an ended transfer, as [`Store::acknowledge`]. Acknowledgements run after the
    /// batch's state changes, one purge at a time (each renames a directory into `trash/` and
    /// syncs `transfers/`): they share no flush yet.
    pub fn acknowledge(&mut self, id: TransferId) -> &mut Self {
        self.items.push(Item::Acknowledge(id));
        self
    }

    /// How many changes the batch holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Commits every change and empties the batch. Returns one result per change, in the
    /// order they were added: `Ok` means that change is durable. Changes are committed in
    /// parts (up to a quarter of the process's limit on open files, at most 4,096 transfers), each part durable
    /// before the next begins; a failed shared flush fails every change of its part and of
    /// the parts after it, and poisons the store. A refused change (another session, an
    /// ended transfer, a missing one) fails alone.
    pub fn commit(&mut self) -> Vec<Result<Changed>> {
        let store = self.store;
        let items = std::mem::take(&mut self.items);
        let now = store.now();
        let mut changes = Vec::with_capacity(items.len());
        // Where each item's result comes from: the group commit (its index there), a refusal
        // before it, or an acknowledgement after it.
        let mut from: Vec<Result<usize>> = Vec::with_capacity(items.len());
        let mut acks = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let change = match item.clone() {
                Item::Bind(id, task) => {
                    if let Some(Err(e)) = task.tag.as_deref().map(|t| check_name("the tag", t)) {
                        from.push(Err(e));
                        continue;
                    }
                    Change::new(id, "bind", move |m, s| {
                        bind_change(id, m, s, &task, None).map(|((), c)| (Changed::Bound, c))
                    })
                }
                Item::Complete(id, status) => Change::state_only(id, "complete", move |s| {
                    let (a, c) = complete_change(s, status);
                    Ok((Changed::Completed(a), c))
                }),
                Item::Fail(id, class, error) => Change::new(id, "fail", move |m, s| {
                    let (a, c) = fail_change(m, s, None, class, &error, now);
                    Ok((Changed::Failed(a), c))
                }),
                Item::Cancel(id) => Change::state_only(id, "cancel", |s| {
                    let (a, c) = cancel_change(s);
                    Ok((Changed::Cancelled(a), c))
                }),
                Item::TaskLost(id) => Change::state_only(id, "task lost", |s| {
                    Ok((Changed::TaskLost, task_lost_change(s).1))
                }),
                Item::Progress(id, done, total) => Change::state_only(id, "progress", move |s| {
                    Ok((Changed::Progressed, progress_change(s, done, total).1))
                }),
                Item::Acknowledge(id) => {
                    acks.push((k, id));
                    from.push(Ok(usize::MAX));
                    continue;
                }
            };
            from.push(Ok(changes.len()));
            changes.push(change);
        }
        let mut committed: Vec<Option<Result<Changed>>> = store
            .core
            .commit(changes, store.core.group_part)
            .into_iter()
            .map(Some)
            .collect();
        let mut out: Vec<Result<Changed>> = from
            .into_iter()
            .map(|f| match f {
                Err(e) => Err(e),
                Ok(usize::MAX) => Ok(Changed::Acknowledged),
                Ok(i) => committed
                    .get_mut(i)
                    .and_then(Option::take)
                    .unwrap_or_else(|| Err(Error::invalid("a change of the batch was not run"))),
            })
            .collect();
        for (k, id) in acks {
            if let Some(slot) = out.get_mut(k) {
                *slot = store.acknowledge(id).map(|()| Changed::Acknowledged);
            }
        }
        // New bindings answer the task lookups at once, as a single bind's do.
        let mut idx = lock(&store.tasks);
        for (item, r) in items.iter().zip(&out) {
            if let (Item::Bind(id, task), Ok(_)) = (item, r) {
                idx.by_task
                    .insert((task.session.clone(), task.task_id), *id);
                if let Some(tag) = &task.tag {
                    idx.by_tag.insert(tag.clone(), *id);
                }
            }
        }
        out
    }
}
