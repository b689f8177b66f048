//! Suite `scale`: past one machine, on a `redis-server` the bench starts itself (free
//! loopback port, temporary folder, killed at the end).
//!
//! - `redis_source`: 100,000 entries (`FLOWLINE_BENCH_REDIS_ENTRIES`) through
//!   `RedisStream` → a trivial stage → acknowledgement, against a hand-written
//!   `XREADGROUP`/`XACK` loop with the same batch size (500), alternating, median of each;
//!   entries/s, ratio = flowline time / loop time.
//! - `redis_kill`: 3 worker processes (this binary again, `--scale-worker`) share 20,000
//!   entries of 2 ms work each, 16 in flight per worker; one is SIGKILLed after a second.
//!   Each effect is written with its idempotency key in one script
//!   (`RedisStore::commit_with`, behind an idempotent stage keyed by entry id). Fields:
//!   `lost` (entries whose effect is missing), `duplicates` (runs of the work past the
//!   first: entries the killed worker had started and not committed), `duplicate_effects`
//!   (effects applied past the first: 0 expected), `reclaim_s` (from the kill to the first
//!   of its entries run elsewhere; `min_idle` is 2 s), and the run's wall time as
//!   `flowline` (no baseline).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStore, RedisStream, StreamEntry, StreamOptions};
use redis::AsyncCommands;

use crate::util::{alternate, emit, ns_per_item, runtime};

const BATCH: usize = 500;
const REPS: usize = 5;

