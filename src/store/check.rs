//! Inspecting and repairing a store: [`Store::check`] (what `waybill fsck` prints),
//! [`Store::repair`], [`Store::gc`] and [`Store::stats`].
//!
//! Checking only reads. Repairing moves things aside (into `quarantine/`) rather than deleting
//! them, except debris no live process owns (unfinished creates and interrupted removals),
//! and never touches a record whose manifest is valid beyond rewriting its unreadable state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::layout::{
    FORMAT_TEMP_PREFIX, MANIFEST, PARTIAL, PAYLOAD, QUARANTINE, RECORD_FILES, RECORD_TEMPS, RESUME,
    ROOT_ENTRIES, STAGING, STATE, STRAY_PREFIX, TRANSFERS, TRASH,
};
use crate::store::{ErrorClass, Store};
use crate::transfer::{Kind, TransferId};

/// Which part of a record cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordPart {
    /// The manifest (missing, damaged, or of a newer format): the record is unusable.
    Manifest,
    /// Both state slots (the state is rebuilt from the manifest on read).
    State,
    /// An upload's payload is missing.
    Payload,
}

/// A record [`Store::check`] cannot read.
#[derive(Debug)]
#[non_exhaustive]
pub struct Unreadable {
    /// The record.
    pub id: TransferId,
    /// Which part.
    pub part: RecordPart,
    /// The file.
    pub file: PathBuf,
    /// What failed.
    pub error: Error,
}

/// What [`Store::check`] found. Paths are absolute (below the store's root).
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CheckReport {
    /// Records examined.
    pub records: usize,
    /// Records that cannot be read, with the file and what failed.
    pub unreadable: Vec<Unreadable>,
    /// Entries in `quarantine/` (moved aside earlier; not a problem in itself).
    pub quarantined: Vec<PathBuf>,
    /// Unfinished creates in `staging/` that no live process owns.
    pub staging_debris: Vec<PathBuf>,
    /// Creates in `staging/` a live process is building (not a problem).
    pub staging_live: Vec<PathBuf>,
    /// Interrupted removals in `trash/`.
    pub trash_debris: Vec<PathBuf>,
    /// Entries that do not belong where they are: names that are not canonical transfer ids,
    /// unknown files at the root or inside a transfer's directory, symlinks.
    pub strays: Vec<PathBuf>,
    /// Data files no record accounts for: `partial` or `resume` of an upload, and temporary
    /// files of an interrupted download step.
    pub orphans: Vec<PathBuf>,
}

impl CheckReport {
    /// The number of problems: everything found except quarantined entries and live creates.
    pub fn problems(&self) -> usize {
        self.unreadable.len()
            + self.staging_debris.len()
            + self.trash_debris.len()
            + self.strays.len()
            + self.orphans.len()
    }
}

/// What [`Store::repair`] did, and what it left.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RepairReport {
    /// Records whose manifest cannot be read, moved into `quarantine/`.
    pub quarantined: Vec<TransferId>,
    /// Records whose state was rewritten from the manifest (both slots were unreadable).
    pub state_rewritten: Vec<TransferId>,
    /// Uploads whose payload is gone, failed for good so the app hears of them.
    pub failed: Vec<TransferId>,
    /// Debris removed from `staging/` and `trash/`.
    pub cleared: Vec<PathBuf>,
    /// Strays and orphans moved into `quarantine/` (source, destination).
    pub moved: Vec<(PathBuf, PathBuf)>,
    /// Problems left as they were, with why.
    pub left: Vec<(PathBuf, String)>,
}

/// What [`Store::gc`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Unfinished creates cleared from `staging/`.
    pub staging_cleared: Vec<String>,
    /// Creates left in `staging/` because a live process owns them.
    pub staging_live: Vec<String>,
    /// Interrupted removals cleared from `trash/`.
    pub trash_cleared: Vec<String>,
    /// Cancelled transfers purged.
    pub purged: Vec<TransferId>,
}

/// Counts over a store, from [`Store::stats`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Readable transfers.
    pub transfers: usize,
    /// Transfers by phase name (`pending`, `running`, …).
    pub by_phase: BTreeMap<String, usize>,
    /// Transfers by session.
    pub by_session: BTreeMap<String, usize>,
    /// Transfers by group (transfers without a group are not counted here).
    pub by_group: BTreeMap<String, usize>,
    /// Records whose manifest cannot be read.
    pub unreadable: usize,
    /// Entries in `quarantine/`.
    pub quarantined: usize,
    /// Bytes of all regular files below the root. A hard-linked payload counts in full,
    /// though it shares its blocks with the app's source file.
    pub bytes_on_disk: u64,
}

