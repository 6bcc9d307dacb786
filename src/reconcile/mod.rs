//! The reconciler: after a relaunch, one [`Plan`] that accounts for every platform task and
//! every record exactly once.
//!
//! Planning ([`plan`]) is a pure function of the supplied sessions, the tasks the platform
//! reports, the store's records and the clock. [`Store::reconcile`] gathers the records and
//! plans; [`Store::apply`] performs the store's side of a plan, one durable compare-and-set step
//! per action, so a crash halfway leaves a store from which the same plan (less what was
//! applied) is computed again.
//!
//! The relaunch flow:
//!
//! ```
//! # fn main() -> Result<(), waybill::Error> {
//! use std::time::SystemTime;
//! use waybill::{Action, NewTransfer, Sessions, Store, Task, TaskBinding};
//!
//! # let dir = tempfile::tempdir().expect("tempdir");
//! let store = Store::open(dir.path())?;
//! # let id = store.create(NewTransfer::download("https://example.com/a"))?;
//! # store.bind(id, TaskBinding { session: "default".into(), task_id: 1, tag: Some(id.to_string()) })?;
//! // The tasks the platform still runs, as it reports them after the relaunch.
//! let tasks = vec![Task::running("default", 1, "https://example.com/a").tag(id.to_string())];
//! let plan = store.reconcile(&Sessions::only(["default"]), &tasks, SystemTime::now())?;
//! let report = store.apply(&plan)?;
//! for action in &plan.actions {
//!     match action {
//!         Action::Adopt { id, task, .. } => { /* attach UI state for task.task_id to id */ }
//!         Action::Cancel { task, .. } => { /* cancel the platform task */ }
//!         Action::Recreate { id, request, not_before, .. }
//!         | Action::Resume { id, request, not_before, .. } => {
//!             // Create the platform task (with secret headers supplied again), record it with
//!             // `store.rebind(*id, binding, None)`, then resume it.
//!         }
//!         Action::Deliver { id, outcome, .. } if !report.claims_lost.contains(id) => {
//!             // Show the outcome, then `store.acknowledge(*id)`.
//!         }
//!         _ => { /* purge, expire, quarantine, give_up: stop the riding task, if any */ }
//!     }
//! }
//! # assert!(matches!(plan.actions[0], Action::Adopt { .. }));
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::transfer::{Kind, Outcome, Phase, Request, RetryPolicy, Transfer, TransferId};

/// Which sessions a reconcile covers. Records and tasks of other sessions are left alone (an
/// extension reconciles its own session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sessions {
    /// Every session.
    All,
    /// Only these sessions.
    Only(BTreeSet<String>),
}

impl Sessions {
    /// Only the named sessions.
    pub fn only<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Sessions::Only(names.into_iter().map(Into::into).collect())
    }

    /// Whether `session` is covered.
    pub fn contains(&self, session: &str) -> bool {
        match self {
            Sessions::All => true,
            Sessions::Only(s) => s.contains(session),
        }
    }
}

/// What the platform says a task is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Transferring.
    Running,
    /// Paused.
    Suspended,
    /// Being cancelled.
    Cancelling,
    /// Ended, with a status or an error.
    Completed,
}

/// A task the platform reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Session identifier.
    pub session: String,
    /// Task id, unique within the session (reused after a reinstall).
    pub task_id: u64,
    /// The original request URL.
    pub url: String,
    /// The tag set on the request, if it survived.
    pub tag: Option<String>,
    /// What the task is doing.
    pub state: TaskState,
    /// HTTP status of a completed task.
    pub status: Option<u16>,
    /// Error of a completed task that failed.
    pub error: Option<String>,
    /// Bytes transferred.
    pub bytes_done: u64,
    /// Bytes expected, if known.
    pub bytes_total: Option<u64>,
}

impl Task {
    /// A running task with no tag and no counters.
    pub fn running(session: impl Into<String>, task_id: u64, url: impl Into<String>) -> Self {
        Task {
            session: session.into(),
            task_id,
            url: url.into(),
            tag: None,
            state: TaskState::Running,
            status: None,
            error: None,
            bytes_done: 0,
            bytes_total: None,
        }
    }

    /// The same task with a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// The same task, completed with an HTTP status and no error.
    pub fn completed(mut self, status: u16) -> Self {
        self.state = TaskState::Completed;
        self.status = Some(status);
        self
    }

    /// The same task, completed with an error.
    pub fn failed(mut self, error: impl Into<String>) -> Self {
        self.state = TaskState::Completed;
        self.error = Some(error.into());
        self
    }

    /// The task's identity.
    pub fn key(&self) -> TaskRef {
        TaskRef {
            session: self.session.clone(),
            task_id: self.task_id,
        }
    }

    /// A completed task succeeded when it carries no error and a status below 400 (or none).
    fn succeeded(&self) -> bool {
        self.error.is_none() && self.status.is_none_or(|s| s < 400)
    }

    fn failure_text(&self) -> String {
        match (&self.error, self.status) {
            (Some(e), _) => e.clone(),
            (None, Some(s)) => format!("HTTP status {s}"),
            (None, None) => "failed".to_owned(),
        }
    }
}

/// A platform task named in an action.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskRef {
    /// Session identifier.
    pub session: String,
    /// Task id within the session.
    pub task_id: u64,
}

/// A record as the planner sees it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The transfer.
    pub transfer: Transfer,
    /// Whether resume data is stored (downloads).
    pub has_resume_data: bool,
}

/// What the planner reads of a record: a whole [`Record`], or the store's view of one read
/// from its index (`crate::format::index::Facts`, read in place; the files are decoded only
/// for the request of a `recreate`/`resume` and the outcome of a `deliver`).
pub(crate) trait Planned: Sync {
    /// The transfer's id.
    fn id(&self) -> TransferId;
    /// The manifest's session.
    fn session(&self) -> &str;
    /// The manifest's idempotency key, unless it is the id's canonical text (which the planner
    /// finds by id).
    fn other_key(&self) -> Option<&str>;
    /// Upload or download.
    fn kind(&self) -> Kind;
    /// The manifest's deadline.
    fn deadline(&self) -> Option<SystemTime>;
    /// The manifest's retry policy.
    fn retry(&self) -> RetryPolicy;
    /// The state's phase.
    fn phase(&self) -> Phase;
    /// The state's failure count.
    fn failures(&self) -> u32;
    /// When the state's next attempt is due.
    fn next_attempt(&self) -> Option<SystemTime>;
    /// The state's binding: session, task id and tag.
    fn binding(&self) -> Option<(&str, u64, Option<&str>)>;
    /// The state's durable partial length.
    fn partial_len(&self) -> u64;
    /// The state's outcome, owned.
    fn outcome(&self) -> Option<Outcome>;
    /// Whether resume data is stored.
    fn has_resume_data(&self) -> bool;
    /// The URL of the request to run now (the replacement's, else the manifest's).
    fn url(&self) -> &str;
    /// The request to run now, owned.
    fn request(&self) -> Request;
}

