//! Open + reconcile plan at N records, warm and cold, next to the anchors, and resident memory
//! per record. A harness of its own (not criterion): the contenders run in alternation, each
//! once per round in an order rotated every round (3 rounds warm, then 3 cold); a time is the
//! median of a contender's runs, a ratio the median of its runs' ratios to the SQLite run of
//! the same round. Cold runs drop the page cache first (`/proc/sys/vm/drop_caches`, root only;
//! without it cold runs are skipped with a message).
//!
//! Contenders, each reading the same N records:
//! - waybill: `Store::open`, then `Store::reconcile` against N running tasks (every task tagged
//!   with its record's id, so the plan is N `adopt`s);
//! - SQLite (bundled, WAL): open, `SELECT id, manifest, state FROM transfers`, every row's
//!   bytes copied out;
//! - redb, one entry per record (id → manifest and state bytes): open, iterate, copy out;
//! - directory scan: list `transfers/`, read every `manifest` and `state` file.
//!
//! redb after a crash: a child process opens the database, commits 1,000 changed records and
//! aborts without closing it; reopening then runs redb's repair. Measured with redb's default
//! commits and with quick-repair commits, whose commit cost is measured too.
//!
//! waybill after a crash: a child process opens the store (holding its index), makes 1,000
//! durable progress updates and aborts without closing it; the next open + reconcile reads
//! the index and the 1,000 changes from the journal. A fresh kill before every run.
//!
//! Environment: `WAYBILL_SIZES` (default `1000,10000,100000`), `WAYBILL_RUNS` (3),
//! `WAYBILL_BENCH_DIR` (scratch directory; default the system temporary directory),
//! `WAYBILL_SVG` (write the plot of warm and cold times against N to this path),
//! `WAYBILL_RSS_ONLY` (build each store and measure only resident memory per record).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use redb::{ReadableDatabase, ReadableTable};
use waybill::{NewTransfer, Sessions, Store, Task};

const TABLE: redb::TableDefinition<&[u8; 16], &[u8]> = redb::TableDefinition::new("transfers");
const CHILD: &str = "WAYBILL_BENCH_REDB_CRASH_CHILD";
const CHANGED: usize = 1000;
const RSS_CHILD: &str = "WAYBILL_BENCH_RSS_CHILD";
const KILL_CHILD: &str = "WAYBILL_BENCH_KILL_CHILD";

/// The child: holds the store's index, changes `CHANGED` records durably, then dies without
/// closing the store.
fn kill_child(path: &Path) -> ! {
    let store = Store::open(path).unwrap();
    let all = store.list(&waybill::Filter::all()).unwrap();
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for t in all.iter().take(CHANGED) {
        store
            .progress(t.id(), stamp, None, waybill::Durability::Immediate)
            .unwrap();
    }
    std::process::abort();
}

/// Kills a waybill store's holder mid-life as the child above.
fn crash_waybill(store: &Path) {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(KILL_CHILD, store)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child must die, not exit");
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

/// Drops the page cache; false when not permitted.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Data {
    root: PathBuf,
    store: PathBuf,
    sqlite: PathBuf,
    redb: PathBuf,
    tasks: Vec<Task>,
}

