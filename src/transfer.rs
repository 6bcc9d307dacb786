//! The public description of a transfer: what it is (its manifest) and where it stands (its state).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
pub use crate::id::TransferId;
use crate::value::Value;

impl FromStr for TransferId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        TransferId::parse_canonical(s).ok_or_else(|| {
            Error::invalid(format!(
                "{s:?} is not a transfer id (a lowercase hyphenated UUID)"
            ))
        })
    }
}

/// Upload or download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The library holds a payload that the platform sends.
    Upload,
    /// The platform receives bytes that the library keeps.
    Download,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Upload => "upload",
            Kind::Download => "download",
        })
    }
}

/// One request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value. Empty when the header is secret and was read back from disk.
    pub value: String,
    /// A secret header (a bearer token, say) is never written to disk: only its name is kept,
    /// and the caller supplies the value again when it recreates the task.
    pub secret: bool,
}

/// What to ask the platform to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// HTTP method, e.g. `PUT`.
    pub method: String,
    /// The URL, as given.
    pub url: String,
    /// Headers in order.
    pub headers: Vec<Header>,
}

impl Request {
    /// A request with the given method and URL and no headers.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Request {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
        }
    }

    /// Names of the secret headers, whose values the caller must supply again.
    pub fn secret_header_names(&self) -> impl Iterator<Item = &str> {
        self.headers
            .iter()
            .filter(|h| h.secret)
            .map(|h| h.name.as_str())
    }
}

/// How failures are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Failures after which the transfer gives up. Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry. Default 2 s; it doubles after each failure.
    pub initial_backoff: Duration,
    /// The longest delay between retries. Default 10 minutes.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The delay before the retry that follows the `failures`-th failure (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(31);
        self.initial_backoff
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// How an upload's payload is taken from an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkMode {
    /// The source is immutable: hard-link it, and copy where linking fails (another file
    /// system, or linking refused).
    #[default]
    Auto,
    /// The source is immutable: hard-link it, or fail.
    HardLink,
    /// Always copy (the source may change after the call).
    Copy,
}

/// Where an upload's body comes from.
#[derive(Debug, Clone)]
pub enum UploadSource {
    /// An existing file, linked or copied as `link` says.
    File {
        /// The source file.
        path: PathBuf,
        /// Link or copy.
        link: LinkMode,
    },
    /// Bytes in memory; the library writes them to the payload file.
    Bytes(Vec<u8>),
}

/// How the payload of an upload is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFacts {
    /// No payload (a download).
    None,
    /// The library wrote these bytes.
    Written {
        /// Length in bytes.
        len: u64,
    },
    /// A synced copy of a file.
    Copied {
        /// Length in bytes.
        len: u64,
    },
    /// A hard link to the caller's immutable file; its identity at create time.
    Linked {
        /// Length in bytes.
        len: u64,
        /// Device number.
        dev: u64,
        /// Inode number.
        ino: u64,
        /// Modification time, nanoseconds since the Unix epoch.
        mtime_ns: i128,
    },
}

impl PayloadFacts {
    /// The payload length, zero for none.
    pub fn len(&self) -> u64 {
        match *self {
            PayloadFacts::None => 0,
            PayloadFacts::Written { len }
            | PayloadFacts::Copied { len }
            | PayloadFacts::Linked { len, .. } => len,
        }
    }

    /// True when there is no payload or it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The immutable description of a transfer: everything needed to restart it from scratch.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Manifest {
    /// The transfer's id.
    pub id: TransferId,
    /// Upload or download.
    pub kind: Kind,
    /// The platform session that runs it.
    pub session: String,
    /// The request to hand to the platform (secret header values are empty).
    pub request: Request,
    /// The group it belongs to, if any.
    pub group: Option<String>,
    /// When it was created.
    pub created: SystemTime,
    /// When it expires, if ever.
    pub deadline: Option<SystemTime>,
    /// How failures are retried.
    pub retry: RetryPolicy,
    /// How the payload is held.
    pub payload: PayloadFacts,
    /// Sent with every attempt so a server can drop a body it already has.
    pub idempotency_key: String,
    /// App metadata.
    pub metadata: Value,
}

/// Where a transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Created, no task running yet.
    Pending,
    /// Bound to a platform task.
    Running,
    /// Failed, and a retry is due at `next_attempt`.
    WaitingToRetry,
    /// Ended well; the outcome waits for acknowledgement.
    Completed,
    /// Ended badly for good; the outcome waits for acknowledgement.
    Failed,
    /// Cancelled; the record waits to be purged.
    Cancelled,
}

impl Phase {
    /// Completed, failed or cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// All phases, in lifecycle order.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Running,
        Phase::WaitingToRetry,
        Phase::Completed,
        Phase::Failed,
        Phase::Cancelled,
    ];
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::WaitingToRetry => "waiting-to-retry",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        })
    }
}

impl FromStr for Phase {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Phase::ALL
            .into_iter()
            .find(|p| p.to_string() == s)
            .ok_or_else(|| Error::invalid(format!("unknown phase {s:?}")))
    }
}

/// The platform task a transfer is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskBinding {
    /// The session that runs the task (always the manifest's session).
    pub session: String,
    /// The task id, unique within the session (but reused after a reinstall).
    pub task_id: u64,
    /// The tag set on the task's request, if any.
    pub tag: Option<String>,
}

