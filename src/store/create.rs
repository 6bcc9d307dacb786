//! Creating transfers: validating, staging a transfer's files in `staging/<id>`, and renaming it
//! into `transfers/`; one at a time or as a batch that shares its syncs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use super::{Store, check_name, check_request, lock};
use crate::error::{Error, Result};
use crate::format::manifest;
use crate::fs::{self as wfs, Handle, Placed};
use crate::layout::{MANIFEST, PAYLOAD, STAGING, STATE, TRANSFERS, TRASH};
use crate::state_file;
use crate::transfer::{
    Kind, LinkMode, Manifest, NewTransfer, PayloadFacts, TransferId, UploadSource,
};

/// Members per thread below which a batch create does not start another thread.
const MEMBERS_PER_THREAD: usize = 256;

/// What one create call has learned of the file system: each upload source resolved, and the
/// device `staging/` is on.
#[derive(Debug, Default, Clone)]
struct Sources {
    resolved: HashMap<PathBuf, (PathBuf, wfs::Meta)>,
    staging_dev: Option<u64>,
}

/// What every share of one batch create has in common.
struct Batch<'a> {
    now: SystemTime,
    /// Synced with one file-system sync per part instead of file by file.
    shared: bool,
    part_len: usize,
    /// Set by the first share that fails, so the others stop at their next part.
    stop: &'a AtomicBool,
}

/// What one share of a batch create did.
struct BatchRun {
    /// Members renamed into `transfers/`, in order.
    moved: Vec<TransferId>,
    manifests: Vec<(TransferId, Manifest)>,
    failed: Option<Error>,
    /// Stopped early because another share failed.
    stopped: bool,
}

/// A file of a staged transfer that must be synced.
struct ToSync {
    file: Handle,
    path: PathBuf,
    /// Written by the build (not a linked file of the caller's, whose cached pages the early
    /// write-back must not drop).
    written: bool,
}

/// A transfer built in `staging/`, not yet visible.
struct Staged {
    id: TransferId,
    dir: PathBuf,
    /// The state file, locked for as long as the build runs so no cleaner takes the directory.
    state: Handle,
    /// Files whose data must be synced before the directory becomes visible, in the order
    /// they were written (the state last).
    to_sync: Vec<ToSync>,
    manifest: Manifest,
    /// The manifest file and the first state slot as written, for the journal.
    files: (Vec<u8>, Vec<u8>),
}

