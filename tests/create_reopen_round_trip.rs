//! Everything a create records survives dropping the handle and reopening the store, and the
//! store holds nothing that depends on its absolute path.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::time::{Duration, UNIX_EPOCH};

use common::{TempStore, TestResult};
use waybill::{
    Filter, Kind, NewTransfer, PayloadFacts, Phase, RetryPolicy, Store, UploadSource, Value,
};

#[test]
fn create_drop_reopen_round_trips_every_field() -> TestResult {
    let t = TempStore::new()?;
    let deadline = UNIX_EPOCH + Duration::from_millis(1_900_000_000_123);
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(30),
    };
    let nested = Value::Array(vec![Value::Integer(-5), Value::Bytes(vec![0, 1, 255])]);
    let (up, down) = {
        let store = Store::open(t.root())?;
        assert!(store.open_report().created);
        let up = store.create(
            NewTransfer::upload(
                "https://example.com/u?sig=abc",
                UploadSource::Bytes(b"payload bytes".to_vec()),
            )
            .session("bg.uploads")
            .method("POST")
            .header("Content-Type", "image/jpeg")
            .secret_header("Authorization", "Bearer s3cret")
            .group("album")
            .deadline(deadline)
            .retry(retry)
            .idempotency_key("key-1")
            .meta("title", "sunset")
            .meta("count", 3i64)
            .meta("flag", true)
            .meta("list", nested.clone()),
        )?;
        let down = store.create(NewTransfer::download("https://example.com/d"))?;
        (up, down)
    };

    // Move the whole store: nothing in it may depend on where it was.
    let moved = t.dir.path().join("moved");
    std::fs::rename(t.root(), &moved)?;
    let store = Store::open(&moved)?;
    assert!(!store.open_report().created);

    let u = store.get(up)?;
    let m = &u.manifest;
    assert_eq!(m.id, up);
    assert_eq!(m.kind, Kind::Upload);
    assert_eq!(m.session, "bg.uploads");
    assert_eq!(m.request.method, "POST");
    assert_eq!(m.request.url, "https://example.com/u?sig=abc");
    assert_eq!(m.request.headers.len(), 2);
    assert_eq!(m.request.headers[0].value, "image/jpeg");
    assert!(m.request.headers[1].secret);
    assert_eq!(
        m.request.headers[1].value, "",
        "secret values are never stored"
    );
    assert_eq!(m.group.as_deref(), Some("album"));
    assert_eq!(m.deadline, Some(deadline));
    assert_eq!(m.retry, retry);
    assert_eq!(m.idempotency_key, "key-1");
    assert_eq!(m.payload, PayloadFacts::Written { len: 13 });
    assert_eq!(m.metadata.get("title"), Some(&Value::from("sunset")));
    assert_eq!(m.metadata.get("count"), Some(&Value::Integer(3)));
    assert_eq!(m.metadata.get("flag"), Some(&Value::Bool(true)));
    assert_eq!(m.metadata.get("list"), Some(&nested));
    assert_eq!(u.state.phase, Phase::Pending);
    assert!(!u.state.rebuilt);
    assert_eq!(std::fs::read(store.payload_path(up))?, b"payload bytes");

    let d = store.get(down)?;
    assert_eq!(d.manifest.kind, Kind::Download);
    assert_eq!(d.manifest.session, "default");
    assert_eq!(d.manifest.idempotency_key, down.to_string());
    assert_eq!(d.manifest.payload, PayloadFacts::None);

    // The secret value never reached any file.
    for f in common::files_below(&moved) {
        let bytes = std::fs::read(moved.join(&f))?;
        assert!(
            !bytes.windows(6).any(|w| w == b"s3cret"),
            "{} holds a secret",
            f.display()
        );
    }
    assert_eq!(store.list(&Filter::all())?.len(), 2);
    assert_eq!(store.list(&Filter::all().kind(Kind::Download))?.len(), 1);
    assert_eq!(store.list(&Filter::all().group("album"))?.len(), 1);
    assert_eq!(store.list(&Filter::all().session("bg.uploads"))?.len(), 1);
    assert_eq!(store.list(&Filter::all().phase(Phase::Running))?.len(), 0);
    Ok(())
}

#[test]
fn batch_create_makes_every_member_visible() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let batch: Vec<_> = (0..25)
        .map(|i| {
            NewTransfer::upload(
                format!("https://example.com/{i}"),
                UploadSource::Bytes(vec![i as u8; 100]),
            )
            .group("batch")
        })
        .collect();
    let ids = store.create_batch(batch)?;
    assert_eq!(ids.len(), 25);
    drop(store);
    let store = Store::open(t.root())?;
    let listed: Vec<_> = store.list(&Filter::all().group("batch"))?;
    assert_eq!(listed.len(), 25);
    assert!(common::files_below(&t.root().join("staging")).is_empty());
    Ok(())
}

#[test]
fn invalid_input_is_refused_before_anything_is_written() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let bad = [
        NewTransfer::download("").session("s"),
        NewTransfer::download("https://x").session(""),
        NewTransfer::download("https://x").group("g".repeat(200)),
        NewTransfer::download("https://x").header("X-A", "a\r\nInjected: 1"),
        NewTransfer::download("https://x").retry(RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        }),
        NewTransfer::download("https://x").meta("big", Value::Bytes(vec![0; 70_000])),
    ];
    for b in bad {
        let err = store.create(b).expect_err("must be refused");
        assert!(
            matches!(err.kind(), waybill::ErrorKind::InvalidArgument { .. }),
            "{err}"
        );
    }
    assert!(store.list(&Filter::all())?.is_empty());
    assert!(common::files_below(&t.root().join("staging")).is_empty());
    Ok(())
}

#[test]
fn non_canonical_entries_are_reported_not_deleted() -> TestResult {
    let t = TempStore::new()?;
    drop(Store::open(t.root())?);
    let transfers = t.root().join("transfers");
    let upper = transfers.join("6F9619FF-8B86-D011-B42D-00C04FC964FF");
    std::fs::create_dir(&upper)?;
    std::fs::write(transfers.join("notes.txt"), b"hi")?;
    common::forget_index(&t.root());
    let store = Store::open(t.root())?;
    let report = store.open_report();
    assert_eq!(report.unknown_entries.len(), 2, "{report:?}");
    assert!(upper.exists() && transfers.join("notes.txt").exists());
    assert!(store.list(&Filter::all())?.is_empty());
    Ok(())
}

#[test]
fn newer_format_version_is_refused() -> TestResult {
    let t = TempStore::new()?;
    drop(Store::open(t.root())?);
    let mut b = std::fs::read(t.root().join("FORMAT"))?;
    b[8..10].copy_from_slice(&999u16.to_le_bytes());
    let crc = crc32(&b[..12]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(t.root().join("FORMAT"), &b)?;
    let err = Store::open(t.root()).expect_err("version 999 must be refused");
    assert!(
        matches!(
            err.kind(),
            waybill::ErrorKind::UnsupportedVersion {
                found: 999,
                supported: waybill::FORMAT_VERSION,
                ..
            }
        ),
        "{err}"
    );
    Ok(())
}

fn crc32(b: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), so the test does not share the library's implementation.
    let mut c = !0u32;
    for &x in b {
        c ^= u32::from(x);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}
