//! The HTTP server on 127.0.0.1 (an ephemeral port): uploads stored under their idempotency
//! key, generated files served with `Range`. It fails a small share of requests on purpose
//! (503, or a download cut off halfway) so that retries and resumes happen.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::common::{Rng, Spec, hex};

/// What the server saw.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Upload bodies stored, by idempotency key: (item, length, SHA-256).
    pub stored: BTreeMap<String, (u64, u64, String)>,
    /// Full bodies received again for a key already stored (not stored again).
    pub duplicate_attempts: u64,
    /// Upload bodies that ended early (a killed agent): never stored.
    pub incomplete: u64,
    /// Requests failed on purpose.
    pub injected_failures: u64,
    /// Download responses (full or ranged) and those that resumed with `Range`.
    pub downloads: u64,
    pub ranged: u64,
}

pub struct Server {
    pub addr: String,
    pub stats: Arc<Mutex<Stats>>,
}

/// Starts the server on its own threads.
pub fn start(spec: Spec, fail_rate: f64, rate: u64) -> io::Result<Server> {
    let server = tiny_http::Server::http("127.0.0.1:0").map_err(io::Error::other)?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("no IP address"))?
        .to_string();
    let stats = Arc::new(Mutex::new(Stats::default()));
    let server = Arc::new(server);
    let rng = Arc::new(Mutex::new(Rng(spec.seed ^ 0x5e4e)));
    for _ in 0..8 {
        let (server, stats, rng) = (Arc::clone(&server), Arc::clone(&stats), Arc::clone(&rng));
        std::thread::spawn(move || {
            for req in server.incoming_requests() {
                let fail = rng.lock().map(|mut r| r.chance(fail_rate)).unwrap_or(false);
                handle(req, spec, &stats, fail, rate);
            }
        });
    }
    Ok(Server { addr, stats })
}

fn header(req: &tiny_http::Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_owned())
}

fn item_of(url: &str, prefix: &str) -> Option<u64> {
    url.strip_prefix(prefix)?.parse().ok()
}

fn handle(mut req: tiny_http::Request, spec: Spec, stats: &Mutex<Stats>, fail: bool, rate: u64) {
    let url = req.url().to_owned();
    let reply = |req: tiny_http::Request, code: u16| {
        let _ = req.respond(tiny_http::Response::empty(code));
    };
    if let Some(item) = item_of(&url, "/upload/") {
        let key = header(&req, "Idempotency-Key").unwrap_or_default();
        let want = req.body_length().unwrap_or(0) as u64;
        let mut h = Sha256::new();
        let mut buf = vec![0; 64 * 1024];
        let mut got = 0u64;
        let mut pace = Pace::new(rate);
        let complete = loop {
            pace.wait(got);
            match req.as_reader().read(&mut buf) {
                Ok(0) => break got == want,
                Ok(n) => {
                    h.update(buf.get(..n).unwrap_or_default());
                    got += n as u64;
                }
                Err(_) => break false,
            }
        };
        let Ok(mut s) = stats.lock() else { return };
        if !complete {
            s.incomplete += 1;
            drop(s);
            return reply(req, 400);
        }
        if fail {
            s.injected_failures += 1;
            drop(s);
            return reply(req, 503);
        }
        if s.stored.contains_key(&key) {
            s.duplicate_attempts += 1;
            drop(s);
            return reply(req, 200);
        }
        s.stored.insert(key, (item, got, hex(&h.finalize())));
        drop(s);
        return reply(req, 201);
    }
    if let Some(item) = item_of(&url, "/files/") {
        let size = spec.size(item);
        let from = header(&req, "Range")
            .and_then(|r| {
                r.strip_prefix("bytes=")?
                    .strip_suffix('-')?
                    .parse::<u64>()
                    .ok()
            })
            .filter(|&f| f <= size);
        if let Ok(mut s) = stats.lock() {
            s.downloads += 1;
            s.ranged += u64::from(from.is_some());
            s.injected_failures += u64::from(fail);
        }
        if fail && from.is_none() && size > 1 {
            // Cut off halfway: the agent keeps what it got and the app resumes from it.
            let body = Gen {
                spec,
                item,
                at: 0,
                end: size,
                cut: Some(size / 2),
                pace: Pace::new(rate),
            };
            let resp =
                tiny_http::Response::new(200.into(), vec![], body, Some(size as usize), None)
                    .with_chunked_threshold(usize::MAX);
            let _ = req.respond(resp);
            return;
        }
        if fail {
            return reply(req, 503);
        }
        let start = from.unwrap_or(0);
        let body = Gen {
            spec,
            item,
            at: start,
            end: size,
            cut: None,
            pace: Pace::new(rate),
        };
        let mut headers = vec![];
        let code = if let Some(f) = from {
            if let Ok(h) = tiny_http::Header::from_bytes(
                "Content-Range",
                format!("bytes {f}-{}/{size}", size.saturating_sub(1)),
            ) {
                headers.push(h);
            }
            206
        } else {
            200
        };
        let resp = tiny_http::Response::new(
            code.into(),
            headers,
            body,
            Some((size - start) as usize),
            None,
        )
        .with_chunked_threshold(usize::MAX);
        let _ = req.respond(resp);
        return;
    }
    reply(req, 404);
}

/// A generated file's bytes from `at` to `end`, failing at `cut` when set.
struct Gen {
    spec: Spec,
    item: u64,
    at: u64,
    end: u64,
    cut: Option<u64>,
    pace: Pace,
}

/// Holds a connection to `rate` bytes per second (0: unlimited), as a real network would.
struct Pace {
    rate: u64,
    began: std::time::Instant,
    sent: u64,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Pace {
            rate,
            began: std::time::Instant::now(),
            sent: 0,
        }
    }

    /// Sleeps until `total` bytes are due.
    fn wait(&mut self, total: u64) {
        self.sent = total;
        if self.rate == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        if let Some(ahead) = due.checked_sub(self.began.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

impl Read for Gen {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cut.is_some_and(|c| self.at >= c) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "cut off on purpose",
            ));
        }
        let sent = self.pace.sent;
        self.pace.wait(sent);
        let stop = self.cut.unwrap_or(self.end).min(self.end);
        let n = (stop.saturating_sub(self.at)).min(buf.len() as u64) as usize;
        if let Some(b) = buf.get_mut(..n) {
            self.spec.fill(self.item, self.at, b);
        }
        self.at += n as u64;
        self.pace.sent += n as u64;
        Ok(n)
    }
}
