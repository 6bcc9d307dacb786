//! A simulated file system in memory that can lose power.
//!
//! For every file it keeps the durable content apart from writes not yet synced, and every
//! directory entry change (create, link, rename, unlink) stays pending until its directory is
//! synced. A crash keeps any subset of the pending operations (see [`Snapshot::crash`]): a
//! kept entry change drags along the earlier pending changes of the same name, and the last
//! kept write may be torn at a 512-byte sector, its tail zeros or garbage. Everything is
//! decided by seeds, so a failing case replays from its seed.
//!
//! The model follows SQLite's crash VFS and LevelDB's fault-injection environment, with
//! directory entries handled as ALICE (OSDI 2014) found real file systems do: only a sync of
//! the directory makes them durable.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fs::{Backend, BootMark, Entry, EntryType, Handle, Meta, OpenMode};

/// Sector size for torn writes.
pub(crate) const SECTOR: u64 = 512;
/// Inode number of `/`.
const ROOT: u64 = 1;
/// Every simulated file has this modification time (ns since the epoch): one second after it,
/// so staging debris always counts as old.
const MTIME_NS: i128 = 1_000_000_000;

#[derive(Debug, Clone)]
enum Node {
    File(Data),
    Dir(BTreeMap<OsString, u64>),
}

/// A whole file system: inodes by number. Inodes are allocated in every image at once, so an
/// inode whose entry was lost is simply unreachable.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    nodes: HashMap<u64, Node>,
}

