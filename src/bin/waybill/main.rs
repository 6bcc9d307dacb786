//! `waybill`: inspect, script and repair a waybill store from the shell.
//!
//! A thin layer over the library's public API: arguments in, one call, output out. Human
//! output by default; `--json` prints one JSON document. Exit codes: 0 ok, 1 refused or
//! failed, 2 usage error, 3 `fsck` found problems. See `docs/CLI.md`.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value as J, json};
use waybill::{
    CancelResult, Changed, Completion, Durability, ErrorClass, ErrorKind, FailResult, Filter, Kind,
    LinkMode, NewTransfer, Phase, RetryPolicy, Sessions, Store, TaskBinding, TransferId,
    UploadSource,
};

mod json;
mod time;

#[derive(Parser)]
#[command(
    name = "waybill",
    version,
    about = "Inspect, script and repair a waybill store",
    propagate_version = true
)]
struct Cli {
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an empty store (or check that one is there).
    Init { root: PathBuf },
    /// Create a transfer; prints its id.
    Create(CreateArgs),
    /// Record the platform task running a transfer.
    Bind {
        root: PathBuf,
        id: String,
        #[arg(long)]
        task: u64,
        /// Must be the transfer's session when given.
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        tag: Option<String>,
    },
    /// Record progress.
    Progress {
        root: PathBuf,
        id: String,
        #[arg(long)]
        done: u64,
        #[arg(long)]
        total: Option<u64>,
        /// Write and sync now instead of coalescing (this command flushes on exit either way).
        #[arg(long)]
        durable: bool,
    },
    /// Append received download bytes to `partial`, durably.
    Received {
        root: PathBuf,
        id: String,
        #[arg(long, value_name = "FILE")]
        append: PathBuf,
    },
    /// Store a download's resume data.
    ResumeData {
        root: PathBuf,
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Move a finished download in.
    Finish {
        root: PathBuf,
        id: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Claim a success; prints `won` or `lost <recorded outcome>`.
    Complete {
        root: PathBuf,
        id: String,
        #[arg(long)]
        status: Option<u16>,
    },
    /// Count a failure; prints `retry-at <time>` or `gave-up`.
    Fail {
        root: PathBuf,
        id: String,
        #[arg(long)]
        error: String,
        #[arg(long, conflicts_with = "retry_after")]
        permanent: bool,
        #[arg(long, value_name = "RFC3339")]
        retry_after: Option<String>,
    },
    /// Cancel a transfer, or every member of a group.
    Cancel {
        root: PathBuf,
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        id: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    /// Acknowledge a delivered outcome (purges the transfer).
    Ack { root: PathBuf, id: String },
    /// Commit many lifecycle changes together (one shared flush), one per line of the file:
    /// `bind ID TASK [TAG]`, `complete ID [STATUS]`, `fail ID transient|permanent ERROR`,
    /// `cancel ID`, `lost ID`, `progress ID DONE [TOTAL]`, `ack ID`. Prints one result per
    /// change; exits 1 when any change failed.
    Batch {
        root: PathBuf,
        /// The changes, or `-` for standard input.
        #[arg(long, value_name = "FILE|-", default_value = "-")]
        changes: String,
    },
    /// List transfers.
    Ls {
        root: PathBuf,
        #[arg(long)]
        phase: Option<String>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        kind: Option<String>,
    },
    /// Show one transfer.
    Show { root: PathBuf, id: String },
    /// Plan a reconcile against a task list; `--apply` performs the store's side.
    Reconcile {
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long)]
        apply: bool,
        /// The time to plan at (default: now).
        #[arg(long, value_name = "RFC3339")]
        now: Option<String>,
    },
    /// Plan a reset (cancel every task, discard every record); `--apply` performs it.
    Reset {
        #[command(flatten)]
        plan: PlanArgs,
        #[arg(long)]
        apply: bool,
    },
    /// Check the whole store; exits 3 when it finds problems.
    Fsck {
        root: PathBuf,
        /// Quarantine unreadable records, clear debris, move strays aside.
        #[arg(long)]
        repair: bool,
    },
    /// Remove debris no live process owns and purge cancelled transfers.
    Gc { root: PathBuf },
    /// Counts by phase, session and group; quarantined records; bytes on disk.
    Stats { root: PathBuf },
}

#[derive(Args)]
struct CreateArgs {
    root: PathBuf,
    /// Upload to URL.
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "download",
        required_unless_present = "download"
    )]
    upload: Option<String>,
    /// Download from URL.
    #[arg(long, value_name = "URL")]
    download: Option<String>,
    /// The upload's payload file.
    #[arg(long, conflicts_with = "stdin")]
    file: Option<PathBuf>,
    /// How the payload file is held: auto (link, else copy), hardlink or copy.
    #[arg(long, default_value = "auto", requires = "file")]
    link: String,
    /// Read the upload's payload from standard input.
    #[arg(long)]
    stdin: bool,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    session: Option<String>,
    #[arg(long)]
    method: Option<String>,
    /// A request header, `Name: value`.
    #[arg(long = "header", value_name = "K: V")]
    headers: Vec<String>,
    /// A header whose value is never written to disk.
    #[arg(long = "secret-header", value_name = "K: V")]
    secret_headers: Vec<String>,
    /// App metadata, `KEY=VALUE` (a string value).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
    #[arg(long, value_name = "RFC3339")]
    deadline: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
}