impl Planned for Record {
    fn id(&self) -> TransferId {
        self.transfer.id()
    }
    fn session(&self) -> &str {
        &self.transfer.manifest.session
    }
    fn other_key(&self) -> Option<&str> {
        let key = self.transfer.manifest.idempotency_key.as_str();
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        (key != own_text(self.id(), &mut buf)).then_some(key)
    }
    fn kind(&self) -> Kind {
        self.transfer.manifest.kind
    }
    fn deadline(&self) -> Option<SystemTime> {
        self.transfer.manifest.deadline
    }
    fn retry(&self) -> RetryPolicy {
        self.transfer.manifest.retry
    }
    fn phase(&self) -> Phase {
        self.transfer.state.phase
    }
    fn failures(&self) -> u32 {
        self.transfer.state.failures
    }
    fn next_attempt(&self) -> Option<SystemTime> {
        self.transfer.state.next_attempt
    }
    fn binding(&self) -> Option<(&str, u64, Option<&str>)> {
        self.transfer
            .state
            .binding
            .as_ref()
            .map(|b| (b.session.as_str(), b.task_id, b.tag.as_deref()))
    }
    fn partial_len(&self) -> u64 {
        self.transfer.state.partial_len
    }
    fn outcome(&self) -> Option<Outcome> {
        self.transfer.state.outcome.clone()
    }
    fn has_resume_data(&self) -> bool {
        self.has_resume_data
    }
    fn url(&self) -> &str {
        &self.transfer.request().url
    }
    fn request(&self) -> Request {
        self.transfer.request().clone()
    }
}

/// What a download resumes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// The platform's resume data ([`Store::resume_data`]).
    ResumeData,
    /// The durable partial bytes: request the rest with a `Range` from `len`.
    Partial {
        /// Durable bytes already received.
        len: u64,
    },
}

/// Why a bare task is cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// No record keeps it.
    NoRecord,
    /// It matched several records, or shares its record with another task: never guessed.
    Ambiguous,
}

/// One step of a plan. Every supplied task and every record of a supplied session appears in
/// exactly one action. When a record's action must also stop a task (`purge`, `expire`,
/// `quarantine`, `give_up`, and `recreate`/`resume` replacing a finished task), the task rides
/// inside the action as its `task`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Bind the task to the record and refresh its counters.
    Adopt {
        /// The record.
        id: TransferId,
        /// The task.
        task: TaskRef,
        /// The tag the binding records: the task's, when it names this record (the id, the
        /// idempotency key, or the tag already bound); otherwise the tag already bound.
        tag: Option<String>,
        /// Bytes transferred, from the task.
        bytes_done: u64,
        /// Bytes expected, from the task.
        bytes_total: Option<u64>,
        /// Whether the binding changes (another task, tag or phase than the record has):
        /// [`Store::apply`](crate::Store::apply) writes it durably. When false the record is
        /// already bound to this task and only the counters are news: `apply` keeps them as
        /// coalesced progress and flushes nothing (no compare-and-set: should another process
        /// bind another task before `apply`, these counters may land on that binding until
        /// its own task next reports; an ended record never takes them).
        rebind: bool,
    },
    /// Cancel a task that no record keeps.
    Cancel {
        /// The task.
        task: TaskRef,
        /// Why.
        reason: CancelReason,
    },
    /// The record has no task: create one with `request`, not before `not_before`.
    Recreate {
        /// The record.
        id: TransferId,
        /// The request to hand to the platform (secret header values must be supplied again).
        request: Request,
        /// The attempt number (failures + 1).
        attempt: u32,
        /// Do not start the task before this time.
        not_before: Option<SystemTime>,
        /// A failure this plan counts (a completed task's error); applied by [`Store::apply`].
        failure: Option<String>,
        /// A finished or cancelling task being replaced.
        task: Option<TaskRef>,
    },
    /// Like `recreate`, for a download that resumes.
    Resume {
        /// The record.
        id: TransferId,
        /// The request to hand to the platform.
        request: Request,
        /// The attempt number (failures + 1).
        attempt: u32,
        /// Do not start the task before this time.
        not_before: Option<SystemTime>,
        /// What to resume from.
        from: ResumeFrom,
        /// A failure this plan counts; applied by [`Store::apply`].
        failure: Option<String>,
        /// A finished or cancelling task being replaced.
        task: Option<TaskRef>,
    },
    /// An outcome the app has not acknowledged: deliver it (again).
    Deliver {
        /// The record.
        id: TransferId,
        /// The outcome.
        outcome: Outcome,
        /// True when this plan records the outcome (a task that just succeeded): the claim is
        /// compare-and-set, and a caller whose claim is lost must not deliver.
        claim: bool,
        /// The task that finished, if reported.
        task: Option<TaskRef>,
    },
    /// The record was cancelled: remove its files (and stop its task).
    Purge {
        /// The record.
        id: TransferId,
        /// Its task, to cancel.
        task: Option<TaskRef>,
    },
    /// Past its deadline: fail the record as expired (and stop its task).
    Expire {
        /// The record.
        id: TransferId,
        /// Its task, to cancel.
        task: Option<TaskRef>,
    },
    /// The manifest is corrupt: move the record aside (nothing is deleted), report it, and
    /// stop its task.
    Quarantine {
        /// The record.
        id: TransferId,
        /// Its task, to cancel (matched by tag only: a corrupt record has no trustworthy URL).
        task: Option<TaskRef>,
    },
    /// The failure just reported spends the retry policy: the record fails for good.
    GiveUp {
        /// The record.
        id: TransferId,
        /// The last error.
        error: String,
        /// The finished task.
        task: Option<TaskRef>,
    },
}

