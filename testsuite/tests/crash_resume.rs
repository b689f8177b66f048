//! Crash and resume, for real: the `sql_cursor` example runs as a child process over a
//! SQLite table of 100,000 rows, is killed with SIGKILL at a random point, and is run again.
//! Every row must be processed at least once; the rows processed twice must all lie past
//! the checkpoint the killed run had committed, and be no more than its in-flight window.
//!
//! With `--exactly-once` (effects written in one transaction with their idempotency keys),
//! the same crash leaves every row processed exactly once: zero duplicate effects. The same
//! holds with the idempotency store's default holder (a new one per process) and its default
//! reservation TTL: the restarted process makes progress at once and takes over the keys the
//! killed one had reserved once their leases run out (within the TTL, 30 s), never passing
//! them over as done. A lease renewed by a live process is never taken over, however long
//! its item takes; killed, its key is free within the TTL.
//!
//! Every test runs with four threads spinning beside it (a loaded machine).
//!
//! The child is this test binary itself, re-run with `FLOWLINE_CRASH_CHILD` set, calling the
//! example's own `run` (the example file is compiled in below), so no extra cargo build runs
//! inside the test.

#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/sqlite/examples/sql_cursor.rs"]
mod sql_cursor;
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: i64 = 100_000;
const ENV: &str = "FLOWLINE_CRASH_CHILD";
/// Set (to anything) for a child that runs with `--exactly-once`.
const EXACTLY_ONCE: &str = "FLOWLINE_CRASH_EXACTLY_ONCE";
/// Set (to anything) for a child that runs the exactly-once pipeline with the store's
/// default holder and default reservation TTL.
const DEFAULT_HOLDER: &str = "FLOWLINE_CRASH_DEFAULT_HOLDER";
/// Set (to anything) for a child that works on one item for a long time with a short lease.
const LONG_ITEM: &str = "FLOWLINE_CRASH_LONG_ITEM";
/// The lease of the long item.
const LEASE: Duration = Duration::from_secs(1);

/// The child's entry: does nothing unless run by `sql_cursor_survives_sigkill`.
#[test]
fn crash_child_entry() {
    let Ok(db) = std::env::var(ENV) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::var(LONG_ITEM).is_ok() {
        rt.block_on(long_item_child(&db));
        return;
    }
    if std::env::var(DEFAULT_HOLDER).is_ok() {
        rt.block_on(default_holder_child(&db));
        return;
    }
    let mut args = vec![db, ROWS.to_string()];
    if std::env::var(EXACTLY_ONCE).is_ok() {
        args.push("--exactly-once".to_string());
    }
    let args = sql_cursor::Args::parse(&args).unwrap();
    rt.block_on(sql_cursor::run(args)).unwrap();
}

/// One item worked on for an hour under a lease of [`LEASE`], in scope `long`.
async fn long_item_child(db: &str) {
    use flowline::prelude::*;
    let keys = flowline_sqlite::SqliteStore::open(db)
        .unwrap()
        .scope("long");
    Pipeline::from_iter([1u32])
        .idempotent(keys, |id| *id)
        .ttl(LEASE)
        .map_async("slow", |id| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            id
        })
        .run()
        .await
        .unwrap();
}

