//! Crash exploration of the index and its journal on the simulated file system.
//!
//! Random sequences run on one store through two handles: the *holder*, which holds the index
//! (`index.redb`, through our redb storage backend), and the *other*, which only journals its
//! changes. Steps create, bind, update, complete, cancel, acknowledge and remove transfers from
//! either handle, list and plan through the index (checkpoints: the journal's changes written
//! into the index; compaction: the journal cut back), release and reopen the index, delete it
//! (a rebuild), and reopen either handle. The journal's thresholds are small, so a short
//! sequence reaches every one of these.
//!
//! A snapshot is taken before every changing call. At each, two kinds of crash:
//! - a **killed process** in the same boot: every write survives, the journal is trusted, and
//!   the index is read and brought up to date from it;
//! - a **power loss**: a new boot, only what was synced survives plus a seeded subset of the
//!   unsynced writes (the last one possibly torn); the journal of the old boot is discarded
//!   and the index rebuilt.
//!
//! At every distinct crash state, a reconcile planned through the index equals a reconcile
//! planned from the transfer directories alone, for every transfer. One crash state in
//! [`FAULT_EVERY`] also has its reopen and reconcile hit by an I/O error at each of its calls
//! (the index's reads, writes and syncs, its rebuild, the journal's checkpoint and cut-back),
//! and one step of each sequence is run again with an I/O error at each of its calls (the
//! journal's appends among them); afterwards the disk, as the process left it and as a power
//! loss leaves it, still plans the same through the index as from the directories.
//!
//! Every sequence comes from a seed; a violation prints it, and `WAYBILL_INDEX_CRASH_SEED`
//! replays that sequence alone. `WAYBILL_INDEX_CRASH_STATES` (or `WAYBILL_SCALE`) scales the
//! exploration up.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::testkit::sim::{Image, Rng, Sim, Snapshot, Tear};
use crate::testkit::{env_u64, run_seeds, seeded_ids};
use crate::{
    Durability, ErrorKind, NewTransfer, Plan, ReconcileOptions, Sessions, Store, Task, TaskBinding,
    TransferId, UploadSource,
};

const ROOT: &str = "/store";
const SESSION: &str = "bg";
/// Steps per sequence.
const STEPS: usize = 18;
/// Journal bytes past the index's checkpoint that make a read write the changes into it, and
/// the consumed length past which the journal is cut back: a few changes each.
const CHECKPOINT: u64 = 700;
const COMPACT: u64 = 1_000;
/// One crash state in this many has its recovery hit by an I/O error at each of its calls.
const FAULT_EVERY: u64 = 128;
/// One sequence in this many has one of its steps run again with an I/O error at each call.
const STEP_FAULT_EVERY: u64 = 4;
/// The most calls of one step run again with an I/O error.
const STEP_FAULTS: u64 = 48;

use crate::testkit::fixed_clock as clock;

fn open(sim: &Arc<Sim>, hold: bool) -> crate::Result<Store> {
    crate::testkit::sim_builder(sim)
        .index(hold)
        .journal_thresholds(CHECKPOINT, COMPACT)
        .open(ROOT)
}

/// Which handle a step runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Holder,
    Other,
}

#[derive(Debug, Clone)]
enum Step {
    Create(Who, usize),
    Bind(Who, usize),
    Progress(Who, usize, u64),
    Complete(Who, usize, u16),
    Cancel(Who, usize),
    Acknowledge(Who, usize),
    Remove(Who, usize),
    /// A batch (group commit): binds the `k`-th transfer and the next, records progress of
    /// the `k`-th, completes the one after.
    Batch(Who, usize),
    /// Lists through the index (reading it, writing a checkpoint, cutting the journal back).
    List,
    /// Plans through the index's facts.
    Plan,
    /// Releases the index (it is reopened by the next list or plan).
    Release,
    /// Deletes `index.redb`: the next list or plan rebuilds it.
    DeleteIndex,
    Reopen(Who),
}

fn who(rng: &mut Rng) -> Who {
    if rng.below(2) == 0 {
        Who::Holder
    } else {
        Who::Other
    }
}

