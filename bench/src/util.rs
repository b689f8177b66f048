//! Measuring helpers shared by the suites: alternating runs, medians, the JSON line format.

use std::time::{Duration, Instant};

/// Runs `flowline` and `baseline` alternately `reps` times each; returns the median of each.
pub fn alternate(
    reps: usize,
    mut flowline: impl FnMut() -> Duration,
    mut baseline: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let mut a = Vec::with_capacity(reps);
    let mut b = Vec::with_capacity(reps);
    for _ in 0..reps {
        a.push(flowline());
        b.push(baseline());
    }
    (median(&mut a), median(&mut b))
}

pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Times one run of an async block on `rt`.
pub fn time<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    f: impl FnOnce() -> F,
) -> Duration {
    let start = Instant::now();
    rt.block_on(f());
    start.elapsed()
}

pub fn ns_per_item(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

/// Prints one result line: `{"suite","case","flowline","baseline","unit","ratio", extra...}`.
pub fn emit(
    suite: &str,
    case: &str,
    flowline: f64,
    baseline: f64,
    unit: &str,
    extra: serde_json::Value,
) {
    let mut line = serde_json::json!({
        "suite": suite,
        "case": case,
        "flowline": round(flowline),
        "baseline": round(baseline),
        "unit": unit,
        "ratio": round(if baseline > 0.0 { flowline / baseline } else { f64::NAN }),
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    println!("{line}");
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Resets the peak (VmHWM) to the current resident size, so that the next
/// [`peak_rss_mib`] reports the peak of what ran since. Linux only; elsewhere a no-op.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
