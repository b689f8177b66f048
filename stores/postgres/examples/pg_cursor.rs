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
//!   cargo run -p flowline-postgres --example pg_cursor -- [--url URL] [--rows N] [--stop-after N] [--exactly-once]
//! ```
//!
//! - `--url`: the server (default: `FLOWLINE_PG_URL`).
//! - `--rows`: rows to put in `items` if it is empty (default 100000).
//! - `--stop-after`: stop gracefully after this many rows, as Ctrl-C does.
//! - `--exactly-once`: rows pass `idempotent` first, and each batch's effect (rows in
//!   `processed_rows`) is written in one transaction with the rows' idempotency keys
//!   (`PgStore::commit_with`): a killed and restarted run then writes every row's effect
//!   exactly once. Without it, a kill may write the effects of the rows in flight twice.

use std::time::Duration;

use flowline::prelude::*;
use flowline::{CursorOptions, Page};
use flowline_postgres::{PgCheckpoints, PgOptions, PgStore};
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
}

impl Args {
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let usage = "usage: pg_cursor [--url URL] [--rows N] [--stop-after N] [--exactly-once]";
        let mut url = std::env::var("FLOWLINE_PG_URL").ok();
        let (mut rows, mut stop_after, mut exactly_once) = (100_000i64, None, false);
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

/// One page of rows after `after`.
async fn fetch_page(
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
    let commit_each_page = CursorOptions::new().commit_every(Duration::ZERO);
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
                        keys.commit_with(&names, async |tx| tx.execute(insert, &[&ids]).await)
                            .await?;
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
        // A dropped connection fails one attempt, not the rows.
        .retry(Retry::exponential(Duration::from_millis(50)).max_attempts(5))
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
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(&args)?;
    let report = run(args).await?;
    println!("{report}");
    Ok(())
}