/// Why a transfer failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// The caller reported a permanent error.
    Permanent,
    /// The retry policy was spent.
    GaveUp,
    /// The deadline passed.
    Expired,
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded, with the HTTP status when known.
    Succeeded {
        /// HTTP status code.
        status: Option<u16>,
    },
    /// It failed for good.
    Failed {
        /// Why.
        reason: FailReason,
        /// The last error message.
        error: String,
    },
    /// It was cancelled.
    Cancelled,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Succeeded { status: Some(s) } => write!(f, "succeeded ({s})"),
            Outcome::Succeeded { status: None } => f.write_str("succeeded"),
            Outcome::Failed { reason, error } => {
                let r = match reason {
                    FailReason::Permanent => "permanent error",
                    FailReason::GaveUp => "gave up",
                    FailReason::Expired => "expired",
                };
                write!(f, "failed ({r}): {error}")
            }
            Outcome::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// The mutable part of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct State {
    /// Lifecycle phase.
    pub phase: Phase,
    /// Failures counted so far.
    pub failures: u32,
    /// When the next attempt is due (set while waiting to retry).
    pub next_attempt: Option<SystemTime>,
    /// The platform task, while one is bound.
    pub binding: Option<TaskBinding>,
    /// A request that replaces the manifest's (a fresh pre-signed URL, new headers).
    pub current_request: Option<Request>,
    /// Bytes sent or received, as last reported.
    pub bytes_done: u64,
    /// Total bytes expected, when known.
    pub bytes_total: Option<u64>,
    /// The last error reported.
    pub last_error: Option<String>,
    /// How it ended, once it has.
    pub outcome: Option<Outcome>,
    /// Bytes of `partial` that are durable (downloads).
    pub partial_len: u64,
    /// Whether a finished download file has been moved in.
    pub downloaded: bool,
    /// True when both state slots were unreadable and this state was rebuilt from the manifest;
    /// the binding and counters are then unknown.
    pub rebuilt: bool,
}

impl State {
    /// The state of a new transfer.
    pub fn new() -> Self {
        State {
            phase: Phase::Pending,
            failures: 0,
            next_attempt: None,
            binding: None,
            current_request: None,
            bytes_done: 0,
            bytes_total: None,
            last_error: None,
            outcome: None,
            partial_len: 0,
            downloaded: false,
            rebuilt: false,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

/// A transfer as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// The immutable part.
    pub manifest: Manifest,
    /// The mutable part.
    pub state: State,
}

impl Transfer {
    /// The transfer's id.
    pub fn id(&self) -> TransferId {
        self.manifest.id
    }

    /// The request to run now: the replacement if one was recorded, else the manifest's.
    pub fn request(&self) -> &Request {
        self.state
            .current_request
            .as_ref()
            .unwrap_or(&self.manifest.request)
    }
}

/// A transfer to create.
#[derive(Debug, Clone)]
pub struct NewTransfer {
    pub(crate) kind: Kind,
    pub(crate) session: String,
    pub(crate) request: Request,
    pub(crate) group: Option<String>,
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) retry: RetryPolicy,
    pub(crate) source: Option<UploadSource>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) metadata: Value,
}

/// The session a transfer belongs to when none is given.
pub const DEFAULT_SESSION: &str = "default";

impl NewTransfer {
    /// An upload (`PUT` by default) of `source` to `url`.
    pub fn upload(url: impl Into<String>, source: UploadSource) -> Self {
        Self::new(Kind::Upload, Request::new("PUT", url), Some(source))
    }

    /// A download (`GET`) of `url`.
    pub fn download(url: impl Into<String>) -> Self {
        Self::new(Kind::Download, Request::new("GET", url), None)
    }

    fn new(kind: Kind, request: Request, source: Option<UploadSource>) -> Self {
        NewTransfer {
            kind,
            session: DEFAULT_SESSION.to_owned(),
            request,
            group: None,
            deadline: None,
            retry: RetryPolicy::default(),
            source,
            idempotency_key: None,
            metadata: Value::empty_map(),
        }
    }

    /// The platform session that will run it (default `"default"`).
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = session.into();
        self
    }

    /// The HTTP method.
    pub fn method(mut self, method: impl Into<String>) -> Self {
        self.request.method = method.into();
        self
    }

    /// Adds a header that is stored on disk.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.push(Header {
            name: name.into(),
            value: value.into(),
            secret: false,
        });
        self
    }

    /// Adds a header whose value is never written to disk (only its name is).
    pub fn secret_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.headers.push(Header {
            name: name.into(),
            value: value.into(),
            secret: true,
        });
        self
    }

    /// Makes it a member of `group`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Fails it as expired after `deadline`.
    pub fn deadline(mut self, deadline: SystemTime) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How failures are retried.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The idempotency key (default: the transfer id).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets one metadata entry (the metadata is a map).
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        if let Value::Map(m) = &mut self.metadata {
            m.insert(key.into(), value.into());
        }
        self
    }

    /// Replaces the whole metadata value.
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// How durable a progress report must be when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Written and data-synced before the call returns. Survives a process crash and a power loss.
    Immediate,
    /// Kept in this handle's memory and written (with a sync) at most once per flush interval per
    /// transfer: at the first report after the interval, at the transfer's next lifecycle change,
    /// at [`Store::flush`](crate::Store::flush), or when the store is dropped. A process crash or
    /// a power loss can lose the reports since the last flush; it never loses a lifecycle change
    /// or an earlier durable report. Lifecycle changes are never coalesced.
    #[default]
    Coalesced,
}

/// Times are kept to the millisecond: on disk, in the index and in plans.
/// Milliseconds since the Unix epoch; times before it are clamped to zero.
pub(crate) fn to_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`to_ms`], saturating at the largest representable time.
pub(crate) fn from_ms(ms: u64) -> std::time::SystemTime {
    let d = std::time::Duration::from_millis(ms);
    std::time::UNIX_EPOCH
        .checked_add(d)
        .unwrap_or(std::time::UNIX_EPOCH)
}