impl Store {
    /// Creates one transfer. When this returns `Ok`, the transfer survives a crash; if it does
    /// not return, no part of the transfer is visible after a crash.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{NewTransfer, Store, UploadSource};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let id = store.create(
    ///     NewTransfer::upload("https://example.com/u", UploadSource::Bytes(b"hello".to_vec()))
    ///         .secret_header("Authorization", "Bearer t0ken")
    ///         .meta("album", "holiday"),
    /// )?;
    /// let t = store.get(id)?;
    /// assert_eq!(t.manifest.payload.len(), 5);
    /// assert_eq!(t.manifest.request.headers[0].value, ""); // secrets never reach the disk
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for a bad name, request or metadata; I/O errors (nothing
    /// is left visible then).
    pub fn create(&self, t: NewTransfer) -> Result<TransferId> {
        let ids = self.create_batch(vec![t])?;
        ids.into_iter()
            .next()
            .ok_or_else(|| Error::invalid("empty batch"))
    }

    /// Creates many transfers in one call, sharing syncs: on Linux and Android a batch of 8 or
    /// more is made durable with one `syncfs` per part and one directory sync, instead of four
    /// syncs per transfer; elsewhere, and for smaller batches, the directory sync is shared. A
    /// batch of any size holds a bounded number of files open: it is built and renamed in parts
    /// (with `syncfs`, as many members as a quarter of the process's soft limit on open files,
    /// between 32 and 1,024; 16 when syncing file by file), so members of earlier parts can be
    /// seen by other readers before the call returns. A large batch is built on several threads
    /// (see [`StoreBuilder::batch_threads`]), which share that bound. Each transfer is whole or
    /// absent after a crash; on `Ok` all of them survive, and the ids come back in the order of
    /// `items`.
    ///
    /// ```
    /// # fn main() -> Result<(), waybill::Error> {
    /// use waybill::{NewTransfer, Store};
    /// let dir = tempfile::tempdir().expect("tempdir");
    /// let store = Store::open(dir.path())?;
    /// let ids = store.create_batch(
    ///     (0..100).map(|i| NewTransfer::download(format!("https://example.com/{i}"))).collect(),
    /// )?;
    /// assert_eq!(store.list(&waybill::Filter::all())?.len(), ids.len());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Store::create`]; on an error, no transfer of the batch is left visible. What the
    /// caller's input can make fail (names, requests, metadata, upload sources, hard links
    /// across file systems) fails before any part is renamed.
    pub fn create_batch(&self, items: Vec<NewTransfer>) -> Result<Vec<TransferId>> {
        self.core.fs.check()?;
        for t in &items {
            Self::validate(t)?;
        }
        let now = self.now();
        let staging = self.dir(STAGING);
        let shared = items.len() >= self.cfg.shared_sync_min
            && self.core.fs.can_sync_fs(&self.core.fs.open_dir(&staging)?);
        let threads = if shared {
            self.cfg
                .batch_threads
                .min(items.len() / MEMBERS_PER_THREAD)
                .max(1)
        } else {
            1
        };
        // Built and renamed in parts, so a batch of any size holds a bounded number of open
        // files (iOS allows 256 by default): a part keeps each member's locked state file
        // open, and, when syncing file by file, up to three more files per member. Threads
        // share the bound.
        let part_len = if shared {
            (self.cfg.open_budget.unwrap_or_else(wfs::open_file_budget) / threads).max(16)
        } else {
            16
        };
        let mut sources = Sources::default();
        if items.len() > part_len || threads > 1 {
            // Earlier parts (or another thread's) become visible before later ones are built:
            // check up front what a later build could refuse, so input errors fail the batch
            // before anything shows.
            for t in &items {
                self.precheck(t, now, &mut sources)?;
            }
        }
        let stop = AtomicBool::new(false);
        let job = Batch {
            now,
            shared,
            part_len,
            stop: &stop,
        };
        let runs = if threads == 1 {
            vec![self.create_parts(&job, items, sources)]
        } else {
            self.create_parallel(&job, items, &sources, threads)
        };
        let mut moved = Vec::with_capacity(runs.iter().map(|r| r.moved.len()).sum());
        let mut manifests = Vec::with_capacity(moved.capacity());
        let mut failed = None;
        let mut stopped = false;
        for r in runs {
            moved.extend(r.moved);
            manifests.extend(r.manifests);
            stopped |= r.stopped;
            if failed.is_none() {
                failed = r.failed;
            }
        }
        if stopped && failed.is_none() {
            // Only a failure stops a share; never left incomplete and called a success.
            failed = Some(Error::io(
                "create a batch in",
                &staging,
                std::io::Error::other("a share of the batch stopped early"),
            ));
        }
        if let Some(e) = failed {
            self.roll_back(&moved);
            return Err(e);
        }
        if let Err(e) = self.core.fs.sync_dir(&self.dir(TRANSFERS)) {
            // Not acknowledged: take the batch back out so an `Err` leaves nothing visible.
            self.roll_back(&moved);
            return Err(e);
        }
        let mut cache = lock(&self.core.manifests);
        for (id, m) in manifests {
            tracing::debug!(transfer = %id, kind = %m.kind, "created");
            cache.insert(id, Arc::new(m));
        }
        Ok(moved)
    }

    /// Builds `items` on `threads` threads, each taking a contiguous share, and returns their
    /// runs in the items' order. A share whose thread could not be started is built on the
    /// caller's thread.
    fn create_parallel(
        &self,
        job: &Batch<'_>,
        mut items: Vec<NewTransfer>,
        sources: &Sources,
        threads: usize,
    ) -> Vec<BatchRun> {
        let per = items.len().div_ceil(threads);
        let mut shares = Vec::with_capacity(threads);
        while items.len() > per {
            let rest = items.split_off(per);
            shares.push(items);
            items = rest;
        }
        shares.push(items);
        std::thread::scope(|scope| {
            let mut shares = shares.into_iter();
            let first = shares.next().unwrap_or_default();
            let mut started = Vec::with_capacity(threads);
            for share in shares {
                let (tx, rx) = std::sync::mpsc::channel();
                let theirs = sources.clone();
                let spawned = std::thread::Builder::new()
                    .name("waybill-batch".into())
                    .spawn_scoped(scope, move || {
                        let share = rx.recv().unwrap_or_default();
                        self.create_parts(job, share, theirs)
                    });
                match spawned {
                    Ok(h) => {
                        // Cannot fail: the thread waits for its share before anything else,
                        // so the receiver lives until it has it.
                        let _ = tx.send(share);
                        started.push(Ok(h));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "could not start a batch thread; building on the caller's");
                        started.push(Err(share));
                    }
                }
            }
            let mut runs = vec![self.create_parts(job, first, sources.clone())];
            for s in started {
                runs.push(match s {
                    Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    Err(share) => self.create_parts(job, share, sources.clone()),
                });
            }
            runs
        })
    }

