//! Property tests of the pure planner: totality, determinism, session isolation, completed
//! records never recreated, and ambiguity never adopting (checked against an independent
//! statement of the matching rules).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::transfer::{Manifest, PayloadFacts, RetryPolicy, State, TaskBinding};
use crate::value::Value;

const SESSIONS: [&str; 3] = ["s1", "s2", "s3"];
const URLS: [&str; 4] = ["https://x/1", "https://x/2", "https://x/3", "https://x/4"];

#[derive(Debug, Clone)]
struct RecSpec {
    session: usize,
    url: usize,
    phase: usize,
    failures: u32,
    max_attempts: u32,
    binding: Option<(u64, Option<u8>)>,
    deadline: Option<bool>,
    download: bool,
    partial: bool,
    resume: bool,
    next_attempt: Option<bool>,
    key: Option<u8>,
}

#[derive(Debug, Clone)]
enum TagSpec {
    None,
    Record(usize),
    Named(u8),
    Corrupt(usize),
}

#[derive(Debug, Clone)]
struct TaskSpec {
    session: usize,
    task_id: u64,
    url: usize,
    tag: TagSpec,
    state: usize,
    status: Option<u16>,
    error: bool,
}

fn rec_spec() -> impl Strategy<Value = RecSpec> {
    (
        (0..3usize, 0..4usize, 0..6usize, 0..3u32, 1..4u32),
        proptest::option::of((1..6u64, proptest::option::of(0..3u8))),
        proptest::option::of(any::<bool>()),
        (any::<bool>(), any::<bool>(), any::<bool>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(0..2u8),
    )
        .prop_map(
            |(
                (session, url, phase, failures, max_attempts),
                binding,
                deadline,
                (download, partial, resume),
                next_attempt,
                key,
            )| RecSpec {
                session,
                url,
                phase,
                failures,
                max_attempts,
                binding,
                deadline,
                download,
                partial,
                resume,
                next_attempt,
                key,
            },
        )
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    (
        (0..3usize, 1..6u64, 0..4usize),
        prop_oneof![
            Just(TagSpec::None),
            (0..8usize).prop_map(TagSpec::Record),
            (0..3u8).prop_map(TagSpec::Named),
            (0..2usize).prop_map(TagSpec::Corrupt),
        ],
        (
            0..4usize,
            proptest::option::of(prop_oneof![Just(200u16), Just(404), Just(503)]),
            any::<bool>(),
        ),
    )
        .prop_map(
            |((session, task_id, url), tag, (state, status, error))| TaskSpec {
                session,
                task_id,
                url,
                tag,
                state,
                status,
                error,
            },
        )
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_000_000)
}

fn rec_id(i: usize) -> TransferId {
    TransferId::from_bytes([u8::try_from(i).unwrap_or(0).wrapping_add(1); 16])
}

fn corrupt_id(i: usize) -> TransferId {
    TransferId::from_bytes([0xc0 + u8::try_from(i).unwrap_or(0); 16])
}

fn build_record(i: usize, r: &RecSpec) -> Record {
    let id = rec_id(i);
    let session = SESSIONS[r.session].to_owned();
    let phase = Phase::ALL[r.phase];
    let outcome = match phase {
        Phase::Completed => Some(Outcome::Succeeded { status: Some(200) }),
        Phase::Failed => Some(Outcome::Failed {
            reason: crate::FailReason::GaveUp,
            error: "e".into(),
        }),
        Phase::Cancelled => Some(Outcome::Cancelled),
        _ => None,
    };
    let at = |past: bool| {
        if past {
            now() - Duration::from_secs(10)
        } else {
            now() + Duration::from_secs(10)
        }
    };
    let manifest = Manifest {
        id,
        kind: if r.download {
            Kind::Download
        } else {
            Kind::Upload
        },
        session: session.clone(),
        request: Request::new("GET", URLS[r.url]),
        group: None,
        created: UNIX_EPOCH,
        deadline: r.deadline.map(at),
        retry: RetryPolicy {
            max_attempts: r.max_attempts,
            ..RetryPolicy::default()
        },
        payload: PayloadFacts::None,
        idempotency_key: r.key.map_or_else(|| id.to_string(), |k| format!("k{k}")),
        metadata: Value::empty_map(),
    };
    let mut state = State::new();
    state.phase = phase;
    state.failures = r.failures;
    state.outcome = outcome;
    state.next_attempt = r.next_attempt.map(at);
    state.partial_len = if r.partial { 10 } else { 0 };
    state.binding = r.binding.map(|(task_id, tag)| TaskBinding {
        session,
        task_id,
        tag: tag.map(|t| format!("t{t}")),
    });
    Record {
        transfer: Transfer { manifest, state },
        has_resume_data: r.download && r.resume,
    }
}

