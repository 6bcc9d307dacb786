//! Attacks from other code sharing the store's container: symlinks in place of a transfer's
//! directory, state file or payload; a payload swapped for another file; a directory with a
//! non-canonical name; a `FORMAT` claiming version 999; 4 GiB length prefixes; metadata nested
//! thousands deep.
//!
//! Each gets a typed error or is quarantined, and through every operation the store offers
//! (open, list, scan, get, open_payload, check, repair, gc, reconcile and apply, remove) nothing
//! outside the store is read into a record, written or deleted.

#![allow(
    clippy::indexing_slicing,
    reason = "tests index data they built; a panic there is a test failure"
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{TestResult, files_below};
use waybill::{
    Action, ErrorKind, LinkMode, NewTransfer, Sessions, Store, TransferId, UploadSource,
};

/// A directory outside the store with files an attacker points at, and their contents.
struct Outside {
    dir: PathBuf,
    before: Vec<(PathBuf, Vec<u8>, SystemTime)>,
}

impl Outside {
    fn new(base: &Path, copy_of: &Path) -> std::io::Result<Self> {
        let dir = base.join("outside");
        std::fs::create_dir_all(&dir)?;
        // Valid-looking record files (copies of a real transfer's), and a secret.
        for name in ["manifest", "state"] {
            std::fs::copy(copy_of.join(name), dir.join(name))?;
        }
        std::fs::write(dir.join("secret"), b"not the store's")?;
        let mut o = Outside {
            dir,
            before: Vec::new(),
        };
        o.before = o.snapshot()?;
        Ok(o)
    }

    fn snapshot(&self) -> std::io::Result<Vec<(PathBuf, Vec<u8>, SystemTime)>> {
        let mut v = Vec::new();
        for p in files_below(&self.dir) {
            let full = self.dir.join(&p);
            v.push((
                p,
                std::fs::read(&full)?,
                std::fs::metadata(&full)?.modified()?,
            ));
        }
        Ok(v)
    }

    fn assert_untouched(&self, what: &str) -> TestResult {
        assert_eq!(
            self.snapshot()?,
            self.before,
            "{what}: files outside the store changed"
        );
        Ok(())
    }
}

fn transfer_dir(root: &Path, id: TransferId) -> PathBuf {
    root.join("transfers").join(id.to_string())
}

/// A store with one good upload and one victim upload (returned), both from bytes.
fn setup(base: &Path) -> Result<(PathBuf, TransferId, TransferId), waybill::Error> {
    let root = base.join("store");
    let store = Store::open(&root)?;
    let good = store.create(NewTransfer::upload(
        "https://example.com/good",
        UploadSource::Bytes(b"good".to_vec()),
    ))?;
    let victim = store.create(NewTransfer::upload(
        "https://example.com/victim",
        UploadSource::Bytes(b"victim".to_vec()),
    ))?;
    Ok((root, good, victim))
}

/// Runs every operation over the attacked store. `victim` must never read as a valid record;
/// the good record must keep working. Returns the victim's `get` error.
fn every_operation(
    root: &Path,
    good: TransferId,
    victim: TransferId,
    outside: &Outside,
    what: &str,
) -> Result<waybill::Error, Box<dyn std::error::Error>> {
    let store = Store::open(root)?;
    let err = store
        .get(victim)
        .expect_err("the victim must not read as valid");
    assert!(err.is_corrupt(), "{what}: {err}");
    let _ = store.open_payload(victim);
    let _ = store.resume_data(victim);
    store.list(&waybill::Filter::all())?;
    store.scan()?;
    let report = store.check(|_, _| {})?;
    assert!(report.problems() > 0, "{what}: check found nothing");
    store.repair(&report)?;
    store.gc()?;
    let plan = store.reconcile(&Sessions::All, &[], SystemTime::now())?;
    store.apply(&plan)?;
    let _ = store.remove(victim);
    outside.assert_untouched(what)?;
    // The good record is intact through all of it.
    let g = store.get(good)?;
    assert_eq!(g.manifest.request.url, "https://example.com/good", "{what}");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut store.open_payload(good)?, &mut body)?;
    assert_eq!(body, b"good", "{what}");
    Ok(err)
}

