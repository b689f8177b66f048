//! Suite `flow`: rate-limit accuracy against governor, and the adaptive limit against static
//! worker counts on a simulated backend. Real clock.
//!
//! `cargo run --release -p flowline-bench -- flow [seconds-per-rate-case] [case-prefix]`
//! (e.g. `flow adaptive` runs `adaptive` and `adaptive_overload` only).
//!
//! The simulated backend has capacity 32: a server with 32 slots (a FIFO semaphore) where a
//! call holds a slot for its service time; calls beyond 32 wait in the queue, so latency grows
//! above capacity as queueing delay while throughput stays at the server's maximum.
//! - `adaptive`: service is 5 ms whatever the load (queue only: excess concurrency costs
//!   latency, not throughput).
//! - `adaptive_overload`: the same server with contention: each call's service time grows
//!   by 20% per 32 calls waiting in the queue when it gets its slot
//!   (`5 ms × (1 + 0.2 × queued / 32)`), as real services slow down under overload (memory,
//!   locks, context switches); here excess concurrency costs throughput too.
//!
//! Each case compares `Adaptive::vegas(1..=512).initial(4)` against a sweep of static worker
//! counts; every configuration runs `REPS` times in a rotating order and the median items/s
//! is kept. `ratio` is adaptive / the best static median; `adaptive_final_limits` is the
//! limit each adaptive run ended with. `FLOWLINE_BENCH_TRACE=1` prints the adaptive limit
//! every 20 ms to stderr.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use flowline::prelude::*;
use serde_json::json;

/// Achieved rate error (%) and the largest 10 ms window over its ideal count.
fn accuracy(times: &[Instant], target: f64) -> (f64, f64, f64) {
    let start = times[0];
    let span = times[times.len() - 1].duration_since(start).as_secs_f64();
    let achieved = (times.len() - 1) as f64 / span;
    let error_pct = (achieved - target).abs() / target * 100.0;
    let mut windows = std::collections::HashMap::<u64, u64>::new();
    for t in times {
        *windows
            .entry(t.duration_since(start).as_millis() as u64 / 10)
            .or_default() += 1;
    }
    let ideal = (target * 0.010).max(1.0);
    let max = windows.values().copied().max().unwrap_or(0) as f64;
    (achieved, error_pct, max / ideal)
}

async fn flowline_rate(rate: u64, secs: f64) -> Vec<Instant> {
    let n = (rate as f64 * secs) as u64 + 1;
    Pipeline::from_iter(0..n)
        .pace(Rate::per_second(rate))
        .map(|_| Instant::now())
        .collect()
        .await
        .expect("rate run")
}

async fn governor_rate(rate: u64, secs: f64) -> Vec<Instant> {
    use governor::{Quota, RateLimiter};
    let n = (rate as f64 * secs) as u64 + 1;
    let quota = Quota::per_second(NonZeroU32::new(rate as u32).expect("rate > 0"))
        .allow_burst(NonZeroU32::new(1).expect("1 > 0"));
    let limiter = RateLimiter::direct(quota);
    let mut times = Vec::with_capacity(n as usize);
    for _ in 0..n {
        limiter.until_ready().await;
        times.push(Instant::now());
    }
    times
}

/// The simulated server: `CAPACITY` slots, `SERVICE` per call, a FIFO queue in front.
struct Backend {
    slots: Semaphore,
    /// Calls waiting for a slot.
    queued: AtomicUsize,
    /// Service-time growth per `CAPACITY` queued calls (0 for the queue-only model).
    contention: f64,
}

const CAPACITY: usize = 32;
const SERVICE: Duration = Duration::from_millis(5);

impl Backend {
    fn new(contention: f64) -> Arc<Self> {
        Arc::new(Backend {
            slots: Semaphore::new(CAPACITY),
            queued: AtomicUsize::new(0),
            contention,
        })
    }

    async fn call(&self, x: u64) -> u64 {
        self.queued.fetch_add(1, SeqCst);
        let slot = self.slots.acquire().await.expect("never closed");
        let queued = self.queued.fetch_sub(1, SeqCst) - 1;
        let service = SERVICE.mul_f64(1.0 + self.contention * queued as f64 / CAPACITY as f64);
        tokio::time::sleep(service).await;
        drop(slot);
        x
    }
}

