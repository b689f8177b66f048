//! `Tumbling::every(size)`: back-to-back windows of one length, `[k·size, (k+1)·size)`.
//! Built on the pane state of sliding windows (a tumbling window is one pane).

use std::time::Duration;

use super::{Spec, WindowKind, sealed};

/// Tumbling windows: back to back, each `size` long, aligned to the time domain's epoch
/// (`[0, size)`, `[size, 2·size)`, ...). Every item is in exactly one window. `size` must be
/// more than zero.
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Tumbling;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let secs = [1u64, 4, 5, 9, 12];                        // event times, in seconds
/// let out = Pipeline::from_iter(secs)
///     .window(Tumbling::every(Duration::from_secs(5)))
///         .event_time(|s| Duration::from_secs(*s))
///     .count()
///     .collect().await.unwrap();
/// let counts: Vec<(u64, u64)> = out.iter().map(|w| (w.start.as_secs(), w.value)).collect();
/// assert_eq!(counts, vec![(0, 2), (5, 2), (10, 1)]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tumbling {
    size: Duration,
}

impl Tumbling {
    /// Windows of `size`, back to back.
    ///
    /// ```
    /// let minutes = flowline::Tumbling::every(std::time::Duration::from_secs(60));
    /// # let _ = minutes;
    /// ```
    pub fn every(size: Duration) -> Self {
        Tumbling { size }
    }
}

impl sealed::Kind for Tumbling {
    fn spec(&self, stage: &str, errors: &mut Vec<crate::Error>) -> Spec {
        let size = super::check_length(stage, "size", self.size, errors);
        Spec::Panes { size, step: size }
    }
}

impl WindowKind for Tumbling {}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{Tumbling, Windowed};
    use std::time::Duration;

    const NS: fn(u64) -> Duration = Duration::from_nanos;

    fn spans<V: Clone>(out: &[Windowed<(), V>]) -> Vec<(u64, u64, V)> {
        out.iter()
            .map(|w| {
                (
                    w.start.as_nanos() as u64,
                    w.end.as_nanos() as u64,
                    w.value.clone(),
                )
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn boundaries_are_exact_end_minus_one_in_end_in_the_next() {
        // windows of 1s: 999_999_999 ns is the last instant of [0, 1s); 1s opens [1s, 2s)
        let times = [
            0u64,
            999_999_999,
            1_000_000_000,
            1_999_999_999,
            2_000_000_000,
        ];
        let (out, report) = Pipeline::from_iter(times)
            .window(Tumbling::every(Duration::from_secs(1)))
            .event_time(|t| NS(*t))
            .collect_items()
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(
            spans(&out),
            vec![
                (0, 1_000_000_000, vec![0, 999_999_999]),
                (
                    1_000_000_000,
                    2_000_000_000,
                    vec![1_000_000_000, 1_999_999_999]
                ),
                (2_000_000_000, 3_000_000_000, vec![2_000_000_000]),
            ]
        );
        let w = report.stage("window").unwrap();
        assert_eq!((w.received, w.passed, w.emitted, w.late), (5, 5, 3, 0));
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_counts_per_window() {
        let events = [
            ("a", 0u64),
            ("b", 1),
            ("a", 2),
            ("a", 10),
            ("b", 11),
            ("b", 12),
        ];
        let out = Pipeline::from_iter(events)
            .window(Tumbling::every(Duration::from_secs(10)))
            .key_by(|(k, _)| *k)
            .event_time(|(_, s)| Duration::from_secs(*s))
            .count()
            .collect()
            .await
            .unwrap();
        let got: Vec<(&str, u64, u64)> = out
            .iter()
            .map(|w| (w.key, w.start.as_secs(), w.value))
            .collect();
        assert_eq!(
            got,
            vec![("a", 0, 2), ("b", 0, 1), ("a", 10, 1), ("b", 10, 2)]
        );
        assert!(out.iter().all(|w| w.items == w.value && !w.evicted));
    }

    #[tokio::test(start_paused = true)]
    async fn processing_time_windows_close_on_the_clock() {
        // one item every 300 ms on tokio's clock; 1 s windows from the run's start
        let out = Pipeline::from_iter(0..7u32)
            .map_async("tick", |x| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                x
            })
            .window(Tumbling::every(Duration::from_secs(1)))
            .collect_items()
            .map(|w| (w.start.as_millis(), w.value, tokio::time::Instant::now()))
            .collect()
            .await
            .unwrap();
        let got: Vec<(u128, Vec<u32>)> = out.iter().map(|(s, v, _)| (*s, v.clone())).collect();
        // items arrive at 300, 600, 900, 1200, ..., 2100 ms
        assert_eq!(
            got,
            vec![(0, vec![0, 1, 2]), (1000, vec![3, 4, 5]), (2000, vec![6])]
        );
        // the first window went out when the clock passed 1 s, not at the next item
        let first = out[0].2;
        let last = out[2].2;
        assert_eq!(
            (last - first).as_millis(),
            1100,
            "the last one was flushed at the end (2.1 s)"
        );
    }
}
