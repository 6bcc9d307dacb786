//! Every row of the reconcile table (docs/ARCHITECTURE.md, "Reconcile"), plus ambiguity, a missing tag, a reused task id
//! with a different URL, a completed-with-error task, a reset and a tag shared by unrelated
//! tasks, each planned against a real store and, where the store changes, applied and planned
//! again.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::time::{Duration, SystemTime};

use common::{TempStore, TestResult};
use waybill::{
    Action, CancelReason, ErrorKind, FailReason, NewTransfer, Outcome, Phase, ResumeFrom,
    RetryPolicy, Sessions, Store, Task, TaskBinding, TaskRef, TaskState, TransferId,
};

const S: &str = "bg";

fn sessions() -> Sessions {
    Sessions::only([S])
}

fn dl(store: &Store, url: &str) -> waybill::Result<TransferId> {
    store.create(NewTransfer::download(url).session(S))
}

fn bind(store: &Store, id: TransferId, task_id: u64) -> waybill::Result<()> {
    store.bind(
        id,
        TaskBinding {
            session: S.into(),
            task_id,
            tag: Some(id.to_string()),
        },
    )
}

fn tref(task_id: u64) -> TaskRef {
    TaskRef {
        session: S.into(),
        task_id,
    }
}

/// Plans against the store for the `bg` session, now.
fn plan_now(store: &Store, tasks: &[Task]) -> waybill::Result<waybill::Plan> {
    store.reconcile(&sessions(), tasks, SystemTime::now())
}

fn only(plan: &waybill::Plan) -> &Action {
    assert_eq!(plan.actions.len(), 1, "{plan:#?}");
    &plan.actions[0]
}

#[test]
fn no_task_no_record_plans_nothing() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    assert!(plan_now(&store, &[])?.actions.is_empty());
    Ok(())
}

#[test]
fn task_without_record_is_cancelled() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let plan = plan_now(&store, &[Task::running(S, 9, "https://x/a")])?;
    assert_eq!(
        only(&plan),
        &Action::Cancel {
            task: tref(9),
            reason: CancelReason::NoRecord
        }
    );
    Ok(())
}

#[test]
fn active_record_without_task_is_recreated_not_before_its_retry_time() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    let now = SystemTime::now();
    match only(&store.reconcile(&sessions(), &[], now)?) {
        Action::Recreate {
            id: i,
            attempt: 1,
            not_before: None,
            failure: None,
            task: None,
            request,
        } => {
            assert_eq!((*i, request.url.as_str()), (id, "https://x/a"));
        }
        a => panic!("{a:?}"),
    }
    let later = now + Duration::from_secs(600);
    store.fail(id, waybill::ErrorClass::RetryAfter(later), "503")?;
    match only(&store.reconcile(&sessions(), &[], now)?) {
        Action::Recreate {
            attempt: 2,
            not_before: Some(nb),
            ..
        } => {
            assert!(nb.duration_since(later).unwrap_or_default() < Duration::from_millis(1));
        }
        a => panic!("{a:?}"),
    }
    Ok(())
}

#[test]
fn download_with_bytes_resumes() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = dl(&store, "https://x/a")?;
    let b = dl(&store, "https://x/b")?;
    store.append_received(a, b"12345")?;
    store.store_resume_data(b, b"rd")?;
    let plan = plan_now(&store, &[])?;
    for act in &plan.actions {
        match act {
            Action::Resume {
                id,
                from: ResumeFrom::Partial { len: 5 },
                ..
            } if *id == a => {}
            Action::Resume {
                id,
                from: ResumeFrom::ResumeData,
                ..
            } if *id == b => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(plan.actions.len(), 2);
    Ok(())
}

#[test]
fn task_with_active_record_is_adopted_and_counters_refreshed() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    bind(&store, id, 4)?;
    let mut task = Task::running(S, 4, "https://x/a").tag(id.to_string());
    task.bytes_done = 70;
    task.bytes_total = Some(100);
    let plan = plan_now(&store, std::slice::from_ref(&task))?;
    assert!(matches!(
        only(&plan),
        Action::Adopt { id: i, bytes_done: 70, rebind: false, .. } if *i == id
    ));
    // Bound to this task already: the counters are coalesced progress, durable at the next
    // flush (or update, or drop), not a write of their own.
    store.apply(&plan)?;
    assert_eq!(store.get(id)?.state.bytes_done, 0);
    store.flush()?;
    assert_eq!(store.get(id)?.state.bytes_done, 70);
    Ok(())
}

