//! Acknowledging an outcome leaves no file of the transfer behind, a purged transfer never
//! reappears, and group counts stay right after members are purged.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use common::{TempStore, TestResult};
use waybill::{
    CancelResult, Completion, ErrorClass, ErrorKind, GroupClaim, NewTransfer, Outcome, Phase,
    RetryPolicy, Store, UploadSource,
};

fn member(i: u8) -> NewTransfer {
    NewTransfer::upload(
        format!("https://example.com/{i}"),
        UploadSource::Bytes(vec![i; 1000]),
    )
    .group("trip")
    .retry(RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    })
}

#[test]
fn acknowledge_leaves_nothing_and_counts_survive() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let ids = store.create_batch((0..4).map(member).collect())?;
    let before = common::files_below(&t.root());

    assert!(matches!(
        store.complete(ids[0], Some(201))?,
        Completion::Won(_)
    ));
    assert!(matches!(
        store.complete(ids[1], Some(200))?,
        Completion::Won(_)
    ));
    store.fail(ids[2], ErrorClass::Transient, "timeout")?; // max_attempts 1: gives up
    assert!(matches!(
        store.cancel(ids[3])?,
        CancelResult::Cancelled { task: None }
    ));

    let g = store.group("trip")?;
    assert_eq!(
        (g.total, g.succeeded, g.failed, g.cancelled, g.active),
        (4, 2, 1, 1, 0)
    );
    assert!(g.all_ended);

    // Unended transfers cannot be acknowledged.
    let fresh = store.create(member(9).group("other"))?;
    let err = store.acknowledge(fresh).expect_err("not ended");
    assert!(matches!(err.kind(), ErrorKind::InvalidArgument { .. }));

    for id in &ids {
        store.acknowledge(*id)?;
        let dir = t.root().join("transfers").join(id.to_string());
        assert!(!dir.exists(), "transfer directory gone");
        assert!(!t.root().join("trash").join(id.to_string()).exists());
    }
    let g = store.group("trip")?;
    assert_eq!((g.total, g.succeeded, g.failed, g.cancelled), (4, 2, 1, 1));
    assert!(g.members.is_empty());
    assert_eq!(g.bytes_done, 4000);

    // No file of the acknowledged transfers remains anywhere in the store.
    let after = common::files_below(&t.root());
    for id in &ids {
        let s = id.to_string();
        assert!(
            after.iter().all(|p| !p.to_string_lossy().contains(&s)),
            "a file of {s} remains: {after:?}"
        );
    }
    assert!(after.len() < before.len() + 10);

    // Reopen: purged transfers never reappear and counts stay.
    drop(store);
    let store = Store::open(t.root())?;
    for id in &ids {
        let err = store.get(*id).expect_err("purged");
        assert!(matches!(err.kind(), ErrorKind::NotFound { .. }));
    }
    let g = store.group("trip")?;
    assert_eq!((g.total, g.succeeded, g.failed, g.cancelled), (4, 2, 1, 1));
    Ok(())
}

#[test]
fn group_finished_is_claimed_exactly_once() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let ids = store.create_batch((0..2).map(member).collect())?;
    store.complete(ids[0], None)?;
    assert!(matches!(
        store.claim_group_finished("trip")?,
        GroupClaim::NotFinished(_)
    ));
    store.complete(ids[1], None)?;
    store.acknowledge(ids[0])?;
    assert!(matches!(
        store.claim_group_finished("trip")?,
        GroupClaim::Won(_)
    ));
    assert_eq!(store.claim_group_finished("trip")?, GroupClaim::Lost);
    drop(store);
    let other = Store::open(t.root())?;
    assert_eq!(other.claim_group_finished("trip")?, GroupClaim::Lost);
    assert!(other.group("trip")?.finished_claimed);
    Ok(())
}

#[test]
fn cancel_group_cancels_every_unended_member() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let ids = store.create_batch((0..3).map(member).collect())?;
    store.complete(ids[0], Some(200))?;
    let r = store.cancel_group("trip")?;
    assert_eq!(r.len(), 2 + 1); // the completed member answers AlreadyEnded
    assert!(r.iter().any(|(id, c)| *id == ids[0]
        && *c == CancelResult::AlreadyEnded(Outcome::Succeeded { status: Some(200) })));
    for id in &ids[1..] {
        assert_eq!(store.get(*id)?.state.phase, Phase::Cancelled);
    }
    // Removing a cancelled member counts it as cancelled.
    store.remove(ids[1])?;
    let g = store.group("trip")?;
    assert_eq!((g.succeeded, g.cancelled, g.total), (1, 2, 3));
    Ok(())
}