/// The `--exactly-once` pipeline of the example, but with the idempotency store's default
/// holder (none named) and its default reservation TTL.
async fn default_holder_child(db: &str) {
    use flowline::prelude::*;
    use flowline::{CursorOptions, Page};
    use flowline_sqlite::{SqliteCheckpoints, SqliteStore};
    sql_cursor::create_table(db, ROWS).unwrap();
    let reader = std::sync::Arc::new(std::sync::Mutex::new(
        rusqlite::Connection::open(db).unwrap(),
    ));
    let fetch = move |after: Option<i64>| {
        let reader = reader.clone();
        async move {
            let after = after.unwrap_or(0);
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().unwrap();
                let mut q =
                    conn.prepare("select id from items where id > ?1 order by id limit 1000")?;
                let ids: Vec<i64> = q
                    .query_map([after], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                Ok::<_, rusqlite::Error>(match ids.last() {
                    Some(&last) if ids.len() == 1000 => Page::next(ids, last),
                    Some(&last) => Page::end_at(ids, last),
                    None => Page::end(ids),
                })
            })
            .await
            .unwrap()
        }
    };
    let checkpoints = SqliteCheckpoints::open(db).unwrap();
    let each_page = CursorOptions::new().commit_every(Duration::ZERO);
    let keys = SqliteStore::open(db).unwrap().scope("default_holder");
    let written = keys.clone();
    let report = Pipeline::from_cursor_with(checkpoints, "items", each_page, fetch)
        .idempotent(keys, |id| *id)
        .map_async("process", |id: i64| async move {
            tokio::task::yield_now().await;
            id
        })
        .workers(8)
        .unordered()
        .map(move |id| {
            written
                .commit_with(&[id.to_string()], |tx| {
                    tx.execute("insert into processed_rows (id) values (?1)", [id])
                })
                .expect("write the row's effect");
        })
        .run()
        .await
        .unwrap();
    assert_eq!(report.failures, 0, "{report}");
}

fn child_with(db: &str, exactly_once: bool, default_holder: bool) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    if exactly_once {
        cmd.env(EXACTLY_ONCE, "1");
    }
    if default_holder {
        cmd.env(DEFAULT_HOLDER, "1");
    }
    cmd.args([
        "crash_child_entry",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ENV, db)
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap()
}