#[test]
fn completed_task_success_is_claimed_once_then_delivered_until_acknowledged() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    bind(&store, id, 1)?;
    let done = [Task::running(S, 1, "https://x/a")
        .tag(id.to_string())
        .completed(200)];
    let plan = plan_now(&store, &done)?;
    assert!(matches!(
        only(&plan),
        Action::Deliver {
            claim: true,
            task: Some(_),
            ..
        }
    ));
    // Another process (the extension) wins the claim first.
    let other = Store::open(t.root())?;
    assert!(matches!(
        other.complete(id, Some(200))?,
        waybill::Completion::Won(_)
    ));
    let report = store.apply(&plan)?;
    assert_eq!(report.claims_lost, vec![id], "the loser must not deliver");
    // Delivered again on every relaunch until acknowledged, then gone.
    let plan = plan_now(&store, &[])?;
    assert!(matches!(
        only(&plan),
        Action::Deliver {
            claim: false,
            outcome: Outcome::Succeeded { status: Some(200) },
            ..
        }
    ));
    store.acknowledge(id)?;
    assert!(plan_now(&store, &[])?.actions.is_empty());
    Ok(())
}

#[test]
fn completed_task_error_counts_once_then_gives_up() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(
        NewTransfer::download("https://x/a")
            .session(S)
            .retry(RetryPolicy {
                max_attempts: 2,
                ..RetryPolicy::default()
            }),
    )?;
    // No binding recorded: matched by tag only.
    let failed = [Task::running(S, 1, "https://x/a")
        .tag(id.to_string())
        .failed("reset")];
    let now = SystemTime::now();
    let plan = store.reconcile(&sessions(), &failed, now)?;
    let Action::Recreate {
        attempt: 2,
        not_before: Some(nb),
        failure: Some(_),
        task: Some(_),
        ..
    } = only(&plan)
    else {
        panic!("{plan:#?}");
    };
    assert!(*nb > now && *nb <= now + Duration::from_secs(2));
    store.apply(&plan)?;
    assert_eq!(store.get(id)?.state.failures, 1);
    // The same finished task reported again: the failure is not counted twice.
    let again = store.reconcile(&sessions(), &failed, now)?;
    assert!(
        matches!(
            only(&again),
            Action::Recreate {
                failure: None,
                attempt: 2,
                ..
            }
        ),
        "{again:#?}"
    );
    store.apply(&again)?;
    assert_eq!(store.get(id)?.state.failures, 1);
    // The recreated task fails too: the policy (2 attempts) is spent.
    store.rebind(
        id,
        TaskBinding {
            session: S.into(),
            task_id: 2,
            tag: Some(id.to_string()),
        },
        None,
    )?;
    let failed2 = [Task::running(S, 2, "https://x/a")
        .tag(id.to_string())
        .failed("reset")];
    let plan = store.reconcile(&sessions(), &failed2, now)?;
    assert!(matches!(only(&plan), Action::GiveUp { task: Some(t), .. } if t.task_id == 2));
    store.apply(&plan)?;
    let s = store.get(id)?.state;
    assert!(matches!(s.outcome, Some(Outcome::Failed { .. })) && s.phase == Phase::Failed);
    assert!(matches!(
        only(&store.reconcile(&sessions(), &[], now)?),
        Action::Deliver { .. }
    ));
    Ok(())
}

#[test]
fn cancelled_record_is_purged_with_its_task() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    bind(&store, id, 3)?;
    store.cancel(id)?;
    let tasks = [Task::running(S, 3, "https://x/a").tag(id.to_string())];
    let plan = plan_now(&store, &tasks)?;
    assert_eq!(
        only(&plan),
        &Action::Purge {
            id,
            task: Some(tref(3))
        }
    );
    store.apply(&plan)?;
    assert!(matches!(
        store.get(id).map(|_| ()).expect_err("purged").kind(),
        ErrorKind::NotFound { .. }
    ));
    Ok(())
}

#[test]
fn record_past_its_deadline_expires_with_its_task() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let now = SystemTime::now();
    let id = store.create(
        NewTransfer::download("https://x/a")
            .session(S)
            .deadline(now - Duration::from_secs(1)),
    )?;
    bind(&store, id, 5)?;
    let tasks = [Task::running(S, 5, "https://x/a")];
    let plan = store.reconcile(&sessions(), &tasks, now)?;
    assert_eq!(
        only(&plan),
        &Action::Expire {
            id,
            task: Some(tref(5))
        }
    );
    store.apply(&plan)?;
    assert!(matches!(
        store.get(id)?.state.outcome,
        Some(Outcome::Failed {
            reason: FailReason::Expired,
            ..
        })
    ));
    Ok(())
}