fn next_step(rng: &mut Rng, created: usize) -> Step {
    let w = who(rng);
    if created == 0 {
        return Step::Create(w, 1 + rng.below(200) as usize);
    }
    let k = rng.below(created as u64) as usize;
    match rng.below(21) {
        0..=3 => Step::Create(w, 1 + rng.below(200) as usize),
        4..=5 => Step::Bind(w, k),
        6..=7 => Step::Progress(w, k, rng.below(1 << 20)),
        8 => Step::Complete(w, k, [200, 201, 503][rng.below(3) as usize]),
        9 => Step::Cancel(w, k),
        10 => Step::Acknowledge(w, k),
        11 => Step::Remove(w, k),
        12..=13 => Step::List,
        14..=15 => Step::Plan,
        16 => Step::Release,
        17 => Step::DeleteIndex,
        18 => Step::Reopen(w),
        _ => Step::Batch(w, k),
    }
}

fn url(i: usize) -> String {
    format!("https://example.com/up/{i}")
}

/// The tasks the platform reports at every check: some transfers' tasks run, some finished,
/// the rest are forgotten, and one task no record keeps.
fn tasks(ids: &[TransferId]) -> Vec<Task> {
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let t = Task::running(SESSION, 100 + i as u64, url(i));
        match i % 4 {
            0 => out.push(t),
            1 => out.push(t.completed(200).tag(id.to_string())),
            2 => out.push(t.tag(id.to_string())),
            _ => {}
        }
    }
    out.push(Task::running(SESSION, 9_999, "https://example.com/unknown"));
    out
}

/// The two handles of a sequence.
struct Pair {
    holder: Option<Store>,
    other: Option<Store>,
}

impl Pair {
    fn open(sim: &Arc<Sim>) -> crate::Result<Pair> {
        Ok(Pair {
            holder: Some(open(sim, true)?),
            other: Some(open(sim, false)?),
        })
    }

    fn get(&self, w: Who) -> Option<&Store> {
        match w {
            Who::Holder => self.holder.as_ref(),
            Who::Other => self.other.as_ref(),
        }
    }
}

/// Errors a step may meet without anything being wrong (a change the transfer's phase refuses,
/// a transfer another step removed); any other is a violation.
fn expected(e: &crate::Error) -> bool {
    !matches!(
        e.kind(),
        ErrorKind::Io { .. } | ErrorKind::Poisoned { .. } | ErrorKind::Busy { .. }
    ) && !e.is_corrupt()
}

fn exec(
    step: &Step,
    pair: &mut Pair,
    sim: &Arc<Sim>,
    ids: &mut Vec<TransferId>,
) -> crate::Result<()> {
    let pick = |k: usize| ids.get(k).copied();
    let r: crate::Result<()> = match step {
        Step::Create(w, len) => {
            let Some(s) = pair.get(*w) else { return Ok(()) };
            let t = NewTransfer::upload(url(ids.len()), UploadSource::Bytes(vec![7; *len]))
                .session(SESSION);
            s.create(t).map(|id| ids.push(id))
        }
        Step::Bind(w, k) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.bind(
                id,
                TaskBinding {
                    session: SESSION.into(),
                    task_id: 100 + *k as u64,
                    tag: Some(id.to_string()),
                },
            ),
            _ => Ok(()),
        },
        Step::Progress(w, k, v) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.progress(id, *v, Some(1 << 20), Durability::Immediate),
            _ => Ok(()),
        },
        Step::Complete(w, k, status) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.complete(id, Some(*status)).map(drop),
            _ => Ok(()),
        },
        Step::Cancel(w, k) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.cancel(id).map(drop),
            _ => Ok(()),
        },
        Step::Acknowledge(w, k) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.acknowledge(id),
            _ => Ok(()),
        },
        Step::Remove(w, k) => match (pair.get(*w), pick(*k)) {
            (Some(s), Some(id)) => s.remove(id),
            _ => Ok(()),
        },
        Step::Batch(w, k) => match pair.get(*w) {
            Some(s) => {
                let mut b = s.batch();
                for j in [*k, *k + 1] {
                    if let Some(id) = pick(j % ids.len().max(1)) {
                        b.bind(
                            id,
                            TaskBinding {
                                session: SESSION.into(),
                                task_id: 100 + j as u64,
                                tag: Some(id.to_string()),
                            },
                        );
                    }
                }
                if let Some(id) = pick(*k) {
                    b.progress(id, 4096, Some(1 << 20));
                }
                if let Some(id) = pick((*k + 2) % ids.len().max(1)) {
                    b.complete(id, Some(200));
                }
                // Refusals (an ended or removed transfer) are expected; others are not.
                b.commit()
                    .into_iter()
                    .find_map(|r| r.err().filter(|e| !expected(e)))
                    .map_or(Ok(()), Err)
            }
            None => Ok(()),
        },
        Step::List => match pair.get(Who::Holder) {
            Some(s) => s.list(&crate::Filter::all()).map(drop),
            None => Ok(()),
        },
        Step::Plan => match pair.get(Who::Holder) {
            Some(s) => s
                .reconcile(&Sessions::only([SESSION]), &tasks(ids), clock())
                .map(drop),
            None => Ok(()),
        },
        Step::Release => {
            if let Some(s) = pair.get(Who::Holder) {
                s.release_index();
            }
            Ok(())
        }
        Step::DeleteIndex => match pair.get(Who::Holder) {
            Some(s) => s
                .core
                .fs
                .remove_file(&Path::new(ROOT).join(crate::layout::INDEX_FILE)),
            None => Ok(()),
        },
        Step::Reopen(w) => {
            match w {
                Who::Holder => {
                    pair.holder = None;
                    pair.holder = Some(open(sim, true)?);
                }
                Who::Other => {
                    pair.other = None;
                    pair.other = Some(open(sim, false)?);
                }
            }
            Ok(())
        }
    };
    match r {
        Err(e) if expected(&e) => Ok(()),
        r => r,
    }
}

