//! A download's received bytes, resume data and finished file survive: `partial` grows by
//! durable appends (bytes past the durable length are discarded), resume data is replaced
//! atomically, and a finished file is moved in before the call returns.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{TempStore, TestResult};
use waybill::{ErrorKind, NewTransfer, Store, UploadSource};

#[test]
fn partial_bytes_and_resume_data_survive_reopen() -> TestResult {
    let t = TempStore::new()?;
    let id = {
        let store = Store::open(t.root())?;
        let id = store.create(NewTransfer::download("https://example.com/big"))?;
        assert_eq!(store.append_received(id, b"hello ")?, 6);
        assert_eq!(store.append_received(id, b"world")?, 11);
        store.store_resume_data(id, b"resume-v1")?;
        store.store_resume_data(id, b"resume-v2")?;
        id
    };
    let store = Store::open(t.root())?;
    let tr = store.get(id)?;
    assert_eq!(tr.state.partial_len, 11);
    assert_eq!(tr.state.bytes_done, 11);
    assert_eq!(store.resume_data(id)?.as_deref(), Some(&b"resume-v2"[..]));
    let partial = t
        .root()
        .join("transfers")
        .join(id.to_string())
        .join("partial");
    assert_eq!(std::fs::read(&partial)?, b"hello world");

    // Bytes past the durable length (a crash between the data write and the state update)
    // are dropped by the next append.
    let mut f = std::fs::OpenOptions::new().append(true).open(&partial)?;
    std::io::Write::write_all(&mut f, b"GARBAGE")?;
    assert_eq!(store.append_received(id, b"!")?, 12);
    assert_eq!(std::fs::read(&partial)?, b"hello world!");
    Ok(())
}

#[test]
fn finished_file_is_moved_in() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    store.append_received(id, b"part")?;
    store.store_resume_data(id, b"r")?;
    let done = t.dir.path().join("downloaded.tmp");
    std::fs::write(&done, vec![3u8; 4096])?;
    store.accept_download(id, &done)?;
    assert!(!done.exists(), "moved, not copied");
    let tr = store.get(id)?;
    assert!(tr.state.downloaded);
    assert_eq!(tr.state.bytes_done, 4096);
    assert_eq!(std::fs::read(store.payload_path(id))?, vec![3u8; 4096]);
    assert!(
        store.resume_data(id)?.is_none(),
        "resume data no longer needed"
    );
    assert!(store.open_payload(id).is_ok());
    store.complete(id, Some(200))?;
    store.acknowledge(id)?;
    assert!(!store.payload_path(id).exists());
    Ok(())
}

#[test]
fn finished_file_on_another_file_system_is_copied_in() -> TestResult {
    let t = TempStore::new()?;
    let shm = Path::new("/dev/shm");
    if std::fs::metadata(shm).map(|m| m.dev()).ok() == Some(std::fs::metadata(t.dir.path())?.dev())
        || !shm.exists()
    {
        eprintln!("skipped: no second file system (/dev/shm) on this machine");
        return Ok(());
    }
    let other = tempfile::tempdir_in(shm)?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    let done = other.path().join("file");
    std::fs::write(&done, b"cross device body")?;
    store.accept_download(id, &done)?;
    assert!(!done.exists());
    assert_eq!(std::fs::read(store.payload_path(id))?, b"cross device body");
    Ok(())
}

#[test]
fn download_operations_refuse_uploads_and_bad_sources() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let up = store.create(NewTransfer::upload(
        "https://example.com/u",
        UploadSource::Bytes(vec![1]),
    ))?;
    for err in [
        store.append_received(up, b"x").expect_err("upload"),
        store.store_resume_data(up, b"x").expect_err("upload"),
    ] {
        assert!(
            matches!(err.kind(), ErrorKind::InvalidArgument { .. }),
            "{err}"
        );
    }
    let down = store.create(NewTransfer::download("https://example.com/d"))?;
    let big = vec![0u8; (waybill::MAX_RESUME_BYTES + 1) as usize];
    let err = store.store_resume_data(down, &big).expect_err("too big");
    assert!(matches!(err.kind(), ErrorKind::InvalidArgument { .. }));
    let err = store
        .accept_download(down, t.dir.path())
        .expect_err("a directory");
    assert!(matches!(err.kind(), ErrorKind::InvalidArgument { .. }));
    let link = t.dir.path().join("link");
    std::os::unix::fs::symlink("/etc/hostname", &link)?;
    let err = store.accept_download(down, &link).expect_err("a symlink");
    assert!(matches!(err.kind(), ErrorKind::InvalidArgument { .. }));
    Ok(())
}

#[test]
fn lost_partial_bytes_are_never_replaced_by_zeros() -> TestResult {
    let t = TempStore::new()?;
    let store = Store::open(t.root())?;
    let id = store.create(NewTransfer::download("https://example.com/f"))?;
    store.append_received(id, b"0123456789")?;
    let partial = t
        .root()
        .join("transfers")
        .join(id.to_string())
        .join("partial");
    std::fs::remove_file(&partial)?; // lost outside the library's control
    assert_eq!(
        store.append_received(id, b"ab")?,
        2,
        "resumes from what is really there"
    );
    assert_eq!(std::fs::read(&partial)?, b"ab");
    Ok(())
}
