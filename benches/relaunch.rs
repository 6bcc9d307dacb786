//! A relaunch of N transfers, next to SQLite and the bare floor of a group commit, in one run.
//! A harness of its own (not criterion): in every round each contender runs once, in an order
//! rotated every round; a ratio is the median of the per-round ratios.
//!
//! Scenarios, each at N = 1,000 and 10,000:
//! - **relaunch**: N transfers bound to N platform tasks that still run and whose byte counters
//!   moved. waybill: `Store::open`, `reconcile`, `apply`, `flush()` (and the time until `apply`
//!   returns). SQLite (bundled, WAL, `synchronous=FULL`): open, select every row, update every
//!   row's counters in one transaction.
//! - **lost all**: the platform forgot every task (a reinstall, a reset). waybill: open,
//!   `reconcile` with no tasks (N `recreate`s), then bind a new task to each with one
//!   `Store::batch`. SQLite: open, select every row, update every row's binding in one
//!   transaction.
//! - **queue**: waybill: `create_batch` of N downloads, then bind each with one batch. SQLite:
//!   insert N rows in one transaction, then update each row's binding in another.
//!
//! The floor of the first two: open, lock (`flock`) and overwrite 512 bytes of each of N files,
//! then one `syncfs`. The queue's floor: the create's bare layout (per transfer a directory
//! made, a manifest and a state file created and written, the directory renamed into place;
//! one `syncfs`), then the rewrite floor above.
//!
//! Goals: every scenario ≤ 1.3× its floor; the time until `apply` returns in the relaunch ≤
//! SQLite's whole relaunch.
//!
//! Environment: `WAYBILL_SIZES` (default `1000,10000`), `WAYBILL_RUNS` (rounds, default 5),
//! `WAYBILL_SCENARIOS` (default `relaunch,lost,queue`), `WAYBILL_BENCH_DIR` (scratch
//! directory; default the system temporary directory).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use waybill::{NewTransfer, Sessions, Store, Task, TaskBinding, TransferId};

const SESSION: &str = "bg";

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

