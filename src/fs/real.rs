//! The real file system: std, with `O_NOFOLLOW` opens, owner-only modes and, on Linux and
//! Android, `syncfs(2)` and write-back hints through rustix.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::path::Path;

#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};

use super::{Backend, BootMark, Entry, FILE_MODE, Handle, Meta, OpenMode};

/// The real file system.
#[derive(Debug, Default)]
pub(crate) struct Real;

impl Backend for Real {
    /// Opens a file as `o` says.
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle> {
        let mut oo = OpenOptions::new();
        oo.read(o.read)
            .write(o.write)
            .append(o.append)
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
        oo.open(path).map(Handle::of_file)
    }

    /// Reads from the current position to the end, at most `max` bytes, appending to `buf`.
    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
        f.file()?.take(max).read_to_end(buf)
    }

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the file), appending to
    /// `buf`. Does not move the file position.
    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
        let f = f.file()?;
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
        if let Ok(file) = f.file() {
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
        let f = f.file()?;
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
        f.file()?.write_all(bytes)
    }

    /// Sets a file's length.
    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()> {
        f.file()?.set_len(len)
    }

    /// Syncs a file's data.
    fn sync_data(&self, f: &Handle) -> io::Result<()> {
        f.file()?.sync_data()
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
        if let Ok(file) = f.file() {
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
            let Ok(f) = dir.file() else {
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
            rustix::fs::syncfs(dir.file()?)?;
            Ok(())
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = dir;
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }

    fn has_full_sync(&self) -> bool {
        cfg!(target_vendor = "apple")
    }

    fn sync_to_drive(&self, f: &Handle) -> io::Result<()> {
        #[cfg(target_vendor = "apple")]
        {
            rustix::fs::fsync(f.file()?)?;
            Ok(())
        }
        #[cfg(not(target_vendor = "apple"))]
        {
            f.file()?.sync_data()
        }
    }

    fn full_sync(&self, f: &Handle) -> io::Result<()> {
        #[cfg(target_vendor = "apple")]
        {
            rustix::fs::fcntl_fullfsync(f.file()?)?;
            Ok(())
        }
        #[cfg(not(target_vendor = "apple"))]
        {
            let _ = f;
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }

    /// Opens a directory to sync it.
    fn open_dir(&self, dir: &Path) -> io::Result<Handle> {
        File::open(dir).map(Handle::of_file)
    }

    /// Syncs a directory's entries.
    fn sync_dir(&self, dir: &Handle) -> io::Result<()> {
        dir.file()?.sync_all()
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
        f.file()?.metadata().map(|m| Meta::from_std(&m))
    }

    /// The absolute path with links resolved (an upload's source file, chosen by the app).
    fn canonicalize(&self, path: &Path) -> io::Result<std::path::PathBuf> {
        fs::canonicalize(path)
    }

    /// Tries an exclusive advisory lock on an open file. Ok(false) when another handle holds it.
    fn try_lock(&self, f: &Handle) -> io::Result<bool> {
        match f.file()?.try_lock() {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    /// Releases the lock [`Backend::try_lock`] took, keeping the file open.
    fn unlock(&self, f: &Handle) -> io::Result<()> {
        f.file()?.unlock()
    }

    fn read_exact_at(&self, f: &Handle, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let f = f.file()?;
        #[cfg(unix)]
        {
            f.read_exact_at(out, offset)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Seek, SeekFrom};
            let mut r = f;
            r.seek(SeekFrom::Start(offset))?;
            r.read_exact(out)
        }
    }

    fn try_lock_shared(&self, f: &Handle) -> io::Result<bool> {
        match f.file()?.try_lock_shared() {
            Ok(()) => Ok(true),
            Err(TryLockError::WouldBlock) => Ok(false),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }

    fn dup(&self, f: &Handle) -> io::Result<Handle> {
        f.file()?.try_clone().map(Handle::of_file)
    }

    fn boot(&self) -> Option<BootMark> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Ok(s) = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            && let Ok(u) = uuid::Uuid::parse_str(s.trim())
        {
            return Some(BootMark::Id(*u.as_bytes()));
        }
        #[cfg(unix)]
        {
            // The wall clock minus the time since boot (a clock that keeps counting in sleep).
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let since = rustix::time::ClockId::Boottime;
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            let since = rustix::time::ClockId::Monotonic;
            let up = rustix::time::clock_gettime(since);
            let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
            let ms = |t: rustix::time::Timespec| {
                t.tv_sec
                    .saturating_mul(1000)
                    .saturating_add(t.tv_nsec / 1_000_000)
            };
            Some(BootMark::Since(ms(now).saturating_sub(ms(up))))
        }
        #[cfg(not(unix))]
        None
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