impl Action {
    /// The action's name as the CLI and docs use it (`adopt`, `cancel`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Adopt { .. } => "adopt",
            Action::Cancel { .. } => "cancel",
            Action::Recreate { .. } => "recreate",
            Action::Resume { .. } => "resume",
            Action::Deliver { .. } => "deliver",
            Action::Purge { .. } => "purge",
            Action::Expire { .. } => "expire",
            Action::Quarantine { .. } => "quarantine",
            Action::GiveUp { .. } => "give_up",
        }
    }

    /// The record the action is about, if any (a bare `cancel` has none).
    pub fn transfer(&self) -> Option<TransferId> {
        match self {
            Action::Cancel { .. } => None,
            Action::Adopt { id, .. }
            | Action::Recreate { id, .. }
            | Action::Resume { id, .. }
            | Action::Deliver { id, .. }
            | Action::Purge { id, .. }
            | Action::Expire { id, .. }
            | Action::Quarantine { id, .. }
            | Action::GiveUp { id, .. } => Some(*id),
        }
    }

    /// Whether the action leaves its record ended (an outcome to deliver, or removed).
    pub(crate) fn ends_record(&self) -> bool {
        matches!(
            self,
            Action::Deliver { .. }
                | Action::Purge { .. }
                | Action::Expire { .. }
                | Action::GiveUp { .. }
        )
    }

    /// The platform task the action names, if any.
    pub fn task(&self) -> Option<&TaskRef> {
        match self {
            Action::Adopt { task, .. } | Action::Cancel { task, .. } => Some(task),
            Action::Recreate { task, .. }
            | Action::Resume { task, .. }
            | Action::Deliver { task, .. }
            | Action::Purge { task, .. }
            | Action::Expire { task, .. }
            | Action::Quarantine { task, .. }
            | Action::GiveUp { task, .. } => task.as_ref(),
        }
    }
}

/// The answer of a reconcile: actions in a deterministic order (records by id, then bare
/// cancels by session and task id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The actions.
    pub actions: Vec<Action>,
}

impl Plan {
    /// How many actions of each kind, by name.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for a in &self.actions {
            *m.entry(a.name()).or_insert(0) += 1;
        }
        m
    }
}

/// Options of a reconcile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconcileOptions {
    /// Seed of the retry jitter, so a plan is reproducible.
    pub jitter_seed: u64,
    /// The largest fraction by which jitter shortens a backoff (0 to 1). Default 0.25.
    pub jitter: f64,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            jitter_seed: 0,
            jitter: 0.25,
        }
    }
}

/// Up to the first 8 bytes as a little-endian number, zero-padded.
fn le_u64(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    for (d, s) in w.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(w)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The backoff after the `failures`-th failure of `id`, shortened by seeded jitter.
fn jittered(t: &impl Planned, failures: u32, opts: &ReconcileOptions) -> Duration {
    let base = t.retry().backoff(failures);
    let id = t.id();
    let b = id.as_bytes();
    let lo = le_u64(b.get(..8).unwrap_or_default());
    let hi = le_u64(b.get(8..).unwrap_or_default());
    let h = splitmix(opts.jitter_seed ^ lo ^ splitmix(hi ^ u64::from(failures)));
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
    let cut = opts.jitter.clamp(0.0, 1.0) * unit;
    base.mul_f64(1.0 - cut)
}

/// A small, fast hasher for the planner's maps (keys come from the app's own records and
/// platform, and a plan must stay cheap at 100,000 records).
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
            self.write_u64(word);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            self.write_u64(le_u64(rest));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// The records (by index) one piece of evidence points at; almost always exactly one.
#[derive(Debug, Clone)]
enum Cands {
    One(usize),
    Many(Vec<usize>),
}

impl Cands {
    fn add(&mut self, i: usize) {
        match self {
            Cands::One(a) if *a == i => {}
            Cands::One(a) => *self = Cands::Many(vec![*a, i]),
            Cands::Many(v) => {
                if !v.contains(&i) {
                    v.push(i);
                }
            }
        }
    }

    fn as_slice(&self) -> &[usize] {
        match self {
            Cands::One(a) => std::slice::from_ref(a),
            Cands::Many(v) => v,
        }
    }
}

fn add<K: std::hash::Hash + Eq>(m: &mut FxMap<K, Cands>, k: K, i: usize) {
    match m.entry(k) {
        std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().add(i),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(Cands::One(i));
        }
    }
}

/// How many tasks point at one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    None,
    /// One task, by index (a `u32`: the claims of 100,000 records stay small in cache).
    One(u32),
    Many,
}

impl Claim {
    fn add(&mut self, ti: usize) {
        *self = match (*self, u32::try_from(ti)) {
            (Claim::None, Ok(ti)) => Claim::One(ti),
            _ => Claim::Many,
        };
    }
}

/// `named` in id order. Ids are random, so their top bits spread them evenly: a counting sort
/// on those bits orders them but for the few that share a bucket, which a sort of each bucket
/// finishes (cheaper than a comparison sort of them all; ids that do not spread, as in tests,
/// only make the buckets' sorts longer).
fn in_id_order(named: Vec<(TransferId, usize)>) -> Vec<(TransferId, usize)> {
    let bits = named.len().max(2).ilog2().min(20);
    let bucket = |id: &TransferId| {
        let top = id
            .as_bytes()
            .first_chunk::<8>()
            .map_or(0, |b| u64::from_be_bytes(*b));
        usize::try_from(top >> (64 - bits)).unwrap_or(0)
    };
    // Where each bucket starts.
    let mut starts = vec![0usize; (1 << bits) + 1];
    for (id, _) in &named {
        if let Some(c) = starts.get_mut(bucket(id) + 1) {
            *c += 1;
        }
    }
    let mut sum = 0;
    for c in &mut starts {
        sum += *c;
        *c = sum;
    }
    let mut out = vec![(TransferId::from_bytes([0; 16]), 0usize); named.len()];
    let mut next = starts.clone();
    for p in named {
        if let Some(at) = next.get_mut(bucket(&p.0)) {
            if let Some(slot) = out.get_mut(*at) {
                *slot = p;
            }
            *at += 1;
        }
    }
    for w in starts.windows(2) {
        if let (Some(&a), Some(&b)) = (w.first(), w.get(1))
            && b > a + 1
            && let Some(part) = out.get_mut(a..b)
        {
            part.sort_unstable();
        }
    }
    out
}

