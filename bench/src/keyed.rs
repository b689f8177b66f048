//! Suite `keyed`: an async stage with `key_by` (at most one call in flight per key, the
//! other keys going on) against the bound the work itself sets, and against `partition`.
//!
//! - `keyed_100`: 10,000 calls of 0–5 ms (a tokio sleep on the real clock, seeded draws),
//!   100 in flight, 100 keys. No schedule can end before the key whose calls take longest
//!   in sum (the critical path): ratio = wall time / that sum. The sum is of the times the
//!   calls actually slept, not of the drawn times: tokio's timer fires on whole
//!   milliseconds, so a sleep of 0.3 ms takes about 1 ms, and the drawn times would
//!   understate what any schedule must wait. Both sums are printed (`critical_ms`,
//!   `drawn_critical_ms`), and the same stage without keys, unordered (`unordered_ms`).
//! - `keyed_1`: 1,000 such calls of one key: wall time / the sum of the call times.
//! - `keyed_slow_key`: 100,000 calls of 1 ms over 1,000 keys drawn uniformly, except one
//!   slow key whose 100 items take 50 ms each; 64 in flight. Time until every other key's
//!   items are done: `key_by` against `partition(64, key)` with one call at a time per
//!   lane (the strict per-key order of fixed lanes: the slow key's lane waits for it).
//!   `keyed_slow_key_zipf`, for information: the keys drawn from Zipf(1.1) (20,000 calls,
//!   so that the most frequent key's own calls take seconds, not minutes).
//! - `keyed_overhead`: 1,000,000 calls ready at once, 16 in flight, 10,000 keys: `key_by`
//!   against the same stage without keys (ns per item; median of alternating runs).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use flowline::prelude::*;
use serde_json::json;

use crate::util::{alternate_paired, emit, ns_per_item, round3, runtime};

fn splitmix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub fn run(case: Option<&str>) {
    // Exact names: a prefix would run `keyed_100` for `keyed_1`.
    let want = |name: &str| case.is_none_or(|c| name == c);
    if want("keyed_100") {
        critical("keyed_100", 10_000, 100);
    }
    if want("keyed_1") {
        critical("keyed_1", 1_000, 1);
    }
    if want("keyed_slow_key") || want("keyed_slow_key_zipf") {
        slow_key(&want);
    }
    if want("keyed_overhead") {
        overhead();
    }
}

/// `(key, drawn call time)` for `n` calls over `keys` keys.
fn draws(n: u64, keys: u64) -> Vec<(u32, Duration)> {
    (0..n)
        .map(|i| {
            let h = splitmix(i ^ 0x006b_6579_6564);
            ((h % keys) as u32, Duration::from_micros((h >> 32) % 5_001))
        })
        .collect()
}

/// Runs the calls through a stage with `workers` in flight (`keyed`: `key_by`, else
/// unordered); returns the wall time and each key's sum of slept times.
fn timed_run(items: &[(u32, Duration)], keys: usize, keyed: bool) -> (Duration, Vec<Duration>) {
    let slept: Arc<Vec<AtomicU64>> = Arc::new((0..keys).map(|_| AtomicU64::new(0)).collect());
    let s = slept.clone();
    let items = items.to_vec();
    let rt = runtime();
    let start = Instant::now();
    rt.block_on(async move {
        let stage = Pipeline::from_iter(items)
            .map_async("call", move |(k, d)| {
                let s = s.clone();
                async move {
                    let t = Instant::now();
                    tokio::time::sleep(d).await;
                    s[k as usize].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
                }
            })
            .workers(100);
        let stage = if keyed {
            stage.key_by(|(k, _)| *k)
        } else {
            stage.unordered()
        };
        stage.run().await.unwrap();
    });
    let wall = start.elapsed();
    let sums = slept
        .iter()
        .map(|a| Duration::from_nanos(a.load(Relaxed)))
        .collect();
    (wall, sums)
}

fn critical(case: &str, n: u64, keys: u64) {
    let items = draws(n, keys);
    let mut drawn = vec![Duration::ZERO; keys as usize];
    for (k, d) in &items {
        drawn[*k as usize] += *d;
    }
    let (wall, slept) = timed_run(&items, keys as usize, true);
    let critical = slept.iter().max().copied().unwrap_or_default();
    let drawn_critical = drawn.iter().max().copied().unwrap_or_default();
    let (unordered, _) = timed_run(&items, keys as usize, false);
    let ms = |d: Duration| round3(d.as_secs_f64() * 1e3);
    emit(
        "keyed",
        case,
        ms(wall),
        ms(critical),
        "ms",
        json!({
            "items": n,
            "keys": keys,
            "workers": 100,
            "critical_ms": ms(critical),
            "drawn_critical_ms": ms(drawn_critical),
            "unordered_ms": ms(unordered),
            "goal": if keys == 1 { 1.05 } else { 1.1 },
        }),
    );
}