#[derive(Args)]
struct PlanArgs {
    root: PathBuf,
    /// The task list (JSON array), or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    tasks: String,
    /// A session to reconcile (repeatable).
    #[arg(
        long = "session",
        required_unless_present = "all_sessions",
        conflicts_with = "all_sessions"
    )]
    sessions: Vec<String>,
    /// Reconcile every session.
    #[arg(long)]
    all_sessions: bool,
}

/// Why a command stopped.
enum Failure {
    /// Bad arguments or input: exit 2.
    Usage(String),
    /// Refused or failed: exit 1.
    Refused(String),
    /// `fsck` found problems: exit 3 (the report is already printed).
    Problems,
}

impl From<waybill::Error> for Failure {
    fn from(e: waybill::Error) -> Self {
        Failure::Refused(sentence(&e.to_string()))
    }
}

fn sentence(s: &str) -> String {
    let mut s = s.trim_end().to_owned();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with exit 0; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let mut out = Output { json: cli.json };
    match run(cli.command, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("waybill: {}", sentence(&m));
            ExitCode::from(2)
        }
        Err(Failure::Refused(m)) => {
            eprintln!("waybill: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Problems) => ExitCode::from(3),
    }
}

struct Output {
    json: bool,
}

impl Output {
    /// Prints the JSON document, or the text lines.
    fn emit(&mut self, doc: J, text: impl FnOnce() -> String) {
        let s = if self.json {
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        } else {
            text()
        };
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) is not an error of the command.
        let _ = writeln!(stdout, "{}", s.trim_end());
    }
}

/// Opens an existing store, never creating one and never clearing debris on the way in: debris
/// is what `fsck` reports and `gc` and `fsck --repair` clear (and report).
fn open(root: &Path) -> Result<Store, Failure> {
    Store::builder()
        .create(false)
        .clear_debris(false)
        .open(root)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound { .. } => {
                Failure::Refused(format!("there is no store at {}.", root.display()))
            }
            _ => e.into(),
        })
}

fn id(s: &str) -> Result<TransferId, Failure> {
    TransferId::parse_canonical(s).ok_or_else(|| {
        Failure::Usage(format!(
            "{s:?} is not a transfer id (a lowercase hyphenated UUID)"
        ))
    })
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| {
        let m = format!("cannot read {what} {}: {e}", path.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::Usage(m)
        } else {
            Failure::Refused(sentence(&m))
        }
    })
}

