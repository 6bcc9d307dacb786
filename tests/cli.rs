//! The `waybill` command, driven as a user would: every command against temporary stores, with
//! bad input for each (a missing store, a malformed id, an unknown phase, malformed task JSON, a
//! file that does not exist, a store of a newer format). Every refusal has the right exit code,
//! a message on stderr (one sentence from waybill; the argument parser's usage errors add a
//! usage line), and leaves `FORMAT`, `transfers/` and `quarantine/` byte-for-byte as they
//! were. Read commands and dry runs write nothing anywhere in the store.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as J;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> J {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

fn wb_in(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn waybill");
    {
        let mut pipe = child.stdin.take().unwrap();
        if let Some(b) = stdin {
            pipe.write_all(b).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn wb(args: &[&str]) -> Run {
    wb_in(args, None)
}

/// Runs a command that must succeed and returns its stdout.
fn ok(args: &[&str]) -> String {
    let r = wb(args);
    assert_eq!(r.code, 0, "{args:?} failed: {}{}", r.stdout, r.stderr);
    r.stdout.trim().to_owned()
}

/// Every file and directory under `FORMAT`, `transfers/` and `quarantine/`, with contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    whole(root)
        .into_iter()
        .filter(|(p, _)| {
            ["FORMAT", "transfers", "quarantine"]
                .iter()
                .any(|top| p.starts_with(top))
        })
        .collect()
}

/// A command that must be refused with `code`, one clear sentence, and no change.
fn refused(root: &Path, args: &[&str], code: i32) -> String {
    let before = snapshot(root);
    let r = wb(args);
    assert_eq!(
        r.code, code,
        "{args:?}: expected exit {code}, got {}: {}{}",
        r.code, r.stdout, r.stderr
    );
    let msg = r.stderr.trim();
    assert!(!msg.is_empty(), "{args:?}: no message");
    if msg.starts_with("waybill: ") {
        assert_eq!(
            msg.lines().count(),
            1,
            "{args:?}: more than one line: {msg}"
        );
        assert!(msg.ends_with('.'), "{args:?}: not a sentence: {msg}");
    }
    assert!(
        msg.starts_with("waybill: ") || msg.starts_with("error: "),
        "{args:?}: {msg}"
    );
    assert_eq!(snapshot(root), before, "{args:?} changed the store");
    msg.to_owned()
}

/// Creates a download in session `bg` and returns its id.
fn bg_download(r: &str, url: &str) -> String {
    ok(&["create", r, "--download", url, "--session", "bg"])
}

fn store() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let r = root.to_str().unwrap().to_owned();
    ok(&["init", &r]);
    (dir, root, r)
}

#[test]
fn every_command_works_on_a_real_store() {
    let (dir, root, r) = store();
    // init again: the store is already there.
    assert_eq!(wb(&["--json", "init", &r]).json()["created"], false);

    // create: a linked file, standard input, and a download.
    let src = dir.path().join("photo.jpg");
    std::fs::write(&src, b"jpeg bytes").unwrap();
    let s = src.to_str().unwrap();
    let up = ok(&[
        "create",
        &r,
        "--upload",
        "https://up.example/a",
        "--file",
        s,
        "--link",
        "copy",
        "--group",
        "album",
        "--header",
        "X-Kind: photo",
        "--secret-header",
        "Authorization: Bearer t0ken",
        "--meta",
        "album=holiday",
        "--deadline",
        "2099-01-01T00:00:00Z",
        "--max-attempts",
        "3",
    ]);
    let piped = wb_in(
        &[
            "--json",
            "create",
            &r,
            "--upload",
            "https://up.example/b",
            "--stdin",
            "--group",
            "album",
        ],
        Some(b"from stdin"),
    );
    assert_eq!(piped.code, 0, "{}", piped.stderr);
    let up2 = piped.json()["id"].as_str().unwrap().to_owned();
    let down = bg_download(&r, "https://cdn.example/c");
    for id in [&up, &up2, &down] {
        assert_eq!(id.len(), 36, "create prints only the id: {id}");
    }
    let secrets = std::fs::read(root.join("transfers").join(&up).join("manifest")).unwrap();
    assert!(
        !secrets.windows(5).any(|w| w == b"t0ken"),
        "a secret reached the disk"
    );

    // bind, progress, received, resume-data, finish.
    ok(&[
        "bind",
        &r,
        &down,
        "--task",
        "7",
        "--session",
        "bg",
        "--tag",
        &down,
    ]);
    ok(&[
        "progress",
        &r,
        &up,
        "--done",
        "4",
        "--total",
        "10",
        "--durable",
    ]);
    ok(&["progress", &r, &up2, "--done", "2"]);
    let shown = wb(&["--json", "show", &r, &up2]).json();
    assert_eq!(shown["sent"], 2, "coalesced progress is flushed on exit");
    let chunk = dir.path().join("chunk");
    std::fs::write(&chunk, b"0123456789").unwrap();
    let rec = wb(&[
        "--json",
        "received",
        &r,
        &down,
        "--append",
        chunk.to_str().unwrap(),
    ])
    .json();
    assert_eq!(rec["partial_len"], 10);
    ok(&["resume-data", &r, &down, "--file", chunk.to_str().unwrap()]);
    let file = dir.path().join("downloaded");
    std::fs::write(&file, b"the whole file").unwrap();
    ok(&["finish", &r, &down, "--file", file.to_str().unwrap()]);
    assert!(!file.exists(), "finish moves the file in");

    // show: the documented fields.
    let t = wb(&["--json", "show", &r, &up]).json();
    for k in [
        "id",
        "kind",
        "phase",
        "group",
        "session",
        "url",
        "failures",
        "max_attempts",
        "next_attempt",
        "task",
        "sent",
        "received",
        "expected",
        "outcome",
    ] {
        assert!(t.get(k).is_some(), "show lacks {k}: {t}");
    }
    assert_eq!(
        (
            t["kind"].as_str(),
            t["group"].as_str(),
            t["session"].as_str()
        ),
        (Some("upload"), Some("album"), Some("default"))
    );
    assert_eq!(
        (
            t["sent"].as_u64(),
            t["expected"].as_u64(),
            t["max_attempts"].as_u64()
        ),
        (Some(4), Some(10), Some(3))
    );
    let d = wb(&["--json", "show", &r, &down]).json();
    assert_eq!(d["task"]["task_id"], 7);
    assert_eq!(d["task"]["tag"].as_str(), Some(down.as_str()));

    // complete: won, then lost with the recorded outcome.
    assert_eq!(ok(&["complete", &r, &down, "--status", "200"]), "won");
    let lost = ok(&["complete", &r, &down]);
    assert!(lost.starts_with("lost succeeded (200)"), "{lost}");
    // fail: a retry time, then gave up.
    let retry = ok(&["fail", &r, &up2, "--error", "timeout"]);
    assert!(retry.starts_with("retry-at 20"), "{retry}");
    let at = wb(&[
        "--json",
        "fail",
        &r,
        &up2,
        "--error",
        "timeout",
        "--retry-after",
        "2099-01-01T00:00:00Z",
    ])
    .json();
    assert_eq!(
        at,
        serde_json::json!({"result": "retry-at", "at": "2099-01-01T00:00:00Z"})
    );
    assert_eq!(
        ok(&["fail", &r, &up2, "--error", "403", "--permanent"]),
        "gave-up"
    );

    // ls with every filter.
    let all = wb(&["--json", "ls", &r]).json();
    assert_eq!(all["transfers"].as_array().unwrap().len(), 3);
    let ls = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["--json", "ls", &r];
        a.extend_from_slice(extra);
        wb(&a).json()["transfers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ls(&["--phase", "completed"]), vec![down.clone()]);
    assert_eq!(ls(&["--kind", "download"]), vec![down.clone()]);
    assert_eq!(ls(&["--session", "bg"]), vec![down.clone()]);
    let mut album = vec![up.clone(), up2.clone()];
    album.sort();
    assert_eq!(ls(&["--group", "album"]), album);
    assert!(ok(&["ls", &r]).lines().count() == 3);

    // cancel by group, then ack the delivered outcomes.
    let c = wb(&["--json", "cancel", &r, "--group", "album"]).json();
    assert_eq!(c["cancelled"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["already_ended"].as_array().unwrap().len(), 1, "{c}");
    ok(&["ack", &r, &down]);
    ok(&["ack", &r, &up2]);

    // stats, gc (purges the cancelled upload), fsck clean.
    let st = wb(&["--json", "stats", &r]).json();
    assert_eq!(st["transfers"], 1);
    assert_eq!(st["by_phase"]["cancelled"], 1);
    assert_eq!(st["by_group"]["album"], 1);
    assert!(st["bytes_on_disk"].as_u64().unwrap() > 0);
    let gc = wb(&["--json", "gc", &r]).json();
    assert_eq!(gc["purged"], serde_json::json!([up]));
    assert_eq!(wb(&["--json", "stats", &r]).json()["transfers"], 0);
    assert_eq!(wb(&["fsck", &r]).code, 0);
}

/// The worked example of `docs/CLI.md`: three transfers, two bound, a task list that omits one
/// and adds an unknown task.
#[test]
fn reconcile_plans_without_changing_anything_until_applied() {
    let (dir, root, r) = store();
    let a = bg_download(&r, "https://cdn.example/a");
    let b = bg_download(&r, "https://cdn.example/b");
    let c = bg_download(&r, "https://cdn.example/c");
    ok(&["bind", &r, &a, "--task", "1", "--tag", &a]);
    ok(&["bind", &r, &b, "--task", "2"]);
    let tasks = format!(
        r#"[{{"session": "bg", "task_id": 1, "url": "https://cdn.example/a", "tag": "{a}", "state": "running", "received": 512, "expected": 2048}},
           {{"session": "bg", "task_id": 9, "url": "https://elsewhere.example/z", "state": "suspended"}}]"#
    );
    let file = dir.path().join("tasks.json");
    std::fs::write(&file, &tasks).unwrap();
    let f = file.to_str().unwrap();

    let before = snapshot(&root);
    let plan = wb(&["--json", "reconcile", &r, "--tasks", f, "--session", "bg"]).json();
    assert_eq!(snapshot(&root), before, "a dry run changes nothing");
    let actions = plan["actions"].as_array().unwrap();
    let by_name = |n: &str| {
        actions
            .iter()
            .filter(|x| x["action"] == n)
            .cloned()
            .collect::<Vec<_>>()
    };
    let adopt = by_name("adopt");
    assert_eq!(adopt.len(), 1);
    assert_eq!(adopt[0]["transfer"].as_str(), Some(a.as_str()));
    assert_eq!(
        adopt[0]["task"],
        serde_json::json!({"session": "bg", "task_id": 1})
    );
    let recreate = by_name("recreate");
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(
        recreate
            .iter()
            .map(|x| x["transfer"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        want
    );
    for x in &recreate {
        assert_eq!(x["attempt"], 1);
        assert!(x["not_before"].is_null());
        assert!(
            x["request"]["url"]
                .as_str()
                .unwrap()
                .starts_with("https://cdn.example/")
        );
    }
    let cancel = by_name("cancel");
    assert_eq!(cancel.len(), 1);
    assert_eq!(
        cancel[0]["task"],
        serde_json::json!({"session": "bg", "task_id": 9})
    );
    assert!(cancel[0].get("transfer").is_none());

    // Standard input works too; --apply performs the store side and prints the same plan.
    let applied = wb_in(
        &[
            "--json",
            "reconcile",
            &r,
            "--tasks",
            "-",
            "--session",
            "bg",
            "--apply",
        ],
        Some(tasks.as_bytes()),
    );
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert_eq!(applied.json()["actions"], plan["actions"]);
    let shown = wb(&["--json", "show", &r, &a]).json();
    assert_eq!(shown["received"], 512, "adopt refreshed the counters");
    // Text output names each action.
    let text = ok(&["reconcile", &r, "--tasks", f, "--all-sessions"]);
    assert!(
        text.contains("adopt") && text.contains("recreate") && text.contains("cancel"),
        "{text}"
    );

    // reset: a dry run, then applied; the session stays usable.
    let before = snapshot(&root);
    let reset = wb(&["--json", "reset", &r, "--tasks", f, "--session", "bg"]).json();
    assert_eq!(snapshot(&root), before);
    let names: Vec<&str> = reset["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["action"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["purge", "purge", "purge", "cancel"]);
    ok(&["reset", &r, "--tasks", f, "--session", "bg", "--apply"]);
    assert_eq!(
        wb(&["--json", "ls", &r]).json()["transfers"],
        serde_json::json!([])
    );
}

#[test]
fn bad_input_is_refused_with_the_right_code_and_changes_nothing() {
    let (dir, root, r) = store();
    let id = ok(&["create", &r, "--download", "https://cdn.example/a"]);
    let tasks = dir.path().join("tasks.json");
    std::fs::write(&tasks, "[]").unwrap();
    let t = tasks.to_str().unwrap();
    let missing_file = dir.path().join("no-such-file");
    let nf = missing_file.to_str().unwrap();

    // A malformed id: usage error (2) for every command that takes one.
    let bad = "not-a-uuid";
    for args in [
        vec!["bind", &r, bad, "--task", "1"],
        vec!["progress", &r, bad, "--done", "1"],
        vec!["received", &r, bad, "--append", t],
        vec!["resume-data", &r, bad, "--file", t],
        vec!["finish", &r, bad, "--file", t],
        vec!["complete", &r, bad],
        vec!["fail", &r, bad, "--error", "x"],
        vec!["cancel", &r, bad],
        vec!["ack", &r, bad],
        vec!["show", &r, bad],
    ] {
        let msg = refused(&root, &args, 2);
        assert!(msg.contains("not a transfer id"), "{msg}");
    }
    // An uppercase id is not the store's spelling either.
    refused(&root, &["show", &r, &id.to_uppercase()], 2);

    // Unknown phase and kind; malformed times and headers.
    assert!(refused(&root, &["ls", &r, "--phase", "done"], 2).contains("unknown phase"));
    refused(&root, &["ls", &r, "--kind", "sideways"], 2);
    // A header the store refuses (no name) is the caller's input too.
    refused(
        &root,
        &["create", &r, "--download", "https://x/", "--header", ": v"],
        2,
    );
    for (flag, value) in [
        ("--deadline", "tomorrow"),
        ("--header", "no colon"),
        ("--meta", "novalue"),
    ] {
        refused(
            &root,
            &["create", &r, "--download", "https://x/", flag, value],
            2,
        );
    }
    refused(
        &root,
        &[
            "reconcile",
            &r,
            "--tasks",
            t,
            "--session",
            "bg",
            "--now",
            "later",
        ],
        2,
    );
    // Missing or conflicting arguments (clap).
    refused(&root, &["create", &r], 2);
    refused(&root, &["create", &r, "--upload", "https://x/"], 2);
    refused(&root, &["reconcile", &r, "--tasks", t], 2);
    refused(&root, &["frobnicate", &r], 2);

    // Malformed task JSON, and a task of a session that was not supplied.
    for (doc, says) in [
        ("{not json", "not JSON"),
        (r#"{"session": "bg"}"#, "array"),
        (
            r#"[{"session": "bg", "task_id": -1, "url": "u"}]"#,
            "task_id",
        ),
        (r#"[{"session": "bg", "task_id": 1}]"#, "url"),
        (
            r#"[{"session": "bg", "task_id": 1, "url": "u", "state": "exploded"}]"#,
            "state",
        ),
        (
            r#"[{"session": "bg", "task_id": 1, "url": "u", "colour": "red"}]"#,
            "colour",
        ),
        (
            r#"[{"session": "other", "task_id": 1, "url": "u"}]"#,
            "not supplied",
        ),
        (
            r#"[{"session": "bg", "task_id": 1, "url": "u"}, {"session": "bg", "task_id": 1, "url": "u"}]"#,
            "twice",
        ),
    ] {
        std::fs::write(&tasks, doc).unwrap();
        for cmd in ["reconcile", "reset"] {
            let msg = refused(
                &root,
                &[cmd, &r, "--tasks", t, "--session", "bg", "--apply"],
                2,
            );
            assert!(msg.contains(says), "{doc}: {msg}");
        }
    }
    std::fs::write(&tasks, "[]").unwrap();

    // A file that does not exist.
    for args in [
        vec!["create", &r, "--upload", "https://x/", "--file", nf],
        vec!["received", &r, &id, "--append", nf],
        vec!["resume-data", &r, &id, "--file", nf],
        vec!["finish", &r, &id, "--file", nf],
        vec!["reconcile", &r, "--tasks", nf, "--session", "bg"],
        vec!["reset", &r, "--tasks", nf, "--all-sessions"],
    ] {
        let msg = refused(&root, &args, 2);
        assert!(msg.contains("no-such-file"), "{msg}");
    }

    // Refused operations (exit 1): an unknown transfer, another session, an ended transfer.
    let unknown = "00000000-0000-4000-8000-000000000000";
    refused(&root, &["show", &r, unknown], 1);
    refused(&root, &["complete", &r, unknown], 1);
    refused(
        &root,
        &["bind", &r, &id, "--task", "1", "--session", "elsewhere"],
        1,
    );
    refused(&root, &["ack", &r, &id], 1);
    refused(&root, &["cancel", &r, "--group", "no-such-group"], 1);
    refused(&root, &["progress", &r, unknown, "--done", "1"], 1);
}

#[test]
fn a_missing_store_is_never_created_by_any_command() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("absent");
    let r = root.to_str().unwrap();
    let id = "00000000-0000-4000-8000-000000000000";
    let tasks = dir.path().join("tasks.json");
    std::fs::write(&tasks, "[]").unwrap();
    let t = tasks.to_str().unwrap();
    for args in [
        vec!["ls", r],
        vec!["show", r, id],
        vec!["stats", r],
        vec!["fsck", r],
        vec!["fsck", r, "--repair"],
        vec!["gc", r],
        vec!["reconcile", r, "--tasks", t, "--all-sessions"],
        vec!["reset", r, "--tasks", t, "--all-sessions", "--apply"],
        vec!["create", r, "--download", "https://x/"],
        vec!["bind", r, id, "--task", "1"],
        vec!["complete", r, id],
        vec!["cancel", r, id],
        vec!["ack", r, id],
    ] {
        let run = wb(&args);
        assert_eq!(run.code, 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains("no store"), "{args:?}: {}", run.stderr);
        assert!(!root.exists(), "{args:?} created the store");
    }
}

#[test]
fn a_store_of_a_newer_format_is_refused_by_every_command() {
    let (dir, root, r) = store();
    let id = ok(&["create", &r, "--download", "https://cdn.example/a"]);
    let mut b = std::fs::read(root.join("FORMAT")).unwrap();
    b[8..10].copy_from_slice(&(waybill::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc32fast::hash(&b[..12]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(root.join("FORMAT"), &b).unwrap();
    let tasks = dir.path().join("tasks.json");
    std::fs::write(&tasks, "[]").unwrap();
    let t = tasks.to_str().unwrap();
    for args in [
        vec!["init", &r],
        vec!["ls", &r],
        vec!["show", &r, &id],
        vec!["stats", &r],
        vec!["fsck", &r, "--repair"],
        vec!["gc", &r],
        vec!["create", &r, "--download", "https://x/"],
        vec!["bind", &r, &id, "--task", "1"],
        vec!["progress", &r, &id, "--done", "1"],
        vec!["complete", &r, &id],
        vec!["fail", &r, &id, "--error", "x"],
        vec!["cancel", &r, &id],
        vec!["reconcile", &r, "--tasks", t, "--all-sessions", "--apply"],
        vec!["reset", &r, "--tasks", t, "--all-sessions", "--apply"],
    ] {
        let msg = refused(&root, &args, 1);
        assert!(
            msg.contains(&format!("version {}", waybill::FORMAT_VERSION + 1)),
            "{args:?}: {msg}"
        );
    }
}

/// Ages a directory past the staging grace (60 s) so it counts as debris.
fn age(path: &Path) {
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::open(path)
        .unwrap()
        .set_modified(old)
        .unwrap();
}

#[test]
fn fsck_finds_every_kind_of_problem_and_repair_fixes_them_without_deleting_records() {
    let (_dir, root, r) = store();
    let good = ok(&["create", &r, "--download", "https://cdn.example/good"]);
    let broken = ok(&["create", &r, "--download", "https://cdn.example/broken"]);
    let torn = ok(&["create", &r, "--download", "https://cdn.example/torn"]);
    let upload = ok(&["create", &r, "--upload", "https://up.example/u", "--stdin"]);
    let tr = root.join("transfers");
    // A damaged manifest, a state with both slots damaged, an orphan file, a stray entry.
    let m = tr.join(&broken).join("manifest");
    let mut bytes = std::fs::read(&m).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&m, &bytes).unwrap();
    let s = tr.join(&torn).join("state");
    let len = std::fs::metadata(&s).unwrap().len();
    std::fs::write(&s, vec![0x5a; len as usize]).unwrap();
    std::fs::write(tr.join(&upload).join("partial"), b"orphan").unwrap();
    std::fs::write(tr.join("notes.txt"), b"stray").unwrap();
    // Debris: an unfinished create and an interrupted removal, both old.
    let staged = root
        .join("staging")
        .join("11111111-1111-4111-8111-111111111111");
    std::fs::create_dir(&staged).unwrap();
    std::fs::write(staged.join("manifest"), b"half").unwrap();
    age(&staged);
    let trashed = root
        .join("trash")
        .join("22222222-2222-4222-8222-222222222222");
    std::fs::create_dir(&trashed).unwrap();

    let before = snapshot(&root);
    let run = wb(&["--json", "fsck", &r]);
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    assert_eq!(
        snapshot(&root),
        before,
        "fsck without --repair changes nothing"
    );
    assert!(
        staged.exists() && trashed.exists(),
        "fsck without --repair clears nothing"
    );
    let f = run.json();
    let unreadable = f["unreadable"].as_array().unwrap();
    let part_of = |id: &str| {
        unreadable.iter().find(|u| u["id"] == id).map(|u| {
            (
                u["part"].as_str().unwrap().to_owned(),
                u["file"].as_str().unwrap().to_owned(),
            )
        })
    };
    assert_eq!(
        part_of(&broken),
        Some(("manifest".into(), format!("transfers/{broken}/manifest")))
    );
    assert_eq!(
        part_of(&torn),
        Some(("state".into(), format!("transfers/{torn}/state")))
    );
    assert!(part_of(&good).is_none());
    assert!(
        unreadable
            .iter()
            .all(|u| !u["error"].as_str().unwrap().is_empty())
    );
    assert_eq!(
        f["staging_debris"],
        serde_json::json!(["staging/11111111-1111-4111-8111-111111111111"])
    );
    assert_eq!(
        f["trash_debris"],
        serde_json::json!(["trash/22222222-2222-4222-8222-222222222222"])
    );
    assert_eq!(f["strays"], serde_json::json!(["transfers/notes.txt"]));
    assert_eq!(
        f["orphans"],
        serde_json::json!([format!("transfers/{upload}/partial")])
    );
    assert_eq!(f["problems"], 6);
    // Text output lists the same findings.
    let text = wb(&["fsck", &r]);
    assert_eq!(text.code, 3);
    assert!(
        text.stdout.contains("6 problems") && text.stdout.contains(&broken),
        "{}",
        text.stdout
    );

    let fixed = wb(&["--json", "fsck", &r, "--repair"]);
    assert_eq!(fixed.code, 0, "{}{}", fixed.stdout, fixed.stderr);
    let rep = fixed.json()["repaired"].clone();
    assert_eq!(rep["quarantined"], serde_json::json!([broken]));
    assert_eq!(rep["state_rewritten"], serde_json::json!([torn]));
    assert_eq!(
        rep["cleared"],
        serde_json::json!([
            "staging/11111111-1111-4111-8111-111111111111",
            "trash/22222222-2222-4222-8222-222222222222"
        ])
    );
    assert_eq!(rep["moved"].as_array().unwrap().len(), 2, "{rep}");
    assert_eq!(rep["left"], serde_json::json!([]));
    assert!(!staged.exists() && !trashed.exists());
    // Records with a valid manifest are all still there; the broken one is moved aside.
    for id in [&good, &torn, &upload] {
        assert!(tr.join(id).join("manifest").exists(), "{id} lost");
    }
    assert!(
        root.join("quarantine")
            .join(&broken)
            .join("manifest")
            .exists()
    );
    // Clean now, except the quarantined record, which is listed but is not a problem.
    let again = wb(&["--json", "fsck", &r]);
    assert_eq!(again.code, 0, "{}", again.stdout);
    let q = again.json()["quarantined"].as_array().unwrap().len();
    assert_eq!(
        q, 3,
        "the record, the stray and the orphan are kept in quarantine/"
    );
    assert_eq!(wb(&["--json", "stats", &r]).json()["quarantined"], 3);
}

#[test]
fn gc_clears_debris_no_live_process_owns_and_reports_it() {
    let (_dir, root, r) = store();
    let staged = root
        .join("staging")
        .join("33333333-3333-4333-8333-333333333333");
    std::fs::create_dir(&staged).unwrap();
    age(&staged);
    // A young one may be a create that has not locked its directory yet: left alone.
    let young = root
        .join("staging")
        .join("44444444-4444-4444-8444-444444444444");
    std::fs::create_dir(&young).unwrap();
    let trashed = root
        .join("trash")
        .join("55555555-5555-4555-8555-555555555555");
    std::fs::create_dir(&trashed).unwrap();
    std::fs::write(trashed.join("state"), b"x").unwrap();
    let before = snapshot(&root);
    // Read commands leave debris where it is.
    ok(&["ls", &r]);
    ok(&["stats", &r]);
    assert!(staged.exists() && trashed.exists());
    let gc = wb(&["--json", "gc", &r]).json();
    assert_eq!(
        gc["staging_cleared"],
        serde_json::json!(["33333333-3333-4333-8333-333333333333"])
    );
    assert_eq!(
        gc["staging_live"],
        serde_json::json!(["44444444-4444-4444-8444-444444444444"])
    );
    assert_eq!(
        gc["trash_cleared"],
        serde_json::json!(["55555555-5555-4555-8555-555555555555"])
    );
    assert!(!staged.exists() && young.exists() && !trashed.exists());
    assert_eq!(snapshot(&root), before, "gc touched no record");
}

/// Every file and directory below the root (including `lock`, `staging/`, `trash/`, `groups/`).
fn whole(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        if meta.is_dir() {
            m.insert(rel, None);
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            m.insert(rel, Some(std::fs::read(&p).unwrap_or_default()));
        }
    }
    m
}

#[test]
fn read_commands_and_dry_runs_write_nothing_anywhere() {
    let (dir, root, r) = store();
    let id = bg_download(&r, "https://cdn.example/a");
    // Debris, a missing lock file and a missing directory: none may be cleared or recreated.
    let staged = root
        .join("staging")
        .join("66666666-6666-4666-8666-666666666666");
    std::fs::create_dir(&staged).unwrap();
    age(&staged);
    std::fs::create_dir(
        root.join("trash")
            .join("77777777-7777-4777-8777-777777777777"),
    )
    .unwrap();
    std::fs::remove_file(root.join("lock")).unwrap();
    std::fs::remove_dir(root.join("groups")).unwrap();
    let tasks = dir.path().join("tasks.json");
    std::fs::write(
        &tasks,
        r#"[{"session": "bg", "task_id": 4, "url": "https://cdn.example/a"}]"#,
    )
    .unwrap();
    let t = tasks.to_str().unwrap();
    let before = whole(&root);
    for (args, code) in [
        (vec!["ls", &r], 0),
        (vec!["--json", "show", &r, &id], 0),
        (vec!["stats", &r], 0),
        (vec!["fsck", &r], 3),
        (vec!["reconcile", &r, "--tasks", t, "--session", "bg"], 0),
        (vec!["reset", &r, "--tasks", t, "--all-sessions"], 0),
    ] {
        let run = wb(&args);
        assert_eq!(run.code, code, "{args:?}: {}{}", run.stdout, run.stderr);
        assert_eq!(whole(&root), before, "{args:?} wrote to the store");
    }
}

#[test]
fn a_missing_payload_fails_an_active_upload_once_and_is_no_problem_after_it_ended() {
    let (_dir, root, r) = store();
    let active = ok(&["create", &r, "--upload", "https://up.example/a", "--stdin"]);
    let done = ok(&["create", &r, "--upload", "https://up.example/b", "--stdin"]);
    ok(&["complete", &r, &done]);
    for id in [&active, &done] {
        std::fs::remove_file(root.join("transfers").join(id).join("payload")).unwrap();
    }
    let f = wb(&["--json", "fsck", &r]);
    assert_eq!(f.code, 3);
    let found = f.json()["unreadable"].clone();
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["id"].as_str(), Some(active.as_str()));
    assert_eq!(found[0]["part"], "payload");
    let fixed = wb(&["--json", "fsck", &r, "--repair"]);
    assert_eq!(fixed.code, 0, "{}", fixed.stdout);
    assert_eq!(
        fixed.json()["repaired"]["failed"],
        serde_json::json!([active])
    );
    let shown = wb(&["--json", "show", &r, &active]).json();
    assert_eq!(shown["outcome"]["result"], "failed");
    // Ended now: delivered as failed, and no longer a problem.
    assert_eq!(wb(&["fsck", &r]).code, 0);
    let again = wb(&["--json", "fsck", &r, "--repair"]);
    assert_eq!(again.code, 0);
    assert_eq!(again.json()["repaired"]["failed"], serde_json::json!([]));
}

/// `batch` commits many changes at once, prints one result per change, and exits 1 when any
/// failed; a malformed line is a usage error that changes nothing.
#[test]
fn batch_commits_many_changes_and_reports_each() {
    let (_d, root, r) = store();
    let a = bg_download(&r, "https://example.com/a");
    let b = bg_download(&r, "https://example.com/b");
    let c = bg_download(&r, "https://example.com/c");
    let changes = format!(
        "# a burst of callbacks\nbind {a} 7 tag-a\nbind {b} 8\nprogress {a} 100 1000\n\
         complete {a} 200\ncomplete {a} 200\nfail {b} permanent server said no\ncancel {c}\n"
    );
    let run = wb_in(&["--json", "batch", &r], Some(changes.as_bytes()));
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let doc = run.json();
    let results: Vec<J> = doc["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["result"].clone())
        .collect();
    assert_eq!(doc["failed"], 0);
    assert_eq!(results.len(), 7);
    assert_eq!(results[3], "won");
    assert!(results[4]["lost"].is_object(), "{results:?}");
    assert_eq!(results[5], "gave-up");
    assert_eq!(results[6], "cancelled");
    let show = |id: &str| -> J { serde_json::from_str(&ok(&["--json", "show", &r, id])).unwrap() };
    assert_eq!(show(&a)["phase"], "completed");
    assert_eq!(show(&b)["phase"], "failed");
    assert_eq!(show(&c)["phase"], "cancelled");
    // A change that fails is reported, the others commit, and the exit code says so.
    let file = root.parent().unwrap().join("changes.txt");
    std::fs::write(&file, format!("ack {a}\nbind {c} 9\n")).unwrap();
    let run = wb(&["batch", &r, "--changes", file.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!("ack {a}: ok")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("error:"), "{}", run.stdout);
    assert!(
        run.stderr.contains("1 of 2 changes failed"),
        "{}",
        run.stderr
    );
    // Malformed lines: usage errors, nothing changed.
    for bad in [
        format!("bind {b}"),
        format!("explode {b}"),
        "cancel not-an-id".to_owned(),
        format!("fail {b} sometimes oops"),
    ] {
        let before = snapshot(&root);
        let run = wb_in(&["batch", &r], Some(bad.as_bytes()));
        assert_eq!(run.code, 2, "{bad}: {}", run.stderr);
        assert!(run.stderr.contains("line 1"), "{bad}: {}", run.stderr);
        assert_eq!(snapshot(&root), before, "{bad} changed the store");
    }
}