/// `(key, slow)` for the slow-key cases: key 0 is the slow one (its first 100 items).
fn slow_items(n: u64, key: impl Fn(u64) -> u32) -> Vec<(u32, bool)> {
    let mut slow_left = 100;
    (0..n)
        .map(|i| {
            let k = key(i);
            let slow = k == 0 && slow_left > 0;
            slow_left -= u32::from(slow);
            (k, slow)
        })
        .collect()
}

/// Time until every call of a key other than the slow one has ended.
fn others_done(items: &[(u32, bool)], keyed: bool) -> Duration {
    let others = items.iter().filter(|(k, _)| *k != 0).count() as u64;
    let done = Arc::new(AtomicU64::new(0));
    let at = Arc::new(AtomicU64::new(0));
    let items = items.to_vec();
    let rt = runtime();
    let start = Instant::now();
    let (d, a) = (done.clone(), at.clone());
    let call = move |(k, slow): (u32, bool)| {
        let (d, a) = (d.clone(), a.clone());
        async move {
            let ms = if slow { 50 } else { 1 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if k != 0 && d.fetch_add(1, Relaxed) + 1 == others {
                a.store(start.elapsed().as_nanos() as u64, Relaxed);
            }
        }
    };
    rt.block_on(async move {
        let source = Pipeline::from_iter(items);
        if keyed {
            source
                .map_async("call", call)
                .workers(64)
                .key_by(|(k, _)| *k)
                .unordered()
                .run()
                .await
                .unwrap();
        } else {
            source
                .partition(
                    64,
                    |(k, _)| *k,
                    move |lane| lane.map_async("call", call.clone()),
                )
                .run()
                .await
                .unwrap();
        }
    });
    Duration::from_nanos(at.load(Relaxed))
}

fn slow_key(want: &dyn Fn(&str) -> bool) {
    let uniform = slow_items(100_000, |i| (splitmix(i) % 1_000) as u32);
    // Zipf(1.1) over 1,000 keys, by the inverse of its distribution function.
    let weights: Vec<f64> = (1..=1_000)
        .map(|r| 1.0 / f64::powf(r as f64, 1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let cdf: Vec<f64> = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect();
    let zipf = slow_items(20_000, |i| {
        let u = (splitmix(i) >> 11) as f64 / (1u64 << 53) as f64;
        cdf.partition_point(|c| *c < u).min(999) as u32
    });
    for (case, items) in [("keyed_slow_key", &uniform), ("keyed_slow_key_zipf", &zipf)] {
        if !want(case) {
            continue;
        }
        let keyed = others_done(items, true);
        let lanes = others_done(items, false);
        let ms = |d: Duration| round3(d.as_secs_f64() * 1e3);
        let slow = items.iter().filter(|(_, s)| *s).count();
        emit(
            "keyed",
            case,
            ms(keyed),
            ms(lanes),
            "ms",
            json!({
                "items": items.len(),
                "slow_items": slow,
                "workers": 64,
                "baseline_is": "partition(64, key), one call at a time per lane",
                "goal": if case == "keyed_slow_key" { json!(0.5) } else { json!(null) },
            }),
        );
    }
}

fn overhead() {
    const N: u32 = 1_000_000;
    let rt = runtime();
    let run = |keyed: bool| {
        let start = Instant::now();
        rt.block_on(async {
            let stage = Pipeline::from_iter(0..N)
                .map_async("call", |x| async move { x })
                .workers(16);
            let stage = if keyed {
                stage.key_by(|x| x % 10_000)
            } else {
                stage
            };
            stage.run().await.unwrap();
        });
        start.elapsed()
    };
    let p = alternate_paired(5, || run(true), || run(false));
    emit(
        "keyed",
        "keyed_overhead",
        ns_per_item(p.flowline, u64::from(N)),
        ns_per_item(p.baseline, u64::from(N)),
        "ns/item",
        json!({
            "items": N,
            "keys": 10_000,
            "workers": 16,
            "baseline_is": "the same stage without key_by",
            "paired_ratio": round3(p.ratio),
            "goal": 2.0,
        }),
    );
}
