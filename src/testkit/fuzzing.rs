//! Entry points of the fuzz targets in `fuzz/` (feature `fuzzing`; not part of the API).
//!
//! Each function takes a fuzzer's input and panics when it finds a violation: a panic, an
//! error of the wrong kind, a lost or changed record, or a file touched outside the store.
//! Bad input itself is never a violation: it must give a typed error or a documented recovery.
//! A unit test (`cargo test`) replays every seed under `fuzz/corpus/` and every input kept
//! under `tests/fuzz_regressions/` through the same functions.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::format::{manifest, state};
use crate::testkit::seeded_ids;
use crate::testkit::sim::{Draw, Input, Sim};
use crate::{
    Action, ErrorClass, ErrorKind, Filter, NewTransfer, RetryPolicy, Sessions, Store, Task,
    TaskBinding, TaskRef, TaskState, TransferId, UploadSource,
};

/// `decode_manifest`: arbitrary bytes into the manifest decoder, as they are and with the
/// header made valid around them (so the body decoder is reached). The planner's borrowed
/// decoder accepts and refuses exactly the same bytes, and reads the same fields. Whatever
/// decodes encodes again and decodes to the same manifest.
pub fn decode_manifest(data: &[u8]) {
    let path = Path::new("manifest");
    for bytes in [data.to_vec(), with_valid_manifest_header(data)] {
        manifest::assert_views_agree(path, &bytes);
        let Ok(m) = manifest::decode(path, &bytes) else {
            continue;
        };
        let again = match manifest::encode(&m) {
            Ok(b) => b,
            Err(e) => panic!("a decoded manifest does not encode: {e}\n{m:?}"),
        };
        match manifest::decode(path, &again) {
            Ok(back) => assert_eq!(back, m, "the manifest changed in a round trip"),
            Err(e) => panic!("a re-encoded manifest does not decode: {e}\n{m:?}"),
        }
    }
}

