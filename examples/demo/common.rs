//! What the demo's processes share: the work directory's layout, the plan of transfers and
//! their content, a small HTTP/1.1 client, and the agent's control protocol.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The app's background session, and the share extension's.
pub const SESSION: &str = "demo";
pub const EXT_SESSION: &str = "demo-ext";

/// Where everything lives under the work directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// The app's own files: upload sources it promised not to change (hard-linked into the
    /// store), and a temp directory.
    pub fn app_files(&self) -> PathBuf {
        self.root.join("app/files")
    }
    pub fn app_tmp(&self) -> PathBuf {
        self.root.join("app/tmp")
    }
    /// The app's own record of handled transfers: one line per item, written before the
    /// transfer is acknowledged.
    pub fn done(&self) -> PathBuf {
        self.root.join("app/done")
    }
    /// Reconcile actions taken, one name per line.
    pub fn actions(&self) -> PathBuf {
        self.root.join("app/actions")
    }
    pub fn agent_table(&self) -> PathBuf {
        self.root.join("agent/tasks.json")
    }
    pub fn agent_downloads(&self) -> PathBuf {
        self.root.join("agent/downloads")
    }
    pub fn agent_port(&self) -> PathBuf {
        self.root.join("agent/port")
    }
}

/// splitmix64.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// What item `i` of a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An upload of a file the app keeps (hard-linked into the store).
    UploadFile,
    /// An upload of bytes held in memory.
    UploadBytes,
    /// A download.
    Download,
    /// An upload created by the share extension.
    ExtUpload,
}

impl Kind {
    pub fn is_upload(self) -> bool {
        self != Kind::Download
    }
}

/// The plan of a run: how many transfers, their sizes, and the seed of everything.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub seed: u64,
    pub n: u64,
    pub min: u64,
    pub max: u64,
}

impl Spec {
    pub fn kind(&self, i: u64) -> Kind {
        match i % 10 {
            9 => Kind::ExtUpload,
            0 | 3 | 6 => Kind::Download,
            1 | 4 | 7 => Kind::UploadFile,
            _ => Kind::UploadBytes,
        }
    }

    /// Item `i`'s size, log-uniform between `min` and `max`.
    pub fn size(&self, i: u64) -> u64 {
        let mut r = Rng(self.seed ^ i.wrapping_mul(0x51_7cc1_b727_220a));
        let (lo, hi) = (
            (self.min.max(1) as f64).ln(),
            (self.max.max(self.min) as f64).ln(),
        );
        let f = (r.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo + (hi - lo) * f).exp() as u64).clamp(self.min, self.max.max(self.min))
    }

    /// Item `i`'s content, from `offset`, into `buf` (random access, for `Range`).
    pub fn fill(&self, i: u64, offset: u64, buf: &mut [u8]) {
        let base = self.seed ^ (i << 40) ^ 0xd1b5_4a32_d192_ed03;
        for (k, b) in buf.iter_mut().enumerate() {
            let o = offset + k as u64;
            let word = Rng(base ^ (o / 8)).next();
            *b = (word >> ((o % 8) * 8)) as u8;
        }
    }

    /// Item `i`'s whole content.
    pub fn content(&self, i: u64) -> Vec<u8> {
        let mut v = vec![0; self.size(i) as usize];
        self.fill(i, 0, &mut v);
        v
    }

    /// SHA-256 of item `i`'s content.
    pub fn sha(&self, i: u64) -> String {
        hex(&Sha256::digest(self.content(i)))
    }

    /// An idempotency key for item `i`, unique to one creation of it.
    pub fn key(&self, i: u64, nonce: u64) -> String {
        format!("demo-{}-{i}-{nonce:x}", self.seed)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha_of(mut r: impl Read) -> io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(buf.get(..k).unwrap_or_default());
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

/// Writes `bytes` to `path` durably: a temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Appends one line to `path` and syncs it.
pub fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())?;
    f.sync_data()
}

/// One line of the app's `done` file: an item delivered and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub item: u64,
    pub ok: bool,
    pub len: u64,
    pub sha: String,
}

