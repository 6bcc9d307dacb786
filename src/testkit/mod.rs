//! The test kit: the simulated file system, the crash exploration, the fault injector and the
//! fuzz targets' entry points. Built for tests, and for the fuzz targets (feature `fuzzing`);
//! nothing else in the crate reaches it.

pub(crate) mod crash;
#[cfg(test)]
pub(crate) mod crash_index;
#[cfg(test)]
pub(crate) mod faults;
pub mod fuzzing;
pub(crate) mod sim;
#[cfg(test)]
pub(crate) mod spy;

/// The fixed clock of the crash explorations: every run computes the same retry times.
pub(crate) fn fixed_clock() -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)
}

/// A store builder on the simulated disk `sim`, as the crash explorations open it: the fixed
/// clock, staging debris cleared at once, no background flusher, short lock waits.
pub(crate) fn sim_builder(sim: &std::sync::Arc<sim::Sim>) -> crate::StoreBuilder {
    use std::time::Duration;
    crate::Store::builder()
        .backend(std::sync::Arc::clone(sim) as std::sync::Arc<dyn crate::fs::Backend>)
        .clock(fixed_clock)
        .staging_grace(Duration::ZERO)
        .flush_interval(Duration::from_secs(3600))
        .background_flush(false)
        .lock_timeout(Duration::from_millis(10))
}

/// A whole number from the environment variable `name`, if it holds one.
pub(crate) fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs the seeded sequences of an exploration: only the one `replay` names when that variable
/// is set, else one seed after another from `WAYBILL_SEED` (or `first`) for as long as `run`
/// returns true. Returns how many ran.
pub(crate) fn run_seeds(replay: &str, first: u64, mut run: impl FnMut(u64) -> bool) -> u64 {
    if let Some(seed) = env_u64(replay) {
        run(seed);
        return 1;
    }
    let first = env_u64("WAYBILL_SEED").unwrap_or(first);
    let mut sequences = 0u64;
    loop {
        let more = run(first.wrapping_add(sequences));
        sequences += 1;
        if !more {
            return sequences;
        }
    }
}

/// Ids drawn from a seed, so a test that replays a seed makes the same ids (and the store lists
/// them in the same order).
pub(crate) mod seeded_ids {
    use std::cell::Cell;

    thread_local! {
        static NEXT: Cell<Option<u64>> = const { Cell::new(None) };
    }

    /// Draws this thread's ids from `seed` from now on (`None`: random again).
    pub(crate) fn seed(seed: Option<u64>) {
        NEXT.with(|n| n.set(seed));
    }

    pub(crate) fn next() -> Option<crate::TransferId> {
        NEXT.with(|n| {
            let mut rng = super::sim::Rng(n.get()?);
            let hi = rng.next();
            let lo = rng.next();
            n.set(Some(rng.0));
            let bytes = (u128::from(hi) << 64 | u128::from(lo)).to_be_bytes();
            Some(crate::TransferId::from_bytes(
                *uuid::Builder::from_random_bytes(bytes)
                    .into_uuid()
                    .as_bytes(),
            ))
        })
    }
}
