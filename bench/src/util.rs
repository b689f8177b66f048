//! Measuring helpers shared by the suites: alternating runs, medians, the JSON line format.

use std::time::{Duration, Instant};

/// Runs `flowline` and `baseline` alternately `reps` times each; returns the median of each.
pub fn alternate(
    reps: usize,
    flowline: impl FnMut() -> Duration,
    baseline: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let p = alternate_paired(reps, flowline, baseline);
    (p.flowline, p.baseline)
}

/// What [`alternate_paired`] measured.
pub struct Paired {
    /// Median of flowline's runs.
    pub flowline: Duration,
    /// Median of the baseline's runs.
    pub baseline: Duration,
    /// Median of the ratios of each flowline run to the baseline run right after it.
    pub ratio: f64,
    /// The ratios' first decile.
    pub ratio_p10: f64,
    /// The ratios' last decile.
    pub ratio_p90: f64,
}

/// [`alternate`], keeping each pair's ratio too. Where the machine's speed drifts by more
/// than the difference a case looks for (this VM's runs of the same job vary by up to 40%
/// over a minute), the ratio within each pair, taken a few hundred milliseconds apart,
/// compares like with like; the ratio of the two medians mixes runs made at different speeds.
pub fn alternate_paired(
    reps: usize,
    mut flowline: impl FnMut() -> Duration,
    mut baseline: impl FnMut() -> Duration,
) -> Paired {
    let mut a = Vec::with_capacity(reps);
    let mut b = Vec::with_capacity(reps);
    for _ in 0..reps {
        a.push(flowline());
        b.push(baseline());
    }
    if std::env::var_os("FLOWLINE_BENCH_REPS").is_some() {
        let ms = |v: &[Duration]| v.iter().map(Duration::as_millis).collect::<Vec<_>>();
        eprintln!("flowline ms: {:?}\nbaseline ms: {:?}", ms(&a), ms(&b));
    }
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| a.as_secs_f64() / b.as_secs_f64().max(1e-12))
        .collect();
    Paired {
        ratio: quantile(&mut ratios, 0.5),
        ratio_p10: quantile(&mut ratios, 0.1),
        ratio_p90: quantile(&mut ratios, 0.9),
        flowline: median(&mut a),
        baseline: median(&mut b),
    }
}

/// The value at `q` (0 to 1) of `v` by rank, `NaN` for none: `0.5` is the median (the
/// upper one of an even count, as [`median`] takes it). Sorts `v`.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
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
        "flowline": round3(flowline),
        "baseline": round3(baseline),
        "unit": unit,
        "ratio": round3(if baseline > 0.0 { flowline / baseline } else { f64::NAN }),
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
        obj.extend(more);
    }
    println!("{line}");
}

/// `x` to three decimals, as the JSON lines print figures.
pub fn round3(x: f64) -> f64 {
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

/// The most of `times` within any half-open window `[t, t + width)`, `t` at one of them
/// (sorts `times`): what "never more than n in a period" is checked against.
pub fn most_within<T: Ord + Copy + std::ops::Add<W, Output = T>, W: Copy>(
    times: &mut [T],
    width: W,
) -> usize {
    times.sort_unstable();
    let (mut best, mut j) = (0, 0);
    for i in 0..times.len() {
        while j < times.len() && times[j] < times[i] + width {
            j += 1;
        }
        best = best.max(j - i);
    }
    best
}

/// Three worker processes of this bench binary (`w1`, `w2`, `w3`), started with `flag` and
/// the server's URL, their output discarded.
pub fn spawn_workers(flag: &str, url: &str) -> Vec<std::process::Child> {
    let exe = std::env::current_exe().expect("own path");
    ["w1", "w2", "w3"]
        .iter()
        .map(|name| {
            std::process::Command::new(&exe)
                .args([flag, url, name])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn a worker")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{most_within, quantile};

    #[test]
    fn quantile_takes_by_rank_and_the_upper_median_of_an_even_count() {
        assert_eq!(quantile(&mut [3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&mut [4.0, 1.0, 3.0, 2.0], 0.5), 3.0);
        let mut v: Vec<f64> = (1..=11).map(f64::from).rev().collect();
        assert_eq!(quantile(&mut v, 0.1), 2.0);
        assert_eq!(quantile(&mut v, 0.9), 10.0);
        assert!(quantile(&mut [], 0.5).is_nan());
    }

    #[test]
    fn most_within_counts_a_half_open_window_starting_at_an_instant() {
        // 0, 999 and 1000: [0, 1000) holds two, [999, 1999) holds two (1000 is in, 0 is not).
        assert_eq!(most_within(&mut [1000u64, 0, 999], 1000), 2);
        assert_eq!(most_within(&mut [5u64, 5, 5], 1), 3);
        assert_eq!(most_within::<u64, u64>(&mut [], 1000), 0);
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let mut times = [t0, t0 + ms(10), t0 + ms(1000), t0 + ms(1005)];
        assert_eq!(most_within(&mut times, ms(1000)), 3);
    }
}
