//! Coalesced progress: reports accepted per second, and syncs per transfer per second, with
//! the default flush interval (1 s). Goal: ≥ 1,000,000 reports/s, and at most one sync per
//! transfer per interval. Syncs are counted from the state slots' sequence numbers (each
//! durable write takes the next one; docs/FORMAT.md §1.4), so the bench needs no hooks.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "a benchmark that cannot set up should stop"
)]

mod common;

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use waybill::{Durability, NewTransfer, Store, TransferId};

/// The newest sequence number in a state file (both slots' headers; magic checked).
fn seq(store: &Path, id: TransferId) -> u64 {
    let b = std::fs::read(store.join("transfers").join(id.to_string()).join("state")).unwrap();
    [0usize, 16 * 1024]
        .iter()
        .filter(|&&at| b.get(at..at + 4) == Some(b"WBST"))
        .filter_map(|&at| Some(u64::from_le_bytes(b.get(at + 8..at + 16)?.try_into().ok()?)))
        .max()
        .unwrap()
}

fn run(transfers: usize, secs: f64) {
    let dir = common::scratch();
    let root = dir.path().join("store");
    let store = Store::open(&root).unwrap();
    let ids = store
        .create_batch(
            (0..transfers)
                .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
                .collect(),
        )
        .unwrap();
    let before: Vec<u64> = ids.iter().map(|id| seq(&root, *id)).collect();
    let t = Instant::now();
    let mut reports = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let id = ids[(reports % transfers as u64) as usize];
            reports += 1;
            store
                .progress(id, reports, Some(u64::MAX), Durability::Coalesced)
                .unwrap();
        }
    }
    let elapsed = t.elapsed().as_secs_f64();
    let writes: Vec<u64> = ids
        .iter()
        .zip(&before)
        .map(|(id, b)| seq(&root, *id) - b)
        .collect();
    let most = *writes.iter().max().unwrap();
    let total: u64 = writes.iter().sum();
    println!(
        "  {transfers:>4} transfer(s): {:>12.0} reports/s; syncs per transfer per second: {:.2} mean, {:.2} max ({} writes in {elapsed:.2} s; goal <= 1 per 1 s interval)",
        reports as f64 / elapsed,
        total as f64 / transfers as f64 / elapsed,
        most as f64 / elapsed,
        total
    );
}

fn bench(c: &mut Criterion) {
    println!("\ncoalesced progress (flush interval 1 s)");
    for n in [1, 100] {
        run(n, 5.0);
    }
    let dir = common::scratch();
    let store = Store::builder()
        .flush_interval(Duration::from_secs(3600))
        .open(dir.path().join("store"))
        .unwrap();
    let id = store
        .create(NewTransfer::download("https://example.com/x"))
        .unwrap();
    let mut n = 0u64;
    c.bench_function("coalesced_progress_report", |b| {
        b.iter(|| {
            n += 1;
            store
                .progress(black_box(id), n, Some(u64::MAX), Durability::Coalesced)
                .unwrap();
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
