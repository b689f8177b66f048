//! The stream source against a real `redis-server` of each test's own (free loopback port,
//! temporary folder, killed at the end): acknowledgement only after completion, cancelled
//! entries pending, resume from the own pending entries, dead letters, leases and reclaim,
//! and a server restart mid-run.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStream, StreamEntry, StreamOptions, StreamSink};
use redis::AsyncCommands;
use support::conn;

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

#[test]
fn bad_names_are_refused_at_once_naming_option_and_value() {
    let opts = StreamOptions::new()
        .batch(0)
        .dead_letter_stream("{other}:dead");
    let err = RedisStream::new("nope://", "{jobs}", "", "worker 1\n", opts).unwrap_err();
    let flowline::Error::Config { problems } = &err else {
        panic!("not a config error: {err}")
    };
    let got: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.option, p.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("batch", "0"),
            ("url", "\"nope://\""),
            ("group", "\"\""),
            ("consumer", "\"worker 1\\n\""),
            ("dead_letter_stream", "\"{other}:dead\""),
        ],
        "{err}"
    );
    assert!(problems[4].reason.contains("hash tag"), "{err}");
    for (stream, why) in [
        ("{jobs", "without a `}`"),
        ("{}jobs", "empty hash tag"),
        ("jobs\r", "spaces"),
        (&"j".repeat(1025)[..], "1024"),
    ] {
        let err = RedisStream::new("redis://127.0.0.1/", stream, "g", "c", StreamOptions::new())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stream") && err.contains(why),
            "{stream:?}: {err}"
        );
    }
    let long = "c".repeat(257);
    let err = RedisStream::new("redis://127.0.0.1/", "s", "g", &long, StreamOptions::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("consumer") && err.contains("256"), "{err}");
    // A dead-letter stream under the stream's hash tag, and untagged names, are fine.
    let tagged = StreamOptions::new().dead_letter_stream("failed:{jobs}");
    assert!(RedisStream::new("redis://127.0.0.1/", "{jobs}", "g", "c", tagged).is_ok());
    let plain = StreamOptions::new().dead_letter_stream("failed");
    assert!(RedisStream::new("redis://127.0.0.1/", "jobs", "g", "c", plain).is_ok());
    let err = StreamSink::new("redis://127.0.0.1/", "out\n", |_: &u8| {
        Vec::<(String, Vec<u8>)>::new()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("stream") && err.contains("\"out\\n\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_at_the_dead_letter_and_sink_keys_are_clear_errors() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 3).await;
    let mut c = conn(&url).await;
    let _: () = c.set("s:dead", "a string").await.unwrap();
    let err = RedisStream::new(&url, "s", "g", "c1", opts())
        .unwrap()
        .pipeline()
        .run()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dead-letter stream `s:dead` holds a string") && err.contains("`s`"),
        "{err}"
    );
    // Nothing ran, nothing was acknowledged.
    assert_eq!(pending(&url, "s").await.0, 0);
    let n: usize = c.xlen("s").await.unwrap();
    assert_eq!(n, 3);

    let _: () = c.set("out", "a string").await.unwrap();
    let sink = StreamSink::new(&url, "out", |x: &u32| {
        vec![("n".to_string(), x.to_string().into_bytes())]
    })
    .unwrap();
    let (written, report) = Pipeline::from_iter(0..10u32).into_sink(sink).await.unwrap();
    assert_eq!(written, 0);
    assert_eq!(report.delivered(), 0);
    let failures = format!("{:?}", report.failure_sample);
    assert!(failures.contains("WRONGTYPE"), "{failures}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_end_in_the_dead_letter_stream() {
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let add = |fields: Vec<(Vec<u8>, Vec<u8>)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("s").arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd
    };
    let b = |s: &str| s.as_bytes().to_vec();
    let entries = [
        vec![(b("job"), b("1"))],
        vec![(b("other"), b("x"))], // the field the stage needs is missing
        vec![(b("job"), vec![0xff, 0xfe])], // not UTF-8
        vec![(vec![0xff], b("2"))], // a field name that is not UTF-8
        vec![(b("job"), b("seven"))], // not a number
        vec![(b("job"), b("3"))],   // deleted while pending, below
    ];
    let mut ids = Vec::new();
    for e in entries {
        let id: String = add(e).query_async(&mut c).await.unwrap();
        ids.push(id);
    }
    // A first life takes every entry and hangs on them; the last one is deleted meanwhile.
    // (The entry with a field name that is not UTF-8 goes to the dead letters at once.)
    let h = RedisStream::new(&url, "s", "g", "c1", opts().reclaim(false))
        .unwrap()
        .pipeline()
        .map_async("hang", |_e| std::future::pending::<()>())
        .workers(10)
        .spawn();
    let taken = async {
        while pending(&url, "s").await.0 + c.clone().xlen::<_, i64>("s:dead").await.unwrap() < 6 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), taken)
        .await
        .expect("the first life never took every entry");
    h.cancel();
    let _ = h.join().await;
    let _: i64 = c.xdel("s", &[&ids[5]]).await.unwrap();

    let ran: Arc<Mutex<Vec<u64>>> = Arc::default();
    let r2 = ran.clone();
    let report = RedisStream::new(&url, "s", "g", "c1", opts())
        .unwrap()
        .pipeline()
        .try_map_async("parse", move |e| {
            let ran = r2.clone();
            async move {
                let text = e.get("job").ok_or("no `job` field")?;
                let text = std::str::from_utf8(text).map_err(|_| "`job` is not UTF-8")?;
                let job: u64 = text.parse().map_err(|_| "`job` is not a number")?;
                ran.lock().unwrap().push(job);
                Ok::<_, &str>(job)
            }
        })
        .run()
        .await
        .unwrap();
    assert_eq!(report.delivered(), 1);
    assert_eq!(*ran.lock().unwrap(), vec![1]);
    assert_eq!(pending(&url, "s").await.0, 0, "every entry was settled");

    let dead: redis::Value = redis::cmd("XRANGE")
        .arg("s:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    let dead: Vec<(String, Vec<Vec<u8>>)> = redis::from_redis_value(dead).unwrap();
    let mut reasons: HashMap<String, (String, Vec<Vec<u8>>)> = HashMap::new();
    for (_, flat) in dead {
        let get = |name: &str| {
            flat.chunks(2)
                .find(|kv| kv[0] == name.as_bytes())
                .map(|kv| String::from_utf8_lossy(&kv[1]).into_owned())
                .unwrap()
        };
        reasons.insert(get("flowline.id"), (get("flowline.reason"), flat.clone()));
    }
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    for (i, why) in [
        (1, "failed"),
        (2, "failed"),
        (3, "malformed"),
        (4, "failed"),
        (5, "deleted"),
    ] {
        assert_eq!(reasons[&ids[i]].0, why, "entry {i}");
    }
    // The dead letters keep the entries' bytes as they were.
    let (_, flat) = &reasons[&ids[3]];
    assert!(flat.chunks(2).any(|kv| kv[0] == [0xff] && kv[1] == b"2"));
    let (_, flat) = &reasons[&ids[2]];
    assert!(
        flat.chunks(2)
            .any(|kv| kv[0] == b"job" && kv[1] == [0xff, 0xfe])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_dead_letter_stream_holds_back_only_the_failed_entries() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 10).await;
    let c = conn(&url).await;
    let h = RedisStream::new(
        &url,
        "s",
        "g",
        "c1",
        opts().stop_when_drained(false).reclaim(false),
    )
    .unwrap()
    .pipeline()
    .try_map_async("work", move |e| {
        let mut c = c.clone();
        async move {
            if job(&e) == 3 {
                // Something else takes the dead-letter key mid-run.
                let _: () = c.set("s:dead", "a string").await.unwrap();
                return Err("three fails");
            }
            Ok(job(&e))
        }
    })
    .spawn();
    let settled = async {
        while pending(&url, "s").await.0 != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let t = tokio::time::timeout(Duration::from_secs(20), settled).await;
    h.cancel();
    let _ = h.join().await;
    assert!(
        t.is_ok(),
        "finished entries were held back with the failed one"
    );
    // The failed entry stays pending (run again later), never lost.
    let (total, per) = pending(&url, "s").await;
    assert_eq!((total, per.get("c1")), (1, Some(&1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_but_waiting_for_a_busy_pipeline_are_not_taken_over() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 200).await;
    let o = || {
        StreamOptions::new()
            .batch(40)
            .block(Duration::from_millis(50))
            .min_idle(Duration::from_millis(150))
            .stop_when_drained(true)
    };
    // 10 ms per entry, one at a time: a batch read while the pipeline is full waits for it
    // some 400 ms, far past `min_idle`, while the other consumer reclaims.
    let worker = |name: &str| {
        let run = RedisStream::new(&url, "s", "g", name, o())
            .unwrap()
            .pipeline()
            .map_async("slow", |e| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                (job(&e), e.deliveries())
            })
            .collect();
        tokio::spawn(run.into_future())
    };
    let a = worker("a");
    while pending(&url, "s").await.1.get("a").is_none_or(|n| *n <= 40) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let b = worker("b");
    let mut got = Vec::new();
    for w in [a, b] {
        let out = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a worker hung");
        got.extend(out.unwrap().unwrap());
    }
    let again: Vec<_> = got.iter().filter(|g| g.1 > 1).collect();
    assert!(
        again.is_empty(),
        "taken over from a live consumer: {again:?}"
    );
    let mut jobs: Vec<u64> = got.iter().map(|g| g.0).collect();
    jobs.sort_unstable();
    assert_eq!(jobs, (0..200).collect::<Vec<_>>());
}

/// A consumer life that "dies" (its run is cancelled, nothing acknowledged, as a SIGKILL
/// leaves it) as soon as it starts job 0; other jobs take 300 ms, so those in flight beside
/// job 0 die with it. Returns whether the run ended by itself (drained).
async fn a_life_that_dies_on_job_0(
    url: &str,
    name: &str,
    o: StreamOptions,
    done: Arc<Mutex<Vec<u64>>>,
) -> bool {
    let (dying, mut died) = tokio::sync::mpsc::unbounded_channel();
    let h = RedisStream::new(url, "s", "g", name, o)
        .unwrap()
        .pipeline()
        .map_async("work", move |e| {
            let (dying, done) = (dying.clone(), done.clone());
            async move {
                if job(&e) == 0 {
                    let _ = dying.send(());
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                done.lock().unwrap().push(job(&e));
            }
        })
        .workers(4)
        .unordered()
        .spawn();
    let cancel = h.cancellation_token();
    let joined = h.join();
    tokio::pin!(joined);
    tokio::select! {
        // `None`: the run ended and dropped the stage; `joined` tells how.
        Some(()) = died.recv() => {
            cancel.cancel();
            let _ = joined.await;
            false
        }
        r = &mut joined => {
            r.unwrap();
            true
        }
    }
}

async fn dead_letters(url: &str) -> Vec<HashMap<String, String>> {
    let mut c = conn(url).await;
    let r: redis::streams::StreamRangeReply = c.xrange_all("s:dead").await.unwrap();
    r.ids
        .into_iter()
        .map(|e| {
            e.map
                .into_iter()
                .map(|(k, v)| (k, redis::from_redis_value(v).unwrap()))
                .collect()
        })
        .collect()
}

/// Job 0 kills every consumer that runs it; jobs 1 and 2 are read with it in one batch.
/// Lives follow one another, each named by `name(life)`, until one drains the stream:
/// then job 0 alone is in the dead letters and jobs 1 and 2 ran to their end.
async fn a_poison_entry_among_two(name: impl Fn(usize) -> String, o: StreamOptions) {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 3).await;
    let done: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut lives = 0;
    while !a_life_that_dies_on_job_0(&url, &name(lives), o.clone(), done.clone()).await {
        lives += 1;
        assert!(lives < 10, "still dying after {lives} lives");
    }
    // Job 0 was delivered 4 times: the first life's read and 3 more (the last one over
    // max_deliveries goes to the dead letters without running).
    assert_eq!(lives, 3, "lives");
    let mut done = done.lock().unwrap().clone();
    done.sort_unstable();
    assert_eq!(done, [1, 2], "the innocent jobs did not run to their end");
    let dead = dead_letters(&url).await;
    let jobs: Vec<&str> = dead.iter().map(|d| d["job"].as_str()).collect();
    assert_eq!(jobs, ["0"], "{dead:?}");
    assert_eq!(dead[0]["flowline.reason"], "max_deliveries");
    assert_eq!(dead[0]["flowline.deliveries"], "4");
    assert_eq!(pending(&url, "s").await.0, 0);
}

/// Quick reads and takeovers, and an entry in the dead letters at its fourth delivery.
fn poison_opts() -> StreamOptions {
    StreamOptions::new()
        .block(Duration::from_millis(50))
        .min_idle(Duration::from_millis(100))
        .max_deliveries(3)
        .stop_when_drained(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_does_not_take_its_neighbours_to_the_dead_letters() {
    // Each life under a name of its own, as processes that die and are replaced: the
    // entries are reclaimed.
    a_poison_entry_among_two(|life| format!("c{life}"), poison_opts()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_does_not_take_its_neighbours_along_when_its_consumer_restarts() {
    // One name across lives: each re-reads its own pending entries.
    a_poison_entry_among_two(|_| "c".into(), poison_opts().reclaim(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_entries_run_side_by_side_and_suspects_run_alone() {
    let server = RedisServer::start(false);
    let url = server.url();
    fill(&url, "s", 6).await;
    // The most items of a run in its stage at once, and whether they were suspects.
    let run = |name: &str, hang: bool| {
        let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (n, m) = (now.clone(), most.clone());
        let h = RedisStream::new(&url, "s", "g", name, poison_opts())
            .unwrap()
            .pipeline()
            .map_async("work", move |e| {
                let (n, m) = (n.clone(), m.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    m.fetch_max(n.fetch_add(1, SeqCst) + 1, SeqCst);
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    n.fetch_sub(1, SeqCst);
                    e.deliveries()
                }
            })
            .workers(6)
            .unordered()
            .collect();
        (tokio::spawn(h.into_future()), most)
    };
    // A consumer takes all six fresh entries at once, then dies with them.
    let (first, most) = run("a", true);
    let t = std::time::Instant::now();
    while most.load(std::sync::atomic::Ordering::SeqCst) < 6 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "fresh entries did not run side by side"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.abort();
    let _ = first.await;
    // Its successor reclaims them: each a suspect, each run alone, each once.
    let (second, most) = run("b", false);
    let got = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("hung")
        .unwrap()
        .unwrap();
    assert_eq!(got, vec![2; 6]);
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "suspects ran side by side"
    );
    assert_eq!(pending(&url, "s").await.0, 0);
}
