//! Creating transfers, next to the anchors, in one run.
//!
//! Goal 3, one transfer (manifest, state and a hard-linked 64 KiB payload): at most 1.25× the
//! cost of the syncs one create needs (five: three files and two directories), measured in the
//! same run as five raw `pwrite`+`fdatasync` of 256 bytes. Shown next to a SQLite single-row
//! insert (WAL, `synchronous=FULL`) and a naive record directory (mkdir, three files written
//! and `fsync`ed, the payload copied, both directories `fsync`ed).
//!
//! Goal 4, a batch of 10,000: at least 10× the throughput of creating them one by one, and at
//! most 2 s. Shown next to SQLite inserting the same rows in one transaction. One-by-one
//! creation is measured on 200 transfers per round and scaled: 10,000 would take ~20 s a round.
//! Also shown next to the layout's own floor: the same directory operations done bare (per
//! transfer a directory made, the state and manifest files created and written, the payload
//! hard-linked, the directory renamed into place; one `syncfs` and one directory `fsync` for the
//! whole batch), which is what the file system charges for the on-disk layout, before any
//! library work; once on one thread, and once split over as many threads as `create_batch`
//! uses by default (the kernel's work of creating files runs in parallel on separate
//! directories).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Contender;
use criterion::{Criterion, criterion_group, criterion_main};
use waybill::{LinkMode, NewTransfer, Store, UploadSource};

const PAYLOAD: usize = 64 * 1024;
const BATCH: usize = 10_000;
const ONE_BY_ONE: usize = 200;

fn new_transfer(src: &Path, i: usize) -> NewTransfer {
    NewTransfer::upload(
        format!("https://upload.example.com/photos/{i}"),
        UploadSource::File {
            path: src.to_path_buf(),
            link: LinkMode::HardLink,
        },
    )
    .session("bench")
    .header("Content-Type", "image/jpeg")
    .meta("album", "holiday")
}

/// A manifest-sized and a state-sized row, as SQLite stores them.
fn row() -> (Vec<u8>, Vec<u8>) {
    (vec![0x4d; 300], vec![0x53; 64])
}

fn sqlite(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", "FULL").unwrap();
    db.execute(
        "CREATE TABLE IF NOT EXISTS transfers (id BLOB PRIMARY KEY, manifest BLOB NOT NULL, state BLOB NOT NULL)",
        [],
    )
    .unwrap();
    db
}

fn floor_syncs(dir: &Path, n: usize) -> impl FnMut() {
    let f = common::floor_file(dir);
    let mut k = 0u64;
    move || {
        for _ in 0..n {
            k += 1;
            let mut buf = [0u8; 256];
            buf[..8].copy_from_slice(&k.to_le_bytes());
            f.write_all_at(&buf, 0).unwrap();
            f.sync_data().unwrap();
        }
    }
}

fn naive_dir(dir: &Path, payload: Vec<u8>) -> impl FnMut() {
    let root = dir.join("naive");
    std::fs::create_dir(&root).unwrap();
    let rootf = File::open(&root).unwrap();
    let (manifest, state) = row();
    let mut k = 0u64;
    move || {
        k += 1;
        let d: PathBuf = root.join(format!("{k:016x}"));
        std::fs::create_dir(&d).unwrap();
        for (name, bytes) in [
            ("manifest", &manifest),
            ("state", &state),
            ("payload", &payload),
        ] {
            let mut f = File::create(d.join(name)).unwrap();
            f.write_all(bytes).unwrap();
            f.sync_all().unwrap();
        }
        File::open(&d).unwrap().sync_all().unwrap();
        rootf.sync_all().unwrap();
    }
}

fn one(c: &mut Criterion) {
    let dir = common::scratch();
    let src = dir.path().join("photo.jpg");
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 7) as u8).collect();
    std::fs::write(&src, &payload).unwrap();
    File::open(&src).unwrap().sync_all().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let db = sqlite(&dir.path().join("one.sqlite"));
    let (manifest, state) = row();
    let mut n = 0usize;
    let mut m = 0u64;
    {
        let mut cs = [
            Contender::new("5 raw pwrite+fdatasync (floor)", floor_syncs(dir.path(), 5)),
            Contender::new("waybill create, linked 64 KiB", || {
                n += 1;
                store.create(new_transfer(&src, n)).unwrap();
            }),
            Contender::new("SQLite insert, 1 row per txn", || {
                m += 1;
                db.execute(
                    "INSERT INTO transfers VALUES (?1, ?2, ?3)",
                    (m.to_le_bytes(), &manifest, &state),
                )
                .unwrap();
            }),
            Contender::new("naive record directory", naive_dir(dir.path(), payload)),
        ];
        let rows = common::alternate(15, 20, &mut cs);
        common::print(
            "create one transfer (15 rounds of 20, ratio to five raw syncs)",
            &rows,
        );
    }
    let mut g = c.benchmark_group("create");
    g.sample_size(20);
    g.bench_function("waybill_create_linked_64KiB", |b| {
        b.iter(|| {
            n += 1;
            store.create(new_transfer(&src, n)).unwrap();
        });
    });
    g.finish();
}

