//! Group commit: many changes, few device flushes, each lock held until the shared flush.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use super::*;
use crate::fs::Backend;
use crate::layout::STATE;
use crate::reconcile::{Sessions, Task};
use crate::transfer::{NewTransfer, Phase, TaskBinding};
use crate::{Changed, Completion, ErrorKind};

const SESSION: &str = "bg";

/// Device flushes (`fdatasync`, directory syncs, `syncfs`, `F_FULLFSYNC`) counted while `on`.
#[derive(Clone, Default)]
struct Flushes {
    on: Arc<AtomicBool>,
    n: Arc<AtomicU64>,
    /// Files sent to the drive without a cache flush (Apple's `fsync`).
    sent: Arc<AtomicU64>,
}

impl Flushes {
    fn spy(&self, inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
        let me = self.clone();
        Arc::new(crate::testkit::spy::Spy::over(inner, move |c| {
            if me.on.load(SeqCst) {
                match c.name {
                    "sync_data" | "sync_dir" | "sync_fs" | "full_sync" => {
                        me.n.fetch_add(1, SeqCst);
                    }
                    "sync_to_drive" => {
                        me.sent.fetch_add(1, SeqCst);
                    }
                    _ => {}
                }
            }
            Ok(())
        }))
    }

    /// Runs `f` counting; returns its result and the flushes it made.
    fn count<T>(&self, f: impl FnOnce() -> T) -> (T, u64) {
        let before = self.n.load(SeqCst);
        self.on.store(true, SeqCst);
        let r = f();
        self.on.store(false, SeqCst);
        (r, self.n.load(SeqCst) - before)
    }
}

fn tmp() -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .map_err(|e| Error::io("tempdir", Path::new("."), e))
}

fn url(i: usize) -> String {
    format!("https://example.com/u/{i}")
}

fn downloads(store: &Store, n: usize) -> Result<Vec<TransferId>> {
    store.create_batch(
        (0..n)
            .map(|i| NewTransfer::download(url(i)).session(SESSION))
            .collect(),
    )
}

fn task(id: u64) -> TaskBinding {
    TaskBinding {
        session: SESSION.into(),
        task_id: id,
        tag: None,
    }
}

/// Binds every transfer with one batch; returns the flushes it made.
fn bind_all(store: &Store, f: &Flushes, ids: &[TransferId]) -> Result<u64> {
    let mut b = store.batch();
    for (i, id) in ids.iter().enumerate() {
        b.bind(*id, task(i as u64));
    }
    let (results, flushes) = f.count(|| b.commit());
    for r in results {
        assert!(matches!(r?, Changed::Bound));
    }
    Ok(flushes)
}

/// The bound the issue sets: one flush per part, plus two.
fn bound(n: usize, part: usize) -> u64 {
    n.div_ceil(part) as u64 + 2
}

/// An `apply` of a 10,000-action plan and a batch of 10,000 binds each pay at most one device
/// flush per part (plus two), not one per change.
#[test]
fn an_apply_of_10000_actions_and_a_batch_of_10000_binds_pay_a_few_flushes() -> Result<()> {
    const N: usize = 10_000;
    let d = tmp()?;
    let f = Flushes::default();
    let store = Store::builder()
        .backend(f.spy(Arc::new(crate::fs::Real)))
        .background_flush(false)
        .open(d.path())?;
    let part = store.core.group_part;
    let ids = downloads(&store, N)?;
    let flushes = bind_all(&store, &f, &ids)?;
    println!("a batch of {N} binds: {flushes} device flushes (parts of {part})");
    assert!(
        flushes <= bound(N, part),
        "a batch of {N} binds made {flushes} device flushes (part {part})"
    );
    // Half the tasks finished, the other half run under new task ids: 10,000 state changes.
    let tasks: Vec<Task> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let t = Task::running(SESSION, i as u64, url(i));
            if i % 2 == 0 {
                t.completed(200)
            } else {
                Task::running(SESSION, (N + i) as u64, url(i)).tag(id.to_string())
            }
        })
        .collect();
    let now = store.now();
    let plan = store.reconcile(&Sessions::only([SESSION]), &tasks, now)?;
    assert_eq!(plan.actions.len(), N);
    let (report, flushes) = f.count(|| store.apply(&plan));
    let report = report?;
    assert_eq!(report.applied, N);
    println!("an apply of {N} actions: {flushes} device flushes (parts of {part})");
    assert!(
        flushes <= bound(N, part),
        "an apply of {N} actions made {flushes} device flushes (part {part})"
    );
    // Every change is durable: a second handle sees it.
    let other = Store::builder().background_flush(false).open(d.path())?;
    for (i, id) in ids.iter().enumerate() {
        let s = other.get(*id)?.state;
        if i % 2 == 0 {
            assert_eq!(s.phase, Phase::Completed, "{id}");
        } else {
            assert_eq!(s.binding.map(|b| b.task_id), Some((N + i) as u64), "{id}");
        }
    }
    Ok(())
}

