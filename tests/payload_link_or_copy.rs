//! An immutable source is hard-linked (same inode, never chmodded), a copy is used across file
//! systems or when asked, and a linked source that changes afterwards is reported as a typed
//! error instead of uploading different bytes.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{TempStore, TestResult};
use waybill::{ErrorKind, LinkMode, NewTransfer, PayloadFacts, Store, UploadSource};

fn upload(path: &Path, link: LinkMode) -> NewTransfer {
    NewTransfer::upload(
        "https://example.com/u",
        UploadSource::File {
            path: path.to_path_buf(),
            link,
        },
    )
}

#[test]
fn immutable_source_is_hard_linked_and_never_chmodded() -> TestResult {
    let t = TempStore::new()?;
    let src = t.dir.path().join("photo.jpg");
    std::fs::write(&src, vec![9u8; 64 * 1024])?;
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644))?;
    let store = Store::open(t.root())?;
    let id = store.create(upload(&src, LinkMode::Auto))?;
    let m = store.get(id)?.manifest;
    let src_meta = std::fs::metadata(&src)?;
    match m.payload {
        PayloadFacts::Linked { len, ino, dev, .. } => {
            assert_eq!((len, ino, dev), (64 * 1024, src_meta.ino(), src_meta.dev()));
        }
        other => panic!("expected a link, got {other:?}"),
    }
    assert_eq!(src_meta.nlink(), 2);
    assert_eq!(
        src_meta.permissions().mode() & 0o777,
        0o644,
        "linked inode keeps its mode"
    );
    let mut f = store.open_payload(id)?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf)?;
    assert_eq!(buf.len(), 64 * 1024);

    // Files and directories the library creates are owner-only.
    let dir = t.root().join("transfers").join(id.to_string());
    assert_eq!(std::fs::metadata(&dir)?.permissions().mode() & 0o777, 0o700);
    for f in ["manifest", "state"] {
        assert_eq!(
            std::fs::metadata(dir.join(f))?.permissions().mode() & 0o777,
            0o600
        );
    }
    // Purging removes our link, not the user's file.
    store.remove(id)?;
    assert!(src.exists());
    assert_eq!(std::fs::metadata(&src)?.nlink(), 1);
    Ok(())
}

#[test]
fn copy_mode_copies_and_is_owner_only() -> TestResult {
    let t = TempStore::new()?;
    let src = t.dir.path().join("doc.pdf");
    std::fs::write(&src, b"0123456789")?;
    let store = Store::open(t.root())?;
    let id = store.create(upload(&src, LinkMode::Copy))?;
    assert_eq!(
        store.get(id)?.manifest.payload,
        PayloadFacts::Copied { len: 10 }
    );
    let p = store.payload_path(id);
    assert_ne!(std::fs::metadata(&p)?.ino(), std::fs::metadata(&src)?.ino());
    assert_eq!(std::fs::metadata(&p)?.permissions().mode() & 0o777, 0o600);
    // The source may now change without affecting the copy.
    std::fs::write(&src, b"changed")?;
    assert!(store.open_payload(id).is_ok());
    assert_eq!(std::fs::read(&p)?, b"0123456789");
    Ok(())
}

/// A second file system for the cross-device case: `/dev/shm` (tmpfs) when it is a different
/// device from the temporary directory.
fn other_device(than: &Path) -> Option<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let a = std::fs::metadata(shm).ok()?.dev();
    let b = std::fs::metadata(than).ok()?.dev();
    (a != b).then(|| tempfile::tempdir_in(shm).ok()).flatten()
}

