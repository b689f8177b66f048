//! Property tests of the window stage against brute-force references.
//!
//! - `sliding_windows_hold_exactly_the_items_in_range`: random keyed events, out of order,
//!   random window sizes and steps (tumbling when equal) and lateness. The reference replays
//!   the watermark (largest event time before the item, minus the lateness) to tell which
//!   items are late, then puts every other item in every window `[k·step, k·step + size)`
//!   (k ≥ 0) that holds its time. The stage must emit exactly those windows, with exactly
//!   those items, count the late ones, and balance its counts.
//! - `sessions_match_a_brute_force_grouping`: the same for session windows with every item
//!   in order of time (no lateness in play): sessions are runs of a key's items closer than
//!   the gap.

use std::collections::BTreeMap;
use std::time::Duration;

use flowline::prelude::*;
use flowline::{Fold, Session, Sliding};
use proptest::prelude::*;

/// A window as compared: key, start, end, its items' ids sorted.
type Win = (u8, u64, u64, Vec<u32>);

/// The windows of `size` every `step` that hold the non-late items of `events` (key, time);
/// and how many were late.
fn reference(events: &[(u8, u64)], size: u64, step: u64, lateness: u64) -> (Vec<Win>, u64) {
    let mut windows: BTreeMap<(u8, u64), Vec<u32>> = BTreeMap::new();
    let mut max_seen = 0u64;
    let mut late = 0;
    for (id, &(key, t)) in events.iter().enumerate() {
        let watermark = max_seen.saturating_sub(lateness);
        max_seen = max_seen.max(t);
        // every k >= 0 with k*step <= t < k*step + size
        let holding: Vec<u64> = (0..=t / step).filter(|k| t < k * step + size).collect();
        // late when the first window that would hold it has closed
        let first_end = holding
            .iter()
            .map(|k| k * step + size)
            .min()
            .expect("a window");
        if first_end <= watermark {
            late += 1;
            continue;
        }
        for k in holding {
            windows.entry((key, k)).or_default().push(id as u32);
        }
    }
    let mut out: Vec<Win> = windows
        .into_iter()
        .map(|((key, k), mut ids)| {
            ids.sort_unstable();
            (key, k * step, k * step + size, ids)
        })
        .collect();
    out.sort();
    (out, late)
}

/// An event: (id, key, time in nanoseconds).
type Event = (u32, u8, u64);

/// A fold that keeps the events' ids.
type Ids = Fold<Vec<u32>, fn(&mut Vec<u32>, Event), fn(&mut Vec<u32>, &Vec<u32>)>;

fn ids() -> Ids {
    fn add(v: &mut Vec<u32>, (id, _, _): Event) {
        v.push(id);
    }
    // The signature `Fold::merge` takes: the accumulator's own type.
    #[allow(clippy::ptr_arg)]
    fn merge(a: &mut Vec<u32>, b: &Vec<u32>) {
        a.extend_from_slice(b);
    }
    Fold::new(Vec::new(), add as fn(&mut Vec<u32>, Event))
        .merge(merge as fn(&mut Vec<u32>, &Vec<u32>))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn sliding_windows_hold_exactly_the_items_in_range(
        events in prop::collection::vec((0u8..3, 0u64..200), 0..120),
        size in 1u64..40,
        step_div in 1u64..6,
        lateness in 0u64..30,
    ) {
        let step = (size / step_div).max(1);
        let (want, want_late) = reference(&events, size, step, lateness);
        let items: Vec<(u32, u8, u64)> =
            events.iter().enumerate().map(|(i, &(k, t))| (i as u32, k, t)).collect();
        let n = items.len() as u64;
        let (out, report) = runtime().block_on(async {
            Pipeline::from_iter(items)
                .window(Sliding::new(Duration::from_nanos(size), Duration::from_nanos(step)))
                .key_by(|e: &(u32, u8, u64)| e.1)
                .event_time(|e| Duration::from_nanos(e.2))
                .allowed_lateness(Duration::from_nanos(lateness))
                .aggregate(ids())
                .collect_with_report()
                .await
        }).unwrap();
        let mut got: Vec<Win> = out
            .into_iter()
            .map(|w| {
                let mut v = w.value;
                v.sort_unstable();
                prop_assert_eq!(w.items, v.len() as u64);
                Ok((w.key, w.start.as_nanos() as u64, w.end.as_nanos() as u64, v))
            })
            .collect::<Result<_, TestCaseError>>()?;
        got.sort();
        prop_assert_eq!(got, want);
        let s = report.stage("window").unwrap();
        prop_assert_eq!((s.received, s.late, s.failed), (n, want_late, want_late));
        prop_assert_eq!(s.passed, n - want_late);
        prop_assert!(report.is_balanced());
    }

    #[test]
    fn sessions_match_a_brute_force_grouping(
        mut events in prop::collection::vec((0u8..3, 0u64..300), 0..100),
        gap in 1u64..40,
    ) {
        events.sort_by_key(|e| e.1);
        // reference: per key, split where the next item is gap or more after the last
        let mut want: Vec<Win> = Vec::new();
        for key in 0..3u8 {
            let mut cur: Option<(u64, u64, Vec<u32>)> = None;
            for (id, &(k, t)) in events.iter().enumerate() {
                if k != key {
                    continue;
                }
                cur = match cur {
                    Some((start, last, mut ids)) if t < last + gap => {
                        ids.push(id as u32);
                        Some((start, t, ids))
                    }
                    Some((start, last, ids)) => {
                        want.push((key, start, last + gap, ids));
                        Some((t, t, vec![id as u32]))
                    }
                    None => Some((t, t, vec![id as u32])),
                };
            }
            if let Some((start, last, ids)) = cur {
                want.push((key, start, last + gap, ids));
            }
        }
        want.sort();
        let items: Vec<(u32, u8, u64)> =
            events.iter().enumerate().map(|(i, &(k, t))| (i as u32, k, t)).collect();
        let out = runtime().block_on(async {
            Pipeline::from_iter(items)
                .window(Session::gap(Duration::from_nanos(gap)))
                .key_by(|e: &(u32, u8, u64)| e.1)
                .event_time(|e| Duration::from_nanos(e.2))
                .aggregate(ids())
                .collect()
                .await
        }).unwrap();
        let mut got: Vec<Win> = out
            .into_iter()
            .map(|w| {
                let mut v = w.value;
                v.sort_unstable();
                (w.key, w.start.as_nanos() as u64, w.end.as_nanos() as u64, v)
            })
            .collect();
        got.sort();
        prop_assert_eq!(got, want);
    }
}
