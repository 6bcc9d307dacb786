//! A batch create of any size holds a bounded number of open files: it builds and renames
//! its members in parts. iOS allows an app 256 open files by default.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use waybill::{Filter, NewTransfer, Store, UploadSource};

const CHILD: &str = "WAYBILL_TEST_OPEN_FILES_CHILD";

#[test]
fn a_batch_of_1000_is_created_with_at_most_128_open_files() {
    if let Some(dir) = std::env::var_os(CHILD) {
        // In the child, under `ulimit -n 128`.
        let store = Store::open(&dir).unwrap();
        let items = (0..1000)
            .map(|i| {
                NewTransfer::upload(
                    format!("https://example.com/{i}"),
                    UploadSource::Bytes(vec![i as u8; 100]),
                )
            })
            .collect();
        let ids = store.create_batch(items).unwrap();
        assert_eq!(ids.len(), 1000);
        assert_eq!(store.list(&Filter::all()).unwrap().len(), 1000);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 128 && exec \"$0\" --exact a_batch_of_1000_is_created_with_at_most_128_open_files --test-threads 1")
        .arg(&exe)
        .env(CHILD, dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran the test"
    );
}
