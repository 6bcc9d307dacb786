//! The loopback demo, small: 30 transfers through 4 SIGKILLs of the app and 1 of the agent
//! (which loses its task table), every summary figure asserted.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The example binary, built (or found up to date) by cargo for this test: `cargo test` does
/// not rebuild examples for a run of this test alone, and a stale binary would test old code.
fn demo_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let demo = dir
        .join("examples")
        .join(format!("demo{}", std::env::consts::EXE_SUFFIX));
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--example", "demo"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(built.success(), "cargo build --example demo failed");
    }
    demo
}

fn figure(summary: &BTreeMap<String, String>, key: &str) -> String {
    summary
        .get(key)
        .unwrap_or_else(|| panic!("no {key:?} in the summary: {summary:#?}"))
        .clone()
}

#[test]
fn thirty_transfers_survive_five_kills_with_every_figure_right() {
    let exe = demo_exe();
    assert!(
        exe.is_file(),
        "{} missing: cargo test builds examples",
        exe.display()
    );
    let began = Instant::now();
    let out = Command::new(&exe)
        .args([
            "--transfers",
            "30",
            "--app-kills",
            "4",
            "--agent-kills",
            "1",
        ])
        .args(["--min-size", "16K", "--max-size", "256K", "--rate", "256K"])
        .args(["--seed", "7", "--fail-rate", "0.05", "--timeout", "110"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        began.elapsed() < Duration::from_secs(120),
        "took {:?}",
        began.elapsed()
    );
    let summary: BTreeMap<String, String> = stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();

    assert_eq!(figure(&summary, "transfers completed"), "30 of 30");
    let bytes = figure(&summary, "bytes verified by SHA-256 on both ends");
    let (verified, rest) = bytes.split_once(" of ").unwrap();
    let total = rest.split(' ').next().unwrap();
    assert_eq!(verified, total, "{bytes}");
    assert!(
        verified.parse::<u64>().unwrap() >= 30 * 16 * 1024,
        "{bytes}"
    );
    assert!(rest.ends_with("(30 transfers)"), "{bytes}");
    // Items 1, 2, 4, 5, 7, 8 and 9 of every ten are uploads.
    assert_eq!(figure(&summary, "uploads stored by the server"), "21 of 21");
    assert_eq!(figure(&summary, "duplicate uploads stored"), "0");
    let dups = figure(
        &summary,
        "duplicate upload attempts (full bodies sent again, not stored)",
    );
    dups.parse::<u64>().unwrap();
    assert_eq!(
        figure(&summary, "kills"),
        "app 4 of 4, agent 1 of 1 (task table deleted once); app errors: 0"
    );
    assert_eq!(figure(&summary, "leftover files in the store"), "0");
    assert_eq!(figure(&summary, "leftover files in temp"), "0");
    // Every launch after a kill reconciled; outcomes were delivered.
    let launch = figure(&summary, "reconcile actions at launch, by kind");
    let running = figure(
        &summary,
        "reconcile actions while running (adopt not counted), by kind",
    );
    let delivered: u64 = [&launch, &running]
        .iter()
        .flat_map(|s| s.split(", "))
        .filter_map(|kv| kv.strip_prefix("deliver "))
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert!(delivered >= 30, "{launch} / {running}");
    assert!(figure(&summary, "wall time").ends_with(" s"));
    assert_eq!(figure(&summary, "result"), "ok");
}