/// `data` as a manifest body behind a header that is right for it.
fn with_valid_manifest_header(data: &[u8]) -> Vec<u8> {
    let body = data.get(manifest::HEADER_LEN..).unwrap_or(data);
    let mut out = Vec::with_capacity(manifest::HEADER_LEN + body.len());
    out.extend_from_slice(&manifest::MAGIC);
    out.extend_from_slice(&manifest::VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `decode_state`: arbitrary bytes into the state-file decoder, as they are and with each
/// slot's checksum made right. The newest valid slot wins or both slots are reported; every
/// valid slot encodes again to a slot that decodes to the same state.
pub fn decode_state(data: &[u8]) {
    let path = Path::new("state");
    for bytes in [data.to_vec(), with_valid_slot_checksums(data)] {
        let slots = state::decode_file(&bytes);
        let newest = state::newest_or_corrupt(path, &slots);
        match (&newest, slots.newest()) {
            (Ok((i, s)), Some((j, t))) => {
                assert_eq!((i, s.seq), (&j, t.seq), "newest slot disagrees");
            }
            (Err(e), None) => assert!(e.is_corrupt(), "both slots bad, yet {e}"),
            (r, n) => panic!("newest_or_corrupt {r:?} but newest {n:?}"),
        }
        for (i, slot) in slots.slot.iter().enumerate() {
            let Ok(slot) = slot else { continue };
            let again = match state::encode_slot(slot.seq, &slot.state) {
                Ok(b) => b,
                Err(e) => panic!("a decoded state does not encode: {e}\n{slot:?}"),
            };
            match state::decode_slot(i as u8, &again) {
                Ok(back) => {
                    assert_eq!(back.seq, slot.seq, "the sequence changed in a round trip");
                    assert_eq!(back.state, slot.state, "the state changed in a round trip");
                }
                Err(e) => panic!("a re-encoded state does not decode: {e:?}\n{slot:?}"),
            }
        }
    }
}

/// `data` with each slot's CRC (and body length, when it would not fit) set to match.
fn with_valid_slot_checksums(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for start in [0, state::SLOT_CAPACITY] {
        let end = (start + state::SLOT_CAPACITY).min(out.len());
        let Some(slot) = out.get_mut(start..end) else {
            continue;
        };
        if slot.len() < state::SLOT_HEADER_LEN {
            continue;
        }
        let room = slot.len() - state::SLOT_HEADER_LEN;
        let (head, rest) = slot.split_at_mut(state::SLOT_HEADER_LEN);
        let mut len = [0u8; 4];
        len.copy_from_slice(head.get(16..20).unwrap_or(&[0; 4]));
        let len = (u32::from_le_bytes(len) as usize).min(room);
        if let Some(l) = head.get_mut(16..20) {
            l.copy_from_slice(&(len as u32).to_le_bytes());
        }
        let mut h = crc32fast::Hasher::new();
        h.update(head.get(..20).unwrap_or_default());
        h.update(rest.get(..len).unwrap_or_default());
        if let Some(c) = head.get_mut(20..24) {
            c.copy_from_slice(&h.finalize().to_le_bytes());
        }
    }
    out
}

/// Names a fuzzed tree is made of; index [`RAW_NAME`] takes a name from the input instead.
const NAMES: [&str; 18] = [
    "transfers",
    "staging",
    "trash",
    "quarantine",
    "FORMAT",
    "lock",
    "manifest",
    "state",
    "payload",
    "partial",
    "resume",
    "0e4b5b6e-4ad5-4a3b-9a77-4d4d1c0f7a11",
    "0E4B5B6E-4AD5-4A3B-9A77-4D4D1C0F7A11",
    "groups",
    "x",
    ".tmp",
    "journal",
    "index.redb",
];
const RAW_NAME: u64 = NAMES.len() as u64;
/// What `open_store` puts beside the store, to see that nothing there changes.
const OUTSIDE: &str = "outside";
const SECRET: &[u8] = b"not the store's";
/// The largest file in a fuzzed tree.
const MAX_FUZZ_FILE: usize = 40 * 1024;
const MAX_ENTRIES: usize = 64;

/// One entry of a fuzzed tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Dir(Vec<String>),
    File(Vec<String>, Vec<u8>),
    /// A symlink and what it points at: 0 a file outside the store, 1 a directory outside it,
    /// 2 a path inside the store, relative to the link.
    Symlink(Vec<String>, u8, Vec<String>),
}

fn read_name(input: &mut Input<'_>) -> Option<String> {
    match input.below(RAW_NAME + 1) {
        RAW_NAME => {
            let raw = input.bytes(80);
            let s = String::from_utf8_lossy(&raw).into_owned();
            (!s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\0'])).then_some(s)
        }
        i => NAMES.get(i as usize).map(|s| (*s).to_owned()),
    }
}

fn read_path(input: &mut Input<'_>) -> Option<Vec<String>> {
    let depth = 1 + input.below(4) as usize;
    (0..depth).map(|_| read_name(input)).collect()
}

/// Reads a tree description: entries until the input runs out.
pub(crate) fn read_tree(data: &[u8]) -> Vec<Entry> {
    let mut input = Input::new(data);
    let mut out = Vec::new();
    while !input.exhausted() && out.len() < MAX_ENTRIES {
        let kind = input.below(3);
        let path = read_path(&mut input);
        let entry = match kind {
            0 => path.map(Entry::Dir),
            1 => {
                let bytes = input.bytes(MAX_FUZZ_FILE);
                path.map(|p| Entry::File(p, bytes))
            }
            _ => {
                let to = input.below(3) as u8;
                let target = read_path(&mut input);
                path.zip(target).map(|(p, t)| Entry::Symlink(p, to, t))
            }
        };
        out.extend(entry);
    }
    out
}

fn join(base: &Path, path: &[String]) -> PathBuf {
    path.iter().fold(base.to_path_buf(), |p, n| p.join(n))
}

/// Builds `tree` under `root`; entries that cannot be made (a file where a directory is) are
/// skipped.
fn materialise(base: &Path, root: &Path, tree: &[Entry]) {
    for e in tree {
        let _ = match e {
            Entry::Dir(p) => fs::create_dir_all(join(root, p)),
            Entry::File(p, bytes) => {
                let path = join(root, p);
                path.parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| fs::write(&path, bytes))
            }
            Entry::Symlink(p, to, t) => {
                let path = join(root, p);
                let target = match to {
                    0 => base.join(OUTSIDE).join("secret"),
                    1 => base.join(OUTSIDE).join("dir"),
                    _ => join(root, t),
                };
                path.parent()
                    .map_or(Ok(()), fs::create_dir_all)
                    .and_then(|()| symlink(&target, &path))
            }
        };
    }
}

#[cfg(unix)]
fn symlink(target: &Path, path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, path)
}

