//! Several worker processes sharing one job through a Redis stream.
//!
//! The server is named by `--url` or `REDIS_URL` (default `redis://127.0.0.1:6379/`):
//!
//! ```text
//! cargo run -p flowline-redis --example redis_workers -- --fill 10000
//! cargo run -p flowline-redis --example redis_workers -- --worker w1 &
//! cargo run -p flowline-redis --example redis_workers -- --worker w2 &
//! cargo run -p flowline-redis --example redis_workers -- --worker w3 &
//! kill -9 %2          # w2 dies mid-run: its entries are reclaimed after min_idle
//! wait
//! cargo run -p flowline-redis --example redis_workers -- --check
//! ```
//!
//! A worker reads the stream `jobs` in the group `workers`, "works" for `--work-ms` per job
//! (default 5), records the job in the hash `effects` (count per job) and exits when the job
//! is drained. `--check` prints how many jobs ran, how many were lost (never ran) and how many
//! ran more than once (only the jobs a killed worker had in flight). With `--idempotent` on
//! every worker, each job's effect is written together with its idempotency key, in one
//! script (`RedisStore::commit_with`), and a job whose key is done is skipped: `--check`
//! then reports 0 duplicates, a worker killed or not.
//!
//! Redis failing around the workers (connections killed, the server restarted or frozen)
//! is weather, not a failure: the source, its acknowledgements and the stores wait for the
//! server and go on (`StreamOptions::outage`, `RedisStore::outage`); the effect's own
//! connection is a `ConnectionManager` (it reconnects), and an effect that fails because
//! Redis could not answer (`flowline_redis::is_transient`) is tried again while the stage
//! holds new items back (retry with `pause_source`, and a breaker that pauses). A worker
//! exits 1 when any item failed or was left unfinished, with the error as one paragraph;
//! `--check` exits 1 when a job was lost or dead-lettered.

use std::time::Duration;

use flowline::RunOutcome;
use flowline::prelude::*;
use flowline_redis::{RedisStore, RedisStream, StreamOptions};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    // Errors are printed with `Display`: one readable paragraph, not a dump of the report.
    match run().await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("redis_workers: {e}");
            std::process::exit(1);
        }
    }
}

async fn run() -> Result<i32, BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = arg(&args, "--url")
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url.as_str())?;
    if let Some(n) = arg(&args, "--fill") {
        let mut c = client.get_multiplexed_async_connection().await?;
        let n: u64 = n.parse()?;
        let _: () = redis::pipe()
            .del("jobs")
            .ignore()
            .del("jobs:dead")
            .ignore()
            .del("effects")
            .ignore()
            .del("flowline:{jobs}:idempotency")
            .ignore()
            .query_async(&mut c)
            .await?;
        for start in (0..n).step_by(1000) {
            let mut p = redis::pipe();
            for i in start..(start + 1000).min(n) {
                p.cmd("XADD")
                    .arg("jobs")
                    .arg("*")
                    .arg("job")
                    .arg(i)
                    .ignore();
            }
            p.query_async::<()>(&mut c).await?;
        }
        let _: () = c.set("jobs:total", n).await?;
        println!("filled `jobs` with {n} entries");
        return Ok(0);
    }
    if args.iter().any(|a| a == "--check") {
        let mut c = client.get_multiplexed_async_connection().await?;
        let total: u64 = c.get("jobs:total").await?;
        let effects: std::collections::HashMap<u64, u64> = c.hgetall("effects").await?;
        let dead: u64 = c.xlen("jobs:dead").await?;
        let lost = (0..total).filter(|j| !effects.contains_key(j)).count();
        let dup: u64 = effects.values().map(|n| n.saturating_sub(1)).sum();
        println!(
            "jobs {total}, ran {}, lost {lost}, duplicates {dup}, dead letters {dead}",
            effects.len()
        );
        return Ok(if lost > 0 || dead > 0 { 1 } else { 0 });
    }
    let Some(name) = arg(&args, "--worker") else {
        eprintln!(
            "usage: redis_workers [--url URL] (--fill N | --worker NAME [--work-ms MS] [--min-idle-ms MS] [--idempotent] | --check)"
        );
        return Ok(2);
    };
    let work = Duration::from_millis(arg(&args, "--work-ms").map_or(Ok(5), |s| s.parse())?);
    let min_idle =
        Duration::from_millis(arg(&args, "--min-idle-ms").map_or(Ok(2000), |s| s.parse())?);
    let opts = StreamOptions::new()
        .min_idle(min_idle)
        .block(Duration::from_millis(100))
        .stop_when_drained(true);
    let source = RedisStream::new(&url, "jobs", "workers", &name, opts)?;
    let job = |e: &flowline_redis::StreamEntry| -> u64 {
        e.get_str("job")
            .and_then(|s| s.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let result = if args.iter().any(|a| a == "--idempotent") {
        // Reservations must expire before a dead worker's entries are reclaimed. The store
        // rides out Redis being down by itself, `commit_with` included.
        let store = RedisStore::open(&url)?.scope("jobs").holder(&name);
        let commits = store.clone();
        source
            .pipeline()
            .idempotent(store, |e| e.id().to_string())
            .ttl(min_idle / 2)
            .try_map_async("work", move |e| {
                let store = commits.clone();
                async move {
                    tokio::time::sleep(work).await;
                    let mut effect = redis::pipe();
                    effect.hincr("effects", job(&e), 1);
                    store.commit_with(&[e.id().to_string()], &effect).await
                }
            })
            .workers(16)
            .run()
            .await
    } else {
        // The effect's connection reconnects by itself after a drop.
        let effects = ConnectionManager::new(client.clone()).await?;
        // An effect Redis could not take is tried again, with no new item started
        // meanwhile, for as long as the run's outage policy would wait (5 minutes); an
        // error of the command itself fails the item at once.
        let retry = Retry::exponential(Duration::from_millis(50))
            .max_delay(Duration::from_secs(1))
            .jitter()
            .max_attempts(u32::MAX)
            .max_elapsed(flowline::Outage::DEFAULT_LIMIT)
            .retry_if(flowline_redis::is_transient)
            .pause_source();
        let breaker = Breaker::consecutive_failures(5)
            .cooldown(Duration::from_millis(500))
            .counts(flowline_redis::is_transient);
        source
            .pipeline()
            .try_map_async("work", move |e| {
                let mut c = effects.clone();
                async move {
                    tokio::time::sleep(work).await;
                    let _: i64 = c.hincr("effects", job(&e), 1).await?;
                    Ok::<_, redis::RedisError>(())
                }
            })
            .workers(16)
            .retry(retry)
            .circuit_breaker(breaker)
            .run()
            .await
    };
    match result {
        Ok(report) if report.failures == 0 && report.outcome == RunOutcome::Completed => {
            println!("{name}: {report}");
            Ok(0)
        }
        Ok(report) => {
            eprintln!(
                "{name}: {} items failed, run {}; they are in the dead-letter stream `jobs:dead`",
                report.failures, report.outcome
            );
            println!("{name}: {report}");
            Ok(1)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            Ok(1)
        }
    }
}