impl Image {
    fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir(BTreeMap::new()));
        Image { nodes }
    }

    fn dir(&self, ino: u64) -> Option<&BTreeMap<OsString, u64>> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Option<&mut BTreeMap<OsString, u64>> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn file_mut(&mut self, ino: u64) -> Option<&mut Data> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(d)) => Some(d),
            _ => None,
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { ino, off, bytes } => {
                if let Some(d) = self.file_mut(*ino) {
                    d.write(usize::try_from(*off).unwrap_or(usize::MAX), bytes);
                }
            }
            Op::SetLen { ino, len } => {
                if let Some(d) = self.file_mut(*ino) {
                    d.set_len(usize::try_from(*len).unwrap_or(usize::MAX));
                }
            }
            Op::Link { dir, name, ino } => {
                if let Some(d) = self.dir_mut(*dir) {
                    d.insert(name.clone(), *ino);
                }
            }
            Op::Unlink { dir, name, ino } => {
                if let Some(d) = self.dir_mut(*dir)
                    && d.get(name) == Some(ino)
                {
                    d.remove(name);
                }
            }
            Op::Rename {
                from,
                from_name,
                to,
                to_name,
                ino,
            } => {
                if let Some(d) = self.dir_mut(*from)
                    && d.get(from_name) == Some(ino)
                {
                    d.remove(from_name);
                }
                if let Some(d) = self.dir_mut(*to) {
                    d.insert(to_name.clone(), *ino);
                }
            }
        }
    }

    /// Looks up `path` (absolute) from `/`.
    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut cur = ROOT;
        for c in path.components() {
            match c {
                Component::RootDir => cur = ROOT,
                Component::Normal(name) => {
                    let d = self.dir(cur).ok_or_else(|| errno(libc::ENOTDIR))?;
                    cur = *d.get(name).ok_or_else(|| errno(libc::ENOENT))?;
                }
                Component::CurDir => {}
                _ => return Err(errno(libc::EINVAL)),
            }
        }
        Ok(cur)
    }

    /// The directory holding `path` and the last component's name.
    fn parent(&self, path: &Path) -> io::Result<(u64, OsString)> {
        let name = path.file_name().ok_or_else(|| errno(libc::EINVAL))?;
        let parent = path.parent().ok_or_else(|| errno(libc::EINVAL))?;
        let dir = self.lookup(parent)?;
        if self.dir(dir).is_none() {
            return Err(errno(libc::ENOTDIR));
        }
        Ok((dir, name.to_os_string()))
    }

    /// The directory holding `path`, the name, and the inode the name points at.
    fn entry(&self, path: &Path) -> io::Result<(u64, OsString, u64)> {
        let (dir, name) = self.parent(path)?;
        let ino = self
            .dir(dir)
            .and_then(|d| d.get(&name))
            .copied()
            .ok_or_else(|| errno(libc::ENOENT))?;
        Ok((dir, name, ino))
    }

    fn meta(&self, ino: u64) -> io::Result<Meta> {
        let (kind, len) = match self.nodes.get(&ino) {
            Some(Node::File(d)) => (EntryType::File, d.len() as u64),
            Some(Node::Dir(d)) => (EntryType::Dir, d.len() as u64),
            None => return Err(errno(libc::ENOENT)),
        };
        Ok(Meta {
            kind,
            len,
            dev: 1,
            ino,
            mtime_ns: MTIME_NS,
        })
    }

    /// A hash of everything reachable from `/` (names, kinds, contents, and which names share
    /// an inode), so equal trees hash equal whatever unreachable inodes they carry.
    pub(crate) fn tree_hash(&self) -> u64 {
        self.tree_hash_but(None)
    }

    /// [`Image::tree_hash`], without the content of the file at `skip` (for a check that never
    /// reads it).
    pub(crate) fn tree_hash_but(&self, skip: Option<&Path>) -> u64 {
        let skip = skip.and_then(|p| self.lookup(p).ok());
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            ino.hash(&mut h);
            match self.nodes.get(&ino) {
                Some(Node::File(_)) if Some(ino) == skip => 4u8.hash(&mut h),
                Some(Node::File(d)) => {
                    // A file's content by its length and CRC (a large file, the index, is
                    // hashed at the speed of crc32fast, not of a debug build's SipHash).
                    0u8.hash(&mut h);
                    d.len().hash(&mut h);
                    d.crc().hash(&mut h);
                }
                Some(Node::Dir(d)) => {
                    1u8.hash(&mut h);
                    for (name, child) in d {
                        name.hash(&mut h);
                        child.hash(&mut h);
                        stack.push(*child);
                    }
                    2u8.hash(&mut h);
                }
                None => 3u8.hash(&mut h),
            }
        }
        h.finish()
    }

    /// The names in the directory at `path` (empty when it is missing).
    pub(crate) fn names(&self, path: &Path) -> Vec<String> {
        self.lookup(path)
            .ok()
            .and_then(|ino| self.dir(ino))
            .map(|d| d.keys().map(|k| k.to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

/// Bytes per chunk of a simulated file.
const CHUNK: usize = 16 * 1024;

/// A simulated file's bytes, in chunks shared between images until one of them writes to a
/// chunk (the index's file is a megabyte, written a page at a time); a chunk never written
/// reads as zeros.
#[derive(Debug, Clone, Default)]
struct Data {
    len: usize,
    chunks: Vec<Option<Arc<Vec<u8>>>>,
}

impl Data {
    fn from_bytes(b: &[u8]) -> Data {
        let mut d = Data::default();
        d.write(0, b);
        d
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Sets the length: past the old end reads as zeros, and so does a later growth past a cut.
    fn set_len(&mut self, len: usize) {
        if len < self.len {
            let keep = len.div_ceil(CHUNK);
            self.chunks.truncate(keep);
            if let Some(Some(c)) = self.chunks.last_mut() {
                let from = len - (keep - 1) * CHUNK;
                if let Some(tail) = Arc::make_mut(c).get_mut(from..) {
                    tail.fill(0);
                }
            }
        }
        self.chunks.resize(len.div_ceil(CHUNK), None);
        self.len = len;
    }

    fn write(&mut self, off: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            // As `pwrite` of nothing: the length does not change.
            return;
        }
        let end = off.saturating_add(bytes.len());
        if end > self.len {
            self.set_len(end);
        }
        let mut at = off;
        while at < end {
            let (k, inner) = (at / CHUNK, at % CHUNK);
            let n = (CHUNK - inner).min(end - at);
            if let Some(slot) = self.chunks.get_mut(k) {
                let c = slot.get_or_insert_with(|| Arc::new(vec![0; CHUNK]));
                if let (Some(dst), Some(src)) = (
                    Arc::make_mut(c).get_mut(inner..inner + n),
                    bytes.get(at - off..at - off + n),
                ) {
                    dst.copy_from_slice(src);
                }
            }
            at += n;
        }
    }

    /// Appends to `out` up to `len` bytes from `off`; returns how many.
    fn read(&self, off: usize, len: usize, out: &mut Vec<u8>) -> usize {
        const ZEROS: [u8; CHUNK] = [0; CHUNK];
        let end = off.saturating_add(len).min(self.len);
        let mut at = off;
        while at < end {
            let (k, inner) = (at / CHUNK, at % CHUNK);
            let n = (CHUNK - inner).min(end - at);
            let src = match self.chunks.get(k) {
                Some(Some(c)) => c.get(inner..inner + n),
                _ => ZEROS.get(..n),
            };
            out.extend_from_slice(src.unwrap_or_default());
            at += n;
        }
        end.saturating_sub(off)
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.read(0, self.len, &mut out);
        out
    }

    /// The CRC of the content (a chunk never written counts as zeros).
    fn crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(CHUNK);
        for k in 0..self.chunks.len() {
            buf.clear();
            self.read(k * CHUNK, CHUNK, &mut buf);
            h.update(&buf);
        }
        h.finalize()
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// One change to the file system, pending until a sync makes it durable.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Write {
        ino: u64,
        off: u64,
        bytes: Vec<u8>,
    },
    SetLen {
        ino: u64,
        len: u64,
    },
    Link {
        dir: u64,
        name: OsString,
        ino: u64,
    },
    Unlink {
        dir: u64,
        name: OsString,
        ino: u64,
    },
    Rename {
        from: u64,
        from_name: OsString,
        to: u64,
        to_name: OsString,
        ino: u64,
    },
}

impl Op {
    /// The directory entries this operation changes.
    fn keys(&self) -> Vec<(u64, &OsStr)> {
        match self {
            Op::Write { .. } | Op::SetLen { .. } => Vec::new(),
            Op::Link { dir, name, .. } | Op::Unlink { dir, name, .. } => vec![(*dir, name)],
            Op::Rename {
                from,
                from_name,
                to,
                to_name,
                ..
            } => vec![(*from, from_name), (*to, to_name)],
        }
    }

    fn data_of(&self) -> Option<u64> {
        match self {
            Op::Write { ino, .. } | Op::SetLen { ino, .. } => Some(*ino),
            _ => None,
        }
    }
}

/// Marks, for every marked operation, the earlier pending ones that change the same directory
/// entry: an entry's changes reach the disk in the order they were made.
fn close_over_names(pending: &[Arc<Op>], marked: &mut [bool]) {
    for i in (0..pending.len()).rev() {
        if !marked.get(i).copied().unwrap_or(false) {
            continue;
        }
        let Some(op) = pending.get(i) else { continue };
        let keys = op.keys();
        if keys.is_empty() {
            continue;
        }
        for j in 0..i {
            let Some(earlier) = pending.get(j) else {
                continue;
            };
            if earlier.keys().iter().any(|k| keys.contains(k))
                && let Some(m) = marked.get_mut(j)
            {
                *m = true;
            }
        }
    }
}

/// The crash-relevant state at one moment: what is durable and what is still pending.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) durable: Arc<Image>,
    pub(crate) pending: Vec<Arc<Op>>,
    /// The seam call about to run (or "end" after the operation).
    pub(crate) call: &'static str,
}

/// How the last kept write lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tear {
    /// Whole.
    None,
    /// From sector `k` of the write on, zeros.
    Zeros(u64),
    /// From sector `k` of the write on, garbage from a seed.
    Garbage(u64, u64),
}

