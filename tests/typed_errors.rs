//! Bad input, missing records and contention give typed errors, never panics.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::time::Duration;

use common::{TempStore, TestResult};
use waybill::{ErrorKind, NewTransfer, Store, TransferId};

#[test]
fn unknown_ids_are_not_found() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = TransferId::new_v4();
    for err in [
        store.get(id).map(|_| ()).expect_err("get"),
        store.complete(id, None).map(|_| ()).expect_err("complete"),
        store.cancel(id).map(|_| ()).expect_err("cancel"),
        store.remove(id).expect_err("remove"),
        store.resume_data(id).map(|_| ()).expect_err("resume"),
        store
            .progress(id, 1, None, waybill::Durability::Coalesced)
            .expect_err("progress"),
    ] {
        assert!(matches!(err.kind(), ErrorKind::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&id.to_string()), "{err}");
    }
    let err = store.group("nobody").expect_err("group");
    assert!(matches!(err.kind(), ErrorKind::NotFound { .. }));
    Ok(())
}

#[test]
fn only_canonical_ids_parse() {
    let id = TransferId::new_v4();
    assert_eq!(id.to_string().parse::<TransferId>().ok(), Some(id));
    for bad in [
        id.to_string().to_uppercase(),
        id.to_string().replace('-', ""),
        format!("{{{id}}}"),
        format!("urn:uuid:{id}"),
        "../../etc".to_owned(),
        String::new(),
    ] {
        let err = bad.parse::<TransferId>().expect_err("non-canonical");
        assert!(
            matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
            "{bad}"
        );
    }
}

#[test]
fn a_held_lock_times_out_as_busy() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::builder()
        .lock_timeout(Duration::from_millis(50))
        .open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    let state = t
        .root()
        .join("transfers")
        .join(id.to_string())
        .join("state");
    let held = std::fs::File::open(&state)?;
    held.lock()?;
    let err = store.complete(id, None).expect_err("lock held");
    assert!(matches!(err.kind(), ErrorKind::Busy { .. }), "{err}");
    // Readers need no lock.
    assert_eq!(store.get(id)?.state.phase, waybill::Phase::Pending);
    drop(held);
    assert!(store.complete(id, None).is_ok());
    Ok(())
}

#[test]
fn a_symlinked_transfer_directory_is_corrupt_not_followed() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let outside = t.dir.path().join("outside");
    std::fs::create_dir(&outside)?;
    let id = TransferId::new_v4();
    std::os::unix::fs::symlink(&outside, t.root().join("transfers").join(id.to_string()))?;
    let err = store.get(id).expect_err("symlinked directory");
    assert!(err.is_corrupt(), "{err}");
    let scan = store.scan()?;
    assert!(scan.transfers.is_empty());
    assert_eq!(scan.unknown.len(), 1);
    assert!(
        std::fs::read_dir(&outside)?.next().is_none(),
        "nothing written outside"
    );
    Ok(())
}

#[test]
fn a_corrupt_manifest_is_reported_and_quarantined() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    let good = store.create(NewTransfer::download("https://example.com/b"))?;
    drop(store);
    let m = t
        .root()
        .join("transfers")
        .join(id.to_string())
        .join("manifest");
    let mut b = std::fs::read(&m)?;
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&m, b)?;
    let store = Store::open(t.root())?;
    let err = store.get(id).expect_err("corrupt manifest");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Corrupt {
                detail: waybill::Corruption::Checksum { .. },
                ..
            }
        ),
        "{err}"
    );
    let scan = store.scan()?;
    assert_eq!(scan.transfers.len(), 1);
    assert_eq!(scan.corrupt.len(), 1);
    let to = store.quarantine(id)?;
    assert!(to.join("manifest").exists(), "moved aside, nothing deleted");
    assert!(store.get(good).is_ok());
    assert!(store.scan()?.corrupt.is_empty());
    Ok(())
}

#[test]
fn extreme_numbers_from_callers_do_not_panic() -> TestResult {
    use waybill::{Durability, ErrorClass, FailResult, RetryPolicy};
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let policy = RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::MAX,
        max_backoff: Duration::MAX,
    };
    let a = store.create(
        NewTransfer::download("https://example.com/a")
            .group("g")
            .retry(policy),
    )?;
    let b = store.create(NewTransfer::download("https://example.com/b").group("g"))?;
    for id in [a, b] {
        store.progress(id, u64::MAX, Some(u64::MAX), Durability::Immediate)?;
    }
    let g = store.group("g")?;
    assert_eq!(
        (g.bytes_done, g.bytes_total),
        (u64::MAX, u64::MAX),
        "saturates"
    );
    assert!(matches!(
        store.fail(a, ErrorClass::Transient, "x")?,
        FailResult::RetryAt(_)
    ));
    Ok(())
}

#[test]
fn a_replacement_request_must_leave_room_to_end_the_transfer() -> TestResult {
    use waybill::{ErrorClass, FailResult, Request};
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/a"))?;
    let huge = Request::new("GET", format!("https://example.com/{}", "q".repeat(15_000)));
    let err = store
        .replace_request(id, huge)
        .expect_err("too large for a state slot");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    let big = Request::new("GET", format!("https://example.com/{}", "q".repeat(12_000)));
    store.replace_request(id, big)?;
    let long_error = "e".repeat(5000);
    assert_eq!(
        store.fail(id, ErrorClass::Permanent, &long_error)?,
        FailResult::GaveUp
    );
    Ok(())
}
