//! A SQLite file write-locked by another process for 8 s under a running pipeline: the
//! `sql_cursor` example with `--exactly-once` (idempotency keys, each batch's effect in one
//! transaction with its keys) over 100,000 rows, paced at 20,000 rows/s so that the lock
//! lands in the middle of the run. The lock outlasts SQLite's busy timeout (5 s): the
//! stores' calls and the effects fail with `SQLITE_BUSY` and are tried again until the lock
//! is gone. The run must finish by itself (no rerun) with every row's effect written exactly
//! once: lost 0, duplicate effects 0, failed (dead-lettered) rows 0, nothing left unfinished.
//!
//! The lock holder is this test binary itself, re-run with `FLOWLINE_SQLITE_LOCKER` set.

#[allow(dead_code, unreachable_pub)]
#[path = "../../stores/sqlite/examples/sql_cursor.rs"]
mod sql_cursor;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROWS: i64 = 100_000;
const LOCKER: &str = "FLOWLINE_SQLITE_LOCKER";
const LOCK_FOR: Duration = Duration::from_secs(8);
/// Longer than the run takes (5 s of rows plus the lock): a run still going then has hung.
const RUN_BOUND: Duration = Duration::from_secs(45);

/// The lock holder's entry: does nothing unless run by the test below. Takes the write lock
/// (`BEGIN IMMEDIATE` and a write), says so on stdout, holds it for 8 s, commits.
#[test]
fn sqlite_locker_entry() {
    let Ok(db) = std::env::var(LOCKER) else {
        return;
    };
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch(
        "BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS backup_marker (at INTEGER);
         INSERT INTO backup_marker VALUES (1);",
    )
    .unwrap();
    println!("\nlock taken");
    std::thread::sleep(LOCK_FOR);
    c.execute_batch("COMMIT").unwrap();
}

fn processed(db: &str, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[test]
fn a_file_write_locked_for_8s_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("items.db").to_string_lossy().into_owned();
    sql_cursor::create_table(&db, ROWS).unwrap();
    let args: Vec<String> = [&db, &ROWS.to_string(), "--exactly-once", "--rate", "20000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let args = sql_cursor::Args::parse(&args).unwrap();
    let (tx, run) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(sql_cursor::run(args));
        let _ = tx.send(r.map_err(|e| flowline::error_chain(&*e)));
    });
    // The lock lands once a fifth of the rows are done.
    let until = Instant::now() + RUN_BOUND;
    while processed(&db, "select count(*) from processed_rows") < ROWS / 5 {
        if let Ok(r) = run.try_recv() {
            panic!("the run ended before the lock: {r:?}");
        }
        assert!(Instant::now() < until, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut locker = Command::new(std::env::current_exe().unwrap())
        .args([
            "sqlite_locker_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LOCKER, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(locker.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("lock taken"))),
        "the locker did not take the lock"
    );
    let locked_at = processed(&db, "select count(*) from processed_rows");
    let report = match run.recv_timeout(RUN_BOUND) {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => panic!("the run failed: {e}"),
        Err(_) => panic!("the run did not finish within {RUN_BOUND:?}"),
    };
    assert!(locker.wait().unwrap().success(), "the locker failed");
    assert!(locked_at < ROWS, "the run ended before the lock");
    assert_eq!(report.failures, 0, "dead-lettered rows\n{report}");
    assert_eq!(
        sql_cursor::unfinished(&report),
        None,
        "the run did not finish\n{report}"
    );
    let total = processed(&db, "select count(*) from processed_rows");
    let distinct = processed(&db, "select count(distinct id) from processed_rows");
    let in_range = processed(
        &db,
        "select count(distinct id) from processed_rows where id between 1 and 100000",
    );
    assert_eq!(ROWS - in_range, 0, "rows lost");
    assert_eq!(total - distinct, 0, "duplicate effects");
    assert_eq!(
        processed(&db, "select count(*) from backup_marker"),
        1,
        "the locker's write"
    );
    eprintln!("locked at {locked_at} rows; {report}");
}