#[derive(Debug, Default)]
struct Tally {
    states: u64,
    killed: u64,
    /// Killed-process states whose index was rebuilt (it was deleted, not yet made, or
    /// killed between a cut-back of the journal and the index's commit).
    killed_rebuilt: u64,
    power: u64,
    read: u64,
    rebuilt: u64,
    faults: u64,
    checkpoints: u64,
    compactions: u64,
    violations: Vec<String>,
}

/// How a crash state's index came to plan: read (and brought up to date from the journal), or
/// rebuilt from the directories.
enum Came {
    Read,
    Rebuilt,
}

/// Opens the holder on the disk of `sim` and checks that a reconcile planned through the index
/// equals one planned from the directories alone.
fn check(sim: &Arc<Sim>, ids: &[TransferId]) -> Result<Came, String> {
    let holder = open(sim, true).map_err(|e| format!("reopen failed: {e}"))?;
    let sessions = Sessions::only([SESSION]);
    let tasks = tasks(ids);
    let t = &holder.index_tally;
    // The open may already have rebuilt the index; the reconcile itself must then read it.
    let rebuilt_at_open = t.rebuilt.load(Relaxed);
    let before = t.read.load(Relaxed) + rebuilt_at_open;
    let via_index = holder
        .reconcile(&sessions, &tasks, clock())
        .map_err(|e| format!("reconcile through the index: {e}"))?;
    let rebuilt = t.rebuilt.load(Relaxed);
    if t.read.load(Relaxed) + rebuilt == before {
        return Err("the reconcile did not plan through the index (its sync failed)".into());
    }
    if holder.index.lock().map(|h| h.is_none()).unwrap_or(true) {
        return Err(
            "the holder dropped its index while planning (facts or records damaged)".into(),
        );
    }
    let (records, corrupt) = holder
        .records(&sessions)
        .map_err(|e| format!("reading the directories: {e}"))?;
    let via_dirs = crate::plan(
        &sessions,
        &tasks,
        &records,
        &corrupt,
        clock(),
        &ReconcileOptions::default(),
    )
    .map_err(|e| format!("planning from the directories: {e}"))?;
    if via_index != via_dirs {
        return Err(diff(&via_index, &via_dirs));
    }
    Ok(if rebuilt > 0 {
        Came::Rebuilt
    } else {
        Came::Read
    })
}

fn diff(index: &Plan, dirs: &Plan) -> String {
    let a: Vec<String> = index.actions.iter().map(|a| format!("{a:?}")).collect();
    let b: Vec<String> = dirs.actions.iter().map(|a| format!("{a:?}")).collect();
    let only_index: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
    let only_dirs: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
    format!(
        "the index plans differently from the directories\n  only through the index: {only_index:?}\n  only from the directories: {only_dirs:?}"
    )
}

/// Records a check's result; `state` counts it among the explored states' reads and rebuilds
/// (else it checked the disk a faulted run left).
fn record(tally: &mut Tally, state: bool, r: Result<Came, String>, what: impl FnOnce() -> String) {
    match r {
        Ok(Came::Read) if state => tally.read += 1,
        Ok(Came::Rebuilt) if state => tally.rebuilt += 1,
        Ok(_) => {}
        Err(v) => {
            if tally.violations.len() < 5 {
                tally.violations.push(format!("{}: {v}", what()));
            }
        }
    }
}