impl Snapshot {
    /// The disk after a power loss that kept the pending operations whose bit is set in `keep`
    /// (plus those they depend on), with the last kept write landing as `tear` says.
    pub(crate) fn crash(&self, keep: &[bool], tear: Tear) -> Image {
        let mut marked: Vec<bool> = (0..self.pending.len())
            .map(|i| keep.get(i).copied().unwrap_or(false))
            .collect();
        close_over_names(&self.pending, &mut marked);
        let last_write = (0..self.pending.len()).rev().find(|&i| {
            marked.get(i).copied().unwrap_or(false)
                && matches!(self.pending.get(i).map(|o| &**o), Some(Op::Write { bytes, .. }) if !bytes.is_empty())
        });
        let mut img = (*self.durable).clone();
        for (i, op) in self.pending.iter().enumerate() {
            if !marked.get(i).copied().unwrap_or(false) {
                continue;
            }
            match (&**op, tear) {
                (Op::Write { ino, off, bytes }, Tear::Zeros(k) | Tear::Garbage(k, _))
                    if Some(i) == last_write =>
                {
                    let torn = torn_bytes(*off, bytes, tear, k);
                    img.apply(&Op::Write {
                        ino: *ino,
                        off: *off,
                        bytes: torn,
                    });
                }
                _ => img.apply(op),
            }
        }
        img
    }

    /// The distinct kept-sets after the dependency closure: all of them when there are at
    /// most `2^max_bits`, otherwise `samples` drawn from `seed` (plus none and all).
    pub(crate) fn keep_sets(&self, max_bits: u32, samples: usize, seed: u64) -> Vec<Vec<bool>> {
        let n = self.pending.len();
        let mut out: Vec<Vec<bool>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut push = |mut m: Vec<bool>| {
            close_over_names(&self.pending, &mut m);
            if seen.insert(m.clone()) {
                out.push(m);
            }
        };
        if n as u32 <= max_bits {
            for bits in 0u64..(1u64 << n) {
                push((0..n).map(|i| bits >> i & 1 == 1).collect());
            }
        } else {
            let mut rng = Rng(seed);
            push(vec![false; n]);
            push(vec![true; n]);
            for _ in 0..samples {
                push((0..n).map(|_| rng.next() & 1 == 1).collect());
            }
        }
        out
    }

    /// The sectors of the last write `keep` keeps, if any: how many a tear can start at.
    pub(crate) fn last_write_sectors(&self, keep: &[bool]) -> Option<u64> {
        let mut marked = keep.to_vec();
        close_over_names(&self.pending, &mut marked);
        (0..self.pending.len()).rev().find_map(|i| {
            if !marked.get(i).copied().unwrap_or(false) {
                return None;
            }
            match self.pending.get(i).map(|o| &**o) {
                Some(Op::Write { off, bytes, .. }) if !bytes.is_empty() => {
                    let first = off / SECTOR;
                    let last = (off + bytes.len() as u64 - 1) / SECTOR;
                    Some(last - first + 1)
                }
                _ => None,
            }
        })
    }
}

/// The bytes of a write torn from its `k`-th sector on.
fn torn_bytes(off: u64, bytes: &[u8], tear: Tear, k: u64) -> Vec<u8> {
    let cut = ((off / SECTOR + k) * SECTOR).max(off);
    let keep = usize::try_from(cut - off)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let mut out = bytes.get(..keep).unwrap_or_default().to_vec();
    let rest = bytes.len() - keep;
    match tear {
        Tear::Garbage(_, seed) => {
            let mut rng = Rng(seed);
            out.extend((0..rest).map(|_| rng.next() as u8));
        }
        _ => out.resize(bytes.len(), 0),
    }
    out
}

/// splitmix64: small, seedable, good enough to pick crash states.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// Where a test's choices come from: a seeded [`Rng`], or a fuzzer's input.
pub(crate) trait Draw {
    /// A choice from the whole `u64` range.
    fn next(&mut self) -> u64;

