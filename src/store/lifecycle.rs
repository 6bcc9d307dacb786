//! The lifecycle changes the platform's callbacks report: bind, complete, fail, lose the
//! task, replace the request, rebind, expire, adopt and cancel. Each is one compare-and-set.

use std::time::SystemTime;

use super::{Store, check_name, check_request, lock};
use crate::error::{Error, Result};
use crate::format;
use crate::state_file;
use crate::transfer::{
    FailReason, Manifest, Outcome, Phase, Request, State, TaskBinding, TransferId,
};

/// The longest error text kept in the state; longer text is cut at a character boundary.
pub const MAX_ERROR_BYTES: usize = 1024;

/// The answer of [`Store::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// This call recorded the outcome.
    Won(Outcome),
    /// The transfer had already ended; this is the outcome recorded then. Nothing was changed.
    Lost(Outcome),
}

/// How a failure should be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May succeed later: count a failure and retry after a backoff.
    Transient,
    /// Will not succeed: give up now.
    Permanent,
    /// The server asked to retry after this time: count a failure and retry then.
    RetryAfter(SystemTime),
}

/// The answer of [`Store::fail`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailResult {
    /// Recreate the task at this time.
    RetryAt(SystemTime),
    /// The transfer failed for good (permanent error or retry policy spent).
    GaveUp,
    /// The transfer had already ended; nothing was changed.
    AlreadyEnded(Outcome),
}

/// The answer of [`Store::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResult {
    /// Cancelled now; cancel this platform task too, if any.
    Cancelled {
        /// The task that was bound.
        task: Option<TaskBinding>,
    },
    /// The transfer had already ended (or was cancelled before); nothing was changed.
    AlreadyEnded(Outcome),
}

/// Records a replacement request (secret values dropped), keeping room in the state slot for
/// the largest terminal state (an error text in both `last_error` and the outcome), so the
/// transfer can always fail or be cancelled later.
fn set_request(s: &mut State, mut r: Request) -> Result<()> {
    for h in &mut r.headers {
        if h.secret {
            h.value.clear();
        }
    }
    s.current_request = Some(r);
    let mut worst = s.clone();
    let text = "x".repeat(MAX_ERROR_BYTES);
    worst.last_error = Some(text.clone());
    worst.outcome = Some(Outcome::Failed {
        reason: FailReason::GaveUp,
        error: text,
    });
    state_file::check_fits(&worst)
}

