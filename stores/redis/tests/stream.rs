//! The stream source against a real `redis-server` of each test's own (free loopback port,
//! temporary folder, killed at the end): acknowledgement only after completion, cancelled
//! entries pending, resume from the own pending entries, dead letters, leases and reclaim,
//! and a server restart mid-run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStream, StreamEntry, StreamOptions, StreamSink};
use redis::AsyncCommands;

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn fill(url: &str, stream: &str, n: usize) {
    let mut c = conn(url).await;
    let mut p = redis::pipe();
    for i in 0..n {
        p.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("job")
            .arg(i)
            .ignore();
    }
    p.query_async::<()>(&mut c).await.unwrap();
}

/// Pending entries of the group: total, and per consumer (none before the group exists).
async fn pending(url: &str, stream: &str) -> (i64, HashMap<String, i64>) {
    let mut c = conn(url).await;
    let v: redis::Value = match redis::cmd("XPENDING")
        .arg(stream)
        .arg("g")
        .query_async(&mut c)
        .await
    {
        Ok(v) => v,
        Err(e) if e.code() == Some("NOGROUP") => return (0, HashMap::new()),
        Err(e) => panic!("XPENDING: {e}"),
    };
    let redis::Value::Array(parts) = v else {
        panic!("{v:?}")
    };
    let total: i64 = redis::from_redis_value(parts[0].clone()).unwrap();
    let mut per = HashMap::new();
    if let redis::Value::Array(cs) = &parts[3] {
        for c in cs {
            let (name, n): (String, String) = redis::from_redis_value(c.clone()).unwrap();
            per.insert(name, n.parse().unwrap());
        }
    }
    (total, per)
}

fn job(e: &StreamEntry) -> u64 {
    e.get_str("job").unwrap().parse().unwrap()
}

