//! Lifecycle changes are durable compare-and-set steps: failures count and back off, a
//! permanent error or a spent policy gives up, a lost task is not a failure, nothing applies
//! to an ended transfer, and coalesced progress is written at most once per interval.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TempStore, TestResult};
use waybill::{
    CancelResult, Completion, Durability, ErrorClass, FailReason, FailResult, NewTransfer, Outcome,
    Phase, RetryPolicy, Store, TaskBinding,
};

/// Task `task_id` of the default session, untagged.
fn task(task_id: u64) -> TaskBinding {
    TaskBinding {
        session: "default".into(),
        task_id,
        tag: None,
    }
}

fn clock_store(root: &std::path::Path, now: Arc<AtomicU64>) -> waybill::Result<Store> {
    Store::builder()
        .clock(move || UNIX_EPOCH + Duration::from_millis(now.load(Ordering::SeqCst)))
        .open(root)
}

#[test]
fn failures_back_off_then_give_up() -> TestResult {
    let t = TempStore::new()?;
    let now = Arc::new(AtomicU64::new(1_700_000_000_000));
    let store = clock_store(&t.root(), now.clone())?;
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_secs(2),
        max_backoff: Duration::from_secs(3),
    };
    let id = store.create(NewTransfer::download("https://example.com/f").retry(policy))?;
    let t0 = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
    store.bind(id, task(1))?;
    assert_eq!(
        store.fail(id, ErrorClass::Transient, "reset")?,
        FailResult::RetryAt(t0 + Duration::from_secs(2))
    );
    let s = store.get(id)?.state;
    assert_eq!(
        (s.phase, s.failures, s.binding.is_none()),
        (Phase::WaitingToRetry, 1, false)
    );
    assert_eq!(s.next_attempt, Some(t0 + Duration::from_secs(2)));
    assert_eq!(s.last_error.as_deref(), Some("reset"));
    // Second backoff doubles, capped by max_backoff.
    assert_eq!(
        store.fail(id, ErrorClass::Transient, "reset")?,
        FailResult::RetryAt(t0 + Duration::from_secs(3))
    );
    assert_eq!(
        store.fail(id, ErrorClass::Transient, "reset")?,
        FailResult::GaveUp
    );
    let s = store.get(id)?.state;
    assert_eq!(s.phase, Phase::Failed);
    assert!(matches!(
        s.outcome,
        Some(Outcome::Failed {
            reason: FailReason::GaveUp,
            ..
        })
    ));
    // Nothing applies to an ended transfer.
    assert!(matches!(
        store.fail(id, ErrorClass::Transient, "x")?,
        FailResult::AlreadyEnded(_)
    ));
    assert!(matches!(
        store.complete(id, None)?,
        Completion::Lost(Outcome::Failed { .. })
    ));
    assert!(matches!(store.cancel(id)?, CancelResult::AlreadyEnded(_)));
    assert_eq!(store.get(id)?.state.failures, 3);
    Ok(())
}

#[test]
fn retry_after_and_permanent_errors() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = store.create(NewTransfer::download("https://example.com/a"))?;
    let when = SystemTime::now() + Duration::from_secs(3600);
    let FailResult::RetryAt(at) = store.fail(a, ErrorClass::RetryAfter(when), "503")? else {
        panic!("expected a retry time");
    };
    assert!(at <= when && when.duration_since(at)? < Duration::from_millis(1));
    assert_eq!(store.get(a)?.state.next_attempt, Some(at));

    let b = store.create(NewTransfer::download("https://example.com/b"))?;
    assert_eq!(
        store.fail(b, ErrorClass::Permanent, "404")?,
        FailResult::GaveUp
    );
    let s = store.get(b)?.state;
    assert_eq!(s.failures, 0, "a permanent error is not retried");
    assert!(matches!(
        s.outcome,
        Some(Outcome::Failed {
            reason: FailReason::Permanent,
            ..
        })
    ));
    assert_eq!(store.pending_outcomes()?.len(), 1);
    Ok(())
}

