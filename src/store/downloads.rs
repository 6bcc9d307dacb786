//! Downloads: bytes received so far, the platform's resume data, accepting the finished file,
//! and the payload's path and handle.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::Store;
use crate::error::{Error, ErrorKind, Result};
use crate::fs::{self as wfs, Handle};
use crate::layout::{PARTIAL, PAYLOAD, PAYLOAD_TEMP, RESUME, RESUME_TEMP};
use crate::transfer::{Kind, PayloadFacts, Phase, TransferId};

/// The largest resume data accepted.
pub const MAX_RESUME_BYTES: u64 = 4 * 1024 * 1024;

impl Store {
    /// Appends bytes a download received to its `partial` file, durably: the data is synced
    /// before the durable length is recorded. Returns the new durable length. Bytes past the
    /// durable length (from a crash mid-append) are discarded first.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload or an ended transfer; I/O errors.
    pub fn append_received(&self, id: TransferId, bytes: &[u8]) -> Result<u64> {
        self.modify(id, "append received", |m, s, dir| {
            if m.kind != Kind::Download || s.phase.is_terminal() {
                return Err(Error::invalid(format!(
                    "transfer {id} is not a download in progress"
                )));
            }
            let path = dir.join(PARTIAL);
            let (f, created) = self.core.fs.open_or_create(&path)?;
            let have = self.core.fs.len(&f, &path)?;
            if have < s.partial_len {
                // Received bytes were lost outside our control; never pad with zeros. Resume
                // from what is really there.
                tracing::warn!(transfer = %id, recorded = s.partial_len, found = have, "partial file shorter than recorded; resuming from its length");
                s.partial_len = have;
            }
            self.core.fs.set_len(&f, &path, s.partial_len)?;
            self.core.fs.write_at(&f, &path, s.partial_len, bytes)?;
            self.core.fs.sync_data(&f, &path)?;
            if created {
                self.core.fs.sync_dir(dir)?;
            }
            s.partial_len = s.partial_len.saturating_add(bytes.len() as u64);
            s.bytes_done = s.partial_len;
            Ok((s.partial_len, true))
        })
    }

    /// Stores a download's resume data, replacing any earlier copy atomically.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload or data over [`MAX_RESUME_BYTES`].
    pub fn store_resume_data(&self, id: TransferId, data: &[u8]) -> Result<()> {
        if data.len() as u64 > MAX_RESUME_BYTES {
            return Err(Error::invalid(format!(
                "resume data is {} bytes; the limit is {MAX_RESUME_BYTES}",
                data.len()
            )));
        }
        self.modify(id, "store resume data", |m, _, dir| {
            if m.kind != Kind::Download {
                return Err(Error::invalid(format!("transfer {id} is not a download")));
            }
            let tmp = dir.join(RESUME_TEMP);
            let f = self.core.fs.create_truncate(&tmp)?;
            self.core.fs.write_all(&f, &tmp, data)?;
            self.core.fs.sync_data(&f, &tmp)?;
            self.core.fs.rename(&tmp, &dir.join(RESUME))?;
            self.core.fs.sync_dir(dir)?;
            Ok(((), false))
        })
    }

