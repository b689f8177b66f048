//! Suite `faults`, Redis scenarios: 3 worker processes (this binary again,
//! `--faults-redis-worker`) share 20,000 jobs of 10 ms work each, 8 at once per worker, on
//! a `redis-server` the bench starts itself (free loopback port, temporary folder). Each
//! job's effect is written with its idempotency key in one script
//! (`RedisStore::commit_with`, behind an idempotent stage keyed by entry id). Scenarios:
//!
//! - `redis_kill`: `CLIENT KILL TYPE normal` every 2 s, five times;
//! - `redis_restart`: the server SIGKILLed and started again 0.4 s later (AOF, fsync always);
//! - `redis_freeze`: the server stopped (`SIGSTOP`) for 5 s, then continued.
//!
//! Fields: `lost` (jobs whose effect is missing), `dead_letters` (entries in the dead-letter
//! stream), `duplicate_effects` (effects applied past the first), `recovery_s` (from the
//! server being back — the kill itself for `redis_kill`, the worst of its five — to the start
//! of the first 0.5 s window whose throughput is at least 90 % of the 1 s before the fault;
//! throughput is the count of effects, sampled every 50 ms), `flowline` (the run's wall time,
//! s), `baseline` (the same run with no fault on a server set up alike — with the AOF for
//! `redis_restart` —, once per suite run) and `ratio`; `workers_ok` (every worker exited 0).

use std::collections::HashMap;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStore, RedisStream, StreamOptions};
use redis::AsyncCommands;

use crate::util::{emit, round3, runtime};

const JOBS: u64 = 20_000;
const MIN_IDLE: Duration = Duration::from_secs(2);
const WORK: Duration = Duration::from_millis(10);
const SAMPLE: Duration = Duration::from_millis(50);

/// Runs the Redis scenarios whose names start with `case` (all for `None`; `redis` for
/// every Redis one); a case of another server's file is left to it.
pub fn run(case: Option<&str>) {
    let cases = ["redis_kill", "redis_restart", "redis_freeze"];
    let chosen: Vec<&str> = cases
        .into_iter()
        .filter(|c| case.is_none_or(|w| c.starts_with(w)))
        .collect();
    if chosen.is_empty() {
        return;
    }
    // The same run with no fault, on a server set up alike (a restart needs the AOF, whose
    // fsync on every write slows the whole run).
    let mut baselines: HashMap<bool, f64> = HashMap::new();
    for c in chosen {
        let fault = match c {
            "redis_kill" => Fault::Kill,
            "redis_restart" => Fault::Restart,
            _ => Fault::Freeze,
        };
        let aof = fault == Fault::Restart;
        let baseline = *baselines
            .entry(aof)
            .or_insert_with(|| scenario(Fault::None, aof).wall);
        let o = scenario(fault, aof);
        emit(
            "faults",
            c,
            o.wall,
            baseline,
            "s",
            serde_json::json!({
                "lost": o.lost,
                "dead_letters": o.dead,
                "duplicate_effects": o.dup,
                "recovery_s": o.recovery.map(round3),
                "workers_ok": o.workers_ok,
                "aof": aof,
                "jobs": JOBS,
            }),
        );
    }
}

/// One worker process: `--faults-redis-worker URL NAME`. Exits non-zero when its run failed
/// or an item failed.
pub fn worker(args: &[String]) {
    let (url, name) = (args[0].clone(), args[1].clone());
    let rt = runtime();
    let ok = rt.block_on(async move {
        let opts = StreamOptions::new()
            .batch(100)
            .block(Duration::from_millis(100))
            .min_idle(MIN_IDLE)
            .stop_when_drained(true);
        let store = RedisStore::open(&url)
            .expect("url")
            .scope("jobs")
            .holder(&name);
        let commits = store.clone();
        let result = RedisStream::new(&url, "jobs", "g", &name, opts)
            .expect("options")
            .pipeline()
            .idempotent(store, |e| e.id().to_string())
            .ttl(MIN_IDLE / 2)
            .try_map_async("work", move |e| {
                let store = commits.clone();
                async move {
                    tokio::time::sleep(WORK).await;
                    let job: u64 = e.get_str("job").and_then(|s| s.parse().ok()).unwrap_or(0);
                    let mut effect = redis::pipe();
                    effect.hincr("effects", job, 1);
                    store.commit_with(&[e.id().to_string()], &effect).await
                }
            })
            .workers(8)
            .run()
            .await;
        match result {
            Ok(r) if r.failures == 0 => true,
            Ok(r) => {
                eprintln!("{name}: {} items failed", r.failures);
                false
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                false
            }
        }
    });
    std::process::exit(if ok { 0 } else { 1 });
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Kill,
    Restart,
    Freeze,
}

struct Outcome {
    wall: f64,
    lost: usize,
    dead: u64,
    dup: u64,
    recovery: Option<f64>,
    workers_ok: bool,
}

