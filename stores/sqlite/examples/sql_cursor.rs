//! Pages through a SQLite table with keyset pagination, processes the rows with 8 workers,
//! and checkpoints the cursor in the same file. Stop it (Ctrl-C) or kill it at any point and
//! run it again: it resumes after the last row below which everything had finished, so no
//! row is skipped, and only the rows that were in flight are processed twice.
//!
//! ```text
//! cargo run -p flowline-sqlite --example sql_cursor -- <db> [rows] [stop_after] [--exactly-once] [--rate N]
//! ```
//!
//! - `db`: the SQLite file (created if missing) holding `items` and the checkpoints.
//! - `rows`: rows to put in `items` if it is empty (default 100000).
//! - `stop_after`: stop gracefully after this many rows, as Ctrl-C does.
//! - `--rate`: at most this many rows per second (to watch a run ride out a fault).
//!
//! Each processed id is appended to `<db>.processed`, one per line (a batch of rows per
//! write), before the row counts as finished: that is the effect a crash test checks.
//!
//! With `--exactly-once`, the effect is a row in the table `processed_rows` of the same file,
//! written in one transaction with the row's idempotency key (`SqliteStore::commit_with`),
//! and rows pass `idempotent` first: a killed and restarted run then processes every row
//! exactly once.
//!
//! The file locked by another connection or process (a backup, a long write) pauses the run
//! until the lock is gone; nothing fails for it. The exit status is 0 only when every row
//! was processed; an error is printed as one paragraph.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline::{CursorOptions, Page};
use flowline_sqlite::{SqliteCheckpoints, SqliteStore, is_transient};
use futures::StreamExt;
use rusqlite::{Connection, params};

const PAGE: i64 = 1000;
/// Effects are written per batch of rows: one transaction (or one append) per batch.
const BATCH: usize = 500;

/// What the example is told to do.
pub struct Args {
    pub db: String,
    pub rows: i64,
    pub stop_after: Option<u64>,
    /// Effects in the database, committed with their idempotency keys.
    pub exactly_once: bool,
    /// At most this many rows per second (to watch a run ride out a fault).
    pub rate: Option<u64>,
    /// Counts the rows whose effects are written, for a watcher in the same process (a
    /// test or a benchmark of faults); not a command-line option.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let usage = "usage: sql_cursor <db> [rows] [stop_after] [--exactly-once] [--rate N]";
        let exactly_once = args.iter().any(|a| a == "--exactly-once");
        let mut rate = None;
        let mut rest = Vec::new();
        let mut it = args.iter().filter(|a| *a != "--exactly-once");
        while let Some(a) = it.next() {
            if a == "--rate" {
                let v = it.next().ok_or(format!("--rate needs a value; {usage}"))?;
                match v.parse::<u64>() {
                    Ok(n) if n > 0 => rate = Some(n),
                    _ => {
                        return Err(format!(
                            "--rate: {v:?} is not a count of rows per second above 0; {usage}"
                        ));
                    }
                }
            } else {
                rest.push(a.clone());
            }
        }
        let args = rest;
        let db = args.first().ok_or(usage)?.clone();
        let num = |i: usize| -> Result<Option<i64>, String> {
            args.get(i)
                .map(|s| s.parse::<i64>().map_err(|e| format!("{s:?}: {e}; {usage}")))
                .transpose()
        };
        Ok(Args {
            db,
            rows: num(1)?.unwrap_or(100_000),
            stop_after: num(2)?.map(|n| n as u64),
            exactly_once,
            rate,
            progress: None,
        })
    }
}

/// Creates `items` with `rows` rows if it is empty.
pub fn create_table(db: &str, rows: i64) -> rusqlite::Result<()> {
    let mut conn = Connection::open(db)?;
    conn.execute_batch(
        "pragma journal_mode = wal;
         create table if not exists items (id integer primary key, payload text not null);
         create table if not exists processed_rows (id integer not null);",
    )?;
    let have: i64 = conn.query_row("select count(*) from items", [], |r| r.get(0))?;
    if have == 0 {
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare("insert into items (id, payload) values (?1, ?2)")?;
            for id in 1..=rows {
                ins.execute(params![id, format!("row-{id}")])?;
            }
        }
        tx.commit()?;
    }
    Ok(())
}