#[test]
fn cross_device_source_falls_back_to_a_copy() -> TestResult {
    let t = TempStore::new()?;
    let Some(other) = other_device(t.dir.path()) else {
        eprintln!("skipped: no second file system (/dev/shm) on this machine");
        return Ok(());
    };
    let src = other.path().join("clip.mov");
    std::fs::write(&src, vec![1u8; 5000])?;
    let store = Store::open(t.root())?;
    let id = store.create(upload(&src, LinkMode::Auto))?;
    assert_eq!(
        store.get(id)?.manifest.payload,
        PayloadFacts::Copied { len: 5000 }
    );
    assert_eq!(std::fs::read(store.payload_path(id))?, vec![1u8; 5000]);

    // Asking for a hard link that cannot be made is a typed error, and leaves nothing behind.
    let err = store
        .create(upload(&src, LinkMode::HardLink))
        .expect_err("cross-device link must fail");
    assert!(matches!(err.kind(), ErrorKind::Io { .. }), "{err}");
    assert_eq!(store.list(&waybill::Filter::all())?.len(), 1);
    assert!(common::files_below(&t.root().join("staging")).is_empty());
    Ok(())
}

#[test]
fn changed_immutable_source_is_reported() -> TestResult {
    let t = TempStore::new()?;
    let src = t.dir.path().join("a.bin");
    std::fs::write(&src, b"original")?;
    let store = Store::open(t.root())?;
    let id = store.create(upload(&src, LinkMode::HardLink))?;
    assert!(store.open_payload(id).is_ok());
    // The "immutable" file is rewritten in place: same inode, new size and mtime.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&src, b"different bytes")?;
    let err = store
        .open_payload(id)
        .expect_err("a changed source must be reported");
    assert!(
        matches!(err.kind(), ErrorKind::PayloadChanged { id: e, .. } if *e == id),
        "{err}"
    );

    // Swapping our payload for another file is caught by its identity.
    let id2 = store.create(upload(&src, LinkMode::HardLink))?;
    let other = t.dir.path().join("other.bin");
    std::fs::write(&other, b"different bytes")?;
    std::fs::rename(&other, store.payload_path(id2))?;
    let err = store
        .open_payload(id2)
        .expect_err("a swapped payload must be reported");
    assert!(
        matches!(err.kind(), ErrorKind::PayloadChanged { .. }),
        "{err}"
    );
    Ok(())
}

#[test]
fn missing_source_is_a_typed_error_and_leaves_nothing() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let err = store
        .create(upload(&t.dir.path().join("nope"), LinkMode::Auto))
        .expect_err("missing source");
    assert!(matches!(err.kind(), ErrorKind::Io { .. }), "{err}");
    let err = store
        .create(upload(t.dir.path(), LinkMode::Auto))
        .expect_err("directory source");
    assert!(
        matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
        "{err}"
    );
    assert!(common::files_below(&t.root().join("staging")).is_empty());
    assert!(store.list(&waybill::Filter::all())?.is_empty());
    Ok(())
}

#[test]
fn a_batch_naming_a_few_sources_many_times_links_each_member_to_its_own() -> TestResult {
    let t = TempStore::new()?;
    let a = t.dir.path().join("a.jpg");
    let b = t.dir.path().join("b.jpg");
    std::fs::write(&a, vec![1u8; 1000])?;
    std::fs::write(&b, vec![2u8; 2000])?;
    // A symlink to `a` names the same file by another path.
    let via = t.dir.path().join("via-link.jpg");
    std::os::unix::fs::symlink(&a, &via)?;
    let store = Store::open(t.root())?;
    let sources = [&a, &b, &via];
    // More members than one part of a batch, so every member is checked up front too.
    let items = (0..150)
        .map(|i| upload(sources[i % 3], LinkMode::HardLink))
        .collect();
    let ids = store.create_batch(items)?;
    for (i, id) in ids.iter().enumerate() {
        let want = std::fs::metadata(sources[i % 3])?;
        match store.get(*id)?.manifest.payload {
            PayloadFacts::Linked { len, ino, .. } => {
                assert_eq!((len, ino), (want.len(), want.ino()), "member {i}");
            }
            other => panic!("member {i}: expected a link, got {other:?}"),
        }
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut store.open_payload(*id)?, &mut buf)?;
        assert_eq!(buf.len() as u64, want.len(), "member {i}");
    }
    assert_eq!(std::fs::metadata(&a)?.nlink(), 1 + 100);
    assert_eq!(std::fs::metadata(&b)?.nlink(), 1 + 50);
    Ok(())
}
