//! The main job, for real: transfers over loopback HTTP that survive SIGKILL.
//!
//! `cargo run --release --example demo` starts an HTTP server on 127.0.0.1, an agent process
//! (the platform's background-transfer daemon), a share-extension process and an app process,
//! all on one waybill store. It runs 200 mixed uploads and downloads of 64 KiB to 8 MiB while
//! it SIGKILLs the app 20 times and the agent 3 times (once deleting the agent's task table),
//! then checks every byte by SHA-256 on both ends and prints a summary. It exits non-zero if
//! any figure is off.
//!
//! Flags: `--transfers N`, `--app-kills N`, `--agent-kills N`, `--min-size BYTES`,
//! `--max-size BYTES` (suffixes K and M), `--seed N`, `--fail-rate P` (share of requests the
//! server fails on purpose), `--tag-loss P` (share of tags the agent drops), `--rate BYTES`
//! (each connection's bandwidth per second, so kills land mid-transfer; 0 for none),
//! `--dir PATH` (keep the work directory there), `--timeout SECS`.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "an example program; its errors end the run with a message"
)]

mod agent;
mod app;
mod common;
mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use common::{Kind, Layout, Res, Rng, Spec, read_done};

#[derive(Debug, Clone)]
struct Args {
    role: Option<String>,
    dir: Option<PathBuf>,
    server: String,
    transfers: u64,
    app_kills: u32,
    agent_kills: u32,
    min: u64,
    max: u64,
    seed: u64,
    fail_rate: f64,
    tag_loss: f64,
    rate: u64,
    timeout: u64,
}

fn size(s: &str) -> Res<u64> {
    let (n, m) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1024),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    Ok(n.parse::<u64>()? * m)
}

fn parse() -> Res<Args> {
    let mut a = Args {
        role: None,
        dir: None,
        server: String::new(),
        transfers: 200,
        app_kills: 20,
        agent_kills: 3,
        min: 64 * 1024,
        max: 8 * 1024 * 1024,
        seed: 1,
        fail_rate: 0.03,
        tag_loss: 0.1,
        rate: 8 * 1024 * 1024,
        timeout: 900,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--role" => a.role = Some(val()?),
            "--dir" => a.dir = Some(PathBuf::from(val()?)),
            "--server" => a.server = val()?,
            "--transfers" => a.transfers = val()?.parse()?,
            "--app-kills" => a.app_kills = val()?.parse()?,
            "--agent-kills" => a.agent_kills = val()?.parse()?,
            "--min-size" => a.min = size(&val()?)?,
            "--max-size" => a.max = size(&val()?)?,
            "--seed" => a.seed = val()?.parse()?,
            "--fail-rate" => a.fail_rate = val()?.parse()?,
            "--tag-loss" => a.tag_loss = val()?.parse()?,
            "--timeout" => a.timeout = val()?.parse()?,
            "--rate" => a.rate = size(&val()?)?,
            "-h" | "--help" => {
                println!("{}", HELP);
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other} (try --help)").into()),
        }
    }
    if a.min == 0 || a.max < a.min {
        return Err("sizes: need 0 < --min-size <= --max-size".into());
    }
    if a.agent_kills > 0 && a.app_kills <= a.agent_kills {
        return Err(
            "the agent is killed between app kills: need --app-kills > --agent-kills".into(),
        );
    }
    Ok(a)
}

const HELP: &str = "cargo run --release --example demo -- [--transfers 200] [--app-kills 20] \
[--agent-kills 3] [--min-size 64K] [--max-size 8M] [--seed 1] [--fail-rate 0.03] \
[--tag-loss 0.1] [--rate 8M] [--dir PATH] [--timeout 900]";

fn main() -> ExitCode {
    let run = parse().and_then(|a| {
        let spec = Spec {
            seed: a.seed,
            n: a.transfers,
            min: a.min,
            max: a.max,
        };
        match a.role.as_deref() {
            Some(role) => {
                let layout = Layout {
                    root: a.dir.clone().ok_or("--dir is required")?,
                };
                match role {
                    "agent" => agent::run(layout, a.server.clone(), a.seed, a.tag_loss),
                    "app" => app::run(&layout, spec, a.server.clone()),
                    "extension" => app::run_extension(&layout, spec, a.server.clone()),
                    r => Err(format!("unknown role {r}").into()),
                }
                .map(|()| true)
            }
            None => orchestrate(&a, spec),
        }
    });
    match run {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::from(2)
        }
    }
}

