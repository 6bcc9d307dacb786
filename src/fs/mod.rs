//! Every file system primitive the store uses: no-follow opens, bounded reads, owner-only
//! creation, data and directory syncs, rename, link-or-copy, bounded-wait locks.
//!
//! A failed sync poisons the [`Fs`]: data may be gone even if a later sync succeeds, so every
//! later operation fails until the store is reopened.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(unix)]
use std::os::unix::fs::MetadataExt;

mod real;

pub(crate) use real::Real;

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
    /// Set once the volume refused `F_FULLFSYNC` (see [`Fs::sync_group`]).
    weakened: std::sync::atomic::AtomicBool,
    b: Arc<dyn Backend>,
}

/// How [`Fs::sync_group`] made a group of written files durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupSync {
    /// One sync of the whole file system (Linux, Android).
    FileSystem,
    /// Each file sent to the drive, then one flush of the drive's cache (Apple platforms).
    DriveCache,
    /// The volume refused to flush the drive's cache: each file was sent to the drive, where
    /// a power loss may still lose it (weaker durability, reported, not poisoned).
    DriveOnly,
    /// One data sync per file (elsewhere).
    EachFile,
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

/// An open file (or directory, for syncing) behind the seam. Opaque above it: only the
/// backend that opened it looks inside.
pub(crate) struct Handle(Repr);

enum Repr {
    /// A file of the real file system.
    File(File),
    /// Another backend's open file (the test kit's).
    #[cfg(any(test, feature = "fuzzing"))]
    Other(Box<dyn std::any::Any + Send + Sync>),
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::File(file) => f.debug_tuple("Handle").field(file).finish(),
            #[cfg(any(test, feature = "fuzzing"))]
            Repr::Other(_) => f.write_str("Handle(..)"),
        }
    }
}

impl Handle {
    /// A handle on a std file.
    pub(crate) fn of_file(f: File) -> Handle {
        Handle(Repr::File(f))
    }