fn canonical(name: &std::ffi::OsStr) -> Option<TransferId> {
    name.to_str().and_then(TransferId::parse_canonical)
}

impl Store {
    /// Walks the whole store and reports what is wrong with it, without changing anything.
    /// `progress(done, total)` is called after each record.
    ///
    /// # Errors
    /// I/O errors listing the store's directories (damaged records are findings, not errors).
    pub fn check(&self, mut progress: impl FnMut(usize, usize)) -> Result<CheckReport> {
        self.core.fs.check()?;
        let mut r = CheckReport::default();
        for e in self.core.fs.list(self.root())? {
            let name = e.name.to_string_lossy();
            let known =
                ROOT_ENTRIES.contains(&name.as_ref()) || name.starts_with(FORMAT_TEMP_PREFIX);
            if !known || e.is_symlink {
                r.strays.push(self.root().join(&e.name));
            }
        }
        for e in self.core.fs.list(&self.dir(QUARANTINE))? {
            r.quarantined.push(self.dir(QUARANTINE).join(&e.name));
        }
        for e in self.core.fs.list(&self.dir(STAGING))? {
            let path = self.dir(STAGING).join(&e.name);
            if canonical(&e.name).is_none() || !e.is_dir || e.is_symlink {
                r.strays.push(path);
            } else if self.staging_owned(&path)? {
                r.staging_live.push(path);
            } else {
                r.staging_debris.push(path);
            }
        }
        for e in self.core.fs.list(&self.dir(TRASH))? {
            let path = self.dir(TRASH).join(&e.name);
            if canonical(&e.name).is_none() || !e.is_dir || e.is_symlink {
                r.strays.push(path);
            } else {
                r.trash_debris.push(path);
            }
        }
        let dir = self.dir(TRANSFERS);
        let entries = self.core.fs.list(&dir)?;
        let total = entries.len();
        for (done, e) in entries.into_iter().enumerate() {
            let path = dir.join(&e.name);
            match canonical(&e.name).filter(|_| e.is_dir && !e.is_symlink) {
                Some(id) => self.check_record(id, &path, &mut r)?,
                None => r.strays.push(path),
            }
            progress(done + 1, total);
        }
        Ok(r)
    }

    /// Whether a live builder owns a staging directory (its state file is locked), or may be
    /// about to (younger than the staging grace, and nothing done under a lock yet).
    fn staging_owned(&self, path: &Path) -> Result<bool> {
        let state = path.join(STATE);
        if let Ok(f) = self.core.fs.open_read(&state) {
            if !self.core.fs.try_lock(&f, &state)? {
                return Ok(true);
            }
            if self.builder_locked_once(path) {
                return Ok(false);
            }
        }
        Ok(!self.older_than_grace(path).unwrap_or(true))
    }

    fn check_record(&self, id: TransferId, dir: &Path, r: &mut CheckReport) -> Result<()> {
        r.records += 1;
        let mut unreadable = |part, file: PathBuf, error| {
            r.unreadable.push(Unreadable {
                id,
                part,
                file,
                error,
            });
        };
        // Any failure to read one record (damage, a newer format, permissions, an I/O error)
        // is a finding about that record, never the end of the walk.
        let manifest = match self.manifest(id) {
            Ok(m) => Some(m),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => return Ok(()),
            Err(e) => {
                unreadable(RecordPart::Manifest, dir.join(MANIFEST), e);
                None
            }
        };
        let state_path = dir.join(STATE);
        let mut ended = false;
        match crate::state_file::read_newest(&self.core.fs, &state_path) {
            Ok(state) => ended = state.phase.is_terminal(),
            Err(e) if e.is_not_found_io() => {
                if !self.still_there(dir) {
                    return Ok(()); // removed while we looked
                }
                let e = Error::not_found(format!("the state file of transfer {id}"));
                unreadable(RecordPart::State, state_path, e);
            }
            Err(e) => unreadable(RecordPart::State, state_path, e),
        }
        let kind = manifest.as_ref().map(|m| m.kind);
        let mut has_payload = false;
        let entries = match self.core.fs.list(dir) {
            Ok(v) => v,
            Err(e) => {
                unreadable(RecordPart::Manifest, dir.to_path_buf(), e);
                return Ok(());
            }
        };
        for e in entries {
            let name = e.name.to_string_lossy();
            let path = dir.join(&e.name);
            if e.is_symlink || e.is_dir {
                r.strays.push(path);
            } else if RECORD_TEMPS.contains(&name.as_ref()) {
                r.orphans.push(path);
            } else if !RECORD_FILES.contains(&name.as_ref()) {
                r.strays.push(path);
            } else if name == PAYLOAD {
                has_payload = true;
            } else if kind == Some(Kind::Upload) && (name == PARTIAL || name == RESUME) {
                r.orphans.push(path);
            }
        }
        // An upload that has ended needs no payload any more; one still to run does.
        if kind == Some(Kind::Upload) && !has_payload && !ended && self.still_there(dir) {
            r.unreadable.push(Unreadable {
                id,
                part: RecordPart::Payload,
                file: dir.join(PAYLOAD),
                error: Error::not_found(format!("the payload of upload {id}")),
            });
        }
        Ok(())
    }