#[test]
fn a_symlink_in_place_of_a_transfer_directory_is_never_followed() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, good, victim) = setup(base.path())?;
    let outside = Outside::new(base.path(), &transfer_dir(&root, victim))?;
    let dir = transfer_dir(&root, victim);
    std::fs::remove_dir_all(&dir)?;
    std::os::unix::fs::symlink(&outside.dir, &dir)?;
    let err = every_operation(&root, good, victim, &outside, "symlinked directory")?;
    assert!(err.is_corrupt(), "{err}");
    // Reconcile moved the link itself aside; its target is still there, whole.
    assert!(std::fs::symlink_metadata(&dir).is_err());
    Ok(())
}

#[test]
fn a_symlink_in_place_of_a_state_file_is_never_followed() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, good, victim) = setup(base.path())?;
    let outside = Outside::new(base.path(), &transfer_dir(&root, victim))?;
    let state = transfer_dir(&root, victim).join("state");
    std::fs::remove_file(&state)?;
    std::os::unix::fs::symlink(outside.dir.join("state"), &state)?;
    {
        let store = Store::open(&root)?;
        // Updates refuse to write through it.
        let e = store
            .cancel(victim)
            .expect_err("no write through a symlink");
        assert!(e.is_corrupt(), "{e}");
        outside.assert_untouched("cancel")?;
    }
    let err = every_operation(&root, good, victim, &outside, "symlinked state")?;
    assert!(err.is_corrupt(), "{err}");
    Ok(())
}

#[test]
fn a_symlink_in_place_of_a_payload_is_never_followed() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, good, victim) = setup(base.path())?;
    let outside = Outside::new(base.path(), &transfer_dir(&root, victim))?;
    let payload = transfer_dir(&root, victim).join("payload");
    std::fs::remove_file(&payload)?;
    std::os::unix::fs::symlink(outside.dir.join("secret"), &payload)?;
    let store = Store::open(&root)?;
    let e = store
        .open_payload(victim)
        .expect_err("no read through a symlink");
    assert!(e.is_corrupt(), "{e}");
    let report = store.check(|_, _| {})?;
    assert!(
        report.problems() > 0,
        "check must report the symlinked payload"
    );
    store.repair(&report)?;
    store.gc()?;
    let plan = store.reconcile(&Sessions::All, &[], SystemTime::now())?;
    store.apply(&plan)?;
    let _ = store.remove(victim);
    outside.assert_untouched("symlinked payload")?;
    assert!(store.get(good).is_ok());
    Ok(())
}

#[test]
fn a_payload_swapped_for_another_file_is_reported() -> TestResult {
    let base = tempfile::tempdir()?;
    let root = base.path().join("store");
    let src = base.path().join("photo.jpg");
    std::fs::write(&src, b"the photo")?;
    let store = Store::open(&root)?;
    let id = store.create(NewTransfer::upload(
        "https://example.com/p",
        UploadSource::File {
            path: src.clone(),
            link: LinkMode::HardLink,
        },
    ))?;
    // Another file (other inode, same size) linked in its place.
    let other = base.path().join("other.jpg");
    std::fs::write(&other, b"other pic")?;
    let payload = transfer_dir(&root, id).join("payload");
    std::fs::remove_file(&payload)?;
    std::fs::hard_link(&other, &payload)?;
    let e = store.open_payload(id).expect_err("swapped");
    assert!(matches!(e.kind(), ErrorKind::PayloadChanged { .. }), "{e}");
    assert_eq!(std::fs::read(&src)?, b"the photo");
    assert_eq!(std::fs::read(&other)?, b"other pic");
    Ok(())
}

#[test]
fn a_directory_with_a_non_canonical_name_is_never_a_record() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, good, victim) = setup(base.path())?;
    // The same transfer under its upper-case name: a valid-looking record, but not ours.
    let upper = root
        .join("transfers")
        .join(victim.to_string().to_uppercase());
    std::fs::rename(transfer_dir(&root, victim), &upper)?;
    common::forget_index(&root);
    let store = Store::open(&root)?;
    assert_eq!(store.open_report().unknown_entries, vec![upper.clone()]);
    assert_eq!(store.list(&waybill::Filter::all())?.len(), 1);
    assert!(matches!(
        store.get(victim).expect_err("gone").kind(),
        ErrorKind::NotFound { .. }
    ));
    assert!(
        "not-a-uuid".parse::<TransferId>().is_err()
            && victim
                .to_string()
                .to_uppercase()
                .parse::<TransferId>()
                .is_err()
    );
    let report = store.check(|_, _| {})?;
    assert!(report.strays.contains(&upper), "{report:?}");
    store.gc()?;
    let plan = store.reconcile(&Sessions::All, &[], SystemTime::now())?;
    assert!(plan.actions.iter().all(|a| a.transfer() == Some(good)));
    store.apply(&plan)?;
    // Left alone: not deleted, not read.
    assert!(upper.join("manifest").is_file());
    Ok(())
}