/// A relaunch whose tasks all still run, only their counters moved: `apply` flushes nothing
/// (the counters become coalesced progress), and `flush()` writes them with one group commit.
#[test]
fn adopting_unchanged_bindings_flushes_nothing_and_flush_writes_the_counters() -> Result<()> {
    const N: usize = 300;
    let d = tmp()?;
    let f = Flushes::default();
    let store = Store::builder()
        .backend(f.spy(Arc::new(crate::fs::Real)))
        .background_flush(false)
        .open_budget(64)
        .open(d.path())?;
    let ids = downloads(&store, N)?;
    bind_all(&store, &f, &ids)?;
    let mut tasks: Vec<Task> = (0..N)
        .map(|i| Task::running(SESSION, i as u64, url(i)))
        .collect();
    for (i, t) in tasks.iter_mut().enumerate() {
        t.bytes_done = 1000 + i as u64;
        t.bytes_total = Some(1 << 20);
    }
    let plan = store.reconcile(&Sessions::only([SESSION]), &tasks, store.now())?;
    let (report, flushes) = f.count(|| store.apply(&plan));
    assert_eq!(report?.applied, N);
    assert_eq!(flushes, 0, "an apply of unchanged bindings flushed");
    // Not yet durable, but kept: the next flush writes them all, a few flushes for all.
    let (r, flushes) = f.count(|| store.flush());
    r?;
    assert!(
        flushes <= bound(N, 64) - 2,
        "flush() made {flushes} flushes"
    );
    let other = Store::builder().background_flush(false).open(d.path())?;
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(other.get(*id)?.state.bytes_done, 1000 + i as u64);
    }
    // A binding that changes is durable before apply returns.
    let moved = [Task::running(SESSION, 5_000, url(7)).tag(ids[7].to_string())];
    let all: Vec<Task> = tasks
        .iter()
        .filter(|t| t.task_id != 7)
        .cloned()
        .chain(moved)
        .collect();
    let plan = store.reconcile(&Sessions::only([SESSION]), &all, store.now())?;
    let (r, flushes) = f.count(|| store.apply(&plan));
    r?;
    assert_eq!(flushes, 1, "one changed binding, one shared flush");
    let other = Store::builder().background_flush(false).open(d.path())?;
    assert_eq!(
        other.get(ids[7])?.state.binding.map(|b| b.task_id),
        Some(5_000)
    );
    Ok(())
}

/// On Apple platforms a group is sent to the drive file by file and made durable by one
/// `F_FULLFSYNC` per part (modelled by the simulated file system).
#[test]
fn the_apple_flush_path_pays_one_cache_flush_per_part() -> Result<()> {
    const N: usize = 500;
    let sim = crate::testkit::sim::Sim::new();
    sim.apple(false);
    let f = Flushes::default();
    let store = crate::testkit::sim_builder(&sim)
        .backend(f.spy(sim.clone()))
        .open_budget(64)
        .open("/store")?;
    let ids = downloads(&store, N)?;
    let before = f.sent.load(SeqCst);
    let flushes = bind_all(&store, &f, &ids)?;
    assert!(
        flushes <= bound(N, 64),
        "{flushes} cache flushes for {N} binds"
    );
    let sent = f.sent.load(SeqCst) - before;
    assert_eq!(flushes, N.div_ceil(64) as u64, "one cache flush per part");
    assert_eq!(
        sent + flushes,
        N as u64,
        "each file sent to the drive once (the last of a part by its cache flush)"
    );
    // Durable after a power loss.
    let crashed = crate::testkit::sim::Sim::from_image(sim.snapshot().crash(&[], sim_tear()));
    let after = crate::testkit::sim_builder(&crashed).open("/store")?;
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            after.get(*id)?.state.binding.map(|b| b.task_id),
            Some(i as u64)
        );
    }
    assert!(!store.durability_weakened());
    Ok(())
}

