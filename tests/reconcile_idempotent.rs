//! Reconciling is idempotent: apply a plan, give the planner the tasks the caller would then
//! have (adopted tasks kept, recreated and resumed ones created and recorded with `rebind`,
//! every other task stopped), reconcile again, and the plan holds only `adopt` and `deliver`;
//! applying that plan changes nothing further.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use waybill::{
    Action, ErrorClass, NewTransfer, RetryPolicy, Sessions, Store, Task, TaskBinding, TaskState,
    TransferId,
};

const URLS: [&str; 3] = ["https://x/1", "https://x/2", "https://x/3"];

#[derive(Debug, Clone)]
struct RecSpec {
    session: usize,
    url: usize,
    download: bool,
    key: Option<u8>,
    expired: bool,
    max_attempts: u32,
    op: u8,
    task_id: u64,
}

#[derive(Debug, Clone)]
struct TaskSpec {
    session: usize,
    task_id: u64,
    url: usize,
    tag: u8,
    state: u8,
}

fn rec_spec() -> impl Strategy<Value = RecSpec> {
    (
        0..2usize,
        0..3usize,
        any::<bool>(),
        proptest::option::of(0..2u8),
        proptest::bool::weighted(0.15),
        1..4u32,
        0..7u8,
        1..5u64,
    )
        .prop_map(
            |(session, url, download, key, expired, max_attempts, op, task_id)| RecSpec {
                session,
                url,
                download,
                key,
                expired,
                max_attempts,
                op,
                task_id,
            },
        )
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    (0..2usize, 1..5u64, 0..3usize, 0..4u8, 0..5u8).prop_map(
        |(session, task_id, url, tag, state)| TaskSpec {
            session,
            task_id,
            url,
            tag,
            state,
        },
    )
}

fn temp() -> std::io::Result<tempfile::TempDir> {
    // Sync cost is not what this property is about: use tmpfs where there is one.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
}

fn run(recs: Vec<RecSpec>, specs: Vec<TaskSpec>, both_sessions: bool) -> Result<(), TestCaseError> {
    let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
    let dir = temp().map_err(|e| fail(&e))?;
    let store = Store::open(dir.path().join("s")).map_err(|e| fail(&e))?;
    let sessions_all = ["a", "b"];
    let now = SystemTime::now();
    let mut ids: Vec<TransferId> = Vec::new();
    for r in &recs {
        let session = sessions_all[r.session];
        let mut t = if r.download {
            NewTransfer::download(URLS[r.url])
        } else {
            NewTransfer::upload(URLS[r.url], waybill::UploadSource::Bytes(vec![1, 2, 3]))
        }
        .session(session)
        .retry(RetryPolicy {
            max_attempts: r.max_attempts,
            ..RetryPolicy::default()
        });
        if let Some(k) = r.key {
            t = t.idempotency_key(format!("k{k}"));
        }
        if r.expired {
            t = t.deadline(now - Duration::from_secs(1));
        }
        let id = store.create(t).map_err(|e| fail(&e))?;
        let bind = TaskBinding {
            session: session.into(),
            task_id: r.task_id,
            tag: Some(id.to_string()),
        };
        let res = match r.op {
            1 => store.bind(id, bind).map(|_| ()),
            2 => store.complete(id, Some(200)).map(|_| ()),
            3 => store
                .bind(id, bind)
                .and_then(|()| store.fail(id, ErrorClass::Transient, "x"))
                .map(|_| ()),
            4 => store.cancel(id).map(|_| ()),
            5 => store.fail(id, ErrorClass::Permanent, "x").map(|_| ()),
            6 if r.download => store.append_received(id, b"abc").map(|_| ()),
            _ => Ok(()),
        };
        res.map_err(|e| fail(&e))?;
        ids.push(id);
    }
    let supplied: Vec<&str> = if both_sessions {
        sessions_all.to_vec()
    } else {
        vec!["a"]
    };
    let sessions = Sessions::only(supplied.iter().copied());
    let mut seen = std::collections::BTreeSet::new();
    let tasks: Vec<Task> = specs
        .iter()
        .filter_map(|s| {
            let session = supplied[s.session % supplied.len()];
            if !seen.insert((session, s.task_id)) {
                return None;
            }
            let mut t = Task::running(session, s.task_id, URLS[s.url]);
            t = match (s.tag, ids.is_empty()) {
                (1, false) => t.tag(ids[s.task_id as usize % ids.len()].to_string()),
                (2, _) => t.tag("k0"),
                _ => t,
            };
            Some(match s.state {
                1 => t.completed(200),
                2 => t.failed("reset"),
                3 => Task {
                    state: TaskState::Cancelling,
                    ..t
                },
                _ => t,
            })
        })
        .collect();

    let plan = store
        .reconcile(&sessions, &tasks, now)
        .map_err(|e| fail(&e))?;
    store.apply(&plan).map_err(|e| fail(&e))?;

    // The caller acts on the plan.
    let mut next_id = 1000;
    let mut after: Vec<Task> = Vec::new();
    for a in &plan.actions {
        match a {
            Action::Adopt { task, .. } => {
                let t = tasks
                    .iter()
                    .find(|t| t.key() == *task)
                    .ok_or_else(|| fail(&"adopted unknown task"))?;
                after.push(t.clone());
            }
            Action::Recreate { id, request, .. } | Action::Resume { id, request, .. } => {
                next_id += 1;
                let session = store.get(*id).map_err(|e| fail(&e))?.manifest.session;
                let b = TaskBinding {
                    session: session.clone(),
                    task_id: next_id,
                    tag: Some(id.to_string()),
                };
                store.rebind(*id, b, None).map_err(|e| fail(&e))?;
                after
                    .push(Task::running(session, next_id, request.url.clone()).tag(id.to_string()));
            }
            _ => {}
        }
    }
    let again = store
        .reconcile(&sessions, &after, now)
        .map_err(|e| fail(&e))?;
    for a in &again.actions {
        prop_assert!(
            matches!(
                a,
                Action::Adopt { .. } | Action::Deliver { claim: false, .. }
            ),
            "after applying {:#?}\nsecond plan has {:#?}",
            plan,
            a
        );
    }
    store.apply(&again).map_err(|e| fail(&e))?;
    let third = store
        .reconcile(&sessions, &after, now)
        .map_err(|e| fail(&e))?;
    prop_assert_eq!(third, again);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn apply_then_reconcile_again_yields_only_adopt_and_deliver(
        recs in proptest::collection::vec(rec_spec(), 0..6),
        tasks in proptest::collection::vec(task_spec(), 0..6),
        both in any::<bool>(),
    ) {
        run(recs, tasks, both)?;
    }
}
