//! The one public error type of the crate.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::id::TransferId;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in waybill.
///
/// Match on [`Error::kind`]; the `Display` text is a sentence meant for a person and names the
/// file or transfer involved.
#[derive(Debug)]
pub struct Error(Box<ErrorKind>);

/// What went wrong, with the facts needed to act on it.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An I/O operation failed.
    Io {
        /// What the store was doing, e.g. `"sync directory"`.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file failed its checks; it is never guessed at.
    Corrupt {
        /// The file that failed.
        path: PathBuf,
        /// Which part failed and how (slot, checksum expected vs found, length, ...).
        detail: Corruption,
    },
    /// The store, or one of its files, was written by a newer format this build cannot read.
    UnsupportedVersion {
        /// The file that carries the version.
        path: PathBuf,
        /// The version found.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// No transfer (or group) with that name exists.
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The caller passed something the store refuses (bad name, size over a limit, wrong session).
    InvalidArgument {
        /// Why it was refused.
        reason: String,
    },
    /// A linked (or copied) payload no longer matches what was recorded when it was created.
    PayloadChanged {
        /// The transfer whose payload changed.
        id: TransferId,
        /// What differs.
        detail: String,
    },
    /// An earlier sync failed, so data may be lost; reopen the store before using it again.
    Poisoned {
        /// The sync failure that poisoned the store.
        cause: String,
    },
    /// Another thread or process held a lock for longer than the configured wait.
    Busy {
        /// The lock file.
        path: PathBuf,
    },
    /// The file system refused access (for example iOS data protection while the device is
    /// locked). Never treated as corruption; try again later.
    Unavailable {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// The specific check a corrupt file failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// The file does not start with the expected magic bytes.
    BadMagic {
        /// The bytes expected.
        expected: [u8; 4],
        /// The bytes found (zero-padded when the file is shorter).
        found: [u8; 4],
    },
    /// The stored checksum does not match the bytes.
    Checksum {
        /// The state slot (0 or 1), when the file is a state file.
        slot: Option<u8>,
        /// The CRC-32 stored in the header.
        expected: u32,
        /// The CRC-32 computed over the bytes read.
        found: u32,
    },
    /// A length field is out of bounds for the file or for the format's limits.
    Length {
        /// The state slot (0 or 1), when the file is a state file.
        slot: Option<u8>,
        /// The length found.
        found: u64,
        /// The largest length allowed there.
        max: u64,
    },
    /// The file is shorter than its header says.
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// The checksummed body does not decode.
    Decode {
        /// The state slot (0 or 1), when the file is a state file.
        slot: Option<u8>,
        /// What the decoder said.
        reason: String,
    },
    /// Neither state slot holds a valid copy.
    BothSlots {
        /// Why slot 0 was rejected.
        slot0: Box<Corruption>,
        /// Why slot 1 was rejected.
        slot1: Box<Corruption>,
    },
    /// The entry is not of the expected type (a symlink, a directory where a file belongs, ...).
    WrongType {
        /// What was found.
        found: String,
    },
    /// The manifest names a different transfer than its directory.
    IdMismatch {
        /// The id in the directory name.
        expected: TransferId,
        /// The id in the manifest.
        found: TransferId,
    },
}

impl Error {
    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.0
    }

    /// Consumes the error and returns what went wrong.
    pub fn into_kind(self) -> ErrorKind {
        *self.0
    }

    /// True if the error came from a failed check on stored bytes.
    pub fn is_corrupt(&self) -> bool {
        matches!(*self.0, ErrorKind::Corrupt { .. })
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        let path = path.to_path_buf();
        // Permission errors are reported as "unavailable" (data protection, sandbox), never as
        // corruption, so callers retry later instead of discarding anything.
        if source.kind() == io::ErrorKind::PermissionDenied {
            return ErrorKind::Unavailable { op, path, source }.into();
        }
        ErrorKind::Io { op, path, source }.into()
    }

    /// The same error naming `path` as its file (decoders given no path name none).
    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        if let ErrorKind::Corrupt { path: p, .. } | ErrorKind::UnsupportedVersion { path: p, .. } =
            &mut *self.0
        {
            *p = path.to_path_buf();
        }
        self
    }

    pub(crate) fn corrupt(path: &Path, detail: Corruption) -> Self {
        ErrorKind::Corrupt {
            path: path.to_path_buf(),
            detail,
        }
        .into()
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        ErrorKind::InvalidArgument {
            reason: reason.into(),
        }
        .into()
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        ErrorKind::NotFound { what: what.into() }.into()
    }

    /// A copy of this error for another change it also decides (every change a failed shared
    /// flush covered): the same kind and facts; an I/O source keeps its OS error code, or
    /// else its kind and message.
    pub(crate) fn duplicate(&self) -> Self {
        let io_copy = |e: &io::Error| match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        match &*self.0 {
            ErrorKind::Io { op, path, source } => ErrorKind::Io {
                op,
                path: path.clone(),
                source: io_copy(source),
            },
            ErrorKind::Unavailable { op, path, source } => ErrorKind::Unavailable {
                op,
                path: path.clone(),
                source: io_copy(source),
            },
            ErrorKind::Corrupt { path, detail } => ErrorKind::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            ErrorKind::UnsupportedVersion {
                path,
                found,
                supported,
            } => ErrorKind::UnsupportedVersion {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            ErrorKind::NotFound { what } => ErrorKind::NotFound { what: what.clone() },
            ErrorKind::InvalidArgument { reason } => ErrorKind::InvalidArgument {
                reason: reason.clone(),
            },
            ErrorKind::PayloadChanged { id, detail } => ErrorKind::PayloadChanged {
                id: *id,
                detail: detail.clone(),
            },
            ErrorKind::Poisoned { cause } => ErrorKind::Poisoned {
                cause: cause.clone(),
            },
            ErrorKind::Busy { path } => ErrorKind::Busy { path: path.clone() },
        }
        .into()
    }

    /// The raw OS error of an I/O error, if any.
    pub(crate) fn raw_os_error(&self) -> Option<i32> {
        match &*self.0 {
            ErrorKind::Io { source, .. } | ErrorKind::Unavailable { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    pub(crate) fn is_not_found_io(&self) -> bool {
        matches!(&*self.0, ErrorKind::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl From<ErrorKind> for Error {
    fn from(kind: ErrorKind) -> Self {
        Error(Box::new(kind))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            ErrorKind::Io { op, path, source } => {
                write!(f, "{op} {}: {source}", path.display())
            }
            ErrorKind::Corrupt { path, detail } => {
                write!(f, "{} is corrupt: {detail}", path.display())
            }
            ErrorKind::UnsupportedVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{} has format version {found}, but this build reads versions up to {supported}",
                path.display()
            ),
            ErrorKind::NotFound { what } => write!(f, "{what} was not found"),
            ErrorKind::InvalidArgument { reason } => write!(f, "invalid argument: {reason}"),
            ErrorKind::PayloadChanged { id, detail } => {
                write!(
                    f,
                    "the payload of transfer {id} changed after it was recorded: {detail}"
                )
            }
            ErrorKind::Poisoned { cause } => write!(
                f,
                "the store is poisoned by an earlier failed sync ({cause}); reopen it before further use"
            ),
            ErrorKind::Busy { path } => write!(
                f,
                "timed out waiting for the lock on {}; another thread or process holds it",
                path.display()
            ),
            ErrorKind::Unavailable { op, path, source } => write!(
                f,
                "{op} {}: {source} (the store is unavailable right now, for example while the device is locked)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &*self.0 {
            ErrorKind::Io { source, .. } | ErrorKind::Unavailable { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = |s: &Option<u8>| s.map(|s| format!("slot {s}: ")).unwrap_or_default();
        match self {
            Corruption::BadMagic { expected, found } => {
                write!(f, "magic bytes {found:02x?}, expected {expected:02x?}")
            }
            Corruption::Checksum {
                slot: s,
                expected,
                found,
            } => write!(
                f,
                "{}checksum mismatch: stored {expected:#010x}, computed {found:#010x}",
                slot(s)
            ),
            Corruption::Length {
                slot: s,
                found,
                max,
            } => {
                write!(f, "{}length {found} exceeds the limit {max}", slot(s))
            }
            Corruption::Truncated { needed, found } => {
                write!(f, "truncated: {found} bytes, {needed} needed")
            }
            Corruption::Decode { slot: s, reason } => {
                write!(f, "{}body does not decode: {reason}", slot(s))
            }
            Corruption::BothSlots { slot0, slot1 } => {
                write!(f, "no valid state slot (slot 0: {slot0}; slot 1: {slot1})")
            }
            Corruption::WrongType { found } => write!(f, "unexpected file type: {found}"),
            Corruption::IdMismatch { expected, found } => {
                write!(
                    f,
                    "manifest names transfer {found}, directory names {expected}"
                )
            }
        }
    }
}
