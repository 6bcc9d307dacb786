//! The names of the store's files and folders, and the paths built from them (FORMAT.md §1.1).
//! Every other module asks here; none spells a name on disk itself.

use std::path::{Path, PathBuf};

use crate::transfer::TransferId;

/// The store's format version file, at the root.
pub(crate) const FORMAT_FILE: &str = "FORMAT";
/// The prefix of a `FORMAT` file being written (a unique suffix follows).
pub(crate) const FORMAT_TEMP_PREFIX: &str = "FORMAT.tmp-";
/// The file whose lock serializes opening, clearing debris and repair.
pub(crate) const LOCK_FILE: &str = "lock";
/// The change journal of the derived index.
pub(crate) const JOURNAL_FILE: &str = "journal";
/// The derived index.
pub(crate) const INDEX_FILE: &str = "index.redb";
/// One directory per transfer, named by its id.
pub(crate) const TRANSFERS: &str = "transfers";
/// Transfers being built, renamed into `transfers/` when whole.
pub(crate) const STAGING: &str = "staging";
/// Transfers being removed, renamed here before their files are deleted.
pub(crate) const TRASH: &str = "trash";
/// Records and stray files moved aside for a person to look at.
pub(crate) const QUARANTINE: &str = "quarantine";
/// One directory per group, holding its tallies.
pub(crate) const GROUPS: &str = "groups";

/// A transfer's immutable manifest.
pub(crate) const MANIFEST: &str = "manifest";
/// A transfer's two-slot state file.
pub(crate) const STATE: &str = "state";
/// An upload's source bytes, or a download's accepted file.
pub(crate) const PAYLOAD: &str = "payload";
/// A download's bytes received so far.
pub(crate) const PARTIAL: &str = "partial";
/// A download's resume data from the platform.
pub(crate) const RESUME: &str = "resume";
/// Resume data being written, renamed to [`RESUME`] when whole.
pub(crate) const RESUME_TEMP: &str = "resume.tmp";
/// An accepted download being copied, renamed to [`PAYLOAD`] when whole.
pub(crate) const PAYLOAD_TEMP: &str = "payload.tmp";

/// A group's tally of purged members.
pub(crate) const PURGED: &str = "purged";
/// A group's claim that it finished (created by exactly one caller).
pub(crate) const FINISHED: &str = "finished";

/// The prefix of a stray file's name once moved into `quarantine/`.
pub(crate) const STRAY_PREFIX: &str = "stray-";

/// Names allowed at the root (besides [`FORMAT_TEMP_PREFIX`] files of a store being created).
pub(crate) const ROOT_ENTRIES: [&str; 9] = [
    FORMAT_FILE,
    LOCK_FILE,
    TRANSFERS,
    STAGING,
    TRASH,
    QUARANTINE,
    GROUPS,
    INDEX_FILE,
    JOURNAL_FILE,
];
/// The folders at the root, created when a store is.
pub(crate) const ROOT_DIRS: [&str; 5] = [TRANSFERS, STAGING, TRASH, QUARANTINE, GROUPS];
/// Names allowed inside a transfer's directory.
pub(crate) const RECORD_FILES: [&str; 5] = [MANIFEST, STATE, PAYLOAD, PARTIAL, RESUME];
/// Temporary files of interrupted download steps.
pub(crate) const RECORD_TEMPS: [&str; 2] = [RESUME_TEMP, PAYLOAD_TEMP];

/// `transfers/<id>` below `root`.
pub(crate) fn transfer_dir(root: &Path, id: TransferId) -> PathBuf {
    root.join(TRANSFERS).join(id.to_string())
}

/// The directory name of group `name`: `g-` and its bytes in hex, so any name is a safe
/// file name.
pub(crate) fn group_dir_name(name: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(2 + name.len() * 2);
    s.push_str("g-");
    for b in name.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}