/// For each task whose tag is an id (as text), the position of the record with that id, and
/// of the corrupt id, if any (`usize::MAX` for none). Found by one merge of the tasks' ids in
/// order with the records, not a search per task: tasks come in any order, and searching the
/// records task by task touches them at random, a cache miss each at 100,000 records.
fn tags_as_ids<R>(
    tasks: &[&Task],
    recs: &[(TransferId, R)],
    corrupt: &[TransferId],
) -> (Vec<usize>, Vec<usize>) {
    let mut rec_of = vec![usize::MAX; tasks.len()];
    let mut corrupt_of = vec![usize::MAX; tasks.len()];
    let named: Vec<(TransferId, usize)> = tasks
        .iter()
        .enumerate()
        .filter_map(|(ti, t)| Some((TransferId::parse_canonical(t.tag.as_deref()?)?, ti)))
        .collect();
    if named.len().saturating_mul(64) < recs.len() {
        // A few tasks among many records: a search each is cheaper than a walk of them all.
        for (id, ti) in named {
            if let (Some(slot), Some(i)) = (rec_of.get_mut(ti), find_id(recs, id)) {
                *slot = i;
            }
            if let (Some(slot), Ok(ci)) = (corrupt_of.get_mut(ti), corrupt.binary_search(&id)) {
                *slot = ci;
            }
        }
        return (rec_of, corrupt_of);
    }
    let named = in_id_order(named);
    let (mut r, mut c) = (0, 0);
    for (id, ti) in named {
        while recs.get(r).is_some_and(|(rid, _)| *rid < id) {
            r += 1;
        }
        if recs.get(r).is_some_and(|(rid, _)| *rid == id)
            && let Some(slot) = rec_of.get_mut(ti)
        {
            *slot = r;
        }
        while corrupt.get(c).is_some_and(|cid| *cid < id) {
            c += 1;
        }
        if corrupt.get(c) == Some(&id)
            && let Some(slot) = corrupt_of.get_mut(ti)
        {
            *slot = c;
        }
    }
    (rec_of, corrupt_of)
}

/// Small numbers for session names, so the planner's keys hash and compare as integers.
#[derive(Default)]
struct Interner<'a> {
    map: FxMap<&'a str, u32>,
    /// The names by number: the first copy seen of each, which the plan's task references
    /// are cloned from (one small string the planner keeps in cache, instead of each task's
    /// own copy scattered through the caller's heap).
    names: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, s: &'a str) -> u32 {
        let next = u32::try_from(self.map.len()).unwrap_or(u32::MAX);
        let id = *self.map.entry(s).or_insert(next);
        if id == next {
            self.names.push(s);
        }
        id
    }

    /// The name numbered `id` (empty for a number never given out).
    fn name(&self, id: u32) -> &'a str {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.names.get(i))
            .copied()
            .unwrap_or("")
    }
}

/// Session names as small numbers, with whether each was supplied (looked up once per name).
struct Names<'a> {
    ids: Interner<'a>,
    supplied: Vec<bool>,
}

impl<'a> Names<'a> {
    /// The name's number, and whether its session was supplied.
    fn id(&mut self, sessions: &Sessions, s: &'a str) -> (u32, bool) {
        let id = self.ids.id(s);
        let i = usize::try_from(id).unwrap_or(usize::MAX);
        if let Some(&known) = self.supplied.get(i) {
            return (id, known);
        }
        let known = sessions.contains(s);
        self.supplied.push(known);
        (id, known)
    }
}

/// The outcome of matching: per record and per corrupt id, its one task (by index); per task,
/// why it is left over (if it is).
struct Matching {
    /// Per record, in the records' order.
    records: Vec<RecordMatch>,
    corrupt_task: Vec<Option<usize>>,
    leftover: Vec<Option<CancelReason>>,
}

/// What matching learns about one record, kept together: each task's match touches one record
/// at random, and everything it reads and writes there is then on one cache line.
#[derive(Debug, Clone, Copy)]
#[repr(align(64))]
struct RecordMatch {
    /// The record's session, by its number.
    session: u32,
    /// The tasks that point at the record.
    claim: Claim,
    /// A task that points at the record also points at another.
    ambiguous: bool,
    /// The claiming task's tag is the record's id (as text), so the tag need not be read again
    /// to be recorded. Meaningful when one task claims the record.
    named_by_id: bool,
    /// The claiming task's numbers, copied while the tasks were read in order.
    nums: TaskNums,
}

impl RecordMatch {
    /// The record's task: the one task that points at it and at no other record.
    fn task(&self) -> Option<usize> {
        match self.claim {
            Claim::One(ti) if !self.ambiguous => usize::try_from(ti).ok(),
            _ => None,
        }
    }
}

/// The checked inputs of one plan: tasks in the order given, records of the supplied sessions
/// in id order, corrupt ids in order, and every session name as a small number.
struct Inputs<'a, R> {
    tasks: Vec<&'a Task>,
    task_session: Vec<u32>,
    recs: Vec<(TransferId, &'a R)>,
    rec_session: Vec<u32>,
    corrupt: Vec<TransferId>,
    sessions: Interner<'a>,
}

