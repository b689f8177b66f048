//! Three worker processes share 20,000 jobs on one stream while the Redis server around
//! them fails: its connections killed every 2 s, the server killed and restarted, the
//! server frozen (`SIGSTOP`) for 5 s. Each job's effect is written with its idempotency
//! key in one script (`RedisStore::commit_with`). Every scenario asserts that no job is
//! lost, none is dead-lettered, no effect is applied twice, and that the workers finish by
//! themselves (exit 0, nothing left pending) with no rerun. The workers are this test
//! binary run again (`fault_worker_child`, which does nothing unless
//! `FLOWLINE_REDIS_FAULT_WORKER` is set).

mod support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStore, RedisStream, StreamOptions};
use redis::AsyncCommands;

const N: u64 = 20_000;
const MIN_IDLE: Duration = Duration::from_secs(2);
/// Longest a scenario may take before its workers count as hung.
const DEADLINE: Duration = Duration::from_secs(120);

/// The scenarios run one at a time: three of them at once on a small machine would starve
/// each other's workers, which is another test (`workers.rs`).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A worker: 8 jobs at once, 10 ms of work each (a run of some 10 s, so that the faults
/// fall in its middle), each reserved by its key (the entry id), its effect (a count
/// per job in `effects`) applied together with the key's commit. Exits non-zero when the
/// run failed or any item failed.
#[test]
fn fault_worker_child() {
    let Ok(spec) = std::env::var("FLOWLINE_REDIS_FAULT_WORKER") else {
        return;
    };
    let (url, name) = spec.split_once(' ').unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = StreamOptions::new()
            .batch(100)
            .block(Duration::from_millis(100))
            .min_idle(MIN_IDLE)
            .stop_when_drained(true);
        let store = RedisStore::open(url).unwrap().scope("jobs").holder(name);
        let effects = store.clone();
        let report = RedisStream::new(url, "jobs", "g", name, opts)
            .unwrap()
            .pipeline()
            .idempotent(store, |e| e.id().to_string())
            .ttl(MIN_IDLE / 2)
            .try_map_async("work", move |e| {
                let store = effects.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let job: u64 = e.get_str("job").unwrap_or("0").parse().unwrap_or(0);
                    let mut effect = redis::pipe();
                    effect.hincr("effects", job, 1);
                    store.commit_with(&[e.id().to_string()], &effect).await
                }
            })
            .workers(8)
            .run()
            .await;
        match report {
            Ok(r) => assert_eq!(r.failures, 0, "{name}: items failed: {r}"),
            Err(e) => panic!("{name}: {e}"),
        }
    });
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    support::conn(url).await
}

async fn fill(url: &str) {
    let mut c = conn(url).await;
    for start in (0..N).step_by(5000) {
        let mut p = redis::pipe();
        for i in start..(start + 5000).min(N) {
            p.cmd("XADD")
                .arg("jobs")
                .arg("*")
                .arg("job")
                .arg(i)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.unwrap();
    }
}

fn spawn_workers(url: &str) -> Vec<Child> {
    let exe = std::env::current_exe().unwrap();
    ["w1", "w2", "w3"]
        .iter()
        .map(|name| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "fault_worker_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("FLOWLINE_REDIS_FAULT_WORKER", format!("{url} {name}"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Effects applied so far, or `None` while the server does not answer within 200 ms.
async fn progress(url: &str) -> Option<u64> {
    let ask = async {
        let mut c = redis::Client::open(url)
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        c.hlen::<_, u64>("effects").await.ok()
    };
    tokio::time::timeout(Duration::from_millis(200), ask)
        .await
        .ok()
        .flatten()
}

async fn wait_for_progress(url: &str, n: u64) {
    let t = Instant::now();
    while progress(url).await.unwrap_or(0) < n {
        assert!(t.elapsed() < DEADLINE, "no progress before the fault");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every worker to end by itself (killing them all past the deadline), then
/// checks the outcome.
async fn finish(url: &str, mut kids: Vec<Child>, started: Instant) {
    let mut codes = vec![None; kids.len()];
    while codes.iter().any(Option::is_none) {
        for (k, code) in kids.iter_mut().zip(codes.iter_mut()) {
            if code.is_none() {
                *code = k.try_wait().unwrap().map(|s| s.code());
            }
        }
        if started.elapsed() > DEADLINE {
            for k in &mut kids {
                let _ = k.kill();
                let _ = k.wait();
            }
            panic!("the workers did not finish by themselves: {codes:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the workers finished in {:.1?}", started.elapsed());
    let mut c = conn(url).await;
    let effects: HashMap<u64, u64> = c.hgetall("effects").await.unwrap();
    let lost: Vec<u64> = (0..N).filter(|j| !effects.contains_key(j)).collect();
    let repeated: Vec<(&u64, &u64)> = effects.iter().filter(|(_, n)| **n != 1).collect();
    let dead: usize = c.xlen("jobs:dead").await.unwrap();
    let v: redis::Value = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    let redis::Value::Array(p) = v else {
        panic!("{v:?}")
    };
    let pending: i64 = redis::from_redis_value(p[0].clone()).unwrap();
    assert!(
        lost.is_empty(),
        "lost {} jobs: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert_eq!(dead, 0, "jobs were dead-lettered");
    assert!(
        repeated.is_empty(),
        "{} effects applied more than once: {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(20)]
    );
    assert_eq!(pending, 0, "entries left pending");
    assert_eq!(
        codes,
        vec![Some(Some(0)); 3],
        "a worker failed (exit codes)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_every_two_seconds_lose_and_repeat_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url).await;
    let started = Instant::now();
    let mut kids = spawn_workers(&url);
    wait_for_progress(&url, 1000).await;
    let mut kills = 0;
    for _ in 0..5 {
        // The test's own connection is spared (`SKIPME yes` is the default).
        let mut c = conn(&url).await;
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut c)
            .await
            .unwrap();
        kills += n;
        eprintln!("{:.1?}: killed {n} connections", started.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        if kids.iter_mut().all(|k| k.try_wait().unwrap().is_some()) {
            break;
        }
    }
    assert!(kills >= 3, "the kills found no connection: {kills}");
    finish(&url, kids, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_and_repeats_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut server = RedisServer::start(true);
    let url = server.url();
    fill(&url).await;
    let started = Instant::now();
    let kids = spawn_workers(&url);
    wait_for_progress(&url, 4000).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.restart();
    finish(&url, kids, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_frozen_for_five_seconds_loses_and_repeats_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url).await;
    let started = Instant::now();
    let kids = spawn_workers(&url);
    wait_for_progress(&url, 4000).await;
    server.freeze();
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.thaw();
    finish(&url, kids, started).await;
}