#[cfg(not(unix))]
fn symlink(_: &Path, _: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Everything under `dir`: path, kind and bytes (symlinks not followed).
fn listing(dir: &Path) -> BTreeMap<PathBuf, (String, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            let what = if t.is_symlink() {
                ("link".to_owned(), Vec::new())
            } else if t.is_dir() {
                todo.push(p.clone());
                ("dir".to_owned(), Vec::new())
            } else {
                ("file".to_owned(), fs::read(&p).unwrap_or_default())
            };
            out.insert(p, what);
        }
    }
    out
}

fn temp_base() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    match dir {
        Ok(d) => d,
        Err(e) => panic!("no temporary directory: {e}"),
    }
}

/// `open_store`: a fuzzed tree (names, files, sizes, symlinks) made in a temporary directory,
/// then open, scan, list, stats, fsck, repair, fsck again, reconcile, apply and gc. Every call
/// returns `Ok` or a typed error; a repair leaves nothing for the next fsck to find but what it
/// reported it left; nothing outside the store is created, changed or deleted.
pub fn open_store(data: &[u8]) {
    let base = temp_base();
    let outside = base.path().join(OUTSIDE);
    let made = fs::create_dir_all(outside.join("dir"))
        .and_then(|()| fs::write(outside.join("secret"), SECRET))
        .and_then(|()| fs::write(outside.join("dir").join("kept"), SECRET));
    if let Err(e) = made {
        panic!("cannot prepare: {e}");
    }
    let root = base.path().join("store");
    if let Err(e) = fs::create_dir(&root) {
        panic!("cannot prepare: {e}");
    }
    materialise(base.path(), &root, &read_tree(data));
    let before = listing(&outside);
    let beside: BTreeSet<_> = listing(base.path())
        .into_keys()
        .filter(|p| !p.starts_with(&root))
        .collect();

    if let Ok(store) = Store::builder()
        .staging_grace(Duration::ZERO)
        .lock_timeout(Duration::from_millis(10))
        .open(&root)
    {
        exercise(&store);
    }

    assert_eq!(
        listing(&outside),
        before,
        "a file outside the store changed"
    );
    let now: BTreeSet<_> = listing(base.path())
        .into_keys()
        .filter(|p| !p.starts_with(&root))
        .collect();
    assert_eq!(now, beside, "a file appeared or vanished beside the store");
}

