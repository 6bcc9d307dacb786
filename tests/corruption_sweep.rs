//! Corruption sweep over a real manifest and a real state file: every single-bit flip, every
//! truncation length, every zeroed 512-byte sector, and garbage appended.
//!
//! - A damaged manifest is always detected (`Corrupt`, or `UnsupportedVersion` for the version
//!   field, which v1 keeps outside the checksum), never read as different data, and a reconcile
//!   quarantines the transfer without deleting anything.
//! - A damaged state file always reads as the newest slot whose bytes are intact, or, when
//!   neither is, as a state rebuilt from the manifest and flagged. The oracle reads the slot
//!   layout from `docs/FORMAT.md`, not from the library.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::TestResult;
use waybill::{
    Action, Durability, ErrorKind, NewTransfer, Sessions, State, Store, TaskBinding, TransferId,
    Value,
};

/// Slot `i` of the state file starts at `i * SLOT_CAPACITY`; a slot's header is 24 bytes with
/// the body length at offset 16 (docs/FORMAT.md).
const SLOT_CAPACITY: usize = 16 * 1024;
const SLOT_HEADER: usize = 24;
const SECTOR: usize = 512;

fn tmp() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
}

fn dir_of(root: &Path, id: TransferId) -> PathBuf {
    root.join("transfers").join(id.to_string())
}

/// A transfer with every kind of manifest field filled in.
fn rich(store: &Store) -> waybill::Result<TransferId> {
    let mut meta = BTreeMap::new();
    meta.insert("album".to_string(), Value::from("summer"));
    meta.insert("count".to_string(), Value::from(3i64));
    store.create(
        NewTransfer::download("https://example.com/files/photo.jpg?sig=abc")
            .session("bg")
            .group("album-7")
            .header("X-Trace", "t-1")
            .secret_header("Authorization", "Bearer secret")
            .deadline(SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000))
            .metadata(Value::Map(meta)),
    )
}

/// Every damaged version of `orig`, with a name for the damage.
fn damages(orig: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..orig.len() {
        for bit in 0..8 {
            let mut b = orig.to_vec();
            b[i] ^= 1 << bit;
            out.push((format!("bit {bit} of byte {i} flipped"), b));
        }
    }
    for len in 0..orig.len() {
        out.push((format!("truncated to {len}"), orig[..len].to_vec()));
    }
    for s in 0..orig.len().div_ceil(SECTOR) {
        let mut b = orig.to_vec();
        let end = ((s + 1) * SECTOR).min(b.len());
        b[s * SECTOR..end].fill(0);
        if b != orig {
            out.push((format!("sector {s} zeroed"), b));
        }
    }
    for (n, fill) in [(1usize, 0u8), (1, 0xff), (7, 0x5a), (4096, 0xa5)] {
        let mut b = orig.to_vec();
        b.extend(std::iter::repeat_n(fill, n));
        out.push((format!("{n} bytes of {fill:#x} appended"), b));
    }
    out
}

#[test]
fn every_damaged_manifest_is_detected_and_quarantined() -> TestResult {
    let d = tmp()?;
    let root = d.path().join("store");
    let id = rich(&Store::open(&root)?)?;
    let path = dir_of(&root, id).join("manifest");
    let orig = std::fs::read(&path)?;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let cases = damages(&orig);
    for (what, bytes) in &cases {
        std::fs::write(&path, bytes)?;
        let store = Store::open(&root)?;
        let err = match store.get(id) {
            Ok(t) => panic!("{what}: read as valid: {:?}", t.manifest),
            Err(e) => e,
        };
        let kind = match err.kind() {
            ErrorKind::Corrupt { detail, .. } => {
                format!(
                    "corrupt: {}",
                    format!("{detail:?}")
                        .split([' ', '(', '{'])
                        .next()
                        .unwrap_or("")
                )
            }
            ErrorKind::UnsupportedVersion { .. } => {
                assert!(
                    what.contains("of byte 4") || what.contains("of byte 5"),
                    "{what}: {err}"
                );
                "unsupported version".into()
            }
            _ => panic!("{what}: not a corruption: {err}"),
        };
        assert!(!err.to_string().is_empty());
        *outcomes.entry(kind).or_default() += 1;
    }
    println!(
        "manifest: {} damaged copies, all detected: {outcomes:?}",
        cases.len()
    );

    // One of each kind of damage is quarantined by a reconcile, and nothing is deleted.
    for pick in [
        "bit 3 of byte 40",
        "truncated to 20",
        "sector 0 zeroed",
        "7 bytes",
    ] {
        let (what, bytes) = cases
            .iter()
            .find(|(w, _)| w.starts_with(pick))
            .ok_or("no such case")?;
        let d = tmp()?;
        let root = d.path().join("store");
        let store = Store::open(&root)?;
        let id = rich(&store)?;
        drop(store);
        std::fs::write(dir_of(&root, id).join("manifest"), bytes)?;
        // Damage written behind the store's back is not in the index (which keeps the copy it
        // read): a reconcile meets it once the index is rebuilt.
        common::forget_index(&root);
        let store = Store::open(&root)?;
        let plan = store.reconcile(&Sessions::All, &[], SystemTime::now())?;
        assert!(
            plan.actions
                .iter()
                .any(|a| matches!(a, Action::Quarantine { id: q, .. } if *q == id)),
            "{what}: not quarantined: {:?}",
            plan.actions
        );
        store.apply(&plan)?;
        assert!(store.list(&waybill::Filter::all())?.is_empty(), "{what}");
        let aside = common::files_below(&root.join("quarantine"));
        assert!(
            aside.iter().any(|p| p.ends_with("manifest"))
                && aside.iter().any(|p| p.ends_with("state")),
            "{what}: quarantine holds {aside:?}"
        );
        assert_eq!(
            std::fs::read(
                root.join("quarantine")
                    .join(id.to_string())
                    .join("manifest")
            )?,
            *bytes
        );
    }
    Ok(())
}

