//! `take(n)` and `take_while(pred)`: let items through until satisfied, then stop pulling the
//! source; what is still on its way is counted as dropped. Written only with the public
//! operator API ([`Operator`], [`Out`], [`Step`]): what a user can write too.

use crate::{BoxError, Operator, Out, Step};

/// The operator behind [`Flow::take`](crate::Flow::take): `left` more items may pass.
pub(crate) struct Take {
    pub(crate) left: u64,
}

impl<T: Send + 'static> Operator<T> for Take {
    type Output = T;

    fn push(&mut self, item: T, out: &mut Out<'_, T>) -> Result<Step, BoxError> {
        if self.left == 0 {
            // Only for `take(0)`: no item may pass.
            return Ok(Step::Done);
        }
        out.push(item);
        self.left -= 1;
        // Done with the last item itself, so the source stops now rather than at the next.
        Ok(if self.left == 0 {
            Step::Done
        } else {
            Step::Continue
        })
    }

    fn name(&self) -> &'static str {
        "take"
    }
}

/// The operator behind [`Flow::take_while`](crate::Flow::take_while).
pub(crate) struct TakeWhile<F>(pub(crate) F);

impl<T, F> Operator<T> for TakeWhile<F>
where
    T: Send + 'static,
    F: FnMut(&T) -> bool + Send + 'static,
{
    type Output = T;

    fn push(&mut self, item: T, out: &mut Out<'_, T>) -> Result<Step, BoxError> {
        if !(self.0)(&item) {
            return Ok(Step::Done);
        }
        out.push(item);
        Ok(Step::Continue)
    }

    fn name(&self) -> &'static str {
        "take_while"
    }
}

#[cfg(test)]
mod tests {
    use crate::prelude::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    fn counted(pulls: &Arc<AtomicU64>) -> Pipeline<u64> {
        let pulls = pulls.clone();
        Pipeline::from_fn(move || {
            let n = pulls.fetch_add(1, Ordering::Relaxed);
            async move { Some(n) }
        })
    }

    #[tokio::test]
    async fn take_stops_pulling_the_source() {
        let pulls = Arc::new(AtomicU64::new(0));
        let (out, report) = counted(&pulls).take(5).collect_with_report().await.unwrap();
        assert_eq!(out, vec![0, 1, 2, 3, 4]);
        // the source pulled one chunk in the same task, and no more
        let pulled = pulls.load(Ordering::Relaxed);
        assert!(pulled <= 512, "pulled {pulled}");
        let s = report.stage("take").unwrap();
        assert_eq!(s.received, report.stage("source").unwrap().passed);
        assert_eq!((s.passed, s.dropped, s.failed), (5, s.received - 5, 0));
        assert_eq!(report.outcome, RunOutcome::Completed);
        assert!(report.is_balanced());
    }

    #[tokio::test(start_paused = true)]
    async fn take_stops_a_slow_source_behind_an_async_stage() {
        let pulls = Arc::new(AtomicU64::new(0));
        let p = pulls.clone();
        let start = tokio::time::Instant::now();
        let report = Pipeline::from_fn(move || {
            let n = p.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some(n)
            }
        })
        .map_async("work", |x| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            x
        })
        .workers(4)
        .take(20)
        .run()
        .await
        .unwrap();
        assert_eq!(report.delivered(), 20);
        let pulled = pulls.load(Ordering::Relaxed);
        // one item per 10 ms; the stop comes when the 20th item is through: a handful more
        // are pulled while the last calls run, not the rest of an endless source
        assert!((20..=40).contains(&pulled), "pulled {pulled}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let t = report.stage("take").unwrap();
        assert_eq!(t.dropped, t.received - 20);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn take_of_more_than_there_is_passes_all() {
        let out = Pipeline::from_iter(0..3).take(10).collect().await.unwrap();
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn take_zero_passes_nothing() {
        let (out, report) = Pipeline::from_iter(0..100)
            .take(0)
            .collect_with_report()
            .await
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(report.stage("take").unwrap().dropped, 100);
    }

    #[tokio::test]
    async fn take_while_stops_at_the_first_refusal() {
        let pulls = Arc::new(AtomicU64::new(0));
        let (out, report) = counted(&pulls)
            .take_while(|x| *x < 7)
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, (0..7).collect::<Vec<_>>());
        let s = report.stage("take_while").unwrap();
        assert_eq!((s.passed, s.dropped), (7, s.received - 7));
        assert!(pulls.load(Ordering::Relaxed) <= 512);
        assert!(report.is_balanced());
    }

    #[tokio::test]
    async fn take_while_panicking_predicate_fails_one_item() {
        let (out, report) = Pipeline::from_iter(0..5u32)
            .take_while(|x| if *x == 1 { panic!("one") } else { true })
            .collect_with_report()
            .await
            .unwrap();
        assert_eq!(out, vec![0, 2, 3, 4]);
        assert_eq!(report.stage("take_while").unwrap().failed, 1);
    }
}
