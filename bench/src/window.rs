//! Suite `window`: event-time windows over keyed events against hand-written loops.
//!
//! - `window_tumbling`: 10,000,000 events over 10,000 keys into 1 s tumbling counts, against
//!   a `HashMap<(key, window), u64>` loop that closes windows as its watermark passes them.
//! - `window_sliding`: the same events into 60 s windows every 1 s, against a hand-written
//!   pane-based loop (a count per key and second, each window the sum of its 60 panes).
//!
//! The events are made on the fly by the same generator on both sides (no 160 MB vector in
//! memory): 100,000 per second of event time (100 s in all), each up to 50 ms out of order,
//! with 100 ms of allowed lateness (so none is late). Both sides close windows as the
//! watermark passes them and flush the rest at the end, and both count the windows and
//! the items in them; the figures are checked equal. flowline and the loop run alternately,
//! `FLOWLINE_BENCH_PAIRS` pairs (default 5); the ratio is the median of each pair's ratio.
//! Peak RSS is measured per run (the process's high-water mark, reset before each run) and
//! the largest of each side is reported. `FLOWLINE_BENCH_SCALE` divides the event count.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowline::prelude::*;
use flowline::{Sliding, Tumbling};
use serde_json::json;

use crate::util::{alternate_paired, emit, peak_rss_mib, reset_peak_rss, round3, runtime};

const KEYS: u64 = 10_000;
/// Event time between two events: 100,000 per second.
const SPACING_NS: u64 = 10_000;
/// How far back an event may be (out of order).
const JITTER_NS: u64 = 50_000_000;
const LATENESS_NS: u64 = 100_000_000;
const SECOND: u64 = 1_000_000_000;

#[derive(Clone, Copy)]
struct Event {
    key: u32,
    at: u64,
}

fn splitmix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn events(n: u64) -> impl Iterator<Item = Event> + Send + 'static {
    (0..n).map(|i| {
        let h = splitmix(i);
        Event {
            key: (h % KEYS) as u32,
            at: (i * SPACING_NS + JITTER_NS).saturating_sub((h >> 32) % JITTER_NS),
        }
    })
}

