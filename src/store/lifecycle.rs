//! The lifecycle changes the platform's callbacks report: bind, complete, fail, lose the
//! task, replace the request, rebind, expire, adopt and cancel. Each is one compare-and-set.

use std::time::SystemTime;

use super::{Store, check_name, check_request, lock};
use crate::error::{Error, Result};
use crate::format;
use crate::state_file;
use crate::transfer::{FailReason, Outcome, Phase, Request, State, TaskBinding, TransferId};

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
        self.modify(id, "bind", |m, s, _| {
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
        })?;
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
        self.modify(id, "complete", |_, s, _| {
            if s.phase.is_terminal() {
                return Ok((
                    Completion::Lost(s.outcome.clone().unwrap_or(Outcome::Cancelled)),
                    false,
                ));
            }
            let o = Outcome::Succeeded { status };
            s.phase = Phase::Completed;
            s.outcome = Some(o.clone());
            s.next_attempt = None;
            Ok((Completion::Won(o), true))
        })
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
            if s.phase.is_terminal() {
                let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
                return Ok((FailResult::AlreadyEnded(o), false));
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
                Ok((FailResult::GaveUp, true))
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
            Ok((FailResult::RetryAt(at), true))
        })
    }

    /// The platform lost the task, or the user's force-quit cancelled it: not a failure. The
    /// binding is cleared and the transfer waits to be recreated; no failure is counted.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn task_lost(&self, id: TransferId) -> Result<()> {
        self.modify(id, "task lost", |_, s, _| {
            if s.phase.is_terminal() || s.binding.is_none() && s.phase != Phase::Running {
                return Ok(((), false));
            }
            s.binding = None;
            if s.phase == Phase::Running {
                s.phase = Phase::Pending;
            }
            Ok(((), true))
        })
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
        self.modify(id, "expire", |_, s, _| {
            if s.phase.is_terminal() {
                return Ok((false, false));
            }
            s.phase = Phase::Failed;
            s.next_attempt = None;
            s.outcome = Some(Outcome::Failed {
                reason: FailReason::Expired,
                error: "the deadline passed".to_owned(),
            });
            Ok((true, true))
        })
    }

    /// Binds `task` and refreshes the counters in one durable write (a reconcile's `adopt`).
    /// Writes nothing when the binding and counters are already those.
    pub(crate) fn adopt(
        &self,
        id: TransferId,
        task: TaskBinding,
        done: u64,
        total: Option<u64>,
    ) -> Result<()> {
        self.modify(id, "adopt", |m, s, _| {
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
            let before = (s.binding.clone(), s.phase, s.bytes_done, s.bytes_total);
            s.binding = Some(binding);
            s.phase = Phase::Running;
            s.next_attempt = None;
            s.bytes_done = done;
            s.bytes_total = total.or(s.bytes_total);
            Ok((
                (),
                before != (s.binding.clone(), s.phase, s.bytes_done, s.bytes_total),
            ))
        })
    }

    /// Cancels a transfer. The answer carries the bound task, which the caller cancels on the
    /// platform. The record stays (phase cancelled) until it is purged by
    /// [`Store::acknowledge`] or [`Store::remove`].
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`]; [`ErrorKind::Busy`]; I/O errors.
    pub fn cancel(&self, id: TransferId) -> Result<CancelResult> {
        self.modify(id, "cancel", |_, s, _| {
            if s.phase.is_terminal() {
                let o = s.outcome.clone().unwrap_or(Outcome::Cancelled);
                return Ok((CancelResult::AlreadyEnded(o), false));
            }
            s.phase = Phase::Cancelled;
            s.outcome = Some(Outcome::Cancelled);
            s.next_attempt = None;
            Ok((
                CancelResult::Cancelled {
                    task: s.binding.clone(),
                },
                true,
            ))
        })
    }
}
