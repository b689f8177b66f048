//! Suite `batch` (issue 4): the Loader's batch-call ratio, `dedup_by` with a TTL window, and
//! `batch(256, 10 ms)` against tokio-stream's `chunks_timeout`.
//!
//! Sizes can be reduced with `FLOWLINE_BENCH_SCALE` (a divisor, default 1) on a loaded
//! machine; the JSON line says which size was run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flowline::prelude::*;
use serde_json::json;

fn scale() -> u64 {
    std::env::var("FLOWLINE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&d: &u64| d > 0)
        .unwrap_or(1)
}

/// Peak resident set size of this process, MiB (`VmHWM` in /proc/self/status).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

pub fn run(only: Option<&str>) {
    let want = |c: &str| only.is_none_or(|o| o == c);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if want("loader") {
            loader().await;
        }
        if want("batch") {
            batch().await;
        }
        // last: it reads the process's peak RSS
        if want("dedup_ttl") {
            dedup_ttl().await;
        }
    });
}

async fn loader() {
    let loads = 100_000 / scale();
    let keys = 1_000u64;
    let workers = 64u64;
    // max_batch = the number of workers: a batch fills without waiting for max_wait.
    let l = Loader::new(
        workers as usize,
        Duration::from_millis(1),
        |ks: Vec<u64>| async move {
            Ok::<_, String>(ks.into_iter().map(|k| (k, k)).collect::<HashMap<_, _>>())
        },
    )
    .expect("loader");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < loads {
                let k = (i * 7919) % keys;
                assert_eq!(l.load(k).await.unwrap(), Some(k));
                i += workers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ns = start.elapsed().as_nanos() as f64 / loads as f64;
    let calls = l.batch_calls() as f64;
    println!(
        "{}",
        json!({"suite": "batch", "case": "loader", "flowline": calls, "baseline": loads,
               "unit": "batch calls / loads", "ratio": calls / loads as f64,
               "ns_per_load": ns, "loads": loads, "keys": keys, "workers": workers, "max_batch": workers, "max_wait_ms": 1})
    );
}

async fn dedup_ttl() {
    let items = 10_000_000 / scale();
    let distinct = 1_000_000 / scale();
    let start = Instant::now();
    let report = Pipeline::from_iter((0..items).map(move |i| (i * 7919) % distinct))
        .dedup_by(|k| *k, Window::ttl(Duration::from_secs(3600)))
        .run()
        .await
        .unwrap();
    let ns = start.elapsed().as_nanos() as f64 / items as f64;
    // baseline: a plain HashSet filter over the same keys, in one loop
    let start = Instant::now();
    let mut seen = std::collections::HashSet::new();
    let mut kept = 0u64;
    for i in 0..items {
        if seen.insert((i * 7919) % distinct) {
            kept += 1;
        }
    }
    let base = start.elapsed().as_nanos() as f64 / items as f64;
    assert_eq!(kept, report.delivered());
    println!(
        "{}",
        json!({"suite": "batch", "case": "dedup_ttl", "flowline": ns, "baseline": base,
               "unit": "ns/item", "ratio": ns / base, "peak_rss_mib": peak_rss_mib(),
               "items": items, "distinct_keys": distinct})
    );
}

/// Alternating runs per side (after one warm-up run of each); the medians are reported.
const RUNS: usize = 7;

/// `items` through flowline's `batch(256, 10 ms)`: a whole run (source, stage, sink, report).
async fn flowline_batch(items: u64) -> Duration {
    let start = Instant::now();
    let report = Pipeline::from_iter(0..items)
        .batch(256, Duration::from_millis(10))
        .run()
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(report.stage("batch").unwrap().passed, items);
    took
}

/// The same items through tokio-stream's `chunks_timeout(256, 10 ms)`. The input is
/// `futures::stream::iter`, which is always ready: `tokio_stream::iter` returns `Pending`
/// every 32 items (a cooperative yield), and each of those makes `chunks_timeout` poll, and
/// so register, its timer; flowline's source pays nothing like it per item. The baseline is
/// the batching alone.
async fn baseline_batch(items: u64) -> Duration {
    use tokio_stream::StreamExt as _;
    let start = Instant::now();
    let s = futures::stream::iter(0..items).chunks_timeout(256, Duration::from_millis(10));
    let mut s = std::pin::pin!(s);
    let mut n = 0usize;
    while let Some(c) = s.next().await {
        n += c.len();
    }
    let took = start.elapsed();
    assert_eq!(n as u64, items);
    took
}

fn median(v: &mut [Duration]) -> f64 {
    crate::util::median(v).as_nanos() as f64
}

async fn batch() {
    let items = 1_000_000 / scale();
    flowline_batch(items).await;
    baseline_batch(items).await;
    let mut f = Vec::with_capacity(RUNS);
    let mut b = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        f.push(flowline_batch(items).await);
        b.push(baseline_batch(items).await);
    }
    let ns = median(&mut f) / items as f64;
    let base = median(&mut b) / items as f64;
    // The same on one thread: what the stage costs without cross-thread wake-ups.
    let one_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut runs = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                runs.push(flowline_batch(items).await);
            }
            median(&mut runs) / items as f64
        })
    })
    .join()
    .expect("bench thread");
    println!(
        "{}",
        json!({"suite": "batch", "case": "batch", "flowline": ns, "baseline": base,
               "unit": "ns/item", "ratio": ns / base, "items": items, "runs": RUNS,
               "flowline_current_thread": one_thread,
               "baseline_name": "tokio-stream chunks_timeout(256, 10ms) over futures::stream::iter"})
    );
}
