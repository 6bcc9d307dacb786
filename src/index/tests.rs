//! Unit tests of the index: it follows every change, plans as the directories do, and is
//! rebuilt rather than misread.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

use std::time::Duration;

use super::journal::{Journal, Thresholds, boot_of};
use super::*;
use crate::format::index::Boot;
use crate::layout::{JOURNAL_FILE, TRANSFERS};
use crate::{
    Durability, ErrorClass, Filter, NewTransfer, Store, TaskBinding, Transfer, UploadSource,
};

/// Small journal thresholds, so a few changes reach a checkpoint and a cut-back.
const SMALL: Thresholds = Thresholds {
    checkpoint: 2 * 1024,
    compact: 4 * 1024,
};

fn small() -> crate::StoreBuilder {
    Store::builder().journal_thresholds(SMALL.checkpoint, SMALL.compact)
}

proptest::proptest! {
    /// Applying the journal's changes in place (replacements) and by one merge (added and
    /// removed transfers) gives what removing every changed id, adding the new records and
    /// sorting gives, and the records stay sorted.
    #[test]
    fn changes_applied_in_place_equal_a_rebuilt_sorted_list(
        have in proptest::collection::btree_set(0u8..64, 0..40),
        changes in proptest::collection::hash_map(0u8..64, proptest::option::of(0u8..4), 0..30),
    ) {
        let rec = |k: u8, v: u8| {
            let mut id = [0u8; 16];
            id[0] = k;
            IndexRecord::new(id, v % 2 == 1, &[v; 3], &[k; 5])
        };
        let mut records: Vec<IndexRecord> = have.iter().map(|&k| rec(k, 9)).collect();
        let changed: Vec<([u8; 16], Option<IndexRecord>)> = changes
            .iter()
            .map(|(&k, v)| (rec(k, 0).id, v.map(|v| rec(k, v))))
            .collect();
        let mut expected = records.clone();
        expected.retain(|r| !changes.contains_key(&r.id[0]));
        expected.extend(changed.iter().filter_map(|(_, r)| r.clone()));
        expected.sort_unstable_by_key(|r| r.id);
        apply_changes(&mut records, changed);
        proptest::prop_assert_eq!(records, expected);
    }
}

/// What the directories hold (the source of truth), beside what the holder lists.
fn assert_follows(holder: &Store, what: &str) {
    let listed = holder.list(&Filter::all()).unwrap();
    let truth: Vec<Transfer> = holder.scan().unwrap().transfers;
    assert_eq!(listed, truth, "{what}");
    for (t, resume) in holder.gather(true).unwrap().transfers {
        let on_disk = holder.has_resume_data(t.id()).unwrap();
        assert_eq!(resume, on_disk, "{what}: resume flag of {}", t.id());
    }
    assert_plans_match(holder, &truth, what);
}

/// The holder plans from the index's facts exactly what the planner plans from the
/// directories' whole records, for tasks matched by tag, by URL, finished and unknown.
fn assert_plans_match(holder: &Store, truth: &[Transfer], what: &str) {
    use crate::reconcile::{self, ReconcileOptions, Sessions, Task};
    let now = crate::transfer::from_ms(1_900_000_000_000);
    let mut tasks: Vec<Task> = truth
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let task = Task::running(crate::DEFAULT_SESSION, 1000 + k as u64, &t.request().url);
            match k % 4 {
                0 => task.tag(t.id().to_string()),
                1 => task,
                2 => task.tag(t.id().to_string()).completed(200),
                _ => task.failed("reset"),
            }
        })
        .collect();
    tasks.push(Task::running(
        crate::DEFAULT_SESSION,
        1,
        "https://x/unknown",
    ));
    let (records, corrupt) = whole_records(holder);
    let opts = ReconcileOptions::default();
    for tasks in [&tasks[..0], &tasks[..]] {
        let want = reconcile::plan(&Sessions::All, tasks, &records, &corrupt, now, &opts);
        let got = holder.reconcile_with(&Sessions::All, tasks, now, &opts);
        assert_eq!(got.unwrap(), want.unwrap(), "{what}: plan");
        let want = reconcile::plan_reset(&Sessions::All, tasks, &records, &corrupt);
        let got = holder.reset_plan(&Sessions::All, tasks);
        assert_eq!(got.unwrap(), want.unwrap(), "{what}: reset plan");
    }
}

