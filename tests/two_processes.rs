//! Two real processes on one store: racing `complete` gives exactly one winner per transfer,
//! and read-modify-writes of one transfer are serialized (no lost update).
//!
//! The helper processes are this test binary run again with `WAYBILL_HELPER` set.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempStore, TestResult};
use waybill::{Completion, ErrorClass, NewTransfer, Outcome, RetryPolicy, Store, TransferId};

const ROLE: &str = "WAYBILL_HELPER";

/// Entry point of the helper processes; a no-op in the normal test run.
#[test]
fn helper() -> TestResult {
    let Ok(role) = std::env::var(ROLE) else {
        return Ok(());
    };
    let root = PathBuf::from(std::env::var("WAYBILL_ROOT")?);
    let out = PathBuf::from(std::env::var("WAYBILL_OUT")?);
    let go = PathBuf::from(std::env::var("WAYBILL_GO")?);
    let store = Store::builder()
        .lock_timeout(Duration::from_secs(60))
        .open(&root)?;
    // Start together, to make the race real.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !go.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut lines = String::new();
    match role.as_str() {
        "complete" => {
            let status: u16 = std::env::var("WAYBILL_STATUS")?.parse()?;
            let ids = std::fs::read_to_string(root.join("..").join("ids"))?;
            for id in ids.lines() {
                let id: TransferId = id.parse()?;
                match store.complete(id, Some(status))? {
                    Completion::Won(_) => lines.push_str(&format!("{id} won {status}\n")),
                    Completion::Lost(Outcome::Succeeded { status: Some(s) }) => {
                        lines.push_str(&format!("{id} lost {s}\n"))
                    }
                    Completion::Lost(o) => return Err(format!("unexpected outcome {o}").into()),
                }
            }
        }
        "increment" => {
            let id: TransferId = std::env::var("WAYBILL_ID")?.parse()?;
            for _ in 0..1000 {
                store.fail(id, ErrorClass::Transient, "count")?;
            }
            lines.push_str("done\n");
        }
        r => return Err(format!("unknown role {r}").into()),
    }
    std::fs::write(out, lines)?;
    Ok(())
}

fn spawn(
    role: &str,
    root: &Path,
    out: &Path,
    go: &Path,
    env: &[(&str, String)],
) -> std::io::Result<Child> {
    let mut c = Command::new(std::env::current_exe()?);
    c.args(["--exact", "helper", "--test-threads=1", "--nocapture"])
        .stdout(Stdio::null())
        .env(ROLE, role)
        .env("WAYBILL_ROOT", root)
        .env("WAYBILL_OUT", out)
        .env("WAYBILL_GO", go);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn()
}

fn wait_ok(mut c: Child) -> TestResult {
    let status = c.wait()?;
    if !status.success() {
        return Err(format!("helper exited with {status}").into());
    }
    Ok(())
}

#[test]
fn racing_complete_has_exactly_one_winner_per_transfer() -> TestResult {
    let t = TempStore::new()?;
    let root = t.root();
    let ids = {
        let store = Store::open(&root)?;
        store.create_batch(
            (0..200)
                .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
                .collect(),
        )?
    };
    let list: String = ids.iter().map(|id| format!("{id}\n")).collect();
    std::fs::write(t.dir.path().join("ids"), list)?;
    let go = t.dir.path().join("go");
    let outs = [t.dir.path().join("a.out"), t.dir.path().join("b.out")];
    let a = spawn(
        "complete",
        &root,
        &outs[0],
        &go,
        &[("WAYBILL_STATUS", "201".into())],
    )?;
    let b = spawn(
        "complete",
        &root,
        &outs[1],
        &go,
        &[("WAYBILL_STATUS", "202".into())],
    )?;
    std::fs::write(&go, b"")?;
    wait_ok(a)?;
    wait_ok(b)?;

    // id -> (winners, statuses the losers saw)
    let mut seen: HashMap<String, (Vec<u16>, Vec<u16>)> = HashMap::new();
    for out in &outs {
        for line in std::fs::read_to_string(out)?.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            let [id, verdict, status] = parts[..] else {
                return Err(format!("bad line {line}").into());
            };
            let e = seen.entry(id.to_owned()).or_default();
            let s: u16 = status.parse()?;
            if verdict == "won" {
                e.0.push(s)
            } else {
                e.1.push(s)
            }
        }
    }
    assert_eq!(seen.len(), 200);
    let mut wins = [0usize; 2];
    for (id, (won, lost)) in &seen {
        assert_eq!(won.len(), 1, "{id}: exactly one winner, got {won:?}");
        assert_eq!(lost.len(), 1, "{id}: exactly one loser");
        assert_eq!(
            won, lost,
            "{id}: the loser sees the winner's recorded outcome"
        );
        wins[usize::from(won[0] == 202)] += 1;
    }
    eprintln!("wins: process A {}, process B {}", wins[0], wins[1]);
    // And the store agrees with the winners.
    let store = Store::open(&root)?;
    for id in &ids {
        let rec = store.get(*id)?.state.outcome;
        let (won, _) = &seen[&id.to_string()];
        assert_eq!(
            rec,
            Some(Outcome::Succeeded {
                status: Some(won[0])
            })
        );
    }
    Ok(())
}

#[test]
fn concurrent_read_modify_writes_lose_no_update() -> TestResult {
    let t = TempStore::new()?;
    let root = t.root();
    let id = {
        let store = Store::open(&root)?;
        store.create(
            NewTransfer::download("https://example.com/x").retry(RetryPolicy {
                max_attempts: u32::MAX,
                ..RetryPolicy::default()
            }),
        )?
    };
    let go = t.dir.path().join("go");
    let outs = [t.dir.path().join("a.out"), t.dir.path().join("b.out")];
    let env = [("WAYBILL_ID", id.to_string())];
    let a = spawn("increment", &root, &outs[0], &go, &env)?;
    let b = spawn("increment", &root, &outs[1], &go, &env)?;
    std::fs::write(&go, b"")?;
    wait_ok(a)?;
    wait_ok(b)?;
    let store = Store::open(&root)?;
    assert_eq!(store.get(id)?.state.failures, 2000);
    Ok(())
}

/// A writer that waited for the lock while another process moved the transfer away (a purge)
/// must not report success on the moved-away file.
#[test]
fn an_update_that_waited_on_a_removed_transfer_is_not_found() -> TestResult {
    let t = TempStore::new()?;
    let root = t.root();
    let store = Store::open(&root)?;
    let id = store.create(NewTransfer::download("https://example.com/x"))?;
    let dir = root.join("transfers").join(id.to_string());
    // Stand in for the other process: hold the lock, then move the directory to trash.
    let held = std::fs::File::open(dir.join("state"))?;
    held.lock()?;
    std::thread::scope(|s| -> TestResult {
        let waiter = s.spawn(|| store.complete(id, Some(200)));
        std::thread::sleep(Duration::from_millis(100));
        std::fs::rename(&dir, root.join("trash").join(id.to_string()))?;
        drop(held);
        let r = waiter.join().map_err(|_| "waiter panicked")?;
        let err = r.expect_err("the transfer is gone; completing it must not win");
        assert!(
            matches!(err.kind(), waybill::ErrorKind::NotFound { .. }),
            "{err}"
        );
        Ok(())
    })?;
    Ok(())
}