fn exercise(store: &Store) {
    let _ = store.scan();
    let _ = store.stats();
    if let Ok(list) = store.list(&Filter::all()) {
        for t in list {
            let _ = store.get(t.id());
            let _ = store.resume_data(t.id());
            let _ = store.open_payload(t.id());
        }
    }
    if let Ok(found) = store.check(|_, _| {}) {
        match store.repair(&found) {
            Ok(rep) => {
                if let Ok(again) = store.check(|_, _| {}) {
                    assert!(
                        again.problems() == 0 || !rep.left.is_empty() || !rep.failed.is_empty(),
                        "repair left problems it did not report:\nfound {found:#?}\nrepair {rep:#?}\nthen {again:#?}"
                    );
                }
            }
            Err(e) => assert_typed(&e, "repair"),
        }
    }
    match store.reconcile(&Sessions::only(["default", "bg"]), &[], SystemTime::now()) {
        Ok(plan) => {
            let _ = store.apply(&plan);
        }
        Err(e) => assert_typed(&e, "reconcile"),
    }
    let _ = store.gc();
}

/// An error on a damaged tree is about the disk, never about the caller's arguments.
fn assert_typed(e: &crate::Error, what: &str) {
    assert!(
        !matches!(e.kind(), ErrorKind::InvalidArgument { .. }),
        "{what}: a damaged store reported as a bad argument: {e}"
    );
}

const SESSIONS: [&str; 3] = ["a", "b", "c"];
const URLS: [&str; 4] = ["https://x/1", "https://x/2", "https://x/3", "https://x/4"];

fn clock() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// `reconcile`: records drawn from the input (every kind, phase and binding, some corrupt)
/// on a simulated store, then an arbitrary task list. The plan accounts for every task and
/// every record of the supplied sessions (and every corrupt one) exactly once, the same
/// inputs in another order give the same plan, applying it succeeds, and once the caller has
/// acted on it a second plan holds only `adopt` and `deliver`; applying that changes no record
/// (but for the progress an adopted task reports) and plans the same again.
pub fn reconcile(data: &[u8]) {
    seeded_ids::seed(Some(0x5eed_7a5c));
    let r = reconcile_inner(data);
    seeded_ids::seed(None);
    if let Err(v) = r {
        panic!("{v}");
    }
}