/// Builds the N-record waybill store, then SQLite and redb holding the same records' bytes.
fn build(root: &Path, n: usize) -> Data {
    let store_dir = root.join("store");
    let t = Instant::now();
    let ids = {
        let store = Store::open(&store_dir).unwrap();
        let mut ids = Vec::with_capacity(n);
        for chunk in 0..n.div_ceil(1000) {
            let items = (0..1000.min(n - chunk * 1000))
                .map(|i| {
                    NewTransfer::download(format!(
                        "https://cdn.example.com/library/{chunk}/{i}.jpg"
                    ))
                    .session("bg")
                    .meta("album", "holiday")
                })
                .collect();
            ids.extend(store.create_batch(items).unwrap());
        }
        ids
    };
    let tasks = ids
        .iter()
        .enumerate()
        .map(|(k, id)| {
            let (chunk, i) = (k / 1000, k % 1000);
            Task::running(
                "bg",
                k as u64 + 1,
                format!("https://cdn.example.com/library/{chunk}/{i}.jpg"),
            )
            .tag(id.to_string())
        })
        .collect();
    let rows: Vec<([u8; 16], Vec<u8>, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            let d = store_dir.join("transfers").join(id.to_string());
            (
                *id.as_bytes(),
                std::fs::read(d.join("manifest")).unwrap(),
                std::fs::read(d.join("state")).unwrap(),
            )
        })
        .collect();
    let sqlite = root.join("anchor.sqlite");
    {
        let mut db = rusqlite::Connection::open(&sqlite).unwrap();
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        db.pragma_update(None, "synchronous", "FULL").unwrap();
        db.execute(
            "CREATE TABLE transfers (id BLOB PRIMARY KEY, manifest BLOB NOT NULL, state BLOB NOT NULL)",
            [],
        )
        .unwrap();
        let tx = db.transaction().unwrap();
        for (id, m, s) in &rows {
            tx.execute("INSERT INTO transfers VALUES (?1, ?2, ?3)", (id, m, s))
                .unwrap();
        }
        tx.commit().unwrap();
        db.pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .unwrap();
    }
    let redb_path = root.join("anchor.redb");
    {
        let db = redb::Database::create(&redb_path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (id, m, s) in &rows {
                let mut v = m.clone();
                v.extend_from_slice(s);
                t.insert(id, v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    println!(
        "  built {n} records (waybill, SQLite, redb) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Data {
        root: root.to_path_buf(),
        store: store_dir,
        sqlite,
        redb: redb_path,
        tasks,
    }
}

fn waybill(d: &Data) -> usize {
    let store = Store::builder().open(&d.store).unwrap();
    let plan = store
        .reconcile(&Sessions::All, &d.tasks, SystemTime::now())
        .unwrap();
    plan.actions.len()
}

fn sqlite(d: &Data) -> usize {
    let db = rusqlite::Connection::open(&d.sqlite).unwrap();
    let mut q = db
        .prepare("SELECT id, manifest, state FROM transfers")
        .unwrap();
    let mut rows = q.query([]).unwrap();
    let mut n = 0;
    while let Some(r) = rows.next().unwrap() {
        let id: Vec<u8> = r.get(0).unwrap();
        let m: Vec<u8> = r.get(1).unwrap();
        let s: Vec<u8> = r.get(2).unwrap();
        n += usize::from(!id.is_empty() && !m.is_empty() && !s.is_empty());
    }
    n
}

fn redb_read(path: &Path) -> usize {
    let db = redb::Database::open(path).unwrap();
    let tx = db.begin_read().unwrap();
    let t = tx.open_table(TABLE).unwrap();
    let mut n = 0;
    for e in t.iter().unwrap() {
        let (k, v) = e.unwrap();
        let v = v.value().to_vec();
        n += usize::from(k.value()[0] != 0 || !v.is_empty());
    }
    n
}

fn dir_scan(d: &Data) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(d.store.join("transfers")).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::read(p.join("manifest")).unwrap();
        let s = std::fs::read(p.join("state")).unwrap();
        n += usize::from(!m.is_empty() && !s.is_empty());
    }
    n
}

/// The child: commits `CHANGED` changed records (quick-repair commits if asked), then dies
/// without closing the database.
fn crash_child(path: &Path, quick: bool) -> ! {
    let db = redb::Database::open(path).unwrap();
    let keys: Vec<[u8; 16]> = {
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        t.iter()
            .unwrap()
            .take(CHANGED)
            .map(|e| *e.unwrap().0.value())
            .collect()
    };
    let t0 = Instant::now();
    for (i, k) in keys.iter().enumerate() {
        let mut tx = db.begin_write().unwrap();
        tx.set_quick_repair(quick);
        {
            let mut t = tx.open_table(TABLE).unwrap();
            let v = vec![i as u8; 200];
            t.insert(k, v.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    println!(
        "commit {:.1}",
        t0.elapsed().as_secs_f64() * 1e6 / keys.len() as f64
    );
    std::process::abort();
}

/// Kills a redb holder mid-life as the child above; returns its mean commit time (µs).
fn crash_redb(src: &Path, dst: &Path, quick: bool) -> f64 {
    std::fs::copy(src, dst).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD, dst)
        .env("WAYBILL_BENCH_QUICK", if quick { "1" } else { "0" })
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child must die, not exit");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("commit ")?.trim().parse().ok())
        .unwrap()
}

/// Whether the runs under way are cold: each timed run then drops the page cache first.
static COLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn drop_if_cold() {
    if COLD.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(drop_caches(), "the page cache could be dropped before");
    }
}

/// The SQLite contender's place among the contenders: the ratios' base.
const SQLITE: usize = 1;

/// One contender's runs, warm or cold: the times, and each run's ratio to the SQLite run of
/// the same round.
#[derive(Debug, Clone, Default)]
struct Runs {
    secs: Vec<f64>,
    ratio: Vec<f64>,
}

impl Runs {
    fn median(&self) -> Option<Duration> {
        (!self.secs.is_empty())
            .then(|| Duration::from_secs_f64(common::median(&mut self.secs.clone())))
    }

    /// The median time and the median ratio, as printed ("skipped" when there were no runs).
    fn summary(&self) -> (String, String) {
        match self.median() {
            Some(t) => (
                common::fmt_duration(t),
                format!("{:.2}x", common::median(&mut self.ratio.clone())),
            ),
            None => ("skipped".into(), "-".into()),
        }
    }
}

fn timed(f: impl FnOnce() -> usize, n: usize) -> Duration {
    let t = Instant::now();
    let got = f();
    let e = t.elapsed();
    assert!(got >= n, "read {got} of {n}");
    e
}

type Reader<'a> = (&'static str, &'a dyn Fn(&Data) -> usize);
type Figures = BTreeMap<(&'static str, &'static str), Vec<(usize, Duration)>>;

fn main() {
    if let Some(p) = std::env::var_os(RSS_CHILD) {
        // Opens the store, plans against no tasks, reports RSS growth with the plan held and
        // after dropping it.
        let before = rss_bytes();
        let store = Store::open(Path::new(&p)).unwrap();
        let plan = store
            .reconcile(&Sessions::All, &[], SystemTime::now())
            .unwrap();
        let held = rss_bytes();
        assert!(!plan.actions.is_empty());
        drop(plan);
        let after = rss_bytes();
        println!(
            "{} {}",
            held.saturating_sub(before),
            after.saturating_sub(before)
        );
        drop(store);
        return;
    }
    if let Some(p) = std::env::var_os(KILL_CHILD) {
        kill_child(Path::new(&p));
    }
    if let Some(p) = std::env::var_os(CHILD) {
        crash_child(
            Path::new(&p),
            std::env::var("WAYBILL_BENCH_QUICK").as_deref() == Ok("1"),
        );
    }
    let sizes = env_list("WAYBILL_SIZES", "1000,10000,100000");
    let runs = env_list("WAYBILL_RUNS", "3")[0];
    let mut figures: Figures = BTreeMap::new();
    let can_drop = drop_caches();
    if !can_drop {
        println!(
            "cold runs skipped: the page cache cannot be dropped here (needs root to write /proc/sys/vm/drop_caches)"
        );
    }
    for &n in &sizes {
        println!(
            "\nopen + reconcile plan at N = {n} ({runs} alternating rounds warm, {runs} cold)"
        );
        let scratch = common::scratch();
        let d = build(scratch.path(), n);
        let contenders: [Reader<'_>; 4] = [
            ("waybill open+reconcile", &waybill),
            ("SQLite open+select", &sqlite),
            ("redb 1 entry/record open+read", &|d: &Data| {
                redb_read(&d.redb)
            }),
            ("directory scan", &dir_scan),
        ];
        if std::env::var_os("WAYBILL_RSS_ONLY").is_some() {
            rss_per_record(&d, n);
            continue;
        }
        // After a kill: redb reopened after a crash (full repair, and quick-repair commits),
        // and waybill after its killed index holder changed CHANGED records.
        let crashed = d.root.join("crashed.redb");
        let mut commits: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut after_kill = |k: usize| -> Duration {
            match k {
                0 | 1 => {
                    commits[k].push(crash_redb(&d.redb, &crashed, k == 1));
                    drop_if_cold();
                    timed(|| redb_read(&crashed), n)
                }
                _ => {
                    crash_waybill(&d.store);
                    drop_if_cold();
                    timed(|| waybill(&d), n)
                }
            }
        };
        let killed = [
            "redb after kill, repair",
            "redb after kill, quick-repair",
            "waybill after kill, 1,000 changed",
        ];
        // One untimed run of each first so "warm" means warm.
        for (_, f) in &contenders {
            let _ = f(&d);
        }
        let names: Vec<&'static str> = contenders.iter().map(|c| c.0).chain(killed).collect();
        let mut runs_of = vec![[Runs::default(), Runs::default()]; names.len()];
        for cold in [false, true] {
            if cold && !can_drop {
                continue;
            }
            COLD.store(cold, std::sync::atomic::Ordering::Relaxed);
            for round in 0..runs {
                // Every contender once per round, in an order rotated every round; each
                // after-kill run follows the round's SQLite run.
                let mut t = vec![Duration::ZERO; names.len()];
                for k in 0..contenders.len() {
                    let c = (k + round) % contenders.len();
                    drop_if_cold();
                    t[c] = timed(|| contenders[c].1(&d), n);
                }
                for k in 0..killed.len() {
                    t[contenders.len() + k] = after_kill(k);
                }
                for (c, x) in t.iter().enumerate() {
                    let r = &mut runs_of[c][usize::from(cold)];
                    r.secs.push(x.as_secs_f64());
                    r.ratio.push(x.as_secs_f64() / t[SQLITE].as_secs_f64());
                }
            }
        }
        for (k, c) in commits.iter_mut().enumerate() {
            println!(
                "  ({}: median commit of the killed writer {:.0} µs)",
                killed[k],
                common::median(c)
            );
        }
        println!(
            "  {:<34} {:>10} {:>9} {:>10} {:>9}",
            "contender", "warm", "/SQLite", "cold", "/SQLite"
        );
        for (name, r) in names.iter().zip(&mut runs_of) {
            let [w, c] = r;
            let (wt, wr) = w.summary();
            let (ct, cr) = c.summary();
            println!("  {name:<34} {wt:>10} {wr:>9} {ct:>10} {cr:>9}");
            for (run, which) in [(w, "warm"), (c, "cold")] {
                if let Some(t) = run.median() {
                    figures.entry((name, which)).or_default().push((n, t));
                }
            }
        }
        rss_per_record(&d, n);
    }
    if let Ok(path) = std::env::var("WAYBILL_SVG") {
        std::fs::write(&path, svg(&figures)).unwrap();
        println!("\nplot written to {path}");
    }
}

/// Resident memory per record, measured in a fresh process (this one has touched memory for
/// the runs above, which the allocator reuses).
fn rss_per_record(d: &Data, n: usize) {
    {
        let out = Command::new(std::env::current_exe().unwrap())
            .env(RSS_CHILD, &d.store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<f64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        println!(
            "  resident memory per record: {:.0} B with the store open after a reconcile, {:.0} B while the plan (N recreate actions) is held (goal <= 300 B)",
            nums[1] / n as f64,
            nums[0] / n as f64
        );
    }
}

/// A log-log plot of time against N, one line per contender and cache state.
fn svg(figures: &Figures) -> String {
    let (w, h, l, r, t, b) = (760.0, 460.0, 70.0, 250.0, 30.0, 50.0);
    let all: Vec<(usize, Duration)> = figures.values().flatten().copied().collect();
    let xs = |n: usize| (n as f64).log10();
    let ys = |d: Duration| (d.as_secs_f64() * 1e3).max(1e-3).log10();
    let (x0, x1) = (
        all.iter().map(|p| xs(p.0)).fold(f64::MAX, f64::min),
        all.iter().map(|p| xs(p.0)).fold(f64::MIN, f64::max),
    );
    let y0 = all.iter().map(|p| ys(p.1)).fold(f64::MAX, f64::min).floor();
    let y1 = all.iter().map(|p| ys(p.1)).fold(f64::MIN, f64::max).ceil();
    let px = |x: f64| l + (x - x0) / (x1 - x0).max(1e-9) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0).max(1e-9) * (h - t - b);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{l}" y="18" font-size="14">Open + reconcile plan (or open + read all) against N records, log-log</text>
"#
    );
    let mut y = y0;
    while y <= y1 + 1e-9 {
        let label = match y as i32 {
            -3..=-1 => format!("{} µs", 10f64.powf(y + 3.0)),
            0..=2 => format!("{} ms", 10f64.powf(y)),
            _ => format!("{} s", 10f64.powf(y - 3.0)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{0}" y1="{1}" y2="{1}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{label}</text>"##,
            w - r,
            py(y),
            l - 6.0,
            py(y) + 4.0
        );
        y += 1.0;
    }
    let mut ns: Vec<usize> = all.iter().map(|p| p.0).collect();
    ns.sort_unstable();
    ns.dedup();
    for n in ns {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" x2="{0}" y1="{t}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{n}</text>"##,
            px(xs(n)),
            h - b,
            h - b + 18.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">records (N)</text>"#,
        (l + w - r) / 2.0,
        h - 8.0
    );
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let mut names: Vec<&str> = figures.keys().map(|k| k.0).collect();
    names.dedup();
    for (i, ((name, cache), pts)) in figures.iter().enumerate() {
        let c = colors[names.iter().position(|n| n == name).unwrap_or(0) % colors.len()];
        let dash = if *cache == "cold" {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let path: Vec<String> = pts
            .iter()
            .map(|(n, d)| format!("{:.1},{:.1}", px(xs(*n)), py(ys(*d))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
            path.join(" ")
        );
        for p in &path {
            let (x, y) = p.split_once(',').unwrap();
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let ly = t + 20.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{}" y="{}">{name}, {cache}</text>"#,
            w - r + 10.0,
            w - r + 40.0,
            w - r + 46.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}
