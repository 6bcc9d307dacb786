//! Reading transfers from their directories for the index: one transfer whose intent has no
//! entry after it, or all of them when the index is rebuilt.

use std::path::Path;

use crate::format::index::{self as fmt, IndexRecord};
use crate::fs::Fs;
use crate::layout::{MANIFEST, RESUME, STAGING, STATE, TRANSFERS};
use crate::{Result, TransferId, state_file};

/// What reading a transfer's directory found.
pub(super) struct Reread {
    pub(super) record: Option<IndexRecord>,
    /// False when a change may still be under way (its lock is held, or its create is not yet
    /// renamed into place): the journal is not consumed past its intent.
    pub(super) settled: bool,
}

/// Reads one transfer's files as the index keeps them, as [`crate::Store::scan`] classifies
/// them: a directory whose manifest or state cannot be read as a file is a record with an
/// unreadable (corrupt) manifest; anything under its name that is not a directory is not a
/// record. Never follows symlinks (the paths are built from the id; files open `O_NOFOLLOW`)
/// and bounds every read. I/O errors other than "not found" are errors.
pub(super) fn reread(fs: &Fs, root: &Path, id: TransferId) -> Result<Reread> {
    let name = id.to_string();
    let dir = root.join(TRANSFERS).join(&name);
    let gone = |settled| {
        Ok(Reread {
            record: None,
            settled,
        })
    };
    let before = match fs.lstat(&dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => return gone(true),
        Err(e) if e.is_not_found_io() => {
            // A create not yet renamed into place: its builder holds `staging/<id>/state`
            // locked from before its intent until after its entry.
            let st = root.join(STAGING).join(&name).join(STATE);
            let building = match fs.open_read(&st) {
                Ok(f) => !fs.try_lock(&f, &st)?,
                Err(e) if e.is_not_found_io() || e.is_corrupt() => false,
                Err(e) => return Err(e),
            };
            return gone(!building);
        }
        Err(e) => return Err(e),
    };
    let state_path = dir.join(STATE);
    let mut settled = true;
    let state = match fs.open_read(&state_path) {
        Ok(f) => {
            settled = fs.try_lock(&f, &state_path)?;
            state_file::newest_slot(&state_file::read_slots(fs, &f, &state_path)?)
        }
        Err(e) if e.is_corrupt() || e.is_not_found_io() => Vec::new(),
        Err(e) => return Err(e),
    };
    // Moved away meanwhile (a removal, under its lock): read again after the change.
    if !fs.same_entry(&dir, &before)? {
        return gone(false);
    }
    let manifest = match fs.read_bounded(&dir.join(MANIFEST), crate::format::manifest::MAX_FILE) {
        Ok(b) => b,
        Err(e) if e.is_corrupt() || e.is_not_found_io() => Vec::new(),
        Err(e) => return Err(e),
    };
    // The record's facts decode the manifest once; they say whether it is a (valid) download.
    let mut record = IndexRecord::new(*id.as_bytes(), false, &state, &manifest);
    let download = fmt::Facts::decode(record.facts()).is_some_and(|f| f.download);
    record.resume = download
        && match fs.lstat(&dir.join(RESUME)) {
            Ok(m) => m.is_file(),
            Err(e) if e.is_not_found_io() => false,
            Err(e) => return Err(e),
        };
    Ok(Reread {
        record: Some(record),
        settled,
    })
}

/// Reads every transfer directory: the records in id order, and the names that are not
/// transfers (not a canonical id, or not a directory), as [`crate::Store::scan`] sorts them.
pub(super) fn rebuild(fs: &Fs, root: &Path) -> Result<(Vec<IndexRecord>, Vec<String>)> {
    let mut records = Vec::new();
    let mut unknown = Vec::new();
    for e in fs.list(&root.join(TRANSFERS))? {
        match e.name.to_str().and_then(TransferId::parse_canonical) {
            Some(id) if e.is_dir => records.extend(reread(fs, root, id)?.record),
            _ => unknown.push(e.name.to_string_lossy().into_owned()),
        }
    }
    records.sort_unstable_by_key(|r| r.id);
    unknown.sort();
    Ok((records, unknown))
}