fn build_task(t: &TaskSpec, supplied: &[&str], n_recs: usize) -> Option<Task> {
    let session = (*supplied.get(t.session % supplied.len().max(1))?).to_owned();
    let tag = match t.tag {
        TagSpec::None => None,
        TagSpec::Record(i) if n_recs > 0 => Some(rec_id(i % n_recs).to_string()),
        TagSpec::Record(_) => None,
        TagSpec::Named(n) => Some(format!("t{n}")),
        TagSpec::Corrupt(i) => Some(corrupt_id(i).to_string()),
    };
    let state = [
        TaskState::Running,
        TaskState::Suspended,
        TaskState::Cancelling,
        TaskState::Completed,
    ][t.state];
    Some(Task {
        session,
        task_id: t.task_id,
        url: URLS[t.url].to_owned(),
        tag,
        state,
        status: if state == TaskState::Completed {
            t.status
        } else {
            None
        },
        error: (state == TaskState::Completed && t.error).then(|| "boom".to_owned()),
        bytes_done: 1,
        bytes_total: Some(2),
    })
}

/// The matching rules stated independently of the planner: a task's candidates are the
/// records its strongest evidence points at.
fn candidates(t: &Task, recs: &[&Record], corrupt: &[TransferId]) -> Vec<String> {
    let same = |r: &&&Record| r.transfer.manifest.session == t.session;
    if let Some(tag) = &t.tag {
        let c: Vec<String> = recs
            .iter()
            .filter(same)
            .filter(|r| {
                let tr = &r.transfer;
                tr.id().to_string() == *tag
                    || tr.manifest.idempotency_key == *tag
                    || tr.state.binding.as_ref().and_then(|b| b.tag.as_ref()) == Some(tag)
            })
            .map(|r| r.transfer.id().to_string())
            .collect();
        if !c.is_empty() {
            return c;
        }
        if corrupt.iter().any(|c| c.to_string() == *tag) {
            return vec![tag.clone()];
        }
    }
    let c: Vec<String> = recs
        .iter()
        .filter(same)
        .filter(|r| {
            r.transfer
                .state
                .binding
                .as_ref()
                .is_some_and(|b| b.task_id == t.task_id)
                && r.transfer.request().url == t.url
        })
        .map(|r| r.transfer.id().to_string())
        .collect();
    if !c.is_empty() {
        return c;
    }
    recs.iter()
        .filter(same)
        .filter(|r| r.transfer.state.binding.is_none() && r.transfer.request().url == t.url)
        .map(|r| r.transfer.id().to_string())
        .collect()
}

