//! The fuzz targets' corpora and crash artifacts, replayed by `cargo test`; the seed corpora's
//! generator; and the tree description's round trip.

use std::path::{Path, PathBuf};

use super::*;
use crate::testkit::sim::Rng;
use crate::{Durability, LinkMode, Value};

type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 5] = [
    ("decode_manifest", decode_manifest),
    ("decode_state", decode_state),
    ("open_store", open_store),
    ("reconcile", reconcile),
    ("ops_model", ops_model),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Every seed under `fuzz/corpus/<target>/` and every input under
/// `tests/fuzz_regressions/<target>/` (crash artifacts once found, kept after the fix).
#[test]
fn every_corpus_file_and_crash_artifact_passes() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, run) in TARGETS {
        let seeds = files(&top.join("fuzz/corpus").join(name));
        assert!(!seeds.is_empty(), "no seed corpus for {name}");
        let kept = files(&top.join("tests/fuzz_regressions").join(name));
        for f in seeds.iter().chain(&kept) {
            let data = fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{name} fails on {}", f.display());
        }
        println!(
            "{name}: {} seeds, {} kept crash inputs",
            seeds.len(),
            kept.len()
        );
    }
}

fn write_name(out: &mut Vec<u8>, name: &str) {
    match NAMES.iter().position(|n| *n == name) {
        Some(i) => out.push(i as u8),
        None => {
            out.push(RAW_NAME as u8);
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
    }
}

fn write_path(out: &mut Vec<u8>, path: &[String]) {
    out.push((path.len().clamp(1, 4) - 1) as u8);
    for n in path.iter().take(4) {
        write_name(out, n);
    }
}

/// The input that [`read_tree`] reads back as `tree` (for seeds).
fn write_tree(tree: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in tree {
        match e {
            Entry::Dir(p) => {
                out.push(0);
                write_path(&mut out, p);
            }
            Entry::File(p, bytes) => {
                out.push(1);
                write_path(&mut out, p);
                out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                out.extend_from_slice(bytes);
            }
            Entry::Symlink(p, to, t) => {
                out.push(2);
                write_path(&mut out, p);
                out.push(*to);
                write_path(&mut out, t);
            }
        }
    }
    out
}

/// The tree under `root` (files, directories, symlinks), for seeds.
fn tree_of(root: &Path) -> std::io::Result<Vec<Entry>> {
    fn walk(dir: &Path, at: &[String], out: &mut Vec<Entry>) -> std::io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let mut p = at.to_vec();
            p.push(e.file_name().to_string_lossy().into_owned());
            let t = e.file_type()?;
            if p == [crate::layout::INDEX_FILE] {
                // Derived, and rebuilt from the rest: a seed needs only the journal.
                continue;
            }
            if t.is_dir() {
                out.push(Entry::Dir(p.clone()));
                walk(&e.path(), &p, out)?;
            } else if t.is_file() {
                out.push(Entry::File(p, fs::read(e.path())?));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, &[], &mut out)?;
    Ok(out)
}

/// A store with one transfer of each kind and lifecycle worth having as a seed.
fn sample_store(root: &Path) -> crate::Result<Vec<TransferId>> {
    let store = Store::open(root)?;
    let src = root.with_file_name("source.bin");
    fs::write(&src, b"an immutable source file").unwrap();
    let mut meta = Value::empty_map();
    if let Value::Map(m) = &mut meta {
        m.insert(
            "nested".into(),
            Value::Array(vec![
                Value::Integer(-3),
                Value::Bool(true),
                Value::Bytes(vec![0, 1]),
            ]),
        );
    }
    let a = store.create(
        NewTransfer::upload("https://example.com/a", UploadSource::Bytes(vec![7; 300]))
            .session("bg")
            .group("album")
            .meta("title", "sunset")
            .meta("extra", meta)
            .idempotency_key("key-1"),
    )?;
    let b = store.create(
        NewTransfer::upload(
            "https://example.com/b",
            UploadSource::File {
                path: src,
                link: LinkMode::Copy,
            },
        )
        .session("default"),
    )?;
    let c = store.create(NewTransfer::download("https://example.com/c").session("bg"))?;
    let d = store.create(NewTransfer::download("https://example.com/d").session("default"))?;
    let bind = |id: TransferId, task| TaskBinding {
        session: "bg".into(),
        task_id: task,
        tag: Some(id.to_string()),
    };
    store.bind(a, bind(a, 1))?;
    store.progress(a, 100, Some(300), Durability::Immediate)?;
    store.bind(c, bind(c, 2))?;
    store.append_received(c, b"first bytes")?;
    store.store_resume_data(c, b"resume blob")?;
    store.complete(b, Some(201))?;
    store.fail(d, ErrorClass::Permanent, "404")?;
    Ok(vec![a, b, c, d])
}

/// Writes the seed corpora under `fuzz/corpus/`. Run it after a format change:
/// `cargo test --lib write_seed_corpora -- --ignored`.
#[test]
#[ignore = "writes files into the repository; run by hand"]
fn write_seed_corpora() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = top.join(target);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    };
    seeded_ids::seed(Some(7));
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("store");
    let ids = sample_store(&root).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let dir = root.join("transfers").join(id.to_string());
        put(
            "decode_manifest",
            &format!("manifest-{i}"),
            &fs::read(dir.join("manifest")).unwrap(),
        );
        put(
            "decode_state",
            &format!("state-{i}"),
            &fs::read(dir.join("state")).unwrap(),
        );
    }
    put("open_store", "store", &write_tree(&tree_of(&root).unwrap()));
    // The same store with debris and a damaged record.
    fs::create_dir_all(root.join("staging/left-over")).unwrap();
    fs::write(root.join("staging/left-over/manifest"), b"half").unwrap();
    let first = root
        .join("transfers")
        .join(ids[0].to_string())
        .join("state");
    let mut bytes = fs::read(&first).unwrap();
    bytes[30] ^= 0x40;
    fs::write(&first, bytes).unwrap();
    put(
        "open_store",
        "debris",
        &write_tree(&tree_of(&root).unwrap()),
    );
    put("open_store", "empty", b"");
    seeded_ids::seed(None);
    let mut rng = Rng(11);
    for i in 0..6 {
        let len = 24 + 40 * i;
        put("reconcile", &format!("random-{i}"), &rng.fill(len));
        put("ops_model", &format!("random-{i}"), &rng.fill(len));
    }
}