pub(super) fn truncate_text(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

impl Store {
    /// Binds a platform task to the transfer. Durable before it returns, so call it before
    /// resuming the task. The task's session must be the transfer's session.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for another session or an ended transfer;
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn bind(&self, id: TransferId, task: TaskBinding) -> Result<()> {
        self.bind_with(id, task, None)
    }

    fn bind_with(&self, id: TransferId, task: TaskBinding, request: Option<Request>) -> Result<()> {
        if let Some(tag) = &task.tag {
            check_name("the tag", tag)?;
        }
        self.modify(id, "bind", |m, s, _| bind_change(id, m, s, &task, request))?;
        let mut idx = lock(&self.tasks);
        idx.by_task.insert((task.session, task.task_id), id);
        if let Some(tag) = task.tag {
            idx.by_tag.insert(tag, id);
        }
        Ok(())
    }

    /// Records success. Compare-and-set: exactly one caller (thread or process) wins; a caller
    /// that lost gets the outcome already recorded and nothing is applied twice.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{Completion, NewTransfer, Store};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let id = store.create(NewTransfer::download("https://example.com/f"))?;
    /// assert!(matches!(store.complete(id, Some(200))?, Completion::Won(_)));
    /// assert!(matches!(store.complete(id, Some(200))?, Completion::Lost(_)));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn complete(&self, id: TransferId, status: Option<u16>) -> Result<Completion> {
        self.modify(id, "complete", |_, s, _| Ok(complete_change(s, status)))
    }

    /// Records a failed attempt. A permanent error gives up at once; otherwise one failure is
    /// counted and the answer is a retry time (the backoff, or the server's retry-after) or
    /// [`FailResult::GaveUp`] once the retry policy's `max_attempts` failures are reached.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn fail(&self, id: TransferId, class: ErrorClass, error: &str) -> Result<FailResult> {
        self.fail_task(id, None, class, error)
    }

    /// [`Store::fail`], also recording `task` as the binding: the task whose failure was
    /// counted, so that meeting it again never counts it twice.
    pub(crate) fn fail_task(
        &self,
        id: TransferId,
        task: Option<TaskBinding>,
        class: ErrorClass,
        error: &str,
    ) -> Result<FailResult> {
        let now = self.now();
        self.modify(id, "fail", |m, s, _| {
            Ok(fail_change(m, s, task, class, error, now))
        })
    }

    /// The platform lost the task, or the user's force-quit cancelled it: not a failure. The
    /// binding is cleared and the transfer waits to be recreated; no failure is counted.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn task_lost(&self, id: TransferId) -> Result<()> {
        self.modify(id, "task lost", |_, s, _| Ok(task_lost_change(s)))
    }

    /// Replaces the request to run from now on (a fresh pre-signed URL, new headers). Secret
    /// header values are not stored.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a bad request or one too large for a state slot.
    pub fn replace_request(&self, id: TransferId, request: Request) -> Result<()> {
        check_request(&request)?;
        self.modify(id, "replace request", |_, s, _| {
            set_request(s, request)?;
            Ok(((), true))
        })
    }

    /// Durably records the platform task that now runs a recreated or resumed transfer (and
    /// the fresh request it was given, if any), before the caller resumes that task. The
    /// manifest is read from disk and checked first, never taken from a cache.
    ///
    /// # Errors
    /// As [`Store::bind`]; [`ErrorKind::Corrupt`] when the manifest fails its checks.
    pub fn rebind(
        &self,
        id: TransferId,
        task: TaskBinding,
        request: Option<Request>,
    ) -> Result<()> {
        self.core.fs.check()?;
        self.core.load_manifest(id)?;
        if let Some(r) = &request {
            check_request(r)?;
        }
        self.bind_with(id, task, request)
    }

    /// Fails a transfer as expired (its deadline passed). Returns false when it had already
    /// ended (nothing changed).
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn expire(&self, id: TransferId) -> Result<bool> {
        self.modify(id, "expire", |_, s, _| Ok(expire_change(s)))
    }

    /// Cancels a transfer. The answer carries the bound task, which the caller cancels on the
    /// platform. The record stays (phase cancelled) until it is purged by
    /// [`Store::acknowledge`] or [`Store::remove`].
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn cancel(&self, id: TransferId) -> Result<CancelResult> {
        self.modify(id, "cancel", |_, s, _| Ok(cancel_change(s)))
    }
}

/// Binds `task` to the transfer (and records a replacement request): what [`Store::bind`]
/// and a batch's bind do to the state.
pub(super) fn bind_change(
    id: TransferId,
    m: &Manifest,
    s: &mut State,
    task: &TaskBinding,
    request: Option<Request>,
) -> Result<((), bool)> {
    if task.session != m.session {
        return Err(Error::invalid(format!(
            "task session {:?} is not the transfer's session {:?}",
            task.session, m.session
        )));
    }
    if s.phase.is_terminal() {
        return Err(Error::invalid(format!(
            "transfer {id} has ended ({}); it cannot be bound",
            s.phase
        )));
    }
    if let Some(r) = request {
        set_request(s, r)?;
    }
    s.binding = Some(task.clone());
    s.phase = Phase::Running;
    s.next_attempt = None;
    Ok(((), true))
}

/// Records success unless the transfer has ended: what [`Store::complete`] does.
pub(super) fn complete_change(s: &mut State, status: Option<u16>) -> (Completion, bool) {
    if s.phase.is_terminal() {
        return (
            Completion::Lost(s.outcome.clone().unwrap_or(Outcome::Cancelled)),
            false,
        );
    }
    let o = Outcome::Succeeded { status };
    s.phase = Phase::Completed;
    s.outcome = Some(o.clone());
    s.next_attempt = None;
    (Completion::Won(o), true)
}