async fn fill(url: &str) {
    let mut c = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    for start in (0..JOBS).step_by(5000) {
        let mut p = redis::pipe();
        for i in start..(start + 5000).min(JOBS) {
            p.cmd("XADD")
                .arg("jobs")
                .arg("*")
                .arg("job")
                .arg(i)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.expect("fill");
    }
}

/// Effects applied so far, or `None` while the server does not answer within 100 ms.
async fn effects_now(client: &redis::Client) -> Option<u64> {
    let ask = async {
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        c.hlen::<_, u64>("effects").await.ok()
    };
    tokio::time::timeout(Duration::from_millis(100), ask)
        .await
        .ok()
        .flatten()
}

type Samples = Arc<Mutex<Vec<(Instant, u64)>>>;

fn scenario(fault: Fault, aof: bool) -> Outcome {
    let mut server = RedisServer::start(aof);
    let url = server.url();
    let client = server.client();
    let rt = runtime();
    rt.block_on(fill(&url));
    let start = Instant::now();
    let mut kids: Vec<Child> = crate::util::spawn_workers("--faults-redis-worker", &url);
    let samples: Samples = Arc::default();
    let sampling = {
        let (samples, client) = (samples.clone(), client.clone());
        rt.spawn(async move {
            loop {
                let t = Instant::now();
                if let Some(n) = effects_now(&client).await {
                    samples.lock().expect("samples").push((t, n));
                }
                tokio::time::sleep(SAMPLE.saturating_sub(t.elapsed())).await;
            }
        })
    };
    // Until `n` effects are in; the bench stops (workers killed) if every worker has exited
    // before that or a minute has passed: a fault injected then would measure nothing.
    let mut wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while samples.lock().expect("samples").last().map_or(0, |s| s.1) < n {
            let all_exited = kids.iter_mut().all(|k| matches!(k.try_wait(), Ok(Some(_))));
            if all_exited || Instant::now() > deadline {
                for k in &mut kids {
                    let _ = k.kill();
                    let _ = k.wait();
                }
                panic!("{n} effects not reached (workers exited: {all_exited}); no fault injected");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // (when the fault began, when the server was back)
    let mut faults: Vec<(Instant, Instant)> = Vec::new();
    match fault {
        Fault::None => {}
        Fault::Kill => {
            wait_for(2000);
            for _ in 0..5 {
                let at = Instant::now();
                rt.block_on(async {
                    let mut c = client
                        .get_multiplexed_async_connection()
                        .await
                        .expect("connect");
                    let _: i64 = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("normal")
                        .query_async(&mut c)
                        .await
                        .expect("CLIENT KILL");
                });
                faults.push((at, at));
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Fault::Restart => {
            wait_for(5000);
            let at = Instant::now();
            server.kill();
            std::thread::sleep(Duration::from_millis(400));
            server.restart();
            faults.push((at, Instant::now()));
        }
        Fault::Freeze => {
            wait_for(5000);
            let at = Instant::now();
            server.freeze();
            std::thread::sleep(Duration::from_secs(5));
            server.thaw();
            faults.push((at, Instant::now()));
        }
    }
    // Every worker is waited for, a failed one or not.
    let exits: Vec<bool> = kids
        .iter_mut()
        .map(|k| k.wait().expect("wait").success())
        .collect();
    let workers_ok = exits.iter().all(|ok| *ok);
    let wall = start.elapsed().as_secs_f64();
    sampling.abort();
    let samples = samples.lock().expect("samples").clone();
    let recovery = faults
        .iter()
        .map(|(at, back)| recovery_s(&samples, *at, *back))
        .try_fold(0.0f64, |worst, r| r.map(|r| worst.max(r)));
    let (lost, dead, dup) = rt.block_on(async {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let effects: HashMap<u64, u64> = c.hgetall("effects").await.expect("effects");
        let dead: u64 = c.xlen("jobs:dead").await.expect("dead letters");
        let lost = (0..JOBS).filter(|j| !effects.contains_key(j)).count();
        let dup: u64 = effects.values().map(|n| n.saturating_sub(1)).sum();
        (lost, dead, dup)
    });
    Outcome {
        wall,
        lost,
        dead,
        dup,
        recovery: if fault == Fault::None { None } else { recovery },
        workers_ok,
    }
}

/// Effects per second between two instants, from the samples around them.
fn rate(samples: &[(Instant, u64)], from: Instant, to: Instant) -> Option<f64> {
    let at = |t: Instant| samples.iter().rev().find(|s| s.0 <= t).copied();
    let (a, b) = (at(from)?, at(to)?);
    let dt = b.0.saturating_duration_since(a.0).as_secs_f64();
    (dt > 0.0).then(|| (b.1 - a.1) as f64 / dt)
}

/// From `back` to the first 0.5 s window (stepped by a sample) holding 90 % of the rate
/// of the second before `at`; `None` when it never does (the run ended first).
fn recovery_s(samples: &[(Instant, u64)], at: Instant, back: Instant) -> Option<f64> {
    let before = rate(samples, at.checked_sub(Duration::from_secs(1))?, at)?;
    let window = Duration::from_millis(500);
    let last = samples.last()?.0;
    let mut t = back;
    while t + window <= last {
        if rate(samples, t, t + window).is_some_and(|r| r >= 0.9 * before) {
            return Some(t.saturating_duration_since(back).as_secs_f64());
        }
        t += SAMPLE;
    }
    None
}
