//! The shared limits against a real redis-server (each test starts its own).

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowline::prelude::*;
use flowline::{Limit, Rate};
use flowline_redis::test_server::RedisServer as Server;
use flowline_redis::{RateGrant, RedisInflight, RedisRate};
use tokio::time::Instant;

/// The most starts within any half-open window `[t, t + period)`, `t` at a start.
fn max_in_period(times: &[Duration], period: Duration) -> usize {
    let mut t = times.to_vec();
    t.sort();
    let (mut best, mut j) = (0, 0);
    for i in 0..t.len() {
        while j < t.len() && t[j] < t[i] + period {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

/// When each of `n` acquires returned, since the first.
async fn times<F: std::future::Future<Output = ()>>(
    n: usize,
    mut acquire: impl FnMut() -> F,
) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut t0 = None;
    for _ in 0..n {
        acquire().await;
        let t = *t0.get_or_insert_with(Instant::now);
        out.push(t.elapsed());
    }
    out
}

/// The same sequence through the local `Rate` and through a `RedisRate`: the same schedule
/// (never early, late by no more than a loaded machine's wake-up) and the same sliding bound.
async fn same_as_local(count: u64, burst: u64, n: usize, name: &str) {
    let server = Server::start(false);
    let local = Rate::per_second(count).burst(burst);
    let shared = RedisRate::per_second(&server.client(), name, count).burst(burst);
    let l = times(n, || async {
        local.acquire().await.unwrap();
    })
    .await;
    let r = times(n, || async {
        shared.acquire().await.unwrap();
    })
    .await;
    let interval = Duration::from_secs(1) / count as u32;
    for (k, (l, r)) in l.iter().zip(&r).enumerate() {
        // The ideal: the first `burst` at once, then one per interval.
        let ideal = interval * (k as u32).saturating_sub(burst as u32 - 1);
        for (what, t) in [("local", l), ("redis", r)] {
            assert!(
                *t + Duration::from_millis(2) >= ideal && *t <= ideal + Duration::from_millis(100),
                "{what} start {k} at {t:?}, ideal {ideal:?}\nlocal {l:?}\nredis {r:?}"
            );
        }
    }
    let cap = (count + burst - 1) as usize;
    assert_eq!(max_in_period(&l, Duration::from_secs(1)), cap);
    assert_eq!(max_in_period(&r, Duration::from_secs(1)), cap);
}

#[tokio::test]
async fn without_a_burst_the_shared_rate_spaces_calls_like_the_local_one() {
    same_as_local(20, 1, 41, "no-burst").await;
}

#[tokio::test]
async fn with_a_burst_b_pass_at_once_then_the_rate_like_the_local_one() {
    same_as_local(10, 4, 25, "burst").await;
}

#[tokio::test]
async fn an_idle_shared_rate_does_not_bank_a_burst() {
    let server = Server::start(false);
    let rate = RedisRate::per_second(&server.client(), "idle", 20);
    rate.acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    rate.acquire().await.unwrap();
    rate.acquire().await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(48),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_flushed_script_is_loaded_again() {
    let server = Server::start(false);
    let rate = RedisRate::per_second(&server.client(), "flush", 1000);
    rate.acquire().await.unwrap();
    let mut con = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .unwrap();
    rate.acquire().await.unwrap();
    let inflight = RedisInflight::new(&server.client(), "flush", 1);
    drop(inflight.acquire().await.unwrap());
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut con)
        .await
        .unwrap();
    drop(inflight.acquire().await.unwrap());
}

#[tokio::test]
async fn a_wrong_type_at_the_key_is_an_error_then_the_stage_waits_for_it_to_be_fixed() {
    let server = Server::start(false);
    let mut con = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("flowline:{typed}:rate")
        .arg("x")
        .query_async(&mut con)
        .await
        .unwrap();
    let rate = RedisRate::per_second(&server.client(), "typed", 1000);
    let err = rate.acquire().await.unwrap_err().to_string();
    assert!(err.contains("WRONGTYPE"), "{err}");
    let made = Arc::new(AtomicUsize::new(0));
    let m = made.clone();
    let run = tokio::spawn(async move {
        Pipeline::from_iter(0..5u32)
            .map_async("api", move |x| {
                m.fetch_add(1, SeqCst);
                async move { x }
            })
            .limit(rate)
            .run()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(made.load(SeqCst), 0);
    let _: () = redis::cmd("DEL")
        .arg("flowline:{typed}:rate")
        .query_async(&mut con)
        .await
        .unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.delivered(), report.failures), (5, 0));
}

#[tokio::test]
async fn while_redis_is_down_no_call_starts_and_no_item_is_lost() {
    let mut server = Server::start(false);
    let client = server.client();
    server.kill();
    let made = Arc::new(AtomicUsize::new(0));
    let m = made.clone();
    let run = tokio::spawn(async move {
        Pipeline::from_iter(0..20u32)
            .map_async("api", move |x| {
                m.fetch_add(1, SeqCst);
                async move { x }
            })
            .workers(4)
            .limit(RedisRate::per_second(&client, "down", 1000))
            .limit(RedisInflight::new(&client, "down", 2))
            .run()
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(made.load(SeqCst), 0);
    server.restart();
    let report = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run resumes once Redis is back")
        .unwrap()
        .unwrap();
    assert_eq!((report.delivered(), report.failures), (20, 0));
    assert!(report.is_balanced());
}

#[tokio::test]
async fn a_bad_setting_fails_the_run_before_it_starts() {
    let server = Server::start(false);
    let err = Pipeline::from_iter(0..3u32)
        .map_async("api", |x| async move { x })
        .limit(RedisRate::per_second(&server.client(), "api", 0))
        .limit(RedisInflight::new(&server.client(), "{db}", 2))
        .run()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: stage `api`: redis_rate = 0 per 1s: count must be at least 1; \
         stage `api`: key = \"{db}\": must not contain `{` or `}`: the name is the hash tag of the limit's keys"
    );
}

#[tokio::test]
async fn a_shared_inflight_bound_holds_across_handles_and_every_permit_comes_back() {
    let server = Server::start(false);
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let call = {
        let (now, peak) = (now.clone(), peak.clone());
        move |x: u32| {
            let (now, peak) = (now.clone(), peak.clone());
            async move {
                peak.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                now.fetch_sub(1, SeqCst);
                x
            }
        }
    };
    // Two handles on two connections: two processes, as far as Redis can tell.
    let (a, b) = (
        RedisInflight::new(&server.client(), "db", 3),
        RedisInflight::new(&server.client(), "db", 3),
    );
    let ra = Pipeline::from_iter(0..30u32)
        .map_async("a", call.clone())
        .workers(8)
        .limit(a.clone())
        .run();
    let rb = Pipeline::from_iter(0..30u32)
        .map_async("b", call)
        .workers(8)
        .limit(b.clone())
        .run();
    let (ra, rb) = tokio::join!(ra, rb);
    assert_eq!(ra.unwrap().delivered() + rb.unwrap().delivered(), 60);
    assert_eq!(peak.load(SeqCst), 3);
    assert_eq!((a.held_here(), b.held_here()), (0, 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut con = server
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let left: i64 = redis::cmd("ZCARD")
        .arg("flowline:{db}:inflight")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_dead_holders_permits_come_back_after_the_lease_and_not_before() {
    let server = Server::start(false);
    let url = server.url();
    // A "process" that takes both permits and dies: its runtime (and its renewals) stop,
    // its permits are never given back.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = redis::Client::open(url).unwrap();
            let dead = RedisInflight::new(&c, "lease", 2).lease(Duration::from_secs(1));
            std::mem::forget(dead.acquire().await.unwrap());
            std::mem::forget(dead.acquire().await.unwrap());
        });
    })
    .join()
    .unwrap();
    let t0 = Instant::now();
    let live = RedisInflight::new(&server.client(), "lease", 2).lease(Duration::from_secs(1));
    let early = tokio::time::timeout(Duration::from_millis(800), live.acquire()).await;
    assert!(early.is_err(), "a permit came back before its lease ended");
    let _p = live.acquire().await.unwrap();
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_millis(900) && at <= Duration::from_millis(1300),
        "{at:?}"
    );
}

#[tokio::test]
async fn a_live_holder_keeps_its_permits_past_the_lease() {
    let server = Server::start(false);
    let holder = RedisInflight::new(&server.client(), "live", 2).lease(Duration::from_millis(300));
    let other = RedisInflight::new(&server.client(), "live", 2).lease(Duration::from_millis(300));
    let held = [
        holder.acquire().await.unwrap(),
        holder.acquire().await.unwrap(),
    ];
    // Four leases long: renewed every 100 ms, never lost.
    let stolen = tokio::time::timeout(Duration::from_millis(1200), other.acquire()).await;
    assert!(stolen.is_err(), "a live holder's permit was taken");
    drop(held);
    let t = Instant::now();
    let _p = other.acquire().await.unwrap();
    assert!(
        t.elapsed() <= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}

/// Microseconds on the machine's clock: one clock for every process of the test.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// A `RedisRate` that records when the server granted each call (the instant the rate
/// counts it at), as a stage uses it.
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

/// Run as a child process by `three_processes_share_one_rate`: a pipeline through the shared
/// rate for the given time; each grant's server time and each call's start on the machine's
/// clock written to the given file. Does nothing in an ordinary test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_child() {
    let Ok(spec) = std::env::var("FLOWLINE_RATE_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split(' ').collect();
    let (url, rate, secs, out) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse::<f64>().unwrap(),
        parts[3],
    );
    let (grants, starts) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let s = starts.clone();
    let client = redis::Client::open(url).unwrap();
    let handle = Pipeline::from_iter(0u64..)
        .map_async("call", move |x| {
            s.lock().unwrap().push(wall_us());
            async move { x }
        })
        .workers(4)
        .limit(Stamped(
            RedisRate::per_second(&client, "shared", rate),
            grants.clone(),
        ))
        .spawn();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    handle.cancel();
    let _ = handle.join().await;
    let line = |v: &Vec<u64>| v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    let text = format!(
        "{}\n{}\n",
        line(&grants.lock().unwrap()),
        line(&starts.lock().unwrap())
    );
    std::fs::write(out, text).unwrap();
}

#[tokio::test]
async fn three_processes_share_one_rate() {
    let server = Server::start(false);
    let dir = tempfile::tempdir().unwrap();
    let (rate, secs) = (1000u64, 3.0);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|k| {
            let out = dir.path().join(format!("starts{k}"));
            let spec = format!("{} {rate} {secs} {}", server.url(), out.display());
            let child = tokio::process::Command::new(&exe)
                .args(["rate_child", "--exact", "--nocapture"])
                .env("FLOWLINE_RATE_CHILD", spec)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let (mut grants, mut starts) = (Vec::new(), Vec::new());
    let (mut from, mut to) = (0u64, u64::MAX);
    for (mut child, out) in children {
        assert!(child.wait().await.unwrap().success());
        let text = std::fs::read_to_string(out).unwrap();
        let mut lines = text.lines().map(|l| {
            l.split(' ')
                .filter(|w| !w.is_empty())
                .map(|w| w.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        });
        let (mine, started) = (lines.next().unwrap(), lines.next().unwrap());
        assert!(mine.len() > 100, "a child was granted {} calls", mine.len());
        assert!(
            started.len() >= mine.len() - 4,
            "every grant but those cancelled starts a call"
        );
        from = from.max(mine[0]);
        to = to.min(*mine.last().unwrap());
        grants.extend(mine);
        starts.extend(started);
    }
    // The rate achieved while all three ran, and the sliding bound over the whole run, on
    // the server's clock (the one the rate counts on).
    let together = grants.iter().filter(|&&t| t >= from && t < to).count() as f64;
    let achieved = together / ((to - from) as f64 / 1e6);
    let error_pct = (achieved - rate as f64).abs() / rate as f64 * 100.0;
    let us = |v: &[u64]| {
        v.iter()
            .map(|&t| Duration::from_micros(t))
            .collect::<Vec<_>>()
    };
    let max = max_in_period(&us(&grants), Duration::from_secs(1));
    // On the machine's clock, the calls' starts: one reply (and any stall) after their grants.
    let max_starts = max_in_period(&us(&starts), Duration::from_secs(1));
    assert!(
        max <= rate as usize,
        "{max} grants in one second ({max_starts} starts)"
    );
    assert!(
        error_pct <= 2.0,
        "achieved {achieved:.1}/s with 3 processes"
    );
    eprintln!("achieved {achieved:.1}/s, at most {max} grants and {max_starts} starts in a second");
}