    fn still_there(&self, dir: &Path) -> bool {
        self.core.fs.lstat(dir).is_ok()
    }

    /// True when `path` is `<root>/<dir>/<name>` with a canonical transfer id as `name`.
    fn is_entry_of(&self, path: &Path, dir: &str) -> bool {
        path.parent() == Some(self.dir(dir).as_path())
            && path.file_name().and_then(canonical).is_some()
    }

    /// True when `path` lies inside the store (no `..`, below the root).
    fn is_inside(&self, path: &Path) -> bool {
        path.starts_with(self.root())
            && path != self.root()
            && !path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
    }

    /// Repairs what [`Store::check`] found: quarantines records whose manifest cannot be read,
    /// rewrites unreadable state from the manifest, fails uploads whose payload is gone,
    /// clears debris no live process owns, and moves strays and orphans into
    /// `quarantine/`. Nothing with a valid manifest is deleted or moved.
    ///
    /// # Errors
    /// [`ErrorKind::Poisoned`] after a failed sync; other failures are listed in
    /// [`RepairReport::left`].
    pub fn repair(&self, found: &CheckReport) -> Result<RepairReport> {
        self.core.fs.check()?;
        let mut out = RepairReport::default();
        let left = |path: &Path, why: String, out: &mut RepairReport| {
            out.left.push((path.to_path_buf(), why));
        };
        for u in &found.unreadable {
            let done = match u.part {
                // Only damage is quarantined. A newer format belongs to a newer app, and a
                // permission or I/O error may pass: both are left as they are.
                RecordPart::Manifest if u.error.is_corrupt() => {
                    self.quarantine(u.id).map(|_| out.quarantined.push(u.id))
                }
                RecordPart::Manifest => {
                    left(
                        &u.file,
                        format!("not damaged, so left alone: {}", u.error),
                        &mut out,
                    );
                    Ok(())
                }
                RecordPart::State => self
                    .rewrite_state(u.id)
                    .map(|()| out.state_rewritten.push(u.id)),
                RecordPart::Payload => {
                    match self.fail(u.id, ErrorClass::Permanent, "the payload file is missing") {
                        Ok(crate::FailResult::GaveUp) => {
                            out.failed.push(u.id);
                            Ok(())
                        }
                        Ok(_) => {
                            left(&u.file, "the transfer has already ended".into(), &mut out);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match done {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), ErrorKind::Poisoned { .. }) => return Err(e),
                // Quarantined above together with its manifest, or removed meanwhile.
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => left(&u.file, e.to_string(), &mut out),
            }
        }
        for path in found.staging_debris.iter().chain(&found.trash_debris) {
            let cleared = if self.is_entry_of(path, STAGING) {
                self.clear_staged(path)
            } else if self.is_entry_of(path, TRASH) {
                self.core.fs.remove_tree(path).map(|()| true)
            } else {
                left(path, "not debris of this store".into(), &mut out);
                continue;
            };
            match cleared {
                Ok(true) => out.cleared.push(path.clone()),
                Ok(false) => left(path, "a live process owns it now".into(), &mut out),
                Err(e) if e.is_not_found_io() => out.cleared.push(path.clone()),
                Err(e) => left(path, e.to_string(), &mut out),
            }
        }
        for d in [STAGING, TRASH] {
            self.core.fs.sync_dir(&self.dir(d))?;
        }
        for path in found.strays.iter().chain(&found.orphans) {
            if !self.is_inside(path) {
                left(path, "not inside this store".into(), &mut out);
                continue;
            }
            match self.move_aside(path) {
                Ok(Some(to)) => out.moved.push((path.clone(), to)),
                Ok(None) => {}
                Err(e) => left(path, e.to_string(), &mut out),
            }
        }
        Ok(out)
    }

    /// Rewrites a transfer's state from its manifest (both slots unreadable).
    fn rewrite_state(&self, id: TransferId) -> Result<()> {
        self.modify_with(id, "repair", false, |_, s, _| {
            s.rebuilt = false;
            Ok(((), true))
        })
    }

    /// Moves a stray or orphan into `quarantine/` under a fresh unique name. Returns `None`
    /// when it is already gone.
    fn move_aside(&self, path: &Path) -> Result<Option<PathBuf>> {
        let parent = path.parent().unwrap_or(self.root());
        // A file inside a record's directory moves under the record's lock, so no download
        // step in another process is renaming it at the same moment.
        let _held = match parent.file_name().and_then(canonical) {
            Some(id) if self.is_entry_of(parent, TRANSFERS) => match self.lock_state(id) {
                Ok(l) => Some(l.file),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            },
            _ => None,
        };
        let rel = path
            .strip_prefix(self.root())
            .unwrap_or(path)
            .to_string_lossy()
            .replace(['/', '\\'], "_");
        let name: String = rel.chars().filter(|c| !c.is_control()).take(120).collect();
        let to = self
            .dir(QUARANTINE)
            .join(format!("{STRAY_PREFIX}{}-{name}", TransferId::new_v4()));
        if _held.is_some()
            && let (Some(j), Some(id)) =
                (&self.core.journal, parent.file_name().and_then(canonical))
        {
            j.intent(self.root(), id)?;
        }
        match self.core.fs.rename(path, &to) {
            Ok(()) => {}
            Err(e) if e.is_not_found_io() => return Ok(None),
            Err(e) => return Err(e),
        }
        if _held.is_some()
            && let (Some(j), Some(id)) =
                (&self.core.journal, parent.file_name().and_then(canonical))
        {
            j.after(self.root(), id);
        }
        self.core.fs.sync_dir(&self.dir(QUARANTINE))?;
        self.core.fs.sync_dir(parent)?;
        tracing::warn!(from = %path.display(), to = %to.display(), "moved a stray entry aside");
        Ok(Some(to))
    }

    /// Removes debris no live process owns (unfinished creates, interrupted removals) and
    /// purges cancelled transfers.
    ///
    /// # Errors
    /// [`ErrorKind::Busy`] when another process holds the store's lock (it is cleaning the same
    /// debris) beyond the lock timeout; I/O errors.
    pub fn gc(&self) -> Result<GcReport> {
        self.core.fs.check()?;
        let debris = self.clear_debris_locked()?;
        let mut purged = Vec::new();
        for t in self.list(&crate::Filter::all().phase(crate::Phase::Cancelled))? {
            match self.remove(t.id()) {
                Ok(()) => purged.push(t.id()),
                Err(e) if matches!(e.kind(), ErrorKind::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(GcReport {
            staging_cleared: debris.staging_cleared,
            staging_live: debris.staging_live,
            trash_cleared: debris.trash_cleared,
            purged,
        })
    }

    /// Counts by phase, session and group, quarantined entries and bytes on disk.
    ///
    /// # Errors
    /// As [`Store::scan`].
    pub fn stats(&self) -> Result<Stats> {
        let scan = self.scan()?;
        let mut s = Stats {
            transfers: scan.transfers.len(),
            unreadable: scan.corrupt.len(),
            quarantined: self.core.fs.list(&self.dir(QUARANTINE))?.len(),
            bytes_on_disk: self.bytes_below(self.root())?,
            ..Stats::default()
        };
        for t in &scan.transfers {
            *s.by_phase.entry(t.state.phase.to_string()).or_default() += 1;
            *s.by_session.entry(t.manifest.session.clone()).or_default() += 1;
            if let Some(g) = &t.manifest.group {
                *s.by_group.entry(g.clone()).or_default() += 1;
            }
        }
        Ok(s)
    }

    /// Bytes of the regular files below `dir`, never following symlinks.
    fn bytes_below(&self, dir: &Path) -> Result<u64> {
        let mut total = 0u64;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = match self.core.fs.list(&d) {
                Ok(v) => v,
                // Removed while we walked.
                Err(e) if e.is_not_found_io() => continue,
                Err(e) => return Err(e),
            };
            for e in entries {
                let p = d.join(&e.name);
                if e.is_dir && !e.is_symlink {
                    stack.push(p);
                } else if let Ok(m) = self.core.fs.lstat(&p)
                    && m.is_file()
                {
                    total = total.saturating_add(m.len());
                }
            }
        }
        Ok(total)
    }
}
