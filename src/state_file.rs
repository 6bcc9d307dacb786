//! The two-slot state file (FORMAT.md §1.4, §3.2), its one owner: locking it (and checking that its
//! directory did not move meanwhile), the cache of files kept open between updates, reading
//! the newest valid slot, writing the next one. Nothing else outside `format::state` touches
//! the slot encoding.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Corruption, Error, ErrorKind, Result};
use crate::format::state::{self as state_fmt, SLOT_CAPACITY, SLOT_HEADER_LEN, slot_len_hint};
use crate::fs::{Fs, Handle, Meta};
use crate::layout::STATE;
use crate::transfer::{State, TransferId};

/// How many state files a store keeps open between updates (file descriptors are a limited
/// resource in an app: 256 by default on iOS).
const KEPT_OPEN: usize = 16;

/// A store's state files: how long to wait for a lock, and the files kept open (unlocked)
/// after an update, oldest first, each with the metadata its directory had then. The next
/// update of the same transfer locks the open file and checks the directory instead of
/// opening the file again.
#[derive(Debug)]
pub(crate) struct StateFiles {
    lock_timeout: Duration,
    kept: Mutex<VecDeque<Kept>>,
}

/// A state file kept open between updates.
#[derive(Debug)]
struct Kept {
    id: TransferId,
    file: Handle,
    /// The transfer directory's metadata when the file was last locked in it.
    dir: Meta,
}

/// A state file locked for a change.
pub(crate) struct Locked {
    pub(crate) file: Handle,
    pub(crate) path: PathBuf,
    pub(crate) dir: PathBuf,
    /// Whether the file was created (its directory then needs a sync).
    pub(crate) created: bool,
    /// The directory's metadata, checked after the lock was taken.
    dir_meta: Meta,
}

/// What a locked state file holds: its bytes, the state of its newest valid slot (rebuilt from
/// nothing when neither slot is valid) and which slot that is, with its sequence number.
pub(crate) struct Slots {
    pub(crate) state: State,
    pub(crate) newest: Option<(usize, u64)>,
    bytes: Vec<u8>,
}

impl Slots {
    /// The newest valid slot's bytes (header and body), or nothing.
    pub(crate) fn newest_bytes(&self) -> Vec<u8> {
        newest_slot(&self.bytes)
    }
}

