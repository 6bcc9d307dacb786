//! The agent: the platform's background-transfer daemon. It owns tasks (with task ids), keeps
//! its task table on disk, performs the HTTP transfers whether or not the app is alive, and
//! keeps each finished task (and a download's file) until the app collects it. It may lose a
//! task's tag, as the platform may. A restarted agent resumes its running tasks: uploads from
//! the start, downloads with `Range` from the bytes they have.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::common::{AgentTask, Call, Layout, Reply, Res, Rng, http, write_atomic};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    next_id: u64,
    tasks: BTreeMap<u64, AgentTask>,
}

struct Agent {
    layout: Layout,
    server: String,
    table: Mutex<Table>,
    inflight: Mutex<BTreeSet<u64>>,
    rng: Mutex<Rng>,
    tag_loss: f64,
    /// Names this run's files apart from a lost table's.
    nonce: u64,
}

impl Agent {
    fn save(&self, t: &Table) -> Res<()> {
        write_atomic(&self.layout.agent_table(), &serde_json::to_vec(t)?)?;
        Ok(())
    }

    fn handle(&self, call: Call) -> Res<Reply> {
        let mut reply = Reply {
            ok: true,
            error: None,
            id: None,
            tasks: vec![],
        };
        let mut t = self.table.lock().map_err(|_| "poisoned")?;
        match call {
            Call::Create {
                session,
                url,
                method,
                tag,
                body,
                key,
                resume_data,
            } => {
                t.next_id = t.next_id.max(1);
                let id = t.next_id;
                t.next_id += 1;
                let lose = self
                    .rng
                    .lock()
                    .map(|mut r| r.chance(self.tag_loss))
                    .unwrap_or(false);
                // Resume data names the bytes a failed download kept: the new task takes
                // them over under its own name, so nothing done to the old task touches them.
                let file = resume_data
                    .map(PathBuf::from)
                    .filter(|p| p.is_file())
                    .and_then(|p| {
                        let own = self
                            .layout
                            .agent_downloads()
                            .join(format!("task-{}-{id}", self.nonce));
                        fs::rename(&p, &own).ok().map(|()| own)
                    });
                t.tasks.insert(
                    id,
                    AgentTask {
                        id,
                        session,
                        url,
                        method,
                        tag: if lose { None } else { tag },
                        body,
                        key,
                        state: "suspended".into(),
                        status: None,
                        error: None,
                        file,
                        resume_data: None,
                        done: 0,
                        total: None,
                    },
                );
                self.save(&t)?;
                reply.id = Some(id);
            }
            Call::Resume { id } => {
                if let Some(task) = t.tasks.get_mut(&id)
                    && task.state == "suspended"
                {
                    task.state = "running".into();
                    self.save(&t)?;
                }
            }
            Call::Cancel { id } => {
                if let Some(task) = t.tasks.remove(&id) {
                    if let Some(f) = task.file {
                        let _ = fs::remove_file(f);
                    }
                    self.save(&t)?;
                }
            }
            Call::Collect { id } => {
                if let Some(task) = t.tasks.remove(&id) {
                    // A finished download's file the app did not take, or a failed one's
                    // bytes that its resume data does not name.
                    if let Some(f) = task.file {
                        let _ = fs::remove_file(f);
                    }
                    self.save(&t)?;
                }
            }
            Call::List => reply.tasks = t.tasks.values().cloned().collect(),
        }
        Ok(reply)
    }