fn header(s: &str) -> Result<(String, String), Failure> {
    let (k, v) = s
        .split_once(':')
        .ok_or_else(|| Failure::Usage(format!("header {s:?} is not `Name: value`")))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn rfc3339(s: &str) -> Result<SystemTime, Failure> {
    time::parse(s).map_err(Failure::Usage)
}

fn run(cmd: Command, out: &mut Output) -> Outcome {
    match cmd {
        Command::Init { root } => {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Failure::Refused(format!("cannot create {}: {e}.", parent.display()))
                })?;
            }
            let store = Store::open(&root)?;
            let created = store.open_report().created;
            out.emit(
                json!({"root": root.display().to_string(), "created": created}),
                || {
                    if created {
                        format!("created a store at {}", root.display())
                    } else {
                        format!("a store is already at {}", root.display())
                    }
                },
            );
            Ok(())
        }
        Command::Create(a) => create(a, out),
        Command::Bind {
            root,
            id: i,
            task,
            session,
            tag,
        } => {
            let i = id(&i)?;
            let store = open(&root)?;
            let t = store.get(i)?;
            let session = session.unwrap_or_else(|| t.manifest.session.clone());
            if session != t.manifest.session {
                return Err(Failure::Refused(format!(
                    "transfer {i} belongs to session {:?}, not {session:?}.",
                    t.manifest.session
                )));
            }
            store.bind(
                i,
                TaskBinding {
                    session: session.clone(),
                    task_id: task,
                    tag: tag.clone(),
                },
            )?;
            out.emit(
                json!({"id": i.to_string(), "task": {"session": session, "task_id": task, "tag": tag}}),
                || format!("bound {i} to task {task} of session {session}"),
            );
            Ok(())
        }
        Command::Progress {
            root,
            id: i,
            done,
            total,
            durable,
        } => {
            let i = id(&i)?;
            let store = open(&root)?;
            let d = if durable {
                Durability::Immediate
            } else {
                Durability::Coalesced
            };
            store.progress(i, done, total, d)?;
            store.flush()?;
            out.emit(
                json!({"id": i.to_string(), "done": done, "total": total}),
                || {
                    format!(
                        "{i}: {done} of {}",
                        total.map_or("?".into(), |t| t.to_string())
                    )
                },
            );
            Ok(())
        }
        Command::Received {
            root,
            id: i,
            append,
        } => {
            let i = id(&i)?;
            let bytes = read_file(&append, "the received bytes")?;
            let store = open(&root)?;
            let len = store.append_received(i, &bytes)?;
            out.emit(json!({"id": i.to_string(), "partial_len": len}), || {
                format!("{i}: {len} bytes received")
            });
            Ok(())
        }
        Command::ResumeData { root, id: i, file } => {
            let i = id(&i)?;
            let bytes = read_file(&file, "the resume data")?;
            let store = open(&root)?;
            store.store_resume_data(i, &bytes)?;
            out.emit(json!({"id": i.to_string(), "bytes": bytes.len()}), || {
                format!("{i}: stored {} bytes of resume data", bytes.len())
            });
            Ok(())
        }
        Command::Finish { root, id: i, file } => {
            let i = id(&i)?;
            if std::fs::symlink_metadata(&file).is_err() {
                return Err(Failure::Usage(format!(
                    "the downloaded file {} does not exist",
                    file.display()
                )));
            }
            let store = open(&root)?;
            store.accept_download(i, &file)?;
            out.emit(json!({"id": i.to_string()}), || {
                format!("{i}: download moved in")
            });
            Ok(())
        }
        Command::Complete {
            root,
            id: i,
            status,
        } => {
            let i = id(&i)?;
            let store = open(&root)?;
            match store.complete(i, status)? {
                Completion::Won(_) => out.emit(json!({"result": "won"}), || "won".into()),
                Completion::Lost(o) => out.emit(
                    json!({"result": "lost", "outcome": json::outcome(&o)}),
                    || format!("lost {o}"),
                ),
            }
            Ok(())
        }
        Command::Fail {
            root,
            id: i,
            error,
            permanent,
            retry_after,
        } => {
            let i = id(&i)?;
            let class = match (permanent, retry_after) {
                (true, _) => ErrorClass::Permanent,
                (false, Some(t)) => ErrorClass::RetryAfter(rfc3339(&t)?),
                (false, None) => ErrorClass::Transient,
            };
            let store = open(&root)?;
            match store.fail(i, class, &error)? {
                FailResult::RetryAt(t) => {
                    let at = time::format(t);
                    out.emit(json!({"result": "retry-at", "at": at}), || {
                        format!("retry-at {at}")
                    });
                }
                FailResult::GaveUp => out.emit(json!({"result": "gave-up"}), || "gave-up".into()),
                FailResult::AlreadyEnded(o) => {
                    return Err(Failure::Refused(format!(
                        "transfer {i} has already ended: {o}."
                    )));
                }
            }
            Ok(())
        }
        Command::Cancel { root, id: i, group } => {
            let ids = i.as_deref().map(id).transpose()?;
            let store = open(&root)?;
            let results = match (ids, group) {
                (Some(i), _) => vec![(i, store.cancel(i)?)],
                (None, Some(g)) => {
                    // Fails for an unknown group rather than cancelling nothing silently.
                    store.group(&g)?;
                    store.cancel_group(&g)?
                }
                (None, None) => return Err(Failure::Usage("name a transfer or a --group".into())),
            };
            let mut cancelled = Vec::new();
            let mut ended = Vec::new();
            for (i, r) in &results {
                match r {
                    CancelResult::Cancelled { task } => cancelled.push(json!({
                        "id": i.to_string(),
                        "task": task.as_ref().map(|b| json!({"session": b.session, "task_id": b.task_id})),
                    })),
                    CancelResult::AlreadyEnded(o) => ended.push(json!({"id": i.to_string(), "outcome": json::outcome(o)})),
                }
            }
            let text = results
                .iter()
                .map(|(i, r)| match r {
                    CancelResult::Cancelled { task: Some(b) } => {
                        format!(
                            "cancelled {i} (cancel task {} of session {})",
                            b.task_id, b.session
                        )
                    }
                    CancelResult::Cancelled { task: None } => format!("cancelled {i}"),
                    CancelResult::AlreadyEnded(o) => format!("{i} had already ended: {o}"),
                })
                .collect::<Vec<_>>()
                .join("\n");
            out.emit(
                json!({"cancelled": cancelled, "already_ended": ended}),
                || text,
            );
            Ok(())
        }
        Command::Batch { root, changes } => batch(&root, &changes, out),
        Command::Ack { root, id: i } => {
            let i = id(&i)?;
            let store = open(&root)?;
            store.acknowledge(i)?;
            out.emit(json!({"id": i.to_string()}), || format!("acknowledged {i}"));
            Ok(())
        }
        Command::Ls {
            root,
            phase,
            group,
            session,
            kind,
        } => {
            let mut f = Filter::all();
            if let Some(p) = phase {
                let p: Phase = p.parse().map_err(|_| {
                    Failure::Usage(format!(
                        "unknown phase {p:?} (one of {})",
                        Phase::ALL.map(|p| p.to_string()).join(", ")
                    ))
                })?;
                f = f.phase(p);
            }
            if let Some(k) = kind {
                f = f.kind(match k.as_str() {
                    "upload" => Kind::Upload,
                    "download" => Kind::Download,
                    _ => {
                        return Err(Failure::Usage(format!(
                            "unknown kind {k:?} (upload or download)"
                        )));
                    }
                });
            }
            if let Some(g) = group {
                f = f.group(g);
            }
            if let Some(s) = session {
                f = f.session(s);
            }
            let store = open(&root)?;
            let list = store.list(&f)?;
            let doc = json!({"transfers": list.iter().map(json::transfer).collect::<Vec<_>>()});
            out.emit(doc, || {
                list.iter()
                    .map(|t| {
                        format!(
                            "{}  {:<8}  {:<16}  {:<10}  {:<10}  {}",
                            t.id(),
                            json::kind(t.manifest.kind),
                            t.state.phase.to_string(),
                            t.manifest.session,
                            t.manifest.group.as_deref().unwrap_or("-"),
                            t.request().url
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        Command::Show { root, id: i } => {
            let i = id(&i)?;
            let store = open(&root)?;
            let t = store.get(i)?;
            let doc = json::transfer(&t);
            let text = show_text(&doc);
            out.emit(doc, || text);
            Ok(())
        }
        Command::Reconcile { plan, apply, now } => {
            let now = now
                .as_deref()
                .map(rfc3339)
                .transpose()?
                .unwrap_or_else(SystemTime::now);
            run_plan(plan, apply, out, |store, sessions, tasks| {
                store.reconcile(sessions, tasks, now)
            })
        }
        Command::Reset { plan, apply } => run_plan(plan, apply, out, |store, sessions, tasks| {
            store.reset_plan(sessions, tasks)
        }),
        Command::Fsck { root, repair } => fsck(&root, repair, out),
        Command::Gc { root } => {
            let store = open(&root)?;
            let r = store.gc()?;
            out.emit(
                json!({
                    "staging_cleared": r.staging_cleared,
                    "staging_live": r.staging_live,
                    "trash_cleared": r.trash_cleared,
                    "purged": r.purged.iter().map(ToString::to_string).collect::<Vec<_>>(),
                }),
                || {
                    format!(
                        "cleared {} unfinished creates and {} interrupted removals; purged {} cancelled transfers; {} creates in progress left alone",
                        r.staging_cleared.len(),
                        r.trash_cleared.len(),
                        r.purged.len(),
                        r.staging_live.len()
                    )
                },
            );
            Ok(())
        }
        Command::Stats { root } => {
            let store = open(&root)?;
            let s = store.stats()?;
            let doc = json!({
                "transfers": s.transfers,
                "by_phase": s.by_phase,
                "by_session": s.by_session,
                "by_group": s.by_group,
                "unreadable": s.unreadable,
                "quarantined": s.quarantined,
                "bytes_on_disk": s.bytes_on_disk,
            });
            out.emit(doc, || {
                let map = |m: &std::collections::BTreeMap<String, usize>| {
                    if m.is_empty() {
                        "-".to_owned()
                    } else {
                        m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
                    }
                };
                format!(
                    "transfers:     {}\nby phase:      {}\nby session:    {}\nby group:      {}\nunreadable:    {}\nquarantined:   {}\nbytes on disk: {}",
                    s.transfers,
                    map(&s.by_phase),
                    map(&s.by_session),
                    map(&s.by_group),
                    s.unreadable,
                    s.quarantined,
                    s.bytes_on_disk
                )
            });
            Ok(())
        }
    }
}

fn create(a: CreateArgs, out: &mut Output) -> Outcome {
    let mut t = match (&a.upload, &a.download) {
        (Some(url), None) => {
            let source = match (&a.file, a.stdin) {
                (Some(path), false) => {
                    if std::fs::metadata(path).is_err() {
                        return Err(Failure::Usage(format!(
                            "the payload file {} does not exist",
                            path.display()
                        )));
                    }
                    let link = match a.link.as_str() {
                        "auto" => LinkMode::Auto,
                        "hardlink" => LinkMode::HardLink,
                        "copy" => LinkMode::Copy,
                        other => {
                            return Err(Failure::Usage(format!(
                                "unknown link mode {other:?} (auto, hardlink or copy)"
                            )));
                        }
                    };
                    UploadSource::File {
                        path: path.clone(),
                        link,
                    }
                }
                (None, true) => {
                    let mut bytes = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
                    UploadSource::Bytes(bytes)
                }
                _ => {
                    return Err(Failure::Usage(
                        "an upload needs --file PATH or --stdin".into(),
                    ));
                }
            };
            NewTransfer::upload(url.clone(), source)
        }
        (None, Some(url)) => {
            if a.file.is_some() || a.stdin {
                return Err(Failure::Usage(
                    "a download takes no --file or --stdin".into(),
                ));
            }
            NewTransfer::download(url.clone())
        }
        _ => {
            return Err(Failure::Usage(
                "give exactly one of --upload or --download".into(),
            ));
        }
    };
    if let Some(s) = &a.session {
        t = t.session(s.clone());
    }
    if let Some(m) = &a.method {
        t = t.method(m.clone());
    }
    if let Some(g) = &a.group {
        t = t.group(g.clone());
    }
    for h in &a.headers {
        let (k, v) = header(h)?;
        t = t.header(k, v);
    }
    for h in &a.secret_headers {
        let (k, v) = header(h)?;
        t = t.secret_header(k, v);
    }
    for m in &a.meta {
        let (k, v) = m
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("metadata {m:?} is not KEY=VALUE")))?;
        t = t.meta(k.to_owned(), v.to_owned());
    }
    if let Some(d) = &a.deadline {
        t = t.deadline(rfc3339(d)?);
    }
    if let Some(n) = a.max_attempts {
        if n == 0 {
            return Err(Failure::Usage("--max-attempts must be at least 1".into()));
        }
        t = t.retry(RetryPolicy {
            max_attempts: n,
            ..RetryPolicy::default()
        });
    }
    let store = open(&a.root)?;
    // What `create` refuses as an invalid argument is the caller's input (a header, a name).
    let id = store.create(t).map_err(|e| match e.kind() {
        ErrorKind::InvalidArgument { .. } => Failure::Usage(e.to_string()),
        _ => e.into(),
    })?;
    out.emit(json!({"id": id.to_string()}), || id.to_string());
    Ok(())
}

fn show_text(doc: &J) -> String {
    let Some(o) = doc.as_object() else {
        return String::new();
    };
    o.iter()
        .map(|(k, v)| {
            let v = match v {
                J::String(s) => s.clone(),
                J::Null => "-".into(),
                other => other.to_string(),
            };
            format!("{k:<13} {v}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run_plan(
    a: PlanArgs,
    apply: bool,
    out: &mut Output,
    make: impl FnOnce(&Store, &Sessions, &[waybill::Task]) -> waybill::Result<waybill::Plan>,
) -> Outcome {
    let text = if a.tasks == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            Failure::Usage(format!(
                "cannot read the task list from standard input: {e}"
            ))
        })?;
        s
    } else {
        let bytes = read_file(Path::new(&a.tasks), "the task list")?;
        String::from_utf8(bytes).map_err(|_| Failure::Usage("the task list is not UTF-8".into()))?
    };
    let tasks = json::tasks(&text).map_err(Failure::Usage)?;
    let sessions = if a.all_sessions {
        Sessions::All
    } else {
        Sessions::only(a.sessions.iter().cloned())
    };
    if let Some(t) = tasks.iter().find(|t| !sessions.contains(&t.session)) {
        return Err(Failure::Usage(format!(
            "task {} belongs to session {:?}, which was not supplied (add --session {} or use --all-sessions)",
            t.task_id, t.session, t.session
        )));
    }
    let store = open(&a.root)?;
    let plan = make(&store, &sessions, &tasks).map_err(|e| match e.kind() {
        ErrorKind::InvalidArgument { .. } => Failure::Usage(e.to_string()),
        _ => e.into(),
    })?;
    let report = if apply {
        Some(store.apply(&plan)?)
    } else {
        None
    };
    let mut doc = json!({"actions": plan.actions.iter().map(json::action).collect::<Vec<_>>()});
    if let (Some(r), Some(o)) = (&report, doc.as_object_mut()) {
        o.insert("applied".into(), json!(r.applied));
        o.insert(
            "claims_lost".into(),
            json!(
                r.claims_lost
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ),
        );
        o.insert(
            "gone".into(),
            json!(r.gone.iter().map(ToString::to_string).collect::<Vec<_>>()),
        );
        o.insert(
            "groups_finished".into(),
            json!(r.groups_finished.iter().map(|g| json!({
                "group": g.name, "succeeded": g.succeeded, "failed": g.failed, "cancelled": g.cancelled,
            })).collect::<Vec<_>>()),
        );
    }
    out.emit(doc, || {
        let mut lines: Vec<String> = plan.actions.iter().map(action_line).collect();
        if lines.is_empty() {
            lines.push("nothing to do".into());
        }
        match &report {
            Some(r) => {
                lines.push(format!("applied {} store-side steps", r.applied));
                for id in &r.claims_lost {
                    lines.push(format!("claim lost (another process delivers it): {id}"));
                }
                for g in &r.groups_finished {
                    lines.push(format!(
                        "group {} finished: {} succeeded, {} failed, {} cancelled",
                        g.name, g.succeeded, g.failed, g.cancelled
                    ));
                }
            }
            None => lines.push("(dry run: nothing changed; --apply to perform)".into()),
        }
        lines.join("\n")
    });
    Ok(())
}

fn action_line(a: &waybill::Action) -> String {
    let j = json::action(a);
    let who = a
        .transfer()
        .map_or_else(|| "-".repeat(36), |id| id.to_string());
    let task = a
        .task()
        .map(|t| format!("  task {}/{}", t.session, t.task_id))
        .unwrap_or_default();
    let extra = match a {
        waybill::Action::Recreate {
            attempt,
            not_before,
            ..
        }
        | waybill::Action::Resume {
            attempt,
            not_before,
            ..
        } => format!(
            "  attempt {attempt}{}",
            not_before
                .map(|t| format!(" not before {}", time::format(t)))
                .unwrap_or_default()
        ),
        waybill::Action::Cancel { .. } => {
            format!("  ({})", j.get("reason").and_then(J::as_str).unwrap_or(""))
        }
        waybill::Action::Deliver { outcome, claim, .. } => {
            format!("  {outcome}{}", if *claim { " (claim)" } else { "" })
        }
        waybill::Action::GiveUp { error, .. } => format!("  {error}"),
        _ => String::new(),
    };
    format!("{:<10} {who}{task}{extra}", a.name())
}

fn fsck(root: &Path, repair: bool, out: &mut Output) -> Outcome {
    let store = open(root)?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut shown: Option<Instant> = None;
    let report = store.check(|done, total| {
        // After the first second, at most ten updates a second.
        let due = shown.map_or(started.elapsed().as_secs() >= 1, |t| {
            t.elapsed().as_millis() >= 100 || done == total
        });
        if tty && due {
            shown = Some(Instant::now());
            eprint!("\rchecking records: {done}/{total}");
        }
    })?;
    if shown.is_some() {
        eprintln!();
    }
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    let paths = |v: &[PathBuf]| v.iter().map(|p| rel(p)).collect::<Vec<_>>();
    let unreadable: Vec<J> = report
        .unreadable
        .iter()
        .map(|u| {
            json!({
                "id": u.id.to_string(),
                "part": format!("{:?}", u.part).to_lowercase(),
                "file": rel(&u.file),
                "error": u.error.to_string(),
            })
        })
        .collect();
    let mut doc = json!({
        "records": report.records,
        "problems": report.problems(),
        "unreadable": unreadable,
        "quarantined": paths(&report.quarantined),
        "staging_debris": paths(&report.staging_debris),
        "staging_live": paths(&report.staging_live),
        "trash_debris": paths(&report.trash_debris),
        "strays": paths(&report.strays),
        "orphans": paths(&report.orphans),
    });
    let mut lines = vec![format!(
        "{} records checked, {} problems",
        report.records,
        report.problems()
    )];
    for u in &report.unreadable {
        lines.push(format!(
            "unreadable  {}  {}: {}",
            u.id,
            rel(&u.file),
            u.error
        ));
    }
    for (label, v) in [
        ("quarantined", &report.quarantined),
        ("debris", &report.staging_debris),
        ("in progress", &report.staging_live),
        ("debris", &report.trash_debris),
        ("stray", &report.strays),
        ("orphan", &report.orphans),
    ] {
        for p in v {
            lines.push(format!("{label:<11} {}", rel(p)));
        }
    }
    let problems = report.problems();
    let mut left = problems;
    if repair {
        let r = store.repair(&report)?;
        left = r.left.len();
        if let Some(o) = doc.as_object_mut() {
            o.insert(
                "repaired".into(),
                json!({
                    "quarantined": r.quarantined.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "state_rewritten": r.state_rewritten.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "failed": r.failed.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "cleared": paths(&r.cleared),
                    "moved": r.moved.iter().map(|(a, b)| json!({"from": rel(a), "to": rel(b)})).collect::<Vec<_>>(),
                    "left": r.left.iter().map(|(p, why)| json!({"path": rel(p), "why": why})).collect::<Vec<_>>(),
                }),
            );
        }
        for id in &r.quarantined {
            lines.push(format!("repaired: quarantined {id}"));
        }
        for id in &r.state_rewritten {
            lines.push(format!("repaired: rewrote the state of {id}"));
        }
        for id in &r.failed {
            lines.push(format!("repaired: failed {id} for good (payload missing)"));
        }
        for p in &r.cleared {
            lines.push(format!("repaired: cleared {}", rel(p)));
        }
        for (a, b) in &r.moved {
            lines.push(format!("repaired: moved {} to {}", rel(a), rel(b)));
        }
        for (p, why) in &r.left {
            lines.push(format!("not repaired: {}: {why}", rel(p)));
        }
    }
    out.emit(doc, || lines.join("\n"));
    if left > 0 {
        return Err(Failure::Problems);
    }
    Ok(())
}

/// One line of a `batch` file, parsed.
fn batch_line(store: &Store, b: &mut waybill::Batch<'_>, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |w: Option<&&str>, what: &str| -> Result<u64, String> {
        w.ok_or(format!("{what} is missing"))?
            .parse()
            .map_err(|_| format!("{what} is not a number"))
    };
    let (op, rest) = words.split_first().ok_or("an empty line")?;
    let i = rest
        .first()
        .ok_or("the transfer id is missing")
        .and_then(|s| {
            TransferId::parse_canonical(s)
                .ok_or("the transfer id is not a lowercase hyphenated UUID")
        })?;
    let extra = |n: usize| {
        if rest.len() > n {
            Err(format!("{op} takes at most {} words", n))
        } else {
            Ok(())
        }
    };
    match *op {
        "bind" => {
            extra(3)?;
            let session = store.get(i).map_err(|e| e.to_string())?.manifest.session;
            b.bind(
                i,
                TaskBinding {
                    session,
                    task_id: num(rest.get(1), "the task id")?,
                    tag: rest.get(2).map(|t| (*t).to_owned()),
                },
            );
        }
        "complete" => {
            extra(2)?;
            let status = match rest.get(1) {
                Some(s) => Some(s.parse().map_err(|_| "the status is not a number")?),
                None => None,
            };
            b.complete(i, status);
        }
        "fail" => {
            let class = match rest.get(1).copied() {
                Some("transient") => ErrorClass::Transient,
                Some("permanent") => ErrorClass::Permanent,
                _ => return Err("fail needs `transient` or `permanent`".into()),
            };
            let error = rest.get(2..).unwrap_or_default().join(" ");
            if error.is_empty() {
                return Err("fail needs an error text".into());
            }
            b.fail(i, class, &error);
        }
        "cancel" => {
            extra(1)?;
            b.cancel(i);
        }
        "lost" => {
            extra(1)?;
            b.task_lost(i);
        }
        "progress" => {
            extra(3)?;
            let total = match rest.get(2) {
                Some(_) => Some(num(rest.get(2), "the total")?),
                None => None,
            };
            b.progress(i, num(rest.get(1), "the bytes done")?, total);
        }
        "ack" => {
            extra(1)?;
            b.acknowledge(i);
        }
        other => return Err(format!("unknown change {other:?}")),
    }
    Ok(())
}

fn batch(root: &Path, changes: &str, out: &mut Output) -> Outcome {
    let text = if changes == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
        s
    } else {
        String::from_utf8(read_file(Path::new(changes), "the changes")?)
            .map_err(|_| Failure::Usage(format!("{changes} is not UTF-8 text")))?
    };
    let store = open(root)?;
    let mut b = store.batch();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        batch_line(&store, &mut b, line)
            .map_err(|e| Failure::Usage(format!("line {}: {e}", n + 1)))?;
        lines.push(line.to_owned());
    }
    let results = b.commit();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let answer = |r: &waybill::Result<Changed>| -> (J, String) {
        match r {
            Ok(Changed::Completed(Completion::Won(_))) => (json!("won"), "won".into()),
            Ok(Changed::Completed(Completion::Lost(o))) => {
                (json!({"lost": json::outcome(o)}), format!("lost {o}"))
            }
            Ok(Changed::Failed(FailResult::RetryAt(t))) => {
                let at = time::format(*t);
                (json!({"retry-at": at}), format!("retry-at {at}"))
            }
            Ok(Changed::Failed(FailResult::GaveUp)) => (json!("gave-up"), "gave-up".into()),
            Ok(Changed::Failed(FailResult::AlreadyEnded(o)))
            | Ok(Changed::Cancelled(CancelResult::AlreadyEnded(o))) => (
                json!({"already-ended": json::outcome(o)}),
                format!("already ended: {o}"),
            ),
            Ok(Changed::Cancelled(CancelResult::Cancelled { .. })) => {
                (json!("cancelled"), "cancelled".into())
            }
            Ok(_) => (json!("ok"), "ok".into()),
            Err(e) => (json!({"error": e.to_string()}), format!("error: {e}")),
        }
    };
    let rows: Vec<(String, (J, String))> =
        lines.into_iter().zip(results.iter().map(answer)).collect();
    out.emit(
        json!({
            "changes": rows.iter().map(|(l, (j, _))| json!({"change": l, "result": j})).collect::<Vec<_>>(),
            "failed": failed,
        }),
        || {
            rows.iter()
                .map(|(l, (_, t))| format!("{l}: {t}"))
                .collect::<Vec<_>>()
                .join("\n")
        },
    );
    if failed > 0 {
        return Err(Failure::Refused(format!(
            "{failed} of {} changes failed.",
            results.len()
        )));
    }
    Ok(())
}