/// Checks the inputs (every task of a supplied session, no task reported twice) and keeps the
/// records of the supplied sessions, by id.
fn inputs<'a, R: Planned>(
    sessions: &Sessions,
    tasks: &'a [Task],
    records: &[&'a [R]],
    corrupt: &[TransferId],
) -> Result<Inputs<'a, R>> {
    let mut names = Names {
        ids: Interner::default(),
        supplied: Vec::new(),
    };
    let mut task_session = Vec::with_capacity(tasks.len());
    let mut keys = Vec::with_capacity(tasks.len());
    // Tasks of one session usually follow each other too (see the records below).
    let mut last: Option<(&str, (u32, bool))> = None;
    for t in tasks {
        let (s, supplied) = match last {
            Some((l, known)) if l == t.session => known,
            _ => {
                let known = names.id(sessions, &t.session);
                last = Some((&t.session, known));
                known
            }
        };
        if !supplied {
            return Err(Error::invalid(format!(
                "task {} belongs to session {:?}, which was not supplied",
                t.task_id, t.session
            )));
        }
        task_session.push(s);
        keys.push((s, t.task_id));
    }
    // A task reported twice: sorted, the same (session, task id) twice side by side (a list
    // already in order costs one pass).
    if !keys.is_sorted() {
        keys.sort_unstable();
    }
    if let Some(&(s, task_id)) = keys
        .windows(2)
        .find_map(|w| w.first().filter(|a| w.get(1) == Some(a)))
    {
        let session = tasks
            .iter()
            .zip(&task_session)
            .find(|(t, ts)| **ts == s && t.task_id == task_id)
            .map_or("", |(t, _)| t.session.as_str());
        return Err(Error::invalid(format!(
            "task {task_id} of session {session:?} is reported twice"
        )));
    }
    let mut recs: Vec<(TransferId, &R, u32)> =
        Vec::with_capacity(records.iter().map(|p| p.len()).sum());
    // Records of one session usually follow each other: its name is looked up once per run.
    let mut last: Option<(&str, (u32, bool))> = None;
    for r in records.iter().flat_map(|p| p.iter()) {
        let name = r.session();
        let (s, supplied) = match last {
            Some((l, known)) if l == name => known,
            _ => {
                let known = names.id(sessions, name);
                last = Some((name, known));
                known
            }
        };
        if supplied {
            recs.push((r.id(), r, s));
        }
    }
    if !recs.is_sorted_by(|a, b| a.0 < b.0) {
        recs.sort_by_key(|p| p.0);
        recs.dedup_by_key(|p| p.0);
    }
    let rec_session = recs.iter().map(|p| p.2).collect();
    let recs = recs.into_iter().map(|(id, r, _)| (id, r)).collect();
    let mut bad = corrupt.to_vec();
    bad.sort_unstable();
    bad.dedup();
    Ok(Inputs {
        tasks: tasks.iter().collect(),
        task_session,
        recs,
        rec_session,
        corrupt: bad,
        sessions: names.ids,
    })
}

/// Records by their binding's (session, task id), and unbound records by (session, URL).
struct Weak<'a> {
    by_binding: FxMap<(u32, u64), Cands>,
    by_url: FxMap<(u32, &'a str), Cands>,
}

fn weak_evidence<'a, R: Planned>(
    recs: &[(TransferId, &'a R)],
    rec_session: &[u32],
    sessions: &mut Interner<'a>,
) -> Weak<'a> {
    let unbound = recs.iter().filter(|(_, r)| r.binding().is_none()).count();
    let mut w = Weak {
        by_binding: FxMap::with_capacity_and_hasher(recs.len() - unbound, Default::default()),
        by_url: FxMap::with_capacity_and_hasher(unbound, Default::default()),
    };
    for (i, ((_, r), &s)) in recs.iter().zip(rec_session).enumerate() {
        match r.binding() {
            Some((session, task_id, _)) => {
                add(&mut w.by_binding, (sessions.id(session), task_id), i)
            }
            None => add(&mut w.by_url, (s, r.url()), i),
        }
    }
    w
}

/// The position of `id` among records in id order. Ids are random, so they spread evenly: the
/// search starts where `id` would be if they spread exactly so, and widens from there (a
/// binary search over however many ids lie between).
fn find_id<R>(recs: &[(TransferId, R)], id: TransferId) -> Option<usize> {
    let n = recs.len();
    let top = id
        .as_bytes()
        .first_chunk::<8>()
        .map_or(0, |b| u64::from_be_bytes(*b));
    let guess = usize::try_from((u128::from(top) * n as u128) >> 64).unwrap_or(0);
    let key = |i: usize| recs.get(i).map(|(rid, _)| *rid);
    let (mut lo, mut hi) = (guess, guess.saturating_add(1).min(n));
    let mut step = 1usize;
    // Widen until the window [lo, hi) brackets the id.
    while lo > 0 && key(lo).is_none_or(|k| k > id) {
        lo = lo.saturating_sub(step);
        step = step.saturating_mul(2);
    }
    step = 1;
    while hi < n && key(hi - 1).is_some_and(|k| k < id) {
        hi = hi.saturating_add(step).min(n);
        step = step.saturating_mul(2);
    }
    let window = recs.get(lo..hi)?;
    window
        .binary_search_by_key(&id, |(rid, _)| *rid)
        .ok()
        .map(|i| lo + i)
}

