//! Three worker processes on one stream, one SIGKILLed mid-run: every entry runs, none is
//! lost, and only entries the killed worker had started run twice. The workers are this test
//! binary run again (`worker_child`, which does nothing unless `FLOWLINE_REDIS_WORKER` is set).

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use flowline::prelude::*;
use flowline_redis::test_server::RedisServer;
use flowline_redis::{RedisStream, StreamOptions};
use redis::AsyncCommands;

const N: u64 = 3000;

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A worker: records each job it starts (`started:<name>`) and, after 2 ms of work, each
/// effect (`effects`, a count per job).
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
        let opts = StreamOptions::new()
            .batch(50)
            .block(Duration::from_millis(50))
            .min_idle(Duration::from_millis(500))
            .stop_when_drained(true);
        let name2 = name.to_string();
        RedisStream::new(url, "jobs", "g", name, opts)
            .unwrap()
            .pipeline()
            .map_async("work", move |e| {
                let mut c = c.clone();
                let started = format!("started:{name2}");
                async move {
                    let job: u64 = e.get_str("job").unwrap().parse().unwrap();
                    let _: () = c.rpush(&started, job).await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let _: i64 = c.hincr("effects", job, 1).await?;
                    Ok::<_, redis::RedisError>(())
                }
            })
            .workers(8)
            .run()
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_one_killed_lose_nothing() {
    let server = RedisServer::start(false);
    let url = server.url();
    let mut c = conn(&url).await;
    let mut p = redis::pipe();
    for i in 0..N {
        p.cmd("XADD")
            .arg("jobs")
            .arg("*")
            .arg("job")
            .arg(i)
            .ignore();
    }
    p.query_async::<()>(&mut c).await.unwrap();
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
        let n: usize = c.llen("started:w2").await.unwrap();
        if n >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kids[1].kill().unwrap();
    let _ = kids[1].wait();
    for (i, k) in kids.iter_mut().enumerate() {
        if i != 1 {
            assert!(k.wait().unwrap().success(), "worker {i} failed");
        }
    }
    let effects: HashMap<u64, u64> = c.hgetall("effects").await.unwrap();
    let lost: Vec<u64> = (0..N).filter(|j| !effects.contains_key(j)).collect();
    assert!(lost.is_empty(), "lost {} entries: {lost:?}", lost.len());
    let started_by_killed: HashSet<u64> = c
        .lrange::<_, Vec<u64>>("started:w2", 0, -1)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for (job, n) in &effects {
        if *n > 1 {
            assert!(
                started_by_killed.contains(job),
                "job {job} ran {n} times but the killed worker never started it"
            );
            assert_eq!(*n, 2, "job {job} ran {n} times");
        }
    }
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