fn scale() -> u64 {
    std::env::var("FLOWLINE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&d: &u64| d > 0)
        .unwrap_or(1)
}

fn pairs() -> usize {
    std::env::var("FLOWLINE_BENCH_PAIRS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(5)
}

/// What a run produced: windows and the sum of their counts (checked equal on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Totals {
    windows: u64,
    counted: u64,
}

pub fn run(only: Option<&str>) {
    let want = |c: &str| only.is_none_or(|o| o == c);
    if want("window_tumbling") {
        case("window_tumbling", 1);
    }
    if want("window_sliding") {
        case("window_sliding", 60);
    }
}

/// One case: windows of `size_s` seconds every second (1: tumbling).
fn case(name: &str, size_s: u64) {
    let n = 10_000_000 / scale();
    let rt = runtime();
    let (mut f_totals, mut b_totals) = (Totals::default(), Totals::default());
    let (mut f_rss, mut b_rss) = (0f64, 0f64);
    let paired = alternate_paired(
        pairs(),
        || {
            reset_peak_rss();
            let start = Instant::now();
            f_totals = rt.block_on(flowline_run(n, size_s));
            let d = start.elapsed();
            f_rss = f_rss.max(peak_rss_mib());
            d
        },
        || {
            reset_peak_rss();
            let start = Instant::now();
            b_totals = if size_s == 1 {
                tumbling_loop(n)
            } else {
                sliding_loop(n, size_s)
            };
            let d = start.elapsed();
            b_rss = b_rss.max(peak_rss_mib());
            d
        },
    );
    assert_eq!(f_totals, b_totals, "{name}: flowline and the loop disagree");
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    let goal = if size_s == 1 { 1.5 } else { 2.0 };
    emit(
        "window",
        name,
        per(paired.flowline),
        per(paired.baseline),
        "ns/event",
        json!({
            "events": n,
            "keys": KEYS,
            "windows": f_totals.windows,
            "pair_ratio": round3(paired.ratio),
            "pair_ratio_p10": round3(paired.ratio_p10),
            "pair_ratio_p90": round3(paired.ratio_p90),
            "pairs": pairs(),
            "goal": goal,
            "peak_rss_mib_flowline": round3(f_rss),
            "peak_rss_mib_baseline": round3(b_rss),
        }),
    );
}

async fn flowline_run(n: u64, size_s: u64) -> Totals {
    let counted = Arc::new(AtomicU64::new(0));
    let sum = counted.clone();
    let windows = Pipeline::from_iter(events(n));
    let windows = if size_s == 1 {
        windows
            .window(Tumbling::every(Duration::from_secs(1)))
            .key_by(|e: &Event| e.key)
            .event_time(|e| Duration::from_nanos(e.at))
            .allowed_lateness(Duration::from_nanos(LATENESS_NS))
            .count()
    } else {
        windows
            .window(Sliding::new(
                Duration::from_secs(size_s),
                Duration::from_secs(1),
            ))
            .key_by(|e: &Event| e.key)
            .event_time(|e| Duration::from_nanos(e.at))
            .allowed_lateness(Duration::from_nanos(LATENESS_NS))
            .count()
    };
    let report = windows
        .inspect(move |w| {
            sum.fetch_add(w.value, Ordering::Relaxed);
        })
        .run()
        .await
        .expect("window run");
    let stage = report.stage("window").expect("a window stage");
    assert_eq!((stage.received, stage.late), (n, 0));
    Totals {
        windows: stage.emitted,
        counted: counted.load(Ordering::Relaxed),
    }
}

/// The hand-written tumbling loop: a count per (key, window); when the watermark passes a
/// window's end, the map is swept and the closed windows go out.
fn tumbling_loop(n: u64) -> Totals {
    let mut counts: HashMap<(u32, u64), u64> = HashMap::new();
    let mut totals = Totals::default();
    let (mut max_seen, mut closed_below) = (0u64, 0u64);
    let mut out = |c: u64| {
        totals.windows += 1;
        totals.counted += c;
    };
    for e in events(n) {
        let w = e.at / SECOND;
        if w < closed_below {
            continue; // late (none are, with these events)
        }
        *counts.entry((e.key, w)).or_insert(0) += 1;
        if e.at > max_seen {
            max_seen = e.at;
            // windows below this one end at or before the watermark
            let closable = max_seen.saturating_sub(LATENESS_NS) / SECOND;
            if closable > closed_below {
                counts.retain(|&(_, w), c| {
                    if w < closable {
                        out(*c);
                        false
                    } else {
                        true
                    }
                });
                closed_below = closable;
            }
        }
    }
    let mut rest: Vec<_> = counts.into_iter().collect();
    rest.sort_unstable_by_key(|&((_, w), _)| w);
    for (_, c) in rest {
        out(c);
    }
    totals
}

/// The hand-written pane-based sliding loop: per key, a count per second (pane); when the
/// watermark passes a window's end, every key's window is the sum of its panes in range.
fn sliding_loop(n: u64, size_s: u64) -> Totals {
    let mut keys: HashMap<u32, VecDeque<(u64, u64)>> = HashMap::new();
    let mut totals = Totals::default();
    let mut max_seen = 0u64;
    // the end (in seconds) of the next windows to close
    let mut next_end = size_s;
    let mut close = |keys: &mut HashMap<u32, VecDeque<(u64, u64)>>, end: u64| {
        keys.retain(|_, panes| {
            let sum: u64 = panes
                .iter()
                .take_while(|&&(p, _)| p < end)
                .map(|&(_, c)| c)
                .sum();
            if sum > 0 {
                totals.windows += 1;
                totals.counted += sum;
            }
            // panes before the next window's start are done
            let next_start = end + 1 - size_s;
            while panes.front().is_some_and(|&(p, _)| p < next_start) {
                panes.pop_front();
            }
            !panes.is_empty()
        });
    };
    for e in events(n) {
        let pane = e.at / SECOND;
        let first_end = (pane + 1).max(size_s);
        let watermark = max_seen.saturating_sub(LATENESS_NS);
        if first_end * SECOND <= watermark {
            continue; // late (none are)
        }
        let panes = keys.entry(e.key).or_default();
        match panes.iter().rposition(|&(p, _)| p <= pane) {
            Some(i) if panes[i].0 == pane => panes[i].1 += 1,
            at => panes.insert(at.map_or(0, |i| i + 1), (pane, 1)),
        }
        if e.at > max_seen {
            max_seen = e.at;
            let watermark = max_seen.saturating_sub(LATENESS_NS);
            while next_end * SECOND <= watermark {
                close(&mut keys, next_end);
                next_end += 1;
            }
        }
    }
    while !keys.is_empty() {
        close(&mut keys, next_end);
        next_end += 1;
    }
    totals
}