#[test]
fn a_format_claiming_version_999_is_refused_and_left_alone() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, _, _) = setup(base.path())?;
    let format = root.join("FORMAT");
    let mut b = std::fs::read(&format)?;
    b[8..10].copy_from_slice(&999u16.to_le_bytes());
    let crc = crc32fast::hash(&b[..12]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&format, &b)?;
    let before = files_below(&root);
    let e = Store::open(&root).expect_err("a newer format");
    assert!(
        matches!(e.kind(), ErrorKind::UnsupportedVersion { found: 999, .. }),
        "{e}"
    );
    assert_eq!(files_below(&root), before, "nothing changed");
    assert_eq!(std::fs::read(&format)?, b);
    Ok(())
}

#[test]
fn four_gib_length_prefixes_are_refused_before_allocating() -> TestResult {
    let base = tempfile::tempdir()?;
    let (root, good, victim) = setup(base.path())?;
    let dir = transfer_dir(&root, victim);
    // Manifest: body length 0xffff_ffff.
    let mut m = std::fs::read(dir.join("manifest"))?;
    m[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(dir.join("manifest"), &m)?;
    // State: both slots claim 0xffff_ffff bytes.
    let mut s = std::fs::read(dir.join("state"))?;
    s[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(dir.join("state"), &s)?;
    common::forget_index(&root);
    let store = Store::open(&root)?;
    let e = store.get(victim).expect_err("4 GiB manifest body");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Corrupt {
                detail: waybill::Corruption::Length { .. },
                ..
            }
        ),
        "{e}"
    );
    let plan = store.reconcile(&Sessions::All, &[], SystemTime::now())?;
    assert!(
        plan.actions
            .iter()
            .any(|a| matches!(a, Action::Quarantine { id, .. } if *id == victim)),
        "{:?}",
        plan.actions
    );
    store.apply(&plan)?;
    assert!(store.get(good).is_ok());
    // A good manifest with a 4 GiB state slot: the state is rebuilt, nothing allocated.
    let g = transfer_dir(&root, good).join("state");
    let mut s = std::fs::read(&g)?;
    s[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&g, &s)?;
    let st = store.get(good)?.state;
    assert!(st.rebuilt, "{st:?}");
    Ok(())
}

#[test]
fn deeply_nested_metadata_is_refused_without_recursing_into_it() -> TestResult {
    let base = tempfile::tempdir()?;
    let root = base.path().join("store");
    let store = Store::open(&root)?;
    let good = store.create(NewTransfer::upload(
        "https://example.com/good",
        UploadSource::Bytes(b"good".to_vec()),
    ))?;
    // A victim whose metadata is one map entry holding 60,000 bytes: the metadata field ends
    // the manifest body, 15 + 60,000 bytes long (FORMAT.md §1.2, §1.3).
    let len = 60_000;
    let victim = store.create(
        NewTransfer::upload(
            "https://example.com/victim",
            UploadSource::Bytes(b"victim".to_vec()),
        )
        .meta("k", waybill::Value::Bytes(vec![0; len])),
    )?;
    drop(store);
    let outside = Outside::new(base.path(), &transfer_dir(&root, good))?;
    // Rewrite those bytes, at the same length, as arrays nested 12,000 deep, and make the
    // checksum right: only the depth limit stands between the decoder and the stack.
    let path = transfer_dir(&root, victim).join("manifest");
    let mut m = std::fs::read(&path)?;
    let meta_len = 15 + len;
    let levels = (meta_len - 5) / 5;
    let mut nested = Vec::with_capacity(meta_len);
    for _ in 0..levels {
        nested.extend_from_slice(&[4, 1, 0, 0, 0]);
    }
    let rest = meta_len - nested.len() - 5;
    nested.push(0);
    nested.extend_from_slice(&(rest as u32).to_le_bytes());
    nested.extend(std::iter::repeat_n(b'x', rest));
    let at = m.len() - meta_len;
    m[at..].copy_from_slice(&nested);
    let crc = crc32fast::hash(&m[16..]);
    m[12..16].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &m)?;

    let err = every_operation(&root, good, victim, &outside, "nested metadata")?;
    assert!(err.to_string().contains("nests deeper"), "{err}");
    // The reconcile in every_operation quarantined it.
    assert!(Store::open(&root)?.get(victim).is_err());
    assert!(!transfer_dir(&root, victim).exists());
    Ok(())
}