#[test]
fn corrupt_manifest_is_quarantined_with_its_tagged_task() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    drop(store);
    let m = t
        .root()
        .join("transfers")
        .join(id.to_string())
        .join("manifest");
    let mut b = std::fs::read(&m)?;
    b[20] ^= 0xff;
    std::fs::write(&m, b)?;
    common::forget_index(&t.root());
    let store = Store::open(t.root())?;
    let tasks = [Task::running(S, 8, "https://x/a").tag(id.to_string())];
    // Any reconcile meets it, whichever sessions it covers.
    let plan = store.reconcile(&Sessions::only([S, "other"]), &tasks, SystemTime::now())?;
    assert_eq!(
        only(&plan),
        &Action::Quarantine {
            id,
            task: Some(tref(8))
        }
    );
    store.apply(&plan)?;
    assert!(
        t.root()
            .join("quarantine")
            .join(id.to_string())
            .join("manifest")
            .exists()
    );
    Ok(())
}

#[test]
fn two_records_claiming_one_task_is_ambiguous() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = store.create(
        NewTransfer::download("https://x/a")
            .session(S)
            .idempotency_key("k"),
    )?;
    let b = store.create(
        NewTransfer::download("https://x/b")
            .session(S)
            .idempotency_key("k"),
    )?;
    let tasks = [Task::running(S, 1, "https://x/a").tag("k")];
    let plan = plan_now(&store, &tasks)?;
    assert_eq!(plan.counts().get("recreate"), Some(&2), "{plan:#?}");
    assert!(plan.actions.contains(&Action::Cancel {
        task: tref(1),
        reason: CancelReason::Ambiguous
    }));
    assert!(
        !plan
            .actions
            .iter()
            .any(|x| matches!(x, Action::Adopt { .. }))
    );
    let _ = (a, b);
    Ok(())
}

#[test]
fn one_record_matched_by_two_tasks_is_ambiguous() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    let tasks = [
        Task::running(S, 1, "https://x/a").tag(id.to_string()),
        Task::running(S, 2, "https://x/a").tag(id.to_string()),
    ];
    let plan = plan_now(&store, &tasks)?;
    assert_eq!(plan.counts().get("cancel"), Some(&2));
    assert_eq!(plan.counts().get("recreate"), Some(&1));
    Ok(())
}

#[test]
fn missing_tag_matches_by_binding_and_url() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    bind(&store, id, 6)?;
    let plan = plan_now(&store, &[Task::running(S, 6, "https://x/a")])?;
    assert!(matches!(only(&plan), Action::Adopt { id: i, .. } if *i == id));
    Ok(())
}

#[test]
fn reused_task_id_with_another_url_is_not_adopted() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    bind(&store, id, 6)?;
    // After a reinstall the platform reused task id 6 for something else.
    let plan = plan_now(&store, &[Task::running(S, 6, "https://x/other")])?;
    assert_eq!(plan.counts().get("cancel"), Some(&1));
    assert_eq!(plan.counts().get("recreate"), Some(&1));
    Ok(())
}

#[test]
fn unbound_record_matches_a_task_by_url_alone_when_unique() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = dl(&store, "https://x/a")?;
    let plan = plan_now(&store, &[Task::running(S, 3, "https://x/a")])?;
    assert!(matches!(only(&plan), Action::Adopt { id: i, .. } if *i == id));
    // Two unbound records with that URL: never guessed.
    dl(&store, "https://x/a")?;
    let plan = plan_now(&store, &[Task::running(S, 3, "https://x/a")])?;
    assert_eq!(plan.counts().get("cancel"), Some(&1));
    assert_eq!(plan.counts().get("adopt"), None);
    Ok(())
}

#[test]
fn other_sessions_are_left_alone_and_their_tasks_refused() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    store.create(NewTransfer::download("https://x/e").session("extension"))?;
    assert!(plan_now(&store, &[])?.actions.is_empty());
    let err = plan_now(&store, &[Task::running("extension", 1, "https://x/e")])
        .expect_err("task of an unsupplied session");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    let mut cancelling = Task::running(S, 1, "https://x/z");
    cancelling.state = TaskState::Cancelling;
    let err = plan_now(&store, &[cancelling.clone(), cancelling]).expect_err("task reported twice");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    Ok(())
}