    /// A handle on another backend's open file.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn of_other<T: std::any::Any + Send + Sync>(t: T) -> Handle {
        Handle(Repr::Other(Box::new(t)))
    }

    /// The std file under a real handle.
    pub(crate) fn file(&self) -> io::Result<&File> {
        match &self.0 {
            Repr::File(f) => Ok(f),
            #[cfg(any(test, feature = "fuzzing"))]
            Repr::Other(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not a file of the real file system",
            )),
        }
    }

    /// Another backend's open file, when it is a `T`.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn other<T: std::any::Any>(&self) -> io::Result<&T> {
        match &self.0 {
            Repr::Other(b) => b.downcast_ref::<T>().ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "another backend's handle")
            }),
            Repr::File(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a file of the real file system",
            )),
        }
    }

    /// The std file, when this is one.
    pub(crate) fn into_file(self) -> io::Result<File> {
        match self.0 {
            Repr::File(f) => Ok(f),
            #[cfg(any(test, feature = "fuzzing"))]
            Repr::Other(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "not a file of the real file system",
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
    /// Every write lands at the end of the file, in one piece (the journal).
    pub append: bool,
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
    budget_up_to(MAX_OPEN_BUDGET)
}

/// How many state files a group commit keeps open and locked at most for one shared flush: a
/// quarter of the soft limit on open files, between 32 and 4,096 (one file per transfer, so
/// larger parts than a batch create's; each part costs one `syncfs`).
pub(crate) fn group_file_budget() -> usize {
    budget_up_to(4 * MAX_OPEN_BUDGET)
}

/// A quarter of the process's soft limit on open files, between 32 and `max` (64 where the
/// limit is not read).
fn budget_up_to(max: usize) -> usize {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .map_or(max, |n| usize::try_from(n / 4).unwrap_or(max))
            .clamp(32, max)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = max;
        64
    }
}

/// The most files [`open_file_budget`] grants.
const MAX_OPEN_BUDGET: usize = 1024;

/// The one seam between the store and the file system: every byte the crate reads or writes,
/// the index's and the journal's included, goes through it. [`Real`] is the real file system;
/// the test kit's simulated file system and fault injector implement it too. It has no default
/// methods, so a method added later cannot quietly run real-file code against another
/// backend's handle. It reports I/O facts (`io::Error`s); the layers above decide what they
/// mean.
pub(crate) trait Backend: Send + Sync + fmt::Debug {
    /// Opens a file as `o` says.
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle>;

    /// Reads from the current position to the end, at most `max` bytes, appending to `buf`.
    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the file), appending to
    /// `buf`. Does not move the file position.
    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize>;

    /// One read of up to `len` bytes at `offset`, appending to `buf`: it may return fewer
    /// before the end of the file (then [`Backend::read_at`] reads on). Saves the second call
    /// a read to the end of a file otherwise makes to find that end.
    fn read_at_once(
        &self,
        f: &Handle,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize>;

    /// Fills `out` from `offset`; an error when the file ends first (the index's pages).
    fn read_exact_at(&self, f: &Handle, offset: u64, out: &mut [u8]) -> io::Result<()>;

    /// Writes all of `bytes` at `offset`.
    fn write_at(&self, f: &Handle, offset: u64, bytes: &[u8]) -> io::Result<()>;

    /// Writes all of `bytes` at the current position (appends, copies); at the end of the
    /// file, in one piece, when the file was opened with [`OpenMode::append`].
    fn write(&self, f: &Handle, bytes: &[u8]) -> io::Result<()>;

    /// Sets a file's length.
    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()>;

    /// Syncs a file's data.
    fn sync_data(&self, f: &Handle) -> io::Result<()>;

    /// Starts writing `f`'s written data back without waiting for it (Linux and Android:
    /// `posix_fadvise(POSIX_FADV_DONTNEED)`, which starts write-back before it drops clean
    /// pages). A hint and nothing more: it makes nothing durable and its failure is ignored.
    /// Started on several new files before the first of them is synced, it lets that one sync
    /// write all their data and the metadata their block allocations changed in one go (one
    /// journal transaction on a journaling file system; on ext4 without a journal, one write
    /// of the inode-table block they share), so the files' own syncs after it find little left
    /// to write (ext4: measured about a fifth off a create, docs/PERFORMANCE.md section 3).
    fn start_write_back(&self, f: &Handle);

    /// Whether [`Backend::sync_fs`] makes everything written on `dir`'s file system durable
    /// and reports write-back errors: Linux 5.8 or later (earlier kernels' `syncfs` returns
    /// success regardless), on ext4, xfs, btrfs or f2fs (FUSE and network file systems may
    /// not pass it on), or tmpfs (where nothing is durable anyway).
    fn can_sync_fs(&self, dir: &Handle) -> bool;

    /// Syncs the whole file system holding `dir` (Linux `syncfs`): every file and directory
    /// entry written so far becomes durable.
    fn sync_fs(&self, dir: &Handle) -> io::Result<()>;

    /// Whether this system's data syncs can stop at the drive, leaving its write cache for one
    /// [`Backend::full_sync`] to flush for many files at once (Apple platforms: `fsync` sends a
    /// file's data to the drive, `F_FULLFSYNC` flushes the drive's whole cache).
    fn has_full_sync(&self) -> bool;

    /// Sends a file's written data to the drive without flushing the drive's cache (Apple:
    /// `fsync`). Not durable on its own: a [`Backend::full_sync`] after it makes it so. Where
    /// [`Backend::has_full_sync`] is false, the same as [`Backend::sync_data`].
    fn sync_to_drive(&self, f: &Handle) -> io::Result<()>;

    /// Flushes the drive's whole cache through `f` (Apple: `fcntl(F_FULLFSYNC)`): `f`'s own
    /// written data and everything earlier [`Backend::sync_to_drive`] calls sent become
    /// durable. Fails with `ENOTSUP`, `EINVAL` or `ENOTTY` on a volume that refuses it (some
    /// network and FUSE mounts), and with `Unsupported` where [`Backend::has_full_sync`] is false.
    fn full_sync(&self, f: &Handle) -> io::Result<()>;

    /// Opens a directory to sync it.
    fn open_dir(&self, dir: &Path) -> io::Result<Handle>;

    /// Syncs a directory's entries.
    fn sync_dir(&self, dir: &Handle) -> io::Result<()>;

    /// Creates a directory with `mode`.
    fn create_dir(&self, path: &Path, mode: u32) -> io::Result<()>;

    /// Renames an entry.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Creates a hard link.
    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()>;

    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Removes a directory and everything below it, never following symlinks.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Lists a directory, without following links.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<Entry>>;

    /// Metadata of `path` itself (a symlink is not followed).
    fn lstat(&self, path: &Path) -> io::Result<Meta>;

    /// Metadata of an open file.
    fn fstat(&self, f: &Handle) -> io::Result<Meta>;

    /// The absolute path with links resolved (an upload's source file, chosen by the app).
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf>;

    /// Tries an exclusive advisory lock on an open file. Ok(false) when another handle holds it
    /// (shared or exclusive). A handle that holds a shared lock converts it.
    fn try_lock(&self, f: &Handle) -> io::Result<bool>;

    /// Tries a shared advisory lock on an open file. Ok(false) when another handle holds it
    /// exclusively. A handle that holds the exclusive lock converts it.
    fn try_lock_shared(&self, f: &Handle) -> io::Result<bool>;

    /// Releases the lock this handle took, keeping the file open. Closing the last handle on
    /// an open file releases its lock too.
    fn unlock(&self, f: &Handle) -> io::Result<()>;

    /// A second handle on the same open file (sharing its position and its lock).
    fn dup(&self, f: &Handle) -> io::Result<Handle>;

    /// This boot of the system the files live on, where it can be told: a journal written in
    /// another boot may have lost unsynced frames in a power loss.
    fn boot(&self) -> Option<BootMark>;
}

/// Which boot of the system a process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BootMark {
    /// The kernel's boot id (Linux, Android).
    #[cfg_attr(
        not(any(target_os = "linux", target_os = "android", test, feature = "fuzzing")),
        expect(dead_code, reason = "only Linux and Android report a boot id")
    )]
    Id([u8; 16]),
    /// The boot time in milliseconds since the Unix epoch, estimated from the wall clock and a
    /// clock that counts from boot (other systems).
    Since(i64),
}