    fn serve(self: &Arc<Self>, s: TcpStream) {
        let Ok(w) = s.try_clone() else { return };
        let mut w = w;
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            let reply = serde_json::from_str::<Call>(&line)
                .map_err(|e| e.to_string())
                .and_then(|c| self.handle(c).map_err(|e| e.to_string()))
                .unwrap_or_else(|e| Reply {
                    ok: false,
                    error: Some(e),
                    id: None,
                    tasks: vec![],
                });
            let Ok(text) = serde_json::to_string(&reply) else {
                return;
            };
            if w.write_all(format!("{text}\n").as_bytes()).is_err() {
                return;
            }
        }
    }

    /// Takes a running task no worker has.
    fn next_task(&self) -> Option<AgentTask> {
        let t = self.table.lock().ok()?;
        let mut busy = self.inflight.lock().ok()?;
        let task = t
            .tasks
            .values()
            .find(|x| x.state == "running" && !busy.contains(&x.id))?
            .clone();
        busy.insert(task.id);
        Some(task)
    }

    fn work(self: &Arc<Self>) {
        loop {
            let Some(task) = self.next_task() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let id = task.id;
            let result = if task.method == "GET" {
                self.download(task)
            } else {
                self.upload(&task)
            };
            if let Ok(mut t) = self.table.lock()
                && let Some(x) = t.tasks.get_mut(&id)
            {
                result.apply(x);
                let _ = self.save(&t);
            }
            if let Ok(mut b) = self.inflight.lock() {
                b.remove(&id);
            }
        }
    }

    fn path_of(&self, url: &str) -> String {
        url.split_once("//")
            .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
            .unwrap_or_else(|| "/".into())
    }

    fn upload(&self, task: &AgentTask) -> Outcome {
        let body = match task.body.as_deref().map(File::open) {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Outcome::failed(format!("body: {e}"), None),
            None => return Outcome::failed("no body".into(), None),
        };
        let len = body.metadata().map(|m| m.len()).unwrap_or(0);
        let mut body = body;
        let headers = vec![("Idempotency-Key", task.key.clone().unwrap_or_default())];
        match http(
            &self.server,
            "POST",
            &self.path_of(&task.url),
            &headers,
            Some((&mut body, len)),
        ) {
            Ok(r) => Outcome::completed(r.status, None, len),
            Err(e) => Outcome::failed(e.to_string(), None),
        }
    }

    fn download(&self, task: AgentTask) -> Outcome {
        let part = task.file.clone().unwrap_or_else(|| {
            self.layout
                .agent_downloads()
                .join(format!("task-{}-{}", self.nonce, task.id))
        });
        let have = fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let headers: Vec<(&str, String)> = if have > 0 {
            vec![("Range", format!("bytes={have}-"))]
        } else {
            vec![]
        };
        // Remember the file before any byte lands in it, so it is never orphaned.
        if let Ok(mut t) = self.table.lock()
            && let Some(x) = t.tasks.get_mut(&task.id)
        {
            x.file = Some(part.clone());
            let _ = self.save(&t);
        }
        let resp = match http(
            &self.server,
            "GET",
            &self.path_of(&task.url),
            &headers,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return Outcome::failed(e.to_string(), (have > 0).then(|| part.clone())),
        };
        if resp.status != 200 && resp.status != 206 {
            // Bytes already here stay the resume data's.
            if have > 0 {
                return Outcome::failed(format!("HTTP status {}", resp.status), Some(part));
            }
            return Outcome::completed(resp.status, None, 0);
        }
        let total: Option<u64> = resp
            .headers
            .get("content-length")
            .and_then(|l| l.parse().ok());
        let append = resp.status == 206;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&part);
        let mut file = match file {
            Ok(f) => f,
            Err(e) => return Outcome::failed(e.to_string(), None),
        };
        let mut body = resp.body;
        let mut buf = vec![0; 64 * 1024];
        let mut got = 0u64;
        let mut error = None;
        loop {
            match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = file.write_all(buf.get(..n).unwrap_or_default()) {
                        error = Some(e.to_string());
                        break;
                    }
                    got += n as u64;
                    if let Ok(mut t) = self.table.lock()
                        && let Some(x) = t.tasks.get_mut(&task.id)
                    {
                        x.done = if append { have + got } else { got };
                        x.total = total.map(|l| l + if append { have } else { 0 });
                    }
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        let _ = file.sync_all();
        if error.is_none() && total.is_some_and(|t| t != got) {
            error = Some(format!("body ended after {got} bytes"));
        }
        let len = if append { have + got } else { got };
        match error {
            Some(e) => Outcome::failed(e, Some(part)),
            None => {
                let mut o = Outcome::completed(200, Some(part), len);
                o.done = len;
                o
            }
        }
    }
}

/// What a worker's transfer ended with.
struct Outcome {
    state: &'static str,
    status: Option<u16>,
    error: Option<String>,
    file: Option<PathBuf>,
    resume_data: Option<String>,
    done: u64,
}

impl Outcome {
    fn completed(status: u16, file: Option<PathBuf>, done: u64) -> Self {
        Outcome {
            state: "completed",
            status: Some(status),
            error: None,
            file,
            resume_data: None,
            done,
        }
    }

    fn failed(error: String, kept: Option<PathBuf>) -> Self {
        Outcome {
            state: "failed",
            status: None,
            error: Some(error),
            resume_data: kept.as_ref().map(|p| p.display().to_string()),
            file: None,
            done: 0,
        }
    }

    fn apply(self, x: &mut AgentTask) {
        if x.state != "running" {
            return;
        }
        x.state = self.state.into();
        x.status = self.status;
        x.error = self.error;
        // A failed download's bytes now belong to its resume data.
        x.file = self.file;
        x.resume_data = self.resume_data;
        x.done = self.done;
    }
}

/// A fresh table (the first start, or the table was lost): nothing can name the files left
/// in the downloads directory any more, so they go (as the platform clears its own temp).
fn clear_downloads(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

pub fn run(layout: Layout, server: String, seed: u64, tag_loss: f64) -> Res<()> {
    fs::create_dir_all(layout.agent_downloads())?;
    let table: Table = match fs::read(layout.agent_table()) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::default(),
        Err(e) => return Err(e.into()),
    };
    if table.tasks.is_empty() && table.next_id == 0 {
        clear_downloads(&layout.agent_downloads());
    }
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let agent = Arc::new(Agent {
        layout: layout.clone(),
        server,
        table: Mutex::new(table),
        inflight: Mutex::new(BTreeSet::new()),
        rng: Mutex::new(Rng(seed ^ nonce)),
        tag_loss,
        nonce,
    });
    let listener = TcpListener::bind("127.0.0.1:0")?;
    write_atomic(
        &layout.agent_port(),
        listener.local_addr()?.port().to_string().as_bytes(),
    )?;
    for _ in 0..4 {
        let a = Arc::clone(&agent);
        std::thread::spawn(move || a.work());
    }
    for s in listener.incoming().flatten() {
        let a = Arc::clone(&agent);
        std::thread::spawn(move || a.serve(s));
    }
    Ok(())
}
