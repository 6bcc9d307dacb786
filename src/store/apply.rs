//! Reconciling: [`Store::reconcile`] gathers the records (from the index when this handle holds
//! it) and hands them to the pure planner in `reconcile`; [`Store::apply`] performs the
//! store's side of a plan, its state changes as one group commit.

use std::collections::BTreeSet;
use std::time::SystemTime;

use super::Store;
use super::commit::Change;
use super::lifecycle::{Adopted, adopt_change, complete_change, expire_change, fail_change};
use crate::error::{ErrorKind, Result};
use crate::reconcile::{
    Action, Plan, ReconcileOptions, Record, Sessions, Task, TaskRef, plan, plan_of, plan_reset,
    plan_reset_of,
};
use crate::store::{Completion, ErrorClass};
use crate::transfer::{Outcome, TaskBinding, TransferId};

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Store-side steps performed.
    pub applied: usize,
    /// `deliver` claims another process won first: do not deliver these here.
    pub claims_lost: Vec<TransferId>,
    /// Records another process had already removed or moved (skipped). An `adopt` that only
    /// refreshes counters touches no file, so it does not notice: a removed record's counters
    /// are dropped when they would be written.
    pub gone: Vec<TransferId>,
    /// Groups whose last member ended, claimed "finished" by this apply (see
    /// [`Store::claim_group_finished`]): each group appears here once, across every apply and
    /// process.
    pub groups_finished: Vec<crate::GroupSummary>,
}

fn binding(task: &Option<TaskRef>) -> Option<TaskBinding> {
    task.as_ref().map(|t| TaskBinding {
        session: t.session.clone(),
        task_id: t.task_id,
        tag: None,
    })
}

impl Store {
    /// Gathers the records of the supplied sessions and plans a reconcile with default options.
    ///
    /// # Errors
    /// As [`plan`], and I/O errors reading the store.
    pub fn reconcile(&self, sessions: &Sessions, tasks: &[Task], now: SystemTime) -> Result<Plan> {
        self.reconcile_with(sessions, tasks, now, &ReconcileOptions::default())
    }

    /// [`Store::reconcile`] with explicit options.
    ///
    /// # Errors
    /// As [`Store::reconcile`].
    pub fn reconcile_with(
        &self,
        sessions: &Sessions,
        tasks: &[Task],
        now: SystemTime,
        opts: &ReconcileOptions,
    ) -> Result<Plan> {
        self.core.fs.check()?;
        if let Some((indexed, wholes)) = self.index_facts()
            && let Some((records, corrupt)) = self.plan_view(&indexed, wholes.as_ref())
        {
            let planned = plan_of(
                sessions,
                tasks,
                &[&records.0, &records.1],
                &corrupt,
                now,
                opts,
            );
            drop(records);
            self.after_wholes(wholes.as_ref());
            return planned;
        }
        let (records, corrupt) = self.records(sessions)?;
        plan(sessions, tasks, &records, &corrupt, now, opts)
    }

    /// Gathers the records and plans a reset (see [`plan_reset`]).
    ///
    /// # Errors
    /// As [`Store::reconcile`].
    pub fn reset_plan(&self, sessions: &Sessions, tasks: &[Task]) -> Result<Plan> {
        self.core.fs.check()?;
        if let Some((indexed, wholes)) = self.index_facts()
            && let Some((records, corrupt)) = self.plan_view(&indexed, wholes.as_ref())
        {
            let planned = plan_reset_of(sessions, tasks, &[&records.0, &records.1], &corrupt);
            drop(records);
            self.after_wholes(wholes.as_ref());
            return planned;
        }
        let (records, corrupt) = self.records(sessions)?;
        plan_reset(sessions, tasks, &records, &corrupt)
    }

    /// The records of `sessions` read from the directories, and the corrupt ids.
    pub(crate) fn records(&self, sessions: &Sessions) -> Result<(Vec<Record>, Vec<TransferId>)> {
        let all = self.gather_scanned(true)?;
        let records = all
            .transfers
            .into_iter()
            .filter(|(t, _)| sessions.contains(&t.manifest.session))
            .map(|(transfer, has_resume_data)| Record {
                transfer,
                has_resume_data,
            })
            .collect();
        let corrupt = all.corrupt.into_iter().map(|(id, _)| id).collect();
        Ok((records, corrupt))
    }