    /// A choice in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    /// `len` bytes of content.
    fn fill(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

impl Draw for Rng {
    fn next(&mut self) -> u64 {
        Rng::next(self)
    }
}

/// A fuzzer's input read as a stream of choices. Small choices take one or two bytes; content
/// is expanded from eight. Once the input runs out, the choices go on from a generator seeded
/// by the input's length, so that a caller's loop always ends; [`Input::exhausted`] tells.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    data: &'a [u8],
    at: usize,
    rest: Rng,
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input {
            data,
            at: 0,
            rest: Rng(data.len() as u64),
        }
    }

    /// Whether every byte has been used.
    pub(crate) fn exhausted(&self) -> bool {
        self.at >= self.data.len()
    }

    fn take(&mut self, n: usize) -> u64 {
        let mut v = 0u64;
        for k in 0..n {
            let b = match self.data.get(self.at) {
                Some(&b) => {
                    self.at += 1;
                    b
                }
                None => self.rest.next() as u8,
            };
            v |= u64::from(b) << (8 * k);
        }
        v
    }

    /// A byte string of at most `max` bytes taken whole from the input (length byte first).
    pub(crate) fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.take(2) as usize) % (max + 1);
        let end = self.at.saturating_add(len).min(self.data.len());
        let out = self.data.get(self.at..end).unwrap_or_default().to_vec();
        self.at = end;
        out
    }
}

impl Draw for Input<'_> {
    fn next(&mut self) -> u64 {
        self.take(8)
    }

    fn below(&mut self, n: u64) -> u64 {
        match n {
            0 => 0,
            1..=256 => self.take(1) % n,
            257..=65_536 => self.take(2) % n,
            _ => self.take(8) % n,
        }
    }

    fn fill(&mut self, len: usize) -> Vec<u8> {
        let mut r = Rng(self.take(8));
        (0..len).map(|_| r.next() as u8).collect()
    }
}

#[derive(Debug)]
struct State {
    live: Image,
    durable: Arc<Image>,
    pending: Vec<Arc<Op>>,
    next_ino: u64,
    /// When set, a snapshot is taken before every call that changes anything.
    recording: Option<Vec<Snapshot>>,
    /// Calls so far, and the one that fails with EIO (if any) and which call it was.
    calls: u64,
    fail_at: Option<u64>,
    failed: Option<&'static str>,
    /// Flushes as Apple platforms do: no `syncfs`; `fsync` sends a file's data to the drive
    /// (still lost in a power loss), `F_FULLFSYNC` flushes the drive's cache.
    apple: bool,
    /// The volume refuses `F_FULLFSYNC` (Apple mode).
    refuse_full_sync: bool,
    /// Pending operations sent to the drive's cache (by their `Arc`'s address).
    sent: std::collections::HashSet<usize>,
}

/// The simulated file system, shared by the store handles opened on it.
#[derive(Debug)]
pub(crate) struct Sim {
    st: Mutex<State>,
    locks: Locks,
    next_desc: AtomicU64,
    boot: u64,
}

/// Who holds an inode's advisory lock: as `flock(2)`, per open file (description), so two
/// opens of one file in one process conflict like two processes do.
#[derive(Debug, Default)]
struct LockHolders {
    exclusive: Option<u64>,
    shared: std::collections::BTreeSet<u64>,
}

type Locks = Arc<Mutex<HashMap<u64, LockHolders>>>;

/// One open of a simulated file: its position, its mode, and the lock it holds (released when
/// its last handle is dropped, as closing a file does).
#[derive(Debug)]
struct Desc {
    id: u64,
    ino: u64,
    pos: AtomicU64,
    append: bool,
    locks: Locks,
}

impl Drop for Desc {
    fn drop(&mut self) {
        release(&self.locks, self.ino, self.id);
    }
}

fn release(locks: &Locks, ino: u64, id: u64) {
    let mut l = locks.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = l.get_mut(&ino) {
        if h.exclusive == Some(id) {
            h.exclusive = None;
        }
        h.shared.remove(&id);
        if h.exclusive.is_none() && h.shared.is_empty() {
            l.remove(&ino);
        }
    }
}

/// An open simulated file.
#[derive(Debug, Clone)]
pub(crate) struct SimFile(Arc<Desc>);

fn sim(h: &Handle) -> io::Result<&SimFile> {
    h.other::<SimFile>()
}

/// A boot of a simulated machine: every [`Sim`] made fresh or from a power loss's image is a
/// new one; [`Sim::after_kill`] keeps its boot.
static BOOTS: AtomicU64 = AtomicU64::new(1);

impl Sim {
    /// An empty file system, everything durable.
    pub(crate) fn new() -> Arc<Sim> {
        Sim::from_image(Image::new())
    }

    /// A file system whose disk is `img`, after a power loss: a new boot, nothing pending.
    pub(crate) fn from_image(img: Image) -> Arc<Sim> {
        Sim::in_boot(img, BOOTS.fetch_add(1, Ordering::SeqCst))
    }

    /// The file system `img` a process killed on `before` left (every write it made is there):
    /// the same boot, nothing pending, no lock held.
    pub(crate) fn after_kill(img: Image, before: &Sim) -> Arc<Sim> {
        Sim::in_boot(img, before.boot)
    }

