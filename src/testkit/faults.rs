//! Injected faults. For every operation, the Nth file system call fails, for every N, with each
//! fault in turn: EIO, ENOSPC, a short write (half the bytes land, then ENOSPC), a failed sync.
//!
//! After each run:
//! - the call returned `Ok` or a typed error, and a failed sync was never reported as success;
//! - a failed sync left the handle poisoned: every later call says so until the store is
//!   reopened; otherwise the same handle still works;
//! - reopened, every transfer the operation did not target is exactly as it was, the target is
//!   either as it was or as a fault-free run leaves it (as the fault-free run when the call
//!   returned `Ok`), a create is whole or absent, no state is torn, payloads match their
//!   manifests, and no staging or trash debris is left.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::fs::{Backend, BootMark, Entry, Handle, Meta, OpenMode, Real};
use crate::{
    Durability, ErrorClass, ErrorKind, NewTransfer, Phase, Sessions, Store, Task, TaskBinding,
    Transfer, TransferId, UploadSource,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Eio,
    Enospc,
    ShortWrite,
    SyncFails,
}

const FAULTS: [Fault; 4] = [
    Fault::Eio,
    Fault::Enospc,
    Fault::ShortWrite,
    Fault::SyncFails,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
    Mutate,
    Sync,
}

/// The real file system, counting calls once armed and failing the `fail_at`-th.
#[derive(Debug)]
struct Faulty {
    armed: AtomicBool,
    calls: AtomicU64,
    fail_at: u64,
    fault: Fault,
    hit: Mutex<Option<&'static str>>,
    /// Flushes a group as Apple platforms do (each file sent to the drive, one cache flush;
    /// both are data syncs here) instead of with `syncfs`.
    apple: bool,
}

impl Faulty {
    fn new(fail_at: u64, fault: Fault) -> Arc<Self> {
        Faulty::flushing(fail_at, fault, false)
    }

    /// [`Faulty::new`], flushing groups as Apple platforms do.
    fn apple(fail_at: u64, fault: Fault) -> Arc<Self> {
        Faulty::flushing(fail_at, fault, true)
    }

    fn flushing(fail_at: u64, fault: Fault, apple: bool) -> Arc<Self> {
        Arc::new(Faulty {
            armed: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            fail_at,
            fault,
            hit: Mutex::new(None),
            apple,
        })
    }

    /// The injected error for this call, if it is the chosen one and the fault applies.
    fn tick(&self, name: &'static str, call: Call) -> Option<io::Error> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let applies = match self.fault {
            Fault::Eio => true,
            Fault::Enospc => matches!(call, Call::Write | Call::Mutate),
            Fault::ShortWrite => call == Call::Write,
            Fault::SyncFails => call == Call::Sync,
        };
        if n != self.fail_at || !applies {
            return None;
        }
        *self.hit.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
        Some(match self.fault {
            Fault::Eio | Fault::SyncFails => io::Error::from_raw_os_error(libc::EIO),
            Fault::Enospc | Fault::ShortWrite => io::Error::from_raw_os_error(libc::ENOSPC),
        })
    }

    fn hit(&self) -> Option<&'static str> {
        *self.hit.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

macro_rules! faulty {
    ($self:ident, $name:literal, $call:expr, $real:expr) => {
        match $self.tick($name, $call) {
            Some(e) => Err(e),
            None => $real,
        }
    };
}