/// Every fact the planner reads from the index (key, deadline, retry policy, replaced
/// request, binding and its tag, failures and the next attempt, partial bytes, resume data,
/// outcome, phase), and a corrupt manifest: the plan from the facts is the plan from the
/// whole records, for tasks that match by tag, by key, by binding and by URL.
#[test]
fn the_plan_read_from_the_index_facts_is_the_plan_from_whole_records() {
    use crate::{ErrorClass, Request, RetryPolicy};
    use std::time::Duration;
    let d = tempfile::tempdir().unwrap();
    let s = small().open(d.path()).unwrap();
    let now = crate::transfer::from_ms(1_900_000_000_000);
    let mk = |t: NewTransfer| s.create(t).unwrap();
    let dl = |i: usize| NewTransfer::download(format!("https://x/f{i}"));
    mk(dl(0).idempotency_key("order-7"));
    let late = mk(dl(1).deadline(now - Duration::from_secs(5)));
    let soon = mk(dl(2)
        .deadline(now + Duration::from_secs(5))
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(1500),
            max_backoff: Duration::from_secs(7),
        }));
    let moved = mk(
        NewTransfer::upload("https://x/u", UploadSource::Bytes(vec![1; 9]))
            .method("POST")
            .header("x-a", "1")
            .secret_header("authorization", "t"),
    );
    let mut r = Request::new("PUT", "https://x/moved");
    r.headers.push(crate::Header {
        name: "x-b".into(),
        value: "2".into(),
        secret: false,
    });
    s.replace_request(moved, r).unwrap();
    let bound = mk(dl(3).session("bg"));
    s.bind(
        bound,
        TaskBinding {
            session: "bg".into(),
            task_id: 77,
            tag: Some("mine".into()),
        },
    )
    .unwrap();
    let bound_by_id = mk(dl(4));
    s.bind(
        bound_by_id,
        TaskBinding {
            session: crate::DEFAULT_SESSION.into(),
            task_id: 78,
            tag: Some(bound_by_id.to_string()),
        },
    )
    .unwrap();
    let waiting = mk(dl(5));
    s.bind(
        waiting,
        TaskBinding {
            session: crate::DEFAULT_SESSION.into(),
            task_id: 79,
            tag: None,
        },
    )
    .unwrap();
    s.fail(waiting, ErrorClass::Transient, "reset").unwrap();
    let partial = mk(dl(6));
    s.append_received(partial, b"0123456789").unwrap();
    let resumable = mk(dl(7));
    s.store_resume_data(resumable, b"resume").unwrap();
    let done = mk(dl(8));
    s.complete(done, Some(201)).unwrap();
    let failed = mk(dl(9));
    s.fail(failed, ErrorClass::Permanent, "gone").unwrap();
    let cancelled = mk(dl(10));
    s.cancel(cancelled).unwrap();
    let broken = mk(dl(11));
    drop(s);
    std::fs::write(
        d.path()
            .join("transfers")
            .join(broken.to_string())
            .join("manifest"),
        b"junk",
    )
    .unwrap();
    // Damage behind the journal's back: the index learns of it when rebuilt.
    std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
    let s = small().open(d.path()).unwrap();
    let truth = s.scan().unwrap().transfers;
    assert_plans_match(&s, &truth, "states");
    // Tasks that find their records each way there is.
    use crate::reconcile::{self, ReconcileOptions, Sessions, Task};
    let t = |id: u64, url: &str| Task::running(crate::DEFAULT_SESSION, id, url);
    let tasks = vec![
        t(1, "https://x/f0").tag("order-7"),
        Task::running("bg", 77, "https://x/f3").tag("mine"),
        t(78, "https://x/f4").tag(bound_by_id.to_string()),
        t(79, "https://x/f5").failed("again"),
        t(80, "https://x/f6"),
        t(81, "https://x/f1").tag(late.to_string()),
        t(82, "https://x/f2").tag(soon.to_string()).failed("x"),
        t(83, "https://x/moved")
            .tag(moved.to_string())
            .completed(500),
        t(84, "https://x/f8").tag(done.to_string()).completed(201),
        t(85, "https://x/f11").tag(broken.to_string()),
        t(86, "https://x/nothing"),
    ];
    let (records, corrupt) = whole_records(&s);
    assert_eq!(corrupt, vec![broken]);
    let opts = ReconcileOptions::default();
    for sessions in [Sessions::All, Sessions::only(["bg"])] {
        let tasks: Vec<Task> = tasks
            .iter()
            .filter(|t| sessions.contains(&t.session))
            .cloned()
            .collect();
        let want = reconcile::plan(&sessions, &tasks, &records, &corrupt, now, &opts).unwrap();
        let got = s.reconcile_with(&sessions, &tasks, now, &opts).unwrap();
        assert_eq!(got, want);
        assert!(s.index.lock().unwrap().is_some(), "planned from the index");
    }
    let _ = (waiting, partial, resumable, failed, cancelled);
}