#[test]
fn reset_cancels_every_task_and_discards_every_record() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = dl(&store, "https://x/a")?;
    let b = dl(&store, "https://x/b")?;
    bind(&store, a, 1)?;
    store.complete(b, Some(200))?;
    let keep = store.create(NewTransfer::download("https://x/e").session("extension"))?;
    let tasks = [
        Task::running(S, 1, "https://x/a"),
        Task::running(S, 2, "https://x/zzz"),
    ];
    let plan = store.reset_plan(&sessions(), &tasks)?;
    assert_eq!(plan.counts().get("purge"), Some(&2));
    assert_eq!(plan.counts().get("cancel"), Some(&1));
    assert!(plan.actions.contains(&Action::Purge {
        id: a,
        task: Some(tref(1))
    }));
    store.apply(&plan)?;
    let left: Vec<_> = store
        .list(&waybill::Filter::all())?
        .iter()
        .map(|t| t.id())
        .collect();
    assert_eq!(left, vec![keep], "only the other session's record remains");
    Ok(())
}

#[test]
fn group_finishes_once_when_its_last_member_ends_through_apply() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let member = |url: &str| {
        store.create(
            NewTransfer::download(url)
                .session(S)
                .group("album")
                .retry(RetryPolicy {
                    max_attempts: 1,
                    ..RetryPolicy::default()
                }),
        )
    };
    let (a, b) = (member("https://x/a")?, member("https://x/b")?);
    bind(&store, a, 1)?;
    bind(&store, b, 2)?;
    let task = |n: u64, id: TransferId, url: &str| Task::running(S, n, url).tag(id.to_string());
    // The first member ends: the group is not finished.
    let plan = plan_now(
        &store,
        &[
            task(1, a, "https://x/a").completed(200),
            task(2, b, "https://x/b"),
        ],
    )?;
    assert!(store.apply(&plan)?.groups_finished.is_empty());
    // The last member fails for good: the group finishes, with its counts.
    let plan = plan_now(&store, &[task(2, b, "https://x/b").completed(500)])?;
    assert!(
        plan.actions
            .iter()
            .any(|x| matches!(x, Action::GiveUp { .. })),
        "{plan:#?}"
    );
    let report = store.apply(&plan)?;
    assert_eq!(report.groups_finished.len(), 1, "{report:?}");
    let g = &report.groups_finished[0];
    assert_eq!(
        (g.name.as_str(), g.succeeded, g.failed, g.active),
        ("album", 1, 1, 0)
    );
    // Both are delivered again until acknowledged, but "finished" never fires twice.
    let plan = plan_now(&store, &[])?;
    assert_eq!(plan.counts().get("deliver"), Some(&2), "{plan:#?}");
    assert!(store.apply(&plan)?.groups_finished.is_empty());
    assert!(matches!(
        store.claim_group_finished("album")?,
        waybill::GroupClaim::Lost
    ));
    Ok(())
}

#[test]
fn a_tag_shared_by_unrelated_tasks_is_not_recorded_and_reconciling_stays_idempotent() -> TestResult
{
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = dl(&store, "https://x/a")?;
    let b = dl(&store, "https://x/b")?;
    // Unbound records, adopted by URL; both tasks carry the same tag, which names neither.
    let tasks = vec![
        Task::running(S, 1, "https://x/a").tag("upload"),
        Task::running(S, 2, "https://x/b").tag("upload"),
    ];
    let now = SystemTime::now();
    let first = store.reconcile(&sessions(), &tasks, now)?;
    assert!(
        first
            .actions
            .iter()
            .all(|x| matches!(x, Action::Adopt { .. })),
        "{first:?}"
    );
    store.apply(&first)?;
    for id in [a, b] {
        let binding = store.get(id)?.state.binding.ok_or("bound")?;
        assert_eq!(
            binding.tag, None,
            "a tag that names nothing is not recorded"
        );
    }
    // Planned again with the same tasks: the same adoptions, nothing cancelled or recreated;
    // the bindings are recorded now, so none of them rebinds.
    let again = store.reconcile(&sessions(), &tasks, now)?;
    let recorded: Vec<Action> = first
        .actions
        .iter()
        .cloned()
        .map(|mut x| {
            if let Action::Adopt { rebind, .. } = &mut x {
                *rebind = false;
            }
            x
        })
        .collect();
    assert_eq!(again.actions, recorded);
    Ok(())
}