/// Items/s through the backend with `workers` calls at most in flight, or an adaptive limit,
/// and the adaptive limit at the end.
async fn throughput(items: u64, contention: f64, workers: Option<usize>) -> (f64, usize) {
    let backend = Backend::new(contention);
    let limit = Adaptive::vegas(1..=512).initial(4);
    let trace = std::env::var_os("FLOWLINE_BENCH_TRACE").is_some() && workers.is_none();
    let tracer = trace.then(|| {
        let l = limit.clone();
        tokio::spawn(async move {
            let mut v = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                v.push(l.limit());
                if v.len() % 25 == 0 {
                    eprintln!("limits: {v:?}");
                    v.clear();
                }
            }
        })
    });
    let stage = Pipeline::from_iter(0..items)
        .map_async("backend", move |x| {
            let b = backend.clone();
            async move { b.call(x).await }
        })
        .unordered();
    let t = Instant::now();
    let report = match workers {
        Some(n) => stage.workers(n).run().await,
        None => stage.adaptive(limit.clone()).run().await,
    }
    .expect("adaptive run");
    if let Some(t) = tracer {
        t.abort();
    }
    (
        report.delivered() as f64 / t.elapsed().as_secs_f64(),
        limit.limit(),
    )
}

/// Fewer items for small worker counts (the rate, not the count, is measured), so that every
/// run takes about 2 s.
fn items_for(workers: Option<usize>) -> u64 {
    workers.map_or(ITEMS, |w| ITEMS.min(300 * w as u64))
}

const ITEMS: u64 = 10_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Repetitions per configuration (medians are reported).
const REPS: usize = 3;
const SWEEP: [usize; 9] = [4, 16, 24, 32, 40, 48, 64, 128, 256];

async fn adaptive_case(case: &str, contention: f64) {
    // None = adaptive; each repetition starts one configuration later (warm-up and drift
    // fall on every configuration alike).
    let configs: Vec<Option<usize>> = std::iter::once(None)
        .chain(SWEEP.iter().copied().map(Some))
        .collect();
    let mut runs = vec![Vec::new(); configs.len()];
    let mut limits = Vec::new();
    for rep in 0..REPS {
        for k in 0..configs.len() {
            let i = (k + rep * 3) % configs.len();
            let (r, limit) = throughput(items_for(configs[i]), contention, configs[i]).await;
            runs[i].push(r);
            if i == 0 {
                limits.push(limit);
            }
        }
    }
    let runs: Vec<f64> = runs.into_iter().map(median).collect();
    let adaptive = runs[0];
    let mut best = (0usize, 0.0f64);
    let mut sweep = serde_json::Map::new();
    for (w, r) in SWEEP.iter().zip(&runs[1..]) {
        sweep.insert(w.to_string(), json!(r.round()));
        if *r > best.1 {
            best = (*w, *r);
        }
    }
    let of = |w: usize| runs[1 + SWEEP.iter().position(|&x| x == w).unwrap_or(0)];
    println!(
        "{}",
        json!({"suite": "flow", "case": case, "flowline": adaptive.round(), "baseline": best.1.round(),
               "unit": "items/s", "ratio": adaptive / best.1, "best_static_workers": best.0,
               "vs_static_4": adaptive / of(4), "vs_static_256": adaptive / of(256),
               "sweep": sweep, "items": ITEMS, "reps": REPS, "contention": contention,
               "adaptive_final_limits": limits})
    );
}

pub fn run(args: &[String]) {
    let secs: f64 = args.iter().find_map(|s| s.parse().ok()).unwrap_or(3.0);
    let only = args.iter().find(|s| s.parse::<f64>().is_err());
    let wanted = |case: &str| only.is_none_or(|p| case.starts_with(p.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for (case, rate) in [("rate_1k", 1_000u64), ("rate_10k", 10_000), ("rate_100k", 100_000)] {
            if !wanted(case) {
                continue;
            }
            let f = flowline_rate(rate, secs).await;
            let g = governor_rate(rate, secs).await;
            let (fa, fe, fw) = accuracy(&f, rate as f64);
            let (ga, ge, gw) = accuracy(&g, rate as f64);
            println!(
                "{}",
                json!({"suite": "flow", "case": case, "flowline": fa.round(), "baseline": ga.round(),
                       "unit": "items/s", "ratio": fa / ga, "target": rate, "seconds": secs,
                       "error_pct": fe, "window_ratio": fw,
                       "baseline_error_pct": ge, "baseline_window_ratio": gw})
            );
        }
        for (case, contention) in [("adaptive", 0.0), ("adaptive_overload", 0.2)] {
            if wanted(case) {
                adaptive_case(case, contention).await;
            }
        }
    });
}