/// The `done` file, by item (a later line for an item wins; a torn last line is skipped).
pub fn read_done(path: &Path) -> BTreeMap<u64, Done> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if let [item, ok, len, sha] = f.as_slice()
            && let (Ok(item), Ok(len)) = (item.parse(), len.parse())
            && sha.len() == 64
        {
            out.insert(
                item,
                Done {
                    item,
                    ok: *ok == "ok",
                    len,
                    sha: (*sha).to_owned(),
                },
            );
        }
    }
    out
}

/// An HTTP response: status, headers (lower-case names) and the body still to read.
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Box<dyn Read + Send>,
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`), with a body of
/// `len` bytes read from `body`.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<(&mut dyn Read, u64)>,
) -> io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let len = body.as_ref().map_or(0, |b| b.1);
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    s.write_all(head.as_bytes())?;
    if let Some((r, n)) = body {
        let copied = io::copy(&mut r.take(n), &mut s)?;
        if copied != n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "body ended early",
            ));
        }
    }
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("status line {line:?}"))
        })?;
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t != "identity")
    {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "chunked responses are not read",
        ));
    }
    let body: Box<dyn Read + Send> =
        match headers.get("content-length").and_then(|l| l.parse().ok()) {
            Some(n) => Box::new(r.take(n)),
            None => Box::new(r),
        };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One task as the agent reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentTask {
    pub id: u64,
    pub session: String,
    pub url: String,
    pub method: String,
    /// The tag the app set (the platform may lose it).
    pub tag: Option<String>,
    /// An upload's body file.
    pub body: Option<PathBuf>,
    pub key: Option<String>,
    /// "suspended", "running", "completed", "failed" or "cancelled".
    pub state: String,
    pub status: Option<u16>,
    pub error: Option<String>,
    /// A finished download's file, kept until the app collects the task.
    pub file: Option<PathBuf>,
    /// A failed download's resume data.
    pub resume_data: Option<String>,
    pub done: u64,
    pub total: Option<u64>,
}

/// A request to the agent, one JSON object per line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// A new task, suspended until `resume`.
    Create {
        session: String,
        url: String,
        method: String,
        tag: Option<String>,
        body: Option<PathBuf>,
        key: Option<String>,
        resume_data: Option<String>,
    },
    Resume {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    /// Every task the agent has (running, suspended, and finished ones not yet collected).
    List,
    /// The app has recorded this task's outcome: forget it.
    Collect {
        id: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub error: Option<String>,
    pub id: Option<u64>,
    pub tasks: Vec<AgentTask>,
}

/// The app's connection to the agent.
pub struct AgentClient {
    layout: Layout,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
}

impl AgentClient {
    pub fn new(layout: &Layout) -> Self {
        AgentClient {
            layout: layout.clone(),
            conn: None,
        }
    }

    /// Sends `call`; reconnects (the agent may have been restarted) and retries for up to
    /// 20 s.
    pub fn call(&mut self, call: &Call) -> Res<Reply> {
        let line = serde_json::to_string(call)? + "\n";
        let mut last = String::new();
        for _ in 0..400 {
            if self.conn.is_none() {
                let port = fs::read_to_string(self.layout.agent_port()).unwrap_or_default();
                match TcpStream::connect(("127.0.0.1", port.trim().parse::<u16>().unwrap_or(0))) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        self.conn = Some((BufReader::new(s.try_clone()?), s));
                    }
                    Err(e) => {
                        last = e.to_string();
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
            }
            let Some((r, w)) = self.conn.as_mut() else {
                continue;
            };
            let mut answer = String::new();
            let sent = w
                .write_all(line.as_bytes())
                .and_then(|()| r.read_line(&mut answer));
            match sent {
                Ok(n) if n > 0 => {
                    let reply: Reply = serde_json::from_str(&answer)?;
                    if !reply.ok {
                        return Err(reply.error.unwrap_or_default().into());
                    }
                    return Ok(reply);
                }
                Ok(_) => last = "agent closed the connection".into(),
                Err(e) => last = e.to_string(),
            }
            // Not idempotent for `Create`: a lost reply leaves an orphan task, which the
            // next reconcile cancels (as on the real platform).
            self.conn = None;
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("agent unreachable: {last}").into())
    }
}