impl Backend for Faulty {
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle> {
        faulty!(self, "open", Call::Mutate, Real.open(path, o))
    }
    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
        faulty!(self, "read", Call::Read, Real.read(f, max, buf))
    }
    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
        faulty!(self, "read", Call::Read, Real.read_at(f, offset, len, buf))
    }
    fn read_at_once(
        &self,
        f: &Handle,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        faulty!(
            self,
            "read",
            Call::Read,
            Real.read_at_once(f, offset, len, buf)
        )
    }
    fn write_at(&self, f: &Handle, offset: u64, bytes: &[u8]) -> io::Result<()> {
        match self.tick("write_at", Call::Write) {
            Some(e) if self.fault == Fault::ShortWrite => {
                let half = bytes.get(..bytes.len() / 2).unwrap_or_default();
                Real.write_at(f, offset, half)?;
                Err(e)
            }
            Some(e) => Err(e),
            None => Real.write_at(f, offset, bytes),
        }
    }
    fn write(&self, f: &Handle, bytes: &[u8]) -> io::Result<()> {
        match self.tick("write", Call::Write) {
            Some(e) if self.fault == Fault::ShortWrite => {
                Real.write(f, bytes.get(..bytes.len() / 2).unwrap_or_default())?;
                Err(e)
            }
            Some(e) => Err(e),
            None => Real.write(f, bytes),
        }
    }
    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()> {
        faulty!(self, "set_len", Call::Mutate, Real.set_len(f, len))
    }
    fn sync_data(&self, f: &Handle) -> io::Result<()> {
        faulty!(self, "sync_data", Call::Sync, Real.sync_data(f))
    }
    fn open_dir(&self, dir: &Path) -> io::Result<Handle> {
        faulty!(self, "open_dir", Call::Read, Real.open_dir(dir))
    }
    fn sync_dir(&self, dir: &Handle) -> io::Result<()> {
        faulty!(self, "sync_dir", Call::Sync, Real.sync_dir(dir))
    }
    fn can_sync_fs(&self, dir: &Handle) -> bool {
        !self.apple && Real.can_sync_fs(dir)
    }
    fn has_full_sync(&self) -> bool {
        self.apple
    }
    fn sync_to_drive(&self, f: &Handle) -> io::Result<()> {
        faulty!(self, "sync_to_drive", Call::Sync, Real.sync_data(f))
    }
    fn full_sync(&self, f: &Handle) -> io::Result<()> {
        if !self.apple {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        faulty!(self, "full_sync", Call::Sync, Real.sync_data(f))
    }
    fn sync_fs(&self, dir: &Handle) -> io::Result<()> {
        faulty!(self, "sync_fs", Call::Sync, Real.sync_fs(dir))
    }
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        faulty!(
            self,
            "create_dir",
            Call::Mutate,
            Real.create_dir(path, mode)
        )
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        faulty!(self, "rename", Call::Mutate, Real.rename(from, to))
    }
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        faulty!(self, "hard_link", Call::Mutate, Real.hard_link(src, dst))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        faulty!(self, "remove_file", Call::Mutate, Real.remove_file(path))
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        faulty!(
            self,
            "remove_dir_all",
            Call::Mutate,
            Real.remove_dir_all(path)
        )
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        faulty!(self, "list_dir", Call::Read, Real.list_dir(dir))
    }
    fn lstat(&self, path: &Path) -> io::Result<Meta> {
        faulty!(self, "lstat", Call::Read, Real.lstat(path))
    }
    fn fstat(&self, f: &Handle) -> io::Result<Meta> {
        faulty!(self, "fstat", Call::Read, Real.fstat(f))
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        faulty!(self, "canonicalize", Call::Read, Real.canonicalize(path))
    }
    fn read_exact_at(&self, f: &Handle, offset: u64, out: &mut [u8]) -> io::Result<()> {
        faulty!(self, "read", Call::Read, Real.read_exact_at(f, offset, out))
    }
    fn start_write_back(&self, f: &Handle) {
        Real.start_write_back(f);
    }
    fn try_lock(&self, f: &Handle) -> io::Result<bool> {
        faulty!(self, "try_lock", Call::Read, Real.try_lock(f))
    }
    fn try_lock_shared(&self, f: &Handle) -> io::Result<bool> {
        faulty!(self, "try_lock", Call::Read, Real.try_lock_shared(f))
    }
    fn unlock(&self, f: &Handle) -> io::Result<()> {
        Real.unlock(f)
    }
    fn dup(&self, f: &Handle) -> io::Result<Handle> {
        Real.dup(f)
    }
    fn boot(&self) -> Option<BootMark> {
        Real.boot()
    }
}

/// A fixed clock, so a fault-free run and a faulty run compute the same retry times.
fn clock() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn builder() -> crate::StoreBuilder {
    Store::builder()
        .clock(clock)
        .staging_grace(Duration::ZERO)
        .lock_timeout(Duration::from_millis(200))
}

/// What a scenario set up: the transfers the operation targets (none for a create), and a
/// file outside the store.
struct Ctx {
    targets: Vec<TransferId>,
    outside: PathBuf,
}

type Setup = fn(&Store, &Path) -> crate::Result<Ctx>;
type Op = fn(&Store, &Ctx) -> crate::Result<()>;

fn download(s: &Store) -> crate::Result<TransferId> {
    s.create(NewTransfer::download("https://cdn.example/d").session("bg"))
}

fn bound(s: &Store, _: &Path) -> crate::Result<Ctx> {
    let id = download(s)?;
    s.bind(id, binding(1))?;
    Ok(Ctx {
        targets: vec![id],
        outside: PathBuf::new(),
    })
}

