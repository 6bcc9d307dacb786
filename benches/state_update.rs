//! Cost of one durable state update, next to the raw floor of one `pwrite` of 256 bytes plus
//! one `fdatasync` on the same file system, measured in one run.
//!
//! Besides criterion's figures, the bench alternates the two (A B A B …, batches of 100) and
//! prints the median of the pairwise ratios, because absolute times on a shared VM drift.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use waybill::{Durability, NewTransfer, Store, TransferId};

struct Setup {
    _dir: tempfile::TempDir,
    store: Store,
    id: TransferId,
    raw: File,
    n: u64,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let id = store
        .create(NewTransfer::download("https://example.com/bench"))
        .unwrap();
    let raw = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .unwrap();
    raw.write_all_at(&[0u8; 4096], 0).unwrap();
    raw.sync_all().unwrap();
    Setup {
        _dir: dir,
        store,
        id,
        raw,
        n: 0,
    }
}

impl Setup {
    fn waybill_update(&mut self) {
        self.n += 1;
        self.store
            .progress(self.id, self.n, Some(1 << 30), Durability::Immediate)
            .unwrap();
    }

    fn raw_floor(&mut self) {
        self.n += 1;
        let mut buf = [0u8; 256];
        buf[..8].copy_from_slice(&self.n.to_le_bytes());
        self.raw.write_all_at(black_box(&buf), 0).unwrap();
        self.raw.sync_data().unwrap();
    }
}

fn timed(s: &mut Setup, f: fn(&mut Setup), n: usize) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        f(s);
    }
    t.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut s = setup();
    let mut g = c.benchmark_group("durable_update");
    g.bench_function("waybill_state_update", |b| b.iter(|| s.waybill_update()));
    g.bench_function("raw_pwrite_fdatasync_256B", |b| b.iter(|| s.raw_floor()));
    g.finish();

    let mut ratios: Vec<f64> = (0..20)
        .map(|_| {
            let a = timed(&mut s, Setup::waybill_update, 100);
            let b = timed(&mut s, Setup::raw_floor, 100);
            a.as_secs_f64() / b.as_secs_f64()
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "durable update / raw floor: median {:.2}x (min {:.2}x, max {:.2}x, 20 alternating pairs of 100)",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
