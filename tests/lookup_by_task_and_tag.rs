//! A platform callback finds its transfer by (session, task id) or by tag, also when another
//! handle (another process) made the binding, and never through a stale binding.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use common::{TempStore, TestResult};
use waybill::{ErrorKind, NewTransfer, Store, TaskBinding};

fn binding(session: &str, task_id: u64, tag: Option<String>) -> TaskBinding {
    TaskBinding {
        session: session.into(),
        task_id,
        tag,
    }
}

#[test]
fn lookup_by_task_and_by_tag() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = store.create(NewTransfer::download("https://example.com/a").session("s1"))?;
    let b = store.create(NewTransfer::download("https://example.com/b").session("s2"))?;
    store.bind(a, binding("s1", 1, Some("tag-a".into())))?;
    store.bind(b, binding("s2", 1, None))?;

    // Same task id in two sessions: the session tells them apart.
    assert_eq!(store.find_by_task("s1", 1)?.map(|t| t.id()), Some(a));
    assert_eq!(store.find_by_task("s2", 1)?.map(|t| t.id()), Some(b));
    assert!(store.find_by_task("s1", 2)?.is_none());
    assert_eq!(store.find_by_tag("tag-a")?.map(|t| t.id()), Some(a));
    // With no tag recorded, a tag that is the transfer id finds it.
    assert_eq!(store.find_by_tag(&b.to_string())?.map(|t| t.id()), Some(b));
    assert!(store.find_by_tag("unknown")?.is_none());

    // Another handle (standing in for another process) rebinds `a` to a new task.
    let other = Store::open(t.root())?;
    other.bind(a, binding("s1", 9, Some("tag-a2".into())))?;
    assert!(
        store.find_by_task("s1", 1)?.is_none(),
        "stale binding never matches"
    );
    assert_eq!(store.find_by_task("s1", 9)?.map(|t| t.id()), Some(a));
    assert_eq!(store.find_by_tag("tag-a2")?.map(|t| t.id()), Some(a));
    Ok(())
}

#[test]
fn binding_must_use_the_manifest_session() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let a = store.create(NewTransfer::download("https://example.com/a").session("s1"))?;
    let err = store
        .bind(a, binding("s2", 1, None))
        .expect_err("wrong session");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    assert!(store.get(a)?.state.binding.is_none());
    store.complete(a, None)?;
    let err = store.bind(a, binding("s1", 1, None)).expect_err("ended");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    Ok(())
}