/// Four bound downloads (tasks 1 to 4), all targets.
fn four_bound(s: &Store, _: &Path) -> crate::Result<Ctx> {
    let mut targets = Vec::new();
    for i in 0..4u64 {
        let id =
            s.create(NewTransfer::download(format!("https://cdn.example/{i}")).session("bg"))?;
        s.bind(id, binding(i + 1))?;
        targets.push(id);
    }
    Ok(Ctx {
        targets,
        outside: PathBuf::new(),
    })
}

/// The first error among a batch's results.
fn all_ok(results: Vec<crate::Result<crate::Changed>>) -> crate::Result<()> {
    results.into_iter().try_for_each(|r| r.map(drop))
}

fn binding(task_id: u64) -> TaskBinding {
    TaskBinding {
        session: "bg".into(),
        task_id,
        tag: None,
    }
}

fn nothing(_: &Store, dir: &Path) -> crate::Result<Ctx> {
    let outside = dir.join("source.bin");
    std::fs::write(&outside, vec![7u8; 3000]).map_err(|e| crate::Error::io("write", dir, e))?;
    Ok(Ctx {
        targets: Vec::new(),
        outside,
    })
}

/// The scenarios that run a group commit: each also runs flushing as Apple platforms do.
const GROUP_COMMITS: [&str; 4] = [
    "a batch of lifecycle changes",
    "reconcile and apply, group commit",
    "flush coalesced progress",
    "reconcile and apply",
];

fn scenarios() -> Vec<(&'static str, Setup, Op)> {
    fn t(c: &Ctx) -> TransferId {
        c.targets
            .first()
            .copied()
            .unwrap_or_else(TransferId::new_v4)
    }
    fn nth(c: &Ctx, i: usize) -> TransferId {
        c.targets.get(i).copied().unwrap_or_else(TransferId::new_v4)
    }
    vec![
        ("create an upload from bytes", nothing, |s, _| {
            s.create(NewTransfer::upload(
                "https://up.example/u",
                UploadSource::Bytes(vec![1; 5000]),
            ))
            .map(drop)
        }),
        ("create an upload from a copied file", nothing, |s, c| {
            s.create(NewTransfer::upload(
                "https://up.example/f",
                UploadSource::File {
                    path: c.outside.clone(),
                    link: crate::LinkMode::Copy,
                },
            ))
            .map(drop)
        }),
        ("create a batch", nothing, |s, _| {
            let batch = (0..3)
                .map(|i| NewTransfer::download(format!("https://cdn.example/{i}")))
                .collect();
            s.create_batch(batch).map(drop)
        }),
        (
            "bind",
            |s, d| {
                let mut c = nothing(s, d)?;
                c.targets = vec![download(s)?];
                Ok(c)
            },
            |s, c| s.bind(t(c), binding(3)),
        ),
        ("durable progress", bound, |s, c| {
            s.progress(t(c), 10, Some(100), Durability::Immediate)
        }),
        ("complete", bound, |s, c| {
            s.complete(t(c), Some(200)).map(drop)
        }),
        ("fail", bound, |s, c| {
            s.fail(t(c), ErrorClass::Transient, "reset").map(drop)
        }),
        ("cancel", bound, |s, c| s.cancel(t(c)).map(drop)),
        (
            "acknowledge",
            |s, d| {
                let c = bound(s, d)?;
                s.complete(t(&c), Some(200))?;
                Ok(c)
            },
            |s, c| s.acknowledge(t(c)),
        ),
        ("remove", bound, |s, c| s.remove(t(c))),
        ("append received bytes", bound, |s, c| {
            s.append_received(t(c), &[9; 700]).map(drop)
        }),
        ("store resume data", bound, |s, c| {
            s.store_resume_data(t(c), &[5; 900])
        }),
        (
            "accept a download",
            |s, d| {
                let mut c = bound(s, d)?;
                c.outside = nothing(s, d)?.outside;
                Ok(c)
            },
            |s, c| s.accept_download(t(c), &c.outside),
        ),
        ("reconcile and apply", bound, |s, _| {
            let tasks = [Task::running("bg", 1, "https://cdn.example/d").completed(200)];
            let plan = s.reconcile(&Sessions::only(["bg"]), &tasks, clock())?;
            s.apply(&plan).map(drop)
        }),
        ("a batch of lifecycle changes", four_bound, |s, c| {
            let mut b = s.batch();
            b.bind(nth(c, 0), binding(9))
                .progress(nth(c, 0), 40, Some(100))
                .complete(nth(c, 1), Some(200))
                .cancel(nth(c, 2))
                .fail(nth(c, 3), ErrorClass::Transient, "reset");
            all_ok(b.commit())
        }),
        ("reconcile and apply, group commit", four_bound, |s, c| {
            let url = |i: usize| format!("https://cdn.example/{i}");
            let tasks = [
                Task::running("bg", 1, url(0)).completed(200),
                Task::running("bg", 20, url(1)).tag(nth(c, 1).to_string()),
                Task::running("bg", 3, url(2)).failed("reset"),
                Task::running("bg", 4, url(3)).completed(503),
            ];
            let plan = s.reconcile(&Sessions::only(["bg"]), &tasks, clock())?;
            s.apply(&plan).map(drop)
        }),
        ("flush coalesced progress", four_bound, |s, c| {
            for (i, id) in c.targets.iter().enumerate() {
                s.progress(*id, 10 + i as u64, Some(100), Durability::Coalesced)?;
            }
            s.flush()
        }),
    ]
}

