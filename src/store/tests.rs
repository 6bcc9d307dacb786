//! Unit tests of the store's syncs, write-back, batches and text limits.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use super::lifecycle::{MAX_ERROR_BYTES, truncate_text};
use super::*;
use crate::layout::{PAYLOAD, STAGING, STATE, TRANSFERS, TRASH};
use crate::transfer::{LinkMode, NewTransfer, UploadSource};

#[test]
fn store_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Store>();
}

/// The real file system, counting every sync (data, directory, file system).
fn counting_all_syncs() -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&n);
    let spy = crate::testkit::spy::Spy::new(move |c| {
        if matches!(c.name, "sync_data" | "sync_dir" | "sync_fs") {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    });
    (Arc::new(spy), n)
}

/// The real file system, recording which files (by inode) get an early write-back and a
/// data sync, in order.
/// What [`recording_write_back`] records: ("start" or "sync", inode), in order.
type WriteBackLog = Arc<Mutex<Vec<(&'static str, u64)>>>;

fn recording_write_back() -> (Arc<dyn crate::fs::Backend>, WriteBackLog) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&log);
    let spy = crate::testkit::spy::Spy::new(move |c| {
        let what = match c.name {
            "start_write_back" => "start",
            "sync_data" => "sync",
            _ => return Ok(()),
        };
        if let Some(h) = c.handle {
            lock(&rec).push((what, crate::fs::Backend::fstat(&crate::fs::Real, h)?.ino));
        }
        Ok(())
    });
    (Arc::new(spy), log)
}

/// A single create starts the write-back of the files it wrote before its first sync, which
/// is of the state (written last), so that sync writes all their allocations at once; it
/// never does so for a linked file of the caller's (that would drop the caller's cached
/// pages); and it still syncs every file once.
#[cfg(unix)]
#[test]
fn a_create_starts_write_back_of_its_own_files_before_syncing_the_state_first() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
    let (backend, rec) = recording_write_back();
    let store = Store::builder()
        .backend(backend)
        .open(dir.path().join("store"))?;
    let src = dir.path().join("photo.jpg");
    std::fs::write(&src, b"caller's bytes").map_err(|e| Error::io("write", &src, e))?;
    let ino = |p: &Path| -> Result<u64> {
        let m = std::fs::symlink_metadata(p).map_err(|e| Error::io("lstat", p, e))?;
        Ok(std::os::unix::fs::MetadataExt::ino(&m))
    };
    let sources = [
        (
            crate::UploadSource::File {
                path: src.clone(),
                link: LinkMode::HardLink,
            },
            false,
        ),
        (crate::UploadSource::Bytes(b"ours".to_vec()), true),
    ];
    for (source, payload_ours) in sources {
        lock(&rec).clear();
        let id = store.create(NewTransfer::upload("https://example.com/u", source))?;
        let t = dir
            .path()
            .join("store")
            .join(TRANSFERS)
            .join(id.to_string());
        let (manifest, state, payload) = (
            ino(&t.join(MANIFEST))?,
            ino(&t.join(STATE))?,
            ino(&t.join(PAYLOAD))?,
        );
        let events = lock(&rec).clone();
        let first_sync = events.iter().position(|e| e.0 == "sync");
        assert_eq!(
            first_sync.and_then(|i| events.get(i)),
            Some(&("sync", state)),
            "the state is synced first: {events:?}"
        );
        let started: Vec<u64> = events
            .iter()
            .take(first_sync.unwrap_or(0))
            .filter(|e| e.0 == "start")
            .map(|e| e.1)
            .collect();
        let mut expected = vec![manifest];
        if payload_ours {
            expected.push(payload);
        }
        assert_eq!(started, expected, "started early: {events:?}");
        for f in [manifest, state, payload] {
            assert_eq!(
                events.iter().filter(|e| **e == ("sync", f)).count(),
                1,
                "each file synced once: {events:?}"
            );
        }
    }
    Ok(())
}

