//! A torn or damaged newest state slot reads as the previous one; when both slots fail their
//! checks the state is rebuilt from the manifest and flagged, never guessed at.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::os::unix::fs::FileExt;

use common::{TempStore, TestResult};
use waybill::{Durability, NewTransfer, Phase, Store, TaskBinding, TransferId};

/// Slot `i` of the state file starts at `i * SLOT_CAPACITY` (docs/FORMAT.md).
const SLOT_CAPACITY: u64 = 16 * 1024;

fn state_path(root: &std::path::Path, id: TransferId) -> std::path::PathBuf {
    root.join("transfers").join(id.to_string()).join("state")
}

/// Creates a transfer whose slot 0 holds seq 3 (bytes 200) and slot 1 seq 2 (bytes 100).
fn prepared(store: &Store) -> Result<TransferId, waybill::Error> {
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    store.progress(id, 100, Some(1000), Durability::Immediate)?; // seq 2 -> slot 1
    store.progress(id, 200, Some(1000), Durability::Immediate)?; // seq 3 -> slot 0
    Ok(id)
}

#[test]
fn torn_newest_slot_falls_back_to_the_previous_one() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = prepared(&store)?;
    assert_eq!(store.get(id)?.state.bytes_done, 200);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(state_path(&t.root(), id))?;

    // A torn write: the first 512-byte sector of slot 0 made it, the rest did not, so a byte
    // inside the body is stale. Model it by flipping one body byte.
    let mut b = [0u8; 1];
    f.read_at(&mut b, 30)?;
    f.write_at(&[b[0] ^ 0x5a], 30)?;
    let s = store.get(id)?.state;
    assert_eq!(s.bytes_done, 100, "older slot used");
    assert!(!s.rebuilt);

    // A slot zeroed whole (the sector never reached the disk) reads the same way.
    f.write_at(&[0u8; 512], 0)?;
    assert_eq!(store.get(id)?.state.bytes_done, 100);

    // The next update goes to the damaged slot, never over the good one.
    store.progress(id, 300, Some(1000), Durability::Immediate)?;
    assert_eq!(store.get(id)?.state.bytes_done, 300);
    f.write_at(&[0u8; 512], 0)?;
    assert_eq!(
        store.get(id)?.state.bytes_done,
        100,
        "slot 1 was left intact"
    );
    Ok(())
}

#[test]
fn both_slots_corrupt_rebuilds_state_from_the_manifest() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = prepared(&store)?;
    store.bind(
        id,
        TaskBinding {
            session: "default".into(),
            task_id: 7,
            tag: None,
        },
    )?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(state_path(&t.root(), id))?;
    f.write_at(b"garbage!", 0)?;
    f.write_at(b"garbage!", SLOT_CAPACITY)?;
    drop(store);

    let store = Store::open(t.root())?;
    let tr = store.get(id)?;
    assert!(tr.state.rebuilt, "flagged as rebuilt");
    assert_eq!(tr.state.phase, Phase::Pending);
    assert_eq!(tr.state.binding, None, "task unknown");
    assert_eq!(tr.manifest.request.url, "https://example.com/f");

    // A truncated (empty) state file is the same case.
    std::fs::File::create(state_path(&t.root(), id))?;
    assert!(store.get(id)?.state.rebuilt);

    // The next update writes a valid state again.
    store.progress(id, 5, None, Durability::Immediate)?;
    let s = store.get(id)?.state;
    assert!(!s.rebuilt);
    assert_eq!(s.bytes_done, 5);
    Ok(())
}

#[test]
fn missing_state_file_is_rebuilt_not_an_error() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = prepared(&store)?;
    std::fs::remove_file(state_path(&t.root(), id))?;
    assert!(store.get(id)?.state.rebuilt);
    store.complete(id, Some(200))?;
    assert_eq!(store.get(id)?.state.phase, Phase::Completed);
    Ok(())
}

#[test]
fn a_newest_slot_cut_short_by_the_end_of_the_file_falls_back_to_the_other() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/f"))?; // seq 1 -> slot 0
    store.progress(id, 100, Some(1000), Durability::Immediate)?; // seq 2 -> slot 1
    let path = state_path(&t.root(), id);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let slot0 = std::fs::read(&path)?[..SLOT_CAPACITY as usize].to_vec();

    // Slot 1's header made it, its body did not: the file ends a few bytes into the body.
    for cut in [4, 30, 40] {
        f.set_len(SLOT_CAPACITY + cut)?;
        let s = store.get(id)?.state;
        assert_eq!(s.bytes_done, 0, "cut at {cut}: slot 0 used");
        assert!(!s.rebuilt);
    }
    // The next update rewrites slot 1, never slot 0.
    store.progress(id, 200, Some(1000), Durability::Immediate)?;
    assert_eq!(store.get(id)?.state.bytes_done, 200);
    assert_eq!(std::fs::read(&path)?[..SLOT_CAPACITY as usize], slot0[..]);
    Ok(())
}