#[test]
fn a_store_tree_reads_back_as_written() {
    seeded_ids::seed(Some(7));
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("store");
    sample_store(&root).unwrap();
    seeded_ids::seed(None);
    let tree = tree_of(&root).unwrap();
    assert!(tree.len() > 10, "{tree:?}");
    assert_eq!(read_tree(&write_tree(&tree)), tree);

    // Materialised again, it is the same store.
    let base2 = tempfile::tempdir().unwrap();
    let root2 = base2.path().join("store");
    fs::create_dir(&root2).unwrap();
    materialise(base2.path(), &root2, &tree);
    let a = Store::open(&root).unwrap().list(&Filter::all()).unwrap();
    let b = Store::open(&root2).unwrap().list(&Filter::all()).unwrap();
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

/// Symlinks to files and directories beside the store: `open_store` panics if any of them is
/// followed to change something there.
#[test]
fn symlinks_out_of_the_store_are_not_followed() {
    let x = || vec!["x".to_owned()];
    let tree = vec![
        Entry::Dir(vec!["transfers".into()]),
        Entry::Symlink(
            vec!["transfers".into(), NAMES[11].into(), "payload".into()],
            0,
            x(),
        ),
        Entry::Symlink(vec!["staging".into()], 1, x()),
        Entry::Symlink(vec!["trash".into()], 1, x()),
        Entry::Symlink(vec!["quarantine".into()], 1, x()),
    ];
    let input = write_tree(&tree);
    assert_eq!(read_tree(&input), tree, "the input describes these links");
    open_store(&input);
}