    /// The resume data stored for a download, if any.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] for an unknown transfer; I/O errors.
    pub fn resume_data(&self, id: TransferId) -> Result<Option<Vec<u8>>> {
        self.core.fs.check()?;
        self.manifest(id)?;
        let path = self.checked_dir(id)?.join(RESUME);
        match self.core.fs.read_bounded(&path, MAX_RESUME_BYTES) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found_io() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Moves a finished download into the transfer's directory before returning (a rename, or
    /// a synced copy across file systems, after which the source is removed).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`] for an upload, a cancelled transfer or a source that is
    /// not a regular file; I/O errors.
    pub fn accept_download(&self, id: TransferId, file: &Path) -> Result<()> {
        let meta = self.core.fs.lstat(file)?;
        if !meta.is_file() {
            return Err(Error::invalid(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        self.modify(id, "accept download", |m, s, dir| {
            if m.kind != Kind::Download || s.phase == Phase::Cancelled {
                return Err(Error::invalid(format!(
                    "transfer {id} is not a download that can accept a file"
                )));
            }
            let dst = dir.join(PAYLOAD);
            // The data is durable before the file is reachable as `payload`, and the source is
            // removed only after the new name is durable.
            let src = self.core.fs.open_read(file)?;
            self.core.fs.sync_data(&src, file)?;
            let moved = match self.core.fs.rename(file, &dst) {
                Ok(()) => true,
                Err(e) if wfs::is_cross_device(&e) => {
                    let tmp = dir.join(PAYLOAD_TEMP);
                    self.core.fs.remove_file(&tmp)?;
                    let (_, f) = self.core.fs.link_or_copy(file, &tmp, false, true, true)?;
                    let f = match f {
                        Some(f) => f,
                        None => self.core.fs.open_read(&tmp)?,
                    };
                    self.core.fs.sync_data(&f, &tmp)?;
                    self.core.fs.rename(&tmp, &dst)?;
                    false
                }
                Err(e) => return Err(e),
            };
            self.core.fs.sync_dir(dir)?;
            if !moved {
                self.core.fs.remove_file(file)?;
            }
            let len = self.core.fs.lstat(&dst)?.len();
            s.downloaded = true;
            s.bytes_done = len;
            s.bytes_total = Some(len);
            Ok(((), true))
        })?;
        // Only now that the state says "downloaded" are the partial bytes and resume data moot.
        // Under the lock, journaled, since the index keeps whether resume data exists.
        let held = self.lock_state(id)?;
        let dir = &held.dir;
        if let Some(j) = &self.core.journal {
            j.intent(&self.core.root, id)?;
        }
        for leftover in [PARTIAL, RESUME] {
            if let Err(e) = self.core.fs.remove_file(&dir.join(leftover)) {
                tracing::warn!(transfer = %id, error = %e, "left a moot download file behind");
            }
        }
        if let Some(j) = &self.core.journal {
            j.after(&self.core.root, id);
        }
        Ok(())
    }

    /// Whether resume data is stored for a download.
    pub(crate) fn has_resume_data(&self, id: TransferId) -> Result<bool> {
        match self.core.fs.lstat(&self.transfer_dir(id).join(RESUME)) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.is_not_found_io() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Where the payload lives: the upload body, or a download's accepted file.
    pub fn payload_path(&self, id: TransferId) -> PathBuf {
        self.transfer_dir(id).join(PAYLOAD)
    }

    /// Opens the payload for reading after checking it is the one recorded: for a linked
    /// upload the same device, inode, size and modification time; for a copy or written
    /// bytes the same size.
    ///
    /// # Errors
    /// [`ErrorKind::PayloadChanged`] when it differs; [`ErrorKind::NotFound`] when there is
    /// none (a download not yet accepted).
    pub fn open_payload(&self, id: TransferId) -> Result<File> {
        let path = self.transfer_dir(id).join(PAYLOAD);
        self.checked_payload(id)?
            .into_file()
            .map_err(|e| Error::io("open", &path, e))
    }

    /// [`Store::open_payload`] behind the file system seam.
    pub(crate) fn checked_payload(&self, id: TransferId) -> Result<Handle> {
        self.core.fs.check()?;
        let m = self.manifest(id)?;
        let path = self.checked_dir(id)?.join(PAYLOAD);
        let f = match self.core.fs.open_read(&path) {
            Err(e) if e.is_not_found_io() => {
                return Err(Error::not_found(format!("the payload of transfer {id}")));
            }
            r => r?,
        };
        let (dev, ino, len, mtime_ns) = self.core.fs.identity(&f, &path)?;
        let changed = |detail: String| -> Result<Handle> {
            Err(ErrorKind::PayloadChanged { id, detail }.into())
        };
        match m.payload {
            PayloadFacts::Linked {
                len: l,
                dev: d,
                ino: i,
                mtime_ns: t,
            } => {
                if (d, i) != (dev, ino) {
                    return changed(format!("file identity {dev}:{ino}, recorded {d}:{i}"));
                }
                if l != len || t != mtime_ns {
                    return changed(format!(
                        "size {len} and mtime {mtime_ns} ns, recorded {l} and {t} ns"
                    ));
                }
            }
            PayloadFacts::Written { len: l } | PayloadFacts::Copied { len: l } if l != len => {
                return changed(format!("size {len}, recorded {l}"));
            }
            _ => {}
        }
        Ok(f)
    }
}
