//! Real processes, real kills. Worker processes (this test binary run again with
//! `WAYBILL_HELPER` set) do random operations on one on-disk store and log each operation to
//! their own file after it is acknowledged. The test SIGKILLs them at random moments, restarts
//! them, and after every round checks the store against the union of the logs: no acknowledged
//! operation may be lost.
//!
//! Then completion races: several processes call `complete` on the same transfers at once; each
//! transfer must have exactly one winner, and the recorded outcome must be the winner's.
//!
//! `WAYBILL_SCALE=N` multiplies the work (N = 20 gives 6,000 kills and 40,000 races). The seed
//! is printed; `WAYBILL_SEED` replays one.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use waybill::{
    Completion, Durability, NewTransfer, Outcome, Phase, Store, TaskBinding, TransferId,
};

const ROLE: &str = "WAYBILL_HELPER";

fn scale() -> u64 {
    std::env::var("WAYBILL_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The byte at `offset` of every download's received data, so content can be checked.
fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

fn open(root: &Path) -> Store {
    Store::builder()
        .lock_timeout(Duration::from_secs(30))
        .open(root)
        .unwrap()
}

/// Entry point of the helper processes; a no-op in the normal test run.
#[test]
fn helper() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let root = PathBuf::from(std::env::var("WAYBILL_ROOT").unwrap());
    let log_path = PathBuf::from(std::env::var("WAYBILL_LOG").unwrap());
    let seed: u64 = std::env::var("WAYBILL_SEED").unwrap().parse().unwrap();
    match role.as_str() {
        "worker" => worker(&root, &log_path, seed),
        "racer" => racer(&root, &log_path),
        r => panic!("unknown role {r}"),
    }
}

/// Random operations on its own transfers, each logged after it is acknowledged, until killed.
fn worker(root: &Path, log_path: &Path, seed: u64) {
    let store = open(root);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    let mut ack = |line: String| {
        // One write per line: a kill may cut the log short, never lose a whole earlier line.
        log.write_all(format!("{line}\n").as_bytes()).unwrap();
    };
    let mut rng = Rng(seed | 1);
    let slot = std::env::var("WAYBILL_SLOT").unwrap();
    // (id, bytes reported, partial length) of this worker's transfers: what earlier
    // incarnations left, as the store has it now, is taken up again (so work continues on
    // records written by a killed process, and the store stays small); ended ones are cleared.
    let mut mine: Vec<(TransferId, u64, u64)> = Vec::new();
    for t in store
        .list(&waybill::Filter::all().group(slot.clone()))
        .unwrap()
    {
        let id = t.id();
        match t.state.phase {
            Phase::Completed => {
                ack(format!("try {id}"));
                store.acknowledge(id).unwrap();
                ack(format!("gone {id}"));
            }
            Phase::Cancelled | Phase::Failed => {
                ack(format!("try {id}"));
                store.remove(id).unwrap();
                ack(format!("gone {id}"));
            }
            _ => {
                // What an operation in doubt did is settled now: the log takes it as seen.
                let s = &t.state;
                let task = s
                    .binding
                    .as_ref()
                    .map_or("-".into(), |b| b.task_id.to_string());
                ack(format!(
                    "seen {id} {} {} {task}",
                    s.bytes_done, s.partial_len
                ));
                mine.push((id, s.bytes_done, s.partial_len));
            }
        }
    }
    loop {
        let pick = rng.below(100);
        if mine.is_empty() || pick < 15 {
            let batch = 1 + rng.below(3) as usize;
            let items = (0..batch)
                .map(|i| {
                    NewTransfer::download(format!("https://cdn.example/{seed}/{i}"))
                        .session("bg")
                        .group(slot.clone())
                })
                .collect();
            for id in store.create_batch(items).unwrap() {
                ack(format!("create {id}"));
                mine.push((id, 0, 0));
            }
            continue;
        }
        let k = rng.below(mine.len() as u64) as usize;
        let (id, done, partial) = mine[k];
        // The intent goes first: a kill between the acknowledgement and its log line leaves
        // the operation "in doubt", and either outcome is then correct.
        ack(format!("try {id}"));
        match pick {
            15..=34 => {
                let n = done + 1 + rng.below(1000);
                store
                    .progress(id, n, Some(1 << 20), Durability::Immediate)
                    .unwrap();
                ack(format!("progress {id} {n}"));
                mine[k].1 = n;
            }
            35..=54 => {
                let len = 1 + rng.below(3000);
                let chunk: Vec<u8> = (partial..partial + len).map(pattern).collect();
                let now = store.append_received(id, &chunk).unwrap();
                assert_eq!(now, partial + len);
                ack(format!("append {id} {now}"));
                mine[k].2 = now;
            }
            55..=64 => {
                let task = rng.below(1_000_000);
                store
                    .bind(
                        id,
                        TaskBinding {
                            session: "bg".into(),
                            task_id: task,
                            tag: None,
                        },
                    )
                    .unwrap();
                ack(format!("bind {id} {task}"));
            }
            65..=74 => {
                store.store_resume_data(id, &[7u8; 512]).unwrap();
                ack(format!("resume {id}"));
            }
            75..=84 => {
                assert!(matches!(
                    store.complete(id, Some(200)).unwrap(),
                    Completion::Won(_)
                ));
                ack(format!("complete {id}"));
                if rng.below(2) == 0 {
                    ack(format!("try {id}"));
                    store.acknowledge(id).unwrap();
                    ack(format!("gone {id}"));
                }
                mine.swap_remove(k);
            }
            85..=92 => {
                store.cancel(id).unwrap();
                ack(format!("cancel {id}"));
                mine.swap_remove(k);
            }
            _ => {
                store.remove(id).unwrap();
                ack(format!("gone {id}"));
                mine.swap_remove(k);
            }
        }
    }
}

/// What the logs say must hold for one transfer.
#[derive(Debug, Default)]
struct Expect {
    /// An operation was begun but its acknowledgement was not logged (the kill fell between).
    in_doubt: bool,
    created: bool,
    gone: bool,
    phase: Option<Phase>,
    /// Bytes done as the last logged `progress` or `append` set them.
    progress: u64,
    partial: u64,
    task: Option<u64>,
    resume: bool,
}

fn expectations(logs: &[PathBuf]) -> BTreeMap<TransferId, Expect> {
    let mut m: BTreeMap<TransferId, Expect> = BTreeMap::new();
    for p in logs {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        for line in text.lines() {
            let mut w = line.split(' ');
            let (Some(op), Some(id)) = (w.next(), w.next()) else {
                continue;
            };
            let Ok(id) = id.parse::<TransferId>() else {
                continue; // a line cut short by the kill
            };
            let rest: Vec<&str> = w.collect();
            let n: Option<u64> = rest.first().and_then(|s| s.parse().ok());
            let e = m.entry(id).or_default();
            e.in_doubt = op == "try";
            if op == "seen" {
                let num = |i: usize| rest.get(i).and_then(|s| s.parse::<u64>().ok());
                e.created = true;
                e.progress = num(0).unwrap_or(0);
                e.partial = num(1).unwrap_or(0);
                e.task = num(2);
                continue;
            }
            match (op, n) {
                ("create", _) => e.created = true,
                ("progress", Some(n)) => e.progress = n,
                ("append", Some(n)) => {
                    // Received bytes are the download's progress.
                    e.partial = n;
                    e.progress = n;
                }
                ("bind", Some(n)) => e.task = Some(n),
                ("resume", _) => e.resume = true,
                ("complete", _) => e.phase = Some(Phase::Completed),
                ("cancel", _) => e.phase = Some(Phase::Cancelled),
                ("gone", _) => e.gone = true,
                _ => {}
            }
        }
    }
    m
}

/// Checks the store against the logs; returns the number of acknowledged operations lost.
fn verify(root: &Path, logs: &[PathBuf]) -> usize {
    // Every worker is dead: any unfinished create is debris, whatever its age.
    let store = Store::builder()
        .staging_grace(Duration::ZERO)
        .open(root)
        .unwrap();
    let scan = store.scan().unwrap();
    assert!(
        scan.corrupt.is_empty(),
        "corrupt records: {:?}",
        scan.corrupt
    );
    let have: BTreeMap<TransferId, _> = scan.transfers.into_iter().map(|t| (t.id(), t)).collect();
    let mut lost = 0;
    for (id, e) in expectations(logs) {
        let t = have.get(&id);
        let mut fail = |why: String| {
            eprintln!("LOST {id}: {why}");
            lost += 1;
        };
        if e.gone {
            if t.is_some() {
                fail("removed, but still there".into());
            }
            continue;
        }
        let Some(t) = t else {
            if e.created && !e.in_doubt {
                fail("created, but missing".into());
            }
            continue;
        };
        let s = &t.state;
        if s.rebuilt {
            fail("state rebuilt".into());
        }
        if let Some(p) = e.phase
            && s.phase != p
        {
            fail(format!("phase {} instead of {p}", s.phase));
        }
        if e.phase.is_none() && !e.in_doubt && s.phase.is_terminal() {
            fail(format!("phase {} with no such operation logged", s.phase));
        }
        // Exactly as last logged, unless an operation is in doubt (then never less received).
        if !e.in_doubt && s.bytes_done != e.progress {
            fail(format!(
                "progress {} instead of {}",
                s.bytes_done, e.progress
            ));
        }
        if s.partial_len < e.partial || (!e.in_doubt && s.partial_len != e.partial) {
            fail(format!(
                "partial {} instead of {}",
                s.partial_len, e.partial
            ));
        }
        if let Some(task) = e.task
            && !e.in_doubt
            && e.phase.is_none()
            && s.binding.as_ref().map(|b| b.task_id) != Some(task)
        {
            fail(format!("binding to task {task} lost"));
        }
        if e.resume && store.resume_data(id).ok().flatten().is_none() {
            fail("resume data lost".into());
        }
        if s.partial_len > 0 {
            let path = root.join("transfers").join(id.to_string()).join("partial");
            let bytes = std::fs::read(&path).unwrap_or_default();
            let ok = bytes.len() as u64 >= s.partial_len
                && bytes
                    .iter()
                    .take(s.partial_len as usize)
                    .enumerate()
                    .all(|(i, b)| *b == pattern(i as u64));
            if !ok {
                fail("received bytes differ".into());
            }
        }
    }
    for dir in ["staging", "trash"] {
        let n = std::fs::read_dir(root.join(dir))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(n, 0, "{dir} debris left after open");
    }
    lost
}

fn spawn(role: &str, root: &Path, log: &Path, seed: u64, slot: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .env("WAYBILL_SLOT", format!("w{slot}"))
        .args(["--exact", "helper", "--test-threads=1", "--nocapture"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env(ROLE, role)
        .env("WAYBILL_ROOT", root)
        .env("WAYBILL_LOG", log)
        .env("WAYBILL_SEED", seed.to_string())
        .spawn()
        .unwrap()
}

fn base_seed() -> u64 {
    std::env::var("WAYBILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

#[test]
fn sigkilled_workers_never_lose_an_acknowledged_operation() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let seed = base_seed();
    println!("seed {seed} (WAYBILL_SEED={seed} replays it)");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    drop(open(&root));
    const WORKERS: usize = 3;
    let logs: Vec<PathBuf> = (0..WORKERS)
        .map(|w| dir.path().join(format!("log{w}")))
        .collect();
    let target = 300 * scale();
    let mut rng = Rng(seed | 1);
    let mut kills = 0u64;
    let mut lost = 0usize;
    let mut round = 0u64;
    let started = Instant::now();
    while kills < target {
        round += 1;
        let mut children: Vec<Child> = logs
            .iter()
            .enumerate()
            .map(|(w, log)| spawn("worker", &root, log, seed ^ (round << 8) ^ w as u64, w))
            .collect();
        // Kill each at its own random moment, while it works.
        let mut order: Vec<(u64, usize)> = (0..WORKERS).map(|w| (5 + rng.below(60), w)).collect();
        order.sort();
        let t0 = Instant::now();
        for (ms, w) in order {
            let due = t0 + Duration::from_millis(ms);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let c = &mut children[w];
            if c.try_wait().unwrap().is_some() {
                panic!("worker {w} exited by itself in round {round} (seed {seed})");
            }
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
            kills += 1;
        }
        lost += verify(&root, &logs);
        assert_eq!(lost, 0, "round {round}, seed {seed}");
    }
    let ops: usize = logs
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .count()
        })
        .sum();
    println!(
        "kill cycles: {kills}, lost acknowledged operations: {lost} ({ops} operations logged, {round} rounds, {:.1?})",
        started.elapsed()
    );
}

/// Calls `complete` on every listed transfer, in a seeded order, and logs what it won.
fn racer(root: &Path, log_path: &Path) {
    let status: u16 = std::env::var("WAYBILL_STATUS").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("WAYBILL_SEED").unwrap().parse().unwrap();
    let ids: Vec<TransferId> = std::fs::read_to_string(root.join("..").join("race-ids"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let store = open(root);
    let go = root.join("..").join("go");
    while !go.exists() {
        std::thread::sleep(Duration::from_micros(200));
    }
    // Mostly the same order as the others, so the races are close; sometimes shuffled.
    let mut order = ids;
    let mut rng = Rng(seed | 1);
    for i in (1..order.len()).rev() {
        if rng.below(4) == 0 {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let mut out = String::new();
    for id in order {
        match store.complete(id, Some(status)).unwrap() {
            Completion::Won(_) => out.push_str(&format!("{id}\n")),
            Completion::Lost(Outcome::Succeeded { .. }) => {}
            Completion::Lost(o) => panic!("unexpected outcome {o}"),
        }
    }
    std::fs::write(log_path, out).unwrap();
}

#[test]
fn completion_races_between_processes_have_exactly_one_winner() {
    if std::env::var(ROLE).is_ok() {
        return;
    }
    let seed = base_seed();
    println!("seed {seed}");
    let target = 2000 * scale();
    let mut races = 0u64;
    let mut double = 0u64;
    let mut batch = 0u64;
    while races < target {
        batch += 1;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = open(&root);
        let n = 500;
        let ids = store
            .create_batch(
                (0..n)
                    .map(|i| NewTransfer::download(format!("https://x/{i}")))
                    .collect(),
            )
            .unwrap();
        let list: String = ids.iter().map(|id| format!("{id}\n")).collect();
        std::fs::write(dir.path().join("race-ids"), list).unwrap();
        let racers = 2 + (batch % 3) as usize; // 2 to 4 processes
        let mut children = Vec::new();
        for r in 0..racers {
            let log = dir.path().join(format!("won{r}"));
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args(["--exact", "helper", "--test-threads=1", "--nocapture"])
                .stdout(Stdio::null())
                .env(ROLE, "racer")
                .env("WAYBILL_ROOT", &root)
                .env("WAYBILL_LOG", &log)
                .env("WAYBILL_SEED", (seed ^ (batch << 4) ^ r as u64).to_string())
                .env("WAYBILL_STATUS", (200 + r).to_string());
            children.push((c.spawn().unwrap(), log, 200 + r as u16));
        }
        std::thread::sleep(Duration::from_millis(50));
        std::fs::write(dir.path().join("go"), b"").unwrap();
        let mut wins: BTreeMap<TransferId, Vec<u16>> = BTreeMap::new();
        for (mut c, log, status) in children {
            assert!(c.wait().unwrap().success(), "a racer failed (seed {seed})");
            for line in std::fs::read_to_string(&log).unwrap().lines() {
                wins.entry(line.parse().unwrap()).or_default().push(status);
            }
        }
        let all: BTreeSet<TransferId> = ids.iter().copied().collect();
        for id in &all {
            let w = wins.get(id).cloned().unwrap_or_default();
            races += 1;
            if w.len() != 1 {
                double += 1;
                eprintln!("{id}: winners {w:?}");
                continue;
            }
            // The recorded outcome is the winner's.
            let t = store.get(*id).unwrap();
            assert_eq!(
                t.state.outcome,
                Some(Outcome::Succeeded { status: Some(w[0]) }),
                "{id}: the recorded outcome is not the winner's"
            );
        }
    }
    println!("completion races: {races}, double wins: {double}");
    assert_eq!(double, 0);
}