#[derive(Debug)]
struct Case {
    sessions: Sessions,
    supplied: Vec<&'static str>,
    tasks: Vec<Task>,
    records: Vec<Record>,
    corrupt: Vec<TransferId>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::sample::subsequence(SESSIONS.to_vec(), 0..=3),
        proptest::collection::vec(rec_spec(), 0..8),
        proptest::collection::vec(task_spec(), 0..8),
        0..3usize,
    )
        .prop_map(|(supplied, recs, tasks, n_corrupt)| {
            let records: Vec<Record> = recs
                .iter()
                .enumerate()
                .map(|(i, r)| build_record(i, r))
                .collect();
            let mut seen = BTreeSet::new();
            let tasks: Vec<Task> = tasks
                .iter()
                .filter_map(|t| build_task(t, &supplied, records.len()))
                .filter(|t| seen.insert((t.session.clone(), t.task_id)))
                .collect();
            Case {
                sessions: Sessions::only(supplied.iter().copied()),
                supplied,
                tasks,
                records,
                corrupt: (0..n_corrupt).map(corrupt_id).collect(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn plans_are_total_deterministic_isolated_and_never_guess(c in case()) {
        let opts = ReconcileOptions::default();
        let p = plan(&c.sessions, &c.tasks, &c.records, &c.corrupt, now(), &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;

        // Totality: every task and every relevant record exactly once.
        let mut task_seen: BTreeMap<TaskRef, usize> = BTreeMap::new();
        let mut rec_seen: BTreeMap<TransferId, usize> = BTreeMap::new();
        for a in &p.actions {
            if let Some(t) = a.task() { *task_seen.entry(t.clone()).or_default() += 1; }
            if let Some(id) = a.transfer() { *rec_seen.entry(id).or_default() += 1; }
        }
        let want_tasks: BTreeSet<TaskRef> = c.tasks.iter().map(Task::key).collect();
        prop_assert_eq!(task_seen.keys().cloned().collect::<BTreeSet<_>>(), want_tasks);
        prop_assert!(task_seen.values().all(|&n| n == 1));
        let relevant: Vec<&Record> = c.records.iter().filter(|r| c.supplied.contains(&r.transfer.manifest.session.as_str())).collect();
        let mut want_recs: BTreeSet<TransferId> = relevant.iter().map(|r| r.transfer.id()).collect();
        want_recs.extend(c.corrupt.iter().copied());
        prop_assert_eq!(rec_seen.keys().copied().collect::<BTreeSet<_>>(), want_recs);
        prop_assert!(rec_seen.values().all(|&n| n == 1));

        // Determinism: same inputs in another order, same plan.
        let mut tasks = c.tasks.clone();
        tasks.reverse();
        let mut records = c.records.clone();
        records.reverse();
        let again = plan(&c.sessions, &tasks, &records, &c.corrupt, now(), &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&again, &p);
        // Deciding records on two threads, and reading them in two parts, changes nothing.
        let (first, second) = c.records.split_at(c.records.len() / 2);
        let split = plan_with(&c.sessions, &c.tasks, &[first, second], &c.corrupt, 1, |r, t| decide(r, t, now(), &opts)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&split, &p);

        // Isolation: nothing outside the supplied sessions.
        for a in &p.actions {
            if let Some(t) = a.task() { prop_assert!(c.supplied.contains(&t.session.as_str())); }
        }

        for a in &p.actions {
            let Some(id) = a.transfer() else { continue };
            let Some(r) = relevant.iter().find(|r| r.transfer.id() == id) else { continue };
            // A completed record is never recreated: its outcome is delivered.
            if matches!(r.transfer.state.phase, Phase::Completed | Phase::Failed) {
                prop_assert!(matches!(a, Action::Deliver { claim: false, .. }), "{:?}", a);
            }
            // Ambiguity never adopts: the adopted task points at this record alone, and no
            // other task points at it.
            if let Action::Adopt { task, .. } = a {
                let t = c.tasks.iter().find(|t| t.key() == *task).ok_or_else(|| TestCaseError::fail("unknown task"))?;
                let ids = id.to_string();
                prop_assert_eq!(candidates(t, &relevant, &c.corrupt), vec![ids.clone()]);
                for other in c.tasks.iter().filter(|o| o.key() != *task) {
                    prop_assert!(!candidates(other, &relevant, &c.corrupt).contains(&ids));
                }
            }
        }
    }
}