/// Matches tasks to records, strongest evidence first: the tag (the record's id, its
/// idempotency key, or its binding's tag); then the binding's (session, task id) when the URL
/// agrees; then the URL when one unbound record has it. Several records for one task, or
/// several tasks for one record, is ambiguous: none of them is matched.
fn match_tasks<R: Planned>(inp: &mut Inputs<'_, R>) -> Matching {
    let Inputs {
        tasks,
        task_session,
        recs,
        rec_session,
        corrupt,
        sessions,
    } = inp;
    // Records and corrupt ids are in id order (see `inputs`).
    let (rec_of_tag, corrupt_of_tag) = tags_as_ids(tasks, recs, corrupt);
    let mut by_tag: FxMap<(u32, &str), Cands> = FxMap::default();
    for (i, ((id, r), &s)) in recs.iter().zip(rec_session.iter()).enumerate() {
        // Tags other than the id itself (the id is found through `by_id`).
        if let Some(key) = r.other_key() {
            add(&mut by_tag, (s, key), i);
        }
        if let Some((_, _, Some(tag))) = r.binding()
            && tag != own_text(*id, &mut [0u8; uuid::fmt::Hyphenated::LENGTH])
        {
            add(&mut by_tag, (s, tag), i);
        }
    }
    // The weaker evidence (binding, URL) is indexed only once a task needs it: tasks that
    // carry their record's tag never do.
    let mut weak: Option<Weak<'_>> = None;

    let mut records: Vec<RecordMatch> = rec_session
        .iter()
        .map(|&session| RecordMatch {
            session,
            claim: Claim::None,
            ambiguous: false,
            named_by_id: false,
            nums: TaskNums::default(),
        })
        .collect();
    let mut corrupt_claims = vec![Claim::None; corrupt.len()];
    let mut leftover: Vec<Option<CancelReason>> = vec![None; tasks.len()];
    // Tasks that point at a record another task points at too.
    let mut contested: Vec<usize> = Vec::new();
    let mut cands: Vec<usize> = Vec::new();
    for (ti, (task, &s)) in tasks.iter().zip(task_session.iter()).enumerate() {
        cands.clear();
        let mut id_hit = None;
        if let Some(tag) = task.tag.as_deref() {
            if let Some(&i) = rec_of_tag.get(ti)
                && records.get(i).is_some_and(|r| r.session == s)
            {
                cands.push(i);
                id_hit = Some(i);
            }
            if !by_tag.is_empty()
                && let Some(c) = by_tag.get(&(s, tag))
            {
                for &i in c.as_slice() {
                    if !cands.contains(&i) {
                        cands.push(i);
                    }
                }
            }
            if cands.is_empty()
                && let Some(&ci) = corrupt_of_tag.get(ti)
                && ci != usize::MAX
            {
                if let Some(c) = corrupt_claims.get_mut(ci) {
                    c.add(ti);
                }
                continue;
            }
        }
        let weak = match (cands.is_empty(), &mut weak) {
            (false, _) => None,
            (true, Some(w)) => Some(&*w),
            (true, w) => Some(&*w.insert(weak_evidence(recs, rec_session, sessions))),
        };
        if let Some(w) = weak
            && cands.is_empty()
            && let Some(c) = w.by_binding.get(&(s, task.task_id))
        {
            // A reused task id proves nothing unless the URL agrees.
            cands.extend(
                c.as_slice()
                    .iter()
                    .filter(|&&i| recs.get(i).is_some_and(|(_, r)| r.url() == task.url)),
            );
        }
        if let Some(w) = weak
            && cands.is_empty()
            && let Some(c) = w.by_url.get(&(s, task.url.as_str()))
        {
            cands.extend_from_slice(c.as_slice());
        }
        let left = match cands.as_slice() {
            [] => Some(CancelReason::NoRecord),
            [one] => {
                if let Some(r) = records.get_mut(*one) {
                    let before = r.claim;
                    r.claim.add(ti);
                    if r.claim == Claim::Many {
                        if let Claim::One(first) = before {
                            contested.extend(usize::try_from(first).ok());
                        }
                        contested.push(ti);
                    }
                    r.named_by_id = id_hit == Some(*one);
                    r.nums = TaskNums::of(task, s);
                }
                None
            }
            many => {
                for &i in many {
                    if let Some(r) = records.get_mut(i) {
                        r.ambiguous = true;
                    }
                }
                Some(CancelReason::Ambiguous)
            }
        };
        if let Some(l) = leftover.get_mut(ti) {
            *l = left;
        }
    }
    // A task that shares its record with another, or whose record another task's candidates
    // include, is matched to nothing.
    for r in &records {
        if let Claim::One(ti) = r.claim
            && r.ambiguous
            && let Some(l) = usize::try_from(ti).ok().and_then(|ti| leftover.get_mut(ti))
        {
            *l = Some(CancelReason::Ambiguous);
        }
    }
    for ti in contested {
        if let Some(l) = leftover.get_mut(ti) {
            *l = Some(CancelReason::Ambiguous);
        }
    }
    let mut corrupt_task = vec![None; corrupt.len()];
    for (ci, c) in corrupt_claims.iter().enumerate() {
        match *c {
            Claim::One(ti) => {
                if let Some(slot) = corrupt_task.get_mut(ci) {
                    *slot = usize::try_from(ti).ok();
                }
            }
            Claim::Many => {
                for (ti, &points_at) in corrupt_of_tag.iter().enumerate() {
                    if points_at == ci
                        && let Some(l) = leftover.get_mut(ti)
                    {
                        *l = Some(CancelReason::Ambiguous);
                    }
                }
            }
            Claim::None => {}
        }
    }
    Matching {
        records,
        corrupt_task,
        leftover,
    }
}

/// The tag an adopted task's binding records: the task's own when it names this record (its
/// id, its idempotency key, or the tag already bound), else the tag already bound. A tag that
/// names nothing (empty, or shared by unrelated tasks) is never recorded: it would make the
/// next reconcile match every record that recorded it.
fn identifying_tag(t: &impl Planned, task: Matched<'_>) -> Option<String> {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let own = own_text(t.id(), &mut buf);
    if task.named_by_id {
        // Matching proved the tag is this text: the task's own copy is not read again.
        return Some(own.to_owned());
    }
    let bound = t.binding().and_then(|(_, _, tag)| tag);
    match task.task.tag.as_deref() {
        Some(tag) if tag == own || bound == Some(tag) || t.other_key() == Some(tag) => {
            Some(tag.to_owned())
        }
        _ => bound.map(str::to_owned),
    }
}

/// The id's canonical text, written into `buf` (comparing it is cheaper than parsing a tag).
fn own_text(id: TransferId, buf: &mut [u8; uuid::fmt::Hyphenated::LENGTH]) -> &str {
    uuid::Uuid::from_bytes(*id.as_bytes())
        .hyphenated()
        .encode_lower(buf)
}

fn past(deadline: Option<SystemTime>, now: SystemTime) -> bool {
    deadline.is_some_and(|d| now >= d)
}

/// The numbers of a task a record's action needs, copied out of the caller's tasks while they
/// are read in order: records are decided in id order, which visits the tasks at random.
#[derive(Debug, Clone, Copy)]
struct TaskNums {
    /// The session, by its number.
    session: u32,
    task_id: u64,
    state: TaskState,
    bytes_done: u64,
    bytes_total: Option<u64>,
}

impl Default for TaskNums {
    fn default() -> Self {
        TaskNums {
            session: 0,
            task_id: 0,
            state: TaskState::Running,
            bytes_done: 0,
            bytes_total: None,
        }
    }
}

impl TaskNums {
    fn of(t: &Task, session: u32) -> Self {
        TaskNums {
            session,
            task_id: t.task_id,
            state: t.state,
            bytes_done: t.bytes_done,
            bytes_total: t.bytes_total,
        }
    }
}

/// A task matched to a record, as the planner hands it on.
#[derive(Clone, Copy)]
pub(crate) struct Matched<'a> {
    /// The task (read only for a completed task's status and error).
    task: &'a Task,
    /// Its numbers.
    nums: TaskNums,
    /// Its session's name: the same text as the task's, from the planner's own copy.
    session: &'a str,
    /// Its tag is the record's id as text.
    named_by_id: bool,
}

impl Matched<'_> {
    fn key(&self) -> TaskRef {
        TaskRef {
            session: self.session.to_owned(),
            task_id: self.nums.task_id,
        }
    }
}