/// The on-disk layout's floor for a batch of `n`: what `create_batch` asks of the file system,
/// done bare, on `threads` threads (each a contiguous share, as `create_batch` splits a batch).
fn layout_floor(dir: &Path, src: &Path, n: usize, round: usize, threads: usize) {
    let staging = dir.join(format!("floor-staging-{threads}-{round}"));
    let live = dir.join(format!("floor-transfers-{threads}-{round}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    // Linux syncs the whole file system once per share; elsewhere each file is synced as it is
    // written.
    let once = cfg!(target_os = "linux");
    let create = |p: PathBuf, bytes: &[u8]| {
        let mut f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .unwrap();
        f.write_all(bytes).unwrap();
        if !once {
            f.sync_data().unwrap();
        }
    };
    let share = |lo: usize, hi: usize| {
        for i in lo..hi {
            let d = staging.join(i.to_string());
            std::fs::create_dir(&d).unwrap();
            create(d.join("state"), &[0x53; 35]);
            std::fs::hard_link(src, d.join("payload")).unwrap();
            create(d.join("manifest"), &[0x4d; 207]);
        }
        let top = File::open(&staging).unwrap();
        if once {
            rustix::fs::syncfs(&top).unwrap();
        }
        for i in lo..hi {
            std::fs::rename(staging.join(i.to_string()), live.join(i.to_string())).unwrap();
        }
    };
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for t in 1..threads {
            let share = &share;
            s.spawn(move || share((t * per).min(n), ((t + 1) * per).min(n)));
        }
        share(0, per.min(n));
    });
    File::open(&live).unwrap().sync_all().unwrap();
}

/// A fresh upload source: a file has at most 65,000 hard links on ext4, and each contender
/// links 10,000 a round.
fn source(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(name);
    std::fs::write(&src, vec![1u8; PAYLOAD]).unwrap();
    File::open(&src).unwrap().sync_all().unwrap();
    src
}

fn batch(_: &mut Criterion) {
    let dir = common::scratch();
    let (src, one_src, floor_src) = (
        source(dir.path(), "batch.jpg"),
        source(dir.path(), "one.jpg"),
        source(dir.path(), "floor.jpg"),
    );
    let store = Store::open(dir.path().join("store")).unwrap();
    // What `create_batch` uses by default.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let mut db = sqlite(&dir.path().join("batch.sqlite"));
    let (manifest, state) = row();
    let mut next = 0usize;
    let (mut batch, mut single, mut lite, mut floor, mut floor_par) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..3 {
        let mut order: Vec<u8> = vec![0, 1, 2, 3, 4];
        order.rotate_left(round);
        for which in order {
            let t = Instant::now();
            match which {
                0 => {
                    let items = (0..BATCH).map(|i| new_transfer(&src, next + i)).collect();
                    next += BATCH;
                    assert_eq!(store.create_batch(items).unwrap().len(), BATCH);
                    batch.push(t.elapsed().as_secs_f64());
                }
                1 => {
                    for i in 0..ONE_BY_ONE {
                        store.create(new_transfer(&one_src, next + i)).unwrap();
                    }
                    next += ONE_BY_ONE;
                    single.push(t.elapsed().as_secs_f64() * (BATCH / ONE_BY_ONE) as f64);
                }
                3 => {
                    layout_floor(dir.path(), &floor_src, BATCH, round, 1);
                    floor.push(t.elapsed().as_secs_f64());
                }
                4 => {
                    layout_floor(dir.path(), &floor_src, BATCH, round, threads);
                    floor_par.push(t.elapsed().as_secs_f64());
                }
                _ => {
                    let tx = db.transaction().unwrap();
                    for i in 0..BATCH {
                        let key = ((round * BATCH + i) as u64).to_le_bytes();
                        tx.execute(
                            "INSERT INTO transfers VALUES (?1, ?2, ?3)",
                            (key, &manifest, &state),
                        )
                        .unwrap();
                    }
                    tx.commit().unwrap();
                    lite.push(t.elapsed().as_secs_f64());
                }
            }
        }
    }
    let speedups: Vec<f64> = single.iter().zip(&batch).map(|(s, b)| s / b).collect();
    let vs_sqlite: Vec<f64> = batch.iter().zip(&lite).map(|(b, l)| b / l).collect();
    let vs_floor: Vec<f64> = batch.iter().zip(&floor).map(|(b, f)| b / f).collect();
    let vs_floor_par: Vec<f64> = batch.iter().zip(&floor_par).map(|(b, f)| b / f).collect();
    let med = |v: &[f64]| common::median(&mut v.to_vec());
    let secs = |s: f64| common::fmt_duration(Duration::from_secs_f64(s));
    println!("\nbatch create of {BATCH} (3 alternating runs; medians)");
    println!(
        "  waybill create_batch            {:>10}   (goal <= 2 s)",
        secs(med(&batch))
    );
    println!(
        "  waybill one by one (scaled)     {:>10}   ({ONE_BY_ONE} per run, x{})",
        secs(med(&single)),
        BATCH / ONE_BY_ONE
    );
    println!("  SQLite, one transaction         {:>10}", secs(med(&lite)));
    println!(
        "  the layout's floor (bare fs)    {:>10}   (the same directory operations, one syncfs)",
        secs(med(&floor))
    );
    println!(
        "  the layout's floor, {threads} threads  {:>10}   (the same, split as create_batch splits it)",
        secs(med(&floor_par))
    );
    println!(
        "  batch throughput / one by one:  {:.1}x (runs: {:.1?}; goal >= 10x)",
        med(&speedups),
        speedups
    );
    println!(
        "  batch time / SQLite one txn:    {:.2}x (runs: {:.2?})",
        med(&vs_sqlite),
        vs_sqlite
    );
    println!(
        "  batch time / the layout's floor: {:.2}x (runs: {:.2?})",
        med(&vs_floor),
        vs_floor
    );
    println!(
        "  batch time / the floor, {threads} threads: {:.2}x (runs: {:.2?})",
        med(&vs_floor_par),
        vs_floor_par
    );
}

criterion_group!(benches, one, batch);
criterion_main!(benches);