    fn in_boot(img: Image, boot: u64) -> Arc<Sim> {
        let next_ino = img.nodes.keys().max().copied().unwrap_or(ROOT) + 1;
        Arc::new(Sim {
            st: Mutex::new(State {
                live: img.clone(),
                durable: Arc::new(img),
                pending: Vec::new(),
                next_ino,
                recording: None,
                calls: 0,
                fail_at: None,
                failed: None,
                apple: false,
                refuse_full_sync: false,
                sent: std::collections::HashSet::new(),
            }),
            locks: Arc::default(),
            next_desc: AtomicU64::new(1),
            boot,
        })
    }

    fn handle(&self, ino: u64, append: bool) -> Handle {
        Handle::of_other(SimFile(Arc::new(Desc {
            id: self.next_desc.fetch_add(1, Ordering::SeqCst),
            ino,
            pos: AtomicU64::new(0),
            append,
            locks: Arc::clone(&self.locks),
        })))
    }

    fn lock(&self, f: &Handle, shared: bool) -> io::Result<bool> {
        let d = &sim(f)?.0;
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let h = l.entry(d.ino).or_default();
        let others_shared = h.shared.iter().any(|&s| s != d.id);
        let other_exclusive = h.exclusive.is_some_and(|e| e != d.id);
        if other_exclusive || (!shared && others_shared) {
            return Ok(false);
        }
        if shared {
            h.exclusive = None;
            h.shared.insert(d.id);
        } else {
            h.shared.remove(&d.id);
            h.exclusive = Some(d.id);
        }
        Ok(true)
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flushes as Apple platforms do from now on (see `State::apple`); with `refuse`, the
    /// volume refuses `F_FULLFSYNC`.
    pub(crate) fn apple(&self, refuse: bool) {
        let mut st = self.st();
        st.apple = true;
        st.refuse_full_sync = refuse;
    }

    /// Starts taking a snapshot before every changing call.
    pub(crate) fn record(&self) {
        self.st().recording = Some(Vec::new());
    }

    /// Stops recording and returns the snapshots, with a last one for "now".
    pub(crate) fn take_snapshots(&self) -> Vec<Snapshot> {
        let mut st = self.st();
        let mut v = st.recording.take().unwrap_or_default();
        v.push(Snapshot {
            durable: Arc::clone(&st.durable),
            pending: st.pending.clone(),
            call: "end",
        });
        v
    }

    /// The state right now, as a crash would find it.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.st();
        Snapshot {
            durable: Arc::clone(&st.durable),
            pending: st.pending.clone(),
            call: "now",
        }
    }

    /// Makes the `n`-th call from now fail with EIO.
    pub(crate) fn fail_call(&self, n: u64) {
        let mut st = self.st();
        st.fail_at = Some(st.calls + n);
        st.failed = None;
    }

    /// Calls made so far.
    pub(crate) fn calls(&self) -> u64 {
        self.st().calls
    }

    /// Takes back a [`Sim::fail_call`] whose call was not reached.
    pub(crate) fn disarm(&self) {
        self.st().fail_at = None;
    }

    /// The call that failed, if the chosen one was reached.
    pub(crate) fn failed(&self) -> Option<&'static str> {
        self.st().failed
    }

    /// What a reader sees now (written, synced or not).
    pub(crate) fn live(&self) -> Image {
        self.st().live.clone()
    }

    /// Writes a file that is durable at once (the app's own files, made before the test).
    pub(crate) fn put_durable(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.st();
        let st = &mut *st;
        for dir in path
            .ancestors()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .skip(1)
        {
            if dir == path {
                break;
            }
            if st.live.lookup(dir).is_err() {
                let (parent, name) = st.live.parent(dir)?;
                let ino = alloc(st, Node::Dir(BTreeMap::new()));
                let op = Op::Link {
                    dir: parent,
                    name,
                    ino,
                };
                st.live.apply(&op);
                Arc::make_mut(&mut st.durable).apply(&op);
            }
        }
        let (parent, name) = st.live.parent(path)?;
        let ino = alloc(st, Node::File(Data::from_bytes(bytes)));
        let op = Op::Link {
            dir: parent,
            name,
            ino,
        };
        st.live.apply(&op);
        Arc::make_mut(&mut st.durable).apply(&op);
        Ok(())
    }
}

/// A new inode, present (unreachable) in the live and durable images alike.
fn alloc(st: &mut State, node: Node) -> u64 {
    let ino = st.next_ino;
    st.next_ino += 1;
    st.live.nodes.insert(ino, node.clone());
    Arc::make_mut(&mut st.durable).nodes.insert(ino, node);
    ino
}

impl State {
    /// Counts a call; the chosen one fails with EIO.
    fn fault(&mut self, call: &'static str) -> io::Result<()> {
        let n = self.calls;
        self.calls += 1;
        if self.fail_at == Some(n) {
            self.failed = Some(call);
            return Err(errno(libc::EIO));
        }
        Ok(())
    }

    /// Before a changing call: take a snapshot when recording.
    fn boundary(&mut self, call: &'static str) {
        if let Some(rec) = &mut self.recording {
            rec.push(Snapshot {
                durable: Arc::clone(&self.durable),
                pending: self.pending.clone(),
                call,
            });
        }
    }

    fn push(&mut self, op: Op) {
        self.live.apply(&op);
        self.pending.push(Arc::new(op));
    }