pub fn run(case: Option<&str>) {
    match case {
        None => {
            redis_source();
            crate::scale_rate::run(None);
            redis_kill();
        }
        Some("redis_source") => redis_source(),
        Some("redis_rate3") => crate::scale_rate::run(case),
        Some("redis_kill") => redis_kill(),
        Some(other) => {
            eprintln!("unknown case `{other}`; cases: redis_source, redis_rate3, redis_kill");
            std::process::exit(2);
        }
    }
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn fill(url: &str, stream: &str, n: u64) {
    let mut c = conn(url).await;
    for start in (0..n).step_by(5000) {
        let mut p = redis::pipe();
        for i in start..(start + 5000).min(n) {
            p.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("job")
                .arg(i)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.expect("fill");
    }
}

fn redis_source() {
    let n: u64 = std::env::var("FLOWLINE_BENCH_REDIS_ENTRIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let server = RedisServer::start(false);
    let url = server.url();
    let rt = runtime();
    let round = std::cell::Cell::new(0);
    let next = || {
        round.set(round.get() + 1);
        let stream = format!("s{}", round.get());
        rt.block_on(fill(&url, &stream, n));
        stream
    };
    let (f, b) = alternate(
        REPS,
        || {
            let stream = next();
            let start = Instant::now();
            let report = rt.block_on(async {
                let opts = StreamOptions::new()
                    .batch(BATCH)
                    .block(Duration::from_millis(10))
                    .stop_when_drained(true);
                RedisStream::new(&url, &stream, "g", "c", opts)
                    .expect("options")
                    .pipeline()
                    .map(|e| e.id().len())
                    .run()
                    .await
                    .expect("run")
            });
            assert_eq!(report.delivered(), n);
            start.elapsed()
        },
        || {
            let stream = next();
            let start = Instant::now();
            let got = rt.block_on(hand_loop(&url, &stream));
            assert_eq!(got, n);
            start.elapsed()
        },
    );
    emit(
        "scale",
        "redis_source",
        ns_per_item(f, n),
        ns_per_item(b, n),
        "ns/entry",
        serde_json::json!({ "entries": n, "batch": BATCH, "goal_ratio": 1.3 }),
    );
}

/// The hand-written consumer: read a batch, touch each entry, acknowledge the batch.
async fn hand_loop(url: &str, stream: &str) -> u64 {
    let mut c = conn(url).await;
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await;
    let mut done = 0u64;
    loop {
        let opts = redis::streams::StreamReadOptions::default()
            .group("g", "c")
            .count(BATCH)
            .block(10);
        let reply: redis::streams::StreamReadReply = c
            .xread_options(&[stream], &[">"], &opts)
            .await
            .expect("read");
        let ids: Vec<String> = reply
            .keys
            .into_iter()
            .flat_map(|k| k.ids)
            .map(|e| {
                std::hint::black_box(e.id.len());
                e.id
            })
            .collect();
        if ids.is_empty() {
            return done;
        }
        done += ids.len() as u64;
        let _: i64 = c.xack(stream, "g", &ids).await.expect("ack");
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

const KILL_ENTRIES: u64 = 20_000;
const MIN_IDLE: Duration = Duration::from_secs(2);

fn job(e: &StreamEntry) -> u64 {
    e.get_str("job").and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// One worker process of `redis_kill`: `--scale-worker URL NAME`.
pub fn worker(args: &[String]) {
    let (url, name) = (args[0].clone(), args[1].clone());
    let rt = runtime();
    rt.block_on(async move {
        let effects = conn(&url).await;
        let opts = StreamOptions::new()
            .batch(100)
            .block(Duration::from_millis(50))
            .min_idle(MIN_IDLE)
            .stop_when_drained(true);
        let store = RedisStore::open(&url)
            .expect("url")
            .scope("jobs")
            .holder(&name);
        let commits = store.clone();
        RedisStream::new(&url, "jobs", "g", &name, opts)
            .expect("options")
            .pipeline()
            // A dead worker's reservations expire before its entries are reclaimed.
            .idempotent(store, |e| e.id().to_string())
            .ttl(MIN_IDLE / 2)
            .try_map_async("work", move |e| {
                let mut c = effects.clone();
                let store = commits.clone();
                async move {
                    let job = job(&e);
                    let mut p = redis::pipe();
                    p.hincr("runs", job, 1).ignore();
                    if e.deliveries() > 1 {
                        p.cmd("SET")
                            .arg("first_reclaim")
                            .arg(unix_ms())
                            .arg("NX")
                            .ignore();
                    }
                    p.query_async::<()>(&mut c).await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let mut effect = redis::pipe();
                    effect.hincr("effects", job, 1);
                    store.commit_with(&[e.id().to_string()], &effect).await
                }
            })
            .workers(16)
            .run()
            .await
            .expect("worker run");
    });
}

fn redis_kill() {
    let server = RedisServer::start(false);
    let url = server.url();
    let rt = runtime();
    rt.block_on(fill(&url, "jobs", KILL_ENTRIES));
    let start = Instant::now();
    let mut kids = crate::util::spawn_workers("--scale-worker", &url);
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = unix_ms();
    kids[1].kill().expect("SIGKILL");
    let _ = kids[1].wait();
    for (i, k) in kids.iter_mut().enumerate() {
        if i != 1 {
            assert!(k.wait().expect("wait").success(), "a worker failed");
        }
    }
    let wall = start.elapsed();
    let (lost, dup, reclaim_ms) = rt.block_on(async {
        let mut c = conn(&url).await;
        let effects: std::collections::HashMap<u64, u64> =
            c.hgetall("effects").await.expect("effects");
        let runs: std::collections::HashMap<u64, u64> = c.hgetall("runs").await.expect("runs");
        let lost = (0..KILL_ENTRIES)
            .filter(|j| !effects.contains_key(j))
            .count();
        let past_first = |m: &std::collections::HashMap<u64, u64>| -> u64 {
            m.values().map(|n| n.saturating_sub(1)).sum()
        };
        let first: Option<i64> = c.get("first_reclaim").await.expect("first_reclaim");
        (
            lost,
            (past_first(&runs), past_first(&effects)),
            first.map(|t| t - killed_at),
        )
    });
    let (dup, dup_effects) = dup;
    emit(
        "scale",
        "redis_kill",
        wall.as_secs_f64(),
        f64::NAN,
        "s",
        serde_json::json!({
            "lost": lost,
            "duplicates": dup,
            "duplicate_effects": dup_effects,
            "reclaim_s": reclaim_ms.map(|ms| ms as f64 / 1000.0),
            "min_idle_s": MIN_IDLE.as_secs_f64(),
            "entries": KILL_ENTRIES,
        }),
    );
}