#[test]
fn a_lost_task_is_not_a_failure() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    store.bind(id, task(3))?;
    store.task_lost(id)?;
    let s = store.get(id)?.state;
    assert_eq!((s.phase, s.failures, s.binding), (Phase::Pending, 0, None));
    Ok(())
}

#[test]
fn cancel_reports_the_bound_task() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    let b = task(5);
    store.bind(id, b.clone())?;
    assert_eq!(store.cancel(id)?, CancelResult::Cancelled { task: Some(b) });
    assert_eq!(
        store.cancel(id)?,
        CancelResult::AlreadyEnded(Outcome::Cancelled)
    );
    assert!(matches!(
        store.complete(id, Some(200))?,
        Completion::Lost(Outcome::Cancelled)
    ));
    assert!(
        store.pending_outcomes()?.is_empty(),
        "cancelled is purged, not delivered"
    );
    Ok(())
}

#[test]
fn replaced_request_is_used_and_keeps_secrets_off_disk() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/old"))?;
    let mut r = waybill::Request::new("GET", "https://example.com/new?sig=2");
    r.headers.push(waybill::Header {
        name: "Authorization".into(),
        value: "tok3n".into(),
        secret: true,
    });
    store.replace_request(id, r)?;
    drop(store);
    let store = Store::open(t.root())?;
    let tr = store.get(id)?;
    assert_eq!(tr.request().url, "https://example.com/new?sig=2");
    assert_eq!(tr.manifest.request.url, "https://example.com/old");
    assert_eq!(
        tr.request().secret_header_names().collect::<Vec<_>>(),
        ["Authorization"]
    );
    let state = std::fs::read(
        t.root()
            .join("transfers")
            .join(id.to_string())
            .join("state"),
    )?;
    assert!(!state.windows(5).any(|w| w == b"tok3n"));
    Ok(())
}

#[test]
fn coalesced_progress_is_written_at_most_once_per_interval() -> TestResult {
    let t = TempStore::new()?;
    let id;
    {
        let store = Store::builder()
            .flush_interval(Duration::from_secs(3600))
            .open(t.root())?;
        id = store.create(NewTransfer::download("https://example.com/a"))?;
        for i in 1..=1000 {
            store.progress(id, i, Some(1000), Durability::Coalesced)?;
        }
        // Not yet written: another handle still sees the durable value.
        let other = Store::open(t.root())?;
        assert_eq!(other.get(id)?.state.bytes_done, 0);
        // A lifecycle change carries the pending progress with it.
        store.bind(id, task(1))?;
        assert_eq!(other.get(id)?.state.bytes_done, 1000);
        store.progress(id, 1500, Some(2000), Durability::Coalesced)?;
        assert_eq!(other.get(id)?.state.bytes_done, 1000);
        // Dropping the handle flushes.
    }
    let store = Store::open(t.root())?;
    assert_eq!(store.get(id)?.state.bytes_done, 1500);

    // With a zero interval, every report is written.
    let eager = Store::builder()
        .flush_interval(Duration::ZERO)
        .open(t.root())?;
    eager.progress(id, 1600, None, Durability::Coalesced)?;
    assert_eq!(store.get(id)?.state.bytes_done, 1600);
    // Progress on an ended transfer is ignored.
    eager.complete(id, None)?;
    eager.progress(id, 1, None, Durability::Immediate)?;
    assert_eq!(store.get(id)?.state.bytes_done, 1600);
    Ok(())
}

#[test]
fn threads_sharing_one_handle_lose_no_update() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(
        NewTransfer::download("https://example.com/a").retry(RetryPolicy {
            max_attempts: u32::MAX,
            ..RetryPolicy::default()
        }),
    )?;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| -> waybill::Result<()> {
                    for _ in 0..100 {
                        store.fail(id, ErrorClass::Transient, "count")?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| "thread panicked")?
                .map_err(|e| e.to_string())
        })
    })?;
    assert_eq!(store.get(id)?.state.failures, 400);
    Ok(())
}