/// The ids whose effect was written, once per effect.
fn processed(db: &str, exactly_once: bool) -> Vec<i64> {
    if exactly_once {
        let c = rusqlite::Connection::open(db).unwrap();
        let mut q = c.prepare("select id from processed_rows").unwrap();
        return q
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    }
    std::fs::read_to_string(format!("{db}.processed"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

fn checkpoint(db: &str) -> Option<i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "select cursor from flowline_checkpoints where name = 'items'",
        [],
        |r| r.get::<_, String>(0),
    )
    .ok()
    .map(|s| s.parse().unwrap())
}

#[test]
fn sql_cursor_survives_sigkill() {
    crash_and_resume(false);
}

#[test]
fn sql_cursor_with_idempotency_keys_has_zero_duplicate_effects_after_sigkill() {
    crash_and_resume(true);
}

#[test]
fn the_default_idempotency_holder_gives_every_row_one_effect_after_sigkill() {
    crash_and_resume_with(true, true);
}

fn effects_so_far(db: &str, exactly_once: bool) -> i64 {
    if exactly_once {
        let c = rusqlite::Connection::open(db).unwrap();
        c.query_row("select count(*) from processed_rows", [], |r| r.get(0))
            .unwrap_or(0)
    } else {
        (std::fs::metadata(format!("{db}.processed")).map_or(0, |m| m.len()) / 6) as i64
    }
}

fn crash_and_resume(exactly_once: bool) {
    crash_and_resume_with(exactly_once, false);
}

fn crash_and_resume_with(exactly_once: bool, default_holder: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rows.db").to_string_lossy().into_owned();
    sql_cursor::create_table(&db, ROWS).unwrap();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64;
    // At most half way: the child does ~400,000 rows/s, so the rest leaves the test ~100 ms
    // to notice the kill point even on a loaded machine.
    let kill_after = 5_000 + seed % 45_000;
    eprintln!("killing after about {kill_after} rows (seed {seed})");

    let _busy = support::busy::BusyThreads::start(4);
    let mut first = child_with(&db, exactly_once, default_holder);
    let started = Instant::now();
    loop {
        if effects_so_far(&db, exactly_once) >= kill_after {
            break;
        }
        if first.try_wait().unwrap().is_some() {
            panic!("the child ended on its own before the kill point");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "child too slow"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = checkpoint(&db).unwrap_or(0);
    let before = processed(&db, exactly_once);
    assert!(before.len() as i64 >= kill_after / 2);
    assert!(
        (before.len() as i64) < ROWS,
        "killed too late to test anything"
    );

    let mut second = child_with(&db, exactly_once, default_holder);
    let restarted = Instant::now();
    let mut progress = None;
    let status = loop {
        if progress.is_none() && effects_so_far(&db, exactly_once) > before.len() as i64 {
            progress = Some(restarted.elapsed());
        }
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(300),
            "the restarted child did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(status.success());
    let progress = progress.unwrap_or_else(|| restarted.elapsed());
    eprintln!(
        "restarted run: first new effect after {progress:?}, done after {:?}",
        restarted.elapsed()
    );
    // The keys the killed run held block nothing else, and themselves only for their TTL.
    assert!(progress < Duration::from_secs(30), "{progress:?}");

    let all = processed(&db, exactly_once);
    let mut count = vec![0u32; ROWS as usize + 1];
    for id in &all {
        count[*id as usize] += 1;
    }
    let missing: Vec<usize> = (1..=ROWS as usize).filter(|&i| count[i] == 0).collect();
    assert!(
        missing.is_empty(),
        "skipped {} rows, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let dups: Vec<usize> = (1..=ROWS as usize).filter(|&i| count[i] > 1).collect();
    assert!(count.iter().all(|&c| c <= 2), "a row processed three times");
    // Duplicates are rows the killed run processed past its last checkpoint: the in-flight
    // window (a few pages of 1,000 rows at most), never rows below the checkpoint.
    assert!(
        dups.iter().all(|&i| i as i64 > at_kill),
        "a row below the checkpoint ran twice"
    );
    assert!(dups.len() <= 4_000, "{} duplicates", dups.len());
    if exactly_once {
        assert_eq!(dups, Vec::<usize>::new(), "duplicate effects");
    }
    eprintln!(
        "killed at {} rows processed, checkpoint {at_kill}; {} duplicates after resume",
        before.len(),
        dups.len()
    );
    assert_eq!(checkpoint(&db), Some(ROWS));
}

/// A live process renews the lease of the item it works on: another holder finds the key
/// busy for many leases in a row. Killed, its key is free again within the lease.
#[test]
fn a_renewed_lease_is_never_taken_over_and_a_killed_holders_expires_within_its_ttl() {
    use flowline::{Reservation, Store};
    let _busy = support::busy::BusyThreads::start(4);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("long.db").to_string_lossy().into_owned();
    let other = flowline_sqlite::SqliteStore::open(&db)
        .unwrap()
        .scope("long");
    let mut child = Command::new(std::env::current_exe().unwrap());
    let mut child = child
        .args([
            "crash_child_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, &db)
        .env(LONG_ITEM, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = vec!["1".to_string()];
    let reserved_by_child = || {
        rusqlite::Connection::open(&db)
            .and_then(|c| {
                c.query_row(
                    "select count(*) from flowline_idempotency where scope = 'long' and key = '1' and state = 0",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .unwrap_or(0)
            == 1
    };
    let started = Instant::now();
    while !reserved_by_child() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the child never reserved its key"
        );
        assert!(child.try_wait().unwrap().is_none(), "the child ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Five leases long, asked every 100 ms: busy every time.
    let watched = Instant::now();
    while watched.elapsed() < LEASE * 5 {
        let r = rt.block_on(other.reserve(&key, LEASE)).unwrap();
        assert_eq!(
            r,
            vec![Reservation::Busy],
            "taken over after {:?}",
            watched.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = Instant::now();
    let freed = loop {
        if rt.block_on(other.reserve(&key, LEASE)).unwrap() == vec![Reservation::Reserved] {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the killed holder's lease never ran out"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("the killed holder's key was free {freed:?} after the kill");
    assert!(freed <= LEASE + Duration::from_millis(500), "{freed:?}");
}
