//! `scale` suite, `redis_rate3`: three processes share one `RedisRate` of 1,000/s for 5 s
//! through their own redis-server. `flowline` is the total rate achieved while all three
//! ran, `baseline` the rate asked for; `error_pct` is how far apart they are (≤ 2) and
//! `max_in_period` the most calls started in any sliding second (≤ 1,000), every start
//! stamped on the machine's clock, which the three processes share.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowline::prelude::*;
use flowline_redis::RedisRate;

use crate::redis_server::Server;
use crate::util::emit;

const RATE: u64 = 1_000;
const SECS: f64 = 5.0;

/// Runs the case (the only one of this file).
pub fn run(case: Option<&str>) {
    if case.is_none_or(|c| c == "redis_rate3") {
        redis_rate3();
    }
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One of the three processes: `--rate-child URL OUT`. Writes each call's start to `OUT`.
pub fn child(url: &str, out: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let starts = Arc::new(Mutex::new(Vec::new()));
    let s = starts.clone();
    rt.block_on(async move {
        let client = redis::Client::open(url).expect("redis url");
        let handle = Pipeline::from_iter(0u64..)
            .map_async("call", move |x| {
                s.lock().unwrap().push(wall_us());
                async move { x }
            })
            .workers(4)
            .limit(RedisRate::per_second(&client, "bench", RATE))
            .spawn();
        tokio::time::sleep(Duration::from_secs_f64(SECS)).await;
        handle.cancel();
        let _ = handle.join().await;
    });
    let text: Vec<String> = starts.lock().unwrap().iter().map(u64::to_string).collect();
    std::fs::write(out, text.join("\n")).expect("write starts");
}

/// The most starts within any half-open second, a window starting at a start.
fn max_in_period(t: &mut [u64], period_us: u64) -> usize {
    t.sort_unstable();
    let (mut best, mut j) = (0, 0);
    for i in 0..t.len() {
        while j < t.len() && t[j] < t[i] + period_us {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

fn redis_rate3() {
    let server = Server::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let exe = std::env::current_exe().expect("own path");
    let children: Vec<_> = (0..3)
        .map(|k| {
            let out = dir.path().join(format!("starts{k}"));
            let child = Command::new(&exe)
                .arg("--rate-child")
                .arg(server.url())
                .arg(&out)
                .spawn()
                .expect("child");
            (child, out)
        })
        .collect();
    let (mut all, mut from, mut to) = (Vec::new(), 0u64, u64::MAX);
    for (mut child, out) in children {
        assert!(child.wait().expect("child ran").success());
        let mine: Vec<u64> = std::fs::read_to_string(out)
            .expect("starts")
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        from = from.max(mine.first().copied().unwrap_or(0));
        to = to.min(mine.last().copied().unwrap_or(0));
        all.extend(mine);
    }
    let together = all.iter().filter(|&&t| t >= from && t < to).count() as f64;
    let achieved = together / (to.saturating_sub(from).max(1) as f64 / 1e6);
    let error_pct = (achieved - RATE as f64).abs() / RATE as f64 * 100.0;
    let max = max_in_period(&mut all, 1_000_000);
    emit(
        "scale",
        "redis_rate3",
        achieved,
        RATE as f64,
        "calls/s",
        serde_json::json!({
            "error_pct": (error_pct * 100.0).round() / 100.0,
            "max_in_period": max,
            "calls": all.len(),
            "overlap_s": (to.saturating_sub(from)) as f64 / 1e6,
        }),
    );
}