/// Starts the processes, kills them, waits, checks, prints. Returns whether every figure holds.
fn orchestrate(a: &Args, spec: Spec) -> Res<bool> {
    let began = Instant::now();
    let tmp = tempfile::tempdir()?;
    let root = a.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(root.join("app"))?;
    let layout = Layout { root };
    let server = server::start(spec, a.fail_rate, a.rate)?;
    let exe = std::env::current_exe()?;
    let role = |name: &str| -> Res<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(layout.root.join(format!("{name}.log")))?;
        Ok(Command::new(&exe)
            .args(["--role", name, "--dir"])
            .arg(&layout.root)
            .args(["--server", &server.addr])
            .args(["--transfers", &spec.n.to_string()])
            .args(["--min-size", &spec.min.to_string()])
            .args(["--max-size", &spec.max.to_string()])
            .args(["--seed", &spec.seed.to_string()])
            .args(["--tag-loss", &a.tag_loss.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    };

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {msg}")
        .unwrap()
        .progress_chars("=> ");
    let done_bar = bars.add(ProgressBar::new(spec.n).with_style(style.clone()));
    done_bar.set_prefix("transfers");
    let kill_bar =
        bars.add(ProgressBar::new(u64::from(a.app_kills + a.agent_kills)).with_style(style));
    kill_bar.set_prefix("kills");

    let mut rng = Rng(spec.seed ^ 0x0c4e_57a7);
    if a.app_kills == 0 {
        std::fs::write(layout.root.join("app/kills-done"), b"")?;
    }
    let mut procs = Procs {
        agent: role("agent")?,
        extension: Some(role("extension")?),
        app: role("app")?,
    };
    let Procs {
        agent,
        extension,
        app,
    } = &mut procs;
    let (mut app_kills, mut agent_kills, mut app_errors) = (0u32, 0u32, 0u32);
    // The agent is killed after evenly spaced app kills; the middle one loses its table.
    let agent_at: Vec<u32> = (1..=a.agent_kills)
        .map(|k| (k * a.app_kills.max(1)) / (a.agent_kills + 1))
        .collect();
    let table_lost_at = a.agent_kills.div_ceil(2);
    let deadline = began + Duration::from_secs(a.timeout);
    let mut next_kill = Instant::now() + Duration::from_millis(150 + rng.below(750));
    let finished = loop {
        let done = read_done(&layout.done()).len() as u64;
        done_bar.set_position(done);
        if Instant::now() > deadline {
            let _ = app.kill();
            break false;
        }
        if let Some(e) = extension.as_mut()
            && let Some(status) = e.try_wait()?
        {
            *extension = if status.success() {
                None
            } else {
                Some(role("extension")?)
            };
        }
        if let Some(status) = app.try_wait()? {
            if status.success() {
                break true;
            }
            app_errors += 1;
            kill_bar.set_message(format!("app exited with {status}; relaunched"));
            *app = role("app")?;
            continue;
        }
        if app_kills < a.app_kills && Instant::now() >= next_kill {
            app.kill()?;
            app.wait()?;
            app_kills += 1;
            kill_bar.inc(1);
            if agent_at.contains(&app_kills) && agent_kills < a.agent_kills {
                agent.kill()?;
                agent.wait()?;
                agent_kills += 1;
                kill_bar.inc(1);
                if agent_kills == table_lost_at {
                    std::fs::remove_file(layout.agent_table())?;
                    kill_bar.set_message("agent killed and its task table deleted");
                } else {
                    kill_bar.set_message("agent killed");
                }
                *agent = role("agent")?;
            } else {
                kill_bar.set_message("app killed");
            }
            if app_kills == a.app_kills {
                std::fs::write(layout.root.join("app/kills-done"), b"")?;
            }
            *app = role("app")?;
            next_kill = Instant::now() + Duration::from_millis(150 + rng.below(750));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(procs);
    done_bar.finish();
    kill_bar.finish_with_message("done");

    let stats = server.stats.lock().map_err(|_| "poisoned")?.clone();
    let done = read_done(&layout.done());
    let mut figures = Figures::default();
    for i in 0..spec.n {
        let (len, sha) = (spec.size(i), spec.sha(i));
        let app_ok = done
            .get(&i)
            .is_some_and(|d| d.ok && d.len == len && d.sha == sha);
        let server_ok = if spec.kind(i).is_upload() {
            let mut bodies = stats.stored.values().filter(|(item, _, _)| *item == i);
            bodies.next() == Some(&(i, len, sha.clone())) && bodies.next().is_none()
        } else {
            true // the server generated these bytes: its side is `spec`
        };
        figures.completed += u64::from(done.get(&i).is_some_and(|d| d.ok));
        if app_ok && server_ok {
            figures.verified_bytes += len;
            figures.verified += 1;
        }
        figures.total_bytes += len;
    }
    let mut per_item: BTreeMap<u64, u64> = BTreeMap::new();
    for (item, _, _) in stats.stored.values() {
        *per_item.entry(*item).or_default() += 1;
    }
    figures.duplicates_stored = per_item.values().map(|n| n.saturating_sub(1)).sum();
    let uploads = (0..spec.n)
        .filter(|i| spec.kind(*i) != Kind::Download)
        .count() as u64;
    let store = layout.store();
    figures.store_leftovers = ["transfers", "staging", "trash", "quarantine"]
        .iter()
        .map(|d| count_files(&store.join(d)))
        .sum();
    figures.temp_leftovers = count_files(&layout.app_files())
        + count_files(&layout.app_tmp())
        + count_files(&layout.agent_downloads());
    let actions = std::fs::read_to_string(layout.actions()).unwrap_or_default();
    let (mut at_launch, mut running): (BTreeMap<&str, u64>, BTreeMap<&str, u64>) =
        Default::default();
    for l in actions.lines() {
        match l.split_once(' ') {
            Some(("launch", k)) => *at_launch.entry(k).or_default() += 1,
            Some((_, k)) => *running.entry(k).or_default() += 1,
            None => {}
        }
    }

    let ok = finished
        && figures.completed == spec.n
        && figures.verified == spec.n
        && figures.verified_bytes == figures.total_bytes
        && figures.duplicates_stored == 0
        && stats.stored.len() as u64 == uploads
        && figures.store_leftovers == 0
        && figures.temp_leftovers == 0
        && app_kills == a.app_kills
        && agent_kills == a.agent_kills
        && app_errors == 0;
    println!("waybill demo (seed {})", spec.seed);
    println!("transfers completed: {} of {}", figures.completed, spec.n);
    println!(
        "bytes verified by SHA-256 on both ends: {} of {} ({} transfers)",
        figures.verified_bytes, figures.total_bytes, figures.verified
    );
    println!(
        "uploads stored by the server: {} of {uploads}",
        stats.stored.len()
    );
    println!("duplicate uploads stored: {}", figures.duplicates_stored);
    println!(
        "duplicate upload attempts (full bodies sent again, not stored): {}",
        stats.duplicate_attempts
    );
    println!(
        "incomplete upload bodies (cut by a kill, not stored): {}",
        stats.incomplete
    );
    println!(
        "server failures injected: {}; downloads resumed with Range: {}",
        stats.injected_failures, stats.ranged
    );
    println!(
        "kills: app {app_kills} of {}, agent {agent_kills} of {} (task table deleted once); app errors: {app_errors}",
        a.app_kills, a.agent_kills
    );
    println!("leftover files in the store: {}", figures.store_leftovers);
    println!("leftover files in temp: {}", figures.temp_leftovers);
    let kinds = |m: &BTreeMap<&str, u64>| {
        let v: Vec<String> = m.iter().map(|(k, n)| format!("{k} {n}")).collect();
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    println!(
        "reconcile actions at launch, by kind: {}",
        kinds(&at_launch)
    );
    println!(
        "reconcile actions while running (adopt not counted), by kind: {}",
        kinds(&running)
    );
    println!("wall time: {:.1} s", began.elapsed().as_secs_f64());
    println!("result: {}", if ok { "ok" } else { "FAILED" });
    if !ok {
        eprintln!(
            "demo: a figure is off; logs are in {} (kept)",
            layout.root.display()
        );
        let _ = tmp.keep();
    }
    Ok(ok)
}

/// The demo's processes; whatever ends the run (an error included) kills them.
struct Procs {
    agent: Child,
    extension: Option<Child>,
    app: Child,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in [
            Some(&mut self.app),
            Some(&mut self.agent),
            self.extension.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Default)]
struct Figures {
    completed: u64,
    verified: u64,
    verified_bytes: u64,
    total_bytes: u64,
    duplicates_stored: u64,
    store_leftovers: u64,
    temp_leftovers: u64,
}

fn count_files(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                1 + count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
