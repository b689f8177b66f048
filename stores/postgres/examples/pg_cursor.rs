//! Pages through a PostgreSQL table with keyset pagination (`WHERE id > $1 ORDER BY id
//! LIMIT $2`), writes each row's effect back to the database, and checkpoints the cursor in
//! PostgreSQL. Kill it (SIGKILL) at any point and run it again: it resumes after the last
//! row below which everything had finished, so no row is skipped. Stop it gracefully
//! (Ctrl-C, or `--stop-after`) and run it again: no row starts after the stop, so the page
//! begun stays uncommitted and the rerun does it again (with `--exactly-once`, no effect is
//! written twice; without, the rows of that page done before the stop repeat).
//!
//! ```text
//! FLOWLINE_PG_URL=postgresql://postgres@127.0.0.1:5432/app \
//!   cargo run -p flowline-postgres --example pg_cursor -- [--url URL] [--rows N] [--stop-after N] [--exactly-once] [--rate N]
//! ```
//!
//! - `--url`: the server (default: `FLOWLINE_PG_URL`).
//! - `--rows`: rows to put in `items` if it is empty (default 100000).
//! - `--stop-after`: stop gracefully after this many rows, as Ctrl-C does.
//! - `--exactly-once`: rows pass `idempotent` first, and each batch's effect (rows in
//!   `processed_rows`) is written in one transaction with the rows' idempotency keys
//!   (`PgStore::commit_with`): a killed and restarted run then writes every row's effect
//!   exactly once. Without it, a kill may write the effects of the rows in flight twice.
//! - `--rate`: at most this many rows per second (to watch a run ride out a fault).
//!
//! A connection killed, a server restarted, stopped or frozen for a while pauses the run
//! until the server answers again; nothing fails for it and nothing is skipped. The exit
//! status is 0 only when every row was processed; an error is printed as one paragraph.

use std::time::Duration;

use flowline::prelude::*;
use flowline::{CursorOptions, Page};
use flowline_postgres::{AlreadyCommitted, PgCheckpoints, PgOptions, PgStore, is_transient};
use futures::StreamExt;

const PAGE: i64 = 1000;
/// Effects are written per batch of rows: one transaction, one statement.
const BATCH: usize = 500;

/// What the example is told to do.
#[derive(Debug, Clone)]
pub struct Args {
    pub url: String,
    pub rows: i64,
    pub stop_after: Option<u64>,
    /// Effects committed with their idempotency keys.
    pub exactly_once: bool,
    /// At most this many rows per second (to watch a run ride out a fault).
    pub rate: Option<u64>,
    /// Counts the rows whose effects are written, for a watcher in the same process (a
    /// test or a benchmark of faults); not a command-line option.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let usage =
            "usage: pg_cursor [--url URL] [--rows N] [--stop-after N] [--exactly-once] [--rate N]";
        let mut url = std::env::var("FLOWLINE_PG_URL").ok();
        let (mut rows, mut stop_after, mut exactly_once, mut rate) =
            (100_000i64, None, false, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value; {usage}"))
            };
            let number = |name: &str, s: String| {
                s.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| format!("{name}: {s:?} is not a count; {usage}"))
            };
            match a.as_str() {
                "--url" => url = Some(value("--url")?),
                "--rows" => rows = number("--rows", value("--rows")?)?,
                "--stop-after" => {
                    stop_after = Some(number("--stop-after", value("--stop-after")?)? as u64)
                }
                "--exactly-once" => exactly_once = true,
                "--rate" => {
                    let n = number("--rate", value("--rate")?)?;
                    if n == 0 {
                        return Err(format!(
                            "--rate: 0 rows per second would never end; {usage}"
                        ));
                    }
                    rate = Some(n as u64)
                }
                other => return Err(format!("unknown argument {other:?}; {usage}")),
            }
        }
        let url =
            url.ok_or_else(|| format!("no server: pass --url or set FLOWLINE_PG_URL; {usage}"))?;
        Ok(Args {
            url,
            rows,
            stop_after,
            exactly_once,
            rate,
            progress: None,
        })
    }
}

type BoxError = flowline::BoxError;

/// Creates `items` with `rows` rows if it is empty, and the effects table.
pub async fn create_tables(
    pool: &flowline_postgres::deadpool_postgres::Pool,
    rows: i64,
) -> Result<(), BoxError> {
    let client = pool.get().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS items (id BIGINT PRIMARY KEY, payload TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS processed_rows (id BIGINT NOT NULL);",
        )
        .await?;
    let have: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await?
        .get(0);
    if have == 0 {
        client
            .execute(
                "INSERT INTO items (id, payload) SELECT g, 'row-' || g FROM generate_series(1, $1::bigint) AS g",
                &[&rows],
            )
            .await?;
    }
    Ok(())
}

