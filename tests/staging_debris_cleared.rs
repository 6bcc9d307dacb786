//! Opening the store clears staging and trash debris that no live process owns, and never a
//! directory whose builder still holds its lock.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::time::Duration;

use common::{TempStore, TestResult};
use waybill::{Filter, Store};

fn debris(root: &std::path::Path, id: &str) -> std::io::Result<std::path::PathBuf> {
    let d = root.join("staging").join(id);
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("state"), b"half written")?;
    std::fs::write(d.join("manifest"), b"half")?;
    Ok(d)
}

#[test]
fn dead_builders_debris_is_cleared_and_live_builders_kept() -> TestResult {
    let t = TempStore::new()?;
    drop(Store::open(t.root())?);
    let dead = debris(&t.root(), "0b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b11")?;
    let live = debris(&t.root(), "1b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b22")?;
    let no_state = t
        .root()
        .join("staging")
        .join("2b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b33");
    std::fs::create_dir(&no_state)?;
    let trash = t
        .root()
        .join("trash")
        .join("3b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b44");
    std::fs::create_dir(&trash)?;
    std::fs::write(trash.join("payload"), b"x")?;

    // A live builder holds an exclusive lock on its state file.
    let held = std::fs::File::open(live.join("state"))?;
    held.lock()?;

    let store = Store::builder()
        .staging_grace(Duration::ZERO)
        .open(t.root())?;
    let r = store.open_report();
    assert!(!dead.exists(), "dead builder's debris cleared");
    assert!(!no_state.exists(), "state-less debris cleared");
    assert!(live.exists(), "live builder's directory kept");
    assert!(!trash.exists(), "interrupted removal finished");
    assert_eq!(r.staging_cleared.len(), 2, "{r:?}");
    assert_eq!(
        r.staging_live,
        vec!["1b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b22".to_owned()]
    );
    assert_eq!(r.trash_cleared.len(), 1);
    assert!(
        store.list(&Filter::all())?.is_empty(),
        "debris never becomes a transfer"
    );
    drop(store);

    // Once the builder is gone, the next open clears it.
    drop(held);
    let store = Store::builder()
        .staging_grace(Duration::ZERO)
        .open(t.root())?;
    assert!(!live.exists());
    assert_eq!(store.open_report().staging_cleared.len(), 1);
    Ok(())
}

#[test]
fn young_unlocked_staging_is_left_for_a_later_open() -> TestResult {
    let t = TempStore::new()?;
    drop(Store::open(t.root())?);
    // A builder between creating its state file and locking it looks like this (FORMAT.md
    // §3.1): an empty state file and nothing else.
    let d = t
        .root()
        .join("staging")
        .join("4b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b55");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("state"), b"")?;
    let store = Store::open(t.root())?; // default grace: 60 s
    assert!(d.exists());
    assert_eq!(store.open_report().staging_live.len(), 1);
    Ok(())
}

#[test]
fn young_debris_of_a_builder_that_had_locked_is_cleared_at_once() -> TestResult {
    let t = TempStore::new()?;
    drop(Store::open(t.root())?);
    // A written state file or a placed manifest: its builder held the lock, and holds it no
    // longer, so it is dead however young the directory is.
    let d = debris(&t.root(), "5b3c0c4e-7a0e-4c6e-9d3a-2f6f0e9a1b66")?;
    let store = Store::open(t.root())?; // default grace: 60 s
    assert!(!d.exists());
    assert_eq!(store.open_report().staging_cleared.len(), 1);
    assert!(store.check(|_, _| {})?.staging_debris.is_empty());
    Ok(())
}