    /// Performs the store's side of a plan: bindings (`adopt`), counted failures
    /// (`recreate`/`resume` with a failure, `give_up`), claims (`deliver` with `claim`),
    /// expiries, purges and quarantines. The state changes are one group commit (FORMAT.md
    /// §3.9): each transfer is written once and a part of up to the open-file budget's
    /// transfers shares one flush, so a relaunch of 10,000 transfers costs a few flushes, not
    /// 10,000. An `adopt` whose binding is unchanged and whose only news is the task's byte
    /// counters writes nothing: the counters become coalesced progress (written by the next
    /// update, the background flusher, [`Store::flush`] or drop). Purges and quarantines come
    /// after, one at a time. Each step is a compare-and-set; a crash halfway leaves a store
    /// from which the remaining steps are planned again. Records another process already
    /// removed are skipped.
    ///
    /// # Errors
    /// The first error other than a vanished record, in the plan's order. The state changes
    /// are all attempted (those that succeeded stay applied); purges and quarantines are not
    /// attempted after a failed state change.
    pub fn apply(&self, plan: &Plan) -> Result<ApplyReport> {
        self.core.fs.check()?;
        let mut report = ApplyReport::default();
        let mut groups: BTreeSet<String> = BTreeSet::new();
        let now = self.now();
        let mut changes = Vec::new();
        // For each change of the group commit, the action it came from.
        let mut of_action = Vec::new();
        for (k, a) in plan.actions.iter().enumerate() {
            if let Some(id) = a.transfer().filter(|_| a.ends_record())
                && let Ok(t) = self.get(id)
                && let Some(g) = t.manifest.group
            {
                groups.insert(g);
            }
            if let Action::Adopt {
                id,
                bytes_done,
                bytes_total,
                rebind: false,
                ..
            } = a
            {
                // Bound to this task already: only the counters are news, kept as coalesced
                // progress with its bounded staleness (no lock, no write, no flush now).
                self.coalesce(*id, *bytes_done, *bytes_total);
                report.applied += 1;
                continue;
            }
            if let Some(c) = change_of(a, now) {
                changes.push(c);
                of_action.push(k);
            }
        }
        let mut first: Option<(usize, crate::Error)> = None;
        let results = self.core.commit(changes, self.core.group_part);
        for (k, r) in of_action.into_iter().zip(results) {
            let id = plan.actions.get(k).and_then(Action::transfer);
            match r {
                Ok(Applied::Counters(id, done, total)) => {
                    self.coalesce(id, done, total);
                    report.applied += 1;
                }
                Ok(Applied::Done(applied)) => report.applied += usize::from(applied),
                Ok(Applied::ClaimLost(id)) => {
                    report.claims_lost.push(id);
                    report.applied += 1;
                }
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                    report.gone.extend(id);
                }
                Err(e) => {
                    if first.is_none() {
                        first = Some((k, e));
                    }
                }
            }
        }
        if let Some((_, e)) = first {
            return Err(e);
        }
        for a in &plan.actions {
            let r = match a {
                Action::Purge { id, .. } => self.remove(*id),
                Action::Quarantine { id, .. } => self.quarantine(*id).map(drop),
                _ => continue,
            };
            match r {
                Ok(()) => report.applied += 1,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                    report.gone.extend(a.transfer());
                }
                Err(e) => return Err(e),
            }
        }
        // A group finishes when its last member ends; a crash before this point leaves the
        // claim to the next apply, which meets the same member again (delivered until
        // acknowledged).
        for g in groups {
            match self.claim_group_finished(&g) {
                Ok(crate::GroupClaim::Won(summary)) => report.groups_finished.push(summary),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

/// What one state change of an applied plan did.
enum Applied {
    /// Whether it counted as a store-side step (an expiry of an ended record does not).
    Done(bool),
    /// An adopt whose only news is counters: kept as coalesced progress.
    Counters(TransferId, u64, Option<u64>),
    /// A `deliver` claim another process won first.
    ClaimLost(TransferId),
}

/// The group-commit change an action makes to its record's state, if any.
fn change_of(a: &Action, now: SystemTime) -> Option<Change<'static, Applied>> {
    Some(match a {
        Action::Adopt {
            id,
            task,
            tag,
            bytes_done,
            bytes_total,
            ..
        } => {
            let (id, done, total) = (*id, *bytes_done, *bytes_total);
            let b = TaskBinding {
                session: task.session.clone(),
                task_id: task.task_id,
                tag: tag.clone(),
            };
            Change::new(id, "adopt", move |m, s| {
                let (adopted, changed) = adopt_change(id, m, s, b, done, total)?;
                Ok((
                    match adopted {
                        Adopted::Counters(done, total) => Applied::Counters(id, done, total),
                        Adopted::Bound | Adopted::Same => Applied::Done(true),
                    },
                    changed,
                ))
            })
        }
        Action::Recreate {
            id,
            failure: Some(error),
            not_before,
            task,
            ..
        }
        | Action::Resume {
            id,
            failure: Some(error),
            not_before,
            task,
            ..
        } => {
            let class = ErrorClass::RetryAfter(not_before.unwrap_or(now));
            let (task, error) = (binding(task), error.clone());
            Change::new(*id, "fail", move |m, s| {
                Ok((
                    Applied::Done(true),
                    fail_change(m, s, task, class, &error, now).1,
                ))
            })
        }
        Action::Deliver {
            id,
            outcome,
            claim: true,
            ..
        } => {
            let id = *id;
            let status = match outcome {
                Outcome::Succeeded { status } => *status,
                _ => None,
            };
            Change::state_only(id, "complete", move |s| {
                let (c, changed) = complete_change(s, status);
                Ok((
                    match c {
                        Completion::Lost(_) => Applied::ClaimLost(id),
                        Completion::Won(_) => Applied::Done(true),
                    },
                    changed,
                ))
            })
        }
        Action::Expire { id, .. } => Change::state_only(*id, "expire", |s| {
            let (expired, changed) = expire_change(s);
            Ok((Applied::Done(expired), changed))
        }),
        Action::GiveUp { id, error, task } => {
            let (task, error) = (binding(task), error.clone());
            Change::new(*id, "fail", move |m, s| {
                Ok((
                    Applied::Done(true),
                    fail_change(m, s, task, ErrorClass::Permanent, &error, now).1,
                ))
            })
        }
        _ => return None,
    })
}