/// True for errors that mean "this volume does not flush the drive's cache on request".
fn full_sync_refused(e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::Unsupported {
        return true;
    }
    #[cfg(unix)]
    {
        // ENOTSUP and EOPNOTSUPP are one number on Linux, two on Apple platforms.
        e.raw_os_error().is_some_and(|c| {
            [libc::ENOTSUP, libc::EOPNOTSUPP, libc::EINVAL, libc::ENOTTY].contains(&c)
        })
    }
    #[cfg(not(unix))]
    {
        false
    }
}

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
    /// The real file system.
    pub(crate) fn real() -> Self {
        Fs::new(Arc::new(Real))
    }

    /// The backend under this `Fs` (the journal and the index keep their own `Fs` over it:
    /// their failures never poison the store).
    pub(crate) fn backend(&self) -> Arc<dyn Backend> {
        Arc::clone(&self.b)
    }

    pub(crate) fn new(b: Arc<dyn Backend>) -> Self {
        Fs {
            poisoned: Mutex::new(None),
            weakened: std::sync::atomic::AtomicBool::new(false),
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

    /// Poisons the store with `err` (a sync failed, or a flush could not be completed).
    pub(crate) fn poison(&self, err: &Error) {
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

    /// Makes the files of a group commit durable together, every one of them written before
    /// this call: with `sync_fs` (a directory opened before the writes, and its path) one
    /// `syncfs`; on Apple platforms each file sent to the drive (`fsync`) and one
    /// `F_FULLFSYNC`, which flushes the drive's cache for all of them; elsewhere one data sync
    /// per file. Any failure poisons. A volume that refuses `F_FULLFSYNC` is not a failure:
    /// the files are sent to the drive, the store reports weaker durability
    /// ([`Fs::weakened`]) and this returns [`GroupSync::DriveOnly`].
    pub(crate) fn sync_group(
        &self,
        sync_fs: Option<(&Handle, &Path)>,
        files: &[(&Handle, &Path)],
    ) -> Result<GroupSync> {
        if let Some((dir, path)) = sync_fs {
            self.sync_fs(dir, path)?;
            return Ok(GroupSync::FileSystem);
        }
        let Some(((last, last_path), rest)) = files.split_last() else {
            return Ok(GroupSync::EachFile);
        };
        if !self.b.has_full_sync() {
            for (f, path) in files {
                self.sync_data(f, path)?;
            }
            return Ok(GroupSync::EachFile);
        }
        let fail = |op, path: &Path, e| {
            let err = Error::io(op, path, e);
            self.poison(&err);
            err
        };
        for (f, path) in rest {
            self.b
                .sync_to_drive(f)
                .map_err(|e| fail("send to the drive", path, e))?;
        }
        match self.b.full_sync(last) {
            Ok(()) => Ok(GroupSync::DriveCache),
            Err(e) if full_sync_refused(&e) => {
                self.b
                    .sync_to_drive(last)
                    .map_err(|e| fail("send to the drive", last_path, e))?;
                if !self
                    .weakened
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(path = %last_path.display(), error = %e, "the volume refused F_FULLFSYNC: changes reach the drive but may sit in its cache through a power loss");
                }
                Ok(GroupSync::DriveOnly)
            }
            Err(e) => Err(fail("flush the drive's cache", last_path, e)),
        }
    }

    /// Whether the volume refused to flush the drive's cache (`F_FULLFSYNC`) since this store
    /// was opened: changes since were sent to the drive, which may lose them in a power loss.
    pub(crate) fn weakened(&self) -> bool {
        self.weakened.load(std::sync::atomic::Ordering::Relaxed)
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

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the file), appending to
    /// `buf`.
    pub(crate) fn read_at(
        &self,
        f: &Handle,
        path: &Path,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<usize> {
        self.b
            .read_at(f, offset, len, buf)
            .map_err(|e| Error::io("read", path, e))
    }

    /// One read of up to `len` bytes at `offset`; see [`Backend::read_at_once`].
    pub(crate) fn read_at_once(
        &self,
        f: &Handle,
        path: &Path,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> Result<usize> {
        self.b
            .read_at_once(f, offset, len, buf)
            .map_err(|e| Error::io("read", path, e))
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
        if self.lock_within(f, path, false, timeout)? {
            return Ok(());
        }
        Err(ErrorKind::Busy {
            path: path.to_path_buf(),
        }
        .into())
    }

    /// Takes a shared (`shared`) or exclusive advisory lock, waiting at most `timeout`.
    /// Returns false when it is still held elsewhere then.
    pub(crate) fn lock_within(
        &self,
        f: &Handle,
        path: &Path,
        shared: bool,
        timeout: Duration,
    ) -> Result<bool> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            let got = if shared {
                self.b.try_lock_shared(f)
            } else {
                self.b.try_lock(f)
            };
            if got.map_err(|e| Error::io("lock", path, e))? {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Opens a file for appending and reading (creating it owner-only when `create`), never
    /// through a symlink: every write lands at its end in one piece.
    pub(crate) fn open_append(&self, path: &Path, create: bool) -> Result<Handle> {
        let o = OpenMode {
            read: true,
            write: true,
            append: true,
            create,
            ..OpenMode::default()
        };
        self.b
            .open(path, o)
            .map_err(|e| open_error("open", path, e))
    }

    /// A second handle on the same open file, sharing its lock.
    pub(crate) fn dup(&self, f: &Handle, path: &Path) -> Result<Handle> {
        self.b
            .dup(f)
            .map_err(|e| Error::io("duplicate handle", path, e))
    }

    /// This boot of the system, where the backend can tell.
    pub(crate) fn boot(&self) -> Option<BootMark> {
        self.b.boot()
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
        let fs = Fs::real();
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
        let fs = Fs::real();
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