/// An index written by an earlier release (index version 1: no facts, no checksum; version
/// 2: no facts table), following this boot's journal, is rebuilt rather than read: the
/// fixture store lists and plans exactly as its directories say, and the index is then of
/// the current version.
#[test]
fn an_index_of_an_earlier_version_is_rebuilt_not_misread() {
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_tree(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    assert_eq!(fmt::INDEX_VERSION, 3);
    for old in [1u32, 2] {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2");
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("store");
        copy_tree(&fixtures.join("store"), &root);
        // A journal of this boot, then the old index made to follow it.
        drop(small().index(false).open(&root).unwrap());
        let generation = Journal::open(
            Arc::new(crate::fs::Real),
            &root,
            false,
            Duration::from_secs(1),
            SMALL,
        )
        .unwrap()
        .unwrap()
        .generation()
        .unwrap();
        std::fs::copy(
            fixtures.join(format!("index-v{old}.redb")),
            root.join(INDEX_FILE),
        )
        .unwrap();
        {
            let db = redb::Database::open(root.join(INDEX_FILE)).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(META).unwrap();
                let was = t.get(META_KEY).unwrap().unwrap().value().to_vec();
                assert_eq!(
                    was[..4],
                    old.to_le_bytes(),
                    "the fixture is index version {old}"
                );
                let mut m: IndexMeta = crate::format::decode_exact(&was[4..]).unwrap();
                m.generation = generation;
                m.consumed = JOURNAL_HEADER_LEN as u64;
                let mut new = old.to_le_bytes().to_vec();
                new.extend(postcard::to_allocvec(&m).unwrap());
                t.insert(META_KEY, new.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        let holder = small().open(&root).unwrap();
        assert_eq!(holder.list(&Filter::all()).unwrap().len(), 4);
        assert_follows(&holder, &format!("an index of version {old}"));
        drop(holder);
        let db = redb::Database::open(root.join(INDEX_FILE)).unwrap();
        let tx = db.begin_read().unwrap();
        let meta = tx
            .open_table(META)
            .unwrap()
            .get(META_KEY)
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        assert_eq!(meta[..4], fmt::INDEX_VERSION.to_le_bytes());
    }
}

/// The parts the records planning reads hold: `(facts only, facts and state, whole)`.
fn holds(s: &Store) -> (usize, usize, usize) {
    let (records, wholes) = s.index_facts().unwrap();
    let n = |h: Holds| records.iter().filter(|r| r.holds() == h).count();
    let counts = (n(Holds::Facts), n(Holds::State), n(Holds::Whole));
    assert_eq!(wholes.is_some(), counts.0 + counts.1 > 0);
    counts
}

/// Planning reads the facts table; the request of a `recreate`/`resume` and the outcome of
/// a `deliver` are read from the whole records' table, or (when a change since the index
/// was written is in the journal) from the state the journal holds. The plans equal the
/// plans from whole records throughout; a whole-records table that lacks records is read
/// around (their directories) and the index then deleted, to be rebuilt.
#[test]
fn planning_reads_the_facts_table_and_the_rest_on_demand() {
    let d = tempfile::tempdir().unwrap();
    let s = small().open(d.path()).unwrap();
    let ids = ids(40, &s);
    for (k, &id) in ids.iter().enumerate() {
        match k % 5 {
            0 => drop(s.complete(id, Some(200)).unwrap()),
            1 => drop(s.fail(id, ErrorClass::Transient, "reset").unwrap()),
            2 => s
                .replace_request(id, crate::Request::new("PUT", format!("https://y/{k}")))
                .unwrap(),
            _ => {}
        }
    }
    drop(s);
    // Written into the index whole (a rebuild), then read back as facts.
    std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
    let s = small().open(d.path()).unwrap();
    assert_eq!(holds(&s), (40, 0, 0));
    let truth = s.scan().unwrap().transfers;
    assert_plans_match(&s, &truth, "facts table");

    // Changes since (fewer than a checkpoint's worth): a state the journal holds, or a
    // new transfer whole.
    drop(s.complete(ids[3], Some(201)).unwrap());
    drop(s.fail(ids[4], ErrorClass::Permanent, "gone").unwrap());
    s.replace_request(ids[8], crate::Request::new("PUT", "https://z/8"))
        .unwrap();
    drop(s.cancel(ids[9]).unwrap());
    s.create(NewTransfer::download("https://x/new")).unwrap();
    let (facts, state, whole) = holds(&s);
    assert_eq!((facts, state, whole), (36, 4, 1));
    let truth = s.scan().unwrap().transfers;
    assert_plans_match(&s, &truth, "facts table and journal");

    // The whole records' table loses its chunks; the facts table keeps them.
    drop(s);
    {
        let db = redb::Database::open(d.path().join(INDEX_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(CHUNKS).unwrap().retain(|_, _| false).unwrap();
        tx.commit().unwrap();
    }
    let s = small().open(d.path()).unwrap();
    let (records, corrupt) = whole_records(&s);
    let now = crate::transfer::from_ms(1_900_000_000_000);
    let opts = crate::ReconcileOptions::default();
    let want = crate::reconcile::plan(&crate::Sessions::All, &[], &records, &corrupt, now, &opts);
    let got = s.reconcile_with(&crate::Sessions::All, &[], now, &opts);
    assert_eq!(got.unwrap(), want.unwrap());
    assert!(
        !d.path().join(INDEX_FILE).exists(),
        "a lacking index is deleted"
    );
    assert_follows(&s, "rebuilt after lacking whole records");
    assert_eq!(holds(&s), (s.scan().unwrap().transfers.len(), 0, 0));
}

/// The records as the directories hold them, whole, and the corrupt ids.
fn whole_records(s: &Store) -> (Vec<crate::Record>, Vec<crate::TransferId>) {
    let scanned = s.gather_scanned(true).unwrap();
    let corrupt = scanned.corrupt.iter().map(|(id, _)| *id).collect();
    let records = scanned
        .transfers
        .into_iter()
        .map(|(transfer, has_resume_data)| crate::Record {
            transfer,
            has_resume_data,
        })
        .collect();
    (records, corrupt)
}

fn ids(n: usize, s: &Store) -> Vec<crate::TransferId> {
    (0..n)
        .map(|i| {
            let t = if i % 3 == 0 {
                NewTransfer::upload(format!("https://x/u{i}"), UploadSource::Bytes(vec![7; 10]))
            } else {
                NewTransfer::download(format!("https://x/d{i}"))
            };
            s.create(t).unwrap()
        })
        .collect()
}

#[test]
fn the_index_follows_changes_from_a_handle_that_does_not_hold_it() {
    let d = tempfile::tempdir().unwrap();
    let holder = small().open(d.path()).unwrap();
    let other = small().index(false).open(d.path()).unwrap();
    assert!(
        holder.index.lock().unwrap().is_some(),
        "the first handle holds the index"
    );
    let mut all = ids(6, &holder);
    all.extend(ids(6, &other));
    all.extend(
        other
            .create_batch(
                (0..20)
                    .map(|i| NewTransfer::download(format!("https://x/b{i}")))
                    .collect(),
            )
            .unwrap(),
    );
    assert_follows(&holder, "creates");
    let src = d.path().join("done.bin");
    for (i, id) in all.iter().copied().enumerate() {
        // Every other change comes from the handle that does not hold the index.
        let s = if i % 2 == 0 { &other } else { &holder };
        let download = s.get(id).unwrap().manifest.kind == crate::Kind::Download;
        let b = TaskBinding {
            session: crate::DEFAULT_SESSION.into(),
            task_id: i as u64 + 1,
            tag: Some(id.to_string()),
        };
        let step = match i % 7 {
            0 => s.bind(id, b).map(|_| ()),
            1 => s.progress(id, 5, Some(10), Durability::Immediate),
            2 => s.complete(id, Some(200)).map(|_| ()),
            3 => s.fail(id, ErrorClass::Transient, "timeout").map(|_| ()),
            4 => s.cancel(id).map(|_| ()),
            5 => s.remove(id),
            _ if download => s.store_resume_data(id, b"resume"),
            _ => s.complete(id, None).map(|_| ()),
        };
        step.unwrap();
        if i % 5 == 0 && download && i % 7 == 6 {
            std::fs::write(&src, b"body").unwrap();
            s.accept_download(id, &src).unwrap();
        }
        if i % 4 == 0 {
            // Acknowledged outcomes purge the record.
            let _ = s.acknowledge(id);
        }
        assert_follows(&holder, &format!("step {i}"));
        if i % 9 == 0 {
            assert!(holder.release_index());
        }
    }
    drop(holder);
    drop(other);
    let again = small().open(d.path()).unwrap();
    assert_follows(&again, "reopened");
    // A damaged manifest, found by a rebuild: quarantined alike from the index and the
    // directories.
    drop(again);
    let victim = all.iter().rev().find_map(|id| {
        let m = d
            .path()
            .join("transfers")
            .join(id.to_string())
            .join("manifest");
        m.exists().then_some(m)
    });
    let mut bytes = std::fs::read(victim.as_ref().unwrap()).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(victim.unwrap(), bytes).unwrap();
    std::fs::remove_file(d.path().join(INDEX_FILE)).unwrap();
    let again = small().open(d.path()).unwrap();
    assert_eq!(again.gather(true).unwrap().corrupt.len(), 1);
    assert_follows(&again, "a damaged manifest");
}

/// The journal's frames: (offset, length).
fn frames(root: &Path) -> Vec<(usize, usize)> {
    let b = std::fs::read(root.join(JOURNAL_FILE)).unwrap();
    let mut at = JOURNAL_HEADER_LEN;
    let mut out = Vec::new();
    while let Some((_, n)) = b.get(at..).and_then(fmt::decode_frame) {
        out.push((at, n));
        at += n;
    }
    assert_eq!(at, b.len(), "the journal parses to its end");
    out
}

/// Cuts the journal at byte `at`, as if the process appending it was killed there.
fn cut_journal(root: &Path, at: usize) {
    let j = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(JOURNAL_FILE))
        .unwrap();
    j.set_len(at as u64).unwrap();
}

#[test]
fn a_change_killed_before_its_entry_is_read_from_the_directory() {
    let d = tempfile::tempdir().unwrap();
    let holder = small().open(d.path()).unwrap();
    let id = ids(1, &holder)[0];
    holder.list(&Filter::all()).unwrap();
    let other = small().index(false).open(d.path()).unwrap();
    let before = frames(d.path()).len();
    let b = TaskBinding {
        session: crate::DEFAULT_SESSION.into(),
        task_id: 9,
        tag: None,
    };
    other.bind(id, b.clone()).unwrap();
    let f = frames(d.path());
    assert_eq!(f.len(), before + 2, "an intent and an entry");
    // The process died after writing the state and before journaling the entry.
    let (last_at, _) = f[f.len() - 1];
    cut_journal(d.path(), last_at);
    let t = holder.list(&Filter::all()).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state.binding, Some(b));
    assert_follows(&holder, "after the lost entry");
}

#[test]
fn a_batch_killed_before_its_entries_is_read_from_the_directories() {
    let d = tempfile::tempdir().unwrap();
    let holder = small().open(d.path()).unwrap();
    ids(1, &holder);
    holder.list(&Filter::all()).unwrap();
    let other = small().index(false).open(d.path()).unwrap();
    let before = frames(d.path()).len();
    let batch = other
        .create_batch(
            (0..20)
                .map(|i| NewTransfer::download(format!("https://x/b{i}")))
                .collect(),
        )
        .unwrap();
    let f = frames(d.path());
    assert_eq!(f.len(), before + 40, "an intent and an entry per member");
    // The process died after the members were renamed into place, before their entries
    // were journaled: each member's intent alone must send the holder to its directory.
    let (first_entry_at, _) = f[before + 20];
    cut_journal(d.path(), first_entry_at);
    let listed: BTreeSet<TransferId> = holder
        .list(&Filter::all())
        .unwrap()
        .iter()
        .map(Transfer::id)
        .collect();
    assert!(
        batch.iter().all(|id| listed.contains(id)),
        "every member listed"
    );
    assert_follows(&holder, "after the lost entries");
}

#[test]
fn a_deleted_or_damaged_index_is_rebuilt_from_the_directories() {
    let d = tempfile::tempdir().unwrap();
    let s = small().open(d.path()).unwrap();
    ids(5, &s);
    let want = s.list(&Filter::all()).unwrap();
    drop(s);
    let index = d.path().join(INDEX_FILE);
    for damage in ["garbage", "truncated", "deleted"] {
        match damage {
            "garbage" => std::fs::write(&index, vec![0x5a; 64 * 1024]).unwrap(),
            "truncated" => {
                let b = std::fs::read(&index).unwrap();
                std::fs::write(&index, &b[..b.len() / 3]).unwrap();
            }
            _ => std::fs::remove_file(&index).unwrap(),
        }
        let s = small().open(d.path()).unwrap();
        assert_eq!(s.list(&Filter::all()).unwrap(), want, "{damage}");
        drop(s);
    }
}

/// Rewrites the journal's header as another boot wrote it, keeping its frames.
fn from_another_boot(root: &Path) {
    let p = root.join(JOURNAL_FILE);
    let mut b = std::fs::read(&p).unwrap();
    let mut h = fmt::decode_journal_header(&b).unwrap();
    h.boot = Boot::Id([0xee; 16]);
    b[..JOURNAL_HEADER_LEN].copy_from_slice(&fmt::encode_journal_header(&h));
    std::fs::write(&p, b).unwrap();
}

#[test]
fn a_journal_from_another_boot_is_never_trusted() {
    let d = tempfile::tempdir().unwrap();
    let s = small().open(d.path()).unwrap();
    let all = ids(4, &s);
    drop(s);
    // Lost in the power cut: a removal whose journal frames never reached the disk. Only
    // a rebuild from the directories can know.
    std::fs::rename(
        d.path().join(TRANSFERS).join(all[0].to_string()),
        d.path().join("trash").join(all[0].to_string()),
    )
    .unwrap();
    from_another_boot(d.path());
    let s = small().open(d.path()).unwrap();
    let listed: Vec<_> = s
        .list(&Filter::all())
        .unwrap()
        .iter()
        .map(Transfer::id)
        .collect();
    assert_eq!(listed.len(), 3);
    assert!(!listed.contains(&all[0]));
    assert_eq!(frames(d.path()).len(), 0, "the journal started afresh");
    let h = fmt::decode_journal_header(&std::fs::read(d.path().join(JOURNAL_FILE)).unwrap());
    assert!(h.is_some_and(|h| h.boot.same(&boot_of(
        crate::fs::Backend::boot(&crate::fs::Real).unwrap()
    ))));
}

#[test]
fn a_damaged_frame_restarts_the_journal_and_rebuilds_the_index() {
    let d = tempfile::tempdir().unwrap();
    let holder = small().open(d.path()).unwrap();
    let all = ids(3, &holder);
    holder.list(&Filter::all()).unwrap();
    let other = small().index(false).open(d.path()).unwrap();
    for id in &all {
        other.progress(*id, 1, None, Durability::Immediate).unwrap();
    }
    let f = frames(d.path());
    let (at, _) = f[f.len() / 2];
    let p = d.path().join(JOURNAL_FILE);
    let mut b = std::fs::read(&p).unwrap();
    b[at + 10] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    let generation = fmt::decode_journal_header(&b).unwrap().generation;
    assert_follows(&holder, "after the damaged frame");
    let now = fmt::decode_journal_header(&std::fs::read(&p).unwrap()).unwrap();
    assert_ne!(now.generation, generation, "a new journal");
    // And the index keeps following it.
    other
        .progress(all[0], 2, None, Durability::Immediate)
        .unwrap();
    assert_follows(&holder, "after the restart");
}

#[test]
fn a_consumed_journal_is_cut_back_and_the_index_still_follows() {
    let d = tempfile::tempdir().unwrap();
    let holder = small().open(d.path()).unwrap();
    let all = ids(4, &holder);
    let other = small().index(false).open(d.path()).unwrap();
    for i in 0..40u64 {
        other
            .progress(all[(i % 4) as usize], i, None, Durability::Immediate)
            .unwrap();
    }
    let p = d.path().join(JOURNAL_FILE);
    assert!(std::fs::metadata(&p).unwrap().len() > SMALL.compact);
    assert!(holder.release_index());
    assert_eq!(
        std::fs::metadata(&p).unwrap().len(),
        JOURNAL_HEADER_LEN as u64
    );
    other
        .progress(all[1], 99, None, Durability::Immediate)
        .unwrap();
    assert_follows(&holder, "after compaction");
    assert_eq!(holder.get(all[1]).unwrap().state.bytes_done, 99);
}