/// The reopen and reconcile of `sim`'s disk with an I/O error at its n-th call, for every n:
/// no panic, and afterwards the disk (as the process left it, and after a power loss) still
/// plans the same through the index as from the directories.
fn faulty_recovery(img: &Image, killed: &Sim, ids: &[TransferId], tally: &mut Tally, what: &str) {
    for n in 0.. {
        let sim = Sim::after_kill(img.clone(), killed);
        sim.fail_call(n);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let s = open(&sim, true)?;
            s.reconcile(&Sessions::only([SESSION]), &tasks(ids), clock())
                .map(drop)
        }));
        sim.disarm();
        let Some(call) = sim.failed() else {
            break;
        };
        tally.faults += 1;
        if r.is_err() {
            tally.violations.push(format!(
                "{what}: EIO at recovery call {n} ({call}) panicked"
            ));
            return;
        }
        after_fault(&sim, ids, tally, || {
            format!("{what}: EIO at recovery call {n} ({call})")
        });
    }
}

/// Checks the disk a faulted run left: as the process left it, and after a power loss.
fn after_fault(sim: &Arc<Sim>, ids: &[TransferId], tally: &mut Tally, what: impl Fn() -> String) {
    let snap = sim.snapshot();
    let n = snap.pending.len();
    let killed = Sim::after_kill(snap.crash(&vec![true; n], Tear::None), sim);
    record(tally, false, check(&killed, ids), || {
        format!("{}, then killed", what())
    });
    let power = Sim::from_image(snap.crash(&vec![false; n], Tear::None));
    record(tally, false, check(&power, ids), || {
        format!("{}, then power lost", what())
    });
}

/// Runs `step` again on a copy of the disk before it, with an I/O error at each of its calls.
fn faulty_step(
    before: &Image,
    killed: &Sim,
    step: &Step,
    ids: &[TransferId],
    tally: &mut Tally,
    what: &str,
) {
    for n in 0..STEP_FAULTS {
        let sim = Sim::after_kill(before.clone(), killed);
        let Ok(mut pair) = Pair::open(&sim) else {
            tally
                .violations
                .push(format!("{what}: reopen before the faulted step failed"));
            return;
        };
        let mut ids = ids.to_vec();
        sim.fail_call(n);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exec(step, &mut pair, &sim, &mut ids)
        }));
        sim.disarm();
        let Some(call) = sim.failed() else {
            break;
        };
        tally.faults += 1;
        if r.is_err() {
            tally
                .violations
                .push(format!("{what}: EIO at step call {n} ({call}) panicked"));
            return;
        }
        // Carrying on: both handles still answer, with typed errors or success.
        for s in [pair.holder.as_ref(), pair.other.as_ref()]
            .into_iter()
            .flatten()
        {
            let _ = s.list(&crate::Filter::all());
        }
        drop(pair);
        after_fault(&sim, &ids, tally, || {
            format!("{what}: EIO at step call {n} ({call})")
        });
    }
}

/// Explores the crash states of one step's snapshots.
fn explore(
    snaps: &[Snapshot],
    sim: &Sim,
    ids: &[TransferId],
    seen: &mut HashSet<(u64, bool)>,
    rng: &mut Rng,
    tally: &mut Tally,
    what: &str,
) {
    for (si, snap) in snaps.iter().enumerate() {
        let n = snap.pending.len();
        // A killed process: every write made so far is there.
        let mut states = vec![(true, vec![true; n], Tear::None)];
        // A power loss, at every other boundary: one seeded subset of the unsynced writes, the
        // last kept one sometimes torn.
        if rng.below(2) == 0 {
            let keep: Vec<bool> = (0..n).map(|_| rng.next() & 1 == 1).collect();
            let tear = match snap.last_write_sectors(&keep) {
                Some(sectors) if rng.below(4) == 0 => Tear::Garbage(rng.below(sectors), rng.next()),
                _ => Tear::None,
            };
            states.push((false, keep, tear));
        }
        for (kill, keep, tear) in states {
            let img = snap.crash(&keep, tear);
            if !seen.insert((img.tree_hash(), kill)) {
                continue;
            }
            tally.states += 1;
            let fault = tally.states.is_multiple_of(FAULT_EVERY);
            let img2 = fault.then(|| img.clone());
            let crashed = if kill {
                tally.killed += 1;
                Sim::after_kill(img, sim)
            } else {
                tally.power += 1;
                Sim::from_image(img)
            };
            let how = if kill { "killed" } else { "power lost" };
            let r = check(&crashed, ids);
            if kill && matches!(r, Ok(Came::Rebuilt)) {
                tally.killed_rebuilt += 1;
            }
            record(tally, true, r, || {
                format!("{what}, {how} before call {si} ({}), {tear:?}", snap.call)
            });
            if let Some(img) = img2 {
                let w = format!("{what}, {how} before call {si}");
                let host = if kill { sim } else { &crashed };
                faulty_recovery(&img, host, ids, tally, &w);
            }
        }
    }
}