/// One page of rows after `after`. Its errors are marked transient or permanent
/// (`Transient` or `Permanent`): a lost connection or a server restarting pauses the source under the run's
/// outage policy until the server answers again; a bad statement ends the run.
async fn fetch_page(
    pool: &flowline_postgres::deadpool_postgres::Pool,
    after: i64,
) -> Result<Page<(i64, String), i64>, BoxError> {
    read_page(pool, after).await.map_err(|e| {
        let why = format!(
            "reading the page of items after id {after}: {}",
            flowline::error_chain(&*e)
        );
        if flowline_postgres::is_transient_error(&*e) {
            Box::new(flowline::Transient::new(why)) as BoxError
        } else {
            Box::new(flowline::Permanent::new(why))
        }
    })
}

async fn read_page(
    pool: &flowline_postgres::deadpool_postgres::Pool,
    after: i64,
) -> Result<Page<(i64, String), i64>, BoxError> {
    let client = pool.get().await?;
    let q = client
        .prepare_cached("SELECT id, payload FROM items WHERE id > $1 ORDER BY id LIMIT $2")
        .await?;
    let mut rows = Vec::with_capacity(PAGE as usize);
    for r in client.query(&q, &[&after, &PAGE]).await? {
        // A row that does not read as (bigint, text) is an error, not a panic.
        rows.push((r.try_get::<_, i64>(0)?, r.try_get::<_, String>(1)?));
    }
    Ok(match rows.last().map(|r| r.0) {
        Some(last) if rows.len() as i64 == PAGE => Page::next(rows, last),
        Some(last) => Page::end_at(rows, last),
        None => Page::end(rows),
    })
}

/// Runs the example; returns the report.
pub async fn run(args: Args) -> Result<Report, BoxError> {
    let checkpoints = PgCheckpoints::connect_with(&args.url, PgOptions::new().pool_size(8)).await?;
    // One pool for the reads, the effects, the keys and the checkpoints.
    let pool = checkpoints.pool().clone();
    create_tables(&pool, args.rows).await?;
    let reads = pool.clone();
    let fetch = move |cursor: Option<i64>| {
        let pool = reads.clone();
        async move { fetch_page(&pool, cursor.unwrap_or(0)).await }
    };
    // Commit the checkpoint each time the low watermark moves: after a crash only the pages
    // that were in flight run again.
    // A fetch that fails with a connection error or a server restarting is tried again under
    // the run's outage policy, the source paused meanwhile.
    let commit_each_page = CursorOptions::new()
        .commit_every(Duration::ZERO)
        .transient_if(is_transient);
    let mut source = Pipeline::from_cursor_with(checkpoints, "items", commit_each_page, fetch);
    let keys = if args.exactly_once {
        // A restarted worker of the same name takes back the keys it held when it died.
        let keys = PgStore::from_pool(pool.clone(), PgOptions::new())
            .await?
            .scope("pg_cursor")
            .holder("pg_cursor");
        source = source.idempotent(keys.clone(), |row| row.0).into_pipeline();
        Some(keys)
    } else {
        None
    };
    if let Some(rate) = args.rate {
        source = source
            .map_async("pace", |row| async move { row })
            .rate_limit(Rate::per_second(rate))
            .into_pipeline();
    }
    let mut rows = source
        .batch(BATCH, Duration::from_millis(5))
        .try_map_async("effect", move |batch: Vec<(i64, String)>| {
            let (pool, keys) = (pool.clone(), keys.clone());
            async move {
                let ids: Vec<i64> = batch.iter().map(|r| r.0).collect();
                let insert = "INSERT INTO processed_rows (id) SELECT unnest($1::bigint[])";
                match keys {
                    // The effect and the keys: one transaction, both or neither.
                    Some(keys) => {
                        let names: Vec<String> = ids.iter().map(i64::to_string).collect();
                        match keys
                            .commit_with(&names, async |tx| tx.execute(insert, &[&ids]).await)
                            .await
                        {
                            Ok(_) => {}
                            // An earlier attempt wrote it; its answer was lost with its
                            // connection.
                            Err(e) if e.is::<AlreadyCommitted>() => {}
                            Err(e) => return Err(e),
                        }
                    }
                    None => {
                        pool.get().await?.execute(insert, &[&ids]).await?;
                    }
                }
                Ok::<usize, BoxError>(ids.len())
            }
        })
        .workers(4)
        .unordered()
        // A dropped connection, a restart or a server stopped for a while pauses the job
        // (no new batch starts, one probe at a time) and the batch is tried again when the
        // server answers, for as long as the run's outage policy waits (by default 5
        // minutes): never a failed row. Any other error fails the batch at once.
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
            eprintln!("pg_cursor: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(report) => {
            println!("{report}");
            match unfinished(&report) {
                None => std::process::ExitCode::SUCCESS,
                Some(why) => {
                    eprintln!("pg_cursor: {why}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("pg_cursor: {}", flowline::error_chain(&*e));
            std::process::ExitCode::FAILURE
        }
    }
}
