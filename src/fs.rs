//! Every file system primitive the store uses: no-follow opens, bounded reads, owner-only
//! creation, data and directory syncs, rename, link-or-copy, bounded-wait locks.
//!
//! A failed sync poisons the [`Fs`]: data may be gone even if a later sync succeeds, so every
//! later operation fails until the store is reopened.

use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};

use crate::error::{Corruption, Error, ErrorKind, Result};

/// Mode of files the library creates.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of directories the library creates.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Bytes copied per read when a payload is copied.
const COPY_CHUNK: usize = 256 * 1024;

/// The store's file system primitives over one [`Backend`], with the store's poison flag.
#[derive(Debug)]
pub(crate) struct Fs {
    poisoned: Mutex<Option<String>>,
    b: Arc<dyn Backend>,
}

impl Default for Fs {
    fn default() -> Self {
        Fs::new(Arc::new(Real))
    }
}

/// What a directory listing found, without following links.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub name: std::ffi::OsString,
    pub is_dir: bool,
    pub is_symlink: bool,
}

/// How a payload came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    Linked,
    Copied,
}

/// An open file (or directory, for syncing) behind the seam.
#[derive(Debug)]
pub(crate) enum Handle {
    /// A file of the real file system.
    Real(File),
    /// A file of the simulated file system.
    #[cfg(any(test, feature = "fuzzing"))]
    Sim(crate::sim::SimFile),
}

impl Handle {
    /// The std file under a real handle.
    fn real(&self) -> io::Result<&File> {
        match self {
            Handle::Real(f) => Ok(f),
            #[cfg(any(test, feature = "fuzzing"))]
            Handle::Sim(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a simulated file on the real file system",
            )),
        }
    }

    /// A second handle on the same open file (sharing its lock).
    pub(crate) fn try_clone(&self) -> io::Result<Handle> {
        match self {
            Handle::Real(f) => f.try_clone().map(Handle::Real),
            #[cfg(any(test, feature = "fuzzing"))]
            Handle::Sim(s) => Ok(Handle::Sim(s.dup())),
        }
    }

    /// The std file, when this is one (a simulated file is not).
    pub(crate) fn into_file(self) -> io::Result<File> {
        match self {
            Handle::Real(f) => Ok(f),
            #[cfg(any(test, feature = "fuzzing"))]
            Handle::Sim(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a simulated file is not a std file",
            )),
        }
    }
}

/// How to open a file. Never through a symlink unless `follow` is set.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OpenMode {
    pub read: bool,
    pub write: bool,
    /// Create if missing (owner-only).
    pub create: bool,
    /// Create, failing if anything exists.
    pub create_new: bool,
    pub truncate: bool,
    /// Follow a symlink at the last component (only for the app's own files).
    pub follow: bool,
}

/// What kind of entry a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

/// The metadata the store uses.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub kind: EntryType,
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl Meta {
    pub(crate) fn is_file(&self) -> bool {
        self.kind == EntryType::File
    }

    pub(crate) fn is_dir(&self) -> bool {
        self.kind == EntryType::Dir
    }

    pub(crate) fn is_symlink(&self) -> bool {
        self.kind == EntryType::Symlink
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// True when `self` describes the same entry as `before` (a rename or removal by another
    /// process puts another entry, or none, at the path).
    pub(crate) fn same_entry(&self, before: &Meta) -> bool {
        if cfg!(unix) {
            (self.dev, self.ino, self.kind) == (before.dev, before.ino, before.kind)
        } else {
            self.kind == before.kind
        }
    }

    /// The modification time, when it is after the epoch.
    pub(crate) fn modified(&self) -> Option<std::time::SystemTime> {
        let ns = u64::try_from(self.mtime_ns).ok()?;
        std::time::UNIX_EPOCH.checked_add(Duration::from_nanos(ns))
    }

    pub(crate) fn from_std(m: &fs::Metadata) -> Meta {
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            EntryType::Symlink
        } else if ft.is_dir() {
            EntryType::Dir
        } else if ft.is_file() {
            EntryType::File
        } else {
            EntryType::Other
        };
        #[cfg(unix)]
        {
            Meta {
                kind,
                len: m.len(),
                dev: m.dev(),
                ino: m.ino(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime_ns = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0);
            Meta {
                kind,
                len: m.len(),
                dev: 0,
                ino: 0,
                mtime_ns,
            }
        }
    }
}

/// How many files a batch create keeps open at most where it syncs with `syncfs` (Linux,
/// Android): a quarter of the process's soft limit on open files (the rest is the app's),
/// between 32 and 1,024. Larger parts mean fewer `syncfs` calls, each of which waits for
/// everything written on the file system so far.
pub(crate) fn open_file_budget() -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(MAX_OPEN_BUDGET, |n| {
                usize::try_from(n / 4).unwrap_or(MAX_OPEN_BUDGET)
            })
            .clamp(32, MAX_OPEN_BUDGET)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        64
    }
}