fn url(i: usize) -> String {
    format!("https://upload.example.com/photos/{i}")
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// The time `f` takes, as one column of a round.
fn timed(f: impl FnOnce()) -> Vec<f64> {
    let t = Instant::now();
    f();
    vec![secs(t.elapsed())]
}

/// The bare floor of a group commit over `files`: open, lock and overwrite 512 bytes of each,
/// then one `syncfs`.
fn rewrite_floor(top: &Path, files: &[PathBuf], round: u64) {
    let dir = File::open(top).unwrap();
    let mut buf = [0x5au8; 512];
    buf[..8].copy_from_slice(&round.to_le_bytes());
    for p in files {
        let f = File::options().read(true).write(true).open(p).unwrap();
        f.lock().unwrap();
        f.write_all_at(&buf, 0).unwrap();
        f.unlock().unwrap();
    }
    rustix::fs::syncfs(&dir).unwrap();
}

/// N files of 4 KiB (allocated and synced), each in a directory of its own, for the floor.
fn floor_files(top: &Path, n: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(top).unwrap();
    let files: Vec<PathBuf> = (0..n)
        .map(|i| {
            let d = top.join(format!("{i:05}"));
            std::fs::create_dir(&d).unwrap();
            let p = d.join("state");
            std::fs::write(&p, [0u8; 4096]).unwrap();
            p
        })
        .collect();
    rustix::fs::syncfs(File::open(top).unwrap()).unwrap();
    files
}

/// The create's bare layout for N transfers (one `syncfs`), then the rewrite floor over them.
fn queue_floor(top: &Path, n: usize, round: u64) {
    let base = top.join(format!("q{round}"));
    let (staging, transfers) = (base.join("staging"), base.join("transfers"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&transfers).unwrap();
    let dir = File::open(&base).unwrap();
    let mut states = Vec::with_capacity(n);
    for i in 0..n {
        let s = staging.join(format!("{i:05}"));
        std::fs::create_dir(&s).unwrap();
        File::create(s.join("manifest"))
            .unwrap()
            .write_all_at(&[0x4d; 300], 0)
            .unwrap();
        File::create(s.join("state"))
            .unwrap()
            .write_all_at(&[0x53; 96], 0)
            .unwrap();
        let t = transfers.join(format!("{i:05}"));
        std::fs::rename(&s, &t).unwrap();
        states.push(t.join("state"));
    }
    rustix::fs::syncfs(&dir).unwrap();
    rewrite_floor(&base, &states, round);
}

fn sqlite_open(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", "FULL").unwrap();
    db
}

/// A table of N transfers: id, manifest bytes, state bytes, task id, counters.
fn sqlite_build(path: &Path, n: usize) {
    let mut db = sqlite_open(path);
    db.execute(
        "CREATE TABLE t (id BLOB PRIMARY KEY, manifest BLOB NOT NULL, state BLOB NOT NULL, \
         task INTEGER, done INTEGER NOT NULL)",
        [],
    )
    .unwrap();
    let tx = db.transaction().unwrap();
    for i in 0..n {
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4, 0)",
            rusqlite::params![
                (i as u128).to_le_bytes().as_slice(),
                vec![0x4du8; 300],
                vec![0x53u8; 96],
                i as i64
            ],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// SQLite's relaunch: open, select every row, update each row's `column` in one transaction.
fn sqlite_relaunch(path: &Path, column: &str, round: u64) {
    let mut db = sqlite_open(path);
    let rows: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = {
        let mut st = db.prepare("SELECT id, manifest, state FROM t").unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let tx = db.transaction().unwrap();
    {
        let mut st = tx
            .prepare(&format!("UPDATE t SET {column} = ?1 WHERE id = ?2"))
            .unwrap();
        for (k, (id, _, _)) in rows.iter().enumerate() {
            st.execute(rusqlite::params![(round * 100_000 + k as u64) as i64, id])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// SQLite's queue: insert N rows in one transaction, then bind each in another.
fn sqlite_queue(path: &Path, n: usize, round: u64) {
    let p = path.with_extension(format!("q{round}"));
    let mut db = sqlite_open(&p);
    db.execute(
        "CREATE TABLE t (id BLOB PRIMARY KEY, manifest BLOB NOT NULL, state BLOB NOT NULL, \
         task INTEGER, done INTEGER NOT NULL)",
        [],
    )
    .unwrap();
    let ids: Vec<[u8; 16]> = (0..n).map(|_| *TransferId::new_v4().as_bytes()).collect();
    let tx = db.transaction().unwrap();
    for id in &ids {
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, NULL, 0)",
            rusqlite::params![id.as_slice(), vec![0x4du8; 300], vec![0x53u8; 96]],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    let tx = db.transaction().unwrap();
    {
        let mut st = tx.prepare("UPDATE t SET task = ?1 WHERE id = ?2").unwrap();
        for (k, id) in ids.iter().enumerate() {
            st.execute(rusqlite::params![k as i64, id.as_slice()])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// N downloads bound to tasks 0..N.
fn waybill_build(path: &Path, n: usize) {
    let store = Store::open(path).unwrap();
    let ids = store
        .create_batch(
            (0..n)
                .map(|i| NewTransfer::download(url(i)).session(SESSION))
                .collect(),
        )
        .unwrap();
    bind_all(&store, &ids, 0);
}

fn bind_all(store: &Store, ids: &[TransferId], first_task: u64) {
    let mut b = store.batch();
    for (k, id) in ids.iter().enumerate() {
        b.bind(
            *id,
            TaskBinding {
                session: SESSION.into(),
                task_id: first_task + k as u64,
                tag: None,
            },
        );
    }
    for r in b.commit() {
        r.unwrap();
    }
}

/// The tasks of a relaunch: every one still running, its counters moved this round.
fn running_tasks(n: usize, round: u64) -> Vec<Task> {
    (0..n)
        .map(|i| {
            let mut t = Task::running(SESSION, i as u64, url(i));
            t.bytes_done = round * 1000 + i as u64;
            t.bytes_total = Some(1 << 30);
            t
        })
        .collect()
}

/// waybill's relaunch; returns (time until `apply` returned, whole time).
fn waybill_relaunch(path: &Path, tasks: &[Task]) -> (Duration, Duration) {
    let t = Instant::now();
    let store = Store::open(path).unwrap();
    let plan = store
        .reconcile(
            &Sessions::only([SESSION]),
            tasks,
            std::time::SystemTime::now(),
        )
        .unwrap();
    store.apply(&plan).unwrap();
    let applied = t.elapsed();
    store.flush().unwrap();
    drop(store);
    (applied, t.elapsed())
}

/// waybill after the platform forgot every task: reconcile with none, bind a new task to each.
fn waybill_lost_all(path: &Path, round: u64) {
    let store = Store::open(path).unwrap();
    let plan = store
        .reconcile(
            &Sessions::only([SESSION]),
            &[],
            std::time::SystemTime::now(),
        )
        .unwrap();
    store.apply(&plan).unwrap();
    let ids: Vec<TransferId> = plan.actions.iter().filter_map(|a| a.transfer()).collect();
    bind_all(&store, &ids, round * 100_000);
}

fn waybill_queue(path: &Path, n: usize, round: u64) {
    let store = Store::open(path.with_extension(format!("q{round}"))).unwrap();
    let ids = store
        .create_batch(
            (0..n)
                .map(|i| NewTransfer::download(url(i)).session(SESSION))
                .collect(),
        )
        .unwrap();
    bind_all(&store, &ids, 0);
}

/// Per-round times of one scenario's contenders: name → seconds per round.
struct Rounds {
    names: Vec<&'static str>,
    times: Vec<Vec<f64>>,
}

impl Rounds {
    fn new(names: &[&'static str]) -> Rounds {
        Rounds {
            names: names.to_vec(),
            times: vec![Vec::new(); names.len()],
        }
    }

    fn col(&self, name: &str) -> &[f64] {
        let i = self.names.iter().position(|n| *n == name).unwrap();
        &self.times[i]
    }

    /// Median time and the median of per-round ratios of `a` to `b`.
    fn ratio(&self, a: &str, b: &str) -> f64 {
        let mut r: Vec<f64> = self
            .col(a)
            .iter()
            .zip(self.col(b))
            .map(|(x, y)| x / y)
            .collect();
        common::median(&mut r)
    }

    fn median(&self, name: &str) -> Duration {
        Duration::from_secs_f64(common::median(&mut self.col(name).to_vec()))
    }
}

/// Runs `ops` once per round in rotated order, `runs` rounds.
fn alternate(runs: usize, rounds: &mut Rounds, ops: &mut [&mut dyn FnMut(u64) -> Vec<f64>]) {
    let k = ops.len();
    for r in 0..runs {
        for j in 0..k {
            let i = (r + j) % k;
            let got = ops[i](r as u64 + 1);
            // waybill's relaunch reports two columns: its whole time, then until apply.
            for (c, t) in got.into_iter().enumerate() {
                let col = column_of(i, c);
                rounds.times[col].push(t);
            }
        }
    }
}

/// Columns: op 0 (waybill) reports two (its whole time, then the time until apply returned,
/// when it has one); the others one each.
fn column_of(op: usize, c: usize) -> usize {
    match (op, c) {
        (0, 0) => 0,
        (0, _) => 3,
        (op, _) => op,
    }
}

fn report(title: &str, r: &Rounds, with_apply: bool) {
    println!("\n{title}");
    println!(
        "  {:<28} {:>10}   {:>9} {:>9}",
        "contender", "median", "/ floor", "/ SQLite"
    );
    for name in ["waybill", "SQLite", "floor"] {
        println!(
            "  {:<28} {:>10}   {:>8.2}x {:>8.2}x",
            name,
            common::fmt_duration(r.median(name)),
            r.ratio(name, "floor"),
            r.ratio(name, "SQLite"),
        );
    }
    if with_apply {
        println!(
            "  {:<28} {:>10}   {:>8.2}x {:>8.2}x   (goal: ≤ 1.00x SQLite's whole relaunch)",
            "waybill until apply returns",
            common::fmt_duration(r.median("until apply")),
            r.ratio("until apply", "floor"),
            r.ratio("until apply", "SQLite"),
        );
    }
    println!(
        "  goal: waybill ≤ 1.30x its floor: {}",
        if r.ratio("waybill", "floor") <= 1.3 {
            "met"
        } else {
            "NOT met"
        }
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not take.
    let sizes = env_list("WAYBILL_SIZES", "1000,10000");
    let runs = env_list("WAYBILL_RUNS", "5")[0];
    let scenarios =
        std::env::var("WAYBILL_SCENARIOS").unwrap_or_else(|_| "relaunch,lost,queue".into());
    let on = |name: &str| scenarios.split(',').any(|s| s.trim() == name);
    let scratch = common::scratch();
    println!(
        "relaunch bench: {runs} rounds, scratch {}",
        scratch.path().display()
    );
    for n in sizes {
        let root = scratch.path().join(format!("n{n}"));
        std::fs::create_dir_all(&root).unwrap();
        let store = root.join("store");
        let db = root.join("sqlite.db");
        waybill_build(&store, n);
        sqlite_build(&db, n);
        let files = floor_files(&root.join("floor"), n);
        let names = ["waybill", "SQLite", "floor", "until apply"];

        // The relaunch.
        if on("relaunch") {
            let mut r = Rounds::new(&names);
            let mut w = |round: u64| {
                let (applied, whole) = waybill_relaunch(&store, &running_tasks(n, round));
                vec![secs(whole), secs(applied)]
            };
            let mut s = |round: u64| timed(|| sqlite_relaunch(&db, "done", round));
            let mut f = |round: u64| timed(|| rewrite_floor(&root.join("floor"), &files, round));
            alternate(runs, &mut r, &mut [&mut w, &mut s, &mut f]);
            report(
                &format!("relaunch, N = {n}: open + reconcile + apply + flush (counters moved)"),
                &r,
                true,
            );
        }

        // Every task lost.
        if on("lost") {
            let mut r = Rounds::new(&names);
            let mut w = |round: u64| timed(|| waybill_lost_all(&store, round));
            let mut s = |round: u64| timed(|| sqlite_relaunch(&db, "task", round));
            let mut f = |round: u64| timed(|| rewrite_floor(&root.join("floor"), &files, round));
            alternate(runs, &mut r, &mut [&mut w, &mut s, &mut f]);
            report(
                &format!("lost all, N = {n}: reconcile with no tasks, then a batch binds each"),
                &r,
                false,
            );
        }

        // A queue: create N, bind each.
        if on("queue") {
            let mut r = Rounds::new(&names);
            let mut w = |round: u64| timed(|| waybill_queue(&store, n, round));
            let mut s = |round: u64| timed(|| sqlite_queue(&db, n, round));
            let mut f = |round: u64| timed(|| queue_floor(&root.join("queue-floor"), n, round));
            alternate(runs, &mut r, &mut [&mut w, &mut s, &mut f]);
            report(
                &format!("queue, N = {n}: create_batch, then a batch binds each"),
                &r,
                false,
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