fn sim_tear() -> crate::testkit::sim::Tear {
    crate::testkit::sim::Tear::None
}

/// A volume that refuses `F_FULLFSYNC` weakens durability (reported) but fails nothing.
#[test]
fn a_volume_refusing_the_cache_flush_weakens_durability_without_poisoning() -> Result<()> {
    let sim = crate::testkit::sim::Sim::new();
    sim.apple(true);
    let store = crate::testkit::sim_builder(&sim).open("/store")?;
    let ids = downloads(&store, 3)?;
    let mut b = store.batch();
    for (i, id) in ids.iter().enumerate() {
        b.bind(*id, task(i as u64));
    }
    for r in b.commit() {
        r?;
    }
    assert!(store.durability_weakened());
    store.core.fs.check()?;
    assert_eq!(store.get(ids[0])?.state.phase, Phase::Running);
    Ok(())
}

/// Several changes to one transfer are combined and written once; a refused change fails
/// alone and leaves the state as the changes before it left it; answers come in order.
#[test]
fn a_batch_writes_each_transfer_once_and_refusals_fail_alone() -> Result<()> {
    let d = tmp()?;
    let writes = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&writes);
    let spy = crate::testkit::spy::Spy::new(move |c| {
        if c.name == "write_at" {
            w.fetch_add(1, SeqCst);
        }
        Ok(())
    });
    let store = Store::builder()
        .backend(Arc::new(spy))
        .background_flush(false)
        .open(d.path())?;
    let ids = downloads(&store, 2)?;
    let (a, b) = (ids[0], ids[1]);
    let before = writes.load(SeqCst);
    let mut batch = store.batch();
    batch
        .bind(a, task(1))
        .progress(a, 10, Some(100))
        .bind(
            b,
            TaskBinding {
                session: "elsewhere".into(),
                task_id: 2,
                tag: None,
            },
        )
        .complete(a, Some(201))
        .complete(a, Some(202))
        .cancel(TransferId::new_v4());
    let r = batch.commit();
    assert_eq!(writes.load(SeqCst) - before, 1, "one slot written for {a}");
    assert!(matches!(r[0], Ok(Changed::Bound)));
    assert!(matches!(r[1], Ok(Changed::Progressed)));
    assert!(matches!(
        r[2].as_ref().map_err(Error::kind),
        Err(ErrorKind::InvalidArgument { .. })
    ));
    assert!(matches!(r[3], Ok(Changed::Completed(Completion::Won(_)))));
    assert!(matches!(r[4], Ok(Changed::Completed(Completion::Lost(_)))));
    assert!(matches!(
        r[5].as_ref().map_err(Error::kind),
        Err(ErrorKind::NotFound { .. })
    ));
    let t = store.get(a)?.state;
    assert_eq!((t.phase, t.bytes_done), (Phase::Completed, 10));
    assert_eq!(store.get(b)?.state.phase, Phase::Pending);
    assert!(batch.is_empty());
    assert_eq!(store.find_by_task(SESSION, 1)?.map(|t| t.id()), Some(a));
    Ok(())
}