fn opts() -> StreamOptions {
    StreamOptions::new()
        .block(Duration::from_millis(50))
        .min_idle(Duration::from_millis(600))
        .stop_when_drained(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_acknowledged_only_after_their_items_finish() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 50).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let src = RedisStream::new(&url, "s", "g", "c1", opts()).unwrap();
    let h = src
        .pipeline()
        .map_async("work", move |e| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                job(&e)
            }
        })
        .workers(8)
        .spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (total, _) = pending(&url, "s").await;
    assert_eq!(total, 50, "acknowledged before finishing");
    gate.add_permits(10);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pending(&url, "s").await.0,
        40,
        "finished items not acknowledged"
    );
    gate.add_permits(1000);
    let report = h.join().await.unwrap();
    assert_eq!(report.delivered(), 50);
    assert_eq!(pending(&url, "s").await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_items_stay_pending_and_a_restart_resumes_them() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 100).await;
    let seen: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let run = |seen: Arc<Mutex<Vec<(u64, u64)>>>, stuck: bool| {
        RedisStream::new(&url, "s", "g", "c1", opts().batch(20).reclaim(false))
            .unwrap()
            .pipeline()
            .map_async("work", move |e| {
                let seen = seen.clone();
                async move {
                    if stuck && job(&e) >= 10 {
                        std::future::pending::<()>().await;
                    }
                    seen.lock().unwrap().push((job(&e), e.deliveries()));
                }
            })
            .workers(4)
    };
    let h = run(seen.clone(), true).spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.cancel();
    let _ = h.join().await;
    let (total, per) = pending(&url, "s").await;
    assert_eq!(seen.lock().unwrap().len(), 10);
    assert!(total > 0, "cancelled entries were acknowledged");
    assert_eq!(per.get("c1"), Some(&total));

    let report = run(seen.clone(), false).run().await.unwrap();
    assert_eq!(report.delivered(), 90);
    let seen = seen.lock().unwrap().clone();
    let mut jobs: Vec<u64> = seen.iter().map(|s| s.0).collect();
    jobs.sort_unstable();
    assert_eq!(jobs, (0..100).collect::<Vec<_>>(), "lost or repeated");
    // The first ones re-read came from the own pending entries: delivered twice.
    let again = seen.iter().filter(|s| s.1 == 2).count() as i64;
    assert_eq!(again, total);
    assert_eq!(pending(&url, "s").await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_poison_entries_end_in_the_dead_letter_stream() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 10).await;
    let o = || opts().max_deliveries(2).reclaim(false);
    // Job 3 fails; job 7 hangs (the run is cancelled with it) two lives in a row; its
    // third delivery is one too many.
    for life in 0..2 {
        let h = RedisStream::new(&url, "s", "g", "c1", o())
            .unwrap()
            .pipeline()
            .try_map_async("work", |e| async move {
                match job(&e) {
                    3 => Err("three fails"),
                    7 => std::future::pending().await,
                    j => Ok(j),
                }
            })
            .workers(4)
            .unordered()
            .spawn();
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.cancel();
        let _ = h.join().await;
        let (total, _) = pending(&url, "s").await;
        assert_eq!(
            total, 1,
            "life {life}: only the hanging entry stays pending"
        );
    }
    let report = RedisStream::new(&url, "s", "g", "c1", o())
        .unwrap()
        .pipeline()
        .run()
        .await
        .unwrap();
    assert_eq!(report.delivered(), 0);
    assert_eq!(pending(&url, "s").await.0, 0);
    let mut c = conn(&url).await;
    let dead: Vec<(String, HashMap<String, String>)> = c
        .xrange_all("s:dead")
        .await
        .map(|r: redis::streams::StreamRangeReply| {
            r.ids
                .into_iter()
                .map(|e| {
                    let m = e
                        .map
                        .into_iter()
                        .map(|(k, v)| (k, redis::from_redis_value(v).unwrap()))
                        .collect();
                    (e.id, m)
                })
                .collect()
        })
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let (_, failed) = &dead[0];
    assert_eq!(failed["job"], "3");
    assert_eq!(failed["flowline.reason"], "failed");
    assert_eq!(failed["flowline.deliveries"], "1");
    let (_, poison) = &dead[1];
    assert_eq!(poison["job"], "7");
    assert_eq!(poison["flowline.reason"], "max_deliveries");
    assert_eq!(poison["flowline.deliveries"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_item_is_kept_by_its_live_owner_and_taken_from_a_dead_one() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 1).await;
    let min_idle = Duration::from_millis(300);
    let o = || {
        StreamOptions::new()
            .block(Duration::from_millis(50))
            .min_idle(min_idle)
    };
    let b_seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let b = |seen: Arc<Mutex<Vec<u64>>>| {
        RedisStream::new(&url, "s", "g", "b", o())
            .unwrap()
            .pipeline()
            .inspect(move |e| seen.lock().unwrap().push(e.deliveries()))
            .spawn()
    };
    // A holds the only entry for 5 × min_idle while B, reclaiming, runs beside it.
    let a = RedisStream::new(&url, "s", "g", "a", o().stop_when_drained(true))
        .unwrap()
        .pipeline()
        .map_async("long", move |e| async move {
            tokio::time::sleep(min_idle * 5).await;
            e.deliveries()
        })
        .collect();
    let a = tokio::spawn(a.into_future());
    while pending(&url, "s").await.1.get("a") != Some(&1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let live_b = b(b_seen.clone());
    let a_out = tokio::time::timeout(min_idle * 20, a)
        .await
        .expect("A hung")
        .unwrap()
        .unwrap();
    assert_eq!(a_out, vec![1], "A's entry was delivered again");
    assert!(
        b_seen.lock().unwrap().is_empty(),
        "stolen from a live owner"
    );
    assert_eq!(pending(&url, "s").await.0, 0);
    live_b.cancel();
    let _ = live_b.join().await;

    // Now A dies with a new entry in flight (cancelled: its lease is no longer renewed).
    fill(&url, "s", 1).await;
    let dead_a = RedisStream::new(&url, "s", "g", "a", o().reclaim(false))
        .unwrap()
        .pipeline()
        .map_async("hang", |_e| std::future::pending::<()>())
        .spawn();
    while pending(&url, "s").await.1.get("a") != Some(&1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    dead_a.cancel();
    let _ = dead_a.join().await;
    let t = std::time::Instant::now();
    let new_b = b(b_seen.clone());
    while b_seen.lock().unwrap().is_empty() {
        assert!(
            t.elapsed() < min_idle * 10,
            "a dead owner's entry was never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*b_seen.lock().unwrap(), vec![2]);
    new_b.cancel();
    let _ = new_b.join().await;
    assert_eq!(pending(&url, "s").await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_nothing() {
    let mut server = RedisServer::start(true);
    let url = server.url();
    fill(&url, "s", 2000).await;
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let s2 = seen.clone();
    let h = RedisStream::new(&url, "s", "g", "c1", opts().batch(50))
        .unwrap()
        .pipeline()
        .map_async("work", move |e| {
            let s = s2.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                s.lock().unwrap().push(job(&e));
            }
        })
        .workers(8)
        .spawn();
    while seen.lock().unwrap().len() < 300 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.restart();
    let report = tokio::time::timeout(Duration::from_secs(60), h.join())
        .await
        .expect("the run did not finish after the restart")
        .unwrap();
    let mut jobs = seen.lock().unwrap().clone();
    jobs.sort_unstable();
    jobs.dedup();
    assert_eq!(jobs, (0..2000).collect::<Vec<_>>(), "lost entries");
    assert!(report.delivered() >= 2000);
    assert_eq!(pending(&url, "s").await.0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_type_at_the_key_is_a_clear_error() {
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let _: () = c.set("s", "a string").await.unwrap();
    let err = RedisStream::new(&url, "s", "g", "c1", opts())
        .unwrap()
        .pipeline()
        .run()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("WRONGTYPE") && text.contains("`s`"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_stream_chains_two_pipelines() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "in", 300).await;
    let sink = StreamSink::new(&url, "out", |e: &StreamEntry| {
        vec![("double".to_string(), (job(e) * 2).to_string().into_bytes())]
    })
    .unwrap()
    .max_len(100_000)
    .unwrap();
    let (written, _) = RedisStream::new(&url, "in", "g", "c1", opts())
        .unwrap()
        .pipeline()
        .into_sink(sink)
        .await
        .unwrap();
    assert_eq!(written, 300);
    let mut c = conn(&url).await;
    let n: usize = c.xlen("out").await.unwrap();
    assert_eq!(n, 300);
    assert_eq!(pending(&url, "in").await.0, 0);
}
