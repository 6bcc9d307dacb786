//! # waybill
//!
//! Crash-safe state for long-running background transfers (uploads and downloads).
//!
//! Each transfer is a directory named by its id: an immutable **manifest** (everything needed to
//! restart it from scratch), a two-slot checksummed **state** file (rewritten with one write and
//! one data sync, never torn), and the **payload** (a hard link to an immutable source file, a
//! copy, or bytes the library wrote). Creation builds in `staging/` and renames into place;
//! removal renames into `trash/` first. Several processes (an app and its extension) may use one
//! store at once; lifecycle changes are compare-and-set, so exactly one of them wins a
//! completion.
//!
//! ```
//! # fn main() -> Result<(), waybill::Error> {
//! use waybill::{Completion, Durability, NewTransfer, Store, TaskBinding, UploadSource};
//!
//! let dir = tempfile::tempdir().expect("tempdir");
//! let store = Store::open(dir.path())?;
//!
//! // Record the upload before handing it to the platform.
//! let id = store.create(
//!     NewTransfer::upload("https://example.com/photos/1", UploadSource::Bytes(vec![7; 1024]))
//!         .group("album-1")
//!         .meta("title", "sunset"),
//! )?;
//! // Bind the platform task durably before resuming it.
//! store.bind(id, TaskBinding { session: "default".into(), task_id: 42, tag: Some(id.to_string()) })?;
//! store.progress(id, 512, Some(1024), Durability::Coalesced)?;
//!
//! // Later, in whichever process sees the completion:
//! assert!(matches!(store.complete(id, Some(201))?, Completion::Won(_)));
//! assert_eq!(store.find_by_task("default", 42)?.map(|t| t.id()), Some(id));
//!
//! // The app handled the outcome: purge the record; the group still counts it.
//! store.acknowledge(id)?;
//! assert_eq!(store.group("album-1")?.succeeded, 1);
//! # Ok(()) }
//! ```
//!
//! The on-disk format is specified in `docs/FORMAT.md`.

#![cfg_attr(
    test,
    allow(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        reason = "unit tests index buffers they built themselves"
    )
)]
mod error;
mod format;
mod fs;
mod id;
mod index;
mod layout;
mod reconcile;
mod state_file;
mod store;
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        clippy::indexing_slicing,
        clippy::unwrap_used,
        reason = "test machinery, built outside tests only for the fuzz targets"
    )
)]
mod testkit;
mod transfer;
mod value;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub use testkit::fuzzing;

pub use error::{Corruption, Error, ErrorKind, Result};
pub use format::FORMAT_VERSION;
pub use reconcile::{
    Action, CancelReason, Plan, ReconcileOptions, Record, ResumeFrom, Sessions, Task, TaskRef,
    TaskState, plan, plan_reset,
};
pub use store::{
    ApplyReport, Batch, CancelResult, Changed, CheckReport, Completion, ErrorClass, FailResult,
    Filter, GcReport, GroupClaim, GroupSummary, MAX_ERROR_BYTES, MAX_NAME_BYTES, MAX_RESUME_BYTES,
    OpenReport, RecordPart, RepairReport, Scan, Stats, Store, StoreBuilder, Unreadable,
};
pub use transfer::{
    DEFAULT_SESSION, Durability, FailReason, Header, Kind, LinkMode, Manifest, NewTransfer,
    Outcome, PayloadFacts, Phase, Request, RetryPolicy, State, TaskBinding, Transfer, TransferId,
    UploadSource,
};
pub use value::{MAX_METADATA_BYTES, MAX_METADATA_DEPTH, Value};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
