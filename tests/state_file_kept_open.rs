//! A store keeps a transfer's state file open between updates (a lock and a check of its
//! directory instead of an open), and keeps its shared lock on the change journal from a
//! change's intent to its entry. Neither may ever write into a file that is no longer the
//! transfer's, hide another process's update, or leave the journal locked.

mod common;

use std::path::{Path, PathBuf};

use common::{TempStore, TestResult};
use waybill::{Durability, ErrorKind, NewTransfer, Store, TaskBinding, TransferId};

fn transfer_dir(root: &Path, id: TransferId) -> PathBuf {
    root.join("transfers").join(id.to_string())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[test]
fn an_update_after_the_directory_was_replaced_writes_the_one_now_in_place() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    store.progress(id, 10, Some(100), Durability::Immediate)?;

    // Another process puts a copy of the directory in place of the one this store has open.
    let dir = transfer_dir(&t.root(), id);
    let aside = t.dir.path().join("aside");
    std::fs::rename(&dir, &aside)?;
    copy_dir(&aside, &dir)?;
    let old_state = std::fs::read(aside.join("state"))?;

    store.progress(id, 20, Some(100), Durability::Immediate)?;
    assert_eq!(store.get(id)?.state.bytes_done, 20);
    assert_eq!(
        std::fs::read(aside.join("state"))?,
        old_state,
        "the file moved aside was not written"
    );
    let other = Store::open(t.root())?;
    assert_eq!(other.get(id)?.state.bytes_done, 20, "the update is on disk");
    Ok(())
}

#[test]
fn an_update_after_another_process_removed_the_transfer_is_not_found() -> TestResult {
    let t = TempStore::new()?;
    let a = Store::open(t.root())?;
    let b = Store::open(t.root())?;
    let id = a.create(NewTransfer::download("https://example.com/f"))?;
    a.progress(id, 10, Some(100), Durability::Immediate)?;
    b.remove(id)?;
    let e = a
        .progress(id, 20, Some(100), Durability::Immediate)
        .err()
        .ok_or("an update of a removed transfer succeeded")?;
    assert!(matches!(e.kind(), ErrorKind::NotFound { .. }), "{e}");
    assert!(!transfer_dir(&t.root(), id).exists());
    Ok(())
}

#[test]
fn updates_from_two_stores_alternating_each_build_on_the_other() -> TestResult {
    let t = TempStore::new()?;
    let a = Store::open(t.root())?;
    let b = Store::open(t.root())?;
    let id = a.create(NewTransfer::download("https://example.com/f"))?;
    for i in 1..=20u64 {
        let (writer, reader) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        writer.progress(id, i, Some(100), Durability::Immediate)?;
        assert_eq!(reader.get(id)?.state.bytes_done, i, "step {i}");
    }
    // A lifecycle change from one store, then progress from the other: the second sees the
    // first's binding (it read the state its own open file did not write).
    let task = TaskBinding {
        session: a.get(id)?.manifest.session,
        task_id: 7,
        tag: None,
    };
    a.bind(id, task.clone())?;
    b.progress(id, 50, Some(100), Durability::Immediate)?;
    let s = a.get(id)?.state;
    assert_eq!(s.bytes_done, 50);
    assert_eq!(s.binding, Some(task));
    Ok(())
}

/// The journal can be locked exclusively (as its holder does to start it afresh), so no
/// update left this process's shared lock behind.
fn journal_unlocked(root: &Path) -> Result<bool, std::io::Error> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(root.join("journal"))?;
    match f.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[test]
fn an_update_leaves_the_journal_unlocked_whether_it_succeeds_or_fails() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    if !t.root().join("journal").exists() {
        eprintln!("skipped: this system keeps no change journal");
        return Ok(());
    }
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    store.progress(id, 10, Some(100), Durability::Immediate)?;
    assert!(journal_unlocked(&t.root())?, "after an update");
    store.progress(id, 10, Some(100), Durability::Immediate)?;
    assert!(
        journal_unlocked(&t.root())?,
        "after an update that changed nothing"
    );
    store.complete(id, Some(200))?;
    let task = TaskBinding {
        session: store.get(id)?.manifest.session,
        task_id: 1,
        tag: None,
    };
    let e = store
        .bind(id, task)
        .err()
        .ok_or("an ended transfer was bound")?;
    assert!(matches!(e.kind(), ErrorKind::InvalidArgument { .. }), "{e}");
    assert!(journal_unlocked(&t.root())?, "after an update that failed");
    store.remove(id)?;
    assert!(journal_unlocked(&t.root())?, "after a removal");
    Ok(())
}