/// The action for one record, given the task matched to it (if any).
fn decide(
    t: &impl Planned,
    matched: Option<Matched<'_>>,
    now: SystemTime,
    opts: &ReconcileOptions,
) -> Action {
    let id = t.id();
    let tref = matched.as_ref().map(Matched::key);
    match t.phase() {
        Phase::Cancelled => return Action::Purge { id, task: tref },
        Phase::Completed | Phase::Failed => {
            return Action::Deliver {
                id,
                outcome: t.outcome().unwrap_or(Outcome::Cancelled),
                claim: false,
                task: tref,
            };
        }
        Phase::Pending | Phase::Running | Phase::WaitingToRetry => {}
    }
    let no_task = |failure: Option<String>, failures: u32, not_before: Option<SystemTime>, task| {
        let request = t.request();
        let attempt = failures.saturating_add(1);
        let from = match (t.kind(), t.has_resume_data(), t.partial_len()) {
            (Kind::Download, true, _) => Some(ResumeFrom::ResumeData),
            (Kind::Download, false, len) if len > 0 => Some(ResumeFrom::Partial { len }),
            _ => None,
        };
        match from {
            Some(from) => Action::Resume {
                id,
                request,
                attempt,
                not_before,
                from,
                failure,
                task,
            },
            None => Action::Recreate {
                id,
                request,
                attempt,
                not_before,
                failure,
                task,
            },
        }
    };
    let pending_retry = t.next_attempt().filter(|t| *t > now);
    if let Some(task) = matched
        .filter(|m| m.nums.state == TaskState::Completed)
        .map(|m| m.task)
    {
        let bound_to_it = t.binding().is_some_and(|(session, task_id, _)| {
            session == task.session && task_id == task.task_id
        });
        if task.succeeded() {
            return Action::Deliver {
                id,
                outcome: Outcome::Succeeded {
                    status: task.status,
                },
                claim: true,
                task: tref,
            };
        }
        if past(t.deadline(), now) {
            return Action::Expire { id, task: tref };
        }
        if bound_to_it && t.phase() == Phase::WaitingToRetry {
            // This task's failure was counted before (a reconcile applied, or `fail`).
            return no_task(None, t.failures(), pending_retry, tref);
        }
        let failures = t.failures().saturating_add(1);
        if failures >= t.retry().max_attempts {
            return Action::GiveUp {
                id,
                error: task.failure_text(),
                task: tref,
            };
        }
        let at = now.checked_add(jittered(t, failures, opts)).unwrap_or(now);
        let at = crate::transfer::from_ms(crate::transfer::to_ms(at));
        return no_task(Some(task.failure_text()), failures, Some(at), tref);
    }
    if past(t.deadline(), now) {
        return Action::Expire { id, task: tref };
    }
    match (matched, tref) {
        (Some(m), Some(key)) if m.nums.state != TaskState::Cancelling => {
            let tag = identifying_tag(t, m);
            let rebind = t.phase() != Phase::Running
                || t.next_attempt().is_some()
                || t.binding() != Some((key.session.as_str(), key.task_id, tag.as_deref()));
            Action::Adopt {
                id,
                task: key,
                tag,
                bytes_done: m.nums.bytes_done,
                bytes_total: m.nums.bytes_total,
                rebind,
            }
        }
        (_, tref) => no_task(None, t.failures(), pending_retry, tref),
    }
}

/// Plans a reconcile. Pure: same inputs, same plan, same order.
///
/// # Errors
/// [`ErrorKind::InvalidArgument`] for a task of a session that was not supplied, or a task
/// reported twice.
pub fn plan(
    sessions: &Sessions,
    tasks: &[Task],
    records: &[Record],
    corrupt: &[TransferId],
    now: SystemTime,
    opts: &ReconcileOptions,
) -> Result<Plan> {
    plan_of(sessions, tasks, &[records], corrupt, now, opts)
}

/// [`plan`] over any view of the records.
pub(crate) fn plan_of<R: Planned>(
    sessions: &Sessions,
    tasks: &[Task],
    records: &[&[R]],
    corrupt: &[TransferId],
    now: SystemTime,
    opts: &ReconcileOptions,
) -> Result<Plan> {
    plan_with(
        sessions,
        tasks,
        records,
        corrupt,
        PARALLEL_FROM,
        |r, task| decide(r, task, now, opts),
    )
}

/// Plans a reset: cancel every task and discard every record of the supplied sessions
/// (starting from a clean slate never invalidates the session). Records' tasks ride in their
/// `purge`; corrupt records are quarantined (moved aside, not deleted).
///
/// # Errors
/// As [`plan`].
pub fn plan_reset(
    sessions: &Sessions,
    tasks: &[Task],
    records: &[Record],
    corrupt: &[TransferId],
) -> Result<Plan> {
    plan_reset_of(sessions, tasks, &[records], corrupt)
}

/// [`plan_reset`] over any view of the records.
pub(crate) fn plan_reset_of<R: Planned>(
    sessions: &Sessions,
    tasks: &[Task],
    records: &[&[R]],
    corrupt: &[TransferId],
) -> Result<Plan> {
    plan_with(
        sessions,
        tasks,
        records,
        corrupt,
        PARALLEL_FROM,
        |r, task| Action::Purge {
            id: r.id(),
            task: task.as_ref().map(Matched::key),
        },
    )
}

/// From this many records on, a plan decides records on two threads.
const PARALLEL_FROM: usize = 16_384;

