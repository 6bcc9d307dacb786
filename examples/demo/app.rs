//! The app (and its share extension): uses waybill as a real app would. It creates uploads
//! (of files it keeps, hard-linked, and of bytes in memory) and downloads, in groups; binds
//! each task before resuming it; reconciles with the agent's tasks on every launch and then
//! on every tick; handles, checks and acknowledges every outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::{Duration, SystemTime};

use waybill::{
    Action, Durability, Filter, LinkMode, NewTransfer, Outcome, ResumeFrom, RetryPolicy, Sessions,
    Store, Task, TaskBinding, TaskRef, TransferId, UploadSource, Value,
};

use crate::common::{
    AgentClient, AgentTask, Call, EXT_SESSION, Kind, Layout, Res, SESSION, Spec, append_line,
    read_done, sha_of,
};

fn item_of(store: &Store, id: TransferId) -> Option<u64> {
    let t = store.get(id).ok()?;
    match t.manifest.metadata.get("item")? {
        Value::Integer(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn new_transfer(spec: &Spec, layout: &Layout, server: &str, i: u64) -> Res<NewTransfer> {
    let retry = RetryPolicy {
        max_attempts: 50,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    let kind = spec.kind(i);
    let t = match kind {
        Kind::Download => NewTransfer::download(format!("http://{server}/files/{i}")),
        Kind::UploadFile => {
            // A file the app keeps and promises not to change: hard-linked, never copied.
            let path = layout.app_files().join(format!("photo-{i}"));
            fs::write(&path, spec.content(i))?;
            NewTransfer::upload(
                format!("http://{server}/upload/{i}"),
                UploadSource::File {
                    path,
                    link: LinkMode::HardLink,
                },
            )
        }
        Kind::UploadBytes | Kind::ExtUpload => NewTransfer::upload(
            format!("http://{server}/upload/{i}"),
            UploadSource::Bytes(spec.content(i)),
        ),
    };
    let session = if kind == Kind::ExtUpload {
        EXT_SESSION
    } else {
        SESSION
    };
    Ok(t.session(session)
        .group(format!("album-{}", i / 20))
        .idempotency_key(spec.key(i, creation_nonce()))
        .meta("item", i as i64)
        .retry(retry))
}

/// Makes each creation's idempotency key its own: a second record for one item would upload
/// under a second key, and the server would store it twice, which the summary counts.
fn creation_nonce() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 40)
}

/// Creates a task for the record, binds it durably, then resumes it.
fn start(
    store: &Store,
    agent: &mut AgentClient,
    id: TransferId,
    resume_data: Option<String>,
    rebind: bool,
) -> Res<()> {
    let t = store.get(id)?;
    let upload = t.manifest.kind == waybill::Kind::Upload;
    let request = t.request().clone();
    let reply = agent.call(&Call::Create {
        session: t.manifest.session.clone(),
        url: request.url.clone(),
        method: if upload { "POST".into() } else { "GET".into() },
        tag: Some(id.to_string()),
        body: upload.then(|| store.payload_path(id)),
        key: Some(t.manifest.idempotency_key.clone()),
        resume_data,
    })?;
    let task_id = reply.id.ok_or("agent gave no task id")?;
    let binding = TaskBinding {
        session: t.manifest.session.clone(),
        task_id,
        tag: Some(id.to_string()),
    };
    if rebind {
        store.rebind(id, binding, None)?;
    } else {
        store.bind(id, binding)?;
    }
    agent.call(&Call::Resume { id: task_id })?;
    Ok(())
}

fn to_task(a: &AgentTask) -> Task {
    let mut t = Task::running(a.session.clone(), a.id, a.url.clone());
    if let Some(tag) = &a.tag {
        t = t.tag(tag.clone());
    }
    match a.state.as_str() {
        "suspended" => Task {
            state: waybill::TaskState::Suspended,
            ..t
        },
        "completed" => t.completed(a.status.unwrap_or(0)),
        "failed" => t.failed(a.error.clone().unwrap_or_default()),
        _ => t,
    }
}

/// The record a finished agent task belongs to, checked by URL (task ids are reused after the
/// agent loses its table) and by tag when the tag survived.
fn record_of(store: &Store, a: &AgentTask) -> Option<TransferId> {
    let t = store.find_by_task(&a.session, a.id).ok()??;
    let tag_ok = a.tag.as_ref().is_none_or(|g| *g == t.id().to_string());
    (t.request().url == a.url && tag_ok).then(|| t.id())
}

/// Records, checks and acknowledges an outcome.
fn deliver(
    store: &Store,
    layout: &Layout,
    spec: &Spec,
    id: TransferId,
    outcome: &Outcome,
) -> Res<()> {
    let item = item_of(store, id).ok_or("a record without its item")?;
    let line = match outcome {
        Outcome::Succeeded { .. } => {
            let (len, sha) = sha_of(store.open_payload(id)?)?;
            let ok = sha == spec.sha(item);
            format!("{item} {} {len} {sha}", if ok { "ok" } else { "bad" })
        }
        _ => format!("{item} failed 0 {}", "0".repeat(64)),
    };
    // The app's own record first, then the acknowledgement: a crash between the two delivers
    // the outcome again, and the line is written again (the last one wins).
    append_line(&layout.done(), &line)?;
    // The app's copy goes before the record: the store's hard link keeps the bytes for a
    // redelivery, and nothing is left if the app dies here.
    let _ = fs::remove_file(layout.app_files().join(format!("photo-{item}")));
    store.acknowledge(id)?;
    Ok(())
}

struct App<'a> {
    store: Store,
    agent: AgentClient,
    layout: &'a Layout,
    spec: Spec,
    server: String,
}

impl App<'_> {
    fn sessions(&self) -> Sessions {
        // The extension's session is handed to the app once the extension is done with it.
        if self.layout.root.join("app/ext-done").exists() {
            Sessions::only([SESSION, EXT_SESSION])
        } else {
            Sessions::only([SESSION])
        }
    }

    /// One reconcile: take finished downloads' files and failed ones' resume data, plan,
    /// apply, act. Logs the action names (on a tick after launch, all but `adopt`, which only
    /// says a task goes on). Returns the action names.
    fn reconcile(&mut self, launch: bool) -> Res<Vec<&'static str>> {
        let listing = self.agent.call(&Call::List)?.tasks;
        let sessions = self.sessions();
        let listing: Vec<AgentTask> = listing
            .into_iter()
            .filter(|a| sessions.contains(&a.session))
            .collect();
        // A failed download's resume data, kept before planning so the plan can resume it.
        for a in listing.iter().filter(|a| a.state == "failed") {
            if let (Some(data), Some(id)) = (&a.resume_data, record_of(&self.store, a))
                && self
                    .store
                    .get(id)
                    .is_ok_and(|t| !t.state.phase.is_terminal())
            {
                self.store.store_resume_data(id, data.as_bytes())?;
            }
        }
        let tasks: Vec<Task> = listing.iter().map(to_task).collect();
        let by_key: BTreeMap<TaskRef, &AgentTask> =
            listing.iter().map(|a| (to_task(a).key(), a)).collect();
        let mut plan = self.store.reconcile(&sessions, &tasks, SystemTime::now())?;
        // A download that succeeded is claimed only once its file is in the store. If the
        // agent no longer has the file, the platform lost the result: the task is lost, not
        // failed, and the next plan recreates it.
        let mut lost_results = Vec::new();
        for a in &plan.actions {
            if let Action::Deliver {
                id,
                claim: true,
                outcome: Outcome::Succeeded { .. },
                task: Some(task),
            } = a
                && let Ok(t) = self.store.get(*id)
                && t.manifest.kind == waybill::Kind::Download
                && !t.state.downloaded
            {
                match by_key
                    .get(task)
                    .and_then(|x| x.file.as_ref())
                    .filter(|f| f.is_file())
                {
                    Some(f) => self.store.accept_download(*id, f)?,
                    None => {
                        self.store.task_lost(*id)?;
                        self.agent.call(&Call::Collect { id: task.task_id })?;
                        lost_results.push(*id);
                    }
                }
            }
        }
        plan.actions
            .retain(|a| !matches!(a, Action::Deliver { id, .. } if lost_results.contains(id)));
        let report = self.store.apply(&plan)?;
        let lost: BTreeSet<TransferId> = report.claims_lost.iter().copied().collect();
        let now = SystemTime::now();
        let names: Vec<&'static str> = plan.actions.iter().map(Action::name).collect();
        // Logged before acting, so a kill while acting cannot hide a delivery from the summary
        // (a plan computed again after the kill is logged again).
        for n in &names {
            if launch {
                append_line(&self.layout.actions(), &format!("launch {n}"))?;
            } else if *n != "adopt" {
                append_line(&self.layout.actions(), &format!("tick {n}"))?;
            }
        }
        for a in &plan.actions {
            match a {
                Action::Adopt { task, .. }
                    if by_key.get(task).is_some_and(|t| t.state == "suspended") =>
                {
                    self.agent.call(&Call::Resume { id: task.task_id })?;
                }
                Action::Cancel { task, .. } => {
                    self.agent.call(&Call::Cancel { id: task.task_id })?;
                }
                Action::Recreate {
                    id,
                    not_before,
                    task,
                    ..
                }
                | Action::Resume {
                    id,
                    not_before,
                    task,
                    ..
                } => {
                    if let Some(t) = task {
                        self.agent.call(&Call::Collect { id: t.task_id })?;
                    }
                    if not_before.is_some_and(|t| t > now) {
                        continue; // retried on a later tick
                    }
                    let resume = match a {
                        Action::Resume {
                            from: ResumeFrom::ResumeData,
                            ..
                        } => self
                            .store
                            .resume_data(*id)?
                            .and_then(|d| String::from_utf8(d).ok()),
                        _ => None,
                    };
                    start(&self.store, &mut self.agent, *id, resume, true)?;
                }
                Action::Deliver {
                    id, outcome, task, ..
                } => {
                    if !lost.contains(id) {
                        deliver(&self.store, self.layout, &self.spec, *id, outcome)?;
                    }
                    if let Some(t) = task {
                        self.agent.call(&Call::Collect { id: t.task_id })?;
                    }
                }
                Action::Purge { task, .. }
                | Action::Expire { task, .. }
                | Action::Quarantine { task, .. }
                | Action::GiveUp { task, .. } => {
                    if let Some(t) = task {
                        self.agent.call(&Call::Cancel { id: t.task_id })?;
                    }
                }
                _ => {}
            }
        }
        Ok(names)
    }

    /// Creates the app's items that are neither in the store nor done, ten per batch, and
    /// starts them.
    fn create_missing(&mut self, done: &BTreeSet<u64>) -> Res<usize> {
        let have: BTreeSet<u64> = self
            .store
            .list(&Filter::all())?
            .iter()
            .filter_map(|t| item_of(&self.store, t.id()))
            .collect();
        let missing: Vec<u64> = (0..self.spec.n)
            .filter(|i| self.spec.kind(*i) != Kind::ExtUpload)
            .filter(|i| !done.contains(i) && !have.contains(i))
            .collect();
        for chunk in missing.chunks(10) {
            let items = chunk
                .iter()
                .map(|&i| new_transfer(&self.spec, self.layout, &self.server, i))
                .collect::<Res<Vec<_>>>()?;
            for id in self.store.create_batch(items)? {
                start(&self.store, &mut self.agent, id, None, false)?;
            }
        }
        Ok(missing.len())
    }

    /// Progress of running tasks, coalesced (never a sync per report).
    fn progress(&mut self) -> Res<()> {
        for a in self.agent.call(&Call::List)?.tasks {
            if a.state == "running"
                && a.done > 0
                && let Some(id) = record_of(&self.store, &a)
            {
                let _ = self
                    .store
                    .progress(id, a.done, a.total, Durability::Coalesced);
            }
        }
        Ok(())
    }
}

