//! `Sliding::new(size, step)`: windows of `size` starting every `step`, overlapping when
//! `step < size`. Built from panes (see [`panes`](super::panes)): an item is added to one
//! pane, and each window merges its panes when it closes.

use std::time::Duration;

use super::{Spec, WindowKind, sealed};

/// Sliding windows: each `size` long, one starting every `step` (`[k·step, k·step + size)`
/// for k = 0, 1, 2, ...), so an item is in `size / step` windows (rounded up). No window
/// starts before the time domain's epoch. `size` and `step` must be more than zero, and
/// `step` at most `size` (a gap between windows would leave items in none); an item may be
/// in at most 1,000,000 windows.
///
/// Windows are computed from panes, so the aggregation must be able to merge (a
/// [`fold`](crate::Windows::fold) needs a merge: use
/// [`aggregate`](crate::Windows::aggregate) with [`Fold::merge`](crate::Fold::merge)).
///
/// ```
/// use flowline::prelude::*;
/// use flowline::Sliding;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let out = Pipeline::from_iter([1u64, 3, 5])                   // seconds
///     .window(Sliding::new(Duration::from_secs(4), Duration::from_secs(2)))
///         .event_time(|s| Duration::from_secs(*s))
///     .collect_items()
///     .collect().await.unwrap();
/// let got: Vec<(u64, Vec<u64>)> = out.into_iter().map(|w| (w.start.as_secs(), w.value)).collect();
/// assert_eq!(got, vec![(0, vec![1, 3]), (2, vec![3, 5]), (4, vec![5])]);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sliding {
    size: Duration,
    step: Duration,
}

impl Sliding {
    /// Windows of `size`, one every `step`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let last_minute_every_second = flowline::Sliding::new(Duration::from_secs(60), Duration::from_secs(1));
    /// # let _ = last_minute_every_second;
    /// ```
    pub fn new(size: Duration, step: Duration) -> Self {
        Sliding { size, step }
    }
}

/// The most windows one item may be in (`size / step`): each is emitted, per key.
const MAX_WINDOWS_PER_ITEM: u64 = 1_000_000;

impl sealed::Kind for Sliding {
    fn spec(&self, stage: &str, errors: &mut Vec<crate::Error>) -> Spec {
        let size = super::check_length(stage, "size", self.size, errors);
        let step = super::check_length(stage, "step", self.step, errors);
        if self.step > self.size {
            errors.push(crate::Error::config_text(
                stage,
                "step",
                format!("{:?} (size {:?})", self.step, self.size),
                "must be at most size: a gap between windows would leave items in no window",
            ));
        } else if size / step > MAX_WINDOWS_PER_ITEM {
            errors.push(crate::Error::config_text(
                stage,
                "step",
                format!("{:?} (size {:?})", self.step, self.size),
                "is too small for size: an item would be in more than 1,000,000 windows",
            ));
        }
        Spec::Panes { size, step }
    }
}

impl WindowKind for Sliding {}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use crate::{Fold, Sliding};
    use std::time::Duration;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[tokio::test(start_paused = true)]
    async fn every_window_holds_exactly_the_items_in_its_range() {
        // size 10, step 4 (panes of 2): windows [0,10) [4,14) [8,18) [12,22) [16,26)
        let times = [0u64, 3, 4, 9, 10, 13, 17];
        let out = Pipeline::from_iter(times)
            .window(Sliding::new(MS(10), MS(4)))
            .event_time(|t| MS(*t))
            .collect_items()
            .collect()
            .await
            .unwrap();
        let got: Vec<(u64, u64, Vec<u64>)> = out
            .into_iter()
            .map(|w| {
                (
                    w.start.as_millis() as u64,
                    w.end.as_millis() as u64,
                    w.value,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 10, vec![0, 3, 4, 9]),
                (4, 14, vec![4, 9, 10, 13]),
                (8, 18, vec![9, 10, 13, 17]),
                (12, 22, vec![13, 17]),
                (16, 26, vec![17]),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stretch_emits_no_empty_windows() {
        let out = Pipeline::from_iter([1u64, 100])
            .window(Sliding::new(MS(4), MS(2)))
            .event_time(|t| MS(*t))
            .count()
            .collect()
            .await
            .unwrap();
        let got: Vec<(u128, u64)> = out.iter().map(|w| (w.start.as_millis(), w.value)).collect();
        assert_eq!(got, vec![(0, 1), (98, 1), (100, 1)]);
    }

    #[tokio::test]
    async fn hostile_sizes_are_rejected_all_at_once() {
        let err = Pipeline::from_iter(0..3u64)
            .window(Sliding::new(Duration::ZERO, Duration::ZERO))
            .count()
            .run()
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("size = 0ns: must be more than zero"),
            "{text}"
        );
        assert!(
            text.contains("step = 0ns: must be more than zero"),
            "{text}"
        );
        let err = Pipeline::from_iter(0..3u64)
            .window(Sliding::new(MS(1), MS(2)))
            .count()
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `window`: step = 2ms (size 1ms): must be at most \
             size: a gap between windows would leave items in no window"
        );
        let err = Pipeline::from_iter(0..3u64)
            .window(Sliding::new(
                Duration::from_secs(3600),
                Duration::from_nanos(1),
            ))
            .count()
            .run()
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("more than 1,000,000 windows"),
            "{err}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fold_without_merge_is_rejected_with_the_way_out() {
        let err = Pipeline::from_iter(0..3u64)
            .window(Sliding::new(MS(10), MS(5)))
            .fold(0u64, |s, x| *s += x)
            .run()
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: stage `window`: aggregate = a fold without merge: sliding \
             and session windows merge accumulators: give one (Fold::new(..).merge(..) with \
             aggregate)"
        );
        let out = Pipeline::from_iter(0..3u64)
            .window(Sliding::new(MS(10), MS(5)))
            .aggregate(Fold::new(0u64, |s: &mut u64, x: u64| *s += x).merge(|a, b| *a += *b))
            .collect()
            .await
            .unwrap();
        // processing time: every item arrived in the first window only (none starts before 0)
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, 3);
    }
}