/// True when `now` is the directory `then` described: the same inode, not changed since. Any
/// change to the directory (a file added or removed in it) makes it false, as does the name
/// now being a different directory that happens to reuse the inode number.
fn same_dir(now: &Meta, then: &Meta) -> bool {
    cfg!(unix)
        && now.is_dir()
        && (now.dev, now.ino, now.mtime_ns) == (then.dev, then.ino, then.mtime_ns)
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StateFiles {
    pub(crate) fn new(lock_timeout: Duration) -> StateFiles {
        StateFiles {
            lock_timeout,
            kept: Mutex::new(VecDeque::new()),
        }
    }

    /// Opens the state file in the directory `checked` returns (`dir` when all is well) and
    /// takes its lock, then checks that the directory is still the one the file was opened
    /// in: a removal or quarantine in another process may have moved it while this one
    /// waited.
    ///
    /// The check looks at the directory, never at the state file: on Linux 6.13 and later a
    /// `stat` of a file makes its next write take a fine-grained timestamp, which dirties the
    /// inode and made every durable update about 1.5× as slow on ext4. Nothing replaces a
    /// state file inside its directory; removal and quarantine move the whole directory.
    pub(crate) fn lock(
        &self,
        fs: &Fs,
        dir: &Path,
        checked: impl Fn() -> Result<(PathBuf, Meta)>,
    ) -> Result<Locked> {
        self.lock_waiting(fs, dir, checked, self.lock_timeout)
    }

    /// [`StateFiles::lock`], waiting at most `wait` for the lock.
    fn lock_waiting(
        &self,
        fs: &Fs,
        dir: &Path,
        checked: impl Fn() -> Result<(PathBuf, Meta)>,
        wait: Duration,
    ) -> Result<Locked> {
        for _ in 0..3 {
            let (dir, before) = checked()?;
            let path = dir.join(STATE);
            let (file, created) = match fs.open_rw(&path) {
                Ok(f) => (f, false),
                Err(e) if e.is_not_found_io() => fs.open_or_create(&path)?,
                Err(e) => return Err(e),
            };
            fs.lock(&file, &path, wait)?;
            match fs.lstat(&dir) {
                Ok(m) if m.same_entry(&before) => {
                    return Ok(Locked {
                        file,
                        path,
                        dir,
                        created,
                        dir_meta: m,
                    });
                }
                Err(e) if !e.is_not_found_io() => return Err(e),
                // Moved or replaced while we waited: look again (NotFound if it is gone).
                _ => {}
            }
        }
        Err(ErrorKind::Busy {
            path: dir.join(STATE),
        }
        .into())
    }

    /// [`StateFiles::lock`] for an update: first tries the file kept open by the last update
    /// of `id` (a lock, and a check that its directory is unchanged, instead of an open).
    pub(crate) fn lock_for_update(
        &self,
        fs: &Fs,
        id: TransferId,
        dir: &Path,
        checked: impl Fn() -> Result<(PathBuf, Meta)>,
    ) -> Result<Locked> {
        self.lock_for_update_waiting(fs, id, dir, checked, self.lock_timeout)
    }

    /// [`StateFiles::lock_for_update`] without waiting: `Busy` at once when another handle
    /// holds the lock (a group commit's parallel locking, which must never wait out of order).
    pub(crate) fn try_lock_for_update(
        &self,
        fs: &Fs,
        id: TransferId,
        dir: &Path,
        checked: impl Fn() -> Result<(PathBuf, Meta)>,
    ) -> Result<Locked> {
        self.lock_for_update_waiting(fs, id, dir, checked, Duration::ZERO)
    }

    fn lock_for_update_waiting(
        &self,
        fs: &Fs,
        id: TransferId,
        dir: &Path,
        checked: impl Fn() -> Result<(PathBuf, Meta)>,
        wait: Duration,
    ) -> Result<Locked> {
        let kept = {
            let mut g = guard(&self.kept);
            g.iter().position(|o| o.id == id).and_then(|i| g.remove(i))
        };
        if let Some(o) = kept {
            let path = dir.join(STATE);
            match fs.lock(&o.file, &path, wait) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Busy { .. }) => {
                    // Held elsewhere: kept open for the next try (it holds no lock).
                    let mut g = guard(&self.kept);
                    g.push_back(o);
                    while g.len() > KEPT_OPEN {
                        g.pop_front();
                    }
                    return Err(e);
                }
                // Any other failure: this handle is dropped and the file opened afresh.
                Err(_) => return self.lock_waiting(fs, dir, checked, wait),
            }
            if let Ok(m) = fs.lstat(dir)
                && same_dir(&m, &o.dir)
            {
                return Ok(Locked {
                    file: o.file,
                    path,
                    dir: dir.to_path_buf(),
                    created: false,
                    dir_meta: m,
                });
            }
            // Moved, replaced or changed since: open it afresh (dropping `o` unlocks it).
        }
        self.lock_waiting(fs, dir, checked, wait)
    }

    /// Unlocks a state file after an update and keeps it open for the next one.
    pub(crate) fn keep(&self, fs: &Fs, id: TransferId, l: Locked) {
        if !cfg!(unix) || fs.unlock(&l.file, &l.path).is_err() {
            return; // Dropping it closes the file, which releases the lock.
        }
        let mut g = guard(&self.kept);
        g.push_back(Kept {
            id,
            file: l.file,
            dir: l.dir_meta,
        });
        while g.len() > KEPT_OPEN {
            g.pop_front();
        }
    }

    /// Closes the state file kept open for `id`, if any (its directory is going away).
    pub(crate) fn forget(&self, id: TransferId) {
        guard(&self.kept).retain(|o| o.id != id);
    }
}

impl Locked {
    /// Reads the file's slots and decodes the newest valid one.
    pub(crate) fn read(&self, fs: &Fs, id: TransferId) -> Result<Slots> {
        let bytes = read_slots(fs, &self.file, &self.path)?;
        let (state, newest) = decode(id, &self.path, &bytes);
        Ok(Slots {
            state,
            newest,
            bytes,
        })
    }

    /// Writes `state` into the slot after `newest` (the older one) with the next sequence
    /// number, and makes it durable: one data sync of the file, and of its directory when the
    /// file was just created. Returns the slot's bytes.
    pub(crate) fn write_next(
        &self,
        fs: &Fs,
        newest: Option<(usize, u64)>,
        state: &State,
    ) -> Result<Vec<u8>> {
        let enc = self.put_next(fs, newest, state)?;
        fs.sync_data(&self.file, &self.path)?;
        if self.created {
            fs.sync_dir(&self.dir)?;
        }
        Ok(enc)
    }