    /// Makes the marked pending operations durable, in order.
    fn flush(&mut self, mut marked: Vec<bool>) {
        close_over_names(&self.pending, &mut marked);
        if !marked.iter().any(|m| *m) {
            return;
        }
        let durable = Arc::make_mut(&mut self.durable);
        let mut rest = Vec::with_capacity(self.pending.len());
        for (op, m) in self.pending.drain(..).zip(marked) {
            if m {
                self.sent.remove(&(Arc::as_ptr(&op) as usize));
                durable.apply(&op);
            } else {
                rest.push(op);
            }
        }
        self.pending = rest;
    }

    fn remove_tree(&mut self, dir: u64, name: OsString, ino: u64) {
        if let Some(entries) = self.live.dir(ino).cloned() {
            for (child_name, child) in entries {
                self.remove_tree(ino, child_name, child);
            }
        }
        self.push(Op::Unlink { dir, name, ino });
    }
}

impl Backend for Sim {
    fn open(&self, path: &Path, o: OpenMode) -> io::Result<Handle> {
        self.st().fault("open")?;
        let mut st = self.st();
        let (dir, name) = st.live.parent(path)?;
        let existing = st.live.dir(dir).and_then(|d| d.get(&name)).copied();
        let ino = match existing {
            Some(_) if o.create_new => return Err(errno(libc::EEXIST)),
            Some(ino) => {
                let is_dir = st.live.dir(ino).is_some();
                if is_dir && o.write {
                    return Err(errno(libc::EISDIR));
                }
                if o.truncate && o.write && !is_dir {
                    st.boundary("open (truncate)");
                    st.push(Op::SetLen { ino, len: 0 });
                }
                ino
            }
            None if o.create || o.create_new => {
                st.boundary("open (create)");
                let ino = alloc(&mut st, Node::File(Data::default()));
                st.push(Op::Link { dir, name, ino });
                ino
            }
            None => return Err(errno(libc::ENOENT)),
        };
        drop(st);
        Ok(self.handle(ino, o.append))
    }

    fn read(&self, f: &Handle, max: u64, buf: &mut Vec<u8>) -> io::Result<usize> {
        let pos = sim(f)?.0.pos.load(Ordering::SeqCst);
        let got = self.read_at(f, pos, usize::try_from(max).unwrap_or(usize::MAX), buf)?;
        sim(f)?.0.pos.fetch_add(got as u64, Ordering::SeqCst);
        Ok(got)
    }

    fn read_at(&self, f: &Handle, offset: u64, len: usize, buf: &mut Vec<u8>) -> io::Result<usize> {
        self.st().fault("read")?;
        let f = sim(f)?;
        let st = self.st();
        let data = match st.live.nodes.get(&f.0.ino) {
            Some(Node::File(d)) => d,
            Some(Node::Dir(_)) => return Err(errno(libc::EISDIR)),
            None => return Err(errno(libc::EBADF)),
        };
        let pos = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(data.read(pos, len, buf))
    }