/// The part of a state an operation decides (not its retry time, which depends on the id).
type Essence = (
    Phase,
    u32,
    Option<TaskBinding>,
    u64,
    Option<u64>,
    Option<crate::Outcome>,
    u64,
    bool,
    crate::PayloadFacts,
);

fn essence(t: &Transfer) -> Essence {
    let s = &t.state;
    (
        s.phase,
        s.failures,
        // A tag here is the transfer's id, which differs from run to run.
        s.binding.clone().map(|b| TaskBinding { tag: None, ..b }),
        s.bytes_done,
        s.bytes_total,
        s.outcome.clone(),
        s.partial_len,
        s.downloaded,
        t.manifest.payload,
    )
}

fn all(store: &Store) -> Vec<Transfer> {
    store.list(&crate::Filter::all()).unwrap_or_default()
}

/// Runs a scenario on a fresh store, with `backend` armed for the operation only. Returns the
/// result, the transfers before, and the store root (inside `dir`).
fn run(
    dir: &Path,
    setup: Setup,
    op: Op,
    backend: Option<Arc<Faulty>>,
) -> (crate::Result<()>, Vec<Transfer>, Ctx, Option<Store>) {
    let root = dir.join("store");
    let ctx = {
        let s = builder().open(&root).expect("open");
        setup(&s, dir).expect("setup")
    };
    let before = all(&builder().open(&root).expect("reopen"));
    let store = match &backend {
        Some(b) => builder()
            .backend(b.clone())
            .open(&root)
            .expect("open faulty"),
        None => builder().open(&root).expect("open"),
    };
    if let Some(b) = &backend {
        b.armed.store(true, Ordering::SeqCst);
    }
    let r = op(&store, &ctx);
    if let Some(b) = &backend {
        b.disarm();
    }
    (r, before, ctx, Some(store))
}

fn tmp() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir")
}