fn run_sequence(seed: u64, tally: &mut Tally) {
    seeded_ids::seed(Some(seed));
    let mut rng = Rng(seed);
    let sim = Sim::new();
    let mut pair = match Pair::open(&sim) {
        Ok(p) => p,
        Err(e) => {
            tally.violations.push(format!("seed {seed}: open: {e}"));
            seeded_ids::seed(None);
            return;
        }
    };
    let mut ids = Vec::new();
    let mut seen = HashSet::new();
    let mut steps = Vec::new();
    let faulted = if seed.is_multiple_of(STEP_FAULT_EVERY) {
        rng.below(STEPS as u64) as usize
    } else {
        usize::MAX
    };
    let journal = Path::new(ROOT).join(crate::layout::JOURNAL_FILE);
    let journal_len = |sim: &Sim| len_after_of(sim, &journal);
    for i in 0..STEPS {
        let step = next_step(&mut rng, ids.len());
        steps.push(step.clone());
        let what = format!("seed {seed}, step {i} {step:?} (steps {steps:?})");
        let before = (i == faulted).then(|| (sim.live(), ids.clone()));
        let (checkpoints_before, len_before) = (holder_checkpoints(&pair), journal_len(&sim));
        sim.record();
        let r = exec(&step, &mut pair, &sim, &mut ids);
        let snaps = sim.take_snapshots();
        if let Err(e) = r {
            tally
                .violations
                .push(format!("{what}: failed without a crash: {e}"));
            break;
        }
        // The holder wrote the journal's changes into the index, or cut the journal back.
        if len_after_of(&sim, &journal) < len_before {
            tally.compactions += 1;
        }
        tally.checkpoints += holder_checkpoints(&pair).saturating_sub(checkpoints_before);
        let mut erng = Rng(rng.next());
        explore(&snaps, &sim, &ids, &mut seen, &mut erng, tally, &what);
        if let Some((before, ids_before)) = before {
            faulty_step(&before, &sim, &step, &ids_before, tally, &what);
        }
        if !tally.violations.is_empty() {
            break;
        }
    }
    drop(pair);
    seeded_ids::seed(None);
}

/// How often the holder wrote the journal's changes into the index so far.
fn holder_checkpoints(pair: &Pair) -> u64 {
    pair.holder
        .as_ref()
        .map_or(0, |s| s.index_tally.checkpoints.load(Relaxed))
}

fn len_after_of(sim: &Sim, path: &Path) -> u64 {
    crate::fs::Backend::lstat(sim, path).map_or(0, |m| m.len)
}

#[test]
fn every_index_crash_state_plans_as_the_directories_do() {
    let target = env_u64("WAYBILL_INDEX_CRASH_STATES")
        .or_else(|| env_u64("WAYBILL_SCALE").map(|k| k * 20_000))
        .unwrap_or(20_000);
    let mut tally = Tally::default();
    let sequences = run_seeds("WAYBILL_INDEX_CRASH_SEED", 0x1d3c, |seed| {
        run_sequence(seed, &mut tally);
        tally.states < target && tally.violations.is_empty()
    });
    println!(
        "index crash states explored: {} (read the index: {}, rebuilt: {}), violations: {}",
        tally.states,
        tally.read,
        tally.rebuilt,
        tally.violations.len()
    );
    println!(
        "  {} sequences; {} killed-process states ({} of them rebuilt the index) and {} power-loss states; {} runs with an injected I/O error, each checked killed and power lost; {} checkpoints and {} cut-backs of the journal in the sequences",
        sequences,
        tally.killed,
        tally.killed_rebuilt,
        tally.power,
        tally.faults,
        tally.checkpoints,
        tally.compactions
    );
    assert!(
        tally.violations.is_empty(),
        "violations (replay one with WAYBILL_INDEX_CRASH_SEED=<seed>):\n{}",
        tally.violations.join("\n")
    );
    assert!(
        tally.killed * 2 >= tally.states,
        "at least half the states are killed processes, so the index is read after a crash"
    );
    assert!(tally.read > 0 && tally.rebuilt > 0);
}