/// One create needs five syncs (manifest, state, payload, its directory, `transfers/`); a
/// batch shares them: one file-system sync per part and one directory sync where `syncfs`
/// exists, else four per transfer and one shared directory sync. A batch built on two
/// threads syncs each thread's parts, and its ids come back in the order of its items.
#[test]
fn a_batch_create_shares_its_syncs() -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
    let (backend, counter) = counting_all_syncs();
    let store = Store::builder()
        .backend(backend)
        .batch_threads(2)
        .open(dir.path())?;
    let syncfs = cfg!(any(target_os = "linux", target_os = "android"));
    let budget = crate::fs::open_file_budget() as u64;
    let upload = || {
        NewTransfer::upload(
            "https://example.com/u",
            crate::UploadSource::Bytes(b"x".to_vec()),
        )
    };
    let before = counter.load(SeqCst);
    store.create(upload())?;
    assert_eq!(counter.load(SeqCst) - before, 5, "one create");
    let before = counter.load(SeqCst);
    let ids = store.create_batch((0..100).map(|_| upload()).collect())?;
    let used = counter.load(SeqCst) - before;
    if syncfs {
        assert_eq!(used, 100u64.div_ceil(budget) + 1, "a batch of 100");
    } else {
        assert_eq!(used, 4 * 100 + 1, "a batch of 100");
    }
    // And the batch is whole: every member reads back.
    for id in ids {
        assert_eq!(store.get(id)?.manifest.payload.len(), 1);
    }
    // 1,100 members on two threads of 550: each thread's parts share half the budget.
    let before = counter.load(SeqCst);
    let items = (0..1100)
        .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
        .collect();
    let ids = store.create_batch(items)?;
    let used = counter.load(SeqCst) - before;
    if syncfs {
        assert_eq!(
            used,
            2 * 550u64.div_ceil(budget / 2) + 1,
            "a batch of 1,100"
        );
    } else {
        assert_eq!(used, 3 * 1100 + 1, "a batch of 1,100");
    }
    assert_eq!(ids.len(), 1100);
    for (i, id) in ids.into_iter().enumerate() {
        let url = format!("https://example.com/{i}");
        assert_eq!(
            store.get(id)?.manifest.request.url,
            url,
            "ids in item order"
        );
    }
    Ok(())
}

/// The guarantee `StoreBuilder::flush_interval` documents: a transfer's coalesced progress
/// is synced at most once per interval however often it is reported, and every report is
/// durable within one interval without any further call.
#[test]
fn coalesced_progress_is_synced_at_most_once_per_interval_and_within_one() -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
    let (backend, counter) = counting_all_syncs();
    let interval = Duration::from_millis(100);
    let store = Store::builder()
        .backend(backend)
        .flush_interval(interval)
        .open(dir.path())?;
    let ids = store.create_batch(
        (0..3)
            .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
            .collect(),
    )?;
    let before = counter.load(SeqCst);
    let run = Duration::from_millis(1000);
    let start = Instant::now();
    let mut reports = 0u64;
    while start.elapsed() < run {
        for id in &ids {
            reports += 1;
            store.progress(*id, reports, Some(u64::MAX), crate::Durability::Coalesced)?;
        }
    }
    let elapsed = start.elapsed();
    let syncs = counter.load(SeqCst) - before;
    // One sync per transfer per whole interval that passed, plus one for a partial interval.
    let bound = ids.len() as u64 * (elapsed.as_millis() / interval.as_millis() + 1) as u64;
    assert!(
        syncs <= bound,
        "{syncs} syncs for {reports} reports in {elapsed:?} (bound {bound})"
    );
    assert!(
        syncs >= ids.len() as u64,
        "progress was written during the run"
    );
    // Nothing more is reported; the last reports become durable within an interval (the
    // wait allows for a slow machine), without flush() or drop.
    let last: Vec<u64> = ids
        .iter()
        .map(|id| lock(&store.core.pending).get(id).map_or(0, |p| p.done))
        .collect();
    std::thread::sleep(interval * 5);
    let other = Store::builder().background_flush(false).open(dir.path())?;
    for (id, want) in ids.iter().zip(&last) {
        assert_eq!(other.get(*id)?.state.bytes_done, *want);
    }
    assert!(
        counter.load(SeqCst) - before - syncs <= ids.len() as u64,
        "one write per transfer after the run"
    );
    Ok(())
}

