//! A backend for tests that watch or steer single calls: every call goes to the real file
//! system after a hook has seen it, and the hook may fail it instead.

use std::io;
use std::path::{Path, PathBuf};

use crate::fs::{Backend, BootMark, Entry, Handle, Meta, OpenMode, Real};

/// One call, as the hook sees it.
#[derive(Debug)]
pub(crate) struct Call<'a> {
    /// The seam method's name (`"sync_data"`, `"rename"`, …).
    pub name: &'static str,
    /// The open file it works on, if any.
    pub handle: Option<&'a Handle>,
}

/// The real file system, with `hook` shown every call first; an error from the hook is the
/// call's result.
pub(crate) struct Spy<F> {
    hook: F,
    inner: std::sync::Arc<dyn Backend>,
}

impl<F> std::fmt::Debug for Spy<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spy")
    }
}

impl<F: Fn(&Call<'_>) -> io::Result<()> + Send + Sync> Spy<F> {
    pub(crate) fn new(hook: F) -> Self {
        Spy::over(std::sync::Arc::new(Real), hook)
    }

    /// A spy over another backend (the simulated file system).
    pub(crate) fn over(inner: std::sync::Arc<dyn Backend>, hook: F) -> Self {
        Spy { hook, inner }
    }

    fn see(&self, name: &'static str, handle: Option<&Handle>) -> io::Result<()> {
        (self.hook)(&Call { name, handle })
    }
}

impl<F: Fn(&Call<'_>) -> io::Result<()> + Send + Sync> Backend for Spy<F> {
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle> {
        self.see("open", None)?;
        self.inner.open(path, o)
    }
    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.see("read", Some(f))?;
        self.inner.read(f, max, buf)
    }
    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.see("read_at", Some(f))?;
        self.inner.read_at(f, offset, len, buf)
    }
    fn read_at_once(
        &self,
        f: &Handle,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        self.see("read_at_once", Some(f))?;
        self.inner.read_at_once(f, offset, len, buf)
    }
    fn read_exact_at(&self, f: &Handle, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.see("read_exact_at", Some(f))?;
        self.inner.read_exact_at(f, offset, out)
    }
    fn write_at(&self, f: &Handle, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.see("write_at", Some(f))?;
        self.inner.write_at(f, offset, bytes)
    }
    fn write(&self, f: &Handle, bytes: &[u8]) -> io::Result<()> {
        self.see("write", Some(f))?;
        self.inner.write(f, bytes)
    }
    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()> {
        self.see("set_len", Some(f))?;
        self.inner.set_len(f, len)
    }
    fn has_full_sync(&self) -> bool {
        self.inner.has_full_sync()
    }
    fn sync_to_drive(&self, f: &Handle) -> io::Result<()> {
        self.see("sync_to_drive", Some(f))?;
        self.inner.sync_to_drive(f)
    }
    fn full_sync(&self, f: &Handle) -> io::Result<()> {
        self.see("full_sync", Some(f))?;
        self.inner.full_sync(f)
    }
    fn sync_data(&self, f: &Handle) -> io::Result<()> {
        self.see("sync_data", Some(f))?;
        self.inner.sync_data(f)
    }
    fn start_write_back(&self, f: &Handle) {
        if self.see("start_write_back", Some(f)).is_ok() {
            self.inner.start_write_back(f);
        }
    }
    fn can_sync_fs(&self, dir: &Handle) -> bool {
        self.inner.can_sync_fs(dir)
    }
    fn sync_fs(&self, dir: &Handle) -> io::Result<()> {
        self.see("sync_fs", Some(dir))?;
        self.inner.sync_fs(dir)
    }
    fn open_dir(&self, dir: &Path) -> io::Result<Handle> {
        self.see("open_dir", None)?;
        self.inner.open_dir(dir)
    }
    fn sync_dir(&self, dir: &Handle) -> io::Result<()> {
        self.see("sync_dir", Some(dir))?;
        self.inner.sync_dir(dir)
    }
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        self.see("create_dir", None)?;
        self.inner.create_dir(path, mode)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.see("rename", None)?;
        self.inner.rename(from, to)
    }
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.see("hard_link", None)?;
        self.inner.hard_link(src, dst)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.see("remove_file", None)?;
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.see("remove_dir_all", None)?;
        self.inner.remove_dir_all(path)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        self.see("list_dir", None)?;
        self.inner.list_dir(dir)
    }
    fn lstat(&self, path: &Path) -> io::Result<Meta> {
        self.see("lstat", None)?;
        self.inner.lstat(path)
    }
    fn fstat(&self, f: &Handle) -> io::Result<Meta> {
        self.see("fstat", Some(f))?;
        self.inner.fstat(f)
    }
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.see("canonicalize", None)?;
        self.inner.canonicalize(path)
    }
    fn try_lock(&self, f: &Handle) -> io::Result<bool> {
        self.see("try_lock", Some(f))?;
        self.inner.try_lock(f)
    }
    fn try_lock_shared(&self, f: &Handle) -> io::Result<bool> {
        self.see("try_lock_shared", Some(f))?;
        self.inner.try_lock_shared(f)
    }
    fn unlock(&self, f: &Handle) -> io::Result<()> {
        self.see("unlock", Some(f))?;
        self.inner.unlock(f)
    }
    fn dup(&self, f: &Handle) -> io::Result<Handle> {
        self.see("dup", Some(f))?;
        self.inner.dup(f)
    }
    fn boot(&self) -> Option<BootMark> {
        self.inner.boot()
    }
}
