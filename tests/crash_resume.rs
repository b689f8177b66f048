//! Crash and resume, for real: the `sql_cursor` example runs as a child process over a
//! SQLite table of 100,000 rows, is killed with SIGKILL at a random point, and is run again.
//! Every row must be processed at least once; the rows processed twice must all lie past
//! the checkpoint the killed run had committed, and be no more than its in-flight window.
//!
//! The child is this test binary itself, re-run with `FLOWLINE_CRASH_CHILD` set, calling the
//! example's own `run` (the example file is compiled in below), so no extra cargo build runs
//! inside the test.

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/sql_cursor.rs"]
mod sql_cursor;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS: i64 = 100_000;
const ENV: &str = "FLOWLINE_CRASH_CHILD";

/// The child's entry: does nothing unless run by `sql_cursor_survives_sigkill`.
#[test]
fn crash_child_entry() {
    let Ok(db) = std::env::var(ENV) else { return };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let args = sql_cursor::Args::parse(&[db, ROWS.to_string()]).unwrap();
    rt.block_on(sql_cursor::run(args)).unwrap();
}

fn child(db: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
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

fn processed(db: &str) -> Vec<i64> {
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
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rows.db").to_string_lossy().into_owned();
    sql_cursor::create_table(&db, ROWS).unwrap();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as i64;
    let kill_after = 5_000 + seed % 80_000;
    eprintln!("killing after about {kill_after} rows (seed {seed})");

    let mut first = child(&db);
    let started = Instant::now();
    loop {
        let n = std::fs::metadata(format!("{db}.processed")).map_or(0, |m| m.len()) / 6;
        if n as i64 >= kill_after {
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
    let before = processed(&db);
    assert!(before.len() as i64 >= kill_after / 2);
    assert!(
        (before.len() as i64) < ROWS,
        "killed too late to test anything"
    );

    let status = child(&db).wait().unwrap();
    assert!(status.success());

    let all = processed(&db);
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
    eprintln!(
        "killed at {} rows processed, checkpoint {at_kill}; {} duplicates after resume",
        before.len(),
        dups.len()
    );
    assert_eq!(checkpoint(&db), Some(ROWS));
}
