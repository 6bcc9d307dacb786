//! Reconciling: [`Store::reconcile`] gathers the records (from the index when this handle holds
//! it) and hands them to the pure planner in `reconcile`; [`Store::apply`] performs the
//! store's side of a plan, one compare-and-set per action.

use std::collections::BTreeSet;
use std::time::SystemTime;

use super::Store;
use crate::error::{ErrorKind, Result};
use crate::reconcile::{
    Action, Plan, ReconcileOptions, Record, Sessions, Task, TaskRef, plan, plan_of, plan_reset,
    plan_reset_of,
};
use crate::store::ErrorClass;
use crate::transfer::{Outcome, TaskBinding, TransferId};

/// What applying a plan did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Store-side steps performed.
    pub applied: usize,
    /// `deliver` claims another process won first: do not deliver these here.
    pub claims_lost: Vec<TransferId>,
    /// Records another process had already removed or moved (skipped).
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

    /// Performs the store's side of a plan: bindings and counters (`adopt`), counted failures
    /// (`recreate`/`resume` with a failure, `give_up`), claims (`deliver` with `claim`),
    /// expiries, purges and quarantines. Each is one durable compare-and-set step; a crash
    /// halfway leaves a store from which the remaining steps are planned again. Records another
    /// process already removed are skipped.
    ///
    /// # Errors
    /// The first error other than a vanished record; the steps before it stay applied.
    pub fn apply(&self, plan: &Plan) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        let mut groups: BTreeSet<String> = BTreeSet::new();
        for a in &plan.actions {
            if let Some(id) = a.transfer().filter(|_| a.ends_record())
                && let Ok(t) = self.get(id)
                && let Some(g) = t.manifest.group
            {
                groups.insert(g);
            }
            let r = self.apply_one(a, &mut report);
            match r {
                Ok(true) => report.applied += 1,
                Ok(false) => {}
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {
                    if let Some(id) = a.transfer() {
                        report.gone.push(id);
                    }
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

    fn apply_one(&self, a: &Action, report: &mut ApplyReport) -> Result<bool> {
        match a {
            Action::Adopt {
                id,
                task,
                tag,
                bytes_done,
                bytes_total,
            } => {
                let b = TaskBinding {
                    session: task.session.clone(),
                    task_id: task.task_id,
                    tag: tag.clone(),
                };
                self.adopt(*id, b, *bytes_done, *bytes_total)?;
                Ok(true)
            }
            Action::Cancel { .. } => Ok(false),
            Action::Recreate {
                id,
                failure,
                not_before,
                task,
                ..
            }
            | Action::Resume {
                id,
                failure,
                not_before,
                task,
                ..
            } => match failure {
                Some(error) => {
                    let at = not_before.unwrap_or_else(|| self.now());
                    self.fail_task(*id, binding(task), ErrorClass::RetryAfter(at), error)?;
                    Ok(true)
                }
                None => Ok(false),
            },
            Action::Deliver {
                id, outcome, claim, ..
            } => {
                if !claim {
                    return Ok(false);
                }
                let status = match outcome {
                    Outcome::Succeeded { status } => *status,
                    _ => None,
                };
                if let crate::Completion::Lost(_) = self.complete(*id, status)? {
                    report.claims_lost.push(*id);
                }
                Ok(true)
            }
            Action::Purge { id, .. } => {
                self.remove(*id)?;
                Ok(true)
            }
            Action::Expire { id, .. } => self.expire(*id),
            Action::Quarantine { id, .. } => {
                self.quarantine(*id)?;
                Ok(true)
            }
            Action::GiveUp { id, error, task } => {
                self.fail_task(*id, binding(task), ErrorClass::Permanent, error)?;
                Ok(true)
            }
        }
    }
}