/// The bytes slot `i` uses (header and body), read from the file as FORMAT.md lays it out.
fn slot_span(file: &[u8], i: usize) -> std::ops::Range<usize> {
    let at = i * SLOT_CAPACITY;
    let len = u32::from_le_bytes(file[at + 16..at + 20].try_into().unwrap_or_default()) as usize;
    at..at + SLOT_HEADER + len
}

/// Sweeps the state file of a transfer whose newest state is in slot `newest`.
fn sweep_state(newest: usize) -> TestResult {
    let d = tmp()?;
    let root = d.path().join("store");
    let store = Store::open(&root)?;
    let id = rich(&store)?;
    // Updates alternate slots: seq 2 goes to slot 1, seq 3 to slot 0, and so on.
    let mut states: Vec<State> = Vec::new();
    let updates = if newest == 1 { 3 } else { 2 };
    for k in 0..updates {
        if k == 0 {
            store.bind(
                id,
                TaskBinding {
                    session: "bg".into(),
                    task_id: 41,
                    tag: Some(id.to_string()),
                },
            )?;
        } else {
            store.progress(id, 1000 * k as u64, Some(1 << 20), Durability::Immediate)?;
        }
        states.push(store.get(id)?.state);
    }
    let path = dir_of(&root, id).join("state");
    let orig = std::fs::read(&path)?;
    let spans = [slot_span(&orig, 0), slot_span(&orig, 1)];
    let newest_state = states.pop().ok_or("no state")?;
    let older_state = states.pop().ok_or("no state")?;
    let by_slot = |i: usize| {
        if i == newest {
            newest_state.clone()
        } else {
            older_state.clone()
        }
    };
    assert_eq!(store.get(id)?.state, newest_state);

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    // Damage is done in place and undone after each read: the file is 16 KiB and more, and
    // there are over 150,000 cases.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let mut cases = 0usize;
    let mut check = |what: &dyn Fn() -> String,
                     damaged: &dyn Fn(std::ops::Range<usize>) -> bool| {
        cases += 1;
        let want = [newest, 1 - newest]
            .into_iter()
            .find(|i| !damaged(spans[*i].clone()));
        let got = store
            .get(id)
            .unwrap_or_else(|e| panic!("{}: a damaged state must still read: {e}", what()))
            .state;
        match want {
            Some(i) => {
                assert_eq!(got, by_slot(i), "{}: expected slot {i}", what());
                *counts
                    .entry(if i == newest {
                        "newest slot (damage outside it)"
                    } else {
                        "older slot"
                    })
                    .or_default() += 1;
            }
            None => {
                assert!(got.rebuilt, "{}: both slots damaged, yet {got:?}", what());
                assert_eq!(got.phase, waybill::Phase::Pending, "{}", what());
                *counts.entry("rebuilt from the manifest").or_default() += 1;
            }
        }
    };
    for i in 0..orig.len() {
        for bit in 0..8 {
            f.write_at(&[orig[i] ^ (1 << bit)], i as u64)?;
            check(&|| format!("bit {bit} of byte {i} flipped"), &|s| {
                s.contains(&i)
            });
        }
        f.write_at(&orig[i..=i], i as u64)?;
    }
    // Longest first, so each truncation only shortens the file.
    for len in (0..orig.len()).rev() {
        f.set_len(len as u64)?;
        check(&|| format!("truncated to {len}"), &|s| s.end > len);
    }
    f.write_at(&orig, 0)?;
    for sector in 0..orig.len().div_ceil(SECTOR) {
        let span = sector * SECTOR..((sector + 1) * SECTOR).min(orig.len());
        if orig[span.clone()].iter().all(|b| *b == 0) {
            continue; // already zeros (the unused part of slot 0)
        }
        f.write_at(&vec![0u8; span.len()], span.start as u64)?;
        check(&|| format!("sector {sector} zeroed"), &|s| {
            s.start < span.end && span.start < s.end
        });
        f.write_at(&orig[span.clone()], span.start as u64)?;
    }
    for (n, fill) in [
        (1usize, 0u8),
        (1, 0xff),
        (7, 0x5a),
        (4096, 0xa5),
        (20_000, 0x77),
    ] {
        f.write_at(&vec![fill; n], orig.len() as u64)?;
        check(&|| format!("{n} bytes of {fill:#x} appended"), &|_| false);
        f.set_len(orig.len() as u64)?;
    }
    std::fs::write(&path, &orig)?;
    assert_eq!(store.get(id)?.state, newest_state);
    println!("state (newest in slot {newest}): {cases} damaged copies: {counts:?}");
    assert!(counts.get("older slot").copied().unwrap_or(0) > 0);
    assert!(
        counts
            .get("rebuilt from the manifest")
            .copied()
            .unwrap_or(0)
            > 0
    );
    Ok(())
}

#[test]
fn every_damaged_state_reads_as_the_newest_intact_slot_or_rebuilt() -> TestResult {
    sweep_state(0)?;
    sweep_state(1)
}