    /// [`Locked::write_next`] without its syncs, for a group commit (FORMAT.md §3.9): the
    /// caller keeps the lock until one shared flush has made the slot durable, so no other
    /// writer reads this unflushed slot as the newest and overwrites the only durable one.
    pub(crate) fn put_next(
        &self,
        fs: &Fs,
        newest: Option<(usize, u64)>,
        state: &State,
    ) -> Result<Vec<u8>> {
        let (slot, seq) = match newest {
            Some((i, seq)) => (
                1 - i,
                seq.checked_add(1).ok_or_else(|| {
                    Error::corrupt(
                        &self.path,
                        Corruption::Length {
                            slot: Some(i as u8),
                            found: seq,
                            max: u64::MAX - 1,
                        },
                    )
                })?,
            ),
            None => (0, 1),
        };
        let enc = state_fmt::encode_slot(seq, state)?;
        fs.write_at(&self.file, &self.path, (slot * SLOT_CAPACITY) as u64, &enc)?;
        Ok(enc)
    }
}

/// The first slot of a new transfer's state file, written at offset 0 when it is built.
pub(crate) fn first_slot() -> Result<Vec<u8>> {
    state_fmt::encode_slot(1, &State::new())
}

/// Whether `state` fits in a slot (whatever its sequence number).
pub(crate) fn check_fits(state: &State) -> Result<()> {
    state_fmt::encode_slot(u64::MAX, state).map(|_| ())
}

/// Reads a whole state file without its lock and returns its newest valid slot's state, or
/// a typed corruption naming the file when neither slot is valid.
pub(crate) fn read_newest(fs: &Fs, path: &Path) -> Result<State> {
    let bytes = fs.read_bounded(path, state_fmt::MAX_FILE)?;
    let slots = state_fmt::decode_file(&bytes);
    state_fmt::newest_or_corrupt(path, &slots).map(|(_, slot)| slot.state)
}

/// Decodes a state file's bytes; when no slot is valid, the state is rebuilt from nothing
/// (flagged `rebuilt`) and no slot is named.
pub(crate) fn decode(id: TransferId, path: &Path, bytes: &[u8]) -> (State, Option<(usize, u64)>) {
    let slots = state_fmt::decode_file(bytes);
    match state_fmt::newest_or_corrupt(path, &slots) {
        Ok((i, slot)) => {
            // Slot 1 of a new transfer was never written (the file ends before it); any
            // other invalid slot is a torn or damaged write that we just read past.
            let other = 1 - i;
            let written = bytes.len() > other * SLOT_CAPACITY;
            if let Some(Err(c)) = slots.slot.get(other)
                && written
            {
                tracing::warn!(transfer = %id, slot = other, reason = %c, "state slot fallback: using the other slot");
            }
            (slot.state, Some((i, slot.seq)))
        }
        Err(_) => {
            let mut s = State::new();
            s.rebuilt = true;
            (s, None)
        }
    }
}

/// Reads a two-slot state file as [`crate::format::state::decode_file`] expects it: slot 0's
/// region, then, if the file reaches it, slot 1's. Each slot is read from its start for as
/// long as its header says; the unused gap between the slots is never read (reading that
/// sparse gap made the following `fdatasync` measurably slower on ext4), and is returned
/// as zeros.
pub(crate) fn read_slots(fs: &Fs, f: &Handle, path: &Path) -> Result<Vec<u8>> {
    const FIRST: usize = 4096;
    let read = |off: u64, len: usize, buf: &mut Vec<u8>| fs.read_at(f, path, off, len, buf);
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
    let mut got = fs.read_at_once(f, path, SLOT_CAPACITY as u64, FIRST, &mut s1)?;
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

/// The newest valid slot of a state file's bytes (header and body), or nothing.
pub(crate) fn newest_slot(bytes: &[u8]) -> Vec<u8> {
    let slots = state_fmt::decode_file(bytes);
    let Some((i, _)) = slots.newest() else {
        return Vec::new();
    };
    let region = bytes.get(i * SLOT_CAPACITY..).unwrap_or_default();
    let len = slot_len_hint(region).unwrap_or(0) + SLOT_HEADER_LEN;
    region.get(..len).unwrap_or_default().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// Reading a state file slot by slot decodes exactly as reading all of it does, whatever
    /// the file holds: one slot, two, long bodies, garbage headers, files ending anywhere.
    #[test]
    fn state_slots_read_apart_decode_like_the_whole_file() -> Result<()> {
        use crate::format::state::{self as st, SLOT_CAPACITY};
        use crate::transfer::State;
        let d = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
        let fs = Fs::real();
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
            let read = read_slots(&fs, &h, &path)?;
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
}