/// The real file system, counting renames.
fn counting_renames() -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&n);
    let spy = crate::testkit::spy::Spy::new(move |c| {
        if c.name == "rename" {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    });
    (Arc::new(spy), n)
}

/// A batch larger than one part whose late member has a bad input (a missing upload
/// source, metadata over the manifest's limit) fails before any member is renamed into
/// `transfers/`, so no other reader ever sees part of it.
#[test]
fn a_multi_part_batch_with_a_bad_member_renames_nothing() -> Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
    let (backend, counter) = counting_renames();
    let store = Store::builder()
        .backend(backend)
        .open_budget(64)
        .open(dir.path())?;
    let good = |i: usize| NewTransfer::download(format!("https://example.com/{i}"));
    let bad: [NewTransfer; 2] = [
        NewTransfer::upload(
            "https://example.com/u",
            UploadSource::File {
                path: dir.path().join("missing"),
                link: LinkMode::Auto,
            },
        ),
        good(0).meta("big", "x".repeat(300 * 1024)),
    ];
    for b in bad {
        let mut items: Vec<NewTransfer> = (0..200).map(good).collect();
        items.insert(150, b);
        let before = counter.load(SeqCst);
        assert!(store.create_batch(items).is_err());
        assert_eq!(counter.load(SeqCst), before, "no member was renamed");
        assert!(store.list(&Filter::all())?.is_empty());
    }
    Ok(())
}

/// The real file system, whose `fail_at`-th rename fails.
fn failing_rename(fail_at: u64) -> (Arc<dyn crate::fs::Backend>, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let renames = Arc::clone(&n);
    let spy = crate::testkit::spy::Spy::new(move |c| {
        if c.name == "rename"
            && renames.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == fail_at
        {
            return Err(std::io::Error::other("injected rename failure"));
        }
        Ok(())
    });
    (Arc::new(spy), n)
}

/// A batch built on two threads whose rename fails half way, after both threads have
/// renamed parts into `transfers/`, leaves nothing anywhere: the whole batch is rolled
/// back, and the error is the failure itself, not the other thread's stop.
#[test]
fn a_batch_failing_on_one_thread_rolls_back_every_thread() -> Result<()> {
    let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("."), e))?;
    let (backend, renames) = failing_rename(300);
    let store = Store::builder()
        .backend(backend)
        .batch_threads(2)
        .open_budget(64)
        .open(dir.path())?;
    let items: Vec<NewTransfer> = (0..600)
        .map(|i| NewTransfer::download(format!("https://example.com/{i}")))
        .collect();
    let err = store.create_batch(items).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("injected rename failure")),
        "{err:?}"
    );
    assert!(
        renames.load(std::sync::atomic::Ordering::SeqCst) >= 300,
        "the failure was reached"
    );
    assert!(store.list(&Filter::all())?.is_empty());
    for sub in [STAGING, TRANSFERS, TRASH] {
        let left = std::fs::read_dir(dir.path().join(sub))
            .map_err(|e| Error::io("read", &dir.path().join(sub), e))?
            .count();
        assert_eq!(left, 0, "{sub} is empty");
    }
    Ok(())
}

#[test]
fn error_text_is_cut_at_a_char_boundary() {
    let s = "é".repeat(MAX_ERROR_BYTES);
    let t = truncate_text(&s);
    assert!(t.len() <= MAX_ERROR_BYTES && t.chars().all(|c| c == 'é'));
}
