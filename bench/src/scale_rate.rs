//! `scale` suite, `redis_rate3`: three processes share one `RedisRate` of 1,000/s for 5 s
//! through their own redis-server. `flowline` is the total rate achieved while all three
//! ran, `baseline` the rate asked for; `error_pct` is how far apart they are (≤ 2) and
//! `max_in_period` the most grants in any sliding second (≤ 1,000), on the server's clock
//! (the one the rate counts on); `max_starts_in_period` is the same for the calls' starts,
//! stamped on the machine's clock, which the three processes share (one reply, and any
//! stall of the process, after their grants).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowline::prelude::*;
use flowline_redis::{RateGrant, RedisRate};

use crate::util::emit;
use flowline_redis::test_server::RedisServer as Server;

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

/// A `RedisRate` that records when the server granted each call.
#[derive(Debug)]
struct Stamped(RedisRate, Arc<Mutex<Vec<u64>>>);

impl Limit for Stamped {
    type Permit = RateGrant;
    fn acquire(
        &self,
    ) -> impl std::future::Future<Output = Result<RateGrant, BoxError>> + Send + 'static {
        let (grant, log) = (self.0.acquire(), self.1.clone());
        async move {
            let g = grant.await?;
            log.lock().unwrap().push(g.server_time().as_micros() as u64);
            Ok(g)
        }
    }
}

/// One of the three processes: `--rate-child URL OUT`. Writes its grants (server's clock)
/// and its calls' starts (machine's clock) to `OUT`, one line each.
pub fn child(url: &str, out: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let starts = Arc::new(Mutex::new(Vec::new()));
    let grants = Arc::new(Mutex::new(Vec::new()));
    let (s, g) = (starts.clone(), grants.clone());
    rt.block_on(async move {
        let client = redis::Client::open(url).expect("redis url");
        let handle = Pipeline::from_iter(0u64..)
            .map_async("call", move |x| {
                s.lock().unwrap().push(wall_us());
                async move { x }
            })
            .workers(4)
            .limit(Stamped(RedisRate::per_second(&client, "bench", RATE), g))
            .spawn();
        tokio::time::sleep(Duration::from_secs_f64(SECS)).await;
        handle.cancel();
        let _ = handle.join().await;
    });
    let line = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    let text = format!(
        "{}\n{}\n",
        line(&grants.lock().unwrap()),
        line(&starts.lock().unwrap())
    );
    std::fs::write(out, text).expect("write starts");
}

/// The most starts within any half-open second, a window starting at a start.
fn max_in_period(t: &mut [u64], period_us: u64) -> usize {
    crate::util::most_within(t, period_us)
}

fn redis_rate3() {
    let server = Server::start(false);
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
    let (mut all, mut starts, mut from, mut to) = (Vec::new(), Vec::new(), 0u64, u64::MAX);
    for (mut child, out) in children {
        assert!(child.wait().expect("child ran").success());
        let text = std::fs::read_to_string(out).expect("starts");
        let mut lines = text.lines().map(|l| {
            l.split(' ')
                .filter_map(|w| w.parse().ok())
                .collect::<Vec<u64>>()
        });
        let mine = lines.next().unwrap_or_default();
        from = from.max(mine.first().copied().unwrap_or(0));
        to = to.min(mine.last().copied().unwrap_or(0));
        all.extend(mine);
        starts.extend(lines.next().unwrap_or_default());
    }
    let together = all.iter().filter(|&&t| t >= from && t < to).count() as f64;
    let achieved = together / (to.saturating_sub(from).max(1) as f64 / 1e6);
    let error_pct = (achieved - RATE as f64).abs() / RATE as f64 * 100.0;
    let max = max_in_period(&mut all, 1_000_000);
    let max_starts = max_in_period(&mut starts, 1_000_000);
    emit(
        "scale",
        "redis_rate3",
        achieved,
        RATE as f64,
        "calls/s",
        serde_json::json!({
            "error_pct": (error_pct * 100.0).round() / 100.0,
            "max_in_period": max,
            "max_starts_in_period": max_starts,
            "calls": all.len(),
            "overlap_s": (to.saturating_sub(from)) as f64 / 1e6,
        }),
    );
}