/// Every transfer of a group commit stays locked until the shared flush has returned: at the
/// flush, another open of each member's state file cannot take its lock.
#[test]
fn each_lock_is_held_until_the_shared_flush_returns() -> Result<()> {
    let d = tmp()?;
    let root = d.path().to_path_buf();
    let members: Arc<Mutex<Vec<TransferId>>> = Arc::default();
    let checked = Arc::new(AtomicU64::new(0));
    let (m, seen) = (Arc::clone(&members), Arc::clone(&checked));
    let spy = crate::testkit::spy::Spy::new(move |c| {
        if matches!(c.name, "sync_fs" | "sync_data" | "full_sync") {
            for id in lock(&m).iter() {
                let path = crate::layout::transfer_dir(&root, *id).join(STATE);
                let f = std::fs::File::open(&path)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                match f.try_lock() {
                    Err(std::fs::TryLockError::WouldBlock) => {
                        seen.fetch_add(1, SeqCst);
                    }
                    _ => {
                        return Err(std::io::Error::other(format!(
                            "{id} was unlocked before the shared flush"
                        )));
                    }
                }
            }
        }
        Ok(())
    });
    let store = Store::builder()
        .backend(Arc::new(spy))
        .background_flush(false)
        .open(d.path())?;
    let ids = downloads(&store, 5)?;
    *lock(&members) = ids.clone();
    let mut b = store.batch();
    for (i, id) in ids.iter().enumerate() {
        b.bind(*id, task(i as u64));
    }
    for r in b.commit() {
        r?;
    }
    assert!(checked.load(SeqCst) >= ids.len() as u64);
    Ok(())
}

/// A failed shared flush fails every change it covered and poisons the store; a failed write
/// of one member fails that member's changes alone.
#[test]
fn a_failed_flush_fails_every_change_and_a_failed_write_fails_one() -> Result<()> {
    let d = tmp()?;
    // Which calls fail: the second state write of the batch, or any flush (a batch of three
    // syncs file by file; `syncfs` where a file system sync is used).
    let fail: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let writes = Arc::new(AtomicU64::new(0));
    let (f, w) = (Arc::clone(&fail), Arc::clone(&writes));
    let spy = crate::testkit::spy::Spy::new(move |c| {
        let armed = lock(&f).contains(&c.name);
        if armed && (c.name != "write_at" || w.fetch_add(1, SeqCst) == 1) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    });
    let store = Store::builder()
        .backend(Arc::new(spy))
        .background_flush(false)
        .open(d.path())?;
    let ids = downloads(&store, 3)?;
    *lock(&fail) = vec!["write_at"];
    let mut b = store.batch();
    for (i, id) in ids.iter().enumerate() {
        b.bind(*id, task(i as u64));
    }
    let r = b.commit();
    // Members are written in id order: the second one's write fails.
    let mut sorted = ids.clone();
    sorted.sort();
    let victim = ids.iter().position(|id| *id == sorted[1]);
    let failed: Vec<usize> = (0..3).filter(|&i| r[i].is_err()).collect();
    assert_eq!(failed, victim.into_iter().collect::<Vec<_>>(), "{r:?}");
    store.core.fs.check()?;
    let other = Store::builder().background_flush(false).open(d.path())?;
    for id in &ids {
        let bound = other.get(*id)?.state.binding.is_some();
        assert_eq!(bound, *id != sorted[1], "{id}");
    }
    *lock(&fail) = vec!["sync_fs", "sync_data", "full_sync"];
    let mut b = store.batch();
    for id in &ids {
        b.complete(*id, Some(200));
    }
    let r = b.commit();
    assert!(r.iter().all(|r| r.is_err()), "{r:?}");
    assert!(matches!(
        store.core.fs.check().map_err(|e| e.into_kind()),
        Err(ErrorKind::Poisoned { .. })
    ));
    Ok(())
}

/// Two handles committing over the same transfers at once, each on several threads, never
/// wait on each other in a cycle: every change succeeds, none times out as `Busy`.
#[test]
fn concurrent_multi_threaded_commits_never_deadlock() -> Result<()> {
    const N: usize = 600;
    let d = tmp()?;
    let open = || {
        Store::builder()
            .background_flush(false)
            .batch_threads(2)
            .lock_timeout(std::time::Duration::from_secs(2))
            .open(d.path())
    };
    let first = open()?;
    let ids = downloads(&first, N)?;
    let second = open()?;
    std::thread::scope(|scope| {
        let runs: Vec<_> = [&first, &second]
            .into_iter()
            .enumerate()
            .map(|(k, store)| {
                let ids = &ids;
                scope.spawn(move || -> Result<()> {
                    for round in 0..4u64 {
                        let mut b = store.batch();
                        for (i, id) in ids.iter().enumerate() {
                            b.progress(*id, round * 10_000 + k as u64 * 1000 + i as u64, None);
                        }
                        for r in b.commit() {
                            r?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        runs.into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    })
}
