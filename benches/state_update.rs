//! Cost of one durable state update (one transfer rewritten), next to its anchors, in one run:
//!
//! - the raw floor: one `pwrite` of 256 bytes plus one `fdatasync` on an open file;
//! - SQLite (bundled, WAL, `synchronous=FULL`), one row updated per transaction;
//! - redb with its default durability, one insert per write transaction;
//! - write a temporary file, `fdatasync` it, rename it over the old one and sync the directory.
//!
//! The contenders run in alternation (batches of 50, order rotated every round) and the bench
//! prints each one's median pairwise ratio to the floor. Goal: waybill ≤ 1.10× the floor.
//! Criterion's own estimates follow for waybill and the floor.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

mod common;

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::Contender;
use criterion::{Criterion, criterion_group, criterion_main};
use waybill::{Durability, NewTransfer, Store, TransferId};

const ROUNDS: usize = 30;
const BATCH: usize = 50;

fn state_bytes(n: u64) -> [u8; 256] {
    let mut buf = [0x5au8; 256];
    buf[..8].copy_from_slice(&n.to_le_bytes());
    buf
}

struct Floor {
    file: File,
    n: u64,
}

impl Floor {
    fn new(dir: &Path) -> Floor {
        Floor {
            file: common::floor_file(dir),
            n: 0,
        }
    }

    fn op(&mut self) {
        self.n += 1;
        self.file
            .write_all_at(black_box(&state_bytes(self.n)), 0)
            .unwrap();
        self.file.sync_data().unwrap();
    }
}

struct Waybill {
    store: Store,
    id: TransferId,
    n: u64,
}

impl Waybill {
    fn new(dir: &Path) -> Waybill {
        let store = Store::open(dir.join("store")).unwrap();
        let id = store
            .create(NewTransfer::download("https://example.com/bench"))
            .unwrap();
        Waybill { store, id, n: 0 }
    }

    fn op(&mut self) {
        self.n += 1;
        self.store
            .progress(self.id, self.n, Some(1 << 30), Durability::Immediate)
            .unwrap();
    }
}

fn sqlite(dir: &Path) -> impl FnMut() {
    let db = rusqlite::Connection::open(dir.join("sqlite.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", "FULL").unwrap();
    db.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, state BLOB NOT NULL)",
        [],
    )
    .unwrap();
    db.execute("INSERT INTO t VALUES (1, ?1)", [state_bytes(0).as_slice()])
        .unwrap();
    let mut n = 0u64;
    move || {
        n += 1;
        db.execute(
            "UPDATE t SET state = ?1 WHERE id = 1",
            [state_bytes(n).as_slice()],
        )
        .unwrap();
    }
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");

fn redb_update(dir: &Path) -> impl FnMut() {
    let db = redb::Database::create(dir.join("redb.db")).unwrap();
    let mut n = 0u64;
    move || {
        n += 1;
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(REDB_TABLE).unwrap();
            t.insert(1, state_bytes(n).as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
}

fn temp_rename(dir: &Path) -> impl FnMut() {
    let d: PathBuf = dir.join("renamed");
    std::fs::create_dir(&d).unwrap();
    let dirf = File::open(&d).unwrap();
    let (tmp, dst) = (d.join("state.tmp"), d.join("state"));
    let mut n = 0u64;
    move || {
        n += 1;
        let f = File::create(&tmp).unwrap();
        f.write_all_at(&state_bytes(n), 0).unwrap();
        f.sync_data().unwrap();
        std::fs::rename(&tmp, &dst).unwrap();
        dirf.sync_all().unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let dir = common::scratch();
    let mut floor = Floor::new(dir.path());
    let mut wb = Waybill::new(dir.path());
    {
        let mut cs = [
            Contender::new("raw pwrite+fdatasync 256 B", || floor.op()),
            Contender::new("waybill state update", || wb.op()),
            Contender::new("SQLite WAL synchronous=FULL", sqlite(dir.path())),
            Contender::new("redb, 1 insert per txn", redb_update(dir.path())),
            Contender::new("temp file + rename + dir sync", temp_rename(dir.path())),
        ];
        let rows = common::alternate(ROUNDS, BATCH, &mut cs);
        common::print(
            &format!("durable state update ({ROUNDS} rounds of {BATCH}, ratio to the floor)"),
            &rows,
        );
    }
    let mut g = c.benchmark_group("durable_update");
    g.bench_function("waybill_state_update", |b| b.iter(|| wb.op()));
    g.bench_function("raw_pwrite_fdatasync_256B", |b| b.iter(|| floor.op()));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