    /// Builds, syncs and renames `items` into `transfers/` part by part, until done, failed, or
    /// another share of the batch failed. Members renamed before a failure are in the run's
    /// `moved`, for the caller to roll back with the rest of the batch.
    fn create_parts(
        &self,
        job: &Batch<'_>,
        items: Vec<NewTransfer>,
        mut sources: Sources,
    ) -> BatchRun {
        let staging = self.dir(STAGING);
        let transfers = self.dir(TRANSFERS);
        let mut run = BatchRun {
            moved: Vec::with_capacity(items.len()),
            manifests: Vec::with_capacity(items.len()),
            failed: None,
            stopped: false,
        };
        let fail = |run: &mut BatchRun, e: Error| {
            job.stop.store(true, Ordering::Relaxed);
            run.failed = Some(e);
        };
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            if job.stop.load(Ordering::Relaxed) {
                // Another share failed; the batch is rolled back whole.
                run.stopped = true;
                return run;
            }
            let part: Vec<NewTransfer> = items.by_ref().take(job.part_len).collect();
            let mut staged = Vec::with_capacity(part.len());
            // Opened before the part is written, so its `syncfs` reports any write-back error
            // that happens after this point.
            let sync_with = if job.shared {
                match self.core.fs.open_dir(&staging) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        fail(&mut run, e);
                        return run;
                    }
                }
            } else {
                None
            };
            let built = self
                .stage_all(part, job.now, sync_with.as_ref(), &mut sources, &mut staged)
                .and_then(|()| match &self.core.journal {
                    // Each member's lock is held from here until its entry is journaled.
                    Some(j) => j.intents(
                        &self.core.root,
                        &staged.iter().map(|s| s.id).collect::<Vec<_>>(),
                    ),
                    None => Ok(()),
                });
            if let Err(e) = built {
                for s in &staged {
                    let _ = self.core.fs.remove_tree(&s.dir);
                }
                fail(&mut run, e);
                return run;
            }
            for (i, s) in staged.iter().enumerate() {
                let to = transfers.join(s.id.to_string());
                if let Err(e) = self.core.fs.rename(&s.dir, &to) {
                    let rest: Vec<PathBuf> = staged.iter().skip(i).map(|s| s.dir.clone()).collect();
                    // Releases this part's locks, so the rollback can take each member's lock.
                    drop(staged);
                    for d in rest {
                        let _ = self.core.fs.remove_tree(&d);
                    }
                    fail(&mut run, e);
                    return run;
                }
                run.moved.push(s.id);
            }
            let mut bodies = Vec::with_capacity(staged.len());
            let mut locks = Vec::with_capacity(staged.len());
            for s in staged {
                let (manifest, state) = s.files;
                bodies.push((
                    s.id,
                    crate::format::index::EntryBody {
                        state,
                        resume: false,
                        manifest: Some(manifest),
                    },
                ));
                run.manifests.push((s.id, s.manifest));
                locks.push(s.state);
            }
            if let Some(j) = &self.core.journal {
                let items: Vec<_> = bodies.iter().map(|(id, b)| (*id, b)).collect();
                j.entries(&items);
            }
            // The members' locks are held until their entries are journaled.
            drop(locks);
        }
        run
    }

    /// Moves already-renamed members of a failed batch to `trash/` and deletes them. Failures
    /// are logged: the caller already has the error that made the batch fail.
    fn roll_back(&self, moved: &[TransferId]) {
        for id in moved {
            // Under the member's lock, so no update another process has under way is cut off.
            let r = self.core.lock_state(*id).and_then(|held| {
                let r = self.move_to_trash(*id);
                drop(held);
                r
            });
            let r = r.and_then(|()| {
                self.core
                    .fs
                    .remove_tree(&self.dir(TRASH).join(id.to_string()))
            });
            if let Err(e) = r {
                tracing::error!(transfer = %id, error = %e, "could not roll back a member of a failed batch create");
            }
        }
    }

    /// An upload source's absolute path and metadata, resolved once per create call: the
    /// members of a batch often name one file. What is linked is checked on the link itself
    /// (the payload's identity is read from the linked file), so a source replaced meanwhile
    /// is recorded as what it is, or refused.
    fn resolve_source(&self, sources: &mut Sources, path: &Path) -> Result<(PathBuf, wfs::Meta)> {
        if let Some(r) = sources.resolved.get(path) {
            return Ok(r.clone());
        }
        let r = self.core.fs.resolve(path)?;
        sources.resolved.insert(path.to_path_buf(), r.clone());
        Ok(r)
    }

    /// What `build` could refuse about `t` beyond [`Store::validate`]: an upload source that is
    /// missing or not a regular file, a hard link across file systems, a manifest over its
    /// size limit. Checked before a multi-part batch shows its first part.
    fn precheck(&self, t: &NewTransfer, now: SystemTime, sources: &mut Sources) -> Result<()> {
        let mut payload = PayloadFacts::None;
        if let Some(UploadSource::File { path, link }) = &t.source {
            let (_, meta) = self.resolve_source(sources, path)?;
            if !meta.is_file() {
                return Err(Error::invalid(format!(
                    "the upload source {} is not a regular file",
                    path.display()
                )));
            }
            let staging_dev = match sources.staging_dev {
                Some(d) => d,
                None => *sources
                    .staging_dev
                    .insert(self.core.fs.lstat(&self.dir(STAGING))?.dev),
            };
            if *link == LinkMode::HardLink && meta.dev != staging_dev {
                return Err(Error::invalid(format!(
                    "the upload source {} is on another file system; it cannot be hard-linked",
                    path.display()
                )));
            }
            payload = PayloadFacts::Linked {
                len: u64::MAX,
                dev: u64::MAX,
                ino: u64::MAX,
                mtime_ns: i128::MAX,
            };
        } else if let Some(UploadSource::Bytes(b)) = &t.source {
            payload = PayloadFacts::Written {
                len: b.len() as u64,
            };
        }
        let probe = Manifest {
            id: TransferId::from_bytes([0; 16]),
            kind: t.kind,
            session: t.session.clone(),
            request: t.request.clone(),
            group: t.group.clone(),
            created: now,
            deadline: t.deadline,
            retry: t.retry,
            payload,
            idempotency_key: t
                .idempotency_key
                .clone()
                .unwrap_or_else(|| TransferId::from_bytes([0; 16]).to_string()),
            metadata: t.metadata.clone(),
        };
        manifest::encode(&probe).map(|_| ())
    }

    fn validate(t: &NewTransfer) -> Result<()> {
        check_name("the session", &t.session)?;
        if let Some(g) = &t.group {
            check_name("the group", g)?;
        }
        if let Some(k) = &t.idempotency_key {
            check_name("the idempotency key", k)?;
        }
        check_request(&t.request)?;
        if t.retry.max_attempts == 0 {
            return Err(Error::invalid("max_attempts must be at least 1"));
        }
        match (t.kind, &t.source) {
            (Kind::Upload, None) => Err(Error::invalid("an upload needs a source")),
            (Kind::Download, Some(_)) => Err(Error::invalid("a download takes no source")),
            _ => Ok(()),
        }
    }

    /// Builds each item in `staging/` and makes it durable: file by file, or, given the
    /// `staging/` handle to sync through, with one sync of the whole file system (the files
    /// are then closed as soon as they are written; each member's locked state file stays open
    /// until it is renamed).
    fn stage_all(
        &self,
        items: Vec<NewTransfer>,
        now: SystemTime,
        sync_with: Option<&Handle>,
        sources: &mut Sources,
        staged: &mut Vec<Staged>,
    ) -> Result<()> {
        let shared = sync_with.is_some();
        for t in items {
            let id = TransferId::new_v4();
            let dir = self.dir(STAGING).join(id.to_string());
            self.core.fs.create_dir(&dir)?;
            match self.build(id, &dir, t, now, shared, sources) {
                Ok(mut s) => {
                    if shared {
                        s.to_sync.clear();
                    }
                    staged.push(s);
                }
                Err(e) => {
                    let _ = self.core.fs.remove_tree(&dir);
                    return Err(e);
                }
            }
        }
        // One sync of the whole file system also writes out other dirty data on it, so small
        // batches and single creates, often made beside a large download, sync file by file.
        if let Some(h) = sync_with {
            return self.core.fs.sync_fs(h, &self.dir(STAGING));
        }
        // Write-back of every file but the first to be synced starts now, so that first sync
        // writes all their data and the metadata their block allocations changed in one go
        // (one journal transaction, or one write of the inode-table block they share), and the
        // syncs after it find little left to write. Each file is still synced: the early start
        // is a hint that makes nothing durable.
        for t in staged
            .iter()
            .flat_map(|s| s.to_sync.iter().rev())
            .skip(1)
            .filter(|t| t.written)
        {
            self.core.fs.start_write_back(&t.file);
        }
        for s in staged.iter() {
            // The state first: it was written last, so its write-back has not started.
            for t in s.to_sync.iter().rev() {
                self.core.fs.sync_data(&t.file, &t.path)?;
            }
            self.core.fs.sync_dir(&s.dir)?;
        }
        Ok(())
    }

    fn build(
        &self,
        id: TransferId,
        dir: &Path,
        t: NewTransfer,
        now: SystemTime,
        shared: bool,
        sources: &mut Sources,
    ) -> Result<Staged> {
        let state_path = dir.join(STATE);
        let state = self.core.fs.create_new(&state_path)?;
        self.core
            .fs
            .lock(&state, &state_path, self.cfg.lock_timeout)?;
        let mut to_sync = Vec::new();
        let payload_path = dir.join(PAYLOAD);
        let payload = match t.source {
            None => PayloadFacts::None,
            Some(UploadSource::Bytes(bytes)) => {
                let f = self.core.fs.create_new(&payload_path)?;
                self.core.fs.write_all(&f, &payload_path, &bytes)?;
                to_sync.push(ToSync {
                    file: f,
                    path: payload_path,
                    written: true,
                });
                PayloadFacts::Written {
                    len: bytes.len() as u64,
                }
            }
            Some(UploadSource::File { path, link }) => {
                let (src, meta) = self.resolve_source(sources, &path)?;
                if !meta.is_file() {
                    return Err(Error::invalid(format!(
                        "the upload source {} is not a regular file",
                        path.display()
                    )));
                }
                // Synced with the whole file system, a linked file needs no handle: its
                // identity is read through the link, in this builder's locked directory.
                let (placed, f) = self.core.fs.link_or_copy(
                    &src,
                    &payload_path,
                    link != LinkMode::Copy,
                    link != LinkMode::HardLink,
                    !shared,
                )?;
                let (dev, ino, len, mtime_ns) = match &f {
                    Some(f) => self.core.fs.identity(f, &payload_path)?,
                    None => {
                        let m = self.core.fs.lstat(&payload_path)?;
                        (m.dev, m.ino, m.len, m.mtime_ns)
                    }
                };
                // A linked file's data must be durable too before the transfer is: the caller
                // may have written it moments ago. Syncing does not modify it.
                if let Some(f) = f {
                    to_sync.push(ToSync {
                        file: f,
                        path: payload_path,
                        written: placed == Placed::Copied,
                    });
                }
                match placed {
                    Placed::Linked => PayloadFacts::Linked {
                        len,
                        dev,
                        ino,
                        mtime_ns,
                    },
                    Placed::Copied => PayloadFacts::Copied { len },
                }
            }
        };
        let manifest = Manifest {
            id,
            kind: t.kind,
            session: t.session,
            request: t.request,
            group: t.group,
            created: now,
            deadline: t.deadline,
            retry: t.retry,
            payload,
            idempotency_key: t.idempotency_key.unwrap_or_else(|| id.to_string()),
            metadata: t.metadata,
        };
        let bytes = manifest::encode(&manifest)?;
        let mpath = dir.join(MANIFEST);
        // Cache exactly what a reader will decode (secret values dropped, times in ms).
        let stored = manifest::decode(&mpath, &bytes)?;
        let mf = self.core.fs.create_new(&mpath)?;
        self.core.fs.write_all(&mf, &mpath, &bytes)?;
        to_sync.push(ToSync {
            file: mf,
            path: mpath,
            written: true,
        });
        let slot = state_file::first_slot()?;
        self.core.fs.write_at(&state, &state_path, 0, &slot)?;
        if !shared {
            let sf = self.core.fs.dup(&state, &state_path)?;
            to_sync.push(ToSync {
                file: sf,
                path: state_path,
                written: true,
            });
        }
        Ok(Staged {
            id,
            dir: dir.to_path_buf(),
            state,
            to_sync,
            manifest: stored,
            files: (bytes, slot),
        })
    }
}
