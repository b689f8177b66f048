//! Suite `flow`: rate-limit accuracy against governor, and the adaptive limit against static
//! worker counts on a simulated backend. Real clock.
//!
//! `cargo run --release -p flowline-bench -- flow [seconds-per-rate-case]`

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

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
        .rate_limit(Rate::per_second(rate))
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

/// Capacity 32: 5 ms up to 32 calls at once, slower in proportion beyond.
async fn backend(busy: Arc<AtomicUsize>, x: u64) -> u64 {
    const C: f64 = 32.0;
    let c = busy.fetch_add(1, SeqCst) + 1;
    let latency = Duration::from_millis(5).mul_f64((c as f64 / C).max(1.0));
    tokio::time::sleep(latency).await;
    busy.fetch_sub(1, SeqCst);
    x
}

async fn throughput(items: u64, workers: Option<usize>) -> f64 {
    let busy = Arc::new(AtomicUsize::new(0));
    let stage = Pipeline::from_iter(0..items)
        .map_async("backend", move |x| backend(busy.clone(), x))
        .unordered();
    let t = Instant::now();
    let report = match workers {
        Some(n) => stage.workers(n).run().await,
        None => {
            stage
                .adaptive(Adaptive::vegas(1..=512).initial(4))
                .run()
                .await
        }
    }
    .expect("adaptive run");
    report.delivered() as f64 / t.elapsed().as_secs_f64()
}

pub fn run(args: &[String]) {
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for (case, rate) in [("rate_1k", 1_000u64), ("rate_10k", 10_000), ("rate_100k", 100_000)] {
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
        let items = 10_000u64;
        let adaptive = throughput(items, None).await;
        let mut best = (0usize, 0.0f64);
        let mut sweep = serde_json::Map::new();
        for w in [4usize, 16, 32, 48, 64, 256] {
            let r = throughput(items, Some(w)).await;
            sweep.insert(w.to_string(), json!(r.round()));
            if r > best.1 {
                best = (w, r);
            }
        }
        println!(
            "{}",
            json!({"suite": "flow", "case": "adaptive", "flowline": adaptive.round(), "baseline": best.1.round(),
                   "unit": "items/s", "ratio": adaptive / best.1, "best_static_workers": best.0,
                   "vs_static_4": adaptive / sweep["4"].as_f64().unwrap_or(1.0),
                   "vs_static_256": adaptive / sweep["256"].as_f64().unwrap_or(1.0),
                   "sweep": sweep, "items": items})
        );
    });
}
