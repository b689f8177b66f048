//! Pages through a SQLite table with keyset pagination, processes the rows with 8 workers,
//! and checkpoints the cursor in the same file. Stop it (Ctrl-C) or kill it at any point and
//! run it again: it resumes after the last row below which everything had finished, so no
//! row is skipped, and only the rows that were in flight are processed twice.
//!
//! ```text
//! cargo run -p flowline-sqlite --example sql_cursor -- <db> [rows] [stop_after] [--exactly-once]
//! ```
//!
//! - `db`: the SQLite file (created if missing) holding `items` and the checkpoints.
//! - `rows`: rows to put in `items` if it is empty (default 100000).
//! - `stop_after`: stop gracefully after this many rows, as Ctrl-C does.
//!
//! Each processed id is appended to `<db>.processed`, one per line, before the row counts as
//! finished: that is the effect a crash test checks.
//!
//! With `--exactly-once`, the effect is a row in the table `processed_rows` of the same file,
//! written in one transaction with the row's idempotency key (`SqliteStore::commit_with`),
//! and rows pass `idempotent` first: a killed and restarted run then processes every row
//! exactly once.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use flowline::prelude::*;
use flowline::{CursorOptions, Page};
use flowline_sqlite::{SqliteCheckpoints, SqliteStore};
use futures::StreamExt;
use rusqlite::{Connection, params};

const PAGE: i64 = 1000;

/// What the example is told to do.
pub struct Args {
    pub db: String,
    pub rows: i64,
    pub stop_after: Option<u64>,
    /// Effects in the database, committed with their idempotency keys.
    pub exactly_once: bool,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let usage = "usage: sql_cursor <db> [rows] [stop_after] [--exactly-once]";
        let exactly_once = args.iter().any(|a| a == "--exactly-once");
        let args: Vec<String> = args
            .iter()
            .filter(|a| *a != "--exactly-once")
            .cloned()
            .collect();
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

/// Runs the example; returns the report.
pub async fn run(args: Args) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
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
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
        }
    };
    // Commit the checkpoint each time the low watermark moves: after a crash only the pages
    // that were in flight run again. (The default spaces commits 10 ms apart, which is
    // cheaper on a fast pipeline and replays up to 10 ms more work.)
    let commit_each_page = CursorOptions::new().commit_every(std::time::Duration::ZERO);
    let mut source = Pipeline::from_cursor_with(store, "items", commit_each_page, fetch);
    // The effect of processing a row, done before the row counts as finished.
    let mut effect: Box<dyn FnMut(i64) + Send> = if args.exactly_once {
        // In the database, in one transaction with the row's idempotency key.
        let keys = SqliteStore::open(&args.db)?
            .scope("sql_cursor")
            .holder("sql_cursor");
        let written = keys.clone();
        source = source.idempotent(keys, |row| row.0).into_pipeline();
        Box::new(move |id| {
            written
                .commit_with(&[id.to_string()], |tx| {
                    tx.execute("insert into processed_rows (id) values (?1)", [id])
                })
                .expect("write the row's effect");
        })
    } else {
        // One unbuffered append per row.
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("{}.processed", args.db))?;
        Box::new(move |id| {
            log.write_all(format!("{id}\n").as_bytes())
                .expect("append to the processed log");
        })
    };
    let mut rows = source
        .map_async("process", |(id, payload): (i64, String)| async move {
            // Stand-in for real work.
            tokio::task::yield_now().await;
            (id, payload.len())
        })
        .workers(8)
        .unordered()
        .map(move |(id, _len)| {
            effect(id);
            id
        })
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
                Some(_id) => {
                    seen += 1;
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

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(&args)?;
    let report = run(args).await?;
    println!("{report}");
    Ok(())
}