fn reconcile_inner(data: &[u8]) -> Result<(), String> {
    let mut input = Input::new(data);
    let sim = Sim::new();
    let open = || {
        Store::builder()
            .backend(Arc::clone(&sim) as Arc<dyn crate::fs::Backend>)
            .clock(clock)
            .staging_grace(Duration::ZERO)
            .lock_timeout(Duration::from_millis(10))
            // Records are damaged behind the store's back below, which the journal never
            // sees: a holder of the index would plan from what it last read (FORMAT.md §3.8,
            // "Not covered"). This target is about planning from damaged directories; the
            // index's agreement with them is `crash_index`'s.
            .index(false)
            .open("/store")
            .map_err(|e| format!("open: {e}"))
    };
    let store = open()?;

    let mut ids = Vec::new();
    for _ in 0..input.below(9) {
        let session = pick(&SESSIONS, input.below(3));
        let url = pick(&URLS, input.below(4));
        let mut t = if input.below(2) == 0 {
            NewTransfer::download(url)
        } else {
            NewTransfer::upload(url, UploadSource::Bytes(input.fill(16)))
        }
        .session(session)
        .retry(RetryPolicy {
            max_attempts: 1 + input.below(3) as u32,
            ..RetryPolicy::default()
        });
        if input.below(3) == 0 {
            t = t.idempotency_key(format!("k{}", input.below(2)));
        }
        if input.below(6) == 0 {
            t = t.deadline(clock() - Duration::from_secs(1));
        }
        let id = store.create(t).map_err(e("create"))?;
        let bind = TaskBinding {
            session: session.into(),
            task_id: 1 + input.below(6),
            tag: (input.below(4) != 0).then(|| id.to_string()),
        };
        // Lifecycle errors (a download's bytes on an upload) are typed and harmless here.
        let _ = match input.below(10) {
            1 => store.bind(id, bind),
            2 => store.complete(id, Some(200)).map(drop),
            3 => store
                .bind(id, bind)
                .and_then(|()| store.fail(id, ErrorClass::Transient, "x").map(drop)),
            4 => store.cancel(id).map(drop),
            5 => store.fail(id, ErrorClass::Permanent, "x").map(drop),
            6 => store.append_received(id, b"abc").map(drop),
            7 => store
                .bind(id, bind)
                .and_then(|()| store.store_resume_data(id, b"resume")),
            8 => store
                .bind(id, bind)
                .and_then(|()| store.progress(id, 5, Some(10), crate::Durability::Immediate)),
            _ => Ok(()),
        };
        // Some records are damaged on disk.
        match input.below(12) {
            0 => damage(&sim, id, "manifest")?,
            1 => damage(&sim, id, "state")?,
            _ => {}
        }
        ids.push(id);
    }

    // A relaunch: the store is opened again over what the last run (and the damage) left.
    drop(store);
    let store = open()?;

    let mask = input.below(8);
    let supplied: Vec<&str> = SESSIONS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| *s)
        .collect();
    let sessions = Sessions::only(supplied.iter().copied());
    let mut keys = BTreeSet::new();
    let mut tasks = Vec::new();
    for _ in 0..input.below(10) {
        let session = match input.below(5) {
            4 => "zz",
            i => pick(&SESSIONS, i % 3),
        };
        let task_id = 1 + input.below(8);
        let url = match input.below(6) {
            5 => String::from_utf8_lossy(&input.bytes(24)).into_owned(),
            i => pick(&URLS, i % 4).to_owned(),
        };
        let mut t = Task::running(session, task_id, url);
        let k = input.below(ids.len() as u64 + 1) as usize;
        t = match (input.below(5), ids.get(k)) {
            (1, Some(id)) => t.tag(id.to_string()),
            (2, Some(id)) => t.tag(id.to_string().to_uppercase()),
            (3, _) => t.tag(format!("k{}", input.below(2))),
            (4, _) => t.tag(String::from_utf8_lossy(&input.bytes(40)).into_owned()),
            _ => t,
        };
        t = match input.below(6) {
            1 => t.completed(if input.below(2) == 0 { 200 } else { 500 }),
            2 => t.failed("reset"),
            3 => Task {
                state: TaskState::Cancelling,
                ..t
            },
            4 => Task {
                state: TaskState::Suspended,
                ..t
            },
            _ => t,
        };
        if !supplied.contains(&t.session.as_str()) || !keys.insert(t.key()) {
            continue;
        }
        tasks.push(t);
    }

    let now = clock();
    if std::env::var_os("WAYBILL_FUZZ_DEBUG").is_some() {
        eprintln!(
            "tasks {tasks:#?}\nrecords {:#?}",
            store.scan().map(|s| s.transfers)
        );
    }
    let plan = store
        .reconcile(&sessions, &tasks, now)
        .map_err(e("reconcile"))?;
    let scan = store.scan().map_err(e("scan"))?;

    // Every task and every record of the supplied sessions, and every corrupt one, once.
    let mut task_seen: BTreeMap<TaskRef, usize> = BTreeMap::new();
    let mut rec_seen: BTreeMap<TransferId, usize> = BTreeMap::new();
    for a in &plan.actions {
        if let Some(t) = a.task() {
            *task_seen.entry(t.clone()).or_default() += 1;
        }
        if let Some(id) = a.transfer() {
            *rec_seen.entry(id).or_default() += 1;
        }
    }
    let want_tasks: BTreeSet<TaskRef> = tasks.iter().map(Task::key).collect();
    if task_seen.keys().cloned().collect::<BTreeSet<_>>() != want_tasks
        || task_seen.values().any(|&n| n != 1)
    {
        return Err(format!("tasks {want_tasks:?}, plan {plan:#?}"));
    }
    let mut want_recs: BTreeSet<TransferId> = scan
        .transfers
        .iter()
        .filter(|t| sessions.contains(&t.manifest.session))
        .map(|t| t.id())
        .collect();
    want_recs.extend(scan.corrupt.iter().map(|(id, _)| *id));
    if rec_seen.keys().copied().collect::<BTreeSet<_>>() != want_recs
        || rec_seen.values().any(|&n| n != 1)
    {
        return Err(format!("records {want_recs:?}, plan {plan:#?}"));
    }

    // The same inputs in another order: the same plan.
    let mut reversed = tasks.clone();
    reversed.reverse();
    let again = store
        .reconcile(&sessions, &reversed, now)
        .map_err(e("reconcile"))?;
    if again != plan {
        return Err(format!(
            "reordered tasks changed the plan:\n{plan:#?}\n{again:#?}"
        ));
    }

    store.apply(&plan).map_err(e("apply"))?;

    // The caller acts on the plan: adopted tasks go on, recreated and resumed ones are made
    // and recorded, every other task is stopped.
    let mut next_task = 1000;
    let mut after = Vec::new();
    for a in &plan.actions {
        match a {
            Action::Adopt { task, .. } => {
                if let Some(t) = tasks.iter().find(|t| t.key() == *task) {
                    after.push(t.clone());
                }
            }
            Action::Recreate { id, request, .. } | Action::Resume { id, request, .. } => {
                next_task += 1;
                let session = store.get(*id).map_err(e("get"))?.manifest.session;
                let b = TaskBinding {
                    session: session.clone(),
                    task_id: next_task,
                    tag: Some(id.to_string()),
                };
                store.rebind(*id, b, None).map_err(e("rebind"))?;
                after.push(
                    Task::running(session, next_task, request.url.clone()).tag(id.to_string()),
                );
            }
            _ => {}
        }
    }
    let second = store
        .reconcile(&sessions, &after, now)
        .map_err(e("reconcile"))?;
    if let Some(a) = second.actions.iter().find(|a| {
        !matches!(
            a,
            Action::Adopt { .. } | Action::Deliver { claim: false, .. }
        )
    }) {
        return Err(format!(
            "after applying {plan:#?}\nthe second plan has {a:#?}"
        ));
    }
    // Adopting takes the task's progress; everything else about a record stays as it is.
    let lifecycle = |store: &Store| -> Result<Vec<crate::Transfer>, String> {
        let mut v = store.scan().map_err(e("scan"))?.transfers;
        for t in &mut v {
            t.state.bytes_done = 0;
            t.state.bytes_total = None;
        }
        Ok(v)
    };
    let held = lifecycle(&store)?;
    store.apply(&second).map_err(e("apply"))?;
    let now_held = lifecycle(&store)?;
    if now_held != held {
        return Err(format!(
            "applying {second:#?}\nchanged the records from {held:#?}\nto {now_held:#?}"
        ));
    }
    let third = store
        .reconcile(&sessions, &after, now)
        .map_err(e("reconcile"))?;
    if third != second {
        return Err(format!("applying {second:#?}\nchanged it to {third:#?}"));
    }
    Ok(())
}

/// Turns an error into a violation that says where.
fn e(what: &'static str) -> impl Fn(crate::Error) -> String {
    move |x| format!("{what}: {x}")
}

fn pick<'a>(from: &[&'a str], i: u64) -> &'a str {
    from.get(i as usize).copied().unwrap_or("a")
}

/// Overwrites one of a record's files with garbage, durably.
fn damage(sim: &Sim, id: TransferId, file: &str) -> Result<(), String> {
    let path = Path::new("/store/transfers")
        .join(id.to_string())
        .join(file);
    sim.put_durable(&path, b"garbage, not a record file")
        .map_err(|e| format!("damage {}: {e}", path.display()))
}

/// `ops_model`: operation sequences on a simulated store checked against a reference model,
/// with an I/O error injected at a call the input picks (see the crash-exploration module).
pub fn ops_model(data: &[u8]) {
    if let Err(v) = crate::testkit::crash::ops_model(data) {
        panic!("{v}");
    }
}

#[cfg(test)]
mod tests;