/// Matches, then gives each record the action `per_record` decides (corrupt records are
/// quarantined, tasks left over cancelled). Record actions come in id order, then bare cancels
/// by session and task id, whatever the order of the inputs.
fn plan_with<R: Planned>(
    sessions: &Sessions,
    tasks: &[Task],
    records: &[&[R]],
    corrupt: &[TransferId],
    parallel_from: usize,
    per_record: impl Fn(&R, Option<Matched<'_>>) -> Action + Sync,
) -> Result<Plan> {
    let mut inp = inputs(sessions, tasks, records, corrupt)?;
    let m = match_tasks(&mut inp);
    let task_at = |slot: Option<&Option<usize>>| {
        slot.copied()
            .flatten()
            .and_then(|ti| inp.tasks.get(ti).copied())
    };
    let mut cancels: Vec<(&Task, CancelReason)> = inp
        .tasks
        .iter()
        .zip(&m.leftover)
        .filter_map(|(t, l)| l.map(|reason| (*t, reason)))
        .collect();
    cancels
        .sort_unstable_by(|(a, _), (b, _)| (&a.session, a.task_id).cmp(&(&b.session, b.task_id)));
    let matched = |i: usize| {
        let r = m.records.get(i)?;
        Some(Matched {
            task: inp.tasks.get(r.task()?).copied()?,
            nums: r.nums,
            session: inp.sessions.name(r.nums.session),
            named_by_id: r.named_by_id,
        })
    };
    let decide_range = |range: std::ops::Range<usize>, v: &mut Vec<Action>| {
        for i in range {
            if let Some((_, r)) = inp.recs.get(i) {
                v.push(per_record(r, matched(i)));
            }
        }
    };
    let n = inp.recs.len();
    // Room for every action up front: the plan of a large store is one allocation.
    let mut actions = Vec::with_capacity(n + inp.corrupt.len() + cancels.len());
    if n >= parallel_from {
        // Deciding is independent per record: a large plan uses a second core.
        let split = n / 2;
        std::thread::scope(|s| {
            let second = std::thread::Builder::new()
                .name("waybill-plan".into())
                .spawn_scoped(s, || {
                    let mut v = Vec::with_capacity(n - split);
                    decide_range(split..n, &mut v);
                    v
                });
            decide_range(0..split, &mut actions);
            match second {
                Ok(h) => actions.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))),
                Err(_) => decide_range(split..n, &mut actions),
            }
        });
    } else {
        decide_range(0..n, &mut actions);
    }
    if !inp.corrupt.is_empty() {
        // Records and corrupt ids are both in id order: merge them.
        let quarantines =
            inp.corrupt
                .iter()
                .zip(&m.corrupt_task)
                .map(|(id, slot)| Action::Quarantine {
                    id: *id,
                    task: task_at(Some(slot)).map(Task::key),
                });
        let mut merged = Vec::with_capacity(actions.len() + inp.corrupt.len() + cancels.len());
        let mut q = quarantines.peekable();
        for a in actions {
            while let Some(next) = q.next_if(|x| x.transfer() < a.transfer()) {
                merged.push(next);
            }
            merged.push(a);
        }
        merged.extend(q);
        actions = merged;
    }
    actions.extend(cancels.into_iter().map(|(t, reason)| Action::Cancel {
        task: t.key(),
        reason,
    }));
    Ok(Plan { actions })
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod find_id_tests {
    #![allow(clippy::indexing_slicing, reason = "tests")]

    use super::*;

    /// A stream of numbers drawn from `seed`.
    fn seeded(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state = splitmix(state);
            state
        }
    }

    /// The id whose high and low halves are `hi` and `lo`.
    fn from(hi: u64, lo: u64) -> TransferId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(&lo.to_be_bytes());
        TransferId::from_bytes(b)
    }

    /// Ids spread evenly or not at all (one prefix, the two ends, counted up from zero): every
    /// present id is found where it is, and no absent id is found.
    #[test]
    fn find_id_finds_exactly_the_ids_present_however_they_spread() {
        let mut random = seeded(0x9e37_79b9_7f4a_7c15);
        let spreads: Vec<Box<dyn Fn(u64, u64) -> TransferId>> = vec![
            Box::new(from),
            Box::new(|_, b| from(0x1234, b)),
            Box::new(|a, b| from(if a % 2 == 0 { 0 } else { u64::MAX }, b)),
            Box::new(|_, b| from(0, b % 5000)),
        ];
        for spread in &spreads {
            for n in [0usize, 1, 2, 3, 10, 1000] {
                let mut ids: Vec<TransferId> = (0..n).map(|_| spread(random(), random())).collect();
                ids.sort();
                ids.dedup();
                let recs: Vec<(TransferId, ())> = ids.iter().map(|id| (*id, ())).collect();
                for (i, id) in ids.iter().enumerate() {
                    assert_eq!(find_id(&recs, *id), Some(i));
                }
                for _ in 0..200 {
                    let probe = spread(random(), random());
                    assert_eq!(find_id(&recs, probe), ids.binary_search(&probe).ok());
                }
            }
        }
    }

    #[test]
    fn in_id_order_sorts_ids_however_they_spread() {
        let mut random = seeded(0x5555_0000_aaaa_ffff);
        for n in [0usize, 1, 2, 3, 17, 1000] {
            for spread in 0..3 {
                let named: Vec<(TransferId, usize)> = (0..n)
                    .map(|k| {
                        let hi = match spread {
                            0 => random(),
                            1 => 0x1234,
                            _ => random() % 3,
                        };
                        (from(hi, random() % 50), k)
                    })
                    .collect();
                let mut want = named.clone();
                want.sort_unstable();
                assert_eq!(in_id_order(named), want, "n {n}, spread {spread}");
            }
        }
    }

    #[test]
    fn tags_as_ids_finds_each_tagged_tasks_record_and_corrupt_id_by_search_or_by_merge() {
        let mut random = seeded(0x0123_4567_89ab_cdef);
        // Few tasks among many records (a search each), and as many as records (one merge).
        for (n_recs, n_tasks) in [(0usize, 3usize), (1000, 3), (1000, 900), (50, 200)] {
            let mut ids: Vec<TransferId> = (0..n_recs + n_recs / 10)
                .map(|_| from(random(), random()))
                .collect();
            ids.sort();
            // Every eleventh id is corrupt, the rest are records.
            let corrupt: Vec<TransferId> = ids.iter().step_by(11).copied().collect();
            let recs: Vec<(TransferId, ())> = ids
                .iter()
                .filter(|id| !corrupt.contains(id))
                .map(|id| (*id, ()))
                .collect();
            let tasks: Vec<Task> = (0..n_tasks)
                .map(|k| {
                    let t = Task::running("s", k as u64, "https://h/x");
                    match random() % 4 {
                        0 => t,
                        1 => t.tag("not an id"),
                        2 => t.tag(TransferId::from_bytes([7; 16]).to_string()),
                        _ if ids.is_empty() => t,
                        _ => t.tag(ids[random() as usize % ids.len()].to_string()),
                    }
                })
                .collect();
            let refs: Vec<&Task> = tasks.iter().collect();
            let (rec_of, corrupt_of) = tags_as_ids(&refs, &recs, &corrupt);
            for (ti, t) in tasks.iter().enumerate() {
                let id = t.tag.as_deref().and_then(TransferId::parse_canonical);
                let want_rec = id.and_then(|id| recs.iter().position(|(r, _)| *r == id));
                let want_corrupt = id.and_then(|id| corrupt.iter().position(|c| *c == id));
                assert_eq!(rec_of[ti], want_rec.unwrap_or(usize::MAX), "task {ti}");
                assert_eq!(
                    corrupt_of[ti],
                    want_corrupt.unwrap_or(usize::MAX),
                    "task {ti}"
                );
            }
        }
    }
}
