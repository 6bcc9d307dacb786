//! Helpers shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A throwaway store root inside a fresh temporary directory.
pub struct TempStore {
    pub dir: tempfile::TempDir,
}

impl TempStore {
    pub fn new() -> std::io::Result<Self> {
        Ok(TempStore {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}

/// Every regular file below `dir`, relative to it, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p.strip_prefix(dir).unwrap_or(&p).to_path_buf()),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// Deletes the store's index, as after editing its files behind its back: the index keeps the
/// copy it read, and the next open rebuilds it from the directories.
#[allow(dead_code, reason = "not every test binary edits a store by hand")]
pub fn forget_index(root: &Path) {
    match std::fs::remove_file(root.join("index.redb")) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove index.redb: {e}"),
    }
}
