//! Keyed concurrency over the stream source, against a real `redis-server` of each test's own
//! (free loopback port, killed at the end): within one consumer, the entries of one key run
//! one at a time and in stream order, while other keys go on — also while the server's
//! connections are killed mid-run.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStream, StreamEntry, StreamOptions};
use support::conn;

const KEYS: u64 = 8;

/// `n` entries: `job` i, `key` i mod [`KEYS`].
async fn fill(url: &str, n: u64) {
    let mut c = conn(url).await;
    let mut p = redis::pipe();
    for i in 0..n {
        p.cmd("XADD")
            .arg("s")
            .arg("*")
            .arg("job")
            .arg(i)
            .arg("key")
            .arg(i % KEYS)
            .ignore();
    }
    p.query_async::<()>(&mut c).await.unwrap();
}

fn field(e: &StreamEntry, name: &str) -> u64 {
    e.get_str(name).unwrap().parse().unwrap()
}

/// What the calls saw: each start and end as (key, job) in the order they happened, and the
/// most calls of one key in flight at once.
#[derive(Default)]
struct Log {
    starts: Vec<(u64, u64)>,
    ends: Vec<(u64, u64)>,
    running: HashMap<u64, usize>,
    most_per_key: usize,
}

/// Runs the stream through a keyed stage of 16 workers whose calls take 0–7 ms (drawn from
/// the job's number, so keys overtake one another), while `meanwhile` runs beside it.
async fn run_keyed<F: std::future::Future<Output = ()>>(url: &str, meanwhile: F) -> (Report, Log) {
    let log: Arc<Mutex<Log>> = Arc::default();
    let l = log.clone();
    let opts = StreamOptions::new()
        .batch(64)
        .block(Duration::from_millis(50))
        .min_idle(Duration::from_secs(30))
        .stop_when_drained(true);
    let h = RedisStream::new(url, "s", "g", "c1", opts)
        .unwrap()
        .pipeline()
        .map_async("work", move |e: StreamEntry| {
            let l = l.clone();
            async move {
                let (key, job) = (field(&e, "key"), field(&e, "job"));
                {
                    let mut g = l.lock().unwrap();
                    g.starts.push((key, job));
                    let r = g.running.entry(key).or_default();
                    *r += 1;
                    let r = *r;
                    g.most_per_key = g.most_per_key.max(r);
                }
                let ms = job.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let mut g = l.lock().unwrap();
                *g.running.get_mut(&key).unwrap() -= 1;
                g.ends.push((key, job));
            }
        })
        .workers(16)
        .unordered()
        .key_by(|e: &StreamEntry| field(e, "key"))
        .spawn();
    meanwhile.await;
    let report = tokio::time::timeout(Duration::from_secs(60), h.join())
        .await
        .expect("the run did not end")
        .unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    (report, log)
}

/// Each key's jobs, in the order of `events`.
fn per_key(events: &[(u64, u64)]) -> HashMap<u64, Vec<u64>> {
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    for (k, j) in events {
        m.entry(*k).or_default().push(*j);
    }
    m
}

/// Every key's jobs started and ended once each, in stream order (job numbers rising), one
/// at a time; every entry acknowledged.
async fn assert_stream_order_per_key(url: &str, n: u64, report: &Report, log: &Log) {
    for (what, events) in [("starts", &log.starts), ("ends", &log.ends)] {
        let keys = per_key(events);
        assert_eq!(keys.len() as u64, KEYS, "{what}");
        for (k, jobs) in keys {
            let want: Vec<u64> = (0..n).filter(|j| j % KEYS == k).collect();
            assert_eq!(jobs, want, "{what} of key {k}");
        }
    }
    assert_eq!(log.most_per_key, 1, "two calls of one key ran at once");
    assert_eq!(report.stage("work").unwrap().passed, n);
    let mut c = conn(url).await;
    let pending: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg("s")
        .arg("g")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "entries left unacknowledged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_entries_run_one_at_a_time_in_stream_order() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, 800).await;
    let (report, log) = run_keyed(&url, async {}).await;
    assert_stream_order_per_key(&url, 800, &report, &log).await;
    // Keys overtook one another: the ends are not in stream order overall, so the order
    // above is the keyed stage's doing, not the source's.
    let all: Vec<u64> = log.ends.iter().map(|e| e.1).collect();
    assert!(
        all.windows(2).any(|w| w[0] > w[1]),
        "no key overtook another"
    );
    assert!(report.stage("work").unwrap().key_waits > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_keep_each_keys_order_and_lose_nothing() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, 3000).await;
    let kill_url = url.clone();
    let (report, log) = run_keyed(&url, async move {
        let mut killed = 0;
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            // The test's own connection is spared (`SKIPME yes` is the default).
            let mut c = conn(&kill_url).await;
            killed += redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .query_async::<i64>(&mut c)
                .await
                .unwrap();
        }
        assert!(killed >= 1, "the kills found no connection of the run");
    })
    .await;
    assert_stream_order_per_key(&url, 3000, &report, &log).await;
}
