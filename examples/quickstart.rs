//! Creates, updates, completes and lists a few transfers in a throwaway store, printing each
//! step. Run with `cargo run --example quickstart`.

use std::error::Error;

use waybill::{
    Completion, Durability, ErrorClass, FailResult, Filter, LinkMode, NewTransfer, Store,
    TaskBinding, UploadSource,
};

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("store");
    let store = Store::open(&root)?;
    println!("opened a new store at {}", root.display());

    // An upload of bytes held in memory, and one of a file the app promises not to change
    // (hard-linked, not copied), both in one group. Created in one batch: shared syncs.
    let photo = dir.path().join("photo.jpg");
    std::fs::write(&photo, vec![0xAB; 256 * 1024])?;
    let ids = store.create_batch(vec![
        NewTransfer::upload(
            "https://uploads.example.com/notes",
            UploadSource::Bytes(b"trip notes".to_vec()),
        )
        .group("trip")
        .secret_header("Authorization", "Bearer not-written-to-disk")
        .meta("title", "notes"),
        NewTransfer::upload(
            "https://uploads.example.com/photo",
            UploadSource::File {
                path: photo.clone(),
                link: LinkMode::Auto,
            },
        )
        .group("trip")
        .meta("title", "photo"),
    ])?;
    let &[notes, pic] = ids.as_slice() else {
        return Err("expected two ids".into());
    };
    println!(
        "created uploads {notes} (bytes) and {pic} ({:?})",
        store.get(pic)?.manifest.payload
    );

    let movie = store.create(NewTransfer::download("https://cdn.example.com/movie.mp4"))?;
    println!("created download {movie}");

    // Bind each platform task before resuming it, so a relaunch can find it again.
    for (task_id, id) in [(1, notes), (2, pic), (3, movie)] {
        store.bind(
            id,
            TaskBinding {
                session: "default".into(),
                task_id,
                tag: Some(id.to_string()),
            },
        )?;
    }
    println!("bound tasks 1, 2, 3");

    // Progress: coalesced reports are cheap; the download's bytes are kept durably.
    for done in (0..=256 * 1024).step_by(32 * 1024) {
        store.progress(pic, done, Some(256 * 1024), Durability::Coalesced)?;
    }
    store.append_received(movie, b"first bytes of the movie")?;
    store.store_resume_data(movie, b"opaque resume data")?;
    println!(
        "reported progress; movie has {} durable bytes",
        store.get(movie)?.state.partial_len
    );

    // A callback arrives for task 2: find the transfer, complete it. Exactly one caller wins.
    let t = store
        .find_by_task("default", 2)?
        .ok_or("task 2 not found")?;
    match store.complete(t.id(), Some(201))? {
        Completion::Won(o) => println!("task 2 ({}) completed: {o}", t.id()),
        Completion::Lost(o) => println!("task 2 was already completed: {o}"),
    }
    match store.fail(notes, ErrorClass::Transient, "connection reset")? {
        FailResult::RetryAt(at) => {
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            println!(
                "notes failed once; retry in about {} s",
                wait.as_secs_f32().round()
            )
        }
        other => println!("notes: {other:?}"),
    }

    println!("\ntransfers:");
    for t in store.list(&Filter::all())? {
        println!(
            "  {} {:8} {:16} {:>7}/{:<7} {}",
            t.id(),
            t.manifest.kind.to_string(),
            t.state.phase.to_string(),
            t.state.bytes_done,
            t.state.bytes_total.map_or("?".into(), |n| n.to_string()),
            t.request().url
        );
    }

    // The app shows the finished photo, then acknowledges: the record and payload are purged,
    // and the group still counts it.
    store.acknowledge(pic)?;
    let g = store.group("trip")?;
    println!(
        "\ngroup trip: {} members, {} succeeded, {} active, {} live records",
        g.total,
        g.succeeded,
        g.active,
        g.members.len()
    );
    println!("photo source still there after purge: {}", photo.exists());
    Ok(())
}