#[test]
fn every_fault_at_every_call_of_every_operation_is_typed_and_loses_nothing() {
    let mut injected = 0u64;
    let mut runs = 0u64;
    let mut group_faults = 0u64;
    let runs_of = scenarios().into_iter().flat_map(|(name, setup, op)| {
        // Group commits also flush as Apple platforms do.
        let apple_too = GROUP_COMMITS.contains(&name);
        [(name, setup, op, false)]
            .into_iter()
            .chain(apple_too.then_some((name, setup, op, true)))
    });
    for (name, setup, op, apple) in runs_of {
        let faulty = |n, f| {
            if apple {
                Faulty::apple(n, f)
            } else {
                Faulty::new(n, f)
            }
        };
        let name = if apple {
            format!("{name} (Apple flush)")
        } else {
            name.to_owned()
        };
        // A fault-free run: how many calls the operation makes, and what it leaves.
        let d = tmp();
        let counter = faulty(u64::MAX, Fault::Eio);
        let (r, _, ctx, store) = run(d.path(), setup, op, Some(counter.clone()));
        r.unwrap_or_else(|e| panic!("{name}: fault-free run failed: {e}"));
        drop(store);
        let calls = counter.calls.load(Ordering::SeqCst);
        assert!(
            calls > 0,
            "{name}: no file system calls went through the seam"
        );
        let reference = builder().open(d.path().join("store")).expect("reopen");
        let want: Vec<Option<Essence>> = ctx
            .targets
            .iter()
            .map(|id| reference.get(*id).ok().map(|t| essence(&t)))
            .collect();
        let want_count = all(&reference).len();

        for fault in FAULTS {
            for n in 0..calls {
                runs += 1;
                let d = tmp();
                let b = faulty(n, fault);
                let (r, before, ctx, store) = run(d.path(), setup, op, Some(b.clone()));
                let store = store.expect("store");
                let Some(call) = b.hit() else {
                    continue; // this fault does not apply to call n
                };
                injected += 1;
                if GROUP_COMMITS.iter().any(|g| name.starts_with(g)) {
                    group_faults += 1;
                }
                let what = format!("{name}: {fault:?} at call {n} ({call})");
                if let Err(e) = &r {
                    assert!(!e.to_string().is_empty(), "{what}: empty error");
                }
                // A failed sync is an error, and poisons the handle until reopened.
                if fault == Fault::SyncFails {
                    assert!(r.is_err(), "{what}: a failed sync was reported as success");
                    let later = store.list(&crate::Filter::all()).expect_err("poisoned");
                    assert!(
                        matches!(later.kind(), ErrorKind::Poisoned { .. }),
                        "{what}: not poisoned: {later}"
                    );
                } else if store.core.fs.check().is_ok() {
                    // Still usable through the same handle.
                    let id = download(&store)
                        .unwrap_or_else(|e| panic!("{what}: the handle stopped working: {e}"));
                    store.remove(id).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                drop(store);

                let reopened = builder()
                    .open(d.path().join("store"))
                    .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
                let scan = reopened.scan().expect("scan");
                assert!(
                    scan.corrupt.is_empty(),
                    "{what}: corrupt after reopen: {:?}",
                    scan.corrupt
                );
                assert!(
                    scan.unknown.is_empty(),
                    "{what}: stray entries: {:?}",
                    scan.unknown
                );
                let after = scan.transfers;
                for t in &after {
                    assert!(!t.state.rebuilt, "{what}: torn state of {}", t.id());
                    // An upload's payload is exactly what its manifest says.
                    if t.manifest.kind == crate::Kind::Upload {
                        let mut f = reopened
                            .open_payload(t.id())
                            .unwrap_or_else(|e| panic!("{what}: payload of {}: {e}", t.id()));
                        let mut bytes = Vec::new();
                        std::io::Read::read_to_end(&mut f, &mut bytes).expect("read payload");
                        assert_eq!(
                            bytes.len() as u64,
                            t.manifest.payload.len(),
                            "{what}: payload"
                        );
                    }
                }
                // Untouched transfers are exactly as they were.
                for old in before.iter().filter(|t| !ctx.targets.contains(&t.id())) {
                    let now = after.iter().find(|t| t.id() == old.id());
                    assert_eq!(now, Some(old), "{what}: an untouched transfer changed");
                }
                // Each target is as it was, or as the fault-free run left it (which every one
                // must be after Ok).
                for (id, want) in ctx.targets.iter().zip(&want) {
                    let got = after.iter().find(|t| t.id() == *id).map(essence);
                    let old = before.iter().find(|t| t.id() == *id).map(essence);
                    if r.is_ok() {
                        assert_eq!(&got, want, "{what}: Ok, but not the fault-free result");
                    } else {
                        assert!(
                            got == old || &got == want,
                            "{what}: {id} neither before nor after: {got:?}"
                        );
                    }
                }
                if ctx.targets.is_empty() {
                    // A create: whole (counted) or absent.
                    let n_new = after.len() - before.len();
                    let created = want_count - before.len();
                    if r.is_ok() {
                        assert_eq!(n_new, created, "{what}: Ok, but not every transfer exists");
                    } else {
                        assert!(
                            n_new == 0 || n_new == created,
                            "{what}: a partial batch: {n_new}"
                        );
                    }
                }
                for dir in ["staging", "trash"] {
                    let left = std::fs::read_dir(d.path().join("store").join(dir))
                        .map(|r| r.count())
                        .unwrap_or(0);
                    assert_eq!(left, 0, "{what}: {dir} debris left after reopen");
                }
                // And the reopened store works.
                let id = download(&reopened).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert!(matches!(
                    reopened.get(id).map(|t| t.state.phase),
                    Ok(Phase::Pending)
                ));
            }
        }
    }
    println!(
        "faults injected: {injected} in {runs} runs ({group_faults} in group commits), violations: 0"
    );
    assert!(
        group_faults > 0,
        "no fault was injected into a group commit"
    );
    assert!(injected > 300, "too few faults injected: {injected}");
}
