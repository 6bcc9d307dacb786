//! `index.redb` as redb sees it: a `StorageBackend` over the store's file system seam.

use std::sync::Arc;

use crate::Error;
use crate::fs::{Backend, Handle};

/// A crate error as redb's, its source kept.
pub(super) fn db_err(e: Error) -> redb::Error {
    redb::Error::Io(std::io::Error::other(e))
}

/// `index.redb` as redb sees it: pages read, written and synced through the seam, so the
/// simulator and the fault injector see every one. It holds the file's exclusive lock from
/// before redb opens it until redb closes it, as redb's own file backend does.
#[derive(Debug)]
pub(super) struct IndexFile {
    pub(super) b: Arc<dyn Backend>,
    pub(super) h: Handle,
}

impl redb::StorageBackend for IndexFile {
    fn len(&self) -> std::io::Result<u64> {
        self.b.fstat(&self.h).map(|m| m.len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.b.read_exact_at(&self.h, offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.b.set_len(&self.h, len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.b.sync_data(&self.h)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.b.write_at(&self.h, offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.b.unlock(&self.h)
    }
}
