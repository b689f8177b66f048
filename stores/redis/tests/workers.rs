//! Three worker processes on one stream, one SIGKILLed mid-run, four threads spinning on
//! the CPU beside them all along: every entry runs, none is lost, only entries the killed
//! worker had been handed are delivered twice (a live worker starved of CPU keeps its
//! entries: its leases are renewed five times per `min_idle`), and every effect is applied
//! exactly once (written with its idempotency key by `RedisStore::commit_with`). The workers are this test binary run again (`worker_child`,
//! which does nothing unless `FLOWLINE_REDIS_WORKER` is set).

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStore, RedisStream, StreamOptions};
use redis::AsyncCommands;
use support::conn;

const N: u64 = 3000;

/// A worker: records each entry it is handed (`delivered:<name>`), skips the entries whose
/// key another worker already did (the idempotent stage), and for the others applies the
/// effect (`effects`, a count per job) with the key's commit in one script, then works on for
/// 20 ms: a kill then finds effects done and their items still in flight.
#[test]
fn worker_child() {
    let Ok(spec) = std::env::var("FLOWLINE_REDIS_WORKER") else {
        return;
    };
    let (url, name) = spec.split_once(' ').unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = conn(url).await;
        let min_idle = Duration::from_secs(2);
        let opts = StreamOptions::new()
            .batch(50)
            .block(Duration::from_millis(50))
            .min_idle(min_idle)
            .stop_when_drained(true);
        let store = RedisStore::open(url).unwrap().scope("jobs").holder(name);
        let effects = store.clone();
        let delivered = format!("delivered:{name}");
        RedisStream::new(url, "jobs", "g", name, opts)
            .unwrap()
            .pipeline()
            .map_async("seen", move |e| {
                let mut c = c.clone();
                let delivered = delivered.clone();
                async move {
                    let _: () = c.rpush(&delivered, job(&e)).await.unwrap();
                    e
                }
            })
            // A dead worker's reservations expire before its entries are reclaimed.
            .idempotent(store, |e| e.id().to_string())
            .ttl(min_idle / 2)
            .try_map_async("work", move |e| {
                let store = effects.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let mut effect = redis::pipe();
                    effect.hincr("effects", job(&e), 1);
                    store.commit_with(&[e.id().to_string()], &effect).await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, flowline::BoxError>(())
                }
            })
            .workers(8)
            .run()
            .await
            .unwrap();
    });
}

/// Threads that keep the CPU busy until dropped: the workers run starved, as on a loaded
/// machine.
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn spin(n: usize) -> Busy {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn job(e: &flowline_redis::StreamEntry) -> u64 {
    e.get_str("job").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_one_killed_lose_nothing_and_repeat_no_effect() {
    let _busy = Busy::spin(4);
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let mut p = redis::pipe();
    for i in 0..N {
        p.cmd("XADD").arg("jobs").arg("*").arg("job").arg(i);
    }
    let ids: Vec<String> = p.query_async(&mut c).await.unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut kids: Vec<_> = ["w1", "w2", "w3"]
        .iter()
        .map(|name| {
            Command::new(&exe)
                .args(["--exact", "worker_child", "--nocapture", "--test-threads=1"])
                .env("FLOWLINE_REDIS_WORKER", format!("{url} {name}"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // Kill w2 once it has done some work.
    loop {
        let n: usize = c.llen("delivered:w2").await.unwrap();
        if n >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kids[1].kill().unwrap();
    let _ = kids[1].wait();
    // The killed worker's in-flight window: what it was handed and had not acknowledged.
    // Nothing is reclaimed before `min_idle` (2 s) has passed.
    let window: Vec<(String, String, i64, i64)> = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(N)
        .arg("w2")
        .query_async(&mut c)
        .await
        .unwrap();
    let in_flight: HashSet<u64> = window
        .iter()
        .filter_map(|(id, ..)| ids.iter().position(|i| i == id))
        .map(|j| j as u64)
        .collect();
    assert_eq!(in_flight.len(), window.len());
    for (i, k) in kids.iter_mut().enumerate() {
        if i != 1 {
            assert!(k.wait().unwrap().success(), "worker {i} failed");
        }
    }
    let effects: HashMap<u64, u64> = c.hgetall("effects").await.unwrap();
    let lost: Vec<u64> = (0..N).filter(|j| !effects.contains_key(j)).collect();
    assert!(lost.is_empty(), "lost {} entries: {lost:?}", lost.len());
    let repeated: Vec<(&u64, &u64)> = effects.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "{} effects applied more than once: {repeated:?}",
        repeated.len()
    );

    let mut deliveries: HashMap<u64, u64> = HashMap::new();
    for name in ["w1", "w2", "w3"] {
        let jobs: Vec<u64> = c.lrange(format!("delivered:{name}"), 0, -1).await.unwrap();
        for j in jobs {
            *deliveries.entry(j).or_default() += 1;
        }
    }
    let mut again = 0;
    for (job, n) in &deliveries {
        if *n > 1 {
            again += 1;
            assert!(
                in_flight.contains(job),
                "job {job} was delivered {n} times but was not in the killed worker's window"
            );
            assert_eq!(*n, 2, "job {job} was delivered {n} times");
        }
    }
    // The kill found entries in flight: the test exercised a takeover.
    assert!(
        again > 0,
        "no entry of the killed worker was delivered again"
    );

    let dead: usize = c.xlen("jobs:dead").await.unwrap();
    assert_eq!(dead, 0, "items failed");
    let v: redis::Value = redis::cmd("XPENDING")
        .arg("jobs")
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    let redis::Value::Array(p) = v else {
        panic!("{v:?}")
    };
    let total: i64 = redis::from_redis_value(p[0].clone()).unwrap();
    assert_eq!(total, 0, "entries left pending");
}
