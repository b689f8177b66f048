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

use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::{RedisStore, RedisStream, StreamOptions};
use redis::AsyncCommands;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = arg(&args, "--url")
        .or_else(|| std::env::var("REDIS_URL").ok())
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let client = redis::Client::open(url.as_str())?;
    let mut c = client.get_multiplexed_async_connection().await?;
    if let Some(n) = arg(&args, "--fill") {
        let n: u64 = n.parse()?;
        let _: () = redis::pipe()
            .del("jobs")
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
        return Ok(());
    }
    if args.iter().any(|a| a == "--check") {
        let total: u64 = c.get("jobs:total").await?;
        let effects: std::collections::HashMap<u64, u64> = c.hgetall("effects").await?;
        let lost = (0..total).filter(|j| !effects.contains_key(j)).count();
        let dup: u64 = effects.values().map(|n| n.saturating_sub(1)).sum();
        println!(
            "jobs {total}, ran {}, lost {lost}, duplicates {dup}",
            effects.len()
        );
        return Ok(());
    }
    let Some(name) = arg(&args, "--worker") else {
        eprintln!(
            "usage: redis_workers [--url URL] (--fill N | --worker NAME [--work-ms MS] [--min-idle-ms MS] [--idempotent] | --check)"
        );
        std::process::exit(2);
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
    let effects = client.get_multiplexed_async_connection().await?;
    let report = if args.iter().any(|a| a == "--idempotent") {
        // Reservations must expire before a dead worker's entries are reclaimed.
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
            .await?
    } else {
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
            .run()
            .await?
    };
    println!("{name}: {report}");
    Ok(())
}