    fn write_at(&self, f: &Handle, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.st().fault("write_at")?;
        let f = sim(f)?;
        let mut st = self.st();
        st.boundary("write_at");
        st.push(Op::Write {
            ino: f.0.ino,
            off: offset,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn write(&self, f: &Handle, bytes: &[u8]) -> io::Result<()> {
        self.st().fault("write")?;
        let d = &sim(f)?.0;
        let mut st = self.st();
        let off = if d.append {
            let end = st.live.meta(d.ino)?.len;
            d.pos.store(end + bytes.len() as u64, Ordering::SeqCst);
            end
        } else {
            d.pos.fetch_add(bytes.len() as u64, Ordering::SeqCst)
        };
        st.boundary("write");
        st.push(Op::Write {
            ino: sim(f)?.0.ino,
            off,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, f: &Handle, len: u64) -> io::Result<()> {
        self.st().fault("set_len")?;
        let ino = sim(f)?.0.ino;
        let mut st = self.st();
        st.boundary("set_len");
        st.push(Op::SetLen { ino, len });
        Ok(())
    }

    fn sync_data(&self, f: &Handle) -> io::Result<()> {
        self.st().fault("sync_data")?;
        let ino = sim(f)?.0.ino;
        let mut st = self.st();
        st.boundary("sync_data");
        let marked = st
            .pending
            .iter()
            .map(|o| o.data_of() == Some(ino))
            .collect();
        st.flush(marked);
        Ok(())
    }

    fn can_sync_fs(&self, _dir: &Handle) -> bool {
        !self.st().apple
    }

    fn has_full_sync(&self) -> bool {
        self.st().apple
    }

    fn sync_to_drive(&self, f: &Handle) -> io::Result<()> {
        if !self.st().apple {
            return self.sync_data(f);
        }
        self.st().fault("sync_to_drive")?;
        let ino = sim(f)?.0.ino;
        let mut st = self.st();
        st.boundary("sync_to_drive");
        let sent: Vec<usize> = st
            .pending
            .iter()
            .filter(|o| o.data_of() == Some(ino))
            .map(|o| Arc::as_ptr(o) as usize)
            .collect();
        st.sent.extend(sent);
        Ok(())
    }

    fn full_sync(&self, f: &Handle) -> io::Result<()> {
        if !self.st().apple {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        self.st().fault("full_sync")?;
        let ino = sim(f)?.0.ino;
        let mut st = self.st();
        if st.refuse_full_sync {
            return Err(errno(libc::ENOTSUP));
        }
        st.boundary("full_sync");
        let marked = st
            .pending
            .iter()
            .map(|o| o.data_of() == Some(ino) || st.sent.contains(&(Arc::as_ptr(o) as usize)))
            .collect();
        st.flush(marked);
        Ok(())
    }

    fn sync_fs(&self, dir: &Handle) -> io::Result<()> {
        self.st().fault("sync_fs")?;
        sim(dir)?;
        let mut st = self.st();
        st.boundary("sync_fs");
        let marked = vec![true; st.pending.len()];
        st.flush(marked);
        Ok(())
    }

    fn open_dir(&self, dir: &Path) -> io::Result<Handle> {
        self.st().fault("open_dir")?;
        let st = self.st();
        let ino = st.live.lookup(dir)?;
        if st.live.dir(ino).is_none() {
            return Err(errno(libc::ENOTDIR));
        }
        drop(st);
        Ok(self.handle(ino, false))
    }

    fn sync_dir(&self, dir: &Handle) -> io::Result<()> {
        self.st().fault("sync_dir")?;
        let ino = sim(dir)?.0.ino;
        let mut st = self.st();
        st.boundary("sync_dir");
        let marked = st
            .pending
            .iter()
            .map(|o| o.keys().iter().any(|(d, _)| *d == ino))
            .collect();
        st.flush(marked);
        Ok(())
    }

    fn create_dir(&self, path: &Path, _mode: u32) -> io::Result<()> {
        self.st().fault("create_dir")?;
        let mut st = self.st();
        let (dir, name) = st.live.parent(path)?;
        if st.live.dir(dir).is_some_and(|d| d.contains_key(&name)) {
            return Err(errno(libc::EEXIST));
        }
        st.boundary("create_dir");
        let ino = alloc(&mut st, Node::Dir(BTreeMap::new()));
        st.push(Op::Link { dir, name, ino });
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.st().fault("rename")?;
        let mut st = self.st();
        let (fd, fname, ino) = st.live.entry(from)?;
        let (td, tname) = st.live.parent(to)?;
        let src_dir = st.live.dir(ino).is_some();
        if let Some(old) = st.live.dir(td).and_then(|d| d.get(&tname)).copied() {
            match (src_dir, st.live.dir(old)) {
                (true, Some(d)) if !d.is_empty() => return Err(errno(libc::ENOTEMPTY)),
                (true, None) => return Err(errno(libc::ENOTDIR)),
                (false, Some(_)) => return Err(errno(libc::EISDIR)),
                _ => {}
            }
        }
        st.boundary("rename");
        st.push(Op::Rename {
            from: fd,
            from_name: fname,
            to: td,
            to_name: tname,
            ino,
        });
        Ok(())
    }

    fn hard_link(&self, src: &Path, dst: &Path) -> io::Result<()> {
        self.st().fault("hard_link")?;
        let mut st = self.st();
        let ino = st.live.lookup(src)?;
        if st.live.dir(ino).is_some() {
            return Err(errno(libc::EPERM));
        }
        let (dir, name) = st.live.parent(dst)?;
        if st.live.dir(dir).is_some_and(|d| d.contains_key(&name)) {
            return Err(errno(libc::EEXIST));
        }
        st.boundary("hard_link");
        st.push(Op::Link { dir, name, ino });
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.st().fault("remove_file")?;
        let mut st = self.st();
        let (dir, name, ino) = st.live.entry(path)?;
        if st.live.dir(ino).is_some() {
            return Err(errno(libc::EISDIR));
        }
        st.boundary("remove_file");
        st.push(Op::Unlink { dir, name, ino });
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.st().fault("remove_dir_all")?;
        let mut st = self.st();
        let (dir, name, ino) = st.live.entry(path)?;
        st.boundary("remove_dir_all");
        st.remove_tree(dir, name, ino);
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<Entry>> {
        self.st().fault("list_dir")?;
        let st = self.st();
        let ino = st.live.lookup(dir)?;
        let d = st.live.dir(ino).ok_or_else(|| errno(libc::ENOTDIR))?;
        Ok(d.iter()
            .map(|(name, child)| Entry {
                name: name.clone(),
                is_dir: st.live.dir(*child).is_some(),
                is_symlink: false,
            })
            .collect())
    }

    fn lstat(&self, path: &Path) -> io::Result<Meta> {
        self.st().fault("lstat")?;
        let st = self.st();
        let ino = st.live.lookup(path)?;
        st.live.meta(ino)
    }

    fn fstat(&self, f: &Handle) -> io::Result<Meta> {
        self.st().fault("fstat")?;
        let ino = sim(f)?.0.ino;
        self.st().live.meta(ino)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.st().fault("canonicalize")?;
        self.st().live.lookup(path)?;
        Ok(path.to_path_buf())
    }

    fn try_lock(&self, f: &Handle) -> io::Result<bool> {
        self.st().fault("try_lock")?;
        self.lock(f, false)
    }

    fn try_lock_shared(&self, f: &Handle) -> io::Result<bool> {
        self.st().fault("try_lock")?;
        self.lock(f, true)
    }

    fn unlock(&self, f: &Handle) -> io::Result<()> {
        let d = &sim(f)?.0;
        release(&self.locks, d.ino, d.id);
        Ok(())
    }

    fn read_exact_at(&self, f: &Handle, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(out.len());
        if self.read_at(f, offset, out.len(), &mut buf)? < out.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        out.copy_from_slice(&buf);
        Ok(())
    }

    fn dup(&self, f: &Handle) -> io::Result<Handle> {
        Ok(Handle::of_other(sim(f)?.clone()))
    }

    fn start_write_back(&self, _f: &Handle) {}

    fn read_at_once(
        &self,
        f: &Handle,
        offset: u64,
        len: usize,
        buf: &mut Vec<u8>,
    ) -> io::Result<usize> {
        self.read_at(f, offset, len, buf)
    }

    fn boot(&self) -> Option<BootMark> {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.boot.to_le_bytes());
        Some(BootMark::Id(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    fn read(img: &Image, path: &str) -> Option<Vec<u8>> {
        match img.nodes.get(&img.lookup(p(path)).ok()?) {
            Some(Node::File(d)) => Some(d.to_vec()),
            _ => None,
        }
    }

    fn create(s: &Sim, path: &str, bytes: &[u8]) -> Handle {
        let o = OpenMode {
            write: true,
            create_new: true,
            ..OpenMode::default()
        };
        let f = s.open(p(path), o).expect("create");
        s.write_at(&f, 0, bytes).expect("write");
        f
    }

    #[test]
    fn unsynced_writes_and_entries_may_be_lost_synced_ones_never() {
        let s = Sim::new();
        s.create_dir(p("/d"), 0o700).expect("mkdir");
        let f = create(&s, "/d/a", b"hello");
        // Nothing synced: a crash may keep nothing, or the directory but not the file.
        let snap = s.snapshot();
        let none = snap.crash(&vec![false; snap.pending.len()], Tear::None);
        assert!(none.lookup(p("/d")).is_err());
        let all = snap.crash(&vec![true; snap.pending.len()], Tear::None);
        assert_eq!(read(&all, "/d/a").as_deref(), Some(&b"hello"[..]));

        s.sync_data(&f).expect("sync");
        let d = s.open_dir(p("/d")).expect("open dir");
        s.sync_dir(&d).expect("sync d");
        // The data and the entry in /d are durable, but /d's own entry is not.
        let snap = s.snapshot();
        assert_eq!(snap.pending.len(), 1, "{:?}", snap.pending);
        let root = s.open_dir(p("/")).expect("open /");
        s.sync_dir(&root).expect("sync /");
        let snap = s.snapshot();
        assert!(snap.pending.is_empty());
        assert_eq!(
            read(&snap.crash(&[], Tear::None), "/d/a").as_deref(),
            Some(&b"hello"[..])
        );
    }

    #[test]
    fn a_rename_needs_its_directory_synced_and_drags_its_source_along() {
        let s = Sim::new();
        for d in ["/a", "/b"] {
            s.create_dir(p(d), 0o700).expect("mkdir");
        }
        let root = s.open_dir(p("/")).expect("/");
        s.sync_dir(&root).expect("sync");
        let f = create(&s, "/a/x", b"1");
        s.sync_data(&f).expect("sync");
        s.rename(p("/a/x"), p("/b/x")).expect("rename");
        let snap = s.snapshot();
        // Link in /a, then the rename: 4 subsets, 3 after the closure (rename alone drags the
        // link along).
        assert_eq!(snap.keep_sets(10, 0, 0).len(), 3);
        let b = s.open_dir(p("/b")).expect("/b");
        s.sync_dir(&b).expect("sync /b");
        // Syncing /b made the rename and the link it depends on durable.
        let snap = s.snapshot();
        assert!(snap.pending.is_empty(), "{:?}", snap.pending);
        let img = snap.crash(&[], Tear::None);
        assert_eq!(read(&img, "/b/x").as_deref(), Some(&b"1"[..]));
        assert!(read(&img, "/a/x").is_none());
    }

    #[test]
    fn a_torn_write_keeps_whole_sectors_then_zeros_or_garbage() {
        let s = Sim::new();
        let f = create(&s, "/f", &[]);
        let root = s.open_dir(p("/")).expect("/");
        s.sync_dir(&root).expect("sync");
        s.sync_data(&f).expect("sync");
        s.write_at(&f, 100, &[7u8; 1000]).expect("write");
        let snap = s.snapshot();
        let keep = vec![true];
        assert_eq!(snap.last_write_sectors(&keep), Some(3));
        let zeros = read(&snap.crash(&keep, Tear::Zeros(1)), "/f").expect("file");
        assert_eq!(zeros.len(), 1100);
        assert!(zeros[100..512].iter().all(|b| *b == 7));
        assert!(zeros[512..].iter().all(|b| *b == 0));
        let garbage = read(&snap.crash(&keep, Tear::Garbage(0, 9)), "/f").expect("file");
        assert_eq!(garbage.len(), 1100);
        assert!(garbage[100..].iter().any(|b| *b != 7));
        let whole = read(&snap.crash(&keep, Tear::None), "/f").expect("file");
        assert!(whole[100..].iter().all(|b| *b == 7));
    }

    #[test]
    fn recording_snapshots_every_changing_call() {
        let s = Sim::new();
        s.record();
        let f = create(&s, "/f", b"x");
        s.sync_data(&f).expect("sync");
        let snaps = s.take_snapshots();
        let calls: Vec<_> = snaps.iter().map(|s| s.call).collect();
        assert_eq!(calls, ["open (create)", "write_at", "sync_data", "end"]);
        assert_eq!(snaps.last().map(|s| s.pending.len()), Some(1));
    }
}
