//! Shared by the benches: contenders run in alternation (A B C … then rotated), and each one's
//! cost is reported as the median of its per-round ratios to the first contender (the floor),
//! because absolute times on a shared VM drift by ±20–50% while ratios within a round do not.

#![allow(dead_code, reason = "each bench uses part of this module")]

use std::time::{Duration, Instant};

/// One contender: a name and the work of one operation.
pub struct Contender<'a> {
    pub name: &'static str,
    pub op: Box<dyn FnMut() + 'a>,
}

impl<'a> Contender<'a> {
    pub fn new(name: &'static str, op: impl FnMut() + 'a) -> Self {
        Contender {
            name,
            op: Box::new(op),
        }
    }
}

/// One contender's figures.
#[derive(Debug, Clone)]
pub struct Summary {
    pub name: &'static str,
    /// Median time of one operation over all rounds.
    pub per_op: Duration,
    /// Median of the per-round ratios to contender 0, with the smallest and largest.
    pub ratio: f64,
    pub min: f64,
    pub max: f64,
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `rounds` rounds. In each round every contender runs `batch` operations, one contender
/// after another, in an order rotated every round so none always runs first or last. Returns
/// the median pairwise ratio of each contender to contender 0.
pub fn alternate(rounds: usize, batch: usize, cs: &mut [Contender<'_>]) -> Vec<Summary> {
    let n = cs.len();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); n];
    for r in 0..rounds {
        let mut round = vec![0.0; n];
        for k in 0..n {
            let i = (r + k) % n;
            let op = &mut cs[i].op;
            let t = Instant::now();
            for _ in 0..batch {
                op();
            }
            round[i] = t.elapsed().as_secs_f64() / batch as f64;
        }
        for (i, t) in round.into_iter().enumerate() {
            times[i].push(t);
        }
    }
    (0..n)
        .map(|i| {
            let mut ratios: Vec<f64> = times[i].iter().zip(&times[0]).map(|(a, b)| a / b).collect();
            let ratio = median(&mut ratios);
            let (min, max) = (ratios[0], ratios[ratios.len() - 1]);
            let per_op = Duration::from_secs_f64(median(&mut times[i].clone()));
            Summary {
                name: cs[i].name,
                per_op,
                ratio,
                min,
                max,
            }
        })
        .collect()
}

/// Prints a table of summaries, ratios to the first row.
pub fn print(title: &str, rows: &[Summary]) {
    println!("\n{title}");
    println!(
        "  {:<34} {:>12} {:>9} {:>17}",
        "contender", "per op", "ratio", "(min–max)"
    );
    for s in rows {
        println!(
            "  {:<34} {:>12} {:>8.2}x {:>7.2}x–{:.2}x",
            s.name,
            fmt_duration(s.per_op),
            s.ratio,
            s.min,
            s.max
        );
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.1} µs", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

/// A scratch directory on the file system under test: `WAYBILL_BENCH_DIR` when set, else the
/// system temporary directory. (Not tmpfs: syncs must reach a real device to mean anything.)
pub fn scratch() -> tempfile::TempDir {
    match std::env::var_os("WAYBILL_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("scratch directory")
}

/// The floor's file: 4 KiB, allocated and synced, so a 256-byte overwrite plus `fdatasync`
/// allocates nothing.
pub fn floor_file(dir: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("raw"))
        .expect("floor file");
    f.write_all_at(&[0u8; 4096], 0).expect("floor file");
    f.sync_all().expect("floor file");
    f
}