/// The app: runs until every item is done (or it is killed).
pub fn run(layout: &Layout, spec: Spec, server: String) -> Res<()> {
    fs::create_dir_all(layout.app_files())?;
    fs::create_dir_all(layout.app_tmp())?;
    let store = Store::open(layout.store())?;
    let mut app = App {
        store,
        agent: AgentClient::new(layout),
        layout,
        spec,
        server,
    };
    let mut launch = true;
    loop {
        app.reconcile(launch)?;
        launch = false;
        let done: BTreeSet<u64> = read_done(&layout.done()).into_keys().collect();
        app.create_missing(&done)?;
        app.progress()?;
        let left = app.store.list(&Filter::all())?.len();
        // The demo keeps killing until its last kill: until then a finished app stays up.
        let kills_over = layout.root.join("app/kills-done").exists();
        if done.len() as u64 == spec.n && left == 0 && kills_over {
            app.store.flush()?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// The share extension: creates its uploads (every tenth item) in its own session, starts
/// them, marks its session handed over, and exits.
pub fn run_extension(layout: &Layout, spec: Spec, server: String) -> Res<()> {
    fs::create_dir_all(layout.app_files())?;
    let store = Store::open(layout.store())?;
    let mut agent = AgentClient::new(layout);
    let done: BTreeSet<u64> = read_done(&layout.done()).into_keys().collect();
    let have: BTreeSet<u64> = store
        .list(&Filter::all())?
        .iter()
        .filter_map(|t| item_of(&store, t.id()))
        .collect();
    for i in (0..spec.n).filter(|i| spec.kind(*i) == Kind::ExtUpload) {
        if done.contains(&i) || have.contains(&i) {
            continue;
        }
        let id = store.create(new_transfer(&spec, layout, &server, i)?)?;
        start(&store, &mut agent, id, None, false)?;
    }
    // From here the app reconciles the extension's session too (records a killed extension
    // left unbound are recreated there).
    append_line(&layout.root.join("app/ext-done"), "handed over")?;
    Ok(())
}