/// The most files [`open_file_budget`] grants.
const MAX_OPEN_BUDGET: usize = 1024;

/// The one seam between the store and the file system: every call the store makes goes
/// through it. The default methods are the real file system (std); the simulated file system
/// (tests) overrides all of them, and a fault-injecting backend wraps the real one.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// Opens a file as `o` says.
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle> {
        let mut oo = OpenOptions::new();
        oo.read(o.read)
            .write(o.write)
            .create(o.create)
            .create_new(o.create_new)
            .truncate(o.truncate);
        #[cfg(unix)]
        {
            if o.create || o.create_new {
                oo.mode(FILE_MODE);
            }
            if !o.follow {
                oo.custom_flags(libc::O_NOFOLLOW);
            }
        }
        oo.open(path).map(Handle::Real)
    }

    /// Reads from the current position to the end, at most `max` bytes, appending to `buf`.
    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
        f.real()?.take(max).read_to_end(buf)
    }

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the file), appending to
    /// `buf`. Does not move the file position.
    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
        let f = f.real()?;
        let start = buf.len();
        buf.resize(start + len, 0);
        let mut got = 0;
        while got < len {
            let dst = buf.get_mut(start + got..).unwrap_or_default();
            #[cfg(unix)]
            let n = match f.read_at(dst, offset + got as u64) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            #[cfg(not(unix))]
            let n = {
                use std::io::{Seek, SeekFrom};
                let mut r = f;
                r.seek(SeekFrom::Start(offset + got as u64))?;
                r.read(dst)?
            };
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(start + got);
        Ok(got)
    }

    /// One read of up to `len` bytes at `offset`, appending to `buf`: it may return fewer
    /// before the end of the file (then [`Backend::read_at`] reads on). Saves the second call
    /// a read to the end of a file otherwise makes to find that end.
    fn read_at_once(
        &self,
        f: &Handle,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        #[cfg(unix)]
        if let Ok(file) = f.real() {
            let start = buf.len();
            buf.resize(start + len, 0);
            let r = loop {
                match file.read_at(buf.get_mut(start..).unwrap_or_default(), offset) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            buf.truncate(start + *r.as_ref().unwrap_or(&0));
            return r;
        }
        self.read_at(f, offset, len, buf)
    }

    /// Writes all of `bytes` at `offset`.
    fn write_at(&self, f: &Handle, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let f = f.real()?;
        #[cfg(unix)]
        {
            f.write_all_at(bytes, offset)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut w = f;
            w.seek(SeekFrom::Start(offset))?;
            w.write_all(bytes)
        }
    }

    /// Writes all of `bytes` at the current position (appends, copies).
    fn write(&self, f: &Handle, bytes: &[u8]) -> io::Result<()> {
        f.real()?.write_all(bytes)
    }

    /// Sets a file's length.
    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()> {
        f.real()?.set_len(len)
    }

    /// Syncs a file's data.
    fn sync_data(&self, f: &Handle) -> io::Result<()> {
        f.real()?.sync_data()
    }

    /// Starts writing `f`'s written data back without waiting for it (Linux and Android:
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`, which starts write-back before it drops clean
    /// pages). A hint and nothing more: it makes nothing durable and its failure is ignored.
    /// Started on several new files before the first of them is synced, it lets that one sync
    /// write all their data and the metadata their block allocations changed in one go (one
    /// journal transaction on a journaling file system; on ext4 without a journal, one write
    /// of the inode-table block they share), so the files' own syncs after it find little left
    /// to write (ext4: measured about a fifth off a create, docs/PERFORMANCE.md section 3).
    fn start_write_back(&self, f: &Handle) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Ok(file) = f.real() {
            let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = f;
    }

    /// Whether [`Backend::sync_fs`] makes everything written on `dir`'s file system durable
    /// and reports write-back errors: Linux 5.8 or later (earlier kernels' `syncfs` returns
    /// success regardless), on ext4, xfs, btrfs or f2fs (FUSE and network file systems may
    /// not pass it on), or tmpfs (where nothing is durable anyway).
    fn can_sync_fs(&self, dir: &Handle) -> bool {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            const KNOWN: [i128; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];
            let Ok(f) = dir.real() else {
                return false;
            };
            kernel_at_least(5, 8)
                && rustix::fs::fstatfs(f).is_ok_and(|st| KNOWN.contains(&i128::from(st.f_type)))
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = dir;
            false
        }
    }

    /// Syncs the whole file system holding `dir` (Linux `syncfs`): every file and directory
    /// entry written so far becomes durable.
    fn sync_fs(&self, dir: &Handle) -> io::Result<()> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            rustix::fs::syncfs(dir.real()?)?;
            Ok(())
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = dir;
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }

    /// Opens a directory to sync it.
    fn open_dir(&self, dir: &Path) -> io::Result<Handle> {
        File::open(dir).map(Handle::Real)
    }

    /// Syncs a directory's entries.
    fn sync_dir(&self, dir: &Handle) -> io::Result<()> {
        dir.real()?.sync_all()
    }

    /// Creates a directory with `mode`.
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()> {
        let mut b = fs::DirBuilder::new();
        #[cfg(unix)]
        b.mode(mode);
        #[cfg(not(unix))]
        let _ = mode;
        b.create(path)
    }

    /// Renames an entry.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    /// Creates a hard link.
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        fs::hard_link(src, dst)
    }

    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    /// Removes a directory and everything below it, never following symlinks.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    /// Lists a directory, without following links.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for ent in fs::read_dir(dir)? {
            let ent = ent?;
            let ft = ent.file_type()?;
            out.push(Entry {
                name: ent.file_name(),
                is_dir: ft.is_dir(),
                is_symlink: ft.is_symlink(),
            });
        }
        Ok(out)
    }

    /// Metadata of `path` itself (a symlink is not followed).
    fn lstat(&self, path: &Path) -> io::Result<Meta> {
        fs::symlink_metadata(path).map(|m| Meta::from_std(&m))
    }

    /// Metadata of an open file.
    fn fstat(&self, f: &Handle) -> io::Result<Meta> {
        f.real()?.metadata().map(|m| Meta::from_std(&m))
    }

    /// The absolute path with links resolved (an upload's source file, chosen by the app).
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        fs::canonicalize(path)
    }

    /// Tries an exclusive advisory lock on an open file. Ok(false) when another handle holds it.
    fn try_lock(&self, f: &Handle) -> io::Result<bool> {
        match f.real()?.try_lock() {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Releases the lock [`Backend::try_lock`] took, keeping the file open.
    fn unlock(&self, f: &Handle) -> io::Result<()> {
        f.real()?.unlock()
    }
}

/// The real file system.
#[derive(Debug, Default)]
pub(crate) struct Real;

impl Backend for Real {}

/// True for errors that mean "this file system will not hard-link these two paths".
fn link_refused(e: &io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(
            e.raw_os_error(),
            Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP | libc::EACCES)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        true
    }
}

/// Maps ELOOP from a no-follow open to a typed "symlink in the store" corruption.
fn open_error(op: &'static str, path: &Path, e: io::Error) -> Error {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::ELOOP) {
        return Error::corrupt(
            path,
            Corruption::WrongType {
                found: "symbolic link".into(),
            },
        );
    }
    Error::io(op, path, e)
}

impl Fs {
    pub(crate) fn new(b: Arc<dyn Backend>) -> Self {
        Fs {
            poisoned: Mutex::new(None),
            b,
        }
    }

    /// Fails if an earlier sync failed.
    pub(crate) fn check(&self) -> Result<()> {
        let g = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some(cause) => Err(ErrorKind::Poisoned {
                cause: cause.clone(),
            }
            .into()),
            None => Ok(()),
        }
    }

    fn poison(&self, err: &Error) {
        let mut g = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            tracing::error!(error = %err, "sync failed; the store is poisoned until reopened");
            *g = Some(err.to_string());
        }
    }

    /// Syncs a file's data (and the metadata needed to read it back). Poisons on failure.
    pub(crate) fn sync_data(&self, f: &Handle, path: &Path) -> Result<()> {
        self.b.sync_data(f).map_err(|e| {
            let err = Error::io("sync", path, e);
            self.poison(&err);
            err
        })
    }

    /// Starts writing `f`'s data back without waiting; see [`Backend::start_write_back`].
    pub(crate) fn start_write_back(&self, f: &Handle) {
        self.b.start_write_back(f);
    }

    /// Syncs a directory so that entries created, renamed or removed in it persist.
    pub(crate) fn sync_dir(&self, dir: &Path) -> Result<()> {
        let d = self
            .b
            .open_dir(dir)
            .map_err(|e| Error::io("open directory", dir, e))?;
        self.b.sync_dir(&d).map_err(|e| {
            let err = Error::io("sync directory", dir, e);
            self.poison(&err);
            err
        })
    }

    /// Opens a directory (to sync it, or the file system under it).
    pub(crate) fn open_dir(&self, dir: &Path) -> Result<Handle> {
        self.b
            .open_dir(dir)
            .map_err(|e| Error::io("open directory", dir, e))
    }

    /// Whether [`Fs::sync_fs`] can be relied on for the file system under `dir`.
    pub(crate) fn can_sync_fs(&self, dir: &Handle) -> bool {
        self.b.can_sync_fs(dir)
    }

    /// Syncs the whole file system under the open directory `dir` (named `path`). Poisons on
    /// failure, like any failed sync. Open `dir` before writing what must become durable: the
    /// kernel reports write-back errors that happened after the handle was opened.
    pub(crate) fn sync_fs(&self, dir: &Handle, path: &Path) -> Result<()> {
        self.b.sync_fs(dir).map_err(|e| {
            let err = Error::io("sync file system", path, e);
            self.poison(&err);
            err
        })
    }

    /// Opens an existing file for reading, never through a symlink.
    pub(crate) fn open_read(&self, path: &Path) -> Result<Handle> {
        let o = OpenMode {
            read: true,
            ..OpenMode::default()
        };
        self.b
            .open(path, o)
            .map_err(|e| open_error("open", path, e))
    }

    /// Opens an existing file for reading and writing, never through a symlink.
    pub(crate) fn open_rw(&self, path: &Path) -> Result<Handle> {
        let o = OpenMode {
            read: true,
            write: true,
            ..OpenMode::default()
        };
        self.b
            .open(path, o)
            .map_err(|e| open_error("open", path, e))
    }

    /// Opens (creating owner-only if missing) a file for reading and writing, never through a
    /// symlink. Returns whether it was created.
    pub(crate) fn open_or_create(&self, path: &Path) -> Result<(Handle, bool)> {
        match self.create_new(path) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(eexist()) => Ok((self.open_rw(path)?, false)),
            Err(e) => Err(e),
        }
    }

    /// Creates a new owner-only file; fails if anything exists at `path`.
    pub(crate) fn create_new(&self, path: &Path) -> Result<Handle> {
        let o = OpenMode {
            read: true,
            write: true,
            create_new: true,
            ..OpenMode::default()
        };
        self.b
            .open(path, o)
            .map_err(|e| open_error("create", path, e))
    }

    /// Creates or truncates an owner-only file, never through a symlink.
    pub(crate) fn create_truncate(&self, path: &Path) -> Result<Handle> {
        let o = OpenMode {
            write: true,
            create: true,
            truncate: true,
            ..OpenMode::default()
        };
        self.b
            .open(path, o)
            .map_err(|e| open_error("create", path, e))
    }

    /// Reads a whole file of at most `max` bytes, checking the size before allocating.
    pub(crate) fn read_bounded(&self, path: &Path, max: u64) -> Result<Vec<u8>> {
        let f = self.open_read(path)?;
        let meta = self.b.fstat(&f).map_err(|e| Error::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(Error::corrupt(
                path,
                Corruption::WrongType {
                    found: "not a regular file".into(),
                },
            ));
        }
        if meta.len() > max {
            return Err(Error::corrupt(
                path,
                Corruption::Length {
                    slot: None,
                    found: meta.len(),
                    max,
                },
            ));
        }
        let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        self.b
            .read(&f, max, &mut buf)
            .map_err(|e| Error::io("read", path, e))?;
        Ok(buf)
    }

    /// Reads a two-slot state file as [`crate::format::state::decode_file`] expects it: slot 0's
    /// region, then, if the file reaches it, slot 1's. Each slot is read from its start for as
    /// long as its header says; the unused gap between the slots is never read (reading that
    /// sparse gap made the following `fdatasync` measurably slower on ext4), and is returned
    /// as zeros.
    pub(crate) fn read_state_slots(&self, f: &Handle, path: &Path) -> Result<Vec<u8>> {
        use crate::format::state::{SLOT_CAPACITY, SLOT_HEADER_LEN, slot_len_hint};
        const FIRST: usize = 4096;
        let read = |off: u64, len: usize, buf: &mut Vec<u8>| {
            self.b
                .read_at(f, off, len, buf)
                .map_err(|e| Error::io("read", path, e))
        };
        let mut buf = Vec::with_capacity(SLOT_CAPACITY + FIRST);
        // Slot 0: its first page, then the rest of its body if the header says it is longer.
        let got = read(0, FIRST, &mut buf)?;
        if got == FIRST {
            let want = slot_len_hint(&buf).map_or(SLOT_CAPACITY, |n| {
                (SLOT_HEADER_LEN + n).clamp(FIRST, SLOT_CAPACITY)
            });
            read(FIRST as u64, want - FIRST, &mut buf)?;
        }
        if buf.len() < FIRST {
            return Ok(buf);
        }
        // Slot 1, if the file reaches it: one read, and a second only when what the first
        // returned ends before the slot its header describes.
        let mut s1 = Vec::with_capacity(FIRST);
        let mut got = self
            .b
            .read_at_once(f, SLOT_CAPACITY as u64, FIRST, &mut s1)
            .map_err(|e| Error::io("read", path, e))?;
        let whole = |s: &[u8]| slot_len_hint(s).is_some_and(|n| SLOT_HEADER_LEN + n <= s.len());
        if got > 0 && got < FIRST && !whole(&s1) {
            got += read((SLOT_CAPACITY + got) as u64, FIRST - got, &mut s1)?;
        }
        if got == 0 {
            // The file may still end inside slot 0's region past what was read; what lies
            // there is not part of slot 0's body, so it does not matter.
            return Ok(buf);
        }
        if got == FIRST {
            let want = slot_len_hint(&s1).map_or(SLOT_CAPACITY, |n| {
                (SLOT_HEADER_LEN + n).clamp(FIRST, SLOT_CAPACITY)
            });
            read((SLOT_CAPACITY + FIRST) as u64, want - FIRST, &mut s1)?;
        }
        buf.resize(SLOT_CAPACITY, 0);
        buf.extend_from_slice(&s1);
        Ok(buf)
    }

    /// Reads up to `max` bytes from the start of an open file.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn read_prefix(&self, f: &Handle, path: &Path, max: u64) -> Result<Vec<u8>> {
        // Room for all of it up front, so a small file is read in one call, not in doubling steps.
        let mut buf = Vec::with_capacity(usize::try_from(max.min(64 * 1024)).unwrap_or(0));
        self.b
            .read(f, max, &mut buf)
            .map_err(|e| Error::io("read", path, e))?;
        Ok(buf)
    }

    /// Writes all of `bytes` at `offset`.
    pub(crate) fn write_at(
        &self,
        f: &Handle,
        path: &Path,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        self.b
            .write_at(f, offset, bytes)
            .map_err(|e| Error::io("write", path, e))
    }

    /// Writes all of `bytes` at the current position.
    pub(crate) fn write_all(&self, f: &Handle, path: &Path, bytes: &[u8]) -> Result<()> {
        self.b
            .write(f, bytes)
            .map_err(|e| Error::io("write", path, e))
    }

    /// Sets a file's length.
    pub(crate) fn set_len(&self, f: &Handle, path: &Path, len: u64) -> Result<()> {
        self.b
            .set_len(f, len)
            .map_err(|e| Error::io("truncate", path, e))
    }

    /// Creates an owner-only directory. Returns false if it already existed as a directory.
    pub(crate) fn create_dir(&self, path: &Path) -> Result<bool> {
        match self.b.create_dir(path, DIR_MODE) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let m = self.lstat(path)?;
                if m.is_dir() {
                    Ok(false)
                } else {
                    Err(Error::corrupt(
                        path,
                        Corruption::WrongType {
                            found: "not a directory".into(),
                        },
                    ))
                }
            }
            Err(e) => Err(Error::io("create directory", path, e)),
        }
    }

    /// Metadata of `path` itself (a symlink is not followed).
    pub(crate) fn lstat(&self, path: &Path) -> Result<Meta> {
        self.b.lstat(path).map_err(|e| Error::io("stat", path, e))
    }

    /// Length of an open file.
    pub(crate) fn len(&self, f: &Handle, path: &Path) -> Result<u64> {
        self.b
            .fstat(f)
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", path, e))
    }

    /// The absolute path of an app's file, links resolved, and its metadata.
    pub(crate) fn resolve(&self, path: &Path) -> Result<(std::path::PathBuf, Meta)> {
        let p = self
            .b
            .canonicalize(path)
            .map_err(|e| Error::io("resolve", path, e))?;
        let m = self.lstat(&p)?;
        Ok((p, m))
    }

    /// Renames `from` to `to` (atomically replacing a file at `to`).
    pub(crate) fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        self.b
            .rename(from, to)
            .map_err(|e| Error::io("rename", from, e))
    }

    /// Removes a file; a missing file is not an error.
    pub(crate) fn remove_file(&self, path: &Path) -> Result<()> {
        match self.b.remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
            _ => Ok(()),
        }
    }

    /// Removes a directory tree without following symlinks; a missing tree is not an error.
    pub(crate) fn remove_tree(&self, path: &Path) -> Result<()> {
        let is_dir = match self.b.lstat(path) {
            Ok(m) => m.is_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("stat", path, e)),
        };
        let r = if is_dir {
            self.b.remove_dir_all(path)
        } else {
            self.b.remove_file(path)
        };
        match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
            _ => Ok(()),
        }
    }

    /// Lists a directory without following links. A missing directory lists as empty.
    pub(crate) fn list(&self, dir: &Path) -> Result<Vec<Entry>> {
        let mut out = match self.b.list_dir(dir) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list directory", dir, e)),
        };
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Places `src` at `dst` as a hard link, or as a copy (not yet synced) where linking is
    /// refused and `allow_copy` is set, or always as a copy when `allow_link` is off.
    /// With `open_link` false, a linked file is not opened, and no handle comes back for it
    /// (the caller reads its identity by path, and syncs it otherwise); a copy always comes
    /// back open.
    pub(crate) fn link_or_copy(
        &self,
        src: &Path,
        dst: &Path,
        allow_link: bool,
        allow_copy: bool,
        open_link: bool,
    ) -> Result<(Placed, Option<Handle>)> {
        if allow_link {
            match self.b.hard_link(src, dst) {
                Ok(()) if !open_link => return Ok((Placed::Linked, None)),
                Ok(()) => {
                    let f = self.open_read(dst)?;
                    return Ok((Placed::Linked, Some(f)));
                }
                Err(e) if allow_copy && link_refused(&e) => {
                    tracing::debug!(src = %src.display(), error = %e, "hard link refused; copying");
                }
                Err(e) => return Err(Error::io("hard link", src, e)),
            }
        }
        // The source is the app's file: it may be a symlink the app chose, so it is followed.
        let follow = OpenMode {
            read: true,
            follow: true,
            ..OpenMode::default()
        };
        let from = self
            .b
            .open(src, follow)
            .map_err(|e| Error::io("open", src, e))?;
        let to = self.create_new(dst)?;
        let mut chunk = Vec::with_capacity(COPY_CHUNK);
        loop {
            chunk.clear();
            let n = self
                .b
                .read(&from, COPY_CHUNK as u64, &mut chunk)
                .map_err(|e| Error::io("read", src, e))?;
            if n == 0 {
                break;
            }
            self.write_all(&to, dst, &chunk)?;
        }
        Ok((Placed::Copied, Some(to)))
    }

    /// Takes an exclusive advisory lock, waiting at most `timeout`.
    pub(crate) fn lock(&self, f: &Handle, path: &Path, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if self.try_lock(f, path)? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(ErrorKind::Busy {
                    path: path.to_path_buf(),
                }
                .into());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// True when `path` still names the entry `before` described (a rename or removal by
    /// another process makes it false).
    pub(crate) fn same_entry(&self, path: &Path, before: &Meta) -> Result<bool> {
        match self.b.lstat(path) {
            Ok(m) => Ok(m.same_entry(before)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", path, e)),
        }
    }

    /// Releases the lock [`Fs::lock`] took; the file stays open.
    pub(crate) fn unlock(&self, f: &Handle, path: &Path) -> Result<()> {
        self.b.unlock(f).map_err(|e| Error::io("unlock", path, e))
    }

    /// Tries an exclusive advisory lock once. Returns false if another handle holds it.
    pub(crate) fn try_lock(&self, f: &Handle, path: &Path) -> Result<bool> {
        self.b.try_lock(f).map_err(|e| Error::io("lock", path, e))
    }
}

/// Whether the running Linux kernel is at least `major.minor` (false if it cannot be told).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn kernel_at_least(major: u32, minor: u32) -> bool {
    static VERSION: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    let v = VERSION.get_or_init(|| {
        let u = rustix::system::uname();
        let release = u.release().to_str().ok()?;
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let a = parts.next()?.parse().ok()?;
        let b = parts.next()?.parse().ok()?;
        Some((a, b))
    });
    v.is_some_and(|v| v >= (major, minor))
}

fn eexist() -> i32 {
    #[cfg(unix)]
    {
        libc::EEXIST
    }
    #[cfg(not(unix))]
    {
        80
    }
}

impl Fs {
    /// Device, inode, size and modification time (ns) of an open file.
    pub(crate) fn identity(&self, f: &Handle, path: &Path) -> Result<(u64, u64, u64, i128)> {
        let m = self.b.fstat(f).map_err(|e| Error::io("stat", path, e))?;
        Ok((m.dev, m.ino, m.len, m.mtime_ns))
    }
}

/// True when the error is "the file already exists".
pub(crate) fn is_exists(e: &Error) -> bool {
    e.raw_os_error() == Some(eexist())
}

/// True when the error is "cross-device rename".
pub(crate) fn is_cross_device(e: &Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::EXDEV)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading a state file slot by slot decodes exactly as reading all of it does, whatever
    /// the file holds: one slot, two, long bodies, garbage headers, files ending anywhere.
    #[test]
    fn state_slots_read_apart_decode_like_the_whole_file() -> Result<()> {
        use crate::format::state::{self as st, SLOT_CAPACITY};
        use crate::transfer::State;
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let fs = Fs::default();
        let mut small = State::new();
        small.bytes_done = 7;
        let mut long = State::new();
        long.last_error = Some("e".repeat(9000));
        let a = st::encode_slot(3, &small)?;
        let b = st::encode_slot(4, &long)?;
        assert!(b.len() > 4096, "the long body crosses the first page");
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), a.clone(), b.clone()];
        for (s0, s1) in [(&a, &b), (&b, &a), (&a, &a)] {
            let mut f = s0.clone();
            f.resize(SLOT_CAPACITY, 0);
            f.extend_from_slice(s1);
            cases.push(f.clone());
            // Cut off inside slot 1, and with slot 1's header damaged.
            cases.push(f.get(..SLOT_CAPACITY + 30).unwrap_or_default().to_vec());
            let mut g = f.clone();
            if let Some(x) = g.get_mut(SLOT_CAPACITY) {
                *x ^= 0xff;
            }
            cases.push(g);
        }
        // Garbage slot 0 reaching into the gap; a file ending between the slots.
        let mut g = vec![0xabu8; 9000];
        cases.push(g.clone());
        g.resize(SLOT_CAPACITY, 0);
        g.extend_from_slice(&a);
        cases.push(g);
        for (i, bytes) in cases.iter().enumerate() {
            let path = d.path().join(format!("state{i}"));
            std::fs::write(&path, bytes).map_err(|e| Error::io("write", &path, e))?;
            let h = fs.open_read(&path)?;
            let read = fs.read_state_slots(&h, &path)?;
            let whole = st::decode_file(bytes);
            let apart = st::decode_file(&read);
            let seqs = |s: &st::Slots| {
                s.slot
                    .iter()
                    .map(|r| r.as_ref().ok().map(|x| (x.seq, x.state.clone())))
                    .collect::<Vec<_>>()
            };
            assert_eq!(seqs(&whole), seqs(&apart), "case {i}");
            assert_eq!(
                bytes.len() > SLOT_CAPACITY,
                read.len() > SLOT_CAPACITY,
                "case {i}: whether slot 1 was ever written"
            );
        }
        Ok(())
    }

    #[test]
    fn link_refusals_fall_back_to_copy() {
        for errno in [libc::EXDEV, libc::EPERM, libc::EMLINK] {
            assert!(link_refused(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!link_refused(&io::Error::from_raw_os_error(libc::ENOENT)));
        assert!(!link_refused(&io::Error::from_raw_os_error(libc::ENOSPC)));
    }

    #[test]
    fn a_failed_sync_poisons_until_reopened() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let fs = Fs::default();
        fs.check()?;
        // Syncing a directory that does not exist fails to open it: not a sync failure.
        assert!(fs.sync_dir(&d.path().join("missing")).is_err());
        fs.check()?;
        fs.poison(&Error::io("sync", d.path(), io::Error::other("injected")));
        let err = fs.check().expect_err("poisoned");
        assert!(matches!(err.kind(), ErrorKind::Poisoned { cause } if cause.contains("injected")));
        assert!(err.to_string().contains("reopen"));
        Ok(())
    }

    #[test]
    fn symlinks_are_never_opened() -> Result<()> {
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let target = d.path().join("target");
        fs::write(&target, b"x").map_err(|e| Error::io("write", &target, e))?;
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).map_err(|e| Error::io("symlink", &link, e))?;
        let fs = Fs::default();
        let err = fs
            .read_bounded(&link, 10)
            .expect_err("symlink must not open");
        assert!(err.is_corrupt(), "{err}");
        assert!(fs.create_truncate(&link).is_err());
        assert_eq!(
            fs::read(&target).map_err(|e| Error::io("read", &target, e))?,
            b"x"
        );
        Ok(())
    }
}