/// Counts a failed attempt (or gives up): what [`Store::fail`] does. `task`, when given, is
/// recorded as the binding whose failure was counted.
pub(super) fn fail_change(
    m: &Manifest,
    s: &mut State,
    task: Option<TaskBinding>,
    class: ErrorClass,
    error: &str,
    now: SystemTime,
) -> (FailResult, bool) {
    if s.phase.is_terminal() {
        let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
        return (FailResult::AlreadyEnded(o), false);
    }
    if let Some(task) = task {
        s.binding = Some(task);
    }
    let error = truncate_text(error);
    s.last_error = Some(error.clone());
    // The binding is kept: it names the task whose failure was just counted (the phase
    // says it no longer runs), so a reconcile that meets that finished task again does
    // not count it twice. Binding a new task replaces it.
    let give_up = |s: &mut State, reason| {
        s.phase = Phase::Failed;
        s.next_attempt = None;
        s.outcome = Some(Outcome::Failed {
            reason,
            error: error.clone(),
        });
        (FailResult::GaveUp, true)
    };
    if class == ErrorClass::Permanent {
        return give_up(s, FailReason::Permanent);
    }
    s.failures = s.failures.saturating_add(1);
    if s.failures >= m.retry.max_attempts {
        return give_up(s, FailReason::GaveUp);
    }
    let at = match class {
        ErrorClass::RetryAfter(t) => t,
        _ => now
            .checked_add(m.retry.backoff(s.failures))
            .unwrap_or_else(|| format::from_ms(u64::MAX)),
    };
    let at = format::from_ms(format::to_ms(at));
    s.phase = Phase::WaitingToRetry;
    s.next_attempt = Some(at);
    (FailResult::RetryAt(at), true)
}

/// Clears the binding of a task the platform lost: what [`Store::task_lost`] does.
pub(super) fn task_lost_change(s: &mut State) -> ((), bool) {
    if s.phase.is_terminal() || s.binding.is_none() && s.phase != Phase::Running {
        return ((), false);
    }
    s.binding = None;
    if s.phase == Phase::Running {
        s.phase = Phase::Pending;
    }
    ((), true)
}

/// Fails the transfer as expired unless it has ended: what [`Store::expire`] does.
pub(super) fn expire_change(s: &mut State) -> (bool, bool) {
    if s.phase.is_terminal() {
        return (false, false);
    }
    s.phase = Phase::Failed;
    s.next_attempt = None;
    s.outcome = Some(Outcome::Failed {
        reason: FailReason::Expired,
        error: "the deadline passed".to_owned(),
    });
    (true, true)
}

/// What adopting a running task did to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Adopted {
    /// The binding changed: written durably with the counters.
    Bound,
    /// Only the counters are news: kept as coalesced progress, never flushed on their own.
    Counters(u64, Option<u64>),
    /// Nothing changed.
    Same,
}

/// Binds `task` to the record of a reconcile's `adopt`. A binding (or phase) that changes is
/// written with the counters; counters alone are left to coalesced progress.
pub(super) fn adopt_change(
    id: TransferId,
    m: &Manifest,
    s: &mut State,
    task: TaskBinding,
    done: u64,
    total: Option<u64>,
) -> Result<(Adopted, bool)> {
    if task.session != m.session || s.phase.is_terminal() {
        return Err(Error::invalid(format!(
            "transfer {id} cannot adopt task {} of session {:?}",
            task.task_id, task.session
        )));
    }
    let tag = task
        .tag
        .clone()
        .or_else(|| s.binding.as_ref().and_then(|b| b.tag.clone()));
    let binding = TaskBinding { tag, ..task };
    let total = total.or(s.bytes_total);
    if s.binding.as_ref() == Some(&binding) && s.phase == Phase::Running && s.next_attempt.is_none()
    {
        if (s.bytes_done, s.bytes_total) == (done, total) {
            return Ok((Adopted::Same, false));
        }
        return Ok((Adopted::Counters(done, total), false));
    }
    s.binding = Some(binding);
    s.phase = Phase::Running;
    s.next_attempt = None;
    s.bytes_done = done;
    s.bytes_total = total;
    Ok((Adopted::Bound, true))
}

/// Cancels the transfer unless it has ended: what [`Store::cancel`] does.
pub(super) fn cancel_change(s: &mut State) -> (CancelResult, bool) {
    if s.phase.is_terminal() {
        let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
        return (CancelResult::AlreadyEnded(o), false);
    }
    s.phase = Phase::Cancelled;
    s.outcome = Some(Outcome::Cancelled);
    s.next_attempt = None;
    (
        CancelResult::Cancelled {
            task: s.binding.clone(),
        },
        true,
    )
}

/// Records durable progress unless the transfer has ended: what [`Store::progress`] with
/// [`Durability::Immediate`](crate::Durability::Immediate) does.
pub(super) fn progress_change(s: &mut State, done: u64, total: Option<u64>) -> ((), bool) {
    if s.phase.is_terminal() || (s.bytes_done, s.bytes_total) == (done, total) {
        return ((), false);
    }
    s.bytes_done = done;
    s.bytes_total = total.or(s.bytes_total);
    ((), true)
}