/// One page of rows after `after`, as a cursor source page.
fn fetch_page(conn: &Connection, after: i64) -> rusqlite::Result<Page<(i64, String), i64>> {
    let mut q =
        conn.prepare_cached("select id, payload from items where id > ?1 order by id limit ?2")?;
    let rows = q
        .query_map(params![after, PAGE], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<(i64, String)>>>()?;
    Ok(match rows.last().map(|r| r.0) {
        Some(last) if rows.len() as i64 == PAGE => Page::next(rows, last),
        Some(last) => Page::end_at(rows, last),
        None => Page::end(rows),
    })
}

/// The effect of processing rows, done before they count as finished.
enum Effect {
    /// Rows in `processed_rows`, in one transaction with the rows' idempotency keys.
    Db(SqliteStore),
    /// One line per row appended to `<db>.processed`, unbuffered.
    Log(Mutex<std::fs::File>),
}

impl Effect {
    /// Writes the effect of `ids` (blocking). The file locked by another connection past the
    /// busy timeout fails before anything was written, with an error `is_transient` knows.
    fn apply(&self, ids: &[i64]) -> Result<(), BoxError> {
        match self {
            Effect::Db(keys) => {
                let names: Vec<String> = ids.iter().map(i64::to_string).collect();
                keys.commit_with(&names, |tx| {
                    let mut ins =
                        tx.prepare_cached("insert into processed_rows (id) values (?1)")?;
                    for id in ids {
                        ins.execute([id])?;
                    }
                    Ok(())
                })
            }
            Effect::Log(log) => {
                let lines: String = ids.iter().map(|id| format!("{id}\n")).collect();
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                Ok(log.write_all(lines.as_bytes())?)
            }
        }
    }
}

type BoxError = flowline::BoxError;

/// Runs the example; returns the report.
pub async fn run(args: Args) -> Result<Report, BoxError> {
    create_table(&args.db, args.rows)?;
    let store = SqliteCheckpoints::open(&args.db)?;
    let reader = Arc::new(Mutex::new(Connection::open(&args.db)?));
    let fetch = move |cursor: Option<i64>| {
        let reader = reader.clone();
        async move {
            let after = cursor.unwrap_or(0);
            tokio::task::spawn_blocking(move || {
                fetch_page(&reader.lock().unwrap_or_else(|p| p.into_inner()), after)
            })
            .await
            .map_err(|e| flowline::Permanent::new(e.to_string()))?
            // A locked file pauses the source under the run's outage policy; a bad
            // statement ends the run.
            .map_err(|e| {
                let transient = flowline_sqlite::is_transient_error(&e);
                let why = format!("reading the page of items after id {after}: {e}");
                if transient {
                    Box::new(flowline::Transient::new(why)) as BoxError
                } else {
                    Box::new(flowline::Permanent::new(why))
                }
            })
        }
    };
    // Commit the checkpoint each time the low watermark moves: after a crash only the pages
    // that were in flight run again. (The default spaces commits 10 ms apart, which is
    // cheaper on a fast pipeline and replays up to 10 ms more work.)
    // A fetch that finds the file locked is tried again under the run's outage policy, the
    // source paused meanwhile.
    let commit_each_page = CursorOptions::new()
        .commit_every(Duration::ZERO)
        .transient_if(is_transient);
    let mut source = Pipeline::from_cursor_with(store, "items", commit_each_page, fetch);
    let effect = if args.exactly_once {
        // In the database, in one transaction with the rows' idempotency keys.
        let keys = SqliteStore::open(&args.db)?
            .scope("sql_cursor")
            .holder("sql_cursor");
        source = source.idempotent(keys.clone(), |row| row.0).into_pipeline();
        Effect::Db(keys)
    } else {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{}.processed", args.db))?;
        Effect::Log(Mutex::new(log))
    };
    let effect = Arc::new(effect);
    if let Some(rate) = args.rate {
        source = source
            .map_async("pace", |row| async move { row })
            .rate_limit(Rate::per_second(rate))
            .into_pipeline();
    }
    let mut rows = source
        .map_async("process", |(id, payload): (i64, String)| async move {
            // Stand-in for real work.
            tokio::task::yield_now().await;
            (id, payload.len())
        })
        .workers(8)
        .unordered()
        .batch(BATCH, Duration::from_millis(5))
        .try_map_async("effect", move |batch: Vec<(i64, usize)>| {
            let effect = effect.clone();
            async move {
                let ids: Vec<i64> = batch.iter().map(|r| r.0).collect();
                let n = ids.len();
                tokio::task::spawn_blocking(move || effect.apply(&ids))
                    .await
                    .map_err(|e| e.to_string())??;
                Ok::<usize, BoxError>(n)
            }
        })
        // The file locked by another connection (a backup, a long write) pauses the job (no
        // new batch starts, one probe at a time) and the batch is tried again once the lock
        // is gone, for as long as the run's outage policy waits (by default 5 minutes): never
        // a failed row. Any other error fails the batch at once.
        .transient_if(is_transient)
        .into_stream();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seen = 0u64;
    let mut stopping = false;
    loop {
        tokio::select! {
            r = &mut ctrl_c, if !stopping => {
                r?;
                eprintln!("stopping: finishing the rows in flight");
                rows.handle().stop();
                stopping = true;
            }
            next = rows.next() => match next {
                Some(n) => {
                    seen += n as u64;
                    if let Some(p) = &args.progress {
                        p.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    if !stopping && args.stop_after.is_some_and(|n| seen >= n) {
                        rows.handle().stop();
                        stopping = true;
                    }
                }
                None => break,
            },
        }
    }
    Ok(rows.finish().await?)
}

/// What the run left undone, if anything: failed rows, rows left unfinished, or a run that
/// did not reach the end of the table.
pub fn unfinished(report: &Report) -> Option<String> {
    let left: u64 = report.stages.iter().map(|s| s.unfinished).sum();
    if report.failures > 0 {
        Some(format!(
            "{} item(s) failed (see the report); run again to retry them",
            report.failures
        ))
    } else if report.outcome != RunOutcome::Completed || left > 0 {
        Some(format!(
            "the run ended {} with {left} item(s) unfinished; run again to finish",
            report.outcome
        ))
    } else {
        None
    }
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match Args::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sql_cursor: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(report) => {
            println!("{report}");
            match unfinished(&report) {
                None => std::process::ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("sql_cursor: {why}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("sql_cursor: {}", flowline::error_chain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}
